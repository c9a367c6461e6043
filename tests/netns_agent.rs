//! The real `router-agent` binary in network namespaces, in packet mode and
//! in netstack mode: the technician reaches a LAN PC by its NAT address and
//! nothing else; malformed packets sent into the tunnel are dropped and
//! counted while the agent keeps working.
//!
//! ```text
//!  tech 172.16.0.50 ──lan0── gw (gateway binary, or the test as a fake gateway)
//!                            │ inet bridge 198.51.100.1/24
//!                            └── router wan0 198.51.100.11 ── LAN bridge 192.168.1.1/24
//!                                  ├── pc 192.168.1.10 (HTTP :80, TCP echo :7), also 192.168.1.11
//!                                  └── ah 192.168.1.20 (the agent's host in netstack mode)
//! ```
//!
//! Every address lives in namespaces created here; none has a default route.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vpnnat::messages::{
    AgentDesiredState, AgentMapping, AgentTunnel, GatewayDesiredState, GatewayId, GatewayPeer,
    RequestId, SiteId, TerminalName, TunnelKind, UnixMillis,
};
use vpnnat::tunnel::wireguard::{self, Tunnel, TunnelConfig};
use vpnnat::tunnel::{Decapsulated, Encapsulated, PrivateKey};
use vpnnat_test_support::echo::{start_udp_responder, tcp_echo_transfer, udp_exchange};
use vpnnat_test_support::{Netns, Prereq, rand_bytes, repo_path, require, wait_until};

const PREREQS: &[Prereq] = &[
    Prereq::Root,
    Prereq::Tun,
    Prereq::Program("ip"),
    Prereq::Program("ping"),
    Prereq::Program("nft"),
    Prereq::Program("python3"),
    Prereq::Program("curl"),
];

const NAT: &str = "10.64.0.5";
const PASSWORD: &str = "correct horse battery";

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// How the agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AgentMode {
    /// On the router, packet mode (it is the LAN's default router for 172.16.0.0/24).
    Packet,
    /// On a LAN host, packet mode with masquerade (not the LAN's router).
    PacketMasquerade,
    /// On a LAN host, netstack mode, behind the router's NAPT.
    Netstack,
}

/// The namespaces of one test.
struct World {
    gw: Netns,
    tech: Netns,
    router: Netns,
    pc: Netns,
    /// The agent's host when it is not the router.
    ah: Option<Netns>,
    dir: tempfile::TempDir,
    mode: AgentMode,
    agent_pid: Option<u32>,
    gw_pid: Option<u32>,
    gw_key: PrivateKey,
}

impl World {
    fn new(tag: &str, mode: AgentMode) -> Self {
        let gw = Netns::new(&format!("{tag}gw"));
        let tech = Netns::new(&format!("{tag}tc"));
        let router = Netns::new(&format!("{tag}rt"));
        let mut pc = Netns::new(&format!("{tag}pc"));
        vpnnat_test_support::veth(
            &gw,
            "lan0",
            Some("172.16.0.1/24"),
            &tech,
            "eth0",
            Some("172.16.0.50/24"),
        );
        // The technician treats the pool as on-link; the gateway answers ARP.
        tech.sh("ip route add 10.64.0.0/16 dev eth0");
        gw.sh("ip link add inet type bridge && ip addr add 198.51.100.1/24 dev inet && ip link set inet up");
        vpnnat_test_support::veth(
            &gw,
            "site1",
            None,
            &router,
            "wan0",
            Some("198.51.100.11/24"),
        );
        gw.sh("ip link set site1 master inet");
        router.sh(
            "ip link add lan0 type bridge && ip addr add 192.168.1.1/24 dev lan0 && ip link set lan0 up \
             && sysctl -qw net.ipv4.ip_forward=1",
        );
        vpnnat_test_support::veth(&router, "l-pc", None, &pc, "eth0", Some("192.168.1.10/24"));
        router.sh("ip link set l-pc master lan0");
        pc.sh("ip addr add 192.168.1.11/24 dev eth0");
        // Replies to the center go through the router; deliberately no default route.
        pc.sh("ip route add 172.16.0.0/24 via 192.168.1.1");
        let ah = match mode {
            AgentMode::Packet => None,
            AgentMode::PacketMasquerade | AgentMode::Netstack => {
                let ah = Netns::new(&format!("{tag}ah"));
                vpnnat_test_support::veth(
                    &router,
                    "l-ah",
                    None,
                    &ah,
                    "eth0",
                    Some("192.168.1.20/24"),
                );
                router.sh("ip link set l-ah master lan0");
                ah.sh("ip route add 198.51.100.0/24 via 192.168.1.1");
                // A home router: NAPT to its WAN, no unsolicited inbound.
                router.sh(
                    "nft -f - <<'EOF'\n\
                     table ip nat {\n\
                       chain post { type nat hook postrouting priority srcnat; oifname \"wan0\" masquerade; }\n\
                     }\n\
                     table inet filter {\n\
                       chain filter_forward { type filter hook forward priority filter; policy accept;\n\
                         iifname \"wan0\" ct state established,related accept; iifname \"wan0\" drop; }\n\
                     }\n\
                     EOF",
                );
                // Unprivileged ICMP sockets for the netstack agent's pings.
                ah.sh("sysctl -qw net.ipv4.ping_group_range='0 2147483647'");
                Some(ah)
            }
        };
        let dir = vpnnat_test_support::temp_dir(tag);
        let lan_pc = repo_path("scripts/lan-pc.py");
        let mut cmd = pc.command("python3");
        cmd.arg(&lan_pc).arg("site 1");
        pc.spawn(&mut cmd, Some(&dir.path().join("pc.log")));
        let pcr = &pc;
        wait_until("the LAN PC's HTTP server", Duration::from_secs(10), || {
            pcr.try_sh(
                "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 80), 0.2)'",
            )
        });
        Self {
            gw,
            tech,
            router,
            pc,
            ah,
            dir,
            mode,
            agent_pid: None,
            gw_pid: None,
            gw_key: PrivateKey::from_bytes(rand_bytes()),
        }
    }

    /// Where the agent runs.
    fn agent_ns(&self) -> &Netns {
        self.ah.as_ref().unwrap_or(&self.router)
    }

    fn agent_ns_mut(&mut self) -> &mut Netns {
        match self.ah.as_mut() {
            Some(ah) => ah,
            None => &mut self.router,
        }
    }

    /// The agent's page address.
    fn agent_ip(&self) -> &'static str {
        match self.mode {
            AgentMode::Packet => "192.168.1.1",
            AgentMode::PacketMasquerade | AgentMode::Netstack => "192.168.1.20",
        }
    }

    fn agent_config(&self, server_url: Option<&str>) -> PathBuf {
        let d = self.dir.path();
        let (mode, lan_if, extra) = match self.mode {
            AgentMode::Packet => ("packet", "lan0", String::new()),
            AgentMode::PacketMasquerade => (
                "packet",
                "eth0",
                "masquerade = true\nmasquerade_address = \"192.168.1.250\"\n".to_owned(),
            ),
            AgentMode::Netstack => ("netstack", "eth0", String::new()),
        };
        // The test center is plain http:// inside the namespaces.
        let server = format!(
            "[server]\nallow_insecure_http = true\n{}",
            server_url
                .map(|u| format!("url = \"{u}\"\npoll_wait_ms = 20000\n"))
                .unwrap_or_default()
        );
        let text = format!(
            "[agent]\nidentity_file = \"{id}\"\nstate_dir = \"{state}\"\nmode = \"{mode}\"\n\
             {server}\
             [lan]\ninterface = \"{lan_if}\"\nallowed_prefixes = [\"192.168.1.0/24\"]\ndns = false\n\
             [packet]\ntun_name = \"vpnagent0\"\ncenter_prefixes = [\"172.16.0.0/24\"]\n{extra}\
             [web]\npassword = \"{PASSWORD}\"\n\
             [[terminals]]\nname = \"pc-1\"\naddress = \"192.168.1.10\"\ndescription = \"Office PC\"\ncheck = \"tcp:80\"\n\
             [failures]\nlink_watch = false\n",
            id = d.join("agent.identity").display(),
            state = d.join("state").display(),
        );
        let path = d.join("router-agent.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Creates a key-only identity (standalone mode) and returns its public key.
    fn agent_pubkey(&self, config: &Path) -> vpnnat::messages::PublicKey {
        let out = vpnnat_test_support::run(
            self.agent_ns()
                .command(vpnnat_test_support::bin("router-agent"))
                .arg("--config")
                .arg(config)
                .arg("pubkey"),
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    /// Starts the agent; waits for its page.
    fn start_agent(&mut self, config: &Path, desired: Option<&Path>) {
        let mut cmd = self
            .agent_ns()
            .command(vpnnat_test_support::bin("router-agent"));
        cmd.arg("--config")
            .arg(config)
            .env("RUST_LOG", "info,vpnnat=debug,router_agent=debug");
        if let Some(d) = desired {
            cmd.arg("--desired").arg(d);
        }
        let log = self.dir.path().join("agent.log");
        let pid = self.agent_ns_mut().spawn(&mut cmd, Some(&log));
        self.agent_pid = Some(pid);
        let url = format!("http://{}:8088/healthz", self.agent_ip());
        let ns = self.agent_ns();
        wait_until("the agent's page", Duration::from_secs(15), || {
            let ok = ns.try_sh(&format!("curl -sf {url}"));
            if !ok {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                assert!(
                    !text.contains("router-agent failed"),
                    "agent failed:\n{text}"
                );
            }
            ok
        });
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// A call to the agent's JSON API with the password (from the agent's host).
    fn agent_api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let body_arg = body
            .map(|b| format!("-H 'Content-Type: application/json' --data '{b}'"))
            .unwrap_or_default();
        let out = self.agent_ns().sh(&format!(
            "curl -s -o /dev/stdout -w '\\n%{{http_code}}' -X {method} \
             -H 'Authorization: Bearer {PASSWORD}' {body_arg} http://{}:8088{path}",
            self.agent_ip()
        ));
        let (text, code) = out.trim_end().rsplit_once('\n').unwrap();
        (code.parse().unwrap(), text.to_owned())
    }

    /// One sample of the agent's metrics (0 when absent).
    fn agent_metric(&self, sample: &str) -> u64 {
        let text = self
            .agent_ns()
            .sh(&format!("curl -sf http://{}:8088/metrics", self.agent_ip()));
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
            .unwrap_or(0)
    }

    fn gateway_config(&self, server: Option<(&str, &Path)>) -> PathBuf {
        let d = self.dir.path();
        std::fs::write(d.join("gw.key"), self.gw_key.to_base64()).unwrap();
        let server = server
            .map(|(url, cred)| {
                format!(
                    "[server]\nurl = \"{url}\"\ncredential_file = \"{}\"\npoll_wait_ms = 20000\n",
                    cred.display()
                )
            })
            .unwrap_or_default();
        let text = format!(
            "[wireguard]\nlisten = \"0.0.0.0:51820\"\nendpoints = [\"198.51.100.1:51820\"]\n\
             private_key_file = \"{}\"\nworkers = 1\n\
             [center]\ntun_name = \"vpnnat0\"\ninterface = \"lan0\"\npool = \"10.64.0.0/16\"\n\
             [metrics]\nlisten = \"127.0.0.1:9101\"\n{server}",
            d.join("gw.key").display()
        );
        let path = d.join("gateway.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Starts the real gateway (standalone with `peers`, or following a server).
    fn start_gateway(&mut self, config: &Path, peers: Option<&Path>) {
        let mut cmd = self.gw.command(vpnnat_test_support::bin("gateway"));
        cmd.arg("--config").arg(config).env("RUST_LOG", "info");
        if let Some(p) = peers {
            cmd.arg("--peers").arg(p);
        }
        let log = self.dir.path().join("gateway.log");
        self.gw_pid = Some(self.gw.spawn(&mut cmd, Some(&log)));
        let gw = &self.gw;
        wait_until("the gateway", Duration::from_secs(15), || {
            let ok = gw.try_sh("curl -sf http://127.0.0.1:9101/healthz");
            if !ok {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                assert!(!text.contains("gateway failed"), "gateway failed:\n{text}");
            }
            ok
        });
    }

    /// Whether the technician gets the PC's page through `addr` (one try).
    fn tech_http(&self, addr: &str) -> bool {
        self.tech
            .command("curl")
            .args(["-s", "--max-time", "2", &format!("http://{addr}/")])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("PC 192.168.1.10 at site 1"))
    }

    fn tech_ping(&self, addr: &str) -> bool {
        self.tech.try_sh(&format!("ping -c 1 -W 1 {addr}"))
    }
}

fn desired_doc(version: u64, gw_key: &PrivateKey, mappings: &[(&str, &str)]) -> AgentDesiredState {
    AgentDesiredState {
        version,
        site_id: SiteId(1),
        tunnel: (!mappings.is_empty()).then(|| AgentTunnel {
            gateway_id: GatewayId(1),
            kind: TunnelKind::Wireguard,
            endpoint: "198.51.100.1:51820".parse().unwrap(),
            public_key: gw_key.public_key(),
            persistent_keepalive_s: 5,
            ipsec: None,
            tls: None,
        }),
        mappings: mappings
            .iter()
            .map(|(nat, terminal)| AgentMapping {
                nat_address: nat.parse().unwrap(),
                terminal: TerminalName::new(*terminal).unwrap(),
                request_id: RequestId(1),
                expires_at: UnixMillis(wall_ms() + 3_600_000),
            })
            .collect(),
        problem: None,
        rotation: None,
    }
}

/// Standalone world: the real gateway with a peers file, the agent with a
/// desired-state file. The gateway routes two NAT addresses to the site; the
/// agent maps only one.
fn standalone(tag: &str, mode: AgentMode) -> World {
    let mut w = World::new(tag, mode);
    let config = w.agent_config(None);
    let agent_key = w.agent_pubkey(&config);
    let peers = GatewayDesiredState {
        next_keys: Vec::new(),
        version: 1,
        gateway_id: GatewayId(1),
        allowed_sources: Vec::new(),
        key_rotation: None,
        peers: vec![GatewayPeer {
            site_id: SiteId(1),
            public_key: agent_key,
            nat_addresses: vec![NAT.parse().unwrap(), "10.64.0.6".parse().unwrap()],
            tunnel: TunnelKind::Wireguard,
            ipsec: None,
            tls_token_sha256: None,
        }],
    };
    let peers_file = w.dir.path().join("peers.json");
    std::fs::write(&peers_file, serde_json::to_vec(&peers).unwrap()).unwrap();
    let gw_config = w.gateway_config(None);
    w.start_gateway(&gw_config, Some(&peers_file));
    let desired = desired_doc(1, &w.gw_key, &[(NAT, "pc-1")]);
    let desired_file = w.dir.path().join("desired.json");
    std::fs::write(&desired_file, serde_json::to_vec(&desired).unwrap()).unwrap();
    start_udp_responder(&mut w.pc, w.dir.path());
    w.start_agent(&config, Some(&desired_file));
    w
}

fn check_reachability(w: &World) {
    let ok = (0..40).any(|_| {
        if w.tech_http(NAT) {
            true
        } else {
            std::thread::sleep(Duration::from_millis(250));
            false
        }
    });
    assert!(
        ok,
        "the technician never reached the PC:\n{}",
        w.agent_log()
    );
    assert!(w.tech_ping(NAT), "ping through the NAT address");
    tcp_echo_transfer(&w.tech, NAT, 300_000);
    assert!(udp_exchange(&w.tech, NAT), "UDP through the NAT address");
    // The other address the gateway routes here is not mapped by the agent.
    let before = w.agent_metric("vpnnat_agent_drops_total{reason=\"not_mapped\"}");
    assert!(!w.tech_ping("10.64.0.6"));
    assert!(!w.tech_http("10.64.0.6"));
    let after = w.agent_metric("vpnnat_agent_drops_total{reason=\"not_mapped\"}");
    assert!(
        after > before,
        "unmapped packets counted ({before} → {after})"
    );
}

#[test]
fn netns_agent_standalone_packet_mode_reaches_only_the_mapped_pc() {
    if !require(PREREQS) {
        return;
    }
    let w = standalone("asp", AgentMode::Packet);
    check_reachability(&w);
    // The routes into the tunnel exist while the agent runs.
    let routes = w.router.sh("ip -4 route show proto 118");
    assert!(routes.contains("172.16.0.0/24 dev vpnagent0"), "{routes}");
}

#[test]
fn netns_agent_standalone_masquerade_reaches_the_pc_from_a_lan_host() {
    if !require(PREREQS) {
        return;
    }
    let w = standalone("asm", AgentMode::PacketMasquerade);
    check_reachability(&w);
    // The PC saw the masquerade address, not the technician's.
    let neigh = w.pc.sh("ip neigh show 192.168.1.250");
    assert!(
        neigh.contains("lladdr"),
        "the PC talked to the masquerade address: {neigh}"
    );
}

#[test]
fn netns_agent_standalone_netstack_mode_relays_tcp_udp_and_ping() {
    if !require(PREREQS) {
        return;
    }
    let w = standalone("asn", AgentMode::Netstack);
    check_reachability(&w);
    assert!(w.agent_metric("vpnnat_agent_netstack_tcp_connections_total") >= 2);
    assert!(w.agent_metric("vpnnat_agent_netstack_icmp_echo_total{kind=\"reply\"}") >= 1);
    // A closed port on the PC is refused (RST), not hung.
    let refused = w.tech.sh(&format!(
        "python3 -c \"
import socket
s = socket.socket(); s.settimeout(3)
try:
    s.connect(('{NAT}', 9)); print('open')
except ConnectionRefusedError: print('refused')
except OSError as e: print('other', e)
\""
    ));
    assert!(refused.contains("refused"), "{refused}");
}

/// The test plays the gateway: a WireGuard responder with the gateway's key
/// on 198.51.100.1:51820 inside the gateway namespace.
struct FakeGateway {
    sock: UdpSocket,
    tunnel: Tunnel,
    agent: Option<SocketAddr>,
}

/// A UDP socket bound inside `ns`: created on a thread that entered the
/// namespace (setns affects only the calling thread; the socket stays in the
/// namespace it was created in).
#[allow(unsafe_code)]
fn udp_socket_in(ns: &Netns, bind: &str) -> UdpSocket {
    let path = format!("/var/run/netns/{}", ns.name);
    let bind = bind.to_owned();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        // SAFETY: setns on a valid namespace fd; it only changes this thread's
        // network namespace, and this thread ends right after.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        UdpSocket::bind(bind).unwrap()
    })
    .join()
    .unwrap()
}

impl FakeGateway {
    fn new(ns: &Netns, key: &PrivateKey, agent_key: vpnnat::messages::PublicKey) -> Self {
        let sock = udp_socket_in(ns, "198.51.100.1:51820");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let tunnel = Tunnel::new(
            TunnelConfig::responder(key.clone(), agent_key, 7),
            Instant::now(),
        );
        Self {
            sock,
            tunnel,
            agent: None,
        }
    }

    /// Receives and handles datagrams for up to `wait`; returns decrypted IP
    /// packets from the agent.
    fn pump(&mut self, wait: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + wait;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 70000];
        let mut out = vec![0u8; 70000];
        while Instant::now() < deadline {
            let Ok((n, from)) = self.sock.recv_from(&mut buf) else {
                continue;
            };
            self.agent = Some(from);
            match self
                .tunnel
                .decapsulate(Some(from.ip()), &buf[..n], &mut out, Instant::now())
            {
                Ok(Decapsulated::Tunnel(p)) => got.push(p.to_vec()),
                Ok(Decapsulated::Network(reply)) => {
                    self.sock.send_to(reply, from).unwrap();
                }
                Ok(Decapsulated::Nothing) | Err(_) => {}
            }
            while let Some(d) = self.tunnel.poll_network(&mut out) {
                self.sock.send_to(d, from).unwrap();
            }
        }
        got
    }

    /// Encrypts `inner` and sends it to the agent.
    fn send(&mut self, inner: &[u8]) {
        let mut out = vec![0u8; wireguard::buffer_len(inner.len())];
        let agent = self.agent.expect("the agent has dialled");
        if let Ok(Encapsulated::Network(d)) =
            self.tunnel.encapsulate(inner, &mut out, Instant::now())
        {
            self.sock.send_to(d, agent).unwrap();
        }
    }

    /// Sends raw bytes (not WireGuard at all) to the agent.
    fn send_raw(&self, bytes: &[u8]) {
        self.sock.send_to(bytes, self.agent.unwrap()).unwrap();
    }
}

fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, seq: u16) -> Vec<u8> {
    let mut p = Vec::new();
    etherparse::PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
        .icmpv4_echo_request(0x4242, seq)
        .write(&mut p, b"vpnnat malformed-packet test")
        .unwrap();
    p
}

fn is_echo_reply_from(p: &[u8], from: Ipv4Addr, seq: u16) -> bool {
    let Ok(s) = etherparse::SlicedPacket::from_ip(p) else {
        return false;
    };
    let Some(etherparse::NetSlice::Ipv4(ip)) = &s.net else {
        return false;
    };
    if ip.header().source_addr() != from {
        return false;
    }
    matches!(
        &s.transport,
        Some(etherparse::TransportSlice::Icmpv4(i))
            if matches!(i.icmp_type(), etherparse::Icmpv4Type::EchoReply(e) if e.seq == seq)
    )
}

#[test]
fn netns_agent_drops_malformed_tunnel_packets_and_keeps_working() {
    if !require(PREREQS) {
        return;
    }
    let mut w = World::new("amf", AgentMode::Packet);
    let config = w.agent_config(None);
    let agent_key = w.agent_pubkey(&config);
    let mut gw = FakeGateway::new(&w.gw, &w.gw_key, agent_key);
    let desired = desired_doc(1, &w.gw_key, &[(NAT, "pc-1")]);
    let desired_file = w.dir.path().join("desired.json");
    std::fs::write(&desired_file, serde_json::to_vec(&desired).unwrap()).unwrap();
    w.start_agent(&config, Some(&desired_file));
    let tech: Ipv4Addr = "172.16.0.50".parse().unwrap();
    let nat: Ipv4Addr = NAT.parse().unwrap();

    // Handshake, then a valid ping through the tunnel comes back.
    let mut seq = 0;
    let mut alive = |gw: &mut FakeGateway| {
        seq += 1;
        let s = seq;
        (0..20).any(|_| {
            gw.pump(Duration::from_millis(100));
            if gw.agent.is_none() || !gw.tunnel.has_session() {
                return false;
            }
            gw.send(&icmp_echo(tech, nat, s));
            gw.pump(Duration::from_millis(400))
                .iter()
                .any(|p| is_echo_reply_from(p, nat, s))
        })
    };
    assert!(alive(&mut gw), "no echo reply before:\n{}", w.agent_log());

    let before = w.agent_metric("vpnnat_agent_drops_total{reason=\"not_mapped\"}");
    let good = icmp_echo(tech, nat, 999);
    let mut bad_ip_sum = good.clone();
    bad_ip_sum[10] ^= 0x55;
    let mut bad_icmp_sum = good.clone();
    let last = bad_icmp_sum.len() - 1;
    bad_icmp_sum[last] ^= 0x55;
    let mut bad_version = good.clone();
    bad_version[0] = 0x75;
    let mut short_len = good.clone();
    short_len[2..4].copy_from_slice(&10u16.to_be_bytes());
    let mut long_len = good.clone();
    long_len[2..4].copy_from_slice(&4000u16.to_be_bytes());
    let mut bad_ihl = good.clone();
    bad_ihl[0] = 0x4f;
    let mut ipv6 = vec![0u8; 60];
    ipv6[0] = 0x60;
    let mut fragment = good.clone();
    fragment[6..8].copy_from_slice(&[0x00, 0x10]); // offset 128 bytes, no first fragment
    let tcp_short = {
        let mut p = Vec::new();
        etherparse::PacketBuilder::ipv4(tech.octets(), nat.octets(), 64)
            .tcp(4000, 80, 1, 1000)
            .syn()
            .write(&mut p, &[])
            .unwrap();
        p.truncate(30); // an IPv4 header that claims more than is there
        p
    };
    let malformed: Vec<Vec<u8>> = vec![
        good[..10].to_vec(),
        bad_ip_sum,
        bad_icmp_sum,
        bad_version,
        short_len,
        long_len,
        bad_ihl,
        ipv6,
        fragment,
        tcp_short,
        icmp_echo(tech, "10.64.0.6".parse().unwrap(), 1),
        icmp_echo(tech, "192.168.1.10".parse().unwrap(), 1),
        vec![],
    ];
    for p in &malformed {
        gw.send(p);
    }
    // Not WireGuard at all, and truncated WireGuard messages.
    for junk in [
        vec![0xffu8; 100],
        vec![4u8, 0, 0, 0, 1, 2, 3],
        vec![1u8; 148],
        vec![2u8; 91],
        vec![],
    ] {
        if !junk.is_empty() {
            gw.send_raw(&junk);
        }
    }
    // From another sender on the "internet".
    let stranger = udp_socket_in(&w.gw, "198.51.100.1:0");
    stranger.send_to(&[4u8; 64], gw.agent.unwrap()).unwrap();
    gw.pump(Duration::from_millis(500));

    assert!(
        alive(&mut gw),
        "no echo reply after the malformed packets:\n{}",
        w.agent_log()
    );
    let metrics = w
        .agent_ns()
        .sh(&format!("curl -sf http://{}:8088/metrics", w.agent_ip()));
    let total: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("vpnnat_agent_drops_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum();
    assert!(
        total >= 15,
        "every malformed packet dropped and counted:\n{metrics}"
    );
    let after = w.agent_metric("vpnnat_agent_drops_total{reason=\"not_mapped\"}");
    assert!(after >= before + 2, "{metrics}");
    assert!(w.agent_metric("vpnnat_agent_drops_total{reason=\"unknown_sender\"}") >= 1);
    // And the process is still there.
    let pid = w.agent_pid.unwrap();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    assert!(!w.agent_log().contains("panicked"));
}

/// The agent accepts from its tunnel only sources in its center prefixes
/// (default 172.16.0.0/24): a gateway, or anyone holding its key, cannot reach
/// the mapped PC from elsewhere.
#[test]
fn security_agent_drops_tunnel_packets_from_outside_the_center_prefixes() {
    if !require(PREREQS) {
        return;
    }
    let mut w = World::new("asrc", AgentMode::Packet);
    let config = w.agent_config(None);
    let agent_key = w.agent_pubkey(&config);
    let mut gw = FakeGateway::new(&w.gw, &w.gw_key, agent_key);
    let desired = desired_doc(1, &w.gw_key, &[(NAT, "pc-1")]);
    let desired_file = w.dir.path().join("desired.json");
    std::fs::write(&desired_file, serde_json::to_vec(&desired).unwrap()).unwrap();
    w.start_agent(&config, Some(&desired_file));
    let tech: Ipv4Addr = "172.16.0.50".parse().unwrap();
    let nat: Ipv4Addr = NAT.parse().unwrap();
    let mut seq = 0;
    let mut alive = |gw: &mut FakeGateway| {
        seq += 1;
        let s = seq;
        (0..20).any(|_| {
            gw.pump(Duration::from_millis(100));
            if gw.agent.is_none() || !gw.tunnel.has_session() {
                return false;
            }
            gw.send(&icmp_echo(tech, nat, s));
            gw.pump(Duration::from_millis(400))
                .iter()
                .any(|p| is_echo_reply_from(p, nat, s))
        })
    };
    assert!(alive(&mut gw), "no echo reply:\n{}", w.agent_log());
    w.pc.sh(
        "nft add table ip watch && nft add chain ip watch in '{ type filter hook input priority -300; }' \
         && nft add rule ip watch in 'ip saddr != 172.16.0.0/24 icmp type echo-request counter'",
    );
    for src in ["172.16.1.50", "203.0.113.1", "10.64.0.9"] {
        gw.send(&icmp_echo(src.parse().unwrap(), nat, 7));
    }
    gw.pump(Duration::from_millis(500));
    let seen = w.pc.sh("nft list chain ip watch in");
    assert!(
        seen.contains("packets 0 "),
        "the PC saw sources outside the center prefixes: {seen}"
    );
    assert!(
        w.agent_metric("vpnnat_agent_drops_total{reason=\"not_technician\"}") >= 3,
        "{}",
        w.agent_log()
    );
    assert!(alive(&mut gw), "the technician is still served");
}

// ------------------------------------------------------------ with the server

impl World {
    fn server(&self, args: &[&str], stdin: Option<&str>) -> String {
        let config = self.dir.path().join("maintenance-server.toml");
        let mut cmd = self
            .gw
            .command(vpnnat_test_support::bin("maintenance-server"));
        // The server reads every VPNNAT_* variable as configuration.
        cmd.arg("--config")
            .arg(&config)
            .args(args)
            .env_remove("VPNNAT_KEEP_TEST_DIRS");
        let out = vpnnat_test_support::run_with_input(&mut cmd, stdin);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The real maintenance server (in the gateway namespace on 0.0.0.0:8080:
    /// the gateway uses 127.0.0.1, agents 198.51.100.1), a technician, the
    /// real gateway following the server, and the agent enrolled and running.
    fn start_center(&mut self, extra_terminals: &str) {
        let d = self.dir.path().to_owned();
        let config = d.join("maintenance-server.toml");
        std::fs::write(
            &config,
            format!(
                "[http]\nlisten = \"0.0.0.0:8080\"\n[state]\ndir = \"{}\"\n\
                 [maintenance]\nexpiry_check_ms = 200\n\
                 [gateways]\nheartbeat_interval_ms = 500\ndown_after_ms = 5000\npersistent_keepalive_s = 5\n",
                d.join("server").display()
            ),
        )
        .unwrap();
        let site = self.server(&["site", "add", "Bakery Schmidt"], None);
        let token = site.lines().last().unwrap().trim().to_owned();
        let gw = self.server(&["gateway", "add", "gw1"], None);
        let credential = gw.lines().last().unwrap().trim().to_owned();
        let cred_file = d.join("gw.credential");
        std::fs::write(&cred_file, &credential).unwrap();
        self.server(
            &["technician", "add", "alice", "--password-stdin"],
            Some("tech password 1\n"),
        );
        let mut cmd = self
            .gw
            .command(vpnnat_test_support::bin("maintenance-server"));
        cmd.arg("--config")
            .arg(&config)
            .arg("serve")
            .env_remove("VPNNAT_KEEP_TEST_DIRS");
        let log = d.join("server.log");
        self.gw.spawn(&mut cmd, Some(&log));
        let gw_ns = &self.gw;
        wait_until("the server", Duration::from_secs(15), || {
            gw_ns.try_sh("curl -sf http://127.0.0.1:8080/healthz")
        });
        let gw_config = self.gateway_config(Some(("http://127.0.0.1:8080", &cred_file)));
        self.start_gateway(&gw_config, None);

        let agent_config = d.join("router-agent.toml");
        if !agent_config.exists() {
            self.agent_config(None);
        }
        if !extra_terminals.is_empty() {
            let mut text = std::fs::read_to_string(&agent_config).unwrap();
            text.push_str(extra_terminals);
            std::fs::write(&agent_config, text).unwrap();
        }
        let out = vpnnat_test_support::run(
            self.agent_ns()
                .command(vpnnat_test_support::bin("router-agent"))
                .arg("--config")
                .arg(&agent_config)
                .args([
                    "enroll",
                    "--server",
                    "http://198.51.100.1:8080",
                    "--token",
                    &token,
                ]),
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("enrolled as site"));
        start_udp_responder(&mut self.pc, self.dir.path());
        self.start_agent(&agent_config, None);
    }

    /// The technician's view of the server (`GET path` after logging in).
    fn technician_get(&self, path: &str) -> serde_json::Value {
        let jar = self.dir.path().join("tech.cookies");
        self.gw.sh(&format!(
            "curl -sf -c {jar} -H 'Content-Type: application/json' \
             --data '{{\"name\":\"alice\",\"password\":\"tech password 1\"}}' \
             http://127.0.0.1:8080/api/v1/login >/dev/null",
            jar = jar.display()
        ));
        let out = self.gw.sh(&format!(
            "curl -sf -b {} http://127.0.0.1:8080{path}",
            jar.display()
        ));
        serde_json::from_str(&out).unwrap()
    }

    /// `POST /api/requests` on the agent; returns the created request.
    fn request(&self, terminals: &[&str]) -> serde_json::Value {
        let body = serde_json::json!({
            "requester_name": "Anna Schmidt",
            "level": "general",
            "urgency": "high",
            "phone": "+49 30 1234 567",
            "content": "The till does not print.",
            "terminals": terminals,
        });
        let (code, text) = self.agent_api("POST", "/api/requests", Some(&body.to_string()));
        assert_eq!(code, 201, "{text}\n{}", self.agent_log());
        serde_json::from_str(&text).unwrap()
    }

    fn agent_status(&self) -> serde_json::Value {
        let (code, text) = self.agent_api("GET", "/api/status", None);
        assert_eq!(code, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    }
}

/// A request from the page's API, the technician's traffic, isolation,
/// "end access now" and the tunnel's teardown.
fn serve_a_request(w: &World) {
    let created = w.request(&["pc-1"]);
    assert_eq!(created["warnings"], serde_json::json!([]), "pc-1 answers");
    let request = &created["request"];
    let id = request["id"].as_u64().unwrap();
    let nat = request["terminals"][0]["nat_address"]
        .as_str()
        .unwrap()
        .to_owned();
    let number = request["acceptance_number"].as_str().unwrap().to_owned();

    let reached = (0..40).any(|_| {
        w.tech_http(&nat) || {
            std::thread::sleep(Duration::from_millis(250));
            false
        }
    });
    assert!(
        reached,
        "the technician never reached {nat}:\n{}",
        w.agent_log()
    );
    assert!(w.tech_ping(&nat));
    tcp_echo_transfer(&w.tech, &nat, 1_000_000);
    assert!(udp_exchange(&w.tech, &nat));
    // Nothing else on the LAN: another pool address, the real addresses.
    assert!(!w.tech_ping("10.64.0.200"));
    w.tech.sh("ip route add 192.168.1.0/24 via 172.16.0.1");
    assert!(!w.tech_http("192.168.1.10"));
    assert!(!w.tech_ping("192.168.1.11"));

    // The technician console shows the request, never a real LAN address.
    let requests = w.technician_get("/api/v1/requests");
    let listed = requests
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["acceptance_number"] == number.as_str())
        .expect("the request is in the console");
    assert_eq!(listed["state"], "waiting");
    assert!(!requests.to_string().contains("192.168.1."), "{requests}");
    assert_eq!(listed["global_address"], "198.51.100.11");

    // End access now: within a second the PC is unreachable.
    let t0 = Instant::now();
    let (code, text) = w.agent_api("POST", &format!("/api/requests/{id}/revoke"), None);
    assert_eq!(code, 200, "{text}");
    wait_until("the mapping removed", Duration::from_secs(1), || {
        w.agent_status()["mappings"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });
    let removed = t0.elapsed();
    assert!(
        !w.tech_ping(&nat),
        "PC still reachable after end access now"
    );
    assert!(!w.tech_http(&nat));
    println!("end access now → mapping removed after {removed:?}");
    wait_until("the tunnel torn down", Duration::from_secs(2), || {
        w.agent_status()["tunnel"].is_null()
    });
    let requests = w.technician_get("/api/v1/requests");
    assert!(requests.to_string().contains("\"revoked\""), "{requests}");
}

#[test]
fn netns_agent_packet_mode_serves_a_request_end_to_end() {
    if !require(PREREQS) {
        return;
    }
    let mut w = World::new("apk", AgentMode::Packet);
    w.start_center("");
    serve_a_request(&w);
    // A clean shutdown removes the agent's routes.
    let pid = w.agent_pid.take().unwrap();
    let status = w.router.terminate(pid, Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{}", w.agent_log());
    let routes = w.router.sh("ip -4 route show proto 118");
    assert!(routes.trim().is_empty(), "{routes}");
}

#[test]
fn netns_agent_netstack_mode_serves_a_request_end_to_end() {
    if !require(PREREQS) {
        return;
    }
    let mut w = World::new("ans", AgentMode::Netstack);
    w.start_center("");
    serve_a_request(&w);
}

#[test]
fn netns_agent_warns_about_silent_terminals_and_reports_failures() {
    if !require(PREREQS) {
        return;
    }
    let mut w = World::new("afl", AgentMode::Packet);
    // A watched terminal that is not there; the LAN link is watched too.
    let extra = "[[terminals]]\nname = \"nas\"\naddress = \"192.168.1.99\"\ncheck = \"ping\"\nwatch = true\n";
    let config = w.agent_config(None);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "[failures]\nlink_watch = false\n",
        "[failures]\nlink_watch = true\ncheck_interval_s = 1\nthreshold = 2\n",
    );
    std::fs::write(&config, text).unwrap();
    w.start_center(extra);
    // The page warns before a request about a terminal that does not answer,
    // and about a typed address with nothing behind it.
    let (code, text) = w.agent_api(
        "POST",
        "/api/check",
        Some(r#"{"terminals":["pc-1","nas","192.168.1.98"]}"#),
    );
    assert_eq!(code, 200, "{text}");
    let check: serde_json::Value = serde_json::from_str(&text).unwrap();
    let answers: Vec<bool> = check["terminals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["answers"].as_bool().unwrap())
        .collect();
    assert_eq!(answers, vec![true, false, false], "{check}");
    let created = w.request(&["nas"]);
    assert_eq!(created["warnings"][0]["terminal"], "nas", "{created}");

    // The watched terminal's failure reaches the technicians.
    wait_until(
        "the terminal failure report",
        Duration::from_secs(15),
        || {
            w.technician_get("/api/v1/failures")
                .to_string()
                .contains("terminal_unreachable")
        },
    );
    // The LAN link goes down (the PC's port leaves the bridge's only port down).
    w.router.sh("ip link set l-pc down");
    wait_until("the link failure report", Duration::from_secs(10), || {
        w.technician_get("/api/v1/failures")
            .to_string()
            .contains("lan_link_down")
    });
    w.router.sh("ip link set l-pc up");
    let failures = w.technician_get("/api/v1/failures");
    assert!(failures.to_string().contains("\"nas\""), "{failures}");
    assert!(w.agent_metric("vpnnat_agent_failure_reports_total{outcome=\"reported\"}") >= 2);
}
