//! ESP with AES-GCM-256 (`vpnnat::ipsec::esp`) on one core: sealing and
//! opening 1420-byte inner packets in place, as the data plane does.
//!
//! - `seal`: one inner packet sealed per iteration in the same buffer (its
//!   first byte restored each time, since sealing encrypts it).
//! - `open`: a batch of 256 packets sealed beforehand opened in place (each
//!   round with a fresh receiving SA, untimed, so that none is a replay).
//!
//! Time is the benchmark thread's CPU time, not wall time, so the figure is
//! per core even on a machine other jobs share (`openssl speed` also counts
//! CPU time). It is read from `/proc/thread-self/schedstat` (nanoseconds on
//! a CPU, brought up to date at least every scheduler tick), so samples are
//! long: 10 flat samples of about a second each.
//!
//! The throughput counts inner bytes; Gbit/s = GiB/s × 8.59.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
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

/// Nanoseconds this thread has run on a CPU.
fn cpu_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    stat.split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .expect("schedstat's first field")
}

fn esp(c: &mut Criterion) {
    let mut group = c.benchmark_group("esp_aes256gcm");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));

    group.throughput(Throughput::Bytes(INNER as u64));
    group.bench_function("seal_1420", |b| {
        let mut tx = OutboundSa::new(SPI, &KEYMAT);
        let mut buf = vec![0u8; sealed_len(INNER)];
        buf[HEADER_LEN..HEADER_LEN + INNER].copy_from_slice(&inner());
        b.iter_custom(|iters| {
            let start = cpu_ns();
            for _ in 0..iters {
                buf[HEADER_LEN] = 0x45;
                black_box(tx.seal_in_place(&mut buf, INNER).expect("seal"));
            }
            Duration::from_nanos(cpu_ns() - start)
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
        let mut packets = batch.clone();
        b.iter_custom(|iters| {
            let mut spent = 0;
            for _ in 0..iters {
                // Untimed: a fresh SA (so nothing is a replay) and the
                // ciphertexts back in place.
                let mut rx = InboundSa::new(SPI, &KEYMAT);
                for (p, sealed) in packets.iter_mut().zip(&batch) {
                    p.copy_from_slice(sealed);
                }
                let start = cpu_ns();
                for p in packets.iter_mut() {
                    black_box(rx.open_in_place(p).expect("open"));
                }
                spent += cpu_ns() - start;
            }
            Duration::from_nanos(spent)
        });
    });
    group.finish();
}

criterion_group!(benches, esp);
criterion_main!(benches);
