//! The one place where what was decided becomes an audit record and, where the client gets one,
//! a response (DESIGN §8, §9): [`Shared::refuse`] for refusals, [`Shared::record_closed`] for
//! connections closed without an answer of ours, [`Shared::record`] for everything else. Every
//! response the proxy makes on its own carries `x-consent-proxy`.

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use tracing::{debug, info};

use super::active::Active;
use super::shared::{Peer, Shared, Target};
use crate::audit::{AuditError, Entry, Outcome};
use crate::decide::{Decision, Refusal};
use crate::upstream::OutBody;

impl Shared {
    /// A record of a decision about to be made, with what is known of the connection and the
    /// request; the decision itself is set where it is made.
    pub(super) fn entry(
        &self,
        active: &Active,
        peer: Peer,
        target: Option<&Target>,
        method: Option<&Method>,
        path: Option<&str>,
    ) -> Entry {
        let mut e = Entry::new(Decision::Error, "");
        e.under = Some((active.policy_hash.clone(), active.consent_hash.clone()));
        e.client = Some(peer.client.to_string());
        e.original_dst = peer.original_dst.map(|a| a.to_string());
        e.listener = Some(peer.listener);
        e.method = method.map(Method::to_string);
        if let Some(t) = target {
            e.scheme = Some(t.scheme);
            e.host = Some(t.host.clone());
            e.port = Some(t.port);
        }
        e.path = path.map(str::to_string);
        e
    }

    /// Write a decision's final record (a refusal, a connection closed) and count it.
    pub(super) async fn record(&self, entry: &Entry) -> Result<u64, AuditError> {
        self.metrics.bytes(entry.bytes_in, entry.bytes_out);
        self.record_ahead(entry).await
    }

    /// Write a decision's record before anything it lets through leaves (write-ahead, DESIGN
    /// §9); returns its `seq`, which the [`crate::audit::Outcome`] completing it names. On an error nothing
    /// may leave.
    pub(super) async fn record_ahead(&self, entry: &Entry) -> Result<u64, AuditError> {
        self.metrics.decision(entry);
        debug!(
            decision = entry.decision.as_str(),
            feature = entry.feature.as_deref().unwrap_or("-"),
            host = entry.host.as_deref().unwrap_or("-"),
            "recorded"
        );
        self.audit.write(entry).await
    }

    /// The answer when a decision's record could not be written (or synced): nothing leaves.
    pub(super) fn audit_unavailable(
        &self,
        e: &AuditError,
        feature: Option<&str>,
    ) -> Response<OutBody> {
        self.unrecorded(e);
        response(&Refusal::AuditUnavailable, feature)
    }

    /// A record that was written but not synced (`sync = "data"`) is completed by an outcome:
    /// what it decided did not go ahead.
    pub(super) fn unrecorded(&self, e: &AuditError) {
        if let AuditError::Sync { seq, .. } = e {
            self.audit.outcome(Outcome {
                of: *seq,
                status: Some(Refusal::AuditUnavailable.status().as_u16()),
                bytes_out: Some(0),
                reason: Some(Refusal::AuditUnavailable.reason()),
                ..Outcome::default()
            });
        }
    }

    /// Audit a refusal and answer it.
    pub(super) async fn refuse(
        &self,
        mut entry: Entry,
        refusal: Refusal,
        feature: Option<&str>,
    ) -> Response<OutBody> {
        if matches!(
            refusal,
            Refusal::UpstreamFailed(_) | Refusal::UpstreamTimeout
        ) {
            self.metrics.upstream_errors.inc();
        }
        entry.decide(refusal.decision(), refusal.reason());
        entry.bytes_in.get_or_insert(0);
        entry.bytes_out.get_or_insert(0);
        entry.status = Some(refusal.status().as_u16());
        if entry.feature.is_none() {
            entry.feature = feature.map(str::to_string);
        }
        info!(decision = entry.decision.as_str(), reason = %entry.reason, "refused");
        if let Err(e) = self.record(&entry).await {
            return self.audit_unavailable(&e, feature);
        }
        response(&refusal, feature)
    }

    /// Record a connection that is closed (or was never answered) without a response of ours:
    /// `decision` for `reason`. Its bytes and status are not known (`null`) unless set.
    pub(super) async fn record_closed(
        &self,
        mut entry: Entry,
        decision: Decision,
        reason: String,
        feature: Option<String>,
    ) {
        entry.decide(decision, reason);
        if entry.feature.is_none() {
            entry.feature = feature;
        }
        let _ = self.record(&entry).await;
    }

    /// A request hyper could not parse was answered by hyper itself (400, or 431 for a head
    /// over the limit) before it reached us; it still gets its record. Other ways a connection
    /// ends (closed, timed out, reset) are not decisions.
    pub(super) async fn record_malformed(
        &self,
        peer: Peer,
        target: Option<&Target>,
        e: &hyper::Error,
    ) {
        if !e.is_parse() && !e.is_parse_too_large() {
            return;
        }
        let status = if e.is_parse_too_large() { 431 } else { 400 };
        let mut entry = self.entry(&self.current(), peer, target, None, None);
        // hyper answered: no body passed.
        entry.bytes_in = Some(0);
        entry.bytes_out = Some(0);
        entry.status = Some(status);
        let reason = format!("malformed request: {e}");
        self.record_closed(entry, Decision::Blocked, reason, None)
            .await;
    }

    /// Record a connection refused before any HTTP exchange: a client's TLS handshake with the
    /// minted leaf that did not complete or named another host (the client meant to reach a
    /// feature host; one that does not trust the CA shows here), or a connection a balancer's
    /// PROXY header did not vouch for. `blocked`, its bytes not known.
    pub(super) async fn record_blocked(
        &self,
        peer: Peer,
        target: Option<&Target>,
        method: Option<&Method>,
        reason: String,
    ) {
        let entry = self.entry(&self.current(), peer, target, method, None);
        self.record_closed(entry, Decision::Blocked, reason, None)
            .await;
    }
}

/// The response to a refusal: JSON `{"error", "feature", "reason"}`, or `{}` for a sink.
pub(super) fn response(refusal: &Refusal, feature: Option<&str>) -> Response<OutBody> {
    let body = match refusal {
        Refusal::ConsentDenied(crate::decide::policy::OnBlock::Sink) => "{}".to_string(),
        _ => serde_json::json!({
            "error": refusal.error(),
            "feature": feature,
            "reason": refusal.reason(),
        })
        .to_string(),
    };
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = refusal.status();
    let headers = resp.headers_mut();
    headers.insert(
        "x-consent-proxy",
        HeaderValue::from_static(refusal.decision().as_str()),
    );
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// An empty response of ours (the `200` that opens a tunnel).
pub(super) fn empty(status: StatusCode) -> Response<OutBody> {
    let mut resp = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp
}
