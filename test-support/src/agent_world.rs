//! A small world for the router agent's security tests: the real
//! maintenance server and the real gateway (one namespace, `gw`: the center
//! LAN 172.16.0.0/24 with the technician, the "internet" 198.51.100.0/24),
//! one customer router running the real agent in packet mode (`router`:
//! WAN 198.51.100.11, LAN 192.168.1.1/24) and its PC (192.168.1.10, the
//! HTTP page of `scripts/lan-pc.py`).
//!
//! The agent's link to the server (TCP 8080) can be cut and restored on
//! the router without touching the tunnel, and the agent can be killed
//! and started again on the same state directory.
//!
//! Network safety: everything lives in the world's namespaces (no default
//! route anywhere); every command runs through `ip netns exec`.

use std::path::{Path, PathBuf};
use std::time::Duration;

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
    Prereq::Program("python3"),
];

/// The page password of the agent.
pub const PASSWORD: &str = "site page password";

/// The world. Dropping it ends every program and namespace.
pub struct AgentWorld {
    /// Server, gateway, technician's LAN.
    pub gw: Netns,
    /// The technician's PC (172.16.0.50).
    pub tech: Netns,
    /// The customer's router, where the agent runs.
    pub router: Netns,
    /// The customer's PC.
    pub pc: Netns,
    /// Logs, configuration and state.
    pub dir: tempfile::TempDir,
    agent_pid: Option<u32>,
    agent_runs: usize,
    gateway_pid: Option<u32>,
    gateway_runs: usize,
}

impl AgentWorld {
    /// Builds the namespaces, starts the server, the gateway, the PC's
    /// page, and enrolls and starts the agent.
    pub fn up(tag: &str) -> Self {
        Self::up_with(tag, "")
    }

    /// [`Self::up`] with `server_toml` appended to the server's
    /// configuration (sections it does not set otherwise).
    pub fn up_with(tag: &str, server_toml: &str) -> Self {
        let gw = Netns::new(&format!("{tag}gw"));
        let tech = Netns::new(&format!("{tag}tc"));
        let router = Netns::new(&format!("{tag}rt"));
        let mut pc = Netns::new(&format!("{tag}pc"));
        veth(
            &gw,
            "lan0",
            Some("172.16.0.1/24"),
            &tech,
            "eth0",
            Some("172.16.0.50/24"),
        );
        tech.sh("ip route add 10.64.0.0/16 dev eth0");
        gw.sh("ip link add inet type bridge && ip addr add 198.51.100.1/24 dev inet && ip link set inet up");
        veth(
            &gw,
            "site1",
            None,
            &router,
            "wan0",
            Some("198.51.100.11/24"),
        );
        gw.sh("ip link set site1 master inet");
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
            gw,
            tech,
            router,
            pc,
            dir,
            agent_pid: None,
            agent_runs: 0,
            gateway_pid: None,
            gateway_runs: 0,
        };
        w.start_center(server_toml);
        w
    }

    fn path(&self, name: &str) -> PathBuf {
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

    fn start_center(&mut self, server_toml: &str) {
        let d = self.dir.path().to_owned();
        std::fs::write(
            self.path("maintenance-server.toml"),
            format!(
                "[http]\nlisten = \"0.0.0.0:8080\"\n[state]\ndir = \"{}\"\n\
                 [maintenance]\nexpiry_check_ms = 200\n\
                 [gateways]\nheartbeat_interval_ms = 500\ndown_after_ms = 5000\npersistent_keepalive_s = 5\n\
                 {server_toml}",
                d.join("server").display()
            ),
        )
        .unwrap();
        let site = self.server(&["site", "add", "Bakery Schmidt"], None);
        let token = site.lines().last().unwrap().trim().to_owned();
        let gw = self.server(&["gateway", "add", "gw1"], None);
        let credential = gw.lines().last().unwrap().trim().to_owned();
        std::fs::write(self.path("gw.credential"), &credential).unwrap();
        self.server(
            &["technician", "add", "alice", "--password-stdin"],
            Some("tech password 1\n"),
        );
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

        std::fs::write(self.path("gw.key"), base64(&crate::rand_bytes())).unwrap();
        std::fs::write(
            self.path("gateway.toml"),
            format!(
                "[wireguard]\nlisten = \"0.0.0.0:51820\"\nendpoints = [\"198.51.100.1:51820\"]\n\
                 private_key_file = \"{key}\"\nworkers = 1\n\
                 [center]\ntun_name = \"vpnnat0\"\ninterface = \"lan0\"\npool = \"10.64.0.0/16\"\n\
                 [metrics]\nlisten = \"127.0.0.1:9101\"\n\
                 [server]\nurl = \"http://127.0.0.1:8080\"\ncredential_file = \"{cred}\"\npoll_wait_ms = 20000\n",
                key = d.join("gw.key").display(),
                cred = d.join("gw.credential").display(),
            ),
        )
        .unwrap();
        self.start_gateway(&[]);

        std::fs::write(
            self.path("router-agent.toml"),
            format!(
                "[agent]\nidentity_file = \"{id}\"\nstate_dir = \"{state}\"\nmode = \"packet\"\n\
                 [server]\nallow_insecure_http = true\npoll_wait_ms = 20000\n\
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
        let out = run(self
            .router
            .command(bin("router-agent"))
            .arg("--config")
            .arg(self.path("router-agent.toml"))
            .args([
                "enroll",
                "--server",
                "http://198.51.100.1:8080",
                "--token",
                &token,
            ]));
        assert!(String::from_utf8_lossy(&out.stdout).contains("enrolled as site"));
        self.start_agent();
    }

    /// Starts the agent (again: same configuration and state); waits for its page.
    pub fn start_agent(&mut self) {
        self.agent_runs += 1;
        let mut cmd = self.router.command(bin("router-agent"));
        cmd.arg("--config")
            .arg(self.path("router-agent.toml"))
            .env("RUST_LOG", "info,vpnnat=debug,router_agent=debug");
        let log = self.path(&format!("agent{}.log", self.agent_runs));
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
    }

    /// Starts the gateway (again: same configuration and key files) with
    /// `env` added; waits for its listener. The first run logs to
    /// `gateway.log`, later ones to `gateway2.log`, ….
    pub fn start_gateway(&mut self, env: &[(&str, &str)]) {
        self.gateway_runs += 1;
        let mut cmd = self.gw.command(bin("gateway"));
        cmd.arg("--config")
            .arg(self.path("gateway.toml"))
            .env("RUST_LOG", "info")
            .envs(env.iter().copied());
        let log = match self.gateway_runs {
            1 => self.path("gateway.log"),
            n => self.path(&format!("gateway{n}.log")),
        };
        self.gateway_pid = Some(self.gw.spawn(&mut cmd, Some(&log)));
        let gw_ns = &self.gw;
        wait_until("the gateway", Duration::from_secs(15), || {
            gw_ns.try_sh("curl -sf http://127.0.0.1:9101/healthz")
        });
    }

    /// `kill -9` of the gateway (the only one: the site is stranded).
    pub fn kill_gateway(&mut self) {
        if let Some(pid) = self.gateway_pid.take() {
            self.gw.kill(pid);
        }
    }

    /// `kill -9` of the agent.
    pub fn kill_agent(&mut self) {
        if let Some(pid) = self.agent_pid.take() {
            self.router.kill(pid);
        }
    }

    /// Every log of the agent's runs.
    pub fn agent_log(&self) -> String {
        (1..=self.agent_runs)
            .map(|n| {
                std::fs::read_to_string(self.path(&format!("agent{n}.log"))).unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n---- next run ----\n")
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

    /// `POST /api/requests` for `pc-1`; returns the request id and its NAT address.
    pub fn request_pc1(&self) -> (u64, String) {
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
        let r = &v["request"];
        (
            r["id"].as_u64().unwrap(),
            r["terminals"][0]["nat_address"]
                .as_str()
                .unwrap()
                .to_owned(),
        )
    }

    /// Whether the technician gets the PC's page through `addr` (one try).
    pub fn tech_http(&self, addr: &str) -> bool {
        self.tech
            .command("curl")
            .args(["-s", "--max-time", "2", &format!("http://{addr}/")])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("PC 192.168.1.10"))
    }

    /// Starts a probe from the technician: every 200 ms an HTTP GET of
    /// `addr`; each success appends a line with the time it started (Unix
    /// nanoseconds) to the returned file.
    pub fn start_probe(&mut self, addr: &str) -> PathBuf {
        let file = self.path("probe.log");
        let _ = std::fs::remove_file(&file);
        let script = format!(
            "while true; do t=$(date +%s%N); \
             if curl -s --max-time 1 http://{addr}/ | grep -q 'PC 192.168.1.10'; \
             then echo $t >> {f}; fi; sleep 0.2; done",
            f = file.display()
        );
        let mut cmd = self.tech.command("sh");
        cmd.args(["-c", &script]);
        self.tech.spawn(&mut cmd, None);
        file
    }

    /// The request as the technician's console lists it.
    pub fn console_request(&self, id: u64) -> Value {
        let jar = self.path("tech.cookies");
        self.gw.sh(&format!(
            "curl -sf -c {jar} -H 'Content-Type: application/json' \
             --data '{{\"name\":\"alice\",\"password\":\"tech password 1\"}}' \
             http://127.0.0.1:8080/api/v1/login >/dev/null",
            jar = jar.display()
        ));
        let out = self.gw.sh(&format!(
            "curl -sf -b {} http://127.0.0.1:8080/api/v1/requests",
            jar.display()
        ));
        let all: Value = serde_json::from_str(&out).unwrap();
        all.as_array()
            .and_then(|a| a.iter().find(|r| r["id"] == id).cloned())
            .unwrap_or(Value::Null)
    }

    /// Cuts the agent's link to the server (TCP 8080 refused on the router),
    /// leaving the tunnel alone.
    pub fn cut_server_link(&self) {
        self.router.sh("nft -f - <<'EOF'\n\
             table ip vpnnat_cut {\n\
               chain out { type filter hook output priority filter; policy accept;\n\
                 ip daddr 198.51.100.1 tcp dport 8080 reject with tcp reset; }\n\
             }\n\
             EOF");
    }

    /// Restores the link cut by [`Self::cut_server_link`].
    pub fn restore_server_link(&self) {
        self.router.sh("nft delete table ip vpnnat_cut");
    }

    /// The directory holding the logs.
    pub fn logs(&self) -> &Path {
        self.dir.path()
    }
}

/// Standard base64 with padding (a WireGuard key file holds 32 bytes so).
pub(crate) fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(char::from(A[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}
