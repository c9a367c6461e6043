//! A second, test-only tunnel kind: a null cipher with a trivial handshake.
//! It exists to show that the seam ([`super::Tunnel`], [`super::Responder`],
//! [`super::Kinds`]) is all the gateway's and the agent's packet logic need:
//! their state tests run once with WireGuard and once with this kind.
//!
//! It offers no secrecy. It keeps the properties the packet logic relies on:
//! messages carry the receiver's index (`index << 8`) for routing without
//! crypto, data carries a counter (replays are refused) and a tag over the
//! session and the plaintext (a changed byte is refused), handshakes are
//! rate-limited with stateless cookies, packets sent before a session wait
//! for it, and keepalives keep the path open.
//!
//! Messages (integers little-endian):
//! - initiation: `1 0 0 0`, sender id (4), initiator key (32), responder key
//!   (32), cookie (8, zero for none): 80 bytes;
//! - response: `2 0 0 0`, receiver id (4), sender id (4): 12 bytes;
//! - cookie reply: `3 0 0 0`, receiver id (4), cookie (8): 16 bytes;
//! - data: `4 0 0 0`, receiver id (4), counter (8), tag (8), plaintext
//!   (empty: keepalive).

use std::collections::VecDeque;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{
    Decapsulated, Encapsulated, Error, Incoming, Kinds, PrivateKey, Responder, Tunnel, TunnelEvent,
    TunnelKind, TunnelStats,
};
use crate::ipv4::FastHasher;
use crate::messages::{AgentTunnel, GatewayPeer, PublicKey};

const INIT: u8 = 1;
const RESPONSE: u8 = 2;
const COOKIE: u8 = 3;
const DATA: u8 = 4;
const INIT_LEN: usize = 80;
const RESPONSE_LEN: usize = 12;
const COOKIE_LEN: usize = 16;
/// Type, receiver id, counter, tag.
pub(crate) const OVERHEAD: usize = 24;
const TICK: Duration = Duration::from_millis(250);
/// Counters this far behind the highest seen are refused as replays.
const WINDOW: u64 = 64;

/// The null kind set.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Null;

fn header(kind: u8, id: u32) -> [u8; 8] {
    let id = id.to_le_bytes();
    [kind, 0, 0, 0, id[0], id[1], id[2], id[3]]
}

fn read_u32(d: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(d.get(at..at + 4)?.try_into().ok()?))
}

fn read_u64(d: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(d.get(at..at + 8)?.try_into().ok()?))
}

fn read_key(d: &[u8], at: usize) -> Option<PublicKey> {
    Some(PublicKey(d.get(at..at + 32)?.try_into().ok()?))
}

fn tag(session: u64, counter: u64, plaintext: &[u8]) -> u64 {
    let mut h = BuildHasherDefault::<FastHasher>::default().build_hasher();
    h.write_u64(session);
    h.write_u64(counter);
    h.write(plaintext);
    h.write_usize(plaintext.len());
    h.finish()
}

/// What the type byte and the three zero bytes say a message is.
fn message_type(d: &[u8]) -> Result<u8, Error> {
    match d {
        [t @ (INIT | RESPONSE | COOKIE | DATA), 0, 0, 0, ..] => Ok(*t),
        _ => Err(Error::Malformed),
    }
}

/// One peer's null tunnel.
#[derive(Debug)]
pub(crate) struct NullTunnel {
    own_key: PublicKey,
    peer: PublicKey,
    /// `index << 8`: what the peer puts in every message to us.
    local_id: u32,
    remote_id: Option<u32>,
    initiator: bool,
    keepalive: Option<Duration>,
    cookie: u64,
    handshaking: bool,
    tx_counter: u64,
    rx_highest: Option<u64>,
    rx_window: u64,
    queued: VecDeque<Vec<u8>>,
    next_tick: Instant,
    last_sent: Instant,
    stats: TunnelStats,
    events: VecDeque<TunnelEvent>,
}

impl NullTunnel {
    fn new(own_key: PublicKey, peer: PublicKey, index: u32, initiator: bool, now: Instant) -> Self {
        Self {
            own_key,
            peer,
            local_id: index << 8,
            remote_id: None,
            initiator,
            keepalive: None,
            cookie: 0,
            handshaking: false,
            tx_counter: 0,
            rx_highest: None,
            rx_window: 0,
            queued: VecDeque::new(),
            next_tick: now + TICK,
            last_sent: now,
            stats: TunnelStats::default(),
            events: VecDeque::new(),
        }
    }

    /// The session tag key: both ids, known only to the two ends.
    fn session(&self) -> Option<u64> {
        let remote = self.remote_id?;
        let (i, r) = if self.initiator {
            (self.local_id, remote)
        } else {
            (remote, self.local_id)
        };
        Some((u64::from(i) << 32) | u64::from(r))
    }

    fn write_init<'b>(&mut self, buf: &'b mut [u8]) -> Result<&'b [u8], Error> {
        let out = buf.get_mut(..INIT_LEN).ok_or(Error::BufferTooSmall)?;
        out[..8].copy_from_slice(&header(INIT, self.local_id));
        out[8..40].copy_from_slice(&self.own_key.0);
        out[40..72].copy_from_slice(&self.peer.0);
        out[72..80].copy_from_slice(&self.cookie.to_le_bytes());
        self.handshaking = true;
        Ok(out)
    }

    fn write_data<'b>(&mut self, plaintext: &[u8], buf: &'b mut [u8]) -> Result<&'b [u8], Error> {
        let session = self.session().ok_or(Error::NoSession)?;
        let remote = self.remote_id.ok_or(Error::NoSession)?;
        let out = buf
            .get_mut(..OVERHEAD + plaintext.len())
            .ok_or(Error::BufferTooSmall)?;
        self.tx_counter += 1;
        out[..8].copy_from_slice(&header(DATA, remote));
        out[8..16].copy_from_slice(&self.tx_counter.to_le_bytes());
        out[16..24].copy_from_slice(&tag(session, self.tx_counter, plaintext).to_le_bytes());
        out[24..].copy_from_slice(plaintext);
        Ok(out)
    }

    fn completed(&mut self, remote: u32, now: Instant) {
        self.remote_id = Some(remote);
        self.handshaking = false;
        self.tx_counter = 0;
        self.rx_highest = None;
        self.rx_window = 0;
        self.stats.handshakes += 1;
        self.stats.last_handshake = Some(now);
        self.events.push_back(TunnelEvent::HandshakeCompleted);
    }

    /// Replay check of a counter whose tag verified: a sliding window.
    fn accept_counter(&mut self, counter: u64) -> Result<(), Error> {
        match self.rx_highest {
            None => {
                self.rx_highest = Some(counter);
                self.rx_window = 1;
            }
            Some(h) if counter > h => {
                let shift = counter - h;
                self.rx_window = if shift >= WINDOW {
                    1
                } else {
                    (self.rx_window << shift) | 1
                };
                self.rx_highest = Some(counter);
            }
            Some(h) => {
                let back = h - counter;
                if back >= WINDOW || self.rx_window & (1 << back) != 0 {
                    return Err(Error::Replay);
                }
                self.rx_window |= 1 << back;
            }
        }
        Ok(())
    }
}

impl Tunnel for NullTunnel {
    fn has_session(&self) -> bool {
        self.remote_id.is_some()
    }

    fn stats(&self) -> TunnelStats {
        self.stats
    }

    fn initiate_handshake<'b>(
        &mut self,
        buf: &'b mut [u8],
        force: bool,
        _now: Instant,
    ) -> Result<Option<&'b [u8]>, Error> {
        if self.handshaking && !force {
            return Ok(None);
        }
        self.write_init(buf).map(Some)
    }

    fn encapsulate<'b>(
        &mut self,
        packet: &[u8],
        buf: &'b mut [u8],
        now: Instant,
    ) -> Result<Encapsulated<'b>, Error> {
        if buf.len() < Null::buffer_len(packet.len()) {
            return Err(Error::BufferTooSmall);
        }
        if self.has_session() {
            self.stats.tx_bytes += packet.len() as u64;
            self.stats.tx_packets += 1;
            self.last_sent = now;
            return self.write_data(packet, buf).map(Encapsulated::Network);
        }
        self.queued.push_back(packet.to_vec());
        if self.handshaking {
            Ok(Encapsulated::Queued)
        } else {
            self.write_init(buf).map(Encapsulated::Network)
        }
    }

    fn decapsulate<'b>(
        &mut self,
        _from: Option<std::net::SocketAddr>,
        datagram: &[u8],
        buf: &'b mut [u8],
        now: Instant,
    ) -> Result<Decapsulated<'b>, Error> {
        if buf.len() < Null::buffer_len(datagram.len()) {
            return Err(Error::BufferTooSmall);
        }
        match message_type(datagram)? {
            INIT if datagram.len() == INIT_LEN => {
                let sender = read_u32(datagram, 4).ok_or(Error::Malformed)?;
                if read_key(datagram, 8) != Some(self.peer) {
                    return Err(Error::AuthenticationFailed);
                }
                if read_key(datagram, 40) != Some(self.own_key) {
                    return Err(Error::InvalidMac);
                }
                self.completed(sender, now);
                let out = &mut buf[..RESPONSE_LEN];
                out[..8].copy_from_slice(&header(RESPONSE, sender));
                out[8..12].copy_from_slice(&self.local_id.to_le_bytes());
                Ok(Decapsulated::Network(out))
            }
            RESPONSE if datagram.len() == RESPONSE_LEN => {
                if read_u32(datagram, 4) != Some(self.local_id) || !self.handshaking {
                    return Err(Error::NoSession);
                }
                let sender = read_u32(datagram, 8).ok_or(Error::Malformed)?;
                self.completed(sender, now);
                // Confirm with a keepalive.
                self.write_data(&[], buf).map(Decapsulated::Network)
            }
            COOKIE if datagram.len() == COOKIE_LEN => {
                if read_u32(datagram, 4) != Some(self.local_id) {
                    return Err(Error::NoSession);
                }
                self.cookie = read_u64(datagram, 8).ok_or(Error::Malformed)?;
                Ok(Decapsulated::Nothing)
            }
            DATA if datagram.len() >= OVERHEAD => {
                let session = self.session().ok_or(Error::NoSession)?;
                if read_u32(datagram, 4) != Some(self.local_id) {
                    return Err(Error::NoSession);
                }
                let counter = read_u64(datagram, 8).ok_or(Error::Malformed)?;
                let plaintext = &datagram[OVERHEAD..];
                if read_u64(datagram, 16) != Some(tag(session, counter, plaintext)) {
                    return Err(Error::AuthenticationFailed);
                }
                self.accept_counter(counter)?;
                if plaintext.is_empty() {
                    return Ok(Decapsulated::Nothing);
                }
                let len = match plaintext[0] >> 4 {
                    4 if plaintext.len() >= 20 => {
                        usize::from(u16::from_be_bytes([plaintext[2], plaintext[3]]))
                    }
                    6 if plaintext.len() >= 40 => {
                        40 + usize::from(u16::from_be_bytes([plaintext[4], plaintext[5]]))
                    }
                    _ => return Err(Error::Malformed),
                };
                if len > plaintext.len() {
                    return Err(Error::Malformed);
                }
                let out = &mut buf[..len];
                out.copy_from_slice(&plaintext[..len]);
                self.stats.rx_bytes += len as u64;
                self.stats.rx_packets += 1;
                Ok(Decapsulated::Tunnel(out))
            }
            _ => Err(Error::Malformed),
        }
    }

    fn poll_network<'b>(&mut self, buf: &'b mut [u8]) -> Option<&'b [u8]> {
        if !self.has_session() {
            return None;
        }
        let packet = self.queued.pop_front()?;
        if buf.len() < Null::buffer_len(packet.len()) {
            self.queued.push_front(packet);
            return None;
        }
        self.stats.tx_bytes += packet.len() as u64;
        self.stats.tx_packets += 1;
        self.write_data(&packet, buf).ok()
    }

    fn poll_timeout(&self) -> Instant {
        self.next_tick
    }

    fn handle_timeout<'b>(
        &mut self,
        buf: &'b mut [u8],
        now: Instant,
    ) -> Result<Option<&'b [u8]>, Error> {
        if buf.len() < Null::buffer_len(0) {
            return Err(Error::BufferTooSmall);
        }
        if now < self.next_tick {
            return Ok(None);
        }
        self.next_tick = now + TICK;
        match self.keepalive {
            Some(k) if self.has_session() && now >= self.last_sent + k => {
                self.last_sent = now;
                self.write_data(&[], buf).map(Some)
            }
            _ => Ok(None),
        }
    }

    fn poll_event(&mut self) -> Option<TunnelEvent> {
        self.events.pop_front()
    }
}

/// The gateway side of the null kind: routes by receiver id, rate-limits
/// initiations with cookies. Shares ([`Responder::share`]) count together.
#[derive(Debug)]
pub(crate) struct NullResponder {
    key: PublicKey,
    load: Arc<Mutex<NullLoad>>,
}

#[derive(Debug)]
struct NullLoad {
    limit: u64,
    count: u64,
    reset_at: Option<Instant>,
}

impl NullResponder {
    fn cookie_for(&self, from: IpAddr) -> u64 {
        let mut h = BuildHasherDefault::<FastHasher>::default().build_hasher();
        h.write(&self.key.0);
        match from {
            IpAddr::V4(a) => h.write(&a.octets()),
            IpAddr::V6(a) => h.write(&a.octets()),
        }
        h.finish() | 1
    }
}

impl Responder for NullResponder {
    type Tunnel = NullTunnel;

    fn new(private_key: PrivateKey, handshake_limit: u64) -> Self {
        Self {
            key: private_key.public_key(),
            load: Arc::new(Mutex::new(NullLoad {
                limit: handshake_limit,
                count: 0,
                reset_at: None,
            })),
        }
    }

    fn share(&self) -> Self {
        Self {
            key: self.key,
            load: Arc::clone(&self.load),
        }
    }

    fn fast_index(datagram: &[u8]) -> Option<u32> {
        if datagram.len() >= OVERHEAD && datagram[..4] == [DATA, 0, 0, 0] {
            read_u32(datagram, 4).map(|id| id >> 8)
        } else {
            None
        }
    }

    fn classify<'b>(
        &mut self,
        from: Option<std::net::SocketAddr>,
        datagram: &[u8],
        buf: &'b mut [u8],
        now: Instant,
    ) -> Result<Incoming<'b>, Error> {
        self.route(Some((from.map(|a| a.ip()), now)), datagram, buf)
    }

    fn classify_admitted<'b>(
        &mut self,
        datagram: &[u8],
        buf: &'b mut [u8],
    ) -> Result<Incoming<'b>, Error> {
        self.route(None, datagram, buf)
    }

    fn proves_sender(datagram: &[u8]) -> bool {
        datagram.first() != Some(&COOKIE)
    }

    fn tunnel(&self, peer: &GatewayPeer, index: u32, now: Instant) -> Option<NullTunnel> {
        Null::KINDS
            .contains(&peer.tunnel)
            .then(|| NullTunnel::new(self.key, peer.public_key, index, false, now))
    }
}

impl NullResponder {
    fn route<'b>(
        &mut self,
        admit: Option<(Option<IpAddr>, Instant)>,
        datagram: &[u8],
        buf: &'b mut [u8],
    ) -> Result<Incoming<'b>, Error> {
        match message_type(datagram)? {
            INIT if datagram.len() == INIT_LEN => {
                if read_key(datagram, 40) != Some(self.key) {
                    return Err(Error::InvalidMac);
                }
                if let Some((from, now)) = admit
                    && self.under_load(now)
                {
                    let Some(from) = from else {
                        return Err(Error::UnderLoad);
                    };
                    let cookie = self.cookie_for(from);
                    if read_u64(datagram, 72) != Some(cookie) {
                        let sender = read_u32(datagram, 4).ok_or(Error::Malformed)?;
                        let out = buf.get_mut(..COOKIE_LEN).ok_or(Error::BufferTooSmall)?;
                        out[..8].copy_from_slice(&header(COOKIE, sender));
                        out[8..].copy_from_slice(&cookie.to_le_bytes());
                        return Ok(Incoming::CookieReply(out));
                    }
                }
                let peer_public_key = read_key(datagram, 8).ok_or(Error::Malformed)?;
                Ok(Incoming::Initiation { peer_public_key })
            }
            RESPONSE | COOKIE | DATA if datagram.len() >= RESPONSE_LEN => {
                let id = read_u32(datagram, 4).ok_or(Error::Malformed)?;
                Ok(Incoming::ForIndex(id >> 8))
            }
            _ => Err(Error::Malformed),
        }
    }

    fn under_load(&self, now: Instant) -> bool {
        let mut load = self
            .load
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if load.reset_at.is_none_or(|t| now >= t) {
            load.count = 0;
            load.reset_at = Some(now + Duration::from_secs(1));
        }
        load.count += 1;
        load.count > load.limit
    }
}

impl Kinds for Null {
    type Tunnel = NullTunnel;
    type Responder = NullResponder;

    // Stands in for WireGuard; like the product, it runs no IPsec.
    const KINDS: &'static [TunnelKind] = &[TunnelKind::Wireguard];
    const TIMER_TICK: Duration = TICK;
    const MAX_INDEX: u32 = (1 << 24) - 1;
    const DATA_OVERHEAD: usize = OVERHEAD;

    fn buffer_len(packet_len: usize) -> usize {
        (packet_len + OVERHEAD).max(INIT_LEN)
    }

    fn initiator(
        desired: &AgentTunnel,
        private_key: PrivateKey,
        index: u32,
        now: Instant,
    ) -> Option<NullTunnel> {
        if !Self::KINDS.contains(&desired.kind) {
            return None;
        }
        let mut t = NullTunnel::new(
            private_key.public_key(),
            desired.public_key,
            index,
            true,
            now,
        );
        t.keepalive = Some(desired.persistent_keepalive_s)
            .filter(|s| *s > 0)
            .map(|s| Duration::from_secs(u64::from(s)));
        Some(t)
    }
}
