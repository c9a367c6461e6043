//! An agent's IPsec initiator and a gateway's IPsec responder talking
//! through the seam in memory: every datagram crosses in seam form and is
//! routed the way the gateway routes it ([`Responder::fast_index`], then
//! [`Responder::classify`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::*;
use crate::tunnel::Tunnel as _;

const INDEX: u32 = 0x0012_3457;
const SITE_NAT: &str = "10.64.0.7";
const TECH: &str = "172.16.0.5";
const PSK: &str = "c2l0ZS03IHByZS1zaGFyZWQga2V5IG9mIDMyIGJ5dGVzISE=";

fn prefix(s: &str) -> Prefix {
    s.parse().unwrap()
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn agent_addr() -> SocketAddr {
    "198.51.100.7:500".parse().unwrap()
}

fn gw_addr() -> SocketAddr {
    "192.0.2.1:500".parse().unwrap()
}

/// The parameters of site 7 as the gateway gets them (`local_*`: the center).
fn gw_params() -> IpsecParams {
    agent_params().mirrored()
}

/// The same from the site's side.
fn agent_params() -> IpsecParams {
    IpsecParams::for_site(
        crate::messages::SiteId(7),
        PSK.to_owned(),
        vec![prefix("10.64.0.7/32")],
        vec![prefix("172.16.0.0/24")],
    )
}

pub(crate) fn udp(src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    etherparse::PacketBuilder::ipv4(ip(src).octets(), ip(dst).octets(), 64)
        .udp(40000, 7)
        .write(&mut p, payload)
        .unwrap();
    p
}

fn initiator(params: &IpsecParams, settings: Settings, seed: u64, now: Instant) -> Tunnel {
    Tunnel::initiator_seeded(
        Tunnel::initiator_config(params).unwrap(),
        gw_addr(),
        1,
        settings,
        seed,
        now,
    )
}

/// What a datagram became.
#[derive(Debug, PartialEq, Eq)]
enum Out {
    Reply(Vec<u8>),
    Inner(Vec<u8>),
    Nothing,
}

fn out_of(d: Result<Decapsulated<'_>, Error>) -> Result<Out, Error> {
    Ok(match d? {
        Decapsulated::Tunnel(p) => Out::Inner(p.to_vec()),
        Decapsulated::Network(r) => Out::Reply(r.to_vec()),
        Decapsulated::Nothing => Out::Nothing,
    })
}

struct Pair {
    gw: Responder,
    gw_tunnel: Tunnel,
    agent: Tunnel,
    now: Instant,
}

impl Pair {
    fn new(settings: Settings) -> Self {
        Self::with(settings, agent_params())
    }

    fn with(settings: Settings, agent: IpsecParams) -> Self {
        let now = Instant::now();
        let gw = Responder::seeded(settings, 11);
        let gw_tunnel = gw.ipsec_tunnel(&gw_params(), INDEX, now).unwrap();
        Self {
            gw,
            gw_tunnel,
            agent: initiator(&agent, settings, 5, now),
            now,
        }
    }

    /// A datagram from the agent, routed as the gateway routes it.
    fn gw_gets(&mut self, d: &[u8]) -> Result<Out, Error> {
        to_gateway(&mut self.gw, &mut self.gw_tunnel, d, self.now)
    }

    fn agent_gets(&mut self, d: &[u8]) -> Result<Out, Error> {
        let mut buf = vec![0; buffer_len(d.len())];
        out_of(
            self.agent
                .decapsulate(Some(gw_addr()), d, &mut buf, self.now),
        )
    }

    /// Runs IKE between the two until nothing is left to send, starting
    /// with `first` from the agent. Returns the datagrams the agent sent.
    fn exchange(&mut self, first: Vec<u8>) -> Vec<Vec<u8>> {
        let mut sent = vec![];
        let mut to_gw = vec![first];
        let mut to_agent: Vec<Vec<u8>> = vec![];
        for _ in 0..20 {
            for d in std::mem::take(&mut to_gw) {
                sent.push(d.clone());
                if let Ok(Out::Reply(r)) = self.gw_gets(&d) {
                    to_agent.push(r);
                }
            }
            to_agent.extend(drain(&mut self.gw_tunnel));
            for d in std::mem::take(&mut to_agent) {
                if let Ok(Out::Reply(r)) = self.agent_gets(&d) {
                    to_gw.push(r);
                }
            }
            to_gw.extend(drain(&mut self.agent));
            if to_gw.is_empty() && to_agent.is_empty() {
                break;
            }
        }
        sent
    }

    fn establish(&mut self) -> Vec<Vec<u8>> {
        let mut buf = vec![0; MIN_BUFFER_LEN];
        let init = self
            .agent
            .initiate_handshake(&mut buf, true, self.now)
            .unwrap()
            .expect("an IKE_SA_INIT")
            .to_vec();
        let sent = self.exchange(init);
        assert!(self.agent.has_session(), "agent has a CHILD_SA");
        assert!(self.gw_tunnel.has_session(), "gateway has a CHILD_SA");
        sent
    }

    /// `packet` from the site to the center; what the gateway's tunnel made of it.
    fn site_sends(&mut self, packet: &[u8]) -> Result<Out, Error> {
        let mut buf = vec![0; buffer_len(packet.len())];
        let d = match self.agent.encapsulate(packet, &mut buf, self.now)? {
            Encapsulated::Network(d) => d.to_vec(),
            Encapsulated::Queued => return Ok(Out::Nothing),
        };
        self.gw_gets(&d)
    }

    fn center_sends(&mut self, packet: &[u8]) -> Result<Out, Error> {
        let mut buf = vec![0; buffer_len(packet.len())];
        let d = match self.gw_tunnel.encapsulate(packet, &mut buf, self.now)? {
            Encapsulated::Network(d) => d.to_vec(),
            Encapsulated::Queued => return Ok(Out::Nothing),
        };
        self.agent_gets(&d)
    }
}

fn to_gateway(
    gw: &mut Responder,
    tunnel: &mut Tunnel,
    d: &[u8],
    now: Instant,
) -> Result<Out, Error> {
    let mut buf = vec![0; buffer_len(d.len())];
    let into_tunnel = |tunnel: &mut Tunnel| {
        let mut buf = vec![0; buffer_len(d.len())];
        out_of(tunnel.decapsulate(Some(agent_addr()), d, &mut buf, now))
    };
    if let Some(index) = Responder::fast_index(d) {
        assert_eq!(index, INDEX, "ESP routes to the peer's index");
        return into_tunnel(tunnel);
    }
    match gw.classify(Some(agent_addr()), d, &mut buf, now, false)? {
        Incoming::Reply(r) | Incoming::CookieReply(r) => Ok(Out::Reply(r.to_vec())),
        Incoming::Authenticated { identity } => {
            assert_eq!(identity, "site-7.vpnnat");
            into_tunnel(tunnel)
        }
        Incoming::ForIndex(index) => {
            assert_eq!(index, INDEX);
            into_tunnel(tunnel)
        }
        Incoming::Consumed => Ok(Out::Nothing),
        other => panic!("unexpected {other:?}"),
    }
}

fn drain(t: &mut Tunnel) -> Vec<Vec<u8>> {
    let mut buf = vec![0; 65600];
    std::iter::from_fn(|| t.poll_network(&mut buf).map(<[u8]>::to_vec)).collect()
}

fn events(t: &mut Tunnel) -> Vec<TunnelEvent> {
    std::iter::from_fn(|| t.poll_event()).collect()
}

#[test]
fn ike_starts_on_500_floats_to_4500_and_pings_go_both_ways() {
    let mut p = Pair::new(Settings::default());
    let sent = p.establish();
    assert!(
        sent[0].starts_with(&IKE_500_TAG),
        "IKE_SA_INIT leaves from port 500"
    );
    assert!(
        sent[1].starts_with(&natt::NON_ESP_MARKER),
        "IKE_AUTH is on 4500 (the agent claims a NAT)"
    );
    assert_eq!(events(&mut p.agent), vec![TunnelEvent::HandshakeCompleted]);
    assert_eq!(
        events(&mut p.gw_tunnel),
        vec![TunnelEvent::HandshakeCompleted]
    );
    assert_eq!(p.gw.half_open(), 0, "the SA left the half-open table");

    let ping = udp(SITE_NAT, TECH, b"from the site");
    assert_eq!(p.site_sends(&ping), Ok(Out::Inner(ping.clone())));
    let pong = udp(TECH, SITE_NAT, b"from the center");
    assert_eq!(p.center_sends(&pong), Ok(Out::Inner(pong.clone())));

    let (a, g) = (p.agent.stats(), p.gw_tunnel.stats());
    assert_eq!((a.tx_packets, a.rx_packets, a.handshakes), (1, 1, 1));
    assert_eq!((g.tx_packets, g.rx_packets, g.handshakes), (1, 1, 1));
    assert_eq!(g.rx_bytes, ping.len() as u64);
    let (spi_in, _) = p.gw_tunnel.child_spis().unwrap();
    assert_eq!(spi::index_from_spi(spi_in), Some(INDEX));

    // The agent, behind a NAT as far as it knows, keeps the mapping open
    // (RFC 3948 §2.3); the gateway consumes the keepalive.
    let mut buf = vec![0; MIN_BUFFER_LEN];
    let later = p.now + Duration::from_secs(21);
    let ka = p
        .agent
        .handle_timeout(&mut buf, later)
        .unwrap()
        .map(<[u8]>::to_vec);
    assert_eq!(ka.as_deref(), Some(&natt::KEEPALIVE[..]));
    assert_eq!(p.gw_gets(&natt::KEEPALIVE), Ok(Out::Nothing));
}

#[test]
fn packets_before_the_child_sa_wait_for_it() {
    let mut p = Pair::new(Settings::default());
    let ping = udp(SITE_NAT, TECH, b"early");
    let mut buf = vec![0; buffer_len(ping.len())];
    let init = match p.agent.encapsulate(&ping, &mut buf, p.now).unwrap() {
        Encapsulated::Network(d) => d.to_vec(),
        Encapsulated::Queued => panic!("the first packet dials"),
    };
    assert!(init.starts_with(&IKE_500_TAG));
    // IKE_AUTH and the held packet leave on the way; the gateway gets the
    // packet once its CHILD_SA exists.
    let sent = p.exchange(init);
    assert!(p.gw_tunnel.has_session());
    let esp = sent.last().unwrap();
    assert_eq!(Responder::fast_index(esp), Some(INDEX));
    assert_eq!(p.gw_tunnel.stats().rx_packets, 1);
}

#[test]
fn child_sa_rekeys_on_demand_by_lifetime_and_by_sequence_numbers() {
    let settings = Settings {
        child_lifetime: Duration::from_secs(600),
        soft_limit: 3,
        ..Settings::default()
    };
    let mut p = Pair::new(settings);
    p.establish();
    events(&mut p.agent);
    let first = p.agent.child_spis().unwrap();

    // On demand.
    p.agent.rekey_child(p.now);
    let req = drain(&mut p.agent);
    assert_eq!(req.len(), 1, "one CREATE_CHILD_SA");
    let req = req.into_iter().next().unwrap();
    p.exchange(req);
    let second = p.agent.child_spis().unwrap();
    assert_ne!(first, second);
    assert_eq!(events(&mut p.agent), vec![TunnelEvent::HandshakeCompleted]);
    assert_eq!(p.agent.stats().handshakes, 2);
    let ping = udp(SITE_NAT, TECH, b"after rekey");
    assert_eq!(p.site_sends(&ping), Ok(Out::Inner(ping.clone())));
    let pong = udp(TECH, SITE_NAT, b"back");
    assert_eq!(p.center_sends(&pong), Ok(Out::Inner(pong.clone())));

    // By sequence numbers: the third packet reaches the soft limit.
    for _ in 0..2 {
        assert_eq!(p.site_sends(&ping), Ok(Out::Inner(ping.clone())));
    }
    let req = drain(&mut p.agent);
    assert_eq!(req.len(), 1, "the soft limit starts a rekey");
    p.exchange(req.into_iter().next().unwrap());
    let third = p.agent.child_spis().unwrap();
    assert_ne!(second, third);
    assert_eq!(p.site_sends(&ping), Ok(Out::Inner(ping.clone())));

    // By lifetime, at the latest (less the random part).
    p.now += Duration::from_secs(600);
    let mut buf = vec![0; MIN_BUFFER_LEN];
    let req = p
        .gw_tunnel
        .handle_timeout(&mut buf, p.now)
        .unwrap()
        .map(<[u8]>::to_vec);
    let mut req: Vec<Vec<u8>> = req.into_iter().collect();
    req.extend(drain(&mut p.gw_tunnel));
    let mut to_gw = vec![];
    for d in req {
        if let Ok(Out::Reply(r)) = p.agent_gets(&d) {
            to_gw.push(r);
        }
    }
    for d in to_gw.into_iter().chain(drain(&mut p.agent)) {
        p.exchange(d);
    }
    assert_ne!(p.agent.child_spis().unwrap(), third, "the gateway rekeyed");
    assert_eq!(p.center_sends(&pong), Ok(Out::Inner(pong.clone())));
    assert_eq!(p.site_sends(&ping), Ok(Out::Inner(ping)));
}

/// Runs one side's timers `secs` seconds on and lets the two finish what
/// that started; `agent` picks the side whose timers run.
fn after(p: &mut Pair, secs: u64, agent: bool) {
    p.now += Duration::from_secs(secs);
    let mut buf = vec![0; MIN_BUFFER_LEN];
    let t = if agent {
        &mut p.agent
    } else {
        &mut p.gw_tunnel
    };
    let mut sent: Vec<Vec<u8>> = t
        .handle_timeout(&mut buf, p.now)
        .unwrap()
        .map(<[u8]>::to_vec)
        .into_iter()
        .collect();
    sent.extend(drain(t));
    for d in sent {
        if agent {
            p.exchange(d);
        } else if let Ok(Out::Reply(r)) = p.agent_gets(&d) {
            p.exchange(r);
        }
    }
    let rest = drain(&mut p.agent);
    for d in rest {
        p.exchange(d);
    }
}

#[test]
fn ike_sa_rekeys_by_the_lifetime_the_site_parameters_name_on_either_side() {
    let short = |p: IpsecParams| IpsecParams {
        ike_rekey_s: Some(100),
        child_rekey_s: Some(10_000),
        ..p
    };
    for site_side in [true, false] {
        let now = Instant::now();
        let gw = Responder::seeded(Settings::default(), 11);
        let (gw_p, agent_p) = if site_side {
            (gw_params(), short(agent_params()))
        } else {
            (short(gw_params()), agent_params())
        };
        let gw_tunnel = gw.ipsec_tunnel(&gw_p, INDEX, now).unwrap();
        let agent = initiator(&agent_p, Settings::default().for_site(&agent_p), 5, now);
        let mut p = Pair {
            gw,
            gw_tunnel,
            agent,
            now,
        };
        p.establish();
        let first = p.agent.ike().unwrap().spis();
        let child = p.agent.child_spis();
        // Not before 90 s (the lifetime less a tenth at most) ...
        after(&mut p, 89, site_side);
        assert_eq!(p.agent.ike().unwrap().spis(), first, "side {site_side}");
        // ... and by 100 s: a new IKE SA on both ends, the CHILD_SA moved
        // over unchanged, traffic both ways.
        after(&mut p, 11, site_side);
        let second = p.agent.ike().unwrap().spis();
        assert_ne!(second, first, "site side {site_side}");
        assert_eq!(p.gw_tunnel.ike().unwrap().spis(), second);
        assert_eq!(p.agent.child_spis(), child);
        let ping = udp(SITE_NAT, TECH, b"after the IKE rekey");
        assert_eq!(p.site_sends(&ping), Ok(Out::Inner(ping.clone())));
        let pong = udp(TECH, SITE_NAT, b"back");
        assert_eq!(p.center_sends(&pong), Ok(Out::Inner(pong)));
        // The new SA's lifetime starts over: it is rekeyed in turn.
        after(&mut p, 100, site_side);
        let third = p.agent.ike().unwrap().spis();
        assert_ne!(third, second, "site side {site_side}");
        assert_eq!(p.gw_tunnel.ike().unwrap().spis(), third);
    }
    // By default an IKE SA lives four hours, a CHILD_SA one.
    let d = Settings::default().for_site(&agent_params());
    assert_eq!(d.ike_lifetime, Duration::from_secs(4 * 3600));
    assert_eq!(d.child_lifetime, Duration::from_secs(3600));
}

#[test]
fn a_spoofed_inner_source_is_dropped_and_counted() {
    let mut p = Pair::new(Settings::default());
    p.establish();
    // The agent refuses to send it…
    let spoofed = udp("10.64.0.8", TECH, b"not mine");
    assert_eq!(p.site_sends(&spoofed), Err(Error::OutsideSelectors));
    assert_eq!(p.agent.drops().get(DropReason::OutboundOutsideSelectors), 1);
    // …and a sender that seals it anyway with the SA's keys is refused by
    // the gateway (RFC 4301 §5.2).
    let c = p.agent.current.as_mut().unwrap();
    let mut esp = vec![0; esp::sealed_len(spoofed.len())];
    let n = c.outbound.seal(&spoofed, &mut esp).unwrap();
    assert_eq!(p.gw_gets(&esp[..n]), Err(Error::OutsideSelectors));
    assert_eq!(
        p.gw_tunnel.drops().get(DropReason::InboundOutsideSelectors),
        1
    );
    assert_eq!(p.gw_tunnel.stats().rx_packets, 0);
    // A destination outside the center's side is refused the same way.
    let elsewhere = udp(SITE_NAT, "192.168.9.9", b"x");
    let c = p.agent.current.as_mut().unwrap();
    let n = c.outbound.seal(&elsewhere, &mut esp).unwrap();
    assert_eq!(p.gw_gets(&esp[..n]), Err(Error::OutsideSelectors));
    assert_eq!(
        p.gw_tunnel.drops().get(DropReason::InboundOutsideSelectors),
        2
    );
}

#[test]
fn forged_replayed_and_unknown_esp_is_dropped() {
    let mut p = Pair::new(Settings::default());
    p.establish();
    let ping = udp(SITE_NAT, TECH, b"genuine");
    let mut buf = vec![0; buffer_len(ping.len())];
    let Encapsulated::Network(d) = p.agent.encapsulate(&ping, &mut buf, p.now).unwrap() else {
        panic!("no ESP");
    };
    let esp = d.to_vec();
    let mut forged = esp.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    assert_eq!(p.gw_gets(&forged), Err(Error::AuthenticationFailed));
    assert_eq!(p.gw_gets(&esp), Ok(Out::Inner(ping.clone())));
    assert_eq!(p.gw_gets(&esp), Err(Error::Replay));
    // Right index, SPI of no SA.
    let mut unknown = esp.clone();
    unknown[0] = if esp[0] == 1 { 2 } else { 1 };
    assert_eq!(Responder::fast_index(&unknown), Some(INDEX));
    assert_eq!(p.gw_gets(&unknown), Err(Error::NoSession));
    assert_eq!(p.gw_tunnel.drops().get(DropReason::UnknownSpi), 1);
    assert_eq!(p.gw_tunnel.drops().get(DropReason::Esp), 2);
    assert_eq!(p.gw_tunnel.stats().rx_packets, 1);
}

#[test]
fn an_unknown_identity_or_a_wrong_key_is_refused() {
    let stranger = IpsecParams {
        local_id: "site-9.vpnnat".to_owned(),
        ..agent_params()
    };
    let wrong_key = IpsecParams {
        psk: "YW5vdGhlciBwcmUtc2hhcmVkIGtleSwgMzIgYnl0ZXMgbG9uZw==".to_owned(),
        ..agent_params()
    };
    for params in [stranger, wrong_key] {
        let mut p = Pair::with(Settings::default(), params.clone());
        let mut buf = vec![0; MIN_BUFFER_LEN];
        let init = p
            .agent
            .initiate_handshake(&mut buf, true, p.now)
            .unwrap()
            .unwrap()
            .to_vec();
        p.exchange(init);
        assert!(!p.agent.has_session(), "{}", params.local_id);
        assert!(!p.gw_tunnel.has_session());
        assert_eq!(events(&mut p.agent), vec![TunnelEvent::Expired]);
        assert_eq!(events(&mut p.gw_tunnel), vec![]);
        assert_eq!(p.gw.half_open(), 0, "a refused SA is forgotten");
        // The agent dials again later.
        p.now += Settings::default().redial_after;
        let again = p.agent.handle_timeout(&mut buf, p.now).unwrap();
        assert!(again.is_some_and(|d| d.starts_with(&IKE_500_TAG)));
    }
}

#[test]
fn a_removed_peer_is_no_longer_found() {
    let mut p = Pair::new(Settings::default());
    let gw_tunnel = std::mem::replace(
        &mut p.gw_tunnel,
        p.gw.ipsec_tunnel(
            &IpsecParams {
                remote_id: "site-8.vpnnat".to_owned(),
                ..gw_params()
            },
            INDEX,
            p.now,
        )
        .unwrap(),
    );
    drop(gw_tunnel);
    let mut buf = vec![0; MIN_BUFFER_LEN];
    let init = p
        .agent
        .initiate_handshake(&mut buf, true, p.now)
        .unwrap()
        .unwrap()
        .to_vec();
    p.exchange(init);
    assert!(!p.agent.has_session());
    assert_eq!(events(&mut p.agent), vec![TunnelEvent::Expired]);
}

#[test]
fn cookies_are_demanded_above_the_half_open_limit() {
    let settings = Settings {
        cookie_threshold: 2,
        ..Settings::default()
    };
    let mut p = Pair::new(settings);
    let mut buf = vec![0; MIN_BUFFER_LEN];
    // Two IKE_SA_INITs that never go on hold two half-open SAs.
    for seed in [21, 22] {
        let mut other = initiator(&agent_params(), settings, seed, p.now);
        let init = other
            .initiate_handshake(&mut buf, true, p.now)
            .unwrap()
            .unwrap()
            .to_vec();
        assert!(matches!(p.gw_gets(&init), Ok(Out::Reply(_))));
    }
    assert_eq!(p.gw.half_open(), 2);
    // A third initiator gets a cookie and no state.
    let init = p
        .agent
        .initiate_handshake(&mut buf, true, p.now)
        .unwrap()
        .unwrap()
        .to_vec();
    let mut gbuf = vec![0; MIN_BUFFER_LEN];
    let cookie = match p
        .gw
        .classify(Some(agent_addr()), &init, &mut gbuf, p.now, false)
    {
        Ok(Incoming::CookieReply(c)) => c.to_vec(),
        other => panic!("expected a cookie, got {other:?}"),
    };
    assert_eq!(
        p.gw.half_open(),
        2,
        "no state for a request without a cookie"
    );
    // The initiator proves its address with the cookie and gets through.
    let retry = match p.agent_gets(&cookie) {
        Ok(Out::Reply(r)) => r,
        other => panic!("the initiator should retry with the cookie: {other:?}"),
    };
    p.exchange(retry);
    assert!(p.agent.has_session());
    assert!(p.gw_tunnel.has_session());
    // Another initiator without a cookie gets one too.
    let mut other = initiator(&agent_params(), settings, 23, p.now);
    let init = other
        .initiate_handshake(&mut buf, true, p.now)
        .unwrap()
        .unwrap()
        .to_vec();
    assert!(matches!(
        p.gw.classify(Some(agent_addr()), &init, &mut gbuf, p.now, false),
        Ok(Incoming::CookieReply(_))
    ));
    // Half-open SAs expire; then no cookie is needed.
    p.now += Duration::from_secs(31);
    let mut fresh = initiator(&agent_params(), settings, 24, p.now);
    let init = fresh
        .initiate_handshake(&mut buf, true, p.now)
        .unwrap()
        .unwrap()
        .to_vec();
    assert!(matches!(
        p.gw.classify(Some(agent_addr()), &init, &mut gbuf, p.now, false),
        Ok(Incoming::Reply(_))
    ));
    assert_eq!(p.gw.half_open(), 1);
}

#[test]
fn the_builtin_responders_route_ipsec_and_wireguard_apart() {
    use crate::tunnel::{Builtin, Kinds, Responder as _, Responders};
    assert!(Builtin::buffer_len(1400) >= esp::sealed_len(1400));
    const { assert!(Builtin::DATA_OVERHEAD >= esp::MAX_OVERHEAD) };
    // ESP by its SPI, WireGuard data by its receiver index.
    let spi = spi::spi_from_index(INDEX, 4);
    let mut esp = vec![0u8; 64];
    esp[..4].copy_from_slice(&spi.to_be_bytes());
    assert_eq!(Responders::fast_index(&esp), Some(INDEX));
    let mut wg = vec![0u8; 64];
    wg[..4].copy_from_slice(&[4, 0, 0, 0]);
    wg[4..8].copy_from_slice(&(INDEX << 8).to_le_bytes());
    assert_eq!(Responders::fast_index(&wg), Some(INDEX));
    // A WireGuard handshake initiation is not ESP with index 0.
    let mut init = vec![0u8; 148];
    init[0] = 1;
    assert_eq!(Responders::fast_index(&init), None);
    // Keepalives need no peer.
    let mut r = Responders::new(PrivateKey::from_bytes([9; 32]), 100);
    let mut buf = vec![0; 256];
    assert_eq!(
        r.classify(
            Some(agent_addr()),
            &natt::KEEPALIVE,
            &mut buf,
            Instant::now()
        ),
        Ok(Incoming::Consumed)
    );
    // An IKE_SA_INIT reaches the IPsec responder.
    let now = Instant::now();
    let mut a = initiator(&agent_params(), Settings::default(), 3, now);
    let mut abuf = vec![0; MIN_BUFFER_LEN];
    let init = a
        .initiate_handshake(&mut abuf, true, now)
        .unwrap()
        .unwrap()
        .to_vec();
    let mut buf = vec![0; MIN_BUFFER_LEN];
    assert!(matches!(
        r.classify(Some(agent_addr()), &init, &mut buf, now),
        Ok(Incoming::Reply(_))
    ));
    assert_eq!(r.ipsec().half_open(), 1);
    assert!(
        !Responders::proves_sender(&init),
        "IKE_SA_INIT proves nothing"
    );
}

use crate::tunnel::PrivateKey;
