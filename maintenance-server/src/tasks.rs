//! Background work of every replica: lease expiry, gateway failover and
//! session cleanup. Each change runs in its own transaction with a
//! conditional update, so several replicas doing the same work at once is
//! harmless (one wins, the others find nothing to do).

use std::time::Duration;

use tokio::sync::watch;
use vpnnat::messages::RequestState;

use crate::db::now_ms;
use crate::db::ops::{self, OpError};
use crate::state::AppState;

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
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_cleanup = 0i64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = expire(&state).await {
            tracing::warn!(error = %e, "lease expiry");
        }
        if let Err(e) = failover(&state).await {
            tracing::warn!(error = %e, "gateway failover");
        }
        let now = now_ms();
        if now - last_cleanup > 60_000 {
            last_cleanup = now;
            if let Err(e) = cleanup(&state, now).await {
                tracing::warn!(error = %e, "session cleanup");
            }
        }
    }
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
        let mut tx = state.db.begin().await?;
        match ops::close_request(&mut tx, id, RequestState::Expired, None, "system", now).await {
            Ok(()) => {
                tx.commit(&state.notifier).await?;
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

/// Marks gateways without heartbeats down and moves their sites.
///
/// # Errors
/// Database failures.
pub async fn failover(state: &AppState) -> Result<(), OpError> {
    let now = now_ms();
    let mut tx = state.db.begin().await?;
    let down = ops::mark_down(&mut tx, now - state.policy.down_after_ms, now).await?;
    tx.commit(&state.notifier).await?;
    for gw in &down {
        tracing::warn!(gateway.id = %gw, "gateway missed its heartbeats: marked down");
    }
    let mut tx = state.db.begin().await?;
    let stranded = ops::stranded_sites(&mut tx).await?;
    drop(tx);
    for (site, from) in stranded {
        let mut tx = state.db.begin().await?;
        match ops::failover_site(&mut tx, site, from, now).await {
            Ok(moved) => {
                tx.commit(&state.notifier).await?;
                if moved {
                    tracing::info!(site.id = %site, from = %from, "site moved off a down gateway");
                }
            }
            Err(OpError::NoCapacity) => {
                drop(tx);
                let mut tx = state.db.begin().await?;
                ops::set_problem(
                    &mut tx,
                    site,
                    "the gateway of this site is down and no other gateway has a free slot",
                )
                .await?;
                tx.commit(&state.notifier).await?;
                // The others will not fit either.
                break;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn cleanup(state: &AppState, now: i64) -> Result<(), OpError> {
    let mut tx = state.db.begin().await?;
    ops::delete_expired_sessions(&mut tx, now).await?;
    tx.commit(&state.notifier).await?;
    Ok(())
}
