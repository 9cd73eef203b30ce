//! The upstream side: verified TLS (webpki or system roots plus `extra_ca`; there is no switch to
//! turn verification off), `[upstream] resolve` overrides, a pooled HTTP client that speaks h2
//! or HTTP/1.1 as the upstream negotiates, and plain TCP connections for tunnels.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::combinators::BoxBody;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
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
}

/// Pooled, verified connections to upstreams.
#[derive(Clone)]
pub struct Upstream {
    client: Client<Connector, OutBody>,
    dialer: Dialer,
}

impl Upstream {
    pub fn new(
        settings: &UpstreamSettings,
        provider: Arc<CryptoProvider>,
        connect_timeout: Duration,
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
        };
        let connector = Connector {
            tls: TlsConnector::from(Arc::new(tls)),
            dialer: dialer.clone(),
        };
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Ok(Upstream { client, dialer })
    }

    /// Send a request whose URI is absolute (`https://host:port/path`).
    pub fn request(
        &self,
        req: http::Request<OutBody>,
    ) -> hyper_util::client::legacy::ResponseFuture {
        self.client.request(req)
    }

    /// A plain TCP connection for a tunnel (resolve overrides apply).
    pub async fn dial(&self, host: &str, port: u16) -> Result<TcpStream, ConnectError> {
        self.dialer.dial(host, port).await
    }
}

#[derive(Clone)]
struct Dialer {
    resolve: Arc<HashMap<String, SocketAddr>>,
    connect_timeout: Duration,
}

impl Dialer {
    async fn dial(&self, host: &str, port: u16) -> Result<TcpStream, ConnectError> {
        let key = format!("{}:{port}", crate::policy::normalize_host(host));
        let connect = async {
            let addrs: Vec<SocketAddr> = match self.resolve.get(&key) {
                Some(addr) => vec![*addr],
                None => tokio::net::lookup_host((
                    host.trim_start_matches('[').trim_end_matches(']'),
                    port,
                ))
                .await
                .map_err(ConnectError::Resolve)?
                .collect(),
            };
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
