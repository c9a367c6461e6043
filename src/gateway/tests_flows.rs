//! The flow table and the technician check in the whole gateway: real tunnel
//! messages, as in `tests` (whose helpers these use), once per tunnel kind.

use std::time::{Duration, Instant};

use super::tests::{Client, connect, desired, gateway, gw_config, udp, udp_reply};
use super::*;
use crate::tunnel::testing::{TestKinds, for_each_kind};

fn tcp(src: &str, dst: &str, sport: u16, dport: u16, syn: bool, ack: bool) -> Vec<u8> {
    let src: Ipv4Addr = src.parse().unwrap();
    let dst: Ipv4Addr = dst.parse().unwrap();
    let mut b =
        etherparse::PacketBuilder::ipv4(src.octets(), dst.octets(), 64).tcp(sport, dport, 1, 1000);
    if syn {
        b = b.syn();
    }
    if ack {
        b = b.ack(1);
    }
    let mut p = Vec::new();
    b.write(&mut p, &[]).unwrap();
    p
}

/// A gateway with site 3 at 10.64.0.5, its client connected.
fn connected<K: TestKinds>(now: Instant) -> (GatewayState<K>, Client<K>) {
    let mut gw = gateway::<K>(now);
    let mut c = Client::<K>::new(1, "198.51.100.7:40000");
    gw.handle_control(&desired(1, vec![c.peer(3, &["10.64.0.5"])]), now);
    connect(&mut gw, &mut c, now);
    (gw, c)
}

/// The client sends `inner`; what the gateway made of it.
fn from_site<K: TestKinds>(
    gw: &mut GatewayState<K>,
    c: &mut Client<K>,
    inner: &[u8],
    now: Instant,
) -> Result<(), DropReason> {
    let d = c.send(inner);
    let r = gw.handle_network_input(c.endpoint, &d, now);
    if r.is_ok() {
        assert_eq!(gw.poll_tun_output().unwrap(), inner);
    }
    r
}

/// The technician side sends `inner`; the client must receive it.
fn from_center<K: TestKinds>(
    gw: &mut GatewayState<K>,
    c: &mut Client<K>,
    inner: &[u8],
    now: Instant,
) -> Result<(), DropReason> {
    gw.handle_tun_input(inner, now)?;
    let t = gw.poll_transmit().expect("a datagram for the site");
    assert_eq!(c.receive(&t.payload).unwrap(), inner);
    Ok(())
}

fn security_only_the_center_opens_connections<K: TestKinds>() {
    let now = Instant::now();
    let (mut gw, mut c) = connected::<K>(now);
    // The site's PC (or whoever holds the site's key) tries the server's
    // API, a technician's SSH and a gateway's status port.
    for (dst, port) in [
        ("172.16.0.2", 8080),
        ("172.16.0.50", 22),
        ("172.16.0.1", 9101),
    ] {
        assert_eq!(
            from_site(
                &mut gw,
                &mut c,
                &tcp("10.64.0.5", dst, 40000, port, true, false),
                now
            ),
            Err(DropReason::SiteInitiated),
            "{dst}:{port}"
        );
        assert_eq!(
            from_site(
                &mut gw,
                &mut c,
                &tcp("10.64.0.5", dst, 40000, port, false, true),
                now
            ),
            Err(DropReason::NoFlow),
            "{dst}:{port}"
        );
    }
    assert_eq!(
        from_site(
            &mut gw,
            &mut c,
            &udp("10.64.0.5", "172.16.0.2", b"dns?"),
            now
        ),
        Err(DropReason::NoFlow)
    );
    assert!(gw.poll_tun_output().is_none());
    assert_eq!(gw.counters().drops.get(DropReason::SiteInitiated), 3);
    assert_eq!(gw.counters().drops.get(DropReason::NoFlow), 4);
    let peer = gw.peers().next().unwrap();
    assert_eq!(peer.drops.get(DropReason::SiteInitiated), 3);
    assert_eq!(gw.flow_count(), 0, "a site's packet never creates a flow");

    // The technician's connection works both ways.
    let syn = tcp("172.16.0.50", "10.64.0.5", 50000, 22, true, false);
    from_center(&mut gw, &mut c, &syn, now).unwrap();
    let syn_ack = tcp("10.64.0.5", "172.16.0.50", 22, 50000, true, true);
    from_site(&mut gw, &mut c, &syn_ack, now).unwrap();
    let data = tcp("10.64.0.5", "172.16.0.50", 22, 50000, false, true);
    from_site(&mut gw, &mut c, &data, now + Duration::from_secs(600)).unwrap();
}

fn security_only_technicians_reach_the_sites<K: TestKinds>() {
    let now = Instant::now();
    let (mut gw, mut c) = connected::<K>(now);
    // The server (172.16.0.2) is on the center LAN and thus in the default
    // technician prefix; elsewhere nothing passes.
    for src in ["172.16.1.50", "192.0.2.1", "203.0.113.1"] {
        assert_eq!(
            gw.handle_tun_input(&udp(src, "10.64.0.5", b"x"), now),
            Err(DropReason::NotTechnician),
            "{src}"
        );
    }
    assert!(gw.poll_transmit().is_none());
    assert_eq!(gw.counters().drops.get(DropReason::NotTechnician), 3);
    assert_eq!(gw.flow_count(), 0);
    from_center(&mut gw, &mut c, &udp("172.16.0.50", "10.64.0.5", b"x"), now).unwrap();

    // Configured prefixes replace the default.
    let mut config = gw_config();
    config.technician_prefixes = vec!["192.0.2.0/28".parse().unwrap()];
    let mut gw = GatewayState::<K>::with_kinds(config, now);
    let mut c = Client::<K>::new(1, "198.51.100.7:40000");
    gw.handle_control(&desired(1, vec![c.peer(3, &["10.64.0.5"])]), now);
    connect(&mut gw, &mut c, now);
    assert_eq!(
        gw.handle_tun_input(&udp("172.16.0.50", "10.64.0.5", b"x"), now),
        Err(DropReason::NotTechnician)
    );
    from_center(&mut gw, &mut c, &udp("192.0.2.5", "10.64.0.5", b"x"), now).unwrap();
    from_site(
        &mut gw,
        &mut c,
        &udp_reply("10.64.0.5", "192.0.2.5", b"y"),
        now,
    )
    .unwrap();
}

fn security_closing_a_nat_address_ends_its_flows<K: TestKinds>() {
    let now = Instant::now();
    let mut gw = gateway::<K>(now);
    let mut c = Client::<K>::new(1, "198.51.100.7:40000");
    gw.handle_control(
        &desired(1, vec![c.peer(3, &["10.64.0.5", "10.64.0.6"])]),
        now,
    );
    connect(&mut gw, &mut c, now);
    for nat in ["10.64.0.5", "10.64.0.6"] {
        from_center(&mut gw, &mut c, &udp("172.16.0.50", nat, b"x"), now).unwrap();
    }
    assert_eq!(gw.flow_count(), 2);
    // 10.64.0.6's request ends; the site keeps 10.64.0.5 (and its tunnel).
    gw.handle_control(&desired(2, vec![c.peer(3, &["10.64.0.5"])]), now);
    assert_eq!(gw.flow_count(), 1);
    from_site(
        &mut gw,
        &mut c,
        &udp_reply("10.64.0.5", "172.16.0.50", b"y"),
        now,
    )
    .unwrap();
    // The site still holds its key but no longer the address: its reply
    // would be spoofed, and even if the address came back to it, the flow
    // is gone.
    assert_eq!(
        from_site(
            &mut gw,
            &mut c,
            &udp_reply("10.64.0.6", "172.16.0.50", b"y"),
            now
        ),
        Err(DropReason::SpoofedSource)
    );
    gw.handle_control(
        &desired(3, vec![c.peer(3, &["10.64.0.5", "10.64.0.6"])]),
        now,
    );
    assert_eq!(
        from_site(
            &mut gw,
            &mut c,
            &udp_reply("10.64.0.6", "172.16.0.50", b"y"),
            now
        ),
        Err(DropReason::NoFlow)
    );
    // Reassigned to another site, the address carries none of the old flows.
    let mut other = Client::<K>::new(2, "203.0.113.8:40000");
    gw.handle_control(
        &desired(
            4,
            vec![c.peer(3, &["10.64.0.6"]), other.peer(4, &["10.64.0.5"])],
        ),
        now,
    );
    connect(&mut gw, &mut other, now);
    assert_eq!(gw.flow_count(), 0);
    assert_eq!(
        from_site(
            &mut gw,
            &mut other,
            &udp_reply("10.64.0.5", "172.16.0.50", b"y"),
            now
        ),
        Err(DropReason::NoFlow)
    );
}

/// A held session that arrives at a gateway that never saw its start
/// (failover, restart): the technician's next packet re-creates the flow.
fn security_a_held_session_continues_on_a_fresh_gateway<K: TestKinds>() {
    let now = Instant::now();
    let (mut gw, mut c) = connected::<K>(now);
    let from_pc = tcp("10.64.0.5", "172.16.0.50", 22, 50000, false, true);
    assert_eq!(
        from_site(&mut gw, &mut c, &from_pc, now),
        Err(DropReason::NoFlow)
    );
    let ack = tcp("172.16.0.50", "10.64.0.5", 50000, 22, false, true);
    from_center(&mut gw, &mut c, &ack, now).unwrap();
    from_site(&mut gw, &mut c, &from_pc, now).unwrap();
}

fn security_flows_expire_with_the_gateways_timer<K: TestKinds>() {
    let now = Instant::now();
    let (mut gw, mut c) = connected::<K>(now);
    from_center(&mut gw, &mut c, &udp("172.16.0.50", "10.64.0.5", b"x"), now).unwrap();
    let later = now + Duration::from_secs(121);
    gw.handle_timeout(later);
    assert_eq!(gw.flow_count(), 0);
    let d = c.send(&udp_reply("10.64.0.5", "172.16.0.50", b"late"));
    assert_eq!(
        gw.handle_network_input(c.endpoint, &d, later),
        Err(DropReason::NoFlow)
    );
}

fn security_a_full_flow_table_refuses_and_counts<K: TestKinds>() {
    let now = Instant::now();
    let mut config = gw_config();
    config.flows.max_flows = 1;
    let mut gw = GatewayState::<K>::with_kinds(config, now);
    let mut c = Client::<K>::new(1, "198.51.100.7:40000");
    gw.handle_control(&desired(1, vec![c.peer(3, &["10.64.0.5"])]), now);
    connect(&mut gw, &mut c, now);
    from_center(&mut gw, &mut c, &udp("172.16.0.50", "10.64.0.5", b"x"), now).unwrap();
    assert_eq!(
        gw.handle_tun_input(&udp("172.16.0.51", "10.64.0.5", b"x"), now),
        Err(DropReason::FlowTableFull)
    );
    assert_eq!(gw.counters().drops.get(DropReason::FlowTableFull), 1);
}

for_each_kind! {
    security_only_the_center_opens_connections,
    security_only_technicians_reach_the_sites,
    security_closing_a_nat_address_ends_its_flows,
    security_a_held_session_continues_on_a_fresh_gateway,
    security_flows_expire_with_the_gateways_timer,
    security_a_full_flow_table_refuses_and_counts,
}
