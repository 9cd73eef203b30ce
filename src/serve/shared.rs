//! The state every connection shares ([`Shared`]: the policy in force, the CA, the upstream
//! client, the audit log, limits, shutdown), and the words a listener passes on: [`Peer`] (where
//! a connection came from) and [`Target`] (where a request goes). It imports no listener:
//! listeners depend on it, never the reverse.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ipnet::IpNet;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::active::Active;
use super::addrs::{AddressGate, Listening};
use super::workers::Workers;
use crate::audit::AuditLog;
use crate::ca::CertificateAuthority;
use crate::config::Limits;
use crate::metrics::Metrics;
use crate::upstream::{Pinned, Upstream};

/// The files a running policy came from, to load it again.
#[derive(Clone, Debug)]
pub(super) struct Sources {
    pub(super) policy_file: Option<PathBuf>,
    pub(super) mattermost_override: Option<PathBuf>,
    /// The Mattermost config in use now (it may change with the policy file).
    pub(super) mattermost: Option<PathBuf>,
}

/// Shared state of every connection. Its fields are the listeners' to read; only `start` builds
/// it and only `reload` replaces the policy in force.
pub(super) struct Shared {
    /// The policy in force: read once per decision; tunnels watch it to close on a change.
    pub(super) active: watch::Sender<Arc<Active>>,
    /// `[clients] allow`.
    pub(super) clients: Vec<IpNet>,
    pub(super) ca: CertificateAuthority,
    pub(super) upstream: Upstream,
    pub(super) audit: AuditLog,
    pub(super) limits: Limits,
    /// Stop accepting and close connections once their requests are answered.
    pub(super) token: CancellationToken,
    /// Close what is still open (tunnels) when the shutdown deadline passes.
    pub(super) hard_stop: CancellationToken,
    pub(super) tracker: TaskTracker,
    /// The threads connections are served on.
    pub(super) workers: Workers,
    /// SIGTERM was received: `/readyz` fails while the listeners drain.
    pub(super) draining: AtomicBool,
    /// `[listen] proxy_protocol` and `[clients] balancers`.
    pub(super) proxy_protocol: bool,
    pub(super) balancers: Vec<IpNet>,
    /// Where the policy came from, to reload it.
    pub(super) sources: Sources,
    pub(super) metrics: Metrics,
    pub(super) registry: prometheus_client::registry::Registry,
    /// The proxy's own listening addresses: a connection to one of them is a loop.
    pub(super) own: Listening,
    /// Where feature hosts are served: a name going to another feature's address is refused.
    /// The upstream dialer holds it too.
    pub(super) gate: Arc<AddressGate>,
}

/// Which listener a connection came in on, and from where.
#[derive(Clone, Copy, Debug)]
pub(super) struct Peer {
    pub(super) client: SocketAddr,
    pub(super) listener: &'static str,
    /// Transparent mode: where the client was going (`SO_ORIGINAL_DST`).
    pub(super) original_dst: Option<SocketAddr>,
}

/// The form a request's target must have on the connection it came on (RFC 9112 §3.2).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(super) enum TargetForm {
    /// Inside an intercepted connection, or plain HTTP redirected transparently: `/path`.
    Origin,
    /// A plain-HTTP request to the explicit listener: `http://host/path`.
    Absolute,
}

/// Where a request goes.
#[derive(Clone)]
pub(super) struct Target {
    pub(super) scheme: &'static str,
    pub(super) host: String,
    pub(super) port: u16,
    /// Transparent mode: the one upstream connection, to the original destination.
    pub(super) pinned: Option<Arc<Pinned>>,
    pub(super) form: TargetForm,
}

impl Shared {
    /// The policy in force now.
    pub(super) fn current(&self) -> Arc<Active> {
        self.active.borrow().clone()
    }

    /// `Err(feature)`: `addr` serves `feature`, and the name `host` is not one of its hosts
    /// (see [`AddressGate`]).
    pub(super) async fn admit_address(
        &self,
        host: Option<&str>,
        addr: SocketAddr,
    ) -> Result<(), String> {
        self.gate.admit(host, addr).await
    }

    /// `Err(feature)`: a name of no feature resolves to `feature`'s address. The dialer checks
    /// this for every connection it makes; asked before a request's record is written, a
    /// refusal stays one record (else it is the `outcome` of a forward). A name that does not
    /// resolve here is left to the dialer.
    pub(super) async fn admit_name(&self, target: &Target) -> Result<(), String> {
        for addr in self.addresses(target).await {
            self.gate.admit(Some(&target.host), addr).await?;
        }
        Ok(())
    }

    /// Whether a CONNECT or absolute-form target names one of the proxy's own listeners under
    /// any name or address (a loop that would cost a connection per hop). Only a target on one
    /// of the listening ports is looked up.
    pub(super) async fn loops_back(&self, target: &Target) -> bool {
        if !self.own.on_port(target.port) {
            return false;
        }
        let addrs = self.addresses(target).await;
        addrs.into_iter().any(|a| self.own.includes(a))
    }

    /// The addresses a target names: its IP literal, or what its name resolves to (none when
    /// it does not resolve).
    async fn addresses(&self, target: &Target) -> Vec<SocketAddr> {
        let host = target.host.trim_start_matches('[').trim_end_matches(']');
        match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, target.port)],
            Err(_) => self
                .upstream
                .resolve(host, target.port)
                .await
                .unwrap_or_default(),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub(super) fn metrics_text(&self) -> String {
        self.metrics
            .ready
            .set(i64::from(self.not_ready().is_none()));
        crate::metrics::encode(&self.registry)
    }

    /// Why the proxy is not ready, if it is not: the audit log must be writable. (Listening,
    /// the CA and a policy are given once it runs.)
    pub(super) fn not_ready(&self) -> Option<&'static str> {
        if self.draining.load(Ordering::Relaxed) {
            return Some("draining (shutting down)");
        }
        (!self.audit.is_healthy()).then_some("audit log cannot be written")
    }
}
