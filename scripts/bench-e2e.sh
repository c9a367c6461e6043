#!/usr/bin/env bash
# Button press → the technician's first successful TCP connection, end to end:
# plays the whole mission in the namespace world and takes
# SAMPLES measurements in its last step. Each sample is a new request on a
# site without a tunnel: the server allocates, the gateway and the agent get
# their desired state by long-poll, the agent dials (WireGuard handshake), the
# gateway answers ARP for the new NAT address, and a technician's connect()
# loop (5 ms between tries) succeeds.
#
#   sudo scripts/bench-e2e.sh            (env: SAMPLES=20)
#
# Prints the mission's narrative, then one Markdown table row for
# docs/BENCHMARKS.md. Debug builds, as the demo (the latency is dominated by
# protocol round trips, not by CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
SAMPLES=${SAMPLES:-20}
if [ "$(id -u)" -ne 0 ]; then
  echo "bench-e2e.sh: run as root (network namespaces, TUN devices)" >&2
  exit 1
fi
cargo build --locked --quiet --workspace --bins
cargo build --locked --quiet --example demo
export VPNNAT_WORLD=vnb$$
trap 'bash scripts/world.sh down >/dev/null 2>&1 || true' EXIT
out=$(mktemp)
target/debug/examples/demo --world "$VPNNAT_WORLD" --samples "$SAMPLES" | tee "$out"
line=$(grep '^button → first TCP connection' "$out")
p50=$(sed -E 's/.*p50 ([0-9]+) ms.*/\1/' <<<"$line")
p99=$(sed -E 's/.*p99 ([0-9]+) ms.*/\1/' <<<"$line")
rm -f "$out"
echo
echo "| $(date +%F) | $SAMPLES | $p50 | $p99 | $(cut -d' ' -f1-3 /proc/loadavg) |"
