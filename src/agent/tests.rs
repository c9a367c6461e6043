//! In-memory tests: the agent against a responder tunnel standing in for
//! the gateway, and against the real [`crate::gateway::GatewayState`]. Every
//! test runs once per tunnel kind ([`crate::tunnel::testing`]): WireGuard and
//! the test-only null kind.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::*;
use crate::gateway::{GatewayConfig, GatewayState};
use crate::messages::{
    AgentDesiredState, AgentMapping, GatewayDesiredState, GatewayPeer, TunnelKind,
};
use crate::tunnel::Responder;
use crate::tunnel::testing::{TestKinds, for_each_kind};
use crate::tunnel::wireguard::Responder as WireguardResponder;
use crate::tunnel::{Decapsulated, Encapsulated};

const GW: &str = "203.0.113.1:51820";
const AGENT: &str = "198.51.100.11:40001";
const NAT: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 5);
const REAL: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
const TECH: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 50);
const WALL: UnixMillis = UnixMillis(1_700_000_000_000);

fn gw_addr() -> SocketAddr {
    GW.parse().unwrap()
}

fn agent_addr() -> SocketAddr {
    AGENT.parse().unwrap()
}

fn name(s: &str) -> TerminalName {
    TerminalName::new(s).unwrap()
}

fn keys() -> (PrivateKey, PrivateKey) {
    (
        PrivateKey::from_bytes([1; 32]),
        PrivateKey::from_bytes([2; 32]),
    )
}

fn agent<K: TestKinds>(mode: DataMode, now: Instant) -> AgentState<K> {
    AgentState::with_kinds(
        AgentConfig {
            site_id: SiteId(3),
            private_key: keys().0,
            mode,
            seed: 42,
            center_prefixes: vec!["172.16.0.0/24".parse().unwrap()],
        },
        now,
    )
}

fn tunnel_to(endpoint: SocketAddr, key: PublicKey) -> AgentTunnel {
    AgentTunnel {
        gateway_id: GatewayId(1),
        kind: TunnelKind::Wireguard,
        endpoint,
        public_key: key,
        persistent_keepalive_s: 25,
        ipsec: None,
        tls: None,
    }
}

fn desired(version: u64, mappings: &[(Ipv4Addr, &str, u64)]) -> AgentDesiredState {
    AgentDesiredState {
        version,
        site_id: SiteId(3),
        tunnel: (!mappings.is_empty()).then(|| tunnel_to(gw_addr(), keys().1.public_key())),
        mappings: mappings
            .iter()
            .map(|(nat, terminal, expires_in_s)| AgentMapping {
                nat_address: *nat,
                terminal: name(terminal),
                request_id: RequestId(17),
                expires_at: UnixMillis(WALL.0 + expires_in_s * 1000),
            })
            .collect(),
        problem: None,
        rotation: None,
    }
}

fn names() -> BTreeMap<TerminalName, Ipv4Addr> {
    [
        (name("pc-1"), REAL),
        (name("pc-2"), Ipv4Addr::new(192, 168, 1, 11)),
    ]
    .into_iter()
    .collect()
}

fn udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    etherparse::PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
        .udp(sport, dport)
        .write(&mut p, payload)
        .unwrap();
    p
}

fn events<K: Kinds>(a: &mut AgentState<K>) -> Vec<AgentEvent> {
    std::iter::from_fn(|| a.poll_event()).collect()
}

fn transmits<K: Kinds>(a: &mut AgentState<K>) -> Vec<Transmit> {
    std::iter::from_fn(|| a.poll_transmit()).collect()
}

/// A responder tunnel with the gateway's key, and the agent connected to it.
struct Pair<K: TestKinds> {
    agent: AgentState<K>,
    gw: K::Tunnel,
    now: Instant,
}

impl<K: TestKinds> Pair<K> {
    fn new(mode: DataMode) -> Self {
        let now = Instant::now();
        let mut agent = agent::<K>(mode, now);
        let a = agent
            .handle_desired_state(&desired(1, &[(NAT, "pc-1", 3600)]), &names(), now, WALL)
            .unwrap();
        assert!(a.errors.is_empty(), "{:?}", a.errors);
        let gw = K::Responder::new(keys().1, WireguardResponder::DEFAULT_HANDSHAKE_LIMIT)
            .tunnel(
                &GatewayPeer {
                    site_id: SiteId(3),
                    public_key: keys().0.public_key(),
                    nat_addresses: vec![NAT],
                    tunnel: TunnelKind::Wireguard,
                    ipsec: None,
                    tls_token_sha256: None,
                },
                9,
                now,
            )
            .unwrap();
        let mut pair = Self { agent, gw, now };
        pair.handshake();
        pair
    }

    fn handshake(&mut self) {
        let t = transmits(&mut self.agent);
        assert_eq!(t.len(), 1, "one handshake initiation");
        assert_eq!(t[0].dst, gw_addr());
        let mut buf = vec![0; 2048];
        let Decapsulated::Network(resp) = self
            .gw
            .decapsulate(None, &t[0].payload, &mut buf, self.now)
            .unwrap()
        else {
            panic!("no handshake response")
        };
        let resp = resp.to_vec();
        let mut out = vec![0; 2048];
        let r = self
            .agent
            .handle_network_input_into(gw_addr(), &resp, &mut out, self.now);
        assert_eq!(r, NetworkOutcome::Consumed);
        // The agent confirms the session with a keepalive.
        for t in transmits(&mut self.agent) {
            let _ = self.gw.decapsulate(None, &t.payload, &mut buf, self.now);
        }
        assert!(self.agent.tunnel().unwrap().up);
        assert!(events(&mut self.agent).contains(&AgentEvent::TunnelUp {
            gateway_id: GatewayId(1)
        }));
    }

    /// The gateway encrypts `inner`; the agent processes it.
    fn gateway_sends(&mut self, inner: &[u8]) -> Result<Vec<u8>, DropReason> {
        let mut buf = vec![0; 70000];
        let Encapsulated::Network(d) = self.gw.encapsulate(inner, &mut buf, self.now).unwrap()
        else {
            panic!("gateway has no session")
        };
        let d = d.to_vec();
        let mut out = vec![0; 70000];
        match self
            .agent
            .handle_network_input_into(gw_addr(), &d, &mut out, self.now)
        {
            NetworkOutcome::Lan(p) => Ok(p.to_vec()),
            NetworkOutcome::Dropped(r) => Err(r),
            NetworkOutcome::Consumed => panic!("data consumed"),
        }
    }

    /// The agent encrypts a LAN packet; the gateway decrypts it.
    fn lan_sends(&mut self, lan: &[u8]) -> Result<Vec<u8>, DropReason> {
        let mut p = lan.to_vec();
        let mut out = vec![0; 70000];
        match self.agent.handle_lan_input_into(&mut p, &mut out, self.now) {
            LanOutcome::Send { dst, datagram } => {
                assert_eq!(dst, gw_addr());
                let d = datagram.to_vec();
                let mut buf = vec![0; 70000];
                match self.gw.decapsulate(None, &d, &mut buf, self.now).unwrap() {
                    Decapsulated::Tunnel(p) => Ok(p.to_vec()),
                    other => panic!("{other:?}"),
                }
            }
            LanOutcome::Dropped(r) => Err(r),
            LanOutcome::Queued => panic!("queued"),
        }
    }
}

fn mapping_is_installed_and_the_gateway_dialled<K: TestKinds>() {
    let now = Instant::now();
    let mut a = agent::<K>(DataMode::Packet { masquerade: None }, now);
    let applied = a
        .handle_desired_state(&desired(4, &[(NAT, "pc-1", 60)]), &names(), now, WALL)
        .unwrap();
    assert_eq!(applied.version, 4);
    assert!(applied.errors.is_empty());
    assert_eq!(
        events(&mut a),
        vec![
            AgentEvent::MappingInstalled {
                nat: NAT,
                real: REAL,
                terminal: name("pc-1")
            },
            AgentEvent::TunnelDialled {
                gateway_id: GatewayId(1),
                endpoint: gw_addr()
            },
        ]
    );
    let t = transmits(&mut a);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].payload[0], 1, "a handshake initiation");
    let m: Vec<_> = a.mappings().collect();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].expires_at, UnixMillis(WALL.0 + 60_000));
    assert!(a.is_mapped(NAT, now));
    // The expiry is a timer.
    assert!(a.poll_timeout().unwrap() <= now + Duration::from_secs(60));
}

fn packet_mode_rewrites_both_ways<K: TestKinds>() {
    let mut p = Pair::<K>::new(DataMode::Packet { masquerade: None });
    let lan = p
        .gateway_sends(&udp(TECH, NAT, 4000, 53, b"query"))
        .unwrap();
    assert_eq!(&lan[16..20], &REAL.octets(), "destination rewritten");
    assert_eq!(&lan[12..16], &TECH.octets());
    let back = p.lan_sends(&udp(REAL, TECH, 53, 4000, b"answer")).unwrap();
    assert_eq!(&back[12..16], &NAT.octets(), "source rewritten");
    let c = p.agent.counters();
    assert_eq!((c.to_lan_packets, c.to_tunnel_packets), (1, 1));
}

fn unmapped_destinations_and_sources_are_dropped_and_counted<K: TestKinds>() {
    let mut p = Pair::<K>::new(DataMode::Packet { masquerade: None });
    let other = Ipv4Addr::new(10, 64, 0, 6);
    assert_eq!(
        p.gateway_sends(&udp(TECH, other, 1, 2, b"x")),
        Err(DropReason::NotMapped)
    );
    assert_eq!(
        p.gateway_sends(&udp(TECH, REAL, 1, 2, b"x")),
        Err(DropReason::NotMapped),
        "a real LAN address is never reachable directly"
    );
    assert_eq!(
        p.lan_sends(&udp(Ipv4Addr::new(192, 168, 1, 99), TECH, 1, 2, b"x")),
        Err(DropReason::UnmappedSource)
    );
    assert_eq!(p.agent.counters().drops.get(DropReason::NotMapped), 2);
    assert_eq!(p.agent.counters().drops.get(DropReason::UnmappedSource), 1);
    // Still working.
    assert!(p.gateway_sends(&udp(TECH, NAT, 1, 2, b"x")).is_ok());
}

fn malformed_tunnel_input_is_dropped_and_counted_without_harm<K: TestKinds>() {
    let mut p = Pair::<K>::new(DataMode::Packet { masquerade: None });
    let mut out = vec![0; 4096];
    let now = p.now;
    // Garbage datagrams from the gateway's address.
    for junk in [
        &[][..],
        &[4u8][..],
        &[4, 0, 0, 0, 1, 2, 3][..],
        &[0xa5; 200][..],
    ] {
        assert!(matches!(
            p.agent
                .handle_network_input_into(gw_addr(), junk, &mut out, now),
            NetworkOutcome::Dropped(_)
        ));
    }
    // From an unknown sender.
    assert_eq!(
        p.agent
            .handle_network_input_into(agent_addr(), &[4u8; 64], &mut out, now),
        NetworkOutcome::Dropped(DropReason::UnknownSender)
    );
    // Authenticated but nonsense inside: truncated IPv4, IPv6, bad header checksum.
    let good = udp(TECH, NAT, 1, 2, b"hello");
    assert!(p.gateway_sends(&good[..10]).is_err());
    let mut v6 = vec![0u8; 40];
    v6[0] = 0x60;
    assert!(p.gateway_sends(&v6).is_err());
    let mut bad_sum = good.clone();
    bad_sum[10] ^= 0xff;
    assert!(p.gateway_sends(&bad_sum).is_err());
    let drops = p.agent.counters().drops.total();
    assert!(drops >= 8, "{:?}", p.agent.counters());
    // The tunnel and the mapping still work.
    assert!(p.gateway_sends(&good).is_ok());
}

fn netstack_mode_keeps_addresses_and_checks_both_directions<K: TestKinds>() {
    let mut p = Pair::<K>::new(DataMode::Netstack);
    let lan = p.gateway_sends(&udp(TECH, NAT, 4000, 53, b"q")).unwrap();
    assert_eq!(
        &lan[16..20],
        &NAT.octets(),
        "the userspace stack gets the NAT address"
    );
    assert_eq!(
        p.gateway_sends(&udp(TECH, Ipv4Addr::new(10, 64, 0, 6), 1, 2, b"x")),
        Err(DropReason::NotMapped)
    );
    let mut bad_sum = udp(TECH, NAT, 1, 2, b"x");
    bad_sum[10] ^= 0xff;
    assert_eq!(p.gateway_sends(&bad_sum), Err(DropReason::BadHeader));
    assert!(p.lan_sends(&udp(NAT, TECH, 53, 4000, b"a")).is_ok());
    assert_eq!(
        p.lan_sends(&udp(REAL, TECH, 53, 4000, b"a")),
        Err(DropReason::UnmappedSource)
    );
}

fn expired_mapping_is_removed_by_the_agent_itself<K: TestKinds>() {
    let mut p = Pair::<K>::new(DataMode::Packet { masquerade: None });
    let _ = events(&mut p.agent);
    let expiry = p.now + Duration::from_secs(3600);
    assert!(p.agent.poll_timeout().unwrap() <= expiry);
    // No server involved: only time passes.
    p.agent.handle_timeout(expiry - Duration::from_millis(1));
    assert!(p.agent.is_mapped(NAT, expiry - Duration::from_millis(1)));
    p.agent.handle_timeout(expiry);
    let ev = events(&mut p.agent);
    assert!(ev.contains(&AgentEvent::MappingRemoved {
        nat: NAT,
        real: REAL,
        terminal: name("pc-1"),
        because: RemovedBecause::Expired
    }));
    assert!(ev.contains(&AgentEvent::TunnelClosed {
        gateway_id: GatewayId(1)
    }));
    assert_eq!(p.agent.mappings().count(), 0);
    assert_eq!(p.agent.counters().mappings_expired, 1);
    assert!(p.agent.tunnel().is_none());
    let mut out = vec![0; 4096];
    assert_eq!(
        p.agent
            .handle_network_input_into(gw_addr(), &[4; 64], &mut out, expiry),
        NetworkOutcome::Dropped(DropReason::NoTunnel)
    );
}

fn a_packet_after_expiry_is_dropped_even_before_the_timer_runs<K: TestKinds>() {
    let mut p = Pair::<K>::new(DataMode::Netstack);
    p.now += Duration::from_secs(3601);
    assert_eq!(
        p.gateway_sends(&udp(TECH, NAT, 1, 2, b"x")),
        Err(DropReason::Expired)
    );
}

fn withdrawn_mappings_are_removed_and_the_tunnel_torn_down<K: TestKinds>() {
    let mut p = Pair::<K>::new(DataMode::Packet { masquerade: None });
    let _ = events(&mut p.agent);
    let now = p.now;
    p.agent
        .handle_desired_state(&desired(2, &[]), &names(), now, WALL)
        .unwrap();
    let ev = events(&mut p.agent);
    assert_eq!(
        ev,
        vec![
            AgentEvent::MappingRemoved {
                nat: NAT,
                real: REAL,
                terminal: name("pc-1"),
                because: RemovedBecause::Withdrawn
            },
            AgentEvent::TunnelClosed {
                gateway_id: GatewayId(1)
            },
        ]
    );
    assert!(p.agent.tunnel().is_none());
    assert_eq!(p.agent.poll_timeout(), None);
}

fn a_new_gateway_is_dialled_after_failover_and_mappings_stay<K: TestKinds>() {
    let mut p = Pair::<K>::new(DataMode::Packet { masquerade: None });
    let _ = events(&mut p.agent);
    let now = p.now;
    let mut d = desired(2, &[(NAT, "pc-1", 3600)]);
    let new_gw: SocketAddr = "203.0.113.2:51820".parse().unwrap();
    d.tunnel = Some(AgentTunnel {
        gateway_id: GatewayId(2),
        ..tunnel_to(new_gw, PrivateKey::from_bytes([5; 32]).public_key())
    });
    p.agent
        .handle_desired_state(&d, &names(), now, WALL)
        .unwrap();
    assert_eq!(
        events(&mut p.agent),
        vec![
            AgentEvent::TunnelClosed {
                gateway_id: GatewayId(1)
            },
            AgentEvent::TunnelDialled {
                gateway_id: GatewayId(2),
                endpoint: new_gw
            },
        ]
    );
    let t = transmits(&mut p.agent);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].dst, new_gw);
    assert_eq!(p.agent.mappings().count(), 1);
}

fn stale_foreign_and_broken_documents<K: TestKinds>() {
    let now = Instant::now();
    let mut a = agent::<K>(DataMode::Netstack, now);
    assert!(
        a.handle_desired_state(&desired(5, &[(NAT, "pc-1", 60)]), &names(), now, WALL)
            .is_some()
    );
    assert!(
        a.handle_desired_state(&desired(5, &[]), &names(), now, WALL)
            .is_none(),
        "same version"
    );
    assert!(
        a.handle_desired_state(&desired(4, &[]), &names(), now, WALL)
            .is_none(),
        "older"
    );
    let mut foreign = desired(9, &[]);
    foreign.site_id = SiteId(4);
    assert!(
        a.handle_desired_state(&foreign, &names(), now, WALL)
            .is_none()
    );
    assert_eq!(a.mappings().count(), 1);
    // An unresolvable terminal, a real address mapped twice, an expired one.
    let applied = a
        .handle_desired_state(
            &desired(
                6,
                &[
                    (NAT, "pc-1", 60),
                    (Ipv4Addr::new(10, 64, 0, 7), "ghost", 60),
                    (Ipv4Addr::new(10, 64, 0, 8), "pc-1", 60),
                    (Ipv4Addr::new(10, 64, 0, 9), "pc-2", 0),
                ],
            ),
            &names(),
            now,
            WALL,
        )
        .unwrap();
    assert_eq!(applied.errors.len(), 2, "{:?}", applied.errors);
    assert!(applied.errors[0].contains("ghost"));
    let nats: Vec<_> = a.mappings().map(|m| m.nat).collect();
    assert_eq!(nats, vec![NAT]);
}

fn a_terminal_that_moves_is_remapped<K: TestKinds>() {
    let now = Instant::now();
    let mut a = agent::<K>(DataMode::Packet { masquerade: None }, now);
    a.handle_desired_state(&desired(1, &[(NAT, "pc-1", 60)]), &names(), now, WALL)
        .unwrap();
    let _ = events(&mut a);
    let mut moved = names();
    moved.insert(name("pc-1"), Ipv4Addr::new(192, 168, 1, 50));
    a.handle_desired_state(&desired(2, &[(NAT, "pc-1", 60)]), &moved, now, WALL)
        .unwrap();
    let ev = events(&mut a);
    assert!(matches!(
        ev[0],
        AgentEvent::MappingRemoved {
            because: RemovedBecause::Replaced,
            ..
        }
    ));
    assert!(
        matches!(ev[1], AgentEvent::MappingInstalled { real, .. } if real == Ipv4Addr::new(192, 168, 1, 50))
    );
    // The tunnel stays.
    assert!(a.tunnel().is_some());
}

fn a_terminal_that_moves_between_documents_keeps_its_nat_address<K: TestKinds>() {
    let moved_to = Ipv4Addr::new(192, 168, 1, 50);
    for mode in [DataMode::Packet { masquerade: None }, DataMode::Netstack] {
        let mut p = Pair::<K>::new(mode);
        let _ = events(&mut p.agent);
        // Another terminal's real address is never taken over (1:1 NAT).
        p.agent
            .handle_desired_state(
                &desired(
                    2,
                    &[
                        (NAT, "pc-1", 3600),
                        (Ipv4Addr::new(10, 64, 0, 6), "pc-2", 3600),
                    ],
                ),
                &names(),
                p.now,
                WALL,
            )
            .unwrap();
        let _ = events(&mut p.agent);
        assert_eq!(
            p.agent
                .move_terminal(&name("pc-1"), Ipv4Addr::new(192, 168, 1, 11)),
            0
        );
        assert_eq!(p.agent.move_terminal(&name("pc-1"), REAL), 0, "no change");
        assert_eq!(p.agent.move_terminal(&name("pc-1"), moved_to), 1);
        let ev = events(&mut p.agent);
        assert!(matches!(
            ev[0],
            AgentEvent::MappingRemoved {
                because: RemovedBecause::Replaced,
                ..
            }
        ));
        assert_eq!(
            ev[1],
            AgentEvent::MappingInstalled {
                nat: NAT,
                real: moved_to,
                terminal: name("pc-1")
            }
        );
        let m = p.agent.mappings().find(|m| m.nat == NAT).unwrap();
        assert_eq!((m.real, m.request_id), (moved_to, RequestId(17)));
        assert!(p.agent.tunnel().unwrap().up, "the tunnel stays");
        if mode != DataMode::Netstack {
            let lan = p.gateway_sends(&udp(TECH, NAT, 4000, 53, b"q")).unwrap();
            assert_eq!(&lan[16..20], &moved_to.octets(), "to the new address");
            let back = p.lan_sends(&udp(moved_to, TECH, 53, 4000, b"a")).unwrap();
            assert_eq!(&back[12..16], &NAT.octets(), "the same NAT address");
            assert_eq!(
                p.lan_sends(&udp(REAL, TECH, 53, 4000, b"a")),
                Err(DropReason::UnmappedSource),
                "the old address no longer passes"
            );
        }
    }
}

fn through_the_real_gateway_state<K: TestKinds>() {
    let now = Instant::now();
    let mut gw = GatewayState::<K>::with_kinds(GatewayConfig::new(keys().1), now);
    gw.handle_control(
        &GatewayDesiredState {
            next_keys: Vec::new(),
            version: 1,
            gateway_id: GatewayId(1),
            allowed_sources: Vec::new(),
            key_rotation: None,
            peers: vec![GatewayPeer {
                site_id: SiteId(3),
                public_key: keys().0.public_key(),
                nat_addresses: vec![NAT],
                tunnel: TunnelKind::Wireguard,
                ipsec: None,
                tls_token_sha256: None,
            }],
        },
        now,
    );
    let mut a = agent::<K>(DataMode::Packet { masquerade: None }, now);
    a.handle_desired_state(&desired(1, &[(NAT, "pc-1", 60)]), &names(), now, WALL)
        .unwrap();
    // Shuttle datagrams until both sides are quiet.
    let shuttle = |a: &mut AgentState<K>, gw: &mut GatewayState<K>| {
        let mut lan = Vec::new();
        let mut center = Vec::new();
        for _ in 0..10 {
            let mut moved = false;
            while let Some(t) = a.poll_transmit() {
                moved = true;
                let mut out = vec![0; 70000];
                if let crate::gateway::NetworkOutcome::Tunnel(p) =
                    gw.handle_network_input_into(agent_addr(), &t.payload, &mut out, now)
                {
                    center.push(p.to_vec());
                }
            }
            while let Some(t) = gw.poll_transmit() {
                moved = true;
                let mut out = vec![0; 70000];
                if let NetworkOutcome::Lan(p) =
                    a.handle_network_input_into(gw_addr(), &t.payload, &mut out, now)
                {
                    lan.push(p.to_vec());
                }
            }
            if !moved {
                break;
            }
        }
        (lan, center)
    };
    shuttle(&mut a, &mut gw);
    assert!(a.tunnel().unwrap().up);
    // Technician → NAT address, through the gateway's TUN side.
    let mut out = vec![0; 70000];
    let request = udp(TECH, NAT, 5000, 7, b"ping");
    let crate::gateway::TunOutcome::Send { datagram, .. } =
        gw.handle_tun_input_into(&request, &mut out, now)
    else {
        panic!("gateway did not send")
    };
    let datagram = datagram.to_vec();
    let mut lan_buf = vec![0; 70000];
    let NetworkOutcome::Lan(lan) =
        a.handle_network_input_into(gw_addr(), &datagram, &mut lan_buf, now)
    else {
        panic!("agent did not forward")
    };
    assert_eq!(&lan[16..20], &REAL.octets());
    // The PC answers; the gateway accepts it as coming from the site's NAT address.
    let mut reply = udp(REAL, TECH, 7, 5000, b"pong");
    let mut enc = vec![0; 70000];
    let LanOutcome::Send { datagram, .. } = a.handle_lan_input_into(&mut reply, &mut enc, now)
    else {
        panic!("agent did not send")
    };
    let datagram = datagram.to_vec();
    let mut center = vec![0; 70000];
    let crate::gateway::NetworkOutcome::Tunnel(p) =
        gw.handle_network_input_into(agent_addr(), &datagram, &mut center, now)
    else {
        panic!("gateway refused the reply")
    };
    assert_eq!(&p[12..16], &NAT.octets());
    assert_eq!(&p[16..20], &TECH.octets());
}

fn tcp_seg(
    (src, sport): (Ipv4Addr, u16),
    (dst, dport): (Ipv4Addr, u16),
    seq: u32,
    ack: Option<u32>,
    syn: bool,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = etherparse::PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, seq, 64240);
    if syn {
        b = b.syn();
    }
    if let Some(a) = ack {
        b = b.ack(a);
    }
    let mut p = Vec::new();
    b.write(&mut p, payload).unwrap();
    p
}

/// Sequence and acknowledgement numbers, payload; the IPv4 and TCP
/// checksums must be right.
fn tcp_fields(p: &[u8]) -> (u32, u32, Vec<u8>) {
    assert_eq!(crate::ipv4::checksum(&p[..20]), 0, "IPv4 header checksum");
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    assert_eq!(total, p.len());
    let seg = &p[20..total];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&p[12..20]);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(seg);
    assert_eq!(crate::ipv4::checksum(&pseudo), 0, "TCP checksum");
    let thl = usize::from(seg[12] >> 4) * 4;
    (
        u32::from_be_bytes(seg[4..8].try_into().unwrap()),
        u32::from_be_bytes(seg[8..12].try_into().unwrap()),
        seg[thl..].to_vec(),
    )
}

/// Packet mode: the PC's `227` reply names its NAT address toward the
/// technician; the shorter line shifts the PC's later sequence numbers and,
/// back the other way, the technician's acknowledgements. With and without
/// masquerade.
fn packet_mode_ftp_pasv_reply_names_the_nat_address<K: TestKinds>() {
    for masquerade in [None, Some(Ipv4Addr::new(192, 168, 1, 250))] {
        let mut p = Pair::<K>::new(DataMode::Packet { masquerade });
        let tech = (TECH, 50000);
        let syn = tcp_seg(tech, (NAT, 21), 1000, None, true, b"");
        let lan = p.gateway_sends(&syn).unwrap();
        // The PC answers whoever the NAT made the technician.
        let peer = (
            Ipv4Addr::from(<[u8; 4]>::try_from(&lan[12..16]).unwrap()),
            u16::from_be_bytes([lan[20], lan[21]]),
        );
        let pc = (REAL, 21);
        p.lan_sends(&tcp_seg(pc, peer, 5000, Some(1001), true, b""))
            .unwrap();
        let reply = b"227 Entering Passive Mode (192,168,1,10,195,80).\r\n";
        let back = p
            .lan_sends(&tcp_seg(pc, peer, 5001, Some(1001), false, reply))
            .unwrap();
        let want = b"227 Entering Passive Mode (10,64,0,5,195,80).\r\n";
        assert_eq!(tcp_fields(&back), (5001, 1001, want.to_vec()));
        assert_eq!(&back[12..16], &NAT.octets());
        assert_eq!(&back[16..20], &TECH.octets());
        // The PC's next segment is 3 bytes earlier for the technician …
        let next = 5001 + reply.len() as u32;
        let back = p
            .lan_sends(&tcp_seg(pc, peer, next, Some(1001), false, b"150 ok\r\n"))
            .unwrap();
        assert_eq!(tcp_fields(&back).0, next - 3);
        // … and the technician's acknowledgement of it 3 bytes later for the PC.
        let ack = next - 3 + 8;
        let lan = p
            .gateway_sends(&tcp_seg(tech, (NAT, 21), 1001, Some(ack), false, b""))
            .unwrap();
        assert_eq!(tcp_fields(&lan).1, next + 8);
        let c = p.agent.counters().ftp;
        assert_eq!((c.rewritten, c.split_lines), (1, 0), "{masquerade:?}");
        // The technician's PORT naming its own address passes unchanged.
        let port = b"PORT 172,16,0,50,156,65\r\n";
        let lan = p
            .gateway_sends(&tcp_seg(tech, (NAT, 21), 1001, Some(ack), false, port))
            .unwrap();
        assert_eq!(tcp_fields(&lan).2, port.to_vec());
    }
}

/// What the ALG cannot rewrite passes unchanged and is counted: a `227`
/// line cut across two segments.
fn packet_mode_ftp_lines_the_alg_cannot_rewrite_are_counted<K: TestKinds>() {
    let mut p = Pair::<K>::new(DataMode::Packet { masquerade: None });
    let (tech, pc) = ((TECH, 50000), (REAL, 21));
    p.gateway_sends(&tcp_seg(tech, (NAT, 21), 1000, None, true, b""))
        .unwrap();
    p.lan_sends(&tcp_seg(pc, tech, 5000, Some(1001), true, b""))
        .unwrap();
    let first = b"227 Entering Passive Mode (192,168,";
    let back = p
        .lan_sends(&tcp_seg(pc, tech, 5001, Some(1001), false, first))
        .unwrap();
    assert_eq!(tcp_fields(&back).2, first.to_vec());
    let rest = b"1,10,195,80).\r\n";
    let back = p
        .lan_sends(&tcp_seg(pc, tech, 5001 + 35, Some(1001), false, rest))
        .unwrap();
    assert_eq!(tcp_fields(&back).2, rest.to_vec());
    let c = p.agent.counters().ftp;
    assert_eq!((c.rewritten, c.split_lines), (0, 1));
}

/// Active-mode FTP through the agent and the real gateway state: the PC's
/// data connection toward the technician passes the gateway only after the
/// technician's `PORT` named that address and port, and only once.
fn security_active_ftp_through_the_real_gateway_state<K: TestKinds>() {
    let now = Instant::now();
    let mut gw = GatewayState::<K>::with_kinds(GatewayConfig::new(keys().1), now);
    gw.handle_control(
        &GatewayDesiredState {
            next_keys: Vec::new(),
            version: 1,
            gateway_id: GatewayId(1),
            allowed_sources: Vec::new(),
            key_rotation: None,
            peers: vec![GatewayPeer {
                site_id: SiteId(3),
                public_key: keys().0.public_key(),
                nat_addresses: vec![NAT],
                tunnel: TunnelKind::Wireguard,
                ipsec: None,
                tls_token_sha256: None,
            }],
        },
        now,
    );
    let mut a = agent::<K>(DataMode::Packet { masquerade: None }, now);
    a.handle_desired_state(&desired(1, &[(NAT, "pc-1", 60)]), &names(), now, WALL)
        .unwrap();
    for _ in 0..10 {
        let mut moved = false;
        while let Some(t) = a.poll_transmit() {
            moved = true;
            let mut out = vec![0; 70000];
            let _ = gw.handle_network_input_into(agent_addr(), &t.payload, &mut out, now);
        }
        while let Some(t) = gw.poll_transmit() {
            moved = true;
            let mut out = vec![0; 70000];
            let _ = a.handle_network_input_into(gw_addr(), &t.payload, &mut out, now);
        }
        if !moved {
            break;
        }
    }
    assert!(a.tunnel().unwrap().up);
    // Technician → gateway TUN → tunnel → agent → LAN.
    let to_pc = |gw: &mut GatewayState<K>, a: &mut AgentState<K>, packet: &[u8]| {
        let mut out = vec![0; 70000];
        let crate::gateway::TunOutcome::Send { datagram, .. } =
            gw.handle_tun_input_into(packet, &mut out, now)
        else {
            panic!("gateway did not send")
        };
        let datagram = datagram.to_vec();
        let mut lan = vec![0; 70000];
        let NetworkOutcome::Lan(p) =
            a.handle_network_input_into(gw_addr(), &datagram, &mut lan, now)
        else {
            panic!("agent did not forward")
        };
        p.to_vec()
    };
    // PC → agent → tunnel → gateway: what the gateway makes of it.
    let to_center = |gw: &mut GatewayState<K>, a: &mut AgentState<K>, packet: &[u8]| {
        let mut packet = packet.to_vec();
        let mut enc = vec![0; 70000];
        let LanOutcome::Send { datagram, .. } = a.handle_lan_input_into(&mut packet, &mut enc, now)
        else {
            panic!("agent did not send")
        };
        let datagram = datagram.to_vec();
        let mut out = vec![0; 70000];
        match gw.handle_network_input_into(agent_addr(), &datagram, &mut out, now) {
            crate::gateway::NetworkOutcome::Tunnel(p) => Ok(p.to_vec()),
            crate::gateway::NetworkOutcome::Dropped(r) => Err(r),
            other => panic!("{other:?}"),
        }
    };
    let tech = (TECH, 50000);
    let data = (TECH, 40001);
    let pc_data = (REAL, 20);
    // Before any PORT, the PC's SYN toward the technician is refused.
    assert_eq!(
        to_center(&mut gw, &mut a, &tcp_seg(pc_data, data, 1, None, true, b"")),
        Err(crate::gateway::DropReason::SiteInitiated)
    );
    to_pc(
        &mut gw,
        &mut a,
        &tcp_seg(tech, (NAT, 21), 1000, None, true, b""),
    );
    to_center(
        &mut gw,
        &mut a,
        &tcp_seg((REAL, 21), tech, 5000, Some(1001), true, b""),
    )
    .unwrap();
    let lan = to_pc(
        &mut gw,
        &mut a,
        &tcp_seg(
            tech,
            (NAT, 21),
            1001,
            Some(5001),
            false,
            b"PORT 172,16,0,50,156,65\r\n",
        ),
    );
    assert!(lan.ends_with(b"PORT 172,16,0,50,156,65\r\n"));
    // Now the PC's data connection comes through, from its NAT address.
    let syn = to_center(&mut gw, &mut a, &tcp_seg(pc_data, data, 1, None, true, b"")).unwrap();
    assert_eq!(&syn[12..16], &NAT.octets());
    to_pc(
        &mut gw,
        &mut a,
        &tcp_seg(data, (NAT, 20), 9, Some(2), true, b""),
    );
    to_center(
        &mut gw,
        &mut a,
        &tcp_seg(pc_data, data, 2, Some(10), false, b"file"),
    )
    .unwrap();
    // Once: a second connection (another source port) is refused.
    assert_eq!(
        to_center(
            &mut gw,
            &mut a,
            &tcp_seg((REAL, 21000), data, 1, None, true, b"")
        ),
        Err(crate::gateway::DropReason::SiteInitiated)
    );
    assert_eq!(gw.counters().ftp_expectations.used, 1);
}

/// Only technicians' packets reach the LAN side, in both data modes: a
/// gateway (or anyone holding its key) cannot send from another source.
fn security_tunnel_sources_outside_the_center_prefixes_are_dropped<K: TestKinds>() {
    for mode in [DataMode::Packet { masquerade: None }, DataMode::Netstack] {
        let mut p = Pair::<K>::new(mode);
        for src in ["172.16.1.50", "10.64.0.9", "192.168.1.20", "203.0.113.1"] {
            let src: Ipv4Addr = src.parse().unwrap();
            assert_eq!(
                p.gateway_sends(&udp(src, NAT, 1, 2, b"x")),
                Err(DropReason::NotTechnician),
                "{src} in {mode:?}"
            );
        }
        assert_eq!(p.agent.counters().drops.get(DropReason::NotTechnician), 4);
        assert!(p.gateway_sends(&udp(TECH, NAT, 1, 2, b"x")).is_ok());
    }
}

fn end_access_now_works_without_the_server_and_sticks<K: TestKinds>() {
    let mut p = Pair::<K>::new(DataMode::Packet { masquerade: None });
    let _ = events(&mut p.agent);
    let now = p.now;
    assert_eq!(p.agent.revoke_request(RequestId(17), now), 1);
    assert!(events(&mut p.agent).contains(&AgentEvent::MappingRemoved {
        nat: NAT,
        real: REAL,
        terminal: name("pc-1"),
        because: RemovedBecause::Revoked
    }));
    assert!(p.agent.tunnel().is_none());
    // The server, not told yet, still lists the mapping: it stays off.
    p.agent
        .handle_desired_state(&desired(2, &[(NAT, "pc-1", 3600)]), &names(), now, WALL)
        .unwrap();
    assert_eq!(p.agent.mappings().count(), 0);
    assert_eq!(p.agent.revoke_request(RequestId(99), now), 0);
}

fn security_only_requests_made_here_are_installed_when_consent_is_required<K: TestKinds>() {
    let now = Instant::now();
    let mut a = agent::<K>(DataMode::Packet { masquerade: None }, now);
    a.require_consent(true);
    a.consent_to(RequestId(17));
    let mut d = desired(1, &[(NAT, "pc-1", 3600)]);
    // A request the customer never made here (the server's own, or forged).
    d.mappings.push(AgentMapping {
        nat_address: Ipv4Addr::new(10, 64, 0, 6),
        terminal: name("pc-2"),
        request_id: RequestId(18),
        expires_at: UnixMillis(WALL.0 + 3_600_000),
    });
    let applied = a.handle_desired_state(&d, &names(), now, WALL).unwrap();
    let installed: Vec<_> = a.mappings().map(|m| m.request_id).collect();
    assert_eq!(installed, vec![RequestId(17)]);
    assert_eq!(applied.errors.len(), 1, "{:?}", applied.errors);
    assert!(
        applied.errors[0].contains("request 18") && applied.errors[0].contains("not installed"),
        "{:?}",
        applied.errors
    );
    // Once the customer consents, the next document installs it.
    a.consent_to(RequestId(18));
    d.version = 2;
    a.handle_desired_state(&d, &names(), now, WALL).unwrap();
    assert_eq!(a.mappings().count(), 2);
}

/// Given an IPsec tunnel (no kind set runs one yet), the agent dials
/// nothing and says why in its applied state; its mappings stay installed.
fn an_ipsec_tunnel_is_refused_with_a_clear_error<K: TestKinds>() {
    let now = Instant::now();
    let mut a = agent::<K>(DataMode::Packet { masquerade: None }, now);
    let mut d = desired(1, &[(NAT, "pc-1", 3600)]);
    if let Some(t) = d.tunnel.as_mut() {
        t.kind = TunnelKind::Ipsec;
        t.endpoint = SocketAddr::new(gw_addr().ip(), crate::messages::IKE_PORT);
    }
    let applied = a.handle_desired_state(&d, &names(), now, WALL).unwrap();
    assert_eq!(
        applied.errors,
        vec!["this router agent cannot run IPsec tunnels yet".to_owned()]
    );
    assert!(a.tunnel().is_none());
    assert!(transmits(&mut a).is_empty());
    assert!(
        !events(&mut a)
            .iter()
            .any(|e| matches!(e, AgentEvent::TunnelDialled { .. }))
    );
    // Back to WireGuard: dialled.
    let applied = a
        .handle_desired_state(&desired(2, &[(NAT, "pc-1", 3600)]), &names(), now, WALL)
        .unwrap();
    assert!(applied.errors.is_empty(), "{:?}", applied.errors);
    assert!(a.tunnel().is_some());
}

for_each_kind! {
    packet_mode_ftp_pasv_reply_names_the_nat_address,
    packet_mode_ftp_lines_the_alg_cannot_rewrite_are_counted,
    security_active_ftp_through_the_real_gateway_state,
    an_ipsec_tunnel_is_refused_with_a_clear_error,
    security_only_requests_made_here_are_installed_when_consent_is_required,
    mapping_is_installed_and_the_gateway_dialled,
    packet_mode_rewrites_both_ways,
    unmapped_destinations_and_sources_are_dropped_and_counted,
    malformed_tunnel_input_is_dropped_and_counted_without_harm,
    netstack_mode_keeps_addresses_and_checks_both_directions,
    expired_mapping_is_removed_by_the_agent_itself,
    a_packet_after_expiry_is_dropped_even_before_the_timer_runs,
    withdrawn_mappings_are_removed_and_the_tunnel_torn_down,
    a_new_gateway_is_dialled_after_failover_and_mappings_stay,
    stale_foreign_and_broken_documents,
    a_terminal_that_moves_is_remapped,
    a_terminal_that_moves_between_documents_keeps_its_nat_address,
    through_the_real_gateway_state,
    end_access_now_works_without_the_server_and_sticks,
    security_tunnel_sources_outside_the_center_prefixes_are_dropped,
}
