//! The LAN side in the kernel (packet mode): the TUN device, the routes that
//! bring the LAN's replies back into it (the center prefixes, and with
//! masquerade the masquerade address plus a proxy-ARP entry so that LAN hosts
//! find it), forwarding. Everything goes through netlink and carries our
//! routing protocol number; it is removed again at shutdown.
//!
//! Also: the LAN interface's address and prefix (both modes), and its link
//! state (failure reports).

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context as _, anyhow};
use futures_util::TryStreamExt as _;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage,
};
use netlink_packet_route::route::{RouteProtocol, RouteScope};
use rtnetlink::RouteMessageBuilder;
use vpnnat::gateway::Prefix;

/// The routing protocol number on our routes and proxy entries ("v", as the gateway's).
pub const PROTOCOL: RouteProtocol = RouteProtocol::Other(0x76);

/// Creates the TUN device, with offload when the kernel has it.
///
/// # Errors
/// When the device cannot be created (no root / `CAP_NET_ADMIN`, no /dev/net/tun).
pub fn create_tun(name: &str, mtu: u16) -> anyhow::Result<tun_rs::SyncDevice> {
    let build = |offload: bool| {
        tun_rs::DeviceBuilder::new()
            .name(name.to_owned())
            .mtu(mtu)
            .offload(offload)
            .build_sync()
    };
    build(true)
        .or_else(|e| {
            tracing::warn!(error = %e, "TUN offload unavailable; continuing without it");
            build(false)
        })
        .with_context(|| {
            format!("creating TUN device {name} (packet mode needs root or CAP_NET_ADMIN; try --netstack)")
        })
}

/// The kernel state of packet mode.
pub struct KernelRoutes {
    handle: rtnetlink::Handle,
    tun_index: u32,
    routes: Vec<Prefix>,
    proxy: Option<(u32, Ipv4Addr)>,
}

impl std::fmt::Debug for KernelRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelRoutes")
            .field("tun_index", &self.tun_index)
            .field("routes", &self.routes)
            .field("proxy", &self.proxy)
            .finish_non_exhaustive()
    }
}

impl KernelRoutes {
    /// Routes `center` prefixes (and the masquerade address) into the TUN
    /// device `tun`, answers ARP for the masquerade address on `lan_if`, and
    /// turns on forwarding when `ip_forward`.
    ///
    /// # Errors
    /// When netlink fails or an interface does not exist.
    pub async fn install(
        tun: &str,
        center: &[Prefix],
        masquerade: Option<(Ipv4Addr, &str)>,
        ip_forward: bool,
    ) -> anyhow::Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("netlink socket")?;
        tokio::spawn(conn);
        let tun_index = link_index(&handle, tun)
            .await
            .with_context(|| format!("TUN device {tun}"))?;
        handle
            .link()
            .set(
                rtnetlink::LinkUnspec::new_with_index(tun_index)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| anyhow!("setting {tun} up: {e}"))?;
        if ip_forward {
            sysctl("net/ipv4/ip_forward", "1")?;
        } else if std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .is_ok_and(|v| v.trim() == "0")
        {
            tracing::warn!(
                "net.ipv4.ip_forward is 0 and packet.ip_forward = false: packets from the tunnel will not reach the LAN"
            );
        }
        // The kernel's IPv6 chatter has no place in an IPv4 tunnel.
        let _ = sysctl(&format!("net/ipv6/conf/{tun}/disable_ipv6"), "1");
        let mut me = Self {
            handle,
            tun_index,
            routes: Vec::new(),
            proxy: None,
        };
        let mut prefixes = center.to_vec();
        if let Some((addr, _)) = masquerade {
            prefixes.push(Prefix::new(addr, 32).expect("a /32 is a valid prefix"));
        }
        for p in prefixes {
            let route = me.route_message(p);
            me.handle
                .route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(|e| anyhow!("route {p} dev {tun}: {e}"))?;
            tracing::info!(prefix = %p, tun, "route into the tunnel installed");
            me.routes.push(p);
        }
        if let Some((addr, lan_if)) = masquerade {
            let index = link_index(&me.handle, lan_if)
                .await
                .with_context(|| format!("lan.interface {lan_if}"))?;
            // Proxy ARP answers only on a forwarding interface, for an address
            // routed out of another one (the /32 above), without delay.
            sysctl(&format!("net/ipv4/conf/{lan_if}/forwarding"), "1")?;
            sysctl(&format!("net/ipv4/neigh/{lan_if}/proxy_delay"), "0")?;
            let mut req = me
                .handle
                .neighbours()
                .add(index, IpAddr::V4(addr))
                .flags(NeighbourFlags::Proxy)
                .replace();
            req.message_mut()
                .attributes
                .push(NeighbourAttribute::Protocol(PROTOCOL));
            req.execute()
                .await
                .map_err(|e| anyhow!("proxy ARP {addr} on {lan_if}: {e}"))?;
            tracing::info!(address = %addr, interface = lan_if, "answering ARP for the masquerade address");
            me.proxy = Some((index, addr));
        }
        Ok(me)
    }

    fn route_message(&self, p: Prefix) -> netlink_packet_route::route::RouteMessage {
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(p.addr(), p.prefix_len())
            .output_interface(self.tun_index)
            .scope(RouteScope::Link)
            .protocol(PROTOCOL)
            .build()
    }

    /// Removes every route and proxy entry installed (clean shutdown).
    pub async fn remove_all(&mut self) {
        if let Some((index, addr)) = self.proxy.take() {
            let mut m = NeighbourMessage::default();
            m.header.family = AddressFamily::Inet;
            m.header.ifindex = index;
            m.header.flags = NeighbourFlags::Proxy;
            m.attributes
                .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                    addr,
                )));
            if let Err(e) = self.handle.neighbours().del(m).execute().await {
                tracing::warn!(address = %addr, error = %e, "removing the proxy-ARP entry");
            }
        }
        for p in std::mem::take(&mut self.routes) {
            let route = self.route_message(p);
            if let Err(e) = self.handle.route().del(route).execute().await {
                tracing::debug!(prefix = %p, error = %e, "removing a route (gone with the device?)");
            }
        }
        tracing::info!("routes into the tunnel removed");
    }
}

async fn link_index(handle: &rtnetlink::Handle, name: &str) -> anyhow::Result<u32> {
    let mut stream = handle.link().get().match_name(name.to_owned()).execute();
    let mut index = None;
    // Read to the end: a stream dropped early makes netlink warn.
    while let Some(msg) = stream.try_next().await.map_err(|e| anyhow!("{e}"))? {
        index.get_or_insert(msg.header.index);
    }
    index.ok_or_else(|| anyhow!("no such interface"))
}

/// The first IPv4 address of interface `name` and its prefix.
///
/// # Errors
/// When netlink fails, the interface does not exist or has no IPv4 address.
pub async fn interface_address(name: &str) -> anyhow::Result<(Ipv4Addr, Prefix)> {
    let (conn, handle, _) = rtnetlink::new_connection().context("netlink socket")?;
    let conn = tokio::spawn(conn);
    let result = async {
        let index = link_index(&handle, name)
            .await
            .with_context(|| format!("lan.interface {name}"))?;
        let mut stream = handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut found = None;
        // Read the whole dump: a stream dropped early makes netlink warn.
        while let Some(m) = stream.try_next().await.map_err(|e| anyhow!("{e}"))? {
            if m.header.family != AddressFamily::Inet || found.is_some() {
                continue;
            }
            for a in &m.attributes {
                if let AddressAttribute::Address(IpAddr::V4(v4)) = a {
                    let prefix = Prefix::new(*v4, m.header.prefix_len)
                        .map_err(|e| anyhow!("{name}: {e}"))?;
                    found = Some((*v4, prefix));
                    break;
                }
            }
        }
        found.ok_or_else(|| anyhow!("lan.interface {name} has no IPv4 address"))
    }
    .await;
    conn.abort();
    result
}

/// Whether the interface's link is up (`/sys/class/net/IF/carrier`); `None`
/// when it cannot be read (interface down or missing).
pub fn carrier(name: &str) -> Option<bool> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/carrier")).ok()?;
    Some(text.trim() == "1")
}

fn sysctl(path: &str, value: &str) -> anyhow::Result<()> {
    let full = format!("/proc/sys/{path}");
    std::fs::write(&full, value).with_context(|| format!("writing {value} to {full}"))
}
