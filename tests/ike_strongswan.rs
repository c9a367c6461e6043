//! Engine-level interop: our IKEv2 engine (`vpnnat::ipsec::ike`) against a
//! real strongSwan 5.9.8 (the project's harness, `scripts/strongswan-peer.sh`),
//! each in a fresh network namespace, joined by a veth. No ESP here: the
//! tests check that IKE_SA and CHILD_SA come up with SPIs and selectors that
//! strongSwan agrees with (`swanctl --list-sas`), that rekeys started by
//! either side land on both, and that our liveness check notices a killed
//! strongSwan.
//!
//! The engine runs in a child process of this test binary started with
//! `ip netns exec` (the process then lives in the namespace; no `setns` in
//! this process): the test `engine_process` is `#[ignore]`d, so that it never
//! shows as a passing test of its own; the parent runs it with `--ignored
//! --exact`, and it fails without `VPNNAT_IKE_ENGINE`. It drives one [`IkeSa`] from a small UDP loop
//! on ports 500 and 4500, prints one `IKE <event>` line per event, and takes
//! commands (`rekey_child`, `rekey_ike`) on stdin.
//!
//! Addresses as in tests/strongswan_harness.rs: the gateway namespace at
//! 198.51.100.1 for the technician prefix 172.16.0.0/24, the site namespace
//! at 198.51.100.11 for the site's NAT addresses 10.64.1.0/24.
//!
//! The last test is program-level: strongSwan as a hand-configured router
//! at an IPsec site dials the real `gateway` binary (IKE on its port 500,
//! then NAT-T on 4500 with ESP in UDP), in the namespaces of
//! `tests/gateway_support`, and the technician reaches the site through it.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod gateway_support;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vpnnat::ipsec::ike::wire::{Id, TrafficSelector};
use vpnnat::ipsec::ike::{Config, Event, IKE_PORT, IkeSa, NAT_T_PORT};
use vpnnat_test_support::strongswan::{IkeSa as SwanSa, PeerOptions, StrongSwan};
use vpnnat_test_support::{Netns, Prereq, require, veth, wait_until};

const PSK: &str = "ike-strongswan-interop-psk-0123456789abcdef";
const ENV: &str = "VPNNAT_IKE_ENGINE";
const GW: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const SITE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
const SETTLE: Duration = Duration::from_secs(15);

fn prereqs() -> bool {
    require(&[
        Prereq::Root,
        Prereq::Tun,
        Prereq::Program("ip"),
        Prereq::StrongSwan,
    ])
}

fn namespaces() -> (Netns, Netns) {
    let gw = Netns::new("ikegw");
    let site = Netns::new("ikesite");
    veth(
        &gw,
        "wan0",
        Some("198.51.100.1/24"),
        &site,
        "wan0",
        Some("198.51.100.11/24"),
    );
    gw.ip(&["addr", "add", "172.16.0.50/32", "dev", "lo"]);
    site.ip(&["addr", "add", "10.64.1.1/32", "dev", "lo"]);
    (gw, site)
}

fn prefix(s: &str) -> TrafficSelector {
    let (a, l) = s.split_once('/').unwrap();
    TrafficSelector::ipv4_prefix(a.parse().unwrap(), l.parse().unwrap())
}

/// The engine side, in the child process. Spec from the environment:
/// `initiator|responder local remote local_ts remote_ts`.
#[test]
#[ignore = "the engine half of the interop tests, started by them in a namespace"]
fn engine_process() {
    let spec = std::env::var(ENV).expect("started by an interop test with VPNNAT_IKE_ENGINE set");
    let f: Vec<&str> = spec.split_whitespace().collect();
    let (initiator, local, remote): (bool, Ipv4Addr, Ipv4Addr) = (
        f[0] == "initiator",
        f[1].parse().unwrap(),
        f[2].parse().unwrap(),
    );
    let mut config = Config::new(
        PSK.as_bytes(),
        Id::ipv4(local),
        Id::ipv4(remote),
        vec![prefix(f[3])],
        vec![prefix(f[4])],
    )
    .expect("PSK long enough");
    config.dpd_interval = Duration::from_secs(2);
    config.retransmit_base = Duration::from_millis(500);
    config.retransmit_tries = 3;
    let s500 = UdpSocket::bind((local, IKE_PORT)).unwrap();
    let s4500 = UdpSocket::bind((local, NAT_T_PORT)).unwrap();
    for s in [&s500, &s4500] {
        s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
    }
    let (tx, commands) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut rng = rand::rngs::OsRng;
    let remote_ike = SocketAddr::new(IpAddr::V4(remote), IKE_PORT);
    let mut sa = initiator.then(|| {
        IkeSa::initiator(
            config.clone(),
            IpAddr::V4(local),
            remote_ike,
            Instant::now(),
            &mut rng,
        )
    });
    let mut buf = [0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let now = Instant::now();
        for (port, sock) in [(IKE_PORT, &s500), (NAT_T_PORT, &s4500)] {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let sa = sa.get_or_insert_with(|| {
                // The gateway chooses its SPI; here a peer index 0xabcdef in the low 24 bits.
                let spi_r = (rand::RngCore::next_u64(&mut rng) & !0xff_ffff) | 0xab_cdef;
                IkeSa::responder(config.clone(), spi_r, IpAddr::V4(local), from, now)
            });
            let _ = sa.handle_input(port, from, &buf[..n], now, &mut rng);
        }
        let Some(sa) = sa.as_mut() else { continue };
        while let Ok(cmd) = commands.try_recv() {
            match cmd.trim() {
                "rekey_child" => sa.rekey_child(now, &mut rng),
                "rekey_ike" => sa.rekey_ike(now, &mut rng),
                _ => return,
            }
        }
        if sa.poll_timeout().is_some_and(|t| t <= now) {
            sa.handle_timeout(now, &mut rng);
        }
        while let Some(t) = sa.poll_transmit() {
            let sock = if t.local_port == NAT_T_PORT {
                &s4500
            } else {
                &s500
            };
            sock.send_to(&t.payload, t.remote).unwrap();
        }
        while let Some(e) = sa.poll_event() {
            let line = match e {
                Event::IkeSaUp { spi_i, spi_r } => {
                    format!(
                        "ike_up {spi_i:016x} {spi_r:016x} behind_nat={}",
                        sa.behind_nat()
                    )
                }
                Event::ChildSaUp { sa: c, .. } => {
                    format!("child_up {:08x} {:08x}", c.spi_in, c.spi_out)
                }
                Event::ChildSaRekeyed { new, .. } => {
                    format!("child_rekeyed {:08x} {:08x}", new.spi_in, new.spi_out)
                }
                Event::IkeSaRekeyed { spi_i, spi_r } => {
                    format!("ike_rekeyed {spi_i:016x} {spi_r:016x}")
                }
                other => format!("{other:?}"),
            };
            println!("IKE {line}");
            std::io::stdout().flush().unwrap();
        }
    }
}

/// The engine child process and its event lines.
struct Engine {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Engine {
    fn start(ns: &Netns, spec: &str) -> Self {
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(exe)
            .args([
                "--ignored",
                "--exact",
                "engine_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ENV, spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest's "test engine_process ... " may precede the first line.
                if let Some((_, l)) = line.split_once("IKE ") {
                    eprintln!("engine: {l}");
                    if tx.send(l.to_owned()).is_err() {
                        break;
                    }
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
        }
    }

    /// The next event line starting with `what`, skipping others.
    fn expect(&self, what: &str) -> Vec<String> {
        let deadline = Instant::now() + SETTLE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no `{what}` from the engine"));
            if line.starts_with(what) {
                return line.split_whitespace().map(str::to_owned).collect();
            }
        }
    }

    fn command(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").unwrap();
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hex32(s: &str) -> u32 {
    u32::from_str_radix(s, 16).unwrap()
}

fn hex64(s: &str) -> u64 {
    u64::from_str_radix(s, 16).unwrap()
}

/// strongSwan's view once it shows the CHILD_SA whose inbound SPI is `spi_in`
/// (ours outbound) as its only installed one.
fn swan_with_child(swan: &StrongSwan, spi_in: u32, spi_out: u32) -> SwanSa {
    let mut found = None;
    wait_until("strongSwan to show the CHILD_SA", SETTLE, || {
        found = swan.sas().into_iter().find(|sa| {
            sa.state == "ESTABLISHED"
                && sa
                    .installed_child()
                    .is_some_and(|c| (c.spi_in, c.spi_out) == (spi_out, spi_in))
        });
        found.is_some()
    });
    found.unwrap()
}

fn swan_options(local: Ipv4Addr, remote: Ipv4Addr, local_ts: &str, remote_ts: &str) -> PeerOptions {
    PeerOptions {
        ike_proposals: Some("aes256gcm16-prfsha256-x25519".to_owned()),
        esp_proposals: Some("aes256gcm16-x25519-noesn".to_owned()),
        ..PeerOptions::new(
            &local.to_string(),
            &remote.to_string(),
            PSK,
            local_ts,
            remote_ts,
        )
    }
}

/// Up, then a CHILD_SA rekey and an IKE_SA rekey from each side.
fn up_and_rekeys(engine: &mut Engine, swan: &StrongSwan) {
    let ike = engine.expect("ike_up");
    let child = engine.expect("child_up");
    let (spi_in, spi_out) = (hex32(&child[1]), hex32(&child[2]));
    let sa = swan_with_child(swan, spi_in, spi_out);
    assert_eq!(
        (sa.spi_i, sa.spi_r),
        (hex64(&ike[1]), hex64(&ike[2])),
        "IKE SPIs"
    );
    assert_eq!(sa.dh_group.as_deref(), Some("CURVE_25519"));

    engine.command("rekey_child");
    let c = engine.expect("child_rekeyed");
    assert_ne!(hex32(&c[1]), spi_in);
    swan_with_child(swan, hex32(&c[1]), hex32(&c[2]));

    swan.rekey_child();
    let c = engine.expect("child_rekeyed");
    let (spi_in, spi_out) = (hex32(&c[1]), hex32(&c[2]));
    swan_with_child(swan, spi_in, spi_out);

    for ours in [true, false] {
        if ours {
            engine.command("rekey_ike");
        } else {
            swan.rekey_ike();
        }
        let r = engine.expect("ike_rekeyed");
        let (spi_i, spi_r) = (hex64(&r[1]), hex64(&r[2]));
        wait_until(
            "strongSwan to show the rekeyed IKE_SA alone",
            SETTLE,
            || {
                let sas = swan.sas();
                sas.len() == 1
                    && sas[0].state == "ESTABLISHED"
                    && (sas[0].spi_i, sas[0].spi_r) == (spi_i, spi_r)
            },
        );
        // The CHILD_SA moved over unchanged.
        swan_with_child(swan, spi_in, spi_out);
    }
}

#[test]
fn ike_strongswan_responder_rekeys_and_dpd() {
    if !prereqs() {
        return;
    }
    let (gw_ns, site_ns) = namespaces();
    let mut swan = StrongSwan::start(
        &gw_ns,
        &swan_options(GW, SITE, "172.16.0.0/24", "10.64.1.0/24"),
    );
    let mut engine = Engine::start(
        &site_ns,
        &format!("initiator {SITE} {GW} 10.64.1.0/24 172.16.0.0/24"),
    );
    up_and_rekeys(&mut engine, &swan);
    // Our liveness check notices a killed strongSwan: 2 s of silence, then
    // three sends 0.5 s, 1 s, 2 s apart.
    swan.kill();
    let down = engine.expect("IkeSaDown");
    assert_eq!(down.join(" "), "IkeSaDown(Timeout)");
}

#[test]
fn ike_strongswan_initiator_rekeys() {
    if !prereqs() {
        return;
    }
    let (gw_ns, site_ns) = namespaces();
    let mut engine = Engine::start(
        &gw_ns,
        &format!("responder {GW} {SITE} 172.16.0.0/24 10.64.1.0/24"),
    );
    // Let the engine bind its sockets before strongSwan dials.
    std::thread::sleep(Duration::from_millis(500));
    let swan = StrongSwan::start(
        &site_ns,
        &PeerOptions {
            initiator: true,
            ..swan_options(SITE, GW, "10.64.1.0/24", "172.16.0.0/24")
        },
    );
    up_and_rekeys(&mut engine, &swan);
    let sa = swan.sas().pop().unwrap();
    // strongSwan floated to 4500 (it fakes a NAT) and reached our 4500 socket.
    assert_eq!(sa.remote, "198.51.100.1:4500");
}

#[test]
fn ike_strongswan_initiator_offering_many_proposals_gets_invalid_ke() {
    if !prereqs() {
        return;
    }
    let (gw_ns, site_ns) = namespaces();
    let _engine = Engine::start(
        &gw_ns,
        &format!("responder {GW} {SITE} 172.16.0.0/24 10.64.1.0/24"),
    );
    std::thread::sleep(Duration::from_millis(500));
    // A classic proposal first (its KE, ECP-256, is not one of ours), then
    // strongSwan's whole default set: we pick AES-GCM-256/PRF-SHA256 from the
    // latter and ask for x25519 with INVALID_KE_PAYLOAD.
    let swan = StrongSwan::start(
        &site_ns,
        &PeerOptions {
            initiator: true,
            ike_proposals: Some("aes128-sha256-ecp256,default".to_owned()),
            esp_proposals: Some("default".to_owned()),
            ..swan_options(SITE, GW, "10.64.1.0/24", "172.16.0.0/24")
        },
    );
    let sa = swan.wait_established(SETTLE);
    assert_eq!(sa.dh_group.as_deref(), Some("CURVE_25519"));
    assert_eq!(
        sa.fields.get("encr-alg").map(String::as_str),
        Some("AES_GCM_16")
    );
    assert_eq!(
        sa.fields.get("encr-keysize").map(String::as_str),
        Some("256")
    );
    let log = swan.log();
    assert!(
        log.contains("it requested CURVE_25519"),
        "strongSwan was sent INVALID_KE_PAYLOAD asking for x25519:\n{log}"
    );
}

#[test]
fn ike_strongswan_responder_asks_for_modp2048() {
    if !prereqs() {
        return;
    }
    let (gw_ns, site_ns) = namespaces();
    // strongSwan accepts MODP-2048 only: our first KE (x25519) gets
    // INVALID_KE_PAYLOAD and we retry with group 14, also for the PFS rekey.
    let swan = StrongSwan::start(
        &gw_ns,
        &PeerOptions {
            ike_proposals: Some("aes256gcm16-prfsha256-modp2048".to_owned()),
            esp_proposals: Some("aes256gcm16-modp2048-noesn".to_owned()),
            ..swan_options(GW, SITE, "172.16.0.0/24", "10.64.1.0/24")
        },
    );
    let mut engine = Engine::start(
        &site_ns,
        &format!("initiator {SITE} {GW} 10.64.1.0/24 172.16.0.0/24"),
    );
    let ike = engine.expect("ike_up");
    let child = engine.expect("child_up");
    let sa = swan_with_child(&swan, hex32(&child[1]), hex32(&child[2]));
    assert_eq!((sa.spi_i, sa.spi_r), (hex64(&ike[1]), hex64(&ike[2])));
    assert_eq!(sa.dh_group.as_deref(), Some("MODP_2048"));
    engine.command("rekey_child");
    let c = engine.expect("child_rekeyed");
    let sa = swan_with_child(&swan, hex32(&c[1]), hex32(&c[2]));
    assert_eq!(
        sa.installed_child().unwrap().dh_group.as_deref(),
        Some("MODP_2048")
    );
    // An IKE_SA rekey from our side uses the IKE SA's group too.
    engine.command("rekey_ike");
    let r = engine.expect("ike_rekeyed");
    let (spi_i, spi_r) = (hex64(&r[1]), hex64(&r[2]));
    wait_until(
        "strongSwan to show the rekeyed IKE_SA alone",
        SETTLE,
        || {
            let sas = swan.sas();
            sas.len() == 1
                && (sas[0].spi_i, sas[0].spi_r) == (spi_i, spi_r)
                && sas[0].dh_group.as_deref() == Some("MODP_2048")
        },
    );
}

#[test]
fn ike_strongswan_through_napt() {
    if !prereqs() || !require(&[Prereq::Program("nft")]) {
        return;
    }
    // site 192.0.2.2 → NAPT router (192.0.2.1 | 198.51.100.254, source
    // ports rewritten into 40000–40999) → strongSwan at 198.51.100.1.
    let gw_ns = Netns::new("ikenatgw");
    let router = Netns::new("ikenatrt");
    let site_ns = Netns::new("ikenatsite");
    veth(
        &gw_ns,
        "wan0",
        Some("198.51.100.1/24"),
        &router,
        "wan0",
        Some("198.51.100.254/24"),
    );
    veth(
        &router,
        "lan0",
        Some("192.0.2.1/24"),
        &site_ns,
        "lan0",
        Some("192.0.2.2/24"),
    );
    gw_ns.ip(&["addr", "add", "172.16.0.50/32", "dev", "lo"]);
    site_ns.ip(&["addr", "add", "10.64.1.1/32", "dev", "lo"]);
    site_ns.ip(&["route", "add", "198.51.100.0/24", "via", "192.0.2.1"]);
    router.sh("sysctl -qw net.ipv4.ip_forward=1");
    router.sh("nft add table ip nat && \
         nft 'add chain ip nat post { type nat hook postrouting priority srcnat; }' && \
         nft add rule ip nat post oifname wan0 meta l4proto udp masquerade to :40000-40999");
    let mut opts = swan_options(GW, GW, "172.16.0.0/24", "10.64.1.0/24");
    opts.remote = "%any".to_owned();
    opts.remote_id = Some("192.0.2.2".to_owned());
    let swan = StrongSwan::start(&gw_ns, &opts);
    let engine = Engine::start(
        &site_ns,
        "initiator 192.0.2.2 198.51.100.1 10.64.1.0/24 172.16.0.0/24",
    );
    let ike = engine.expect("ike_up");
    assert_eq!(
        ike[3], "behind_nat=true",
        "NAT-D showed that we are behind the NAT"
    );
    let child = engine.expect("child_up");
    let sa = swan_with_child(&swan, hex32(&child[1]), hex32(&child[2]));
    assert_eq!((sa.spi_i, sa.spi_r), (hex64(&ike[1]), hex64(&ike[2])));
    // strongSwan talks to the router's mapping of our port 4500.
    let (addr, port) = sa.remote.split_once(':').unwrap();
    assert_eq!(addr, "198.51.100.254");
    assert!(
        (40000..41000).contains(&port.parse::<u16>().unwrap()),
        "{}",
        sa.remote
    );
}

/// A hand-configured router (strongSwan, initiator, as an IPsec site's
/// parameters for such routers describe it) dials the real gateway
/// program: IKE_SA_INIT reaches its IKE socket on 500, IKE_AUTH and ESP
/// its NAT-T socket on 4500, and the technician pings and opens TCP to
/// the site's NAT address (served by the router itself).
#[test]
fn ike_strongswan_router_reaches_the_gateway_program() {
    if !prereqs()
        || !require(&[
            Prereq::Program("ping"),
            Prereq::Program("python3"),
            Prereq::Program("curl"),
        ])
    {
        return;
    }
    use vpnnat::messages::{IpsecParams, SiteId, gateway_identity, site_identity};
    const NAT: &str = "10.64.0.5";
    let mut w = gateway_support::World::new("swgp", "dev eth0");
    let mut router = Netns::new("swgr");
    veth(
        &w.gw,
        "site1",
        None,
        &router,
        "wan0",
        Some("198.51.100.11/24"),
    );
    w.gw.sh("ip link set site1 master inet");
    // The site's NAT address is the router's own: its page and echo answer.
    router.ip(&["addr", "add", &format!("{NAT}/32"), "dev", "lo"]);
    let mut cmd = router.command("python3");
    cmd.arg(vpnnat_test_support::repo_path("scripts/lan-pc.py"))
        .arg("site 1");
    router.spawn(&mut cmd, Some(&w.dir.path().join("pc.log")));

    let site = SiteId(1);
    let psk = vpnnat::tunnel::PrivateKey::from_bytes(vpnnat_test_support::rand_bytes()).to_base64();
    w.set_peers(&gateway_support::World::ipsec_desired(
        site,
        NAT,
        IpsecParams::for_site(
            site,
            psk.clone(),
            vec![format!("{NAT}/32").parse().unwrap()],
            vec!["172.16.0.0/24".parse().unwrap()],
        )
        .mirrored(),
    ));
    w.start_gateway();
    let gw = &w;
    wait_until("the gateway's route to the site", SETTLE, || {
        gw.gw.sh("ip -4 route show proto 118").contains(NAT)
    });

    let swan = StrongSwan::start(
        &router,
        &PeerOptions {
            initiator: true,
            local_id: Some(site_identity(site)),
            remote_id: Some(gateway_identity(site)),
            ike_proposals: Some("aes256gcm16-prfsha256-x25519".to_owned()),
            esp_proposals: Some("aes256gcm16-noesn".to_owned()),
            ..PeerOptions::new(
                "198.51.100.11",
                "198.51.100.1",
                &psk,
                &format!("{NAT}/32"),
                "172.16.0.0/24",
            )
        },
    );
    let sa = swan.wait_established(SETTLE);
    // IKE moved to the gateway's NAT-T port (RFC 7296 §2.23).
    assert_eq!(sa.remote, "198.51.100.1:4500", "{sa:?}");
    let child = sa.installed_child().expect("a CHILD_SA");
    assert_eq!(child.local_ts, vec![format!("{NAT}/32")], "{sa:?}");

    let ok = (0..40).any(|_| {
        w.tech
            .command("curl")
            .args(["-s", "--max-time", "2", &format!("http://{NAT}/")])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("at site 1"))
            || {
                std::thread::sleep(Duration::from_millis(250));
                false
            }
    });
    assert!(
        ok,
        "the technician never reached the site\n--- gateway\n{}\n--- charon\n{}",
        w.gateway_log(),
        swan.log()
    );
    assert!(
        vpnnat_test_support::echo::ping_within(&w.tech, NAT, Duration::from_secs(5)),
        "ping through the gateway"
    );
    vpnnat_test_support::echo::tcp_echo_transfer(&w.tech, NAT, 200_000);
    let sa = swan.sas().into_iter().next().unwrap();
    let child = sa.installed_child().unwrap();
    assert!(
        child.packets_in > 50 && child.packets_out > 50,
        "ESP both ways: {child:?}"
    );
    let status = w.status();
    let peer = &status["peers"][0];
    assert!(peer["handshakes"].as_u64().unwrap() >= 1, "{peer}");
    assert!(
        peer["endpoint"].as_str() == Some("198.51.100.11:4500"),
        "{peer}"
    );
}
