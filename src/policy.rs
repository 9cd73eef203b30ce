//! The policy engine: which feature a destination belongs to, whether the admin consents to it,
//! and which rules apply to a request. Pure: it takes names and paths and returns verdicts; it
//! never touches a socket, a file or a clock. `config` builds a [`Policy`] from TOML.

use std::collections::BTreeSet;
use std::fmt;

use http::HeaderName;
use serde_json_path::JsonPath;

/// Whether decisions are enforced or only reported (`mode = "report"`: traffic leaves unchanged
/// and the audit log says `would_block` / `would_strip`).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Mode {
    Enforce,
    Report,
}

/// What happens to destinations that belong to no feature.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum UnknownHosts {
    Tunnel,
    Deny,
}

/// How a denied feature's requests are answered.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum OnBlock {
    /// 403 with a JSON error body.
    Reject,
    /// 200 with `{}`, for clients that retry on errors.
    Sink,
}

/// The effective policy: features, their rules, and the admin's consent.
#[derive(Debug)]
pub struct Policy {
    pub mode: Mode,
    pub unknown_hosts: UnknownHosts,
    pub features: Vec<Feature>,
    pub consent: Consent,
}

/// The admin's choices: which features may send, which data categories they may not carry.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Consent {
    pub granted: BTreeSet<String>,
    pub withheld: BTreeSet<String>,
}

/// A kind of traffic the admin can consent to, known by its destinations.
#[derive(Debug)]
pub struct Feature {
    pub name: String,
    pub hosts: Vec<HostPattern>,
    /// Path prefixes; empty means every path of the hosts.
    pub paths: Vec<String>,
    pub on_block: OnBlock,
    /// Categories the feature cannot work without (withholding one while granting the feature is
    /// refused when the policy is loaded).
    pub requires: Vec<String>,
    pub rules: Vec<Rule>,
}

/// One `[[feature.rule]]`: an action over selectors, applied when its category is withheld (or
/// always, when it has none) and the request path is under one of its `paths`.
#[derive(Debug)]
pub struct Rule {
    /// Position in the feature's rule list, for audit reasons and `explain`.
    pub index: usize,
    pub category: Option<String>,
    pub paths: Vec<String>,
    pub action: Action,
}

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
    /// A query parameter, by its percent-decoded name.
    Query(String),
    /// A header, by name (case-insensitive).
    Header(HeaderName),
    /// A field of an `application/x-www-form-urlencoded` body, by its decoded name.
    Form(String),
    /// RFC 9535 JSONPath into a JSON body; each match is removed or replaced.
    Json(JsonSelector),
}

/// A `json:` selector: RFC 9535 JSONPath, optionally ending in a member-name pattern.
///
/// RFC 9535 cannot select members by the shape of their names, so a selector may end in one
/// segment `.PATTERN` where `*` stands for any run of characters (`$.props.feature_*`): the
/// members of each object the path before it selects whose names match. (`['feature_*']` in
/// brackets stays the literal name.) Names compare as the receivers read them ([`crate::fold`]).
#[derive(Clone, Debug)]
pub struct JsonSelector {
    pub source: String,
    /// The RFC 9535 part (all of the selector, when it has no pattern).
    pub path: JsonPath,
    /// The trailing member-name pattern, if any.
    pub pattern: Option<String>,
    /// The member names `path` names (shorthands, quoted names, names in filter queries).
    pub names: Vec<String>,
    /// `path` in the subset the span engine evaluates, when it is in it.
    pub simple: Option<SimplePath>,
}

/// The JSONPath subset the span engine ([`crate::spans`]) evaluates without reading the whole
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
            source: source.to_string(),
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

/// A host name as written in a feature: exact, or `*.` for any subdomain.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum HostPattern {
    Exact(String),
    /// Stored without the `*`, e.g. `.acme-telemetry.example`.
    Subdomain(String),
}

/// What to do with a CONNECT (or a TLS ClientHello) before any request is seen.
#[derive(Debug, Eq, PartialEq)]
pub enum ConnectVerdict<'p> {
    /// The host belongs to a feature: decrypt and decide each request.
    Intercept,
    /// Every request to the host would be blocked: answer now, before any TLS.
    Block { feature: &'p Feature },
    /// The host belongs to no feature.
    Unknown(UnknownHosts),
}

/// What the policy says of one request.
#[derive(Debug)]
pub enum Verdict<'p> {
    /// Consent for the feature is denied.
    Denied { feature: &'p Feature },
    /// Consent is granted; these rules apply (none: the request leaves as it is).
    Granted {
        feature: &'p Feature,
        rules: Vec<&'p Rule>,
        withheld: Vec<&'p str>,
    },
    /// The destination belongs to no feature.
    Unknown(UnknownHosts),
}

impl Policy {
    /// Decide a CONNECT to `host` before any TLS. Block only when no path of the host could be
    /// allowed: every feature on the host is denied with `on_block = "reject"`, and paths not
    /// covered by a feature are denied too.
    pub fn connect(&self, host: &str) -> ConnectVerdict<'_> {
        let host = normalize_host(host);
        let on_host: Vec<&Feature> = self
            .features
            .iter()
            .filter(|f| f.matches_host(&host))
            .collect();
        let Some(first) = on_host.first() else {
            return ConnectVerdict::Unknown(self.unknown_hosts);
        };
        if self.mode == Mode::Report {
            return ConnectVerdict::Intercept;
        }
        let all_rejected = on_host
            .iter()
            .all(|f| !self.consent.granted.contains(&f.name) && f.on_block == OnBlock::Reject);
        let whole_host =
            on_host.iter().any(|f| f.paths.is_empty()) || self.unknown_hosts == UnknownHosts::Deny;
        if all_rejected && whole_host {
            ConnectVerdict::Block { feature: first }
        } else {
            ConnectVerdict::Intercept
        }
    }

    /// Decide one request by host and path: the feature with the longest matching path prefix on
    /// the host wins (a feature without paths matches with length zero).
    pub fn decide(&self, host: &str, path: &str) -> Verdict<'_> {
        let host = normalize_host(host);
        let best = self
            .features
            .iter()
            .filter(|f| f.matches_host(&host))
            .filter_map(|f| f.path_match_len(path).map(|len| (len, f)))
            .max_by_key(|(len, _)| *len);
        let Some((_, feature)) = best else {
            return Verdict::Unknown(self.unknown_hosts);
        };
        if !self.consent.granted.contains(&feature.name) {
            return Verdict::Denied { feature };
        }
        let rules: Vec<&Rule> = feature
            .rules
            .iter()
            .filter(|r| match &r.category {
                None => true,
                Some(c) => self.consent.withheld.contains(c),
            })
            .filter(|r| r.paths.is_empty() || r.paths.iter().any(|p| path.starts_with(p.as_str())))
            .collect();
        let mut withheld: Vec<&str> = Vec::new();
        for category in rules.iter().filter_map(|r| r.category.as_deref()) {
            if !withheld.contains(&category) {
                withheld.push(category);
            }
        }
        Verdict::Granted {
            feature,
            rules,
            withheld,
        }
    }

    /// The feature a host belongs to, if any (the first one declared).
    pub fn feature_for_host(&self, host: &str) -> Option<&Feature> {
        let host = normalize_host(host);
        self.features.iter().find(|f| f.matches_host(&host))
    }
}

impl Feature {
    fn matches_host(&self, host: &str) -> bool {
        self.hosts.iter().any(|p| p.matches(host))
    }

    fn path_match_len(&self, path: &str) -> Option<usize> {
        if self.paths.is_empty() {
            return Some(0);
        }
        self.paths
            .iter()
            .filter(|p| path.starts_with(p.as_str()))
            .map(|p| p.len())
            .max()
    }
}

impl PartialEq for Feature {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for Feature {}

impl HostPattern {
    /// Parse `name` or `*.name`; names are compared lowercase without a trailing dot.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = normalize_host(s);
        let (pattern, name) = match s.strip_prefix("*.") {
            Some(rest) => (HostPattern::Subdomain(format!(".{rest}")), rest.to_string()),
            None => (HostPattern::Exact(s.clone()), s.clone()),
        };
        let valid = !name.is_empty()
            && name.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if valid {
            Ok(pattern)
        } else {
            Err(format!(
                "{s:?} is not a host name (write `name` or `*.name`)"
            ))
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == host,
            HostPattern::Subdomain(suffix) => {
                host.len() > suffix.len() && host.ends_with(suffix.as_str())
            }
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Subdomain(s) => write!(f, "*{s}"),
        }
    }
}

impl Selector {
    /// Whether applying this selector needs the request body.
    pub fn reads_body(&self) -> bool {
        matches!(self, Selector::Form(_) | Selector::Json(_))
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

impl Action {
    pub fn selectors(&self) -> Box<dyn Iterator<Item = &Selector> + '_> {
        match self {
            Action::Remove(s) | Action::Keep(s) => Box::new(s.iter()),
            Action::Replace(pairs) => Box::new(pairs.iter().map(|(s, _)| s)),
        }
    }
}

impl Rule {
    pub fn reads_body(&self) -> bool {
        self.action.selectors().any(Selector::reads_body)
    }
}

/// The audit reason for a request the rules changed: the withheld categories whose rules did
/// it, or the feature's unconditional rules.
pub fn rules_reason(withheld: &[&str]) -> String {
    if withheld.is_empty() {
        "the feature's unconditional rules".into()
    } else {
        format!("withheld: {}", withheld.join(", "))
    }
}

/// Lowercase, without a trailing dot: the form in which hosts are compared.
pub fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feature(name: &str, hosts: &[&str], paths: &[&str], on_block: OnBlock) -> Feature {
        Feature {
            name: name.into(),
            hosts: hosts
                .iter()
                .map(|h| HostPattern::parse(h).expect("valid host"))
                .collect(),
            paths: paths.iter().map(|p| p.to_string()).collect(),
            on_block,
            requires: vec![],
            rules: vec![
                Rule {
                    index: 0,
                    category: None,
                    paths: vec![],
                    action: Action::Remove(vec![Selector::Query("u".into())]),
                },
                Rule {
                    index: 1,
                    category: Some("activity_counts".into()),
                    paths: vec!["/v1/".into()],
                    action: Action::Remove(vec![Selector::Query("c".into())]),
                },
            ],
        }
    }

    fn policy(granted: &[&str], withheld: &[&str], unknown: UnknownHosts) -> Policy {
        Policy {
            mode: Mode::Enforce,
            unknown_hosts: unknown,
            features: vec![
                feature("a", &["a.example", "*.wild.example"], &[], OnBlock::Reject),
                feature("b", &["shared.example"], &["/b/"], OnBlock::Reject),
                feature("c", &["shared.example"], &["/b/long/"], OnBlock::Sink),
            ],
            consent: Consent {
                granted: granted.iter().map(|s| s.to_string()).collect(),
                withheld: withheld.iter().map(|s| s.to_string()).collect(),
            },
        }
    }

    #[test]
    fn hosts_match_exactly_by_wildcard_case_and_trailing_dot() {
        let p = policy(&["a"], &[], UnknownHosts::Tunnel);
        for (host, known) in [
            ("a.example", true),
            ("A.Example.", true),
            ("x.wild.example", true),
            ("x.y.wild.example", true),
            ("wild.example", false),
            ("xa.example", false),
            ("a.example.evil", false),
        ] {
            assert_eq!(p.feature_for_host(host).is_some(), known, "{host}");
        }
    }

    #[test]
    fn connect_blocks_only_when_every_path_is_blocked() {
        let p = policy(&[], &[], UnknownHosts::Tunnel);
        assert!(matches!(
            p.connect("a.example"),
            ConnectVerdict::Block { .. }
        ));
        // shared.example: features only cover /b/, other paths tunnel; c is a sink.
        assert_eq!(p.connect("shared.example"), ConnectVerdict::Intercept);
        assert_eq!(
            p.connect("other.example"),
            ConnectVerdict::Unknown(UnknownHosts::Tunnel)
        );
        let granted = policy(&["a"], &[], UnknownHosts::Tunnel);
        assert_eq!(granted.connect("a.example"), ConnectVerdict::Intercept);
        let report = Policy {
            mode: Mode::Report,
            ..policy(&[], &[], UnknownHosts::Tunnel)
        };
        assert_eq!(report.connect("a.example"), ConnectVerdict::Intercept);
    }

    #[test]
    fn longest_path_prefix_wins() {
        let p = policy(&["b"], &[], UnknownHosts::Deny);
        assert!(
            matches!(p.decide("shared.example", "/b/x"), Verdict::Granted { feature, .. } if feature.name == "b")
        );
        assert!(
            matches!(p.decide("shared.example", "/b/long/x"), Verdict::Denied { feature } if feature.name == "c")
        );
        assert!(matches!(
            p.decide("shared.example", "/other"),
            Verdict::Unknown(UnknownHosts::Deny)
        ));
    }

    #[test]
    fn rules_follow_withheld_categories_and_rule_paths() {
        let p = policy(&["a"], &["activity_counts"], UnknownHosts::Tunnel);
        let Verdict::Granted {
            rules, withheld, ..
        } = p.decide("a.example", "/v1/batch")
        else {
            panic!("granted expected");
        };
        assert_eq!(
            rules.iter().map(|r| r.index).collect::<Vec<_>>(),
            vec![0, 1]
        );
        assert_eq!(withheld, vec!["activity_counts"]);
        let Verdict::Granted { rules, .. } = p.decide("a.example", "/v2/batch") else {
            panic!("granted expected");
        };
        assert_eq!(rules.iter().map(|r| r.index).collect::<Vec<_>>(), vec![0]);
        let p = policy(&["a"], &[], UnknownHosts::Tunnel);
        let Verdict::Granted { rules, .. } = p.decide("a.example", "/v1/batch") else {
            panic!("granted expected");
        };
        assert_eq!(rules.len(), 1);
    }

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

    #[test]
    fn host_patterns_reject_garbage() {
        for bad in ["", "*.", "a..b", "a b", "a/b", "*"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            HostPattern::parse("*.X.example.")
                .expect("valid")
                .to_string(),
            "*.x.example"
        );
    }
}
