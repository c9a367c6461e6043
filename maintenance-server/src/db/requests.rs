//! Maintenance requests and failure reports: opening, starting, closing
//! and expiring requests; storing failures and linking them to requests.

use std::net::{IpAddr, Ipv4Addr};

use vpnnat::messages::{
    FailureReport, MaintenanceRequestView, NewMaintenanceRequest, RequestId, RequestState, SiteId,
    TerminalAssignment, Transport, UnixMillis,
};

use super::addresses::{address_for, held_by, release};
use super::agentless::{check_origin, lan_column};
use super::error::{OpError, OpResult};
use super::policy::Policy;
use super::tunnels::{ensure_tunnel, release_slot, site_gateway};
use super::views::{acceptance_number, addr_to_i64, enum_parse, enum_str};
use super::{Tx, col, id64, ids_of, u64_of};
use crate::settings::{Quotas, Retention};
use sqlx::Row as _;

/// Where a new request comes from.
#[derive(Debug, Clone)]
pub struct Origin {
    /// Audit actor.
    pub actor: String,
    /// The global address the request came from.
    pub global_address: Option<IpAddr>,
    /// The failure report that caused it.
    pub failure_id: Option<u64>,
    /// The terminals' LAN addresses, in their order: only for a site
    /// without an agent, whose requests a technician opens on the
    /// customer's behalf (empty for an agent's request).
    pub lan_addresses: Vec<Ipv4Addr>,
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
    check_origin(tx, site, &req.terminals, &origin.lan_addresses).await?;
    // Under the site's lock: concurrent requests of one site are counted exactly.
    check_request_quotas(tx, site, now, &policy.quotas).await?;
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
        let addr = address_for(tx, site, terminal, now).await?;
        sqlx::query(
            "INSERT INTO request_terminals (request_id, position, terminal, nat_address, lan_address) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id64(id.0))
        .bind(i64::try_from(pos).unwrap_or(0))
        .bind(terminal.as_str())
        .bind(addr_to_i64(addr))
        .bind(lan_column(&origin.lan_addresses, pos))
        .execute(&mut *tx.inner)
        .await?;
        assigned.push(format!("{terminal}={addr}"));
        terminals.push(TerminalAssignment {
            name: terminal.clone(),
            nat_address: Some(addr),
        });
    }
    let held = held_by(tx, site).await?;
    if held > i64::from(policy.quotas.terminals_per_site) {
        return Err(OpError::Quota {
            field: "terminals",
            message: format!(
                "this site would hold {held} NAT addresses; at most {} (terminals_per_site) are allowed at once: end a request first",
                policy.quotas.terminals_per_site
            ),
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
    let carried = sqlx::query(
        "SELECT s.tunnel, t.transport FROM sites s LEFT JOIN tunnels t ON t.site_id = s.id \
         WHERE s.id = $1",
    )
    .bind(id64(site.0))
    .fetch_one(&mut *tx.inner)
    .await?;
    Ok(MaintenanceRequestView {
        id,
        acceptance_number: acceptance_number(id, now),
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
        tunnel: enum_parse(&col::<String>(&carried, "tunnel")?)?,
        transport: col::<Option<String>>(&carried, "transport")?
            .and_then(|t| enum_parse::<Transport>(&t).ok()),
        technician: None,
        expiry_warned_at: None,
    })
}

/// How many rows `count_sql` (parameters: site, since) counts for `site`
/// in the last minute.
async fn count_last_minute(
    tx: &mut Tx,
    count_sql: &'static str,
    site: SiteId,
    now: i64,
) -> OpResult<i64> {
    let r = sqlx::query(count_sql)
        .bind(id64(site.0))
        .bind(now.saturating_sub(60_000))
        .fetch_one(&mut *tx.inner)
        .await?;
    Ok(r.try_get::<i64, _>(0)?)
}

/// The per-minute and open-request limits of `[quotas]`.
async fn check_request_quotas(
    tx: &mut Tx,
    site: SiteId,
    now: i64,
    quotas: &Quotas,
) -> OpResult<()> {
    let recent = count_last_minute(
        tx,
        "SELECT COUNT(*) FROM requests WHERE site_id = $1 AND received_at > $2",
        site,
        now,
    )
    .await?;
    if recent >= i64::from(quotas.requests_per_minute) {
        return Err(OpError::RateLimited(format!(
            "this site opened {recent} requests in the last minute; at most {} (requests_per_minute) are allowed: try again in a minute",
            quotas.requests_per_minute
        )));
    }
    let open = sqlx::query(
        "SELECT COUNT(*) FROM requests WHERE site_id = $1 AND state IN ('waiting', 'in_progress')",
    )
    .bind(id64(site.0))
    .fetch_one(&mut *tx.inner)
    .await?
    .try_get::<i64, _>(0)?;
    if open >= i64::from(quotas.open_requests_per_site) {
        return Err(OpError::Quota {
            field: "open_requests",
            message: format!(
                "this site has {open} open requests; at most {} (open_requests_per_site) are allowed: end one first",
                quotas.open_requests_per_site
            ),
        });
    }
    Ok(())
}

/// The site a request belongs to.
async fn request_site(tx: &mut Tx, id: RequestId) -> OpResult<SiteId> {
    let r = tx
        .row_by_id(
            "SELECT site_id FROM requests WHERE id = $1",
            id.0,
            "request",
        )
        .await?;
    Ok(SiteId(u64_of(col(&r, "site_id")?)))
}

/// A technician starts work: waiting → in progress. `technician` (the
/// name the console shows) is kept as who works on it, for the customer.
///
/// # Errors
/// `NotFound`; `InvalidState` unless waiting.
pub async fn start_request(
    tx: &mut Tx,
    id: RequestId,
    technician: &str,
    actor: &str,
    now: i64,
) -> OpResult<()> {
    let site = request_site(tx, id).await?;
    tx.lock_site(site).await?;
    let r = sqlx::query(
        "UPDATE requests SET state = 'in_progress', started_at = $1, started_by = $2 \
         WHERE id = $3 AND state = 'waiting'",
    )
    .bind(now)
    .bind(technician)
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
        if let Some(a) = release(tx, site, &terminal, now).await? {
            released.push(a);
        }
    }
    sqlx::query("UPDATE request_terminals SET nat_address = NULL WHERE request_id = $1")
        .bind(id64(id.0))
        .execute(&mut *tx.inner)
        .await?;
    let gw = site_gateway(tx, site).await?;
    let remaining = held_by(tx, site).await?;
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
    Ok(ids_of(&rows, "id", RequestId)?)
}

/// Open requests that expire within `window_ms` of `now` and were not
/// announced yet (oldest expiry first).
///
/// # Errors
/// Database failures.
pub async fn expiring_requests(tx: &mut Tx, now: i64, window_ms: i64) -> OpResult<Vec<RequestId>> {
    let rows = sqlx::query(
        "SELECT id FROM requests WHERE state IN ('waiting', 'in_progress') \
         AND expiry_warned_at IS NULL AND expires_at > $1 AND expires_at <= $2 \
         ORDER BY expires_at LIMIT 500",
    )
    .bind(now)
    .bind(now.saturating_add(window_ms))
    .fetch_all(&mut *tx.inner)
    .await?;
    Ok(ids_of(&rows, "id", RequestId)?)
}

/// Marks open request `id` as announced to near its expiry; false when it
/// is no longer open or was announced already. The console learns of it.
///
/// # Errors
/// Database failures.
pub async fn mark_expiry_warned(tx: &mut Tx, id: RequestId, now: i64) -> OpResult<bool> {
    let r = sqlx::query(
        "UPDATE requests SET expiry_warned_at = $1 WHERE id = $2 \
         AND expiry_warned_at IS NULL AND state IN ('waiting', 'in_progress')",
    )
    .bind(now)
    .bind(id64(id.0))
    .execute(&mut *tx.inner)
    .await?;
    if r.rows_affected() == 1 {
        tx.touch_console();
        return Ok(true);
    }
    Ok(false)
}

/// Stores a failure report: at most `failure_reports_per_minute` per site
/// (else `RateLimited`, nothing stored), keeping the newest
/// `failures_kept_per_site` of the site. The consoles learn of it at the
/// background task's next tick, together with the other reports of that
/// moment (see [`Tx::defer_console`]).
///
/// # Errors
/// `RateLimited`; database failures.
pub async fn store_failure(
    tx: &mut Tx,
    site: SiteId,
    report: &FailureReport,
    now: i64,
    quotas: &Quotas,
) -> OpResult<u64> {
    tx.lock_site(site).await?;
    let recent = count_last_minute(
        tx,
        "SELECT COUNT(*) FROM failures WHERE site_id = $1 AND received_at > $2",
        site,
        now,
    )
    .await?;
    if recent >= i64::from(quotas.failure_reports_per_minute) {
        return Err(OpError::RateLimited(format!(
            "this site sent {recent} failure reports in the last minute; at most {} (failure_reports_per_minute) are accepted: try again in a minute",
            quotas.failure_reports_per_minute
        )));
    }
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
    sqlx::query(
        "DELETE FROM failures WHERE site_id = $1 AND id <= (SELECT id FROM failures WHERE site_id = $1 \
         ORDER BY id DESC LIMIT 1 OFFSET $2)",
    )
    .bind(id64(site.0))
    .bind(i64::from(quotas.failures_kept_per_site))
    .execute(&mut *tx.inner)
    .await?;
    tx.audit(
        now,
        &format!("site:{site}"),
        "failure.report",
        &format!("failure:{id}"),
        &format!("{} {}", enum_str(&report.code), report.detail),
    )
    .await?;
    tx.defer_console();
    Ok(id)
}

/// Deletes failure reports and audit rows older than `[retention]` allows.
///
/// # Errors
/// Database failures.
pub async fn apply_retention(tx: &mut Tx, now: i64, retention: &Retention) -> OpResult<()> {
    const DAY_MS: i64 = 86_400_000;
    sqlx::query("DELETE FROM failures WHERE received_at < $1")
        .bind(now.saturating_sub(i64::from(retention.failure_days) * DAY_MS))
        .execute(&mut *tx.inner)
        .await?;
    // The database refuses to delete audit rows younger than 30 days.
    let audit_days = i64::from(retention.audit_days.max(31));
    sqlx::query("DELETE FROM audit_log WHERE at < $1")
        .bind(now.saturating_sub(audit_days * DAY_MS))
        .execute(&mut *tx.inner)
        .await?;
    Ok(())
}

/// A technician acknowledges a failure report: it is seen and taken on.
/// `technician` is the name the console shows.
///
/// # Errors
/// `NotFound`; `InvalidState` when it was acknowledged already.
pub async fn acknowledge_failure(
    tx: &mut Tx,
    id: u64,
    technician: &str,
    actor: &str,
    now: i64,
) -> OpResult<()> {
    let row = sqlx::query("SELECT acknowledged_by FROM failures WHERE id = $1")
        .bind(id64(id))
        .fetch_optional(&mut *tx.inner)
        .await?
        .ok_or(OpError::NotFound("failure report"))?;
    if let Some(by) = col::<Option<String>>(&row, "acknowledged_by")? {
        return Err(OpError::InvalidState(format!(
            "this failure report was acknowledged already, by {by}"
        )));
    }
    // The condition again: of two technicians at once, one wins.
    let r = sqlx::query(
        "UPDATE failures SET acknowledged_at = $1, acknowledged_by = $2 \
         WHERE id = $3 AND acknowledged_at IS NULL",
    )
    .bind(now)
    .bind(technician)
    .bind(id64(id))
    .execute(&mut *tx.inner)
    .await?;
    if r.rows_affected() == 0 {
        return Err(OpError::InvalidState(
            "this failure report was acknowledged already".into(),
        ));
    }
    tx.audit(
        now,
        actor,
        "failure.acknowledge",
        &format!("failure:{id}"),
        "",
    )
    .await?;
    Ok(())
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
