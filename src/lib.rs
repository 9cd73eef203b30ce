//! consent-proxy: a TLS-terminating egress proxy that enforces telemetry consent on the wire.
//!
//! ```text
//! listener (explicit: CONNECT | transparent: SO_ORIGINAL_DST + SNI/Host)
//!    → access check → destination decision (policy, pure)
//!    ├─ blocked   → response (or closed connection) + audit
//!    ├─ tunnel    → copy bytes both ways + audit (closed if a reload makes it a feature host)
//!    └─ intercept → TLS accept with a minted leaf (ca) → for each request:
//!           decide (policy, as in force now) → rewrite (pure) → upstream (verified TLS)
//!           → audit (hash chain) → response streamed back
//! reload: policy file / Mattermost config.json / SIGHUP → new policy in force + audit
//! admin:  /metrics, /healthz, /readyz
//! ```
//!
//! Vocabulary:
//! - **client**: the application whose egress passes through the proxy (a Mattermost server).
//! - **upstream**: the server the client meant to reach.
//! - **feature**: a kind of traffic the admin consents to or not, known by its hosts and paths
//!   (`security_alerts`, `diagnostics`, `push_notifications`, or the admin's own).
//! - **category**: a kind of data (`activity_counts`, `user_names`, …) the admin may withhold.
//! - **rule**: what to remove, replace or keep when a category is withheld (or always).
//! - **selector**: where a rule points: `query:`, `header:`, `form:`, `json:` (RFC 9535).
//! - **decision**: what happened to a request or connection; one audit record each.

pub mod admin;
pub mod audit;
pub mod balancer;
pub mod ca;
pub mod cli;
pub mod codec;
pub mod config;
pub mod explain;
pub mod fold;
pub mod mattermost;
pub mod metrics;
pub mod plan;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod response;
pub mod rewind;
pub mod rewrite;
mod spans;
pub mod transparent;
mod tunnel;
pub mod upstream;
