//! When the site's gateway dies and no other gateway has room, the agent
//! shows its tunnel down within seconds (the server's failover reports the
//! site stranded), not only once WireGuard gives up after minutes, and the
//! customer's page says why.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use vpnnat_test_support::agent_world::{AgentWorld, PREREQS};
use vpnnat_test_support::{require, wait_until};

#[test]
fn security_agent_shows_a_dead_gateway_as_down_within_seconds() {
    if !require(PREREQS) {
        return;
    }
    let mut w = AgentWorld::up("ast");
    let (_, nat) = w.request_pc1();
    wait_until(
        "the technician reaches the PC",
        Duration::from_secs(20),
        || w.tech_http(&nat),
    );
    let (_, o) = w.agent_api("GET", "/api/overview", None);
    assert_eq!(o["tunnel_state"], "up", "{o}");

    w.kill_gateway();
    let t0 = Instant::now();
    // The server marks it down after down_after_ms (5 s here); the agent
    // hears of it at once through its long-poll.
    wait_until("the tunnel shown down", Duration::from_secs(30), || {
        w.agent_api("GET", "/api/overview", None).1["tunnel_state"] == "down"
    });
    println!(
        "gateway killed → tunnel shown down after {:?}",
        t0.elapsed()
    );
    let (_, o) = w.agent_api("GET", "/api/overview", None);
    assert_eq!(o["tunnel_up"], false, "{o}");
    assert!(
        o["problem"].as_str().is_some_and(|p| p.contains("gateway")),
        "the page says why: {o}"
    );
    let (_, s) = w.agent_api("GET", "/api/status", None);
    assert_eq!(s["tunnel"]["state"], "down", "{s}");
}
