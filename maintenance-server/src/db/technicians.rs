//! Technicians and their console sessions.

use sqlx::AnyConnection;

use super::error::{OpError, OpResult};
use super::{DbResult, Tx, col};

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
    // A new password ends every session opened with the old one.
    let ended = end_sessions(tx, name).await?;
    tx.audit(
        now,
        actor,
        "technician.set",
        &format!("technician:{name}"),
        &format!("{ended} session(s) ended"),
    )
    .await?;
    Ok(())
}

/// Deletes every session of technician `name`; returns how many.
async fn end_sessions(tx: &mut Tx, name: &str) -> OpResult<u64> {
    let r = sqlx::query(
        "DELETE FROM technician_sessions WHERE technician_id IN (SELECT id FROM technicians WHERE name = $1)",
    )
    .bind(name)
    .execute(&mut *tx.inner)
    .await?;
    Ok(r.rows_affected())
}

/// Disables (or enables again) a technician: disabled, the login is refused
/// and every session ends at once.
///
/// # Errors
/// `NotFound`.
pub async fn set_technician_disabled(
    tx: &mut Tx,
    name: &str,
    disabled: bool,
    actor: &str,
    now: i64,
) -> OpResult<()> {
    let r = sqlx::query("UPDATE technicians SET disabled = $1 WHERE name = $2")
        .bind(i64::from(disabled))
        .bind(name)
        .execute(&mut *tx.inner)
        .await?;
    if r.rows_affected() == 0 {
        return Err(OpError::NotFound("technician"));
    }
    let detail = if disabled {
        format!("{} session(s) ended", end_sessions(tx, name).await?)
    } else {
        String::new()
    };
    let action = if disabled {
        "technician.disable"
    } else {
        "technician.enable"
    };
    tx.audit(now, actor, action, &format!("technician:{name}"), &detail)
        .await?;
    Ok(())
}

/// Deletes a technician and its sessions (the audit log keeps its actions).
///
/// # Errors
/// `NotFound`.
pub async fn delete_technician(tx: &mut Tx, name: &str, actor: &str, now: i64) -> OpResult<()> {
    end_sessions(tx, name).await?;
    let r = sqlx::query("DELETE FROM technicians WHERE name = $1")
        .bind(name)
        .execute(&mut *tx.inner)
        .await?;
    if r.rows_affected() == 0 {
        return Err(OpError::NotFound("technician"));
    }
    tx.audit(
        now,
        actor,
        "technician.delete",
        &format!("technician:{name}"),
        "",
    )
    .await?;
    Ok(())
}

/// A technician's id and password hash, by login name.
///
/// # Errors
/// Database failures.
pub async fn password_of(conn: &mut AnyConnection, name: &str) -> DbResult<Option<(i64, String)>> {
    // A disabled technician is not found: its login fails like an unknown name.
    let row =
        sqlx::query("SELECT id, password_hash FROM technicians WHERE name = $1 AND disabled = 0")
            .bind(name)
            .fetch_optional(&mut *conn)
            .await?;
    row.map(|r| Ok((col(&r, "id")?, col(&r, "password_hash")?)))
        .transpose()
}

/// A console session after a successful login: only the hashes of its
/// cookie and CSRF token are stored.
#[derive(Debug, Clone, Copy)]
pub struct NewSession<'a> {
    /// The technician.
    pub technician_id: i64,
    /// SHA-256 of the session cookie.
    pub token_hash: &'a str,
    /// SHA-256 of the CSRF token.
    pub csrf_hash: &'a str,
    /// When the session ends, ms since the epoch.
    pub expires_at: i64,
}

/// Stores a session and records the login.
///
/// # Errors
/// Database failures.
pub async fn open_session(
    tx: &mut Tx,
    session: NewSession<'_>,
    actor: &str,
    now: i64,
) -> OpResult<()> {
    sqlx::query(
        "INSERT INTO technician_sessions (token_hash, technician_id, csrf_hash, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(session.token_hash)
    .bind(session.technician_id)
    .bind(session.csrf_hash)
    .bind(now)
    .bind(session.expires_at)
    .execute(&mut *tx.inner)
    .await?;
    tx.audit(now, actor, "technician.login", actor, "").await?;
    Ok(())
}

/// Records a refused sign-in: `name` as typed (it may name no technician),
/// `client` the address it came from.
///
/// # Errors
/// Database failures.
pub async fn record_failed_login(tx: &mut Tx, name: &str, client: &str, now: i64) -> OpResult<()> {
    tx.audit(
        now,
        &format!("client:{client}"),
        "technician.login_failed",
        &format!("technician:{name}"),
        "wrong name or password",
    )
    .await?;
    Ok(())
}

/// Ends a session (logout) and records it.
///
/// # Errors
/// Database failures.
pub async fn close_session(tx: &mut Tx, token_hash: &str, actor: &str, now: i64) -> OpResult<()> {
    sqlx::query("DELETE FROM technician_sessions WHERE token_hash = $1")
        .bind(token_hash)
        .execute(&mut *tx.inner)
        .await?;
    tx.audit(now, actor, "technician.logout", actor, "").await?;
    Ok(())
}

/// Deletes the sessions that ended by `now`.
///
/// # Errors
/// Database failures.
pub async fn delete_expired_sessions(tx: &mut Tx, now: i64) -> OpResult<()> {
    sqlx::query("DELETE FROM technician_sessions WHERE expires_at <= $1")
        .bind(now)
        .execute(&mut *tx.inner)
        .await?;
    Ok(())
}
