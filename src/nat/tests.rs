use std::net::Ipv4Addr;
use std::time::Instant;

use etherparse::{
    Icmpv4Header, IpFragOffset, IpNumber, Ipv4Header, PacketBuilder, TcpHeader, UdpHeader,
};
use proptest::prelude::*;
use test_strategy::proptest;

use super::masquerade::{MAX_CONNS, SWEEP, TEST_UDP_IDLE};
use super::*;

const NAT: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 5);
const REAL: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
const TECH: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 50);
const TECH2: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 51);
const MASQ: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 250);

fn nat(masquerade: Option<Ipv4Addr>) -> StaticNat {
    let mut n = StaticNat::new(NatConfig { masquerade });
    n.insert(NAT, REAL, None).unwrap();
    n
}

fn inbound(n: &mut StaticNat, p: &mut [u8], now: Instant) -> Result<(), DropReason> {
    n.translate_inbound(p, now).into_result()
}

fn outbound(n: &mut StaticNat, p: &mut [u8], now: Instant) -> Result<(), DropReason> {
    n.translate_outbound(p, now).into_result()
}

fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1000, 64000)
        .syn()
        .write(&mut p, payload)
        .unwrap();
    p
}

fn udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
        .udp(sport, dport)
        .write(&mut p, payload)
        .unwrap();
    p
}

fn echo(src: Ipv4Addr, dst: Ipv4Addr, id: u16, request: bool, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    let b = PacketBuilder::ipv4(src.octets(), dst.octets(), 64);
    if request {
        b.icmpv4_echo_request(id, 7).write(&mut p, payload).unwrap();
    } else {
        b.icmpv4_echo_reply(id, 7).write(&mut p, payload).unwrap();
    }
    p
}

/// An ICMP error from `from` to `to` quoting `quoted`.
fn icmp_error(from: Ipv4Addr, to: Ipv4Addr, kind: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    PacketBuilder::ipv4(from.octets(), to.octets(), 64)
        .icmpv4_raw(kind, code, [0; 4])
        .write(&mut p, quoted)
        .unwrap();
    p
}

/// Splits `p` into IPv4 fragments of at most `size` payload bytes (a
/// multiple of 8), each with a valid header checksum (etherparse).
fn fragment(p: &[u8], size: usize) -> Vec<Vec<u8>> {
    let (ip, rest) = Ipv4Header::from_slice(p).unwrap();
    let payload = &rest[..usize::from(ip.payload_len().unwrap())];
    payload
        .chunks(size)
        .enumerate()
        .map(|(i, chunk)| {
            let mut h = ip.clone();
            h.set_payload_len(chunk.len()).unwrap();
            h.more_fragments = (i + 1) * size < payload.len();
            h.fragment_offset = IpFragOffset::try_new((i * size / 8) as u16).unwrap();
            h.header_checksum = h.calc_header_checksum();
            let mut out = Vec::new();
            h.write(&mut out).unwrap();
            out.extend_from_slice(chunk);
            out
        })
        .collect()
}

/// Checks the transport checksum of an IPv4 datagram held in full.
fn verify_l4(ip: &Ipv4Header, payload: &[u8], what: &str) {
    match ip.protocol {
        IpNumber::TCP => {
            let (t, data) = TcpHeader::from_slice(payload).unwrap();
            assert_eq!(
                t.checksum,
                t.calc_checksum_ipv4(ip, data).unwrap(),
                "{what} TCP"
            );
        }
        IpNumber::UDP => {
            let (u, data) = UdpHeader::from_slice(payload).unwrap();
            if u.checksum != 0 {
                assert_eq!(
                    u.checksum,
                    u.calc_checksum_ipv4(ip, data).unwrap(),
                    "{what} UDP"
                );
            }
        }
        IpNumber::ICMP => {
            let (h, data) = Icmpv4Header::from_slice(payload).unwrap();
            let mut want = h.clone();
            want.update_checksum(data);
            assert_eq!(h.checksum, want.checksum, "{what} ICMP");
        }
        _ => {}
    }
}

/// Every checksum verified by an independent implementation (etherparse):
/// the IPv4 header, the transport checksum of an unfragmented packet, and
/// the quoted datagram of an ICMP error (its header always, its transport
/// checksum when it is quoted in full).
pub(super) fn verify(p: &[u8]) {
    let (ip, rest) = Ipv4Header::from_slice(p).unwrap();
    assert_eq!(ip.header_checksum, ip.calc_header_checksum(), "IPv4 header");
    let payload = &rest[..usize::from(ip.payload_len().unwrap())];
    if ip.fragment_offset.value() != 0 || ip.more_fragments {
        return;
    }
    verify_l4(&ip, payload, "outer");
    if ip.protocol == IpNumber::ICMP && matches!(payload[0], 3 | 11 | 12) {
        let (inner, rest) = Ipv4Header::from_slice(&payload[8..]).unwrap();
        assert_eq!(
            inner.header_checksum,
            inner.calc_header_checksum(),
            "quoted IPv4"
        );
        if let Ok(len) = inner.payload_len()
            && usize::from(len) == rest.len()
            && inner.fragment_offset.value() == 0
            && !inner.more_fragments
        {
            verify_l4(&inner, rest, "quoted");
        }
    }
}

fn addrs(p: &[u8]) -> (Ipv4Addr, Ipv4Addr) {
    let a = |at: usize| Ipv4Addr::new(p[at], p[at + 1], p[at + 2], p[at + 3]);
    (a(12), a(16))
}

fn get16(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

fn ports(p: &[u8]) -> (u16, u16) {
    let ihl = usize::from(p[0] & 0xf) * 4;
    (get16(p, ihl), get16(p, ihl + 2))
}

fn refresh_header_checksum(p: &mut [u8]) {
    p[10] = 0;
    p[11] = 0;
    let c = checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn tcp_udp_and_echo_are_rewritten_both_ways_with_valid_checksums() {
    let now = Instant::now();
    let mut n = nat(None);
    for mut p in [
        tcp(TECH, NAT, 40000, 3389, b"hello"),
        udp(TECH, NAT, 40000, 53, b"query"),
        echo(TECH, NAT, 9, true, b"ping!"),
    ] {
        inbound(&mut n, &mut p, now).unwrap();
        assert_eq!(addrs(&p), (TECH, REAL));
        verify(&p);
    }
    for mut p in [
        tcp(REAL, TECH, 3389, 40000, b"world"),
        udp(REAL, TECH, 53, 40000, b"answer"),
        echo(REAL, TECH, 9, false, b"ping!"),
    ] {
        outbound(&mut n, &mut p, now).unwrap();
        assert_eq!(addrs(&p), (NAT, TECH));
        verify(&p);
    }
    assert_eq!(n.drops().total(), 0);
}

#[test]
fn a_zero_udp_checksum_stays_zero() {
    let mut p = udp(TECH, NAT, 1, 2, b"x");
    p[26] = 0;
    p[27] = 0;
    inbound(&mut nat(None), &mut p, Instant::now()).unwrap();
    assert_eq!(get16(&p, 26), 0);
    verify(&p);
}

#[test]
fn fragments_get_their_addresses_rewritten_and_ports_only_in_the_first() {
    let now = Instant::now();
    let mut n = nat(None);
    let whole = udp(TECH, NAT, 4000, 53, &[7u8; 64]);
    let mut frags = fragment(&whole, 32);
    assert_eq!(frags.len(), 3);
    let later_before: Vec<Vec<u8>> = frags[1..].iter().map(|f| f[20..].to_vec()).collect();
    for f in &mut frags {
        inbound(&mut n, f, now).unwrap();
        assert_eq!(addrs(f), (TECH, REAL));
        verify(f);
    }
    for (f, before) in frags[1..].iter().zip(&later_before) {
        assert_eq!(
            &f[20..],
            &before[..],
            "payload of a later fragment untouched"
        );
    }
    // Reassembled, the UDP checksum is right for the new addresses.
    let mut whole_after = frags[0][..20].to_vec();
    for f in &frags {
        whole_after.extend_from_slice(&f[20..]);
    }
    let len = whole_after.len() as u16;
    whole_after[2..4].copy_from_slice(&len.to_be_bytes());
    whole_after[6] = 0;
    refresh_header_checksum(&mut whole_after);
    verify(&whole_after);
}

#[test]
fn icmp_errors_from_the_lan_quote_the_nat_address() {
    let now = Instant::now();
    let mut n = nat(None);
    // The technician's datagram as the PC received it …
    let mut sent = udp(TECH, NAT, 40000, 9999, b"anyone?");
    inbound(&mut n, &mut sent, now).unwrap();
    // … and the PC's "port unreachable" about it.
    let mut err = icmp_error(REAL, TECH, 3, 3, &sent);
    outbound(&mut n, &mut err, now).unwrap();
    assert_eq!(addrs(&err), (NAT, TECH));
    verify(&err);
    let quoted = &err[28..];
    assert_eq!(
        addrs(quoted),
        (TECH, NAT),
        "the quoted packet is what the technician sent"
    );
    assert_eq!(ports(quoted), (40000, 9999));
    assert_eq!(quoted, &udp(TECH, NAT, 40000, 9999, b"anyone?")[..]);
    // A time-exceeded from a router on the LAN, quoting 8 bytes of TCP.
    let mut seg = tcp(TECH, NAT, 40001, 80, b"");
    inbound(&mut n, &mut seg, now).unwrap();
    let mut ttl = icmp_error(Ipv4Addr::new(192, 168, 1, 1), TECH, 11, 0, &seg[..28]);
    outbound(&mut n, &mut ttl, now).unwrap();
    assert_eq!(addrs(&ttl), (NAT, TECH));
    verify(&ttl);
    // An error quoting an unmapped destination is refused, untouched.
    let other = udp(TECH, Ipv4Addr::new(192, 168, 1, 77), 1, 2, b"x");
    let mut e = icmp_error(REAL, TECH, 3, 3, &other);
    let before = e.clone();
    assert_eq!(
        outbound(&mut n, &mut e, now),
        Err(DropReason::UnmappedSource)
    );
    assert_eq!(e, before);
}

#[test]
fn icmp_errors_from_the_technician_quote_the_real_address() {
    let now = Instant::now();
    let mut n = nat(None);
    let mut sent = udp(REAL, TECH, 53, 40000, b"late answer");
    outbound(&mut n, &mut sent, now).unwrap();
    let mut err = icmp_error(TECH, NAT, 3, 3, &sent);
    inbound(&mut n, &mut err, now).unwrap();
    assert_eq!(addrs(&err), (TECH, REAL));
    verify(&err);
    assert_eq!(&err[28..], &udp(REAL, TECH, 53, 40000, b"late answer")[..]);
    // Quoting a source that is not the NAT address it was sent to: refused.
    let mut forged = icmp_error(TECH, NAT, 3, 3, &udp(REAL, TECH, 1, 2, b""));
    assert_eq!(
        inbound(&mut n, &mut forged, now),
        Err(DropReason::BadHeader)
    );
}

#[test]
fn masquerade_hides_the_technician_and_restores_replies() {
    let now = Instant::now();
    let mut n = nat(Some(MASQ));
    // Two technicians with the same source port.
    let mut a = tcp(TECH, NAT, 40000, 80, b"");
    let mut b = tcp(TECH2, NAT, 40000, 80, b"");
    inbound(&mut n, &mut a, now).unwrap();
    inbound(&mut n, &mut b, now).unwrap();
    verify(&a);
    verify(&b);
    assert_eq!(addrs(&a), (MASQ, REAL));
    assert_eq!(addrs(&b), (MASQ, REAL));
    let (pa, pb) = (ports(&a).0, ports(&b).0);
    assert_eq!(pa, 40000, "port preserved when free");
    assert_eq!(pb, 40001, "a collision gets the next free port");
    // The same technician endpoint keeps its port (endpoint-independent).
    let mut a2 = tcp(TECH, NAT, 40000, 22, b"");
    inbound(&mut n, &mut a2, now).unwrap();
    assert_eq!(ports(&a2).0, 40000);
    assert_eq!(n.masquerade_entries(), 2);
    // Replies go back to the right technician and port.
    for (port, tech) in [(pa, TECH), (pb, TECH2)] {
        let mut r = tcp(REAL, MASQ, 80, port, b"");
        outbound(&mut n, &mut r, now).unwrap();
        assert_eq!(addrs(&r), (NAT, tech));
        assert_eq!(ports(&r), (80, 40000));
        verify(&r);
    }
    // Echo: the identifier is the port.
    let mut e = echo(TECH, NAT, 77, true, b"ping!");
    inbound(&mut n, &mut e, now).unwrap();
    verify(&e);
    let mut r = echo(REAL, MASQ, 77, false, b"ping!");
    outbound(&mut n, &mut r, now).unwrap();
    assert_eq!(addrs(&r), (NAT, TECH));
    verify(&r);
    // A reply to a port nobody mapped is dropped and counted.
    let mut stray = udp(REAL, MASQ, 53, 1, b"x");
    assert_eq!(
        outbound(&mut n, &mut stray, now),
        Err(DropReason::NotMapped)
    );
    assert_eq!(n.drops().get(DropReason::NotMapped), 1);
    // The PC's port unreachable about a masqueraded datagram.
    let mut sent = udp(TECH2, NAT, 40000, 9, b"x");
    inbound(&mut n, &mut sent, now).unwrap();
    let mut err = icmp_error(REAL, MASQ, 3, 3, &sent);
    outbound(&mut n, &mut err, now).unwrap();
    assert_eq!(addrs(&err), (NAT, TECH2));
    assert_eq!(&err[28..], &udp(TECH2, NAT, 40000, 9, b"x")[..]);
    verify(&err);
    // The technician's port unreachable about a reply from the PC.
    let mut reply = udp(REAL, MASQ, 9, ports(&sent).0, b"y");
    outbound(&mut n, &mut reply, now).unwrap();
    let mut err = icmp_error(TECH2, NAT, 3, 3, &reply);
    inbound(&mut n, &mut err, now).unwrap();
    assert_eq!(addrs(&err), (MASQ, REAL));
    assert_eq!(&err[28..], &udp(REAL, MASQ, 9, ports(&sent).0, b"y")[..]);
    verify(&err);
}

#[test]
fn a_later_reply_fragment_cannot_be_masqueraded() {
    let now = Instant::now();
    let mut n = nat(Some(MASQ));
    let mut q = udp(TECH, NAT, 5000, 53, b"q");
    inbound(&mut n, &mut q, now).unwrap();
    let reply = udp(REAL, MASQ, 53, 5000, &[1u8; 64]);
    let mut frags = fragment(&reply, 32);
    outbound(&mut n, &mut frags[0], now).unwrap();
    assert_eq!(
        outbound(&mut n, &mut frags[1], now),
        Err(DropReason::Unsupported)
    );
}

#[test]
fn idle_masquerade_entries_expire() {
    let t0 = Instant::now();
    let mut n = nat(Some(MASQ));
    let mut p = udp(TECH, NAT, 5000, 53, b"q");
    inbound(&mut n, &mut p, t0).unwrap();
    let mut t = tcp(TECH, NAT, 5001, 22, b"");
    inbound(&mut n, &mut t, t0).unwrap();
    assert_eq!(n.masquerade_entries(), 2);
    assert_eq!(n.poll_timeout(), Some(t0 + SWEEP));
    let mut now = t0;
    while now < t0 + TEST_UDP_IDLE + SWEEP * 2 {
        now += SWEEP;
        n.handle_timeout(now);
    }
    assert_eq!(
        n.masquerade_entries(),
        1,
        "UDP gone after 2 minutes, TCP kept"
    );
    let mut r = udp(REAL, MASQ, 53, 5000, b"late");
    assert_eq!(outbound(&mut n, &mut r, now), Err(DropReason::NotMapped));
    // The port is free again, for the same endpoint or another.
    let mut p = udp(TECH2, NAT, 5000, 53, b"q");
    inbound(&mut n, &mut p, now).unwrap();
    assert_eq!(ports(&p).0, 5000);
}

#[test]
fn the_masquerade_table_is_bounded() {
    let now = Instant::now();
    let mut n = nat(Some(MASQ));
    for i in 0..MAX_CONNS {
        let tech = Ipv4Addr::from_bits(TECH.to_bits() + (i / 1000) as u32);
        let mut p = udp(tech, NAT, 2000 + (i % 1000) as u16, 53, b"");
        inbound(&mut n, &mut p, now).unwrap();
    }
    let mut p = udp(TECH2, NAT, 9, 53, b"");
    assert_eq!(inbound(&mut n, &mut p, now), Err(DropReason::TableFull));
    // Other protocols have their own budget.
    let mut p = tcp(TECH2, NAT, 9, 53, b"");
    inbound(&mut n, &mut p, now).unwrap();
}

#[test]
fn every_kind_of_bad_packet_is_refused_unchanged_and_counted() {
    let now = Instant::now();
    let mut n = nat(Some(MASQ));
    n.insert(
        Ipv4Addr::new(10, 64, 0, 9),
        Ipv4Addr::new(192, 168, 1, 9),
        Some(now),
    )
    .unwrap();
    let good = udp(TECH, NAT, 1, 2, b"payload");
    let mut cases: Vec<(Vec<u8>, DropReason)> = vec![
        (vec![], DropReason::Empty),
        (good[..10].to_vec(), DropReason::Truncated),
        (
            udp(TECH, Ipv4Addr::new(10, 64, 0, 6), 1, 2, b"x"),
            DropReason::NotMapped,
        ),
        (
            udp(TECH, Ipv4Addr::new(10, 64, 0, 9), 1, 2, b"x"),
            DropReason::Expired,
        ),
    ];
    let mut v = good.clone();
    v[0] = 0x55;
    cases.push((v, DropReason::BadHeader));
    let mut v = good.clone();
    v[0] = 0x60;
    cases.push((v, DropReason::NotIpv4));
    let mut v = good.clone();
    v[0] = 0x44; // IHL 16 bytes
    cases.push((v, DropReason::BadHeader));
    let mut v = good.clone();
    v[0] = 0x4f; // IHL 60 bytes, more than the total length
    cases.push((v, DropReason::BadHeader));
    let mut v = good.clone();
    v[2..4].copy_from_slice(&4000u16.to_be_bytes());
    cases.push((v, DropReason::Truncated));
    let mut v = good.clone();
    v[2..4].copy_from_slice(&10u16.to_be_bytes());
    cases.push((v, DropReason::BadHeader));
    let mut v = good.clone();
    v[10] ^= 1;
    cases.push((v, DropReason::BadHeader));
    // A UDP header cut short (total length says 24).
    let mut v = good[..24].to_vec();
    v[2..4].copy_from_slice(&24u16.to_be_bytes());
    refresh_header_checksum(&mut v);
    cases.push((v, DropReason::Truncated));
    // A TCP first fragment too short for the checksum (RFC 1858).
    let mut v = tcp(TECH, NAT, 1, 2, b"")[..36].to_vec();
    v[2..4].copy_from_slice(&36u16.to_be_bytes());
    v[6] = 0x20;
    refresh_header_checksum(&mut v);
    cases.push((v, DropReason::Truncated));
    // An ICMP error quoting less than a header.
    cases.push((
        icmp_error(TECH, NAT, 3, 3, &[0x45, 0, 0]),
        DropReason::Truncated,
    ));
    // An ICMP error quoting something that is not IPv4.
    cases.push((
        icmp_error(TECH, NAT, 3, 3, &[0x65; 28]),
        DropReason::BadHeader,
    ));
    // Masquerade cannot track an ICMP query other than echo.
    let mut v = Vec::new();
    PacketBuilder::ipv4(TECH.octets(), NAT.octets(), 64)
        .icmpv4_raw(13, 0, [0; 4])
        .write(&mut v, &[0; 12])
        .unwrap();
    cases.push((v, DropReason::Unsupported));
    let count = cases.len() as u64;
    for (mut p, want) in cases {
        let before = p.clone();
        assert_eq!(inbound(&mut n, &mut p, now), Err(want), "{before:02x?}");
        assert_eq!(p, before, "a dropped packet is left as it was");
    }
    assert_eq!(n.drops().total(), count);
    // The LAN side: unmapped source, expired, garbage.
    let mut p = udp(Ipv4Addr::new(192, 168, 1, 99), TECH, 1, 2, b"x");
    assert_eq!(
        outbound(&mut n, &mut p, now),
        Err(DropReason::UnmappedSource)
    );
    let mut p = udp(Ipv4Addr::new(192, 168, 1, 9), TECH, 1, 2, b"x");
    assert_eq!(outbound(&mut n, &mut p, now), Err(DropReason::Expired));
    let mut p = vec![0x45u8; 19];
    assert_eq!(outbound(&mut n, &mut p, now), Err(DropReason::Truncated));
    assert_eq!(n.drops().total(), count + 3);
}

#[test]
fn mappings_replace_and_refuse_a_shared_real_address() {
    let mut n = nat(Some(MASQ));
    assert_eq!(
        n.insert(Ipv4Addr::new(10, 64, 0, 6), REAL, None),
        Err(InsertError::RealTaken(NAT))
    );
    assert_eq!(
        n.insert(Ipv4Addr::new(10, 64, 0, 6), MASQ, None),
        Err(InsertError::MasqueradeAddress(MASQ))
    );
    n.insert(NAT, Ipv4Addr::new(192, 168, 1, 11), None).unwrap();
    assert_eq!(n.len(), 1);
    assert_eq!(n.get(NAT), Some(Ipv4Addr::new(192, 168, 1, 11)));
    // REAL is free again once NAT points elsewhere.
    n.insert(Ipv4Addr::new(10, 64, 0, 6), REAL, None).unwrap();
    assert_eq!(n.remove(NAT), Some(Ipv4Addr::new(192, 168, 1, 11)));
    assert_eq!(n.remove(NAT), None);
    assert_eq!(n.len(), 1);
    let mut p = udp(Ipv4Addr::new(192, 168, 1, 11), TECH, 1, 2, b"");
    assert_eq!(
        outbound(&mut n, &mut p, Instant::now()),
        Err(DropReason::UnmappedSource)
    );
}

// ---------------------------------------------------------------- properties

/// A packet kind for the properties.
#[derive(Debug, Clone, Copy, test_strategy::Arbitrary)]
enum Kind {
    Tcp,
    Udp,
    UdpNoChecksum,
    Echo,
    /// An ICMP error quoting a UDP datagram (in full or its first 8 bytes).
    ErrorUdp {
        full: bool,
    },
    /// An ICMP error quoting a TCP segment (in full or its first 8 bytes).
    ErrorTcp {
        full: bool,
    },
    /// An ICMP error quoting an echo request.
    ErrorEcho,
}

fn arb_addr() -> impl Strategy<Value = Ipv4Addr> {
    any::<u32>().prop_map(Ipv4Addr::from_bits)
}

/// A packet of `kind` from `src` to `dst`; an ICMP error quotes a
/// datagram `q_src` → `q_dst` (the one it is about).
fn build(
    kind: Kind,
    (src, dst): (Ipv4Addr, Ipv4Addr),
    (q_src, q_dst): (Ipv4Addr, Ipv4Addr),
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let cut = |q: Vec<u8>, full: bool| if full { q } else { q[..28].to_vec() };
    match kind {
        Kind::Tcp => tcp(src, dst, sport, dport, payload),
        Kind::Udp => udp(src, dst, sport, dport, payload),
        Kind::UdpNoChecksum => {
            let mut p = udp(src, dst, sport, dport, payload);
            p[26] = 0;
            p[27] = 0;
            p
        }
        Kind::Echo => echo(src, dst, sport, true, payload),
        Kind::ErrorUdp { full } => {
            let q = cut(udp(q_src, q_dst, sport, dport, payload), full);
            icmp_error(src, dst, 3, 3, &q)
        }
        Kind::ErrorTcp { full } => {
            let q = cut(tcp(q_src, q_dst, sport, dport, payload), full);
            icmp_error(src, dst, 11, 0, &q)
        }
        Kind::ErrorEcho => icmp_error(src, dst, 3, 1, &echo(q_src, q_dst, sport, true, payload)),
    }
}

fn is_error(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::ErrorUdp { .. } | Kind::ErrorTcp { .. } | Kind::ErrorEcho
    )
}

/// Inbound rewriting through a table and then through the inverse table
/// (real → NAT) gives back the exact original bytes, and every checksum
/// verifies in between.
#[proptest]
fn inbound_then_the_inverse_restores_the_original(
    kind: Kind,
    #[strategy(arb_addr())] tech: Ipv4Addr,
    #[strategy(arb_addr())] nat_addr: Ipv4Addr,
    #[strategy(arb_addr())] real: Ipv4Addr,
    sport: u16,
    dport: u16,
    #[strategy(proptest::collection::vec(any::<u8>(), 0..200))] payload: Vec<u8>,
    #[strategy(0usize..4)] fragments: usize,
) {
    prop_assume!(nat_addr != real);
    let now = Instant::now();
    let mut forward = StaticNat::new(NatConfig::default());
    forward.insert(nat_addr, real, None).unwrap();
    let mut back = StaticNat::new(NatConfig::default());
    back.insert(real, nat_addr, None).unwrap();
    // An ICMP error to the NAT address quotes what the NAT address sent.
    let original = build(
        kind,
        (tech, nat_addr),
        (nat_addr, tech),
        sport,
        dport,
        &payload,
    );
    // Optionally as fragments (large enough for the transport header and
    // for an ICMP error's quoted header).
    let size = 32 + 8 * fragments;
    let pieces = if fragments > 0 && original.len() > 20 + size {
        fragment(&original, size)
    } else {
        vec![original]
    };
    for piece in pieces {
        let mut p = piece.clone();
        prop_assert_eq!(inbound(&mut forward, &mut p, now), Ok(()));
        prop_assert_eq!(addrs(&p), (tech, real));
        verify(&p);
        if is_error(kind) && piece[6] & 0x1f == 0 && piece[7] == 0 {
            prop_assert_eq!(addrs(&p[28..]), (real, tech), "quoted datagram");
        }
        prop_assert_eq!(inbound(&mut back, &mut p, now), Ok(()));
        prop_assert_eq!(p, piece);
    }
}

/// The same for outbound rewriting (source real → NAT). ICMP errors from
/// the LAN quote what the technician sent to the real address.
#[proptest]
fn outbound_then_the_inverse_restores_the_original(
    kind: Kind,
    #[strategy(arb_addr())] tech: Ipv4Addr,
    #[strategy(arb_addr())] nat_addr: Ipv4Addr,
    #[strategy(arb_addr())] real: Ipv4Addr,
    sport: u16,
    dport: u16,
    #[strategy(proptest::collection::vec(any::<u8>(), 0..200))] payload: Vec<u8>,
) {
    prop_assume!(nat_addr != real);
    let now = Instant::now();
    let mut forward = StaticNat::new(NatConfig::default());
    forward.insert(nat_addr, real, None).unwrap();
    let mut back = StaticNat::new(NatConfig::default());
    back.insert(real, nat_addr, None).unwrap();
    // An ICMP error from the PC quotes what the technician sent it.
    let original = build(kind, (real, tech), (tech, real), sport, dport, &payload);
    let mut p = original.clone();
    prop_assert_eq!(outbound(&mut forward, &mut p, now), Ok(()));
    prop_assert_eq!(addrs(&p), (nat_addr, tech));
    verify(&p);
    if is_error(kind) {
        prop_assert_eq!(addrs(&p[28..]), (tech, nat_addr), "quoted datagram");
    }
    prop_assert_eq!(outbound(&mut back, &mut p, now), Ok(()));
    prop_assert_eq!(p, original);
}

/// With masquerade: inbound, then the LAN host's reply to what came out,
/// outbound — the technician gets exactly the reply to what it sent.
#[proptest]
fn masquerade_forward_then_reply_restores_the_technician(
    #[strategy(0u8..3)] kind: u8,
    sport: u16,
    #[strategy(1u16..)] dport: u16,
    #[strategy(proptest::collection::vec(any::<u8>(), 0..300))] payload: Vec<u8>,
    zero_udp_checksum: bool,
    #[strategy(proptest::collection::vec(any::<u16>(), 0..20))] earlier: Vec<u16>,
) {
    let now = Instant::now();
    let mut n = nat(Some(MASQ));
    // Other technicians' flows first, so the port may be taken.
    for port in earlier {
        let mut p = udp(TECH2, NAT, port, 9, b"");
        let mut t = tcp(TECH2, NAT, port, 9, b"");
        let mut e = echo(TECH2, NAT, port, true, b"");
        for p in [&mut p, &mut t, &mut e] {
            let _ = n.translate_inbound(p, now);
        }
    }
    let build = |src, dst, s, d, reply: bool| match kind {
        0 => tcp(src, dst, s, d, &payload),
        1 => {
            let mut p = udp(src, dst, s, d, &payload);
            if zero_udp_checksum {
                p[26] = 0;
                p[27] = 0;
            }
            p
        }
        _ => echo(src, dst, s, !reply, &payload),
    };
    let mut p = build(TECH, NAT, sport, dport, false);
    prop_assert_eq!(inbound(&mut n, &mut p, now), Ok(()));
    verify(&p);
    prop_assert_eq!(addrs(&p), (MASQ, REAL));
    let (s, d) = if kind == 2 {
        let id = get16(&p, 24);
        (id, id)
    } else {
        ports(&p)
    };
    let mut reply = build(REAL, MASQ, d, s, true);
    prop_assert_eq!(outbound(&mut n, &mut reply, now), Ok(()));
    verify(&reply);
    let expected = if kind == 2 {
        build(NAT, TECH, sport, sport, true)
    } else {
        build(NAT, TECH, dport, sport, true)
    };
    prop_assert_eq!(reply, expected);
}

/// Arbitrary bytes never panic, and a refused packet is left unchanged.
#[proptest]
fn arbitrary_bytes_never_panic(
    #[strategy(proptest::collection::vec(any::<u8>(), 0..120))] mut bytes: Vec<u8>,
    fix_header: bool,
    masquerade: bool,
    outbound_dir: bool,
) {
    let now = Instant::now();
    let mut n = nat(masquerade.then_some(MASQ));
    if fix_header && bytes.len() >= 20 {
        // Make the header plausible so the deeper paths are reached.
        bytes[0] = 0x45;
        let len = bytes.len() as u16;
        bytes[2..4].copy_from_slice(&len.to_be_bytes());
        let (a, b) = if outbound_dir {
            (REAL, TECH)
        } else {
            (TECH, NAT)
        };
        bytes[12..16].copy_from_slice(&a.octets());
        bytes[16..20].copy_from_slice(&b.octets());
        refresh_header_checksum(&mut bytes);
    }
    let before = bytes.clone();
    let v = if outbound_dir {
        n.translate_outbound(&mut bytes, now)
    } else {
        n.translate_inbound(&mut bytes, now)
    };
    match v {
        Verdict::Drop(_) => prop_assert_eq!(bytes, before),
        Verdict::Forward => prop_assert_eq!(bytes.len(), before.len()),
    }
}
