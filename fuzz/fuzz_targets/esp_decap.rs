//! Arbitrary bytes through the ESP receive path: the UDP-4500
//! classification (RFC 3948), the SPI peek, and an inbound SA with a fixed
//! key, both copying and in place. Nothing may panic, and:
//!
//! - forged bytes never open (an ICV cannot be guessed);
//! - an authentic packet (the fuzzer's bytes encrypted under the SA's key,
//!   trailer and all) never fails authentication, and what opens is a
//!   prefix of what was encrypted;
//! - a packet our sender sealed opens to the inner packet.
//!
//! The first input byte steers: 0 raw datagram, 1 authentic payload (the
//! next 4 bytes are the sequence number), 2 sealed inner packet; bit 2 puts
//! the SA's SPI into a raw datagram so that it gets past the SPI check.
#![no_main]

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit};
use libfuzzer_sys::fuzz_target;
use vpnnat::ipsec::esp::natt::{self, Udp4500};
use vpnnat::ipsec::esp::spi::{esp_spi, index_from_spi};
use vpnnat::ipsec::esp::{
    DropReason, HEADER_LEN, ICV_LEN, InboundSa, KEYMAT_LEN, OutboundSa, sealed_len,
};

const SPI: u32 = 0x0100_0007;
const KEYMAT: [u8; KEYMAT_LEN] = [0x3c; KEYMAT_LEN];

fn open_both(datagram: &[u8]) -> Result<(usize, Vec<u8>), DropReason> {
    let mut rx = InboundSa::new(SPI, &KEYMAT);
    let mut out = vec![0u8; datagram.len()];
    let copied = rx.open(datagram, &mut out);
    let mut rx = InboundSa::new(SPI, &KEYMAT);
    let mut buf = datagram.to_vec();
    let in_place = rx.open_in_place(&mut buf);
    assert_eq!(copied, in_place);
    let (len, _) = copied?;
    assert_eq!(out[..len], buf[HEADER_LEN..HEADER_LEN + len]);
    out.truncate(len);
    Ok((len, out))
}

/// `plain` encrypted as ESP payload under the SA's key, as a peer would.
fn authentic(seq: u32, plain: &[u8]) -> Vec<u8> {
    let aead = Aes256Gcm::new_from_slice(&KEYMAT[..32]).expect("32-byte key");
    let mut pkt = Vec::with_capacity(HEADER_LEN + plain.len() + ICV_LEN);
    pkt.extend_from_slice(&SPI.to_be_bytes());
    pkt.extend_from_slice(&seq.to_be_bytes());
    pkt.extend_from_slice(&u64::from(seq).to_be_bytes());
    let mut nonce = [0u8; 12];
    nonce[..4].copy_from_slice(&KEYMAT[32..]);
    nonce[4..].copy_from_slice(&pkt[8..16]);
    let mut body = plain.to_vec();
    let tag = aead
        .encrypt_in_place_detached(&nonce.into(), &pkt[..8], &mut body)
        .expect("short input");
    pkt.extend_from_slice(&body);
    pkt.extend_from_slice(&tag);
    pkt
}

fuzz_target!(|data: &[u8]| {
    let Some((&steer, rest)) = data.split_first() else {
        return;
    };
    match steer & 3 {
        1 => {
            let Some((seq, plain)) = rest.split_first_chunk::<4>() else {
                return;
            };
            let seq = u32::from_be_bytes(*seq);
            let pkt = authentic(seq, plain);
            match open_both(&pkt) {
                Ok((len, inner)) => {
                    assert!(len + 2 <= plain.len());
                    assert_eq!(inner[..], plain[..len]);
                }
                Err(reason) => assert_ne!(reason, DropReason::AuthFailed),
            }
        }
        2 => {
            let mut tx = OutboundSa::new(SPI, &KEYMAT);
            let mut out = vec![0u8; sealed_len(rest.len())];
            if let Ok(n) = tx.seal(rest, &mut out) {
                let (len, inner) = open_both(&out[..n]).expect("our own packet opens");
                assert_eq!(len, rest.len());
                assert_eq!(inner[..], rest[..]);
            }
        }
        _ => {
            let mut datagram = rest.to_vec();
            if steer & 4 != 0 && datagram.len() >= 4 {
                datagram[..4].copy_from_slice(&SPI.to_be_bytes());
            }
            match natt::classify(&datagram) {
                Ok(Udp4500::Esp(esp)) => {
                    if let Some(spi) = esp_spi(esp) {
                        let _ = index_from_spi(spi);
                    }
                    assert!(open_both(esp).is_err(), "a forged packet opened");
                }
                Ok(Udp4500::Ike(ike)) => assert_eq!(esp_spi(&datagram), None, "{ike:?}"),
                Ok(Udp4500::Keepalive) | Err(_) => {}
            }
        }
    }
});
