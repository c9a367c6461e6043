//! The acceptance test of the product: the whole mission in network
//! namespaces, played by the real maintenance-server, two real
//! gateways and four real router agents (three in packet mode on their
//! routers, one of them behind a firewall that lets no UDP out, so its
//! tunnel runs over TLS; one in netstack mode behind its router's NAPT). The scenario is
//! `vpnnat_test_support::mission`, shared with the demo (`scripts/demo.sh`).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use vpnnat_test_support::mission;

#[test]
fn e2e_mission_four_sites_two_gateways_failover_and_restart() {
    if !vpnnat_test_support::require(mission::PREREQS) {
        return;
    }
    let outcome = mission::run(mission::Options {
        world: format!("vne{}", std::process::id() % 100_000),
        keep: false,
        samples: 5,
    });
    assert_eq!(outcome.rows.len(), 4);
    assert!(outcome.rows.iter().all(|r| r.reached));
    let (p50, p99) = mission::percentiles(&outcome.press_to_tcp);
    // Figures only: speed is measured by scripts/bench-e2e.sh, not asserted.
    println!(
        "button → TCP p50 {p50:?} p99 {p99:?}; end → gone {:?}; failover {:?}",
        outcome.end_to_gone, outcome.failover
    );
}
