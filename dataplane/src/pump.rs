//! The packet pump between one TUN queue and a program's UDP sockets.
//!
//! IO is batched both ways and nothing is allocated per packet:
//! - TUN → UDP: a read returns the segments of a GSO super-packet; each is
//!   encapsulated straight into one contiguous send buffer, and runs of
//!   equal-size datagrams to one destination leave as one `sendmsg` with
//!   UDP GSO ([`crate::train`]).
//! - UDP → TUN: `recvmmsg` with UDP GRO returns many datagrams per call; each
//!   is decapsulated straight into a TUN buffer after the virtio header room,
//!   and the batch is written with GRO.
//!
//! The program's packet logic plugs in as a [`PacketPath`] (a generic
//! parameter: no dynamic call per packet).
//!
//! **Several ports, one path.** A pump has a main socket and may have more
//! ([`Pump::add_socket`]: the gateway's IKE and NAT-T ports next to its
//! WireGuard port). Every socket is read the same batched way into the
//! same path; [`Datagram::via`] says which one a datagram came on, and the
//! path names the socket of each datagram it sends ([`Via`]), so a program
//! with several ports still has exactly one packet path.

use std::io;
use std::time::Instant;

use tun_rs::AsyncDevice;

use crate::counters::IoCounters;
use crate::path::{Datagram, PacketPath, Step, Via};
use crate::stream::{Chunk, Inbox, StreamTable};
use crate::train::TrainSender;
use crate::tun::{DeviceGone, SEGMENT_BUF, TUN_BATCH, TunReader, TunWriter, is_device_gone};
use crate::udp::{RecvBatch, Udp, pick};

/// Reads (or `recvmmsg` calls) per source per wake-up before the event loop
/// turns to its other sources.
pub const BUDGET: usize = 32;

/// Sends every datagram `path` generated, one `sendmsg` each, from the
/// socket it names (`sockets`: the main one and those added, [`pick`]).
pub async fn send_transmits<P: PacketPath>(
    path: &mut P,
    sockets: (&Udp, &[Udp]),
    io: &mut IoCounters,
) {
    while let Some((dst, via, payload)) = path.poll_transmit() {
        match pick(sockets, via) {
            Some(udp) => udp.send_one(dst, &payload, io).await,
            // A socket the program never added: its bug, counted.
            None => io.io_errors += 1,
        }
        path.recycle(payload);
    }
}

/// What woke the pump.
#[derive(Debug)]
pub enum Ready {
    /// This UDP socket may have data (or reported an error).
    Udp(Via, io::Result<()>),
    /// A TUN read returned this many segments (or an error).
    Tun(io::Result<usize>),
    /// Datagrams read from a stream (the TLS fallback).
    Stream(Chunk),
}

/// The next chunk of the inbox, or never without one.
pub async fn next_chunk(inbox: &mut Option<Inbox>) -> Option<Chunk> {
    match inbox {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Polls the sockets (`main`, then `side` as [`Via`] 1, 2, …) for
/// readiness, starting at number `first` and going round: the caller moves
/// `first` past the socket it served, so that a port under a flood (IKE
/// on 500, say) cannot starve the others. Only polls readiness (cancel-safe).
fn poll_sockets(
    (main, side): (&Udp, &[Udp]),
    first: usize,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<(Via, io::Result<()>)> {
    let n = side.len() + 1;
    for k in 0..n {
        let i = (first + k) % n;
        let udp = if i == 0 { main } else { &side[i - 1] };
        if let std::task::Poll::Ready(r) = udp.poll_readable(cx) {
            // At most 255 sockets are ever added (`add_socket`).
            let via = Via(u8::try_from(i).unwrap_or(u8::MAX));
            return std::task::Poll::Ready((via, r));
        }
    }
    std::task::Poll::Pending
}

/// One TUN queue and a program's UDP sockets with their buffers and counters.
pub struct Pump {
    /// The main socket ([`Via::MAIN`]).
    pub udp: Udp,
    /// The sockets added ([`Via`] 1, 2, …).
    side: Vec<Udp>,
    /// The socket [`Self::ready`] polls first (round robin).
    turn: usize,
    tun: AsyncDevice,
    reader: TunReader,
    writer: TunWriter,
    trains: TrainSender,
    recv: RecvBatch,
    inbox: Option<Inbox>,
    /// Counters of this pump.
    pub io: IoCounters,
}

impl std::fmt::Debug for Pump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pump")
            .field("udp", &self.udp)
            .field("side", &self.side)
            .field("io", &self.io)
            .finish_non_exhaustive()
    }
}

impl Pump {
    /// A pump between `tun` and `udp`; `max_overhead` is the most bytes
    /// encapsulation adds to a packet (sizes the send buffer).
    pub fn new(udp: Udp, tun: AsyncDevice, max_overhead: usize) -> Self {
        // Room for a whole read of full segments, plus a whole packet when
        // the device has no offload.
        let capacity = TUN_BATCH * (SEGMENT_BUF + max_overhead) + 65535 + 64;
        Self {
            trains: TrainSender::new(capacity, &udp),
            udp,
            side: Vec::new(),
            turn: 0,
            tun,
            reader: TunReader::new(),
            writer: TunWriter::default(),
            recv: RecvBatch::new(),
            inbox: None,
            io: IoCounters::default(),
        }
    }

    /// Adds a socket to read from and send from, on the same path as the
    /// main one; returns its [`Via`]. Receives and sends use the same
    /// batching and buffers.
    ///
    /// # Errors
    /// When 255 sockets have been added already.
    pub fn add_socket(&mut self, mut udp: Udp) -> anyhow::Result<Via> {
        let n = u8::try_from(self.side.len() + 1)
            .map_err(|_| anyhow::anyhow!("a pump takes at most 255 more sockets"))?;
        if let Some(t) = self.udp.streams() {
            udp.set_streams(t.clone());
        }
        self.side.push(udp);
        Ok(Via(n))
    }

    /// The socket `via` names, if any.
    pub fn socket(&self, via: Via) -> Option<&Udp> {
        pick((&self.udp, &self.side), via)
    }

    /// Carries datagrams of the streams in `table` too: sends to their
    /// virtual endpoints go to the streams (from whichever socket), and what
    /// they read arrives through `inbox`.
    pub fn set_streams(&mut self, table: StreamTable, inbox: Inbox) {
        for udp in &mut self.side {
            udp.set_streams(table.clone());
        }
        self.udp.set_streams(table);
        self.inbox = Some(inbox);
    }

    /// The TUN queue.
    pub fn tun(&self) -> &AsyncDevice {
        &self.tun
    }

    /// Waits until a socket may have data or a TUN read returns, the
    /// sockets first (taking turns among them). Cancel-safe as a `select!`
    /// arm: a TUN read that has not returned has taken nothing from the
    /// device.
    pub async fn ready(&mut self) -> Ready {
        let sockets = (&self.udp, &self.side[..]);
        let first = self.turn;
        let ready = tokio::select! {
            biased;
            (via, r) = std::future::poll_fn(|cx| poll_sockets(sockets, first, cx)) => {
                Ready::Udp(via, r)
            }
            Some(c) = next_chunk(&mut self.inbox) => Ready::Stream(c),
            r = self.reader.recv(&self.tun) => Ready::Tun(r),
        };
        if let Ready::Udp(via, _) = &ready {
            self.turn = (usize::from(via.0) + 1) % (self.side.len() + 1);
        }
        ready
    }

    /// Handles what [`Self::ready`] returned.
    ///
    /// # Errors
    /// [`DeviceGone`] when the TUN device no longer exists.
    pub async fn on_ready<P: PacketPath>(
        &mut self,
        path: &mut P,
        ready: Ready,
    ) -> Result<(), DeviceGone> {
        match ready {
            Ready::Udp(via, r) => {
                self.on_udp_ready(path, via, r).await;
                Ok(())
            }
            Ready::Tun(r) => self.on_tun_ready(path, r).await,
            Ready::Stream(c) => {
                self.on_stream_ready(path, c).await;
                Ok(())
            }
        }
    }

    /// Stream → TUN: the chunk and up to [`BUDGET`] more that are ready,
    /// decapsulated like received UDP datagrams.
    pub async fn on_stream_ready<P: PacketPath>(&mut self, path: &mut P, first: Chunk) {
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(chunk) = next.take() {
            let now = Instant::now();
            for d in chunk.datagrams() {
                let dgram = Datagram {
                    from: chunk.from,
                    bytes: d,
                    via: Via::MAIN,
                };
                decapsulate_one(path, &mut self.writer, dgram, now, &mut self.io);
            }
            taken += 1;
            if taken < BUDGET {
                next = self.inbox.as_mut().and_then(|rx| rx.try_recv().ok());
            }
        }
        self.flush_outputs(path).await;
    }

    /// UDP → TUN: up to [`BUDGET`] `recvmmsg` calls on the socket `via`,
    /// each batch decapsulated and written, then what the logic generated.
    pub async fn on_udp_ready<P: PacketPath>(
        &mut self,
        path: &mut P,
        via: Via,
        readable: io::Result<()>,
    ) {
        if let Err(e) = readable {
            tracing::warn!(error = %e, ?via, "UDP socket");
            self.io.io_errors += 1;
        }
        for _ in 0..BUDGET {
            let Some(udp) = pick((&self.udp, &self.side), via) else {
                return;
            };
            if !self.recv.fill(udp, &mut self.io) {
                break;
            }
            let now = Instant::now();
            for (from, bytes) in self.recv.datagrams() {
                let dgram = Datagram { from, bytes, via };
                decapsulate_one(path, &mut self.writer, dgram, now, &mut self.io);
            }
            self.flush_outputs(path).await;
        }
    }

    /// TUN → UDP: the read that returned `first`, then up to [`BUDGET`] more
    /// while the device has packets ready, encapsulated in GSO trains. The
    /// open train carries over from one read to the next and leaves when
    /// nothing more is ready.
    ///
    /// # Errors
    /// [`DeviceGone`] when the TUN device no longer exists.
    pub async fn on_tun_ready<P: PacketPath>(
        &mut self,
        path: &mut P,
        first: io::Result<usize>,
    ) -> Result<(), DeviceGone> {
        let mut result = first;
        for round in 0..BUDGET {
            let n = match result {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if is_device_gone(&e) => {
                    self.trains
                        .flush((&self.udp, &self.side), &mut self.io)
                        .await;
                    return Err(DeviceGone(e));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "TUN read");
                    self.io.io_errors += 1;
                    break;
                }
            };
            self.io.tun_reads += 1;
            self.io.tun_packets += n as u64;
            self.encapsulate(path, n).await;
            self.flush_outputs(path).await;
            if round + 1 < BUDGET {
                result = self.reader.try_recv(&self.tun);
            }
        }
        self.trains
            .flush((&self.udp, &self.side), &mut self.io)
            .await;
        Ok(())
    }

    async fn encapsulate<P: PacketPath>(&mut self, path: &mut P, n: usize) {
        let now = Instant::now();
        let packets = self.reader.segments(n);
        self.trains
            .send((&self.udp, &self.side), path, packets, now, &mut self.io)
            .await;
    }

    /// Decapsulates one datagram (e.g. one handed over by another worker,
    /// [`Via::MAIN`]) into the TUN batch; written by the next
    /// [`Self::flush_outputs`].
    pub fn decapsulate<P: PacketPath>(&mut self, path: &mut P, dgram: Datagram, now: Instant) {
        decapsulate_one(path, &mut self.writer, dgram, now, &mut self.io);
    }

    /// Encapsulates packets from elsewhere (e.g. handed over by another
    /// worker) and sends them in GSO trains, all of them now.
    pub async fn encapsulate_and_send<'p, P: PacketPath>(
        &mut self,
        path: &mut P,
        packets: impl Iterator<Item = &'p mut [u8]>,
        now: Instant,
    ) {
        let sockets = (&self.udp, &self.side[..]);
        self.trains
            .send(sockets, path, packets, now, &mut self.io)
            .await;
        self.trains.flush(sockets, &mut self.io).await;
    }

    /// Writes the TUN batch with the packets the logic generated for the
    /// device, then sends the datagrams it generated.
    pub async fn flush_outputs<P: PacketPath>(&mut self, path: &mut P) {
        self.write_tun(path).await;
        self.send_transmits(path).await;
    }

    /// Writes the TUN batch ([`Self::decapsulate`]) with the packets the
    /// logic generated for the device, in one batch.
    pub async fn write_tun<P: PacketPath>(&mut self, path: &mut P) {
        while let Some(p) = path.poll_tun_output() {
            self.writer.push_copy(&p);
            path.recycle(p);
        }
        self.writer.write(&self.tun, &mut self.io).await;
    }

    /// Lets the logic finish the batch ([`PacketPath::after_batch`]), then
    /// sends the datagrams it generated.
    pub async fn send_transmits<P: PacketPath>(&mut self, path: &mut P) {
        path.after_batch();
        send_transmits(path, (&self.udp, &self.side), &mut self.io).await;
    }
}

fn decapsulate_one<P: PacketPath>(
    path: &mut P,
    writer: &mut TunWriter,
    dgram: Datagram,
    now: Instant,
    io: &mut IoCounters,
) {
    let out = writer.next_buf(path.room(dgram.bytes.len()));
    if let Some(len) = path.decapsulate(dgram, out, &mut Step { now, io }) {
        writer.commit(len);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn bound() -> Udp {
        Udp::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap()
    }

    /// Polls once: the socket served first, or `None`.
    async fn poll_once(sockets: (&Udp, &[Udp]), first: usize) -> Option<Via> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match poll_sockets(sockets, first, cx) {
                std::task::Poll::Ready((via, _)) => Some(via),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }

    #[tokio::test]
    async fn sockets_take_turns_when_all_have_data() {
        let main = bound();
        let side = [bound(), bound()];
        assert_eq!(poll_once((&main, &side), 0).await, None, "nothing yet");
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for udp in std::iter::once(&main).chain(&side) {
            client.send_to(b"x", ("127.0.0.1", udp.port())).unwrap();
        }
        let all = (&main, &side[..]);
        // Readiness stays set until a read finds nothing.
        for udp in std::iter::once(&main).chain(&side) {
            udp.readable().await.unwrap();
        }
        // Whoever comes first in the turn is served, whatever its number.
        assert_eq!(poll_once(all, 0).await, Some(Via::MAIN));
        assert_eq!(poll_once(all, 1).await, Some(Via(1)));
        assert_eq!(poll_once(all, 2).await, Some(Via(2)));
        assert_eq!(poll_once(all, 3).await, Some(Via::MAIN), "round");
    }
}
