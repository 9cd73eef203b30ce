//! A fleet for real: two consent-proxy replicas (the binary, as admins run it) sharing one CA
//! and one policy file, each with its own audit log and node name, behind HAProxy (Debian's
//! `haproxy`) in TCP mode with PROXY protocol v2 and `option httpchk GET /readyz`, configured by
//! `contrib/haproxy/haproxy.cfg` as shipped.
//!
//! Through HAProxy, curl and Go's net/http send Mattermost fixtures: both replicas serve, strip
//! alike, and record the real client. Then, under a bounded request loop, one replica is drained
//! (SIGTERM) and restarted and the other killed (SIGKILL) and restarted: no forbidden value
//! reaches the upstream, every request that reached it has exactly one record in some replica's
//! chain, and `audit verify` passes over both logs. A change to the shared policy file reaches
//! both replicas. Needs haproxy: under `CI=true` it must run; elsewhere it skips with a message.

#[allow(dead_code)]
#[path = "e2e/harness.rs"]
mod harness;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use harness::{
    curl, fixture_body, fixture_url, go_client, tls_client, UpstreamPki, PUSH, SECURITY,
};

/// Where HAProxy connects from: the replicas' one balancer.
const BALANCER: &str = "127.0.0.2";

struct Replica {
    node: &'static str,
    admin: SocketAddr,
    child: Child,
}

impl Replica {
    fn start(dir: &Path, node: &'static str, proxy: SocketAddr, admin: SocketAddr) -> Replica {
        let log = std::fs::File::create(dir.join(format!("{node}.stderr"))).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_consent-proxy"))
            .arg("run")
            .arg("--config")
            .arg(dir.join("policy.toml"))
            .args(["--node", node])
            .args(["--listen", &proxy.to_string()])
            .args(["--admin", &admin.to_string()])
            .arg("--audit")
            .arg(dir.join(format!("{node}.jsonl")))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("replica starts");
        Replica { node, admin, child }
    }

    /// Wait for `/readyz` to answer 200.
    async fn ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while admin_get(self.admin, "/readyz").await.0 != 200 {
            assert!(
                Instant::now() < deadline,
                "{} never became ready",
                self.node
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Wait for the process to exit; its exit code.
    async fn exited(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            assert!(Instant::now() < deadline, "{} did not exit", self.node);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` on an admin listener: status and body (0 when it does not answer).
async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    if tcp.write_all(request.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    (status, body.unwrap_or_default())
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// One GET through the front: CONNECT, TLS with the interception CA, one request. The status,
/// or why there was none (a replica going away between requests may cost one).
async fn get_through(front: SocketAddr, ca: &Path, host: &str, path: &str) -> Result<u16, String> {
    let io = |e: std::io::Error| e.to_string();
    let mut tcp = tokio::net::TcpStream::connect(front).await.map_err(io)?;
    tcp.write_all(format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n").as_bytes())
        .await
        .map_err(io)?;
    let mut head = [0u8; 512];
    let n = tcp.read(&mut head).await.map_err(io)?;
    let head = String::from_utf8_lossy(&head[..n]).to_string();
    if !head.starts_with("HTTP/1.1 200") {
        return head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or(format!("CONNECT answered {head:?}"));
    }
    let mut tls = tls_client(tcp, host, ca).await.map_err(io)?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .map_err(io)?;
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(format!("no response: {text:?}"))
}

/// Send requests through the front until one lands on the replica whose log is `log`: HAProxy
/// has it back in rotation (its health checks passed `rise` times).
async fn in_rotation(front: SocketAddr, ca: &Path, log: &Path, label: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in 0.. {
        let path = format!("/bulletins/warm-{label}-{n}");
        let _ = get_through(front, ca, SECURITY, &path).await;
        if records(log).iter().any(|r| r["path"] == path.as_str()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{label} never came back into rotation"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `program` runs (`arg` is a harmless flag such as `--version`). Under `CI=true` it
/// must; elsewhere a test without it skips, saying what is missing.
fn available(program: &str, arg: &str, test: &str) -> bool {
    let found = Command::new(program)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test} must run under CI=true, but {program} is not installed"
        );
        eprintln!("skipping {test}: {program} is not installed");
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_behind_haproxy_drain_die_and_keep_one_trail() {
    if !available("haproxy", "-v", "the fleet test") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let pki = UpstreamPki::new();
    std::fs::write(d.join("upstream-ca.pem"), &pki.ca_pem).expect("write");
    let upstream = pki.serve(&[b"h2", b"http/1.1"]).await;
    let ca_init = Command::new(env!("CARGO_BIN_EXE_consent-proxy"))
        .args(["ca", "init", "--dir"])
        .arg(d.join("ca"))
        .output()
        .expect("ca init");
    assert!(ca_init.status.success());
    let policy = |consent: &str| {
        format!(
            "{consent}\n[listen]\nproxy = \"127.0.0.1:3128\"\nproxy_protocol = true\n\
             [clients]\nallow = [\"127.0.0.0/8\"]\nbalancers = [\"{BALANCER}/32\"]\n\
             [tls]\nca_cert = \"ca/ca.pem\"\nca_key = \"ca/ca.key\"\n\
             [upstream]\nextra_ca = [\"upstream-ca.pem\"]\nresolve = {{ \"{SECURITY}:443\" = \"{0}\", \"{PUSH}:443\" = \"{0}\" }}\n\
             [audit]\npath = \"unused.jsonl\"\n[limits]\ndrain_delay_secs = 2\nshutdown_timeout_secs = 5\n",
            upstream.addr
        )
    };
    std::fs::write(d.join("policy.toml"), policy("")).expect("write");
    let (p1, a1, p2, a2, front) = (
        free_addr(),
        free_addr(),
        free_addr(),
        free_addr(),
        free_addr(),
    );
    let mut r1 = Replica::start(d, "replica-1", p1, a1);
    let mut r2 = Replica::start(d, "replica-2", p2, a2);
    r1.ready().await;
    r2.ready().await;
    let cfg = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("contrib/haproxy/haproxy.cfg");
    let mut haproxy = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .env("EGRESS_BIND", front.to_string())
        .env("BALANCER_SOURCE", BALANCER)
        .env("REPLICA1", p1.to_string())
        .env("REPLICA2", p2.to_string())
        .env("REPLICA1_ADMIN_PORT", a1.port().to_string())
        .env("REPLICA2_ADMIN_PORT", a2.port().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy starts");
    let ca = d.join("ca/ca.pem");
    let logs = [d.join("replica-1.jsonl"), d.join("replica-2.jsonl")];
    let all_records = || -> Vec<Value> { logs.iter().flat_map(|l| records(l)).collect() };

    // Both replicas serve once HAProxy's checks pass: send until each has stripped a request.
    let served = |node: &str| {
        records(&d.join(format!("{node}.jsonl")))
            .iter()
            .any(|r| r["decision"] == "stripped")
    };
    let security = fixture_url("security_check.url");
    let push_body = d.join("push.json");
    std::fs::write(&push_body, fixture_body("push_full.json")).expect("write");
    let push_data = format!("@{}", push_body.display());
    let push_url = format!("https://{PUSH}/api/v1/send_push");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut clients = Vec::new();
    while !(served("replica-1") && served("replica-2")) {
        assert!(
            Instant::now() < deadline,
            "HAProxy never used both replicas"
        );
        for args in [
            vec![security.as_str()],
            vec![
                "-X",
                "POST",
                "-H",
                "Content-Type:",
                "--data-binary",
                &push_data,
                &push_url,
            ],
        ] {
            let out = curl(front, &ca, d, &args).await;
            if out.code == 200 {
                clients.push(format!("127.0.0.1:{}", out.local_port));
            }
        }
    }
    // The record's client is curl's own address, carried by the PROXY header.
    let recorded: Vec<String> = all_records()
        .iter()
        .filter_map(|r| r["client"].as_str().map(str::to_string))
        .collect();
    for client in &clients {
        assert!(recorded.contains(client), "no record names {client}");
    }
    assert!(
        recorded
            .iter()
            .all(|c| !c.starts_with(&format!("{BALANCER}:"))),
        "{recorded:?}"
    );
    // Go's net/http through the fleet, configured only by HTTPS_PROXY and SSL_CERT_FILE.
    if let Some(go) = go_client() {
        let out = Command::new(go)
            .args(["POST", &push_url])
            .arg(&push_body)
            .env("HTTPS_PROXY", format!("http://{front}"))
            .env("SSL_CERT_FILE", &ca)
            .env_remove("NO_PROXY")
            .output()
            .expect("go client");
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with("200"),
            "{out:?}"
        );
    }
    // Both replicas stripped every push alike.
    let pushes: Vec<_> = upstream
        .requests()
        .into_iter()
        .filter(|r| r.path_and_query == "/api/v1/send_push")
        .collect();
    assert!(pushes.len() >= 2);
    for p in &pushes {
        assert_eq!(p.body, pushes[0].body, "replicas stripped differently");
        let json: Value = serde_json::from_slice(&p.body).expect("JSON");
        assert!(json.get("channel_name").is_none() && json.get("sender_name").is_none());
    }

    // A bounded loop through the front while one replica drains and restarts and the other is
    // killed and restarted. Each request has its own path and a forbidden count (`uc`).
    let mut answered = 0;
    for i in 0..60u32 {
        match i {
            10 => {
                r1.signal("-TERM");
                // Readiness fails at once, while the listeners still accept (drain_delay_secs).
                let deadline = Instant::now() + Duration::from_millis(1800);
                let mut status = admin_get(r1.admin, "/readyz").await.0;
                while status != 503 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    status = admin_get(r1.admin, "/readyz").await.0;
                }
                assert_eq!(status, 503, "a draining replica is not ready");
            }
            25 => {
                assert_eq!(r1.exited().await, Some(0), "a drained replica exits 0");
                let last = records(&logs[0]).pop().expect("final record");
                assert!(
                    last["reason"]
                        .as_str()
                        .is_some_and(|r| r.starts_with("shutting down")),
                    "{last}"
                );
                r1 = Replica::start(d, "replica-1", p1, a1);
                r1.ready().await;
                // Before the other replica goes down, HAProxy must route to this one again.
                in_rotation(front, &ca, &logs[0], "r1").await;
            }
            40 => {
                r2.child.kill().expect("SIGKILL");
                let _ = r2.child.wait();
                r2 = Replica::start(d, "replica-2", p2, a2);
                r2.ready().await;
                in_rotation(front, &ca, &logs[1], "r2").await;
            }
            _ => {}
        }
        let path = format!("/bulletins/loop-{i}?id=x&uc=SECRET{i}");
        match get_through(front, &ca, SECURITY, &path).await {
            Ok(200) => answered += 1,
            other => eprintln!("request {i}: {other:?}"),
        }
    }
    assert!(
        answered >= 50,
        "only {answered} of 60 requests were answered"
    );
    let received = upstream.requests();
    for r in &received {
        assert!(
            !r.path_and_query.contains("SECRET"),
            "uc reached the upstream: {}",
            r.path_and_query
        );
    }
    let all = all_records();
    for r in received
        .iter()
        .filter(|r| r.path_and_query.starts_with("/bulletins/loop-"))
    {
        let path = r.path_and_query.split('?').next().expect("path");
        let n = all.iter().filter(|rec| rec["path"] == path).count();
        assert_eq!(n, 1, "{path} reached the upstream with {n} records");
    }
    let verify = Command::new(env!("CARGO_BIN_EXE_consent-proxy"))
        .args(["audit", "verify"])
        .args(&logs)
        .output()
        .expect("verify");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );

    // A change to the shared policy reaches both replicas.
    std::fs::write(
        d.join("policy.toml"),
        policy("[consent]\nsecurity_alerts = \"denied\"\npush_notifications = \"granted\""),
    )
    .expect("write");
    for log in &logs {
        wait_until("both replicas reload", || {
            records(log).iter().any(|r| {
                r["decision"] == "policy_loaded"
                    && r["reason"]
                        .as_str()
                        .is_some_and(|s| s.starts_with("reloaded"))
            })
        })
        .await;
    }
    for _ in 0..4 {
        assert_eq!(
            get_through(front, &ca, SECURITY, "/security?id=x").await,
            Ok(403)
        );
    }

    // Both leave cleanly; the trail verifies.
    for r in [&mut r1, &mut r2] {
        r.signal("-TERM");
        assert_eq!(r.exited().await, Some(0));
    }
    let _ = haproxy.kill();
    let _ = haproxy.wait();
    let verify = Command::new(env!("CARGO_BIN_EXE_consent-proxy"))
        .args(["audit", "verify"])
        .args(&logs)
        .output()
        .expect("verify");
    let out = String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success(), "{out}");
    assert!(out.contains("2 chain(s) of 2 node(s)"), "{out}");
}

/// `contrib/systemd/consent-proxy.service` as shipped, with `ExecStart` pointed at the binary
/// under test, passes `systemd-analyze verify` without a word about the unit.
#[test]
fn the_systemd_unit_verifies() {
    if !available("systemd-analyze", "--version", "the systemd unit check") {
        return;
    }
    let unit =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd/consent-proxy.service");
    let text = std::fs::read_to_string(&unit).expect("unit");
    assert!(text.contains("ExecStart=/usr/local/bin/consent-proxy "));
    for needed in [
        "ExecReload=/bin/kill -HUP $MAINPID",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=\n",
        "User=consent-proxy",
    ] {
        assert!(text.contains(needed), "the unit lacks {needed:?}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("consent-proxy.service");
    std::fs::write(
        &copy,
        text.replace(
            "/usr/local/bin/consent-proxy",
            env!("CARGO_BIN_EXE_consent-proxy"),
        ),
    )
    .expect("write");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze runs");
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert!(!said.contains("consent-proxy.service"), "{said}");
}
