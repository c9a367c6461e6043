//! The seam between the data-plane IO and a program's packet logic.

use std::net::SocketAddr;
use std::time::Instant;

use crate::counters::IoCounters;

/// What one packet step has besides its buffers.
#[derive(Debug)]
pub struct Step<'a> {
    /// The time of the batch (the clock is read once per wake-up).
    pub now: Instant,
    /// The worker's IO counters (the logic counts its hand-offs there).
    pub io: &'a mut IoCounters,
}

/// One of a pump's UDP sockets: [`Via::MAIN`], the one it was made with,
/// or one added with [`crate::pump::Pump::add_socket`] (numbered from 1 in
/// the order they were added). A program with several ports (the gateway:
/// WireGuard, IKE on 500, NAT-T on 4500) tells by it where a datagram
/// arrived and picks where one leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Via(pub u8);

impl Via {
    /// The pump's first socket.
    pub const MAIN: Via = Via(0);
}

/// A datagram received from the network.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'d> {
    /// Its sender.
    pub from: SocketAddr,
    /// Its bytes.
    pub bytes: &'d [u8],
    /// The socket it arrived on ([`Via::MAIN`] for what came another way,
    /// e.g. a stream or another worker's hand-over).
    pub via: Via,
}

/// An encapsulated datagram's destination, the socket it leaves from and
/// its length (written at the start of the output buffer), or `None` when
/// nothing is to be sent now.
pub type Sent = Option<(SocketAddr, Via, usize)>;

/// A program's packet logic, as the pump drives it.
pub trait PacketPath {
    /// Bytes an output buffer needs for an input of `len` bytes (the
    /// encapsulation overhead, or the room decryption wants).
    fn room(&self, len: usize) -> usize;

    /// Encapsulates one packet read from the TUN device (which the logic may
    /// rewrite in place) into `out` (`room(packet.len())` bytes).
    fn encapsulate(&mut self, packet: &mut [u8], out: &mut [u8], step: &mut Step) -> Sent;

    /// Decapsulates one datagram into `out` (`room(dgram.bytes.len())`
    /// bytes). Returns the length of the packet for the TUN device (written
    /// at the start of `out`), or `None`.
    fn decapsulate(&mut self, dgram: Datagram, out: &mut [u8], step: &mut Step) -> Option<usize>;

    /// A packet the logic generated for the TUN device (e.g. an ICMP error).
    fn poll_tun_output(&mut self) -> Option<Vec<u8>> {
        None
    }

    /// A datagram the logic generated (handshakes, keepalives, cookie
    /// replies), with the socket it leaves from.
    fn poll_transmit(&mut self) -> Option<(SocketAddr, Via, Vec<u8>)>;

    /// Hands a buffer from [`Self::poll_tun_output`] or
    /// [`Self::poll_transmit`] back for reuse.
    fn recycle(&mut self, buf: Vec<u8>);

    /// Called after each batch, before the generated datagrams are sent
    /// (e.g. to take the logic's events).
    fn after_batch(&mut self) {}
}
