//! In-memory initiator ↔ responder tests of the engine: every datagram
//! goes through a little network that can lose, duplicate, delay and
//! NAT it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use test_strategy::proptest;

use super::*;

const A_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const NAT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const NAT_PORT_OFFSET: u16 = 10000;
const PSK: &[u8] = b"0123456789abcdef0123456789abcdef";

fn site_ts() -> Vec<TrafficSelector> {
    vec![TrafficSelector::ipv4_prefix(
        Ipv4Addr::new(100, 64, 7, 0),
        24,
    )]
}

fn tech_ts() -> Vec<TrafficSelector> {
    vec![TrafficSelector::ipv4_prefix(
        Ipv4Addr::new(10, 200, 0, 0),
        16,
    )]
}

fn config_a() -> Config {
    Config::new(
        PSK,
        Id::fqdn("site-7.vpnnat"),
        Id::fqdn("gw.vpnnat"),
        site_ts(),
        tech_ts(),
    )
    .expect("PSK long enough")
}

fn config_b() -> Config {
    Config::new(
        PSK,
        Id::fqdn("gw.vpnnat"),
        Id::fqdn("site-7.vpnnat"),
        tech_ts(),
        site_ts(),
    )
    .expect("PSK long enough")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    AtoB,
    BtoA,
}

struct Net {
    a: IkeSa,
    b: IkeSa,
    now: Instant,
    rng: StdRng,
    /// The initiator sits behind a NAPT that maps its port p to p + 10000 on NAT_IP.
    nat: bool,
    /// Every datagram that crossed, with its direction.
    log: Vec<(Dir, Transmit)>,
}

const SPI_R: u64 = 0x0000_0000_0000_1234;

impl Net {
    fn new(a: Config, b: Config) -> Self {
        Self::with_nat(a, b, false)
    }

    fn with_nat(a: Config, b: Config, nat: bool) -> Self {
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(7);
        let b_addr = SocketAddr::new(IpAddr::V4(B_IP), IKE_PORT);
        let a = IkeSa::initiator(a, IpAddr::V4(A_IP), b_addr, now, &mut rng);
        let a_seen = if nat { NAT_IP } else { A_IP };
        let b = IkeSa::responder(
            b,
            SPI_R,
            IpAddr::V4(B_IP),
            SocketAddr::new(IpAddr::V4(a_seen), IKE_PORT),
            now,
        );
        Self {
            a,
            b,
            now,
            rng,
            nat,
            log: Vec::new(),
        }
    }

    /// Takes one pending datagram (A's first).
    fn take(&mut self) -> Option<(Dir, Transmit)> {
        if let Some(t) = self.a.poll_transmit() {
            return Some((Dir::AtoB, t));
        }
        self.b.poll_transmit().map(|t| (Dir::BtoA, t))
    }

    fn deliver(&mut self, dir: Dir, t: &Transmit) -> Result<(), DropReason> {
        self.log.push((dir, t.clone()));
        match dir {
            Dir::AtoB => {
                let from = if self.nat {
                    SocketAddr::new(IpAddr::V4(NAT_IP), t.local_port + NAT_PORT_OFFSET)
                } else {
                    SocketAddr::new(IpAddr::V4(A_IP), t.local_port)
                };
                self.b
                    .handle_input(t.remote.port(), from, &t.payload, self.now, &mut self.rng)
            }
            Dir::BtoA => {
                let port = if self.nat {
                    t.remote.port() - NAT_PORT_OFFSET
                } else {
                    t.remote.port()
                };
                let from = SocketAddr::new(IpAddr::V4(B_IP), t.local_port);
                self.a
                    .handle_input(port, from, &t.payload, self.now, &mut self.rng)
            }
        }
    }

    /// Delivers everything until quiet; `filter` may drop (false) a datagram.
    fn run_with(&mut self, mut filter: impl FnMut(Dir, &Transmit) -> bool) {
        for _ in 0..100 {
            let Some((dir, t)) = self.take() else { return };
            if filter(dir, &t) {
                let _ = self.deliver(dir, &t);
            }
        }
        panic!("no quiescence");
    }

    fn run(&mut self) {
        self.run_with(|_, _| true);
    }

    /// Advances time to the next timer of either side and runs it.
    fn tick(&mut self) {
        let next = [self.a.poll_timeout(), self.b.poll_timeout()]
            .into_iter()
            .flatten()
            .min();
        let Some(t) = next else { panic!("no timer") };
        self.now = self.now.max(t);
        self.a.handle_timeout(self.now, &mut self.rng);
        self.b.handle_timeout(self.now, &mut self.rng);
    }

    fn events(sa: &mut IkeSa) -> Vec<Event> {
        std::iter::from_fn(|| sa.poll_event()).collect()
    }
}

/// A CHILD_SA with the keys its event handed out, as the tests compare them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Up {
    spi_in: u32,
    spi_out: u32,
    key_in: AeadKey,
    key_out: AeadKey,
    ts_local: Vec<TrafficSelector>,
    ts_remote: Vec<TrafficSelector>,
}

impl Up {
    fn new(sa: &ChildSa, keys: &ChildKeys) -> Self {
        Self {
            spi_in: sa.spi_in,
            spi_out: sa.spi_out,
            key_in: keys.key_in,
            key_out: keys.key_out,
            ts_local: sa.ts_local.clone(),
            ts_remote: sa.ts_remote.clone(),
        }
    }

    fn sa(&self) -> ChildSa {
        ChildSa {
            spi_in: self.spi_in,
            spi_out: self.spi_out,
            ts_local: self.ts_local.clone(),
            ts_remote: self.ts_remote.clone(),
        }
    }
}

fn child_up(events: &[Event]) -> Up {
    events
        .iter()
        .find_map(|e| match e {
            Event::ChildSaUp { sa, keys } => Some(Up::new(sa, keys)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no ChildSaUp in {events:?}"))
}

fn assert_pair(a: &Up, b: &Up) {
    assert_eq!(a.spi_in, b.spi_out);
    assert_eq!(a.spi_out, b.spi_in);
    assert_eq!(a.key_in, b.key_out);
    assert_eq!(a.key_out, b.key_in);
    assert_ne!(a.key_in, a.key_out);
    assert_eq!(a.ts_local, b.ts_remote);
    assert_eq!(a.ts_remote, b.ts_local);
}

fn established(net: &mut Net) -> (Up, Up) {
    net.run();
    assert!(net.a.is_established() && net.b.is_established());
    let (ea, eb) = (Net::events(&mut net.a), Net::events(&mut net.b));
    assert!(
        ea.contains(&Event::IkeSaUp {
            spi_i: net.a.spis().0,
            spi_r: SPI_R
        }),
        "{ea:?}"
    );
    assert!(
        eb.contains(&Event::IkeSaUp {
            spi_i: net.a.spis().0,
            spi_r: SPI_R
        }),
        "{eb:?}"
    );
    let (ca, cb) = (child_up(&ea), child_up(&eb));
    assert_pair(&ca, &cb);
    (ca, cb)
}

#[test]
fn handshake_x25519() {
    let mut net = Net::new(config_a(), config_b());
    let (ca, _) = established(&mut net);
    assert_eq!(net.a.spis(), net.b.spis());
    assert_eq!(ca.ts_local, site_ts());
    assert_eq!(ca.ts_remote, tech_ts());
    // Four messages: IKE_SA_INIT and IKE_AUTH, all on port 500 without a NAT.
    assert_eq!(net.log.len(), 4);
    assert!(
        net.log
            .iter()
            .all(|(_, t)| t.local_port == IKE_PORT && t.remote.port() == IKE_PORT)
    );
    assert!(!net.a.nat_detected() && !net.b.nat_detected());
    let init = wire::parse(&net.log[0].1.payload).unwrap();
    assert!(init.chain.payloads.contains(&Payload::Ke {
        group: 31,
        data: match &init.chain.payloads[1] {
            Payload::Ke { data, .. } => data.clone(),
            _ => panic!(),
        }
    }));
}

#[test]
fn handshake_modp2048() {
    let (mut a, mut b) = (config_a(), config_b());
    a.groups = vec![DhGroup::Modp2048];
    b.groups = vec![DhGroup::Modp2048];
    let mut net = Net::new(a, b);
    established(&mut net);
}

#[test]
fn invalid_ke_payload_in_ike_sa_init_and_in_a_pfs_rekey() {
    let mut b = config_b();
    b.groups = vec![DhGroup::Modp2048];
    let mut net = Net::new(config_a(), b);
    let (ca, _) = established(&mut net);
    // INIT(31) → INVALID_KE(14) → INIT(14) → response → AUTH → response.
    assert_eq!(net.log.len(), 6);
    let refusal = wire::parse(&net.log[1].1.payload).unwrap();
    assert_eq!(
        refusal.chain.payloads,
        vec![Payload::notify(
            notify::INVALID_KE_PAYLOAD,
            &14u16.to_be_bytes()
        )]
    );
    // A PFS rekey from A starts with group 31 again and is sent to 14.
    net.a.rekey_child(net.now, &mut net.rng);
    net.run();
    let ea = Net::events(&mut net.a);
    let new = ea.iter().find_map(|e| match e {
        Event::ChildSaRekeyed {
            old_spi_in,
            new,
            keys,
        } => Some((*old_spi_in, Up::new(new, keys))),
        _ => None,
    });
    let (old, new) = new.unwrap_or_else(|| panic!("{ea:?}"));
    assert_eq!(old, ca.spi_in);
    assert_eq!(net.b.child().unwrap().spi_in, new.spi_out);
}

#[test]
fn no_common_proposal_is_refused() {
    let mut b = config_b();
    b.groups = vec![];
    let mut net = Net::new(config_a(), b);
    net.run();
    // The refusal is unprotected (RFC 7296 §2.21.1): A keeps retrying until
    // its retransmissions run out, then reports it.
    assert!(!net.a.is_closed());
    assert!(Net::events(&mut net.a).is_empty());
    while !net.a.is_closed() {
        net.tick();
        net.run();
    }
    assert_eq!(net.a.stats().retransmissions, 4);
    assert_eq!(
        Net::events(&mut net.a),
        vec![Event::IkeSaDown(DownReason::Refused(
            notify::NO_PROPOSAL_CHOSEN
        ))]
    );
    assert!(!net.b.is_established());
}

#[test]
fn forged_init_error_does_not_stop_the_handshake() {
    let mut net = Net::new(config_a(), config_b());
    let (d, init) = net.take().unwrap();
    assert_eq!(d, Dir::AtoB);
    // An on-path attacker answers first with NO_PROPOSAL_CHOSEN.
    let h = Header {
        spi_i: net.a.spis().0,
        spi_r: 0,
        next_payload: 0,
        exchange: exchange::IKE_SA_INIT,
        flags: flags::RESPONSE,
        message_id: 0,
        length: 0,
    };
    let forged = wire::encode(h, &[Payload::notify(notify::NO_PROPOSAL_CHOSEN, &[])]);
    let from = SocketAddr::new(IpAddr::V4(B_IP), IKE_PORT);
    let r = net
        .a
        .handle_input(IKE_PORT, from, &forged, net.now, &mut net.rng);
    assert_eq!(r, Err(DropReason::Unexpected));
    assert!(!net.a.is_closed());
    // The real answer still comes through.
    net.deliver(d, &init).unwrap();
    established(&mut net);
}

#[test]
fn responder_picks_from_many_proposals_transform_by_transform() {
    // strongSwan's default IKE proposal set, in the shape it sends: one
    // proposal of many AEAD and one of classic algorithms.
    let props = vec![
        Proposal {
            num: 1,
            protocol: protocol::IKE,
            spi: vec![],
            transforms: vec![
                Transform::new(transform::ENCR, 12, Some(128)),
                Transform::new(transform::ENCR, 12, Some(256)),
                Transform::new(transform::INTEG, 12, None),
                Transform::new(transform::PRF, 2, None),
                Transform::new(transform::DH, 19, None),
            ],
        },
        Proposal {
            num: 2,
            protocol: protocol::IKE,
            spi: vec![],
            transforms: vec![
                Transform::new(transform::ENCR, transform::ENCR_AES_GCM_16, Some(128)),
                Transform::new(transform::ENCR, transform::ENCR_AES_GCM_16, Some(256)),
                Transform::new(transform::PRF, 7, None),
                Transform::new(transform::PRF, transform::PRF_HMAC_SHA2_256, None),
                Transform::new(transform::DH, 19, None),
                Transform::new(transform::DH, 31, None),
                Transform::new(transform::DH, 14, None),
            ],
        },
    ];
    let ours = [DhGroup::Curve25519, DhGroup::Modp2048];
    assert!(matches!(
        choose(&props, protocol::IKE, &ours, Some(19)),
        Choice::WrongKe(DhGroup::Curve25519)
    ));
    assert!(matches!(
        choose(&props, protocol::IKE, &ours, Some(14)),
        Choice::Chosen(2, _, Some(DhGroup::Modp2048))
    ));
    assert!(matches!(
        choose(&props[..1], protocol::IKE, &ours, Some(19)),
        Choice::None
    ));
    // ESP in IKE_AUTH (no KE): an ESN-only proposal is refused, one that allows "no ESN" is taken.
    let esp = |esn: u16| Proposal {
        num: 3,
        protocol: protocol::ESP,
        spi: vec![1, 2, 3, 4],
        transforms: vec![
            Transform::new(transform::ENCR, transform::ENCR_AES_GCM_16, Some(256)),
            Transform::new(transform::ESN, esn, None),
        ],
    };
    assert!(matches!(
        choose(&[esp(1)], protocol::ESP, &ours, None),
        Choice::None
    ));
    assert!(matches!(
        choose(&[esp(0)], protocol::ESP, &ours, None),
        Choice::Chosen(3, _, None)
    ));
}

#[test]
fn cookie_under_load() {
    let mut net = Net::new(config_a(), config_b());
    let jar = CookieJar::new(&mut net.rng);
    let (_, first) = net.take().unwrap();
    let from = SocketAddr::new(IpAddr::V4(A_IP), IKE_PORT);
    // Not under load: no cookie needed.
    assert_eq!(jar.check(&first.payload, from, false), Ok(()));
    let Err(Some(reply)) = jar.check(&first.payload, from, true) else {
        panic!("no cookie")
    };
    // The initiator retries with the cookie first.
    net.a
        .handle_input(
            IKE_PORT,
            SocketAddr::new(IpAddr::V4(B_IP), IKE_PORT),
            &reply,
            net.now,
            &mut net.rng,
        )
        .unwrap();
    let (_, second) = net.take().unwrap();
    let m = wire::parse(&second.payload).unwrap();
    assert!(matches!(
        &m.chain.payloads[0],
        Payload::Notify {
            kind: notify::COOKIE,
            ..
        }
    ));
    assert_eq!(jar.check(&second.payload, from, true), Ok(()));
    // From another address the same cookie is no good.
    let other = SocketAddr::new(IpAddr::V4(NAT_IP), IKE_PORT);
    assert!(jar.check(&second.payload, other, true).is_err());
    net.deliver(Dir::AtoB, &second).unwrap();
    established(&mut net);
}

#[test]
fn cookie_secret_rotates_keeping_the_previous_one() {
    let mut net = Net::new(config_a(), config_b());
    let mut jar = CookieJar::new(&mut net.rng);
    let (_, first) = net.take().unwrap();
    let from = SocketAddr::new(IpAddr::V4(A_IP), IKE_PORT);
    let Err(Some(reply)) = jar.check(&first.payload, from, true) else {
        panic!("no cookie")
    };
    let b_addr = SocketAddr::new(IpAddr::V4(B_IP), IKE_PORT);
    net.a
        .handle_input(IKE_PORT, b_addr, &reply, net.now, &mut net.rng)
        .unwrap();
    let (_, with_cookie) = net.take().unwrap();
    // A forged cookie (right version, wrong hash) or a non-first one fails.
    let m = wire::parse(&with_cookie.payload).unwrap();
    let Payload::Notify { data: cookie, .. } = &m.chain.payloads[0] else {
        panic!("cookie first")
    };
    let mut forged_payloads = m.chain.payloads.clone();
    let mut bad = cookie.clone();
    *bad.last_mut().unwrap() ^= 1;
    forged_payloads[0] = Payload::notify(notify::COOKIE, &bad);
    let forged = wire::encode(m.header, &forged_payloads);
    assert!(jar.check(&forged, from, true).is_err());
    let mut moved = m.chain.payloads.clone();
    moved.rotate_left(1);
    let not_first = wire::encode(m.header, &moved);
    assert!(jar.check(&not_first, from, true).is_err());
    // One rotation: still good; two: refused, with a fresh cookie.
    jar.rotate(&mut net.rng);
    assert_eq!(jar.check(&with_cookie.payload, from, true), Ok(()));
    jar.rotate(&mut net.rng);
    let Err(Some(fresh)) = jar.check(&with_cookie.payload, from, true) else {
        panic!("an expired cookie must get a new one")
    };
    assert_ne!(fresh, reply);
}

#[test]
fn lost_messages_are_retransmitted_and_answered_from_the_cache() {
    let mut net = Net::new(config_a(), config_b());
    // Lose the first IKE_SA_INIT and the first IKE_AUTH response.
    let mut n = 0;
    net.run_with(|_, _| {
        n += 1;
        n != 1
    });
    assert!(net.a.poll_timeout().is_some());
    net.tick();
    assert_eq!(net.a.stats().retransmissions, 1);
    let mut auth_responses = 0;
    net.run_with(|dir, t| {
        let m = wire::parse(&t.payload).unwrap();
        if dir == Dir::BtoA && m.header.exchange == exchange::IKE_AUTH {
            auth_responses += 1;
            return auth_responses > 1;
        }
        true
    });
    assert!(net.b.is_established() && !net.a.is_established());
    net.tick();
    net.run();
    assert_eq!(net.a.stats().retransmissions, 2);
    assert_eq!(net.b.stats().cached_responses, 1);
    let (ea, eb) = (Net::events(&mut net.a), Net::events(&mut net.b));
    assert_pair(&child_up(&ea), &child_up(&eb));
    // The responder set up its CHILD_SA once only.
    assert_eq!(
        eb.iter()
            .filter(|e| matches!(e, Event::ChildSaUp { .. }))
            .count(),
        1
    );
}

#[test]
fn duplicated_datagrams_are_harmless() {
    let mut net = Net::new(config_a(), config_b());
    let mut dropped = Vec::new();
    for _ in 0..20 {
        let Some((dir, t)) = net.take() else { break };
        for _ in 0..2 {
            if let Err(e) = net.deliver(dir, &t) {
                dropped.push(e);
            }
        }
    }
    assert!(net.a.is_established() && net.b.is_established());
    // Duplicated requests are answered from the cache (the answers then
    // arrive twice); duplicated responses are dropped by message ID.
    assert_eq!(net.b.stats().cached_responses, 2);
    assert!(
        dropped.iter().all(|d| *d == DropReason::MessageId),
        "{dropped:?}"
    );
    assert!(net.a.stats().drops.get(DropReason::MessageId) >= 2);
    let (ea, eb) = (Net::events(&mut net.a), Net::events(&mut net.b));
    assert_pair(&child_up(&ea), &child_up(&eb));
}

#[test]
fn a_delayed_old_response_is_ignored() {
    let mut net = Net::new(config_a(), config_b());
    established(&mut net);
    let old_auth_response = net
        .log
        .iter()
        .rev()
        .find(|(d, _)| *d == Dir::BtoA)
        .unwrap()
        .1
        .clone();
    // A liveness check is outstanding; the stale IKE_AUTH response arrives.
    net.now += net.a.config.dpd_interval;
    net.a.handle_timeout(net.now, &mut net.rng);
    assert_eq!(
        net.deliver(Dir::BtoA, &old_auth_response),
        Err(DropReason::MessageId)
    );
    net.run();
    assert!(net.a.outstanding.is_none());
    assert!(Net::events(&mut net.a).is_empty());
}

#[test]
fn nat_traversal_floats_to_4500_and_keeps_alive() {
    let mut net = Net::with_nat(config_a(), config_b(), true);
    let (ca, cb) = established(&mut net);
    assert!(net.a.nat_detected() && net.b.nat_detected());
    assert!(net.a.behind_nat() && !net.b.behind_nat());
    assert_eq!(
        net.b.remote(),
        SocketAddr::new(IpAddr::V4(NAT_IP), NAT_T_PORT + NAT_PORT_OFFSET)
    );
    // IKE_SA_INIT on 500, IKE_AUTH on 4500 with the non-ESP marker.
    for (i, (_, t)) in net.log.iter().enumerate() {
        let port = if i < 2 { IKE_PORT } else { NAT_T_PORT };
        assert_eq!(t.local_port, port, "message {i}");
        assert_eq!(
            t.payload.starts_with(&NON_ESP_MARKER),
            i >= 2,
            "message {i}"
        );
    }
    // ESP on 4500 (no marker) is not for the IKE engine.
    let esp = [ca.spi_out.to_be_bytes(), [0, 0, 0, 1]].concat();
    assert_eq!(
        net.b
            .handle_input(NAT_T_PORT, net.b.remote(), &esp, net.now, &mut net.rng),
        Err(DropReason::NotIke)
    );
    // Too short for an SPI, or a marker with nothing behind it (RFC 3948 §2).
    for junk in [&[1, 2, 3][..], &NON_ESP_MARKER[..]] {
        assert_eq!(
            net.b
                .handle_input(NAT_T_PORT, net.b.remote(), junk, net.now, &mut net.rng),
            Err(DropReason::Malformed)
        );
    }
    // Only the side behind the NAT sends keepalives, to 4500.
    net.now += net.a.config.keepalive_interval;
    net.a.handle_timeout(net.now, &mut net.rng);
    net.b.handle_timeout(net.now, &mut net.rng);
    let t = net.a.poll_transmit().unwrap();
    assert_eq!(
        (t.local_port, t.remote.port(), t.payload.as_slice()),
        (NAT_T_PORT, NAT_T_PORT, &[0xff][..])
    );
    assert!(net.b.poll_transmit().is_none());
    assert_eq!(
        net.b.handle_input(
            NAT_T_PORT,
            net.b.remote(),
            &t.payload,
            net.now,
            &mut net.rng
        ),
        Ok(())
    );
    assert_eq!(net.a.stats().keepalives, 1);
    let _ = cb;
}

#[test]
fn traffic_selectors_are_narrowed() {
    // The site offers all of 100.64.0.0/16; the gateway's policy allows its
    // /24 only; the technician side asks for 0.0.0.0/0 and gets 10.200/16.
    let mut a = config_a();
    a.local_ts = vec![TrafficSelector::ipv4_prefix(
        Ipv4Addr::new(100, 64, 0, 0),
        16,
    )];
    a.remote_ts = vec![TrafficSelector::ipv4_prefix(Ipv4Addr::UNSPECIFIED, 0)];
    let mut net = Net::new(a, config_b());
    let (ca, cb) = established(&mut net);
    assert_eq!(ca.ts_local, site_ts());
    assert_eq!(ca.ts_remote, tech_ts());
    assert_eq!(cb.ts_remote, site_ts());
}

#[test]
fn disjoint_traffic_selectors_are_unacceptable() {
    let mut a = config_a();
    a.local_ts = vec![TrafficSelector::ipv4_prefix(
        Ipv4Addr::new(100, 65, 0, 0),
        16,
    )];
    let mut net = Net::new(a, config_b());
    net.run();
    assert!(net.a.is_established() && net.b.is_established());
    let failed = Event::ChildSaFailed {
        notify: notify::TS_UNACCEPTABLE,
    };
    assert!(Net::events(&mut net.a).contains(&failed));
    assert!(Net::events(&mut net.b).contains(&failed));
    assert!(net.a.child().is_none() && net.b.child().is_none());
}

#[test]
fn wrong_psk_fails_authentication() {
    let mut b = config_b();
    b.set_psk(b"another key, also 32 bytes long!")
        .expect("PSK long enough");
    let mut net = Net::new(config_a(), b);
    net.run();
    assert_eq!(
        Net::events(&mut net.b),
        vec![Event::IkeSaDown(DownReason::AuthenticationFailed)]
    );
    assert_eq!(
        Net::events(&mut net.a),
        vec![Event::IkeSaDown(DownReason::AuthenticationFailed)]
    );
}

#[test]
fn wrong_identity_fails_authentication() {
    let mut b = config_b();
    b.remote_id = Some(Id::key_id(b"someone else"));
    let mut net = Net::new(config_a(), b);
    net.run();
    assert!(net.a.is_closed() && net.b.is_closed());
    for sa in [&mut net.a, &mut net.b] {
        assert_eq!(
            Net::events(sa),
            vec![Event::IkeSaDown(DownReason::AuthenticationFailed)]
        );
    }
}

#[test]
fn identities_of_each_type() {
    for (ia, ib) in [
        (Id::key_id(b"\x01\x02site"), Id::ipv4(B_IP)),
        (Id::ipv4(A_IP), Id::fqdn("gw.vpnnat")),
    ] {
        let (mut a, mut b) = (config_a(), config_b());
        a.local_id = ia.clone();
        a.remote_id = Some(ib.clone());
        b.local_id = ib;
        b.remote_id = Some(ia);
        established(&mut Net::new(a, b));
    }
}

fn rekeyed(events: &[Event]) -> Vec<(u32, Up)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::ChildSaRekeyed {
                old_spi_in,
                new,
                keys,
            } => Some((*old_spi_in, Up::new(new, keys))),
            _ => None,
        })
        .collect()
}

fn check_child_rekey(initiator_is_a: bool, pfs: bool) {
    let (mut a, mut b) = (config_a(), config_b());
    a.pfs = pfs;
    b.pfs = pfs;
    let mut net = Net::new(a, b);
    let (ca, cb) = established(&mut net);
    if initiator_is_a {
        net.a.rekey_child(net.now, &mut net.rng);
    } else {
        net.b.rekey_child(net.now, &mut net.rng);
    }
    let before = net.log.len();
    net.run();
    let req = wire::parse(&net.log[before].1.payload[if net.a.nat_detected() { 4 } else { 0 }..])
        .unwrap();
    assert_eq!(req.header.exchange, exchange::CREATE_CHILD_SA);
    let (ea, eb) = (Net::events(&mut net.a), Net::events(&mut net.b));
    let (ra, rb) = (rekeyed(&ea), rekeyed(&eb));
    assert_eq!(ra.len(), 1, "{ea:?}");
    assert_eq!(rb.len(), 1, "{eb:?}");
    assert_eq!(ra[0].0, ca.spi_in);
    assert_eq!(rb[0].0, cb.spi_in);
    assert_pair(&ra[0].1, &rb[0].1);
    assert_ne!(ra[0].1.key_in, ca.key_in);
    // The rekey initiator deleted the old pair, on both sides.
    let del_a = Event::ChildSaDeleted {
        spi_in: ca.spi_in,
        spi_out: ca.spi_out,
    };
    let del_b = Event::ChildSaDeleted {
        spi_in: cb.spi_in,
        spi_out: cb.spi_out,
    };
    assert!(ea.contains(&del_a), "{ea:?}");
    assert!(eb.contains(&del_b), "{eb:?}");
    assert_eq!(net.a.child(), Some(&ra[0].1.sa()));
    assert!(net.a.old_children.is_empty() && net.b.old_children.is_empty());
    // With PFS the request carried a KE payload: check via the key schedule,
    // which differs from the no-PFS KEYMAT of the same nonces.
    let keys = net.a.keys.clone().unwrap();
    let (ni, nr) = if initiator_is_a {
        (
            nonce_of(&net, before, Dir::AtoB),
            nonce_of(&net, before + 1, Dir::BtoA),
        )
    } else {
        (
            nonce_of(&net, before, Dir::BtoA),
            nonce_of(&net, before + 1, Dir::AtoB),
        )
    };
    let (i2r, _) = crypto::child_keys(&keys.sk_d, None, &ni, &nr);
    let initiators_out = if initiator_is_a {
        &ra[0].1.key_out
    } else {
        &rb[0].1.key_out
    };
    assert_eq!(&i2r == initiators_out, !pfs);
}

/// The nonce of logged message `i` (decrypted with the SA's keys).
fn nonce_of(net: &Net, i: usize, dir: Dir) -> Vec<u8> {
    let (d, t) = &net.log[i];
    assert_eq!(*d, dir);
    let keys = net.a.keys.clone().unwrap();
    let key = if dir == Dir::AtoB {
        keys.sk_ei
    } else {
        keys.sk_er
    };
    let msg = t
        .payload
        .strip_prefix(&NON_ESP_MARKER[..])
        .unwrap_or(&t.payload);
    let m = wire::parse(msg).unwrap();
    let (first, body) = m.chain.encrypted.unwrap();
    let pt = crypto::open_encrypted(msg, body, &key).unwrap();
    wire::parse_chain(&pt, 0, first)
        .unwrap()
        .payloads
        .into_iter()
        .find_map(|p| match p {
            Payload::Nonce(n) => Some(n),
            _ => None,
        })
        .unwrap()
}

#[test]
fn child_rekey_by_initiator_with_pfs() {
    check_child_rekey(true, true);
}

#[test]
fn child_rekey_by_initiator_without_pfs() {
    check_child_rekey(true, false);
}

#[test]
fn child_rekey_by_responder_with_pfs() {
    check_child_rekey(false, true);
}

#[test]
fn child_rekey_by_responder_without_pfs() {
    check_child_rekey(false, false);
}

#[test]
fn simultaneous_child_rekey_keeps_one_pair() {
    let mut net = Net::new(config_a(), config_b());
    let (ca, cb) = established(&mut net);
    net.a.rekey_child(net.now, &mut net.rng);
    net.b.rekey_child(net.now, &mut net.rng);
    // Both requests cross before either response.
    let (d1, r1) = net.take().unwrap();
    let (d2, r2) = net.take().unwrap();
    assert_eq!((d1, d2), (Dir::AtoB, Dir::BtoA));
    net.deliver(d1, &r1).unwrap();
    net.deliver(d2, &r2).unwrap();
    net.run();
    let (ea, eb) = (Net::events(&mut net.a), Net::events(&mut net.b));
    let (ra, rb) = (rekeyed(&ea), rekeyed(&eb));
    let (a_now, b_now) = (ra.last().unwrap().1.clone(), rb.last().unwrap().1.clone());
    // The last SA whose keys were handed out is the current one: a caller
    // that builds its outbound SA from each announcement never goes back to
    // an SA (and a sequence) it already used.
    assert_eq!(net.a.child(), Some(&a_now.sa()), "{ea:?}");
    assert_eq!(net.b.child(), Some(&b_now.sa()), "{eb:?}");
    assert_pair(&a_now, &b_now);
    assert!(a_now.spi_in != ca.spi_in && b_now.spi_in != cb.spi_in);
    // Everything else was deleted: the old pair and the redundant one. Each
    // side announced an SA once and deleted exactly those announced but
    // not current.
    assert!(net.a.old_children.is_empty(), "{ea:?}");
    assert!(net.b.old_children.is_empty(), "{eb:?}");
    for (first, events, rekeys, now) in [(&ca, &ea, &ra, &a_now), (&cb, &eb, &rb, &b_now)] {
        let mut announced: Vec<u32> = std::iter::once(first.spi_in)
            .chain(rekeys.iter().map(|r| r.1.spi_in))
            .filter(|s| *s != now.spi_in)
            .collect();
        let mut deleted: Vec<u32> = events
            .iter()
            .filter_map(|e| match e {
                Event::ChildSaDeleted { spi_in, .. } => Some(*spi_in),
                _ => None,
            })
            .collect();
        announced.sort_unstable();
        deleted.sort_unstable();
        assert_eq!(announced, deleted, "{events:?}");
    }
}

fn check_ike_rekey(initiator_is_a: bool) {
    let mut net = Net::new(config_a(), config_b());
    let (ca, _) = established(&mut net);
    let old = net.a.spis();
    if initiator_is_a {
        net.a.rekey_ike(net.now, &mut net.rng);
    } else {
        net.b.rekey_ike(net.now, &mut net.rng);
    }
    net.run();
    let (ea, eb) = (Net::events(&mut net.a), Net::events(&mut net.b));
    let new = net.a.spis();
    assert_ne!(new.0, old.0);
    assert_ne!(new.1, old.1);
    assert_eq!(net.b.spis(), new);
    // The responder's SPI keeps its low 24 bits (the caller's routing index).
    let gateway_spi = if initiator_is_a { new.1 } else { new.0 };
    assert_eq!(gateway_spi & 0xff_ffff, SPI_R & 0xff_ffff);
    assert!(
        ea.contains(&Event::IkeSaRekeyed {
            spi_i: new.0,
            spi_r: new.1
        }),
        "{ea:?}"
    );
    assert!(
        eb.contains(&Event::IkeSaRekeyed {
            spi_i: new.0,
            spi_r: new.1
        }),
        "{eb:?}"
    );
    assert!(
        !ea.iter()
            .chain(&eb)
            .any(|e| matches!(e, Event::IkeSaDown(_)))
    );
    assert_eq!(net.a.original_initiator, initiator_is_a);
    assert_eq!(net.a.child(), Some(&ca.sa()));
    // The new SA works: a CHILD_SA rekey and a liveness check run on it.
    net.b.rekey_child(net.now, &mut net.rng);
    net.run();
    assert_eq!(rekeyed(&Net::events(&mut net.a)).len(), 1);
    net.now += net.a.config.dpd_interval;
    net.a.handle_timeout(net.now, &mut net.rng);
    net.run();
    assert!(net.a.is_established() && net.b.is_established());
    assert_eq!(net.a.stats().drops.total(), 0, "{:?}", net.a.stats());
    assert_eq!(net.b.stats().drops.total(), 0, "{:?}", net.b.stats());
}

#[test]
fn ike_rekey_by_initiator() {
    check_ike_rekey(true);
}

#[test]
fn ike_rekey_by_responder() {
    check_ike_rekey(false);
}

#[test]
fn dpd_answered_and_dead_peer_detected() {
    let mut net = Net::new(config_a(), config_b());
    established(&mut net);
    // A live peer answers the liveness check.
    net.now += net.a.config.dpd_interval;
    net.a.handle_timeout(net.now, &mut net.rng);
    net.b.handle_timeout(net.now, &mut net.rng);
    net.run();
    assert!(net.a.is_established());
    // Then B dies: A's check goes unanswered through every retransmission.
    net.now += net.a.config.dpd_interval;
    let mut tries = 0;
    while !net.a.is_closed() {
        let t = net.a.poll_timeout().unwrap();
        net.now = net.now.max(t);
        net.a.handle_timeout(net.now, &mut net.rng);
        while net.a.poll_transmit().is_some() {
            tries += 1;
        }
        assert!(tries < 100);
    }
    assert_eq!(tries, net.a.config.retransmit_tries);
    assert_eq!(
        Net::events(&mut net.a),
        vec![Event::IkeSaDown(DownReason::Timeout)]
    );
    assert_eq!(net.a.poll_timeout(), None);
}

#[test]
fn delete_child_then_ike_sa() {
    let mut net = Net::new(config_a(), config_b());
    let (ca, cb) = established(&mut net);
    net.b.delete_child(net.now, &mut net.rng);
    net.run();
    assert_eq!(
        Net::events(&mut net.a),
        vec![Event::ChildSaDeleted {
            spi_in: ca.spi_in,
            spi_out: ca.spi_out
        }]
    );
    assert_eq!(
        Net::events(&mut net.b),
        vec![Event::ChildSaDeleted {
            spi_in: cb.spi_in,
            spi_out: cb.spi_out
        }]
    );
    net.a.close(net.now, &mut net.rng);
    net.run();
    assert_eq!(
        Net::events(&mut net.a),
        vec![Event::IkeSaDown(DownReason::Closed)]
    );
    assert_eq!(
        Net::events(&mut net.b),
        vec![Event::IkeSaDown(DownReason::DeletedByPeer)]
    );
}

/// A request from B to A built by hand with B's keys.
fn b_request(net: &mut Net, exchange: u8, payloads: &[Payload]) -> Transmit {
    let id = net.b.next_request_id;
    net.b.next_request_id += 1;
    let bytes = net.b.seal(exchange, false, id, payloads).unwrap();
    Transmit {
        local_port: IKE_PORT,
        remote: net.b.remote,
        payload: bytes,
    }
}

#[test]
fn unknown_status_notifies_are_ignored_unknown_errors_fail_the_request() {
    let mut net = Net::new(config_a(), config_b());
    established(&mut net);
    let req = b_request(
        &mut net,
        exchange::INFORMATIONAL,
        &[Payload::notify(40000, b"x"), Payload::notify(16500, &[])],
    );
    net.deliver(Dir::BtoA, &req).unwrap();
    let resp = net.a.poll_transmit().unwrap();
    let m = wire::parse(&resp.payload).unwrap();
    assert!(m.header.is_response());
    assert!(net.a.is_established());
    // A answers an unknown error type in a response to its rekey as a failure of that request.
    net.a.rekey_child(net.now, &mut net.rng);
    let rekey = net.a.poll_transmit().unwrap();
    let id = wire::parse(&rekey.payload).unwrap().header.message_id;
    net.b.expected_request_id += 1;
    let bytes = net
        .b
        .seal(
            exchange::CREATE_CHILD_SA,
            true,
            id,
            &[Payload::notify(12345, &[])],
        )
        .unwrap();
    net.a
        .handle_input(IKE_PORT, net.a.remote, &bytes, net.now, &mut net.rng)
        .unwrap();
    assert_eq!(
        Net::events(&mut net.a),
        vec![Event::ChildSaFailed { notify: 12345 }]
    );
    assert!(net.a.is_established() && net.a.child().is_some());
}

#[test]
fn unsupported_critical_payload_is_refused() {
    let mut net = Net::new(config_a(), config_b());
    established(&mut net);
    // An INFORMATIONAL with an unknown critical payload (type 200) inside SK.
    let id = net.b.next_request_id;
    let h = net.b.header(exchange::INFORMATIONAL, false, id);
    let key = *net.b.out_key().unwrap();
    let mut msg = crypto::encode_encrypted(h, &[Payload::Nonce(vec![1; 16])], &key, [0xee; 8]);
    // Rebuild: decrypt, append the unknown payload, re-encrypt by hand.
    let m = wire::parse(&msg).unwrap();
    let (_, body) = m.chain.encrypted.unwrap();
    let mut pt = crypto::open_encrypted(&msg, body, &key).unwrap();
    pt[0] = 200;
    pt.extend_from_slice(&[0, 0x80, 0, 5, 0xaa]);
    pt.push(0);
    msg.truncate(wire::HEADER_LEN + 4 + 8);
    let total = (msg.len() + pt.len() + 16) as u32;
    msg[24..28].copy_from_slice(&total.to_be_bytes());
    let sk_len = (total as usize - wire::HEADER_LEN) as u16;
    msg[30..32].copy_from_slice(&sk_len.to_be_bytes());
    let (aad, _) = msg.split_at(wire::HEADER_LEN + 4);
    let icv = crypto::aead_seal(&key, [0xee; 8], aad, &mut pt);
    msg.extend_from_slice(&pt);
    msg.extend_from_slice(&icv);
    let t = Transmit {
        local_port: IKE_PORT,
        remote: net.b.remote,
        payload: msg,
    };
    assert_eq!(
        net.deliver(Dir::BtoA, &t),
        Err(DropReason::UnsupportedCritical)
    );
    let resp = net.a.poll_transmit().unwrap();
    let m = wire::parse(&resp.payload).unwrap();
    let (first, body) = m.chain.encrypted.unwrap();
    let pt =
        crypto::open_encrypted(&resp.payload, body, &net.a.keys.clone().unwrap().sk_ei).unwrap();
    assert_eq!(
        wire::parse_chain(&pt, 0, first).unwrap().payloads,
        vec![Payload::notify(
            notify::UNSUPPORTED_CRITICAL_PAYLOAD,
            &[200]
        )]
    );
}

#[test]
fn malformed_and_forged_messages_are_dropped_and_counted() {
    let mut net = Net::new(config_a(), config_b());
    established(&mut net);
    let from = net.a.remote;
    let last = net.log.last().unwrap().1.payload.clone();
    let mut forged = b_request(&mut net, exchange::INFORMATIONAL, &[]).payload;
    let n = forged.len();
    forged[n - 1] ^= 1;
    let mut wrong_spi = last.clone();
    wrong_spi[0] ^= 1;
    let now = net.now;
    for (bytes, reason) in [
        (&b"short"[..], DropReason::Malformed),
        (&forged[..], DropReason::Integrity),
        (&wrong_spi[..], DropReason::WrongSpi),
        (&last[..], DropReason::MessageId),
    ] {
        assert_eq!(
            net.a.handle_input(IKE_PORT, from, bytes, now, &mut net.rng),
            Err(reason)
        );
    }
    let d = net.a.stats().drops;
    assert_eq!(d.total(), 4);
    assert_eq!(d.get(DropReason::Integrity), 1);
    assert!(net.a.poll_transmit().is_none());
    assert!(net.a.is_established());
}

fn established_pair() -> Net {
    let mut net = Net::new(config_a(), config_b());
    net.run();
    net
}

#[proptest(cases = 200)]
fn arbitrary_bytes_never_panic(
    #[strategy(proptest::collection::vec(any::<u8>(), 0..600))] bytes: Vec<u8>,
    port_4500: bool,
) {
    let now = Instant::now();
    let mut rng = StdRng::seed_from_u64(3);
    let _ = wire::parse(&bytes);
    let port = if port_4500 { NAT_T_PORT } else { IKE_PORT };
    let from = SocketAddr::new(IpAddr::V4(A_IP), port);
    let mut r = IkeSa::responder(config_b(), SPI_R, IpAddr::V4(B_IP), from, now);
    let _ = r.handle_input(port, from, &bytes, now, &mut rng);
    let mut i = IkeSa::initiator(config_a(), IpAddr::V4(A_IP), from, now, &mut rng);
    let _ = i.handle_input(port, from, &bytes, now, &mut rng);
}

/// Random payload chains behind a valid header, so that the engine's
/// dispatch (not only the header check) sees them: at an Idle responder,
/// at an initiator waiting for IKE_SA_INIT, and at an established pair.
#[proptest(cases = 300)]
fn random_chains_behind_valid_headers_are_dropped_or_answered(
    #[strategy(34u8..=37)] exchange: u8,
    #[strategy(0u8..=2)] spis: u8,
    response: bool,
    #[strategy(0u32..3)] message_id: u32,
    #[strategy(33u8..=48)] next_payload: u8,
    #[strategy(proptest::collection::vec(any::<u8>(), 0..400))] body: Vec<u8>,
) {
    let mut net = established_pair();
    Net::events(&mut net.b);
    let (spi_i, spi_r) = net.a.spis();
    let h = Header {
        spi_i: if spis == 0 { 0x1234 } else { spi_i },
        spi_r: if spis == 2 { spi_r } else { 0 },
        next_payload: 0,
        exchange,
        flags: if response {
            flags::RESPONSE
        } else {
            flags::INITIATOR
        },
        message_id,
        length: 0,
    };
    let mut msg = wire::encode(h, &[]);
    msg[16] = next_payload;
    msg.extend_from_slice(&body);
    let len = u32::try_from(msg.len()).unwrap();
    msg[24..28].copy_from_slice(&len.to_be_bytes());
    let now = net.now;
    let from = SocketAddr::new(IpAddr::V4(A_IP), IKE_PORT);
    let mut idle = IkeSa::responder(config_b(), SPI_R, IpAddr::V4(B_IP), from, now);
    let mut init = IkeSa::initiator(config_a(), IpAddr::V4(A_IP), from, now, &mut net.rng);
    while init.poll_transmit().is_some() {}
    for sa in [&mut idle, &mut init, &mut net.b] {
        let before = sa.stats().drops.total();
        let r = sa.handle_input(IKE_PORT, from, &msg, now, &mut net.rng);
        // Every refusal is counted, exactly once.
        prop_assert_eq!(sa.stats().drops.total() - before, u64::from(r.is_err()));
    }
    // Random bytes never pass the established SA's integrity check.
    prop_assert!(net.b.is_established());
    prop_assert!(net.b.poll_event().is_none());
}

#[proptest(cases = 100)]
fn mutated_messages_never_panic(
    #[strategy(0usize..4)] which: usize,
    #[strategy(0usize..2000)] at: usize,
    flip: u8,
    cut: bool,
) {
    let net = established_pair();
    let (dir, t) = net.log[which].clone();
    let mut bytes = t.payload.clone();
    let at = at % bytes.len();
    bytes[at] ^= flip.max(1);
    if cut {
        bytes.truncate(at);
    }
    let fresh = &mut Net::new(config_a(), config_b());
    for (d, t) in net.log.iter().take(which) {
        let _ = fresh.deliver(*d, t);
        while fresh.take().is_some() {}
    }
    let t = Transmit {
        payload: bytes,
        ..t
    };
    let drops = |n: &Net| n.a.stats().drops.total() + n.b.stats().drops.total();
    let before = drops(fresh);
    let r = fresh.deliver(dir, &t);
    prop_assert_eq!(drops(fresh) - before, u64::from(r.is_err()));
    // The original arrives too (as a retransmission would bring it); with
    // the timers run, the pair ends established or with a side down, never
    // stuck half-way.
    let _ = fresh.deliver(dir, &net.log[which].1);
    for _ in 0..20 {
        fresh.run();
        let settled = (fresh.a.is_established() && fresh.b.is_established())
            || fresh.a.is_closed()
            || fresh.b.is_closed();
        if settled || (fresh.a.poll_timeout().is_none() && fresh.b.poll_timeout().is_none()) {
            break;
        }
        fresh.tick();
    }
    prop_assert!(
        (fresh.a.is_established() && fresh.b.is_established())
            || fresh.a.is_closed()
            || fresh.b.is_closed(),
        "stuck: {:?} {:?}",
        fresh.a,
        fresh.b
    );
}

#[test]
fn lost_delete_of_the_rekeyed_ike_sa_is_retransmitted() {
    let mut net = Net::new(config_a(), config_b());
    established(&mut net);
    net.a.rekey_ike(net.now, &mut net.rng);
    // CREATE_CHILD_SA request, its response, then A's Delete of the old SA: lost.
    let mut n = 0;
    net.run_with(|_, _| {
        n += 1;
        n != 3
    });
    assert!(net.a.old_ike.is_some());
    net.tick();
    net.run();
    assert_eq!(net.a.stats().retransmissions, 1);
    assert!(net.a.old_ike.is_none(), "the Delete was answered");
    // B answered the Delete (message 3, after IKE_AUTH 1 and the rekey 2) on the old SA.
    assert_eq!(
        net.b.old_ike.as_ref().map(|o| o.expected_request_id),
        Some(4)
    );
    assert!(net.a.is_established() && net.b.is_established());
}

#[test]
fn rekeys_use_the_ike_sa_group_and_follow_invalid_ke() {
    let mut b = config_b();
    b.groups = vec![DhGroup::Modp2048, DhGroup::Curve25519];
    let mut net = Net::new(config_a(), b);
    established(&mut net);
    // A offered x25519 first and B accepted it: rekeys start with x25519.
    assert_eq!(net.a.ike_group, Some(DhGroup::Curve25519));
    // Now B accepts MODP-2048 only: A's PFS rekey and IKE rekey with x25519
    // get INVALID_KE_PAYLOAD and are retried with group 14.
    net.b.config.groups = vec![DhGroup::Modp2048];
    net.a.rekey_child(net.now, &mut net.rng);
    net.run();
    assert_eq!(rekeyed(&Net::events(&mut net.a)).len(), 1);
    net.a.rekey_ike(net.now, &mut net.rng);
    net.run();
    let ea = Net::events(&mut net.a);
    assert!(
        ea.iter().any(|e| matches!(e, Event::IkeSaRekeyed { .. })),
        "{ea:?}"
    );
    assert_eq!(net.a.ike_group, Some(DhGroup::Modp2048));
    assert_eq!(net.b.ike_group, Some(DhGroup::Modp2048));
    assert!(net.a.is_established() && net.b.is_established());
}

#[test]
fn psk_shorter_than_16_bytes_is_refused() {
    let short = b"fifteen bytes!!";
    assert_eq!(short.len(), MIN_PSK_LEN - 1);
    let c = Config::new(short, Id::fqdn("a"), Id::fqdn("b"), site_ts(), tech_ts());
    assert_eq!(c.err(), Some(PskTooShort));
    assert_eq!(
        Peer::new(short, tech_ts(), site_ts()).err(),
        Some(PskTooShort)
    );
    let mut b = config_b();
    assert_eq!(b.set_psk(short), Err(PskTooShort));
    assert!(Peer::new(b"sixteen bytes!!!", tech_ts(), site_ts()).is_ok());
}

/// A gateway responder that learns each site's PSK and selectors from its
/// identity, and builds its inbound SPIs from the site's tunnel index.
fn lookup_config() -> Config {
    let lookup: PeerLookup = Arc::new(|id: &Id| {
        (id == &Id::fqdn("site-7.vpnnat")).then(|| {
            let mut p = Peer::new(PSK, tech_ts(), site_ts()).expect("PSK long enough");
            p.inbound_spi_index = Some(0x00_0007);
            p
        })
    });
    Config::with_lookup(Id::fqdn("gw.vpnnat"), lookup)
}

#[test]
fn responder_picks_the_peer_by_identity() {
    let mut net = Net::new(config_a(), lookup_config());
    let (ca, cb) = established(&mut net);
    assert_eq!(esp::spi::index_from_spi(cb.spi_in), Some(7));
    assert_eq!(ca.spi_out, cb.spi_in);
    assert_eq!(cb.ts_remote, site_ts());
}

#[test]
fn responder_refuses_an_identity_the_lookup_does_not_know() {
    let mut a = config_a();
    a.local_id = Id::fqdn("site-8.vpnnat");
    let mut net = Net::new(a, lookup_config());
    net.run();
    assert_eq!(
        Net::events(&mut net.b),
        vec![Event::IkeSaDown(DownReason::AuthenticationFailed)]
    );
    assert_eq!(
        Net::events(&mut net.a),
        vec![Event::IkeSaDown(DownReason::AuthenticationFailed)]
    );
}

#[test]
fn responder_lookup_psk_must_match() {
    let lookup: PeerLookup = Arc::new(|_: &Id| {
        Some(Peer::new(b"another key, also 32 bytes long!", tech_ts(), site_ts()).expect("long"))
    });
    let mut net = Net::new(
        config_a(),
        Config::with_lookup(Id::fqdn("gw.vpnnat"), lookup),
    );
    net.run();
    assert_eq!(
        Net::events(&mut net.b),
        vec![Event::IkeSaDown(DownReason::AuthenticationFailed)]
    );
}

#[test]
fn initiator_and_rekeys_keep_the_spi_index() {
    let (mut a, mut b) = (config_a(), config_b());
    a.inbound_spi_index = Some(0x00_1234);
    b.inbound_spi_index = Some(0xab_cdef);
    let mut net = Net::new(a, b);
    let (ca, cb) = established(&mut net);
    assert_eq!(esp::spi::index_from_spi(ca.spi_in), Some(0x00_1234));
    assert_eq!(esp::spi::index_from_spi(cb.spi_in), Some(0xab_cdef));
    for _ in 0..4 {
        net.a.rekey_child(net.now, &mut net.rng);
        net.run();
        net.b.rekey_child(net.now, &mut net.rng);
        net.run();
    }
    let (na, nb) = (net.a.child().expect("child"), net.b.child().expect("child"));
    assert_eq!(esp::spi::index_from_spi(na.spi_in), Some(0x00_1234));
    assert_eq!(esp::spi::index_from_spi(nb.spi_in), Some(0xab_cdef));
}

/// Yields the given words, then counts up from the last.
struct Words(Vec<u32>);

impl rand::RngCore for Words {
    fn next_u32(&mut self) -> u32 {
        if self.0.len() > 1 {
            self.0.remove(0)
        } else {
            let w = self.0[0];
            self.0[0] = w.wrapping_add(1);
            w
        }
    }
    fn next_u64(&mut self) -> u64 {
        u64::from(self.next_u32())
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        dest.iter_mut().for_each(|b| *b = self.next_u32() as u8);
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl rand::CryptoRng for Words {}

#[test]
fn inbound_spi_never_repeats_a_live_one() {
    let mut net = established_pair();
    net.a.config.inbound_spi_index = Some(5);
    let live = esp::spi::spi_from_index(5, 40);
    if let Some(c) = net.a.child.as_mut() {
        c.spi_in = live;
    }
    // The first draw gives the live SPI again, the second a new one.
    let spi = net.a.new_inbound_spi(&mut Words(vec![40, 41]));
    assert_eq!(spi, esp::spi::spi_from_index(5, 41));
    // Without an index, the reserved 0–255 are skipped too.
    net.a.config.inbound_spi_index = None;
    assert_eq!(net.a.new_inbound_spi(&mut Words(vec![0, 255, 256])), 256);
}

#[test]
fn peer_spi_in_the_reserved_range_is_refused() {
    let mut net = established_pair();
    let mut rng = StdRng::seed_from_u64(3);
    for (spi, ok) in [(0, false), (255, false), (256, true)] {
        let ps = vec![
            Payload::Sa(vec![esp_proposal(spi, &[])]),
            Payload::TsI(site_ts()),
            Payload::TsR(tech_ts()),
        ];
        let f = Found::new(&ps);
        let r = net
            .b
            .accept_child(&f, &[7; 32], None, &[1; 32], &[2; 32], &mut rng);
        match r {
            Ok((c, _, _)) => {
                assert!(ok, "SPI {spi} accepted");
                assert_eq!(c.spi_out, spi);
            }
            Err(n) => {
                assert!(!ok, "SPI {spi} refused");
                assert_eq!(n, notify::NO_PROPOSAL_CHOSEN.into());
            }
        }
        // The initiator's side: a response choosing that SPI.
        let ps = vec![
            Payload::Sa(vec![esp_proposal(spi, &[])]),
            Payload::TsI(site_ts()),
            Payload::TsR(tech_ts()),
        ];
        let f = Found::new(&ps);
        let c = net
            .a
            .offered_child(&f, &[7; 32], None, &[1; 32], &[2; 32], 0x1000);
        assert_eq!(c.is_some(), ok, "SPI {spi}");
    }
}

/// Runs timers and traffic until both sides sit on one IKE SA other than
/// `old`, or gives up.
fn settle_on_new_ike_sa(net: &mut Net, old: (u64, u64)) {
    for _ in 0..20 {
        net.run();
        if net.a.spis() != old && net.a.spis() == net.b.spis() && net.a.outstanding.is_none() {
            break;
        }
        net.tick();
    }
    net.run();
}

#[test]
fn simultaneous_ike_rekey_ends_on_one_sa() {
    let mut net = established_pair();
    let old = net.a.spis();
    Net::events(&mut net.a);
    Net::events(&mut net.b);
    net.a.rekey_ike(net.now, &mut net.rng);
    net.b.rekey_ike(net.now, &mut net.rng);
    // Both requests cross before either response.
    let (d1, r1) = net.take().unwrap();
    let (d2, r2) = net.take().unwrap();
    assert_eq!((d1, d2), (Dir::AtoB, Dir::BtoA));
    net.deliver(d1, &r1).unwrap();
    net.deliver(d2, &r2).unwrap();
    settle_on_new_ike_sa(&mut net, old);
    let (ea, eb) = (Net::events(&mut net.a), Net::events(&mut net.b));
    assert!(
        net.a.is_established() && net.b.is_established(),
        "{ea:?} {eb:?}"
    );
    assert_ne!(net.a.spis(), old);
    assert_eq!(net.a.spis(), net.b.spis());
    // The new SA carries traffic: a CHILD_SA rekey from each side.
    net.a.rekey_child(net.now, &mut net.rng);
    net.run();
    net.b.rekey_child(net.now, &mut net.rng);
    net.run();
    assert_eq!(rekeyed(&Net::events(&mut net.a)).len(), 2);
    assert_eq!(net.a.stats().drops.total(), 0);
    assert_eq!(net.b.stats().drops.total(), 0);
}

#[test]
fn peer_ike_rekey_while_our_dpd_is_in_flight() {
    let mut net = established_pair();
    let old = net.a.spis();
    Net::events(&mut net.a);
    Net::events(&mut net.b);
    // A's liveness check and B's IKE rekey cross.
    net.now += net.a.config.dpd_interval;
    net.a.handle_timeout(net.now, &mut net.rng);
    net.b.rekey_ike(net.now, &mut net.rng);
    let (d1, r1) = net.take().unwrap();
    let (d2, r2) = net.take().unwrap();
    assert_eq!((d1, d2), (Dir::AtoB, Dir::BtoA));
    net.deliver(d1, &r1).unwrap();
    net.deliver(d2, &r2).unwrap();
    settle_on_new_ike_sa(&mut net, old);
    let (ea, eb) = (Net::events(&mut net.a), Net::events(&mut net.b));
    assert!(
        net.a.is_established() && net.b.is_established(),
        "{ea:?} {eb:?}"
    );
    assert_ne!(net.a.spis(), old);
    assert_eq!(net.a.spis(), net.b.spis());
    assert!(net.a.outstanding.is_none() && net.b.outstanding.is_none());
    assert_eq!(net.a.stats().drops.total(), 0);
    assert_eq!(net.b.stats().drops.total(), 0);
}

#[test]
fn half_open_responder_expires() {
    let mut net = Net::new(config_a(), config_b());
    // IKE_SA_INIT reaches B; its answer and everything after are lost.
    let (d, init) = net.take().unwrap();
    assert_eq!(d, Dir::AtoB);
    net.deliver(d, &init).unwrap();
    assert!(!net.b.awaits_init() && !net.b.is_established());
    while net.b.poll_transmit().is_some() {}
    let deadline = net.b.poll_timeout().expect("a half-open deadline");
    assert_eq!(deadline, net.now + net.b.config.half_open_timeout);
    net.b
        .handle_timeout(deadline - Duration::from_millis(1), &mut net.rng);
    assert!(!net.b.is_closed());
    net.b.handle_timeout(deadline, &mut net.rng);
    assert!(net.b.is_closed());
    assert_eq!(
        Net::events(&mut net.b),
        vec![Event::IkeSaDown(DownReason::Timeout)]
    );
    assert!(net.b.keys.is_none() && net.b.init_request.is_empty());
}

#[test]
fn stateless_answer_leaves_the_responder_awaiting_init() {
    let mut b = config_b();
    b.groups = vec![DhGroup::Modp2048];
    let mut net = Net::new(config_a(), b);
    let (d, init) = net.take().unwrap();
    net.deliver(d, &init).unwrap();
    // INVALID_KE_PAYLOAD went back; B kept nothing and is to be dropped.
    assert!(net.b.poll_transmit().is_some());
    assert!(net.b.awaits_init());
    assert_eq!(net.b.poll_timeout(), None);
}

#[test]
fn child_invalid_ke_names_a_group_the_peer_offered() {
    let mut net = established_pair();
    let mut rng = StdRng::seed_from_u64(5);
    // The peer offers group 19 (unknown here) with its KE, then 14; we
    // prefer 31, which it did not offer: the answer must name 14.
    let mut prop = esp_proposal(0x1000, &[]);
    prop.transforms
        .insert(1, Transform::new(transform::DH, 19, None));
    prop.transforms.insert(
        2,
        Transform::new(transform::DH, DhGroup::Modp2048.id(), None),
    );
    let ps = vec![
        Payload::Sa(vec![prop]),
        Payload::TsI(site_ts()),
        Payload::TsR(tech_ts()),
    ];
    let f = Found::new(&ps);
    assert_eq!(net.b.config.groups.first(), Some(&DhGroup::Curve25519));
    let r = net.b.accept_child(
        &f,
        &[7; 32],
        Some((19, &[1; 32])),
        &[1; 32],
        &[2; 32],
        &mut rng,
    );
    assert_eq!(
        r.err(),
        Some(Refusal {
            notify: notify::INVALID_KE_PAYLOAD,
            group: Some(DhGroup::Modp2048),
        })
    );
}

#[test]
fn too_many_selectors_are_unacceptable() {
    let mut net = established_pair();
    let mut rng = StdRng::seed_from_u64(5);
    let many = |n: u8| -> Vec<TrafficSelector> {
        (0..n)
            .map(|i| TrafficSelector::ipv4_prefix(Ipv4Addr::new(100, 64, 7, i), 32))
            .collect()
    };
    for (n, ok) in [(16, true), (17, false), (255, false)] {
        let ps = vec![
            Payload::Sa(vec![esp_proposal(0x1000, &[])]),
            Payload::TsI(many(n)),
            Payload::TsR(tech_ts()),
        ];
        let f = Found::new(&ps);
        let r = net
            .b
            .accept_child(&f, &[7; 32], None, &[1; 32], &[2; 32], &mut rng);
        match r {
            Ok((c, _, _)) => {
                assert!(ok, "{n} selectors accepted");
                assert_eq!(c.ts_remote.len(), usize::from(n));
            }
            Err(e) => {
                assert!(!ok, "{n} selectors refused");
                assert_eq!(e, notify::TS_UNACCEPTABLE.into());
            }
        }
    }
}

#[test]
fn informational_before_ike_auth_is_not_acted_on() {
    let mut net = Net::new(config_a(), config_b());
    // IKE_SA_INIT both ways; A's IKE_AUTH is lost.
    for _ in 0..2 {
        let (d, t) = net.take().unwrap();
        net.deliver(d, &t).unwrap();
    }
    let (d, auth) = net.take().unwrap();
    assert_eq!(d, Dir::AtoB);
    drop(auth);
    // A Delete of the IKE SA under the IKE_SA_INIT keys, in IKE_AUTH's place.
    let d = Payload::Delete {
        protocol: protocol::IKE,
        spi_size: 0,
        spis: Vec::new(),
    };
    let bytes = net.a.seal(exchange::INFORMATIONAL, false, 1, &[d]).unwrap();
    let from = SocketAddr::new(IpAddr::V4(A_IP), NAT_T_PORT);
    let datagram = [&NON_ESP_MARKER[..], &bytes].concat();
    let port = net.a.local_port();
    let datagram = if port == NAT_T_PORT { datagram } else { bytes };
    let r = net
        .b
        .handle_input(port, from, &datagram, net.now, &mut net.rng);
    assert_eq!(r, Err(DropReason::Unexpected));
    assert!(!net.b.is_closed());
    assert!(net.b.poll_transmit().is_none());
    assert!(Net::events(&mut net.b).is_empty());
}

#[test]
fn close_before_established_goes_down_at_once() {
    let mut net = Net::new(config_a(), config_b());
    net.a.close(net.now, &mut net.rng);
    assert!(net.a.is_closed());
    assert_eq!(
        Net::events(&mut net.a),
        vec![Event::IkeSaDown(DownReason::Closed)]
    );
    assert_eq!(net.a.poll_timeout(), None);
}

#[test]
fn message_ids_stop_at_the_last_one() {
    let mut net = established_pair();
    net.a.next_request_id = u32::MAX;
    net.b.expected_request_id = u32::MAX;
    for _ in 0..2 {
        net.now += net.a.config.dpd_interval;
        net.a.handle_timeout(net.now, &mut net.rng);
        net.run();
    }
    assert!(net.a.is_established() && net.b.is_established());
    assert_eq!(net.a.next_request_id, u32::MAX);
    assert_eq!(net.b.expected_request_id, u32::MAX);
}

#[test]
fn rekeys_without_deletes_keep_two_old_children() {
    let mut net = established_pair();
    Net::events(&mut net.a);
    let mut replaced = Vec::new();
    for i in 0..5u32 {
        let old = net.a.child().expect("child").clone();
        replaced.push(old.clone());
        let new = ChildSa {
            spi_in: 0x1000 + i,
            spi_out: 0x2000 + i,
            ..old.clone()
        };
        let keys = ChildKeys {
            key_in: [1; 36],
            key_out: [2; 36],
        };
        net.a.install_rekeyed(old.spi_in, new, keys);
        assert!(net.a.old_children.len() <= MAX_OLD_CHILDREN);
    }
    // The three oldest went, announced and queued for a Delete to the peer.
    let ea = Net::events(&mut net.a);
    for old in &replaced[..3] {
        assert!(
            ea.contains(&Event::ChildSaDeleted {
                spi_in: old.spi_in,
                spi_out: old.spi_out,
            }),
            "{ea:?}"
        );
        assert!(net.a.actions.contains(&Action::DeleteChild(old.spi_in)));
    }
    let kept: Vec<u32> = net.a.old_children.iter().map(|c| c.spi_in).collect();
    assert_eq!(kept, vec![replaced[3].spi_in, replaced[4].spi_in]);
}

#[test]
fn cookie_rounds_are_capped() {
    let mut net = Net::new(config_a(), config_b());
    while net.a.poll_transmit().is_some() {}
    let (spi_i, _) = net.a.spis();
    let from = SocketAddr::new(IpAddr::V4(B_IP), IKE_PORT);
    for round in 0..4 {
        let h = Header {
            spi_i,
            spi_r: 0,
            next_payload: 0,
            exchange: exchange::IKE_SA_INIT,
            flags: flags::RESPONSE,
            message_id: 0,
            length: 0,
        };
        let reply = wire::encode(h, &[Payload::notify(notify::COOKIE, &[round; 16])]);
        let r = net
            .a
            .handle_input(IKE_PORT, from, &reply, net.now, &mut net.rng);
        if round < 3 {
            assert_eq!(r, Ok(()));
            let t = net.a.poll_transmit().expect("IKE_SA_INIT again");
            let m = wire::parse(&t.payload).unwrap();
            assert_eq!(
                m.chain.payloads.first(),
                Some(&Payload::notify(notify::COOKIE, &[round; 16]))
            );
        } else {
            assert_eq!(r, Err(DropReason::Unexpected));
            assert!(net.a.poll_transmit().is_none());
        }
    }
}

#[test]
fn initiator_refusing_the_responders_auth_tells_it() {
    let mut a = config_a();
    a.remote_id = Some(Id::fqdn("another-gw.vpnnat"));
    let mut net = Net::new(a, config_b());
    net.run();
    assert!(net.a.is_closed() && net.b.is_closed());
    assert_eq!(
        Net::events(&mut net.a),
        vec![Event::IkeSaDown(DownReason::AuthenticationFailed)]
    );
    // B had the SA up, then learned of the refusal (RFC 7296 §2.21.2).
    let eb = Net::events(&mut net.b);
    assert!(matches!(eb.first(), Some(Event::IkeSaUp { .. })), "{eb:?}");
    assert_eq!(
        eb.last(),
        Some(&Event::IkeSaDown(DownReason::AuthenticationFailed))
    );
}

#[test]
fn key_material_is_dropped_once_established_and_wiped() {
    let net = established_pair();
    for sa in [&net.a, &net.b] {
        assert!(sa.dh.is_none());
        assert!(sa.init_request.is_empty() && sa.init_response.is_empty());
    }
    fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>() {}
    wiped_on_drop::<ChildKeys>();
    wiped_on_drop::<crypto::IkeKeys>();
    wiped_on_drop::<CookieJar>();
    let mut keys = net.a.keys.clone().expect("keys");
    zeroize::Zeroize::zeroize(&mut keys);
    assert!(keys.sk_d.iter().chain(&keys.sk_ei).all(|b| *b == 0));
}

#[test]
fn responder_with_spi_zero_answers_nothing() {
    let mut net = Net::new(config_a(), config_b());
    let from = SocketAddr::new(IpAddr::V4(A_IP), IKE_PORT);
    let mut r = IkeSa::responder(config_b(), 0, IpAddr::V4(B_IP), from, net.now);
    let (_, init) = net.take().unwrap();
    let got = r.handle_input(IKE_PORT, from, &init.payload, net.now, &mut net.rng);
    assert_eq!(got, Err(DropReason::WrongSpi));
    assert!(r.poll_transmit().is_none() && r.awaits_init());
}

#[test]
fn retransmission_backoff_doubles_and_saturates() {
    let base = Duration::from_secs(1);
    let waits: Vec<u64> = (1..=5).map(|t| backoff(base, t).as_secs()).collect();
    assert_eq!(waits, vec![1, 2, 4, 8, 16]);
    assert_eq!(backoff(base, 40), backoff(base, 17));
    assert_eq!(backoff(Duration::MAX, 3), Duration::MAX);
}

#[test]
fn replaced_ike_sa_is_forgotten_after_the_peers_delete() {
    let mut net = established_pair();
    net.a.rekey_ike(net.now, &mut net.rng);
    net.run();
    // A started the rekey and deleted the old SA; B answered on it.
    assert!(net.a.old_ike.is_none());
    let expires = net
        .b
        .old_ike
        .as_ref()
        .and_then(|o| o.expires)
        .expect("kept for retransmissions");
    assert_eq!(net.b.poll_timeout().map(|t| t <= expires), Some(true));
    while net.b.old_ike.is_some() {
        net.tick();
        net.run();
        assert!(net.now <= expires);
    }
    assert!(net.a.is_established() && net.b.is_established());
    assert_eq!(net.a.spis(), net.b.spis());
}
