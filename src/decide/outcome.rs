//! What a decision is: the closed vocabulary of decisions ([`Decision`]) and reasons
//! ([`Reason`]), and why the proxy answers a request itself ([`Refusal`]). Each text the audit
//! log and the responses use is spelt here, once. Pure: no I/O types.

use std::fmt;

use http::StatusCode;
use serde::{Deserialize, Serialize};

use super::policy::OnBlock;
use crate::rewrite::RewriteError;

/// The closed vocabulary of decisions.
#[derive(Clone, Copy, Debug, Deserialize, Eq, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allowed,
    Stripped,
    Blocked,
    Tunneled,
    Denied,
    Error,
    WouldBlock,
    WouldStrip,
    PolicyLoaded,
    /// What became known about an earlier record (`of`): status, byte counts, a failure.
    Outcome,
    /// The log was repaired (a torn tail at start) or could not be written for a while.
    Recovered,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::Stripped => "stripped",
            Decision::Blocked => "blocked",
            Decision::Tunneled => "tunneled",
            Decision::Denied => "denied",
            Decision::Error => "error",
            Decision::WouldBlock => "would_block",
            Decision::WouldStrip => "would_strip",
            Decision::PolicyLoaded => "policy_loaded",
            Decision::Outcome => "outcome",
            Decision::Recovered => "recovered",
        }
    }
}

/// Why a request or connection was let through (a refusal says its own: [`Refusal::reason`]).
/// Borrowed from the plan it came with, so stating it costs only the record's text.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Reason<'a> {
    ConsentGranted,
    /// Report mode: the feature's consent is denied, and the request left all the same.
    ConsentDenied,
    /// The destination belongs to no feature (`unknown_hosts = "tunnel"`).
    NoFeature,
    /// Report mode: no rule of the feature reads this path while it withholds a category.
    UnknownPath,
    /// Report mode: the request carries what the pack does not know, under `unclassified =
    /// "block"`.
    Unclassified,
    /// The rules of these withheld categories changed the request (none: the feature's
    /// unconditional rules did).
    Withheld(&'a [&'a str]),
    /// A tunnel open when a new policy came into force, closed because the new policy would not
    /// tunnel its destination.
    TunnelClosed,
}

impl fmt::Display for Reason<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::ConsentGranted => f.write_str("consent granted"),
            Reason::ConsentDenied => f.write_str("consent denied"),
            Reason::NoFeature => f.write_str("destination belongs to no feature"),
            Reason::Unclassified => {
                f.write_str("carries what the pack does not know, and unclassified = block")
            }
            Reason::UnknownPath => f.write_str(
                "no rule of the feature reads this path, and it withholds categories (fail closed)",
            ),
            Reason::Withheld([]) => f.write_str("the feature's unconditional rules"),
            Reason::Withheld(categories) => {
                f.write_str("withheld: ")?;
                for (i, c) in categories.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    f.write_str(c)?;
                }
                Ok(())
            }
            Reason::TunnelClosed => {
                f.write_str("open tunnel closed: the new policy no longer tunnels this destination")
            }
        }
    }
}

/// A reason as the audit record states it.
impl From<Reason<'_>> for String {
    fn from(reason: Reason<'_>) -> String {
        reason.to_string()
    }
}

/// Why the proxy answers a request itself instead of forwarding it.
#[derive(Debug)]
pub enum Refusal {
    /// The client address is not in `[clients] allow`.
    ClientNotAllowed,
    /// The request is malformed or its names disagree.
    Malformed(&'static str),
    /// The destination is one of the proxy's own listeners.
    Loop,
    /// A name whose destination is the address of a feature it does not belong to (a name of
    /// no feature, or of another feature).
    FeatureAddress,
    /// The feature's consent is denied.
    ConsentDenied(OnBlock),
    /// The destination belongs to no feature and `unknown_hosts = "deny"`.
    UnknownHost,
    /// A path of a feature that withholds categories, and no rule of it reads the path.
    UnknownPath,
    /// The request carries these names the pack does not know, under `unclassified = "block"`.
    Unclassified(Vec<String>),
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
            Refusal::ClientNotAllowed
            | Refusal::UnknownHost
            | Refusal::UnknownPath
            | Refusal::Unclassified(_) => StatusCode::FORBIDDEN,
            Refusal::ConsentDenied(OnBlock::Reject) => StatusCode::FORBIDDEN,
            Refusal::ConsentDenied(OnBlock::Sink) => StatusCode::OK,
            Refusal::Malformed(_) | Refusal::Loop | Refusal::FeatureAddress => {
                StatusCode::BAD_REQUEST
            }
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
            Refusal::Loop => "the destination is one of the proxy's own listeners (a loop)".into(),
            Refusal::FeatureAddress => {
                "the destination is a feature host's address, and the name is not one of that \
                 feature's hosts"
                    .into()
            }
            Refusal::ConsentDenied(_) => Reason::ConsentDenied.to_string(),
            Refusal::UnknownHost => format!("{} and unknown_hosts = deny", Reason::NoFeature),
            Refusal::UnknownPath => Reason::UnknownPath.to_string(),
            Refusal::Unclassified(_) => Reason::Unclassified.to_string(),
            Refusal::BodyTooLarge => "body over max_body_bytes".into(),
            Refusal::Unreadable(e) => e.to_string(),
            Refusal::AuditUnavailable => "audit log cannot be written".into(),
            Refusal::UpstreamFailed(why) => why.clone(),
            Refusal::UpstreamTimeout => "upstream timed out".into(),
        }
    }

    /// The `error` member of the response body.
    pub fn error(&self) -> &'static str {
        match self {
            Refusal::ClientNotAllowed => "client not allowed",
            Refusal::Malformed(_) | Refusal::Loop | Refusal::FeatureAddress => "bad request",
            Refusal::ConsentDenied(_)
            | Refusal::UnknownHost
            | Refusal::UnknownPath
            | Refusal::Unclassified(_) => "blocked by consent policy",
            Refusal::BodyTooLarge => "request body too large to inspect",
            Refusal::Unreadable(RewriteError::AmbiguousQuery) => "bad request",
            Refusal::Unreadable(RewriteError::TooLarge) => "request body too large to inspect",
            Refusal::Unreadable(_) => "request body cannot be inspected",
            Refusal::AuditUnavailable => "audit log unavailable",
            Refusal::UpstreamFailed(_) => "upstream unavailable",
            Refusal::UpstreamTimeout => "upstream timed out",
        }
    }
}
