//! `audit verify`: a chain read back, record by record, against its hashes and a witness.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use super::record::{chain_files, sha256, Head, ZERO_HASH};
use super::repair::{check_fragment, is_fragment};

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
    /// The first record that does not, after `intact` records that did.
    Broken {
        file: PathBuf,
        line: u64,
        seq: Option<u64>,
        reason: String,
        intact: u64,
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
    /// `recovered` records (a crash repaired at start, a time the log could not be written),
    /// as `seq: reason`: part of an intact chain, and said so.
    pub recoveries: Vec<String>,
    /// The newest file ends in an incomplete line of this many bytes: a crash mid-write the
    /// proxy has not yet repaired (it does at its next start). Not a record, so not a break.
    pub torn_tail: Option<u64>,
}

/// Recompute the hash chain of an audit log and its rotated files (`FILE.1`, `FILE.2`, …), and
/// check it against the heads a monitoring system witnessed (`GET /audit/head`) for its node.
pub fn verify_chain(path: &Path, witnessed: &[Head]) -> io::Result<ChainReport> {
    verify_chain_with(path, witnessed, &mut |_| {})
}

/// [`verify_chain`], handing each record that checks out (without its `hash`) to `visit`, in
/// order: what `audit report` reads in the same pass. Records after a break are not handed on.
pub fn verify_chain_with(
    path: &Path,
    witnessed: &[Head],
    visit: &mut dyn FnMut(&serde_json::Map<String, serde_json::Value>),
) -> io::Result<ChainReport> {
    let files = chain_files(path);
    let mut node: Option<String> = None;
    // (seq, hash) of each witnessed head, and whether the chain held it.
    let mut seen: Vec<(&Head, Option<bool>)> = witnessed.iter().map(|h| (h, None)).collect();
    let mut prev: Option<String> = None;
    let mut last_seq: Option<u64> = None;
    let mut first_seq = None;
    let mut n = 0;
    let mut recoveries = Vec::new();
    let mut torn_tail = None;
    for (k, file_path) in files.iter().enumerate() {
        let mut reader = BufReader::new(File::open(file_path)?);
        let mut raw = Vec::new();
        for i in 0u64.. {
            raw.clear();
            if reader.read_until(b'\n', &mut raw)? == 0 {
                break;
            }
            let broken = |node: &Option<String>, seq, reason: &str| ChainReport {
                path: path.to_path_buf(),
                node: node.clone(),
                verdict: Verdict::Broken {
                    file: file_path.clone(),
                    line: i + 1,
                    seq,
                    reason: reason.to_string(),
                    intact: n,
                },
                last_seq,
                witness_problems: Vec::new(),
                recoveries: recoveries.clone(),
                torn_tail: None,
            };
            if raw.last() != Some(&b'\n') && k + 1 == files.len() {
                torn_tail = Some(raw.len() as u64);
                break;
            }
            let Ok(serde_json::Value::Object(mut record)) =
                serde_json::from_slice::<serde_json::Value>(&raw)
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
            if record.get("decision").and_then(|d| d.as_str()) == Some("recovered") {
                let why = record.get("reason").and_then(|r| r.as_str()).unwrap_or("");
                let fragment = check_fragment(why, file_path)
                    .map(|f| format!(" ({f})"))
                    .unwrap_or_default();
                recoveries.push(format!("seq {}: {why}{fragment}", seq.unwrap_or(0)));
            }
            visit(&record);
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
        recoveries,
        torn_tail,
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
                if entry.file_type()?.is_file() && !is_fragment(&entry.path()) {
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
