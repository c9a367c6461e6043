//! The agent's packet path: datagrams from the gateway to the LAN side and
//! back, through the tunnel, the consent check and (packet mode) the NAT.

use std::net::SocketAddr;
use std::time::Instant;

use super::{
    AgentEvent, AgentState, DataMode, DropReason, LanOutcome, MAX_QUEUE, NetworkOutcome, Transmit,
};
use crate::ipv4::{FixedHeader, HeaderError, Ipv4Header};
use crate::tunnel::{Decapsulated, Encapsulated, Kinds, Tunnel, TunnelEvent};

impl<K: Kinds> AgentState<K> {
    /// Processes a datagram that arrived on the agent's socket from `from`,
    /// writing a packet for the LAN side into `out` (which must hold
    /// [`Kinds::buffer_len`]`(datagram.len())` bytes).
    pub fn handle_network_input_into<'b>(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        out: &'b mut [u8],
        now: Instant,
    ) -> NetworkOutcome<'b> {
        let Some(peer) = self.peer.as_mut() else {
            self.counters.drops.add(DropReason::NoTunnel);
            return NetworkOutcome::Dropped(DropReason::NoTunnel);
        };
        if from != peer.desired.endpoint {
            self.counters.drops.add(DropReason::UnknownSender);
            tracing::trace!(%from, "datagram from an unknown sender");
            return NetworkOutcome::Dropped(DropReason::UnknownSender);
        }
        let dst = peer.desired.endpoint;
        let packet = match peer.tunnel.decapsulate(Some(from), datagram, out, now) {
            Ok(Decapsulated::Tunnel(p)) => p,
            Ok(Decapsulated::Network(reply)) => {
                let reply: &[u8] = reply;
                self.queue_transmit(dst, reply);
                self.after_tunnel_activity();
                return NetworkOutcome::Consumed;
            }
            Ok(Decapsulated::Nothing) => {
                self.after_tunnel_activity();
                return NetworkOutcome::Consumed;
            }
            Err(e) => {
                let r = DropReason::from(e);
                self.counters.drops.add(r);
                tracing::trace!(reason = r.as_str(), "datagram dropped by the tunnel");
                return NetworkOutcome::Dropped(r);
            }
        };
        match self.inbound(packet, now) {
            Ok(()) => {
                self.counters.to_lan_packets += 1;
                self.counters.to_lan_bytes += packet.len() as u64;
                NetworkOutcome::Lan(packet)
            }
            Err(r) => {
                self.counters.drops.add(r);
                tracing::trace!(reason = r.as_str(), "tunnel packet dropped");
                NetworkOutcome::Dropped(r)
            }
        }
    }

    /// Tunnel → LAN: the source is a technician's, consent check and
    /// (packet mode) the NAT rewrite.
    pub(super) fn inbound(&mut self, packet: &mut [u8], now: Instant) -> Result<(), DropReason> {
        let h = fixed_header(packet)?;
        let (src, dst) = (h.src(), h.dst());
        if !self.center_prefixes.iter().any(|p| p.contains(src)) {
            return Err(DropReason::NotTechnician);
        }
        match self.mappings.get(&dst) {
            None => return Err(DropReason::NotMapped),
            Some(m) if now >= m.expires_at => return Err(DropReason::Expired),
            Some(_) => {}
        }
        match self.mode {
            DataMode::Packet { .. } => self.nat.translate_inbound(packet, now),
            DataMode::Netstack => {
                ipv4_check(packet)?;
                Ok(())
            }
        }
    }

    /// Processes a packet from the LAN side (the TUN device or the userspace
    /// stack), rewriting it in place (packet mode) and writing the datagram to
    /// send into `out` (which must hold [`Kinds::buffer_len`]`(packet.len())` bytes).
    pub fn handle_lan_input_into<'b>(
        &mut self,
        packet: &mut [u8],
        out: &'b mut [u8],
        now: Instant,
    ) -> LanOutcome<'b> {
        if let Err(r) = self.outbound(packet, now) {
            self.counters.drops.add(r);
            tracing::trace!(reason = r.as_str(), "LAN packet dropped");
            return LanOutcome::Dropped(r);
        }
        let Some(peer) = self.peer.as_mut() else {
            self.counters.drops.add(DropReason::TunnelDown);
            return LanOutcome::Dropped(DropReason::TunnelDown);
        };
        match peer.tunnel.encapsulate(packet, out, now) {
            Ok(Encapsulated::Network(d)) => {
                self.counters.to_tunnel_packets += 1;
                self.counters.to_tunnel_bytes += packet.len() as u64;
                LanOutcome::Send {
                    dst: peer.desired.endpoint,
                    datagram: d,
                }
            }
            Ok(Encapsulated::Queued) => {
                self.counters.to_tunnel_packets += 1;
                self.counters.to_tunnel_bytes += packet.len() as u64;
                LanOutcome::Queued
            }
            Err(e) => {
                let r = DropReason::from(e);
                self.counters.drops.add(r);
                LanOutcome::Dropped(r)
            }
        }
    }

    /// LAN → tunnel: (packet mode) the reverse NAT rewrite; (netstack) the
    /// source must be a mapped NAT address.
    pub(super) fn outbound(&mut self, packet: &mut [u8], now: Instant) -> Result<(), DropReason> {
        match self.mode {
            DataMode::Packet { .. } => self.nat.translate_outbound(packet, now),
            DataMode::Netstack => {
                let src = fixed_header(packet)?.src();
                match self.mappings.get(&src) {
                    Some(m) if now < m.expires_at => Ok(()),
                    Some(_) => Err(DropReason::Expired),
                    None => Err(DropReason::UnmappedSource),
                }
            }
        }
    }

    /// Queues packets the tunnel held back and reports handshake events.
    pub(super) fn after_tunnel_activity(&mut self) {
        let Some(peer) = self.peer.as_mut() else {
            return;
        };
        let dst = peer.desired.endpoint;
        let gateway_id = peer.desired.gateway_id;
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut up = false;
        {
            let tunnel = &mut peer.tunnel;
            while let Some(d) = tunnel.poll_network(&mut scratch) {
                if self.transmits.len() >= MAX_QUEUE {
                    self.counters.drops.add(DropReason::QueueFull);
                    continue;
                }
                let mut buf = self.free_bufs.pop().unwrap_or_default();
                buf.clear();
                buf.extend_from_slice(d);
                self.transmits.push_back(Transmit { dst, payload: buf });
            }
            while let Some(e) = tunnel.poll_event() {
                match e {
                    TunnelEvent::HandshakeCompleted => up = true,
                    TunnelEvent::Expired => {
                        tracing::warn!(gateway.id = %gateway_id, "the gateway does not answer");
                    }
                }
            }
        }
        self.scratch = scratch;
        if up {
            tracing::debug!(gateway.id = %gateway_id, "handshake completed");
            self.push_event(AgentEvent::TunnelUp { gateway_id });
        }
    }
}

/// The fixed IPv4 header of a packet from the tunnel or the LAN side: an
/// IPv6 packet is [`DropReason::NotIpv4`], anything else short or not IP
/// [`DropReason::Malformed`].
fn fixed_header(p: &[u8]) -> Result<FixedHeader<'_>, DropReason> {
    FixedHeader::new(p).map_err(|e| match e {
        HeaderError::NotIpv4(6) => DropReason::NotIpv4,
        _ => DropReason::Malformed,
    })
}

/// The IPv4 header checks the NAT makes in packet mode, for netstack mode:
/// version, IHL, total length within the buffer, header checksum.
fn ipv4_check(p: &[u8]) -> Result<(), DropReason> {
    match Ipv4Header::new_checked(p) {
        Ok(h) if h.verify_checksum() => Ok(()),
        _ => Err(DropReason::BadHeader),
    }
}
