//! A site without a router agent, end to end: the real maintenance server,
//! two real gateways, a technician, and a customer router that is nothing
//! but Debian's `wg-quick` (with the userspace wireguard-go) and nftables,
//! configured with exactly the files the server rendered
//! (`GET /api/v1/sites/{id}/wireguard`, written verbatim).
//!
//! ```text
//!  center LAN 172.16.0.0/24 (bridge in `srv`): server .10, gw1 .11, gw2 .12, tech .50
//!  internet 198.51.100.0/24 (bridge in `srv`): gw1 .1, gw2 .2, router .11
//!  router LAN 192.168.1.0/24: router .1, PC .10 (HTTP :80, TCP echo :7)
//! ```
//!
//! Network safety: every address lives in namespaces this test creates;
//! none has a default route; the namespaces and every process in them are
//! removed on drop (also on a failed assertion).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use vpnnat_test_support::echo::{ping_within, tcp_echo_transfer};
use vpnnat_test_support::{
    Netns, Prereq, bin, rand_bytes, repo_path, require, run_with_input, temp_dir, veth, wait_until,
};

const PREREQS: &[Prereq] = &[
    Prereq::Root,
    Prereq::Tun,
    Prereq::Program("ip"),
    Prereq::Program("ping"),
    Prereq::Program("nft"),
    Prereq::Program("wireguard-go"),
    Prereq::Program("wg"),
    Prereq::Program("wg-quick"),
    Prereq::Program("python3"),
    Prereq::Program("curl"),
];

const OPERATOR_TOKEN: &str = "vnop_agentless-test-operator-token";
const SERVER: &str = "http://172.16.0.10:8080";

/// The interfaces the rendered files bring up (named by the files). The
/// control sockets of wireguard-go live in the shared /var/run/wireguard,
/// so they are removed on drop.
const INTERFACES: [&str; 2] = ["vpnnat-g1", "vpnnat-g2"];

struct World {
    srv: Netns,
    gws: Vec<Netns>,
    gw_pids: Vec<Option<u32>>,
    tech: Netns,
    router: Netns,
    _pc: Netns,
    dir: tempfile::TempDir,
    jar: PathBuf,
    csrf: String,
}

impl Drop for World {
    fn drop(&mut self) {
        for i in INTERFACES {
            let _ = self.router.try_sh(&format!(
                "WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go wg-quick down {}",
                self.path(&format!("router/{i}.conf")).display()
            ));
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{i}.sock"));
        }
        if std::thread::panicking() {
            for name in ["server", "gw1", "gw2"] {
                let log =
                    std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!("---- {name}.log (last lines)");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

impl World {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn up() -> Self {
        let srv = Netns::new("alsv");
        let tech = Netns::new("altc");
        let router = Netns::new("alrt");
        let mut pc = Netns::new("alpc");
        srv.sh("ip link add clan type bridge && ip link set clan up \
             && ip link add inet type bridge && ip link set inet up");
        // The server's own leg on the center LAN.
        srv.sh(
            "ip link add s-srv type veth peer name s-srv-br && ip link set s-srv-br master clan \
             && ip link set s-srv-br up && ip addr add 172.16.0.10/24 dev s-srv && ip link set s-srv up",
        );
        veth(&srv, "c-tech", None, &tech, "eth0", Some("172.16.0.50/24"));
        srv.sh("ip link set c-tech master clan");
        // The technician treats the pool as on-link: the carrying gateway
        // answers ARP for the site's NAT addresses.
        tech.sh("ip route add 10.64.0.0/16 dev eth0");
        veth(
            &srv,
            "i-rt",
            None,
            &router,
            "wan0",
            Some("198.51.100.11/24"),
        );
        srv.sh("ip link set i-rt master inet");
        veth(
            &router,
            "lan0",
            Some("192.168.1.1/24"),
            &pc,
            "eth0",
            Some("192.168.1.10/24"),
        );
        router.sh("sysctl -qw net.ipv4.ip_forward=1");
        pc.sh("ip route add 172.16.0.0/24 via 192.168.1.1");
        let dir = temp_dir("agentless");
        std::fs::create_dir_all(dir.path().join("router")).unwrap();
        let mut cmd = pc.command("python3");
        cmd.arg(repo_path("scripts/lan-pc.py")).arg("site bakery");
        pc.spawn(&mut cmd, Some(&dir.path().join("pc.log")));

        let mut gws = Vec::new();
        for n in 1..=2u8 {
            let gw = Netns::new(&format!("algw{n}"));
            veth(
                &srv,
                &format!("c-gw{n}"),
                None,
                &gw,
                "eth0",
                Some(&format!("172.16.0.1{n}/24")),
            );
            veth(
                &srv,
                &format!("i-gw{n}"),
                None,
                &gw,
                "wan0",
                Some(&format!("198.51.100.{n}/24")),
            );
            srv.sh(&format!(
                "ip link set c-gw{n} master clan && ip link set i-gw{n} master inet"
            ));
            gws.push(gw);
        }

        let state = dir.path().join("server");
        std::fs::write(
            dir.path().join("maintenance-server.toml"),
            format!(
                "[http]\nlisten = \"172.16.0.10:8080\"\n[state]\ndir = \"{}\"\n\
                 [operator]\ntoken = \"{OPERATOR_TOKEN}\"\n\
                 [maintenance]\nexpiry_check_ms = 200\n\
                 [gateways]\nheartbeat_interval_ms = 500\ndown_after_ms = 3000\n",
                state.display()
            ),
        )
        .unwrap();
        let mut w = Self {
            srv,
            gws,
            gw_pids: vec![None, None],
            tech,
            router,
            _pc: pc,
            dir,
            jar: PathBuf::new(),
            csrf: String::new(),
        };
        w.jar = w.path("tech.cookies");
        w.server_cli(
            &["technician", "add", "alice", "--password-stdin"],
            Some("tech password 1\n"),
        );
        let mut cmd = w.srv.command(bin("maintenance-server"));
        cmd.arg("--config")
            .arg(w.path("maintenance-server.toml"))
            .arg("serve")
            .env("RUST_LOG", "info");
        let log = w.path("server.log");
        w.srv.spawn(&mut cmd, Some(&log));
        wait_until("the server", Duration::from_secs(20), || {
            w.srv.try_sh(&format!("curl -sf {SERVER}/healthz"))
        });
        for n in 1..=2u8 {
            w.start_gateway(n);
        }
        wait_until(
            "both gateways registered and healthy",
            Duration::from_secs(20),
            || {
                let (_, v) = w.operator("GET", "/api/v1/gateways", None);
                v.as_array()
                    .is_some_and(|a| a.len() == 2 && a.iter().all(|g| g["health"] == "healthy"))
            },
        );
        w
    }

    fn server_cli(&self, args: &[&str], stdin: Option<&str>) -> String {
        let mut cmd = self.srv.command(bin("maintenance-server"));
        cmd.arg("--config")
            .arg(self.path("maintenance-server.toml"))
            .args(args);
        let out = run_with_input(&mut cmd, stdin);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn start_gateway(&mut self, n: u8) {
        let i = usize::from(n - 1);
        let out = self.server_cli(&["gateway", "add", &format!("gw{n}")], None);
        let credential = out.lines().last().unwrap().trim().to_owned();
        let cred = self.path(&format!("gw{n}.credential"));
        std::fs::write(&cred, credential).unwrap();
        let key = self.path(&format!("gw{n}.key"));
        std::fs::write(
            &key,
            vpnnat::tunnel::PrivateKey::from_bytes(rand_bytes()).to_base64(),
        )
        .unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let config = self.path(&format!("gw{n}.toml"));
        std::fs::write(
            &config,
            format!(
                "[wireguard]\nlisten = \"0.0.0.0:51820\"\nendpoints = [\"198.51.100.{n}:51820\"]\n\
                 private_key_file = \"{key}\"\nworkers = 1\n\
                 [center]\ntun_name = \"vpnnat0\"\ninterface = \"eth0\"\npool = \"10.64.0.0/16\"\n\
                 technician_prefixes = [\"172.16.0.0/24\"]\n\
                 [metrics]\nlisten = \"127.0.0.1:9101\"\n\
                 [server]\nurl = \"{SERVER}\"\ncredential_file = \"{cred}\"\npoll_wait_ms = 5000\n",
                key = key.display(),
                cred = cred.display(),
            ),
        )
        .unwrap();
        let gw = &mut self.gws[i];
        let mut cmd = gw.command(bin("gateway"));
        cmd.arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info,vpnnat=debug");
        let log = self.dir.path().join(format!("gw{n}.log"));
        self.gw_pids[i] = Some(gw.spawn(&mut cmd, Some(&log)));
        let gw = &self.gws[i];
        wait_until("the gateway", Duration::from_secs(15), || {
            gw.try_sh("curl -sf http://127.0.0.1:9101/healthz")
        });
    }

    fn kill_gateway(&mut self, id: u64) {
        let i = usize::try_from(id - 1).unwrap();
        if let Some(pid) = self.gw_pids[i].take() {
            self.gws[i].kill(pid);
        }
    }

    /// `curl` in the server's namespace: (status, JSON body).
    fn curl(&self, args: &[&str], body: Option<&Value>) -> (u16, Value) {
        let mut cmd = self.srv.command("curl");
        cmd.args(["-s", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}"])
            .args(args);
        if body.is_some() {
            cmd.args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                "@-",
            ]);
        }
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(b) = body {
            use std::io::Write as _;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(b.to_string().as_bytes())
                .unwrap();
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.trim_end().rsplit_once('\n').unwrap_or(("", "0"));
        (
            code.parse().unwrap_or(0),
            serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned())),
        )
    }

    fn operator(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let auth = format!("Authorization: Bearer {OPERATOR_TOKEN}");
        let url = format!("{SERVER}{path}");
        self.curl(&["-X", method, "-H", &auth, &url], body)
    }

    fn login(&mut self) {
        let jar = self.jar.display().to_string();
        let (code, v) = self.curl(
            &["-c", &jar, "-X", "POST", &format!("{SERVER}/api/v1/login")],
            Some(&json!({ "name": "alice", "password": "tech password 1" })),
        );
        assert_eq!(code, 200, "{v}");
        self.csrf = v["csrf_token"].as_str().unwrap().to_owned();
    }

    /// A technician's call (session cookie; the CSRF header on changes).
    fn technician(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let jar = self.jar.display().to_string();
        let csrf = format!("X-CSRF-Token: {}", self.csrf);
        let url = format!("{SERVER}{path}");
        self.curl(&["-b", &jar, "-H", &csrf, "-X", method, &url], body)
    }

    fn site_view(&self, id: u64) -> Value {
        let (code, v) = self.operator("GET", "/api/v1/sites", None);
        assert_eq!(code, 200, "{v}");
        v.as_array()
            .unwrap()
            .iter()
            .find(|s| s["site_id"] == id)
            .cloned()
            .unwrap()
    }

    /// Writes the files the server rendered, verbatim, and applies them on
    /// the router: every wg-quick file up (once), the nftables file always.
    fn apply_router_config(&self, config: &Value, bring_up: bool) {
        for f in config["files"].as_array().unwrap() {
            let name = f["name"].as_str().unwrap();
            let path = self.path(&format!("router/{name}"));
            std::fs::write(&path, f["content"].as_str().unwrap()).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            if name.ends_with(".conf") && bring_up {
                let out = self
                    .router
                    .command("wg-quick")
                    .arg("up")
                    .arg(&path)
                    .env("WG_QUICK_USERSPACE_IMPLEMENTATION", "wireguard-go")
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "wg-quick up {name}:\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let nft = self.path("router/vpnnat-nat.nft");
        let out = self
            .router
            .command("nft")
            .arg("-f")
            .arg(&nft)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nft -f:\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&nft).unwrap()
        );
    }

    fn wireguard_config(&self, id: u64) -> Value {
        let (code, v) = self.operator("GET", &format!("/api/v1/sites/{id}/wireguard"), None);
        assert_eq!(code, 200, "{v}");
        v
    }

    fn tech_page(&self, addr: &str) -> bool {
        self.tech
            .command("curl")
            .args(["-s", "--max-time", "3", &format!("http://{addr}/")])
            .output()
            .is_ok_and(|o| {
                String::from_utf8_lossy(&o.stdout).contains("PC 192.168.1.10 at site bakery")
            })
    }
}

#[test]
fn agentless_wireguard_router_reached_by_nat_address_fails_over_and_ends() {
    if !require(PREREQS) {
        return;
    }
    let mut w = World::up();

    // The operator creates the site without an agent: no enrollment token,
    // the server generated the router's key pair.
    let (code, site) = w.operator(
        "POST",
        "/api/v1/sites",
        Some(&json!({ "name": "Bakery", "agent": false })),
    );
    assert_eq!(code, 201, "{site}");
    assert!(site.get("enrollment_token").is_none(), "{site}");
    assert_eq!(site["agent"], false);
    let id = site["site_id"].as_u64().unwrap();
    assert_eq!(w.site_view(id)["agent"], false);

    // Its router configuration: one wg-quick file per gateway (with a QR
    // code) and the nftables file, complete (the private key included).
    let config = w.wireguard_config(id);
    assert_eq!(config["private_key_included"], true, "{config}");
    assert_eq!(config["public_key"], site["public_key"]);
    let files = config["files"].as_array().unwrap();
    let names: Vec<&str> = files.iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["vpnnat-g1.conf", "vpnnat-g2.conf", "vpnnat-nat.nft"],
        "{config}"
    );
    for f in &files[..2] {
        assert!(
            f["qr_svg"].as_str().unwrap().contains("<svg"),
            "{}",
            f["name"]
        );
        let text = f["content"].as_str().unwrap();
        assert!(text.contains("Table = off"), "{text}");
        assert!(text.contains("AllowedIPs = 172.16.0.0/24"), "{text}");
        assert!(text.contains("PersistentKeepalive = 25"), "{text}");
    }
    // The CLI renders the same files.
    let cli = w.server_cli(&["site", "wireguard-config", &id.to_string()], None);
    assert!(cli.contains("# ---- vpnnat-g2.conf"), "{cli}");
    w.apply_router_config(&config, true);

    // The customer phones in; the technician opens the request for them.
    w.login();
    let (code, req) = w.technician(
        "POST",
        &format!("/api/v1/sites/{id}/requests"),
        Some(&json!({
            "requester_name": "Anna Schmidt",
            "level": "general",
            "urgency": "high",
            "phone": "+49 30 1234 567",
            "content": "The till does not print.",
            "terminals": [{ "name": "till", "lan_address": "192.168.1.10" }],
        })),
    );
    assert_eq!(code, 201, "{req}");
    let rid = req["id"].as_u64().unwrap();
    let nat = req["terminals"][0]["nat_address"]
        .as_str()
        .unwrap()
        .to_owned();
    let first_gw = req["gateway_id"].as_u64().unwrap();
    // The audit log names the technician.
    let (_, audit) = w.technician("GET", "/api/v1/audit", None);
    assert!(audit.to_string().contains("technician:alice"), "{audit}");

    // The NAT rules now map the NAT address onto the PC: re-applied verbatim.
    let config = w.wireguard_config(id);
    assert_eq!(config["mappings"][0]["nat_address"], nat.as_str());
    assert_eq!(config["mappings"][0]["lan_address"], "192.168.1.10");
    w.apply_router_config(&config, false);

    // The technician reaches the PC by its NAT address: ping and TCP.
    assert!(
        ping_within(&w.tech, &nat, Duration::from_secs(40)),
        "ping {nat} through gateway {first_gw} failed"
    );
    assert!(w.tech_page(&nat));
    tcp_echo_transfer(&w.tech, &nat, 256 << 10);

    // The gateway carrying the site dies; the server moves the site to the
    // other one, whose tunnel the router keeps up already.
    w.kill_gateway(first_gw);
    wait_until(
        "the server to move the site to the other gateway",
        Duration::from_secs(30),
        || {
            w.site_view(id)["gateway_id"]
                .as_u64()
                .is_some_and(|g| g != first_gw)
        },
    );
    // The mapping and the files do not change with the gateway.
    let moved = w.wireguard_config(id);
    assert_eq!(moved["mappings"], config["mappings"]);
    assert!(
        ping_within(&w.tech, &nat, Duration::from_secs(60)),
        "ping {nat} after the failover failed"
    );
    wait_until(
        "the PC's page after the failover",
        Duration::from_secs(20),
        || w.tech_page(&nat),
    );
    tcp_echo_transfer(&w.tech, &nat, 256 << 10);
    // The traffic took the other gateway's tunnel, on its own interface.
    let other = w.site_view(id)["gateway_id"].as_u64().unwrap();
    let transfer = w.router.sh(&format!("wg show vpnnat-g{other} transfer"));
    let rx: u64 = transfer
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(rx > 256 << 10, "vpnnat-g{other}: {transfer}");

    // The technician ends the request: the NAT address leads nowhere.
    let (code, v) = w.technician("POST", &format!("/api/v1/requests/{rid}/end"), None);
    assert!(code == 200 || code == 204, "{code} {v}");
    let ended = w.wireguard_config(id);
    assert_eq!(ended["mappings"], json!([]));
    let nft = ended["files"][2]["content"].as_str().unwrap();
    assert!(!nft.contains("dnat to"), "{nft}");
    w.apply_router_config(&ended, false);
    wait_until(
        "the NAT address to be unreachable",
        Duration::from_secs(20),
        || !w.tech.try_sh(&format!("ping -c 1 -W 1 {nat}")),
    );
    assert!(!ping_within(&w.tech, &nat, Duration::from_secs(3)));
    assert!(!w.tech_page(&nat));
}
