//! Enrollment: an agent redeems its one-time token.

use serde::{Deserialize, Serialize};

use super::common::{PublicKey, SiteId};

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
