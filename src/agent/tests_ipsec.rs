//! The agent dialling an IPsec gateway through the seam: its IKEv2
//! initiator against the gateway's IPsec responder and responder tunnel,
//! then packets both ways through ESP and the agent's NAT.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use super::*;
use crate::messages::{AgentDesiredState, AgentMapping, AgentTunnel, IpsecParams, TunnelKind};
use crate::tunnel::ipsec::{self, IKE_500_TAG, Settings};
use crate::tunnel::{AnyTunnel, BuiltinIpsec, Decapsulated, Encapsulated, Incoming};

const GW: &str = "203.0.113.1:500";
const NAT: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 5);
const REAL: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
const TECH: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 50);
const WALL: UnixMillis = UnixMillis(1_700_000_000_000);
const PSK: &str = "c2l0ZS03IHByZS1zaGFyZWQga2V5IG9mIDMyIGJ5dGVzISE=";
const INDEX: u32 = 0x0010_0007;

fn gw_addr() -> SocketAddr {
    GW.parse().unwrap()
}

fn agent_addr() -> SocketAddr {
    "198.51.100.11:4500".parse().unwrap()
}

/// The site's parameters (`local_*`: the site).
fn site_params() -> IpsecParams {
    IpsecParams::for_site(
        crate::messages::SiteId(3),
        PSK.to_owned(),
        vec!["10.64.0.5/32".parse().unwrap()],
        vec!["172.16.0.0/24".parse().unwrap()],
    )
}

fn gw_params() -> IpsecParams {
    site_params().mirrored()
}

fn udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    etherparse::PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
        .udp(sport, dport)
        .write(&mut p, payload)
        .unwrap();
    p
}

fn desired(ipsec: Option<IpsecParams>) -> AgentDesiredState {
    AgentDesiredState {
        version: 1,
        site_id: SiteId(3),
        tunnel: Some(AgentTunnel {
            gateway_id: GatewayId(1),
            kind: TunnelKind::Ipsec,
            endpoint: gw_addr(),
            public_key: PrivateKey::from_bytes([2; 32]).public_key(),
            persistent_keepalive_s: 0,
            ipsec,
            tls: None,
        }),
        mappings: vec![AgentMapping {
            nat_address: NAT,
            terminal: TerminalName::new("pc-1").unwrap(),
            request_id: RequestId(17),
            expires_at: UnixMillis(WALL.0 + 3_600_000),
        }],
        problem: None,
        rotation: None,
    }
}

fn agent<K: Kinds>(now: Instant) -> AgentState<K> {
    AgentState::with_kinds(
        AgentConfig {
            site_id: SiteId(3),
            private_key: PrivateKey::from_bytes([1; 32]),
            mode: DataMode::Packet { masquerade: None },
            seed: 42,
            center_prefixes: vec!["172.16.0.0/24".parse().unwrap()],
        },
        now,
    )
}

fn names() -> BTreeMap<TerminalName, Ipv4Addr> {
    [(TerminalName::new("pc-1").unwrap(), REAL)]
        .into_iter()
        .collect()
}

fn transmits<K: Kinds>(a: &mut AgentState<K>) -> Vec<Transmit> {
    std::iter::from_fn(|| a.poll_transmit()).collect()
}

/// The gateway's side: what its responder and the site's tunnel make of a
/// datagram; replies come back.
fn gateway_input(
    gw: &mut ipsec::Responder,
    tunnel: &mut ipsec::Tunnel,
    d: &[u8],
    now: Instant,
) -> Vec<Vec<u8>> {
    let mut buf = vec![0; 4096];
    let into_tunnel = |tunnel: &mut ipsec::Tunnel| {
        let mut out = vec![0; 4096];
        let mut v = vec![];
        if let Ok(Decapsulated::Network(r)) =
            tunnel.decapsulate(Some(agent_addr()), d, &mut out, now)
        {
            v.push(r.to_vec());
        }
        while let Some(r) = tunnel.poll_network(&mut out) {
            v.push(r.to_vec());
        }
        v
    };
    if ipsec::Responder::fast_index(d).is_some() {
        return into_tunnel(tunnel);
    }
    match gw.classify(Some(agent_addr()), d, &mut buf, now, false) {
        Ok(Incoming::Reply(r)) => vec![r.to_vec()],
        Ok(Incoming::Authenticated { .. } | Incoming::ForIndex(_)) => into_tunnel(tunnel),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn the_agent_dials_an_ipsec_gateway_and_packets_flow_through_esp() {
    let now = Instant::now();
    let mut a = agent::<BuiltinIpsec>(now);
    let applied = a
        .handle_desired_state(&desired(Some(site_params())), &names(), now, WALL)
        .unwrap();
    assert!(applied.errors.is_empty(), "{:?}", applied.errors);
    let mut gw = ipsec::Responder::seeded(Settings::default(), 1);
    let mut tunnel = gw.ipsec_tunnel(&gw_params(), INDEX, now).unwrap();

    let mut t = transmits(&mut a);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].dst, gw_addr());
    assert!(t[0].payload.starts_with(&IKE_500_TAG), "IKE_SA_INIT on 500");
    for _ in 0..10 {
        let mut replies = vec![];
        for x in t.drain(..) {
            replies.extend(gateway_input(&mut gw, &mut tunnel, &x.payload, now));
        }
        if replies.is_empty() {
            break;
        }
        for r in replies {
            let mut out = vec![0; 4096];
            let o = a.handle_network_input_into(gw_addr(), &r, &mut out, now);
            assert_eq!(o, NetworkOutcome::Consumed);
        }
        t = transmits(&mut a);
    }
    assert!(a.tunnel().unwrap().up);
    assert!(tunnel.has_session());
    assert!(std::iter::from_fn(|| a.poll_event()).any(|e| e
        == AgentEvent::TunnelUp {
            gateway_id: GatewayId(1)
        }));

    // Center → site: to the NAT address, rewritten to the terminal.
    let ping = udp(TECH, NAT, 40000, 7, b"ping");
    let mut buf = vec![0; 4096];
    let Encapsulated::Network(esp) = tunnel.encapsulate(&ping, &mut buf, now).unwrap() else {
        panic!("no ESP");
    };
    let esp = esp.to_vec();
    let mut out = vec![0; 4096];
    match a.handle_network_input_into(gw_addr(), &esp, &mut out, now) {
        NetworkOutcome::Lan(p) => {
            let h = crate::ipv4::Ipv4Header::new_checked(p).unwrap();
            assert_eq!((h.src(), h.dst()), (TECH, REAL));
        }
        other => panic!("{other:?}"),
    }
    // Site → center: from the terminal, sealed from the NAT address.
    let mut pong = udp(REAL, TECH, 7, 40000, b"pong");
    let mut out = vec![0; 4096];
    let datagram = match a.handle_lan_input_into(&mut pong, &mut out, now) {
        LanOutcome::Send { dst, datagram } => {
            assert_eq!(dst, gw_addr());
            datagram.to_vec()
        }
        other => panic!("{other:?}"),
    };
    let mut buf = vec![0; 4096];
    match tunnel.decapsulate(Some(agent_addr()), &datagram, &mut buf, now) {
        Ok(Decapsulated::Tunnel(p)) => {
            let h = crate::ipv4::Ipv4Header::new_checked(p).unwrap();
            assert_eq!((h.src(), h.dst()), (NAT, TECH));
        }
        other => panic!("{other:?}"),
    }
    let AnyTunnel::Ipsec(_) = &a.peer.as_ref().unwrap().tunnel else {
        panic!("the agent runs an IPsec tunnel");
    };
}

#[test]
fn an_ipsec_tunnel_without_usable_parameters_is_refused_with_an_error() {
    let now = Instant::now();
    let mut short = site_params();
    short.psk = "c2hvcnQ=".to_owned();
    for (ipsec, want) in [
        (None, "an IPsec tunnel without IPsec parameters"),
        (
            Some(short),
            "IPsec tunnel parameters: psk: must be standard base64 of at least 32 bytes",
        ),
    ] {
        let mut a = agent::<BuiltinIpsec>(now);
        let applied = a
            .handle_desired_state(&desired(ipsec), &names(), now, WALL)
            .unwrap();
        assert_eq!(applied.errors, vec![want.to_owned()]);
        assert!(a.tunnel().is_none());
        assert!(transmits(&mut a).is_empty());
    }
}

/// A rotation of the gateway's WireGuard key changes the key its sites'
/// documents name; an IPsec tunnel does not use it and is not dialed again
/// (its IKE SA goes on), while a real change (the endpoint) still re-dials.
#[test]
fn an_ipsec_tunnel_ignores_a_new_gateway_wireguard_key() {
    let now = Instant::now();
    let mut a = agent::<BuiltinIpsec>(now);
    let mut d = desired(Some(site_params()));
    a.handle_desired_state(&d, &names(), now, WALL).unwrap();
    assert_eq!(transmits(&mut a).len(), 1, "IKE_SA_INIT");

    d.version = 2;
    if let Some(t) = d.tunnel.as_mut() {
        t.public_key = PrivateKey::from_bytes([9; 32]).public_key();
    }
    a.handle_desired_state(&d, &names(), now, WALL).unwrap();
    assert!(transmits(&mut a).is_empty(), "not dialed again");

    d.version = 3;
    if let Some(t) = d.tunnel.as_mut() {
        t.endpoint = "198.51.100.2:500".parse().unwrap();
    }
    a.handle_desired_state(&d, &names(), now, WALL).unwrap();
    assert_eq!(
        transmits(&mut a).len(),
        1,
        "a new gateway address is dialed"
    );
}
