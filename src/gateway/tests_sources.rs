//! Per-NAT-address source restrictions (`allowed_sources`, teams): the check
//! in the whole gateway with real tunnel messages, once per tunnel kind, and
//! a property of the check against a plain model.

use std::time::Instant;

use proptest::prelude::*;

use super::tests::{Client, connect, desired, gateway, udp};
use super::*;
use crate::messages::AllowedSources;
use crate::tunnel::testing::{TestKinds, for_each_kind};

fn restrict(nat: &str, sources: &[&str]) -> AllowedSources {
    AllowedSources {
        nat_address: nat.parse().unwrap(),
        sources: sources.iter().map(|s| s.parse().unwrap()).collect(),
    }
}

/// Sends `src` → `dst` from the center; the client must receive it.
fn reaches<K: TestKinds>(
    gw: &mut GatewayState<K>,
    c: &mut Client<K>,
    src: &str,
    dst: &str,
    now: Instant,
) -> Result<(), DropReason> {
    let p = udp(src, dst, b"x");
    gw.handle_tun_input(&p, now)?;
    let t = gw.poll_transmit().expect("a datagram for the site");
    assert_eq!(c.receive(&t.payload).unwrap(), p);
    Ok(())
}

fn teams_sources_restrict_per_nat_address<K: TestKinds>() {
    let now = Instant::now();
    let mut gw = gateway::<K>(now);
    let mut c = Client::<K>::new(1, "198.51.100.7:40000");
    let mut d = desired(1, vec![c.peer(3, &["10.64.0.5", "10.64.0.6", "10.64.0.7"])]);
    d.allowed_sources = vec![
        restrict("10.64.0.5", &["172.16.0.48/30"]),
        restrict("10.64.0.6", &[]),
    ];
    let applied = gw.handle_control(&d, now).unwrap();
    assert!(applied.errors.is_empty(), "{:?}", applied.errors);
    connect(&mut gw, &mut c, now);

    reaches(&mut gw, &mut c, "172.16.0.50", "10.64.0.5", now).unwrap();
    assert_eq!(
        reaches(&mut gw, &mut c, "172.16.0.60", "10.64.0.5", now),
        Err(DropReason::SourceNotAllowed)
    );
    // An empty list: nobody.
    assert_eq!(
        reaches(&mut gw, &mut c, "172.16.0.50", "10.64.0.6", now),
        Err(DropReason::SourceNotAllowed)
    );
    // Not listed: every technician, as without teams.
    reaches(&mut gw, &mut c, "172.16.0.60", "10.64.0.7", now).unwrap();
    // Outside the technician prefixes stays `not_technician`, listed or not.
    assert_eq!(
        reaches(&mut gw, &mut c, "192.0.2.1", "10.64.0.5", now),
        Err(DropReason::NotTechnician)
    );
    assert_eq!(gw.counters().drops.get(DropReason::SourceNotAllowed), 2);
    assert_eq!(
        gw.peers()
            .next()
            .unwrap()
            .drops
            .get(DropReason::SourceNotAllowed),
        2
    );
    assert_eq!(gw.flow_count(), 2, "refused packets open no flow");

    // A new document moves the restriction (the request was started by
    // another technician): the old source loses the address at once.
    let mut d = desired(2, vec![c.peer(3, &["10.64.0.5", "10.64.0.6", "10.64.0.7"])]);
    d.allowed_sources = vec![restrict("10.64.0.5", &["172.16.0.60/32"])];
    gw.handle_control(&d, now).unwrap();
    reaches(&mut gw, &mut c, "172.16.0.60", "10.64.0.5", now).unwrap();
    assert_eq!(
        reaches(&mut gw, &mut c, "172.16.0.50", "10.64.0.5", now),
        Err(DropReason::SourceNotAllowed)
    );
    reaches(&mut gw, &mut c, "172.16.0.50", "10.64.0.6", now).unwrap();

    // Without the field (an older server), everything is as before.
    gw.handle_control(
        &desired(3, vec![c.peer(3, &["10.64.0.5", "10.64.0.6", "10.64.0.7"])]),
        now,
    )
    .unwrap();
    reaches(&mut gw, &mut c, "172.16.0.50", "10.64.0.5", now).unwrap();
    reaches(&mut gw, &mut c, "172.16.0.60", "10.64.0.5", now).unwrap();
}

fn teams_bad_restrictions_are_refused_and_fail_closed<K: TestKinds>() {
    let now = Instant::now();
    let mut gw = gateway::<K>(now);
    let mut c = Client::<K>::new(1, "198.51.100.7:40000");
    let mut d = desired(1, vec![c.peer(3, &["10.64.0.5", "10.64.0.6"])]);
    let many: Vec<String> = (0..=validate::MAX_ALLOWED_SOURCES)
        .map(|i| format!("172.16.0.{i}/32"))
        .collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    d.allowed_sources = vec![
        restrict("10.64.0.9", &["172.16.0.0/24"]),
        restrict("10.64.0.5", &["172.16.0.50/32"]),
        restrict("10.64.0.5", &["172.16.0.60/32"]),
        restrict("10.64.0.6", &many),
    ];
    let applied = gw.handle_control(&d, now).unwrap();
    assert_eq!(applied.errors.len(), 3, "{:?}", applied.errors);
    assert!(
        applied.errors[0].contains("10.64.0.9"),
        "{:?}",
        applied.errors
    );
    connect(&mut gw, &mut c, now);
    // The server meant to restrict both: neither is open to everyone.
    for (src, dst) in [
        ("172.16.0.50", "10.64.0.5"),
        ("172.16.0.60", "10.64.0.5"),
        ("172.16.0.1", "10.64.0.6"),
    ] {
        assert_eq!(
            reaches(&mut gw, &mut c, src, dst, now),
            Err(DropReason::SourceNotAllowed),
            "{src} → {dst}"
        );
    }
    // 10.64.0.9 is no one's: no route, as before.
    assert_eq!(
        gw.handle_tun_input(&udp("172.16.0.50", "10.64.0.9", b"x"), now),
        Err(DropReason::NoPeer)
    );
}

for_each_kind! {
    teams_sources_restrict_per_nat_address,
    teams_bad_restrictions_are_refused_and_fail_closed,
}

fn prefix() -> impl Strategy<Value = crate::ipv4::Prefix> {
    // Inside the default technician prefix 172.16.0.0/24, so that only the
    // restriction decides.
    (0u8..=255, 24u8..=32).prop_map(|(host, len)| {
        crate::ipv4::Prefix::new(Ipv4Addr::new(172, 16, 0, host), len).unwrap()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The gateway passes a packet toward a NAT address exactly when its
    /// source is in that address's list (or the address has none).
    #[test]
    fn teams_source_check_matches_the_model(
        lists in proptest::collection::vec(
            proptest::option::of(proptest::collection::vec(prefix(), 0..4)),
            3,
        ),
        probes in proptest::collection::vec((0usize..3, 0u8..=255), 1..40),
    ) {
        type K = crate::tunnel::null::Null;
        let now = Instant::now();
        let mut gw = gateway::<K>(now);
        let mut c = Client::<K>::new(1, "198.51.100.7:40000");
        let nats = ["10.64.0.5", "10.64.0.6", "10.64.0.7"];
        let mut d = desired(1, vec![c.peer(3, &nats)]);
        for (nat, list) in nats.iter().zip(&lists) {
            if let Some(list) = list {
                d.allowed_sources.push(AllowedSources {
                    nat_address: nat.parse().unwrap(),
                    sources: list.clone(),
                });
            }
        }
        let applied = gw.handle_control(&d, now).unwrap();
        prop_assert!(applied.errors.is_empty());
        connect(&mut gw, &mut c, now);
        for (i, host) in probes {
            let src = Ipv4Addr::new(172, 16, 0, host);
            let want = lists[i].as_ref().is_none_or(|l| l.iter().any(|p| p.contains(src)));
            let got = reaches(&mut gw, &mut c, &src.to_string(), nats[i], now);
            prop_assert_eq!(got.is_ok(), want, "{} → {}", src, nats[i]);
            if !want {
                prop_assert_eq!(got, Err(DropReason::SourceNotAllowed));
            }
        }
    }
}
