//! Sites without a router agent: their router is a standard WireGuard
//! device. Created with the router's key (generated here unless the
//! operator gives the router's own public key), never enrolled; a
//! technician opens their requests, naming each terminal's LAN address,
//! from which the router's configuration is rendered
//! ([`crate::wgquick`]).

use std::net::{Ipv4Addr, SocketAddr};

use rand::RngCore as _;
use sqlx::AnyConnection;
use vpnnat::ipv4::Prefix;
use vpnnat::messages::{
    AgentlessSite, GatewayId, PublicKey, RouterMapping, SiteCreated, SiteId, TerminalName,
    TunnelKind, UnixMillis,
};
use vpnnat::tunnel::PrivateKey;

use super::error::{DbError, DbResult, OpError, OpResult, is_unique_violation};
use super::views::{addr_of, addr_to_i64, enum_str};
use super::{Tx, col, id64, u64_of};

/// Creates a site without an agent. `public_key`: the router's own key;
/// `None` generates the router's key pair and keeps the private key for
/// the rendered configuration. No enrollment token is made: nothing
/// enrolls at such a site.
///
/// # Errors
/// `Conflict` on a taken name or a public key another site uses.
pub async fn create_agentless_site(
    tx: &mut Tx,
    name: &str,
    public_key: Option<PublicKey>,
    actor: &str,
    now: i64,
) -> OpResult<SiteCreated> {
    tx.name_free("SELECT id FROM sites WHERE name = $1", name, "site")
        .await?;
    let (public, private) = match public_key {
        Some(k) => (k, None),
        None => {
            let mut bytes = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut bytes);
            let key = PrivateKey::from_bytes(bytes);
            (key.public_key(), Some(key.to_base64()))
        }
    };
    let key_b64 = public.to_base64();
    tx.site_key_free(&key_b64, None).await?;
    let row = sqlx::query(
        "INSERT INTO sites (name, created_at, tunnel, public_key, agentless, router_private_key) \
         VALUES ($1, $2, $3, $4, 1, $5) RETURNING id",
    )
    .bind(name)
    .bind(now)
    .bind(enum_str(&TunnelKind::Wireguard))
    .bind(&key_b64)
    .bind(private)
    .fetch_one(&mut *tx.inner)
    .await
    .map_err(OpError::from)
    .map_err(|e| {
        if is_unique_violation(&e) {
            OpError::name_taken("site", name)
        } else {
            e
        }
    })?;
    let site = SiteId(u64_of(col(&row, "id")?));
    let detail = if public_key.is_some() {
        format!("{name}: no agent, the router's own public key {key_b64}")
    } else {
        format!("{name}: no agent, router key pair generated (public {key_b64})")
    };
    tx.audit(now, actor, "site.create", &format!("site:{site}"), &detail)
        .await?;
    // The console lists the sites without an agent.
    tx.touch_console();
    Ok(SiteCreated {
        site_id: site,
        name: name.to_owned(),
        enrollment_token: String::new(),
        token_expires_at: UnixMillis(0),
        agent: false,
        public_key: Some(public),
    })
}

/// The sites without an agent, for the technicians' console.
///
/// # Errors
/// Database failures.
pub async fn console_sites(
    conn: &mut AnyConnection,
    scope: super::teams::TeamScope,
) -> DbResult<Vec<AgentlessSite>> {
    let sql = format!(
        "SELECT s.id, s.name, t.gateway_id FROM sites s LEFT JOIN tunnels t ON t.site_id = s.id \
         WHERE s.agentless <> 0 AND s.disabled = 0 AND {} ORDER BY s.name, s.id",
        super::teams::TeamScope::sites_sql("s", 1)
    );
    let rows = sqlx::query(&sql)
        .bind(scope.bind())
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(AgentlessSite {
                site_id: SiteId(u64_of(col(r, "id")?)),
                name: col(r, "name")?,
                gateway_id: col::<Option<i64>>(r, "gateway_id")?.map(|g| GatewayId(u64_of(g))),
            })
        })
        .collect()
}

/// Whether `site` has no agent (`NotFound` for an unknown site).
///
/// # Errors
/// Database failures.
pub async fn is_agentless(conn: &mut AnyConnection, site: SiteId) -> DbResult<bool> {
    let row = sqlx::query("SELECT agentless FROM sites WHERE id = $1")
        .bind(id64(site.0))
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(DbError::NotFound)?;
    Ok(col::<i64>(&row, "agentless")? != 0)
}

/// The refusal of an agent's action at a site without one (an enrollment
/// token, a credential rotation).
pub(super) fn no_agent() -> OpError {
    OpError::InvalidState(
        "this site has no agent (its router is a standard WireGuard device): it has no \
         enrollment token or credential"
            .into(),
    )
}

/// Checks who opens a request against the kind of site: an agent's
/// request (no LAN addresses) only at a site with an agent, a technician's
/// on the customer's behalf (with LAN addresses) only at one without. At
/// a site without an agent the terminals must also agree with its other
/// open requests: one LAN address per terminal name and the other way
/// round, since one NAT address leads to one host.
///
/// # Errors
/// `InvalidState` for the wrong kind of site; `Conflict` on a disagreement.
pub(super) async fn check_origin(
    tx: &mut Tx,
    site: SiteId,
    terminals: &[TerminalName],
    lan: &[Ipv4Addr],
) -> OpResult<()> {
    let row = sqlx::query("SELECT agentless, disabled FROM sites WHERE id = $1")
        .bind(id64(site.0))
        .fetch_optional(&mut *tx.inner)
        .await?
        .ok_or(OpError::NotFound("site"))?;
    let agentless = col::<i64>(&row, "agentless")? != 0;
    // An agent's credential is refused at a disabled site; a technician
    // needs the same refusal here.
    if agentless && col::<i64>(&row, "disabled")? != 0 {
        return Err(OpError::InvalidState(
            "the site is disabled; the operator must enable it first".into(),
        ));
    }
    match (agentless, lan.is_empty()) {
        (false, true) => return Ok(()),
        (false, false) => {
            return Err(OpError::InvalidState(
                "this site has an agent: its requests come from the agent, which keeps the \
                 terminals' LAN addresses itself"
                    .into(),
            ));
        }
        (true, true) => {
            return Err(OpError::InvalidState(
                "this site has no agent: a technician opens its requests on the customer's \
                 behalf (POST /api/v1/sites/{id}/requests)"
                    .into(),
            ));
        }
        (true, false) => {}
    }
    if lan.len() != terminals.len() {
        return Err(OpError::InvalidState(
            "one LAN address per terminal is needed".into(),
        ));
    }
    let rows = sqlx::query(
        "SELECT rt.terminal, rt.lan_address FROM request_terminals rt \
         JOIN requests r ON r.id = rt.request_id \
         WHERE r.site_id = $1 AND r.state IN ('waiting', 'in_progress') AND rt.lan_address IS NOT NULL",
    )
    .bind(id64(site.0))
    .fetch_all(&mut *tx.inner)
    .await?;
    for r in rows {
        let name: String = col(&r, "terminal")?;
        let addr = addr_of(col(&r, "lan_address")?);
        for (t, a) in terminals.iter().zip(lan) {
            if (t.as_str() == name) != (*a == addr) {
                return Err(OpError::Conflict {
                    field: "terminals",
                    message: format!(
                        "an open request of this site maps terminal {name} to {addr}; {t} = {a} \
                         disagrees (one terminal, one LAN address)"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// The stored form of a LAN address.
pub(super) fn lan_column(lan: &[Ipv4Addr], pos: usize) -> Option<i64> {
    lan.get(pos).copied().map(addr_to_i64)
}

/// A gateway a site's router may dial.
#[derive(Debug, Clone)]
pub struct RouterGateway {
    /// The gateway.
    pub id: GatewayId,
    /// Its name.
    pub name: String,
    /// Its first WireGuard endpoint.
    pub endpoint: SocketAddr,
    /// Its public key: during a rotation of its key, the next one (which
    /// it answers already; the current one ends with the rotation).
    pub public_key: PublicKey,
    /// Whether it rotates its key (`public_key` is the next key).
    pub rotating: bool,
    /// The technician prefixes it registered (the router's `AllowedIPs`).
    pub technician_prefixes: Vec<Prefix>,
}

/// What the configuration of a site without an agent is rendered from.
#[derive(Debug, Clone)]
pub struct RouterSite {
    /// The site.
    pub site: SiteId,
    /// Its name.
    pub name: String,
    /// The router's public key.
    pub public_key: PublicKey,
    /// The router's private key, when the server generated it.
    pub private_key: Option<String>,
    /// The gateway carrying it now.
    pub gateway: Option<GatewayId>,
    /// Every registered, enabled gateway that runs WireGuard.
    pub gateways: Vec<RouterGateway>,
    /// The open requests' terminals.
    pub mappings: Vec<RouterMapping>,
}

/// The state of site `site` the router's configuration is rendered from;
/// `Ok(None)` for a site with an agent.
///
/// # Errors
/// `NotFound`; database failures.
pub async fn router_site(conn: &mut AnyConnection, site: SiteId) -> DbResult<Option<RouterSite>> {
    let row = sqlx::query(
        "SELECT name, agentless, public_key, router_private_key FROM sites WHERE id = $1",
    )
    .bind(id64(site.0))
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(DbError::NotFound)?;
    if col::<i64>(&row, "agentless")? == 0 {
        return Ok(None);
    }
    let Some(public_key) =
        col::<Option<String>>(&row, "public_key")?.and_then(|k| k.parse::<PublicKey>().ok())
    else {
        return Ok(None);
    };
    let gateway: Option<GatewayId> =
        sqlx::query("SELECT gateway_id FROM tunnels WHERE site_id = $1")
            .bind(id64(site.0))
            .fetch_optional(&mut *conn)
            .await?
            .map(|r| col::<i64>(&r, "gateway_id"))
            .transpose()?
            .map(|g| GatewayId(u64_of(g)));
    let rows = sqlx::query(
        // A router without an agent cannot follow a rotation of the
        // gateway's key by itself: its file names the next key as soon as
        // there is one, and the operator applies it again meanwhile.
        "SELECT id, name, endpoints, COALESCE(next_public_key, public_key) AS public_key, \
         next_public_key, technician_prefixes FROM gateways \
         WHERE tunnel_kinds LIKE $1 AND disabled = 0 AND public_key IS NOT NULL ORDER BY id",
    )
    .bind(format!("%\"{}\"%", TunnelKind::Wireguard))
    .fetch_all(&mut *conn)
    .await?;
    let mut gateways = Vec::with_capacity(rows.len());
    for r in rows {
        let endpoints: Vec<SocketAddr> =
            serde_json::from_str(&col::<String>(&r, "endpoints")?).unwrap_or_default();
        let key = col::<Option<String>>(&r, "public_key")?.and_then(|k| k.parse().ok());
        let prefixes: Vec<Prefix> =
            serde_json::from_str(&col::<String>(&r, "technician_prefixes")?).unwrap_or_default();
        // A gateway without technician prefixes would give the router a
        // tunnel that carries nothing.
        if let (Some(endpoint), Some(public_key), false) =
            (endpoints.first(), key, prefixes.is_empty())
        {
            gateways.push(RouterGateway {
                id: GatewayId(u64_of(col(&r, "id")?)),
                name: col(&r, "name")?,
                endpoint: *endpoint,
                public_key,
                rotating: col::<Option<String>>(&r, "next_public_key")?.is_some(),
                technician_prefixes: prefixes,
            });
        }
    }
    let rows = sqlx::query(
        "SELECT DISTINCT rt.terminal, rt.nat_address, rt.lan_address FROM request_terminals rt \
         JOIN requests r ON r.id = rt.request_id \
         WHERE r.site_id = $1 AND r.state IN ('waiting', 'in_progress') \
         AND rt.nat_address IS NOT NULL AND rt.lan_address IS NOT NULL \
         ORDER BY rt.nat_address",
    )
    .bind(id64(site.0))
    .fetch_all(&mut *conn)
    .await?;
    let mut mappings: Vec<RouterMapping> = Vec::with_capacity(rows.len());
    for r in rows {
        let Ok(terminal) = TerminalName::new(col::<String>(&r, "terminal")?) else {
            continue;
        };
        let m = RouterMapping {
            terminal,
            nat_address: addr_of(col(&r, "nat_address")?),
            lan_address: addr_of(col(&r, "lan_address")?),
        };
        if !mappings.contains(&m) {
            mappings.push(m);
        }
    }
    Ok(Some(RouterSite {
        site,
        name: col(&row, "name")?,
        public_key,
        private_key: col(&row, "router_private_key")?,
        gateway,
        gateways,
        mappings,
    }))
}

/// The rendered configuration of site `site`'s router, recorded in the
/// audit log (it may hold the router's private key).
///
/// # Errors
/// `NotFound` for an unknown site; `InvalidState` for a site with an agent.
pub async fn read_wireguard_config(
    tx: &mut Tx,
    site: SiteId,
    actor: &str,
    now: i64,
) -> OpResult<vpnnat::messages::WireguardSiteConfig> {
    let data = router_site(&mut tx.inner, site)
        .await
        .map_err(|e| match e {
            DbError::NotFound => OpError::NotFound("site"),
            e => OpError::Db(e),
        })?
        .ok_or_else(|| {
            OpError::InvalidState(
                "this site has an agent, which configures its router itself; only a site \
                 without an agent has a rendered WireGuard configuration"
                    .into(),
            )
        })?;
    tx.audit(
        now,
        actor,
        "site.wireguard_config",
        &format!("site:{site}"),
        "router configuration read",
    )
    .await?;
    Ok(crate::wgquick::render(&data))
}
