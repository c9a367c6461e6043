//! Several data-plane workers behind one UDP port, with WireGuard datagrams
//! steered to the worker that owns their peer.
//!
//! With several workers, each binds its own UDP socket to the same address
//! (`SO_REUSEPORT`). By default the kernel picks a socket by a hash of the
//! 4-tuple, which knows nothing about which worker owns the peer. A classic
//! BPF program attached to the group (`SO_ATTACH_REUSEPORT_CBPF`) picks the
//! socket from the WireGuard receiver index instead: tunnel indices encode
//! their shard (the gateway's `index & 0xFFFFF` is `slot * workers +
//! shard`), and the wire carries `index << 8 | session`, little-endian, at
//! payload offset 4). Handshake initiations carry no receiver index and keep
//! the kernel's hash; the worker that gets one hands it to the owner.
//!
//! The gateway's NAT-T port (UDP 4500) is steered the same way by ESP's SPI
//! ([`esp_program`]): the SPIs the gateway chooses carry the tunnel index in
//! their low 24 bits (RFC 4303 §2.1 leaves the SPI's value to the
//! receiver). IKE messages on that port (the non-ESP marker, four zero
//! bytes, RFC 3948 §2.2) and everything on the IKE port keep the kernel's
//! hash: IKE is routed by the shared responder and handed over.
//!
//! `setsockopt` with a filter program needs `libc`: this module holds the
//! crate's only `unsafe` block ([`attach`]).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use anyhow::Context as _;

/// Which program steers a socket group's datagrams to workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steering {
    /// WireGuard's receiver index ([`program`]).
    Wireguard,
    /// ESP's SPI, on the NAT-T port ([`esp_program`]).
    Esp,
    /// None: the kernel's hash of the 4-tuple.
    Hash,
}

/// Binds one UDP socket per worker to `listen` (port 0: the first picks the
/// port the others share). With more than one worker they form a
/// `SO_REUSEPORT` group with the WireGuard steering program attached.
///
/// # Errors
/// When a socket cannot be created or bound, or the kernel refuses the
/// steering program.
pub fn bind_group(listen: SocketAddr, workers: usize) -> anyhow::Result<Vec<std::net::UdpSocket>> {
    bind_group_steered(listen, workers, Steering::Wireguard)
}

/// [`bind_group`] with the steering program of `steering`.
///
/// # Errors
/// When a socket cannot be created or bound, or the kernel refuses the
/// steering program.
pub fn bind_group_steered(
    listen: SocketAddr,
    workers: usize,
    steering: Steering,
) -> anyhow::Result<Vec<std::net::UdpSocket>> {
    let mut sockets = Vec::with_capacity(workers);
    let mut addr = listen;
    for _ in 0..workers.max(1) {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .context("UDP socket")?;
        if workers > 1 {
            s.set_reuse_port(true).context("SO_REUSEPORT")?;
        }
        s.bind(&addr.into())
            .with_context(|| format!("binding {listen}"))?;
        let s: std::net::UdpSocket = s.into();
        addr = s.local_addr().context("UDP socket")?;
        sockets.push(s);
    }
    if workers > 1 {
        let count = u16::try_from(workers).context("too many workers")?;
        let prog = match steering {
            Steering::Wireguard => program(count),
            Steering::Esp => esp_program(count),
            Steering::Hash => return Ok(sockets),
        };
        attach(&sockets[0], &prog).context("attaching the reuseport steering program")?;
    }
    Ok(sockets)
}

// Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
const BPF_LD_B_ABS: u16 = 0x10 | 0x20; // BPF_LD (0) | BPF_B | BPF_ABS
const BPF_JEQ_K: u16 = 0x05 | 0x10; // BPF_JMP | BPF_JEQ | BPF_K
const BPF_AND_K: u16 = 0x04 | 0x50; // BPF_ALU | BPF_AND | BPF_K
const BPF_LSH_K: u16 = 0x04 | 0x60; // BPF_ALU | BPF_LSH | BPF_K
const BPF_OR_X: u16 = 0x04 | 0x40 | 0x08; // BPF_ALU | BPF_OR | BPF_X
const BPF_MOD_K: u16 = 0x04 | 0x90; // BPF_ALU | BPF_MOD | BPF_K
const BPF_TAX: u16 = 0x07; // BPF_MISC | BPF_TAX
const BPF_RET_A: u16 = 0x06 | 0x10; // BPF_RET | BPF_A
const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K

const fn insn(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The program: socket index = ((b7 & 0x0f) << 16 | b6 << 8 | b5) % workers
/// for every message but a handshake initiation (type 1), which returns an
/// out-of-range index so that the kernel falls back to its hash.
pub fn program(workers: u16) -> Vec<libc::sock_filter> {
    vec![
        insn(BPF_LD_B_ABS, 0, 0, 0), // A = message type
        insn(BPF_JEQ_K, 12, 0, 1),   // initiation → fallback (the last one)
        insn(BPF_LD_B_ABS, 0, 0, 7), // A = b7
        insn(BPF_AND_K, 0, 0, 0x0f), // A &= 0x0f
        insn(BPF_LSH_K, 0, 0, 8),    // A <<= 8
        insn(BPF_TAX, 0, 0, 0),      // X = A
        insn(BPF_LD_B_ABS, 0, 0, 6), // A = b6
        insn(BPF_OR_X, 0, 0, 0),     // A |= X
        insn(BPF_LSH_K, 0, 0, 8),    // A <<= 8
        insn(BPF_TAX, 0, 0, 0),      // X = A
        insn(BPF_LD_B_ABS, 0, 0, 5), // A = b5
        insn(BPF_OR_X, 0, 0, 0),     // A |= X
        insn(BPF_MOD_K, 0, 0, u32::from(workers.max(1))),
        insn(BPF_RET_A, 0, 0, 0),        // socket index
        insn(BPF_RET_K, 0, 0, u32::MAX), // fallback: the kernel's hash
    ]
}

/// The NAT-T port's program: socket index = ((b1 & 0x0f) << 16 | b2 << 8 |
/// b3) % workers, the low 20 bits of the big-endian SPI (the gateway's
/// `slot * workers + shard` under the index's generation and the SPI's
/// random high byte), for ESP; a datagram whose first byte is 0 (the
/// non-ESP marker of IKE, or an SPI the gateway never chooses) returns an
/// out-of-range index so that the kernel falls back to its hash. A NAT
/// keepalive (one byte `0xFF`) ends the program at the load of b1, which
/// the kernel answers with socket 0; any worker consumes it.
pub fn esp_program(workers: u16) -> Vec<libc::sock_filter> {
    vec![
        insn(BPF_LD_B_ABS, 0, 0, 0), // A = b0 (the SPI's high byte)
        insn(BPF_JEQ_K, 12, 0, 0),   // 0: not an SPI of ours → fallback
        insn(BPF_LD_B_ABS, 0, 0, 1), // A = b1
        insn(BPF_AND_K, 0, 0, 0x0f), // A &= 0x0f
        insn(BPF_LSH_K, 0, 0, 8),    // A <<= 8
        insn(BPF_TAX, 0, 0, 0),      // X = A
        insn(BPF_LD_B_ABS, 0, 0, 2), // A = b2
        insn(BPF_OR_X, 0, 0, 0),     // A |= X
        insn(BPF_LSH_K, 0, 0, 8),    // A <<= 8
        insn(BPF_TAX, 0, 0, 0),      // X = A
        insn(BPF_LD_B_ABS, 0, 0, 3), // A = b3
        insn(BPF_OR_X, 0, 0, 0),     // A |= X
        insn(BPF_MOD_K, 0, 0, u32::from(workers.max(1))),
        insn(BPF_RET_A, 0, 0, 0),        // socket index
        insn(BPF_RET_K, 0, 0, u32::MAX), // fallback: the kernel's hash
    ]
}

/// Attaches a steering program to the reuseport group of `socket`.
///
/// # Errors
/// When the kernel refuses the option (e.g. before Linux 4.5).
pub fn attach(socket: &impl AsRawFd, prog: &[libc::sock_filter]) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: u16::try_from(prog.len()).map_err(|_| io::ErrorKind::InvalidInput)?,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` points at `prog`, which outlives the call; the kernel
    // copies the program during setsockopt and keeps no pointer to it. The
    // length passed is exactly that of `sock_fprog`.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&raw const fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A tiny interpreter for the instructions the program uses.
    fn run(prog: &[libc::sock_filter], pkt: &[u8]) -> u32 {
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        loop {
            let i = prog[pc];
            pc += 1;
            match i.code {
                BPF_LD_B_ABS => match pkt.get(i.k as usize) {
                    Some(b) => a = u32::from(*b),
                    None => return 0, // the kernel aborts the program with 0
                },
                BPF_JEQ_K => pc += usize::from(if a == i.k { i.jt } else { i.jf }),
                BPF_AND_K => a &= i.k,
                BPF_LSH_K => a <<= i.k,
                BPF_OR_X => a |= x,
                BPF_MOD_K => a %= i.k,
                BPF_TAX => x = a,
                BPF_RET_A => return a,
                BPF_RET_K => return i.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    fn data_message(index: u32, session: u8) -> Vec<u8> {
        let mut m = vec![4, 0, 0, 0];
        m.extend_from_slice(&((index << 8) | u32::from(session)).to_le_bytes());
        m.extend_from_slice(&[0; 24]);
        m
    }

    #[test]
    fn data_goes_to_the_shard_encoded_in_the_index() {
        for workers in [1u16, 2, 3, 4, 7] {
            let prog = program(workers);
            for slot in [0u32, 1, 5, 1000, 200_000] {
                for shard in 0..u32::from(workers) {
                    let base = slot * u32::from(workers) + shard;
                    if base >= 1 << 20 {
                        continue;
                    }
                    for generation in [0u32, 1, 15] {
                        let index = generation << 20 | base;
                        let got = run(&prog, &data_message(index, 0xab));
                        assert_eq!(got, shard, "workers {workers} index {index:#x}");
                    }
                }
            }
        }
    }

    /// The kernel takes the program, and datagrams on loopback reach the
    /// socket of the shard their receiver index names.
    #[test]
    fn the_kernel_steers_by_the_program() {
        let workers = 3;
        let sockets = bind_group("127.0.0.1:0".parse().unwrap(), workers).unwrap();
        for s in &sockets {
            s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
        }
        let to = sockets[0].local_addr().unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for shard in 0..workers as u32 {
            let index = 7 * workers as u32 + shard;
            client.send_to(&data_message(index, 1), to).unwrap();
            let mut buf = [0u8; 64];
            let (n, _) = sockets[shard as usize].recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &data_message(index, 1)[..], "shard {shard}");
        }
    }

    fn esp(spi: u32) -> Vec<u8> {
        let mut m = spi.to_be_bytes().to_vec();
        m.extend_from_slice(&[0x5a; 40]);
        m
    }

    #[test]
    fn esp_goes_to_the_shard_encoded_in_the_spi() {
        for workers in [1u16, 2, 3, 4, 7] {
            let prog = esp_program(workers);
            for slot in [0u32, 1, 5, 1000, 200_000] {
                for shard in 0..u32::from(workers) {
                    let base = slot * u32::from(workers) + shard;
                    if base >= 1 << 20 {
                        continue;
                    }
                    for generation in [0u32, 1, 15] {
                        for high in [1u32, 0x7f, 0xff] {
                            let spi = high << 24 | generation << 20 | base;
                            let got = run(&prog, &esp(spi));
                            assert_eq!(got, shard, "workers {workers} spi {spi:#x}");
                        }
                    }
                }
            }
        }
        // IKE behind the non-ESP marker keeps the kernel's hash.
        let mut ike = vec![0, 0, 0, 0];
        ike.extend_from_slice(&[0x11; 60]);
        assert_eq!(run(&esp_program(4), &ike), u32::MAX);
        // A NAT keepalive stops at the first load past its end.
        assert_eq!(run(&esp_program(4), &[0xff]), 0);
    }

    #[test]
    fn the_kernel_steers_esp_by_the_program() {
        let workers = 3;
        let sockets =
            bind_group_steered("127.0.0.1:0".parse().unwrap(), workers, Steering::Esp).unwrap();
        for s in &sockets {
            s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
        }
        let to = sockets[0].local_addr().unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for shard in 0..workers as u32 {
            let spi = 0xc3 << 24 | (11 * workers as u32 + shard);
            client.send_to(&esp(spi), to).unwrap();
            let mut buf = [0u8; 64];
            let (n, _) = sockets[shard as usize].recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &esp(spi)[..], "shard {shard}");
        }
    }

    #[test]
    fn initiations_fall_back_to_the_kernel_hash() {
        let mut init = vec![1, 0, 0, 0];
        init.extend_from_slice(&[0xff; 144]);
        assert_eq!(run(&program(4), &init), u32::MAX);
    }
}
