//! What a rotation of the gateway's key costs a handshake: the gateway
//! core's whole answer to a WireGuard handshake initiation
//! (`GatewayState::handle_network_input` and the response it queues: mac1,
//! the key exchange, the new session) in one run,
//!
//! - steady: no rotation, the initiation addressed to the key;
//! - rotating, to the current key: a next key set, the initiation
//!   addressed to the current key (its mac1 is tried against the next key
//!   first);
//! - rotating, to the next key: the initiation addressed to the next key
//!   (the site's agent moved).
//!
//! Each initiation is made fresh by a boringtun client outside the timed
//! part, so every one is new to the gateway (a replayed one would be
//! refused early and measure nothing). No cookies: the handshake limit is
//! off. The three run in interleaved rounds (a load change of this shared
//! machine hits all alike) and the medians over the rounds are compared.
#![allow(clippy::print_stdout)] // a benchmark prints its figures

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;
use vpnnat::gateway::{GatewayConfig, GatewayState};
use vpnnat::messages::{GatewayDesiredState, GatewayId, GatewayPeer, SiteId, TunnelKind};
use vpnnat::tunnel::PrivateKey;

/// A gateway (key `0x42`, next key `0x43` when `rotating`) with site 3,
/// and that site's client dialing `dial`.
fn gateway_and_client(rotating: bool, dial: [u8; 32], now: Instant) -> (GatewayState, Tunn) {
    let mut gw = GatewayState::new(
        GatewayConfig {
            pool: Some("10.64.0.0/16".parse().expect("pool")),
            handshake_limit: u64::MAX,
            ..GatewayConfig::new(PrivateKey::from_bytes([0x42; 32]))
        },
        now,
    );
    if rotating {
        gw.set_next_key(Some(PrivateKey::from_bytes([0x43; 32])));
    }
    gw.handle_control(
        &GatewayDesiredState {
            next_keys: Vec::new(),
            version: 1,
            gateway_id: GatewayId(1),
            allowed_sources: Vec::new(),
            key_rotation: None,
            peers: vec![GatewayPeer {
                site_id: SiteId(3),
                public_key: PrivateKey::from_bytes([7; 32]).public_key(),
                nat_addresses: vec!["10.64.0.5".parse().expect("NAT address")],
                tunnel: TunnelKind::Wireguard,
                ipsec: None,
                tls_token_sha256: None,
            }],
        },
        now,
    );
    let dialed = x25519::PublicKey::from(PrivateKey::from_bytes(dial).public_key().0);
    let client = Tunn::new(
        x25519::StaticSecret::from([7; 32]),
        dialed,
        None,
        None,
        1,
        None,
    );
    (gw, client)
}

/// One variant: its gateway and client, and the per-handshake times of
/// its rounds.
struct Variant {
    name: &'static str,
    gw: GatewayState,
    client: Tunn,
    rounds: Vec<f64>,
}

/// Times `n` handshakes of `v` (each initiation made outside the timed
/// part); the mean per handshake, microseconds.
fn round(v: &mut Variant, n: usize, endpoint: SocketAddr, now: Instant) -> f64 {
    let mut buf = vec![0; 256];
    let mut spent = Duration::ZERO;
    for _ in 0..n {
        let init = match v.client.format_handshake_initiation(&mut buf, true) {
            TunnResult::WriteToNetwork(init) => init.to_vec(),
            _ => panic!("{}: no initiation", v.name),
        };
        let t0 = Instant::now();
        v.gw.handle_network_input(endpoint, black_box(&init), now)
            .expect("an initiation the gateway answers");
        let response = v.gw.poll_transmit();
        spent += t0.elapsed();
        assert!(
            response.is_some_and(|t| t.payload[0] == 2),
            "{}: no handshake response",
            v.name
        );
    }
    spent.as_secs_f64() * 1e6 / n as f64
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; a filter or `--test` (cargo test
    // --benches) runs one short round only.
    let quick = std::env::args().any(|a| a == "--test");
    let (rounds, per_round) = if quick { (1, 5) } else { (40, 200) };
    let now = Instant::now();
    let endpoint: SocketAddr = "198.51.100.7:40000".parse().expect("endpoint");
    let mut variants: Vec<Variant> = [
        ("steady", false, [0x42; 32]),
        ("rotating, initiation to the current key", true, [0x42; 32]),
        ("rotating, initiation to the next key", true, [0x43; 32]),
    ]
    .into_iter()
    .map(|(name, rotating, dial)| {
        let (gw, client) = gateway_and_client(rotating, dial, now);
        Variant {
            name,
            gw,
            client,
            rounds: Vec::new(),
        }
    })
    .collect();
    // Interleaved rounds: a change of the machine's load hits every
    // variant alike.
    for r in 0..rounds {
        for i in 0..variants.len() {
            // Each round starts with another variant.
            let v = &mut variants[(i + r) % 3];
            let t = round(v, per_round, endpoint, now);
            v.rounds.push(t);
        }
    }
    let base = median(&variants[0].rounds);
    println!(
        "handshake: {rounds} interleaved rounds of {per_round} handshakes; median per handshake:"
    );
    for v in &variants {
        let m = median(&v.rounds);
        println!(
            "  {:<42} {:>7.1} µs  ({:+.1} % against steady)",
            v.name,
            m,
            (m / base - 1.0) * 100.0
        );
    }
}
