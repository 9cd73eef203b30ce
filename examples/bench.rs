//! The shipped benchmark: consent-proxy against a direct connection, in one run, on loopback.
//!
//! `bench/run.sh [--secs N] [--runs N] [--rate R] [--every N] [SCENARIO...]` builds this and
//! the proxy and runs it. `--rate R` paces the load at R requests a second in all (a soak below
//! the peak); `--every N` prints req/s and the proxy's RSS every N seconds of each run;
//! `--proxy-only` skips the direct runs; `--audit-sync os|data` sets the proxy's `[audit] sync`;
//! `--keep-audit DIR` copies each scenario's audit log there (`SCENARIO.jsonl`, to verify). It
//! starts a fake HTTPS upstream (this program, `upstream` subcommand, its own process), then for
//! each scenario the proxy (restarted per scenario, so its peak RSS is that scenario's own) and
//! a closed-loop load generator: N connections, each with one request in flight. It prints
//! req/s, p50/p99 latency, the proxy's CPU per request and peak RSS, and the ratio to direct.
//!
//! Scenarios (as in `../shared/bench`): `small-c16`, `small-c64` (1 KB JSON POST, keep-alive,
//! intercepted, two members removed per event), `large-c16` (256 KiB batch, 1,077 events, each
//! loses `email` and `ip`), `tunnel-small-c16`, `tunnel-large-c16` (a host of no feature:
//! blind tunnel), `newconn-c16` (new TCP + CONNECT + TLS per request, TLS resumption allowed),
//! `newconn-mint-c16` (each connection to a new host name: a leaf minted per request).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[path = "shared/payload.rs"]
mod payload;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The consent and feature both benchmarks run; its hosts name these.
const FEATURE: &str = include_str!("../bench/feature.toml");

/// The host intercepted (a feature), the host tunnelled (no feature), the parent of minted names.
const FEATURE_HOST: &str = "bench.test";
const TUNNEL_HOST: &str = "tunnel.test";
const MINT_PARENT: &str = "mint.test";
/// Minted names the proxy can resolve (`[upstream] resolve` entries, written only for the
/// minting scenario): more than a 10 s run uses at the rates seen here (names wrap around after).
const MINT_NAMES: usize = 30_000;

struct Scenario {
    name: &'static str,
    conns: usize,
    large: bool,
    host: Host,
    new_conn: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Host {
    Feature,
    Tunnel,
    Minted,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "small-c16",
        conns: 16,
        large: false,
        host: Host::Feature,
        new_conn: false,
    },
    Scenario {
        name: "small-c64",
        conns: 64,
        large: false,
        host: Host::Feature,
        new_conn: false,
    },
    Scenario {
        name: "large-c16",
        conns: 16,
        large: true,
        host: Host::Feature,
        new_conn: false,
    },
    Scenario {
        name: "tunnel-small-c16",
        conns: 16,
        large: false,
        host: Host::Tunnel,
        new_conn: false,
    },
    Scenario {
        name: "tunnel-large-c16",
        conns: 16,
        large: true,
        host: Host::Tunnel,
        new_conn: false,
    },
    Scenario {
        name: "newconn-c16",
        conns: 16,
        large: false,
        host: Host::Feature,
        new_conn: true,
    },
    Scenario {
        name: "newconn-mint-c16",
        conns: 16,
        large: false,
        host: Host::Minted,
        new_conn: true,
    },
];

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("upstream") {
        return upstream_main(&args[1..]);
    }
    let mut opts = Options {
        secs: Duration::from_secs(10),
        runs: 1,
        rate: None,
        every: None,
        proxy_only: false,
        audit_sync: None,
        keep_audit: None,
    };
    let mut wanted = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut value = |what: &str| it.next().ok_or(format!("{a} {what}"));
        match a.as_str() {
            "--secs" => opts.secs = Duration::from_secs(value("N")?.parse()?),
            "--runs" => opts.runs = value("N")?.parse()?,
            "--rate" => opts.rate = Some(value("R")?.parse()?),
            "--every" => opts.every = Some(Duration::from_secs(value("N")?.parse()?)),
            "--proxy-only" => opts.proxy_only = true,
            "--audit-sync" => opts.audit_sync = Some(value("os|data")?),
            "--keep-audit" => opts.keep_audit = Some(PathBuf::from(value("DIR")?)),
            name if SCENARIOS.iter().any(|s| s.name == name) => wanted.push(name.to_string()),
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    let scenarios: Vec<&Scenario> = SCENARIOS
        .iter()
        .filter(|s| wanted.is_empty() || wanted.iter().any(|w| w == s.name))
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(&scenarios, &opts))
}

struct Options {
    secs: Duration,
    runs: usize,
    /// Requests a second in all, paced; `None`: as fast as the replies come (closed loop).
    rate: Option<f64>,
    /// Print progress this often.
    every: Option<Duration>,
    /// Skip the direct runs (a soak of the proxy alone).
    proxy_only: bool,
    /// `[audit] sync` for the proxy (unset: its default, and a proxy without the key runs).
    audit_sync: Option<String>,
    /// Where to copy each scenario's audit log once its proxy has stopped.
    keep_audit: Option<PathBuf>,
}

/// One measured run: what the load generator saw, and what the proxy used.
#[derive(Clone, Default)]
struct Measured {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    cpu_us_per_req: Option<f64>,
    peak_rss_mb: Option<f64>,
}

async fn bench(scenarios: &[&Scenario], opts: &Options) -> Result<(), Error> {
    let (secs, runs) = (opts.secs, opts.runs);
    let dir = tempdir()?;
    let pki = Pki::create(&dir)?;
    let (small, large) = (payload::small(), payload::large());
    let upstream_port = free_port()?;
    let mut upstream = Command::new(std::env::current_exe()?)
        .args(["upstream", &upstream_port.to_string()])
        .arg(&pki.leaf_cert)
        .arg(&pki.leaf_key)
        .stdout(Stdio::null())
        .spawn()?;
    let upstream_addr: SocketAddr = ([127, 0, 0, 1], upstream_port).into();
    wait_for(upstream_addr).await?;
    let proxy_bin = proxy_binary()?;
    println!(
        "# consent-proxy bench: {} s x {runs} run(s) per row, {} cores, loopback; proxy {}",
        secs.as_secs(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        proxy_bin.display()
    );
    println!(
        "{:<18} {:>9} {:>9} {:>7} {:>8} {:>8} {:>6} {:>10} {:>14}",
        "scenario",
        "direct",
        "proxy",
        "ratio",
        "p50 ms",
        "p99 ms",
        "+p99",
        "CPU us/req",
        "RSS MB (peak)"
    );
    let mut direct_cache: BTreeMap<(bool, usize, bool), Measured> = BTreeMap::new();
    let mut result = Ok(());
    for s in scenarios {
        let key = (s.large, s.conns, s.new_conn);
        let body = if s.large {
            large.clone()
        } else {
            small.clone()
        };
        let direct = match direct_cache.get(&key) {
            Some(m) => m.clone(),
            None if opts.proxy_only => Measured::default(),
            None => {
                let load = Load {
                    via: None,
                    host: s.host,
                    trust: pki.upstream_ca.clone(),
                    body: body.clone(),
                    conns: s.conns,
                    new_conn: s.new_conn,
                    upstream: upstream_addr,
                };
                let m = median(runs, || load.run(opts, None)).await?;
                direct_cache.insert(key, m.clone());
                m
            }
        };
        let mut proxy = Proxy::start(
            &proxy_bin,
            &dir,
            &pki,
            upstream_port,
            s.host == Host::Minted,
            opts.audit_sync.as_deref(),
        )?;
        let trust = match s.host {
            Host::Tunnel => pki.upstream_ca.clone(),
            _ => proxy.ca_cert()?,
        };
        let load = Load {
            via: Some(proxy.addr),
            host: s.host,
            trust,
            body,
            conns: s.conns,
            new_conn: s.new_conn,
            upstream: upstream_addr,
        };
        let pid = proxy.child.id();
        let start_rss = rss_mb(pid, "VmRSS:");
        let measured = median(runs, || load.run(opts, Some(pid))).await;
        let peak = rss_mb(pid, "VmHWM:");
        if opts.keep_audit.is_some() {
            proxy.stop_gracefully();
        }
        proxy.stop();
        if let Some(keep) = &opts.keep_audit {
            std::fs::create_dir_all(keep)?;
            std::fs::copy(
                dir.join("audit.jsonl"),
                keep.join(format!("{}.jsonl", s.name)),
            )?;
        }
        let mut m = match measured {
            Ok(m) => m,
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        m.peak_rss_mb = peak;
        let mb = |v: Option<f64>| v.map_or("-".into(), |r| format!("{r:.1}"));
        let direct_of = |f: &dyn Fn(&Measured) -> String| {
            if opts.proxy_only {
                "-".to_string()
            } else {
                f(&direct)
            }
        };
        println!(
            "{:<18} {:>9} {:>9.0} {:>7} {:>8.2} {:>8.2} {:>6} {:>10} {:>14}",
            s.name,
            direct_of(&|d: &Measured| format!("{:.0}", d.rps)),
            m.rps,
            direct_of(&|d: &Measured| format!("{:.2}x", m.rps / d.rps.max(1.0))),
            m.p50_ms,
            m.p99_ms,
            direct_of(&|d: &Measured| format!("{:.2}", m.p99_ms - d.p99_ms)),
            m.cpu_us_per_req.map_or("-".into(), |c| format!("{c:.0}")),
            format!("{} ({})", mb(start_rss), mb(m.peak_rss_mb)),
        );
        if m.errors > 0 || direct.errors > 0 {
            println!("  errors: proxy {}, direct {}", m.errors, direct.errors);
        }
        let _ = std::io::stdout().flush();
    }
    let _ = upstream.kill();
    let _ = upstream.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The run with the median rate of `runs` runs.
async fn median<F, Fut>(runs: usize, mut run: F) -> Result<Measured, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Measured, Error>>,
{
    let mut all = Vec::new();
    for _ in 0..runs.max(1) {
        all.push(run().await?);
    }
    all.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    Ok(all.swap_remove(all.len() / 2))
}

/// The load of one scenario: closed loop, `conns` connections, one request in flight on each.
struct Load {
    via: Option<SocketAddr>,
    host: Host,
    trust: CertificateDer<'static>,
    body: Bytes,
    conns: usize,
    new_conn: bool,
    upstream: SocketAddr,
}

impl Load {
    /// Warm up for a second (not for minted names: each must be new), then measure.
    async fn run(&self, opts: &Options, pid: Option<u32>) -> Result<Measured, Error> {
        let tls = Arc::new(client_config(&self.trust)?);
        let names = Arc::new(AtomicU64::new(0));
        if self.host != Host::Minted {
            let warm_up = Options {
                secs: Duration::from_secs(1),
                every: None,
                audit_sync: None,
                keep_audit: None,
                ..*opts
            };
            self.drive(&tls, &names, &warm_up, None).await?;
        }
        let cpu_before = pid.and_then(cpu_ticks);
        let started = Instant::now();
        let (latencies, errors) = self.drive(&tls, &names, opts, pid).await?;
        let wall = started.elapsed().as_secs_f64();
        let cpu_after = pid.and_then(cpu_ticks);
        let done = latencies.len();
        let mut sorted = latencies;
        sorted.sort_unstable();
        let pct = |p: f64| {
            sorted
                .get(((done as f64 * p) as usize).min(done.saturating_sub(1)))
                .map_or(0.0, |us| *us as f64 / 1000.0)
        };
        let cpu_us_per_req = match (cpu_before, cpu_after) {
            (Some(b), Some(a)) if done > 0 => {
                Some((a - b) as f64 * 1e6 / ticks_per_sec() / done as f64)
            }
            _ => None,
        };
        Ok(Measured {
            rps: done as f64 / wall,
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            errors,
            cpu_us_per_req,
            peak_rss_mb: None,
        })
    }

    async fn drive(
        &self,
        tls: &Arc<rustls::ClientConfig>,
        names: &Arc<AtomicU64>,
        opts: &Options,
        pid: Option<u32>,
    ) -> Result<(Vec<u32>, u64), Error> {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        // Each connection sends one request per `pace`, the connections spread over it.
        let pace = opts
            .rate
            .map(|r| Duration::from_secs_f64(self.conns as f64 / r.max(0.001)));
        let mut tasks = Vec::new();
        for i in 0..self.conns {
            let conn = Conn {
                via: self.via,
                host: self.host,
                tls: tls.clone(),
                body: self.body.clone(),
                new_conn: self.new_conn,
                upstream: self.upstream,
                names: names.clone(),
                stop: stop.clone(),
                done: done.clone(),
                pace: pace.map(|p| (p, p.mul_f64(i as f64 / self.conns as f64))),
            };
            tasks.push(tokio::spawn(conn.run()));
        }
        let started = Instant::now();
        let every = opts.every.unwrap_or(opts.secs).min(opts.secs);
        let mut last = (Duration::ZERO, 0);
        while started.elapsed() < opts.secs {
            tokio::time::sleep(every.min(opts.secs.saturating_sub(started.elapsed()))).await;
            if opts.every.is_some() {
                let (at, n) = (started.elapsed(), done.load(Ordering::Relaxed));
                let rate = (n - last.1) as f64 / (at - last.0).as_secs_f64();
                let rss = pid.and_then(|p| rss_mb(p, "VmRSS:"));
                println!(
                    "  {:>5.0} s {rate:>9.0} req/s  RSS {}",
                    at.as_secs_f64(),
                    rss.map_or("-".into(), |r| format!("{r:.1} MB"))
                );
                last = (at, n);
            }
        }
        stop.store(true, Ordering::Relaxed);
        let (mut latencies, mut errors) = (Vec::new(), 0);
        for t in tasks {
            let (l, e) = t.await?;
            latencies.extend(l);
            errors += e;
        }
        if latencies.is_empty() {
            return Err(format!("no request succeeded ({errors} errors)").into());
        }
        Ok((latencies, errors))
    }
}

struct Conn {
    via: Option<SocketAddr>,
    host: Host,
    tls: Arc<rustls::ClientConfig>,
    body: Bytes,
    new_conn: bool,
    upstream: SocketAddr,
    names: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// Requests completed, for progress lines.
    done: Arc<AtomicU64>,
    /// With a paced load: one request per this long, starting after the offset.
    pace: Option<(Duration, Duration)>,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

impl Conn {
    /// Requests until told to stop: latencies in µs (connection set-up included when each
    /// request has its own connection), and the count of failed requests.
    async fn run(self) -> (Vec<u32>, u64) {
        let (mut latencies, mut errors) = (Vec::new(), 0u64);
        let mut sender: Option<(Sender, String)> = None;
        let mut next = self
            .pace
            .map(|(_, offset)| tokio::time::Instant::now() + offset);
        while !self.stop.load(Ordering::Relaxed) {
            if let (Some(at), Some((pace, _))) = (next.as_mut(), self.pace) {
                tokio::time::sleep_until(*at).await;
                *at += pace;
            }
            let started = Instant::now();
            if sender.is_none() || self.new_conn {
                match self.open().await {
                    Ok(s) => sender = Some(s),
                    Err(_) => {
                        errors += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                }
            }
            let Some((send, host)) = sender.as_mut() else {
                continue;
            };
            match post(send, host, &self.body).await {
                Ok(()) => {
                    latencies
                        .push(u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX));
                    self.done.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    errors += 1;
                    sender = None;
                }
            }
        }
        (latencies, errors)
    }

    async fn open(&self) -> Result<(Sender, String), Error> {
        let host = match self.host {
            Host::Feature => FEATURE_HOST.to_string(),
            Host::Tunnel => TUNNEL_HOST.to_string(),
            Host::Minted => {
                let n = self.names.fetch_add(1, Ordering::Relaxed) as usize % MINT_NAMES;
                format!("h{n}.{MINT_PARENT}")
            }
        };
        let mut tcp = TcpStream::connect(self.via.unwrap_or(self.upstream)).await?;
        tcp.set_nodelay(true)?;
        if self.via.is_some() {
            let connect = format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n");
            tcp.write_all(connect.as_bytes()).await?;
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let b = tcp.read_u8().await?;
                head.push(b);
                if head.len() > 4096 {
                    return Err("CONNECT answer too long".into());
                }
            }
            if !head.starts_with(b"HTTP/1.1 200") {
                return Err(String::from_utf8_lossy(&head).into_owned().into());
            }
        }
        let name = ServerName::try_from(host.clone())?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        Ok((send, host))
    }
}

async fn post(send: &mut Sender, host: &str, body: &Bytes) -> Result<(), Error> {
    send.ready().await?;
    let req = Request::post("/v1/events")
        .header("host", host)
        .header("content-type", "application/json")
        .header("x-install-id", "bench-install")
        .body(Full::new(body.clone()))?;
    let resp: Response<hyper::body::Incoming> = send.send_request(req).await?;
    let status = resp.status();
    resp.into_body().collect().await?;
    if !status.is_success() {
        return Err(format!("status {status}").into());
    }
    Ok(())
}

fn client_config(trust: &CertificateDer<'static>) -> Result<rustls::ClientConfig, Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.clone())?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The proxy under test, with its own policy, CA and audit log.
struct Proxy {
    child: Child,
    addr: SocketAddr,
    ca_cert: PathBuf,
}

impl Proxy {
    /// Start the proxy; `minted`: with the minted names' `resolve` entries. The tunnelled host
    /// is the upstream on another address (the proxy refuses to tunnel a name of no feature to
    /// a feature host's address).
    fn start(
        bin: &Path,
        dir: &Path,
        pki: &Pki,
        upstream_port: u16,
        minted: bool,
        audit_sync: Option<&str>,
    ) -> Result<Proxy, Error> {
        let port = free_port()?;
        let policy = dir.join("policy.toml");
        let up = format!("127.0.0.1:{upstream_port}");
        let mut resolve = format!(
            "\"{FEATURE_HOST}:443\" = \"{up}\"\n\"{TUNNEL_HOST}:443\" = \"127.0.0.2:{upstream_port}\"\n"
        );
        for n in (0..MINT_NAMES).filter(|_| minted) {
            resolve.push_str(&format!("\"h{n}.{MINT_PARENT}:443\" = \"{up}\"\n"));
        }
        let audit = dir.join("audit.jsonl");
        let _ = std::fs::remove_file(&audit);
        std::fs::write(
            &policy,
            format!(
                r#"unknown_hosts = "tunnel"
[listen]
proxy = "127.0.0.1:{port}"
[tls]
ca_cert = "{ca_cert}"
ca_key = "{ca_key}"
[upstream]
extra_ca = ["{upstream_ca}"]
[upstream.resolve]
{resolve}
[audit]
path = "{audit}"
node = "bench"
{sync}
{FEATURE}"#,
                sync = audit_sync
                    .map(|m| format!("sync = \"{m}\""))
                    .unwrap_or_default(),
                ca_cert = dir.join("proxy-ca.pem").display(),
                ca_key = dir.join("proxy-ca.key").display(),
                upstream_ca = pki.upstream_ca_path.display(),
                audit = audit.display(),
            ),
        )?;
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&policy)
            .stdout(Stdio::null())
            .spawn()?;
        let addr = ([127, 0, 0, 1], port).into();
        let mut proxy = Proxy {
            child,
            addr,
            ca_cert: dir.join("proxy-ca.pem"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline || proxy.child.try_wait()?.is_some() {
                proxy.stop();
                return Err("the proxy did not start (see its log above)".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(proxy)
    }

    fn ca_cert(&self) -> Result<CertificateDer<'static>, Error> {
        read_cert(&self.ca_cert)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and up to 60 s for the proxy to drain and write its final record.
    fn stop_gracefully(&mut self) {
        let term = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        if term.is_ok_and(|s| s.success()) {
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The upstream's CA and leaf (for the feature, tunnel and minted names), as files.
struct Pki {
    upstream_ca: CertificateDer<'static>,
    upstream_ca_path: PathBuf,
    leaf_cert: PathBuf,
    leaf_key: PathBuf,
}

impl Pki {
    fn create(dir: &Path) -> Result<Pki, Error> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "bench upstream CA");
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);
        let leaf_key = KeyPair::generate()?;
        let mut leaf = CertificateParams::default();
        leaf.subject_alt_names = vec![
            SanType::DnsName(FEATURE_HOST.try_into()?),
            SanType::DnsName(TUNNEL_HOST.try_into()?),
            SanType::DnsName(format!("*.{MINT_PARENT}").try_into()?),
        ];
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;
        let pki = Pki {
            upstream_ca: ca_cert.der().clone(),
            upstream_ca_path: dir.join("upstream-ca.pem"),
            leaf_cert: dir.join("upstream.pem"),
            leaf_key: dir.join("upstream.key"),
        };
        std::fs::write(&pki.upstream_ca_path, ca_cert.pem())?;
        std::fs::write(&pki.leaf_cert, leaf_cert.pem() + &ca_cert.pem())?;
        std::fs::write(&pki.leaf_key, leaf_key.serialize_pem())?;
        Ok(pki)
    }
}

fn read_cert(path: &Path) -> Result<CertificateDer<'static>, Error> {
    use rustls::pki_types::pem::PemObject;
    Ok(CertificateDer::from_pem_file(path)?)
}

/// The fake upstream: HTTPS (HTTP/1.1, like the nginx of the shared harness), reads each body
/// whole and answers `{"ok":true}`. Runs on one thread, as nginx with one worker.
fn upstream_main(args: &[String]) -> Result<(), Error> {
    use rustls::pki_types::pem::PemObject;
    let [port, cert, key] = args else {
        return Err("upstream PORT CERT KEY".into());
    };
    let certs = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let port: u16 = port.parse()?;
    rt.block_on(async move {
        let second = TcpListener::bind(("127.0.0.2", port)).await?;
        tokio::spawn(serve_upstream(second, acceptor.clone()));
        serve_upstream(TcpListener::bind(("127.0.0.1", port)).await?, acceptor).await
    })
}

async fn serve_upstream(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
) -> Result<(), Error> {
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service =
                hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    req.into_body().collect().await?;
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(
                        b"{\"ok\":true}",
                    ))))
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

async fn wait_for(addr: SocketAddr) -> Result<(), Error> {
    for _ in 0..500 {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(format!("nothing listens on {addr}").into())
}

fn free_port() -> Result<u16, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The proxy built next to this program (`target/release/consent-proxy`), or `$CONSENT_PROXY_BIN`.
fn proxy_binary() -> Result<PathBuf, Error> {
    if let Some(bin) = std::env::var_os("CONSENT_PROXY_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("consent-proxy"))
        .ok_or("cannot place the proxy binary")?;
    if !bin.exists() {
        return Err(format!(
            "{} is missing: run bench/run.sh, which builds it",
            bin.display()
        )
        .into());
    }
    Ok(bin)
}

fn tempdir() -> Result<PathBuf, Error> {
    let dir = std::env::temp_dir().join(format!("consent-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `/proc/PID/stat` counts CPU time in `USER_HZ` ticks, 100 a second on every Linux platform.
fn ticks_per_sec() -> f64 {
    100.0
}

/// A memory line of a process's status (`VmRSS:` now, `VmHWM:` its peak), in MB.
fn rss_mb(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1000.0)
}
