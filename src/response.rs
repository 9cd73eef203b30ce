//! The one place where a refusal becomes a response, a decision and an audit reason
//! (DESIGN §8). Every response the proxy makes on its own carries `x-consent-proxy`.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::audit::Decision;
use crate::policy::OnBlock;
use crate::rewrite::RewriteError;
use crate::upstream::OutBody;

/// Why the proxy answers a request itself instead of forwarding it.
#[derive(Debug)]
pub enum Refusal {
    /// The client address is not in `[clients] allow`.
    ClientNotAllowed,
    /// The request is malformed or its names disagree.
    Malformed(&'static str),
    /// The feature's consent is denied.
    ConsentDenied(OnBlock),
    /// The destination belongs to no feature and `unknown_hosts = "deny"`.
    UnknownHost,
    /// A rule must read a body larger than `max_body_bytes`.
    BodyTooLarge,
    /// A rule must read a body it cannot.
    Unreadable(RewriteError),
    /// The audit log cannot be written: inspected traffic stops.
    AuditUnavailable,
    /// The upstream could not be reached or did not verify.
    UpstreamFailed(String),
    /// The upstream did not answer in time.
    UpstreamTimeout,
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::ClientNotAllowed | Refusal::UnknownHost => StatusCode::FORBIDDEN,
            Refusal::ConsentDenied(OnBlock::Reject) => StatusCode::FORBIDDEN,
            Refusal::ConsentDenied(OnBlock::Sink) => StatusCode::OK,
            Refusal::Malformed(_) => StatusCode::BAD_REQUEST,
            Refusal::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::Unreadable(RewriteError::TooLarge) => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::Unreadable(RewriteError::AmbiguousQuery) => StatusCode::BAD_REQUEST,
            Refusal::Unreadable(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Refusal::AuditUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::UpstreamFailed(_) => StatusCode::BAD_GATEWAY,
            Refusal::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    pub fn decision(&self) -> Decision {
        match self {
            Refusal::ClientNotAllowed => Decision::Denied,
            Refusal::AuditUnavailable | Refusal::UpstreamFailed(_) | Refusal::UpstreamTimeout => {
                Decision::Error
            }
            _ => Decision::Blocked,
        }
    }

    /// The reason, as the audit log and the response body state it.
    pub fn reason(&self) -> String {
        match self {
            Refusal::ClientNotAllowed => "client address not allowed".into(),
            Refusal::Malformed(why) => (*why).into(),
            Refusal::ConsentDenied(_) => "consent denied".into(),
            Refusal::UnknownHost => {
                "destination belongs to no feature and unknown_hosts = deny".into()
            }
            Refusal::BodyTooLarge => "body over max_body_bytes".into(),
            Refusal::Unreadable(e) => e.to_string(),
            Refusal::AuditUnavailable => "audit log cannot be written".into(),
            Refusal::UpstreamFailed(why) => why.clone(),
            Refusal::UpstreamTimeout => "upstream timed out".into(),
        }
    }

    fn error(&self) -> &'static str {
        match self {
            Refusal::ClientNotAllowed => "client not allowed",
            Refusal::Malformed(_) => "bad request",
            Refusal::ConsentDenied(_) | Refusal::UnknownHost => "blocked by consent policy",
            Refusal::BodyTooLarge => "request body too large to inspect",
            Refusal::Unreadable(RewriteError::AmbiguousQuery) => "bad request",
            Refusal::Unreadable(RewriteError::TooLarge) => "request body too large to inspect",
            Refusal::Unreadable(_) => "request body cannot be inspected",
            Refusal::AuditUnavailable => "audit log unavailable",
            Refusal::UpstreamFailed(_) => "upstream unavailable",
            Refusal::UpstreamTimeout => "upstream timed out",
        }
    }

    /// The response: JSON `{"error", "feature", "reason"}`, or `{}` for a sink.
    pub fn response(&self, feature: Option<&str>) -> Response<OutBody> {
        let body = match self {
            Refusal::ConsentDenied(OnBlock::Sink) => "{}".to_string(),
            _ => serde_json::json!({"error": self.error(), "feature": feature, "reason": self.reason()}).to_string(),
        };
        let mut resp = Response::new(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        );
        *resp.status_mut() = self.status();
        let headers = resp.headers_mut();
        headers.insert(
            "x-consent-proxy",
            HeaderValue::from_static(self.decision().as_str()),
        );
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    }
}
