//! What a fleet behind a load balancer needs of one replica: the real client from a PROXY
//! protocol header (v1, v2; refused when missing, malformed or from an address that is no
//! balancer), the chain's head for a monitoring system, and `audit verify` / `summary` over
//! several replicas' logs with a witness of how long each chain was.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::cli::{bin, run};
use crate::harness::{echo_server, exchange, Env, Setup, RUDDER, SECURITY, TUNNELLED};

const BALANCED: &str =
    "[clients]\nallow = [\"127.0.0.0/8\", \"192.0.2.0/24\"]\nbalancers = [\"127.0.0.2/32\"]";

/// A connection to the proxy from `source` (127.0.0.2 plays the balancer).
async fn connect_from(env: &Env, source: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{source}:0").parse().expect("addr"))
        .expect("bind");
    socket.connect(env.proxy).await.expect("connect")
}

fn connect_request(host: &str) -> String {
    format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n")
}

/// A PROXY v2 header for a TCP/IPv4 client (built by hand, independent of the parser).
fn v2_header(src: [u8; 4], sport: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0x00, 12]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&3128u16.to_be_bytes());
    h
}

/// Behind a balancer the client's stream is not a bare socket, so a tunnel copies instead of
/// splicing: the bytes still arrive both ways, and the idle timeout still sees them.
#[tokio::test]
async fn a_tunnel_through_a_balancer_is_copied_and_closes_when_idle() {
    let (echo, seen) = echo_server().await;
    let policy = format!("{BALANCED}\n[limits]\ntunnel_idle_timeout_secs = 1");
    let env = Env::start(Setup {
        policy: &policy,
        proxy_protocol: true,
        tunnel_to: Some(echo),
        ..Setup::default()
    })
    .await;
    let mut tcp = connect_from(&env, "127.0.0.2").await;
    let mut head = b"PROXY TCP4 192.0.2.13 127.0.0.1 9999 3128\r\n".to_vec();
    head.extend_from_slice(connect_request(TUNNELLED).as_bytes());
    let answer = exchange(&mut tcp, &head).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let payload: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let (mut r, mut w) = tcp.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.expect("write");
        w
    });
    let mut back = vec![0u8; payload.len()];
    r.read_exact(&mut back).await.expect("echo");
    let _w = writer.await.expect("writer");
    assert!(back == payload, "bytes back differ");
    assert!(
        *seen.lock().expect("lock") == payload,
        "bytes at the upstream differ"
    );
    // Then quiet: closed after the idle timeout.
    let mut one = [0u8; 1];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), r.read(&mut one))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let record = env.audit().pop().expect("record");
    assert_eq!(
        (record["client"].as_str(), record["decision"].as_str()),
        (Some("192.0.2.13:9999"), Some("tunneled"))
    );
    env.stop().await;
}

#[tokio::test]
async fn proxy_protocol_names_the_client_and_refuses_the_rest() {
    let env = Env::start(Setup {
        policy: BALANCED,
        proxy_protocol: true,
        admin: true,
        ..Setup::default()
    })
    .await;
    // v1 and v2 from the balancer: the header's client is the client. Diagnostics are denied
    // by default, so each CONNECT is answered (and recorded) at once.
    let mut v1 = b"PROXY TCP4 192.0.2.10 127.0.0.1 5555 3128\r\n".to_vec();
    v1.extend_from_slice(connect_request(RUDDER).as_bytes());
    let mut v2 = v2_header([192, 0, 2, 11], 6666);
    v2.extend_from_slice(connect_request(RUDDER).as_bytes());
    let mut not_allowed = b"PROXY TCP4 198.51.100.7 127.0.0.1 7777 3128\r\n".to_vec();
    not_allowed.extend_from_slice(connect_request(RUDDER).as_bytes());
    for (bytes, status, client, decision) in [
        (v1, "HTTP/1.1 403", "192.0.2.10:5555", "blocked"),
        (v2, "HTTP/1.1 403", "192.0.2.11:6666", "blocked"),
        (not_allowed, "HTTP/1.1 403", "198.51.100.7:7777", "denied"),
    ] {
        let answer = exchange(&mut connect_from(&env, "127.0.0.2").await, &bytes).await;
        assert!(answer.starts_with(status), "{client}: {answer}");
        let record = env.audit().pop().expect("record");
        assert_eq!(record["client"], client);
        assert_eq!(record["decision"], decision);
    }
    // An intercepted request through the balancer carries the client too.
    let mut tcp = connect_from(&env, "127.0.0.2").await;
    let mut head = b"PROXY TCP4 192.0.2.12 127.0.0.1 8888 3128\r\n".to_vec();
    head.extend_from_slice(connect_request(SECURITY).as_bytes());
    tcp.write_all(&head).await.expect("write");
    let mut buf = [0u8; 256];
    let n = tcp.read(&mut buf).await.expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let mut tls = env.tls_client(tcp, SECURITY).await;
    tls.write_all(
        format!(
            "GET /security?id=x&uc=1 HTTP/1.1\r\nHost: {SECURITY}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    let record = env.audit().pop().expect("record");
    assert_eq!(
        (record["client"].as_str(), record["decision"].as_str()),
        (Some("192.0.2.12:8888"), Some("stripped"))
    );

    // Refused before any request, each with a record naming the connection's own address.
    let requests = env.upstream.requests().len();
    for (source, bytes, reason) in [
        (
            "127.0.0.2",
            connect_request(RUDDER).into_bytes(),
            "no PROXY protocol header from a balancer",
        ),
        (
            "127.0.0.2",
            b"PROXY TCP4 192.0.2.10 nonsense\r\n".to_vec(),
            "malformed PROXY protocol header",
        ),
        (
            "127.0.0.2",
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\x01".to_vec(),
            "malformed PROXY protocol header",
        ),
        (
            "127.0.0.1",
            b"PROXY TCP4 192.0.2.10 127.0.0.1 5555 3128\r\nCONNECT a:443 HTTP/1.1\r\n\r\n".to_vec(),
            "PROXY protocol header from an address not in [clients] balancers",
        ),
    ] {
        let mut tcp = connect_from(&env, source).await;
        tcp.write_all(&bytes).await.expect("write");
        if reason.starts_with("malformed") && bytes.len() < 20 {
            // A truncated v2 header: the proxy waits for the rest, then gives up.
            tcp.shutdown().await.expect("shutdown");
        }
        let answer = exchange(&mut tcp, b"").await;
        assert_eq!(answer, "", "{reason}: refused without an answer");
        let record = env.wait_for_record(reason, |r| r["reason"] == reason).await;
        assert_eq!(record["decision"], "blocked");
        assert!(
            record["client"]
                .as_str()
                .is_some_and(|c| c.starts_with(source)),
            "{record}"
        );
    }
    assert_eq!(env.upstream.requests().len(), requests);
    // A direct client that is no balancer and sends no header is served as itself.
    let answer = exchange(
        &mut connect_from(&env, "127.0.0.1").await,
        connect_request(RUDDER).as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(env.audit().pop().expect("record")["client"]
        .as_str()
        .is_some_and(|c| c.starts_with("127.0.0.1:")));

    // The chain's head, for a monitoring system to keep.
    let admin = env.admin().expect("admin");
    let head: serde_json::Value =
        serde_json::from_str(&http_get(admin, "/audit/head").await).expect("JSON head");
    let last = env
        .audit_text()
        .lines()
        .last()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("record"))
        .expect("a record");
    assert_eq!(head["seq"], last["seq"]);
    assert_eq!(head["hash"], last["hash"]);
    assert_eq!(head["node"], last["node"]);
    let metrics = http_get(admin, "/metrics").await;
    assert!(
        metrics.contains(&format!("consent_proxy_audit_seq {}", last["seq"])),
        "{metrics}"
    );
    env.stop().await;
}

/// The body of `GET path` on the admin listener.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await.expect("read");
    let text = String::from_utf8_lossy(&out).to_string();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(text)
}

#[tokio::test]
async fn audit_verify_and_summary_read_several_replicas_with_a_witness() {
    let logs = tempfile::tempdir().expect("tempdir");
    let mut witness = String::new();
    for node in ["replica-1", "replica-2"] {
        let env = Env::start(Setup {
            node: Some(node),
            admin: true,
            ..Setup::default()
        })
        .await;
        for _ in 0..3 {
            let out = env
                .curl(&[&format!("https://{SECURITY}/security?id=x&uc=1")])
                .await;
            assert_eq!(out.code, 200);
        }
        witness += &http_get(env.admin().expect("admin"), "/audit/head").await;
        let dir = env.stop().await;
        std::fs::copy(
            dir.path().join("audit.jsonl"),
            logs.path().join(format!("{node}.jsonl")),
        )
        .expect("copy");
    }
    let witness_file = logs.path().join("../witness.jsonl");
    std::fs::write(&witness_file, &witness).expect("write");
    let (code, out) = run(bin()
        .args(["audit", "verify", "--witness"])
        .arg(&witness_file)
        .arg(logs.path()));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("(node replica-1): intact") && out.contains("(node replica-2): intact"),
        "{out}"
    );
    assert!(out.contains("2 chain(s) of 2 node(s)"), "{out}");
    let (code, out) = run(bin().args(["audit", "summary", "--json"]).arg(logs.path()));
    assert_eq!(code, 0, "{out}");
    let summary: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let nodes: Vec<&str> = summary["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["node"].as_str())
        .collect();
    assert_eq!(nodes, ["replica-1", "replica-2"]);
    assert_eq!(summary["decisions"]["security_alerts"]["stripped"], 6);

    // Truncate replica-1 behind its witnessed head; edit a record of replica-2.
    let one = logs.path().join("replica-1.jsonl");
    let text = std::fs::read_to_string(&one).expect("read");
    let witnessed: u64 = witness
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|h| h["node"] == "replica-1")
        .and_then(|h| h["seq"].as_u64())
        .expect("replica-1 witnessed");
    let kept: Vec<&str> = text
        .lines()
        .take_while(|l| !l.contains(&format!("{{\"seq\":{witnessed},")))
        .collect();
    std::fs::write(&one, kept.join("\n") + "\n").expect("truncate");
    let (code, out) = run(bin().args(["audit", "verify"]).arg(logs.path()));
    assert_eq!(
        code, 0,
        "without a witness, a cut chain still verifies: {out}"
    );
    let (code, out) = run(bin()
        .args(["audit", "verify", "--witness"])
        .arg(&witness_file)
        .arg(logs.path()));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("(node replica-1): witnessed head of node replica-1")
            && out.contains("truncated"),
        "{out}"
    );
    let two = logs.path().join("replica-2.jsonl");
    let text = std::fs::read_to_string(&two).expect("read");
    std::fs::write(
        &two,
        text.replacen("\"decision\":\"stripped\"", "\"decision\":\"allowed\"", 1),
    )
    .expect("edit");
    let (code, out) = run(bin().args(["audit", "verify"]).arg(&one).arg(&two));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("(node replica-2): 1 record(s) intact, then broken at line 2 (seq 2)"),
        "{out}"
    );
    assert!(out.contains("(node replica-1): intact"), "{out}");
}
