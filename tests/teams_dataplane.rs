//! Teams in the data plane, with the real `gateway` binary, a wireguard-go
//! site and two technician addresses on the center LAN: while the NAT
//! address's `allowed_sources` names only technician A (as the server sends
//! it once A started the request), A reaches the site's PC (ping and TCP)
//! and B, from another technician address, does not; the gateway counts B's
//! packets as `source_not_allowed` and the PC never sees them. Without
//! `allowed_sources` (a site without a team, or an older server) both
//! reach it, as before teams.
#![allow(clippy::unwrap_used)]

mod gateway_support;

use std::time::Duration;

use gateway_support::{PREREQS, World};
use vpnnat::messages::AllowedSources;
use vpnnat_test_support::echo::ping_within;
use vpnnat_test_support::{Netns, require, wait_until};

const TECH_A: &str = "172.16.0.50";
const TECH_B: &str = "172.16.0.51";
const NAT: &str = "10.64.0.5";
const DROPS: &str = "vpnnat_gateway_drops_total{reason=\"source_not_allowed\"}";

/// One ping from `source` to `dst`, given a second: whether it was answered.
fn pings_from(ns: &Netns, source: &str, dst: &str) -> bool {
    ns.try_sh(&format!("ping -c 1 -W 1 -I {source} {dst}"))
}

/// The PC's web page fetched from `source` (a real TCP exchange), given 3 s.
fn page_from(ns: &Netns, source: &str, dst: &str) -> Option<String> {
    let out = ns
        .command("curl")
        .args(["-sf", "--max-time", "3", "--interface", source])
        .arg(format!("http://{dst}/"))
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Packets from `source` counted in `ns`'s input hook.
fn watch_source(ns: &Netns, source: &str) {
    ns.sh("nft add table ip watch && nft add chain ip watch in '{ type filter hook input priority -300; }'");
    ns.sh(&format!(
        "nft add rule ip watch in 'ip saddr {source} counter'"
    ));
}

fn watched(ns: &Netns) -> u64 {
    ns.sh("nft list chain ip watch in")
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            w.position(|x| x == "packets")?;
            w.next()?.parse().ok()
        })
        .unwrap_or(0)
}

#[test]
fn teams_only_the_starters_address_reaches_the_nat_address() {
    if !require(PREREQS) {
        return;
    }
    let mut w = World::new("tm", "via 172.16.0.1");
    w.tech.sh(&format!("ip addr add {TECH_B}/24 dev eth0"));
    let site = w.add_site(&[NAT]);
    let mut desired = w.desired(1, &[(&site, 3)]);
    desired.allowed_sources = vec![AllowedSources {
        nat_address: NAT.parse().unwrap(),
        sources: vec![format!("{TECH_A}/32").parse().unwrap()],
    }];
    w.set_peers(&desired);
    w.start_gateway();
    watch_source(&site.pc, TECH_B);

    // A: ping and TCP.
    assert!(
        (0..20).any(|_| pings_from(&w.tech, TECH_A, NAT)),
        "ping {NAT} from {TECH_A} failed; gateway log:\n{}",
        w.gateway_log()
    );
    let page = page_from(&w.tech, TECH_A, NAT).expect("A's TCP connection");
    assert!(page.contains("site 1"), "{page}");

    // B: neither, and the gateway says why.
    assert!(!pings_from(&w.tech, TECH_B, NAT), "B's ping was answered");
    assert!(
        page_from(&w.tech, TECH_B, NAT).is_none(),
        "B's TCP connected"
    );
    wait_until(
        "the gateway to count B's packets",
        Duration::from_secs(10),
        || w.metric(DROPS) >= 2,
    );
    assert!(
        w.metric("vpnnat_gateway_peer_drops_total{site=\"3\",reason=\"source_not_allowed\"}") >= 2
    );
    assert_eq!(watched(&site.pc), 0, "the PC saw B's packets");
    // A still gets through.
    assert!(pings_from(&w.tech, TECH_A, NAT));

    // No restriction (a site without a team, or an older server): both.
    w.set_peers(&w.desired(2, &[(&site, 3)]));
    wait_until(
        "the gateway to apply version 2",
        Duration::from_secs(10),
        || w.status()["applied_version"] == 2,
    );
    let drops = w.metric(DROPS);
    assert!(
        ping_within(&w.tech, NAT, Duration::from_secs(10)),
        "A after the reload"
    );
    assert!(
        (0..10).any(|_| pings_from(&w.tech, TECH_B, NAT)),
        "ping {NAT} from {TECH_B} failed without a restriction; gateway log:\n{}",
        w.gateway_log()
    );
    let page = page_from(&w.tech, TECH_B, NAT).expect("B's TCP connection");
    assert!(page.contains("site 1"), "{page}");
    assert!(watched(&site.pc) > 0, "the PC saw B once allowed");
    assert_eq!(
        w.metric(DROPS),
        drops,
        "no more drops without a restriction"
    );
}
