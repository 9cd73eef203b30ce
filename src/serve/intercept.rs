//! Interception: the client's TLS is terminated with a leaf minted for the host it named, then
//! each request on the connection (HTTP/1.1 or h2, as the client negotiated) goes to the
//! exchange ([`Shared::request`]).

use std::convert::Infallible;
use std::sync::Arc;

use http::Method;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio_rustls::LazyConfigAcceptor;
use tracing::{debug, warn};

use super::accept::until_cancelled;
use super::h2_resets::{Refused, Watched};
use super::shared::{Peer, Shared, Target};
use crate::decide::policy::normalized_host;
use crate::decide::Decision;

impl Shared {
    /// Terminate the client's TLS with a leaf for the CONNECT host, then decide each request.
    pub(super) async fn intercept<IO>(self: Arc<Self>, peer: Peer, target: Target, io: IO)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
        let limit = self.limits.tls_handshake_timeout;
        let start = match handshake_step(tokio::time::timeout(limit, acceptor).await, "hello") {
            Ok(start) => start,
            Err((why, outcome)) => {
                self.handshake(outcome);
                return self
                    .record_blocked(peer, Some(&target), Some(&Method::CONNECT), why)
                    .await;
            }
        };
        if let Some(sni) = start.client_hello().server_name() {
            if normalized_host(sni) != target.host.as_str() {
                let why = "TLS SNI does not match the CONNECT target".to_string();
                return self
                    .record_blocked(peer, Some(&target), Some(&Method::CONNECT), why)
                    .await;
            }
        }
        let config = match self.ca.server_config(&target.host) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot mint a leaf");
                let entry = self.entry(
                    &self.current(),
                    peer,
                    Some(&target),
                    Some(&Method::CONNECT),
                    None,
                );
                let reason = format!("cannot mint a leaf: {e}");
                return self
                    .record_closed(entry, Decision::Error, reason, None)
                    .await;
            }
        };
        let handshake = tokio::time::timeout(limit, start.into_stream(config)).await;
        let tls = match handshake_step(handshake, "handshake") {
            Ok(tls) => tls,
            Err((why, outcome)) => {
                self.handshake(outcome);
                return self
                    .record_blocked(peer, Some(&target), Some(&Method::CONNECT), why)
                    .await;
            }
        };
        self.handshake("ok");
        let this = self.clone();
        let for_service = target.clone();
        let service = service_fn(move |req| {
            let this = this.clone();
            let target = for_service.clone();
            async move { Ok::<_, Infallible>(this.request(peer, target, req).await) }
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout);
        builder.http2().timer(TokioTimer::new());
        // What the HTTP/2 layer refuses itself never reaches `request`: recorded from here.
        let (report, mut refused) = tokio::sync::mpsc::unbounded_channel();
        let recorder = {
            let (this, target) = (self.clone(), target.clone());
            self.tracker.spawn(async move {
                while let Some(r) = refused.recv().await {
                    this.record_blocked(peer, Some(&target), None, Refused::reason(&r))
                        .await;
                }
            })
        };
        let conn = builder.serve_connection(TokioIo::new(Watched::new(tls, report)), service);
        let result = until_cancelled(conn, &self.token, |c| c.graceful_shutdown()).await;
        // The connection (and the reporting end) is gone: every refusal is recorded before
        // this connection's handling ends.
        let _ = recorder.await;
        if let Err(e) = result {
            debug!(error = %e, "intercepted connection ended");
            if let Some(e) = e.downcast_ref::<hyper::Error>() {
                self.record_malformed(peer, Some(&target), e).await;
            }
        }
    }
}

impl Shared {
    /// Count one client TLS handshake by its outcome.
    fn handshake(&self, outcome: &'static str) {
        let labels = crate::metrics::HandshakeLabels { outcome };
        self.metrics.tls_handshakes.get_or_create(&labels).inc();
    }
}

/// One step of a client's TLS handshake, bounded in time: the result, or why it failed and the
/// outcome the metric counts (`failed`, `timeout`).
fn handshake_step<T, E: std::fmt::Display>(
    result: Result<Result<T, E>, tokio::time::error::Elapsed>,
    step: &str,
) -> Result<T, (String, &'static str)> {
    match result {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(e)) => Err((format!("client TLS {step} failed: {e}"), "failed")),
        Err(_) => Err((format!("client TLS {step} timed out"), "timeout")),
    }
}
