//! Tunnels: which gateway carries a site, tunnel slots, and moving sites
//! off a gateway that is down (failover).

use vpnnat::messages::{GatewayId, Health, SiteId, TunnelKind};

use super::error::{OpError, OpResult};
use super::sites::site_kind;
use super::views::{enum_parse, enum_str};
use super::{Tx, col, id64, ids_of, u64_of};

pub(super) async fn site_gateway(tx: &mut Tx, site: SiteId) -> OpResult<Option<GatewayId>> {
    let r = sqlx::query("SELECT gateway_id FROM tunnels WHERE site_id = $1")
        .bind(id64(site.0))
        .fetch_optional(&mut *tx.inner)
        .await?;
    Ok(match r {
        Some(r) => Some(GatewayId(u64_of(col(&r, "gateway_id")?))),
        None => None,
    })
}

pub(super) async fn gateway_sites(tx: &mut Tx, gw: GatewayId) -> OpResult<Vec<SiteId>> {
    let rows = sqlx::query("SELECT site_id FROM tunnels WHERE gateway_id = $1 ORDER BY site_id")
        .bind(id64(gw.0))
        .fetch_all(&mut *tx.inner)
        .await?;
    Ok(ids_of(&rows, "site_id", SiteId)?)
}

/// Takes a tunnel slot on the best gateway: healthy, registered with the
/// site's tunnel kind, not draining, with a free slot, least loaded (by
/// share of capacity), then lowest id. The slot is claimed with a
/// conditional update, so two replicas cannot overbook a gateway.
async fn claim_slot(
    tx: &mut Tx,
    kind: TunnelKind,
    exclude: Option<GatewayId>,
) -> OpResult<GatewayId> {
    // `tunnel_kinds` is the registration's JSON list, e.g. `["wireguard"]`.
    let candidates = sqlx::query(
        "SELECT id FROM gateways WHERE health = 'healthy' AND drain = 0 AND disabled = 0 \
         AND public_key IS NOT NULL AND tunnels < max_tunnels AND id <> $1 \
         AND tunnel_kinds LIKE $2 \
         ORDER BY (tunnels * 1000000) / max_tunnels, tunnels, id LIMIT 8",
    )
    .bind(exclude.map_or(0, |g| id64(g.0)))
    .bind(format!("%\"{kind}\"%"))
    .fetch_all(&mut *tx.inner)
    .await?;
    for c in candidates {
        let id: i64 = col(&c, "id")?;
        let r = sqlx::query(
            "UPDATE gateways SET tunnels = tunnels + 1 WHERE id = $1 AND health = 'healthy' \
             AND drain = 0 AND disabled = 0 AND tunnels < max_tunnels",
        )
        .bind(id)
        .execute(&mut *tx.inner)
        .await?;
        if r.rows_affected() == 1 {
            return Ok(GatewayId(u64_of(id)));
        }
    }
    Err(OpError::NoCapacity(kind))
}

pub(super) async fn release_slot(tx: &mut Tx, gw: GatewayId) -> OpResult<()> {
    sqlx::query("UPDATE gateways SET tunnels = tunnels - 1 WHERE id = $1 AND tunnels > 0")
        .bind(id64(gw.0))
        .execute(&mut *tx.inner)
        .await?;
    Ok(())
}

/// The site's gateway, taking a slot when it has none (sticky otherwise).
/// A site whose gateway is down is moved first.
pub(super) async fn ensure_tunnel(
    tx: &mut Tx,
    site: SiteId,
    now: i64,
) -> OpResult<(GatewayId, bool)> {
    let current = sqlx::query(
        "SELECT t.gateway_id, g.health FROM tunnels t JOIN gateways g ON g.id = t.gateway_id \
         WHERE t.site_id = $1",
    )
    .bind(id64(site.0))
    .fetch_optional(&mut *tx.inner)
    .await?;
    if let Some(r) = current {
        let gw = GatewayId(u64_of(col(&r, "gateway_id")?));
        if col::<String>(&r, "health")? != "down" {
            return Ok((gw, false));
        }
        let to = move_site(tx, site, gw, now).await?;
        return Ok((to, false));
    }
    let kind = site_kind(tx, site).await?;
    let gw = claim_slot(tx, kind, None).await?;
    // ready_version -1: announced to the agent once the gateway has applied
    // the document that holds the peer (see `Tx::commit`, `gateway_applied`).
    sqlx::query(
        "INSERT INTO tunnels (site_id, gateway_id, created_at, ready_version) VALUES ($1, $2, $3, -1)",
    )
        .bind(id64(site.0))
        .bind(id64(gw.0))
        .bind(now)
        .execute(&mut *tx.inner)
        .await?;
    tx.changes.tunnels_placed.insert(gw);
    Ok((gw, true))
}

/// Moves a site's tunnel from `from` to another gateway with a free slot,
/// keeping its NAT addresses. Both gateways' and the agent's documents change.
///
/// # Errors
/// `NoCapacity` when no other gateway has a slot.
pub async fn move_site(
    tx: &mut Tx,
    site: SiteId,
    from: GatewayId,
    now: i64,
) -> OpResult<GatewayId> {
    let kind = site_kind(tx, site).await?;
    let to = claim_slot(tx, kind, Some(from)).await?;
    sqlx::query(
        "UPDATE tunnels SET gateway_id = $1, created_at = $2, ready_version = -1 WHERE site_id = $3",
    )
        .bind(id64(to.0))
        .bind(now)
        .bind(id64(site.0))
        .execute(&mut *tx.inner)
        .await?;
    tx.changes.tunnels_placed.insert(to);
    release_slot(tx, from).await?;
    sqlx::query("UPDATE sites SET problem = NULL WHERE id = $1")
        .bind(id64(site.0))
        .execute(&mut *tx.inner)
        .await?;
    tx.bump_site(site).await?;
    tx.bump_gateway(from).await?;
    tx.bump_gateway(to).await?;
    tx.audit(
        now,
        "system",
        "site.move",
        &format!("site:{site}"),
        &format!("gateway:{from} => gateway:{to}"),
    )
    .await?;
    Ok(to)
}

/// Sites whose tunnel is on a down gateway, each with whether it has been
/// told already that it is stranded, and its tunnel kind.
///
/// # Errors
/// Database failures.
pub async fn stranded_sites(tx: &mut Tx) -> OpResult<Vec<(SiteId, GatewayId, bool, TunnelKind)>> {
    let rows = sqlx::query(
        "SELECT t.site_id, t.gateway_id, s.tunnel, \
         CAST(CASE WHEN s.problem = $1 THEN 1 ELSE 0 END AS BIGINT) AS told \
         FROM tunnels t JOIN gateways g ON g.id = t.gateway_id JOIN sites s ON s.id = t.site_id \
         WHERE g.health = 'down' ORDER BY t.site_id LIMIT 1000",
    )
    .bind(STRANDED)
    .fetch_all(&mut *tx.inner)
    .await?;
    rows.iter()
        .map(|r| {
            Ok((
                SiteId(u64_of(col(r, "site_id")?)),
                GatewayId(u64_of(col(r, "gateway_id")?)),
                col::<i64>(r, "told")? != 0,
                enum_parse(&col::<String>(r, "tunnel")?)?,
            ))
        })
        .collect()
}

/// Moves one stranded site if it is still on `from` (another replica may have moved it).
///
/// # Errors
/// `NoCapacity`.
pub async fn failover_site(tx: &mut Tx, site: SiteId, from: GatewayId, now: i64) -> OpResult<bool> {
    tx.lock_site(site).await?;
    if site_gateway(tx, site).await? != Some(from) {
        return Ok(false);
    }
    let health = sqlx::query("SELECT health FROM gateways WHERE id = $1")
        .bind(id64(from.0))
        .fetch_one(&mut *tx.inner)
        .await?;
    if col::<String>(&health, "health")? != enum_str(&Health::Down) {
        return Ok(false);
    }
    move_site(tx, site, from, now).await?;
    Ok(true)
}

/// What a stranded site's page and the console are told.
pub const STRANDED: &str = "the gateway of this site is down and no other gateway has a free slot";

/// Records that `site`, whose tunnel is on the down gateway `from`, could
/// not be moved: its agent's document carries the problem (for the
/// customer's page), and the first time (not on every failover tick) the
/// console gets a failure report for it and the audit log a row.
///
/// # Errors
/// Database failures.
pub async fn strand_site(tx: &mut Tx, site: SiteId, from: GatewayId, now: i64) -> OpResult<bool> {
    tx.lock_site(site).await?;
    let r = sqlx::query(
        "UPDATE sites SET problem = $1 WHERE id = $2 AND (problem IS NULL OR problem <> $1)",
    )
    .bind(STRANDED)
    .bind(id64(site.0))
    .execute(&mut *tx.inner)
    .await?;
    if r.rows_affected() == 0 {
        return Ok(false);
    }
    tx.bump_site(site).await?;
    let detail = format!("{STRANDED} (gateway:{from})");
    sqlx::query(
        "INSERT INTO failures (site_id, code, detail, terminal, received_at) VALUES ($1, $2, $3, NULL, $4)",
    )
    .bind(id64(site.0))
    .bind(enum_str(&vpnnat::messages::FailureCode::TunnelDown))
    .bind(&detail)
    .bind(now)
    .execute(&mut *tx.inner)
    .await?;
    tx.audit(
        now,
        "system",
        "site.stranded",
        &format!("site:{site}"),
        &detail,
    )
    .await?;
    Ok(true)
}
