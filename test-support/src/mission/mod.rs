//! The whole mission, end to end: the world of `scripts/world.sh` (an
//! internet, a center with the maintenance server, two gateways and a
//! technician, four customer sites that all use 192.168.1.0/24, the fourth
//! behind a firewall that lets no UDP out) and the
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
use self::world::{World, wall, within};
use crate::prereq::Prereq;
use crate::process::bin;

mod actors;
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
];

const PASSWORD: &str = "site page password";
const TECH: (&str, &str) = ("alice", "technician password 1");
const SERVER_LAN: &str = "172.16.0.10:8080";
const SERVER_WAN: &str = "203.0.113.10:8080";
const PC: &str = "192.168.1.10";
/// Gateways' tunnel slots (`max_tunnels = 3` each: the second gateway is
/// needed once four sites connect, and a gateway that survives the other
/// is full with the three sites still open then).
const MAX_TUNNELS: u64 = 3;
/// The site whose router lets no UDP out: its tunnel runs over TLS.
const UDP_BLOCKED_SITE: usize = 4;

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
            "building the world \"{world_name}\": an internet, a center (server, gw1, gw2, technician) and four sites (site 4 lets no UDP out), every PC at {PC}"
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
        "the operator creates four sites; each router agent enrolls with its one-time token",
    );
    enroll_sites(&mut m, 4);

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
        if addr != nat1 && addr != nat2 && addr != nat3 && addr != nat4 {
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
    assert!(
        nat3b != nat1 && nat3b != nat2 && nat3b != nat4,
        "{nat3b} is free"
    );
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
    let site4_moves = m.gateway_name(m.gateway_of(UDP_BLOCKED_SITE)) == victim;
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
    if site4_moves {
        m.reached_within(&nat4, UDP_BLOCKED_SITE, Duration::from_secs(20));
        assert_eq!(
            m.agent_status(UDP_BLOCKED_SITE)["tunnel"]["transport"],
            "tls"
        );
        detail(&format!(
            "site 4 (no UDP) moved with it to {} and is reached at {nat4} over TLS",
            m.gateway_name(m.gateway_of(UDP_BLOCKED_SITE))
        ));
    }
    // Every remaining slot is taken now (sites 2, 3 and 4): a new site gets a
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
        let sites: Vec<Value> = (1..=4).map(|s| m.site_view(s)).collect();
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
    for (s, nat) in [(2, &nat2), (3, &nat3b), (UDP_BLOCKED_SITE, &nat4)] {
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
    let rows: Vec<Row> = [
        (1, nat1_now),
        (2, nat2.clone()),
        (3, nat3b.clone()),
        (UDP_BLOCKED_SITE, nat4.clone()),
    ]
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

/// Creates sites 1..=`count` (site 3 is the netstack agent behind its
/// router's NAPT, site 4's router lets no UDP out), enrolls and starts
/// their agents, and waits until every
/// site's page answers and the server sees it enrolled.
fn enroll_sites(m: &mut Mission, count: usize) {
    for n in 1..=count {
        let name = format!("site {n}");
        let (code, v) = m.operator("POST", "/api/v1/sites", Some(&json!({ "name": name })));
        assert_eq!(code, 201, "create {name}: {v}");
        let token = v["enrollment_token"].as_str().unwrap().to_owned();
        let netstack = n == 3;
        let (agent_host, page, lan_host) = match n {
            1 => ("r1", "192.168.1.1", "pc1"),
            2 => ("r2", "192.168.1.1", "pc2"),
            3 => ("ah3", "192.168.1.20", "pc3"),
            _ => ("r4", "192.168.1.1", "pc4"),
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
