//! The policy file: TOML on disk (DESIGN §6) turned into the runtime [`Config`]. The on-disk
//! types reject unknown keys; everything is checked here, so no later code re-parses a string.
//!
//! Layering: the built-in Mattermost pack (`policy/mattermost.toml`, embedded) is the default
//! policy. An admin's file is laid over it: tables merge key by key, `[[feature]]` entries are
//! added (same name replaces the pack's), and a `[consent]` table replaces the pack's whole.
//! Relative paths in the admin's file are relative to that file's folder.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;
use serde::Deserialize;

use crate::audit::sha256;
use crate::mattermost;
use crate::policy::{
    Action, Consent, Feature, HostPattern, JsonSelector, Mode, OnBlock, Policy, Rule, Selector,
    UnknownHosts,
};

/// The embedded Mattermost pack.
pub const PACK: &str = include_str!("../policy/mattermost.toml");
const PACK_NAME: &str = "<built-in pack>";

/// Data categories the Mattermost pack speaks of (DESIGN §3). Rules may name more.
pub const CATEGORIES: [&str; 9] = [
    "server_identifier",
    "activity_counts",
    "configuration",
    "license_info",
    "enterprise_features",
    "versions_and_components",
    "message_content",
    "channel_names",
    "user_names",
];

/// Everything the proxy needs to run, checked.
#[derive(Debug)]
pub struct Config {
    /// Where the policy came from (a path, or the built-in pack).
    pub source: String,
    pub listen: Listen,
    pub clients: Vec<IpNet>,
    /// `[clients] balancers`: who may (and, with `proxy_protocol`, must) send PROXY headers.
    pub balancers: Vec<IpNet>,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub upstream: UpstreamSettings,
    pub audit: AuditTarget,
    /// `[audit] node`: the replica named in every record (default: the host name).
    pub node: String,
    pub limits: Limits,
    pub policy: Policy,
    /// `sha256:` of the effective policy without consent, and of the consent.
    pub policy_hash: String,
    pub consent_hash: String,
    /// The merged policy as TOML, for `check --print`.
    pub effective: String,
    /// Each consent value in force and where it came from, for `check --print` and reloads.
    pub consent_origin: Vec<String>,
    /// The files this config was read from, to watch for changes.
    pub policy_file: Option<PathBuf>,
    pub mattermost_config: Option<PathBuf>,
    /// `run --mattermost-config`, which a reload must honour again.
    pub mattermost_override: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct Listen {
    pub proxy: SocketAddr,
    pub transparent: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// The explicit listener reads a PROXY protocol header from `[clients] balancers`.
    pub proxy_protocol: bool,
}

#[derive(Clone, Debug)]
pub struct UpstreamSettings {
    pub roots: Roots,
    pub extra_ca: Vec<PathBuf>,
    /// `host:port` (lowercase) → address to connect to instead of resolving.
    pub resolve: HashMap<String, SocketAddr>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Eq, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Roots {
    #[default]
    Webpki,
    System,
}

#[derive(Clone, Debug, Eq, PartialEq)]
pub enum AuditTarget {
    Stdout,
    /// A file, rotated by size when `[audit] rotate_bytes` is set.
    File(PathBuf, Option<Rotation>),
}

/// Rotate the audit file once it reaches `max_bytes`, keeping `keep` older files
/// (`FILE.1` newest); the hash chain continues across them.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Rotation {
    pub max_bytes: u64,
    pub keep: usize,
}

/// Every bound the proxy keeps, with its default.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest body a rule may read; larger ones are blocked (413). `[limits] max_body_bytes`.
    pub max_body_bytes: u64,
    /// Connections served at once per listener; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Time for a client to send request headers.
    pub header_read_timeout: Duration,
    /// Time for a client's TLS handshake with the proxy.
    pub tls_handshake_timeout: Duration,
    /// Time to connect (TCP and TLS) to an upstream.
    pub connect_timeout: Duration,
    /// Time for an upstream to answer a request with its response head.
    pub upstream_timeout: Duration,
    /// A tunnel with no bytes either way for this long is closed.
    pub tunnel_idle_timeout: Duration,
    /// Leaf certificates kept for reuse.
    pub leaf_cache_size: usize,
    /// SIGTERM: `/readyz` fails at once; the listeners keep accepting this long, so a
    /// balancer's health check sees the replica leave before its connections are refused.
    pub drain_delay: Duration,
    /// Then open connections may finish for this long before the proxy exits.
    pub shutdown_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1024 * 1024,
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(30),
            tls_handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            upstream_timeout: Duration::from_secs(60),
            tunnel_idle_timeout: Duration::from_secs(600),
            leaf_cache_size: 1024,
            drain_delay: Duration::ZERO,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// A policy that cannot be used, with the file and key a person must fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read policy file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: {key}: {reason}")]
    Invalid {
        file: String,
        key: String,
        reason: String,
    },
}

/// Load the policy: the built-in pack, with `path` laid over it when given. `mattermost`
/// (`run --mattermost-config`) overrides `[consent] from_mattermost_config`.
pub fn load(path: Option<&Path>, mattermost: Option<&Path>) -> Result<Config, ConfigError> {
    let mut config = match path {
        None => build(PACK_NAME, None, mattermost)?,
        Some(path) => {
            let file = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: file.clone(),
                source,
            })?;
            let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
            build(&file, Some((&text, &base)), mattermost)?
        }
    };
    config.policy_file = path.map(Path::to_path_buf);
    config.mattermost_override = mattermost.map(Path::to_path_buf);
    Ok(config)
}

/// Load from text (tests, `explain`): `base` is the folder relative paths start from.
pub fn load_str(name: &str, text: &str, base: &Path) -> Result<Config, ConfigError> {
    build(name, Some((text, base)), None)
}

fn build(
    source: &str,
    overlay: Option<(&str, &Path)>,
    mattermost: Option<&Path>,
) -> Result<Config, ConfigError> {
    let mut merged = parse_table(PACK_NAME, PACK)?;
    let mut admin_consent = None;
    if let Some((text, base)) = overlay {
        let mut table = parse_table(source, text)?;
        // Check the admin's file on its own first, so errors point at its lines and keys.
        table
            .clone()
            .try_into::<File>()
            .map_err(|e| parse_error(source, e))?;
        absolutize(&mut table, base);
        admin_consent = table.get("consent").and_then(|c| c.as_table()).cloned();
        merge(&mut merged, table);
    }
    // Consent derived from Mattermost's config.json replaces the pack's default consent; the
    // admin's explicit [consent] keys still apply over it.
    let mattermost = match mattermost {
        Some(p) => Some(p.to_path_buf()),
        None => match admin_consent
            .as_ref()
            .and_then(|c| c.get("from_mattermost_config"))
        {
            None => None,
            Some(toml::Value::String(p)) => Some(PathBuf::from(p)),
            Some(_) => {
                return Err(ConfigError::Invalid {
                    file: source.to_string(),
                    key: "consent.from_mattermost_config".into(),
                    reason: "must be the path of Mattermost's config.json".into(),
                })
            }
        },
    };
    let derived = match &mattermost {
        None => None,
        Some(path) => Some(read_mattermost(path)?),
    };
    let explicit = match (admin_consent, &derived) {
        (Some(table), _) => table,
        (None, Some(_)) => toml::Table::new(),
        (None, None) => merged
            .get("consent")
            .and_then(|c| c.as_table())
            .cloned()
            .unwrap_or_default(),
    };
    let file: File = merged
        .clone()
        .try_into()
        .map_err(|e| parse_error(source, e))?;
    merged.remove("consent");
    let policy_hash = sha256(toml::to_string(&merged).unwrap_or_default().as_bytes());
    // Print the [consent] keys that apply (derived consent is listed after the policy).
    if !explicit.is_empty() {
        merged.insert("consent".into(), toml::Value::Table(explicit.clone()));
    }
    let effective = toml::to_string(&merged).unwrap_or_default();
    let err = |key: &str, reason: String| ConfigError::Invalid {
        file: source.to_string(),
        key: key.to_string(),
        reason,
    };
    let mut config = file.into_config(source, effective, policy_hash, &err)?;
    let (consent, origin) = parse_consent(
        explicit,
        &mut config.policy.features,
        derived.as_ref(),
        &err,
    )?;
    config.consent_hash = consent_hash(&consent);
    config.policy.consent = consent;
    config.consent_origin = origin;
    config.mattermost_config = mattermost;
    Ok(config)
}

/// Read and derive a Mattermost config.json; errors name the file.
pub fn read_mattermost(path: &Path) -> Result<mattermost::Derived, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: file.clone(),
        source,
    })?;
    mattermost::derive(&text).map_err(|e| ConfigError::Parse {
        file,
        message: e.to_string(),
    })
}

fn parse_table(name: &str, text: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>()
        .map_err(|e| parse_error(name, e))
}

fn parse_error(file: &str, e: impl std::fmt::Display) -> ConfigError {
    ConfigError::Parse {
        file: file.to_string(),
        message: e.to_string().trim_end().to_string(),
    }
}

/// Lay `over` onto `base`: tables merge by key, `feature` entries merge by name, `consent`
/// replaces.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (key.as_str(), base.get_mut(&key), value) {
            ("feature", Some(toml::Value::Array(features)), toml::Value::Array(more)) => {
                for f in more {
                    let name = f.get("name").cloned();
                    features.retain(|g| name.is_none() || g.get("name") != name.as_ref());
                    features.push(f);
                }
            }
            ("consent", _, value) => {
                base.insert(key, value);
            }
            (_, Some(toml::Value::Table(inner)), toml::Value::Table(more)) => merge(inner, more),
            (_, _, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Make the admin's relative paths relative to the policy file's folder.
fn absolutize(table: &mut toml::Table, base: &Path) {
    let fix = |v: &mut toml::Value| {
        if let toml::Value::String(s) = v {
            if s != "-" && Path::new(s.as_str()).is_relative() {
                *s = base.join(s.as_str()).display().to_string();
            }
        }
    };
    for (section, key) in [("tls", "ca_cert"), ("tls", "ca_key"), ("audit", "path")] {
        if let Some(v) = table.get_mut(section).and_then(|t| t.get_mut(key)) {
            fix(v);
        }
    }
    if let Some(toml::Value::Array(list)) = table
        .get_mut("upstream")
        .and_then(|t| t.get_mut("extra_ca"))
    {
        list.iter_mut().for_each(fix);
    }
    if let Some(v) = table
        .get_mut("consent")
        .and_then(|t| t.get_mut("from_mattermost_config"))
    {
        fix(v);
    }
}

/// The hash that names a consent in the audit log.
pub fn consent_hash(consent: &Consent) -> String {
    let granted: Vec<&str> = consent.granted.iter().map(String::as_str).collect();
    let withheld: Vec<&str> = consent.withheld.iter().map(String::as_str).collect();
    sha256(
        format!(
            "granted={};withheld={}",
            granted.join(","),
            withheld.join(",")
        )
        .as_bytes(),
    )
}

// ---- on-disk format ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
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
}

type ErrFn<'a> = &'a dyn Fn(&str, String) -> ConfigError;

impl File {
    fn into_config(
        self,
        source: &str,
        effective: String,
        policy_hash: String,
        err: ErrFn<'_>,
    ) -> Result<Config, ConfigError> {
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
                format!("{}:{port}", crate::policy::normalize_host(host)),
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
            consent: Consent::default(),
        };
        Ok(Config {
            source: source.to_string(),
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
            node,
            limits,
            policy,
            policy_hash,
            consent_hash: String::new(),
            effective,
            consent_origin: Vec::new(),
            policy_file: None,
            mattermost_config: None,
            mattermost_override: None,
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
                            Ok((selector(s).map_err(|r| err(&key("replace"), r))?, v.clone()))
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
            rules.push(Rule {
                index: j,
                category: r.category,
                paths: r.paths,
                action,
            });
        }
        if let Some((a, b)) = spelling_conflict(&rules) {
            return Err(err(
                &format!("feature[{i}] ({}).rule", self.name),
                format!("{a:?} and {b:?} name one member as the receivers read names (case folded); spell them alike"),
            ));
        }
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
                let folded = crate::fold::fold(name).into_owned();
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
    match paths.iter().find(|p| !p.starts_with('/')) {
        Some(p) => Err(err(
            key,
            format!("{p:?} is not a path prefix (it must start with /)"),
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
/// `[consent]` keys (features override, `withhold` adds). Returns it with each value's origin.
fn parse_consent(
    table: toml::Table,
    features: &mut [Feature],
    derived: Option<&mattermost::Derived>,
    err: ErrFn<'_>,
) -> Result<(Consent, Vec<String>), ConfigError> {
    let mut consent = Consent::default();
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
    Ok((consent, origin))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<Config, ConfigError> {
        load_str("policy.toml", text, Path::new("/etc/consent"))
    }

    #[test]
    fn the_pack_loads_with_the_default_consent() {
        let c = load(None, None).expect("pack loads");
        assert_eq!(c.listen.proxy, "127.0.0.1:3128".parse().expect("addr"));
        let names: Vec<&str> = c.policy.features.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            ["security_alerts", "diagnostics", "push_notifications"]
        );
        assert_eq!(
            c.policy.consent.granted.iter().collect::<Vec<_>>(),
            ["push_notifications", "security_alerts"]
        );
        assert_eq!(c.policy.consent.withheld.len(), 4);
        assert_eq!(c.ca_cert, PathBuf::from("certs/ca.pem"));
        assert!(c.policy_hash.starts_with("sha256:") && c.policy_hash.len() == 71);
    }

    #[test]
    fn an_overlay_merges_settings_adds_features_and_replaces_consent() {
        let c = load_text(
            r#"
            unknown_hosts = "deny"
            [upstream]
            extra_ca = ["fake-ca.pem"]
            resolve = { "Push.Mattermost.com:443" = "127.0.0.1:9443" }
            [audit]
            path = "logs/audit.jsonl"
            [consent]
            diagnostics = "granted"
            acme = "granted"
            withhold = ["configuration"]
            [[feature]]
            name = "acme"
            hosts = ["*.acme.example"]
              [[feature.rule]]
              remove = ["header:x-install-id", "query:uid"]
            "#,
        )
        .expect("valid overlay");
        assert_eq!(c.policy.unknown_hosts, UnknownHosts::Deny);
        assert_eq!(c.upstream.roots, Roots::Webpki);
        assert_eq!(
            c.upstream.extra_ca,
            [PathBuf::from("/etc/consent/fake-ca.pem")]
        );
        assert_eq!(
            c.upstream.resolve["push.mattermost.com:443"],
            "127.0.0.1:9443".parse().expect("addr")
        );
        assert_eq!(
            c.audit,
            AuditTarget::File("/etc/consent/logs/audit.jsonl".into(), None)
        );
        assert_eq!(c.policy.features.len(), 4);
        assert_eq!(
            c.policy.consent.granted.iter().collect::<Vec<_>>(),
            ["acme", "diagnostics"]
        );
    }

    #[test]
    fn bad_policies_name_file_key_and_reason() {
        let cases = [
            ("colour = \"red\"", "unknown field `colour`"),
            ("[limits]\nmax_body_bites = 5", "unknown field `max_body_bites`"),
            ("[consent]\nnot_a_feature = \"granted\"", "consent.not_a_feature"),
            ("[consent]\ndiagnostics = \"yes\"", "must be \"granted\" or \"denied\""),
            ("[consent]\nwithhold = [\"nope\"]", "is not a data category"),
            ("[consent]\npush_notifications = \"granted\"\nwithhold = [\"server_identifier\"]", "breaks \"push_notifications\""),
            ("[[feature]]\nname = \"x\"\nhosts = [\"x.example\"]\n[[feature.rule]]\nremove = [\"json:$.a[\"]", "feature[3] (x).rule[0].remove"),
            ("[[feature]]\nname = \"x\"\nhosts = [\"x.example\"]\n[[feature.rule]]\nremove = [\"cookie:a\"]", "not a selector kind"),
            ("[[feature]]\nname = \"x\"\nhosts = [\"x..example\"]", "is not a host name"),
            ("[[feature]]\nname = \"x\"\nhosts = [\"x.example\"]\n[[feature.rule]]\nremove = [\"query:a\"]\nkeep = [\"query:b\"]", "exactly one of"),
            ("[listen]\nproxy = \"localhost\"", "listen.proxy"),
            ("[clients]\nallow = [\"10.0.0.0/33\"]", "clients.allow"),
            ("mode = \"relaxed\"", "unknown variant `relaxed`"),
            ("[[feature]]\nname = \"x\"\nhosts = [\"x.example\"]\n[[feature.rule]]\nremove = [\"json:$.userId\"]\n[[feature.rule]]\nremove = [\"json:$.userid\"]", "\"userId\" and \"userid\" name one member"),
        ];
        for (text, want) in cases {
            let e = load_text(text).expect_err(text).to_string();
            assert!(e.starts_with("policy.toml: "), "{e}");
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn withholding_a_required_category_is_fine_when_the_feature_is_denied() {
        let c = load_text(
            "[consent]\npush_notifications = \"denied\"\nwithhold = [\"server_identifier\"]",
        )
        .expect("valid");
        assert!(c.policy.consent.withheld.contains("server_identifier"));
    }

    #[test]
    fn consent_derived_from_mattermost_with_explicit_overrides() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mm = dir.path().join("config.json");
        std::fs::write(
            &mm,
            r#"{"LogSettings":{"EnableDiagnostics":false},"EmailSettings":{"PushNotificationServer":"https://push.corp.example","PushNotificationContents":"generic"}}"#,
        )
        .expect("write");
        let policy = dir.path().join("policy.toml");
        std::fs::write(
            &policy,
            "[consent]\nfrom_mattermost_config = \"config.json\"\nsecurity_alerts = \"denied\"\nwithhold = [\"activity_counts\"]\n",
        )
        .expect("write");
        let c = load(Some(&policy), None).expect("valid");
        assert_eq!(c.mattermost_config.as_deref(), Some(mm.as_path()));
        assert_eq!(
            c.policy.consent.granted.iter().collect::<Vec<_>>(),
            ["push_notifications"]
        );
        assert_eq!(
            c.policy.consent.withheld.iter().collect::<Vec<_>>(),
            ["activity_counts", "message_content"]
        );
        assert!(c.policy.feature_for_host("push.corp.example").is_some());
        let origin = c.consent_origin.join("\n");
        assert!(
            origin.contains("security_alerts = \"denied\"  # policy [consent] security_alerts"),
            "{origin}"
        );
        assert!(
            origin.contains("LogSettings.EnableDiagnostics = false"),
            "{origin}"
        );
        assert!(
            origin.contains("PushNotificationContents = \"generic\""),
            "{origin}"
        );

        // With no policy file at all: the pack, and consent wholly from Mattermost.
        let c = load(None, Some(&mm)).expect("valid");
        assert_eq!(
            c.policy.consent.granted.iter().collect::<Vec<_>>(),
            ["push_notifications", "security_alerts"]
        );
        assert_eq!(
            c.policy.consent.withheld.iter().collect::<Vec<_>>(),
            ["message_content"]
        );

        std::fs::write(&mm, "{not json").expect("write");
        let e = load(None, Some(&mm))
            .expect_err("bad config.json")
            .to_string();
        assert!(
            e.contains("config.json") && e.contains("not valid JSON"),
            "{e}"
        );
    }

    #[test]
    fn a_feature_can_replace_a_pack_feature() {
        let c = load_text(
            "[[feature]]\nname = \"push_notifications\"\nhosts = [\"push.internal.example\"]\n[consent]\npush_notifications = \"granted\"",
        )
        .expect("valid");
        assert_eq!(c.policy.features.len(), 3);
        assert!(c.policy.feature_for_host("push.internal.example").is_some());
        assert!(c.policy.feature_for_host("push.mattermost.com").is_none());
    }
}
