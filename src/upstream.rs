//! The upstream side: verified TLS (webpki or system roots plus `extra_ca`; there is no switch to
//! turn verification off), `[upstream] resolve` overrides, a pooled HTTP client that speaks h2
//! or HTTP/1.1 as the upstream negotiates, and plain TCP connections for tunnels.
//!
//! Idle connections are kept only for hosts asked for before, among the last [`POOLED_HOSTS`]
//! hosts: a host seen once (a flood of new names, each asked for once) gets a connection that
//! closes after its response, so memory does not grow with every new name.
//!
//! Each worker thread has pools of its own ([`use_pool`]): a pooled connection is then served
//! by the thread whose requests use it.

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::combinators::BoxBody;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use lru::LruCache;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::{Roots, UpstreamSettings};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type sent upstream: streamed from the client, or rewritten in memory.
pub type OutBody = BoxBody<Bytes, BoxError>;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    #[error("cannot read extra CA file {path}")]
    ReadCa {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("extra CA file {path} holds no usable PEM certificate")]
    BadCa { path: PathBuf },
    #[error("no trusted roots: the system store is empty and no extra_ca is given")]
    NoRoots,
    #[error("cannot build the upstream TLS config")]
    Tls(#[source] rustls::Error),
}

/// Why an upstream could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("upstream address could not be resolved")]
    Resolve(#[source] io::Error),
    #[error("upstream refused or unreachable")]
    Tcp(#[source] io::Error),
    #[error("upstream certificate or TLS handshake rejected")]
    Tls(#[source] io::Error),
    #[error("upstream connect timed out")]
    Timeout,
    #[error("{0:?} is not a valid TLS server name")]
    Name(String),
    /// The name resolved to an address that serves this feature, which the name does not
    /// belong to ([`AddressCheck`]).
    #[error("the destination is an address of a {0} host, and the name is not one")]
    FeatureAddress(String),
}

/// Asked after a name has resolved and before anything is sent to the address: may `host` be
/// reached at `addr`? Every connection the proxy makes upstream passes it (pooled, tunnelled),
/// so a name cannot walk around the policy by resolving somewhere else.
pub trait AddressCheck: Send + Sync + 'static {
    fn check<'a>(
        &'a self,
        host: &'a str,
        addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = Result<(), ConnectError>> + Send + 'a>>;
}

/// Hosts (`host:port`) remembered for pooling: a host asked for again while among these keeps
/// idle connections (for 90 s); a host not among them gets a connection closed after use.
pub const POOLED_HOSTS: usize = 1024;

thread_local! {
    /// Which of an [`Upstream`]'s pools this thread's requests use: 0 is the one threads that
    /// are no worker share, worker `i` uses `i + 1`.
    static POOL: Cell<usize> = const { Cell::new(0) };
}

/// From now on, requests made on this thread use worker `worker`'s pool of every [`Upstream`]
/// (wrapping around past its last); threads that never call this share one pool.
pub fn use_pool(worker: usize) {
    POOL.with(|p| p.set(worker + 1));
}

/// Pooled, verified connections to upstreams.
#[derive(Clone)]
pub struct Upstream {
    /// One pool a worker thread ([`use_pool`]), after the one for the others.
    pools: Arc<[Pool]>,
    seen: Arc<Mutex<LruCache<String, ()>>>,
    dialer: Dialer,
    tls: TlsConnector,
}

/// A client keeping idle connections, and one keeping none: for hosts not asked for before.
struct Pool {
    client: Client<Connector, OutBody>,
    once: Client<Connector, OutBody>,
}

impl Pool {
    fn new(connector: &Connector) -> Pool {
        Pool {
            client: Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .build(connector.clone()),
            once: Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_max_idle_per_host(0)
                .build(connector.clone()),
        }
    }
}

impl Upstream {
    /// `workers`: how many threads take a pool of their own ([`use_pool`]).
    pub fn new(
        settings: &UpstreamSettings,
        provider: Arc<CryptoProvider>,
        connect_timeout: Duration,
        check: Arc<dyn AddressCheck>,
        workers: usize,
    ) -> Result<Self, UpstreamSetupError> {
        let mut roots = RootCertStore::empty();
        match settings.roots {
            Roots::Webpki => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            Roots::System => {
                let found = rustls_native_certs::load_native_certs();
                for cert in found.certs {
                    let _ = roots.add(cert);
                }
            }
        }
        for path in &settings.extra_ca {
            let pem = std::fs::read(path).map_err(|source| UpstreamSetupError::ReadCa {
                path: path.clone(),
                source,
            })?;
            let mut added = 0;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|_| UpstreamSetupError::BadCa { path: path.clone() })?;
                roots
                    .add(cert)
                    .map_err(|_| UpstreamSetupError::BadCa { path: path.clone() })?;
                added += 1;
            }
            if added == 0 {
                return Err(UpstreamSetupError::BadCa { path: path.clone() });
            }
        }
        if roots.is_empty() {
            return Err(UpstreamSetupError::NoRoots);
        }
        let mut tls = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(UpstreamSetupError::Tls)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let dialer = Dialer {
            resolve: Arc::new(settings.resolve.clone()),
            connect_timeout,
            check,
        };
        let tls = TlsConnector::from(Arc::new(tls));
        let connector = Connector {
            tls: tls.clone(),
            dialer: dialer.clone(),
        };
        let hosts = NonZeroUsize::new(POOLED_HOSTS).unwrap_or(NonZeroUsize::MIN);
        Ok(Upstream {
            pools: (0..=workers).map(|_| Pool::new(&connector)).collect(),
            seen: Arc::new(Mutex::new(LruCache::new(hosts))),
            dialer,
            tls,
        })
    }

    /// Send a request whose URI is absolute (`https://host:port/path`).
    pub fn request(
        &self,
        req: http::Request<OutBody>,
    ) -> hyper_util::client::legacy::ResponseFuture {
        let authority = req.uri().authority().map_or("", |a| a.as_str());
        let pool = &self.pools[POOL.with(Cell::get) % self.pools.len()];
        if self.asked_before(authority) {
            pool.client.request(req)
        } else {
            pool.once.request(req)
        }
    }

    /// Whether `authority` was asked for before, among the last [`POOLED_HOSTS`] hosts.
    fn asked_before(&self, authority: &str) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.get(authority).is_some() {
            return true;
        }
        seen.put(authority.to_string(), ());
        false
    }

    /// An upstream pinned to one address (transparent mode: where the client was going), spoken
    /// to as `scheme`: for `Https`, its certificate is verified against `name` (the SNI).
    pub fn pinned(&self, addr: SocketAddr, name: &str, scheme: Scheme) -> Pinned {
        Pinned {
            addr,
            name: name.to_string(),
            tls: (scheme == Scheme::Https).then(|| self.tls.clone()),
            connect_timeout: self.dialer.connect_timeout,
            sender: tokio::sync::Mutex::new(None),
        }
    }

    /// A plain TCP connection for a tunnel (resolve overrides apply).
    pub async fn dial(&self, host: &str, port: u16) -> Result<TcpStream, ConnectError> {
        self.dialer.dial(host, port).await
    }

    /// The addresses a connection to `host:port` would try, as `dial` finds them.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ConnectError> {
        tokio::time::timeout(self.dialer.connect_timeout, self.dialer.resolve(host, port))
            .await
            .map_err(|_| ConnectError::Timeout)?
    }
}

#[derive(Clone)]
struct Dialer {
    resolve: Arc<HashMap<String, SocketAddr>>,
    connect_timeout: Duration,
    check: Arc<dyn AddressCheck>,
}

impl Dialer {
    async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ConnectError> {
        let key = format!("{}:{port}", crate::decide::policy::normalize_host(host));
        match self.resolve.get(&key) {
            Some(addr) => Ok(vec![*addr]),
            None => Ok(tokio::net::lookup_host((
                host.trim_start_matches('[').trim_end_matches(']'),
                port,
            ))
            .await
            .map_err(ConnectError::Resolve)?
            .collect()),
        }
    }

    async fn dial(&self, host: &str, port: u16) -> Result<TcpStream, ConnectError> {
        let connect = async {
            let addrs = self.resolve(host, port).await?;
            // Every address is checked before the first is tried: which one answers is not
            // ours to choose.
            for addr in &addrs {
                self.check.check(host, *addr).await?;
            }
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        return Ok(s);
                    }
                    Err(e) => last = e,
                }
            }
            Err(ConnectError::Tcp(last))
        };
        tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| ConnectError::Timeout)?
    }
}

/// hyper-util connector: TCP (with resolve overrides), then TLS for `https`.
#[derive(Clone)]
struct Connector {
    tls: TlsConnector,
    dialer: Dialer,
}

impl tower_service::Service<Uri> for Connector {
    type Response = Conn;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().to_string();
            let https = uri.scheme_str() == Some("https");
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            let tcp = this.dialer.dial(&host, port).await?;
            if !https {
                return Ok(Conn::Plain(TokioIo::new(tcp)));
            }
            let bare = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let name = ServerName::try_from(bare.clone()).map_err(|_| ConnectError::Name(bare))?;
            let tls =
                tokio::time::timeout(this.dialer.connect_timeout, this.tls.connect(name, tcp))
                    .await
                    .map_err(|_| ConnectError::Timeout)?
                    .map_err(ConnectError::Tls)?;
            Ok(Conn::Tls(Box::new(TokioIo::new(tls))))
        })
    }
}

enum Conn {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        match self {
            Conn::Plain(_) => Connected::new(),
            Conn::Tls(s) => {
                if s.inner().get_ref().1.alpn_protocol() == Some(b"h2") {
                    Connected::new().negotiated_h2()
                } else {
                    Connected::new()
                }
            }
        }
    }
}

impl Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// How a pinned upstream is spoken to.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Scheme {
    Http,
    Https,
}

/// One upstream connection to a fixed address, made on the first request and remade when it
/// closes: transparent clients are served 1:1, so no pool is needed. HTTP/1.1 requests take
/// turns; h2 requests share the connection.
pub struct Pinned {
    addr: SocketAddr,
    name: String,
    tls: Option<TlsConnector>,
    connect_timeout: Duration,
    sender: tokio::sync::Mutex<Option<Sender>>,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<OutBody>),
    H2(hyper::client::conn::http2::SendRequest<OutBody>),
}

/// Why a pinned request failed.
#[derive(Debug, thiserror::Error)]
pub enum PinnedError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("upstream request failed")]
    Request(#[source] hyper::Error),
}

impl Pinned {
    /// The address every request goes to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Send `req` (absolute URI) to the pinned address.
    pub async fn request(
        &self,
        mut req: http::Request<OutBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, PinnedError> {
        let mut slot = self.sender.lock().await;
        let alive = match slot.as_ref() {
            Some(Sender::H1(s)) => !s.is_closed(),
            Some(Sender::H2(s)) => !s.is_closed(),
            None => false,
        };
        if !alive {
            // Boxed: the handshake's future is several KiB, and inline it would be carried
            // (and copied) by every request's future, though only a request that finds no live
            // connection connects.
            *slot = Some(Box::pin(self.connect()).await?);
        }
        match slot.as_mut() {
            Some(Sender::H2(s)) => {
                let mut s = s.clone();
                drop(slot);
                s.ready().await.map_err(PinnedError::Request)?;
                s.send_request(req).await.map_err(PinnedError::Request)
            }
            Some(Sender::H1(s)) => {
                // HTTP/1.1 speaks origin-form with a Host header.
                let authority = req.uri().authority().map(|a| a.as_str().to_string());
                let path = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_else(|| "/".into());
                *req.uri_mut() = path.parse().unwrap_or_default();
                if let Some(Ok(host)) = authority.map(|a| http::HeaderValue::from_str(&a)) {
                    req.headers_mut().insert(http::header::HOST, host);
                }
                s.ready().await.map_err(PinnedError::Request)?;
                s.send_request(req).await.map_err(PinnedError::Request)
            }
            None => Err(PinnedError::Connect(ConnectError::Timeout)),
        }
    }

    async fn connect(&self) -> Result<Sender, ConnectError> {
        let connect = async {
            let tcp = TcpStream::connect(self.addr)
                .await
                .map_err(ConnectError::Tcp)?;
            let _ = tcp.set_nodelay(true);
            let Some(tls) = &self.tls else {
                return handshake_h1(TokioIo::new(tcp)).await;
            };
            let name = ServerName::try_from(self.name.clone())
                .map_err(|_| ConnectError::Name(self.name.clone()))?;
            let stream = tls.connect(name, tcp).await.map_err(ConnectError::Tls)?;
            if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| ConnectError::Tls(io::Error::other(e)))?;
                tokio::spawn(conn);
                Ok(Sender::H2(sender))
            } else {
                handshake_h1(TokioIo::new(stream)).await
            }
        };
        tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| ConnectError::Timeout)?
    }
}

async fn handshake_h1<T>(io: T) -> Result<Sender, ConnectError>
where
    T: Read + Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| ConnectError::Tcp(io::Error::other(e)))?;
    // The connection task ends when the sender is dropped or the upstream closes.
    tokio::spawn(conn);
    Ok(Sender::H1(sender))
}

/// Find the connect error behind a client error, for the response and the audit reason.
pub fn connect_error(err: &hyper_util::client::legacy::Error) -> Option<&ConnectError> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(e) = source {
        if let Some(c) = e.downcast_ref::<ConnectError>() {
            return Some(c);
        }
        source = e.source();
    }
    None
}
