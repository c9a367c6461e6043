//! Teams of technicians (docs/OPERATIONS.md "Teams"): a site assigned to a
//! team is seen and acted on only by that team's technicians, and the
//! gateways let only the team's (or the starting technician's) source
//! addresses reach its NAT addresses ([`super::AllowedSources`]).

use serde::{Deserialize, Serialize};

use super::common::{FieldError, SiteId, UnixMillis, check_text};
use crate::ipv4::Prefix;

/// The most source prefixes a team or a technician may have.
pub const MAX_TEAM_SOURCES: usize = 64;

fn check_sources(field: &'static str, sources: &[Prefix]) -> Result<(), FieldError> {
    if sources.len() > MAX_TEAM_SOURCES {
        return Err(FieldError::new(
            field,
            format!("at most {MAX_TEAM_SOURCES} prefixes"),
        ));
    }
    Ok(())
}

/// Operator: a new team.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct NewTeam {
    /// A unique name (1–100 characters).
    pub name: String,
    /// The team's technician subnets (`a.b.c.d/len`, at most 64): the only
    /// sources the gateways let reach the NAT addresses of the team's sites.
    /// They must lie inside the gateways' technician prefixes. Empty: no
    /// source reaches them until a technician with own sources starts a
    /// request.
    pub source_prefixes: Vec<Prefix>,
}

impl NewTeam {
    /// # Errors
    /// A [`FieldError`] naming the first invalid field.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_text("name", &self.name, 100, true)?;
        check_sources("source_prefixes", &self.source_prefixes)
    }
}

/// A team, as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct TeamView {
    /// Its id.
    pub id: u64,
    /// Its name.
    pub name: String,
    /// Its technician subnets.
    pub source_prefixes: Vec<Prefix>,
    /// The sites assigned to it.
    pub sites: Vec<SiteId>,
    /// Its technicians (login names).
    pub technicians: Vec<String>,
    /// When it was created.
    pub created_at: UnixMillis,
}

/// Operator: the team of a site (`null`: none, seen by every technician).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct SiteTeam {
    /// The team's id, or `null`.
    pub team: Option<u64>,
}

/// Operator: the team of a technician and its own source addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct TechnicianTeam {
    /// The team's id, or `null`: none (the technician then sees only the
    /// sites without a team).
    pub team: Option<u64>,
    /// The technician's own source prefixes (at most 64): once it starts a
    /// request of a team's site, only these reach its NAT addresses.
    /// Absent or `null`: the team's prefixes.
    #[serde(default)]
    pub sources: Option<Vec<Prefix>>,
}

impl TechnicianTeam {
    /// # Errors
    /// A [`FieldError`] naming the first invalid field.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_sources("sources", self.sources.as_deref().unwrap_or_default())
    }
}
