//! The gateway's packet path: datagrams from the socket to the TUN device
//! and back, through each peer's tunnel, its timers, and the output queues.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::icmp;
use super::peers::{ANY_SOURCE, Peer, Route};
use super::{
    DropReason, GatewayEvent, GatewayState, MAX_PACKET, MAX_QUEUE, NetworkOutcome, Transmit,
    TunOutcome,
};
use crate::ipv4::{FixedHeader, HeaderError, Ipv4Header};
use crate::tunnel::{Decapsulated, Encapsulated, Incoming, Kinds, Responder, Tunnel, TunnelEvent};

impl<K: Kinds> GatewayState<K> {
    pub(super) fn drop_packet(&mut self, reason: DropReason, slot: Option<u32>) {
        self.counters.drops.add(reason);
        if let Some(Some(p)) = slot.and_then(|s| self.slots.get_mut(s as usize)) {
            p.drops.add(reason);
        }
    }

    /// Processes a datagram that arrived on the gateway's socket from `from`,
    /// writing a decrypted packet for the TUN device into `out` (which must
    /// hold [`Kinds::buffer_len`]`(datagram.len())` bytes). Handshake replies are
    /// queued for [`Self::poll_transmit`].
    pub fn handle_network_input_into<'b>(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        out: &'b mut [u8],
        now: Instant,
    ) -> NetworkOutcome<'b> {
        self.network_input_into(from, datagram, out, now, false)
    }

    /// [`Self::handle_network_input_into`] for a datagram that another worker
    /// of this gateway received and handed over ([`NetworkOutcome::Handoff`];
    /// the states come from [`GatewayState::shards`]). That worker admitted
    /// it: a handshake is not counted or checked against the limits again.
    pub fn handle_handed_over_input_into<'b>(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        out: &'b mut [u8],
        now: Instant,
    ) -> NetworkOutcome<'b> {
        self.network_input_into(from, datagram, out, now, true)
    }

    fn network_input_into<'b>(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        out: &'b mut [u8],
        now: Instant,
        handed_over: bool,
    ) -> NetworkOutcome<'b> {
        let slot = match self.route_datagram(from, datagram, now, handed_over) {
            Ok(slot) => slot,
            Err(NetworkOutcome::Dropped(r)) => {
                self.drop_packet(r, None);
                tracing::trace!(%from, reason = r.as_str(), "datagram dropped");
                return NetworkOutcome::Dropped(r);
            }
            Err(NetworkOutcome::Handoff(s)) => return NetworkOutcome::Handoff(s),
            Err(NetworkOutcome::Consumed) | Err(NetworkOutcome::Tunnel(_)) => {
                return NetworkOutcome::Consumed;
            }
        };
        let Some(Some(peer)) = self.slots.get_mut(slot as usize) else {
            return NetworkOutcome::Dropped(DropReason::UnknownIndex);
        };
        let authenticated_kind = K::Responder::proves_sender(datagram);
        let result = peer.tunnel.decapsulate(Some(from), datagram, out, now);
        if self.swapped.is_some() {
            self.settle_swap(result.is_ok());
        }
        let Some(Some(peer)) = self.slots.get_mut(slot as usize) else {
            return NetworkOutcome::Dropped(DropReason::UnknownIndex);
        };
        match result {
            Ok(Decapsulated::Tunnel(p)) => {
                roam(peer, from, &mut self.events);
                let site = peer.site_id;
                let h = match Ipv4Header::new_checked(p) {
                    Ok(h) => h,
                    Err(e) => {
                        let r = match e {
                            HeaderError::NotIpv4(6) => DropReason::NotIpv4,
                            _ => DropReason::Malformed,
                        };
                        self.drop_packet(r, Some(slot));
                        return NetworkOutcome::Dropped(r);
                    }
                };
                let (src, dst) = (h.src(), h.dst());
                if self.by_nat.get(&src).is_none_or(|r| r.site != site) {
                    tracing::trace!(site.id = %site, %src, "spoofed inner source");
                    self.drop_packet(DropReason::SpoofedSource, Some(slot));
                    return NetworkOutcome::Dropped(DropReason::SpoofedSource);
                }
                if self.pool.is_some_and(|pool| pool.contains(dst))
                    || self.by_nat.contains_key(&dst)
                {
                    tracing::trace!(site.id = %site, %dst, "cross-site packet");
                    self.drop_packet(DropReason::CrossSite, Some(slot));
                    return NetworkOutcome::Dropped(DropReason::CrossSite);
                }
                if let Err(r) = self.flows.site_to_center(&h, site, now) {
                    tracing::trace!(site.id = %site, %src, %dst, reason = r.as_str(), "not part of a flow");
                    self.drop_packet(r, Some(slot));
                    return NetworkOutcome::Dropped(r);
                }
                NetworkOutcome::Tunnel(p)
            }
            Ok(Decapsulated::Network(reply)) => {
                if authenticated_kind {
                    roam(peer, from, &mut self.events);
                }
                let reply: &[u8] = reply;
                if self.transmits.len() < MAX_QUEUE {
                    let mut buf = self.free_bufs.pop().unwrap_or_default();
                    buf.clear();
                    buf.extend_from_slice(reply);
                    self.transmits.push_back(Transmit {
                        dst: from,
                        kind: Some(peer.kind),
                        payload: buf,
                    });
                } else {
                    self.counters.drops.add(DropReason::QueueFull);
                }
                self.after_peer_activity(slot);
                NetworkOutcome::Consumed
            }
            Ok(Decapsulated::Nothing) => {
                if authenticated_kind {
                    roam(peer, from, &mut self.events);
                }
                self.after_peer_activity(slot);
                NetworkOutcome::Consumed
            }
            Err(e) => {
                let r = DropReason::from(e);
                tracing::trace!(%from, reason = r.as_str(), "datagram dropped by tunnel");
                self.drop_packet(r, Some(slot));
                NetworkOutcome::Dropped(r)
            }
        }
    }

    /// Finds the own slot of the peer a datagram is for. Cookie replies under
    /// load are queued here (`Err(Consumed)`).
    fn route_datagram(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        handed_over: bool,
    ) -> Result<u32, NetworkOutcome<'static>> {
        if let Some(index) = K::Responder::fast_index(datagram) {
            return self.own_slot(index);
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let classified = if handed_over {
            self.responder.classify_admitted(datagram, &mut scratch)
        } else {
            self.responder
                .classify(Some(from), datagram, &mut scratch, now)
        };
        let routed = match classified {
            Ok(Incoming::CookieReply(cookie)) => {
                if self.transmits.len() < MAX_QUEUE {
                    let mut buf = self.free_bufs.pop().unwrap_or_default();
                    buf.clear();
                    buf.extend_from_slice(cookie);
                    self.transmits.push_back(Transmit {
                        dst: from,
                        kind: None,
                        payload: buf,
                    });
                    self.counters.cookie_replies_sent += 1;
                    Err(NetworkOutcome::Consumed)
                } else {
                    Err(NetworkOutcome::Dropped(DropReason::QueueFull))
                }
            }
            Ok(Incoming::Initiation { peer_public_key }) => match self.by_key.get(&peer_public_key)
            {
                None => {
                    tracing::debug!(%from, key = %peer_public_key, "handshake from an unknown key");
                    Err(NetworkOutcome::Dropped(DropReason::UnknownPeer))
                }
                Some(r) if r.owner != self.shard.index => Err(NetworkOutcome::Handoff(r.owner)),
                Some(r) => {
                    let slot = r.slot;
                    self.adopt_next_key(slot, peer_public_key, datagram, now);
                    Ok(slot)
                }
            },
            Ok(Incoming::Reply(reply)) => {
                if self.transmits.len() < MAX_QUEUE {
                    let mut buf = self.free_bufs.pop().unwrap_or_default();
                    buf.clear();
                    buf.extend_from_slice(reply);
                    self.transmits.push_back(Transmit {
                        dst: from,
                        kind: None,
                        payload: buf,
                    });
                    Err(NetworkOutcome::Consumed)
                } else {
                    Err(NetworkOutcome::Dropped(DropReason::QueueFull))
                }
            }
            Ok(Incoming::Authenticated { identity }) => match self.by_identity.get(identity) {
                None => {
                    // Only reachable when the peer went between IKE_AUTH and here.
                    tracing::debug!(%from, identity, "authenticated identity of no peer");
                    Err(NetworkOutcome::Dropped(DropReason::UnknownPeer))
                }
                Some(r) if r.owner != self.shard.index => Err(NetworkOutcome::Handoff(r.owner)),
                Some(r) => Ok(r.slot),
            },
            Ok(Incoming::Consumed) => Err(NetworkOutcome::Consumed),
            Ok(Incoming::ForIndex(index)) => self.own_slot(index),
            Err(e) => Err(NetworkOutcome::Dropped(e.into())),
        };
        self.scratch = scratch;
        routed
    }

    /// After a handshake message: queue packets the tunnel held back and report events.
    fn after_peer_activity(&mut self, slot: u32) {
        let Some(Some(peer)) = self.slots.get_mut(slot as usize) else {
            return;
        };
        while let Some(d) = peer.tunnel.poll_network(&mut self.scratch) {
            let Some(dst) = peer.endpoint else { break };
            if self.transmits.len() >= MAX_QUEUE {
                self.counters.drops.add(DropReason::QueueFull);
                continue;
            }
            let mut buf = self.free_bufs.pop().unwrap_or_default();
            buf.clear();
            buf.extend_from_slice(d);
            self.transmits.push_back(Transmit {
                dst,
                kind: Some(peer.kind),
                payload: buf,
            });
        }
        while let Some(e) = peer.tunnel.poll_event() {
            match e {
                TunnelEvent::HandshakeCompleted => {
                    if let Some(endpoint) = peer.endpoint {
                        tracing::info!(site.id = %peer.site_id, %endpoint, "handshake completed");
                        self.events.push_back(GatewayEvent::HandshakeCompleted {
                            site_id: peer.site_id,
                            endpoint,
                        });
                    }
                }
                TunnelEvent::Expired => {
                    tracing::debug!(site.id = %peer.site_id, "tunnel idle, session expired");
                }
            }
        }
    }

    /// Processes an IP packet read from the TUN device, writing the datagram
    /// to send into `out` (which must hold [`Kinds::buffer_len`]`(packet.len())`
    /// bytes). An ICMP error for an unheld destination is queued for
    /// [`Self::poll_tun_output`].
    pub fn handle_tun_input_into<'b>(
        &mut self,
        packet: &[u8],
        out: &'b mut [u8],
        now: Instant,
    ) -> TunOutcome<'b> {
        let Ok(dst) = FixedHeader::new(packet).map(|h| h.dst()) else {
            self.drop_packet(DropReason::NotIpv4, None);
            return TunOutcome::Dropped(DropReason::NotIpv4);
        };
        let Some(route) = self.by_nat.get(&dst).copied() else {
            self.drop_packet(DropReason::NoPeer, None);
            self.unreachable(packet, now);
            return TunOutcome::Dropped(DropReason::NoPeer);
        };
        if route.owner != self.shard.index {
            return TunOutcome::Handoff(route.owner);
        }
        let Ok(h) = Ipv4Header::new_checked(packet) else {
            self.drop_packet(DropReason::Malformed, Some(route.slot));
            return TunOutcome::Dropped(DropReason::Malformed);
        };
        let src = h.src();
        if self.pool.is_some_and(|pool| pool.contains(src)) || self.by_nat.contains_key(&src) {
            // Only reachable if the kernel hairpinned a packet between two
            // sites; the network-side check drops those already.
            self.drop_packet(DropReason::CrossSite, Some(route.slot));
            return TunOutcome::Dropped(DropReason::CrossSite);
        }
        if !self.technicians.iter().any(|p| p.contains(src)) {
            tracing::trace!(%src, %dst, "source outside the technician prefixes");
            self.drop_packet(DropReason::NotTechnician, Some(route.slot));
            return TunOutcome::Dropped(DropReason::NotTechnician);
        }
        if !self.source_allowed(route, src) {
            tracing::trace!(%src, %dst, "source not allowed to reach this NAT address");
            self.drop_packet(DropReason::SourceNotAllowed, Some(route.slot));
            return TunOutcome::Dropped(DropReason::SourceNotAllowed);
        }
        if let Err(r) = self.flows.center_to_site(&h, route.site, now) {
            self.drop_packet(r, Some(route.slot));
            return TunOutcome::Dropped(r);
        }
        let Some(Some(peer)) = self.slots.get_mut(route.slot as usize) else {
            self.drop_packet(DropReason::NoPeer, None);
            return TunOutcome::Dropped(DropReason::NoPeer);
        };
        match peer.tunnel.encapsulate(packet, out, now) {
            Ok(Encapsulated::Network(datagram)) => match peer.endpoint {
                Some(dst) => TunOutcome::Send {
                    dst,
                    kind: peer.kind,
                    datagram,
                },
                // Without a session boringtun queued the packet and wants to
                // initiate; with no endpoint to initiate to, the packet waits
                // (bounded) until the peer connects.
                None if !peer.tunnel.has_session() => TunOutcome::Queued,
                None => {
                    peer.drops.add(DropReason::NoEndpoint);
                    self.counters.drops.add(DropReason::NoEndpoint);
                    TunOutcome::Dropped(DropReason::NoEndpoint)
                }
            },
            Ok(Encapsulated::Queued) => TunOutcome::Queued,
            Err(e) => {
                let r = DropReason::from(e);
                self.drop_packet(r, Some(route.slot));
                TunOutcome::Dropped(r)
            }
        }
    }

    /// Whether `src` may reach the NAT address of `route`: one map lookup
    /// was done already; this is a branch for an unrestricted address, and
    /// a scan of a few prefixes otherwise.
    #[inline]
    fn source_allowed(&self, route: Route, src: Ipv4Addr) -> bool {
        if route.sources == ANY_SOURCE {
            return true;
        }
        self.source_sets
            .get(route.sources as usize)
            .is_some_and(|set| set.iter().any(|p| p.contains(src)))
    }

    fn unreachable(&mut self, packet: &[u8], now: Instant) {
        let Ok(h) = Ipv4Header::new_checked(packet) else {
            return;
        };
        if !icmp::may_send_error_about(&h) {
            return;
        }
        if now >= self.icmp_refill_at {
            self.icmp_tokens = self.icmp_rate;
            self.icmp_refill_at = now + Duration::from_secs(1);
        }
        if self.icmp_tokens == 0 || self.tun_out.len() >= MAX_QUEUE {
            return;
        }
        self.icmp_tokens -= 1;
        let mut buf = self.free_bufs.pop().unwrap_or_default();
        icmp::emit_unreachable(
            packet,
            &h,
            icmp::ICMP_HOST_UNREACHABLE,
            self.icmp_source.unwrap_or(h.dst()),
            &mut buf,
        );
        self.counters.icmp_unreachable_sent += 1;
        self.tun_out.push_back(buf);
    }

    /// Processes a datagram from the socket; a decrypted packet is queued for
    /// [`Self::poll_tun_output`], replies for [`Self::poll_transmit`].
    ///
    /// # Errors
    /// The [`DropReason`] when it was dropped (already counted).
    pub fn handle_network_input(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
    ) -> Result<(), DropReason> {
        let mut buf = self.free_bufs.pop().unwrap_or_default();
        buf.resize(K::buffer_len(MAX_PACKET), 0);
        let result = match self.handle_network_input_into(from, datagram, &mut buf, now) {
            NetworkOutcome::Tunnel(p) => Ok(Some((p.len(), ()))),
            NetworkOutcome::Consumed => Ok(None),
            NetworkOutcome::Dropped(r) => Err(r),
            NetworkOutcome::Handoff(_) => {
                self.counters.drops.add(DropReason::OtherShard);
                Err(DropReason::OtherShard)
            }
        };
        self.enqueue_or_recycle(
            buf,
            result,
            |s| s.tun_out.len() < MAX_QUEUE,
            |s, buf, ()| s.tun_out.push_back(buf),
        )
    }

    /// Processes a packet from the TUN device; the datagram is queued for
    /// [`Self::poll_transmit`], an ICMP error for [`Self::poll_tun_output`].
    ///
    /// # Errors
    /// The [`DropReason`] when it was dropped (already counted).
    pub fn handle_tun_input(&mut self, packet: &[u8], now: Instant) -> Result<(), DropReason> {
        let mut buf = self.free_bufs.pop().unwrap_or_default();
        buf.resize(K::buffer_len(MAX_PACKET.max(packet.len())), 0);
        let result = match self.handle_tun_input_into(packet, &mut buf, now) {
            TunOutcome::Send {
                dst,
                kind,
                datagram,
            } => Ok(Some((datagram.len(), (dst, kind)))),
            TunOutcome::Queued => Ok(None),
            TunOutcome::Dropped(r) => Err(r),
            TunOutcome::Handoff(_) => {
                self.counters.drops.add(DropReason::OtherShard);
                Err(DropReason::OtherShard)
            }
        };
        self.enqueue_or_recycle(
            buf,
            result,
            |s| s.transmits.len() < MAX_QUEUE,
            |s, payload, (dst, kind)| {
                s.transmits.push_back(Transmit {
                    dst,
                    kind: Some(kind),
                    payload,
                });
            },
        )
    }

    /// The end of `handle_*_input`: an output of `len` bytes in `buf` goes
    /// to its queue through `push` while the queue has `room` (else it is
    /// dropped and counted); an unused `buf` goes back to the pool.
    fn enqueue_or_recycle<X>(
        &mut self,
        mut buf: Vec<u8>,
        result: Result<Option<(usize, X)>, DropReason>,
        room: impl FnOnce(&Self) -> bool,
        push: impl FnOnce(&mut Self, Vec<u8>, X),
    ) -> Result<(), DropReason> {
        match result {
            Ok(Some((len, what))) if room(self) => {
                buf.truncate(len);
                push(self, buf, what);
                Ok(())
            }
            Ok(Some(_)) => {
                self.counters.drops.add(DropReason::QueueFull);
                self.free_bufs.push(buf);
                Err(DropReason::QueueFull)
            }
            other => {
                self.free_bufs.push(buf);
                other.map(|_| ())
            }
        }
    }

    /// Runs the peers' tunnel timers when due ([`Self::poll_timeout`]).
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + K::TIMER_TICK;
        self.flows.handle_timeout(now);
        let slots: Vec<u32> = self.by_site.values().copied().collect();
        for slot in slots {
            let Some(Some(peer)) = self.slots.get_mut(slot as usize) else {
                continue;
            };
            match peer.tunnel.handle_timeout(&mut self.scratch, now) {
                Ok(Some(d)) => {
                    if let Some(dst) = peer.endpoint
                        && self.transmits.len() < MAX_QUEUE
                    {
                        let mut buf = self.free_bufs.pop().unwrap_or_default();
                        buf.clear();
                        buf.extend_from_slice(d);
                        self.transmits.push_back(Transmit {
                            dst,
                            kind: Some(peer.kind),
                            payload: buf,
                        });
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    let r = DropReason::from(e);
                    self.drop_packet(r, Some(slot));
                }
            }
            self.after_peer_activity(slot);
        }
    }

    /// When [`Self::handle_timeout`] wants to run; `None` without peers.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.by_site.is_empty()).then_some(self.next_tick)
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next IP packet to write to the TUN device.
    pub fn poll_tun_output(&mut self) -> Option<Vec<u8>> {
        self.tun_out.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<GatewayEvent> {
        self.events.pop_front()
    }

    /// Returns a buffer from [`Transmit`] or [`Self::poll_tun_output`] for reuse.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if self.free_bufs.len() < 64 {
            self.free_bufs.push(buf);
        }
    }
}

fn roam<T>(peer: &mut Peer<T>, from: SocketAddr, events: &mut VecDeque<GatewayEvent>) {
    match peer.endpoint {
        Some(old) if old == from => {}
        Some(old) => {
            tracing::info!(site.id = %peer.site_id, %old, new = %from, "peer endpoint changed");
            events.push_back(GatewayEvent::EndpointChanged {
                site_id: peer.site_id,
                from: old,
                to: from,
            });
            peer.endpoint = Some(from);
        }
        None => peer.endpoint = Some(from),
    }
}
