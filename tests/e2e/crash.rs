//! Evidence under faults, with the real binary: killed with SIGKILL under load, restarted on a
//! log whose last line a crash cut. (A full disk is in `tests/namespaces.rs`: it needs a mount.)

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::harness::{Env, Setup, SEGMENT};

/// A feature of our own on a test host, granted, taking any path under `/crash/`; another,
/// denied, under `/forbidden/`.
const POLICY: &str = "[consent]\ncrashy = \"granted\"\nforbidden = \"denied\"\n\
[[feature]]\nname = \"crashy\"\nhosts = [\"api.segment.io\"]\npaths = [\"/crash/\"]\n\
[[feature]]\nname = \"forbidden\"\nhosts = [\"api.segment.io\"]\npaths = [\"/forbidden/\"]\n";

fn verify(log: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_consent-proxy"))
        .args(["audit", "verify"])
        .arg(log)
        .output()
        .expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Every record of a log (its own and rotated files are not used here), as JSON.
fn records(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .expect("log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a whole record"))
        .collect()
}

/// `curl` through `proxy` for these URLs, one connection kept alive across them; failures
/// (the proxy killed under it) are the point, so only whether it ran is returned.
async fn curl_many(proxy: SocketAddr, ca: &Path, urls: &[String]) {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-s", "--max-time", "10", "-o", "/dev/null", "--proxy"])
        .arg(format!("http://{proxy}"))
        .arg("--cacert")
        .arg(ca)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy");
    for url in urls {
        cmd.arg(url);
    }
    let _ = cmd.output().await;
}

/// Twelve clients keep requests in flight (the upstream answers 300 ms after each arrives);
/// the binary is killed with SIGKILL three times and restarted on the same log. Every request
/// the upstream received has its record, nothing denied reached the upstream, and the whole
/// log verifies (a kill that cut a line was repaired at the next start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_that_left_has_a_record_across_kills() {
    let env = Env::start(Setup {
        policy: POLICY,
        upstream_delay: Duration::from_millis(300),
        ..Setup::default()
    })
    .await;
    let log = env.dir.path().join("binary-audit.jsonl");
    let (first, addr) = env.spawn_binary(&[]).await;
    let proxy = Arc::new(Mutex::new((first, addr)));
    let stop = tokio_util::sync::CancellationToken::new();
    let clients: Vec<_> = (0..12)
        .map(|c| {
            let (proxy, stop, ca) = (proxy.clone(), stop.clone(), env.ca_pem.clone());
            tokio::spawn(async move {
                let mut round = 0;
                while !stop.is_cancelled() {
                    let addr = proxy.lock().expect("lock").1;
                    let urls: Vec<String> = (0..4)
                        .map(|i| {
                            let kind = if (c + i) % 5 == 0 {
                                "forbidden"
                            } else {
                                "crash"
                            };
                            format!("https://{SEGMENT}/{kind}/{c}/{round}/{i}")
                        })
                        .collect();
                    curl_many(addr, &ca, &urls).await;
                    round += 1;
                }
            })
        })
        .collect();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        {
            let mut running = proxy.lock().expect("lock");
            // SIGKILL: no drain, no final record, a write possibly cut.
            running.0 .0.kill().expect("kill -9");
            let _ = running.0 .0.wait();
        }
        let (next, addr) = env.spawn_binary(&[]).await;
        *proxy.lock().expect("lock") = (next, addr);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.cancel();
    for c in clients {
        c.await.expect("client");
    }
    drop(proxy);

    let received: Vec<String> = env
        .upstream
        .requests()
        .into_iter()
        .map(|r| r.path_and_query)
        .collect();
    assert!(
        received.len() >= 24,
        "too little traffic to mean anything: {}",
        received.len()
    );
    assert!(
        received.iter().all(|p| p.starts_with("/crash/")),
        "a denied request reached the upstream"
    );
    let recorded: std::collections::HashSet<String> = records(&log)
        .iter()
        .filter(|r| r["decision"] == "allowed" && r["feature"] == "crashy")
        .filter_map(|r| r["path"].as_str().map(str::to_string))
        .collect();
    let unrecorded: Vec<&String> = received.iter().filter(|p| !recorded.contains(*p)).collect();
    assert!(
        unrecorded.is_empty(),
        "{} of {} requests that reached the upstream have no record: {unrecorded:?}",
        unrecorded.len(),
        received.len()
    );
    let (code, out) = verify(&log);
    assert_eq!(code, 0, "{out}");
}

/// The fragments moved aside beside `log`.
fn fragments(log: &Path) -> Vec<PathBuf> {
    let dir = log.parent().expect("folder");
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("lists")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.to_string_lossy().contains(".torn-"))
        .collect();
    found.sort();
    found
}

/// A log whose last line a crash cut (half a record without its newline; a line cut at an
/// arbitrary byte) does not stop a supervisor's restart: the binary serves again within 5 s,
/// the fragment's bytes are kept beside the log, `audit verify` passes and names the repair.
/// An edited record still fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_heals_at_the_next_start() {
    let env = Env::start(Setup {
        policy: POLICY,
        ..Setup::default()
    })
    .await;
    let log = env.dir.path().join("binary-audit.jsonl");
    let request = |addr: SocketAddr, n: u32| {
        let ca = env.ca_pem.clone();
        async move {
            let url = format!("https://{SEGMENT}/crash/{n}");
            curl_many(addr, &ca, &[url]).await;
        }
    };
    let (child, addr) = env.spawn_binary(&[]).await;
    for n in 0..3 {
        request(addr, n).await;
    }
    drop(child);
    // Half a record without its newline, then (second round) a whole line cut at a byte picked
    // by the clock.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(7) as usize;
    for round in 0..2 {
        let mut bytes = std::fs::read(&log).expect("log");
        let last = bytes[..bytes.len() - 1]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let fragment: Vec<u8> = if round == 0 {
            let half = bytes[last..].len() / 2;
            let fragment = bytes[last..last + half].to_vec();
            bytes.extend_from_slice(&fragment);
            fragment
        } else {
            let line_len = bytes.len() - last;
            let cut = last + 1 + nanos % (line_len - 2);
            let fragment = bytes[last..cut].to_vec();
            bytes.truncate(cut);
            fragment
        };
        std::fs::write(&log, &bytes).expect("tear");
        let (code, out) = verify(&log);
        assert_eq!(code, 0, "a torn tail is not a break: {out}");
        assert!(out.contains("ends in an incomplete record"), "{out}");

        let started = std::time::Instant::now();
        let (child, addr) = env.spawn_binary(&[]).await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "serving again took {:?}",
            started.elapsed()
        );
        request(addr, 10 + round).await;
        drop(child);
        let kept = fragments(&log);
        assert_eq!(kept.len(), round as usize + 1, "{kept:?}");
        let newest = kept
            .iter()
            .find(|p| std::fs::read(p).expect("fragment") == fragment)
            .expect("the fragment's bytes are kept");
        let recovered: Vec<serde_json::Value> = records(&log)
            .into_iter()
            .filter(|r| r["decision"] == "recovered")
            .collect();
        let reason = recovered
            .last()
            .and_then(|r| r["reason"].as_str())
            .expect("a recovered record")
            .to_string();
        assert!(
            reason.contains(&format!("{} bytes", fragment.len()))
                && reason.contains(&*newest.to_string_lossy()),
            "{reason}"
        );
        let (code, out) = verify(&log);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("recovered at seq"), "{out}");
        assert!(out.contains("is kept, unchanged"), "{out}");
    }
    let text = std::fs::read_to_string(&log).expect("log");
    std::fs::write(&log, text.replacen("/crash/1", "/crash/9", 1)).expect("edit");
    let (code, out) = verify(&log);
    assert_eq!(code, 1, "an edit still fails: {out}");
}

/// Shutdown (SIGTERM's drain) lets a request in flight finish, and its outcome is written
/// before the final record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_final_record_comes_after_every_outcome() {
    let env = Env::start(Setup {
        policy: POLICY,
        upstream_delay: Duration::from_millis(800),
        ..Setup::default()
    })
    .await;
    let (proxy, ca) = (env.proxy, env.ca_pem.clone());
    let inflight = tokio::spawn(async move {
        curl_many(proxy, &ca, &[format!("https://{SEGMENT}/crash/drain")]).await;
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while env.upstream.requests().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the request never left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dir = env.stop().await;
    inflight.await.expect("client");
    let all = records(&dir.path().join("audit.jsonl"));
    let forwarded = all
        .iter()
        .find(|r| r["path"] == "/crash/drain")
        .expect("the request's record");
    let outcome = all
        .iter()
        .position(|r| r["of"] == forwarded["seq"])
        .expect("its outcome");
    assert_eq!(all[outcome]["status"], 200);
    let last = all.last().expect("records");
    assert_eq!(last["decision"], "policy_loaded");
    assert!(
        last["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("shutting down")),
        "{last}"
    );
    assert!(outcome < all.len() - 1);
}

/// A client that leaves while its request waits for the upstream: the record written ahead is
/// completed by an outcome saying the exchange was interrupted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_exchange_is_completed() {
    let env = Env::start(Setup {
        policy: POLICY,
        upstream_delay: Duration::from_secs(3),
        ..Setup::default()
    })
    .await;
    let out = env
        .curl(&[
            "--http2",
            "--max-time",
            "1",
            &format!("https://{SEGMENT}/crash/gone"),
        ])
        .await;
    assert_eq!(out.code, 0, "curl gave up: {out:?}");
    assert_eq!(env.upstream.requests().len(), 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let all = records(&env.dir.path().join("audit.jsonl"));
        let sent = all
            .iter()
            .find(|r| r["path"] == "/crash/gone")
            .expect("written ahead");
        if let Some(o) = all.iter().find(|r| r["of"] == sent["seq"]) {
            assert!(o["status"].is_null(), "{o}");
            assert!(
                o["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("interrupted")),
                "{o}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no outcome: {all:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
