//! The IKEv2 message codec (RFC 7296 §3): the fixed header, the payload
//! chain, and each payload the engine reads or writes.
//!
//! Parsing is strict: every length field must agree with the bytes that are
//! there, a payload's length must cover its own fixed part, and a chain must
//! end exactly at the end of the message. Payloads the engine does not use
//! (Vendor ID, CP, CERT, CERTREQ, EAP) are skipped; an unknown payload type
//! with the critical bit set is [`ParseError::UnsupportedCritical`], which a
//! responder answers with UNSUPPORTED_CRITICAL_PAYLOAD (RFC 7296 §2.5). The
//! Encrypted payload (SK) must be the last one (§3.14); its body is left to
//! [`super::crypto`] and its plaintext is parsed with [`parse_chain`].

use std::net::Ipv4Addr;

/// Length of the fixed IKE header.
pub const HEADER_LEN: usize = 28;
/// The version byte: major 2, minor 0.
pub const VERSION: u8 = 0x20;

/// Exchange types (RFC 7296 §3.1).
pub mod exchange {
    pub const IKE_SA_INIT: u8 = 34;
    pub const IKE_AUTH: u8 = 35;
    pub const CREATE_CHILD_SA: u8 = 36;
    pub const INFORMATIONAL: u8 = 37;
}

/// Header flags (RFC 7296 §3.1).
pub mod flags {
    /// Sent by the original initiator of the IKE SA.
    pub const INITIATOR: u8 = 0x08;
    /// Higher version supported (never set by us).
    pub const VERSION: u8 = 0x10;
    /// A response.
    pub const RESPONSE: u8 = 0x20;
}

/// Payload types (RFC 7296 §3.2).
pub mod payload {
    pub const NONE: u8 = 0;
    pub const SA: u8 = 33;
    pub const KE: u8 = 34;
    pub const IDI: u8 = 35;
    pub const IDR: u8 = 36;
    pub const CERT: u8 = 37;
    pub const CERTREQ: u8 = 38;
    pub const AUTH: u8 = 39;
    pub const NONCE: u8 = 40;
    pub const NOTIFY: u8 = 41;
    pub const DELETE: u8 = 42;
    pub const VENDOR: u8 = 43;
    pub const TSI: u8 = 44;
    pub const TSR: u8 = 45;
    pub const SK: u8 = 46;
    pub const CP: u8 = 47;
    pub const EAP: u8 = 48;
}

/// Notify message types used here (RFC 7296 §3.10.1, RFC 7296 §2.23).
pub mod notify {
    pub const UNSUPPORTED_CRITICAL_PAYLOAD: u16 = 1;
    pub const INVALID_IKE_SPI: u16 = 4;
    pub const INVALID_SYNTAX: u16 = 7;
    pub const INVALID_MESSAGE_ID: u16 = 9;
    pub const NO_PROPOSAL_CHOSEN: u16 = 14;
    pub const INVALID_KE_PAYLOAD: u16 = 17;
    pub const AUTHENTICATION_FAILED: u16 = 24;
    pub const SINGLE_PAIR_REQUIRED: u16 = 34;
    pub const NO_ADDITIONAL_SAS: u16 = 35;
    pub const TS_UNACCEPTABLE: u16 = 38;
    pub const TEMPORARY_FAILURE: u16 = 43;
    pub const CHILD_SA_NOT_FOUND: u16 = 44;
    /// Error types are below this value; status types at or above (§3.10.1).
    pub const FIRST_STATUS: u16 = 16384;
    pub const INITIAL_CONTACT: u16 = 16384;
    pub const NAT_DETECTION_SOURCE_IP: u16 = 16388;
    pub const NAT_DETECTION_DESTINATION_IP: u16 = 16389;
    pub const COOKIE: u16 = 16390;
    pub const USE_TRANSPORT_MODE: u16 = 16391;
    pub const REKEY_SA: u16 = 16393;
    pub const ESP_TFC_PADDING_NOT_SUPPORTED: u16 = 16394;
    pub const NON_FIRST_FRAGMENTS_ALSO: u16 = 16395;
}

/// Security protocol identifiers (RFC 7296 §3.3.1).
pub mod protocol {
    pub const IKE: u8 = 1;
    pub const AH: u8 = 2;
    pub const ESP: u8 = 3;
}

/// Transform types and the IDs this implementation knows (RFC 7296 §3.3.2,
/// RFC 5282 for AES-GCM, RFC 8031 for group 31).
pub mod transform {
    pub const ENCR: u8 = 1;
    pub const PRF: u8 = 2;
    pub const INTEG: u8 = 3;
    pub const DH: u8 = 4;
    pub const ESN: u8 = 5;
    /// ENCR_AES_GCM_16 (RFC 5282 §7, RFC 4106 for ESP).
    pub const ENCR_AES_GCM_16: u16 = 20;
    pub const PRF_HMAC_SHA2_256: u16 = 5;
    pub const DH_MODP_2048: u16 = 14;
    pub const DH_CURVE25519: u16 = 31;
    pub const ESN_NONE: u16 = 0;
    /// The Key Length attribute type (TV format, §3.3.5).
    pub const ATTR_KEY_LENGTH: u16 = 14;
}

/// Identification types (RFC 7296 §3.5).
pub mod id_type {
    pub const IPV4_ADDR: u8 = 1;
    pub const FQDN: u8 = 2;
    pub const RFC822_ADDR: u8 = 3;
    pub const KEY_ID: u8 = 11;
}

/// Authentication methods (RFC 7296 §3.8).
pub const AUTH_SHARED_KEY_MIC: u8 = 2;

/// Traffic selector type for IPv4 ranges (RFC 7296 §3.13.1).
pub const TS_IPV4_ADDR_RANGE: u8 = 7;

/// Why a message or payload was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Shorter than a header or a length field says.
    #[error("truncated")]
    Truncated,
    /// A length field disagrees with the bytes or the payload's fixed part.
    #[error("bad length")]
    BadLength,
    /// Major version is not 2 (RFC 7296 §3.1: answer INVALID_MAJOR_VERSION or drop).
    #[error("unsupported version")]
    Version,
    /// An unknown payload type with the critical bit set (§2.5).
    #[error("unsupported critical payload {0}")]
    UnsupportedCritical(u8),
    /// A field holds a value the RFC forbids (e.g. SK not last, bad proposal numbering).
    #[error("invalid syntax")]
    Syntax,
}

/// The fixed IKE header (RFC 7296 §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub spi_i: u64,
    pub spi_r: u64,
    pub next_payload: u8,
    pub exchange: u8,
    pub flags: u8,
    pub message_id: u32,
    pub length: u32,
}

impl Header {
    /// Reads the header and checks that `length` is exactly `msg.len()`.
    pub fn parse(msg: &[u8]) -> Result<Self, ParseError> {
        if msg.len() < HEADER_LEN {
            return Err(ParseError::Truncated);
        }
        if msg[17] >> 4 != 2 {
            return Err(ParseError::Version);
        }
        let h = Header {
            spi_i: be64(&msg[0..8]),
            spi_r: be64(&msg[8..16]),
            next_payload: msg[16],
            exchange: msg[18],
            flags: msg[19],
            message_id: be32(&msg[20..24]),
            length: be32(&msg[24..28]),
        };
        if h.length as usize != msg.len() {
            return Err(ParseError::BadLength);
        }
        Ok(h)
    }

    pub fn is_response(&self) -> bool {
        self.flags & flags::RESPONSE != 0
    }

    pub fn from_initiator(&self) -> bool {
        self.flags & flags::INITIATOR != 0
    }

    /// Appends the 28 header bytes.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.spi_i.to_be_bytes());
        out.extend_from_slice(&self.spi_r.to_be_bytes());
        out.push(self.next_payload);
        out.push(VERSION);
        out.push(self.exchange);
        out.push(self.flags);
        out.extend_from_slice(&self.message_id.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }
}

/// One transform of a proposal (RFC 7296 §3.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transform {
    pub kind: u8,
    pub id: u16,
    /// The Key Length attribute, if present.
    pub key_len: Option<u16>,
    /// An attribute other than Key Length was present: §3.3.6 says such a
    /// transform must not be chosen.
    pub unknown_attr: bool,
}

impl Transform {
    pub const fn new(kind: u8, id: u16, key_len: Option<u16>) -> Self {
        Self {
            kind,
            id,
            key_len,
            unknown_attr: false,
        }
    }
}

/// One proposal of an SA payload (RFC 7296 §3.3.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    pub num: u8,
    pub protocol: u8,
    pub spi: Vec<u8>,
    pub transforms: Vec<Transform>,
}

/// An identification payload's content (RFC 7296 §3.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Id {
    pub id_type: u8,
    pub data: Vec<u8>,
}

impl Id {
    /// `ID_FQDN`.
    pub fn fqdn(name: &str) -> Self {
        Self {
            id_type: id_type::FQDN,
            data: name.as_bytes().to_vec(),
        }
    }

    /// `ID_KEY_ID`.
    pub fn key_id(bytes: &[u8]) -> Self {
        Self {
            id_type: id_type::KEY_ID,
            data: bytes.to_vec(),
        }
    }

    /// `ID_IPV4_ADDR`.
    pub fn ipv4(addr: Ipv4Addr) -> Self {
        Self {
            id_type: id_type::IPV4_ADDR,
            data: addr.octets().to_vec(),
        }
    }

    /// The payload body after the generic header: type, 3 reserved bytes,
    /// data. This is what AUTH covers (RFC 7296 §2.15, "RestOfInitIDPayload").
    pub fn body(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(4 + self.data.len());
        v.extend_from_slice(&[self.id_type, 0, 0, 0]);
        v.extend_from_slice(&self.data);
        v
    }
}

/// One traffic selector (RFC 7296 §3.13.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TrafficSelector {
    /// TS_IPV4_ADDR_RANGE.
    Ipv4 {
        /// IP protocol, 0 for any.
        ip_proto: u8,
        start_port: u16,
        end_port: u16,
        start: Ipv4Addr,
        end: Ipv4Addr,
    },
    /// Any other type (e.g. IPv6, 8): kept so the count is right, never
    /// selected.
    Other(u8),
}

impl TrafficSelector {
    /// Every protocol and port between two addresses.
    pub fn ipv4_range(start: Ipv4Addr, end: Ipv4Addr) -> Self {
        Self::Ipv4 {
            ip_proto: 0,
            start_port: 0,
            end_port: 65535,
            start,
            end,
        }
    }

    /// Every protocol and port of a prefix.
    pub fn ipv4_prefix(addr: Ipv4Addr, len: u8) -> Self {
        let mask = if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len.min(32)))
        };
        let start = u32::from(addr) & mask;
        Self::ipv4_range(Ipv4Addr::from(start), Ipv4Addr::from(start | !mask))
    }

    /// The overlap of two selectors, if any (RFC 7296 §2.9 narrowing).
    pub fn intersect(&self, other: &Self) -> Option<Self> {
        let (
            Self::Ipv4 {
                ip_proto: p1,
                start_port: sp1,
                end_port: ep1,
                start: s1,
                end: e1,
            },
            Self::Ipv4 {
                ip_proto: p2,
                start_port: sp2,
                end_port: ep2,
                start: s2,
                end: e2,
            },
        ) = (self, other)
        else {
            return None;
        };
        let ip_proto = match (*p1, *p2) {
            (0, p) | (p, 0) => p,
            (a, b) if a == b => a,
            _ => return None,
        };
        let (start_port, end_port) = ((*sp1).max(*sp2), (*ep1).min(*ep2));
        let (start, end) = ((*s1).max(*s2), (*e1).min(*e2));
        (start_port <= end_port && start <= end).then_some(Self::Ipv4 {
            ip_proto,
            start_port,
            end_port,
            start,
            end,
        })
    }
}

/// A payload the engine uses. Payloads it skips are not represented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Sa(Vec<Proposal>),
    Ke {
        group: u16,
        data: Vec<u8>,
    },
    Nonce(Vec<u8>),
    IdI(Id),
    IdR(Id),
    Auth {
        method: u8,
        data: Vec<u8>,
    },
    Notify {
        protocol: u8,
        spi: Vec<u8>,
        kind: u16,
        data: Vec<u8>,
    },
    Delete {
        protocol: u8,
        spi_size: u8,
        spis: Vec<Vec<u8>>,
    },
    TsI(Vec<TrafficSelector>),
    TsR(Vec<TrafficSelector>),
}

impl Payload {
    /// A notify about the IKE SA (no SPI).
    pub fn notify(kind: u16, data: &[u8]) -> Self {
        Payload::Notify {
            protocol: 0,
            spi: Vec::new(),
            kind,
            data: data.to_vec(),
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Payload::Sa(_) => payload::SA,
            Payload::Ke { .. } => payload::KE,
            Payload::Nonce(_) => payload::NONCE,
            Payload::IdI(_) => payload::IDI,
            Payload::IdR(_) => payload::IDR,
            Payload::Auth { .. } => payload::AUTH,
            Payload::Notify { .. } => payload::NOTIFY,
            Payload::Delete { .. } => payload::DELETE,
            Payload::TsI(_) => payload::TSI,
            Payload::TsR(_) => payload::TSR,
        }
    }

    fn write_body(&self, out: &mut Vec<u8>) {
        match self {
            Payload::Sa(props) => {
                for (i, p) in props.iter().enumerate() {
                    let last = i + 1 == props.len();
                    let start = out.len();
                    out.extend_from_slice(&[if last { 0 } else { 2 }, 0, 0, 0]);
                    out.push(p.num);
                    out.push(p.protocol);
                    out.push(p.spi.len() as u8);
                    out.push(p.transforms.len() as u8);
                    out.extend_from_slice(&p.spi);
                    for (j, t) in p.transforms.iter().enumerate() {
                        let last_t = j + 1 == p.transforms.len();
                        let len: u16 = if t.key_len.is_some() { 12 } else { 8 };
                        out.extend_from_slice(&[if last_t { 0 } else { 3 }, 0]);
                        out.extend_from_slice(&len.to_be_bytes());
                        out.extend_from_slice(&[t.kind, 0]);
                        out.extend_from_slice(&t.id.to_be_bytes());
                        if let Some(k) = t.key_len {
                            out.extend_from_slice(
                                &(0x8000 | transform::ATTR_KEY_LENGTH).to_be_bytes(),
                            );
                            out.extend_from_slice(&k.to_be_bytes());
                        }
                    }
                    let len = (out.len() - start) as u16;
                    out[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
                }
            }
            Payload::Ke { group, data } => {
                out.extend_from_slice(&group.to_be_bytes());
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(data);
            }
            Payload::Nonce(n) => out.extend_from_slice(n),
            Payload::IdI(id) | Payload::IdR(id) => out.extend_from_slice(&id.body()),
            Payload::Auth { method, data } => {
                out.extend_from_slice(&[*method, 0, 0, 0]);
                out.extend_from_slice(data);
            }
            Payload::Notify {
                protocol,
                spi,
                kind,
                data,
            } => {
                out.extend_from_slice(&[*protocol, spi.len() as u8]);
                out.extend_from_slice(&kind.to_be_bytes());
                out.extend_from_slice(spi);
                out.extend_from_slice(data);
            }
            Payload::Delete {
                protocol,
                spi_size,
                spis,
            } => {
                out.extend_from_slice(&[*protocol, *spi_size]);
                out.extend_from_slice(&(spis.len() as u16).to_be_bytes());
                for s in spis {
                    out.extend_from_slice(s);
                }
            }
            Payload::TsI(ts) | Payload::TsR(ts) => {
                let n = ts
                    .iter()
                    .filter(|t| matches!(t, TrafficSelector::Ipv4 { .. }))
                    .count();
                out.extend_from_slice(&[n as u8, 0, 0, 0]);
                for t in ts {
                    if let TrafficSelector::Ipv4 {
                        ip_proto,
                        start_port,
                        end_port,
                        start,
                        end,
                    } = t
                    {
                        out.extend_from_slice(&[TS_IPV4_ADDR_RANGE, *ip_proto, 0, 16]);
                        out.extend_from_slice(&start_port.to_be_bytes());
                        out.extend_from_slice(&end_port.to_be_bytes());
                        out.extend_from_slice(&start.octets());
                        out.extend_from_slice(&end.octets());
                    }
                }
            }
        }
    }
}

/// Serializes a payload chain; returns the type of the first payload
/// (`payload::NONE` when empty) for the header or the SK payload.
pub fn write_chain(payloads: &[Payload], out: &mut Vec<u8>) -> u8 {
    for (i, p) in payloads.iter().enumerate() {
        let next = payloads.get(i + 1).map_or(payload::NONE, Payload::kind);
        let start = out.len();
        out.extend_from_slice(&[next, 0, 0, 0]);
        p.write_body(out);
        let len = (out.len() - start) as u16;
        out[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
    }
    payloads.first().map_or(payload::NONE, Payload::kind)
}

/// A whole unencrypted message: header plus payloads, with the length set.
pub fn encode(mut header: Header, payloads: &[Payload]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.resize(HEADER_LEN, 0);
    header.next_payload = write_chain(payloads, &mut out);
    header.length = out.len() as u32;
    let mut h = Vec::with_capacity(HEADER_LEN);
    header.write(&mut h);
    out[..HEADER_LEN].copy_from_slice(&h);
    out
}

/// A parsed payload chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    pub payloads: Vec<Payload>,
    /// The SK payload, if the chain ended with one: the type of its first
    /// inner payload and the byte range of its body (IV ‖ ciphertext ‖ ICV)
    /// in the parsed buffer.
    pub encrypted: Option<(u8, std::ops::Range<usize>)>,
    /// Payloads skipped because this implementation does not use them.
    pub skipped: usize,
}

/// Parses a payload chain that starts with type `first` at `offset` of
/// `buf` and must end exactly at the end of `buf`.
pub fn parse_chain(buf: &[u8], offset: usize, first: u8) -> Result<Chain, ParseError> {
    let mut chain = Chain::default();
    let mut next = first;
    let mut pos = offset;
    while next != payload::NONE {
        let hdr = buf.get(pos..pos + 4).ok_or(ParseError::Truncated)?;
        let (this, critical) = (next, hdr[1] & 0x80 != 0);
        next = hdr[0];
        let len = usize::from(be16(&hdr[2..4]));
        if len < 4 {
            return Err(ParseError::BadLength);
        }
        let body = buf.get(pos + 4..pos + len).ok_or(ParseError::Truncated)?;
        match this {
            payload::SK => {
                // RFC 7296 §3.14: the Encrypted payload must be the last one;
                // its "next payload" names the first inner payload.
                if pos + len != buf.len() {
                    return Err(ParseError::Syntax);
                }
                chain.encrypted = Some((next, pos + 4..pos + len));
                next = payload::NONE;
            }
            payload::CERT | payload::CERTREQ | payload::VENDOR | payload::CP | payload::EAP => {
                chain.skipped += 1;
            }
            payload::SA
            | payload::KE
            | payload::NONCE
            | payload::IDI
            | payload::IDR
            | payload::AUTH
            | payload::NOTIFY
            | payload::DELETE
            | payload::TSI
            | payload::TSR => chain.payloads.push(parse_payload(this, body)?),
            other if critical => return Err(ParseError::UnsupportedCritical(other)),
            _ => chain.skipped += 1,
        }
        pos += len;
    }
    if pos != buf.len() {
        return Err(ParseError::BadLength);
    }
    Ok(chain)
}

/// A parsed message: the header and its (outer) payload chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub header: Header,
    pub chain: Chain,
}

/// Parses a whole message (without a non-ESP marker).
pub fn parse(msg: &[u8]) -> Result<Message, ParseError> {
    let header = Header::parse(msg)?;
    let chain = parse_chain(msg, HEADER_LEN, header.next_payload)?;
    Ok(Message { header, chain })
}

fn parse_payload(kind: u8, b: &[u8]) -> Result<Payload, ParseError> {
    Ok(match kind {
        payload::SA => Payload::Sa(parse_sa(b)?),
        payload::KE => {
            if b.len() < 4 {
                return Err(ParseError::BadLength);
            }
            Payload::Ke {
                group: be16(&b[0..2]),
                data: b[4..].to_vec(),
            }
        }
        payload::NONCE => {
            // RFC 7296 §3.9: between 16 and 256 octets.
            if !(16..=256).contains(&b.len()) {
                return Err(ParseError::BadLength);
            }
            Payload::Nonce(b.to_vec())
        }
        payload::IDI | payload::IDR => {
            if b.len() < 4 {
                return Err(ParseError::BadLength);
            }
            let id = Id {
                id_type: b[0],
                data: b[4..].to_vec(),
            };
            if kind == payload::IDI {
                Payload::IdI(id)
            } else {
                Payload::IdR(id)
            }
        }
        payload::AUTH => {
            if b.len() < 4 {
                return Err(ParseError::BadLength);
            }
            Payload::Auth {
                method: b[0],
                data: b[4..].to_vec(),
            }
        }
        payload::NOTIFY => {
            if b.len() < 4 {
                return Err(ParseError::BadLength);
            }
            let spi_len = usize::from(b[1]);
            let spi = b.get(4..4 + spi_len).ok_or(ParseError::BadLength)?;
            Payload::Notify {
                protocol: b[0],
                spi: spi.to_vec(),
                kind: be16(&b[2..4]),
                data: b[4 + spi_len..].to_vec(),
            }
        }
        payload::DELETE => {
            if b.len() < 4 {
                return Err(ParseError::BadLength);
            }
            let (protocol, spi_size, n) = (b[0], b[1], usize::from(be16(&b[2..4])));
            if b.len() != 4 + n * usize::from(spi_size) {
                return Err(ParseError::BadLength);
            }
            let spis = if spi_size == 0 {
                Vec::new()
            } else {
                b[4..]
                    .chunks_exact(usize::from(spi_size))
                    .map(<[u8]>::to_vec)
                    .collect()
            };
            Payload::Delete {
                protocol,
                spi_size,
                spis,
            }
        }
        payload::TSI | payload::TSR => {
            let ts = parse_ts(b)?;
            if kind == payload::TSI {
                Payload::TsI(ts)
            } else {
                Payload::TsR(ts)
            }
        }
        _ => return Err(ParseError::Syntax),
    })
}

fn parse_sa(mut b: &[u8]) -> Result<Vec<Proposal>, ParseError> {
    let mut props = Vec::new();
    loop {
        if b.len() < 8 {
            return Err(ParseError::Truncated);
        }
        let (last, len) = (b[0], usize::from(be16(&b[2..4])));
        if len < 8 || len > b.len() || (last != 0 && last != 2) {
            return Err(ParseError::BadLength);
        }
        let p = &b[..len];
        let (num, protocol, spi_len, n_t) = (p[4], p[5], usize::from(p[6]), usize::from(p[7]));
        let spi = p.get(8..8 + spi_len).ok_or(ParseError::BadLength)?.to_vec();
        let mut t = &p[8 + spi_len..];
        let mut transforms = Vec::with_capacity(n_t);
        for i in 0..n_t {
            if t.len() < 8 {
                return Err(ParseError::Truncated);
            }
            let (t_last, t_len) = (t[0], usize::from(be16(&t[2..4])));
            if t_len < 8 || t_len > t.len() || (t_last != 0 && t_last != 3) {
                return Err(ParseError::BadLength);
            }
            if (t_last == 0) != (i + 1 == n_t) {
                return Err(ParseError::Syntax);
            }
            let mut tr = Transform::new(t[4], be16(&t[6..8]), None);
            let mut a = &t[8..t_len];
            while !a.is_empty() {
                if a.len() < 4 {
                    return Err(ParseError::Truncated);
                }
                let ty = be16(&a[0..2]);
                let alen = if ty & 0x8000 != 0 {
                    4
                } else {
                    4 + usize::from(be16(&a[2..4]))
                };
                if alen > a.len() {
                    return Err(ParseError::BadLength);
                }
                if ty == 0x8000 | transform::ATTR_KEY_LENGTH {
                    tr.key_len = Some(be16(&a[2..4]));
                } else {
                    tr.unknown_attr = true;
                }
                a = &a[alen..];
            }
            transforms.push(tr);
            t = &t[t_len..];
        }
        if !t.is_empty() {
            return Err(ParseError::BadLength);
        }
        props.push(Proposal {
            num,
            protocol,
            spi,
            transforms,
        });
        b = &b[len..];
        if last == 0 {
            break;
        }
    }
    if !b.is_empty() {
        return Err(ParseError::BadLength);
    }
    Ok(props)
}

fn parse_ts(b: &[u8]) -> Result<Vec<TrafficSelector>, ParseError> {
    if b.len() < 4 {
        return Err(ParseError::BadLength);
    }
    let n = usize::from(b[0]);
    let mut rest = &b[4..];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        if rest.len() < 4 {
            return Err(ParseError::Truncated);
        }
        let (ty, len) = (rest[0], usize::from(be16(&rest[2..4])));
        if len < 8 || len > rest.len() {
            return Err(ParseError::BadLength);
        }
        let s = &rest[..len];
        if ty == TS_IPV4_ADDR_RANGE {
            if len != 16 {
                return Err(ParseError::BadLength);
            }
            out.push(TrafficSelector::Ipv4 {
                ip_proto: s[1],
                start_port: be16(&s[4..6]),
                end_port: be16(&s[6..8]),
                start: Ipv4Addr::new(s[8], s[9], s[10], s[11]),
                end: Ipv4Addr::new(s[12], s[13], s[14], s[15]),
            });
        } else {
            out.push(TrafficSelector::Other(ty));
        }
        rest = &rest[len..];
    }
    if !rest.is_empty() {
        return Err(ParseError::BadLength);
    }
    Ok(out)
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Payload> {
        vec![
            Payload::Sa(vec![
                Proposal {
                    num: 1,
                    protocol: protocol::IKE,
                    spi: vec![],
                    transforms: vec![
                        Transform::new(transform::ENCR, transform::ENCR_AES_GCM_16, Some(256)),
                        Transform::new(transform::PRF, transform::PRF_HMAC_SHA2_256, None),
                        Transform::new(transform::DH, transform::DH_CURVE25519, None),
                    ],
                },
                Proposal {
                    num: 2,
                    protocol: protocol::ESP,
                    spi: vec![1, 2, 3, 4],
                    transforms: vec![Transform::new(transform::ESN, 0, None)],
                },
            ]),
            Payload::Ke {
                group: 31,
                data: vec![9; 32],
            },
            Payload::Nonce(vec![7; 32]),
            Payload::IdI(Id::fqdn("site.example")),
            Payload::Auth {
                method: AUTH_SHARED_KEY_MIC,
                data: vec![1; 32],
            },
            Payload::notify(notify::COOKIE, &[5; 16]),
            Payload::Delete {
                protocol: protocol::ESP,
                spi_size: 4,
                spis: vec![vec![1, 2, 3, 4]],
            },
            Payload::TsI(vec![TrafficSelector::ipv4_prefix(
                Ipv4Addr::new(10, 1, 2, 0),
                24,
            )]),
            Payload::TsR(vec![TrafficSelector::ipv4_range(
                Ipv4Addr::new(0, 0, 0, 0),
                Ipv4Addr::new(255, 255, 255, 255),
            )]),
        ]
    }

    fn header() -> Header {
        Header {
            spi_i: 0x0102030405060708,
            spi_r: 0,
            next_payload: 0,
            exchange: exchange::IKE_SA_INIT,
            flags: flags::INITIATOR,
            message_id: 0,
            length: 0,
        }
    }

    #[test]
    fn round_trip() {
        let msg = encode(header(), &sample());
        let m = parse(&msg).unwrap();
        assert_eq!(m.header.spi_i, 0x0102030405060708);
        assert_eq!(m.header.length as usize, msg.len());
        assert_eq!(m.chain.payloads, sample());
        assert!(m.chain.encrypted.is_none());
    }

    #[test]
    fn prefix_selector_and_narrowing() {
        let ts = TrafficSelector::ipv4_prefix(Ipv4Addr::new(10, 1, 2, 77), 24);
        assert_eq!(
            ts,
            TrafficSelector::ipv4_range(Ipv4Addr::new(10, 1, 2, 0), Ipv4Addr::new(10, 1, 2, 255))
        );
        let any = TrafficSelector::ipv4_prefix(Ipv4Addr::UNSPECIFIED, 0);
        assert_eq!(ts.intersect(&any), Some(ts));
        let other = TrafficSelector::ipv4_prefix(Ipv4Addr::new(10, 1, 3, 0), 24);
        assert_eq!(ts.intersect(&other), None);
        let icmp = TrafficSelector::Ipv4 {
            ip_proto: 1,
            start_port: 0,
            end_port: 65535,
            start: Ipv4Addr::new(10, 1, 2, 128),
            end: Ipv4Addr::new(10, 1, 9, 0),
        };
        assert_eq!(
            ts.intersect(&icmp),
            Some(TrafficSelector::Ipv4 {
                ip_proto: 1,
                start_port: 0,
                end_port: 65535,
                start: Ipv4Addr::new(10, 1, 2, 128),
                end: Ipv4Addr::new(10, 1, 2, 255),
            })
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let msg = encode(header(), &sample());
        for n in 0..msg.len() {
            assert!(parse(&msg[..n]).is_err(), "prefix {n} parsed");
        }
    }

    #[test]
    fn length_mismatch_is_refused() {
        let mut msg = encode(header(), &sample());
        msg.push(0);
        assert_eq!(parse(&msg), Err(ParseError::BadLength));
        // Header length fixed up, but the chain ends before the message does.
        let n = msg.len() as u32;
        msg[24..28].copy_from_slice(&n.to_be_bytes());
        assert_eq!(parse(&msg), Err(ParseError::BadLength));
    }

    #[test]
    fn unknown_payloads_skipped_unless_critical() {
        let mut msg = encode(header(), &[Payload::Nonce(vec![1; 16])]);
        // Append an unknown payload type 200 after the nonce.
        msg[HEADER_LEN] = 200;
        msg.extend_from_slice(&[0, 0, 0, 6, 0xAA, 0xBB]);
        let n = msg.len() as u32;
        msg[24..28].copy_from_slice(&n.to_be_bytes());
        let m = parse(&msg).unwrap();
        assert_eq!(m.chain.skipped, 1);
        assert_eq!(m.chain.payloads, vec![Payload::Nonce(vec![1; 16])]);
        let crit = HEADER_LEN + 4 + 16 + 1;
        msg[crit] = 0x80;
        assert_eq!(parse(&msg), Err(ParseError::UnsupportedCritical(200)));
        // A Vendor ID with the critical bit is known and skipped.
        msg[HEADER_LEN] = payload::VENDOR;
        assert_eq!(parse(&msg).unwrap().chain.skipped, 1);
    }

    #[test]
    fn sk_must_be_last() {
        let mut msg = encode(header(), &[]);
        msg[16] = payload::SK;
        // SK whose "next" says Nonce: that is the first inner payload.
        msg.extend_from_slice(&[payload::NONCE, 0, 0, 8, 1, 2, 3, 4]);
        let n = msg.len() as u32;
        msg[24..28].copy_from_slice(&n.to_be_bytes());
        let m = parse(&msg).unwrap();
        assert_eq!(
            m.chain.encrypted,
            Some((payload::NONCE, HEADER_LEN + 4..msg.len()))
        );
        // Bytes after the SK payload: SK is not the last one.
        msg[HEADER_LEN + 3] = 6;
        assert_eq!(parse(&msg), Err(ParseError::Syntax));
    }

    #[test]
    fn unknown_transform_attribute_is_marked() {
        let mut msg = encode(
            header(),
            &[Payload::Sa(vec![Proposal {
                num: 1,
                protocol: protocol::IKE,
                spi: vec![],
                transforms: vec![Transform::new(
                    transform::ENCR,
                    transform::ENCR_AES_GCM_16,
                    Some(256),
                )],
            }])],
        );
        // Change the attribute type from Key Length (14) to 15.
        let attr = msg.len() - 4;
        msg[attr + 1] = 15;
        let m = parse(&msg).unwrap();
        let Payload::Sa(p) = &m.chain.payloads[0] else {
            panic!()
        };
        assert!(p[0].transforms[0].unknown_attr);
        assert_eq!(p[0].transforms[0].key_len, None);
    }
}
