//! The gateway's packet logic, sans-IO: many tunnel peers (one per site,
//! WireGuard today) behind one UDP socket, and pooled NAT addresses routed
//! between the center LAN (a TUN device, in the IO shell) and the right peer.
//!
//! Inputs are `handle_*(…, now)`, outputs are drained with `poll_*`. The IO
//! shell (`gateway/`) owns the socket, the TUN device and the clock.
//!
//! - **Network → TUN.** A datagram is routed to its peer without crypto when it
//!   is a data message (it carries the peer's tunnel index, [`crate::tunnel`];
//!   WireGuard: receiver index `>> 8`), or, for a handshake initiation, by the
//!   initiator's static key after the shared rate limiter's mac1 check (under
//!   load the sender gets a cookie reply instead).
//!   Each peer's tunnel is of the kind its site names in the desired state
//!   ([`crate::messages::GatewayPeer::tunnel`]); the logic here talks only to the seam
//!   ([`crate::tunnel::Tunnel`], [`crate::tunnel::Responder`]). The peer's tunnel authenticates and decrypts it;
//!   the peer's endpoint follows its last authenticated datagram (roaming and
//!   NAT rebinding, WireGuard paper §2.1). A decrypted packet must be IPv4 with
//!   an inner source that is one of *that* peer's NAT addresses
//!   (anti-spoofing), a destination outside the pool (one site never reaches
//!   another through the gateway), and be part of a flow the center started
//!   ([`flows`]: only technicians open connections); otherwise it is dropped
//!   and counted.
//! - **TUN → network.** The destination NAT address is looked up in a hash
//!   map (O(1)); the source must lie in a technician prefix
//!   ([`GatewayConfig::technician_prefixes`]); the packet creates or refreshes
//!   its flow, is encrypted for its peer and sent to the peer's endpoint. A destination nobody holds is dropped and answered with ICMP
//!   destination unreachable, code 1 (host unreachable; RFC 792, RFC 1812
//!   §5.2.7.1), rate-limited (RFC 1812 §4.3.2.8).
//! - **Desired state.** [`GatewayState::handle_control`] reconciles to a
//!   [`crate::messages::GatewayDesiredState`]: peers are added, re-keyed, re-addressed and
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
//!
//! Files: [`validate_desired`] (what of a document runs), `peers` (the peer
//! table and reconciliation), `datapath` (the packet path, timers and output
//! queues), `icmp` (host-unreachable errors), [`flows`] (the flow table).

mod datapath;
pub mod flows;
mod icmp;
mod peers;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_flows;
#[cfg(test)]
mod tests_ipsec;
#[cfg(test)]
mod tests_rotation;
#[cfg(test)]
mod tests_sources;
mod validate;

use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use self::flows::{FlowLimits, FlowTable};
pub use self::peers::NextKeyShare;
use self::peers::{Peer, Route};
pub use self::validate::{ValidatedState, validate_desired};
use crate::ipv4::FastMap;
pub use crate::ipv4::{Prefix, PrefixError};
use crate::messages::{PublicKey, SiteId};
use crate::tunnel::{self, Builtin, Kinds, PrivateKey, Responder, Tunnel, TunnelKind, TunnelStats};

/// The largest datagram or IP packet the gateway handles, and the size of its
/// internal buffers.
pub const MAX_PACKET: usize = 65535;
/// Internal output buffers hold any result for a [`MAX_PACKET`] input
/// (of the [`Builtin`] kinds).
pub const BUF_LEN: usize = tunnel::builtin_buffer_len(MAX_PACKET);
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
    /// Sources that may send toward the sites and start flows (the
    /// technicians); any other source is dropped.
    pub technician_prefixes: Vec<Prefix>,
    /// Bounds and idle times of the flow table (per state, i.e. per worker).
    pub flows: FlowLimits,
}

impl GatewayConfig {
    /// Defaults for everything but the key: no pool restriction, 1000 tunnels,
    /// [`tunnel::wireguard::Responder::DEFAULT_HANDSHAKE_LIMIT`], 100 ICMP errors
    /// per second, one shard, technicians in [`Self::default_technician_prefix`],
    /// [`FlowLimits::default`].
    pub fn new(private_key: PrivateKey) -> Self {
        Self {
            private_key,
            pool: None,
            max_tunnels: 1000,
            handshake_limit: tunnel::wireguard::Responder::DEFAULT_HANDSHAKE_LIMIT,
            icmp_source: None,
            icmp_rate_per_s: 100,
            shard: Shard::SINGLE,
            technician_prefixes: vec![Self::default_technician_prefix()],
            flows: FlowLimits::default(),
        }
    }

    /// The center LAN of docs/DESIGN.md's address plan, 172.16.0.0/24 (the
    /// router agent's default `center_prefixes` too).
    pub fn default_technician_prefix() -> Prefix {
        Prefix::new(Ipv4Addr::new(172, 16, 0, 0), 24).expect("a /24 is a valid prefix")
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
    /// Under load, handshakes from one source address above its share.
    RateLimited = "rate_limited",
    /// A handshake from a key that is not a configured peer.
    UnknownPeer = "unknown_peer",
    /// An inner packet outside its IPsec SA's traffic selectors (RFC 4301 §5.2).
    OutsideSelectors = "outside_selectors",
    /// A message for a tunnel index that does not exist.
    UnknownIndex = "unknown_index",
    /// An inner packet that is not IPv4 (the pool is IPv4).
    NotIpv4 = "not_ipv4",
    /// An inner source that is not one of the sending peer's NAT addresses.
    SpoofedSource = "spoofed_source",
    /// Traffic between sites (destination or source inside the NAT pool).
    CrossSite = "cross_site",
    /// From a site: a packet that would open a connection toward the center
    /// (TCP SYN without ACK, ICMP echo request); only the center opens them.
    SiteInitiated = "site_initiated",
    /// From a site: a packet that is not part of a flow the center started
    /// (no such flow, or it expired or went to another gateway).
    NoFlow = "no_flow",
    /// Toward a site: a source outside the technician prefixes.
    NotTechnician = "not_technician",
    /// Toward a site: a technician source not among those allowed to reach
    /// this NAT address (its site belongs to another team, or the request
    /// was started by another technician).
    SourceNotAllowed = "source_not_allowed",
    /// Toward a site: a new flow while the flow table is full.
    FlowTableFull = "flow_table_full",
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

crate::drops::from_tunnel_errors!(DropReason);

/// Gateway-wide counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GatewayCounters {
    /// Drops by reason (including those attributed to a peer).
    pub drops: DropCounters,
    /// ICMP destination-unreachable messages generated.
    pub icmp_unreachable_sent: u64,
    /// Cookie replies sent under load.
    pub cookie_replies_sent: u64,
    /// Active-mode FTP data-connection expectations ([`flows`]).
    pub ftp_expectations: flows::ExpectationCounters,
}

/// A datagram to send from the gateway's sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where to.
    pub dst: SocketAddr,
    /// The kind of the peer whose tunnel made it; `None` for an answer of
    /// the responder before any peer is known (a cookie reply, an
    /// IKE_SA_INIT response), whose shape tells its kind. The IO shell
    /// picks the socket by it: an ESP SPI is the peer's choice and may look
    /// like anything.
    pub kind: Option<TunnelKind>,
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
        /// The peer's tunnel kind (which socket the datagram leaves from).
        kind: TunnelKind,
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

/// The sans-IO gateway. See the module docs. `K` is the set of tunnel kinds
/// it runs ([`Builtin`] in the product).
pub struct GatewayState<K: Kinds = Builtin> {
    responder: K::Responder,
    public_key: PublicKey,
    /// During a rotation of the gateway's key, the next public key.
    next_public_key: Option<PublicKey>,
    pool: Option<Prefix>,
    max_tunnels: u32,
    icmp_source: Option<Ipv4Addr>,
    icmp_rate: u32,
    shard: Shard,
    technicians: Vec<Prefix>,
    flows: FlowTable,
    slots: Vec<Option<Peer<K::Tunnel>>>,
    /// Per slot, bumped on reuse so that a new peer never gets an old tunnel index.
    generations: Vec<u8>,
    free_slots: VecDeque<u32>,
    /// Own peers by site.
    by_site: BTreeMap<SiteId, u32>,
    /// Every peer's key and every NAT address (all shards).
    by_key: FastMap<PublicKey, Route>,
    /// Every IPsec peer by the identity it authenticates with (all shards).
    by_identity: FastMap<String, Route>,
    by_nat: FastMap<Ipv4Addr, Route>,
    /// The distinct source restrictions of the NAT addresses ([`Route::sources`]).
    source_sets: Vec<Box<[Prefix]>>,
    applied_version: Option<u64>,
    counters: GatewayCounters,
    transmits: VecDeque<Transmit>,
    tun_out: VecDeque<Vec<u8>>,
    events: VecDeque<GatewayEvent>,
    free_bufs: Vec<Vec<u8>>,
    scratch: Vec<u8>,
    /// A peer's tunnel replaced for the initiation being handled.
    swapped: Option<peers::Swapped<K::Tunnel>>,
    next_tick: Instant,
    icmp_tokens: u32,
    icmp_refill_at: Instant,
}

impl<K: Kinds> std::fmt::Debug for GatewayState<K> {
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
    /// A gateway with no peers, running the [`Builtin`] tunnel kinds.
    pub fn new(config: GatewayConfig, now: Instant) -> Self {
        Self::with_kinds(config, now)
    }
}

impl<K: Kinds> GatewayState<K> {
    /// A gateway with no peers, running the tunnel kinds `K`.
    pub fn with_kinds(config: GatewayConfig, now: Instant) -> Self {
        let shard = Shard {
            index: config.shard.index.min(config.shard.count.max(1) - 1),
            count: config.shard.count.max(1),
        };
        Self {
            public_key: config.private_key.public_key(),
            next_public_key: None,
            responder: K::Responder::new(config.private_key, config.handshake_limit),
            pool: config.pool,
            max_tunnels: config.max_tunnels,
            icmp_source: config.icmp_source,
            icmp_rate: config.icmp_rate_per_s,
            shard,
            technicians: config.technician_prefixes,
            flows: FlowTable::new(config.flows, now),
            slots: Vec::new(),
            generations: Vec::new(),
            free_slots: VecDeque::new(),
            by_site: BTreeMap::new(),
            by_key: FastMap::default(),
            by_identity: FastMap::default(),
            by_nat: FastMap::default(),
            source_sets: Vec::new(),
            applied_version: None,
            counters: GatewayCounters::default(),
            transmits: VecDeque::new(),
            tun_out: VecDeque::new(),
            events: VecDeque::new(),
            free_bufs: Vec::new(),
            scratch: vec![0; K::buffer_len(MAX_PACKET)],
            swapped: None,
            next_tick: now + K::TIMER_TICK,
            icmp_tokens: config.icmp_rate_per_s,
            icmp_refill_at: now + Duration::from_secs(1),
        }
    }

    /// The states of a gateway's `workers` workers (shard `i` for worker
    /// `i`), sharing one responder's handshake admission: a cookie one worker
    /// gave is valid at all, and the handshake limit counts the gateway's
    /// initiations once (see [`Self::handle_handed_over_input_into`]).
    pub fn shards(config: GatewayConfig, workers: u16, now: Instant) -> Vec<Self> {
        let count = workers.max(1);
        let mut states: Vec<Self> = (0..count)
            .map(|index| {
                let shard = Shard { index, count };
                Self::with_kinds(
                    GatewayConfig {
                        shard,
                        ..config.clone()
                    },
                    now,
                )
            })
            .collect();
        if let Some((first, rest)) = states.split_first_mut() {
            for s in rest {
                s.responder = first.responder.share();
            }
        }
        states
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
        GatewayCounters {
            ftp_expectations: self.flows.expectation_counters(),
            ..self.counters
        }
    }

    /// Flows in this state's table (expired ones until they are swept).
    pub fn flow_count(&self) -> usize {
        self.flows.len()
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
}
