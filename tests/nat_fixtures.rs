//! The 1:1 NAT on real packets captured by `scripts/capture-fixtures.sh`
//! (see `tests/fixtures/README.md`): each is rewritten in both directions,
//! checked for the exact addresses and ports and for checksums that
//! etherparse verifies, and rewritten back to the captured bytes.
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::time::Instant;

use etherparse::{Icmpv4Header, IpNumber, Ipv4Header, TcpHeader, UdpHeader};
use vpnnat::nat::{NatConfig, StaticNat, Verdict};

const TECH: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 50);
const PC: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
const NAT: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 5);
const MASQ: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 250);

fn fixture(hex: &str) -> Vec<u8> {
    let hex = hex.trim();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

fn tcp_syn() -> Vec<u8> {
    fixture(include_str!("fixtures/tcp_syn.hex"))
}
fn dns_query() -> Vec<u8> {
    fixture(include_str!("fixtures/udp_dns_query.hex"))
}
fn echo_request() -> Vec<u8> {
    fixture(include_str!("fixtures/icmp_echo_request.hex"))
}
fn echo_reply() -> Vec<u8> {
    fixture(include_str!("fixtures/icmp_echo_reply.hex"))
}
fn port_unreachable() -> Vec<u8> {
    fixture(include_str!("fixtures/icmp_port_unreachable.hex"))
}

/// NAT 10.64.0.5 ↔ PC 192.168.1.10 (what the agent installs), and the
/// inverse table, which turns a LAN-side packet back into its tunnel-side
/// form.
fn tables() -> (StaticNat, StaticNat) {
    let mut agent = StaticNat::new(NatConfig::default());
    agent.insert(NAT, PC, None).unwrap();
    let mut inverse = StaticNat::new(NatConfig::default());
    inverse.insert(PC, NAT, None).unwrap();
    (agent, inverse)
}

fn addrs(p: &[u8]) -> (Ipv4Addr, Ipv4Addr) {
    let (h, _) = Ipv4Header::from_slice(p).unwrap();
    (h.source.into(), h.destination.into())
}

fn ports(p: &[u8]) -> (u16, u16) {
    let (h, rest) = Ipv4Header::from_slice(p).unwrap();
    assert!(matches!(h.protocol, IpNumber::TCP | IpNumber::UDP));
    (
        u16::from_be_bytes([rest[0], rest[1]]),
        u16::from_be_bytes([rest[2], rest[3]]),
    )
}

/// Checks the IPv4 header checksum and the transport checksum of a complete
/// datagram with etherparse.
fn verify_datagram(p: &[u8], what: &str) {
    let (ip, rest) = Ipv4Header::from_slice(p).unwrap();
    assert_eq!(
        ip.header_checksum,
        ip.calc_header_checksum(),
        "{what}: IPv4"
    );
    let payload = &rest[..usize::from(ip.payload_len().unwrap())];
    match ip.protocol {
        IpNumber::TCP => {
            let (t, data) = TcpHeader::from_slice(payload).unwrap();
            assert_eq!(
                t.checksum,
                t.calc_checksum_ipv4(&ip, data).unwrap(),
                "{what}: TCP"
            );
        }
        IpNumber::UDP => {
            let (u, data) = UdpHeader::from_slice(payload).unwrap();
            assert_ne!(u.checksum, 0, "{what}: the kernel sent a UDP checksum");
            assert_eq!(
                u.checksum,
                u.calc_checksum_ipv4(&ip, data).unwrap(),
                "{what}: UDP"
            );
        }
        IpNumber::ICMP => {
            let (h, data) = Icmpv4Header::from_slice(payload).unwrap();
            let mut want = h.clone();
            want.update_checksum(data);
            assert_eq!(h.checksum, want.checksum, "{what}: ICMP");
        }
        other => panic!("{what}: unexpected protocol {other:?}"),
    }
}

/// The outer packet and, for an ICMP error, the datagram it quotes.
fn verify(p: &[u8]) {
    verify_datagram(p, "outer");
    let (ip, rest) = Ipv4Header::from_slice(p).unwrap();
    if ip.protocol == IpNumber::ICMP && rest[0] == 3 {
        verify_datagram(&rest[8..], "quoted");
    }
}

fn quoted(p: &[u8]) -> &[u8] {
    let ihl = usize::from(p[0] & 0xf) * 4;
    &p[ihl + 8..]
}

#[test]
fn the_fixtures_are_what_the_readme_says() {
    for p in [tcp_syn(), dns_query(), echo_request()] {
        assert_eq!(addrs(&p), (TECH, PC));
        verify(&p);
    }
    for p in [echo_reply(), port_unreachable()] {
        assert_eq!(addrs(&p), (PC, TECH));
        verify(&p);
    }
    assert_eq!(ports(&tcp_syn()), (40000, 3389));
    assert_eq!(ports(&dns_query()), (40053, 53));
    assert_eq!(quoted(&port_unreachable()), &dns_query()[..]);
}

/// Technician → PC packets: the tunnel-side form (to the NAT address) is
/// made with the inverse table; the agent's inbound rewrite turns it back
/// into exactly the captured packet.
#[test]
fn technician_packets_are_rewritten_to_the_nat_address_and_back() {
    let now = Instant::now();
    for (name, captured) in [
        ("tcp syn", tcp_syn()),
        ("dns query", dns_query()),
        ("echo request", echo_request()),
    ] {
        let (mut agent, mut inverse) = tables();
        let mut p = captured.clone();
        assert_eq!(
            inverse.translate_inbound(&mut p, now),
            Verdict::Forward,
            "{name}"
        );
        assert_eq!(addrs(&p), (TECH, NAT), "{name}");
        verify(&p);
        if name == "echo request" {
            // ICMP has no pseudo-header: only the IP header changes.
            assert_eq!(&p[20..], &captured[20..], "{name}");
        } else {
            assert_eq!(ports(&p), ports(&captured), "{name}: ports kept");
            assert_ne!(&p[20..], &captured[20..], "{name}: the checksum changed");
        }
        assert_eq!(
            agent.translate_inbound(&mut p, now),
            Verdict::Forward,
            "{name}"
        );
        assert_eq!(p, captured, "{name}: back to the captured bytes");
    }
}

/// PC → technician packets: the agent's outbound rewrite shows them from
/// the NAT address (an ICMP error's quote too); the inverse table restores
/// the captured bytes.
#[test]
fn pc_packets_are_rewritten_from_the_nat_address_and_back() {
    let now = Instant::now();
    for (name, captured) in [
        ("echo reply", echo_reply()),
        ("port unreachable", port_unreachable()),
    ] {
        let (mut agent, mut inverse) = tables();
        let mut p = captured.clone();
        assert_eq!(
            agent.translate_outbound(&mut p, now),
            Verdict::Forward,
            "{name}"
        );
        assert_eq!(addrs(&p), (NAT, TECH), "{name}");
        verify(&p);
        assert_eq!(
            inverse.translate_outbound(&mut p, now),
            Verdict::Forward,
            "{name}"
        );
        assert_eq!(p, captured, "{name}: back to the captured bytes");
    }
}

#[test]
fn the_port_unreachable_quotes_what_the_technician_sent() {
    let now = Instant::now();
    let (mut agent, mut inverse) = tables();
    // What the technician sent: the DNS query to the NAT address.
    let mut sent = dns_query();
    assert_eq!(inverse.translate_inbound(&mut sent, now), Verdict::Forward);
    let mut err = port_unreachable();
    assert_eq!(agent.translate_outbound(&mut err, now), Verdict::Forward);
    assert_eq!(addrs(&err), (NAT, TECH));
    assert_eq!(addrs(quoted(&err)), (TECH, NAT));
    assert_eq!(ports(quoted(&err)), (40053, 53));
    assert_eq!(
        quoted(&err),
        &sent[..],
        "the quote is the technician's datagram, byte for byte"
    );
    verify(&err);
}

/// With masquerade: the technician's SYN and echo request reach the PC from
/// the masquerade address with the technician's port and identifier kept;
/// the PC's echo reply and port unreachable go back to the technician.
#[test]
fn masquerade_on_captured_packets() {
    let now = Instant::now();
    let (_, mut inverse) = tables();
    let mut agent = StaticNat::new(NatConfig {
        masquerade: Some(MASQ),
    });
    agent.insert(NAT, PC, None).unwrap();

    let mut syn = tcp_syn();
    assert_eq!(inverse.translate_inbound(&mut syn, now), Verdict::Forward);
    assert_eq!(agent.translate_inbound(&mut syn, now), Verdict::Forward);
    assert_eq!(addrs(&syn), (MASQ, PC));
    assert_eq!(ports(&syn), (40000, 3389), "port preserved");
    verify(&syn);

    let mut query = dns_query();
    assert_eq!(inverse.translate_inbound(&mut query, now), Verdict::Forward);
    let as_sent = query.clone();
    assert_eq!(agent.translate_inbound(&mut query, now), Verdict::Forward);
    assert_eq!(addrs(&query), (MASQ, PC));
    verify(&query);
    // The PC's port unreachable, as it would quote the masqueraded query.
    let mut err = port_unreachable();
    let ihl = 20;
    err.truncate(ihl + 8);
    err.extend_from_slice(&query);
    fix_as_kernel_would(&mut err, MASQ);
    verify(&err);
    assert_eq!(agent.translate_outbound(&mut err, now), Verdict::Forward);
    assert_eq!(addrs(&err), (NAT, TECH));
    assert_eq!(quoted(&err), &as_sent[..]);
    verify(&err);

    let mut request = echo_request();
    assert_eq!(
        inverse.translate_inbound(&mut request, now),
        Verdict::Forward
    );
    let id = u16::from_be_bytes([request[24], request[25]]);
    assert_eq!(agent.translate_inbound(&mut request, now), Verdict::Forward);
    assert_eq!(addrs(&request), (MASQ, PC));
    assert_eq!(
        u16::from_be_bytes([request[24], request[25]]),
        id,
        "identifier kept"
    );
    verify(&request);
    let mut reply = echo_reply();
    reply[16..20].copy_from_slice(&MASQ.octets());
    fix_as_kernel_would(&mut reply, MASQ);
    assert_eq!(agent.translate_outbound(&mut reply, now), Verdict::Forward);
    assert_eq!(addrs(&reply), (NAT, TECH));
    verify(&reply);
}

/// Readdresses a PC → technician packet to `dst` and recomputes its
/// checksums from scratch with etherparse (as the PC's kernel would have).
fn fix_as_kernel_would(p: &mut Vec<u8>, dst: Ipv4Addr) {
    let (mut ip, rest) = Ipv4Header::from_slice(p).unwrap();
    let mut icmp = rest.to_vec();
    ip.destination = dst.octets();
    ip.set_payload_len(icmp.len()).unwrap();
    ip.header_checksum = ip.calc_header_checksum();
    let (mut h, data) = Icmpv4Header::from_slice(&icmp).unwrap();
    let data = data.to_vec();
    h.update_checksum(&data);
    icmp.clear();
    icmp.extend_from_slice(&h.to_bytes());
    icmp.extend_from_slice(&data);
    p.clear();
    ip.write(p).unwrap();
    p.extend_from_slice(&icmp);
}
