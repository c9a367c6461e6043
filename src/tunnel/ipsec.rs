//! The IPsec kind behind the tunnel seam: one IKEv2 SA ([`IkeSa`], RFC 7296)
//! and its CHILD_SA's ESP SAs ([`esp`], RFC 4303, in UDP, RFC 3948).
//!
//! - [`Tunnel`]: one peer. `encapsulate` seals an inner packet with the
//!   current outbound ESP SA after checking it lies within the CHILD_SA's
//!   selectors; `decapsulate` feeds an IKE message to the [`IkeSa`] or opens
//!   ESP with the current or (during a rekey) previous inbound SA, and checks
//!   the inner packet against the CHILD_SA's selectors (RFC 4301 §5.2: a
//!   packet whose source is not in the peer's `ts_remote` is dropped and
//!   counted, [`DropReason::InboundOutsideSelectors`]). IKE's events become
//!   [`TunnelEvent`]s: `ChildSaUp` and `ChildSaRekeyed` are
//!   `HandshakeCompleted`, `IkeSaDown` is `Expired`. The CHILD_SA is rekeyed
//!   before the outbound SA's soft sequence limit and after
//!   [`Settings::child_lifetime`] (less a random part, so that both ends do
//!   not start together; the engine resolves it if they do, RFC 7296
//!   §2.8.1). An initiator whose IKE SA went down dials again after
//!   [`Settings::redial_after`].
//! - [`Responder`]: the gateway's side. IKE_SA_INIT carries no identity, so
//!   the responder keeps the half-open IKE SAs itself (bounded; above
//!   [`Settings::cookie_threshold`] half-open SAs an IKE_SA_INIT must carry a
//!   COOKIE, RFC 7296 §2.6; above [`MAX_HALF_OPEN`] it is dropped), answers
//!   IKE_SA_INIT ([`Incoming::Reply`]), and runs IKE_AUTH with a
//!   [`ike::PeerLookup`] that finds the site by its IDi among the peers it
//!   built tunnels for ([`Responder::ipsec_tunnel`]). An authenticated SA
//!   waits for its peer's tunnel: the responder answers
//!   [`Incoming::Authenticated`] with the identity, the packet logic routes
//!   the datagram to that peer's tunnel, whose `decapsulate` takes the SA
//!   over and sends the IKE_AUTH response. Later IKE messages route by the
//!   responder SPI (a map kept by the tunnels, [`Incoming::ForIndex`]);
//!   ESP routes by its SPI without any lookup: the inbound SPIs carry the
//!   peer's tunnel index ([`spi`], [`Responder::fast_index`]). The state is
//!   shared by every worker's responder (`Responders::share`), so an
//!   IKE_AUTH may reach another worker than its IKE_SA_INIT did.
//!
//! **Ports: one datagram form for 500 and 4500.** The seam has one input and
//! one output per tunnel, while IKEv2 uses two ports. Datagrams cross the
//! seam as they are on UDP 4500 (a 4-byte zero non-ESP marker before an IKE
//! message, `0xFF` for a NAT keepalive, anything else ESP, RFC 3948 §2),
//! and a datagram of UDP 500 carries the 4-byte [`IKE_500_TAG`] in front.
//! The tag is ESP SPI 244, which RFC 4303 §2.1 reserves (1–255), and it
//! starts with a zero byte, which no WireGuard message does: nothing real
//! looks like it. The IO shell therefore binds 500 and 4500, prepends the
//! tag to what 500 receives, and sends what the tunnel outputs from 500
//! without the tag when it starts with it, from 4500 otherwise (the agent:
//! to the gateway's 500 or 4500 in the same way, and it presents both as
//! the one endpoint of its desired state). The tunnel itself never needs to
//! know a port.
//!
//! **Addresses.** The core does not know its own address. The initiator
//! puts `0.0.0.0` into NAT detection, which never matches, so the peer sees
//! a NAT and the SA floats to 4500 (RFC 7296 §2.23; strongSwan's
//! `encap = yes` fakes NAT detection the same way), and the agent sends
//! keepalives: an agent sits behind a customer's NAPT in practice, and ESP
//! on UDP 4500 is the only ESP this code speaks.
//!
//! **Randomness.** The seam passes no rng (WireGuard draws its own inside
//! boringtun). Each tunnel and each responder owns a [`StdRng`] (ChaCha12,
//! a CSPRNG) seeded once at construction, from the operating system in the
//! product and from a fixed seed in tests ([`Tunnel::initiator_seeded`],
//! [`Responder::seeded`]), so the engine's nonces, DH secrets, SPIs and
//! cookie secrets stay reproducible under test without an rng parameter on
//! every seam call.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use super::{Decapsulated, Encapsulated, Error, Incoming, TunnelEvent, TunnelStats};
use crate::ipsec::esp::natt::{self, Udp4500};
use crate::ipsec::esp::{self, InboundSa, OutboundSa, spi};
use crate::ipsec::ike::wire::{self, Id, TrafficSelector, exchange};
use crate::ipsec::ike::{
    self, ChildKeys, ChildSa, Config, CookieJar, DownReason, Event, IkeSa, Transmit,
};
use crate::ipv4::{FixedHeader, Prefix};
use crate::messages::IpsecParams;

/// The tag in front of a datagram of UDP 500 at the seam (see the module
/// documentation): ESP SPI 244, reserved by RFC 4303 §2.1.
pub const IKE_500_TAG: [u8; 4] = [0, 0, 0, 0xF4];

/// The most bytes an ESP data message adds to the packet it carries.
pub const DATA_OVERHEAD: usize = esp::MAX_OVERHEAD;

/// The smallest output buffer: an IKE message out (an IKE_SA_INIT response
/// with a MODP-2048 key exchange is about 600 bytes). A longer IKE message
/// than the caller's buffer holds waits for [`super::Tunnel::poll_network`].
pub const MIN_BUFFER_LEN: usize = 1500;

/// Half-open IKE SAs a responder keeps at most (all workers together);
/// IKE_SA_INIT requests beyond are dropped ([`Error::UnderLoad`]).
pub const MAX_HALF_OPEN: usize = 4096;

/// Inner packets held while no CHILD_SA exists.
const MAX_QUEUED: usize = 64;

/// The size of an output buffer for any result of an input of up to
/// `packet_len` bytes.
pub const fn buffer_len(packet_len: usize) -> usize {
    let n = packet_len + DATA_OVERHEAD + IKE_500_TAG.len();
    if n < MIN_BUFFER_LEN {
        MIN_BUFFER_LEN
    } else {
        n
    }
}

crate::drops::drop_reasons! {
    /// Why an IPsec tunnel refused a packet (its own counters; the seam's
    /// [`Error`] says less).
    enum DropReason;
    /// Decrypted, but its inner source is not within the CHILD_SA's remote
    /// selectors or its destination not within the local ones (RFC 4301 §5.2).
    InboundOutsideSelectors = "inbound_outside_selectors",
    /// From the tunnel interface: outside the CHILD_SA's selectors, not sent.
    OutboundOutsideSelectors = "outbound_outside_selectors",
    /// ESP with an SPI of no inbound SA of this tunnel.
    UnknownSpi = "unknown_spi",
    /// ESP refused by the inbound SA (see its own counters).
    Esp = "esp",
    /// An IKE message refused by the engine (see its own counters).
    Ike = "ike",
    /// An inner packet while no CHILD_SA exists and the queue is full.
    QueueFull = "queue_full",
    /// An IKE message longer than any buffer it could leave in.
    OversizeIke = "oversize_ike",
}

/// Timers and limits of IPsec tunnels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// A CHILD_SA is rekeyed after this long (less up to a tenth, at random).
    pub child_lifetime: Duration,
    /// The IKE SA is rekeyed after this long (less up to a tenth, at
    /// random), RFC 7296 §2.8.
    pub ike_lifetime: Duration,
    /// Outbound packets after which the CHILD_SA is rekeyed
    /// ([`OutboundSa::with_soft_limit`]).
    pub soft_limit: u32,
    /// An initiator whose IKE SA went down dials again after this long.
    pub redial_after: Duration,
    /// Half-open IKE SAs above which a responder demands cookies.
    pub cookie_threshold: usize,
}

impl Default for Settings {
    /// One hour CHILD_SAs and four hour IKE SAs (strongSwan's default rekey
    /// times), the ESP soft limit, re-dial after 10 s, cookies above 64
    /// half-open SAs.
    fn default() -> Self {
        Self {
            child_lifetime: Duration::from_secs(3600),
            ike_lifetime: Duration::from_secs(4 * 3600),
            soft_limit: esp::DEFAULT_SOFT_LIMIT,
            redial_after: Duration::from_secs(10),
            cookie_threshold: 64,
        }
    }
}

impl Settings {
    /// These settings with the rekey intervals a site's parameters name.
    pub fn for_site(self, params: &IpsecParams) -> Self {
        let secs = |s: Option<u32>, default: Duration| {
            s.map_or(default, |s| Duration::from_secs(u64::from(s)))
        };
        Self {
            child_lifetime: secs(params.child_rekey_s, self.child_lifetime),
            ike_lifetime: secs(params.ike_rekey_s, self.ike_lifetime),
            ..self
        }
    }
}

/// Traffic selectors of whole prefixes (every protocol and port).
pub fn selectors(prefixes: &[Prefix]) -> Vec<TrafficSelector> {
    prefixes
        .iter()
        .map(|p| TrafficSelector::ipv4_prefix(p.addr(), p.prefix_len()))
        .collect()
}

/// Whether `addr` with protocol `proto` lies within one of `ts`. Ports are
/// not looked at: this code proposes and narrows to whole port ranges only.
fn ts_contains(ts: &[TrafficSelector], addr: Ipv4Addr, proto: u8) -> bool {
    ts.iter().any(|t| match t {
        TrafficSelector::Ipv4 {
            ip_proto,
            start,
            end,
            ..
        } => (*ip_proto == 0 || *ip_proto == proto) && *start <= addr && addr <= *end,
        TrafficSelector::Other(_) => false,
    })
}

/// Whether an inner IPv4 packet goes from `src_ts` to `dst_ts`.
fn within(packet: &[u8], src_ts: &[TrafficSelector], dst_ts: &[TrafficSelector]) -> bool {
    FixedHeader::new(packet).is_ok_and(|h| {
        ts_contains(src_ts, h.src(), h.protocol()) && ts_contains(dst_ts, h.dst(), h.protocol())
    })
}

/// The port a seam datagram belongs to and the datagram as on that port.
fn split(datagram: &[u8]) -> (u16, &[u8]) {
    match datagram.strip_prefix(&IKE_500_TAG[..]) {
        Some(m) => (ike::IKE_PORT, m),
        None => (ike::NAT_T_PORT, datagram),
    }
}

/// The IKE message of a seam datagram and its header, if it is one.
fn ike_message(datagram: &[u8]) -> Option<(u16, &[u8], wire::Header)> {
    let (port, d) = split(datagram);
    let msg = if port == ike::NAT_T_PORT {
        match natt::classify(d) {
            Ok(Udp4500::Ike(m)) => m,
            _ => return None,
        }
    } else {
        d
    };
    let h = wire::Header::parse(msg).ok()?;
    Some((port, d, h))
}

/// A datagram of the engine in seam form.
fn seam_form(t: &Transmit) -> Vec<u8> {
    if t.local_port == ike::IKE_PORT {
        [&IKE_500_TAG[..], &t.payload].concat()
    } else {
        t.payload.clone()
    }
}

/// Whether a seam datagram looks like WireGuard: a message type 1–4 in a
/// little-endian `u32` (WireGuard paper §5.4). No IPsec datagram does: IKE
/// and keepalives start with 0 or are one byte, and the ESP SPIs we choose
/// carry a non-zero tunnel index below a non-zero high byte.
pub fn looks_like_wireguard(datagram: &[u8]) -> bool {
    matches!(datagram, [1..=4, 0, 0, 0, ..])
}

fn ike_error(r: ike::DropReason) -> Error {
    use ike::DropReason as D;
    match r {
        D::WrongSpi | D::Closed => Error::NoSession,
        D::MessageId => Error::Replay,
        D::Integrity => Error::AuthenticationFailed,
        _ => Error::Malformed,
    }
}

fn esp_error(r: esp::DropReason) -> Error {
    use esp::DropReason as D;
    match r {
        D::WrongSpi => Error::NoSession,
        D::Replayed | D::TooOld => Error::Replay,
        D::AuthFailed => Error::AuthenticationFailed,
        D::BufferTooSmall => Error::BufferTooSmall,
        _ => Error::Malformed,
    }
}

/// One CHILD_SA's ESP SAs and selectors.
struct ChildPair {
    spi_in: u32,
    outbound: OutboundSa,
    inbound: InboundSa,
    ts_local: Vec<TrafficSelector>,
    ts_remote: Vec<TrafficSelector>,
}

impl ChildPair {
    fn new(sa: ChildSa, keys: &ChildKeys, soft_limit: u32) -> Self {
        Self {
            spi_in: sa.spi_in,
            outbound: OutboundSa::new(sa.spi_out, &keys.key_out).with_soft_limit(soft_limit),
            inbound: InboundSa::new(sa.spi_in, &keys.key_in),
            ts_local: sa.ts_local,
            ts_remote: sa.ts_remote,
        }
    }
}

/// A site as the responder knows it: what the [`ike::PeerLookup`] answers
/// for its identity. Held by the site's tunnel; the responder's registry
/// holds it weakly, so a removed peer's identity is gone with its tunnel.
struct PeerEntry {
    identity: String,
    local_id: String,
    psk: Vec<u8>,
    local_ts: Vec<TrafficSelector>,
    remote_ts: Vec<TrafficSelector>,
    index: u32,
}

impl std::fmt::Debug for PeerEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerEntry")
            .field("identity", &self.identity)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Drop for PeerEntry {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.psk);
    }
}

/// Sites by identity (IDi). A separate lock from [`Shared`]: the lookup runs
/// inside the engine while [`Shared`] is locked.
type Registry = Arc<Mutex<HashMap<String, Weak<PeerEntry>>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while locked leaves plain maps behind, still consistent
    // enough to go on with.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What every worker's responder shares.
struct Shared {
    settings: Settings,
    rng: StdRng,
    cookies: CookieJar,
    rotate_at: Option<Instant>,
    /// Half-open IKE SAs by our (responder) SPI.
    half_open: HashMap<u64, IkeSa>,
    /// The half-open SA of an IKE_SA_INIT by (source, initiator SPI), for
    /// retransmissions (RFC 7296 §2.1).
    by_init: HashMap<(SocketAddr, u64), u64>,
    /// Authenticated SAs waiting for their peer's tunnel, by responder SPI.
    authenticated: HashMap<u64, (String, IkeSa)>,
    /// Established SAs' responder SPI → tunnel index (kept by the tunnels).
    by_spi_r: HashMap<u64, u32>,
}

impl Shared {
    /// Half-open SAs that went down (no IKE_AUTH in time) are forgotten.
    fn expire(&mut self, now: Instant) {
        let rng = &mut self.rng;
        self.half_open.retain(|_, sa| {
            if sa.poll_timeout().is_some_and(|t| now >= t) {
                sa.handle_timeout(now, rng);
            }
            !sa.is_closed()
        });
        let half_open = &self.half_open;
        self.by_init.retain(|_, spi| half_open.contains_key(spi));
        // An authenticated SA whose peer never took it (removed meanwhile).
        self.authenticated
            .retain(|_, (_, sa)| sa.poll_timeout().is_none_or(|t| now < t + DOWN_GRACE));
        if self.rotate_at.is_none_or(|t| now >= t) {
            self.cookies.rotate(&mut self.rng);
            self.rotate_at = Some(now + COOKIE_ROTATION);
        }
    }
}

/// A refused CHILD_SA rekey is tried again after this long.
const REKEY_RETRY: Duration = Duration::from_secs(30);
/// How long an authenticated SA waits past its timers for its tunnel.
const DOWN_GRACE: Duration = Duration::from_secs(30);
/// How often the cookie secret changes (RFC 7296 §2.6: "frequently").
const COOKIE_ROTATION: Duration = Duration::from_secs(120);

/// The gateway's IPsec classifier (see the module documentation).
#[derive(Clone)]
pub struct Responder {
    shared: Arc<Mutex<Shared>>,
    registry: Registry,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = lock(&self.shared);
        f.debug_struct("Responder")
            .field("half_open", &s.half_open.len())
            .field("authenticated", &s.authenticated.len())
            .field("established", &s.by_spi_r.len())
            .finish()
    }
}

impl Responder {
    /// A responder seeded from the operating system's randomness.
    pub fn new(settings: Settings) -> Self {
        Self::seeded(settings, StdRng::from_entropy().next_u64())
    }

    /// A responder whose randomness comes from `seed` (tests).
    pub fn seeded(settings: Settings, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let cookies = CookieJar::new(&mut rng);
        Self {
            shared: Arc::new(Mutex::new(Shared {
                settings,
                rng,
                cookies,
                rotate_at: None,
                half_open: HashMap::new(),
                by_init: HashMap::new(),
                authenticated: HashMap::new(),
                by_spi_r: HashMap::new(),
            })),
            registry: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Half-open IKE SAs now.
    pub fn half_open(&self) -> usize {
        lock(&self.shared).half_open.len()
    }

    /// The tunnel index of an ESP message, by its SPI ([`spi`]).
    pub fn fast_index(datagram: &[u8]) -> Option<u32> {
        if looks_like_wireguard(datagram) {
            return None;
        }
        spi::esp_spi(datagram).and_then(spi::index_from_spi)
    }

    /// Whether an accepted datagram proves its sender holds the SA: ESP and
    /// IKE messages after IKE_SA_INIT (authenticated by the SK payload).
    pub fn proves_sender(datagram: &[u8]) -> bool {
        match ike_message(datagram) {
            Some((_, _, h)) => h.exchange != exchange::IKE_SA_INIT,
            None => Self::fast_index(datagram).is_some(),
        }
    }

    /// A responder tunnel for the site `params` describe (`local_*`: the
    /// gateway), with tunnel index `index`: its identity (`remote_id`)
    /// becomes known to the IKE_AUTH lookup for as long as the tunnel lives.
    ///
    /// # Errors
    /// A PSK shorter than [`ike::MIN_PSK_LEN`].
    pub fn ipsec_tunnel(
        &self,
        params: &IpsecParams,
        index: u32,
        now: Instant,
    ) -> Result<Tunnel, ike::PskTooShort> {
        if params.psk.len() < ike::MIN_PSK_LEN {
            return Err(ike::PskTooShort);
        }
        let entry = Arc::new(PeerEntry {
            identity: params.remote_id.clone(),
            local_id: params.local_id.clone(),
            psk: params.psk.as_bytes().to_vec(),
            local_ts: selectors(&params.local_ts),
            remote_ts: selectors(&params.remote_ts),
            index,
        });
        lock(&self.registry).insert(params.remote_id.clone(), Arc::downgrade(&entry));
        let (settings, seed) = {
            let mut s = lock(&self.shared);
            (s.settings.for_site(params), s.rng.next_u64())
        };
        Ok(Tunnel::new(
            Role::Responder {
                shared: self.shared.clone(),
                entry,
            },
            index,
            settings,
            seed,
            now,
        ))
    }

    /// The responder's configuration: every choice made by IDi.
    fn config(&self) -> Config {
        let registry = self.registry.clone();
        let lookup: ike::PeerLookup = Arc::new(move |id: &Id| {
            if id.id_type != wire::id_type::FQDN {
                return None;
            }
            let name = std::str::from_utf8(&id.data).ok()?;
            let entry = lock(&registry).get(name)?.upgrade()?;
            let mut peer =
                ike::Peer::new(&entry.psk, entry.local_ts.clone(), entry.remote_ts.clone()).ok()?;
            peer.inbound_spi_index = Some(entry.index);
            peer.local_id = Some(Id::fqdn(&entry.local_id));
            Some(peer)
        });
        // The identity is replaced per peer by the lookup.
        Config::with_lookup(Id::fqdn("vpnnat"), lookup)
    }

    /// [`Self::classify`] of a message another worker classified already
    /// (handed over to the worker of its peer): only SAs that are
    /// authenticated or established route; nothing is created.
    ///
    /// # Errors
    /// Why it was dropped.
    pub fn classify_admitted<'b>(
        &mut self,
        datagram: &[u8],
        buf: &'b mut [u8],
    ) -> Result<Incoming<'b>, Error> {
        let Some((_, _, h)) = ike_message(datagram) else {
            return Err(Error::NoSession);
        };
        let s = lock(&self.shared);
        if let Some((identity, _)) = s.authenticated.get(&h.spi_r) {
            return write_identity(identity, buf);
        }
        match s.by_spi_r.get(&h.spi_r) {
            Some(index) => Ok(Incoming::ForIndex(*index)),
            None => Err(Error::NoSession),
        }
    }

    /// Routes one IKE datagram (see [`super::Responder::classify`]).
    ///
    /// # Errors
    /// Why it was dropped.
    pub fn classify<'b>(
        &mut self,
        from: Option<SocketAddr>,
        datagram: &[u8],
        buf: &'b mut [u8],
        now: Instant,
        admitted: bool,
    ) -> Result<Incoming<'b>, Error> {
        let (port, d) = split(datagram);
        if port == ike::NAT_T_PORT {
            match natt::classify(d) {
                Ok(Udp4500::Keepalive) => return Ok(Incoming::Consumed),
                Ok(Udp4500::Ike(_)) => {}
                Ok(Udp4500::Esp(_)) => return Err(Error::NoSession),
                Err(natt::Malformed) => return Err(Error::Malformed),
            }
        }
        let Some((port, d, h)) = ike_message(datagram) else {
            return Err(Error::Malformed);
        };
        let config = self.config();
        let mut guard = lock(&self.shared);
        let s = &mut *guard;
        s.expire(now);
        if let Some((identity, _)) = s.authenticated.get(&h.spi_r) {
            return write_identity(identity, buf);
        }
        if let Some(index) = s.by_spi_r.get(&h.spi_r) {
            return Ok(Incoming::ForIndex(*index));
        }
        let from = from.ok_or(Error::UnderLoad)?;
        let spi_r = if h.spi_r != 0 {
            if !s.half_open.contains_key(&h.spi_r) {
                return Err(Error::NoSession);
            }
            h.spi_r
        } else if let Some(spi) = s.by_init.get(&(from, h.spi_i)) {
            *spi
        } else {
            // A new IKE_SA_INIT request.
            let msg = if port == ike::NAT_T_PORT { &d[4..] } else { d };
            let under_load = !admitted && s.half_open.len() >= s.settings.cookie_threshold;
            match s.cookies.check(msg, from, under_load) {
                Ok(()) => {}
                Err(Some(cookie)) => {
                    let t = Transmit {
                        local_port: port,
                        remote: from,
                        payload: if port == ike::NAT_T_PORT {
                            [&natt::NON_ESP_MARKER[..], &cookie].concat()
                        } else {
                            cookie
                        },
                    };
                    return copy_out(&seam_form(&t), buf).map(Incoming::CookieReply);
                }
                Err(None) => return Err(Error::Malformed),
            }
            if s.half_open.len() >= MAX_HALF_OPEN {
                return Err(Error::UnderLoad);
            }
            let spi = loop {
                let spi = s.rng.next_u64();
                if spi != 0
                    && !s.half_open.contains_key(&spi)
                    && !s.authenticated.contains_key(&spi)
                    && !s.by_spi_r.contains_key(&spi)
                {
                    break spi;
                }
            };
            let sa = IkeSa::responder(config, spi, IpAddr::V4(Ipv4Addr::UNSPECIFIED), from, now);
            s.half_open.insert(spi, sa);
            spi
        };
        let Some(mut sa) = s.half_open.remove(&spi_r) else {
            return Err(Error::NoSession);
        };
        let result = sa.handle_input(port, from, d, now, &mut s.rng);
        if sa.is_established() {
            // The IKE_AUTH response and the CHILD_SA's keys stay in the SA
            // and go with it to its peer's tunnel.
            s.by_init.retain(|_, v| *v != spi_r);
            let identity = sa
                .remote_id()
                .and_then(|id| String::from_utf8(id.data.clone()).ok())
                .unwrap_or_default();
            s.authenticated.insert(spi_r, (identity, sa));
            let (identity, _) = &s.authenticated[&spi_r];
            return write_identity(identity, buf);
        }
        let reply = sa.poll_transmit();
        if !sa.awaits_init() && !sa.is_closed() {
            s.by_init.insert((from, h.spi_i), spi_r);
            s.half_open.insert(spi_r, sa);
        } else {
            s.by_init.retain(|_, v| *v != spi_r);
        }
        match (reply, result) {
            (Some(t), _) => copy_out(&seam_form(&t), buf).map(Incoming::Reply),
            (None, Err(r)) => Err(ike_error(r)),
            (None, Ok(())) => Err(Error::NoSession),
        }
    }
}

fn write_identity<'b>(identity: &str, buf: &'b mut [u8]) -> Result<Incoming<'b>, Error> {
    let out = buf.get_mut(..identity.len()).ok_or(Error::BufferTooSmall)?;
    out.copy_from_slice(identity.as_bytes());
    let identity = std::str::from_utf8(out).map_err(|_| Error::Malformed)?;
    Ok(Incoming::Authenticated { identity })
}

fn copy_out<'b>(bytes: &[u8], buf: &'b mut [u8]) -> Result<&'b [u8], Error> {
    let out = buf.get_mut(..bytes.len()).ok_or(Error::BufferTooSmall)?;
    out.copy_from_slice(bytes);
    Ok(out)
}

/// Which side of the IKE SA a tunnel is.
enum Role {
    /// The agent: dials `remote` with `config`.
    Initiator {
        config: Box<Config>,
        remote: SocketAddr,
    },
    /// The gateway: takes over SAs its responder authenticated for `entry`.
    Responder {
        shared: Arc<Mutex<Shared>>,
        entry: Arc<PeerEntry>,
    },
}

/// One peer's IPsec tunnel (see the module documentation).
pub struct Tunnel {
    role: Role,
    index: u32,
    settings: Settings,
    ike: Option<IkeSa>,
    current: Option<ChildPair>,
    previous: Option<ChildPair>,
    rng: StdRng,
    rekey_at: Option<Instant>,
    rekey_pending: bool,
    /// When we start the next IKE SA rekey; `None` while no IKE SA is up.
    ike_rekey_at: Option<Instant>,
    redial_at: Option<Instant>,
    /// IKE datagrams to send, in seam form.
    out: VecDeque<Vec<u8>>,
    /// Inner packets waiting for a CHILD_SA.
    queued: VecDeque<Vec<u8>>,
    events: VecDeque<TunnelEvent>,
    stats: TunnelStats,
    drops: DropCounters,
    /// The latest `now` seen (the seam's clock is the caller's).
    now: Instant,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ipsec::Tunnel")
            .field("index", &self.index)
            .field("initiator", &matches!(self.role, Role::Initiator { .. }))
            .field("ike", &self.ike.as_ref().map(IkeSa::spis))
            .field("child", &self.current.as_ref().map(|c| c.spi_in))
            .finish_non_exhaustive()
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.forget_spis();
    }
}

impl Tunnel {
    fn new(role: Role, index: u32, settings: Settings, seed: u64, now: Instant) -> Self {
        Self {
            now,
            role,
            index,
            settings,
            ike: None,
            current: None,
            previous: None,
            rng: StdRng::seed_from_u64(seed),
            rekey_at: None,
            rekey_pending: false,
            ike_rekey_at: None,
            redial_at: None,
            out: VecDeque::new(),
            queued: VecDeque::new(),
            events: VecDeque::new(),
            stats: TunnelStats::default(),
            drops: DropCounters::default(),
        }
    }

    /// The initiator configuration for `params` (`local_*`: the site).
    /// The proposals in `params` name the one suite the engine speaks.
    ///
    /// # Errors
    /// A PSK shorter than [`ike::MIN_PSK_LEN`].
    pub fn initiator_config(params: &IpsecParams) -> Result<Config, ike::PskTooShort> {
        Config::new(
            params.psk.as_bytes(),
            Id::fqdn(&params.local_id),
            Id::fqdn(&params.remote_id),
            selectors(&params.local_ts),
            selectors(&params.remote_ts),
        )
    }

    /// An initiator to `remote` (the gateway's IKE port), seeded from the
    /// operating system; it dials on [`super::Tunnel::initiate_handshake`].
    pub fn initiator(
        config: Config,
        remote: SocketAddr,
        index: u32,
        settings: Settings,
        now: Instant,
    ) -> Self {
        Self::initiator_seeded(
            config,
            remote,
            index,
            settings,
            StdRng::from_entropy().next_u64(),
            now,
        )
    }

    /// [`Self::initiator`] with its settings and randomness from `seed` (tests).
    pub fn initiator_seeded(
        config: Config,
        remote: SocketAddr,
        index: u32,
        settings: Settings,
        seed: u64,
        now: Instant,
    ) -> Self {
        Self::new(
            Role::Initiator {
                config: Box::new(config),
                remote,
            },
            index,
            settings,
            seed,
            now,
        )
    }

    /// This tunnel's own drop counters.
    pub fn drops(&self) -> DropCounters {
        self.drops
    }

    /// The IKE SA, if one is up or being set up.
    pub fn ike(&self) -> Option<&IkeSa> {
        self.ike.as_ref()
    }

    /// The current CHILD_SA's inbound and outbound SPIs.
    pub fn child_spis(&self) -> Option<(u32, u32)> {
        self.current.as_ref().map(|c| (c.spi_in, c.outbound.spi()))
    }

    /// Starts a CHILD_SA rekey now (it also starts by itself, by lifetime
    /// and sequence numbers).
    pub fn rekey_child(&mut self, now: Instant) {
        if let Some(sa) = self.ike.as_mut()
            && sa.is_established()
            && !self.rekey_pending
        {
            self.rekey_pending = true;
            sa.rekey_child(now, &mut self.rng);
            self.pump(now);
        }
    }

    /// Starts an IKE SA rekey now (it also starts by itself, by lifetime).
    pub fn rekey_ike(&mut self, now: Instant) {
        if let Some(sa) = self.ike.as_mut()
            && sa.is_established()
        {
            // Tried again after a while unless `IkeSaRekeyed` reschedules.
            self.ike_rekey_at = Some(now + REKEY_RETRY);
            sa.rekey_ike(now, &mut self.rng);
            self.pump(now);
        }
    }

    /// Seals `packet` with the current outbound SA without the selector
    /// check: what a misbehaving peer holding the keys could send (tests).
    #[cfg(test)]
    pub(crate) fn seal_unchecked(&mut self, packet: &[u8]) -> Option<Vec<u8>> {
        let c = self.current.as_mut()?;
        let mut buf = vec![0; esp::sealed_len(packet.len())];
        let n = c.outbound.seal(packet, &mut buf).ok()?;
        buf.truncate(n);
        Some(buf)
    }

    fn forget_spis(&mut self) {
        if let (Role::Responder { shared, .. }, Some(sa)) = (&self.role, &self.ike) {
            let spi_r = sa.spis().1;
            lock(shared).by_spi_r.remove(&spi_r);
        }
    }

    /// `life` less up to a tenth at random, so that both ends rarely start
    /// the same rekey at once (RFC 7296 §2.8.1).
    fn jittered(&mut self, life: Duration) -> Duration {
        let jitter = life / 10;
        if jitter.is_zero() {
            life
        } else {
            life - self.rng.gen_range(Duration::ZERO..jitter)
        }
    }

    fn schedule_rekey(&mut self, now: Instant) {
        self.rekey_at = Some(now + self.jittered(self.settings.child_lifetime));
        self.rekey_pending = false;
    }

    fn schedule_ike_rekey(&mut self, now: Instant) {
        self.ike_rekey_at = Some(now + self.jittered(self.settings.ike_lifetime));
    }

    /// Drains the engine: events applied, datagrams into `out`.
    fn pump(&mut self, now: Instant) {
        let Some(sa) = self.ike.as_mut() else { return };
        let mut evs = Vec::new();
        while let Some(e) = sa.poll_event() {
            evs.push(e);
        }
        while let Some(t) = sa.poll_transmit() {
            self.out.push_back(seam_form(&t));
        }
        for e in evs {
            self.apply(e, now);
        }
    }

    fn apply(&mut self, e: Event, now: Instant) {
        match e {
            Event::IkeSaUp { .. } => {}
            Event::ChildSaFailed { notify } => {
                tracing::debug!(index = self.index, notify, "CHILD_SA refused");
                if self.current.is_some() {
                    // A refused rekey: the SA in use stays; try again later.
                    self.rekey_pending = false;
                    self.rekey_at = Some(now + REKEY_RETRY);
                }
            }
            Event::ChildSaUp { sa, keys } => {
                self.current = Some(ChildPair::new(sa, &keys, self.settings.soft_limit));
                self.previous = None;
                self.handshake(now);
                self.flush_queued();
            }
            Event::ChildSaRekeyed {
                old_spi_in,
                new,
                keys,
            } => {
                let old = self.current.take();
                self.previous = old.filter(|c| c.spi_in == old_spi_in);
                self.current = Some(ChildPair::new(new, &keys, self.settings.soft_limit));
                self.handshake(now);
            }
            Event::ChildSaDeleted { spi_in, .. } => {
                if self.previous.as_ref().is_some_and(|c| c.spi_in == spi_in) {
                    self.previous = None;
                }
                if self.current.as_ref().is_some_and(|c| c.spi_in == spi_in) {
                    self.current = self.previous.take();
                }
            }
            Event::IkeSaRekeyed { spi_r, .. } => {
                self.schedule_ike_rekey(now);
                if let Role::Responder { shared, .. } = &self.role {
                    let mut s = lock(shared);
                    s.by_spi_r.retain(|_, i| *i != self.index);
                    s.by_spi_r.insert(spi_r, self.index);
                }
            }
            Event::IkeSaDown(reason) => {
                tracing::debug!(index = self.index, ?reason, "IKE SA down");
                if let Role::Responder { shared, .. } = &self.role {
                    lock(shared).by_spi_r.retain(|_, i| *i != self.index);
                }
                self.current = None;
                self.previous = None;
                self.rekey_at = None;
                self.rekey_pending = false;
                self.ike_rekey_at = None;
                if matches!(self.role, Role::Initiator { .. }) && reason != DownReason::Closed {
                    self.redial_at = Some(now + self.settings.redial_after);
                }
                self.events.push_back(TunnelEvent::Expired);
            }
        }
    }

    fn handshake(&mut self, now: Instant) {
        self.stats.handshakes += 1;
        self.stats.last_handshake = Some(now);
        self.events.push_back(TunnelEvent::HandshakeCompleted);
        self.schedule_rekey(now);
        if self.ike_rekey_at.is_none() {
            // The first CHILD_SA of this IKE SA: its lifetime starts.
            self.schedule_ike_rekey(now);
        }
    }

    /// Seals what waited for the CHILD_SA into `out`.
    fn flush_queued(&mut self) {
        while let Some(p) = self.queued.pop_front() {
            let mut buf = vec![0; esp::sealed_len(p.len())];
            if let Ok(n) = self.seal(&p, &mut buf) {
                buf.truncate(n);
                self.out.push_back(buf);
            }
        }
    }

    fn seal(&mut self, packet: &[u8], buf: &mut [u8]) -> Result<usize, Error> {
        let Some(c) = self.current.as_mut() else {
            return Err(Error::NoSession);
        };
        if !within(packet, &c.ts_local, &c.ts_remote) {
            self.drops.add(DropReason::OutboundOutsideSelectors);
            return Err(Error::OutsideSelectors);
        }
        let n = c.outbound.seal(packet, buf).map_err(|e| match e {
            esp::SealError::BufferTooSmall => Error::BufferTooSmall,
            esp::SealError::NotIp => Error::Malformed,
            esp::SealError::Exhausted => Error::NoSession,
        })?;
        self.stats.tx_packets += 1;
        self.stats.tx_bytes += packet.len() as u64;
        Ok(n)
    }

    /// Starts a new IKE SA (initiator only).
    fn dial(&mut self, now: Instant) -> bool {
        let Role::Initiator { config, remote } = &self.role else {
            return false;
        };
        let sa = IkeSa::initiator(
            Config::clone(config),
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            *remote,
            now,
            &mut self.rng,
        );
        self.ike = Some(sa);
        self.redial_at = None;
        self.ike_rekey_at = None;
        self.pump(now);
        true
    }

    /// The first datagram waiting in `out`, into `buf`.
    fn next_out<'b>(&mut self, buf: &'b mut [u8]) -> Option<&'b [u8]> {
        loop {
            let d = self.out.pop_front()?;
            if d.len() <= buf.len() {
                let out = &mut buf[..d.len()];
                out.copy_from_slice(&d);
                return Some(out);
            }
            if buf.len() >= usize::from(u16::MAX) {
                // No UDP datagram is longer.
                self.drops.add(DropReason::OversizeIke);
                continue;
            }
            // Too long for this buffer: it waits for `poll_network`.
            self.out.push_front(d);
            return None;
        }
    }

    /// Tries to take over an SA the responder authenticated for us.
    fn adopt(&mut self, spi_r: u64) -> bool {
        let Role::Responder { shared, entry } = &self.role else {
            return false;
        };
        let mut s = lock(shared);
        let Some((identity, _)) = s.authenticated.get(&spi_r) else {
            return false;
        };
        if *identity != entry.identity {
            return false;
        }
        let Some((_, sa)) = s.authenticated.remove(&spi_r) else {
            return false;
        };
        if let Some(old) = &self.ike {
            // The site started over (it restarted): the old SA goes.
            s.by_spi_r.remove(&old.spis().1);
        }
        s.by_spi_r.insert(spi_r, self.index);
        drop(s);
        self.ike = Some(sa);
        self.current = None;
        self.previous = None;
        self.ike_rekey_at = None;
        true
    }

    fn open<'b>(
        &mut self,
        esp_packet: &[u8],
        buf: &'b mut [u8],
    ) -> Result<Decapsulated<'b>, Error> {
        let spi = spi::esp_spi(esp_packet).ok_or(Error::Malformed)?;
        let pair = match (&mut self.current, &mut self.previous) {
            (Some(c), _) if c.spi_in == spi => c,
            (_, Some(p)) if p.spi_in == spi => p,
            _ => {
                self.drops.add(DropReason::UnknownSpi);
                return Err(Error::NoSession);
            }
        };
        let (len, _) = match pair.inbound.open(esp_packet, buf) {
            Ok(r) => r,
            Err(esp::DropReason::Dummy) => return Ok(Decapsulated::Nothing),
            Err(e) => {
                self.drops.add(DropReason::Esp);
                return Err(esp_error(e));
            }
        };
        let packet = &mut buf[..len];
        if !within(packet, &pair.ts_remote, &pair.ts_local) {
            self.drops.add(DropReason::InboundOutsideSelectors);
            return Err(Error::OutsideSelectors);
        }
        self.stats.rx_packets += 1;
        self.stats.rx_bytes += len as u64;
        Ok(Decapsulated::Tunnel(packet))
    }
}

impl super::Tunnel for Tunnel {
    fn has_session(&self) -> bool {
        self.current.is_some()
    }

    fn stats(&self) -> TunnelStats {
        self.stats
    }

    fn initiate_handshake<'b>(
        &mut self,
        buf: &'b mut [u8],
        force: bool,
        now: Instant,
    ) -> Result<Option<&'b [u8]>, Error> {
        if buf.len() < MIN_BUFFER_LEN {
            return Err(Error::BufferTooSmall);
        }
        let alive = self.ike.as_ref().is_some_and(|s| !s.is_closed());
        if alive && !force {
            return Ok(None);
        }
        if !self.dial(now) {
            // A responder waits for its site.
            return Ok(None);
        }
        Ok(self.next_out(buf))
    }

    fn encapsulate<'b>(
        &mut self,
        packet: &[u8],
        buf: &'b mut [u8],
        now: Instant,
    ) -> Result<Encapsulated<'b>, Error> {
        if self.current.is_none() {
            let Role::Initiator { .. } = self.role else {
                return Err(Error::NoSession);
            };
            if self.queued.len() >= MAX_QUEUED {
                self.drops.add(DropReason::QueueFull);
                return Err(Error::NoSession);
            }
            self.queued.push_back(packet.to_vec());
            if self.ike.as_ref().is_none_or(IkeSa::is_closed)
                && self.dial(now)
                && let Some(d) = self.next_out(buf)
            {
                return Ok(Encapsulated::Network(d));
            }
            return Ok(Encapsulated::Queued);
        }
        let n = self.seal(packet, buf)?;
        if self
            .current
            .as_ref()
            .is_some_and(|c| c.outbound.needs_rekey())
        {
            self.rekey_child(now);
        }
        Ok(Encapsulated::Network(&buf[..n]))
    }

    fn decapsulate<'b>(
        &mut self,
        from: Option<SocketAddr>,
        datagram: &[u8],
        buf: &'b mut [u8],
        now: Instant,
    ) -> Result<Decapsulated<'b>, Error> {
        let (port, d) = split(datagram);
        if port == ike::NAT_T_PORT {
            match natt::classify(d) {
                Ok(Udp4500::Keepalive) => return Ok(Decapsulated::Nothing),
                Ok(Udp4500::Esp(p)) => return self.open(p, buf),
                Ok(Udp4500::Ike(_)) => {}
                Err(natt::Malformed) => return Err(Error::Malformed),
            }
        }
        let Some((_, _, h)) = ike_message(datagram) else {
            return Err(Error::Malformed);
        };
        let ours = self
            .ike
            .as_ref()
            .is_some_and(|s| s.spis().1 == h.spi_r || s.spis().0 == h.spi_i);
        if !ours && self.adopt(h.spi_r) {
            // The IKE_AUTH response and the CHILD_SA come with the SA.
            self.pump(now);
            return Ok(self
                .next_out(buf)
                .map_or(Decapsulated::Nothing, Decapsulated::Network));
        }
        let Some(sa) = self.ike.as_mut() else {
            return Err(Error::NoSession);
        };
        let from = from.unwrap_or_else(|| sa.remote());
        let r = sa.handle_input(port, from, d, now, &mut self.rng);
        self.pump(now);
        if let Err(e) = r {
            self.drops.add(DropReason::Ike);
            return Err(ike_error(e));
        }
        Ok(self
            .next_out(buf)
            .map_or(Decapsulated::Nothing, Decapsulated::Network))
    }

    fn poll_network<'b>(&mut self, buf: &'b mut [u8]) -> Option<&'b [u8]> {
        self.next_out(buf)
    }

    fn poll_timeout(&self) -> Instant {
        let far = self.now + Duration::from_secs(3600);
        [
            self.ike.as_ref().and_then(IkeSa::poll_timeout),
            self.rekey_at.filter(|_| !self.rekey_pending),
            self.ike_rekey_at,
            self.redial_at,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(far)
    }

    fn handle_timeout<'b>(
        &mut self,
        buf: &'b mut [u8],
        now: Instant,
    ) -> Result<Option<&'b [u8]>, Error> {
        self.now = now;
        if let Some(sa) = self.ike.as_mut()
            && sa.poll_timeout().is_some_and(|t| now >= t)
        {
            sa.handle_timeout(now, &mut self.rng);
            self.pump(now);
        }
        if self.rekey_at.is_some_and(|t| now >= t)
            || self
                .current
                .as_ref()
                .is_some_and(|c| c.outbound.needs_rekey())
        {
            self.rekey_child(now);
        }
        if self.ike_rekey_at.is_some_and(|t| now >= t) {
            self.rekey_ike(now);
        }
        if self.redial_at.is_some_and(|t| now >= t) {
            self.dial(now);
        }
        if self.ike.as_ref().is_some_and(IkeSa::is_closed) {
            self.forget_spis();
            self.ike = None;
        }
        Ok(self.next_out(buf))
    }

    fn poll_event(&mut self) -> Option<TunnelEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests;
