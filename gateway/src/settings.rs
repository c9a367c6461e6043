//! The gateway's configuration: defaults, `/etc/vpnnat/gateway.toml` (or
//! `--config PATH`), then `VPNNAT_<SECTION>__<KEY>` overrides
//! ([`vpnnat_shell::settings::load`]). The commented example is `config/gateway.toml`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use serde::Deserialize;
use vpnnat::config::de;
use vpnnat::gateway::Prefix;

/// The commented example configuration, embedded so that `--help` can point
/// at it and a test can check that it parses.
pub const EXAMPLE: &str = include_str!("../../config/gateway.toml");

/// The default configuration file.
pub const DEFAULT_PATH: &str = "/etc/vpnnat/gateway.toml";

/// All settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// `[wireguard]`
    pub wireguard: Wireguard,
    /// `[center]`
    pub center: Center,
    /// `[server]`
    pub server: Server,
    /// `[metrics]`
    pub metrics: Metrics,
    /// `[flows]`
    pub flows: Flows,
    /// `[tls]`
    pub tls: Tls,
    /// `[ipsec]`
    pub ipsec: Ipsec,
}

/// `[ipsec]`: the IPsec sites' ports (IKEv2, RFC 7296; ESP in UDP, RFC 3948).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ipsec {
    /// UDP bind address of IKE (port 500); empty = no IPsec.
    pub ike_listen: String,
    /// UDP bind address of NAT traversal (port 4500: IKE after the float
    /// and ESP in UDP); empty = no IPsec.
    pub nat_t_listen: String,
}

impl Default for Ipsec {
    fn default() -> Self {
        Self {
            ike_listen: "0.0.0.0:500".to_owned(),
            nat_t_listen: "0.0.0.0:4500".to_owned(),
        }
    }
}

impl Ipsec {
    /// The IKE and NAT-T bind addresses, `None` when IPsec is off (both
    /// empty).
    ///
    /// # Errors
    /// When one is not an address, or only one is empty.
    pub fn listen(&self) -> Result<Option<(SocketAddr, SocketAddr)>, String> {
        let parse = |key: &str, v: &str| {
            v.trim()
                .parse::<SocketAddr>()
                .map_err(|e| format!("ipsec.{key}: {e}"))
        };
        match (self.ike_listen.trim(), self.nat_t_listen.trim()) {
            ("", "") => Ok(None),
            ("", _) | (_, "") => Err(
                "ipsec.ike_listen, ipsec.nat_t_listen: both empty (no IPsec) or both set"
                    .to_owned(),
            ),
            (ike, nat_t) => Ok(Some((
                parse("ike_listen", ike)?,
                parse("nat_t_listen", nat_t)?,
            ))),
        }
    }
}

/// `[tls]`: the TLS fallback (the tunnel's datagrams over TCP).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// TCP bind address; empty = no TLS fallback.
    pub listen: String,
    /// Endpoints announced to the server (where agents dial over TCP).
    pub endpoints: Vec<SocketAddr>,
    /// The certificate (PEM); empty = `tls.crt` next to the WireGuard key.
    pub certificate_file: PathBuf,
    /// Its private key (PEM, 0600); empty = `tls.key` next to the WireGuard key.
    pub key_file: PathBuf,
}

impl Default for Tls {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:443".to_owned(),
            endpoints: Vec::new(),
            certificate_file: PathBuf::new(),
            key_file: PathBuf::new(),
        }
    }
}

impl Tls {
    /// The bind address, `None` when the fallback is off.
    ///
    /// # Errors
    /// When `listen` is not an address.
    pub fn listen(&self) -> Result<Option<SocketAddr>, String> {
        if self.listen.trim().is_empty() {
            return Ok(None);
        }
        self.listen
            .trim()
            .parse()
            .map(Some)
            .map_err(|e| format!("tls.listen: {e}"))
    }

    /// The certificate and key files, defaulted next to `wireguard_key`.
    pub fn files(&self, wireguard_key: &std::path::Path) -> (PathBuf, PathBuf) {
        let dir = wireguard_key
            .parent()
            .unwrap_or_else(|| std::path::Path::new("."));
        let or = |p: &PathBuf, name: &str| {
            if p.as_os_str().is_empty() {
                dir.join(name)
            } else {
                p.clone()
            }
        };
        (
            or(&self.certificate_file, "tls.crt"),
            or(&self.key_file, "tls.key"),
        )
    }
}

/// `[wireguard]`: the tunnel side.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Wireguard {
    /// UDP bind address.
    pub listen: SocketAddr,
    /// Endpoints announced to the server.
    pub endpoints: Vec<SocketAddr>,
    /// Private key file (base64), generated 0600 when absent.
    pub private_key_file: PathBuf,
    /// Capacity in sites.
    pub max_tunnels: u32,
    /// Handshake messages per second before cookies are required.
    pub handshake_limit: u64,
    /// Data-plane workers; 0 = one per core.
    pub workers: usize,
    /// During a rotation of the gateway's key, how long the old key is
    /// still answered for sites that have not dialed the next one.
    pub key_rotation_grace_s: u64,
}

impl Default for Wireguard {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 51820)),
            endpoints: Vec::new(),
            private_key_file: PathBuf::from("/var/lib/vpnnat/gateway.key"),
            max_tunnels: 1000,
            handshake_limit: vpnnat::tunnel::wireguard::Responder::DEFAULT_HANDSHAKE_LIMIT,
            workers: 0,
            key_rotation_grace_s: 900,
        }
    }
}

/// `[center]`: the center-LAN side.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Center {
    /// TUN device name.
    pub tun_name: String,
    /// TUN MTU.
    pub tun_mtu: u16,
    /// NAT pool.
    #[serde(deserialize_with = "de::parsed")]
    pub pool: Prefix,
    /// Center-LAN interface for proxy ARP; empty for none.
    pub interface: String,
    /// ICMP error source; `None` = the unreachable address.
    #[serde(deserialize_with = "de::optional")]
    pub icmp_source: Option<Ipv4Addr>,
    /// Sources that may reach the sites and open connections to them (the
    /// technicians); default the center LAN of the address plan,
    /// 172.16.0.0/24. Packets from elsewhere are dropped (`not_technician`).
    /// The server's `allowed_sources` may narrow them per NAT address (teams).
    #[serde(deserialize_with = "de::list")]
    pub technician_prefixes: Vec<Prefix>,
}

impl Default for Center {
    fn default() -> Self {
        Self {
            tun_name: "vpnnat0".to_owned(),
            tun_mtu: 1420,
            pool: Prefix::new(Ipv4Addr::new(10, 64, 0, 0), 16).expect("valid default pool"),
            interface: String::new(),
            icmp_source: None,
            technician_prefixes: vec![vpnnat::gateway::GatewayConfig::default_technician_prefix()],
        }
    }
}

/// `[server]`: the control plane.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// Base URL; empty = standalone.
    pub url: String,
    /// Bearer credential file.
    pub credential_file: PathBuf,
    /// Long-poll wait.
    pub poll_wait_ms: u64,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            url: String::new(),
            credential_file: PathBuf::from("/etc/vpnnat/gateway.credential"),
            poll_wait_ms: 25_000,
        }
    }
}

/// `[metrics]`: the HTTP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// Listen address.
    pub listen: SocketAddr,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9101)),
        }
    }
}

/// `[flows]`: the flow table (only the center opens connections), per
/// data-plane worker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Flows {
    /// The most flows per worker; a new flow beyond it is refused
    /// (`flow_table_full`).
    pub max_flows: usize,
    /// Idle time of an established TCP flow, seconds.
    pub tcp_idle_s: u64,
    /// Idle time of a UDP flow (and of other IP protocols), seconds.
    pub udp_idle_s: u64,
    /// Idle time of an ICMP echo flow, seconds.
    pub icmp_idle_s: u64,
}

impl Default for Flows {
    fn default() -> Self {
        let d = vpnnat::gateway::flows::FlowLimits::default();
        Self {
            max_flows: d.max_flows,
            tcp_idle_s: d.tcp_idle.as_secs(),
            udp_idle_s: d.udp_idle.as_secs(),
            icmp_idle_s: d.icmp_idle.as_secs(),
        }
    }
}

impl Flows {
    /// The core's limits.
    pub fn limits(&self) -> vpnnat::gateway::flows::FlowLimits {
        vpnnat::gateway::flows::FlowLimits {
            max_flows: self.max_flows,
            tcp_idle: std::time::Duration::from_secs(self.tcp_idle_s),
            udp_idle: std::time::Duration::from_secs(self.udp_idle_s),
            icmp_idle: std::time::Duration::from_secs(self.icmp_idle_s),
        }
    }
}

impl Settings {
    /// Checks what serde cannot.
    ///
    /// # Errors
    /// A message naming the key.
    pub fn validate(&self, source: &str) -> Result<(), String> {
        let err = |key: &str, msg: &str| Err(format!("{source}: {key}: {msg}"));
        if self.wireguard.max_tunnels == 0 || self.wireguard.max_tunnels > 1_000_000 {
            return err("wireguard.max_tunnels", "must be 1 to 1000000");
        }
        if self.wireguard.key_rotation_grace_s == 0 || self.wireguard.key_rotation_grace_s > 604_800
        {
            return err(
                "wireguard.key_rotation_grace_s",
                "must be 1 to 604800 seconds",
            );
        }
        if self.wireguard.workers > 64 {
            return err("wireguard.workers", "must be 0 (one per core) to 64");
        }
        if self.center.tun_name.is_empty() || self.center.tun_name.len() > 15 {
            return err("center.tun_name", "must be 1 to 15 characters");
        }
        if self.center.tun_mtu < 576 {
            return err("center.tun_mtu", "must be at least 576");
        }
        if self.center.technician_prefixes.is_empty() {
            return err(
                "center.technician_prefixes",
                "must name at least one prefix (nothing could reach the sites)",
            );
        }
        let pool = self.center.pool;
        if let Some(p) = self
            .center
            .technician_prefixes
            .iter()
            .find(|p| p.contains(pool.addr()) || pool.contains(p.addr()))
        {
            return err(
                "center.technician_prefixes",
                &format!("{p} overlaps the pool {pool} (sites are never technicians)"),
            );
        }
        if self.flows.max_flows == 0 || self.flows.max_flows > 16_777_216 {
            return err("flows.max_flows", "must be 1 to 16777216");
        }
        if let Err(e) = self.tls.listen() {
            return Err(format!("{source}: {e}"));
        }
        if let Err(e) = self.ipsec.listen() {
            return Err(format!("{source}: {e}"));
        }
        if self.tls.endpoints.len() > 16
            || self
                .tls
                .endpoints
                .iter()
                .any(|e| e.port() == 0 || e.ip().is_unspecified())
        {
            return err(
                "tls.endpoints",
                "at most 16, each with an address and a port",
            );
        }
        for (key, v) in [
            ("flows.tcp_idle_s", self.flows.tcp_idle_s),
            ("flows.udp_idle_s", self.flows.udp_idle_s),
            ("flows.icmp_idle_s", self.flows.icmp_idle_s),
        ] {
            if v == 0 || v > 7 * 24 * 3600 {
                return err(key, "must be 1 to 604800 (a week)");
            }
        }
        if !self.server.url.is_empty() {
            if !(self.server.url.starts_with("http://") || self.server.url.starts_with("https://"))
            {
                return err("server.url", "must start with http:// or https://");
            }
            if self.wireguard.endpoints.is_empty() {
                return err(
                    "wireguard.endpoints",
                    "must name at least one public endpoint when a server is configured",
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_example_parses_and_matches_the_defaults_where_it_says_so() {
        let s: Settings =
            vpnnat::config::load(Some(("config/gateway.toml", EXAMPLE)), Vec::new()).unwrap();
        s.validate("config/gateway.toml").unwrap();
        let d = Settings::default();
        assert_eq!(s.wireguard.listen, d.wireguard.listen);
        assert_eq!(s.wireguard.max_tunnels, d.wireguard.max_tunnels);
        assert_eq!(s.center.pool, d.center.pool);
        assert_eq!(s.center.tun_mtu, 1420);
        assert_eq!(s.metrics.listen, d.metrics.listen);
        assert_eq!(s.wireguard.endpoints.len(), 1);
        assert_eq!(s.center.technician_prefixes, d.center.technician_prefixes);
        assert_eq!(s.flows.limits(), d.flows.limits());
        assert_eq!(s.tls.listen, d.tls.listen);
        assert_eq!(s.ipsec.listen(), d.ipsec.listen());
        assert_eq!(
            s.tls.files(&s.wireguard.private_key_file),
            (
                "/var/lib/vpnnat/tls.crt".into(),
                "/var/lib/vpnnat/tls.key".into()
            )
        );
    }

    #[test]
    fn the_tls_fallback_is_on_by_default_and_off_when_empty() {
        let d = Settings::default();
        assert_eq!(d.tls.listen(), Ok(Some("0.0.0.0:443".parse().unwrap())));
        let s: Settings =
            vpnnat::config::load(Some(("g.toml", "[tls]\nlisten = \"\"\n")), Vec::new()).unwrap();
        assert_eq!(s.tls.listen(), Ok(None));
        let s: Settings =
            vpnnat::config::load(Some(("g.toml", "[tls]\nlisten = \"x\"\n")), Vec::new()).unwrap();
        assert!(s.validate("g.toml").unwrap_err().contains("tls.listen"));
    }

    #[test]
    fn ipsec_is_on_by_default_and_off_when_both_ports_are_empty() {
        let d = Settings::default();
        assert_eq!(
            d.ipsec.listen(),
            Ok(Some((
                "0.0.0.0:500".parse().unwrap(),
                "0.0.0.0:4500".parse().unwrap()
            )))
        );
        let s: Settings = vpnnat::config::load(
            Some((
                "g.toml",
                "[ipsec]\nike_listen = \"\"\nnat_t_listen = \"\"\n",
            )),
            Vec::new(),
        )
        .unwrap();
        assert_eq!(s.ipsec.listen(), Ok(None));
        for toml in [
            "[ipsec]\nike_listen = \"\"\n",
            "[ipsec]\nnat_t_listen = \"\"\n",
            "[ipsec]\nike_listen = \"500\"\n",
        ] {
            let s: Settings = vpnnat::config::load(Some(("g.toml", toml)), Vec::new()).unwrap();
            let e = s.validate("g.toml").unwrap_err();
            assert!(e.contains("ipsec."), "{toml}: {e}");
        }
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = vpnnat::config::load::<Settings>(
            Some(("g.toml", "[center]\npool = \"10.64.0.0\"\n")),
            Vec::new(),
        )
        .unwrap_err();
        assert_eq!(e.key, "center.pool");
        let e = vpnnat::config::load::<Settings>(
            None,
            vec![("VPNNAT_WIREGUARD__LISTEN".into(), "nowhere".into())],
        )
        .unwrap_err();
        assert_eq!(e.source, "VPNNAT_WIREGUARD__LISTEN");
        let s: Settings =
            vpnnat::config::load(None, vec![("VPNNAT_SERVER__URL".into(), "ftp://x".into())])
                .unwrap();
        assert!(s.validate("env").unwrap_err().contains("server.url"));
        for (toml, key) in [
            (
                "[center]\ntechnician_prefixes = []\n",
                "center.technician_prefixes",
            ),
            (
                "[center]\ntechnician_prefixes = [\"10.0.0.0/8\"]\n",
                "center.technician_prefixes",
            ),
            ("[flows]\nmax_flows = 0\n", "flows.max_flows"),
            ("[flows]\nudp_idle_s = 0\n", "flows.udp_idle_s"),
        ] {
            let s: Settings = vpnnat::config::load(Some(("g.toml", toml)), Vec::new()).unwrap();
            let e = s.validate("g.toml").unwrap_err();
            assert!(e.contains(key), "{toml}: {e}");
        }
    }
}
