//! The acceptance test of the product: the whole mission in network
//! namespaces, played by the real maintenance-server, two real
//! gateways, five real router agents (three in packet mode on their
//! routers, one of them behind a firewall that lets no UDP out, so its
//! tunnel runs over TLS; one in netstack mode behind its router's NAPT; one
//! on an IPsec site, dialing IKEv2) and a site router without an agent:
//! strongSwan, configured by hand from the IPsec parameters the server gives
//! the operator. Both gateways are killed in turn; every site is reached
//! again through the other one. The scenario is
//! `vpnnat_test_support::mission`, shared with the demo (`scripts/demo.sh`).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use vpnnat_test_support::mission;

#[test]
fn e2e_mission_seven_sites_two_gateways_failover_and_restart() {
    if !vpnnat_test_support::require(mission::PREREQS) {
        return;
    }
    let outcome = mission::run(mission::Options {
        world: format!("vne{}", std::process::id() % 100_000),
        keep: false,
        samples: 5,
    });
    assert_eq!(outcome.rows.len(), 7);
    assert!(outcome.rows.iter().all(|r| r.reached));
    // Both IPsec sites (the agent's and the strongSwan router's) and the
    // WireGuard router without an agent failed over.
    for kind in [
        mission::Tunnel::IpsecAgent,
        mission::Tunnel::IpsecRouter,
        mission::Tunnel::WireguardRouter,
    ] {
        assert!(
            outcome.failovers.iter().any(|f| f.tunnel == kind),
            "{kind:?} failed over"
        );
    }
    let (p50, p99) = mission::percentiles(&outcome.press_to_tcp);
    // Figures only: speed is measured by scripts/bench-e2e.sh, not asserted.
    println!(
        "button → TCP p50 {p50:?} p99 {p99:?}; end → gone {:?}; failover of site 2 {:?}",
        outcome.end_to_gone, outcome.failover
    );
    for f in &outcome.failovers {
        println!(
            "failover [{}] {} ({}): {} → {}, reached after {:?}",
            f.step,
            f.site,
            f.tunnel.label(),
            f.from,
            f.to,
            f.reached
        );
    }
}
