//! The record: what one decision says (DESIGN §9), its hash, and the files a chain lives in.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::decide::Decision;

/// What a caller knows about one decision. Fields that do not apply stay `None` (`null`).
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    pub client: Option<String>,
    pub listener: Option<&'static str>,
    pub method: Option<String>,
    pub scheme: Option<&'static str>,
    pub host: Option<String>,
    pub port: Option<u16>,
    /// Transparent mode: the address the client was going to (`SO_ORIGINAL_DST`).
    pub original_dst: Option<String>,
    /// The path without its query string.
    pub path: Option<String>,
    pub feature: Option<String>,
    pub decision: Decision,
    pub reason: String,
    pub removed: Vec<String>,
    pub replaced: Vec<String>,
    /// What the request carried that the pack does not know (names).
    pub unclassified: Vec<String>,
    pub status: Option<u16>,
    pub bytes_in: Option<u64>,
    pub bytes_out: Option<u64>,
    /// The policy and consent hashes the decision was made under; `None`: those in force.
    #[serde(skip)]
    pub under: Option<(Arc<str>, Arc<str>)>,
}

impl Entry {
    pub fn new(decision: Decision, reason: impl Into<String>) -> Self {
        Entry {
            client: None,
            listener: None,
            method: None,
            scheme: None,
            host: None,
            port: None,
            original_dst: None,
            path: None,
            feature: None,
            decision,
            reason: reason.into(),
            removed: Vec::new(),
            replaced: Vec::new(),
            unclassified: Vec::new(),
            status: None,
            bytes_in: None,
            bytes_out: None,
            under: None,
        }
    }

    /// Set what was decided and why: the two are set together, once, where the decision is
    /// made (a plan's result, a refusal, or a connection closed).
    pub fn decide(&mut self, decision: Decision, reason: impl Into<String>) {
        self.decision = decision;
        self.reason = reason.into();
    }
}

/// A record as the writer lays it out: the entry between the chain's members (`hash` is
/// appended after, over these bytes). Serialized member by member, in [`Entry`]'s order: the
/// same bytes a flattened struct gives, without serde's map detour for `flatten`.
pub(super) struct Line<'a> {
    pub(super) seq: u64,
    pub(super) time: &'a str,
    pub(super) node: &'a str,
    pub(super) entry: &'a Entry,
    pub(super) policy: &'a str,
    pub(super) consent: &'a str,
    pub(super) prev: &'a str,
}

impl Serialize for Line<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let e = self.entry;
        let mut r = s.serialize_struct("Line", 23)?;
        r.serialize_field("seq", &self.seq)?;
        r.serialize_field("time", self.time)?;
        r.serialize_field("node", self.node)?;
        r.serialize_field("client", &e.client)?;
        r.serialize_field("listener", &e.listener)?;
        r.serialize_field("method", &e.method)?;
        r.serialize_field("scheme", &e.scheme)?;
        r.serialize_field("host", &e.host)?;
        r.serialize_field("port", &e.port)?;
        r.serialize_field("original_dst", &e.original_dst)?;
        r.serialize_field("path", &e.path)?;
        r.serialize_field("feature", &e.feature)?;
        r.serialize_field("decision", &e.decision)?;
        r.serialize_field("reason", &e.reason)?;
        r.serialize_field("removed", &e.removed)?;
        r.serialize_field("replaced", &e.replaced)?;
        r.serialize_field("unclassified", &e.unclassified)?;
        r.serialize_field("status", &e.status)?;
        r.serialize_field("bytes_in", &e.bytes_in)?;
        r.serialize_field("bytes_out", &e.bytes_out)?;
        r.serialize_field("policy", self.policy)?;
        r.serialize_field("consent", self.consent)?;
        r.serialize_field("prev", self.prev)?;
        r.end()
    }
}

/// A record read back from a log (DESIGN §9), typed: what integration tests and tools assert
/// on. Members that do not apply to a decision are `None` (or empty); an `outcome` record
/// carries `of`, its status, byte counts and reason, and no policy or consent.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq)]
pub struct Record {
    pub seq: u64,
    pub time: String,
    pub node: String,
    #[serde(default)]
    pub client: Option<String>,
    #[serde(default)]
    pub listener: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub original_dst: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub feature: Option<String>,
    pub decision: Decision,
    /// `""` where the record has none (`null`).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub reason: String,
    #[serde(default)]
    pub removed: Vec<String>,
    #[serde(default)]
    pub replaced: Vec<String>,
    #[serde(default)]
    pub unclassified: Vec<String>,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub bytes_in: Option<u64>,
    #[serde(default)]
    pub bytes_out: Option<u64>,
    /// `outcome`: the `seq` of the record it completes.
    #[serde(default)]
    pub of: Option<u64>,
    #[serde(default)]
    pub policy: String,
    #[serde(default)]
    pub consent: String,
    pub prev: String,
    pub hash: String,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

/// Every record of the log at `path` (this file only, not its rotated files), in order. A line
/// that is not a record is an error naming its number; `audit verify` checks the chain.
pub fn read(path: &Path) -> std::io::Result<Vec<Record>> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| {
                let why = format!(
                    "{}: line {} is not an audit record: {e}",
                    path.display(),
                    i + 1
                );
                std::io::Error::new(std::io::ErrorKind::InvalidData, why)
            })
        })
        .collect()
}

/// The newest record of a chain: what `GET /audit/head` serves, so a monitoring system holds an
/// independent witness of how long each replica's chain was (`audit verify --witness`).
#[derive(Clone, Debug, Default, Deserialize, Eq, PartialEq, Serialize)]
pub struct Head {
    pub node: String,
    pub seq: u64,
    pub hash: String,
    pub time: String,
}

pub(super) const ZERO_HASH: &str =
    "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// `sha256:` + lowercase hex: how the audit log, the policy and the consent name their hashes.
pub fn sha256(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(71);
    out.push_str("sha256:");
    for b in digest {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

/// `FILE.k`, the k-th newest rotated file.
pub(super) fn rotated_name(path: &Path, k: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{k}"));
    PathBuf::from(name)
}

/// The files of a log, oldest first: `FILE.n` … `FILE.1`, `FILE`.
pub fn chain_files(path: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = (1..)
        .map(|k| rotated_name(path, k))
        .take_while(|p| p.exists())
        .collect();
    files.reverse();
    if path.exists() || files.is_empty() {
        files.push(path.to_path_buf());
    }
    files
}
