//! The router agent: its desired state, maintenance requests and failure reports.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::IpsecParams;
use super::common::{
    FieldError, GatewayId, PublicKey, RequestId, SiteId, TerminalName, Transport, TunnelKind,
    UnixMillis, check_text,
};

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
    /// For an IPsec tunnel (`kind` `ipsec`): PSK, identities, proposals and
    /// traffic selectors (`local_*`: the site). `endpoint` is then the
    /// gateway's IKE port ([`super::IKE_PORT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipsec: Option<IpsecParams>,
    /// The gateway's TLS fallback, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<AgentTls>,
}

/// Where and how the agent reaches its gateway over TLS when UDP is blocked.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct AgentTls {
    /// The gateway's TLS endpoint (TCP).
    pub endpoint: SocketAddr,
    /// SHA-256 of the gateway certificate's SubjectPublicKeyInfo (DER),
    /// lowercase hex: the only key the agent accepts.
    pub spki_sha256: String,
    /// This site's bearer token for the gateway's TLS port.
    pub token: String,
}

impl std::fmt::Debug for AgentTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentTls")
            .field("endpoint", &self.endpoint)
            .field("spki_sha256", &self.spki_sha256)
            .finish_non_exhaustive()
    }
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
    /// A planned key or credential rotation (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<super::AgentRotation>,
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
    /// The site's tunnel kind.
    #[serde(default)]
    pub tunnel: TunnelKind,
    /// How the site's tunnel travels while the request is open (`udp`,
    /// `tls`, `tls_proxy`), as its gateway last reported; absent when not
    /// known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
    /// The technician who started the work (their name as the console
    /// shows it); absent until started, and from servers that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub technician: Option<String>,
    /// When the server announced that the request nears its expiry
    /// (`[notifications] expiry_warning_s`); absent until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry_warned_at: Option<UnixMillis>,
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
    /// When a technician acknowledged it (absent: not yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged_at: Option<UnixMillis>,
    /// Who acknowledged it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged_by: Option<String>,
}
