//! `audit report` rendered from a real log (two nodes: stripped, blocked, tunnelled, a reload
//! that changes consent) and opened in a real browser: Debian's chromium, headless. The page's
//! DOM as the browser built it says what `audit summary` says of the same files; a broken chain
//! shows as broken; the page references nothing outside itself; its screenshot is an image.

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cli::{bin, run};
use crate::harness::{echo_server, fixture_body, Env, Setup, PUSH, RUDDER, SECURITY, TUNNELLED};

/// Chromium, or `None` (a skip outside CI; under CI it must be there).
fn chromium() -> Option<&'static str> {
    for name in ["chromium", "chromium-browser"] {
        if Command::new(name).arg("--version").output().is_ok() {
            return Some(name);
        }
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "chromium is required under CI (apt install chromium)"
    );
    eprintln!("skipped: no chromium");
    None
}

/// Chromium headless on `page` with `args`: its standard output.
fn browse(chromium: &str, page: &Path, args: &[&str]) -> String {
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
        ])
        .args(args)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Node `node`'s log after a security check stripped, a diagnostics CONNECT refused, a tunnel,
/// and (`reload`) a consent change; the push with `push`.
async fn a_log(node: &'static str, reload: bool, push: bool) -> String {
    let (echo, _) = echo_server().await;
    let env = Env::start(Setup {
        node: Some(node),
        tunnel_to: Some(echo),
        ..Setup::default()
    })
    .await;
    let out = env
        .curl(&[&format!("https://{SECURITY}/security?id=x&uc=7&ut=0")])
        .await;
    assert_eq!(out.code, 200, "{out:?}");
    let out = env.curl(&[&format!("https://{RUDDER}/v1/batch")]).await;
    assert_eq!(out.connect, 403, "{out:?}");
    let mut tcp = env.connect_tunnel(TUNNELLED).await;
    tcp.write_all(b"hello through").await.expect("write");
    let mut back = [0u8; 13];
    tcp.read_exact(&mut back).await.expect("echo");
    drop(tcp);
    env.wait_for_record("tunnel outcome", |r| {
        r["decision"] == "outcome" && r["bytes_in"] == 13
    })
    .await;
    if push {
        let body = env.dir.path().join("push.json");
        std::fs::write(&body, fixture_body("push_full.json")).expect("write");
        let data = format!("@{}", body.display());
        let url = format!("https://{PUSH}/api/v1/send_push");
        let out = env
            .curl(&["-X", "POST", "--data-binary", &data, &url])
            .await;
        assert_eq!(out.code, 200, "{out:?}");
    }
    if reload {
        let policy = env.dir.path().join("policy.toml");
        let text = std::fs::read_to_string(&policy).expect("policy");
        std::fs::write(
            &policy,
            format!("{text}\n[consent]\nsecurity_alerts = \"denied\"\npush_notifications = \"granted\"\n"),
        )
        .expect("write");
        env.wait_for_record("reloaded", |r| {
            r["decision"] == "policy_loaded" && r["seq"] != 1
        })
        .await;
    }
    env.flush();
    let text = env.audit_text();
    env.stop().await;
    text
}

#[tokio::test]
async fn the_report_opens_in_a_browser_and_says_what_the_log_says() {
    let Some(chromium) = chromium() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("node-a.jsonl");
    let b = dir.path().join("node-b.jsonl");
    std::fs::write(&a, a_log("node-a", true, false).await).expect("write");
    std::fs::write(&b, a_log("node-b", false, true).await).expect("write");
    let page = dir.path().join("report.html");
    let (code, out) = run(bin()
        .args(["audit", "report", "--out"])
        .arg(&page)
        .args([&a, &b]));
    assert_eq!(code, 0, "{out}");

    // Nothing outside the page: no scripts, links, sources or imports; the policy forbids it.
    let html = std::fs::read_to_string(&page).expect("page");
    assert!(html.contains("default-src 'none'"), "no CSP");
    for outside in [
        "<script", "<link", "src=", "href=", "@import", "http://", "https://", "url(http",
    ] {
        assert!(!html.contains(outside), "the page references {outside}");
    }

    let dom = browse(chromium, &page, &["--dump-dom"]);
    assert!(dom.contains("Every chain is intact."), "{dom}");
    for node in ["node-a", "node-b"] {
        assert!(
            dom.contains(&format!("data-node=\"{node}\" data-verdict=\"intact\"")),
            "{node} not intact in\n{dom}"
        );
    }
    // The counts per feature and decision are those of `audit summary` on the same files.
    let (code, out) = run(bin().args(["audit", "summary", "--json"]).args([&a, &b]));
    assert_eq!(code, 0, "{out}");
    let summary: Value = serde_json::from_str(&out).expect("JSON");
    let mut compared = 0;
    for (feature, decisions) in summary["decisions"].as_object().expect("decisions") {
        for (decision, n) in decisions.as_object().expect("counts") {
            let cell = format!("data-feature=\"{feature}\" data-decision=\"{decision}\">{n}<");
            assert!(dom.contains(&cell), "{cell} not in the page");
            compared += 1;
        }
    }
    assert!(compared >= 6, "{summary}");
    for (feature, decision) in [
        ("security_alerts", "stripped"),
        ("diagnostics", "blocked"),
        ("-", "tunneled"),
    ] {
        assert!(
            summary["decisions"][feature][decision].as_u64() >= Some(1),
            "{feature} {decision}"
        );
    }
    // The consent timeline: two starts and the reload, with what changed.
    let changes = dom.matches("class=\"change\"").count();
    assert_eq!(changes, 3, "{dom}");
    assert!(
        dom.contains("security_alerts granted -&gt; denied"),
        "{dom}"
    );
    // What left unread, with its bytes.
    assert!(dom.contains(&format!("{TUNNELLED}:443")), "{dom}");
    // Names and paths, never values.
    assert!(dom.contains("query:uc") && !dom.contains("uc=7"));

    // A screenshot is a real image of the page: not blank.
    let shot = dir.path().join("report.png");
    browse(
        chromium,
        &page,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1200,1600",
        ],
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&shot).expect("png"),
    ));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).expect("a frame");
    assert_eq!((info.width, info.height), (1200, 1600));
    let distinct: std::collections::BTreeSet<&[u8]> = pixels[..info.buffer_size()]
        .chunks(info.color_type.samples())
        .collect();
    assert!(
        distinct.len() > 50,
        "a blank page: {} colours",
        distinct.len()
    );
    // The README's picture: `CONSENT_PROXY_REPORT_SHOT=docs/audit-report.png cargo test report`.
    if let Ok(keep) = std::env::var("CONSENT_PROXY_REPORT_SHOT") {
        std::fs::copy(&shot, &keep).expect("keep the screenshot");
        std::fs::copy(&page, format!("{keep}.html")).expect("keep the page");
    }

    // An edited record: the chain shows as broken.
    let text = std::fs::read_to_string(&a).expect("log");
    std::fs::write(&a, text.replacen("\"stripped\"", "\"allowed\"", 1)).expect("write");
    let (code, out) = run(bin()
        .args(["audit", "report", "--out"])
        .arg(&page)
        .args([&a, &b]));
    assert_eq!(code, 0, "{out}");
    let dom = browse(chromium, &page, &["--dump-dom"]);
    assert!(
        dom.contains("data-node=\"node-a\" data-verdict=\"broken\""),
        "{dom}"
    );
    assert!(dom.contains("BROKEN at"), "{dom}");
    assert!(!dom.contains("Every chain is intact."));
}
