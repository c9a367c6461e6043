//! The tunnel seam: what the gateway's and the agent's packet logic need from
//! "a tunnel", whatever protocol carries it.
//!
//! The packet logic ([`crate::gateway`], [`crate::agent`]) never names a
//! protocol. It talks to:
//!
//! - [`Tunnel`]: one peer's session state machine: [`Tunnel::encapsulate`]
//!   an IP packet, [`Tunnel::decapsulate`] a message from the peer, drain
//!   [`Tunnel::poll_network`] (packets held back until a handshake
//!   completed) and [`Tunnel::poll_event`], run [`Tunnel::handle_timeout`]
//!   when [`Tunnel::poll_timeout`] says. Every output is a slice of a buffer
//!   the caller passes in, so the per-packet path allocates nothing.
//! - [`Responder`]: the gateway's side of one socket shared by many peers:
//!   which peer a message is for ([`Responder::fast_index`] for the data fast
//!   path, [`Responder::classify`] for the rest, including handshake rate
//!   limiting), and a responder tunnel for a peer of a given kind.
//! - [`Kinds`]: the set of tunnel kinds a program runs, as one type parameter
//!   of [`crate::gateway::GatewayState`] and [`crate::agent::AgentState`]
//!   (static dispatch: no trait object on the packet path). [`Builtin`] is
//!   the product's set; the tests plug in a second one.
//!
//! **A kind per site.** The desired state names each peer's [`TunnelKind`]
//! (`GatewayPeer::tunnel`, `AgentTunnel::kind`); [`Responder::tunnel`] and
//! [`Kinds::initiator`] build the matching tunnel. [`Builtin`]'s tunnel is
//! the enum [`AnyTunnel`] over the kinds, its responder [`Responders`] holds
//! one classifier per kind.
//!
//! **Indices.** The gateway gives every peer a 24-bit index
//! ([`Kinds::MAX_INDEX`]) that encodes its shard and slot; a kind must carry
//! it back in every message after the first handshake message, so that
//! [`Incoming::ForIndex`] routes without crypto. WireGuard puts `index << 8`
//! in its receiver index; ESP puts it in the SPIs the gateway chooses. IKEv2
//! cannot: the responder SPI is chosen at IKE_SA_INIT, before the peer is
//! known, so the IPsec responder routes IKE by a map of responder SPIs and
//! finds the peer of a new IKE SA by the identity it authenticated
//! ([`Incoming::Authenticated`], see [`ipsec`]).
//!
//! **Adding a kind** (ESP with IKEv2, a TLS stream carrier): a variant of
//! [`TunnelKind`], of [`AnyTunnel`] and a classifier in [`Responders`]. The
//! packet logic stays as it is.
//!
//! [`wireguard`] is the first kind: boringtun's noise layer. [`ipsec`] is the
//! second: IKEv2 and ESP from [`crate::ipsec`]; [`Builtin`] carries it but
//! admits it ([`Kinds::KINDS`]) only as [`BuiltinIpsec`], which the programs
//! run when their IO serves UDP 500 and 4500. The seam and the kinds are
//! described in docs/DESIGN.md, "Tunnels".

pub mod admission;
pub mod ipsec;
pub mod wireguard;

#[cfg(test)]
pub(crate) mod null;
#[cfg(test)]
pub(crate) mod testing;

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub use self::wireguard::PrivateKey;
pub use crate::messages::TunnelKind;
use crate::messages::{AgentTunnel, GatewayPeer, PublicKey};

/// How a kind frames its messages on the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// One message per UDP datagram (WireGuard, ESP-in-UDP, IKEv2).
    Datagram,
    /// Messages inside a byte stream (a TLS carrier): the IO shell must cut
    /// the stream into messages before [`Tunnel::decapsulate`].
    Stream,
}

impl TunnelKind {
    /// How this kind frames its messages.
    pub fn framing(self) -> Framing {
        match self {
            TunnelKind::Wireguard | TunnelKind::Ipsec => Framing::Datagram,
        }
    }
}

/// Why a tunnel operation produced no packet. Every variant is a reason to
/// drop the input and count it; none is fatal to the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, thiserror::Error)]
pub enum Error {
    /// The caller's output buffer is shorter than [`Kinds::buffer_len`] of the input.
    #[error("output buffer too small")]
    BufferTooSmall,
    /// Not a message of the tunnel's kind (wrong type or length) or an inner
    /// packet that is neither IPv4 nor IPv6.
    #[error("malformed packet")]
    Malformed,
    /// mac1 did not verify: not addressed to our public key.
    #[error("invalid mac1")]
    InvalidMac,
    /// Authentication of the message failed (AEAD tag, static key, timestamp).
    #[error("authentication failed")]
    AuthenticationFailed,
    /// A replayed or too-old counter or handshake timestamp.
    #[error("replayed message")]
    Replay,
    /// The message belongs to no current session or handshake of this tunnel.
    #[error("no session for this message")]
    NoSession,
    /// Handshakes arrive faster than the rate limit and the sender has no address
    /// to send a cookie to.
    #[error("under load")]
    UnderLoad,
    /// Under load, a source address (IPv6: its /64) that proved it owns the
    /// address sends more initiations than its share ([`admission`]).
    #[error("source rate-limited")]
    RateLimited,
    /// The handshake's initiator key is not one we know.
    #[error("unknown peer")]
    UnknownPeer,
    /// An inner packet outside the traffic selectors its SA was negotiated
    /// for (IPsec, RFC 4301 §5.2).
    #[error("outside the traffic selectors")]
    OutsideSelectors,
}

impl Error {
    /// A short stable name for metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BufferTooSmall => "buffer_too_small",
            Self::Malformed => "malformed",
            Self::InvalidMac => "invalid_mac",
            Self::AuthenticationFailed => "authentication_failed",
            Self::Replay => "replay",
            Self::NoSession => "no_session",
            Self::UnderLoad => "under_load",
            Self::RateLimited => "rate_limited",
            Self::UnknownPeer => "unknown_peer",
            Self::OutsideSelectors => "outside_selectors",
        }
    }
}

/// What [`Tunnel::decapsulate`] produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Decapsulated<'b> {
    /// An IP packet (IPv4 or IPv6, trimmed to its total length) for the tunnel
    /// interface. Mutable so that a NAT can rewrite it in place.
    Tunnel(&'b mut [u8]),
    /// A message to send back to the peer (handshake response, keepalive, cookie reply).
    Network(&'b [u8]),
    /// Nothing to send (a keepalive, a cookie reply we stored).
    Nothing,
}

/// What [`Tunnel::encapsulate`] produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Encapsulated<'b> {
    /// A datagram for the peer: the encrypted packet, or a handshake initiation
    /// when there was no session yet (the packet is then queued and comes out of
    /// [`Tunnel::poll_network`] once the handshake completes).
    Network(&'b [u8]),
    /// The packet was queued while a handshake is in progress.
    Queued,
}

/// Something the control plane or the metrics want to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEvent {
    /// A handshake completed; a new session is in use.
    HandshakeCompleted,
    /// The tunnel has had no session for so long that it gave up (responder:
    /// idle; initiator: the peer does not answer).
    Expired,
}

/// Counters of one tunnel (inner bytes, as `wg show` reports transfer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunnelStats {
    /// Inner bytes received (decrypted IP packets).
    pub rx_bytes: u64,
    /// Inner packets received.
    pub rx_packets: u64,
    /// Inner bytes sent.
    pub tx_bytes: u64,
    /// Inner packets sent.
    pub tx_packets: u64,
    /// Handshakes completed.
    pub handshakes: u64,
    /// When the last handshake completed (the caller's clock).
    pub last_handshake: Option<Instant>,
}

/// What [`Responder::classify`] found a datagram to be.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'b> {
    /// A handshake initiation from the holder of `peer_public_key`. Feed the
    /// datagram to that peer's [`Tunnel::decapsulate`].
    Initiation {
        /// The initiator's static public key.
        peer_public_key: PublicKey,
    },
    /// A message for the tunnel created with this index (handshake response,
    /// cookie reply, data).
    ForIndex(u32),
    /// A stateless answer to send back to the sender, routing nothing: under
    /// load, a cookie reply that makes the initiator prove its address
    /// (WireGuard paper §5.4.7; IKEv2's COOKIE notification, RFC 7296 §2.6).
    CookieReply(&'b [u8]),
    /// An answer of the responder itself, before any peer is known (IKEv2:
    /// the IKE_SA_INIT response of a half-open SA the responder keeps, or
    /// the refusal of an IKE_AUTH). Send it back to the sender.
    Reply(&'b [u8]),
    /// The responder authenticated a peer that presented `identity` (IKEv2's
    /// IDi, RFC 7296 §2.15; an IPsec site's `site-N.vpnnat`): feed the
    /// datagram to that peer's [`Tunnel::decapsulate`], which takes the
    /// authenticated session over and answers.
    Authenticated {
        /// The identity, as the desired state names it
        /// ([`crate::messages::IpsecParams::remote_id`]).
        identity: &'b str,
    },
    /// Handled, nothing to send and no peer concerned (a NAT keepalive,
    /// RFC 3948 §2.3).
    Consumed,
}

/// One peer's tunnel: a session state machine of some kind.
///
/// Contract shared by all kinds: outputs are slices of the caller's buffer;
/// a buffer shorter than [`Kinds::buffer_len`] of the input is
/// [`Error::BufferTooSmall`], never a panic; after a handshake message the
/// caller drains [`Self::poll_network`] and [`Self::poll_event`].
pub trait Tunnel: fmt::Debug + Send {
    /// Whether a session is established (data flows without a handshake).
    fn has_session(&self) -> bool;

    /// Counters so far.
    fn stats(&self) -> TunnelStats;

    /// Starts a handshake now unless one is in progress (`force` restarts
    /// it). Returns the first handshake message to send.
    ///
    /// # Errors
    /// [`Error::BufferTooSmall`] for a short `buf`.
    fn initiate_handshake<'b>(
        &mut self,
        buf: &'b mut [u8],
        force: bool,
        now: Instant,
    ) -> Result<Option<&'b [u8]>, Error>;

    /// Protects one IP packet from the tunnel interface.
    ///
    /// # Errors
    /// Why the packet was dropped.
    fn encapsulate<'b>(
        &mut self,
        packet: &[u8],
        buf: &'b mut [u8],
        now: Instant,
    ) -> Result<Encapsulated<'b>, Error>;

    /// Processes one message from the peer. `from` is its source address and
    /// port (for stateless replies under load and NAT detection), `None`
    /// when unknown.
    ///
    /// # Errors
    /// Why the message was dropped.
    fn decapsulate<'b>(
        &mut self,
        from: Option<SocketAddr>,
        datagram: &[u8],
        buf: &'b mut [u8],
        now: Instant,
    ) -> Result<Decapsulated<'b>, Error>;

    /// The next message held back until a session existed, if any.
    fn poll_network<'b>(&mut self, buf: &'b mut [u8]) -> Option<&'b [u8]>;

    /// When [`Self::handle_timeout`] wants to run next.
    fn poll_timeout(&self) -> Instant;

    /// Runs the kind's timers (rekey, keepalive, retransmission, expiry).
    /// Returns a message to send, if any.
    ///
    /// # Errors
    /// [`Error::BufferTooSmall`] for a short `buf`.
    fn handle_timeout<'b>(
        &mut self,
        buf: &'b mut [u8],
        now: Instant,
    ) -> Result<Option<&'b [u8]>, Error>;

    /// The next event, if any.
    fn poll_event(&mut self) -> Option<TunnelEvent>;
}

/// The gateway's side of one socket shared by many peers: routes incoming
/// messages to peers and builds responder tunnels.
pub trait Responder: fmt::Debug + Send + Sized {
    /// The tunnels it builds.
    type Tunnel: Tunnel;

    /// A responder for `private_key` that demands proof of return
    /// reachability (cookies) above `handshake_limit` handshake initiations
    /// per second.
    fn new(private_key: PrivateKey, handshake_limit: u64) -> Self;

    /// Another responder for the same gateway (another worker's socket)
    /// that shares this one's admission: cookies either gives are valid at
    /// both, and initiations count against one limit.
    fn share(&self) -> Self;

    /// The peer index of a data message, without any other check (the fast
    /// path of a batch); `None` for anything else.
    fn fast_index(datagram: &[u8]) -> Option<u32>;

    /// Works out which peer a message is for (see [`Incoming`]).
    ///
    /// # Errors
    /// Why the message was dropped before reaching any peer.
    fn classify<'b>(
        &mut self,
        from: Option<SocketAddr>,
        datagram: &[u8],
        buf: &'b mut [u8],
        now: Instant,
    ) -> Result<Incoming<'b>, Error>;

    /// Starts (or, with `None`, abandons) a rotation of the gateway's
    /// static key: initiations addressed to `next` are answered as well as
    /// those to the current key. Kinds without a static key ignore it.
    fn set_next_key(&mut self, next: Option<PrivateKey>) {
        let _ = next;
    }

    /// Takes the next key of `from`, a responder of the same gateway
    /// ([`Self::share`]), with its cookie secrets: how every other worker
    /// gets a next key one worker set, so that a cookie one gave for it is
    /// valid at all (as for the current key).
    fn adopt_next_key(&mut self, from: &Self) {
        let _ = from;
    }

    /// Ends a key rotation: the next key becomes the current one. `false`
    /// when there is none.
    fn promote_next_key(&mut self) -> bool {
        false
    }

    /// Whether `datagram` is a handshake initiation addressed to the next
    /// key (see [`Self::set_next_key`]).
    fn addresses_next_key(&self, datagram: &[u8]) -> bool {
        let _ = datagram;
        false
    }

    /// [`Self::tunnel`] holding the next key instead of the current one;
    /// `None` without a next key or for a kind without static keys.
    fn next_key_tunnel(
        &self,
        peer: &GatewayPeer,
        index: u32,
        now: Instant,
    ) -> Option<Self::Tunnel> {
        let _ = (peer, index, now);
        None
    }

    /// [`Self::classify`] for a message that a responder sharing this one
    /// ([`Self::share`]) already classified and admitted (another worker
    /// received it and handed it over): routed without counting or checking
    /// it against the handshake limits again.
    ///
    /// # Errors
    /// Why the message was dropped before reaching any peer.
    fn classify_admitted<'b>(
        &mut self,
        datagram: &[u8],
        buf: &'b mut [u8],
    ) -> Result<Incoming<'b>, Error>;

    /// Whether a message that the addressed tunnel accepted proves that its
    /// sender holds the session (so the peer's endpoint may move to it).
    fn proves_sender(datagram: &[u8]) -> bool;

    /// A responder tunnel for `peer` (of its kind, `peer.tunnel`), carrying
    /// `index`; `None` for a kind outside the set ([`Kinds::KINDS`]) or a
    /// peer whose parameters do not fit its kind (an IPsec peer without
    /// usable [`crate::messages::IpsecParams`]).
    fn tunnel(&self, peer: &GatewayPeer, index: u32, now: Instant) -> Option<Self::Tunnel>;
}

/// A set of tunnel kinds a program runs: the type parameter of the gateway's
/// and the agent's state.
pub trait Kinds: 'static {
    /// A tunnel of any kind in the set.
    type Tunnel: Tunnel;
    /// The gateway-side classifier for every kind in the set.
    type Responder: Responder<Tunnel = Self::Tunnel>;

    /// The kinds in the set. The gateway registers them, refuses peers of
    /// other kinds (an error of its applied state) and the agent refuses a
    /// tunnel of another kind, before either asks for a tunnel.
    const KINDS: &'static [TunnelKind];

    /// How often the tunnels' timers want to run.
    const TIMER_TICK: Duration;

    /// The largest peer index a tunnel can carry.
    const MAX_INDEX: u32;

    /// The most bytes a data message of any kind in the set adds to the
    /// packet it carries (the IO layer sizes its send buffers with it).
    const DATA_OVERHEAD: usize;

    /// The size of an output buffer that fits any result for an input of up
    /// to `packet_len` bytes, for every kind in the set.
    fn buffer_len(packet_len: usize) -> usize;

    /// An initiator tunnel of `desired.kind` to the gateway `desired`
    /// names (its key, endpoint, keepalive interval, IPsec parameters);
    /// `None` for a kind outside the set ([`Self::KINDS`]) or parameters
    /// that do not fit the kind.
    fn initiator(
        desired: &AgentTunnel,
        private_key: PrivateKey,
        index: u32,
        now: Instant,
    ) -> Option<Self::Tunnel>;
}

/// The WireGuard-only set. Its tunnel ([`AnyTunnel`]) and responder
/// ([`Responders`]) carry WireGuard and IPsec (IKEv2 with ESP), but
/// [`Kinds::KINDS`] names WireGuard only: for a gateway that does not bind
/// UDP 500 and 4500 (it registers its kinds with the server, which places
/// IPsec sites only on gateways that name IPsec, and an agent refuses a
/// kind outside them). [`BuiltinIpsec`] is the same set with IPsec
/// admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Builtin;

/// A tunnel of one of the [`Builtin`] kinds.
// Unboxed although the kinds differ in size: a tunnel lives in its peer's
// slot for the peer's lifetime and is never moved on the packet path, so a
// box would only add an indirection per packet.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum AnyTunnel {
    /// WireGuard.
    Wireguard(wireguard::Tunnel),
    /// IPsec.
    Ipsec(ipsec::Tunnel),
}

/// Forwards a call to the tunnel of whatever kind.
macro_rules! any_tunnel {
    ($self:expr, $t:ident => $e:expr) => {
        match $self {
            AnyTunnel::Wireguard($t) => $e,
            AnyTunnel::Ipsec($t) => $e,
        }
    };
}

impl Tunnel for AnyTunnel {
    fn has_session(&self) -> bool {
        any_tunnel!(self, t => t.has_session())
    }
    fn stats(&self) -> TunnelStats {
        any_tunnel!(self, t => t.stats())
    }
    fn initiate_handshake<'b>(
        &mut self,
        buf: &'b mut [u8],
        force: bool,
        now: Instant,
    ) -> Result<Option<&'b [u8]>, Error> {
        any_tunnel!(self, t => t.initiate_handshake(buf, force, now))
    }
    #[inline]
    fn encapsulate<'b>(
        &mut self,
        packet: &[u8],
        buf: &'b mut [u8],
        now: Instant,
    ) -> Result<Encapsulated<'b>, Error> {
        any_tunnel!(self, t => t.encapsulate(packet, buf, now))
    }
    #[inline]
    fn decapsulate<'b>(
        &mut self,
        from: Option<SocketAddr>,
        datagram: &[u8],
        buf: &'b mut [u8],
        now: Instant,
    ) -> Result<Decapsulated<'b>, Error> {
        any_tunnel!(self, t => Tunnel::decapsulate(t, from, datagram, buf, now))
    }
    fn poll_network<'b>(&mut self, buf: &'b mut [u8]) -> Option<&'b [u8]> {
        any_tunnel!(self, t => t.poll_network(buf))
    }
    fn poll_timeout(&self) -> Instant {
        any_tunnel!(self, t => t.poll_timeout())
    }
    fn handle_timeout<'b>(
        &mut self,
        buf: &'b mut [u8],
        now: Instant,
    ) -> Result<Option<&'b [u8]>, Error> {
        any_tunnel!(self, t => Tunnel::handle_timeout(t, buf, now))
    }
    fn poll_event(&mut self) -> Option<TunnelEvent> {
        any_tunnel!(self, t => t.poll_event())
    }
}

/// The [`Builtin`] kinds' classifiers for one gateway. [`Self::classify`]
/// picks the classifier by the message's shape: a WireGuard message starts
/// with its type 1–4 and three zero bytes, which no IPsec datagram at the
/// seam does ([`ipsec::looks_like_wireguard`]).
#[derive(Debug)]
pub struct Responders {
    wireguard: wireguard::Responder,
    ipsec: ipsec::Responder,
}

impl Responders {
    /// The WireGuard classifier.
    pub fn wireguard(&self) -> &wireguard::Responder {
        &self.wireguard
    }

    /// The IPsec classifier.
    pub fn ipsec(&self) -> &ipsec::Responder {
        &self.ipsec
    }
}

impl Responder for Responders {
    type Tunnel = AnyTunnel;

    fn new(private_key: PrivateKey, handshake_limit: u64) -> Self {
        Self {
            wireguard: wireguard::Responder::new(private_key, handshake_limit),
            ipsec: ipsec::Responder::new(ipsec::Settings::default()),
        }
    }

    fn share(&self) -> Self {
        Self {
            wireguard: self.wireguard.share(),
            ipsec: self.ipsec.clone(),
        }
    }

    #[inline]
    fn fast_index(datagram: &[u8]) -> Option<u32> {
        if ipsec::looks_like_wireguard(datagram) {
            wireguard::Responder::data_receiver_index(datagram)
        } else {
            ipsec::Responder::fast_index(datagram)
        }
    }

    fn classify<'b>(
        &mut self,
        from: Option<SocketAddr>,
        datagram: &[u8],
        buf: &'b mut [u8],
        now: Instant,
    ) -> Result<Incoming<'b>, Error> {
        if ipsec::looks_like_wireguard(datagram) {
            self.wireguard
                .classify(from.map(|a| a.ip()), datagram, buf, now)
        } else {
            self.ipsec.classify(from, datagram, buf, now, false)
        }
    }

    fn classify_admitted<'b>(
        &mut self,
        datagram: &[u8],
        buf: &'b mut [u8],
    ) -> Result<Incoming<'b>, Error> {
        if ipsec::looks_like_wireguard(datagram) {
            self.wireguard.classify_admitted(datagram, buf)
        } else {
            // A handed-over IPsec message is an IKE_AUTH (or later) whose SA
            // is already known; the source only matters for new SAs.
            self.ipsec.classify_admitted(datagram, buf)
        }
    }

    #[inline]
    fn proves_sender(datagram: &[u8]) -> bool {
        if ipsec::looks_like_wireguard(datagram) {
            wireguard::Responder::proves_sender(datagram)
        } else {
            ipsec::Responder::proves_sender(datagram)
        }
    }

    fn set_next_key(&mut self, next: Option<PrivateKey>) {
        self.wireguard.set_next_key(next);
    }

    fn adopt_next_key(&mut self, from: &Self) {
        self.wireguard.adopt_next_key(&from.wireguard);
    }

    fn promote_next_key(&mut self) -> bool {
        self.wireguard.promote_next_key()
    }

    fn addresses_next_key(&self, datagram: &[u8]) -> bool {
        self.wireguard.addresses_next_key(datagram)
    }

    fn next_key_tunnel(&self, peer: &GatewayPeer, index: u32, now: Instant) -> Option<AnyTunnel> {
        let next = self.wireguard.next_private_key()?;
        let next_public_key = self.wireguard.next_public_key()?;
        match peer.tunnel {
            TunnelKind::Wireguard => Some(AnyTunnel::Wireguard(wireguard::Tunnel::new(
                wireguard::TunnelConfig {
                    limiter: self.wireguard.limiter_for(&next_public_key),
                    ..wireguard::TunnelConfig::responder(next.clone(), peer.public_key, index)
                },
                now,
            ))),
            // IPsec peers authenticate with their own credentials, not the
            // gateway's WireGuard key.
            TunnelKind::Ipsec => None,
        }
    }

    fn tunnel(&self, peer: &GatewayPeer, index: u32, now: Instant) -> Option<AnyTunnel> {
        match peer.tunnel {
            TunnelKind::Wireguard => Some(AnyTunnel::Wireguard(wireguard::Tunnel::new(
                wireguard::TunnelConfig {
                    limiter: Some(self.wireguard.limiter()),
                    ..wireguard::TunnelConfig::responder(
                        self.wireguard.private_key().clone(),
                        peer.public_key,
                        index,
                    )
                },
                now,
            ))),
            TunnelKind::Ipsec => {
                let params = peer.ipsec.as_ref()?;
                let t = self.ipsec.ipsec_tunnel(params, index, now).ok()?;
                Some(AnyTunnel::Ipsec(t))
            }
        }
    }
}

impl Kinds for Builtin {
    type Tunnel = AnyTunnel;
    type Responder = Responders;

    const KINDS: &'static [TunnelKind] = &[TunnelKind::Wireguard];
    const TIMER_TICK: Duration = wireguard::TIMER_TICK;
    const MAX_INDEX: u32 = min_u32(wireguard::MAX_INDEX, crate::ipsec::esp::spi::MAX_INDEX);
    const DATA_OVERHEAD: usize = max_usize(wireguard::DATA_OVERHEAD, ipsec::DATA_OVERHEAD);

    #[inline]
    fn buffer_len(packet_len: usize) -> usize {
        builtin_buffer_len(packet_len)
    }

    fn initiator(
        desired: &AgentTunnel,
        private_key: PrivateKey,
        index: u32,
        now: Instant,
    ) -> Option<AnyTunnel> {
        match desired.kind {
            TunnelKind::Wireguard => {
                let keepalive_s = Some(desired.persistent_keepalive_s).filter(|s| *s > 0);
                Some(AnyTunnel::Wireguard(wireguard::Tunnel::new(
                    wireguard::TunnelConfig::initiator(
                        private_key,
                        desired.public_key,
                        index,
                        keepalive_s,
                    ),
                    now,
                )))
            }
            TunnelKind::Ipsec => {
                let params = desired.ipsec.as_ref()?;
                let config = ipsec::Tunnel::initiator_config(params).ok()?;
                Some(AnyTunnel::Ipsec(ipsec::Tunnel::initiator(
                    config,
                    desired.endpoint,
                    index,
                    ipsec::Settings::default().for_site(params),
                    now,
                )))
            }
        }
    }
}

/// [`Kinds::buffer_len`] of [`Builtin`], for constants.
pub const fn builtin_buffer_len(packet_len: usize) -> usize {
    max_usize(
        wireguard::buffer_len(packet_len),
        ipsec::buffer_len(packet_len),
    )
}

const fn min_u32(a: u32, b: u32) -> u32 {
    if a < b { a } else { b }
}

const fn max_usize(a: usize, b: usize) -> usize {
    if a > b { a } else { b }
}

/// [`Builtin`] with IPsec admitted ([`Kinds::KINDS`] names both kinds): the
/// same tunnels and responder, for programs whose IO serves UDP 500 and
/// 4500 (see [`ipsec`]) and for the core's tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BuiltinIpsec;

impl Kinds for BuiltinIpsec {
    type Tunnel = AnyTunnel;
    type Responder = Responders;

    const KINDS: &'static [TunnelKind] = &[TunnelKind::Wireguard, TunnelKind::Ipsec];
    const TIMER_TICK: Duration = Builtin::TIMER_TICK;
    const MAX_INDEX: u32 = Builtin::MAX_INDEX;
    const DATA_OVERHEAD: usize = Builtin::DATA_OVERHEAD;

    #[inline]
    fn buffer_len(packet_len: usize) -> usize {
        Builtin::buffer_len(packet_len)
    }

    fn initiator(
        desired: &AgentTunnel,
        private_key: PrivateKey,
        index: u32,
        now: Instant,
    ) -> Option<AnyTunnel> {
        Builtin::initiator(desired, private_key, index, now)
    }
}
