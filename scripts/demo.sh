#!/usr/bin/env bash
# The whole vpnnat system, for real, in network namespaces (the README's first
# command). Installs the prerequisites, builds the three programs, builds the
# world (scripts/world.sh: an internet, a center with the maintenance server,
# two gateways and a technician, seven customer sites that all use
# 192.168.1.0/24: WireGuard, WireGuard over TLS, IPsec by the agent, IPsec by a
# strongSwan router configured by hand, WireGuard by a standard router without
# an agent), plays the mission step by step, prints
# the final table (site, tunnel, LAN address, NAT address, gateway, reached)
# and the failover times, and tears everything down.
#
#   bash scripts/demo.sh [--keep] [--samples N]
#
#   --keep       leave the world running and print how to open the console
#                and reach each PC (tear down: VPNNAT_WORLD=vnd bash scripts/world.sh down)
#   --samples N  button-press → TCP connection samples in the last step (default 20)
#
# Run as root. Network safety: every address lives in the world's namespaces
# (none has a default route); nothing is added to the root namespace.
set -euo pipefail
cd "$(dirname "$0")/.."

case " $* " in *" -h "*|*" --help "*) sed -n '2,18p' "$0"; exit 0 ;; esac
if [ "$(id -u)" -ne 0 ]; then
  echo "demo.sh: run as root (network namespaces, TUN devices)" >&2
  exit 1
fi

bash scripts/setup.sh
echo "demo.sh: building (the first build takes a while)"
cargo build --locked --quiet --workspace --bins
cargo build --locked --quiet --example demo

export VPNNAT_WORLD=vnd
keep=0
for a in "$@"; do [ "$a" = --keep ] && keep=1; done
if [ "$keep" = 0 ]; then
  # Also on Ctrl-C or a failure: the world goes away with everything in it.
  trap 'bash scripts/world.sh down >/dev/null 2>&1 || true' EXIT
fi
trap 'exit 130' INT TERM
target/debug/examples/demo --world "$VPNNAT_WORLD" "$@"
