//! The audit log: one JSON line per decision, hash-chained (DESIGN §9). It is data, not logging:
//! its own record type, written by the task that made the decision (under one lock, one
//! `write(2)` a record) before that task answers, nothing dropped, never routed through
//! `tracing`. A record names what was removed by selector; it never holds a
//! value, a query string, a header value or a body.
//!
//! `hash` is `sha256:` + hex SHA-256 over the record's JSON line without the `hash` member (the
//! line is `{…,"prev":"sha256:…"}` and `hash` is appended last); `prev` is the previous
//! record's `hash`, and `sha256:` + 64 zeros for the first record of a log.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::config::{AuditTarget, Rotation};

/// The closed vocabulary of decisions.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allowed,
    Stripped,
    Blocked,
    Tunneled,
    Denied,
    Error,
    WouldBlock,
    WouldStrip,
    PolicyLoaded,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::Stripped => "stripped",
            Decision::Blocked => "blocked",
            Decision::Tunneled => "tunneled",
            Decision::Denied => "denied",
            Decision::Error => "error",
            Decision::WouldBlock => "would_block",
            Decision::WouldStrip => "would_strip",
            Decision::PolicyLoaded => "policy_loaded",
        }
    }
}

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
            status: None,
            bytes_in: None,
            bytes_out: None,
            under: None,
        }
    }
}

#[derive(Serialize)]
struct Record<'a> {
    seq: u64,
    time: &'a str,
    node: &'a str,
    #[serde(flatten)]
    entry: &'a Entry,
    policy: &'a str,
    consent: &'a str,
    prev: &'a str,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit log {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("audit log {path} ends with a damaged record; check it with `consent-proxy audit verify` and move it aside")]
    DamagedTail { path: PathBuf },
    #[error("audit log {path} is not a regular file (a device or pipe cannot hold a hash chain that `audit verify` can read back)")]
    NotAFile { path: PathBuf },
    #[error("cannot write the audit log")]
    Write(#[source] io::Error),
}

/// A handle to the audit log; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    writer: Arc<Mutex<WriterState>>,
    healthy: Arc<AtomicBool>,
    head: Arc<Mutex<Head>>,
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

const ZERO_HASH: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

impl AuditLog {
    /// Open (or continue) the log. An existing file's chain is continued from its last record
    /// (or from the newest rotated file's, when the current one is empty).
    pub fn open(
        target: &AuditTarget,
        node: &str,
        policy_hash: String,
        consent_hash: String,
        seq_gauge: Gauge,
    ) -> Result<AuditLog, AuditError> {
        let (sink, seq, prev, time) = match target {
            AuditTarget::Stdout => (
                Sink::Stdout(io::stdout()),
                0,
                ZERO_HASH.to_string(),
                String::new(),
            ),
            AuditTarget::File(path, rotation) => {
                let open_err = |source| AuditError::Open {
                    path: path.clone(),
                    source,
                };
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(open_err)?;
                }
                if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
                    return Err(AuditError::NotAFile { path: path.clone() });
                }
                let mut file = open_append(path).map_err(open_err)?;
                let mut tail = last_line(&mut file).map_err(open_err)?;
                if tail.is_none() {
                    let rotated = rotated_name(path, 1);
                    if let Ok(mut older) = File::open(&rotated) {
                        tail = last_line(&mut older).map_err(open_err)?;
                    }
                }
                let (seq, prev, time) = match tail {
                    None => (0, ZERO_HASH.to_string(), String::new()),
                    Some(line) => chain_tail(&line)
                        .ok_or_else(|| AuditError::DamagedTail { path: path.clone() })?,
                };
                let size = file.metadata().map(|m| m.len()).unwrap_or(0);
                let sink = Sink::File {
                    file,
                    path: path.clone(),
                    rotation: *rotation,
                    size,
                };
                (sink, seq, prev, time)
            }
        };
        let healthy = Arc::new(AtomicBool::new(true));
        seq_gauge.set(i64::try_from(seq).unwrap_or(i64::MAX));
        let head = Arc::new(Mutex::new(Head {
            node: node.to_string(),
            seq,
            hash: prev.clone(),
            time,
        }));
        let state = WriterState {
            sink,
            node: node.to_string(),
            seq,
            prev,
            policy: policy_hash,
            consent: consent_hash,
            head: head.clone(),
            seq_gauge,
            buf: Vec::with_capacity(2048),
        };
        Ok(AuditLog {
            writer: Arc::new(Mutex::new(state)),
            healthy,
            head,
        })
    }

    /// Write one record; returns once the kernel has it.
    pub async fn write(&self, entry: &Entry) -> Result<(), AuditError> {
        self.send(entry, None).await
    }

    /// Record that a policy (or consent) took effect; later records carry its hashes.
    pub async fn policy_loaded(
        &self,
        reason: String,
        policy_hash: String,
        consent_hash: String,
    ) -> Result<(), AuditError> {
        self.send(
            &Entry::new(Decision::PolicyLoaded, reason),
            Some((policy_hash, consent_hash)),
        )
        .await
    }

    /// The newest record written.
    pub fn head(&self) -> Head {
        self.head.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// False once a write failed: inspected traffic must then be blocked.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Append one record. The lock is held for one `write(2)` of one line (the page cache
    /// takes it; a disk that stalls it stalls every decision, which is what fail closed asks).
    /// Handing records to a writer thread cost two thread wake-ups a request, more than the
    /// write itself.
    async fn send(
        &self,
        entry: &Entry,
        hashes: Option<(String, String)>,
    ) -> Result<(), AuditError> {
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let written = writer.append(entry, hashes);
        if written.is_err() {
            self.healthy.store(false, Ordering::Relaxed);
        }
        written.map_err(AuditError::Write)
    }
}

/// Where records go: stdout, or a file rotated by size.
enum Sink {
    Stdout(io::Stdout),
    File {
        file: File,
        path: PathBuf,
        rotation: Option<Rotation>,
        size: u64,
    },
}

impl Sink {
    /// Write one line; a file is rotated once it has reached its size.
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        match self {
            Sink::Stdout(out) => out.write_all(line).and_then(|()| out.flush()),
            Sink::File {
                file,
                path,
                rotation,
                size,
            } => {
                file.write_all(line)?;
                *size += line.len() as u64;
                match rotation {
                    Some(r) if *size >= r.max_bytes => {
                        // FILE.(k) -> FILE.(k+1), oldest dropped; FILE -> FILE.1; a new FILE.
                        let _ = std::fs::remove_file(rotated_name(path, r.keep));
                        for k in (1..r.keep).rev() {
                            let _ =
                                std::fs::rename(rotated_name(path, k), rotated_name(path, k + 1));
                        }
                        std::fs::rename(&*path, rotated_name(path, 1))?;
                        *file = open_append(path)?;
                        *size = 0;
                        Ok(())
                    }
                    _ => Ok(()),
                }
            }
        }
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
}

/// `FILE.k`, the k-th newest rotated file.
fn rotated_name(path: &Path, k: usize) -> PathBuf {
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

struct WriterState {
    sink: Sink,
    node: String,
    seq: u64,
    prev: String,
    policy: String,
    consent: String,
    head: Arc<Mutex<Head>>,
    seq_gauge: Gauge,
    /// The line being written, reused.
    buf: Vec<u8>,
}

impl WriterState {
    /// Chain one record onto the log; on failure the chain state (hashes in force included)
    /// is left as it was. `hashes`: the policy and consent hashes in force from this record on.
    fn append(&mut self, entry: &Entry, hashes: Option<(String, String)>) -> io::Result<()> {
        let now = OffsetDateTime::now_utc();
        let time = now
            .replace_nanosecond(now.microsecond() * 1000)
            .unwrap_or(now)
            .format(&Rfc3339)
            .unwrap_or_default();
        // A decision carries the hashes it was made under; a record without them (the proxy's
        // own events) names those in force.
        let (policy, consent) = match (&entry.under, &hashes) {
            (Some((p, c)), _) => (&**p, &**c),
            (None, Some((p, c))) => (p.as_str(), c.as_str()),
            (None, None) => (self.policy.as_str(), self.consent.as_str()),
        };
        let seq = self.seq + 1;
        let record = Record {
            seq,
            time: &time,
            node: &self.node,
            entry,
            policy,
            consent,
            prev: &self.prev,
        };
        let buf = &mut self.buf;
        buf.clear();
        serde_json::to_writer(&mut *buf, &record)?;
        let hash = sha256(buf);
        buf.pop();
        buf.extend_from_slice(b",\"hash\":\"");
        buf.extend_from_slice(hash.as_bytes());
        buf.extend_from_slice(b"\"}\n");
        self.sink.write_line(buf)?;
        if let Some((policy, consent)) = hashes {
            self.policy = policy;
            self.consent = consent;
        }
        self.seq = seq;
        self.seq_gauge.set(i64::try_from(seq).unwrap_or(i64::MAX));
        if let Ok(mut head) = self.head.lock() {
            head.seq = seq;
            head.hash.clone_from(&hash);
            head.time = time;
        }
        self.prev = hash;
        Ok(())
    }
}

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

/// The last non-empty line of a file (read from its last 1 MiB).
fn last_line(file: &mut File) -> io::Result<Option<String>> {
    let len = file.seek(SeekFrom::End(0))?;
    let start = len.saturating_sub(1 << 20);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = String::new();
    file.read_to_string(&mut tail)?;
    if !tail.is_empty() && !tail.ends_with('\n') {
        // A record cut short by a crash: refuse to continue the chain from it.
        return Ok(Some(String::new()));
    }
    Ok(tail
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(str::to_string))
}

fn chain_tail(line: &str) -> Option<(u64, String, String)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    Some((
        v.get("seq")?.as_u64()?,
        v.get("hash")?.as_str()?.to_string(),
        v.get("time")?.as_str()?.to_string(),
    ))
}

/// What `audit verify` found.
#[derive(Debug, Eq, PartialEq)]
pub enum Verdict {
    /// Every record's hash and link checks out. `first_seq` > 1 means older records were
    /// rotated away (their files deleted); the chain is checked from there on.
    Intact {
        records: u64,
        files: usize,
        first_seq: u64,
    },
    /// The first record that does not.
    Broken {
        file: PathBuf,
        line: u64,
        seq: Option<u64>,
        reason: String,
    },
}

/// What `audit verify` found in one replica's chain.
#[derive(Debug)]
pub struct ChainReport {
    pub path: PathBuf,
    /// The replica that wrote it (its newest record's `node`).
    pub node: Option<String>,
    pub verdict: Verdict,
    /// The newest `seq` read.
    pub last_seq: Option<u64>,
    /// Witnessed heads of this node the chain does not hold: truncation or rewriting.
    pub witness_problems: Vec<String>,
}

/// Recompute the hash chain of an audit log and its rotated files (`FILE.1`, `FILE.2`, …), and
/// check it against the heads a monitoring system witnessed (`GET /audit/head`) for its node.
pub fn verify_chain(path: &Path, witnessed: &[Head]) -> io::Result<ChainReport> {
    let files = chain_files(path);
    let mut node: Option<String> = None;
    // (seq, hash) of each witnessed head, and whether the chain held it.
    let mut seen: Vec<(&Head, Option<bool>)> = witnessed.iter().map(|h| (h, None)).collect();
    let mut prev: Option<String> = None;
    let mut last_seq: Option<u64> = None;
    let mut first_seq = None;
    let mut n = 0;
    for file_path in &files {
        let file = File::open(file_path)?;
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let line = line?;
            let broken = |node: &Option<String>, seq, reason: &str| ChainReport {
                path: path.to_path_buf(),
                node: node.clone(),
                verdict: Verdict::Broken {
                    file: file_path.clone(),
                    line: i as u64 + 1,
                    seq,
                    reason: reason.to_string(),
                },
                last_seq,
                witness_problems: Vec::new(),
            };
            let Ok(serde_json::Value::Object(mut record)) =
                serde_json::from_str::<serde_json::Value>(&line)
            else {
                return Ok(broken(&node, None, "not a JSON record"));
            };
            let seq = record.get("seq").and_then(|s| s.as_u64());
            let Some(serde_json::Value::String(hash)) = record.shift_remove("hash") else {
                return Ok(broken(&node, seq, "no hash"));
            };
            let body = serde_json::to_string(&record).map_err(io::Error::other)?;
            if sha256(body.as_bytes()) != hash {
                return Ok(broken(
                    &node,
                    seq,
                    "hash does not match the record (edited)",
                ));
            }
            if let Some(n) = record.get("node").and_then(|n| n.as_str()) {
                if node.as_deref() != Some(n) {
                    node = Some(n.to_string());
                }
            }
            for (head, held) in seen.iter_mut() {
                if Some(head.seq) == seq && node.as_deref() == Some(head.node.as_str()) {
                    *held = Some(head.hash == hash);
                }
            }
            let record_prev = record.get("prev").and_then(|p| p.as_str());
            let linked = match (&prev, record_prev) {
                (Some(p), Some(r)) => p == r,
                // The oldest record present: the chain starts at zero, or older files were
                // rotated away (then only a rotated file may open the log).
                (None, Some(r)) => r == ZERO_HASH || files.len() > 1,
                (_, None) => false,
            };
            if !linked {
                return Ok(broken(
                    &node,
                    seq,
                    "prev does not match the previous record's hash (deleted, reordered or inserted)",
                ));
            }
            match (seq, last_seq) {
                (Some(s), Some(l)) if s == l + 1 => {}
                (Some(1), None) => {}
                (Some(_), None) if files.len() > 1 && record_prev != Some(ZERO_HASH) => {}
                _ => {
                    return Ok(broken(
                        &node,
                        seq,
                        "seq does not follow the previous record",
                    ))
                }
            }
            first_seq = first_seq.or(seq);
            last_seq = seq;
            prev = Some(hash);
            n += 1;
        }
    }
    let mut witness_problems = Vec::new();
    for (head, held) in seen {
        if node.as_deref() != Some(head.node.as_str()) {
            continue;
        }
        let at = format!("witnessed head of node {} at seq {}", head.node, head.seq);
        match held {
            Some(true) => {}
            Some(false) => witness_problems.push(format!(
                "{at}: the chain holds another record there (rewritten)"
            )),
            None if last_seq.is_some_and(|l| head.seq > l) => witness_problems.push(format!(
                "{at}: the chain ends at seq {} (newer records are missing: truncated)",
                last_seq.unwrap_or(0)
            )),
            None => witness_problems.push(format!(
                "{at}: not in the files read (rotated away, or the chain was cut)"
            )),
        }
    }
    Ok(ChainReport {
        path: path.to_path_buf(),
        node,
        verdict: Verdict::Intact {
            records: n,
            files: files.len(),
            first_seq: first_seq.unwrap_or(0),
        },
        last_seq,
        witness_problems,
    })
}

/// The chains among files and folders named on the command line: a folder stands for every
/// log in it; a rotated file (`FILE.3`) for its chain (`FILE`). Sorted, each once.
pub fn chains(paths: &[PathBuf]) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            for entry in std::fs::read_dir(path)? {
                let entry = entry?;
                if entry.file_type()?.is_file() {
                    files.push(entry.path());
                }
            }
        } else {
            files.push(path.clone());
        }
    }
    let mut bases: Vec<PathBuf> = files
        .into_iter()
        .map(|f| {
            let name = f.to_string_lossy();
            match name.rsplit_once('.') {
                Some((base, k)) if !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()) => {
                    PathBuf::from(base)
                }
                _ => f,
            }
        })
        .collect();
    bases.sort();
    bases.dedup();
    Ok(bases)
}

/// Per node, feature and decision counts, and the selectors removed or replaced most often.
#[derive(Debug, Default, serde::Serialize)]
pub struct Summary {
    pub records: u64,
    pub first: Option<String>,
    pub last: Option<String>,
    /// Each replica's records, first and last time, ordered by their first record's time.
    pub nodes: Vec<NodeSummary>,
    /// feature (`-` for none) → decision → count.
    pub decisions: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
    /// `(selector, count)`, most frequent first; array indexes folded to `[*]`.
    pub selectors: Vec<(String, u64)>,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct NodeSummary {
    pub node: String,
    pub records: u64,
    pub first: Option<String>,
    pub last: Option<String>,
    /// feature (`-` for none) → decision → count.
    pub decisions: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
}

/// Summarize audit logs (each with its rotated files; several replicas' logs together), records
/// at or after `since` (RFC 3339): per node, and merged across nodes.
pub fn summarize(paths: &[PathBuf], since: Option<OffsetDateTime>) -> io::Result<Summary> {
    let mut summary = Summary::default();
    let mut selectors: std::collections::HashMap<String, u64> = Default::default();
    let mut nodes: std::collections::BTreeMap<String, NodeSummary> = Default::default();
    // The instants behind `first`/`last` (the text drops trailing zeros: it does not sort), and
    // each node's first, to order the nodes by.
    let (mut first_at, mut last_at) = (None::<OffsetDateTime>, None::<OffsetDateTime>);
    let mut node_first: std::collections::HashMap<String, OffsetDateTime> = Default::default();
    let files: Vec<PathBuf> = chains(paths)?
        .iter()
        .flat_map(|base| chain_files(base))
        .collect();
    for file_path in files {
        for line in BufReader::new(File::open(&file_path)?).lines() {
            let Ok(record) = serde_json::from_str::<serde_json::Value>(&line?) else {
                continue;
            };
            let time = record["time"].as_str().unwrap_or_default();
            let Ok(at) = OffsetDateTime::parse(time, &Rfc3339) else {
                continue;
            };
            if since.is_some_and(|since| at < since) {
                continue;
            }
            summary.records += 1;
            if first_at.is_none_or(|f| at < f) {
                first_at = Some(at);
                summary.first = Some(time.to_string());
            }
            if last_at.is_none_or(|l| at > l) {
                last_at = Some(at);
                summary.last = Some(time.to_string());
            }
            let node_name = record["node"].as_str().unwrap_or("-").to_string();
            node_first.entry(node_name.clone()).or_insert(at);
            let node = nodes
                .entry(node_name.clone())
                .or_insert_with(|| NodeSummary {
                    node: node_name,
                    ..NodeSummary::default()
                });
            node.records += 1;
            node.first.get_or_insert_with(|| time.to_string());
            node.last = Some(time.to_string());
            let feature = record["feature"].as_str().unwrap_or("-").to_string();
            let decision = record["decision"].as_str().unwrap_or("?").to_string();
            *node
                .decisions
                .entry(feature.clone())
                .or_default()
                .entry(decision.clone())
                .or_default() += 1;
            *summary
                .decisions
                .entry(feature)
                .or_default()
                .entry(decision)
                .or_default() += 1;
            for key in ["removed", "replaced"] {
                for sel in record[key]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.as_str())
                {
                    *selectors.entry(fold_indexes(sel)).or_default() += 1;
                }
            }
        }
    }
    let mut selectors: Vec<(String, u64)> = selectors.into_iter().collect();
    selectors.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    summary.selectors = selectors;
    let mut nodes: Vec<NodeSummary> = nodes.into_values().collect();
    nodes.sort_by_key(|n| (node_first.get(&n.node).copied(), n.node.clone()));
    summary.nodes = nodes;
    Ok(summary)
}

/// `json:$['batch'][3]['userId']` → `json:$['batch'][*]['userId']`.
fn fold_indexes(selector: &str) -> String {
    let mut out = String::with_capacity(selector.len());
    let mut rest = selector;
    while let Some(i) = rest.find('[') {
        out.push_str(&rest[..=i]);
        rest = &rest[i + 1..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 && rest[digits..].starts_with(']') {
            out.push('*');
            rest = &rest[digits..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_named_in_lowercase_hex() {
        // FIPS 180-2's "abc" example.
        assert_eq!(
            sha256(b"abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    fn verify(path: &Path) -> io::Result<Verdict> {
        verify_chain(path, &[]).map(|r| r.verdict)
    }

    fn open(target: &AuditTarget) -> AuditLog {
        let (p, c) = ("sha256:p".to_string(), "sha256:c".to_string());
        AuditLog::open(target, "node-a", p, c, Gauge::default()).expect("opens")
    }

    fn entry(reason: &str) -> Entry {
        let mut e = Entry::new(Decision::Allowed, reason);
        e.host = Some("h.example".into());
        e.removed = vec!["query:uc".into()];
        e
    }

    #[tokio::test]
    async fn chain_survives_restart_and_detects_tampering() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a/audit.jsonl");
        let target = AuditTarget::File(path.clone(), None);
        for round in 0..2 {
            let log = open(&target);
            log.policy_loaded(
                format!("start {round}"),
                "sha256:p".into(),
                "sha256:c".into(),
            )
            .await
            .expect("writes");
            log.write(&entry("one")).await.expect("writes");
            log.write(&entry("two")).await.expect("writes");
            drop(log);
        }
        assert_eq!(
            verify(&path).expect("reads"),
            Verdict::Intact {
                records: 6,
                files: 1,
                first_seq: 1
            }
        );
        let text = std::fs::read_to_string(&path).expect("reads");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("{\"seq\":1,\"time\":\""));
        assert!(lines[0].contains(&format!("\"prev\":\"{ZERO_HASH}\"")));

        let tampered = [
            (
                text.replacen("\"reason\":\"one\"", "\"reason\":\"uno\"", 1),
                2,
                "edited",
            ),
            (
                lines
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != 2)
                    .map(|(_, l)| format!("{l}\n"))
                    .collect::<String>(),
                3,
                "prev",
            ),
            ([lines[0], lines[2], lines[1]].join("\n"), 2, "prev"),
        ];
        for (bad, line, why) in tampered {
            std::fs::write(&path, bad).expect("writes");
            match verify(&path).expect("reads") {
                Verdict::Broken {
                    line: l, reason, ..
                } => {
                    assert_eq!(l, line);
                    assert!(reason.contains(why), "{reason}");
                }
                v => panic!("tampering not detected: {v:?}"),
            }
        }
    }

    #[tokio::test]
    async fn rotation_keeps_the_chain_across_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let rotation = Rotation {
            max_bytes: 2000,
            keep: 3,
        };
        let target = AuditTarget::File(path.clone(), Some(rotation));
        for round in 0..2 {
            let log = open(&target);
            for i in 0..20 {
                log.write(&entry(&format!("r{round} {i}")))
                    .await
                    .expect("writes");
            }
            drop(log);
        }
        let files = chain_files(&path);
        assert_eq!(files.len(), 4, "{files:?}");
        match verify(&path).expect("reads") {
            Verdict::Intact {
                records,
                files: 4,
                first_seq,
            } => {
                assert!(first_seq > 1, "the oldest files were rotated away");
                assert_eq!(
                    first_seq + records - 1,
                    40,
                    "the chain runs to the last record"
                );
            }
            v => panic!("{v:?}"),
        }
        let summary = summarize(std::slice::from_ref(&path), None).expect("reads");
        assert_eq!(summary.decisions["-"]["allowed"], summary.records);
        assert_eq!(
            summary.selectors,
            vec![("query:uc".to_string(), summary.records)]
        );

        // Edit one record in a rotated file: verify names that file.
        let older = &files[1];
        let text = std::fs::read_to_string(older).expect("reads");
        std::fs::write(older, text.replacen("\"r", "\"R", 1)).expect("writes");
        match verify(&path).expect("reads") {
            Verdict::Broken { file, line: 1, .. } => assert_eq!(&file, older),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn indexes_fold_for_the_summary() {
        assert_eq!(
            fold_indexes("json:$['batch'][3]['userId']"),
            "json:$['batch'][*]['userId']"
        );
        assert_eq!(fold_indexes("query:uc"), "query:uc");
    }

    /// A decision names the policy and consent it was made under, even when a reload was
    /// recorded between the decision and its record; the proxy's own records name those in force.
    #[tokio::test]
    async fn records_carry_the_hashes_of_their_decision() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let log = open(&AuditTarget::File(path.clone(), None));
        log.policy_loaded("reload".into(), "sha256:new".into(), "sha256:c2".into())
            .await
            .expect("writes");
        let mut decided = entry("decided before the reload");
        decided.under = Some(("sha256:old".into(), "sha256:c1".into()));
        log.write(&decided).await.expect("writes");
        log.write(&entry("own record")).await.expect("writes");
        let records: Vec<serde_json::Value> = std::fs::read_to_string(&path)
            .expect("reads")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        let hashes: Vec<(&str, &str)> = records
            .iter()
            .map(|r| {
                let s = |k: &str| r[k].as_str().expect("string");
                (s("policy"), s("consent"))
            })
            .collect();
        assert_eq!(
            hashes,
            [
                ("sha256:new", "sha256:c2"),
                ("sha256:old", "sha256:c1"),
                ("sha256:new", "sha256:c2")
            ]
        );
        assert!(matches!(
            verify(&path).expect("reads"),
            Verdict::Intact { records: 3, .. }
        ));
    }

    #[test]
    fn a_cut_record_refuses_to_continue_the_chain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, "{\"seq\":1,\"hash\":\"sha256:ab").expect("writes");
        let r = AuditLog::open(
            &AuditTarget::File(path, None),
            "node-a",
            String::new(),
            String::new(),
            Gauge::default(),
        );
        assert!(matches!(r, Err(AuditError::DamagedTail { .. })));
    }
}
