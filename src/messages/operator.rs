//! The operator: sites, enrollment tokens, gateway identities, drain.

use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::common::{
    FieldError, GatewayId, PublicKey, SiteId, Transport, TunnelKind, UnixMillis, check_text,
};
use super::gateway::GatewayTls;

/// Operator: create a site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct NewSite {
    /// A unique, human-chosen name (1–100 characters).
    pub name: String,
    /// The tunnel kind (absent: `wireguard`). An `ipsec` site gets a
    /// pre-shared key and identities from the server.
    #[serde(default)]
    pub tunnel: TunnelKind,
    /// Whether a router agent runs at the site (absent: `true`). `false`:
    /// the router is a standard WireGuard device the server renders a
    /// configuration for; such a site has no enrollment token and no
    /// credential, and technicians open its requests.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub agent: bool,
    /// Only for a site without an agent: the router's own WireGuard public
    /// key. Absent: the server generates the router's key pair (the
    /// rendered configuration is then complete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<PublicKey>,
}

impl Default for NewSite {
    fn default() -> Self {
        Self {
            name: String::new(),
            tunnel: TunnelKind::default(),
            agent: true,
            public_key: None,
        }
    }
}

fn yes() -> bool {
    true
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's signature
fn is_true(b: &bool) -> bool {
    *b
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's signature
fn is_zero(t: &UnixMillis) -> bool {
    t.0 == 0
}

impl NewSite {
    /// # Errors
    /// A [`FieldError`] naming the first invalid field.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_text("name", &self.name, 100, true)?;
        if self.agent && self.public_key.is_some() {
            return Err(FieldError::new(
                "public_key",
                "only a site without an agent (\"agent\": false) takes a public key; an agent enrolls with its own",
            ));
        }
        if !self.agent && self.tunnel != TunnelKind::Wireguard {
            return Err(FieldError::new(
                "tunnel",
                "a site without an agent is a WireGuard site (a hand-configured IPsec router: docs/OPERATIONS.md)",
            ));
        }
        Ok(())
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
    /// Shown once; the server keeps only a hash. Absent (empty) for a site
    /// without an agent: nothing enrolls there.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub enrollment_token: String,
    /// After this the token is refused (absent with the token).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub token_expires_at: UnixMillis,
    /// `false` for a site without an agent.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub agent: bool,
    /// A site without an agent: its router's WireGuard public key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<PublicKey>,
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
    /// Its tunnel kind.
    #[serde(default)]
    pub tunnel: TunnelKind,
    /// How its tunnel travels, as its gateway last reported (`udp`, `tls`,
    /// `tls_proxy`); absent when not known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
    /// Whether a router agent runs there (`false`: a standard WireGuard
    /// router, see `GET /api/v1/sites/{id}/wireguard`).
    #[serde(default = "yes")]
    pub agent: bool,
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

/// Operator: disable (or enable again) a site, gateway or technician.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct SetDisabled {
    /// `true`: its credentials (sessions) are refused; `false`: enabled again.
    pub disabled: bool,
}

/// Operator: add a technician, or set the password of an existing one
/// (which ends its sessions).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct NewTechnician {
    /// The login name (1–100 characters).
    pub name: String,
    /// The password (8–1000 characters; never logged).
    pub password: String,
}

impl std::fmt::Debug for NewTechnician {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewTechnician")
            .field("name", &self.name)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl NewTechnician {
    /// # Errors
    /// A [`FieldError`] naming the first invalid field.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_text("name", &self.name, 100, true)?;
        let n = self.password.chars().count();
        if !(8..=1000).contains(&n) {
            return Err(FieldError::new(
                "password",
                "must have 8 to 1000 characters",
            ));
        }
        Ok(())
    }
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
    /// Its TLS fallback (endpoints and pin), once registered with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<GatewayTls>,
    /// During a rotation of its WireGuard key: the next key it announced
    /// (its sites' agents dial that one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<PublicKey>,
}
