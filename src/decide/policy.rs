//! The policy engine: which feature a destination belongs to, whether the admin consents to it,
//! and which rules apply to a request. Pure: it takes names and paths and returns verdicts; it
//! never touches a socket, a file or a clock. `config` builds a [`Policy`] from TOML.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use crate::rewrite::selector::{Action, Condition, Guarded};
use crate::rewrite::Known;

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

/// The admin's choices: which features may send, which data categories they may not carry,
/// and what happens to what the pack does not know.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Consent {
    pub granted: BTreeSet<String>,
    pub withheld: BTreeSet<String>,
    pub unclassified: Unclassified,
}

/// What a granted feature's request may carry that its pack does not know (`[consent]
/// unclassified`).
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum Unclassified {
    /// It leaves, named in the record.
    #[default]
    Pass,
    /// It is removed, and named.
    Remove,
    /// The request is refused.
    Block,
}

impl Unclassified {
    pub fn as_str(self) -> &'static str {
        match self {
            Unclassified::Pass => "pass",
            Unclassified::Remove => "remove",
            Unclassified::Block => "block",
        }
    }
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
    /// What the pack knows this feature's requests carry (its rules' selectors and its `known`
    /// list), built once; `None`: it declares nothing, and nothing is checked.
    pub known: Option<Known>,
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
    /// `when` / `unless`: the body members the rule's applying depends on.
    pub conditions: Vec<Condition>,
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
    /// Consent is granted with categories withheld, and no rule of the feature reads this path:
    /// what the path carries is unknown, so the withheld categories cannot be enforced on it.
    UnknownPath { feature: &'p Feature },
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
        let host = normalized_host(host);
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
        if !feature.knows_path(path) && feature.withholds_any(&self.consent) {
            return Verdict::UnknownPath { feature };
        }
        let rules: Vec<&Rule> = feature
            .rules
            .iter()
            .filter(|r| match &r.category {
                None => true,
                Some(c) => self.consent.withheld.contains(c),
            })
            .filter(|r| r.applies_at(path))
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
        self.features_on(host).next()
    }

    /// Every feature with `host` among its hosts (on any of their paths).
    pub fn features_on(&self, host: &str) -> impl Iterator<Item = &Feature> {
        let host = normalize_host(host);
        self.features.iter().filter(move |f| f.matches_host(&host))
    }
}

impl Feature {
    fn matches_host(&self, host: &str) -> bool {
        self.hosts.iter().any(|p| p.matches(host))
    }

    /// Whether the feature's rules read requests at `path`: a rule without `paths` reads every
    /// path, the others the paths they name (whatever their category). A feature without rules
    /// knows no path, and needs to know none.
    fn knows_path(&self, path: &str) -> bool {
        self.rules.iter().any(|r| r.applies_at(path))
    }

    /// Whether the consent withholds a category some rule of the feature covers.
    fn withholds_any(&self, consent: &Consent) -> bool {
        self.rules
            .iter()
            .filter_map(|r| r.category.as_ref())
            .any(|c| consent.withheld.contains(c))
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

impl Rule {
    fn applies_at(&self, path: &str) -> bool {
        self.paths.is_empty() || self.paths.iter().any(|p| path.starts_with(p.as_str()))
    }
}

/// The rewriter takes rules as they are.
impl Guarded for Rule {
    fn action(&self) -> &Action {
        &self.action
    }
    fn conditions(&self) -> &[Condition] {
        &self.conditions
    }
}

/// Lowercase, without a trailing dot: the form in which hosts are compared.
pub fn normalize_host(host: &str) -> String {
    normalized_host(host).into_owned()
}

/// [`normalize_host`], borrowed when `host` is in that form already.
pub fn normalized_host(host: &str) -> Cow<'_, str> {
    let host = host.trim_end_matches('.');
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// An address in the form in which addresses are compared: an IPv4-mapped IPv6 address (what a
/// dual-stack listener reports for IPv4 peers) as IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::selector::Selector;

    /// Borrowed or not, a host reads the same: lowercase ASCII, no trailing dots, other
    /// characters as they came.
    #[test]
    fn hosts_normalize_alike_borrowed_or_owned() {
        for host in [
            "example.com",
            "Example.COM.",
            "a..",
            ".",
            "",
            "ÉxAmple.test",
            "xn--bcher-kva.ch.",
        ] {
            let want = host.trim_end_matches('.').to_ascii_lowercase();
            assert_eq!(normalized_host(host), want.as_str(), "{host}");
            assert_eq!(normalize_host(host), want, "{host}");
        }
        assert!(matches!(normalized_host("example.com"), Cow::Borrowed(_)));
    }

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
                    conditions: vec![],
                },
                Rule {
                    index: 1,
                    category: Some("activity_counts".into()),
                    paths: vec!["/v1/".into()],
                    action: Action::Remove(vec![Selector::Query("c".into())]),
                    conditions: vec![],
                },
            ],
            known: None,
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
                unclassified: Unclassified::Pass,
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
    fn a_path_no_rule_reads_is_refused_while_a_category_is_withheld() {
        let mut p = policy(&["a"], &["activity_counts"], UnknownHosts::Tunnel);
        p.features[0].rules.remove(0);
        assert!(matches!(
            p.decide("a.example", "/v1/batch"),
            Verdict::Granted { .. }
        ));
        assert!(matches!(
            p.decide("a.example", "/v2/track"),
            Verdict::UnknownPath { .. }
        ));
        // Nothing withheld: nothing to enforce, and the path passes.
        p.consent.withheld.clear();
        assert!(matches!(
            p.decide("a.example", "/v2/track"),
            Verdict::Granted { .. }
        ));
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
