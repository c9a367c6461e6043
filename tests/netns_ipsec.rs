//! IPsec through the real programs in network namespaces: the router agent
//! on an IPsec site dials the real gateway (IKEv2, then ESP in UDP, all to
//! the gateway's NAT-T port 4500: RFC 7296 §2.23, RFC 3948), and the
//! technician pings the site's PC and opens TCP to it by its NAT address.
//!
//! ```text
//!  tech 172.16.0.50 ──lan0── gw (gateway: WireGuard 51820, IKE 500, NAT-T 4500)
//!                            │ inet bridge 198.51.100.1/24
//!                            └── router wan0 198.51.100.11 (router-agent in packet mode,
//!                                  │                          or NAPT to its WAN)
//!                                  └── lan0 bridge 192.168.1.1/24
//!                                        ├── pc 192.168.1.10 (HTTP :80, TCP echo :7)
//!                                        └── ah 192.168.1.20 (router-agent in netstack mode)
//! ```
//!
//! Behind the NAPT the agent's NAT-T port is translated (a real NAT,
//! RFC 3948), as at most customers.
//!
//! Every address lives in namespaces created here (named per run); none
//! has a default route. The namespaces and their processes go when the
//! world is dropped, also when an assertion fails.
#![allow(clippy::unwrap_used)]

mod gateway_support;

use std::time::Duration;

use gateway_support::{StandaloneAgent, World};
use vpnnat::messages::{IpsecParams, SiteId};
use vpnnat::tunnel::PrivateKey;
use vpnnat_test_support::echo::{ping_within, tcp_echo_transfer};
use vpnnat_test_support::{Netns, Prereq, rand_bytes, repo_path, require, veth, wait_until};

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
const SITE: SiteId = SiteId(1);

/// Where the agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// On the router, packet mode (the LAN's router toward the center).
    Packet,
    /// On a LAN host behind the router's NAPT, netstack mode.
    NetstackBehindNapt,
}

/// The site's router, its PC and the agent's host when it is not the
/// router.
struct Site {
    router: Netns,
    _pc: Netns,
    ah: Option<Netns>,
}

impl Site {
    fn agent_ns(&mut self) -> &mut Netns {
        match self.ah.as_mut() {
            Some(ah) => ah,
            None => &mut self.router,
        }
    }
}

/// The site's IPsec parameters as the server hands them to the agent
/// (`local_*`: the site), with a random pre-shared key.
fn site_params(psk: &str) -> IpsecParams {
    IpsecParams::for_site(
        SITE,
        psk.to_owned(),
        vec![format!("{NAT}/32").parse().unwrap()],
        vec!["172.16.0.0/24".parse().unwrap()],
    )
}

/// The router (WAN on the gateway's "internet" bridge) and the PC behind
/// it, serving `scripts/lan-pc.py`; behind a NAPT, the agent's host too.
fn add_site(w: &World, mode: Mode) -> Site {
    let router = Netns::new("ipr");
    let mut pc = Netns::new("ipp");
    veth(
        &w.gw,
        "site1",
        None,
        &router,
        "wan0",
        Some("198.51.100.11/24"),
    );
    w.gw.sh("ip link set site1 master inet");
    router.sh(
        "ip link add lan0 type bridge && ip addr add 192.168.1.1/24 dev lan0 && ip link set lan0 up \
         && sysctl -qw net.ipv4.ip_forward=1",
    );
    veth(&router, "l-pc", None, &pc, "eth0", Some("192.168.1.10/24"));
    router.sh("ip link set l-pc master lan0");
    let ah = (mode == Mode::NetstackBehindNapt).then(|| {
        let ah = Netns::new("ipa");
        veth(&router, "l-ah", None, &ah, "eth0", Some("192.168.1.20/24"));
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
        ah
    });
    // Replies to the center go through the router; deliberately no default route.
    pc.sh("ip route add 172.16.0.0/24 via 192.168.1.1");
    let mut cmd = pc.command("python3");
    cmd.arg(repo_path("scripts/lan-pc.py")).arg("site 1");
    pc.spawn(&mut cmd, Some(&w.dir.path().join("pc.log")));
    let pcr = &pc;
    wait_until("the LAN PC's HTTP server", Duration::from_secs(10), || {
        pcr.try_sh("python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 80), 0.2)'")
    });
    Site {
        router,
        _pc: pc,
        ah,
    }
}

/// Counters of UDP datagrams arriving at the gateway's ports 500 and 4500
/// (an nftables table in the gateway's namespace).
fn count_ike_ports(w: &World) {
    w.gw.sh("nft -f - <<'EOF'\n\
         table inet ipsec_count {\n\
           counter ike {}\n\
           counter nat_t {}\n\
           chain input { type filter hook input priority 0; policy accept;\n\
             udp dport 500 counter name ike\n\
             udp dport 4500 counter name nat_t\n\
           }\n\
         }\n\
         EOF");
}

/// Bytes counted by the named counter of [`count_ike_ports`] (bytes, not
/// packets: UDP GRO may merge datagrams before the input hook).
fn counted(w: &World, name: &str) -> u64 {
    let out =
        w.gw.sh(&format!("nft list counter inet ipsec_count {name}"));
    out.split_whitespace()
        .skip_while(|t| *t != "bytes")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {out}"))
}

/// Whether the technician gets the PC's page through the NAT address (one try).
fn tech_http(w: &World) -> bool {
    w.tech
        .command("curl")
        .args(["-s", "--max-time", "2", &format!("http://{NAT}/")])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("PC 192.168.1.10 at site 1"))
}

#[test]
fn netns_ipsec_agent_site_reaches_the_gateway_and_the_technician_reaches_the_pc() {
    if !require(PREREQS) {
        return;
    }
    agent_site_through_the_gateway("ips", Mode::Packet);
}

#[test]
fn netns_ipsec_netstack_agent_behind_a_napt_reaches_the_gateway() {
    if !require(PREREQS) {
        return;
    }
    agent_site_through_the_gateway("ipt", Mode::NetstackBehindNapt);
}

fn agent_site_through_the_gateway(tag: &str, mode: Mode) {
    let mut w = World::new(tag, "dev eth0");
    let mut site = add_site(&w, mode);
    // A random pre-shared key, base64 as the server makes them.
    let psk = PrivateKey::from_bytes(rand_bytes()).to_base64();

    w.set_peers(&World::ipsec_desired(
        SITE,
        NAT,
        site_params(&psk).mirrored(),
    ));
    count_ike_ports(&w);
    w.start_gateway();
    let log = w.gateway_log();
    assert!(
        log.contains("IPsec ports bound") && log.contains("Ipsec"),
        "the gateway runs IPsec:\n{log}"
    );
    // The peer is applied without an error (a gateway without IPsec would
    // refuse it).
    wait_until(
        "the gateway's route to the site",
        Duration::from_secs(10),
        || w.gw.sh("ip -4 route show proto 118").contains(NAT),
    );

    let (mode, lan_if) = match mode {
        Mode::Packet => ("packet", "lan0"),
        Mode::NetstackBehindNapt => ("netstack", "eth0"),
    };
    // What the server hands out: the gateway's IKE port.
    let agent = StandaloneAgent::ipsec(
        w.dir.path(),
        mode,
        lan_if,
        "198.51.100.1:500",
        site_params(&psk),
        NAT,
    );
    agent.start(site.agent_ns());
    let agent_log = agent.log.clone();
    let logs = |w: &World| {
        format!(
            "--- agent\n{}\n--- gateway\n{}",
            std::fs::read_to_string(&agent_log).unwrap_or_default(),
            w.gateway_log()
        )
    };

    // TCP: the PC's page by its NAT address.
    let ok = (0..60).any(|_| {
        tech_http(&w) || {
            std::thread::sleep(Duration::from_millis(250));
            false
        }
    });
    assert!(ok, "the technician never reached the PC\n{}", logs(&w));
    // ICMP, and a bulk TCP transfer both ways through ESP.
    assert!(
        ping_within(&w.tech, NAT, Duration::from_secs(5)),
        "ping through the NAT address\n{}",
        logs(&w)
    );
    tcp_echo_transfer(&w.tech, NAT, 300_000);

    // The gateway shows the IPsec peer up, at the router's address (its
    // NAPT's, for an agent behind it), with traffic both ways.
    let status = w.status();
    let peers = status["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 1, "{status}");
    let p = &peers[0];
    assert!(p["handshakes"].as_u64().unwrap() >= 1, "{p}");
    assert!(
        p["endpoint"]
            .as_str()
            .unwrap()
            .starts_with("198.51.100.11:"),
        "{p}"
    );
    assert!(p["rx_packets"].as_u64().unwrap() > 100, "{p}");
    assert!(p["tx_packets"].as_u64().unwrap() > 100, "{p}");

    // Everything came to the NAT-T port (the echo's 300 kB and more): the
    // agent never uses 500.
    let (ike, nat_t) = (counted(&w, "ike"), counted(&w, "nat_t"));
    assert_eq!(ike, 0, "bytes to UDP 500\n{}", logs(&w));
    assert!(nat_t > 300_000, "bytes to UDP 4500: {nat_t}");
}

/// With its IPsec ports turned off the gateway binds neither 500 nor 4500,
/// runs WireGuard only, and refuses an IPsec site (no route for its NAT
/// address) instead of leaving it silent.
#[test]
fn netns_ipsec_gateway_without_ipsec_ports_refuses_ipsec_sites() {
    if !require(PREREQS) || !require(&[Prereq::Program("ss")]) {
        return;
    }
    let mut w = World::new("ipn", "dev eth0");
    let mut config = std::fs::read_to_string(&w.config).unwrap();
    config.push_str("[ipsec]\nike_listen = \"\"\nnat_t_listen = \"\"\n");
    std::fs::write(&w.config, config).unwrap();
    let psk = PrivateKey::from_bytes(rand_bytes()).to_base64();
    w.set_peers(&World::ipsec_desired(
        SITE,
        NAT,
        site_params(&psk).mirrored(),
    ));
    w.start_gateway();
    wait_until("the peers file applied", Duration::from_secs(10), || {
        w.gateway_log().contains("cannot run")
    });
    let log = w.gateway_log();
    assert!(!log.contains("IPsec ports bound"), "{log}");
    let udp = w.gw.sh("ss -Huln");
    assert!(udp.contains(":51820"), "{udp}");
    assert!(!udp.contains(":500 ") && !udp.contains(":4500 "), "{udp}");
    assert!(!w.gw.sh("ip -4 route show proto 118").contains(NAT));
}
