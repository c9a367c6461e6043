//! The masquerade connection table: technician endpoints ↔ ports of the
//! masquerade address, for an agent that is not the LAN's default router
//! (the LAN hosts must send their replies back to it).
//!
//! Mappings are endpoint-independent (RFC 4787 REQ-1, RFC 5382 REQ-1): one
//! technician (address, port) keeps one masquerade port whatever it talks
//! to, and the port is the technician's own when it is free (port
//! preservation, RFC 4787 §4.2.1). Idle entries expire: UDP after 2 minutes
//! (RFC 4787 REQ-5), established TCP after 2 h 4 min and a closing one after
//! 4 minutes (RFC 5382 REQ-5), ICMP echo after 60 s (the shortest query
//! timeout RFC 5508 allows).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::rewrite::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use super::{DropReason, FastMap};

const UDP_IDLE: Duration = Duration::from_secs(120);
const TCP_IDLE: Duration = Duration::from_secs(7440);
const TCP_CLOSING_IDLE: Duration = Duration::from_secs(240);
const ICMP_IDLE: Duration = Duration::from_secs(60);
/// How often idle entries are swept: expiry is this much late at most.
pub(super) const SWEEP: Duration = Duration::from_secs(10);
/// Entries per protocol at most (bounds memory against a chatty technician).
pub(super) const MAX_CONNS: usize = 16384;
/// The lowest port handed out when the technician's own is taken.
const PORT_LO: u16 = 1024;

/// A masquerade entry: the technician endpoint behind one masquerade port.
#[derive(Debug, Clone, Copy)]
pub(super) struct Conn {
    pub(super) tech: Ipv4Addr,
    pub(super) tech_port: u16,
    last: Instant,
    closing: bool,
}

fn tech_key(proto: u8, tech: Ipv4Addr, port: u16) -> u64 {
    (u64::from(proto) << 48) | (u64::from(tech.to_bits()) << 16) | u64::from(port)
}

fn port_key(proto: u8, port: u16) -> u32 {
    (u32::from(proto) << 16) | u32::from(port)
}

fn proto_index(proto: u8) -> usize {
    match proto {
        PROTO_TCP => 0,
        PROTO_UDP => 1,
        _ => 2,
    }
}

#[derive(Debug)]
pub(super) struct Masquerade {
    pub(super) addr: Ipv4Addr,
    by_tech: FastMap<u64, u16>,
    by_port: FastMap<u32, Conn>,
    per_proto: [usize; 3],
    next_sweep: Option<Instant>,
}

impl Masquerade {
    pub(super) fn new(addr: Ipv4Addr) -> Self {
        Self {
            addr,
            by_tech: FastMap::default(),
            by_port: FastMap::default(),
            per_proto: [0; 3],
            next_sweep: None,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.by_port.len()
    }

    /// The masquerade port of an existing mapping, without creating one.
    pub(super) fn port_of(&self, proto: u8, tech: Ipv4Addr, tech_port: u16) -> Option<u16> {
        self.by_tech.get(&tech_key(proto, tech, tech_port)).copied()
    }

    /// The entry behind a masquerade port.
    pub(super) fn conn(&self, proto: u8, port: u16) -> Option<Conn> {
        self.by_port.get(&port_key(proto, port)).copied()
    }

    /// The masquerade port for a technician endpoint: its existing mapping,
    /// the technician's own port when free, or the next free one after it
    /// (wrapping within 1024..=65535, so the choice is deterministic; a
    /// taken port below 1024 is replaced by one from 1024 up, which keeps
    /// LAN hosts from mistaking it for a privileged source).
    pub(super) fn port_for(
        &mut self,
        proto: u8,
        tech: Ipv4Addr,
        tech_port: u16,
        now: Instant,
    ) -> Result<u16, DropReason> {
        if let Some(port) = self.port_of(proto, tech, tech_port) {
            self.touch(proto, port, false, now);
            return Ok(port);
        }
        let idx = proto_index(proto);
        if self.per_proto[idx] >= MAX_CONNS {
            return Err(DropReason::TableFull);
        }
        let taken = |p: u16| self.by_port.contains_key(&port_key(proto, p));
        // Port 0 is not a port for TCP and UDP; an echo identifier may be 0.
        let mut port = tech_port;
        if taken(port) || (proto != PROTO_ICMP && port == 0) {
            let span = u32::from(u16::MAX - PORT_LO) + 1;
            let after = u32::from(tech_port.saturating_sub(PORT_LO)) + 1;
            port = (0..span)
                .map(|i| PORT_LO + ((after + i) % span) as u16)
                .find(|p| !taken(*p))
                .ok_or(DropReason::TableFull)?;
        }
        self.by_tech.insert(tech_key(proto, tech, tech_port), port);
        self.by_port.insert(
            port_key(proto, port),
            Conn {
                tech,
                tech_port,
                last: now,
                closing: false,
            },
        );
        self.per_proto[idx] += 1;
        if self.next_sweep.is_none() {
            self.next_sweep = Some(now + SWEEP);
        }
        Ok(port)
    }

    /// Traffic on an entry: it stays alive; FIN or RST shortens its life.
    pub(super) fn touch(&mut self, proto: u8, port: u16, closing: bool, now: Instant) {
        if let Some(c) = self.by_port.get_mut(&port_key(proto, port)) {
            c.last = now;
            c.closing |= closing;
        }
    }

    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        self.next_sweep
    }

    pub(super) fn handle_timeout(&mut self, now: Instant) {
        if self.next_sweep.is_none_or(|t| now < t) {
            return;
        }
        let mut per_proto = [0; 3];
        self.by_port.retain(|key, c| {
            let proto = (key >> 16) as u8;
            let idle = match proto {
                PROTO_TCP if c.closing => TCP_CLOSING_IDLE,
                PROTO_TCP => TCP_IDLE,
                PROTO_UDP => UDP_IDLE,
                _ => ICMP_IDLE,
            };
            let keep = now.saturating_duration_since(c.last) < idle;
            if keep {
                per_proto[proto_index(proto)] += 1;
            }
            keep
        });
        self.per_proto = per_proto;
        let live = &self.by_port;
        self.by_tech.retain(|key, port| {
            let proto = (key >> 48) as u8;
            live.contains_key(&port_key(proto, *port))
        });
        self.next_sweep = (!self.by_port.is_empty()).then_some(now + SWEEP);
    }
}

#[cfg(test)]
pub(super) const TEST_UDP_IDLE: Duration = UDP_IDLE;
