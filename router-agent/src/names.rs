//! Terminal names → real LAN addresses, on the agent only (`docs/DESIGN.md`,
//! Roles: the server never learns real addresses).
//!
//! Order: the configured `[[terminals]]` table, the agent itself (`router`),
//! terminals bound to a discovered host's MAC address (wherever it is now,
//! `discovery`), aliases of addresses the customer typed, then DNS. A typed address gets a
//! local alias name (`lan-host-N`, kept in the state directory so that it
//! still resolves after a restart); the alias is what the server sees.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vpnnat::gateway::Prefix;
use vpnnat::messages::TerminalName;

use crate::discovery::{Discovery, DiscoveryError, Mac};
use crate::settings::Settings;

/// The name under which the agent's own LAN address is known.
pub const ROUTER: &str = "router";
const DNS_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a name or typed address cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Neither a valid name nor an address.
    #[error("{0:?} is neither a terminal name nor an IPv4 address")]
    Invalid(String),
    /// The name does not resolve (table, aliases, DNS).
    #[error("{0} cannot be found on the LAN (not in the terminal list and no DNS answer)")]
    Unresolved(String),
    /// The address is one of the agent host's own: relaying to it would
    /// open the router itself (its page, its services) to the center.
    #[error(
        "{name} resolves to {addr}, an address of this router itself; \
         the agent never opens its own host to the center"
    )]
    OwnAddress {
        /// What was asked.
        name: String,
        /// What it resolved to.
        addr: Ipv4Addr,
    },
    /// The address is not one a terminal may have.
    #[error("{name} resolves to {addr}, which is not an allowed LAN address")]
    NotAllowed {
        /// What was asked.
        name: String,
        /// What it resolved to.
        addr: Ipv4Addr,
    },
}

/// The resolver. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Names {
    table: BTreeMap<TerminalName, Ipv4Addr>,
    dns_only: Vec<TerminalName>,
    router: Option<Ipv4Addr>,
    allowed: Vec<Prefix>,
    dns: bool,
    aliases: Mutex<BTreeMap<TerminalName, Ipv4Addr>>,
    alias_file: Option<PathBuf>,
    discovery: Option<Arc<Discovery>>,
}

impl Names {
    /// From the configuration; `router` is the agent's own LAN address,
    /// `lan` its LAN prefix (where terminals may be unless
    /// `lan.allowed_prefixes` says otherwise).
    pub fn new(
        settings: &Settings,
        router: Option<Ipv4Addr>,
        lan: Option<Prefix>,
        alias_file: Option<PathBuf>,
    ) -> Self {
        let mut table = BTreeMap::new();
        let mut dns_only = Vec::new();
        for t in &settings.terminals {
            match t.address {
                Some(a) => {
                    table.insert(t.name.clone(), a);
                }
                None => dns_only.push(t.name.clone()),
            }
        }
        if !settings.lan.hosts_file.as_os_str().is_empty() {
            match std::fs::read_to_string(&settings.lan.hosts_file) {
                Ok(text) => {
                    for (name, addr) in parse_hosts(&text) {
                        table.entry(name).or_insert(addr);
                    }
                }
                Err(e) => tracing::warn!(
                    path = %settings.lan.hosts_file.display(),
                    error = %e,
                    "lan.hosts_file not read"
                ),
            }
        }
        let aliases = alias_file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| serde_json::from_str::<BTreeMap<TerminalName, Ipv4Addr>>(&t).ok())
            .unwrap_or_default();
        Self {
            table,
            dns_only,
            router,
            allowed: if settings.lan.allowed_prefixes.is_empty() {
                lan.into_iter().collect()
            } else {
                settings.lan.allowed_prefixes.clone()
            },
            dns: settings.lan.dns,
            aliases: Mutex::new(aliases),
            alias_file,
            discovery: None,
        }
    }

    /// Also resolves terminals bound to discovered hosts (by MAC address),
    /// and accepts a MAC address as input (a host ticked in the page's list).
    pub fn with_discovery(mut self, discovery: Option<Arc<Discovery>>) -> Self {
        self.discovery = discovery;
        self
    }

    /// Whether a terminal may have `addr`: unicast, inside the allowed
    /// prefixes (the LAN's when none are configured; none at all when the
    /// LAN is unknown). Loopback only when an allowed prefix names it
    /// explicitly: in netstack mode it would expose the agent host's own
    /// services.
    pub fn allowed(&self, addr: Ipv4Addr) -> bool {
        let unicast = !(addr.is_unspecified() || addr.is_multicast() || addr.is_broadcast());
        if addr.is_loopback() {
            return self
                .allowed
                .iter()
                .any(|p| p.prefix_len() > 0 && p.contains(addr));
        }
        unicast && self.allowed.iter().any(|p| p.contains(addr))
    }

    /// Checks `addr` for `name`: allowed, and not one of this host's own
    /// addresses (loopback aside, which [`Self::allowed`] admits only when
    /// configured explicitly).
    fn check(&self, name: &str, addr: Ipv4Addr) -> Result<(), NameError> {
        if !addr.is_loopback() && (Some(addr) == self.router || is_own_address(addr)) {
            return Err(NameError::OwnAddress {
                name: name.to_owned(),
                addr,
            });
        }
        if !self.allowed(addr) {
            return Err(NameError::NotAllowed {
                name: name.to_owned(),
                addr,
            });
        }
        Ok(())
    }

    fn local(&self, name: &TerminalName) -> Option<Ipv4Addr> {
        if let Some(a) = self.table.get(name) {
            return Some(*a);
        }
        if name.as_str() == ROUTER
            && let Some(a) = self.router
        {
            return Some(a);
        }
        if let Some(a) = self.discovery.as_ref().and_then(|d| d.bound(name)) {
            return Some(a);
        }
        self.aliases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .copied()
    }

    /// Resolves a terminal name: table, router, aliases, then DNS.
    ///
    /// # Errors
    /// [`NameError::Unresolved`] or [`NameError::NotAllowed`].
    pub async fn resolve(&self, name: &TerminalName) -> Result<Ipv4Addr, NameError> {
        let addr = match self.local(name) {
            Some(a) => a,
            None if self.dns => dns(name.as_str())
                .await
                .ok_or_else(|| NameError::Unresolved(name.to_string()))?,
            None => return Err(NameError::Unresolved(name.to_string())),
        };
        self.check(name.as_str(), addr)?;
        Ok(addr)
    }

    /// Resolves every name it can (for a desired-state document); the others
    /// are left out and reported by the data plane.
    pub async fn resolve_all(&self, names: &[TerminalName]) -> BTreeMap<TerminalName, Ipv4Addr> {
        let mut out = BTreeMap::new();
        for n in names {
            if out.contains_key(n) {
                continue;
            }
            match self.resolve(n).await {
                Ok(a) => {
                    out.insert(n.clone(), a);
                }
                Err(e) => tracing::warn!(terminal = %n, error = %e, "terminal not resolved"),
            }
        }
        out
    }

    /// What the customer typed or ticked: a terminal name, or an IPv4 address
    /// (which gets an alias name). Returns the name to send and the address.
    ///
    /// # Errors
    /// A [`NameError`] saying what is wrong with the entry.
    pub async fn resolve_input(&self, input: &str) -> Result<(TerminalName, Ipv4Addr), NameError> {
        let input = input.trim();
        if let Ok(ip) = input.parse::<IpAddr>() {
            let IpAddr::V4(addr) = ip else {
                return Err(NameError::Invalid(input.to_owned()));
            };
            self.check(input, addr)?;
            return Ok((self.alias_for(addr), addr));
        }
        if let Some(d) = &self.discovery
            && let Ok(mac) = input.parse::<Mac>()
        {
            let taken = |n: &TerminalName| {
                n.as_str() == ROUTER
                    || self.table.contains_key(n)
                    || self.dns_only.contains(n)
                    || self
                        .aliases
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .contains_key(n)
            };
            let (name, addr) = d.bind(mac, taken).map_err(|e| match e {
                DiscoveryError::NotAllowed(addr) => NameError::NotAllowed {
                    name: input.to_owned(),
                    addr,
                },
                _ => NameError::Unresolved(input.to_owned()),
            })?;
            self.check(input, addr)?;
            return Ok((name, addr));
        }
        let name = TerminalName::new(input).map_err(|_| NameError::Invalid(input.to_owned()))?;
        let addr = self.resolve(&name).await?;
        Ok((name, addr))
    }

    /// The name for a typed address: a configured terminal's name when one
    /// has it, else an alias (created and stored when new).
    fn alias_for(&self, addr: Ipv4Addr) -> TerminalName {
        if let Some((n, _)) = self.table.iter().find(|(_, a)| **a == addr) {
            return n.clone();
        }
        let mut aliases = self
            .aliases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((n, _)) = aliases.iter().find(|(_, a)| **a == addr) {
            return n.clone();
        }
        let name = (1..)
            .map(|i| TerminalName::new(format!("lan-host-{i}")).expect("a valid name"))
            .find(|n| !aliases.contains_key(n) && !self.table.contains_key(n))
            .expect("an unused alias");
        aliases.insert(name.clone(), addr);
        if let Some(path) = &self.alias_file {
            let write = serde_json::to_string_pretty(&*aliases)
                .map_err(std::io::Error::other)
                .and_then(|json| vpnnat_shell::keys::replace_private_file(path, json.as_bytes()));
            if let Err(e) = write {
                tracing::warn!(path = %path.display(), error = %e, "aliases not stored");
            }
        }
        name
    }

    /// The configured terminals (name, address when configured), for the page.
    pub fn configured(&self) -> impl Iterator<Item = (&TerminalName, Option<Ipv4Addr>)> {
        self.table
            .iter()
            .map(|(n, a)| (n, Some(*a)))
            .chain(self.dns_only.iter().map(|n| (n, None)))
    }
}

/// Whether `addr` is an address of this host (any interface): the kernel's
/// local routing table (`/proc/net/fib_trie`, "/32 host LOCAL" entries), or,
/// when that cannot be read, whether a socket can bind to it.
pub fn is_own_address(addr: Ipv4Addr) -> bool {
    match std::fs::read_to_string("/proc/net/fib_trie") {
        Ok(text) => local_addresses(&text).contains(&addr),
        Err(_) => std::net::UdpSocket::bind((addr, 0)).is_ok(),
    }
}

/// This host's own IPv4 addresses (`/proc/net/fib_trie`; empty when unreadable).
pub fn own_addresses() -> Vec<Ipv4Addr> {
    std::fs::read_to_string("/proc/net/fib_trie")
        .map(|t| local_addresses(&t))
        .unwrap_or_default()
}

/// The host's own addresses in a `/proc/net/fib_trie` text.
fn local_addresses(text: &str) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let t = line.trim_start_matches([' ', '|', '+', '-']).trim();
        if let Ok(a) = t.parse::<Ipv4Addr>() {
            last = Some(a);
        } else if t.starts_with("/32 host LOCAL")
            && let Some(a) = last
            && !out.contains(&a)
        {
            out.push(a);
        }
    }
    out
}

/// Name → address pairs of an /etc/hosts-style text (IPv4 lines only;
/// comments, IPv6 and invalid names are skipped).
pub fn parse_hosts(text: &str) -> Vec<(TerminalName, Ipv4Addr)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        let Some(Ok(addr)) = words.next().map(str::parse::<Ipv4Addr>) else {
            continue;
        };
        for w in words {
            if let Ok(n) = TerminalName::new(w) {
                out.push((n, addr));
            }
        }
    }
    out
}

async fn dns(name: &str) -> Option<Ipv4Addr> {
    let lookup = tokio::net::lookup_host((name, 0));
    let addrs = tokio::time::timeout(DNS_TIMEOUT, lookup).await.ok()?.ok()?;
    addrs.into_iter().find_map(|a| match a.ip() {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn settings() -> Settings {
        vpnnat::config::load(
            Some((
                "t.toml",
                "[lan]\ndns = false\nallowed_prefixes = [\"192.168.1.0/24\"]\n\
                 [[terminals]]\nname = \"pc-1\"\naddress = \"192.168.1.10\"\n",
            )),
            Vec::new(),
        )
        .unwrap()
    }

    fn name(s: &str) -> TerminalName {
        TerminalName::new(s).unwrap()
    }

    #[tokio::test]
    async fn table_then_router_then_aliases() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("aliases.json");
        let names = Names::new(
            &settings(),
            Some(Ipv4Addr::new(192, 168, 1, 1)),
            None,
            Some(file.clone()),
        );
        assert_eq!(
            names.resolve(&name("pc-1")).await.unwrap(),
            Ipv4Addr::new(192, 168, 1, 10)
        );
        // The router itself is never a terminal: it would open this page
        // and the router's services to the center.
        let e = names.resolve(&name("router")).await.unwrap_err();
        assert!(matches!(e, NameError::OwnAddress { .. }), "{e}");
        assert!(e.to_string().contains("this router itself"), "{e}");
        // A typed address of a configured terminal uses its name.
        let (n, a) = names.resolve_input("192.168.1.10").await.unwrap();
        assert_eq!((n.as_str(), a), ("pc-1", Ipv4Addr::new(192, 168, 1, 10)));
        // Another typed address gets an alias that hides it, stable and stored.
        let (n, _) = names.resolve_input(" 192.168.1.77 ").await.unwrap();
        assert_eq!(n.as_str(), "lan-host-1");
        assert!(!n.as_str().contains("77"));
        let (again, _) = names.resolve_input("192.168.1.77").await.unwrap();
        assert_eq!(again, n);
        let (second, _) = names.resolve_input("192.168.1.78").await.unwrap();
        assert_eq!(second.as_str(), "lan-host-2");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&file).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let reloaded = Names::new(&settings(), None, None, Some(file));
        assert_eq!(
            reloaded.resolve(&name("lan-host-1")).await.unwrap(),
            Ipv4Addr::new(192, 168, 1, 77)
        );
    }

    #[tokio::test]
    async fn security_names_resolve_only_into_the_lan_and_never_to_this_host() {
        // No allowed_prefixes: the LAN's prefix is the limit.
        let mut s = settings();
        s.lan.allowed_prefixes.clear();
        s.terminals.push(crate::settings::Terminal {
            name: name("outside"),
            address: Some(Ipv4Addr::new(10, 1, 2, 3)),
            description: String::new(),
            check: crate::settings::Check::Auto,
            watch: false,
        });
        let lan = Prefix::new(Ipv4Addr::new(192, 168, 1, 0), 24).unwrap();
        let names = Names::new(&s, None, Some(lan), None);
        assert!(names.resolve(&name("pc-1")).await.is_ok());
        assert!(matches!(
            names.resolve(&name("outside")).await,
            Err(NameError::NotAllowed { .. })
        ));
        assert!(matches!(
            names.resolve_input("8.8.8.8").await,
            Err(NameError::NotAllowed { .. })
        ));
        let all = names.resolve_all(&[name("pc-1"), name("outside")]).await;
        assert_eq!(all.keys().collect::<Vec<_>>(), [&name("pc-1")]);
        // Without a known LAN nothing resolves unless configured.
        let none = Names::new(&s, None, None, None);
        assert!(none.resolve(&name("pc-1")).await.is_err());
    }

    #[tokio::test]
    async fn a_ticked_host_resolves_by_its_mac_wherever_it_moves() {
        use crate::discovery::{Discovery, Mac};
        let s = settings();
        let lan = Prefix::new(Ipv4Addr::new(192, 168, 1, 0), 24).unwrap();
        let d = Arc::new(Discovery::new(
            &s,
            Some(Ipv4Addr::new(192, 168, 1, 1)),
            Some(lan),
            None,
        ));
        let pc: Mac = "02:00:00:00:01:0a".parse().unwrap();
        let other: Mac = "02:00:00:00:01:0b".parse().unwrap();
        let now = vpnnat::messages::UnixMillis(1);
        d.observe(
            &[
                (Ipv4Addr::new(192, 168, 1, 20), pc),
                (Ipv4Addr::new(192, 168, 1, 21), other),
            ],
            &[],
            now,
        );
        d.rename(other, "pc-1").unwrap();
        let names = Names::new(&s, Some(Ipv4Addr::new(192, 168, 1, 1)), Some(lan), None)
            .with_discovery(Some(d.clone()));
        let (n, a) = names.resolve_input(" 02:00:00:00:01:0A ").await.unwrap();
        assert_eq!((n.as_str(), a), ("lan-pc", Ipv4Addr::new(192, 168, 1, 20)));
        // The customer's name would clash with a configured terminal.
        let (n2, _) = names.resolve_input("02-00-00-00-01-0b").await.unwrap();
        assert_eq!(n2.as_str(), "pc-1-2");
        assert_eq!(
            names.resolve(&name("pc-1")).await.unwrap(),
            Ipv4Addr::new(192, 168, 1, 10),
            "the table still wins"
        );
        // The host moves: its name follows.
        d.observe(&[(Ipv4Addr::new(192, 168, 1, 44), pc)], &[], now);
        assert_eq!(
            names.resolve(&n).await.unwrap(),
            Ipv4Addr::new(192, 168, 1, 44)
        );
        assert!(matches!(
            names.resolve_input("02:00:00:00:09:09").await,
            Err(NameError::Unresolved(_))
        ));
    }

    #[test]
    fn security_the_hosts_own_addresses_are_found() {
        let text = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 127.0.0.1\n        /32 host LOCAL\n     \
                    |-- 192.168.1.1\n        /32 host LOCAL\n     |-- 192.168.1.0\n        /24 link UNICAST\n";
        assert_eq!(
            local_addresses(text),
            vec![Ipv4Addr::LOCALHOST, Ipv4Addr::new(192, 168, 1, 1)]
        );
        assert!(is_own_address(Ipv4Addr::LOCALHOST));
        assert!(!is_own_address(Ipv4Addr::new(192, 0, 2, 77)));
    }

    #[test]
    fn hosts_files_are_read_like_etc_hosts() {
        let h = parse_hosts(
            "# the office\n192.168.1.10 pc-1 reception\n::1 localhost\n\nbad line\n192.168.1.11\tnas # disk\n",
        );
        let v: Vec<(String, String)> = h
            .iter()
            .map(|(n, a)| (n.to_string(), a.to_string()))
            .collect();
        assert_eq!(
            v,
            [
                ("pc-1", "192.168.1.10"),
                ("reception", "192.168.1.10"),
                ("nas", "192.168.1.11")
            ]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
    }

    #[tokio::test]
    async fn bad_entries_are_rejected_before_anything_is_sent() {
        let names = Names::new(&settings(), None, None, None);
        assert!(matches!(
            names.resolve_input("10.0.0.1").await,
            Err(NameError::NotAllowed { .. })
        ));
        assert!(matches!(
            names.resolve_input("127.0.0.1").await,
            Err(NameError::NotAllowed { .. })
        ));
        assert!(matches!(
            names.resolve_input("pc 1").await,
            Err(NameError::Invalid(_))
        ));
        assert!(matches!(
            names.resolve_input("::1").await,
            Err(NameError::Invalid(_))
        ));
        // Not in the table (DNS is off here: unit tests send nothing).
        assert!(matches!(
            names.resolve_input("nothing-here.invalid").await,
            Err(NameError::Unresolved(_))
        ));
        // `router` without a LAN address does not resolve either.
        assert!(names.resolve(&name("router")).await.is_err());
        let all = names
            .resolve_all(&[name("pc-1"), name("nothing-here.invalid")])
            .await;
        assert_eq!(all.len(), 1);
    }
}
