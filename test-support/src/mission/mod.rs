//! The whole mission, end to end: the world of `scripts/world.sh` (an
//! internet, a center with the maintenance server, two gateways and a
//! technician, seven customer sites that all use 192.168.1.0/24: the fourth
//! behind a firewall that lets no UDP out, the fifth an IPsec site whose
//! agent dials IKEv2, the sixth an IPsec site without an agent whose router
//! is strongSwan configured by hand, the seventh a WireGuard site without an
//! agent whose router runs the wg-quick files the server renders) and the
//! scenario of the acceptance test, played by the real programs.
//!
//! One piece of code serves both the CI test (`tests/e2e_mission.rs`) and the
//! demo (`examples/demo.rs`, run by `scripts/demo.sh`): every step is told
//! (`say`) and asserted (a failed assertion panics with what was expected and
//! where the logs are).
//!
//! Network safety: every address lives in the world's namespaces (none has a
//! default route); everything this code sends goes through `ip netns exec`.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use self::actors::{HeldEcho, Mission, Site, agent_config, center, start_gateway, start_server};
use self::ipsec::HandRouter;
use self::world::{World, wall, within};
use crate::prereq::Prereq;
use crate::process::bin;

mod actors;
mod agentless;
mod ipsec;
pub mod partition;
mod world;

/// What the scenario needs from the machine.
pub const PREREQS: &[Prereq] = &[
    Prereq::Root,
    Prereq::Tun,
    Prereq::Program("ip"),
    Prereq::Program("nft"),
    Prereq::Program("ping"),
    Prereq::Program("curl"),
    Prereq::Program("python3"),
    Prereq::Program("arping"),
    Prereq::StrongSwan,
    Prereq::Program("wireguard-go"),
    Prereq::Program("wg-quick"),
];

const PASSWORD: &str = "site page password";
const TECH: (&str, &str) = ("alice", "technician password 1");
const SERVER_LAN: &str = "172.16.0.10:8080";
const SERVER_WAN: &str = "203.0.113.10:8080";
const PC: &str = "192.168.1.10";
/// Gateways' tunnel slots (`max_tunnels = 6` each: the second gateway is
/// needed once seven sites connect, and a gateway that survives the other is
/// full with the six sites still open then, step 7).
const MAX_TUNNELS: u64 = 6;
/// The site whose router lets no UDP out: its tunnel runs over TLS.
const UDP_BLOCKED_SITE: usize = 4;
/// The IPsec site with a router agent (the operator sets its tunnel kind).
const IPSEC_AGENT_SITE: usize = 5;
/// The IPsec site without an agent: its router is strongSwan, configured by
/// hand from the server's parameters.
const IPSEC_ROUTER_SITE: usize = 6;
/// The WireGuard site without an agent: its router runs the wg-quick and
/// nftables files the server renders; its requests are phoned in.
const AGENTLESS_SITE: usize = 7;
/// How many sites the world has.
const SITES: usize = 7;
/// The longest a site may take to be reached again after its gateway is
/// killed (the server declares a gateway down after 3 s; the hand-configured
/// router first needs its dead-peer detection).
const FAILOVER_LIMIT: Duration = Duration::from_secs(30);

/// How a site's tunnel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tunnel {
    /// WireGuard over UDP, by the router agent.
    Wireguard,
    /// WireGuard over TLS (the site lets no UDP out), by the router agent.
    WireguardTls,
    /// IKEv2/IPsec, by the router agent.
    IpsecAgent,
    /// IKEv2/IPsec, by a strongSwan router configured by hand (no agent).
    IpsecRouter,
    /// WireGuard, by a standard router running the server's wg-quick files
    /// (no agent).
    WireguardRouter,
}

impl Tunnel {
    /// For the table.
    pub fn label(self) -> &'static str {
        match self {
            Self::Wireguard => "WireGuard",
            Self::WireguardTls => "WireGuard/TLS",
            Self::IpsecAgent => "IPsec (agent)",
            Self::IpsecRouter => "IPsec (strongSwan)",
            Self::WireguardRouter => "WireGuard (wg-quick)",
        }
    }
}

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
    pub tunnel: Tunnel,
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
    /// kill -9 of site 2's gateway → site 2 reached again through the other one.
    pub failover: Duration,
    /// Every site a killed gateway carried, reached again (steps 7 and 7b).
    pub failovers: Vec<Failover>,
}

/// One site's failover: kill -9 of its gateway → reached again, at the same
/// NAT address, through the other gateway.
#[derive(Debug, Clone)]
pub struct Failover {
    /// The step (`7` or `7b`).
    pub step: &'static str,
    pub site: String,
    pub tunnel: Tunnel,
    /// The killed gateway and the one that carries the site now.
    pub from: String,
    pub to: String,
    /// kill -9 → the server shows the site on the other gateway.
    pub moved: Duration,
    /// kill -9 → the technician gets the site's page again.
    pub reached: Duration,
}

fn say(step: &str, text: &str) {
    println!("\n[{step}] {text}");
}

fn detail(text: &str) {
    println!("      {text}");
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
            "building the world \"{world_name}\": an internet, a center (server, gw1, gw2, technician) and seven sites (site 4 lets no UDP out, sites 5 and 6 run IPsec, site 6's router is strongSwan configured by hand, site 7's router is a standard WireGuard box without an agent), every PC at {PC}"
        ),
    );
    let w = World::up(opts);
    let mut m = center(w);
    detail(&format!(
        "maintenance server 203.0.113.10 / 172.16.0.10, gateways gw1 and gw2 (WireGuard and IPsec, {MAX_TUNNELS} tunnel slots each), technician 172.16.0.50"
    ));

    // 1. Sites and enrollment.
    say(
        "1",
        "the operator creates seven sites; the router agents of sites 1 to 5 enroll with their one-time tokens (site 5 is switched to IPsec first); sites 6 (IPsec) and 7 (WireGuard) have no agent",
    );
    enroll_sites(&mut m, IPSEC_AGENT_SITE);
    let credential6 = m.add_hand_configured_site();
    m.add_agentless_site();

    // 2. Sites 1 and 2 press the button.
    say(
        "2",
        "sites 1 and 2 press \"request maintenance\" for their PC: site 1 names it, site 2's customer ticks it in the list of computers the agent found on the LAN",
    );
    let (req1, nat1) = m.request(1);
    let (req2, nat2, name2, mac2) = m.request_discovered(2);
    assert_ne!(nat1, nat2, "two sites, two NAT addresses");
    detail(&format!("site 1: request {req1}, PC {PC} → {nat1}"));
    detail(&format!(
        "site 2: request {req2}, the discovered PC {PC} ({mac2}) as terminal \"{name2}\" → {nat2}"
    ));

    // 3. The technician reaches both PCs at once.
    say(
        "3",
        "the technician fetches both PCs' pages at the same time and holds a TCP echo session to each",
    );
    let both = within(
        "both PCs' pages through their NAT addresses",
        Duration::from_secs(10),
        || m.reaches_many(&[(nat1.as_str(), 1), (nat2.as_str(), 2)]) == [true, true],
    );
    detail(&format!(
        "http://{nat1}/ → \"PC {PC} at site 1\", http://{nat2}/ → \"PC {PC} at site 2\" ({} ms after the requests)",
        both.as_millis()
    ));
    let held = HeldEcho::start(&m.w, "held", &[&nat1, &nat2]);
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

    // 4b. A site that lets no UDP out.
    say(
        "4b",
        "site 4 requests: its router's firewall drops all outbound UDP, so its agent falls back to the tunnel over TLS",
    );
    let (req4, nat4) = m.request(UDP_BLOCKED_SITE);
    m.reached_within(&nat4, UDP_BLOCKED_SITE, Duration::from_secs(30));
    assert_eq!(
        m.agent_status(UDP_BLOCKED_SITE)["tunnel"]["transport"],
        "tls",
        "site 4's transport"
    );
    detail(&format!(
        "site 4: request {req4}, PC {PC} → {nat4} on {}, transport tls",
        m.gateway_name(m.gateway_of(UDP_BLOCKED_SITE))
    ));

    // 4c. An IPsec site with an agent.
    say(
        "4c",
        "site 5 requests: it is an IPsec site, so its agent dials IKEv2 to its gateway (IKE and ESP in UDP, all to the gateway's NAT-T port 4500)",
    );
    let (req5, nat5) = m.request(IPSEC_AGENT_SITE);
    m.reached_within(&nat5, IPSEC_AGENT_SITE, Duration::from_secs(15));
    let endpoint = m.agent_status(IPSEC_AGENT_SITE)["tunnel"]["endpoint"].clone();
    assert!(
        endpoint.as_str().is_some_and(|e| e.ends_with(":500")),
        "site 5's agent dials IKE: {endpoint}"
    );
    detail(&format!(
        "site 5: request {req5}, PC {PC} → {nat5} on {} (the server names its IKE endpoint {})",
        m.gateway_name(m.gateway_of(IPSEC_AGENT_SITE)),
        endpoint.as_str().unwrap_or("-")
    ));

    // 4d. An IPsec site whose router is configured by hand.
    say(
        "4d",
        "site 6 has no agent: the operator opens a request for its PC with the site's credential, reads the site's IPsec parameters from the server and configures the site's strongSwan router with them",
    );
    let (req6, nat6) = m.hand_request(&credential6);
    let gw6 = m.gateway_of(IPSEC_ROUTER_SITE);
    assert!(gw6.is_some(), "site 6 is placed on a gateway");
    let cfg = m.ipsec_config(IPSEC_ROUTER_SITE);
    let site6_id = m.sites[IPSEC_ROUTER_SITE - 1].id;
    assert_eq!(cfg["gateway_id"].as_u64(), gw6, "{cfg}");
    assert_eq!(
        cfg["gateway_addresses"],
        json!([
            gw_wan(&m.gateway_name(gw6)),
            gw_wan(&other_gw(&m.gateway_name(gw6)))
        ]),
        "the carrying gateway first, then the other one"
    );
    let p = &cfg["ipsec"];
    assert_eq!(p["local_ts"], json!([format!("{nat6}/32")]), "{cfg}");
    assert_eq!(p["remote_ts"], json!(["172.16.0.0/24"]), "{cfg}");
    assert_eq!(p["local_id"], format!("site-{site6_id}.vpnnat"), "{cfg}");
    assert_eq!(p["remote_id"], format!("gw-{site6_id}.vpnnat"), "{cfg}");
    let conf = cfg["swanctl_conf"].as_str().unwrap_or_default();
    assert!(
        conf.contains(&format!("local_ts = {nat6}/32")),
        "the server's swanctl.conf: {conf}"
    );
    detail(&format!(
        "site 6: request {req6}, PC {PC} → {nat6} on {}",
        m.gateway_name(gw6)
    ));
    detail(&format!(
        "GET /api/v1/sites/{site6_id}/ipsec (CLI: site ipsec-config {site6_id}): gateways {}, identities {} / {}, IKE {}, ESP {}, selectors {} ↔ {}, a {}-character pre-shared key",
        strs(&cfg["gateway_addresses"]),
        p["local_id"].as_str().unwrap_or("-"),
        p["remote_id"].as_str().unwrap_or("-"),
        p["ike_proposal"].as_str().unwrap_or("-"),
        p["esp_proposal"].as_str().unwrap_or("-"),
        strs(&p["local_ts"]),
        strs(&p["remote_ts"]),
        p["psk"].as_str().map_or(0, str::len),
    ));
    let t = Instant::now();
    let router = HandRouter::configure(&m.w, &cfg);
    detail(&format!(
        "router r6: {nat6}/32 on lo, nftables DNAT {nat6} → {PC} and SNAT back; strongSwan with {}; IKE SA up with {} after {} ms",
        router.describe(),
        router.dialing(),
        t.elapsed().as_millis()
    ));
    m.router = Some(router);
    m.reached_within(&nat6, IPSEC_ROUTER_SITE, Duration::from_secs(15));

    // 4e. A WireGuard site whose router has no agent.
    say(
        "4e",
        "site 7 has no agent: its router runs the wg-quick files the server renders (one tunnel per gateway); the customer phones in and the technician opens the request in the console; the router re-applies the NAT rules",
    );
    let config = m.wireguard_config();
    let interfaces = m.apply_router_files(&config, true);
    assert_eq!(
        interfaces.len(),
        2,
        "one wg-quick file per gateway: {config}"
    );
    let (req7, nat7) = m.phoned_in_request();
    let config = m.wireguard_config();
    assert_eq!(
        config["mappings"][0]["nat_address"],
        nat7.as_str(),
        "{config}"
    );
    m.apply_router_files(&config, false);
    m.reached_within(&nat7, AGENTLESS_SITE, Duration::from_secs(20));
    detail(&format!(
        "site 7: request {req7} opened by {} for the caller, PC {PC} → {nat7} on {}; router r7 runs {} (wg-quick + wireguard-go) and the NAT rules of vpnnat-nat.nft",
        TECH.0,
        m.gateway_name(m.gateway_of(AGENTLESS_SITE)),
        interfaces.join(", ")
    ));

    // All seven at once.
    let held_ipsec = HeldEcho::start(&m.w, "held-ipsec", &[&nat5, &nat6]);
    for nat in [&nat5, &nat6] {
        assert!(
            held_ipsec.alive(nat, Duration::from_secs(5)),
            "the echo session to {nat} works"
        );
    }
    assert!(
        held.alive(&nat1, Duration::from_secs(3)) && held.alive(&nat2, Duration::from_secs(3)),
        "the IPsec sites do not disturb the other sites' sessions"
    );
    let all = m.reaches_many(&[
        (nat3.as_str(), 3),
        (nat4.as_str(), UDP_BLOCKED_SITE),
        (nat5.as_str(), IPSEC_AGENT_SITE),
        (nat6.as_str(), IPSEC_ROUTER_SITE),
        (nat7.as_str(), AGENTLESS_SITE),
    ]);
    assert!(all.iter().all(|ok| *ok), "every site open at once: {all:?}");
    detail(&format!(
        "http://{nat5}/ → \"PC {PC} at site 5\", http://{nat6}/ → \"PC {PC} at site 6\"; echo sessions to both open, while sites 1 to 4 stay reachable"
    ));

    // 5. Isolation.
    say(
        "5",
        "the technician can reach nothing else: no other LAN address, no other site through a gateway, nothing after a request ends",
    );
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
    let open_nats = [&nat1, &nat2, &nat3, &nat4, &nat5, &nat6, &nat7];
    for addr in ["10.64.255.254", "10.64.0.1", "10.64.128.7"] {
        if !open_nats.iter().any(|n| n.as_str() == addr) {
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
            &format!(
                "ip route replace {nat1}/32 via {}",
                gw_lan(&m.gateway_name(g2))
            ),
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
    assert!(
        [&nat1, &nat2, &nat4, &nat5, &nat6, &nat7]
            .iter()
            .all(|n| **n != nat3b),
        "{nat3b} is free"
    );
    m.reached_within(&nat3b, 3, Duration::from_secs(10));
    detail(&format!(
        "site 3 asks again: request {req3b} gets {nat3b} from the pool, on {}",
        m.gateway_name(m.gateway_of(3))
    ));

    // 7. A gateway dies.
    let open: Vec<(usize, String)> = vec![
        (2, nat2.clone()),
        (3, nat3b.clone()),
        (UDP_BLOCKED_SITE, nat4.clone()),
        (IPSEC_AGENT_SITE, nat5.clone()),
        (IPSEC_ROUTER_SITE, nat6.clone()),
        (AGENTLESS_SITE, nat7.clone()),
    ];
    let victim = m.gateway_name(m.gateway_of(2));
    say(
        "7",
        &format!("kill -9 {victim}, the gateway that carries site 2"),
    );
    let sessions = [
        (&held, nat2.as_str()),
        (&held_ipsec, nat5.as_str()),
        (&held_ipsec, nat6.as_str()),
    ];
    let mut failovers = fail_over(&mut m, "7", &victim, &open, &sessions);
    let failover = failovers
        .iter()
        .find(|f| f.site == m.sites[1].name)
        .map(|f| f.reached)
        .expect("site 2 failed over");
    // Every remaining slot is taken now (sites 2 to 7): a new site gets a
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
    restart_gateway(&mut m, &victim);

    // 7b. The other gateway dies: everything moves back.
    let survivor = other_gw(&victim);
    say(
        "7b",
        &format!(
            "kill -9 {survivor}, which now carries all six open sites: they move to the restarted {victim}"
        ),
    );
    let back = fail_over(&mut m, "7b", &survivor, &open, &sessions);
    assert_eq!(back.len(), open.len(), "every open site was on {survivor}");
    failovers.extend(back);
    restart_gateway(&mut m, &survivor);
    for s in [IPSEC_AGENT_SITE, IPSEC_ROUTER_SITE, AGENTLESS_SITE] {
        assert!(
            failovers.iter().any(|f| f.site == m.sites[s - 1].name),
            "site {s} failed over"
        );
    }

    // 8. Restart the server.
    say("8", "restart the maintenance server: nothing is lost");
    let snapshot = |m: &Mission| {
        let (code, reqs) = m.technician("GET", "/api/v1/requests", None);
        assert_eq!(code, 200, "{reqs}");
        let sites: Vec<Value> = (1..=SITES).map(|s| m.site_view(s)).collect();
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
    for (s, nat) in &open {
        assert!(
            m.reaches(nat, *s),
            "site {s} still reached after the restart"
        );
        if *s != IPSEC_ROUTER_SITE && *s != AGENTLESS_SITE {
            let maps = m.agent_status(*s)["mappings"].clone();
            assert!(maps.to_string().contains(nat.as_str()), "{maps}");
        }
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
    let rows: Vec<Row> = std::iter::once((1, nat1_now))
        .chain(open.iter().cloned())
        .map(|(s, nat)| Row {
            site: m.sites[s - 1].name.clone(),
            tunnel: m.sites[s - 1].tunnel,
            lan: PC,
            reached: m.reaches(&nat, s),
            gateway: m.gateway_name(m.gateway_of(s)),
            nat,
        })
        .collect();
    println!("\n  site     tunnel              LAN address    NAT address    gateway  reached");
    for r in &rows {
        println!(
            "  {:<8} {:<19} {:<14} {:<14} {:<8} {}",
            r.site,
            r.tunnel.label(),
            r.lan,
            r.nat,
            r.gateway,
            if r.reached { "yes" } else { "no" }
        );
    }
    println!("\n  failovers (kill -9 → moved by the server / reached again):");
    for f in &failovers {
        println!(
            "  [{:<2}] {:<8} {:<19} {} → {}: {:>5} ms / {:>5} ms",
            f.step,
            f.site,
            f.tunnel.label(),
            f.from,
            f.to,
            f.moved.as_millis(),
            f.reached.as_millis()
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
    drop(held_ipsec);
    Outcome {
        rows,
        press_to_tcp,
        end_to_gone,
        failover,
        failovers,
    }
}

/// The gateways' addresses in the world.
fn gw_wan(name: &str) -> &'static str {
    if name == "gw1" {
        "203.0.113.11"
    } else {
        "203.0.113.12"
    }
}

fn gw_lan(name: &str) -> &'static str {
    if name == "gw1" {
        "172.16.0.11"
    } else {
        "172.16.0.12"
    }
}

fn other_gw(name: &str) -> String {
    if name == "gw1" { "gw2" } else { "gw1" }.to_owned()
}

/// A JSON list of strings, comma-separated.
fn strs(v: &Value) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// kill -9 of `victim`: every site of `open` ((site, NAT address)) it
/// carries must be moved by the server and reached again, at the same NAT
/// address, through the other gateway; the hand-configured router (site 6)
/// is left to its own watchdog (see [`HandRouter`]). `held`: the
/// technician's held TCP sessions, reported for the moved sites.
fn fail_over(
    m: &mut Mission,
    step: &'static str,
    victim: &str,
    open: &[(usize, String)],
    held: &[(&HeldEcho, &str)],
) -> Vec<Failover> {
    let placed = m.placement();
    let moved: Vec<(usize, String)> = open
        .iter()
        .filter(|(s, _)| m.gateway_name(placed[s - 1]) == victim)
        .cloned()
        .collect();
    assert!(!moved.is_empty(), "{victim} carries none of {open:?}");
    detail(&format!(
        "{victim} carries {}",
        moved
            .iter()
            .map(|(s, _)| format!("site {s} ({})", m.sites[s - 1].tunnel.label()))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let events_before = m.router.as_ref().map_or(0, |r| r.events.len());
    let mut moved_at: Vec<Option<Duration>> = vec![None; moved.len()];
    let mut reached_at: Vec<Option<Duration>> = vec![None; moved.len()];
    // One page fetch (at most a second) in flight per site, started again
    // as soon as one fails: a site's time is when its first page arrived.
    let mut probes = Probes::default();
    let (mut looked, mut watched) = (None::<Instant>, None::<Instant>);
    let sessions: Vec<(&HeldEcho, &str, u64)> = held
        .iter()
        .filter(|(_, nat)| moved.iter().any(|(_, n)| n == nat))
        .map(|(h, nat)| (*h, *nat, h.read(nat).1))
        .collect();
    let t0 = Instant::now();
    m.w.kill9(victim);
    while reached_at.iter().chain(&moved_at).any(Option::is_none) {
        assert!(
            t0.elapsed() < FAILOVER_LIMIT,
            "not reached again within {FAILOVER_LIMIT:?} of kill -9 {victim}: sites {:?}",
            (0..moved.len())
                .filter(|i| reached_at[*i].is_none())
                .map(|i| moved[i].0)
                .collect::<Vec<_>>()
        );
        for (i, (s, nat)) in moved.iter().enumerate() {
            if reached_at[i].is_none()
                && let Some(page) = probes.poll(m, i, nat)
                && page.contains(&format!("PC {PC} at site {s}<"))
            {
                reached_at[i] = Some(t0.elapsed());
            }
        }
        if looked.is_none_or(|t| t.elapsed() >= Duration::from_millis(100)) {
            looked = Some(Instant::now());
            let placed = m.placement();
            let now = t0.elapsed();
            for (i, (s, _)) in moved.iter().enumerate() {
                if moved_at[i].is_none() && m.gateway_name(placed[s - 1]) != victim {
                    moved_at[i] = Some(now);
                }
            }
        }
        // Site 6's router, unattended: its watchdog looks every 250 ms.
        let router_waits = moved
            .iter()
            .zip(&reached_at)
            .any(|((s, _), r)| *s == IPSEC_ROUTER_SITE && r.is_none());
        if router_waits
            && watched.is_none_or(|t| t.elapsed() >= Duration::from_millis(250))
            && let Some(r) = m.router.as_mut()
        {
            r.watch(t0);
            watched = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(probes);
    let placed = m.placement();
    let mut out = Vec::new();
    for (i, (s, nat)) in moved.iter().enumerate() {
        let to = m.gateway_name(placed[s - 1]);
        assert!(to != victim && to != "-", "site {s} is on {to}");
        let f = Failover {
            step,
            site: m.sites[s - 1].name.clone(),
            tunnel: m.sites[s - 1].tunnel,
            from: victim.to_owned(),
            to,
            moved: moved_at[i].unwrap(),
            reached: reached_at[i].unwrap(),
        };
        detail(&format!(
            "site {s} ({}) moved to {} after {} ms and is reached at the same address {nat} after {} ms",
            f.tunnel.label(),
            f.to,
            f.moved.as_millis(),
            f.reached.as_millis()
        ));
        // The agents follow the server at once (over TLS: after UDP's 2 s);
        // the WireGuard router without an agent holds a tunnel to each
        // gateway and retries the handshake with the other one every 5 s
        // (WireGuard's REKEY_TIMEOUT) until that gateway takes the site; the
        // hand-configured IPsec router first needs its dead-peer detection.
        let limit = match f.tunnel {
            Tunnel::Wireguard | Tunnel::IpsecAgent => Duration::from_secs(10),
            Tunnel::WireguardTls | Tunnel::WireguardRouter => Duration::from_secs(20),
            Tunnel::IpsecRouter => FAILOVER_LIMIT,
        };
        assert!(
            f.reached <= limit,
            "site {s} ({}) reached again after {:?}, more than {limit:?}",
            f.tunnel.label(),
            f.reached
        );
        if *s == UDP_BLOCKED_SITE {
            assert_eq!(
                m.agent_status(UDP_BLOCKED_SITE)["tunnel"]["transport"],
                "tls",
                "site 4 stays on TLS"
            );
        }
        out.push(f);
    }
    if let Some(r) = m.router.as_ref() {
        for e in &r.events[events_before..] {
            detail(&format!("site 6's router at {e}"));
        }
    }
    report_sessions(&sessions);
    out
}

/// Whether the technician's held TCP sessions to moved sites carry data
/// again: an echo after every site was reached again (reported, not
/// asserted: a session that lost a segment in the outage sends again when
/// TCP's exponential back-off says, e.g. 12.6 s after the loss for an
/// outage of 6 to 12 s).
fn report_sessions(sessions: &[(&HeldEcho, &str, u64)]) {
    let wait = Duration::from_secs(15);
    let t = Instant::now();
    let mut pending: Vec<(&HeldEcho, &str, u64, u64)> = sessions
        .iter()
        .map(|(h, nat, before)| (*h, *nat, *before, h.read(nat).1))
        .collect();
    while !pending.is_empty() && t.elapsed() < wait {
        pending.retain(|(h, nat, before, base)| {
            let (open, now) = h.read(nat);
            if !open {
                detail(&format!(
                    "the technician's held TCP session to {nat} was closed by the failover"
                ));
            } else if now > *base {
                detail(&format!(
                    "the technician's held TCP session to {nat} survived the failover ({before} echoes before the kill, echoing again {} ms after every site was reached)",
                    t.elapsed().as_millis()
                ));
            }
            open && now <= *base
        });
        std::thread::sleep(Duration::from_millis(50));
    }
    for (_, nat, before, _) in pending {
        detail(&format!(
            "the technician's held TCP session to {nat} is still open but has echoed nothing within {wait:?} of the failover ({before} echoes before the kill)"
        ));
    }
}

/// The technician's page fetches of [`fail_over`], one per site: killed
/// when dropped.
#[derive(Default)]
struct Probes(std::collections::BTreeMap<usize, (std::process::Child, std::path::PathBuf)>);

impl Probes {
    /// Starts a fetch of `http://nat/` for slot `i` if none runs; when one
    /// has finished, the page it got (empty when it failed).
    fn poll(&mut self, m: &Mission, i: usize, nat: &str) -> Option<String> {
        if let Some((child, file)) = self.0.get_mut(&i) {
            // Still running: nothing yet.
            child.try_wait().ok().flatten()?;
            let page = std::fs::read_to_string(&*file).unwrap_or_default();
            let _ = std::fs::remove_file(&*file);
            self.0.remove(&i);
            return Some(page);
        }
        let file = m.w.dir.join(format!("probe-{nat}"));
        let _ = std::fs::remove_file(&file);
        let child =
            m.w.command("tech", "curl")
                .args(["-s", "--max-time", "1", "--connect-timeout", "1", "-o"])
                .arg(&file)
                .arg(format!("http://{nat}/"))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
        self.0.insert(i, (child, file));
        None
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        for (child, file) in self.0.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(&*file);
        }
    }
}

/// The operator restarts a killed gateway; it comes back healthy with its
/// slots free.
fn restart_gateway(m: &mut Mission, name: &str) {
    let gw_config = m.w.dir.join(name).join("gateway.toml");
    let name: &'static str = if name == "gw1" { "gw1" } else { "gw2" };
    start_gateway(&mut m.w, name, &gw_config);
    within(
        &format!("{name} healthy again"),
        Duration::from_secs(10),
        || m.gateways().iter().all(|g| g["health"] == "healthy"),
    );
    detail(&format!(
        "the operator restarts {name}: healthy, its slots free again"
    ));
}

/// Creates sites 1..=`count` (site 3 is the netstack agent behind its
/// router's NAPT, site 4's router lets no UDP out, site 5 is switched to
/// IPsec by the operator), enrolls and starts their agents, and waits until
/// every site's page answers and the server sees it enrolled.
fn enroll_sites(m: &mut Mission, count: usize) {
    for n in 1..=count {
        let name = format!("site {n}");
        let (code, v) = m.operator("POST", "/api/v1/sites", Some(&json!({ "name": name })));
        assert_eq!(code, 201, "create {name}: {v}");
        let token = v["enrollment_token"].as_str().unwrap().to_owned();
        let id = v["site_id"].as_u64().unwrap();
        let netstack = n == 3;
        let (agent_host, page, lan_host) = match n {
            1 => ("r1", "192.168.1.1", "pc1"),
            2 => ("r2", "192.168.1.1", "pc2"),
            3 => ("ah3", "192.168.1.20", "pc3"),
            4 => ("r4", "192.168.1.1", "pc4"),
            _ => ("r5", "192.168.1.1", "pc5"),
        };
        let tunnel = match n {
            UDP_BLOCKED_SITE => Tunnel::WireguardTls,
            IPSEC_AGENT_SITE => {
                // The operator's switch (CLI: `site tunnel ID ipsec`); the
                // agent learns the kind from the server.
                let (code, v) = m.operator(
                    "POST",
                    &format!("/api/v1/sites/{id}/tunnel"),
                    Some(&json!({ "tunnel": "ipsec" })),
                );
                assert_eq!(code, 204, "{name} to IPsec: {v}");
                Tunnel::IpsecAgent
            }
            _ => Tunnel::Wireguard,
        };
        let config = agent_config(&m.w.dir, n, netstack, n == UDP_BLOCKED_SITE);
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
            m.w.command(agent_host, bin("router-agent"))
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
            id,
            tunnel,
            page,
            lan_host,
        });
        let expected = if tunnel == Tunnel::IpsecAgent {
            "ipsec"
        } else {
            "wireguard"
        };
        assert_eq!(m.site_view(n)["tunnel"], expected, "site {n}'s tunnel kind");
        detail(&format!(
            "{}: agent in {} mode on {agent_host}, page http://{page}:8088/{}",
            m.sites[n - 1].name,
            if netstack { "netstack" } else { "packet" },
            if tunnel == Tunnel::IpsecAgent {
                ", tunnel kind set to IPsec by the operator"
            } else {
                ""
            }
        ));
    }
    for n in 1..=count {
        within(&format!("site {n}'s page"), Duration::from_secs(20), || {
            m.w.check_alive();
            m.page(n, "GET", "/healthz", None).0 == 200
        });
    }
    within("every site enrolled", Duration::from_secs(5), || {
        (1..=count).all(|n| m.site_view(n)["enrolled"] == true)
    });
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
        if s.tunnel == Tunnel::IpsecRouter {
            println!(
                "  {}: ip netns exec {} curl http://{nat}/    no agent: its router {} runs strongSwan (ip netns exec {} ip route show table 220)",
                s.name,
                ns("tech"),
                ns("r6"),
                ns("r6")
            );
            continue;
        }
        if s.tunnel == Tunnel::WireguardRouter {
            println!(
                "  {}: ip netns exec {} curl http://{nat}/    no agent: its router {} runs wg-quick (ip netns exec {} wg show)",
                s.name,
                ns("tech"),
                ns("r7"),
                ns("r7")
            );
            continue;
        }
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
