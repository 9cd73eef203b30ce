//! The command line (DESIGN §7): serve, check a policy, create a CA, verify an audit log.
//! Exit codes: 0 ok, 1 the checked thing is bad, 2 usage error (clap's own).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::filter::{EnvFilter, FilterExt, LevelFilter, Targets};
use tracing_subscriber::layer::Filter;
use tracing_subscriber::registry::LookupSpan;

use crate::audit;
use crate::ca;
use crate::config::{self, Config};
use crate::explain;
use crate::serve;

/// Set (to anything) to let dependency crates log at the levels `RUST_LOG` asks for; without
/// it they log warnings and errors only.
pub const LOG_DEPENDENCIES: &str = "CONSENT_PROXY_LOG_DEPENDENCIES";

/// The diagnostics filter: `RUST_LOG` (default `warn`), with every crate but this one capped at
/// `warn` unless [`LOG_DEPENDENCIES`] is set. At `debug` and `trace` the HTTP and TLS crates log
/// what a request carries (h2 prints a malformed `:path`, and a frame's pseudo-headers with the
/// query string), and the README promises that logs never do.
pub fn log_filter<S>(rust_log: Option<&str>, dependencies: bool) -> impl Filter<S>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    let env = rust_log
        .and_then(|s| EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| EnvFilter::new("warn"));
    env.and(dependency_cap(dependencies))
}

/// Every target but this crate's at `warn` at most (a static filter: callsites it turns off cost
/// nothing), unless `dependencies`.
fn dependency_cap(dependencies: bool) -> Targets {
    if dependencies {
        Targets::new().with_default(LevelFilter::TRACE)
    } else {
        Targets::new()
            .with_target("consent_proxy", LevelFilter::TRACE)
            .with_default(LevelFilter::WARN)
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "consent-proxy",
    version,
    about = "Egress proxy that enforces telemetry consent on the wire"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Policy file laid over the built-in Mattermost pack (for the default `run`).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Mattermost's config.json to derive consent from (overrides `[consent]
    /// from_mattermost_config`).
    #[arg(long, global = true)]
    mattermost_config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve (the default).
    Run(RunArgs),
    /// Validate a policy; with --print, show the effective policy.
    Check {
        #[arg(long)]
        print: bool,
    },
    /// Dry-run one request against the policy: decision, matched rules, the request as it
    /// would leave. No network.
    Explain {
        #[arg(long)]
        url: String,
        /// Default: GET, or POST with --body.
        #[arg(long)]
        method: Option<String>,
        /// A request header, `Name: value`; repeat for more.
        #[arg(long = "header", value_name = "K: V")]
        headers: Vec<String>,
        /// A file holding the request body.
        #[arg(long)]
        body: Option<PathBuf>,
    },
    /// Manage the interception CA.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Check an audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

/// Per-replica settings over the policy file, so the replicas of a fleet can share one file.
#[derive(Debug, Default, clap::Args)]
struct RunArgs {
    /// This replica's name in the audit log (`[audit] node`; default: the host name).
    #[arg(long)]
    node: Option<String>,
    /// The explicit listener's address (`[listen] proxy`).
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// The admin listener's address (`[listen] admin`).
    #[arg(long, value_name = "ADDR")]
    admin: Option<std::net::SocketAddr>,
    /// This replica's audit log (`[audit] path`; `-` for stdout).
    #[arg(long, value_name = "FILE")]
    audit: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create a CA (ECDSA P-256; key written 0600) and print its paths.
    Init {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Recompute each replica's hash chain (logs, with their rotated files FILE.1, FILE.2, …,
    /// or folders of them); exit 1 on a break, or when a witnessed head is missing.
    Verify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Heads a monitoring system kept from `GET /audit/head`, one JSON object a line.
        #[arg(long)]
        witness: Option<PathBuf>,
    },
    /// One self-contained HTML page a person reads: each chain's verdict, the consent
    /// timeline, decisions per feature over time, what was removed and refused, what left
    /// unread. It loads nothing (a Content-Security-Policy forbids it).
    Report {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Heads a monitoring system kept from `GET /audit/head`, one JSON object a line.
        #[arg(long)]
        witness: Option<PathBuf>,
        /// Only records at or after this RFC 3339 time (chains are verified whole).
        #[arg(long)]
        since: Option<String>,
        /// Only records at or before this RFC 3339 time.
        #[arg(long)]
        until: Option<String>,
        /// Write the page here (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Per node, feature and decision counts, and the selectors removed most often.
    Summary {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Only records at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

impl Cli {
    pub fn run(self) -> ExitCode {
        match self
            .command
            .unwrap_or_else(|| Command::Run(RunArgs::default()))
        {
            Command::Run(args) => serve(self.config, self.mattermost_config, args),
            Command::Check { print } => {
                match load(self.config.as_deref(), self.mattermost_config.as_deref()) {
                    Some(c) => {
                        warn_unkeyed(&c);
                        if print {
                            print!("{}", c.effective);
                            println!("\n# Consent in force, and where each value came from:");
                            for line in &c.consent_origin {
                                println!("#   {line}");
                            }
                        } else {
                            println!(
                                "{}: ok ({} features; consent {})",
                                c.source,
                                c.policy.features.len(),
                                c.consent_hash
                            );
                        }
                        ExitCode::SUCCESS
                    }
                    None => ExitCode::from(1),
                }
            }
            Command::Explain {
                url,
                method,
                headers,
                body,
            } => {
                let Some(c) = load(self.config.as_deref(), self.mattermost_config.as_deref())
                else {
                    return ExitCode::from(1);
                };
                match explain_request(url, method, headers, body) {
                    Ok(req) => {
                        print!(
                            "{}",
                            explain::explain(&c.policy, req, c.limits.max_body_bytes)
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::from(2)
                    }
                }
            }
            Command::Ca {
                command: CaCommand::Init { dir },
            } => {
                let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
                if cert.exists() || key.exists() {
                    eprintln!(
                        "error: {} or {} exists already; remove both to create a new CA",
                        cert.display(),
                        key.display()
                    );
                    return ExitCode::from(1);
                }
                match ca::create(&cert, &key) {
                    Ok(()) => {
                        println!(
                            "certificate: {}\nkey (0600): {}",
                            cert.display(),
                            key.display()
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(&e),
                }
            }
            Command::Audit {
                command: AuditCommand::Verify { files, witness },
            } => verify(&files, witness.as_deref()),
            Command::Audit {
                command:
                    AuditCommand::Report {
                        files,
                        witness,
                        since,
                        until,
                        out,
                    },
            } => report(&files, witness.as_deref(), since, until, out),
            Command::Audit {
                command: AuditCommand::Summary { files, since, json },
            } => {
                let since = match rfc3339("--since", since) {
                    Ok(t) => t,
                    Err(code) => return code,
                };
                match audit::summarize(&files, since) {
                    Ok(summary) if json => {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&summary).unwrap_or_default()
                        );
                        ExitCode::SUCCESS
                    }
                    Ok(summary) => {
                        print!("{}", summary_table(&summary));
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: cannot read the audit logs: {e}");
                        ExitCode::from(1)
                    }
                }
            }
        }
    }
}

/// `audit verify`: every chain among `files`, each against the witnessed heads of its node.
/// The heads a `--witness` file holds (none without one); an error is printed.
fn witnessed(witness: Option<&std::path::Path>) -> Result<Vec<audit::Head>, ExitCode> {
    let Some(path) = witness else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        eprintln!("error: cannot read --witness {}: {e}", path.display());
        ExitCode::from(1)
    })?;
    let mut heads = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        match serde_json::from_str(line) {
            Ok(h) => heads.push(h),
            Err(e) => {
                eprintln!(
                    "error: {} line {}: not an /audit/head object: {e}",
                    path.display(),
                    i + 1
                );
                return Err(ExitCode::from(1));
            }
        }
    }
    Ok(heads)
}

/// An RFC 3339 time given as `flag`; an error is printed.
fn rfc3339(flag: &str, value: Option<String>) -> Result<Option<time::OffsetDateTime>, ExitCode> {
    match value
        .as_deref()
        .map(|s| time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339))
    {
        None => Ok(None),
        Some(Ok(t)) => Ok(Some(t)),
        Some(Err(_)) => {
            eprintln!("error: {flag} must be an RFC 3339 time, e.g. 2026-11-28T14:02:00Z");
            Err(ExitCode::from(2))
        }
    }
}

fn report(
    files: &[PathBuf],
    witness: Option<&std::path::Path>,
    since: Option<String>,
    until: Option<String>,
    out: Option<PathBuf>,
) -> ExitCode {
    let (heads, since, until) = match (
        witnessed(witness),
        rfc3339("--since", since),
        rfc3339("--until", until),
    ) {
        (Ok(h), Ok(s), Ok(u)) => (h, s, u),
        (Err(code), ..) | (_, Err(code), _) | (.., Err(code)) => return code,
    };
    let page = match audit::report(files, &heads, audit::Window { since, until }) {
        Ok(page) => page,
        Err(e) => {
            eprintln!("error: cannot read the audit logs: {e}");
            return ExitCode::from(1);
        }
    };
    let written = match &out {
        Some(path) => std::fs::write(path, page),
        None => {
            use std::io::Write as _;
            std::io::stdout().write_all(page.as_bytes())
        }
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let to = out.map_or("standard output".into(), |p| p.display().to_string());
            eprintln!("error: cannot write the report to {to}: {e}");
            ExitCode::from(1)
        }
    }
}

fn verify(files: &[PathBuf], witness: Option<&std::path::Path>) -> ExitCode {
    let heads = match witnessed(witness) {
        Ok(h) => h,
        Err(code) => return code,
    };
    let chains = match audit::chains(files) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: cannot read the audit logs: {e}");
            return ExitCode::from(1);
        }
    };
    let mut bad = 0;
    let mut records = 0;
    let mut recovered = 0;
    let mut nodes = Vec::new();
    for chain in &chains {
        let report = match audit::verify_chain(chain, &heads) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: cannot read {}: {e}", chain.display());
                return ExitCode::from(1);
            }
        };
        let node = report.node.clone().unwrap_or_else(|| "-".into());
        match &report.verdict {
            audit::Verdict::Intact {
                records: n,
                files,
                first_seq,
            } => {
                records += n;
                let from = if *first_seq > 1 {
                    format!(" (from seq {first_seq}; older records were rotated away)")
                } else {
                    String::new()
                };
                println!(
                    "{} (node {node}): intact, {n} records in {files} file(s){from}",
                    chain.display()
                );
            }
            audit::Verdict::Broken {
                file: at,
                line,
                seq,
                reason,
                intact,
            } => {
                bad += 1;
                records += intact;
                let seq = seq.map(|s| s.to_string()).unwrap_or_else(|| "?".into());
                let file = if at == chain {
                    String::new()
                } else {
                    format!(" of {}", at.display())
                };
                println!(
                    "{} (node {node}): {intact} record(s) intact, then broken at line {line}{file} (seq {seq}): {reason}",
                    chain.display(),
                );
            }
        }
        recovered += report.recoveries.len();
        for recovery in &report.recoveries {
            println!("{} (node {node}): recovered at {recovery}", chain.display());
        }
        if let Some(bytes) = report.torn_tail {
            println!(
                "{} (node {node}): ends in an incomplete record of {bytes} bytes (a crash mid-write, not a record; the proxy moves it aside at its next start)",
                chain.display()
            );
        }
        for problem in &report.witness_problems {
            bad += 1;
            println!("{} (node {node}): {problem}", chain.display());
        }
        nodes.push(node);
    }
    for head in heads.iter().filter(|h| !nodes.contains(&h.node)) {
        bad += 1;
        println!(
            "witnessed node {} (seq {}): no chain of it among the files read",
            head.node, head.seq
        );
    }
    nodes.sort();
    nodes.dedup();
    let recovered = match recovered {
        0 => String::new(),
        n => format!(" ({n} recovered record(s): repairs and outages, said in the chain)"),
    };
    println!(
        "{} chain(s) of {} node(s), {records} records: {}{recovered}",
        chains.len(),
        nodes.len(),
        if bad == 0 { "intact" } else { "NOT intact" }
    );
    if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn summary_table(s: &audit::Summary) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} records, {} to {}\n",
        s.records,
        s.first.as_deref().unwrap_or("-"),
        s.last.as_deref().unwrap_or("-")
    );
    if s.nodes.len() > 1 {
        let _ = writeln!(out, "{:<24} {:>8}  first / last record", "node", "records");
        for n in &s.nodes {
            let _ = writeln!(
                out,
                "{:<24} {:>8}  {} / {}",
                n.node,
                n.records,
                n.first.as_deref().unwrap_or("-"),
                n.last.as_deref().unwrap_or("-")
            );
        }
        let _ = writeln!(out, "\nall nodes:");
    }
    let _ = writeln!(out, "{:<24} {:<14} {:>8}", "feature", "decision", "count");
    for (feature, decisions) in &s.decisions {
        for (decision, count) in decisions {
            let _ = writeln!(out, "{feature:<24} {decision:<14} {count:>8}");
        }
    }
    if !s.selectors.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<60} {:>8}",
            "selector removed or replaced", "count"
        );
        for (sel, count) in s.selectors.iter().take(20) {
            let _ = writeln!(out, "{sel:<60} {count:>8}");
        }
    }
    for n in s.nodes.iter().filter(|n| !n.unclassified.is_empty()) {
        let _ = writeln!(
            out,
            "\nunclassified on {} (what the pack does not know):\n{:<20} {:<60} {:>8}  first / last seen",
            n.node, "feature", "name", "records"
        );
        for u in &n.unclassified {
            let _ = writeln!(
                out,
                "{:<20} {:<60} {:>8}  {} / {}",
                u.feature, u.name, u.records, u.first, u.last
            );
        }
    }
    out
}

fn explain_request(
    url: String,
    method: Option<String>,
    headers: Vec<String>,
    body: Option<PathBuf>,
) -> Result<explain::Request, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| format!("--url {url:?} is not a URL"))?;
    if !matches!(uri.scheme_str(), Some("https") | Some("http")) || uri.host().is_none() {
        return Err(format!(
            "--url {url:?} must be an absolute http:// or https:// URL"
        ));
    }
    let body = match body {
        Some(path) => std::fs::read(&path)
            .map_err(|e| format!("cannot read --body {}: {e}", path.display()))?,
        None => Vec::new(),
    };
    let mut map = http::HeaderMap::new();
    for h in &headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| format!("--header {h:?} is not `Name: value`"))?;
        let name = http::HeaderName::from_bytes(k.trim().as_bytes())
            .map_err(|_| format!("--header {k:?} is not a header name"))?;
        let value = http::HeaderValue::from_str(v.trim())
            .map_err(|_| format!("--header value for {k:?} is not valid"))?;
        map.append(name, value);
    }
    if !body.is_empty() && !map.contains_key(http::header::CONTENT_LENGTH) {
        map.insert(http::header::CONTENT_LENGTH, body.len().into());
    }
    let method = method.unwrap_or_else(|| {
        if body.is_empty() {
            "GET".into()
        } else {
            "POST".into()
        }
    });
    Ok(explain::Request {
        method,
        uri,
        headers: map,
        body: body.into(),
    })
}

fn load(path: Option<&std::path::Path>, mattermost: Option<&std::path::Path>) -> Option<Config> {
    match config::load(path, mattermost) {
        Ok(c) => Some(c),
        Err(e) => {
            fail(&e);
            None
        }
    }
}

/// Features a `[consent]` table does not name are denied: say which, since a table written
/// before a pack feature existed turns it off without a word.
fn warn_unkeyed(config: &config::Config) {
    if !config.unkeyed.is_empty() {
        eprintln!(
            "warning: no [consent] key for {}: denied (a feature without a key is denied; add \
             `NAME = \"granted\"` to keep one working)",
            config.unkeyed.join(", ")
        );
    }
}

fn serve(path: Option<PathBuf>, mattermost: Option<PathBuf>, args: RunArgs) -> ExitCode {
    let Some(mut config) = load(path.as_deref(), mattermost.as_deref()) else {
        return ExitCode::from(1);
    };
    warn_unkeyed(&config);
    if let Some(node) = args.node {
        config.node = node;
    }
    if let Some(addr) = args.listen {
        config.listen.proxy = addr;
    }
    if let Some(addr) = args.admin {
        config.listen.admin = Some(addr);
    }
    if let Some(file) = args.audit {
        config.audit = if file.as_os_str() == "-" {
            config::AuditTarget::Stdout
        } else {
            let rotation = match &config.audit {
                config::AuditTarget::File(_, rotation) => *rotation,
                config::AuditTarget::Stdout => None,
            };
            config::AuditTarget::File(file, rotation)
        };
    }
    // Accepting, reloads, the admin listener and the audit log's upkeep: connections are served
    // on worker threads of their own (serve::workers).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    runtime.block_on(async move {
        let ca_cert = config.ca_cert.clone();
        let source = config.source.clone();
        let running = match serve::start(config).await {
            Ok(r) => r,
            Err(e) => return fail(&e),
        };
        let verb = match running.started.ca_origin {
            ca::Origin::Created => "created",
            ca::Origin::Loaded => "loaded",
        };
        eprintln!("consent-proxy: policy {source}");
        eprintln!(
            "consent-proxy: CA {verb}: clients must trust {}",
            ca_cert.display()
        );
        eprintln!(
            "consent-proxy: listening on http://{} (set HTTPS_PROXY to it)",
            running.started.proxy_addr
        );
        if let Some(t) = running.started.transparent_addr {
            eprintln!("consent-proxy: transparent listener on {t} (iptables REDIRECT target)");
        }
        if let Some(admin) = running.started.admin_addr {
            eprintln!("consent-proxy: admin on http://{admin} (/metrics, /healthz, /readyz)");
        }
        wait_for_signal().await;
        eprintln!("consent-proxy: draining (readyz fails; shutting down)");
        running.drain().await;
        eprintln!("consent-proxy: stopped");
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
}

/// Print an error and its causes, one per line.
fn fail(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("error: {e}");
    let mut source = e.source();
    while let Some(cause) = source {
        eprintln!("  caused by: {cause}");
        source = cause.source();
    }
    ExitCode::from(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_log_warnings_only_unless_switched_on() {
        use tracing::Level;
        for (target, level, dependencies, logged) in [
            ("consent_proxy::serve::respond", Level::TRACE, false, true),
            ("consent_proxy", Level::DEBUG, false, true),
            ("h2::server", Level::DEBUG, false, false),
            ("hyper::proto::h1::role", Level::TRACE, false, false),
            ("rustls::server::hs", Level::INFO, false, false),
            ("h2::server", Level::WARN, false, true),
            ("h2::server", Level::DEBUG, true, true),
        ] {
            let cap = dependency_cap(dependencies);
            assert_eq!(cap.would_enable(target, &level), logged, "{target} {level}");
        }
    }
}
