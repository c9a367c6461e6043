//! The TUN device with offload (tun-rs): reads split TCP/UDP GSO
//! super-packets into segments, writes coalesce TCP segments back into
//! super-packets (GRO), and every packet written keeps room for the
//! virtio-net header in front.

use std::io;

use anyhow::Context as _;
use tun_rs::{AsyncDevice, GROTable, SyncDevice};

use crate::counters::IoCounters;

/// Headroom before each packet written to the TUN device (virtio-net header).
pub const TUN_OFFSET: usize = tun_rs::VIRTIO_NET_HDR_LEN;
/// Segment buffers for one TUN read (a 64 KiB super-packet at MTU 1280 is ~50).
pub const TUN_BATCH: usize = tun_rs::IDEAL_BATCH_SIZE;
/// Bytes per segment buffer: any MTU-sized packet.
pub const SEGMENT_BUF: usize = 4096;
/// The largest IP packet (a super-packet before the GSO split).
const MAX_PACKET: usize = 65535;

/// Creates the TUN device `name` with `queues` queues (multi-queue when more
/// than one), with offload when the kernel has it.
///
/// # Errors
/// When the device cannot be created (no root / `CAP_NET_ADMIN`, no
/// /dev/net/tun) or a queue cannot be added.
pub fn create(name: &str, mtu: u16, queues: usize) -> anyhow::Result<Vec<SyncDevice>> {
    let build = |offload: bool| {
        tun_rs::DeviceBuilder::new()
            .name(name.to_owned())
            .mtu(mtu)
            .offload(offload)
            .multi_queue(queues > 1)
            .build_sync()
    };
    let first = build(true)
        .or_else(|e| {
            tracing::warn!(error = %e, "TUN offload unavailable; continuing without it");
            build(false)
        })
        .with_context(|| format!("creating TUN device {name}"))?;
    let mut all = Vec::with_capacity(queues.max(1));
    for _ in 1..queues {
        all.push(first.try_clone().context("adding a TUN queue")?);
    }
    all.insert(0, first);
    Ok(all)
}

/// The TUN device is gone (deleted under the program): the data plane stops
/// with this error, and the program exits after its cleanup so that it is
/// restarted with a new device.
#[derive(Debug)]
pub struct DeviceGone(pub io::Error);

impl std::fmt::Display for DeviceGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TUN device gone: {}", self.0)
    }
}

impl std::error::Error for DeviceGone {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Whether a TUN read error means the device no longer exists.
pub fn is_device_gone(e: &io::Error) -> bool {
    e.raw_os_error()
        .is_some_and(|c| c == libc::EBADFD || c == libc::ENODEV || c == libc::EBADF)
}

/// Buffers for one TUN read: the super-packet as read and its segments.
#[derive(Debug)]
pub struct TunReader {
    original: Vec<u8>,
    segments: Vec<Vec<u8>>,
    sizes: Vec<usize>,
}

impl Default for TunReader {
    fn default() -> Self {
        Self::new()
    }
}

impl TunReader {
    /// Allocates the buffers (once per worker).
    pub fn new() -> Self {
        Self {
            original: vec![0u8; TUN_OFFSET + MAX_PACKET],
            // Without offload the first buffer takes the whole packet.
            segments: (0..TUN_BATCH)
                .map(|i| vec![0u8; if i == 0 { MAX_PACKET } else { SEGMENT_BUF }])
                .collect(),
            sizes: vec![0usize; TUN_BATCH],
        }
    }

    /// Waits for and reads one (super-)packet; returns the segment count.
    ///
    /// # Errors
    /// The device's read error.
    pub async fn recv(&mut self, tun: &AsyncDevice) -> io::Result<usize> {
        tun.recv_multiple(&mut self.original, &mut self.segments, &mut self.sizes, 0)
            .await
    }

    /// Reads one (super-)packet if one is ready.
    ///
    /// # Errors
    /// The device's read error (`WouldBlock` when nothing is ready).
    pub fn try_recv(&mut self, tun: &AsyncDevice) -> io::Result<usize> {
        tun.try_recv_multiple(&mut self.original, &mut self.segments, &mut self.sizes, 0)
    }

    /// The first `n` segments of the last read.
    pub fn segments(&mut self, n: usize) -> impl Iterator<Item = &mut [u8]> {
        self.segments
            .iter_mut()
            .zip(&self.sizes)
            .take(n)
            .map(|(b, s)| &mut b[..*s])
    }
}

/// Packets to write to the TUN device in one batch, each after the
/// virtio-net header room; buffers are kept for reuse.
#[derive(Default)]
pub struct TunWriter {
    bufs: Vec<Vec<u8>>,
    len: usize,
    gro: GROTable,
}

impl std::fmt::Debug for TunWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunWriter")
            .field("waiting", &self.len)
            .finish_non_exhaustive()
    }
}

impl TunWriter {
    /// The buffer for the next packet, with room for `need` bytes after the
    /// header room. Fill it, then [`Self::commit`] the packet's length.
    pub fn next_buf(&mut self, need: usize) -> &mut [u8] {
        if self.len == self.bufs.len() {
            self.bufs.push(Vec::with_capacity(TUN_OFFSET + SEGMENT_BUF));
        }
        let b = &mut self.bufs[self.len];
        if b.len() < TUN_OFFSET + need {
            b.resize(TUN_OFFSET + need, 0);
        }
        &mut b[TUN_OFFSET..TUN_OFFSET + need]
    }

    /// The buffer from [`Self::next_buf`] holds a packet of `len` bytes.
    pub fn commit(&mut self, len: usize) {
        self.bufs[self.len].truncate(TUN_OFFSET + len);
        self.len += 1;
    }

    /// Adds a copy of `packet`.
    pub fn push_copy(&mut self, packet: &[u8]) {
        self.next_buf(packet.len()).copy_from_slice(packet);
        self.commit(packet.len());
    }

    /// Packets waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether none are waiting.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes the waiting packets in one batch (GRO coalesces TCP segments).
    /// Errors are counted and logged at debug.
    pub async fn write(&mut self, tun: &AsyncDevice, io: &mut IoCounters) {
        let n = std::mem::take(&mut self.len);
        if n == 0 {
            return;
        }
        io.tun_write_batches += 1;
        io.tun_packets_written += n as u64;
        if let Err(e) = tun
            .send_multiple(&mut self.gro, &mut self.bufs[..n], TUN_OFFSET)
            .await
        {
            tracing::debug!(error = %e, "TUN write");
            io.io_errors += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_buffers_keep_the_header_room_and_are_reused() {
        let mut w = TunWriter::default();
        let b = w.next_buf(100);
        assert_eq!(b.len(), 100);
        b[..3].copy_from_slice(&[1, 2, 3]);
        w.commit(3);
        w.push_copy(&[4, 5]);
        assert_eq!(w.len(), 2);
        assert_eq!(w.bufs[0].len(), TUN_OFFSET + 3);
        assert_eq!(&w.bufs[0][TUN_OFFSET..], &[1, 2, 3]);
        assert_eq!(&w.bufs[1][TUN_OFFSET..], &[4, 5]);
        // A reused buffer grows back to the room asked for.
        w.len = 0;
        assert_eq!(w.next_buf(1500).len(), 1500);
        assert_eq!(w.bufs.len(), 2, "no new buffer");
    }

    #[test]
    fn device_loss_is_told_from_other_read_errors() {
        for code in [libc::EBADFD, libc::ENODEV, libc::EBADF] {
            assert!(is_device_gone(&io::Error::from_raw_os_error(code)));
        }
        assert!(!is_device_gone(&io::Error::from_raw_os_error(libc::EINTR)));
        assert!(!is_device_gone(&io::ErrorKind::WouldBlock.into()));
    }
}
