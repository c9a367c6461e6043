//! A handshake flood against a real gateway with several data-plane workers
//! while real router agents rekey through it: the scenario of
//! `tests/security_flood.rs` and `scripts/bench-handshake-flood.sh`.
//!
//! ```text
//!  tech 172.16.0.50 ──lan0── gw: gateway (N workers) + maintenance server
//!   (pings every NAT       │   198.51.100.1 on the bridge "inet"
//!    address)              ├── agent i (198.51.100.(10+i), router-agent, packet mode) ── pc i 192.168.1.10
//!                          └── flooder (198.51.100.200-203, many UDP source ports)
//! ```
//!
//! The agents' sessions are up first (no flood). Then the flooder sends
//! mac1-valid handshake initiations (built by the caller for the gateway's
//! key: anyone who knows the public key can) at a fixed rate from many source
//! ports, and keeps going while every agent reaches WireGuard's
//! Rekey-After-Time (120 s; the technician's pings make the agents send, which
//! is what triggers the rekey) and must rekey through the flood. What is
//! measured per site: when its first handshake and its rekey completed at the
//! gateway, and whether its pings still pass afterwards.
//!
//! `FLOOD_AGENT_LOG` sets the agents' `RUST_LOG` (e.g. `info,boringtun=debug`
//! shows each rekey, cookie and retry); `VPNNAT_KEEP_TEST_DIRS` keeps the logs.
//!
//! Network safety: every address lives in namespaces created here (none has a
//! default route); the flooder sends only to 198.51.100.1 inside them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::netns::{Netns, temp_dir, veth, wait_until};
use crate::prereq::Prereq;
use crate::process::bin;

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

/// WireGuard's Rekey-After-Time (the WireGuard paper, §6.1): an initiator
/// starts a new handshake when it sends on a session this old.
pub const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);

const PASSWORD: &str = "site page password";
const GATEWAY: &str = "198.51.100.1";
const SERVER: &str = "http://198.51.100.1:8080";
const FLOODER_ADDRESSES: [&str; 4] = [
    "198.51.100.200",
    "198.51.100.201",
    "198.51.100.202",
    "198.51.100.203",
];

/// How the scenario is played.
#[derive(Debug, Clone)]
pub struct Options {
    /// Router agents (sites), at most 100.
    pub agents: usize,
    /// The gateway's data-plane workers.
    pub workers: usize,
    /// Initiations per second the flooder aims at.
    pub flood_rate: u32,
    /// UDP source ports per flooder address (4 addresses).
    pub flood_ports: u16,
    /// The gateway's private key (base64).
    pub gateway_key: String,
    /// mac1-valid handshake initiations for the gateway's public key, sent
    /// round-robin.
    pub initiations: Vec<Vec<u8>>,
    /// Zero-length datagrams the flooder sends before the flood.
    pub zero_length: u32,
    /// How long after Rekey-After-Time a rekey may take to count as done.
    pub rekey_slack: Duration,
}

/// One site's figures.
#[derive(Debug, Clone)]
pub struct SiteResult {
    /// The site's id.
    pub site_id: u64,
    /// Its NAT address.
    pub nat: String,
    /// Its latest handshake at the gateway when the flood started (Unix ms).
    pub first_ms: u64,
    /// Its rekey handshake at the gateway (Unix ms), if one completed.
    pub rekey_ms: Option<u64>,
    /// Whether the technician's pings still passed at the end.
    pub alive_at_end: bool,
}

impl SiteResult {
    /// How long after Rekey-After-Time the rekey completed.
    pub fn rekey_delay(&self) -> Option<Duration> {
        let r = self.rekey_ms?;
        let due = self.first_ms + REKEY_AFTER_TIME.as_millis() as u64;
        Some(Duration::from_millis(r.saturating_sub(due)))
    }
}

/// What the scenario measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Per site.
    pub sites: Vec<SiteResult>,
    /// Initiations the flooder sent, and over how long.
    pub flood_sent: u64,
    /// Seconds the flood lasted.
    pub flood_secs: f64,
    /// The gateway's CPU time during the flood, in percent of one core.
    pub gateway_cpu_percent: f64,
    /// The gateway's drop counters at the end, by reason.
    pub drops: BTreeMap<String, u64>,
    /// `malformed` drops the zero-length datagrams added (before the flood).
    pub zero_length_counted: u64,
    /// Cookie replies the gateway sent.
    pub cookie_replies: u64,
}

impl Outcome {
    /// Sites whose rekey completed within `slack` of Rekey-After-Time.
    pub fn rekeyed_within(&self, slack: Duration) -> usize {
        self.sites
            .iter()
            .filter(|s| s.rekey_delay().is_some_and(|d| d <= slack))
            .count()
    }

    /// Sites whose pings passed at the end.
    pub fn alive(&self) -> usize {
        self.sites.iter().filter(|s| s.alive_at_end).count()
    }

    /// The flood rate achieved (initiations per second).
    pub fn flood_rate(&self) -> f64 {
        if self.flood_secs > 0.0 {
            self.flood_sent as f64 / self.flood_secs
        } else {
            0.0
        }
    }

    /// The figures on one line (`handshake flood: …`), as the benchmark
    /// script reports them.
    pub fn summary(&self, slack: Duration) -> String {
        let n = self.sites.len();
        let done = self.rekeyed_within(slack);
        let mut delays: Vec<f64> = self
            .sites
            .iter()
            .filter_map(|s| Some(s.rekey_delay()?.as_secs_f64()))
            .collect();
        delays.sort_by(f64::total_cmp);
        let median = delays.get(delays.len() / 2).copied().unwrap_or(f64::NAN);
        let max = delays.last().copied().unwrap_or(f64::NAN);
        format!(
            "handshake flood: {:.0} initiations/s for {:.0} s; {done}/{n} peers ({:.0} %) rekeyed within {} s \
             (after Rekey-After-Time: median {median:.1} s, max {max:.1} s); {}/{n} sessions alive after; \
             gateway CPU {:.0} % of one core; {} cookie replies; drops {:?}",
            self.flood_rate(),
            self.flood_secs,
            done as f64 * 100.0 / n.max(1) as f64,
            slack.as_secs(),
            self.alive(),
            self.gateway_cpu_percent,
            self.cookie_replies,
            self.drops,
        )
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A program of the workspace in a namespace, with a clean environment (the
/// programs read every `VPNNAT_*` variable as configuration).
fn program(ns: &Netns, name: &str) -> Command {
    let mut c = ns.command(bin(name));
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    c
}

fn output(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Site {
    id: u64,
    /// The router's namespace, with its agent (kept until the world goes).
    _router: Netns,
    pc: Netns,
    nat: String,
}

/// The world and its programs; everything goes when it is dropped.
struct World {
    dir: tempfile::TempDir,
    gw: Netns,
    tech: Netns,
    flood: Netns,
    sites: Vec<Site>,
    gateway_pid: u32,
}

impl World {
    fn status(&self) -> Value {
        let out = self
            .gw
            .command("curl")
            .args(["-sf", "http://127.0.0.1:9101/api/v1/status"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn metric(&self, name: &str) -> u64 {
        let text = self.gw.sh("curl -sf http://127.0.0.1:9101/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }

    /// Per site id: (handshakes, latest handshake in Unix ms).
    fn handshakes(&self) -> BTreeMap<u64, (u64, u64)> {
        let s = self.status();
        s["peers"]
            .as_array()
            .map(|peers| {
                peers
                    .iter()
                    .filter_map(|p| {
                        Some((
                            p["site_id"].as_u64()?,
                            (p["handshakes"].as_u64()?, p["latest_handshake"].as_u64()?),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn drops(&self) -> BTreeMap<String, u64> {
        let s = self.status();
        s["drops"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// User + system CPU time of the gateway so far.
    fn gateway_cpu(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.gateway_pid)).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(") ")
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // utime and stime are fields 14 and 15 of the whole line (11 and 12 after the name).
        let ticks: u64 = [11, 12]
            .iter()
            .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
            .sum();
        Duration::from_millis(ticks * 10)
    }

    fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(30).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

fn server_config(dir: &Path) -> PathBuf {
    let path = dir.join("maintenance-server.toml");
    std::fs::write(
        &path,
        format!(
            "[http]\nlisten = \"0.0.0.0:8080\"\n[state]\ndir = \"{}\"\n\
             [gateways]\nheartbeat_interval_ms = 1000\ndown_after_ms = 30000\npersistent_keepalive_s = 5\n",
            dir.join("server").display()
        ),
    )
    .unwrap();
    path
}

fn gateway_config(dir: &Path, opts: &Options, credential: &str) -> PathBuf {
    let key = dir.join("gateway.key");
    std::fs::write(&key, &opts.gateway_key).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let cred = dir.join("gateway.credential");
    std::fs::write(&cred, credential).unwrap();
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            "[wireguard]\nlisten = \"0.0.0.0:51820\"\nendpoints = [\"{GATEWAY}:51820\"]\n\
             private_key_file = \"{}\"\nmax_tunnels = {}\nworkers = {}\n\
             [center]\ntun_name = \"vpnnat0\"\ninterface = \"lan0\"\npool = \"10.64.0.0/16\"\n\
             [server]\nurl = \"http://127.0.0.1:8080\"\ncredential_file = \"{}\"\npoll_wait_ms = 20000\n\
             [metrics]\nlisten = \"127.0.0.1:9101\"\n",
            key.display(),
            opts.agents + 8,
            opts.workers,
            cred.display(),
        ),
    )
    .unwrap();
    path
}

fn agent_config(dir: &Path, n: usize) -> PathBuf {
    let d = dir.join(format!("site{n}"));
    std::fs::create_dir_all(&d).unwrap();
    let path = d.join("router-agent.toml");
    std::fs::write(
        &path,
        format!(
            "[agent]\nidentity_file = \"{id}\"\nstate_dir = \"{state}\"\nmode = \"packet\"\n\
             [server]\npoll_wait_ms = 20000\nallow_insecure_http = true\n\
             [lan]\ninterface = \"lan\"\nallowed_prefixes = [\"192.168.1.0/24\"]\ndns = false\n\
             [packet]\ntun_name = \"vpnnat-agent\"\ncenter_prefixes = [\"172.16.0.0/24\"]\n\
             [web]\npassword = \"{PASSWORD}\"\n\
             [[terminals]]\nname = \"pc\"\naddress = \"192.168.1.10\"\ndescription = \"The PC\"\n\
             [failures]\nlink_watch = false\n",
            id = d.join("identity").display(),
            state = d.join("state").display(),
        ),
    )
    .unwrap();
    path
}

/// The flooder: the initiations round-robin from every source socket at a
/// fixed rate; writes "sent seconds" to its status file every second.
const FLOODER: &str = r#"
import os, socket, sys, time
inits_file, rate, ports, zero, status = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
addrs = sys.argv[6:]
data = open(inits_file, "rb").read()
inits = [data[i:i + 148] for i in range(0, len(data), 148)]
dst = ("198.51.100.1", 51820)
socks = []
for a in addrs:
    for _ in range(ports):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # Cookie replies are not read: keep what the kernel holds for them small.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        s.bind((a, 0))
        s.setblocking(False)
        socks.append(s)
for i in range(zero):
    socks[i % len(socks)].sendto(b"", dst)
print("zero-length sent", flush=True)
sys.stdin.readline()
sent, t0, last = 0, time.monotonic(), 0
while True:
    now = time.monotonic()
    target = int((now - t0) * rate)
    while sent < target:
        try:
            socks[sent % len(socks)].sendto(inits[sent % len(inits)], dst)
        except OSError:
            pass
        sent += 1
    if int(now - t0) != last:
        last = int(now - t0)
        with open(status + ".tmp", "w") as f:
            f.write("%d %.3f\n" % (sent, now - t0))
        os.replace(status + ".tmp", status)
    time.sleep(0.002)
"#;

/// Plays the scenario; panics when the world cannot be built. The caller
/// asserts on the [`Outcome`].
pub fn run(opts: &Options) -> Outcome {
    assert!(opts.agents <= 100 && !opts.initiations.is_empty());
    let dir = temp_dir("flood");
    let d = dir.path().to_owned();
    println!(
        "[world] {} agents, gateway with {} workers",
        opts.agents, opts.workers
    );

    // The gateway's namespace (also the server's), its "internet" bridge and
    // the center LAN with the technician.
    let mut gw = Netns::new("fgw");
    gw.sh(&format!(
        "ip link add inet type bridge && ip addr add {GATEWAY}/24 dev inet && ip link set inet up"
    ));
    let tech = Netns::new("ftc");
    veth(
        &gw,
        "lan0",
        Some("172.16.0.1/24"),
        &tech,
        "eth0",
        Some("172.16.0.50/24"),
    );
    tech.sh("ip route add 10.64.0.0/16 dev eth0");
    let flood = Netns::new("ffl");
    veth(&gw, "fl", None, &flood, "eth0", None);
    gw.sh("ip link set fl master inet");
    for a in FLOODER_ADDRESSES {
        flood.sh(&format!("ip addr add {a}/24 dev eth0"));
    }

    // The server's database: one gateway, the sites with their tokens.
    let server_toml = server_config(&d);
    let cli = |args: &[&str]| {
        output(
            program(&gw, "maintenance-server")
                .arg("--config")
                .arg(&server_toml)
                .args(args),
        )
    };
    let gw_cred = cli(&["gateway", "add", "gw1"])
        .lines()
        .find(|l| l.starts_with("vngw_"))
        .unwrap()
        .to_owned();
    let tokens: Vec<String> = (1..=opts.agents)
        .map(|n| {
            cli(&["site", "add", &format!("site {n}")])
                .lines()
                .find(|l| l.starts_with("vnenroll_"))
                .unwrap()
                .to_owned()
        })
        .collect();
    let mut server = program(&gw, "maintenance-server");
    server.arg("--config").arg(&server_toml).arg("serve");
    gw.spawn(&mut server, Some(&d.join("server.log")));
    wait_until("the maintenance server", Duration::from_secs(30), || {
        gw.try_sh("curl -sf http://127.0.0.1:8080/healthz")
    });

    let gateway_toml = gateway_config(&d, opts, &gw_cred);
    let mut gateway = program(&gw, "gateway");
    gateway
        .arg("--config")
        .arg(&gateway_toml)
        .env("RUST_LOG", "info,boringtun=off");
    let gateway_pid = gw.spawn(&mut gateway, Some(&d.join("gateway.log")));
    wait_until("the gateway to register", Duration::from_secs(30), || {
        gw.try_sh("curl -sf http://127.0.0.1:9101/api/v1/status | grep -q '\"connected\":true'")
    });

    // The sites: a router with its agent, a PC behind it.
    let mut sites = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let n = i + 1;
        let mut agent = Netns::new(&format!("fa{n}"));
        let pc = Netns::new(&format!("fp{n}"));
        veth(
            &gw,
            &format!("s{n}"),
            None,
            &agent,
            "wan0",
            Some(&format!("198.51.100.{}/24", 10 + n)),
        );
        gw.sh(&format!("ip link set s{n} master inet"));
        veth(
            &agent,
            "lan",
            Some("192.168.1.1/24"),
            &pc,
            "eth0",
            Some("192.168.1.10/24"),
        );
        pc.sh("ip route add 172.16.0.0/24 via 192.168.1.1");
        let config = agent_config(&d, n);
        let out = output(
            program(&agent, "router-agent")
                .arg("--config")
                .arg(&config)
                .args(["enroll", "--server", SERVER, "--token", token]),
        );
        assert!(out.contains("enrolled as site"), "{out}");
        let id: u64 = out
            .split("enrolled as site")
            .nth(1)
            .and_then(|r| {
                r.trim_start()
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or(0);
        let mut cmd = program(&agent, "router-agent");
        cmd.arg("--config").arg(&config).env(
            "RUST_LOG",
            std::env::var("FLOOD_AGENT_LOG").unwrap_or_else(|_| "info".into()),
        );
        agent.spawn(&mut cmd, Some(&d.join(format!("agent{n}.log"))));
        sites.push(Site {
            id,
            _router: agent,
            pc,
            nat: String::new(),
        });
    }
    let mut w = World {
        dir,
        gw,
        tech,
        flood,
        sites,
        gateway_pid,
    };

    // Every customer asks for maintenance of the PC.
    for n in 0..w.sites.len() {
        let site = &w.sites[n];
        wait_until(
            &format!("site {}'s page", n + 1),
            Duration::from_secs(30),
            || site.pc.try_sh("curl -sf http://192.168.1.1:8088/healthz"),
        );
        let body = json!({
            "requester_name": format!("Customer {}", n + 1),
            "level": "general",
            "urgency": "high",
            "phone": "+49 30 1234 567",
            "content": "The till does not print.",
            "terminals": ["pc"],
        });
        let post = format!(
            "curl -s --max-time 10 -X POST -H 'Authorization: Bearer {PASSWORD}' \
             -H 'Content-Type: application/json' --data '{body}' http://192.168.1.1:8088/api/requests"
        );
        // The agent answers "server unreachable" until its first contact.
        let t = Instant::now();
        let nat = loop {
            let out = site.pc.sh(&post);
            let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
            if let Some(nat) = v["request"]["terminals"][0]["nat_address"].as_str() {
                break nat.to_owned();
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "site {}'s request: {out}",
                n + 1
            );
            std::thread::sleep(Duration::from_millis(500));
        };
        w.sites[n].nat = nat;
    }
    // The technician pings every PC: the agents send, so they rekey on time.
    let mut pingers = Vec::new();
    for (n, site) in w.sites.iter().enumerate() {
        let mut cmd = w.tech.command("ping");
        cmd.args(["-D", "-n", "-i", "0.5", "-W", "1", &site.nat]);
        pingers.push(w.tech.spawn(
            &mut cmd,
            Some(&w.dir.path().join(format!("ping{}.log", n + 1))),
        ));
    }

    // First handshakes, without flood.
    let n_sites = w.sites.len();
    let t0 = Instant::now();
    loop {
        let up = w.handshakes().values().filter(|(c, _)| *c >= 1).count();
        if up == n_sites {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "only {up} of {n_sites} sites completed a first handshake; gateway log:\n{}",
            w.log_tail("gateway.log")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    for site in &w.sites {
        assert!(
            w.handshakes().contains_key(&site.id),
            "site {} unknown to the gateway",
            site.id
        );
    }
    println!("[1] every agent has a session: {n_sites} sites");

    // The flood.
    let inits_file = w.dir.path().join("initiations.bin");
    let mut bytes = Vec::new();
    for i in &opts.initiations {
        assert_eq!(i.len(), 148, "a handshake initiation is 148 bytes");
        bytes.extend_from_slice(i);
    }
    std::fs::write(&inits_file, bytes).unwrap();
    let malformed_before = w.drops().get("malformed").copied().unwrap_or(0);
    let status_file = w.dir.path().join("flood.status");
    let mut flooder = w.flood.command("python3");
    flooder
        .arg("-c")
        .arg(FLOODER)
        .arg(&inits_file)
        .arg(opts.flood_rate.to_string())
        .arg(opts.flood_ports.to_string())
        .arg(opts.zero_length.to_string())
        .arg(&status_file)
        .args(FLOODER_ADDRESSES)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut flooder = flooder.spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(flooder.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let zero_length_counted = {
        let mut counted = 0;
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            counted = w
                .drops()
                .get("malformed")
                .copied()
                .unwrap_or(0)
                .saturating_sub(malformed_before);
            if counted >= u64::from(opts.zero_length) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        counted
    };
    // Each session's start: its rekey is due Rekey-After-Time later.
    let first = w.handshakes();
    let cpu_before = w.gateway_cpu();
    let flood_start = Instant::now();
    std::io::Write::write_all(flooder.stdin.as_mut().unwrap(), b"go\n").unwrap();
    println!(
        "[2] flooding at {}/s from {} source ports while the agents reach Rekey-After-Time",
        opts.flood_rate,
        usize::from(opts.flood_ports) * FLOODER_ADDRESSES.len()
    );

    // Every site's rekey, or the deadline.
    let latest_first = first.values().map(|(_, at)| *at).max().unwrap_or(0);
    let deadline_ms = latest_first
        + (REKEY_AFTER_TIME + opts.rekey_slack + Duration::from_secs(5)).as_millis() as u64;
    let mut rekey: BTreeMap<u64, u64> = BTreeMap::new();
    while rekey.len() < n_sites && unix_ms() < deadline_ms {
        for (site, (count, at)) in w.handshakes() {
            if first.get(&site).is_some_and(|(c, _)| count > *c) {
                rekey.entry(site).or_insert(at);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // The sessions after the rekey: the pings of the last seconds passed.
    std::thread::sleep(Duration::from_secs(3));
    let end_ms = unix_ms();
    let flood_secs = flood_start.elapsed().as_secs_f64();
    let cpu = w.gateway_cpu().saturating_sub(cpu_before);
    let _ = flooder.kill();
    let _ = flooder.wait();
    let flood_sent = std::fs::read_to_string(&status_file)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let drops = w.drops();
    let cookie_replies = w.metric("vpnnat_gateway_cookie_replies_sent_total");

    let mut results = Vec::new();
    for (n, site) in w.sites.iter().enumerate() {
        let log = std::fs::read_to_string(w.dir.path().join(format!("ping{}.log", n + 1)))
            .unwrap_or_default();
        // "[1700000000.123456] 64 bytes from 10.64.0.5: icmp_seq=..."
        let last_reply_ms = log
            .lines()
            .filter(|l| l.contains("bytes from"))
            .filter_map(|l| {
                let ts = l.strip_prefix('[')?.split(']').next()?;
                Some((ts.parse::<f64>().ok()? * 1000.0) as u64)
            })
            .max()
            .unwrap_or(0);
        let rekey_ms = rekey.get(&site.id).copied();
        results.push(SiteResult {
            site_id: site.id,
            nat: site.nat.clone(),
            first_ms: first.get(&site.id).map_or(0, |(_, at)| *at),
            rekey_ms,
            alive_at_end: last_reply_ms + 3000 >= end_ms
                && rekey_ms.is_some_and(|r| last_reply_ms > r),
        });
    }
    let outcome = Outcome {
        sites: results,
        flood_sent,
        flood_secs,
        gateway_cpu_percent: cpu.as_secs_f64() * 100.0 / flood_secs.max(0.001),
        drops,
        zero_length_counted,
        cookie_replies,
    };
    for s in &outcome.sites {
        println!(
            "      site {:>3} {:<12} rekey {}  pings at the end: {}",
            s.site_id,
            s.nat,
            s.rekey_delay().map_or_else(
                || "none".to_owned(),
                |d| format!("{:.1} s after Rekey-After-Time", d.as_secs_f64())
            ),
            if s.alive_at_end { "pass" } else { "FAIL" }
        );
    }
    if outcome.rekeyed_within(opts.rekey_slack) < n_sites {
        println!("gateway log (last lines):\n{}", w.log_tail("gateway.log"));
    }
    for p in pingers {
        w.tech.kill(p);
    }
    outcome
}
