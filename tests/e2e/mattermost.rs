//! Every Mattermost fixture through the proxy, for the default consent and for each feature
//! denied and granted: what arrived upstream, and what the audit log says.

use serde_json::Value;

use crate::harness::{
    fixture_body, fixture_url, Env, Setup, PUSH, PUSH_SENDS, RUDDER, SEGMENT, SENTRY,
    TELEMETRY_BATCHES,
};

async fn post(
    env: &Env,
    host: &str,
    path: &str,
    body_fixture: &str,
    extra: &[&str],
) -> crate::harness::Curl {
    // As Mattermost sends it: the fixture without the file's trailing newline.
    let file = env.dir.path().join(body_fixture);
    std::fs::write(&file, fixture_body(body_fixture)).expect("write body");
    let body = format!("@{}", file.display());
    let target = format!("https://{host}{path}");
    let mut args = vec![
        "--http1.1",
        "-X",
        "POST",
        "--data-binary",
        &body,
        "-H",
        "Content-Type:",
        "-H",
        "User-Agent: Mattermost-Bot/1.1",
    ];
    args.extend_from_slice(extra);
    args.push(&target);
    env.curl(&args).await
}

#[tokio::test]
async fn security_check_leaves_without_counts_by_default() {
    let env = Env::start(Setup::default()).await;
    for (name, expected) in [
        ("security_check.url", "/security?b=10.5.2.13608341937&be=true&db=postgres&id=dzye578hdkhnobofbhqhq5yrqf&os=linux&ut=0"),
        ("security_check_team_edition.url", "/security?b=10.2.1.11791625337&be=false&db=mysql&id=h6414jffbk5sfgbey14i8dxedw&os=linux&ut=0"),
        ("security_bulletin.url", "/bulletins/MMSA-2025-00421"),
    ] {
        let out = env.curl(&[&fixture_url(name)]).await;
        assert_eq!(out.code, 200, "{name}: {out:?}");
        let got = env.upstream.requests().pop().expect("upstream got the request");
        assert_eq!(got.path_and_query, expected, "{name}");
        assert_eq!(got.method, "GET");
    }
    let audit = env.audit();
    assert_eq!(audit.len(), 3);
    assert_eq!(audit[0]["decision"], "stripped");
    assert_eq!(audit[0]["feature"], "security_alerts");
    assert_eq!(audit[0]["reason"], "withheld: activity_counts");
    assert_eq!(
        audit[0]["removed"],
        serde_json::json!(["query:uc", "query:auc", "query:tc"])
    );
    assert_eq!(audit[0]["path"], "/security");
    assert_eq!(audit[0]["status"], 200);
    assert_eq!(audit[2]["decision"], "allowed");
    for secret in ["auc=58", "uc=212", "dzye578hdkhnobofbhqhq5yrqf"] {
        assert!(!env.audit_text().contains(secret), "{secret} in audit log");
    }
    env.stop().await;
}

#[tokio::test]
async fn security_check_denied_is_refused_at_connect() {
    let env = Env::start(Setup {
        policy: "[consent]\npush_notifications = \"granted\"",
        ..Setup::default()
    })
    .await;
    let out = env.curl(&[&fixture_url("security_check.url")]).await;
    assert_eq!(out.connect, 403, "{out:?}");
    assert_eq!(
        env.upstream
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    let audit = env.audit();
    assert_eq!(audit[0]["decision"], "blocked");
    assert_eq!(audit[0]["method"], "CONNECT");
    assert_eq!(audit[0]["feature"], "security_alerts");
    env.stop().await;
}

#[tokio::test]
async fn diagnostics_are_refused_at_connect_by_default() {
    let env = Env::start(Setup::default()).await;
    for (host, path) in [
        (RUDDER, "/v1/batch"),
        (SEGMENT, "/v1/batch"),
        (SENTRY, "/api/5212327/envelope/"),
    ] {
        let out = post(&env, host, path, "telemetry_batch_enterprise.json", &[]).await;
        assert_eq!(out.connect, 403, "{host}: {out:?}");
        assert_ne!(out.exit, 0);
    }
    assert_eq!(
        env.upstream
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "upstream saw a connection"
    );
    let audit = env.audit();
    assert_eq!(audit.len(), 3);
    assert!(audit.iter().all(|r| r["decision"] == "blocked"
        && r["feature"] == "diagnostics"
        && r["status"] == 403));
    env.stop().await;
}

#[tokio::test]
async fn a_blocked_connect_answers_with_the_json_body() {
    let env = Env::start(Setup::default()).await;
    let mut tcp = tokio::net::TcpStream::connect(env.proxy)
        .await
        .expect("connect");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(
        format!("CONNECT {RUDDER}:443 HTTP/1.1\r\nHost: {RUDDER}:443\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tcp.read(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("x-consent-proxy: blocked"),
        "{text}"
    );
    let body: Value =
        serde_json::from_str(text.split("\r\n\r\n").nth(1).expect("body")).expect("JSON body");
    assert_eq!(body["feature"], "diagnostics");
    assert_eq!(body["reason"], "consent denied");
    assert!(body["error"].is_string());
    env.stop().await;
}

/// Telemetry events whose removal each category implies.
fn events(body: &[u8]) -> Vec<String> {
    let v: Value = serde_json::from_slice(body).expect("JSON");
    v["batch"]
        .as_array()
        .expect("batch")
        .iter()
        .map(|m| {
            m["event"]
                .as_str()
                .unwrap_or(m["type"].as_str().unwrap_or(""))
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn diagnostics_granted_strips_withheld_batch_items() {
    let policy = "[consent]\ndiagnostics = \"granted\"\nwithhold = [\"server_identifier\", \"activity_counts\", \"configuration\", \"license_info\", \"versions_and_components\", \"enterprise_features\"]";
    let env = Env::start(Setup {
        policy,
        ..Setup::default()
    })
    .await;
    for name in TELEMETRY_BATCHES {
        let sent = fixture_body(name);
        let out = post(
            &env,
            RUDDER,
            "/v1/batch",
            name,
            &["-H", "Content-Type: application/json"],
        )
        .await;
        assert_eq!(out.code, 200, "{name}: {out:?}");
        let got = env
            .upstream
            .requests()
            .pop()
            .expect("upstream got the batch");
        let left = events(&got.body);
        let original = events(&sent);
        assert!(original.len() > left.len(), "{name}: nothing removed");
        for e in &left {
            // Every event of this consent is classified: only the identify calls are left.
            assert!(
                e == "identify" || e.is_empty(),
                "{name}: {e} should have been removed"
            );
        }
        let text = String::from_utf8_lossy(&got.body);
        assert!(
            !text.contains("userId") && !text.contains("anonymousId"),
            "{name}: server id left"
        );
        assert_eq!(
            got.headers["content-length"],
            got.body.len().to_string().as_str()
        );
        let v: Value = serde_json::from_slice(&got.body).expect("still JSON");
        assert!(v["messageId"].is_string() && v["sentAt"].is_string());
    }
    let audit = env.audit();
    assert!(audit.iter().all(|r| r["decision"] == "stripped"));
    let removed: Vec<&str> = audit[0]["removed"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    assert!(
        removed.contains(&"json:$['batch'][0]['userId']"),
        "{removed:?}"
    );
    assert!(
        removed
            .iter()
            .all(|s| s.starts_with("json:$['batch']") || s.starts_with("json:$.batch")),
        "{removed:?}"
    );
    env.stop().await;
}

#[tokio::test]
async fn diagnostics_granted_with_nothing_withheld_is_byte_identical() {
    let env = Env::start(Setup {
        policy: "[consent]\ndiagnostics = \"granted\"",
        ..Setup::default()
    })
    .await;
    let out = post(
        &env,
        RUDDER,
        "/v1/batch",
        "telemetry_batch_enterprise.json",
        &["-H", "Content-Type: application/json"],
    )
    .await;
    assert_eq!(out.code, 200, "{out:?}");
    assert_eq!(
        env.upstream.requests()[0].body,
        fixture_body("telemetry_batch_enterprise.json")
    );
    assert_eq!(env.audit()[0]["decision"], "allowed");
    env.stop().await;
}

#[tokio::test]
async fn push_leaves_without_content_or_names_by_default() {
    let env = Env::start(Setup::default()).await;
    for name in PUSH_SENDS {
        let sent = fixture_body(name);
        let out = post(&env, PUSH, "/api/v1/send_push", name, &[]).await;
        assert_eq!(out.code, 200, "{name}: {out:?}");
        assert_eq!(out.body, "{\"status\":\"OK\"}");
        let got = env
            .upstream
            .requests()
            .pop()
            .expect("upstream got the push");
        assert!(
            got.headers.get("content-type").is_none(),
            "{name}: no Content-Type was sent, none may be added"
        );
        assert_eq!(
            got.headers["content-length"],
            got.body.len().to_string().as_str(),
            "{name}"
        );
        let mut want: Value = serde_json::from_slice(&sent).expect("fixture JSON");
        let obj = want.as_object_mut().expect("object");
        if obj.contains_key("message") {
            obj.insert(
                "message".into(),
                Value::String("You've received a new message.".into()),
            );
        }
        for k in [
            "channel_name",
            "sender_name",
            "override_username",
            "override_icon_url",
        ] {
            obj.shift_remove(k);
        }
        let got_json: Value = serde_json::from_slice(&got.body).expect("upstream got JSON");
        assert_eq!(got_json, want, "{name}");
        // Fields the push service needs are byte-identical, in place.
        let sent_text = String::from_utf8(sent).expect("utf-8");
        let got_text = String::from_utf8(got.body.to_vec()).expect("utf-8");
        for key in ["ack_id", "platform", "server_id", "device_id", "signature"] {
            let field =
                crate::bad_input::raw_member(&sent_text, key).expect("fixture has the field");
            assert!(got_text.contains(&field), "{name}: {key} changed");
        }
    }
    let audit = env.audit();
    assert_eq!(audit[0]["decision"], "stripped");
    assert_eq!(
        audit[0]["replaced"],
        serde_json::json!(["json:$['message']"])
    );
    assert_eq!(
        audit[0]["removed"],
        serde_json::json!(["json:$['channel_name']", "json:$['sender_name']"])
    );
    assert_eq!(
        audit[0]["reason"],
        "withheld: message_content, channel_names, user_names"
    );
    let text = env.audit_text();
    for secret in ["Finance Planning", "@jsmith", "Q3 budget"] {
        assert!(!text.contains(secret), "{secret} in audit log");
        assert!(
            !crate::harness::diagnostics().contains(secret),
            "{secret} in diagnostics"
        );
    }

    // The ack carries none of the withheld fields: it leaves byte-identical.
    let out = post(&env, PUSH, "/api/v1/ack", "push_ack.json", &[]).await;
    assert_eq!(out.code, 200);
    assert_eq!(
        env.upstream.requests().pop().expect("ack").body,
        fixture_body("push_ack.json")
    );
    assert_eq!(env.audit().last().expect("record")["decision"], "allowed");
    env.stop().await;
}

#[tokio::test]
async fn push_denied_is_refused_at_connect() {
    let env = Env::start(Setup {
        policy: "[consent]\nsecurity_alerts = \"granted\"",
        ..Setup::default()
    })
    .await;
    let out = post(&env, PUSH, "/api/v1/send_push", "push_full.json", &[]).await;
    assert_eq!(out.connect, 403, "{out:?}");
    assert_eq!(
        env.upstream
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    env.stop().await;
}

#[tokio::test]
async fn push_granted_with_nothing_withheld_is_byte_identical() {
    let env = Env::start(Setup {
        policy: "[consent]\npush_notifications = \"granted\"",
        ..Setup::default()
    })
    .await;
    let out = post(&env, PUSH, "/api/v1/send_push", "push_full.json", &[]).await;
    assert_eq!(out.code, 200, "{out:?}");
    assert_eq!(
        env.upstream.requests()[0].body,
        fixture_body("push_full.json")
    );
    env.stop().await;
}
