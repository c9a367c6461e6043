//! Technicians: login, the audit log and the console's live feed.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::agent::{FailureView, MaintenanceRequestView};
use super::common::{GatewayId, SiteId, UnixMillis};

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
    /// `actor` in words (a site's or gateway's name), when it names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_label: Option<String>,
    /// `object` in words (a request's acceptance number and site, a
    /// site's or gateway's name), when it names one that still exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_label: Option<String>,
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
    /// The sites without an agent, whose requests technicians open on the
    /// customer's behalf (by id).
    #[serde(default)]
    pub agentless_sites: Vec<AgentlessSite>,
}

/// A site without an agent as the console lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct AgentlessSite {
    /// The site.
    pub site_id: SiteId,
    /// Its name.
    pub name: String,
    /// The gateway carrying it now, if one does.
    pub gateway_id: Option<GatewayId>,
}
