//! The proxy: the explicit listener (CONNECT and absolute-form plain HTTP), the access check,
//! tunnels, interception (TLS accept with a minted leaf, then HTTP/1.1 or h2 as the client
//! negotiated), and the per-request path: decide → rewrite → forward → audit.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HOST};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use ipnet::IpNet;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::audit::{AuditError, AuditLog, Decision, Entry};
use crate::ca::{CaError, CertificateAuthority, Origin};
use crate::config::{Config, Limits};
use crate::metrics::{ListenerLabels, Metrics, OutcomeLabels};
use crate::plan::{self, plan_request, RequestPlan};
use crate::policy::{normalize_host, ConnectVerdict, Mode, Policy, UnknownHosts};
use crate::response::Refusal;
use crate::rewrite::Message;
use crate::transparent::FeatureAddrs;
use crate::tunnel::{Activity, Ends};
use crate::upstream::{
    self, ConnectError, OutBody, Pinned, PinnedError, Upstream, UpstreamSetupError,
};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("interception CA")]
    Ca(#[from] CaError),
    #[error("upstream TLS")]
    Upstream(#[from] UpstreamSetupError),
    #[error("audit log")]
    Audit(#[from] AuditError),
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
    proxy: Arc<Proxy>,
}

impl Running {
    /// Stop accepting, let in-flight requests finish (up to `deadline`), record the stop.
    pub async fn shutdown(self, deadline: Duration) {
        let Running { proxy, .. } = self;
        proxy.token.cancel();
        proxy.tracker.close();
        let finished = tokio::time::timeout(deadline, proxy.tracker.wait())
            .await
            .is_ok();
        if !finished {
            warn!("shutdown deadline passed with connections still open; closing them");
            proxy.hard_stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), proxy.tracker.wait()).await;
        }
        let reason = if finished {
            "shutting down: every connection finished; no policy is in force from here"
        } else {
            "shutting down: connections still open at the deadline were closed; no policy is in force from here"
        };
        let active = proxy.current();
        let _ = proxy
            .audit
            .policy_loaded(
                reason.into(),
                active.policy_hash.to_string(),
                active.consent_hash.to_string(),
            )
            .await;
        // Every record is in the file once `write` returned: nothing is left to flush.
    }

    /// Leave a fleet cleanly (SIGTERM): `/readyz` fails at once, so the balancer's health check
    /// takes the replica out; new connections are still accepted for `drain_delay`; then
    /// [`Running::shutdown`] with `shutdown_timeout`.
    pub async fn drain(self) {
        self.proxy.draining.store(true, Ordering::Relaxed);
        tokio::time::sleep(self.proxy.limits.drain_delay).await;
        let deadline = self.proxy.limits.shutdown_timeout;
        self.shutdown(deadline).await;
    }
}

/// The policy in force with its hashes; replaced whole on reload.
pub struct Active {
    pub policy: Policy,
    pub policy_hash: Arc<str>,
    pub consent_hash: Arc<str>,
}

impl Active {
    fn new(policy: Policy, policy_hash: &str, consent_hash: &str) -> Arc<Active> {
        Arc::new(Active {
            policy,
            policy_hash: policy_hash.into(),
            consent_hash: consent_hash.into(),
        })
    }
}

/// Shared state of every connection.
pub(crate) struct Proxy {
    /// The policy in force: read once per decision; tunnels watch it to close on a change.
    active: watch::Sender<Arc<Active>>,
    clients: Vec<IpNet>,
    ca: CertificateAuthority,
    upstream: Upstream,
    audit: AuditLog,
    limits: Limits,
    /// Stop accepting and close connections once their requests are answered.
    token: CancellationToken,
    /// Close what is still open (tunnels) when the shutdown deadline passes.
    hard_stop: CancellationToken,
    tracker: TaskTracker,
    /// SIGTERM was received: `/readyz` fails while the listeners drain.
    draining: std::sync::atomic::AtomicBool,
    /// `[listen] proxy_protocol` and `[clients] balancers`.
    proxy_protocol: bool,
    balancers: Vec<IpNet>,
    /// Where the policy came from, to reload it.
    sources: crate::reload::Sources,
    metrics: Metrics,
    registry: prometheus_client::registry::Registry,
    /// The proxy's own listening addresses: a redirected connection to one of them is a loop.
    own: Vec<SocketAddr>,
    /// `[upstream] resolve`, also consulted for the addresses of feature hosts.
    resolve: std::collections::HashMap<String, SocketAddr>,
    /// Where feature hosts are served: a name of no feature going there is refused.
    feature_addrs: FeatureAddrs,
}

/// Which listener a connection came in on, and from where.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Peer {
    pub(crate) client: SocketAddr,
    pub(crate) listener: &'static str,
    /// Transparent mode: where the client was going (`SO_ORIGINAL_DST`).
    pub(crate) original_dst: Option<SocketAddr>,
}

/// Where a request goes.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) scheme: &'static str,
    pub(crate) host: String,
    pub(crate) port: u16,
    /// Transparent mode: the one upstream connection, to the original destination.
    pub(crate) pinned: Option<Arc<Pinned>>,
    /// A plain-HTTP request to the explicit listener, whose request line must be absolute-form;
    /// every other request (inside an intercepted connection) must be origin-form.
    pub(crate) absolute_form: bool,
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
    let ca = ca.with_metrics(metrics.leaf.clone());
    let upstream = Upstream::new(&config.upstream, provider, config.limits.connect_timeout)?;
    let audit = AuditLog::open(
        &config.audit,
        &config.node,
        config.policy_hash.clone(),
        config.consent_hash.clone(),
        metrics.audit_seq.clone(),
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
    let own: Vec<SocketAddr> = [Some(proxy_addr), admin_addr, transparent_addr]
        .into_iter()
        .flatten()
        .collect();
    audit
        .policy_loaded(
            format!("started with {}", config.source),
            config.policy_hash.clone(),
            config.consent_hash.clone(),
        )
        .await?;
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    let proxy = Arc::new(Proxy {
        active: watch::Sender::new(Active::new(
            config.policy,
            &config.policy_hash,
            &config.consent_hash,
        )),
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
        resolve: config.upstream.resolve.clone(),
        feature_addrs: FeatureAddrs::default(),
        token: token.clone(),
        hard_stop: CancellationToken::new(),
        tracker: tracker.clone(),
        draining: std::sync::atomic::AtomicBool::new(false),
        sources: crate::reload::Sources {
            policy_file: config.policy_file.clone(),
            mattermost_override: config.mattermost_override.clone(),
            mattermost: config.mattermost_config.clone(),
        },
    });
    tracker.spawn(crate::reload::watch(proxy.clone()));
    if let Some(l) = admin {
        tracker.spawn(crate::admin::serve(proxy.clone(), l));
    }
    if let Some(l) = transparent {
        tracker.spawn(crate::transparent::accept_loop(proxy.clone(), l));
    }
    tracker.spawn(accept_explicit(proxy.clone(), listener));
    Ok(Running {
        started: Started {
            proxy_addr,
            admin_addr,
            transparent_addr,
            ca_origin,
        },
        proxy,
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

/// Accept connections on `listener` until shutdown, at most `max_connections` at once, each
/// served by `serve` in a tracked task with its own span.
pub(crate) async fn accept_each<F, Fut>(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    name: &'static str,
    serve: F,
) where
    F: Fn(Arc<Proxy>, SocketAddr, TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(proxy.limits.max_connections));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = proxy.token.cancelled() => return,
        };
        let (tcp, client) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        proxy
            .metrics
            .connections
            .get_or_create(&ListenerLabels { listener: name })
            .inc();
        let span = tracing::info_span!("conn", client = %client, listener = name);
        let served = serve(proxy.clone(), client, tcp);
        proxy.tracker.spawn(
            async move {
                served.await;
                drop(permit);
            }
            .instrument(span),
        );
    }
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

async fn accept_explicit(proxy: Arc<Proxy>, listener: TcpListener) {
    accept_each(proxy, listener, "explicit", |p, from, tcp| async move {
        let peer = |client| Peer {
            client,
            listener: "explicit",
            original_dst: None,
        };
        if !p.proxy_protocol {
            return serve_explicit(p, peer(from), tcp).await;
        }
        let within = p.limits.header_read_timeout;
        match crate::balancer::accept(tcp, from, &p.balancers, within).await {
            Ok((client, io)) => serve_explicit(p, peer(client), io).await,
            Err(refused) => {
                info!(reason = %refused, "connection refused");
                p.record_blocked(peer(from), None, None, refused.to_string(), None)
                    .await;
            }
        }
    })
    .await
}

async fn serve_explicit<IO>(proxy: Arc<Proxy>, peer: Peer, tcp: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let p = proxy.clone();
    let service = service_fn(move |req| {
        let p = p.clone();
        async move { Ok::<_, Infallible>(p.explicit(peer, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(proxy.limits.header_read_timeout)
        .serve_connection(TokioIo::new(tcp), service)
        .with_upgrades();
    let result = until_cancelled(conn, &proxy.token, |c| c.graceful_shutdown()).await;
    if let Err(e) = result {
        debug!(error = %e, "client connection ended");
        proxy.record_malformed(peer, None, &e).await;
    }
}

impl Proxy {
    /// One request on the explicit listener: CONNECT, or an absolute-form plain-HTTP request.
    async fn explicit(self: &Arc<Self>, peer: Peer, req: Request<Incoming>) -> Response<OutBody> {
        if !self.client_allowed(peer.client) {
            let entry = self.entry(&self.current(), peer, None, req.method(), None);
            return self.refuse(entry, Refusal::ClientNotAllowed, None).await;
        }
        if req.method() == Method::CONNECT {
            return self.connect(peer, req).await;
        }
        match (req.uri().scheme_str(), req.uri().host()) {
            (Some("http"), Some(host)) => {
                let target = Target {
                    scheme: "http",
                    host: normalize_host(host),
                    port: req.uri().port_u16().unwrap_or(80),
                    pinned: None,
                    absolute_form: true,
                };
                if self.loops_back(&target).await {
                    let entry =
                        self.entry(&self.current(), peer, Some(&target), req.method(), None);
                    let (_, body) = req.into_parts();
                    return self
                        .refuse_draining(entry, body, Refusal::Malformed(LOOP), None)
                        .await;
                }
                self.request(peer, target, req).await
            }
            _ => {
                let entry = self.entry(&self.current(), peer, None, req.method(), None);
                let why = "not a proxy request (use CONNECT for https, absolute-form for http)";
                self.refuse(entry, Refusal::Malformed(why), None).await
            }
        }
    }

    async fn connect(self: &Arc<Self>, peer: Peer, req: Request<Incoming>) -> Response<OutBody> {
        let Some(target) = connect_target(req.uri()) else {
            let entry = self.entry(&self.current(), peer, None, req.method(), None);
            return self
                .refuse(
                    entry,
                    Refusal::Malformed("CONNECT target is not host:port"),
                    None,
                )
                .await;
        };
        let active = self.current();
        let entry = self.entry(&active, peer, Some(&target), req.method(), None);
        if self.loops_back(&target).await {
            return self.refuse(entry, Refusal::Malformed(LOOP), None).await;
        }
        match active.policy.connect(&target.host) {
            ConnectVerdict::Block { feature } => {
                self.refuse(
                    entry,
                    Refusal::ConsentDenied(feature.on_block),
                    Some(&feature.name),
                )
                .await
            }
            ConnectVerdict::Unknown(UnknownHosts::Deny) => {
                self.refuse(entry, Refusal::UnknownHost, None).await
            }
            ConnectVerdict::Unknown(UnknownHosts::Tunnel) => {
                self.tunnel(peer, entry, target, req).await
            }
            ConnectVerdict::Intercept => {
                let this = self.clone();
                let span = tracing::info_span!("intercept", host = %target.host);
                self.tracker.spawn(
                    async move {
                        match hyper::upgrade::on(req).await {
                            Ok(upgraded) => {
                                this.intercept(peer, target, TokioIo::new(upgraded)).await
                            }
                            Err(e) => debug!(error = %e, "CONNECT upgrade failed"),
                        }
                    }
                    .instrument(span),
                );
                empty(StatusCode::OK)
            }
        }
    }

    /// Open a blind tunnel: connect first (so a dead upstream is a 502), audit, then copy.
    async fn tunnel(
        self: &Arc<Self>,
        peer: Peer,
        mut entry: Entry,
        target: Target,
        req: Request<Incoming>,
    ) -> Response<OutBody> {
        // A name of no feature, or an IP literal, must not reach a feature host around the
        // policy: an IP literal is checked before connecting, a name once it has resolved.
        let policy = &self.current().policy;
        if let Some(dest) = destination(&target) {
            if let Some(feature) = self.feature_at(policy, dest).await {
                return self
                    .refuse(entry, Refusal::Malformed(FEATURE_ADDRESS), Some(&feature))
                    .await;
            }
        }
        let upstream = match self.upstream.dial(&target.host, target.port).await {
            Ok(tcp) => tcp,
            Err(e) => return self.refuse(entry, connect_refusal(&e), None).await,
        };
        if let Ok(dest) = upstream.peer_addr() {
            if let Some(feature) = self.feature_at(policy, dest).await {
                return self
                    .refuse(entry, Refusal::Malformed(FEATURE_ADDRESS), Some(&feature))
                    .await;
            }
        }
        entry.decision = Decision::Tunneled;
        entry.reason = "destination belongs to no feature".into();
        entry.status = Some(200);
        if self.record(&entry).await.is_err() {
            return Refusal::AuditUnavailable.response(None);
        }
        let this = self.clone();
        self.tracker.spawn(async move {
            let Ok(upgraded) = hyper::upgrade::on(req).await else {
                return;
            };
            let ends = match upgraded.downcast::<TokioIo<TcpStream>>() {
                Ok(parts) => {
                    // What the client sent after its CONNECT, read with it, goes first.
                    let mut upstream = upstream;
                    if upstream.write_all(&parts.read_buf).await.is_err() {
                        return;
                    }
                    Ends::Sockets(parts.io.into_inner(), upstream)
                }
                Err(upgraded) => Ends::Streams(TokioIo::new(upgraded), upstream),
            };
            this.relay(peer, target, ends).await;
        });
        empty(StatusCode::OK)
    }

    /// Move bytes both ways until either side closes, the proxy shuts down, or a new policy
    /// makes the destination a feature host (then the tunnel is closed and audited: a feature
    /// must not keep flowing around the policy over an old tunnel).
    pub(crate) async fn relay<IO>(&self, peer: Peer, target: Target, ends: Ends<IO>)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut policy = self.active.subscribe();
        let activity = Activity::default();
        let copy = ends.pump(&activity);
        tokio::pin!(copy);
        let idle = self.limits.tunnel_idle_timeout;
        let every = (idle / 4).max(Duration::from_millis(100));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let mut quiet = Duration::ZERO;
        loop {
            tokio::select! {
                r = &mut copy => {
                    if let Ok((up, down)) = r {
                        debug!(bytes_up = up, bytes_down = down, "tunnel closed");
                    }
                    return;
                }
                () = self.hard_stop.cancelled() => return,
                _ = tick.tick() => {
                    quiet = if activity.moved() { Duration::ZERO } else { quiet + every };
                    if quiet >= idle {
                        debug!("idle tunnel closed");
                        return;
                    }
                }
                changed = policy.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let active = policy.borrow_and_update().clone();
                    let verdict = active.policy.connect(&target.host);
                    if verdict != ConnectVerdict::Unknown(UnknownHosts::Tunnel) {
                        let mut entry = self.entry(&active, peer, Some(&target), &Method::CONNECT, None);
                        entry.decision = Decision::Blocked;
                        entry.reason = "open tunnel closed: the new policy no longer tunnels this destination".into();
                        entry.feature = active.policy.feature_for_host(&target.host).map(|f| f.name.clone());
                        let _ = self.record(&entry).await;
                        return;
                    }
                }
            }
        }
    }

    /// Terminate the client's TLS with a leaf for the CONNECT host, then decide each request.
    pub(crate) async fn intercept<IO>(self: Arc<Self>, peer: Peer, target: Target, io: IO)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
        let limit = self.limits.tls_handshake_timeout;
        let start = match handshake_step(tokio::time::timeout(limit, acceptor).await, "hello") {
            Ok(start) => start,
            Err(why) => return self.record_handshake(peer, &target, why).await,
        };
        if let Some(sni) = start.client_hello().server_name() {
            if normalize_host(sni) != target.host {
                let why = "TLS SNI does not match the CONNECT target".to_string();
                return self.record_handshake(peer, &target, why).await;
            }
        }
        let config = match self.ca.server_config(&target.host) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot mint a leaf");
                let mut entry =
                    self.entry(&self.current(), peer, Some(&target), &Method::CONNECT, None);
                entry.reason = format!("cannot mint a leaf: {e}");
                let _ = self.record(&entry).await;
                return;
            }
        };
        let handshake = tokio::time::timeout(limit, start.into_stream(config)).await;
        let tls = match handshake_step(handshake, "handshake") {
            Ok(tls) => tls,
            Err(why) => return self.record_handshake(peer, &target, why).await,
        };
        let this = self.clone();
        let for_service = target.clone();
        let service = service_fn(move |req| {
            let this = this.clone();
            let target = for_service.clone();
            async move { Ok::<_, Infallible>(this.request(peer, target, req).await) }
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout);
        builder.http2().timer(TokioTimer::new());
        let conn = builder.serve_connection(TokioIo::new(tls), service);
        let result = until_cancelled(conn, &self.token, |c| c.graceful_shutdown()).await;
        if let Err(e) = result {
            debug!(error = %e, "intercepted connection ended");
            if let Some(e) = e.downcast_ref::<hyper::Error>() {
                self.record_malformed(peer, Some(&target), e).await;
            }
        }
    }

    /// A request hyper could not parse was answered by hyper itself (400, or 431 for a head
    /// over the limit) before it reached us; it still gets its record. Other ways a connection
    /// ends (closed, timed out, reset) are not decisions.
    pub(crate) async fn record_malformed(
        &self,
        peer: Peer,
        target: Option<&Target>,
        e: &hyper::Error,
    ) {
        if !e.is_parse() && !e.is_parse_too_large() {
            return;
        }
        let status = if e.is_parse_too_large() { 431 } else { 400 };
        let reason = format!("malformed request: {e}");
        self.record_blocked(peer, target, None, reason, Some(status))
            .await;
    }

    /// A client's TLS handshake with the minted leaf did not complete, or named another host:
    /// recorded, since the client meant to reach a feature host (a client that does not trust
    /// the CA shows here).
    async fn record_handshake(&self, peer: Peer, target: &Target, why: String) {
        self.record_blocked(peer, Some(target), Some(&Method::CONNECT), why, None)
            .await;
    }

    /// Record a connection or request refused before any HTTP answer of ours (hyper answered,
    /// the handshake failed, the connection was closed): `blocked`. A request hyper answered
    /// (it has a `status`) passed no body; a connection's bytes are not known (`null`).
    pub(crate) async fn record_blocked(
        &self,
        peer: Peer,
        target: Option<&Target>,
        method: Option<&Method>,
        reason: String,
        status: Option<u16>,
    ) {
        let mut entry = self.entry(&self.current(), peer, target, &Method::CONNECT, None);
        entry.method = method.map(Method::to_string);
        entry.decision = Decision::Blocked;
        entry.reason = reason;
        if status.is_some() {
            entry.bytes_in = Some(0);
            entry.bytes_out = Some(0);
        }
        entry.status = status;
        let _ = self.record(&entry).await;
    }

    /// Decide one request to `target` and answer it: refuse, or rewrite and forward.
    pub(crate) async fn request(
        &self,
        peer: Peer,
        target: Target,
        req: Request<Incoming>,
    ) -> Response<OutBody> {
        let (parts, body) = req.into_parts();
        let active = self.current();
        let mut entry = self.entry(
            &active,
            peer,
            Some(&target),
            &parts.method,
            Some(parts.uri.path()),
        );
        if let Err(why) = strict_http1(&parts, &target).and_then(|()| names_agree(&parts, &target))
        {
            return self
                .refuse_draining(entry, body, Refusal::Malformed(why), None)
                .await;
        }
        // Nothing leaves unaudited: once a record could not be written, every request stops here.
        if !self.audit.is_healthy() {
            return self
                .refuse_draining(entry, body, Refusal::AuditUnavailable, None)
                .await;
        }
        let (feature, rules, withheld) =
            match plan_request(&active.policy, &target.host, parts.uri.path()) {
                RequestPlan::Refuse { refusal, feature } => {
                    let name = feature.map(|f| f.name.as_str());
                    return self.refuse_draining(entry, body, refusal, name).await;
                }
                RequestPlan::Forward {
                    decision,
                    reason,
                    feature,
                } => {
                    // A name of no feature must not reach a feature host's address.
                    if decision == Decision::Tunneled {
                        if let Some(dest) = destination(&target) {
                            if let Some(f) = self.feature_at(&active.policy, dest).await {
                                let refusal = Refusal::Malformed(FEATURE_ADDRESS);
                                return self.refuse_draining(entry, body, refusal, Some(&f)).await;
                            }
                        }
                    }
                    entry.feature = feature.map(|f| f.name.clone());
                    entry.decision = decision;
                    entry.reason = reason.into();
                    return self.forward(entry, &target, parts, streamed(body)).await;
                }
                RequestPlan::Rewrite {
                    feature,
                    rules,
                    withheld,
                } => (feature, rules, withheld),
            };
        entry.feature = Some(feature.name.clone());
        let reads_body = rules.iter().any(|r| r.reads_body());
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
        let mode = active.policy.mode;
        let mut parts = parts;
        // Report mode forwards the request as it came: only then is a copy of the headers kept.
        let original = (mode == Mode::Report).then(|| parts.headers.clone());
        let mut msg = Message {
            query: parts.uri.query().map(str::to_string),
            headers: std::mem::take(&mut parts.headers),
            body: raw.clone(),
        };
        let limit = self.limits.max_body_bytes;
        let outcome = match plan::rewrite(mode, &rules, &withheld, &mut msg, limit) {
            Ok(outcome) => outcome,
            Err(refusal) => return self.refuse(entry, refusal, Some(&feature.name)).await,
        };
        entry.decision = outcome.decision;
        entry.reason = outcome.reason;
        entry.removed = outcome.edits.removed;
        entry.replaced = outcome.edits.replaced;
        if !outcome.rewritten {
            parts.headers = original.unwrap_or(msg.headers);
            let out = body.map(without_trailers).unwrap_or_else(|| full(raw));
            return self.forward(entry, &target, parts, out).await;
        }
        parts.uri = with_query(&parts.uri, msg.query.as_deref());
        parts.headers = msg.headers;
        let out = body.map(without_trailers).unwrap_or_else(|| full(msg.body));
        self.forward(entry, &target, parts, out).await
    }

    /// Refuse a request whose body has not been read: read and count it first (see
    /// [`Proxy::drain`]).
    async fn refuse_draining(
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

    /// Send the request upstream; audit once the response head is in; stream the body back.
    async fn forward(
        &self,
        mut entry: Entry,
        target: &Target,
        parts: Parts,
        body: OutBody,
    ) -> Response<OutBody> {
        // What passed is counted as the upstream reads it: a streamed body is known only so.
        let sent_bytes = Arc::new(AtomicU64::new(0));
        let body = Counted::new(body, sent_bytes.clone()).boxed();
        let mut req = Request::new(body);
        *req.method_mut() = parts.method;
        *req.uri_mut() = upstream_uri(target, &parts.uri);
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = parts.headers;
        strip_hop_by_hop(req.headers_mut());
        req.headers_mut().remove(HOST);
        let sent = async {
            match &target.pinned {
                Some(pinned) => pinned.request(req).await.map_err(|e| match e {
                    PinnedError::Connect(c) => connect_refusal(&c),
                    PinnedError::Request(_) => {
                        Refusal::UpstreamFailed("upstream connection failed".into())
                    }
                }),
                None => {
                    self.upstream.request(req).await.map_err(|e| {
                        match upstream::connect_error(&e) {
                            Some(c) => connect_refusal(c),
                            None => Refusal::UpstreamFailed("upstream connection failed".into()),
                        }
                    })
                }
            }
        };
        let result = tokio::time::timeout(self.limits.upstream_timeout, sent).await;
        let passed = sent_bytes.load(Ordering::Relaxed);
        entry.bytes_out = Some(passed);
        entry.bytes_in.get_or_insert(passed);
        let resp = match result {
            Err(_) => return self.refuse(entry, Refusal::UpstreamTimeout, None).await,
            Ok(Err(refusal)) => {
                warn!(host = %target.host, reason = %refusal.reason(), "upstream request failed");
                return self.refuse(entry, refusal, None).await;
            }
            Ok(Ok(resp)) => resp,
        };
        entry.status = Some(resp.status().as_u16());
        if self.record(&entry).await.is_err() {
            return Refusal::AuditUnavailable.response(entry.feature.as_deref());
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.version = Version::HTTP_11;
        Response::from_parts(parts, body.map_err(Into::into).boxed())
    }

    /// Write an audit record and count the decision.
    pub(crate) async fn record(&self, entry: &Entry) -> Result<(), AuditError> {
        self.metrics.decision(entry);
        let written = self.audit.write(entry).await;
        match &written {
            Ok(()) => self.metrics.audit_records.inc(),
            Err(_) => self.metrics.audit_failures.inc(),
        };
        written
    }

    /// Audit a refusal and answer it.
    pub(crate) async fn refuse(
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
        entry.decision = refusal.decision();
        entry.reason = refusal.reason();
        entry.bytes_in.get_or_insert(0);
        entry.bytes_out.get_or_insert(0);
        entry.status = Some(refusal.status().as_u16());
        if entry.feature.is_none() {
            entry.feature = feature.map(str::to_string);
        }
        info!(decision = entry.decision.as_str(), reason = %entry.reason, "refused");
        if self.record(&entry).await.is_err() {
            return Refusal::AuditUnavailable.response(feature);
        }
        refusal.response(feature)
    }

    /// Load the policy again; on success put it in force and audit what changed, on failure
    /// keep the last good one and audit that. Returns the new config's Mattermost path.
    pub(crate) async fn reload(&self, trigger: &str) -> Option<std::path::PathBuf> {
        let loaded = crate::config::load(
            self.sources.policy_file.as_deref(),
            self.sources.mattermost_override.as_deref(),
        );
        let config = match loaded {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "reload failed; the last good policy stays in force");
                let reason =
                    format!("reload ({trigger}) failed, the last good policy stays in force: {e}");
                let _ = self.record(&Entry::new(Decision::Error, reason)).await;
                self.metrics
                    .reloads
                    .get_or_create(&OutcomeLabels {
                        outcome: "failed".into(),
                    })
                    .inc();
                return None;
            }
        };
        let mattermost = config.mattermost_config.clone();
        let old = self.current();
        if *old.policy_hash == *config.policy_hash && *old.consent_hash == *config.consent_hash {
            return mattermost;
        }
        let change = crate::reload::describe_change(&old.policy, &config.policy);
        let new = Active::new(config.policy, &config.policy_hash, &config.consent_hash);
        let reason = format!("reloaded ({trigger}): {change}");
        self.metrics
            .reloads
            .get_or_create(&OutcomeLabels {
                outcome: "ok".into(),
            })
            .inc();
        info!(%reason, "policy reloaded");
        let loaded = self
            .audit
            .policy_loaded(
                reason,
                new.policy_hash.to_string(),
                new.consent_hash.to_string(),
            )
            .await;
        match loaded {
            Ok(()) => self.metrics.audit_records.inc(),
            Err(_) => self.metrics.audit_failures.inc(),
        };
        self.active.send_replace(new);
        mattermost
    }

    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }

    pub(crate) fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub(crate) fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// The feature whose (exact) host is served at `dest`, whatever name a client gave.
    pub(crate) async fn feature_at(&self, policy: &Policy, dest: SocketAddr) -> Option<String> {
        self.feature_addrs
            .feature_at(policy, &self.resolve, dest)
            .await
    }

    /// Whether `addr` is one of the proxy's own listeners: the bound address itself, or, for a
    /// wildcard bind, any address of this host on that port.
    pub(crate) fn is_own_listener(&self, addr: SocketAddr) -> bool {
        let ip = canonical(addr.ip());
        self.own.iter().any(|own| {
            own.port() == addr.port()
                && (canonical(own.ip()) == ip || (own.ip().is_unspecified() && is_local(ip)))
        })
    }

    /// Whether a CONNECT or absolute-form target names one of the proxy's own listeners under
    /// any name or address (a loop that would cost a connection per hop). Only a target on one
    /// of the listening ports is looked up.
    async fn loops_back(&self, target: &Target) -> bool {
        if !self.own.iter().any(|own| own.port() == target.port) {
            return false;
        }
        let host = target.host.trim_start_matches('[').trim_end_matches(']');
        let addrs = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, target.port)],
            Err(_) => self
                .upstream
                .resolve(host, target.port)
                .await
                .unwrap_or_default(),
        };
        addrs.into_iter().any(|a| self.is_own_listener(a))
    }

    pub(crate) fn sources(&self) -> &crate::reload::Sources {
        &self.sources
    }

    /// The Prometheus text exposition of every metric.
    pub(crate) fn metrics_text(&self) -> String {
        crate::metrics::encode(&self.registry)
    }

    /// Why the proxy is not ready, if it is not: the audit log must be writable. (Listening,
    /// the CA and a policy are given once it runs.)
    pub(crate) fn not_ready(&self) -> Option<&'static str> {
        if self.draining.load(Ordering::Relaxed) {
            return Some("draining (shutting down)");
        }
        (!self.audit.is_healthy()).then_some("audit log cannot be written")
    }

    /// The newest audit record of this replica (`GET /audit/head`).
    pub(crate) fn audit_head(&self) -> crate::audit::Head {
        self.audit.head()
    }

    pub(crate) fn client_allowed(&self, addr: SocketAddr) -> bool {
        let ip = canonical(addr.ip());
        self.clients.iter().any(|net| net.contains(&ip))
    }

    pub(crate) fn current(&self) -> Arc<Active> {
        self.active.borrow().clone()
    }

    pub(crate) fn entry(
        &self,
        active: &Active,
        peer: Peer,
        target: Option<&Target>,
        method: &Method,
        path: Option<&str>,
    ) -> Entry {
        let mut e = Entry::new(Decision::Error, "");
        e.under = Some((active.policy_hash.clone(), active.consent_hash.clone()));
        e.client = Some(peer.client.to_string());
        e.original_dst = peer.original_dst.map(|a| a.to_string());
        e.listener = Some(peer.listener);
        e.method = Some(method.to_string());
        if let Some(t) = target {
            e.scheme = Some(t.scheme);
            e.host = Some(t.host.clone());
            e.port = Some(t.port);
        }
        e.path = path.map(str::to_string);
        e
    }
}

/// One step of a client's TLS handshake, bounded in time: the result, or why it failed.
fn handshake_step<T, E: std::fmt::Display>(
    result: Result<Result<T, E>, tokio::time::error::Elapsed>,
    step: &str,
) -> Result<T, String> {
    match result {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(e)) => Err(format!("client TLS {step} failed: {e}")),
        Err(_) => Err(format!("client TLS {step} timed out")),
    }
}

const LOOP: &str = "the destination is one of the proxy's own listeners (a loop)";

const FEATURE_ADDRESS: &str =
    "the name belongs to no feature, but the destination is a feature host's address";

/// Where a request to a host of no feature goes, when that is known before connecting: the
/// original destination in transparent mode, or an IP literal.
fn destination(target: &Target) -> Option<SocketAddr> {
    match &target.pinned {
        Some(pinned) => Some(pinned.addr()),
        None => target
            .host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, target.port)),
    }
}

/// Serve a connection until it ends; on shutdown, let it finish what is in flight.
pub(crate) async fn until_cancelled<C, E>(
    conn: C,
    token: &CancellationToken,
    graceful_shutdown: impl FnOnce(std::pin::Pin<&mut C>),
) -> Result<(), E>
where
    C: std::future::Future<Output = Result<(), E>>,
{
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        () = token.cancelled() => {
            graceful_shutdown(conn.as_mut());
            conn.await
        }
    }
}

/// The body length a request declares in `Content-Length`, if any.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn connect_refusal(e: &ConnectError) -> Refusal {
    match e {
        ConnectError::Timeout => Refusal::UpstreamTimeout,
        other => Refusal::UpstreamFailed(other.to_string()),
    }
}

/// `host:port` of a CONNECT, with a host that can be named in TLS.
fn connect_target(uri: &Uri) -> Option<Target> {
    let authority = uri.authority()?;
    if uri.scheme().is_some()
        || uri
            .path_and_query()
            .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
    {
        return None;
    }
    let port = authority.port_u16().filter(|p| *p != 0)?;
    let host = normalize_host(authority.host());
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || ServerName::try_from(bare.to_string()).is_err() {
        return None;
    }
    Some(Target {
        scheme: "https",
        host,
        port,
        pinned: None,
        absolute_form: false,
    })
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
    if target.absolute_form && !absolute_form {
        return Err("a plain-HTTP proxy request must have an absolute-form target");
    }
    if !target.absolute_form && !origin_form {
        return Err("request target is not origin-form");
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
        normalize_host(host) == target.host && port.unwrap_or(default_port) == target.port
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

fn with_query(uri: &Uri, query: Option<&str>) -> Uri {
    let path = uri.path();
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
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Headers for one hop only (RFC 9110 §7.6.1, and the proxy's own), never forwarded; typed, so
/// removing them parses no name.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Whether `ip` is an address of this host: loopback, unspecified, or on an interface.
fn is_local(ip: IpAddr) -> bool {
    if ip.is_loopback() || ip.is_unspecified() {
        return true;
    }
    let Ok(interfaces) = nix::ifaddrs::getifaddrs() else {
        return false;
    };
    interfaces
        .filter_map(|i| i.address)
        .any(|a| match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
            (Some(v4), _) => IpAddr::V4(v4.ip()) == ip,
            (_, Some(v6)) => canonical(IpAddr::V6(v6.ip())) == ip,
            _ => false,
        })
}

pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
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

fn empty(status: StatusCode) -> Response<OutBody> {
    let mut resp = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_targets() {
        for (uri, want) in [
            ("a.example:443", Some(("a.example", 443))),
            ("A.Example.:8443", Some(("a.example", 8443))),
            ("127.0.0.1:443", Some(("127.0.0.1", 443))),
            ("[::1]:443", Some(("[::1]", 443))),
            ("a.example", None),
            ("a.example:0", None),
            ("a.example:99999", None),
        ] {
            let got = uri
                .parse::<Uri>()
                .ok()
                .and_then(|u| connect_target(&u))
                .map(|t| (t.host, t.port));
            assert_eq!(got, want.map(|(h, p)| (h.to_string(), p)), "{uri}");
        }
    }

    #[test]
    fn names_must_agree_with_the_target() {
        let target = Target {
            scheme: "https",
            host: "push.example".into(),
            port: 443,
            pinned: None,
            absolute_form: false,
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
