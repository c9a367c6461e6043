//! ESP with AES-GCM-256 (`vpnnat::ipsec::esp`) on one core: sealing and
//! opening 1420-byte inner packets in place, as the data plane does.
//!
//! - `seal`: one inner packet sealed per iteration in the same buffer (its
//!   first byte restored each time, since sealing encrypts it).
//! - `open`: a batch of packets sealed beforehand (in untimed setup, with a
//!   fresh receiving SA so that none is a replay) opened in place.
//!
//! The throughput counts inner bytes; Gbit/s = GiB/s × 8.59.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use vpnnat::ipsec::esp::{HEADER_LEN, InboundSa, KEYMAT_LEN, OutboundSa, sealed_len};

const INNER: usize = 1420;
const BATCH: usize = 256;
const SPI: u32 = 0x0100_0001;
const KEYMAT: [u8; KEYMAT_LEN] = [0x42; KEYMAT_LEN];

fn inner() -> Vec<u8> {
    let mut p: Vec<u8> = (0..INNER).map(|i| i as u8).collect();
    p[0] = 0x45;
    p
}

fn esp(c: &mut Criterion) {
    let mut group = c.benchmark_group("esp_aes256gcm");

    group.throughput(Throughput::Bytes(INNER as u64));
    group.bench_function("seal_1420", |b| {
        let mut tx = OutboundSa::new(SPI, &KEYMAT);
        let mut buf = vec![0u8; sealed_len(INNER)];
        buf[HEADER_LEN..HEADER_LEN + INNER].copy_from_slice(&inner());
        b.iter(|| {
            buf[HEADER_LEN] = 0x45;
            black_box(tx.seal_in_place(&mut buf, INNER).expect("seal"))
        });
    });

    group.throughput(Throughput::Bytes((INNER * BATCH) as u64));
    group.bench_function("open_1420", |b| {
        let mut tx = OutboundSa::new(SPI, &KEYMAT);
        let packet = inner();
        let batch: Vec<Vec<u8>> = (0..BATCH)
            .map(|_| {
                let mut out = vec![0u8; sealed_len(INNER)];
                tx.seal(&packet, &mut out).expect("seal");
                out
            })
            .collect();
        b.iter_batched_ref(
            || (InboundSa::new(SPI, &KEYMAT), batch.clone()),
            |(rx, packets)| {
                for p in packets.iter_mut() {
                    black_box(rx.open_in_place(p).expect("open"));
                }
            },
            BatchSize::LargeInput,
        );
    });
    group.finish();
}

criterion_group!(benches, esp);
criterion_main!(benches);
