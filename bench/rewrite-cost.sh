#!/usr/bin/env bash
# Instructions one rewrite costs (callgrind; needs valgrind): the benchmark's feature applied to
# its 1 KiB and 256 KiB bodies, as the exchange applies it, without sockets, TLS or the audit log.
# Runs each size N and 2N times and prints the difference over N, so start-up does not count.
#   bench/rewrite-cost.sh [N]     (default 200)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-200}
cargo build --release --example rewrite_cost >&2
bin=target/release/examples/rewrite_cost
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
count() {
  valgrind --tool=callgrind --callgrind-out-file="$out/cg" "$bin" "$1" "$2" >/dev/null 2>&1
  grep '^summary:' "$out/cg" | awk '{print $2}'
}
for size in small large; do
  one=$(count "$size" "$n")
  two=$(count "$size" $((2 * n)))
  echo "$size: $(( (two - one) / n )) instructions a rewrite"
done
