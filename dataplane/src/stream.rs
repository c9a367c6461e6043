//! Tunnel datagrams over a byte stream: the carrier of the TLS fallback.
//!
//! A stream is a *virtual endpoint*: the worker's packet logic sends to and
//! hears from a `SocketAddr` as with UDP, and never knows the difference.
//! [`StreamTable`] maps such endpoints to the bounded queue of their stream;
//! [`crate::udp::Udp::send`] looks there first, so GSO trains, handshakes
//! and keepalives for a stream endpoint become WebSocket frames in that
//! queue instead of `sendmsg` calls. Datagrams read from a stream reach the
//! worker through its [`Inbox`] as chunks of several datagrams, and enter
//! the packet logic exactly like received UDP datagrams.
//!
//! The framing is WebSocket (RFC 6455 §5.2): one binary frame per tunnel
//! datagram, a 2 to 4 byte header (plus the 4-byte masking key that RFC 6455
//! §5.3 requires on frames from the client). A full queue drops the datagram
//! (counted) instead of blocking the worker: the tunnel's own protocol
//! recovers from loss, and one slow stream never stalls the other peers.
//!
//! What a peer at the other end cannot do (it may be anyone who got through
//! the upgrade, so these hold on both sides):
//! - hold memory or a worker: each stream has at most [`CHUNKS_IN_FLIGHT`]
//!   chunks waiting for its worker; beyond that the stream stops reading and
//!   TCP's flow control slows the sender, so one fast stream cannot crowd
//!   the others out of the worker's inbox;
//! - keep a dead stream open: nothing read for [`StreamOptions::idle_timeout`]
//!   (the client pings every [`PING_INTERVAL`]) or a write stuck for
//!   [`WRITE_TIMEOUT`] ends it;
//! - flood with control frames: a ping longer than 125 bytes ends the stream
//!   (RFC 6455 §5.5), and only the latest ping is answered (§5.5.3 allows
//!   it), so pongs never pile up in the send queue.
//!
//! On the gateway a stream's virtual endpoint is an address that no UDP
//! peer can have ([`virtual_endpoint`]: 240.0.0.0/4, port 0), so a stream
//! never shadows a UDP peer, and a send to a stream that has just closed
//! is dropped rather than sent.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

/// The largest tunnel datagram a stream carries.
pub const MAX_DATAGRAM: usize = 65535;
/// Chunks (each one send of the worker: a datagram or a GSO train) queued
/// per stream before datagrams are dropped.
pub const STREAM_QUEUE: usize = 256;
/// Chunks queued from all streams towards one worker.
pub const INBOX_QUEUE: usize = 1024;
/// Bytes a stream reads at once.
const READ_CHUNK: usize = 64 * 1024;
/// Chunks of one stream waiting for its worker; then the stream stops
/// reading until the worker took one.
pub const CHUNKS_IN_FLIGHT: usize = 8;
/// How often the client pings (so that both sides see traffic on an idle
/// tunnel, and a proxy does not time the connection out).
pub const PING_INTERVAL: Duration = Duration::from_secs(15);
/// Nothing read for this long ends a stream: three pings missed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(45);
/// A write that cannot finish in this time ends the stream (the peer does
/// not read).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest control frame payload (RFC 6455 §5.5).
const MAX_CONTROL: usize = 125;

/// The virtual endpoint of the gateway's stream number `id`: in 240.0.0.0/4
/// (reserved, RFC 1112 §4) with port 0, which no UDP datagram can come
/// from or be sent to, so it never collides with a UDP peer's address.
pub fn virtual_endpoint(id: u64) -> SocketAddr {
    let low = (id & 0x0fff_ffff) as u32;
    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0xf000_0000 | low)), 0)
}

/// Whether `addr` is a [`virtual_endpoint`].
pub fn is_virtual(addr: SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(v4) => addr.port() == 0 && v4.octets()[0] >= 240,
        IpAddr::V6(_) => false,
    }
}

const OP_CONTINUATION: u8 = 0x0;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xa;

/// Appends one final WebSocket frame (RFC 6455 §5.2) with `opcode` and
/// `payload`, masked with `mask` when given (frames from the client).
pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        // Fits the 7-bit length.
        out.push(mask_bit | len as u8);
    } else if let Ok(len16) = u16::try_from(len) {
        out.push(mask_bit | 126);
        out.extend_from_slice(&len16.to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    match mask {
        None => out.extend_from_slice(payload),
        Some(key) => {
            out.extend_from_slice(&key);
            let start = out.len();
            out.extend_from_slice(payload);
            apply_mask(&mut out[start..], key);
        }
    }
}

/// XORs `bytes` with the masking key (RFC 6455 §5.3); its own inverse.
fn apply_mask(bytes: &mut [u8], key: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = bytes.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(w) ^ wide).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// Why a stream's bytes are not a frame we accept; the stream is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Reserved bits set, a fragmented message or an unknown opcode: our
    /// peer never sends these.
    #[error("unexpected frame")]
    Unexpected,
    /// Masked when it must not be or the reverse (RFC 6455 §5.1).
    #[error("wrong masking")]
    Masking,
    /// Longer than a tunnel datagram.
    #[error("frame too long")]
    TooLong,
    /// A control frame longer than 125 bytes (RFC 6455 §5.5).
    #[error("control frame too long")]
    ControlTooLong,
}

/// A frame the reader acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A tunnel datagram at this range of the buffer.
    Binary(std::ops::Range<usize>),
    /// A ping to answer with a pong carrying this range.
    Ping(std::ops::Range<usize>),
    /// A pong with this range (ignored).
    Pong(std::ops::Range<usize>),
    /// The peer closes the stream.
    Close,
}

/// Splits received bytes into frames, unmasking in place.
#[derive(Debug)]
pub struct Deframer {
    buf: Vec<u8>,
    pos: usize,
    masked: bool,
}

impl Deframer {
    /// A deframer for frames from the client (`masked`) or the server.
    pub fn new(masked: bool) -> Self {
        Self {
            buf: Vec::with_capacity(READ_CHUNK * 2),
            pos: 0,
            masked,
        }
    }

    /// The buffer to append received bytes to; consumed bytes are dropped
    /// first.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        &mut self.buf
    }

    /// The bytes of the buffer (frame ranges index into it).
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The next complete frame, or `None` when more bytes are needed.
    ///
    /// # Errors
    /// A [`FrameError`]: the stream is to be closed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let b = &self.buf[self.pos..];
        let [b0, b1, ..] = *b else {
            return Ok(None);
        };
        let (fin, rsv, opcode) = (b0 & 0x80 != 0, b0 & 0x70, b0 & 0x0f);
        if rsv != 0 || !fin || opcode == OP_CONTINUATION {
            return Err(FrameError::Unexpected);
        }
        if (b1 & 0x80 != 0) != self.masked {
            return Err(FrameError::Masking);
        }
        let (len, mut at) = match b1 & 0x7f {
            126 => match b.get(2..4) {
                Some(l) => (usize::from(u16::from_be_bytes([l[0], l[1]])), 4),
                None => return Ok(None),
            },
            127 => match b.get(2..10) {
                Some(l) => {
                    let mut w = [0u8; 8];
                    w.copy_from_slice(l);
                    (
                        usize::try_from(u64::from_be_bytes(w)).unwrap_or(usize::MAX),
                        10,
                    )
                }
                None => return Ok(None),
            },
            l => (usize::from(l), 2),
        };
        if len > MAX_DATAGRAM {
            return Err(FrameError::TooLong);
        }
        if opcode & 0x8 != 0 && len > MAX_CONTROL {
            return Err(FrameError::ControlTooLong);
        }
        let key = if self.masked {
            let Some(k) = b.get(at..at + 4) else {
                return Ok(None);
            };
            at += 4;
            Some([k[0], k[1], k[2], k[3]])
        } else {
            None
        };
        if b.len() < at + len {
            return Ok(None);
        }
        let start = self.pos + at;
        let range = start..start + len;
        self.pos = range.end;
        if let Some(key) = key {
            apply_mask(&mut self.buf[range.clone()], key);
        }
        Ok(Some(match opcode {
            OP_BINARY => Frame::Binary(range),
            OP_PING => Frame::Ping(range),
            OP_PONG => Frame::Pong(range),
            OP_CLOSE => Frame::Close,
            _ => return Err(FrameError::Unexpected),
        }))
    }
}

/// Datagrams read from a stream, for the worker: `from` is the stream's
/// virtual endpoint; `bytes` holds datagrams, each after its length
/// (2 bytes, big-endian).
#[derive(Debug)]
pub struct Chunk {
    /// The virtual endpoint.
    pub from: SocketAddr,
    /// The length-prefixed datagrams.
    pub bytes: Vec<u8>,
    /// One of the stream's [`CHUNKS_IN_FLIGHT`], returned when the worker
    /// drops the chunk.
    _credit: Option<OwnedSemaphorePermit>,
}

impl Chunk {
    /// A chunk outside any stream's credit (tests, tools).
    pub fn new(from: SocketAddr, bytes: Vec<u8>) -> Self {
        Self {
            from,
            bytes,
            _credit: None,
        }
    }

    /// The datagrams in the chunk.
    pub fn datagrams(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = &self.bytes[..];
        std::iter::from_fn(move || {
            let [a, b, tail @ ..] = rest else {
                return None;
            };
            let len = usize::from(u16::from_be_bytes([*a, *b]));
            let d = tail.get(..len)?;
            rest = &tail[len..];
            Some(d)
        })
    }
}

/// Counters of all streams of a program.
#[derive(Debug, Default)]
pub struct StreamCounters {
    /// Streams opened.
    pub opened: AtomicU64,
    /// Streams closed.
    pub closed: AtomicU64,
    /// Datagrams queued towards streams.
    pub datagrams_sent: AtomicU64,
    /// Datagrams read from streams.
    pub datagrams_received: AtomicU64,
    /// Datagrams dropped because a stream's queue (or a worker's inbox) was full.
    pub queue_drops: AtomicU64,
    /// Streams closed for a malformed frame.
    pub malformed: AtomicU64,
    /// Streams closed because nothing was read for the idle timeout or a
    /// write did not finish in time.
    pub timed_out: AtomicU64,
    /// Sends to a virtual endpoint whose stream had closed (dropped).
    pub closed_drops: AtomicU64,
}

/// A snapshot of [`StreamCounters`] with the streams open now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Streams open now.
    pub open: u64,
    /// Streams opened.
    pub opened: u64,
    /// Datagrams queued towards streams.
    pub datagrams_sent: u64,
    /// Datagrams read from streams.
    pub datagrams_received: u64,
    /// Datagrams dropped (full queue).
    pub queue_drops: u64,
    /// Streams closed for a malformed frame.
    pub malformed: u64,
    /// Streams closed for silence or a stuck write.
    pub timed_out: u64,
    /// Sends to a stream that had closed (dropped).
    pub closed_drops: u64,
}

struct Route {
    id: u64,
    tx: mpsc::Sender<Vec<u8>>,
    /// Frames are masked (this side is the client).
    mask: bool,
    /// The next send goes out over UDP instead, once (the agent's UDP probe).
    probe_udp: Arc<AtomicBool>,
    /// The stream goes through an HTTP proxy (shown as `tls_proxy`).
    via_proxy: bool,
    /// The address of the stream's TCP peer (for display).
    remote: SocketAddr,
}

#[derive(Default)]
struct TableInner {
    routes: RwLock<HashMap<SocketAddr, Route>>,
    /// Routes in the table: the UDP send path skips the lock when 0.
    count: AtomicU64,
    next_id: AtomicU64,
    counters: StreamCounters,
}

/// The virtual endpoints of a program's streams, shared by its workers and
/// its stream tasks.
#[derive(Clone, Default)]
pub struct StreamTable {
    inner: Arc<TableInner>,
}

impl std::fmt::Debug for StreamTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamTable")
            .field("open", &self.inner.count.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// What [`StreamTable::send`] did with a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// No stream has this endpoint: send over UDP.
    Udp,
    /// Queued to (or dropped at) the stream.
    Stream,
}

impl StreamTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// The counters and the streams open now.
    pub fn stats(&self) -> StreamStats {
        let c = &self.inner.counters;
        StreamStats {
            open: self.inner.count.load(Ordering::Relaxed),
            opened: c.opened.load(Ordering::Relaxed),
            datagrams_sent: c.datagrams_sent.load(Ordering::Relaxed),
            datagrams_received: c.datagrams_received.load(Ordering::Relaxed),
            queue_drops: c.queue_drops.load(Ordering::Relaxed),
            malformed: c.malformed.load(Ordering::Relaxed),
            timed_out: c.timed_out.load(Ordering::Relaxed),
            closed_drops: c.closed_drops.load(Ordering::Relaxed),
        }
    }

    /// A new virtual endpoint for a stream (the gateway's side).
    pub fn allocate_endpoint(&self) -> SocketAddr {
        virtual_endpoint(self.inner.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// The TCP peer of the stream at `endpoint`.
    pub fn remote_of(&self, endpoint: SocketAddr) -> Option<SocketAddr> {
        if self.inner.count.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let routes = self.inner.routes.read().ok()?;
        routes.get(&endpoint).map(|r| r.remote)
    }

    /// Whether `endpoint` is a stream now, and whether through a proxy.
    pub fn lookup(&self, endpoint: SocketAddr) -> Option<bool> {
        if self.inner.count.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let routes = self.inner.routes.read().ok()?;
        routes.get(&endpoint).map(|r| r.via_proxy)
    }

    /// Makes the next send to `endpoint` leave over UDP instead (once): a
    /// probe of the UDP path, answered the way it came.
    /// Returns `false` when `endpoint` is not a stream.
    pub fn probe_udp(&self, endpoint: SocketAddr) -> bool {
        let Ok(routes) = self.inner.routes.read() else {
            return false;
        };
        routes.get(&endpoint).is_some_and(|r| {
            r.probe_udp.store(true, Ordering::Relaxed);
            true
        })
    }

    /// Queues `contents` for the stream of `dst` when there is one:
    /// `count` datagrams of `segment` bytes each (the last may be shorter),
    /// or one datagram without `segment`.
    pub fn send(&self, dst: SocketAddr, contents: &[u8], segment: Option<usize>) -> Routed {
        let seg = segment.unwrap_or(contents.len()).max(1);
        let n = contents.len().div_ceil(seg).max(1) as u64;
        let c = &self.inner.counters;
        let gone = || {
            c.closed_drops.fetch_add(n, Ordering::Relaxed);
            Routed::Stream
        };
        if self.inner.count.load(Ordering::Relaxed) == 0 {
            return if is_virtual(dst) { gone() } else { Routed::Udp };
        }
        let Ok(routes) = self.inner.routes.read() else {
            return Routed::Udp;
        };
        let Some(route) = routes.get(&dst) else {
            return if is_virtual(dst) { gone() } else { Routed::Udp };
        };
        if route.probe_udp.swap(false, Ordering::Relaxed) {
            return Routed::Udp;
        }
        let mut out = Vec::with_capacity(contents.len() + 14 * n as usize);
        let empty: &[u8] = &[];
        let datagrams = contents.chunks(seg);
        for d in datagrams.chain(contents.is_empty().then_some(empty)) {
            let mask = route.mask.then(rand::random::<[u8; 4]>);
            encode_frame(&mut out, OP_BINARY, d, mask);
        }
        match route.tx.try_send(out) {
            Ok(()) => c.datagrams_sent.fetch_add(n, Ordering::Relaxed),
            Err(_) => c.queue_drops.fetch_add(n, Ordering::Relaxed),
        };
        Routed::Stream
    }

    fn insert(&self, endpoint: SocketAddr, route: Route) {
        if let Ok(mut routes) = self.inner.routes.write() {
            routes.insert(endpoint, route);
            self.inner
                .count
                .store(routes.len() as u64, Ordering::Relaxed);
        }
    }

    fn remove(&self, endpoint: SocketAddr, id: u64) {
        if let Ok(mut routes) = self.inner.routes.write() {
            // A newer stream of the same endpoint may have replaced this one.
            if routes.get(&endpoint).is_some_and(|r| r.id == id) {
                routes.remove(&endpoint);
            }
            self.inner
                .count
                .store(routes.len() as u64, Ordering::Relaxed);
        }
    }
}

/// Where a worker takes stream datagrams from.
pub type Inbox = mpsc::Receiver<Chunk>;

/// One stream's session options.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// The virtual endpoint the worker sends to and hears from.
    pub endpoint: SocketAddr,
    /// This side is the WebSocket client (masks its frames).
    pub client: bool,
    /// The stream goes through an HTTP proxy.
    pub via_proxy: bool,
    /// The address of the TCP peer (shown instead of a virtual endpoint).
    pub remote: SocketAddr,
    /// Nothing read for this long ends the stream ([`IDLE_TIMEOUT`]).
    pub idle_timeout: Duration,
}

/// Removes a route when the session ends, also on cancellation.
struct RouteGuard<'a> {
    table: &'a StreamTable,
    endpoint: SocketAddr,
    id: u64,
}

impl Drop for RouteGuard<'_> {
    fn drop(&mut self) {
        self.table.remove(self.endpoint, self.id);
        self.table
            .inner
            .counters
            .closed
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// Carries tunnel datagrams over an upgraded stream until it ends: frames
/// read go to `inbox` (the worker), the worker's sends to `opts.endpoint`
/// are written. `early` holds bytes read past the upgrade's head.
///
/// # Errors
/// The stream's IO error, malformed frame or timeout (`TimedOut`); `Ok`
/// when the peer closed it.
pub async fn run<S>(
    stream: S,
    early: &[u8],
    opts: StreamOptions,
    table: &StreamTable,
    inbox: &mpsc::Sender<Chunk>,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(STREAM_QUEUE);
    let id = table.inner.next_id.fetch_add(1, Ordering::Relaxed);
    table.insert(
        opts.endpoint,
        Route {
            id,
            tx,
            mask: opts.client,
            probe_udp: Arc::new(AtomicBool::new(false)),
            via_proxy: opts.via_proxy,
            remote: opts.remote,
        },
    );
    let counters = &table.inner.counters;
    counters.opened.fetch_add(1, Ordering::Relaxed);
    let _guard = RouteGuard {
        table,
        endpoint: opts.endpoint,
        id,
    };
    // The payload of the latest ping not answered yet (RFC 6455 §5.5.3).
    let (pong_tx, mut pong_rx) = watch::channel::<Option<Vec<u8>>>(None);
    let mask = |client: bool| client.then(rand::random::<[u8; 4]>);
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = async {
        let mut ping = tokio::time::interval(PING_INTERVAL);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        let mut out = Vec::new();
        loop {
            out.clear();
            // `changed()` marks the value seen, so remember that it fired.
            let mut pong_due = false;
            tokio::select! {
                frames = rx.recv() => {
                    let Some(frames) = frames else { return Ok(()) };
                    out.extend_from_slice(&frames);
                    // Whatever else is queued goes in the same TLS records.
                    while let Ok(more) = rx.try_recv() {
                        out.extend_from_slice(&more);
                    }
                }
                changed = pong_rx.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    pong_due = true;
                }
                _ = ping.tick(), if opts.client => {
                    encode_frame(&mut out, OP_PING, &[], mask(opts.client));
                }
            }
            if (pong_due || pong_rx.has_changed().unwrap_or(false))
                && let Some(payload) = pong_rx.borrow_and_update().as_deref()
            {
                encode_frame(&mut out, OP_PONG, payload, mask(opts.client));
            }
            let write = async {
                wr.write_all(&out).await?;
                wr.flush().await
            };
            match tokio::time::timeout(WRITE_TIMEOUT, write).await {
                Ok(r) => r?,
                Err(_) => {
                    counters.timed_out.fetch_add(1, Ordering::Relaxed);
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "write stuck"));
                }
            }
        }
    };
    let reader = async {
        let credits = Arc::new(Semaphore::new(CHUNKS_IN_FLIGHT));
        let mut de = Deframer::new(!opts.client);
        de.buffer().extend_from_slice(early);
        loop {
            let mut chunk = Vec::new();
            let mut datagrams = 0u64;
            loop {
                let frame = match de.next_frame() {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        counters.malformed.fetch_add(1, Ordering::Relaxed);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                };
                match frame {
                    Frame::Binary(r) => {
                        let d = &de.bytes()[r];
                        // MAX_DATAGRAM bounds the length to 16 bits.
                        chunk.extend_from_slice(&(d.len() as u16).to_be_bytes());
                        chunk.extend_from_slice(d);
                        datagrams += 1;
                    }
                    Frame::Ping(r) => {
                        pong_tx.send_replace(Some(de.bytes()[r].to_vec()));
                    }
                    Frame::Pong(_) => {}
                    Frame::Close => return Ok(()),
                }
            }
            if datagrams > 0 {
                // Waits while the worker still holds this stream's share:
                // the stream stops reading and TCP slows the peer down.
                let Ok(credit) = credits.clone().acquire_owned().await else {
                    return Ok(());
                };
                let c = Chunk {
                    from: opts.endpoint,
                    bytes: chunk,
                    _credit: Some(credit),
                };
                match inbox.try_send(c) {
                    Ok(()) => counters
                        .datagrams_received
                        .fetch_add(datagrams, Ordering::Relaxed),
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        counters.queue_drops.fetch_add(datagrams, Ordering::Relaxed)
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
                };
            }
            let buf = de.buffer();
            buf.reserve(READ_CHUNK);
            match tokio::time::timeout(opts.idle_timeout, rd.read_buf(buf)).await {
                Ok(Ok(0)) => return Ok(()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    counters.timed_out.fetch_add(1, Ordering::Relaxed);
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "nothing read"));
                }
            }
        }
    };
    tokio::select! {
        r = writer => r,
        r = reader => r,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn frames(masked: bool, bytes: &[u8]) -> Result<Vec<(u8, Vec<u8>)>, FrameError> {
        let mut de = Deframer::new(masked);
        de.buffer().extend_from_slice(bytes);
        let mut got = Vec::new();
        while let Some(f) = de.next_frame()? {
            got.push(match f {
                Frame::Binary(r) => (OP_BINARY, de.bytes()[r].to_vec()),
                Frame::Ping(r) => (OP_PING, de.bytes()[r].to_vec()),
                Frame::Pong(r) => (OP_PONG, de.bytes()[r].to_vec()),
                Frame::Close => (OP_CLOSE, vec![]),
            });
        }
        Ok(got)
    }

    #[test]
    fn frames_round_trip_at_every_length_class_masked_or_not() {
        for masked in [false, true] {
            let mut wire = Vec::new();
            let payloads: Vec<Vec<u8>> = [0usize, 1, 125, 126, 1420, 65535]
                .iter()
                .map(|&n| (0..n).map(|i| (i * 7) as u8).collect())
                .collect();
            for p in &payloads {
                encode_frame(&mut wire, OP_BINARY, p, masked.then_some([1, 2, 3, 4]));
            }
            if masked {
                // The masked bytes differ from the payload.
                assert!(!wire.windows(125).any(|w| w == &payloads[2][..]));
            }
            let got = frames(masked, &wire).unwrap();
            let want: Vec<(u8, Vec<u8>)> = payloads.into_iter().map(|p| (OP_BINARY, p)).collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn the_rfc_6455_examples_decode() {
        // RFC 6455 §5.7: a single-frame unmasked and a masked text "Hello"
        // carry opcode 1, which a tunnel peer never sends.
        assert_eq!(
            frames(false, &[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]),
            Err(FrameError::Unexpected)
        );
        // The unmasked ping "Hello" of §5.7.
        assert_eq!(
            frames(false, &[0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]).unwrap(),
            vec![(OP_PING, b"Hello".to_vec())]
        );
        // The masked "Hello" of §5.7 with the binary opcode.
        let masked = [
            0x82, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        assert_eq!(
            frames(true, &masked).unwrap(),
            vec![(OP_BINARY, b"Hello".to_vec())]
        );
    }

    #[test]
    fn partial_frames_wait_and_bad_frames_fail() {
        let mut wire = Vec::new();
        encode_frame(&mut wire, OP_BINARY, &[9; 300], None);
        let mut de = Deframer::new(false);
        for (i, b) in wire.iter().enumerate() {
            de.buffer().push(*b);
            let f = de.next_frame().unwrap();
            assert_eq!(f.is_some(), i + 1 == wire.len(), "byte {i}");
        }
        // Wrong masking either way.
        assert_eq!(frames(true, &wire), Err(FrameError::Masking));
        let mut masked = Vec::new();
        encode_frame(&mut masked, OP_BINARY, &[1], Some([0; 4]));
        assert_eq!(frames(false, &masked), Err(FrameError::Masking));
        // A fragment, reserved bits, an unknown opcode.
        assert_eq!(frames(false, &[0x02, 0x00]), Err(FrameError::Unexpected));
        assert_eq!(frames(false, &[0xc2, 0x00]), Err(FrameError::Unexpected));
        assert_eq!(frames(false, &[0x83, 0x00]), Err(FrameError::Unexpected));
        // Longer than a datagram.
        let mut long = vec![0x82, 127];
        long.extend_from_slice(&(70_000u64).to_be_bytes());
        assert_eq!(frames(false, &long), Err(FrameError::TooLong));
    }

    #[test]
    fn chunks_yield_their_datagrams_and_stop_at_a_truncated_one() {
        let c = Chunk::new(
            "192.0.2.1:443".parse().unwrap(),
            vec![0, 2, 7, 8, 0, 0, 0, 5, 1],
        );
        let got: Vec<&[u8]> = c.datagrams().collect();
        assert_eq!(got, vec![&[7u8, 8][..], &[][..]]);
    }

    #[test]
    fn the_table_routes_only_its_endpoints_and_splits_trains_into_frames() {
        let table = StreamTable::new();
        let ep: SocketAddr = "192.0.2.1:40000".parse().unwrap();
        let other: SocketAddr = "192.0.2.2:51820".parse().unwrap();
        assert_eq!(table.send(ep, &[1, 2, 3], None), Routed::Udp);
        let (tx, mut rx) = mpsc::channel(1);
        let probe = Arc::new(AtomicBool::new(false));
        table.insert(
            ep,
            Route {
                id: 7,
                tx,
                mask: false,
                probe_udp: probe.clone(),
                via_proxy: true,
                remote: "198.51.100.7:40000".parse().unwrap(),
            },
        );
        assert_eq!(table.lookup(ep), Some(true));
        assert_eq!(table.send(other, &[1], None), Routed::Udp);
        // A GSO train of 3 datagrams of 4 bytes, the last one shorter.
        assert_eq!(table.send(ep, &[1; 10], Some(4)), Routed::Stream);
        let got = frames(false, &rx.try_recv().unwrap()).unwrap();
        let lens: Vec<usize> = got.iter().map(|(_, p)| p.len()).collect();
        assert_eq!(lens, vec![4, 4, 2]);
        // The queue holds one chunk: the second is dropped and counted.
        assert_eq!(table.send(ep, &[1], None), Routed::Stream);
        assert_eq!(table.send(ep, &[1], None), Routed::Stream);
        assert_eq!(table.stats().queue_drops, 1);
        assert_eq!(table.stats().datagrams_sent, 4);
        // A probe sends the next datagram over UDP instead, once.
        assert!(table.probe_udp(ep));
        let _ = rx.try_recv();
        assert_eq!(table.send(ep, &[1], None), Routed::Udp);
        assert!(rx.try_recv().is_err(), "nothing went to the stream");
        assert_eq!(table.send(ep, &[1], None), Routed::Stream);
        // An old session's cleanup leaves a newer route alone.
        table.remove(ep, 6);
        assert_eq!(table.lookup(ep), Some(true));
        table.remove(ep, 7);
        assert_eq!(table.lookup(ep), None);
        assert_eq!(table.send(ep, &[1], None), Routed::Udp);
    }

    #[tokio::test]
    async fn a_session_carries_datagrams_both_ways_and_unroutes_when_closed() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let table = StreamTable::new();
        let (inbox_tx, mut inbox) = mpsc::channel(16);
        let ep: SocketAddr = "192.0.2.9:443".parse().unwrap();
        let opts = options(ep, true, IDLE_TIMEOUT);
        let t = table.clone();
        let session =
            tokio::spawn(async move { run(a, &[], opts, &t, &inbox_tx).await.map(|()| t) });
        // The "server" end: reads masked frames, writes unmasked ones.
        let (mut srd, mut swr) = tokio::io::split(b);
        let mut wire = Vec::new();
        encode_frame(&mut wire, OP_BINARY, b"from server", None);
        encode_frame(&mut wire, OP_BINARY, b"again", None);
        swr.write_all(&wire).await.unwrap();
        let chunk = inbox.recv().await.unwrap();
        assert_eq!(chunk.from, ep);
        let got: Vec<&[u8]> = chunk.datagrams().collect();
        assert!(got.len() <= 2 && got[0] == b"from server");
        while table.lookup(ep).is_none() {
            tokio::task::yield_now().await;
        }
        assert_eq!(table.send(ep, b"to server", None), Routed::Stream);
        let mut buf = vec![0u8; 64];
        let n = srd.read(&mut buf).await.unwrap();
        assert_eq!(
            frames(true, &buf[..n]).unwrap(),
            vec![(OP_BINARY, b"to server".to_vec())]
        );
        let mut close = Vec::new();
        encode_frame(&mut close, OP_CLOSE, &[], None);
        swr.write_all(&close).await.unwrap();
        let t = session.await.unwrap().unwrap();
        assert_eq!(t.lookup(ep), None, "the route is gone with the stream");
        assert_eq!(t.stats().open, 0);
    }

    fn options(endpoint: SocketAddr, client: bool, idle_timeout: Duration) -> StreamOptions {
        StreamOptions {
            endpoint,
            client,
            via_proxy: false,
            remote: "198.51.100.7:40000".parse().unwrap(),
            idle_timeout,
        }
    }

    #[test]
    fn control_frames_longer_than_125_bytes_end_the_stream() {
        let mut wire = Vec::new();
        encode_frame(&mut wire, OP_PING, &[7; 125], None);
        assert_eq!(frames(false, &wire).unwrap(), vec![(OP_PING, vec![7; 125])]);
        for op in [OP_PING, OP_PONG, OP_CLOSE] {
            let mut wire = Vec::new();
            encode_frame(&mut wire, op, &[7; 126], None);
            assert_eq!(frames(false, &wire), Err(FrameError::ControlTooLong));
        }
    }

    #[test]
    fn virtual_endpoints_are_never_udp_addresses() {
        let table = StreamTable::new();
        let a = table.allocate_endpoint();
        let b = table.allocate_endpoint();
        assert_ne!(a, b);
        assert!(is_virtual(a) && is_virtual(virtual_endpoint(u64::MAX)));
        assert_eq!(a.port(), 0);
        assert!(!is_virtual("192.0.2.1:0".parse().unwrap()));
        assert!(!is_virtual("240.0.0.1:443".parse().unwrap()));
        assert!(!is_virtual("[100::1]:0".parse().unwrap()));
        // A send to a virtual endpoint whose stream is gone is dropped and
        // counted, never handed to the UDP socket.
        assert_eq!(table.send(a, &[1; 10], Some(4)), Routed::Stream);
        assert_eq!(table.stats().closed_drops, 3);
        assert_eq!(
            table.send("192.0.2.1:51820".parse().unwrap(), &[1], None),
            Routed::Udp
        );
    }

    /// Runs a server-side session over a duplex pipe; returns the peer's end.
    fn serve(
        table: &StreamTable,
        inbox: mpsc::Sender<Chunk>,
        idle: Duration,
    ) -> (
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<io::Result<()>>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let t = table.clone();
        let opts = options(t.allocate_endpoint(), false, idle);
        let session = tokio::spawn(async move { run(a, &[], opts, &t, &inbox).await });
        (b, session)
    }

    #[tokio::test]
    async fn a_ping_flood_is_answered_with_the_latest_pong_only() {
        let table = StreamTable::new();
        let (inbox_tx, _inbox) = mpsc::channel(16);
        let (peer, session) = serve(&table, inbox_tx, IDLE_TIMEOUT);
        let (mut prd, mut pwr) = tokio::io::split(peer);
        let mut wire = Vec::new();
        for i in 0..1000u32 {
            encode_frame(&mut wire, OP_PING, &i.to_be_bytes(), Some([1, 2, 3, 4]));
        }
        pwr.write_all(&wire).await.unwrap();
        let mut pongs = Vec::new();
        let mut de = Deframer::new(false);
        while pongs.last() != Some(&999u32.to_be_bytes().to_vec()) {
            let buf = de.buffer();
            buf.reserve(4096);
            assert!(prd.read_buf(buf).await.unwrap() > 0);
            while let Some(f) = de.next_frame().unwrap() {
                let Frame::Pong(r) = f else {
                    panic!("only pongs expected, got {f:?}");
                };
                pongs.push(de.bytes()[r].to_vec());
            }
        }
        // Answering every ping would queue hundreds of pongs ahead of data.
        assert!(
            pongs.len() <= 4,
            "{} pongs for a burst of pings",
            pongs.len()
        );
        session.abort();
    }

    #[tokio::test]
    async fn a_silent_peer_is_dropped_after_the_idle_timeout() {
        let table = StreamTable::new();
        let (inbox_tx, _inbox) = mpsc::channel(16);
        let (_peer, session) = serve(&table, inbox_tx, Duration::from_millis(200));
        let r = tokio::time::timeout(Duration::from_secs(30), session)
            .await
            .expect("the session ends by itself")
            .unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert_eq!(table.stats().timed_out, 1);
        assert_eq!(table.stats().open, 0);
    }

    #[tokio::test]
    async fn a_stream_that_outruns_its_worker_stops_reading_instead_of_filling_the_inbox() {
        let table = StreamTable::new();
        let (inbox_tx, mut inbox) = mpsc::channel(INBOX_QUEUE);
        let (peer, session) = serve(&table, inbox_tx, IDLE_TIMEOUT);
        let (_prd, mut pwr) = tokio::io::split(peer);
        // Frames in many separate writes (many chunks), never drained: the
        // peer's writes must eventually block.
        let mut frame = Vec::new();
        encode_frame(&mut frame, OP_BINARY, &[5; 1400], Some([9, 9, 9, 9]));
        let mut written = 0usize;
        loop {
            match tokio::time::timeout(Duration::from_millis(500), pwr.write_all(&frame)).await {
                Ok(r) => r.unwrap(),
                Err(_) => break,
            }
            written += 1;
            // Let the session read between writes so that reads stay small.
            tokio::task::yield_now().await;
            assert!(written < 100_000, "the stream never pushed back");
        }
        let s = table.stats();
        assert_eq!(s.queue_drops, 0, "nothing dropped: the stream waited");
        assert!(
            inbox.len() <= CHUNKS_IN_FLIGHT,
            "{} chunks queued",
            inbox.len()
        );
        // The worker takes the chunks; the stream reads again.
        let mut received = 0;
        while received < written {
            let c = tokio::time::timeout(Duration::from_secs(30), inbox.recv())
                .await
                .expect("the stream goes on once the worker reads")
                .unwrap();
            received += c.datagrams().count();
        }
        assert_eq!(received, written);
        session.abort();
    }
}
