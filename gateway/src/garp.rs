//! Gratuitous ARP (RFC 5227 §3 "ARP Announcement") on the center LAN when the
//! gateway takes a NAT address over, so that hosts and switches update their
//! caches at once instead of waiting for their entries to expire (the way
//! VRRP and MetalLB's layer-2 mode move addresses).
//!
//! This needs a raw `AF_PACKET` socket, which the standard library and
//! socket2 (without its `all` feature) do not offer; the few `libc` calls are
//! kept here.
#![allow(unsafe_code)]

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const ETH_P_ARP: u16 = 0x0806;
const BROADCAST: [u8; 6] = [0xff; 6];

/// The Ethernet frame of an ARP announcement for `ip` from `mac`: an ARP
/// request whose sender and target protocol addresses are both `ip`.
pub fn announcement(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&BROADCAST);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    // htype Ethernet, ptype IPv4, hlen 6, plen 4, op request.
    f[14..22].copy_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    // Target hardware address stays zero (RFC 5227 §2.1.1).
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// Broadcasts an ARP announcement for `ip` on interface `ifindex`.
///
/// # Errors
/// When the raw socket cannot be opened (needs `CAP_NET_RAW`) or the send fails.
pub fn announce(ifindex: u32, mac: [u8; 6], ip: Ipv4Addr) -> io::Result<()> {
    let frame = announcement(mac, ip);
    // SAFETY: plain socket(2) call; the result is checked before it is used
    // and owned by an OwnedFd from then on, which closes it.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ARP.to_be()),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_ARP.to_be();
    addr.sll_ifindex = i32::try_from(ifindex).map_err(|_| io::ErrorKind::InvalidInput)?;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&BROADCAST);
    // SAFETY: `frame` and `addr` outlive the call; the lengths passed are
    // exactly theirs, and `addr` is a fully initialised sockaddr_ll.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcement_layout() {
        let f = announcement([2, 0, 0, 0, 0, 1], Ipv4Addr::new(10, 64, 0, 5));
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1], "request");
        assert_eq!(&f[28..32], &[10, 64, 0, 5], "sender IP");
        assert_eq!(&f[32..38], &[0; 6], "target MAC");
        assert_eq!(&f[38..42], &[10, 64, 0, 5], "target IP");
    }
}
