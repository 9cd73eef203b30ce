//! PROXY protocol (v1 and v2) from the load balancers in front of the explicit listener: who the
//! client really is. With `[listen] proxy_protocol = true`, a connection from an address in
//! `[clients] balancers` must open with a PROXY header, whose source address then stands for
//! the client (in `[clients] allow`, the audit record and the metrics); a header from any other
//! address is refused, so a client cannot claim another's address. A balancer's own `LOCAL`
//! (health check) connection is the balancer itself.

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use ppp::v1;
use ppp::v2;
use ppp::{HeaderResult, PartialResult};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::rewind::Rewind;
use crate::decide::policy::canonical;

/// The v2 signature; v1 headers open with `PROXY `.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest header read: v1 is at most 107 bytes; v2 TLVs beyond this are not expected from
/// a balancer that only passes addresses.
const MAX_HEADER: usize = 4096;

/// Why a connection was refused before any request.
#[derive(Debug, Eq, PartialEq, thiserror::Error)]
pub enum Refused {
    #[error("no PROXY protocol header from a balancer")]
    Missing,
    #[error("malformed PROXY protocol header")]
    Malformed,
    #[error("PROXY protocol header from an address not in [clients] balancers")]
    NotABalancer,
}

/// Read what a connection opens with: for a balancer, its PROXY header (the client is the
/// address it carries); for anyone else, a check that it sends no such header. Returns the
/// client and the stream with every byte after the header still to be read.
pub(super) async fn accept(
    mut tcp: TcpStream,
    from: SocketAddr,
    balancers: &[IpNet],
    within: Duration,
) -> Result<(SocketAddr, Rewind<TcpStream>), Refused> {
    let ip = canonical(from.ip());
    let from_balancer = balancers.iter().any(|net| net.contains(&ip));
    let mut buf = Vec::with_capacity(256);
    let read = async {
        loop {
            if from_balancer {
                match parse(&buf) {
                    Parsed::Done(client, used) => {
                        let rest = buf.split_off(used);
                        return Ok((client.unwrap_or(from), rest));
                    }
                    Parsed::Bad => return Err(Refused::Malformed),
                    Parsed::NoHeader => return Err(Refused::Missing),
                    Parsed::More => {}
                }
            } else if !may_be_header(&buf) {
                return Ok((from, std::mem::take(&mut buf)));
            }
            if buf.len() >= MAX_HEADER {
                return Err(Refused::Malformed);
            }
            let mut chunk = [0u8; 512];
            let n = tcp.read(&mut chunk).await.map_err(|_| Refused::Missing)?;
            if n == 0 {
                if !from_balancer {
                    // A client that closed early: nothing to refuse; hyper sees what it sent.
                    return Ok((from, std::mem::take(&mut buf)));
                }
                return Err(if buf.is_empty() {
                    Refused::Missing
                } else {
                    Refused::Malformed
                });
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let (client, rest) = match tokio::time::timeout(within, read).await {
        Ok(result) => result?,
        Err(_) if from_balancer => return Err(Refused::Missing),
        // A quiet client of no balancer: hyper's own header timeout deals with it.
        Err(_) => (from, buf),
    };
    if !from_balancer && is_header(&rest) {
        return Err(Refused::NotABalancer);
    }
    Ok((client, Rewind::new(rest, tcp)))
}

enum Parsed {
    /// A header of `usize` bytes; the client it names (`None`: a `LOCAL`/`UNKNOWN` connection of
    /// the balancer itself).
    Done(Option<SocketAddr>, usize),
    More,
    /// Not a PROXY header at all: the balancer sent none.
    NoHeader,
    Bad,
}

fn parse(buf: &[u8]) -> Parsed {
    if buf.is_empty() {
        return Parsed::More;
    }
    if !V2_SIGNATURE.starts_with(&buf[..buf.len().min(V2_SIGNATURE.len())])
        && !V1_PREFIX.starts_with(&buf[..buf.len().min(V1_PREFIX.len())])
    {
        return Parsed::NoHeader;
    }
    let header = HeaderResult::parse(buf);
    // A v1 header ends at its CRLF: past it, nothing more can complete it.
    let v1_ended = buf.starts_with(V1_PREFIX) && buf.windows(2).any(|w| w == b"\r\n");
    if header.is_incomplete() && !v1_ended {
        return Parsed::More;
    }
    match header {
        HeaderResult::V1(Ok(h)) => {
            let client = match h.addresses {
                v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Unknown => None,
            };
            Parsed::Done(client, h.header.len())
        }
        HeaderResult::V2(Ok(h)) => {
            let client = match (h.command, h.addresses) {
                (v2::Command::Local, _) => None,
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                // A PROXY command must name the client: a Unix socket or no address is refused.
                (v2::Command::Proxy, _) => return Parsed::Bad,
            };
            Parsed::Done(client, h.len())
        }
        _ => Parsed::Bad,
    }
}

/// Whether `buf` could still turn out to open with a PROXY header.
fn may_be_header(buf: &[u8]) -> bool {
    let n = buf.len();
    n < V1_PREFIX.len().max(V2_SIGNATURE.len())
        && (V2_SIGNATURE.starts_with(buf) || V1_PREFIX.starts_with(buf))
}

fn is_header(buf: &[u8]) -> bool {
    buf.starts_with(V2_SIGNATURE) || buf.starts_with(V1_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: v2::Command, addresses: v2::Addresses) -> Vec<u8> {
        v2::Builder::with_addresses(v2::Version::Two | command, v2::Protocol::Stream, addresses)
            .build()
            .expect("header")
    }

    #[test]
    fn headers_name_the_client() {
        let v4 = v2::Addresses::IPv4(v2::IPv4::new([10, 1, 2, 3], [10, 0, 0, 9], 50412, 3128));
        let mut with_request = v2(v2::Command::Proxy, v4);
        let len = with_request.len();
        with_request.extend_from_slice(b"CONNECT x:443 HTTP/1.1\r\n");
        for (bytes, want) in [
            (
                b"PROXY TCP4 10.1.2.3 10.0.0.9 50412 3128\r\nGET".to_vec(),
                Some((Some("10.1.2.3:50412"), 41)),
            ),
            (
                b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 3128\r\n".to_vec(),
                Some((Some("[2001:db8::1]:4000"), 46)),
            ),
            (b"PROXY UNKNOWN\r\n".to_vec(), Some((None, 15))),
            (with_request, Some((Some("10.1.2.3:50412"), len))),
            (
                v2(v2::Command::Local, v2::Addresses::Unspecified),
                Some((None, 16)),
            ),
        ] {
            match parse(&bytes) {
                Parsed::Done(client, used) => {
                    let client = client.map(|c| c.to_string());
                    assert_eq!(
                        Some((client.as_deref(), used)),
                        want,
                        "{:?}",
                        String::from_utf8_lossy(&bytes)
                    );
                }
                _ => panic!("{:?} not parsed", String::from_utf8_lossy(&bytes)),
            }
        }
    }

    #[test]
    fn partial_and_bad_headers() {
        for partial in [&b"PRO"[..], b"PROXY TCP4 10.1.2.3", b"\r\n\r\n\0\r\nQU"] {
            assert!(matches!(parse(partial), Parsed::More), "{partial:?}");
        }
        assert!(matches!(parse(b"GET / HTTP/1.1\r\n"), Parsed::NoHeader));
        for bad in [
            &b"PROXY TCP4 10.1.2.3 x 1 2\r\n"[..],
            b"PROXY TCP4 192.0.2.10 nonsense\r\n",
            b"PROXY TCP9 1 2 3 4\r\n",
            b"\r\n\r\n\0\r\nQUIT\n\x21\x31\x00\x00",
        ] {
            assert!(matches!(parse(bad), Parsed::Bad), "{bad:?}");
        }
        assert!(may_be_header(b"PRO") && may_be_header(b"\r\n") && !may_be_header(b"GET"));
        assert!(!may_be_header(b"CONNECT a:443"));
    }
}
