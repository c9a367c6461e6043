//! Discovery on the customer's LAN with the real router agent, server and
//! gateway (`AgentWorld`), plus three LAN hosts on the router's LAN bridge:
//!
//! ```text
//!  router lan0 192.168.1.1/24 ── pc    192.168.1.10 (the configured pc-1)
//!                             ├── named 192.168.1.21 (answers mDNS and NetBIOS: "frontdesk")
//!                             ├── anna  192.168.1.22 (named by the customer through the API)
//!                             └── mover 192.168.1.23 → 192.168.1.43 (DHCP-like move mid-session)
//! ```
//!
//! The customer's search (an ARP sweep) lists them with address, MAC and
//! last seen; the named host's own name arrives; the customer's name for
//! another survives an agent restart; the host picked from the list by its
//! MAC keeps its NAT address for the technician (ping and TCP) after it
//! changed its address with a gratuitous ARP. The server never sees a MAC
//! or a LAN address. Once with the agent in packet mode, once in netstack
//! mode (both on the router).
//!
//! Every address lives in namespaces created here; none has a default route.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::Duration;

use serde_json::{Value, json};
use vpnnat_test_support::agent_world::{AgentWorld, PREREQS};
use vpnnat_test_support::{Netns, Prereq, repo_path, require, veth, wait_until};

/// Joins a new host to the router's LAN bridge at `addr`.
fn lan_host(w: &AgentWorld, tag: &str, port: &str, addr: &str) -> Netns {
    let h = Netns::new(tag);
    veth(
        &w.router,
        port,
        None,
        &h,
        "eth0",
        Some(&format!("{addr}/24")),
    );
    w.router.sh(&format!("ip link set {port} master lan0"));
    h.sh("ip route add 172.16.0.0/24 via 192.168.1.1");
    h
}

fn mac_of(h: &Netns) -> String {
    h.sh("cat /sys/class/net/eth0/address").trim().to_owned()
}

fn hosts(w: &AgentWorld) -> Vec<Value> {
    let (code, v) = w.agent_api("GET", "/api/discovery", None);
    assert_eq!(code, 200, "{v}");
    v["hosts"].as_array().cloned().unwrap_or_default()
}

fn host(w: &AgentWorld, mac: &str) -> Option<Value> {
    hosts(w).into_iter().find(|h| h["mac"] == mac)
}

/// Whether the technician gets the mover's page (TCP) through `nat`.
fn tech_reaches_mover(w: &AgentWorld, nat: &str) -> bool {
    w.tech
        .command("curl")
        .args(["-s", "--max-time", "2", &format!("http://{nat}/")])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("at mover host"))
}

fn tech_pings(w: &AgentWorld, nat: &str) -> bool {
    w.tech.try_sh(&format!("ping -c 1 -W 1 {nat} >/dev/null"))
}

#[test]
fn discovery_lan_hosts_names_and_a_terminal_that_moves_packet_mode() {
    lan_world("dsp", "packet");
}

#[test]
fn discovery_lan_hosts_names_and_a_terminal_that_moves_netstack_mode() {
    lan_world("dsn", "netstack");
}

/// The whole story with the agent in `mode` on the router.
fn lan_world(tag: &str, mode: &str) {
    if !require(PREREQS) || !require(&[Prereq::Program("arping"), Prereq::Program("ping")]) {
        return;
    }
    let mut w = AgentWorld::up(tag);
    let mut named = lan_host(&w, &format!("{tag}n"), "l-named", "192.168.1.21");
    let anna = lan_host(&w, &format!("{tag}a"), "l-anna", "192.168.1.22");
    let mut mover = lan_host(&w, &format!("{tag}m"), "l-mover", "192.168.1.23");
    let mut cmd = named.command("python3");
    cmd.arg(repo_path("tests/fixtures/discovery_responder.py"))
        .args(["frontdesk", "192.168.1.21"]);
    let responder_log = w.dir.path().join("responder.log");
    named.spawn(&mut cmd, Some(&responder_log));
    // The agent asks a host for its name once (again only minutes later):
    // the responder must listen before the sweep finds its host.
    wait_until(
        "the name responder listens",
        Duration::from_secs(20),
        || std::fs::read_to_string(&responder_log).is_ok_and(|t| t.contains("ready")),
    );
    let mut cmd = mover.command("python3");
    cmd.arg(repo_path("scripts/lan-pc.py")).arg("mover host");
    mover.spawn(&mut cmd, Some(&w.dir.path().join("mover.log")));
    // A router that learns a host's new address from its gratuitous ARP
    // (docs/OPERATIONS.md, discovery).
    w.router
        .sh("echo 1 > /proc/sys/net/ipv4/conf/lan0/arp_accept && echo 1 > /proc/sys/net/ipv4/conf/all/arp_accept");
    // Netstack mode relays pings through unprivileged ICMP sockets.
    w.router
        .sh("sysctl -qw net.ipv4.ping_group_range='0 2147483647'");
    let (named_mac, anna_mac, mover_mac) = (mac_of(&named), mac_of(&anna), mac_of(&mover));

    // Discovery with short rounds (the agent runs with the world's config).
    w.kill_agent();
    let config = w.dir.path().join("router-agent.toml");
    let mut text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("mode = \"packet\"", &format!("mode = \"{mode}\""));
    assert!(text.contains(&format!("mode = \"{mode}\"")), "{text}");
    text.push_str(
        "[discovery]\nrefresh_s = 1\nsweep_min_interval_s = 5\nsweep_rate = 200\nname_timeout_ms = 800\n",
    );
    std::fs::write(&config, text).unwrap();
    w.start_agent();

    // The customer searches the network.
    let (code, v) = w.agent_api("POST", "/api/discovery/sweep", None);
    assert_eq!(code, 202, "{v}");
    assert_eq!(v["addresses"], 253, "a /24 less the router: {v}");
    let (code, v) = w.agent_api("POST", "/api/discovery/sweep", None);
    assert_eq!(code, 429, "rate-limited: {v}");
    wait_until(
        "the three hosts are listed",
        Duration::from_secs(30),
        || {
            [&named_mac, &anna_mac, &mover_mac]
                .iter()
                .all(|m| host(&w, m).is_some())
        },
    );
    let m = host(&w, &mover_mac).unwrap();
    assert_eq!(m["address"], "192.168.1.23");
    assert!(m["last_seen"].as_u64().unwrap() > 1_700_000_000_000, "{m}");
    assert!(
        hosts(&w).iter().all(|h| h["address"] != "192.168.1.1"),
        "never the router itself"
    );
    wait_until("the named host's own name", Duration::from_secs(20), || {
        host(&w, &named_mac).is_some_and(|h| h["name"] == "frontdesk")
    });
    let n = host(&w, &named_mac).unwrap();
    assert!(
        n["name_source"] == "mdns" || n["name_source"] == "netbios",
        "{n}"
    );

    // The customer names a host; bad input is refused with a JSON error.
    let path = format!("/api/discovery/hosts/{anna_mac}/name");
    let (code, v) = w.agent_api("POST", &path, Some(&json!({ "name": "Anna's PC" })));
    assert_eq!((code, &v["name"]), (200, &json!("Anna's PC")), "{v}");
    let (code, v) = w.agent_api("POST", &path, Some(&json!({ "name": "a\nb" })));
    assert_eq!((code, &v["field"]), (400, &json!("name")), "{v}");
    let (code, v) = w.agent_api(
        "POST",
        "/api/discovery/hosts/not-a-mac/name",
        Some(&json!({ "name": "x" })),
    );
    assert_eq!((code, &v["field"]), (400, &json!("mac")), "{v}");
    let (code, v) = w.agent_api(
        "POST",
        "/api/discovery/hosts/02:00:00:00:00:99/name",
        Some(&json!({ "name": "x" })),
    );
    assert_eq!(code, 404, "{v}");
    let (code, v) = w.agent_api("POST", &path, Some(&json!({ "nom": "x" })));
    assert_eq!(code, 400, "{v}");

    // The name survives a restart.
    w.kill_agent();
    w.start_agent();
    wait_until(
        "the customer's name after the restart",
        Duration::from_secs(20),
        || host(&w, &anna_mac).is_some_and(|h| h["name"] == "Anna's PC"),
    );

    // The customer ticks the mover in the list (its MAC) and asks for help.
    let body = json!({
        "requester_name": "Anna Schmidt",
        "level": "general",
        "urgency": "high",
        "phone": "+49 30 1234 567",
        "content": "The mover does not print.",
        "terminals": [mover_mac],
    });
    let (code, v) = w.agent_api("POST", "/api/requests", Some(&body));
    assert_eq!(code, 201, "{v}\n{}", w.agent_log());
    let id = v["request"]["id"].as_u64().unwrap();
    let terminal = v["request"]["terminals"][0]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let nat = v["request"]["terminals"][0]["nat_address"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(terminal, "lan-pc", "a host without a name: {v}");
    wait_until(
        "the technician reaches the mover",
        Duration::from_secs(30),
        || tech_reaches_mover(&w, &nat),
    );
    assert!(tech_pings(&w, &nat));
    assert_eq!(
        host(&w, &mover_mac).unwrap()["terminal"],
        terminal.as_str(),
        "bound to its MAC"
    );

    // DHCP gives the mover another address mid-session; it announces it.
    mover.sh(
        "ip addr flush dev eth0 && ip addr add 192.168.1.43/24 dev eth0 && \
         ip route add 172.16.0.0/24 via 192.168.1.1 && \
         arping -q -U -c 2 -I eth0 192.168.1.43 || true",
    );
    wait_until(
        "the technician reaches the mover at its new address, same NAT address",
        Duration::from_secs(40),
        || tech_reaches_mover(&w, &nat) && tech_pings(&w, &nat),
    );
    let m = host(&w, &mover_mac).unwrap();
    assert_eq!(m["address"], "192.168.1.43", "{m}");
    assert_eq!(m["terminal"], terminal.as_str());
    let (_, status) = w.agent_api("GET", "/api/status", None);
    let mapping = status["mappings"]
        .as_array()
        .and_then(|a| a.iter().find(|m| m["nat"] == nat.as_str()).cloned())
        .unwrap_or(Value::Null);
    assert_eq!(mapping["real"], "192.168.1.43", "{status}");
    let (_, metrics) = w.agent_api("GET", "/metrics", None);
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert!(
        metrics.contains("vpnnat_agent_discovery_moves_total 1"),
        "{metrics}"
    );
    assert!(w.agent_log().contains("its mappings follow"));

    // The server knows the name, never a MAC or a LAN address.
    let seen = w.console_request(id).to_string();
    assert!(seen.contains("lan-pc"), "{seen}");
    for secret in [&mover_mac, &named_mac, &anna_mac] {
        assert!(!seen.contains(secret.as_str()), "{seen}");
    }
    assert!(!seen.contains("192.168.1."), "{seen}");
}
