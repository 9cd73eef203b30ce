//! `audit summary`: counts per node, feature and decision, the selectors removed most often, and
//! per node what requests carried that the pack does not know, first and last seen.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::PathBuf;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::record::chain_files;
use super::verify::chains;

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
    /// What the node's records name as unclassified, by feature and name.
    pub unclassified: Vec<Unclassified>,
}

/// A name the pack does not know, as one node's records carry it.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Unclassified {
    pub feature: String,
    pub name: String,
    /// Records that name it.
    pub records: u64,
    pub first: String,
    pub last: String,
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
    // node → (feature, name) → what was seen, with the instants behind first and last.
    type Seen = (Unclassified, OffsetDateTime, OffsetDateTime);
    let mut unknown: std::collections::BTreeMap<
        String,
        std::collections::BTreeMap<(String, String), Seen>,
    > = Default::default();
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
            for name in record["unclassified"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str())
            {
                let key = (feature_of(&record), fold_indexes(name));
                let seen = unknown
                    .entry(node.node.clone())
                    .or_default()
                    .entry(key.clone())
                    .or_insert_with(|| {
                        let u = Unclassified {
                            feature: key.0,
                            name: key.1,
                            records: 0,
                            first: time.to_string(),
                            last: time.to_string(),
                        };
                        (u, at, at)
                    });
                seen.0.records += 1;
                if at < seen.1 {
                    (seen.1, seen.0.first) = (at, time.to_string());
                }
                if at > seen.2 {
                    (seen.2, seen.0.last) = (at, time.to_string());
                }
            }
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
    for node in &mut nodes {
        node.unclassified = unknown
            .remove(&node.node)
            .into_iter()
            .flat_map(|m| m.into_values().map(|(u, ..)| u))
            .collect();
    }
    nodes.sort_by_key(|n| (node_first.get(&n.node).copied(), n.node.clone()));
    summary.nodes = nodes;
    Ok(summary)
}

fn feature_of(record: &serde_json::Value) -> String {
    record["feature"].as_str().unwrap_or("-").to_string()
}

/// `json:$['batch'][3]['userId']` → `json:$['batch'][*]['userId']`.
pub(super) fn fold_indexes(selector: &str) -> String {
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
