use proptest::prelude::*;
use test_strategy::proptest;

use super::replay::WINDOW;
use super::*;

fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    digits
        .chunks(2)
        .map(|d| u8::from_str_radix(std::str::from_utf8(d).unwrap(), 16).unwrap())
        .collect()
}

fn keymat(key: &[u8], salt: &[u8]) -> [u8; KEYMAT_LEN] {
    let mut k = [0u8; KEYMAT_LEN];
    k[..32].copy_from_slice(key);
    k[32..].copy_from_slice(salt);
    k
}

const SPI: u32 = 0x0100_002A;
const KEYMAT: [u8; KEYMAT_LEN] = {
    let mut k = [0u8; KEYMAT_LEN];
    let mut i = 0;
    while i < KEYMAT_LEN {
        k[i] = (i as u8).wrapping_mul(7).wrapping_add(3);
        i += 1;
    }
    k
};

fn pair() -> (OutboundSa, InboundSa) {
    (OutboundSa::new(SPI, &KEYMAT), InboundSa::new(SPI, &KEYMAT))
}

/// An IPv4 (or, with `v6`, IPv6) packet of `len` bytes: only the version
/// nibble matters to ESP, the rest is a recognisable pattern.
fn inner(len: usize, v6: bool) -> Vec<u8> {
    let mut p: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
    if let Some(b) = p.first_mut() {
        *b = if v6 { 0x60 } else { 0x45 };
    }
    p
}

fn seal(tx: &mut OutboundSa, inner: &[u8]) -> Vec<u8> {
    let mut out = vec![0xa5; sealed_len(inner.len())];
    let n = tx.seal(inner, &mut out).unwrap();
    assert_eq!(n, out.len());
    out
}

/// Encrypts an arbitrary payload (trailer included) under `keymat` the way
/// ESP does, for packets a correct sender would never make.
fn seal_raw(keymat: &[u8; KEYMAT_LEN], spi: u32, seq: u32, plain: &[u8]) -> Vec<u8> {
    let cipher = Cipher::new(keymat);
    let mut pkt = Vec::new();
    pkt.extend_from_slice(&spi.to_be_bytes());
    pkt.extend_from_slice(&seq.to_be_bytes());
    pkt.extend_from_slice(&u64::from(seq).to_be_bytes());
    let mut body = plain.to_vec();
    let mut iv = [0u8; 8];
    iv.copy_from_slice(&pkt[8..16]);
    let tag = seal_with(&cipher, &iv, &pkt[..8], &mut body);
    pkt.extend_from_slice(&body);
    pkt.extend_from_slice(&tag);
    pkt
}

/// Seals `buf` in place under the SA's cipher; the tag.
fn seal_with(cipher: &Cipher, iv: &[u8; 8], aad: &[u8], buf: &mut [u8]) -> [u8; ICV_LEN] {
    let tag = cipher
        .aead
        .seal_in_place_separate_tag(cipher.nonce(iv), Aad::from(aad), buf)
        .unwrap();
    tag.as_ref().try_into().unwrap()
}

/// AES-256 cases 13–16 of McGrew and Viega, "The Galois/Counter Mode of
/// Operation (GCM)", appendix B, through the SA's [`Cipher`]: the first 4
/// bytes of their 96-bit IV are the salt, the other 8 the ESP IV, as RFC
/// 4106 §4 builds the nonce. (Cases 17 and 18 use IVs of other lengths,
/// which ESP never does.)
#[test]
fn aes_256_gcm_spec_vectors_13_to_16() {
    let key = hex("feffe9928665731c6d6a8f9467308308 feffe9928665731c6d6a8f9467308308");
    let p60 = hex(
        "d9313225f88406e5a55909c5aff5269a 86a7a9531534f7da2e4c303d8a318a72
         1c3c0c95956809532fcf0e2449a6b525 b16aedf5aa0de657ba637b39",
    );
    let p64 = [p60.clone(), hex("1aafd255")].concat();
    let aad = hex("feedfacedeadbeeffeedfacedeadbeef abaddad2");
    // ciphertext ‖ tag of `plain` under `sa`, IV `iv` and `aad`.
    let check = |sa: &Cipher, iv: &[u8; 8], aad: &[u8], plain: &[u8], expected: &str| {
        let mut buf = plain.to_vec();
        let tag = seal_with(sa, iv, aad, &mut buf);
        buf.extend_from_slice(&tag);
        assert_eq!(buf, hex(expected));
    };

    // 13 and 14: zero key, zero IV.
    let zero = Cipher::new(&keymat(&[0; 32], &[0; 4]));
    check(&zero, &[0; 8], &[], &[], "530f8afbc74536b9a963b4f1c4cb738b");
    check(
        &zero,
        &[0; 8],
        &[],
        &[0; 16],
        "cea7403d4d606b6e074ec5d3baf39d18 d0d1c8a799996bf0265b98b5d48ab919",
    );

    // 15 and 16: salt cafebabe, IV facedbaddecaf888.
    let sa = Cipher::new(&keymat(&key, &hex("cafebabe")));
    let iv: [u8; 8] = hex("facedbaddecaf888").try_into().unwrap();
    assert_eq!(
        sa.nonce(&iv).as_ref().as_slice(),
        hex("cafebabefacedbaddecaf888")
    );
    check(
        &sa,
        &iv,
        &[],
        &p64,
        "522dc1f099567d07f47f37a32a84427d 643a8cdcbfe5c0c97598a2bd2555d1aa
         8cb08e48590dbb3da7b08b1056828838 c5f61e6393ba7a0abcc9f662898015ad
         b094dac5d93471bdec1a502270e3cc6c",
    );
    check(
        &sa,
        &iv,
        &aad,
        &p60,
        "522dc1f099567d07f47f37a32a84427d 643a8cdcbfe5c0c97598a2bd2555d1aa
         8cb08e48590dbb3da7b08b1056828838 c5f61e6393ba7a0abcc9f662
         76fc6ece0f4e1768cddf8853bb2d551b",
    );
}

/// The AES-256 ESP packet of draft-mcgrew-gcm-test-01 §4 (SPI 4a2cbfe3,
/// sequence 2, salt 11223344, IV 0102030405060708): it authenticates with
/// our nonce and AAD, decrypts to the published plaintext, and its next
/// header 1 (not tunnel mode) is refused and counted. A forged ICV does not
/// move the window; the authentic packet does.
#[test]
fn esp_vector_of_the_gcm_test_draft_opens() {
    let key = hex("abbccddef00112233445566778899aab abbccddef00112233445566778899aab");
    let packet = hex("4a2cbfe3000000020102030405060708
         ff425c9b724599df7a3bcd510194e00d 6a78107f1b0b1cbf06efae9d65a5d763
         748a637985771d347f0545659f14e99d ef842d8eb335f4eecfdbf831824b4c49
         15956c96");
    let plain = hex(
        "4500003069a6400080062690c0a80102 9389155e0a9e008b2dc57ee000000000
         7002400020bf0000020405b401010402 01020201",
    );
    let mut rx = InboundSa::new(0x4a2c_bfe3, &keymat(&key, &hex("11223344")));
    let mut out = [0u8; 128];

    let mut forged = packet.clone();
    *forged.last_mut().unwrap() ^= 1;
    assert_eq!(rx.open(&forged, &mut out), Err(DropReason::AuthFailed));
    assert_eq!(rx.highest_sequence(), 0);

    assert_eq!(
        rx.open(&packet, &mut out),
        Err(DropReason::UnknownNextHeader)
    );
    assert_eq!(&out[..plain.len()], plain.as_slice());
    assert_eq!(rx.highest_sequence(), 2);
    assert_eq!(rx.open(&packet, &mut out), Err(DropReason::Replayed));

    let drops = rx.drops();
    assert_eq!(drops.get(DropReason::AuthFailed), 1);
    assert_eq!(drops.get(DropReason::UnknownNextHeader), 1);
    assert_eq!(drops.get(DropReason::Replayed), 1);
    assert_eq!(drops.total(), 3);
    assert_eq!(rx.opened(), 0);
}

/// A packet sealed by an independent implementation (Python's
/// `cryptography`, AESGCM) from the layout of RFC 4303 §2 and RFC 4106:
/// IV = the 64-bit sequence number, nonce = salt ‖ IV, AAD = SPI ‖ sequence,
/// padding 1, 2, 3, next header 4. Our sender makes the same bytes, our
/// receiver opens them.
#[test]
fn seals_the_bytes_an_independent_implementation_makes() {
    let keymat = keymat(&(0u8..32).collect::<Vec<_>>(), &hex("a0a1a2a3"));
    let inner = hex("4500001f123400004001b2270a400001ac1000320800216812340001616263");
    let expected = hex(
        "0100002a000000010000000000000001 f5afb8917e40c6b45bdb1f4d712b0d8b
         e10a996f60603d45bbe18d5f4f9c4492 e9fd281ae638280e7c33f3ea15fefd80
         fafc6774",
    );
    let mut tx = OutboundSa::new(0x0100_002A, &keymat);
    assert_eq!(seal(&mut tx, &inner), expected);

    let mut rx = InboundSa::new(0x0100_002A, &keymat);
    let mut out = [0u8; 64];
    assert_eq!(
        rx.open(&expected, &mut out),
        Ok((inner.len(), NextHeader::Ipv4))
    );
    assert_eq!(&out[..inner.len()], inner.as_slice());
}

#[test]
fn round_trips_every_padding_length_both_ways() {
    let (mut tx, mut rx) = pair();
    for len in 40..=120 {
        for v6 in [false, true] {
            let packet = inner(len, v6);
            let sealed = seal(&mut tx, &packet);
            assert_eq!(sealed.len() % 4, 0);
            assert!(sealed.len() - len <= MAX_OVERHEAD);

            // Copying.
            let mut out = vec![0x5a; sealed.len()];
            let kind = if v6 {
                NextHeader::Ipv6
            } else {
                NextHeader::Ipv4
            };
            // Each packet is opened once by each path: a fresh receiver for
            // the in-place copy.
            let mut rx2 = InboundSa::new(SPI, &KEYMAT);
            assert_eq!(rx.open(&sealed, &mut out), Ok((len, kind)));
            assert_eq!(&out[..len], packet.as_slice());

            // In place.
            let mut buf = sealed.clone();
            assert_eq!(rx2.open_in_place(&mut buf), Ok((len, kind)));
            assert_eq!(&buf[HEADER_LEN..HEADER_LEN + len], packet.as_slice());
        }
    }
    assert_eq!(tx.sealed(), 162);
    assert_eq!(rx.opened(), 162);
    assert_eq!(rx.drops().total(), 0);
}

#[test]
fn seals_in_place_behind_the_header_room() {
    let (mut tx, mut rx) = pair();
    let packet = inner(1420, false);
    let mut buf = vec![0xa5; sealed_len(1420) + 100];
    buf[HEADER_LEN..HEADER_LEN + 1420].copy_from_slice(&packet);
    let n = tx.seal_in_place(&mut buf, 1420).unwrap();
    assert_eq!(n, sealed_len(1420));
    assert_eq!(&buf[..4], &SPI.to_be_bytes());
    assert_eq!(&buf[4..8], &1u32.to_be_bytes());
    assert_eq!(&buf[8..16], &1u64.to_be_bytes());
    assert_eq!(
        rx.open_in_place(&mut buf[..n]),
        Ok((1420, NextHeader::Ipv4))
    );
    assert_eq!(&buf[HEADER_LEN..HEADER_LEN + 1420], packet.as_slice());
}

#[test]
fn sequence_numbers_and_ivs_count_up_from_one() {
    let (mut tx, _) = pair();
    for seq in 1u32..=5 {
        let sealed = seal(&mut tx, &inner(40, false));
        assert_eq!(&sealed[4..8], &seq.to_be_bytes());
        assert_eq!(&sealed[8..16], &u64::from(seq).to_be_bytes());
    }
}

#[test]
fn seal_refuses_what_it_cannot_send_without_using_a_sequence_number() {
    let (mut tx, _) = pair();
    let mut out = [0u8; 256];
    assert_eq!(tx.seal(&[], &mut out), Err(SealError::NotIp));
    assert_eq!(tx.seal(&[0x50; 20], &mut out), Err(SealError::NotIp));
    assert_eq!(tx.seal(&[0x45; 19], &mut out), Err(SealError::NotIp));
    assert_eq!(tx.seal(&[0x60; 39], &mut out), Err(SealError::NotIp));
    let packet = inner(100, false);
    assert_eq!(
        tx.seal(&packet, &mut out[..sealed_len(100) - 1]),
        Err(SealError::BufferTooSmall)
    );
    assert_eq!(
        tx.seal(&packet, &mut out[..50]),
        Err(SealError::BufferTooSmall)
    );
    assert_eq!(tx.sealed(), 0);
    let sealed = seal(&mut tx, &packet);
    assert_eq!(&sealed[4..8], &1u32.to_be_bytes());
}

/// Flipping any bit of a sealed packet is caught: in the SPI by the SPI
/// check, anywhere else by the ICV; the window does not move.
#[test]
fn a_tampered_byte_fails_authentication() {
    let (mut tx, mut rx) = pair();
    let sealed = seal(&mut tx, &inner(61, false));
    let mut out = [0u8; 128];
    for at in 0..sealed.len() {
        // Not bit 0: sequence number 1 would become 0, refused as malformed.
        for bit in [0x02, 0x80] {
            let mut bad = sealed.clone();
            bad[at] ^= bit;
            let expected = if at < 4 {
                DropReason::WrongSpi
            } else {
                DropReason::AuthFailed
            };
            assert_eq!(rx.open(&bad, &mut out), Err(expected), "byte {at}");
        }
    }
    assert_eq!(rx.highest_sequence(), 0);
    assert_eq!(rx.drops().get(DropReason::WrongSpi), 8);
    assert_eq!(
        rx.drops().get(DropReason::AuthFailed),
        2 * (sealed.len() as u64 - 4)
    );
    assert_eq!(rx.open(&sealed, &mut out), Ok((61, NextHeader::Ipv4)));
}

#[test]
fn another_key_fails_authentication() {
    let (mut tx, _) = pair();
    let mut other = KEYMAT;
    other[35] ^= 1; // only the salt differs
    let mut rx = InboundSa::new(SPI, &other);
    let sealed = seal(&mut tx, &inner(40, false));
    let mut out = [0u8; 128];
    assert_eq!(rx.open(&sealed, &mut out), Err(DropReason::AuthFailed));
}

#[test]
fn truncated_and_misaligned_packets_are_malformed() {
    let (mut tx, mut rx) = pair();
    let sealed = seal(&mut tx, &inner(64, false));
    let mut out = [0u8; 128];
    for len in 0..MIN_LEN {
        let mut buf = sealed[..len].to_vec();
        assert_eq!(
            rx.open(&sealed[..len], &mut out),
            Err(DropReason::Truncated)
        );
        assert_eq!(rx.open_in_place(&mut buf), Err(DropReason::Truncated));
    }
    for len in MIN_LEN..sealed.len() {
        let expected = if (len - HEADER_LEN - ICV_LEN).is_multiple_of(4) {
            DropReason::AuthFailed
        } else {
            DropReason::Malformed
        };
        assert_eq!(rx.open(&sealed[..len], &mut out), Err(expected), "{len}");
    }
    // Sequence number 0 is never sent.
    let zero = seal_raw(&KEYMAT, SPI, 0, &[0x45, 0, 2, 4]);
    assert_eq!(rx.open(&zero, &mut out), Err(DropReason::Malformed));
    // An output buffer that cannot hold the payload.
    assert_eq!(
        rx.open(&sealed, &mut out[..10]),
        Err(DropReason::BufferTooSmall)
    );
    assert_eq!(rx.highest_sequence(), 0);
    assert_eq!(rx.open(&sealed, &mut out), Ok((64, NextHeader::Ipv4)));
}

/// Authentic packets whose trailer is wrong are refused after the ICV; they
/// still mark their sequence number (they did come from the peer).
#[test]
fn bad_padding_dummies_and_other_next_headers_are_refused() {
    let mut rx = InboundSa::new(SPI, &KEYMAT);
    let mut out = [0u8; 128];
    let cases: [(&[u8], Result<(), DropReason>); 7] = [
        // Padding 1, 3 instead of 1, 2.
        (&[1, 3, 2, 4], Err(DropReason::BadPadding)),
        // Padding 0, 0 (zeros are not the RFC 4303 pattern).
        (&[0, 0, 2, 4], Err(DropReason::BadPadding)),
        // Pad length beyond the payload.
        (&[9, 4], Err(DropReason::BadPadding)),
        // A dummy packet.
        (&[1, 1, 59], Err(DropReason::Dummy)),
        // UDP (17) where tunnel mode carries IP.
        (&[1, 1, 17], Err(DropReason::UnknownNextHeader)),
        // Transport-mode TCP.
        (&[1, 1, 6], Err(DropReason::UnknownNextHeader)),
        // Correct: padding 1, 2, 3 and IPv4.
        (&[1, 2, 3, 3, 4], Ok(())),
    ];
    for (seq, (trailer, expected)) in (1u32..).zip(cases) {
        // An inner "packet" that makes the encrypted part 4-byte aligned.
        let inner_len = 20 + (4 - trailer.len() % 4) % 4;
        let plain = [&vec![0x45; inner_len][..], trailer].concat();
        let pkt = seal_raw(&KEYMAT, SPI, seq, &plain);
        let opened = rx.open(&pkt, &mut out);
        assert_eq!(
            opened,
            expected.map(|()| (inner_len, NextHeader::Ipv4)),
            "{trailer:?}"
        );
        assert_eq!(rx.open(&pkt, &mut out), Err(DropReason::Replayed));
    }
    assert_eq!(rx.drops().get(DropReason::BadPadding), 3);
    assert_eq!(rx.drops().get(DropReason::Dummy), 1);
    assert_eq!(rx.drops().get(DropReason::UnknownNextHeader), 2);
    assert_eq!(rx.drops().get(DropReason::Replayed), 7);
    assert_eq!(rx.opened(), 1);
}

#[test]
fn replayed_and_too_old_packets_are_refused_before_decryption() {
    let (mut tx, mut rx) = pair();
    let packets: Vec<Vec<u8>> = (0..3000)
        .map(|_| seal(&mut tx, &inner(40, false)))
        .collect();
    let mut out = [0u8; 128];
    // Out of order inside the window: all accepted, once.
    for i in (0..1900).rev() {
        assert_eq!(
            rx.open(&packets[i], &mut out),
            Ok((40, NextHeader::Ipv4)),
            "{i}"
        );
    }
    assert_eq!(rx.open(&packets[5], &mut out), Err(DropReason::Replayed));
    assert_eq!(
        rx.open(&packets[2999], &mut out),
        Ok((40, NextHeader::Ipv4))
    );
    // Sequence 3000 is the top now: 1016 and below are out of the window.
    // `packets[i]` carries sequence number i + 1.
    let oldest = 3000 - WINDOW as usize;
    assert_eq!(
        rx.open(&packets[oldest - 1], &mut out),
        Err(DropReason::TooOld)
    );
    assert_eq!(
        rx.open(&packets[2500], &mut out),
        Ok((40, NextHeader::Ipv4))
    );
    assert_eq!(
        rx.open(&packets[oldest], &mut out),
        Err(DropReason::Replayed)
    );

    // A replay refused before decryption: a forged packet that reuses a
    // received sequence number counts as a replay, not an auth failure.
    let mut forged = packets[2999].clone();
    forged[40] ^= 1;
    assert_eq!(rx.open(&forged, &mut out), Err(DropReason::Replayed));
    assert_eq!(rx.drops().get(DropReason::AuthFailed), 0);
    assert_eq!(rx.drops().get(DropReason::Replayed), 3);
    assert_eq!(rx.drops().get(DropReason::TooOld), 1);
}

/// RFC 4303 §3.3.3: the counter never wraps. An SA that starts near the
/// end of the sequence space wants a rekey, seals up to 2^32 − 1, then
/// refuses; the receiver accepts the last numbers.
#[test]
fn sequence_numbers_run_out_at_2_to_the_32_minus_1() {
    let (mut tx, mut rx) = pair();
    tx.next_seq = u64::from(u32::MAX) - 2;
    assert!(tx.needs_rekey());
    let packet = inner(40, false);
    let mut out = [0u8; 128];
    for seq in [u32::MAX - 2, u32::MAX - 1, u32::MAX] {
        let sealed = seal(&mut tx, &packet);
        assert_eq!(&sealed[4..8], &seq.to_be_bytes());
        assert_eq!(rx.open(&sealed, &mut out), Ok((40, NextHeader::Ipv4)));
    }
    let mut buf = [0u8; 128];
    assert_eq!(tx.seal(&packet, &mut buf), Err(SealError::Exhausted));
    assert_eq!(tx.seal(&packet, &mut buf), Err(SealError::Exhausted));
    assert_eq!(tx.sealed(), u64::from(u32::MAX));
    assert_eq!(rx.highest_sequence(), u32::MAX);
}

#[test]
fn needs_rekey_turns_true_at_the_soft_limit() {
    let mut tx = OutboundSa::new(SPI, &KEYMAT).with_soft_limit(3);
    let packet = inner(40, false);
    for _ in 0..2 {
        seal(&mut tx, &packet);
        assert!(!tx.needs_rekey());
    }
    seal(&mut tx, &packet);
    assert!(tx.needs_rekey());

    let mut tx = OutboundSa::new(SPI, &KEYMAT);
    tx.next_seq = u64::from(DEFAULT_SOFT_LIMIT);
    assert!(!tx.needs_rekey());
    seal(&mut tx, &packet);
    assert!(tx.needs_rekey());
}

#[test]
fn wrong_spi_is_refused_before_decryption() {
    let (mut tx, _) = pair();
    let mut rx = InboundSa::new(SPI + 1, &KEYMAT);
    let sealed = seal(&mut tx, &inner(40, false));
    let mut out = [0u8; 128];
    assert_eq!(rx.open(&sealed, &mut out), Err(DropReason::WrongSpi));
    assert_eq!(rx.drops().get(DropReason::WrongSpi), 1);
}

#[proptest]
fn arbitrary_bytes_are_refused_without_panic(
    #[strategy(proptest::collection::vec(any::<u8>(), 0..200))] mut datagram: Vec<u8>,
    spi_matches: bool,
) {
    let mut rx = InboundSa::new(SPI, &KEYMAT);
    if spi_matches && datagram.len() >= 4 {
        datagram[..4].copy_from_slice(&SPI.to_be_bytes());
    }
    let mut out = [0u8; 256];
    prop_assert!(rx.open(&datagram, &mut out).is_err());
    prop_assert!(rx.open_in_place(&mut datagram).is_err());
    prop_assert_eq!(rx.drops().total(), 2);
}

#[test]
fn inner_packets_that_do_not_fit_their_next_header_are_refused() {
    let mut rx = InboundSa::new(SPI, &KEYMAT);
    let mut out = [0u8; 128];
    // (inner length, first byte, next header, accepted)
    let cases = [
        (0, 0x45, 4, false),
        (19, 0x45, 4, false),
        (20, 0x60, 4, false),
        (20, 0x45, 4, true),
        (39, 0x60, 41, false),
        (40, 0x45, 41, false),
        (40, 0x60, 41, true),
    ];
    for (seq, (len, first, nh, ok)) in (1u32..).zip(cases) {
        let mut packet = vec![first; len];
        packet.iter_mut().skip(1).for_each(|b| *b = 0);
        // Padding 1, 2, … so that the encrypted part is 4-byte aligned.
        let pad = (4 - (len + 2) % 4) % 4;
        packet.extend((1..=pad).map(|p| p as u8));
        packet.extend([pad as u8, nh]);
        let pkt = seal_raw(&KEYMAT, SPI, seq, &packet);
        let kind = if nh == 4 {
            NextHeader::Ipv4
        } else {
            NextHeader::Ipv6
        };
        let want = if ok {
            Ok((len, kind))
        } else {
            Err(DropReason::BadInner)
        };
        assert_eq!(rx.open(&pkt, &mut out), want, "{len} {first:#x} {nh}");
    }
    assert_eq!(rx.drops().get(DropReason::BadInner), 5);
    assert_eq!(rx.opened(), 2);
}
