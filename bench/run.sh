#!/usr/bin/env bash
# consent-proxy against a direct connection, in one run, on loopback: builds the proxy and the
# benchmark (examples/bench.rs), starts a fake HTTPS upstream, then per scenario the proxy and a
# closed-loop load generator. See README "Performance".
#
#   bench/run.sh                         every scenario, 10 s each
#   bench/run.sh --runs 3 small-c16      median of 3 runs of one scenario
#
# Peers (Squid, mitmproxy, hudsucker) are measured with the shared harness (../shared/bench),
# which runs this proxy through bench/start-consent-proxy.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin consent-proxy --example bench
exec target/release/examples/bench "$@"
