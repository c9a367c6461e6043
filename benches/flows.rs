//! Cost of the gateway's flow table (only the center opens connections) per
//! packet, and the gateway core's whole per-packet path around it, in one
//! run:
//!
//! - `flow_table/center_to_site` and `flow_table/site_to_center`: one TCP
//!   packet of an existing flow through `vpnnat::gateway::flows::FlowTable`
//!   (lookup and refresh), with 256 and with 65 536 flows in the table; the
//!   packets cycle through 256 flows spread over it.
//! - `flow_table/new_flow`: a TCP SYN from the center that creates its flow
//!   (65 536 distinct flows; each round starts after the last one's expired,
//!   so entries are re-created, never refused).
//! - `gateway/tun_to_site`: `GatewayState::handle_tun_input_into` for a
//!   technician's TCP packet of 64 and 1400 bytes: route lookup, technician
//!   check, flow table, WireGuard encryption (boringtun).
//! - `gateway/tun_to_site_untracked`: the same path for a later fragment of
//!   the same size, which the flow table lets through at its first check
//!   (nothing to look up without ports): the path without the table's
//!   lookup, for the difference in the same run.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use etherparse::PacketBuilder;
use vpnnat::gateway::flows::{FlowLimits, FlowTable};
use vpnnat::gateway::{GatewayConfig, GatewayState, TunOutcome};
use vpnnat::ipv4::Ipv4Header;
use vpnnat::messages::{GatewayDesiredState, GatewayId, GatewayPeer, SiteId, TunnelKind};
use vpnnat::tunnel::PrivateKey;

const TECH: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 50);
const NAT: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 5);
const SITE: SiteId = SiteId(3);
const PACKETS: usize = 256;

fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, size: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(size);
    PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1, 64000)
        .ack(1)
        .write(&mut p, &vec![0x5a; size - 40])
        .expect("a TCP packet");
    p
}

/// The technician's port of flow `i`: flows differ in the technician's port
/// and in the NAT address.
fn flow(i: usize) -> (Ipv4Addr, u16) {
    let nat = Ipv4Addr::from_bits(NAT.to_bits() + (i / 16_384) as u32);
    (nat, 1024 + (i % 16_384) as u16)
}

fn flow_table(c: &mut Criterion) {
    let now = Instant::now();
    let mut group = c.benchmark_group("flow_table");
    group
        .throughput(Throughput::Elements(1))
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for flows in [256, 65_536] {
        let mut table = FlowTable::new(FlowLimits::default(), now);
        for i in 0..flows {
            let (nat, port) = flow(i);
            let p = tcp(TECH, nat, port, 22, 40);
            let h = Ipv4Header::new_checked(&p).expect("IPv4");
            table.center_to_site(&h, SITE, now).expect("room");
        }
        let used: Vec<usize> = (0..PACKETS).map(|k| k * flows / PACKETS).collect();
        let down: Vec<Vec<u8>> = used
            .iter()
            .map(|i| {
                let (nat, port) = flow(*i);
                tcp(TECH, nat, port, 22, 64)
            })
            .collect();
        let up: Vec<Vec<u8>> = used
            .iter()
            .map(|i| {
                let (nat, port) = flow(*i);
                tcp(nat, TECH, 22, port, 64)
            })
            .collect();
        group.bench_function(BenchmarkId::new("center_to_site", flows), |b| {
            let mut k = 0;
            b.iter(|| {
                let p = &down[k % PACKETS];
                k += 1;
                let h = Ipv4Header::new_checked(black_box(p)).expect("IPv4");
                table.center_to_site(&h, SITE, now)
            });
        });
        group.bench_function(BenchmarkId::new("site_to_center", flows), |b| {
            let mut k = 0;
            b.iter(|| {
                let p = &up[k % PACKETS];
                k += 1;
                let h = Ipv4Header::new_checked(black_box(p)).expect("IPv4");
                table.site_to_center(&h, SITE, now)
            });
        });
        assert_eq!(table.len(), flows);
    }
    // New flows: 65 536 distinct ones, then the clock moves past their idle
    // time so that the next round re-creates them.
    let new: Vec<Vec<u8>> = (0..65_536)
        .map(|i| {
            let (nat, port) = flow(i);
            let mut p = tcp(TECH, nat, port, 22, 64);
            p[33] = 0x02; // SYN
            p
        })
        .collect();
    let mut table = FlowTable::new(FlowLimits::default(), now);
    group.bench_function("new_flow", |b| {
        let mut k = 0;
        let mut at = now;
        b.iter(|| {
            if k % new.len() == 0 {
                at += Duration::from_secs(61);
            }
            let p = &new[k % new.len()];
            k += 1;
            let h = Ipv4Header::new_checked(black_box(p)).expect("IPv4");
            table.center_to_site(&h, SITE, at)
        });
    });
    group.finish();
}

/// A gateway with one site whose boringtun client has completed a handshake.
fn connected_gateway(now: Instant) -> GatewayState {
    let gw_key = PrivateKey::from_bytes([0x42; 32]);
    let gw_public = x25519::PublicKey::from(gw_key.public_key().0);
    let mut gw = GatewayState::new(
        GatewayConfig {
            pool: Some("10.64.0.0/16".parse().expect("pool")),
            ..GatewayConfig::new(gw_key)
        },
        now,
    );
    let client_key = PrivateKey::from_bytes([7; 32]);
    gw.handle_control(
        &GatewayDesiredState {
            next_keys: Vec::new(),
            version: 1,
            gateway_id: GatewayId(1),
            allowed_sources: Vec::new(),
            key_rotation: None,
            peers: vec![GatewayPeer {
                site_id: SITE,
                public_key: client_key.public_key(),
                nat_addresses: vec![NAT],
                tunnel: TunnelKind::Wireguard,
                ipsec: None,
                tls_token_sha256: None,
            }],
        },
        now,
    );
    let mut client = Tunn::new(
        x25519::StaticSecret::from([7; 32]),
        gw_public,
        None,
        None,
        1,
        None,
    );
    let endpoint: SocketAddr = "198.51.100.7:40000".parse().expect("endpoint");
    let mut buf = vec![0; 2048];
    let TunnResult::WriteToNetwork(init) = client.format_handshake_initiation(&mut buf, true)
    else {
        panic!("no initiation")
    };
    let init = init.to_vec();
    gw.handle_network_input(endpoint, &init, now)
        .expect("initiation");
    let response = gw.poll_transmit().expect("a handshake response");
    let TunnResult::WriteToNetwork(keepalive) =
        client.decapsulate(None, &response.payload, &mut buf)
    else {
        panic!("no keepalive")
    };
    let keepalive = keepalive.to_vec();
    gw.handle_network_input(endpoint, &keepalive, now)
        .expect("keepalive");
    gw
}

fn gateway(c: &mut Criterion) {
    let now = Instant::now();
    let mut group = c.benchmark_group("gateway");
    group
        .throughput(Throughput::Elements(1))
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let mut gw = connected_gateway(now);
    let mut out = vec![0; 4096];
    for size in [64, 1400] {
        let packets: Vec<Vec<u8>> = (0..PACKETS)
            .map(|i| tcp(TECH, NAT, 1024 + i as u16, 22, size))
            .collect();
        group.bench_function(BenchmarkId::new("tun_to_site", format!("{size}B")), |b| {
            let mut k = 0;
            b.iter(|| {
                let p = &packets[k % PACKETS];
                k += 1;
                let sent = matches!(
                    gw.handle_tun_input_into(black_box(p), &mut out, now),
                    TunOutcome::Send { .. }
                );
                debug_assert!(sent);
                sent
            });
        });
    }
    for size in [64, 1400] {
        let packets: Vec<Vec<u8>> = (0..PACKETS)
            .map(|i| {
                let mut p = tcp(TECH, NAT, 1024 + i as u16, 22, size);
                p[6..8].copy_from_slice(&0x00b9u16.to_be_bytes()); // offset 1480 bytes
                p
            })
            .collect();
        group.bench_function(
            BenchmarkId::new("tun_to_site_untracked", format!("{size}B")),
            |b| {
                let mut k = 0;
                b.iter(|| {
                    let p = &packets[k % PACKETS];
                    k += 1;
                    let sent = matches!(
                        gw.handle_tun_input_into(black_box(p), &mut out, now),
                        TunOutcome::Send { .. }
                    );
                    debug_assert!(sent);
                    sent
                });
            },
        );
    }
    assert_eq!(gw.counters().drops.total(), 0);
    assert!(gw.flow_count() <= PACKETS);
    group.finish();
}

criterion_group!(benches, flow_table, gateway);
criterion_main!(benches);
