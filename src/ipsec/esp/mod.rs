//! ESP in tunnel mode (RFC 4303) with AES-GCM-16-256 (RFC 4106), as carried
//! in UDP on port 4500 (RFC 3948).
//!
//! An ESP SA is one direction: [`OutboundSa`] seals inner IP packets into
//! ESP packets, [`InboundSa`] opens them. IKEv2 makes them in pairs from a
//! CHILD_SA's SPIs and its 36 bytes of keying material each (RFC 4106 §8.1:
//! a 32-byte AES key, then a 4-byte salt).
//!
//! ```text
//!  0               4               8                              16
//! +---------------+---------------+-------------------------------+
//! |      SPI      |   Sequence    |  IV (8 bytes: the sequence)   |  header, AAD = SPI ‖ sequence
//! +---------------+---------------+-------------------------------+
//! |  inner IP packet … | padding 1,2,3… | pad length | next header |  encrypted
//! +---------------------------------------------------------------+
//! |                       ICV (16 bytes)                          |
//! +---------------------------------------------------------------+
//! ```
//!
//! - The nonce is salt ‖ IV (RFC 4106 §4). The IV is the 64-bit big-endian
//!   sequence number, which never repeats under one key (RFC 4106 §3.1).
//! - The AAD is SPI ‖ 32-bit sequence number; extended sequence numbers are
//!   not negotiated (RFC 4106 §5).
//! - Padding aligns the encrypted part to 4 bytes (RFC 4106 §3.2) with the
//!   bytes 1, 2, 3, … which the receiver checks (RFC 4303 §2.4).
//! - Next header 4 is an IPv4 packet, 41 an IPv6 packet (tunnel mode);
//!   59 marks a dummy packet that the receiver drops (RFC 4303 §2.6).
//!
//! **The per-packet path allocates nothing** and works in the caller's
//! buffers: [`OutboundSa::seal_in_place`] encrypts an inner packet that was
//! read into a buffer [`HEADER_LEN`] bytes in, [`InboundSa::open_in_place`]
//! decrypts in the receive buffer. [`OutboundSa::seal`] and
//! [`InboundSa::open`] copy once, for callers whose input is elsewhere.
//! The AES key schedule and GHASH key are computed once, in `new`.
//!
//! **Inbound order of checks** (RFC 4303 §3.4): the length and the SPI, then
//! the anti-replay window ([`replay`]), then the ICV, then the window is
//! updated, then the padding and the next header. Each refusal is counted by
//! its [`DropReason`].
//!
//! **Sequence numbers** (RFC 4303 §3.3.3): the first packet is 1; after
//! 2^32 − 1 packets [`OutboundSa::seal`] refuses, since the counter must not
//! wrap. [`OutboundSa::needs_rekey`] turns true at a soft limit well before,
//! for IKEv2 to replace the SA in time.
//!
//! **Workers.** An SA belongs to the worker that owns its peer, like a
//! WireGuard tunnel: both directions are plain `&mut self`, no locks. The
//! anti-replay window of 1984 packets absorbs the reordering of batched,
//! multi-queue IO on the way.
//!
//! [`natt`] tells ESP from IKE and keepalives on UDP 4500; [`spi`] puts the
//! gateway's 24-bit tunnel index into its inbound SPIs.

pub mod natt;
pub mod replay;
pub mod spi;

#[cfg(test)]
mod tests;

use std::fmt;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};

use self::replay::{Refused, ReplayWindow};

/// SPI, sequence number and IV in front of the encrypted part.
pub const HEADER_LEN: usize = 16;
/// The ICV after it: AES-GCM with a 16-byte tag (RFC 4106 §6).
pub const ICV_LEN: usize = 16;
/// Keying material of one SA: a 256-bit AES key, then a 4-byte salt
/// (RFC 4106 §8.1).
pub const KEYMAT_LEN: usize = 36;
/// The shortest valid ESP packet: the header, pad length and next header
/// padded to 4 bytes, the ICV.
pub const MIN_LEN: usize = HEADER_LEN + 4 + ICV_LEN;
/// Bytes an ESP packet adds to an inner packet at most: header, up to 3
/// bytes of padding, pad length, next header, ICV.
pub const MAX_OVERHEAD: usize = HEADER_LEN + 3 + 2 + ICV_LEN;
/// The default soft limit of [`OutboundSa::needs_rekey`]: three quarters of
/// the sequence space, which leaves 2^30 packets (about 20 minutes at
/// 10 Gbit/s of 1420-byte packets) for IKEv2 to rekey.
pub const DEFAULT_SOFT_LIMIT: u32 = 0xC000_0000;

/// "No next header": a dummy packet (RFC 4303 §2.6).
const NEXT_HEADER_NONE: u8 = 59;

/// The length of the ESP packet that seals an inner packet of `inner_len`
/// bytes.
pub const fn sealed_len(inner_len: usize) -> usize {
    HEADER_LEN + inner_len + pad_len(inner_len) + 2 + ICV_LEN
}

/// Padding that aligns inner packet, pad length and next header to 4 bytes.
const fn pad_len(inner_len: usize) -> usize {
    (4 - (inner_len + 2) % 4) % 4
}

/// What an ESP packet carries (its next header, RFC 4303 §2.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextHeader {
    /// An IPv4 packet (IP protocol 4).
    Ipv4,
    /// An IPv6 packet (IP protocol 41).
    Ipv6,
}

impl NextHeader {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Self::Ipv4 => 4,
            Self::Ipv6 => 41,
        }
    }
}

crate::drops::drop_reasons! {
    /// Why an inbound SA refused an ESP packet. Payload-free so it can
    /// index counters; the label is the metrics label.
    enum DropReason;
    /// Shorter than the header, the shortest trailer and the ICV.
    Truncated = "truncated",
    /// The encrypted part is not 4-byte aligned (RFC 4303 §2.4), or the
    /// sequence number is 0, which no sender uses (RFC 4303 §3.3.3).
    Malformed = "malformed",
    /// Not this SA's SPI.
    WrongSpi = "wrong_spi",
    /// A sequence number already received (RFC 4303 §3.4.3).
    Replayed = "replayed",
    /// A sequence number below the anti-replay window.
    TooOld = "too_old",
    /// The ICV did not verify: forged, corrupted or for another key.
    AuthFailed = "auth_failed",
    /// Pad length longer than the packet, or padding bytes other than
    /// 1, 2, 3, … (RFC 4303 §2.4).
    BadPadding = "bad_padding",
    /// A dummy packet (next header 59, RFC 4303 §2.6): authentic, dropped.
    Dummy = "dummy",
    /// A next header other than IPv4 (4) or IPv6 (41).
    UnknownNextHeader = "unknown_next_header",
    /// The inner packet does not fit its next header: shorter than the IPv4
    /// (20 bytes) or IPv6 (40 bytes) header, or of the other IP version.
    BadInner = "bad_inner",
    /// The caller's output buffer was too small.
    BufferTooSmall = "buffer_too_small",
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for DropReason {}

/// Why [`OutboundSa::seal`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// All 2^32 − 1 sequence numbers are used: the SA must be replaced
    /// (RFC 4303 §3.3.3).
    #[error("sequence numbers exhausted")]
    Exhausted,
    /// The inner packet is neither IPv4 nor IPv6, or shorter than its
    /// version's header.
    #[error("inner packet is not IPv4 or IPv6")]
    NotIp,
    /// The output buffer is shorter than [`sealed_len`].
    #[error("output buffer too small")]
    BufferTooSmall,
}

/// The AEAD and the salt of one SA.
///
/// ESP's AES-GCM is *ring*'s (assembly with AES-NI and CLMUL, about twice as
/// fast per packet as the portable RustCrypto `aes-gcm` that the IKE engine
/// uses for its few messages): on the data path it is most of the cost.
/// The key schedule lives in *ring*'s key; the key material given to
/// [`Cipher::new`] stays with the caller, which wipes it.
struct Cipher {
    aead: LessSafeKey,
    salt: [u8; 4],
}

impl Cipher {
    fn new(keymat: &[u8; KEYMAT_LEN]) -> Self {
        let (key, salt) = keymat.split_at(32);
        let mut salt_bytes = [0u8; 4];
        salt_bytes.copy_from_slice(salt);
        Self {
            // A 32-byte key is all AES-256-GCM asks for, so this never fails.
            #[allow(clippy::expect_used)]
            aead: LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte AES-256 key"),
            ),
            salt: salt_bytes,
        }
    }

    /// Salt ‖ IV (RFC 4106 §4). An IV is the SA's sequence number, used
    /// once per key (the sender refuses to wrap, see [`OutboundSa`]).
    fn nonce(&self, iv: &[u8; 8]) -> Nonce {
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&self.salt);
        n[4..].copy_from_slice(iv);
        Nonce::assume_unique_for_key(n)
    }
}

/// The sending half of a CHILD_SA.
pub struct OutboundSa {
    spi: u32,
    cipher: Cipher,
    /// The next sequence number to use; past `u32::MAX` the SA is used up.
    next_seq: u64,
    soft_limit: u32,
}

impl fmt::Debug for OutboundSa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboundSa")
            .field("spi", &format_args!("{:#010x}", self.spi))
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

impl OutboundSa {
    /// An SA sending with the peer's `spi` and the keying material IKEv2
    /// derived for this direction. The first packet gets sequence number 1.
    pub fn new(spi: u32, keymat: &[u8; KEYMAT_LEN]) -> Self {
        Self {
            spi,
            cipher: Cipher::new(keymat),
            next_seq: 1,
            soft_limit: DEFAULT_SOFT_LIMIT,
        }
    }

    /// Sets after how many sealed packets [`OutboundSa::needs_rekey`] turns
    /// true.
    #[must_use]
    pub fn with_soft_limit(mut self, packets: u32) -> Self {
        self.soft_limit = packets;
        self
    }

    /// The SPI the peer chose for this direction.
    pub fn spi(&self) -> u32 {
        self.spi
    }

    /// How many packets this SA has sealed.
    pub fn sealed(&self) -> u64 {
        self.next_seq - 1
    }

    /// Whether the SA has sealed as many packets as its soft limit: time
    /// for IKEv2 to make a new CHILD_SA before [`SealError::Exhausted`].
    pub fn needs_rekey(&self) -> bool {
        self.sealed() >= u64::from(self.soft_limit)
    }

    /// Seals the inner IP packet `inner` into `out`, which must hold
    /// [`sealed_len`]`(inner.len())` bytes. Returns the ESP packet's length.
    ///
    /// # Errors
    /// [`SealError`]; nothing is consumed then.
    pub fn seal(&mut self, inner: &[u8], out: &mut [u8]) -> Result<usize, SealError> {
        let body = out
            .get_mut(HEADER_LEN..HEADER_LEN + inner.len())
            .ok_or(SealError::BufferTooSmall)?;
        body.copy_from_slice(inner);
        self.seal_in_place(out, inner.len())
    }

    /// Seals the inner IP packet at `buf[HEADER_LEN..HEADER_LEN + inner_len]`
    /// in place: writes the header in front, padding and the ICV behind.
    /// `buf` must hold [`sealed_len`]`(inner_len)` bytes. Returns the ESP
    /// packet's length, starting at `buf[0]`.
    ///
    /// # Errors
    /// [`SealError`]; nothing is consumed then, and the inner packet is
    /// left where it was.
    pub fn seal_in_place(&mut self, buf: &mut [u8], inner_len: usize) -> Result<usize, SealError> {
        let len = sealed_len(inner_len);
        let buf = buf.get_mut(..len).ok_or(SealError::BufferTooSmall)?;
        let next_header = match buf.get(HEADER_LEN).map(|b| b >> 4) {
            // No shorter than the IP header: the receiver refuses less.
            Some(4) if inner_len >= 20 => NextHeader::Ipv4,
            Some(6) if inner_len >= 40 => NextHeader::Ipv6,
            _ => return Err(SealError::NotIp),
        };
        let seq = u32::try_from(self.next_seq).map_err(|_| SealError::Exhausted)?;
        self.next_seq += 1;

        let (header, rest) = buf.split_at_mut(HEADER_LEN);
        let (plain, icv) = rest.split_at_mut(len - HEADER_LEN - ICV_LEN);
        header[..4].copy_from_slice(&self.spi.to_be_bytes());
        header[4..8].copy_from_slice(&seq.to_be_bytes());
        let iv = u64::from(seq).to_be_bytes();
        header[8..].copy_from_slice(&iv);

        let trailer = &mut plain[inner_len..];
        let pad = trailer.len() - 2;
        for (i, b) in trailer[..pad].iter_mut().enumerate() {
            // 1, 2, 3, … (RFC 4303 §2.4); `pad` is at most 3.
            *b = i as u8 + 1;
        }
        trailer[pad] = pad as u8;
        trailer[pad + 1] = next_header.number();

        let nonce = self.cipher.nonce(&iv);
        let tag = self
            .cipher
            .aead
            .seal_in_place_separate_tag(nonce, Aad::from(&header[..8]), plain)
            // AES-GCM refuses only inputs over 2^36 bytes; a slice of one
            // datagram never is one.
            .map_err(|_| SealError::BufferTooSmall)?;
        icv.copy_from_slice(tag.as_ref());
        Ok(len)
    }
}

/// The receiving half of a CHILD_SA.
pub struct InboundSa {
    spi: u32,
    cipher: Cipher,
    window: ReplayWindow,
    opened: u64,
    drops: DropCounters,
}

impl fmt::Debug for InboundSa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboundSa")
            .field("spi", &format_args!("{:#010x}", self.spi))
            .field("top", &self.window.top())
            .field("opened", &self.opened)
            .finish_non_exhaustive()
    }
}

impl InboundSa {
    /// An SA receiving on our `spi` with the keying material IKEv2 derived
    /// for this direction.
    pub fn new(spi: u32, keymat: &[u8; KEYMAT_LEN]) -> Self {
        Self {
            spi,
            cipher: Cipher::new(keymat),
            window: ReplayWindow::new(),
            opened: 0,
            drops: DropCounters::default(),
        }
    }

    /// Our SPI for this direction.
    pub fn spi(&self) -> u32 {
        self.spi
    }

    /// How many packets were opened and delivered.
    pub fn opened(&self) -> u64 {
        self.opened
    }

    /// Refused packets by reason.
    pub fn drops(&self) -> &DropCounters {
        &self.drops
    }

    /// The highest sequence number received so far.
    pub fn highest_sequence(&self) -> u32 {
        self.window.top()
    }

    /// Opens the ESP packet `datagram` (the UDP payload, starting with the
    /// SPI) into `out`, which must hold the encrypted part
    /// (`datagram.len() - HEADER_LEN - ICV_LEN` bytes). Returns the inner
    /// packet's length (at `out[..len]`) and what it is.
    ///
    /// # Errors
    /// The [`DropReason`], also counted in [`InboundSa::drops`].
    pub fn open(
        &mut self,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Result<(usize, NextHeader), DropReason> {
        let result = self.open_into(datagram, out);
        self.count(result)
    }

    /// Opens the ESP packet `datagram` in place. Returns the inner packet's
    /// length; it is at `datagram[HEADER_LEN..HEADER_LEN + len]`.
    ///
    /// # Errors
    /// The [`DropReason`], also counted in [`InboundSa::drops`].
    pub fn open_in_place(
        &mut self,
        datagram: &mut [u8],
    ) -> Result<(usize, NextHeader), DropReason> {
        let result = self.check(datagram).and_then(|(seq, tag)| {
            let (header, rest) = datagram.split_at_mut(HEADER_LEN);
            let encrypted_len = rest.len() - ICV_LEN;
            let encrypted = &mut rest[..encrypted_len];
            self.decrypt(header, seq, encrypted, tag)
        });
        self.count(result)
    }

    fn open_into(
        &mut self,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Result<(usize, NextHeader), DropReason> {
        let (seq, tag) = self.check(datagram)?;
        let encrypted = &datagram[HEADER_LEN..datagram.len() - ICV_LEN];
        let out = out
            .get_mut(..encrypted.len())
            .ok_or(DropReason::BufferTooSmall)?;
        out.copy_from_slice(encrypted);
        self.decrypt(&datagram[..HEADER_LEN], seq, out, tag)
    }

    fn count(
        &mut self,
        result: Result<(usize, NextHeader), DropReason>,
    ) -> Result<(usize, NextHeader), DropReason> {
        match result {
            Ok(_) => self.opened += 1,
            Err(reason) => self.drops.add(reason),
        }
        result
    }

    /// The checks before any crypto: length, alignment, SPI, replay window.
    /// Returns the sequence number and the ICV.
    fn check(&self, datagram: &[u8]) -> Result<(u32, Tag), DropReason> {
        if datagram.len() < MIN_LEN {
            return Err(DropReason::Truncated);
        }
        if !(datagram.len() - HEADER_LEN - ICV_LEN).is_multiple_of(4) {
            return Err(DropReason::Malformed);
        }
        let word = |at: usize| {
            u32::from_be_bytes([
                datagram[at],
                datagram[at + 1],
                datagram[at + 2],
                datagram[at + 3],
            ])
        };
        if word(0) != self.spi {
            return Err(DropReason::WrongSpi);
        }
        let seq = word(4);
        self.window.check(seq).map_err(refused)?;
        let mut tag = [0u8; ICV_LEN];
        tag.copy_from_slice(&datagram[datagram.len() - ICV_LEN..]);
        Ok((seq, Tag::from(tag)))
    }

    /// Verifies and decrypts `encrypted` in place, marks the sequence
    /// number, then reads the trailer.
    fn decrypt(
        &mut self,
        header: &[u8],
        seq: u32,
        encrypted: &mut [u8],
        tag: Tag,
    ) -> Result<(usize, NextHeader), DropReason> {
        let mut iv = [0u8; 8];
        iv.copy_from_slice(&header[8..HEADER_LEN]);
        let nonce = self.cipher.nonce(&iv);
        self.cipher
            .aead
            .open_in_place_separate_tag(nonce, Aad::from(&header[..8]), tag, encrypted, 0..)
            .map_err(|_| DropReason::AuthFailed)?;
        // Only an authentic packet moves the window (RFC 4303 §3.4.3).
        self.window.mark(seq).map_err(refused)?;
        trailer(encrypted)
    }
}

fn refused(r: Refused) -> DropReason {
    match r {
        Refused::Zero => DropReason::Malformed,
        Refused::Duplicate => DropReason::Replayed,
        Refused::TooOld => DropReason::TooOld,
    }
}

/// Reads and checks the trailer of a decrypted payload: the inner packet's
/// length and its next header.
fn trailer(plain: &[u8]) -> Result<(usize, NextHeader), DropReason> {
    let [.., pad_len, next_header] = *plain else {
        return Err(DropReason::Truncated);
    };
    let pad = usize::from(pad_len);
    let inner_len = plain
        .len()
        .checked_sub(2 + pad)
        .ok_or(DropReason::BadPadding)?;
    let padding = &plain[inner_len..inner_len + pad];
    if padding.iter().zip(1u8..).any(|(b, want)| *b != want) {
        return Err(DropReason::BadPadding);
    }
    let (kind, version, min_len) = match next_header {
        4 => (NextHeader::Ipv4, 4, 20),
        41 => (NextHeader::Ipv6, 6, 40),
        NEXT_HEADER_NONE => return Err(DropReason::Dummy),
        _ => return Err(DropReason::UnknownNextHeader),
    };
    // Tunnel mode carries a whole IP packet of the version the next header
    // names (RFC 4303 §2.6); anything else is not handed on. Whether its
    // addresses are within the CHILD_SA's selectors (RFC 4301 §5.2) is the
    // caller's check, which holds the selectors.
    if inner_len < min_len || plain[0] >> 4 != version {
        return Err(DropReason::BadInner);
    }
    Ok((inner_len, kind))
}
