//! The writer: opens (or continues, repairing a torn tail) a chain, appends records under one
//! lock with one `write(2)` a decision, rotates by size, and keeps the head for `/audit/head`.
//!
//! Write-ahead (DESIGN §9): a decision's record is in the kernel (`sync = "os"`) or on the disk
//! (`sync = "data"`) before [`AuditLog::write`] returns, and the caller lets nothing leave
//! before that. What is known later is an [`Outcome`]: queued, and written in the same
//! `write(2)` as the next record, or by [`AuditLog::keep`] within [`FLUSH_EVERY`] when no
//! record comes (and at shutdown with the final record).
//!
//! A write that fails is rolled back to the offset it started at, so no partial line remains;
//! from then on the log is unhealthy (`/readyz` fails, every decision is refused) and every
//! write (each decision's, and [`AuditLog::keep`]'s) tries again. The first that succeeds
//! starts with a `recovered` record naming what went unrecorded and when.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::record::{rotated_name, sha256, Entry, Head, Line, ZERO_HASH};
use super::repair;
use crate::decide::Decision;

/// Outcomes wait at most this long for the next record before they are written on their own;
/// an unhealthy log is tried again as often.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// How often an idle writer looks whether its file is still at its path.
const MOVED_CHECK: Duration = Duration::from_secs(1);

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

/// `[audit] sync`: how far a record has gone before what it records may leave.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum SyncMode {
    /// Written (`write(2)`): in the kernel, which survives the process dying.
    #[default]
    Os,
    /// Also on the disk (`fdatasync`, one serving every record written while the previous one
    /// ran): survives the machine losing power.
    Data,
}

/// The writer's counters, registered with the proxy's metrics.
#[derive(Clone, Debug, Default)]
pub struct AuditMetrics {
    /// Records written (outcomes and the proxy's own included).
    pub records: Counter,
    /// Writes (or syncs) that failed.
    pub write_failures: Counter,
    /// Decisions refused because their record could not be written.
    pub unrecorded: Counter,
    /// `fdatasync` calls (`sync = "data"`).
    pub syncs: Counter,
    /// The `seq` of the newest record: a witness of the chain's length.
    pub seq: Gauge,
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
    /// Record `seq` was written but could not be synced (`sync = "data"`): what it decided
    /// must not go ahead, and its outcome says so.
    #[error("cannot sync the audit log")]
    Sync {
        seq: u64,
        #[source]
        source: io::Error,
    },
}

/// What became known about a decision after its record was written (DESIGN §9, `outcome`).
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Outcome {
    /// The `seq` of the record it completes.
    pub of: u64,
    pub status: Option<u16>,
    pub bytes_in: Option<u64>,
    pub bytes_out: Option<u64>,
    /// A failure after the request left, or how a tunnel ended.
    pub reason: Option<String>,
}

/// A handle to the audit log; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<WriterState>,
    healthy: AtomicBool,
    /// `sync = "data"`: the group commit.
    syncs: Option<Syncs>,
    metrics: AuditMetrics,
    /// Wakes [`AuditLog::keep`]: an outcome is waiting, or a write failed.
    wake: tokio::sync::Notify,
    /// Outcomes on their way to the writer, which takes them at its next write.
    outcomes: mpsc::Sender<(OffsetDateTime, Outcome)>,
    /// Set by the first outcome queued since the writer last took them.
    queued: AtomicBool,
}

/// Group commit: whoever holds `turn` syncs everything written so far; those who waited for
/// the turn find their record already synced.
struct Syncs {
    turn: tokio::sync::Mutex<()>,
    /// The newest `seq` known to be on the disk.
    synced: AtomicU64,
}

impl AuditLog {
    /// Open (or continue) the log. An existing file's chain is continued from its last record
    /// (or from the newest rotated file's, when the current one is empty); a last line cut
    /// short by a crash is moved aside first (to `<path>.torn-<UTC time>`) and a `recovered` record says so.
    pub fn open(
        target: &AuditTarget,
        sync: SyncMode,
        node: &str,
        policy_hash: String,
        consent_hash: String,
        metrics: AuditMetrics,
    ) -> Result<AuditLog, AuditError> {
        let (sink, tail, torn) = match target {
            AuditTarget::Stdout => (Sink::Stdout(io::stdout()), None, None),
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
                let torn = repair::cut_torn_tail(&mut file, path).map_err(open_err)?;
                let mut tail = repair::last_line(&mut file).map_err(open_err)?;
                if tail.is_none() {
                    if let Ok(mut older) = File::open(rotated_name(path, 1)) {
                        tail = repair::last_line(&mut older).map_err(open_err)?;
                    }
                }
                let tail = match tail {
                    None => None,
                    Some(line) => Some(
                        chain_tail(&line)
                            .ok_or_else(|| AuditError::DamagedTail { path: path.clone() })?,
                    ),
                };
                let size = file.metadata().map_err(open_err)?.len();
                let sink = Sink::File {
                    file: Arc::new(file),
                    path: path.clone(),
                    rotation: *rotation,
                    size,
                    dirty: false,
                };
                (sink, tail, torn)
            }
        };
        let (seq, prev, time) = tail.unwrap_or((0, ZERO_HASH.to_string(), String::new()));
        metrics.seq.set(i64::try_from(seq).unwrap_or(i64::MAX));
        let (outcomes, arriving) = mpsc::channel();
        let state = WriterState {
            sink,
            arriving,
            node: node.to_string(),
            seq,
            prev,
            policy: policy_hash,
            consent: consent_hash,
            buf: Vec::with_capacity(4096),
            time,
            pending: Vec::new(),
            trouble: None,
            owed: Vec::new(),
        };
        let log = AuditLog {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                healthy: AtomicBool::new(true),
                syncs: (sync == SyncMode::Data).then(|| Syncs {
                    turn: tokio::sync::Mutex::new(()),
                    synced: AtomicU64::new(seq),
                }),
                metrics,
                wake: tokio::sync::Notify::new(),
                outcomes,
                queued: AtomicBool::new(false),
            }),
        };
        if let Some(torn) = torn {
            warn!(fragment = %torn.file.display(), bytes = torn.len, "audit log ended in an incomplete record (a crash mid-write); moved aside");
            let entry = Entry::new(Decision::Recovered, torn.reason(seq));
            log.append(Some((&entry, None)))
                .map_err(AuditError::Write)?;
            log.sync_now().map_err(AuditError::Write)?;
        }
        Ok(log)
    }

    /// Write a decision's record; returns its `seq` once it is as durable as `[audit] sync`
    /// asks. On an error nothing of it is in the log, and the decision must be refused.
    pub async fn write(&self, entry: &Entry) -> Result<u64, AuditError> {
        self.send(entry, None).await
    }

    /// Record that a policy (or consent) took effect; later records carry its hashes.
    pub async fn policy_loaded(
        &self,
        reason: String,
        policy_hash: String,
        consent_hash: String,
    ) -> Result<u64, AuditError> {
        self.send(
            &Entry::new(Decision::PolicyLoaded, reason),
            Some((policy_hash, consent_hash)),
        )
        .await
    }

    /// Queue what became known about record `of`: it goes out with the next record's write,
    /// or within [`FLUSH_EVERY`]. Queued without the writer's lock (a request queues one as its
    /// response goes back, while others write their records).
    pub fn outcome(&self, outcome: Outcome) {
        let now = OffsetDateTime::now_utc();
        // The receiver lives as long as `inner`: a send cannot fail while `self` exists.
        let _ = self.inner.outcomes.send((now, outcome));
        if !self.inner.queued.swap(true, Ordering::AcqRel) {
            self.inner.wake.notify_one();
        }
    }

    /// Write queued outcomes now (and, while the log is unhealthy, try it again).
    pub fn flush(&self) -> Result<(), AuditError> {
        self.append(None).map(drop).map_err(AuditError::Write)
    }

    /// Until `stop` (then one last flush): woken by the first outcome queued after a write,
    /// give it [`FLUSH_EVERY`] to ride with the next record, then write what is still queued;
    /// while the log cannot be written, try it every [`FLUSH_EVERY`]. Idle, it wakes once a
    /// second to notice a file moved or removed under the proxy (the chain then continues in a
    /// new file at the path, with a `recovered` record). Under load it sleeps: outcomes go out
    /// with the records, and a wake-up already pending costs a queued outcome one atomic.
    pub async fn keep(self, stop: CancellationToken) {
        let mut checked = tokio::time::Instant::now();
        loop {
            let woken = tokio::select! {
                () = self.inner.wake.notified() => true,
                () = tokio::time::sleep(MOVED_CHECK) => false,
                () = stop.cancelled() => break,
            };
            if woken {
                tokio::select! {
                    () = tokio::time::sleep(FLUSH_EVERY) => {}
                    () = stop.cancelled() => break,
                }
            }
            if checked.elapsed() >= MOVED_CHECK {
                self.reopen_if_moved();
                checked = tokio::time::Instant::now();
            }
            // Writes nothing when nothing is owed; a failure wakes this loop again, to probe
            // after the next FLUSH_EVERY.
            let _ = self.flush();
        }
        let _ = self.flush();
    }

    /// The newest record written.
    pub fn head(&self) -> Head {
        let state = self.inner.lock();
        Head {
            node: state.node.clone(),
            seq: state.seq,
            hash: state.prev.clone(),
            time: state.time.clone(),
        }
    }

    /// False while records cannot be written: nothing may then leave.
    pub fn is_healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Relaxed)
    }

    /// Write `entry` (after what is queued), then wait for it to be synced if the mode asks.
    async fn send(
        &self,
        entry: &Entry,
        hashes: Option<(String, String)>,
    ) -> Result<u64, AuditError> {
        let seq = self
            .append(Some((entry, hashes)))
            .map_err(AuditError::Write)?;
        if let Some(syncs) = &self.inner.syncs {
            self.synced(syncs, seq)
                .await
                .map_err(|source| AuditError::Sync { seq, source })?;
        }
        Ok(seq)
    }

    /// Append what is owed (a `recovered` record, queued outcomes) and `record`, in one write.
    /// The lock is held for that one `write(2)` (the page cache takes it; a disk that stalls it
    /// stalls every decision, which is what fail closed asks). Handing records to a writer
    /// thread cost two thread wake-ups a request, more than the write itself.
    fn append(&self, record: Option<(&Entry, Option<(String, String)>)>) -> io::Result<u64> {
        // The proxy's own records (a policy taking effect, a repair) are not refused requests.
        let decision = record.as_ref().is_some_and(|(e, _)| {
            !matches!(e.decision, Decision::PolicyLoaded | Decision::Recovered)
        });
        let mut state = self.inner.lock();
        self.inner.queued.store(false, Ordering::Release);
        let state_ref = &mut *state;
        state_ref.pending.extend(state_ref.arriving.try_iter());
        let before = state.seq;
        match state.append(record) {
            Ok(seq) => {
                if seq != before {
                    self.inner.metrics.records.inc_by(seq - before);
                    self.inner
                        .metrics
                        .seq
                        .set(i64::try_from(seq).unwrap_or(i64::MAX));
                }
                if !self.inner.healthy.swap(true, Ordering::Relaxed) {
                    info!("audit log written again; traffic resumes");
                }
                Ok(seq)
            }
            Err(e) => {
                self.inner.failed(&mut state, &e, decision);
                Err(e)
            }
        }
    }

    /// Wait until record `seq` is on the disk: sync everything written so far, unless a sync
    /// that started after it was written has done it already.
    async fn synced(&self, syncs: &Syncs, seq: u64) -> io::Result<()> {
        if syncs.synced.load(Ordering::Acquire) >= seq {
            return Ok(());
        }
        let _turn = syncs.turn.lock().await;
        if syncs.synced.load(Ordering::Acquire) >= seq {
            return Ok(());
        }
        let (Some(file), upto) = self.inner.written() else {
            return Ok(());
        };
        let done = tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)));
        self.inner.metrics.syncs.inc();
        match done {
            Ok(()) => {
                syncs.synced.fetch_max(upto, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                self.inner.failed(&mut self.inner.lock(), &e, false);
                Err(e)
            }
        }
    }

    /// Sync what is written, without waiting for a turn (start-up and tests).
    fn sync_now(&self) -> io::Result<()> {
        let Some(syncs) = &self.inner.syncs else {
            return Ok(());
        };
        let (file, upto) = self.inner.written();
        if let Some(file) = file {
            file.sync_data()?;
            self.inner.metrics.syncs.inc();
        }
        syncs.synced.fetch_max(upto, Ordering::Release);
        Ok(())
    }

    /// `fdatasync` calls made so far (`sync = "data"`).
    pub fn syncs(&self) -> u64 {
        self.inner.metrics.syncs.get()
    }

    /// The newest `seq` known to be on the disk (`sync = "data"`), else the newest written.
    pub fn synced_seq(&self) -> u64 {
        match &self.inner.syncs {
            Some(s) => s.synced.load(Ordering::Acquire),
            None => self.inner.lock().seq,
        }
    }

    /// If the path no longer names the file being written (moved, as log rotators do, or
    /// removed), continue the chain in a new file there, opened with a `recovered` record.
    fn reopen_if_moved(&self) {
        let mut state = self.inner.lock();
        let Sink::File { file, path, .. } = &state.sink else {
            return;
        };
        let same = match (std::fs::metadata(path), file.metadata()) {
            (Ok(at_path), Ok(ours)) => at_path.ino() == ours.ino() && at_path.dev() == ours.dev(),
            (Err(e), _) if e.kind() == io::ErrorKind::NotFound => false,
            // Cannot tell: leave it to the writes to fail or not.
            _ => true,
        };
        if same {
            return;
        }
        let path = path.clone();
        match open_append(&path) {
            Ok(new) => {
                warn!(path = %path.display(), "audit log file was moved or removed under the proxy; continuing the chain in a new file");
                let reason = format!(
                    "the audit log file was moved or removed under the proxy; the chain continues here from seq {} (records written to the old file after it was moved are in it, or lost with it if it was removed)",
                    state.seq
                );
                state.owed.push(reason);
                self.inner.wake.notify_one();
                if let Sink::File {
                    file, size, dirty, ..
                } = &mut state.sink
                {
                    *size = new.metadata().map(|m| m.len()).unwrap_or(0);
                    *file = Arc::new(new);
                    *dirty = false;
                }
            }
            Err(e) => self.inner.failed(&mut state, &e, false),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, WriterState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The file being written and the newest `seq` in it: what a sync covers.
    fn written(&self) -> (Option<Arc<File>>, u64) {
        let state = self.lock();
        (state.sink.file(), state.seq)
    }

    /// A write, sync or reopen failed: the log is unhealthy until a write succeeds (which the
    /// keeper, woken here, tries every [`FLUSH_EVERY`]). `decision`: a decision's record was
    /// among what failed, and that decision is refused unrecorded.
    fn failed(&self, state: &mut WriterState, e: &io::Error, decision: bool) {
        self.metrics.write_failures.inc();
        if decision {
            self.metrics.unrecorded.inc();
        }
        let now = OffsetDateTime::now_utc();
        let t = state.trouble.get_or_insert_with(|| Trouble {
            since: now,
            last: now,
            unrecorded: 0,
            error: e.to_string(),
        });
        t.last = now;
        t.unrecorded += u64::from(decision);
        self.wake.notify_one();
        if self.healthy.swap(false, Ordering::Relaxed) {
            error!(error = %e, "audit log cannot be written; everything that would leave is refused until it can");
        }
    }
}

/// Where records go: stdout, or a file rotated by size.
enum Sink {
    Stdout(io::Stdout),
    File {
        file: Arc<File>,
        path: PathBuf,
        rotation: Option<Rotation>,
        /// The file's length: where the next write starts, and where a failed one is cut back.
        size: u64,
        /// A failed write may have left bytes past `size` that could not be cut yet.
        dirty: bool,
    },
}

impl Sink {
    /// Write these whole lines or nothing: a failed or short write is cut back to where it
    /// started (and, if even that fails, before the next write). A file that has reached its
    /// size is then rotated.
    fn write_lines(&mut self, lines: &[u8]) -> io::Result<()> {
        match self {
            Sink::Stdout(out) => out.write_all(lines).and_then(|()| out.flush()),
            Sink::File {
                file, size, dirty, ..
            } => {
                if *dirty {
                    file.set_len(*size)?;
                    *dirty = false;
                }
                if let Err(e) = (&**file).write_all(lines) {
                    *dirty = file.set_len(*size).is_err();
                    return Err(e);
                }
                *size += lines.len() as u64;
                if let Err(e) = self.rotate_if_due() {
                    // The lines are written; rotation is tried again with the next write.
                    warn!(error = %e, "audit log rotation failed; writing on in the same file");
                }
                Ok(())
            }
        }
    }

    /// Rotate a file that has reached its size: synced first (a record waiting for its sync
    /// must not be left in a file no one syncs), `FILE.(k)` → `FILE.(k+1)` (the oldest
    /// dropped), `FILE` → `FILE.1`, a new `FILE`.
    fn rotate_if_due(&mut self) -> io::Result<()> {
        let Sink::File {
            file,
            path,
            rotation: Some(r),
            size,
            ..
        } = self
        else {
            return Ok(());
        };
        if *size < r.max_bytes {
            return Ok(());
        }
        file.sync_data()?;
        let _ = std::fs::remove_file(rotated_name(path, r.keep));
        for k in (1..r.keep).rev() {
            let _ = std::fs::rename(rotated_name(path, k), rotated_name(path, k + 1));
        }
        // Should the current file not move (or no new one open), the older files move back:
        // `chain_files` reads `FILE.1`, `FILE.2`, … up to the first gap.
        let unshift = |path: &Path| {
            for k in 1..r.keep {
                let _ = std::fs::rename(rotated_name(path, k + 1), rotated_name(path, k));
            }
        };
        if let Err(e) = std::fs::rename(&*path, rotated_name(path, 1)) {
            unshift(path);
            return Err(e);
        }
        match open_append(path) {
            Ok(new) => {
                *file = Arc::new(new);
                *size = 0;
                Ok(())
            }
            Err(e) => {
                // Keep writing the file we have, under its name.
                let _ = std::fs::rename(rotated_name(path, 1), &*path);
                unshift(path);
                Err(e)
            }
        }
    }

    /// The file being written, to sync outside the lock.
    fn file(&self) -> Option<Arc<File>> {
        match self {
            Sink::File { file, .. } => Some(file.clone()),
            Sink::Stdout(_) => None,
        }
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// Why records could not be written, since when: what the `recovered` record will say.
struct Trouble {
    since: OffsetDateTime,
    last: OffsetDateTime,
    unrecorded: u64,
    error: String,
}

struct WriterState {
    sink: Sink,
    node: String,
    seq: u64,
    prev: String,
    /// The newest record's time.
    time: String,
    policy: String,
    consent: String,
    /// The lines being written, reused.
    buf: Vec<u8>,
    /// Outcomes queued by [`AuditLog::outcome`], taken into `pending` at each write.
    arriving: mpsc::Receiver<(OffsetDateTime, Outcome)>,
    /// Outcomes not yet written, with when they became known.
    pending: Vec<(OffsetDateTime, Outcome)>,
    /// Set while writes fail.
    trouble: Option<Trouble>,
    /// `recovered` records owed for events found outside a write (a file moved away).
    owed: Vec<String>,
}

impl WriterState {
    /// Chain what is owed and `record` onto the log in one write; returns the newest `seq`.
    /// On failure the chain state (hashes in force, queued outcomes) is left as it was.
    /// `hashes`: the policy and consent hashes in force from `record` on.
    fn append(&mut self, record: Option<(&Entry, Option<(String, String)>)>) -> io::Result<u64> {
        let now = OffsetDateTime::now_utc();
        let time = stamp(now);
        let mut owed = self.owed.clone();
        if let Some(t) = &self.trouble {
            owed.push(format!(
                "the audit log could not be written from {} to {} ({}): {} decision(s) went unrecorded, each refused",
                stamp(t.since),
                stamp(t.last),
                t.error,
                t.unrecorded
            ));
        }
        if owed.is_empty() && self.pending.is_empty() && record.is_none() {
            return Ok(self.seq);
        }
        let mut chain = Chain {
            buf: std::mem::take(&mut self.buf),
            seq: self.seq,
            prev: self.prev.clone(),
        };
        chain.buf.clear();
        let written = (|| {
            for reason in owed {
                let e = Entry::new(Decision::Recovered, reason);
                self.push_entry(&mut chain, &time, &e, None)?;
            }
            for (at, o) in &self.pending {
                let hash = push_outcome(&mut chain, &stamp(*at), &self.node, o)?;
                chain.advance(hash);
            }
            if let Some((entry, hashes)) = &record {
                self.push_entry(&mut chain, &time, entry, hashes.as_ref())?;
            }
            self.sink.write_lines(&chain.buf)
        })();
        let Chain { buf, seq, prev } = chain;
        self.buf = buf;
        written?;
        if let Some((_, Some((policy, consent)))) = record {
            self.policy = policy;
            self.consent = consent;
        }
        self.seq = seq;
        self.prev = prev;
        self.time = time;
        self.pending.clear();
        self.trouble = None;
        self.owed.clear();
        Ok(seq)
    }

    /// One entry's line: a decision carries the hashes it was made under; a record without
    /// them (the proxy's own events) names those in force, or those it brings.
    fn push_entry(
        &self,
        chain: &mut Chain,
        time: &str,
        entry: &Entry,
        hashes: Option<&(String, String)>,
    ) -> io::Result<()> {
        let (policy, consent) = match (&entry.under, hashes) {
            (Some((p, c)), _) => (&**p, &**c),
            (None, Some((p, c))) => (p.as_str(), c.as_str()),
            (None, None) => (self.policy.as_str(), self.consent.as_str()),
        };
        let line = Line {
            seq: chain.seq + 1,
            time,
            node: &self.node,
            entry,
            policy,
            consent,
            prev: &chain.prev,
        };
        let hash = push_line(&mut chain.buf, &line)?;
        chain.advance(hash);
        Ok(())
    }
}

/// Lines being chained: each one's `prev` is the one before's hash.
struct Chain {
    buf: Vec<u8>,
    seq: u64,
    prev: String,
}

impl Chain {
    /// A line was pushed: it is the newest.
    fn advance(&mut self, hash: String) {
        self.seq += 1;
        self.prev = hash;
    }
}

/// Append `line` (a record with its `seq` and `prev`) to `buf`, closed with its hash; returns
/// the hash.
fn push_line(buf: &mut Vec<u8>, line: &impl Serialize) -> io::Result<String> {
    let start = buf.len();
    serde_json::to_writer(&mut *buf, line)?;
    Ok(close_line(buf, start))
}

/// Append the next outcome record to the chain's lines, written by hand (one rides with every
/// forwarded request): the bytes serde_json gives for it, compact, members in DESIGN's order
/// (`{"seq","time","node","decision":"outcome","of","status","bytes_in","bytes_out","reason",
/// "prev"}`), which is what `audit verify` hashes again.
fn push_outcome(chain: &mut Chain, time: &str, node: &str, o: &Outcome) -> io::Result<String> {
    let buf = &mut chain.buf;
    let start = buf.len();
    let number = |buf: &mut Vec<u8>, n: Option<u64>| match n {
        Some(n) => buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes()),
        None => buf.extend_from_slice(b"null"),
    };
    buf.extend_from_slice(b"{\"seq\":");
    number(buf, Some(chain.seq + 1));
    buf.extend_from_slice(b",\"time\":");
    serde_json::to_writer(&mut *buf, time)?;
    buf.extend_from_slice(b",\"node\":");
    serde_json::to_writer(&mut *buf, node)?;
    buf.extend_from_slice(b",\"decision\":\"outcome\",\"of\":");
    number(buf, Some(o.of));
    buf.extend_from_slice(b",\"status\":");
    number(buf, o.status.map(u64::from));
    buf.extend_from_slice(b",\"bytes_in\":");
    number(buf, o.bytes_in);
    buf.extend_from_slice(b",\"bytes_out\":");
    number(buf, o.bytes_out);
    buf.extend_from_slice(b",\"reason\":");
    serde_json::to_writer(&mut *buf, &o.reason)?;
    buf.extend_from_slice(b",\"prev\":");
    serde_json::to_writer(&mut *buf, &chain.prev)?;
    buf.push(b'}');
    Ok(close_line(buf, start))
}

/// Hash the line that starts at `start` (a JSON object) and close it with its `hash` member
/// and a newline; returns the hash.
fn close_line(buf: &mut Vec<u8>, start: usize) -> String {
    let hash = sha256(&buf[start..]);
    buf.pop();
    buf.extend_from_slice(b",\"hash\":\"");
    buf.extend_from_slice(hash.as_bytes());
    buf.extend_from_slice(b"\"}\n");
    hash
}

/// RFC 3339 in UTC to the microsecond (`2026-12-07T03:45:27.123456Z`), as records carry it:
/// written by hand, as it is on every record's path.
fn stamp(at: OffsetDateTime) -> String {
    fn digits(out: &mut String, n: u32, width: u32) {
        for k in (0..width).rev() {
            out.push(char::from(
                b'0' + u8::try_from(n / 10u32.pow(k) % 10).unwrap_or(0),
            ));
        }
    }
    let at = at.to_offset(time::UtcOffset::UTC);
    let mut out = String::with_capacity(27);
    digits(&mut out, u32::try_from(at.year()).unwrap_or(0), 4);
    out.push('-');
    digits(&mut out, u32::from(u8::from(at.month())), 2);
    out.push('-');
    digits(&mut out, u32::from(at.day()), 2);
    out.push('T');
    digits(&mut out, u32::from(at.hour()), 2);
    out.push(':');
    digits(&mut out, u32::from(at.minute()), 2);
    out.push(':');
    digits(&mut out, u32::from(at.second()), 2);
    out.push('.');
    digits(&mut out, at.microsecond(), 6);
    out.push('Z');
    out
}

fn chain_tail(line: &str) -> Option<(u64, String, String)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    Some((
        v.get("seq")?.as_u64()?,
        v.get("hash")?.as_str()?.to_string(),
        v.get("time")?.as_str()?.to_string(),
    ))
}
