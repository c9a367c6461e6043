//! A gateway cut off from the control plane while it keeps running: its sites
//! move to the other gateway, and every moved NAT address must then be
//! answered on the center LAN by exactly one gateway (the lease: the cut-off
//! gateway withdraws its routes and proxy-ARP entries).

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;

use super::actors::center;
use super::world::{World, within};
use super::{Options, enroll_sites};

/// The center-LAN address of a gateway of the world.
fn center_ip(name: &str) -> &'static str {
    if name == "gw1" {
        "172.16.0.11"
    } else {
        "172.16.0.12"
    }
}

/// The MAC addresses that answer ARP for `ip` on the technician's LAN
/// (`arping` sends `count` requests, one per second).
fn arp_answerers(w: &World, ip: &str, count: u32) -> BTreeSet<String> {
    // arping exits non-zero when nothing answers: that is an empty set.
    let out = w.sh_output(
        "tech",
        &format!("arping -c {count} -w {} -I eth0 {ip}", count + 2),
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("reply from"))
        .filter_map(|l| {
            let start = l.find('[')?;
            let end = l[start..].find(']')?;
            Some(l[start + 1..start + end].to_ascii_lowercase())
        })
        .collect()
}

fn mac_of(w: &World, host: &str) -> String {
    w.sh(host, "cat /sys/class/net/eth0/address")
        .trim()
        .to_ascii_lowercase()
}

fn gateway_status(w: &World, name: &str) -> Value {
    let out = w.sh(name, "curl -sf http://127.0.0.1:9101/api/v1/status");
    serde_json::from_str(&out).unwrap()
}

/// Plays the scenario; panics at the first step that does not hold.
pub fn gateway_cut_off(world: String) {
    let w = World::up(Options {
        world,
        keep: false,
        samples: 0,
    });
    let mut m = center(w);
    enroll_sites(&mut m, 2);
    let nats: Vec<String> = (1..=2).map(|s| m.request(s).1).collect();
    for (i, nat) in nats.iter().enumerate() {
        m.reached_within(nat, i + 1, Duration::from_secs(15));
    }
    // The gateway that carries site 1 is cut off; the other one has a free
    // slot for each of its sites (two slots each, at most one taken).
    let victim = m.gateway_name(m.gateway_of(1));
    let other = if victim == "gw1" { "gw2" } else { "gw1" };
    let moved: Vec<usize> = (1..=2)
        .filter(|&s| m.gateway_name(m.gateway_of(s)) == victim)
        .collect();
    let (victim_mac, other_mac) = (mac_of(&m.w, &victim), mac_of(&m.w, other));
    for &s in &moved {
        assert_eq!(
            arp_answerers(&m.w, &nats[s - 1], 1),
            BTreeSet::from([victim_mac.clone()]),
            "before the cut, {victim} answers for site {s}'s address"
        );
    }

    // Only the victim's control-plane link goes: the server's replies to it
    // are discarded. Its tunnels, the technician and the sites stay.
    m.w.sh(
        "server",
        &format!("ip route add blackhole {}/32", center_ip(&victim)),
    );
    within(
        "the server to move the cut-off gateway's sites",
        Duration::from_secs(30),
        || {
            moved
                .iter()
                .all(|&s| m.gateway_name(m.gateway_of(s)) == other)
        },
    );
    for &s in &moved {
        let nat = &nats[s - 1];
        m.reached_within(nat, s, Duration::from_secs(20));
        // Three requests a second apart: every answer comes from the other
        // gateway; the cut-off one (still running) answers none.
        assert_eq!(
            arp_answerers(&m.w, nat, 3),
            BTreeSet::from([other_mac.clone()]),
            "{nat} (site {s}) must be answered by {other} ({other_mac}) alone, not by the cut-off {victim} ({victim_mac})"
        );
    }
    m.w.check_alive();
    let status = gateway_status(&m.w, &victim);
    assert_eq!(status["addresses_withdrawn"], true, "{status}");
    assert_eq!(
        status["routed_addresses"],
        serde_json::json!([]),
        "{status}"
    );

    // The link comes back: the victim runs the server's current document
    // (without the moved sites) and still answers for none of them.
    m.w.sh(
        "server",
        &format!("ip route del blackhole {}/32", center_ip(&victim)),
    );
    within(
        &format!("{victim} back in touch with the server"),
        Duration::from_secs(30),
        || {
            let s = gateway_status(&m.w, &victim);
            s["connected"] == true && s["addresses_withdrawn"] == false
        },
    );
    for &s in &moved {
        let nat = &nats[s - 1];
        assert_eq!(
            arp_answerers(&m.w, nat, 2),
            BTreeSet::from([other_mac.clone()]),
            "after the link is back, {nat} is still {other}'s alone"
        );
        assert!(m.reaches(nat, s), "site {s} reached at {nat}");
    }
}
