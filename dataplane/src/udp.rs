//! The tunnel's UDP socket: batched receive (`recvmmsg` with UDP GRO) and
//! send (`sendmsg` with UDP GSO) through quinn-udp.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;

use anyhow::Context as _;
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::counters::IoCounters;
use crate::path::Via;
use crate::stream::{Routed, StreamTable};

/// Datagram buffers per `recvmmsg`; each takes a GRO train of up to 64 KiB.
pub const UDP_BATCH: usize = if quinn_udp::BATCH_SIZE < 16 {
    quinn_udp::BATCH_SIZE
} else {
    16
};
/// Bytes per receive buffer: a whole GRO train.
pub const UDP_BUF: usize = 65536;
/// A UDP GSO train stays under the 64 KiB UDP limit.
pub const MAX_GSO_BYTES: usize = 65000;

/// Socket buffer size asked for both ways: large buffers absorb bursts
/// between wake-ups.
const SOCKET_BUFFER: usize = 8 << 20;

/// A UDP socket registered with the runtime, with its offload state.
#[derive(Debug)]
pub struct Udp {
    sock: UdpSocket,
    state: UdpSocketState,
    port: u16,
    /// Virtual endpoints whose datagrams go to a stream instead (the TLS
    /// fallback).
    streams: Option<StreamTable>,
}

impl Udp {
    /// Registers a bound socket (inside a runtime).
    ///
    /// # Errors
    /// When the socket cannot be made non-blocking, its options set or it
    /// be registered.
    pub fn new(socket: std::net::UdpSocket) -> anyhow::Result<Self> {
        socket
            .set_nonblocking(true)
            .context("UDP socket non-blocking")?;
        let state = UdpSocketState::new((&socket).into()).context("UDP socket options")?;
        let _ = state.set_recv_buffer_size((&socket).into(), SOCKET_BUFFER);
        let _ = state.set_send_buffer_size((&socket).into(), SOCKET_BUFFER);
        let port = socket.local_addr().context("UDP socket")?.port();
        let sock = UdpSocket::from_std(socket).context("registering the UDP socket")?;
        Ok(Self {
            sock,
            state,
            port,
            streams: None,
        })
    }

    /// Sends to the virtual endpoints in `table` go to their streams.
    pub fn set_streams(&mut self, table: StreamTable) {
        self.streams = Some(table);
    }

    /// The streams' table, when set.
    pub fn streams(&self) -> Option<&StreamTable> {
        self.streams.as_ref()
    }

    /// The local port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Datagrams one `sendmsg` may carry (1 without UDP GSO).
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments().max(1)
    }

    /// Datagrams one receive may coalesce (1 without UDP GRO).
    pub fn gro_segments(&self) -> usize {
        self.state.gro_segments()
    }

    /// Waits until the socket may have data.
    ///
    /// # Errors
    /// When the runtime reports the socket broken.
    pub async fn readable(&self) -> io::Result<()> {
        self.sock.readable().await
    }

    /// [`Self::readable`] as a poll (to wait on several sockets at once).
    ///
    /// # Errors
    /// When the runtime reports the socket broken.
    pub fn poll_readable(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.sock.poll_recv_ready(cx)
    }

    /// Sends `contents` to `dst` in one `sendmsg`: `count` datagrams of
    /// `segment` bytes each (the last may be shorter) with UDP GSO, or one
    /// datagram when `segment` is `None`. Waits while the socket buffer is
    /// full; other errors are counted and logged at debug.
    pub async fn send(
        &self,
        dst: SocketAddr,
        contents: &[u8],
        segment: Option<usize>,
        count: usize,
        io: &mut IoCounters,
    ) {
        if let Some(t) = &self.streams
            && t.send(dst, contents, segment) == Routed::Stream
        {
            return;
        }
        let transmit = Transmit {
            destination: dst,
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: None,
        };
        io.udp_sends += 1;
        io.udp_datagrams_sent += count as u64;
        loop {
            match self.sock.try_io(Interest::WRITABLE, || {
                self.state.send((&self.sock).into(), &transmit)
            }) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.sock.writable().await.is_err() {
                        io.io_errors += 1;
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, %dst, "UDP send");
                    io.io_errors += 1;
                    return;
                }
            }
        }
    }

    /// Sends one datagram.
    pub async fn send_one(&self, dst: SocketAddr, datagram: &[u8], io: &mut IoCounters) {
        self.send(dst, datagram, None, 1, io).await;
    }
}

/// The socket `via` names among a pump's main socket and those added
/// (`side`, [`Via`] 1, 2, …); `None` for a number never added.
pub fn pick<'a>((main, side): (&'a Udp, &'a [Udp]), via: Via) -> Option<&'a Udp> {
    match usize::from(via.0) {
        0 => Some(main),
        n => side.get(n - 1),
    }
}

/// Receive buffers for one `recvmmsg` and what it returned.
#[derive(Debug)]
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    metas: [RecvMeta; UDP_BATCH],
    filled: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBatch {
    /// Allocates the buffers (once per worker).
    pub fn new() -> Self {
        Self {
            bufs: (0..UDP_BATCH).map(|_| vec![0u8; UDP_BUF]).collect(),
            metas: [RecvMeta::default(); UDP_BATCH],
            filled: 0,
        }
    }

    /// One `recvmmsg` into the buffers. Returns `false` when nothing was
    /// ready or the call failed (counted and logged at debug).
    pub fn fill(&mut self, udp: &Udp, io: &mut IoCounters) -> bool {
        self.filled = 0;
        let mut it = self.bufs.iter_mut();
        let mut iovs: [IoSliceMut<'_>; UDP_BATCH] = std::array::from_fn(|_| {
            IoSliceMut::new(&mut it.next().expect("UDP_BATCH buffers allocated")[..])
        });
        let metas = &mut self.metas;
        match udp.sock.try_io(Interest::READABLE, || {
            udp.state.recv((&udp.sock).into(), &mut iovs, metas)
        }) {
            Ok(0) => false,
            Ok(n) => {
                self.filled = n;
                io.udp_recvs += 1;
                io.udp_datagrams_received += self.metas[..n]
                    .iter()
                    .map(|m| datagram_count(m.len, m.stride))
                    .sum::<u64>();
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => {
                tracing::debug!(error = %e, "UDP receive");
                io.io_errors += 1;
                false
            }
        }
    }

    /// The datagrams of the last [`Self::fill`], GRO trains split, with
    /// their senders.
    pub fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        datagrams(&self.metas[..self.filled], &self.bufs)
    }
}

/// The datagrams in received buffers: each buffer holds `meta.len` bytes of
/// datagrams at `meta.stride` bytes each (GRO), the last possibly shorter. A
/// zero-length datagram is still one datagram.
fn datagrams<'a>(
    metas: &'a [RecvMeta],
    bufs: &'a [Vec<u8>],
) -> impl Iterator<Item = (SocketAddr, &'a [u8])> {
    metas.iter().zip(bufs).flat_map(|(meta, buf)| {
        let bytes = &buf[..meta.len];
        let stride = meta.stride.max(1);
        // `chunks` yields nothing for an empty slice.
        let empty = bytes.is_empty().then_some(bytes);
        bytes
            .chunks(stride)
            .chain(empty)
            .map(move |d| (meta.addr, d))
    })
}

/// How many datagrams [`datagrams`] yields for one buffer.
fn datagram_count(len: usize, stride: usize) -> u64 {
    if len == 0 {
        1
    } else {
        len.div_ceil(stride.max(1)) as u64
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn meta(addr: &str, len: usize, stride: usize) -> RecvMeta {
        RecvMeta {
            addr: addr.parse().unwrap(),
            len,
            stride,
            ecn: None,
            dst_ip: None,
        }
    }

    #[test]
    fn gro_buffers_split_at_the_stride_and_zero_length_datagrams_count() {
        let a = "192.0.2.1:51820";
        let b = "192.0.2.2:51820";
        let bufs: Vec<Vec<u8>> = vec![(0u8..10).collect(), vec![7; 8], vec![9; 4], vec![1; 3]];
        let metas = [
            // A GRO train of 4+4+2 bytes.
            meta(a, 10, 4),
            // An empty datagram (the buffer's bytes are stale).
            meta(b, 0, 0),
            // One datagram, stride equal to its length.
            meta(b, 4, 4),
            // A stride of 0 is read as 1 (never loops forever).
            meta(a, 3, 0),
        ];
        let got: Vec<(SocketAddr, Vec<u8>)> = datagrams(&metas, &bufs)
            .map(|(from, d)| (from, d.to_vec()))
            .collect();
        let (a, b): (SocketAddr, SocketAddr) = (a.parse().unwrap(), b.parse().unwrap());
        assert_eq!(
            got,
            vec![
                (a, vec![0, 1, 2, 3]),
                (a, vec![4, 5, 6, 7]),
                (a, vec![8, 9]),
                (b, vec![]),
                (b, vec![9; 4]),
                (a, vec![1]),
                (a, vec![1]),
                (a, vec![1]),
            ]
        );
        let counted: u64 = metas.iter().map(|m| datagram_count(m.len, m.stride)).sum();
        assert_eq!(counted, got.len() as u64, "the counter matches the split");
    }

    #[test]
    fn datagram_count_rounds_up() {
        assert_eq!(datagram_count(0, 1200), 1);
        assert_eq!(datagram_count(1200, 1200), 1);
        assert_eq!(datagram_count(1201, 1200), 2);
        assert_eq!(datagram_count(2400, 1200), 2);
        assert_eq!(datagram_count(5, 0), 5);
    }
}
