//! IPsec sites: the IKEv2 and ESP parameters the server hands out, and what
//! the operator gets for a router configured by hand.

use std::net::IpAddr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use super::common::{FieldError, GatewayId, SiteId, TunnelKind};
use crate::ipv4::Prefix;

/// The UDP port IKEv2 starts on (RFC 7296 §2); NAT traversal floats to
/// [`IKE_NAT_T_PORT`] (RFC 7296 §2.23). An IPsec site dials this port at the
/// address of its gateway's first endpoint.
pub const IKE_PORT: u16 = 500;

/// The UDP port of IKEv2 and ESP-in-UDP after NAT traversal (RFC 3948).
pub const IKE_NAT_T_PORT: u16 = 4500;

/// The IKE proposal, in strongSwan's notation: AES-GCM-16 with a 256-bit key
/// (RFC 5282), PRF HMAC-SHA-256, and Diffie-Hellman group 31 (x25519,
/// RFC 8031) preferred over group 14 (MODP-2048, RFC 3526).
pub const IKE_PROPOSAL: &str = "aes256gcm16-prfsha256-x25519-modp2048";

/// The ESP proposal: AES-GCM-16 with a 256-bit key (RFC 4106), and
/// perfect forward secrecy: every CHILD_SA rekey runs a new x25519 (or
/// MODP-2048) exchange (RFC 7296 §1.3.1). The groups do not apply to the
/// first CHILD_SA, which IKE_AUTH keys without one (§1.2). Both ends must
/// name them: a rekey with a new exchange fails against a peer configured
/// without one.
pub const ESP_PROPOSAL: &str = "aes256gcm16-x25519-modp2048";

/// The fewest bytes a pre-shared key has (RFC 7296 §2.15 asks for a key as
/// strong as the PRF's: 32 bytes for HMAC-SHA-256).
pub const MIN_PSK_BYTES: usize = 32;

/// The parameters of one IPsec site's tunnel, from the point of view of the
/// party that receives them: the agent (`local_*` is the site) or the
/// gateway (`local_*` is the center).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct IpsecParams {
    /// The pre-shared key (RFC 7296 §2.15): standard base64 of at least 32
    /// random bytes. The key is this text itself (its ASCII bytes), as a
    /// router's configuration takes a key, not the bytes it encodes.
    /// A secret: never logged.
    pub psk: String,
    /// The identity this side sends in IKE_AUTH (ID_FQDN, RFC 7296 §3.5).
    pub local_id: String,
    /// The identity the other side must send.
    pub remote_id: String,
    /// The IKE proposal, strongSwan notation (see [`IKE_PROPOSAL`]).
    pub ike_proposal: String,
    /// The ESP proposal, strongSwan notation (see [`ESP_PROPOSAL`]).
    pub esp_proposal: String,
    /// This side's traffic selectors (RFC 7296 §2.9): for the site, its NAT
    /// addresses (/32 each); for the gateway, the technician prefixes.
    pub local_ts: Vec<Prefix>,
    /// The other side's traffic selectors.
    pub remote_ts: Vec<Prefix>,
    /// Seconds after which the CHILD_SA is rekeyed, less up to a tenth at
    /// random; absent: one hour (strongSwan's default). 10 to 604 800.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child_rekey_s: Option<u32>,
    /// Seconds after which the IKE SA is rekeyed (RFC 7296 §2.8), less up to
    /// a tenth at random; absent: four hours (strongSwan's default).
    /// 10 to 604 800.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ike_rekey_s: Option<u32>,
}

impl std::fmt::Debug for IpsecParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpsecParams")
            .field("psk", &"<redacted>")
            .field("local_id", &self.local_id)
            .field("remote_id", &self.remote_id)
            .field("ike_proposal", &self.ike_proposal)
            .field("esp_proposal", &self.esp_proposal)
            .field("local_ts", &self.local_ts)
            .field("remote_ts", &self.remote_ts)
            .field("child_rekey_s", &self.child_rekey_s)
            .field("ike_rekey_s", &self.ike_rekey_s)
            .finish()
    }
}

impl IpsecParams {
    /// The parameters the server hands to `site`'s router (`local_*`: the
    /// site): its identities, the one suite, its NAT addresses (`nat`, one
    /// /32 each) against the technician prefixes (`center`), and the
    /// default rekey intervals.
    pub fn for_site(site: SiteId, psk: String, nat: Vec<Prefix>, center: Vec<Prefix>) -> Self {
        Self {
            psk,
            local_id: site_identity(site),
            remote_id: gateway_identity(site),
            ike_proposal: IKE_PROPOSAL.to_owned(),
            esp_proposal: ESP_PROPOSAL.to_owned(),
            local_ts: nat,
            remote_ts: center,
            child_rekey_s: None,
            ike_rekey_s: None,
        }
    }

    /// The same tunnel seen from the other end: identities and traffic
    /// selectors swapped (a gateway's view of a site's parameters).
    #[must_use]
    pub fn mirrored(self) -> Self {
        Self {
            local_id: self.remote_id,
            remote_id: self.local_id,
            local_ts: self.remote_ts,
            remote_ts: self.local_ts,
            ..self
        }
    }

    /// The most traffic selectors per side.
    pub const MAX_TS: usize = 1024;

    /// The range of the rekey intervals, in seconds: a CHILD_SA or IKE SA
    /// lives at least 10 s and at most a week.
    pub const REKEY_S: std::ops::RangeInclusive<u32> = 10..=604_800;

    /// # Errors
    /// A [`FieldError`] naming the first invalid field.
    pub fn validate(&self) -> Result<(), FieldError> {
        // The text is the key; decoding it only proves its strength.
        if !BASE64
            .decode(&self.psk)
            .is_ok_and(|b| b.len() >= MIN_PSK_BYTES)
        {
            return Err(FieldError::new(
                "psk",
                "must be standard base64 of at least 32 bytes",
            ));
        }
        check_fqdn("local_id", &self.local_id)?;
        check_fqdn("remote_id", &self.remote_id)?;
        if self.local_id == self.remote_id {
            return Err(FieldError::new(
                "remote_id",
                "must differ from local_id (RFC 7296 §2.15: reflected AUTH payloads)",
            ));
        }
        if self.ike_proposal.is_empty() || self.ike_proposal.len() > 200 {
            return Err(FieldError::new("ike_proposal", "1 to 200 characters"));
        }
        if self.esp_proposal.is_empty() || self.esp_proposal.len() > 200 {
            return Err(FieldError::new("esp_proposal", "1 to 200 characters"));
        }
        if self.local_ts.len() > Self::MAX_TS {
            return Err(FieldError::new("local_ts", "at most 1024 selectors"));
        }
        if self.remote_ts.len() > Self::MAX_TS {
            return Err(FieldError::new("remote_ts", "at most 1024 selectors"));
        }
        for (field, secs) in [
            ("child_rekey_s", self.child_rekey_s),
            ("ike_rekey_s", self.ike_rekey_s),
        ] {
            if secs.is_some_and(|s| !Self::REKEY_S.contains(&s)) {
                return Err(FieldError::new(field, "10 to 604800 seconds"));
            }
        }
        Ok(())
    }
}

/// An ID_FQDN: 1–253 characters of letters, digits, `.` and `-`.
fn check_fqdn(field: &'static str, id: &str) -> Result<(), FieldError> {
    let ok = !id.is_empty()
        && id.len() <= 253
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
        && !id.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            "an FQDN identity: 1-253 characters of A-Z a-z 0-9 . -",
        ))
    }
}

/// The identity an IPsec site presents (ID_FQDN).
pub fn site_identity(site: SiteId) -> String {
    format!("site-{site}.vpnnat")
}

/// The identity the gateways present to an IPsec site (ID_FQDN). It names
/// the site, not the gateway, so that a failover to another gateway changes
/// nothing the site checks.
pub fn gateway_identity(site: SiteId) -> String {
    format!("gw-{site}.vpnnat")
}

/// Operator: change a site's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct SiteTunnel {
    /// The tunnel kind: `wireguard` or `ipsec`.
    pub tunnel: TunnelKind,
}

/// Operator: what a router configured by hand needs to reach the center
/// over IPsec, from the router's point of view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct IpsecSiteConfig {
    /// The site.
    pub site_id: SiteId,
    /// Its name.
    pub name: String,
    /// The gateway that carries its tunnel now, if one does.
    pub gateway_id: Option<GatewayId>,
    /// Where to send IKE (UDP 500, NAT-T 4500): the carrying gateway first,
    /// then the other gateways that run IPsec (for a failover).
    pub gateway_addresses: Vec<IpAddr>,
    /// PSK, identities, proposals and traffic selectors (`local_*`: the site).
    pub ipsec: IpsecParams,
    /// A strongSwan `swanctl.conf` for the router with these parameters.
    pub swanctl_conf: String,
}
