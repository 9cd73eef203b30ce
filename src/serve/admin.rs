//! The admin endpoint (`[listen] admin`): `GET /metrics` (Prometheus text), `/healthz` (the
//! process is up), `/readyz` (listening, CA loaded, policy loaded, audit log writable, not
//! draining), `/audit/head` (the newest record's node, seq, hash and time, for a monitoring
//! system to keep as a witness). It serves only clients in `[clients] allow` (loopback by
//! default) and never proxies traffic.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::debug;

use super::shared::Shared;
use crate::decide::plan::admit;

pub(super) async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = shared.token.cancelled() => return,
        };
        let Ok((tcp, client)) = accepted else {
            continue;
        };
        let s = shared.clone();
        let token = shared.token.clone();
        shared.tracker.spawn(async move {
            let service = service_fn(move |req| {
                let answer = if admit(&s.clients, client.ip()).is_ok() {
                    route(&s, &req)
                } else {
                    text(StatusCode::FORBIDDEN, "client not allowed\n".into())
                };
                async move { Ok::<_, Infallible>(answer) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                r = conn => {
                    if let Err(e) = r {
                        debug!(error = %e, "admin connection ended");
                    }
                }
                () = token.cancelled() => {}
            }
        });
    }
}

fn route(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let mut resp = text(StatusCode::OK, shared.metrics_text());
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/audit/head" => {
            let head = serde_json::to_string(&shared.audit.head()).unwrap_or_default();
            let mut resp = text(StatusCode::OK, head + "\n");
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            resp
        }
        "/readyz" => match shared.not_ready() {
            None => text(StatusCode::OK, "ready\n".into()),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found (try /metrics, /healthz, /readyz, /audit/head)\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}
