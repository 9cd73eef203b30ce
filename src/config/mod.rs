//! The policy file: TOML on disk (DESIGN §6) turned into the runtime [`Config`]. The on-disk
//! types reject unknown keys; everything is checked here, so no later code re-parses a string.
//!
//! Layering: the built-in Mattermost pack (`policy/mattermost.toml`, embedded) is the default
//! policy. An admin's file is laid over it: tables merge key by key, `[[feature]]` entries are
//! added (same name replaces the pack's), and a `[consent]` table replaces the pack's whole.
//! Relative paths in the admin's file are relative to that file's folder.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

mod file;
pub mod mattermost;

use crate::audit::sha256;
pub use crate::audit::{AuditTarget, Rotation, SyncMode};
use crate::decide::policy::{Consent, Policy};
pub use file::selector;
use file::File;

/// The embedded Mattermost pack.
pub const PACK: &str = include_str!("../../policy/mattermost.toml");
const PACK_NAME: &str = "<built-in pack>";

/// Data categories the Mattermost pack speaks of (DESIGN §3). Rules may name more.
pub const CATEGORIES: [&str; 11] = [
    "server_identifier",
    "activity_counts",
    "configuration",
    "license_info",
    "enterprise_features",
    "versions_and_components",
    "message_content",
    "channel_names",
    "user_names",
    "user_identifiers",
    "site_identity",
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
    /// `[audit] sync`: how far a record has gone before what it records may leave.
    pub audit_sync: SyncMode,
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
    /// Features no `[consent]` key (nor Mattermost's config) names, denied for that: an admin's
    /// `[consent]` written before the pack gained them turns them off (`check` and `run` warn).
    pub unkeyed: Vec<String>,
    /// The files this config was read from, to watch for changes.
    pub policy_file: Option<PathBuf>,
    pub mattermost_config: Option<PathBuf>,
    /// `run --mattermost-config`, which a reload must honour again.
    pub mattermost_override: Option<PathBuf>,
    /// The bytes of the files it was built from, as read for this load.
    pub loaded: Loaded,
}

/// The bytes of the files a [`Config`] was built from: a watcher compares the files with these,
/// what is in force, and never with a later read (a change made while a reload was being built
/// would then pass for applied).
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Loaded {
    pub policy_file: Option<Vec<u8>>,
    pub mattermost: Option<Vec<u8>>,
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
    match path {
        None => build(PACK_NAME, None, mattermost),
        Some(path) => {
            let file = path.display().to_string();
            let text = read_text(path)?;
            let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
            build(&file, Some((&text, &base, Some(path))), mattermost)
        }
    }
}

/// Load from text (tests, `explain`): `base` is the folder relative paths start from.
pub fn load_str(name: &str, text: &str, base: &Path) -> Result<Config, ConfigError> {
    build(name, Some((text, base, None)), None)
}

/// Build the config whole, in one pass: the pack, the admin's text laid over it (with the folder
/// its relative paths start from and, when it is a file, its path for reloading), and the
/// consent from Mattermost's config.json when one is named.
fn build(
    source: &str,
    overlay: Option<(&str, &Path, Option<&Path>)>,
    mattermost_override: Option<&Path>,
) -> Result<Config, ConfigError> {
    let mut merged = parse_table(PACK_NAME, PACK)?;
    let mut admin_consent = None;
    if let Some((text, base, _)) = overlay {
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
    let mattermost = match mattermost_override {
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
    let (derived, mattermost_text) = match &mattermost {
        None => (None, None),
        Some(path) => {
            let text = read_text(path)?;
            (Some(derive_mattermost(path, &text)?), Some(text))
        }
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
    let made = file::Made {
        source,
        effective,
        policy_hash,
        consent: explicit,
        derived: derived.as_ref(),
        mattermost,
        policy_file: overlay.and_then(|(_, _, path)| path.map(Path::to_path_buf)),
        mattermost_override: mattermost_override.map(Path::to_path_buf),
        loaded: Loaded {
            policy_file: overlay.and_then(|(text, _, path)| path.map(|_| text.as_bytes().to_vec())),
            mattermost: mattermost_text.map(String::into_bytes),
        },
    };
    file.into_config(made, &err)
}

/// A file the config is built from, read once; errors name the file.
fn read_text(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Derive consent from the text of a Mattermost config.json; errors name the file.
fn derive_mattermost(path: &Path, text: &str) -> Result<mattermost::Derived, ConfigError> {
    mattermost::derive(text).map_err(|e| ConfigError::Parse {
        file: path.display().to_string(),
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
    // `unclassified` joins the hashed text only when it is not the default, so consent hashes
    // written before the key existed still name the same consent.
    let unclassified = match consent.unclassified {
        crate::decide::policy::Unclassified::Pass => String::new(),
        other => format!(";unclassified={}", other.as_str()),
    };
    sha256(
        format!(
            "granted={};withheld={}{unclassified}",
            granted.join(","),
            withheld.join(",")
        )
        .as_bytes(),
    )
}

#[cfg(test)]
mod tests;
