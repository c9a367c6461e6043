//! Gateways: identities, registration, heartbeats, what they applied, drain,
//! and marking silent ones down.

use vpnnat::messages::{
    GatewayCreated, GatewayHeartbeat, GatewayId, GatewayKeyRotationStatus, GatewayRegistered,
    GatewayRegistration, HeartbeatAck, PublicKey, SiteId,
};

use super::error::{OpError, OpResult};
use super::policy::Policy;
use super::tunnels::{STRANDED, gateway_sites};
use super::views::enum_str;
use super::{Tx, col, id64, ids_of, u64_of};
use crate::secrets::{Secret, SecretKind};

/// Creates a gateway identity.
///
/// # Errors
/// `Conflict` on a taken name.
pub async fn create_gateway(
    tx: &mut Tx,
    name: &str,
    actor: &str,
    now: i64,
) -> OpResult<GatewayCreated> {
    tx.name_free("SELECT id FROM gateways WHERE name = $1", name, "gateway")
        .await?;
    let credential = Secret::generate(SecretKind::Gateway);
    let row = sqlx::query(
        "INSERT INTO gateways (name, credential_hash, created_at) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(name)
    .bind(credential.hash())
    .bind(now)
    .fetch_one(&mut *tx.inner)
    .await?;
    let gw = GatewayId(u64_of(col(&row, "id")?));
    tx.audit(now, actor, "gateway.create", &format!("gateway:{gw}"), name)
        .await?;
    Ok(GatewayCreated {
        gateway_id: gw,
        name: name.to_owned(),
        credential: credential.expose().to_owned(),
    })
}

/// A gateway (re-)announces itself. A changed key or endpoint reaches its
/// sites' agents through their desired state.
///
/// # Errors
/// `NotFound` for a deleted gateway.
pub async fn register_gateway(
    tx: &mut Tx,
    gw: GatewayId,
    reg: &GatewayRegistration,
    now: i64,
    policy: &Policy,
) -> OpResult<GatewayRegistered> {
    let row = tx
        .row_by_id(
            "SELECT endpoints, public_key, next_public_key, health, technician_prefixes, tls \
             FROM gateways WHERE id = $1",
            gw.0,
            "gateway",
        )
        .await?;
    let old_endpoints: String = col(&row, "endpoints")?;
    let old_key: Option<String> = col(&row, "public_key")?;
    let old_next: Option<String> = col(&row, "next_public_key")?;
    // A registration always names the key: one equal to the stored next
    // key ends a rotation (a gateway that restarted after promoting it).
    let keys = KeyChange::of(
        old_key.as_deref(),
        old_next.as_deref(),
        Some(reg.public_key),
        reg.next_public_key,
    );
    let old_tls: Option<String> = col(&row, "tls")?;
    let tls = reg.tls.as_ref().and_then(|t| serde_json::to_string(t).ok());
    let endpoints = serde_json::to_string(&reg.endpoints).unwrap_or_else(|_| "[]".into());
    let kinds = serde_json::to_string(&reg.tunnel_kinds).unwrap_or_else(|_| "[]".into());
    let prefixes = serde_json::to_string(&reg.technician_prefixes).unwrap_or_else(|_| "[]".into());
    let old_prefixes: String = col(&row, "technician_prefixes")?;
    let key = reg.public_key.to_base64();
    // Sites first, then the gateway row: the lock order of every other transaction.
    // The technician prefixes are the traffic selectors of its IPsec sites.
    let new_prefixes = old_prefixes != prefixes;
    if new_prefixes
        || old_endpoints != endpoints
        || old_key.as_deref() != Some(key.as_str())
        || old_tls != tls
        || !keys.is_none()
    {
        for site in gateway_sites(tx, gw).await? {
            tx.bump_site(site).await?;
        }
    }
    // A gateway that restarts registers before its first heartbeat. Its
    // site rows are locked (ascending) above when they were bumped; these
    // are some of them.
    if col::<String>(&row, "health")? == "down" {
        clear_stranded(tx, gw).await?;
    }
    let sql = format!(
        "UPDATE gateways SET endpoints = $1, public_key = $2, tunnel_kinds = $3, max_tunnels = $4, \
         software_version = $5, technician_prefixes = $6, health = 'healthy', last_heartbeat = {}, \
         tls = $8 WHERE id = $7",
        tx.kind.now_ms_sql()
    );
    sqlx::query(&sql)
        .bind(&endpoints)
        .bind(&key)
        .bind(&kinds)
        .bind(i64::from(reg.max_tunnels))
        .bind(&reg.software_version)
        .bind(&prefixes)
        .bind(id64(gw.0))
        .bind(&tls)
        .execute(&mut *tx.inner)
        .await?;
    record_keys(tx, gw, &keys, old_key.is_some(), now).await?;
    if new_prefixes && keys.is_none() {
        tx.bump_gateway(gw).await?;
    }
    tx.audit(
        now,
        &format!("gateway:{gw}"),
        "gateway.register",
        &format!("gateway:{gw}"),
        &format!("endpoints {endpoints} max_tunnels {}", reg.max_tunnels),
    )
    .await?;
    Ok(GatewayRegistered {
        gateway_id: gw,
        heartbeat_interval_ms: policy.heartbeat_interval_ms,
    })
}

/// A heartbeat: capacity, load, health. A gateway that was marked down is back.
///
/// # Errors
/// `NotRegistered` before the first registration.
pub async fn heartbeat(
    tx: &mut Tx,
    gw: GatewayId,
    hb: &GatewayHeartbeat,
    now: i64,
) -> OpResult<HeartbeatAck> {
    let row = tx
        .row_by_id(
            "SELECT public_key, next_public_key, health FROM gateways WHERE id = $1",
            gw.0,
            "gateway",
        )
        .await?;
    let Some(old_key) = col::<Option<String>>(&row, "public_key")? else {
        return Err(OpError::NotRegistered);
    };
    let old_next: Option<String> = col(&row, "next_public_key")?;
    // An older gateway names no key: nothing about keys changes.
    let keys = match hb.public_key {
        Some(k) => KeyChange::of(
            Some(&old_key),
            old_next.as_deref(),
            Some(k),
            hb.next_public_key,
        ),
        None => KeyChange::default(),
    };
    let old: String = col(&row, "health")?;
    let health = enum_str(&hb.health);
    // Sites first (ascending), then the gateway row.
    if !keys.is_none() {
        for site in gateway_sites(tx, gw).await? {
            tx.bump_site(site).await?;
        }
    }
    if old == "down" && health != "down" {
        clear_stranded(tx, gw).await?;
    }
    // Before the update below, whose answer carries the version.
    record_keys(tx, gw, &keys, true, now).await?;
    // The database's clock, not this replica's: see `mark_down`. A heartbeat
    // that passed authentication just before the gateway was disabled does
    // not bring it back up.
    let sql = format!(
        "UPDATE gateways SET last_heartbeat = {}, \
         health = CASE WHEN disabled = 0 THEN $1 ELSE 'down' END, max_tunnels = $2, active_tunnels = $3 \
         WHERE id = $4 RETURNING version, drain",
        tx.kind.now_ms_sql()
    );
    let row = sqlx::query(&sql)
        .bind(&health)
        .bind(i64::from(hb.max_tunnels))
        .bind(i64::from(hb.active_tunnels))
        .bind(id64(gw.0))
        .fetch_one(&mut *tx.inner)
        .await?;
    record_transports(tx, gw, hb).await?;
    if old != health {
        tx.audit(
            now,
            &format!("gateway:{gw}"),
            "gateway.health",
            &format!("gateway:{gw}"),
            &format!("{old} => {health}"),
        )
        .await?;
    }
    Ok(HeartbeatAck {
        desired_version: u64_of(col(&row, "version")?),
        drain: col::<i64>(&row, "drain")? != 0,
        lease_ms: None,
    })
}

/// What a registration or heartbeat changes about a gateway's keys.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct KeyChange {
    /// The current key is now this one (base64): a rotation ended, or the
    /// gateway came with a new key.
    key: Option<String>,
    /// The next key is now this one (`Some(None)`: none any more).
    next: Option<Option<String>>,
}

impl KeyChange {
    /// The change from the stored keys to the reported ones (`key`
    /// `None`: the gateway did not say, nothing changes).
    fn of(
        stored_key: Option<&str>,
        stored_next: Option<&str>,
        key: Option<PublicKey>,
        next: Option<PublicKey>,
    ) -> Self {
        let Some(key) = key.map(|k| k.to_base64()) else {
            return Self::default();
        };
        let next = next.map(|k| k.to_base64());
        Self {
            next: (stored_next != next.as_deref()).then(|| next.clone()),
            key: (stored_key != Some(key.as_str())).then_some(key),
        }
    }

    /// Whether nothing changes.
    fn is_none(&self) -> bool {
        self.key.is_none() && self.next.is_none()
    }
}

/// Writes a [`KeyChange`] to the gateway row, bumps the gateway's document
/// (its `key_rotation` changes with either key) and audits it. The caller
/// has bumped the gateway's sites (their agents' documents name the next
/// key, or the current one when there is none) before: the lock order.
/// `had_key`: the gateway had registered before (its first key is no
/// change worth a `gateway.key` row).
async fn record_keys(
    tx: &mut Tx,
    gw: GatewayId,
    change: &KeyChange,
    had_key: bool,
    now: i64,
) -> OpResult<()> {
    if change.is_none() {
        return Ok(());
    }
    let object = format!("gateway:{gw}");
    let actor = object.as_str();
    if let Some(key) = &change.key {
        // A new current key answers a request for one as well.
        sqlx::query(
            "UPDATE gateways SET public_key = $1, key_since = $2, rotate_key = 0 WHERE id = $3",
        )
        .bind(key)
        .bind(now)
        .bind(id64(gw.0))
        .execute(&mut *tx.inner)
        .await?;
        if had_key {
            tx.audit(now, actor, "gateway.key", &object, key).await?;
        }
    }
    if let Some(next) = &change.next {
        sqlx::query(
            "UPDATE gateways SET next_public_key = $1, \
             rotate_key = CASE WHEN $2 = 1 THEN 0 ELSE rotate_key END WHERE id = $3",
        )
        .bind(next.as_deref())
        .bind(i64::from(next.is_some()))
        .bind(id64(gw.0))
        .execute(&mut *tx.inner)
        .await?;
        match next {
            Some(k) => tx.audit(now, actor, "gateway.next_key", &object, k).await?,
            // Promoted: `gateway.key` says it. Otherwise the gateway gave
            // the rotation up (its next key was lost): the agents go back
            // to its current key.
            None if change.key.is_none() => {
                tx.audit(
                    now,
                    actor,
                    "gateway.next_key.dropped",
                    &object,
                    "the gateway abandoned the rotation; its current key stays",
                )
                .await?;
            }
            None => {}
        }
    }
    tx.bump_gateway(gw).await?;
    Ok(())
}

/// The operator or the schedule (`actor`) asks gateway `gw` for a new
/// WireGuard key: a flag of its desired state until it announces its next
/// key. Idempotent while a rotation is asked for or under way.
///
/// # Errors
/// `NotFound`; `InvalidState` for a disabled gateway or one that never
/// registered (it has no key to replace).
pub async fn request_key_rotation(
    tx: &mut Tx,
    gw: GatewayId,
    actor: &str,
    now: i64,
) -> OpResult<GatewayKeyRotationStatus> {
    let row = tx
        .row_by_id(
            "SELECT public_key, disabled FROM gateways WHERE id = $1",
            gw.0,
            "gateway",
        )
        .await?;
    if col::<i64>(&row, "disabled")? != 0 {
        return Err(OpError::InvalidState(format!(
            "gateway {gw} is disabled: enable it first"
        )));
    }
    if col::<Option<String>>(&row, "public_key")?.is_none() {
        return Err(OpError::InvalidState(format!(
            "gateway {gw} never registered: it has no key to rotate yet"
        )));
    }
    ask_key_rotation(tx, gw, actor, "", now).await?;
    key_rotation_status(tx, gw).await
}

/// Sets gateway `gw`'s flag asking for a new key, bumps its document and
/// audits it (`why`); `false` when a rotation is asked for or under way
/// already. Conditional, so that a rotation asked for by two replicas (or
/// the operator and the schedule) at the same moment is asked once.
async fn ask_key_rotation(
    tx: &mut Tx,
    gw: GatewayId,
    actor: &str,
    why: &str,
    now: i64,
) -> OpResult<bool> {
    let r = sqlx::query(
        "UPDATE gateways SET rotate_key = 1 \
         WHERE id = $1 AND rotate_key = 0 AND next_public_key IS NULL AND disabled = 0",
    )
    .bind(id64(gw.0))
    .execute(&mut *tx.inner)
    .await?;
    if r.rows_affected() != 1 {
        return Ok(false);
    }
    tx.bump_gateway(gw).await?;
    tx.audit(
        now,
        actor,
        "gateway.rotate_key",
        &format!("gateway:{gw}"),
        why,
    )
    .await?;
    Ok(true)
}

/// Where the rotation of gateway `gw`'s key stands.
///
/// # Errors
/// `NotFound`; `InvalidState` when it has no key.
pub async fn key_rotation_status(tx: &mut Tx, gw: GatewayId) -> OpResult<GatewayKeyRotationStatus> {
    let row = tx
        .row_by_id(
            "SELECT public_key, next_public_key, rotate_key FROM gateways WHERE id = $1",
            gw.0,
            "gateway",
        )
        .await?;
    let parse = |k: Option<String>| k.and_then(|k| k.parse::<PublicKey>().ok());
    let public_key = parse(col(&row, "public_key")?)
        .ok_or_else(|| OpError::InvalidState(format!("gateway {gw} has no key")))?;
    Ok(GatewayKeyRotationStatus {
        gateway_id: gw,
        public_key,
        next_public_key: parse(col(&row, "next_public_key")?),
        requested: col::<i64>(&row, "rotate_key")? != 0,
    })
}

/// Asks every registered, enabled gateway whose key is older than
/// `period_ms` (0: off) for a new one, unless a rotation is asked for or
/// under way. Returns how many were asked.
///
/// # Errors
/// Database failures.
pub async fn schedule_key_rotations(tx: &mut Tx, now: i64, period_ms: i64) -> OpResult<usize> {
    // A router without an agent holds every gateway's key in its own
    // configuration and cannot follow a rotation: the schedule would cut
    // it off after the grace time. The operator rotates on demand then,
    // and re-applies those routers' files.
    if period_ms <= 0 || wireguard_sites_without_agent(tx).await? > 0 {
        return Ok(0);
    }
    let rows = sqlx::query(
        "SELECT id FROM gateways WHERE public_key IS NOT NULL AND disabled = 0 \
         AND rotate_key = 0 AND next_public_key IS NULL \
         AND COALESCE(key_since, created_at) <= $1 ORDER BY id",
    )
    .bind(now - period_ms)
    .fetch_all(&mut *tx.inner)
    .await?;
    let mut n = 0;
    for gw in ids_of(&rows, "id", GatewayId)? {
        let why = "key older than [rotation] gateway_key_days";
        n += usize::from(ask_key_rotation(tx, gw, "schedule", why, now).await?);
    }
    Ok(n)
}

/// WireGuard sites without an agent: their routers name the gateways' keys
/// in their own configuration.
///
/// # Errors
/// Database failures.
pub async fn wireguard_sites_without_agent(tx: &mut Tx) -> OpResult<i64> {
    let r = sqlx::query("SELECT COUNT(*) AS n FROM sites WHERE agentless = 1 AND tunnel = $1")
        .bind(enum_str(&vpnnat::messages::TunnelKind::Wireguard))
        .fetch_one(&mut *tx.inner)
        .await?;
    Ok(col(&r, "n")?)
}

/// How each site's tunnel travels, as the heartbeat reports it; written
/// only where it changed (a switch is rare, a heartbeat is not).
async fn record_transports(tx: &mut Tx, gw: GatewayId, hb: &GatewayHeartbeat) -> OpResult<()> {
    if hb.peers.iter().all(|p| p.transport.is_none()) {
        return Ok(());
    }
    let rows = sqlx::query("SELECT site_id, transport FROM tunnels WHERE gateway_id = $1")
        .bind(id64(gw.0))
        .fetch_all(&mut *tx.inner)
        .await?;
    let mut known = std::collections::BTreeMap::new();
    for r in &rows {
        known.insert(
            col::<i64>(r, "site_id")?,
            col::<Option<String>>(r, "transport")?,
        );
    }
    for p in &hb.peers {
        let Some(t) = p.transport else { continue };
        let site = id64(p.site_id.0);
        match known.get(&site) {
            Some(old) if old.as_deref() != Some(t.as_str()) => {
                sqlx::query(
                    "UPDATE tunnels SET transport = $1 WHERE site_id = $2 AND gateway_id = $3",
                )
                .bind(t.as_str())
                .bind(site)
                .bind(id64(gw.0))
                .execute(&mut *tx.inner)
                .await?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// The gateway is back up: its sites that were told they are stranded are
/// not any more (site rows before the gateway row: the lock order).
async fn clear_stranded(tx: &mut Tx, gw: GatewayId) -> OpResult<()> {
    let rows = sqlx::query(
        "SELECT s.id FROM sites s JOIN tunnels t ON t.site_id = s.id \
         WHERE t.gateway_id = $1 AND s.problem = $2 ORDER BY s.id",
    )
    .bind(id64(gw.0))
    .bind(STRANDED)
    .fetch_all(&mut *tx.inner)
    .await?;
    for site in ids_of(&rows, "id", SiteId)? {
        tx.lock_site(site).await?;
        sqlx::query("UPDATE sites SET problem = NULL WHERE id = $1 AND problem = $2")
            .bind(id64(site.0))
            .bind(STRANDED)
            .execute(&mut *tx.inner)
            .await?;
        tx.bump_site(site).await?;
    }
    Ok(())
}

/// Records what a gateway applied.
///
/// Lock order: the sites whose tunnel became ready are bumped (their rows
/// locked, ascending id) before the gateway row is updated, the order of
/// `new_request`, `close_request` and failover (site, then gateway).
///
/// # Errors
/// Database failures.
pub async fn gateway_applied(
    tx: &mut Tx,
    gw: GatewayId,
    version: u64,
    errors: &[String],
) -> OpResult<()> {
    // A plain read: no lock on the gateway row yet.
    let before = sqlx::query("SELECT applied_version FROM gateways WHERE id = $1")
        .bind(id64(gw.0))
        .fetch_optional(&mut *tx.inner)
        .await?
        .map(|r| col::<i64>(&r, "applied_version"))
        .transpose()?
        .unwrap_or(0);
    // Sites whose peer this gateway now holds for the first time: their
    // agents get the tunnel (and dial) now, not before.
    let ready = sqlx::query(
        "SELECT site_id FROM tunnels WHERE gateway_id = $1 AND ready_version > $2 \
         AND ready_version <= $3 ORDER BY site_id",
    )
    .bind(id64(gw.0))
    .bind(before)
    .bind(id64(version))
    .fetch_all(&mut *tx.inner)
    .await?;
    let mut ready = ids_of(&ready, "site_id", SiteId)?;
    // Sites whose next key this gateway now accepts: their agents switch.
    ready.extend(super::rotation::keys_ready(tx, gw, before, id64(version)).await?);
    ready.sort_unstable();
    ready.dedup();
    for site in ready {
        tx.bump_site(site).await?;
    }
    sqlx::query("UPDATE gateways SET applied_version = $1, applied_errors = $2 WHERE id = $3")
        .bind(id64(version))
        .bind(serde_json::to_string(errors).unwrap_or_default())
        .bind(id64(gw.0))
        .execute(&mut *tx.inner)
        .await?;
    Ok(())
}

/// Puts a gateway into (or out of) drain mode: it keeps its sites but takes no new ones.
///
/// # Errors
/// `NotFound`.
pub async fn drain(tx: &mut Tx, gw: GatewayId, on: bool, actor: &str, now: i64) -> OpResult<()> {
    let r = sqlx::query("UPDATE gateways SET drain = $1 WHERE id = $2")
        .bind(i64::from(on))
        .bind(id64(gw.0))
        .execute(&mut *tx.inner)
        .await?;
    if r.rows_affected() == 0 {
        return Err(OpError::NotFound("gateway"));
    }
    tx.audit(
        now,
        actor,
        if on {
            "gateway.drain"
        } else {
            "gateway.undrain"
        },
        &format!("gateway:{gw}"),
        "",
    )
    .await?;
    Ok(())
}

/// Marks gateways whose last heartbeat is older than `down_after_ms` by
/// the database's clock (replicas' own clocks may differ) down; returns them.
///
/// # Errors
/// Database failures.
pub async fn mark_down(tx: &mut Tx, down_after_ms: i64, now: i64) -> OpResult<Vec<GatewayId>> {
    let sql = format!(
        "UPDATE gateways SET health = 'down' WHERE health <> 'down' AND last_heartbeat < {} - $1 \
         RETURNING id",
        tx.kind.now_ms_sql()
    );
    let rows = sqlx::query(&sql)
        .bind(down_after_ms)
        .fetch_all(&mut *tx.inner)
        .await?;
    let down = ids_of(&rows, "id", GatewayId)?;
    for gw in &down {
        tx.audit(
            now,
            "system",
            "gateway.down",
            &format!("gateway:{gw}"),
            "missed its heartbeats",
        )
        .await?;
    }
    Ok(down)
}

/// Disables (or enables again) a gateway. A disabled gateway's credential
/// is refused and it is marked down at once, so that failover moves its
/// sites; enabled again, it is back once it registers or heartbeats.
///
/// # Errors
/// `NotFound`.
pub async fn set_gateway_disabled(
    tx: &mut Tx,
    gw: GatewayId,
    disabled: bool,
    actor: &str,
    now: i64,
) -> OpResult<()> {
    let sql = if disabled {
        "UPDATE gateways SET disabled = 1, health = 'down' WHERE id = $1"
    } else {
        "UPDATE gateways SET disabled = 0 WHERE id = $1"
    };
    let r = sqlx::query(sql)
        .bind(id64(gw.0))
        .execute(&mut *tx.inner)
        .await?;
    if r.rows_affected() == 0 {
        return Err(OpError::NotFound("gateway"));
    }
    let action = if disabled {
        "gateway.disable"
    } else {
        "gateway.enable"
    };
    tx.audit(now, actor, action, &format!("gateway:{gw}"), "")
        .await?;
    Ok(())
}

/// Deletes a gateway identity. One that still carries sites is refused:
/// disable it first and let failover move them.
///
/// # Errors
/// `NotFound`; `InvalidState` while it carries sites.
pub async fn delete_gateway(tx: &mut Tx, gw: GatewayId, actor: &str, now: i64) -> OpResult<()> {
    let row = tx
        .row_by_id("SELECT name FROM gateways WHERE id = $1", gw.0, "gateway")
        .await?;
    let name: String = col(&row, "name")?;
    let sites = gateway_sites(tx, gw).await?;
    if !sites.is_empty() {
        return Err(OpError::InvalidState(format!(
            "gateway {gw} still carries {} site(s): disable it first, and delete it once failover has moved them",
            sites.len()
        )));
    }
    sqlx::query("DELETE FROM gateways WHERE id = $1")
        .bind(id64(gw.0))
        .execute(&mut *tx.inner)
        .await?;
    tx.audit(
        now,
        actor,
        "gateway.delete",
        &format!("gateway:{gw}"),
        &name,
    )
    .await?;
    Ok(())
}

/// Gives a gateway a new credential; the old one is refused from the
/// commit on. Its id, key, tunnels and sites stay.
///
/// # Errors
/// `NotFound`.
pub async fn rotate_gateway(
    tx: &mut Tx,
    gw: GatewayId,
    actor: &str,
    now: i64,
) -> OpResult<GatewayCreated> {
    let credential = Secret::generate(SecretKind::Gateway);
    let row = sqlx::query("UPDATE gateways SET credential_hash = $1 WHERE id = $2 RETURNING name")
        .bind(credential.hash())
        .bind(id64(gw.0))
        .fetch_optional(&mut *tx.inner)
        .await?
        .ok_or(OpError::NotFound("gateway"))?;
    tx.audit(now, actor, "gateway.rotate", &format!("gateway:{gw}"), "")
        .await?;
    Ok(GatewayCreated {
        gateway_id: gw,
        name: col(&row, "name")?,
        credential: credential.expose().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(b: u8) -> PublicKey {
        PublicKey([b; 32])
    }

    fn b64(b: u8) -> String {
        k(b).to_base64()
    }

    #[test]
    fn key_change_follows_the_rotation() {
        let (c, n) = (b64(1), b64(2));
        // Nothing new.
        assert!(KeyChange::of(Some(&c), None, Some(k(1)), None).is_none());
        assert!(KeyChange::of(Some(&c), Some(&n), Some(k(1)), Some(k(2))).is_none());
        // An older gateway says nothing about keys.
        assert!(KeyChange::of(Some(&c), Some(&n), None, None).is_none());
        // The next key announced.
        assert_eq!(
            KeyChange::of(Some(&c), None, Some(k(1)), Some(k(2))),
            KeyChange {
                key: None,
                next: Some(Some(n.clone()))
            }
        );
        // Promoted.
        assert_eq!(
            KeyChange::of(Some(&c), Some(&n), Some(k(2)), None),
            KeyChange {
                key: Some(n.clone()),
                next: Some(None)
            }
        );
        // Abandoned.
        assert_eq!(
            KeyChange::of(Some(&c), Some(&n), Some(k(1)), None),
            KeyChange {
                key: None,
                next: Some(None)
            }
        );
        // The first registration.
        assert_eq!(
            KeyChange::of(None, None, Some(k(1)), None),
            KeyChange {
                key: Some(c),
                next: None
            }
        );
    }
}
