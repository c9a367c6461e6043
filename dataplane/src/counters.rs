//! Counters of the data-plane IO: how well batching works, and IO errors.

/// How well batching works, and IO errors, for one worker or (merged) all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoCounters {
    /// TUN reads.
    pub tun_reads: u64,
    /// Packets those reads returned (after GSO split).
    pub tun_packets: u64,
    /// `sendmsg` calls on the UDP socket.
    pub udp_sends: u64,
    /// Datagrams those calls carried.
    pub udp_datagrams_sent: u64,
    /// `recvmmsg` calls that returned data.
    pub udp_recvs: u64,
    /// Datagrams received.
    pub udp_datagrams_received: u64,
    /// TUN write batches.
    pub tun_write_batches: u64,
    /// Packets written to the TUN device (before GRO coalescing).
    pub tun_packets_written: u64,
    /// IO errors (logged at debug).
    pub io_errors: u64,
    /// Packets handed to another worker (programs with several workers).
    pub handoffs_sent: u64,
    /// Packets taken over from another worker.
    pub handoffs_received: u64,
    /// Handoffs dropped (queue full, or a packet that would be handed on twice).
    pub handoff_dropped: u64,
}

impl IoCounters {
    /// Adds `other`'s counts to these (the sum over workers).
    pub fn merge(&mut self, other: &IoCounters) {
        let IoCounters {
            tun_reads,
            tun_packets,
            udp_sends,
            udp_datagrams_sent,
            udp_recvs,
            udp_datagrams_received,
            tun_write_batches,
            tun_packets_written,
            io_errors,
            handoffs_sent,
            handoffs_received,
            handoff_dropped,
        } = other;
        self.tun_reads += tun_reads;
        self.tun_packets += tun_packets;
        self.udp_sends += udp_sends;
        self.udp_datagrams_sent += udp_datagrams_sent;
        self.udp_recvs += udp_recvs;
        self.udp_datagrams_received += udp_datagrams_received;
        self.tun_write_batches += tun_write_batches;
        self.tun_packets_written += tun_packets_written;
        self.io_errors += io_errors;
        self.handoffs_sent += handoffs_sent;
        self.handoffs_received += handoffs_received;
        self.handoff_dropped += handoff_dropped;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_every_field() {
        let one = IoCounters {
            tun_reads: 1,
            tun_packets: 2,
            udp_sends: 3,
            udp_datagrams_sent: 4,
            udp_recvs: 5,
            udp_datagrams_received: 6,
            tun_write_batches: 7,
            tun_packets_written: 8,
            io_errors: 9,
            handoffs_sent: 10,
            handoffs_received: 11,
            handoff_dropped: 12,
        };
        let mut sum = one;
        sum.merge(&one);
        assert_eq!(
            sum,
            IoCounters {
                tun_reads: 2,
                tun_packets: 4,
                udp_sends: 6,
                udp_datagrams_sent: 8,
                udp_recvs: 10,
                udp_datagrams_received: 12,
                tun_write_batches: 14,
                tun_packets_written: 16,
                io_errors: 18,
                handoffs_sent: 20,
                handoffs_received: 22,
                handoff_dropped: 24,
            }
        );
        let mut zero = IoCounters::default();
        zero.merge(&IoCounters::default());
        assert_eq!(zero, IoCounters::default());
    }
}
