//! The explicit listener (`HTTPS_PROXY`): CONNECT, planned once by [`plan_connect`] and then
//! refused, tunnelled or intercepted; and absolute-form plain-HTTP requests, each sent to the
//! exchange. With `[listen] proxy_protocol`, the client is the one a balancer's PROXY header
//! names.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, Instrument};

use super::accept::{accept_each, until_cancelled};
use super::balancer;
use super::exchange::connect_refusal;
use super::respond::empty;
use super::shared::{Peer, Shared, Target, TargetForm};
use super::tunnel::Ends;
use crate::audit::{Entry, Outcome};
use crate::decide::plan::{admit, plan_connect, ConnectPlan};
use crate::decide::policy::normalize_host;
use crate::decide::{Decision, Reason, Refusal};
use crate::upstream::OutBody;

/// Accept proxy clients until shutdown.
pub(super) async fn accept(shared: Arc<Shared>, listener: TcpListener) {
    accept_each(shared, listener, "explicit", |s, from, tcp| async move {
        if !s.proxy_protocol {
            return serve(s, peer(from), tcp).await;
        }
        let within = s.limits.header_read_timeout;
        match balancer::accept(tcp, from, &s.balancers, within).await {
            Ok((client, io)) => serve(s, peer(client), io).await,
            Err(refused) => {
                info!(reason = %refused, "connection refused");
                s.record_blocked(peer(from), None, None, refused.to_string())
                    .await;
            }
        }
    })
    .await
}

fn peer(client: SocketAddr) -> Peer {
    Peer {
        client,
        listener: "explicit",
        original_dst: None,
    }
}

async fn serve<IO>(shared: Arc<Shared>, peer: Peer, tcp: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let s = shared.clone();
    let service = service_fn(move |req| {
        let s = s.clone();
        async move { Ok::<_, Infallible>(s.explicit(peer, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.header_read_timeout)
        .serve_connection(TokioIo::new(tcp), service)
        .with_upgrades();
    let result = until_cancelled(conn, &shared.token, |c| c.graceful_shutdown()).await;
    if let Err(e) = result {
        debug!(error = %e, "client connection ended");
        shared.record_malformed(peer, None, &e).await;
    }
}

impl Shared {
    /// One request on the explicit listener: CONNECT, or an absolute-form plain-HTTP request.
    async fn explicit(self: &Arc<Self>, peer: Peer, req: Request<Incoming>) -> Response<OutBody> {
        if let Err(refusal) = admit(&self.clients, peer.client.ip()) {
            let entry = self.entry(&self.current(), peer, None, Some(req.method()), None);
            return self.refuse(entry, refusal, None).await;
        }
        if req.method() == Method::CONNECT {
            return self.connect(peer, req).await;
        }
        match (req.uri().scheme_str(), req.uri().host()) {
            (Some("http"), Some(host)) => {
                let target = Target {
                    scheme: "http",
                    host: normalize_host(host),
                    port: req.uri().port_u16().unwrap_or(80),
                    pinned: None,
                    form: TargetForm::Absolute,
                };
                if self.loops_back(&target).await {
                    let entry = self.entry(
                        &self.current(),
                        peer,
                        Some(&target),
                        Some(req.method()),
                        None,
                    );
                    let (_, body) = req.into_parts();
                    return self.refuse_draining(entry, body, Refusal::Loop, None).await;
                }
                self.request(peer, target, req).await
            }
            _ => {
                let entry = self.entry(&self.current(), peer, None, Some(req.method()), None);
                let why = "not a proxy request (use CONNECT for https, absolute-form for http)";
                self.refuse(entry, Refusal::Malformed(why), None).await
            }
        }
    }

    async fn connect(self: &Arc<Self>, peer: Peer, req: Request<Incoming>) -> Response<OutBody> {
        let Some(target) = connect_target(req.uri()) else {
            let entry = self.entry(&self.current(), peer, None, Some(req.method()), None);
            let refusal = Refusal::Malformed("CONNECT target is not host:port");
            return self.refuse(entry, refusal, None).await;
        };
        let active = self.current();
        let entry = self.entry(&active, peer, Some(&target), Some(req.method()), None);
        if self.loops_back(&target).await {
            return self.refuse(entry, Refusal::Loop, None).await;
        }
        match plan_connect(&active.policy, Some(&target.host)) {
            ConnectPlan::Refuse { refusal, feature } => {
                let feature = feature.map(|f| f.name.as_str());
                self.refuse(entry, refusal, feature).await
            }
            ConnectPlan::Tunnel => self.tunnel(peer, entry, target, req).await,
            ConnectPlan::Intercept => {
                let this = self.clone();
                let span = tracing::info_span!("intercept", host = %target.host);
                self.tracker.spawn(
                    async move {
                        match hyper::upgrade::on(req).await {
                            Ok(upgraded) => {
                                this.intercept(peer, target, TokioIo::new(upgraded)).await
                            }
                            Err(e) => debug!(error = %e, "CONNECT upgrade failed"),
                        }
                    }
                    .instrument(span),
                );
                empty(StatusCode::OK)
            }
        }
    }

    /// Open a blind tunnel: connect first (so a dead upstream is a 502), audit, then copy.
    async fn tunnel(
        self: &Arc<Self>,
        peer: Peer,
        mut entry: Entry,
        target: Target,
        req: Request<Incoming>,
    ) -> Response<OutBody> {
        // The dialer checks the addresses the name resolved to before connecting: a name of no
        // feature, an alias or an IP literal does not reach a feature host around the policy.
        let upstream = match self.upstream.dial(&target.host, target.port).await {
            Ok(tcp) => tcp,
            Err(e) => {
                let (refusal, feature) = connect_refusal(&e);
                return self.refuse(entry, refusal, feature.as_deref()).await;
            }
        };
        entry.decide(Decision::Tunneled, Reason::NoFeature);
        entry.status = Some(200);
        let seq = match self.record_ahead(&entry).await {
            Ok(seq) => seq,
            Err(e) => return self.audit_unavailable(&e, None),
        };
        let this = self.clone();
        self.tracker.spawn(async move {
            let ends = match hyper::upgrade::on(req).await {
                Ok(upgraded) => match upgraded.downcast::<TokioIo<TcpStream>>() {
                    Ok(parts) => {
                        // What the client sent after its CONNECT, read with it, goes first.
                        let mut upstream = upstream;
                        let first = parts.read_buf;
                        if upstream.write_all(&first).await.is_err() {
                            Err(("upstream closed before the first bytes", first.len()))
                        } else {
                            Ok((Ends::Sockets(parts.io.into_inner(), upstream), first.len()))
                        }
                    }
                    Err(upgraded) => Ok((Ends::Streams(TokioIo::new(upgraded), upstream), 0)),
                },
                Err(_) => Err(("the client left before the tunnel opened", 0)),
            };
            match ends {
                Ok((ends, sent)) => this.relay(peer, target, ends, seq, sent as u64).await,
                Err((how, received)) => this.audit.outcome(Outcome {
                    of: seq,
                    bytes_in: Some(received as u64),
                    bytes_out: Some(0),
                    reason: Some(how.into()),
                    ..Outcome::default()
                }),
            }
        });
        empty(StatusCode::OK)
    }
}

/// `host:port` of a CONNECT, with a host that can be named in TLS.
fn connect_target(uri: &Uri) -> Option<Target> {
    let authority = uri.authority()?;
    if uri.scheme().is_some()
        || uri
            .path_and_query()
            .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
    {
        return None;
    }
    let port = authority.port_u16().filter(|p| *p != 0)?;
    let host = normalize_host(authority.host());
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || ServerName::try_from(bare.to_string()).is_err() {
        return None;
    }
    Some(Target {
        scheme: "https",
        host,
        port,
        pinned: None,
        form: TargetForm::Origin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_targets() {
        for (uri, want) in [
            ("a.example:443", Some(("a.example", 443))),
            ("A.Example.:8443", Some(("a.example", 8443))),
            ("127.0.0.1:443", Some(("127.0.0.1", 443))),
            ("[::1]:443", Some(("[::1]", 443))),
            ("a.example", None),
            ("a.example:0", None),
            ("a.example:99999", None),
        ] {
            let got = uri
                .parse::<Uri>()
                .ok()
                .and_then(|u| connect_target(&u))
                .map(|t| (t.host, t.port));
            assert_eq!(got, want.map(|(h, p)| (h.to_string(), p)), "{uri}");
        }
    }
}
