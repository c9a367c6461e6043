//! The world of the TLS-fallback tests (`tests/fallback_*.rs`): a site whose
//! uplink lets no UDP out, or only an HTTP CONNECT proxy.
//!
//! ```text
//!  inet (router of the "internet"): 203.0.113.1/24 ── gw 203.0.113.11
//!                                   198.51.100.1/24 ── router 198.51.100.11, proxy 198.51.100.80,
//!                                                      stranger 198.51.100.66
//!  gw: maintenance server :8080, gateway (WireGuard UDP :51820, TLS :443),
//!      center LAN 172.16.0.1/24 ── tech 172.16.0.50 (10.64.0.0/16 on-link)
//!  router: the real agent in packet mode, LAN 192.168.1.1/24 ── pc 192.168.1.10
//!          (scripts/lan-pc.py: HTTP :80, TCP echo :7); its uplink shaped by nft
//!  proxy:  Debian's tinyproxy on :8888 (CONNECT only to port 443), started here
//! ```
//!
//! The uplink of the site is set by nftables rules in the router namespace
//! (table `vpnnat_uplink`, hook output and forward on the WAN interface), so
//! they hold for the agent on the router itself and for the LAN behind it.
//!
//! Network safety: every address lives in the world's namespaces (no default
//! route anywhere); every command runs through `ip netns exec`.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::netns::{Netns, temp_dir, veth, wait_until};
use crate::prereq::Prereq;
use crate::process::{bin, repo_path, run, run_with_input};

/// What the world needs from the machine.
pub const PREREQS: &[Prereq] = &[
    Prereq::Root,
    Prereq::Tun,
    Prereq::Program("ip"),
    Prereq::Program("nft"),
    Prereq::Program("curl"),
    Prereq::Program("ping"),
    Prereq::Program("python3"),
];

/// The gateway's (and the server's) address on the internet.
pub const GATEWAY_WAN: &str = "203.0.113.11";
/// The gateway's TLS port.
pub const TLS_PORT: u16 = 443;
/// The site router's WAN address.
pub const ROUTER_WAN: &str = "198.51.100.11";
/// The proxy's address on the internet.
pub const PROXY_ADDR: &str = "198.51.100.80";
/// The proxy's port.
pub const PROXY_PORT: u16 = 8888;
/// An internet host that is no enrolled site.
pub const STRANGER: &str = "198.51.100.66";
/// The page password of the agent.
pub const PASSWORD: &str = "site page password";
/// How long the agent tries UDP before TLS (`[tunnel] udp_timeout_s`).
pub const UDP_TIMEOUT_S: u64 = 2;
/// How often the agent on TLS tries UDP again (`[tunnel] udp_probe_interval_s`).
pub const UDP_PROBE_INTERVAL_S: u64 = 3;

/// How the agent is told about the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxySetting {
    /// `[tunnel] https_proxy` in its configuration file.
    Config,
    /// The `HTTPS_PROXY` environment variable.
    Env,
}

/// The world. Dropping it ends every program and namespace.
pub struct FallbackWorld {
    /// The internet's router.
    pub inet: Netns,
    /// Server, gateway, center LAN.
    pub gw: Netns,
    /// The technician's PC (172.16.0.50).
    pub tech: Netns,
    /// The customer's router, where the agent runs.
    pub router: Netns,
    /// The customer's PC.
    pub pc: Netns,
    /// The HTTP CONNECT proxy, once started.
    pub proxy: Option<Netns>,
    /// A host on the internet that is no site.
    pub stranger: Netns,
    /// Logs, configuration and state.
    pub dir: tempfile::TempDir,
    enrollment_token: String,
    agent_pid: Option<u32>,
}

impl FallbackWorld {
    /// Builds the namespaces and starts the server, the gateway (with its TLS
    /// listener) and the PC's page; the site exists but no agent runs yet.
    pub fn up(tag: &str) -> Self {
        let inet = Netns::new(&format!("{tag}in"));
        let gw = Netns::new(&format!("{tag}gw"));
        let tech = Netns::new(&format!("{tag}tc"));
        let router = Netns::new(&format!("{tag}rt"));
        let mut pc = Netns::new(&format!("{tag}pc"));
        let stranger = Netns::new(&format!("{tag}st"));
        inet.sh(
            "ip link add pub type bridge && ip addr add 203.0.113.1/24 dev pub && ip link set pub up && \
             ip link add sites type bridge && ip addr add 198.51.100.1/24 dev sites && ip link set sites up && \
             sysctl -qw net.ipv4.ip_forward=1",
        );
        veth(
            &inet,
            "p-gw",
            None,
            &gw,
            "wan",
            Some(&format!("{GATEWAY_WAN}/24")),
        );
        inet.sh("ip link set p-gw master pub");
        gw.sh("ip route add 198.51.100.0/24 via 203.0.113.1");
        for (ns, port, addr) in [(&router, "s-rt", ROUTER_WAN), (&stranger, "s-st", STRANGER)] {
            veth(&inet, port, None, ns, "wan", Some(&format!("{addr}/24")));
            inet.sh(&format!("ip link set {port} master sites"));
            ns.sh("ip route add 203.0.113.0/24 via 198.51.100.1");
        }
        veth(
            &gw,
            "lan0",
            Some("172.16.0.1/24"),
            &tech,
            "eth0",
            Some("172.16.0.50/24"),
        );
        tech.sh("ip route add 10.64.0.0/16 dev eth0");
        router.sh(
            "ip link add lan0 type bridge && ip addr add 192.168.1.1/24 dev lan0 && ip link set lan0 up",
        );
        veth(&router, "l-pc", None, &pc, "eth0", Some("192.168.1.10/24"));
        router.sh("ip link set l-pc master lan0");
        pc.sh("ip route add 172.16.0.0/24 via 192.168.1.1");
        let dir = temp_dir(tag);
        let mut cmd = pc.command("python3");
        cmd.arg(repo_path("scripts/lan-pc.py")).arg("site 1");
        pc.spawn(&mut cmd, Some(&dir.path().join("pc.log")));
        let pcr = &pc;
        wait_until("the LAN PC's HTTP server", Duration::from_secs(10), || {
            pcr.try_sh(
                "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 80), 0.2)'",
            )
        });
        let mut w = Self {
            inet,
            gw,
            tech,
            router,
            pc,
            proxy: None,
            stranger,
            dir,
            enrollment_token: String::new(),
            agent_pid: None,
        };
        w.start_center();
        w
    }

    /// A file in the world's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The maintenance server's CLI (in the gateway namespace).
    pub fn server(&self, args: &[&str], stdin: Option<&str>) -> String {
        let mut cmd = self.gw.command(bin("maintenance-server"));
        cmd.arg("--config")
            .arg(self.path("maintenance-server.toml"))
            .args(args)
            .env_remove("VPNNAT_KEEP_TEST_DIRS");
        let out = run_with_input(&mut cmd, stdin);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn start_center(&mut self) {
        let d = self.dir.path().to_owned();
        std::fs::write(
            self.path("maintenance-server.toml"),
            format!(
                "[http]\nlisten = \"0.0.0.0:8080\"\n[state]\ndir = \"{}\"\n\
                 [maintenance]\nexpiry_check_ms = 200\n\
                 [gateways]\nheartbeat_interval_ms = 500\ndown_after_ms = 5000\npersistent_keepalive_s = 5\n",
                d.join("server").display()
            ),
        )
        .unwrap();
        let site = self.server(&["site", "add", "Bakery Schmidt"], None);
        self.enrollment_token = site.lines().last().unwrap().trim().to_owned();
        let gw = self.server(&["gateway", "add", "gw1"], None);
        let credential = gw.lines().last().unwrap().trim().to_owned();
        std::fs::write(self.path("gw.credential"), &credential).unwrap();
        let mut cmd = self.gw.command(bin("maintenance-server"));
        cmd.arg("--config")
            .arg(self.path("maintenance-server.toml"))
            .arg("serve")
            .env_remove("VPNNAT_KEEP_TEST_DIRS");
        let log = self.path("server.log");
        self.gw.spawn(&mut cmd, Some(&log));
        let gw_ns = &self.gw;
        wait_until("the server", Duration::from_secs(15), || {
            gw_ns.try_sh("curl -sf http://127.0.0.1:8080/healthz")
        });

        std::fs::write(
            self.path("gw.key"),
            crate::agent_world::base64(&crate::rand_bytes()),
        )
        .unwrap();
        std::fs::write(
            self.path("gateway.toml"),
            format!(
                "[wireguard]\nlisten = \"0.0.0.0:51820\"\nendpoints = [\"{GATEWAY_WAN}:51820\"]\n\
                 private_key_file = \"{key}\"\nworkers = 1\n\
                 [tls]\nlisten = \"0.0.0.0:{TLS_PORT}\"\nendpoints = [\"{GATEWAY_WAN}:{TLS_PORT}\"]\n\
                 certificate_file = \"{cert}\"\nkey_file = \"{tls_key}\"\n\
                 [center]\ntun_name = \"vpnnat0\"\ninterface = \"lan0\"\npool = \"10.64.0.0/16\"\n\
                 [metrics]\nlisten = \"127.0.0.1:9101\"\n\
                 [server]\nurl = \"http://127.0.0.1:8080\"\ncredential_file = \"{cred}\"\npoll_wait_ms = 20000\n",
                key = d.join("gw.key").display(),
                cert = d.join("gw-tls.crt").display(),
                tls_key = d.join("gw-tls.key").display(),
                cred = d.join("gw.credential").display(),
            ),
        )
        .unwrap();
        let mut cmd = self.gw.command(bin("gateway"));
        cmd.arg("--config")
            .arg(self.path("gateway.toml"))
            .env("RUST_LOG", "info,vpnnat=debug,gateway=debug");
        let log = self.path("gateway.log");
        self.gw.spawn(&mut cmd, Some(&log));
        let gw_ns = &self.gw;
        wait_until("the gateway", Duration::from_secs(15), || {
            gw_ns.try_sh("curl -sf http://127.0.0.1:9101/healthz")
        });
        wait_until(
            "the gateway's TLS listener",
            Duration::from_secs(10),
            || {
                gw_ns.try_sh(&format!(
                    "curl -sk --max-time 1 -o /dev/null https://{GATEWAY_WAN}:{TLS_PORT}/"
                ))
            },
        );
    }

    /// Lets no UDP leave the site (counted, so a test can see the agent tried).
    pub fn block_udp(&self) {
        self.uplink_rules("meta l4proto udp counter drop");
    }

    /// Lets nothing leave the site but TCP to the proxy.
    pub fn proxy_only(&self) {
        self.uplink_rules(&format!(
            "ip daddr {PROXY_ADDR} tcp dport {PROXY_PORT} accept\n\
             meta l4proto udp counter drop\n\
             counter drop"
        ));
    }

    /// Lifts [`Self::block_udp`] or [`Self::proxy_only`].
    pub fn open_uplink(&self) {
        self.router.sh("nft delete table inet vpnnat_uplink");
    }

    fn uplink_rules(&self, rules: &str) {
        let _ = self
            .router
            .try_sh("nft delete table inet vpnnat_uplink 2>/dev/null");
        let chain = |name: &str, hook: &str| {
            format!(
                "chain {name} {{ type filter hook {hook} priority filter; policy accept;\n\
                 oifname != \"wan\" accept\n{rules}\n}}\n"
            )
        };
        self.router.sh(&format!(
            "nft -f - <<'EOF'\ntable inet vpnnat_uplink {{\n{}{}}}\nEOF",
            chain("from_router", "output"),
            chain("from_lan", "forward"),
        ));
    }

    /// UDP packets the uplink rules dropped so far.
    pub fn udp_dropped(&self) -> u64 {
        let out = self.router.sh("nft list table inet vpnnat_uplink");
        out.lines()
            .filter(|l| l.contains("udp") && l.contains("drop"))
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                it.find(|w| *w == "packets")?;
                it.next()?.parse::<u64>().ok()
            })
            .sum()
    }

    /// Starts Debian's tinyproxy on the internet ([`PROXY_ADDR`]), CONNECT only
    /// to port 443, with Basic credentials when given; its log at `proxy.log`.
    pub fn start_proxy(&mut self, credentials: Option<(&str, &str)>) {
        let mut ns = Netns::new("px");
        veth(
            &self.inet,
            "s-px",
            None,
            &ns,
            "wan",
            Some(&format!("{PROXY_ADDR}/24")),
        );
        self.inet.sh("ip link set s-px master sites");
        ns.sh("ip route add 203.0.113.0/24 via 198.51.100.1");
        let auth = credentials.map_or(String::new(), |(u, p)| format!("BasicAuth {u} {p}\n"));
        let conf = self.path("tinyproxy.conf");
        std::fs::write(
            &conf,
            format!(
                "Port {PROXY_PORT}\nListen {PROXY_ADDR}\nTimeout 600\nMaxClients 50\n\
                 PidFile \"{pid}\"\nLogFile \"{log}\"\nLogLevel Connect\n\
                 Allow 198.51.100.0/24\nConnectPort 443\n{auth}",
                pid = self.path("tinyproxy.pid").display(),
                log = self.path("proxy.log").display(),
            ),
        )
        .unwrap();
        let mut cmd = ns.command("tinyproxy");
        cmd.arg("-d").arg("-c").arg(&conf);
        let out = self.path("tinyproxy.out");
        ns.spawn(&mut cmd, Some(&out));
        let nsr = &ns;
        wait_until("tinyproxy", Duration::from_secs(10), || {
            nsr.try_sh(&format!(
                "python3 -c 'import socket; socket.create_connection((\"{PROXY_ADDR}\", {PROXY_PORT}), 0.2)'"
            ))
        });
        self.proxy = Some(ns);
    }

    /// What tinyproxy logged so far.
    pub fn proxy_log(&self) -> String {
        std::fs::read_to_string(self.path("proxy.log")).unwrap_or_default()
    }

    /// Enrolls the agent and starts it. With `proxy`, the agent is told
    /// about the proxy (its tunnel's `https_proxy`; its control plane, plain
    /// HTTP, through the usual `http_proxy`), with the proxy's credentials
    /// when given.
    pub fn start_agent(
        &mut self,
        proxy: Option<(ProxySetting, Option<(&str, &str)>)>,
    ) -> &mut Self {
        let d = self.dir.path().to_owned();
        let proxy_url = proxy.map(|(_, creds)| {
            let userinfo = creds.map_or(String::new(), |(u, p)| format!("{u}:{p}@"));
            format!("http://{userinfo}{PROXY_ADDR}:{PROXY_PORT}")
        });
        let https_proxy = match (proxy, &proxy_url) {
            (Some((ProxySetting::Config, _)), Some(url)) => format!("https_proxy = \"{url}\"\n"),
            _ => String::new(),
        };
        std::fs::write(
            self.path("router-agent.toml"),
            format!(
                "[agent]\nidentity_file = \"{id}\"\nstate_dir = \"{state}\"\nmode = \"packet\"\n\
                 [server]\nallow_insecure_http = true\npoll_wait_ms = 20000\n\
                 [tunnel]\ntransport = \"auto\"\nudp_timeout_s = {UDP_TIMEOUT_S}\n\
                 udp_probe_interval_s = {UDP_PROBE_INTERVAL_S}\n{https_proxy}\
                 [lan]\ninterface = \"lan0\"\ndns = false\n\
                 [packet]\ntun_name = \"vpnagent0\"\ncenter_prefixes = [\"172.16.0.0/24\"]\n\
                 [web]\npassword = \"{PASSWORD}\"\n\
                 [[terminals]]\nname = \"pc-1\"\naddress = \"192.168.1.10\"\ncheck = \"tcp:80\"\n\
                 [failures]\nlink_watch = false\n",
                id = d.join("agent.identity").display(),
                state = d.join("state").display(),
            ),
        )
        .unwrap();
        let with_env = |cmd: &mut std::process::Command| {
            for v in [
                "HTTPS_PROXY",
                "https_proxy",
                "HTTP_PROXY",
                "http_proxy",
                "ALL_PROXY",
                "all_proxy",
                "NO_PROXY",
                "no_proxy",
            ] {
                cmd.env_remove(v);
            }
            if let Some(url) = &proxy_url {
                // The control plane is plain HTTP: the usual variable for it.
                cmd.env("http_proxy", url);
                if matches!(proxy, Some((ProxySetting::Env, _))) {
                    cmd.env("HTTPS_PROXY", url);
                }
            }
        };
        let mut enroll = self.router.command(bin("router-agent"));
        enroll
            .arg("--config")
            .arg(self.path("router-agent.toml"))
            .args([
                "enroll",
                "--server",
                &format!("http://{GATEWAY_WAN}:8080"),
                "--token",
                &self.enrollment_token,
            ]);
        with_env(&mut enroll);
        let out = run(&mut enroll);
        assert!(String::from_utf8_lossy(&out.stdout).contains("enrolled as site"));

        let mut cmd = self.router.command(bin("router-agent"));
        cmd.arg("--config")
            .arg(self.path("router-agent.toml"))
            .env("RUST_LOG", "info,vpnnat=debug,router_agent=debug");
        with_env(&mut cmd);
        let log = self.path("agent.log");
        self.agent_pid = Some(self.router.spawn(&mut cmd, Some(&log)));
        let router = &self.router;
        wait_until("the agent's page", Duration::from_secs(15), || {
            let ok = router.try_sh("curl -sf http://192.168.1.1:8088/healthz");
            if !ok {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                assert!(
                    !text.contains("router-agent failed"),
                    "agent failed:\n{text}"
                );
            }
            ok
        });
        self
    }

    /// `kill -9` of the agent.
    pub fn kill_agent(&mut self) {
        if let Some(pid) = self.agent_pid.take() {
            self.router.kill(pid);
        }
    }

    /// The agent's log.
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.path("agent.log")).unwrap_or_default()
    }

    /// The gateway's log.
    pub fn gateway_log(&self) -> String {
        std::fs::read_to_string(self.path("gateway.log")).unwrap_or_default()
    }

    /// A call to the agent's JSON API with the password: (status, body).
    pub fn agent_api(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let mut cmd = self.router.command("curl");
        cmd.args([
            "-s",
            "--max-time",
            "60",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
        ])
        .args(["-H", &format!("Authorization: Bearer {PASSWORD}")]);
        if let Some(b) = body {
            cmd.args([
                "-H",
                "Content-Type: application/json",
                "--data",
                &b.to_string(),
            ]);
        }
        cmd.arg(format!("http://192.168.1.1:8088{path}"));
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.trim_end().rsplit_once('\n').unwrap_or(("", "0"));
        (
            code.parse().unwrap_or(0),
            serde_json::from_str(body).unwrap_or(Value::String(body.to_owned())),
        )
    }

    /// `POST /api/requests` for `pc-1`; returns its NAT address.
    pub fn request_pc1(&self) -> String {
        let body = serde_json::json!({
            "requester_name": "Anna Schmidt",
            "level": "general",
            "urgency": "high",
            "phone": "+49 30 1234 567",
            "content": "The till does not print.",
            "terminals": ["pc-1"],
        });
        let (code, v) = self.agent_api("POST", "/api/requests", Some(&body));
        assert_eq!(code, 201, "{v}\n{}", self.agent_log());
        v["request"]["terminals"][0]["nat_address"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// The agent's status document (`GET /api/status`).
    pub fn agent_status(&self) -> Value {
        let (code, v) = self.agent_api("GET", "/api/status", None);
        assert_eq!(code, 200, "{v}");
        v
    }

    /// The transport the agent's status names for its tunnel (`udp`,
    /// `tls`, `tls_proxy`).
    pub fn agent_transport(&self) -> Option<String> {
        self.agent_status()["tunnel"]["transport"]
            .as_str()
            .map(str::to_owned)
    }

    /// The agent's Prometheus exposition.
    pub fn agent_metrics(&self) -> String {
        self.router.sh(&format!(
            "curl -sf -H 'Authorization: Bearer {PASSWORD}' http://192.168.1.1:8088/metrics"
        ))
    }

    /// The gateway's status document.
    pub fn gateway_status(&self) -> Value {
        let out = self.gw.sh("curl -sf http://127.0.0.1:9101/api/v1/status");
        serde_json::from_str(&out).unwrap()
    }

    /// The transport of the gateway's (only) peer.
    pub fn gateway_peer_transport(&self) -> Option<String> {
        self.gateway_status()["peers"][0]["transport"]
            .as_str()
            .map(str::to_owned)
    }

    /// The gateway's Prometheus exposition.
    pub fn gateway_metrics(&self) -> String {
        self.gw.sh("curl -sf http://127.0.0.1:9101/metrics")
    }

    /// Waits until what people see says `transport`: the customer page's
    /// overview, the server's view of the open request (the console's
    /// data; the overview carries the server's views) and the operator's
    /// `site list`.
    pub fn wait_shown_transport(&self, transport: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let (_, overview) = self.agent_api("GET", "/api/overview", None);
            let page = overview["transport"].as_str().map(str::to_owned);
            let requests = &overview["requests"];
            let console = requests
                .as_array()
                .and_then(|a| a.iter().find(|r| r["state"] == "waiting"))
                .and_then(|r| r["transport"].as_str())
                .map(str::to_owned);
            let list = self.server(&["site", "list"], None);
            let listed = list
                .lines()
                .nth(1)
                .is_some_and(|l| l.split_whitespace().any(|w| w == transport));
            if page.as_deref() == Some(transport) && console.as_deref() == Some(transport) && listed
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for transport {transport} to be shown: \
                 page {page:?}, request view {console:?}, site list:\n{list}\nrequests: {requests}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Waits until the agent's status, the agent's metrics and the
    /// gateway's peer status all say `transport`.
    pub fn wait_transport(&self, transport: &str, timeout: Duration) {
        let sample = format!("vpnnat_agent_transport{{transport=\"{transport}\"}} 1");
        let deadline = Instant::now() + timeout;
        loop {
            let agent = self.agent_transport();
            let gateway = self.gateway_peer_transport();
            let metrics = self.agent_metrics();
            if agent.as_deref() == Some(transport)
                && gateway.as_deref() == Some(transport)
                && metrics.lines().any(|l| l == sample)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for transport {transport}: agent {agent:?}, \
                 gateway {gateway:?}, agent metrics:\n{}\nagent log:\n{}",
                metrics
                    .lines()
                    .filter(|l| l.contains("transport"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                tail(&self.agent_log(), 40)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Whether the technician gets the PC's page through `addr` (one try).
    pub fn tech_http(&self, addr: &str) -> bool {
        self.tech
            .command("curl")
            .args(["-s", "--max-time", "2", &format!("http://{addr}/")])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("PC 192.168.1.10"))
    }

    /// Waits until the technician reaches the PC at `addr` by ping and by
    /// TCP (its page, and 100 kB through its echo).
    pub fn tech_reaches(&self, addr: &str, timeout: Duration) {
        wait_until(
            &format!("the technician's HTTP to the PC at {addr}"),
            timeout,
            || self.tech_http(addr),
        );
        assert!(
            crate::echo::ping_within(&self.tech, addr, Duration::from_secs(5)),
            "ping {addr}"
        );
        crate::echo::tcp_echo_transfer(&self.tech, addr, 100_000);
    }
}

impl Drop for FallbackWorld {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "fallback world failed; logs in {}",
                self.dir.path().display()
            );
            for name in ["gateway.log", "agent.log", "proxy.log"] {
                let text = std::fs::read_to_string(self.path(name)).unwrap_or_default();
                eprintln!("---- {name} (last lines)\n{}", tail(&text, 30));
            }
        }
    }
}

/// The value of one sample (`name{labels}` exactly as exposed) in a
/// Prometheus exposition.
pub fn metric(exposition: &str, sample: &str) -> Option<u64> {
    exposition.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == sample)
            .then(|| value.parse::<f64>().ok())?
            .map(|v| v as u64)
    })
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A TCP session the technician holds open to a PC's echo (port 7): a line
/// every 100 ms, each echoed line counted in a status file.
pub struct HeldEcho {
    child: Child,
    status: PathBuf,
}

impl HeldEcho {
    /// Opens the session from `ns` to `addr`:7.
    pub fn start(ns: &Netns, dir: &Path, addr: &str) -> Self {
        let status = dir.join("held-echo");
        let script = r#"
import os, socket, sys, time
out, addr = sys.argv[1], sys.argv[2]
s = socket.create_connection((addr, 7), timeout=30)
ok, seq = 0, 0
def write(state):
    with open(out + ".tmp", "w") as f:
        f.write("%s %d\n" % (state, ok))
    os.replace(out + ".tmp", out)
try:
    while True:
        seq += 1
        want = ("%d\n" % seq).encode()
        s.sendall(want)
        got = b""
        while len(got) < len(want):
            chunk = s.recv(4096)
            if not chunk:
                raise OSError("closed")
            got += chunk
        if got != want:
            raise OSError("garbled")
        ok += 1
        write("open")
        time.sleep(0.1)
except OSError as e:
    write("closed")
    print(e, file=sys.stderr)
"#;
        let child = ns
            .command("python3")
            .arg("-c")
            .arg(script)
            .arg(&status)
            .arg(addr)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(dir.join("held-echo.log")).unwrap())
            .spawn()
            .unwrap();
        Self { child, status }
    }

    /// (not closed, echoed lines so far).
    pub fn read(&self) -> (bool, u64) {
        let text = std::fs::read_to_string(&self.status).unwrap_or_default();
        let mut it = text.split_whitespace();
        let open = it.next() != Some("closed");
        (open, it.next().and_then(|n| n.parse().ok()).unwrap_or(0))
    }

    /// Whether the session is open and echoes within `timeout`.
    pub fn alive(&self, timeout: Duration) -> bool {
        let (_, before) = self.read();
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            let (open, now) = self.read();
            if !open {
                return false;
            }
            if now > before {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for HeldEcho {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
