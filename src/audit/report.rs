//! `audit report`: the log as a self-contained HTML page a person reads (verdict per node, the
//! consent timeline, decisions per feature over time, what was removed and refused, what left
//! unread). Read in the same streaming pass that verifies each chain ([`verify_chain_with`]),
//! into tallies whose size does not grow with the log; the page is drawn by `report/page`.

mod page;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::PathBuf;

use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::record::Head;
use super::summary::fold_indexes;
use super::verify::{chains, verify_chain_with, ChainReport};

/// The decisions a feature's chart stacks, in order.
pub(super) const CHARTED: [&str; 8] = [
    "allowed",
    "stripped",
    "blocked",
    "tunneled",
    "denied",
    "error",
    "would_block",
    "would_strip",
];

/// At most this many distinct keys a table tallies (destinations, reasons, selectors); later
/// ones are counted under "(others)".
const MAX_KEYS: usize = 10_000;

/// Time buckets kept before they are merged into coarser ones.
const MAX_BUCKETS: usize = 20_000;

/// At most this many consent changes are listed (the rest are counted).
const MAX_TIMELINE: usize = 500;

/// What the page shows, read from the logs.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) records: u64,
    pub(super) first: Option<(OffsetDateTime, String)>,
    pub(super) last: Option<(OffsetDateTime, String)>,
    /// feature (`-` for none) → decision → count: what `audit summary` counts.
    pub(super) decisions: BTreeMap<String, BTreeMap<String, u64>>,
    /// feature → bucket start (unix seconds) → count per [`CHARTED`] decision.
    pub(super) over_time: BTreeMap<String, BTreeMap<i64, [u64; CHARTED.len()]>>,
    /// Seconds a bucket spans: a minute, widened when there would be too many.
    pub(super) bucket: i64,
    /// Buckets in `over_time`, all features together.
    buckets: usize,
    /// feature → selector (indexes folded) → records that name it.
    pub(super) selectors: BTreeMap<String, Counts>,
    /// feature → `host path` refused → count.
    pub(super) blocked: BTreeMap<String, Counts>,
    /// reason → count, of `error` records.
    pub(super) errors: Counts,
    /// `host:port` → (tunnels, bytes from the client, bytes to it).
    pub(super) tunnels: BTreeMap<String, (u64, u64, u64)>,
    /// feature → unclassified name → count.
    pub(super) unclassified: BTreeMap<String, Counts>,
    pub(super) timeline: Vec<Change>,
    pub(super) timeline_more: u64,
    /// Tunnels waiting for their outcome: (node, seq) → `host:port`.
    pending: HashMap<(String, u64), String>,
}

/// A policy or consent that came into force.
pub(super) struct Change {
    pub(super) time: String,
    pub(super) node: String,
    pub(super) reason: String,
    pub(super) policy: String,
    pub(super) consent: String,
}

/// Counts by key, bounded.
#[derive(Default)]
pub(super) struct Counts {
    pub(super) by: HashMap<String, u64>,
    pub(super) others: u64,
}

impl Counts {
    fn add(&mut self, key: &str, n: u64) {
        if let Some(c) = self.by.get_mut(key) {
            *c += n;
        } else if self.by.len() < MAX_KEYS {
            self.by.insert(key.to_string(), n);
        } else {
            self.others += n;
        }
    }

    /// The `n` largest, largest first.
    pub(super) fn top(&self, n: usize) -> Vec<(&str, u64)> {
        let mut all: Vec<(&str, u64)> = self.by.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        all.truncate(n);
        all
    }
}

/// One chain's verdict, with the span of time its records cover.
pub(super) struct NodeReport {
    pub(super) chain: ChainReport,
    pub(super) first: Option<String>,
    pub(super) last: Option<String>,
    /// The policy and consent hashes of its newest `policy_loaded` record.
    pub(super) in_force: Option<(String, String)>,
}

/// The window of time the report covers (`--since`, `--until`).
#[derive(Clone, Copy, Default)]
pub struct Window {
    pub since: Option<OffsetDateTime>,
    pub until: Option<OffsetDateTime>,
}

/// Read `paths` (logs with their rotated files, several replicas' together), verify each chain
/// against `witnessed`, and draw the page.
pub fn report(paths: &[PathBuf], witnessed: &[Head], window: Window) -> io::Result<String> {
    let mut tally = Tally {
        bucket: 60,
        ..Tally::default()
    };
    let mut nodes = Vec::new();
    for chain in chains(paths)? {
        let (mut first, mut last, mut in_force) = (None, None, None);
        let report = verify_chain_with(&chain, witnessed, &mut |record| {
            let time = text(record, "time");
            first.get_or_insert_with(|| time.to_string());
            last = Some(time.to_string());
            if text(record, "decision") == "policy_loaded" {
                in_force = Some((
                    text(record, "policy").to_string(),
                    text(record, "consent").to_string(),
                ));
            }
            tally.add(record, window);
        })?;
        nodes.push(NodeReport {
            chain: report,
            first,
            last,
            in_force,
        });
    }
    Ok(page::render(&nodes, &tally, window))
}

fn text<'r>(record: &'r Map<String, Value>, key: &str) -> &'r str {
    record.get(key).and_then(Value::as_str).unwrap_or_default()
}

impl Tally {
    fn add(&mut self, record: &Map<String, Value>, window: Window) {
        let time = text(record, "time");
        let Ok(at) = OffsetDateTime::parse(time, &Rfc3339) else {
            return;
        };
        if window.since.is_some_and(|s| at < s) || window.until.is_some_and(|u| at > u) {
            return;
        }
        self.records += 1;
        if self.first.as_ref().is_none_or(|(f, _)| at < *f) {
            self.first = Some((at, time.to_string()));
        }
        if self.last.as_ref().is_none_or(|(l, _)| at > *l) {
            self.last = Some((at, time.to_string()));
        }
        let feature = record.get("feature").and_then(Value::as_str).unwrap_or("-");
        let decision = text(record, "decision");
        let node = text(record, "node");
        *slot(slot(&mut self.decisions, feature), decision) += 1;
        if let Some(i) = CHARTED.iter().position(|d| *d == decision) {
            self.chart(feature, at.unix_timestamp(), i);
        }
        // Each selector once a record: the table counts records, not array items.
        let mut seen: Vec<String> = Vec::new();
        for sel in strings(record, "removed").chain(strings(record, "replaced")) {
            let folded = fold_indexes(sel);
            if !seen.contains(&folded) {
                slot(&mut self.selectors, feature).add(&folded, 1);
                seen.push(folded);
            }
        }
        for name in strings(record, "unclassified") {
            slot(&mut self.unclassified, feature).add(name, 1);
        }
        let host = text(record, "host");
        match decision {
            "blocked" | "denied" | "would_block" => {
                let path = text(record, "path");
                let dest = if host.is_empty() {
                    "(no host)".to_string()
                } else {
                    format!("{host}{path}")
                };
                slot(&mut self.blocked, feature).add(&dest, 1);
            }
            "error" => self.errors.add(text(record, "reason"), 1),
            // A blind tunnel (CONNECT, or transparent mode) has no path: nothing was read.
            "tunneled" if record.get("path").is_none_or(Value::is_null) => {
                let port = record.get("port").and_then(Value::as_u64).unwrap_or(0);
                let dest = format!("{host}:{port}");
                self.tunnels.entry(dest.clone()).or_default().0 += 1;
                if let Some(seq) = record.get("seq").and_then(Value::as_u64) {
                    if self.pending.len() < MAX_KEYS {
                        self.pending.insert((node.to_string(), seq), dest);
                    }
                }
            }
            "outcome" => {
                let of = record.get("of").and_then(Value::as_u64).unwrap_or(0);
                if let Some(dest) = self.pending.remove(&(node.to_string(), of)) {
                    let t = self.tunnels.entry(dest).or_default();
                    t.1 += record.get("bytes_in").and_then(Value::as_u64).unwrap_or(0);
                    t.2 += record.get("bytes_out").and_then(Value::as_u64).unwrap_or(0);
                }
            }
            "policy_loaded" => {
                if self.timeline.len() < MAX_TIMELINE {
                    self.timeline.push(Change {
                        time: time.to_string(),
                        node: node.to_string(),
                        reason: text(record, "reason").to_string(),
                        policy: text(record, "policy").to_string(),
                        consent: text(record, "consent").to_string(),
                    });
                } else {
                    self.timeline_more += 1;
                }
            }
            _ => {}
        }
    }

    /// Count a decision in its feature's time bucket, widening every bucket when too many.
    fn chart(&mut self, feature: &str, at: i64, decision: usize) {
        let start = at - at.rem_euclid(self.bucket);
        let series = slot(&mut self.over_time, feature);
        let counts = series.entry(start).or_insert_with(|| {
            self.buckets += 1;
            [0; CHARTED.len()]
        });
        counts[decision] += 1;
        if self.buckets > MAX_BUCKETS {
            self.bucket *= 60;
            let width = self.bucket;
            for series in self.over_time.values_mut() {
                let mut wider: BTreeMap<i64, [u64; CHARTED.len()]> = BTreeMap::new();
                for (start, counts) in std::mem::take(series) {
                    let slot = wider.entry(start - start.rem_euclid(width)).or_default();
                    for (w, c) in slot.iter_mut().zip(counts) {
                        *w += c;
                    }
                }
                *series = wider;
            }
            self.buckets = self.over_time.values().map(BTreeMap::len).sum();
        }
    }
}

/// The value at `key`, inserted when missing: a key is allocated only the first time.
fn slot<'m, V: Default>(map: &'m mut BTreeMap<String, V>, key: &str) -> &'m mut V {
    if !map.contains_key(key) {
        map.insert(key.to_string(), V::default());
    }
    map.get_mut(key).expect("inserted just above")
}

fn strings<'r>(record: &'r Map<String, Value>, key: &str) -> impl Iterator<Item = &'r str> {
    record
        .get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
}
