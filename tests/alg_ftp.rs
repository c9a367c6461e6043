//! FTP through the whole product, in active and passive mode: a technician
//! (python3's ftplib) fetches a 200 kB file from Debian's vsftpd on a
//! customer PC by its NAT address, and uploads one, through the real
//! gateway, the tunnel and the real router agent's 1:1 NAT, in the agent's
//! packet mode and netstack mode.
//!
//! ```text
//!  tech 172.16.0.50 ──lan0── gw (gateway, workers as cores)
//!                            │ inet bridge 198.51.100.1/24
//!                            └── router wan0 198.51.100.11 (router-agent in packet mode,
//!                                  │                          or NAPT to its WAN)
//!                                  └── lan0 bridge 192.168.1.1/24
//!                                        ├── pc 192.168.1.10 (vsftpd)
//!                                        └── ah 192.168.1.20 (router-agent in netstack mode)
//! ```
//!
//! - Passive mode: vsftpd's `227` names 192.168.1.10; the agent's ALG
//!   makes it the NAT address (the client is told to trust that address,
//!   so without the ALG it would connect to an address it cannot reach).
//! - Active mode: the technician's `PORT` names itself; the PC opens the
//!   data connection toward the center, which the gateway lets through only
//!   under the expectation that `PORT` armed. In netstack mode the agent
//!   takes the `PORT` over and opens the data connection from the NAT
//!   address itself.
//! - A site's connection toward the technician without a `PORT` is still
//!   dropped (`site_initiated`).
//!
//! Every address lives in namespaces created here (named per run); none
//! has a default route. The namespaces and their processes go when the
//! world is dropped, also when an assertion fails.
#![allow(clippy::unwrap_used)]

mod gateway_support;

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gateway_support::World;
use vpnnat::messages::{
    AgentDesiredState, AgentMapping, AgentTunnel, GatewayDesiredState, GatewayId, GatewayPeer,
    RequestId, SiteId, TerminalName, TunnelKind, UnixMillis,
};
use vpnnat_test_support::{Netns, Prereq, require, veth, wait_until};

const PREREQS: &[Prereq] = &[
    Prereq::Root,
    Prereq::Tun,
    Prereq::Program("ip"),
    Prereq::Program("nft"),
    Prereq::Program("python3"),
    Prereq::Program("curl"),
    Prereq::Program("sha256sum"),
    Prereq::Program("vsftpd"),
];

const NAT: &str = "10.64.0.5";
const SITE: SiteId = SiteId(1);
/// The size of the file the technician fetches.
const FILE_BYTES: usize = 200 * 1024;

/// Where the agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// On the router, packet mode (the LAN's router toward the center).
    Packet,
    /// On a LAN host behind the router's NAPT, netstack mode.
    Netstack,
}

/// The site: router, PC (running vsftpd), the agent's host in netstack mode.
struct Site {
    router: Netns,
    pc: Netns,
    ah: Option<Netns>,
    mode: Mode,
}

impl Site {
    fn agent_ns(&mut self) -> &mut Netns {
        match self.ah.as_mut() {
            Some(ah) => ah,
            None => &mut self.router,
        }
    }

    /// The agent's page (and metrics) address.
    fn agent_ip(&self) -> &'static str {
        match self.mode {
            Mode::Packet => "192.168.1.1",
            Mode::Netstack => "192.168.1.20",
        }
    }
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn add_site(w: &World, mode: Mode) -> Site {
    let router = Netns::new("ftr");
    let pc = Netns::new("ftp");
    veth(
        &w.gw,
        "site1",
        None,
        &router,
        "wan0",
        Some("198.51.100.11/24"),
    );
    w.gw.sh("ip link set site1 master inet");
    router.sh(
        "ip link add lan0 type bridge && ip addr add 192.168.1.1/24 dev lan0 && ip link set lan0 up \
         && sysctl -qw net.ipv4.ip_forward=1",
    );
    veth(&router, "l-pc", None, &pc, "eth0", Some("192.168.1.10/24"));
    router.sh("ip link set l-pc master lan0");
    // Replies to the center go through the router; deliberately no default route.
    pc.sh("ip route add 172.16.0.0/24 via 192.168.1.1");
    let ah = (mode == Mode::Netstack).then(|| {
        let ah = Netns::new("fta");
        veth(&router, "l-ah", None, &ah, "eth0", Some("192.168.1.20/24"));
        router.sh("ip link set l-ah master lan0");
        ah.sh("ip route add 198.51.100.0/24 via 192.168.1.1");
        // A home router: NAPT to its WAN, no unsolicited inbound.
        router.sh(
            "nft -f - <<'EOF'\n\
             table ip nat {\n\
               chain post { type nat hook postrouting priority srcnat; oifname \"wan0\" masquerade; }\n\
             }\n\
             table inet filter {\n\
               chain filter_forward { type filter hook forward priority filter; policy accept;\n\
                 iifname \"wan0\" ct state established,related accept; iifname \"wan0\" drop; }\n\
             }\n\
             EOF",
        );
        ah
    });
    Site {
        router,
        pc,
        ah,
        mode,
    }
}

/// vsftpd on the PC: anonymous download of `pub/file.bin`, anonymous
/// upload into `incoming/`, both data-connection modes, in the foreground
/// with a configuration of its own. Returns the file's SHA-256 and the
/// directory the uploads land in.
fn start_vsftpd(site: &mut Site, dir: &Path) -> (String, PathBuf) {
    // vsftpd drops to the `ftp` user inside its chroot: the tree must be
    // reachable, the root not writable by it (vsftpd refuses that).
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let root = dir.join("ftproot");
    let incoming = root.join("incoming");
    let empty = dir.join("vsftpd-empty");
    for d in [root.join("pub"), incoming.clone(), empty.clone()] {
        std::fs::create_dir_all(&d).unwrap();
    }
    std::fs::set_permissions(
        &incoming,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let mut data = vec![0u8; FILE_BYTES];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut data)
        .unwrap();
    let file = root.join("pub/file.bin");
    std::fs::write(&file, &data).unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let config = dir.join("vsftpd.conf");
    std::fs::write(
        &config,
        format!(
            "listen=YES\nlisten_ipv6=NO\nbackground=NO\n\
             anonymous_enable=YES\nlocal_enable=NO\nno_anon_password=YES\n\
             anon_root={root}\nwrite_enable=YES\nanon_upload_enable=YES\n\
             anon_mkdir_write_enable=NO\nanon_other_write_enable=NO\n\
             pasv_enable=YES\npasv_min_port=40000\npasv_max_port=40100\n\
             port_enable=YES\nconnect_from_port_20=YES\n\
             pasv_promiscuous=NO\nport_promiscuous=NO\n\
             secure_chroot_dir={empty}\nseccomp_sandbox=NO\nisolate_network=NO\n\
             xferlog_enable=YES\nlog_ftp_protocol=YES\nvsftpd_log_file={log}\n",
            root = root.display(),
            empty = empty.display(),
            log = dir.join("vsftpd-protocol.log").display(),
        ),
    )
    .unwrap();
    let vsftpd = vpnnat_test_support::prereq::which("vsftpd").unwrap();
    let mut cmd = site.pc.command(vsftpd);
    cmd.arg(&config);
    site.pc.spawn(&mut cmd, Some(&dir.join("vsftpd.log")));
    let pc = &site.pc;
    wait_until("vsftpd on port 21", Duration::from_secs(10), || {
        pc.try_sh(
            "python3 -c 'import socket; socket.create_connection((\"192.168.1.10\", 21), 0.2)'",
        )
    });
    let sum = site.pc.sh(&format!("sha256sum {}", file.display()));
    (sum.split_whitespace().next().unwrap().to_owned(), incoming)
}

/// The technician's FTP client: `RETR pub/file.bin` in `mode` ("active"
/// or "passive"), printing the SHA-256 of what came; with an upload, also
/// `STOR incoming/NAME` of `bytes` random bytes, printing their SHA-256.
const CLIENT: &str = r#"
import ftplib, hashlib, os, sys, io
host, mode = sys.argv[1], sys.argv[2]
ftp = ftplib.FTP()
ftp.connect(host, 21, timeout=20)
ftp.login()
ftp.set_pasv(mode == "passive")
# Use the address the 227 reply names (the default replaces it by the
# control connection's peer, which would hide what the ALG does).
ftp.trust_server_pasv_ipv4_address = True
h = hashlib.sha256()
ftp.retrbinary("RETR pub/file.bin", h.update)
print("got", h.hexdigest())
if len(sys.argv) > 3:
    name, size = sys.argv[3], int(sys.argv[4])
    data = os.urandom(size)
    ftp.storbinary("STOR incoming/" + name, io.BytesIO(data))
    print("sent", hashlib.sha256(data).hexdigest())
ftp.quit()
"#;

/// Runs the client in the technician's namespace; its printed lines.
fn ftp_client(w: &World, mode: &str, upload: Option<(&str, usize)>) -> Vec<(String, String)> {
    let mut cmd = w.tech.command("python3");
    cmd.args(["-c", CLIENT, NAT, mode]);
    if let Some((name, size)) = upload {
        cmd.args([name, &size.to_string()]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "ftp client ({mode}) failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect()
}

fn agent_metric(site: &mut Site, sample: &str) -> u64 {
    let ip = site.agent_ip();
    site.agent_ns()
        .sh(&format!("curl -sf http://{ip}:8088/metrics"))
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0)
}

/// The gateway standalone (peers file), the agent standalone (desired-state
/// file) with one mapping NAT → 192.168.1.10, vsftpd on the PC; returns
/// once the technician reaches port 21 by the NAT address.
fn world(tag: &str, mode: Mode) -> (World, Site, String, PathBuf) {
    let mut w = World::new(tag, "dev eth0");
    let mut site = add_site(&w, mode);
    let d = w.dir.path().to_owned();
    let (agent_mode, lan_if) = match mode {
        Mode::Packet => ("packet", "lan0"),
        Mode::Netstack => ("netstack", "eth0"),
    };
    let config = d.join("router-agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nidentity_file = \"{id}\"\nstate_dir = \"{state}\"\nmode = \"{agent_mode}\"\n\
             [server]\nallow_insecure_http = true\n\
             [lan]\ninterface = \"{lan_if}\"\nallowed_prefixes = [\"192.168.1.0/24\"]\ndns = false\n\
             [packet]\ntun_name = \"vpnagent0\"\ncenter_prefixes = [\"172.16.0.0/24\"]\n\
             [web]\npassword = \"ftp site page password\"\n\
             [[terminals]]\nname = \"pc-1\"\naddress = \"192.168.1.10\"\ncheck = \"tcp:21\"\n\
             [failures]\nlink_watch = false\n",
            id = d.join("agent.identity").display(),
            state = d.join("state").display(),
        ),
    )
    .unwrap();
    let out = vpnnat_test_support::run(
        site.agent_ns()
            .command(vpnnat_test_support::bin("router-agent"))
            .arg("--config")
            .arg(&config)
            .arg("pubkey"),
    );
    let agent_key = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    w.set_peers(&GatewayDesiredState {
        next_keys: Vec::new(),
        version: 1,
        gateway_id: GatewayId(1),
        allowed_sources: Vec::new(),
        key_rotation: None,
        peers: vec![GatewayPeer {
            site_id: SITE,
            public_key: agent_key,
            nat_addresses: vec![NAT.parse().unwrap()],
            tunnel: TunnelKind::Wireguard,
            ipsec: None,
            tls_token_sha256: None,
        }],
    });
    w.start_gateway();
    let desired = AgentDesiredState {
        version: 1,
        site_id: SITE,
        tunnel: Some(AgentTunnel {
            gateway_id: GatewayId(1),
            kind: TunnelKind::Wireguard,
            endpoint: "198.51.100.1:51820".parse().unwrap(),
            public_key: w.gw_key.public_key(),
            persistent_keepalive_s: 5,
            ipsec: None,
            tls: None,
        }),
        mappings: vec![AgentMapping {
            nat_address: NAT.parse().unwrap(),
            terminal: TerminalName::new("pc-1").unwrap(),
            request_id: RequestId(1),
            expires_at: UnixMillis(wall_ms() + 3_600_000),
        }],
        problem: None,
        rotation: None,
    };
    let desired_file = d.join("desired.json");
    std::fs::write(&desired_file, serde_json::to_vec(&desired).unwrap()).unwrap();
    let (sum, incoming) = start_vsftpd(&mut site, &d);
    let mut cmd = site
        .agent_ns()
        .command(vpnnat_test_support::bin("router-agent"));
    cmd.arg("--config")
        .arg(&config)
        .arg("--desired")
        .arg(&desired_file)
        .env("RUST_LOG", "info,vpnnat=debug,router_agent=debug");
    site.agent_ns().spawn(&mut cmd, Some(&d.join("agent.log")));
    let banner = format!(
        "python3 -c 'import socket; s = socket.create_connection((\"{NAT}\", 21), 1); \
         assert s.recv(64).startswith(b\"220\")'"
    );
    let tech = &w.tech;
    let reached = (0..60).any(|_| {
        tech.try_sh(&banner) || {
            std::thread::sleep(Duration::from_millis(250));
            false
        }
    });
    assert!(
        reached,
        "the technician never reached the PC's FTP server\n{}",
        logs(&w)
    );
    (w, site, sum, incoming)
}

fn logs(w: &World) -> String {
    let d = w.dir.path();
    let read = |n: &str| std::fs::read_to_string(d.join(n)).unwrap_or_default();
    format!(
        "--- agent\n{}\n--- gateway\n{}\n--- vsftpd\n{}{}",
        read("agent.log"),
        w.gateway_log(),
        read("vsftpd.log"),
        read("vsftpd-protocol.log"),
    )
}

/// Downloads in `mode` and checks the file; with an upload, checks what
/// arrived on the PC.
fn transfer(w: &World, mode: &str, sum: &str, upload: Option<(&Path, &str)>) {
    let lines = ftp_client(w, mode, upload.map(|(_, name)| (name, 150_000)));
    let got = lines
        .iter()
        .find(|(k, _)| k == "got")
        .map(|(_, v)| v.as_str());
    assert_eq!(got, Some(sum), "{mode} download\n{}", logs(w));
    if let Some((incoming, name)) = upload {
        let sent = lines.iter().find(|(k, _)| k == "sent").unwrap();
        let path = incoming.join(name);
        let out = std::process::Command::new("sha256sum")
            .arg(&path)
            .output()
            .unwrap();
        let stored = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            stored.split_whitespace().next(),
            Some(sent.1.as_str()),
            "{mode} upload {}",
            path.display()
        );
    }
}

/// A site that opens a connection toward the technician on its own (no
/// `PORT` asked for it) is still refused at the gateway (packet mode: the
/// agent is the PC's router toward the center).
fn site_initiated_is_refused(w: &mut World, site: &Site) {
    let mut cmd = w.tech.command("python3");
    cmd.args([
        "-c",
        "import socket, time\n\
         s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('172.16.0.50', 45000)); s.listen()\n\
         time.sleep(120)",
    ]);
    w.tech.spawn(&mut cmd, None);
    let tech = &w.tech;
    wait_until("the technician's listener", Duration::from_secs(5), || {
        tech.try_sh(
            "python3 -c 'import socket; socket.create_connection((\"172.16.0.50\", 45000), 0.5)'",
        )
    });
    let before = w.metric("vpnnat_gateway_drops_total{reason=\"site_initiated\"}");
    assert!(
        !site.pc.try_sh(
            "python3 -c 'import socket; socket.create_connection((\"172.16.0.50\", 45000), 3)'"
        ),
        "the PC reached the technician without being asked"
    );
    let after = w.metric("vpnnat_gateway_drops_total{reason=\"site_initiated\"}");
    assert!(after > before, "site_initiated {before} → {after}");
}

#[test]
fn alg_ftp_packet_mode_passive_and_active() {
    if !require(PREREQS) {
        return;
    }
    let (mut w, mut site, sum, incoming) = world("alp", Mode::Packet);
    // Passive: the ALG rewrites the 227 reply.
    transfer(&w, "passive", &sum, Some((&incoming, "passive.bin")));
    assert!(
        agent_metric(&mut site, "vpnnat_agent_ftp_alg_lines_rewritten_total") >= 2,
        "{}",
        logs(&w)
    );
    // Active: the PC's data connection passes under the expectation.
    transfer(&w, "active", &sum, Some((&incoming, "active.bin")));
    let used = w.metric("vpnnat_gateway_ftp_expectations_total{event=\"used\"}");
    assert!(used >= 2, "expectations used: {used}\n{}", logs(&w));
    site_initiated_is_refused(&mut w, &site);
    // Nothing the ALG met was left unrewritten.
    let ip = site.agent_ip();
    let metrics = site
        .agent_ns()
        .sh(&format!("curl -sf http://{ip}:8088/metrics"));
    for l in metrics
        .lines()
        .filter(|l| l.starts_with("vpnnat_agent_ftp_alg_unrewritten_total"))
    {
        assert!(l.ends_with(" 0"), "{l}");
    }
}

#[test]
fn alg_ftp_netstack_mode_passive_and_active() {
    if !require(PREREQS) {
        return;
    }
    let (w, mut site, sum, incoming) = world("aln", Mode::Netstack);
    transfer(&w, "passive", &sum, None);
    // Active: the agent takes the PORT over and opens the data connection
    // from the NAT address; the gateway lets it through under the
    // expectation.
    transfer(&w, "active", &sum, Some((&incoming, "active.bin")));
    transfer(&w, "active", &sum, None);
    // RETR and STOR, then RETR again: three data connections.
    assert_eq!(
        agent_metric(&mut site, "vpnnat_agent_netstack_ftp_active_data_total"),
        3,
        "{}",
        logs(&w)
    );
    let used = w.metric("vpnnat_gateway_ftp_expectations_total{event=\"used\"}");
    assert!(used >= 3, "expectations used: {used}\n{}", logs(&w));
    // One 227 rewritten, three PORTs taken over (counted as they pass).
    let rewritten = agent_metric(&mut site, "vpnnat_agent_ftp_alg_lines_rewritten_total");
    assert_eq!(rewritten, 4, "{}", logs(&w));
}
