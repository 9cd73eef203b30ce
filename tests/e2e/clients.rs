//! Real clients through the proxy: curl over HTTP/1.1 and HTTP/2 (to h2 and HTTP/1.1-only
//! upstreams), Go's net/http with only HTTPS_PROXY and SSL_CERT_FILE, tunnels, access control,
//! and a planted secret that must appear nowhere.

use std::sync::atomic::Ordering;

use consent_proxy::decide::Decision;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{
    diagnostics, echo_server, fixture_path, Env, Setup, PUSH, RUDDER, SECURITY, TUNNELLED,
};

#[tokio::test]
async fn curl_http2_and_http1_against_h2_and_http1_only_upstreams() {
    for (upstream_alpn, want_upstream) in [
        (&[b"h2".as_slice(), b"http/1.1"][..], http::Version::HTTP_2),
        (&[b"http/1.1".as_slice()][..], http::Version::HTTP_11),
    ] {
        let env = Env::start(Setup {
            upstream_alpn,
            ..Setup::default()
        })
        .await;
        for (flag, want_client) in [("--http2", "2"), ("--http1.1", "1.1")] {
            let url = format!("https://{SECURITY}/security?id=x&uc=1&ut=0");
            let out = env.curl(&[flag, &url]).await;
            assert_eq!(out.code, 200, "{flag}: {out:?}");
            assert_eq!(
                out.version, want_client,
                "client side speaks what it negotiated"
            );
            let got = env.upstream.requests().pop().expect("request");
            assert_eq!(
                got.version, want_upstream,
                "upstream side speaks what it negotiated"
            );
            assert_eq!(got.path_and_query, "/security?id=x&ut=0");
        }
        env.stop().await;
    }
}

#[tokio::test]
async fn a_planted_secret_reaches_no_one() {
    const SECRET: &str = "PLANTED-7f3a9c-SECRET";
    let env = Env::start(Setup::default()).await;
    let push = format!(
        r#"{{"ack_id":"a","platform":"android","server_id":"s","device_id":"d","message":"{SECRET} msg","channel_name":"{SECRET} chan","sender_name":"{SECRET} sender","override_username":"{SECRET} ou","override_icon_url":"https://x/{SECRET}","signature":"sig"}}"#
    );
    for flag in ["--http1.1", "--http2"] {
        let out = env
            .curl(&[
                flag,
                "-X",
                "POST",
                "--data-binary",
                &push,
                "-H",
                "Content-Type:",
                &format!("https://{PUSH}/api/v1/send_push"),
            ])
            .await;
        assert_eq!(out.code, 200, "{out:?}");
        let out = env
            .curl(&[
                flag,
                &format!("https://{SECURITY}/security?id=s&uc={SECRET}&auc={SECRET}&tc={SECRET}"),
            ])
            .await;
        assert_eq!(out.code, 200, "{out:?}");
    }
    for got in env.upstream.requests() {
        let everything = format!(
            "{} {:?} {}",
            got.path_and_query,
            got.headers,
            String::from_utf8_lossy(&got.body)
        );
        assert!(
            !everything.contains(SECRET),
            "upstream received the secret: {everything}"
        );
    }
    assert_eq!(env.upstream.requests().len(), 4);
    assert!(
        !env.audit_text().contains(SECRET),
        "audit log holds the secret"
    );
    assert!(
        !diagnostics().contains(SECRET),
        "diagnostics hold the secret"
    );
    env.stop().await;
}

#[tokio::test]
async fn unknown_hosts_are_tunnelled_byte_identical() {
    let (echo, seen) = echo_server().await;
    let env = Env::start(Setup {
        tunnel_to: Some(echo),
        ..Setup::default()
    })
    .await;
    let tcp = env.connect_tunnel(TUNNELLED).await;
    let payload: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let (mut r, mut w) = tcp.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move { w.write_all(&sent).await.expect("write") });
    let mut back = vec![0u8; payload.len()];
    r.read_exact(&mut back).await.expect("echo");
    writer.await.expect("writer");
    assert_eq!(back, payload, "bytes back differ");
    assert_eq!(
        *seen.lock().expect("lock"),
        payload,
        "bytes at the upstream differ"
    );
    let audit = env.audit();
    assert_eq!(audit[0]["decision"], "tunneled");
    assert_eq!(audit[0]["host"], TUNNELLED);
    assert_eq!(audit[0]["feature"], serde_json::Value::Null);
    env.stop().await;
}

/// Bytes sent with the CONNECT (before its answer) reach the upstream first, and a client that
/// closes its sending side still gets every byte back: the end passes through as a half-close.
#[tokio::test]
async fn tunnels_carry_bytes_sent_with_the_connect_and_pass_half_closes_on() {
    let (echo, seen) = echo_server().await;
    let env = Env::start(Setup {
        tunnel_to: Some(echo),
        ..Setup::default()
    })
    .await;
    let payload: Vec<u8> = (0..=250u8).cycle().take(300_000).collect();
    let tcp = tokio::net::TcpStream::connect(env.proxy)
        .await
        .expect("connect");
    let (mut r, mut w) = tcp.into_split();
    let mut first =
        format!("CONNECT {TUNNELLED}:443 HTTP/1.1\r\nHost: {TUNNELLED}:443\r\n\r\n").into_bytes();
    first.extend_from_slice(&payload[..1000]);
    let rest = payload[1000..].to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&first).await.expect("write");
        w.write_all(&rest).await.expect("write");
        w.shutdown().await.expect("half-close");
        w
    });
    let mut back = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(20), r.read_to_end(&mut back))
        .await
        .expect("the upstream's end reaches the client")
        .expect("read");
    let _w = writer.await.expect("writer");
    let head = b"HTTP/1.1 200";
    assert!(
        back.starts_with(head),
        "{:?}",
        String::from_utf8_lossy(&back[..40])
    );
    let body_at = back
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of the answer's head")
        + 4;
    assert!(back[body_at..] == payload[..], "bytes back differ");
    assert!(
        *seen.lock().expect("lock") == payload,
        "bytes at the upstream differ"
    );
    env.stop().await;
}

#[tokio::test]
async fn idle_tunnels_are_closed() {
    let (echo, _) = echo_server().await;
    let env = Env::start(Setup {
        policy: "[limits]\ntunnel_idle_timeout_secs = 1",
        tunnel_to: Some(echo),
        ..Setup::default()
    })
    .await;
    let mut tcp = env.connect_tunnel(TUNNELLED).await;
    tcp.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 16];
    tcp.read_exact(&mut buf[..4]).await.expect("echo");
    // Nothing more either way: the proxy closes the tunnel after the idle timeout.
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0);
    env.stop().await;
}

#[tokio::test]
async fn unknown_hosts_are_refused_when_denied() {
    let (echo, seen) = echo_server().await;
    let env = Env::start(Setup {
        policy: "unknown_hosts = \"deny\"",
        tunnel_to: Some(echo),
        ..Setup::default()
    })
    .await;
    let out = env.curl(&[&format!("https://{TUNNELLED}/")]).await;
    assert_eq!(out.connect, 403, "{out:?}");
    assert!(seen.lock().expect("lock").is_empty());
    let record = &env.records()[0];
    assert_eq!(record.decision, Decision::Blocked);
    assert_eq!(
        record.reason,
        "destination belongs to no feature and unknown_hosts = deny"
    );
    env.stop().await;
}

#[tokio::test]
async fn clients_outside_the_allow_list_are_denied() {
    let env = Env::start(Setup {
        policy: "[clients]\nallow = [\"10.0.0.0/8\"]",
        ..Setup::default()
    })
    .await;
    let out = env
        .curl(&[&format!("https://{SECURITY}/security?id=x")])
        .await;
    assert_eq!(out.connect, 403, "{out:?}");
    let record = &env.records()[0];
    assert_eq!(record.decision, Decision::Denied);
    assert_eq!(record.status, Some(403));
    assert_eq!(record.reason, "client address not allowed");
    assert_eq!(env.upstream.connections.load(Ordering::SeqCst), 0);
    env.stop().await;
}

#[tokio::test]
async fn plain_http_absolute_form_is_decided_too() {
    let env = Env::start(Setup::default()).await;
    // A denied feature over plain HTTP is refused without an upstream connection.
    let out = env
        .curl(&[
            "-X",
            "POST",
            "--data-binary",
            "{}",
            &format!("http://{RUDDER}/v1/batch"),
        ])
        .await;
    assert_eq!(out.code, 403, "{out:?}");
    let body: serde_json::Value = serde_json::from_str(&out.body).expect("JSON body");
    assert_eq!(body["feature"], "diagnostics");
    let record = &env.records()[0];
    assert_eq!(record.scheme.as_deref(), Some("http"));
    assert_eq!(
        (record.decision, record.feature.as_deref()),
        (Decision::Blocked, Some("diagnostics"))
    );
    env.stop().await;
}

#[tokio::test]
async fn go_net_http_gets_the_same_outcomes_as_curl() {
    let Some(go) = crate::harness::go_client() else {
        return;
    };
    let env = Env::start(Setup::default()).await;
    let run = |args: Vec<String>| {
        let proxy = format!("http://{}", env.proxy);
        let ca = env.ca_pem.clone();
        let go = go.clone();
        async move {
            let out = tokio::process::Command::new(go)
                .args(args)
                .env("HTTPS_PROXY", proxy)
                .env("SSL_CERT_FILE", ca)
                .env_remove("NO_PROXY")
                .env_remove("no_proxy")
                .output()
                .await
                .expect("go client runs");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
                + &String::from_utf8_lossy(&out.stderr)
        }
    };
    let security = String::from_utf8(crate::harness::fixture("security_check.url"))
        .expect("utf-8")
        .trim()
        .to_string();
    let out = run(vec!["GET".into(), security]).await;
    assert_eq!(out, "200 HTTP/2.0", "security check");
    let got = env.upstream.requests().pop().expect("request");
    assert_eq!(got.path_and_query, "/security?b=10.5.2.13608341937&be=true&db=postgres&id=dzye578hdkhnobofbhqhq5yrqf&os=linux&ut=0");

    let push = fixture_path("push_full.json").display().to_string();
    let out = run(vec![
        "POST".into(),
        format!("https://{PUSH}/api/v1/send_push"),
        push,
    ])
    .await;
    assert_eq!(out, "200 HTTP/2.0", "push");
    let got: serde_json::Value =
        serde_json::from_slice(&env.upstream.requests().pop().expect("push").body).expect("JSON");
    assert_eq!(got["message"], "You've received a new message.");
    assert!(got.get("channel_name").is_none() && got.get("sender_name").is_none());

    let batch = fixture_path("telemetry_batch_plain.json")
        .display()
        .to_string();
    let out = run(vec![
        "POST".into(),
        format!("https://{RUDDER}/v1/batch"),
        batch,
    ])
    .await;
    assert!(
        out.contains("Forbidden"),
        "diagnostics refused at CONNECT: {out}"
    );
    assert_eq!(
        env.upstream.requests().len(),
        2,
        "only the security check and the push arrived"
    );
    env.stop().await;
}

#[tokio::test]
async fn an_h2_refusal_of_a_request_with_a_body_is_a_clean_answer() {
    let policy = "[[feature]]\nname = \"bulletins\"\nhosts = [\"securityupdatecheck.mattermost.com\"]\npaths = [\"/bulletins/\"]\n";
    let env = Env::start(Setup {
        policy,
        ..Setup::default()
    })
    .await;
    // The proxy decides on the headers, before the body's DATA frame has arrived.
    let body = "{\"id\":\"x\"}";
    let out = env
        .curl(&[
            "--http2",
            "-X",
            "POST",
            "--data-binary",
            body,
            &format!("https://{SECURITY}/bulletins/1"),
        ])
        .await;
    assert_eq!(
        (out.code, out.exit, out.version.as_str()),
        (403, 0, "2"),
        "{out:?}"
    );
    let json: serde_json::Value = serde_json::from_str(&out.body).expect("JSON body");
    assert_eq!(json["feature"], "bulletins");
    assert!(env.upstream.requests().is_empty());
    env.stop().await;
}

/// Upstream connections are kept idle only for a host asked for again: the first request to a
/// host gets a connection that closes after its response (a flood of new names leaves nothing
/// behind), the second opens one that the third reuses.
#[tokio::test]
async fn upstream_connections_are_pooled_from_a_hosts_second_request() {
    let env = Env::start(Setup {
        policy: "[consent]\ndiagnostics = \"granted\"\n",
        upstream_alpn: &[b"http/1.1"],
        ..Setup::default()
    })
    .await;
    let mut conn = env.keep_alive(RUDDER).await;
    for _ in 0..3 {
        conn.ready().await.expect("ready");
        let req = http::Request::post("/v1/batch")
            .header("host", RUDDER)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"{\"batch\":[]}",
            )))
            .expect("request");
        let resp = conn.send_request(req).await.expect("response");
        assert_eq!(resp.status(), 200);
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .expect("body");
    }
    assert_eq!(env.upstream.requests().len(), 3);
    assert_eq!(env.upstream.connections.load(Ordering::SeqCst), 2);
    env.stop().await;
}
