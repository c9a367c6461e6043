#!/usr/bin/env bash
# Handshake-flood benchmark of the gateway, in network namespaces: the
# scenario of tests/security_flood.rs (vpnnat_test_support::handshake_flood)
# with release binaries.
#
#   technician ── gateway (2 data-plane workers) + maintenance server ──┬── 20 router agents (packet mode) ── 20 PCs
#   (pings every NAT address)                                          └── flooder: 4 addresses × 128 UDP source ports
#
# The agents' sessions come up without flood. Then the flooder sends
# mac1-valid WireGuard handshake initiations (built for the gateway's public
# key from random static keys) at 5000/s while every agent reaches
# Rekey-After-Time (120 s) and must rekey through the flood.
#
# Prints the line "handshake flood: ..." with the flood rate achieved, how
# many peers rekeyed within 10 s of Rekey-After-Time (and the median and
# largest delay), how many sessions still pass pings afterwards, the
# gateway's CPU time during the flood (percent of one core), cookie replies
# and drops by reason. Takes about 3 minutes.
#
# Usage: sudo scripts/bench-handshake-flood.sh   (CARGO_TARGET_DIR is honoured)
# Network safety: every address exists only inside the namespaces the
# scenario creates; none has a default route; all are removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "bench-handshake-flood.sh: run as root (network namespaces, TUN devices)" >&2
  exit 1
fi
for p in ip nft ping curl python3; do
  command -v "$p" >/dev/null || { echo "bench-handshake-flood.sh: needs $p (scripts/setup.sh)" >&2; exit 1; }
done

target=${CARGO_TARGET_DIR:-target}
echo "==> building release binaries" >&2
cargo build --release --locked --workspace --bins >&2
cargo test --release --locked --test security_flood --no-run >&2

log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "==> running the scenario (about 3 minutes)" >&2
status=0
CI=1 VPNNAT_BIN_DIR="$target/release" \
  cargo test --release --locked --test security_flood -- --nocapture --test-threads 1 >"$log" 2>&1 || status=$?
grep -E '^\[|^      site|^handshake flood:' "$log" >&2 || true
if ! grep -q '^handshake flood:' "$log"; then
  echo "bench-handshake-flood.sh: the scenario did not finish; its output:" >&2
  cat "$log" >&2
  exit 1
fi
grep '^handshake flood:' "$log"
exit "$status"
