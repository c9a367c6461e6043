//! The core's one IPv4 vocabulary: [`Prefix`], the checked header view
//! [`Ipv4Header`] (and its unchecked-length fast-path cousin
//! [`FixedHeader`]), and [`FastHasher`] for maps keyed by addresses, indices
//! and keys the programs chose or authenticated, and the Internet checksum
//! ([`checksum`], RFC 1071).
//!
//! The views follow smoltcp's pattern: the length is checked once, when the
//! view is made; after that no accessor can panic, because the fields are
//! read from a fixed-size array.

use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::str::FromStr;

/// The length of an IPv4 header without options.
pub const MIN_HEADER_LEN: usize = 20;

/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// Why bytes are not a usable IPv4 header. The checks run in this order:
/// empty, version, fixed header present, header and total length consistent,
/// both within the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// No bytes at all.
    #[error("empty packet")]
    Empty,
    /// The version nibble is not 4 (6 is IPv6).
    #[error("IP version {0}, not 4")]
    NotIpv4(u8),
    /// Shorter than the fixed header, the header length or the total length.
    #[error("truncated IPv4 packet")]
    Truncated,
    /// A header length under 20 or a total length under the header length.
    #[error("inconsistent IPv4 header or total length")]
    BadLength,
}

/// The fixed 20 bytes of an IPv4 header, checked only for the version and
/// for being present: enough to route by address on the fast path.
#[derive(Debug, Clone, Copy)]
pub struct FixedHeader<'a>(&'a [u8; MIN_HEADER_LEN]);

impl<'a> FixedHeader<'a> {
    /// The fixed header at the start of `packet`.
    ///
    /// # Errors
    /// [`HeaderError::Empty`], [`HeaderError::NotIpv4`] or
    /// [`HeaderError::Truncated`] (in that order).
    #[inline]
    pub fn new(packet: &'a [u8]) -> Result<Self, HeaderError> {
        let first = *packet.first().ok_or(HeaderError::Empty)?;
        if first >> 4 != 4 {
            return Err(HeaderError::NotIpv4(first >> 4));
        }
        packet
            .first_chunk::<MIN_HEADER_LEN>()
            .map(Self)
            .ok_or(HeaderError::Truncated)
    }

    /// The fixed header's bytes.
    pub fn bytes(&self) -> &'a [u8; MIN_HEADER_LEN] {
        self.0
    }

    /// The header length from the IHL field, in bytes (not checked here).
    pub fn header_len(&self) -> usize {
        usize::from(self.0[0] & 0x0f) * 4
    }

    /// The total length field.
    pub fn total_len(&self) -> usize {
        usize::from(u16::from_be_bytes([self.0[2], self.0[3]]))
    }

    /// The fragment offset, in 8-byte units.
    pub fn fragment_offset(&self) -> u16 {
        u16::from_be_bytes([self.0[6], self.0[7]]) & 0x1fff
    }

    /// Whether this is a later fragment (offset non-zero): the transport
    /// header is not in it.
    pub fn is_later_fragment(&self) -> bool {
        self.fragment_offset() != 0
    }

    /// Time to live.
    pub fn ttl(&self) -> u8 {
        self.0[8]
    }

    /// The protocol number.
    pub fn protocol(&self) -> u8 {
        self.0[9]
    }

    /// The header checksum field.
    pub fn checksum(&self) -> u16 {
        u16::from_be_bytes([self.0[10], self.0[11]])
    }

    /// The source address.
    #[inline]
    pub fn src(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.0[12], self.0[13], self.0[14], self.0[15])
    }

    /// The destination address.
    #[inline]
    pub fn dst(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.0[16], self.0[17], self.0[18], self.0[19])
    }
}

/// A checked IPv4 packet: version 4, a header length of at least 20, a
/// total length of at least the header length, and both within the buffer.
#[derive(Debug, Clone, Copy)]
pub struct Ipv4Header<'a> {
    fixed: FixedHeader<'a>,
    /// The header, options included.
    header: &'a [u8],
    /// The payload up to the total length (trailing bytes excluded).
    payload: &'a [u8],
}

impl<'a> Ipv4Header<'a> {
    /// Checks `packet` once.
    ///
    /// # Errors
    /// A [`HeaderError`] saying which check failed first.
    pub fn new_checked(packet: &'a [u8]) -> Result<Self, HeaderError> {
        let fixed = FixedHeader::new(packet)?;
        let (header_len, total_len) = (fixed.header_len(), fixed.total_len());
        if header_len < MIN_HEADER_LEN || total_len < header_len {
            return Err(HeaderError::BadLength);
        }
        let whole = packet.get(..total_len).ok_or(HeaderError::Truncated)?;
        let (header, payload) = whole.split_at(header_len);
        Ok(Self {
            fixed,
            header,
            payload,
        })
    }

    /// The fixed part of the header (every field accessor).
    pub fn fixed(&self) -> FixedHeader<'a> {
        self.fixed
    }

    /// The header length, options included.
    pub fn header_len(&self) -> usize {
        self.header.len()
    }

    /// The total length: header and payload.
    pub fn total_len(&self) -> usize {
        self.header.len() + self.payload.len()
    }

    /// The source address.
    pub fn src(&self) -> Ipv4Addr {
        self.fixed.src()
    }

    /// The destination address.
    pub fn dst(&self) -> Ipv4Addr {
        self.fixed.dst()
    }

    /// The protocol number.
    pub fn protocol(&self) -> u8 {
        self.fixed.protocol()
    }

    /// Whether this is a later fragment (offset non-zero).
    pub fn is_later_fragment(&self) -> bool {
        self.fixed.is_later_fragment()
    }

    /// The header bytes, options included.
    pub fn header(&self) -> &'a [u8] {
        self.header
    }

    /// The payload up to the total length.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// Whether the header checksum verifies (RFC 1071).
    pub fn verify_checksum(&self) -> bool {
        checksum(self.header) == 0
    }
}

/// An IPv4 prefix such as the NAT pool `10.64.0.0/16`: its network address
/// (host bits clear) and its length.
///
/// Text form `a.b.c.d/len`. [`FromStr`], [`Prefix::new`] and serde clear host
/// bits (`10.64.1.7/16` is `10.64.0.0/16`, as an interface address with its
/// length names its subnet); [`Prefix::parse_exact`] and
/// [`Prefix::new_exact`] refuse them (for configured address plans, where
/// they are a typo).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    network: u32,
    len: u8,
}

/// Not an IPv4 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    /// Not `a.b.c.d/len`: no `/`.
    #[error("expected an IPv4 prefix such as 10.64.0.0/16")]
    Syntax,
    /// The part before the `/` is not an IPv4 address.
    #[error("not an IPv4 address before the '/'")]
    BadAddress,
    /// The length is not a number from 0 to 32.
    #[error("the prefix length must be 0 to 32")]
    BadLength,
    /// Bits set past the length (only from the exact constructors).
    #[error("host bits set (did you mean {0}?)")]
    HostBitsSet(Prefix),
}

impl Prefix {
    /// `addr/len` with host bits cleared.
    ///
    /// # Errors
    /// [`PrefixError::BadLength`] when `len` exceeds 32.
    pub fn new(addr: Ipv4Addr, len: u8) -> Result<Self, PrefixError> {
        if len > 32 {
            return Err(PrefixError::BadLength);
        }
        Ok(Self {
            network: addr.to_bits() & Self::mask_of(len),
            len,
        })
    }

    /// `network/len`, refusing host bits.
    ///
    /// # Errors
    /// [`PrefixError::BadLength`] when `len` exceeds 32,
    /// [`PrefixError::HostBitsSet`] (with the cleared prefix) when `network`
    /// has bits set past `len`.
    pub fn new_exact(network: Ipv4Addr, len: u8) -> Result<Self, PrefixError> {
        let p = Self::new(network, len)?;
        if p.network != network.to_bits() {
            return Err(PrefixError::HostBitsSet(p));
        }
        Ok(p)
    }

    /// Parses `a.b.c.d/len`, refusing host bits.
    ///
    /// # Errors
    /// As [`Self::new_exact`], or the [`PrefixError`] saying which part
    /// does not parse.
    pub fn parse_exact(s: &str) -> Result<Self, PrefixError> {
        let (addr, len) = split(s)?;
        Self::new_exact(addr, len)
    }

    fn mask_of(len: u8) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
    }

    /// The netmask, e.g. `255.255.0.0` for a /16.
    pub fn mask(&self) -> Ipv4Addr {
        Ipv4Addr::from_bits(Self::mask_of(self.len))
    }

    /// Whether `ip` lies inside.
    #[inline]
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        ip.to_bits() & Self::mask_of(self.len) == self.network
    }

    /// The network address (host bits clear).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from_bits(self.network)
    }

    /// The network address; the same as [`Self::network`].
    pub fn addr(&self) -> Ipv4Addr {
        self.network()
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// The last address (the broadcast address of a /30 or shorter).
    pub fn last(&self) -> Ipv4Addr {
        Ipv4Addr::from_bits(self.network | !Self::mask_of(self.len))
    }

    /// How many addresses it spans (2^(32 - len)).
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.len))
    }

    /// The host addresses, first to last: all but the network and broadcast
    /// address, except on a /31 (RFC 3021: both are hosts on a
    /// point-to-point link) and a /32 (its one address).
    pub fn hosts(&self) -> RangeInclusive<Ipv4Addr> {
        let (first, last) = (self.network, self.last().to_bits());
        if self.len >= 31 {
            Ipv4Addr::from_bits(first)..=Ipv4Addr::from_bits(last)
        } else {
            Ipv4Addr::from_bits(first + 1)..=Ipv4Addr::from_bits(last - 1)
        }
    }
}

/// `a.b.c.d/len` split and parsed; the length is checked by the constructors.
fn split(s: &str) -> Result<(Ipv4Addr, u8), PrefixError> {
    let (a, l) = s.trim().split_once('/').ok_or(PrefixError::Syntax)?;
    let addr: Ipv4Addr = a.parse().map_err(|_| PrefixError::BadAddress)?;
    let len: u8 = l.parse().map_err(|_| PrefixError::BadLength)?;
    Ok((addr, len))
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.len)
    }
}

impl FromStr for Prefix {
    type Err = PrefixError;
    /// Parses `a.b.c.d/len`, clearing host bits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = split(s)?;
        Self::new(addr, len)
    }
}

impl serde::Serialize for Prefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Prefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Schema: the text form.
#[cfg(feature = "schemars")]
impl schemars::JsonSchema for Prefix {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Ipv4Prefix".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^[0-9]{1,3}(\\.[0-9]{1,3}){3}/[0-9]{1,2}$",
            "description": "An IPv4 prefix, `a.b.c.d/len`.",
        })
    }
}

/// A multiplicative (Fibonacci) hash for keys the programs chose or
/// authenticated (addresses, tunnel indices, public keys): one multiply per
/// word, and a final rotation so that the low bits that pick a bucket depend
/// on every key bit. Not for keys an attacker picks freely (no seed).
#[derive(Debug, Clone, Copy, Default)]
pub struct FastHasher(u64);

impl Hasher for FastHasher {
    /// The high half of the product is where every key bit has been mixed
    /// in; rotating it down puts it in the bits that pick the bucket.
    #[inline]
    fn finish(&self) -> u64 {
        self.0.rotate_left(32)
    }

    /// Bytes go in 32 bits at a time: [`Self::finish`] keeps the product's
    /// high half, which only the lower 32 bits of a word reach fully.
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(4);
        for c in &mut chunks {
            let mut w = [0; 4];
            w.copy_from_slice(c);
            self.write_u32(u32::from_le_bytes(w));
        }
        for b in chunks.remainder() {
            self.write_u64(u64::from(*b));
        }
    }

    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

/// A hash map with [`FastHasher`].
pub type FastMap<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// The Internet checksum of `data` (RFC 1071): for building packets (ICMP
/// errors, echo probes, test packets); rewriting never recomputes one.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u32::from(*b) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A 1 028-byte UDP packet 172.16.0.50:4000 → 10.64.0.99:53.
    pub(crate) fn udp_packet() -> Vec<u8> {
        let mut p = Vec::new();
        etherparse::PacketBuilder::ipv4([172, 16, 0, 50], [10, 64, 0, 99], 64)
            .udp(4000, 53)
            .write(&mut p, &[7u8; 1000])
            .unwrap();
        p
    }

    #[test]
    fn the_view_checks_once_and_reads_fields() {
        let p = udp_packet();
        let h = Ipv4Header::new_checked(&p).unwrap();
        assert_eq!(h.src(), Ipv4Addr::new(172, 16, 0, 50));
        assert_eq!(h.dst(), Ipv4Addr::new(10, 64, 0, 99));
        assert_eq!(h.protocol(), PROTO_UDP);
        assert_eq!((h.header_len(), h.total_len()), (20, p.len()));
        assert_eq!(h.payload().len(), 1008);
        assert!(h.verify_checksum());
        assert!(!h.is_later_fragment());
        let mut padded = p.clone();
        padded.extend_from_slice(&[0; 5]);
        let h = Ipv4Header::new_checked(&padded).unwrap();
        assert_eq!(h.total_len(), p.len(), "trailing bytes are not payload");
    }

    #[test]
    fn the_view_refuses_short_and_inconsistent_headers() {
        let p = udp_packet();
        assert_eq!(Ipv4Header::new_checked(&[]).err(), Some(HeaderError::Empty));
        assert_eq!(
            Ipv4Header::new_checked(&p[..19]).err(),
            Some(HeaderError::Truncated)
        );
        assert_eq!(
            Ipv4Header::new_checked(&p[..500]).err(),
            Some(HeaderError::Truncated),
            "total length beyond the buffer"
        );
        let mut bad = p.clone();
        bad[0] = 0x44; // IHL 4
        assert_eq!(
            Ipv4Header::new_checked(&bad).err(),
            Some(HeaderError::BadLength)
        );
        bad[0] = 0x65;
        assert_eq!(
            Ipv4Header::new_checked(&bad).err(),
            Some(HeaderError::NotIpv4(6))
        );
        assert_eq!(
            FixedHeader::new(&[0x60]).err(),
            Some(HeaderError::NotIpv4(6))
        );
        assert_eq!(
            FixedHeader::new(&p[..19]).err(),
            Some(HeaderError::Truncated)
        );
        assert_eq!(
            FixedHeader::new(&p[..20]).unwrap().dst(),
            Ipv4Addr::new(10, 64, 0, 99)
        );
        let mut sum = p.clone();
        sum[10] ^= 0xff;
        assert!(!Ipv4Header::new_checked(&sum).unwrap().verify_checksum());
    }

    #[test]
    fn prefixes() {
        let p: Prefix = "10.64.1.7/16".parse().unwrap();
        assert_eq!(p.to_string(), "10.64.0.0/16");
        assert!(p.contains(Ipv4Addr::new(10, 64, 255, 1)));
        assert!(!p.contains(Ipv4Addr::new(10, 65, 0, 1)));
        assert!("10.64.0.0/33".parse::<Prefix>().is_err());
        assert!("10.64.0.0".parse::<Prefix>().is_err());
        assert_eq!("10.64.0.0".parse::<Prefix>(), Err(PrefixError::Syntax));
        assert_eq!("10.64.0/16".parse::<Prefix>(), Err(PrefixError::BadAddress));
        assert_eq!(
            "10.64.0.0/33".parse::<Prefix>(),
            Err(PrefixError::BadLength)
        );
        assert_eq!("10.64.0.0/x".parse::<Prefix>(), Err(PrefixError::BadLength));
        let all: Prefix = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(all.size(), 1 << 32);
        assert_eq!(p.last(), Ipv4Addr::new(10, 64, 255, 255));
        assert_eq!(p.mask(), Ipv4Addr::new(255, 255, 0, 0));
        assert_eq!(
            Prefix::parse_exact("10.64.1.0/16"),
            Err(PrefixError::HostBitsSet(p))
        );
        assert_eq!(Prefix::parse_exact("10.64.0.0/16"), Ok(p));
        let host: Prefix = "192.0.2.1/32".parse().unwrap();
        assert_eq!((host.size(), host.last()), (1, Ipv4Addr::new(192, 0, 2, 1)));
        let one = Ipv4Addr::new(192, 0, 2, 1);
        assert_eq!(host.hosts(), one..=one);
        let ptp: Prefix = "192.0.2.0/31".parse().unwrap();
        assert_eq!(ptp.hosts(), Ipv4Addr::new(192, 0, 2, 0)..=one);
        assert_eq!(
            p.hosts(),
            Ipv4Addr::new(10, 64, 0, 1)..=Ipv4Addr::new(10, 64, 255, 254)
        );
        assert_eq!(
            all.hosts(),
            Ipv4Addr::new(0, 0, 0, 1)..=Ipv4Addr::new(255, 255, 255, 254)
        );
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, "\"10.64.0.0/16\"");
        assert_eq!(serde_json::from_str::<Prefix>(&json).unwrap(), p);
        assert!(serde_json::from_str::<Prefix>("\"nope\"").is_err());
    }

    #[test]
    fn the_hasher_spreads_addresses_that_differ_only_in_high_bits() {
        use std::hash::BuildHasher;
        let b = BuildHasherDefault::<FastHasher>::default();
        let buckets: std::collections::BTreeSet<u64> = (0..256u32)
            .map(|i| b.hash_one((i << 24) | 0x0001_0203) & 0xff)
            .collect();
        assert!(buckets.len() > 128, "{} of 256 buckets", buckets.len());
        // Keys hashed as bytes (public keys) spread as well.
        let keys: std::collections::BTreeSet<u64> = (0..256u32)
            .map(|i| {
                let mut k = [7u8; 32];
                k[31] = i as u8;
                b.hash_one(k) & 0xff
            })
            .collect();
        assert!(keys.len() > 128, "{} of 256 buckets", keys.len());
    }
}
