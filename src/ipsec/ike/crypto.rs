//! The IKEv2 cryptography of the one suite this implementation speaks:
//! PRF-HMAC-SHA256, AES-GCM-16 with a 256-bit key for the SK payload
//! (RFC 5282), and Diffie-Hellman groups 31 (Curve25519, RFC 8031) and 14
//! (2048-bit MODP, RFC 3526).
//!
//! Key derivation follows RFC 7296: prf+ (§2.13), SKEYSEED and the SK_*
//! keys (§2.14), PSK authentication (§2.15), CHILD_SA key material (§2.17)
//! and the SKEYSEED of a rekeyed IKE SA (§2.18). With an AEAD cipher there
//! are no SK_ai/SK_ar; each SK_e is 36 bytes, the AES-256 key followed by
//! the 4-byte salt (RFC 5282 §7.1), and so is each ESP key (RFC 4106 §8.1).

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use crypto_bigint::modular::runtime_mod::{DynResidue, DynResidueParams};
use crypto_bigint::{Encoding, U256, U2048};
use hmac::{Hmac, Mac};
use rand::{CryptoRng, RngCore};
use sha2::Sha256;

use super::wire::{self, HEADER_LEN, Header, Payload};

/// Output length of PRF-HMAC-SHA256 (and the length of SK_d, SK_pi, SK_pr).
pub const PRF_LEN: usize = 32;
/// An AES-256-GCM key plus its 4-byte salt: the same for the SK payload
/// (RFC 5282 §7.1) and ESP (RFC 4106 §8.1).
pub const AEAD_KEY_LEN: usize = crate::ipsec::esp::KEYMAT_LEN;
/// The explicit IV of the SK payload (RFC 5282 §3.1).
pub const IV_LEN: usize = 8;
/// The 16-byte ICV of AES-GCM-16, as in ESP.
pub const ICV_LEN: usize = crate::ipsec::esp::ICV_LEN;
/// The nonce length we send (RFC 7296 §2.10: at least half the PRF key size).
pub const NONCE_LEN: usize = 32;

/// An AES-256-GCM key with its salt.
pub type AeadKey = [u8; AEAD_KEY_LEN];

/// Why a cryptographic step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The ICV did not verify, or the ciphertext is too short to hold one.
    #[error("integrity check failed")]
    Integrity,
    /// The decrypted padding length exceeds the plaintext.
    #[error("bad padding")]
    Padding,
    /// The peer's public value has the wrong length or is outside the group.
    #[error("invalid public value")]
    InvalidPublic,
}

/// PRF-HMAC-SHA256 (RFC 4868).
pub fn prf(key: &[u8], data: &[&[u8]]) -> [u8; PRF_LEN] {
    // HMAC accepts keys of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for d in data {
        mac.update(d);
    }
    mac.finalize().into_bytes().into()
}

/// prf+ (RFC 7296 §2.13): T1 = prf(K, S | 0x01), Tn = prf(K, Tn-1 | S | n).
pub fn prf_plus(key: &[u8], seed: &[&[u8]], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + PRF_LEN);
    let mut t: Vec<u8> = Vec::new();
    let mut n: u8 = 1;
    while out.len() < len {
        let mut parts: Vec<&[u8]> = Vec::with_capacity(seed.len() + 2);
        parts.push(&t);
        parts.extend_from_slice(seed);
        let counter = [n];
        parts.push(&counter);
        let block = prf(key, &parts);
        out.extend_from_slice(&block);
        t = block.to_vec();
        n = n.wrapping_add(1);
    }
    out.truncate(len);
    out
}

/// SKEYSEED = prf(Ni | Nr, g^ir) (RFC 7296 §2.14; with HMAC the whole
/// nonces are the key).
pub fn skeyseed(ni: &[u8], nr: &[u8], shared: &[u8]) -> [u8; PRF_LEN] {
    let mut key = Vec::with_capacity(ni.len() + nr.len());
    key.extend_from_slice(ni);
    key.extend_from_slice(nr);
    prf(&key, &[shared])
}

/// SKEYSEED of a new IKE SA from a rekey: prf(SK_d (old), g^ir (new) | Ni | Nr)
/// (RFC 7296 §2.18).
pub fn rekey_skeyseed(old_sk_d: &[u8], shared: &[u8], ni: &[u8], nr: &[u8]) -> [u8; PRF_LEN] {
    prf(old_sk_d, &[shared, ni, nr])
}

/// The keys of one IKE SA (RFC 7296 §2.14), wiped on drop.
#[derive(Clone, PartialEq, Eq, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub struct IkeKeys {
    pub sk_d: [u8; PRF_LEN],
    pub sk_ei: AeadKey,
    pub sk_er: AeadKey,
    pub sk_pi: [u8; PRF_LEN],
    pub sk_pr: [u8; PRF_LEN],
}

impl std::fmt::Debug for IkeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IkeKeys(<redacted>)")
    }
}

impl IkeKeys {
    /// {SK_d | SK_ei | SK_er | SK_pi | SK_pr} = prf+(SKEYSEED, Ni | Nr | SPIi | SPIr);
    /// no SK_ai/SK_ar with an AEAD.
    pub fn derive(skeyseed: &[u8], ni: &[u8], nr: &[u8], spi_i: u64, spi_r: u64) -> Self {
        let total = 3 * PRF_LEN + 2 * AEAD_KEY_LEN;
        let km = prf_plus(
            skeyseed,
            &[ni, nr, &spi_i.to_be_bytes(), &spi_r.to_be_bytes()],
            total,
        );
        let mut k = Self {
            sk_d: [0; PRF_LEN],
            sk_ei: [0; AEAD_KEY_LEN],
            sk_er: [0; AEAD_KEY_LEN],
            sk_pi: [0; PRF_LEN],
            sk_pr: [0; PRF_LEN],
        };
        let mut at = 0;
        for dst in [
            &mut k.sk_d[..],
            &mut k.sk_ei[..],
            &mut k.sk_er[..],
            &mut k.sk_pi[..],
            &mut k.sk_pr[..],
        ] {
            dst.copy_from_slice(&km[at..at + dst.len()]);
            at += dst.len();
        }
        k
    }
}

/// CHILD_SA key material (RFC 7296 §2.17): KEYMAT = prf+(SK_d, [g^ir (new) |]
/// Ni | Nr). The initiator→responder key comes first. Returns
/// `(initiator_to_responder, responder_to_initiator)`.
pub fn child_keys(sk_d: &[u8], shared: Option<&[u8]>, ni: &[u8], nr: &[u8]) -> (AeadKey, AeadKey) {
    let km = match shared {
        Some(g) => prf_plus(sk_d, &[g, ni, nr], 2 * AEAD_KEY_LEN),
        None => prf_plus(sk_d, &[ni, nr], 2 * AEAD_KEY_LEN),
    };
    let mut a = [0; AEAD_KEY_LEN];
    let mut b = [0; AEAD_KEY_LEN];
    a.copy_from_slice(&km[..AEAD_KEY_LEN]);
    b.copy_from_slice(&km[AEAD_KEY_LEN..]);
    (a, b)
}

/// The AUTH value of a PSK (RFC 7296 §2.15):
/// prf(prf(PSK, "Key Pad for IKEv2"), RealMessage | Nonce(other) | prf(SK_p, ID')).
/// `message` is the signer's own IKE_SA_INIT message as sent, `peer_nonce`
/// the other side's nonce data, `sk_p` the signer's SK_pi or SK_pr and
/// `id_body` its ID payload body ([`wire::Id::body`]).
pub fn psk_auth(
    psk: &[u8],
    message: &[u8],
    peer_nonce: &[u8],
    sk_p: &[u8],
    id_body: &[u8],
) -> [u8; PRF_LEN] {
    let maced_id = prf(sk_p, &[id_body]);
    let pad = prf(psk, &[b"Key Pad for IKEv2"]);
    prf(&pad, &[message, peer_nonce, &maced_id])
}

/// Constant-time equality of two byte strings (the length is not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    bool::from(subtle::ConstantTimeEq::ct_eq(a, b))
}

fn cipher(key: &AeadKey) -> (Aes256Gcm, [u8; 4]) {
    let c = Aes256Gcm::new_from_slice(&key[..32]).unwrap_or_else(|_| unreachable!());
    let mut salt = [0; 4];
    salt.copy_from_slice(&key[32..]);
    (c, salt)
}

fn nonce(salt: [u8; 4], iv: [u8; IV_LEN]) -> [u8; 12] {
    let mut n = [0; 12];
    n[..4].copy_from_slice(&salt);
    n[4..].copy_from_slice(&iv);
    n
}

/// AES-256-GCM with a 16-byte ICV, nonce = salt ‖ IV (RFC 5282 §3.1,
/// RFC 4106 §4): encrypts `buf` in place and returns the ICV.
pub fn aead_seal(key: &AeadKey, iv: [u8; IV_LEN], aad: &[u8], buf: &mut [u8]) -> [u8; ICV_LEN] {
    let (c, salt) = cipher(key);
    let n = nonce(salt, iv);
    // Only fails for plaintexts longer than GCM's 2^36 bytes.
    let tag = c
        .encrypt_in_place_detached(Nonce::from_slice(&n), aad, buf)
        .unwrap_or_else(|_| unreachable!());
    tag.into()
}

/// The inverse of [`aead_seal`].
pub fn aead_open(
    key: &AeadKey,
    iv: [u8; IV_LEN],
    aad: &[u8],
    buf: &mut [u8],
    icv: &[u8],
) -> Result<(), CryptoError> {
    if icv.len() != ICV_LEN {
        return Err(CryptoError::Integrity);
    }
    let (c, salt) = cipher(key);
    let n = nonce(salt, iv);
    c.decrypt_in_place_detached(Nonce::from_slice(&n), aad, buf, Tag::from_slice(icv))
        .map_err(|_| CryptoError::Integrity)
}

/// A message whose payloads all travel in an SK payload (RFC 7296 §3.14,
/// RFC 5282 §5): header ‖ SK header ‖ IV ‖ ciphertext(payloads ‖ pad length
/// 0) ‖ ICV, the AAD being everything before the IV. `iv` must never repeat
/// under one key.
pub fn encode_encrypted(
    mut header: Header,
    payloads: &[Payload],
    key: &AeadKey,
    iv: [u8; IV_LEN],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.resize(HEADER_LEN + 4 + IV_LEN, 0);
    let first = wire::write_chain(payloads, &mut out);
    out.push(0); // pad length: GCM needs no padding (RFC 5282 §3.2)
    let total = out.len() + ICV_LEN;
    header.next_payload = wire::payload::SK;
    header.length = total as u32;
    let mut h = Vec::with_capacity(HEADER_LEN);
    header.write(&mut h);
    out[..HEADER_LEN].copy_from_slice(&h);
    let sk_len = (total - HEADER_LEN) as u16;
    out[HEADER_LEN] = first;
    out[HEADER_LEN + 1] = 0;
    out[HEADER_LEN + 2..HEADER_LEN + 4].copy_from_slice(&sk_len.to_be_bytes());
    out[HEADER_LEN + 4..HEADER_LEN + 4 + IV_LEN].copy_from_slice(&iv);
    let (aad, rest) = out.split_at_mut(HEADER_LEN + 4);
    let icv = aead_seal(key, iv, aad, &mut rest[IV_LEN..]);
    out.extend_from_slice(&icv);
    out
}

/// Decrypts the SK payload whose body is `msg[body]` and returns the
/// plaintext payload chain (padding removed).
pub fn open_encrypted(
    msg: &[u8],
    body: std::ops::Range<usize>,
    key: &AeadKey,
) -> Result<Vec<u8>, CryptoError> {
    let b = msg.get(body.clone()).ok_or(CryptoError::Integrity)?;
    if b.len() < IV_LEN + 1 + ICV_LEN {
        return Err(CryptoError::Integrity);
    }
    let mut iv = [0; IV_LEN];
    iv.copy_from_slice(&b[..IV_LEN]);
    let (ct, icv) = b[IV_LEN..].split_at(b.len() - IV_LEN - ICV_LEN);
    let mut pt = ct.to_vec();
    aead_open(key, iv, &msg[..body.start], &mut pt, icv)?;
    let pad = usize::from(pt[pt.len() - 1]);
    if pad + 1 > pt.len() {
        return Err(CryptoError::Padding);
    }
    pt.truncate(pt.len() - pad - 1);
    Ok(pt)
}

/// The Diffie-Hellman groups this implementation offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DhGroup {
    /// Curve25519 (RFC 8031), transform ID 31.
    Curve25519,
    /// 2048-bit MODP (RFC 3526 §3), transform ID 14.
    Modp2048,
}

impl DhGroup {
    /// The transform ID.
    pub fn id(self) -> u16 {
        match self {
            DhGroup::Curve25519 => wire::transform::DH_CURVE25519,
            DhGroup::Modp2048 => wire::transform::DH_MODP_2048,
        }
    }

    /// The group with transform ID `id`, if supported.
    pub fn from_id(id: u16) -> Option<Self> {
        match id {
            wire::transform::DH_CURVE25519 => Some(DhGroup::Curve25519),
            wire::transform::DH_MODP_2048 => Some(DhGroup::Modp2048),
            _ => None,
        }
    }

    /// Length of the public value in the KE payload.
    pub fn public_len(self) -> usize {
        match self {
            DhGroup::Curve25519 => 32,
            DhGroup::Modp2048 => 256,
        }
    }
}

/// RFC 3526 §3: the 2048-bit MODP prime (generator 2).
const MODP2048_P: U2048 = U2048::from_be_hex(concat!(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD1",
    "29024E088A67CC74020BBEA63B139B22514A08798E3404DD",
    "EF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245",
    "E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED",
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3D",
    "C2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F",
    "83655D23DCA3AD961C62F356208552BB9ED529077096966D",
    "670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B",
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9",
    "DE2BCBF6955817183995497CEA956AE515D2261898FA0510",
    "15728E5A8AACAA68FFFFFFFFFFFFFFFF",
));

/// One side's ephemeral Diffie-Hellman secret.
#[derive(Clone)]
pub enum DhSecret {
    Curve25519(x25519_dalek::StaticSecret),
    /// The exponent, and the public value computed once from it.
    Modp2048 {
        x: Box<U256>,
        public: Box<[u8; 256]>,
    },
}

impl std::fmt::Debug for DhSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DhSecret({:?}, <redacted>)", self.group())
    }
}

impl DhSecret {
    /// A fresh secret for `group`.
    pub fn generate(group: DhGroup, rng: &mut (impl RngCore + CryptoRng)) -> Self {
        match group {
            DhGroup::Curve25519 => {
                let mut b = [0; 32];
                rng.fill_bytes(&mut b);
                DhSecret::Curve25519(x25519_dalek::StaticSecret::from(b))
            }
            DhGroup::Modp2048 => {
                // A 256-bit exponent: twice the ~110–128-bit strength of the
                // 2048-bit group, within the 220–320 bits RFC 3526 §8
                // suggests for it, and some 8 times cheaper than a full-size
                // one in both exponentiations.
                let mut b = [0; 32];
                rng.fill_bytes(&mut b);
                let x = U256::from_be_slice(&b);
                let public = modp_pow(&U2048::from_u8(2), &x).to_be_bytes();
                DhSecret::Modp2048 {
                    x: Box::new(x),
                    public: Box::new(public),
                }
            }
        }
    }

    pub fn group(&self) -> DhGroup {
        match self {
            DhSecret::Curve25519(_) => DhGroup::Curve25519,
            DhSecret::Modp2048 { .. } => DhGroup::Modp2048,
        }
    }

    /// Our public value, as sent in the KE payload.
    pub fn public(&self) -> Vec<u8> {
        match self {
            DhSecret::Curve25519(s) => x25519_dalek::PublicKey::from(s).as_bytes().to_vec(),
            DhSecret::Modp2048 { public, .. } => public.to_vec(),
        }
    }

    /// g^ir from the peer's public value. Curve25519: an all-zero result
    /// is refused (RFC 8031 §2.3). MODP: the peer's value must satisfy
    /// 1 < y < p-1 (RFC 7296 §5 / RFC 6989 §2.1).
    pub fn shared(&self, peer: &[u8]) -> Result<Vec<u8>, CryptoError> {
        match self {
            DhSecret::Curve25519(s) => {
                let p: [u8; 32] = peer.try_into().map_err(|_| CryptoError::InvalidPublic)?;
                let g = s.diffie_hellman(&x25519_dalek::PublicKey::from(p));
                if !g.was_contributory() {
                    return Err(CryptoError::InvalidPublic);
                }
                Ok(g.as_bytes().to_vec())
            }
            DhSecret::Modp2048 { x, .. } => {
                if peer.len() != 256 {
                    return Err(CryptoError::InvalidPublic);
                }
                let y = U2048::from_be_slice(peer);
                let p_minus_1 = MODP2048_P.wrapping_sub(&U2048::ONE);
                if y <= U2048::ONE || y >= p_minus_1 {
                    return Err(CryptoError::InvalidPublic);
                }
                Ok(modp_pow(&y, x).to_be_bytes().to_vec())
            }
        }
    }
}

fn modp_pow(base: &U2048, exp: &U256) -> U2048 {
    let params = DynResidueParams::new(&MODP2048_P);
    DynResidue::new(base, params).pow(exp).retrieve()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn rfc4231_hmac_sha256() {
        // Test cases 1, 2 and 6 (a key longer than the block).
        assert_eq!(
            prf(&[0x0b; 20], &[b"Hi There"]).to_vec(),
            hex("b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7")
        );
        assert_eq!(
            prf(b"Jefe", &[b"what do ya ", b"want for nothing?"]).to_vec(),
            hex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
        );
        assert_eq!(
            prf(
                &[0xaa; 131],
                &[b"Test Using Larger Than Block-Size Key - Hash Key First"]
            )
            .to_vec(),
            hex("60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54")
        );
    }

    #[test]
    fn prf_plus_is_the_t_chain() {
        let (k, s) = (b"key".as_slice(), b"seed".as_slice());
        let out = prf_plus(k, &[s], 70);
        let t1 = prf(k, &[s, &[1]]);
        let t2 = prf(k, &[&t1, s, &[2]]);
        let t3 = prf(k, &[&t2, s, &[3]]);
        assert_eq!(out.len(), 70);
        assert_eq!(&out[..32], &t1);
        assert_eq!(&out[32..64], &t2);
        assert_eq!(&out[64..], &t3[..6]);
    }

    #[test]
    fn rfc7748_x25519_vectors() {
        let k = hex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4");
        let u = hex("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c");
        let out = x25519_dalek::x25519(k.try_into().unwrap(), u.try_into().unwrap());
        assert_eq!(
            out.to_vec(),
            hex("c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552")
        );
        // §5.2 iteration: one round from k = u = 9.
        let mut nine = [0; 32];
        nine[0] = 9;
        assert_eq!(
            x25519_dalek::x25519(nine, nine).to_vec(),
            hex("422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079")
        );
        // §6.1 through our DhSecret: both sides agree on the published K.
        let a = DhSecret::Curve25519(x25519_dalek::StaticSecret::from(
            <[u8; 32]>::try_from(hex(
                "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
            ))
            .unwrap(),
        ));
        let b_pub = hex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f");
        assert_eq!(
            a.public(),
            hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
        assert_eq!(
            a.shared(&b_pub).unwrap(),
            hex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
        );
        // The all-zero point (low order) yields an all-zero secret: refused.
        assert_eq!(a.shared(&[0; 32]), Err(CryptoError::InvalidPublic));
        assert_eq!(a.shared(&[1; 31]), Err(CryptoError::InvalidPublic));
    }

    #[test]
    fn aes256_gcm_vector_as_sk_payload() {
        // GCM specification (McGrew/Viega) test case 16: 256-bit key,
        // 96-bit IV = salt ‖ explicit IV as RFC 5282 builds it.
        let mut key = [0; AEAD_KEY_LEN];
        key[..32].copy_from_slice(&hex(
            "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
        ));
        key[32..].copy_from_slice(&hex("cafebabe"));
        let iv: [u8; 8] = hex("facedbaddecaf888").try_into().unwrap();
        let aad = hex("feedfacedeadbeeffeedfacedeadbeefabaddad2");
        let mut buf = hex(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
             1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        );
        let icv = aead_seal(&key, iv, &aad, &mut buf);
        assert_eq!(
            buf,
            hex(
                "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa\
                 8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
            )
        );
        assert_eq!(icv.to_vec(), hex("76fc6ece0f4e1768cddf8853bb2d551b"));
        aead_open(&key, iv, &aad, &mut buf, &icv).unwrap();
        assert_eq!(&buf[..4], &hex("d9313225")[..]);
    }

    #[test]
    fn sk_payload_round_trip_and_tamper() {
        let key = [7; AEAD_KEY_LEN];
        let h = Header {
            spi_i: 1,
            spi_r: 2,
            next_payload: 0,
            exchange: wire::exchange::IKE_AUTH,
            flags: wire::flags::INITIATOR,
            message_id: 1,
            length: 0,
        };
        let payloads = vec![
            Payload::Nonce(vec![3; 20]),
            Payload::notify(wire::notify::INITIAL_CONTACT, &[]),
        ];
        let msg = encode_encrypted(h, &payloads, &key, [9; 8]);
        let m = wire::parse(&msg).unwrap();
        let (first, body) = m.chain.encrypted.clone().unwrap();
        let pt = open_encrypted(&msg, body.clone(), &key).unwrap();
        assert_eq!(wire::parse_chain(&pt, 0, first).unwrap().payloads, payloads);
        // Any flipped bit, in the header (AAD) or the body, fails the ICV.
        for i in [0, 20, HEADER_LEN + 2, msg.len() - 1, msg.len() - 20] {
            let mut bad = msg.clone();
            bad[i] ^= 1;
            assert_eq!(
                open_encrypted(&bad, body.clone(), &key),
                Err(CryptoError::Integrity),
                "byte {i}"
            );
        }
        assert_eq!(
            open_encrypted(&msg, body, &[8; AEAD_KEY_LEN]),
            Err(CryptoError::Integrity)
        );
    }

    #[test]
    fn ct_eq_compares_content_and_length() {
        assert!(ct_eq(b"same bytes", b"same bytes"));
        assert!(!ct_eq(b"same bytes", b"same bytez"));
        assert!(!ct_eq(b"same bytes", b"same byte"));
        assert!(ct_eq(b"", b""));
    }

    #[test]
    fn modp2048_exponent_is_256_bits_and_public_is_cached() {
        // The exponent is the first 32 bytes drawn, nothing more.
        let seed = [0x5a; 32];
        let mut rng = rand::rngs::StdRng::from_seed(seed);
        let mut b = [0; 32];
        rng.fill_bytes(&mut b);
        let mut rng = rand::rngs::StdRng::from_seed(seed);
        let a = DhSecret::generate(DhGroup::Modp2048, &mut rng);
        let full = U2048::from_be_slice(&[[0; 224].as_slice(), &b].concat());
        let params = DynResidueParams::new(&MODP2048_P);
        let want = DynResidue::new(&U2048::from_u8(2), params)
            .pow(&full)
            .retrieve();
        assert_eq!(a.public(), want.to_be_bytes().to_vec());
        let DhSecret::Modp2048 { public, .. } = &a else {
            panic!("group")
        };
        assert_eq!(public.to_vec(), a.public());
    }

    #[test]
    fn modp2048_agreement_and_range_check() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let a = DhSecret::generate(DhGroup::Modp2048, &mut rng);
        let b = DhSecret::generate(DhGroup::Modp2048, &mut rng);
        let (pa, pb) = (a.public(), b.public());
        assert_eq!(pa.len(), 256);
        assert_ne!(pa, pb);
        let s = a.shared(&pb).unwrap();
        assert_eq!(s, b.shared(&pa).unwrap());
        assert_eq!(s.len(), 256);
        let p = MODP2048_P.to_be_bytes();
        let p_minus_1 = MODP2048_P.wrapping_sub(&U2048::ONE).to_be_bytes();
        let mut one = [0; 256];
        one[255] = 1;
        for bad in [
            &[0u8; 256][..],
            &one,
            &p_minus_1,
            &p,
            &[0xff; 256],
            &pb[1..],
        ] {
            assert_eq!(a.shared(bad), Err(CryptoError::InvalidPublic));
        }
        // g = 2 is inside the range and agrees like any value.
        let mut two = [0; 256];
        two[255] = 2;
        assert!(a.shared(&two).is_ok());
    }

    #[test]
    fn derived_key_layout() {
        let seed = skeyseed(&[1; 32], &[2; 32], &[3; 32]);
        let k = IkeKeys::derive(&seed, &[1; 32], &[2; 32], 10, 20);
        let km = prf_plus(
            &seed,
            &[
                &[1; 32],
                &[2; 32],
                &10u64.to_be_bytes(),
                &20u64.to_be_bytes(),
            ],
            168,
        );
        assert_eq!(&km[..32], &k.sk_d);
        assert_eq!(&km[32..68], &k.sk_ei);
        assert_eq!(&km[68..104], &k.sk_er);
        assert_eq!(&km[104..136], &k.sk_pi);
        assert_eq!(&km[136..], &k.sk_pr);
        let (i2r, r2i) = child_keys(&k.sk_d, None, &[1; 32], &[2; 32]);
        assert_eq!(
            prf_plus(&k.sk_d, &[&[1; 32], &[2; 32]], 72),
            [&i2r[..], &r2i[..]].concat()
        );
        let (pfs, _) = child_keys(&k.sk_d, Some(&[5; 32]), &[1; 32], &[2; 32]);
        assert_ne!(pfs, i2r);
        let re = rekey_skeyseed(&k.sk_d, &[5; 32], &[1; 32], &[2; 32]);
        assert_eq!(re, prf(&k.sk_d, &[&[5; 32], &[1; 32], &[2; 32]]));
    }
}

/// The key schedule, AUTH and the codec checked against what strongSwan
/// 5.9.8 derived and sent in real exchanges (tests/fixtures/ike/).
#[cfg(test)]
mod strongswan_fixtures {
    use super::*;
    use std::collections::BTreeMap;

    fn load(text: &str) -> BTreeMap<String, Vec<u8>> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            // Values that are not hex (the transform names) are kept empty.
            .map(|(k, v)| {
                let v = v.trim();
                let bytes: Option<Vec<u8>> = (0..v.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(v.get(i..i + 2)?, 16).ok())
                    .collect();
                (k.trim().to_owned(), bytes.unwrap_or_default())
            })
            .collect()
    }

    fn u64_of(b: &[u8]) -> u64 {
        u64::from_be_bytes(b.try_into().unwrap())
    }

    fn check(text: &str) {
        let f = load(text);
        let v = |k: &str| {
            f.get(k)
                .unwrap_or_else(|| panic!("fixture lacks {k}"))
                .as_slice()
        };
        let (ni, nr) = (v("ni"), v("nr"));
        let seed = skeyseed(ni, nr, v("g_ir"));
        assert_eq!(seed.as_slice(), v("skeyseed"));
        let k = IkeKeys::derive(&seed, ni, nr, u64_of(v("spi_i")), u64_of(v("spi_r")));
        assert_eq!(k.sk_d.as_slice(), v("sk_d"));
        assert_eq!(k.sk_ei.as_slice(), v("sk_ei"));
        assert_eq!(k.sk_er.as_slice(), v("sk_er"));
        assert_eq!(k.sk_pi.as_slice(), v("sk_pi"));
        assert_eq!(k.sk_pr.as_slice(), v("sk_pr"));
        assert!(v("sk_ai").is_empty() && v("sk_ar").is_empty());
        let (req, resp) = (v("ike_sa_init_request"), v("ike_sa_init_response"));
        assert_eq!(
            psk_auth(v("psk"), req, nr, &k.sk_pi, v("id_i")).as_slice(),
            v("auth_i")
        );
        assert_eq!(
            psk_auth(v("psk"), resp, ni, &k.sk_pr, v("id_r")).as_slice(),
            v("auth_r")
        );
        // Our codec reads strongSwan's IKE_SA_INIT messages: KE and nonces.
        for (msg, ke, n) in [(req, v("ke_i"), ni), (resp, v("ke_r"), nr)] {
            let m = wire::parse(msg).unwrap();
            assert!(
                m.chain
                    .payloads
                    .iter()
                    .any(|p| matches!(p, Payload::Ke { data, .. } if data == ke))
            );
            assert!(m.chain.payloads.contains(&Payload::Nonce(n.to_vec())));
        }
        // The IKE_AUTH messages decrypt with SK_ei / SK_er and carry the AUTH values.
        for (msg, key, auth) in [
            (v("ike_auth_request"), &k.sk_ei, v("auth_i")),
            (v("ike_auth_response"), &k.sk_er, v("auth_r")),
        ] {
            let m = wire::parse(msg).unwrap();
            let (first, body) = m.chain.encrypted.unwrap();
            let pt = open_encrypted(msg, body, key).unwrap();
            let inner = wire::parse_chain(&pt, 0, first).unwrap();
            assert!(
                inner
                    .payloads
                    .iter()
                    .any(|p| matches!(p, Payload::Auth { data, .. } if data == auth))
            );
        }
        let (i2r, r2i) = child_keys(&k.sk_d, None, ni, nr);
        assert_eq!(i2r.as_slice(), v("child_key_i"));
        assert_eq!(r2i.as_slice(), v("child_key_r"));
        let (i2r, r2i) = child_keys(
            &k.sk_d,
            Some(v("rekey_child_g_ir")),
            v("rekey_child_ni"),
            v("rekey_child_nr"),
        );
        assert_eq!(i2r.as_slice(), v("rekey_child_key_i"));
        assert_eq!(r2i.as_slice(), v("rekey_child_key_r"));
        let (rni, rnr) = (v("rekey_ike_ni"), v("rekey_ike_nr"));
        let seed = rekey_skeyseed(&k.sk_d, v("rekey_ike_g_ir"), rni, rnr);
        assert_eq!(seed.as_slice(), v("rekey_ike_skeyseed"));
        let n = IkeKeys::derive(
            &seed,
            rni,
            rnr,
            u64_of(v("rekey_ike_spi_i")),
            u64_of(v("rekey_ike_spi_r")),
        );
        assert_eq!(n.sk_d.as_slice(), v("rekey_ike_sk_d"));
        assert_eq!(n.sk_ei.as_slice(), v("rekey_ike_sk_ei"));
        assert_eq!(n.sk_er.as_slice(), v("rekey_ike_sk_er"));
        assert_eq!(n.sk_pi.as_slice(), v("rekey_ike_sk_pi"));
        assert_eq!(n.sk_pr.as_slice(), v("rekey_ike_sk_pr"));
    }

    #[test]
    fn strongswan_x25519_exchange() {
        check(include_str!("../../../tests/fixtures/ike/x25519.txt"));
    }

    #[test]
    fn strongswan_modp2048_exchange() {
        check(include_str!("../../../tests/fixtures/ike/modp2048.txt"));
    }
}
