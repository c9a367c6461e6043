//! What a gateway does when something around it fails, so that pool traffic
//! never goes astray: a gateway cut off from the maintenance server withdraws
//! its NAT addresses once its lease runs out (a moved site is never answered
//! by two gateways), and pool traffic is discarded, never routed elsewhere,
//! when the gateway's TUN device disappears.
#![allow(clippy::unwrap_used)]

mod gateway_support;

use std::time::Duration;

use gateway_support::{PREREQS, World};
use vpnnat::messages::{GatewayDesiredState, GatewayId, GatewayPeer, SiteId, TunnelKind};
use vpnnat::tunnel::PrivateKey;
use vpnnat_test_support::echo::ping_within;
use vpnnat_test_support::mission;
use vpnnat_test_support::{Netns, rand_bytes, require, veth, wait_until};

#[test]
fn security_gateway_cut_off_from_the_server_withdraws_its_addresses() {
    if !require(mission::PREREQS) {
        return;
    }
    mission::partition::gateway_cut_off(format!("vsl{}", std::process::id() % 100_000));
}

#[test]
fn security_gateway_pool_traffic_is_discarded_when_the_tun_device_disappears() {
    if !require(PREREQS) {
        return;
    }
    let mut w = World::new("bh", "dev eth0");
    // Another route on the gateway host that covers the pool (as a default
    // route toward an upstream router would), leading to a host that answers
    // for a NAT address: an impostor the pool's traffic must never reach.
    let impostor = Netns::new("bhi");
    veth(
        &w.gw,
        "up0",
        Some("192.0.2.1/30"),
        &impostor,
        "eth0",
        Some("192.0.2.2/30"),
    );
    w.gw.sh("ip route add 10.0.0.0/8 via 192.0.2.2 && sysctl -qw net.ipv4.conf.up0.forwarding=1");
    impostor.sh("ip addr add 10.64.0.5/32 dev lo && ip route add 172.16.0.0/24 via 192.0.2.1");

    w.set_peers(&GatewayDesiredState {
        next_keys: Vec::new(),
        version: 1,
        gateway_id: GatewayId(1),
        allowed_sources: Vec::new(),
        key_rotation: None,
        peers: vec![GatewayPeer {
            site_id: SiteId(3),
            public_key: PrivateKey::from_bytes(rand_bytes()).public_key(),
            nat_addresses: vec!["10.64.0.5".parse().unwrap()],
            tunnel: TunnelKind::Wireguard,
            ipsec: None,
            tls_token_sha256: None,
        }],
    });
    w.start_gateway();
    wait_until("the NAT address routed", Duration::from_secs(10), || {
        w.gw.sh("ip -4 route show 10.64.0.5/32 proto 118")
            .contains("dev vpnnat0")
    });
    let pool = w.gw.sh("ip -4 route show 10.64.0.0/16");
    assert!(pool.contains("dev vpnnat0"), "{pool}");
    assert!(
        pool.contains("blackhole"),
        "no blackhole for the pool:\n{pool}"
    );

    // The TUN device goes with the process; the kernel drops every route to
    // it (the proxy-ARP entry stays: the technician still sends here).
    let pid = w.gw_pid.take().unwrap();
    w.gw.kill(pid);
    wait_until("the TUN device gone", Duration::from_secs(10), || {
        !w.gw.try_sh("ip link show vpnnat0")
    });
    assert!(
        !ping_within(&w.tech, "10.64.0.5", Duration::from_secs(3)),
        "pool traffic followed another route after the TUN device disappeared"
    );
    let pool = w.gw.sh("ip -4 route show 10.64.0.0/16");
    assert!(pool.contains("blackhole"), "{pool}");

    // The next start takes the pool back over the same blackhole.
    w.start_gateway();
    wait_until("routed again", Duration::from_secs(10), || {
        w.gw.sh("ip -4 route show 10.64.0.5/32 proto 118")
            .contains("dev vpnnat0")
    });
    let blackholes = w.gw.sh("ip -4 route show 10.64.0.0/16 type blackhole");
    assert_eq!(blackholes.lines().count(), 1, "{blackholes}");
}
