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
//! (content codings), `params` (query and form), `envelope` (Sentry envelopes: a JSON document
//! per part), `keys` (member names as receivers bind them, shared by both engines), `spans` and
//! `tree` (the JSON engines), [`fold`] (Go's case folding).

pub mod codec;
mod drift;
mod envelope;
mod error;
pub mod fold;
mod keys;
mod multipart;
mod params;
pub mod selector;
mod spans;
mod tree;

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue};

pub use drift::{Drift, Known};
use envelope::Envelope;
pub use error::RewriteError;
use keys::{summarize, summarize_count, Names, Step, MAX_PATHS};
use multipart::Multipart;
use params::{edit_params, form_edit, query_edit, Params};
use selector::{Action, Condition, Guarded, JsonSelector, Selector};
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
    /// The positions (in the rules given) of the rules that changed something.
    pub by: Vec<usize>,
    /// What the request carried that the pack does not know (names; in `removed` too when it
    /// was removed).
    pub unclassified: Vec<String>,
}

/// Headers an allowlist (`keep`) never removes: without them the request cannot be framed.
const FRAMING_HEADERS: [HeaderName; 5] = [
    HOST,
    CONTENT_LENGTH,
    TRANSFER_ENCODING,
    CONTENT_TYPE,
    CONTENT_ENCODING,
];

/// Headers for one hop only (RFC 9110 §7.6.1, and the proxy's own), never forwarded: typed, so
/// naming them parses no name.
static HOP_BY_HOP: [HeaderName; 9] = [
    http::header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    http::header::PROXY_AUTHORIZATION,
    http::header::PROXY_AUTHENTICATE,
    http::header::TE,
    http::header::TRAILER,
    TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// The headers of a message that are for one hop only: the fixed ones, and those its
/// `Connection` header names. The proxy never forwards them, and they are no request data.
pub struct HopByHop {
    /// What `Connection` names (most messages name nothing: then nothing is allocated).
    named: Vec<HeaderName>,
}

impl HopByHop {
    pub fn of(headers: &HeaderMap) -> HopByHop {
        let named = headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        HopByHop { named }
    }

    pub fn contains(&self, name: &HeaderName) -> bool {
        HOP_BY_HOP.contains(name) || self.named.contains(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &HeaderName> {
        HOP_BY_HOP.iter().chain(&self.named)
    }
}

/// Apply `rules` in order. A body a rule reads is first decoded from its content codings (each
/// stage bounded by `max_body_bytes`). On success the message is ready to leave: a changed body,
/// and any body that was decoded, is encoded again with the same codings and carries a matching
/// `Content-Length` and no `Transfer-Encoding`. `rules` are anything that holds an action and
/// its conditions (a policy's rules, or actions themselves), so the rewriter knows nothing of the
/// policy. A rule whose conditions do not hold on the body as the rules before it left it is
/// skipped.
pub fn apply<A: Guarded>(
    rules: &[A],
    msg: &mut Message,
    max_body_bytes: u64,
) -> Result<Edits, RewriteError> {
    apply_with(
        rules,
        msg,
        max_body_bytes,
        Engine::for_rules(rules, None),
        None,
    )
}

/// [`apply`], after naming what the request carries that `drift` does not know (and, when
/// asked, removing it): parameters, headers, and the members of a JSON body or envelope.
pub fn apply_with_drift<A: Guarded>(
    rules: &[A],
    msg: &mut Message,
    max_body_bytes: u64,
    drift: Drift<'_>,
) -> Result<Edits, RewriteError> {
    let engine = Engine::for_rules(rules, Some(drift.known));
    apply_with(rules, msg, max_body_bytes, engine, Some(drift))
}

/// Which JSON engine reads a body: the span engine when it can apply every JSON selector of the
/// rules (each is in its subset, and no allowlist names a `json:` selector), else the tree.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Engine {
    Spans,
    Tree,
}

impl Engine {
    fn for_rules<A: Guarded>(rules: &[A], known: Option<&Known>) -> Engine {
        // Conditions are always in the span engine's subset (`Condition::new`).
        let spans = rules.iter().all(|rule| match rule.action() {
            Action::Keep(s) => !s.iter().any(|s| matches!(s, Selector::Json(_))),
            action => action.selectors().all(|s| match s {
                Selector::Json(j) => j.simple.is_some(),
                _ => true,
            }),
        }) && known.is_none_or(|k| k.json.iter().all(|j| j.simple.is_some()));
        if spans {
            Engine::Spans
        } else {
            Engine::Tree
        }
    }
}

/// [`apply`] with the given engine for JSON bodies (tests run both on the same input).
fn apply_with<A: Guarded>(
    rules: &[A],
    msg: &mut Message,
    max_body_bytes: u64,
    engine: Engine,
    drift: Option<Drift<'_>>,
) -> Result<Edits, RewriteError> {
    let known = drift.map(|d| d.known);
    let (plain, codings) = if reads_body(rules, &msg.headers, known) && !msg.body.is_empty() {
        codec::decode(&msg.headers, &msg.body, max_body_bytes)?
    } else {
        (msg.body.clone(), Vec::new())
    };
    let mut edits = Edits::default();
    let envelope = msg
        .headers
        .get_all(CONTENT_TYPE)
        .iter()
        .any(|v| envelope::declared(v.as_bytes()));
    let names = match known {
        // What the pack knows holds every name of its rules (the policy builds it so): its
        // names, built once when the policy was loaded, are the rules' too.
        Some(k) if k.names_all(rules) => k.names.clone(),
        Some(k) => {
            let mut names = Names::of(rules);
            for sel in &k.json {
                names.add(sel);
            }
            Arc::new(names)
        }
        None => Arc::new(Names::of(rules)),
    };
    let mut body = Body::new(plain.clone(), names, engine, envelope);
    if let Some(drift) = drift {
        drift::check(drift, msg, &mut body, &mut edits)?;
    }
    for (i, rule) in rules.iter().enumerate() {
        if !holds(rule.conditions(), &mut body)? {
            continue;
        }
        let before = edits.removed.len() + edits.replaced.len();
        match rule.action() {
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
        if edits.removed.len() + edits.replaced.len() > before {
            edits.by.push(i);
        }
    }
    // A body that was decoded leaves encoded again by the proxy even when no rule changed it:
    // what a decoder skips (gzip's name, comment and extra fields, zstd's skippable frames,
    // brotli's metadata blocks) is not content the rules read, so it must not leave.
    let changed = body.finish()?;
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

/// Whether every condition holds on the body. A body with conditions on it must be JSON (or
/// empty: no member is there).
fn holds(conditions: &[Condition], body: &mut Body) -> Result<bool, RewriteError> {
    for condition in conditions {
        let mut found: Vec<String> = Vec::new();
        body.each_json(|part| found.extend(part.doc.strings(&condition.selector)))?;
        if !condition.holds(&found) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn remove(
    sel: &Selector,
    msg: &mut Message,
    body: &mut Body,
    edits: &mut Edits,
) -> Result<(), RewriteError> {
    match sel {
        Selector::Query(name) | Selector::Form(name) => {
            let (query, form) = edit_param(msg, body, |p| p.remove(name), |m| m.remove(name))?;
            note_param(&mut edits.removed, name, query, form);
        }
        Selector::Header(name) => {
            if msg.headers.remove(name).is_some() {
                edits.removed.push(sel.to_string());
            }
        }
        Selector::Json(j) => edit_json(body, &mut edits.removed, |doc| doc.remove_all(j))?,
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
    match sel {
        Selector::Query(name) | Selector::Form(name) => {
            let (query, form) = edit_param(
                msg,
                body,
                |p| p.replace(name, value),
                |m| m.replace(name, value),
            )?;
            note_param(&mut edits.replaced, name, query, form);
        }
        Selector::Header(name) => {
            // Every instance: a repeated header's second value must not leave as it came.
            let new = HeaderValue::from_str(value).map_err(|_| RewriteError::BadReplacement)?;
            let all = msg.headers.get_all(name);
            let n = all.iter().count();
            if n > 1 || all.iter().any(|v| *v != new) {
                msg.headers.insert(name, new);
                edits.replaced.push(sel.to_string());
            }
        }
        Selector::Json(j) => {
            edit_json(body, &mut edits.replaced, |doc| doc.replace_all(j, value))?;
        }
    }
    Ok(())
}

/// Apply one edit to each JSON document of the body (an empty body has none); what it changed
/// goes to `list`, named within its part of an envelope.
fn edit_json(
    body: &mut Body,
    list: &mut Vec<String>,
    mut edit: impl FnMut(&mut Doc) -> Vec<String>,
) -> Result<(), RewriteError> {
    body.each_json(|part| {
        let changed = edit(part.doc);
        if !changed.is_empty() {
            *part.changed = true;
            match part.within.label() {
                None => list.extend(changed),
                Some(within) => list.extend(changed.iter().map(|c| format!("{within}:{c}"))),
            }
        }
    })
}

/// Apply one edit to a parameter wherever Go's `Request.FormValue` reads it: the
/// query string, and a form body (urlencoded pairs or multipart parts). Returns whether the
/// query and whether the body changed.
fn edit_param(
    msg: &mut Message,
    body: &mut Body,
    pairs: impl Fn(&mut Params<'_>) -> bool,
    parts: impl FnOnce(&mut Multipart) -> bool,
) -> Result<(bool, bool), RewriteError> {
    let query = query_edit(edit_params(&mut msg.query, &pairs))?;
    let form = match body.params(&msg.headers)? {
        FormBody::None => false,
        FormBody::Urlencoded(slot) => form_edit(edit_params(slot, &pairs))?,
        FormBody::Multipart(multipart) => parts(multipart),
    };
    if form {
        body.touch();
    }
    Ok((query, form))
}

/// Record a parameter edit where it happened: `query:NAME`, `form:NAME` (a body's).
fn note_param(list: &mut Vec<String>, name: &str, query: bool, form: bool) {
    if query {
        list.push(format!("query:{name}"));
    }
    if form {
        list.push(format!("form:{name}"));
    }
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
    let params: Vec<&str> = selectors.iter().filter_map(Selector::param).collect();
    let headers: Vec<&HeaderName> = selectors
        .iter()
        .filter_map(|s| match s {
            Selector::Header(n) => Some(n),
            _ => None,
        })
        .collect();
    let json: Vec<&JsonSelector> = selectors
        .iter()
        .filter_map(|s| match s {
            Selector::Json(j) => Some(j),
            _ => None,
        })
        .collect();
    let mut note = |kind: &str, n: usize| {
        if n > 0 {
            edits.removed.push(format!("keep:{kind}({n})"));
        }
    };
    if !params.is_empty() {
        // One namespace: the query and a form body keep the same names.
        let mut n = 0;
        query_edit(edit_params(&mut msg.query, |p| {
            n = p.keep_only(&params);
            n > 0
        }))?;
        note("query", n);
        let mut n = 0;
        match body.params(&msg.headers)? {
            FormBody::None => {}
            FormBody::Urlencoded(slot) => {
                form_edit(edit_params(slot, |p| {
                    n = p.keep_only(&params);
                    n > 0
                }))?;
            }
            FormBody::Multipart(multipart) => n = multipart.keep_only(&params),
        }
        if n > 0 {
            body.touch();
        }
        note("form", n);
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
    if !json.is_empty() {
        let mut n = 0;
        body.each_json(|part| {
            let kept: BTreeSet<Vec<Step>> = json.iter().flat_map(|j| part.doc.located(j)).collect();
            let pruned = part.doc.prune(&kept);
            if pruned > 0 {
                *part.changed = true;
            }
            n += pruned;
        })?;
        note("json", n);
    }
    Ok(())
}

/// The body, parsed on first use by whichever kind of rule reads it.
enum Body {
    /// Not parsed yet; `true`: its `Content-Type` declares a Sentry envelope.
    Raw(Bytes, Arc<Names>, Engine, bool),
    Empty,
    Json {
        doc: Doc,
        changed: bool,
    },
    Envelope(Envelope),
    /// Removed whole: it leaves empty.
    Cleared,
    /// An urlencoded body, as text.
    Form {
        params: Option<String>,
        changed: bool,
    },
    Multipart {
        form: Multipart,
        changed: bool,
    },
}

/// A body as the parameters of a form, if it is one.
enum FormBody<'b> {
    /// Not a form to a receiver (another type, or none): no parameters in it.
    None,
    Urlencoded(&'b mut Option<String>),
    Multipart(&'b mut Multipart),
}

/// What a body's `Content-Type` makes it to Go's `Request.ParseForm` (the media type compared
/// without parameters, in any case).
enum FormType {
    None,
    Urlencoded,
    Multipart,
}

/// The form type `headers` declare. More than one `Content-Type` where one is a form type is
/// read differently by different receivers (Go takes the first): refused.
fn form_type(headers: &HeaderMap) -> Result<(FormType, Option<&str>), RewriteError> {
    let mut values = headers.get_all(CONTENT_TYPE).iter();
    let Some(first) = values.next() else {
        return Ok((FormType::None, None));
    };
    let form = form_of(first);
    let more: Vec<&HeaderValue> = values.collect();
    if !more.is_empty() && (form.is_some() || more.iter().any(|v| form_of(v).is_some())) {
        return Err(RewriteError::AmbiguousForm);
    }
    Ok(form.map_or((FormType::None, None), |(t, text)| (t, Some(text))))
}

fn form_of(value: &HeaderValue) -> Option<(FormType, &str)> {
    let text = value.to_str().ok()?;
    let essence = text.split(';').next().unwrap_or_default().trim();
    if essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        Some((FormType::Urlencoded, text))
    } else if essence.eq_ignore_ascii_case("multipart/form-data") {
        Some((FormType::Multipart, text))
    } else {
        None
    }
}

/// Whether applying `rules` to a request with these headers needs its body: a JSON selector
/// does, and a parameter selector does when the body is a form.
pub fn reads_body<A: Guarded>(rules: &[A], headers: &HeaderMap, known: Option<&Known>) -> bool {
    // Whatever the body is, it may carry what the pack does not know.
    known.is_some()
        || rules
            .iter()
            .any(|r| r.action().reads_body() || !r.conditions().is_empty())
        || (rules.iter().any(|r| r.action().reads_params())
            && !matches!(form_type(headers), Ok((FormType::None, _))))
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
                .located(sel)
                .into_iter()
                .map(|id| d.path_of(id).iter().map(Step::owned).collect())
                .collect(),
            Doc::Tree(d) => d.located(sel),
        }
    }

    /// What no selector of `known` names, is in or leads to: a member, or the whole event (an
    /// array item holding a string `event`) when it is in one no selector names whole, an event
    /// the pack does not know. Returns how many, and the record's names of the first
    /// [`drift::NAMED`] of them (as JSONPath, within the part `within` of an envelope); with
    /// `remove`, each is removed.
    fn unclassified(
        &mut self,
        known: &Known,
        remove: bool,
        within: Option<&str>,
    ) -> (usize, Vec<String>) {
        match self {
            Doc::Spans(d) => {
                let mut covered: Vec<NodeId> = Vec::new();
                for sel in &known.json {
                    covered.extend_from_slice(d.locate_and_keep(sel));
                }
                let unknown = d.unknown(&covered);
                let mut labels = Vec::new();
                let names = unknown
                    .iter()
                    .take(drift::NAMED)
                    .map(|id| {
                        d.labels(*id, &mut labels);
                        drift::json_path(within, &labels)
                    })
                    .collect();
                if remove {
                    for id in &unknown {
                        d.remove(*id);
                    }
                }
                (unknown.len(), names)
            }
            Doc::Tree(d) => {
                let covered: Vec<Vec<Step>> =
                    known.json.iter().flat_map(|s| d.located(s)).collect();
                let unknown = d.unknown(&covered);
                let names = unknown
                    .iter()
                    .take(drift::NAMED)
                    .map(|p| drift::json_path(within, &d.labels(p)))
                    .collect();
                let n = unknown.len();
                if remove {
                    d.remove_paths(unknown);
                }
                (n, names)
            }
        }
    }

    /// The strings held where `sel` matches (members holding another type are left out).
    fn strings(&self, sel: &JsonSelector) -> Vec<String> {
        match self {
            Doc::Spans(d) => d
                .located(sel)
                .into_iter()
                .filter_map(|id| d.string(id))
                .collect(),
            Doc::Tree(d) => d.strings(sel),
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
                    .take_located(sel)
                    .into_iter()
                    .filter(|id| d.replace(*id, text))
                    .collect();
                if changed.len() > MAX_PATHS {
                    return summarize_count(sel, changed.len());
                }
                let paths: Vec<Vec<Step<&str>>> = changed.iter().map(|id| d.path_of(*id)).collect();
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

/// One JSON document of a body: the body, or a part of an envelope.
struct JsonPart<'b> {
    doc: &'b mut Doc,
    changed: &'b mut bool,
    within: Within,
}

/// Which document of a body a [`JsonPart`] is.
#[derive(Clone, Copy)]
enum Within {
    Body,
    EnvelopeHeader,
    EnvelopeItem(usize),
}

impl Within {
    /// How the record names the part (`envelope.items[0]`); `None` for a plain body.
    fn label(self) -> Option<String> {
        match self {
            Within::Body => None,
            Within::EnvelopeHeader => Some("envelope.header".into()),
            Within::EnvelopeItem(i) => Some(format!("envelope.items[{i}]")),
        }
    }
}

impl Body {
    fn new(raw: Bytes, names: Arc<Names>, engine: Engine, envelope: bool) -> Self {
        if raw.is_empty() {
            Body::Empty
        } else {
            Body::Raw(raw, names, engine, envelope)
        }
    }

    /// Hand each JSON document to `each`: the body's, or each part of an envelope; none for an
    /// empty body (nothing to strip).
    fn each_json(&mut self, mut each: impl FnMut(JsonPart<'_>)) -> Result<(), RewriteError> {
        if let Body::Raw(raw, names, engine, envelope) = self {
            let names = std::mem::take(names);
            let engine = *engine;
            let read = |raw: &Bytes, names: Arc<Names>| -> Result<Doc, RewriteError> {
                Ok(match engine {
                    Engine::Spans => Doc::Spans(SpanDoc::parse(raw, names)?),
                    Engine::Tree => Doc::Tree(parse_json(raw, names)?),
                })
            };
            *self = if *envelope {
                Body::Envelope(Envelope::parse(raw, |part| read(part, names.clone()))?)
            } else {
                Body::Json {
                    doc: read(raw, names)?,
                    changed: false,
                }
            };
        }
        match self {
            Body::Empty | Body::Cleared => {}
            Body::Json { doc, changed } => each(JsonPart {
                doc,
                changed,
                within: Within::Body,
            }),
            Body::Envelope(env) => {
                let header = std::iter::once((Within::EnvelopeHeader, &mut env.header));
                let items = env
                    .items
                    .iter_mut()
                    .enumerate()
                    .map(|(i, item)| (Within::EnvelopeItem(i), &mut item.payload));
                for (within, part) in header.chain(items) {
                    if let Some(doc) = part.doc.as_mut() {
                        each(JsonPart {
                            doc,
                            changed: &mut part.changed,
                            within,
                        });
                    }
                }
            }
            Body::Form { .. } | Body::Multipart { .. } => return Err(RewriteError::NotJson),
            Body::Raw(..) => unreachable!("raw body was parsed above"),
        }
        Ok(())
    }

    /// The body as a form's parameters, parsed on first use; not a form (another type, an
    /// empty body, a body a JSON rule read) has none.
    fn params(&mut self, headers: &HeaderMap) -> Result<FormBody<'_>, RewriteError> {
        if let Body::Raw(raw, ..) = self {
            *self = match form_type(headers)? {
                (FormType::None, _) => return Ok(FormBody::None),
                (FormType::Urlencoded, _) => {
                    let text = std::str::from_utf8(raw).map_err(|_| RewriteError::AmbiguousForm)?;
                    Body::Form {
                        params: Some(text.to_string()),
                        changed: false,
                    }
                }
                (FormType::Multipart, content_type) => Body::Multipart {
                    form: Multipart::parse(content_type.unwrap_or_default(), raw)?,
                    changed: false,
                },
            };
        }
        Ok(match self {
            Body::Form { params, .. } => FormBody::Urlencoded(params),
            Body::Multipart { form, .. } => FormBody::Multipart(form),
            Body::Empty | Body::Cleared | Body::Json { .. } | Body::Envelope(_) | Body::Raw(..) => {
                FormBody::None
            }
        })
    }

    fn is_empty(&self) -> bool {
        matches!(self, Body::Empty)
    }

    /// Remove the body whole.
    fn clear(&mut self) {
        *self = Body::Cleared;
    }

    /// Note that a rule changed the parsed form, so `finish` re-serializes it.
    fn touch(&mut self) {
        if let Body::Form { changed, .. } | Body::Multipart { changed, .. } = self {
            *changed = true;
        }
    }

    /// The new body, if it changed.
    fn finish(self) -> Result<Option<Bytes>, RewriteError> {
        Ok(match self {
            Body::Json { doc, changed: true } => doc.serialize(),
            Body::Envelope(env) if env.changed() => Some(env.serialize()?),
            Body::Cleared => Some(Bytes::new()),
            Body::Form {
                params,
                changed: true,
            } => Some(Bytes::from(params.unwrap_or_default())),
            Body::Multipart {
                form,
                changed: true,
            } => Some(form.serialize()),
            _ => None,
        })
    }
}

/// Remove the nodes `sel` selects: nodes, not paths, so removing one never moves another.
fn remove_nodes(d: &mut SpanDoc, sel: &JsonSelector) -> Vec<String> {
    let mut ids = d.take_located(sel);
    ids.sort_unstable();
    ids.dedup();
    if ids.len() > MAX_PATHS {
        let n = ids.into_iter().filter(|id| d.remove(*id)).count();
        return summarize_count(sel, n);
    }
    // A path counts the items removed before it (`path_of`), so it is the same after these
    // removals as before them.
    ids.retain(|id| d.remove(*id));
    let mut removed: Vec<Vec<Step<&str>>> = ids.iter().map(|id| d.path_of(*id)).collect();
    removed.sort();
    summarize(sel, &removed)
}

#[cfg(test)]
mod tests;
