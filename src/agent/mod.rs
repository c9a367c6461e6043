//! The router agent's sans-IO packet logic: the tunnel to the gateway the
//! server chose, the customer's consent (the current mappings and their
//! expiry), and the 1:1 NAT between the tunnel and the LAN side.
//!
//! [`AgentState`] follows the desired-state document
//! ([`AgentDesiredState`]): it dials the gateway it names (WireGuard
//! initiator with persistent keepalive, [`crate::wg`]), re-dials when the
//! server moves the site to another gateway, and tears the tunnel down when
//! no mapping is left. Every mapping carries the moment the customer's
//! consent ends; the state removes it then by itself (driven by
//! [`AgentState::handle_timeout`]), whether or not the server is reachable.
//!
//! Two data modes share this state (DESIGN.md, "Data plane"):
//! - [`DataMode::Packet`]: decrypted packets are rewritten by a
//!   [`PacketNat`] (by default [`AgentNat`], the core's
//!   [`crate::nat::StaticNat`]: destination NAT address → real LAN address,
//!   and optionally the source to a masquerade address) and
//!   handed to the caller for its TUN device; replies take the reverse rewrite.
//! - [`DataMode::Netstack`]: packets keep their NAT addresses and go to the
//!   caller's userspace stack (smoltcp), which terminates them and relays to
//!   the real hosts; only packets to and from a mapped NAT address pass.
//!
//! Everything else is dropped and counted by [`DropReason`]; a malformed
//! packet never panics.
//!
//! No IO and no clock: `now` comes in as a parameter. Wall-clock expiry times
//! on the wire ([`UnixMillis`]) are converted once, when a document is
//! applied, using the wall time the caller read together with `now`.

use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::messages::{
    AgentDesiredState, AgentTunnel, AppliedState, GatewayId, PublicKey, RequestId, SiteId,
    TerminalName, UnixMillis,
};
use crate::wg::{self, Decapsulated, Encapsulated, PrivateKey, Tunnel, TunnelConfig, TunnelEvent};

pub mod nat;
#[cfg(test)]
mod tests;

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
    /// A handshake from a key that is not our gateway's.
    UnknownPeer = "unknown_peer",
    /// An inner packet that is not IPv4 (the NAT pool is IPv4).
    NotIpv4 = "not_ipv4",
    /// From the tunnel: the destination is not a currently mapped NAT address.
    NotMapped = "not_mapped",
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
    /// Its key.
    pub public_key: PublicKey,
    /// Whether a session is established.
    pub up: bool,
    /// Counters of the tunnel.
    pub stats: wg::TunnelStats,
}

struct Mapping {
    real: Ipv4Addr,
    terminal: TerminalName,
    request_id: RequestId,
    expires_wall: UnixMillis,
    expires_at: Instant,
}

struct Peer {
    desired: AgentTunnel,
    tunnel: Tunnel,
}

/// The router agent's packet state. See the module documentation.
pub struct AgentState {
    site_id: SiteId,
    private_key: PrivateKey,
    mode: DataMode,
    rng: u64,
    applied_version: Option<u64>,
    /// The tunnel the server wants (kept while no mapping is live, so that it
    /// is dialled as soon as one is).
    desired_tunnel: Option<AgentTunnel>,
    peer: Option<Peer>,
    mappings: BTreeMap<Ipv4Addr, Mapping>,
    /// Requests the customer ended here ("end access now"): their mappings
    /// are never installed again, even if the server still lists them
    /// because it could not be told yet.
    revoked: std::collections::BTreeSet<RequestId>,
    nat: Box<dyn PacketNat>,
    transmits: VecDeque<Transmit>,
    free_bufs: Vec<Vec<u8>>,
    scratch: Vec<u8>,
    events: VecDeque<AgentEvent>,
    counters: AgentCounters,
}

impl std::fmt::Debug for AgentState {
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
    /// An agent with no tunnel and no mapping; packet mode uses [`AgentNat`].
    pub fn new(config: AgentConfig, now: Instant) -> Self {
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
            rng: config.seed | 1,
            applied_version: None,
            desired_tunnel: None,
            peer: None,
            mappings: BTreeMap::new(),
            revoked: std::collections::BTreeSet::new(),
            nat,
            transmits: VecDeque::new(),
            free_bufs: Vec::new(),
            scratch: vec![0; wg::buffer_len(MAX_PACKET)],
            events: VecDeque::new(),
            counters: AgentCounters::default(),
        }
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
        self.counters
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
            public_key: p.desired.public_key,
            up: p.tunnel.has_session(),
            stats: p.tunnel.stats(),
        })
    }

    /// Reconciles to `desired`. `names` holds the real address of every
    /// terminal the caller could resolve; `now` and `wall` are the same moment
    /// on the monotonic and the wall clock.
    ///
    /// Returns what was applied (errors name mappings that could not be
    /// installed), or `None` when the document is not newer than the one in
    /// force or is for another site (nothing changes then).
    pub fn handle_desired_state(
        &mut self,
        desired: &AgentDesiredState,
        names: &BTreeMap<TerminalName, Ipv4Addr>,
        now: Instant,
        wall: UnixMillis,
    ) -> Option<AppliedState> {
        if desired.site_id != self.site_id {
            tracing::warn!(
                site.id = %self.site_id,
                document.site = %desired.site_id,
                "desired state for another site ignored"
            );
            return None;
        }
        if self.applied_version.is_some_and(|v| desired.version <= v) {
            return None;
        }
        let mut errors = Vec::new();
        // What the document asks for, validated.
        let mut wanted: BTreeMap<Ipv4Addr, Mapping> = BTreeMap::new();
        let mut reals: BTreeMap<Ipv4Addr, Ipv4Addr> = BTreeMap::new();
        for m in &desired.mappings {
            if m.expires_at <= wall || self.revoked.contains(&m.request_id) {
                // Consent already over: never install it.
                continue;
            }
            if !is_unicast(m.nat_address) {
                errors.push(format!("{}: not a unicast NAT address", m.nat_address));
                continue;
            }
            let Some(&real) = names.get(&m.terminal) else {
                errors.push(format!(
                    "{}: terminal {} does not resolve on the LAN",
                    m.nat_address, m.terminal
                ));
                continue;
            };
            if let Some(other) = reals.get(&real) {
                errors.push(format!(
                    "{}: terminal {} is already mapped as {other}",
                    m.nat_address, m.terminal
                ));
                continue;
            }
            if wanted.contains_key(&m.nat_address) {
                errors.push(format!("{}: listed twice", m.nat_address));
                continue;
            }
            reals.insert(real, m.nat_address);
            wanted.insert(
                m.nat_address,
                Mapping {
                    real,
                    terminal: m.terminal.clone(),
                    request_id: m.request_id,
                    expires_wall: m.expires_at,
                    expires_at: deadline(m.expires_at, now, wall),
                },
            );
        }

        // Remove what is gone or changed first, so that a real address that
        // moves to another NAT address is free when it is inserted again.
        let stale: Vec<(Ipv4Addr, RemovedBecause)> = self
            .mappings
            .iter()
            .filter_map(|(nat, old)| match wanted.get(nat) {
                None => Some((*nat, RemovedBecause::Withdrawn)),
                Some(new) if new.real != old.real => Some((*nat, RemovedBecause::Replaced)),
                Some(_) => None,
            })
            .collect();
        for (nat, because) in stale {
            self.remove_mapping(nat, because);
        }
        for (nat, new) in wanted {
            match self.mappings.get_mut(&nat) {
                Some(old) => {
                    // Same terminal and address: the expiry or request may move.
                    if old.expires_at != new.expires_at {
                        old.expires_at = new.expires_at;
                        old.expires_wall = new.expires_wall;
                        let _ = self.nat.remove(nat);
                        if self.mode != DataMode::Netstack
                            && let Err(e) = self.nat.insert(nat, old.real, Some(old.expires_at))
                        {
                            errors.push(format!("{nat}: {e}"));
                        }
                    }
                    old.request_id = new.request_id;
                    old.terminal = new.terminal;
                }
                None => {
                    if self.mode != DataMode::Netstack
                        && let Err(e) = self.nat.insert(nat, new.real, Some(new.expires_at))
                    {
                        errors.push(format!("{nat}: {e}"));
                        continue;
                    }
                    tracing::info!(
                        nat = %nat,
                        terminal = %new.terminal,
                        request.id = %new.request_id,
                        "mapping installed"
                    );
                    tracing::debug!(nat = %nat, real = %new.real, "mapping target");
                    self.push_event(AgentEvent::MappingInstalled {
                        nat,
                        real: new.real,
                        terminal: new.terminal.clone(),
                    });
                    self.mappings.insert(nat, new);
                }
            }
        }
        self.desired_tunnel = desired.tunnel.clone();
        self.reconcile_tunnel(now);
        self.applied_version = Some(desired.version);
        Some(AppliedState {
            version: desired.version,
            errors,
        })
    }

    /// The customer ends access for request `id` here and now, whatever the
    /// server says: its mappings are removed and never installed again.
    /// Returns how many were removed.
    pub fn revoke_request(&mut self, id: RequestId, now: Instant) -> usize {
        self.revoked.insert(id);
        let gone: Vec<Ipv4Addr> = self
            .mappings
            .iter()
            .filter(|(_, m)| m.request_id == id)
            .map(|(nat, _)| *nat)
            .collect();
        for nat in &gone {
            self.remove_mapping(*nat, RemovedBecause::Revoked);
        }
        if !gone.is_empty() {
            tracing::info!(request.id = %id, mappings = gone.len(), "access ended by the customer");
            self.reconcile_tunnel(now);
        }
        gone.len()
    }

    /// Dials, re-dials or tears down the tunnel: up iff the server names a
    /// gateway and at least one mapping is in force.
    fn reconcile_tunnel(&mut self, now: Instant) {
        let want = self
            .desired_tunnel
            .clone()
            .filter(|_| !self.mappings.is_empty());
        match (&self.peer, want) {
            (Some(p), Some(w))
                if p.desired.endpoint == w.endpoint
                    && p.desired.public_key == w.public_key
                    && p.desired.persistent_keepalive_s == w.persistent_keepalive_s =>
            {
                // Same gateway; the id may be renamed without a new handshake.
                if let Some(p) = self.peer.as_mut() {
                    p.desired.gateway_id = w.gateway_id;
                }
            }
            (_, Some(w)) => {
                self.close_tunnel();
                self.dial(w, now);
            }
            (Some(_), None) => self.close_tunnel(),
            (None, None) => {}
        }
    }

    fn dial(&mut self, desired: AgentTunnel, now: Instant) {
        let index = (self.next_random() as u32) & wg::MAX_INDEX;
        let keepalive = Some(desired.persistent_keepalive_s).filter(|s| *s > 0);
        let mut tunnel = Tunnel::new(
            TunnelConfig::initiator(
                self.private_key.clone(),
                desired.public_key,
                index,
                keepalive,
            ),
            now,
        );
        tracing::info!(
            gateway.id = %desired.gateway_id,
            endpoint = %desired.endpoint,
            "dialling the gateway"
        );
        self.push_event(AgentEvent::TunnelDialled {
            gateway_id: desired.gateway_id,
            endpoint: desired.endpoint,
        });
        let dst = desired.endpoint;
        let mut scratch = std::mem::take(&mut self.scratch);
        if let Ok(Some(init)) = tunnel.initiate_handshake(&mut scratch, true, now) {
            self.queue_transmit(dst, init);
        }
        self.scratch = scratch;
        self.peer = Some(Peer { desired, tunnel });
    }

    fn close_tunnel(&mut self) {
        if let Some(p) = self.peer.take() {
            tracing::info!(gateway.id = %p.desired.gateway_id, "tunnel closed");
            self.push_event(AgentEvent::TunnelClosed {
                gateway_id: p.desired.gateway_id,
            });
        }
    }

    fn remove_mapping(&mut self, nat: Ipv4Addr, because: RemovedBecause) {
        let Some(m) = self.mappings.remove(&nat) else {
            return;
        };
        let _ = self.nat.remove(nat);
        tracing::info!(nat = %nat, terminal = %m.terminal, ?because, "mapping removed");
        self.push_event(AgentEvent::MappingRemoved {
            nat,
            real: m.real,
            terminal: m.terminal,
            because,
        });
    }

    /// Processes a datagram that arrived on the agent's socket from `from`,
    /// writing a packet for the LAN side into `out` (which must hold
    /// [`wg::buffer_len`]`(datagram.len())` bytes).
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
        let packet = match peer.tunnel.decapsulate(Some(from.ip()), datagram, out, now) {
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

    /// Tunnel → LAN: consent check and (packet mode) the NAT rewrite.
    fn inbound(&mut self, packet: &mut [u8], now: Instant) -> Result<(), DropReason> {
        let dst = ipv4_dst(packet)?;
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
    /// send into `out` (which must hold [`wg::buffer_len`]`(packet.len())` bytes).
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
    fn outbound(&mut self, packet: &mut [u8], now: Instant) -> Result<(), DropReason> {
        match self.mode {
            DataMode::Packet { .. } => self.nat.translate_outbound(packet, now),
            DataMode::Netstack => {
                let src = ipv4_src(packet)?;
                match self.mappings.get(&src) {
                    Some(m) if now < m.expires_at => Ok(()),
                    Some(_) => Err(DropReason::Expired),
                    None => Err(DropReason::UnmappedSource),
                }
            }
        }
    }

    /// Queues packets the tunnel held back and reports handshake events.
    fn after_tunnel_activity(&mut self) {
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

    /// Runs timers: WireGuard's (keepalive, rekey, retransmission) and the
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

fn is_unicast(a: Ipv4Addr) -> bool {
    !(a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback())
}

fn ipv4_dst(p: &[u8]) -> Result<Ipv4Addr, DropReason> {
    match p.first().map(|b| b >> 4) {
        Some(4) if p.len() >= 20 => Ok(Ipv4Addr::new(p[16], p[17], p[18], p[19])),
        Some(6) => Err(DropReason::NotIpv4),
        _ => Err(DropReason::Malformed),
    }
}

fn ipv4_src(p: &[u8]) -> Result<Ipv4Addr, DropReason> {
    match p.first().map(|b| b >> 4) {
        Some(4) if p.len() >= 20 => Ok(Ipv4Addr::new(p[12], p[13], p[14], p[15])),
        Some(6) => Err(DropReason::NotIpv4),
        _ => Err(DropReason::Malformed),
    }
}

/// The IPv4 header checks the NAT makes in packet mode, for netstack mode:
/// version, IHL, total length within the buffer, header checksum.
fn ipv4_check(p: &[u8]) -> Result<(), DropReason> {
    let packet = smoltcp::wire::Ipv4Packet::new_checked(p).map_err(|_| DropReason::BadHeader)?;
    if !packet.verify_checksum() {
        return Err(DropReason::BadHeader);
    }
    Ok(())
}
