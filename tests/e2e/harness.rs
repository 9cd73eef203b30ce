//! Test harness: a fake upstream PKI and HTTPS servers that record what they receive, the proxy
//! started in-process on port 0, and real clients (curl, Go) pointed at it.
//!
//! Two trust domains stay apart: the proxy's interception CA (what clients trust, `ca/ca.pem`)
//! and the fake upstreams' CA (what the proxy trusts through `extra_ca`).

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use consent_proxy::config;
use consent_proxy::decide::Decision;
use consent_proxy::Running;

pub const FIXTURES: &str = "../shared/fixtures/mattermost";

pub const SECURITY: &str = "securityupdatecheck.mattermost.com";
pub const RUDDER: &str = "pdat.matterlytics.com";
pub const SEGMENT: &str = "api.segment.io";
pub const SENTRY: &str = "o94110.ingest.us.sentry.io";
pub const PUSH: &str = "push.mattermost.com";
pub const NOTICES: &str = "notices.mattermost.com";
pub const MARKETPLACE: &str = "api.integrations.mattermost.com";
pub const CUSTOMERS: &str = "customers.mattermost.com";
pub const GITHUB: &str = "api.github.com";
pub const TUNNELLED: &str = "elsewhere.example";
/// The upstream's names: every one but the last (tunnelled to an echo server) resolves to it.
const HOSTS: [&str; 10] = [
    SECURITY,
    RUDDER,
    SEGMENT,
    SENTRY,
    PUSH,
    NOTICES,
    MARKETPLACE,
    CUSTOMERS,
    GITHUB,
    TUNNELLED,
];

/// The push fixtures sent to `/api/v1/send_push`, and the telemetry batches.
pub const PUSH_SENDS: [&str; 5] = [
    "push_full.json",
    "push_generic.json",
    "push_generic_no_channel.json",
    "push_id_loaded.json",
    "push_clear.json",
];
pub const TELEMETRY_BATCHES: [&str; 3] = [
    "telemetry_batch_enterprise.json",
    "telemetry_batch_plain.json",
    "telemetry_batch_legacy_config_events.json",
];

/// Fixtures of what is newer than the shared ones (v11 shapes, plugins, Sentry), in the project.
pub const OWN_FIXTURES: &str = "tests/fixtures/mattermost";

/// Read a fixture file: the shared ones beside the project in `../shared`, then the project's.
pub fn fixture(name: &str) -> Vec<u8> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = [FIXTURES, OWN_FIXTURES]
        .iter()
        .map(|dir| root.join(dir).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no fixture {name}"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

/// A fixture body as Mattermost sends it (the files end with a newline the wire does not carry).
pub fn fixture_body(name: &str) -> Vec<u8> {
    let mut b = fixture(name);
    while b.last() == Some(&b'\n') {
        b.pop();
    }
    b
}

/// A `*.url` fixture, without its newline.
pub fn fixture_url(name: &str) -> String {
    String::from_utf8(fixture(name))
        .expect("utf-8")
        .trim()
        .to_string()
}

pub fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(FIXTURES)
        .join(name)
}

/// What a fake upstream received.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub version: Version,
}

/// A fake HTTPS upstream answering every request `{"status":"OK"}`.
pub struct Upstream {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
    pub connections: Arc<AtomicUsize>,
}

impl Upstream {
    pub fn requests(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }
}

/// The fake upstreams' CA, and one leaf for every test host.
pub struct UpstreamPki {
    pub ca_pem: String,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl UpstreamPki {
    pub fn new() -> Self {
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "fake upstream CA");
        let ca = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().expect("key");
        let mut leaf =
            CertificateParams::new(HOSTS.iter().map(|h| h.to_string()).collect::<Vec<_>>())
                .expect("params");
        leaf.subject_alt_names
            .push(SanType::DnsName("localhost".try_into().expect("name")));
        let leaf = leaf.signed_by(&leaf_key, &issuer).expect("leaf");
        UpstreamPki {
            ca_pem: ca.pem(),
            chain: vec![leaf.der().clone(), ca.der().clone()],
            key: PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        }
    }

    /// Start a recording HTTPS upstream offering the given ALPN protocols.
    #[allow(dead_code)] // tests/namespaces.rs
    pub async fn serve(&self, alpn: &[&[u8]]) -> Upstream {
        self.serve_on("127.0.0.1:0".parse().expect("addr"), alpn)
            .await
    }

    /// The same, on a given address.
    #[allow(dead_code)] // tests/namespaces.rs
    pub async fn serve_on(&self, bind: SocketAddr, alpn: &[&[u8]]) -> Upstream {
        self.serve_slowly(bind, alpn, Duration::ZERO).await
    }

    /// The same, recording each request as it arrives and answering it `delay` later.
    pub async fn serve_slowly(
        &self,
        bind: SocketAddr,
        alpn: &[&[u8]],
        delay: Duration,
    ) -> Upstream {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(self.chain.clone(), self.key.clone_key())
        .expect("cert");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(bind).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let received = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (rec, conns) = (received.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                conns.fetch_add(1, Ordering::SeqCst);
                let (acceptor, rec) = (acceptor.clone(), rec.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req: Request<Incoming>| {
                        let rec = rec.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            rec.lock().expect("lock").push(Received {
                                method: parts.method.to_string(),
                                path_and_query: parts
                                    .uri
                                    .path_and_query()
                                    .map(|p| p.to_string())
                                    .unwrap_or_default(),
                                headers: parts.headers,
                                body,
                                version: parts.version,
                            });
                            tokio::time::sleep(delay).await;
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                                b"{\"status\":\"OK\"}",
                            ))))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            received,
            connections,
        }
    }
}

/// A raw TCP upstream that echoes every byte, for tunnels; it records what it received.
pub async fn echo_server() -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    echo_server_on("127.0.0.1:0".parse().expect("addr")).await
}

/// The same, on a given address.
pub async fn echo_server_on(bind: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind(bind).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 || tcp.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    s.lock().expect("lock").extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    (addr, seen)
}

/// A proxy running in-process against a fake upstream, in its own folder.
pub struct Env {
    pub dir: TempDir,
    pub proxy: SocketAddr,
    pub upstream: Upstream,
    pub ca_pem: PathBuf,
    running: Option<Running>,
}

pub struct Setup<'a> {
    /// The `[consent]` table and anything else, appended to the policy.
    pub policy: &'a str,
    /// ALPN the fake upstream offers.
    pub upstream_alpn: &'a [&'a [u8]],
    /// Where `elsewhere.example:443` goes (an echo server for tunnels).
    pub tunnel_to: Option<SocketAddr>,
    /// More files to write into the proxy's folder before it starts: `(name, text)`.
    pub files: &'a [(&'a str, &'a str)],
    /// Start the admin listener too.
    pub admin: bool,
    /// `[listen] proxy_protocol = true` (with `[clients] balancers` in `policy`).
    pub proxy_protocol: bool,
    /// `[audit] node`.
    pub node: Option<&'a str>,
    /// The fake upstream answers each request this long after it arrived.
    pub upstream_delay: Duration,
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Setup {
            policy: "",
            upstream_alpn: &[b"h2", b"http/1.1"],
            tunnel_to: None,
            files: &[],
            admin: false,
            proxy_protocol: false,
            node: None,
            upstream_delay: Duration::ZERO,
        }
    }
}

impl Env {
    pub async fn start(setup: Setup<'_>) -> Env {
        capture_diagnostics();
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = UpstreamPki::new();
        std::fs::write(dir.path().join("upstream-ca.pem"), &pki.ca_pem).expect("write");
        let bind = "127.0.0.1:0".parse().expect("addr");
        let upstream = pki
            .serve_slowly(bind, setup.upstream_alpn, setup.upstream_delay)
            .await;
        let mut resolve: Vec<String> = HOSTS[..HOSTS.len() - 1]
            .iter()
            .map(|h| format!("\"{h}:443\" = \"{}\"", upstream.addr))
            .collect();
        if let Some(addr) = setup.tunnel_to {
            resolve.push(format!("\"{TUNNELLED}:443\" = \"{addr}\""));
        }
        let text = format!(
            "{}\n[listen]\nproxy = \"127.0.0.1:0\"\n{}{}[tls]\nca_cert = \"ca/ca.pem\"\nca_key = \"ca/ca.key\"\n\
             [upstream]\nextra_ca = [\"upstream-ca.pem\"]\nresolve = {{ {} }}\n[audit]\npath = \"audit.jsonl\"\n{}",
            setup.policy,
            if setup.admin { "admin = \"127.0.0.1:0\"\n" } else { "" },
            if setup.proxy_protocol { "proxy_protocol = true\n" } else { "" },
            resolve.join(", "),
            setup.node.map(|n| format!("node = {n:?}\n")).unwrap_or_default(),
        );
        for (name, text) in setup.files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        }
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, text).expect("write");
        let config = config::load(Some(&path), None).expect("test policy is valid");
        let running = consent_proxy::start(config).await.expect("proxy starts");
        Env {
            proxy: running.started.proxy_addr,
            ca_pem: dir.path().join("ca/ca.pem"),
            upstream,
            dir,
            running: Some(running),
        }
    }

    /// The admin listener's address, when `[listen] admin` is set.
    pub fn admin(&self) -> Option<SocketAddr> {
        self.running.as_ref().and_then(|r| r.started.admin_addr)
    }

    /// Wait (up to 10 s) for an audit record that satisfies `pred`; polls the file.
    pub async fn wait_for_record(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let found = self
                .audit_text()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|r| pred(r));
            if let Some(r) = found {
                return r;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no audit record: {what}\n{}",
                self.audit_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Open one intercepted HTTP/1.1 connection to `host` through the proxy (CONNECT, TLS
    /// trusting the interception CA) and keep it, to send several requests over it.
    pub async fn keep_alive(
        &self,
        host: &str,
    ) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        let tcp = self.connect_tunnel(host).await;
        let tls = self.tls_client(tcp, host).await;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        sender
    }

    /// CONNECT to `host:443` through the proxy; asserts the 200 and returns the open stream.
    pub async fn connect_tunnel(&self, host: &str) -> tokio::net::TcpStream {
        connect_via(self.proxy, host).await
    }

    /// An intercepted connection to `host` through the proxy, TLS done with ALPN `h2`.
    pub async fn h2_inside(
        &self,
        proxy: SocketAddr,
        host: &str,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let tcp = connect_via(proxy, host).await;
        tls_client_alpn(tcp, host, &self.ca_pem, b"h2")
            .await
            .expect("TLS with the minted leaf")
    }

    /// TLS over `tcp` to `host`, trusting only the interception CA, offering HTTP/1.1.
    pub async fn tls_client(
        &self,
        tcp: tokio::net::TcpStream,
        host: &str,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        tls_client(tcp, host, &self.ca_pem)
            .await
            .expect("TLS with the minted leaf")
    }

    /// The audit log as written, queued outcomes included.
    pub fn audit_text(&self) -> String {
        self.flush();
        std::fs::read_to_string(self.dir.path().join("audit.jsonl")).expect("audit log")
    }

    /// Decision records (not the proxy's own), read back typed by the library, each with what
    /// its `outcome` record said (status, byte counts) folded in.
    pub fn records(&self) -> Vec<consent_proxy::audit::Record> {
        self.flush();
        let all = consent_proxy::audit::read(&self.dir.path().join("audit.jsonl"))
            .expect("every line is an audit record");
        let outcomes: std::collections::HashMap<u64, consent_proxy::audit::Record> = all
            .iter()
            .filter(|r| r.decision == Decision::Outcome)
            .filter_map(|r| Some((r.of?, r.clone())))
            .collect();
        all.into_iter()
            .filter(|r| {
                !matches!(
                    r.decision,
                    Decision::PolicyLoaded | Decision::Outcome | Decision::Recovered
                )
            })
            .map(|mut r| {
                if let Some(o) = outcomes.get(&r.seq) {
                    r.status = r.status.or(o.status);
                    r.bytes_in = o.bytes_in.or(r.bytes_in);
                    r.bytes_out = o.bytes_out.or(r.bytes_out);
                }
                r
            })
            .collect()
    }

    /// Decision records as JSON, each with its `outcome` folded in (`status`, byte counts, and
    /// its reason as `outcome_reason`).
    pub fn audit(&self) -> Vec<serde_json::Value> {
        self.flush();
        let all: Vec<serde_json::Value> = self
            .audit_text()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect();
        let outcomes: std::collections::HashMap<u64, &serde_json::Value> = all
            .iter()
            .filter(|r| r["decision"] == "outcome")
            .filter_map(|r| Some((r["of"].as_u64()?, r)))
            .collect();
        all.iter()
            .filter(|r| {
                !["policy_loaded", "outcome", "recovered"]
                    .contains(&r["decision"].as_str().unwrap_or(""))
            })
            .map(|r| {
                let mut r = r.clone();
                if let Some(o) = r["seq"].as_u64().and_then(|s| outcomes.get(&s)) {
                    if r["status"].is_null() {
                        r["status"] = o["status"].clone();
                    }
                    for key in ["bytes_in", "bytes_out"] {
                        if !o[key].is_null() {
                            r[key] = o[key].clone();
                        }
                    }
                    r["outcome_reason"] = o["reason"].clone();
                }
                r
            })
            .collect()
    }

    /// Write the outcomes the proxy has queued (they wait up to 50 ms for the next record).
    pub fn flush(&self) {
        if let Some(r) = &self.running {
            r.flush_audit().expect("audit log writable");
        }
    }

    /// Stop the proxy (it writes its final record); returns its folder, which lives on while
    /// the caller keeps it.
    pub async fn stop(mut self) -> TempDir {
        if let Some(r) = self.running.take() {
            r.shutdown(Duration::from_secs(5)).await;
        }
        self.dir
    }

    /// The proxy binary on this folder's policy, CA and upstream, on a port of its own with an
    /// audit log of its own, its diagnostics (stderr) into `stderr.log`, and `envs` set. Returns
    /// the process (killed when dropped) and its address, once it accepts connections.
    pub async fn spawn_binary(&self, envs: &[(&str, &str)]) -> (Spawned, SocketAddr) {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let stderr = std::fs::File::create(self.dir.path().join("stderr.log")).expect("log");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_consent-proxy"))
            .arg("run")
            .arg("--config")
            .arg(self.dir.path().join("policy.toml"))
            .args(["--listen", &addr.to_string()])
            .arg("--audit")
            .arg(self.dir.path().join("binary-audit.jsonl"))
            .env_remove("RUST_LOG")
            .envs(envs.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("the binary starts");
        let spawned = Spawned(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the binary never listened"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (spawned, addr)
    }

    /// Run curl through the proxy, trusting only the interception CA.
    pub async fn curl(&self, args: &[&str]) -> Curl {
        curl(self.proxy, &self.ca_pem, self.dir.path(), args).await
    }
}

/// A CONNECT to `host:443` through the proxy at `proxy`, answered 200.
pub async fn connect_via(proxy: SocketAddr, host: &str) -> tokio::net::TcpStream {
    let mut tcp = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    let connect = format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n");
    tcp.write_all(connect.as_bytes()).await.expect("write");
    let mut head = [0u8; 512];
    let n = tcp.read(&mut head).await.expect("read");
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    tcp
}

/// A child process, killed when dropped.
pub struct Spawned(pub std::process::Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// TLS over `tcp` to `host`, trusting only the CA in `ca_pem`, offering HTTP/1.1.
pub async fn tls_client(
    tcp: tokio::net::TcpStream,
    host: &str,
    ca_pem: &Path,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    tls_client_alpn(tcp, host, ca_pem, b"http/1.1").await
}

/// TLS over `tcp` to `host`, trusting only the CA in `ca_pem`, offering `alpn`.
pub async fn tls_client_alpn(
    tcp: tokio::net::TcpStream,
    host: &str,
    ca_pem: &Path,
    alpn: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca_pem)?;
    roots
        .add(CertificateDer::from_pem_slice(&pem).expect("pem"))
        .expect("root");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).expect("name");
    connector.connect(name, tcp).await
}

/// Run curl through the proxy at `proxy`, trusting only the CA in `ca_pem`; its output file
/// goes in `dir`.
pub async fn curl(proxy: SocketAddr, ca_pem: &Path, dir: &Path, args: &[&str]) -> Curl {
    let out_file = dir.join(format!(
        "curl-{}.out",
        COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    let output = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "--proxy",
            &format!("http://{proxy}"),
        ])
        .arg("--cacert")
        .arg(ca_pem)
        .arg("-o")
        .arg(&out_file)
        .args([
            "-w",
            "%{http_code} %{http_connect} %{http_version} %{local_port}",
        ])
        .args(args)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("NO_PROXY")
        .output()
        .await
        .expect("curl runs (install curl)");
    let w = String::from_utf8_lossy(&output.stdout).to_string();
    let mut parts = w.split_whitespace();
    let code = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    let connect = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    let version = parts.next().unwrap_or_default().to_string();
    let local_port = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    Curl {
        code,
        connect,
        version,
        local_port,
        body: std::fs::read_to_string(&out_file).unwrap_or_default(),
        exit: output.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&output.stderr).to_string(),
    }
}

/// Write `bytes` on `stream` and read the first answer ("" when the peer closed without one);
/// no answer within 10 s fails the test, with the proxy's diagnostics.
pub async fn exchange<S>(stream: &mut S, bytes: &[u8]) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(bytes).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("no answer in time\n{}", diagnostics()))
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).to_string()
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug)]
pub struct Curl {
    /// The final response's status (0 when there was none).
    pub code: u16,
    /// The CONNECT response's status.
    pub connect: u16,
    pub version: String,
    /// The client's own port (the audit `client` names it; read by the fleet test).
    #[allow(dead_code)]
    pub local_port: u16,
    pub body: String,
    pub exit: i32,
    /// Read in failure messages (`{:?}`).
    #[allow(dead_code)]
    pub stderr: String,
}

/// Everything the proxy logs through `tracing` during the tests, at every level.
pub fn diagnostics() -> String {
    String::from_utf8_lossy(&LOG.get_or_init(Default::default).lock().expect("lock")).to_string()
}

static LOG: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.get_or_init(Default::default)
            .lock()
            .expect("lock")
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_diagnostics() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(|| LogWriter)
            .with_ansi(false)
            .try_init();
    });
}

/// Build the Go client once per test run; `None` (with a message) where Go is missing outside CI.
pub fn go_client() -> Option<PathBuf> {
    go_build("goclient")
}

/// Build the Go program in `tests/{name}`; `None` (with a message) where Go is missing outside
/// CI.
pub fn go_build(name: &str) -> Option<PathBuf> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(name);
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("go-cache");
    let status = std::process::Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg(".")
        .current_dir(&src)
        .env("GOCACHE", &cache)
        .env("GOFLAGS", "-mod=mod")
        .env("GO111MODULE", "on")
        .env("GOTOOLCHAIN", "local")
        .status();
    match status {
        Ok(s) if s.success() => Some(out),
        other => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "Go is required under CI=true: {other:?}"
            );
            eprintln!(
                "skipping the Go {name} test: `go build` failed ({other:?}); install golang-go"
            );
            None
        }
    }
}
