//! What every party shares: ids, times, keys, terminal names, tunnel kinds
//! and the error body of the API.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Milliseconds since the Unix epoch (UTC). The core never reads a clock; the
/// IO shells convert.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(transparent)]
pub struct UnixMillis(pub u64);

macro_rules! id_type {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = std::num::ParseIntError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                s.parse().map(Self)
            }
        }
    };
}

id_type!(
    /// A customer site (one router agent).
    SiteId
);
id_type!(
    /// A gateway instance.
    GatewayId
);
id_type!(
    /// A maintenance request. Its human-facing form is the acceptance number.
    RequestId
);

/// A 32-byte Curve25519 public key (WireGuard), base64 on the wire.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// The standard base64 form, as `wg pubkey` prints it.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

/// A key that is not 32 bytes of standard base64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a base64-encoded 32-byte key")]
pub struct InvalidKey;

impl FromStr for PublicKey {
    type Err = InvalidKey;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = BASE64.decode(s.trim()).map_err(|_| InvalidKey)?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| InvalidKey)?;
        Ok(Self(key))
    }
}

/// Schema: standard base64 of 32 bytes.
#[cfg(feature = "schemars")]
impl schemars::JsonSchema for PublicKey {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PublicKey".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "format": "byte",
            "minLength": 44,
            "maxLength": 44,
            "description": "A 32-byte Curve25519 (WireGuard) public key, standard base64 as `wg pubkey` prints it.",
        })
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The name of a terminal (a PC on the customer LAN) as the server knows it.
///
/// The server never learns real LAN addresses (docs/DESIGN.md, "Address
/// plan"): the agent resolves names locally. A name is 1–63 characters of
/// `A–Z a–z 0–9 . _ -`, starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct TerminalName(String);

impl TerminalName {
    /// The longest accepted name.
    pub const MAX_LEN: usize = 63;

    /// Validates `name`.
    ///
    /// # Errors
    /// When `name` is empty, too long, or holds a character outside the set above.
    pub fn new(name: impl Into<String>) -> Result<Self, FieldError> {
        let name = name.into();
        let ok = !name.is_empty()
            && name.len() <= Self::MAX_LEN
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if ok {
            Ok(Self(name))
        } else {
            Err(FieldError::new(
                "terminals",
                "a terminal name is 1-63 characters of A-Z a-z 0-9 . _ - starting with a letter or digit",
            ))
        }
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Schema: the accepted names.
#[cfg(feature = "schemars")]
impl schemars::JsonSchema for TerminalName {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "TerminalName".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "minLength": 1,
            "maxLength": 63,
            "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
            "description": "A terminal (PC) on the customer LAN, by name; the agent resolves it locally.",
        })
    }
}

impl fmt::Display for TerminalName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TerminalName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::new(s).map_err(|e| serde::de::Error::custom(e.message))
    }
}

/// Which tunnel protocol carries a site's traffic.
/// Documents that name none mean WireGuard.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum TunnelKind {
    /// WireGuard over UDP (boringtun's noise layer).
    #[default]
    Wireguard,
    /// IKEv2 (RFC 7296) with a pre-shared key, and ESP (RFC 4303) in UDP
    /// (RFC 3948); its parameters travel as [`super::IpsecParams`].
    Ipsec,
}

impl TunnelKind {
    /// The wire name (`"wireguard"`, `"ipsec"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Wireguard => "wireguard",
            Self::Ipsec => "ipsec",
        }
    }

    /// The name people use (`WireGuard`, `IPsec`).
    pub fn label(self) -> &'static str {
        match self {
            Self::Wireguard => "WireGuard",
            Self::Ipsec => "IPsec",
        }
    }
}

impl fmt::Display for TunnelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Not a tunnel kind's wire name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a tunnel kind (wireguard, ipsec)")]
pub struct InvalidTunnelKind;

impl FromStr for TunnelKind {
    type Err = InvalidTunnelKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "wireguard" => Ok(Self::Wireguard),
            "ipsec" => Ok(Self::Ipsec),
            _ => Err(InvalidTunnelKind),
        }
    }
}

/// How a site's tunnel datagrams travel between agent and gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// Plain UDP datagrams.
    Udp,
    /// One TLS stream to the gateway's TCP port (the fallback when UDP is blocked).
    Tls,
    /// The TLS stream through an HTTP CONNECT proxy.
    TlsProxy,
}

impl Transport {
    /// The wire name (`udp`, `tls`, `tls_proxy`), also the metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tls => "tls",
            Self::TlsProxy => "tls_proxy",
        }
    }
}

/// Whether `s` is a SHA-256 digest as the messages carry it (64 lowercase hex digits).
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The error body of every 4xx/5xx answer of the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct ApiError {
    /// A stable machine-readable code, e.g. `invalid_field`, `unauthorized`, `no_capacity`.
    pub error: String,
    /// A sentence for humans.
    pub message: String,
    /// The request field at fault, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// A request field that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// The JSON field name.
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// A validation failure of `field`.
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        Self {
            error: "invalid_field".to_owned(),
            message: e.to_string(),
            field: Some(e.field.to_owned()),
        }
    }
}

pub(super) fn check_text(
    field: &'static str,
    value: &str,
    max: usize,
    required: bool,
) -> Result<(), FieldError> {
    if required && value.trim().is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if value.chars().count() > max {
        return Err(FieldError::new(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}
