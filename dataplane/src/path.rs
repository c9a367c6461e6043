//! The seam between the data-plane IO and a program's packet logic.

use std::net::SocketAddr;
use std::time::Instant;

use crate::counters::IoCounters;

/// A program's packet logic, as the pump drives it.
pub trait PacketPath {
    /// Bytes an output buffer needs for an input of `len` bytes (the
    /// encapsulation overhead, or the room decryption wants).
    fn room(&self, len: usize) -> usize;

    /// Encapsulates one packet read from the TUN device (which the logic may
    /// rewrite in place) into `out` (`room(packet.len())` bytes). Returns
    /// the datagram's destination and length (written at the start of
    /// `out`), or `None` when nothing is to be sent now.
    fn encapsulate(
        &mut self,
        packet: &mut [u8],
        out: &mut [u8],
        now: Instant,
        io: &mut IoCounters,
    ) -> Option<(SocketAddr, usize)>;

    /// Decapsulates one datagram from `from` into `out`
    /// (`room(datagram.len())` bytes). Returns the length of the packet for
    /// the TUN device (written at the start of `out`), or `None`.
    fn decapsulate(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
        now: Instant,
        io: &mut IoCounters,
    ) -> Option<usize>;

    /// A packet the logic generated for the TUN device (e.g. an ICMP error).
    fn poll_tun_output(&mut self) -> Option<Vec<u8>> {
        None
    }

    /// A datagram the logic generated (handshakes, keepalives, cookie replies).
    fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)>;

    /// Hands a buffer from [`Self::poll_tun_output`] or
    /// [`Self::poll_transmit`] back for reuse.
    fn recycle(&mut self, buf: Vec<u8>);

    /// Called after each batch, before the generated datagrams are sent
    /// (e.g. to take the logic's events).
    fn after_batch(&mut self) {}
}
