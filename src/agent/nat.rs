//! The 1:1 static NAT of the agent's packet mode: in-place IPv4 rewriting
//! between the tunnel side (NAT addresses) and the LAN side (real addresses),
//! with optional masquerade for an agent that is not the LAN's router.
//!
//! This is the agent's own implementation of [`PacketNat`]; the shared core
//! NAT (`vpnnat::nat`, planned by the core-nat work) can replace it behind the
//! same trait.
//!
//! - **Inbound** (tunnel → LAN): the destination must be a mapped NAT address
//!   whose consent has not ended; it becomes the real address. With
//!   masquerade the source (the technician) becomes the masquerade address,
//!   keeping the source port (or ICMP echo identifier) when it is free: an
//!   endpoint-independent mapping (RFC 4787 REQ-1), so one technician socket
//!   keeps one port whatever it talks to.
//! - **Outbound** (LAN → tunnel): the source must be a mapped real address; it
//!   becomes its NAT address. With masquerade, a reply to the masquerade
//!   address is given back the technician's address and port.
//! - Checksums are updated incrementally (RFC 1624, eqn. 3): the IPv4 header,
//!   TCP and UDP (pseudo-header addresses and ports; a zero UDP checksum stays
//!   zero, a computed zero is sent as 0xffff, RFC 768), ICMP echo
//!   identifiers. ICMP errors (destination unreachable, time exceeded,
//!   parameter problem) have the quoted packet rewritten as well — its
//!   addresses, ports and checksums — so that "port unreachable" and
//!   traceroute work through the NAT.
//! - IP fragments: every fragment's addresses are rewritten; ports only in
//!   the first fragment (offset 0).
//! - Anything malformed (truncated, bad version, IHL, total length or header
//!   checksum) is refused with a [`DropReason`]; nothing here panics on input.
//!
//! Idle masquerade entries expire (RFC 4787 REQ-5: UDP after at least 2
//! minutes; RFC 5382 REQ-5: established TCP after 2 h 4 min, a closing one
//! after 4 minutes; ICMP echo after 60 s).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::{DropReason, PacketNat};

const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

const UDP_IDLE: Duration = Duration::from_secs(120);
const TCP_IDLE: Duration = Duration::from_secs(7440);
const TCP_CLOSING_IDLE: Duration = Duration::from_secs(240);
const ICMP_IDLE: Duration = Duration::from_secs(60);
/// How often idle masquerade entries are swept.
const SWEEP: Duration = Duration::from_secs(10);
/// Masquerade entries per protocol at most.
const MAX_CONNS: usize = 16384;
/// Ports masquerade may pick when the technician's is taken.
const PORT_LO: u16 = 1024;

/// Settings of an [`AgentNat`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NatConfig {
    /// Rewrite the technician's source to this LAN address (the agent is not
    /// the LAN's default router).
    pub masquerade: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    real: Ipv4Addr,
    expires_at: Option<Instant>,
}

/// A masquerade mapping: the technician's endpoint and the port it got.
#[derive(Debug, Clone, Copy)]
struct Conn {
    tech: Ipv4Addr,
    tech_port: u16,
    port: u16,
    last: Instant,
    closing: bool,
}

#[derive(Debug)]
struct Masq {
    addr: Ipv4Addr,
    /// (protocol, technician, technician port) → masquerade port.
    by_tech: HashMap<(u8, Ipv4Addr, u16), u16>,
    /// (protocol, masquerade port) → mapping.
    by_port: HashMap<(u8, u16), Conn>,
    next_sweep: Option<Instant>,
}

/// The agent's 1:1 NAT. See the module documentation.
#[derive(Debug)]
pub struct AgentNat {
    by_nat: HashMap<Ipv4Addr, Entry>,
    by_real: HashMap<Ipv4Addr, Ipv4Addr>,
    masq: Option<Masq>,
}

/// Why a mapping could not be inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InsertError {
    /// The real address is already mapped to another NAT address.
    #[error("the real address is already mapped to {0}")]
    RealTaken(Ipv4Addr),
}

// ---------------------------------------------------------------- checksums

/// RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), for one 16-bit word.
fn csum_update16(hc: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!hc) + u32::from(!old) + u32::from(new);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn csum_update32(hc: u16, old: Ipv4Addr, new: Ipv4Addr) -> u16 {
    let (o, n) = (old.octets(), new.octets());
    let hc = csum_update16(
        hc,
        u16::from_be_bytes([o[0], o[1]]),
        u16::from_be_bytes([n[0], n[1]]),
    );
    csum_update16(
        hc,
        u16::from_be_bytes([o[2], o[3]]),
        u16::from_be_bytes([n[2], n[3]]),
    )
}

/// The Internet checksum of `data` (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u32::from(*b) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
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

// ---------------------------------------------------------------- headers

/// A checked IPv4 header.
#[derive(Debug, Clone, Copy)]
struct Ip {
    ihl: usize,
    total: usize,
    proto: u8,
    first_fragment: bool,
    src: Ipv4Addr,
    dst: Ipv4Addr,
}

/// Checks the outer header: version, IHL, total length, header checksum.
fn parse_ip(p: &[u8]) -> Result<Ip, DropReason> {
    let Some(&vihl) = p.first() else {
        return Err(DropReason::Malformed);
    };
    if vihl >> 4 == 6 {
        return Err(DropReason::NotIpv4);
    }
    if vihl >> 4 != 4 {
        return Err(DropReason::BadHeader);
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 || p.len() < ihl {
        return Err(DropReason::BadHeader);
    }
    let total = usize::from(get16(p, 2));
    if total < ihl || total > p.len() {
        return Err(DropReason::BadHeader);
    }
    if checksum(&p[..ihl]) != 0 {
        return Err(DropReason::BadHeader);
    }
    let frag = get16(p, 6);
    Ok(Ip {
        ihl,
        total,
        proto: p[9],
        first_fragment: frag & 0x1fff == 0,
        src: get_addr(p, 12),
        dst: get_addr(p, 16),
    })
}

/// Sets an address of the IPv4 header at `p[..ihl]` (12: source, 16:
/// destination) and returns the old one; updates the header checksum.
fn set_ip_addr(p: &mut [u8], at: usize, new: Ipv4Addr) -> Ipv4Addr {
    let old = get_addr(p, at);
    p[at..at + 4].copy_from_slice(&new.octets());
    let c = csum_update32(get16(p, 10), old, new);
    put16(p, 10, c);
    old
}

/// Where a transport protocol keeps its checksum, and whether zero means "none".
fn l4_checksum_at(proto: u8) -> Option<(usize, bool)> {
    match proto {
        PROTO_TCP => Some((16, false)),
        PROTO_UDP => Some((6, true)),
        _ => None,
    }
}

/// Updates the L4 checksum at `l4[at..]` for a pseudo-header address change.
fn l4_addr_changed(l4: &mut [u8], proto: u8, old: Ipv4Addr, new: Ipv4Addr) {
    if let Some((at, zero_is_none)) = l4_checksum_at(proto)
        && l4.len() >= at + 2
    {
        let c = get16(l4, at);
        if zero_is_none && c == 0 {
            return;
        }
        let mut n = csum_update32(c, old, new);
        if zero_is_none && n == 0 {
            n = 0xffff;
        }
        put16(l4, at, n);
    }
}

/// Sets a 16-bit field of L4 (port, ICMP identifier) and updates its checksum.
fn l4_set16(l4: &mut [u8], proto: u8, field: usize, new: u16) {
    let old = get16(l4, field);
    if old == new {
        return;
    }
    put16(l4, field, new);
    let (at, zero_is_none) = match proto {
        PROTO_ICMP => (2, false),
        _ => match l4_checksum_at(proto) {
            Some(x) => x,
            None => return,
        },
    };
    if l4.len() < at + 2 {
        return;
    }
    let c = get16(l4, at);
    if zero_is_none && c == 0 {
        return;
    }
    let mut n = csum_update16(c, old, new);
    if zero_is_none && n == 0 {
        n = 0xffff;
    }
    put16(l4, at, n);
}

/// ICMP types whose body quotes the offending datagram (RFC 792).
fn is_icmp_error(t: u8) -> bool {
    matches!(t, 3 | 11 | 12)
}

/// The "port" of a flow at `l4`: TCP/UDP source or destination port, or the
/// ICMP echo identifier (for both ends).
fn port_of(proto: u8, l4: &[u8], source: bool) -> Option<u16> {
    match proto {
        PROTO_TCP | PROTO_UDP if l4.len() >= 4 => Some(get16(l4, if source { 0 } else { 2 })),
        PROTO_ICMP if l4.len() >= 8 && matches!(l4[0], 0 | 8) => Some(get16(l4, 4)),
        _ => None,
    }
}

fn port_field(proto: u8, source: bool) -> usize {
    match proto {
        PROTO_ICMP => 4,
        _ if source => 0,
        _ => 2,
    }
}

impl AgentNat {
    /// An empty NAT.
    pub fn new(config: NatConfig) -> Self {
        Self {
            by_nat: HashMap::new(),
            by_real: HashMap::new(),
            masq: config.masquerade.map(|addr| Masq {
                addr,
                by_tech: HashMap::new(),
                by_port: HashMap::new(),
                next_sweep: None,
            }),
        }
    }

    /// Mappings in force (NAT address, real address).
    pub fn len(&self) -> usize {
        self.by_nat.len()
    }

    /// Whether no mapping is in force.
    pub fn is_empty(&self) -> bool {
        self.by_nat.is_empty()
    }

    /// Masquerade entries in use.
    pub fn masquerade_entries(&self) -> usize {
        self.masq.as_ref().map_or(0, |m| m.by_port.len())
    }

    fn live(&self, nat: Ipv4Addr, now: Instant) -> Result<Ipv4Addr, DropReason> {
        match self.by_nat.get(&nat) {
            None => Err(DropReason::NotMapped),
            Some(e) if e.expires_at.is_some_and(|t| now >= t) => Err(DropReason::Expired),
            Some(e) => Ok(e.real),
        }
    }

    fn nat_of(&self, real: Ipv4Addr, now: Instant) -> Result<Ipv4Addr, DropReason> {
        let nat = *self.by_real.get(&real).ok_or(DropReason::UnmappedSource)?;
        self.live(nat, now)?;
        Ok(nat)
    }

    /// Tunnel → LAN.
    fn inbound(&mut self, p: &mut [u8], now: Instant) -> Result<(), DropReason> {
        let ip = parse_ip(p)?;
        let real = self.live(ip.dst, now)?;
        let (head, rest) = p.split_at_mut(ip.ihl);
        let l4 = &mut rest[..ip.total - ip.ihl];
        if ip.proto == PROTO_ICMP
            && ip.first_fragment
            && l4.first().is_some_and(|t| is_icmp_error(*t))
        {
            return self.inbound_icmp_error(head, l4, ip, real);
        }
        // Masquerade first: it may fail (table full) before anything changed.
        let masq = match &self.masq {
            Some(m) => {
                let m_addr = m.addr;
                let port = if ip.first_fragment {
                    match port_of(ip.proto, l4, true) {
                        Some(tp) => Some((
                            self.masq_port(ip.proto, ip.src, tp, now)?,
                            port_field(ip.proto, true),
                        )),
                        None if ip.proto == PROTO_ICMP => return Err(DropReason::Unsupported),
                        None if matches!(ip.proto, PROTO_TCP | PROTO_UDP) => {
                            return Err(DropReason::BadHeader);
                        }
                        None => None,
                    }
                } else {
                    None
                };
                if ip.first_fragment
                    && ip.proto == PROTO_TCP
                    && l4.len() >= 14
                    && l4[13] & 0x05 != 0
                {
                    self.mark_closing(ip.proto, port.map(|(p, _)| p));
                }
                Some((m_addr, port))
            }
            None => None,
        };
        if ip.first_fragment && matches!(ip.proto, PROTO_TCP | PROTO_UDP) && l4.len() < 8 {
            return Err(DropReason::BadHeader);
        }
        let old_dst = set_ip_addr(head, 16, real);
        if ip.first_fragment {
            l4_addr_changed(l4, ip.proto, old_dst, real);
        }
        if let Some((m_addr, port)) = masq {
            let old_src = set_ip_addr(head, 12, m_addr);
            if ip.first_fragment {
                l4_addr_changed(l4, ip.proto, old_src, m_addr);
                if let Some((mp, field)) = port {
                    l4_set16(l4, ip.proto, field, mp);
                }
            }
        }
        Ok(())
    }

    /// The masquerade port for a technician endpoint: the existing mapping,
    /// its own port when free, or the next free one (deterministic).
    fn masq_port(
        &mut self,
        proto: u8,
        tech: Ipv4Addr,
        tech_port: u16,
        now: Instant,
    ) -> Result<u16, DropReason> {
        let m = self.masq.as_mut().ok_or(DropReason::Unsupported)?;
        if let Some(&port) = m.by_tech.get(&(proto, tech, tech_port)) {
            if let Some(c) = m.by_port.get_mut(&(proto, port)) {
                c.last = now;
            }
            return Ok(port);
        }
        if m.by_tech.len() >= MAX_CONNS * 3 {
            return Err(DropReason::QueueFull);
        }
        let per_proto = m.by_port.keys().filter(|(p, _)| *p == proto).count();
        if per_proto >= MAX_CONNS {
            return Err(DropReason::QueueFull);
        }
        let mut port = tech_port;
        if m.by_port.contains_key(&(proto, port)) || (proto != PROTO_ICMP && port == 0) {
            port = (PORT_LO..=u16::MAX)
                .map(|i| {
                    // Start after the technician's port, wrap around.
                    let span = u32::from(u16::MAX - PORT_LO) + 1;
                    let off = (u32::from(tech_port) + u32::from(i - PORT_LO)) % span;
                    PORT_LO + off as u16
                })
                .find(|p| !m.by_port.contains_key(&(proto, *p)))
                .ok_or(DropReason::QueueFull)?;
        }
        m.by_tech.insert((proto, tech, tech_port), port);
        m.by_port.insert(
            (proto, port),
            Conn {
                tech,
                tech_port,
                port,
                last: now,
                closing: false,
            },
        );
        if m.next_sweep.is_none() {
            m.next_sweep = Some(now + SWEEP);
        }
        Ok(port)
    }

    fn mark_closing(&mut self, proto: u8, port: Option<u16>) {
        if let (Some(m), Some(port)) = (self.masq.as_mut(), port)
            && let Some(c) = m.by_port.get_mut(&(proto, port))
        {
            c.closing = true;
        }
    }

    /// An ICMP error from the technician's side about a packet the LAN sent:
    /// the quoted packet went LAN → tunnel, so its source is a NAT address.
    fn inbound_icmp_error(
        &mut self,
        head: &mut [u8],
        icmp: &mut [u8],
        ip: Ip,
        real: Ipv4Addr,
    ) -> Result<(), DropReason> {
        let inner = parse_quoted(icmp)?;
        if inner.src != ip.dst {
            return Err(DropReason::BadHeader);
        }
        let q = &mut icmp[8..];
        set_quoted_addr(q, &inner, 12, real);
        let masq = self.masq.as_ref().map(|m| m.addr);
        if let Some(m_addr) = masq {
            // The quoted destination is the technician endpoint we mapped.
            let tp = quoted_port(q, &inner, false).ok_or(DropReason::Unsupported)?;
            let port = *self
                .masq
                .as_ref()
                .and_then(|m| m.by_tech.get(&(inner.proto, inner.dst, tp)))
                .ok_or(DropReason::NotMapped)?;
            set_quoted_addr(q, &inner, 16, m_addr);
            set_quoted_port(q, &inner, false, port);
            set_ip_addr(head, 12, m_addr);
        }
        set_ip_addr(head, 16, real);
        refresh_icmp_checksum(icmp);
        Ok(())
    }

    /// LAN → tunnel.
    fn outbound(&mut self, p: &mut [u8], now: Instant) -> Result<(), DropReason> {
        let ip = parse_ip(p)?;
        let (head, rest) = p.split_at_mut(ip.ihl);
        let l4 = &mut rest[..ip.total - ip.ihl];
        if ip.proto == PROTO_ICMP
            && ip.first_fragment
            && l4.first().is_some_and(|t| is_icmp_error(*t))
        {
            return self.outbound_icmp_error(head, l4, ip, now);
        }
        let nat = self.nat_of(ip.src, now)?;
        if ip.first_fragment && matches!(ip.proto, PROTO_TCP | PROTO_UDP) && l4.len() < 8 {
            return Err(DropReason::BadHeader);
        }
        // Masquerade: a reply to the masquerade address goes back to the technician.
        let restore = match &self.masq {
            Some(m) if ip.dst == m.addr => {
                if !ip.first_fragment {
                    // Which technician? Only the first fragment carries the port.
                    return Err(DropReason::Unsupported);
                }
                let port = port_of(ip.proto, l4, false).ok_or(DropReason::Unsupported)?;
                let c = *m
                    .by_port
                    .get(&(ip.proto, port))
                    .ok_or(DropReason::NotMapped)?;
                Some(c)
            }
            _ => None,
        };
        let old_src = set_ip_addr(head, 12, nat);
        if ip.first_fragment {
            l4_addr_changed(l4, ip.proto, old_src, nat);
        }
        if let Some(c) = restore {
            let old_dst = set_ip_addr(head, 16, c.tech);
            l4_addr_changed(l4, ip.proto, old_dst, c.tech);
            l4_set16(l4, ip.proto, port_field(ip.proto, false), c.tech_port);
            if let Some(m) = self.masq.as_mut()
                && let Some(conn) = m.by_port.get_mut(&(ip.proto, c.port))
            {
                conn.last = now;
                if ip.proto == PROTO_TCP && l4.len() >= 14 && l4[13] & 0x05 != 0 {
                    conn.closing = true;
                }
            }
        }
        Ok(())
    }

    /// An ICMP error from the LAN about a packet the technician sent: the
    /// quoted packet went tunnel → LAN, so its destination is a real address
    /// (and, with masquerade, its source the masquerade address).
    fn outbound_icmp_error(
        &mut self,
        head: &mut [u8],
        icmp: &mut [u8],
        ip: Ip,
        now: Instant,
    ) -> Result<(), DropReason> {
        let inner = parse_quoted(icmp)?;
        let nat = self.nat_of(inner.dst, now)?;
        let q = &mut icmp[8..];
        set_quoted_addr(q, &inner, 16, nat);
        let masq = self.masq.as_ref().map(|m| m.addr);
        let mut tech = None;
        if let Some(m_addr) = masq
            && inner.src == m_addr
        {
            let mp = quoted_port(q, &inner, true).ok_or(DropReason::Unsupported)?;
            let c = *self
                .masq
                .as_ref()
                .and_then(|m| m.by_port.get(&(inner.proto, mp)))
                .ok_or(DropReason::NotMapped)?;
            set_quoted_addr(q, &inner, 12, c.tech);
            set_quoted_port(q, &inner, true, c.tech_port);
            tech = Some(c.tech);
        }
        // The outer source: the terminal itself (its NAT address) or a LAN
        // router on the way (also shown as the terminal's NAT address: the
        // technician knows no other address on this LAN).
        set_ip_addr(head, 12, nat);
        if let Some(t) = tech {
            set_ip_addr(head, 16, t);
        } else if masq.is_some_and(|m| ip.dst == m) {
            return Err(DropReason::NotMapped);
        }
        refresh_icmp_checksum(icmp);
        Ok(())
    }

    fn sweep(&mut self, now: Instant) {
        let Some(m) = self.masq.as_mut() else {
            return;
        };
        m.by_port.retain(|(proto, _), c| {
            let idle = match *proto {
                PROTO_TCP if c.closing => TCP_CLOSING_IDLE,
                PROTO_TCP => TCP_IDLE,
                PROTO_UDP => UDP_IDLE,
                _ => ICMP_IDLE,
            };
            now.saturating_duration_since(c.last) < idle
        });
        let live = &m.by_port;
        m.by_tech
            .retain(|(proto, _, _), port| live.contains_key(&(*proto, *port)));
        m.next_sweep = (!m.by_port.is_empty()).then_some(now + SWEEP);
    }
}

/// The quoted datagram of an ICMP error (at `icmp[8..]`), checked enough to
/// rewrite: an IPv4 header and at least the first 8 bytes of its payload
/// (RFC 792).
fn parse_quoted(icmp: &[u8]) -> Result<Ip, DropReason> {
    let q = icmp.get(8..).ok_or(DropReason::BadHeader)?;
    let vihl = *q.first().ok_or(DropReason::BadHeader)?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < 20 || q.len() < ihl + 8 {
        return Err(DropReason::BadHeader);
    }
    Ok(Ip {
        ihl,
        total: q.len(),
        proto: q[9],
        first_fragment: get16(q, 6) & 0x1fff == 0,
        src: get_addr(q, 12),
        dst: get_addr(q, 16),
    })
}

/// Rewrites an address of the quoted header with its header checksum and the
/// quoted L4 checksum (when quoted in full).
fn set_quoted_addr(q: &mut [u8], inner: &Ip, at: usize, new: Ipv4Addr) {
    let old = get_addr(q, at);
    q[at..at + 4].copy_from_slice(&new.octets());
    let c = csum_update32(get16(q, 10), old, new);
    put16(q, 10, c);
    if inner.first_fragment {
        let l4 = &mut q[inner.ihl..];
        l4_addr_changed(l4, inner.proto, old, new);
    }
}

fn quoted_port(q: &[u8], inner: &Ip, source: bool) -> Option<u16> {
    if !inner.first_fragment {
        return None;
    }
    let l4 = &q[inner.ihl..];
    match inner.proto {
        PROTO_TCP | PROTO_UDP => Some(get16(l4, if source { 0 } else { 2 })),
        // A quoted echo request (from the technician) or reply.
        PROTO_ICMP if matches!(l4[0], 0 | 8) => Some(get16(l4, 4)),
        _ => None,
    }
}

fn set_quoted_port(q: &mut [u8], inner: &Ip, source: bool, port: u16) {
    let ihl = inner.ihl;
    let l4 = &mut q[ihl..];
    l4_set16(l4, inner.proto, port_field(inner.proto, source), port);
}

/// Recomputes the ICMP checksum over the whole message (errors are rare and
/// their quoted part changed in several places).
fn refresh_icmp_checksum(icmp: &mut [u8]) {
    put16(icmp, 2, 0);
    let c = checksum(icmp);
    put16(icmp, 2, c);
}

impl PacketNat for AgentNat {
    fn insert(
        &mut self,
        nat: Ipv4Addr,
        real: Ipv4Addr,
        expires_at: Option<Instant>,
    ) -> Result<(), String> {
        if let Some(&other) = self.by_real.get(&real)
            && other != nat
        {
            return Err(InsertError::RealTaken(other).to_string());
        }
        if let Some(old) = self.by_nat.insert(nat, Entry { real, expires_at })
            && old.real != real
        {
            self.by_real.remove(&old.real);
        }
        self.by_real.insert(real, nat);
        Ok(())
    }

    fn remove(&mut self, nat: Ipv4Addr) -> bool {
        match self.by_nat.remove(&nat) {
            Some(e) => {
                self.by_real.remove(&e.real);
                true
            }
            None => false,
        }
    }

    fn translate_inbound(&mut self, packet: &mut [u8], now: Instant) -> Result<(), DropReason> {
        self.inbound(packet, now)
    }

    fn translate_outbound(&mut self, packet: &mut [u8], now: Instant) -> Result<(), DropReason> {
        self.outbound(packet, now)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.masq.as_ref().and_then(|m| m.next_sweep)
    }

    fn handle_timeout(&mut self, now: Instant) {
        if self
            .masq
            .as_ref()
            .and_then(|m| m.next_sweep)
            .is_some_and(|t| now >= t)
        {
            self.sweep(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{IpNumber, Ipv4Header, PacketBuilder, TcpHeader, UdpHeader};
    use test_strategy::proptest;

    const NAT: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 5);
    const REAL: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
    const TECH: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 50);
    const TECH2: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 51);
    const MASQ: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 250);

    fn nat(masquerade: Option<Ipv4Addr>) -> AgentNat {
        let mut n = AgentNat::new(NatConfig { masquerade });
        n.insert(NAT, REAL, None).unwrap();
        n
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

    fn echo(src: Ipv4Addr, dst: Ipv4Addr, id: u16, request: bool) -> Vec<u8> {
        let mut p = Vec::new();
        let b = PacketBuilder::ipv4(src.octets(), dst.octets(), 64);
        if request {
            b.icmpv4_echo_request(id, 7)
                .write(&mut p, b"ping!")
                .unwrap();
        } else {
            b.icmpv4_echo_reply(id, 7).write(&mut p, b"ping!").unwrap();
        }
        p
    }

    /// An ICMP error from `from` to `to` quoting `quoted` (all of it).
    fn icmp_error(from: Ipv4Addr, to: Ipv4Addr, kind: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        PacketBuilder::ipv4(from.octets(), to.octets(), 64)
            .icmpv4_raw(kind, code, [0; 4])
            .write(&mut p, quoted)
            .unwrap();
        p
    }

    /// Every checksum verified by an independent implementation (etherparse),
    /// including those of a quoted packet.
    fn verify(p: &[u8]) {
        let (ip, rest) = Ipv4Header::from_slice(p).unwrap();
        assert_eq!(ip.header_checksum, ip.calc_header_checksum(), "IPv4 header");
        let payload = &rest[..usize::from(ip.payload_len().unwrap())];
        let frag = ip.fragment_offset.value() != 0;
        match ip.protocol {
            IpNumber::TCP if !frag => {
                let (t, data) = TcpHeader::from_slice(payload).unwrap();
                assert_eq!(t.checksum, t.calc_checksum_ipv4(&ip, data).unwrap(), "TCP");
            }
            IpNumber::UDP if !frag => {
                let (u, data) = UdpHeader::from_slice(payload).unwrap();
                if u.checksum != 0 {
                    assert_eq!(u.checksum, u.calc_checksum_ipv4(&ip, data).unwrap(), "UDP");
                }
            }
            IpNumber::ICMP if !frag => {
                assert_eq!(checksum(payload), 0, "ICMP");
                if is_icmp_error(payload[0]) {
                    let (inner, _) = Ipv4Header::from_slice(&payload[8..]).unwrap();
                    assert_eq!(
                        inner.header_checksum,
                        inner.calc_header_checksum(),
                        "quoted IPv4"
                    );
                }
            }
            _ => {}
        }
    }

    fn addrs(p: &[u8]) -> (Ipv4Addr, Ipv4Addr) {
        (get_addr(p, 12), get_addr(p, 16))
    }

    fn ports(p: &[u8]) -> (u16, u16) {
        let ihl = usize::from(p[0] & 0xf) * 4;
        (get16(p, ihl), get16(p, ihl + 2))
    }

    #[test]
    fn tcp_udp_and_echo_are_rewritten_both_ways_with_valid_checksums() {
        let now = Instant::now();
        let mut n = nat(None);
        for mut p in [
            tcp(TECH, NAT, 40000, 3389, b"hello"),
            udp(TECH, NAT, 40000, 53, b"query"),
            echo(TECH, NAT, 9, true),
        ] {
            n.translate_inbound(&mut p, now).unwrap();
            assert_eq!(addrs(&p), (TECH, REAL));
            verify(&p);
        }
        for mut p in [
            tcp(REAL, TECH, 3389, 40000, b"world"),
            udp(REAL, TECH, 53, 40000, b"answer"),
            echo(REAL, TECH, 9, false),
        ] {
            n.translate_outbound(&mut p, now).unwrap();
            assert_eq!(addrs(&p), (NAT, TECH));
            verify(&p);
        }
    }

    #[test]
    fn a_zero_udp_checksum_stays_zero() {
        let mut p = udp(TECH, NAT, 1, 2, b"x");
        p[26] = 0;
        p[27] = 0;
        nat(None).translate_inbound(&mut p, Instant::now()).unwrap();
        assert_eq!(get16(&p, 26), 0);
        verify(&p);
    }

    #[test]
    fn fragments_get_their_addresses_rewritten_and_ports_only_in_the_first() {
        let now = Instant::now();
        let mut n = nat(None);
        let mut first = udp(TECH, NAT, 4000, 53, &[7u8; 64]);
        first[6] = 0x20; // more fragments, offset 0
        let c = checksum(&{
            let mut h = first[..20].to_vec();
            h[10] = 0;
            h[11] = 0;
            h
        });
        put16(&mut first, 10, c);
        n.translate_inbound(&mut first, now).unwrap();
        assert_eq!(addrs(&first), (TECH, REAL));
        // A later fragment: bytes that are not a UDP header at all.
        let mut later = udp(TECH, NAT, 0xaaaa, 0xbbbb, &[7u8; 64]);
        later[6] = 0x00;
        later[7] = 0x10; // offset 128
        put16(&mut later, 10, 0);
        let c = checksum(&later[..20]);
        put16(&mut later, 10, c);
        let before = later[20..].to_vec();
        n.translate_inbound(&mut later, now).unwrap();
        assert_eq!(addrs(&later), (TECH, REAL));
        assert_eq!(
            &later[20..],
            &before[..],
            "payload of a later fragment untouched"
        );
        verify(&later);
    }

    #[test]
    fn icmp_errors_from_the_lan_quote_the_nat_address() {
        let now = Instant::now();
        let mut n = nat(None);
        // The technician's datagram as the PC received it …
        let mut sent = udp(TECH, NAT, 40000, 9999, b"anyone?");
        n.translate_inbound(&mut sent, now).unwrap();
        // … and the PC's "port unreachable" about it.
        let mut err = icmp_error(REAL, TECH, 3, 3, &sent);
        n.translate_outbound(&mut err, now).unwrap();
        assert_eq!(addrs(&err), (NAT, TECH));
        verify(&err);
        let quoted = &err[28..];
        assert_eq!(
            addrs(quoted),
            (TECH, NAT),
            "the quoted packet is what the technician sent"
        );
        assert_eq!(ports(quoted), (40000, 9999));
        let (ih, rest) = Ipv4Header::from_slice(quoted).unwrap();
        let (uh, data) = UdpHeader::from_slice(rest).unwrap();
        assert_eq!(
            uh.checksum,
            uh.calc_checksum_ipv4(&ih, data).unwrap(),
            "quoted UDP"
        );
        // A time-exceeded from a router on the LAN about a TCP segment.
        let mut seg = tcp(TECH, NAT, 40001, 80, b"");
        n.translate_inbound(&mut seg, now).unwrap();
        let mut ttl = icmp_error(Ipv4Addr::new(192, 168, 1, 1), TECH, 11, 0, &seg[..28]);
        n.translate_outbound(&mut ttl, now).unwrap();
        assert_eq!(addrs(&ttl), (NAT, TECH));
        verify(&ttl);
        // An error quoting an unmapped destination is refused.
        let other = udp(TECH, Ipv4Addr::new(192, 168, 1, 77), 1, 2, b"x");
        let mut e = icmp_error(REAL, TECH, 3, 3, &other);
        assert_eq!(
            n.translate_outbound(&mut e, now),
            Err(DropReason::UnmappedSource)
        );
    }

    #[test]
    fn icmp_errors_from_the_technician_quote_the_real_address() {
        let now = Instant::now();
        let mut n = nat(None);
        let mut sent = udp(REAL, TECH, 53, 40000, b"late answer");
        n.translate_outbound(&mut sent, now).unwrap();
        let mut err = icmp_error(TECH, NAT, 3, 3, &sent);
        n.translate_inbound(&mut err, now).unwrap();
        assert_eq!(addrs(&err), (TECH, REAL));
        verify(&err);
        assert_eq!(addrs(&err[28..]), (REAL, TECH));
    }

    #[test]
    fn masquerade_hides_the_technician_and_restores_replies() {
        let now = Instant::now();
        let mut n = nat(Some(MASQ));
        // Two technicians with the same source port.
        let mut a = tcp(TECH, NAT, 40000, 80, b"");
        let mut b = tcp(TECH2, NAT, 40000, 80, b"");
        n.translate_inbound(&mut a, now).unwrap();
        n.translate_inbound(&mut b, now).unwrap();
        verify(&a);
        verify(&b);
        assert_eq!(addrs(&a), (MASQ, REAL));
        assert_eq!(addrs(&b), (MASQ, REAL));
        let (pa, pb) = (ports(&a).0, ports(&b).0);
        assert_eq!(pa, 40000, "port preserved when free");
        assert_ne!(pa, pb, "a collision gets another port");
        // The same technician endpoint keeps its port (endpoint-independent).
        let mut a2 = udp(TECH, NAT, 40000, 53, b"q");
        n.translate_inbound(&mut a2, now).unwrap();
        assert_eq!(ports(&a2).0, 40000);
        // Replies go back to the right technician and port.
        for (port, tech) in [(pa, TECH), (pb, TECH2)] {
            let mut r = tcp(REAL, MASQ, 80, port, b"");
            n.translate_outbound(&mut r, now).unwrap();
            assert_eq!(addrs(&r), (NAT, tech));
            assert_eq!(ports(&r), (80, 40000));
            verify(&r);
        }
        // Echo: the identifier is the port.
        let mut e = echo(TECH, NAT, 77, true);
        n.translate_inbound(&mut e, now).unwrap();
        verify(&e);
        let mut r = echo(REAL, MASQ, 77, false);
        n.translate_outbound(&mut r, now).unwrap();
        assert_eq!(addrs(&r), (NAT, TECH));
        verify(&r);
        // A reply to a port nobody mapped is dropped.
        let mut stray = udp(REAL, MASQ, 53, 1, b"x");
        assert_eq!(
            n.translate_outbound(&mut stray, now),
            Err(DropReason::NotMapped)
        );
        // The PC's port unreachable about the masqueraded datagram.
        let mut sent = udp(TECH2, NAT, 40000, 9, b"x");
        n.translate_inbound(&mut sent, now).unwrap();
        let mut err = icmp_error(REAL, MASQ, 3, 3, &sent);
        n.translate_outbound(&mut err, now).unwrap();
        assert_eq!(addrs(&err), (NAT, TECH2));
        assert_eq!(addrs(&err[28..]), (TECH2, NAT));
        assert_eq!(ports(&err[28..]), (40000, 9));
        verify(&err);
    }

    #[test]
    fn idle_masquerade_entries_expire() {
        let t0 = Instant::now();
        let mut n = nat(Some(MASQ));
        let mut p = udp(TECH, NAT, 5000, 53, b"q");
        n.translate_inbound(&mut p, t0).unwrap();
        let mut t = tcp(TECH, NAT, 5001, 22, b"");
        n.translate_inbound(&mut t, t0).unwrap();
        assert_eq!(n.masquerade_entries(), 2);
        let mut now = t0;
        while now < t0 + UDP_IDLE + SWEEP * 2 {
            now += SWEEP;
            n.handle_timeout(now);
        }
        assert_eq!(
            n.masquerade_entries(),
            1,
            "UDP gone after 2 minutes, TCP kept"
        );
        let mut r = udp(REAL, MASQ, 53, 5000, b"late");
        assert_eq!(
            n.translate_outbound(&mut r, now),
            Err(DropReason::NotMapped)
        );
    }

    #[test]
    fn every_kind_of_bad_packet_is_refused_without_panicking() {
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
            (vec![], DropReason::Malformed),
            (good[..10].to_vec(), DropReason::BadHeader),
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
        put16(&mut v, 2, 4000);
        cases.push((v, DropReason::BadHeader));
        let mut v = good.clone();
        put16(&mut v, 2, 10);
        cases.push((v, DropReason::BadHeader));
        let mut v = good.clone();
        v[10] ^= 1;
        cases.push((v, DropReason::BadHeader));
        // A UDP header cut short (total length says 24).
        let mut v = good[..24].to_vec();
        put16(&mut v, 2, 24);
        put16(&mut v, 10, 0);
        let c = checksum(&v[..20]);
        put16(&mut v, 10, c);
        cases.push((v, DropReason::BadHeader));
        // An ICMP error quoting less than a header.
        let mut v = icmp_error(TECH, NAT, 3, 3, &[0x45, 0, 0]);
        cases.push((std::mem::take(&mut v), DropReason::BadHeader));
        for (mut p, want) in cases {
            let before = p.clone();
            assert_eq!(n.translate_inbound(&mut p, now), Err(want), "{before:02x?}");
        }
        // The LAN side: unmapped source, expired, garbage.
        let mut p = udp(Ipv4Addr::new(192, 168, 1, 99), TECH, 1, 2, b"x");
        assert_eq!(
            n.translate_outbound(&mut p, now),
            Err(DropReason::UnmappedSource)
        );
        let mut p = udp(Ipv4Addr::new(192, 168, 1, 9), TECH, 1, 2, b"x");
        assert_eq!(n.translate_outbound(&mut p, now), Err(DropReason::Expired));
        let mut p = vec![0x45u8; 19];
        assert!(n.translate_outbound(&mut p, now).is_err());
    }

    #[test]
    fn mappings_replace_and_refuse_a_shared_real_address() {
        let mut n = nat(None);
        assert!(n.insert(Ipv4Addr::new(10, 64, 0, 6), REAL, None).is_err());
        n.insert(NAT, Ipv4Addr::new(192, 168, 1, 11), None).unwrap();
        assert_eq!(n.len(), 1);
        n.insert(Ipv4Addr::new(10, 64, 0, 6), REAL, None).unwrap();
        assert!(n.remove(NAT));
        assert!(!n.remove(NAT));
        assert_eq!(n.len(), 1);
    }

    /// Inbound, then the reply to what came out, outbound: the technician
    /// gets exactly the reply to what it sent, with valid checksums.
    #[proptest]
    fn forward_then_back_restores_the_original(
        #[strategy(0u8..3)] kind: u8,
        sport: u16,
        #[strategy(1u16..)] dport: u16,
        #[strategy(proptest::collection::vec(proptest::num::u8::ANY, 0..300))] payload: Vec<u8>,
        masquerade: bool,
        zero_udp_checksum: bool,
    ) {
        let now = Instant::now();
        let mut n = nat(masquerade.then_some(MASQ));
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
            _ => echo(src, dst, s, !reply),
        };
        let original = build(TECH, NAT, sport, dport, false);
        let mut p = original.clone();
        n.translate_inbound(&mut p, now).unwrap();
        verify(&p);
        let (src, dst) = addrs(&p);
        assert_eq!(dst, REAL);
        assert_eq!(src, if masquerade { MASQ } else { TECH });
        let (s, d) = if kind == 2 {
            let id = get16(&p, 24);
            (id, id)
        } else {
            ports(&p)
        };
        // The PC answers the packet it received.
        let mut reply = build(REAL, src, d, s, true);
        n.translate_outbound(&mut reply, now).unwrap();
        verify(&reply);
        let expected = build(NAT, TECH, dport, sport, true);
        if kind == 2 {
            assert_eq!(get16(&reply, 24), sport, "echo identifier");
            assert_eq!(addrs(&reply), (NAT, TECH));
        } else {
            assert_eq!(reply, expected);
        }
    }
}
