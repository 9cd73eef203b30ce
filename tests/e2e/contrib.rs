//! The operator's files in `contrib/`: the Prometheus alert rules pass `promtool check rules`,
//! and every metric the rules and the Grafana dashboard name is one a running proxy exports.

use std::collections::BTreeSet;
use std::path::Path;

use crate::harness::{fixture_body, Env, Setup, PUSH, SECURITY};

const ALERTS: &str = "contrib/prometheus/alerts.yml";
const DASHBOARD: &str = "contrib/grafana/consent-proxy.json";

fn read(file: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file))
        .unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// The `consent_proxy_…` names a PromQL text mentions.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("consent_proxy_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn the_alert_rules_pass_promtool() {
    let promtool = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(ALERTS))
        .output();
    match promtool {
        Ok(out) => assert!(
            out.status.success(),
            "promtool check rules failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("promtool (Debian's prometheus package) is required under CI: {e}")
        }
        Err(_) => eprintln!("skipped: no promtool (apt install prometheus)"),
    }
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_rules_name_is_exported() {
    let dashboard: serde_json::Value = serde_json::from_str(&read(DASHBOARD)).expect("JSON");
    let mut exprs = String::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push_str(target["expr"].as_str().unwrap_or_default());
            exprs.push('\n');
        }
    }
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    for var in variables {
        exprs.push_str(var["definition"].as_str().unwrap_or_default());
    }
    assert!(
        variables.iter().any(|v| v["name"] == "node"),
        "the dashboard has a node variable"
    );
    let mut wanted = metric_names(&exprs);
    let from_dashboard = wanted.len();
    wanted.extend(metric_names(&read(ALERTS)));
    assert!(from_dashboard >= 15, "{wanted:?}");

    // A proxy that has done a bit of everything the metrics count: intercepted requests (one
    // carrying a name the pack does not know, one with a body), and a reload.
    let env = Env::start(Setup {
        policy: "[consent]\nsecurity_alerts = \"granted\"\npush_notifications = \"granted\"",
        admin: true,
        ..Setup::default()
    })
    .await;
    let out = env
        .curl(&[&format!("https://{SECURITY}/security?id=x&nx=1")])
        .await;
    assert_eq!(out.code, 200, "{out:?}");
    let body = env.dir.path().join("push.json");
    std::fs::write(&body, fixture_body("push_full.json")).expect("write");
    let data = format!("@{}", body.display());
    let out = env
        .curl(&[
            "-X",
            "POST",
            "--data-binary",
            &data,
            &format!("https://{PUSH}/api/v1/send_push"),
        ])
        .await;
    assert_eq!(out.code, 200, "{out:?}");
    let policy = env.dir.path().join("policy.toml");
    let text = std::fs::read_to_string(&policy).expect("policy");
    let denied = text.replace(
        "push_notifications = \"granted\"",
        "push_notifications = \"denied\"",
    );
    assert_ne!(denied, text);
    std::fs::write(&policy, denied).expect("write");
    env.flush();
    // The file is polled: the reload is counted within a few seconds.
    let admin = env.admin().expect("admin");
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = crate::fleet::http_get(admin, "/metrics").await;
        if metrics.contains("consent_proxy_policy_reloads_total") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The new ones count what happened: two intercepted connections, two requests, ready.
    for line in [
        "consent_proxy_tls_handshakes_total{outcome=\"ok\"} 2",
        "consent_proxy_request_duration_seconds_count 2",
        "consent_proxy_ready 1",
        "consent_proxy_leaf_mint_failures_total 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in\n{metrics}"
        );
    }
    let exported: BTreeSet<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|name| !exported.contains(name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "named in contrib/ but not exported: {missing:?}\n{metrics}"
    );
    env.stop().await;
}
