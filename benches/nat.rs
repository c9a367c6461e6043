//! Cost of one 1:1 NAT rewrite (`vpnnat::nat::StaticNat`) per packet, for
//! TCP packets of 64, 576 and 1400 bytes, with 10 and with 100 000 mappings
//! installed, in both directions.
//!
//! Each iteration rewrites a packet through the table and then through the
//! inverse table (real → NAT), which restores the buffer, so no copy is
//! timed; the throughput is counted as 2 packets per iteration. The packets
//! cycle through 256 different mappings spread over the table, so the hash
//! lookups do not all hit one cache line.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use etherparse::PacketBuilder;
use vpnnat::nat::{NatConfig, StaticNat, Verdict};

const TECH: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 50);
const PACKETS: usize = 256;

fn nat_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::from_bits(Ipv4Addr::new(10, 64, 0, 1).to_bits() + i as u32)
}

fn real_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::from_bits(Ipv4Addr::new(100, 64, 0, 1).to_bits() + i as u32)
}

fn tcp(src: Ipv4Addr, dst: Ipv4Addr, size: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(size);
    let payload = vec![0x5a; size - 40];
    PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
        .tcp(40000, 3389, 1, 64000)
        .ack(1)
        .write(&mut p, &payload)
        .expect("a TCP packet");
    assert_eq!(p.len(), size);
    p
}

/// The table, its inverse, and which mappings the packets use.
fn tables(mappings: usize) -> (StaticNat, StaticNat, Vec<usize>) {
    let mut forward = StaticNat::with_capacity(NatConfig::default(), mappings);
    let mut inverse = StaticNat::with_capacity(NatConfig::default(), mappings);
    for i in 0..mappings {
        forward
            .insert(nat_addr(i), real_addr(i), None)
            .expect("insert");
        inverse
            .insert(real_addr(i), nat_addr(i), None)
            .expect("insert");
    }
    let used = (0..PACKETS).map(|k| k * mappings / PACKETS).collect();
    (forward, inverse, used)
}

fn rewrite(c: &mut Criterion) {
    let now = Instant::now();
    let mut group = c.benchmark_group("nat");
    group
        .throughput(Throughput::Elements(2))
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for mappings in [10, 100_000] {
        let (mut forward, mut inverse, used) = tables(mappings);
        for size in [64, 576, 1400] {
            let mut inbound: Vec<Vec<u8>> =
                used.iter().map(|i| tcp(TECH, nat_addr(*i), size)).collect();
            group.bench_function(
                BenchmarkId::new(format!("inbound/{size}B"), mappings),
                |b| {
                    let mut k = 0;
                    b.iter(|| {
                        let p = &mut inbound[k % PACKETS];
                        k += 1;
                        let a = forward.translate_inbound(black_box(p), now);
                        let b = inverse.translate_inbound(black_box(p), now);
                        debug_assert!(a == Verdict::Forward && b == Verdict::Forward);
                        (a, b)
                    });
                },
            );
            let mut outbound: Vec<Vec<u8>> = used
                .iter()
                .map(|i| tcp(real_addr(*i), TECH, size))
                .collect();
            group.bench_function(
                BenchmarkId::new(format!("outbound/{size}B"), mappings),
                |b| {
                    let mut k = 0;
                    b.iter(|| {
                        let p = &mut outbound[k % PACKETS];
                        k += 1;
                        let a = forward.translate_outbound(black_box(p), now);
                        let b = inverse.translate_outbound(black_box(p), now);
                        debug_assert!(a == Verdict::Forward && b == Verdict::Forward);
                        (a, b)
                    });
                },
            );
            // Every packet made the round trip unharmed.
            assert_eq!(forward.drops().total() + inverse.drops().total(), 0);
            assert!(
                inbound
                    .iter()
                    .zip(&used)
                    .all(|(p, i)| p[16..20] == nat_addr(*i).octets())
            );
        }
    }
    group.finish();
}

criterion_group!(benches, rewrite);
criterion_main!(benches);
