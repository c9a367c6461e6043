//! The strongSwan harness itself (`vpnnat_test_support::strongswan` over
//! `scripts/strongswan-peer.sh`): two strongSwan peers with userspace ESP in
//! fresh namespaces joined by a veth carry traffic both ways, rekey the
//! CHILD_SA from either side and the IKE_SA, notice a killed peer by
//! dead-peer detection, and leave nothing behind. The interop tests use the
//! same harness with one side replaced by vpnnat.
//!
//! The "gateway" namespace answers at 198.51.100.1 for the technician prefix
//! 172.16.0.0/24 (172.16.0.50 on `lo`); the "site" namespace initiates from
//! 198.51.100.11 for the site's NAT addresses 10.64.1.0/24 (10.64.1.1 on
//! `lo`). No default route anywhere.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use vpnnat_test_support::strongswan::{IkeSa, PeerOptions, StrongSwan};
use vpnnat_test_support::{Netns, Prereq, require, veth, wait_until};

const PSK: &str = "strongswan-harness-psk-0123456789abcdef";
const SETTLE: Duration = Duration::from_secs(10);

fn prereqs() -> bool {
    require(&[
        Prereq::Root,
        Prereq::Tun,
        Prereq::Program("ip"),
        Prereq::Program("ping"),
        Prereq::StrongSwan,
    ])
}

/// The gateway's and the site's namespaces, joined by a veth.
fn namespaces() -> (Netns, Netns) {
    let gw = Netns::new("swgw");
    let site = Netns::new("swsite");
    veth(
        &gw,
        "wan0",
        Some("198.51.100.1/24"),
        &site,
        "wan0",
        Some("198.51.100.11/24"),
    );
    gw.ip(&["addr", "add", "172.16.0.50/32", "dev", "lo"]);
    site.ip(&["addr", "add", "10.64.1.1/32", "dev", "lo"]);
    (gw, site)
}

fn gateway_options() -> PeerOptions {
    PeerOptions {
        ike_proposals: Some("aes256gcm16-prfsha256-x25519".to_owned()),
        esp_proposals: Some("aes256gcm16-noesn".to_owned()),
        ..PeerOptions::new(
            "198.51.100.1",
            "198.51.100.11",
            PSK,
            "172.16.0.0/24",
            "10.64.1.0/24",
        )
    }
}

fn site_options() -> PeerOptions {
    PeerOptions {
        initiator: true,
        ike_proposals: Some("aes256gcm16-prfsha256-x25519".to_owned()),
        esp_proposals: Some("aes256gcm16-noesn".to_owned()),
        ..PeerOptions::new(
            "198.51.100.11",
            "198.51.100.1",
            PSK,
            "10.64.1.0/24",
            "172.16.0.0/24",
        )
    }
}

/// Both ends see the same IKE_SA and mirrored CHILD_SA SPIs; returns the
/// gateway's view.
fn agreed(gw: &StrongSwan, site: &StrongSwan) -> (IkeSa, IkeSa) {
    let g = gw.wait_established(SETTLE);
    let s = site.wait_established(SETTLE);
    assert_eq!((g.spi_i, g.spi_r), (s.spi_i, s.spi_r), "IKE SPIs");
    let (gc, sc) = (g.installed_child().unwrap(), s.installed_child().unwrap());
    assert_eq!((gc.spi_in, gc.spi_out), (sc.spi_out, sc.spi_in), "ESP SPIs");
    (g, s)
}

fn ping_both_ways(gw: &Netns, site: &Netns) {
    site.sh("ping -c 3 -i 0.2 -W 2 -I 10.64.1.1 172.16.0.50 >/dev/null");
    gw.sh("ping -c 3 -i 0.2 -W 2 -I 172.16.0.50 10.64.1.1 >/dev/null");
}

/// Waits until the installed CHILD_SA on both ends differs from `old`'s
/// (a rekey done and the old one gone) and both agree again.
fn wait_child_rekeyed(gw: &StrongSwan, site: &StrongSwan, old: &IkeSa) -> (IkeSa, IkeSa) {
    let old_spi = old.installed_child().unwrap().spi_in;
    wait_until("the CHILD_SA to be rekeyed", SETTLE, || {
        [gw, site].iter().all(|p| {
            p.sas().iter().any(|sa| {
                sa.installed_child()
                    .is_some_and(|c| c.spi_in != old_spi && c.spi_out != old_spi)
                    && sa.children.iter().all(|c| c.state == "INSTALLED")
            })
        })
    });
    agreed(gw, site)
}

#[test]
fn strongswan_harness_tunnel_carries_traffic_and_rekeys() {
    if !prereqs() {
        return;
    }
    let (gw_ns, site_ns) = namespaces();
    let gw = StrongSwan::start(&gw_ns, &gateway_options());
    let site = StrongSwan::start(&site_ns, &site_options());

    let (g, s) = agreed(&gw, &site);
    assert!(s.initiator && !g.initiator);
    assert_eq!(s.dh_group.as_deref(), Some("CURVE_25519"));
    // libipsec fakes a NAT, so IKE floated to the NAT-T port (RFC 7296 §2.23).
    assert_eq!(s.remote, "198.51.100.1:4500");
    assert_eq!(g.installed_child().unwrap().local_ts, ["172.16.0.0/24"]);
    assert_eq!(g.installed_child().unwrap().remote_ts, ["10.64.1.0/24"]);

    ping_both_ways(&gw_ns, &site_ns);
    let (g, s) = agreed(&gw, &site);
    for sa in [&g, &s] {
        let c = sa.installed_child().unwrap();
        assert!(
            c.packets_in >= 6 && c.packets_out >= 6 && c.bytes_in > 0,
            "ESP counters after 3 pings each way: {c:?}"
        );
    }

    // CHILD_SA rekey started by the initiator, then by the responder.
    site.rekey_child();
    let (g2, _) = wait_child_rekeyed(&gw, &site, &g);
    ping_both_ways(&gw_ns, &site_ns);
    gw.rekey_child();
    let (g3, _) = wait_child_rekeyed(&gw, &site, &g2);
    ping_both_ways(&gw_ns, &site_ns);
    let c = agreed(&gw, &site).0;
    assert!(c.installed_child().unwrap().packets_in >= 6, "{c:?}");
    assert_eq!(
        c.installed_child().unwrap().spi_in,
        g3.installed_child().unwrap().spi_in
    );

    // IKE_SA rekey from either side: new IKE SPIs, the CHILD_SA moves over.
    for (who, peer) in [("responder", &gw), ("initiator", &site)] {
        let before = agreed(&gw, &site).0;
        peer.rekey_ike();
        wait_until(&format!("the IKE_SA rekey by the {who}"), SETTLE, || {
            [&gw, &site].iter().all(|p| {
                let sas = p.sas();
                sas.len() == 1
                    && sas[0].state == "ESTABLISHED"
                    && (sas[0].spi_i, sas[0].spi_r) != (before.spi_i, before.spi_r)
                    && sas[0].uniqueid != before.uniqueid
            })
        });
        let after = agreed(&gw, &site).0;
        assert_eq!(
            after.installed_child().unwrap().spi_in,
            before.installed_child().unwrap().spi_in,
            "an IKE_SA rekey keeps the CHILD_SA"
        );
        ping_both_ways(&gw_ns, &site_ns);
    }
    assert!(gw.log().contains("rekeyed"), "charon logs the rekeys");
}

#[test]
fn strongswan_harness_dpd_notices_killed_peer_and_stop_cleans_up() {
    if !prereqs() {
        return;
    }
    let (gw_ns, site_ns) = namespaces();
    // The gateway checks liveness after 1 s of silence and gives up after
    // two retransmissions: 1 s + 1.8 s + 3.24 s (charon's back-off, base 1.8).
    let gw = StrongSwan::start(
        &gw_ns,
        &PeerOptions {
            dpd: Some("1s".to_owned()),
            retransmit_tries: Some(2),
            retransmit_timeout: Some("1.0".to_owned()),
            ..gateway_options()
        },
    );
    let mut site = StrongSwan::start(&site_ns, &site_options());
    agreed(&gw, &site);
    site_ns.sh("ping -c 2 -i 0.2 -W 2 172.16.0.50 >/dev/null");
    // The site's charon left its TUN device, routes and rule in the namespace.
    assert!(site_ns.try_sh("ip link show ipsec0"));
    assert!(site_ns.sh("ip rule").contains("lookup 220"));

    site.kill();
    wait_until(
        "the gateway to delete the dead peer's SAs",
        Duration::from_secs(20),
        || gw.sas().is_empty(),
    );
    let log = gw.log();
    assert!(
        log.contains("giving up after 2 retransmits"),
        "the gateway's DPD gave up on the killed peer"
    );
    assert!(
        !gw_ns.try_sh("ping -c 1 -W 1 -I 172.16.0.50 10.64.1.1"),
        "no tunnel is left to the dead peer"
    );

    // The killed charon could not clean up; stop does.
    site.stop();
    assert!(!site_ns.try_sh("ip link show ipsec0"), "ipsec0 removed");
    assert!(
        !site_ns.sh("ip rule").contains("lookup 220"),
        "rule removed"
    );
    assert!(
        site_ns
            .sh("ip route show table all")
            .lines()
            .all(|l| !l.contains("table 220"))
    );
}
