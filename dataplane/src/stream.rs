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

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;

/// The largest tunnel datagram a stream carries.
pub const MAX_DATAGRAM: usize = 65535;
/// Chunks (each one send of the worker: a datagram or a GSO train) queued
/// per stream before datagrams are dropped.
pub const STREAM_QUEUE: usize = 256;
/// Chunks queued from all streams towards one worker.
pub const INBOX_QUEUE: usize = 1024;
/// Bytes a stream reads at once.
const READ_CHUNK: usize = 64 * 1024;

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
}

/// A frame the reader acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A tunnel datagram at this range of the buffer.
    Binary(std::ops::Range<usize>),
    /// A ping to answer with a pong carrying this range.
    Ping(std::ops::Range<usize>),
    /// A pong (ignored).
    Pong,
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
            OP_PONG => Frame::Pong,
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
}

impl Chunk {
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
        }
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
        if self.inner.count.load(Ordering::Relaxed) == 0 {
            return Routed::Udp;
        }
        let Ok(routes) = self.inner.routes.read() else {
            return Routed::Udp;
        };
        let Some(route) = routes.get(&dst) else {
            return Routed::Udp;
        };
        if route.probe_udp.swap(false, Ordering::Relaxed) {
            return Routed::Udp;
        }
        let seg = segment.unwrap_or(contents.len()).max(1);
        let n = contents.len().div_ceil(seg).max(1) as u64;
        let mut out = Vec::with_capacity(contents.len() + 14 * n as usize);
        let empty: &[u8] = &[];
        let datagrams = contents.chunks(seg);
        for d in datagrams.chain(contents.is_empty().then_some(empty)) {
            let mask = route.mask.then(rand::random::<[u8; 4]>);
            encode_frame(&mut out, OP_BINARY, d, mask);
        }
        let c = &self.inner.counters;
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
/// The stream's IO error or malformed frame; `Ok` when the peer closed it.
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
            tx: tx.clone(),
            mask: opts.client,
            probe_udp: Arc::new(AtomicBool::new(false)),
            via_proxy: opts.via_proxy,
        },
    );
    table.inner.counters.opened.fetch_add(1, Ordering::Relaxed);
    let _guard = RouteGuard {
        table,
        endpoint: opts.endpoint,
        id,
    };
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = async {
        while let Some(frames) = rx.recv().await {
            wr.write_all(&frames).await?;
            // Whatever else is queued goes in the same TLS records.
            while let Ok(more) = rx.try_recv() {
                wr.write_all(&more).await?;
            }
            wr.flush().await?;
        }
        io::Result::Ok(())
    };
    let reader = async {
        let mut de = Deframer::new(!opts.client);
        de.buffer().extend_from_slice(early);
        let counters = &table.inner.counters;
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
                        let mut pong = Vec::new();
                        let mask = opts.client.then(rand::random::<[u8; 4]>);
                        encode_frame(&mut pong, OP_PONG, &de.bytes()[r], mask);
                        let _ = tx.try_send(pong);
                    }
                    Frame::Pong => {}
                    Frame::Close => return Ok(()),
                }
            }
            if datagrams > 0 {
                let c = Chunk {
                    from: opts.endpoint,
                    bytes: chunk,
                };
                match inbox.try_send(c) {
                    Ok(()) => counters
                        .datagrams_received
                        .fetch_add(datagrams, Ordering::Relaxed),
                    Err(_) => counters.queue_drops.fetch_add(datagrams, Ordering::Relaxed),
                };
            }
            let buf = de.buffer();
            buf.reserve(READ_CHUNK);
            if rd.read_buf(buf).await? == 0 {
                return Ok(());
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
                Frame::Pong => (OP_PONG, vec![]),
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
        let c = Chunk {
            from: "192.0.2.1:443".parse().unwrap(),
            bytes: vec![0, 2, 7, 8, 0, 0, 0, 5, 1],
        };
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
        let opts = StreamOptions {
            endpoint: ep,
            client: true,
            via_proxy: false,
        };
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
}
