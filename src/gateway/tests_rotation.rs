//! Planned rotation of a site's key at the gateway: a peer listed with a
//! next key accepts a handshake from either key, and moves its tunnel to
//! the next key at the first initiation from it.

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
