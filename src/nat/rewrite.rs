//! In-place IPv4 rewriting with incremental checksum updates.
//!
//! The outer IPv4 header is checked once by the core's view
//! ([`crate::ipv4::Ipv4Header`]); the packet is then read and written through
//! smoltcp's `wire` views (`Ipv4Packet`, `TcpPacket`, `UdpPacket`,
//! `Icmpv4Packet`), whose lengths are known to be sufficient, so no accessor
//! can panic. The datagram quoted
//! inside an ICMP error is usually truncated (RFC 792 only promises its IP
//! header and 8 bytes), which smoltcp's checked views refuse, so the few fields
//! of a quote are addressed by offset here instead.
//!
//! Checksums are never recomputed from scratch: every changed 16-bit word adds
//! `~old + new` to a [`Delta`], and the delta is folded into the old checksum
//! once (RFC 1624, eqn. 3). That keeps the cost independent of the payload
//! length, works on fragments whose checksum covers bytes we never see, and
//! keeps a corrupted segment corrupted (a recomputed checksum would bless it).

use std::net::Ipv4Addr;

use smoltcp::wire::{Icmpv4Packet, Ipv4Packet, TcpPacket, UdpPacket};

use super::DropReason;
use crate::ipv4::{HeaderError, Ipv4Header};

pub(super) use crate::ipv4::{MIN_HEADER_LEN as IPV4_MIN_HEADER, PROTO_ICMP, PROTO_TCP, PROTO_UDP};
const TCP_MIN_HEADER: usize = 20;
const UDP_HEADER: usize = 8;
const ICMP_HEADER: usize = 8;

/// Offsets inside an IPv4 header.
const IP_CHECKSUM: usize = 10;
const IP_SRC: usize = 12;
const IP_DST: usize = 16;

/// A pending one's-complement checksum adjustment: the sum of `~old + new`
/// over every changed 16-bit word (RFC 1624, eqn. 3).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Delta(u32);

impl Delta {
    pub(super) fn word(&mut self, old: u16, new: u16) {
        self.0 += u32::from(!old) + u32::from(new);
    }

    pub(super) fn addr(&mut self, old: Ipv4Addr, new: Ipv4Addr) {
        let (o, n) = (old.to_bits(), new.to_bits());
        self.word((o >> 16) as u16, (n >> 16) as u16);
        self.word(o as u16, n as u16);
    }

    /// `HC' = ~(~HC + Σ(~m + m'))`. The result is never 0xffff for a
    /// non-empty delta, so applying a delta and then its inverse gives back
    /// the original checksum bit for bit (any checksum a sender computed is
    /// never 0xffff either: that would need an all-zero sum).
    pub(super) fn apply(self, checksum: u16) -> u16 {
        let mut sum = u32::from(!checksum) + self.0;
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }
}

fn get16(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

fn put16(p: &mut [u8], at: usize, v: u16) {
    p[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn get_addr(p: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(p[at], p[at + 1], p[at + 2], p[at + 3])
}

/// The checked outer IPv4 header of a packet.
#[derive(Debug, Clone, Copy)]
pub(super) struct Header {
    pub(super) ihl: usize,
    pub(super) total: usize,
    pub(super) proto: u8,
    /// Fragment offset 0: the transport header is in this packet.
    pub(super) first: bool,
    pub(super) src: Ipv4Addr,
    pub(super) dst: Ipv4Addr,
}

impl Header {
    /// Checks version, IHL, total length and header checksum, and that the
    /// first fragment holds the whole transport header it needs rewritten.
    ///
    /// A first fragment must carry the complete TCP header (20 bytes): the
    /// checksum sits at offset 16, and RFC 1858 ("tiny fragments") already
    /// advises dropping first fragments too short to hold it.
    pub(super) fn parse(p: &[u8]) -> Result<Self, DropReason> {
        let ip = Ipv4Header::new_checked(p).map_err(|e| match e {
            HeaderError::Empty => DropReason::Empty,
            HeaderError::NotIpv4(6) => DropReason::NotIpv4,
            HeaderError::NotIpv4(_) | HeaderError::BadLength => DropReason::BadHeader,
            HeaderError::Truncated => DropReason::Truncated,
        })?;
        if !ip.verify_checksum() {
            return Err(DropReason::BadHeader);
        }
        let (ihl, total) = (ip.header_len(), ip.total_len());
        let h = Self {
            ihl,
            total,
            proto: ip.protocol(),
            first: !ip.is_later_fragment(),
            src: ip.src(),
            dst: ip.dst(),
        };
        if h.first {
            let need = match h.proto {
                PROTO_TCP => TCP_MIN_HEADER,
                PROTO_UDP => UDP_HEADER,
                PROTO_ICMP => ICMP_HEADER,
                _ => 0,
            };
            if total - ihl < need {
                return Err(DropReason::Truncated);
            }
        }
        Ok(h)
    }

    pub(super) fn l4<'a>(&self, p: &'a [u8]) -> &'a [u8] {
        &p[self.ihl..self.total]
    }

    /// An ICMP error (destination unreachable, time exceeded, parameter
    /// problem: RFC 792), whose body quotes the offending datagram.
    pub(super) fn is_icmp_error(&self, p: &[u8]) -> bool {
        self.proto == PROTO_ICMP && self.first && is_icmp_error_type(p[self.ihl])
    }

    /// The "port" of the flow in this first fragment: a TCP or UDP port, or
    /// the ICMP echo identifier (which stands for both ends, RFC 5508 §3.1).
    pub(super) fn port(&self, p: &[u8], end: End) -> Option<u16> {
        flow_port(self.proto, self.l4(p), end)
    }

    /// A TCP segment with FIN or RST: its masquerade entry may expire soon.
    pub(super) fn tcp_closing(&self, p: &[u8]) -> bool {
        if self.proto != PROTO_TCP || !self.first {
            return false;
        }
        let t = TcpPacket::new_unchecked(self.l4(p));
        t.fin() || t.rst()
    }
}

fn is_icmp_error_type(t: u8) -> bool {
    matches!(t, 3 | 11 | 12)
}

fn is_echo_type(t: u8) -> bool {
    matches!(t, 0 | 8)
}

/// Which end of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    Source,
    Destination,
}

/// `l4` holds at least the minimum header of `proto` (checked by the caller).
fn flow_port(proto: u8, l4: &[u8], end: End) -> Option<u16> {
    let field = match (proto, end) {
        (PROTO_TCP | PROTO_UDP, End::Source) => 0,
        (PROTO_TCP | PROTO_UDP, End::Destination) => 2,
        (PROTO_ICMP, _) if is_echo_type(l4[0]) => 4,
        _ => return None,
    };
    Some(get16(l4, field))
}

/// What to change in one packet. `src_port` / `dst_port` mean the ICMP echo
/// identifier for ICMP (only one of them is ever set for it).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Rewrite {
    pub(super) src: Option<Ipv4Addr>,
    pub(super) dst: Option<Ipv4Addr>,
    pub(super) src_port: Option<u16>,
    pub(super) dst_port: Option<u16>,
}

/// Applies `rw` to a packet whose header `h` was checked by
/// [`Header::parse`]. Every fragment gets its addresses and header checksum
/// rewritten; only the first (offset 0) holds the transport header, so only
/// it gets ports and the transport checksum updated (the pseudo-header
/// change is accounted for once, where the checksum is).
pub(super) fn apply(p: &mut [u8], h: &Header, rw: &Rewrite) {
    let mut addrs = Delta::default();
    {
        let mut ip = Ipv4Packet::new_unchecked(&mut *p);
        if let Some(a) = rw.src {
            addrs.addr(ip.src_addr(), a);
            ip.set_src_addr(a);
        }
        if let Some(a) = rw.dst {
            addrs.addr(ip.dst_addr(), a);
            ip.set_dst_addr(a);
        }
        let c = addrs.apply(ip.checksum());
        ip.set_checksum(c);
    }
    if !h.first {
        return;
    }
    let l4 = &mut p[h.ihl..h.total];
    match h.proto {
        PROTO_TCP => {
            let mut t = TcpPacket::new_unchecked(l4);
            let mut d = addrs;
            if let Some(port) = rw.src_port {
                d.word(t.src_port(), port);
                t.set_src_port(port);
            }
            if let Some(port) = rw.dst_port {
                d.word(t.dst_port(), port);
                t.set_dst_port(port);
            }
            let c = d.apply(t.checksum());
            t.set_checksum(c);
        }
        PROTO_UDP => {
            let mut u = UdpPacket::new_unchecked(l4);
            let mut d = addrs;
            if let Some(port) = rw.src_port {
                d.word(u.src_port(), port);
                u.set_src_port(port);
            }
            if let Some(port) = rw.dst_port {
                d.word(u.dst_port(), port);
                u.set_dst_port(port);
            }
            // RFC 768: zero means "no checksum" and stays so; a computed zero
            // is sent as all ones.
            let c = u.checksum();
            if c != 0 {
                let n = d.apply(c);
                u.set_checksum(if n == 0 { 0xffff } else { n });
            }
        }
        PROTO_ICMP => {
            // No pseudo-header: only the echo identifier matters.
            if let Some(id) = rw.src_port.or(rw.dst_port) {
                let mut i = Icmpv4Packet::new_unchecked(l4);
                let mut d = Delta::default();
                d.word(i.echo_ident(), id);
                i.set_echo_ident(id);
                let c = d.apply(i.checksum());
                i.set_checksum(c);
            }
        }
        _ => {}
    }
}

/// The datagram quoted by an ICMP error, at `icmp[8..]`: an IPv4 header and
/// at least the 8 bytes of transport header RFC 792 requires.
#[derive(Debug, Clone, Copy)]
pub(super) struct Quoted {
    ihl: usize,
    pub(super) proto: u8,
    first: bool,
    pub(super) src: Ipv4Addr,
    pub(super) dst: Ipv4Addr,
}

impl Quoted {
    pub(super) fn parse(p: &[u8], h: &Header) -> Result<Self, DropReason> {
        let q = p
            .get(h.ihl + ICMP_HEADER..h.total)
            .ok_or(DropReason::Truncated)?;
        let vihl = *q.first().ok_or(DropReason::Truncated)?;
        let ihl = usize::from(vihl & 0x0f) * 4;
        if vihl >> 4 != 4 || ihl < IPV4_MIN_HEADER {
            return Err(DropReason::BadHeader);
        }
        if q.len() < ihl + 8 {
            return Err(DropReason::Truncated);
        }
        Ok(Self {
            ihl,
            proto: q[9],
            first: get16(q, 6) & 0x1fff == 0,
            src: get_addr(q, IP_SRC),
            dst: get_addr(q, IP_DST),
        })
    }

    /// The quoted flow's port at `end` (TCP/UDP port or echo identifier).
    pub(super) fn port(&self, p: &[u8], h: &Header, end: End) -> Option<u16> {
        if !self.first {
            return None;
        }
        let l4 = &p[h.ihl + ICMP_HEADER + self.ihl..h.total];
        flow_port(self.proto, l4, end)
    }
}

/// Applies `rw` to the quoted datagram and `outer` to the ICMP error
/// carrying it. Every word changed inside the ICMP message (quoted
/// addresses, ports and the quoted checksums themselves) is folded into the
/// ICMP checksum incrementally, so this also works on the first fragment of
/// a fragmented ICMP error.
pub(super) fn apply_icmp_error(
    p: &mut [u8],
    h: &Header,
    q: &Quoted,
    quoted: &Rewrite,
    outer: &Rewrite,
) {
    let icmp_at = h.ihl;
    let q_at = icmp_at + ICMP_HEADER;
    let l4_at = q_at + q.ihl;
    let end = h.total;
    let mut icmp = Delta::default();
    let mut set = |p: &mut [u8], at: usize, new: u16| {
        let old = get16(p, at);
        put16(p, at, new);
        icmp.word(old, new);
        old
    };
    // Quoted IPv4 header.
    let mut addrs = Delta::default();
    for (field, new) in [(IP_SRC, quoted.src), (IP_DST, quoted.dst)] {
        if let Some(a) = new {
            let old = get_addr(p, q_at + field);
            let n = a.to_bits();
            set(p, q_at + field, (n >> 16) as u16);
            set(p, q_at + field + 2, n as u16);
            addrs.addr(old, a);
        }
    }
    let hc = addrs.apply(get16(p, q_at + IP_CHECKSUM));
    set(p, q_at + IP_CHECKSUM, hc);
    // Quoted transport header, as far as it is there.
    if q.first {
        let (pseudo, sport, dport, csum, zero_is_none) = match q.proto {
            PROTO_TCP => (true, 0, 2, 16, false),
            PROTO_UDP => (true, 0, 2, 6, true),
            PROTO_ICMP if is_echo_type(p[l4_at]) => (false, 4, 4, 2, false),
            _ => (false, 0, 0, usize::MAX, false),
        };
        if csum != usize::MAX {
            let mut d = if pseudo { addrs } else { Delta::default() };
            for (field, new) in [(sport, quoted.src_port), (dport, quoted.dst_port)] {
                if let Some(port) = new {
                    let old = set(p, l4_at + field, port);
                    d.word(old, port);
                }
            }
            if l4_at + csum + 2 <= end {
                let c = get16(p, l4_at + csum);
                if !(zero_is_none && c == 0) {
                    let n = d.apply(c);
                    set(
                        p,
                        l4_at + csum,
                        if zero_is_none && n == 0 { 0xffff } else { n },
                    );
                }
            }
        }
    }
    let c = icmp.apply(get16(p, icmp_at + 2));
    put16(p, icmp_at + 2, c);
    apply(p, h, outer);
}
