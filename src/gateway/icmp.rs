//! The few IPv4 facts the gateway needs: header fields for routing and
//! anti-spoofing, and ICMP destination-unreachable messages.

use std::net::Ipv4Addr;

/// The IPv4 header fields the gateway looks at, from a checked packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) src: Ipv4Addr,
    pub(crate) dst: Ipv4Addr,
    pub(crate) protocol: u8,
    pub(crate) header_len: usize,
    /// Fragment offset is non-zero: not the first fragment.
    pub(crate) later_fragment: bool,
}

pub(crate) const PROTO_ICMP: u8 = 1;

/// Parses the header of an IPv4 packet. `None` for anything that is not a
/// well-formed IPv4 header within `packet`.
pub(crate) fn parse(packet: &[u8]) -> Option<Header> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(packet[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    if header_len < 20 || header_len > total_len || total_len > packet.len() {
        return None;
    }
    Some(Header {
        src: Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]),
        dst: Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]),
        protocol: packet[9],
        header_len,
        later_fragment: u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff != 0,
    })
}

/// The destination address of an IPv4 packet without further checks (the fast
/// path; [`parse`] validates).
pub(crate) fn dst_fast(packet: &[u8]) -> Option<Ipv4Addr> {
    if packet.len() >= 20 && packet[0] >> 4 == 4 {
        Some(Ipv4Addr::new(
            packet[16], packet[17], packet[18], packet[19],
        ))
    } else {
        None
    }
}

pub(crate) use crate::nat::checksum;

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
pub(crate) fn may_send_error_about(original: &[u8], h: &Header) -> bool {
    if h.later_fragment {
        return false;
    }
    let src = h.src;
    if src.is_unspecified()
        || src.is_broadcast()
        || src.is_multicast()
        || src.is_loopback()
        || h.dst.is_broadcast()
        || h.dst.is_multicast()
    {
        return false;
    }
    if h.protocol == PROTO_ICMP {
        // Only informational ICMP (echo, timestamp, ...) may trigger an error.
        let Some(&icmp_type) = original.get(h.header_len) else {
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
    h: &Header,
    code: u8,
    src: Ipv4Addr,
    out: &mut Vec<u8>,
) {
    let quote_len = original
        .len()
        .min(MAX_ICMP_ERROR_LEN - 28)
        .min(usize::from(u16::from_be_bytes([original[2], original[3]])));
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
        h.src.octets()[0],
        h.src.octets()[1],
        h.src.octets()[2],
        h.src.octets()[3],
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

/// An IPv4 prefix such as the NAT pool `10.64.0.0/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    addr: u32,
    len: u8,
}

impl Prefix {
    /// `addr/len`; host bits are cleared.
    ///
    /// # Errors
    /// When `len` exceeds 32.
    pub fn new(addr: Ipv4Addr, len: u8) -> Result<Self, PrefixError> {
        if len > 32 {
            return Err(PrefixError);
        }
        Ok(Self {
            addr: u32::from(addr) & Self::mask(len),
            len,
        })
    }

    fn mask(len: u8) -> u32 {
        if len == 0 { 0 } else { u32::MAX << (32 - len) }
    }

    /// Whether `ip` lies inside.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.len) == self.addr
    }

    /// The network address.
    pub fn addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.addr)
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr(), self.len)
    }
}

/// Not an `a.b.c.d/len` IPv4 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("expected an IPv4 prefix such as 10.64.0.0/16")]
pub struct PrefixError;

impl std::str::FromStr for Prefix {
    type Err = PrefixError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, l) = s.trim().split_once('/').ok_or(PrefixError)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| PrefixError)?;
        let len: u8 = l.parse().map_err(|_| PrefixError)?;
        Self::new(addr, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp_packet() -> Vec<u8> {
        let mut p = Vec::new();
        etherparse::PacketBuilder::ipv4([172, 16, 0, 50], [10, 64, 0, 99], 64)
            .udp(4000, 53)
            .write(&mut p, &[7u8; 1000])
            .unwrap();
        p
    }

    #[test]
    fn parse_rejects_short_and_inconsistent_headers() {
        let p = udp_packet();
        let h = parse(&p).unwrap();
        assert_eq!(h.src, Ipv4Addr::new(172, 16, 0, 50));
        assert_eq!(h.dst, Ipv4Addr::new(10, 64, 0, 99));
        assert_eq!(h.header_len, 20);
        assert!(parse(&p[..19]).is_none());
        assert!(parse(&p[..500]).is_none(), "total length beyond the buffer");
        let mut bad = p.clone();
        bad[0] = 0x44; // IHL 4
        assert!(parse(&bad).is_none());
        bad[0] = 0x65; // version 6
        assert!(parse(&bad).is_none());
    }

    #[test]
    fn unreachable_is_a_valid_icmp_error_quoting_the_original() {
        let p = udp_packet();
        let h = parse(&p).unwrap();
        let mut out = Vec::new();
        emit_unreachable(&p, &h, ICMP_HOST_UNREACHABLE, h.dst, &mut out);
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
        assert!(may_send_error_about(&p, &parse(&p).unwrap()));
        p[6] = 0x00;
        p[7] = 0x10; // fragment offset 16
        assert!(!may_send_error_about(&p, &parse(&p).unwrap()));
        let mut icmp_err = Vec::new();
        etherparse::PacketBuilder::ipv4([172, 16, 0, 50], [10, 64, 0, 99], 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            ))
            .write(&mut icmp_err, &[0; 28])
            .unwrap();
        assert!(!may_send_error_about(&icmp_err, &parse(&icmp_err).unwrap()));
        let mut ping = Vec::new();
        etherparse::PacketBuilder::ipv4([172, 16, 0, 50], [10, 64, 0, 99], 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut ping, &[0; 8])
            .unwrap();
        assert!(may_send_error_about(&ping, &parse(&ping).unwrap()));
        let mut bcast = udp_packet();
        bcast[12..16].copy_from_slice(&[255, 255, 255, 255]);
        assert!(!may_send_error_about(&bcast, &parse(&bcast).unwrap()));
    }

    #[test]
    fn prefixes() {
        let p: Prefix = "10.64.1.7/16".parse().unwrap();
        assert_eq!(p.to_string(), "10.64.0.0/16");
        assert!(p.contains(Ipv4Addr::new(10, 64, 255, 1)));
        assert!(!p.contains(Ipv4Addr::new(10, 65, 0, 1)));
        assert!("10.64.0.0/33".parse::<Prefix>().is_err());
        assert!("10.64.0.0".parse::<Prefix>().is_err());
        let all: Prefix = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(1, 2, 3, 4)));
    }
}
