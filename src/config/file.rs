//! The on-disk format (DESIGN §6): `serde` types that reject unknown keys, and their conversion
//! into the runtime types, with every check made here and every error naming its file and key.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;
use serde::Deserialize;

use super::mattermost;
use super::{
    consent_hash, AuditTarget, Config, ConfigError, Limits, Listen, Roots, Rotation, SyncMode,
    UpstreamSettings, CATEGORIES,
};
use crate::decide::path::normalize;
use crate::decide::policy::{
    Consent, Feature, HostPattern, Mode, OnBlock, Policy, Rule, Unclassified, UnknownHosts,
};
use crate::rewrite::selector::{Action, Condition, JsonSelector, Selector};
use crate::rewrite::Known;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct File {
    // Every key may be missing from an admin's file; the pack, merged below it, has them all.
    #[serde(default)]
    mode: ModeFile,
    #[serde(default)]
    unknown_hosts: UnknownHostsFile,
    #[serde(default)]
    listen: ListenFile,
    #[serde(default)]
    clients: ClientsFile,
    #[serde(default)]
    tls: TlsFile,
    #[serde(default)]
    upstream: UpstreamFile,
    #[serde(default)]
    audit: AuditFile,
    #[serde(default)]
    limits: LimitsFile,
    /// Read as a raw table by `parse_consent` (its keys are feature names); declared here so
    /// `deny_unknown_fields` accepts it.
    #[allow(dead_code)]
    consent: Option<toml::Table>,
    #[serde(default)]
    feature: Vec<FeatureFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ModeFile {
    #[default]
    Enforce,
    Report,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum UnknownHostsFile {
    #[default]
    Tunnel,
    Deny,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ListenFile {
    proxy: String,
    transparent: Option<String>,
    admin: Option<String>,
    proxy_protocol: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ClientsFile {
    allow: Vec<String>,
    balancers: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct TlsFile {
    ca_cert: PathBuf,
    ca_key: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct UpstreamFile {
    roots: Roots,
    #[serde(default)]
    extra_ca: Vec<PathBuf>,
    #[serde(default)]
    resolve: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct AuditFile {
    path: String,
    node: Option<String>,
    rotate_bytes: Option<u64>,
    rotate_keep: Option<usize>,
    sync: SyncFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum SyncFile {
    #[default]
    Os,
    Data,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct LimitsFile {
    max_body_bytes: u64,
    max_connections: Option<usize>,
    header_read_timeout_secs: Option<u64>,
    tls_handshake_timeout_secs: Option<u64>,
    connect_timeout_secs: Option<u64>,
    upstream_timeout_secs: Option<u64>,
    tunnel_idle_timeout_secs: Option<u64>,
    leaf_cache_size: Option<usize>,
    drain_delay_secs: Option<u64>,
    shutdown_timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeatureFile {
    name: String,
    hosts: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    on_block: OnBlockFile,
    #[serde(default)]
    requires: Vec<String>,
    /// What the feature's requests carry that no rule names and that is not withheld data:
    /// selectors, so that anything else is unclassified.
    #[serde(default)]
    known: Vec<String>,
    #[serde(default)]
    rule: Vec<RuleFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum OnBlockFile {
    #[default]
    Reject,
    Sink,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    category: Option<String>,
    #[serde(default)]
    paths: Vec<String>,
    remove: Option<Vec<String>>,
    replace: Option<BTreeMap<String, String>>,
    keep: Option<Vec<String>>,
    /// `{ "json:$.type" = "message" }`: the rule applies only when each member holds one of
    /// the strings; `unless`: only when none does (or it is missing).
    #[serde(default)]
    when: BTreeMap<String, OneOrMore>,
    #[serde(default)]
    unless: BTreeMap<String, OneOrMore>,
}

/// A string, or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMore {
    One(String),
    More(Vec<String>),
}

type ErrFn<'a> = &'a dyn Fn(&str, String) -> ConfigError;

/// What a [`Config`] holds besides the file's own settings, known before it is built.
pub(super) struct Made<'a> {
    pub(super) source: &'a str,
    /// The effective policy as TOML (`check --print`), and its hash without consent.
    pub(super) effective: String,
    pub(super) policy_hash: String,
    /// The `[consent]` keys that apply, and the consent derived from Mattermost's config.
    pub(super) consent: toml::Table,
    pub(super) derived: Option<&'a mattermost::Derived>,
    pub(super) mattermost: Option<PathBuf>,
    pub(super) policy_file: Option<PathBuf>,
    pub(super) mattermost_override: Option<PathBuf>,
    pub(super) loaded: super::Loaded,
}

impl File {
    /// The runtime config, whole: `made` names what the file alone does not say (where it came
    /// from, its hashes, the consent keys that apply and the Mattermost consent derived).
    pub(super) fn into_config(self, made: Made<'_>, err: ErrFn<'_>) -> Result<Config, ConfigError> {
        let addr = |key: &str, s: &str| {
            s.parse::<SocketAddr>()
                .map_err(|_| err(key, format!("{s:?} is not an address like 127.0.0.1:3128")))
        };
        let listen = Listen {
            proxy: addr("listen.proxy", &self.listen.proxy)?,
            transparent: self
                .listen
                .transparent
                .as_deref()
                .map(|s| addr("listen.transparent", s))
                .transpose()?,
            admin: self
                .listen
                .admin
                .as_deref()
                .map(|s| addr("listen.admin", s))
                .transpose()?,
            proxy_protocol: self.listen.proxy_protocol,
        };
        let nets = |key: &str, list: &[String]| {
            list.iter()
                .map(|s| {
                    s.parse::<IpNet>()
                        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                        .map_err(|_| err(key, format!("{s:?} is not an address or CIDR network")))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let clients = nets("clients.allow", &self.clients.allow)?;
        let balancers = nets("clients.balancers", &self.clients.balancers)?;
        match (listen.proxy_protocol, balancers.is_empty()) {
            (true, true) => {
                return Err(err(
                    "listen.proxy_protocol",
                    "needs [clients] balancers: the addresses PROXY headers may come from".into(),
                ))
            }
            (false, false) => {
                return Err(err(
                    "clients.balancers",
                    "has no effect without [listen] proxy_protocol = true".into(),
                ))
            }
            _ => {}
        }
        let node = match &self.audit.node {
            Some(n) if n.trim().is_empty() => {
                return Err(err("audit.node", "must not be empty".into()))
            }
            Some(n) => n.clone(),
            None => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "consent-proxy".into()),
        };
        let mut resolve = HashMap::new();
        for (from, to) in &self.upstream.resolve {
            let key = format!("upstream.resolve.{from:?}");
            let (host, port) = from
                .rsplit_once(':')
                .ok_or_else(|| err(&key, "write the name as host:port".into()))?;
            port.parse::<u16>()
                .map_err(|_| err(&key, format!("{port:?} is not a port")))?;
            let to = addr(&key, to)?;
            resolve.insert(
                format!("{}:{port}", crate::decide::policy::normalize_host(host)),
                to,
            );
        }
        let audit = match self.audit.path.as_str() {
            "-" => AuditTarget::Stdout,
            "" => {
                return Err(err(
                    "audit.path",
                    "must name a file, or \"-\" for stdout".into(),
                ))
            }
            p => {
                let rotation = match self.audit.rotate_bytes {
                    None | Some(0) => None,
                    Some(max_bytes) => Some(Rotation {
                        max_bytes,
                        keep: self.audit.rotate_keep.unwrap_or(10).max(1),
                    }),
                };
                AuditTarget::File(PathBuf::from(p), rotation)
            }
        };
        let defaults = Limits::default();
        let secs = |v: Option<u64>, d: Duration| v.map(Duration::from_secs).unwrap_or(d);
        let l = self.limits;
        let limits = Limits {
            max_body_bytes: l.max_body_bytes,
            max_connections: l.max_connections.unwrap_or(defaults.max_connections).max(1),
            header_read_timeout: secs(l.header_read_timeout_secs, defaults.header_read_timeout),
            tls_handshake_timeout: secs(
                l.tls_handshake_timeout_secs,
                defaults.tls_handshake_timeout,
            ),
            connect_timeout: secs(l.connect_timeout_secs, defaults.connect_timeout),
            upstream_timeout: secs(l.upstream_timeout_secs, defaults.upstream_timeout),
            tunnel_idle_timeout: secs(l.tunnel_idle_timeout_secs, defaults.tunnel_idle_timeout)
                .max(Duration::from_secs(1)),
            leaf_cache_size: l.leaf_cache_size.unwrap_or(defaults.leaf_cache_size).max(1),
            drain_delay: secs(l.drain_delay_secs, defaults.drain_delay),
            shutdown_timeout: secs(l.shutdown_timeout_secs, defaults.shutdown_timeout),
        };

        let mut features = Vec::new();
        for (i, f) in self.feature.into_iter().enumerate() {
            let feature = f.into_feature(i, err)?;
            if features.iter().any(|g: &Feature| g.name == feature.name) {
                return Err(err(
                    &format!("feature[{i}].name"),
                    format!("feature {:?} is defined twice", feature.name),
                ));
            }
            features.push(feature);
        }
        let (consent, consent_origin, unkeyed) =
            parse_consent(made.consent, &mut features, made.derived, err)?;
        let consent_hash = consent_hash(&consent);
        let policy = Policy {
            mode: match self.mode {
                ModeFile::Enforce => Mode::Enforce,
                ModeFile::Report => Mode::Report,
            },
            unknown_hosts: match self.unknown_hosts {
                UnknownHostsFile::Tunnel => UnknownHosts::Tunnel,
                UnknownHostsFile::Deny => UnknownHosts::Deny,
            },
            features,
            consent,
        };
        Ok(Config {
            source: made.source.to_string(),
            listen,
            clients,
            balancers,
            ca_cert: self.tls.ca_cert,
            ca_key: self.tls.ca_key,
            upstream: UpstreamSettings {
                roots: self.upstream.roots,
                extra_ca: self.upstream.extra_ca,
                resolve,
            },
            audit,
            audit_sync: match self.audit.sync {
                SyncFile::Os => SyncMode::Os,
                SyncFile::Data => SyncMode::Data,
            },
            node,
            limits,
            consent_hash,
            policy,
            policy_hash: made.policy_hash,
            effective: made.effective,
            consent_origin,
            unkeyed,
            policy_file: made.policy_file,
            mattermost_config: made.mattermost,
            mattermost_override: made.mattermost_override,
            loaded: made.loaded,
        })
    }
}

impl FeatureFile {
    fn into_feature(self, i: usize, err: ErrFn<'_>) -> Result<Feature, ConfigError> {
        let key = |k: &str| format!("feature[{i}] ({}).{k}", self.name);
        if self.name.is_empty()
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(err(
                &format!("feature[{i}].name"),
                format!(
                    "{:?} is not a feature name (letters, digits, _ and -)",
                    self.name
                ),
            ));
        }
        if ["withhold", "from_mattermost_config"].contains(&self.name.as_str()) {
            return Err(err(
                &format!("feature[{i}].name"),
                format!("{:?} is reserved in [consent]", self.name),
            ));
        }
        if self.hosts.is_empty() {
            return Err(err(
                &key("hosts"),
                "a feature needs at least one host".into(),
            ));
        }
        let hosts = self
            .hosts
            .iter()
            .map(|h| HostPattern::parse(h).map_err(|r| err(&key("hosts"), r)))
            .collect::<Result<Vec<_>, _>>()?;
        check_paths(&self.paths, &key("paths"), err)?;
        let mut rules = Vec::new();
        for (j, r) in self.rule.into_iter().enumerate() {
            let key = |k: &str| format!("feature[{i}] ({}).rule[{j}].{k}", self.name);
            check_paths(&r.paths, &key("paths"), err)?;
            if r.category.as_deref() == Some("") {
                return Err(err(&key("category"), "must not be empty".into()));
            }
            let action = match (r.remove, r.replace, r.keep) {
                (Some(list), None, None) => Action::Remove(selectors(&list, &key("remove"), err)?),
                (None, Some(map), None) => Action::Replace(
                    map.iter()
                        .map(|(s, v)| {
                            let sel = selector(s).map_err(|r| err(&key("replace"), r))?;
                            sel.check_replacement(v)
                                .map_err(|r| err(&key("replace"), r))?;
                            Ok((sel, v.clone()))
                        })
                        .collect::<Result<Vec<_>, ConfigError>>()?,
                ),
                (None, None, Some(list)) => Action::Keep(selectors(&list, &key("keep"), err)?),
                _ => {
                    return Err(err(
                        &key("remove"),
                        "a rule has exactly one of remove, replace, keep".into(),
                    ))
                }
            };
            let mut conditions = Vec::new();
            for (table, negated) in [(&r.when, false), (&r.unless, true)] {
                let k = key(if negated { "unless" } else { "when" });
                for (s, values) in table {
                    let values = match values {
                        OneOrMore::One(v) => vec![v.clone()],
                        OneOrMore::More(v) => v.clone(),
                    };
                    let sel = selector(s).map_err(|r| err(&k, r))?;
                    conditions.push(Condition::new(sel, values, negated).map_err(|r| err(&k, r))?);
                }
            }
            rules.push(Rule {
                index: j,
                category: r.category,
                paths: r.paths,
                action,
                conditions,
            });
        }
        if let Some((a, b)) = spelling_conflict(&rules) {
            return Err(err(
                &format!("feature[{i}] ({}).rule", self.name),
                format!("{a:?} and {b:?} name one member as the receivers read names (case folded); spell them alike"),
            ));
        }
        let listed = self
            .known
            .iter()
            .map(|s| {
                selector(s).map_err(|r| err(&format!("feature[{i}] ({}).known", self.name), r))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let known = (!rules.is_empty() || !listed.is_empty()).then(|| {
            // What a rule selects or tests (`when` / `unless`) is what the pack reads.
            let tested: Vec<Selector> = rules
                .iter()
                .flat_map(|r| &r.conditions)
                .map(|c| Selector::Json(c.selector.clone()))
                .collect();
            Known::new(
                rules
                    .iter()
                    .flat_map(|r| r.action.selectors())
                    .chain(&tested)
                    .chain(listed.iter()),
            )
        });
        Ok(Feature {
            name: self.name,
            hosts,
            paths: self.paths,
            on_block: match self.on_block {
                OnBlockFile::Reject => OnBlock::Reject,
                OnBlockFile::Sink => OnBlock::Sink,
            },
            requires: self.requires,
            rules,
            known,
        })
    }
}

/// Two member names in a feature's `json:` selectors that differ but fold alike: the rewriter
/// reads every member under one spelling per folded name, so the other could never match.
fn spelling_conflict(rules: &[Rule]) -> Option<(String, String)> {
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for rule in rules {
        for sel in rule.action.selectors() {
            let Selector::Json(j) = sel else { continue };
            for name in &j.names {
                let folded = crate::rewrite::fold::fold(name).into_owned();
                match seen.get(&folded) {
                    Some(other) if *other != name => {
                        return Some((other.to_string(), name.clone()))
                    }
                    _ => {
                        seen.insert(folded, name);
                    }
                }
            }
        }
    }
    None
}

fn check_paths(paths: &[String], key: &str, err: ErrFn<'_>) -> Result<(), ConfigError> {
    // Requests are decided on their normalized path: a prefix that is not normal never matches.
    let normal = |p: &str| normalize(&http::Method::GET, p).is_ok_and(|n| n == p);
    match paths.iter().find(|p| !normal(p)) {
        Some(p) => Err(err(
            key,
            format!(
                "{p:?} is not a path prefix as receivers route it (it starts with /, has no \
                 encoded byte, no ;, no empty, . or .. segment)"
            ),
        )),
        None => Ok(()),
    }
}

fn selectors(list: &[String], key: &str, err: ErrFn<'_>) -> Result<Vec<Selector>, ConfigError> {
    if list.is_empty() {
        return Err(err(key, "names no selector".into()));
    }
    list.iter()
        .map(|s| selector(s).map_err(|r| err(key, r)))
        .collect()
}

/// Parse `query:NAME`, `header:NAME`, `form:NAME` or `json:JSONPATH`.
pub fn selector(s: &str) -> Result<Selector, String> {
    let (kind, rest) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not a selector (query:, header:, form: or json:)"))?;
    if rest.is_empty() {
        return Err(format!("{s:?} names nothing after {kind:?}"));
    }
    match kind {
        "query" => Ok(Selector::Query(rest.to_string())),
        "form" => Ok(Selector::Form(rest.to_string())),
        "header" => HeaderName::from_bytes(rest.as_bytes())
            .map(Selector::Header)
            .map_err(|_| format!("{rest:?} is not a header name")),
        "json" => JsonSelector::parse(rest).map(Selector::Json),
        other => Err(format!(
            "{other:?} is not a selector kind (query, header, form, json)"
        )),
    }
}

/// The consent in force: derived from Mattermost's config when given, then the explicit
/// `[consent]` keys (features override, `withhold` adds). Returns it with each value's origin,
/// and the features no key (nor Mattermost's config) names: denied.
fn parse_consent(
    table: toml::Table,
    features: &mut [Feature],
    derived: Option<&mattermost::Derived>,
    err: ErrFn<'_>,
) -> Result<(Consent, Vec<String>, Vec<String>), ConfigError> {
    let mut consent = Consent::default();
    let table_has_unclassified = table.contains_key("unclassified");
    let mut feature_origin: BTreeMap<String, String> = BTreeMap::new();
    let mut category_origin: BTreeMap<String, String> = BTreeMap::new();
    if let Some(d) = derived {
        for (name, granted, why) in &d.features {
            if features.iter().any(|f| f.name == *name) {
                if *granted {
                    consent.granted.insert(name.to_string());
                }
                feature_origin.insert(name.to_string(), format!("Mattermost {why}"));
            }
        }
        for (category, why) in &d.withheld {
            consent.withheld.insert(category.to_string());
            category_origin.insert(category.to_string(), format!("Mattermost {why}"));
        }
        if let Some(host) = &d.push_host {
            if let Some(push) = features.iter_mut().find(|f| f.name == "push_notifications") {
                let pattern = HostPattern::Exact(host.clone());
                if !push.hosts.contains(&pattern) {
                    push.hosts.push(pattern);
                }
            }
        }
    }
    let known: BTreeSet<String> = CATEGORIES
        .iter()
        .map(|c| c.to_string())
        .chain(
            features
                .iter()
                .flat_map(|f| f.rules.iter().filter_map(|r| r.category.clone())),
        )
        .collect();
    for (key, value) in table {
        let k = format!("consent.{key}");
        match (key.as_str(), value) {
            ("withhold", toml::Value::Array(items)) => {
                for item in items {
                    let name = item
                        .as_str()
                        .ok_or_else(|| err(&k, "lists category names as strings".into()))?;
                    if !known.contains(name) {
                        let all: Vec<&str> = known.iter().map(String::as_str).collect();
                        return Err(err(
                            &k,
                            format!(
                                "{name:?} is not a data category (known: {})",
                                all.join(", ")
                            ),
                        ));
                    }
                    consent.withheld.insert(name.to_string());
                    category_origin.insert(name.to_string(), "policy [consent] withhold".into());
                }
            }
            ("withhold", _) => return Err(err(&k, "must be a list of category names".into())),
            ("from_mattermost_config", _) => {}
            ("unclassified", value) => {
                consent.unclassified = match value.as_str() {
                    Some("pass") => Unclassified::Pass,
                    Some("remove") => Unclassified::Remove,
                    Some("block") => Unclassified::Block,
                    _ => return Err(err(&k, "must be \"pass\", \"remove\" or \"block\"".into())),
                };
            }
            (name, value) => {
                if !features.iter().any(|f| f.name == name) {
                    let all: Vec<&str> = features.iter().map(|f| f.name.as_str()).collect();
                    return Err(err(
                        &k,
                        format!("{name:?} is not a feature (known: {})", all.join(", ")),
                    ));
                }
                match value.as_str() {
                    Some("granted") => {
                        consent.granted.insert(name.to_string());
                    }
                    Some("denied") => {
                        consent.granted.remove(name);
                    }
                    _ => return Err(err(&k, "must be \"granted\" or \"denied\"".into())),
                }
                feature_origin.insert(name.to_string(), format!("policy [consent] {name}"));
            }
        }
    }
    for f in features
        .iter()
        .filter(|f| consent.granted.contains(&f.name))
    {
        if let Some(c) = f.requires.iter().find(|c| consent.withheld.contains(*c)) {
            return Err(err(
                "consent.withhold",
                format!("withholding {c:?} breaks {:?}, which cannot work without it; deny {} too, or stop withholding {c:?}", f.name, f.name),
            ));
        }
    }
    let unkeyed: Vec<String> = features
        .iter()
        .filter(|f| !feature_origin.contains_key(&f.name))
        .map(|f| f.name.clone())
        .collect();
    let mut origin = Vec::new();
    for f in features.iter() {
        let state = if consent.granted.contains(&f.name) {
            "granted"
        } else {
            "denied"
        };
        let from = feature_origin
            .get(&f.name)
            .cloned()
            .unwrap_or_else(|| "no key: denied".into());
        origin.push(format!("{} = {state:?}  # {from}", f.name));
    }
    for c in &consent.withheld {
        let from = category_origin.get(c).cloned().unwrap_or_default();
        origin.push(format!("withhold {c:?}  # {from}"));
    }
    let from = if table_has_unclassified {
        "policy [consent] unclassified"
    } else {
        "no key: pass"
    };
    origin.push(format!(
        "unclassified = {:?}  # {from}",
        consent.unclassified.as_str()
    ));
    Ok((consent, origin, unkeyed))
}
