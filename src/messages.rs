//! The control-plane protocol: the JSON documents that the maintenance server,
//! the gateways and the router agents exchange over HTTP(S).
//!
//! These types are the single definition of the API contract; the server
//! generates its OpenAPI document from them and the gateway and the agent
//! deserialize exactly these. The HTTP routes are listed in [`paths`].
//!
//! Control is declarative (DESIGN.md, "Control plane"): gateways and agents pull
//! a versioned desired-state document ([`GatewayDesiredState`],
//! [`AgentDesiredState`]) over a long-poll (`GET …/state?after=VERSION`, answered
//! as soon as the version exceeds `after`, or with the current document when the
//! wait times out), reconcile to it, and report what they applied
//! ([`AppliedState`]).
//!
//! Times on the wire are milliseconds since the Unix epoch ([`UnixMillis`]).
//! Keys are standard base64, as `wg` prints them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// HTTP routes of the maintenance server API, relative to its base URL.
pub mod paths {
    /// `POST` [`super::EnrollRequest`] → [`super::EnrollResponse`]. Authenticated by the token in the body.
    pub const ENROLL: &str = "/api/v1/enroll";
    /// `POST` [`super::NewMaintenanceRequest`] → [`super::MaintenanceRequestView`]; `GET` → `Vec<MaintenanceRequestView>` (the site's own).
    pub const AGENT_REQUESTS: &str = "/api/v1/agent/requests";
    /// `POST` (empty body) → [`super::MaintenanceRequestView`]. `{id}` is a [`super::RequestId`].
    pub const AGENT_REVOKE: &str = "/api/v1/agent/requests/{id}/revoke";
    /// `POST` [`super::FailureReport`] → [`super::FailureAccepted`].
    pub const AGENT_FAILURES: &str = "/api/v1/agent/failures";
    /// `GET ?after=VERSION&wait_ms=N` → [`super::AgentDesiredState`] (long-poll).
    pub const AGENT_STATE: &str = "/api/v1/agent/state";
    /// `POST` [`super::AppliedState`] → 204.
    pub const AGENT_APPLIED: &str = "/api/v1/agent/applied";

    /// `POST` [`super::GatewayRegistration`] → [`super::GatewayRegistered`].
    pub const GATEWAY_REGISTER: &str = "/api/v1/gateway/register";
    /// `POST` [`super::GatewayHeartbeat`] → [`super::HeartbeatAck`].
    pub const GATEWAY_HEARTBEAT: &str = "/api/v1/gateway/heartbeat";
    /// `GET ?after=VERSION&wait_ms=N` → [`super::GatewayDesiredState`] (long-poll).
    pub const GATEWAY_STATE: &str = "/api/v1/gateway/state";
    /// `POST` [`super::AppliedState`] → 204.
    pub const GATEWAY_APPLIED: &str = "/api/v1/gateway/applied";

    /// Operator: `POST` [`super::NewSite`] → [`super::SiteCreated`]; `GET` → `Vec<SiteView>`.
    pub const SITES: &str = "/api/v1/sites";
    /// Operator: `POST` → [`super::SiteCreated`] with a fresh enrollment token (re-enrollment).
    pub const SITE_TOKEN: &str = "/api/v1/sites/{id}/token";
    /// Operator: `POST` [`super::NewGateway`] → [`super::GatewayCreated`]; `GET` → `Vec<GatewayView>`.
    pub const GATEWAYS: &str = "/api/v1/gateways";
    /// Operator: `POST` [`super::DrainGateway`] → [`super::GatewayView`].
    pub const GATEWAY_DRAIN: &str = "/api/v1/gateways/{id}/drain";

    /// Technician: `POST` [`super::Login`] → [`super::LoginResponse`] + session cookie.
    pub const LOGIN: &str = "/api/v1/login";
    /// Technician: `POST` → 204, clears the session.
    pub const LOGOUT: &str = "/api/v1/logout";
    /// Technician: `GET ?state=&site=` → `Vec<MaintenanceRequestView>`.
    pub const REQUESTS: &str = "/api/v1/requests";
    /// Technician: `POST` → [`super::MaintenanceRequestView`].
    pub const REQUEST_START: &str = "/api/v1/requests/{id}/start";
    /// Technician: `POST` → [`super::MaintenanceRequestView`].
    pub const REQUEST_END: &str = "/api/v1/requests/{id}/end";
    /// Technician: `GET` → `Vec<FailureView>`.
    pub const FAILURES: &str = "/api/v1/failures";
    /// Technician: `GET ?before=ID&limit=N` → `Vec<AuditEntry>`.
    pub const AUDIT: &str = "/api/v1/audit";
    /// Technician: `GET ?after=VERSION&wait_ms=N` → [`super::ConsoleEvents`] (long-poll for live updates).
    pub const CONSOLE_EVENTS: &str = "/api/v1/events";

    /// The OpenAPI document of all of the above.
    pub const OPENAPI: &str = "/api/openapi.json";
    /// Liveness: `GET` → 200 `{"status":"ok"}`.
    pub const HEALTH: &str = "/healthz";
    /// Prometheus text exposition.
    pub const METRICS: &str = "/metrics";
}

/// Milliseconds since the Unix epoch (UTC). The core never reads a clock; the
/// IO shells convert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
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
/// The server never learns real LAN addresses (DESIGN.md): the agent resolves
/// names locally. A name is 1–63 characters of `A–Z a–z 0–9 . _ -`, starting
/// with a letter or digit.
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

fn check_text(
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

// ---------------------------------------------------------------- enrollment

/// An agent's first contact: the one-time token the operator handed out and
/// the agent's tunnel public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The one-time enrollment token (`maintenance-server site add`).
    pub token: String,
    /// The agent's WireGuard public key; its private key never leaves the agent.
    pub public_key: PublicKey,
}

/// The site identity the agent stores (0600) and uses from then on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct EnrollResponse {
    /// The site this agent now speaks for.
    pub site_id: SiteId,
    /// The operator's name for the site.
    pub site_name: String,
    /// The long-lived bearer credential (`Authorization: Bearer …`). Re-enrolling rotates it.
    pub credential: String,
}

// ---------------------------------------------------------------- operator

/// Operator: create a site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct NewSite {
    /// A unique, human-chosen name (1–100 characters).
    pub name: String,
}

impl NewSite {
    /// # Errors
    /// A [`FieldError`] naming the first invalid field.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_text("name", &self.name, 100, true)
    }
}

/// A site and its one-time enrollment token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct SiteCreated {
    /// The new site.
    pub site_id: SiteId,
    /// Its name.
    pub name: String,
    /// Shown once; the server keeps only a hash.
    pub enrollment_token: String,
    /// After this the token is refused.
    pub token_expires_at: UnixMillis,
}

/// A site as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct SiteView {
    /// The site.
    pub site_id: SiteId,
    /// Its name.
    pub name: String,
    /// Whether an agent has enrolled.
    pub enrolled: bool,
    /// The gateway that carries its tunnel, if it has one.
    pub gateway_id: Option<GatewayId>,
    /// The NAT addresses it holds now.
    pub nat_addresses: Vec<Ipv4Addr>,
    /// When the site was created.
    pub created_at: UnixMillis,
}

/// Operator: create a gateway identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct NewGateway {
    /// A unique name (1–100 characters).
    pub name: String,
}

impl NewGateway {
    /// # Errors
    /// A [`FieldError`] naming the first invalid field.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_text("name", &self.name, 100, true)
    }
}

/// A gateway identity and its credential (shown once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct GatewayCreated {
    /// The gateway.
    pub gateway_id: GatewayId,
    /// Its name.
    pub name: String,
    /// The bearer credential the gateway presents (`Authorization: Bearer …`).
    pub credential: String,
}

/// Operator: put a gateway into (or out of) drain mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct DrainGateway {
    /// `true`: take no new sites.
    pub drain: bool,
}

/// The health a gateway reports, and the server's view of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Forwarding and accepting new sites.
    Healthy,
    /// Forwarding, but something is wrong (e.g. a route could not be installed); takes no new sites.
    Degraded,
    /// Missed its heartbeats (server-side only).
    Down,
}

/// A gateway as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct GatewayView {
    /// The gateway.
    pub gateway_id: GatewayId,
    /// Its name.
    pub name: String,
    /// Its tunnel endpoints, once registered.
    pub endpoints: Vec<SocketAddr>,
    /// Its WireGuard public key, once registered.
    pub public_key: Option<PublicKey>,
    /// The tunnel kinds it terminates.
    pub tunnel_kinds: Vec<TunnelKind>,
    /// Its capacity.
    pub max_tunnels: u32,
    /// Sites it carries now.
    pub tunnels: u32,
    /// Its health.
    pub health: Health,
    /// Whether the operator drains it.
    pub drain: bool,
    /// The last heartbeat received.
    pub last_heartbeat: Option<UnixMillis>,
}

// ---------------------------------------------------------------- gateway

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
        check_text("software_version", &self.software_version, 64, false)
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

// ---------------------------------------------------------------- agent

/// The agent's tunnel to its gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct AgentTunnel {
    /// The gateway the server chose.
    pub gateway_id: GatewayId,
    /// The protocol (absent: WireGuard).
    #[serde(default)]
    pub kind: TunnelKind,
    /// Where to dial.
    pub endpoint: SocketAddr,
    /// The gateway's public key.
    pub public_key: PublicKey,
    /// WireGuard persistent keepalive, seconds (keeps the customer's NAPT mapping open).
    pub persistent_keepalive_s: u16,
}

/// One 1:1 static NAT mapping the agent must install.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct AgentMapping {
    /// The pooled VPN-NAT address the technician connects to.
    pub nat_address: Ipv4Addr,
    /// The terminal it stands for; the agent resolves it to the real LAN address.
    pub terminal: TerminalName,
    /// The request that opened it.
    pub request_id: RequestId,
    /// The customer's consent ends here: the agent removes the mapping at this
    /// time by itself, even when the server is unreachable.
    pub expires_at: UnixMillis,
}

/// Everything an agent should be doing, as one versioned document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct AgentDesiredState {
    /// Increases on every change.
    pub version: u64,
    /// The site this is for.
    pub site_id: SiteId,
    /// The tunnel to dial; `None` when the site has no mapping (tunnel torn down).
    pub tunnel: Option<AgentTunnel>,
    /// The mappings, ordered by NAT address.
    pub mappings: Vec<AgentMapping>,
    /// Set when the site asked for maintenance but no gateway had a free slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// The requester's authority at the customer (the patent's "level").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// An ordinary user.
    General,
    /// The customer's administrator.
    Administrator,
}

/// How urgent the customer says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Urgency {
    /// Whenever convenient.
    Low,
    /// Today.
    Normal,
    /// As soon as possible.
    High,
    /// Business is stopped.
    Emergency,
}

/// The customer's request, sent by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct NewMaintenanceRequest {
    /// Who asks (1–100 characters).
    pub requester_name: String,
    /// Their authority.
    pub level: Level,
    /// How urgent.
    pub urgency: Urgency,
    /// A phone number to call back (up to 40 characters of digits, spaces, + - ( )).
    pub phone: String,
    /// What is wrong (up to 4000 characters).
    pub content: String,
    /// The terminals to service (1–64 distinct names).
    pub terminals: Vec<TerminalName>,
}

impl NewMaintenanceRequest {
    /// The most terminals one request may name.
    pub const MAX_TERMINALS: usize = 64;

    /// # Errors
    /// A [`FieldError`] naming the first invalid field.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_text("requester_name", &self.requester_name, 100, true)?;
        if self.phone.len() > 40
            || !self
                .phone
                .chars()
                .all(|c| c.is_ascii_digit() || matches!(c, ' ' | '+' | '-' | '(' | ')'))
        {
            return Err(FieldError::new(
                "phone",
                "at most 40 characters of digits, spaces and + - ( )",
            ));
        }
        check_text("content", &self.content, 4000, false)?;
        if self.terminals.is_empty() || self.terminals.len() > Self::MAX_TERMINALS {
            return Err(FieldError::new("terminals", "name 1 to 64 terminals"));
        }
        let mut seen = std::collections::BTreeSet::new();
        if !self.terminals.iter().all(|t| seen.insert(t)) {
            return Err(FieldError::new("terminals", "a terminal is named twice"));
        }
        Ok(())
    }
}

/// Where a maintenance request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum RequestState {
    /// Accepted, mappings installed, no technician yet.
    Waiting,
    /// A technician started work.
    InProgress,
    /// The technician ended it.
    Ended,
    /// The customer ended access.
    Revoked,
    /// The maximum maintenance duration passed.
    Expired,
}

impl RequestState {
    /// Whether the request still holds NAT addresses.
    pub fn is_open(self) -> bool {
        matches!(self, Self::Waiting | Self::InProgress)
    }
}

/// A terminal of a request and the NAT address it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct TerminalAssignment {
    /// The terminal.
    pub name: TerminalName,
    /// Its NAT address while the request is open; `None` after the end.
    pub nat_address: Option<Ipv4Addr>,
}

/// A maintenance request as the customer's page and the technician console show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct MaintenanceRequestView {
    /// The request.
    pub id: RequestId,
    /// The number the customer quotes on the phone.
    pub acceptance_number: String,
    /// The site.
    pub site_id: SiteId,
    /// The site's name.
    pub site_name: String,
    /// The global address the request came from.
    pub global_address: Option<IpAddr>,
    /// Who asked.
    pub requester_name: String,
    /// Their authority.
    pub level: Level,
    /// How urgent.
    pub urgency: Urgency,
    /// Call-back number.
    pub phone: String,
    /// What is wrong.
    pub content: String,
    /// Terminals and their NAT addresses.
    pub terminals: Vec<TerminalAssignment>,
    /// Where it is in its life.
    pub state: RequestState,
    /// The gateway carrying the site's tunnel while the request is open.
    pub gateway_id: Option<GatewayId>,
    /// When the server accepted it.
    pub received_at: UnixMillis,
    /// When a technician started.
    pub started_at: Option<UnixMillis>,
    /// When it ended, was revoked or expired.
    pub ended_at: Option<UnixMillis>,
    /// When it expires by itself.
    pub expires_at: UnixMillis,
}

/// A failure code the agent reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum FailureCode {
    /// The agent's LAN interface lost its link.
    LanLinkDown,
    /// A watched terminal stopped answering its health check.
    TerminalUnreachable,
    /// The tunnel to the gateway does not come up.
    TunnelDown,
    /// Anything else (see `detail`).
    Other,
}

/// A failure report from an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct FailureReport {
    /// What failed.
    pub code: FailureCode,
    /// Details for the technician (up to 2000 characters).
    pub detail: String,
    /// The terminal concerned, if one.
    #[serde(default)]
    pub terminal: Option<TerminalName>,
    /// Ask the server to open a maintenance request for this failure
    /// (the server's configuration may also do so by itself).
    #[serde(default)]
    pub open_request: bool,
}

impl FailureReport {
    /// # Errors
    /// A [`FieldError`] naming the first invalid field.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_text("detail", &self.detail, 2000, false)
    }
}

/// The server's answer to a failure report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct FailureAccepted {
    /// The stored report.
    pub failure_id: u64,
    /// The maintenance request opened for it, if one was.
    pub request: Option<MaintenanceRequestView>,
}

/// A stored failure report, as technicians see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct FailureView {
    /// The report.
    pub id: u64,
    /// The site.
    pub site_id: SiteId,
    /// The site's name.
    pub site_name: String,
    /// What failed.
    pub code: FailureCode,
    /// Details.
    pub detail: String,
    /// The terminal concerned.
    pub terminal: Option<TerminalName>,
    /// When it was received.
    pub received_at: UnixMillis,
    /// The request opened for it.
    pub request_id: Option<RequestId>,
}

// ---------------------------------------------------------------- technician

/// Technician login.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Login {
    /// The technician's name.
    pub name: String,
    /// The password (never logged).
    pub password: String,
}

impl fmt::Debug for Login {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Login")
            .field("name", &self.name)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The answer to a login; the session itself is an `HttpOnly` cookie.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct LoginResponse {
    /// The technician.
    pub name: String,
    /// Send it back as the `X-CSRF-Token` header on every state-changing request.
    pub csrf_token: String,
}

/// One line of the append-only audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct AuditEntry {
    /// Increasing id.
    pub id: u64,
    /// When.
    pub at: UnixMillis,
    /// Who: `operator`, `technician:NAME`, `site:ID`, `gateway:ID`, `system`.
    pub actor: String,
    /// What, e.g. `request.start`.
    pub action: String,
    /// On what, e.g. `request:17`.
    pub object: String,
    /// Extra detail.
    pub detail: String,
}

/// The console's live feed: the current version and everything it shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct ConsoleEvents {
    /// Increases on every change a technician can see.
    pub version: u64,
    /// Requests, newest first.
    pub requests: Vec<MaintenanceRequestView>,
    /// Failures, newest first.
    pub failures: Vec<FailureView>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + fmt::Debug>(value: &T) -> String {
        let json = serde_json::to_string(value).unwrap();
        let back: T = serde_json::from_str(&json).unwrap();
        assert_eq!(&back, value, "{json}");
        json
    }

    fn key(b: u8) -> PublicKey {
        PublicKey([b; 32])
    }

    fn name(s: &str) -> TerminalName {
        TerminalName::new(s).unwrap()
    }

    fn request_view() -> MaintenanceRequestView {
        MaintenanceRequestView {
            id: RequestId(17),
            acceptance_number: "20261122-000017".into(),
            site_id: SiteId(3),
            site_name: "Bakery Schmidt".into(),
            global_address: Some("198.51.100.7".parse().unwrap()),
            requester_name: "A. Schmidt".into(),
            level: Level::Administrator,
            urgency: Urgency::High,
            phone: "+49 30 1234".into(),
            content: "printer offline".into(),
            terminals: vec![TerminalAssignment {
                name: name("pc-1"),
                nat_address: Some(Ipv4Addr::new(10, 64, 0, 5)),
            }],
            state: RequestState::Waiting,
            gateway_id: Some(GatewayId(1)),
            received_at: UnixMillis(1_700_000_000_000),
            started_at: None,
            ended_at: None,
            expires_at: UnixMillis(1_700_014_400_000),
        }
    }

    #[test]
    fn every_message_round_trips_through_json() {
        round_trip(&EnrollRequest {
            token: "tok".into(),
            public_key: key(1),
        });
        round_trip(&EnrollResponse {
            site_id: SiteId(3),
            site_name: "s".into(),
            credential: "c".into(),
        });
        round_trip(&GatewayRegistration {
            endpoints: vec!["203.0.113.1:51820".parse().unwrap()],
            public_key: key(2),
            tunnel_kinds: vec![TunnelKind::Wireguard],
            max_tunnels: 2,
            software_version: "0.1.0".into(),
        });
        round_trip(&GatewayRegistered {
            gateway_id: GatewayId(1),
            heartbeat_interval_ms: 1000,
        });
        round_trip(&GatewayHeartbeat {
            max_tunnels: 2,
            active_tunnels: 1,
            health: Health::Healthy,
            applied_version: 4,
            peers: vec![PeerStatus {
                site_id: SiteId(3),
                endpoint: Some("198.51.100.7:40000".parse().unwrap()),
                last_handshake: Some(UnixMillis(5)),
                rx_bytes: 1,
                tx_bytes: 2,
            }],
        });
        round_trip(&HeartbeatAck {
            desired_version: 4,
            drain: false,
        });
        round_trip(&GatewayDesiredState {
            version: 4,
            gateway_id: GatewayId(1),
            peers: vec![GatewayPeer {
                site_id: SiteId(3),
                public_key: key(3),
                nat_addresses: vec![Ipv4Addr::new(10, 64, 0, 5)],
                tunnel: TunnelKind::Wireguard,
            }],
        });
        round_trip(&AppliedState {
            version: 4,
            errors: vec!["route 10.64.0.5: EPERM".into()],
        });
        round_trip(&AgentDesiredState {
            version: 9,
            site_id: SiteId(3),
            tunnel: Some(AgentTunnel {
                gateway_id: GatewayId(1),
                kind: TunnelKind::Wireguard,
                endpoint: "203.0.113.1:51820".parse().unwrap(),
                public_key: key(2),
                persistent_keepalive_s: 25,
            }),
            mappings: vec![AgentMapping {
                nat_address: Ipv4Addr::new(10, 64, 0, 5),
                terminal: name("pc-1"),
                request_id: RequestId(17),
                expires_at: UnixMillis(1_700_014_400_000),
            }],
            problem: None,
        });
        round_trip(&NewMaintenanceRequest {
            requester_name: "A. Schmidt".into(),
            level: Level::General,
            urgency: Urgency::Emergency,
            phone: "+49 30 1234".into(),
            content: "".into(),
            terminals: vec![name("pc-1"), name("nas")],
        });
        round_trip(&request_view());
        round_trip(&FailureReport {
            code: FailureCode::LanLinkDown,
            detail: "eth1 carrier lost".into(),
            terminal: None,
            open_request: true,
        });
        round_trip(&FailureAccepted {
            failure_id: 1,
            request: Some(request_view()),
        });
        round_trip(&Login {
            name: "tech".into(),
            password: "pw".into(),
        });
        round_trip(&ConsoleEvents {
            version: 1,
            requests: vec![request_view()],
            failures: vec![],
        });
        round_trip(&ApiError {
            error: "invalid_field".into(),
            message: "phone: bad".into(),
            field: Some("phone".into()),
        });
    }

    #[test]
    fn documents_without_a_tunnel_kind_mean_wireguard() {
        let peer: GatewayPeer = serde_json::from_str(&format!(
            r#"{{"site_id":3,"public_key":"{}","nat_addresses":["10.64.0.5"]}}"#,
            key(3)
        ))
        .unwrap();
        assert_eq!(peer.tunnel, TunnelKind::Wireguard);
        let tunnel: AgentTunnel = serde_json::from_str(&format!(
            r#"{{"gateway_id":1,"endpoint":"203.0.113.1:51820","public_key":"{}","persistent_keepalive_s":25}}"#,
            key(2)
        ))
        .unwrap();
        assert_eq!(tunnel.kind, TunnelKind::Wireguard);
        assert!(
            serde_json::to_string(&peer)
                .unwrap()
                .contains("\"tunnel\":\"wireguard\"")
        );
    }

    #[test]
    fn wire_names_are_stable() {
        let json = round_trip(&request_view());
        for needle in [
            "\"state\":\"waiting\"",
            "\"level\":\"administrator\"",
            "\"urgency\":\"high\"",
            "\"nat_address\":\"10.64.0.5\"",
            "\"received_at\":1700000000000",
            "\"id\":17",
        ] {
            assert!(json.contains(needle), "{needle} not in {json}");
        }
        assert_eq!(
            serde_json::to_string(&key(0)).unwrap(),
            "\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\""
        );
    }

    #[test]
    fn bad_keys_and_names_are_rejected_by_deserialization() {
        assert!(serde_json::from_str::<PublicKey>("\"AAAA\"").is_err());
        assert!(serde_json::from_str::<PublicKey>("\"not base64!\"").is_err());
        assert!(serde_json::from_str::<TerminalName>("\"\"").is_err());
        assert!(serde_json::from_str::<TerminalName>("\"-pc\"").is_err());
        assert!(serde_json::from_str::<TerminalName>("\"pc 1\"").is_err());
        assert!(serde_json::from_str::<TerminalName>(&format!("\"{}\"", "a".repeat(64))).is_err());
        assert!(serde_json::from_str::<TerminalName>("\"pc-1.lan_2\"").is_ok());
        let unknown =
            r#"{"token":"t","public_key":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","x":1}"#;
        assert!(serde_json::from_str::<EnrollRequest>(unknown).is_err());
    }

    #[test]
    fn request_validation_names_the_field() {
        let good = NewMaintenanceRequest {
            requester_name: "A".into(),
            level: Level::General,
            urgency: Urgency::Normal,
            phone: "0301234".into(),
            content: "x".into(),
            terminals: vec![name("pc-1")],
        };
        assert_eq!(good.validate(), Ok(()));
        let field = |r: NewMaintenanceRequest| r.validate().unwrap_err().field;
        assert_eq!(
            field(NewMaintenanceRequest {
                requester_name: " ".into(),
                ..good.clone()
            }),
            "requester_name"
        );
        assert_eq!(
            field(NewMaintenanceRequest {
                phone: "call me".into(),
                ..good.clone()
            }),
            "phone"
        );
        assert_eq!(
            field(NewMaintenanceRequest {
                content: "x".repeat(4001),
                ..good.clone()
            }),
            "content"
        );
        assert_eq!(
            field(NewMaintenanceRequest {
                terminals: vec![],
                ..good.clone()
            }),
            "terminals"
        );
        assert_eq!(
            field(NewMaintenanceRequest {
                terminals: vec![name("a"), name("a")],
                ..good.clone()
            }),
            "terminals"
        );
        let api: ApiError = good
            .clone()
            .validate()
            .and(
                NewMaintenanceRequest {
                    phone: "?".into(),
                    ..good
                }
                .validate(),
            )
            .unwrap_err()
            .into();
        assert_eq!(api.field.as_deref(), Some("phone"));
        assert_eq!(api.error, "invalid_field");
    }

    #[test]
    fn gateway_registration_validation() {
        let good = GatewayRegistration {
            endpoints: vec!["203.0.113.1:51820".parse().unwrap()],
            public_key: key(2),
            tunnel_kinds: vec![TunnelKind::Wireguard],
            max_tunnels: 2,
            software_version: "0.1.0".into(),
        };
        assert_eq!(good.validate(), Ok(()));
        let bad = GatewayRegistration {
            max_tunnels: 0,
            ..good.clone()
        };
        assert_eq!(bad.validate().unwrap_err().field, "max_tunnels");
        let bad = GatewayRegistration {
            endpoints: vec!["0.0.0.0:51820".parse().unwrap()],
            ..good
        };
        assert_eq!(bad.validate().unwrap_err().field, "endpoints");
    }

    #[test]
    fn login_debug_redacts_the_password() {
        let l = Login {
            name: "t".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{l:?}").contains("hunter2"));
    }
}
