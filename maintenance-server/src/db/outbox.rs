//! The webhook outbox: what to deliver, to whom, and how far each delivery
//! got. Events are queued inside the transaction that makes them happen
//! (the transactional-outbox pattern), so a committed change always gets its
//! event and a rolled-back one never does. The workers of every replica
//! deliver them ([`crate::webhooks`]); a delivery is claimed with a
//! conditional update that also pushes its next attempt past the claim's
//! lease, so two replicas never send one attempt twice, and a replica that
//! dies mid-attempt leaves the delivery to be retried after the lease.

use sqlx::AnyConnection;

use super::{DbResult, Tx, col};

/// A receiver the events go to: its name (the key of its deliveries) and
/// the event types it takes (empty: all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `[[notifications.webhooks]] name`.
    pub name: String,
    /// `[[notifications.webhooks]] events`.
    pub events: Vec<String>,
}

impl Route {
    fn takes(&self, event_type: &str) -> bool {
        self.events.is_empty() || self.events.iter().any(|e| e == event_type)
    }
}

/// One event: its id (the same for every receiver and attempt, so a
/// receiver can drop repeats), type and JSON body.
#[derive(Debug, Clone)]
pub struct Event {
    /// `evt_` and 32 hex digits.
    pub id: String,
    /// `request.created`, …
    pub event_type: &'static str,
    /// The document posted.
    pub body: String,
}

/// Queues `event` for every route that takes it, due at once.
///
/// # Errors
/// Database failures.
pub async fn enqueue(tx: &mut Tx, routes: &[Route], event: &Event, now: i64) -> DbResult<()> {
    for r in routes.iter().filter(|r| r.takes(event.event_type)) {
        sqlx::query(
            "INSERT INTO webhook_deliveries (endpoint, event_id, event_type, body, created_at, next_attempt_at) \
             VALUES ($1, $2, $3, $4, $5, $5)",
        )
        .bind(&r.name)
        .bind(&event.id)
        .bind(event.event_type)
        .bind(&event.body)
        .bind(now)
        .execute(&mut *tx.inner)
        .await?;
        tx.changes.outbox = true;
    }
    Ok(())
}

/// A delivery that is due.
#[derive(Debug, Clone)]
pub struct Due {
    /// Its row.
    pub id: i64,
    /// The receiver's name.
    pub endpoint: String,
    /// The event's id.
    pub event_id: String,
    /// The event's type.
    pub event_type: String,
    /// The document.
    pub body: String,
    /// Attempts made so far.
    pub attempts: i64,
    /// When it became due (the claim checks that nobody moved it since).
    pub next_attempt_at: i64,
}

/// Up to `limit` deliveries due at `now`, oldest first.
///
/// # Errors
/// Database failures.
pub async fn due(conn: &mut AnyConnection, now: i64, limit: i64) -> DbResult<Vec<Due>> {
    let rows = sqlx::query(
        "SELECT id, endpoint, event_id, event_type, body, attempts, next_attempt_at \
         FROM webhook_deliveries \
         WHERE delivered_at IS NULL AND given_up_at IS NULL AND next_attempt_at <= $1 \
         ORDER BY next_attempt_at, id LIMIT $2",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Due {
                id: col(r, "id")?,
                endpoint: col(r, "endpoint")?,
                event_id: col(r, "event_id")?,
                event_type: col(r, "event_type")?,
                body: col(r, "body")?,
                attempts: col(r, "attempts")?,
                next_attempt_at: col(r, "next_attempt_at")?,
            })
        })
        .collect()
}

/// Claims `d` for one attempt: counts the attempt and moves its next one to
/// `lease_until`. False when another worker claimed it first.
///
/// # Errors
/// Database failures.
pub async fn claim(tx: &mut Tx, d: &Due, lease_until: i64) -> DbResult<bool> {
    let r = sqlx::query(
        "UPDATE webhook_deliveries SET attempts = attempts + 1, next_attempt_at = $1 \
         WHERE id = $2 AND next_attempt_at = $3 AND delivered_at IS NULL AND given_up_at IS NULL",
    )
    .bind(lease_until)
    .bind(d.id)
    .bind(d.next_attempt_at)
    .execute(&mut *tx.inner)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Records a successful attempt.
///
/// # Errors
/// Database failures.
pub async fn delivered(tx: &mut Tx, id: i64, now: i64) -> DbResult<()> {
    sqlx::query("UPDATE webhook_deliveries SET delivered_at = $1, last_error = NULL WHERE id = $2")
        .bind(now)
        .bind(id)
        .execute(&mut *tx.inner)
        .await?;
    Ok(())
}

/// Records a failed attempt: the next one at `retry_at`, or, when `None`,
/// the delivery is given up.
///
/// # Errors
/// Database failures.
pub async fn failed(
    tx: &mut Tx,
    id: i64,
    retry_at: Option<i64>,
    error: &str,
    now: i64,
) -> DbResult<()> {
    let error: String = error.chars().take(500).collect();
    match retry_at {
        Some(at) => {
            sqlx::query(
                "UPDATE webhook_deliveries SET next_attempt_at = $1, last_error = $2 WHERE id = $3",
            )
            .bind(at)
            .bind(error)
            .bind(id)
            .execute(&mut *tx.inner)
            .await?;
        }
        None => {
            sqlx::query(
                "UPDATE webhook_deliveries SET given_up_at = $1, last_error = $2 WHERE id = $3",
            )
            .bind(now)
            .bind(error)
            .bind(id)
            .execute(&mut *tx.inner)
            .await?;
        }
    }
    Ok(())
}

/// Deletes delivered and given-up deliveries older than `before`.
///
/// # Errors
/// Database failures.
pub async fn purge(tx: &mut Tx, before: i64) -> DbResult<u64> {
    let r = sqlx::query(
        "DELETE FROM webhook_deliveries WHERE created_at < $1 \
         AND (delivered_at IS NOT NULL OR given_up_at IS NOT NULL)",
    )
    .bind(before)
    .execute(&mut *tx.inner)
    .await?;
    Ok(r.rows_affected())
}

/// How many deliveries wait (not delivered, not given up).
///
/// # Errors
/// Database failures.
pub async fn pending(conn: &mut AnyConnection) -> DbResult<i64> {
    let r = sqlx::query(
        "SELECT COUNT(*) FROM webhook_deliveries WHERE delivered_at IS NULL AND given_up_at IS NULL",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(sqlx::Row::try_get::<i64, _>(&r, 0)?)
}
