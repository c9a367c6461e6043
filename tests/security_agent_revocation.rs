//! "End access now" survives an outage and a crash: with the agent's link
//! to the server cut, the customer ends access; the agent is killed with
//! `kill -9` before it could tell the server; the link comes back and the
//! agent starts again. The mapping never returns (the revocation was kept
//! on disk), the server is told and closes the request, and a continuous
//! probe from the technician never reaches the PC after the button.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::Duration;

use vpnnat_test_support::agent_world::{AgentWorld, PREREQS};
use vpnnat_test_support::{require, wait_until};

#[test]
fn security_agent_end_access_now_survives_an_outage_and_kill_9() {
    if !require(PREREQS) {
        return;
    }
    let mut w = AgentWorld::up("arv");
    let (id, nat) = w.request_pc1();
    wait_until(
        "the technician reaches the PC",
        Duration::from_secs(20),
        || w.tech_http(&nat),
    );

    let probe = w.start_probe(&nat);
    wait_until("the probe reaches the PC", Duration::from_secs(20), || {
        std::fs::read_to_string(&probe).is_ok_and(|t| !t.is_empty())
    });
    w.cut_server_link();
    let (code, v) = w.agent_api("POST", &format!("/api/requests/{id}/revoke"), None);
    assert_eq!(code, 202, "ended here, the server not told: {v}");
    // A probe that started after this moment must never succeed.
    let ended = unix_nanos();
    w.kill_agent();
    w.restore_server_link();
    w.start_agent();

    // The server learns of it from the restarted agent.
    wait_until(
        "the request closed on the server",
        Duration::from_secs(30),
        || w.console_request(id)["state"] == "revoked",
    );
    // A while longer with the agent following the server again.
    std::thread::sleep(Duration::from_secs(3));
    let (_, status) = w.agent_api("GET", "/api/status", None);
    assert_eq!(
        status["mappings"].as_array().map(Vec::len),
        Some(0),
        "{status}\n{}",
        w.agent_log()
    );
    let after: Vec<u128> = std::fs::read_to_string(&probe)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|t| *t > ended)
        .collect();
    assert!(
        after.is_empty(),
        "the technician reached the PC after end access now ({} times); logs in {}\n{}",
        after.len(),
        w.logs().display(),
        w.agent_log()
    );
    assert!(!w.tech_http(&nat));
}

fn unix_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}
