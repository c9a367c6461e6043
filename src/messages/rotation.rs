//! Planned rotation of a site's WireGuard key and credential, without
//! interrupting its tunnel (docs/OPERATIONS.md, "Rotating keys and
//! credentials"). The immediate, "compromised" path is the operator's
//! `sites/{id}/rotate`, which revokes at once; this one keeps the old key
//! or credential valid until the new one is in use.

use serde::{Deserialize, Serialize};

use super::common::{FieldError, PublicKey, SiteId, UnixMillis};

/// What the server asks of an agent about its key and credential, and where
/// a key rotation it started stands. Part of [`super::AgentDesiredState`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct AgentRotation {
    /// Make a new key pair and register it ([`super::paths::AGENT_KEY`]):
    /// the operator asked, or the key is older than the server's
    /// `[rotation] site_key_days`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rotate_key: bool,
    /// Ask for a new credential ([`super::paths::AGENT_CREDENTIAL`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rotate_credential: bool,
    /// The next public key the server holds for this site (published to
    /// its gateway next to the current one), if a key rotation is under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_key: Option<PublicKey>,
    /// Whether the site's gateway runs a document that accepts `next_key`
    /// (or the site has no tunnel): the agent may switch to it now.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub next_key_ready: bool,
}

impl AgentRotation {
    /// Whether there is nothing to say (the field is then left out).
    pub fn is_idle(&self) -> bool {
        *self == Self::default()
    }
}

/// An agent registers its next key (`POST` [`super::paths::AGENT_KEY`]) or
/// says it now uses it (`POST` [`super::paths::AGENT_KEY_COMMIT`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct SiteKey {
    /// The WireGuard public key.
    pub public_key: PublicKey,
}

/// The server's answer to a new site credential
/// (`POST` [`super::paths::AGENT_CREDENTIAL`]).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct NewSiteCredential {
    /// The new bearer credential. The agent stores it before it uses it.
    pub credential: String,
    /// Until when the credential this call was made with stays valid if the
    /// new one is not used first (its first use ends the old one at once).
    pub previous_valid_until: UnixMillis,
}

impl std::fmt::Debug for NewSiteCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSiteCredential")
            .field("previous_valid_until", &self.previous_valid_until)
            .finish_non_exhaustive()
    }
}

/// The operator asks a site's agent for a planned rotation
/// (`POST` [`super::paths::SITE_PLANNED_ROTATION`]). The server cannot
/// reach the agent: the request is a flag of its desired state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct PlannedRotation {
    /// Rotate the site's WireGuard key.
    #[serde(default)]
    pub key: bool,
    /// Rotate the site's credential.
    #[serde(default)]
    pub credential: bool,
}

impl PlannedRotation {
    /// # Errors
    /// When it asks for nothing.
    pub fn validate(&self) -> Result<(), FieldError> {
        if !self.key && !self.credential {
            return Err(FieldError::new(
                "key",
                "ask for the key, the credential or both",
            ));
        }
        Ok(())
    }
}

/// A site's next key in a gateway's desired state: the gateway accepts a
/// handshake from either key of the site and, at the first one from this
/// key, moves the site's tunnel to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct NextPeerKey {
    /// The site.
    pub site_id: SiteId,
    /// Its next WireGuard public key.
    pub public_key: PublicKey,
}
