#!/usr/bin/env bash
# Start consent-proxy for the bench harness: a feature for upstream.test with rules, granted.
# CONSENT_BENCH_TUNNEL=1: no feature for the bench hosts, so every request is a blind tunnel
# (run the harness with CUSTOM_CA=certs/upstream-ca.pem: the client then sees the upstream).
set -euo pipefail
dir=$(mktemp -d /tmp/consent-bench.XXXX)
# The proxy refuses a CA key others can read; the harness's copy may be world-readable.
install -m 0600 "${BENCH_MITM_CA_KEY}" "$dir/ca.key"
cat > "$dir/policy.toml" <<TOML
[listen]
proxy = "127.0.0.1:${BENCH_PROXY_PORT}"
[tls]
ca_cert = "${BENCH_MITM_CA_CERT}"
ca_key = "$dir/ca.key"
[upstream]
roots = "webpki"
extra_ca = ["${BENCH_UPSTREAM_CA}"]
[audit]
path = "$dir/audit.jsonl"
TOML
if [ "${CONSENT_BENCH_TUNNEL:-0}" != 1 ]; then
  cat "$(dirname "$0")/feature.toml" >> "$dir/policy.toml"
fi
exec "${CONSENT_PROXY_BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release/consent-proxy}" run --config "$dir/policy.toml"
