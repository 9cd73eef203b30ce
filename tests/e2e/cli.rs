//! The binary as a security engineer uses it: `explain` on every fixture, and `audit verify` /
//! `audit summary` on a log the proxy really wrote, with each kind of tampering.

use std::process::Command;

use crate::harness::{
    fixture_path, fixture_url, Env, Setup, PUSH, PUSH_SENDS, RUDDER, SECURITY, TELEMETRY_BATCHES,
};

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_consent-proxy"))
}

pub fn run(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn explain_every_fixture() {
    let cases: Vec<(Vec<String>, &[&str])> = vec![
        (vec!["--url".into(), fixture_url("security_check.url")], &["decision: stripped", "removed: query:uc, query:auc, query:tc", "/security?b=10.5.2.13608341937&be=true&db=postgres&id=dzye578hdkhnobofbhqhq5yrqf&os=linux&ut=0"]),
        (vec!["--url".into(), fixture_url("security_check_team_edition.url")], &["decision: stripped", "&ut=0"]),
        (vec!["--url".into(), fixture_url("security_bulletin.url")], &["decision: allowed", "GET https://securityupdatecheck.mattermost.com/bulletins/MMSA-2025-00421"]),
    ];
    for (args, want) in cases {
        let (code, out) = run(bin().arg("explain").args(&args));
        assert_eq!(code, 0, "{out}");
        for w in want {
            assert!(out.contains(w), "{args:?}: missing {w:?} in\n{out}");
        }
    }
    for name in TELEMETRY_BATCHES {
        let (code, out) = run(bin()
            .args([
                "explain",
                "--url",
                &format!("https://{RUDDER}/v1/batch"),
                "--header",
                "Content-Type: application/json",
                "--body",
            ])
            .arg(fixture_path(name)));
        assert_eq!(code, 0, "{out}");
        assert!(
            out.contains("decision: blocked")
                && out.contains("feature: diagnostics")
                && out.contains("at CONNECT before any TLS"),
            "{name}:\n{out}"
        );
    }
    for &name in PUSH_SENDS.iter().chain(&["push_ack.json"]) {
        let path = if name == "push_ack.json" {
            "/api/v1/ack"
        } else {
            "/api/v1/send_push"
        };
        let (code, out) = run(bin()
            .args([
                "explain",
                "--url",
                &format!("https://{PUSH}{path}"),
                "--body",
            ])
            .arg(fixture_path(name)));
        assert_eq!(code, 0, "{out}");
        assert!(
            out.contains("feature: push_notifications (consent granted)"),
            "{name}:\n{out}"
        );
        let changes = [
            "push_full.json",
            "push_generic.json",
            "push_generic_no_channel.json",
        ]
        .contains(&name);
        assert_eq!(
            out.contains("decision: stripped"),
            changes,
            "{name}:\n{out}"
        );
        assert!(
            !out.contains("Finance Planning") && !out.contains("Q3 budget"),
            "{name}: withheld data in the request as it would leave\n{out}"
        );
        let kept = if name == "push_ack.json" {
            "\"id\":\""
        } else {
            "\"device_id\":\""
        };
        assert!(out.contains(kept), "{name}: {kept} must stay\n{out}");
    }
    let (code, out) = run(bin().args(["explain", "--url", "not a url"]));
    assert_eq!(code, 2, "{out}");
}

#[tokio::test]
async fn audit_verify_and_summary_on_a_real_log() {
    let env = Env::start(Setup::default()).await;
    for q in ["uc=1", "auc=2", "tc=3"] {
        assert_eq!(
            env.curl(&[&format!("https://{SECURITY}/security?id=x&{q}")])
                .await
                .code,
            200
        );
    }
    assert_eq!(
        env.curl(&[&format!("https://{RUDDER}/v1/batch")])
            .await
            .connect,
        403
    );
    env.curl(&[
        "--http1.1",
        "-X",
        "POST",
        "--data-binary",
        "{\"message\":\"m\",\"channel_name\":\"c\"}",
        &format!("https://{PUSH}/api/v1/send_push"),
    ])
    .await;
    env.wait_for_record("push audited", |r| r["feature"] == "push_notifications")
        .await;
    let text = env.audit_text();
    env.stop().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("audit.jsonl");
    std::fs::write(&log, &text).expect("write");

    let (code, out) = run(bin().args(["audit", "verify"]).arg(&log));
    assert_eq!(code, 0, "{out}");
    // The start, four forwards and their outcomes, one refusal.
    assert!(out.contains("intact, 10 records"), "{out}");

    let (code, out) = run(bin().args(["audit", "summary"]).arg(&log));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("security_alerts") && out.contains("stripped") && out.contains("diagnostics"),
        "{out}"
    );
    let (code, out) = run(bin().args(["audit", "summary", "--json"]).arg(&log));
    assert_eq!(code, 0, "{out}");
    let summary: serde_json::Value = serde_json::from_str(&out).expect("JSON summary");
    assert_eq!(summary["decisions"]["security_alerts"]["stripped"], 3);
    assert_eq!(summary["decisions"]["diagnostics"]["blocked"], 1);
    assert_eq!(summary["decisions"]["push_notifications"]["stripped"], 1);
    let (code, out) = run(bin()
        .args([
            "audit",
            "summary",
            "--since",
            "2999-01-01T00:00:00Z",
            "--json",
        ])
        .arg(&log));
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).expect("JSON")["records"],
        0
    );

    let lines: Vec<&str> = text.lines().collect();
    let tampered: Vec<(&str, String)> = vec![
        (
            "edited",
            text.replacen("\"decision\":\"blocked\"", "\"decision\":\"allowed\"", 1),
        ),
        (
            "deleted",
            lines
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != 2)
                .map(|(_, l)| format!("{l}\n"))
                .collect(),
        ),
        ("reordered", {
            let mut l = lines.clone();
            l.swap(2, 3);
            l.join("\n") + "\n"
        }),
        ("inserted", {
            let mut l = lines.clone();
            l.insert(3, lines[2]);
            l.join("\n") + "\n"
        }),
        (
            "not JSON",
            text.replacen("{\"seq\":3", "garbage {\"seq\":3", 1),
        ),
    ];
    for (what, bad) in tampered {
        let path = dir
            .path()
            .join(format!("tampered-{}.jsonl", what.replace(' ', "-")));
        std::fs::write(&path, bad).expect("write");
        let (code, out) = run(bin().args(["audit", "verify"]).arg(&path));
        assert_eq!(code, 1, "{what} not detected: {out}");
        assert!(out.contains("broken at line"), "{what}: {out}");
    }
}
