//! Planned rotation of a site's key at the gateway: a peer listed with a
//! next key accepts a handshake from either key, and moves its tunnel to
//! the next key at the first initiation from it. Planned rotation of the
//! gateway's own key: with a next key it answers initiations to either key,
//! each peer's tunnel holding the key its agent dialed, until the promotion.

use std::time::{Duration, Instant};

use super::tests::{Client, connect, desired, drain_events, gateway, udp, udp_reply};
use super::*;
use crate::messages::{NextPeerKey, SiteId};
use crate::tunnel::Builtin;
use crate::tunnel::testing::TestClient as _;

fn with_next(
    version: u64,
    peer: crate::messages::GatewayPeer,
    next: Option<PublicKey>,
) -> crate::messages::GatewayDesiredState {
    let mut d = desired(version, vec![peer.clone()]);
    d.next_keys = next
        .map(|k| NextPeerKey {
            site_id: peer.site_id,
            public_key: k,
        })
        .into_iter()
        .collect();
    d
}

/// The technician's packet reaches the client, and the client's reply the center.
fn exchange(gw: &mut GatewayState<Builtin>, c: &mut Client<Builtin>, now: Instant) {
    let down = udp("172.16.0.50", "10.64.0.5", b"to the site");
    gw.handle_tun_input(&down, now).unwrap();
    let t = gw.poll_transmit().expect("encrypted to the site");
    assert_eq!(c.receive(&t.payload).unwrap(), down);
    let up = udp_reply("10.64.0.5", "172.16.0.50", b"to the center");
    let d = c.send(&up);
    gw.handle_network_input(c.endpoint, &d, now).unwrap();
    assert_eq!(gw.poll_tun_output().expect("to the center"), up);
}

#[test]
fn rotation_gateway_accepts_both_keys_and_moves_to_the_next_at_its_first_handshake() {
    let now = Instant::now();
    let mut gw = gateway::<Builtin>(now);
    let mut old = Client::<Builtin>::new(1, "198.51.100.7:40000");
    let mut new = Client::<Builtin>::new(2, "198.51.100.7:40000");
    let peer = old.peer(3, &["10.64.0.5"]);
    gw.handle_control(&desired(1, vec![peer.clone()]), now);
    connect(&mut gw, &mut old, now);
    exchange(&mut gw, &mut old, now);
    drain_events(&mut gw);

    // The next key is published: nothing changes for the running session.
    let applied = gw
        .handle_control(&with_next(2, peer.clone(), Some(new.public_key())), now)
        .unwrap();
    assert!(applied.errors.is_empty(), "{:?}", applied.errors);
    assert!(drain_events(&mut gw).is_empty());
    exchange(&mut gw, &mut old, now);

    // The agent switches: its first initiation with the new key is answered.
    let later = now + Duration::from_millis(10);
    connect(&mut gw, &mut new, later);
    assert!(drain_events(&mut gw).contains(&GatewayEvent::PeerRekeyed { site_id: SiteId(3) }));
    exchange(&mut gw, &mut new, later);

    // The same document again, and then the one that drops the old key,
    // keep the new session.
    gw.handle_control(&with_next(3, peer.clone(), Some(new.public_key())), later);
    let committed = new.peer(3, &["10.64.0.5"]);
    gw.handle_control(&with_next(4, committed, None), later);
    assert!(
        !drain_events(&mut gw).iter().any(|e| matches!(
            e,
            GatewayEvent::PeerRekeyed { .. } | GatewayEvent::PeerRemoved { .. }
        )),
        "the session with the new key survives the documents"
    );
    exchange(&mut gw, &mut new, later);

    // The old key is no longer accepted.
    let init = old.inner.initiation(true);
    gw.handle_network_input(old.endpoint, &init, later).ok();
    assert!(gw.poll_transmit().is_none(), "no answer to the old key");
}

#[test]
fn rotation_gateway_refuses_a_next_key_that_belongs_to_another_site_or_no_peer() {
    let now = Instant::now();
    let mut gw = gateway::<Builtin>(now);
    let a = Client::<Builtin>::new(1, "198.51.100.7:40000");
    let b = Client::<Builtin>::new(2, "198.51.100.8:40000");
    let mut d = desired(
        1,
        vec![a.peer(3, &["10.64.0.5"]), b.peer(4, &["10.64.0.9"])],
    );
    d.next_keys = vec![
        NextPeerKey {
            site_id: SiteId(3),
            public_key: b.public_key(),
        },
        NextPeerKey {
            site_id: SiteId(9),
            public_key: Client::<Builtin>::new(5, "198.51.100.9:1").public_key(),
        },
    ];
    let applied = gw.handle_control(&d, now).unwrap();
    assert_eq!(applied.errors.len(), 2, "{:?}", applied.errors);
    assert!(applied.errors[0].contains("site 3"), "{:?}", applied.errors);
    assert!(applied.errors[1].contains("site 9"), "{:?}", applied.errors);
}

/// Datagrams between the agent and the gateway until both are quiet.
fn shuttle(a: &mut crate::agent::AgentState, gw: &mut GatewayState<Builtin>, now: Instant) {
    let agent_at: std::net::SocketAddr = "198.51.100.11:40001".parse().unwrap();
    let gw_at: std::net::SocketAddr = "203.0.113.1:51820".parse().unwrap();
    for _ in 0..10 {
        let mut moved = false;
        while let Some(t) = a.poll_transmit() {
            moved = true;
            let mut out = vec![0; 70000];
            let _ = gw.handle_network_input_into(agent_at, &t.payload, &mut out, now);
        }
        while let Some(t) = gw.poll_transmit() {
            moved = true;
            let mut out = vec![0; 70000];
            let _ = a.handle_network_input_into(gw_at, &t.payload, &mut out, now);
        }
        if !moved {
            break;
        }
    }
}

/// The agent's side (`AgentState::set_private_key`) against the real
/// gateway state: the switch to a key the gateway holds as the site's next
/// key is one new handshake, and the technician's packets reach the site
/// again right after it.
#[test]
fn rotation_agent_switches_key_with_one_handshake_through_the_real_gateway() {
    use crate::agent::{AgentConfig, AgentState, DataMode, NetworkOutcome};
    use crate::messages::{TerminalName, TunnelKind, UnixMillis};

    let now = Instant::now();
    let gw_key = PrivateKey::from_bytes([0x42; 32]);
    let (old, new) = (
        PrivateKey::from_bytes([1; 32]),
        PrivateKey::from_bytes([2; 32]),
    );
    let mut gw = gateway::<Builtin>(now);
    let peer = crate::messages::GatewayPeer {
        site_id: SiteId(3),
        public_key: old.public_key(),
        nat_addresses: vec!["10.64.0.5".parse().unwrap()],
        tunnel: TunnelKind::Wireguard,
        ipsec: None,
        tls_token_sha256: None,
    };
    gw.handle_control(&desired(1, vec![peer.clone()]), now);
    let mut a = AgentState::new(
        AgentConfig {
            site_id: SiteId(3),
            private_key: old.clone(),
            mode: DataMode::Packet { masquerade: None },
            seed: 42,
            center_prefixes: vec!["172.16.0.0/24".parse().unwrap()],
        },
        now,
    );
    let wall = UnixMillis(1_700_000_000_000);
    let doc = agent_document(1, gw_key.public_key(), wall);
    let names = [(
        TerminalName::new("pc-1").unwrap(),
        "192.168.1.10".parse().unwrap(),
    )]
    .into_iter()
    .collect();
    a.handle_desired_state(&doc, &names, now, wall).unwrap();
    shuttle(&mut a, &mut gw, now);
    assert!(a.tunnel().unwrap().up);
    let reaches_the_site = |a: &mut AgentState, gw: &mut GatewayState<Builtin>| {
        gw.handle_tun_input(&udp("172.16.0.50", "10.64.0.5", b"x"), now)
            .unwrap();
        let t = gw.poll_transmit().expect("to the site");
        let mut out = vec![0; 70000];
        let gw_at = "203.0.113.1:51820".parse().unwrap();
        matches!(
            a.handle_network_input_into(gw_at, &t.payload, &mut out, now),
            NetworkOutcome::Lan(_)
        )
    };
    assert!(reaches_the_site(&mut a, &mut gw));

    gw.handle_control(&with_next(2, peer, Some(new.public_key())), now);
    assert!(
        !a.set_private_key(old.clone(), now),
        "the same key changes nothing"
    );
    assert!(a.set_private_key(new.clone(), now));
    assert_eq!(a.public_key(), new.public_key());
    let before = gw.peers().next().unwrap().stats.handshakes;
    shuttle(&mut a, &mut gw, now);
    assert!(a.tunnel().unwrap().up);
    assert_eq!(
        gw.peers().next().unwrap().stats.handshakes,
        1,
        "{before} then one"
    );
    assert!(reaches_the_site(&mut a, &mut gw));
}

/// Site 3's agent document: a tunnel to gateway 1 with `gateway_key`, and
/// pc-1 on 10.64.0.5 for an hour from `wall`.
fn agent_document(
    version: u64,
    gateway_key: PublicKey,
    wall: crate::messages::UnixMillis,
) -> crate::messages::AgentDesiredState {
    use crate::messages::{AgentDesiredState, AgentMapping, AgentTunnel, GatewayId};
    use crate::messages::{RequestId, TerminalName, TunnelKind, UnixMillis};
    AgentDesiredState {
        version,
        site_id: SiteId(3),
        tunnel: Some(AgentTunnel {
            gateway_id: GatewayId(1),
            kind: TunnelKind::Wireguard,
            endpoint: "203.0.113.1:51820".parse().unwrap(),
            public_key: gateway_key,
            persistent_keepalive_s: 25,
            ipsec: None,
            tls: None,
        }),
        mappings: vec![AgentMapping {
            nat_address: "10.64.0.5".parse().unwrap(),
            terminal: TerminalName::new("pc-1").unwrap(),
            request_id: RequestId(17),
            expires_at: UnixMillis(wall.0 + 3_600_000),
        }],
        problem: None,
        rotation: None,
    }
}

/// A gateway (key `0x42`) and the real agent of site 3 (key 1) on it.
struct Rig {
    gw: GatewayState<Builtin>,
    agent: crate::agent::AgentState,
    names: std::collections::BTreeMap<crate::messages::TerminalName, std::net::Ipv4Addr>,
    version: u64,
    now: Instant,
}

impl Rig {
    const WALL: crate::messages::UnixMillis = crate::messages::UnixMillis(1_700_000_000_000);

    fn gw_key() -> PrivateKey {
        PrivateKey::from_bytes([0x42; 32])
    }

    fn gw_next() -> PrivateKey {
        PrivateKey::from_bytes([0x43; 32])
    }

    fn site_key() -> PrivateKey {
        PrivateKey::from_bytes([1; 32])
    }

    /// Connected, with the agent dialing the gateway's current key.
    fn new() -> Self {
        use crate::agent::{AgentConfig, AgentState, DataMode};
        use crate::messages::{TerminalName, TunnelKind};
        let now = Instant::now();
        let mut gw = gateway::<Builtin>(now);
        assert_eq!(gw.public_key(), Self::gw_key().public_key());
        let peer = crate::messages::GatewayPeer {
            site_id: SiteId(3),
            public_key: Self::site_key().public_key(),
            nat_addresses: vec!["10.64.0.5".parse().unwrap()],
            tunnel: TunnelKind::Wireguard,
            ipsec: None,
            tls_token_sha256: None,
        };
        gw.handle_control(&desired(1, vec![peer]), now);
        let agent = AgentState::new(
            AgentConfig {
                site_id: SiteId(3),
                private_key: Self::site_key(),
                mode: DataMode::Packet { masquerade: None },
                seed: 42,
                center_prefixes: vec!["172.16.0.0/24".parse().unwrap()],
            },
            now,
        );
        let names = [(
            TerminalName::new("pc-1").unwrap(),
            "192.168.1.10".parse().unwrap(),
        )]
        .into_iter()
        .collect();
        let mut rig = Self {
            gw,
            agent,
            names,
            version: 0,
            now,
        };
        rig.agent_dials(Self::gw_key().public_key());
        assert!(rig.reaches_the_site());
        rig
    }

    /// The agent's next document names `gateway_key`; the datagrams that
    /// follow are exchanged.
    fn agent_dials(&mut self, gateway_key: PublicKey) {
        self.version += 1;
        let doc = agent_document(self.version, gateway_key, Self::WALL);
        self.agent
            .handle_desired_state(&doc, &self.names, self.now, Self::WALL)
            .unwrap();
        shuttle(&mut self.agent, &mut self.gw, self.now);
    }

    /// A technician's packet reaches the site's LAN.
    fn reaches_the_site(&mut self) -> bool {
        use crate::agent::NetworkOutcome;
        self.gw
            .handle_tun_input(&udp("172.16.0.50", "10.64.0.5", b"x"), self.now)
            .unwrap();
        let Some(t) = self.gw.poll_transmit() else {
            return false;
        };
        let mut out = vec![0; 70000];
        let gw_at = "203.0.113.1:51820".parse().unwrap();
        matches!(
            self.agent
                .handle_network_input_into(gw_at, &t.payload, &mut out, self.now),
            NetworkOutcome::Lan(_)
        )
    }

    /// Whether the gateway answers an initiation of the site's key to `key`.
    /// The probe takes over the agent's tunnel (same key, another address):
    /// last in a test.
    fn answers(&mut self, key: PublicKey) -> bool {
        use crate::tunnel::wireguard;
        let mut stale = wireguard::Tunnel::new(
            wireguard::TunnelConfig::initiator(Self::site_key(), key, 9, None),
            self.now,
        );
        let mut buf = vec![0; 2048];
        let init = stale
            .initiate_handshake(&mut buf, true, self.now)
            .unwrap()
            .unwrap()
            .to_vec();
        let mut out = vec![0; 70000];
        let from = "198.51.100.99:40001".parse().unwrap();
        let _ = self
            .gw
            .handle_network_input_into(from, &init, &mut out, self.now);
        std::iter::from_fn(|| self.gw.poll_transmit()).any(|t| t.dst == from)
    }
}

/// Planned rotation of the gateway's own key, with the real agent: while
/// the gateway holds a next key it answers both, the agent told the new key
/// re-dials it and keeps carrying traffic, and after the promotion the old
/// key is no longer answered.
#[test]
fn rotation_gateway_key_both_answered_then_only_the_new_with_the_real_agent() {
    let mut rig = Rig::new();
    let (old, next) = (Rig::gw_key().public_key(), Rig::gw_next().public_key());

    // The rotation starts: the running session is untouched.
    rig.gw.set_next_key(Some(Rig::gw_next()));
    assert_eq!(rig.gw.next_public_key(), Some(next));
    assert_eq!(rig.gw.peers_on_next_key(), (0, 1));
    assert!(rig.reaches_the_site());

    // The agent's document names the new key: it re-dials it (one
    // handshake), and the gateway answers with a tunnel holding that key.
    let handshakes = rig.gw.peers().next().unwrap().stats.handshakes;
    rig.agent_dials(next);
    assert!(rig.agent.tunnel().unwrap().up);
    assert_eq!(rig.gw.peers_on_next_key(), (1, 1));
    assert_eq!(
        rig.gw.peers().next().unwrap().stats.handshakes,
        1,
        "{handshakes} then one handshake with the next key"
    );
    assert!(rig.reaches_the_site());

    // Abandoning the rotation keeps the session; the agent, told the
    // current key again, re-dials it. Restarting the rotation is one more
    // handshake with the next key.
    rig.gw.set_next_key(None);
    assert_eq!(rig.gw.next_public_key(), None);
    assert_eq!(rig.gw.peers_on_next_key(), (0, 1));
    assert!(rig.reaches_the_site());
    rig.agent_dials(old);
    assert!(rig.reaches_the_site());
    rig.gw.set_next_key(Some(Rig::gw_next()));
    rig.agent_dials(next);
    assert_eq!(rig.gw.peers_on_next_key(), (1, 1));
    assert!(rig.reaches_the_site());

    // The promotion keeps that session and drops the old key.
    assert!(rig.gw.promote_next_key(rig.now));
    assert!(!rig.gw.promote_next_key(rig.now));
    assert_eq!(rig.gw.public_key(), next);
    assert_eq!(rig.gw.next_public_key(), None);
    assert!(rig.reaches_the_site());
    assert!(!rig.answers(old), "no answer to the old key");
    assert!(rig.answers(next));
}

/// A promotion after the grace time, with an agent still on the old key:
/// its session (made with the dropped key) ends, and the agent's re-dial to
/// the key its document names restores it.
#[test]
fn rotation_promotion_ends_sessions_on_the_old_key() {
    let mut rig = Rig::new();
    rig.gw.set_next_key(Some(Rig::gw_next()));
    assert_eq!(rig.gw.peers_on_next_key(), (0, 1));
    assert!(rig.gw.promote_next_key(rig.now));
    assert!(!rig.reaches_the_site(), "the old key's session ended");
    rig.agent_dials(Rig::gw_next().public_key());
    assert!(rig.reaches_the_site());
}

/// The next key of a gateway with two workers: set at one, shared with the
/// other, it has one cookie secret for both. Under load a cookie worker 0
/// gave for the next key proves the client's address at worker 1 too, as
/// for the current key (a retry may reach either worker), and keeps doing
/// so once the next key is current.
#[test]
fn rotation_gateway_next_key_cookies_are_shared_by_the_workers() {
    let now = Instant::now();
    // The clients dial `Client`'s gateway key, which is the next key here.
    let next = PrivateKey::from_bytes([0x42; 32]);
    let mut config = super::tests::gw_config();
    config.private_key = PrivateKey::from_bytes([0x43; 32]);
    // Every initiation needs a cookie.
    config.handshake_limit = 0;
    let mut shards = GatewayState::<Builtin>::shards(config, 2, now);
    let (mut s1, mut s0) = (shards.pop().unwrap(), shards.pop().unwrap());
    s0.set_next_key(Some(next.clone()));
    s1.share_next_key(&s0.next_key_share());
    assert_eq!(s1.next_public_key(), Some(next.public_key()));
    let mut c = Client::<Builtin>::new(1, "198.51.100.7:40000");
    // Site 3 belongs to worker 1; worker 0 gives the cookie.
    let d = desired(1, vec![c.peer(3, &["10.64.0.5"])]);
    s0.handle_control(&d, now);
    s1.handle_control(&d, now);
    let mut out = vec![0; 2048];
    let init = c.inner.initiation(false);
    assert_eq!(
        s0.handle_network_input_into(c.endpoint, &init, &mut out, now),
        NetworkOutcome::Consumed
    );
    let cookie = s0.poll_transmit().unwrap();
    assert_eq!(cookie.payload[0], 3, "a cookie reply");
    assert!(c.receive(&cookie.payload).is_none());
    // The retry reaches worker 1 directly, with worker 0's cookie.
    let init = c.inner.initiation(true);
    assert_eq!(
        s1.handle_network_input_into(c.endpoint, &init, &mut out, now),
        NetworkOutcome::Consumed
    );
    assert_eq!(
        s1.poll_transmit().unwrap().payload[0],
        2,
        "a handshake response, not another cookie reply"
    );
    assert_eq!(s1.counters().cookie_replies_sent, 0);

    // Promoted at both: the cookie worker 0 gave is still the gateway's.
    assert!(s0.promote_next_key(now));
    assert!(s1.promote_next_key(now));
    let init = c.inner.initiation(true);
    assert_eq!(
        s1.handle_network_input_into(c.endpoint, &init, &mut out, now),
        NetworkOutcome::Consumed
    );
    assert_eq!(s1.poll_transmit().unwrap().payload[0], 2);
    assert_eq!(s1.counters().cookie_replies_sent, 0);
}

/// An initiation to the gateway's next key that names a site's key but
/// does not come from it (its encrypted timestamp broken, its mac1 made
/// right again, as anyone who knows both public keys can) does not move
/// the site: it is dropped, and the site's running session goes on.
#[test]
fn rotation_gateway_a_forged_initiation_does_not_move_a_site() {
    use crate::tunnel::testing::{BoringtunClient, TestClient as _};
    use blake2::digest::{Digest as _, FixedOutput as _, KeyInit as _, Update as _};
    let now = Instant::now();
    let mut gw = gateway::<Builtin>(now);
    let mut c = Client::<Builtin>::new(1, "198.51.100.7:40000");
    gw.handle_control(&desired(1, vec![c.peer(3, &["10.64.0.5"])]), now);
    connect(&mut gw, &mut c, now);
    exchange(&mut gw, &mut c, now);
    let next = PrivateKey::from_bytes([0x44; 32]);
    gw.set_next_key(Some(next.clone()));

    // A real initiation of the site's key to the next key, then broken.
    let mut forged = BoringtunClient::new(1, &next).initiation(true);
    assert_eq!(forged.len(), 148);
    forged[100] ^= 0x55; // inside the encrypted timestamp
    // mac1 = MAC(HASH("mac1----" || next public key), message up to mac1)
    // (WireGuard paper §5.4.4).
    let mac1_key = blake2::Blake2s256::new()
        .chain_update(b"mac1----")
        .chain_update(next.public_key().0)
        .finalize();
    let mut mac =
        blake2::Blake2sMac::<blake2::digest::consts::U16>::new_from_slice(&mac1_key).unwrap();
    mac.update(&forged[..116]);
    let mac1 = mac.finalize_fixed();
    forged[116..132].copy_from_slice(&mac1);
    assert!(gw.handle_network_input(c.endpoint, &forged, now).is_err());
    assert!(gw.poll_transmit().is_none(), "not answered");
    assert_eq!(gw.peers_on_next_key(), (0, 1), "the site did not move");
    // The session on the current key still carries traffic both ways.
    exchange(&mut gw, &mut c, now);

    // The site's own initiation to the next key moves it.
    let mut moved = Client::<Builtin>::new(1, "198.51.100.7:40000");
    moved.inner = BoringtunClient::new(1, &next);
    connect(&mut gw, &mut moved, now + Duration::from_millis(10));
    assert_eq!(gw.peers_on_next_key(), (1, 1));
    exchange(&mut gw, &mut moved, now + Duration::from_millis(10));
}
