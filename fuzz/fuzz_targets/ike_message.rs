//! Arbitrary bytes through the IKEv2 codec and a responder's
//! `handle_input`: nothing may panic, and every refused datagram is counted.
//!
//! The first input byte steers: bit 0 the port the datagram arrives on (500,
//! or 4500 where IKE carries the non-ESP marker), bit 1 "prepend the marker
//! on 4500", so that the fuzzer reaches the parser through both ports. The
//! rest is also parsed as a bare message and, if it has an SK payload, run
//! through the SK decryption with a fixed key.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use rand::rngs::StdRng;
use vpnnat::ipsec::ike::wire::{self, Id, TrafficSelector};
use vpnnat::ipsec::ike::{Config, IKE_PORT, IkeSa, NAT_T_PORT, NON_ESP_MARKER, crypto};

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else { return };
    if let Ok(m) = wire::parse(rest)
        && let Some((first, body)) = m.chain.encrypted
        && let Ok(pt) = crypto::open_encrypted(rest, body, &[7; crypto::AEAD_KEY_LEN])
    {
        let _ = wire::parse_chain(&pt, 0, first);
    }
    let port = if ctl & 1 == 0 { IKE_PORT } else { NAT_T_PORT };
    let datagram = if port == NAT_T_PORT && ctl & 2 != 0 {
        [&NON_ESP_MARKER[..], rest].concat()
    } else {
        rest.to_vec()
    };
    let now = Instant::now();
    let mut rng = StdRng::seed_from_u64(1);
    let ts = |a: [u8; 4]| vec![TrafficSelector::ipv4_prefix(Ipv4Addr::from(a), 24)];
    let Ok(config) = Config::new(
        b"fuzz psk, 16 bytes or more",
        Id::fqdn("gw"),
        Id::fqdn("site"),
        ts([172, 16, 0, 0]),
        ts([10, 64, 1, 0]),
    ) else {
        return;
    };
    let from = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 11)), port);
    let local = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
    let mut sa = IkeSa::responder(config, 0xab_cdef, local, from, now);
    let r = sa.handle_input(port, from, &datagram, now, &mut rng);
    assert_eq!(r.is_err(), sa.stats().drops.total() == 1);
    while sa.poll_transmit().is_some() {}
    while sa.poll_event().is_some() {}
});
