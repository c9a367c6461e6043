//! Does a LAN host answer? ICMP echo over unprivileged ICMP sockets
//! (`SOCK_DGRAM`/`IPPROTO_ICMP`, allowed by `net.ipv4.ping_group_range`) and
//! TCP connects. Used before a request is sent, by the watched-terminal
//! health checks, and by netstack mode to answer a technician's ping only
//! when the real host answers.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpStream, UdpSocket};

use vpnnat::nat::checksum;

use crate::settings::Check;

/// Ports tried by the automatic check when ICMP sockets are not allowed.
const PROBE_PORTS: [u16; 5] = [80, 443, 22, 3389, 445];

/// An unprivileged ICMP echo socket connected to `addr`. The kernel sets the
/// echo identifier (the socket's "port") and delivers only matching replies.
///
/// # Errors
/// `PermissionDenied` when the process's group is outside
/// `net.ipv4.ping_group_range`.
pub fn ping_socket(addr: Ipv4Addr) -> io::Result<UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::ICMPV4),
    )?;
    s.set_nonblocking(true)?;
    s.connect(&SocketAddr::from((addr, 0)).into())?;
    // A datagram socket of another protocol: tokio only uses send/recv on it.
    UdpSocket::from_std(std::net::UdpSocket::from(s))
}

/// Writes an ICMP echo request (RFC 792) into `buf`; returns its length.
pub fn echo_request(buf: &mut [u8], ident: u16, seq: u16, payload: &[u8]) -> usize {
    let len = 8 + payload.len();
    buf[0] = 8;
    buf[1] = 0;
    buf[2..4].copy_from_slice(&[0, 0]);
    buf[4..6].copy_from_slice(&ident.to_be_bytes());
    buf[6..8].copy_from_slice(&seq.to_be_bytes());
    buf[8..len].copy_from_slice(payload);
    let c = checksum(&buf[..len]);
    buf[2..4].copy_from_slice(&c.to_be_bytes());
    len
}

/// One echo: `Ok(true)` when a reply came within `timeout`.
///
/// # Errors
/// When ICMP sockets are not allowed or the send fails.
pub async fn ping(addr: Ipv4Addr, timeout: Duration) -> io::Result<bool> {
    let sock = ping_socket(addr)?;
    let mut buf = [0u8; 64];
    let n = echo_request(&mut buf, 0, 1, b"vpnnat-agent-probe");
    sock.send(&buf[..n]).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut rx = [0u8; 1500];
    loop {
        match tokio::time::timeout_at(deadline, sock.recv(&mut rx)).await {
            Err(_) => return Ok(false),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(false),
            Ok(Err(e)) => return Err(e),
            // Type 0: echo reply; errors (unreachable) come as socket errors.
            Ok(Ok(n)) if n >= 8 && rx[0] == 0 => return Ok(true),
            Ok(Ok(_)) => {}
        }
    }
}

/// A TCP connect: an accepted connection or a refusal both prove the host is there.
pub async fn tcp(addr: Ipv4Addr, port: u16, timeout: Duration) -> bool {
    match tokio::time::timeout(timeout, TcpStream::connect((addr, port))).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => e.kind() == io::ErrorKind::ConnectionRefused,
        Err(_) => false,
    }
}

/// Whether `addr` answers the configured check.
pub async fn answers(addr: Ipv4Addr, check: Check, timeout: Duration) -> bool {
    match check {
        Check::Tcp(port) => tcp(addr, port, timeout).await,
        Check::Ping => ping(addr, timeout).await.unwrap_or_else(|e| {
            tracing::debug!(error = %e, "ICMP socket");
            false
        }),
        Check::Auto => match ping(addr, timeout).await {
            Ok(true) => true,
            // No echo reply, or no ICMP socket: the host may still answer TCP.
            Ok(false) | Err(_) => {
                let probes = PROBE_PORTS.map(|p| Box::pin(tcp(addr, p, timeout)));
                let mut set = futures_util::future::select_all(probes);
                loop {
                    let (ok, _, rest) = set.await;
                    if ok {
                        return true;
                    }
                    if rest.is_empty() {
                        return false;
                    }
                    set = futures_util::future::select_all(rest);
                }
            }
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn echo_request_checksum_verifies() {
        let mut buf = [0u8; 64];
        let n = echo_request(&mut buf, 0x1234, 7, b"abc");
        assert_eq!(n, 11);
        assert_eq!(checksum(&buf[..n]), 0, "a correct checksum sums to zero");
        assert_eq!(&buf[4..8], &[0x12, 0x34, 0, 7]);
    }

    #[tokio::test]
    async fn tcp_probe_counts_a_refusal_as_an_answer() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(tcp(Ipv4Addr::LOCALHOST, port, Duration::from_secs(1)).await);
        drop(l);
        // Nothing listens now: the kernel refuses, which still proves the host.
        assert!(tcp(Ipv4Addr::LOCALHOST, port, Duration::from_secs(1)).await);
        assert!(
            answers(
                Ipv4Addr::LOCALHOST,
                Check::Tcp(port),
                Duration::from_secs(1)
            )
            .await
        );
    }
}
