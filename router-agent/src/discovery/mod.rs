//! Which computers are on the customer's LAN, for the page's list: the
//! kernel's neighbour table of `lan.interface` (`/proc/net/arp`), dnsmasq's
//! leases where this router serves DHCP, an ARP sweep of the LAN prefix on
//! the customer's demand, and host names from reverse mDNS and NetBIOS.
//!
//! Everything here stays on this router: addresses and MAC addresses are
//! shown on the page (the customer's own LAN) and never sent to the server.
//! A host the customer ticks is bound by its MAC address to a terminal name
//! (the name the server sees); [`crate::names::Names`] resolves that name to
//! wherever the MAC is now, and when the MAC shows up at a new address
//! (DHCP) during an open maintenance, [`run`] moves the NAT mappings of the
//! terminal there (`AgentState::move_terminal`): the technician keeps the
//! NAT address.
//!
//! Bounded: at most `discovery.max_hosts` hosts, a few addresses remembered
//! per MAC, `max_name_queries` name queries per round; a sweep covers at
//! most a /22 at `sweep_rate` datagrams per second. Malformed input is
//! dropped and counted ([`Counters`]).

pub mod parse;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use vpnnat::gateway::Prefix;
use vpnnat::messages::{TerminalName, UnixMillis};

pub use self::parse::Mac;
use crate::app::App;
use crate::settings;

/// The state file (mode 0600) in `agent.state_dir`.
pub const FILE: &str = "router-agent.discovery.json";
/// The widest prefix a sweep covers (1022 addresses).
pub const MAX_SWEEP_PREFIX_LEN: u8 = 22;
/// Addresses remembered per MAC (a host that moved leaves stale entries).
const ADDRESSES_PER_MAC: usize = 8;
/// A host that did not answer a name query is asked again after this long.
const ASK_AGAIN: Duration = Duration::from_secs(300);
/// The discard service (RFC 863): a sweep's datagram goes there.
const DISCARD_PORT: u16 = 9;
const MDNS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(224, 0, 0, 251)), 5353);
const NETBIOS_NS_PORT: u16 = 137;
/// The longest name the customer may give a host.
pub const MAX_NAME: usize = 63;

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Neighbour-table lines that did not parse.
    pub neighbour_malformed: AtomicU64,
    /// Leases-file lines that did not parse.
    pub lease_malformed: AtomicU64,
    /// Replies to name queries that did not parse.
    pub reply_malformed: AtomicU64,
    /// Hosts dropped because the table was full.
    pub table_full: AtomicU64,
    /// Sweeps started.
    pub sweeps: AtomicU64,
    /// Datagrams sent by sweeps.
    pub sweep_probes: AtomicU64,
    /// Host names learnt from mDNS or NetBIOS.
    pub names_found: AtomicU64,
    /// Mappings moved to a terminal's new address.
    pub moves: AtomicU64,
}

impl Counters {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// (metric name suffix, help, value) of each counter.
    pub fn samples(&self) -> [(&'static str, &'static str, u64); 8] {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            (
                "discovery_neighbour_malformed_total",
                "Neighbour-table lines dropped as malformed.",
                g(&self.neighbour_malformed),
            ),
            (
                "discovery_lease_malformed_total",
                "Leases-file lines dropped as malformed.",
                g(&self.lease_malformed),
            ),
            (
                "discovery_reply_malformed_total",
                "mDNS/NetBIOS replies dropped as malformed.",
                g(&self.reply_malformed),
            ),
            (
                "discovery_table_full_total",
                "Hosts not listed because the table was full.",
                g(&self.table_full),
            ),
            (
                "discovery_sweeps_total",
                "ARP sweeps of the LAN prefix.",
                g(&self.sweeps),
            ),
            (
                "discovery_sweep_probes_total",
                "Datagrams sent by sweeps.",
                g(&self.sweep_probes),
            ),
            (
                "discovery_names_found_total",
                "Host names learnt from mDNS or NetBIOS.",
                g(&self.names_found),
            ),
            (
                "discovery_moves_total",
                "Mappings moved to a terminal's new address.",
                g(&self.moves),
            ),
        ]
    }
}

/// One host as the page lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostView {
    /// The MAC address (the page's key for the host).
    pub mac: Mac,
    /// Its current address.
    pub address: Ipv4Addr,
    /// What the page shows: the customer's name, else the discovered one.
    pub name: Option<String>,
    /// The customer's name for it.
    pub custom_name: Option<String>,
    /// From mDNS, NetBIOS or the DHCP lease.
    pub discovered_name: Option<String>,
    /// `mdns`, `netbios` or `dhcp`.
    pub name_source: Option<&'static str>,
    /// When it was last in the neighbour table or a lease.
    pub last_seen: UnixMillis,
    /// The terminal name it is bound to (once ticked for a request).
    pub terminal: Option<TerminalName>,
}

#[derive(Debug, Clone)]
struct Host {
    address: Ipv4Addr,
    /// Addresses present in the last round, with the round each first appeared.
    present: BTreeMap<Ipv4Addr, u64>,
    discovered_name: Option<String>,
    name_source: Option<&'static str>,
    last_seen: UnixMillis,
    asked: Option<Instant>,
}

/// A terminal bound to a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Binding {
    mac: Mac,
    /// Where the MAC was last seen (resolves after a restart, before the
    /// first read of the neighbour table).
    address: Ipv4Addr,
}

/// What survives a restart.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct Stored {
    /// The customer's names, by MAC address.
    names: BTreeMap<Mac, String>,
    /// Terminals bound to MAC addresses.
    bindings: BTreeMap<TerminalName, Binding>,
}

#[derive(Debug, Default)]
struct Inner {
    hosts: BTreeMap<Mac, Host>,
    stored: Stored,
    round: u64,
    last_sweep: Option<Instant>,
    sweeping: bool,
}

/// Why a host cannot be renamed or bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    /// No host with this MAC address is listed.
    #[error("no computer with the MAC address {0} is listed")]
    Unknown(Mac),
    /// The name is not acceptable.
    #[error("the name must be at most {MAX_NAME} printable characters")]
    BadName,
    /// The host's address is not one a terminal may have.
    #[error("{0} is not an allowed LAN address")]
    NotAllowed(Ipv4Addr),
    /// A sweep is not possible now.
    #[error("{0}")]
    Sweep(String),
    /// The sweep ran less than `sweep_min_interval_s` ago.
    #[error("the network was searched a moment ago; please wait {0} s")]
    TooSoon(u64),
}

/// The discovered hosts. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Discovery {
    settings: settings::Discovery,
    interface: String,
    allowed: Vec<Prefix>,
    lan_prefix: Option<Prefix>,
    own: Option<Ipv4Addr>,
    file: Option<PathBuf>,
    inner: Mutex<Inner>,
    /// Wakes [`run`] for a read now (after a sweep).
    wake: tokio::sync::Notify,
    /// Counters.
    pub counters: Counters,
}

impl Discovery {
    /// Discovery on `interface` (the LAN), keeping hosts inside `allowed`
    /// (the LAN prefix when empty), never `own` (the agent's LAN address);
    /// `file` holds the customer's names and the bindings.
    pub fn new(
        settings: &crate::settings::Settings,
        own: Option<Ipv4Addr>,
        lan_prefix: Option<Prefix>,
        file: Option<PathBuf>,
    ) -> Self {
        let stored = file
            .as_ref()
            .and_then(|p| match std::fs::read_to_string(p) {
                Ok(t) => match serde_json::from_str::<Stored>(&t) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::warn!(path = %p.display(), error = %e, "discovery state not read; starting empty");
                        None
                    }
                },
                Err(_) => None,
            })
            .unwrap_or_default();
        Self {
            settings: settings.discovery.clone(),
            interface: settings.lan.interface.clone(),
            allowed: if settings.lan.allowed_prefixes.is_empty() {
                lan_prefix.into_iter().collect()
            } else {
                settings.lan.allowed_prefixes.clone()
            },
            lan_prefix,
            own,
            file,
            inner: Mutex::new(Inner {
                stored,
                ..Inner::default()
            }),
            wake: tokio::sync::Notify::new(),
            counters: Counters::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a host at `a` is listed: the rule of
    /// [`crate::names::Names::allowed`] (unicast, inside the allowed
    /// prefixes, loopback only when a prefix names it), and never the
    /// agent's own LAN address.
    fn keeps(&self, a: Ipv4Addr) -> bool {
        if Some(a) == self.own || a.is_unspecified() || a.is_multicast() || a.is_broadcast() {
            return false;
        }
        self.allowed
            .iter()
            .any(|p| p.contains(a) && (!a.is_loopback() || p.prefix_len() > 0))
    }

    fn store(&self, stored: &Stored) {
        let Some(path) = &self.file else { return };
        let write = serde_json::to_string_pretty(stored)
            .map_err(std::io::Error::other)
            .and_then(|json| vpnnat_shell::keys::replace_private_file(path, json.as_bytes()));
        if let Err(e) = write {
            tracing::warn!(path = %path.display(), error = %e, "discovery state not stored");
        }
    }

    /// Takes one round of observations: the neighbour table's entries (of
    /// the LAN interface) and the leases. Returns the terminals whose MAC
    /// now has another address (their mappings must move), and the bound
    /// terminals whose MAC was not seen at all (a sweep may find where it went).
    pub fn observe(
        &self,
        neighbours: &[(Ipv4Addr, Mac)],
        leases: &[parse::Lease],
        now: UnixMillis,
    ) -> (Vec<(TerminalName, Ipv4Addr)>, Vec<TerminalName>) {
        let mut guard = self.lock();
        let g = &mut *guard;
        g.round += 1;
        let round = g.round;
        let mut present: BTreeMap<Mac, Vec<Ipv4Addr>> = BTreeMap::new();
        let mut lease_names: BTreeMap<Mac, String> = BTreeMap::new();
        let now_s = now.0 / 1000;
        for (a, mac) in neighbours {
            if self.keeps(*a) && mac.is_host() {
                present.entry(*mac).or_default().push(*a);
            }
        }
        for l in leases {
            if (l.expiry != 0 && l.expiry < now_s) || !self.keeps(l.address) || !l.mac.is_host() {
                continue;
            }
            let v = present.entry(l.mac).or_default();
            if !v.contains(&l.address) {
                v.push(l.address);
            }
            if let Some(h) = l.hostname.as_deref().and_then(parse::terminal_like) {
                lease_names.insert(l.mac, h);
            }
        }
        for (mac, h) in &mut g.hosts {
            if !present.contains_key(mac) {
                h.present.clear();
            }
        }
        let max = self.settings.max_hosts;
        for (mac, addrs) in &present {
            if !g.hosts.contains_key(mac) && g.hosts.len() >= max {
                // Full: the host seen least recently gives way, unless it
                // is still there or bound to a terminal.
                let bound: Vec<Mac> = g.stored.bindings.values().map(|b| b.mac).collect();
                let oldest = g
                    .hosts
                    .iter()
                    .filter(|(m, h)| h.present.is_empty() && !bound.contains(m))
                    .min_by_key(|(_, h)| h.last_seen)
                    .map(|(m, _)| *m);
                match oldest {
                    Some(m) => {
                        g.hosts.remove(&m);
                    }
                    None => {
                        Counters::add(&self.counters.table_full, 1);
                        continue;
                    }
                }
            }
            let h = g.hosts.entry(*mac).or_insert_with(|| Host {
                address: addrs[0],
                present: BTreeMap::new(),
                discovered_name: None,
                name_source: None,
                last_seen: now,
                asked: None,
            });
            h.present.retain(|a, _| addrs.contains(a));
            for a in addrs.iter().take(ADDRESSES_PER_MAC) {
                h.present.entry(*a).or_insert(round);
            }
            // A MAC at several addresses: the kernel still lists the one it
            // left (a stale entry ages out later); the address that
            // appeared last is where the host is now.
            if let Some((a, _)) = h
                .present
                .iter()
                .max_by_key(|(a, first)| (**first, **a == h.address))
            {
                h.address = *a;
            }
            h.last_seen = now;
            if let Some(n) = lease_names.get(mac)
                && h.name_source.is_none_or(|s| s == "dhcp")
            {
                h.discovered_name = Some(n.clone());
                h.name_source = Some("dhcp");
            }
        }
        let mut moves = Vec::new();
        let mut missing = Vec::new();
        let hosts = &g.hosts;
        let mut changed = false;
        let mut bindings = std::mem::take(&mut g.stored.bindings);
        for (name, b) in &mut bindings {
            match hosts.get(&b.mac) {
                Some(h) if !h.present.is_empty() => {
                    if h.address != b.address {
                        b.address = h.address;
                        moves.push((name.clone(), h.address));
                        changed = true;
                    }
                }
                _ => missing.push(name.clone()),
            }
        }
        g.stored.bindings = bindings;
        if changed {
            self.store(&g.stored);
        }
        (moves, missing)
    }

    /// The hosts, by address.
    pub fn hosts(&self) -> Vec<HostView> {
        let g = self.lock();
        let mut v: Vec<HostView> = g
            .hosts
            .iter()
            .map(|(mac, h)| {
                let custom = g.stored.names.get(mac).cloned();
                HostView {
                    mac: *mac,
                    address: h.address,
                    name: custom.clone().or_else(|| h.discovered_name.clone()),
                    custom_name: custom,
                    discovered_name: h.discovered_name.clone(),
                    name_source: h.name_source,
                    last_seen: h.last_seen,
                    terminal: g
                        .stored
                        .bindings
                        .iter()
                        .find(|(_, b)| b.mac == *mac)
                        .map(|(n, _)| n.clone()),
                }
            })
            .collect();
        v.sort_by_key(|h| h.address);
        v
    }

    /// The customer names the host `mac` (empty: forget the name). Kept in
    /// the state directory.
    ///
    /// # Errors
    /// An unknown host or an unacceptable name.
    pub fn rename(&self, mac: Mac, name: &str) -> Result<HostView, DiscoveryError> {
        let name = name.trim();
        if name.chars().count() > MAX_NAME || name.chars().any(char::is_control) {
            return Err(DiscoveryError::BadName);
        }
        {
            let mut g = self.lock();
            if !g.hosts.contains_key(&mac) {
                return Err(DiscoveryError::Unknown(mac));
            }
            if name.is_empty() {
                g.stored.names.remove(&mac);
            } else {
                g.stored.names.insert(mac, name.to_owned());
            }
            self.store(&g.stored);
        }
        tracing::info!(%mac, "the customer named a discovered host");
        self.hosts()
            .into_iter()
            .find(|h| h.mac == mac)
            .ok_or(DiscoveryError::Unknown(mac))
    }

    /// The terminal name for the host `mac` (ticked on the page): its
    /// binding when it has one, else a new binding under the customer's
    /// name for it, its discovered name, or `lan-pc`, made unique against
    /// `taken` (configured terminals, aliases) and the other bindings.
    ///
    /// # Errors
    /// An unknown host, or one outside the allowed prefixes.
    pub fn bind(
        &self,
        mac: Mac,
        taken: impl Fn(&TerminalName) -> bool,
    ) -> Result<(TerminalName, Ipv4Addr), DiscoveryError> {
        let mut guard = self.lock();
        let g = &mut *guard;
        let Some(h) = g.hosts.get(&mac) else {
            return Err(DiscoveryError::Unknown(mac));
        };
        let address = h.address;
        let discovered = h.discovered_name.clone();
        if !self.keeps(address) {
            return Err(DiscoveryError::NotAllowed(address));
        }
        if let Some((n, b)) = g.stored.bindings.iter_mut().find(|(_, b)| b.mac == mac) {
            let n = n.clone();
            if b.address != address {
                b.address = address;
                self.store(&g.stored);
            }
            return Ok((n, address));
        }
        let base = g
            .stored
            .names
            .get(&mac)
            .and_then(|n| parse::terminal_like(n))
            .or(discovered)
            .unwrap_or_else(|| "lan-pc".to_owned());
        let free = |n: &TerminalName| !taken(n) && !g.stored.bindings.contains_key(n);
        let name = (1..=10_000)
            .filter_map(|i| {
                let s = if i == 1 {
                    base.clone()
                } else {
                    let suffix = format!("-{i}");
                    let keep = base.len().min(TerminalName::MAX_LEN - suffix.len());
                    format!("{}{suffix}", &base[..keep])
                };
                TerminalName::new(s).ok()
            })
            .find(free)
            .ok_or(DiscoveryError::BadName)?;
        g.stored
            .bindings
            .insert(name.clone(), Binding { mac, address });
        self.store(&g.stored);
        tracing::info!(terminal = %name, %mac, "terminal bound to a discovered host");
        Ok((name, address))
    }

    /// Where the host bound to `name` is now (or was last seen).
    pub fn bound(&self, name: &TerminalName) -> Option<Ipv4Addr> {
        self.lock().stored.bindings.get(name).map(|b| b.address)
    }

    /// The addresses of hosts without a name not asked recently (at most
    /// `max`); marks them asked.
    fn to_ask(&self, max: usize) -> Vec<Ipv4Addr> {
        let mut g = self.lock();
        let now = Instant::now();
        let mut out = Vec::new();
        for h in g.hosts.values_mut() {
            if out.len() >= max {
                break;
            }
            if h.discovered_name.is_none()
                && !h.present.is_empty()
                && h.asked.is_none_or(|t| now.duration_since(t) >= ASK_AGAIN)
            {
                h.asked = Some(now);
                out.push(h.address);
            }
        }
        out
    }

    fn found_name(&self, address: Ipv4Addr, name: &str, source: &'static str) {
        let Some(name) = parse::terminal_like(name) else {
            Counters::add(&self.counters.reply_malformed, 1);
            return;
        };
        let mut g = self.lock();
        if let Some(h) = g.hosts.values_mut().find(|h| h.address == address)
            && h.discovered_name.is_none()
        {
            tracing::debug!(%address, %name, source, "host name learnt");
            h.discovered_name = Some(name);
            h.name_source = Some(source);
            Counters::add(&self.counters.names_found, 1);
        }
    }

    /// Whether the page may offer the sweep (on, and a LAN small enough),
    /// and whether one runs.
    pub fn sweep_state(&self) -> (bool, bool) {
        let possible = self.settings.sweep
            && self
                .lan_prefix
                .is_some_and(|p| p.prefix_len() >= MAX_SWEEP_PREFIX_LEN);
        (possible, self.lock().sweeping)
    }

    /// The addresses a sweep probes now, or why not (never two at once, nor
    /// sooner than `sweep_min_interval_s` after the last).
    fn start_sweep(&self) -> Result<Vec<Ipv4Addr>, DiscoveryError> {
        if !self.settings.sweep {
            return Err(DiscoveryError::Sweep(
                "searching the network is turned off here (discovery.sweep)".to_owned(),
            ));
        }
        let Some(prefix) = self.lan_prefix else {
            return Err(DiscoveryError::Sweep(
                "the LAN prefix is unknown (lan.interface)".to_owned(),
            ));
        };
        if prefix.prefix_len() < MAX_SWEEP_PREFIX_LEN {
            return Err(DiscoveryError::Sweep(format!(
                "the LAN {prefix} is larger than a /{MAX_SWEEP_PREFIX_LEN}; searching it is not bounded enough"
            )));
        }
        let mut g = self.lock();
        let min = Duration::from_secs(self.settings.sweep_min_interval_s);
        if g.sweeping {
            return Err(DiscoveryError::TooSoon(min.as_secs().max(1)));
        }
        if let Some(t) = g.last_sweep
            && t.elapsed() < min
        {
            return Err(DiscoveryError::TooSoon(
                (min - t.elapsed()).as_secs().max(1),
            ));
        }
        g.last_sweep = Some(Instant::now());
        g.sweeping = true;
        drop(g);
        Ok(hosts_of(prefix).filter(|a| self.keeps(*a)).collect())
    }

    /// Starts a sweep in the background; returns how many addresses it probes.
    ///
    /// # Errors
    /// Turned off, an unknown or too large LAN, or too soon after the last one.
    pub fn sweep(self: &Arc<Self>) -> Result<usize, DiscoveryError> {
        let targets = self.start_sweep()?;
        let n = targets.len();
        Counters::add(&self.counters.sweeps, 1);
        tracing::info!(addresses = n, "searching the LAN (ARP sweep)");
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.run_sweep(targets).await {
                tracing::warn!(error = %e, "sweep stopped");
            }
            me.lock().sweeping = false;
            me.wake.notify_one();
        });
        Ok(n)
    }

    /// One empty UDP datagram to the discard port of each address, paced at
    /// `sweep_rate` per second.
    ///
    /// Why UDP and not ARP requests from an `AF_PACKET` socket: the kernel
    /// resolves the address by ARP itself before the datagram can leave, with
    /// its own retries and rate limits, and files the answer in the
    /// neighbour table that discovery reads anyway. That works without
    /// `CAP_NET_RAW` (netstack mode runs without privileges), on any link
    /// type the kernel handles, and needs no Ethernet framing here. Hosts that
    /// answer ARP but drop the datagram are found all the same.
    async fn run_sweep(&self, targets: Vec<Ipv4Addr>) -> std::io::Result<()> {
        let socket =
            tokio::net::UdpSocket::bind((self.own.unwrap_or(Ipv4Addr::UNSPECIFIED), 0)).await?;
        let gap = Duration::from_secs(1) / self.settings.sweep_rate.max(1);
        let mut tick = tokio::time::interval(gap);
        for a in targets {
            tick.tick().await;
            // Unreachable hosts and full queues are expected; the
            // neighbour table tells who answered.
            let _ = socket.send_to(&[], (a, DISCARD_PORT)).await;
            Counters::add(&self.counters.sweep_probes, 1);
        }
        // ARP answers (and the kernel's retries, 1 s apart) arrive after the
        // last datagram left.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Ok(())
    }

    /// Asks the hosts `targets` for their names by reverse mDNS and NetBIOS
    /// (whichever is on), waits `name_timeout_ms`, and files the answers.
    async fn ask_names(&self, targets: &[Ipv4Addr]) {
        if targets.is_empty() || !(self.settings.mdns || self.settings.netbios) {
            return;
        }
        let bind = self.own.unwrap_or(Ipv4Addr::UNSPECIFIED);
        let mdns = if self.settings.mdns {
            mdns_socket(bind).ok()
        } else {
            None
        };
        let netbios = if self.settings.netbios {
            tokio::net::UdpSocket::bind((bind, 0)).await.ok()
        } else {
            None
        };
        let ids: BTreeMap<Ipv4Addr, u16> = targets
            .iter()
            .enumerate()
            .map(|(i, a)| {
                (
                    *a,
                    u16::try_from(i).unwrap_or(u16::MAX) ^ rand::random::<u16>(),
                )
            })
            .collect();
        for (a, id) in &ids {
            if let Some(s) = &mdns {
                let _ = s.send_to(&parse::mdns_ptr_query(*id, *a), MDNS).await;
            }
            if let Some(s) = &netbios {
                let _ = s
                    .send_to(&parse::netbios_status_query(*id), (*a, NETBIOS_NS_PORT))
                    .await;
            }
        }
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.settings.name_timeout_ms);
        let mut buf = vec![0u8; 1500];
        let mut buf2 = vec![0u8; 1500];
        loop {
            let got = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    r = recv(mdns.as_ref(), &mut buf) => r.map(|(n, from)| (true, n, from)),
                    r = recv(netbios.as_ref(), &mut buf2) => r.map(|(n, from)| (false, n, from)),
                }
            })
            .await;
            let Ok(Ok((is_mdns, n, from))) = got else {
                break;
            };
            let std::net::IpAddr::V4(src) = from.ip() else {
                continue;
            };
            let Some(id) = ids.get(&src) else { continue };
            let name = if is_mdns {
                parse::mdns_ptr_reply(&buf[..n], src).map(|n| (n, "mdns"))
            } else {
                parse::netbios_status_reply(&buf2[..n], *id).map(|n| (n, "netbios"))
            };
            match name {
                Some((name, source)) => self.found_name(src, &name, source),
                None => Counters::add(&self.counters.reply_malformed, 1),
            }
        }
    }

    /// Reads the neighbour table and the leases file once (each at most
    /// [`MAX_READ`] bytes).
    fn read(&self) -> (Vec<(Ipv4Addr, Mac)>, Vec<parse::Lease>) {
        let neighbours = match read_bounded(std::path::Path::new("/proc/net/arp")) {
            Ok(text) => {
                let p = parse::proc_net_arp(&text);
                Counters::add(&self.counters.neighbour_malformed, p.malformed);
                p.entries
                    .into_iter()
                    .filter(|n| self.interface.is_empty() || n.device == self.interface)
                    .map(|n| (n.address, n.mac))
                    .collect()
            }
            Err(e) => {
                tracing::debug!(error = %e, "/proc/net/arp not read");
                Vec::new()
            }
        };
        let leases = if self.settings.leases_file.as_os_str().is_empty() {
            Vec::new()
        } else {
            match read_bounded(&self.settings.leases_file) {
                Ok(text) => {
                    let p = parse::dnsmasq_leases(&text);
                    Counters::add(&self.counters.lease_malformed, p.malformed);
                    p.entries
                }
                Err(e) => {
                    tracing::debug!(path = %self.settings.leases_file.display(), error = %e, "leases file not read");
                    Vec::new()
                }
            }
        };
        (neighbours, leases)
    }
}

/// The most of a neighbour table or leases file that is read (the rest of a
/// larger file is ignored: a /22 LAN's table or leases are far smaller).
const MAX_READ: u64 = 4 << 20;

fn read_bounded(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_READ)
        .read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

async fn recv(
    s: Option<&tokio::net::UdpSocket>,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr)> {
    match s {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// A UDP socket for mDNS queries: multicast leaves by the LAN address's
/// interface (there may be no route for 224.0.0.0/4), with TTL 255 as RFC
/// 6762 §11 asks; answers come back by unicast to its port (§5.4, §6.7).
fn mdns_socket(bind: Ipv4Addr) -> std::io::Result<tokio::net::UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::from((bind, 0)).into())?;
    if !bind.is_unspecified() {
        s.set_multicast_if_v4(&bind)?;
    }
    s.set_multicast_ttl_v4(255)?;
    s.set_multicast_loop_v4(false)?;
    tokio::net::UdpSocket::from_std(s.into())
}

/// The host addresses of `p` (without network and broadcast addresses
/// where the prefix has them).
fn hosts_of(p: Prefix) -> impl Iterator<Item = Ipv4Addr> {
    let net = u32::from(p.network());
    let size = 1u64 << (32 - u32::from(p.prefix_len()));
    let (first, last) = if size > 2 {
        (1, size - 2)
    } else {
        (0, size - 1)
    };
    (first..=last).map(move |i| Ipv4Addr::from(net.wrapping_add(i as u32)))
}

/// Reads the LAN every `refresh_s` (and after a sweep), follows bound
/// terminals to their new addresses, asks new hosts for their names.
/// Runs until `shutdown` turns true.
pub async fn run(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let Some(d) = app.discovery.clone() else {
        return;
    };
    let every = Duration::from_secs(d.settings.refresh_s);
    loop {
        let (neighbours, leases) = d.read();
        let (moves, missing) = d.observe(&neighbours, &leases, crate::dataplane::wall_now());
        for (terminal, address) in moves {
            match app.dataplane.move_terminal(terminal.clone(), address).await {
                Ok(n) => {
                    Counters::add(&d.counters.moves, n as u64);
                    tracing::info!(terminal = %terminal, moved = n, "terminal changed its LAN address; its mappings follow");
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "data plane gone");
                    return;
                }
            }
        }
        if !missing.is_empty() && has_open_mapping(&app, &missing).await {
            // A ticked computer is open to a technician and gone from where
            // it was: a sweep finds its new address (not sooner than the
            // customer's own sweeps may run).
            match d.sweep() {
                Ok(n) => tracing::info!(
                    addresses = n,
                    "a bound terminal is gone from its address; searching the LAN"
                ),
                Err(e) => tracing::debug!(error = %e, "no sweep for the missing terminal"),
            }
        }
        let ask = d.to_ask(d.settings.max_name_queries);
        d.ask_names(&ask).await;
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = d.wake.notified() => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

/// Whether one of `terminals` is mapped now (open to a technician).
async fn has_open_mapping(app: &App, terminals: &[TerminalName]) -> bool {
    let Ok(snap) = app.dataplane.snapshot().await else {
        return false;
    };
    snap.mappings
        .iter()
        .any(|m| terminals.contains(&m.terminal))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::settings::Settings;

    const PC: Mac = Mac([2, 0, 0, 0, 1, 10]);
    const NAS: Mac = Mac([2, 0, 0, 0, 1, 11]);

    fn ip(d: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 1, d)
    }

    fn discovery(file: Option<PathBuf>, max_hosts: usize) -> Discovery {
        let mut s = Settings::default();
        s.lan.interface = "lan0".into();
        s.discovery.max_hosts = max_hosts;
        Discovery::new(&s, Some(ip(1)), Some(Prefix::new(ip(0), 24).unwrap()), file)
    }

    #[test]
    fn hosts_are_listed_bounded_and_only_inside_the_lan() {
        let d = discovery(None, 2);
        let (moves, missing) = d.observe(
            &[
                (ip(10), PC),
                (ip(1), Mac([2, 0, 0, 0, 0, 1])),
                (Ipv4Addr::new(198, 51, 100, 1), Mac([2, 0, 0, 0, 0, 2])),
                (ip(11), NAS),
                (ip(12), Mac([2, 0, 0, 0, 1, 12])),
                (ip(13), Mac([1, 0, 0x5e, 0, 0, 1])),
            ],
            &[],
            UnixMillis(1000),
        );
        assert!(moves.is_empty() && missing.is_empty());
        let h = d.hosts();
        assert_eq!(
            h.iter().map(|h| h.address).collect::<Vec<_>>(),
            [ip(10), ip(11)],
            "not the router itself, nothing outside the LAN, at most 2"
        );
        assert_eq!(d.counters.table_full.load(Ordering::Relaxed), 1);
        assert_eq!(h[0].last_seen, UnixMillis(1000));
        // Full: a host gone from the table gives way to a new one; a bound
        // one does not.
        d.bind(PC, |_| false).unwrap();
        d.observe(&[(ip(30), Mac([2, 0, 0, 0, 1, 30]))], &[], UnixMillis(2000));
        let h: Vec<Ipv4Addr> = d.hosts().iter().map(|h| h.address).collect();
        assert_eq!(h, [ip(10), ip(30)], "the NAS went, the bound PC stayed");
        d.observe(&[(ip(31), Mac([2, 0, 0, 0, 1, 31]))], &[], UnixMillis(3000));
        assert_eq!(d.hosts().len(), 2);
        assert!(d.hosts().iter().any(|h| h.address == ip(31)));
    }

    #[test]
    fn leases_add_hosts_and_names_unless_expired() {
        let d = discovery(None, 16);
        let lease = |mac, a, exp, name: &str| parse::Lease {
            expiry: exp,
            mac,
            address: a,
            hostname: Some(name.to_owned()),
        };
        d.observe(
            &[],
            &[lease(PC, ip(50), 0, "Till-2"), lease(NAS, ip(51), 1, "old")],
            UnixMillis(10_000_000),
        );
        let h = d.hosts();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].name.as_deref(), Some("till-2"));
        assert_eq!(h[0].name_source, Some("dhcp"));
    }

    #[test]
    fn customer_names_and_bindings_survive_a_restart_and_follow_the_mac() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(FILE);
        let d = discovery(Some(file.clone()), 16);
        d.observe(&[(ip(10), PC), (ip(11), NAS)], &[], UnixMillis(1));
        assert_eq!(
            d.rename(Mac([9, 0, 0, 0, 0, 0]), "x").unwrap_err(),
            DiscoveryError::Unknown(Mac([9, 0, 0, 0, 0, 0]))
        );
        assert_eq!(d.rename(PC, "a\nb").unwrap_err(), DiscoveryError::BadName);
        assert_eq!(
            d.rename(PC, &"x".repeat(64)).unwrap_err(),
            DiscoveryError::BadName
        );
        let v = d.rename(PC, "Anna's PC").unwrap();
        assert_eq!(v.name.as_deref(), Some("Anna's PC"));
        // Bound under a terminal-like form of the customer's name, unique.
        let taken = |n: &TerminalName| n.as_str() == "anna-s-pc";
        let (name, addr) = d.bind(PC, taken).unwrap();
        assert_eq!((name.as_str(), addr), ("anna-s-pc-2", ip(10)));
        assert_eq!(d.bind(PC, taken).unwrap().0, name, "stable");
        let (nas, _) = d.bind(NAS, |_| false).unwrap();
        assert_eq!(nas.as_str(), "lan-pc");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&file).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);

        // Restart: the name and the binding are still there, the binding
        // resolves before the first read.
        let d = discovery(Some(file.clone()), 16);
        assert_eq!(d.bound(&name), Some(ip(10)));
        d.observe(&[(ip(10), PC)], &[], UnixMillis(2));
        assert_eq!(d.hosts()[0].name.as_deref(), Some("Anna's PC"));
        assert_eq!(d.hosts()[0].terminal.as_ref(), Some(&name));
        // DHCP gave the PC another address; the old entry lingers (stale).
        let (moves, missing) = d.observe(&[(ip(10), PC), (ip(77), PC)], &[], UnixMillis(3));
        assert_eq!(moves, vec![(name.clone(), ip(77))]);
        assert_eq!(missing, vec![nas.clone()], "the NAS is bound and not seen");
        assert_eq!(d.bound(&name), Some(ip(77)));
        // The next round with both entries keeps the new address.
        let (moves, _) = d.observe(&[(ip(10), PC), (ip(77), PC)], &[], UnixMillis(4));
        assert!(moves.is_empty());
        assert_eq!(discovery(Some(file), 16).bound(&name), Some(ip(77)));
    }

    #[test]
    fn a_sweep_is_bounded_and_rate_limited() {
        let d = discovery(None, 16);
        let t = d.start_sweep().unwrap();
        assert_eq!(
            t.len(),
            253,
            "a /24 without network, broadcast and the router"
        );
        assert!(!t.contains(&ip(1)));
        d.lock().sweeping = false;
        assert!(matches!(d.start_sweep(), Err(DiscoveryError::TooSoon(_))));
        let mut s = Settings::default();
        s.lan.interface = "lan0".into();
        let wide = Discovery::new(
            &s,
            None,
            Some(Prefix::new(Ipv4Addr::new(10, 0, 0, 0), 16).unwrap()),
            None,
        );
        assert!(matches!(wide.start_sweep(), Err(DiscoveryError::Sweep(m)) if m.contains("/22")));
        let edge = Discovery::new(
            &s,
            None,
            Some(Prefix::new(Ipv4Addr::new(10, 0, 0, 0), 22).unwrap()),
            None,
        );
        assert_eq!(edge.start_sweep().unwrap().len(), 1022);
        s.discovery.sweep = false;
        let off = Discovery::new(&s, None, Some(Prefix::new(ip(0), 24).unwrap()), None);
        assert!(matches!(off.start_sweep(), Err(DiscoveryError::Sweep(_))));
    }

    #[test]
    fn a_corrupt_state_file_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(FILE);
        std::fs::write(&file, "{not json").unwrap();
        let d = discovery(Some(file), 16);
        assert!(d.hosts().is_empty());
    }
}
