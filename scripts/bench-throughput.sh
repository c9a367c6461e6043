#!/usr/bin/env bash
# Throughput benchmark of the tunnel data paths (WireGuard, IPsec, TLS), in
# network namespaces.
#
#   technician (iperf3 client) ── [near tunnel end] ══ tunnel ══ [far tunnel end] ── PC (iperf3 server)
#   172.16.0.50                    172.16.0.1 / 198.51.100.1        198.51.100.2 / 192.168.1.1   192.168.1.10
#
# The technician addresses the PC by its NAT address 10.64.0.5; the far end
# maps it 1:1 onto 192.168.1.10 (the router agent in its packet mode; nft
# DNAT/SNAT in front of the stock implementations, as a customer with only a
# standard WireGuard client would do).
#
# Pairs (near ↔ far), measured interleaved, REPS rounds, medians reported:
#   gateway-agent   vpnnat gateway ↔ vpnnat router-agent (packet mode)   [when router-agent has a packet mode]
#   gateway-wggo    vpnnat gateway ↔ wireguard-go
#   wggo-wggo       wireguard-go ↔ wireguard-go (Debian's)
#   boringtun       boringtun-cli ↔ boringtun-cli (`cargo install boringtun-cli` into $CACHE)
#   baseline        gateway ↔ router-agent built from another commit: the binaries in
#                   $BASELINE_BIN (set it to compare a change with its parent in one run)
#   swan-swan       IPsec baseline: strongSwan ↔ strongSwan (scripts/strongswan-peer.sh,
#                   kernel-libipsec: ESP in userspace, in UDP 4500), IKEv2 PSK,
#                   aes256gcm16-prfsha256-x25519 / ESP aes256gcm16; the far end does the
#                   1:1 NAT with nft like the stock WireGuard ones     [when strongSwan is installed]
#   ipsec           gateway ↔ router-agent (packet mode) with the site's tunnel kind IPsec:
#                   IKEv2 PSK, ESP AES-GCM-256 in UDP 4500, both ends userspace; the
#                   parameters the server hands out for site 1 (src/messages/ipsec.rs)
#                   [when router-agent has a packet mode and IPsec; next to swan-swan]
#   tls             gateway ↔ router-agent with the tunnel over TLS on TCP 443 (the fallback)
#   tls-proxy       the same through an HTTP CONNECT proxy (tinyproxy on the router's host)
# Each: iperf3 TCP 1 stream and 4 streams, UDP packet rate (64-byte payloads,
# unlimited offered load, packets received per second), ping RTT.
#
# The last line compares our pair's single-stream TCP median with
# wireguard-go's: "throughput ratio vs wireguard-go: X.XX". Our pair is
# gateway-agent when available, else gateway-wggo (said in the output).
# With swan-swan the output also has "strongSwan single-stream TCP median:
# X Mbit/s", the CPU seconds per Gbit of each charon, and the crypto floor:
# `openssl speed -evp aes-256-gcm -bytes 1420` on one core. With ipsec:
# "IPsec (gateway ↔ agent) single-stream TCP median: X Mbit/s", the CPU
# seconds per Gbit of the gateway and of the agent, and the crypto floor;
# with both, next to the wireguard-go ratio: "throughput ratio vs
# strongSwan: X.XX" (ipsec against swan-swan, single-stream TCP medians).
# With the TLS pairs: "TLS/UDP single-stream ratio: X.XX" (tls against
# gateway-agent) and "TLS via proxy/UDP single-stream ratio: X.XX".
#
# Usage: sudo scripts/bench-throughput.sh   (env: REPS=3 DURATION=10 PAIRS="..." CACHE=...)
#   BASELINE_BIN=DIR adds the pair "baseline" (DIR/gateway, DIR/router-agent,
#   e.g. target/release of a worktree at the parent commit) and ends with the
#   line "throughput ratio vs baseline: X.XX".
#   PERF_DIR=DIR also records `perf record -g` of each end during the
#   single-stream test into DIR/PAIR-ROUND-{near,far}.data (skews its figures).
#   CARGO_TARGET_DIR is honoured for the release binaries.
# Network safety: every address exists only inside the namespaces created
# here; none has a default route; all are removed on exit (trap).
set -euo pipefail
cd "$(dirname "$0")/.."
umask 077

REPS=${REPS:-3}
DURATION=${DURATION:-10}
CACHE=${CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vpnnat-bench}
MTU=1420

if [ "$(id -u)" -ne 0 ]; then
  echo "bench-throughput.sh: run as root (network namespaces, TUN devices)" >&2
  exit 1
fi
for p in ip iperf3 wireguard-go wg nft ping python3; do
  command -v "$p" >/dev/null || { echo "bench-throughput.sh: needs $p (scripts/setup.sh)" >&2; exit 1; }
done

log() { printf '%s\n' "$*" >&2; }

# The release binaries are needed only by the pairs with our gateway.
if [ -n "${PAIRS:-}" ]; then
  needs_build=0
  for p in $PAIRS; do
    case $p in gateway-* | baseline | tls | tls-proxy | ipsec) needs_build=1 ;; esac
  done
  [ "$needs_build" = 1 ] || NO_BUILD=1
fi
have_agent=0
if [ "${NO_BUILD:-0}" = 1 ]; then
  log "==> no pair needs the release binaries; not building them"
elif cargo metadata --no-deps --format-version 1 2>/dev/null | grep -q '"name":"router-agent"' \
   && grep -rqs -- "packet" router-agent/src 2>/dev/null && [ "${NO_AGENT:-0}" != 1 ]; then
  log "==> building release binaries"
  cargo build --release --locked -p gateway -p router-agent >&2
  have_agent=1
else
  log "==> building release binaries"
  cargo build --release --locked -p gateway >&2
fi
GATEWAY=${CARGO_TARGET_DIR:-$PWD/target}/release/gateway
AGENT=${CARGO_TARGET_DIR:-$PWD/target}/release/router-agent

default_pairs="gateway-wggo wggo-wggo boringtun"
[ "$have_agent" = 1 ] && default_pairs="gateway-agent $default_pairs"
# Our IPsec pair, when the agent runs IPsec tunnels: next to strongSwan's.
if [ "$have_agent" = 1 ] && grep -rqs -- "TunnelKind::Ipsec" router-agent/src; then
  default_pairs="$default_pairs ipsec"
fi
SWAN=$PWD/scripts/strongswan-peer.sh
if [ -x /usr/sbin/charon-systemd ] && [ -f /usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so ]; then
  default_pairs="$default_pairs swan-swan"
else
  log "==> strongSwan with kernel-libipsec is not installed: no IPsec baseline (scripts/setup.sh)"
fi
# The TLS fallback pairs, when the agent has the fallback and tinyproxy is there.
if [ "$have_agent" = 1 ] && grep -qs https_proxy router-agent/src/settings.rs \
   && command -v tinyproxy >/dev/null && command -v openssl >/dev/null; then
  default_pairs="gateway-agent tls tls-proxy ${default_pairs#gateway-agent }"
fi
if [ -n "${BASELINE_BIN:-}" ]; then
  for b in gateway router-agent; do
    [ -x "$BASELINE_BIN/$b" ] || { echo "bench-throughput.sh: BASELINE_BIN: no executable $BASELINE_BIN/$b" >&2; exit 1; }
  done
  default_pairs="gateway-agent baseline $default_pairs"
fi
PAIRS=${PAIRS:-$default_pairs}

BORINGTUN=$CACHE/bin/boringtun-cli
if [[ " $PAIRS " == *" boringtun "* ]] && [ ! -x "$BORINGTUN" ]; then
  log "==> cargo install boringtun-cli into $CACHE (once)"
  cargo install --quiet --root "$CACHE" boringtun-cli >&2
fi

tag="vb$$"
C=${tag}c; G=${tag}g; R=${tag}r; S=${tag}s
WORK=$(mktemp -d /tmp/vpnnat-bench.XXXXXX)
RESULTS=$WORK/results.tsv
: > "$RESULTS"

cleanup() {
  set +e
  declare -F stop_swan >/dev/null && stop_swan
  for ns in $C $G $R $S; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
  done
  rm -f /var/run/wireguard/${tag}*.sock
  if [ -z "${KEEP:-}" ]; then rm -rf "$WORK"; else log "kept $WORK"; fi
}
trap cleanup EXIT
trap "exit 143" INT TERM

nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

log "==> namespaces $C $G $R $S"
for ns in $C $G $R $S; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip -n $C link add eth0 type veth peer name lan0 netns $G
ip -n $G link add wan0 type veth peer name wan0 netns $R
ip -n $R link add lan0 type veth peer name eth0 netns $S
ip -n $C addr add 172.16.0.50/24 dev eth0
ip -n $G addr add 172.16.0.1/24 dev lan0
ip -n $G addr add 198.51.100.1/24 dev wan0
ip -n $R addr add 198.51.100.2/24 dev wan0
ip -n $R addr add 192.168.1.1/24 dev lan0
ip -n $S addr add 192.168.1.10/24 dev eth0
ip -n $C link set eth0 up; ip -n $G link set lan0 up; ip -n $G link set wan0 up
ip -n $R link set wan0 up; ip -n $R link set lan0 up; ip -n $S link set eth0 up
ip -n $C route add 10.64.0.0/16 via 172.16.0.1
ip -n $S route add 172.16.0.0/24 via 192.168.1.1
nsx $G sysctl -qw net.ipv4.ip_forward=1
nsx $R sysctl -qw net.ipv4.ip_forward=1
nsx $S iperf3 -s -D --pidfile "$WORK/iperf3.pid" >/dev/null

keyfile() { local f=$WORK/$1.key; [ -f "$f" ] || wg genkey > "$f"; echo "$f"; }
pub() { wg pubkey < "$(keyfile "$1")"; }

# A stock userspace implementation ($1 = wireguard-go | boringtun) as the far
# end: interface, peer = near end, NAT address 10.64.0.5 mapped onto the PC.
far_stock() {
  local impl=$1 ifc=${tag}f
  start_stock "$R" "$impl" "$ifc"
  nsx $R wg set "$ifc" private-key "$(keyfile far)" listen-port 51821 \
    peer "$(pub near)" endpoint 198.51.100.1:51820 allowed-ips 172.16.0.0/24 persistent-keepalive 25
  ip -n $R addr add 10.64.0.5/32 dev "$ifc"
  ip -n $R link set "$ifc" mtu $MTU up
  ip -n $R route add 172.16.0.0/24 dev "$ifc"
  nsx $R nft -f - <<EOF
table ip bench {
  chain pre { type nat hook prerouting priority -100; iifname "$ifc" ip daddr 10.64.0.5 dnat to 192.168.1.10; }
  chain post { type nat hook postrouting priority 100; oifname "$ifc" ip saddr 192.168.1.10 snat to 10.64.0.5; }
}
EOF
}

near_stock() {
  local impl=$1 ifc=${tag}n
  start_stock "$G" "$impl" "$ifc"
  nsx $G wg set "$ifc" private-key "$(keyfile near)" listen-port 51820 \
    peer "$(pub far)" endpoint 198.51.100.2:51821 allowed-ips 10.64.0.0/16
  ip -n $G link set "$ifc" mtu $MTU up
  ip -n $G route add 10.64.0.0/16 dev "$ifc"
}

start_stock() {
  local ns=$1 impl=$2 ifc=$3
  case $impl in
    wireguard-go) nsx "$ns" env WG_PROCESS_FOREGROUND=1 wireguard-go "$ifc" >"$WORK/$ifc.log" 2>&1 & ;;
    boringtun) nsx "$ns" env WG_LOG_LEVEL=error "$BORINGTUN" --foreground --disable-drop-privileges "$ifc" >"$WORK/$ifc.log" 2>&1 & ;;
  esac
  for _ in $(seq 100); do ip -n "$ns" link show "$ifc" >/dev/null 2>&1 && [ -S "/var/run/wireguard/$ifc.sock" ] && return 0; sleep 0.05; done
  log "$impl did not create $ifc"; cat "$WORK/$ifc.log" >&2; return 1
}

near_gateway() {
  cat > "$WORK/gateway.toml" <<EOF
[wireguard]
listen = "198.51.100.1:51820"
private_key_file = "$(keyfile near)"
[center]
tun_name = "${tag}gw"
tun_mtu = $MTU
interface = "lan0"
[metrics]
listen = "127.0.0.1:9101"
EOF
  local extra
  for extra in "$WORK/gateway-tls.toml" "$WORK/gateway-ipsec.toml"; do
    [ ! -f "$extra" ] || cat "$extra" >> "$WORK/gateway.toml"
  done
  cat > "$WORK/peers.json" <<EOF
{"version":1,"gateway_id":1,"peers":[{"site_id":1,"public_key":"$(pub far)","nat_addresses":["10.64.0.5"]${TLS_PEER_EXTRA:-}${IPSEC_PEER_EXTRA:-}}]}
EOF
  nsx $G env RUST_LOG=warn "${1:-$GATEWAY}" --config "$WORK/gateway.toml" --peers "$WORK/peers.json" >"$WORK/gateway.log" 2>&1 &
  for _ in $(seq 100); do nsx $G curl -sf http://127.0.0.1:9101/healthz >/dev/null 2>&1 && return 0; sleep 0.05; done
  log "gateway did not start"; cat "$WORK/gateway.log" >&2; return 1
}

far_agent() {
  # The router agent's standalone packet mode: a static desired
  # state instead of a server, LAN 192.168.1.0/24, the PC named pc-1.
  # A WireGuard tunnel unless AGENT_TUNNEL_KIND and AGENT_ENDPOINT say
  # otherwise (ipsec_pair).
  cat > "$WORK/agent.json" <<EOF
{"version":1,"site_id":1,"tunnel":{"gateway_id":1,"kind":"${AGENT_TUNNEL_KIND:-wireguard}","endpoint":"${AGENT_ENDPOINT:-198.51.100.1:51820}","public_key":"$(pub near)","persistent_keepalive_s":25${TLS_AGENT_EXTRA:-}${IPSEC_AGENT_EXTRA:-}},"mappings":[{"nat_address":"10.64.0.5","terminal":"pc-1","request_id":1,"expires_at":4102444800000}]}
EOF
  echo "192.168.1.10 pc-1" > "$WORK/hosts"
  # Everything the agent writes stays in $WORK; no resolver, no link watch.
  mkdir -p "$WORK/agent-state"
  cat > "$WORK/agent.toml" <<EOF
[agent]
state_dir = "$WORK/agent-state"
mode = "packet"
[lan]
interface = "lan0"
allowed_prefixes = ["192.168.1.0/24"]
dns = false
[packet]
tun_name = "${tag}ag"
tun_mtu = $MTU
center_prefixes = ["172.16.0.0/24"]
[web]
listen = "127.0.0.1:8088"
password = "bench-password-not-used"
[failures]
link_watch = false
EOF
  [ ! -f "$WORK/agent-tls.toml" ] || cat "$WORK/agent-tls.toml" >> "$WORK/agent.toml"
  nsx $R env RUST_LOG=warn "${1:-$AGENT}" --config "$WORK/agent.toml" --mode packet \
    --private-key-file "$(keyfile far)" --desired "$WORK/agent.json" --hosts "$WORK/hosts" \
    >"$WORK/agent.log" 2>&1 &
  for _ in $(seq 100); do nsx $R curl -sf http://127.0.0.1:8088/healthz >/dev/null 2>&1 && return 0; sleep 0.05; done
  log "router-agent did not start"; cat "$WORK/agent.log" >&2; return 1
}

# strongSwan ↔ strongSwan: the near end answers for the center LAN, the far
# end initiates for the NAT address 10.64.0.5 (on its lo: charon needs an
# address inside its local traffic selector) and maps it onto the PC.
swan_opts=(--psk bench-psk-0123456789abcdef0123456789 --loglevel 0
  --ike-proposals aes256gcm16-prfsha256-x25519 --esp-proposals aes256gcm16-noesn)
# A failed start says why (swanctl's output and charon's log; the cleanup
# removes the runtime directory).
swan_failed() { # $1 = near | far
  log "strongSwan ($1) did not come up:"
  cat "$WORK/swan-$1.out" "$WORK/swan-$1/charon.log" >&2 2>/dev/null || true
  return 1
}
near_swan() {
  "$SWAN" start --ns $G --dir "$WORK/swan-near" --local 198.51.100.1 --remote 198.51.100.2 \
    --local-ts 172.16.0.0/24 --remote-ts 10.64.0.5/32 "${swan_opts[@]}" >"$WORK/swan-near.out" 2>&1 \
    || swan_failed near
}
far_swan() {
  ip -n $R addr add 10.64.0.5/32 dev lo
  nsx $R nft -f - <<EOF
table ip bench {
  chain pre { type nat hook prerouting priority -100; iifname "ipsec0" ip daddr 10.64.0.5 dnat to 192.168.1.10; }
  chain post { type nat hook postrouting priority 100; oifname "ipsec0" ip saddr 192.168.1.10 snat to 10.64.0.5; }
}
EOF
  "$SWAN" start --ns $R --dir "$WORK/swan-far" --local 198.51.100.2 --remote 198.51.100.1 \
    --local-ts 10.64.0.5/32 --remote-ts 172.16.0.0/24 --role initiator "${swan_opts[@]}" >"$WORK/swan-far.out" 2>&1 \
    || swan_failed far
}
stop_swan() {
  [ ! -d "$WORK/swan-near" ] || "$SWAN" stop --ns $G --dir "$WORK/swan-near" >/dev/null 2>&1 || true
  [ ! -d "$WORK/swan-far" ] || "$SWAN" stop --ns $R --dir "$WORK/swan-far" >/dev/null 2>&1 || true
  ip -n $R addr del 10.64.0.5/32 dev lo 2>/dev/null || true
}

# ---- TLS fallback: gateway ↔ agent with the tunnel over TLS (TCP 443), and
# through an HTTP CONNECT proxy (tinyproxy on 127.0.0.1:8888 in the router's
# namespace, CONNECT only to 443). The gateway generates its certificate at
# its first start; the agent gets the pin (SHA-256 of the certificate's
# SubjectPublicKeyInfo) and a token whose SHA-256 the gateway holds, as the
# server hands them out.
TLS_TOKEN=bench-tls-token-not-secret

# Before near_gateway: the gateway's TLS listener and the peer's token hash.
tls_gateway_config() {
  local th
  th=$(printf %s "$TLS_TOKEN" | sha256sum | cut -d' ' -f1)
  cat > "$WORK/gateway-tls.toml" <<EOF
[tls]
listen = "198.51.100.1:443"
endpoints = ["198.51.100.1:443"]
certificate_file = "$WORK/tls.crt"
key_file = "$WORK/tls.key"
EOF
  TLS_PEER_EXTRA=",\"tls_token_sha256\":\"$th\""
}

# After near_gateway (the certificate exists): the agent's pin and token,
# its transport, and for tls-proxy the proxy.
tls_agent_config() { # $1 = tls | tls-proxy
  local pin proxy=""
  pin=$(openssl x509 -in "$WORK/tls.crt" -pubkey -noout | openssl pkey -pubin -outform der | sha256sum | cut -d' ' -f1)
  TLS_AGENT_EXTRA=",\"tls\":{\"endpoint\":\"198.51.100.1:443\",\"spki_sha256\":\"$pin\",\"token\":\"$TLS_TOKEN\"}"
  if [ "$1" = tls-proxy ]; then
    cat > "$WORK/tinyproxy.conf" <<EOF
Port 8888
Listen 127.0.0.1
Timeout 600
MaxClients 20
PidFile "$WORK/tinyproxy.pid"
LogFile "$WORK/tinyproxy.log"
LogLevel Connect
Allow 127.0.0.1
ConnectPort 443
EOF
    rm -f "$WORK/tinyproxy.pid"
    nsx $R tinyproxy -d -c "$WORK/tinyproxy.conf" >"$WORK/tinyproxy.out" 2>&1 &
    for _ in $(seq 100); do nsx $R bash -c '</dev/tcp/127.0.0.1/8888' 2>/dev/null && break; sleep 0.05; done
    proxy='https_proxy = "http://127.0.0.1:8888"'
  fi
  printf '[tunnel]\ntransport = "tls"\n%s\n' "$proxy" > "$WORK/agent-tls.toml"
}

tls_pair() { # $1 = tls | tls-proxy
  tls_gateway_config
  near_gateway
  tls_agent_config "$1"
  far_agent
  TLS_PEER_EXTRA=""; TLS_AGENT_EXTRA=""
  rm -f "$WORK/gateway-tls.toml" "$WORK/agent-tls.toml"
}

# ---- IPsec: gateway ↔ agent with the site's tunnel kind IPsec (IKEv2 with
# a pre-shared key, ESP AES-GCM-256 in UDP 4500; both ends userspace). The
# parameters the server hands out for site 1 (src/messages/ipsec.rs:
# IKE_PROPOSAL, ESP_PROPOSAL, gateway_identity, site_identity), `local_*`
# being the side that receives them. The agent is handed the gateway's IKE
# port 500 and sends everything to its 4500 (RFC 7296 §2.23 lets an initiator
# start there). The key is the text of base64 of
# 32 random bytes (IpsecParams::validate wants at least 32).
IPSEC_PSK=$(head -c32 /dev/urandom | base64 -w0)
IPSEC_GW_ID=gw-1.vpnnat
IPSEC_SITE_ID=site-1.vpnnat
ipsec_params() { # $1 local_id, $2 remote_id, $3 local_ts, $4 remote_ts
  printf '{"psk":"%s","local_id":"%s","remote_id":"%s","ike_proposal":"%s","esp_proposal":"%s","local_ts":["%s"],"remote_ts":["%s"]}' \
    "$IPSEC_PSK" "$1" "$2" aes256gcm16-prfsha256-x25519-modp2048 aes256gcm16-x25519-modp2048 "$3" "$4"
}

ipsec_pair() {
  cat > "$WORK/gateway-ipsec.toml" <<EOF
[ipsec]
ike_listen = "198.51.100.1:500"
nat_t_listen = "198.51.100.1:4500"
EOF
  IPSEC_PEER_EXTRA=",\"tunnel\":\"ipsec\",\"ipsec\":$(ipsec_params "$IPSEC_GW_ID" "$IPSEC_SITE_ID" 172.16.0.0/24 10.64.0.5/32)"
  near_gateway
  AGENT_TUNNEL_KIND=ipsec AGENT_ENDPOINT=198.51.100.1:500
  IPSEC_AGENT_EXTRA=",\"ipsec\":$(ipsec_params "$IPSEC_SITE_ID" "$IPSEC_GW_ID" 10.64.0.5/32 172.16.0.0/24)"
  far_agent
  IPSEC_PEER_EXTRA=""; IPSEC_AGENT_EXTRA=""; AGENT_TUNNEL_KIND=""; AGENT_ENDPOINT=""
  rm -f "$WORK/gateway-ipsec.toml"
}

stop_pair() {
  stop_swan
  for ns in $G $R; do
    for pid in $(ip netns pids "$ns"); do kill "$pid" 2>/dev/null || true; done
  done
  sleep 0.3
  for ns in $G $R; do
    for pid in $(ip netns pids "$ns"); do kill -9 "$pid" 2>/dev/null || true; done
    nsx "$ns" nft delete table ip bench 2>/dev/null || true
  done
  ip -n $G route del 10.64.0.0/16 2>/dev/null || true
  sleep 0.2
}

start_pair() {
  case $1 in
    gateway-agent) near_gateway; far_agent ;;
    baseline) near_gateway "$BASELINE_BIN/gateway"; far_agent "$BASELINE_BIN/router-agent" ;;
    gateway-wggo) near_gateway; far_stock wireguard-go ;;
    wggo-wggo) near_stock wireguard-go; far_stock wireguard-go ;;
    boringtun) near_stock boringtun; far_stock boringtun ;;
    swan-swan) near_swan; far_swan ;;
    tls | tls-proxy) tls_pair "$1" ;;
    ipsec) ipsec_pair ;;
    *) log "unknown pair $1"; return 1 ;;
  esac
  for _ in $(seq 100); do nsx $C ping -c 1 -W 1 10.64.0.5 >/dev/null 2>&1 && return 0; sleep 0.1; done
  log "pair $1: no path to 10.64.0.5"; return 1
}

# iperf3 JSON → one number.
# A figure out of iperf3's JSON; "nan" (left out of the medians) when a run
# gave none, e.g. a connection refused under load: one failed run must not
# lose the others.
json() {
  python3 -c "
import json, sys
d = None
try:
    d = json.load(sys.stdin)
    print($1)
except (ValueError, KeyError, TypeError, ZeroDivisionError) as e:
    print('nan')
    print('bench-throughput.sh: no figure from iperf3:', d.get('error', e) if isinstance(d, dict) else e, file=sys.stderr)
" || echo nan
}

# CPU time (clock ticks) of every process in a namespace so far.
cpu_ticks() {
  local t=0 pid
  for pid in $(ip netns pids "$1"); do
    t=$((t + $(awk '{print $14+$15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
  done
  echo $t
}

# CPU time (clock ticks) of the whole machine so far: busy (all but idle and
# iowait) and, of that, softirq (the kernel's packet processing: veth, TCP,
# forwarding, UDP; accounted apart from the processes with IRQ time accounting).
busy_ticks() { awk '/^cpu / {print $2+$3+$4+$7+$8+$9}' /proc/stat; }
softirq_ticks() { awk '/^cpu / {print $8}' /proc/stat; }

measure() {
  local pair=$1 rep=$2 v g0 r0 m0 q0 t0 g1 r1 m1 q1 t1 hz
  hz=$(getconf CLK_TCK)
  local perf_pids=()
  if [ -n "${PERF_DIR:-}" ]; then
    # Profile each end during the single-stream test (perf record -g).
    mkdir -p "$PERF_DIR"
    local end ns pids
    for end in near far; do
      ns=$G; [ $end = far ] && ns=$R
      pids=$(ip netns pids "$ns" | paste -sd, -)
      perf record -q -g -p "$pids" -o "$PERF_DIR/$pair-$rep-$end.data" -- sleep "$((DURATION + 1))" \
        >/dev/null 2>&1 &
      perf_pids+=($!)
    done
  fi
  g0=$(cpu_ticks $G); r0=$(cpu_ticks $R); m0=$(busy_ticks); q0=$(softirq_ticks); t0=$(date +%s.%N)
  nsx $C iperf3 -c 10.64.0.5 -t "$DURATION" -O 1 -J > "$WORK/tcp1.json"
  g1=$(cpu_ticks $G); r1=$(cpu_ticks $R); m1=$(busy_ticks); q1=$(softirq_ticks); t1=$(date +%s.%N)
  [ ${#perf_pids[@]} -eq 0 ] || wait "${perf_pids[@]}" || true
  v=$(json "d['end']['sum_received']['bits_per_second']/1e6" < "$WORK/tcp1.json")
  printf '%s\t%s\ttcp1_mbit\t%s\n' "$pair" "$rep" "$v" >> "$RESULTS"
  # The rest of the 2-core budget: iperf3 client and server (as iperf3 reports
  # them; the kernel's forwarding runs mostly in their send/receive calls) and
  # the whole machine (other processes included).
  printf '%s\t%s\tclient_cpu_pct\t%s\n' "$pair" "$rep" \
    "$(json "d['end']['cpu_utilization_percent']['host_total']" < "$WORK/tcp1.json")" >> "$RESULTS"
  printf '%s\t%s\tserver_cpu_pct\t%s\n' "$pair" "$rep" \
    "$(json "d['end']['cpu_utilization_percent']['remote_total']" < "$WORK/tcp1.json")" >> "$RESULTS"
  printf '%s\t%s\tmachine_busy_pct\t%s\n' "$pair" "$rep" \
    "$(python3 -c "print(($m1-$m0)/$hz/($t1-$t0)*100)")" >> "$RESULTS"
  printf '%s\t%s\tsoftirq_pct\t%s\n' "$pair" "$rep" \
    "$(python3 -c "print(($q1-$q0)/$hz/($t1-$t0)*100)")" >> "$RESULTS"
  # CPU use of the tunnel ends during the single-stream test (100 % = one core).
  printf '%s\t%s\tnear_cpu_pct\t%s\n' "$pair" "$rep" \
    "$(python3 -c "print(($g1-$g0)/$hz/($t1-$t0)*100)")" >> "$RESULTS"
  printf '%s\t%s\tfar_cpu_pct\t%s\n' "$pair" "$rep" \
    "$(python3 -c "print(($r1-$r0)/$hz/($t1-$t0)*100)")" >> "$RESULTS"
  v=$(nsx $C iperf3 -c 10.64.0.5 -t "$DURATION" -O 1 -P 4 -J | json "d['end']['sum_received']['bits_per_second']/1e6")
  printf '%s\t%s\ttcp4_mbit\t%s\n' "$pair" "$rep" "$v" >> "$RESULTS"
  v=$(nsx $C iperf3 -c 10.64.0.5 -t "$DURATION" -u -b 0 -l 64 -J \
      | json "(d['end']['sum']['packets']-d['end']['sum']['lost_packets'])/d['end']['sum']['seconds']/1e3")
  printf '%s\t%s\tudp64_kpps\t%s\n' "$pair" "$rep" "$v" >> "$RESULTS"
  v=$(nsx $C ping -c 50 -i 0.02 -q 10.64.0.5 | awk -F/ '/^rtt/ {print $5*1000}')
  printf '%s\t%s\tping_us\t%s\n' "$pair" "$rep" "$v" >> "$RESULTS"
  log "    $(awk -F'\t' -v p="$pair" -v r="$rep" '$1==p && $2==r {printf "%s=%.1f ", $3, $4}' "$RESULTS")"
}

# The crypto floor of the IPsec pairs: AES-256-GCM on one core at the size of
# a full tunnel packet.
if [[ " $PAIRS " == *" swan-swan "* || " $PAIRS " == *" ipsec "* ]] && command -v openssl >/dev/null; then
  log "==> crypto floor: openssl speed -evp aes-256-gcm -bytes 1420 (one core)"
  openssl speed -evp aes-256-gcm -bytes 1420 -seconds 3 2>/dev/null \
    | awk 'tolower($1) == "aes-256-gcm" {v = $NF; sub(/k$/, "", v); print v * 1000 * 8 / 1e6}' \
    > "$WORK/aes_gcm_mbit"
fi

for rep in $(seq "$REPS"); do
  for pair in $PAIRS; do
    log "==> round $rep/$REPS: $pair"
    start_pair "$pair"
    measure "$pair" "$rep"
    stop_pair
  done
done

python3 - "$RESULTS" "$PAIRS" "$REPS" "$DURATION" "$WORK/aes_gcm_mbit" <<'EOF'
import math, statistics, sys
from collections import defaultdict
path, pairs, reps, duration = sys.argv[1], sys.argv[2].split(), sys.argv[3], sys.argv[4]
vals = defaultdict(list)
for line in open(path):
    pair, rep, metric, v = line.rstrip("\n").split("\t")
    if not math.isnan(float(v)):
        vals[(pair, metric)].append(float(v))
metrics = [("tcp1_mbit", "TCP 1 stream Mbit/s"), ("tcp4_mbit", "TCP 4 streams Mbit/s"),
           ("udp64_kpps", "UDP 64 B kpps rcvd"), ("ping_us", "ping RTT µs"),
           ("near_cpu_pct", "near end CPU % (TCP 1)"), ("far_cpu_pct", "far end CPU % (TCP 1)"),
           ("client_cpu_pct", "iperf3 client CPU %"), ("server_cpu_pct", "iperf3 server CPU %"),
           ("softirq_pct", "softirq CPU %"), ("machine_busy_pct", "machine busy % (all cores)"),
           ("near_cpu_per_gbit", "near end CPU % per Gbit/s"), ("far_cpu_per_gbit", "far end CPU % per Gbit/s")]
med = {k: statistics.median(v) for k, v in vals.items()}
for p in pairs:
    # Efficiency of each end, independent of which end limits the pair.
    for end in ("near", "far"):
        cpu, mbit = med.get((p, f"{end}_cpu_pct")), med.get((p, "tcp1_mbit"))
        if cpu is not None and mbit:
            med[(p, f"{end}_cpu_per_gbit")] = cpu / (mbit / 1000)
print(f"median of {reps} interleaved rounds, {duration} s each")
print(f"| pair | " + " | ".join(m[1] for m in metrics) + " |")
print("|---|" + "---|" * len(metrics))
for p in pairs:
    print(f"| {p} | " + " | ".join(f"{med.get((p, m[0]), float('nan')):.0f}" for m in metrics) + " |")
ours = "gateway-agent" if "gateway-agent" in pairs else "gateway-wggo"
base = med.get(("wggo-wggo", "tcp1_mbit"))
mine = med.get((ours, "tcp1_mbit"))
if base and mine:
    print(f"ours = {ours}")
    print(f"throughput ratio vs wireguard-go: {mine / base:.2f}")
ipsec = med.get(("ipsec", "tcp1_mbit"))
swan = med.get(("swan-swan", "tcp1_mbit"))
if ipsec and swan:
    print(f"throughput ratio vs strongSwan: {ipsec / swan:.2f}")
old = med.get(("baseline", "tcp1_mbit"))
now = med.get(("gateway-agent", "tcp1_mbit"))
if old and now:
    print(f"throughput ratio vs baseline: {now / old:.2f}")
def cpu_s_per_gbit(pair):
    # % of one core per Gbit/s, / 100 = CPU seconds per Gbit moved.
    return {end: med.get((pair, f"{end}_cpu_per_gbit"), float("nan")) / 100 for end in ("near", "far")}
if swan:
    cpu = cpu_s_per_gbit("swan-swan")
    print(f"IPsec baseline (strongSwan ↔ strongSwan, kernel-libipsec): TCP 4 streams median "
          f"{med.get(('swan-swan', 'tcp4_mbit'), float('nan')):.0f} Mbit/s; CPU per Gbit "
          f"(single stream): near charon {cpu['near']:.2f} s, far charon {cpu['far']:.2f} s")
if ipsec:
    cpu = cpu_s_per_gbit("ipsec")
    print(f"IPsec (gateway ↔ agent, userspace IKEv2/ESP): TCP 4 streams median "
          f"{med.get(('ipsec', 'tcp4_mbit'), float('nan')):.0f} Mbit/s; CPU per Gbit "
          f"(single stream): gateway {cpu['near']:.2f} s, router-agent {cpu['far']:.2f} s")
if swan or ipsec:
    try:
        floor = float(open(sys.argv[5]).read())
        print(f"crypto floor (openssl speed -evp aes-256-gcm -bytes 1420, one core): {floor:.0f} Mbit/s")
    except (OSError, ValueError):
        pass
if swan:
    print(f"strongSwan single-stream TCP median: {swan:.0f} Mbit/s")
if ipsec:
    print(f"IPsec (gateway ↔ agent) single-stream TCP median: {ipsec:.0f} Mbit/s")
for pair, label in (("tls", "TLS"), ("tls-proxy", "TLS via proxy")):
    t = med.get((pair, "tcp1_mbit"))
    if t and now:
        print(f"{label}/UDP single-stream ratio: {t / now:.2f}")
EOF
