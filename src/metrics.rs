//! Prometheus metrics (prometheus-client): decisions by listener, feature and decision, client
//! connections, client TLS handshakes, request latency, readiness, what the pack does not know,
//! body bytes, upstream errors, leaf-certificate cache, audit writes, reloads.
//! Labels hold names from the policy only, never request data.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::audit::{AuditMetrics, Entry};

#[derive(Clone, Debug, EncodeLabelSet, Eq, Hash, PartialEq)]
pub struct DecisionLabels {
    pub listener: &'static str,
    pub feature: String,
    pub decision: &'static str,
}

#[derive(Clone, Debug, EncodeLabelSet, Eq, Hash, PartialEq)]
pub struct NodeLabels {
    /// `[audit] node`: the name the replica's audit records carry.
    pub node: String,
}

#[derive(Clone, Debug, EncodeLabelSet, Eq, Hash, PartialEq)]
pub struct FeatureLabels {
    pub feature: String,
}

#[derive(Clone, Debug, EncodeLabelSet, Eq, Hash, PartialEq)]
pub struct ListenerLabels {
    pub listener: &'static str,
}

#[derive(Clone, Debug, EncodeLabelSet, Eq, Hash, PartialEq)]
pub struct DirectionLabels {
    /// `in`: from clients; `out`: to upstreams.
    pub direction: &'static str,
}

#[derive(Clone, Debug, EncodeLabelSet, Eq, Hash, PartialEq)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, EncodeLabelSet, Eq, Hash, PartialEq)]
pub struct HandshakeLabels {
    /// `ok`, `failed` (the client's TLS handshake went wrong) or `timeout`.
    pub outcome: &'static str,
}

/// Leaf-certificate cache counters, owned by the CA.
#[derive(Clone, Debug, Default)]
pub struct LeafMetrics {
    pub hits: Counter,
    pub misses: Counter,
    pub size: Gauge,
    /// Leaves that could not be minted (the connection is refused).
    pub mint_failures: Counter,
}

/// Seconds from a request's head to the response head given back (the upstream's, or the
/// proxy's own answer): 0.5 ms to about 8 s.
#[derive(Clone, Debug)]
pub struct Durations(pub Histogram);

impl Default for Durations {
    fn default() -> Self {
        Durations(Histogram::new(exponential_buckets(0.0005, 2.0, 15)))
    }
}

/// Every metric the proxy exports; cheap to clone (each handle is shared).
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub decisions: Family<DecisionLabels, Counter>,
    /// Names of what the pack does not know, as requests carried them, by feature.
    pub unclassified: Family<FeatureLabels, Counter>,
    pub connections: Family<ListenerLabels, Counter>,
    /// Client TLS handshakes on intercepted connections, by outcome.
    pub tls_handshakes: Family<HandshakeLabels, Counter>,
    pub request_duration: Durations,
    /// 1 while `/readyz` says ready, 0 otherwise (set when scraped).
    pub ready: Gauge,
    /// 1, labelled with the replica's audit node name: joins a scrape target to its log.
    pub node: Family<NodeLabels, Gauge>,
    pub body_bytes: Family<DirectionLabels, Counter>,
    pub upstream_errors: Counter,
    pub leaf: LeafMetrics,
    /// The audit writer's own: records, failures, unrecorded decisions, syncs, the head's seq.
    pub audit: AuditMetrics,
    pub reloads: Family<OutcomeLabels, Counter>,
}

impl Metrics {
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("consent_proxy");
        r.register(
            "decisions",
            "Decisions (one per audit record) by listener, feature and decision",
            self.decisions.clone(),
        );
        r.register(
            "unclassified",
            "Names a request carried that the pack does not know (the records' unclassified), by feature",
            self.unclassified.clone(),
        );
        r.register(
            "connections",
            "Client connections accepted, by listener",
            self.connections.clone(),
        );
        r.register(
            "tls_handshakes",
            "Client TLS handshakes on intercepted connections, by outcome (ok, failed, timeout)",
            self.tls_handshakes.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Seconds from a request's head to the response head given back (the upstream's or the proxy's own)",
            self.request_duration.0.clone(),
        );
        r.register(
            "ready",
            "1 while the proxy is ready (/readyz 200), 0 while not (draining, audit log unwritable)",
            self.ready.clone(),
        );
        r.register(
            "node_info",
            "1, labelled with the audit node name this replica writes in its records",
            self.node.clone(),
        );
        r.register(
            "leaf_mint_failures",
            "Leaf certificates that could not be minted (the client's connection is refused)",
            self.leaf.mint_failures.clone(),
        );
        r.register(
            "body_bytes",
            "Request body bytes seen from clients (in) and sent upstream (out)",
            self.body_bytes.clone(),
        );
        r.register(
            "upstream_errors",
            "Upstream connections or requests that failed or timed out",
            self.upstream_errors.clone(),
        );
        r.register(
            "audit_seq",
            "Sequence number of the newest audit record (a witness of the chain's length)",
            self.audit.seq.clone(),
        );
        r.register(
            "leaf_cache_hits",
            "Leaf certificates served from the cache",
            self.leaf.hits.clone(),
        );
        r.register(
            "leaf_cache_misses",
            "Leaf certificates minted",
            self.leaf.misses.clone(),
        );
        r.register(
            "leaf_cache_size",
            "Leaf certificates in the cache",
            self.leaf.size.clone(),
        );
        r.register(
            "audit_records",
            "Audit records written (outcomes and the proxy's own included)",
            self.audit.records.clone(),
        );
        r.register(
            "audit_write_failures",
            "Audit log writes or syncs that failed",
            self.audit.write_failures.clone(),
        );
        r.register(
            "audit_unrecorded_decisions",
            "Decisions refused because their audit record could not be written",
            self.audit.unrecorded.clone(),
        );
        r.register(
            "audit_syncs",
            "fdatasync calls on the audit log ([audit] sync = \"data\")",
            self.audit.syncs.clone(),
        );
        r.register(
            "policy_reloads",
            "Policy reloads by outcome (ok, failed)",
            self.reloads.clone(),
        );
        r
    }

    /// Count one decision as it is audited.
    pub fn decision(&self, entry: &Entry) {
        let labels = DecisionLabels {
            listener: entry.listener.unwrap_or("-"),
            feature: entry.feature.clone().unwrap_or_else(|| "-".into()),
            decision: entry.decision.as_str(),
        };
        self.decisions.get_or_create(&labels).inc();
        if !entry.unclassified.is_empty() {
            let feature = labels.feature;
            self.unclassified
                .get_or_create(&FeatureLabels { feature })
                .inc_by(entry.unclassified.len() as u64);
        }
    }

    /// Count body bytes once they are known (a refusal's record, a forward's outcome).
    pub fn bytes(&self, bytes_in: Option<u64>, bytes_out: Option<u64>) {
        for (direction, bytes) in [("in", bytes_in), ("out", bytes_out)] {
            if let Some(n) = bytes {
                self.body_bytes
                    .get_or_create(&DirectionLabels { direction })
                    .inc_by(n);
            }
        }
    }
}

/// The Prometheus text exposition of a registry.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}
