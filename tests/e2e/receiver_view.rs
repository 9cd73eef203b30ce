//! Ways around the policy, second pass: requests the proxy could read one way and the Go
//! receiver another (paths, query and form, repeated headers, names and addresses, allowlisted
//! names, container metadata), what could carry a value into the audit log or the diagnostics,
//! refusals h2 makes itself, consent changes during a reload, and removals named as received.
//! Each test failed on the proxy before it was hardened against its class.

use serde_json::Value;

use crate::harness::{curl, exchange, fixture_body, Env, Setup, PUSH, RUDDER, SECURITY};
use crate::raw_h2;

/// Diagnostics granted with activity counts withheld (the pack's batch rules are scoped to
/// `/v1/batch`), and a feature of our own on the same host, denied, for paths under `/v2/`.
const PATHED: &str = "[consent]\ndiagnostics = \"granted\"\npathed = \"denied\"\n\
withhold = [\"activity_counts\"]\n\
[[feature]]\nname = \"pathed\"\nhosts = [\"pdat.matterlytics.com\"]\npaths = [\"/v2/\"]\n";

/// POST a JSON `body` to `https://{host}{path}` with curl over `http`, the path sent as written.
async fn post_as_is(
    env: &Env,
    host: &str,
    path: &str,
    body: &str,
    http: &str,
) -> crate::harness::Curl {
    let file = env.dir.path().join("body.json");
    std::fs::write(&file, body).expect("write body");
    let data = format!("@{}", file.display());
    let url = format!("https://{host}{path}");
    env.curl(&[
        http,
        "--path-as-is",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &data,
        &url,
    ])
    .await
}

/// Go's `net/url` decodes the path into `URL.Path` and gorilla/mux (and `ServeMux`) route on
/// `cleanPath(URL.Path)`: a rule or a feature scoped to a path must see that path.
#[tokio::test]
async fn paths_are_decided_as_the_receiver_routes_them() {
    let env = Env::start(Setup {
        policy: PATHED,
        ..Setup::default()
    })
    .await;
    let batch = r#"{"batch":[{"event":"activity","properties":{"posts":7}},{"event":"server","properties":{}}]}"#;
    for http in ["--http1.1", "--http2"] {
        for path in [
            "/v1/%62atch",
            "/v1/x/../batch",
            "/./v1//batch",
            "/v1/%2e%2E/v1/batch",
        ] {
            let out = post_as_is(&env, RUDDER, path, batch, http).await;
            assert_eq!(out.code, 200, "{path} {http}: {out:?}");
            let got = env.upstream.requests().pop().expect("forwarded");
            assert_eq!(got.path_and_query, "/v1/batch", "{path} {http}");
            let json: Value = serde_json::from_slice(&got.body).expect("JSON");
            assert_eq!(
                json["batch"].as_array().map(Vec::len),
                Some(1),
                "{path} {http}"
            );
            let record = env.audit().pop().expect("record");
            assert_eq!(record["decision"], "stripped", "{path} {http}");
            assert_eq!(record["path"], "/v1/batch", "{path} {http}");
        }
        // Another feature's path, spelt so that a prefix of the raw bytes misses it.
        let before = env.upstream.requests().len();
        for path in ["/%762/x", "/v1/../v2/x", "//v2/x"] {
            let out = post_as_is(&env, RUDDER, path, batch, http).await;
            assert_eq!(out.code, 403, "{path} {http}: {out:?}");
            let record = env.audit().pop().expect("record");
            assert_eq!(record["feature"], "pathed", "{path} {http}");
        }
        // Read one way by one receiver and another by the next: refused, with a record.
        for (path, reason) in [
            (
                "/v1%2Fbatch",
                "request path has an encoded /, which receivers read differently",
            ),
            (
                "/v1;x/batch",
                "request path has a ; parameter, which receivers read differently",
            ),
            (
                "/v1/batch%00",
                "request path has a control character once decoded",
            ),
            ("/v1/%C0%AF", "request path is not UTF-8 once decoded"),
        ] {
            let out = post_as_is(&env, RUDDER, path, batch, http).await;
            assert_eq!(out.code, 400, "{path} {http}: {out:?}");
            let record = env.audit().pop().expect("record");
            assert_eq!(record["reason"], reason, "{path} {http}");
            assert_eq!(record["decision"], "blocked");
        }
        // `*` is for OPTIONS only, h2's `:path` included; it names no resource to forward.
        for method in ["GET", "OPTIONS"] {
            let url = format!("https://{RUDDER}/");
            let out = env
                .curl(&[http, "-X", method, "--request-target", "*", &url])
                .await;
            assert_eq!(out.code, 400, "{method} * {http}: {out:?}");
            let record = env.audit().pop().expect("record");
            assert_eq!(record["decision"], "blocked", "{method} * {http}");
        }
        assert_eq!(env.upstream.requests().len(), before, "{http}");
    }
    env.stop().await;
}

/// The security check replaced by a feature of our own: a header replaced, an allowlist of
/// query parameters.
const OWN_RULES: &str = "[consent]\nsecurity_alerts = \"granted\"\n\
[[feature]]\nname = \"security_alerts\"\nhosts = [\"securityupdatecheck.mattermost.com\"]\n\
  [[feature.rule]]\n  replace = { \"header:x-install-id\" = \"redacted\" }\n\
  [[feature.rule]]\n  keep = [\"query:id\", \"query:v\"]\n";

/// Go's `Header.Values` (and h2's repeated fields) read every instance of a header: each one is
/// replaced, over HTTP/1.1 and h2.
#[tokio::test]
async fn every_instance_of_a_header_is_replaced() {
    let env = Env::start(Setup {
        policy: OWN_RULES,
        ..Setup::default()
    })
    .await;
    let url = format!("https://{SECURITY}/security?id=1");
    for http in ["--http1.1", "--http2"] {
        let out = env
            .curl(&[
                http,
                "-H",
                "X-Install-Id: first",
                "-H",
                "x-install-id: SECRET-second",
                &url,
            ])
            .await;
        assert_eq!(out.code, 200, "{http}: {out:?}");
        let got = env.upstream.requests().pop().expect("forwarded");
        let values: Vec<_> = got.headers.get_all("x-install-id").iter().collect();
        assert_eq!(values, ["redacted"], "{http}");
        let record = env.audit().pop().expect("record");
        assert_eq!(record["decision"], "stripped", "{http}");
        assert_eq!(
            record["replaced"],
            serde_json::json!(["header:x-install-id"])
        );
    }
    // Raw HTTP/1.1, the two instances as separate lines.
    let request = format!(
        "GET /security?id=1 HTTP/1.1\r\nHost: {SECURITY}\r\nX-Install-Id: redacted\r\n\
         X-Install-Id: SECRET-second\r\nConnection: close\r\n\r\n"
    );
    let tcp = env.connect_tunnel(SECURITY).await;
    let mut tls = env.tls_client(tcp, SECURITY).await;
    let answer = exchange(&mut tls, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let got = env.upstream.requests().pop().expect("forwarded");
    let values: Vec<_> = got.headers.get_all("x-install-id").iter().collect();
    assert_eq!(values, ["redacted"]);
    env.stop().await;
}

/// Go's `url.Values` is a map keyed by the exact decoded name: `ID` and `ſid` are parameters
/// the allowlist did not name, so they go.
#[tokio::test]
async fn allowlists_keep_only_the_exact_names() {
    let env = Env::start(Setup {
        policy: OWN_RULES,
        ..Setup::default()
    })
    .await;
    for http in ["--http1.1", "--http2"] {
        let url =
            format!("https://{SECURITY}/security?id=1&ID=SECRET&%C5%BFid=SECRET&V=SECRET&v=2");
        let out = env.curl(&[http, &url]).await;
        assert_eq!(out.code, 200, "{http}: {out:?}");
        let got = env.upstream.requests().pop().expect("forwarded");
        assert_eq!(got.path_and_query, "/security?id=1&v=2", "{http}");
        let record = env.audit().pop().expect("record");
        assert_eq!(
            record["removed"],
            serde_json::json!(["keep:query(3)"]),
            "{http}"
        );
    }
    env.stop().await;
}

/// Several rules remove items of one batch: each is recorded at its position in the body the
/// client sent (a batch that lost items 1 and 2 is not recorded as `[1]` twice).
#[tokio::test]
async fn removals_are_recorded_where_the_client_sent_them() {
    let env = Env::start(Setup {
        policy: "[consent]\ndiagnostics = \"granted\"\n\
                 withhold = [\"activity_counts\", \"configuration\", \"versions_and_components\"]",
        ..Setup::default()
    })
    .await;
    let body = fixture_body("telemetry_batch_plain.json");
    let sent: Value = serde_json::from_slice(&body).expect("JSON");
    let expected: Vec<String> = sent["batch"]
        .as_array()
        .expect("batch")
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            let event = e["event"].as_str().unwrap_or_default();
            event == "activity"
                || event == "configs"
                || event.starts_with("config_")
                || event == "plugins"
                || event == "server"
                || event == "elasticsearch"
        })
        .map(|(i, _)| format!("json:$['batch'][{i}]"))
        .collect();
    assert!(expected.len() >= 3, "{expected:?}");
    for http in ["--http1.1", "--http2"] {
        let out = post_as_is(
            &env,
            RUDDER,
            "/v1/batch",
            std::str::from_utf8(&body).expect("utf-8"),
            http,
        )
        .await;
        assert_eq!(out.code, 200, "{http}: {out:?}");
        let record = env.audit().pop().expect("record");
        // The whole items (members of items are removed too, by the property rules).
        let whole_item = |s: &str| {
            s.strip_prefix("json:$['batch'][")
                .and_then(|rest| rest.strip_suffix(']'))
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        };
        let mut removed: Vec<String> = record["removed"]
            .as_array()
            .expect("removed")
            .iter()
            .filter_map(|v| v.as_str().filter(|s| whole_item(s)).map(str::to_string))
            .collect();
        removed.sort();
        let mut want = expected.clone();
        want.sort();
        assert_eq!(removed, want, "{http}");
    }
    env.stop().await;
}

/// A body the proxy decoded leaves without what its decoder skipped: gzip's name, comment and
/// extra fields and zstd's skippable frames are a channel past the rules even when no rule
/// changes the content.
#[tokio::test]
async fn container_metadata_does_not_leave() {
    use std::io::Write;
    let env = Env::start(Setup::default()).await;
    // A push the rules read and leave as it is (nothing withheld is in it).
    let plain = br#"{"ack_id":"a1","platform":"android","server_id":"s1","device_id":"d1","type":"clear","badge":0}"#;
    let mut gz = flate2::GzBuilder::new()
        .filename("SECRET-name")
        .comment("SECRET-comment")
        .extra(b"SECRET-extra".to_vec())
        .write(Vec::new(), flate2::Compression::default());
    gz.write_all(plain).expect("gzip");
    let gzip = gz.finish().expect("gzip");
    let mut zst = Vec::new();
    zst.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
    zst.extend_from_slice(&13u32.to_le_bytes());
    zst.extend_from_slice(b"SECRET-frame!");
    zst.extend(zstd::encode_all(&plain[..], 3).expect("zstd"));
    for (coding, wire) in [("gzip", gzip), ("zstd", zst)] {
        assert!(wire.windows(6).any(|w| w == b"SECRET"));
        for http in ["--http1.1", "--http2"] {
            let file = env.dir.path().join("body.bin");
            std::fs::write(&file, &wire).expect("write");
            let data = format!("@{}", file.display());
            let url = format!("https://{PUSH}/api/v1/send_push");
            let header = format!("Content-Encoding: {coding}");
            let out = env
                .curl(&[
                    http,
                    "-H",
                    "Content-Type:",
                    "-H",
                    &header,
                    "--data-binary",
                    &data,
                    &url,
                ])
                .await;
            assert_eq!(out.code, 200, "{coding} {http}: {out:?}");
            let got = env.upstream.requests().pop().expect("forwarded");
            assert!(
                !got.body.windows(6).any(|w| w == b"SECRET"),
                "{coding} {http}: metadata left"
            );
            let decoded = match coding {
                "gzip" => {
                    let mut out = Vec::new();
                    std::io::Read::read_to_end(
                        &mut flate2::read::MultiGzDecoder::new(&got.body[..]),
                        &mut out,
                    )
                    .expect("gzip");
                    out
                }
                _ => zstd::decode_all(&got.body[..]).expect("zstd"),
            };
            assert_eq!(decoded, plain, "{coding} {http}");
            let record = env.audit().pop().expect("record");
            assert_eq!(record["decision"], "allowed", "{coding} {http}");
        }
    }
    env.stop().await;
}

/// Member names a pattern matched are the client's text: a 60 KiB name carrying a secret is
/// recorded as the selector and a count, never as itself.
#[tokio::test]
async fn names_in_the_record_are_bounded() {
    let env = Env::start(Setup {
        policy: "[consent]\ndiagnostics = \"granted\"\nwithhold = [\"enterprise_features\"]",
        ..Setup::default()
    })
    .await;
    let name = format!("feature_SECRET{}", "x".repeat(60 << 10));
    let body =
        format!(r#"{{"batch":[{{"event":"license","properties":{{"{name}":true,"id":"l"}}}}]}}"#);
    for http in ["--http1.1", "--http2"] {
        let out = post_as_is(&env, RUDDER, "/v1/batch", &body, http).await;
        assert_eq!(out.code, 200, "{http}: {out:?}");
        let got = env.upstream.requests().pop().expect("forwarded");
        assert!(
            !String::from_utf8_lossy(&got.body).contains("SECRET"),
            "{http}"
        );
        let record = env.audit().pop().expect("record");
        assert_eq!(record["decision"], "stripped");
        assert_eq!(
            record["removed"],
            serde_json::json!([
                "json:$.batch[?@.event == 'license'].properties.feature_* (1 match)"
            ])
        );
    }
    assert!(!env.audit_text().contains("SECRET"));
    assert!(env.audit_text().len() < 8 << 10);
    env.stop().await;
}

/// The binary's diagnostics at `debug` and `trace` carry no value a request held: dependency
/// crates stay at `warn` unless their switch is set (h2 logs a malformed `:path` whole at
/// `debug`). What the proxy logs itself names decisions, never values.
#[tokio::test]
async fn diagnostics_at_every_level_hold_no_values() {
    let env = Env::start(Setup::default()).await;
    for level in ["debug", "trace"] {
        let (proxy, addr) = env.spawn_binary(&[("RUST_LOG", level)]).await;
        for http in ["--http1.1", "--http2"] {
            let url = format!("https://{SECURITY}/security?id=x&uc=SECRET-Q");
            let args = [http, "-H", "X-Token: SECRET-H", &url];
            let out = curl(addr, &env.ca_pem, env.dir.path(), &args).await;
            assert_eq!(out.code, 200, "{level} {http}: {out:?}");
            let body = r#"{"ack_id":"a","platform":"p","server_id":"s","device_id":"d","message":"SECRET-B"}"#;
            let url = format!("https://{PUSH}/api/v1/send_push?x=SECRET-P");
            let args = [http, "--data-binary", body, "-H", "Content-Type:", &url];
            let out = curl(addr, &env.ca_pem, env.dir.path(), &args).await;
            assert_eq!(out.code, 200, "{level} {http}: {out:?}");
        }
        // A `:path` h2 refuses as malformed, holding a value.
        let mut tls = env.h2_inside(addr, SECURITY).await;
        let fields = [
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", SECURITY),
            (":path", "/security?id=SECRET-MALFORMED x"),
        ];
        assert_eq!(
            raw_h2::request(&mut tls, &fields, b"").await,
            raw_h2::Answer::Reset(1)
        );
        drop(proxy);
        let log = std::fs::read_to_string(env.dir.path().join("stderr.log")).expect("log");
        assert!(log.contains("DEBUG"), "{level}: nothing logged at {level}");
        if let Some(at) = log.find("SECRET") {
            panic!(
                "{level}: a value in the diagnostics: {}",
                &log[at.saturating_sub(200)..]
            );
        }
    }
    env.stop().await;
}

/// A feature host's address spelt otherwise (`inet_aton`'s numeric forms, which `getaddrinfo`
/// and so the dialer accept) or reached by an alias (`localhost`) is still that feature's
/// address: refused after resolution and before any byte leaves, for plain-HTTP absolute-form
/// requests and CONNECT tunnels alike.
#[tokio::test]
async fn a_feature_address_is_one_whatever_the_spelling() {
    let env = Env::start(Setup::default()).await;
    // The fake upstream serves every feature host; 127.0.0.1:<its port> is their address.
    let port = env.upstream.addr.port();
    for host in [
        "2130706433",
        "0x7f000001",
        "127.1",
        "0177.0.0.1",
        "localhost",
    ] {
        let url = format!("http://{host}:{port}/v1/batch");
        let out = env.curl(&["-X", "POST", "--data-binary", "{}", &url]).await;
        assert_eq!(out.code, 400, "{host}: {out:?}");
        let record = env.audit().pop().expect("record");
        assert_eq!(record["decision"], "blocked", "{host}");
        assert!(record["feature"].is_string(), "{host}: {record}");
        assert_eq!(
            record["reason"],
            "the destination is a feature host's address, and the name is not one of that \
             feature's hosts",
            "{host}"
        );
        let answer = crate::bad_input::raw_exchange(
            &env,
            &format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"),
        )
        .await;
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "CONNECT {host}: {answer}"
        );
    }
    assert_eq!(
        env.upstream
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a feature address was reached under another name"
    );
    env.stop().await;
}

/// `Request.FormValue` reads the query, an urlencoded body and multipart/form-data parts as one
/// namespace: a `query:` rule reaches a form body and a `form:` rule the query. What left is
/// read back with Go's `ParseMultipartForm` (tests/goform).
#[tokio::test]
async fn query_and_form_are_one_namespace() {
    let policy = "[consent]\nsecurity_alerts = \"granted\"\n\
        [[feature]]\nname = \"security_alerts\"\nhosts = [\"securityupdatecheck.mattermost.com\"]\n\
          [[feature.rule]]\n  remove = [\"form:sid\", \"query:uc\"]\n";
    let env = Env::start(Setup {
        policy,
        ..Setup::default()
    })
    .await;
    let goform = crate::harness::go_build("goform");
    let secret_file = env.dir.path().join("secret.txt");
    std::fs::write(&secret_file, "SECRET-FILE").expect("write");
    let file_part = format!("sid=@{}", secret_file.display());
    let url = format!("https://{SECURITY}/security?sid=SECRET-Q&v=1");
    let cases: [(&str, Vec<&str>); 3] = [
        ("get", vec![]),
        (
            "urlencoded",
            vec!["--data-binary", "UC=SECRET-B&id=x&s%69d=SECRET-C"],
        ),
        (
            "multipart",
            vec!["-F", "uc=SECRET-M", "-F", "id=x", "-F", &file_part],
        ),
    ];
    for http in ["--http1.1", "--http2"] {
        for (what, extra) in &cases {
            let mut args = vec![http];
            args.extend(extra.iter().copied());
            args.push(&url);
            let out = env.curl(&args).await;
            assert_eq!(out.code, 200, "{what} {http}: {out:?}");
            let got = env.upstream.requests().pop().expect("forwarded");
            assert!(
                !got.path_and_query.contains("SECRET")
                    && !String::from_utf8_lossy(&got.body).contains("SECRET"),
                "{what} {http}: {} {}",
                got.path_and_query,
                String::from_utf8_lossy(&got.body)
            );
            let record = env.audit().pop().expect("record");
            assert_eq!(record["decision"], "stripped", "{what} {http}");
            let Some(goform) = &goform else { continue };
            // Go reads what left: the parameters the rules named are gone, the others are there.
            let body = env.dir.path().join("left.bin");
            std::fs::write(&body, &got.body).expect("write");
            let content_type = got
                .headers
                .get("content-type")
                .map_or("", |v| v.to_str().unwrap_or(""))
                .to_string();
            let out = std::process::Command::new(goform)
                .arg(format!("https://{SECURITY}{}", got.path_and_query))
                .arg(&content_type)
                .arg(&body)
                .output()
                .expect("goform runs");
            assert!(
                out.status.success(),
                "{what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let names = String::from_utf8_lossy(&out.stdout).to_string();
            let names: Vec<&str> = names.lines().collect();
            for gone in ["sid", "uc", "UC"] {
                assert!(
                    !names.contains(&gone),
                    "{what} {http}: Go reads {gone}: {names:?}"
                );
            }
            assert!(names.contains(&"v"), "{what} {http}: {names:?}");
            if *what != "get" {
                assert!(names.contains(&"id"), "{what} {http}: {names:?}");
            }
        }
    }
    // A multipart body that cannot be read one way only: refused, with a record.
    let before = env.upstream.requests().len();
    let bad = "--b\r\nContent-Disposition: form-data; name*=UTF-8''uc\r\n\r\nSECRET\r\n--b--\r\n";
    let out = env
        .curl(&[
            "-H",
            "Content-Type: multipart/form-data; boundary=b",
            "--data-binary",
            bad,
            &url,
        ])
        .await;
    assert_eq!(out.code, 415, "{out:?}");
    let record = env.audit().pop().expect("record");
    assert_eq!(
        record["reason"],
        "multipart/form-data body cannot be read unambiguously"
    );
    assert_eq!(env.upstream.requests().len(), before);
    env.stop().await;
}

/// Requests the HTTP/2 layer refuses itself (reset before the exchange sees them) leave a
/// record each, like every other refusal.
#[tokio::test]
async fn streams_h2_resets_are_recorded() {
    let env = Env::start(Setup::default()).await;
    let base = [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", SECURITY),
        (":path", "/security?id=x"),
    ];
    let with = |extra: (&'static str, &'static str)| {
        let mut fields = base.to_vec();
        fields.push(extra);
        fields
    };
    // h2 resets a stream for a malformed head, and ends the connection for a field it cannot
    // decode at all (an upper-case name).
    let (stream, connection) = (
        (raw_h2::Answer::Reset(1), "HTTP/2 stream 1 reset"),
        (raw_h2::Answer::GoAway(1), "HTTP/2 connection closed"),
    );
    let cases: Vec<(&str, Vec<(&str, &str)>, _)> = vec![
        (
            "malformed :path",
            {
                let mut f = base.to_vec();
                f[3] = (":path", "/security?id=SECRET x");
                f
            },
            stream,
        ),
        (":status in a request", with((":status", "200")), stream),
        (
            "connection-specific field",
            with(("connection", "close")),
            stream,
        ),
        ("missing :method", base[1..].to_vec(), stream),
        ("upper-case field name", with(("X-Upper", "1")), connection),
    ];
    for (i, (what, fields, (answer, reason))) in cases.iter().enumerate() {
        let mut tls = env.h2_inside(env.proxy, SECURITY).await;
        assert_eq!(
            &raw_h2::request(&mut tls, fields, b"").await,
            answer,
            "{what}"
        );
        drop(tls);
        let record = env
            .wait_for_record(what, |r| {
                r["reason"].as_str().is_some_and(|s| s.starts_with(reason))
                    && r["seq"].as_u64().is_some_and(|seq| seq as usize >= i + 2)
            })
            .await;
        assert_eq!(record["decision"], "blocked", "{what}");
        assert_eq!(record["host"], SECURITY, "{what}");
        assert!(
            record["reason"]
                .as_str()
                .is_some_and(|s| s.contains("PROTOCOL_ERROR")),
            "{what}: {record}"
        );
    }
    let refusals = env
        .audit()
        .iter()
        .filter(|r| {
            r["reason"]
                .as_str()
                .is_some_and(|s| s.starts_with("HTTP/2 "))
        })
        .count();
    assert_eq!(refusals, cases.len(), "one record per refusal");
    assert!(env.upstream.requests().is_empty());
    assert!(!env.audit_text().contains("SECRET"));
    // A well-formed request on the same kind of connection is answered and recorded once.
    let mut tls = env.h2_inside(env.proxy, SECURITY).await;
    assert_eq!(
        raw_h2::request(&mut tls, &base, b"").await,
        raw_h2::Answer::Response
    );
    env.stop().await;
}

/// The proxy's normalized path is the one Go routes on (tests/gopath: `url.ParseRequestURI`,
/// then net/http's `cleanPath`), for every path it accepts; what it refuses as ambiguous, Go
/// reads otherwise than its bytes say (an encoded `/` becomes a separator) or refuses.
#[test]
fn normalized_paths_are_the_paths_go_routes_on() {
    use consent_proxy::decide::path::normalize;
    let Some(gopath) = crate::harness::go_build("gopath") else {
        return;
    };
    let paths = [
        "/api/v1/send_push",
        "/%61pi/v1/send%5Fpush",
        "/x/../api/v1/send_push",
        "/./api//v1/./send_push",
        "/../../v1/batch",
        "/v1/%2E%2E/v1/batch",
        "/v1/batch/.",
        "/v1/x/..",
        "//",
        "/a%20b",
        "/caf%C3%A9",
        "/v1/batch/",
        "/v1/%7Euser",
        "/v1/a+b",
        "/v1/%3F",
        "/api%2Fv1/send_push",
        "/v1/%zz",
        "/v1/%6",
        "/v1/batch%00",
        "/api;x/v1",
    ];
    let mut child = std::process::Command::new(&gopath)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gopath runs");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        for p in paths {
            writeln!(stdin, "{p}").expect("write");
        }
    }
    let out = child.wait_with_output().expect("gopath ends");
    let go = String::from_utf8(out.stdout).expect("utf-8");
    let go: Vec<&str> = go.lines().collect();
    assert_eq!(go.len(), paths.len());
    let mut refused = 0;
    for (raw, go) in paths.iter().zip(go) {
        match normalize(&http::Method::GET, raw) {
            Ok(ours) => assert_eq!(
                ours, go,
                "{raw}: the proxy decides on {ours}, Go routes {go}"
            ),
            Err(_) => {
                refused += 1;
                // Go refuses it too, or reads a path whose bytes say otherwise.
                assert!(
                    go == "ERROR"
                        || raw.contains("%2F")
                        || raw.contains(';')
                        || raw.contains("%00"),
                    "{raw}: Go routes {go}"
                );
            }
        }
    }
    assert_eq!(refused, 5);
}
