//! The exchange: one request decided ([`plan_request`]), its body read only when a rule must
//! read it, rewritten ([`plan::rewrite`]), recorded (write-ahead), sent to the upstream over
//! verified TLS, its outcome noted once the response head is in, and the response streamed
//! back. What RFC 9112 leaves a receiver free
//! to read another way is refused here, strictly, before any decision.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HOST};
use http::request::Parts;
use http::{Method, Request, Response, Uri, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tracing::warn;

use super::respond::response;
use super::shared::{Peer, Shared, Target, TargetForm};
use crate::audit::{AuditLog, Entry, Outcome};
use crate::decide::path;
use crate::decide::plan::{self, plan_request, RequestPlan};
use crate::decide::policy::{normalized_host, Mode};
use crate::decide::Refusal;
use crate::rewrite::{self, Message};
use crate::upstream::{self, ConnectError, OutBody, PinnedError};

impl Shared {
    /// Decide one request to `target` and answer it: refuse, or rewrite and forward.
    pub(super) async fn request(
        &self,
        peer: Peer,
        target: Target,
        req: Request<Incoming>,
    ) -> Response<OutBody> {
        let start = std::time::Instant::now();
        let response = self.exchange(peer, target, req).await;
        let seconds = start.elapsed().as_secs_f64();
        self.metrics.request_duration.0.observe(seconds);
        response
    }

    /// Decide one request, and forward it or answer it.
    async fn exchange(
        &self,
        peer: Peer,
        target: Target,
        req: Request<Incoming>,
    ) -> Response<OutBody> {
        let (mut parts, body) = req.into_parts();
        let active = self.current();
        let normalized = path::normalize(&parts.method, parts.uri.path());
        let path = normalized.as_deref().map_err(|e| *e);
        let mode = active.policy.mode;
        // To a feature's host the path leaves as the rules read it (enforce mode; report mode
        // forwards requests as they came): set only when that differs from what came.
        let normal_path = match &normalized {
            Ok(Cow::Owned(p)) if mode == Mode::Enforce => {
                Some(path::encode(p).into_owned()).filter(|p| p != parts.uri.path())
            }
            _ => None,
        };
        let mut entry = self.entry(
            &active,
            peer,
            Some(&target),
            Some(&parts.method),
            Some(path.unwrap_or(parts.uri.path())),
        );
        if let Err(why) = strict_http1(&parts, &target).and_then(|()| names_agree(&parts, &target))
        {
            return self
                .refuse_draining(entry, body, Refusal::Malformed(why), None)
                .await;
        }
        // A pinned connection goes to one address whatever the request names: the name must
        // be one that address may be reached by (the dialer checks every other connection).
        if let Some(pinned) = &target.pinned {
            if let Err(feature) = self.admit_address(Some(&target.host), pinned.addr()).await {
                let refusal = Refusal::FeatureAddress;
                return self
                    .refuse_draining(entry, body, refusal, Some(&feature))
                    .await;
            }
        }
        let (feature, rules, mut withheld) = match plan_request(&active.policy, &target.host, path)
        {
            RequestPlan::Refuse { refusal, feature } => {
                let name = feature.map(|f| f.name.as_str());
                return self.refuse_draining(entry, body, refusal, name).await;
            }
            RequestPlan::Forward {
                decision,
                reason,
                feature,
            } => {
                if feature.is_none() && target.pinned.is_none() {
                    if let Err(feature) = self.admit_name(&target).await {
                        let refusal = Refusal::FeatureAddress;
                        return self
                            .refuse_draining(entry, body, refusal, Some(&feature))
                            .await;
                    }
                }
                if let Some(f) = feature {
                    entry.feature = Some(f.name.clone());
                    if let Some(normal) = &normal_path {
                        parts.uri = with_target(&parts.uri, normal, parts.uri.query());
                    }
                }
                entry.decide(decision, reason);
                let body = Forwarded::Streamed(streamed(body));
                return self.forward(entry, &target, parts, body).await;
            }
            RequestPlan::Rewrite {
                feature,
                rules,
                withheld,
            } => (feature, rules, withheld),
        };
        entry.feature = Some(feature.name.clone());
        let known = feature.known.as_ref();
        let reads_body = rewrite::reads_body(&rules, &parts.headers, known);
        let (raw, body) = if reads_body {
            match self.read_body(&parts.headers, body).await {
                Ok(bytes) => (bytes, None),
                Err(refusal) => return self.refuse(entry, refusal, Some(&feature.name)).await,
            }
        } else {
            (Bytes::new(), Some(body))
        };
        if reads_body {
            entry.bytes_in = Some(raw.len() as u64);
        }
        // Report mode forwards the request as it came: only then is a copy of the headers kept.
        let original = (mode == Mode::Report).then(|| parts.headers.clone());
        let mut msg = Message {
            query: parts.uri.query().map(str::to_string),
            headers: std::mem::take(&mut parts.headers),
            body: raw.clone(),
        };
        let limit = self.limits.max_body_bytes;
        let drift = known.map(|k| (k, active.policy.consent.unclassified));
        let outcome = match plan::rewrite(mode, &rules, &mut withheld, &mut msg, limit, drift) {
            Ok(outcome) => outcome,
            Err(refusal) => {
                if let Refusal::Unclassified(names) = &refusal {
                    entry.unclassified.clone_from(names);
                }
                return self.refuse(entry, refusal, Some(&feature.name)).await;
            }
        };
        entry.decide(outcome.decision, outcome.reason);
        entry.removed = outcome.edits.removed;
        entry.replaced = outcome.edits.replaced;
        entry.unclassified = outcome.edits.unclassified;
        // Report mode: the request leaves as it came. Otherwise as the rewriter left it (a body
        // it decoded is encoded again even when no rule changed it).
        let (headers, read) = match original {
            Some(headers) => (headers, raw),
            None => (msg.headers, msg.body),
        };
        if outcome.rewritten || normal_path.is_some() {
            let query = if outcome.rewritten {
                msg.query.as_deref()
            } else {
                parts.uri.query()
            };
            let path = normal_path.as_deref().unwrap_or(parts.uri.path());
            parts.uri = with_target(&parts.uri, path, query);
        }
        parts.headers = headers;
        let out = match body {
            Some(body) => Forwarded::Streamed(without_trailers(body)),
            None => Forwarded::Read(read),
        };
        self.forward(entry, &target, parts, out).await
    }

    /// Refuse a request whose body has not been read: read and count it first (see
    /// [`Shared::drain`]).
    pub(super) async fn refuse_draining(
        &self,
        mut entry: Entry,
        body: Incoming,
        refusal: Refusal,
        feature: Option<&str>,
    ) -> Response<OutBody> {
        entry.bytes_in = Some(self.drain(body).await);
        self.refuse(entry, refusal, feature).await
    }

    /// Read and discard a refused request's body (up to `max_body_bytes`, for a few seconds)
    /// before answering: an h2 stream whose body is dropped unread is reset, and clients then
    /// report a stream error instead of the refusal.
    async fn drain(&self, body: Incoming) -> u64 {
        let read = Arc::new(AtomicU64::new(0));
        let max = usize::try_from(self.limits.max_body_bytes).unwrap_or(usize::MAX);
        let counted = Counted::new(body, read.clone());
        let _ = tokio::time::timeout(Duration::from_secs(5), Limited::new(counted, max).collect())
            .await;
        read.load(Ordering::Relaxed)
    }

    /// Read a body a rule must inspect, within `max_body_bytes`.
    async fn read_body(&self, headers: &HeaderMap, body: Incoming) -> Result<Bytes, Refusal> {
        let max = self.limits.max_body_bytes;
        if declared_length(headers).is_some_and(|n| n > max) {
            return Err(Refusal::BodyTooLarge);
        }
        match Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX))
            .collect()
            .await
        {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Refusal::BodyTooLarge),
            Err(_) => Err(Refusal::Malformed("request body truncated or malformed")),
        }
    }

    /// Record the decision (write-ahead: before anything leaves), send the request upstream,
    /// note its outcome once the response head is in, and stream the body back.
    async fn forward(
        &self,
        mut entry: Entry,
        target: &Target,
        parts: Parts,
        body: Forwarded,
    ) -> Response<OutBody> {
        // A body the rules read leaves whole: its length is known now. A streamed one is known
        // only as the upstream reads it, in the outcome.
        let body = match body {
            Forwarded::Read(bytes) => {
                entry.bytes_out = Some(bytes.len() as u64);
                full(bytes)
            }
            Forwarded::Streamed(body) => body,
        };
        let seq = match self.record_ahead(&entry).await {
            Ok(seq) => seq,
            Err(e) => return self.audit_unavailable(&e, entry.feature.as_deref()),
        };
        let sent_bytes = Arc::new(AtomicU64::new(0));
        let body = Counted::new(body, sent_bytes.clone()).boxed();
        let mut req = Request::new(body);
        *req.method_mut() = parts.method;
        *req.uri_mut() = upstream_uri(target, &parts.uri);
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = parts.headers;
        strip_hop_by_hop(req.headers_mut());
        req.headers_mut().remove(HOST);
        let failed = || {
            (
                Refusal::UpstreamFailed("upstream connection failed".into()),
                None,
            )
        };
        let sent =
            async {
                match &target.pinned {
                    Some(pinned) => pinned.request(req).await.map_err(|e| match e {
                        PinnedError::Connect(c) => connect_refusal(&c),
                        PinnedError::Request(_) => failed(),
                    }),
                    None => self.upstream.request(req).await.map_err(|e| {
                        upstream::connect_error(&e).map_or_else(failed, connect_refusal)
                    }),
                }
            };
        let mut unanswered = Unanswered {
            audit: &self.audit,
            seq: Some(seq),
            sent: &sent_bytes,
            bytes_in: entry.bytes_in,
        };
        let result = tokio::time::timeout(self.limits.upstream_timeout, sent).await;
        unanswered.seq = None;
        let passed = sent_bytes.load(Ordering::Relaxed);
        let bytes_in = entry.bytes_in.unwrap_or(passed);
        self.metrics.bytes(Some(bytes_in), Some(passed));
        let mut outcome = Outcome {
            of: seq,
            bytes_in: Some(bytes_in),
            bytes_out: Some(passed),
            ..Outcome::default()
        };
        let resp = match result {
            Ok(Ok(resp)) => resp,
            failure => {
                let (refusal, feature) = match failure {
                    Ok(Err(failed)) => failed,
                    _ => (Refusal::UpstreamTimeout, None),
                };
                warn!(host = %target.host, reason = %refusal.reason(), "upstream request failed");
                self.metrics.upstream_errors.inc();
                outcome.status = Some(refusal.status().as_u16());
                outcome.reason = Some(refusal.reason());
                self.audit.outcome(outcome);
                let feature = feature.as_deref().or(entry.feature.as_deref());
                return response(&refusal, feature);
            }
        };
        outcome.status = Some(resp.status().as_u16());
        self.audit.outcome(outcome);
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.version = Version::HTTP_11;
        Response::from_parts(parts, body.map_err(Into::into).boxed())
    }
}

/// A forwarded request's record waiting for its upstream's answer: dropped with the exchange
/// before that answer (the client went away, the proxy stopped), it queues the outcome saying
/// so, with the bytes that had left. `seq` `None`: answered, nothing to say.
struct Unanswered<'a> {
    audit: &'a AuditLog,
    seq: Option<u64>,
    sent: &'a AtomicU64,
    bytes_in: Option<u64>,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        let Some(of) = self.seq else {
            return;
        };
        let sent = self.sent.load(Ordering::Relaxed);
        self.audit.outcome(Outcome {
            of,
            status: None,
            bytes_in: Some(self.bytes_in.unwrap_or(sent)),
            bytes_out: Some(sent),
            reason: Some(
                "interrupted before the upstream answered (the client left or the proxy stopped)"
                    .into(),
            ),
        });
    }
}

/// A request body on its way upstream: read by the rules (and whole), or streamed.
enum Forwarded {
    Read(Bytes),
    Streamed(OutBody),
}

/// The body length a request declares in `Content-Length`, if any.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Why a connection upstream was not made, as a refusal, with the feature an address check
/// found the destination to serve.
pub(super) fn connect_refusal(e: &ConnectError) -> (Refusal, Option<String>) {
    match e {
        ConnectError::Timeout => (Refusal::UpstreamTimeout, None),
        ConnectError::FeatureAddress(feature) => (Refusal::FeatureAddress, Some(feature.clone())),
        other => (Refusal::UpstreamFailed(other.to_string()), None),
    }
}

/// RFC 9112 read strictly, where hyper is lenient and a receiver might read the request
/// differently from the proxy: a `Host` (more than one is [`names_agree`]'s to refuse); the
/// request-target in the one form the listener takes (origin-form, or `*` for OPTIONS, inside
/// an intercepted connection; absolute-form for a plain-HTTP proxy request); `chunked` as the
/// only transfer coding, not in HTTP/1.0. hyper itself refuses `Content-Length`s that disagree;
/// with both `Transfer-Encoding` and `Content-Length` it follows RFC 9112 §6.3 (chunked wins,
/// the connection closes after the response), and the body leaves re-framed, so no receiver
/// reads it otherwise. HTTP/2 requests are framed by h2 and checked by [`names_agree`] alone.
fn strict_http1(parts: &Parts, target: &Target) -> Result<(), &'static str> {
    if parts.version >= Version::HTTP_2 {
        return Ok(());
    }
    if !parts.headers.contains_key(HOST) {
        return Err("HTTP/1 request without a Host header");
    }
    let uri = &parts.uri;
    let origin_form = uri.scheme().is_none()
        && uri.authority().is_none()
        && (uri.path().starts_with('/') || (uri.path() == "*" && parts.method == Method::OPTIONS));
    let absolute_form = uri.scheme().is_some() && uri.authority().is_some();
    match target.form {
        TargetForm::Absolute if !absolute_form => {
            return Err("a plain-HTTP proxy request must have an absolute-form target");
        }
        TargetForm::Origin if !origin_form => return Err("request target is not origin-form"),
        _ => {}
    }
    let codings: Vec<_> = parts
        .headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .collect();
    if !codings.is_empty() {
        if parts.version == Version::HTTP_10 {
            return Err("Transfer-Encoding in an HTTP/1.0 request");
        }
        if codings.len() > 1 || !codings[0].as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err("Transfer-Encoding other than chunked");
        }
    }
    Ok(())
}

/// A request's own names (URI authority, `Host`) must name the CONNECT target.
fn names_agree(parts: &Parts, target: &Target) -> Result<(), &'static str> {
    let default_port = if target.scheme == "https" { 443 } else { 80 };
    let matches = |host: &str, port: Option<u16>| {
        normalized_host(host) == target.host.as_str() && port.unwrap_or(default_port) == target.port
    };
    if let Some(a) = parts.uri.authority() {
        if !matches(a.host(), a.port_u16()) {
            return Err("request authority does not match the CONNECT target");
        }
    }
    let hosts: Vec<_> = parts.headers.get_all(HOST).iter().collect();
    if hosts.len() > 1 {
        return Err("more than one Host header");
    }
    if let Some(h) = hosts.first() {
        let parsed = h
            .to_str()
            .ok()
            .and_then(|h| h.parse::<http::uri::Authority>().ok());
        match parsed {
            Some(a) if matches(a.host(), a.port_u16()) => {}
            _ => return Err("Host header does not match the CONNECT target"),
        }
    }
    Ok(())
}

fn upstream_uri(target: &Target, uri: &Uri) -> Uri {
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let host = if target.host.contains(':') && !target.host.starts_with('[') {
        format!("[{}]", target.host)
    } else {
        target.host.clone()
    };
    format!("{}://{}:{}{}", target.scheme, host, target.port, pq)
        .parse()
        .unwrap_or_else(|_| uri.clone())
}

/// `uri` with this path and query (the path a feature's request is decided on, the query the
/// rules left).
fn with_target(uri: &Uri, path: &str, query: Option<&str>) -> Uri {
    let pq = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = pq.parse().ok();
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

/// Remove connection-scoped headers, including those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in rewrite::HopByHop::of(headers).iter() {
        headers.remove(name);
    }
}

/// A body that counts the data it yields into a shared counter.
struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Counted { inner, count }
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                use bytes::Buf;
                this.count
                    .fetch_add(data.remaining() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

fn streamed(body: Incoming) -> OutBody {
    body.map_err(Into::into).boxed()
}

/// A body of a request the rules looked at, streamed without its trailers: the rules read the
/// headers, and trailers are headers a client could send after them (a read body is collected,
/// which drops them too).
fn without_trailers(body: Incoming) -> OutBody {
    NoTrailers(body).map_err(Into::into).boxed()
}

struct NoTrailers<B>(B);

impl<B: hyper::body::Body + Unpin> hyper::body::Body for NoTrailers<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        match std::pin::Pin::new(&mut self.get_mut().0).poll_frame(cx) {
            // Trailers come last: the body ends there.
            std::task::Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => {
                std::task::Poll::Ready(None)
            }
            polled => polled,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.0.size_hint()
    }
}

fn full(bytes: Bytes) -> OutBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    #[test]
    fn names_must_agree_with_the_target() {
        let target = Target {
            scheme: "https",
            host: "push.example".into(),
            port: 443,
            pinned: None,
            form: TargetForm::Origin,
        };
        for (uri, host, ok) in [
            ("/x", Some("push.example"), true),
            ("/x", Some("PUSH.example:443"), true),
            ("/x", None, true),
            ("/x", Some("evil.example"), false),
            ("/x", Some("push.example:8443"), false),
            ("https://push.example/x", None, true),
            ("https://evil.example/x", Some("push.example"), false),
        ] {
            let mut b = Request::builder().uri(uri);
            if let Some(h) = host {
                b = b.header(HOST, h);
            }
            let (parts, ()) = b.body(()).expect("request").into_parts();
            assert_eq!(names_agree(&parts, &target).is_ok(), ok, "{uri} {host:?}");
        }
    }

    /// A test body: these frames, in order.
    struct Frames(Vec<hyper::body::Frame<Bytes>>);

    impl hyper::body::Body for Frames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
            let frames = &mut self.get_mut().0;
            std::task::Poll::Ready((!frames.is_empty()).then(|| Ok(frames.remove(0))))
        }
    }

    #[tokio::test]
    async fn trailers_of_an_inspected_body_do_not_leave() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-install-id", "secret".parse().expect("value"));
        let frames = || {
            Frames(vec![
                hyper::body::Frame::data(Bytes::from_static(b"body")),
                hyper::body::Frame::trailers(trailers.clone()),
            ])
        };
        let passed = NoTrailers(frames()).collect().await.expect("collects");
        assert!(passed.trailers().is_none());
        assert_eq!(passed.to_bytes(), "body");
        let as_sent = frames().collect().await.expect("collects");
        assert!(
            as_sent.trailers().is_some(),
            "the test body carries trailers"
        );
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-secret-hop".parse().expect("value"));
        h.insert("x-secret-hop", "1".parse().expect("value"));
        h.insert("keep-alive", "5".parse().expect("value"));
        h.insert("accept", "*/*".parse().expect("value"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["accept"]);
    }
}
