//! The center is not reachable from customer sites: with a site's request
//! open at the real `gateway` (its NAT address in the desired state), the
//! mapped PC and a rogue on the customer's router (who holds the site's
//! WireGuard key and sends from the NAT address itself) try the
//! maintenance server's API port, the technician's SSH port, a gateway's
//! status port and UDP services; nothing arrives on the center side, the
//! gateway counts the drops, and the technician's own connections to the PC
//! still work. Toward the site, only technicians' sources pass.
#![allow(clippy::unwrap_used)]

mod gateway_support;

use std::time::Duration;

use gateway_support::{PREREQS, World};
use vpnnat_test_support::echo::{ping_within, tcp_echo_transfer};
use vpnnat_test_support::{Netns, require, wait_until};

/// The maintenance server's address on the center LAN (docs/DESIGN.md,
/// "Address plan"; the mission's server).
const SERVER: &str = "172.16.0.10";
const TECH: &str = "172.16.0.50";
/// The gateway's own address on the center LAN (its status port listens on
/// every address in this test, as an operator might configure it).
const GATEWAY: &str = "172.16.0.1";
const NAT: &str = "10.64.0.5";

/// An nft counter in `ns`'s input hook for packets matching each of `rules`.
fn watch(ns: &Netns, rules: &[&str]) {
    ns.sh("nft add table ip watch && nft add chain ip watch in '{ type filter hook input priority -300; }'");
    for rule in rules {
        ns.sh(&format!("nft add rule ip watch in '{rule} counter'"));
    }
}

/// The packet counts of `ns`'s watch rules, in order.
fn watched(ns: &Netns) -> Vec<u64> {
    ns.sh("nft list chain ip watch in")
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.position(|x| x == "packets")?;
            w.next()?.parse().ok()
        })
        .collect()
}

/// A TCP connection from `ns` (bound to `source`, if any) to `dst:port`,
/// given 2 s: whether it was established.
fn connects(ns: &Netns, source: Option<&str>, dst: &str, port: u16) -> bool {
    let bind = source.map_or("None".to_owned(), |s| format!("(\"{s}\", 0)"));
    ns.try_sh(&format!(
        "python3 -c 'import socket; socket.create_connection((\"{dst}\", {port}), timeout=2, source_address={bind}).close()'"
    ))
}

/// UDP datagrams from `ns` (bound to `source`) to `dst:port`.
fn send_udp(ns: &Netns, source: &str, dst: &str, port: u16) {
    ns.sh(&format!(
        "python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((\"{source}\", 0)); [s.sendto(b\"hello center\", (\"{dst}\", {port})) for _ in range(3)]'"
    ));
}

#[test]
fn security_sites_cannot_open_connections_to_the_center() {
    if !require(PREREQS) {
        return;
    }
    let mut w = World::new("sc", "via 172.16.0.1");
    // The gateway's status port on all addresses: reachable from the center
    // LAN, and (before the flow table) from every site.
    let config = std::fs::read_to_string(&w.config).unwrap();
    std::fs::write(
        &w.config,
        config.replace("listen = \"127.0.0.1:9101\"", "listen = \"0.0.0.0:9101\""),
    )
    .unwrap();
    let site = w.add_site(&[NAT]);
    w.set_peers(&w.desired(1, &[(&site, 3)]));
    // The server's address on the center LAN, next to the technician; what
    // listens there and on the technician's SSH port.
    w.tech.sh(&format!("ip addr add {SERVER}/24 dev eth0"));
    let listeners = format!(
        "import socket, threading\n\
         def serve(addr):\n\
         \x20   s = socket.create_server(addr)\n\
         \x20   while True:\n\
         \x20       c, peer = s.accept()\n\
         \x20       print('accepted', addr, peer, flush=True)\n\
         \x20       c.close()\n\
         for a in [('{SERVER}', 8080), ('{TECH}', 22)]:\n\
         \x20   threading.Thread(target=serve, args=(a,), daemon=True).start()\n\
         u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         u.bind(('{TECH}', 5353))\n\
         while True:\n\
         \x20   print('datagram', u.recvfrom(2048), flush=True)\n"
    );
    let script = w.dir.path().join("center-listeners.py");
    std::fs::write(&script, listeners).unwrap();
    let listener_log = w.dir.path().join("center-listeners.log");
    let mut cmd = w.tech.command("python3");
    cmd.arg(&script);
    w.tech.spawn(&mut cmd, Some(&listener_log));
    w.start_gateway();
    wait_until("a handshake with the site", Duration::from_secs(20), || {
        w.status()["peers"][0]["latest_handshake"].is_u64()
    });
    wait_until("the center's listeners", Duration::from_secs(10), || {
        connects(&w.tech, None, SERVER, 8080)
    });
    assert!(
        connects(&w.tech, None, GATEWAY, 9101),
        "the status port is open on the center LAN"
    );
    // From here on, count what a site could open on the center's hosts: a
    // TCP SYN (without ACK) or a UDP datagram from the pool; and anything
    // that enters the gateway itself from its TUN device.
    watch(
        &w.tech,
        &[
            "ip saddr 10.64.0.0/16 tcp flags & (syn | ack) == syn",
            "ip saddr 10.64.0.0/16 meta l4proto udp",
        ],
    );
    watch(&w.gw, &["iifname \"vpnnat0\""]);

    // The technician's session works (and opens flows of its own).
    assert!(
        ping_within(&w.tech, NAT, Duration::from_secs(20)),
        "ping {NAT} failed; gateway log:\n{}",
        w.gateway_log()
    );
    let page = w.tech.sh(&format!("curl -sf --max-time 10 http://{NAT}/"));
    assert!(page.contains("site 1"), "{page}");

    // The mapped PC, then the rogue on the router with the site's key and
    // NAT address: the server's API, the technician's SSH, the gateway's
    // status port.
    let attempts: [(&Netns, Option<&str>); 2] = [(&site.pc, None), (&site.router, Some(NAT))];
    for (ns, source) in attempts {
        for (dst, port) in [(SERVER, 8080), (TECH, 22), (GATEWAY, 9101)] {
            assert!(
                !connects(ns, source, dst, port),
                "{} reached {dst}:{port} from the site",
                source.unwrap_or("the PC")
            );
        }
    }
    send_udp(&site.router, NAT, TECH, 5353);
    send_udp(&site.router, NAT, SERVER, 53);
    wait_until(
        "the gateway to count the site's attempts",
        Duration::from_secs(10),
        || {
            w.metric("vpnnat_gateway_drops_total{reason=\"site_initiated\"}") >= 6
                && w.metric("vpnnat_gateway_drops_total{reason=\"no_flow\"}") >= 6
        },
    );
    assert!(w.metric("vpnnat_gateway_peer_drops_total{site=\"3\",reason=\"site_initiated\"}") >= 6);
    // Nothing arrived: no connection attempt from the pool at the center's
    // hosts, no packet into the gateway.
    assert_eq!(
        watched(&w.tech),
        vec![0, 0],
        "connection attempts from the site reached the center"
    );
    assert_eq!(
        watched(&w.gw),
        vec![0],
        "packets from the site reached the gateway"
    );
    let log = std::fs::read_to_string(&listener_log).unwrap_or_default();
    let from_site: Vec<&str> = log.lines().filter(|l| l.contains("10.64.")).collect();
    assert!(
        from_site.is_empty(),
        "the center's services saw the site: {from_site:?}"
    );

    // The technician's connections still work, new ones included.
    tcp_echo_transfer(&w.tech, NAT, 256 << 10);
    let page = w.tech.sh(&format!("curl -sf --max-time 10 http://{NAT}/"));
    assert!(page.contains("site 1"), "{page}");
    assert!(ping_within(&w.tech, NAT, Duration::from_secs(5)));
}

#[test]
fn security_only_technician_prefixes_reach_a_site() {
    if !require(PREREQS) {
        return;
    }
    let mut w = World::new("st", "via 172.16.0.1");
    let site = w.add_site(&[NAT]);
    w.set_peers(&w.desired(1, &[(&site, 3)]));
    w.start_gateway();
    assert!(
        ping_within(&w.tech, NAT, Duration::from_secs(20)),
        "ping {NAT} failed; gateway log:\n{}",
        w.gateway_log()
    );
    // A center host outside the technician prefixes (default 172.16.0.0/24).
    w.tech.sh("ip addr add 172.16.9.9/24 dev eth0");
    w.gw.sh("ip route add 172.16.9.0/24 dev lan0");
    watch(&site.pc, &["ip saddr 172.16.9.9"]);
    assert!(
        !w.tech
            .try_sh(&format!("ping -c 2 -W 1 -I 172.16.9.9 {NAT}"))
    );
    assert!(!connects(&w.tech, Some("172.16.9.9"), NAT, 80));
    wait_until(
        "the gateway to count the foreign source",
        Duration::from_secs(10),
        || w.metric("vpnnat_gateway_drops_total{reason=\"not_technician\"}") >= 3,
    );
    assert_eq!(watched(&site.pc), vec![0], "the PC saw a foreign source");
    // The technician still gets through.
    assert!(ping_within(&w.tech, NAT, Duration::from_secs(5)));
}
