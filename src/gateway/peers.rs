//! The gateway's peer table: reconciling to a desired state, the slots that
//! hold the own shard's peers and their tunnels, and the routing tables
//! (every peer's key and NAT addresses, of all shards).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use super::{
    DropCounters, DropReason, GatewayEvent, GatewayState, NetworkOutcome, Shard, validate_desired,
};
use crate::messages::{
    AppliedState, GatewayDesiredState, GatewayPeer, IpsecParams, PublicKey, SiteId,
};
use crate::tunnel::{Kinds, PrivateKey, Responder, TunnelKind};

/// Where a key or address leads: its site, the owning shard and, when the
/// owner is this shard, the peer's slot; for a NAT address, which sources
/// may reach it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Route {
    pub(super) site: SiteId,
    pub(super) owner: u16,
    pub(super) slot: u32,
    /// Index into [`GatewayState`]'s source sets, or [`ANY_SOURCE`]: every
    /// technician prefix (no restriction).
    pub(super) sources: u32,
}

/// [`Route::sources`] of an unrestricted NAT address (and of keys and identities).
pub(super) const ANY_SOURCE: u32 = u32::MAX;

/// One own peer: its identity, its tunnel and where it is.
pub(super) struct Peer<T> {
    pub(super) site_id: SiteId,
    pub(super) public_key: PublicKey,
    /// The site's next key while it rotates its key (planned rotation): an
    /// initiation from it moves this peer's tunnel to it.
    pub(super) next_key: Option<PublicKey>,
    /// The gateway's public key its tunnel holds: the current one, or during
    /// a rotation of the gateway's key the key its agent last dialed.
    pub(super) gateway_key: PublicKey,
    pub(super) kind: TunnelKind,
    /// An IPsec peer's parameters (a change replaces its tunnel).
    pub(super) ipsec: Option<IpsecParams>,
    pub(super) index: u32,
    pub(super) tunnel: T,
    pub(super) endpoint: Option<SocketAddr>,
    pub(super) nat: BTreeSet<Ipv4Addr>,
    pub(super) drops: DropCounters,
}

/// A peer's tunnel replaced for a handshake initiation to another key
/// ([`GatewayState::adopt_next_key`]), kept until that initiation proved
/// itself: anyone who knows a site's public key and the gateway's can make
/// an initiation that names them (only its static key is checked before
/// the tunnel sees it), and must not end the site's session by it.
pub(super) struct Swapped<T> {
    slot: u32,
    tunnel: T,
    public_key: PublicKey,
    next_key: Option<PublicKey>,
    gateway_key: PublicKey,
}

/// A tunnel index (24 bits, [`Kinds::MAX_INDEX`]) is a 4-bit slot generation
/// above `slot * shards + shard` (20 bits: about a million tunnels).
const INDEX_GENERATION_SHIFT: u32 = 20;
const INDEX_BASE_MASK: u32 = (1 << INDEX_GENERATION_SHIFT) - 1;

/// One worker's next key, for the other workers of the same gateway to
/// take ([`GatewayState::next_key_share`], [`GatewayState::share_next_key`]).
pub struct NextKeyShare<K: Kinds> {
    responder: K::Responder,
    public_key: Option<PublicKey>,
}

impl<K: Kinds> Clone for NextKeyShare<K> {
    fn clone(&self) -> Self {
        Self {
            responder: self.responder.share(),
            public_key: self.public_key,
        }
    }
}

impl<K: Kinds> std::fmt::Debug for NextKeyShare<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NextKeyShare")
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

impl<K: Kinds> GatewayState<K> {
    /// Reconciles to `desired`. Returns what was applied (errors name refused
    /// peers and addresses), or `None` for a document older than the one
    /// running (ignored).
    pub fn handle_control(
        &mut self,
        desired: &GatewayDesiredState,
        now: Instant,
    ) -> Option<AppliedState> {
        if self.applied_version.is_some_and(|v| desired.version < v) {
            tracing::debug!(version = desired.version, "ignoring an older desired state");
            return None;
        }
        let valid = validate_desired(
            desired,
            &self.public_key,
            self.pool,
            self.max_tunnels,
            K::KINDS,
        );
        for e in &valid.errors {
            tracing::warn!(version = valid.version, error = %e, "desired state refused in part");
        }
        let me = self.shard.index;
        let count = self.shard.count;
        let old_addresses: BTreeSet<Ipv4Addr> = self
            .by_nat
            .iter()
            .filter(|(_, r)| r.owner == me)
            .map(|(a, _)| *a)
            .collect();

        // Peers this shard no longer owns.
        let wanted: BTreeMap<SiteId, &GatewayPeer> = valid
            .peers
            .iter()
            .filter(|p| Shard::of(count, p.site_id) == me)
            .map(|p| (p.site_id, p))
            .collect();
        let gone: Vec<SiteId> = self
            .by_site
            .keys()
            .filter(|s| !wanted.contains_key(s))
            .copied()
            .collect();
        for site in gone {
            self.remove_peer(site);
            tracing::info!(site.id = %site, "peer removed");
            self.events
                .push_back(GatewayEvent::PeerRemoved { site_id: site });
        }
        // Added or changed peers.
        for (site, p) in &wanted {
            match self.by_site.get(site).copied() {
                Some(slot) => {
                    let next = valid.next_keys.get(site).copied();
                    // A peer that moved to its next key already keeps its
                    // tunnel while the document still lists the old key
                    // (the server drops it once the agent confirms).
                    let same_key = self.slots[slot as usize].as_ref().is_some_and(|peer| {
                        (peer.public_key == p.public_key || Some(peer.public_key) == next)
                            && peer.kind == p.tunnel
                            && peer.ipsec == p.ipsec
                    });
                    if same_key && let Some(peer) = self.slots[slot as usize].as_mut() {
                        peer.next_key = next.filter(|n| *n != peer.public_key);
                    }
                    if !same_key {
                        self.remove_peer(*site);
                        if self.add_peer(p, valid.next_keys.get(site).copied(), now) {
                            tracing::info!(site.id = %site, key = %p.public_key, "peer re-keyed");
                            self.events
                                .push_back(GatewayEvent::PeerRekeyed { site_id: *site });
                        }
                    } else if let Some(peer) = self.slots[slot as usize].as_mut() {
                        peer.nat = p.nat_addresses.iter().copied().collect();
                    }
                }
                None => {
                    if self.add_peer(p, valid.next_keys.get(site).copied(), now) {
                        tracing::info!(site.id = %site, key = %p.public_key, "peer added");
                        self.events
                            .push_back(GatewayEvent::PeerAdded { site_id: *site });
                    }
                }
            }
        }
        // Routing tables for every peer of every shard.
        self.by_key.clear();
        self.by_identity.clear();
        self.by_nat.clear();
        self.source_sets.clear();
        let restricted: BTreeMap<Ipv4Addr, &[crate::ipv4::Prefix]> = valid
            .allowed_sources
            .iter()
            .map(|a| (a.nat_address, a.sources.as_slice()))
            .collect();
        let mut set_index: BTreeMap<&[crate::ipv4::Prefix], u32> = BTreeMap::new();
        for p in &valid.peers {
            let owner = Shard::of(count, p.site_id);
            let slot = if owner == me {
                self.by_site.get(&p.site_id).copied().unwrap_or(u32::MAX)
            } else {
                u32::MAX
            };
            let route = Route {
                site: p.site_id,
                owner,
                slot,
                sources: ANY_SOURCE,
            };
            self.by_key.insert(p.public_key, route);
            if let Some(next) = valid.next_keys.get(&p.site_id) {
                self.by_key.insert(*next, route);
            }
            if let Some(ipsec) = p.ipsec.as_ref().filter(|_| p.tunnel == TunnelKind::Ipsec) {
                self.by_identity.insert(ipsec.remote_id.clone(), route);
            }
            for a in &p.nat_addresses {
                let sources = match restricted.get(a) {
                    // Addresses of one site (or one starter) share one set.
                    Some(set) => *set_index.entry(set).or_insert_with(|| {
                        self.source_sets.push(set.to_vec().into_boxed_slice());
                        (self.source_sets.len() - 1) as u32
                    }),
                    None => ANY_SOURCE,
                };
                self.by_nat.insert(*a, Route { sources, ..route });
            }
        }
        // Flows go with the NAT address they lead to: closed, reassigned or
        // moved to another shard, it no longer carries them.
        let by_nat = &self.by_nat;
        self.flows.retain_open(|nat, site| {
            by_nat
                .get(&nat)
                .is_some_and(|r| r.site == site && r.owner == me)
        });
        let new_addresses: BTreeSet<Ipv4Addr> = self
            .by_nat
            .iter()
            .filter(|(_, r)| r.owner == me)
            .map(|(a, _)| *a)
            .collect();
        for a in old_addresses.difference(&new_addresses) {
            self.events
                .push_back(GatewayEvent::AddressRemoved { address: *a });
        }
        for a in new_addresses.difference(&old_addresses) {
            self.events
                .push_back(GatewayEvent::AddressAdded { address: *a });
        }
        self.applied_version = Some(valid.version);
        tracing::info!(
            version = valid.version,
            peers = self.by_site.len(),
            errors = valid.errors.len(),
            "desired state applied"
        );
        Some(AppliedState {
            version: valid.version,
            errors: valid.errors,
        })
    }

    fn add_peer(&mut self, p: &GatewayPeer, next_key: Option<PublicKey>, now: Instant) -> bool {
        let count = u32::from(self.shard.count);
        let slot = match self.free_slots.pop_front() {
            Some(s) => s,
            None => {
                let s = self.slots.len() as u32;
                self.slots.push(None);
                self.generations.push(0);
                s
            }
        };
        let base = slot * count + u32::from(self.shard.index);
        if base > INDEX_BASE_MASK {
            // 1M tunnels: beyond any `max_tunnels`; refuse rather than wrap.
            self.free_slots.push_back(slot);
            return false;
        }
        let generation = &mut self.generations[slot as usize];
        // 1 to 15, never 0: slot 0 of shard 0 would otherwise get index 0
        // on every 16th reuse, and an ESP SPI with index 0 under a high byte
        // of 1–4 looks like a WireGuard message to the classifier
        // (`tunnel::ipsec::looks_like_wireguard`).
        *generation = *generation % 15 + 1;
        let index = (u32::from(*generation) << INDEX_GENERATION_SHIFT) | base;
        let Some(tunnel) = self.responder.tunnel(p, index, now) else {
            // A kind outside `K::KINDS` or unusable IPsec parameters:
            // `validate_desired` refused them already.
            self.free_slots.push_back(slot);
            return false;
        };
        self.slots[slot as usize] = Some(Peer {
            site_id: p.site_id,
            public_key: p.public_key,
            next_key,
            gateway_key: self.public_key,
            kind: p.tunnel,
            ipsec: p.ipsec.clone(),
            index,
            tunnel,
            endpoint: None,
            nat: p.nat_addresses.iter().copied().collect(),
            drops: DropCounters::default(),
        });
        self.by_site.insert(p.site_id, slot);
        true
    }

    /// A handshake initiation from `key` is for the peer in `slot`: when that
    /// is the peer's next key, its tunnel is replaced by one for that key
    /// (same slot and index) before the initiation reaches it. The agent
    /// sends it only after it stored the new key, so the old session and
    /// key are not needed any more. Likewise when the initiation addresses
    /// the gateway's other static key than the peer's tunnel holds (a
    /// rotation of the gateway's key): the agent dials the key its document
    /// names.
    pub(super) fn adopt_next_key(
        &mut self,
        slot: u32,
        key: PublicKey,
        datagram: &[u8],
        now: Instant,
    ) {
        let Some(Some(peer)) = self.slots.get(slot as usize) else {
            return;
        };
        let site_rekeys = peer.next_key == Some(key);
        let addressed = match self.next_public_key {
            Some(next) if self.responder.addresses_next_key(datagram) => next,
            _ => self.public_key,
        };
        if !site_rekeys && addressed == peer.gateway_key {
            return;
        }
        let spec = GatewayPeer {
            site_id: peer.site_id,
            public_key: key,
            nat_addresses: Vec::new(),
            tunnel: peer.kind,
            ipsec: None,
            tls_token_sha256: None,
        };
        let index = peer.index;
        let tunnel = if addressed != self.public_key {
            self.responder.next_key_tunnel(&spec, index, now)
        } else {
            self.responder.tunnel(&spec, index, now)
        };
        let Some(tunnel) = tunnel else {
            return;
        };
        if let Some(Some(peer)) = self.slots.get_mut(slot as usize) {
            let old = std::mem::replace(&mut peer.tunnel, tunnel);
            self.swapped = Some(Swapped {
                slot,
                tunnel: old,
                public_key: peer.public_key,
                next_key: peer.next_key,
                gateway_key: peer.gateway_key,
            });
            if site_rekeys {
                peer.public_key = key;
                peer.next_key = None;
            }
            peer.gateway_key = addressed;
        }
    }

    /// Settles a tunnel [`Self::adopt_next_key`] replaced, once the
    /// initiation went through it: `accepted`, the peer stays on the new
    /// key; otherwise (a forged or broken initiation) its old tunnel, with
    /// its session, is back.
    pub(super) fn settle_swap(&mut self, accepted: bool) {
        let Some(old) = self.swapped.take() else {
            return;
        };
        let Some(Some(peer)) = self.slots.get_mut(old.slot as usize) else {
            return;
        };
        if !accepted {
            peer.tunnel = old.tunnel;
            peer.public_key = old.public_key;
            peer.next_key = old.next_key;
            peer.gateway_key = old.gateway_key;
            return;
        }
        if peer.public_key != old.public_key {
            tracing::info!(site.id = %peer.site_id, key = %peer.public_key, "peer moved to its next key");
            self.events.push_back(GatewayEvent::PeerRekeyed {
                site_id: peer.site_id,
            });
        }
        if peer.gateway_key != old.gateway_key {
            tracing::info!(
                site.id = %peer.site_id,
                key = %peer.gateway_key,
                "peer moved to another key of the gateway"
            );
        }
    }

    /// Starts (`Some`) or abandons (`None`) a rotation of this gateway's
    /// static key at this worker (call it at every worker): initiations to
    /// `next` are answered beside those to the current key, each peer's
    /// tunnel holding the key its agent addressed.
    pub fn set_next_key(&mut self, next: Option<PrivateKey>) {
        let next_public_key = next
            .as_ref()
            .map(PrivateKey::public_key)
            .filter(|k| *k != self.public_key);
        if next_public_key == self.next_public_key {
            return;
        }
        tracing::info!(
            next = ?next_public_key,
            "rotation of the gateway's key: next key set"
        );
        self.next_public_key = next_public_key;
        self.responder.set_next_key(next);
        // A peer on an abandoned next key keeps its session (messages are
        // routed by index); its agent, whose document names another key
        // again, moves at its next initiation.
    }

    /// What the other workers of this gateway take
    /// ([`Self::share_next_key`]) after [`Self::set_next_key`] at this one.
    pub fn next_key_share(&self) -> NextKeyShare<K> {
        NextKeyShare {
            responder: self.responder.share(),
            public_key: self.next_public_key,
        }
    }

    /// Starts or abandons at this worker the rotation another worker of
    /// this gateway started ([`Self::next_key_share`]), with the same next
    /// key state: one cookie secret per key for the whole gateway, as
    /// [`GatewayState::shards`] gives the current key.
    pub fn share_next_key(&mut self, share: &NextKeyShare<K>) {
        let next = share.public_key.filter(|k| *k != self.public_key);
        if next != self.next_public_key {
            tracing::info!(next = ?next, "rotation of the gateway's key: next key set");
        }
        self.next_public_key = next;
        self.responder.adopt_next_key(&share.responder);
    }

    /// The next public key during a rotation of this gateway's key.
    pub fn next_public_key(&self) -> Option<PublicKey> {
        self.next_public_key
    }

    /// During a rotation of the gateway's key: this worker's peers that
    /// have handshaken with the next key, and all of them (WireGuard peers
    /// only; IPsec peers do not use the key).
    pub fn peers_on_next_key(&self) -> (usize, usize) {
        let wg = self
            .slots
            .iter()
            .flatten()
            .filter(|p| p.kind == TunnelKind::Wireguard);
        let next = self.next_public_key;
        wg.fold((0, 0), |(on, all), p| {
            (on + usize::from(Some(p.gateway_key) == next), all + 1)
        })
    }

    /// Ends a rotation of the gateway's key at this worker: the next key
    /// becomes the current one and the old one is no longer answered. A
    /// peer still on the old key gets a tunnel for the new one (its agent,
    /// told the new key, re-dials). `false` when there was no rotation.
    pub fn promote_next_key(&mut self, now: Instant) -> bool {
        let Some(next) = self.next_public_key.take() else {
            return false;
        };
        if !self.responder.promote_next_key() {
            return false;
        }
        tracing::info!(key = %next, "gateway key rotated: the next key is current");
        self.public_key = next;
        // The old key is dropped: sessions made with it end too.
        self.reset_gateway_key_tunnels(|p| p.gateway_key != next, now);
        true
    }

    /// Gives the WireGuard peers `select` picks a fresh tunnel with the
    /// current key (same index).
    fn reset_gateway_key_tunnels(
        &mut self,
        select: impl Fn(&Peer<K::Tunnel>) -> bool,
        now: Instant,
    ) {
        for slot in 0..self.slots.len() {
            let Some(Some(p)) = self.slots.get(slot) else {
                continue;
            };
            if p.kind != TunnelKind::Wireguard || !select(p) {
                continue;
            }
            let spec = GatewayPeer {
                site_id: p.site_id,
                public_key: p.public_key,
                nat_addresses: Vec::new(),
                tunnel: p.kind,
                ipsec: None,
                tls_token_sha256: None,
            };
            let Some(tunnel) = self.responder.tunnel(&spec, p.index, now) else {
                continue;
            };
            if let Some(Some(p)) = self.slots.get_mut(slot) {
                p.tunnel = tunnel;
                p.gateway_key = self.public_key;
            }
        }
    }

    fn remove_peer(&mut self, site: SiteId) {
        if let Some(slot) = self.by_site.remove(&site) {
            self.slots[slot as usize] = None;
            // FIFO reuse: a slot (and its tunnel index) comes back as late as possible.
            self.free_slots.push_back(slot);
        }
    }

    pub(super) fn own_slot(&self, index: u32) -> Result<u32, NetworkOutcome<'static>> {
        let count = u32::from(self.shard.count);
        let base = index & INDEX_BASE_MASK;
        let owner = (base % count) as u16;
        if owner != self.shard.index {
            return Err(NetworkOutcome::Handoff(owner));
        }
        let slot = base / count;
        match self.slots.get(slot as usize) {
            Some(Some(p)) if p.index == index => Ok(slot),
            _ => Err(NetworkOutcome::Dropped(DropReason::UnknownIndex)),
        }
    }
}
