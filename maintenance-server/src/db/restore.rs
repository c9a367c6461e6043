//! After a restore: moving every desired-state version past what the
//! programs have seen.

use super::error::OpResult;
use super::{DbKind, Tx};

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
