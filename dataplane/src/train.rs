//! GSO trains: runs of datagrams to one destination, written back to back
//! into one send buffer, that leave as one `sendmsg` with UDP GSO.
//!
//! A train holds datagrams of one size (the first one's), except that the
//! last may be shorter (the kernel splits a GSO send at the segment size);
//! it is limited by the datagrams the socket may send at once and by the
//! 64 KiB UDP limit. The last train stays open across TUN reads while the
//! device has more ready: one super-packet is often only a few segments, and
//! one train per read would mean one `sendmsg` (and one skb through both
//! kernels) for each. A train also leaves from one socket ([`Via`]): a
//! datagram for another socket starts a new one.

use std::net::SocketAddr;
use std::time::Instant;

use crate::counters::IoCounters;
use crate::path::{PacketPath, Step, Via};
use crate::udp::{MAX_GSO_BYTES, Udp, pick};

/// A run of datagrams to one destination in the send buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Train {
    /// Where the datagrams go.
    pub dst: SocketAddr,
    /// The socket they leave from.
    pub via: Via,
    /// The size of every datagram but the last.
    pub segment: usize,
    /// Where the train starts in the send buffer.
    pub start: usize,
    /// Where it ends.
    pub end: usize,
    /// Datagrams in it.
    pub count: usize,
    /// A shorter datagram ended the train (only the last may be shorter).
    pub closed: bool,
}

impl Train {
    fn new(dst: SocketAddr, via: Via, at: usize, len: usize) -> Self {
        Self {
            dst,
            via,
            segment: len,
            start: at,
            end: at + len,
            count: 1,
            closed: false,
        }
    }

    /// Whether a datagram of `len` bytes to `dst` from `via`, written at
    /// `at`, may join.
    fn takes(&self, dst: SocketAddr, via: Via, at: usize, len: usize, max_segments: usize) -> bool {
        self.dst == dst
            && self.via == via
            && !self.closed
            && len <= self.segment
            && self.count < max_segments
            && self.end == at
            && self.end + len - self.start <= MAX_GSO_BYTES
    }

    /// The GSO segment size to send with (none for a single datagram).
    pub fn segment_size(&self) -> Option<usize> {
        (self.count > 1).then_some(self.segment)
    }
}

/// The train rules over one send buffer, without IO: where the next
/// datagram goes and which train is complete and must be sent.
#[derive(Debug)]
pub struct Trains {
    open: Option<Train>,
    pos: usize,
    capacity: usize,
    max_segments: usize,
}

impl Trains {
    /// Trains in a send buffer of `capacity` bytes, at most `max_segments`
    /// datagrams each.
    pub fn new(capacity: usize, max_segments: usize) -> Self {
        Self {
            open: None,
            pos: 0,
            capacity,
            max_segments: max_segments.max(1),
        }
    }

    /// Where a datagram of up to `need` bytes is to be written. When the
    /// buffer has no room left, writing starts over at 0 and the open train
    /// is returned: send it before writing.
    pub fn reserve(&mut self, need: usize) -> (usize, Option<Train>) {
        if self.pos + need > self.capacity {
            self.pos = 0;
            return (0, self.open.take());
        }
        (self.pos, None)
    }

    /// A datagram of `len` bytes to `dst` from `via` was written where
    /// [`Self::reserve`] said. Returns the train it ended, to be sent now.
    pub fn push(&mut self, dst: SocketAddr, via: Via, len: usize) -> Option<Train> {
        let at = self.pos;
        self.pos += len;
        match &mut self.open {
            Some(t) if t.takes(dst, via, at, len, self.max_segments) => {
                t.end += len;
                t.count += 1;
                t.closed = len < t.segment;
                None
            }
            open => open.replace(Train::new(dst, via, at, len)),
        }
    }

    /// Takes the open train (nothing more is ready); writing starts over at 0.
    pub fn take_open(&mut self) -> Option<Train> {
        self.pos = 0;
        self.open.take()
    }
}

/// A send buffer with its trains: packets are encapsulated straight into it
/// and leave in GSO trains.
#[derive(Debug)]
pub struct TrainSender {
    out: Vec<u8>,
    trains: Trains,
}

impl TrainSender {
    /// A send buffer of `capacity` bytes for `udp` (and sockets like it).
    pub fn new(capacity: usize, udp: &Udp) -> Self {
        Self {
            out: vec![0u8; capacity],
            trains: Trains::new(capacity, udp.max_gso_segments()),
        }
    }

    /// Encapsulates `packets` through `path` straight into the send buffer
    /// and sends complete trains from `udp` or the socket of `side` their
    /// [`Via`] names. The last train stays open for the next call; send it
    /// with [`Self::flush`] when nothing more is ready.
    pub async fn send<'p, P: PacketPath>(
        &mut self,
        (udp, side): (&Udp, &[Udp]),
        path: &mut P,
        packets: impl Iterator<Item = &'p mut [u8]>,
        now: Instant,
        io: &mut IoCounters,
    ) {
        let mut step = Step { now, io };
        for packet in packets {
            let need = path.room(packet.len());
            let (at, full) = self.trains.reserve(need);
            if let Some(t) = full {
                send_train((udp, side), &self.out, &t, step.io).await;
            }
            let out = &mut self.out[at..at + need];
            let Some((dst, via, len)) = path.encapsulate(packet, out, &mut step) else {
                continue;
            };
            if let Some(t) = self.trains.push(dst, via, len) {
                send_train((udp, side), &self.out, &t, step.io).await;
            }
        }
    }

    /// Sends the open train, if any.
    pub async fn flush(&mut self, sockets: (&Udp, &[Udp]), io: &mut IoCounters) {
        if let Some(t) = self.trains.take_open() {
            send_train(sockets, &self.out, &t, io).await;
        }
    }
}

async fn send_train(sockets: (&Udp, &[Udp]), out: &[u8], t: &Train, io: &mut IoCounters) {
    let Some(udp) = pick(sockets, t.via) else {
        // A socket the program never added: its bug, counted, not a panic.
        io.io_errors += 1;
        return;
    };
    udp.send(t.dst, &out[t.start..t.end], t.segment_size(), t.count, io)
        .await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, last], 51820))
    }

    /// Pushes datagrams (dst, len) and collects the trains sent, as the
    /// sender does, then flushes.
    fn run(trains: &mut Trains, datagrams: &[(u8, usize)]) -> Vec<Train> {
        let mut sent = Vec::new();
        for &(dst, len) in datagrams {
            let (_, full) = trains.reserve(len);
            sent.extend(full);
            sent.extend(trains.push(addr(dst), Via::MAIN, len));
        }
        sent.extend(trains.take_open());
        sent
    }

    #[test]
    fn equal_datagrams_to_one_destination_make_one_train() {
        let mut t = Trains::new(1 << 20, 64);
        let sent = run(&mut t, &[(1, 1000), (1, 1000), (1, 1000)]);
        assert_eq!(
            sent,
            vec![Train {
                dst: addr(1),
                via: Via::MAIN,
                segment: 1000,
                start: 0,
                end: 3000,
                count: 3,
                closed: false,
            }]
        );
        assert_eq!(sent[0].segment_size(), Some(1000));
    }

    #[test]
    fn a_shorter_datagram_ends_the_train() {
        let mut t = Trains::new(1 << 20, 64);
        let sent = run(&mut t, &[(1, 1000), (1, 400), (1, 400)]);
        assert_eq!(sent.len(), 2);
        assert_eq!(
            (sent[0].count, sent[0].end, sent[0].closed),
            (2, 1400, true)
        );
        assert_eq!((sent[1].start, sent[1].count), (1400, 1));
        assert_eq!(
            sent[1].segment_size(),
            None,
            "a single datagram goes without GSO"
        );
    }

    #[test]
    fn a_longer_datagram_or_another_destination_starts_a_new_train() {
        let mut t = Trains::new(1 << 20, 64);
        let sent = run(&mut t, &[(1, 400), (1, 1000), (2, 1000), (2, 1000)]);
        let shape: Vec<(SocketAddr, usize, usize)> =
            sent.iter().map(|t| (t.dst, t.start, t.count)).collect();
        assert_eq!(
            shape,
            vec![(addr(1), 0, 1), (addr(1), 400, 1), (addr(2), 1400, 2)]
        );
    }

    #[test]
    fn another_socket_starts_a_new_train() {
        let mut t = Trains::new(1 << 20, 64);
        let mut sent = Vec::new();
        for via in [Via::MAIN, Via::MAIN, Via(2), Via(2), Via::MAIN] {
            let (_, full) = t.reserve(1000);
            sent.extend(full);
            sent.extend(t.push(addr(1), via, 1000));
        }
        sent.extend(t.take_open());
        let shape: Vec<(Via, usize)> = sent.iter().map(|t| (t.via, t.count)).collect();
        assert_eq!(shape, vec![(Via::MAIN, 2), (Via(2), 2), (Via::MAIN, 1)]);
    }

    #[test]
    fn trains_respect_the_segment_and_byte_limits() {
        let mut t = Trains::new(1 << 20, 3);
        let sent = run(&mut t, &[(1, 100); 7]);
        let counts: Vec<usize> = sent.iter().map(|t| t.count).collect();
        assert_eq!(counts, vec![3, 3, 1]);

        let mut t = Trains::new(1 << 20, 1000);
        let sent = run(&mut t, &[(1, 1500); 50]);
        assert!(sent.iter().all(|t| t.end - t.start <= MAX_GSO_BYTES));
        assert_eq!(sent[0].count, MAX_GSO_BYTES / 1500);
        assert_eq!(sent.iter().map(|t| t.count).sum::<usize>(), 50);
    }

    #[test]
    fn a_full_buffer_sends_the_open_train_and_starts_over() {
        let mut t = Trains::new(2500, 64);
        assert_eq!(t.reserve(1000), (0, None));
        assert_eq!(t.push(addr(1), Via::MAIN, 1000), None);
        assert_eq!(t.reserve(1000), (1000, None));
        assert_eq!(t.push(addr(1), Via::MAIN, 1000), None);
        let (at, full) = t.reserve(1000);
        assert_eq!(at, 0);
        assert_eq!(full.map(|t| (t.start, t.end, t.count)), Some((0, 2000, 2)));
        assert_eq!(t.push(addr(1), Via::MAIN, 1000), None);
        assert_eq!(t.take_open().map(|t| (t.start, t.count)), Some((0, 1)));
        assert_eq!(t.take_open(), None);
        assert_eq!(t.reserve(10), (0, None), "a flush starts the buffer over");
    }

    #[test]
    fn the_open_train_continues_across_calls_until_taken() {
        let mut t = Trains::new(1 << 20, 64);
        for _ in 0..2 {
            let (_, full) = t.reserve(1200);
            assert_eq!(full, None);
            assert_eq!(t.push(addr(1), Via::MAIN, 1200), None);
        }
        // A dropped packet (reserved, nothing pushed) leaves the train open.
        assert_eq!(t.reserve(1200), (2400, None));
        assert_eq!(t.push(addr(1), Via::MAIN, 1200), None);
        assert_eq!(t.take_open().map(|t| t.count), Some(3));
    }
}
