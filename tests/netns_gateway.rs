//! The real `gateway` binary in network namespaces: kernel routes and proxy
//! ARP follow the desired state, sites are isolated from each other and from
//! spoofing, unknown NAT addresses are answered with ICMP host unreachable,
//! and a clean shutdown leaves nothing behind.
#![allow(clippy::unwrap_used)]

mod gateway_support;

use std::time::Duration;

use gateway_support::{PREREQS, World};
use vpnnat::messages::{GatewayDesiredState, GatewayId, GatewayPeer, SiteId};
use vpnnat::tunnel::PrivateKey;
use vpnnat_test_support::echo::ping_within;
use vpnnat_test_support::rand_bytes;
use vpnnat_test_support::{require, wait_until};

fn peer(site: u64, nat: &[&str]) -> GatewayPeer {
    GatewayPeer {
        site_id: SiteId(site),
        public_key: PrivateKey::from_bytes(rand_bytes()).public_key(),
        nat_addresses: nat.iter().map(|a| a.parse().unwrap()).collect(),
        tunnel: vpnnat::messages::TunnelKind::Wireguard,
        ipsec: None,
        tls_token_sha256: None,
    }
}

fn desired(version: u64, peers: Vec<GatewayPeer>) -> GatewayDesiredState {
    GatewayDesiredState {
        next_keys: Vec::new(),
        version,
        gateway_id: GatewayId(1),
        allowed_sources: Vec::new(),
        key_rotation: None,
        peers,
    }
}

/// Our /32 routes (protocol 118) in the gateway namespace.
fn routes(w: &World) -> Vec<String> {
    let out = w.gw.sh("ip -4 route show proto 118");
    let mut v: Vec<String> = out
        .lines()
        .filter(|l| l.contains("dev vpnnat0") && !l.contains('/'))
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect();
    v.sort();
    v
}

/// Proxy-ARP entries on the center interface.
fn proxies(w: &World) -> Vec<String> {
    let out = w.gw.sh("ip -4 neigh show proxy dev lan0");
    let mut v: Vec<String> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    v.sort();
    v
}

fn gw_mac(w: &World) -> String {
    w.gw.sh("cat /sys/class/net/lan0/address").trim().to_owned()
}

/// The MAC the technician's ARP cache holds for `ip`, if any.
fn tech_arp(w: &World, ip: &str) -> Option<String> {
    let out = w.tech.sh(&format!("ip neigh show {ip} dev eth0"));
    let mut words = out.split_whitespace();
    while let Some(word) = words.next() {
        if word == "lladdr" {
            return words.next().map(str::to_owned);
        }
    }
    None
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn netns_gateway_routes_and_proxy_arp_follow_the_desired_state() {
    if !require(PREREQS) {
        return;
    }
    let mut w = World::new("nr", "dev eth0");
    // Let the technician's kernel learn from gratuitous ARP (RFC 5227 announcements).
    w.tech.sh("sysctl -qw net.ipv4.conf.eth0.arp_accept=1");
    w.set_peers(&desired(
        1,
        vec![
            peer(3, &["10.64.0.5", "10.64.0.6"]),
            peer(4, &["10.64.0.9"]),
        ],
    ));
    w.start_gateway();
    let mac = gw_mac(&w);
    wait_until("routes for version 1", Duration::from_secs(10), || {
        routes(&w) == strs(&["10.64.0.5", "10.64.0.6", "10.64.0.9"])
    });
    assert_eq!(proxies(&w), strs(&["10.64.0.5", "10.64.0.6", "10.64.0.9"]));
    assert!(
        w.gw.sh("ip -4 route show proto 118")
            .contains("10.64.0.0/16 dev vpnnat0")
    );
    // The gratuitous ARP reached the technician without any traffic.
    wait_until(
        "gratuitous ARP for 10.64.0.9",
        Duration::from_secs(5),
        || tech_arp(&w, "10.64.0.9").as_deref() == Some(mac.as_str()),
    );
    // Proxy ARP answers for a held address, and only for held ones.
    w.tech.sh("ip neigh flush dev eth0");
    let _ = w.tech.try_sh("ping -c 1 -W 1 10.64.0.6");
    assert_eq!(tech_arp(&w, "10.64.0.6").as_deref(), Some(mac.as_str()));
    let _ = w.tech.try_sh("ping -c 1 -W 1 10.64.0.77");
    assert_eq!(
        tech_arp(&w, "10.64.0.77"),
        None,
        "an unheld address is not answered"
    );

    // Version 2: site 3 trades .5 for .7, site 4 goes away.
    w.set_peers(&desired(2, vec![peer(3, &["10.64.0.6", "10.64.0.7"])]));
    wait_until("routes for version 2", Duration::from_secs(10), || {
        routes(&w) == strs(&["10.64.0.6", "10.64.0.7"])
    });
    assert_eq!(proxies(&w), strs(&["10.64.0.6", "10.64.0.7"]));
    wait_until(
        "gratuitous ARP for 10.64.0.7",
        Duration::from_secs(5),
        || tech_arp(&w, "10.64.0.7").as_deref() == Some(mac.as_str()),
    );
    assert_eq!(w.metric("vpnnat_gateway_routed_addresses"), 2);
    assert_eq!(w.metric("vpnnat_gateway_applied_version"), 2);
    assert_eq!(w.status()["peers"].as_array().unwrap().len(), 1);

    // An older document is ignored.
    w.set_peers(&desired(1, vec![]));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(routes(&w), strs(&["10.64.0.6", "10.64.0.7"]));
    assert!(w.gateway_log().contains("older than the running state"));
}

#[test]
fn netns_gateway_isolates_sites_and_answers_unknown_addresses() {
    if !require(PREREQS) {
        return;
    }
    // A single-gateway center: the technician routes the pool via the gateway.
    let mut w = World::new("ni", "via 172.16.0.1");
    let a = w.add_site(&["10.64.0.5"]);
    let b = w.add_site(&["10.64.0.9"]);
    w.set_peers(&w.desired(1, &[(&a, 3), (&b, 4)]));
    w.start_gateway();
    for nat in ["10.64.0.5", "10.64.0.9"] {
        assert!(
            ping_within(&w.tech, nat, Duration::from_secs(20)),
            "ping {nat} failed; gateway log:\n{}",
            w.gateway_log()
        );
    }

    // Spoofing: site A's router sends with site B's NAT address as source.
    w.tech.sh(
        "nft add table ip watch && nft add chain ip watch in '{ type filter hook input priority 0; }' \
         && nft add rule ip watch in ip saddr 10.64.0.9 icmp type echo-request counter",
    );
    a.router
        .sh(&format!("ip addr add 10.64.0.9/32 dev {}", a.wg));
    assert!(!a.router.try_sh("ping -c 2 -W 1 -I 10.64.0.9 172.16.0.50"));
    wait_until(
        "the spoofed packets to be counted",
        Duration::from_secs(5),
        || w.metric("vpnnat_gateway_peer_drops_total{site=\"3\",reason=\"spoofed_source\"}") >= 2,
    );
    let seen = w.tech.sh("nft list chain ip watch in");
    assert!(
        seen.contains("packets 0 "),
        "the technician saw spoofed packets: {seen}"
    );
    a.router
        .sh(&format!("ip addr del 10.64.0.9/32 dev {}", a.wg));

    // Cross-site: site A addresses site B's NAT address through the gateway.
    b.pc.sh(
        "nft add table ip watch && nft add chain ip watch in '{ type filter hook input priority 0; }' \
         && nft add rule ip watch in ip saddr 10.64.0.5 counter",
    );
    a.router
        .sh(&format!("ip route add 10.64.0.9/32 dev {}", a.wg));
    assert!(!a.router.try_sh("ping -c 2 -W 1 -I 10.64.0.5 10.64.0.9"));
    wait_until(
        "the cross-site packets to be counted",
        Duration::from_secs(5),
        || w.metric("vpnnat_gateway_drops_total{reason=\"cross_site\"}") >= 2,
    );
    let seen = b.pc.sh("nft list chain ip watch in");
    assert!(
        seen.contains("packets 0 "),
        "site B's PC saw site A: {seen}"
    );

    // A NAT address nobody holds: ICMP host unreachable from the gateway.
    let out = w
        .tech
        .command("ping")
        .args(["-c", "1", "-W", "2", "10.64.0.77"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("From 10.64.0.77") && text.contains("Destination Host Unreachable"),
        "{text}"
    );
    assert!(w.metric("vpnnat_gateway_icmp_unreachable_sent_total") >= 1);
    assert!(w.metric("vpnnat_gateway_drops_total{reason=\"no_peer\"}") >= 1);

    // Both sites still work.
    for nat in ["10.64.0.5", "10.64.0.9"] {
        assert!(ping_within(&w.tech, nat, Duration::from_secs(5)), "{nat}");
    }

    // Removing site A stops its traffic and leaves site B alone.
    w.set_peers(&w.desired(2, &[(&b, 4)]));
    wait_until("site A's route to go", Duration::from_secs(10), || {
        routes(&w) == strs(&["10.64.0.9"])
    });
    let out = w
        .tech
        .command("ping")
        .args(["-c", "1", "-W", "2", "10.64.0.5"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Destination Host Unreachable"),
        "site A still reachable"
    );
    assert!(ping_within(&w.tech, "10.64.0.9", Duration::from_secs(5)));
}

#[test]
fn netns_gateway_clean_shutdown_removes_routes_and_arp_entries() {
    if !require(PREREQS) {
        return;
    }
    let mut w = World::new("ns", "dev eth0");
    w.set_peers(&desired(1, vec![peer(3, &["10.64.0.5", "10.64.0.6"])]));
    w.start_gateway();
    // The proxy ARP entries follow the routes a moment later.
    wait_until("routes and proxy entries", Duration::from_secs(10), || {
        routes(&w) == strs(&["10.64.0.5", "10.64.0.6"])
            && proxies(&w) == strs(&["10.64.0.5", "10.64.0.6"])
    });
    let pid = w.gw_pid.take().unwrap();
    let status =
        w.gw.terminate(pid, Duration::from_secs(10))
            .expect("exits on SIGTERM");
    assert!(status.success(), "{status:?}\n{}", w.gateway_log());
    // Only the pool's blackhole stays (on purpose: pool traffic is never
    // routed elsewhere, also while the gateway is stopped).
    assert_eq!(
        w.gw.sh("ip -4 route show proto 118").trim(),
        "blackhole 10.64.0.0/16 metric 30326"
    );
    assert!(proxies(&w).is_empty());
    assert!(!w.gw.try_sh("ip link show vpnnat0"));
    assert!(w.gateway_log().contains("NAT address released"));

    // After a crash (SIGKILL) the proxy entries stay behind; the next start
    // finds them by their protocol number and removes what it no longer holds.
    w.start_gateway();
    wait_until(
        "routes and proxy entries again",
        Duration::from_secs(10),
        || routes(&w).len() == 2 && proxies(&w).len() == 2,
    );
    let pid = w.gw_pid.take().unwrap();
    w.gw.kill(pid);
    assert_eq!(proxies(&w), strs(&["10.64.0.5", "10.64.0.6"]));
    w.set_peers(&desired(2, vec![peer(3, &["10.64.0.6"])]));
    w.start_gateway();
    wait_until("stale entries to go", Duration::from_secs(10), || {
        proxies(&w) == strs(&["10.64.0.6"]) && routes(&w) == strs(&["10.64.0.6"])
    });
}

/// Runs `maintenance-server --config CONFIG ARGS` (the CLI works on the database).
fn server_cli(config: &std::path::Path, args: &[&str]) -> String {
    let out = vpnnat_test_support::run(
        std::process::Command::new(vpnnat_test_support::bin("maintenance-server"))
            // The server reads every VPNNAT_* variable as configuration.
            .env_remove("VPNNAT_KEEP_TEST_DIRS")
            .arg("--config")
            .arg(config)
            .args(args),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `curl` inside the technician's namespace, where the server runs; returns the body.
fn api(w: &World, method: &str, path: &str, bearer: &str, body: Option<&str>) -> String {
    let mut cmd = format!(
        "curl -sf -X {method} -H 'Authorization: Bearer {bearer}' http://172.16.0.50:8080{path}"
    );
    if let Some(b) = body {
        cmd.push_str(&format!(
            " -H 'Content-Type: application/json' --data '{b}'"
        ));
    }
    w.tech.sh(&cmd)
}

fn start_server(w: &mut World, config: &std::path::Path) -> u32 {
    let mut cmd = w
        .tech
        .command(vpnnat_test_support::bin("maintenance-server"));
    cmd.arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .env_remove("VPNNAT_KEEP_TEST_DIRS");
    let pid = w
        .tech
        .spawn(&mut cmd, Some(&w.dir.path().join("server.log")));
    let tech = &w.tech;
    wait_until("the maintenance server", Duration::from_secs(20), || {
        tech.try_sh("curl -sf http://172.16.0.50:8080/healthz")
    });
    pid
}

#[test]
fn netns_gateway_registers_with_a_real_server_and_follows_its_desired_state() {
    if !require(PREREQS) {
        return;
    }
    let mut w = World::new("nv", "dev eth0");
    // The maintenance server on the center LAN (in the technician's namespace).
    let config = w.dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[http]\nlisten = \"172.16.0.50:8080\"\n[state]\ndir = \"{}\"\n\
             [gateways]\nheartbeat_interval_ms = 500\ndown_after_ms = 30000\n",
            w.dir.path().join("server-state").display()
        ),
    )
    .unwrap();
    let site_out = server_cli(&config, &["site", "add", "Bakery Schmidt"]);
    let token = site_out
        .lines()
        .find(|l| l.starts_with("vnenroll_"))
        .unwrap()
        .to_owned();
    let gw_out = server_cli(&config, &["gateway", "add", "gw1"]);
    let gw_cred = gw_out
        .lines()
        .find(|l| l.starts_with("vngw_"))
        .unwrap()
        .to_owned();
    let operator = server_cli(&config, &["operator-token"]).trim().to_owned();
    let server_pid = start_server(&mut w, &config);

    w.use_server("http://172.16.0.50:8080", &gw_cred);
    w.start_gateway();
    wait_until("the gateway to register", Duration::from_secs(15), || {
        let s = w.status();
        s["connected"] == true && s["gateway_id"].is_u64()
    });
    let gateways: serde_json::Value =
        serde_json::from_str(&api(&w, "GET", "/api/v1/gateways", &operator, None)).unwrap();
    assert_eq!(
        gateways[0]["endpoints"][0], "198.51.100.1:51820",
        "{gateways}"
    );
    assert_eq!(
        gateways[0]["public_key"],
        w.gw_key.public_key().to_base64(),
        "{gateways}"
    );
    wait_until("a heartbeat", Duration::from_secs(10), || {
        let g: serde_json::Value =
            serde_json::from_str(&api(&w, "GET", "/api/v1/gateways", &operator, None)).unwrap();
        g[0]["last_heartbeat"].is_u64()
    });

    // The customer's agent enrolls its key and asks for maintenance of pc-1.
    let site_key = PrivateKey::from_bytes(rand_bytes());
    let enrolled: serde_json::Value = serde_json::from_str(&api(
        &w,
        "POST",
        "/api/v1/enroll",
        "none",
        Some(&format!(
            r#"{{"token":"{token}","public_key":"{}"}}"#,
            site_key.public_key()
        )),
    ))
    .unwrap();
    let credential = enrolled["credential"].as_str().unwrap().to_owned();
    let site_id = enrolled["site_id"].as_u64().unwrap();
    let request: serde_json::Value = serde_json::from_str(&api(
        &w,
        "POST",
        "/api/v1/agent/requests",
        &credential,
        Some(
            r#"{"requester_name":"A. Schmidt","level":"general","urgency":"normal","phone":"0301234","content":"printer","terminals":["pc-1"]}"#,
        ),
    ))
    .unwrap();
    let nat = request["terminals"][0]["nat_address"]
        .as_str()
        .unwrap()
        .to_owned();
    let request_id = request["id"].as_u64().unwrap();

    // The gateway receives the site's peer from the long-poll and routes its address.
    wait_until(
        "the desired state to arrive",
        Duration::from_secs(10),
        || {
            let s = w.status();
            s["peers"][0]["site_id"] == site_id && routes(&w) == vec![nat.clone()]
        },
    );
    assert_eq!(proxies(&w), vec![nat.clone()]);
    // A stock WireGuard client with the enrolled key reaches the center through it.
    let site = w.add_site_with_key(site_key, &[nat.as_str()]);
    assert!(
        ping_within(&w.tech, &nat, Duration::from_secs(20)),
        "ping {nat} failed; gateway log:\n{}",
        w.gateway_log()
    );
    wait_until(
        "the heartbeat to report the peer",
        Duration::from_secs(10),
        || {
            let g: serde_json::Value =
                serde_json::from_str(&api(&w, "GET", "/api/v1/gateways", &operator, None)).unwrap();
            g[0]["tunnels"] == 1 && g[0]["health"] == "healthy"
        },
    );

    // The server goes away: forwarding continues; the gateway notices and reconnects.
    w.tech.kill(server_pid);
    wait_until("the gateway to notice", Duration::from_secs(15), || {
        w.status()["connected"] == false
    });
    assert!(ping_within(&w.tech, &nat, Duration::from_secs(5)));
    let _server_pid = start_server(&mut w, &config);
    wait_until("the gateway to reconnect", Duration::from_secs(20), || {
        w.status()["connected"] == true
    });
    assert!(ping_within(&w.tech, &nat, Duration::from_secs(5)));

    // The customer revokes: the NAT address and the peer leave the gateway.
    api(
        &w,
        "POST",
        &format!("/api/v1/agent/requests/{request_id}/revoke"),
        &credential,
        None,
    );
    wait_until(
        "the revocation to reach the gateway",
        Duration::from_secs(10),
        || routes(&w).is_empty() && w.status()["peers"].as_array().is_some_and(Vec::is_empty),
    );
    assert!(proxies(&w).is_empty());
    assert!(!w.tech.try_sh(&format!("ping -c 1 -W 1 {nat}")));
    drop(site);
}
