//! Which gateway owns a NAT address, told to the kernel (docs/DESIGN.md,
//! "Data plane"): per address a /32 route to the TUN device and a proxy-ARP
//! entry on the center-LAN interface, announced with a gratuitous ARP; all
//! removed when the address is released and at shutdown. Everything goes
//! through the shared netlink helper ([`vpnnat_dataplane::netlink`]), one
//! message per change, never a shell.
//!
//! Routes and proxy entries carry a protocol number of our own, so entries a
//! crashed previous run left behind are found and removed at start.
//!
//! Two safety nets: the whole pool has a blackhole route below the device
//! routes, so pool traffic is discarded rather than routed elsewhere when the
//! TUN device disappears; and every address is withdrawn while the gateway's
//! control-plane lease has run out ([`vpnnat::control::Lease`]), so that an
//! address the server moved to another gateway is never answered by two.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use anyhow::{Context as _, anyhow};
use vpnnat::gateway::Prefix;
use vpnnat_dataplane::netlink::{Netlink, sysctl};

use crate::garp;

/// The center-LAN interface.
#[derive(Debug, Clone)]
struct CenterIf {
    name: String,
    index: u32,
    mac: Option<[u8; 6]>,
}

/// Installs and removes the kernel state for NAT addresses.
pub struct Routes {
    netlink: Netlink,
    tun_index: u32,
    center: Option<CenterIf>,
    /// Addresses the gateway carries (from the data plane's events).
    target: BTreeSet<Ipv4Addr>,
    /// Addresses whose route and proxy entry are in place.
    installed: BTreeSet<Ipv4Addr>,
    /// The control-plane lease ran out: nothing is announced until the
    /// server's current document runs again ([`vpnnat::control::Lease`]).
    withdrawn: bool,
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
        let netlink = Netlink::connect()?;
        let tun_index = netlink.link_index("TUN device", tun_name).await?;
        // Replies from the sites arrive on the TUN device and are forwarded
        // to the center LAN: the input device decides (ip_route_input_slow).
        sysctl(&format!("net/ipv4/conf/{tun_name}/forwarding"), "1")?;
        // The pool is IPv4; keep the kernel's IPv6 chatter off the TUN device.
        let _ = sysctl(&format!("net/ipv6/conf/{tun_name}/disable_ipv6"), "1");
        // The whole pool leads to the TUN device too (below the /32s), so that a
        // packet for an address no site holds reaches the gateway and is
        // answered with ICMP host unreachable instead of leaving elsewhere.
        netlink
            .add_route(pool.addr(), pool.prefix_len(), tun_index)
            .await
            .map_err(|e| anyhow!("route {pool} dev {tun_name}: {e}"))?;
        // When the TUN device disappears, the kernel drops every route to it;
        // pool traffic must then be discarded here, never follow another
        // route (a default route toward the internet, or back to the center
        // LAN). The blackhole sits below the device routes and is left in
        // place at exit on purpose: a gateway host never forwards pool
        // traffic elsewhere, also while the gateway is stopped.
        netlink
            .add_blackhole(pool.addr(), pool.prefix_len())
            .await
            .map_err(|e| anyhow!("blackhole route {pool}: {e}"))?;
        let center = if center_if.is_empty() {
            None
        } else {
            let link = netlink
                .link(center_if)
                .await
                .with_context(|| format!("center.interface {center_if}"))?;
            // Technicians' packets to NAT addresses arrive here and are
            // forwarded; the kernel answers ARP from proxy entries only on a
            // forwarding interface (arp_process), and without proxy_delay.
            sysctl(&format!("net/ipv4/conf/{center_if}/forwarding"), "1")?;
            sysctl(&format!("net/ipv4/neigh/{center_if}/proxy_delay"), "0")?;
            Some(CenterIf {
                name: center_if.to_owned(),
                index: link.index,
                mac: link.mac,
            })
        };
        let mut routes = Self {
            netlink,
            tun_index,
            center,
            target: BTreeSet::new(),
            installed: BTreeSet::new(),
            withdrawn: false,
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

    /// Withdraws every address (`true`: the next [`Self::reconcile`] removes
    /// them all and installs none) or announces the wanted ones again.
    pub fn set_withdrawn(&mut self, withdrawn: bool) {
        self.withdrawn = withdrawn;
    }

    /// Whether the addresses are withdrawn.
    pub fn is_withdrawn(&self) -> bool {
        self.withdrawn
    }

    /// Brings the kernel in line with the wanted addresses: removals first
    /// (an address may move to another gateway), then additions. Failures
    /// are retried by the next call.
    ///
    /// # Errors
    /// One line per address that could not be installed or removed.
    pub async fn reconcile(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        let none = BTreeSet::new();
        let target = if self.withdrawn { &none } else { &self.target };
        let extra: Vec<Ipv4Addr> = self.installed.difference(target).copied().collect();
        let missing: Vec<Ipv4Addr> = target.difference(&self.installed).copied().collect();
        for ip in extra {
            if let Err(e) = self.remove(ip).await {
                errors.push(format!("{e:#}"));
            }
        }
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
        self.netlink
            .add_route(ip, 32, self.tun_index)
            .await
            .map_err(|e| anyhow!("route {ip}/32: {e}"))?;
        if let Some(center) = &self.center {
            self.netlink
                .add_proxy(center.index, ip)
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
        if let Some(center) = &self.center
            && let Err(e) = self.netlink.del_proxy(center.index, ip).await
        {
            first_error = Some(anyhow!("proxy ARP {ip} on {}: {e}", center.name));
        }
        if let Err(e) = self.netlink.del_route(ip, 32, self.tun_index).await
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
        for ip in self.netlink.our_proxies(center.index).await {
            tracing::info!(address = %ip, "removing a stale proxy-ARP entry");
            let _ = self.netlink.del_proxy(center.index, ip).await;
        }
    }
}
