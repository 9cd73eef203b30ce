use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

fn main() -> ExitCode {
    let dependencies = std::env::var_os(consent_proxy::cli::LOG_DEPENDENCIES).is_some();
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_filter(consent_proxy::cli::log_filter(
                    std::env::var("RUST_LOG").ok().as_deref(),
                    dependencies,
                )),
        )
        .init();
    consent_proxy::cli::Cli::parse().run()
}
