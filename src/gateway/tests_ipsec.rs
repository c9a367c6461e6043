//! IPsec sites through the whole gateway state: a site's IKEv2 initiator
//! (the core's own [`ipsec::Tunnel`], as the router agent runs it) talks to
//! a `GatewayState` running [`BuiltinIpsec`], next to a WireGuard site.

use std::net::SocketAddr;
use std::time::Instant;

use super::tests::{Client, addr, connect, desired, drain_events, gw_config, ip, udp, udp_reply};
use super::*;
use crate::messages::{GatewayPeer, IpsecParams, SiteId, TunnelKind};
use crate::tunnel::ipsec::{self, IKE_500_TAG, Settings};
use crate::tunnel::{BuiltinIpsec, Decapsulated, Encapsulated, Tunnel as _};

const PSK_4: &str = "c2l0ZS03IHByZS1zaGFyZWQga2V5IG9mIDMyIGJ5dGVzISE=";
const PSK_5: &str = "c2l0ZS01IHByZS1zaGFyZWQga2V5IG9mIDMyIGJ5dGVzISE=";
const TECH: &str = "172.16.0.5";

fn gw_endpoint() -> SocketAddr {
    addr("192.0.2.1:500")
}

fn params(site: u64, psk: &str, nat: &str) -> IpsecParams {
    IpsecParams::for_site(
        SiteId(site),
        psk.to_owned(),
        vec![format!("{nat}/32").parse().unwrap()],
        vec![GatewayConfig::default_technician_prefix()],
    )
    .mirrored()
}

fn ipsec_peer(site: u64, psk: &str, nat: &str) -> GatewayPeer {
    GatewayPeer {
        site_id: SiteId(site),
        public_key: PrivateKey::from_bytes([site as u8 + 100; 32]).public_key(),
        nat_addresses: vec![ip(nat)],
        tunnel: TunnelKind::Ipsec,
        ipsec: Some(params(site, psk, nat)),
        tls_token_sha256: None,
    }
}

/// A site's initiator for `p` (the gateway's parameters, turned around).
fn site(p: &IpsecParams, seed: u64, now: Instant) -> ipsec::Tunnel {
    let mine = p.clone().mirrored();
    ipsec::Tunnel::initiator_seeded(
        ipsec::Tunnel::initiator_config(&mine).unwrap(),
        gw_endpoint(),
        1,
        Settings::default(),
        seed,
        now,
    )
}

fn gateway(now: Instant) -> GatewayState<BuiltinIpsec> {
    GatewayState::with_kinds(gw_config(), now)
}

fn drain(t: &mut ipsec::Tunnel) -> Vec<Vec<u8>> {
    let mut buf = vec![0; 65600];
    std::iter::from_fn(|| t.poll_network(&mut buf).map(<[u8]>::to_vec)).collect()
}

/// Delivers `d` from `from` to the shards, the first first, following
/// hand-offs as the data plane's workers do; returns what went out.
fn deliver(
    shards: &mut [GatewayState<BuiltinIpsec>],
    from: SocketAddr,
    d: &[u8],
    now: Instant,
) -> Result<(), DropReason> {
    let mut out = vec![0; BuiltinIpsec::buffer_len(d.len())];
    match shards[0].handle_network_input_into(from, d, &mut out, now) {
        NetworkOutcome::Handoff(s) => {
            match shards[usize::from(s)].handle_handed_over_input_into(from, d, &mut out, now) {
                NetworkOutcome::Dropped(r) => Err(r),
                NetworkOutcome::Handoff(_) => panic!("handed over twice"),
                _ => Ok(()),
            }
        }
        NetworkOutcome::Dropped(r) => Err(r),
        _ => Ok(()),
    }
}

/// Runs the site's IKE exchanges with the gateway; returns the drops.
fn connect_site(
    shards: &mut [GatewayState<BuiltinIpsec>],
    site: &mut ipsec::Tunnel,
    endpoint: SocketAddr,
    now: Instant,
) -> Vec<DropReason> {
    let mut drops = vec![];
    let mut buf = vec![0; 4096];
    let first = site
        .initiate_handshake(&mut buf, true, now)
        .unwrap()
        .unwrap()
        .to_vec();
    assert!(first.starts_with(&IKE_500_TAG));
    let mut to_gw = vec![first];
    for _ in 0..10 {
        for d in std::mem::take(&mut to_gw) {
            if let Err(r) = deliver(shards, endpoint, &d, now) {
                drops.push(r);
            }
        }
        let out: Vec<Transmit> = shards
            .iter_mut()
            .flat_map(|s| std::iter::from_fn(|| s.poll_transmit()).collect::<Vec<_>>())
            .collect();
        for t in out {
            assert_eq!(t.dst, endpoint);
            // The responder's own answers before a peer is known (the
            // IKE_SA_INIT response on 500, a refused IKE_AUTH) carry no
            // kind; the peer's tunnel's answers carry its kind.
            assert!(
                t.kind.is_none() || t.kind == Some(TunnelKind::Ipsec),
                "{:?}",
                t.kind
            );
            if t.payload.starts_with(&IKE_500_TAG) {
                assert_eq!(t.kind, None, "IKE_SA_INIT is the responder's");
            }
            if let Ok(Decapsulated::Network(r)) =
                site.decapsulate(Some(gw_endpoint()), &t.payload, &mut buf, now)
            {
                to_gw.push(r.to_vec());
            }
        }
        to_gw.extend(drain(site));
        if to_gw.is_empty() {
            break;
        }
    }
    drops
}

fn seal(site: &mut ipsec::Tunnel, packet: &[u8], now: Instant) -> Vec<u8> {
    let mut buf = vec![0; BuiltinIpsec::buffer_len(packet.len())];
    match site.encapsulate(packet, &mut buf, now).unwrap() {
        Encapsulated::Network(d) => d.to_vec(),
        Encapsulated::Queued => panic!("no CHILD_SA"),
    }
}

#[test]
fn an_ipsec_site_reaches_its_nat_address_next_to_a_wireguard_site() {
    let now = Instant::now();
    let mut gw = gateway(now);
    let mut wg = Client::<BuiltinIpsec>::new(1, "203.0.113.1:40001");
    let p4 = ipsec_peer(4, PSK_4, "10.64.0.4");
    gw.handle_control(
        &desired(1, vec![wg.peer(1, &["10.64.0.1"]), p4.clone()]),
        now,
    )
    .unwrap();
    let errors = gw
        .handle_control(
            &desired(2, vec![wg.peer(1, &["10.64.0.1"]), p4.clone()]),
            now,
        )
        .unwrap()
        .errors;
    assert_eq!(errors, Vec::<String>::new());
    drain_events(&mut gw);

    let endpoint = addr("198.51.100.4:4500");
    let mut s4 = site(p4.ipsec.as_ref().unwrap(), 4, now);
    let drops = connect_site(std::slice::from_mut(&mut gw), &mut s4, endpoint, now);
    assert_eq!(drops, vec![]);
    assert!(s4.has_session());
    assert!(
        drain_events(&mut gw).contains(&GatewayEvent::HandshakeCompleted {
            site_id: SiteId(4),
            endpoint
        })
    );

    // The center opens a flow to the site's NAT address; the site answers.
    let ping = udp(TECH, "10.64.0.4", b"ping");
    gw.handle_tun_input(&ping, now).unwrap();
    let t = gw.poll_transmit().unwrap();
    assert_eq!(t.dst, endpoint);
    assert_eq!(t.kind, Some(TunnelKind::Ipsec));
    assert!(ipsec::Responder::fast_index(&t.payload).is_some(), "ESP");
    let mut buf = vec![0; 2048];
    match s4.decapsulate(Some(gw_endpoint()), &t.payload, &mut buf, now) {
        Ok(Decapsulated::Tunnel(p)) => assert_eq!(p, &ping[..]),
        other => panic!("site did not get the packet: {other:?}"),
    }
    let pong = udp_reply("10.64.0.4", TECH, b"pong");
    let esp = seal(&mut s4, &pong, now);
    gw.handle_network_input(endpoint, &esp, now).unwrap();
    assert_eq!(gw.poll_tun_output(), Some(pong));
    let view = gw.peers().find(|p| p.site_id == SiteId(4)).unwrap();
    assert_eq!(view.endpoint, Some(endpoint));
    assert_eq!((view.stats.rx_packets, view.stats.tx_packets), (1, 1));

    // The WireGuard site is served as before.
    connect(&mut gw, &mut wg, now);
    let ping1 = udp(TECH, "10.64.0.1", b"wg");
    gw.handle_tun_input(&ping1, now).unwrap();
    let t = gw.poll_transmit().unwrap();
    assert_eq!(t.dst, wg.endpoint);
    assert_eq!(t.kind, Some(TunnelKind::Wireguard));
    assert_eq!(wg.receive(&t.payload), Some(ping1));
}

#[test]
fn ipsec_sites_are_isolated_from_each_other() {
    let now = Instant::now();
    let mut gw = gateway(now);
    let p4 = ipsec_peer(4, PSK_4, "10.64.0.4");
    let p5 = ipsec_peer(5, PSK_5, "10.64.0.5");
    gw.handle_control(&desired(1, vec![p4.clone(), p5.clone()]), now)
        .unwrap();
    let e5 = addr("198.51.100.5:4500");

    // Site 5 claiming site 4's identity with its own key is refused.
    let mut impostor = {
        let mut p = p4.ipsec.clone().unwrap();
        p.psk = PSK_5.to_owned();
        site(&p, 9, now)
    };
    connect_site(std::slice::from_mut(&mut gw), &mut impostor, e5, now);
    assert!(!impostor.has_session());
    assert!(
        !drain_events(&mut gw)
            .iter()
            .any(|e| matches!(e, GatewayEvent::HandshakeCompleted { .. }))
    );

    let mut s5 = site(p5.ipsec.as_ref().unwrap(), 5, now);
    connect_site(std::slice::from_mut(&mut gw), &mut s5, e5, now);
    assert!(s5.has_session());

    // Site 5 with site 4's source, and toward site 4: outside its selectors.
    for packet in [
        udp("10.64.0.4", TECH, b"spoofed"),
        udp("10.64.0.5", "10.64.0.4", b"cross-site"),
    ] {
        let esp = s5.seal_unchecked(&packet).unwrap();
        assert_eq!(
            gw.handle_network_input(e5, &esp, now),
            Err(DropReason::OutsideSelectors)
        );
    }
    let view = gw.peers().find(|p| p.site_id == SiteId(5)).unwrap();
    assert_eq!(view.drops.get(DropReason::OutsideSelectors), 2);
    assert_eq!(gw.poll_tun_output(), None);
    // Site 4 never connected: the center's packets for it go nowhere.
    assert_eq!(
        gw.handle_tun_input(&udp(TECH, "10.64.0.4", b"x"), now),
        Err(DropReason::NoSession)
    );
    assert_eq!(gw.poll_transmit(), None);
}

#[test]
fn ike_auth_on_another_worker_reaches_the_peers_shard() {
    let now = Instant::now();
    let mut shards = GatewayState::<BuiltinIpsec>::shards(gw_config(), 2, now);
    let p5 = ipsec_peer(5, PSK_5, "10.64.0.5");
    for s in &mut shards {
        s.handle_control(&desired(1, vec![p5.clone()]), now)
            .unwrap();
    }
    assert_eq!(Shard::of(2, SiteId(5)), 1);
    let e5 = addr("198.51.100.5:4500");
    let mut s5 = site(p5.ipsec.as_ref().unwrap(), 5, now);
    // Every datagram reaches worker 0 first.
    let drops = connect_site(&mut shards, &mut s5, e5, now);
    assert_eq!(drops, vec![]);
    assert!(s5.has_session());
    assert_eq!(shards[1].peers().next().unwrap().endpoint, Some(e5));
    let pong_flow = udp(TECH, "10.64.0.5", b"ping");
    shards[1].handle_tun_input(&pong_flow, now).unwrap();
    let reply = udp_reply("10.64.0.5", TECH, b"pong");
    let esp = seal(&mut s5, &reply, now);
    let mut out = vec![0; BuiltinIpsec::buffer_len(esp.len())];
    assert_eq!(
        shards[0].handle_network_input_into(e5, &esp, &mut out, now),
        NetworkOutcome::Handoff(1)
    );
    match shards[1].handle_handed_over_input_into(e5, &esp, &mut out, now) {
        NetworkOutcome::Tunnel(p) => assert_eq!(p, &reply[..]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_builtin_gateway_still_refuses_ipsec_sites() {
    let now = Instant::now();
    let mut gw: GatewayState = GatewayState::new(gw_config(), now);
    let applied = gw
        .handle_control(&desired(1, vec![ipsec_peer(4, PSK_4, "10.64.0.4")]), now)
        .unwrap();
    assert_eq!(
        applied.errors,
        vec!["site 4: this gateway cannot run IPsec tunnels".to_owned()]
    );
    // And an IPsec site without usable parameters is refused by one that runs them.
    let mut gw = gateway(now);
    let mut bad = ipsec_peer(4, PSK_4, "10.64.0.4");
    bad.ipsec.as_mut().unwrap().psk = "short".to_owned();
    let mut none = ipsec_peer(6, PSK_5, "10.64.0.6");
    none.ipsec = None;
    let applied = gw
        .handle_control(&desired(1, vec![bad, none]), now)
        .unwrap();
    assert_eq!(applied.errors.len(), 2, "{:?}", applied.errors);
    assert_eq!(gw.peer_count(), 0);
}

#[test]
fn a_reused_slot_never_gets_index_zero() {
    // Slot 0 of the only shard, removed and added again: its index's
    // generation goes round, and the site's ESP must reach it every time.
    let now = Instant::now();
    let mut gw = gateway(now);
    let p4 = ipsec_peer(4, PSK_4, "10.64.0.4");
    let endpoint = addr("198.51.100.4:4500");
    for round in 0..20u64 {
        gw.handle_control(&desired(2 * round + 1, vec![p4.clone()]), now)
            .unwrap();
        let mut s4 = site(p4.ipsec.as_ref().unwrap(), round, now);
        let drops = connect_site(std::slice::from_mut(&mut gw), &mut s4, endpoint, now);
        assert_eq!(drops, vec![], "round {round}");
        let (_, spi_out) = s4.child_spis().unwrap();
        assert_ne!(spi_out & 0x00FF_FFFF, 0, "round {round}: index 0");
        let pong = udp_reply("10.64.0.4", TECH, b"pong");
        // Only a reply passes: open the flow from the center first.
        gw.handle_tun_input(&udp(TECH, "10.64.0.4", b"ping"), now)
            .unwrap();
        let _ = gw.poll_transmit();
        let esp = seal(&mut s4, &pong, now);
        gw.handle_network_input(endpoint, &esp, now).unwrap();
        assert_eq!(gw.poll_tun_output(), Some(pong), "round {round}");
        gw.handle_control(&desired(2 * round + 2, vec![]), now)
            .unwrap();
        drain_events(&mut gw);
    }
}
