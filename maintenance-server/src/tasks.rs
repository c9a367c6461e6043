//! Background work of every replica: lease expiry, gateway failover,
//! session cleanup, retention of failure reports and audit rows, the
//! coalesced console wake-up for failure reports and the pool-usage
//! warning. Each change runs in its own transaction with a conditional
//! update, so several replicas doing the same work at once is harmless (one
//! wins, the others find nothing to do).

use std::time::Duration;

use tokio::sync::watch;
use vpnnat::messages::RequestState;

use crate::db::ops::{self, OpError};
use crate::db::{Tx, now_ms};
use crate::state::AppState;

/// How often pool usage is checked against `pool.usage_warn_percent`.
const POOL_CHECK_MS: i64 = 10_000;

/// Runs until `shutdown` turns true.
pub async fn run(state: AppState, mut shutdown: watch::Receiver<bool>) {
    let period = Duration::from_millis(
        state
            .settings
            .maintenance
            .expiry_check_ms
            .min(state.settings.gateways.heartbeat_interval_ms)
            .clamp(50, 60_000),
    );
    // After a restart (maybe after an outage of this server or of its
    // database) every heartbeat is old: give the gateways one
    // `down_after_ms` to reach us before any is marked down.
    let started = tokio::time::Instant::now();
    let grace = Duration::from_millis(state.settings.gateways.down_after_ms);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_cleanup = 0i64;
    let mut last_pool_check = 0i64;
    let mut pool_warned = false;
    // Ages are checked a few times per shortest period, at most once a minute.
    let rotation_check_ms = {
        use crate::settings::Rotation;
        let r = &state.settings.rotation;
        [r.site_key_days, r.site_credential_days, r.gateway_key_days]
            .into_iter()
            .map(Rotation::period_ms)
            .filter(|p| *p > 0)
            .map(|p| (p / 4).clamp(100, 60_000))
            .min()
            .unwrap_or(60_000)
    };
    let mut last_rotation_check = 0i64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = expire(&state).await {
            tracing::warn!(error = %e, "lease expiry");
        }
        if let Err(e) = warn_expiring(&state).await {
            tracing::warn!(error = %e, "expiry warnings");
        }
        if let Err(e) = failover(&state, started.elapsed() >= grace).await {
            tracing::warn!(error = %e, "gateway failover");
        }
        if now_ms() - last_rotation_check >= rotation_check_ms {
            last_rotation_check = now_ms();
            if let Err(e) = schedule_rotations(&state).await {
                tracing::warn!(error = %e, "scheduled rotations");
            }
        }
        if state.notifier.take_console_pending()
            && let Err(e) = state
                .db
                .transaction(&state.notifier, async |tx: &mut Tx| {
                    tx.touch_console();
                    Ok::<_, OpError>(())
                })
                .await
        {
            state.notifier.defer_console();
            tracing::warn!(error = %e, "console wake-up");
        }
        let now = now_ms();
        if now - last_pool_check >= POOL_CHECK_MS {
            last_pool_check = now;
            match check_pool(&state, pool_warned).await {
                Ok(w) => pool_warned = w,
                Err(e) => tracing::warn!(error = %e, "pool usage"),
            }
        }
        if now - last_cleanup > 60_000 {
            last_cleanup = now;
            if let Err(e) = cleanup(&state, now).await {
                tracing::warn!(error = %e, "cleanup");
            }
        }
    }
}

/// Asks the agents of sites whose key or credential, and the gateways
/// whose own key, is older than `[rotation]` allows for a planned
/// rotation. Returns how many sites and gateways were asked.
///
/// # Errors
/// Database failures.
pub async fn schedule_rotations(state: &AppState) -> Result<usize, OpError> {
    use crate::settings::Rotation;
    let r = &state.settings.rotation;
    let key_ms = Rotation::period_ms(r.site_key_days);
    let credential_ms = Rotation::period_ms(r.site_credential_days);
    let gateway_ms = Rotation::period_ms(r.gateway_key_days);
    let now = now_ms();
    let mut n = 0;
    if key_ms > 0 || credential_ms > 0 {
        let sites = state
            .db
            .transaction(&state.notifier, async |tx: &mut Tx| {
                crate::db::rotation::schedule(tx, now, key_ms, credential_ms).await
            })
            .await?;
        if sites > 0 {
            tracing::info!(sites, "planned rotations requested by the schedule");
        }
        n += sites;
    }
    if gateway_ms > 0 {
        let (gateways, held_back) = state
            .db
            .transaction(&state.notifier, async |tx: &mut Tx| {
                let asked = ops::schedule_key_rotations(tx, now, gateway_ms).await?;
                Ok::<_, OpError>((asked, ops::wireguard_sites_without_agent(tx).await?))
            })
            .await?;
        if gateways > 0 {
            tracing::info!(gateways, "gateway key rotations requested by the schedule");
        }
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if held_back > 0 && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                sites = held_back,
                "[rotation] gateway_key_days: gateway keys are not rotated by the schedule while \
                 WireGuard sites without an agent exist (their routers cannot follow); rotate \
                 with `gateway rotate-key ID` and apply those sites' new files"
            );
        }
        n += gateways;
    }
    Ok(n)
}

/// Expires every open request past its `expires_at`.
///
/// # Errors
/// Database failures.
pub async fn expire(state: &AppState) -> Result<usize, OpError> {
    let now = now_ms();
    let mut tx = state.db.begin().await?;
    let due = ops::due_requests(&mut tx, now).await?;
    drop(tx);
    let mut n = 0;
    for id in due {
        let r = state
            .db
            .transaction(&state.notifier, async |tx| {
                ops::close_request(tx, id, RequestState::Expired, None, "system", now).await
            })
            .await;
        match r {
            Ok(()) => {
                tracing::info!(request.id = %id, "maintenance request expired");
                n += 1;
            }
            // Ended meanwhile (by a technician or another replica).
            Err(OpError::InvalidState(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Announces, once, every open request that reaches
/// `[notifications] expiry_warning_s` before its expiry: the console shows
/// it (and notifies the technicians' browsers), the webhooks get
/// `request.expiring`. Returns how many were announced.
///
/// # Errors
/// Database failures.
pub async fn warn_expiring(state: &AppState) -> Result<usize, OpError> {
    let window = state.policy.expiry_warning_ms;
    if window <= 0 {
        return Ok(0);
    }
    let now = now_ms();
    let mut tx = state.db.begin().await?;
    let due = ops::expiring_requests(&mut tx, now, window).await?;
    drop(tx);
    let routes = &state.policy.webhooks;
    let mut n = 0;
    for id in due {
        let announced = state
            .db
            .transaction(&state.notifier, async |tx| {
                if !ops::mark_expiry_warned(tx, id, now).await? {
                    // Ended, or announced by another replica meanwhile.
                    return Ok::<_, OpError>(false);
                }
                let view = crate::db::views::request(&mut tx.inner, id).await?;
                crate::webhooks::request_expiring(tx, routes, &view, now).await?;
                Ok(true)
            })
            .await?;
        if announced {
            tracing::info!(request.id = %id, "maintenance request nears its expiry");
            n += 1;
        }
    }
    Ok(n)
}

/// Marks gateways without heartbeats down (when `mark_down`: not in the
/// grace period after a start) and moves the sites of down gateways. When
/// no gateway has a free slot, every stranded site is told so (its page
/// through its desired state, the console through a failure report).
///
/// # Errors
/// Database failures.
pub async fn failover(state: &AppState, mark_down: bool) -> Result<(), OpError> {
    let now = now_ms();
    if mark_down {
        let down_after = state.policy.down_after_ms;
        let down = state
            .db
            .transaction(&state.notifier, async |tx| {
                ops::mark_down(tx, down_after, now).await
            })
            .await?;
        for gw in &down {
            tracing::warn!(gateway.id = %gw, "gateway missed its heartbeats: marked down");
        }
    }
    let mut tx = state.db.begin().await?;
    let stranded = ops::stranded_sites(&mut tx).await?;
    drop(tx);
    // Once no gateway of a kind had a slot, the remaining sites of that kind
    // in this round are stranded too (no slot is tried for each); the next
    // tick tries again.
    let mut full = std::collections::BTreeSet::new();
    for (site, from, told, kind) in stranded {
        if !full.contains(&kind) {
            let r = state
                .db
                .transaction(&state.notifier, async |tx| {
                    ops::failover_site(tx, site, from, now).await
                })
                .await;
            match r {
                Ok(moved) => {
                    if moved {
                        tracing::info!(site.id = %site, from = %from, "site moved off a down gateway");
                    }
                    continue;
                }
                Err(OpError::NoCapacity(k)) => {
                    full.insert(k);
                }
                Err(e) => return Err(e),
            }
        }
        if told {
            // Told on an earlier tick: nothing to write until it moves.
            continue;
        }
        let first = state
            .db
            .transaction(&state.notifier, async |tx| {
                ops::strand_site(tx, site, from, now).await
            })
            .await?;
        if first {
            tracing::warn!(site.id = %site, from = %from, "site stranded: its gateway is down and no other has a free slot");
        }
    }
    Ok(())
}

/// Logs a WARN when the share of held pool addresses reaches
/// `pool.usage_warn_percent` (`warned`: it was logged already); returns
/// whether usage is at or above it.
async fn check_pool(state: &AppState, warned: bool) -> Result<bool, OpError> {
    let mut conn = state
        .db
        .reader()
        .acquire()
        .await
        .map_err(crate::db::DbError::from)?;
    let (used, total) = crate::db::views::pool_usage(&mut conn).await?;
    let threshold = i64::from(state.settings.pool.usage_warn_percent);
    let high = total > 0 && used * 100 >= total * threshold;
    if high && !warned {
        tracing::warn!(
            used,
            total,
            threshold_percent = threshold,
            "NAT-address pool usage reached the warning threshold (pool.usage_warn_percent)"
        );
    } else if !high && warned {
        tracing::info!(
            used,
            total,
            "NAT-address pool usage is below the warning threshold again"
        );
    }
    Ok(high)
}

async fn cleanup(state: &AppState, now: i64) -> Result<(), OpError> {
    let retention = state.settings.retention.clone();
    state
        .db
        .transaction(&state.notifier, async |tx| {
            ops::delete_expired_sessions(tx, now).await?;
            ops::apply_retention(tx, now, &retention).await
        })
        .await
}
