//! The rewriter: applies a feature's rules to one request (query string, headers, form or JSON
//! body) and reports what it changed as selectors, never as values. Pure: bytes in, bytes out.
//!
//! Byte fidelity: query and form parameters that no rule touches keep their exact bytes; a JSON
//! body no rule changes is passed on as received. JSON selectors in the span engine's subset
//! (every selector of the Mattermost pack) are applied by cutting and splicing the received bytes
//! (`spans`): every byte no rule touched leaves as it came, Go's `\u003c` escapes included.
//! Other selectors and JSON allowlists use a `serde_json::Value` tree (`tree`). Which engine
//! reads a request's body is chosen once, from its rules (`Engine`).
//!
//! The rooms, in the order a body meets them: [`selector`] (what a rule points at), [`codec`]
//! (content codings), `params` (query and form), `keys` (member names as receivers bind
//! them, shared by both engines), `spans` and `tree` (the JSON engines), [`fold`] (Go's case
//! folding).

pub mod codec;
mod error;
pub mod fold;
mod keys;
mod params;
pub mod selector;
mod spans;
mod tree;

use std::collections::BTreeSet;

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue};

pub use error::RewriteError;
use keys::{summarize, summarize_count, Names, Step, MAX_PATHS};
use params::{edit_params, form_edit, query_edit};
use selector::{Action, JsonSelector, Selector, SimplePath};
use spans::{NodeId, SpanDoc};
use tree::{parse_json, TreeDoc};

/// The parts of a request the rules may change.
#[derive(Debug)]
pub struct Message {
    /// The raw query string, without `?`.
    pub query: Option<String>,
    pub headers: HeaderMap,
    /// The whole body; only read when a rule needs it.
    pub body: Bytes,
}

/// What the rules changed, as selectors (`query:uc`, `json:$['batch'][3]`).
#[derive(Debug, Default, Eq, PartialEq)]
pub struct Edits {
    pub removed: Vec<String>,
    pub replaced: Vec<String>,
}

/// Headers an allowlist (`keep`) never removes: without them the request cannot be framed.
const FRAMING_HEADERS: [HeaderName; 5] = [
    HOST,
    CONTENT_LENGTH,
    TRANSFER_ENCODING,
    CONTENT_TYPE,
    CONTENT_ENCODING,
];

/// Apply `rules` in order. A body a rule reads is first decoded from its content codings (each
/// stage bounded by `max_body_bytes`). On success the message is ready to leave: a changed body,
/// and any body that was decoded, is encoded again with the same codings and carries a matching
/// `Content-Length` and no `Transfer-Encoding`. `rules` are anything that holds an action (a policy's rules, or actions
/// themselves), so the rewriter knows nothing of the policy.
pub fn apply<A: AsRef<Action>>(
    rules: &[A],
    msg: &mut Message,
    max_body_bytes: u64,
) -> Result<Edits, RewriteError> {
    apply_with(rules, msg, max_body_bytes, Engine::for_rules(rules))
}

/// Which JSON engine reads a body: the span engine when it can apply every JSON selector of the
/// rules (each is in its subset, and no allowlist names a `json:` selector), else the tree.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Engine {
    Spans,
    Tree,
}

impl Engine {
    fn for_rules<A: AsRef<Action>>(rules: &[A]) -> Engine {
        let spans = rules.iter().all(|action| match action.as_ref() {
            Action::Keep(s) => !s.iter().any(|s| matches!(s, Selector::Json(_))),
            action => action.selectors().all(|s| match s {
                Selector::Json(j) => j.simple.is_some(),
                _ => true,
            }),
        });
        if spans {
            Engine::Spans
        } else {
            Engine::Tree
        }
    }
}

/// [`apply`] with the given engine for JSON bodies (tests run both on the same input).
fn apply_with<A: AsRef<Action>>(
    rules: &[A],
    msg: &mut Message,
    max_body_bytes: u64,
    engine: Engine,
) -> Result<Edits, RewriteError> {
    let reads_body = rules.iter().any(|r| r.as_ref().reads_body());
    let (plain, codings) = if reads_body && !msg.body.is_empty() {
        codec::decode(&msg.headers, &msg.body, max_body_bytes)?
    } else {
        (msg.body.clone(), Vec::new())
    };
    let mut edits = Edits::default();
    let mut body = Body::new(plain.clone(), Names::of(rules), engine);
    for action in rules {
        match action.as_ref() {
            Action::Remove(selectors) => {
                for sel in selectors {
                    remove(sel, msg, &mut body, &mut edits)?;
                }
            }
            Action::Replace(pairs) => {
                for (sel, value) in pairs {
                    replace(sel, value, msg, &mut body, &mut edits)?;
                }
            }
            Action::Keep(selectors) => keep(selectors, msg, &mut body, &mut edits)?,
        }
    }
    // A body that was decoded leaves encoded again by the proxy even when no rule changed it:
    // what a decoder skips (gzip's name, comment and extra fields, zstd's skippable frames,
    // brotli's metadata blocks) is not content the rules read, so it must not leave.
    let changed = body.finish();
    if changed.is_some() || !codings.is_empty() {
        let new_body = changed.unwrap_or(plain);
        let new_body = if codings.is_empty() {
            new_body
        } else {
            Bytes::from(codec::encode(&new_body, &codings))
        };
        msg.headers.remove(TRANSFER_ENCODING);
        msg.headers
            .insert(CONTENT_LENGTH, HeaderValue::from(new_body.len()));
        msg.body = new_body;
    }
    Ok(edits)
}

fn remove(
    sel: &Selector,
    msg: &mut Message,
    body: &mut Body,
    edits: &mut Edits,
) -> Result<(), RewriteError> {
    let hit = match sel {
        Selector::Query(name) => query_edit(edit_params(&mut msg.query, |p| p.remove(name)))?,
        Selector::Header(name) => msg.headers.remove(name).is_some(),
        Selector::Form(name) => {
            let form = body.form(&msg.headers)?;
            form_edit(edit_params(form, |p| p.remove(name)))?
        }
        Selector::Json(j) => {
            let removed = match body.json()? {
                Some(doc) => doc.remove_all(j),
                None => Vec::new(),
            };
            if !removed.is_empty() {
                body.touch();
            }
            edits.removed.extend(removed);
            false
        }
    };
    if hit {
        edits.removed.push(sel.to_string());
    }
    if hit && matches!(sel, Selector::Form(_)) {
        body.touch();
    }
    Ok(())
}

fn replace(
    sel: &Selector,
    value: &str,
    msg: &mut Message,
    body: &mut Body,
    edits: &mut Edits,
) -> Result<(), RewriteError> {
    let hit = match sel {
        Selector::Query(name) => {
            query_edit(edit_params(&mut msg.query, |p| p.replace(name, value)))?
        }
        Selector::Header(name) => {
            // Every instance: a repeated header's second value must not leave as it came.
            let new = HeaderValue::from_str(value).map_err(|_| RewriteError::BadReplacement)?;
            let all = msg.headers.get_all(name);
            let n = all.iter().count();
            let hit = n > 1 || all.iter().any(|v| *v != new);
            if hit {
                msg.headers.insert(name, new);
            }
            hit
        }
        Selector::Form(name) => {
            let form = body.form(&msg.headers)?;
            let hit = form_edit(edit_params(form, |p| p.replace(name, value)))?;
            if hit {
                body.touch();
            }
            hit
        }
        Selector::Json(j) => {
            let changed = match body.json()? {
                Some(doc) => doc.replace_all(j, value),
                None => Vec::new(),
            };
            if !changed.is_empty() {
                body.touch();
                edits.replaced.extend(changed);
            }
            false
        }
    };
    if hit {
        edits.replaced.push(sel.to_string());
    }
    Ok(())
}

/// Allowlist: within each kind of selector named, everything not named goes. What goes is
/// recorded by kind and count (`keep:query(2)`), never by name: names outside the allowlist are
/// exactly what the admin did not vouch for.
fn keep(
    selectors: &[Selector],
    msg: &mut Message,
    body: &mut Body,
    edits: &mut Edits,
) -> Result<(), RewriteError> {
    let names =
        |f: fn(&Selector) -> Option<&str>| selectors.iter().filter_map(f).collect::<Vec<&str>>();
    let query = names(|s| {
        if let Selector::Query(n) = s {
            Some(n)
        } else {
            None
        }
    });
    let form = names(|s| {
        if let Selector::Form(n) = s {
            Some(n)
        } else {
            None
        }
    });
    let headers: Vec<&HeaderName> = selectors
        .iter()
        .filter_map(|s| {
            if let Selector::Header(n) = s {
                Some(n)
            } else {
                None
            }
        })
        .collect();
    let json: Vec<&JsonSelector> = selectors
        .iter()
        .filter_map(|s| {
            if let Selector::Json(j) = s {
                Some(j)
            } else {
                None
            }
        })
        .collect();
    let mut note = |kind: &str, n: usize| {
        if n > 0 {
            edits.removed.push(format!("keep:{kind}({n})"));
        }
    };
    if !query.is_empty() {
        let mut n = 0;
        query_edit(edit_params(&mut msg.query, |p| {
            n = p.keep_only(&query);
            n > 0
        }))?;
        note("query", n);
    }
    if !headers.is_empty() {
        let drop: Vec<HeaderName> = msg
            .headers
            .keys()
            .filter(|k| !headers.contains(k) && !FRAMING_HEADERS.contains(k))
            .cloned()
            .collect();
        for name in &drop {
            msg.headers.remove(name);
        }
        note("header", drop.len());
    }
    if !form.is_empty() {
        let mut n = 0;
        let params = body.form(&msg.headers)?;
        form_edit(edit_params(params, |p| {
            n = p.keep_only(&form);
            n > 0
        }))?;
        if n > 0 {
            body.touch();
        }
        note("form", n);
    }
    if !json.is_empty() {
        if let Some(doc) = body.json()? {
            let kept: BTreeSet<Vec<Step>> = json.iter().flat_map(|j| doc.located(j)).collect();
            let n = doc.prune(&kept);
            if n > 0 {
                body.touch();
            }
            note("json", n);
        }
    }
    Ok(())
}

/// The body, parsed on first use by whichever kind of rule reads it.
enum Body {
    /// Not parsed yet.
    Raw(Bytes, Names, Engine),
    Empty,
    Json {
        doc: Doc,
        changed: bool,
    },
    Form {
        params: Option<String>,
        changed: bool,
    },
}

/// A parsed JSON body: as spans of the bytes received (the fast path), or as a tree.
enum Doc {
    Spans(SpanDoc),
    Tree(TreeDoc),
}

impl Doc {
    /// Where `sel` matches, as normalized paths.
    fn located(&self, sel: &JsonSelector) -> Vec<Vec<Step>> {
        match self {
            Doc::Spans(d) => d
                .located(sel, simple_path(sel))
                .into_iter()
                .map(|id| d.path_of(id))
                .collect(),
            Doc::Tree(d) => d.located(sel),
        }
    }

    /// Remove every member or item `sel` selects; what was removed, for the record.
    fn remove_all(&mut self, sel: &JsonSelector) -> Vec<String> {
        match self {
            Doc::Spans(d) => remove_nodes(d, sel),
            Doc::Tree(d) => d.remove_all(sel),
        }
    }

    /// Set every node `sel` selects to the string `text`; what changed, for the record (a
    /// node that already holds `text` is left as it is: nothing to record).
    fn replace_all(&mut self, sel: &JsonSelector, text: &str) -> Vec<String> {
        match self {
            Doc::Spans(d) => {
                let changed: Vec<NodeId> = d
                    .located(sel, simple_path(sel))
                    .into_iter()
                    .filter(|id| d.replace(*id, text))
                    .collect();
                if changed.len() > MAX_PATHS {
                    return summarize_count(sel, changed.len());
                }
                let paths: Vec<Vec<Step>> = changed.iter().map(|id| d.path_of(*id)).collect();
                summarize(sel, &paths)
            }
            Doc::Tree(d) => d.replace_all(sel, text),
        }
    }

    /// Remove everything neither kept nor on the way to something kept; returns the count.
    fn prune(&mut self, kept: &BTreeSet<Vec<Step>>) -> usize {
        match self {
            Doc::Tree(d) => d.prune(kept),
            Doc::Spans(_) => unreachable!("allowlists use the tree engine"),
        }
    }

    fn serialize(&self) -> Option<Bytes> {
        match self {
            Doc::Spans(d) => d.finish(),
            Doc::Tree(d) => Some(d.serialize()),
        }
    }
}

impl Body {
    fn new(raw: Bytes, names: Names, engine: Engine) -> Self {
        if raw.is_empty() {
            Body::Empty
        } else {
            Body::Raw(raw, names, engine)
        }
    }

    /// The JSON document, or `None` for an empty body (nothing to strip).
    fn json(&mut self) -> Result<Option<&mut Doc>, RewriteError> {
        if let Body::Raw(raw, names, engine) = self {
            let names = std::mem::take(names);
            let doc = match engine {
                Engine::Spans => Doc::Spans(SpanDoc::parse(raw, names)?),
                Engine::Tree => Doc::Tree(parse_json(raw, names)?),
            };
            *self = Body::Json {
                doc,
                changed: false,
            };
        }
        match self {
            Body::Empty => Ok(None),
            Body::Json { doc, .. } => Ok(Some(doc)),
            Body::Form { .. } => Err(RewriteError::NotJson),
            Body::Raw(..) => unreachable!("raw body was parsed above"),
        }
    }

    fn form(&mut self, headers: &HeaderMap) -> Result<&mut Option<String>, RewriteError> {
        if let Body::Raw(raw, ..) = self {
            let is_form = headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(';').next())
                .is_some_and(|v| {
                    v.trim()
                        .eq_ignore_ascii_case("application/x-www-form-urlencoded")
                });
            let text = std::str::from_utf8(raw).map_err(|_| RewriteError::NotForm)?;
            if !is_form {
                return Err(RewriteError::NotForm);
            }
            *self = Body::Form {
                params: Some(text.to_string()),
                changed: false,
            };
        }
        match self {
            Body::Empty => {
                *self = Body::Form {
                    params: None,
                    changed: false,
                };
                self.form(headers)
            }
            Body::Form { params, .. } => Ok(params),
            Body::Json { .. } => Err(RewriteError::NotForm),
            Body::Raw(..) => unreachable!("raw body was parsed above"),
        }
    }

    /// Note that a rule changed the parsed body, so `finish` re-serializes it.
    fn touch(&mut self) {
        if let Body::Json { changed, .. } | Body::Form { changed, .. } = self {
            *changed = true;
        }
    }

    /// The new body, if it changed.
    fn finish(self) -> Option<Bytes> {
        match self {
            Body::Json { doc, changed: true } => doc.serialize(),
            Body::Form {
                params,
                changed: true,
            } => Some(Bytes::from(params.unwrap_or_default())),
            _ => None,
        }
    }
}

/// The span engine's path of a selector (the engine is chosen only when every selector has one:
/// [`Engine::for_rules`]).
fn simple_path(sel: &JsonSelector) -> &SimplePath {
    match &sel.simple {
        Some(simple) => simple,
        None => unreachable!("the span engine is used only for simple paths"),
    }
}

/// Remove the nodes `sel` selects: nodes, not paths, so removing one never moves another.
fn remove_nodes(d: &mut SpanDoc, sel: &JsonSelector) -> Vec<String> {
    let mut ids = d.located(sel, simple_path(sel));
    ids.sort_unstable();
    ids.dedup();
    if ids.len() > MAX_PATHS {
        let n = ids.into_iter().filter(|id| d.remove(*id)).count();
        return summarize_count(sel, n);
    }
    // Paths as they were before any of these removals.
    let paths: Vec<Vec<Step>> = ids.iter().map(|id| d.path_of(*id)).collect();
    let mut removed: Vec<Vec<Step>> = ids
        .into_iter()
        .zip(paths)
        .filter(|(id, _)| d.remove(*id))
        .map(|(_, path)| path)
        .collect();
    removed.sort();
    summarize(sel, &removed)
}

#[cfg(test)]
mod tests;
