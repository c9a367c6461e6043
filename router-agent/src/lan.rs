//! The LAN side in the kernel (packet mode): the TUN device, the routes that
//! bring the LAN's replies back into it (the center prefixes, and with
//! masquerade the masquerade address plus a proxy-ARP entry so that LAN hosts
//! find it), forwarding. Everything goes through the shared netlink helper
//! ([`vpnnat_dataplane::netlink`]) and carries our routing protocol number;
//! it is removed again at shutdown.
//!
//! Also: the LAN interface's address and prefix (both modes), and its link
//! state (failure reports).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow};
use vpnnat::gateway::Prefix;
use vpnnat_dataplane::netlink::{Netlink, sysctl};

/// Creates the TUN device, with offload when the kernel has it.
///
/// # Errors
/// When the device cannot be created (no root / `CAP_NET_ADMIN`, no /dev/net/tun).
pub fn create_tun(name: &str, mtu: u16) -> anyhow::Result<tun_rs::SyncDevice> {
    vpnnat_dataplane::tun::create(name, mtu, 1)
        .context("packet mode needs root or CAP_NET_ADMIN; try --netstack")?
        .pop()
        .context("no TUN queue")
}

/// The kernel state of packet mode.
pub struct KernelRoutes {
    netlink: Netlink,
    tun_index: u32,
    routes: Vec<Prefix>,
    proxy: Option<(u32, Ipv4Addr)>,
    sysctls: Sysctls,
}

/// Kernel settings the agent changed, with their values before: restored at
/// a clean shutdown. They are also written to a file in the state directory
/// before the change, so that after a `kill -9` the next run still knows
/// the value the host had before the agent (and restores that one).
#[derive(Debug)]
struct Sysctls {
    record: Option<PathBuf>,
    previous: BTreeMap<String, String>,
}

impl Sysctls {
    fn new(record: Option<PathBuf>) -> Self {
        // A record left by a run that did not stop cleanly holds the host's
        // own values.
        let previous = record
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        Self { record, previous }
    }

    /// Sets `key` (a /proc/sys path such as `net/ipv4/ip_forward`) to
    /// `value`, remembering what it was.
    fn set(&mut self, key: &str, value: &str) -> anyhow::Result<()> {
        let current = std::fs::read_to_string(format!("/proc/sys/{key}"))
            .map(|v| v.trim().to_owned())
            .with_context(|| format!("reading {key}"))?;
        if current == value {
            return Ok(());
        }
        if !self.previous.contains_key(key) {
            self.previous.insert(key.to_owned(), current);
            self.store();
        }
        sysctl(key, value)
    }

    fn store(&self) {
        let Some(path) = &self.record else { return };
        let write = || -> std::io::Result<()> {
            let json = serde_json::to_string(&self.previous)?;
            vpnnat_shell::keys::replace_private_file(path, json.as_bytes())
        };
        if let Err(e) = write() {
            tracing::warn!(path = %path.display(), error = %e, "previous kernel settings not recorded");
        }
    }

    /// Puts back every value changed: the global forwarding switch first
    /// (writing it resets every interface's), then the others.
    fn restore(&mut self) {
        let mut all: Vec<(String, String)> =
            std::mem::take(&mut self.previous).into_iter().collect();
        all.sort_by_key(|(k, _)| k != "net/ipv4/ip_forward");
        for (key, value) in all {
            match sysctl(&key, &value) {
                Ok(()) => tracing::info!(key, value, "kernel setting restored"),
                Err(e) => tracing::warn!(key, value, error = %e, "kernel setting not restored"),
            }
        }
        if let Some(path) = &self.record {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for Sysctls {
    /// Also on an error path (e.g. an interface missing half-way through
    /// the installation). Only a `kill -9` leaves them: the record then
    /// lets the next run restore the host's values.
    fn drop(&mut self) {
        if !self.previous.is_empty() {
            self.restore();
        }
    }
}

/// The record of changed kernel settings in the state directory.
pub const SYSCTL_RECORD: &str = "router-agent.sysctl.json";

impl std::fmt::Debug for KernelRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelRoutes")
            .field("tun_index", &self.tun_index)
            .field("routes", &self.routes)
            .field("proxy", &self.proxy)
            .field("sysctls", &self.sysctls)
            .finish_non_exhaustive()
    }
}

impl KernelRoutes {
    /// Routes `center` prefixes (and the masquerade address) into the TUN
    /// device `tun`, answers ARP for the masquerade address on `lan_if`, and
    /// turns on forwarding when `ip_forward`. Kernel settings it changes are
    /// recorded in `state_dir` and restored by [`Self::remove_all`].
    ///
    /// # Errors
    /// When netlink fails or an interface does not exist.
    pub async fn install(
        tun: &str,
        center: &[Prefix],
        masquerade: Option<(Ipv4Addr, &str)>,
        ip_forward: bool,
        state_dir: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let mut sysctls = Sysctls::new(state_dir.map(|d| d.join(SYSCTL_RECORD)));
        let netlink = Netlink::connect()?;
        let tun_index = netlink.link_index("TUN device", tun).await?;
        netlink
            .set_up(tun_index)
            .await
            .map_err(|e| anyhow!("setting {tun} up: {e}"))?;
        if ip_forward {
            sysctls.set("net/ipv4/ip_forward", "1")?;
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
            netlink,
            tun_index,
            routes: Vec::new(),
            proxy: None,
            sysctls,
        };
        let mut prefixes = center.to_vec();
        if let Some((addr, _)) = masquerade {
            prefixes.push(Prefix::new(addr, 32).expect("a /32 is a valid prefix"));
        }
        for p in prefixes {
            me.netlink
                .add_route(p.addr(), p.prefix_len(), tun_index)
                .await
                .map_err(|e| anyhow!("route {p} dev {tun}: {e}"))?;
            tracing::info!(prefix = %p, tun, "route into the tunnel installed");
            me.routes.push(p);
        }
        if let Some((addr, lan_if)) = masquerade {
            let index = me.netlink.link_index("lan.interface", lan_if).await?;
            // Proxy ARP answers only on a forwarding interface, for an address
            // routed out of another one (the /32 above), without delay.
            me.sysctls
                .set(&format!("net/ipv4/conf/{lan_if}/forwarding"), "1")?;
            me.sysctls
                .set(&format!("net/ipv4/neigh/{lan_if}/proxy_delay"), "0")?;
            me.netlink
                .add_proxy(index, addr)
                .await
                .map_err(|e| anyhow!("proxy ARP {addr} on {lan_if}: {e}"))?;
            tracing::info!(address = %addr, interface = lan_if, "answering ARP for the masquerade address");
            me.proxy = Some((index, addr));
        }
        Ok(me)
    }

    /// Removes every route and proxy entry installed and restores the
    /// kernel settings changed (clean shutdown).
    pub async fn remove_all(&mut self) {
        self.sysctls.restore();
        if let Some((index, addr)) = self.proxy.take()
            && let Err(e) = self.netlink.del_proxy(index, addr).await
        {
            tracing::warn!(address = %addr, error = %e, "removing the proxy-ARP entry");
        }
        for p in std::mem::take(&mut self.routes) {
            if let Err(e) = self
                .netlink
                .del_route(p.addr(), p.prefix_len(), self.tun_index)
                .await
            {
                tracing::debug!(prefix = %p, error = %e, "removing a route (gone with the device?)");
            }
        }
        tracing::info!("routes into the tunnel removed");
    }
}

/// The first IPv4 address of interface `name` and its prefix.
///
/// # Errors
/// When netlink fails, the interface does not exist or has no IPv4 address.
pub async fn interface_address(name: &str) -> anyhow::Result<(Ipv4Addr, Prefix)> {
    let netlink = Netlink::connect()?;
    let index = netlink.link_index("lan.interface", name).await?;
    let (addr, len) = netlink
        .first_ipv4_address(index)
        .await?
        .ok_or_else(|| anyhow!("lan.interface {name} has no IPv4 address"))?;
    let prefix = Prefix::new(addr, len).map_err(|e| anyhow!("{name}: {e}"))?;
    Ok((addr, prefix))
}

/// Whether the interface's link is up (`/sys/class/net/IF/carrier`); `None`
/// when it cannot be read (interface down or missing).
pub fn carrier(name: &str) -> Option<bool> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/carrier")).ok()?;
    Some(text.trim() == "1")
}
