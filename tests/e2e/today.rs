//! The pack against what today's Mattermost sends (../shared/research/mattermost-reality.md):
//! plugin telemetry and the events the pack once missed, the other Rudder endpoints, Sentry
//! envelopes, push names and notices, and the hosts of the functions an admin uses. Each shape
//! goes through the proxy over real TLS to a recording upstream; the audit log is read too.

use serde_json::Value;

use crate::harness::{
    fixture, fixture_body, Env, Setup, CUSTOMERS, GITHUB, MARKETPLACE, NOTICES, PUSH, RUDDER,
    SECURITY, SENTRY,
};

/// POST `body` to `https://host/path` as Mattermost's Go clients do (no Content-Type unless
/// given in `extra`).
async fn post_bytes(
    env: &Env,
    host: &str,
    path: &str,
    body: &[u8],
    extra: &[&str],
) -> crate::harness::Curl {
    let file = env.dir.path().join(format!("body-{}", body.len()));
    std::fs::write(&file, body).expect("write body");
    let data = format!("@{}", file.display());
    let target = format!("https://{host}{path}");
    let mut args = vec![
        "--http1.1",
        "-X",
        "POST",
        "--data-binary",
        &data,
        "-H",
        "Content-Type:",
    ];
    args.extend_from_slice(extra);
    args.push(&target);
    env.curl(&args).await
}

fn removed(record: &Value) -> Vec<String> {
    record["removed"]
        .as_array()
        .expect("removed")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

/// Neither the upstream nor the audit log saw any of `secrets`.
fn gone(env: &Env, upstream_body: &[u8], secrets: &[&str]) {
    let body = String::from_utf8_lossy(upstream_body);
    let audit = env.audit_text();
    for secret in secrets {
        assert!(!body.contains(secret), "{secret} reached the upstream");
        assert!(!audit.contains(secret), "{secret} in the audit log");
    }
}

#[tokio::test]
async fn plugin_telemetry_and_the_events_once_missed_leave_as_their_categories_say() {
    // The default withholding (user_identifiers, site_identity among them), diagnostics granted.
    let env = Env::start(Setup {
        policy: "[consent]\ndiagnostics = \"granted\"\n\
                 withhold = [\"activity_counts\", \"configuration\", \"user_identifiers\", \"site_identity\"]",
        ..Setup::default()
    })
    .await;
    let nps = fixture_body("telemetry_batch_nps.json");
    let out = post_bytes(
        &env,
        RUDDER,
        "/v1/batch",
        &nps,
        &["-H", "Content-Type: application/json"],
    )
    .await;
    assert_eq!(out.code, 200, "{out:?}");
    let got = env.upstream.requests().pop().expect("the batch left");
    let v: Value = serde_json::from_slice(&got.body).expect("JSON");
    assert_eq!(
        v["batch"],
        serde_json::json!([]),
        "the survey names its user"
    );
    gone(
        &env,
        &got.body,
        &[
            "jane.doe@acme.example",
            "Q3 budget",
            "bbi66m8n6bcr911dnwrfm67s6i",
        ],
    );
    let record = env.audit().pop().expect("record");
    assert_eq!(record["decision"], "stripped");
    assert_eq!(
        record["reason"],
        "withheld: activity_counts, user_identifiers"
    );

    // The events of older and ad hoc lines, and `plugins`: each under its category.
    let older = fixture_body("telemetry_batch_older_events.json");
    let out = post_bytes(&env, RUDDER, "/v1/batch", &older, &[]).await;
    assert_eq!(out.code, 200, "{out:?}");
    let got = env.upstream.requests().pop().expect("the batch left");
    let v: Value = serde_json::from_slice(&got.body).expect("JSON");
    let events: Vec<&str> = v["batch"]
        .as_array()
        .expect("batch")
        .iter()
        .filter_map(|e| e["event"].as_str())
        .collect();
    // `server` stays (versions are granted) without its count of system admins.
    assert_eq!(events, ["server"]);
    assert!(v["batch"][0]["properties"].get("system_admins").is_none());
    assert_eq!(v["batch"][0]["properties"]["version"], "10.5.2");
    env.stop().await;
}

#[tokio::test]
async fn other_rudder_endpoints_are_read_or_refused() {
    let env = Env::start(Setup {
        policy: "[consent]\ndiagnostics = \"granted\"\nwithhold = [\"activity_counts\"]",
        ..Setup::default()
    })
    .await;
    let batch = fixture_body("telemetry_batch_plain.json");
    // The batch shape on its other endpoints: read like /v1/batch.
    for path in ["/beacon/v1/batch", "/v1/import"] {
        let out = post_bytes(&env, RUDDER, path, &batch, &[]).await;
        assert_eq!(out.code, 200, "{path}: {out:?}");
        let got = env.upstream.requests().pop().expect("left");
        assert_eq!(got.path_and_query, path);
        assert!(
            !String::from_utf8_lossy(&got.body).contains("\"activity\""),
            "{path}"
        );
    }
    // One message per request: no rule reads them, so they do not leave while a category is
    // withheld.
    let before = env.upstream.requests().len();
    let track = br#"{"userId":"h6414jffbk5sfgbey14i8dxedw","event":"activity","properties":{"posts":6120}}"#;
    for path in ["/v1/track", "/v1/identify", "/v1/page"] {
        let out = post_bytes(&env, RUDDER, path, track, &[]).await;
        assert_eq!(out.code, 403, "{path}: {out:?}");
    }
    assert_eq!(
        env.upstream.requests().len(),
        before,
        "a refused message left"
    );
    let record = env.audit().pop().expect("record");
    assert_eq!(record["decision"], "blocked");
    assert_eq!(record["feature"], "diagnostics");
    assert!(
        record["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no rule")),
        "{record}"
    );
    env.stop().await;

    // Nothing withheld: nothing to enforce, and they leave.
    let env = Env::start(Setup {
        policy: "[consent]\ndiagnostics = \"granted\"",
        ..Setup::default()
    })
    .await;
    let out = post_bytes(&env, RUDDER, "/v1/track", track, &[]).await;
    assert_eq!(out.code, 200, "{out:?}");
    assert_eq!(env.audit().pop().expect("record")["decision"], "allowed");
    env.stop().await;
}

/// Split an envelope as Sentry's Relay reads it: each item's header and its framed payload.
fn envelope(body: &[u8]) -> (Value, Vec<(Value, Value)>) {
    let text = std::str::from_utf8(body).expect("utf-8");
    let (header, mut rest) = text.split_once('\n').expect("header line");
    let mut items = Vec::new();
    while !rest.is_empty() {
        let (item, after) = rest.split_once('\n').expect("item header");
        let item: Value = serde_json::from_str(item).expect("item header JSON");
        let len = item["length"].as_u64().expect("length") as usize;
        let payload: Value = serde_json::from_str(&after[..len]).expect("payload JSON");
        rest = after[len..].strip_prefix('\n').unwrap_or(&after[len..]);
        items.push((item, payload));
    }
    (serde_json::from_str(header).expect("header JSON"), items)
}

#[tokio::test]
async fn sentry_reports_leave_without_the_host_name_and_the_request_url() {
    let sent = fixture("sentry_envelope.txt");
    for (withhold, kept_modules) in [
        ("\"user_identifiers\", \"site_identity\"", true),
        ("\"site_identity\", \"versions_and_components\"", false),
    ] {
        let policy = format!("[consent]\ndiagnostics = \"granted\"\nwithhold = [{withhold}]");
        let env = Env::start(Setup {
            policy: &policy,
            ..Setup::default()
        })
        .await;
        let out = post_bytes(
            &env,
            SENTRY,
            "/api/5212327/envelope/",
            &sent,
            &["-H", "Content-Type: application/x-sentry-envelope"],
        )
        .await;
        assert_eq!(out.code, 200, "{withhold}: {out:?}");
        let got = env.upstream.requests().pop().expect("the report left");
        let (header, items) = envelope(&got.body);
        assert_eq!(items.len(), 1);
        let (item, event) = &items[0];
        assert_eq!(item["type"], "event");
        assert!(event.get("server_name").is_none(), "{withhold}");
        assert!(event["request"].get("url").is_none(), "{withhold}");
        assert_eq!(event["request"]["method"], "GET");
        assert_eq!(event["exception"][0]["type"], "*errors.errorString");
        assert_eq!(event.get("modules").is_some(), kept_modules, "{withhold}");
        assert_eq!(
            header["trace"].get("release").is_some(),
            kept_modules,
            "{withhold}"
        );
        assert_eq!(
            got.headers["content-length"],
            got.body.len().to_string().as_str()
        );
        gone(
            &env,
            &got.body,
            &["chat-prod-01", "jane.doe@acme.example", "chat.acme.example"],
        );
        let record = env.audit().pop().expect("record");
        assert_eq!(record["decision"], "stripped");
        let removed = removed(&record);
        assert!(
            removed.contains(&"envelope.items[0]:json:$['server_name']".to_string()),
            "{removed:?}"
        );
        env.stop().await;
    }

    // An attachment the rules cannot read refuses the report: nothing leaves.
    let env = Env::start(Setup {
        policy: "[consent]\ndiagnostics = \"granted\"\nwithhold = [\"site_identity\"]",
        ..Setup::default()
    })
    .await;
    let mut with_attachment = sent.clone();
    with_attachment.extend_from_slice(b"{\"type\":\"attachment\",\"length\":13}\nchat-prod-01\n\n");
    let out = post_bytes(
        &env,
        SENTRY,
        "/api/5212327/envelope/",
        &with_attachment,
        &["-H", "Content-Type: application/x-sentry-envelope"],
    )
    .await;
    assert_eq!(out.code, 415, "{out:?}");
    assert!(env.upstream.requests().is_empty());
    let record = env.audit().pop().expect("record");
    assert_eq!(record["decision"], "blocked");
    assert_eq!(
        record["reason"],
        "Sentry envelope has an item the rules cannot read"
    );
    env.stop().await;
}

#[tokio::test]
async fn push_names_and_notices() {
    // Names withheld, content granted (a hand-written consent).
    let env = Env::start(Setup {
        policy: "[consent]\npush_notifications = \"granted\"\nwithhold = [\"user_names\"]",
        ..Setup::default()
    })
    .await;
    let send = |name: &'static str| {
        let env = &env;
        async move {
            let body = fixture_body(name);
            let out = post_bytes(
                env,
                PUSH,
                "/api/v1/send_push",
                &body,
                &[
                    "-H",
                    "X-Mattermost-Auth: hpns-token-invented",
                    "-H",
                    "X-Mattermost-ServerID: dzye578hdkhnobofbhqhq5yrqf",
                ],
            )
            .await;
            assert_eq!(out.code, 200, "{name}: {out:?}");
            let got = env.upstream.requests().pop().expect("the push left");
            let v: Value = serde_json::from_slice(&got.body).expect("JSON");
            (got, v)
        }
    };
    let (_, full) = send("push_full.json").await;
    assert_eq!(full["message"], "You've received a new message.");
    assert!(full.get("channel_name").is_none() && full.get("sender_name").is_none());
    // A call from Calls: the caller's name goes; `transport` stays.
    let (got, voip) = send("push_voip.json").await;
    assert_eq!(voip["message"], "You've received a new message.");
    assert!(
        voip.get("channel_name").is_none(),
        "a DM's channel name is a user's name"
    );
    assert_eq!(voip["transport"], "voip");
    assert_eq!(got.headers["x-mattermost-auth"], "hpns-token-invented");
    assert_eq!(
        got.headers["x-mattermost-serverid"],
        "dzye578hdkhnobofbhqhq5yrqf"
    );
    gone(&env, &got.body, &["Alice Smith", "alice.smith"]);
    // The session notice keeps its own text.
    let (_, session) = send("push_session.json").await;
    let sent: Value = serde_json::from_slice(&fixture_body("push_session.json")).expect("JSON");
    assert_eq!(session, sent);
    let audit = env.audit();
    assert_eq!(audit[0]["reason"], "withheld: user_names");
    assert_eq!(audit.last().expect("record")["decision"], "allowed");
    env.stop().await;

    // The default consent: the session notice leaves without the site's name; content withheld
    // does not turn it into "a new message".
    let env = Env::start(Setup::default()).await;
    let body = fixture_body("push_session.json");
    let out = post_bytes(&env, PUSH, "/api/v1/send_push", &body, &[]).await;
    assert_eq!(out.code, 200, "{out:?}");
    let got = env.upstream.requests().pop().expect("the push left");
    let v: Value = serde_json::from_slice(&got.body).expect("JSON");
    assert_eq!(
        v["message"],
        "Session Expired: Please log in to continue receiving notifications."
    );
    gone(&env, &got.body, &["Acme Chat"]);
    let record = env.audit().pop().expect("record");
    assert_eq!(record["reason"], "withheld: site_identity");
    assert_eq!(record["replaced"], serde_json::json!(["json:$['message']"]));
    let test_push = br#"{"ack_id":"t1","platform":"android_rn-v2","server_id":"s1","device_id":"d1","message":"Test notification from Mattermost","type":"test","version":"2"}"#;
    let out = post_bytes(&env, PUSH, "/api/v1/send_push", test_push, &[]).await;
    assert_eq!(out.code, 200, "{out:?}");
    let got = env.upstream.requests().pop().expect("the push left");
    assert_eq!(&got.body[..], &test_push[..], "a test push keeps its text");
    env.stop().await;
}

#[tokio::test]
async fn the_security_check_of_v11_leaves_without_ut_when_versions_are_withheld() {
    let env = Env::start(Setup {
        policy:
            "[consent]\nsecurity_alerts = \"granted\"\nwithhold = [\"versions_and_components\"]",
        ..Setup::default()
    })
    .await;
    let url = String::from_utf8(fixture("security_check_v11.url")).expect("utf-8");
    let out = env.curl(&[url.trim()]).await;
    assert_eq!(out.code, 200, "{out:?}");
    let got = env.upstream.requests().pop().expect("left");
    assert_eq!(
        got.path_and_query,
        "/security?auc=31&id=dzye578hdkhnobofbhqhq5yrqf&tc=2&uc=96"
    );
    env.stop().await;
}

#[tokio::test]
async fn the_functions_an_admin_uses_are_features_granted_and_recorded() {
    let env = Env::start(Setup::default()).await;
    let get = |url: String| {
        let env = &env;
        async move { env.curl(&[&url]).await }
    };
    // Product notices, the Marketplace, the latest-version look-up: granted, nothing withheld
    // they carry, recorded by feature.
    for (url, feature) in [
        (format!("https://{NOTICES}/"), "product_notices"),
        (
            format!("https://{MARKETPLACE}/api/v1/plugins?page=0&per_page=100&server_version=11.6.0&build_enterprise_ready=true&enterprise_plugins=true&cloud=false&platform=linux-amd64"),
            "marketplace",
        ),
        (
            format!("https://{GITHUB}/repos/mattermost/mattermost-server/releases/latest"),
            "upgrade_checks",
        ),
    ] {
        let out = get(url.clone()).await;
        assert_eq!(out.code, 200, "{url}: {out:?}");
        let record = env.audit().pop().expect("record");
        assert_eq!(record["feature"], feature, "{url}");
        assert_eq!(record["decision"], "allowed", "{url}");
    }
    assert!(env
        .upstream
        .requests()
        .iter()
        .any(|r| r.path_and_query.contains("enterprise_plugins=true")));
    // Another GitHub path belongs to no feature: forwarded as it came, recorded as such.
    let out = get(format!("https://{GITHUB}/repos/acme/tools/issues")).await;
    assert_eq!(out.code, 200, "{out:?}");
    let record = env.audit().pop().expect("record");
    assert_eq!(record["decision"], "tunneled");
    assert!(record["feature"].is_null());

    // A trial request: the admin's name and e-mail and the site leave under the default.
    let trial = br#"{"server_id":"dzye578hdkhnobofbhqhq5yrqf","name":"Jane Doe","email":"jane.doe@acme.example","site_url":"https://chat.acme.example","site_name":"Acme Chat","users":96,"terms_accepted":true,"receive_emails_accepted":false,"contact_name":"Jane Doe","contact_email":"jane.doe@acme.example","company_name":"Acme GmbH","company_country":"DE","company_size":"100-500","server_version":"11.6.0"}"#;
    let out = post_bytes(
        &env,
        CUSTOMERS,
        "/api/v1/trials",
        trial,
        &["-H", "Content-Type: application/json"],
    )
    .await;
    assert_eq!(out.code, 200, "{out:?}");
    let got = env.upstream.requests().pop().expect("left");
    let v: Value = serde_json::from_slice(&got.body).expect("JSON");
    assert_eq!(v["server_id"], "dzye578hdkhnobofbhqhq5yrqf");
    assert_eq!(v["server_version"], "11.6.0");
    assert!(
        v.get("users").is_none(),
        "activity_counts is withheld by default"
    );
    gone(
        &env,
        &got.body,
        &[
            "Jane Doe",
            "jane.doe@acme.example",
            "chat.acme.example",
            "Acme",
        ],
    );
    let record = env.audit().pop().expect("record");
    assert_eq!(record["feature"], "licensing");
    assert_eq!(
        record["reason"],
        "withheld: user_identifiers, site_identity, activity_counts"
    );
    env.stop().await;
}

#[tokio::test]
async fn functions_follow_their_config_json_switches() {
    let mm = r#"{"PluginSettings":{"EnableMarketplace":false},"AnnouncementSettings":{"AdminNoticesEnabled":false,"UserNoticesEnabled":false}}"#;
    let env = Env::start(Setup {
        policy: "[consent]\nfrom_mattermost_config = \"mm/config.json\"",
        files: &[("mm/config.json", mm)],
        ..Setup::default()
    })
    .await;
    for host in [MARKETPLACE, NOTICES] {
        let out = env.curl(&[&format!("https://{host}/")]).await;
        assert_eq!(out.connect, 403, "{host}: {out:?}");
    }
    // With the switches as Mattermost ships them, the security check still works as before.
    let out = env
        .curl(&[&format!("https://{SECURITY}/security?id=x&ut=0")])
        .await;
    assert_eq!(out.code, 200, "{out:?}");
    let audit = env.audit();
    assert_eq!(audit[0]["feature"], "marketplace");
    assert_eq!(audit[0]["decision"], "blocked");
    assert_eq!(audit[1]["feature"], "product_notices");
    env.stop().await;
}

/// The Sentry fixture with one more member in its event, framed again.
fn sentry_with(member: &str, value: Value) -> Vec<u8> {
    let sent = fixture("sentry_envelope.txt");
    let text = std::str::from_utf8(&sent).expect("utf-8");
    let mut lines = text.lines();
    let header = lines.next().expect("header");
    lines.next();
    let mut event: Value = serde_json::from_str(lines.next().expect("event")).expect("JSON");
    event[member] = value;
    let event = serde_json::to_string(&event).expect("JSON");
    format!(
        "{header}\n{{\"type\":\"event\",\"length\":{}}}\n{event}\n",
        event.len()
    )
    .into_bytes()
}

/// Every fixture, as Mattermost sends it, is what the pack knows: nothing is unclassified.
#[tokio::test]
async fn the_fixtures_as_they_are_carry_nothing_unclassified() {
    let env = Env::start(Setup {
        policy: "[consent]\nsecurity_alerts = \"granted\"\ndiagnostics = \"granted\"\n\
                 push_notifications = \"granted\"\nunclassified = \"block\"",
        ..Setup::default()
    })
    .await;
    let json = ["-H", "Content-Type: application/json"];
    let mut sent = 0;
    for name in [
        "telemetry_batch_enterprise.json",
        "telemetry_batch_plain.json",
        "telemetry_batch_legacy_config_events.json",
        "telemetry_batch_nps.json",
        "telemetry_batch_older_events.json",
    ] {
        let out = post_bytes(&env, RUDDER, "/v1/batch", &fixture_body(name), &json).await;
        assert_eq!(out.code, 200, "{name}: {out:?}");
        sent += 1;
    }
    for name in [
        "push_full.json",
        "push_generic.json",
        "push_generic_no_channel.json",
        "push_id_loaded.json",
        "push_clear.json",
        "push_session.json",
        "push_voip.json",
    ] {
        let out = post_bytes(&env, PUSH, "/api/v1/send_push", &fixture_body(name), &[]).await;
        assert_eq!(out.code, 200, "{name}: {out:?}");
        sent += 1;
    }
    let out = post_bytes(
        &env,
        PUSH,
        "/api/v1/ack",
        &fixture_body("push_ack.json"),
        &[],
    )
    .await;
    assert_eq!(out.code, 200, "{out:?}");
    let envelope = ["-H", "Content-Type: application/x-sentry-envelope"];
    let out = post_bytes(
        &env,
        SENTRY,
        "/api/5212327/envelope/",
        &fixture("sentry_envelope.txt"),
        &envelope,
    )
    .await;
    assert_eq!(out.code, 200, "{out:?}");
    sent += 2;
    for name in [
        "security_check.url",
        "security_check_team_edition.url",
        "security_check_v11.url",
        "security_bulletin.url",
    ] {
        let url = String::from_utf8(fixture(name)).expect("utf-8");
        let out = env.curl(&[url.trim()]).await;
        assert_eq!(out.code, 200, "{name}: {out:?}");
        sent += 1;
    }
    assert_eq!(env.upstream.requests().len(), sent);
    for record in env.audit() {
        assert_eq!(record["unclassified"], serde_json::json!([]), "{record}");
    }
    env.stop().await;
}

/// What no release sends yet, in each kind of request, under each `unclassified` setting.
#[tokio::test]
async fn what_no_release_has_yet_is_named_removed_or_refused() {
    let mut batch: Value =
        serde_json::from_slice(&fixture_body("telemetry_batch_plain.json")).expect("JSON");
    batch["batch"][0]["integrations"] = serde_json::json!({"All": true});
    let mut event = batch["batch"][1].clone();
    event["event"] = "calls_started".into();
    event["properties"] = serde_json::json!({"participants": 3});
    batch["batch"].as_array_mut().expect("batch").push(event);
    let batch = serde_json::to_vec(&batch).expect("JSON");
    let mut push: Value = serde_json::from_slice(&fixture_body("push_full.json")).expect("JSON");
    push["priority"] = "high".into();
    let push = serde_json::to_vec(&push).expect("JSON");
    let sentry = sentry_with("tags", serde_json::json!({"k": "v"}));
    let security = String::from_utf8(fixture("security_check_v11.url")).expect("utf-8");
    let security = format!("{}&nx=1", security.trim());

    for setting in ["pass", "remove", "block"] {
        let policy = format!(
            "[consent]\nsecurity_alerts = \"granted\"\ndiagnostics = \"granted\"\n\
             push_notifications = \"granted\"\nwithhold = [\"activity_counts\"]\n\
             unclassified = \"{setting}\""
        );
        let env = Env::start(Setup {
            policy: &policy,
            admin: true,
            ..Setup::default()
        })
        .await;
        // (what, the response, names, a trace of it upstream)
        let mut cases = Vec::new();
        let out = post_bytes(&env, RUDDER, "/v1/batch", &batch, &[]).await;
        cases.push((
            "batch",
            out,
            vec![
                "json:$.batch[*].integrations",
                "json:$.batch[?@.event == 'calls_started']",
            ],
            "calls_started",
        ));
        let out = post_bytes(
            &env,
            PUSH,
            "/api/v1/send_push",
            &push,
            &["-H", "X-Mattermost-Trace: t1"],
        )
        .await;
        cases.push((
            "push",
            out,
            vec!["header:x-mattermost-trace", "json:$.priority"],
            "priority",
        ));
        let envelope = ["-H", "Content-Type: application/x-sentry-envelope"];
        let out = post_bytes(&env, SENTRY, "/api/5212327/envelope/", &sentry, &envelope).await;
        cases.push((
            "sentry",
            out,
            vec!["envelope.items[0]:json:$.tags"],
            "\"tags\"",
        ));
        let out = env.curl(&[&security]).await;
        cases.push(("security", out, vec!["query:nx"], "nx=1"));

        let audit: Vec<Value> = env
            .audit()
            .into_iter()
            .filter(|r| r["decision"] != "policy_loaded")
            .collect();
        let upstream = env.upstream.requests();
        let reached = |trace: &str| {
            upstream.iter().any(|r| {
                String::from_utf8_lossy(&r.body).contains(trace)
                    || r.path_and_query.contains(trace)
                    || r.headers.contains_key("x-mattermost-trace")
            })
        };
        for (i, (what, out, names, trace)) in cases.iter().enumerate() {
            let record = &audit[i];
            let recorded: Vec<&str> = record["unclassified"]
                .as_array()
                .expect("unclassified")
                .iter()
                .filter_map(Value::as_str)
                .collect();
            assert_eq!(&recorded, names, "{setting} {what}");
            match setting {
                "pass" => assert_eq!(out.code, 200, "{what}: {out:?}"),
                "remove" => {
                    assert_eq!(out.code, 200, "{what}: {out:?}");
                    assert_eq!(record["decision"], "stripped", "{what}");
                    let removed = removed(record);
                    for name in names {
                        assert!(removed.iter().any(|r| r == name), "{what}: {removed:?}");
                    }
                    assert!(
                        record["reason"]
                            .as_str()
                            .is_some_and(|r| r.contains("unclassified")),
                        "{record}"
                    );
                }
                _ => {
                    assert_eq!(out.code, 403, "{what}: {out:?}");
                    assert_eq!(record["decision"], "blocked", "{what}");
                }
            }
            // The names stand in the record; what they held does not.
            assert!(!env.audit_text().contains("participants"));
            if setting == "pass" {
                assert!(reached(trace), "{what}: {trace} did not leave");
            }
        }
        match setting {
            "pass" => assert_eq!(upstream.len(), 4),
            "remove" => {
                assert_eq!(upstream.len(), 4);
                for r in &upstream {
                    let body = String::from_utf8_lossy(&r.body);
                    let traces: &[&str] = match r.path_and_query.as_str() {
                        "/v1/batch" => &["calls_started", "\"integrations\""],
                        "/api/v1/send_push" => &["\"priority\""],
                        "/api/5212327/envelope/" => &["\"tags\""],
                        _ => &[],
                    };
                    for trace in traces {
                        assert!(!body.contains(trace), "{trace} left");
                    }
                    assert!(!r.path_and_query.contains("nx=1"));
                    assert!(!r.headers.contains_key("x-mattermost-trace"));
                }
            }
            _ => assert!(upstream.is_empty(), "a refused request left"),
        }
        if setting == "pass" {
            // `audit summary` lists the names per node, with the records that carried them.
            let log = env.dir.path().join("audit.jsonl");
            let (code, out) = crate::cli::run(
                crate::cli::bin()
                    .args(["audit", "summary", "--json"])
                    .arg(&log),
            );
            assert_eq!(code, 0, "{out}");
            let summary: Value = serde_json::from_str(&out).expect("summary JSON");
            let seen = &summary["nodes"][0]["unclassified"];
            let nx = seen
                .as_array()
                .expect("unclassified")
                .iter()
                .find(|u| u["name"] == "query:nx")
                .expect("query:nx listed");
            assert_eq!(nx["feature"], "security_alerts");
            assert_eq!(nx["records"], 1);
            assert!(nx["first"].is_string() && nx["first"] == nx["last"]);
        }
        let metrics = crate::fleet::http_get(env.admin().expect("admin"), "/metrics").await;
        for (feature, n) in [
            ("diagnostics", 3),
            ("push_notifications", 2),
            ("security_alerts", 1),
        ] {
            let line = format!("consent_proxy_unclassified_total{{feature=\"{feature}\"}} {n}");
            assert!(
                metrics.contains(&line),
                "{setting}: {line} not in\n{metrics}"
            );
        }
        env.stop().await;
    }
}
