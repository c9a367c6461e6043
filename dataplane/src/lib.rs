//! The data-plane IO of the vpnnat programs (the gateway and the router
//! agent): everything between a program's sans-IO packet logic and the
//! kernel, written once.
//!
//! - [`udp`]: the tunnel's UDP socket with batched receive (`recvmmsg`, UDP
//!   GRO) and send (`sendmsg`, UDP GSO) through quinn-udp.
//! - [`tun`]: the TUN device with offload (virtio-net header room, GSO split
//!   on read, GRO coalescing on write) through tun-rs.
//! - [`train`]: runs of equal-size datagrams to one destination that leave as
//!   one GSO `sendmsg`.
//! - [`pump`]: the packet pump between one TUN queue and a program's UDP
//!   sockets (one, or a few ports that [`Via`] tells apart); the program
//!   plugs its packet logic in as a [`PacketPath`] ([`path`]).
//! - [`worker`]: a data-plane thread with its own single-threaded runtime,
//!   and the command round trip to it.
//! - [`steering`]: several workers behind one port (`SO_REUSEPORT`), with
//!   datagrams steered to a worker by a classic BPF program.
//! - [`stream`]: tunnel datagrams over a byte stream (WebSocket frames),
//!   the virtual endpoints that route a worker's sends to a stream.
//! - [`tls`]: the TLS fallback's TLS 1.3 configurations, the agent's pin
//!   verifier, the WebSocket upgrade and the HTTP CONNECT proxy client.
//! - [`netlink`]: routes into the TUN device and proxy-ARP entries.
//! - [`counters`]: how well batching works.
//!
//! Nothing here allocates or makes a dynamic call per packet: buffers are
//! allocated once per worker, and the packet logic is a generic parameter.
#![deny(unsafe_code)]

pub mod counters;
pub mod netlink;
pub mod path;
pub mod pump;
#[allow(unsafe_code)]
pub mod steering;
pub mod stream;
pub mod tls;
pub mod train;
pub mod tun;
pub mod udp;
pub mod worker;

pub use counters::IoCounters;
pub use path::{Datagram, PacketPath, Sent, Step, Via};

/// Waits until `deadline`, or forever without one (a `select!` arm for the
/// next timer of the packet logic).
pub async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
