//! The WireGuard kind of [`super::Tunnel`], on top of boringtun's noise
//! layer: the one wrapper around [`boringtun::noise::Tunn`] that the gateway
//! and the router agent share.
//!
//! boringtun's `Tunn` is a point-to-point WireGuard state machine with a few
//! rules a caller must know; this module keeps them in one place so that the
//! event loops never match on `TunnResult`:
//!
//! - Output buffers must be at least `src.len() + 32` and at least 148 bytes,
//!   or boringtun panics. Here a short buffer is an [`Error::BufferTooSmall`];
//!   [`buffer_len`] computes the size to allocate once.
//! - After a handshake message, packets that were queued while no session
//!   existed must be flushed by calling `decapsulate(None, &[])` until it says
//!   `Done`. Here they are drained like any other output with
//!   [`Tunnel::poll_network`].
//! - `update_timers` must run a few times a second. [`Tunnel::poll_timeout`]
//!   says when, [`Tunnel::handle_timeout`] does it.
//! - A responder that has had no session for 540 s (3 × Reject-After-Time,
//!   WireGuard paper §6.1) reports `ConnectionExpired` forever after. For a
//!   responder that only means "idle" (the initiator will start a new
//!   handshake when it has something to say); for an initiator with a
//!   persistent keepalive it means the handshake attempts gave up, and this
//!   wrapper starts a new one after the keepalive interval so that an agent
//!   keeps dialling its gateway.
//!
//! Many peers behind one UDP socket (the gateway) need to know which peer a
//! datagram is for before any `Tunn` sees it: [`Responder::classify`] checks a
//! handshake initiation's mac1 under a shared rate limiter (answering with a
//! cookie reply under load, WireGuard paper §5.4.7), recovers the initiator's
//! static public key, and routes every other message by the receiver index
//! that the addressed `Tunn` chose (`index << 8`, see [`Tunnel::new`]).
//!
//! **Time.** boringtun 0.7 reads the monotonic clock itself (it has no
//! `*_at(now)` variants); the `now` parameters here drive only this wrapper's
//! scheduling and the timestamps it reports. Tests therefore run on real time.
//! boringtun also logs an idle responder's expiry at `ERROR` (target
//! `boringtun::noise::timers`); programs lower that target in their log filter.
//!
//! No allocation per packet: every output is a slice of a buffer the caller
//! passes in. (boringtun itself allocates only to queue packets sent before
//! the first handshake completes.)
//!
//! ```
//! use std::time::Instant;
//! use vpnnat::tunnel::wireguard::{buffer_len, PrivateKey, Tunnel, TunnelConfig};
//! use vpnnat::tunnel::{Decapsulated, Encapsulated};
//!
//! let now = Instant::now();
//! let (a_key, b_key) = (PrivateKey::from_bytes([1; 32]), PrivateKey::from_bytes([2; 32]));
//! let mut a = Tunnel::new(TunnelConfig::initiator(a_key.clone(), b_key.public_key(), 1, None), now);
//! let mut b = Tunnel::new(TunnelConfig::responder(b_key, a_key.public_key(), 2), now);
//! let mut buf = vec![0; buffer_len(1500)];
//! let mut reply = vec![0; buffer_len(1500)];
//!
//! // a → b: initiation; b → a: response; a → b: keepalive that confirms the session.
//! let init = a.initiate_handshake(&mut buf, false, now).unwrap().unwrap().to_vec();
//! let Decapsulated::Network(resp) = b.decapsulate(None, &init, &mut reply, now).unwrap() else { panic!() };
//! let Decapsulated::Network(keepalive) = a.decapsulate(None, resp, &mut buf, now).unwrap() else { panic!() };
//! assert!(matches!(b.decapsulate(None, keepalive, &mut reply, now).unwrap(), Decapsulated::Nothing));
//!
//! // An IPv4 packet from a's interface arrives at b's interface.
//! let ip = [0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2];
//! let Encapsulated::Network(datagram) = a.encapsulate(&ip, &mut buf, now).unwrap() else { panic!() };
//! let Decapsulated::Tunnel(packet) = b.decapsulate(None, datagram, &mut reply, now).unwrap() else { panic!() };
//! assert_eq!(packet, &ip[..]);
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;

use super::admission::Admission;
use super::{Decapsulated, Encapsulated, Error, Incoming, TunnelEvent, TunnelStats};
use crate::messages::{InvalidKey, PublicKey};

/// Bytes a data message adds to an IP packet: type, receiver index, counter
/// (16) and the Poly1305 tag (16).
pub const DATA_OVERHEAD: usize = 32;

/// The smallest output buffer boringtun accepts: a handshake initiation.
pub const MIN_BUFFER_LEN: usize = 148;

/// How often boringtun's timers want to run (its own device loop uses 250 ms).
pub const TIMER_TICK: Duration = Duration::from_millis(250);

/// Indices a [`Tunnel`] may be given: boringtun keeps `index << 8` in a `u32`.
pub const MAX_INDEX: u32 = (1 << 24) - 1;

/// The size of an output buffer that fits any result for an input of up to
/// `packet_len` bytes.
pub const fn buffer_len(packet_len: usize) -> usize {
    let n = packet_len + DATA_OVERHEAD;
    if n < MIN_BUFFER_LEN {
        MIN_BUFFER_LEN
    } else {
        n
    }
}

/// A Curve25519 private key. Its `Debug` never shows it.
#[derive(Clone)]
pub struct PrivateKey(x25519::StaticSecret);

impl PrivateKey {
    /// A key from 32 bytes (clamped as X25519 requires). Generate them from a
    /// CSPRNG; the core takes randomness as input.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(x25519::StaticSecret::from(bytes))
    }

    /// The 32 bytes, e.g. to store the key.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The standard base64 form, as `wg genkey` prints it.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0.to_bytes())
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519::PublicKey::from(&self.0).to_bytes())
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(<redacted>, public {})", self.public_key())
    }
}

impl FromStr for PrivateKey {
    type Err = InvalidKey;
    /// Parses the base64 form `wg genkey` prints (surrounding whitespace is ignored).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = BASE64.decode(s.trim()).map_err(|_| InvalidKey)?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| InvalidKey)?;
        Ok(Self::from_bytes(key))
    }
}

impl From<WireGuardError> for Error {
    fn from(e: WireGuardError) -> Self {
        match e {
            WireGuardError::DestinationBufferTooSmall => Self::BufferTooSmall,
            WireGuardError::IncorrectPacketLength
            | WireGuardError::WrongPacketType
            | WireGuardError::InvalidPacket => Self::Malformed,
            WireGuardError::InvalidMac => Self::InvalidMac,
            WireGuardError::WrongKey
            | WireGuardError::InvalidAeadTag
            | WireGuardError::InvalidTai64nTimestamp => Self::AuthenticationFailed,
            WireGuardError::InvalidCounter
            | WireGuardError::DuplicateCounter
            | WireGuardError::WrongTai64nTimestamp => Self::Replay,
            WireGuardError::UnexpectedPacket
            | WireGuardError::WrongIndex
            | WireGuardError::NoCurrentSession
            | WireGuardError::ConnectionExpired
            | WireGuardError::LockFailed => Self::NoSession,
            WireGuardError::UnderLoad => Self::UnderLoad,
        }
    }
}

/// Which side dials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sends the first handshake and keeps the path open (the router agent).
    Initiator {
        /// Persistent keepalive interval in seconds (WireGuard's
        /// `PersistentKeepalive`); `None` for none.
        persistent_keepalive_s: Option<u16>,
    },
    /// Only answers handshakes (the gateway).
    Responder,
}

/// How to build a [`Tunnel`].
#[derive(Clone)]
pub struct TunnelConfig {
    /// Our static private key.
    pub private_key: PrivateKey,
    /// The peer's static public key.
    pub peer_public_key: PublicKey,
    /// Optional pre-shared key (WireGuard's `PresharedKey`).
    pub preshared_key: Option<[u8; 32]>,
    /// Which side dials.
    pub role: Role,
    /// Our index for this tunnel, at most [`MAX_INDEX`]. Every message the peer
    /// sends to this tunnel (except the first initiation) carries
    /// `index << 8 | session` as its receiver index, so a responder with many
    /// tunnels on one socket routes by `receiver_index >> 8`.
    pub index: u32,
    /// The mac1 check of a responder's tunnels ([`Responder::limiter`]),
    /// which leaves admission to the [`Responder`]; `None` for a tunnel with
    /// boringtun's own rate limiter.
    pub limiter: Option<HandshakeLimiter>,
}

impl fmt::Debug for TunnelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunnelConfig")
            .field("public_key", &self.private_key.public_key())
            .field("peer_public_key", &self.peer_public_key)
            .field("preshared_key", &self.preshared_key.map(|_| "<redacted>"))
            .field("role", &self.role)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl TunnelConfig {
    /// An initiator with an optional persistent keepalive, its own rate limiter and no PSK.
    pub fn initiator(
        private_key: PrivateKey,
        peer_public_key: PublicKey,
        index: u32,
        persistent_keepalive_s: Option<u16>,
    ) -> Self {
        Self {
            private_key,
            peer_public_key,
            preshared_key: None,
            role: Role::Initiator {
                persistent_keepalive_s,
            },
            index,
            limiter: None,
        }
    }

    /// A responder with its own rate limiter and no PSK.
    pub fn responder(private_key: PrivateKey, peer_public_key: PublicKey, index: u32) -> Self {
        Self {
            private_key,
            peer_public_key,
            preshared_key: None,
            role: Role::Responder,
            index,
            limiter: None,
        }
    }
}

const TYPE_HANDSHAKE_INIT: u8 = 1;
const TYPE_HANDSHAKE_RESPONSE: u8 = 2;
const TYPE_COOKIE_REPLY: u8 = 3;
const TYPE_DATA: u8 = 4;
const HANDSHAKE_RESPONSE_LEN: usize = 92;
/// Bound on undrained events: a slow consumer loses old events, never memory.
const MAX_EVENTS: usize = 16;

/// One WireGuard tunnel to one peer. See the module docs for the rules it hides.
pub struct Tunnel {
    tunn: Tunn,
    role: Role,
    index: u32,
    peer_public_key: PublicKey,
    /// The largest packet queued in boringtun while there was no session;
    /// `None` when its queue is known to be empty.
    queued_max: Option<usize>,
    next_tick: Instant,
    expired: bool,
    /// For an expired initiator with keepalive: when to dial again.
    redial_at: Option<Instant>,
    stats: TunnelStats,
    events: VecDeque<TunnelEvent>,
}

impl fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tunnel")
            .field("peer", &self.peer_public_key)
            .field("role", &self.role)
            .field("index", &self.index)
            .field("expired", &self.expired)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Tunnel {
    /// A tunnel with no session yet.
    ///
    /// # Panics
    /// When `config.index` exceeds [`MAX_INDEX`] (a caller bug: indices are
    /// allocated by the caller from a 24-bit space).
    pub fn new(config: TunnelConfig, now: Instant) -> Self {
        assert!(config.index <= MAX_INDEX, "tunnel index exceeds 24 bits");
        let keepalive = match config.role {
            Role::Initiator {
                persistent_keepalive_s,
            } => persistent_keepalive_s.filter(|s| *s > 0),
            Role::Responder => None,
        };
        let tunn = Tunn::new(
            config.private_key.0,
            x25519::PublicKey::from(config.peer_public_key.0),
            config.preshared_key,
            keepalive,
            config.index,
            config.limiter.map(|l| l.0),
        );
        Self {
            tunn,
            role: config.role,
            index: config.index,
            peer_public_key: config.peer_public_key,
            queued_max: None,
            next_tick: now + TIMER_TICK,
            expired: false,
            redial_at: None,
            stats: TunnelStats::default(),
            events: VecDeque::new(),
        }
    }

    /// The peer's static public key.
    pub fn peer_public_key(&self) -> PublicKey {
        self.peer_public_key
    }

    /// The index this tunnel was created with.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Counters so far.
    pub fn stats(&self) -> TunnelStats {
        self.stats
    }

    /// Whether a session is established (data can flow without a handshake).
    pub fn has_session(&self) -> bool {
        self.tunn.time_since_last_handshake().is_some()
    }

    /// Starts a handshake now unless one is in progress (`force` restarts it,
    /// e.g. after the peer's endpoint changed). Returns the initiation to send.
    ///
    /// # Errors
    /// [`Error::BufferTooSmall`] when `buf` is shorter than [`MIN_BUFFER_LEN`].
    pub fn initiate_handshake<'b>(
        &mut self,
        buf: &'b mut [u8],
        force: bool,
        now: Instant,
    ) -> Result<Option<&'b [u8]>, Error> {
        if buf.len() < MIN_BUFFER_LEN {
            return Err(Error::BufferTooSmall);
        }
        self.expired = false;
        self.redial_at = None;
        self.next_tick = self.next_tick.min(now + TIMER_TICK);
        match self.tunn.format_handshake_initiation(buf, force) {
            TunnResult::WriteToNetwork(p) => Ok(Some(p)),
            TunnResult::Done => Ok(None),
            TunnResult::Err(e) => Err(e.into()),
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => Ok(None),
        }
    }

    /// Encrypts one IP packet from the tunnel interface.
    ///
    /// # Errors
    /// [`Error::BufferTooSmall`] when `buf` is shorter than
    /// [`buffer_len`]`(packet.len())`.
    pub fn encapsulate<'b>(
        &mut self,
        packet: &[u8],
        buf: &'b mut [u8],
        now: Instant,
    ) -> Result<Encapsulated<'b>, Error> {
        if buf.len() < buffer_len(packet.len()) {
            return Err(Error::BufferTooSmall);
        }
        if self.expired {
            // boringtun restarts the handshake by itself; we only clear our flag.
            self.expired = false;
            self.redial_at = None;
            self.next_tick = self.next_tick.min(now + TIMER_TICK);
        }
        match self.tunn.encapsulate(packet, buf) {
            // With a session boringtun returns a data message (type 4);
            // without one it queued the packet and returns an initiation.
            TunnResult::WriteToNetwork(p) if p.first() == Some(&TYPE_DATA) => {
                self.stats.tx_bytes += packet.len() as u64;
                self.stats.tx_packets += 1;
                Ok(Encapsulated::Network(p))
            }
            TunnResult::WriteToNetwork(p) => {
                self.note_queued(packet.len());
                Ok(Encapsulated::Network(p))
            }
            TunnResult::Done => {
                self.note_queued(packet.len());
                Ok(Encapsulated::Queued)
            }
            TunnResult::Err(e) => Err(e.into()),
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                Ok(Encapsulated::Queued)
            }
        }
    }

    /// Processes one datagram from the peer. `from` is its source address
    /// (used for cookies under load); `None` when unknown.
    ///
    /// Afterwards drain [`Self::poll_network`]: a completed handshake releases
    /// packets that were queued before it.
    ///
    /// # Errors
    /// An [`Error`] saying why the datagram was dropped. A short `buf`
    /// ([`buffer_len`]`(datagram.len())`) is [`Error::BufferTooSmall`].
    pub fn decapsulate<'b>(
        &mut self,
        from: Option<IpAddr>,
        datagram: &[u8],
        buf: &'b mut [u8],
        now: Instant,
    ) -> Result<Decapsulated<'b>, Error> {
        if datagram.is_empty() {
            // boringtun reads an empty datagram as "flush the queue".
            return Err(Error::Malformed);
        }
        if buf.len() < buffer_len(datagram.len()) {
            return Err(Error::BufferTooSmall);
        }
        let kind = datagram[0];
        match self.tunn.decapsulate(from, datagram, buf) {
            TunnResult::Done => Ok(Decapsulated::Nothing),
            TunnResult::Err(e) => Err(e.into()),
            TunnResult::WriteToNetwork(p) => {
                let p: &'b [u8] = p;
                let completed = match kind {
                    // Our response (not a cookie reply) means a new session.
                    TYPE_HANDSHAKE_INIT => p.len() == HANDSHAKE_RESPONSE_LEN,
                    // boringtun answers a valid response with a keepalive.
                    TYPE_HANDSHAKE_RESPONSE => true,
                    _ => false,
                };
                if completed {
                    self.on_handshake(now);
                }
                Ok(Decapsulated::Network(p))
            }
            TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
                self.stats.rx_bytes += p.len() as u64;
                self.stats.rx_packets += 1;
                Ok(Decapsulated::Tunnel(p))
            }
        }
    }

    /// The next queued datagram for the peer, if any: packets encapsulated
    /// before the session existed, released once it is up. Call until `None`
    /// after [`Self::decapsulate`].
    ///
    /// `buf` must hold [`buffer_len`] of the largest packet the caller
    /// encapsulates; a shorter one leaves the queue for a later call.
    pub fn poll_network<'b>(&mut self, buf: &'b mut [u8]) -> Option<&'b [u8]> {
        // boringtun panics on a buffer too short for a queued packet, so the
        // largest one queued is tracked.
        let largest = self.queued_max?;
        if buf.len() < buffer_len(largest) || !self.has_session() {
            return None;
        }
        match self.tunn.decapsulate(None, &[], buf) {
            TunnResult::WriteToNetwork(p) => {
                self.stats.tx_packets += 1;
                self.stats.tx_bytes += p.len().saturating_sub(DATA_OVERHEAD) as u64;
                Some(p)
            }
            TunnResult::Done
            | TunnResult::Err(_)
            | TunnResult::WriteToTunnelV4(..)
            | TunnResult::WriteToTunnelV6(..) => {
                self.queued_max = None;
                None
            }
        }
    }

    /// When [`Self::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Instant {
        match self.redial_at {
            Some(t) if self.expired => t.min(self.next_tick),
            _ => self.next_tick,
        }
    }

    /// Runs WireGuard's timers (rekey, keepalive, handshake retransmission,
    /// session expiry). Returns a datagram to send, if any.
    ///
    /// # Errors
    /// [`Error::BufferTooSmall`] when `buf` is shorter than [`MIN_BUFFER_LEN`].
    pub fn handle_timeout<'b>(
        &mut self,
        buf: &'b mut [u8],
        now: Instant,
    ) -> Result<Option<&'b [u8]>, Error> {
        if buf.len() < MIN_BUFFER_LEN {
            return Err(Error::BufferTooSmall);
        }
        if now < self.poll_timeout() {
            return Ok(None);
        }
        self.next_tick = now + TIMER_TICK;
        if self.expired && self.redial_at.is_some_and(|at| now >= at) {
            tracing::debug!(peer = %self.peer_public_key, "redialling after expiry");
            return self.initiate_handshake(buf, false, now);
        }
        match self.tunn.update_timers(buf) {
            TunnResult::WriteToNetwork(p) => Ok(Some(p)),
            TunnResult::Err(WireGuardError::ConnectionExpired) => {
                if !self.expired {
                    self.expired = true;
                    self.push_event(TunnelEvent::Expired);
                    if let Role::Initiator {
                        persistent_keepalive_s: Some(s),
                    } = self.role
                        && s > 0
                    {
                        self.redial_at = Some(now + Duration::from_secs(u64::from(s)));
                    }
                }
                Ok(None)
            }
            TunnResult::Err(e) => {
                tracing::trace!(peer = %self.peer_public_key, error = ?e, "timer error");
                Ok(None)
            }
            TunnResult::Done
            | TunnResult::WriteToTunnelV4(..)
            | TunnResult::WriteToTunnelV6(..) => Ok(None),
        }
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<TunnelEvent> {
        self.events.pop_front()
    }

    fn note_queued(&mut self, len: usize) {
        self.queued_max = Some(self.queued_max.unwrap_or(0).max(len));
    }

    fn on_handshake(&mut self, now: Instant) {
        self.expired = false;
        self.redial_at = None;
        self.stats.handshakes += 1;
        self.stats.last_handshake = Some(now);
        self.push_event(TunnelEvent::HandshakeCompleted);
    }

    fn push_event(&mut self, e: TunnelEvent) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }
}

impl super::Tunnel for Tunnel {
    fn has_session(&self) -> bool {
        Tunnel::has_session(self)
    }
    fn stats(&self) -> TunnelStats {
        Tunnel::stats(self)
    }
    fn initiate_handshake<'b>(
        &mut self,
        buf: &'b mut [u8],
        force: bool,
        now: Instant,
    ) -> Result<Option<&'b [u8]>, Error> {
        Tunnel::initiate_handshake(self, buf, force, now)
    }
    #[inline]
    fn encapsulate<'b>(
        &mut self,
        packet: &[u8],
        buf: &'b mut [u8],
        now: Instant,
    ) -> Result<Encapsulated<'b>, Error> {
        Tunnel::encapsulate(self, packet, buf, now)
    }
    #[inline]
    fn decapsulate<'b>(
        &mut self,
        from: Option<std::net::SocketAddr>,
        datagram: &[u8],
        buf: &'b mut [u8],
        now: Instant,
    ) -> Result<Decapsulated<'b>, Error> {
        Tunnel::decapsulate(self, from.map(|a| a.ip()), datagram, buf, now)
    }
    fn poll_network<'b>(&mut self, buf: &'b mut [u8]) -> Option<&'b [u8]> {
        Tunnel::poll_network(self, buf)
    }
    fn poll_timeout(&self) -> Instant {
        Tunnel::poll_timeout(self)
    }
    fn handle_timeout<'b>(
        &mut self,
        buf: &'b mut [u8],
        now: Instant,
    ) -> Result<Option<&'b [u8]>, Error> {
        Tunnel::handle_timeout(self, buf, now)
    }
    fn poll_event(&mut self) -> Option<TunnelEvent> {
        Tunnel::poll_event(self)
    }
}

/// The mac1 check a responder's tunnels run on an initiation (boringtun
/// checks every handshake message it is given). It never asks for a cookie:
/// the [`Responder`] admitted the initiation before the tunnel sees it, and
/// counting it again would demand a second proof (or, with a limiter per
/// worker, one the initiator cannot give).
#[derive(Clone)]
pub struct HandshakeLimiter(Arc<RateLimiter>);

impl fmt::Debug for HandshakeLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HandshakeLimiter")
    }
}

/// What every [`Responder`] of one gateway shares for one of its static
/// keys (one per worker's socket): the key, its mac1 check and its cookie
/// secrets. mac1 and the cookie reply are keyed by the responder's static
/// public key (WireGuard paper §5.4.4, §5.4.7), so a gateway answering two
/// keys during a key rotation keeps these per key.
struct KeyState {
    private_key: PrivateKey,
    public_key: x25519::PublicKey,
    /// mac1 only (never under load): for the tunnels of this key.
    mac1_only: HandshakeLimiter,
    /// The cookie secrets of this key.
    cookies: Mutex<CookieSecrets>,
}

impl KeyState {
    fn new(private_key: PrivateKey) -> Self {
        let public_key = x25519::PublicKey::from(&private_key.0);
        Self {
            mac1_only: HandshakeLimiter(Arc::new(RateLimiter::new(&public_key, u64::MAX))),
            cookies: Mutex::new(CookieSecrets::new(public_key)),
            private_key,
            public_key,
        }
    }

    /// Whether `datagram` (an initiation) carries a mac1 for this key.
    fn has_mac1(&self, datagram: &[u8], buf: &mut [u8]) -> bool {
        self.mac1_only.0.verify_packet(None, datagram, buf).is_ok()
    }
}

/// How long a cookie secret is current (WireGuard paper §5.4.7: the
/// responder's secret changes every two minutes). boringtun's limiter derives
/// a new cookie from its secret 128 s after its creation; replacing it
/// earlier keeps the change under our clock.
const COOKIE_SECRET_AGE: Duration = Duration::from_secs(120);

/// The current cookie secret and the one before. Each is a boringtun limiter
/// that is always "under load": it checks mac1 and mac2 and answers a
/// missing or stale mac2 with a cookie reply. The previous one is still
/// accepted, so that an initiator that got a cookie just before the change
/// and retries after it is not sent one more round trip (for up to 8 s,
/// until the previous limiter's own cookie changes).
struct CookieSecrets {
    public_key: x25519::PublicKey,
    current: Arc<RateLimiter>,
    previous: Option<Arc<RateLimiter>>,
    /// When `current` is due for replacement; set at the first use.
    rotate_at: Option<Instant>,
}

impl CookieSecrets {
    fn new(public_key: x25519::PublicKey) -> Self {
        Self {
            current: Arc::new(RateLimiter::new(&public_key, 0)),
            public_key,
            previous: None,
            rotate_at: None,
        }
    }

    /// The secrets to check a mac2 against at `now`: current, previous.
    fn at(&mut self, now: Instant) -> (Arc<RateLimiter>, Option<Arc<RateLimiter>>) {
        match self.rotate_at {
            None => {
                // boringtun starts its own cookie clock when a limiter is
                // built: build the first one now, so that its change falls
                // after ours.
                self.current = Arc::new(RateLimiter::new(&self.public_key, 0));
                self.rotate_at = Some(now + COOKIE_SECRET_AGE);
            }
            Some(t) if now >= t => {
                let fresh = Arc::new(RateLimiter::new(&self.public_key, 0));
                self.previous = Some(std::mem::replace(&mut self.current, fresh));
                self.rotate_at = Some(now + COOKIE_SECRET_AGE);
            }
            Some(_) => {}
        }
        (Arc::clone(&self.current), self.previous.clone())
    }
}

/// The responder side of many tunnels behind one socket: routes datagrams to
/// tunnels and admits handshakes. Several workers of one gateway each hold a
/// [`Responder::share`] of one responder, so that a cookie one of them gave
/// is valid at all of them and an initiation is counted once per gateway
/// (the worker that owns the peer takes a handed-over initiation with
/// [`Responder::classify_admitted`]).
///
/// Admission follows Linux's WireGuard (see [`super::admission`]): above
/// `handshake_limit` initiations per second (and for a second after), an
/// initiation needs a valid cookie for its source address, and each source
/// address (IPv6: /64) then gets 20 initiations per second with a burst of 5.
pub struct Responder {
    /// The current static key.
    key: Arc<KeyState>,
    /// During a key rotation, the next static key: initiations addressed to
    /// it are answered too (see [`Self::set_next_key`]).
    next: Option<Arc<KeyState>>,
    /// The load and the per-source buckets, shared by all keys: a rotation
    /// must not double what a source may send.
    admission: Arc<Mutex<Admission>>,
}

impl fmt::Debug for Responder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder")
            .field("public_key", &self.key.private_key.public_key())
            .field(
                "next_public_key",
                &self.next.as_ref().map(|k| k.private_key.public_key()),
            )
            .finish_non_exhaustive()
    }
}

impl Responder {
    /// Handshake initiations per second (per gateway) above which initiators
    /// must prove their address with a cookie (mac2).
    pub const DEFAULT_HANDSHAKE_LIMIT: u64 = 1000;

    /// A responder for `private_key` that demands cookies above `handshake_limit`
    /// initiations per second.
    pub fn new(private_key: PrivateKey, handshake_limit: u64) -> Self {
        Self {
            key: Arc::new(KeyState::new(private_key)),
            next: None,
            admission: Arc::new(Mutex::new(Admission::new(handshake_limit))),
        }
    }

    /// Another responder for the same gateway (another worker's socket): the
    /// same key, cookie secret, load and source buckets.
    pub fn share(&self) -> Self {
        Self {
            key: Arc::clone(&self.key),
            next: self.next.clone(),
            admission: Arc::clone(&self.admission),
        }
    }

    /// Our (current) private key.
    pub fn private_key(&self) -> &PrivateKey {
        &self.key.private_key
    }

    /// The next private key during a key rotation.
    pub fn next_private_key(&self) -> Option<&PrivateKey> {
        self.next.as_ref().map(|k| &k.private_key)
    }

    /// Starts a key rotation (or, with `None`, abandons it): from now on
    /// initiations addressed to `next` are answered as well as those to the
    /// current key. Each peer's tunnel must use the key its initiation
    /// addressed ([`Self::addressed_key`]). A share made before this call
    /// does not see it: set the next key on every share.
    pub fn set_next_key(&mut self, next: Option<PrivateKey>) {
        self.next = match next {
            Some(k) if k.public_key() == self.key.private_key.public_key() => None,
            Some(k) => Some(Arc::new(KeyState::new(k))),
            None => None,
        };
    }

    /// Takes the next key of `from`, a share of this gateway's responder,
    /// with its cookie secrets (not new ones, as [`Self::set_next_key`] on
    /// each share would make): a cookie one worker gave for the next key is
    /// then valid at every worker, and stays so after the promotion.
    pub fn adopt_next_key(&mut self, from: &Responder) {
        self.next = from.next.clone();
    }

    /// Ends a key rotation: the next key becomes the current one and
    /// initiations to the old key fail mac1 from now on. `false` (and no
    /// change) when there is no next key.
    pub fn promote_next_key(&mut self) -> bool {
        match self.next.take() {
            Some(next) => {
                self.key = next;
                true
            }
            None => false,
        }
    }

    /// The private key a handshake initiation is addressed to (its mac1,
    /// WireGuard paper §5.4.4): the next key, else the current one; `None`
    /// for anything else. The tunnel that answers it must hold that key.
    pub fn addressed_key(&self, datagram: &[u8]) -> Option<&PrivateKey> {
        if datagram.first() != Some(&TYPE_HANDSHAKE_INIT) {
            return None;
        }
        let mut buf = [0u8; MIN_BUFFER_LEN];
        self.next
            .iter()
            .chain(std::iter::once(&self.key))
            .find(|k| k.has_mac1(datagram, &mut buf))
            .map(|k| &k.private_key)
    }

    /// Whether `datagram` is a handshake initiation addressed to the next
    /// key (its mac1 is the next key's). A mac1 check only: no public key
    /// is derived (a scalar multiplication, about a sixth of a whole
    /// handshake's cost, `benches/handshake.rs`).
    pub fn addresses_next_key(&self, datagram: &[u8]) -> bool {
        if datagram.first() != Some(&TYPE_HANDSHAKE_INIT) {
            return false;
        }
        let mut buf = [0u8; MIN_BUFFER_LEN];
        self.next
            .as_ref()
            .is_some_and(|k| k.has_mac1(datagram, &mut buf))
    }

    /// The next public key during a key rotation (kept, not derived).
    pub fn next_public_key(&self) -> Option<PublicKey> {
        self.next
            .as_ref()
            .map(|k| PublicKey(k.public_key.to_bytes()))
    }

    /// The limiter to pass to every [`TunnelConfig`] of this responder (a
    /// mac1 check only, see [`HandshakeLimiter`]) for the current key.
    pub fn limiter(&self) -> HandshakeLimiter {
        self.key.mac1_only.clone()
    }

    /// [`Self::limiter`] for the tunnels of `key` (the current or the next
    /// one); `None` for another key.
    pub fn limiter_for(&self, key: &PublicKey) -> Option<HandshakeLimiter> {
        std::iter::once(&self.key)
            .chain(self.next.iter())
            .find(|k| k.public_key.as_bytes() == &key.0)
            .map(|k| k.mac1_only.clone())
    }

    /// Works out which tunnel a datagram is for. Initiations are admitted
    /// (mac1; under load a cookie for `from` and a token of its bucket) and
    /// then cost one Diffie-Hellman to decrypt the initiator's static key;
    /// other messages are routed by receiver index without any crypto: the
    /// addressed tunnel authenticates them.
    ///
    /// # Errors
    /// [`Error::Malformed`] for anything that is not a WireGuard message,
    /// [`Error::InvalidMac`] for an initiation not addressed to us,
    /// [`Error::AuthenticationFailed`] when its static key does not decrypt,
    /// [`Error::UnderLoad`] under load without `from`, [`Error::RateLimited`]
    /// when `from` has used its tokens, [`Error::BufferTooSmall`] when `buf`
    /// is shorter than [`MIN_BUFFER_LEN`].
    pub fn classify<'b>(
        &mut self,
        from: Option<IpAddr>,
        datagram: &[u8],
        buf: &'b mut [u8],
        now: Instant,
    ) -> Result<Incoming<'b>, Error> {
        self.route(Some((from, now)), datagram, buf)
    }

    /// [`Self::classify`] for a datagram that a responder sharing this one
    /// ([`Self::share`]) already admitted: another worker received it and
    /// handed it over. Neither counted nor checked against the load again.
    ///
    /// # Errors
    /// As [`Self::classify`], but never [`Error::UnderLoad`] or [`Error::RateLimited`].
    pub fn classify_admitted<'b>(
        &mut self,
        datagram: &[u8],
        buf: &'b mut [u8],
    ) -> Result<Incoming<'b>, Error> {
        self.route(None, datagram, buf)
    }

    /// `admit`: the sender and the time when the initiation still needs admission.
    fn route<'b>(
        &mut self,
        admit: Option<(Option<IpAddr>, Instant)>,
        datagram: &[u8],
        buf: &'b mut [u8],
    ) -> Result<Incoming<'b>, Error> {
        if buf.len() < MIN_BUFFER_LEN {
            return Err(Error::BufferTooSmall);
        }
        let packet = Tunn::parse_incoming_packet(datagram)?;
        match packet {
            Packet::HandshakeInit(_) => {
                // The next key first: once agents have its document, most
                // initiations address it.
                let key = match &self.next {
                    Some(next) if next.has_mac1(datagram, buf) => Arc::clone(next),
                    _ => Arc::clone(&self.key),
                };
                let mut packet = verified(key.mac1_only.0.verify_packet(None, datagram, buf))?;
                if let Some((from, now)) = admit {
                    let under_load = lock(&self.admission).note_initiation(now);
                    if under_load {
                        let Some(from) = from else {
                            return Err(Error::UnderLoad);
                        };
                        let (current, previous) = lock(&key.cookies).at(now);
                        // An initiator without a cookie sends a zero mac2.
                        let has_mac2 =
                            datagram.len() >= 16 && datagram[datagram.len() - 16..] != [0; 16];
                        let by_previous = previous
                            .filter(|_| has_mac2)
                            .and_then(|p| p.verify_packet(Some(from), datagram, buf).ok());
                        packet = match by_previous {
                            Some(p) => p,
                            None => match current.verify_packet(Some(from), datagram, buf) {
                                Err(TunnResult::WriteToNetwork(cookie)) => {
                                    return Ok(Incoming::CookieReply(cookie));
                                }
                                other => verified(other)?,
                            },
                        };
                        if lock(&self.admission).allow_source(from, now).is_err() {
                            return Err(Error::RateLimited);
                        }
                    }
                }
                let Packet::HandshakeInit(init) = packet else {
                    return Err(Error::Malformed);
                };
                let half = parse_handshake_anon(&key.private_key.0, &key.public_key, &init)?;
                Ok(Incoming::Initiation {
                    peer_public_key: PublicKey(half.peer_static_public),
                })
            }
            Packet::HandshakeResponse(p) => Ok(Incoming::ForIndex(p.receiver_idx >> 8)),
            Packet::PacketCookieReply(p) => Ok(Incoming::ForIndex(p.receiver_idx >> 8)),
            Packet::PacketData(p) => Ok(Incoming::ForIndex(p.receiver_idx >> 8)),
        }
    }

    /// The receiver index of a data message, without any other check: the
    /// fast path of a batch of data datagrams.
    pub fn data_receiver_index(datagram: &[u8]) -> Option<u32> {
        // Type 4, three reserved zero bytes, then the receiver index (LE),
        // counter (8) and at least a 16-byte tag.
        if datagram.len() >= DATA_OVERHEAD && datagram[..4] == [4, 0, 0, 0] {
            let idx = u32::from_le_bytes([datagram[4], datagram[5], datagram[6], datagram[7]]);
            Some(idx >> 8)
        } else {
            None
        }
    }

    /// Whether a message the addressed tunnel accepted proves its sender:
    /// every message but a cookie reply (which carries no authenticator of
    /// the session, WireGuard paper §5.4.7).
    pub fn proves_sender(datagram: &[u8]) -> bool {
        datagram.first() != Some(&TYPE_COOKIE_REPLY)
    }
}

/// A packet boringtun's MAC check let through, or why not.
fn verified<'a>(r: Result<Packet<'a>, TunnResult<'_>>) -> Result<Packet<'a>, Error> {
    match r {
        Ok(p) => Ok(p),
        Err(TunnResult::Err(e)) => Err(e.into()),
        Err(
            TunnResult::Done
            | TunnResult::WriteToNetwork(_)
            | TunnResult::WriteToTunnelV4(..)
            | TunnResult::WriteToTunnelV6(..),
        ) => Err(Error::Malformed),
    }
}

/// Shared admission state; a worker that panicked holding it left it
/// consistent (every update is a single assignment), so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> PrivateKey {
        PrivateKey::from_bytes([b; 32])
    }

    fn ipv4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(payload);
        let len = u16::try_from(p.len()).unwrap().to_be_bytes();
        p[2] = len[0];
        p[3] = len[1];
        p
    }

    /// Runs a handshake from `a` (initiator) to `b` (responder).
    fn handshake(a: &mut Tunnel, b: &mut Tunnel, now: Instant) {
        let mut buf = vec![0; buffer_len(2000)];
        let mut reply = vec![0; buffer_len(2000)];
        let init = a
            .initiate_handshake(&mut buf, false, now)
            .unwrap()
            .unwrap()
            .to_vec();
        let Decapsulated::Network(resp) = b.decapsulate(None, &init, &mut reply, now).unwrap()
        else {
            panic!("no response");
        };
        let Decapsulated::Network(ka) = a.decapsulate(None, resp, &mut buf, now).unwrap() else {
            panic!("no keepalive");
        };
        assert_eq!(
            b.decapsulate(None, ka, &mut reply, now).unwrap(),
            Decapsulated::Nothing
        );
    }

    #[test]
    fn two_tunnels_handshake_and_exchange_packets() {
        let now = Instant::now();
        let mut a = Tunnel::new(
            TunnelConfig::initiator(key(1), key(2).public_key(), 1, Some(25)),
            now,
        );
        let mut b = Tunnel::new(TunnelConfig::responder(key(2), key(1).public_key(), 7), now);
        assert!(!a.has_session());
        handshake(&mut a, &mut b, now);
        assert!(a.has_session() && b.has_session());
        assert_eq!(a.poll_event(), Some(TunnelEvent::HandshakeCompleted));
        assert_eq!(b.poll_event(), Some(TunnelEvent::HandshakeCompleted));
        assert_eq!(b.stats().handshakes, 1);

        let mut buf = vec![0; buffer_len(1500)];
        let mut out = vec![0; buffer_len(1500)];
        for (i, size) in [0usize, 1, 100, 1380].into_iter().enumerate() {
            let pkt = ipv4([10, 64, 0, 5], [172, 16, 0, 50], &vec![i as u8; size]);
            let Encapsulated::Network(d) = b.encapsulate(&pkt, &mut buf, now).unwrap() else {
                panic!("not sent");
            };
            assert_eq!(d.len(), pkt.len() + DATA_OVERHEAD);
            let Decapsulated::Tunnel(got) = a.decapsulate(None, d, &mut out, now).unwrap() else {
                panic!("not delivered");
            };
            assert_eq!(got, &pkt[..]);
        }
        assert_eq!(a.stats().rx_packets, 4);
        assert_eq!(b.stats().tx_packets, 4);
        assert_eq!(
            a.stats().rx_bytes,
            b.stats().tx_bytes,
            "both ends count inner bytes"
        );
    }

    #[test]
    fn packets_sent_before_the_handshake_are_flushed_after_it() {
        let now = Instant::now();
        let mut a = Tunnel::new(
            TunnelConfig::initiator(key(1), key(2).public_key(), 1, None),
            now,
        );
        let mut b = Tunnel::new(TunnelConfig::responder(key(2), key(1).public_key(), 2), now);
        let mut buf = vec![0; buffer_len(usize::from(u16::MAX))];
        let mut out = vec![0; buffer_len(usize::from(u16::MAX))];
        let first = ipv4([192, 168, 1, 1], [10, 0, 0, 1], b"first");
        let Encapsulated::Network(init) = a.encapsulate(&first, &mut buf, now).unwrap() else {
            panic!("no initiation");
        };
        let init = init.to_vec();
        let second = ipv4([192, 168, 1, 1], [10, 0, 0, 1], b"second");
        assert_eq!(
            a.encapsulate(&second, &mut buf, now).unwrap(),
            Encapsulated::Queued
        );
        let Decapsulated::Network(resp) = b.decapsulate(None, &init, &mut out, now).unwrap() else {
            panic!("no response");
        };
        let resp = resp.to_vec();
        assert!(
            b.poll_network(&mut out).is_none(),
            "responder queued nothing"
        );
        let Decapsulated::Network(ka) = a.decapsulate(None, &resp, &mut buf, now).unwrap() else {
            panic!("no keepalive");
        };
        let ka = ka.to_vec();
        let mut delivered = Vec::new();
        assert_eq!(
            b.decapsulate(None, &ka, &mut out, now).unwrap(),
            Decapsulated::Nothing
        );
        while let Some(d) = a.poll_network(&mut buf) {
            let d = d.to_vec();
            if let Decapsulated::Tunnel(p) = b.decapsulate(None, &d, &mut out, now).unwrap() {
                delivered.push(p.to_vec());
            }
        }
        assert_eq!(delivered, vec![first, second]);
        assert!(a.poll_network(&mut buf).is_none());
    }

    #[test]
    fn short_buffers_are_errors_not_panics() {
        let now = Instant::now();
        let mut a = Tunnel::new(
            TunnelConfig::initiator(key(1), key(2).public_key(), 1, None),
            now,
        );
        let mut b = Tunnel::new(TunnelConfig::responder(key(2), key(1).public_key(), 2), now);
        handshake(&mut a, &mut b, now);
        let pkt = ipv4([1, 1, 1, 1], [2, 2, 2, 2], &[0; 200]);
        let mut small = vec![0; pkt.len() + 31];
        assert_eq!(
            a.encapsulate(&pkt, &mut small, now),
            Err(Error::BufferTooSmall)
        );
        let mut tiny = [0u8; 100];
        assert_eq!(
            a.initiate_handshake(&mut tiny, true, now),
            Err(Error::BufferTooSmall)
        );
        assert_eq!(a.handle_timeout(&mut tiny, now), Err(Error::BufferTooSmall));
        let mut buf = vec![0; buffer_len(pkt.len())];
        let Encapsulated::Network(d) = a.encapsulate(&pkt, &mut buf, now).unwrap() else {
            panic!()
        };
        let d = d.to_vec();
        let mut small = vec![0; d.len() + 31];
        assert_eq!(
            b.decapsulate(None, &d, &mut small, now),
            Err(Error::BufferTooSmall)
        );
    }

    #[test]
    fn garbage_tampering_and_replays_are_dropped() {
        let now = Instant::now();
        let mut a = Tunnel::new(
            TunnelConfig::initiator(key(1), key(2).public_key(), 1, None),
            now,
        );
        let mut b = Tunnel::new(TunnelConfig::responder(key(2), key(1).public_key(), 2), now);
        handshake(&mut a, &mut b, now);
        let mut out = vec![0; 4096];
        assert_eq!(
            b.decapsulate(None, &[], &mut out, now),
            Err(Error::Malformed)
        );
        assert_eq!(
            b.decapsulate(None, &[9; 40], &mut out, now),
            Err(Error::Malformed)
        );
        let mut buf = vec![0; 4096];
        let pkt = ipv4([1, 1, 1, 1], [2, 2, 2, 2], b"hello");
        let Encapsulated::Network(d) = a.encapsulate(&pkt, &mut buf, now).unwrap() else {
            panic!()
        };
        let d = d.to_vec();
        let mut tampered = d.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(
            b.decapsulate(None, &tampered, &mut out, now),
            Err(Error::AuthenticationFailed)
        );
        assert!(matches!(
            b.decapsulate(None, &d, &mut out, now),
            Ok(Decapsulated::Tunnel(_))
        ));
        assert_eq!(b.decapsulate(None, &d, &mut out, now), Err(Error::Replay));
        // A data message whose plaintext is not an IP packet.
        let Encapsulated::Network(d) = a.encapsulate(&[0x10; 30], &mut buf, now).unwrap() else {
            panic!()
        };
        let d = d.to_vec();
        assert_eq!(
            b.decapsulate(None, &d, &mut out, now),
            Err(Error::Malformed)
        );
    }

    #[test]
    fn responder_routes_initiations_by_key_and_the_rest_by_index() {
        let now = Instant::now();
        let gw = key(9);
        let mut responder = Responder::new(gw.clone(), Responder::DEFAULT_HANDSHAKE_LIMIT);
        let mut t = Tunnel::new(
            TunnelConfig {
                limiter: Some(responder.limiter()),
                ..TunnelConfig::responder(gw.clone(), key(3).public_key(), 42)
            },
            now,
        );
        let mut client = Tunnel::new(
            TunnelConfig::initiator(key(3), gw.public_key(), 5, Some(25)),
            now,
        );
        let mut buf = vec![0; 2048];
        let mut out = vec![0; 2048];
        let init = client
            .initiate_handshake(&mut buf, false, now)
            .unwrap()
            .unwrap()
            .to_vec();
        assert_eq!(
            responder.classify(None, &init, &mut out, now).unwrap(),
            Incoming::Initiation {
                peer_public_key: key(3).public_key()
            }
        );
        let Decapsulated::Network(resp) = t.decapsulate(None, &init, &mut out, now).unwrap() else {
            panic!()
        };
        let resp = resp.to_vec();
        let Decapsulated::Network(ka) = client.decapsulate(None, &resp, &mut buf, now).unwrap()
        else {
            panic!()
        };
        let ka = ka.to_vec();
        assert_eq!(
            responder.classify(None, &ka, &mut out, now).unwrap(),
            Incoming::ForIndex(42)
        );
        assert_eq!(Responder::data_receiver_index(&ka), Some(42));

        // An initiation for another gateway key fails mac1.
        let mut other = Tunnel::new(
            TunnelConfig::initiator(key(3), key(10).public_key(), 6, None),
            now,
        );
        let init = other
            .initiate_handshake(&mut buf, false, now)
            .unwrap()
            .unwrap()
            .to_vec();
        assert_eq!(
            responder.classify(None, &init, &mut out, now),
            Err(Error::InvalidMac)
        );
        assert_eq!(
            responder.classify(None, &[1, 0, 0], &mut out, now),
            Err(Error::Malformed)
        );
        assert_eq!(Responder::data_receiver_index(&[4, 0, 0]), None);
    }

    /// A full handshake of `client` through `responder` to a gateway tunnel
    /// built with the key the initiation addressed; `Err` when the responder
    /// refuses the initiation.
    fn rotation_handshake(
        responder: &mut Responder,
        client: &mut Tunnel,
        client_key: u8,
        now: Instant,
    ) -> Result<PublicKey, Error> {
        let mut out = vec![0; 2048];
        let init = initiation(client, true, now);
        assert_eq!(
            responder.classify(None, &init, &mut out, now)?,
            Incoming::Initiation {
                peer_public_key: key(client_key).public_key()
            }
        );
        let addressed = responder.addressed_key(&init).unwrap().clone();
        let gw_public = addressed.public_key();
        let mut gw = Tunnel::new(
            TunnelConfig {
                limiter: responder.limiter_for(&gw_public),
                ..TunnelConfig::responder(addressed, key(client_key).public_key(), 7)
            },
            now,
        );
        let Decapsulated::Network(resp) = gw.decapsulate(None, &init, &mut out, now).unwrap()
        else {
            panic!("no handshake response")
        };
        let resp = resp.to_vec();
        let mut buf = vec![0; 2048];
        // The client confirms the session with a keepalive, which the
        // gateway's tunnel decrypts: both hold the addressed key.
        let Decapsulated::Network(ka) = client.decapsulate(None, &resp, &mut buf, now).unwrap()
        else {
            panic!("no keepalive")
        };
        assert_eq!(
            gw.decapsulate(None, ka, &mut out, now).unwrap(),
            Decapsulated::Nothing
        );
        assert!(client.has_session() && gw.has_session());
        Ok(gw_public)
    }

    #[test]
    fn rotation_both_keys_are_answered_then_only_the_next() {
        let now = Instant::now();
        let (old, new) = (key(9), key(11));
        let mut responder = Responder::new(old.clone(), Responder::DEFAULT_HANDSHAKE_LIMIT);
        let mut worker = responder.share();
        let mut to_old = Tunnel::new(
            TunnelConfig::initiator(key(3), old.public_key(), 5, None),
            now,
        );
        let mut to_new = Tunnel::new(
            TunnelConfig::initiator(key(4), new.public_key(), 6, None),
            now,
        );
        // Before the rotation only the current key is answered.
        assert_eq!(
            rotation_handshake(&mut responder, &mut to_new, 4, now),
            Err(Error::InvalidMac)
        );
        assert_eq!(
            responder.next_private_key().map(PrivateKey::public_key),
            None
        );
        assert!(responder.limiter_for(&new.public_key()).is_none());

        // During it both are, each tunnel with the key its agent addressed,
        // at every worker that was told.
        responder.set_next_key(Some(new.clone()));
        worker.set_next_key(Some(new.clone()));
        for r in [&mut responder, &mut worker] {
            assert_eq!(
                rotation_handshake(r, &mut to_old, 3, now),
                Ok(old.public_key())
            );
            assert_eq!(
                rotation_handshake(r, &mut to_new, 4, now),
                Ok(new.public_key())
            );
        }
        // A third key is still refused, and data is not an initiation.
        let mut stranger = Tunnel::new(
            TunnelConfig::initiator(key(5), key(12).public_key(), 8, None),
            now,
        );
        assert_eq!(
            rotation_handshake(&mut responder, &mut stranger, 5, now),
            Err(Error::InvalidMac)
        );
        assert!(responder.addressed_key(&[4, 0, 0, 0]).is_none());
        assert!(responder.addressed_key(&[1, 0, 0, 0]).is_none());
        assert!(responder.addressed_key(&[]).is_none());

        // After it the old key is refused and the new one is current.
        assert!(responder.promote_next_key());
        assert!(!responder.promote_next_key());
        assert_eq!(responder.private_key().public_key(), new.public_key());
        assert_eq!(
            rotation_handshake(&mut responder, &mut to_old, 3, now),
            Err(Error::InvalidMac)
        );
        assert_eq!(
            rotation_handshake(&mut responder, &mut to_new, 4, now),
            Ok(new.public_key())
        );
        // Setting the current key as the next one is no rotation.
        responder.set_next_key(Some(new.clone()));
        assert!(responder.next_private_key().is_none());
    }

    #[test]
    fn rotation_under_load_the_next_key_gives_its_own_cookies() {
        let now = Instant::now();
        let (old, new) = (key(9), key(11));
        let from: IpAddr = "198.51.100.7".parse().unwrap();
        let mut responder = Responder::new(old, 0);
        responder.set_next_key(Some(new.clone()));
        // The cookie reply is keyed by the addressed (next) key: the
        // client can open it, and its retry with mac2 is admitted.
        let mut client = cookie_holder(&mut responder, &new, from, now);
        let init = initiation(&mut client, true, now);
        let mut out = vec![0; 2048];
        assert_eq!(
            responder.classify(Some(from), &init, &mut out, now),
            Ok(Incoming::Initiation {
                peer_public_key: key(3).public_key()
            })
        );
        assert_eq!(
            responder.addressed_key(&init).map(PrivateKey::public_key),
            Some(new.public_key())
        );
    }

    #[test]
    fn under_load_initiations_get_a_cookie_and_the_retry_passes() {
        let now = Instant::now();
        let gw = key(9);
        let from: IpAddr = "198.51.100.7".parse().unwrap();
        // Limit 0: every handshake needs a cookie.
        let mut responder = Responder::new(gw.clone(), 0);
        let mut t = Tunnel::new(
            TunnelConfig {
                limiter: Some(responder.limiter()),
                ..TunnelConfig::responder(gw.clone(), key(3).public_key(), 42)
            },
            now,
        );
        let mut client = Tunnel::new(
            TunnelConfig::initiator(key(3), gw.public_key(), 5, None),
            now,
        );
        let mut buf = vec![0; 2048];
        let mut out = vec![0; 2048];
        let init = client
            .initiate_handshake(&mut buf, false, now)
            .unwrap()
            .unwrap()
            .to_vec();
        let Incoming::CookieReply(cookie) = responder
            .classify(Some(from), &init, &mut out, now)
            .unwrap()
        else {
            panic!("expected a cookie reply")
        };
        let cookie = cookie.to_vec();
        assert_eq!(
            responder.classify(None, &init, &mut out, now),
            Err(Error::UnderLoad)
        );
        assert_eq!(
            client
                .decapsulate(Some(from), &cookie, &mut buf, now)
                .unwrap(),
            Decapsulated::Nothing
        );
        // The retransmission carries mac2 and passes.
        let init = client
            .initiate_handshake(&mut buf, true, now)
            .unwrap()
            .unwrap()
            .to_vec();
        assert!(matches!(
            responder
                .classify(Some(from), &init, &mut out, now)
                .unwrap(),
            Incoming::Initiation { .. }
        ));
        assert!(matches!(
            t.decapsulate(Some(from), &init, &mut out, now).unwrap(),
            Decapsulated::Network(_)
        ));
    }

    /// A gateway's tunnel for `client_key` under `responder`.
    fn gateway_tunnel(responder: &Responder, client: u8, index: u32, now: Instant) -> Tunnel {
        Tunnel::new(
            TunnelConfig {
                limiter: Some(responder.limiter()),
                ..TunnelConfig::responder(
                    responder.private_key().clone(),
                    key(client).public_key(),
                    index,
                )
            },
            now,
        )
    }

    /// A client (key 3) whose first initiation `responder` answered with a
    /// cookie reply, which it has taken: its retries carry mac2.
    fn cookie_holder(
        responder: &mut Responder,
        gw: &PrivateKey,
        from: IpAddr,
        now: Instant,
    ) -> Tunnel {
        let mut client = Tunnel::new(
            TunnelConfig::initiator(key(3), gw.public_key(), 5, None),
            now,
        );
        let mut out = vec![0; 2048];
        let init = initiation(&mut client, false, now);
        let Incoming::CookieReply(cookie) = responder
            .classify(Some(from), &init, &mut out, now)
            .unwrap()
        else {
            panic!("expected a cookie reply")
        };
        let cookie = cookie.to_vec();
        let mut buf = vec![0; 2048];
        client
            .decapsulate(Some(from), &cookie, &mut buf, now)
            .unwrap();
        client
    }

    fn initiation(client: &mut Tunnel, force: bool, now: Instant) -> Vec<u8> {
        let mut buf = vec![0; 2048];
        client
            .initiate_handshake(&mut buf, force, now)
            .unwrap()
            .unwrap()
            .to_vec()
    }

    #[test]
    fn responders_sharing_admission_accept_each_others_cookies() {
        let now = Instant::now();
        let gw = key(9);
        let from: IpAddr = "198.51.100.7".parse().unwrap();
        let mut out = vec![0; 2048];
        // Limit 0: every initiation needs a cookie. Worker 0 and worker 1.
        let mut w0 = Responder::new(gw.clone(), 0);
        let mut w1 = w0.share();
        let mut client = cookie_holder(&mut w0, &gw, from, now);
        // The retry reaches the other worker: the cookie is valid there.
        let init = initiation(&mut client, true, now);
        assert_eq!(
            w1.classify(Some(from), &init, &mut out, now).unwrap(),
            Incoming::Initiation {
                peer_public_key: key(3).public_key()
            }
        );
        // Two responders that do not share (one per worker, as before) do not.
        let mut alone = Responder::new(gw.clone(), 0);
        assert!(matches!(
            alone.classify(Some(from), &init, &mut out, now).unwrap(),
            Incoming::CookieReply(_)
        ));
        // The owner's tunnel answers the admitted initiation without a
        // second check (which would ask for a cookie again).
        let mut t = gateway_tunnel(&w1, 3, 42, now);
        let Decapsulated::Network(resp) = t.decapsulate(Some(from), &init, &mut out, now).unwrap()
        else {
            panic!("no response")
        };
        assert_eq!(
            resp.len(),
            HANDSHAKE_RESPONSE_LEN,
            "a response, not a cookie reply"
        );
    }

    #[test]
    fn a_cookie_from_before_the_secret_changes_is_still_accepted_after() {
        let now = Instant::now();
        let gw = key(9);
        let from: IpAddr = "198.51.100.7".parse().unwrap();
        let mut out = vec![0; 2048];
        let mut w0 = Responder::new(gw.clone(), 0);
        let mut client = cookie_holder(&mut w0, &gw, from, now);
        // The secret changes at 120 s; the retry 5 s later still passes.
        let later = now + COOKIE_SECRET_AGE + Duration::from_secs(5);
        let init = initiation(&mut client, true, later);
        assert!(matches!(
            w0.classify(Some(from), &init, &mut out, later).unwrap(),
            Incoming::Initiation { .. }
        ));
        // After the next change the old cookie is stale: a new one is sent.
        let much_later = later + COOKIE_SECRET_AGE;
        let init = initiation(&mut client, true, much_later);
        assert!(matches!(
            w0.classify(Some(from), &init, &mut out, much_later)
                .unwrap(),
            Incoming::CookieReply(_)
        ));
    }

    #[test]
    fn a_handed_over_initiation_is_counted_once_per_gateway() {
        let now = Instant::now();
        let gw = key(9);
        let from: IpAddr = "198.51.100.7".parse().unwrap();
        let mut out = vec![0; 2048];
        // Two initiations per second without cookies.
        let mut w0 = Responder::new(gw.clone(), 2);
        let mut w1 = w0.share();
        let mut t = gateway_tunnel(&w1, 3, 42, now);
        let mut a = Tunnel::new(
            TunnelConfig::initiator(key(3), gw.public_key(), 5, None),
            now,
        );
        // Worker 0 receives a's initiation and hands it to worker 1, the owner.
        let init = initiation(&mut a, false, now);
        assert!(matches!(
            w0.classify(Some(from), &init, &mut out, now).unwrap(),
            Incoming::Initiation { .. }
        ));
        assert_eq!(
            w1.classify_admitted(&init, &mut out).unwrap(),
            Incoming::Initiation {
                peer_public_key: key(3).public_key()
            }
        );
        assert!(matches!(
            t.decapsulate(Some(from), &init, &mut out, now).unwrap(),
            Decapsulated::Network(r) if r.len() == HANDSHAKE_RESPONSE_LEN
        ));
        // So far one initiation counted: the second of this second passes
        // without a cookie, the third does not.
        let mut b = Tunnel::new(
            TunnelConfig::initiator(key(4), gw.public_key(), 6, None),
            now,
        );
        let init_b = initiation(&mut b, false, now);
        assert!(matches!(
            w1.classify(Some(from), &init_b, &mut out, now).unwrap(),
            Incoming::Initiation { .. }
        ));
        assert!(matches!(
            w0.classify(Some(from), &init_b, &mut out, now).unwrap(),
            Incoming::CookieReply(_)
        ));
    }

    #[test]
    fn under_load_a_cookie_proven_source_gets_five_then_twenty_per_second() {
        let now = Instant::now();
        let gw = key(9);
        let from: IpAddr = "198.51.100.7".parse().unwrap();
        let mut out = vec![0; 2048];
        let mut w0 = Responder::new(gw.clone(), 0);
        let mut client = cookie_holder(&mut w0, &gw, from, now);
        let results: Vec<_> = (0..7)
            .map(|_| {
                let init = initiation(&mut client, true, now);
                w0.classify(Some(from), &init, &mut out, now)
                    .map(|i| matches!(i, Incoming::Initiation { .. }))
            })
            .collect();
        assert_eq!(
            results,
            [
                Ok(true),
                Ok(true),
                Ok(true),
                Ok(true),
                Ok(true),
                Err(Error::RateLimited),
                Err(Error::RateLimited)
            ]
        );
        // 50 ms later one more; another address is not affected.
        let init = initiation(&mut client, true, now);
        let later = now + Duration::from_millis(50);
        assert!(w0.classify(Some(from), &init, &mut out, later).is_ok());
        let other: IpAddr = "198.51.100.8".parse().unwrap();
        assert!(matches!(
            w0.classify(Some(other), &init, &mut out, later).unwrap(),
            Incoming::CookieReply(_)
        ));
        // A handed-over initiation takes no token.
        assert!(matches!(
            w0.share().classify_admitted(&init, &mut out).unwrap(),
            Incoming::Initiation { .. }
        ));
    }

    #[test]
    fn timers_run_without_output_when_idle() {
        let now = Instant::now();
        let mut t = Tunnel::new(TunnelConfig::responder(key(2), key(1).public_key(), 2), now);
        let mut buf = vec![0; 256];
        assert_eq!(t.poll_timeout(), now + TIMER_TICK);
        assert_eq!(t.handle_timeout(&mut buf, now).unwrap(), None);
        let later = now + TIMER_TICK;
        assert_eq!(t.handle_timeout(&mut buf, later).unwrap(), None);
        assert_eq!(t.poll_timeout(), later + TIMER_TICK);
        assert_eq!(t.poll_event(), None);
    }

    #[test]
    fn private_keys_parse_and_never_print() {
        let k = key(7);
        let back: PrivateKey = k.to_base64().parse().unwrap();
        assert_eq!(back.public_key(), k.public_key());
        assert!(!format!("{k:?}").contains(&k.to_base64()));
        assert!("short".parse::<PrivateKey>().is_err());
        // X25519 test vector (RFC 7748 §6.1, Alice's key pair).
        let alice = PrivateKey::from_bytes([
            0x77, 0x07, 0x6d, 0x0a, 0x73, 0x18, 0xa5, 0x7d, 0x3c, 0x16, 0xc1, 0x72, 0x51, 0xb2,
            0x66, 0x45, 0xdf, 0x4c, 0x2f, 0x87, 0xeb, 0xc0, 0x99, 0x2a, 0xb1, 0x77, 0xfb, 0xa5,
            0x1d, 0xb9, 0x2c, 0x2a,
        ]);
        assert_eq!(
            alice.public_key().0,
            [
                0x85, 0x20, 0xf0, 0x09, 0x89, 0x30, 0xa7, 0x54, 0x74, 0x8b, 0x7d, 0xdc, 0xb4, 0x3e,
                0xf7, 0x5a, 0x0d, 0xbf, 0x3a, 0x0d, 0x26, 0x38, 0x1a, 0xf4, 0xeb, 0xa4, 0xa9, 0x8e,
                0xaa, 0x9b, 0x4e, 0x6a,
            ]
        );
    }
}
