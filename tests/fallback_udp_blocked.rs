//! A site whose router's firewall drops all outbound UDP: the agent tries
//! WireGuard over UDP, falls back by itself to the same tunnel over TLS on
//! the gateway's TCP 443, and the technician reaches the site's PC by its
//! NAT address. When the block is lifted the agent moves back to UDP and a
//! TCP session the technician held open across the move keeps echoing.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use vpnnat_test_support::fallback_world::{
    FallbackWorld, HeldEcho, PREREQS, UDP_PROBE_INTERVAL_S, UDP_TIMEOUT_S, metric,
};
use vpnnat_test_support::require;

#[test]
fn fallback_udp_blocked_tls_then_back_to_udp_keeps_the_session() {
    if !require(PREREQS) {
        return;
    }
    let mut w = FallbackWorld::up("fu");
    w.block_udp();
    w.start_agent(None);
    let nat = w.request_pc1();

    // Only TLS can carry the tunnel; the agent got there by itself after
    // trying UDP (its datagrams met the firewall).
    let fallback = Duration::from_secs(UDP_TIMEOUT_S + 25);
    w.wait_transport("tls", fallback);
    assert!(w.udp_dropped() > 0, "the agent never tried UDP");
    w.wait_shown_transport("tls", Duration::from_secs(15));
    w.tech_reaches(&nat, Duration::from_secs(20));
    assert_eq!(udp_received(&w), 0, "nothing came over UDP");
    let gw_metrics = w.gateway_metrics();
    assert!(
        gw_metrics
            .lines()
            .any(|l| l.starts_with("vpnnat_gateway_tls_streams_open") && l.ends_with(" 1")),
        "the gateway counts one open stream:\n{gw_metrics}"
    );

    // A session held across the move back to UDP.
    let held = HeldEcho::start(&w.tech, w.dir.path(), &nat);
    assert!(held.alive(Duration::from_secs(10)), "held session on TLS");
    w.open_uplink();
    w.wait_transport("udp", Duration::from_secs(UDP_PROBE_INTERVAL_S * 3 + 20));
    w.wait_shown_transport("udp", Duration::from_secs(15));
    // The same TCP session keeps echoing after the move (it may stall
    // while the gateway still answers on the closed stream, but it is not
    // reset), and then echoes steadily again.
    assert!(
        held.alive(Duration::from_secs(20)),
        "the held session died with the move back to UDP: {:?}\n{}",
        held.read(),
        std::fs::read_to_string(w.path("held-echo.log")).unwrap_or_default()
    );
    let (_, resumed) = held.read();
    std::thread::sleep(Duration::from_secs(3));
    let (open, now) = held.read();
    assert!(open && now > resumed + 5, "{resumed} → {now}");
    assert!(w.tech_http(&nat));
    // And the tunnel's datagrams now do arrive over UDP.
    let udp_now = udp_received(&w);
    assert!(held.alive(Duration::from_secs(5)));
    assert!(
        udp_received(&w) > udp_now,
        "no datagram over UDP after the move"
    );
}

fn udp_received(w: &FallbackWorld) -> u64 {
    metric(
        &w.gateway_metrics(),
        "vpnnat_gateway_io_total{kind=\"udp_datagrams_received\"}",
    )
    .unwrap()
}
