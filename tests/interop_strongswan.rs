//! Program-level IPsec interop with strongSwan 5.9.8 (kernel-libipsec: ESP
//! in userspace, `scripts/strongswan-peer.sh`), in both roles, each through
//! a NAPT router (NAT traversal, RFC 7296 §2.23 and RFC 3948, with a real
//! NAT rewriting the site's ports):
//!
//! * our router agent (packet mode, on the site's router) initiates to a
//!   strongSwan responder standing in for the center;
//! * strongSwan as a hand-configured site router (the `swanctl.conf` the
//!   server gives operators) initiates to our gateway program.
//!
//! Each test pings the site's PC by its NAT address and moves TCP data both
//! ways (a bulk echo), then has strongSwan rekey the CHILD_SA and the IKE
//! SA, then waits for our program to rekey both (the site's parameters give
//! it short rekey intervals; strongSwan's own stay at hours, so a change
//! after strongSwan's rekeys is ours), checking traffic after each. Then a
//! peer is killed and the other one's dead-peer detection must notice:
//! the agent notices a killed strongSwan and dials the restarted one; strongSwan notices
//! a killed gateway and comes back to the restarted one.
//!
//! Traffic starts at the technician only: a site never opens anything
//! toward the center, so "both ways" is the data of each exchange.
//!
//! ```text
//!  center ns: strongSwan responder (198.51.100.1) | or the gateway program
//!             technician 172.16.0.50                | and the technician ns
//!      │ 198.51.100.0/24
//!  napt 198.51.100.254 ── masquerade, UDP source ports into 40000-40999
//!      │ 192.0.2.0/24
//!  site router 192.0.2.2 (our agent, or strongSwan)
//!      │ 192.168.1.0/24
//!  pc 192.168.1.10 (HTTP :80, TCP echo :7)
//! ```
//!
//! Every address lives in namespaces created here (named per run); none has
//! a default route; namespaces, charon and the programs go on drop, also
//! when an assertion fails.
#![allow(clippy::unwrap_used)]

mod gateway_support;

use std::path::Path;
use std::time::Duration;

use vpnnat::messages::{ESP_PROPOSAL, IKE_PROPOSAL, IpsecParams, SiteId};
use vpnnat::tunnel::PrivateKey;
use vpnnat_test_support::echo::{ping_within, tcp_echo_transfer};
use vpnnat_test_support::strongswan::{IkeSa, PeerOptions, StrongSwan};
use vpnnat_test_support::{Netns, Prereq, rand_bytes, repo_path, require, veth, wait_until};

const NAT: &str = "10.64.0.5";
const TECH_NET: &str = "172.16.0.0/24";
const SITE: SiteId = SiteId(1);
/// Our side's rekey intervals in these tests (strongSwan's stay at hours).
const CHILD_REKEY_S: u32 = 20;
const IKE_REKEY_S: u32 = 30;
const SETTLE: Duration = Duration::from_secs(20);

fn prereqs() -> bool {
    require(&[
        Prereq::Root,
        Prereq::Tun,
        Prereq::StrongSwan,
        Prereq::Program("ip"),
        Prereq::Program("ping"),
        Prereq::Program("nft"),
        Prereq::Program("python3"),
        Prereq::Program("curl"),
    ])
}

/// The site's parameters as the server hands them out (`local_*`: the
/// site), with a random key and our short rekey intervals.
fn site_params(psk: &str) -> IpsecParams {
    IpsecParams {
        child_rekey_s: Some(CHILD_REKEY_S),
        ike_rekey_s: Some(IKE_REKEY_S),
        ..IpsecParams::for_site(
            SITE,
            psk.to_owned(),
            vec![format!("{NAT}/32").parse().unwrap()],
            vec![TECH_NET.parse().unwrap()],
        )
    }
}

/// strongSwan configured as the server's `swanctl.conf` says (proposals,
/// identities), with `local_*` as given.
fn swan_options(
    local: &str,
    remote: &str,
    psk: &str,
    local_ts: &str,
    remote_ts: &str,
) -> PeerOptions {
    // strongSwan's notation for our proposals, plus "no extended sequence
    // numbers" which 5.9.8's libipsec needs spelled out.
    PeerOptions {
        ike_proposals: Some(IKE_PROPOSAL.to_owned()),
        esp_proposals: Some(format!("{ESP_PROPOSAL}-noesn")),
        ..PeerOptions::new(local, remote, psk, local_ts, remote_ts)
    }
}

fn random_psk() -> String {
    PrivateKey::from_bytes(rand_bytes()).to_base64()
}

/// The NAPT router between `outside` (its `wan0`, 198.51.100.254) and a new
/// site router namespace (its `wan0`, 192.0.2.2), which it returns.
fn napt_and_router(outside: &Netns, outside_if: &str, tag: &str) -> (Netns, Netns) {
    let napt = Netns::new(&format!("{tag}n"));
    let router = Netns::new(&format!("{tag}r"));
    veth(
        outside,
        outside_if,
        None,
        &napt,
        "wan0",
        Some("198.51.100.254/24"),
    );
    veth(
        &napt,
        "lan0",
        Some("192.0.2.1/24"),
        &router,
        "wan0",
        Some("192.0.2.2/24"),
    );
    router.ip(&["route", "add", "198.51.100.0/24", "via", "192.0.2.1"]);
    napt.sh("sysctl -qw net.ipv4.ip_forward=1 && nft -f - <<'EOF'\n\
         table ip nat {\n\
           chain post { type nat hook postrouting priority srcnat;\n\
             oifname \"wan0\" meta l4proto udp masquerade to :40000-40999\n\
             oifname \"wan0\" masquerade; }\n\
         }\n\
         table inet filter {\n\
           chain forward { type filter hook forward priority filter; policy accept;\n\
             iifname \"wan0\" ct state established,related accept; iifname \"wan0\" drop; }\n\
         }\n\
         EOF");
    (napt, router)
}

/// The PC behind `router` (LAN bridge 192.168.1.1/24), serving
/// `scripts/lan-pc.py` (HTTP on 80, TCP echo on 7).
fn pc_behind(router: &Netns, tag: &str, log: &Path) -> Netns {
    let mut pc = Netns::new(&format!("{tag}p"));
    router.sh(
        "ip link add lan0 type bridge && ip addr add 192.168.1.1/24 dev lan0 \
         && ip link set lan0 up && sysctl -qw net.ipv4.ip_forward=1",
    );
    veth(router, "l-pc", None, &pc, "eth0", Some("192.168.1.10/24"));
    router.sh("ip link set l-pc master lan0");
    pc.ip(&["route", "add", TECH_NET, "via", "192.168.1.1"]);
    let mut cmd = pc.command("python3");
    cmd.arg(repo_path("scripts/lan-pc.py")).arg("site 1");
    pc.spawn(&mut cmd, Some(log));
    let p = &pc;
    wait_until("the PC's HTTP server", Duration::from_secs(10), || {
        p.try_sh("python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 80), 0.2)'")
    });
    pc
}

/// Whether `tech` gets the page served at the NAT address (one try).
fn page(tech: &Netns) -> bool {
    tech.command("curl")
        .args(["-s", "--max-time", "2", &format!("http://{NAT}/")])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("at site 1"))
}

/// The technician reaches the site: its page, a ping, 200 kB echoed.
fn reaches(tech: &Netns, what: &str, logs: &dyn Fn() -> String) {
    let ok = (0..80).any(|_| {
        page(tech) || {
            std::thread::sleep(Duration::from_millis(250));
            false
        }
    });
    assert!(ok, "{what}: the technician never got the page\n{}", logs());
    assert!(
        ping_within(tech, NAT, Duration::from_secs(5)),
        "{what}: ping\n{}",
        logs()
    );
    tcp_echo_transfer(tech, NAT, 200_000);
}

/// strongSwan's established IKE SA once `done` holds for it.
fn swan_sa(
    swan: &StrongSwan,
    what: &str,
    timeout: Duration,
    done: impl Fn(&IkeSa) -> bool,
) -> IkeSa {
    let mut found = None;
    wait_until(what, timeout, || {
        found = swan
            .sas()
            .into_iter()
            .find(|sa| sa.state == "ESTABLISHED" && sa.installed_child().is_some() && done(sa));
        found.is_some()
    });
    found.unwrap()
}

fn child_spis(sa: &IkeSa) -> (u32, u32) {
    let c = sa.installed_child().unwrap();
    (c.spi_in, c.spi_out)
}

/// strongSwan rekeys the CHILD_SA and then the IKE SA; our side follows
/// with both by its own intervals. Traffic is checked after each.
fn rekeys_by_both_sides(swan: &StrongSwan, tech: &Netns, logs: &dyn Fn() -> String) {
    let sa = swan.wait_established(SETTLE);
    let first_child = child_spis(&sa);
    swan.rekey_child();
    let sa = swan_sa(swan, "strongSwan's CHILD_SA rekey", SETTLE, |sa| {
        child_spis(sa) != first_child
    });
    reaches(tech, "after strongSwan's CHILD_SA rekey", logs);

    let ike = (sa.spi_i, sa.spi_r);
    swan.rekey_ike();
    // The new IKE SA's initiator is the side that rekeyed (RFC 7296 §2.18).
    let sa = swan_sa(swan, "strongSwan's IKE SA rekey", SETTLE, |sa| {
        (sa.spi_i, sa.spi_r) != ike && sa.initiator
    });
    reaches(tech, "after strongSwan's IKE SA rekey", logs);

    // Ours: strongSwan's next own rekeys are hours away.
    let (ike, child) = ((sa.spi_i, sa.spi_r), child_spis(&sa));
    let within = Duration::from_secs(u64::from(IKE_REKEY_S) + 15);
    swan_sa(swan, "our CHILD_SA rekey", within, |sa| {
        child_spis(sa) != child
    });
    swan_sa(swan, "our IKE SA rekey", within, |sa| {
        (sa.spi_i, sa.spi_r) != ike && !sa.initiator
    });
    reaches(tech, "after our rekeys", logs);
    wait_until("the rekeyed IKE SAs to be gone", SETTLE, || {
        swan.sas().len() == 1
    });
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Our router agent on the site's router (packet mode, behind the NAPT)
/// dials a strongSwan responder standing in for the center.
#[test]
fn interop_strongswan_agent_to_a_strongswan_responder() {
    if !prereqs() {
        return;
    }
    let dir = vpnnat_test_support::temp_dir("interop-swan-a");
    let center = Netns::new("isac");
    // The technician lives with strongSwan: charon needs an address inside
    // its local selector, and the routes it installs take it as source.
    center.ip(&["addr", "add", "172.16.0.50/32", "dev", "lo"]);
    let (_napt, mut router) = napt_and_router(&center, "wan0", "isa");
    center.ip(&["addr", "add", "198.51.100.1/24", "dev", "wan0"]);
    center.ip(&["link", "set", "wan0", "up"]);
    let _pc = pc_behind(&router, "isa", &dir.path().join("pc.log"));

    let psk = random_psk();
    let gw = site_params(&psk).mirrored();
    let opts = PeerOptions {
        local_id: Some(gw.local_id.clone()),
        remote_id: Some(gw.remote_id.clone()),
        ..swan_options("198.51.100.1", "%any", &psk, TECH_NET, &format!("{NAT}/32"))
    };
    let swan = StrongSwan::start(&center, &opts);

    let agent = gateway_support::StandaloneAgent::ipsec(
        dir.path(),
        "packet",
        "lan0",
        "198.51.100.1:500",
        site_params(&psk),
        NAT,
    );
    agent.start(&mut router);
    let agent_log = agent.log.clone();

    let mut swan = swan;
    let logs = || {
        format!(
            "--- agent\n{}\n--- charon\n{}",
            read(&agent_log),
            swan.log()
        )
    };
    let sa = swan.wait_established(SETTLE);
    // strongSwan talks to the NAPT's mapping of the agent's port 4500.
    let (addr, port) = sa.remote.split_once(':').unwrap();
    assert_eq!(addr, "198.51.100.254", "{sa:?}");
    assert!(
        (40000..41000).contains(&port.parse::<u16>().unwrap()),
        "{sa:?}"
    );
    assert!(!sa.initiator, "the agent initiated: {sa:?}");
    reaches(&center, "first contact", &logs);
    rekeys_by_both_sides(&swan, &center, &logs);

    // Dead-peer detection: charon dies; the agent's liveness check (after
    // 30 s of silence, then five tries over 31 s) declares the IKE SA dead
    // and it dials again, which the restarted charon answers.
    let before = read(&agent_log).len();
    swan.kill();
    swan.stop();
    let swan = StrongSwan::start(&center, &opts);
    let log = agent_log.clone();
    wait_until(
        "the agent's dead-peer detection",
        Duration::from_secs(90),
        || {
            let new = read(&log).get(before..).unwrap_or_default().to_owned();
            new.contains("IKE SA down") && new.contains("Timeout")
        },
    );
    swan.wait_established(Duration::from_secs(30));
    let logs = || {
        format!(
            "--- agent\n{}\n--- charon\n{}",
            read(&agent_log),
            swan.log()
        )
    };
    reaches(&center, "after the restart of strongSwan", &logs);
}

/// strongSwan as the hand-configured router of an IPsec site (behind the
/// NAPT) dials our gateway program.
#[test]
fn interop_strongswan_router_to_the_gateway() {
    if !prereqs() {
        return;
    }
    let mut w = gateway_support::World::new("isb", "dev eth0");
    let (_napt, router) = napt_and_router(&w.gw, "site1", "isb");
    w.gw.sh("ip link set site1 master inet");
    let _pc = pc_behind(&router, "isb", &w.dir.path().join("pc.log"));
    // The hand-configured router does the 1:1 NAT of the NAT address itself.
    router.ip(&["addr", "add", &format!("{NAT}/32"), "dev", "lo"]);
    router.sh(&format!(
        "nft -f - <<'EOF'\n\
         table ip vpnnat {{\n\
           chain pre {{ type nat hook prerouting priority dstnat; ip daddr {NAT} dnat to 192.168.1.10; }}\n\
           chain post {{ type nat hook postrouting priority srcnat; ip saddr 192.168.1.10 ip daddr {TECH_NET} snat to {NAT}; }}\n\
         }}\n\
         EOF"
    ));

    let psk = random_psk();
    w.set_peers(&gateway_support::World::ipsec_desired(
        SITE,
        NAT,
        site_params(&psk).mirrored(),
    ));
    w.start_gateway();
    let g = &w;
    wait_until("the gateway's route to the site", SETTLE, || {
        g.gw.sh("ip -4 route show proto 118").contains(NAT)
    });

    let site = site_params(&psk);
    let opts = PeerOptions {
        initiator: true,
        local_id: Some(site.local_id.clone()),
        remote_id: Some(site.remote_id.clone()),
        // As the server's swanctl.conf for such routers, with a short
        // liveness check so that the test sees it.
        dpd: Some("2s".to_owned()),
        retransmit_tries: Some(2),
        retransmit_timeout: Some("0.5".to_owned()),
        ..swan_options(
            "192.0.2.2",
            "198.51.100.1",
            &psk,
            &format!("{NAT}/32"),
            TECH_NET,
        )
    };
    let swan = StrongSwan::start(&router, &opts);
    let gw_log = w.dir.path().join("gateway.log");
    let logs = || format!("--- gateway\n{}\n--- charon\n{}", read(&gw_log), swan.log());
    let sa = swan.wait_established(SETTLE);
    assert_eq!(sa.remote, "198.51.100.1:4500", "floated to NAT-T: {sa:?}");
    reaches(&w.tech, "first contact", &logs);
    // The gateway sees the site at the NAPT's address.
    let status = w.status();
    let peer = &status["peers"][0];
    assert!(
        peer["endpoint"]
            .as_str()
            .is_some_and(|e| e.starts_with("198.51.100.254:")),
        "{peer}"
    );
    rekeys_by_both_sides(&swan, &w.tech, &logs);

    // Dead-peer detection: the gateway dies; strongSwan's liveness check
    // (2 s) gives the IKE SA up. The restarted gateway takes the router's
    // next initiation.
    let pid = w.gw_pid.take().unwrap();
    w.gw.kill(pid);
    wait_until("strongSwan's dead-peer detection", SETTLE, || {
        swan.log().contains("giving up after") && swan.sas().is_empty()
    });
    w.start_gateway();
    let g = &w;
    wait_until("the restarted gateway's route", SETTLE, || {
        g.gw.sh("ip -4 route show proto 118").contains(NAT)
    });
    assert!(swan.initiate(), "strongSwan initiates again\n{}", logs());
    reaches(&w.tech, "after the gateway's restart", &logs);
}
