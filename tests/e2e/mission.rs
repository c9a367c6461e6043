//! The whole mission, end to end: the world of `scripts/world.sh` (an
//! internet, a center with the maintenance server, two gateways and a
//! technician, three customer sites that all use 192.168.1.0/24) and the
//! scenario of the acceptance test, played by the real programs.
//!
//! One piece of code serves both the CI test (`tests/e2e_mission.rs`) and the
//! demo (`examples/demo.rs`, run by `scripts/demo.sh`): every step is told
//! (`say`) and asserted (a failed assertion panics with what was expected and
//! where the logs are).
//!
//! Network safety: every address lives in the world's namespaces (none has a
//! default route); everything this code sends goes through `ip netns exec`.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::common::{self, Prereq};

/// What the scenario needs from the machine.
pub const PREREQS: &[Prereq] = &[
    Prereq::Root,
    Prereq::Tun,
    Prereq::Program("ip"),
    Prereq::Program("nft"),
    Prereq::Program("ping"),
    Prereq::Program("curl"),
    Prereq::Program("python3"),
];

const PASSWORD: &str = "site page password";
const TECH: (&str, &str) = ("alice", "technician password 1");
const SERVER_LAN: &str = "172.16.0.10:8080";
const SERVER_WAN: &str = "203.0.113.10:8080";
const PC: &str = "192.168.1.10";
/// Gateways' tunnel slots (the issue: `max_tunnels = 2` each).
const MAX_TUNNELS: u64 = 2;

/// How the mission is played.
#[derive(Debug, Clone)]
pub struct Options {
    /// Namespace prefix of the world (several worlds never collide).
    pub world: String,
    /// Leave the world running at the end (the demo's `--keep`).
    pub keep: bool,
    /// Button press → first TCP connection samples (step 9).
    pub samples: usize,
}

/// One row of the final table.
#[derive(Debug, Clone)]
pub struct Row {
    pub site: String,
    pub lan: &'static str,
    pub nat: String,
    pub gateway: String,
    pub reached: bool,
}

/// What the mission measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub rows: Vec<Row>,
    /// Button press → first successful TCP connection, one per sample.
    pub press_to_tcp: Vec<Duration>,
    /// Technician's "end" → mapping, address and tunnel gone.
    pub end_to_gone: Duration,
    /// kill -9 of a gateway → its site reached again through the other one.
    pub failover: Duration,
}

fn say(step: &str, text: &str) {
    println!("\n[{step}] {text}");
}

fn detail(text: &str) {
    println!("      {text}");
}

/// A running program of the world.
struct Proc {
    host: &'static str,
    child: Child,
}

/// The world: namespaces by `scripts/world.sh`, the programs started here.
struct World {
    opts: Options,
    script: PathBuf,
    dir: PathBuf,
    procs: BTreeMap<String, Proc>,
    up: bool,
}

impl World {
    fn up(opts: Options) -> Self {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/world.sh");
        let dir = std::env::temp_dir().join(format!("vpnnat-{}", opts.world));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = Self {
            opts,
            script,
            dir,
            procs: BTreeMap::new(),
            up: false,
        };
        w.world_sh("up");
        w.up = true;
        w
    }

    fn world_sh(&self, arg: &str) {
        let out = Command::new("bash")
            .arg(&self.script)
            .arg(arg)
            .env("VPNNAT_WORLD", &self.opts.world)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "world.sh {arg} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.opts.world)
    }

    /// A command inside a host's namespace, with a clean environment: the
    /// programs read every `VPNNAT_*` variable as configuration.
    fn command(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(host)])
            .arg(program)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        c
    }

    /// `sh -c script` in a host: its output.
    fn sh_output(&self, host: &str, script: &str) -> std::process::Output {
        self.command(host, "sh")
            .args(["-c", script])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `sh -c script` in a host; its stdout, or `None` when it failed.
    fn try_sh(&self, host: &str, script: &str) -> Option<String> {
        let out = self.sh_output(host, script);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn sh(&self, host: &str, script: &str) -> String {
        let out = self.sh_output(host, script);
        assert!(
            out.status.success(),
            "in {host}: {script}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A workspace program run to completion in a host (a CLI call).
    fn run(&self, host: &str, program: &str, args: &[&str], stdin: Option<&str>) -> String {
        let mut cmd = self.command(host, common::bin(program));
        cmd.args(args);
        let out = common::run_with_input(&mut cmd, stdin);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a long-running workspace program as `name`; output to `name.log`.
    fn start(&mut self, name: &str, host: &'static str, program: &str, args: &[&str]) {
        let log = self.dir.join(format!("{name}.log"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = self.command(host, common::bin(program));
        cmd.args(args)
            .env("RUST_LOG", "info,vpnnat=debug")
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            // Its own process group: a Ctrl-C to the demo does not reach it,
            // so `--keep` can leave it running; `world.sh down` ends it.
            .process_group(0);
        let child = cmd.spawn().unwrap();
        self.procs.insert(name.to_owned(), Proc { host, child });
    }

    /// `kill -9` of a started program (and its reaping).
    fn kill9(&mut self, name: &str) {
        if let Some(mut p) = self.procs.remove(name) {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    fn stop(&mut self, name: &str) {
        let mut p = self.procs.remove(name).unwrap();
        let _ = Command::new("kill")
            .args(["-TERM", &p.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = p.child.try_wait() {
                assert!(status.success(), "{name} exited with {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = p.child.kill();
        panic!("{name} did not stop within 10 s of SIGTERM");
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Fails early when a program has died on its own (gone, or a zombie
    /// not yet reaped).
    fn check_alive(&self) {
        for (name, p) in &self.procs {
            let stat =
                std::fs::read_to_string(format!("/proc/{}/stat", p.child.id())).unwrap_or_default();
            let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
            if !matches!(state, Some(Some(c)) if c != 'Z') {
                panic!(
                    "{name} (in {}) exited by itself; its log is {}:\n{}",
                    p.host,
                    self.dir.join(format!("{name}.log")).display(),
                    self.log(name)
                );
            }
        }
    }

    /// `curl` in a host: (status code, body as JSON or a string).
    fn curl(&self, host: &str, args: &[&str], body: Option<&Value>) -> (u16, Value) {
        let mut cmd = self.command(host, "curl");
        cmd.args(["-s", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"])
            .args(args);
        if body.is_some() {
            cmd.args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                "@-",
            ]);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(b) = body {
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
        let value = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned()));
        (code.parse().unwrap_or(0), value)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "\nmission failed; the programs' logs are in {}",
                self.dir.display()
            );
            for name in self.procs.keys().cloned().collect::<Vec<_>>() {
                let log = self.log(&name);
                let tail: Vec<&str> = log.lines().rev().take(25).collect();
                eprintln!("---- {name}.log (last lines)");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        if self.opts.keep && !std::thread::panicking() {
            return;
        }
        for p in self.procs.values_mut() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        if self.up {
            self.world_sh("down");
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Polls `check` every 20 ms; how long it took, or a panic naming `what`.
fn within(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        if check() {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wall() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

// ------------------------------------------------------------ the actors

/// One customer site as the scenario sees it.
struct Site {
    n: usize,
    name: String,
    id: u64,
    /// Where its agent's page is.
    page: &'static str,
    /// The LAN host the customer uses to open the page.
    lan_host: &'static str,
}

/// The center and the sites, with the credentials the scenario holds.
struct Mission {
    w: World,
    operator_token: String,
    csrf: String,
    sites: Vec<Site>,
    /// gateway id → name (gw1, gw2).
    gateway_names: BTreeMap<u64, String>,
    prober: Option<(Child, ChildStdin, BufReader<ChildStdout>)>,
}

impl Mission {
    fn operator(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let auth = format!("Authorization: Bearer {}", self.operator_token);
        let url = format!("http://127.0.0.1:8080{path}");
        self.w
            .curl("server", &["-X", method, "-H", &auth, &url], body)
    }

    /// The technician's console API (cookie session + CSRF token), from the
    /// technician's host.
    fn technician(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
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

    fn login(&mut self) {
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
    fn page(&self, s: usize, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let site = &self.sites[s - 1];
        let auth = format!("Authorization: Bearer {PASSWORD}");
        let url = format!("http://{}:8088{path}", site.page);
        self.w
            .curl(site.lan_host, &["-X", method, "-H", &auth, &url], body)
    }

    /// The customer presses the maintenance button for the PC.
    fn press(&self, s: usize) -> (u16, Value) {
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
    fn request(&self, s: usize) -> (u64, String) {
        let (code, v) = self.press(s);
        assert_eq!(code, 201, "site {s}'s request: {v}");
        let r = &v["request"];
        let nat = r["terminals"][0]["nat_address"]
            .as_str()
            .unwrap_or_else(|| panic!("no NAT address in {v}"))
            .to_owned();
        (r["id"].as_u64().unwrap(), nat)
    }

    fn agent_status(&self, s: usize) -> Value {
        let (code, v) = self.page(s, "GET", "/api/status", None);
        assert_eq!(code, 200, "site {s}'s status: {v}");
        v
    }

    fn site_view(&self, s: usize) -> Value {
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

    fn gateways(&self) -> Vec<Value> {
        let (code, v) = self.operator("GET", "/api/v1/gateways", None);
        assert_eq!(code, 200, "{v}");
        v.as_array().unwrap().clone()
    }

    fn gateway_of(&self, s: usize) -> Option<u64> {
        self.site_view(s)["gateway_id"].as_u64()
    }

    fn gateway_name(&self, id: Option<u64>) -> String {
        id.and_then(|i| self.gateway_names.get(&i).cloned())
            .unwrap_or_else(|| "-".to_owned())
    }

    /// Whether the technician gets site `s`'s page at `addr` (one try).
    fn reaches(&self, addr: &str, s: usize) -> bool {
        self.w
            .try_sh(
                "tech",
                &format!("curl -s --max-time 1 --connect-timeout 1 http://{addr}/"),
            )
            .is_some_and(|page| page.contains(&format!("PC {PC} at site {s}<")))
    }

    /// Whether anything at all answers the technician at `addr` (ping or TCP 80).
    fn anything_answers(&self, addr: &str) -> bool {
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

    fn reached_within(&self, addr: &str, s: usize, timeout: Duration) -> Duration {
        within(
            &format!("the technician reaching site {s} at {addr}"),
            timeout,
            || self.reaches(addr, s),
        )
    }

    /// The technician's persistent TCP prober (step 9): gets a NAT address on
    /// stdin, connects to port 80 until it succeeds, prints the wall time.
    fn probe(&mut self, addr: &str) -> f64 {
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
    fn end(&self, id: u64) {
        let (code, v) = self.technician("POST", &format!("/api/v1/requests/{id}/end"), None);
        assert_eq!(code, 200, "end request {id}: {v}");
    }

    /// Waits until site `s` has no mapping, no NAT address and no tunnel.
    fn gone_within(&self, s: usize, nat: &str, timeout: Duration) -> Duration {
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
    }
}

/// A TCP echo session the technician holds open (step 3), checked later.
struct HeldEcho {
    child: Child,
    status: PathBuf,
}

impl HeldEcho {
    fn start(w: &World, addrs: &[&str]) -> Self {
        let status = w.dir.join("held");
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
            .stderr(std::fs::File::create(w.dir.join("held-echo.log")).unwrap())
            .spawn()
            .unwrap();
        Self { child, status }
    }

    /// (not closed, echoed lines so far); before the first report: (true, 0).
    fn read(&self, addr: &str) -> (bool, u64) {
        let text = std::fs::read_to_string(self.status.join(addr)).unwrap_or_default();
        let mut it = text.split_whitespace();
        let open = it.next() != Some("closed");
        (open, it.next().and_then(|n| n.parse().ok()).unwrap_or(0))
    }

    /// Whether the session at `addr` is open and echoes within `timeout`.
    fn alive(&self, addr: &str, timeout: Duration) -> bool {
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

fn server_config(dir: &Path) -> PathBuf {
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

fn gateway_config(dir: &Path, name: &str, wan: &str, credential: &str) -> PathBuf {
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
             [center]\ntun_name = \"vpnnat0\"\ninterface = \"eth0\"\npool = \"10.64.0.0/16\"\n\
             [server]\nurl = \"http://{SERVER_LAN}\"\ncredential_file = \"{cred}\"\npoll_wait_ms = 20000\n\
             [metrics]\nlisten = \"127.0.0.1:9101\"\n",
            key = d.join("gateway.key").display(),
            cred = cred.display(),
        ),
    )
    .unwrap();
    path
}

fn agent_config(dir: &Path, n: usize, netstack: bool) -> PathBuf {
    let d = dir.join(format!("site{n}"));
    std::fs::create_dir_all(&d).unwrap();
    let (mode, lan_if) = if netstack {
        ("netstack", "eth0")
    } else {
        ("packet", "lan")
    };
    let path = d.join("router-agent.toml");
    std::fs::write(
        &path,
        format!(
            "[agent]\nidentity_file = \"{id}\"\nstate_dir = \"{state}\"\nmode = \"{mode}\"\n\
             [server]\npoll_wait_ms = 20000\n\
             [lan]\ninterface = \"{lan_if}\"\nallowed_prefixes = [\"192.168.1.0/24\"]\ndns = false\n\
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

fn start_server(w: &mut World, config: &Path) {
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

fn start_gateway(w: &mut World, name: &'static str, config: &Path) {
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
fn center(mut w: World) -> Mission {
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

// ------------------------------------------------------------ the scenario

/// Plays the mission; panics at the first step that does not hold.
pub fn run(opts: Options) -> Outcome {
    let keep = opts.keep;
    let world_name = opts.world.clone();
    let samples = opts.samples;
    let t_start = Instant::now();
    say(
        "world",
        &format!(
            "building the world \"{world_name}\": an internet, a center (server, gw1, gw2, technician) and three sites, every PC at {PC}"
        ),
    );
    let w = World::up(opts);
    let mut m = center(w);
    detail(
        "maintenance server 203.0.113.10 / 172.16.0.10, gateways gw1 and gw2 (2 tunnel slots each), technician 172.16.0.50",
    );

    // 1. Sites and enrollment.
    say(
        "1",
        "the operator creates three sites; each router agent enrolls with its one-time token",
    );
    for n in 1..=3 {
        let name = format!("site {n}");
        let (code, v) = m.operator("POST", "/api/v1/sites", Some(&json!({ "name": name })));
        assert_eq!(code, 201, "create {name}: {v}");
        let token = v["enrollment_token"].as_str().unwrap().to_owned();
        let netstack = n == 3;
        let (agent_host, page, lan_host) = match n {
            1 => ("r1", "192.168.1.1", "pc1"),
            2 => ("r2", "192.168.1.1", "pc2"),
            _ => ("ah3", "192.168.1.20", "pc3"),
        };
        let config = agent_config(&m.w.dir, n, netstack);
        let cfg = config.to_str().unwrap().to_owned();
        let out = m.w.run(
            agent_host,
            "router-agent",
            &[
                "--config",
                &cfg,
                "enroll",
                "--server",
                &format!("http://{SERVER_WAN}"),
                "--token",
                &token,
            ],
            None,
        );
        assert!(out.contains("enrolled as site"), "{out}");
        // The token is single-use.
        let again =
            m.w.command(agent_host, common::bin("router-agent"))
                .args(["--config", &cfg, "enroll", "--force", "--server"])
                .arg(format!("http://{SERVER_WAN}"))
                .args(["--token", &token])
                .output()
                .unwrap();
        assert!(!again.status.success(), "a used token must be refused");
        m.w.start(
            &format!("agent{n}"),
            agent_host,
            "router-agent",
            &["--config", &cfg],
        );
        m.sites.push(Site {
            n,
            name,
            id: v["site_id"].as_u64().unwrap(),
            page,
            lan_host,
        });
        detail(&format!(
            "{}: agent in {} mode on {agent_host}, page http://{page}:8088/",
            m.sites[n - 1].name,
            if netstack { "netstack" } else { "packet" }
        ));
    }
    for n in 1..=3 {
        within(&format!("site {n}'s page"), Duration::from_secs(20), || {
            m.w.check_alive();
            m.page(n, "GET", "/healthz", None).0 == 200
        });
    }
    within("every site enrolled", Duration::from_secs(5), || {
        (1..=3).all(|n| m.site_view(n)["enrolled"] == true)
    });

    // 2. Sites 1 and 2 press the button.
    say(
        "2",
        "sites 1 and 2 press \"request maintenance\" for their PC",
    );
    let (req1, nat1) = m.request(1);
    let (req2, nat2) = m.request(2);
    assert_ne!(nat1, nat2, "two sites, two NAT addresses");
    detail(&format!("site 1: request {req1}, PC {PC} → {nat1}"));
    detail(&format!("site 2: request {req2}, PC {PC} → {nat2}"));

    // 3. The technician reaches both PCs at once.
    say(
        "3",
        "the technician fetches both PCs' pages at the same time and holds a TCP echo session to each",
    );
    let both = within(
        "both PCs' pages through their NAT addresses",
        Duration::from_secs(10),
        || {
            let out = m.w.try_sh(
                "tech",
                &format!(
                    "curl -s --max-time 1 http://{nat1}/ > {d}/p1 & curl -s --max-time 1 http://{nat2}/ > {d}/p2 & wait; cat {d}/p1 {d}/p2",
                    d = m.w.dir.display()
                ),
            );
            out.is_some_and(|o| {
                o.contains(&format!("PC {PC} at site 1<"))
                    && o.contains(&format!("PC {PC} at site 2<"))
            })
        },
    );
    detail(&format!(
        "http://{nat1}/ → \"PC {PC} at site 1\", http://{nat2}/ → \"PC {PC} at site 2\" ({} ms after the requests)",
        both.as_millis()
    ));
    let held = HeldEcho::start(&m.w, &[&nat1, &nat2]);
    for nat in [&nat1, &nat2] {
        assert!(
            held.alive(nat, Duration::from_secs(5)),
            "the echo session to {nat} works"
        );
    }
    detail("echo sessions to both PCs open");

    // 4. Site 3 lands on a gateway with a free slot.
    say(
        "4",
        "site 3 (agent in netstack mode behind its router's NAPT) requests",
    );
    let slots_before = m.gateways();
    let (req3, nat3) = m.request(3);
    let gw3 = m.gateway_of(3).expect("site 3 has a gateway");
    let tunnels = |gws: &[Value]| {
        gws.iter()
            .find(|g| g["gateway_id"].as_u64() == Some(gw3))
            .and_then(|g| g["tunnels"].as_u64())
            .unwrap()
    };
    let before = tunnels(&slots_before);
    assert!(before < MAX_TUNNELS, "site 3 landed on a full gateway");
    assert_eq!(tunnels(&m.gateways()), before + 1, "site 3 took a slot");
    m.reached_within(&nat3, 3, Duration::from_secs(10));
    detail(&format!(
        "site 3: request {req3}, PC {PC} → {nat3} on {} ({}/{MAX_TUNNELS} slots); site 1 on {}, site 2 on {}",
        m.gateway_name(Some(gw3)),
        before + 1,
        m.gateway_name(m.gateway_of(1)),
        m.gateway_name(m.gateway_of(2)),
    ));
    assert!(
        held.alive(&nat1, Duration::from_secs(3)) && held.alive(&nat2, Duration::from_secs(3)),
        "adding site 3 does not disturb the other sites' sessions"
    );
    detail("the echo sessions to sites 1 and 2 kept working");

    // 5. Isolation.
    say(
        "5",
        "the technician can reach nothing else: no other LAN address, no other site through a gateway, nothing after a request ends",
    );
    let gw_ip = |id: Option<u64>| {
        if m.gateway_name(id) == "gw1" {
            "172.16.0.11"
        } else {
            "172.16.0.12"
        }
    };
    for via in ["172.16.0.11", "172.16.0.12"] {
        m.w.sh(
            "tech",
            &format!("ip route replace 192.168.1.0/24 via {via}"),
        );
        for addr in ["192.168.1.10", "192.168.1.1", "192.168.1.20"] {
            assert!(
                !m.anything_answers(addr),
                "the real LAN address {addr} answered through {via}"
            );
        }
    }
    m.w.sh("tech", "ip route del 192.168.1.0/24");
    for addr in ["10.64.255.254", "10.64.0.1", "10.64.128.7"] {
        if addr != nat1 && addr != nat2 && addr != nat3 {
            assert!(
                !m.anything_answers(addr),
                "unassigned pool address {addr} answered"
            );
        }
    }
    // Site 1's PC through the gateway that carries site 2 (its tunnel only
    // carries site 2's addresses).
    let (g1, g2) = (m.gateway_of(1), m.gateway_of(2));
    if g1 != g2 {
        m.w.sh(
            "tech",
            &format!("ip route replace {nat1}/32 via {}", gw_ip(g2)),
        );
        assert!(
            !m.reaches(&nat1, 1),
            "site 1 reached through site 2's gateway"
        );
        m.w.sh("tech", &format!("ip route del {nat1}/32"));
    }
    assert!(
        m.reaches(&nat2, 2) && !m.reaches(&nat2, 1),
        "NAT(site 2) is site 2's PC only"
    );
    detail("real LAN addresses, free pool addresses and site 1 via site 2's gateway: no answer");
    let (code, v) = m.page(3, "POST", &format!("/api/requests/{req3}/revoke"), None);
    assert_eq!(code, 200, "end access now: {v}");
    let t = within(
        "site 3's PC unreachable after \"end access now\"",
        Duration::from_secs(1),
        || !m.reaches(&nat3, 3),
    );
    assert!(!m.anything_answers(&nat3));
    detail(&format!(
        "site 3 pressed \"end access now\": {nat3} unreachable after {} ms",
        t.as_millis()
    ));

    // 6. The technician ends site 1's request.
    say("6", "the technician starts and then ends site 1's request");
    let (code, v) = m.technician("POST", &format!("/api/v1/requests/{req1}/start"), None);
    assert_eq!(code, 200, "start: {v}");
    m.end(req1);
    let end_to_gone = m.gone_within(1, &nat1, Duration::from_secs(1));
    assert!(!m.reaches(&nat1, 1));
    detail(&format!(
        "mapping, NAT address {nat1} and (its last) tunnel gone after {} ms",
        end_to_gone.as_millis()
    ));
    let (req3b, nat3b) = m.request(3);
    assert!(nat3b != nat1 && nat3b != nat2, "{nat3b} is free");
    m.reached_within(&nat3b, 3, Duration::from_secs(10));
    detail(&format!(
        "site 3 asks again: request {req3b} gets {nat3b} from the pool, on {}",
        m.gateway_name(m.gateway_of(3))
    ));

    // 7. A gateway dies.
    let victim = m.gateway_name(m.gateway_of(2));
    say(
        "7",
        &format!("kill -9 {victim}, the gateway that carries site 2"),
    );
    let held2_before = held.read(&nat2).1;
    let t0 = Instant::now();
    m.w.kill9(&victim);
    let other = within(
        "site 2 moved to the other gateway",
        Duration::from_secs(10),
        || m.gateway_name(m.gateway_of(2)) != victim,
    );
    m.reached_within(
        &nat2,
        2,
        Duration::from_secs(10).saturating_sub(t0.elapsed()),
    );
    let failover = t0.elapsed();
    detail(&format!(
        "site 2 moved to {} after {} ms and is reached at the same address {nat2} after {} ms",
        m.gateway_name(m.gateway_of(2)),
        other.as_millis(),
        failover.as_millis()
    ));
    if held.alive(&nat2, Duration::from_secs(5)) {
        detail(&format!(
            "the technician's held TCP session to {nat2} survived the failover ({} echoes before, {} now)",
            held2_before,
            held.read(&nat2).1
        ));
    }
    // Both remaining slots are taken now (sites 2 and 3): a new site gets a
    // clear answer and nothing is allocated.
    let (code, v) = m.press(1);
    assert_eq!(code, 503, "no capacity: {v}");
    assert!(v.to_string().contains("no_capacity"), "{v}");
    assert!(
        m.site_view(1)["nat_addresses"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    detail("site 1 asks meanwhile: \"no gateway has a free tunnel slot\", nothing allocated");
    let gw_config = m.w.dir.join(&victim).join("gateway.toml");
    let name: &'static str = if victim == "gw1" { "gw1" } else { "gw2" };
    start_gateway(&mut m.w, name, &gw_config);
    within(
        &format!("{victim} healthy again"),
        Duration::from_secs(10),
        || m.gateways().iter().all(|g| g["health"] == "healthy"),
    );
    detail(&format!(
        "the operator restarts {victim}: healthy, its slots free again"
    ));

    // 8. Restart the server.
    say("8", "restart the maintenance server: nothing is lost");
    let snapshot = |m: &Mission| {
        let (code, reqs) = m.technician("GET", "/api/v1/requests", None);
        assert_eq!(code, 200, "{reqs}");
        let sites: Vec<Value> = (1..=3).map(|s| m.site_view(s)).collect();
        (reqs, sites)
    };
    let before = snapshot(&m);
    let config = m.w.dir.join("maintenance-server.toml");
    m.w.stop("maintenance-server");
    start_server(&mut m.w, &config);
    let after = snapshot(&m);
    assert_eq!(before.0, after.0, "the console shows the same requests");
    assert_eq!(
        before.1, after.1,
        "sites keep their gateways and NAT addresses"
    );
    for (s, nat) in [(2, &nat2), (3, &nat3b)] {
        assert!(
            m.reaches(nat, s),
            "site {s} still reached after the restart"
        );
        let maps = m.agent_status(s)["mappings"].clone();
        assert!(maps.to_string().contains(nat.as_str()), "{maps}");
    }
    detail(&format!(
        "{} requests, the same states and NAT addresses; the console session still works",
        after.0.as_array().map_or(0, Vec::len)
    ));

    // 9. Button press → technician's first TCP connection.
    say(
        "9",
        &format!(
            "site 1 presses the button {samples} times: time until the technician's first TCP connection"
        ),
    );
    let mut press_to_tcp = Vec::new();
    for i in 0..samples {
        let t_press = wall();
        let (id, nat) = m.request(1);
        let t_ok = m.probe(&nat);
        press_to_tcp.push(Duration::from_secs_f64((t_ok - t_press).max(0.0)));
        if i + 1 < samples {
            m.end(id);
            m.gone_within(1, &nat, Duration::from_secs(2));
        }
    }
    let (p50, p99) = percentiles(&press_to_tcp);
    detail(&format!(
        "button → first TCP connection: p50 {} ms, p99 {} ms over {} samples (each with a new tunnel)",
        p50.as_millis(),
        p99.as_millis(),
        press_to_tcp.len()
    ));
    detail(&format!(
        "samples in order (ms): {}",
        press_to_tcp
            .iter()
            .map(|d| d.as_millis().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    ));

    // The final table.
    let nat1_now = m.site_view(1)["nat_addresses"][0]
        .as_str()
        .unwrap_or("-")
        .to_owned();
    let rows: Vec<Row> = [(1, nat1_now), (2, nat2.clone()), (3, nat3b.clone())]
        .into_iter()
        .map(|(s, nat)| Row {
            site: m.sites[s - 1].name.clone(),
            lan: PC,
            reached: m.reaches(&nat, s),
            gateway: m.gateway_name(m.gateway_of(s)),
            nat,
        })
        .collect();
    println!("\n  site     LAN address    NAT address    gateway  reached");
    for r in &rows {
        println!(
            "  {:<8} {:<14} {:<14} {:<8} {}",
            r.site,
            r.lan,
            r.nat,
            r.gateway,
            if r.reached { "yes" } else { "no" }
        );
    }
    println!(
        "\n  mission played in {:.1} s",
        t_start.elapsed().as_secs_f64()
    );
    assert!(rows.iter().all(|r| r.reached), "every site reached");
    if keep {
        print_keep_help(&m, &world_name);
    }
    drop(held);
    Outcome {
        rows,
        press_to_tcp,
        end_to_gone,
        failover,
    }
}

/// p50 and p99 (nearest rank) of a non-empty sample.
pub fn percentiles(samples: &[Duration]) -> (Duration, Duration) {
    let mut v = samples.to_vec();
    v.sort();
    let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    (rank(0.50), rank(0.99))
}

fn print_keep_help(m: &Mission, world: &str) {
    let ns = |h: &str| format!("{world}-{h}");
    println!("\nThe world is left running (--keep). As root:");
    println!(
        "  technician console:  ip netns exec {} curl -s http://{SERVER_LAN}/   (login {} / {})",
        ns("tech"),
        TECH.0,
        TECH.1
    );
    println!(
        "    in a browser on this machine, forward it to loopback first, e.g.\n    \
         socat TCP-LISTEN:8080,bind=127.0.0.1,reuseaddr,fork \"EXEC:ip netns exec {} socat STDIO TCP4\\:127.0.0.1\\:8080\"\n    \
         then open http://127.0.0.1:8080/",
        ns("server")
    );
    for s in &m.sites {
        let nat = m.site_view(s.n)["nat_addresses"][0]
            .as_str()
            .unwrap_or("(no request open)")
            .to_owned();
        println!(
            "  {}: ip netns exec {} curl http://{nat}/    page: ip netns exec {} curl -H 'Authorization: Bearer {PASSWORD}' http://{}:8088/api/status",
            s.name,
            ns("tech"),
            ns(s.lan_host),
            s.page
        );
    }
    println!(
        "  logs: {}\n  tear down: VPNNAT_WORLD={world} bash scripts/world.sh down",
        m.w.dir.display()
    );
}
