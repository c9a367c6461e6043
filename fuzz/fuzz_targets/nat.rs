//! Arbitrary bytes through the 1:1 NAT in both directions, with and without
//! masquerade, with live and expired mappings installed: nothing may panic,
//! a dropped packet must be left as it was, and a rewritten one must keep
//! its length and (if it had one) a valid IPv4 header checksum.
//!
//! The first input byte steers: bit 0 masquerade, bit 1 "make the outer
//! header plausible" (IPv4, IHL from the input, total length = input length,
//! header checksum recomputed), bits 2–3 which mapped address to put in the
//! source and destination, so that the fuzzer gets past the header checks
//! to the transport, ICMP-error and masquerade paths.
#![no_main]

use std::net::Ipv4Addr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vpnnat::nat::{NatConfig, StaticNat, Verdict};

const TECH: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 50);
const MASQ: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 250);

fn nat_addr(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 64, 0, 1 + i)
}

fn real_addr(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 1, 10 + i)
}

fn header_sum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Gives the outer header a chance: version 4, total length, addresses
/// chosen by `which`, a correct header checksum.
fn make_plausible(p: &mut [u8], which: u8, outbound: bool) {
    if p.len() < 20 {
        return;
    }
    let ihl = (usize::from(p[0] & 0x0f).max(5) * 4).min(p.len() / 4 * 4);
    p[0] = 0x40 | (ihl / 4) as u8;
    let len = u16::try_from(p.len()).unwrap_or(u16::MAX);
    p[2..4].copy_from_slice(&len.to_be_bytes());
    let (src, dst) = match (which, outbound) {
        (0, false) => (TECH, nat_addr(0)),
        (0, true) => (real_addr(0), TECH),
        (1, false) => (TECH, nat_addr(3)),
        (1, true) => (real_addr(0), MASQ),
        (2, _) => (MASQ, real_addr(1)),
        _ => return,
    };
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[10] = 0;
    p[11] = 0;
    let c = header_sum(&p[..ihl]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
}

fn check(nat: &mut StaticNat, p: &mut [u8], outbound: bool, now: Instant) -> Verdict {
    let before = p.to_vec();
    // smoltcp skips checksum verification under `cfg(fuzzing)`, so the NAT
    // accepts bad header checksums here; an incremental update must keep a
    // good one good.
    let ihl = usize::from(before.first().map_or(0, |b| b & 0x0f)) * 4;
    let was_valid = ihl >= 20 && before.len() >= ihl && header_sum(&before[..ihl]) == 0;
    let v = if outbound {
        nat.translate_outbound(p, now)
    } else {
        nat.translate_inbound(p, now)
    };
    match v {
        Verdict::Drop(_) => assert_eq!(p, &before[..], "a dropped packet was changed"),
        Verdict::Forward => {
            assert_eq!(p.len(), before.len());
            if was_valid {
                assert_eq!(
                    header_sum(&p[..ihl]),
                    0,
                    "a rewritten header does not verify"
                );
            }
        }
    }
    v
}

fuzz_target!(|data: &[u8]| {
    static T0: OnceLock<Instant> = OnceLock::new();
    let now = *T0.get_or_init(Instant::now) + Duration::from_secs(3600);
    let Some((&ctl, packet)) = data.split_first() else {
        return;
    };
    let masquerade = (ctl & 1 != 0).then_some(MASQ);
    let mut nat = StaticNat::new(NatConfig { masquerade });
    for i in 0..3 {
        nat.insert(nat_addr(i), real_addr(i), None)
            .expect("distinct real addresses");
    }
    // One whose consent has ended.
    nat.insert(nat_addr(3), real_addr(3), Some(now))
        .expect("distinct real addresses");

    for outbound in [false, true] {
        let mut p = packet.to_vec();
        if ctl & 2 != 0 {
            make_plausible(&mut p, (ctl >> 2) & 3, outbound);
        }
        if check(&mut nat, &mut p, outbound, now) == Verdict::Forward {
            // What came out, sent on again either way: reply-shaped paths,
            // masquerade lookups of the entry just made.
            let mut again = p.clone();
            let _ = check(&mut nat, &mut again, !outbound, now);
            let _ = check(&mut nat, &mut p, outbound, now);
        }
    }
    nat.handle_timeout(now + Duration::from_secs(300));
    assert!(nat.masquerade_entries() <= 4);
});
