#!/usr/bin/env bash
# Recaptures the real packets under tests/fixtures/ that tests/nat_fixtures.rs
# rewrites: a TCP SYN, a UDP DNS query, an ICMP echo request and reply, and
# the ICMP port unreachable the kernel sends back for the DNS query.
#
# Everything happens inside two network namespaces of its own, joined by a
# veth pair and nothing else (no default route; both deleted on exit, even
# on failure): the technician 172.16.0.50 in one, the LAN PC 192.168.1.10
# in the other. Nothing is sent from or to the root namespace. Needs root,
# tcpdump, ethtool, python3 and ping.
set -euo pipefail

[ "$(id -u)" -eq 0 ] || { echo "capture-fixtures.sh: needs root (network namespace)" >&2; exit 1; }
for tool in tcpdump ethtool python3 ping ip; do
    command -v "$tool" >/dev/null || { echo "capture-fixtures.sh: $tool is missing" >&2; exit 1; }
done

repo="$(cd "$(dirname "$0")/.." && pwd)"
out="$repo/tests/fixtures"
tech="vnfix$$t"
pc="vnfix$$p"
tmp="$(mktemp -d)"
tcpdump_pid=""

cleanup() {
    if [ -n "$tcpdump_pid" ]; then
        kill "$tcpdump_pid" 2>/dev/null || true
        wait "$tcpdump_pid" 2>/dev/null || true
    fi
    ip netns del "$tech" 2>/dev/null || true
    ip netns del "$pc" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

in_tech() { ip netns exec "$tech" "$@"; }
in_pc() { ip netns exec "$pc" "$@"; }

ip netns add "$tech"
ip netns add "$pc"
ip -n "$tech" link add vnfix0 type veth peer name vnfix1 netns "$pc"
in_tech ip addr add 172.16.0.50/32 dev vnfix0
in_pc ip addr add 192.168.1.10/32 dev vnfix1
for side in tech pc; do
    "in_$side" ip link set lo up
done
in_tech ip link set vnfix0 up
in_pc ip link set vnfix1 up
in_tech ip route add 192.168.1.10/32 dev vnfix0
in_pc ip route add 172.16.0.50/32 dev vnfix1
# veth (like loopback) normally leaves TCP and UDP checksums to "hardware"
# that never computes them (CHECKSUM_PARTIAL), so a capture would show only
# the pseudo-header sum. With tx checksumming off the kernel writes the real
# checksum, as it does for a NIC without offload.
in_tech ethtool -K vnfix0 tx off >/dev/null
in_pc ethtool -K vnfix1 tx off >/dev/null

in_pc tcpdump -i vnfix1 -n -U -s 0 -w "$tmp/capture.pcap" \
    'host 172.16.0.50 and host 192.168.1.10' 2>"$tmp/tcpdump.log" &
tcpdump_pid=$!
for _ in $(seq 50); do
    grep -q "listening on" "$tmp/tcpdump.log" 2>/dev/null && break
    sleep 0.1
done

# The PC listens for RDP, so the SYN is answered.
in_pc python3 -c '
import socket, time
s = socket.socket(); s.bind(("192.168.1.10", 3389)); s.listen(1)
s.settimeout(5); c, _ = s.accept(); time.sleep(0.2)
' &
listener=$!
sleep 0.5

in_tech python3 - <<'PY'
import socket, struct

TECH, PC = "172.16.0.50", "192.168.1.10"

# TCP SYN: the technician opens RDP on the PC.
cli = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
cli.bind((TECH, 40000))
cli.connect((PC, 3389))
cli.close()

# A DNS query (A record of pc1.example) to a port nobody listens on: the
# kernel answers with ICMP port unreachable quoting the query.
query = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
query += b"".join(bytes([len(l)]) + l for l in (b"pc1", b"example")) + b"\x00"
query += struct.pack("!HH", 1, 1)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind((TECH, 40053))
u.sendto(query, (PC, 53))
u.settimeout(1)
try:
    u.recv(512)
except OSError:
    pass  # ECONNREFUSED: the port unreachable arrived
u.close()
PY

wait "$listener"
in_tech ping -n -c 1 -W 1 -I 172.16.0.50 -p 7670 -s 24 192.168.1.10 >/dev/null

sleep 0.5
kill "$tcpdump_pid"
wait "$tcpdump_pid" 2>/dev/null || true
tcpdump_pid=""

python3 - "$tmp/capture.pcap" "$out" <<'PY'
import struct, sys, pathlib

pcap, out = sys.argv[1], pathlib.Path(sys.argv[2])
data = open(pcap, "rb").read()
magic = struct.unpack("<I", data[:4])[0]
endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
linktype = struct.unpack(endian + "I", data[20:24])[0]
skip = {1: 14, 113: 16, 276: 20, 101: 0}[linktype]
packets, at = [], 24
while at < len(data):
    _, _, incl, _ = struct.unpack(endian + "IIII", data[at:at + 16])
    packets.append(data[at + 16 + skip:at + 16 + incl])
    at += 16 + incl

TECH, PC = bytes([172, 16, 0, 50]), bytes([192, 168, 1, 10])
def pick(name, want):
    found = [p for p in packets if p[0] >> 4 == 4 and want(p, (p[0] & 15) * 4)]
    if not found:
        sys.exit(f"capture-fixtures.sh: no {name} captured")
    p = found[0]
    (out / f"{name}.hex").write_text(p.hex() + "\n")
    print(f"{name}: {len(p)} bytes")

pick("tcp_syn", lambda p, h: p[9] == 6 and p[12:16] == TECH and p[h + 13] == 0x02)
pick("udp_dns_query", lambda p, h: p[9] == 17 and p[12:16] == TECH and p[h + 2:h + 4] == b"\x00\x35")
pick("icmp_echo_request", lambda p, h: p[9] == 1 and p[h] == 8 and p[12:16] == TECH)
pick("icmp_echo_reply", lambda p, h: p[9] == 1 and p[h] == 0 and p[12:16] == PC)
pick("icmp_port_unreachable", lambda p, h: p[9] == 1 and p[h] == 3 and p[h + 1] == 3)
PY
cp "$tmp/capture.pcap" "$out/capture.pcap"
echo "capture-fixtures.sh: wrote $out"
