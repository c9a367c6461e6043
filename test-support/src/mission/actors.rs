//! The mission's actors: the center (server, gateways, technician), the
//! sites, and a TCP session the technician holds open.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::ipsec::HandRouter;
use super::world::{World, within};
use super::{MAX_TUNNELS, PASSWORD, PC, SERVER_LAN, TECH, Tunnel};

/// One customer site as the scenario sees it.
pub(super) struct Site {
    pub(super) n: usize,
    pub(super) name: String,
    pub(super) id: u64,
    /// How its tunnel runs.
    pub(super) tunnel: Tunnel,
    /// Where its agent's page is (none for the hand-configured router).
    pub(super) page: &'static str,
    /// The LAN host the customer uses to open the page.
    pub(super) lan_host: &'static str,
}

/// The center and the sites, with the credentials the scenario holds.
pub(super) struct Mission {
    pub(super) w: World,
    pub(super) operator_token: String,
    pub(super) csrf: String,
    pub(super) sites: Vec<Site>,
    /// gateway id → name (gw1, gw2).
    pub(super) gateway_names: BTreeMap<u64, String>,
    pub(super) prober: Option<(Child, ChildStdin, BufReader<ChildStdout>)>,
    /// Site 6's router: strongSwan, configured by hand (step 4d).
    pub(super) router: Option<HandRouter>,
}

impl Mission {
    pub(super) fn operator(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let auth = format!("Authorization: Bearer {}", self.operator_token);
        let url = format!("http://127.0.0.1:8080{path}");
        self.w
            .curl("server", &["-X", method, "-H", &auth, &url], body)
    }

    /// The technician's console API (cookie session + CSRF token), from the
    /// technician's host.
    pub(super) fn technician(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let jar = self.w.dir.join("tech.cookies");
        let jar = jar.to_str().unwrap();
        let csrf = format!("X-CSRF-Token: {}", self.csrf);
        let url = format!("http://{SERVER_LAN}{path}");
        self.w.curl(
            "tech",
            &["-X", method, "-b", jar, "-c", jar, "-H", &csrf, &url],
            body,
        )
    }

    pub(super) fn login(&mut self) {
        let jar = self.w.dir.join("tech.cookies");
        let (code, v) = self.w.curl(
            "tech",
            &[
                "-c",
                jar.to_str().unwrap(),
                &format!("http://{SERVER_LAN}/api/v1/login"),
            ],
            Some(&json!({ "name": TECH.0, "password": TECH.1 })),
        );
        assert_eq!(code, 200, "technician login: {v}");
        self.csrf = v["csrf_token"].as_str().unwrap().to_owned();
    }

    /// The agent's JSON API, as the customer's page uses it (from the LAN).
    pub(super) fn page(
        &self,
        s: usize,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let site = &self.sites[s - 1];
        let auth = format!("Authorization: Bearer {PASSWORD}");
        let url = format!("http://{}:8088{path}", site.page);
        self.w
            .curl(site.lan_host, &["-X", method, "-H", &auth, &url], body)
    }

    /// The customer presses the maintenance button for the PC.
    pub(super) fn press(&self, s: usize) -> (u16, Value) {
        self.page(
            s,
            "POST",
            "/api/requests",
            Some(&json!({
                "requester_name": format!("Customer of site {s}"),
                "level": "general",
                "urgency": "high",
                "phone": "+49 30 1234 567",
                "content": "The till does not print.",
                "terminals": ["pc"],
            })),
        )
    }

    /// Presses the button and expects an accepted request: (request id, NAT address).
    pub(super) fn request(&self, s: usize) -> (u64, String) {
        let (code, v) = self.press(s);
        assert_eq!(code, 201, "site {s}'s request: {v}");
        let r = &v["request"];
        let nat = r["terminals"][0]["nat_address"]
            .as_str()
            .unwrap_or_else(|| panic!("no NAT address in {v}"))
            .to_owned();
        (r["id"].as_u64().unwrap(), nat)
    }

    /// The customer of site `s` picks the PC from the list of computers
    /// the agent found on the LAN (after the page's "Search the network"),
    /// instead of typing a name: the request names the PC's MAC, the agent
    /// binds it to a terminal name, and only that name reaches the server.
    /// Returns (request id, NAT address, terminal name, MAC).
    pub(super) fn request_discovered(&self, s: usize) -> (u64, String, String, String) {
        let (code, v) = self.page(s, "POST", "/api/discovery/sweep", None);
        assert!(
            code == 202 || code == 429,
            "site {s}'s network search: {code} {v}"
        );
        let mut found = Value::Null;
        within(
            &format!("site {s}'s page lists the PC {PC}"),
            Duration::from_secs(20),
            || {
                let (code, v) = self.page(s, "GET", "/api/discovery", None);
                assert_eq!(code, 200, "site {s}'s discovery list: {v}");
                found = v["hosts"]
                    .as_array()
                    .and_then(|hs| hs.iter().find(|h| h["address"] == PC).cloned())
                    .unwrap_or(Value::Null);
                !found.is_null()
            },
        );
        let mac = found["mac"].as_str().expect("a MAC").to_owned();
        let (code, v) = self.page(
            s,
            "POST",
            "/api/requests",
            Some(&json!({
                "requester_name": format!("Customer of site {s}"),
                "level": "general",
                "urgency": "high",
                "phone": "+49 30 1234 567",
                "content": "The till does not print.",
                "terminals": [mac],
            })),
        );
        assert_eq!(code, 201, "site {s}'s request for a discovered PC: {v}");
        let r = &v["request"];
        let t = &r["terminals"][0];
        let nat = t["nat_address"]
            .as_str()
            .unwrap_or_else(|| panic!("no NAT address in {v}"))
            .to_owned();
        let name = t["name"].as_str().unwrap_or_default().to_owned();
        assert!(
            !name.contains(':') && !name.contains("192.168."),
            "the server sees a terminal name, not the MAC or LAN address: {name}"
        );
        (r["id"].as_u64().unwrap(), nat, name, mac)
    }

    pub(super) fn agent_status(&self, s: usize) -> Value {
        let (code, v) = self.page(s, "GET", "/api/status", None);
        assert_eq!(code, 200, "site {s}'s status: {v}");
        v
    }

    pub(super) fn site_view(&self, s: usize) -> Value {
        let (code, v) = self.operator("GET", "/api/v1/sites", None);
        assert_eq!(code, 200, "{v}");
        let id = self.sites[s - 1].id;
        v.as_array()
            .unwrap()
            .iter()
            .find(|x| x["site_id"].as_u64() == Some(id))
            .cloned()
            .unwrap()
    }

    pub(super) fn gateways(&self) -> Vec<Value> {
        let (code, v) = self.operator("GET", "/api/v1/gateways", None);
        assert_eq!(code, 200, "{v}");
        v.as_array().unwrap().clone()
    }

    pub(super) fn gateway_of(&self, s: usize) -> Option<u64> {
        self.site_view(s)["gateway_id"].as_u64()
    }

    pub(super) fn gateway_name(&self, id: Option<u64>) -> String {
        id.and_then(|i| self.gateway_names.get(&i).cloned())
            .unwrap_or_else(|| "-".to_owned())
    }

    /// Whether the technician gets site `s`'s page at `addr` (one try).
    pub(super) fn reaches(&self, addr: &str, s: usize) -> bool {
        self.w
            .try_sh(
                "tech",
                &format!("curl -s --max-time 1 --connect-timeout 1 http://{addr}/"),
            )
            .is_some_and(|page| page.contains(&format!("PC {PC} at site {s}<")))
    }

    /// Whether anything at all answers the technician at `addr` (ping or TCP 80).
    pub(super) fn anything_answers(&self, addr: &str) -> bool {
        self.w
            .try_sh("tech", &format!("ping -c 1 -W 1 {addr} >/dev/null"))
            .is_some()
            || self
                .w
                .try_sh(
                    "tech",
                    &format!("curl -s --max-time 1 -o /dev/null http://{addr}/"),
                )
                .is_some()
    }

    /// Which of `sites` ((NAT address, site)) the technician gets the page
    /// of, all tried at once (one try each, at most a second).
    pub(super) fn reaches_many(&self, sites: &[(&str, usize)]) -> Vec<bool> {
        let d = self.w.dir.display();
        let mut script = String::new();
        for (addr, _) in sites {
            script.push_str(&format!(
                "curl -s --max-time 1 --connect-timeout 1 -o {d}/reach-{addr} http://{addr}/ & "
            ));
        }
        script.push_str("wait");
        let _ = self.w.sh_output("tech", &script);
        sites
            .iter()
            .map(|(addr, s)| {
                let file = self.w.dir.join(format!("reach-{addr}"));
                let page = std::fs::read_to_string(&file).unwrap_or_default();
                let _ = std::fs::remove_file(&file);
                page.contains(&format!("PC {PC} at site {s}<"))
            })
            .collect()
    }

    /// Every site's gateway id (`None`: no tunnel), by site number - 1.
    pub(super) fn placement(&self) -> Vec<Option<u64>> {
        let (code, v) = self.operator("GET", "/api/v1/sites", None);
        assert_eq!(code, 200, "{v}");
        let all = v.as_array().unwrap();
        self.sites
            .iter()
            .map(|s| {
                all.iter()
                    .find(|x| x["site_id"].as_u64() == Some(s.id))
                    .and_then(|x| x["gateway_id"].as_u64())
            })
            .collect()
    }

    pub(super) fn reached_within(&self, addr: &str, s: usize, timeout: Duration) -> Duration {
        within(
            &format!("the technician reaching site {s} at {addr}"),
            timeout,
            || self.reaches(addr, s),
        )
    }

    /// The technician's persistent TCP prober (step 9): gets a NAT address on
    /// stdin, connects to port 80 until it succeeds, prints the wall time.
    pub(super) fn probe(&mut self, addr: &str) -> f64 {
        if self.prober.is_none() {
            let script = "import socket, sys, time\n\
                for line in sys.stdin:\n    a = line.strip()\n    end = time.time() + 10\n    ok = None\n\
                \x20   while time.time() < end:\n        try:\n            s = socket.create_connection((a, 80), timeout=0.1)\n\
                \x20           ok = time.time(); s.close(); break\n        except OSError:\n            time.sleep(0.005)\n\
                \x20   print(ok if ok else 'timeout', flush=True)\n";
            let mut c = self
                .w
                .command("tech", "python3")
                .args(["-c", script])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let stdin = c.stdin.take().unwrap();
            let stdout = BufReader::new(c.stdout.take().unwrap());
            self.prober = Some((c, stdin, stdout));
        }
        let (_, stdin, stdout) = self.prober.as_mut().unwrap();
        writeln!(stdin, "{addr}").unwrap();
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        line.trim()
            .parse()
            .unwrap_or_else(|_| panic!("no TCP connection to {addr} within 10 s"))
    }

    /// The technician ends a request from the console.
    pub(super) fn end(&self, id: u64) {
        let (code, v) = self.technician("POST", &format!("/api/v1/requests/{id}/end"), None);
        assert_eq!(code, 200, "end request {id}: {v}");
    }

    /// Waits until site `s` has no mapping, no NAT address and no tunnel.
    pub(super) fn gone_within(&self, s: usize, nat: &str, timeout: Duration) -> Duration {
        within(
            &format!("site {s}'s mapping, NAT address {nat} and tunnel to be gone"),
            timeout,
            || {
                let st = self.agent_status(s);
                let v = self.site_view(s);
                st["mappings"].as_array().is_some_and(Vec::is_empty)
                    && st["tunnel"].is_null()
                    && v["nat_addresses"].as_array().is_some_and(Vec::is_empty)
                    && v["gateway_id"].is_null()
            },
        )
    }
}

impl Drop for Mission {
    fn drop(&mut self) {
        if let Some((mut c, ..)) = self.prober.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // strongSwan's guard goes before the world's namespaces (the fields
        // drop after this body, `w` with them); with `--keep` charon stays
        // (`world.sh down` ends it with its namespace).
        if let Some(router) = self.router.take() {
            if self.w.opts.keep && !std::thread::panicking() {
                router.leave_running();
            } else {
                drop(router);
            }
        }
    }
}

/// A TCP echo session the technician holds open (step 3), checked later.
pub(super) struct HeldEcho {
    pub(super) child: Child,
    pub(super) status: PathBuf,
}

impl HeldEcho {
    /// Sessions to `addrs`; `name` names its status directory and log.
    pub(super) fn start(w: &World, name: &str, addrs: &[&str]) -> Self {
        let status = w.dir.join(name);
        std::fs::create_dir_all(&status).unwrap();
        // One line every 100 ms per session; "open N" counts echoed lines.
        let script = r#"
import os, socket, sys, time
out, addrs = sys.argv[1], sys.argv[2:]
conns = {}
for a in addrs:
    s = socket.create_connection((a, 7), timeout=5)
    s.setblocking(False)
    conns[a] = {"s": s, "seq": 0, "ok": 0, "want": None, "buf": b"", "state": "open"}
def write(a, c):
    tmp = os.path.join(out, a + ".tmp")
    with open(tmp, "w") as f:
        f.write("%s %d\n" % (c["state"], c["ok"]))
    os.replace(tmp, os.path.join(out, a))
while True:
    for a, c in conns.items():
        if c["state"] != "open":
            continue
        try:
            if c["want"] is None:
                c["seq"] += 1
                c["want"] = ("%d\n" % c["seq"]).encode()
                c["s"].sendall(c["want"])
            data = c["s"].recv(4096)
            if not data:
                c["state"] = "closed"
            else:
                c["buf"] += data
                if c["buf"] == c["want"]:
                    c["ok"] += 1
                    c["want"], c["buf"] = None, b""
        except BlockingIOError:
            pass
        except OSError:
            c["state"] = "closed"
        write(a, c)
    time.sleep(0.1)
"#;
        let child = w
            .command("tech", "python3")
            .arg("-c")
            .arg(script)
            .arg(&status)
            .args(addrs)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(w.dir.join(format!("{name}.log"))).unwrap())
            .spawn()
            .unwrap();
        Self { child, status }
    }

    /// (not closed, echoed lines so far); before the first report: (true, 0).
    pub(super) fn read(&self, addr: &str) -> (bool, u64) {
        let text = std::fs::read_to_string(self.status.join(addr)).unwrap_or_default();
        let mut it = text.split_whitespace();
        let open = it.next() != Some("closed");
        (open, it.next().and_then(|n| n.parse().ok()).unwrap_or(0))
    }

    /// Whether the session at `addr` is open and echoes within `timeout`.
    pub(super) fn alive(&self, addr: &str, timeout: Duration) -> bool {
        let (_, before) = self.read(addr);
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            let (open, now) = self.read(addr);
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

// ------------------------------------------------------------ set-up

pub(super) fn server_config(dir: &Path) -> PathBuf {
    let path = dir.join("maintenance-server.toml");
    std::fs::write(
        &path,
        format!(
            "# The center's maintenance server (written by the e2e mission).\n\
             [http]\nlisten = \"0.0.0.0:8080\"\n\
             [state]\ndir = \"{}\"\n\
             [maintenance]\nexpiry_check_ms = 200\n\
             [gateways]\nheartbeat_interval_ms = 500\ndown_after_ms = 3000\npersistent_keepalive_s = 5\n",
            dir.join("server").display()
        ),
    )
    .unwrap();
    path
}

pub(super) fn gateway_config(dir: &Path, name: &str, wan: &str, credential: &str) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let cred = d.join("credential");
    std::fs::write(&cred, credential).unwrap();
    let path = d.join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            "[wireguard]\nlisten = \"0.0.0.0:51820\"\nendpoints = [\"{wan}:51820\"]\n\
             private_key_file = \"{key}\"\nmax_tunnels = {MAX_TUNNELS}\nworkers = 1\n\
             [tls]\nlisten = \"0.0.0.0:443\"\nendpoints = [\"{wan}:443\"]\n\
             certificate_file = \"{cert}\"\nkey_file = \"{tls_key}\"\n\
             [center]\ntun_name = \"vpnnat0\"\ninterface = \"eth0\"\npool = \"10.64.0.0/16\"\n\
             [server]\nurl = \"http://{SERVER_LAN}\"\ncredential_file = \"{cred}\"\npoll_wait_ms = 20000\n\
             [metrics]\nlisten = \"127.0.0.1:9101\"\n",
            key = d.join("gateway.key").display(),
            cert = d.join("tls.crt").display(),
            tls_key = d.join("tls.key").display(),
            cred = cred.display(),
        ),
    )
    .unwrap();
    path
}

/// The agent's configuration; `udp_blocked`: its site lets no UDP out, so
/// it gives UDP 2 s before it falls back to TLS.
pub(super) fn agent_config(dir: &Path, n: usize, netstack: bool, udp_blocked: bool) -> PathBuf {
    let d = dir.join(format!("site{n}"));
    std::fs::create_dir_all(&d).unwrap();
    let (mode, lan_if) = if netstack {
        ("netstack", "eth0")
    } else {
        ("packet", "lan")
    };
    let tunnel = if udp_blocked {
        "[tunnel]\nudp_timeout_s = 2\n"
    } else {
        ""
    };
    let path = d.join("router-agent.toml");
    std::fs::write(
        &path,
        format!(
            "[agent]\nidentity_file = \"{id}\"\nstate_dir = \"{state}\"\nmode = \"{mode}\"\n\
             [server]\npoll_wait_ms = 20000\nallow_insecure_http = true\n\
             {tunnel}[lan]\ninterface = \"{lan_if}\"\nallowed_prefixes = [\"192.168.1.0/24\"]\ndns = false\n\
             [packet]\ntun_name = \"vpnnat-agent\"\ncenter_prefixes = [\"172.16.0.0/24\"]\n\
             [web]\npassword = \"{PASSWORD}\"\n\
             [[terminals]]\nname = \"pc\"\naddress = \"{PC}\"\ndescription = \"The PC at the till\"\ncheck = \"tcp:80\"\n\
             [failures]\nlink_watch = false\n",
            id = d.join("identity").display(),
            state = d.join("state").display(),
        ),
    )
    .unwrap();
    path
}

pub(super) fn start_server(w: &mut World, config: &Path) {
    w.start(
        "maintenance-server",
        "server",
        "maintenance-server",
        &["--config", config.to_str().unwrap(), "serve"],
    );
    within("the maintenance server", Duration::from_secs(20), || {
        w.check_alive();
        w.try_sh("server", "curl -sf http://127.0.0.1:8080/healthz")
            .is_some()
    });
}

pub(super) fn start_gateway(w: &mut World, name: &'static str, config: &Path) {
    w.start(
        name,
        name,
        "gateway",
        &["--config", config.to_str().unwrap()],
    );
    within(&format!("gateway {name}"), Duration::from_secs(20), || {
        w.check_alive();
        w.try_sh(name, "curl -sf http://127.0.0.1:9101/healthz")
            .is_some()
    });
}

/// The center: server, technician, two gateways registered and healthy.
pub(super) fn center(mut w: World) -> Mission {
    let config = server_config(&w.dir);
    let cfg = config.to_str().unwrap().to_owned();
    w.run(
        "server",
        "maintenance-server",
        &[
            "--config",
            &cfg,
            "technician",
            "add",
            TECH.0,
            "--password-stdin",
        ],
        Some(&format!("{}\n", TECH.1)),
    );
    let mut creds = Vec::new();
    for name in ["gw1", "gw2"] {
        let out = w.run(
            "server",
            "maintenance-server",
            &["--config", &cfg, "gateway", "add", name],
            None,
        );
        creds.push(out.lines().last().unwrap().trim().to_owned());
    }
    start_server(&mut w, &config);
    let operator_token = w
        .run(
            "server",
            "maintenance-server",
            &["--config", &cfg, "operator-token"],
            None,
        )
        .trim()
        .to_owned();
    for (i, name) in ["gw1", "gw2"].into_iter().enumerate() {
        let wan = format!("203.0.113.1{}", i + 1);
        let c = gateway_config(&w.dir, name, &wan, &creds[i]);
        start_gateway(&mut w, name, &c);
    }
    let mut m = Mission {
        w,
        operator_token,
        csrf: String::new(),
        sites: Vec::new(),
        gateway_names: BTreeMap::new(),
        prober: None,
        router: None,
    };
    within(
        "both gateways registered and healthy",
        Duration::from_secs(20),
        || {
            let gws = m.gateways();
            gws.len() == 2 && gws.iter().all(|g| g["health"] == "healthy")
        },
    );
    for g in m.gateways() {
        m.gateway_names.insert(
            g["gateway_id"].as_u64().unwrap(),
            g["name"].as_str().unwrap().to_owned(),
        );
    }
    m.login();
    m
}
