//! The audit log: one JSON line per decision, hash-chained (DESIGN §9). It is data, not logging:
//! its own record type, written by the task that made the decision (under one lock, one
//! `write(2)` a record) before anything it decided leaves, nothing dropped, never routed
//! through `tracing`. A record names what was removed by selector; it never holds a
//! value, a query string, a header value or a body.
//!
//! `hash` is `sha256:` + hex SHA-256 over the record's JSON line without the `hash` member (the
//! line is `{…,"prev":"sha256:…"}` and `hash` is appended last); `prev` is the previous
//! record's `hash`, and `sha256:` + 64 zeros for the first record of a log.
//!
//! The rooms: `record` (the record, its hash, a chain's files), `writer` (write-ahead, outcomes,
//! group commit, a log that cannot be written), `repair` (a torn tail at start), `verify`,
//! `summary`, `report` (the HTML page a person reads).

mod record;
mod repair;
mod report;
mod summary;
mod verify;
mod writer;

pub use record::{chain_files, read, sha256, Entry, Head, Record};
pub use report::{report, Window};
pub use summary::{summarize, NodeSummary, Summary};
pub use verify::{chains, verify_chain, ChainReport, Verdict};
pub use writer::{
    AuditError, AuditLog, AuditMetrics, AuditTarget, Outcome, Rotation, SyncMode, FLUSH_EVERY,
};

#[cfg(test)]
mod tests;
