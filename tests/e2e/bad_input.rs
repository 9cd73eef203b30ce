//! Bad input: malformed CONNECT targets, bodies the rules cannot read, lying framing, names that
//! disagree, and bad policy files. None may panic, pass silently, or reach the upstream.

use std::process::Command;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{exchange, Env, Setup, PUSH, SECURITY};

/// `"key":<raw value>` as it stands in a compact JSON text.
pub fn raw_member(text: &str, key: &str) -> Option<String> {
    let start = text.find(&format!("\"{key}\":"))?;
    let rest = &text[start..];
    let end = rest.find([',', '}'])?;
    Some(rest[..end].to_string())
}

/// Send `request` to the proxy's explicit listener; the first answer read.
pub async fn raw_exchange(env: &Env, request: &str) -> String {
    let mut tcp = TcpStream::connect(env.proxy).await.expect("connect");
    exchange(&mut tcp, request.as_bytes()).await
}

#[tokio::test]
async fn malformed_connect_targets_get_400() {
    let env = Env::start(Setup::default()).await;
    for target in [
        "push.mattermost.com",
        "push.mattermost.com:0",
        "push.mattermost.com:http",
        ":443",
        "bad_host!:443",
    ] {
        let answer = raw_exchange(
            &env,
            &format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{target}: {answer}");
    }
    let answer = raw_exchange(&env, "GET /security HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        answer.starts_with("HTTP/1.1 400"),
        "origin-form to the proxy: {answer}"
    );
    assert_eq!(
        env.upstream
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    let audit = env.audit();
    assert!(
        audit
            .iter()
            .all(|r| r["decision"] == "blocked" && r["status"] == 400),
        "{audit:?}"
    );
    env.stop().await;
}

async fn push(env: &Env, body: &str, extra: &[&str]) -> crate::harness::Curl {
    let mut args = vec!["-X", "POST", "--data-binary", body];
    args.extend_from_slice(extra);
    let url = format!("https://{PUSH}/api/v1/send_push");
    args.push(&url);
    env.curl(&args).await
}

#[tokio::test]
async fn unreadable_bodies_are_blocked_not_passed() {
    let env = Env::start(Setup {
        policy: "[limits]\nmax_body_bytes = 2000",
        ..Setup::default()
    })
    .await;
    let big = format!("{{\"message\":\"{}\"}}", "x".repeat(3000));
    for (body, extra, status, reason) in [
        ("not json", &[][..], 415, "body is not valid JSON"),
        ("{\"message\":\"a\"", &[][..], 415, "body is not valid JSON"),
        (
            "{\"message\":\"a\",\"message\":\"b\"}",
            &[][..],
            415,
            "JSON body has a duplicate object key",
        ),
        (
            "{\"message\":\"a\"}",
            &["-H", "Content-Encoding: gzip"][..],
            415,
            "body does not decode as its Content-Encoding says",
        ),
        (
            "{\"message\":\"a\"}",
            &["-H", "Content-Encoding: compress"][..],
            415,
            "body has a content encoding that cannot be inspected",
        ),
        (
            big.as_str(),
            &["--http1.1"][..],
            413,
            "body over max_body_bytes",
        ),
        (
            big.as_str(),
            &["--http1.1", "-H", "Transfer-Encoding: chunked"][..],
            413,
            "body over max_body_bytes",
        ),
    ] {
        let out = push(&env, body, extra).await;
        assert_eq!(out.code, status, "{body:.40}: {out:?}");
        let json: serde_json::Value = serde_json::from_str(&out.body).expect("JSON error body");
        assert_eq!(json["reason"], reason);
        assert_eq!(json["feature"], "push_notifications");
        let last = env.audit().pop().expect("record");
        assert_eq!(last["decision"], "blocked");
        assert_eq!(last["reason"], reason);
    }
    assert!(
        env.upstream.requests().is_empty(),
        "an unreadable body reached the upstream"
    );
    env.stop().await;
}

#[tokio::test]
async fn names_that_disagree_are_refused() {
    let env = Env::start(Setup::default()).await;
    let out = env
        .curl(&[
            "-H",
            "Host: evil.example",
            &format!("https://{SECURITY}/security?id=x"),
        ])
        .await;
    assert_eq!(out.code, 400, "{out:?}");
    // SNI naming another host than the CONNECT target: the handshake is refused.
    let out = env
        .curl(&[
            "--connect-to",
            &format!("{PUSH}:443:{SECURITY}:443"),
            &format!("https://{PUSH}/api/v1/ack"),
        ])
        .await;
    assert_ne!(out.exit, 0, "{out:?}");
    assert!(env.upstream.requests().is_empty());
    let reasons: Vec<String> = env
        .audit()
        .iter()
        .map(|r| r["reason"].as_str().unwrap_or_default().to_string())
        .collect();
    // curl puts the Host header into :authority over h2, and into Host over HTTP/1.1.
    assert!(
        reasons
            .iter()
            .any(|r| r.ends_with("does not match the CONNECT target") && !r.starts_with("TLS")),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&"TLS SNI does not match the CONNECT target".to_string()),
        "{reasons:?}"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_lying_content_length_never_reaches_the_upstream() {
    let env = Env::start(Setup::default()).await;
    let tcp = env.connect_tunnel(PUSH).await;
    let mut tls = env.tls_client(tcp, PUSH).await;
    let body = "{\"message\":\"secret\"}";
    let req = format!(
        "POST /api/v1/send_push HTTP/1.1\r\nHost: {PUSH}\r\nContent-Length: 500\r\n\r\n{body}"
    );
    tls.write_all(req.as_bytes()).await.expect("write");
    tls.shutdown().await.expect("close our side");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tls.read_to_end(&mut answer),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    assert!(
        env.upstream.requests().is_empty(),
        "a truncated body reached the upstream"
    );
    env.stop().await;
}

fn check(policy: &str) -> (i32, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, policy).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_consent-proxy"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn bad_policy_files_get_clear_errors_naming_file_and_key() {
    let (code, err) = check("[upstream]\nroots = \"webpki\"\nverify = false\n");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("bad.toml") && err.contains("unknown field `verify`"),
        "{err}"
    );
    let (code, err) = check("[[feature]]\nname = \"acme\"\nhosts = [\"m.acme.example\"]\n[[feature.rule]]\nremove = [\"json:$.batch[?@.event ==]\"]\n");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("bad.toml")
            && err.contains("(acme).rule[0].remove")
            && err.contains("RFC 9535"),
        "{err}"
    );
    let (code, err) = check("this is not toml");
    assert_eq!(code, 1);
    assert!(err.contains("bad.toml"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_consent-proxy"))
        .args(["check", "--print"])
        .output()
        .expect("runs");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("push.mattermost.com"));
    let out = Command::new(env!("CARGO_BIN_EXE_consent-proxy"))
        .args(["frobnicate"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}

#[tokio::test]
async fn a_feature_host_cannot_be_reached_by_its_address() {
    let env = Env::start(Setup::default()).await;
    // The fake upstream serves every feature host; 127.0.0.1:<its port> is their address.
    let addr = env.upstream.addr;
    let answer = raw_exchange(
        &env,
        &format!("CONNECT {addr} HTTP/1.1\r\nHost: {addr}\r\n\r\n"),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 400"),
        "CONNECT by address: {answer}"
    );
    let out = env
        .curl(&[
            "-X",
            "POST",
            "--data-binary",
            "{}",
            &format!("http://{addr}/v1/batch"),
        ])
        .await;
    assert_eq!(out.code, 400, "plain HTTP by address: {out:?}");
    assert_eq!(
        env.upstream
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    let audit = env.audit();
    assert_eq!(audit.len(), 2);
    for record in audit {
        assert_eq!(record["decision"], "blocked");
        assert!(record["feature"].is_string(), "{record}");
        assert!(
            record["reason"]
                .as_str()
                .unwrap_or("")
                .contains("feature host's address"),
            "{record}"
        );
    }
    env.stop().await;
}
