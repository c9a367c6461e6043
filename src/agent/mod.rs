//! The router agent's sans-IO packet logic: the tunnel to the gateway the
//! server chose, the customer's consent (the current mappings and their
//! expiry), and the 1:1 NAT between the tunnel and the LAN side.
//!
//! [`AgentState`] follows the desired-state document
//! ([`crate::messages::AgentDesiredState`]): it dials the gateway it names (an initiator of
//! the tunnel kind the document names, with persistent keepalive,
//! [`crate::tunnel`]), re-dials when the
//! server moves the site to another gateway, and tears the tunnel down when
//! no mapping is left. Every mapping carries the moment the customer's
//! consent ends; the state removes it then by itself (driven by
//! [`AgentState::handle_timeout`]), whether or not the server is reachable.
//!
//! Two data modes share this state (docs/DESIGN.md, "Data plane"):
//! - [`DataMode::Packet`]: decrypted packets are rewritten by a
//!   [`PacketNat`] (by default [`AgentNat`], the core's
//!   [`crate::nat::StaticNat`]: destination NAT address → real LAN address,
//!   and optionally the source to a masquerade address) and
//!   handed to the caller for its TUN device; replies take the reverse rewrite.
//!   FTP control connections (the PC's port 21) also pass the FTP ALG
//!   ([`crate::nat::ftp::FtpAlg`]): a `227` reply naming the PC's LAN
//!   address names its NAT address toward the technician, with the
//!   sequence and acknowledgement numbers corrected for the length change.
//! - [`DataMode::Netstack`]: packets keep their NAT addresses and go to the
//!   caller's userspace stack (smoltcp), which terminates them and relays to
//!   the real hosts; only packets to and from a mapped NAT address pass.
//!
//! Everything else is dropped and counted by [`DropReason`]; a malformed
//! packet never panics.
//!
//! No IO and no clock: `now` comes in as a parameter. Wall-clock expiry times
//! on the wire ([`UnixMillis`]) are converted once, when a document is
//! applied, into the remaining time on the document's own clock: the caller
//! passes the time of the clock that wrote the document (the server's, as
//! its answer dated it) together with `now`, so that a wrong router clock
//! neither extends nor shortens the customer's consent.
//!
//! Files: `desired` (following the desired state: mappings, revocations,
//! dialling), `datapath` (the packet path in both directions), [`nat`] (the
//! packet-mode NAT behind [`PacketNat`]).

use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::ipv4::Prefix;
use crate::messages::{
    AgentTunnel, GatewayId, PublicKey, RequestId, SiteId, TerminalName, UnixMillis,
};
use crate::tunnel::{Builtin, Kinds, PrivateKey, Tunnel, TunnelKind, TunnelStats};

mod datapath;
mod desired;
pub mod nat;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_ipsec;

pub use nat::{AgentNat, NatConfig};

/// The largest IP packet the agent handles.
pub const MAX_PACKET: usize = 65535;
/// Bound of the internal transmit queue; beyond it datagrams are dropped and counted.
pub const MAX_QUEUE: usize = 1024;
/// Bound of undrained events: a slow consumer loses old events, never memory.
const MAX_EVENTS: usize = 1024;

/// How the decrypted side of the tunnel reaches the LAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataMode {
    /// 1:1 NAT to and from a TUN device; the kernel forwards onto the LAN.
    Packet {
        /// Rewrite the source of packets toward the LAN to this address (an
        /// agent that is not the LAN's default router), so that replies come
        /// back to the agent.
        masquerade: Option<Ipv4Addr>,
    },
    /// Packets keep their NAT addresses for a userspace stack.
    Netstack,
}

/// Settings of an [`AgentState`].
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The site this agent speaks for; a document for another site is refused.
    pub site_id: SiteId,
    /// The agent's WireGuard private key (the gateway knows its public key).
    pub private_key: PrivateKey,
    /// Packet or netstack mode.
    pub mode: DataMode,
    /// Randomness for tunnel indices.
    pub seed: u64,
    /// Sources accepted from the tunnel: the technicians (the router
    /// agent's `packet.center_prefixes`). A packet from any other source is
    /// dropped, even from an authenticated gateway; empty refuses all.
    pub center_prefixes: Vec<Prefix>,
}

crate::drops::drop_reasons! {
    /// Why a packet or datagram was dropped. Every drop is counted.
    enum DropReason;
    /// A datagram from somewhere other than the gateway's endpoint.
    UnknownSender = "unknown_sender",
    /// A datagram while there is no tunnel.
    NoTunnel = "no_tunnel",
    /// Not a WireGuard message, or a decrypted packet that is not well-formed IPv4.
    Malformed = "malformed",
    /// A handshake message not addressed to our key (mac1).
    InvalidMac = "invalid_mac",
    /// Decryption or handshake authentication failed.
    AuthenticationFailed = "authentication_failed",
    /// A replayed message.
    Replay = "replay",
    /// A message for a session that no longer exists.
    NoSession = "no_session",
    /// The gateway asked for a cookie under load and we had none.
    UnderLoad = "under_load",
    /// Under load, handshakes from one source address above its share.
    RateLimited = "rate_limited",
    /// A handshake from a key that is not our gateway's.
    UnknownPeer = "unknown_peer",
    /// An inner packet outside its IPsec SA's traffic selectors (RFC 4301 §5.2).
    OutsideSelectors = "outside_selectors",
    /// An inner packet that is not IPv4 (the NAT pool is IPv4).
    NotIpv4 = "not_ipv4",
    /// From the tunnel: the destination is not a currently mapped NAT address.
    NotMapped = "not_mapped",
    /// From the tunnel: the source is outside the center prefixes.
    NotTechnician = "not_technician",
    /// The mapping's consent has ended (expired between two timer runs).
    Expired = "expired",
    /// From the LAN side: the source is not a mapped terminal (or, in
    /// netstack mode, not a mapped NAT address).
    UnmappedSource = "unmapped_source",
    /// A header the NAT refuses (bad checksum, truncated, bad length or IHL).
    BadHeader = "bad_header",
    /// A protocol or packet kind the NAT does not translate.
    Unsupported = "unsupported",
    /// A LAN-side packet while the tunnel is down.
    TunnelDown = "tunnel_down",
    /// The masquerade table had no room for another connection.
    MasqueradeFull = "masquerade_full",
    /// An internal output queue was full.
    QueueFull = "queue_full",
    /// The caller's output buffer was too small.
    BufferTooSmall = "buffer_too_small",
}

/// The 1:1 NAT of packet mode, as [`AgentState`] uses it. The default is
/// the core's [`crate::nat::StaticNat`] ([`AgentNat`]); another
/// implementation (e.g. a test double) can be plugged in with
/// [`AgentState::with_nat`].
pub trait PacketNat: Send + std::fmt::Debug {
    /// Maps `nat` ↔ `real` (replacing an older mapping of `nat`) until `expires_at`.
    ///
    /// # Errors
    /// A sentence when the mapping cannot be installed (e.g. `real` is
    /// already mapped to another NAT address).
    fn insert(
        &mut self,
        nat: Ipv4Addr,
        real: Ipv4Addr,
        expires_at: Option<Instant>,
    ) -> Result<(), String>;
    /// Removes the mapping of `nat`; whether there was one.
    fn remove(&mut self, nat: Ipv4Addr) -> bool;
    /// Tunnel → LAN, in place.
    ///
    /// # Errors
    /// Why the packet must be dropped.
    fn translate_inbound(&mut self, packet: &mut [u8], now: Instant) -> Result<(), DropReason>;
    /// LAN → tunnel, in place.
    ///
    /// # Errors
    /// Why the packet must be dropped.
    fn translate_outbound(&mut self, packet: &mut [u8], now: Instant) -> Result<(), DropReason>;
    /// When [`Self::handle_timeout`] wants to run.
    fn poll_timeout(&self) -> Option<Instant>;
    /// Expires idle state.
    fn handle_timeout(&mut self, now: Instant);
}

crate::drops::from_tunnel_errors!(DropReason);

/// Traffic and drop counters of the agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentCounters {
    /// Drops by reason.
    pub drops: DropCounters,
    /// Packets from the tunnel handed to the LAN side.
    pub to_lan_packets: u64,
    /// Their bytes.
    pub to_lan_bytes: u64,
    /// Packets from the LAN side sent into the tunnel.
    pub to_tunnel_packets: u64,
    /// Their bytes.
    pub to_tunnel_bytes: u64,
    /// Mappings removed because their consent ended locally.
    pub mappings_expired: u64,
    /// The packet-mode FTP ALG ([`crate::nat::ftp::FtpAlg`]): lines
    /// rewritten, and what it could not rewrite.
    pub ftp: crate::nat::ftp::FtpCounters,
}

/// A datagram for the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The gateway's endpoint.
    pub dst: SocketAddr,
    /// The UDP payload. Hand it back with [`AgentState::recycle`].
    pub payload: Vec<u8>,
}

/// Why a mapping went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemovedBecause {
    /// The server's desired state no longer lists it (end, revoke, expiry there).
    Withdrawn,
    /// Its `expires_at` passed; the agent removed it by itself.
    Expired,
    /// The terminal now resolves to another address; the mapping was replaced.
    Replaced,
    /// The customer ended access on the agent's page.
    Revoked,
}

/// What the IO layer, the page and the logs need to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// A mapping is in force: packets to `nat` reach `real`.
    MappingInstalled {
        /// The NAT address.
        nat: Ipv4Addr,
        /// The real LAN address.
        real: Ipv4Addr,
        /// The terminal.
        terminal: TerminalName,
    },
    /// A mapping is gone: nothing reaches `real` through `nat` any more.
    MappingRemoved {
        /// The NAT address.
        nat: Ipv4Addr,
        /// The real LAN address.
        real: Ipv4Addr,
        /// The terminal.
        terminal: TerminalName,
        /// Why.
        because: RemovedBecause,
    },
    /// A tunnel to a gateway was created and its first handshake sent.
    TunnelDialled {
        /// The gateway.
        gateway_id: GatewayId,
        /// Where.
        endpoint: SocketAddr,
    },
    /// A handshake with the gateway completed.
    TunnelUp {
        /// The gateway.
        gateway_id: GatewayId,
    },
    /// The tunnel was torn down (no mapping left, or the server withdrew it).
    TunnelClosed {
        /// The gateway.
        gateway_id: GatewayId,
    },
}

/// What [`AgentState::handle_network_input_into`] did with a datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum NetworkOutcome<'b> {
    /// A packet for the LAN side, a slice of the caller's buffer (packet
    /// mode: already rewritten to the real address).
    Lan(&'b mut [u8]),
    /// Handled (handshake, keepalive); replies are queued for [`AgentState::poll_transmit`].
    Consumed,
    /// Dropped and counted.
    Dropped(DropReason),
}

/// What [`AgentState::handle_lan_input_into`] did with a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum LanOutcome<'b> {
    /// Send `datagram` (a slice of the caller's buffer) to `dst`.
    Send {
        /// The gateway's endpoint.
        dst: SocketAddr,
        /// The encrypted datagram.
        datagram: &'b [u8],
    },
    /// Queued inside the tunnel until its handshake completes.
    Queued,
    /// Dropped and counted.
    Dropped(DropReason),
}

/// One mapping as the page, the status command and the metrics show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingView {
    /// The NAT address the technician uses.
    pub nat: Ipv4Addr,
    /// The real LAN address (never leaves the agent).
    pub real: Ipv4Addr,
    /// The terminal.
    pub terminal: TerminalName,
    /// The request that opened it.
    pub request_id: RequestId,
    /// When the customer's consent ends.
    pub expires_at: UnixMillis,
}

/// The tunnel as the status command shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelView {
    /// The gateway.
    pub gateway_id: GatewayId,
    /// Its endpoint.
    pub endpoint: SocketAddr,
    /// The tunnel's kind.
    pub kind: TunnelKind,
    /// Its key.
    pub public_key: PublicKey,
    /// Whether a session is established.
    pub up: bool,
    /// Counters of the tunnel.
    pub stats: TunnelStats,
}

struct Mapping {
    real: Ipv4Addr,
    terminal: TerminalName,
    request_id: RequestId,
    expires_wall: UnixMillis,
    expires_at: Instant,
}

struct Peer<T> {
    desired: AgentTunnel,
    tunnel: T,
}

/// The router agent's packet state. See the module documentation. `K` is
/// the set of tunnel kinds it can dial ([`Builtin`] in the product).
pub struct AgentState<K: Kinds = Builtin> {
    site_id: SiteId,
    private_key: PrivateKey,
    mode: DataMode,
    center_prefixes: Vec<Prefix>,
    rng: u64,
    applied_version: Option<u64>,
    /// The tunnel the server wants (kept while no mapping is live, so that it
    /// is dialled as soon as one is).
    desired_tunnel: Option<AgentTunnel>,
    peer: Option<Peer<K::Tunnel>>,
    mappings: BTreeMap<Ipv4Addr, Mapping>,
    /// Requests the customer ended here ("end access now"): their mappings
    /// are never installed again, even if the server still lists them
    /// because it could not be told yet.
    revoked: std::collections::BTreeSet<RequestId>,
    /// When set, only requests in `consented` are installed: the ones the
    /// customer made on this agent, not whatever the server lists.
    consent_required: bool,
    consented: std::collections::BTreeSet<RequestId>,
    nat: Box<dyn PacketNat>,
    /// Packet mode: addresses inside FTP control connections.
    ftp: crate::nat::ftp::FtpAlg,
    /// An FTP control segment from the LAN while the ALG rewrites it (its
    /// length may change; the TUN buffer's may not).
    alg_buf: Vec<u8>,
    transmits: VecDeque<Transmit>,
    free_bufs: Vec<Vec<u8>>,
    scratch: Vec<u8>,
    events: VecDeque<AgentEvent>,
    counters: AgentCounters,
}

impl<K: Kinds> std::fmt::Debug for AgentState<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentState")
            .field("site_id", &self.site_id)
            .field("mode", &self.mode)
            .field("applied_version", &self.applied_version)
            .field("mappings", &self.mappings.len())
            .field("tunnel", &self.peer.as_ref().map(|p| p.desired.endpoint))
            .finish_non_exhaustive()
    }
}

/// Converts a wall-clock deadline into the caller's monotonic clock, given
/// that `now` and `wall` were read together.
pub fn deadline(at: UnixMillis, now: Instant, wall: UnixMillis) -> Instant {
    now + Duration::from_millis(at.0.saturating_sub(wall.0))
}

impl AgentState {
    /// An agent with no tunnel and no mapping, dialling the [`Builtin`]
    /// tunnel kinds; packet mode uses [`AgentNat`].
    pub fn new(config: AgentConfig, now: Instant) -> Self {
        Self::with_kinds(config, now)
    }
}

impl<K: Kinds> AgentState<K> {
    /// An agent with no tunnel and no mapping, dialling the tunnel kinds
    /// `K`; packet mode uses [`AgentNat`].
    pub fn with_kinds(config: AgentConfig, now: Instant) -> Self {
        let masquerade = match config.mode {
            DataMode::Packet { masquerade } => masquerade,
            DataMode::Netstack => None,
        };
        Self::with_nat(
            config,
            Box::new(AgentNat::new(NatConfig { masquerade })),
            now,
        )
    }

    /// An agent whose packet mode uses `nat` (its own masquerade setting
    /// applies, not the one in `config.mode`).
    pub fn with_nat(config: AgentConfig, nat: Box<dyn PacketNat>, _now: Instant) -> Self {
        Self {
            site_id: config.site_id,
            private_key: config.private_key,
            mode: config.mode,
            center_prefixes: config.center_prefixes,
            rng: config.seed | 1,
            applied_version: None,
            desired_tunnel: None,
            peer: None,
            mappings: BTreeMap::new(),
            revoked: std::collections::BTreeSet::new(),
            consent_required: false,
            consented: std::collections::BTreeSet::new(),
            nat,
            ftp: crate::nat::ftp::FtpAlg::new(),
            alg_buf: Vec::new(),
            transmits: VecDeque::new(),
            free_bufs: Vec::new(),
            scratch: vec![0; K::buffer_len(MAX_PACKET)],
            events: VecDeque::new(),
            counters: AgentCounters::default(),
        }
    }

    /// With `true`, a mapping is installed only when its request was given
    /// to [`Self::consent_to`] (a request the customer made on this agent);
    /// the others are reported as errors of the applied state. Off by
    /// default: every request the document lists is installed.
    pub fn require_consent(&mut self, on: bool) {
        self.consent_required = on;
    }

    /// Records that the customer made request `id` on this agent: its
    /// mappings may be installed when [`Self::require_consent`] is on.
    pub fn consent_to(&mut self, id: RequestId) {
        self.consented.insert(id);
    }

    /// The data mode.
    pub fn mode(&self) -> DataMode {
        self.mode
    }

    /// The desired-state version applied last.
    pub fn applied_version(&self) -> Option<u64> {
        self.applied_version
    }

    /// Traffic and drop counters.
    pub fn counters(&self) -> AgentCounters {
        AgentCounters {
            ftp: self.ftp.counters(),
            ..self.counters
        }
    }

    /// The mappings in force, by NAT address.
    pub fn mappings(&self) -> impl Iterator<Item = MappingView> + '_ {
        self.mappings.iter().map(|(nat, m)| MappingView {
            nat: *nat,
            real: m.real,
            terminal: m.terminal.clone(),
            request_id: m.request_id,
            expires_at: m.expires_wall,
        })
    }

    /// Whether `nat` is a mapped NAT address now.
    pub fn is_mapped(&self, nat: Ipv4Addr, now: Instant) -> bool {
        self.mappings.get(&nat).is_some_and(|m| now < m.expires_at)
    }

    /// The tunnel, if one is dialled.
    pub fn tunnel(&self) -> Option<TunnelView> {
        self.peer.as_ref().map(|p| TunnelView {
            gateway_id: p.desired.gateway_id,
            endpoint: p.desired.endpoint,
            kind: p.desired.kind,
            public_key: p.desired.public_key,
            up: p.tunnel.has_session(),
            stats: p.tunnel.stats(),
        })
    }

    /// Runs timers: the tunnel's (keepalive, rekey, retransmission) and the
    /// expiry of mappings.
    pub fn handle_timeout(&mut self, now: Instant) {
        let expired: Vec<Ipv4Addr> = self
            .mappings
            .iter()
            .filter(|(_, m)| now >= m.expires_at)
            .map(|(nat, _)| *nat)
            .collect();
        if !expired.is_empty() {
            for nat in expired {
                self.counters.mappings_expired += 1;
                self.remove_mapping(nat, RemovedBecause::Expired);
            }
            self.reconcile_tunnel(now);
        }
        self.nat.handle_timeout(now);
        if let Some(peer) = self.peer.as_mut() {
            let dst = peer.desired.endpoint;
            let mut scratch = std::mem::take(&mut self.scratch);
            if let Ok(Some(d)) = peer.tunnel.handle_timeout(&mut scratch, now) {
                let d: &[u8] = d;
                self.queue_transmit(dst, d);
            }
            self.scratch = scratch;
            self.after_tunnel_activity();
        }
    }

    /// Starts a new handshake now (a restarted one when one is in progress)
    /// and queues its initiation. The session in use stays until the new
    /// one is confirmed (WireGuard rekeying), so traffic is not interrupted;
    /// the IO shell uses it to test another path to the gateway (the TLS
    /// fallback's UDP probe), where the gateway answers the way it came.
    pub fn initiate_handshake(&mut self, now: Instant) {
        if let Some(peer) = self.peer.as_mut() {
            let dst = peer.desired.endpoint;
            let mut scratch = std::mem::take(&mut self.scratch);
            if let Ok(Some(d)) = peer.tunnel.initiate_handshake(&mut scratch, true, now) {
                let d: &[u8] = d;
                self.queue_transmit(dst, d);
            }
            self.scratch = scratch;
        }
    }

    /// Uses `key` from now on (planned key rotation): a tunnel in use is
    /// replaced by one that handshakes with the new key at once, so that
    /// the gap is one handshake round trip (TCP retransmits across it).
    /// The gateway accepts the new key once its document lists it as the
    /// site's next key. Returns whether the key changed.
    pub fn set_private_key(&mut self, key: PrivateKey, now: Instant) -> bool {
        if key.to_bytes() == self.private_key.to_bytes() {
            return false;
        }
        self.private_key = key;
        tracing::info!(public_key = %self.private_key.public_key(), "tunnel key replaced");
        if let Some(p) = self.peer.as_ref() {
            let desired = p.desired.clone();
            self.close_tunnel();
            self.dial(desired, now);
        }
        true
    }

    /// The public key of the key in use.
    pub fn public_key(&self) -> crate::messages::PublicKey {
        self.private_key.public_key()
    }

    /// When [`Self::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let expiry = self.mappings.values().map(|m| m.expires_at).min();
        let tunnel = self.peer.as_ref().map(|p| p.tunnel.poll_timeout());
        let nat = self.nat.poll_timeout();
        [expiry, tunnel, nat].into_iter().flatten().min()
    }

    /// The next datagram to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<AgentEvent> {
        self.events.pop_front()
    }

    /// Gives a drained [`Transmit::payload`] back for reuse.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if self.free_bufs.len() < 64 {
            self.free_bufs.push(buf);
        }
    }

    fn queue_transmit(&mut self, dst: SocketAddr, bytes: &[u8]) {
        if self.transmits.len() >= MAX_QUEUE {
            self.counters.drops.add(DropReason::QueueFull);
            return;
        }
        let mut buf = self.free_bufs.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(bytes);
        self.transmits.push_back(Transmit { dst, payload: buf });
    }

    fn push_event(&mut self, e: AgentEvent) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}
