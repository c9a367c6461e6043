//! A small world for the gateway's namespace tests, built on `vpnnat_test_support`:
//!
//! ```text
//!  tech (172.16.0.50) ──lan0── gateway ──inet (bridge 198.51.100.1/24)──┬── site A router (wireguard-go) ── PC 192.168.1.10
//!                                                                      └── site B router (wireguard-go) ── PC 192.168.1.10
//! ```
//!
//! Every address lives inside namespaces this module creates; none has a
//! default route (sites route only 172.16.0.0/24 into their tunnel).
#![allow(dead_code, clippy::unwrap_used, clippy::print_stdout)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use vpnnat::messages::{GatewayDesiredState, GatewayId, GatewayPeer, SiteId};
use vpnnat::tunnel::PrivateKey;
use vpnnat_test_support::{self as support, Netns, Prereq, rand_bytes, repo_path};

/// Everything these tests need from the machine.
pub const PREREQS: &[Prereq] = &[
    Prereq::Root,
    Prereq::Tun,
    Prereq::Program("ip"),
    Prereq::Program("ping"),
    Prereq::Program("nft"),
    Prereq::Program("wireguard-go"),
    Prereq::Program("wg"),
    Prereq::Program("python3"),
    Prereq::Program("curl"),
];

/// The gateway's namespace, the technician's, and the gateway process.
pub struct World {
    pub gw: Netns,
    pub tech: Netns,
    pub dir: tempfile::TempDir,
    pub gw_key: PrivateKey,
    pub gw_pid: Option<u32>,
    pub config: PathBuf,
    pub peers: PathBuf,
    /// `Some` when the gateway follows a maintenance server instead of `peers`.
    pub server: Option<(String, PathBuf)>,
    sites: u8,
}

/// A customer site: its router (with a stock wireguard-go) and one PC.
pub struct Site {
    pub router: Netns,
    pub pc: Netns,
    pub key: PrivateKey,
    pub nat: Vec<String>,
    /// The router's address on the "internet".
    pub wan: String,
    /// wireguard-go's interface. Unique per test run: wireguard-go's control
    /// socket (/var/run/wireguard/NAME.sock) is shared by all namespaces.
    pub wg: String,
}

impl Drop for Site {
    fn drop(&mut self) {
        // wireguard-go leaves its control socket behind when it is killed.
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.wg));
    }
}

static WG_COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn wg_name() -> String {
    let n = WG_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("wg{}x{n}", std::process::id())
}

impl World {
    /// The gateway and technician namespaces, joined by the center LAN; the
    /// gateway's "internet" bridge. `tech_route` is how the technician reaches
    /// the pool: `"dev eth0"` (on-link, proxy ARP) or `"via 172.16.0.1"`.
    pub fn new(tag: &str, tech_route: &str) -> Self {
        let gw = Netns::new(&format!("{tag}gw"));
        let tech = Netns::new(&format!("{tag}tc"));
        support::veth(
            &gw,
            "lan0",
            Some("172.16.0.1/24"),
            &tech,
            "eth0",
            Some("172.16.0.50/24"),
        );
        tech.sh(&format!("ip route add 10.64.0.0/16 {tech_route}"));
        gw.sh("ip link add inet type bridge && ip addr add 198.51.100.1/24 dev inet && ip link set inet up");
        let dir = support::temp_dir(tag);
        let gw_key = PrivateKey::from_bytes(rand_bytes());
        std::fs::write(dir.path().join("gw.key"), gw_key.to_base64()).unwrap();
        std::fs::set_permissions(
            dir.path().join("gw.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let config = dir.path().join("gateway.toml");
        std::fs::write(
            &config,
            format!(
                "[wireguard]\nlisten = \"0.0.0.0:51820\"\nprivate_key_file = \"{}\"\n\
                 [center]\ntun_name = \"vpnnat0\"\ninterface = \"lan0\"\npool = \"10.64.0.0/16\"\n\
                 [metrics]\nlisten = \"127.0.0.1:9101\"\n",
                dir.path().join("gw.key").display()
            ),
        )
        .unwrap();
        let peers = dir.path().join("peers.json");
        Self {
            gw,
            tech,
            dir,
            gw_key,
            gw_pid: None,
            config,
            peers,
            server: None,
            sites: 0,
        }
    }

    /// Makes the gateway follow the maintenance server at `url` with the
    /// bearer `credential`, announcing 198.51.100.1:51820.
    pub fn use_server(&mut self, url: &str, credential: &str) {
        let cred = self.dir.path().join("gateway.credential");
        std::fs::write(&cred, credential).unwrap();
        let mut config = std::fs::read_to_string(&self.config).unwrap();
        config = config.replace(
            "[wireguard]\n",
            "[wireguard]\nendpoints = [\"198.51.100.1:51820\"]\n",
        );
        config.push_str(&format!(
            "[server]\nurl = \"{url}\"\ncredential_file = \"{}\"\npoll_wait_ms = 5000\n",
            cred.display()
        ));
        std::fs::write(&self.config, config).unwrap();
        self.server = Some((url.to_owned(), cred));
    }

    /// A site router (wireguard-go configured by `wg`, 1:1 NAT with nft) and
    /// its PC (192.168.1.10, serving `scripts/lan-pc.py`: HTTP on 80, echo on 7).
    pub fn add_site(&mut self, nat: &[&str]) -> Site {
        self.add_site_with_key(PrivateKey::from_bytes(rand_bytes()), nat)
    }

    /// [`Self::add_site`] with a given WireGuard key (e.g. one already enrolled).
    pub fn add_site_with_key(&mut self, key: PrivateKey, nat: &[&str]) -> Site {
        self.sites += 1;
        let n = self.sites;
        let mut router = Netns::new(&format!("r{n}"));
        let mut pc = Netns::new(&format!("p{n}"));
        let wan = format!("198.51.100.{}", 10 + n);
        support::veth(
            &self.gw,
            &format!("site{n}"),
            None,
            &router,
            "wan0",
            Some(&format!("{wan}/24")),
        );
        self.gw.sh(&format!("ip link set site{n} master inet"));
        support::veth(
            &router,
            "lan0",
            Some("192.168.1.1/24"),
            &pc,
            "eth0",
            Some("192.168.1.10/24"),
        );
        pc.sh("ip route add 172.16.0.0/24 via 192.168.1.1");
        let lan_pc = repo_path("scripts/lan-pc.py");
        let mut cmd = pc.command("python3");
        cmd.arg(&lan_pc).arg(format!("site {n}"));
        pc.spawn(&mut cmd, Some(&self.dir.path().join(format!("pc{n}.log"))));
        let nat: Vec<String> = nat.iter().map(|s| (*s).to_owned()).collect();
        let wg = wg_name();
        self.start_wireguard_go(&mut router, &wg, &key, &nat, n);
        Site {
            router,
            pc,
            key,
            nat,
            wan,
            wg,
        }
    }

    fn start_wireguard_go(
        &self,
        router: &mut Netns,
        wg: &str,
        key: &PrivateKey,
        nat: &[String],
        n: u8,
    ) {
        let mut cmd = router.command("wireguard-go");
        cmd.env("WG_PROCESS_FOREGROUND", "1").arg(wg);
        let log = self.dir.path().join(format!("wireguard-go{n}.log"));
        // The router namespace owns the process (killed on drop).
        router.spawn(&mut cmd, Some(&log));
        let site_router = &*router;
        support::wait_until("wireguard-go's interface", Duration::from_secs(10), || {
            site_router.try_sh(&format!("ip link show {wg}"))
        });
        let key_file = self.dir.path().join(format!("site{n}.key"));
        std::fs::write(&key_file, key.to_base64()).unwrap();
        let first = &nat[0];
        router.sh(&format!(
            "wg set {wg} private-key {key} listen-port {port} peer {gw} endpoint 198.51.100.1:51820 \
             allowed-ips 172.16.0.0/24,10.64.0.0/16 persistent-keepalive 1 \
             && ip addr add {first}/32 dev {wg} && ip link set {wg} up \
             && ip route add 172.16.0.0/24 dev {wg} \
             && sysctl -qw net.ipv4.ip_forward=1",
            key = key_file.display(),
            port = 40000 + u16::from(n),
            gw = self.gw_key.public_key(),
        ));
        // The customer's router maps the NAT address 1:1 onto the PC, the way a
        // standard router with only a WireGuard client would be set up.
        router.sh(&format!(
            "nft -f - <<'EOF'\n\
             table ip vpnnat {{\n\
               chain pre {{ type nat hook prerouting priority -100; iifname \"{wg}\" ip daddr {first} dnat to 192.168.1.10; }}\n\
               chain post {{ type nat hook postrouting priority 100; oifname \"{wg}\" ip saddr 192.168.1.10 snat to {first}; }}\n\
             }}\n\
             EOF"
        ));
    }

    /// The desired state listing `sites` with their keys and NAT addresses.
    pub fn desired(&self, version: u64, sites: &[(&Site, u64)]) -> GatewayDesiredState {
        GatewayDesiredState {
            next_keys: Vec::new(),
            version,
            gateway_id: GatewayId(1),
            allowed_sources: Vec::new(),
            key_rotation: None,
            peers: sites
                .iter()
                .map(|(s, id)| GatewayPeer {
                    site_id: SiteId(*id),
                    public_key: s.key.public_key(),
                    nat_addresses: s.nat.iter().map(|a| a.parse().unwrap()).collect(),
                    tunnel: vpnnat::messages::TunnelKind::Wireguard,
                    ipsec: None,
                    tls_token_sha256: None,
                })
                .collect(),
        }
    }

    /// The desired state with one IPsec site `site` holding `nat`, with the
    /// gateway's view of its parameters.
    pub fn ipsec_desired(
        site: SiteId,
        nat: &str,
        params: vpnnat::messages::IpsecParams,
    ) -> GatewayDesiredState {
        GatewayDesiredState {
            next_keys: Vec::new(),
            version: 1,
            gateway_id: GatewayId(1),
            allowed_sources: Vec::new(),
            key_rotation: None,
            peers: vec![GatewayPeer {
                site_id: site,
                // Carried by every peer, unused by IPsec.
                public_key: PrivateKey::from_bytes(rand_bytes()).public_key(),
                nat_addresses: vec![nat.parse().unwrap()],
                tunnel: vpnnat::messages::TunnelKind::Ipsec,
                ipsec: Some(params),
                tls_token_sha256: None,
            }],
        }
    }

    /// Writes the peers file (and tells a running gateway to re-read it).
    pub fn set_peers(&self, desired: &GatewayDesiredState) {
        std::fs::write(&self.peers, serde_json::to_vec(desired).unwrap()).unwrap();
        if let Some(pid) = self.gw_pid {
            let _ = Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status();
        }
    }

    /// Starts the real `gateway` binary in the gateway namespace (standalone
    /// with `--peers`, or following a server after [`Self::use_server`]), and
    /// waits for its HTTP listener.
    pub fn start_gateway(&mut self) {
        let mut cmd = self.gw.command(support::bin("gateway"));
        cmd.arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info,vpnnat=debug");
        if self.server.is_none() {
            cmd.arg("--peers").arg(&self.peers);
        }
        let pid = self
            .gw
            .spawn(&mut cmd, Some(&self.dir.path().join("gateway.log")));
        self.gw_pid = Some(pid);
        let gw = &self.gw;
        let dir = self.dir.path().to_owned();
        support::wait_until(
            "the gateway's HTTP listener",
            Duration::from_secs(15),
            || {
                let ok = gw.try_sh("curl -sf http://127.0.0.1:9101/healthz");
                if !ok {
                    let log = std::fs::read_to_string(dir.join("gateway.log")).unwrap_or_default();
                    assert!(!log.contains("gateway failed"), "gateway failed:\n{log}");
                }
                ok
            },
        );
    }

    /// The gateway's log so far.
    pub fn gateway_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    /// `GET /api/v1/status` as JSON.
    pub fn status(&self) -> serde_json::Value {
        let out = self.gw.sh("curl -sf http://127.0.0.1:9101/api/v1/status");
        serde_json::from_str(&out).unwrap()
    }

    /// The Prometheus text.
    pub fn metrics(&self) -> String {
        self.gw.sh("curl -sf http://127.0.0.1:9101/metrics")
    }

    /// One sample's value from the metrics, 0 when absent.
    pub fn metric(&self, name_and_labels: &str) -> u64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// A standalone router agent of an IPsec site (no server): its
/// configuration and desired state in `dir`, from which it runs in `mode`
/// (`packet` on the router with its LAN on `lan_if`, or `netstack` on a LAN
/// host), the PC 192.168.1.10 as terminal `pc-1`, the technicians on
/// 172.16.0.0/24.
pub struct StandaloneAgent {
    pub config: PathBuf,
    pub desired: PathBuf,
    pub log: PathBuf,
}

impl StandaloneAgent {
    /// Writes both files: the tunnel to `endpoint` with `params` (the
    /// site's view), `nat` mapped onto `pc-1` for an hour.
    pub fn ipsec(
        dir: &std::path::Path,
        mode: &str,
        lan_if: &str,
        endpoint: &str,
        params: vpnnat::messages::IpsecParams,
        nat: &str,
    ) -> Self {
        use vpnnat::messages::{
            AgentDesiredState, AgentMapping, AgentTunnel, RequestId, TerminalName, TunnelKind,
            UnixMillis,
        };
        let config = dir.join("router-agent.toml");
        std::fs::write(
            &config,
            format!(
                "[agent]\nidentity_file = \"{id}\"\nstate_dir = \"{state}\"\nmode = \"{mode}\"\n\
                 [server]\nallow_insecure_http = true\n\
                 [lan]\ninterface = \"{lan_if}\"\nallowed_prefixes = [\"192.168.1.0/24\"]\ndns = false\n\
                 [packet]\ntun_name = \"vpnagent0\"\ncenter_prefixes = [\"172.16.0.0/24\"]\n\
                 [web]\npassword = \"ipsec site page password\"\n\
                 [[terminals]]\nname = \"pc-1\"\naddress = \"192.168.1.10\"\ncheck = \"tcp:80\"\n\
                 [failures]\nlink_watch = false\n",
                id = dir.join("agent.identity").display(),
                state = dir.join("state").display(),
            ),
        )
        .unwrap();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let desired = AgentDesiredState {
            version: 1,
            site_id: SiteId(1),
            tunnel: Some(AgentTunnel {
                gateway_id: GatewayId(1),
                kind: TunnelKind::Ipsec,
                endpoint: endpoint.parse().unwrap(),
                // Carried by every tunnel, unused by IPsec.
                public_key: PrivateKey::from_bytes(rand_bytes()).public_key(),
                persistent_keepalive_s: 5,
                ipsec: Some(params),
                tls: None,
            }),
            mappings: vec![AgentMapping {
                nat_address: nat.parse().unwrap(),
                terminal: TerminalName::new("pc-1").unwrap(),
                request_id: RequestId(1),
                expires_at: UnixMillis(now_ms + 3_600_000),
            }],
            problem: None,
            rotation: None,
        };
        let desired_path = dir.join("desired.json");
        std::fs::write(&desired_path, serde_json::to_vec(&desired).unwrap()).unwrap();
        Self {
            config,
            desired: desired_path,
            log: dir.join("agent.log"),
        }
    }

    /// Creates the agent's key-only identity (`pubkey`), then starts it in
    /// `ns`; it runs as long as `ns`.
    pub fn start(&self, ns: &mut Netns) -> u32 {
        support::run(
            ns.command(support::bin("router-agent"))
                .arg("--config")
                .arg(&self.config)
                .arg("pubkey"),
        );
        let mut cmd = ns.command(support::bin("router-agent"));
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--desired")
            .arg(&self.desired)
            .env("RUST_LOG", "info,vpnnat=debug,router_agent=debug");
        ns.spawn(&mut cmd, Some(&self.log))
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
