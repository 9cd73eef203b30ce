//! The command line (DESIGN §7): serve, check a policy, create a CA, verify an audit log.
//! Exit codes: 0 ok, 1 the checked thing is bad, 2 usage error (clap's own).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::audit;
use crate::ca;
use crate::config::{self, Config};
use crate::explain;
use crate::proxy;

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
    Run,
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
    /// Recompute the hash chain (with rotated files FILE.1, FILE.2, …); exit 1 on a break.
    Verify { file: PathBuf },
    /// Per feature and decision counts, and the selectors removed most often.
    Summary {
        file: PathBuf,
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
        match self.command.unwrap_or(Command::Run) {
            Command::Run => serve(self.config, self.mattermost_config),
            Command::Check { print } => {
                match load(self.config.as_deref(), self.mattermost_config.as_deref()) {
                    Some(c) => {
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
                command: AuditCommand::Verify { file },
            } => match audit::verify(&file) {
                Ok(audit::Verdict::Intact {
                    records,
                    files,
                    first_seq,
                }) => {
                    let from = if first_seq > 1 {
                        format!(" (from seq {first_seq}; older records were rotated away)")
                    } else {
                        String::new()
                    };
                    println!(
                        "{}: intact, {records} records in {files} file(s){from}",
                        file.display()
                    );
                    ExitCode::SUCCESS
                }
                Ok(audit::Verdict::Broken {
                    file: at,
                    line,
                    seq,
                    reason,
                }) => {
                    let seq = seq.map(|s| s.to_string()).unwrap_or_else(|| "?".into());
                    println!(
                        "{}: broken at line {line} (seq {seq}): {reason}",
                        at.display()
                    );
                    ExitCode::from(1)
                }
                Err(e) => {
                    eprintln!("error: cannot read {}: {e}", file.display());
                    ExitCode::from(1)
                }
            },
            Command::Audit {
                command: AuditCommand::Summary { file, since, json },
            } => {
                let since = match since.as_deref().map(|s| {
                    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                }) {
                    None => None,
                    Some(Ok(t)) => Some(t),
                    Some(Err(_)) => {
                        eprintln!(
                            "error: --since must be an RFC 3339 time, e.g. 2026-11-28T14:02:00Z"
                        );
                        return ExitCode::from(2);
                    }
                };
                match audit::summarize(&file, since) {
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
                        eprintln!("error: cannot read {}: {e}", file.display());
                        ExitCode::from(1)
                    }
                }
            }
        }
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

fn serve(path: Option<PathBuf>, mattermost: Option<PathBuf>) -> ExitCode {
    let Some(config) = load(path.as_deref(), mattermost.as_deref()) else {
        return ExitCode::from(1);
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    runtime.block_on(async move {
        let ca_cert = config.ca_cert.clone();
        let source = config.source.clone();
        let running = match proxy::start(config).await {
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
        eprintln!("consent-proxy: shutting down");
        running.shutdown(Duration::from_secs(10)).await;
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
