#!/usr/bin/env bash
# strongswan-peer.sh — one strongSwan IKEv2 peer (charon) inside a network
# namespace, the independent IPsec implementation vpnnat is tested against.
#
# ESP runs in userspace (the kernel-libipsec plugin, TUN device "ipsec0"), so
# no kernel ESP transform is needed. charon-systemd is started directly, with
# no systemd: it writes no pid file (the classic /usr/lib/ipsec/charon insists
# on /var/run/charon.pid, so two of them collide). Every peer has its own
# runtime directory: strongswan.conf, swanctl.conf, log, vici socket, pid.
#
# Facts about strongSwan 5.9.8 (Debian 12) that shape a test against it:
#  * kernel-libipsec must be loaded before kernel-netlink: the first plugin
#    that registers a kernel-ipsec interface handles SAs and policies;
#    kernel-netlink then only does addresses and routes (table 220, rule
#    "from all lookup 220", routes via ipsec0 with the local TS address as src).
#  * libipsec in 5.9.8 cannot send raw ESP (IP protocol 50): charon fakes a NAT
#    ("faking NAT situation to enforce UDP encapsulation"), moves IKE to the
#    NAT-T port after IKE_SA_INIT and sends ESP in UDP (RFC 3948), whatever
#    --encap says. A peer that sends no NAT_DETECTION_* notifies (RFC 7296
#    §2.23) gets its CHILD_SA refused with NO_PROPOSAL_CHOSEN.
#  * The local traffic selector needs an address of the namespace inside it
#    (e.g. a /32 on lo): charon uses it as the source of the route.
#  * swanctl proposal lists are strict: only what is listed is offered or
#    accepted. The initiator's KE is for the first DH group of its first
#    proposal.
#
# The connection is named "peer", its child "net". Needs root,
# charon-systemd, swanctl and the kernel-libipsec plugin (scripts/setup.sh).
set -euo pipefail

PROG=$(basename "$0")
PLUGINS=/usr/lib/ipsec/plugins

usage() {
  cat <<EOF
usage:
  $PROG start    --ns NS --local IP --remote IP|%any --psk SECRET \\
                 --local-ts CIDR[,CIDR] --remote-ts CIDR[,CIDR] [options]
  $PROG initiate --ns NS [--timeout S]   initiate the CHILD_SA (and IKE_SA)
  $PROG wait     --ns NS [--timeout S]   wait until a CHILD_SA is INSTALLED
  $PROG rekey    --ns NS [--ike]         rekey the CHILD_SA (--ike: the IKE_SA)
  $PROG status   --ns NS [--raw]         swanctl --list-sas (--raw: vici form)
  $PROG swanctl  --ns NS -- ARGS...      any swanctl command against this peer
  $PROG log      --ns NS                 print charon's log
  $PROG pid      --ns NS                 print charon's process id
  $PROG stop     --ns NS                 stop charon, remove ipsec0, its routes
                                         and rule, and the runtime directory
  Every command takes --dir DIR [/tmp/strongswan-peer/NS] (the runtime dir).

start options [defaults]:
  --role initiator|responder  [responder] initiator: initiate after start,
                              exit non-zero if the CHILD_SA does not come up
  --ike-proposals LIST        [aes256gcm16-prfsha256-x25519,aes256gcm16-prfsha256-modp2048]
                              strongSwan syntax; "default" = strongSwan's own
  --esp-proposals LIST        [aes256gcm16-noesn]  add a DH group
                              (aes256gcm16-x25519-noesn) for PFS on CHILD rekey
  --local-id ID               [the --local IP]
  --remote-id ID              [the --remote IP; %any if --remote is %any]
  --port N / --natt-port N    [500 / 4500]  local IKE ports
  --remote-port N             [500]  the peer's IKE port
  --encap yes|no              [no]   no effect with 5.9.8's libipsec (always UDP)
  --dpd S                     [30s]  dpd_delay: liveness check after S of
                              inbound silence (0 = off)
  --dpd-action clear|trap|restart [clear]  child dpd_action / close_action
  --ike-rekey S               [4h]   IKE_SA rekey_time
  --child-rekey S             [1h]   CHILD_SA rekey_time
  --rand-time S               [strongSwan's: 10% of rekey_time] rekey jitter
                              of IKE and CHILD SA; 0 for exact rekey times
  --child-rekey-packets N     [0 = off] CHILD_SA rekey_packets
  --replay-window N           [32]   CHILD_SA replay_window
  --retransmit-tries N        [5]    give up after N retransmissions
  --retransmit-timeout S      [4.0]  first retransmission timeout
  --retransmit-base X         [1.8]  back-off base: timeout × base^n
  --keepalive S               [20s]  NAT-T keepalive interval
  --mobike yes|no             [no]
  --fragmentation yes|no|accept|force [yes]
  --start-action none|trap|start [none]  (responder only)
  --loglevel N                [2]    charon log level of ike,cfg,knl,net,enc,esp,chd
                              (-1..4; 4 logs keys and secrets)
  --log GROUP=N[,GROUP=N]     per-group override, e.g. ike=4,enc=4,chd=4
  --charon-set KEY=VALUE      extra setting in the charon section (repeatable)
  --timeout S                 [20]   for initiate and wait
EOF
}

die() { echo "$PROG: $*" >&2; exit 1; }

[ $# -ge 1 ] || { usage >&2; exit 2; }
CMD=$1; shift
case "$CMD" in -h|--help|help) usage; exit 0;; esac

NS= LOCAL= REMOTE= PSK= LTS= RTS= ROLE=responder
IKE_PROPS=aes256gcm16-prfsha256-x25519,aes256gcm16-prfsha256-modp2048
ESP_PROPS=aes256gcm16-noesn
LID= RID= ENCAP=no PORT=500 NATT_PORT=4500 RPORT=500
DPD=30s DPD_ACTION=clear IKE_REKEY=4h CHILD_REKEY=1h RAND_TIME= REKEY_PACKETS=0
REPLAY_WINDOW=32 RTRIES=5 RTIMEOUT=4.0 RBASE=1.8 KEEPALIVE=20s
MOBIKE=no FRAG=yes START_ACTION=none LOGLEVEL=2 LOGS= DIR= TIMEOUT=20
IKE_ONLY=no RAW=no
CHARON_SET=() EXTRA=()
need() { [ $# -ge 2 ] || die "$1 needs a value"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --ike) IKE_ONLY=yes; shift; continue;;
    --raw) RAW=yes; shift; continue;;
    --) shift; EXTRA=("$@"); break;;
    -h|--help) usage; exit 0;;
  esac
  need "$@"
  case "$1" in
    --ns) NS=$2;;
    --local) LOCAL=$2;;
    --remote) REMOTE=$2;;
    --psk) PSK=$2;;
    --local-ts) LTS=$2;;
    --remote-ts) RTS=$2;;
    --role) ROLE=$2;;
    --ike-proposals) IKE_PROPS=$2;;
    --esp-proposals) ESP_PROPS=$2;;
    --local-id) LID=$2;;
    --remote-id) RID=$2;;
    --port) PORT=$2;;
    --natt-port) NATT_PORT=$2;;
    --remote-port) RPORT=$2;;
    --encap) ENCAP=$2;;
    --dpd) DPD=$2;;
    --dpd-action) DPD_ACTION=$2;;
    --ike-rekey) IKE_REKEY=$2;;
    --child-rekey) CHILD_REKEY=$2;;
    --rand-time) RAND_TIME=$2;;
    --child-rekey-packets) REKEY_PACKETS=$2;;
    --replay-window) REPLAY_WINDOW=$2;;
    --retransmit-tries) RTRIES=$2;;
    --retransmit-timeout) RTIMEOUT=$2;;
    --retransmit-base) RBASE=$2;;
    --keepalive) KEEPALIVE=$2;;
    --mobike) MOBIKE=$2;;
    --fragmentation) FRAG=$2;;
    --start-action) START_ACTION=$2;;
    --loglevel) LOGLEVEL=$2;;
    --log) LOGS=$2;;
    --charon-set) CHARON_SET+=("$2");;
    --dir) DIR=$2;;
    --timeout) TIMEOUT=$2;;
    *) die "unknown option $1 (see --help)";;
  esac
  shift 2
done

[ -n "$NS" ] || die "--ns is required"
[ "$(id -u)" -eq 0 ] || die "needs root (network namespace)"
DIR=${DIR:-/tmp/strongswan-peer/$NS}
CHARON=/usr/sbin/charon-systemd
URI="unix://$DIR/charon.vici"
# awk reads the whole list: `grep -q` would quit early and, under pipefail,
# fail the pipeline with SIGPIPE when many namespaces exist.
ns_exists() { ip netns list | awk -v n="$NS" '$1 == n {f = 1} END {exit !f}'; }
nsx() { ip netns exec "$NS" "$@"; }
# swanctl reads strongswan.conf too: point it at ours, not the host's.
sw() { STRONGSWAN_CONF="$DIR/strongswan.conf" nsx swanctl "$@" --uri "$URI"; }

charon_pid() { [ -f "$DIR/charon.pid" ] && cat "$DIR/charon.pid"; }
charon_running() {
  local pid
  pid=$(charon_pid) || return 1
  # The pid must still be ours, not a recycled one: charon-systemd, or during
  # start-up still `ip netns exec` / `setsid` before they exec it.
  case "$(cat "/proc/$pid/comm" 2>/dev/null)" in
    charon-systemd|ip|setsid) return 0;;
    *) return 1;;
  esac
}
need_running() { charon_running || die "no charon running for $NS (dir $DIR)"; }

child_installed() { sw --list-sas 2>/dev/null | grep 'INSTALLED' >/dev/null; }

do_wait() {
  local end=$((SECONDS + ${TIMEOUT%.*}))
  until child_installed; do
    [ $SECONDS -lt $end ] || die "no CHILD_SA INSTALLED after ${TIMEOUT}s"
    sleep 0.1
  done
}

# Everything charon leaves in the namespace when it dies without cleaning up
# (SIGKILL): the TUN device, the routes of table 220 and the rule to it.
scrub_ns() {
  ns_exists || return 0
  ip -n "$NS" link del ipsec0 2>/dev/null || true
  ip -n "$NS" route flush table 220 2>/dev/null || true
  while ip -n "$NS" rule del table 220 2>/dev/null; do :; done
}

log_lines() {
  local g lvl
  for g in ike cfg knl net enc esp chd; do
    lvl=$LOGLEVEL
    IFS=, read -r -a pairs <<<"$LOGS"
    for p in "${pairs[@]}"; do
      [ "${p%%=*}" = "$g" ] && lvl=${p#*=}
    done
    echo "      $g = $lvl"
  done
  # groups named only in --log (e.g. lib, job, mgr)
  IFS=, read -r -a pairs <<<"$LOGS"
  for p in "${pairs[@]}"; do
    case "${p%%=*}" in ike|cfg|knl|net|enc|esp|chd|'') ;; *) echo "      ${p%%=*} = ${p#*=}";; esac
  done
}

case "$CMD" in
start)
  [ -n "$LOCAL" ] || die "--local is required"
  [ -n "$REMOTE" ] || die "--remote is required"
  [ -n "$PSK" ] || die "--psk is required"
  [ -n "$LTS" ] || die "--local-ts is required"
  [ -n "$RTS" ] || die "--remote-ts is required"
  ns_exists || die "namespace $NS does not exist"
  [ -x "$CHARON" ] || die "$CHARON missing (scripts/setup.sh installs strongSwan)"
  [ -f "$PLUGINS/libstrongswan-kernel-libipsec.so" ] ||
    die "kernel-libipsec plugin missing (package libcharon-extra-plugins)"
  [ -f "$PLUGINS/libstrongswan-gcm.so" ] ||
    die "gcm plugin missing (package libstrongswan-standard-plugins)"
  case "$ROLE" in initiator|responder) ;; *) die "--role initiator|responder";; esac
  case "$START_ACTION" in none|trap|start) ;; *) die "--start-action none|trap|start";; esac
  charon_running && die "charon already running for $NS (pid $(charon_pid)); stop it first"
  LID=${LID:-$LOCAL}
  if [ -z "$RID" ]; then
    if [ "$REMOTE" = %any ]; then RID=%any; else RID=$REMOTE; fi
  fi
  mkdir -p "$DIR"; chmod 700 "$DIR"
  rm -f "$DIR/charon.vici" "$DIR/charon.log" "$DIR/charon.pid"
  rand_ike= rand_child=
  if [ -n "$RAND_TIME" ]; then
    rand_ike="rand_time = $RAND_TIME"; rand_child="rand_time = $RAND_TIME"
  fi
  extra_charon=
  for kv in ${CHARON_SET[@]+"${CHARON_SET[@]}"}; do
    [[ "$kv" == *=* ]] || die "--charon-set KEY=VALUE"
    extra_charon+="  ${kv%%=*} = ${kv#*=}"$'\n'
  done

  cat > "$DIR/strongswan.conf" <<EOF
# generated by $PROG for namespace $NS
charon-systemd {
  journal { default = -1 }
}
# charon-systemd falls back to this section.
charon {
  # A fixed plugin set; kernel-libipsec before kernel-netlink (see the script).
  load = random nonce openssl pem pkcs1 x509 pubkey constraints aes sha1 sha2 hmac gcm kdf curve25519 gmp kernel-libipsec kernel-netlink socket-default vici
  port = $PORT
  port_nat_t = $NATT_PORT
  install_routes = yes
  retransmit_tries = $RTRIES
  retransmit_timeout = $RTIMEOUT
  retransmit_base = $RBASE
  keep_alive = $KEEPALIVE
$extra_charon  filelog {
    main {
      path = $DIR/charon.log
      time_format = %H:%M:%S
      append = no
      flush_line = yes
      default = 1
$(log_lines)
    }
  }
  plugins {
    vici { socket = $URI }
    kernel-libipsec { allow_peer_ts = no }
  }
}
swanctl {
  load = pem pkcs1 x509 pubkey constraints
}
EOF

  if [ "$ROLE" = initiator ]; then SA_START=none; else SA_START=$START_ACTION; fi
  cat > "$DIR/swanctl.conf" <<EOF
# generated by $PROG for namespace $NS
connections {
  peer {
    version = 2
    local_addrs = $LOCAL
    remote_addrs = $REMOTE
    local_port = $PORT
    remote_port = $RPORT
    proposals = $IKE_PROPS
    encap = $ENCAP
    mobike = $MOBIKE
    fragmentation = $FRAG
    dpd_delay = $DPD
    rekey_time = $IKE_REKEY
    $rand_ike
    local {
      auth = psk
      id = $LID
    }
    remote {
      auth = psk
      id = $RID
    }
    children {
      net {
        mode = tunnel
        local_ts = $LTS
        remote_ts = $RTS
        esp_proposals = $ESP_PROPS
        rekey_time = $CHILD_REKEY
        $rand_child
        rekey_packets = $REKEY_PACKETS
        replay_window = $REPLAY_WINDOW
        start_action = $SA_START
        dpd_action = $DPD_ACTION
        close_action = $DPD_ACTION
      }
    }
  }
}
secrets {
  ike-peer {
    id-local = $LID
    id-remote = $RID
    secret = "$PSK"
  }
}
EOF
  chmod 600 "$DIR/swanctl.conf"

  # A leftover of an earlier charon in this namespace would steal the routes.
  scrub_ns
  # `ip netns exec` and `setsid` (not a group leader here, so it does not fork)
  # both exec: $! is charon's pid. setsid: its own session, outlives this shell.
  STRONGSWAN_CONF="$DIR/strongswan.conf" ip netns exec "$NS" \
    setsid "$CHARON" > "$DIR/charon.stdout" 2>&1 < /dev/null &
  echo $! > "$DIR/charon.pid"
  # Until the background job has exec'd, its pid is still the forked shell
  # (`bash`), which charon_running does not accept: here, where the pid is
  # our own child of a moment ago, it is enough that it exists.
  for _ in $(seq 1 100); do
    [ -S "$DIR/charon.vici" ] && break
    kill -0 "$(charon_pid)" 2>/dev/null || {
      cat "$DIR/charon.stdout" "$DIR/charon.log" >&2 2>/dev/null || true
      die "charon exited"
    }
    sleep 0.05
  done
  [ -S "$DIR/charon.vici" ] || die "vici socket $DIR/charon.vici did not appear"
  sw --load-all --file "$DIR/swanctl.conf" > "$DIR/swanctl-load.log" 2>&1 ||
    { cat "$DIR/swanctl-load.log" >&2; die "swanctl --load-all failed"; }
  echo "charon running in $NS (pid $(charon_pid)), dir $DIR, role $ROLE"
  if [ "$ROLE" = initiator ]; then
    sw --initiate --child net --timeout "$TIMEOUT"
  fi
  ;;
initiate) need_running; sw --initiate --child net --timeout "$TIMEOUT" ;;
wait) need_running; do_wait ;;
rekey)
  need_running
  if [ "$IKE_ONLY" = yes ]; then sw --rekey --ike peer; else sw --rekey --child net; fi ;;
status)
  need_running
  if [ "$RAW" = yes ]; then sw --list-sas --raw; else sw --list-sas; fi ;;
swanctl) need_running; sw ${EXTRA[@]+"${EXTRA[@]}"} ;;
log) cat "$DIR/charon.log" ;;
pid) need_running; charon_pid ;;
stop)
  if charon_running; then
    pid=$(charon_pid)
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do charon_running || break; sleep 0.1; done
    charon_running && kill -9 "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do charon_running || break; sleep 0.05; done
  fi
  scrub_ns
  # Only a directory this script made (it holds strongswan.conf).
  if [ -f "$DIR/strongswan.conf" ]; then rm -rf "$DIR"; fi
  echo "stopped strongSwan peer in $NS"
  ;;
*) usage >&2; exit 2;;
esac
