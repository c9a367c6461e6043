//! The 1:1 static NAT of vpnnat: a table of mappings (NAT address ↔ real LAN
//! address) and in-place rewriting of IPv4 packets in both directions, with
//! optional masquerade for an agent that is not the LAN's default router.
//!
//! It is the "basic NAT" of RFC 2663 §4.1.1 with static bindings: every
//! customer LAN may use the same private prefix, so the technicians reach
//! each serviced PC at a unique pooled address ([`crate::pool`]) instead.
//!
//! - **Inbound** (tunnel → LAN, [`StaticNat::translate_inbound`]): the
//!   destination must be a mapped NAT address whose mapping has not expired;
//!   it becomes the real address. With masquerade the source (the
//!   technician) becomes the masquerade address, keeping the technician's
//!   source port (or ICMP echo identifier) when it is free.
//! - **Outbound** (LAN → tunnel, [`StaticNat::translate_outbound`]): the
//!   source must be a mapped real address; it becomes its NAT address. With
//!   masquerade, a reply to the masquerade address gets the technician's
//!   address and port back.
//! - **Checksums** are updated incrementally (RFC 1624): the IPv4 header,
//!   TCP and UDP (pseudo-header addresses and ports; a zero UDP checksum
//!   stays zero, a computed zero is sent as 0xffff, RFC 768), ICMP echo
//!   identifiers. **ICMP errors** (destination unreachable, time exceeded,
//!   parameter problem) get the quoted datagram rewritten as well — its
//!   addresses, ports and checksums — so "port unreachable" and traceroute
//!   make sense on the other side (RFC 3022 §4.3, RFC 5508).
//! - **Fragments**: every fragment's header is rewritten; ports and the
//!   transport checksum only in the first (offset 0), which is the only one
//!   carrying them. Masquerade cannot tell which technician a later reply
//!   fragment belongs to and refuses it.
//! - Anything malformed, truncated or unmapped is refused with a
//!   [`DropReason`] and counted ([`StaticNat::drops`]); nothing here panics on
//!   input, and nothing allocates per packet (except a new masquerade
//!   entry).
//!
//! Lookups use hash maps keyed by the address bits with a multiplicative
//! hash instead of SipHash: the keys are the mappings installed by the
//! control plane (and, with masquerade, endpoints of authenticated
//! technicians), not attacker-chosen, and SipHash alone would cost more than
//! the whole rewrite. The maps are never iterated for output, so their order
//! cannot leak into behaviour.
//!
//! ```
//! use std::net::Ipv4Addr;
//! use std::time::Instant;
//! use vpnnat::nat::{NatConfig, StaticNat, Verdict};
//!
//! let (nat, real) = (Ipv4Addr::new(10, 64, 0, 5), Ipv4Addr::new(192, 168, 1, 10));
//! let mut table = StaticNat::new(NatConfig::default());
//! table.insert(nat, real, None).unwrap();
//! // An ICMP echo request from 172.16.0.50 to the NAT address …
//! let mut p = [
//!     0x45, 0, 0, 28, 0, 1, 0, 0, 64, 1, 0, 0, 172, 16, 0, 50, 10, 64, 0, 5, //
//!     8, 0, 0xf7, 0xfe, 0, 1, 0, 0,
//! ];
//! // … with its IPv4 header checksum (RFC 1071).
//! let mut sum: u32 = p[..20].chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
//! while sum > 0xffff {
//!     sum = (sum & 0xffff) + (sum >> 16);
//! }
//! p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
//! assert_eq!(table.translate_inbound(&mut p, Instant::now()), Verdict::Forward);
//! assert_eq!(&p[16..20], &real.octets());
//! ```

pub mod ftp;
mod masquerade;
mod rewrite;
#[cfg(test)]
mod tests;

use std::hash::BuildHasherDefault;
use std::net::Ipv4Addr;
use std::time::Instant;

use crate::ipv4::FastMap;
pub use crate::ipv4::checksum;
use masquerade::Masquerade;
use rewrite::{End, Header, PROTO_ICMP, Quoted, Rewrite};

/// Settings of a [`StaticNat`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatConfig {
    /// Rewrite the technician's source to this LAN address (the agent is not
    /// the LAN's default router, so replies must come back to it).
    pub masquerade: Option<Ipv4Addr>,
}

crate::drops::drop_reasons! {
    /// Why the NAT refused a packet. Payload-free so it can index counters.
    enum DropReason;
    /// A zero-length packet.
    Empty = "empty",
    /// An IPv6 packet (the NAT pool is IPv4).
    NotIpv4 = "not_ipv4",
    /// Bad version, IHL, total length or header checksum.
    BadHeader = "bad_header",
    /// Shorter than its headers or its total length say.
    Truncated = "truncated",
    /// Inbound: the destination is not a mapped NAT address (or, with
    /// masquerade, a reply to a port nobody mapped).
    NotMapped = "not_mapped",
    /// The mapping's expiry has passed.
    Expired = "expired",
    /// Outbound: the source is not a mapped real address.
    UnmappedSource = "unmapped_source",
    /// A packet kind masquerade cannot track (e.g. a later fragment of a
    /// reply, an ICMP query other than echo).
    Unsupported = "unsupported",
    /// The masquerade table has no room for another entry.
    TableFull = "table_full",
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened to a packet.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Rewritten in place; send it on.
    Forward,
    /// Refused and counted; the buffer is unchanged.
    Drop(DropReason),
}

impl Verdict {
    /// `Ok(())` for [`Verdict::Forward`].
    ///
    /// # Errors
    /// The reason of a [`Verdict::Drop`].
    pub fn into_result(self) -> Result<(), DropReason> {
        match self {
            Self::Forward => Ok(()),
            Self::Drop(r) => Err(r),
        }
    }
}

/// Why a mapping could not be inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InsertError {
    /// The real address is already mapped to another NAT address: a 1:1 NAT
    /// could not tell which one a reply should come from.
    #[error("the real address is already mapped to {0}")]
    RealTaken(Ipv4Addr),
    /// The masquerade address would become a mapped real address, and
    /// replies to masqueraded technicians would be taken for the terminal's.
    #[error("{0} is the masquerade address")]
    MasqueradeAddress(Ipv4Addr),
}

/// One side of a mapping: the address on the other side and the expiry.
/// Both maps carry the expiry so that either direction needs one lookup.
#[derive(Debug, Clone, Copy)]
struct Entry {
    other: Ipv4Addr,
    expires_at: Option<Instant>,
}

/// The 1:1 static NAT. See the module documentation.
#[derive(Debug)]
pub struct StaticNat {
    by_nat: FastMap<u32, Entry>,
    by_real: FastMap<u32, Entry>,
    masq: Option<Masquerade>,
    drops: DropCounters,
}

impl StaticNat {
    /// An empty table.
    pub fn new(config: NatConfig) -> Self {
        Self::with_capacity(config, 0)
    }

    /// An empty table with room for `mappings` without rehashing.
    pub fn with_capacity(config: NatConfig, mappings: usize) -> Self {
        Self {
            by_nat: FastMap::with_capacity_and_hasher(mappings, BuildHasherDefault::default()),
            by_real: FastMap::with_capacity_and_hasher(mappings, BuildHasherDefault::default()),
            masq: config.masquerade.map(Masquerade::new),
            drops: DropCounters::default(),
        }
    }

    /// Maps `nat` ↔ `real` until `expires_at` (for ever with `None`),
    /// replacing an older mapping of `nat`.
    ///
    /// # Errors
    /// [`InsertError`] when `real` is mapped to another NAT address or is the
    /// masquerade address; the table is then unchanged.
    pub fn insert(
        &mut self,
        nat: Ipv4Addr,
        real: Ipv4Addr,
        expires_at: Option<Instant>,
    ) -> Result<(), InsertError> {
        if let Some(e) = self.by_real.get(&real.to_bits())
            && e.other != nat
        {
            return Err(InsertError::RealTaken(e.other));
        }
        if self.masq.as_ref().is_some_and(|m| m.addr == real) {
            return Err(InsertError::MasqueradeAddress(real));
        }
        let entry = |other| Entry { other, expires_at };
        if let Some(old) = self.by_nat.insert(nat.to_bits(), entry(real))
            && old.other != real
        {
            self.by_real.remove(&old.other.to_bits());
        }
        self.by_real.insert(real.to_bits(), entry(nat));
        Ok(())
    }

    /// Removes the mapping of `nat`; the real address it had.
    pub fn remove(&mut self, nat: Ipv4Addr) -> Option<Ipv4Addr> {
        let e = self.by_nat.remove(&nat.to_bits())?;
        self.by_real.remove(&e.other.to_bits());
        Some(e.other)
    }

    /// The real address `nat` is mapped to (expired or not).
    pub fn get(&self, nat: Ipv4Addr) -> Option<Ipv4Addr> {
        self.by_nat.get(&nat.to_bits()).map(|e| e.other)
    }

    /// Mappings in the table.
    pub fn len(&self) -> usize {
        self.by_nat.len()
    }

    /// Whether the table holds no mapping.
    pub fn is_empty(&self) -> bool {
        self.by_nat.is_empty()
    }

    /// Masquerade entries in use (0 without masquerade).
    pub fn masquerade_entries(&self) -> usize {
        self.masq.as_ref().map_or(0, Masquerade::len)
    }

    /// Packets refused so far, by reason.
    pub fn drops(&self) -> &DropCounters {
        &self.drops
    }

    /// Tunnel → LAN, in place: destination NAT address → real address (and,
    /// with masquerade, the technician → the masquerade address).
    ///
    /// A dropped packet's buffer is left as it was.
    pub fn translate_inbound(&mut self, packet: &mut [u8], now: Instant) -> Verdict {
        let r = self.inbound(packet, now);
        self.verdict(r)
    }

    /// LAN → tunnel, in place: source real address → NAT address (and, with
    /// masquerade, a reply to the masquerade address → the technician).
    ///
    /// A dropped packet's buffer is left as it was.
    pub fn translate_outbound(&mut self, packet: &mut [u8], now: Instant) -> Verdict {
        let r = self.outbound(packet, now);
        self.verdict(r)
    }

    /// When [`Self::handle_timeout`] wants to run (idle masquerade entries).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.masq.as_ref().and_then(Masquerade::poll_timeout)
    }

    /// Expires idle masquerade entries. Mappings are not expired here: their
    /// `expires_at` is checked on every packet, and the owner removes them.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(m) = self.masq.as_mut() {
            m.handle_timeout(now);
        }
    }

    fn verdict(&mut self, r: Result<(), DropReason>) -> Verdict {
        match r {
            Ok(()) => Verdict::Forward,
            Err(reason) => {
                self.drops.add(reason);
                Verdict::Drop(reason)
            }
        }
    }

    fn live(
        map: &FastMap<u32, Entry>,
        key: Ipv4Addr,
        missing: DropReason,
        now: Instant,
    ) -> Result<Ipv4Addr, DropReason> {
        match map.get(&key.to_bits()) {
            None => Err(missing),
            Some(e) if e.expires_at.is_some_and(|t| now >= t) => Err(DropReason::Expired),
            Some(e) => Ok(e.other),
        }
    }

    /// The real address of a live mapping of `nat`.
    fn real_of(&self, nat: Ipv4Addr, now: Instant) -> Result<Ipv4Addr, DropReason> {
        Self::live(&self.by_nat, nat, DropReason::NotMapped, now)
    }

    /// The NAT address of a live mapping of `real`.
    fn nat_of(&self, real: Ipv4Addr, now: Instant) -> Result<Ipv4Addr, DropReason> {
        Self::live(&self.by_real, real, DropReason::UnmappedSource, now)
    }

    fn inbound(&mut self, p: &mut [u8], now: Instant) -> Result<(), DropReason> {
        let h = Header::parse(p)?;
        let real = self.real_of(h.dst, now)?;
        if h.is_icmp_error(p) {
            return self.inbound_icmp_error(p, &h, real);
        }
        let mut rw = Rewrite {
            dst: Some(real),
            ..Rewrite::default()
        };
        if let Some(m) = self.masq.as_mut() {
            rw.src = Some(m.addr);
            if h.first {
                match h.port(p, End::Source) {
                    Some(tech_port) => {
                        let port = m.port_for(h.proto, h.src, tech_port, now)?;
                        if h.tcp_closing(p) {
                            m.touch(h.proto, port, true, now);
                        }
                        rw.src_port = Some(port);
                    }
                    // Without an identifier the reply could not be matched.
                    None if h.proto == PROTO_ICMP => return Err(DropReason::Unsupported),
                    None => {}
                }
            }
        }
        rewrite::apply(p, &h, &rw);
        Ok(())
    }

    /// An ICMP error from the technician's side about a datagram the LAN
    /// sent: the quote went LAN → tunnel, so its source is our NAT address
    /// (and, with masquerade, its destination the technician endpoint).
    fn inbound_icmp_error(
        &mut self,
        p: &mut [u8],
        h: &Header,
        real: Ipv4Addr,
    ) -> Result<(), DropReason> {
        let q = Quoted::parse(p, h)?;
        if q.src != h.dst {
            return Err(DropReason::BadHeader);
        }
        let mut quoted = Rewrite {
            src: Some(real),
            ..Rewrite::default()
        };
        let mut outer = Rewrite {
            dst: Some(real),
            ..Rewrite::default()
        };
        if let Some(m) = self.masq.as_ref() {
            let tech_port = q
                .port(p, h, End::Destination)
                .ok_or(DropReason::Unsupported)?;
            let port = m
                .port_of(q.proto, q.dst, tech_port)
                .ok_or(DropReason::NotMapped)?;
            quoted.dst = Some(m.addr);
            quoted.dst_port = Some(port);
            outer.src = Some(m.addr);
        }
        rewrite::apply_icmp_error(p, h, &q, &quoted, &outer);
        Ok(())
    }

    fn outbound(&mut self, p: &mut [u8], now: Instant) -> Result<(), DropReason> {
        let h = Header::parse(p)?;
        if h.is_icmp_error(p) {
            return self.outbound_icmp_error(p, &h, now);
        }
        let nat = self.nat_of(h.src, now)?;
        let mut rw = Rewrite {
            src: Some(nat),
            ..Rewrite::default()
        };
        if let Some(m) = self.masq.as_mut()
            && h.dst == m.addr
        {
            if !h.first {
                // Only the first fragment says which technician it is for.
                return Err(DropReason::Unsupported);
            }
            let port = h.port(p, End::Destination).ok_or(DropReason::Unsupported)?;
            let c = m.conn(h.proto, port).ok_or(DropReason::NotMapped)?;
            m.touch(h.proto, port, h.tcp_closing(p), now);
            rw.dst = Some(c.tech);
            rw.dst_port = Some(c.tech_port);
        }
        rewrite::apply(p, &h, &rw);
        Ok(())
    }

    /// An ICMP error from the LAN about a datagram the technician sent: the
    /// quote went tunnel → LAN, so its destination is a real address (and,
    /// with masquerade, its source the masquerade address).
    fn outbound_icmp_error(
        &mut self,
        p: &mut [u8],
        h: &Header,
        now: Instant,
    ) -> Result<(), DropReason> {
        let q = Quoted::parse(p, h)?;
        let nat = self.nat_of(q.dst, now)?;
        let mut quoted = Rewrite {
            dst: Some(nat),
            ..Rewrite::default()
        };
        // The outer source is the terminal itself or a router on the LAN;
        // either is shown as the terminal's NAT address, the only address of
        // this LAN the technician knows.
        let mut outer = Rewrite {
            src: Some(nat),
            ..Rewrite::default()
        };
        match self.masq.as_ref() {
            Some(m) if q.src == m.addr => {
                let port = q.port(p, h, End::Source).ok_or(DropReason::Unsupported)?;
                let c = m.conn(q.proto, port).ok_or(DropReason::NotMapped)?;
                quoted.src = Some(c.tech);
                quoted.src_port = Some(c.tech_port);
                outer.dst = Some(c.tech);
            }
            Some(m) if h.dst == m.addr => return Err(DropReason::NotMapped),
            _ => {}
        }
        rewrite::apply_icmp_error(p, h, &q, &quoted, &outer);
        Ok(())
    }
}
