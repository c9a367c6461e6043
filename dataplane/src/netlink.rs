//! Routes into a TUN device and proxy-ARP entries, through netlink
//! (rtnetlink), one message per change, never a shell.
//!
//! Routes and proxy entries carry a protocol number of our own
//! ([`PROTOCOL`]), so that entries a crashed previous run left behind can be
//! found and removed. Every dump is read to its end: a dump stream dropped
//! early leaves its remaining messages on the socket, and netlink warns.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context as _, anyhow};
use futures_util::TryStreamExt as _;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage,
};
use netlink_packet_route::route::{RouteMessage, RouteProtocol, RouteScope, RouteType};
use rtnetlink::RouteMessageBuilder;

/// The routing protocol number on our routes and proxy entries ("v"; 0–4
/// and the named ones are taken, see /etc/iproute2/rt_protos).
pub const PROTOCOL: RouteProtocol = RouteProtocol::Other(0x76);

/// A netlink error (its message names the kernel's errno).
pub type Error = rtnetlink::Error;

/// An interface as netlink lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    /// The interface index.
    pub index: u32,
    /// The hardware address, for an Ethernet-like interface.
    pub mac: Option<[u8; 6]>,
}

/// A netlink connection (its task ends when this is dropped).
pub struct Netlink {
    handle: rtnetlink::Handle,
    connection: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink").finish_non_exhaustive()
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl Netlink {
    /// Opens a netlink socket (inside a runtime).
    ///
    /// # Errors
    /// When the socket cannot be opened.
    pub fn connect() -> anyhow::Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("netlink socket")?;
        let connection = tokio::spawn(conn);
        Ok(Self { handle, connection })
    }

    /// The interface called `name`.
    ///
    /// # Errors
    /// When netlink fails or there is no such interface.
    pub async fn link(&self, name: &str) -> anyhow::Result<Link> {
        let mut stream = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        let mut found = None;
        while let Some(msg) = stream.try_next().await.map_err(|e| anyhow!("{e}"))? {
            if found.is_none() {
                found = Some(Link {
                    index: msg.header.index,
                    mac: mac_of(&msg.attributes),
                });
            }
        }
        found.ok_or_else(|| anyhow!("no such interface"))
    }

    /// The index of the interface called `name`; errors say what it is for
    /// (e.g. the configuration key that named it).
    ///
    /// # Errors
    /// When netlink fails or there is no such interface.
    pub async fn link_index(&self, what: &str, name: &str) -> anyhow::Result<u32> {
        let link = self
            .link(name)
            .await
            .with_context(|| format!("{what} {name}"))?;
        Ok(link.index)
    }

    /// Sets interface `index` up.
    ///
    /// # Errors
    /// The kernel's refusal.
    pub async fn set_up(&self, index: u32) -> Result<(), Error> {
        self.handle
            .link()
            .set(rtnetlink::LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
    }

    /// The first IPv4 address of interface `index` and its prefix length.
    ///
    /// # Errors
    /// When netlink fails.
    pub async fn first_ipv4_address(&self, index: u32) -> anyhow::Result<Option<(Ipv4Addr, u8)>> {
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut found = None;
        while let Some(m) = stream.try_next().await.map_err(|e| anyhow!("{e}"))? {
            if m.header.family != AddressFamily::Inet || found.is_some() {
                continue;
            }
            found = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V4(v4)) => Some((*v4, m.header.prefix_len)),
                _ => None,
            });
        }
        Ok(found)
    }

    /// Routes `addr/prefix_len` to interface `index` (link scope, our
    /// protocol), replacing a route there is.
    ///
    /// # Errors
    /// The kernel's refusal.
    pub async fn add_route(&self, addr: Ipv4Addr, prefix_len: u8, index: u32) -> Result<(), Error> {
        self.handle
            .route()
            .add(route_message(addr, prefix_len, index))
            .replace()
            .execute()
            .await
    }

    /// Discards traffic to `addr/prefix_len` (a blackhole route with our
    /// protocol) at metric [`BLACKHOLE_METRIC`], below every route of
    /// [`Self::add_route`] (metric 0): it carries the traffic only while no
    /// such route exists, e.g. when the device they lead to has gone and the
    /// kernel removed them with it. Replaces a blackhole there is.
    ///
    /// # Errors
    /// The kernel's refusal.
    pub async fn add_blackhole(&self, addr: Ipv4Addr, prefix_len: u8) -> Result<(), Error> {
        self.handle
            .route()
            .add(blackhole_message(addr, prefix_len))
            .replace()
            .execute()
            .await
    }

    /// Removes the route [`Self::add_route`] made; a missing route is no error.
    ///
    /// # Errors
    /// The kernel's refusal.
    pub async fn del_route(&self, addr: Ipv4Addr, prefix_len: u8, index: u32) -> Result<(), Error> {
        let r = self
            .handle
            .route()
            .del(route_message(addr, prefix_len, index))
            .execute()
            .await;
        not_found_is_ok(r)
    }

    /// Answers ARP for `ip` on interface `index` (a proxy entry with our
    /// protocol), replacing an entry there is.
    ///
    /// # Errors
    /// The kernel's refusal.
    pub async fn add_proxy(&self, index: u32, ip: Ipv4Addr) -> Result<(), Error> {
        let mut req = self
            .handle
            .neighbours()
            .add(index, IpAddr::V4(ip))
            .flags(NeighbourFlags::Proxy)
            .replace();
        req.message_mut()
            .attributes
            .push(NeighbourAttribute::Protocol(PROTOCOL));
        req.execute().await
    }

    /// Removes a proxy entry; a missing entry is no error.
    ///
    /// # Errors
    /// The kernel's refusal.
    pub async fn del_proxy(&self, index: u32, ip: Ipv4Addr) -> Result<(), Error> {
        let r = self
            .handle
            .neighbours()
            .del(proxy_message(index, ip))
            .execute()
            .await;
        not_found_is_ok(r)
    }

    /// The addresses of our proxy entries on interface `index` (the whole
    /// dump is read; a failing dump ends the list, logged at debug).
    pub async fn our_proxies(&self, index: u32) -> Vec<Ipv4Addr> {
        let mut found = Vec::new();
        let mut req = self.handle.neighbours().get().proxies();
        req.message_mut().header.family = AddressFamily::Inet;
        let mut stream = req.execute();
        loop {
            match stream.try_next().await {
                Ok(Some(m)) => {
                    if m.header.ifindex == index
                        && m.attributes
                            .contains(&NeighbourAttribute::Protocol(PROTOCOL))
                    {
                        found.extend(m.attributes.iter().filter_map(|a| match a {
                            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                                Some(*ip)
                            }
                            _ => None,
                        }));
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "listing proxy entries");
                    break;
                }
            }
        }
        found
    }
}

fn mac_of(attributes: &[LinkAttribute]) -> Option<[u8; 6]> {
    attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) => <[u8; 6]>::try_from(b.as_slice()).ok(),
        _ => None,
    })
}

fn route_message(addr: Ipv4Addr, prefix_len: u8, index: u32) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(addr, prefix_len)
        .output_interface(index)
        .scope(RouteScope::Link)
        .protocol(PROTOCOL)
        .build()
}

/// The metric of [`Netlink::add_blackhole`]'s routes: far below (numerically
/// above) the kernel's default 0, so any route to a device wins while it exists.
pub const BLACKHOLE_METRIC: u32 = 0x7676;

fn blackhole_message(addr: Ipv4Addr, prefix_len: u8) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(addr, prefix_len)
        .kind(RouteType::BlackHole)
        .priority(BLACKHOLE_METRIC)
        .protocol(PROTOCOL)
        .build()
}

fn proxy_message(index: u32, ip: Ipv4Addr) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.ifindex = index;
    m.header.flags = NeighbourFlags::Proxy;
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    m
}

fn not_found_is_ok(r: Result<(), Error>) -> Result<(), Error> {
    match r {
        Err(rtnetlink::Error::NetlinkError(m))
            if m.raw_code() == -libc::ENOENT || m.raw_code() == -libc::ESRCH =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Writes `value` to `/proc/sys/<path>` (e.g. `net/ipv4/ip_forward`).
///
/// # Errors
/// When the file cannot be written.
pub fn sysctl(path: &str, value: &str) -> anyhow::Result<()> {
    let full = format!("/proc/sys/{path}");
    std::fs::write(&full, value).with_context(|| format!("writing {value} to {full}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_our_protocol_and_the_proxy_flag() {
        let r = route_message(Ipv4Addr::new(10, 64, 0, 5), 32, 7);
        assert_eq!(r.header.protocol, PROTOCOL);
        assert_eq!(r.header.scope, RouteScope::Link);
        assert_eq!(r.header.destination_prefix_length, 32);
        let b = blackhole_message(Ipv4Addr::new(10, 64, 0, 0), 16);
        assert_eq!(b.header.kind, RouteType::BlackHole);
        assert_eq!(b.header.protocol, PROTOCOL);
        let p = proxy_message(7, Ipv4Addr::new(10, 64, 0, 5));
        assert_eq!(p.header.ifindex, 7);
        assert_eq!(p.header.flags, NeighbourFlags::Proxy);
        assert_eq!(
            mac_of(&[LinkAttribute::Address(vec![2, 0, 0, 0, 0, 1])]),
            Some([2, 0, 0, 0, 0, 1])
        );
        assert_eq!(mac_of(&[LinkAttribute::Address(vec![0; 4])]), None);
    }
}
