//! Interoperability: the real `gateway` binary (real TUN device, in its own
//! namespace) with a stock wireguard-go peer configured by `wg`, as a
//! customer would run it with only a standard WireGuard client (plus 1:1 NAT
//! of its NAT address onto a PC behind it).
#![allow(clippy::unwrap_used)]

mod gateway_support;

use std::time::Duration;

use gateway_support::{PREREQS, World};
use vpnnat_test_support::echo::{ping_within, tcp_echo_transfer};
use vpnnat_test_support::{require, wait_until};

fn wait_for_handshake(w: &World) {
    wait_until(
        "a handshake with wireguard-go",
        Duration::from_secs(20),
        || w.status()["peers"][0]["latest_handshake"].is_u64(),
    );
}

#[test]
fn interop_wireguard_go_handshake_ping_and_tcp_both_ways() {
    if !require(PREREQS) {
        return;
    }
    let mut w = World::new("iw", "dev eth0");
    let site = w.add_site(&["10.64.0.5"]);
    w.set_peers(&w.desired(1, &[(&site, 3)]));
    w.start_gateway();
    wait_for_handshake(&w);
    let hs = site
        .router
        .sh(&format!("wg show {} latest-handshakes", site.wg));
    let ts: u64 = hs.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(ts > 0, "wireguard-go saw no handshake: {hs}");

    // Technician → the PC behind the customer's router, by its NAT address.
    assert!(
        ping_within(&w.tech, "10.64.0.5", Duration::from_secs(10)),
        "ping 10.64.0.5 failed; gateway log:\n{}",
        w.gateway_log()
    );
    let page = w.tech.sh("curl -sf --max-time 10 http://10.64.0.5/");
    assert!(page.contains("site 1"), "{page}");
    tcp_echo_transfer(&w.tech, "10.64.0.5", 2 << 20);

    // The PC cannot open a connection to a service on the technician's
    // side: only the center opens connections (tests/security_center.rs).
    let lan_pc = vpnnat_test_support::repo_path("scripts/lan-pc.py");
    let mut svc = w.tech.command("python3");
    svc.arg(&lan_pc).arg("center");
    let log = w.dir.path().join("tech-svc.log");
    w.tech.spawn(&mut svc, Some(&log));
    wait_until(
        "the technician's echo service",
        Duration::from_secs(10),
        || w.tech.try_sh("curl -sf --max-time 2 http://172.16.0.50/"),
    );
    assert!(!site.pc.try_sh("curl -sf --max-time 2 http://172.16.0.50/"));
    tcp_echo_transfer(&w.tech, "10.64.0.5", 2 << 20);

    let status = w.status();
    let peer = &status["peers"][0];
    assert_eq!(peer["site_id"], 3);
    assert_eq!(peer["public_key"], site.key.public_key().to_base64());
    assert_eq!(peer["endpoint"], format!("{}:40001", site.wan));
    assert!(peer["rx_bytes"].as_u64().unwrap() > 4 << 20, "{peer}");
    assert!(peer["tx_bytes"].as_u64().unwrap() > 4 << 20, "{peer}");
    assert_eq!(status["drops"].get("spoofed_source"), None, "{status}");

    // `gateway status` prints the peer like `wg show`.
    let out = w.gw.sh(&format!(
        "{} status --url http://127.0.0.1:9101",
        vpnnat_test_support::bin("gateway").display()
    ));
    assert!(
        out.contains(&format!("peer: {}", site.key.public_key())),
        "{out}"
    );
    assert!(out.contains("  allowed ips: 10.64.0.5/32"), "{out}");
    assert!(out.contains("  latest handshake: "), "{out}");
    assert!(out.contains("  transfer: "), "{out}");
}

#[test]
fn interop_wireguard_go_peer_roams_and_traffic_continues() {
    if !require(PREREQS) {
        return;
    }
    let mut w = World::new("ir", "dev eth0");
    let site = w.add_site(&["10.64.0.5"]);
    w.set_peers(&w.desired(1, &[(&site, 3)]));
    w.start_gateway();
    wait_for_handshake(&w);
    assert!(ping_within(&w.tech, "10.64.0.5", Duration::from_secs(10)));
    assert_eq!(
        w.status()["peers"][0]["endpoint"],
        format!("{}:40001", site.wan)
    );

    // The customer's router gets a new address and port (a new uplink, or its
    // NAT rebinding); wireguard-go keeps its session.
    site.router.sh(&format!(
        "ip addr del {}/24 dev wan0 && ip addr add 198.51.100.99/24 dev wan0 \
         && wg set {} listen-port 40999",
        site.wan, site.wg
    ));
    wait_until(
        "the gateway to follow the peer",
        Duration::from_secs(15),
        || w.status()["peers"][0]["endpoint"] == "198.51.100.99:40999",
    );
    assert!(
        ping_within(&w.tech, "10.64.0.5", Duration::from_secs(10)),
        "no traffic after roaming; gateway log:\n{}",
        w.gateway_log()
    );
    tcp_echo_transfer(&w.tech, "10.64.0.5", 256 << 10);
    assert!(w.gateway_log().contains("peer endpoint changed"));
    // The session survived the move: no new handshake was needed for it.
    assert!(w.status()["peers"][0]["handshakes"].as_u64().unwrap() >= 1);
}
