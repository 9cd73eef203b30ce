//! The writer: opens (or continues) a chain, appends one record a decision under one lock with
//! one `write(2)`, rotates by size, and keeps the head for `/audit/head`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::metrics::gauge::Gauge;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::record::{rotated_name, sha256, Entry, Head, Line, ZERO_HASH};
use crate::decide::Decision;

/// Where records go: standard output, or a file.
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
        let record = Line {
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
