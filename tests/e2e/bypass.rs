//! Ways around the policy, each tried with real TLS and real clients: compressed bodies, member
//! names the Go receivers read otherwise than the rules spell them, member-name patterns, query
//! strings a lenient receiver splits otherwise, request forms RFC 9112 forbids, loops to the
//! proxy's own listeners, CA keys others can read, and refusals that must each leave a record.
//! Every class failed on the proxy before it was hardened against it.

use std::io::Read;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::bad_input::raw_exchange;
use crate::cli::bin;
use crate::harness::{exchange, fixture_body, Curl, Env, Setup, PUSH, RUDDER, SECURITY};

/// POST `body` to `https://{host}{path}` with curl over `http` (`--http1.1` or `--http2`),
/// without a Content-Type, as Mattermost's push client sends.
async fn post(env: &Env, host: &str, path: &str, body: &[u8], http: &str, extra: &[&str]) -> Curl {
    let file = env.dir.path().join(format!("body-{}", body.len()));
    std::fs::write(&file, body).expect("write body");
    let data = format!("@{}", file.display());
    let url = format!("https://{host}{path}");
    let mut args = vec![
        http,
        "-X",
        "POST",
        "--data-binary",
        &data,
        "-H",
        "Content-Type:",
    ];
    args.extend_from_slice(extra);
    args.push(&url);
    env.curl(&args).await
}

type Codec = (&'static str, fn(&[u8]) -> Vec<u8>, fn(&[u8]) -> Vec<u8>);

/// Everything a reader yields: every coder below is a reader over the input.
fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut out = Vec::new();
    r.read_to_end(&mut out).expect("codes");
    out
}

fn gzip(b: &[u8]) -> Vec<u8> {
    read_all(flate2::read::GzEncoder::new(b, flate2::Compression::fast()))
}
fn gunzip(b: &[u8]) -> Vec<u8> {
    read_all(flate2::read::MultiGzDecoder::new(b))
}
fn zlib(b: &[u8]) -> Vec<u8> {
    read_all(flate2::read::ZlibEncoder::new(
        b,
        flate2::Compression::fast(),
    ))
}
fn unzlib(b: &[u8]) -> Vec<u8> {
    read_all(flate2::read::ZlibDecoder::new(b))
}
fn raw_deflate(b: &[u8]) -> Vec<u8> {
    read_all(flate2::read::DeflateEncoder::new(
        b,
        flate2::Compression::fast(),
    ))
}
fn raw_inflate(b: &[u8]) -> Vec<u8> {
    read_all(flate2::read::DeflateDecoder::new(b))
}
fn br(b: &[u8]) -> Vec<u8> {
    read_all(brotli::CompressorReader::new(b, 4096, 4, 22))
}
fn unbr(b: &[u8]) -> Vec<u8> {
    read_all(brotli::Decompressor::new(b, 4096))
}
fn zstd_(b: &[u8]) -> Vec<u8> {
    zstd::encode_all(b, 1).expect("zstd")
}
fn unzstd(b: &[u8]) -> Vec<u8> {
    zstd::decode_all(b).expect("unzstd")
}
fn gzip_then_br(b: &[u8]) -> Vec<u8> {
    br(&gzip(b))
}
fn unbr_then_gunzip(b: &[u8]) -> Vec<u8> {
    gunzip(&unbr(b))
}

const CODECS: [Codec; 6] = [
    ("gzip", gzip, gunzip),
    ("deflate", zlib, unzlib),
    ("deflate", raw_deflate, raw_inflate),
    ("br", br, unbr),
    ("zstd", zstd_, unzstd),
    ("gzip, br", gzip_then_br, unbr_then_gunzip),
];

/// The members of a push the pack never touches, which must arrive as sent.
const KEPT: [&str; 5] = ["server_id", "device_id", "ack_id", "signature", "platform"];

#[tokio::test]
async fn compressed_bodies_are_decoded_stripped_and_encoded_again() {
    let env = Env::start(Setup::default()).await;
    let plain = fixture_body("push_full.json");
    let sent: Value = serde_json::from_slice(&plain).expect("fixture");
    for (coding, encode, decode) in CODECS {
        for http in ["--http1.1", "--http2"] {
            let body = encode(&plain);
            let header = format!("Content-Encoding: {coding}");
            let out = post(
                &env,
                PUSH,
                "/api/v1/send_push",
                &body,
                http,
                &["-H", &header],
            )
            .await;
            assert_eq!(out.code, 200, "{coding} {http}: {out:?}");
            let got = env.upstream.requests().pop().expect("forwarded");
            assert_eq!(got.headers["content-encoding"], coding, "{coding} {http}");
            if let Some(len) = got.headers.get("content-length") {
                assert_eq!(len, got.body.len().to_string().as_str(), "{coding} {http}");
            }
            let json: Value = serde_json::from_slice(&decode(&got.body)).expect("JSON upstream");
            assert_eq!(json["message"], "You've received a new message.");
            for gone in ["channel_name", "sender_name"] {
                assert!(json.get(gone).is_none(), "{coding} {http}: {gone} arrived");
            }
            for kept in KEPT {
                assert_eq!(json[kept], sent[kept], "{coding} {http}: {kept}");
            }
            let record = env.audit().pop().expect("record");
            assert_eq!(record["decision"], "stripped", "{coding} {http}");
            assert_eq!(record["bytes_in"], body.len(), "{coding} {http}");
            assert_eq!(record["bytes_out"], got.body.len(), "{coding} {http}");
        }
    }
    // A decompression bomb: small on the wire, 16 MiB decoded, over max_body_bytes (1 MiB).
    let bomb = gzip(&vec![b' '; 16 << 20]);
    assert!(bomb.len() < 1 << 20);
    let before = env.upstream.requests().len();
    for http in ["--http1.1", "--http2"] {
        let out = post(
            &env,
            PUSH,
            "/api/v1/send_push",
            &bomb,
            http,
            &["-H", "Content-Encoding: gzip"],
        )
        .await;
        assert_eq!(out.code, 413, "{http}: {out:?}");
        let record = env.audit().pop().expect("record");
        assert_eq!(record["reason"], "body over max_body_bytes once decoded");
    }
    for (coding, body) in [("gzip", plain.clone()), ("compress", plain.clone())] {
        let header = format!("Content-Encoding: {coding}");
        let out = post(
            &env,
            PUSH,
            "/api/v1/send_push",
            &body,
            "--http2",
            &["-H", &header],
        )
        .await;
        assert_eq!(out.code, 415, "{coding}: {out:?}");
    }
    assert_eq!(
        env.upstream.requests().len(),
        before,
        "a refused body reached the upstream"
    );
    env.stop().await;
}

#[tokio::test]
async fn members_spelt_as_go_binds_them_are_stripped() {
    let env = Env::start(Setup::default()).await;
    // Go's encoding/json binds each of these to the field the rule names.
    let body = r#"{"ack_id":"a1","platform":"android_rn-v2","server_id":"s1","device_id":"d1","post_id":"p1","Message":"SECRET-M","CHANNEL_NAME":"SECRET-C","ſender_name":"SECRET-S","override_userNAME":"SECRET-O","override_icon_url":"SECRET-I","badge":1}"#;
    let escaped = r#"{"ack_id":"a1","platform":"android_rn-v2","server_id":"s1","device_id":"d1","mess\u0061ge":"SECRET-M","\u0043hannel_name":"SECRET-C","\u017fender_name":"SECRET-S"}"#;
    for http in ["--http1.1", "--http2"] {
        for body in [body, escaped] {
            let out = post(&env, PUSH, "/api/v1/send_push", body.as_bytes(), http, &[]).await;
            assert_eq!(out.code, 200, "{http}: {out:?}");
            let got = env.upstream.requests().pop().expect("forwarded");
            let text = String::from_utf8_lossy(&got.body);
            assert!(!text.contains("SECRET"), "{http}: {text}");
            let json: Value = serde_json::from_slice(&got.body).expect("JSON");
            assert_eq!(json["server_id"], "s1");
            assert_eq!(json["device_id"], "d1");
        }
    }
    let record = env.audit().pop().expect("record");
    assert_eq!(record["decision"], "stripped");
    assert!(!env.audit_text().contains("SECRET"));
    // Two members one field binds, and keys a receiver could read otherwise: refused.
    let before = env.upstream.requests().len();
    for (body, reason) in [
        (
            r#"{"message":"a","Message":"SECRET"}"#,
            "JSON body has a duplicate object key",
        ),
        (
            r#"{"channel_name":"a","CHANNEL_NAME":"SECRET"}"#,
            "JSON body has a duplicate object key",
        ),
        (
            r#"{"mess\u0000age":"SECRET"}"#,
            "JSON body has an object key with a control character",
        ),
        (r#"{"\ud800":"SECRET"}"#, "body is not valid JSON"),
    ] {
        for http in ["--http1.1", "--http2"] {
            let out = post(&env, PUSH, "/api/v1/send_push", body.as_bytes(), http, &[]).await;
            assert_eq!(out.code, 415, "{body} {http}: {out:?}");
            assert_eq!(env.audit().pop().expect("record")["reason"], reason);
        }
    }
    assert_eq!(env.upstream.requests().len(), before);
    env.stop().await;
}

#[tokio::test]
async fn feature_flags_go_by_pattern_including_new_ones() {
    let env = Env::start(Setup {
        policy: "[consent]\ndiagnostics = \"granted\"\nwithhold = [\"enterprise_features\"]",
        ..Setup::default()
    })
    .await;
    let fixture =
        String::from_utf8(fixture_body("telemetry_batch_enterprise.json")).expect("utf-8");
    let marker = "\"event\":\"license\"";
    assert!(fixture.contains(marker) && fixture.contains("\"feature_ldap\":"));
    // A release adds flags the pack cannot know by name, spelt any way Go would bind.
    let body = fixture.replacen(
        "\"feature_ldap\":",
        "\"feature_brand_new_2027\":true,\"Feature_Upper\":true,\"feature_ldap\":",
        1,
    );
    for http in ["--http1.1", "--http2"] {
        let out = post(
            &env,
            RUDDER,
            "/v1/batch",
            body.as_bytes(),
            http,
            &["-H", "Content-Type: application/json"],
        )
        .await;
        assert_eq!(out.code, 200, "{http}: {out:?}");
        let got = env.upstream.requests().pop().expect("forwarded");
        let json: Value = serde_json::from_slice(&got.body).expect("JSON");
        let license = json["batch"]
            .as_array()
            .expect("batch")
            .iter()
            .find(|e| e["event"] == "license")
            .expect("license event kept (only its feature flags go)");
        let props = license["properties"].as_object().expect("properties");
        let flags: Vec<&String> = props
            .keys()
            .filter(|k| k.to_ascii_lowercase().starts_with("feature_"))
            .collect();
        assert!(flags.is_empty(), "{http}: {flags:?}");
        assert!(props.contains_key("customer_id"));
    }
    let record = env.audit().pop().expect("record");
    assert_eq!(record["decision"], "stripped");
    // 29 flags: recorded as the selector and its count.
    let removed = record["removed"].to_string();
    assert!(
        removed.contains("properties.feature_* (29 matches)"),
        "{removed}"
    );
    env.stop().await;
}

/// Every pair of a query string as a lenient receiver reads it: split on `&` and `;`, names
/// decoded and lowercased.
fn lenient_names(query: &str) -> Vec<String> {
    query
        .split(['&', ';'])
        .filter(|p| !p.is_empty())
        .map(|p| {
            let name = p.split('=').next().unwrap_or_default().replace('+', " ");
            percent_decode(&name).to_lowercase()
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn query_pairs_a_lenient_receiver_reads_are_stripped() {
    let env = Env::start(Setup::default()).await;
    for query in [
        "id=x;uc=1;auc=2;tc=3&ut=0",
        "id=x&UC=1&Auc=2&TC=3",
        "id=x&u%63=1&%61uc=2&t%43=3",
        "uc=1;id=x&ut=0;auc=2",
    ] {
        for http in ["--http1.1", "--http2"] {
            let out = env
                .curl(&[http, &format!("https://{SECURITY}/security?{query}")])
                .await;
            assert_eq!(out.code, 200, "{query} {http}: {out:?}");
            let got = env.upstream.requests().pop().expect("forwarded");
            let (_, q) = got.path_and_query.split_once('?').expect("a query is left");
            let names = lenient_names(q);
            for forbidden in ["uc", "auc", "tc"] {
                assert!(!names.iter().any(|n| n == forbidden), "{query} {http}: {q}");
            }
            assert!(names.iter().any(|n| n == "id"), "{query}: {q}");
        }
    }
    let before = env.upstream.requests().len();
    for query in ["id=x&u%6=1", "id=x&=uc", "id=x&u%00c=1"] {
        let out = env
            .curl(&[&format!("https://{SECURITY}/security?{query}")])
            .await;
        assert_eq!(out.code, 400, "{query}: {out:?}");
        let record = env.audit().pop().expect("record");
        assert_eq!(
            record["reason"],
            "query string cannot be read unambiguously"
        );
    }
    assert_eq!(env.upstream.requests().len(), before);
    env.stop().await;
}

/// One raw HTTP/1.1 exchange inside an intercepted connection to `host`.
async fn raw_inside(env: &Env, host: &str, request: &str) -> String {
    let tcp = env.connect_tunnel(host).await;
    let mut tls = env.tls_client(tcp, host).await;
    exchange(&mut tls, request.as_bytes()).await
}

#[tokio::test]
async fn request_forms_rfc_9112_forbids_are_refused_with_a_record() {
    let env = Env::start(Setup::default()).await;
    let s = SECURITY;
    let cases = [
        "GET /security?id=x HTTP/1.1\r\n\r\n".to_string(),
        "GET /security?id=x HTTP/1.0\r\n\r\n".to_string(),
        format!("GET /security?id=x HTTP/1.1\r\nHost: {s}\r\nHost: {s}\r\n\r\n"),
        format!("GET https://{s}/security?id=x HTTP/1.1\r\nHost: {s}\r\n\r\n"),
        format!("GET {s}:443 HTTP/1.1\r\nHost: {s}\r\n\r\n"),
        format!("POST /security HTTP/1.1\r\nHost: {s}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
        format!("POST /security HTTP/1.1\r\nHost: {s}\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n"),
    ];
    for (i, request) in cases.iter().enumerate() {
        let answer = raw_inside(&env, s, request).await;
        assert!(
            answer.starts_with("HTTP/1.1 400") || answer.starts_with("HTTP/1.0 400"),
            "{request:?}: {answer}"
        );
        // A request hyper refuses itself is answered before the proxy records it: wait.
        let deadline = Instant::now() + Duration::from_secs(10);
        while env.audit().len() < i + 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let records = env.audit();
        assert_eq!(
            records.len(),
            i + 1,
            "one record per refusal: {request:?}\n{records:?}"
        );
        let last = records.last().expect("record");
        assert_eq!(last["decision"], "blocked", "{request:?}");
        assert_eq!(last["status"], 400, "{request:?}");
    }
    assert!(
        env.upstream.requests().is_empty(),
        "a malformed request reached the upstream"
    );
    // The same request in origin-form with one Host passes.
    let answer = raw_inside(
        &env,
        s,
        &format!("GET /security?id=x HTTP/1.1\r\nHost: {s}\r\n\r\n"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    env.stop().await;
}

#[tokio::test]
async fn loops_to_the_proxys_own_listener_are_refused() {
    let env = Env::start(Setup::default()).await;
    let port = env.proxy.port();
    for request in [
        format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"),
        format!("CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n"),
        format!(
            "CONNECT [::ffff:127.0.0.1]:{port} HTTP/1.1\r\nHost: [::ffff:127.0.0.1]:{port}\r\n\r\n"
        ),
        format!("GET http://localhost:{port}/ HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n"),
    ] {
        let answer = raw_exchange(&env, &request).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{request:?}: {answer}");
        let record = env.audit().pop().expect("record");
        assert_eq!(
            record["reason"],
            "the destination is one of the proxy's own listeners (a loop)"
        );
    }
    env.stop().await;
}

#[tokio::test]
async fn every_refusal_leaves_one_record_and_bytes_are_counted() {
    let env = Env::start(Setup {
        policy: "mode = \"report\"",
        ..Setup::default()
    })
    .await;
    // Targets hyper itself cannot parse: answered 400 by hyper, recorded by the proxy.
    let requests = [
        "CONNECT push.mattermost.com:http HTTP/1.1\r\nHost: x\r\n\r\n",
        "CONNECT bad_host!:443 HTTP/1.1\r\nHost: x\r\n\r\n",
        "CONNECT :443 HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /x HTTP/9.9\r\n\r\n",
    ];
    for (i, request) in requests.iter().enumerate() {
        let answer = raw_exchange(&env, request).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{request:?}: {answer}");
        // hyper answers before the proxy records: wait for the record.
        let deadline = Instant::now() + Duration::from_secs(10);
        while env.audit().len() < i + 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let audit = env.audit();
        assert_eq!(audit.len(), i + 1, "{request:?}: {audit:?}");
        assert_eq!(audit[i]["decision"], "blocked");
        assert_eq!(audit[i]["status"], 400);
    }
    // Not TLS inside an intercepted CONNECT: a record, not silence.
    let mut tcp = env.connect_tunnel(PUSH).await;
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n")
        .await
        .expect("write");
    let r = env
        .wait_for_record("client TLS hello failed", |r| {
            r["reason"]
                .as_str()
                .is_some_and(|s| s.starts_with("client TLS hello failed"))
        })
        .await;
    assert_eq!(r["decision"], "blocked");
    // Bytes: none for a GET; a chunked body streamed as it came (report mode) is counted.
    let out = env
        .curl(&[&format!("https://{SECURITY}/security?id=x")])
        .await;
    assert_eq!(out.code, 200);
    let r = env.audit().pop().expect("record");
    assert_eq!(
        (r["bytes_in"].clone(), r["bytes_out"].clone()),
        (0.into(), 0.into())
    );
    let body = fixture_body("push_full.json");
    let out = post(
        &env,
        RUDDER,
        "/v1/batch",
        &body,
        "--http1.1",
        &["-H", "Transfer-Encoding: chunked"],
    )
    .await;
    assert_eq!(out.code, 200, "{out:?}");
    let r = env.audit().pop().expect("record");
    assert_eq!(r["decision"], "would_block");
    assert_eq!(r["bytes_in"], body.len());
    assert_eq!(r["bytes_out"], body.len());
    env.stop().await;
}

/// Run the proxy binary with `policy`; it must exit within `within`. Returns code and stderr.
fn run_briefly(dir: &std::path::Path, policy: &str, within: Duration) -> (Option<i32>, String) {
    let path = dir.join("policy.toml");
    std::fs::write(&path, policy).expect("write");
    let mut child = bin()
        .arg("run")
        .arg("--config")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starts");
    let deadline = Instant::now() + within;
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (code, err)
}

#[test]
fn a_ca_key_others_can_read_stops_the_proxy() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = bin()
        .args(["ca", "init", "--dir"])
        .arg(dir.path().join("ca"))
        .output()
        .expect("ca init");
    assert!(out.status.success());
    let key = dir.path().join("ca/ca.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let policy = "[listen]\nproxy = \"127.0.0.1:0\"\n[tls]\nca_cert = \"ca/ca.pem\"\nca_key = \"ca/ca.key\"\n[audit]\npath = \"audit.jsonl\"\n";
    let (code, err) = run_briefly(dir.path(), policy, Duration::from_secs(5));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("chmod 600 {}", key.display())),
        "{err}"
    );
}

#[test]
fn an_audit_log_that_cannot_be_written_stops_the_proxy_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    for path in ["/dev/full", "/proc/version"] {
        let policy = format!(
            "[listen]\nproxy = \"127.0.0.1:0\"\n[tls]\nca_cert = \"ca.pem\"\nca_key = \"ca.key\"\n[audit]\npath = \"{path}\"\n"
        );
        let started = Instant::now();
        let (code, err) = run_briefly(dir.path(), &policy, Duration::from_secs(5));
        assert_eq!(code, Some(1), "{path}: {err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(err.contains(path), "{path}: {err}");
    }
}
