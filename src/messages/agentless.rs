//! Sites whose router is a standard WireGuard device (no router agent):
//! requests a technician opens on the customer's behalf, and the router's
//! configuration the server renders (wg-quick files and nftables rules).

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::agent::{Level, NewMaintenanceRequest, Urgency};
use super::common::{FieldError, GatewayId, PublicKey, SiteId, TerminalName};

/// A terminal of a site without an agent, with its real LAN address: there
/// is no agent to keep it, so the server must know it to render the
/// router's 1:1 NAT rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct TerminalAddress {
    /// The terminal's name.
    pub name: TerminalName,
    /// Its address on the customer's LAN.
    pub lan_address: Ipv4Addr,
}

/// Technician: open a request for a site without an agent, on the
/// customer's behalf (the customer phoned in).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct NewSiteRequest {
    /// Who asks (1–100 characters).
    pub requester_name: String,
    /// Their authority.
    pub level: Level,
    /// How urgent.
    pub urgency: Urgency,
    /// A phone number to call back (up to 40 characters of digits, spaces, + - ( )).
    #[serde(default)]
    pub phone: String,
    /// What is wrong (up to 4000 characters).
    #[serde(default)]
    pub content: String,
    /// The terminals to service (1–64, distinct names and addresses).
    pub terminals: Vec<TerminalAddress>,
}

impl NewSiteRequest {
    /// The request as an agent would have made it (terminal names only).
    pub fn request(&self) -> NewMaintenanceRequest {
        NewMaintenanceRequest {
            requester_name: self.requester_name.clone(),
            level: self.level,
            urgency: self.urgency,
            phone: self.phone.clone(),
            content: self.content.clone(),
            terminals: self.terminals.iter().map(|t| t.name.clone()).collect(),
        }
    }

    /// The LAN addresses, in the order of `terminals`.
    pub fn lan_addresses(&self) -> Vec<Ipv4Addr> {
        self.terminals.iter().map(|t| t.lan_address).collect()
    }

    /// # Errors
    /// A [`FieldError`] naming the first invalid field.
    pub fn validate(&self) -> Result<(), FieldError> {
        self.request().validate()?;
        let mut seen = std::collections::BTreeSet::new();
        for t in &self.terminals {
            if !is_host_address(t.lan_address) {
                return Err(FieldError::new(
                    "terminals",
                    format!(
                        "{}: {} is not a LAN host's address (unicast, not 0.0.0.0/8, loopback, link-local, multicast or broadcast)",
                        t.name, t.lan_address
                    ),
                ));
            }
            if !seen.insert(t.lan_address) {
                return Err(FieldError::new(
                    "terminals",
                    format!("{} is given for two terminals", t.lan_address),
                ));
            }
        }
        Ok(())
    }
}

/// Whether `a` can be a LAN host a router forwards to.
fn is_host_address(a: Ipv4Addr) -> bool {
    !(a.octets()[0] == 0
        || a.is_loopback()
        || a.is_link_local()
        || a.is_multicast()
        || a.is_broadcast()
        || a.octets()[0] >= 240)
}

/// One file of a router's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct RouterFile {
    /// The file name to save it under (`vpnnat-g1.conf`, `vpnnat-nat.nft`).
    pub name: String,
    /// For a wg-quick file: the gateway its tunnel leads to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_id: Option<GatewayId>,
    /// The file's text, to be written verbatim.
    pub content: String,
    /// For a wg-quick file: the same text as a QR code (an SVG image), for
    /// a WireGuard app that imports by camera.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qr_svg: Option<String>,
}

/// A NAT address of the site and the LAN host it leads to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct RouterMapping {
    /// The terminal.
    pub terminal: TerminalName,
    /// Its NAT address (what the technician connects to).
    pub nat_address: Ipv4Addr,
    /// Its LAN address (where the router forwards it).
    pub lan_address: Ipv4Addr,
}

/// Operator / technician: the configuration of a site's standard WireGuard
/// router (a site without an agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct WireguardSiteConfig {
    /// The site.
    pub site_id: SiteId,
    /// Its name.
    pub name: String,
    /// The router's WireGuard public key.
    pub public_key: PublicKey,
    /// Whether the wg-quick files hold the router's private key (the
    /// server generated the pair); otherwise their `PrivateKey` line is a
    /// placeholder for the key the router keeps itself.
    pub private_key_included: bool,
    /// The gateway that carries the site now, if one does.
    pub gateway_id: Option<GatewayId>,
    /// The terminals of the open requests: what the NAT rules map.
    pub mappings: Vec<RouterMapping>,
    /// One wg-quick file per gateway that runs WireGuard, then the
    /// nftables file.
    pub files: Vec<RouterFile>,
    /// How to apply them (and when to apply them again).
    pub instructions: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn request(terminals: &[(&str, &str)]) -> NewSiteRequest {
        NewSiteRequest {
            requester_name: "Anna".into(),
            level: Level::General,
            urgency: Urgency::High,
            phone: String::new(),
            content: String::new(),
            terminals: terminals
                .iter()
                .map(|(n, a)| TerminalAddress {
                    name: TerminalName::new(*n).unwrap(),
                    lan_address: a.parse().unwrap(),
                })
                .collect(),
        }
    }

    #[test]
    fn agentless_request_validation() {
        let ok = request(&[("till", "192.168.1.10"), ("nas", "10.0.0.2")]);
        ok.validate().unwrap();
        assert_eq!(ok.request().terminals.len(), 2);
        assert_eq!(ok.lan_addresses()[1].to_string(), "10.0.0.2");
        for bad in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "169.254.1.1",
            "224.0.0.5",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            let e = request(&[("till", bad)]).validate().unwrap_err();
            assert_eq!(e.field, "terminals", "{bad}");
        }
        let e = request(&[("till", "192.168.1.10"), ("nas", "192.168.1.10")])
            .validate()
            .unwrap_err();
        assert!(e.message.contains("two terminals"), "{e}");
        let e = request(&[("till", "192.168.1.10"), ("till", "192.168.1.11")])
            .validate()
            .unwrap_err();
        assert_eq!(e.field, "terminals");
        assert_eq!(request(&[]).validate().unwrap_err().field, "terminals");
        let mut r = request(&[("till", "192.168.1.10")]);
        r.requester_name = String::new();
        assert_eq!(r.validate().unwrap_err().field, "requester_name");
        // Unknown fields are refused, not ignored.
        assert!(
            serde_json::from_str::<NewSiteRequest>(
                r#"{"requester_name":"a","level":"general","urgency":"high","terminals":[],"x":1}"#
            )
            .is_err()
        );
    }

    #[test]
    fn agentless_new_site_defaults_and_validation() {
        use super::super::operator::NewSite;
        let s: NewSite = serde_json::from_str(r#"{"name":"a"}"#).unwrap();
        assert!(s.agent && s.public_key.is_none());
        s.validate().unwrap();
        let s: NewSite = serde_json::from_str(r#"{"name":"a","agent":false}"#).unwrap();
        s.validate().unwrap();
        // A plain site serializes as before (no new fields).
        assert_eq!(
            serde_json::to_string(&NewSite {
                name: "a".into(),
                ..Default::default()
            })
            .unwrap(),
            r#"{"name":"a","tunnel":"wireguard"}"#
        );
    }
}
