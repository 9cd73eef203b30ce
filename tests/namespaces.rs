//! Tests that need root and namespaces of their own.
//!
//! Transparent interception for real: a network namespace of our own, fake upstreams on their
//! own addresses in it, an `iptables -t nat … REDIRECT` rule sending every TCP connection of
//! non-root users to the proxy's transparent listener, and clients (curl, bash) that run as
//! `nobody` with no proxy configured.
//!
//! The outer test makes the namespace and runs this same test binary inside it
//! (`ip netns exec`), where the inner test sets up addresses and rules and drives the cases. It
//! needs root, iproute2, iptables and setpriv: under `CI=true` it must run; elsewhere it skips
//! with a message saying what is missing.

#[allow(dead_code)]
#[path = "e2e/harness.rs"]
mod harness;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::time::Duration;

use harness::{echo_server_on, fixture_body, UpstreamPki, PUSH, RUDDER, TUNNELLED};

const INNER: &str = "inner_transparent_cases";
const PUSH_IP: &str = "10.201.0.10";
const TLS_ELSEWHERE_IP: &str = "10.201.0.11";
const RUDDER_IP: &str = "10.201.0.12";
const ECHO_IP: &str = "10.201.0.13";
const PUSH_IP6: &str = "fd00:201::10";
const NOBODY: &str = "65534";

#[test]
fn transparent_interception_in_a_network_namespace() {
    in_namespace(INNER);
}

#[test]
fn an_unwritable_audit_log_blocks_inspected_traffic() {
    in_namespace("inner_audit_failure");
}

/// Run the ignored test `inner` of this binary inside a fresh network namespace (which also
/// gives it a private mount namespace), or skip with a message where that cannot be done.
fn in_namespace(inner: &str) {
    if let Some(missing) = missing_prerequisite() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the namespace tests must run under CI=true, but {missing}"
        );
        eprintln!("skipping {inner}: {missing}");
        return;
    }
    let ns = format!("cpt{}-{}", std::process::id(), inner.len());
    let etc = PathBuf::from(format!("/etc/netns/{ns}"));
    assert!(
        run("ip", &["netns", "add", &ns]).status.success(),
        "ip netns add"
    );
    // Name lookups inside fail at once instead of waiting for a resolver that is not there.
    std::fs::create_dir_all(&etc).expect("mkdir /etc/netns");
    std::fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.1\n").expect("resolv.conf");
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(&exe)
        .args([
            "--exact",
            inner,
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CONSENT_PROXY_NETNS_INNER", "1")
        .output()
        .expect("runs ip netns exec");
    let _ = run("ip", &["netns", "del", &ns]);
    let _ = std::fs::remove_dir_all(&etc);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{inner} failed:\n{text}");
    assert!(text.contains("1 passed"), "{inner} did not run:\n{text}");
}

fn missing_prerequisite() -> Option<String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if uid.as_deref().ok() != Some("0") {
        return Some("it needs root (network namespaces, iptables)".into());
    }
    for (tool, args) in [
        ("ip", &["netns", "list"][..]),
        ("iptables", &["-V"][..]),
        ("ip6tables", &["-V"][..]),
        ("setpriv", &["--version"][..]),
        ("curl", &["--version"][..]),
    ] {
        match Command::new(tool).args(args).output() {
            Ok(o) if o.status.success() => {}
            _ => {
                return Some(format!(
                    "`{tool}` is not available (install iproute2, iptables, util-linux, curl)"
                ))
            }
        }
    }
    None
}

fn run(tool: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"))
}

/// `run` for async tests: a blocking wait would stall the proxy running on the same runtime.
async fn run_async(tool: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(tool)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("{tool}: {e}"))
}

fn must(tool: &str, args: &[&str]) {
    let out = run(tool, args);
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run a command as `nobody` (so the REDIRECT rule catches its connections).
async fn as_nobody(program: &str, args: &[String]) -> Output {
    tokio::process::Command::new("setpriv")
        .args([
            "--reuid",
            NOBODY,
            "--regid",
            NOBODY,
            "--clear-groups",
            program,
        ])
        .args(args)
        .output()
        .await
        .expect("setpriv runs")
}

fn curl_args(ca: &Path, resolve: &str, extra: &[&str], url: &str) -> Vec<String> {
    let mut a: Vec<String> = [
        "-sS",
        "--max-time",
        "10",
        "--noproxy",
        "*",
        "-o",
        "/dev/stdout",
        "-w",
        "\n%{http_code}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend([
        "--cacert".into(),
        ca.display().to_string(),
        "--resolve".into(),
        resolve.into(),
    ]);
    a.extend(extra.iter().map(|s| s.to_string()));
    a.push(url.into());
    a
}

/// Write `policy` into `dir` and start the proxy on it, in this process.
async fn start_proxy(dir: &Path, policy: &str) -> consent_proxy::Running {
    let path = dir.join("policy.toml");
    std::fs::write(&path, policy).expect("write");
    let config = consent_proxy::config::load(Some(&path), None).expect("policy");
    consent_proxy::start(config).await.expect("proxy starts")
}

fn audit(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|r: &serde_json::Value| r["decision"] != "policy_loaded")
        .collect()
}

async fn wait_for(
    path: &Path,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    for _ in 0..200 {
        if let Some(r) = audit(path).into_iter().find(|r| pred(r)) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no audit record: {what}\n{:?}", audit(path));
}

/// Whether this runs inside the namespace made by `in_namespace` (then `lo` is brought up);
/// run directly, an inner test does nothing.
fn entered_namespace() -> bool {
    if std::env::var("CONSENT_PROXY_NETNS_INNER").is_err() {
        return false;
    }
    must("ip", &["link", "set", "lo", "up"]);
    true
}

#[tokio::test]
#[ignore = "runs inside the namespace made by transparent_interception_in_a_network_namespace"]
async fn inner_transparent_cases() {
    if !entered_namespace() {
        return;
    }
    for ip in [PUSH_IP, TLS_ELSEWHERE_IP, RUDDER_IP, ECHO_IP] {
        must("ip", &["addr", "add", &format!("{ip}/32"), "dev", "lo"]);
    }
    must(
        "ip",
        &[
            "-6",
            "addr",
            "add",
            &format!("{PUSH_IP6}/128"),
            "dev",
            "lo",
            "nodad",
        ],
    );

    // A folder `nobody` can read: the interception CA, the upstream CA, the request bodies.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let pki = UpstreamPki::new();
    std::fs::write(dir.path().join("upstream-ca.pem"), &pki.ca_pem).expect("write");
    std::fs::write(dir.path().join("push.json"), fixture_body("push_full.json")).expect("write");
    let addr =
        |ip: &str, port: u16| -> SocketAddr { format!("{ip}:{port}").parse().expect("addr") };
    let push = pki
        .serve_on(addr(PUSH_IP, 443), &[b"h2", b"http/1.1"])
        .await;
    let push6 = pki
        .serve_on(
            format!("[{PUSH_IP6}]:443").parse().expect("addr"),
            &[b"h2", b"http/1.1"],
        )
        .await;
    let elsewhere = pki
        .serve_on(addr(TLS_ELSEWHERE_IP, 443), &[b"http/1.1"])
        .await;
    let rudder = pki.serve_on(addr(RUDDER_IP, 443), &[b"http/1.1"]).await;
    let (_, echoed) = echo_server_on(addr(ECHO_IP, 443)).await;

    let policy = format!(
        "[listen]\nproxy = \"127.0.0.1:0\"\ntransparent = \"[::]:0\"\n[clients]\nallow = [\"127.0.0.0/8\", \"10.201.0.0/24\", \"::1/128\", \"fd00:201::/64\"]\n[tls]\nca_cert = \"ca.pem\"\nca_key = \"ca.key\"\n\
         [upstream]\nextra_ca = [\"upstream-ca.pem\"]\nresolve = {{ \"{PUSH}:443\" = \"{PUSH_IP}:443\", \"{RUDDER}:443\" = \"{RUDDER_IP}:443\" }}\n\
         [audit]\npath = \"audit.jsonl\"\n"
    );
    let running = start_proxy(dir.path(), &policy).await;
    let transparent = running
        .started
        .transparent_addr
        .expect("transparent listener");
    let explicit = running.started.proxy_addr;
    let log = dir.path().join("audit.jsonl");
    let ca = dir.path().join("ca.pem");
    std::fs::set_permissions(&ca, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");

    // Every TCP connection of a non-root user goes to the proxy; root (the proxy) is exempt.
    // The listener is dual-stack ([::]), so one port takes both tables' redirects.
    let port = transparent.port().to_string();
    for table in ["iptables", "ip6tables"] {
        let rule = [
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-m",
            "owner",
            "!",
            "--uid-owner",
            "0",
        ];
        must(
            table,
            &[&rule[..], &["-j", "REDIRECT", "--to-ports", &port]].concat(),
        );
    }

    // 1. A feature host is intercepted and stripped, over IPv4 and over IPv6
    //    (IP6T_SO_ORIGINAL_DST); the client has no proxy configured.
    let body = format!("@{}", dir.path().join("push.json").display());
    let url = format!("https://{PUSH}/api/v1/send_push");
    for (ip, upstream) in [
        (PUSH_IP.to_string(), &push),
        (format!("[{PUSH_IP6}]"), &push6),
    ] {
        let resolve = format!("{PUSH}:443:{ip}");
        let args = curl_args(&ca, &resolve, &["-X", "POST", "--data-binary", &body], &url);
        let out = as_nobody("curl", &args).await;
        let text = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            text.ends_with("\n200"),
            "push to {ip}: {text} {stderr}\n{:?}",
            audit(&log)
        );
        let got = upstream
            .requests()
            .pop()
            .expect("the push upstream got the request");
        let json: serde_json::Value = serde_json::from_slice(&got.body).expect("JSON");
        assert_eq!(json["message"], "You've received a new message.");
        assert!(json.get("channel_name").is_none() && json.get("sender_name").is_none());
        let dst = format!("{ip}:443");
        let record = wait_for(&log, "push stripped", |r| r["original_dst"] == dst).await;
        assert_eq!(record["listener"], "transparent");
        assert_eq!(record["decision"], "stripped");
        assert_eq!(record["host"], PUSH);
    }

    // 2. A denied feature is blocked: the upstream never sees a connection.
    let out = as_nobody(
        "curl",
        &curl_args(
            &ca,
            &format!("{RUDDER}:443:{RUDDER_IP}"),
            &["-X", "POST", "-d", "{}"],
            &format!("https://{RUDDER}/v1/batch"),
        ),
    )
    .await;
    assert!(!out.status.success(), "diagnostics must not get through");
    assert_eq!(
        rudder.connections.load(Ordering::SeqCst),
        0,
        "the denied upstream saw a connection"
    );
    let record = wait_for(&log, "diagnostics blocked", |r| r["host"] == RUDDER).await;
    assert_eq!(
        (record["decision"].as_str(), record["feature"].as_str()),
        (Some("blocked"), Some("diagnostics"))
    );

    // 3. An unknown host is tunnelled without decryption: the client sees the real upstream's
    //    certificate (it trusts only the upstream CA here).
    let upstream_ca = dir.path().join("upstream-ca.pem");
    let out = as_nobody(
        "curl",
        &curl_args(
            &upstream_ca,
            &format!("{TUNNELLED}:443:{TLS_ELSEWHERE_IP}"),
            &[],
            &format!("https://{TUNNELLED}/hello"),
        ),
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("\n200"),
        "tunnelled TLS: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        elsewhere.requests().pop().expect("request").path_and_query,
        "/hello"
    );
    let record = wait_for(&log, "tunnel", |r| r["host"] == TUNNELLED).await;
    assert_eq!(record["decision"], "tunneled");

    // 4. Another protocol to an unknown address is tunnelled byte for byte.
    let payload: String = (0..2000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let expected = format!("SSH-2.0-test {payload}");
    let script = format!(
        "exec 3<>/dev/tcp/{ECHO_IP}/443; printf '%s' '{expected}' >&3; head -c {} <&3",
        expected.len()
    );
    let out = as_nobody("bash", &["-c".into(), script]).await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        expected,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&echoed.lock().expect("lock")),
        expected,
        "bytes at the upstream differ"
    );
    wait_for(&log, "raw tunnel", |r| {
        r["host"] == ECHO_IP && r["decision"] == "tunneled"
    })
    .await;

    // 5. Lying in SNI: an unknown name at a feature host's address is refused.
    let out = as_nobody(
        "curl",
        &curl_args(
            &upstream_ca,
            &format!("{TUNNELLED}:443:{RUDDER_IP}"),
            &[],
            &format!("https://{TUNNELLED}/"),
        ),
    )
    .await;
    assert!(!out.status.success(), "an SNI lie got through");
    assert_eq!(rudder.connections.load(Ordering::SeqCst), 0);
    let record = wait_for(&log, "SNI lie", |r| {
        r["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("SNI names a host of no feature")
    })
    .await;
    assert_eq!(record["feature"], "diagnostics");

    // 7. Plain HTTP to one feature's address with a `Host` of another feature (push is granted,
    //    diagnostics denied): the address decides, nothing reaches diagnostics' upstream.
    let out = as_nobody(
        "curl",
        &[
            "-sS".into(),
            "--max-time".into(),
            "5".into(),
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{http_code}".into(),
            "--resolve".into(),
            format!("{PUSH}:443:{RUDDER_IP}"),
            "--data-binary".into(),
            "{}".into(),
            format!("http://{PUSH}:443/api/v1/send_push"),
        ],
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "400", "{out:?}");
    assert_eq!(rudder.connections.load(Ordering::SeqCst), 0);
    let record = wait_for(&log, "another feature's Host", |r| {
        r["host"] == PUSH && r["original_dst"] == format!("{RUDDER_IP}:443")
    })
    .await;
    assert_eq!(record["decision"], "blocked");
    assert_eq!(record["feature"], "diagnostics");

    // 6. Loops: a redirected connection to the proxy's own explicit listener, and a connection to
    //    the transparent port that was never redirected, are refused.
    let out = as_nobody(
        "curl",
        &[
            "-sS".into(),
            "--max-time".into(),
            "5".into(),
            format!("http://{explicit}/"),
        ],
    )
    .await;
    assert!(
        !out.status.success(),
        "a loop through the proxy got an answer"
    );
    wait_for(&log, "loop", |r| {
        r["reason"]
            .as_str()
            .unwrap_or("")
            .contains("is the proxy itself")
            && r["original_dst"] == explicit.to_string()
    })
    .await;
    let out = run_async(
        "curl",
        &[
            "-sS",
            "--max-time",
            "5",
            &format!("http://127.0.0.1:{}/", transparent.port()),
        ],
    )
    .await;
    assert!(
        !out.status.success(),
        "a direct connection to the transparent port got an answer"
    );
    let port = format!(":{}", transparent.port());
    wait_for(&log, "no redirect", |r| {
        let reason = r["reason"].as_str().unwrap_or("");
        let dst = r["original_dst"].as_str().unwrap_or("");
        reason.contains("is the proxy itself") && dst.ends_with(&port)
    })
    .await;

    running.shutdown(Duration::from_secs(5)).await;
    match consent_proxy::audit::verify_chain(&log, &[])
        .expect("reads")
        .verdict
    {
        consent_proxy::audit::Verdict::Intact { .. } => {}
        broken => panic!("{broken:?}"),
    }
}

/// The audit log's filesystem fills up mid-run (a 64 KiB tmpfs in this test's private mount
/// namespace): inspected requests are refused with 503 instead of leaving unaudited, and
/// `/readyz` says why.
#[tokio::test]
#[ignore = "runs inside the namespace made by an_unwritable_audit_log_blocks_inspected_traffic"]
async fn inner_audit_failure() {
    if !entered_namespace() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let small = dir.path().join("audit-fs");
    std::fs::create_dir_all(&small).expect("mkdir");
    must(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=64k",
            "tmpfs",
            &small.display().to_string(),
        ],
    );

    let pki = UpstreamPki::new();
    std::fs::write(dir.path().join("upstream-ca.pem"), &pki.ca_pem).expect("write");
    let upstream = pki.serve(&[b"http/1.1"]).await;
    let policy = format!(
        "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[tls]\nca_cert = \"ca.pem\"\nca_key = \"ca.key\"\n\
         [upstream]\nextra_ca = [\"upstream-ca.pem\"]\nresolve = {{ \"{PUSH}:443\" = \"{}\" }}\n\
         [audit]\npath = \"audit-fs/audit.jsonl\"\n",
        upstream.addr
    );
    let running = start_proxy(dir.path(), &policy).await;
    let (proxy, admin) = (
        running.started.proxy_addr,
        running.started.admin_addr.expect("admin"),
    );
    let ca = dir.path().join("ca.pem").display().to_string();
    let push = |body: &'static str| {
        let (ca, url) = (ca.clone(), format!("https://{PUSH}/api/v1/send_push"));
        async move {
            let out = tokio::process::Command::new("curl")
                .args([
                    "-sS",
                    "--max-time",
                    "10",
                    "--proxy",
                    &format!("http://{proxy}"),
                    "--cacert",
                    &ca,
                ])
                .args([
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "-X",
                    "POST",
                    "--data-binary",
                    body,
                    &url,
                ])
                .output()
                .await
                .expect("curl");
            String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
        }
    };
    let readyz = || async move {
        let out = run_async(
            "curl",
            &[
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{admin}/readyz"),
            ],
        )
        .await;
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(push("{\"message\":\"one\"}").await, "200");
    assert_eq!(readyz().await, "200");

    // Fill the audit filesystem to the last byte.
    let filler = small.join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 64 * 1024]);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&filler)
        .expect("filler");
    while std::io::Write::write_all(&mut file, &[0u8; 64]).is_ok() {}
    drop(file);

    // Records still fit in the audit file's last page; the first that does not is refused
    // with 503 before its request leaves (write-ahead). From then on every inspected request
    // is refused before it leaves, and no partial line is left in the log.
    let log = small.join("audit.jsonl");
    let mut refused = 0;
    for _ in 0..200 {
        match push("{\"message\":\"two\"}").await.as_str() {
            "200" => {}
            "503" => {
                refused += 1;
                break;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(refused, 1, "the audit log never failed to write");
    let left = upstream.requests().len();
    assert_eq!(readyz().await, "503");
    for _ in 0..3 {
        assert_eq!(push("{\"message\":\"three\"}").await, "503");
        refused += 1;
    }
    // A tunnel does not open either.
    let (echo, echoed) = echo_server_on("127.0.0.1:0".parse().expect("addr")).await;
    let tunnel = run_async(
        "curl",
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_connect}",
            "--max-time",
            "5",
            "--proxy",
            &format!("http://{proxy}"),
            &format!("https://{echo}/"),
        ],
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&tunnel.stdout), "503");
    assert!(
        echoed.lock().expect("lock").is_empty(),
        "bytes went through"
    );
    refused += 1;
    assert_eq!(
        upstream.requests().len(),
        left,
        "requests left while the audit log was unwritable"
    );
    let text = std::fs::read(&log).expect("log");
    assert_eq!(
        text.last(),
        Some(&b'\n'),
        "a partial line was left in the log"
    );
    let records_while_full = text.split(|&b| b == b'\n').count();

    // Space comes back: traffic and /readyz recover by themselves, and the first record after
    // says how many decisions went unrecorded.
    std::fs::remove_file(&filler).expect("free space");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while readyz().await != "200" {
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz never recovered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(push("{\"message\":\"four\"}").await, "200");
    assert_eq!(upstream.requests().len(), left + 1);
    running.flush_audit().expect("writable again");
    let text = std::fs::read_to_string(&log).expect("log");
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line a whole record"))
        .collect();
    let recovered = &records[records_while_full - 1];
    assert_eq!(recovered["decision"], "recovered", "{recovered}");
    let reason = recovered["reason"].as_str().expect("reason");
    assert!(
        reason.contains(&format!("{refused} decision(s) went unrecorded")),
        "{reason}"
    );
    // Every request the upstream received has its record.
    let forwarded = records
        .iter()
        .filter(|r| r["feature"] == "push_notifications" && r["decision"] != "blocked")
        .count();
    assert_eq!(forwarded, upstream.requests().len());
    let metrics = run_async("curl", &["-sS", &format!("http://{admin}/metrics")]).await;
    let metrics = String::from_utf8_lossy(&metrics.stdout).to_string();
    assert!(
        metrics.contains(&format!(
            "consent_proxy_audit_unrecorded_decisions_total {refused}"
        )),
        "{metrics}"
    );
    let verified = run(
        env!("CARGO_BIN_EXE_consent-proxy"),
        &["audit", "verify", &log.display().to_string()],
    );
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );
    running.shutdown(Duration::from_secs(5)).await;
    must("umount", &[&small.display().to_string()]);
}
