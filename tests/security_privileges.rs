//! The shipped systemd units give each program the least privilege it needs,
//! and the programs work with exactly that: the maintenance server as an
//! unprivileged user with no capability at all; the gateway as an
//! unprivileged user with only the capabilities its unit names (a TUN device,
//! routes, proxy ARP, forwarding sysctls and gratuitous ARP all work).
//!
//! The units are not started by systemd here (no systemd in CI); the test
//! reads the capabilities from the unit files and runs each program under
//! `setpriv` with that uid and those capability sets, as systemd would.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use vpnnat_test_support::{
    Netns, Prereq, bin, rand_bytes, repo_path, require, temp_dir, veth, wait_until,
};

const PREREQS: &[Prereq] = &[
    Prereq::Root,
    Prereq::Tun,
    Prereq::Program("ip"),
    Prereq::Program("setpriv"),
    Prereq::Program("curl"),
];

/// The unprivileged uid/gid the programs run as here (`nobody`).
const UID: u32 = 65_534;

fn unit(name: &str) -> String {
    std::fs::read_to_string(repo_path(&format!("config/systemd/{name}.service"))).unwrap()
}

/// The values of `key=` lines of a unit, split on whitespace.
fn unit_values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .flat_map(|v| v.split_whitespace().map(str::to_owned))
        .collect()
}

/// `setpriv` arguments for an unprivileged user holding exactly `caps`
/// (`CAP_NET_ADMIN` …) as inheritable, ambient and bounding sets.
fn setpriv(caps: &[String]) -> Vec<String> {
    let list: String = caps
        .iter()
        .map(|c| format!(",+{}", c.trim_start_matches("CAP_").to_ascii_lowercase()))
        .collect();
    vec![
        format!("--reuid={UID}"),
        format!("--regid={UID}"),
        "--clear-groups".into(),
        "--no-new-privs".into(),
        format!("--inh-caps=-all{list}"),
        format!("--ambient-caps=-all{list}"),
        format!("--bounding-set=-all{list}"),
    ]
}

/// The effective capability mask and uid of a running process.
fn creds(pid: u32) -> (u64, u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .to_owned()
    };
    let cap_eff = u64::from_str_radix(&field("CapEff:"), 16).unwrap();
    let uid = field("Uid:")
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    (cap_eff, uid)
}

fn give_to_nobody(dir: &Path) {
    std::os::unix::fs::chown(dir, Some(UID), Some(UID)).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
}

#[test]
fn security_privileges_units_name_a_user_and_only_needed_capabilities() {
    let server = unit("vpnnat-maintenance-server");
    let gateway = unit("vpnnat-gateway");
    let agent = unit("vpnnat-router-agent");
    for (name, text) in [
        ("server", &server),
        ("gateway", &gateway),
        ("agent", &agent),
    ] {
        assert_eq!(
            unit_values(text, "User"),
            ["vpnnat"],
            "{name} runs as vpnnat"
        );
        assert_eq!(unit_values(text, "NoNewPrivileges"), ["yes"], "{name}");
        assert_eq!(unit_values(text, "ProtectSystem"), ["strict"], "{name}");
    }
    assert!(unit_values(&server, "CapabilityBoundingSet").is_empty());
    assert!(unit_values(&server, "AmbientCapabilities").is_empty());
    for (text, caps) in [
        (
            &gateway,
            &["CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"][..],
        ),
        (&agent, &["CAP_NET_ADMIN", "CAP_NET_RAW"][..]),
    ] {
        assert_eq!(unit_values(text, "CapabilityBoundingSet"), caps);
        assert_eq!(
            unit_values(text, "AmbientCapabilities"),
            unit_values(text, "CapabilityBoundingSet")
        );
    }
}

#[test]
fn security_privileges_server_runs_without_any_privilege() {
    if !require(PREREQS) {
        return;
    }
    let caps = unit_values(&unit("vpnnat-maintenance-server"), "AmbientCapabilities");
    assert!(caps.is_empty());
    let dir = temp_dir("priv-server");
    give_to_nobody(dir.path());
    let config = dir.path().join("maintenance-server.toml");
    std::fs::write(
        &config,
        format!(
            "[http]\nlisten = \"127.0.0.1:8080\"\n[state]\ndir = \"{}\"\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut ns = Netns::new("privs");
    let mut cmd = ns.command("setpriv");
    cmd.args(setpriv(&caps))
        .arg(bin("maintenance-server"))
        .args(["--config", config.to_str().unwrap(), "serve"])
        .env("RUST_LOG", "info");
    let log = dir.path().join("server.log");
    let pid = ns.spawn(&mut cmd, Some(&log));
    wait_until("the server as nobody", Duration::from_secs(20), || {
        ns.try_sh("curl -sf http://127.0.0.1:8080/healthz")
    });
    assert_eq!(creds(pid), (0, UID), "no capability, not root");
    // It writes its database and secrets as that user.
    let token = std::fs::read_to_string(dir.path().join("state").join("operator.token")).unwrap();
    let out = ns.sh(&format!(
        "curl -s -o /dev/null -w '%{{http_code}}' -X POST -H 'Authorization: Bearer {}' \
         -H 'Content-Type: application/json' --data '{{\"name\":\"Bakery\"}}' \
         http://127.0.0.1:8080/api/v1/sites",
        token.trim()
    ));
    assert_eq!(out, "201", "{}", std::fs::read_to_string(&log).unwrap());
    let status = ns.terminate(pid, Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn security_privileges_gateway_works_with_only_its_units_capabilities() {
    if !require(PREREQS) {
        return;
    }
    let caps = unit_values(&unit("vpnnat-gateway"), "AmbientCapabilities");
    let mut gw = Netns::new("privg");
    let tech = Netns::new("privt");
    veth(
        &gw,
        "lan0",
        Some("172.16.0.1/24"),
        &tech,
        "eth0",
        Some("172.16.0.50/24"),
    );
    tech.sh("ip route add 10.64.0.0/16 dev eth0");
    let dir = temp_dir("priv-gw");
    give_to_nobody(dir.path());
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
    let site_key = vpnnat::tunnel::PrivateKey::from_bytes(rand_bytes()).public_key();
    let peers = dir.path().join("peers.json");
    std::fs::write(
        &peers,
        serde_json::json!({
            "version": 1,
            "gateway_id": 1,
            "peers": [{"site_id": 3, "public_key": site_key.to_base64(), "nat_addresses": ["10.64.0.5"]}],
        })
        .to_string(),
    )
    .unwrap();
    for f in [&config, &peers] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let mut cmd = gw.command("setpriv");
    cmd.args(setpriv(&caps))
        .arg(bin("gateway"))
        .args(["--config", config.to_str().unwrap()])
        .args(["--peers", peers.to_str().unwrap()])
        .env("RUST_LOG", "info");
    let log = dir.path().join("gateway.log");
    let pid = gw.spawn(&mut cmd, Some(&log));
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until(
        "the gateway's route and proxy entry, as nobody",
        Duration::from_secs(20),
        || {
            gw.sh("ip -4 route show 10.64.0.5/32")
                .contains("dev vpnnat0")
                && gw
                    .sh("ip -4 neigh show proxy dev lan0")
                    .contains("10.64.0.5")
        },
    );
    let (cap_eff, uid) = creds(pid);
    assert_eq!(uid, UID, "not root");
    // CAP_NET_BIND_SERVICE is bit 10 (the TLS fallback's port 443),
    // CAP_NET_ADMIN bit 12, CAP_NET_RAW bit 13: nothing else.
    assert_eq!(cap_eff, (1 << 10) | (1 << 12) | (1 << 13), "{cap_eff:#x}");
    let status = gw.sh("curl -sf http://127.0.0.1:9101/api/v1/status");
    assert!(
        status.contains("\"health\":\"healthy\""),
        "{status}\n{}",
        read_log()
    );
    assert!(
        gw.sh("cat /proc/sys/net/ipv4/conf/lan0/forwarding").trim() == "1",
        "the forwarding sysctl was written"
    );
    // The technician's ARP request is answered from the proxy entry.
    tech.try_sh("ping -c 1 -W 1 10.64.0.5");
    assert!(
        tech.sh("ip neigh show 10.64.0.5 dev eth0")
            .contains("lladdr"),
        "{}",
        read_log()
    );
    let status = gw.terminate(pid, Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{status:?}\n{}", read_log());
    assert!(gw.sh("ip -4 neigh show proxy dev lan0").is_empty());
}
