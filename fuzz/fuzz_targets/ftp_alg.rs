//! Arbitrary control streams and segments through the FTP ALG: nothing may
//! panic, the stream rewriter holds at most one short line, the packet
//! table stays within its cap, and a processed packet fits its buffer.
//!
//! The input is cut into records: a steering byte (bit 0 direction, bit 1
//! SYN, bits 2–3 the client port, bits 4–7 tailroom), four bytes of
//! sequence number, a length byte and that many payload bytes. The payload
//! goes through the byte-stream rewriter as it is and, inside a TCP segment
//! with valid checksums, through the packet-mode table; a technician's
//! segment also through a gateway flow table, whose FTP expectations stay
//! within their cap.
#![no_main]

use std::net::Ipv4Addr;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use vpnnat::gateway::flows::{FlowLimits, FlowTable, MAX_EXPECTATIONS};
use vpnnat::ipv4::Ipv4Header;
use vpnnat::messages::SiteId;
use vpnnat::nat::checksum;
use vpnnat::nat::ftp::{Direction, FtpAlg, LineRewriter, MAX_FLOWS, MAX_LINE, data_port};

const REAL: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
const NAT: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 5);
const TECH: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 50);

/// An IPv4/TCP segment with valid checksums (RFC 791, RFC 793 §3.1).
fn segment(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    seq: u32,
    syn: bool,
    payload: &[u8],
) -> Vec<u8> {
    let total = 40 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let hc = checksum(&p[..20]);
    p[10..12].copy_from_slice(&hc.to_be_bytes());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[24..28].copy_from_slice(&seq.to_be_bytes());
    p[28..32].copy_from_slice(&seq.rotate_left(7).to_be_bytes());
    p[32] = 5 << 4;
    p[33] = 0x10 | if syn { 0x02 } else { 0 };
    p[34..36].copy_from_slice(&65535u16.to_be_bytes());
    p[40..].copy_from_slice(payload);
    let mut pseudo = Vec::with_capacity(12 + total - 20);
    pseudo.extend_from_slice(&p[12..20]);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&((total - 20) as u16).to_be_bytes());
    pseudo.extend_from_slice(&p[20..]);
    let tc = checksum(&pseudo);
    p[36..38].copy_from_slice(&tc.to_be_bytes());
    p
}

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let mut alg = FtpAlg::new();
    let mut flows = FlowTable::new(FlowLimits::default(), now);
    let mut streams = [LineRewriter::new(REAL, NAT), LineRewriter::new(NAT, REAL)];
    let mut out = Vec::new();
    let mut rest = data;
    while let [steer, s0, s1, s2, s3, n, tail @ ..] = rest {
        let take = usize::from(*n).min(tail.len());
        let (payload, next) = tail.split_at(take);
        rest = next;
        let from_pc = steer & 1 != 0;
        let port = 40000 + u16::from((steer >> 2) & 3);
        let seq = u32::from_be_bytes([*s0, *s1, *s2, *s3]);
        streams[usize::from(!from_pc)].push(payload, &mut out);
        assert!(streams.iter().all(|s| s.held() < MAX_LINE));
        let (p, dir) = if from_pc {
            (
                segment(REAL, 21, TECH, port, seq, steer & 2 != 0, payload),
                Direction::FromPc,
            )
        } else {
            (
                segment(TECH, port, REAL, 21, seq, steer & 2 != 0, payload),
                Direction::ToPc,
            )
        };
        let _ = data_port(payload);
        if !from_pc {
            let h = Ipv4Header::new_checked(&p).expect("a well-formed segment");
            let _ = flows.center_to_site(&h, SiteId(1), now);
            assert!(flows.expectations() <= MAX_EXPECTATIONS);
        }
        let mut buf = p.clone();
        buf.resize(p.len() + usize::from(steer >> 4) * 4, 0);
        let len = alg.process(&mut buf, p.len(), dir, REAL, NAT, now);
        assert!(len <= buf.len());
        assert_eq!(checksum(&buf[..20]), 0);
        assert!(alg.flows() <= MAX_FLOWS);
    }
    for s in &mut streams {
        s.finish(&mut out);
    }
});
