use std::io;
use std::path::Path;

use prometheus_client::metrics::gauge::Gauge;

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
