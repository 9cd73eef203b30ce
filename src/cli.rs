//! The command line (DESIGN §7): serve, check a policy, create a CA, verify an audit log.
//! Exit codes: 0 ok, 1 the checked thing is bad, 2 usage error (clap's own).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::audit;
use crate::ca;
use crate::config::{self, Config};
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
    /// Recompute the hash chain; exit 1 on a break.
    Verify { file: PathBuf },
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
                Ok(audit::Verdict::Intact { records }) => {
                    println!("{}: intact, {records} records", file.display());
                    ExitCode::SUCCESS
                }
                Ok(audit::Verdict::Broken { line, seq, reason }) => {
                    let seq = seq.map(|s| s.to_string()).unwrap_or_else(|| "?".into());
                    println!(
                        "{}: broken at line {line} (seq {seq}): {reason}",
                        file.display()
                    );
                    ExitCode::from(1)
                }
                Err(e) => {
                    eprintln!("error: cannot read {}: {e}", file.display());
                    ExitCode::from(1)
                }
            },
        }
    }
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
