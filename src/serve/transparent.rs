//! The transparent listener: TCP redirected by iptables `REDIRECT` (or nftables). The original
//! destination comes from `SO_ORIGINAL_DST`; the first bytes decide what the connection is:
//!
//! - a TLS ClientHello: the name is its SNI. A feature host is intercepted as in explicit mode,
//!   with the one upstream connection pinned to the original destination and verified against
//!   the SNI; an unknown host is tunnelled to the original destination (or refused).
//! - plain HTTP: the name is the `Host` header; each request is decided on its own.
//! - anything else (no SNI, another protocol, a server-speaks-first client): decided by address.
//!
//! Names cannot be used to walk around the policy: a connection whose name belongs to no feature
//! but whose destination is an address of a feature host is refused, as is a connection to the
//! proxy itself (a loop) or one that arrived without a redirect.

use std::convert::Infallible;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use nix::sys::socket::{getsockopt, sockopt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::accept::{accept_each, until_cancelled};
use super::rewind::Rewind;
use super::shared::{Peer, Shared, Target, TargetForm};
use super::tunnel::Ends;
use crate::audit::Outcome;
use crate::decide::plan::{admit, plan_connect, ConnectPlan};
use crate::decide::policy::{canonical, normalize_host};
use crate::decide::{Decision, Reason, Refusal};
use crate::upstream::Scheme;

/// The most bytes read while looking for a complete ClientHello.
const MAX_HELLO: usize = 64 * 1024;

/// Accept redirected connections until shutdown.
pub(super) async fn accept(shared: Arc<Shared>, listener: TcpListener) {
    accept_each(shared, listener, "transparent", serve).await
}

async fn serve(shared: Arc<Shared>, client: SocketAddr, mut tcp: TcpStream) {
    let original = original_dst(&tcp);
    let peer = Peer {
        client,
        listener: "transparent",
        original_dst: original,
    };
    // A connection is refused by closing it: recorded with the name it gave, if any.
    let refuse = |decision: Decision, reason: String, host: Option<String>, feature| {
        let shared = shared.clone();
        async move {
            let mut entry = shared.entry(&shared.current(), peer, None, None, None);
            entry.host = host;
            entry.port = original.map(|a| a.port());
            shared.record_closed(entry, decision, reason, feature).await;
        }
    };
    if let Err(refusal) = admit(&shared.clients, client.ip()) {
        return refuse(refusal.decision(), refusal.reason(), None, None).await;
    }
    let Some(original) = original else {
        warn!("connection on the transparent listener without an original destination; refused");
        let reason = "no original destination (not redirected)".to_string();
        return refuse(Decision::Blocked, reason, None, None).await;
    };
    // A dual-stack listener reports IPv4 peers as v4-mapped; compare in one form.
    let local = tcp
        .local_addr()
        .ok()
        .map(|a| SocketAddr::new(canonical(a.ip()), a.port()));
    if Some(original) == local || shared.own.includes(original) {
        warn!(%original, "connection to the proxy itself on the transparent listener (a loop, or no redirect); refused");
        let reason = format!("loop: the original destination {original} is the proxy itself");
        return refuse(Decision::Blocked, reason, None, None).await;
    }

    let (prefix, first) = sniff(&mut tcp, shared.limits.tls_handshake_timeout).await;
    let active = shared.current();
    let policy = &active.policy;
    // A tunnel of TLS is recorded as https; another protocol's scheme is not known.
    let scheme = matches!(first, Sniffed::Tls { .. }).then_some("https");
    let (name, named) = match first {
        Sniffed::Tls { sni: Some(name) } => (
            Some(normalize_host(&name)),
            "SNI names a host of no feature, but",
        ),
        Sniffed::Http => {
            return serve_http(shared.clone(), peer, original, Rewind::new(prefix, tcp)).await
        }
        Sniffed::Partial => {
            let reason =
                "incomplete or malformed TLS ClientHello within the handshake timeout".to_string();
            return refuse(Decision::Blocked, reason, None, None).await;
        }
        Sniffed::Tls { sni: None } | Sniffed::Other => (None, "no name to decide by, and"),
    };
    let plan = plan_connect(policy, name.as_deref());
    let host = name.unwrap_or_else(|| original.ip().to_string());
    // A destination of no feature by name is decided by address first, then by its plan.
    let unknown = match plan {
        ConnectPlan::Intercept => {
            let pinned = Arc::new(shared.upstream.pinned(original, &host, Scheme::Https));
            let target = Target {
                scheme: "https",
                host,
                port: original.port(),
                pinned: Some(pinned),
                form: TargetForm::Origin,
            };
            return shared
                .clone()
                .intercept(peer, target, Rewind::new(prefix, tcp))
                .await;
        }
        // Refused by name: no address can change that.
        ConnectPlan::Refuse { refusal, feature } if !matches!(refusal, Refusal::UnknownHost) => {
            let feature = feature.map(|f| f.name.clone());
            return refuse(refusal.decision(), refusal.reason(), Some(host), feature).await;
        }
        ConnectPlan::Refuse { refusal, .. } => Some(refusal),
        ConnectPlan::Tunnel => None,
    };
    if let Err(feature) = shared.admit_address(None, original).await {
        let reason = format!(
            "{named} {} is an address of a {feature} host",
            original.ip()
        );
        return refuse(Decision::Blocked, reason, Some(host), Some(feature)).await;
    }
    match unknown {
        Some(refusal) => refuse(refusal.decision(), refusal.reason(), Some(host), None).await,
        None => tunnel(&shared, peer, scheme, host, original, prefix, tcp).await,
    }
}

/// Tunnel to the original destination: replay what was read while sniffing, then copy.
async fn tunnel(
    shared: &Shared,
    peer: Peer,
    scheme: Option<&'static str>,
    host: String,
    original: SocketAddr,
    prefix: Vec<u8>,
    client: TcpStream,
) {
    let active = shared.current();
    let target = Target {
        scheme: "https",
        host,
        port: original.port(),
        pinned: None,
        form: TargetForm::Origin,
    };
    let mut entry = shared.entry(&active, peer, Some(&target), None, None);
    entry.scheme = scheme;
    let connected =
        tokio::time::timeout(shared.limits.connect_timeout, TcpStream::connect(original)).await;
    let mut upstream = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(_)) | Err(_) => {
            shared.metrics.upstream_errors.inc();
            let reason = "upstream refused or unreachable".to_string();
            return shared
                .record_closed(entry, Decision::Error, reason, None)
                .await;
        }
    };
    let _ = upstream.set_nodelay(true);
    entry.decide(Decision::Tunneled, Reason::NoFeature);
    let seq = match shared.record_ahead(&entry).await {
        Ok(seq) => seq,
        Err(e) => {
            // The connection closes without a byte through.
            shared.unrecorded(&e);
            return;
        }
    };
    if upstream.write_all(&prefix).await.is_err() {
        shared.audit.outcome(Outcome {
            of: seq,
            bytes_in: Some(prefix.len() as u64),
            bytes_out: Some(0),
            reason: Some("upstream closed before the first bytes".into()),
            ..Outcome::default()
        });
        return;
    }
    let ends = Ends::Sockets(client, upstream);
    let sent = prefix.len() as u64;
    shared
        .relay::<TcpStream>(peer, target, ends, seq, sent)
        .await;
}

/// Plain HTTP: each request is named by its `Host` header and decided on its own; all go to the
/// original destination.
async fn serve_http(shared: Arc<Shared>, peer: Peer, original: SocketAddr, io: Rewind<TcpStream>) {
    let pinned = Arc::new(shared.upstream.pinned(
        original,
        &original.ip().to_string(),
        Scheme::Http,
    ));
    let s = shared.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let (shared, pinned) = (s.clone(), pinned.clone());
        async move {
            let host = req
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.parse::<http::uri::Authority>().ok())
                .map(|a| normalize_host(a.host()));
            let Some(host) = host else {
                let entry = shared.entry(
                    &shared.current(),
                    peer,
                    None,
                    Some(req.method()),
                    Some(req.uri().path()),
                );
                let refusal = Refusal::Malformed("plain HTTP request without a Host header");
                return Ok::<_, Infallible>(shared.refuse(entry, refusal, None).await);
            };
            // `request` refuses a name of no feature at a feature host's address.
            let target = Target {
                scheme: "http",
                host,
                port: original.port(),
                pinned: Some(pinned),
                form: TargetForm::Origin,
            };
            Ok(shared.request(peer, target, req).await)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.header_read_timeout)
        .serve_connection(TokioIo::new(io), service);
    let result = until_cancelled(conn, &shared.token, |c| c.graceful_shutdown()).await;
    if let Err(e) = result {
        debug!(error = %e, "transparent HTTP connection ended");
        shared.record_malformed(peer, None, &e).await;
    }
}

/// What the first bytes of a connection are.
#[derive(Debug, Eq, PartialEq)]
enum Sniffed {
    Tls {
        sni: Option<String>,
    },
    /// Started like TLS but no complete ClientHello came in time (or it was malformed).
    Partial,
    Http,
    Other,
}

/// Read until the first bytes say what the connection is; returns every byte read. A TLS
/// ClientHello may arrive over several segments and records; it is reassembled by rustls.
async fn sniff(tcp: &mut TcpStream, timeout: Duration) -> (Vec<u8>, Sniffed) {
    let mut prefix = Vec::new();
    let mut acceptor = rustls::server::Acceptor::default();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut chunk = vec![0u8; 4096];
    loop {
        let read = tokio::time::timeout_at(deadline, tcp.read(&mut chunk)).await;
        let n = match read {
            Ok(Ok(n)) if n > 0 => n,
            // Closed or timed out: what was read decides.
            _ => {
                let kind = match prefix.first() {
                    None => Sniffed::Other,
                    Some(0x16) => Sniffed::Partial,
                    Some(_) => classify_plain(&prefix),
                };
                return (prefix, kind);
            }
        };
        prefix.extend_from_slice(&chunk[..n]);
        if prefix[0] != 0x16 {
            return (prefix.clone(), classify_plain(&prefix));
        }
        let mut fresh = &chunk[..n];
        while !fresh.is_empty() {
            match acceptor.read_tls(&mut fresh) {
                Ok(0) | Err(_) => return (prefix, Sniffed::Partial),
                Ok(_) => {}
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let sni = accepted.client_hello().server_name().map(str::to_string);
                return (prefix, Sniffed::Tls { sni });
            }
            Ok(None) if prefix.len() < MAX_HELLO => {}
            Ok(None) | Err(_) => return (prefix, Sniffed::Partial),
        }
    }
}

/// An HTTP/1 request line starts with an upper-case method and a space.
fn classify_plain(prefix: &[u8]) -> Sniffed {
    let method_len = prefix.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if (3..=7).contains(&method_len) && prefix.get(method_len) == Some(&b' ') {
        Sniffed::Http
    } else if method_len == prefix.len() && method_len < 8 {
        // A method not yet followed by its space: most likely HTTP cut by the segment boundary.
        Sniffed::Http
    } else {
        Sniffed::Other
    }
}

/// The original destination of a redirected connection (`SO_ORIGINAL_DST` /
/// `IP6T_SO_ORIGINAL_DST`), or `None` when the socket has none.
fn original_dst(tcp: &TcpStream) -> Option<SocketAddr> {
    let local = tcp.local_addr().ok()?;
    // A dual-stack listener (`[::]:port`) sees IPv4 clients as v4-mapped: their redirect is
    // recorded by the IPv4 table.
    let v4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
    };
    if v4 {
        let raw = getsockopt(tcp, sockopt::OriginalDst).ok()?;
        let ip = Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr));
        Some(SocketAddr::V4(SocketAddrV4::new(
            ip,
            u16::from_be(raw.sin_port),
        )))
    } else {
        let raw = getsockopt(tcp, sockopt::Ip6tOriginalDst).ok()?;
        let ip = Ipv6Addr::from(raw.sin6_addr.s6_addr);
        Some(SocketAddr::V6(SocketAddrV6::new(
            ip,
            u16::from_be(raw.sin6_port),
            0,
            0,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_protocols_are_told_apart() {
        for (bytes, want) in [
            (&b"GET / HTTP/1.1\r\n"[..], Sniffed::Http),
            (b"POST /api", Sniffed::Http),
            (b"OPTIONS * HTTP/1.1", Sniffed::Http),
            (b"GE", Sniffed::Http),
            (b"SSH-2.0-OpenSSH", Sniffed::Other),
            (b"\x00\x01binary", Sniffed::Other),
            (b"get / HTTP/1.1", Sniffed::Other),
        ] {
            assert_eq!(classify_plain(bytes), want, "{bytes:?}");
        }
    }

    #[tokio::test]
    async fn a_fragmented_client_hello_is_reassembled_and_replayed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        // A real ClientHello from rustls, sent one byte per write.
        let client = tokio::spawn(async move {
            let mut conn = rustls::ClientConnection::new(
                Arc::new(
                    rustls::ClientConfig::builder_with_provider(Arc::new(
                        rustls::crypto::aws_lc_rs::default_provider(),
                    ))
                    .with_safe_default_protocol_versions()
                    .expect("versions")
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
                ),
                "push.example".try_into().expect("name"),
            )
            .expect("client");
            let mut hello = Vec::new();
            conn.write_tls(&mut hello).expect("hello");
            let mut tcp = TcpStream::connect(addr).await.expect("connect");
            for b in &hello {
                tcp.write_all(&[*b]).await.expect("write");
                tcp.flush().await.expect("flush");
            }
            (hello, tcp)
        });
        let (mut server, _) = listener.accept().await.expect("accept");
        let (prefix, kind) = sniff(&mut server, Duration::from_secs(5)).await;
        let (hello, _tcp) = client.await.expect("client");
        assert_eq!(
            kind,
            Sniffed::Tls {
                sni: Some("push.example".into())
            }
        );
        assert_eq!(prefix, hello, "every byte read is kept for the replay");
        let mut replay = Rewind::new(prefix, server);
        let mut again = vec![0u8; hello.len()];
        replay.read_exact(&mut again).await.expect("replay");
        assert_eq!(again, hello);
    }

    #[tokio::test]
    async fn a_stalled_client_hello_is_not_taken_for_another_protocol() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.expect("connect");
            tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
                .await
                .expect("write");
            tcp
        });
        let (mut server, _) = listener.accept().await.expect("accept");
        let (_, kind) = sniff(&mut server, Duration::from_millis(300)).await;
        assert_eq!(kind, Sniffed::Partial);
        drop(client.await);
        // A client that says nothing (server speaks first) is decided by address.
        let silent = tokio::spawn(async move { TcpStream::connect(addr).await.expect("connect") });
        let (mut server, _) = listener.accept().await.expect("accept");
        let (prefix, kind) = sniff(&mut server, Duration::from_millis(200)).await;
        assert_eq!((prefix.len(), kind), (0, Sniffed::Other));
        drop(silent.await);
    }

    #[tokio::test]
    async fn without_a_redirect_there_is_no_original_destination_but_our_own_address() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        // Without conntrack NAT the kernel either refuses the option or reports the local address.
        let got = original_dst(&server);
        assert!(got.is_none() || got == Some(addr), "{got:?}");
    }
}
