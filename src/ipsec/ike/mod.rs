//! IKEv2 (RFC 7296), sans-IO: one IKE SA with one CHILD_SA, as the router
//! agent (initiator) or the gateway (responder) needs it.
//!
//! - [`wire`]: the message codec.
//! - [`crypto`]: PRF, prf+, key derivation, the SK payload, Diffie-Hellman.
//! - [`IkeSa`]: the state machine. Datagrams come in through
//!   [`IkeSa::handle_input`], time through [`IkeSa::handle_timeout`];
//!   datagrams to send are drained with [`IkeSa::poll_transmit`], outcomes
//!   (CHILD_SA keys, deletions, failure) with [`IkeSa::poll_event`]. The
//!   clock (`now`) and randomness (`rng`) are parameters; nothing here does
//!   IO.
//! - [`CookieJar`]: the stateless COOKIE answer of a responder under load
//!   (RFC 7296 §2.6), checked before an [`IkeSa`] is created.
//!
//! The one suite: AES-GCM-16 with 256-bit keys (RFC 5282) for the SK
//! payload and ESP, PRF-HMAC-SHA256, DH group 31 (Curve25519) or 14
//! (MODP-2048), PSK authentication. Proposals from a peer that offers many
//! are matched transform by transform.
//!
//! **Ports.** The caller owns two UDP sockets, 500 and 4500. Datagrams on
//! 4500 carry the 4-byte non-ESP marker before IKE messages (RFC 3948 §2.2);
//! [`IkeSa::handle_input`] takes the datagram as received and [`Transmit`]
//! holds the datagram to send, marker included. When NAT-D (§2.23) shows a
//! NAT on the path, the SA floats to 4500 after IKE_SA_INIT; when we are
//! the side behind the NAT, one-byte 0xFF keepalives go out (RFC 3948 §2.3).
//!
//! **Message IDs** (§2.1–2.3): one request in flight each way. A request is
//! retransmitted with doubling timeouts; when the last try goes unanswered
//! the SA is down ([`Event::IkeSaDown`]). A retransmitted peer request gets
//! the cached response; old or duplicate responses are dropped and counted.
//!
//! **Rekeying.** Either side may rekey the CHILD_SA (with or without a new
//! Diffie-Hellman exchange) and the IKE SA with CREATE_CHILD_SA (§1.3.2,
//! §1.3.3, §2.18). A simultaneous CHILD_SA rekey is resolved by the lowest
//! nonce (§2.8.1); only the surviving SA's keys are handed out, once
//! ([`ChildKeys`]). The rekey initiator deletes the old SA. A peer's IKE SA
//! rekey that meets a request of ours in flight is refused with
//! TEMPORARY_FAILURE (§2.25) and ours is retried later.
//!
//! **Peers.** A responder may choose the peer's PSK, selectors and tunnel
//! index by the identity in IKE_AUTH ([`PeerLookup`]); inbound CHILD_SA
//! SPIs carry the tunnel index (`esp::spi`). A half-open responder expires
//! ([`Config::half_open_timeout`]).

pub mod crypto;
pub mod wire;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{CryptoRng, RngCore};
use sha1::{Digest, Sha1};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::ipsec::esp;
use crate::ipsec::esp::natt::{self, Udp4500};

use self::crypto::{AeadKey, DhGroup, DhSecret, IkeKeys, NONCE_LEN};
use self::wire::{
    AUTH_SHARED_KEY_MIC, Header, Id, ParseError, Payload, Proposal, TrafficSelector, Transform,
    exchange, flags, notify, protocol, transform,
};

/// The IKE port.
pub const IKE_PORT: u16 = 500;
/// The NAT-T port (RFC 3948).
pub const NAT_T_PORT: u16 = 4500;
pub use crate::ipsec::esp::natt::NON_ESP_MARKER;

crate::drops::drop_reasons! {
    /// Why an IKE datagram was dropped.
    enum DropReason;
    /// The codec refused it (length, version, syntax).
    Malformed = "malformed",
    /// An unknown payload marked critical (answered with UNSUPPORTED_CRITICAL_PAYLOAD when it is a request).
    UnsupportedCritical = "unsupported_critical",
    /// On port 4500 without the non-ESP marker: an ESP packet, not ours.
    NotIke = "not_ike",
    /// The SPIs are not this SA's.
    WrongSpi = "wrong_spi",
    /// A request outside the window, or a response to no outstanding request.
    MessageId = "message_id",
    /// The SK payload did not decrypt (ICV, padding).
    Integrity = "integrity",
    /// The exchange makes no sense in this state, or a required payload is missing.
    Unexpected = "unexpected",
    /// The peer's Diffie-Hellman public value is invalid.
    InvalidPublic = "invalid_public",
    /// The SA is closed.
    Closed = "closed",
}

/// The shortest pre-shared key accepted: 16 bytes, 128 bits, so that an
/// offline guess from a captured AUTH payload (RFC 7296 §2.15, §5) is not
/// cheaper than breaking the cipher suite.
pub const MIN_PSK_LEN: usize = 16;

/// A pre-shared key shorter than [`MIN_PSK_LEN`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PskTooShort;

impl std::fmt::Display for PskTooShort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pre-shared key shorter than {MIN_PSK_LEN} bytes")
    }
}

impl std::error::Error for PskTooShort {}

fn checked_psk(psk: &[u8]) -> Result<Zeroizing<Vec<u8>>, PskTooShort> {
    if psk.len() < MIN_PSK_LEN {
        return Err(PskTooShort);
    }
    Ok(Zeroizing::new(psk.to_vec()))
}

/// What a responder learns about one peer once its identity (IDi) is known:
/// the answer of a [`PeerLookup`].
#[derive(Clone)]
pub struct Peer {
    psk: Zeroizing<Vec<u8>>,
    /// Our side of the peer's CHILD_SA selectors.
    pub local_ts: Vec<TrafficSelector>,
    /// The peer's side.
    pub remote_ts: Vec<TrafficSelector>,
    /// The tunnel index to build inbound CHILD_SA SPIs from (see
    /// [`Config::inbound_spi_index`]).
    pub inbound_spi_index: Option<u32>,
    /// The identity we present to this peer (IDr), when it is not the
    /// config's: the gateways name themselves after the site they answer
    /// (`gw-N.vpnnat`), so one responder has one local identity per peer.
    pub local_id: Option<Id>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("psk", &"<redacted>")
            .field("local_ts", &self.local_ts)
            .field("remote_ts", &self.remote_ts)
            .field("inbound_spi_index", &self.inbound_spi_index)
            .field("local_id", &self.local_id)
            .finish()
    }
}

impl Peer {
    /// Refuses a PSK shorter than [`MIN_PSK_LEN`].
    pub fn new(
        psk: &[u8],
        local_ts: Vec<TrafficSelector>,
        remote_ts: Vec<TrafficSelector>,
    ) -> Result<Self, PskTooShort> {
        Ok(Self {
            psk: checked_psk(psk)?,
            local_ts,
            remote_ts,
            inbound_spi_index: None,
            local_id: None,
        })
    }
}

/// The responder's choice of the peer's configuration by the identity it
/// presents in IKE_AUTH (IDi, RFC 7296 §2.15): `None` refuses it with
/// AUTHENTICATION_FAILED. Called once per IKE SA, before the peer's AUTH
/// payload is checked; it must not block (no IO).
pub type PeerLookup = Arc<dyn Fn(&Id) -> Option<Peer> + Send + Sync>;

/// What a [`IkeSa`] needs to know.
#[derive(Clone)]
pub struct Config {
    /// The pre-shared key (at least [`MIN_PSK_LEN`] bytes), wiped on drop.
    psk: Zeroizing<Vec<u8>>,
    /// Our identity.
    pub local_id: Id,
    /// The identity the peer must present. `None` is only meaningful with
    /// [`Config::peer_lookup`], which then decides; without one, no identity
    /// is accepted.
    pub remote_id: Option<Id>,
    /// A responder's per-identity configuration; when set, it replaces the
    /// PSK, the selectors and the SPI index of this config at IKE_AUTH.
    pub peer_lookup: Option<PeerLookup>,
    /// Our inbound CHILD_SA SPIs carry this tunnel index
    /// ([`crate::ipsec::esp::spi::spi_from_index`]), so that SPIs are unique
    /// across all peers sharing UDP 4500; `None` draws them at random.
    pub inbound_spi_index: Option<u32>,
    /// Groups in order of preference; the initiator's first KE uses the first.
    pub groups: Vec<DhGroup>,
    /// Our side of the CHILD_SA's traffic selectors.
    pub local_ts: Vec<TrafficSelector>,
    /// The peer's side.
    pub remote_ts: Vec<TrafficSelector>,
    /// A new Diffie-Hellman exchange in CHILD_SA rekeys we start.
    pub pfs: bool,
    /// The first retransmission timeout; it doubles after each try.
    pub retransmit_base: Duration,
    /// Sends of one request before the peer is declared dead.
    pub retransmit_tries: u32,
    /// Inbound silence after which a liveness check (empty INFORMATIONAL) goes out.
    pub dpd_interval: Duration,
    /// Interval of NAT keepalives when we are behind a NAT.
    pub keepalive_interval: Duration,
    /// How long a responder waits for IKE_AUTH after answering IKE_SA_INIT
    /// before it gives the half-open SA up (`IkeSaDown(Timeout)`).
    pub half_open_timeout: Duration,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("psk", &"<redacted>")
            .field("local_id", &self.local_id)
            .field("remote_id", &self.remote_id)
            .field("peer_lookup", &self.peer_lookup.is_some())
            .field("inbound_spi_index", &self.inbound_spi_index)
            .field("groups", &self.groups)
            .field("local_ts", &self.local_ts)
            .field("remote_ts", &self.remote_ts)
            .field("pfs", &self.pfs)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// A configuration for one known peer. Refuses a PSK shorter than
    /// [`MIN_PSK_LEN`]. Defaults: groups 31 then 14, PFS on, random inbound
    /// SPIs, retransmissions after 1, 2, 4, 8 and 16 s, liveness check after
    /// 30 s of silence, keepalives every 20 s.
    pub fn new(
        psk: &[u8],
        local_id: Id,
        remote_id: Id,
        local_ts: Vec<TrafficSelector>,
        remote_ts: Vec<TrafficSelector>,
    ) -> Result<Self, PskTooShort> {
        Ok(Self::base(
            checked_psk(psk)?,
            local_id,
            Some(remote_id),
            None,
            local_ts,
            remote_ts,
        ))
    }

    /// A responder configuration that picks the peer's PSK, selectors and
    /// SPI index by its identity with `lookup`; the other defaults as
    /// [`Config::new`].
    pub fn with_lookup(local_id: Id, lookup: PeerLookup) -> Self {
        Self::base(
            Zeroizing::new(Vec::new()),
            local_id,
            None,
            Some(lookup),
            Vec::new(),
            Vec::new(),
        )
    }

    fn base(
        psk: Zeroizing<Vec<u8>>,
        local_id: Id,
        remote_id: Option<Id>,
        peer_lookup: Option<PeerLookup>,
        local_ts: Vec<TrafficSelector>,
        remote_ts: Vec<TrafficSelector>,
    ) -> Self {
        Self {
            psk,
            local_id,
            remote_id,
            peer_lookup,
            inbound_spi_index: None,
            groups: vec![DhGroup::Curve25519, DhGroup::Modp2048],
            local_ts,
            remote_ts,
            pfs: true,
            retransmit_base: Duration::from_secs(1),
            retransmit_tries: 5,
            dpd_interval: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(20),
            half_open_timeout: Duration::from_secs(30),
        }
    }

    /// Replaces the PSK; refuses one shorter than [`MIN_PSK_LEN`].
    pub fn set_psk(&mut self, psk: &[u8]) -> Result<(), PskTooShort> {
        self.psk = checked_psk(psk)?;
        Ok(())
    }

    /// Applies the answer of the peer lookup for the identity `id`.
    fn adopt(&mut self, id: &Id, peer: Peer) {
        self.psk = peer.psk;
        self.remote_id = Some(id.clone());
        self.local_ts = peer.local_ts;
        self.remote_ts = peer.remote_ts;
        self.inbound_spi_index = peer.inbound_spi_index;
        if let Some(local_id) = peer.local_id {
            self.local_id = local_id;
        }
    }
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The local port to send from: 500 or 4500.
    pub local_port: u16,
    pub remote: SocketAddr,
    /// The datagram, with the non-ESP marker when `local_port` is 4500.
    pub payload: Vec<u8>,
}

/// The SPIs and selectors of one ESP SA pair; its keys are handed out once,
/// in the [`ChildKeys`] of the event that installs it.
#[derive(Clone, PartialEq, Eq)]
pub struct ChildSa {
    /// The SPI the peer puts on packets to us.
    pub spi_in: u32,
    /// The SPI we put on packets to the peer.
    pub spi_out: u32,
    /// Our traffic selectors, after narrowing.
    pub ts_local: Vec<TrafficSelector>,
    /// The peer's traffic selectors, after narrowing.
    pub ts_remote: Vec<TrafficSelector>,
}

impl std::fmt::Debug for ChildSa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildSa")
            .field("spi_in", &format_args!("{:#010x}", self.spi_in))
            .field("spi_out", &format_args!("{:#010x}", self.spi_out))
            .field("ts_local", &self.ts_local)
            .field("ts_remote", &self.ts_remote)
            .finish_non_exhaustive()
    }
}

/// The keys of one ESP SA pair, given out exactly once ([`Event::ChildSaUp`],
/// [`Event::ChildSaRekeyed`]) and neither kept nor cloneable: an outbound SA
/// built from them starts its sequence (the AES-GCM IV, RFC 4106 §3.1) at 1,
/// so a second SA under the same key would repeat IVs.
#[derive(PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct ChildKeys {
    /// AES-256-GCM key ‖ salt for inbound packets.
    pub key_in: AeadKey,
    /// AES-256-GCM key ‖ salt for outbound packets.
    pub key_out: AeadKey,
}

impl std::fmt::Debug for ChildKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChildKeys(<redacted>)")
    }
}

/// Why the IKE SA ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownReason {
    /// The peer deleted it.
    DeletedByPeer,
    /// We deleted it ([`IkeSa::close`]).
    Closed,
    /// A request went unanswered through every retransmission (dead peer).
    Timeout,
    /// The peer's AUTH did not verify, or it refused ours.
    AuthenticationFailed,
    /// The peer refused the request with this error notify type.
    Refused(u16),
}

/// What happened, for the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// IKE_AUTH completed: the IKE SA is established.
    IkeSaUp { spi_i: u64, spi_r: u64 },
    /// The CHILD_SA is installed: start ESP with these keys.
    ChildSaUp { sa: ChildSa, keys: ChildKeys },
    /// A rekey installed `new`; the SA whose inbound SPI is `old_spi_in`
    /// stays valid until its [`Event::ChildSaDeleted`].
    ChildSaRekeyed {
        old_spi_in: u32,
        new: ChildSa,
        keys: ChildKeys,
    },
    /// The CHILD_SA could not be created (the IKE SA stays up).
    ChildSaFailed { notify: u16 },
    /// The CHILD_SA pair is gone.
    ChildSaDeleted { spi_in: u32, spi_out: u32 },
    /// The IKE SA was rekeyed; it now has these SPIs.
    IkeSaRekeyed { spi_i: u64, spi_r: u64 },
    /// The IKE SA (and every CHILD_SA with it) is gone.
    IkeSaDown(DownReason),
}

/// Counters of one IKE SA.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub drops: DropCounters,
    /// Requests we sent again.
    pub retransmissions: u64,
    /// Retransmitted peer requests answered from the cache.
    pub cached_responses: u64,
    /// NAT keepalives sent.
    pub keepalives: u64,
}

/// The stateless COOKIE check of a responder (RFC 7296 §2.6): when the
/// caller is under load, an IKE_SA_INIT without a valid cookie gets one
/// back and no state is created.
///
/// The secret is rotated by the caller ([`CookieJar::rotate`], e.g. every
/// few minutes); cookies carry the version of their secret and those of the
/// current and the previous one are accepted (§2.6).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct CookieJar {
    version: u8,
    current: [u8; 32],
    previous: Option<[u8; 32]>,
}

impl std::fmt::Debug for CookieJar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CookieJar(<redacted>)")
    }
}

impl CookieJar {
    pub fn new(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        let mut current = [0; 32];
        rng.fill_bytes(&mut current);
        Self {
            version: 0,
            current,
            previous: None,
        }
    }

    /// A new secret; cookies made with the one before stay valid until the
    /// next rotation.
    pub fn rotate(&mut self, rng: &mut (impl RngCore + CryptoRng)) {
        let mut next = [0; 32];
        rng.fill_bytes(&mut next);
        self.previous = Some(std::mem::replace(&mut self.current, next));
        self.version = self.version.wrapping_add(1);
    }

    fn cookie(
        version: u8,
        secret: &[u8; 32],
        ni: &[u8],
        remote: SocketAddr,
        spi_i: u64,
    ) -> Vec<u8> {
        // Cookie = <VersionIDofSecret> | H(Ni | IPi | SPIi | <secret>)
        // (§2.6), the hash an HMAC keyed by the secret.
        let ip = match remote.ip() {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        let h = crypto::prf(secret, &[ni, &ip, &spi_i.to_be_bytes()]);
        [&[version][..], &h].concat()
    }

    /// The cookie's secret by its version byte: the current or the previous one.
    fn secret_of(&self, cookie: &[u8]) -> Option<(u8, &[u8; 32])> {
        let v = *cookie.first()?;
        if v == self.version {
            Some((v, &self.current))
        } else if v == self.version.wrapping_sub(1) {
            self.previous.as_ref().map(|p| (v, p))
        } else {
            None
        }
    }

    /// Checks an IKE_SA_INIT request (`message`, marker removed). `Ok` means
    /// go on and create the responder; `Err(Some(reply))` is the cookie
    /// answer to send back from the port the request came to; `Err(None)`
    /// means drop (not a parsable IKE_SA_INIT request).
    pub fn check(
        &self,
        message: &[u8],
        remote: SocketAddr,
        under_load: bool,
    ) -> Result<(), Option<Vec<u8>>> {
        let m = wire::parse(message).map_err(|_| None)?;
        let h = m.header;
        if h.exchange != exchange::IKE_SA_INIT
            || h.is_response()
            || h.spi_r != 0
            || h.message_id != 0
        {
            return Err(None);
        }
        if !under_load {
            return Ok(());
        }
        let ni = m.chain.payloads.iter().find_map(|p| match p {
            Payload::Nonce(n) => Some(n.as_slice()),
            _ => None,
        });
        let Some(ni) = ni else { return Err(None) };
        // §2.6: the COOKIE notify must be the first payload.
        if let Some(Payload::Notify {
            kind: notify::COOKIE,
            data,
            ..
        }) = m.chain.payloads.first()
            && let Some((v, secret)) = self.secret_of(data)
            && crypto::ct_eq(data, &Self::cookie(v, secret, ni, remote, h.spi_i))
        {
            return Ok(());
        }
        let want = Self::cookie(self.version, &self.current, ni, remote, h.spi_i);
        let reply = Header {
            spi_i: h.spi_i,
            spi_r: 0,
            next_payload: 0,
            exchange: exchange::IKE_SA_INIT,
            flags: flags::RESPONSE,
            message_id: 0,
            length: 0,
        };
        Err(Some(wire::encode(
            reply,
            &[Payload::notify(notify::COOKIE, &want)],
        )))
    }
}

/// A request of ours that awaits its response.
struct Outstanding {
    message_id: u32,
    bytes: Vec<u8>,
    tries: u32,
    next_at: Instant,
    kind: Request,
}

enum Request {
    Init,
    Auth,
    Informational,
    DeleteChild {
        spi_in: u32,
    },
    DeleteIke,
    RekeyChild(PendingRekey),
    RekeyIke {
        new_spi: u64,
        ni: Vec<u8>,
        dh: DhSecret,
    },
}

struct PendingRekey {
    old_spi_in: u32,
    new_spi_in: u32,
    ni: Vec<u8>,
    dh: Option<DhSecret>,
}

/// Something the caller asked for, waiting for the request window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    RekeyChild(Option<DhGroup>),
    /// With the group a peer asked for in INVALID_KE_PAYLOAD.
    RekeyIke(Option<DhGroup>),
    DeleteChild(u32),
    Close,
    Dpd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Responder before the IKE_SA_INIT request.
    Idle,
    /// Initiator: IKE_SA_INIT sent.
    InitSent,
    /// Initiator: IKE_AUTH sent. Responder: IKE_SA_INIT answered.
    AuthPending,
    Established,
    Closed,
}

/// The result of a peer-initiated CHILD_SA rekey we answered, kept to
/// resolve a collision with our own (§2.8.1).
struct PeerRekey {
    old_spi_in: u32,
    new_spi_in: u32,
    lowest_nonce: Vec<u8>,
}

/// An IKE SA replaced by a rekey (§2.18): it lives until the Delete
/// exchange on it is done.
struct OldIke {
    spi_i: u64,
    spi_r: u64,
    keys: IkeKeys,
    original_initiator: bool,
    expected_request_id: u32,
    last_response: Option<(u32, Vec<u8>)>,
    iv: u64,
    /// Our Delete of it (we started the rekey): bytes, sends so far, next retransmission.
    delete: Option<(Vec<u8>, u32, Instant)>,
    /// Once we answered the peer's request on it (its Delete), it is kept
    /// only as long as the peer may retransmit that request.
    expires: Option<Instant>,
}

/// One IKE SA and its CHILD_SA. See the [module documentation](self).
pub struct IkeSa {
    config: Config,
    phase: Phase,
    /// We were the initiator of the current IKE SA (the I flag; §2.18 makes
    /// the rekey initiator the new original initiator).
    original_initiator: bool,
    spi_i: u64,
    spi_r: u64,
    local_ip: IpAddr,
    remote: SocketAddr,
    local_port: u16,
    behind_nat: bool,
    keys: Option<IkeKeys>,
    /// The group of the IKE SA's key exchange: used first for PFS and IKE rekeys.
    ike_group: Option<DhGroup>,
    iv: u64,
    dh: Option<DhSecret>,
    ni: Vec<u8>,
    nr: Vec<u8>,
    init_request: Vec<u8>,
    init_response: Vec<u8>,
    cookie: Option<Vec<u8>>,
    cookie_retries: u32,
    ke_retries: u32,
    /// The last unprotected error notify answering our IKE_SA_INIT.
    init_error: Option<u16>,
    next_request_id: u32,
    outstanding: Option<Outstanding>,
    expected_request_id: u32,
    last_response: Option<(u32, Vec<u8>)>,
    actions: VecDeque<Action>,
    child: Option<ChildSa>,
    /// CHILD_SAs replaced by a rekey, until deleted.
    old_children: Vec<ChildSa>,
    peer_rekey: Option<PeerRekey>,
    /// Our inbound SPI offered in IKE_AUTH.
    pending_auth_spi: u32,
    /// The IKE SA replaced by a rekey, until its Delete exchange is done.
    old_ike: Option<OldIke>,
    /// When to try again an IKE rekey the peer refused with TEMPORARY_FAILURE.
    rekey_ike_retry: Option<Instant>,
    /// Responder: when the half-open SA (IKE_SA_INIT answered, no IKE_AUTH
    /// yet) is given up.
    half_open_until: Option<Instant>,
    last_inbound: Instant,
    next_keepalive: Option<Instant>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    stats: Stats,
}

impl std::fmt::Debug for IkeSa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IkeSa")
            .field("phase", &self.phase)
            .field("spi_i", &format_args!("{:#018x}", self.spi_i))
            .field("spi_r", &format_args!("{:#018x}", self.spi_r))
            .field("remote", &self.remote)
            .field("local_port", &self.local_port)
            .finish_non_exhaustive()
    }
}

fn random_nonce(rng: &mut (impl RngCore + CryptoRng)) -> Vec<u8> {
    let mut n = vec![0; NONCE_LEN];
    rng.fill_bytes(&mut n);
    n
}

fn nat_hash(spi_i: u64, spi_r: u64, addr: SocketAddr) -> [u8; 20] {
    // RFC 7296 §2.23: SHA-1(SPIi | SPIr | IP | port).
    let mut h = Sha1::new();
    h.update(spi_i.to_be_bytes());
    h.update(spi_r.to_be_bytes());
    match addr.ip() {
        IpAddr::V4(a) => h.update(a.octets()),
        IpAddr::V6(a) => h.update(a.octets()),
    }
    h.update(addr.port().to_be_bytes());
    h.finalize().into()
}

fn ike_proposal(groups: &[DhGroup], spi: &[u8]) -> Proposal {
    let mut transforms = vec![
        Transform::new(transform::ENCR, transform::ENCR_AES_GCM_16, Some(256)),
        Transform::new(transform::PRF, transform::PRF_HMAC_SHA2_256, None),
    ];
    transforms.extend(
        groups
            .iter()
            .map(|g| Transform::new(transform::DH, g.id(), None)),
    );
    Proposal {
        num: 1,
        protocol: protocol::IKE,
        spi: spi.to_vec(),
        transforms,
    }
}

fn esp_proposal(spi: u32, groups: &[DhGroup]) -> Proposal {
    let mut transforms = vec![Transform::new(
        transform::ENCR,
        transform::ENCR_AES_GCM_16,
        Some(256),
    )];
    transforms.extend(
        groups
            .iter()
            .map(|g| Transform::new(transform::DH, g.id(), None)),
    );
    transforms.push(Transform::new(transform::ESN, transform::ESN_NONE, None));
    Proposal {
        num: 1,
        protocol: protocol::ESP,
        spi: spi.to_be_bytes().to_vec(),
        transforms,
    }
}

/// The outcome of matching a peer's SA payload.
enum Choice {
    /// Proposal number, the peer's SPI, the group (when one was negotiated).
    Chosen(u8, Vec<u8>, Option<DhGroup>),
    /// Acceptable, but the KE payload is of another group: ask for this one.
    WrongKe(DhGroup),
    None,
}

/// Matches the peer's proposals transform by transform (RFC 7296 §3.3.6).
/// `ke` is the group of the KE payload that came with them, if any; for
/// ESP without KE the DH transforms are ignored (IKE_AUTH, §1.2).
fn choose(props: &[Proposal], proto: u8, ours: &[DhGroup], ke: Option<u16>) -> Choice {
    let mut fallback = None;
    for p in props {
        if p.protocol != proto {
            continue;
        }
        let spi_ok = match proto {
            protocol::IKE => p.spi.is_empty() || p.spi.len() == 8,
            _ => p.spi.len() == 4,
        };
        let of = |kind: u8| {
            p.transforms
                .iter()
                .filter(move |t| t.kind == kind && !t.unknown_attr)
        };
        let has = |kind: u8| p.transforms.iter().any(|t| t.kind == kind);
        let encr = of(transform::ENCR)
            .any(|t| t.id == transform::ENCR_AES_GCM_16 && t.key_len == Some(256));
        let integ = !has(transform::INTEG) || of(transform::INTEG).any(|t| t.id == 0);
        let prf = proto != protocol::IKE
            || of(transform::PRF).any(|t| t.id == transform::PRF_HMAC_SHA2_256);
        let esn = !has(transform::ESN) || of(transform::ESN).any(|t| t.id == transform::ESN_NONE);
        if !(spi_ok && encr && integ && prf && esn) {
            continue;
        }
        let offered: Vec<DhGroup> = of(transform::DH)
            .filter_map(|t| DhGroup::from_id(t.id))
            .collect();
        let needs_dh = proto == protocol::IKE || ke.is_some();
        if !needs_dh {
            return Choice::Chosen(p.num, p.spi.clone(), None);
        }
        if let Some(g) = ke
            .and_then(DhGroup::from_id)
            .filter(|g| offered.contains(g) && ours.contains(g))
        {
            return Choice::Chosen(p.num, p.spi.clone(), Some(g));
        }
        if fallback.is_none() {
            fallback = ours.iter().copied().find(|g| offered.contains(g));
        }
    }
    fallback.map_or(Choice::None, Choice::WrongKe)
}

/// §2.9 narrowing: the parts of the peer's selectors that our policy allows.
/// The most traffic selectors taken from, or put in, one TS payload: a
/// peer's long list times our policy must neither grow quadratically nor
/// overflow the payload's one-byte count (RFC 7296 §3.13).
const MAX_SELECTORS: usize = 16;

/// The intersections of the peer's selectors with our policy; `None` when
/// the peer sent more than [`MAX_SELECTORS`] or there would be more.
fn narrow(peer: &[TrafficSelector], policy: &[TrafficSelector]) -> Option<Vec<TrafficSelector>> {
    if peer.len() > MAX_SELECTORS {
        return None;
    }
    let mut out: Vec<TrafficSelector> = Vec::new();
    for a in peer {
        for b in policy {
            if let Some(c) = a.intersect(b)
                && !out.contains(&c)
            {
                if out.len() == MAX_SELECTORS {
                    return None;
                }
                out.push(c);
            }
        }
    }
    Some(out)
}

/// Replaced CHILD_SAs kept until their Delete exchange: the one a rekey
/// replaces, and one more for a rekey racing its Delete.
const MAX_OLD_CHILDREN: usize = 2;

/// Why a CHILD_SA request is refused: the error notify and, for
/// INVALID_KE_PAYLOAD, the group (one the peer offered) to ask for.
#[derive(Debug, PartialEq, Eq)]
struct Refusal {
    notify: u16,
    group: Option<DhGroup>,
}

impl From<u16> for Refusal {
    fn from(notify: u16) -> Self {
        Self {
            notify,
            group: None,
        }
    }
}

/// Every selector of `got` lies inside one of `proposed`.
fn within(got: &[TrafficSelector], proposed: &[TrafficSelector]) -> bool {
    !got.is_empty()
        && got
            .iter()
            .all(|g| proposed.iter().any(|p| p.intersect(g) == Some(*g)))
}

/// The group an INVALID_KE_PAYLOAD notify asks for (its data: the 2-byte
/// group number, RFC 7296 §3.10.1), when it is one we know.
fn asked_group(data: &[u8]) -> Option<DhGroup> {
    data.try_into()
        .ok()
        .map(u16::from_be_bytes)
        .and_then(DhGroup::from_id)
}

/// The wait before send number `tries + 1` of a request: the base,
/// doubling after each send (capped so that it cannot overflow).
fn backoff(base: Duration, tries: u32) -> Duration {
    base.saturating_mul(1u32 << tries.saturating_sub(1).min(16))
}

fn spi_u32(spi: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(spi.try_into().ok()?))
}

/// A CHILD_SA SPI the peer chose: four bytes, outside the reserved 0–255
/// (RFC 4303 §2.1).
fn peer_spi(spi: &[u8]) -> Option<u32> {
    spi_u32(spi).filter(|s| *s > 255)
}

/// Payload lookups in a decrypted or plain chain.
struct Found<'a> {
    sa: Option<&'a [Proposal]>,
    ke: Option<(u16, &'a [u8])>,
    nonce: Option<&'a [u8]>,
    idi: Option<&'a Id>,
    idr: Option<&'a Id>,
    auth: Option<(u8, &'a [u8])>,
    tsi: Option<&'a [TrafficSelector]>,
    tsr: Option<&'a [TrafficSelector]>,
    notifies: Vec<(u8, &'a [u8], u16, &'a [u8])>,
    deletes: Vec<(u8, &'a [Vec<u8>])>,
}

impl<'a> Found<'a> {
    fn new(ps: &'a [Payload]) -> Self {
        let mut f = Found {
            sa: None,
            ke: None,
            nonce: None,
            idi: None,
            idr: None,
            auth: None,
            tsi: None,
            tsr: None,
            notifies: Vec::new(),
            deletes: Vec::new(),
        };
        for p in ps {
            match p {
                Payload::Sa(v) => f.sa = Some(v),
                Payload::Ke { group, data } => f.ke = Some((*group, data)),
                Payload::Nonce(n) => f.nonce = Some(n),
                Payload::IdI(id) => f.idi = Some(id),
                Payload::IdR(id) => f.idr = Some(id),
                Payload::Auth { method, data } => f.auth = Some((*method, data)),
                Payload::TsI(t) => f.tsi = Some(t),
                Payload::TsR(t) => f.tsr = Some(t),
                Payload::Notify {
                    protocol,
                    spi,
                    kind,
                    data,
                } => f.notifies.push((*protocol, spi, *kind, data)),
                Payload::Delete { protocol, spis, .. } => f.deletes.push((*protocol, spis)),
            }
        }
        f
    }

    fn notify(&self, kind: u16) -> Option<&'a [u8]> {
        self.notifies.iter().find(|n| n.2 == kind).map(|n| n.3)
    }

    /// The first error notify (type below 16384, §3.10.1).
    fn error(&self) -> Option<u16> {
        self.notifies
            .iter()
            .map(|n| n.2)
            .find(|k| *k < notify::FIRST_STATUS)
    }
}

impl IkeSa {
    fn blank(
        config: Config,
        local_ip: IpAddr,
        remote: SocketAddr,
        original_initiator: bool,
        now: Instant,
    ) -> Self {
        Self {
            config,
            phase: Phase::Idle,
            original_initiator,
            spi_i: 0,
            spi_r: 0,
            local_ip,
            remote,
            local_port: IKE_PORT,
            behind_nat: false,
            keys: None,
            ike_group: None,
            iv: 0,
            dh: None,
            ni: Vec::new(),
            nr: Vec::new(),
            init_request: Vec::new(),
            init_response: Vec::new(),
            cookie: None,
            cookie_retries: 0,
            ke_retries: 0,
            init_error: None,
            next_request_id: 0,
            outstanding: None,
            expected_request_id: 0,
            last_response: None,
            actions: VecDeque::new(),
            child: None,
            old_children: Vec::new(),
            peer_rekey: None,
            pending_auth_spi: 0,
            old_ike: None,
            rekey_ike_retry: None,
            half_open_until: None,
            last_inbound: now,
            next_keepalive: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    /// An initiator that sends IKE_SA_INIT to `remote` (port 500) from
    /// `local_ip` port 500 right away.
    pub fn initiator(
        config: Config,
        local_ip: IpAddr,
        remote: SocketAddr,
        now: Instant,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Self {
        let mut sa = Self::blank(config, local_ip, remote, true, now);
        loop {
            sa.spi_i = rng.next_u64();
            if sa.spi_i != 0 {
                break;
            }
        }
        sa.ni = random_nonce(rng);
        let group = sa
            .config
            .groups
            .first()
            .copied()
            .unwrap_or(DhGroup::Curve25519);
        sa.dh = Some(DhSecret::generate(group, rng));
        sa.phase = Phase::InitSent;
        sa.send_init(now);
        sa
    }

    /// A responder for an IKE_SA_INIT request that will arrive through
    /// [`IkeSa::handle_input`]. `spi_r` is our SPI (non-zero; the caller may
    /// encode what it needs to route in it); `local_ip` is the address the
    /// request was sent to (for NAT detection).
    ///
    /// A responder still [`IkeSa::awaits_init`] after `handle_input` has
    /// answered statelessly (INVALID_KE_PAYLOAD, NO_PROPOSAL_CHOSEN) or
    /// dropped the datagram holds nothing worth keeping: the caller drops
    /// it. One that answered is half-open until IKE_AUTH and goes down with
    /// [`DownReason::Timeout`] after [`Config::half_open_timeout`]; a caller
    /// counting its half-open SAs turns [`CookieJar`] on above a limit.
    pub fn responder(
        config: Config,
        spi_r: u64,
        local_ip: IpAddr,
        remote: SocketAddr,
        now: Instant,
    ) -> Self {
        let mut sa = Self::blank(config, local_ip, remote, false, now);
        sa.spi_r = spi_r;
        sa
    }

    /// A responder that has not answered an IKE_SA_INIT request yet.
    pub fn awaits_init(&self) -> bool {
        self.phase == Phase::Idle
    }

    /// The SPIs (initiator's, responder's) of the current IKE SA.
    pub fn spis(&self) -> (u64, u64) {
        (self.spi_i, self.spi_r)
    }

    /// Where IKE messages go now (the peer's address and port).
    pub fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// The local port in use: 500, or 4500 after floating.
    pub fn local_port(&self) -> u16 {
        self.local_port
    }

    /// NAT-D showed a NAT on the path (we float to 4500 and ESP is UDP-encapsulated).
    pub fn nat_detected(&self) -> bool {
        self.local_port == NAT_T_PORT
    }

    /// We are behind a NAT (we send keepalives).
    pub fn behind_nat(&self) -> bool {
        self.behind_nat
    }

    pub fn is_established(&self) -> bool {
        self.phase == Phase::Established
    }

    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// The identity the peer must present, or presented: after IKE_AUTH
    /// with a [`PeerLookup`], the IDi it authenticated with.
    pub fn remote_id(&self) -> Option<&Id> {
        self.config.remote_id.as_ref()
    }

    /// The current CHILD_SA.
    pub fn child(&self) -> Option<&ChildSa> {
        self.child.as_ref()
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Starts a CHILD_SA rekey (with a new DH exchange when `config.pfs`).
    pub fn rekey_child(&mut self, now: Instant, rng: &mut (impl RngCore + CryptoRng)) {
        let g = if self.config.pfs {
            self.preferred_group()
        } else {
            None
        };
        self.actions.push_back(Action::RekeyChild(g));
        self.drive(now, rng);
    }

    /// Starts an IKE SA rekey.
    pub fn rekey_ike(&mut self, now: Instant, rng: &mut (impl RngCore + CryptoRng)) {
        self.actions.push_back(Action::RekeyIke(None));
        self.drive(now, rng);
    }

    /// The group for a new key exchange: the IKE SA's, else our first.
    fn preferred_group(&self) -> Option<DhGroup> {
        self.ike_group
            .or_else(|| self.config.groups.first().copied())
    }

    /// Deletes the CHILD_SA.
    pub fn delete_child(&mut self, now: Instant, rng: &mut (impl RngCore + CryptoRng)) {
        if let Some(c) = &self.child {
            self.actions.push_back(Action::DeleteChild(c.spi_in));
            self.drive(now, rng);
        }
    }

    /// Deletes the IKE SA (and its CHILD_SA); [`Event::IkeSaDown`] follows
    /// when the peer answers or the retransmissions run out.
    pub fn close(&mut self, now: Instant, rng: &mut (impl RngCore + CryptoRng)) {
        if self.phase != Phase::Established {
            // Nothing to delete with the peer before IKE_AUTH completed
            // (there is no Delete without an authenticated SA, §1.4).
            self.go_down(DownReason::Closed);
            return;
        }
        self.actions.push_back(Action::Close);
        self.drive(now, rng);
    }

    /// When [`IkeSa::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.phase == Phase::Closed {
            return None;
        }
        let mut t: Option<Instant> = self.outstanding.as_ref().map(|o| o.next_at);
        let mut earliest = |x: Instant| t = Some(t.map_or(x, |y| y.min(x)));
        if self.phase == Phase::Established && self.outstanding.is_none() {
            earliest(self.last_inbound + self.config.dpd_interval);
        }
        if let Some(k) = self.next_keepalive {
            earliest(k);
        }
        if let Some(r) = self.rekey_ike_retry {
            earliest(r);
        }
        if let Some(x) = self.old_ike.as_ref().and_then(|o| o.expires) {
            earliest(x);
        }
        if self.phase == Phase::AuthPending
            && let Some(h) = self.half_open_until
        {
            earliest(h);
        }
        if let Some((_, _, at)) = self.old_ike.as_ref().and_then(|o| o.delete.as_ref()) {
            earliest(*at);
        }
        t
    }

    /// Retransmissions, liveness checks and keepalives that are due.
    pub fn handle_timeout(&mut self, now: Instant, rng: &mut (impl RngCore + CryptoRng)) {
        if self.phase == Phase::Closed {
            return;
        }
        if self.phase == Phase::AuthPending && self.half_open_until.is_some_and(|h| now >= h) {
            // No IKE_AUTH came: a half-open SA holds keys and the peer's
            // message; it must not outlive a spoofed or abandoned IKE_SA_INIT.
            self.go_down(DownReason::Timeout);
            return;
        }
        if self
            .old_ike
            .as_ref()
            .and_then(|o| o.expires)
            .is_some_and(|x| now >= x)
        {
            self.old_ike = None;
        }
        if let Some(old) = &mut self.old_ike
            && let Some((bytes, tries, at)) = &mut old.delete
            && now >= *at
        {
            if *tries >= self.config.retransmit_tries {
                // The old SA is gone either way; the new one is unaffected.
                self.old_ike = None;
            } else {
                *tries += 1;
                *at = now + backoff(self.config.retransmit_base, *tries);
                let bytes = bytes.clone();
                self.stats.retransmissions += 1;
                self.send_raw(bytes);
            }
        }
        if let Some(o) = &mut self.outstanding
            && now >= o.next_at
        {
            if o.tries >= self.config.retransmit_tries {
                self.outstanding = None;
                let reason = match (self.phase, self.init_error) {
                    (Phase::InitSent, Some(e)) => DownReason::Refused(e),
                    _ => DownReason::Timeout,
                };
                self.go_down(reason);
                return;
            }
            o.tries += 1;
            o.next_at = now + backoff(self.config.retransmit_base, o.tries);
            let bytes = o.bytes.clone();
            self.stats.retransmissions += 1;
            self.send_raw(bytes);
        }
        if let Some(r) = self.rekey_ike_retry
            && now >= r
        {
            self.rekey_ike_retry = None;
            if !self
                .actions
                .iter()
                .any(|a| matches!(a, Action::RekeyIke(_)))
            {
                self.actions.push_back(Action::RekeyIke(None));
            }
        }
        if self.phase == Phase::Established
            && self.outstanding.is_none()
            && now >= self.last_inbound + self.config.dpd_interval
            && !self.actions.contains(&Action::Dpd)
        {
            self.actions.push_back(Action::Dpd);
        }
        if let Some(k) = self.next_keepalive
            && now >= k
        {
            self.stats.keepalives += 1;
            self.transmits.push_back(Transmit {
                local_port: NAT_T_PORT,
                remote: self.remote,
                payload: natt::KEEPALIVE.to_vec(),
            });
            self.next_keepalive = Some(now + self.config.keepalive_interval);
        }
        self.drive(now, rng);
    }

    /// Once authenticated, the IKE_SA_INIT secret and messages (kept for
    /// the AUTH payloads, §2.15) are of no more use.
    fn forget_initial_exchange(&mut self) {
        self.dh = None;
        self.init_request = Vec::new();
        self.init_response = Vec::new();
    }

    fn go_down(&mut self, reason: DownReason) {
        if self.phase == Phase::Closed {
            return;
        }
        self.phase = Phase::Closed;
        self.outstanding = None;
        self.actions.clear();
        self.next_keepalive = None;
        // Nothing is answered any more: drop the key material and the
        // initial messages kept for AUTH.
        self.keys = None;
        self.dh = None;
        self.old_ike = None;
        self.init_request = Vec::new();
        self.init_response = Vec::new();
        self.events.push_back(Event::IkeSaDown(reason));
    }

    fn send_raw(&mut self, bytes: Vec<u8>) {
        let payload = if self.local_port == NAT_T_PORT {
            [&NON_ESP_MARKER[..], &bytes].concat()
        } else {
            bytes
        };
        self.transmits.push_back(Transmit {
            local_port: self.local_port,
            remote: self.remote,
            payload,
        });
    }

    fn header(&self, exchange: u8, response: bool, message_id: u32) -> Header {
        let mut f = if self.original_initiator {
            flags::INITIATOR
        } else {
            0
        };
        if response {
            f |= flags::RESPONSE;
        }
        Header {
            spi_i: self.spi_i,
            spi_r: self.spi_r,
            next_payload: 0,
            exchange,
            flags: f,
            message_id,
            length: 0,
        }
    }

    fn out_key(&self) -> Option<&AeadKey> {
        let k = self.keys.as_ref()?;
        Some(if self.original_initiator {
            &k.sk_ei
        } else {
            &k.sk_er
        })
    }

    fn in_key(&self) -> Option<&AeadKey> {
        let k = self.keys.as_ref()?;
        Some(if self.original_initiator {
            &k.sk_er
        } else {
            &k.sk_ei
        })
    }

    fn seal(
        &mut self,
        exchange: u8,
        response: bool,
        message_id: u32,
        payloads: &[Payload],
    ) -> Option<Vec<u8>> {
        let h = self.header(exchange, response, message_id);
        let iv = self.iv.to_be_bytes();
        self.iv += 1;
        let key = *self.out_key()?;
        Some(crypto::encode_encrypted(h, payloads, &key, iv))
    }

    fn start_request(&mut self, exchange: u8, payloads: &[Payload], kind: Request, now: Instant) {
        let id = self.next_request_id;
        let Some(bytes) = self.seal(exchange, false, id, payloads) else {
            return;
        };
        // Message IDs do not wrap (§2.2): at 2^32 - 1 the SA must be
        // rekeyed; a repeated ID is then only ever taken for a retransmission.
        self.next_request_id = self.next_request_id.saturating_add(1);
        self.outstanding = Some(Outstanding {
            message_id: id,
            bytes: bytes.clone(),
            tries: 1,
            next_at: now + self.config.retransmit_base,
            kind,
        });
        self.send_raw(bytes);
    }

    fn respond(&mut self, exchange: u8, message_id: u32, payloads: &[Payload]) {
        let Some(bytes) = self.seal(exchange, true, message_id, payloads) else {
            return;
        };
        self.last_response = Some((message_id, bytes.clone()));
        self.send_raw(bytes);
    }

    fn nat_d(&self, spi_r: u64) -> [Payload; 2] {
        let local = SocketAddr::new(self.local_ip, self.local_port);
        [
            Payload::notify(
                notify::NAT_DETECTION_SOURCE_IP,
                &nat_hash(self.spi_i, spi_r, local),
            ),
            Payload::notify(
                notify::NAT_DETECTION_DESTINATION_IP,
                &nat_hash(self.spi_i, spi_r, self.remote),
            ),
        ]
    }

    /// Reads NAT-D notifies of a message from `from` (§2.23). Returns
    /// (a NAT is on the path, we are behind it), or `None` without NAT-D.
    fn check_nat(
        &self,
        f: &Found<'_>,
        spi_r: u64,
        from: SocketAddr,
        local_port: u16,
    ) -> Option<(bool, bool)> {
        let srcs: Vec<&[u8]> = f
            .notifies
            .iter()
            .filter(|n| n.2 == notify::NAT_DETECTION_SOURCE_IP)
            .map(|n| n.3)
            .collect();
        let dst = f.notify(notify::NAT_DETECTION_DESTINATION_IP)?;
        if srcs.is_empty() {
            return None;
        }
        let peer_hash = nat_hash(self.spi_i, spi_r, from);
        let peer_natted = !srcs.iter().any(|s| *s == peer_hash);
        let us = SocketAddr::new(self.local_ip, local_port);
        let we_natted = dst != nat_hash(self.spi_i, spi_r, us);
        Some((peer_natted || we_natted, we_natted))
    }

    fn init_payloads(&self) -> Vec<Payload> {
        let mut ps = Vec::new();
        if let Some(c) = &self.cookie {
            ps.push(Payload::notify(notify::COOKIE, c));
        }
        ps.push(Payload::Sa(vec![ike_proposal(&self.config.groups, &[])]));
        if let Some(dh) = &self.dh {
            ps.push(Payload::Ke {
                group: dh.group().id(),
                data: dh.public(),
            });
        }
        ps.push(Payload::Nonce(self.ni.clone()));
        ps.extend(self.nat_d(0));
        ps
    }

    fn send_init(&mut self, now: Instant) {
        let h = self.header(exchange::IKE_SA_INIT, false, 0);
        let bytes = wire::encode(Header { spi_r: 0, ..h }, &self.init_payloads());
        self.init_request = bytes.clone();
        self.next_request_id = 1;
        self.outstanding = Some(Outstanding {
            message_id: 0,
            bytes: bytes.clone(),
            tries: 1,
            next_at: now + self.config.retransmit_base,
            kind: Request::Init,
        });
        self.send_raw(bytes);
    }

    /// Feeds one received datagram: `local_port` is the port it arrived on
    /// (500 or 4500; on 4500 with its non-ESP marker), `from` its source.
    /// Dropped messages are counted and returned as the error.
    pub fn handle_input(
        &mut self,
        local_port: u16,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<(), DropReason> {
        let r = self.input(local_port, from, datagram, now, rng);
        if let Err(reason) = r {
            self.stats.drops.add(reason);
        }
        self.drive(now, rng);
        r
    }

    fn input(
        &mut self,
        local_port: u16,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<(), DropReason> {
        let msg = if local_port == NAT_T_PORT {
            match natt::classify(datagram) {
                // A NAT keepalive (RFC 3948 §2.3): nothing to do.
                Ok(Udp4500::Keepalive) => return Ok(()),
                Ok(Udp4500::Ike(m)) => m,
                Ok(Udp4500::Esp(_)) => return Err(DropReason::NotIke),
                Err(natt::Malformed) => return Err(DropReason::Malformed),
            }
        } else {
            datagram
        };
        if self.phase == Phase::Closed {
            return Err(DropReason::Closed);
        }
        let parsed = wire::parse(msg);
        let m = match parsed {
            Ok(m) => m,
            Err(ParseError::UnsupportedCritical(_)) => return Err(DropReason::UnsupportedCritical),
            Err(_) => return Err(DropReason::Malformed),
        };
        let h = m.header;
        if let Some(old) = &self.old_ike
            && (h.spi_i, h.spi_r) == (old.spi_i, old.spi_r)
        {
            return self.old_input(msg, &m, now);
        }
        let init_request = h.exchange == exchange::IKE_SA_INIT && !h.is_response();
        // §2.21.2 / §3.1: messages are matched by SPIs. IKE_SA_INIT
        // requests carry a zero responder SPI.
        let spi_ok = if self.phase == Phase::Idle {
            // A responder made with SPI 0 could never be told from an
            // IKE_SA_INIT request (§3.1: the responder's SPI is non-zero).
            init_request && h.spi_r == 0 && self.spi_r != 0
        } else if init_request {
            h.spi_i == self.spi_i && h.spi_r == 0
        } else if h.exchange == exchange::IKE_SA_INIT {
            if h.spi_i == self.spi_i && self.phase != Phase::InitSent {
                // A late duplicate of the IKE_SA_INIT response.
                return Err(DropReason::MessageId);
            }
            h.spi_i == self.spi_i
        } else {
            h.spi_i == self.spi_i && h.spi_r == self.spi_r
        };
        if !spi_ok {
            return Err(DropReason::WrongSpi);
        }
        // The I flag must name the other side (§3.1).
        if self.phase != Phase::Idle && h.from_initiator() == self.original_initiator {
            return Err(DropReason::Unexpected);
        }
        if h.is_response() {
            self.handle_response(local_port, from, msg, m, now, rng)
        } else {
            self.handle_request(local_port, from, msg, m, now, rng)
        }
    }

    fn handle_request(
        &mut self,
        local_port: u16,
        from: SocketAddr,
        msg: &[u8],
        m: wire::Message,
        now: Instant,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<(), DropReason> {
        let h = m.header;
        if let Some((id, bytes)) = &self.last_response
            && h.message_id == *id
            && self.expected_request_id == id.wrapping_add(1)
        {
            // A retransmitted request: the cached response, unprocessed (§2.1).
            let bytes = bytes.clone();
            self.stats.cached_responses += 1;
            self.send_raw(bytes);
            return Ok(());
        }
        if h.message_id != self.expected_request_id {
            return Err(DropReason::MessageId);
        }
        if h.exchange == exchange::IKE_SA_INIT {
            if self.phase != Phase::Idle {
                return Err(DropReason::Unexpected);
            }
            return self.respond_init(local_port, from, msg, &m, now, rng);
        }
        let key = *self.in_key().ok_or(DropReason::Unexpected)?;
        let (first, body) = m.chain.encrypted.clone().ok_or(DropReason::Unexpected)?;
        let pt = crypto::open_encrypted(msg, body, &key).map_err(|_| DropReason::Integrity)?;
        let chain = match wire::parse_chain(&pt, 0, first) {
            Ok(c) => c,
            Err(ParseError::UnsupportedCritical(t)) => {
                // §2.5: refuse the request, naming the payload type.
                self.expected_request_id = self.expected_request_id.saturating_add(1);
                self.respond(
                    h.exchange,
                    h.message_id,
                    &[Payload::notify(notify::UNSUPPORTED_CRITICAL_PAYLOAD, &[t])],
                );
                return Err(DropReason::UnsupportedCritical);
            }
            Err(_) => return Err(DropReason::Malformed),
        };
        // Authenticated: the peer is alive; it may have floated to 4500,
        // and behind a NAT its address may change (§2.23).
        self.last_inbound = now;
        if local_port == NAT_T_PORT && self.local_port != NAT_T_PORT {
            self.local_port = NAT_T_PORT;
            self.remote = from;
        }
        if self.nat_detected() && !self.behind_nat {
            self.remote = from;
        }
        let f = Found::new(&chain.payloads);
        match (h.exchange, self.phase) {
            (exchange::IKE_AUTH, Phase::AuthPending) if !self.original_initiator => {
                self.expected_request_id = self.expected_request_id.saturating_add(1);
                self.respond_auth(h.message_id, &f, rng);
                Ok(())
            }
            // Only after the initial exchanges (§1.4): before IKE_AUTH the
            // peer is not authenticated, and a Delete must not end the SA.
            (exchange::INFORMATIONAL, Phase::Established) => {
                self.expected_request_id = self.expected_request_id.saturating_add(1);
                self.respond_informational(h.message_id, &f);
                Ok(())
            }
            (exchange::CREATE_CHILD_SA, Phase::Established) => {
                self.expected_request_id = self.expected_request_id.saturating_add(1);
                self.respond_create_child(h.message_id, &f, rng);
                Ok(())
            }
            _ => Err(DropReason::Unexpected),
        }
    }

    fn respond_init(
        &mut self,
        local_port: u16,
        from: SocketAddr,
        msg: &[u8],
        m: &wire::Message,
        now: Instant,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<(), DropReason> {
        let f = Found::new(&m.chain.payloads);
        let (Some(sa), Some((group, ke)), Some(ni)) = (f.sa, f.ke, f.nonce) else {
            return Err(DropReason::Unexpected);
        };
        let spi_i = m.header.spi_i;
        let plain = |payloads: &[Payload]| {
            let h = Header {
                spi_i,
                spi_r: 0,
                next_payload: 0,
                exchange: exchange::IKE_SA_INIT,
                flags: flags::RESPONSE,
                message_id: 0,
                length: 0,
            };
            wire::encode(h, payloads)
        };
        self.remote = from;
        self.local_port = local_port;
        let chosen = choose(sa, protocol::IKE, &self.config.groups, Some(group));
        let (num, g) = match chosen {
            Choice::Chosen(num, _, Some(g)) => (num, g),
            Choice::WrongKe(g) => {
                // §1.2: stateless; the initiator retries with this group.
                let reply = plain(&[Payload::notify(
                    notify::INVALID_KE_PAYLOAD,
                    &g.id().to_be_bytes(),
                )]);
                self.send_raw(reply);
                return Ok(());
            }
            _ => {
                let reply = plain(&[Payload::notify(notify::NO_PROPOSAL_CHOSEN, &[])]);
                self.send_raw(reply);
                return Ok(());
            }
        };
        let dh = DhSecret::generate(g, rng);
        let shared = match dh.shared(ke) {
            Ok(s) => s,
            Err(_) => return Err(DropReason::InvalidPublic),
        };
        self.spi_i = spi_i;
        self.ni = ni.to_vec();
        self.nr = random_nonce(rng);
        let nat = self.check_nat(&f, 0, from, local_port);
        let mut prop = ike_proposal(&[g], &[]);
        prop.num = num;
        let mut ps = vec![
            Payload::Sa(vec![prop]),
            Payload::Ke {
                group: g.id(),
                data: dh.public(),
            },
            Payload::Nonce(self.nr.clone()),
        ];
        if nat.is_some() {
            ps.extend(self.nat_d(self.spi_r));
        }
        let h = self.header(exchange::IKE_SA_INIT, true, 0);
        let reply = wire::encode(h, &ps);
        let seed = crypto::skeyseed(&self.ni, &self.nr, &shared);
        self.keys = Some(IkeKeys::derive(
            &seed, &self.ni, &self.nr, self.spi_i, self.spi_r,
        ));
        self.init_request = msg.to_vec();
        self.init_response = reply.clone();
        self.last_response = Some((0, reply.clone()));
        self.expected_request_id = 1;
        self.ike_group = Some(g);
        self.phase = Phase::AuthPending;
        self.half_open_until = Some(now + self.config.half_open_timeout);
        self.last_inbound = now;
        if let Some((_, we_natted)) = nat.filter(|n| n.0) {
            self.behind_nat = we_natted;
            if we_natted {
                self.next_keepalive = Some(now + self.config.keepalive_interval);
            }
        }
        self.send_raw(reply);
        // Once a NAT is known, the initiator comes back on 4500.
        Ok(())
    }

    /// SA, TSi and TSr of a CHILD_SA we ask for: TSi is the side of the
    /// exchange's initiator, i.e. ours (§2.9).
    fn child_payloads(&self, spi_in: u32, groups: &[DhGroup]) -> Vec<Payload> {
        vec![
            Payload::Sa(vec![esp_proposal(spi_in, groups)]),
            Payload::TsI(self.config.local_ts.clone()),
            Payload::TsR(self.config.remote_ts.clone()),
        ]
    }

    fn respond_auth(&mut self, id: u32, f: &Found<'_>, rng: &mut (impl RngCore + CryptoRng)) {
        let Some(keys) = self.keys.clone() else {
            return;
        };
        let (Some(idi), Some((method, auth))) = (f.idi, f.auth) else {
            self.respond(
                exchange::IKE_AUTH,
                id,
                &[Payload::notify(notify::INVALID_SYNTAX, &[])],
            );
            self.go_down(DownReason::Refused(notify::INVALID_SYNTAX));
            return;
        };
        if let Some(lookup) = self.config.peer_lookup.clone() {
            // The peer's configuration by the identity it claims; its AUTH
            // below proves it holds that identity's PSK.
            match lookup(idi) {
                Some(peer) => self.config.adopt(idi, peer),
                None => {
                    self.respond(
                        exchange::IKE_AUTH,
                        id,
                        &[Payload::notify(notify::AUTHENTICATION_FAILED, &[])],
                    );
                    self.go_down(DownReason::AuthenticationFailed);
                    return;
                }
            }
        }
        if !self.peer_auth_ok(&self.init_request, &self.nr, &keys.sk_pi, idi, method, auth) {
            self.respond(
                exchange::IKE_AUTH,
                id,
                &[Payload::notify(notify::AUTHENTICATION_FAILED, &[])],
            );
            self.go_down(DownReason::AuthenticationFailed);
            return;
        }
        let idr = self.config.local_id.clone();
        let my_auth = crypto::psk_auth(
            &self.config.psk,
            &self.init_response,
            &self.ni,
            &keys.sk_pr,
            &idr.body(),
        );
        let mut ps = vec![
            Payload::IdR(idr),
            Payload::Auth {
                method: AUTH_SHARED_KEY_MIC,
                data: my_auth.to_vec(),
            },
        ];
        self.phase = Phase::Established;
        self.forget_initial_exchange();
        self.events.push_back(Event::IkeSaUp {
            spi_i: self.spi_i,
            spi_r: self.spi_r,
        });
        let (ni, nr) = (self.ni.clone(), self.nr.clone());
        match self.accept_child(f, &keys.sk_d, None, &ni, &nr, rng) {
            Ok((child, keys, reply)) => {
                ps.extend(reply);
                self.respond(exchange::IKE_AUTH, id, &ps);
                self.child = Some(child.clone());
                self.events.push_back(Event::ChildSaUp { sa: child, keys });
            }
            Err(Refusal { notify: n, .. }) => {
                ps.push(Payload::notify(n, &[]));
                self.respond(exchange::IKE_AUTH, id, &ps);
                self.events.push_back(Event::ChildSaFailed { notify: n });
            }
        }
    }

    /// Responder side of a CHILD_SA: proposal, KE (for PFS), narrowing.
    /// Returns the SA and the SA/KE/TS payloads to answer with, or the error notify.
    fn accept_child(
        &mut self,
        f: &Found<'_>,
        sk_d: &[u8],
        ke: Option<(u16, &[u8])>,
        ni: &[u8],
        nr: &[u8],
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<(ChildSa, ChildKeys, Vec<Payload>), Refusal> {
        let (Some(sa), Some(tsi), Some(tsr)) = (f.sa, f.tsi, f.tsr) else {
            return Err(notify::INVALID_SYNTAX.into());
        };
        let (num, spi, group) =
            match choose(sa, protocol::ESP, &self.config.groups, ke.map(|k| k.0)) {
                Choice::Chosen(num, spi, g) => (num, spi, g),
                Choice::WrongKe(g) => {
                    return Err(Refusal {
                        notify: notify::INVALID_KE_PAYLOAD,
                        group: Some(g),
                    });
                }
                Choice::None => return Err(notify::NO_PROPOSAL_CHOSEN.into()),
            };
        // SPIs 0–255 are reserved (RFC 4303 §2.1); 0 would also read as the
        // non-ESP marker under UDP encapsulation (RFC 3948 §2.2).
        let spi_out = peer_spi(&spi).ok_or(notify::NO_PROPOSAL_CHOSEN)?;
        // The peer is the initiator of this exchange: its TSi is its side.
        let (Some(ts_remote), Some(ts_local)) = (
            narrow(tsi, &self.config.remote_ts),
            narrow(tsr, &self.config.local_ts),
        ) else {
            return Err(notify::TS_UNACCEPTABLE.into());
        };
        if ts_remote.is_empty() || ts_local.is_empty() {
            return Err(notify::TS_UNACCEPTABLE.into());
        }
        let mut extra = Vec::new();
        let shared = match (group, ke) {
            (Some(g), Some((_, data))) => {
                let dh = DhSecret::generate(g, rng);
                let s = dh.shared(data).map_err(|_| notify::INVALID_SYNTAX)?;
                extra.push(Payload::Ke {
                    group: g.id(),
                    data: dh.public(),
                });
                Some(s)
            }
            _ => None,
        };
        let spi_in = self.new_inbound_spi(rng);
        let (i2r, r2i) = crypto::child_keys(sk_d, shared.as_deref(), ni, nr);
        let mut prop = esp_proposal(spi_in, &group.into_iter().collect::<Vec<_>>());
        prop.num = num;
        let mut ps = vec![Payload::Sa(vec![prop])];
        ps.extend(extra);
        ps.push(Payload::TsI(ts_remote.clone()));
        ps.push(Payload::TsR(ts_local.clone()));
        Ok((
            ChildSa {
                spi_in,
                spi_out,
                ts_local,
                ts_remote,
            },
            ChildKeys {
                key_in: i2r,
                key_out: r2i,
            },
            ps,
        ))
    }

    fn respond_informational(&mut self, id: u32, f: &Found<'_>) {
        if f.notify(notify::AUTHENTICATION_FAILED).is_some() {
            // The initiator refused our AUTH after we considered the SA up
            // (§2.21.2): it is gone on its side.
            self.respond(exchange::INFORMATIONAL, id, &[]);
            self.go_down(DownReason::AuthenticationFailed);
            return;
        }
        let mut reply = Vec::new();
        for (proto, spis) in &f.deletes {
            if *proto == protocol::IKE {
                self.respond(exchange::INFORMATIONAL, id, &[]);
                self.go_down(DownReason::DeletedByPeer);
                return;
            }
            if *proto != protocol::ESP {
                continue;
            }
            let mut ours = Vec::new();
            for spi in spis.iter().filter_map(|s| spi_u32(s)) {
                if let Some(c) = self.remove_child_by_out(spi) {
                    ours.push(c.spi_in.to_be_bytes().to_vec());
                    self.events.push_back(Event::ChildSaDeleted {
                        spi_in: c.spi_in,
                        spi_out: c.spi_out,
                    });
                }
            }
            if !ours.is_empty() {
                reply.push(Payload::Delete {
                    protocol: protocol::ESP,
                    spi_size: 4,
                    spis: ours,
                });
            }
        }
        // Anything else (empty = liveness check, unknown status notifies) gets an empty answer (§1.4, §3.10.1).
        self.respond(exchange::INFORMATIONAL, id, &reply);
    }

    fn remove_child_by_out(&mut self, spi_out: u32) -> Option<ChildSa> {
        if let Some(i) = self.old_children.iter().position(|c| c.spi_out == spi_out) {
            return Some(self.old_children.remove(i));
        }
        if self.child.as_ref().is_some_and(|c| c.spi_out == spi_out) {
            return self.child.take();
        }
        None
    }

    fn respond_create_child(
        &mut self,
        id: u32,
        f: &Found<'_>,
        rng: &mut (impl RngCore + CryptoRng),
    ) {
        let Some(keys) = self.keys.clone() else {
            return;
        };
        let Some(ni) = f.nonce.map(<[u8]>::to_vec) else {
            self.respond(
                exchange::CREATE_CHILD_SA,
                id,
                &[Payload::notify(notify::INVALID_SYNTAX, &[])],
            );
            return;
        };
        if f.sa
            .is_some_and(|ps| ps.iter().any(|p| p.protocol == protocol::IKE))
        {
            if self.outstanding.is_some() {
                // A request of ours is in flight on this IKE SA; moving to a
                // new one now would strand it (its response would come on
                // the old SPIs), and a simultaneous IKE rekey would leave
                // each side on the other's SA. Refuse; the peer retries
                // later (RFC 7296 §2.25, §2.25.2).
                self.respond(
                    exchange::CREATE_CHILD_SA,
                    id,
                    &[Payload::notify(notify::TEMPORARY_FAILURE, &[])],
                );
                return;
            }
            self.respond_rekey_ike(id, f, &keys, &ni, rng);
            return;
        }
        let rekeyed = f
            .notifies
            .iter()
            .find(|n| n.2 == notify::REKEY_SA)
            .and_then(|n| spi_u32(n.1));
        let Some(old) = rekeyed.and_then(|spi| {
            self.child
                .as_ref()
                .filter(|c| c.spi_out == spi || c.spi_in == spi)
                .map(|c| c.spi_in)
        }) else {
            // We keep one CHILD_SA per IKE SA.
            let n = if rekeyed.is_some() {
                notify::CHILD_SA_NOT_FOUND
            } else {
                notify::NO_ADDITIONAL_SAS
            };
            self.respond(exchange::CREATE_CHILD_SA, id, &[Payload::notify(n, &[])]);
            return;
        };
        let nr = random_nonce(rng);
        match self.accept_child(f, &keys.sk_d, f.ke, &ni, &nr, rng) {
            Ok((child, keys, mut ps)) => {
                ps.insert(1, Payload::Nonce(nr.clone()));
                self.respond(exchange::CREATE_CHILD_SA, id, &ps);
                let lowest = [ni.as_slice(), nr.as_slice()]
                    .into_iter()
                    .min()
                    .unwrap_or_default()
                    .to_vec();
                self.peer_rekey = Some(PeerRekey {
                    old_spi_in: old,
                    new_spi_in: child.spi_in,
                    lowest_nonce: lowest,
                });
                self.install_rekeyed(old, child, keys);
            }
            Err(Refusal {
                notify: n,
                group: Some(g),
            }) => {
                // The group chosen from those the peer offered (§1.3).
                self.respond(
                    exchange::CREATE_CHILD_SA,
                    id,
                    &[Payload::notify(n, &g.id().to_be_bytes())],
                );
            }
            Err(Refusal { notify: n, .. }) => {
                self.respond(exchange::CREATE_CHILD_SA, id, &[Payload::notify(n, &[])])
            }
        }
    }

    fn install_rekeyed(&mut self, old_spi_in: u32, new: ChildSa, keys: ChildKeys) {
        if let Some(old) = self.child.take() {
            self.old_children.push(old);
        }
        if self.old_children.len() > MAX_OLD_CHILDREN {
            // A peer that rekeys without deleting would grow this without
            // bound: the oldest goes now, and the peer is told.
            let oldest = self.old_children.remove(0);
            self.events.push_back(Event::ChildSaDeleted {
                spi_in: oldest.spi_in,
                spi_out: oldest.spi_out,
            });
            self.actions.push_back(Action::DeleteChild(oldest.spi_in));
        }
        self.child = Some(new.clone());
        self.events.push_back(Event::ChildSaRekeyed {
            old_spi_in,
            new,
            keys,
        });
    }

    fn respond_rekey_ike(
        &mut self,
        id: u32,
        f: &Found<'_>,
        keys: &IkeKeys,
        ni: &[u8],
        rng: &mut (impl RngCore + CryptoRng),
    ) {
        let (Some(sa), Some((group, ke))) = (f.sa, f.ke) else {
            self.respond(
                exchange::CREATE_CHILD_SA,
                id,
                &[Payload::notify(notify::INVALID_SYNTAX, &[])],
            );
            return;
        };
        let (num, spi, g) = match choose(sa, protocol::IKE, &self.config.groups, Some(group)) {
            Choice::Chosen(num, spi, Some(g)) if spi.len() == 8 => (num, spi, g),
            Choice::WrongKe(g) => {
                let n = Payload::notify(notify::INVALID_KE_PAYLOAD, &g.id().to_be_bytes());
                self.respond(exchange::CREATE_CHILD_SA, id, &[n]);
                return;
            }
            _ => {
                self.respond(
                    exchange::CREATE_CHILD_SA,
                    id,
                    &[Payload::notify(notify::NO_PROPOSAL_CHOSEN, &[])],
                );
                return;
            }
        };
        let dh = DhSecret::generate(g, rng);
        let Ok(shared) = dh.shared(ke) else {
            self.respond(
                exchange::CREATE_CHILD_SA,
                id,
                &[Payload::notify(notify::INVALID_SYNTAX, &[])],
            );
            return;
        };
        let new_spi_i = u64::from_be_bytes(spi.as_slice().try_into().unwrap_or_default());
        let new_spi_r = self.new_local_spi(rng);
        let nr = random_nonce(rng);
        let mut prop = ike_proposal(&[g], &new_spi_r.to_be_bytes());
        prop.num = num;
        let ps = [
            Payload::Sa(vec![prop]),
            Payload::Nonce(nr.clone()),
            Payload::Ke {
                group: g.id(),
                data: dh.public(),
            },
        ];
        self.respond(exchange::CREATE_CHILD_SA, id, &ps);
        let seed = crypto::rekey_skeyseed(&keys.sk_d, &shared, ni, &nr);
        // The peer started the rekey: it is the new SA's original initiator (§2.18).
        self.switch_ike_sa(
            new_spi_i,
            new_spi_r,
            false,
            IkeKeys::derive(&seed, ni, &nr, new_spi_i, new_spi_r),
        );
        self.ike_group = Some(g);
    }

    /// A new inbound CHILD_SA SPI: of the tunnel's layout when the config
    /// has an index, never in the reserved 0–255 (RFC 4303 §2.1), and never
    /// equal to one still in use or offered, since the old and the new SA
    /// live side by side during a rekey (RFC 7296 §2.8).
    fn new_inbound_spi(&self, rng: &mut (impl RngCore + CryptoRng)) -> u32 {
        let mut taken: Vec<u32> = self
            .child
            .iter()
            .chain(&self.old_children)
            .map(|c| c.spi_in)
            .collect();
        taken.push(self.pending_auth_spi);
        taken.extend(self.peer_rekey.as_ref().map(|p| p.new_spi_in));
        if let Some(Outstanding {
            kind: Request::RekeyChild(p),
            ..
        }) = &self.outstanding
        {
            taken.push(p.new_spi_in);
        }
        loop {
            let r = rng.next_u32();
            let s = match self.config.inbound_spi_index {
                Some(index) => esp::spi::spi_from_index(index, r),
                None => r,
            };
            if s > 255 && !taken.contains(&s) {
                return s;
            }
        }
    }

    /// A new local IKE SPI for a rekey: random, but with the low 24 bits of
    /// the current one, so that a caller that routes by them keeps working.
    fn new_local_spi(&self, rng: &mut (impl RngCore + CryptoRng)) -> u64 {
        let current = if self.original_initiator {
            self.spi_i
        } else {
            self.spi_r
        };
        let keep = current & 0xff_ffff;
        loop {
            let s = (rng.next_u64() & !0xff_ffff) | keep;
            if s != 0 && s != current {
                return s;
            }
        }
    }

    /// Moves to the rekeyed IKE SA; the old one stays in `old_ike` for its
    /// Delete exchange. The CHILD_SA moves with it (§2.18).
    fn switch_ike_sa(&mut self, spi_i: u64, spi_r: u64, we_initiated: bool, keys: IkeKeys) {
        if let Some(old_keys) = self.keys.replace(keys) {
            self.old_ike = Some(OldIke {
                spi_i: self.spi_i,
                spi_r: self.spi_r,
                keys: old_keys,
                original_initiator: self.original_initiator,
                expected_request_id: self.expected_request_id,
                last_response: self.last_response.take(),
                iv: self.iv,
                delete: None,
                expires: None,
            });
        }
        self.spi_i = spi_i;
        self.spi_r = spi_r;
        self.original_initiator = we_initiated;
        self.iv = 0;
        self.next_request_id = 0;
        self.expected_request_id = 0;
        self.events.push_back(Event::IkeSaRekeyed { spi_i, spi_r });
    }

    /// A message on the IKE SA that a rekey replaced: the answer to our
    /// Delete, or the peer's Delete (answered, with the old keys).
    fn old_input(&mut self, msg: &[u8], m: &wire::Message, now: Instant) -> Result<(), DropReason> {
        // The peer's retransmissions of a request span at most this long.
        let linger = self
            .config
            .retransmit_base
            .saturating_mul((1u32 << self.config.retransmit_tries.min(16)) - 1);
        let Some(old) = self.old_ike.as_mut() else {
            return Err(DropReason::WrongSpi);
        };
        let h = m.header;
        if h.from_initiator() == old.original_initiator {
            return Err(DropReason::Unexpected);
        }
        let in_key = if old.original_initiator {
            old.keys.sk_er
        } else {
            old.keys.sk_ei
        };
        let out_key = if old.original_initiator {
            old.keys.sk_ei
        } else {
            old.keys.sk_er
        };
        if !h.is_response() {
            if let Some((id, bytes)) = &old.last_response
                && *id == h.message_id
            {
                let bytes = bytes.clone();
                self.stats.cached_responses += 1;
                self.send_raw(bytes);
                return Ok(());
            }
            if h.message_id != old.expected_request_id {
                return Err(DropReason::MessageId);
            }
        }
        let (first, body) = m.chain.encrypted.clone().ok_or(DropReason::Unexpected)?;
        let pt = crypto::open_encrypted(msg, body, &in_key).map_err(|_| DropReason::Integrity)?;
        wire::parse_chain(&pt, 0, first).map_err(|_| DropReason::Malformed)?;
        if h.is_response() {
            self.old_ike = None;
            return Ok(());
        }
        let mut f = if old.original_initiator {
            flags::INITIATOR
        } else {
            0
        };
        f |= flags::RESPONSE;
        let rh = Header {
            spi_i: old.spi_i,
            spi_r: old.spi_r,
            next_payload: 0,
            exchange: h.exchange,
            flags: f,
            message_id: h.message_id,
            length: 0,
        };
        let iv = old.iv.to_be_bytes();
        old.iv += 1;
        old.expected_request_id = old.expected_request_id.saturating_add(1);
        let bytes = crypto::encode_encrypted(rh, &[], &out_key, iv);
        old.last_response = Some((h.message_id, bytes.clone()));
        if old.delete.is_none() {
            old.expires = Some(now + linger);
        }
        self.send_raw(bytes);
        Ok(())
    }

    fn handle_response(
        &mut self,
        local_port: u16,
        from: SocketAddr,
        msg: &[u8],
        m: wire::Message,
        now: Instant,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<(), DropReason> {
        let h = m.header;
        let Some(o) = &self.outstanding else {
            return Err(DropReason::MessageId);
        };
        if o.message_id != h.message_id {
            return Err(DropReason::MessageId);
        }
        if h.exchange == exchange::IKE_SA_INIT {
            return self.init_response(local_port, from, msg, &m, now, rng);
        }
        let key = *self.in_key().ok_or(DropReason::Unexpected)?;
        let (first, body) = m.chain.encrypted.clone().ok_or(DropReason::Unexpected)?;
        let pt = crypto::open_encrypted(msg, body, &key).map_err(|_| DropReason::Integrity)?;
        let chain = wire::parse_chain(&pt, 0, first).map_err(|e| match e {
            ParseError::UnsupportedCritical(_) => DropReason::UnsupportedCritical,
            _ => DropReason::Malformed,
        })?;
        self.last_inbound = now;
        let Some(o) = self.outstanding.take() else {
            return Err(DropReason::MessageId);
        };
        let f = Found::new(&chain.payloads);
        match o.kind {
            Request::Init => Err(DropReason::Unexpected),
            Request::Auth => {
                self.auth_response(&f);
                Ok(())
            }
            Request::Informational => Ok(()),
            Request::DeleteChild { spi_in } => {
                if let Some(c) = self.remove_child_by_in(spi_in) {
                    self.events.push_back(Event::ChildSaDeleted {
                        spi_in: c.spi_in,
                        spi_out: c.spi_out,
                    });
                }
                Ok(())
            }
            Request::DeleteIke => {
                self.go_down(DownReason::Closed);
                Ok(())
            }
            Request::RekeyChild(p) => {
                self.rekey_child_response(&f, p);
                Ok(())
            }
            Request::RekeyIke { new_spi, ni, dh } => {
                if f.error() == Some(notify::TEMPORARY_FAILURE) {
                    // The peer is busy (or rekeying itself, §2.25.2): retry
                    // after 1 to 3 retransmission intervals, at random so
                    // that two sides refusing each other do not collide again.
                    let wait = self
                        .config
                        .retransmit_base
                        .saturating_mul(1 + rng.next_u32() % 3);
                    self.rekey_ike_retry = Some(now + wait);
                    return Ok(());
                }
                self.rekey_ike_response(&f, new_spi, &ni, &dh, now);
                Ok(())
            }
        }
    }

    fn remove_child_by_in(&mut self, spi_in: u32) -> Option<ChildSa> {
        if let Some(i) = self.old_children.iter().position(|c| c.spi_in == spi_in) {
            return Some(self.old_children.remove(i));
        }
        if self.child.as_ref().is_some_and(|c| c.spi_in == spi_in) {
            return self.child.take();
        }
        None
    }

    /// An error notify in the IKE_SA_INIT response, which nothing protects:
    /// anyone on the path could have sent it. It is noted and the request
    /// keeps its retransmissions; only when they run out does the SA go
    /// down, refused with it (RFC 7296 §2.21.1).
    fn unprotected_error(&mut self, e: u16) -> Result<(), DropReason> {
        self.init_error = Some(e);
        Err(DropReason::Unexpected)
    }

    fn init_response(
        &mut self,
        local_port: u16,
        from: SocketAddr,
        msg: &[u8],
        m: &wire::Message,
        now: Instant,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<(), DropReason> {
        let f = Found::new(&m.chain.payloads);
        if let Some(c) = f.notify(notify::COOKIE) {
            // §2.6: retry with the cookie first, everything else unchanged.
            // A few cookie rounds at most: each resets the request, and an
            // attacker answering every try with a cookie would otherwise
            // keep us from ever timing out.
            if c.is_empty() || c.len() > 64 || m.header.spi_r != 0 || self.cookie_retries >= 3 {
                return Err(DropReason::Unexpected);
            }
            self.cookie_retries += 1;
            self.cookie = Some(c.to_vec());
            self.outstanding = None;
            self.send_init(now);
            return Ok(());
        }
        if let Some(g) = f.notify(notify::INVALID_KE_PAYLOAD) {
            // §1.2: retry with the group the responder asks for, if we offer it.
            let group = asked_group(g);
            match group {
                Some(g) if self.config.groups.contains(&g) && self.ke_retries < 2 => {
                    self.ke_retries += 1;
                    self.dh = Some(DhSecret::generate(g, rng));
                    self.outstanding = None;
                    self.send_init(now);
                    return Ok(());
                }
                _ => return self.unprotected_error(notify::INVALID_KE_PAYLOAD),
            }
        }
        if let Some(e) = f.error() {
            return self.unprotected_error(e);
        }
        let (Some(sa), Some((group, ke)), Some(nr)) = (f.sa, f.ke, f.nonce) else {
            return Err(DropReason::Unexpected);
        };
        let dh = self.dh.clone().ok_or(DropReason::Unexpected)?;
        // The answer must be one of the transforms we offered (§2.7).
        let Choice::Chosen(_, _, Some(g)) =
            choose(sa, protocol::IKE, &self.config.groups, Some(group))
        else {
            self.go_down(DownReason::Refused(notify::NO_PROPOSAL_CHOSEN));
            return Ok(());
        };
        if g != dh.group() || m.header.spi_r == 0 {
            return Err(DropReason::Unexpected);
        }
        let shared = dh.shared(ke).map_err(|_| DropReason::InvalidPublic)?;
        self.spi_r = m.header.spi_r;
        self.nr = nr.to_vec();
        self.init_response = msg.to_vec();
        let seed = crypto::skeyseed(&self.ni, &self.nr, &shared);
        self.keys = Some(IkeKeys::derive(
            &seed, &self.ni, &self.nr, self.spi_i, self.spi_r,
        ));
        self.outstanding = None;
        self.last_inbound = now;
        if let Some((true, we_natted)) = self.check_nat(&f, self.spi_r, from, local_port) {
            // §2.23: float to 4500 for IKE_AUTH and everything after.
            self.local_port = NAT_T_PORT;
            self.remote = SocketAddr::new(self.remote.ip(), NAT_T_PORT);
            self.behind_nat = we_natted;
            if we_natted {
                self.next_keepalive = Some(now + self.config.keepalive_interval);
            }
        }
        self.ike_group = Some(dh.group());
        self.phase = Phase::AuthPending;
        let Some(keys) = self.keys.clone() else {
            return Ok(());
        };
        let idi = self.config.local_id.clone();
        let auth = crypto::psk_auth(
            &self.config.psk,
            &self.init_request,
            &self.nr,
            &keys.sk_pi,
            &idi.body(),
        );
        let mut ps = vec![Payload::IdI(idi)];
        if let Some(r) = &self.config.remote_id {
            ps.push(Payload::IdR(r.clone()));
        }
        ps.push(Payload::Auth {
            method: AUTH_SHARED_KEY_MIC,
            data: auth.to_vec(),
        });
        let spi_in = self.new_inbound_spi(rng);
        self.pending_auth_spi = spi_in;
        ps.extend(self.child_payloads(spi_in, &[]));
        self.start_request(exchange::IKE_AUTH, &ps, Request::Auth, now);
        Ok(())
    }

    /// Whether the peer proved the PSK of the identity we expect (RFC 7296
    /// §2.15): `auth` is the PSK's MAC over the peer's first message
    /// (`signed`), our nonce and its identity, keyed by its `sk_p`.
    fn peer_auth_ok(
        &self,
        signed: &[u8],
        our_nonce: &[u8],
        sk_p: &[u8],
        id: &Id,
        method: u8,
        auth: &[u8],
    ) -> bool {
        let want = crypto::psk_auth(&self.config.psk, signed, our_nonce, sk_p, &id.body());
        method == AUTH_SHARED_KEY_MIC
            && self.config.remote_id.as_ref() == Some(id)
            && crypto::ct_eq(auth, &want)
    }

    fn auth_response(&mut self, f: &Found<'_>) {
        let Some(keys) = self.keys.clone() else {
            return;
        };
        let (Some(idr), Some((method, auth))) = (f.idr, f.auth) else {
            let e = f.error().unwrap_or(notify::AUTHENTICATION_FAILED);
            self.go_down(if e == notify::AUTHENTICATION_FAILED {
                DownReason::AuthenticationFailed
            } else {
                DownReason::Refused(e)
            });
            return;
        };
        if !self.peer_auth_ok(
            &self.init_response,
            &self.ni,
            &keys.sk_pr,
            idr,
            method,
            auth,
        ) {
            // The responder thinks the SA is up: tell it, once, in a
            // separate INFORMATIONAL (§2.21.2); we are gone either way.
            let n = Payload::notify(notify::AUTHENTICATION_FAILED, &[]);
            if let Some(bytes) =
                self.seal(exchange::INFORMATIONAL, false, self.next_request_id, &[n])
            {
                self.send_raw(bytes);
            }
            self.go_down(DownReason::AuthenticationFailed);
            return;
        }
        self.phase = Phase::Established;
        self.forget_initial_exchange();
        self.events.push_back(Event::IkeSaUp {
            spi_i: self.spi_i,
            spi_r: self.spi_r,
        });
        if let Some(e) = f.error() {
            self.events.push_back(Event::ChildSaFailed { notify: e });
            return;
        }
        let (ni, nr) = (self.ni.clone(), self.nr.clone());
        match self.offered_child(f, &keys.sk_d, None, &ni, &nr, self.pending_auth_spi) {
            Some((c, keys)) => {
                self.child = Some(c.clone());
                self.events.push_back(Event::ChildSaUp { sa: c, keys });
            }
            None => self.events.push_back(Event::ChildSaFailed {
                notify: notify::NO_PROPOSAL_CHOSEN,
            }),
        }
    }

    /// Initiator side of a CHILD_SA: checks the responder's choice and
    /// narrowed selectors against what we offered.
    fn offered_child(
        &self,
        f: &Found<'_>,
        sk_d: &[u8],
        shared: Option<&[u8]>,
        ni: &[u8],
        nr: &[u8],
        spi_in: u32,
    ) -> Option<(ChildSa, ChildKeys)> {
        let (sa, tsi, tsr) = (f.sa?, f.tsi?, f.tsr?);
        if sa.len() != 1 {
            return None;
        }
        let Choice::Chosen(_, spi, _) = choose(sa, protocol::ESP, &self.config.groups, None) else {
            return None;
        };
        let spi_out = peer_spi(&spi)?;
        // We started this exchange: TSi is our side.
        if !within(tsi, &self.config.local_ts) || !within(tsr, &self.config.remote_ts) {
            return None;
        }
        let (i2r, r2i) = crypto::child_keys(sk_d, shared, ni, nr);
        Some((
            ChildSa {
                spi_in,
                spi_out,
                ts_local: tsi.to_vec(),
                ts_remote: tsr.to_vec(),
            },
            ChildKeys {
                key_in: r2i,
                key_out: i2r,
            },
        ))
    }

    /// Starts queued actions while no request of ours is in flight.
    fn drive(&mut self, now: Instant, rng: &mut (impl RngCore + CryptoRng)) {
        while self.outstanding.is_none() && self.phase == Phase::Established {
            let Some(a) = self.actions.pop_front() else {
                return;
            };
            match a {
                Action::Dpd => {
                    self.start_request(exchange::INFORMATIONAL, &[], Request::Informational, now)
                }
                Action::Close => {
                    let d = Payload::Delete {
                        protocol: protocol::IKE,
                        spi_size: 0,
                        spis: Vec::new(),
                    };
                    self.start_request(exchange::INFORMATIONAL, &[d], Request::DeleteIke, now);
                }
                Action::DeleteChild(spi_in) => {
                    let d = Payload::Delete {
                        protocol: protocol::ESP,
                        spi_size: 4,
                        spis: vec![spi_in.to_be_bytes().to_vec()],
                    };
                    self.start_request(
                        exchange::INFORMATIONAL,
                        &[d],
                        Request::DeleteChild { spi_in },
                        now,
                    );
                }
                Action::RekeyChild(group) => {
                    let Some(old) = self.child.as_ref().map(|c| c.spi_in) else {
                        continue;
                    };
                    let new_spi_in = self.new_inbound_spi(rng);
                    let ni = random_nonce(rng);
                    let dh = group.map(|g| DhSecret::generate(g, rng));
                    // Offer every group, the KE's first, so that the peer can
                    // ask for another with INVALID_KE_PAYLOAD (§1.3).
                    let mut groups: Vec<DhGroup> = dh.iter().map(DhSecret::group).collect();
                    if dh.is_some() {
                        groups.extend(self.config.groups.iter().filter(|g| Some(**g) != group));
                    }
                    let mut ps = vec![Payload::Notify {
                        protocol: protocol::ESP,
                        spi: old.to_be_bytes().to_vec(),
                        kind: notify::REKEY_SA,
                        data: Vec::new(),
                    }];
                    let child = self.child_payloads(new_spi_in, &groups);
                    let mut child = child.into_iter();
                    ps.extend(child.next());
                    ps.push(Payload::Nonce(ni.clone()));
                    if let Some(d) = &dh {
                        ps.push(Payload::Ke {
                            group: d.group().id(),
                            data: d.public(),
                        });
                    }
                    ps.extend(child);
                    self.peer_rekey = None;
                    let p = PendingRekey {
                        old_spi_in: old,
                        new_spi_in,
                        ni,
                        dh,
                    };
                    self.start_request(exchange::CREATE_CHILD_SA, &ps, Request::RekeyChild(p), now);
                }
                Action::RekeyIke(group) => {
                    let new_spi = self.new_local_spi(rng);
                    let ni = random_nonce(rng);
                    let g = group
                        .or_else(|| self.preferred_group())
                        .unwrap_or(DhGroup::Curve25519);
                    let dh = DhSecret::generate(g, rng);
                    // Every group, the KE's first (the peer may ask for another).
                    let mut groups = vec![g];
                    groups.extend(self.config.groups.iter().filter(|x| **x != g));
                    let ps = [
                        Payload::Sa(vec![ike_proposal(&groups, &new_spi.to_be_bytes())]),
                        Payload::Nonce(ni.clone()),
                        Payload::Ke {
                            group: g.id(),
                            data: dh.public(),
                        },
                    ];
                    self.start_request(
                        exchange::CREATE_CHILD_SA,
                        &ps,
                        Request::RekeyIke { new_spi, ni, dh },
                        now,
                    );
                }
            }
        }
    }

    fn rekey_child_response(&mut self, f: &Found<'_>, p: PendingRekey) {
        if let Some(g) = f.notify(notify::INVALID_KE_PAYLOAD) {
            let group = asked_group(g);
            match group.filter(|g| {
                self.config.groups.contains(g) && p.dh.as_ref().is_some_and(|d| d.group() != *g)
            }) {
                Some(g) => self.actions.push_front(Action::RekeyChild(Some(g))),
                None => self.events.push_back(Event::ChildSaFailed {
                    notify: notify::INVALID_KE_PAYLOAD,
                }),
            }
            return;
        }
        if let Some(e) = f.error() {
            self.events.push_back(Event::ChildSaFailed { notify: e });
            return;
        }
        let (Some(keys), Some(nr)) = (self.keys.clone(), f.nonce) else {
            return;
        };
        let shared = match (&p.dh, f.ke) {
            (Some(dh), Some((group, data))) if group == dh.group().id() => match dh.shared(data) {
                Ok(s) => Some(s),
                Err(_) => {
                    self.events.push_back(Event::ChildSaFailed {
                        notify: notify::INVALID_SYNTAX,
                    });
                    return;
                }
            },
            (None, None) => None,
            _ => {
                self.events.push_back(Event::ChildSaFailed {
                    notify: notify::NO_PROPOSAL_CHOSEN,
                });
                return;
            }
        };
        let Some((new, child_keys)) =
            self.offered_child(f, &keys.sk_d, shared.as_deref(), &p.ni, nr, p.new_spi_in)
        else {
            self.events.push_back(Event::ChildSaFailed {
                notify: notify::NO_PROPOSAL_CHOSEN,
            });
            return;
        };
        // §2.8.1: if the peer rekeyed the same CHILD_SA meanwhile, the SA
        // created with the lowest of the four nonces is redundant and is
        // deleted by the side that created it; the other side deletes the old one.
        let collision = self
            .peer_rekey
            .take()
            .filter(|r| r.old_spi_in == p.old_spi_in);
        let ours_lowest = [p.ni.as_slice(), nr]
            .into_iter()
            .min()
            .unwrap_or_default()
            .to_vec();
        match collision {
            Some(peer) if ours_lowest < peer.lowest_nonce => {
                // Our SA is the redundant one: the peer's stays current, ours
                // is never installed nor announced (its keys are dropped here),
                // only deleted.
                self.actions.push_front(Action::DeleteChild(new.spi_in));
            }
            _ => {
                self.install_rekeyed(p.old_spi_in, new, child_keys);
                self.actions.push_front(Action::DeleteChild(p.old_spi_in));
            }
        }
    }

    fn rekey_ike_response(
        &mut self,
        f: &Found<'_>,
        new_spi: u64,
        ni: &[u8],
        dh: &DhSecret,
        now: Instant,
    ) {
        if let Some(g) = f.notify(notify::INVALID_KE_PAYLOAD) {
            let group =
                asked_group(g).filter(|g| self.config.groups.contains(g) && *g != dh.group());
            if let Some(g) = group {
                self.actions.push_front(Action::RekeyIke(Some(g)));
            }
            return;
        }
        if f.error().is_some() {
            // The old SA stays; the caller may try again later.
            return;
        }
        let (Some(keys), Some(sa), Some((group, ke)), Some(nr)) =
            (self.keys.clone(), f.sa, f.ke, f.nonce)
        else {
            return;
        };
        let Choice::Chosen(_, spi, Some(g)) =
            choose(sa, protocol::IKE, &self.config.groups, Some(group))
        else {
            return;
        };
        let (Ok(spi), true) = (<[u8; 8]>::try_from(spi.as_slice()), g == dh.group()) else {
            return;
        };
        let Ok(shared) = dh.shared(ke) else { return };
        let peer_spi = u64::from_be_bytes(spi);
        let seed = crypto::rekey_skeyseed(&keys.sk_d, &shared, ni, nr);
        let new_keys = IkeKeys::derive(&seed, ni, nr, new_spi, peer_spi);
        // We delete the old IKE SA (§2.18), on the old SA, then continue on the new one.
        let d = Payload::Delete {
            protocol: protocol::IKE,
            spi_size: 0,
            spis: Vec::new(),
        };
        let id = self.next_request_id;
        let delete = self.seal(exchange::INFORMATIONAL, false, id, &[d]);
        self.switch_ike_sa(new_spi, peer_spi, true, new_keys);
        self.ike_group = Some(g);
        if let Some(bytes) = delete {
            self.send_raw(bytes.clone());
            if let Some(old) = &mut self.old_ike {
                old.delete = Some((bytes, 1, now + self.config.retransmit_base));
            }
        }
    }
}

#[cfg(test)]
mod tests;
