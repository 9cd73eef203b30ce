//! Consent that follows the application: Mattermost's config.json and the policy file are
//! watched; a change takes effect for new requests on connections already open, an invalid file
//! keeps the last good consent, and every change is audited. Also report mode and sinks.

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{echo_server, fixture_body, Env, Setup, RUDDER, SECURITY, TUNNELLED};

fn batch() -> Request<Full<Bytes>> {
    Request::post("/v1/batch")
        .header("host", RUDDER)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(fixture_body(
            "telemetry_batch_plain.json",
        ))))
        .expect("request")
}

#[tokio::test]
async fn flipping_enable_diagnostics_blocks_the_next_request_on_an_open_connection() {
    let on = r#"{"LogSettings":{"EnableDiagnostics":true}}"#;
    let env = Env::start(Setup {
        policy: "[consent]\nfrom_mattermost_config = \"mm/config.json\"",
        files: &[("mm/config.json", on)],
        ..Setup::default()
    })
    .await;
    let mut conn = env.keep_alive(RUDDER).await;
    let resp = conn.send_request(batch()).await.expect("first request");
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.expect("body");

    // The admin switches diagnostics off in the System Console.
    std::fs::write(
        env.dir.path().join("mm/config.json"),
        r#"{"LogSettings":{"EnableDiagnostics":false}}"#,
    )
    .expect("write");
    let loaded = env
        .wait_for_record("diagnostics denied", |r| {
            r["decision"] == "policy_loaded"
                && r["reason"]
                    .as_str()
                    .unwrap_or("")
                    .contains("diagnostics granted -> denied")
        })
        .await;
    assert!(loaded["reason"]
        .as_str()
        .unwrap_or("")
        .starts_with("reloaded (Mattermost config changed)"));

    let resp = conn
        .send_request(batch())
        .await
        .expect("second request on the same connection");
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.headers()["x-consent-proxy"], "blocked");
    assert_eq!(
        env.upstream.requests().len(),
        1,
        "the second batch reached the upstream"
    );
    let last = env.audit().pop().expect("record");
    assert_eq!(
        (last["decision"].as_str(), last["feature"].as_str()),
        (Some("blocked"), Some("diagnostics"))
    );
    assert_eq!(
        last["consent"], loaded["consent"],
        "the block was decided under the new consent"
    );

    // A config.json that does not parse keeps the last good consent, and says so.
    std::fs::write(env.dir.path().join("mm/config.json"), "{\"LogSettings\": {").expect("write");
    env.wait_for_record("reload failure", |r| {
        r["decision"] == "error"
            && r["reason"]
                .as_str()
                .unwrap_or("")
                .contains("last good policy stays in force")
    })
    .await;
    let resp = conn.send_request(batch()).await.expect("third request");
    assert_eq!(resp.status(), 403, "the last good consent (denied) stays");
    assert!(matches!(
        consent_proxy::audit::verify_chain(&env.dir.path().join("audit.jsonl"), &[])
            .expect("reads")
            .verdict,
        consent_proxy::audit::Verdict::Intact { .. }
    ));
    env.stop().await;
}

#[tokio::test]
async fn an_open_tunnel_closes_when_its_host_becomes_a_feature() {
    let (echo, _) = echo_server().await;
    let env = Env::start(Setup {
        tunnel_to: Some(echo),
        ..Setup::default()
    })
    .await;
    let mut tcp = env.connect_tunnel(TUNNELLED).await;
    let mut buf = [0u8; 512];
    tcp.write_all(b"ping").await.expect("write");
    tcp.read_exact(&mut buf[..4]).await.expect("echo");

    let policy_path = env.dir.path().join("policy.toml");
    let mut policy = std::fs::read_to_string(&policy_path).expect("policy");
    policy.push_str(&format!(
        "\n[[feature]]\nname = \"elsewhere\"\nhosts = [\"{TUNNELLED}\"]\n"
    ));
    std::fs::write(&policy_path, policy).expect("write");
    env.wait_for_record("tunnel closed", |r| {
        r["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("open tunnel closed")
    })
    .await;
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "the tunnel is closed");
    let loaded = env
        .wait_for_record("policy loaded", |r| {
            r["decision"] == "policy_loaded"
                && r["reason"]
                    .as_str()
                    .unwrap_or("")
                    .contains("elsewhere absent -> denied")
        })
        .await;
    assert!(loaded["reason"]
        .as_str()
        .unwrap_or("")
        .starts_with("reloaded (policy file changed)"));
    env.stop().await;
}

#[tokio::test]
async fn an_invalid_policy_file_keeps_the_old_policy() {
    let env = Env::start(Setup::default()).await;
    let policy_path = env.dir.path().join("policy.toml");
    let good = std::fs::read_to_string(&policy_path).expect("policy");
    std::fs::write(&policy_path, format!("{good}\nunknown_key = 1\n")).expect("write");
    let rec = env
        .wait_for_record("reload failure", |r| r["decision"] == "error")
        .await;
    assert!(
        rec["reason"]
            .as_str()
            .unwrap_or("")
            .contains("unknown field `unknown_key`"),
        "{rec}"
    );
    let out = env
        .curl(&[&format!("https://{SECURITY}/security?id=x&uc=3")])
        .await;
    assert_eq!(out.code, 200);
    assert_eq!(env.upstream.requests()[0].path_and_query, "/security?id=x");
    env.stop().await;
}

#[tokio::test]
async fn report_mode_forwards_unchanged_and_says_what_it_would_do() {
    let env = Env::start(Setup {
        policy: "mode = \"report\"",
        ..Setup::default()
    })
    .await;
    let out = env
        .curl(&[&format!("https://{SECURITY}/security?id=x&uc=3")])
        .await;
    assert_eq!(out.code, 200);
    let mut conn = env.keep_alive(RUDDER).await;
    assert_eq!(
        conn.send_request(batch()).await.expect("batch").status(),
        200
    );
    let got = env.upstream.requests();
    assert_eq!(
        got[0].path_and_query, "/security?id=x&uc=3",
        "report mode changed the request"
    );
    assert_eq!(got[1].body, fixture_body("telemetry_batch_plain.json"));
    let audit = env.audit();
    assert_eq!(audit[0]["decision"], "would_strip");
    assert_eq!(audit[0]["removed"], serde_json::json!(["query:uc"]));
    assert_eq!(audit[1]["decision"], "would_block");
    assert_eq!(audit[1]["feature"], "diagnostics");
    // The path too leaves as it came; the record names it as the receiver routes it.
    let out = env
        .curl(&[
            "--path-as-is",
            &format!("https://{SECURITY}/x/../security?id=x&uc=3"),
        ])
        .await;
    assert_eq!(out.code, 200);
    let got = env.upstream.requests().pop().expect("forwarded");
    assert_eq!(got.path_and_query, "/x/../security?id=x&uc=3");
    assert_eq!(env.audit().pop().expect("record")["path"], "/security");
    env.stop().await;
}

#[tokio::test]
async fn a_sink_answers_200_empty_json_and_audits_blocked() {
    let policy = "[[feature]]\nname = \"diagnostics\"\nhosts = [\"pdat.matterlytics.com\"]\non_block = \"sink\"\n";
    let env = Env::start(Setup {
        policy,
        ..Setup::default()
    })
    .await;
    let mut conn = env.keep_alive(RUDDER).await;
    for _ in 0..3 {
        let resp = conn.send_request(batch()).await.expect("batch");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-consent-proxy"], "blocked");
        assert_eq!(
            resp.into_body().collect().await.expect("body").to_bytes(),
            "{}"
        );
    }
    assert_eq!(
        env.upstream
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert!(env
        .audit()
        .iter()
        .all(|r| r["decision"] == "blocked" && r["status"] == 200));
    env.stop().await;
}

#[tokio::test]
async fn the_admin_endpoint_counts_traffic_in_prometheus_text() {
    let env = Env::start(Setup {
        admin: true,
        ..Setup::default()
    })
    .await;
    let admin = env.admin().expect("admin listener");
    let get = |path: &'static str| {
        let url = format!("http://{admin}{path}");
        async move {
            let out = tokio::process::Command::new("curl")
                .args(["-sS", "--noproxy", "*", "-w", "\n%{http_code}", &url])
                .output()
                .await
                .expect("curl");
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let (body, code) = text.rsplit_once('\n').expect("status line");
            (code.to_string(), body.to_string())
        }
    };
    assert_eq!(get("/healthz").await.0, "200");
    assert_eq!(
        get("/readyz").await,
        ("200".to_string(), "ready\n".to_string())
    );

    let metric = |text: &str, name: &str, labels: &[(&str, &str)]| -> f64 {
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text parses");
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    let before = get("/metrics").await.1;
    assert_eq!(
        metric(
            &before,
            "consent_proxy_decisions_total",
            &[("feature", "security_alerts")]
        ),
        0.0
    );

    for _ in 0..2 {
        let out = env
            .curl(&[&format!("https://{SECURITY}/security?id=x&uc=1")])
            .await;
        assert_eq!(out.code, 200);
    }
    let out = env.curl(&[&format!("https://{RUDDER}/v1/batch")]).await;
    assert_eq!(out.connect, 403);

    // The two forwards' outcomes are written now, not within the next 50 ms.
    env.flush();
    let after = get("/metrics").await.1;
    assert_eq!(
        metric(
            &after,
            "consent_proxy_decisions_total",
            &[
                ("feature", "security_alerts"),
                ("decision", "stripped"),
                ("listener", "explicit")
            ]
        ),
        2.0
    );
    assert_eq!(
        metric(
            &after,
            "consent_proxy_decisions_total",
            &[("feature", "diagnostics"), ("decision", "blocked")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &after,
            "consent_proxy_connections_total",
            &[("listener", "explicit")]
        ),
        3.0
    );
    assert_eq!(
        metric(&after, "consent_proxy_leaf_cache_misses_total", &[]),
        1.0
    );
    assert_eq!(
        metric(&after, "consent_proxy_leaf_cache_hits_total", &[]),
        1.0
    );
    assert_eq!(metric(&after, "consent_proxy_leaf_cache_size", &[]), 1.0);
    // Every record: the start, two forwards and their outcomes, the refused CONNECT.
    assert_eq!(
        metric(&after, "consent_proxy_audit_records_total", &[]),
        6.0
    );
    assert_eq!(
        metric(&after, "consent_proxy_audit_write_failures_total", &[]),
        0.0
    );
    assert!(!after.contains("uc=1"), "request data in metrics");
    env.stop().await;
}

/// A consent change made while a reload is being built is never lost: the watcher compares the
/// file with the bytes it loaded, not with a read after the load. A large policy makes each load
/// take a while, and the second write lands during the load of the first.
#[tokio::test]
async fn a_change_during_a_slow_reload_is_applied_too() {
    let mut features = String::new();
    for i in 0..6000 {
        features.push_str(&format!(
            "[[feature]]\nname = \"f{i}\"\nhosts = [\"f{i}.example\"]\n  [[feature.rule]]\n  \
             remove = [\"json:$.batch[?@.event == 'e{i}'].properties.x\"]\n"
        ));
    }
    let consent = "[consent]\nsecurity_alerts = \"granted\"\ndiagnostics = \"denied\"\n";
    let policy = format!("{consent}{features}");
    let env = Env::start(Setup {
        policy: &policy,
        ..Setup::default()
    })
    .await;
    let path = env.dir.path().join("policy.toml");
    let text = std::fs::read_to_string(&path).expect("policy");
    let first = text.replace("diagnostics = \"denied\"", "diagnostics = \"granted\"");
    let second = first.replace(
        "diagnostics = \"granted\"",
        "diagnostics = \"granted\"\nwithhold = [\"activity_counts\"]",
    );
    let started = std::time::Instant::now();
    let check = consent_proxy::load(Some(&path), None).expect("loads");
    let load_time = started.elapsed();
    drop(check);
    // The watcher polls every 500 ms: the first change is being loaded by then, and the second
    // must land before that load ends.
    assert!(
        load_time > std::time::Duration::from_millis(1200),
        "the policy must take longer to load than the test's timing assumes: {load_time:?}"
    );
    std::fs::write(&path, &first).expect("write");
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    std::fs::write(&path, &second).expect("write");
    let loaded = env
        .wait_for_record("the second change in force", |r| {
            r["decision"] == "policy_loaded"
                && r["reason"]
                    .as_str()
                    .unwrap_or("")
                    .contains("withhold +activity_counts")
        })
        .await;
    let out = env
        .curl(&[
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            r#"{"batch":[{"event":"activity"},{"event":"server"}]}"#,
            &format!("https://{RUDDER}/v1/batch"),
        ])
        .await;
    assert_eq!(out.code, 200, "{out:?}");
    let last = env.audit().pop().expect("record");
    assert_eq!(last["decision"], "stripped");
    assert_eq!(last["consent"], loaded["consent"]);
    env.stop().await;
}
