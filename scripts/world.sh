#!/usr/bin/env bash
# world.sh — the network-namespace world of the demo and the end-to-end test.
#
#   world.sh up      build the namespaces, links, firewalls and LAN PCs
#   world.sh down    kill everything in them and delete them (idempotent)
#   world.sh ns NAME print the namespace name of a host (inet, csw, server,
#                    gw1, gw2, tech, r1..r7, pc1..pc7, ah3)
#   world.sh list    print the namespaces of this world
#
# Every name carries the prefix $VPNNAT_WORLD (default "vnw"), so several
# worlds (a demo and a CI run) never collide. No namespace has a default
# route; nothing is added to the root namespace.
#
#  "internet" (inet): 203.0.113.0/24 (center edge) and 198.51.100.0/24 (sites)
#    server 203.0.113.10   gw1 203.0.113.11   gw2 203.0.113.12
#    r1 198.51.100.11      r2 198.51.100.12   r3 198.51.100.13   r4 198.51.100.14
#    r5 198.51.100.15      r6 198.51.100.16   r7 198.51.100.17
#  center LAN 172.16.0.0/24, a bridge in "csw":
#    server .10  gw1 .11  gw2 .12  tech .50 (treats 10.64.0.0/16 as on-link)
#  site i (i = 1..7): router ri (LAN bridge 192.168.1.1/24, stateful firewall,
#    NAPT to its WAN), PC pci 192.168.1.10 (HTTP :80 naming the site, TCP echo :7);
#    site 3 also has ah3 192.168.1.20, the host of its netstack agent;
#    site 4's firewall drops all outbound UDP (its agent falls back to TLS);
#    site 5 is an IPsec site (its agent dials IKEv2);
#    site 6 is an IPsec site without an agent: the mission configures r6 by
#    hand (strongSwan, the NAT address on lo, the 1:1 NAT in nftables);
#    site 7 is a WireGuard site without an agent: the mission brings up the
#    wg-quick files and the nftables file the server renders for it (Debian's
#    wg-quick with the userspace wireguard-go).
set -euo pipefail

P=${VPNNAT_WORLD:-vnw}
HERE=$(cd "$(dirname "$0")" && pwd)
HOSTS=(inet csw server gw1 gw2 tech r1 r2 r3 r4 r5 r6 r7 pc1 pc2 pc3 pc4 pc5 pc6 pc7 ah3)

ns() { echo "$P-$1"; }
inns() { local h=$1; shift; ip netns exec "$(ns "$h")" "$@"; }

# link HOST_A IF_A ADDR_A HOST_B IF_B ADDR_B ("-" = no address, e.g. a bridge port)
link() {
  ip -n "$(ns "$1")" link add "$2" type veth peer name "$5" netns "$(ns "$4")"
  [ "$3" = - ] || ip -n "$(ns "$1")" addr add "$3" dev "$2"
  [ "$6" = - ] || ip -n "$(ns "$4")" addr add "$6" dev "$5"
  ip -n "$(ns "$1")" link set "$2" up
  ip -n "$(ns "$4")" link set "$5" up
}

bridge() { # HOST NAME [ADDR]
  ip -n "$(ns "$1")" link add "$2" type bridge
  [ -z "${3:-}" ] || ip -n "$(ns "$1")" addr add "$3" dev "$2"
  ip -n "$(ns "$1")" link set "$2" up
}

port() { ip -n "$(ns "$1")" link set "$2" master "$3"; }

sysctl_in() { inns "$1" sysctl -qw "$2"; }

up() {
  down quiet
  for h in "${HOSTS[@]}"; do
    ip netns add "$(ns "$h")"
    ip -n "$(ns "$h")" link set lo up
  done

  # The internet: two segments routed by inet.
  bridge inet pub 203.0.113.1/24
  bridge inet sites 198.51.100.1/24
  sysctl_in inet net.ipv4.ip_forward=1
  local i
  for h in server gw1 gw2; do
    case $h in server) i=10 ;; gw1) i=11 ;; gw2) i=12 ;; esac
    link inet "p-$h" - "$h" wan "203.0.113.$i/24"
    port inet "p-$h" pub
    ip -n "$(ns "$h")" route add 198.51.100.0/24 via 203.0.113.1
  done

  # The center LAN.
  bridge csw br0
  for h in server gw1 gw2 tech; do
    case $h in server) i=10 ;; gw1) i=11 ;; gw2) i=12 ;; tech) i=50 ;; esac
    link csw "c-$h" - "$h" eth0 "172.16.0.$i/24"
    port csw "c-$h" br0
  done
  # The technician host treats the whole NAT pool as on-link (docs/DESIGN.md, "Data plane"):
  # whichever gateway carries an address answers ARP for it.
  ip -n "$(ns tech)" route add 10.64.0.0/16 dev eth0

  # Seven customer sites, all 192.168.1.0/24.
  for s in 1 2 3 4 5 6 7; do
    link inet "s-r$s" - "r$s" wan "198.51.100.1$s/24"
    port inet "s-r$s" sites
    ip -n "$(ns "r$s")" route add 203.0.113.0/24 via 198.51.100.1
    bridge "r$s" lan 192.168.1.1/24
    link "r$s" "l-pc" - "pc$s" eth0 192.168.1.10/24
    port "r$s" l-pc lan
    # Replies to the center go back through the router (and, in packet
    # mode, into the agent's tunnel). Deliberately no default route.
    ip -n "$(ns "pc$s")" route add 172.16.0.0/24 via 192.168.1.1
    sysctl_in "r$s" net.ipv4.ip_forward=1
    # A home router: stateful firewall (no unsolicited inbound) and NAPT.
    inns "r$s" nft -f - <<'NFT'
table inet filter {
  chain input {
    type filter hook input priority filter; policy accept;
    iifname "wan" ct state established,related accept
    iifname "wan" drop
  }
  chain forward {
    type filter hook forward priority filter; policy accept;
    iifname "wan" ct state established,related accept
    iifname "wan" drop
  }
}
table ip nat {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan" masquerade
  }
}
NFT
  done
  # Site 4: an uplink that lets no UDP out, from the router or its LAN.
  inns r4 nft -f - <<'NFT'
table inet uplink {
  chain out {
    type filter hook output priority filter; policy accept;
    oifname "wan" meta l4proto udp counter drop
  }
  chain forward {
    type filter hook forward priority filter; policy accept;
    oifname "wan" meta l4proto udp counter drop
  }
}
NFT
  # Site 3's agent runs in netstack mode on a second LAN host, behind the NAPT.
  link r3 l-ah - ah3 eth0 192.168.1.20/24
  port r3 l-ah lan
  ip -n "$(ns ah3)" route add 203.0.113.0/24 via 192.168.1.1

  for s in 1 2 3 4 5 6 7; do
    inns "pc$s" setsid python3 "$HERE/lan-pc.py" "site $s" </dev/null >/dev/null 2>&1 &
  done
  for s in 1 2 3 4 5 6 7; do
    for _ in $(seq 100); do
      inns "pc$s" python3 -c 'import socket; socket.create_connection(("127.0.0.1", 80), 0.2)' 2>/dev/null && break
      sleep 0.05
    done
  done
}

down() {
  local h n
  # Site 7's wg-quick interfaces: wireguard-go's control sockets live in the
  # host's /var/run/wireguard, outside the namespace.
  if ip netns list | grep -qw "^$(ns r7)"; then
    for n in $(ip -n "$(ns r7)" -o link show type tun 2>/dev/null | awk -F': ' '{print $2}'); do
      rm -f "/var/run/wireguard/$n.sock"
    done
  fi
  for h in "${HOSTS[@]}"; do
    n=$(ns "$h")
    if ip netns list | grep -qw "^$n"; then
      for pid in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
      ip netns del "$n" 2>/dev/null || true
    fi
  done
  [ "${1:-}" = quiet ] || echo "world $P: down"
}

case "${1:-}" in
  up) up; echo "world $P: up" ;;
  down) down ;;
  ns) ns "$2" ;;
  list) for h in "${HOSTS[@]}"; do ns "$h"; done ;;
  *) sed -n '2,12p' "$0" >&2; exit 2 ;;
esac
