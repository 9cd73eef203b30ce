//! Serving, the I/O edge: [`start`] binds the listeners and builds the [`Shared`] state, then
//! each listener executes the plans of `decide` on real connections.
//!
//! The rooms, in the order a connection meets them: [`accept`] (the accept loop), the listeners
//! [`explicit`] (CONNECT, absolute-form HTTP; with [`balancer`] for PROXY headers) and
//! [`transparent`] (REDIRECT: SNI or Host, with [`rewind`] to replay what was sniffed), then
//! [`intercept`] (TLS with a minted leaf), [`exchange`] (one request: plan, rewrite, upstream)
//! or [`tunnel`] (bytes both ways); [`respond`] is the one place decisions become records and
//! responses; [`addrs`] knows where feature hosts and our own listeners are; [`reload`] puts a
//! new policy in force; [`admin`] serves metrics and health. Listeners depend on [`shared`] and
//! on the pure core, never on each other or back on this module.

mod accept;
mod active;
mod addrs;
mod admin;
mod balancer;
mod exchange;
mod explicit;
mod h2_resets;
mod intercept;
mod reload;
mod respond;
mod rewind;
mod shared;
mod transparent;
mod tunnel;
mod workers;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::audit::{AuditError, AuditLog};
use crate::ca::{CaError, CertificateAuthority, Origin};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::upstream::{Upstream, UpstreamSetupError};
use active::Active;
use addrs::{AddressGate, Listening};
use shared::{Shared, Sources};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("interception CA")]
    Ca(#[from] CaError),
    #[error("upstream TLS")]
    Upstream(#[from] UpstreamSetupError),
    #[error("audit log")]
    Audit(#[from] AuditError),
    #[error("cannot start the worker threads")]
    Workers(#[source] std::io::Error),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What a started proxy tells its operator.
#[derive(Debug)]
pub struct Started {
    pub proxy_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub transparent_addr: Option<SocketAddr>,
    pub ca_origin: Origin,
}

/// A running proxy; [`Running::shutdown`] drains it and flushes the audit log.
pub struct Running {
    pub started: Started,
    shared: Arc<Shared>,
    /// Writes queued outcomes within [`crate::audit::FLUSH_EVERY`] and probes a log that
    /// cannot be written; stopped after the final record.
    audit_keeper: (CancellationToken, tokio::task::JoinHandle<()>),
}

impl Running {
    /// Stop accepting, let in-flight requests finish (up to `deadline`), record the stop.
    pub async fn shutdown(self, deadline: Duration) {
        let Running {
            shared,
            audit_keeper: (stop_keeper, keeper),
            ..
        } = self;
        shared.token.cancel();
        shared.tracker.close();
        let finished = tokio::time::timeout(deadline, shared.tracker.wait())
            .await
            .is_ok();
        if !finished {
            warn!("shutdown deadline passed with connections still open; closing them");
            shared.hard_stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), shared.tracker.wait()).await;
        }
        let reason = if finished {
            "shutting down: every connection finished; no policy is in force from here"
        } else {
            "shutting down: connections still open at the deadline were closed; no policy is in force from here"
        };
        // The final record: after every outcome (those still queued go out in its write).
        let active = shared.current();
        let _ = shared
            .audit
            .policy_loaded(
                reason.into(),
                active.policy_hash.to_string(),
                active.consent_hash.to_string(),
            )
            .await;
        stop_keeper.cancel();
        let _ = keeper.await;
    }

    /// Write the `outcome` records queued now rather than with the next record (or within
    /// [`crate::audit::FLUSH_EVERY`]): for a reader that needs them at once.
    pub fn flush_audit(&self) -> Result<(), AuditError> {
        self.shared.audit.flush()
    }

    /// Leave a fleet cleanly (SIGTERM): `/readyz` fails at once, so the balancer's health check
    /// takes the replica out; new connections are still accepted for `drain_delay`; then
    /// [`Running::shutdown`] with `shutdown_timeout`.
    pub async fn drain(self) {
        self.shared.draining.store(true, Ordering::Relaxed);
        tokio::time::sleep(self.shared.limits.drain_delay).await;
        let deadline = self.shared.limits.shutdown_timeout;
        self.shutdown(deadline).await;
    }
}

/// Start the proxy from a checked config: CA, upstream TLS, audit log, listener.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let provider = Arc::new(tls_provider());
    let (ca, ca_origin) = CertificateAuthority::load_or_create(
        &config.ca_cert,
        &config.ca_key,
        provider.clone(),
        config.limits.leaf_cache_size,
    )?;
    let metrics = Metrics::default();
    let node = crate::metrics::NodeLabels {
        node: config.node.clone(),
    };
    metrics.node.get_or_create(&node).set(1);
    let ca = ca.with_metrics(metrics.leaf.clone());
    let consent = reload::describe_consent(&config.policy);
    let active = watch::Sender::new(Active::new(
        config.policy,
        &config.policy_hash,
        &config.consent_hash,
    ));
    let gate = Arc::new(AddressGate::new(
        active.subscribe(),
        config.upstream.resolve.clone(),
    ));
    let workers = workers::Workers::start().map_err(StartError::Workers)?;
    let upstream = Upstream::new(
        &config.upstream,
        provider,
        config.limits.connect_timeout,
        gate.clone(),
        workers.len(),
    )?;
    let audit = AuditLog::open(
        &config.audit,
        config.audit_sync,
        &config.node,
        config.policy_hash.clone(),
        config.consent_hash.clone(),
        metrics.audit.clone(),
    )?;
    let listener = TcpListener::bind(config.listen.proxy)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.listen.proxy,
            source,
        })?;
    let proxy_addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen.proxy,
        source,
    })?;
    let (admin, admin_addr) = bind_optional(config.listen.admin).await?;
    let (transparent, transparent_addr) = bind_optional(config.listen.transparent).await?;
    let own = Listening(
        [Some(proxy_addr), admin_addr, transparent_addr]
            .into_iter()
            .flatten()
            .collect(),
    );
    audit
        .policy_loaded(
            format!("started with {}: {consent}", config.source),
            config.policy_hash.clone(),
            config.consent_hash.clone(),
        )
        .await?;
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    let shared = Arc::new(Shared {
        active,
        clients: config.clients,
        proxy_protocol: config.listen.proxy_protocol,
        balancers: config.balancers,
        ca,
        upstream,
        audit,
        limits: config.limits,
        registry: metrics.registry(),
        metrics,
        own,
        gate,
        token: token.clone(),
        hard_stop: CancellationToken::new(),
        tracker: tracker.clone(),
        workers,
        draining: AtomicBool::new(false),
        sources: Sources {
            policy_file: config.policy_file.clone(),
            mattermost_override: config.mattermost_override.clone(),
            mattermost: config.mattermost_config.clone(),
        },
    });
    let stop_keeper = CancellationToken::new();
    let keeper = tokio::spawn(shared.audit.clone().keep(stop_keeper.clone()));
    tracker.spawn(reload::watch(shared.clone(), config.loaded));
    if let Some(l) = admin {
        tracker.spawn(admin::serve(shared.clone(), l));
    }
    if let Some(l) = transparent {
        tracker.spawn(transparent::accept(shared.clone(), l));
    }
    tracker.spawn(explicit::accept(shared.clone(), listener));
    Ok(Running {
        started: Started {
            proxy_addr,
            admin_addr,
            transparent_addr,
            ca_origin,
        },
        shared,
        audit_keeper: (stop_keeper, keeper),
    })
}

/// aws-lc-rs with the SHA-256 suites first (rustls lists AES-256-GCM-SHA384 first): a TLS 1.3
/// handshake runs a dozen HKDF steps, and SHA-256 has CPU instructions where SHA-384 often has
/// none (measured: SHA-512 blocks were a tenth of a new connection's CPU). Both ends of the proxy
/// use it; towards clients the proxy's order wins ([`crate::ca`] sets `ignore_client_order`).
fn tls_provider() -> rustls::crypto::CryptoProvider {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites.sort_by_key(|s| {
        use rustls::CipherSuite as C;
        !matches!(
            s.suite(),
            C::TLS13_AES_128_GCM_SHA256
                | C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    provider
}

/// Bind a listener that the policy may leave out; returns it with its bound address.
async fn bind_optional(
    addr: Option<SocketAddr>,
) -> Result<(Option<TcpListener>, Option<SocketAddr>), StartError> {
    let Some(addr) = addr else {
        return Ok((None, None));
    };
    let bind_err = |source| StartError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
    let bound = listener.local_addr().map_err(bind_err)?;
    Ok((Some(listener), Some(bound)))
}
