//! Drift: what a request carried that the pack does not know (DESIGN §9 `unclassified`), and
//! [`check`], which names it (and with `remove`, takes it out) before the rules run. A
//! feature's pack knows the names its rules select (of any category, withheld or not) and those
//! it lists as `known`; a parameter, a header or a JSON member none of them names, is in or
//! leads to, is unclassified. It is recorded by name, never by value, and with
//! `unclassified = "remove"` it does not leave. Pure.

use http::header::{
    ACCEPT, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, HOST, USER_AGENT,
};
use http::HeaderName;

use std::borrow::Cow;
use std::sync::Arc;

use super::error::RewriteError;
use super::fold::fold;
use super::keys::Names;
use super::params::{edit_params, form_edit, query_edit, Params};
use super::selector::{Guarded, JsonSelector, Selector};
use super::{Body, Edits, FormBody, HopByHop, Message};

/// Headers every HTTP client sends (framing, negotiation, the client's name): known to every
/// feature. (Those for one hop only are never forwarded: `super::HopByHop`.)
const EVERY_CLIENT: [HeaderName; 7] = [
    HOST,
    USER_AGENT,
    ACCEPT,
    ACCEPT_ENCODING,
    CONTENT_LENGTH,
    CONTENT_TYPE,
    CONTENT_ENCODING,
];

/// At most this many names a request (then a count of the rest), as `removed` is bounded.
const MAX_NAMES: usize = 16;

/// The unclassified members and events of a body named at most: those past it are counted,
/// not named (naming costs a path each, and a batch of a thousand unknown events would pay it
/// a thousand times for a record that holds 16).
pub(super) const NAMED: usize = 64;

/// A name longer than this is recorded as `*`.
const MAX_NAME: usize = 64;

/// What a feature's pack knows a request may carry, built once when the policy is loaded.
#[derive(Debug, Default)]
pub struct Known {
    /// Parameter names (query and form: one namespace), folded as the rules compare them.
    pub(super) params: Vec<String>,
    pub(super) headers: Vec<HeaderName>,
    pub(super) json: Vec<JsonSelector>,
    /// The member names `json` names, as receivers bind them: what a body is read with.
    pub(super) names: Arc<Names>,
}

impl Known {
    /// What `selectors` name: the feature's rules' and its `known` list's.
    pub fn new<'s>(selectors: impl IntoIterator<Item = &'s Selector>) -> Known {
        let mut known = Known::default();
        for sel in selectors {
            match sel {
                Selector::Query(name) | Selector::Form(name) => {
                    let folded = fold(name).into_owned();
                    if !known.params.contains(&folded) {
                        known.params.push(folded);
                    }
                }
                Selector::Header(name) => {
                    if !known.headers.contains(name) {
                        known.headers.push(name.clone());
                    }
                }
                Selector::Json(j) => known.json.push(j.clone()),
            }
        }
        let mut names = Names::default();
        for sel in &known.json {
            names.add(sel);
        }
        known.names = Arc::new(names);
        known
    }

    /// Whether every member name `rules` select or test is among these, spelt alike.
    pub(super) fn names_all<A: Guarded>(&self, rules: &[A]) -> bool {
        rules.iter().all(|rule| {
            let selected = rule.action().selectors().filter_map(|sel| match sel {
                Selector::Json(j) => Some(j),
                _ => None,
            });
            let tested = rule.conditions().iter().map(|c| &c.selector);
            selected
                .chain(tested)
                .flat_map(|j| &j.names)
                .all(|n| self.names.spelling_of(n) == Some(n.as_str()))
        })
    }

    pub(super) fn param(&self, name: &str) -> bool {
        let folded = fold(name);
        self.params.iter().any(|p| *p == *folded)
    }

    pub(super) fn header(&self, name: &HeaderName) -> bool {
        EVERY_CLIENT.contains(name) || self.headers.contains(name)
    }
}

/// What the rewriter does with what the pack does not know.
#[derive(Clone, Copy, Debug)]
pub struct Drift<'k> {
    pub known: &'k Known,
    /// Remove it (`unclassified = "remove"`); otherwise only name it.
    pub remove: bool,
}

/// One step of the path to an unclassified member, as the record names it: borrowed from the
/// document (a name is copied once, into the record's string).
pub(super) enum Label<'d> {
    Name(&'d str),
    /// An array item, by the `event` member it holds (Rudder's and Segment's event name).
    Item(Option<Cow<'d, str>>),
}

/// Whether a name may stand in the record: it looks like an identifier a program chose, not
/// like data (an address, a sentence, a long token). Anything else is recorded as `*`.
fn nameable(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `query:NAME`, `header:NAME` or `form:NAME`.
pub(super) fn named(kind: &str, name: &str) -> String {
    if nameable(name) {
        format!("{kind}:{name}")
    } else {
        format!("{kind}:*")
    }
}

/// A JSON member's path as JSONPath: names in dot notation, array items by their `event`
/// (`[?@.event == 'activity']`) or `[*]`; `within` names the part of an envelope.
pub(super) fn json_path(within: Option<&str>, labels: &[Label<'_>]) -> String {
    // What the longest rendering takes: one allocation a name.
    let room = labels
        .iter()
        .map(|l| match l {
            Label::Name(n) => n.len() + 4,
            Label::Item(e) => e.as_ref().map_or(0, |e| e.len()) + 16,
        })
        .sum::<usize>();
    let mut out = String::with_capacity(within.map_or(0, |w| w.len() + 1) + 6 + room);
    if let Some(within) = within {
        out.push_str(within);
        out.push(':');
    }
    out.push_str("json:$");
    for label in labels {
        match label {
            Label::Name(n)
                if nameable(n)
                    && n.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                    && !n.contains('-') =>
            {
                out.push('.');
                out.push_str(n);
            }
            Label::Name(n) if nameable(n) => {
                out.push_str("['");
                out.push_str(n);
                out.push_str("']");
            }
            Label::Name(_) => out.push_str(".*"),
            Label::Item(Some(event)) if nameable(event) => {
                out.push_str("[?@.event == '");
                out.push_str(event);
                out.push_str("']");
            }
            Label::Item(_) => out.push_str("[*]"),
        }
    }
    out
}

/// The names as the record holds them: each once, in the order met, at most [`MAX_NAMES`], then
/// a count of the rest (the names past those, and `unnamed` more found but not named).
pub(super) fn bounded(names: Vec<String>, unnamed: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(names.len().min(MAX_NAMES) + 1);
    let mut more = unnamed;
    for name in names {
        if out.contains(&name) {
            continue;
        }
        if out.len() < MAX_NAMES {
            out.push(name);
        } else {
            more += 1;
        }
    }
    if more > 0 {
        out.push(format!("({more} more)"));
    }
    out
}

/// Name what the request carries that the pack does not know, before any rule changes it (and
/// with `remove`, take it out): parameters (the query's and a form body's), headers, and the
/// members of a JSON body or envelope (a member, or an event the pack does not know, whole),
/// or the fields of a form; any other body is unclassified whole (`body:*`).
/// Parameter names that folded match a known one are known (as the rules match them).
pub(super) fn check(
    drift: Drift<'_>,
    msg: &mut Message,
    body: &mut Body,
    edits: &mut Edits,
) -> Result<(), RewriteError> {
    let known = drift.known;
    let mut names = Vec::new();
    let mut removed = Vec::new();
    // JSON members and events found but not named (past the first `drift::NAMED`).
    let mut unnamed = 0;
    let unknown_params = |slot: &Option<String>| -> Result<Vec<String>, ()> {
        let Some(text) = slot.as_deref() else {
            return Ok(Vec::new());
        };
        let mut names = Params::parse(text)?.names();
        names.retain(|n| !known.param(n));
        Ok(names)
    };
    let query = unknown_params(&msg.query).map_err(|()| RewriteError::AmbiguousQuery)?;
    names.extend(query.iter().map(|n| named("query", n)));
    if drift.remove && !query.is_empty() {
        query_edit(remove_params(&mut msg.query, &query))?;
        removed.extend(query.iter().map(|n| named("query", n)));
    }
    // Headers for one hop only never leave: nothing to name.
    let hop = HopByHop::of(&msg.headers);
    let headers: Vec<HeaderName> = msg
        .headers
        .keys()
        .filter(|h| !known.header(h) && !hop.contains(h))
        .cloned()
        .collect();
    for h in &headers {
        names.push(named("header", h.as_str()));
        if drift.remove {
            msg.headers.remove(h);
            removed.push(named("header", h.as_str()));
        }
    }
    // The body as the feature's receiver reads it: JSON when the pack knows JSON members (Go
    // services decode it whatever the Content-Type says), else the fields of a form.
    if known.json.is_empty() {
        let opaque = match body.params(&msg.headers)? {
            FormBody::Urlencoded(slot) => {
                let form = unknown_params(slot).map_err(|()| RewriteError::AmbiguousForm)?;
                names.extend(form.iter().map(|n| named("form", n)));
                if drift.remove && !form.is_empty() {
                    form_edit(remove_params(slot, &form))?;
                    removed.extend(form.iter().map(|n| named("form", n)));
                    body.touch();
                }
                false
            }
            FormBody::Multipart(parts) => {
                let mut form = parts.names();
                form.retain(|n| !known.param(n));
                names.extend(form.iter().map(|n| named("form", n)));
                if drift.remove && !form.is_empty() {
                    for n in &form {
                        parts.remove(n);
                    }
                    removed.extend(form.iter().map(|n| named("form", n)));
                    body.touch();
                }
                false
            }
            FormBody::None => !body.is_empty(),
        };
        // A body that is neither JSON the pack knows members of nor a form: what it holds
        // cannot be told apart, so it is unclassified whole (and goes whole with `remove`).
        if opaque {
            names.push("body:*".into());
            if drift.remove {
                body.clear();
                removed.push("body:*".into());
            }
        }
    } else {
        body.each_json(|part| {
            let within = part.within.label();
            let (n, named) = part
                .doc
                .unclassified(known, drift.remove, within.as_deref());
            unnamed += n - named.len();
            if drift.remove && n > 0 {
                *part.changed = true;
                removed.extend(named.iter().cloned());
            }
            names.extend(named);
        })?;
    }
    edits.unclassified = bounded(names, unnamed);
    let unremoved = if drift.remove { unnamed } else { 0 };
    edits.removed.extend(bounded(removed, unremoved));
    Ok(())
}

/// Remove every parameter named `names` from `slot`; whether any was there.
fn remove_params(slot: &mut Option<String>, names: &[String]) -> Result<bool, ()> {
    edit_params(slot, |p| {
        let mut hit = false;
        for name in names {
            hit |= p.remove(name);
        }
        hit
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_look_like_data_are_not_recorded() {
        assert_eq!(named("query", "ut"), "query:ut");
        assert_eq!(named("query", "jane.doe@acme.example"), "query:*");
        assert_eq!(named("header", &"x".repeat(65)), "header:*");
        let labels = [
            Label::Name("batch"),
            Label::Item(Some("nps_nps_feedback".into())),
            Label::Name("properties"),
            Label::Name("email"),
        ];
        assert_eq!(
            json_path(None, &labels),
            "json:$.batch[?@.event == 'nps_nps_feedback'].properties.email"
        );
        let labels = [
            Label::Name("48"),
            Label::Item(Some("it's".into())),
            Label::Name("Alice Smith"),
            Label::Name("x-y"),
        ];
        assert_eq!(
            json_path(Some("envelope.items[0]"), &labels),
            "envelope.items[0]:json:$['48'][*].*['x-y']"
        );
        let many: Vec<String> = (0..20).map(|i| format!("query:p{}", i % 18)).collect();
        let b = bounded(many, 0);
        assert_eq!(b.len(), 17);
        assert_eq!(b[16], "(2 more)");
        assert_eq!(bounded(vec!["query:a".into()], 3), ["query:a", "(3 more)"]);
    }
}
