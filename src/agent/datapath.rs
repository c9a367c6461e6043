//! The agent's packet path: datagrams from the gateway to the LAN side and
//! back, through the tunnel, the consent check and (packet mode) the NAT.

use std::net::SocketAddr;
use std::time::Instant;

use super::{
    AgentEvent, AgentState, DataMode, DropReason, LanOutcome, MAX_QUEUE, NetworkOutcome, Transmit,
};
use crate::ipv4::{FixedHeader, HeaderError, Ipv4Header, PROTO_TCP};
use crate::nat::ftp::{Direction, FTP_PORT};
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
        let start = out.as_ptr() as usize;
        let (at, len) = match peer
            .tunnel
            .decapsulate(Some(from), datagram, &mut *out, now)
        {
            // Where the kind put the packet (at the start of `out`, for the
            // built-in ones); what follows it is tailroom for the FTP ALG.
            Ok(Decapsulated::Tunnel(p)) => ((p.as_ptr() as usize).wrapping_sub(start), p.len()),
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
        let Some(end) = at.checked_add(len).filter(|end| *end <= out.len()) else {
            // Not inside `out` (no kind does that): nothing to forward.
            self.counters.drops.add(DropReason::Malformed);
            return NetworkOutcome::Dropped(DropReason::Malformed);
        };
        if at != 0 {
            out.copy_within(at..end, 0);
        }
        match self.inbound(out, len, now) {
            Ok(n) => {
                self.counters.to_lan_packets += 1;
                self.counters.to_lan_bytes += n as u64;
                NetworkOutcome::Lan(&mut out[..n])
            }
            Err(r) => {
                self.counters.drops.add(r);
                tracing::trace!(reason = r.as_str(), "tunnel packet dropped");
                NetworkOutcome::Dropped(r)
            }
        }
    }

    /// Tunnel → LAN: the source is a technician's, consent check and
    /// (packet mode) the FTP ALG and the NAT rewrite, on the packet of
    /// `len` bytes at the start of `buf` (the rest is tailroom). Returns
    /// the packet's new length.
    pub(super) fn inbound(
        &mut self,
        buf: &mut [u8],
        len: usize,
        now: Instant,
    ) -> Result<usize, DropReason> {
        let packet = buf.get(..len).ok_or(DropReason::Malformed)?;
        let h = fixed_header(packet)?;
        let (src, dst) = (h.src(), h.dst());
        if !self.center_prefixes.iter().any(|p| p.contains(src)) {
            return Err(DropReason::NotTechnician);
        }
        let real = match self.mappings.get(&dst) {
            None => return Err(DropReason::NotMapped),
            Some(m) if now >= m.expires_at => return Err(DropReason::Expired),
            Some(m) => m.real,
        };
        match self.mode {
            DataMode::Packet { .. } => {
                // Before the NAT: the technician's address and port are
                // still in the header (masquerade replaces them), as they
                // are in the replies after the reverse rewrite.
                let n = if ftp_control(packet, Direction::ToPc) {
                    self.ftp.process(buf, len, Direction::ToPc, real, dst, now)
                } else {
                    len
                };
                self.nat.translate_inbound(&mut buf[..n], now)?;
                Ok(n)
            }
            DataMode::Netstack => {
                ipv4_check(packet)?;
                Ok(len)
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
        let moved = match self.outbound(packet, now) {
            Ok(moved) => moved,
            Err(r) => {
                self.counters.drops.add(r);
                tracing::trace!(reason = r.as_str(), "LAN packet dropped");
                return LanOutcome::Dropped(r);
            }
        };
        let Some(peer) = self.peer.as_mut() else {
            self.counters.drops.add(DropReason::TunnelDown);
            return LanOutcome::Dropped(DropReason::TunnelDown);
        };
        // An FTP control segment the ALG rewrote lives in `alg_buf` now.
        let packet: &[u8] = match moved {
            Some(n) => &self.alg_buf[..n],
            None => packet,
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

    /// LAN → tunnel: (packet mode) the reverse NAT rewrite, then the FTP
    /// ALG; (netstack) the source must be a mapped NAT address. An FTP
    /// control segment goes through the ALG in `alg_buf` (its length may
    /// change): `Some(len)` then, and the packet to send is there.
    pub(super) fn outbound(
        &mut self,
        packet: &mut [u8],
        now: Instant,
    ) -> Result<Option<usize>, DropReason> {
        match self.mode {
            DataMode::Packet { .. } => {
                self.nat.translate_outbound(packet, now)?;
                if !ftp_control(packet, Direction::FromPc) {
                    return Ok(None);
                }
                // After the NAT: the source is the NAT address now, and with
                // masquerade the destination the technician again.
                let nat = fixed_header(packet)?.src();
                let Some(real) = self.mappings.get(&nat).map(|m| m.real) else {
                    return Ok(None);
                };
                let len = packet.len();
                self.alg_buf.clear();
                self.alg_buf.extend_from_slice(packet);
                self.alg_buf.resize(len + ALG_TAILROOM, 0);
                let n = self
                    .ftp
                    .process(&mut self.alg_buf, len, Direction::FromPc, real, nat, now);
                Ok(Some(n))
            }
            DataMode::Netstack => {
                let src = fixed_header(packet)?.src();
                match self.mappings.get(&src) {
                    Some(m) if now < m.expires_at => Ok(None),
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

/// Room a rewritten FTP control segment may grow by: each address line
/// grows by at most 8 bytes ("1,1,1,1" → "255,255,255,255"), and a segment
/// of a full MTU holds fewer than 128 such lines.
const ALG_TAILROOM: usize = 1024;

/// Whether `p` is (the first fragment of) a TCP segment of an FTP control
/// connection going `dir`: to the PC's port 21, or from it. A quick look at
/// the headers; the ALG checks everything else.
fn ftp_control(p: &[u8], dir: Direction) -> bool {
    let Some(&vihl) = p.first() else {
        return false;
    };
    let ihl = usize::from(vihl & 0x0f) * 4;
    if p.len() < ihl + 4 || p.get(9) != Some(&PROTO_TCP) || (p[6] & 0x1f) | p[7] != 0 {
        return false;
    }
    let at = match dir {
        Direction::FromPc => ihl,
        Direction::ToPc => ihl + 2,
    };
    u16::from_be_bytes([p[at], p[at + 1]]) == FTP_PORT
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
