//! ICMP destination-unreachable messages for packets the gateway cannot
//! deliver (RFC 792, RFC 1812).

use std::net::Ipv4Addr;

use crate::ipv4::checksum;
use crate::ipv4::{Ipv4Header, PROTO_ICMP};

/// ICMP type 3 (destination unreachable).
pub(crate) const ICMP_DEST_UNREACHABLE: u8 = 3;
/// Code 1: host unreachable (RFC 792).
pub(crate) const ICMP_HOST_UNREACHABLE: u8 = 1;

/// RFC 1812 §4.3.2.3: an ICMP error carries as much of the original datagram
/// as fits in 576 bytes.
const MAX_ICMP_ERROR_LEN: usize = 576;

/// Whether an ICMP error may be sent about `original` (RFC 1122 §3.2.2 and
/// RFC 1812 §4.3.2.7): never about an ICMP error, a later fragment, or a
/// datagram whose source is not a unicast host.
pub(crate) fn may_send_error_about(h: &Ipv4Header<'_>) -> bool {
    if h.is_later_fragment() {
        return false;
    }
    let src = h.src();
    if src.is_unspecified()
        || src.is_broadcast()
        || src.is_multicast()
        || src.is_loopback()
        || h.dst().is_broadcast()
        || h.dst().is_multicast()
    {
        return false;
    }
    if h.protocol() == PROTO_ICMP {
        // Only informational ICMP (echo, timestamp, ...) may trigger an error.
        let Some(&icmp_type) = h.payload().first() else {
            return false;
        };
        return matches!(icmp_type, 0 | 8 | 13 | 14 | 15 | 16 | 17 | 18);
    }
    true
}

/// Writes an ICMP destination-unreachable (`code`) about `original` from
/// `src` into `out`, returning its length. `out` needs [`MAX_ICMP_ERROR_LEN`]
/// bytes or the quote is shortened to fit.
pub(crate) fn emit_unreachable(
    original: &[u8],
    h: &Ipv4Header<'_>,
    code: u8,
    src: Ipv4Addr,
    out: &mut Vec<u8>,
) {
    let quote_len = original
        .len()
        .min(MAX_ICMP_ERROR_LEN - 28)
        .min(h.total_len());
    let total = 20 + 8 + quote_len;
    out.clear();
    out.resize(total, 0);
    let len = (total as u16).to_be_bytes();
    let hdr: [u8; 20] = [
        0x45,
        0xc0, // DSCP CS6 (network control), as Linux marks ICMP errors
        len[0],
        len[1],
        0,
        0,
        0x40, // don't fragment
        0,
        64,
        PROTO_ICMP,
        0,
        0,
        src.octets()[0],
        src.octets()[1],
        src.octets()[2],
        src.octets()[3],
        h.src().octets()[0],
        h.src().octets()[1],
        h.src().octets()[2],
        h.src().octets()[3],
    ];
    out[..20].copy_from_slice(&hdr);
    let c = checksum(&out[..20]).to_be_bytes();
    out[10] = c[0];
    out[11] = c[1];
    out[20] = ICMP_DEST_UNREACHABLE;
    out[21] = code;
    // bytes 22..24 checksum, 24..28 unused (zero)
    out[28..].copy_from_slice(&original[..quote_len]);
    let c = checksum(&out[20..]).to_be_bytes();
    out[22] = c[0];
    out[23] = c[1];
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipv4::tests::udp_packet;

    fn parse(p: &[u8]) -> Ipv4Header<'_> {
        Ipv4Header::new_checked(p).unwrap()
    }

    #[test]
    fn unreachable_is_a_valid_icmp_error_quoting_the_original() {
        let p = udp_packet();
        let h = parse(&p);
        let mut out = Vec::new();
        emit_unreachable(&p, &h, ICMP_HOST_UNREACHABLE, h.dst(), &mut out);
        assert_eq!(out.len(), 576);
        let s = etherparse::SlicedPacket::from_ip(&out).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = &s.net else {
            panic!()
        };
        assert_eq!(ip.header().source(), [10, 64, 0, 99]);
        assert_eq!(ip.header().destination(), [172, 16, 0, 50]);
        assert_eq!(checksum(&out[..20]), 0, "IP header checksum");
        assert_eq!(checksum(&out[20..]), 0, "ICMP checksum");
        let Some(etherparse::TransportSlice::Icmpv4(icmp)) = &s.transport else {
            panic!()
        };
        assert_eq!(
            icmp.icmp_type(),
            etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Host
            )
        );
        assert_eq!(&out[28..48], &p[..20]);
    }

    #[test]
    fn no_error_about_errors_fragments_or_broadcasts() {
        let mut p = udp_packet();
        assert!(may_send_error_about(&parse(&p)));
        p[6] = 0x00;
        p[7] = 0x10; // fragment offset 16
        assert!(!may_send_error_about(&parse(&p)));
        let mut icmp_err = Vec::new();
        etherparse::PacketBuilder::ipv4([172, 16, 0, 50], [10, 64, 0, 99], 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            ))
            .write(&mut icmp_err, &[0; 28])
            .unwrap();
        assert!(!may_send_error_about(&parse(&icmp_err)));
        let mut ping = Vec::new();
        etherparse::PacketBuilder::ipv4([172, 16, 0, 50], [10, 64, 0, 99], 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut ping, &[0; 8])
            .unwrap();
        assert!(may_send_error_about(&parse(&ping)));
        let mut bcast = udp_packet();
        bcast[12..16].copy_from_slice(&[255, 255, 255, 255]);
        assert!(!may_send_error_about(&parse(&bcast)));
    }
}
