//! Selectors: what a rule points at in a request (`query:`, `header:`, `form:`, `json:`), and
//! what it does there (remove, replace, keep). A `json:` selector is RFC 9535 JSONPath with an
//! optional trailing member-name pattern; the subset the span engine evaluates
//! ([`SimplePath`]) is recognised here, once, when the policy is loaded. Pure.

use std::fmt;
use std::sync::Arc;

use http::HeaderName;
use serde_json_path::JsonPath;

#[derive(Debug)]
pub enum Action {
    Remove(Vec<Selector>),
    Replace(Vec<(Selector, String)>),
    /// Allowlist: within each kind of selector named, everything not named goes.
    Keep(Vec<Selector>),
}

/// What a rule points at in a request.
#[derive(Clone, Debug)]
pub enum Selector {
    /// A parameter, by its decoded name, wherever Go's `Request.FormValue` reads one: the query
    /// string, an urlencoded body or a multipart/form-data part. Same as `Form`; the kind only
    /// says where the admin expects it.
    Query(String),
    /// A header, by name (case-insensitive).
    Header(HeaderName),
    /// A form field: the same parameter namespace as `Query`.
    Form(String),
    /// RFC 9535 JSONPath into a JSON body; each match is removed or replaced.
    Json(JsonSelector),
}

/// A `json:` selector: RFC 9535 JSONPath, optionally ending in a member-name pattern.
///
/// RFC 9535 cannot select members by the shape of their names, so a selector may end in one
/// segment `.PATTERN` where `*` stands for any run of characters (`$.props.feature_*`): the
/// members of each object the path before it selects whose names match. (`['feature_*']` in
/// brackets stays the literal name.) Names compare as the receivers read them ([`super::fold`]).
#[derive(Clone, Debug)]
pub struct JsonSelector {
    /// As written (shared: a body's memo of what it selects keys on it without a copy).
    pub source: Arc<str>,
    /// The RFC 9535 part (all of the selector, when it has no pattern).
    pub path: JsonPath,
    /// The trailing member-name pattern, if any.
    pub pattern: Option<String>,
    /// The member names `path` names (shorthands, quoted names, names in filter queries).
    pub names: Vec<String>,
    /// `path` in the subset the span engine evaluates, when it is in it.
    pub simple: Option<SimplePath>,
}

/// The JSONPath subset the span engine (`rewrite::spans`) evaluates without reading the whole
/// body into a tree: segments of names, `*`, non-negative indexes, and filters that look only
/// at the child they test (no `$` inside).
#[derive(Clone, Debug)]
pub struct SimplePath {
    pub segments: Vec<SimpleSegment>,
}

#[derive(Clone, Debug)]
pub enum SimpleSegment {
    /// Members by name (`.a`, `['a','b']`), in the order written.
    Names(Vec<String>),
    Wildcard,
    Index(usize),
    /// `[?F]`, compiled as `$[?F]` and run on a one-item array holding the child.
    Filter(JsonPath),
}

impl SimplePath {
    /// `src` (valid RFC 9535) in the subset, or `None`.
    fn parse(src: &str) -> Option<SimplePath> {
        let b = src.as_bytes();
        if b.first() != Some(&b'$') {
            return None;
        }
        let mut i = 1;
        let mut segments = Vec::new();
        while i < b.len() {
            match b[i] {
                b'.' if b.get(i + 1) == Some(&b'*') => {
                    segments.push(SimpleSegment::Wildcard);
                    i += 2;
                }
                b'.' if b.get(i + 1) != Some(&b'.') => {
                    let end = src[i + 1..]
                        .find(|c: char| !(c == '_' || c.is_alphanumeric() || !c.is_ascii()))
                        .map_or(src.len(), |e| e + i + 1);
                    if end == i + 1 {
                        return None;
                    }
                    segments.push(SimpleSegment::Names(vec![src[i + 1..end].to_string()]));
                    i = end;
                }
                b'[' => {
                    let end = bracket_end(src, i)?;
                    segments.push(Self::bracket(&src[i + 1..end])?);
                    i = end + 1;
                }
                _ => return None,
            }
        }
        Some(SimplePath { segments })
    }

    fn bracket(inner: &str) -> Option<SimpleSegment> {
        let inner = inner.trim();
        if let Some(filter) = inner.strip_prefix('?') {
            if outside_strings(filter).contains('$') {
                return None;
            }
            return JsonPath::parse(&format!("$[?{filter}]"))
                .ok()
                .map(SimpleSegment::Filter);
        }
        if inner == "*" {
            return Some(SimpleSegment::Wildcard);
        }
        if let Ok(i) = inner.parse::<usize>() {
            return (inner.bytes().all(|b| b.is_ascii_digit())).then_some(SimpleSegment::Index(i));
        }
        // A list of quoted names only.
        let mut names = Vec::new();
        let mut rest = inner;
        while !rest.is_empty() {
            let quote = rest.chars().next()?;
            if quote != '\'' && quote != '"' {
                return None;
            }
            let close = string_end(rest, 0)?;
            names.push(unquote(&rest[1..close], quote).ok()?);
            rest = rest[close + 1..].trim_start();
            match rest.strip_prefix(',') {
                Some(r) => rest = r.trim_start(),
                None if rest.is_empty() => {}
                None => return None,
            }
        }
        (!names.is_empty()).then_some(SimpleSegment::Names(names))
    }
}

/// The index of the closing quote of the string literal opening at `open`.
fn string_end(src: &str, open: usize) -> Option<usize> {
    let b = src.as_bytes();
    let quote = b[open];
    let mut i = open + 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            c if c == quote => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// The index of the `]` closing the bracket that opens at `open` (strings and nesting skipped).
fn bracket_end(src: &str, open: usize) -> Option<usize> {
    let b = src.as_bytes();
    let mut depth = 0;
    let mut i = open;
    while i < b.len() {
        match b[i] {
            b'\'' | b'"' => i = string_end(src, i)?,
            b'[' | b'(' => depth += 1,
            b']' | b')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// `src` with the contents of its string literals blanked out.
fn outside_strings(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < src.len() {
        let c = src.as_bytes()[i];
        if c == b'\'' || c == b'"' {
            match string_end(src, i) {
                Some(end) => {
                    out.push_str("''");
                    i = end + 1;
                    continue;
                }
                None => return src.to_string(),
            }
        }
        out.push(c as char);
        i += 1;
    }
    out
}

impl JsonSelector {
    pub fn parse(source: &str) -> Result<Self, String> {
        let (path_src, pattern) = match source.rsplit_once('.') {
            Some((head, tail))
                if tail.contains('*')
                    && tail != "*"
                    && !head.ends_with('.')
                    && tail
                        .chars()
                        .all(|c| c == '*' || c == '_' || c.is_alphanumeric() || !c.is_ascii()) =>
            {
                (head, Some(tail.to_string()))
            }
            _ => (source, None),
        };
        let path = JsonPath::parse(path_src)
            .map_err(|e| format!("{source:?} is not RFC 9535 JSONPath: {e}"))?;
        if pattern.is_none() && path_src.trim() == "$" {
            return Err("json:$ selects the whole body; name the members to change".into());
        }
        let names = path_names(path_src)?;
        Ok(JsonSelector {
            source: source.into(),
            path,
            pattern,
            names,
            simple: SimplePath::parse(path_src),
        })
    }
}

/// The member names a (valid) JSONPath names: `.name` shorthands, and quoted names that open a
/// bracketed selection or follow a comma in one. String literals compared in filters and passed
/// to functions are values, not names.
fn path_names(src: &str) -> Result<Vec<String>, String> {
    let chars: Vec<char> = src.chars().collect();
    let mut names = Vec::new();
    let mut open: Vec<char> = Vec::new();
    let mut prev = ' ';
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\'' | '"' => {
                let start = i;
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                let literal: String = chars[start + 1..i.min(chars.len())].iter().collect();
                if matches!(prev, '[' | ',') && open.last() == Some(&'[') {
                    names.push(unquote(&literal, c)?);
                }
                prev = 's';
            }
            '.' => {
                let mut j = i + 1;
                if chars.get(j) == Some(&'.') {
                    j += 1;
                }
                let first = chars.get(j).copied().unwrap_or(' ');
                if first == '_' || first.is_alphabetic() || !first.is_ascii() {
                    let end = (j..chars.len())
                        .find(|&k| {
                            let ch = chars[k];
                            !(ch == '_' || ch.is_alphanumeric() || !ch.is_ascii())
                        })
                        .unwrap_or(chars.len());
                    names.push(chars[j..end].iter().collect());
                    i = end;
                    prev = 'n';
                    continue;
                }
                prev = '.';
            }
            '[' | '(' => {
                open.push(c);
                prev = c;
            }
            ']' | ')' => {
                open.pop();
                prev = c;
            }
            c if c.is_whitespace() => {}
            c => prev = c,
        }
        i += 1;
    }
    Ok(names)
}

/// A JSONPath string literal's text (between its quotes) as the name it stands for.
fn unquote(literal: &str, quote: char) -> Result<String, String> {
    let json = if quote == '\'' {
        let mut out = String::new();
        let mut chars = literal.chars();
        while let Some(c) = chars.next() {
            match (c, chars.clone().next()) {
                ('\\', Some('\'')) => {
                    out.push('\'');
                    chars.next();
                }
                ('\\', Some(n)) => {
                    out.push('\\');
                    out.push(n);
                    chars.next();
                }
                ('"', _) => out.push_str("\\\""),
                (c, _) => out.push(c),
            }
        }
        out
    } else {
        literal.to_string()
    };
    serde_json::from_str(&format!("\"{json}\""))
        .map_err(|_| format!("cannot read the name {literal:?}"))
}

impl Selector {
    /// Whether applying this selector needs the request body whatever its type (a parameter
    /// needs it only when it is a form: [`crate::rewrite::reads_body`]).
    pub fn reads_body(&self) -> bool {
        matches!(self, Selector::Json(_))
    }

    /// The parameter a `query:` or `form:` selector names: one namespace, as Go's
    /// `Request.FormValue` reads the query and a form body together.
    pub fn param(&self) -> Option<&str> {
        match self {
            Selector::Query(name) | Selector::Form(name) => Some(name),
            _ => None,
        }
    }

    /// Whether `text` can stand where this selector points (a header's replacement must be a
    /// valid header value); checked when the policy is loaded, so a replacement never fails on
    /// the wire.
    pub fn check_replacement(&self, text: &str) -> Result<(), String> {
        match self {
            Selector::Header(_) if http::HeaderValue::from_str(text).is_err() => Err(format!(
                "the replacement for {self} is not a valid header value (visible ASCII, spaces and tabs)"
            )),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Query(n) => write!(f, "query:{n}"),
            Selector::Header(n) => write!(f, "header:{n}"),
            Selector::Form(n) => write!(f, "form:{n}"),
            Selector::Json(j) => write!(f, "json:{}", j.source),
        }
    }
}

/// A condition on a member of a JSON body (`when` / `unless` of a rule): RFC 9535 cannot select
/// the root by one of its members, so a rule that applies only to some kinds of body (a push of
/// `type` `message`, not a session notice) says so here.
#[derive(Clone, Debug)]
pub struct Condition {
    /// A member path of names only (`$.type`, `$.a.b`), the member bound as receivers bind it.
    pub selector: JsonSelector,
    /// The strings the member is compared with.
    pub values: Vec<String>,
    /// `unless`: the rule applies when the member is none of `values`, or missing.
    pub negated: bool,
}

impl Condition {
    /// A condition on `selector`, which must name one member by names alone.
    pub fn new(selector: Selector, values: Vec<String>, negated: bool) -> Result<Self, String> {
        let singular = |j: &JsonSelector| {
            j.pattern.is_none()
                && j.simple.as_ref().is_some_and(|s| {
                    !s.segments.is_empty()
                        && s.segments
                            .iter()
                            .all(|seg| matches!(seg, SimpleSegment::Names(n) if n.len() == 1))
                })
        };
        match selector {
            Selector::Json(j) if singular(&j) => {
                if values.is_empty() {
                    return Err(format!("json:{} is compared with no value", j.source));
                }
                Ok(Condition {
                    selector: j,
                    values,
                    negated,
                })
            }
            other => Err(format!(
                "{other} is not a member of a JSON body named by names alone (like json:$.type)"
            )),
        }
    }

    /// Whether the condition holds when the member holds `found` (each string it holds; none
    /// when it is missing or not a string).
    pub fn holds(&self, found: &[String]) -> bool {
        let matched = found.iter().any(|v| self.values.contains(v));
        matched != self.negated
    }
}

/// What the rewriter applies: an action, and the conditions on the body under which it applies.
/// A policy's rules are this, and so is an action alone (no conditions), so the rewriter knows
/// nothing of the policy.
pub trait Guarded {
    fn action(&self) -> &Action;
    fn conditions(&self) -> &[Condition] {
        &[]
    }
}

impl Guarded for Action {
    fn action(&self) -> &Action {
        self
    }
}

impl<T: Guarded> Guarded for &T {
    fn action(&self) -> &Action {
        (**self).action()
    }
    fn conditions(&self) -> &[Condition] {
        (**self).conditions()
    }
}

impl Action {
    /// Whether applying this action needs the request body whatever its type.
    pub fn reads_body(&self) -> bool {
        self.selectors().any(Selector::reads_body)
    }

    /// Whether it names a parameter (a form body must then be read).
    pub fn reads_params(&self) -> bool {
        self.selectors().any(|s| s.param().is_some())
    }

    pub fn selectors(&self) -> impl Iterator<Item = &Selector> + '_ {
        let (listed, paired): (&[Selector], &[(Selector, String)]) = match self {
            Action::Remove(s) | Action::Keep(s) => (s, &[]),
            Action::Replace(pairs) => (&[], pairs),
        };
        listed.iter().chain(paired.iter().map(|(s, _)| s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_selectors_know_their_names_and_patterns() {
        for (src, names, pattern) in [
            ("$.message", vec!["message"], None),
            ("$.batch[*].userId", vec!["batch", "userId"], None),
            (
                "$.batch[?@.event == 'license'].properties.feature_*",
                vec!["batch", "event", "properties"],
                Some("feature_*"),
            ),
            (
                "$['a b','it\\'s'][?@[\"k\"] == 'v' && search(@.e, '^x')]..deep",
                vec!["a b", "it's", "k", "e", "deep"],
                None,
            ),
            ("$.x['feature_*']", vec!["x", "feature_*"], None),
        ] {
            let j = JsonSelector::parse(src).unwrap_or_else(|e| panic!("{src}: {e}"));
            assert_eq!(j.names, names, "{src}");
            assert_eq!(j.pattern.as_deref(), pattern, "{src}");
        }
        for bad in ["$", "$.a[", "$.*x*y[", "$..*x"] {
            assert!(JsonSelector::parse(bad).is_err(), "{bad}");
        }
    }
}
