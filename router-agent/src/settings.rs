//! The agent's configuration: defaults, `/etc/vpnnat/router-agent.toml` (or
//! `--config PATH`), then `VPNNAT_<SECTION>__<KEY>` overrides
//! ([`vpnnat_shell::settings::load`]). The commented example is `config/router-agent.toml`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::anyhow;
use serde::{Deserialize, Deserializer};
use vpnnat::config::de;
use vpnnat::gateway::Prefix;
use vpnnat::messages::TerminalName;

/// The commented example configuration, embedded for `--print-example-config`
/// and checked by a test.
pub const EXAMPLE: &str = include_str!("../../config/router-agent.toml");

/// The default configuration file.
pub const DEFAULT_PATH: &str = "/etc/vpnnat/router-agent.toml";

/// All settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// `[agent]`
    pub agent: Agent,
    /// `[server]`
    pub server: Server,
    /// `[tunnel]`
    pub tunnel: TunnelSettings,
    /// `[lan]`
    pub lan: Lan,
    /// `[packet]`
    pub packet: Packet,
    /// `[netstack]`
    pub netstack: Netstack,
    /// `[web]`
    pub web: Web,
    /// `[[terminals]]`
    pub terminals: Vec<Terminal>,
    /// `[failures]`
    pub failures: Failures,
    /// `[discovery]`
    pub discovery: Discovery,
}

/// Packet or netstack mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// TUN device + kernel forwarding (root).
    #[default]
    Packet,
    /// smoltcp + OS sockets (no privileges).
    Netstack,
}

/// `[agent]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Agent {
    /// The identity file written by `enroll`.
    pub identity_file: PathBuf,
    /// Generated password, aliases.
    pub state_dir: PathBuf,
    /// The data mode.
    pub mode: Mode,
    /// Install every mapping the server's document lists. Default false:
    /// only requests made on this agent's page or API (and failure reports
    /// where the customer allowed it on the page) are opened, so that the
    /// center alone cannot open the customer's LAN.
    pub install_server_requests: bool,
}

impl Default for Agent {
    fn default() -> Self {
        Self {
            identity_file: PathBuf::from("/var/lib/vpnnat/router-agent.identity"),
            state_dir: PathBuf::from("/var/lib/vpnnat"),
            mode: Mode::Packet,
            install_server_requests: false,
        }
    }
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// Base URL; empty = the enrolled one.
    pub url: String,
    /// Extra CA (PEM).
    pub ca_file: String,
    /// Long-poll wait.
    pub poll_wait_ms: u64,
    /// Accept a plain `http://` server URL to another host than loopback
    /// (the credential and the requests would travel unencrypted). Default false.
    pub allow_insecure_http: bool,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            url: String::new(),
            ca_file: String::new(),
            poll_wait_ms: 25_000,
            allow_insecure_http: false,
        }
    }
}

/// `[tunnel]`
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelSettings {
    /// UDP source port; 0 = any.
    pub listen_port: u16,
    /// `auto` (UDP, TLS when UDP does not work), `udp` or `tls`.
    pub transport: crate::fallback::Setting,
    /// No handshake over UDP within this many seconds: TLS.
    pub udp_timeout_s: u64,
    /// While on TLS, UDP is tried this often (seconds).
    pub udp_probe_interval_s: u64,
    /// `http://[user:pass@]host:port`; empty = the environment's
    /// `HTTPS_PROXY`/`ALL_PROXY` (and `NO_PROXY`).
    pub https_proxy: String,
}

/// The proxy's credentials never reach a log.
impl std::fmt::Debug for TunnelSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proxy = (!self.https_proxy.trim().is_empty())
            .then(|| vpnnat_dataplane::tls::Proxy::parse(&self.https_proxy));
        f.debug_struct("TunnelSettings")
            .field("listen_port", &self.listen_port)
            .field("transport", &self.transport)
            .field("udp_timeout_s", &self.udp_timeout_s)
            .field("udp_probe_interval_s", &self.udp_probe_interval_s)
            .field("https_proxy", &proxy)
            .finish()
    }
}

impl Default for TunnelSettings {
    fn default() -> Self {
        Self {
            listen_port: 0,
            transport: crate::fallback::Setting::Auto,
            udp_timeout_s: 5,
            udp_probe_interval_s: 30,
            https_proxy: String::new(),
        }
    }
}

/// `[lan]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Lan {
    /// The LAN interface.
    pub interface: String,
    /// The agent's LAN address; `None` = the interface's.
    #[serde(deserialize_with = "de::optional")]
    pub address: Option<Ipv4Addr>,
    /// Where terminals may be. Empty: the prefix of `interface` only (no
    /// terminal at all when it is unknown). Never the agent host's own
    /// addresses (loopback only when a prefix here names it).
    #[serde(deserialize_with = "de::list")]
    pub allowed_prefixes: Vec<Prefix>,
    /// Ask DNS for names that are not in the terminal table.
    pub dns: bool,
    /// Extra names in /etc/hosts format; empty = none.
    pub hosts_file: PathBuf,
}

impl Default for Lan {
    fn default() -> Self {
        Self {
            interface: String::new(),
            address: None,
            allowed_prefixes: Vec::new(),
            dns: true,
            hosts_file: PathBuf::new(),
        }
    }
}

/// `[packet]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Packet {
    /// TUN device name.
    pub tun_name: String,
    /// TUN MTU.
    pub tun_mtu: u16,
    /// Routed into the TUN device.
    #[serde(deserialize_with = "de::list")]
    pub center_prefixes: Vec<Prefix>,
    /// Masquerade toward the LAN.
    pub masquerade: bool,
    /// The masquerade address.
    #[serde(deserialize_with = "de::optional")]
    pub masquerade_address: Option<Ipv4Addr>,
    /// Turn on IPv4 forwarding.
    pub ip_forward: bool,
}

impl Default for Packet {
    fn default() -> Self {
        Self {
            tun_name: "vpnnat-agent".to_owned(),
            tun_mtu: 1420,
            center_prefixes: vec![
                Prefix::new(Ipv4Addr::new(172, 16, 0, 0), 24).expect("valid default prefix"),
            ],
            masquerade: false,
            masquerade_address: None,
            ip_forward: true,
        }
    }
}

/// `[netstack]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Netstack {
    /// Per-connection TCP buffer.
    pub tcp_buffer: usize,
    /// UDP flow idle timeout.
    pub udp_idle_s: u64,
    /// UDP flows (and destination ports) relayed at once; beyond, new flows
    /// are dropped and counted.
    pub max_udp_flows: usize,
    /// ICMP echo flows (technician, NAT address, identifier) at once.
    pub max_icmp_flows: usize,
}

impl Default for Netstack {
    fn default() -> Self {
        Self {
            tcp_buffer: 256 * 1024,
            udp_idle_s: 120,
            max_udp_flows: 512,
            max_icmp_flows: 256,
        }
    }
}

/// `[web]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Web {
    /// Listen address; `None` = derived.
    #[serde(deserialize_with = "de::optional")]
    pub listen: Option<SocketAddr>,
    /// The page password; empty = generated.
    pub password: String,
    /// Client prefixes; empty = derived.
    #[serde(deserialize_with = "de::list")]
    pub allowed_clients: Vec<Prefix>,
    /// Host names the page answers to (the `Host` header; defeats DNS
    /// rebinding). Always also: the listen address, the LAN address,
    /// localhost and this machine's host name.
    #[serde(deserialize_with = "de::list")]
    pub hostnames: Vec<String>,
}

/// One `[[terminals]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Terminal {
    /// The name the server sees.
    pub name: TerminalName,
    /// Its real LAN address; `None` = resolved by DNS.
    #[serde(default, deserialize_with = "de::optional")]
    pub address: Option<Ipv4Addr>,
    /// For the customer.
    #[serde(default)]
    pub description: String,
    /// How to check that it answers.
    #[serde(default, deserialize_with = "check")]
    pub check: Check,
    /// Check periodically and report failures.
    #[serde(default)]
    pub watch: bool,
}

/// How a terminal is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Check {
    /// Ping, falling back to a TCP probe when ICMP sockets are not allowed.
    #[default]
    Auto,
    /// ICMP echo.
    Ping,
    /// A TCP connect to this port (a refusal counts as an answer).
    Tcp(u16),
}

/// `[failures]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Failures {
    /// Watch the LAN link.
    pub link_watch: bool,
    /// Seconds between checks.
    pub check_interval_s: u64,
    /// Failed checks before a report.
    pub threshold: u32,
    /// Ask for a request with each report.
    pub open_request: bool,
}

impl Default for Failures {
    fn default() -> Self {
        Self {
            link_watch: true,
            check_interval_s: 30,
            threshold: 3,
            open_request: false,
        }
    }
}

/// `[discovery]`: which hosts are on the LAN, for the page's list.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Discovery {
    /// Read the neighbour table of `lan.interface` and list its hosts.
    pub enabled: bool,
    /// Seconds between two reads of the neighbour table (and leases file).
    pub refresh_s: u64,
    /// Hosts kept at most; further ones are dropped and counted.
    pub max_hosts: usize,
    /// Allow the page's "search the network" button (an ARP sweep).
    pub sweep: bool,
    /// Addresses probed per second by a sweep.
    pub sweep_rate: u32,
    /// Seconds between two sweeps at least.
    pub sweep_min_interval_s: u64,
    /// A dnsmasq leases file to read names and addresses from; empty = none.
    pub leases_file: PathBuf,
    /// Ask hosts for their names by reverse mDNS.
    pub mdns: bool,
    /// Ask hosts for their names by NetBIOS node status.
    pub netbios: bool,
    /// How long a name query waits for its answers (milliseconds).
    pub name_timeout_ms: u64,
    /// Hosts asked for their names per round at most.
    pub max_name_queries: usize,
}

impl Default for Discovery {
    fn default() -> Self {
        Self {
            enabled: true,
            refresh_s: 10,
            max_hosts: 1024,
            sweep: true,
            sweep_rate: 100,
            sweep_min_interval_s: 60,
            leases_file: PathBuf::new(),
            mdns: true,
            netbios: true,
            name_timeout_ms: 500,
            max_name_queries: 32,
        }
    }
}

fn check<'de, D: Deserializer<'de>>(d: D) -> Result<Check, D::Error> {
    let s = String::deserialize(d)?;
    let s = s.trim();
    if s.is_empty() {
        return Ok(Check::Auto);
    }
    if s == "ping" {
        return Ok(Check::Ping);
    }
    if let Some(port) = s.strip_prefix("tcp:")
        && let Ok(p) = port.parse::<u16>()
        && p != 0
    {
        return Ok(Check::Tcp(p));
    }
    Err(serde::de::Error::custom(
        "expected \"ping\", \"tcp:PORT\" or \"\"",
    ))
}

impl Settings {
    /// Checks what serde cannot.
    ///
    /// # Errors
    /// A message naming the file and the key.
    pub fn validate(&self, source: &str) -> Result<(), String> {
        let err = |key: &str, msg: &str| Err(format!("{source}: {key}: {msg}"));
        let url = &self.server.url;
        if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
            return err("server.url", "must start with http:// or https://");
        }
        if self.tunnel.udp_timeout_s == 0 || self.tunnel.udp_timeout_s > 3600 {
            return err("tunnel.udp_timeout_s", "must be 1 to 3600");
        }
        if self.tunnel.udp_probe_interval_s == 0 || self.tunnel.udp_probe_interval_s > 86_400 {
            return err("tunnel.udp_probe_interval_s", "must be 1 to 86400");
        }
        if !self.tunnel.https_proxy.trim().is_empty()
            && vpnnat_dataplane::tls::Proxy::parse(&self.tunnel.https_proxy).is_none()
        {
            return err("tunnel.https_proxy", "must be http://[user:pass@]host:port");
        }
        if self.packet.tun_name.is_empty() || self.packet.tun_name.len() > 15 {
            return err("packet.tun_name", "must be 1 to 15 characters");
        }
        if self.packet.center_prefixes.is_empty() {
            // The tunnel accepts sources only from these: none would drop
            // every technician's packet, in both modes.
            return err(
                "packet.center_prefixes",
                "must name at least one prefix (the technicians' LAN)",
            );
        }
        if self.packet.tun_mtu < 576 {
            return err("packet.tun_mtu", "must be at least 576");
        }
        if self.packet.masquerade && self.packet.masquerade_address.is_none() {
            return err(
                "packet.masquerade_address",
                "must be set (a free LAN address) when packet.masquerade = true",
            );
        }
        if self.netstack.tcp_buffer < 4096 || self.netstack.tcp_buffer > 16 << 20 {
            return err("netstack.tcp_buffer", "must be 4096 to 16777216");
        }
        if self.netstack.max_udp_flows == 0 || self.netstack.max_udp_flows > 65_535 {
            return err("netstack.max_udp_flows", "must be 1 to 65535");
        }
        if self.netstack.max_icmp_flows == 0 || self.netstack.max_icmp_flows > 65_535 {
            return err("netstack.max_icmp_flows", "must be 1 to 65535");
        }
        if self.netstack.udp_idle_s == 0 {
            return err("netstack.udp_idle_s", "must be at least 1");
        }
        if self.failures.check_interval_s == 0 {
            return err("failures.check_interval_s", "must be at least 1");
        }
        if self.failures.threshold == 0 {
            return err("failures.threshold", "must be at least 1");
        }
        let d = &self.discovery;
        if d.refresh_s == 0 || d.refresh_s > 3600 {
            return err("discovery.refresh_s", "must be 1 to 3600");
        }
        if d.max_hosts == 0 || d.max_hosts > 65_536 {
            return err("discovery.max_hosts", "must be 1 to 65536");
        }
        if d.sweep_rate == 0 || d.sweep_rate > 1000 {
            return err(
                "discovery.sweep_rate",
                "must be 1 to 1000 (addresses per second)",
            );
        }
        if d.sweep_min_interval_s > 86_400 {
            return err("discovery.sweep_min_interval_s", "must be 0 to 86400");
        }
        if d.name_timeout_ms < 50 || d.name_timeout_ms > 5000 {
            return err("discovery.name_timeout_ms", "must be 50 to 5000");
        }
        if d.max_name_queries > 1024 {
            return err("discovery.max_name_queries", "must be 0 to 1024");
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, t) in self.terminals.iter().enumerate() {
            if !seen.insert(t.name.clone()) {
                return Err(format!(
                    "{source}: terminals[{i}].name: {} is listed twice",
                    t.name
                ));
            }
            let loopback_allowed = self
                .lan
                .allowed_prefixes
                .iter()
                .any(|p| p.prefix_len() > 0 && t.address.is_some_and(|a| p.contains(a)));
            if let Some(a) = t.address
                && ((a.is_loopback() && !loopback_allowed)
                    || a.is_multicast()
                    || a.is_unspecified()
                    || a.is_broadcast())
            {
                return Err(format!(
                    "{source}: terminals[{i}].address: {a} is not a unicast LAN address"
                ));
            }
        }
        Ok(())
    }

    /// Reads the file (or the default one when it exists) and the environment.
    ///
    /// # Errors
    /// A one-line message naming the file or variable and the key.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let loaded = vpnnat_shell::settings::load::<Self>(path, DEFAULT_PATH)?;
        loaded
            .settings
            .validate(&loaded.source)
            .map_err(|e| anyhow!("{e}"))?;
        Ok(loaded.settings)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_example_parses() {
        let s: Settings =
            vpnnat::config::load(Some(("config/router-agent.toml", EXAMPLE)), Vec::new()).unwrap();
        s.validate("config/router-agent.toml").unwrap();
        let d = Settings::default();
        assert_eq!(s.agent.identity_file, d.agent.identity_file);
        assert_eq!(s.agent.mode, Mode::Packet);
        assert_eq!(s.packet.tun_mtu, 1420);
        assert_eq!(s.packet.center_prefixes, d.packet.center_prefixes);
        assert_eq!(s.server.poll_wait_ms, d.server.poll_wait_ms);
        assert_eq!(s.terminals.len(), 1);
        assert_eq!(s.terminals[0].check, Check::Tcp(80));
        assert_eq!(s.web.listen, None);
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = vpnnat::config::load::<Settings>(
            Some(("a.toml", "[packet]\ncenter_prefixes = [\"172.16.0.0\"]\n")),
            Vec::new(),
        )
        .unwrap_err();
        assert_eq!(e.key, "packet.center_prefixes");
        let e = vpnnat::config::load::<Settings>(
            Some((
                "a.toml",
                "[[terminals]]\nname = \"pc 1\"\naddress = \"192.168.1.10\"\n",
            )),
            Vec::new(),
        )
        .unwrap_err();
        assert_eq!(e.key, "terminals[0].name");
        let e = vpnnat::config::load::<Settings>(
            Some((
                "a.toml",
                "[[terminals]]\nname = \"pc\"\ncheck = \"udp:5\"\n",
            )),
            Vec::new(),
        )
        .unwrap_err();
        assert_eq!(e.key, "terminals[0].check");
        let e = vpnnat::config::load::<Settings>(
            None,
            vec![("VPNNAT_WEB__LISTEN".into(), "nowhere".into())],
        )
        .unwrap_err();
        assert_eq!(e.source, "VPNNAT_WEB__LISTEN");
        let s: Settings = vpnnat::config::load(
            None,
            vec![("VPNNAT_PACKET__MASQUERADE".into(), "true".into())],
        )
        .unwrap();
        assert!(
            s.validate("env")
                .unwrap_err()
                .contains("packet.masquerade_address")
        );
        let s: Settings = vpnnat::config::load(
            Some((
                "a.toml",
                "[[terminals]]\nname = \"pc\"\naddress = \"127.0.0.1\"\n",
            )),
            Vec::new(),
        )
        .unwrap();
        assert!(
            s.validate("a.toml")
                .unwrap_err()
                .contains("terminals[0].address")
        );
        for (toml, key) in [
            ("[discovery]\nrefresh_s = 0\n", "discovery.refresh_s"),
            ("[discovery]\nsweep_rate = 5000\n", "discovery.sweep_rate"),
            (
                "[discovery]\nname_timeout_ms = 1\n",
                "discovery.name_timeout_ms",
            ),
            ("[discovery]\nmax_hosts = 0\n", "discovery.max_hosts"),
        ] {
            let s: Settings = vpnnat::config::load(Some(("d.toml", toml)), Vec::new()).unwrap();
            let e = s.validate("d.toml").unwrap_err();
            assert!(e.starts_with(&format!("d.toml: {key}: ")), "{e}");
        }
        let e = vpnnat::config::load::<Settings>(
            Some(("d.toml", "[discovery]\nmdns = \"yes\"\n")),
            Vec::new(),
        )
        .unwrap_err();
        assert_eq!(e.key, "discovery.mdns");
    }

    #[test]
    fn the_proxy_password_never_shows_in_debug_output() {
        let t = TunnelSettings {
            https_proxy: "http://alice:s3cr%40t@proxy.example:3128".into(),
            ..TunnelSettings::default()
        };
        let shown = format!("{t:?}");
        assert!(!shown.contains("s3cr"), "{shown}");
        assert!(!shown.contains("alice"), "{shown}");
        assert!(shown.contains("proxy.example"), "{shown}");
    }
}
