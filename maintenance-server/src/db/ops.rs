//! The write side: every state change, each inside the caller's [`Tx`], each
//! appending to the audit log and bumping the versions of the documents it
//! changes (DESIGN.md "Lifecycle"; issue 3 "Semantics").

use std::net::{IpAddr, Ipv4Addr};

use sqlx::Row as _;
use vpnnat::messages::{
    EnrollResponse, FailureReport, GatewayCreated, GatewayHeartbeat, GatewayId, GatewayRegistered,
    GatewayRegistration, Health, HeartbeatAck, MaintenanceRequestView, NewMaintenanceRequest,
    PublicKey, RequestId, RequestState, SiteCreated, SiteId, TerminalAssignment, TerminalName,
    UnixMillis,
};

use super::views::{addr_of, addr_to_i64, enum_str};
use super::{DbError, DbKind, Tx, col, id64, u64_of};
use crate::auth::{Secret, SecretKind};
use crate::settings::Settings;

/// Why an operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// Storage failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The object does not exist (or is not the caller's).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// A unique value is taken.
    #[error("{message}")]
    Conflict {
        /// The field.
        field: &'static str,
        /// Why.
        message: String,
    },
    /// No healthy gateway has a free tunnel slot.
    #[error("no gateway has a free tunnel slot")]
    NoCapacity,
    /// Every pool address is held.
    #[error("the NAT-address pool is exhausted")]
    PoolExhausted,
    /// The request is not in a state that allows this.
    #[error("{0}")]
    InvalidState(String),
    /// An enrollment token that is unknown, used or expired.
    #[error("the enrollment token is unknown, used or expired")]
    BadToken,
    /// The gateway has not registered yet.
    #[error("the gateway has not registered")]
    NotRegistered,
}

impl From<sqlx::Error> for OpError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(DbError::Other(e))
    }
}

/// Result of an operation.
pub type OpResult<T> = Result<T, OpError>;

fn is_unique_violation(e: &OpError) -> bool {
    matches!(e, OpError::Db(DbError::Other(sqlx::Error::Database(d))) if d.is_unique_violation())
}

/// The policy knobs operations need, taken from [`Settings`].
#[derive(Debug, Clone)]
pub struct Policy {
    /// Lease length, ms.
    pub max_duration_ms: i64,
    /// Enrollment token lifetime, ms.
    pub token_lifetime_ms: i64,
    /// Terminal name of automatic requests for the router.
    pub router_terminal: TerminalName,
    /// Failure reports open requests.
    pub failure_opens_request: bool,
    /// Heartbeat interval, ms.
    pub heartbeat_interval_ms: u64,
    /// Missing heartbeats → down, ms.
    pub down_after_ms: i64,
    /// Agents' keepalive, s.
    pub persistent_keepalive_s: u16,
}

impl Policy {
    /// From validated settings.
    pub fn new(s: &Settings) -> Self {
        Self {
            max_duration_ms: i64::try_from(s.maintenance.max_duration_s.saturating_mul(1000))
                .unwrap_or(i64::MAX / 4),
            token_lifetime_ms: i64::try_from(
                s.enrollment.token_lifetime_hours.saturating_mul(3_600_000),
            )
            .unwrap_or(i64::MAX / 4),
            router_terminal: TerminalName::new(s.maintenance.router_terminal.clone())
                .unwrap_or_else(|_| TerminalName::new("router").expect("a valid name")),
            failure_opens_request: s.maintenance.failure_opens_request,
            heartbeat_interval_ms: s.gateways.heartbeat_interval_ms,
            down_after_ms: i64::try_from(s.gateways.down_after_ms).unwrap_or(i64::MAX / 4),
            persistent_keepalive_s: s.gateways.persistent_keepalive_s,
        }
    }
}

// ---------------------------------------------------------------- sites

/// Creates a site and its first enrollment token.
///
/// # Errors
/// `Conflict` on a taken name.
pub async fn create_site(
    tx: &mut Tx,
    name: &str,
    actor: &str,
    now: i64,
    policy: &Policy,
) -> OpResult<SiteCreated> {
    let taken = sqlx::query("SELECT id FROM sites WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut *tx.inner)
        .await?;
    if taken.is_some() {
        return Err(OpError::Conflict {
            field: "name",
            message: format!("a site named {name:?} exists"),
        });
    }
    let row = sqlx::query("INSERT INTO sites (name, created_at) VALUES ($1, $2) RETURNING id")
        .bind(name)
        .bind(now)
        .fetch_one(&mut *tx.inner)
        .await
        .map_err(OpError::from)
        .map_err(|e| {
            if is_unique_violation(&e) {
                OpError::Conflict {
                    field: "name",
                    message: format!("a site named {name:?} exists"),
                }
            } else {
                e
            }
        })?;
    let site = SiteId(u64_of(col(&row, "id")?));
    let (token, expires) = insert_enrollment_token(tx, site, now, policy).await?;
    tx.audit(now, actor, "site.create", &format!("site:{site}"), name)
        .await?;
    Ok(SiteCreated {
        site_id: site,
        name: name.to_owned(),
        enrollment_token: token,
        token_expires_at: UnixMillis(u64_of(expires)),
    })
}

async fn insert_enrollment_token(
    tx: &mut Tx,
    site: SiteId,
    now: i64,
    policy: &Policy,
) -> OpResult<(String, i64)> {
    // Only the newest token is valid.
    sqlx::query("UPDATE enrollment_tokens SET used_at = $1 WHERE site_id = $2 AND used_at IS NULL")
        .bind(now)
        .bind(id64(site.0))
        .execute(&mut *tx.inner)
        .await?;
    let token = Secret::generate(SecretKind::Enrollment);
    let expires = now.saturating_add(policy.token_lifetime_ms);
    sqlx::query(
        "INSERT INTO enrollment_tokens (token_hash, site_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(token.hash())
    .bind(id64(site.0))
    .bind(now)
    .bind(expires)
    .execute(&mut *tx.inner)
    .await?;
    Ok((token.expose().to_owned(), expires))
}

/// A fresh enrollment token for an existing site (re-enrollment).
///
/// # Errors
/// `NotFound` for an unknown site.
pub async fn new_site_token(
    tx: &mut Tx,
    site: SiteId,
    actor: &str,
    now: i64,
    policy: &Policy,
) -> OpResult<SiteCreated> {
    let row = sqlx::query("SELECT name FROM sites WHERE id = $1")
        .bind(id64(site.0))
        .fetch_optional(&mut *tx.inner)
        .await?
        .ok_or(OpError::NotFound("site"))?;
    let name: String = col(&row, "name")?;
    let (token, expires) = insert_enrollment_token(tx, site, now, policy).await?;
    tx.audit(now, actor, "site.token", &format!("site:{site}"), "")
        .await?;
    Ok(SiteCreated {
        site_id: site,
        name,
        enrollment_token: token,
        token_expires_at: UnixMillis(u64_of(expires)),
    })
}

/// Redeems a one-time token: the site gets the agent's public key and a new
/// credential (rotating any previous one).
///
/// # Errors
/// `BadToken`; `Conflict` when another site uses the key.
pub async fn enroll(
    tx: &mut Tx,
    token: &str,
    key: PublicKey,
    now: i64,
) -> OpResult<EnrollResponse> {
    let hash = Secret::hash_of(token);
    let row = sqlx::query(
        "SELECT site_id, expires_at, used_at FROM enrollment_tokens WHERE token_hash = $1",
    )
    .bind(&hash)
    .fetch_optional(&mut *tx.inner)
    .await?
    .ok_or(OpError::BadToken)?;
    let site = SiteId(u64_of(col(&row, "site_id")?));
    let used: Option<i64> = col(&row, "used_at")?;
    if used.is_some() || col::<i64>(&row, "expires_at")? <= now {
        return Err(OpError::BadToken);
    }
    tx.lock_site(site).await?;
    let key_b64 = key.to_base64();
    let other = sqlx::query("SELECT id FROM sites WHERE public_key = $1 AND id <> $2")
        .bind(&key_b64)
        .bind(id64(site.0))
        .fetch_optional(&mut *tx.inner)
        .await?;
    if other.is_some() {
        return Err(OpError::Conflict {
            field: "public_key",
            message: "another site uses this public key".into(),
        });
    }
    // Single use even when two enrollments race: only one update matches.
    let claimed = sqlx::query(
        "UPDATE enrollment_tokens SET used_at = $1 WHERE token_hash = $2 AND used_at IS NULL",
    )
    .bind(now)
    .bind(&hash)
    .execute(&mut *tx.inner)
    .await?;
    if claimed.rows_affected() != 1 {
        return Err(OpError::BadToken);
    }
    let credential = Secret::generate(SecretKind::Site);
    let row = sqlx::query(
        "UPDATE sites SET public_key = $1, credential_hash = $2, enrolled_at = $3 WHERE id = $4 RETURNING name",
    )
    .bind(&key_b64)
    .bind(credential.hash())
    .bind(now)
    .bind(id64(site.0))
    .fetch_one(&mut *tx.inner)
    .await?;
    let name: String = col(&row, "name")?;
    tx.bump_site(site).await?;
    if let Some(gw) = site_gateway(tx, site).await? {
        // The peer's key changed.
        tx.bump_gateway(gw).await?;
    }
    tx.audit(
        now,
        &format!("site:{site}"),
        "site.enroll",
        &format!("site:{site}"),
        &format!("public key {key_b64}"),
    )
    .await?;
    Ok(EnrollResponse {
        site_id: site,
        site_name: name,
        credential: credential.expose().to_owned(),
    })
}

async fn site_gateway(tx: &mut Tx, site: SiteId) -> OpResult<Option<GatewayId>> {
    let r = sqlx::query("SELECT gateway_id FROM tunnels WHERE site_id = $1")
        .bind(id64(site.0))
        .fetch_optional(&mut *tx.inner)
        .await?;
    Ok(match r {
        Some(r) => Some(GatewayId(u64_of(col(&r, "gateway_id")?))),
        None => None,
    })
}

/// Records what an agent applied.
///
/// # Errors
/// Database failures.
pub async fn site_applied(
    tx: &mut Tx,
    site: SiteId,
    version: u64,
    errors: &[String],
) -> OpResult<()> {
    sqlx::query("UPDATE sites SET applied_version = $1, applied_errors = $2 WHERE id = $3")
        .bind(id64(version))
        .bind(serde_json::to_string(errors).unwrap_or_default())
        .bind(id64(site.0))
        .execute(&mut *tx.inner)
        .await?;
    Ok(())
}

// ---------------------------------------------------------------- gateways

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
    let taken = sqlx::query("SELECT id FROM gateways WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut *tx.inner)
        .await?;
    if taken.is_some() {
        return Err(OpError::Conflict {
            field: "name",
            message: format!("a gateway named {name:?} exists"),
        });
    }
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
    let row = sqlx::query("SELECT endpoints, public_key FROM gateways WHERE id = $1")
        .bind(id64(gw.0))
        .fetch_optional(&mut *tx.inner)
        .await?
        .ok_or(OpError::NotFound("gateway"))?;
    let old_endpoints: String = col(&row, "endpoints")?;
    let old_key: Option<String> = col(&row, "public_key")?;
    let endpoints = serde_json::to_string(&reg.endpoints).unwrap_or_else(|_| "[]".into());
    let kinds = serde_json::to_string(&reg.tunnel_kinds).unwrap_or_else(|_| "[]".into());
    let key = reg.public_key.to_base64();
    // Sites first, then the gateway row: the lock order of every other transaction.
    if old_endpoints != endpoints || old_key.as_deref() != Some(key.as_str()) {
        for site in gateway_sites(tx, gw).await? {
            tx.bump_site(site).await?;
        }
    }
    sqlx::query(
        "UPDATE gateways SET endpoints = $1, public_key = $2, tunnel_kinds = $3, max_tunnels = $4, \
         software_version = $5, health = 'healthy', last_heartbeat = $6 WHERE id = $7",
    )
    .bind(&endpoints)
    .bind(&key)
    .bind(&kinds)
    .bind(i64::from(reg.max_tunnels))
    .bind(&reg.software_version)
    .bind(now)
    .bind(id64(gw.0))
    .execute(&mut *tx.inner)
    .await?;
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

async fn gateway_sites(tx: &mut Tx, gw: GatewayId) -> OpResult<Vec<SiteId>> {
    let rows = sqlx::query("SELECT site_id FROM tunnels WHERE gateway_id = $1 ORDER BY site_id")
        .bind(id64(gw.0))
        .fetch_all(&mut *tx.inner)
        .await?;
    rows.iter()
        .map(|r| Ok(SiteId(u64_of(col(r, "site_id")?))))
        .collect()
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
    let row = sqlx::query("SELECT public_key, health FROM gateways WHERE id = $1")
        .bind(id64(gw.0))
        .fetch_optional(&mut *tx.inner)
        .await?
        .ok_or(OpError::NotFound("gateway"))?;
    if col::<Option<String>>(&row, "public_key")?.is_none() {
        return Err(OpError::NotRegistered);
    }
    let old: String = col(&row, "health")?;
    let health = enum_str(&hb.health);
    let row = sqlx::query(
        "UPDATE gateways SET last_heartbeat = $1, health = $2, max_tunnels = $3, active_tunnels = $4 \
         WHERE id = $5 RETURNING version, drain",
    )
    .bind(now)
    .bind(&health)
    .bind(i64::from(hb.max_tunnels))
    .bind(i64::from(hb.active_tunnels))
    .bind(id64(gw.0))
    .fetch_one(&mut *tx.inner)
    .await?;
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
    })
}

/// After a restore: every desired-state version (sites, gateways, the
/// console feed) jumps to at least the current time in microseconds, past
/// any version that gateways and agents saw from the database as it was
/// before (they ignore documents older than what they applied). No
/// version ever grows by a million a second, so wall time is a floor that
/// only moves forward. Returns that floor.
///
/// # Errors
/// Database failures.
pub async fn advance_versions(tx: &mut Tx, actor: &str, now: i64) -> OpResult<i64> {
    let floor = now.saturating_mul(1000);
    let max = match tx.kind {
        DbKind::Postgres => "GREATEST",
        DbKind::Sqlite => "MAX",
    };
    for sql in [
        format!("UPDATE sites SET version = {max}(version + 1, $1)"),
        format!("UPDATE gateways SET version = {max}(version + 1, $1)"),
        format!("UPDATE counters SET value = {max}(value + 1, $1) WHERE name = 'console'"),
    ] {
        sqlx::query(&sql)
            .bind(floor)
            .execute(&mut *tx.inner)
            .await?;
    }
    tx.audit(now, actor, "database.restore", "database", "")
        .await?;
    Ok(floor)
}

/// Records what a gateway applied.
///
/// # Errors
/// Database failures.
pub async fn gateway_applied(
    tx: &mut Tx,
    gw: GatewayId,
    version: u64,
    errors: &[String],
) -> OpResult<()> {
    let before = sqlx::query("SELECT applied_version FROM gateways WHERE id = $1")
        .bind(id64(gw.0))
        .fetch_optional(&mut *tx.inner)
        .await?
        .map(|r| col::<i64>(&r, "applied_version"))
        .transpose()?
        .unwrap_or(0);
    sqlx::query("UPDATE gateways SET applied_version = $1, applied_errors = $2 WHERE id = $3")
        .bind(id64(version))
        .bind(serde_json::to_string(errors).unwrap_or_default())
        .bind(id64(gw.0))
        .execute(&mut *tx.inner)
        .await?;
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
    for r in ready {
        tx.bump_site(SiteId(u64_of(col(&r, "site_id")?))).await?;
    }
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

/// Takes a tunnel slot on the best gateway: healthy, registered, not
/// draining, with a free slot, least loaded (by share of capacity), then
/// lowest id. The slot is claimed with a conditional update, so two replicas
/// cannot overbook a gateway.
async fn claim_slot(tx: &mut Tx, exclude: Option<GatewayId>) -> OpResult<GatewayId> {
    let candidates = sqlx::query(
        "SELECT id FROM gateways WHERE health = 'healthy' AND drain = 0 AND public_key IS NOT NULL \
         AND tunnels < max_tunnels AND id <> $1 \
         ORDER BY (tunnels * 1000000) / max_tunnels, tunnels, id LIMIT 8",
    )
    .bind(exclude.map_or(0, |g| id64(g.0)))
    .fetch_all(&mut *tx.inner)
    .await?;
    for c in candidates {
        let id: i64 = col(&c, "id")?;
        let r = sqlx::query(
            "UPDATE gateways SET tunnels = tunnels + 1 WHERE id = $1 AND health = 'healthy' \
             AND drain = 0 AND tunnels < max_tunnels",
        )
        .bind(id)
        .execute(&mut *tx.inner)
        .await?;
        if r.rows_affected() == 1 {
            return Ok(GatewayId(u64_of(id)));
        }
    }
    Err(OpError::NoCapacity)
}

async fn release_slot(tx: &mut Tx, gw: GatewayId) -> OpResult<()> {
    sqlx::query("UPDATE gateways SET tunnels = tunnels - 1 WHERE id = $1 AND tunnels > 0")
        .bind(id64(gw.0))
        .execute(&mut *tx.inner)
        .await?;
    Ok(())
}

/// The site's gateway, taking a slot when it has none (sticky otherwise).
/// A site whose gateway is down is moved first.
async fn ensure_tunnel(tx: &mut Tx, site: SiteId, now: i64) -> OpResult<(GatewayId, bool)> {
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
    let gw = claim_slot(tx, None).await?;
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
    let to = claim_slot(tx, Some(from)).await?;
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

/// Claims a free pool address for (site, terminal).
async fn allocate(
    tx: &mut Tx,
    site: SiteId,
    terminal: &TerminalName,
    now: i64,
) -> OpResult<Ipv4Addr> {
    // Least recently released first, so an address is not handed to another
    // site the moment it was given back.
    let sql = match tx.kind {
        DbKind::Postgres => {
            "UPDATE nat_addresses SET site_id = $1, terminal = $2, allocated_at = $3 \
             WHERE address = (SELECT address FROM nat_addresses WHERE site_id IS NULL \
                              ORDER BY released_at, address LIMIT 1 FOR UPDATE SKIP LOCKED) \
             AND site_id IS NULL RETURNING address"
        }
        // Without the hint SQLite walks the (site_id, terminal) index over
        // every free address and sorts them (milliseconds per claim).
        DbKind::Sqlite => {
            "UPDATE nat_addresses SET site_id = $1, terminal = $2, allocated_at = $3 \
             WHERE address = (SELECT address FROM nat_addresses INDEXED BY nat_addresses_free \
                              WHERE site_id IS NULL \
                              ORDER BY released_at, address LIMIT 1) \
             AND site_id IS NULL RETURNING address"
        }
    };
    // Under PostgreSQL a concurrent claim can make the subquery come back
    // empty although addresses are free (its row was re-checked after the
    // lock); try again before calling the pool exhausted.
    for _ in 0..8 {
        let r = sqlx::query(sql)
            .bind(id64(site.0))
            .bind(terminal.as_str())
            .bind(now)
            .fetch_optional(&mut *tx.inner)
            .await?;
        if let Some(r) = r {
            return Ok(addr_of(r.try_get(0)?));
        }
        let free = sqlx::query("SELECT COUNT(*) FROM nat_addresses WHERE site_id IS NULL")
            .fetch_one(&mut *tx.inner)
            .await?;
        if free.try_get::<i64, _>(0)? == 0 {
            break;
        }
    }
    Err(OpError::PoolExhausted)
}

/// Where a new request comes from.
#[derive(Debug, Clone)]
pub struct Origin {
    /// Audit actor.
    pub actor: String,
    /// The global address the request came from.
    pub global_address: Option<IpAddr>,
    /// The failure report that caused it.
    pub failure_id: Option<u64>,
}

/// Accepts a maintenance request: a gateway slot (sticky), one NAT address
/// per terminal (a terminal that holds one keeps it), the request row, and
/// new versions for the agent's and the gateway's documents. Returns the
/// request as the API shows it.
///
/// # Errors
/// `NoCapacity` / `PoolExhausted` (the caller rolls back: nothing is allocated).
pub async fn new_request(
    tx: &mut Tx,
    site: SiteId,
    req: &NewMaintenanceRequest,
    origin: &Origin,
    now: i64,
    policy: &Policy,
) -> OpResult<MaintenanceRequestView> {
    let site_name = tx.lock_site(site).await?;
    let (gw, _new_tunnel) = ensure_tunnel(tx, site, now).await?;
    let expires = now.saturating_add(policy.max_duration_ms);
    let row = sqlx::query(
        "INSERT INTO requests (site_id, global_address, requester_name, level, urgency, phone, content, \
         state, gateway_id, received_at, expires_at, failure_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'waiting', $8, $9, $10, $11) RETURNING id",
    )
    .bind(id64(site.0))
    .bind(origin.global_address.map(|a| a.to_string()))
    .bind(&req.requester_name)
    .bind(enum_str(&req.level))
    .bind(enum_str(&req.urgency))
    .bind(&req.phone)
    .bind(&req.content)
    .bind(id64(gw.0))
    .bind(now)
    .bind(expires)
    .bind(origin.failure_id.map(id64))
    .fetch_one(&mut *tx.inner)
    .await?;
    let id = RequestId(u64_of(col(&row, "id")?));
    let mut assigned = Vec::with_capacity(req.terminals.len());
    let mut terminals = Vec::with_capacity(req.terminals.len());
    for (pos, terminal) in req.terminals.iter().enumerate() {
        let held =
            sqlx::query("SELECT address FROM nat_addresses WHERE site_id = $1 AND terminal = $2")
                .bind(id64(site.0))
                .bind(terminal.as_str())
                .fetch_optional(&mut *tx.inner)
                .await?;
        let addr = match held {
            Some(r) => addr_of(r.try_get(0)?),
            None => allocate(tx, site, terminal, now).await?,
        };
        sqlx::query(
            "INSERT INTO request_terminals (request_id, position, terminal, nat_address) VALUES ($1, $2, $3, $4)",
        )
        .bind(id64(id.0))
        .bind(i64::try_from(pos).unwrap_or(0))
        .bind(terminal.as_str())
        .bind(addr_to_i64(addr))
        .execute(&mut *tx.inner)
        .await?;
        assigned.push(format!("{terminal}={addr}"));
        terminals.push(TerminalAssignment {
            name: terminal.clone(),
            nat_address: Some(addr),
        });
    }
    sqlx::query("UPDATE sites SET problem = NULL WHERE id = $1 AND problem IS NOT NULL")
        .bind(id64(site.0))
        .execute(&mut *tx.inner)
        .await?;
    tx.bump_site(site).await?;
    tx.audit(
        now,
        &origin.actor,
        "request.create",
        &format!("request:{id}"),
        &format!("site:{site} gateway:{gw} {}", assigned.join(" ")),
    )
    .await?;
    tx.bump_gateway(gw).await?;
    // Everything the view shows is known here: no need to read it back.
    Ok(MaintenanceRequestView {
        id,
        acceptance_number: super::views::acceptance_number(id, now),
        site_id: site,
        site_name,
        global_address: origin.global_address,
        requester_name: req.requester_name.clone(),
        level: req.level,
        urgency: req.urgency,
        phone: req.phone.clone(),
        content: req.content.clone(),
        terminals,
        state: RequestState::Waiting,
        gateway_id: Some(gw),
        received_at: UnixMillis(u64_of(now)),
        started_at: None,
        ended_at: None,
        expires_at: UnixMillis(u64_of(expires)),
    })
}

/// Records (in its own transaction) that a site asked for maintenance and
/// nothing could be allocated; the agent shows it to the customer.
///
/// # Errors
/// Database failures.
pub async fn set_problem(tx: &mut Tx, site: SiteId, problem: &str) -> OpResult<()> {
    let r = sqlx::query(
        "UPDATE sites SET problem = $1 WHERE id = $2 AND (problem IS NULL OR problem <> $1)",
    )
    .bind(problem)
    .bind(id64(site.0))
    .execute(&mut *tx.inner)
    .await?;
    if r.rows_affected() > 0 {
        tx.bump_site(site).await?;
    }
    Ok(())
}

/// The site a request belongs to.
async fn request_site(tx: &mut Tx, id: RequestId) -> OpResult<SiteId> {
    let r = sqlx::query("SELECT site_id FROM requests WHERE id = $1")
        .bind(id64(id.0))
        .fetch_optional(&mut *tx.inner)
        .await?
        .ok_or(OpError::NotFound("request"))?;
    Ok(SiteId(u64_of(col(&r, "site_id")?)))
}

/// A technician starts work: waiting → in progress.
///
/// # Errors
/// `NotFound`; `InvalidState` unless waiting.
pub async fn start_request(tx: &mut Tx, id: RequestId, actor: &str, now: i64) -> OpResult<()> {
    let site = request_site(tx, id).await?;
    tx.lock_site(site).await?;
    let r = sqlx::query(
        "UPDATE requests SET state = 'in_progress', started_at = $1 WHERE id = $2 AND state = 'waiting'",
    )
    .bind(now)
    .bind(id64(id.0))
    .execute(&mut *tx.inner)
    .await?;
    if r.rows_affected() == 0 {
        return Err(OpError::InvalidState(
            "only a waiting request can be started".into(),
        ));
    }
    tx.audit(now, actor, "request.start", &format!("request:{id}"), "")
        .await?;
    Ok(())
}

/// Ends, revokes or expires an open request: its addresses that no other
/// open request of the site uses return to the pool, the gateway peer loses
/// them, and when the site holds none any more its tunnel slot is freed.
///
/// `scope`: the site the caller speaks for; another site's request is `NotFound`.
///
/// # Errors
/// `NotFound`; `InvalidState` when the request is not open.
pub async fn close_request(
    tx: &mut Tx,
    id: RequestId,
    to: RequestState,
    scope: Option<SiteId>,
    actor: &str,
    now: i64,
) -> OpResult<()> {
    let site = request_site(tx, id).await?;
    if scope.is_some_and(|s| s != site) {
        return Err(OpError::NotFound("request"));
    }
    tx.lock_site(site).await?;
    let r = sqlx::query(
        "UPDATE requests SET state = $1, ended_at = $2 WHERE id = $3 AND state IN ('waiting', 'in_progress')",
    )
    .bind(enum_str(&to))
    .bind(now)
    .bind(id64(id.0))
    .execute(&mut *tx.inner)
    .await?;
    if r.rows_affected() == 0 {
        return Err(OpError::InvalidState("the request is not open".into()));
    }
    // Terminals of this request that no other open request of the site names.
    let rows = sqlx::query(
        "SELECT rt.terminal FROM request_terminals rt WHERE rt.request_id = $1 AND NOT EXISTS ( \
           SELECT 1 FROM request_terminals o JOIN requests r ON r.id = o.request_id \
           WHERE r.site_id = $2 AND r.id <> $1 AND r.state IN ('waiting', 'in_progress') \
           AND o.terminal = rt.terminal)",
    )
    .bind(id64(id.0))
    .bind(id64(site.0))
    .fetch_all(&mut *tx.inner)
    .await?;
    let mut released = Vec::new();
    for r in rows {
        let terminal: String = col(&r, "terminal")?;
        let a = sqlx::query(
            "UPDATE nat_addresses SET site_id = NULL, terminal = NULL, allocated_at = NULL, released_at = $1 \
             WHERE site_id = $2 AND terminal = $3 RETURNING address",
        )
        .bind(now)
        .bind(id64(site.0))
        .bind(&terminal)
        .fetch_optional(&mut *tx.inner)
        .await?;
        if let Some(a) = a {
            released.push(addr_of(a.try_get(0)?));
        }
    }
    sqlx::query("UPDATE request_terminals SET nat_address = NULL WHERE request_id = $1")
        .bind(id64(id.0))
        .execute(&mut *tx.inner)
        .await?;
    let gw = site_gateway(tx, site).await?;
    let remaining = sqlx::query("SELECT COUNT(*) FROM nat_addresses WHERE site_id = $1")
        .bind(id64(site.0))
        .fetch_one(&mut *tx.inner)
        .await?
        .try_get::<i64, _>(0)?;
    let mut detail = released
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    if remaining == 0
        && let Some(g) = gw
    {
        sqlx::query("DELETE FROM tunnels WHERE site_id = $1")
            .bind(id64(site.0))
            .execute(&mut *tx.inner)
            .await?;
        release_slot(tx, g).await?;
        detail.push_str(&format!(" tunnel on gateway:{g} released"));
    }
    tx.bump_site(site).await?;
    let action = match to {
        RequestState::Revoked => "request.revoke",
        RequestState::Expired => "request.expire",
        _ => "request.end",
    };
    tx.audit(now, actor, action, &format!("request:{id}"), detail.trim())
        .await?;
    if let Some(g) = gw {
        tx.bump_gateway(g).await?;
    }
    Ok(())
}

/// Stores a failure report.
///
/// # Errors
/// Database failures.
pub async fn store_failure(
    tx: &mut Tx,
    site: SiteId,
    report: &FailureReport,
    now: i64,
) -> OpResult<u64> {
    let row = sqlx::query(
        "INSERT INTO failures (site_id, code, detail, terminal, received_at) VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(id64(site.0))
    .bind(enum_str(&report.code))
    .bind(&report.detail)
    .bind(report.terminal.as_ref().map(|t| t.as_str().to_owned()))
    .bind(now)
    .fetch_one(&mut *tx.inner)
    .await?;
    let id = u64_of(col(&row, "id")?);
    tx.audit(
        now,
        &format!("site:{site}"),
        "failure.report",
        &format!("failure:{id}"),
        &format!("{} {}", enum_str(&report.code), report.detail),
    )
    .await?;
    Ok(id)
}

/// Links a failure to the request opened for it.
///
/// # Errors
/// Database failures.
pub async fn link_failure(tx: &mut Tx, failure: u64, request: RequestId) -> OpResult<()> {
    sqlx::query("UPDATE failures SET request_id = $1 WHERE id = $2")
        .bind(id64(request.0))
        .bind(id64(failure))
        .execute(&mut *tx.inner)
        .await?;
    tx.touch_console();
    Ok(())
}

/// Marks gateways without a heartbeat since `cutoff` down; returns them.
///
/// # Errors
/// Database failures.
pub async fn mark_down(tx: &mut Tx, cutoff: i64, now: i64) -> OpResult<Vec<GatewayId>> {
    let rows = sqlx::query(
        "UPDATE gateways SET health = 'down' WHERE health <> 'down' AND last_heartbeat < $1 RETURNING id",
    )
    .bind(cutoff)
    .fetch_all(&mut *tx.inner)
    .await?;
    let mut down = Vec::new();
    for r in rows {
        let gw = GatewayId(u64_of(col(&r, "id")?));
        tx.audit(
            now,
            "system",
            "gateway.down",
            &format!("gateway:{gw}"),
            "missed its heartbeats",
        )
        .await?;
        down.push(gw);
    }
    Ok(down)
}

/// Sites whose tunnel is on a down gateway.
///
/// # Errors
/// Database failures.
pub async fn stranded_sites(tx: &mut Tx) -> OpResult<Vec<(SiteId, GatewayId)>> {
    let rows = sqlx::query(
        "SELECT t.site_id, t.gateway_id FROM tunnels t JOIN gateways g ON g.id = t.gateway_id \
         WHERE g.health = 'down' ORDER BY t.site_id LIMIT 1000",
    )
    .fetch_all(&mut *tx.inner)
    .await?;
    rows.iter()
        .map(|r| {
            Ok((
                SiteId(u64_of(col(r, "site_id")?)),
                GatewayId(u64_of(col(r, "gateway_id")?)),
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

/// Open requests past their expiry.
///
/// # Errors
/// Database failures.
pub async fn due_requests(tx: &mut Tx, now: i64) -> OpResult<Vec<RequestId>> {
    let rows = sqlx::query(
        "SELECT id FROM requests WHERE state IN ('waiting', 'in_progress') AND expires_at <= $1 \
         ORDER BY id LIMIT 500",
    )
    .bind(now)
    .fetch_all(&mut *tx.inner)
    .await?;
    rows.iter()
        .map(|r| Ok(RequestId(u64_of(col(r, "id")?))))
        .collect()
}

// ---------------------------------------------------------------- technicians

/// Adds a technician (or replaces the password of an existing one).
///
/// # Errors
/// Database failures.
pub async fn upsert_technician(
    tx: &mut Tx,
    name: &str,
    password_hash: &str,
    actor: &str,
    now: i64,
) -> OpResult<()> {
    sqlx::query(
        "INSERT INTO technicians (name, password_hash, created_at) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO UPDATE SET password_hash = excluded.password_hash",
    )
    .bind(name)
    .bind(password_hash)
    .bind(now)
    .execute(&mut *tx.inner)
    .await?;
    tx.audit(
        now,
        actor,
        "technician.set",
        &format!("technician:{name}"),
        "",
    )
    .await?;
    Ok(())
}
