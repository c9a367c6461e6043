//! Validation of a gateway's desired state: what of a document this gateway
//! will actually run.

use std::collections::{BTreeMap, BTreeSet};

use super::Prefix;
use crate::messages::{
    AllowedSources, GatewayDesiredState, GatewayPeer, PublicKey, SiteId, TunnelKind,
};

/// The most source prefixes one NAT address may be restricted to (each
/// packet toward it is checked against all of them).
pub const MAX_ALLOWED_SOURCES: usize = 64;

/// A validated desired state: what a gateway will actually run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedState {
    /// The document's version.
    pub version: u64,
    /// The peers that passed, by site id, with the addresses that passed.
    pub peers: Vec<GatewayPeer>,
    /// The next keys of sites rotating theirs (WireGuard peers that passed).
    pub next_keys: BTreeMap<SiteId, PublicKey>,
    /// The source restrictions that passed: each for an address of a peer
    /// that passed, at most one per address.
    pub allowed_sources: Vec<AllowedSources>,
    /// One line per refused peer or address.
    pub errors: Vec<String>,
}

/// The source restrictions of `desired` for addresses in `held` (those of
/// the peers that passed). A restriction for an address no peer holds, a
/// second one for the same address, or one with too many prefixes is
/// refused; an address whose restriction was refused stays unreachable
/// (empty list) rather than open to every technician, since the server
/// meant to restrict it.
fn validate_sources(
    desired: &GatewayDesiredState,
    held: &BTreeSet<std::net::Ipv4Addr>,
    errors: &mut Vec<String>,
) -> Vec<AllowedSources> {
    let mut seen = BTreeSet::new();
    let mut out: Vec<AllowedSources> = Vec::new();
    for a in &desired.allowed_sources {
        let nat = a.nat_address;
        if !held.contains(&nat) {
            errors.push(format!("allowed sources of {nat}: no peer holds it"));
            continue;
        }
        if !seen.insert(nat) {
            errors.push(format!("allowed sources of {nat}: listed twice"));
            out.retain(|o| o.nat_address != nat);
            out.push(AllowedSources {
                nat_address: nat,
                sources: Vec::new(),
            });
            continue;
        }
        if a.sources.len() > MAX_ALLOWED_SOURCES {
            errors.push(format!(
                "allowed sources of {nat}: more than {MAX_ALLOWED_SOURCES} prefixes"
            ));
            out.push(AllowedSources {
                nat_address: nat,
                sources: Vec::new(),
            });
            continue;
        }
        let mut sources = a.sources.clone();
        sources.sort();
        sources.dedup();
        out.push(AllowedSources {
            nat_address: nat,
            sources,
        });
    }
    out.sort_by_key(|a| a.nat_address);
    out
}

/// Checks a desired state against this gateway: refuses a peer of a tunnel
/// kind outside `kinds` (those it runs), whose key is
/// the gateway's own or another peer's, peers beyond `max_tunnels`, and NAT
/// addresses that are outside the pool, not unicast, or held by another peer.
/// Deterministic (all shards reach the same result).
pub fn validate_desired(
    desired: &GatewayDesiredState,
    own_key: &PublicKey,
    pool: Option<Prefix>,
    max_tunnels: u32,
    kinds: &[TunnelKind],
) -> ValidatedState {
    let mut errors = Vec::new();
    let mut sorted: Vec<&GatewayPeer> = desired.peers.iter().collect();
    sorted.sort_by_key(|p| p.site_id);
    let mut sites = BTreeSet::new();
    let mut keys = BTreeSet::new();
    let mut identities = BTreeSet::new();
    let mut addresses = BTreeSet::new();
    let mut peers = Vec::new();
    for p in sorted {
        let site = p.site_id;
        if !sites.insert(site) {
            errors.push(format!("site {site}: listed twice"));
            continue;
        }
        if !kinds.contains(&p.tunnel) {
            errors.push(format!(
                "site {site}: this gateway cannot run {} tunnels",
                p.tunnel.label()
            ));
            continue;
        }
        if p.tunnel == TunnelKind::Ipsec {
            let Some(ipsec) = &p.ipsec else {
                errors.push(format!(
                    "site {site}: an IPsec site without IPsec parameters"
                ));
                continue;
            };
            if let Err(e) = ipsec.validate() {
                errors.push(format!("site {site}: IPsec parameters: {e}"));
                continue;
            }
            if !identities.insert(ipsec.remote_id.clone()) {
                errors.push(format!(
                    "site {site}: identity {} already belongs to another site",
                    ipsec.remote_id
                ));
                continue;
            }
        }
        if p.public_key == *own_key {
            errors.push(format!("site {site}: public key is the gateway's own"));
            continue;
        }
        if !keys.insert(p.public_key) {
            errors.push(format!(
                "site {site}: public key {} already belongs to another site",
                p.public_key
            ));
            continue;
        }
        if peers.len() >= max_tunnels as usize {
            errors.push(format!(
                "site {site}: over capacity (max_tunnels = {max_tunnels})"
            ));
            continue;
        }
        let mut nat = BTreeSet::new();
        for a in &p.nat_addresses {
            if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() {
                errors.push(format!("site {site}: {a} is not a unicast address"));
            } else if pool.is_some_and(|pool| !pool.contains(*a)) {
                errors.push(format!(
                    "site {site}: {a} is outside the pool {}",
                    pool.map(|p| p.to_string()).unwrap_or_default()
                ));
            } else if nat.contains(a) {
                // A repeated address within one peer is harmless.
            } else if !addresses.insert(*a) {
                errors.push(format!("site {site}: {a} is held by another site"));
            } else {
                nat.insert(*a);
            }
        }
        peers.push(GatewayPeer {
            site_id: site,
            public_key: p.public_key,
            nat_addresses: nat.into_iter().collect(),
            tunnel: p.tunnel,
            ipsec: p.ipsec.clone(),
            tls_token_sha256: p.tls_token_sha256.clone(),
        });
    }
    let mut next_keys = BTreeMap::new();
    for n in &desired.next_keys {
        let site = n.site_id;
        let wireguard = peers
            .iter()
            .any(|p| p.site_id == site && p.tunnel == TunnelKind::Wireguard);
        if !wireguard {
            errors.push(format!(
                "site {site}: a next key for a site that is no WireGuard peer here"
            ));
        } else if n.public_key == *own_key {
            errors.push(format!("site {site}: next key is the gateway's own"));
        } else if !keys.insert(n.public_key) {
            errors.push(format!(
                "site {site}: next key {} already belongs to a site",
                n.public_key
            ));
        } else if next_keys.insert(site, n.public_key).is_some() {
            errors.push(format!("site {site}: two next keys"));
        }
    }
    let allowed_sources = validate_sources(desired, &addresses, &mut errors);
    ValidatedState {
        version: desired.version,
        peers,
        next_keys,
        allowed_sources,
        errors,
    }
}
