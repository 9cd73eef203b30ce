use std::io;
use std::path::Path;

use super::record::ZERO_HASH;
use super::summary::fold_indexes;
use super::*;
use crate::decide::Decision;

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
    open_with(target, SyncMode::Os)
}

fn open_with(target: &AuditTarget, sync: SyncMode) -> AuditLog {
    let (p, c) = ("sha256:p".to_string(), "sha256:c".to_string());
    AuditLog::open(target, sync, "node-a", p, c, AuditMetrics::default()).expect("opens")
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

#[tokio::test]
async fn the_summary_lists_unclassified_names_per_node_first_and_last_seen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = open(&AuditTarget::File(path.clone(), None));
    for (i, names) in [
        vec!["query:nx"],
        vec![],
        vec!["query:nx", "json:$.batch[*].x"],
    ]
    .into_iter()
    .enumerate()
    {
        let mut e = entry(&format!("r{i}"));
        e.feature = Some("security_alerts".into());
        e.unclassified = names.into_iter().map(str::to_string).collect();
        log.write(&e).await.expect("writes");
    }
    drop(log);
    let records = read(&path).expect("reads");
    let summary = summarize(std::slice::from_ref(&path), None).expect("reads");
    let node = &summary.nodes[0];
    let seen: Vec<(&str, &str, u64)> = node
        .unclassified
        .iter()
        .map(|u| (u.feature.as_str(), u.name.as_str(), u.records))
        .collect();
    assert_eq!(
        seen,
        [
            ("security_alerts", "json:$.batch[*].x", 1),
            ("security_alerts", "query:nx", 2)
        ]
    );
    let nx = &node.unclassified[1];
    assert_eq!(
        (nx.first.as_str(), nx.last.as_str()),
        (records[0].time.as_str(), records[2].time.as_str())
    );
    assert_eq!(records[0].unclassified, ["query:nx"]);
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
fn a_damaged_whole_last_record_refuses_to_continue_the_chain() {
    // A whole line (it ends with a newline) that is not a record is not a crash's signature:
    // someone wrote it. The proxy does not guess where the chain went on.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    std::fs::write(&path, "{\"seq\":1,\"hash\":\"sha256:ab\n").expect("writes");
    let r = AuditLog::open(
        &AuditTarget::File(path, None),
        SyncMode::Os,
        "node-a",
        String::new(),
        String::new(),
        AuditMetrics::default(),
    );
    assert!(matches!(r, Err(AuditError::DamagedTail { .. })));
}

/// A last line cut by a crash is moved aside (0600, its bytes kept), the log ends at its last
/// whole record, and a `recovered` record continues the chain naming the fragment; verify
/// passes and lists the repair. Before the repair, verify counts the intact records and names
/// the torn tail without calling the chain broken.
#[tokio::test]
async fn a_torn_tail_is_moved_aside_and_the_chain_continues() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let target = AuditTarget::File(path.clone(), None);
    let log = open(&target);
    for reason in ["one", "two", "three"] {
        log.write(&entry(reason)).await.expect("writes");
    }
    drop(log);
    let whole = std::fs::read(&path).expect("reads");
    let cut_at = whole.len() - 40;
    let last_line = whole[..whole.len() - 1]
        .iter()
        .rposition(|&b| b == b'\n')
        .expect("three lines")
        + 1;
    let fragment = whole[last_line..cut_at].to_vec();
    std::fs::write(&path, &whole[..cut_at]).expect("writes");
    let report = verify_chain(&path, &[]).expect("reads");
    assert_eq!(
        report.verdict,
        Verdict::Intact {
            records: 2,
            files: 1,
            first_seq: 1
        }
    );
    assert_eq!(report.torn_tail, Some(fragment.len() as u64));

    let log = open(&target);
    log.write(&entry("four")).await.expect("writes");
    drop(log);
    let torn: Vec<_> = std::fs::read_dir(dir.path())
        .expect("lists")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.to_string_lossy().contains(".torn-"))
        .collect();
    assert_eq!(torn.len(), 1, "{torn:?}");
    assert_eq!(std::fs::read(&torn[0]).expect("reads"), fragment);
    let mode = std::fs::metadata(&torn[0])
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let records = read(&path).expect("reads");
    let reasons: Vec<(Decision, &str)> = records
        .iter()
        .map(|r| (r.decision, r.reason.as_str()))
        .collect();
    assert_eq!(
        reasons[..2],
        [(Decision::Allowed, "one"), (Decision::Allowed, "two")]
    );
    assert_eq!(reasons[2].0, Decision::Recovered);
    assert!(
        reasons[2].1.contains(&format!("{} bytes", fragment.len())),
        "{}",
        reasons[2].1
    );
    assert!(reasons[2].1.contains(&sha256(&fragment)));
    assert!(reasons[2].1.contains(&*torn[0].to_string_lossy()));
    assert_eq!(reasons[3], (Decision::Allowed, "four"));
    let report = verify_chain(&path, &[]).expect("reads");
    assert!(
        matches!(report.verdict, Verdict::Intact { records: 4, .. }),
        "{report:?}"
    );
    assert_eq!(report.recoveries.len(), 1);
    assert!(
        report.recoveries[0].ends_with("is kept, unchanged)"),
        "{}",
        report.recoveries[0]
    );
    assert_eq!(report.torn_tail, None);
    // A fragment altered after the repair is named as such (the chain itself stays intact).
    std::fs::write(&torn[0], b"something else").expect("writes");
    let report = verify_chain(&path, &[]).expect("reads");
    assert!(
        report.recoveries[0].ends_with("differs from what was moved aside)"),
        "{}",
        report.recoveries[0]
    );
    std::fs::write(&torn[0], &fragment).expect("writes");
    // The fragment beside the log is not taken for a log of its own.
    assert_eq!(
        chains(&[dir.path().to_path_buf()]).expect("lists"),
        std::slice::from_ref(&path)
    );

    // An edit still breaks the chain, after the records before it.
    let text = std::fs::read_to_string(&path).expect("reads");
    std::fs::write(&path, text.replacen("\"two\"", "\"tvo\"", 1)).expect("writes");
    match verify(&path).expect("reads") {
        Verdict::Broken {
            line: 2,
            seq: Some(2),
            intact: 1,
            ..
        } => {}
        v => panic!("{v:?}"),
    }
}

/// An outcome goes out in the same write as the next record, before it, naming the record it
/// completes; with nothing after it, a flush writes it.
#[tokio::test]
async fn outcomes_ride_with_the_next_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = open(&AuditTarget::File(path.clone(), None));
    let first = log.write(&entry("ahead")).await.expect("writes");
    log.outcome(Outcome {
        of: first,
        status: Some(200),
        bytes_in: Some(10),
        bytes_out: Some(7),
        reason: None,
    });
    assert_eq!(read(&path).expect("reads").len(), 1, "an outcome waits");
    let second = log.write(&entry("next")).await.expect("writes");
    assert_eq!(second, 3);
    log.outcome(Outcome {
        of: second,
        status: Some(502),
        reason: Some("upstream connection failed".into()),
        ..Outcome::default()
    });
    log.flush().expect("flushes");
    let records = read(&path).expect("reads");
    let got: Vec<(u64, Decision, Option<u64>, Option<u16>)> = records
        .iter()
        .map(|r| (r.seq, r.decision, r.of, r.status))
        .collect();
    assert_eq!(
        got,
        [
            (1, Decision::Allowed, None, None),
            (2, Decision::Outcome, Some(1), Some(200)),
            (3, Decision::Allowed, None, None),
            (4, Decision::Outcome, Some(3), Some(502)),
        ]
    );
    assert_eq!(
        (records[1].bytes_in, records[1].bytes_out),
        (Some(10), Some(7))
    );
    assert_eq!(records[3].reason, "upstream connection failed");
    let line = std::fs::read_to_string(&path).expect("reads");
    let outcome: serde_json::Value =
        serde_json::from_str(line.lines().nth(1).expect("line")).expect("json");
    assert!(outcome.get("policy").is_none(), "{outcome}");
    assert!(matches!(
        verify(&path).expect("reads"),
        Verdict::Intact { records: 4, .. }
    ));
}

/// `sync = "data"`: a write returns only once its record is synced, and concurrent writes
/// share syncs (one serves every record written while the previous one ran).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_sync_is_shared_by_concurrent_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = open_with(&AuditTarget::File(path.clone(), None), SyncMode::Data);
    let writes = 64;
    let tasks: Vec<_> = (0..writes)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move {
                let seq = log.write(&entry(&format!("w{i}"))).await.expect("writes");
                // What the exchange would do next happens only now: the record is synced.
                assert!(log.synced_seq() >= seq, "returned before its sync");
                seq
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("joins");
    }
    let syncs = log.syncs();
    assert!(syncs >= 1, "data mode syncs");
    assert!(
        syncs < writes,
        "{syncs} syncs for {writes} concurrent records: none shared"
    );
    assert_eq!(read(&path).expect("reads").len(), 64);
    // The default mode never syncs.
    let os = open(&AuditTarget::File(dir.path().join("os.jsonl"), None));
    os.write(&entry("x")).await.expect("writes");
    assert_eq!(os.syncs(), 0);
}

/// A log file moved away under the proxy (as a log rotator does) is noticed within a second:
/// the chain continues in a new file at the path, opened with a `recovered` record, and the
/// two files verify as one chain.
#[tokio::test]
async fn a_log_moved_away_continues_in_a_new_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = open(&AuditTarget::File(path.clone(), None));
    let stop = tokio_util::sync::CancellationToken::new();
    let keeper = tokio::spawn(log.clone().keep(stop.clone()));
    log.write(&entry("before")).await.expect("writes");
    std::fs::rename(&path, dir.path().join("audit.jsonl.1")).expect("moves");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while !path.exists() {
        assert!(std::time::Instant::now() < deadline, "never reopened");
        tokio::time::sleep(FLUSH_EVERY).await;
    }
    log.write(&entry("after")).await.expect("writes");
    stop.cancel();
    keeper.await.expect("keeper ends");
    let records = read(&path).expect("reads");
    assert_eq!(records[0].decision, Decision::Recovered);
    assert!(
        records[0].reason.contains("moved or removed"),
        "{}",
        records[0].reason
    );
    assert_eq!(records[1].reason, "after");
    let report = verify_chain(&path, &[]).expect("reads");
    assert!(
        matches!(
            report.verdict,
            Verdict::Intact {
                records: 3,
                files: 2,
                ..
            }
        ),
        "{report:?}"
    );
}

/// Rotation never drops a queued outcome: each goes out in a write, before the record it rode
/// with, in whichever file that write went to; the files verify as one chain.
#[tokio::test]
async fn rotation_keeps_every_outcome() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let rotation = Rotation {
        max_bytes: 1500,
        keep: 50,
    };
    let log = open(&AuditTarget::File(path.clone(), Some(rotation)));
    for i in 0..30 {
        let seq = log.write(&entry(&format!("r{i}"))).await.expect("writes");
        log.outcome(Outcome {
            of: seq,
            status: Some(200),
            ..Outcome::default()
        });
    }
    log.flush().expect("flushes");
    let files = chain_files(&path);
    assert!(files.len() > 5, "{files:?}");
    let records: Vec<Record> = files.iter().flat_map(|f| read(f).expect("reads")).collect();
    let decided: Vec<u64> = records
        .iter()
        .filter(|r| r.decision == Decision::Allowed)
        .map(|r| r.seq)
        .collect();
    let completed: Vec<u64> = records.iter().filter_map(|r| r.of).collect();
    assert_eq!(decided, completed);
    assert!(matches!(
        verify(&path).expect("reads"),
        Verdict::Intact { records: 60, .. }
    ));
}

/// The writer lays a record out member by member: the same members, in the same order, as the
/// entry itself has, between `seq, time, node` and `policy, consent, prev`.
#[test]
fn a_record_has_every_member_of_its_entry() {
    let e = entry("x");
    let line = super::record::Line {
        seq: 1,
        time: "t",
        node: "n",
        entry: &e,
        policy: "p",
        consent: "c",
        prev: "v",
    };
    let laid: Vec<String> = match serde_json::to_value(&line).expect("serializes") {
        serde_json::Value::Object(m) => m.keys().cloned().collect(),
        _ => panic!("an object"),
    };
    let own: Vec<String> = match serde_json::to_value(&e).expect("serializes") {
        serde_json::Value::Object(m) => m.keys().cloned().collect(),
        _ => panic!("an object"),
    };
    assert_eq!(laid[..3], ["seq", "time", "node"]);
    assert_eq!(laid[3..laid.len() - 3], own[..]);
    assert_eq!(laid[laid.len() - 3..], ["policy", "consent", "prev"]);
}
