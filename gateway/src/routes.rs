//! Which gateway owns a NAT address, told to the kernel (DESIGN.md, "Data
//! plane"): per address a /32 route to the TUN device and a proxy-ARP entry
//! on the center-LAN interface, announced with a gratuitous ARP; all removed
//! when the address is released and at shutdown. Everything goes through
//! netlink (rtnetlink), one message per change, never a shell.
//!
//! Routes and proxy entries carry a protocol number of our own, so entries a
//! crashed previous run left behind are found and removed at start.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context as _, anyhow};
use futures_util::TryStreamExt as _;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage,
};
use netlink_packet_route::route::{RouteProtocol, RouteScope};
use rtnetlink::RouteMessageBuilder;

use vpnnat::gateway::Prefix;

use crate::garp;

/// The routing protocol number on our routes and proxy entries ("v"; 0–4
/// and the named ones are taken, see /etc/iproute2/rt_protos).
pub const PROTOCOL: RouteProtocol = RouteProtocol::Other(0x76);

/// The center-LAN interface.
#[derive(Debug, Clone)]
struct CenterIf {
    name: String,
    index: u32,
    mac: Option<[u8; 6]>,
}

/// Installs and removes the kernel state for NAT addresses.
pub struct Routes {
    handle: rtnetlink::Handle,
    tun_index: u32,
    center: Option<CenterIf>,
    /// Addresses the gateway carries (from the data plane's events).
    target: BTreeSet<Ipv4Addr>,
    /// Addresses whose route and proxy entry are in place.
    installed: BTreeSet<Ipv4Addr>,
}

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routes")
            .field("tun_index", &self.tun_index)
            .field("center", &self.center)
            .field("installed", &self.installed.len())
            .finish()
    }
}

impl Routes {
    /// Connects to netlink, enables forwarding on the TUN device and the
    /// center interface (only those), and removes stale entries of ours.
    ///
    /// # Errors
    /// When netlink is unavailable or an interface does not exist.
    pub async fn new(tun_name: &str, center_if: &str, pool: Prefix) -> anyhow::Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("netlink socket")?;
        tokio::spawn(conn);
        let (tun_index, _) = link(&handle, tun_name)
            .await
            .with_context(|| format!("TUN device {tun_name}"))?;
        // Replies from the sites arrive on the TUN device and are forwarded
        // to the center LAN: the input device decides (ip_route_input_slow).
        sysctl(&format!("net/ipv4/conf/{tun_name}/forwarding"), "1")?;
        // The pool is IPv4; keep the kernel's IPv6 chatter off the TUN device.
        let _ = sysctl(&format!("net/ipv6/conf/{tun_name}/disable_ipv6"), "1");
        // The whole pool leads to the TUN device too (below the /32s), so that a
        // packet for an address no site holds reaches the gateway and is
        // answered with ICMP host unreachable instead of leaving elsewhere.
        let pool_route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(pool.addr(), pool.prefix_len())
            .output_interface(tun_index)
            .scope(RouteScope::Link)
            .protocol(PROTOCOL)
            .build();
        handle
            .route()
            .add(pool_route)
            .replace()
            .execute()
            .await
            .map_err(|e| anyhow!("route {pool} dev {tun_name}: {e}"))?;
        let center = if center_if.is_empty() {
            None
        } else {
            let (index, mac) = link(&handle, center_if)
                .await
                .with_context(|| format!("center.interface {center_if}"))?;
            // Technicians' packets to NAT addresses arrive here and are
            // forwarded; the kernel answers ARP from proxy entries only on a
            // forwarding interface (arp_process), and without proxy_delay.
            sysctl(&format!("net/ipv4/conf/{center_if}/forwarding"), "1")?;
            sysctl(&format!("net/ipv4/neigh/{center_if}/proxy_delay"), "0")?;
            Some(CenterIf {
                name: center_if.to_owned(),
                index,
                mac,
            })
        };
        let mut routes = Self {
            handle,
            tun_index,
            center,
            target: BTreeSet::new(),
            installed: BTreeSet::new(),
        };
        routes.remove_stale().await;
        Ok(routes)
    }

    /// The addresses installed now.
    pub fn installed(&self) -> &BTreeSet<Ipv4Addr> {
        &self.installed
    }

    /// The gateway now carries `ip` (installed by the next [`Self::reconcile`]).
    pub fn want(&mut self, ip: Ipv4Addr) {
        self.target.insert(ip);
    }

    /// The gateway no longer carries `ip` (removed by the next [`Self::reconcile`]).
    pub fn unwant(&mut self, ip: Ipv4Addr) {
        self.target.remove(&ip);
    }

    /// Brings the kernel in line with the wanted addresses: removals first
    /// (an address may move to another gateway), then additions. Failures
    /// are retried by the next call.
    ///
    /// # Errors
    /// One line per address that could not be installed or removed.
    pub async fn reconcile(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        let extra: Vec<Ipv4Addr> = self.installed.difference(&self.target).copied().collect();
        for ip in extra {
            if let Err(e) = self.remove(ip).await {
                errors.push(format!("{e:#}"));
            }
        }
        let missing: Vec<Ipv4Addr> = self.target.difference(&self.installed).copied().collect();
        for ip in missing {
            if let Err(e) = self.add(ip).await {
                tracing::warn!(address = %ip, error = %e, "could not route a NAT address here");
                errors.push(format!("{e:#}"));
            }
        }
        errors
    }

    /// Routes `ip` to the TUN device, answers ARP for it on the center LAN and
    /// announces it.
    ///
    /// # Errors
    /// A message naming the address and the step that failed.
    async fn add(&mut self, ip: Ipv4Addr) -> anyhow::Result<()> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(ip, 32)
            .output_interface(self.tun_index)
            .scope(RouteScope::Link)
            .protocol(PROTOCOL)
            .build();
        self.handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(|e| anyhow!("route {ip}/32: {e}"))?;
        if let Some(center) = &self.center {
            let mut req = self
                .handle
                .neighbours()
                .add(center.index, IpAddr::V4(ip))
                .flags(NeighbourFlags::Proxy)
                .replace();
            req.message_mut()
                .attributes
                .push(NeighbourAttribute::Protocol(PROTOCOL));
            req.execute()
                .await
                .map_err(|e| anyhow!("proxy ARP {ip} on {}: {e}", center.name))?;
            if let Some(mac) = center.mac
                && let Err(e) = garp::announce(center.index, mac, ip)
            {
                tracing::warn!(address = %ip, error = %e, "gratuitous ARP failed");
            }
        }
        self.installed.insert(ip);
        tracing::info!(address = %ip, "NAT address routed here");
        Ok(())
    }

    /// Removes the route and proxy entry of `ip`.
    ///
    /// # Errors
    /// A message naming the address and the step that failed (a missing entry
    /// is not an error).
    async fn remove(&mut self, ip: Ipv4Addr) -> anyhow::Result<()> {
        let mut first_error = None;
        if let Some(center) = &self.center {
            let msg = proxy_message(center.index, ip);
            if let Err(e) = self.handle.neighbours().del(msg).execute().await
                && !is_not_found(&e)
            {
                first_error = Some(anyhow!("proxy ARP {ip} on {}: {e}", center.name));
            }
        }
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(ip, 32)
            .output_interface(self.tun_index)
            .scope(RouteScope::Link)
            .protocol(PROTOCOL)
            .build();
        if let Err(e) = self.handle.route().del(route).execute().await
            && !is_not_found(&e)
            && first_error.is_none()
        {
            first_error = Some(anyhow!("route {ip}/32: {e}"));
        }
        self.installed.remove(&ip);
        tracing::info!(address = %ip, "NAT address released");
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Removes everything installed (clean shutdown).
    pub async fn remove_all(&mut self) {
        self.target.clear();
        let all: Vec<Ipv4Addr> = self.installed.iter().copied().collect();
        for ip in all {
            if let Err(e) = self.remove(ip).await {
                tracing::warn!(error = %e, "cleanup");
            }
        }
    }

    /// Proxy entries with our protocol on the center interface that a previous
    /// run left (routes vanish with the previous TUN device).
    async fn remove_stale(&mut self) {
        let Some(center) = self.center.clone() else {
            return;
        };
        let mut stale = Vec::new();
        let mut req = self.handle.neighbours().get().proxies();
        req.message_mut().header.family = AddressFamily::Inet;
        let mut stream = req.execute();
        loop {
            match stream.try_next().await {
                Ok(Some(m)) => {
                    let ours = m
                        .attributes
                        .contains(&NeighbourAttribute::Protocol(PROTOCOL));
                    if m.header.ifindex == center.index && ours {
                        for a in &m.attributes {
                            if let NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) = a {
                                stale.push(*ip);
                            }
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "listing proxy entries");
                    break;
                }
            }
        }
        for ip in stale {
            tracing::info!(address = %ip, "removing a stale proxy-ARP entry");
            let _ = self
                .handle
                .neighbours()
                .del(proxy_message(center.index, ip))
                .execute()
                .await;
        }
    }
}

fn proxy_message(ifindex: u32, ip: Ipv4Addr) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.ifindex = ifindex;
    m.header.flags = NeighbourFlags::Proxy;
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    m
}

fn is_not_found(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m)
        if m.raw_code() == -libc::ENOENT || m.raw_code() == -libc::ESRCH)
}

async fn link(handle: &rtnetlink::Handle, name: &str) -> anyhow::Result<(u32, Option<[u8; 6]>)> {
    let msg = handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
        .map_err(|e| anyhow!("{e}"))?
        .ok_or_else(|| anyhow!("no such interface"))?;
    let mac = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) if b.len() == 6 => {
            let mut m = [0u8; 6];
            m.copy_from_slice(b);
            Some(m)
        }
        _ => None,
    });
    Ok((msg.header.index, mac))
}

fn sysctl(path: &str, value: &str) -> anyhow::Result<()> {
    let full = format!("/proc/sys/{path}");
    std::fs::write(&full, value).with_context(|| format!("writing {value} to {full}"))
}
