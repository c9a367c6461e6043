//! The gateway's packet logic, sans-IO: many WireGuard peers (one per site)
//! behind one UDP socket, and pooled NAT addresses routed between the center
//! LAN (a TUN device, in the IO shell) and the right peer.
//!
//! Inputs are `handle_*(…, now)`, outputs are drained with `poll_*`
//! (STYLE.md §2). The IO shell (`gateway/`) owns the socket, the TUN device
//! and the clock.
//!
//! - **Network → TUN.** A datagram is routed to its peer without crypto when it
//!   is a data message (receiver index `>> 8` is the peer's tunnel index,
//!   [`crate::wg`]), or, for a handshake initiation, by the initiator's static
//!   key after the shared rate limiter's mac1 check (under load the sender gets
//!   a cookie reply instead). The peer's tunnel authenticates and decrypts it;
//!   the peer's endpoint follows its last authenticated datagram (roaming and
//!   NAT rebinding, WireGuard paper §2.1). A decrypted packet must be IPv4 with
//!   an inner source that is one of *that* peer's NAT addresses
//!   (anti-spoofing) and a destination outside the pool (one site never reaches
//!   another through the gateway); otherwise it is dropped and counted.
//! - **TUN → network.** The destination NAT address is looked up in a hash
//!   map (O(1)) and the packet is encrypted for its peer and sent to the peer's
//!   endpoint. A destination nobody holds is dropped and answered with ICMP
//!   destination unreachable, code 1 (host unreachable; RFC 792, RFC 1812
//!   §5.2.7.1), rate-limited (RFC 1812 §4.3.2.8).
//! - **Desired state.** [`GatewayState::handle_control`] reconciles to a
//!   [`GatewayDesiredState`]: peers are added, re-keyed, re-addressed and
//!   removed without touching the others' tunnels. Address events tell the
//!   shell which /32 routes and proxy-ARP entries to install.
//!
//! Two input flavours share one implementation: `handle_network_input` /
//! `handle_tun_input` queue their outputs internally (simple, for tests and
//! the control path), while `handle_network_input_into` /
//! `handle_tun_input_into` write the main output into a buffer of the
//! caller's (the data-plane fast path: no allocation, no copy).
//!
//! **Sharding.** A gateway may run several workers, each with its own
//! `GatewayState` that owns the peers of one [`Shard`] (by site id) but knows
//! every peer's addresses and key. Tunnel indices encode the shard, so any
//! worker can tell where a datagram or TUN packet belongs and hands it off
//! ([`NetworkOutcome::Handoff`], [`TunOutcome::Handoff`]).
//!
//! State iterates in site order (`BTreeMap`); hash maps serve only lookups.

mod ipv4;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

pub use self::ipv4::{Prefix, PrefixError};
use crate::messages::{AppliedState, GatewayDesiredState, GatewayPeer, PublicKey, SiteId};
use crate::wg::{
    self, Decapsulated, Encapsulated, Incoming, PrivateKey, Responder, Tunnel, TunnelConfig,
    TunnelEvent, TunnelStats,
};

/// The largest datagram or IP packet the gateway handles, and the size of its
/// internal buffers.
pub const MAX_PACKET: usize = 65535;
/// Internal output buffers hold any result for a [`MAX_PACKET`] input.
pub const BUF_LEN: usize = wg::buffer_len(MAX_PACKET);
/// Bound of each internal output queue; beyond it outputs are dropped and counted.
pub const MAX_QUEUE: usize = 4096;

/// Which peers a [`GatewayState`] owns: those whose `site_id % count == index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This worker, `0..count`.
    pub index: u16,
    /// Workers in total, at least 1.
    pub count: u16,
}

impl Shard {
    /// A gateway with a single worker.
    pub const SINGLE: Shard = Shard { index: 0, count: 1 };

    /// The shard that owns `site`.
    pub fn of(count: u16, site: SiteId) -> u16 {
        (site.0 % u64::from(count.max(1))) as u16
    }
}

/// Settings of a [`GatewayState`] (from the gateway's configuration file).
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The gateway's WireGuard private key.
    pub private_key: PrivateKey,
    /// The NAT pool; peers' addresses must lie inside, and traffic from a peer
    /// to any address inside is refused. `None` accepts any unicast address.
    pub pool: Option<Prefix>,
    /// The most peers (sites) this gateway takes.
    pub max_tunnels: u32,
    /// Handshake messages per second before cookies are demanded.
    pub handshake_limit: u64,
    /// Source of ICMP errors; `None` uses the unreachable address itself.
    pub icmp_source: Option<Ipv4Addr>,
    /// ICMP errors per second at most (RFC 1812 §4.3.2.8); also the burst.
    pub icmp_rate_per_s: u32,
    /// Which peers this state owns.
    pub shard: Shard,
}

impl GatewayConfig {
    /// Defaults for everything but the key: no pool restriction, 1000 tunnels,
    /// [`Responder::DEFAULT_HANDSHAKE_LIMIT`], 100 ICMP errors per second, one shard.
    pub fn new(private_key: PrivateKey) -> Self {
        Self {
            private_key,
            pool: None,
            max_tunnels: 1000,
            handshake_limit: Responder::DEFAULT_HANDSHAKE_LIMIT,
            icmp_source: None,
            icmp_rate_per_s: 100,
            shard: Shard::SINGLE,
        }
    }
}

crate::drops::drop_reasons! {
    /// Why a packet was dropped. Every drop is counted, per reason and, when
    /// a peer is known, per peer.
    enum DropReason;
    /// Not a WireGuard message, or an inner packet that is not well-formed IPv4.
    Malformed = "malformed",
    /// A handshake not addressed to this gateway's key (mac1).
    InvalidMac = "invalid_mac",
    /// Decryption or handshake authentication failed.
    AuthenticationFailed = "authentication_failed",
    /// A replayed message.
    Replay = "replay",
    /// A message for a session that no longer exists.
    NoSession = "no_session",
    /// Handshakes over the rate limit.
    UnderLoad = "under_load",
    /// A handshake from a key that is not a configured peer.
    UnknownPeer = "unknown_peer",
    /// A message for a tunnel index that does not exist.
    UnknownIndex = "unknown_index",
    /// An inner packet that is not IPv4 (the pool is IPv4).
    NotIpv4 = "not_ipv4",
    /// An inner source that is not one of the sending peer's NAT addresses.
    SpoofedSource = "spoofed_source",
    /// Traffic between sites (destination or source inside the NAT pool).
    CrossSite = "cross_site",
    /// A TUN packet for a NAT address no peer holds (answered with ICMP).
    NoPeer = "no_peer",
    /// The peer has never connected, so it has no endpoint to send to.
    NoEndpoint = "no_endpoint",
    /// An internal output queue was full.
    QueueFull = "queue_full",
    /// A queued-API input that belongs to another shard.
    OtherShard = "other_shard",
    /// The caller's output buffer was too small.
    BufferTooSmall = "buffer_too_small",
}

impl From<wg::Error> for DropReason {
    fn from(e: wg::Error) -> Self {
        match e {
            wg::Error::BufferTooSmall => Self::BufferTooSmall,
            wg::Error::Malformed => Self::Malformed,
            wg::Error::InvalidMac => Self::InvalidMac,
            wg::Error::AuthenticationFailed => Self::AuthenticationFailed,
            wg::Error::Replay => Self::Replay,
            wg::Error::NoSession => Self::NoSession,
            wg::Error::UnderLoad => Self::UnderLoad,
            wg::Error::UnknownPeer => Self::UnknownPeer,
        }
    }
}

/// Gateway-wide counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GatewayCounters {
    /// Drops by reason (including those attributed to a peer).
    pub drops: DropCounters,
    /// ICMP destination-unreachable messages generated.
    pub icmp_unreachable_sent: u64,
    /// Cookie replies sent under load.
    pub cookie_replies_sent: u64,
}

/// A datagram to send from the gateway's socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where to.
    pub dst: SocketAddr,
    /// The UDP payload. Hand the buffer back with [`GatewayState::recycle`] to
    /// avoid an allocation next time.
    pub payload: Vec<u8>,
}

/// What the control plane and the route manager need to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayEvent {
    /// A peer was configured.
    PeerAdded {
        /// Its site.
        site_id: SiteId,
    },
    /// A peer's key changed; its tunnel was replaced.
    PeerRekeyed {
        /// Its site.
        site_id: SiteId,
    },
    /// A peer was removed.
    PeerRemoved {
        /// Its site.
        site_id: SiteId,
    },
    /// This gateway now carries `address`: install its /32 route and proxy-ARP
    /// entry, announce it with a gratuitous ARP.
    AddressAdded {
        /// The NAT address.
        address: Ipv4Addr,
    },
    /// This gateway no longer carries `address`: remove its route and proxy-ARP entry.
    AddressRemoved {
        /// The NAT address.
        address: Ipv4Addr,
    },
    /// A handshake with a peer completed.
    HandshakeCompleted {
        /// The peer's site.
        site_id: SiteId,
        /// Where the peer is.
        endpoint: SocketAddr,
    },
    /// A peer's endpoint changed (roaming or NAT rebinding).
    EndpointChanged {
        /// The peer's site.
        site_id: SiteId,
        /// The previous endpoint.
        from: SocketAddr,
        /// The new endpoint.
        to: SocketAddr,
    },
}

/// What [`GatewayState::handle_network_input_into`] did with a datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum NetworkOutcome<'b> {
    /// A decrypted, checked IPv4 packet for the TUN device (a slice of the caller's buffer).
    Tunnel(&'b mut [u8]),
    /// Handled; any replies are queued ([`GatewayState::poll_transmit`]).
    Consumed,
    /// Dropped and counted.
    Dropped(DropReason),
    /// Belongs to the peer of another shard: pass the datagram to that worker.
    Handoff(u16),
}

/// What [`GatewayState::handle_tun_input_into`] did with a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum TunOutcome<'b> {
    /// Send `datagram` (a slice of the caller's buffer) to `dst`.
    Send {
        /// The peer's endpoint.
        dst: SocketAddr,
        /// The encrypted datagram.
        datagram: &'b [u8],
    },
    /// Queued until the peer's handshake completes.
    Queued,
    /// Dropped and counted (an ICMP error may be queued for the TUN device).
    Dropped(DropReason),
    /// Belongs to the peer of another shard: pass the packet to that worker.
    Handoff(u16),
}

/// One peer as `gateway status` and the metrics show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    /// Its site.
    pub site_id: SiteId,
    /// Its key.
    pub public_key: PublicKey,
    /// Its last authenticated endpoint.
    pub endpoint: Option<SocketAddr>,
    /// Its NAT addresses.
    pub nat_addresses: Vec<Ipv4Addr>,
    /// Tunnel counters (inner bytes and packets, handshakes).
    pub stats: TunnelStats,
    /// Drops attributed to this peer.
    pub drops: DropCounters,
}

/// A validated desired state: what a gateway will actually run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedState {
    /// The document's version.
    pub version: u64,
    /// The peers that passed, by site id, with the addresses that passed.
    pub peers: Vec<GatewayPeer>,
    /// One line per refused peer or address.
    pub errors: Vec<String>,
}

/// Checks a desired state against this gateway: refuses a peer whose key is
/// the gateway's own or another peer's, peers beyond `max_tunnels`, and NAT
/// addresses that are outside the pool, not unicast, or held by another peer.
/// Deterministic (all shards reach the same result).
pub fn validate_desired(
    desired: &GatewayDesiredState,
    own_key: &PublicKey,
    pool: Option<Prefix>,
    max_tunnels: u32,
) -> ValidatedState {
    let mut errors = Vec::new();
    let mut sorted: Vec<&GatewayPeer> = desired.peers.iter().collect();
    sorted.sort_by_key(|p| p.site_id);
    let mut sites = BTreeSet::new();
    let mut keys = BTreeSet::new();
    let mut addresses = BTreeSet::new();
    let mut peers = Vec::new();
    for p in sorted {
        let site = p.site_id;
        if !sites.insert(site) {
            errors.push(format!("site {site}: listed twice"));
            continue;
        }
        if p.public_key == *own_key {
            errors.push(format!("site {site}: public key is the gateway's own"));
            continue;
        }
        if !keys.insert(p.public_key) {
            errors.push(format!(
                "site {site}: public key {} already belongs to another site",
                p.public_key
            ));
            continue;
        }
        if peers.len() >= max_tunnels as usize {
            errors.push(format!(
                "site {site}: over capacity (max_tunnels = {max_tunnels})"
            ));
            continue;
        }
        let mut nat = BTreeSet::new();
        for a in &p.nat_addresses {
            if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() {
                errors.push(format!("site {site}: {a} is not a unicast address"));
            } else if pool.is_some_and(|pool| !pool.contains(*a)) {
                errors.push(format!(
                    "site {site}: {a} is outside the pool {}",
                    pool.map(|p| p.to_string()).unwrap_or_default()
                ));
            } else if nat.contains(a) {
                // A repeated address within one peer is harmless.
            } else if !addresses.insert(*a) {
                errors.push(format!("site {site}: {a} is held by another site"));
            } else {
                nat.insert(*a);
            }
        }
        peers.push(GatewayPeer {
            site_id: site,
            public_key: p.public_key,
            nat_addresses: nat.into_iter().collect(),
        });
    }
    ValidatedState {
        version: desired.version,
        peers,
        errors,
    }
}

/// FxHash (rustc's): a fast hash for keys the gateway chose or authenticated.
#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
        }
        for b in chunks.remainder() {
            self.add(u64::from(*b));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// Where a key or address leads: its site, the owning shard and, when the
/// owner is this shard, the peer's slot.
#[derive(Debug, Clone, Copy)]
struct Route {
    site: SiteId,
    owner: u16,
    slot: u32,
}

struct Peer {
    site_id: SiteId,
    public_key: PublicKey,
    index: u32,
    tunnel: Tunnel,
    endpoint: Option<SocketAddr>,
    nat: BTreeSet<Ipv4Addr>,
    drops: DropCounters,
}

const TYPE_COOKIE_REPLY: u8 = 3;

/// A tunnel index (24 bits, [`wg::MAX_INDEX`]) is a 4-bit slot generation
/// above `slot * shards + shard` (20 bits: about a million tunnels).
const INDEX_GENERATION_SHIFT: u32 = 20;
const INDEX_BASE_MASK: u32 = (1 << INDEX_GENERATION_SHIFT) - 1;

/// The sans-IO gateway. See the module docs.
pub struct GatewayState {
    responder: Responder,
    public_key: PublicKey,
    pool: Option<Prefix>,
    max_tunnels: u32,
    icmp_source: Option<Ipv4Addr>,
    icmp_rate: u32,
    shard: Shard,
    slots: Vec<Option<Peer>>,
    /// Per slot, bumped on reuse so that a new peer never gets an old tunnel index.
    generations: Vec<u8>,
    free_slots: VecDeque<u32>,
    /// Own peers by site.
    by_site: BTreeMap<SiteId, u32>,
    /// Every peer's key and every NAT address (all shards).
    by_key: FxMap<PublicKey, Route>,
    by_nat: FxMap<Ipv4Addr, Route>,
    applied_version: Option<u64>,
    counters: GatewayCounters,
    transmits: VecDeque<Transmit>,
    tun_out: VecDeque<Vec<u8>>,
    events: VecDeque<GatewayEvent>,
    free_bufs: Vec<Vec<u8>>,
    scratch: Vec<u8>,
    next_tick: Instant,
    icmp_tokens: u32,
    icmp_refill_at: Instant,
}

impl std::fmt::Debug for GatewayState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayState")
            .field("public_key", &self.public_key)
            .field("shard", &self.shard)
            .field("peers", &self.by_site.len())
            .field("applied_version", &self.applied_version)
            .finish_non_exhaustive()
    }
}

impl GatewayState {
    /// A gateway with no peers.
    pub fn new(config: GatewayConfig, now: Instant) -> Self {
        let shard = Shard {
            index: config.shard.index.min(config.shard.count.max(1) - 1),
            count: config.shard.count.max(1),
        };
        Self {
            public_key: config.private_key.public_key(),
            responder: Responder::new(config.private_key, config.handshake_limit),
            pool: config.pool,
            max_tunnels: config.max_tunnels,
            icmp_source: config.icmp_source,
            icmp_rate: config.icmp_rate_per_s,
            shard,
            slots: Vec::new(),
            generations: Vec::new(),
            free_slots: VecDeque::new(),
            by_site: BTreeMap::new(),
            by_key: FxMap::default(),
            by_nat: FxMap::default(),
            applied_version: None,
            counters: GatewayCounters::default(),
            transmits: VecDeque::new(),
            tun_out: VecDeque::new(),
            events: VecDeque::new(),
            free_bufs: Vec::new(),
            scratch: vec![0; BUF_LEN],
            next_tick: now + wg::TIMER_TICK,
            icmp_tokens: config.icmp_rate_per_s,
            icmp_refill_at: now + Duration::from_secs(1),
        }
    }

    /// The gateway's public key.
    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }

    /// The desired-state version applied last.
    pub fn applied_version(&self) -> Option<u64> {
        self.applied_version
    }

    /// Peers this state owns.
    pub fn peer_count(&self) -> usize {
        self.by_site.len()
    }

    /// Gateway-wide counters.
    pub fn counters(&self) -> GatewayCounters {
        self.counters
    }

    /// This state's own peers, by site id.
    pub fn peers(&self) -> impl Iterator<Item = PeerView> + '_ {
        self.by_site.values().filter_map(|slot| {
            let p = self.slots.get(*slot as usize)?.as_ref()?;
            Some(PeerView {
                site_id: p.site_id,
                public_key: p.public_key,
                endpoint: p.endpoint,
                nat_addresses: p.nat.iter().copied().collect(),
                stats: p.tunnel.stats(),
                drops: p.drops,
            })
        })
    }

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
        let valid = validate_desired(desired, &self.public_key, self.pool, self.max_tunnels);
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
                    let same_key = self.slots[slot as usize]
                        .as_ref()
                        .is_some_and(|peer| peer.public_key == p.public_key);
                    if !same_key {
                        self.remove_peer(*site);
                        if self.add_peer(p, now) {
                            tracing::info!(site.id = %site, key = %p.public_key, "peer re-keyed");
                            self.events
                                .push_back(GatewayEvent::PeerRekeyed { site_id: *site });
                        }
                    } else if let Some(peer) = self.slots[slot as usize].as_mut() {
                        peer.nat = p.nat_addresses.iter().copied().collect();
                    }
                }
                None => {
                    if self.add_peer(p, now) {
                        tracing::info!(site.id = %site, key = %p.public_key, "peer added");
                        self.events
                            .push_back(GatewayEvent::PeerAdded { site_id: *site });
                    }
                }
            }
        }
        // Routing tables for every peer of every shard.
        self.by_key.clear();
        self.by_nat.clear();
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
            };
            self.by_key.insert(p.public_key, route);
            for a in &p.nat_addresses {
                self.by_nat.insert(*a, route);
            }
        }
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

    fn add_peer(&mut self, p: &GatewayPeer, now: Instant) -> bool {
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
        *generation = generation.wrapping_add(1) & 0x0f;
        let index = (u32::from(*generation) << INDEX_GENERATION_SHIFT) | base;
        let tunnel = Tunnel::new(
            TunnelConfig {
                limiter: Some(self.responder.limiter()),
                ..TunnelConfig::responder(self.responder.private_key().clone(), p.public_key, index)
            },
            now,
        );
        self.slots[slot as usize] = Some(Peer {
            site_id: p.site_id,
            public_key: p.public_key,
            index,
            tunnel,
            endpoint: None,
            nat: p.nat_addresses.iter().copied().collect(),
            drops: DropCounters::default(),
        });
        self.by_site.insert(p.site_id, slot);
        true
    }

    fn remove_peer(&mut self, site: SiteId) {
        if let Some(slot) = self.by_site.remove(&site) {
            self.slots[slot as usize] = None;
            // FIFO reuse: a slot (and its tunnel index) comes back as late as possible.
            self.free_slots.push_back(slot);
        }
    }

    fn own_slot(&self, index: u32) -> Result<u32, NetworkOutcome<'static>> {
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

    fn drop_packet(&mut self, reason: DropReason, slot: Option<u32>) {
        self.counters.drops.add(reason);
        if let Some(Some(p)) = slot.and_then(|s| self.slots.get_mut(s as usize)) {
            p.drops.add(reason);
        }
    }

    /// Processes a datagram that arrived on the gateway's socket from `from`,
    /// writing a decrypted packet for the TUN device into `out` (which must
    /// hold [`wg::buffer_len`]`(datagram.len())` bytes). Handshake replies are
    /// queued for [`Self::poll_transmit`].
    pub fn handle_network_input_into<'b>(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        out: &'b mut [u8],
        now: Instant,
    ) -> NetworkOutcome<'b> {
        let slot = match self.route_datagram(from, datagram, now) {
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
        let authenticated_kind = datagram[0] != TYPE_COOKIE_REPLY;
        match peer.tunnel.decapsulate(Some(from.ip()), datagram, out, now) {
            Ok(Decapsulated::Tunnel(p)) => {
                roam(peer, from, &mut self.events);
                let site = peer.site_id;
                let Some(h) = ipv4::parse(p) else {
                    let r = if p.first().is_some_and(|b| b >> 4 == 6) {
                        DropReason::NotIpv4
                    } else {
                        DropReason::Malformed
                    };
                    self.drop_packet(r, Some(slot));
                    return NetworkOutcome::Dropped(r);
                };
                if self.by_nat.get(&h.src).is_none_or(|r| r.site != site) {
                    tracing::trace!(site.id = %site, src = %h.src, "spoofed inner source");
                    self.drop_packet(DropReason::SpoofedSource, Some(slot));
                    return NetworkOutcome::Dropped(DropReason::SpoofedSource);
                }
                if self.pool.is_some_and(|pool| pool.contains(h.dst))
                    || self.by_nat.contains_key(&h.dst)
                {
                    tracing::trace!(site.id = %site, dst = %h.dst, "cross-site packet");
                    self.drop_packet(DropReason::CrossSite, Some(slot));
                    return NetworkOutcome::Dropped(DropReason::CrossSite);
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
    ) -> Result<u32, NetworkOutcome<'static>> {
        if let Some(index) = Responder::data_receiver_index(datagram) {
            return self.own_slot(index);
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let routed = match self
            .responder
            .classify(Some(from.ip()), datagram, &mut scratch, now)
        {
            Ok(Incoming::CookieReply(cookie)) => {
                if self.transmits.len() < MAX_QUEUE {
                    let mut buf = self.free_bufs.pop().unwrap_or_default();
                    buf.clear();
                    buf.extend_from_slice(cookie);
                    self.transmits.push_back(Transmit {
                        dst: from,
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
                Some(r) => Ok(r.slot),
            },
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
            self.transmits.push_back(Transmit { dst, payload: buf });
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
    /// to send into `out` (which must hold [`wg::buffer_len`]`(packet.len())`
    /// bytes). An ICMP error for an unheld destination is queued for
    /// [`Self::poll_tun_output`].
    pub fn handle_tun_input_into<'b>(
        &mut self,
        packet: &[u8],
        out: &'b mut [u8],
        now: Instant,
    ) -> TunOutcome<'b> {
        let Some(dst) = ipv4::dst_fast(packet) else {
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
        let Some(h) = ipv4::parse(packet) else {
            self.drop_packet(DropReason::Malformed, Some(route.slot));
            return TunOutcome::Dropped(DropReason::Malformed);
        };
        if self.pool.is_some_and(|pool| pool.contains(h.src)) || self.by_nat.contains_key(&h.src) {
            // Only reachable if the kernel hairpinned a packet between two
            // sites; the network-side check drops those already.
            self.drop_packet(DropReason::CrossSite, Some(route.slot));
            return TunOutcome::Dropped(DropReason::CrossSite);
        }
        let Some(Some(peer)) = self.slots.get_mut(route.slot as usize) else {
            self.drop_packet(DropReason::NoPeer, None);
            return TunOutcome::Dropped(DropReason::NoPeer);
        };
        match peer.tunnel.encapsulate(packet, out, now) {
            Ok(Encapsulated::Network(datagram)) => match peer.endpoint {
                Some(dst) => TunOutcome::Send { dst, datagram },
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

    fn unreachable(&mut self, packet: &[u8], now: Instant) {
        let Some(h) = ipv4::parse(packet) else { return };
        if !ipv4::may_send_error_about(packet, &h) {
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
        ipv4::emit_unreachable(
            packet,
            &h,
            ipv4::ICMP_HOST_UNREACHABLE,
            self.icmp_source.unwrap_or(h.dst),
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
        buf.resize(BUF_LEN, 0);
        let result = match self.handle_network_input_into(from, datagram, &mut buf, now) {
            NetworkOutcome::Tunnel(p) => Ok(Some(p.len())),
            NetworkOutcome::Consumed => Ok(None),
            NetworkOutcome::Dropped(r) => Err(r),
            NetworkOutcome::Handoff(_) => {
                self.counters.drops.add(DropReason::OtherShard);
                Err(DropReason::OtherShard)
            }
        };
        match result {
            Ok(Some(len)) if self.tun_out.len() < MAX_QUEUE => {
                buf.truncate(len);
                self.tun_out.push_back(buf);
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

    /// Processes a packet from the TUN device; the datagram is queued for
    /// [`Self::poll_transmit`], an ICMP error for [`Self::poll_tun_output`].
    ///
    /// # Errors
    /// The [`DropReason`] when it was dropped (already counted).
    pub fn handle_tun_input(&mut self, packet: &[u8], now: Instant) -> Result<(), DropReason> {
        let mut buf = self.free_bufs.pop().unwrap_or_default();
        buf.resize(BUF_LEN.max(wg::buffer_len(packet.len())), 0);
        let result = match self.handle_tun_input_into(packet, &mut buf, now) {
            TunOutcome::Send { dst, datagram } => Ok(Some((dst, datagram.len()))),
            TunOutcome::Queued => Ok(None),
            TunOutcome::Dropped(r) => Err(r),
            TunOutcome::Handoff(_) => {
                self.counters.drops.add(DropReason::OtherShard);
                Err(DropReason::OtherShard)
            }
        };
        match result {
            Ok(Some((dst, len))) if self.transmits.len() < MAX_QUEUE => {
                buf.truncate(len);
                self.transmits.push_back(Transmit { dst, payload: buf });
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

    /// Runs the peers' WireGuard timers when due ([`Self::poll_timeout`]).
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + wg::TIMER_TICK;
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
                        self.transmits.push_back(Transmit { dst, payload: buf });
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

fn roam(peer: &mut Peer, from: SocketAddr, events: &mut VecDeque<GatewayEvent>) {
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
