//! Handshake floods against a real gateway with two data-plane workers:
//! mac1-valid initiations (they need only the gateway's public key) at
//! several thousand per second from many source ports, while 20 real router
//! agents rekey through the gateway. The scenario is
//! `vpnnat_test_support::handshake_flood`, shared with
//! `scripts/bench-handshake-flood.sh`.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use vpnnat::tunnel::PrivateKey;
use vpnnat::tunnel::wireguard::{Tunnel, TunnelConfig};
use vpnnat_test_support::handshake_flood::{self, Options};
use vpnnat_test_support::{rand_bytes, require};

/// Handshake initiations for `gateway` from `count` random static keys:
/// what anyone who knows a gateway's public key can send (mac1 is keyed by
/// that public key only; WireGuard paper §5.4.4).
pub fn initiations(gateway: &PrivateKey, count: usize) -> Vec<Vec<u8>> {
    let now = Instant::now();
    let mut buf = vec![0; 256];
    (0..count)
        .map(|i| {
            let key = PrivateKey::from_bytes(rand_bytes());
            let mut t = Tunnel::new(
                TunnelConfig::initiator(key, gateway.public_key(), i as u32 & 0xFFFF, None),
                now,
            );
            t.initiate_handshake(&mut buf, false, now)
                .unwrap()
                .unwrap()
                .to_vec()
        })
        .collect()
}

#[test]
fn security_handshake_flood_while_agents_rekey_through_two_workers() {
    if !require(handshake_flood::PREREQS) {
        return;
    }
    let gateway = PrivateKey::from_bytes(rand_bytes());
    let agents = 20;
    let slack = Duration::from_secs(10);
    let outcome = handshake_flood::run(&Options {
        agents,
        workers: 2,
        flood_rate: 5000,
        flood_ports: 128,
        gateway_key: gateway.to_base64(),
        initiations: initiations(&gateway, 1000),
        zero_length: 50,
        rekey_slack: slack,
    });
    println!("{}", outcome.summary(slack));
    // A zero-length datagram is a datagram: dropped and counted.
    assert!(
        outcome.zero_length_counted >= 50,
        "zero-length datagrams counted as malformed: {} of 50",
        outcome.zero_length_counted
    );
    // The flood really was several thousand per second.
    assert!(
        outcome.flood_rate() >= 2000.0,
        "the flooder reached only {:.0}/s",
        outcome.flood_rate()
    );
    // At least 95 % of the agents rekey within 10 s of Rekey-After-Time…
    let need = (agents * 95).div_ceil(100);
    let rekeyed = outcome.rekeyed_within(slack);
    assert!(
        rekeyed >= need,
        "only {rekeyed} of {agents} agents completed their rekey handshake within {slack:?} under the flood"
    );
    // …and their sessions survive it: the technician's pings still pass.
    let alive = outcome.alive();
    assert!(
        alive >= need,
        "only {alive} of {agents} sites still answer pings after the rekey period"
    );
}
