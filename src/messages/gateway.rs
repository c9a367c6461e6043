//! The gateway: registration, heartbeats, its desired state and what it applied.

use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::IpsecParams;
use super::common::{
    FieldError, GatewayId, PublicKey, SiteId, Transport, TunnelKind, UnixMillis, check_text,
    is_sha256_hex,
};
use super::operator::Health;
use crate::ipv4::Prefix;

/// A gateway announces itself (at start and after the server lost it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct GatewayRegistration {
    /// Where agents dial it (its public UDP endpoints).
    pub endpoints: Vec<SocketAddr>,
    /// Its WireGuard public key.
    pub public_key: PublicKey,
    /// The tunnel kinds it terminates.
    pub tunnel_kinds: Vec<TunnelKind>,
    /// How many sites (tunnels) it takes at most.
    pub max_tunnels: u32,
    /// The gateway program's version, for the operator.
    pub software_version: String,
    /// The technician prefixes of its center LAN (`[center]
    /// technician_prefixes`): the center's traffic selectors of IPsec sites.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub technician_prefixes: Vec<Prefix>,
    /// Its TLS fallback port, when it listens on one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<GatewayTls>,
    /// During a rotation of its WireGuard key: the next key, which it
    /// already answers beside `public_key` (docs/DESIGN.md, "Control plane").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<PublicKey>,
}

/// A gateway's TLS fallback (the tunnel datagrams over TCP, docs/DESIGN.md "Tunnels").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct GatewayTls {
    /// Where agents dial it over TCP (its public TLS endpoints).
    pub endpoints: Vec<SocketAddr>,
    /// SHA-256 of its certificate's SubjectPublicKeyInfo (DER), lowercase hex:
    /// the pin agents verify it by.
    pub spki_sha256: String,
}

impl GatewayTls {
    /// # Errors
    /// A [`FieldError`] naming the first invalid field.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.endpoints.is_empty() || self.endpoints.len() > 16 {
            return Err(FieldError::new("tls.endpoints", "1 to 16 endpoints"));
        }
        if self
            .endpoints
            .iter()
            .any(|e| e.port() == 0 || e.ip().is_unspecified())
        {
            return Err(FieldError::new(
                "tls.endpoints",
                "an endpoint needs an address and a port",
            ));
        }
        if !is_sha256_hex(&self.spki_sha256) {
            return Err(FieldError::new(
                "tls.spki_sha256",
                "64 lowercase hex digits",
            ));
        }
        Ok(())
    }
}

impl GatewayRegistration {
    /// # Errors
    /// A [`FieldError`] naming the first invalid field.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.endpoints.is_empty() || self.endpoints.len() > 16 {
            return Err(FieldError::new("endpoints", "1 to 16 endpoints"));
        }
        if self
            .endpoints
            .iter()
            .any(|e| e.port() == 0 || e.ip().is_unspecified())
        {
            return Err(FieldError::new(
                "endpoints",
                "an endpoint needs an address and a port",
            ));
        }
        if self.tunnel_kinds.is_empty() {
            return Err(FieldError::new("tunnel_kinds", "at least one tunnel kind"));
        }
        if self.max_tunnels == 0 || self.max_tunnels > 1_000_000 {
            return Err(FieldError::new("max_tunnels", "1 to 1000000"));
        }
        if self.technician_prefixes.len() > 64 {
            return Err(FieldError::new(
                "technician_prefixes",
                "at most 64 prefixes",
            ));
        }
        check_text("software_version", &self.software_version, 64, false)?;
        if self.next_public_key == Some(self.public_key) {
            return Err(FieldError::new(
                "next_public_key",
                "the next key must differ from public_key",
            ));
        }
        self.tls.as_ref().map_or(Ok(()), GatewayTls::validate)
    }
}

/// The server's answer to a registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct GatewayRegistered {
    /// The gateway's id (the one its credential belongs to).
    pub gateway_id: GatewayId,
    /// How often to heartbeat.
    pub heartbeat_interval_ms: u64,
}

/// Per-peer counters a gateway reports with its heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct PeerStatus {
    /// The site of this peer.
    pub site_id: SiteId,
    /// Last authenticated endpoint.
    pub endpoint: Option<SocketAddr>,
    /// Last completed handshake.
    pub last_handshake: Option<UnixMillis>,
    /// Bytes received from the peer (inner packets).
    pub rx_bytes: u64,
    /// Bytes sent to the peer (inner packets).
    pub tx_bytes: u64,
    /// How its datagrams travel now (absent: not known, e.g. an older gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
}

/// The periodic sign of life of a gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct GatewayHeartbeat {
    /// Its capacity (may change at restart).
    pub max_tunnels: u32,
    /// Peers configured now.
    pub active_tunnels: u32,
    /// Its own view of its health.
    pub health: Health,
    /// The desired-state version it runs.
    pub applied_version: u64,
    /// Per-peer counters.
    #[serde(default)]
    pub peers: Vec<PeerStatus>,
    /// Its WireGuard key now: changes when a rotation of its key ends
    /// (absent from older gateways, and until a rotation ran since the
    /// gateway started: its registration named the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<PublicKey>,
    /// During a rotation of its key: the next key, which it already
    /// answers beside `public_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<PublicKey>,
}

impl GatewayHeartbeat {
    /// # Errors
    /// A [`FieldError`] naming the first invalid field.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.max_tunnels == 0 || self.max_tunnels > 1_000_000 {
            return Err(FieldError::new("max_tunnels", "1 to 1000000"));
        }
        if self.health == Health::Down {
            return Err(FieldError::new(
                "health",
                "a gateway cannot report itself down",
            ));
        }
        if self.peers.len() > 1_000_000 {
            return Err(FieldError::new("peers", "too many peers"));
        }
        if self.next_public_key.is_some() && self.next_public_key == self.public_key {
            return Err(FieldError::new(
                "next_public_key",
                "the next key must differ from public_key",
            ));
        }
        Ok(())
    }
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct HeartbeatAck {
    /// The newest desired-state version for this gateway.
    pub desired_version: u64,
    /// Whether the operator drains this gateway.
    pub drain: bool,
    /// How long after sending this heartbeat the gateway may keep announcing
    /// its NAT addresses without another acknowledged one: the server's
    /// `down_after_ms`, after which it moves the gateway's sites elsewhere.
    /// Absent from a server that never moves them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
}

/// One site's tunnel on a gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct GatewayPeer {
    /// The site.
    pub site_id: SiteId,
    /// The site agent's WireGuard public key.
    pub public_key: PublicKey,
    /// The NAT addresses routed into this tunnel; also the only inner source
    /// addresses accepted from it (anti-spoofing).
    pub nat_addresses: Vec<Ipv4Addr>,
    /// The protocol of this site's tunnel (absent: WireGuard).
    #[serde(default)]
    pub tunnel: TunnelKind,
    /// For an IPsec site (`tunnel` `ipsec`): PSK, identities, proposals and
    /// traffic selectors (`local_*`: the center).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipsec: Option<IpsecParams>,
    /// SHA-256 (lowercase hex) of the token the site's agent presents on the
    /// gateway's TLS port; absent: the site may not use the TLS fallback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_token_sha256: Option<String>,
}

/// Everything a gateway should be doing, as one versioned document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct GatewayDesiredState {
    /// Increases on every change; a gateway ignores a document older than what it runs.
    pub version: u64,
    /// The gateway this is for.
    pub gateway_id: GatewayId,
    /// Its peers, ordered by site id.
    pub peers: Vec<GatewayPeer>,
    /// Sites rotating their key: the next key of each, accepted next to
    /// the peer's `public_key` (absent: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub next_keys: Vec<super::NextPeerKey>,
    /// Per NAT address, the only technician sources that may reach it (a
    /// site assigned to a team, docs/OPERATIONS.md "Teams"). A packet must
    /// come from one of these and from the gateway's technician prefixes.
    /// A NAT address not listed may be reached from any technician prefix
    /// (absent altogether from older servers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_sources: Vec<AllowedSources>,
    /// A rotation of the gateway's own WireGuard key (absent: none asked
    /// for and none under way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_rotation: Option<GatewayKeyRotation>,
}

/// A rotation of a gateway's WireGuard key as the server drives it. The
/// gateway makes the next key and announces it (heartbeat
/// `next_public_key`); the server records it and tells the gateway's sites'
/// agents to dial it; the gateway, answering both keys meanwhile, makes it
/// its only key once every site dialed it or a grace time passed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct GatewayKeyRotation {
    /// The operator or the schedule asks for a new key (true until the
    /// server has recorded the gateway's next key).
    #[serde(default)]
    pub requested: bool,
    /// The next key as the server recorded it and publishes it to the
    /// agents: until the gateway sees its own next key here, no agent dials
    /// it, so it does not end the rotation before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<PublicKey>,
}

/// Where a rotation of a gateway's key stands, as the operator sees it
/// (the answer to `POST` [`super::paths::GATEWAY_ROTATE_KEY`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct GatewayKeyRotationStatus {
    /// The gateway.
    pub gateway_id: GatewayId,
    /// Its current WireGuard key.
    pub public_key: PublicKey,
    /// The next key, once the gateway announced it (null until then).
    pub next_public_key: Option<PublicKey>,
    /// Whether the server still waits for the gateway to announce a next key.
    pub requested: bool,
}

/// The sources allowed to reach one NAT address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct AllowedSources {
    /// The NAT address (one of a peer's `nat_addresses`).
    pub nat_address: Ipv4Addr,
    /// The source prefixes; empty: no technician may reach it.
    pub sources: Vec<Prefix>,
}

/// What a gateway or agent reports after reconciling to a desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct AppliedState {
    /// The version it now runs.
    pub version: u64,
    /// Empty when everything was applied.
    #[serde(default)]
    pub errors: Vec<String>,
}
