//! consent-proxy: a TLS-terminating egress proxy that enforces telemetry consent on the wire.
//!
//! ```text
//! serve/ listener (explicit: CONNECT | transparent: SO_ORIGINAL_DST + SNI/Host)
//!    → decide/ admit (access check) → plan_connect (destination decision, pure)
//!    ├─ refuse    → serve/respond: response (or closed connection) + audit/
//!    ├─ tunnel    → audit/ (write-ahead) → serve/tunnel: bytes both ways (closed if a reload
//!    │              would refuse it) → audit/ outcome (bytes, how it ended)
//!    └─ intercept → serve/intercept: TLS accept with a minted leaf (ca) → for each request:
//!           decide/ plan_request (as in force now) → rewrite/ (pure)
//!           → serve/exchange: audit/ (write-ahead, hash chain) → upstream (verified TLS)
//!           → audit/ outcome (status, bytes) → response back
//! serve/reload: policy file / Mattermost config.json / SIGHUP → new policy in force + audit/
//! serve/admin:  /metrics, /healthz, /readyz, /audit/head
//! ```
//!
//! The folders are the phases: [`decide`] and [`rewrite`] are pure (data in, data out), `serve`
//! is the I/O edge that executes their plans, [`audit`] is the evidence. [`config`] turns the
//! policy file into the runtime types; `ca`, `upstream` and `metrics` stand alone; `explain`
//! prints the plans without a network. Arrows point from `serve` to the core, never back.
//!
//! Vocabulary:
//! - **client**: the application whose egress passes through the proxy (a Mattermost server).
//! - **upstream**: the server the client meant to reach.
//! - **feature**: a kind of traffic the admin consents to or not, known by its hosts and paths
//!   (`security_alerts`, `diagnostics`, `push_notifications`, or the admin's own).
//! - **category**: a kind of data (`activity_counts`, `user_names`, …) the admin may withhold.
//! - **rule**: what to remove, replace or keep when a category is withheld (or always), and on
//!   which bodies (`when` / `unless` a member holds a value).
//! - **known / unclassified**: what a feature's pack knows its requests carry (its rules'
//!   selectors and a `known` list), and what a request carried beyond that, named in the record.
//! - **selector**: where a rule points: `query:`, `header:`, `form:`, `json:` (RFC 9535).
//! - **decision**: what happened to a request or connection; one audit record each.
//!
//! # Running it in front of fake upstreams
//!
//! Integration tests load a policy ([`load_str`] or [`load`]), [`start`] the proxy, point
//! clients at [`Started::proxy_addr`], read what was decided back with [`audit::read`], and
//! [`Running::shutdown`]:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let policy = r#"
//! [listen]
//! proxy = "127.0.0.1:0"
//! [tls]
//! ca_cert = "ca.pem"
//! ca_key = "ca.key"
//! [audit]
//! path = "audit.jsonl"
//! "#;
//! let config = consent_proxy::load_str("test.toml", policy, dir.path())?;
//! let running = consent_proxy::start(config).await?;
//! assert_ne!(running.started.proxy_addr.port(), 0);
//! running.shutdown(std::time::Duration::from_secs(1)).await;
//!
//! let records = consent_proxy::audit::read(&dir.path().join("audit.jsonl"))?;
//! assert_eq!(records[0].decision, consent_proxy::decide::Decision::PolicyLoaded);
//! assert!(records[0].reason.starts_with("started with"));
//! # Ok(())
//! # }
//! ```

pub mod audit;
mod ca;
pub mod cli;
pub mod config;
pub mod decide;
mod explain;
mod metrics;
pub mod rewrite;
mod serve;
mod upstream;

pub use config::{load, load_str, Config, ConfigError};
pub use serve::{start, Running, StartError, Started};
