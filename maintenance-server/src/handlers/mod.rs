//! The HTTP handlers, by caller (agent, gateway, operator, technician, and
//! the unauthenticated rest), and the small helpers they share: long-polls,
//! query parameters, and running reads and write transactions. The routes
//! that lead to them are in [`crate::routes`].

pub mod agent;
pub mod agentless;
pub mod gateway;
pub mod lifecycle;
pub mod misc;
pub mod operator;
pub mod rotation;
pub mod teams;
pub mod technician;

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use axum::http::StatusCode;
use sqlx::AnyConnection;
use vpnnat::messages::AppliedState;

use crate::db::{DbError, DbResult, Retryable, Tx};
use crate::error::AppError;
use crate::notify::Topic;
use crate::state::AppState;

/// The longest a long-poll is held.
pub const MAX_WAIT_MS: u64 = 60_000;

/// `after` and `wait_ms` of a long-poll.
#[derive(Debug, Clone, Copy)]
pub struct PollParams {
    /// Answer as soon as the version exceeds this.
    pub after: u64,
    /// Wait at most this long (capped at [`MAX_WAIT_MS`]).
    pub wait_ms: u64,
}

/// Parses `?after=V&wait_ms=N` (both optional, default 0).
///
/// # Errors
/// 400 naming the parameter.
pub fn poll_params(q: &HashMap<String, String>) -> Result<PollParams, AppError> {
    Ok(PollParams {
        after: query_u64(q, "after")?.unwrap_or(0),
        wait_ms: query_u64(q, "wait_ms")?.unwrap_or(0).min(MAX_WAIT_MS),
    })
}

/// An optional non-negative integer query parameter.
///
/// # Errors
/// 400 naming the parameter.
pub fn query_u64(q: &HashMap<String, String>, name: &str) -> Result<Option<u64>, AppError> {
    q.get(name)
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                AppError::field(
                    StatusCode::BAD_REQUEST,
                    name,
                    format!("{name}: expected a non-negative integer"),
                )
            })
        })
        .transpose()
}

/// The `limit` query parameter: `default` when absent, else clamped to `1..=max`.
///
/// # Errors
/// 400 naming `limit`.
pub fn limit_param(q: &HashMap<String, String>, default: u32, max: u32) -> Result<u32, AppError> {
    let limit = query_u64(q, "limit")?.map_or(default, |l| {
        u32::try_from(l.clamp(1, u64::from(max))).unwrap_or(max)
    });
    Ok(limit)
}

/// Rejects unknown query parameters.
///
/// # Errors
/// 400 naming the parameter.
pub fn only_params(q: &HashMap<String, String>, allowed: &[&str]) -> Result<(), AppError> {
    match q.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(AppError::field(
            StatusCode::BAD_REQUEST,
            k,
            format!("unknown query parameter {k:?}"),
        )),
        None => Ok(()),
    }
}

/// A document with a version.
pub trait Versioned {
    /// Its version.
    fn version(&self) -> u64;
}

impl Versioned for vpnnat::messages::AgentDesiredState {
    fn version(&self) -> u64 {
        self.version
    }
}

impl Versioned for vpnnat::messages::GatewayDesiredState {
    fn version(&self) -> u64 {
        self.version
    }
}

impl Versioned for vpnnat::messages::ConsoleEvents {
    fn version(&self) -> u64 {
        self.version
    }
}

/// Answers with `load`'s document as soon as its version exceeds
/// `params.after`, or after `params.wait_ms` (or at shutdown) with whatever
/// it is then. The subscription is taken before each read, so a change
/// committed between the read and the wait is not missed.
///
/// # Errors
/// Whatever `load` fails with.
pub async fn long_poll<T, E, F, Fut>(
    state: &AppState,
    topic: Topic,
    params: PollParams,
    mut load: F,
) -> Result<T, E>
where
    T: Versioned,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_millis(params.wait_ms);
    let _waiting = state.notifier.waiting_guard();
    let mut shutdown = state.shutdown.clone();
    loop {
        let mut rx = state.notifier.subscribe(topic);
        let doc = load().await?;
        if doc.version() > params.after
            || tokio::time::Instant::now() >= deadline
            || *shutdown.borrow()
        {
            return Ok(doc);
        }
        tokio::select! {
            _ = rx.changed() => {}
            () = tokio::time::sleep_until(deadline) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// A reader connection.
///
/// # Errors
/// When none can be had.
pub async fn reader(state: &AppState) -> DbResult<sqlx::pool::PoolConnection<sqlx::Any>> {
    Ok(state.db.reader().acquire().await?)
}

/// Runs `f` in a write transaction and commits it (announcing its changes),
/// running it again when it loses a deadlock or serialization race
/// ([`crate::db::Database::transaction`]). The error stays `f`'s own type (an
/// [`crate::db::OpError`] or a [`DbError`]); handlers turn it into an HTTP answer.
///
/// # Errors
/// `f`'s error (then nothing is committed) or a failed commit.
pub async fn write<T, E>(
    state: &AppState,
    f: impl AsyncFnOnce(&mut Tx) -> Result<T, E> + Clone,
) -> Result<T, E>
where
    E: From<DbError> + Retryable,
{
    state.db.transaction(&state.notifier, f).await
}

/// Runs `f` on a reader connection.
///
/// # Errors
/// Database failures.
pub async fn read<T>(
    state: &AppState,
    f: impl AsyncFnOnce(&mut AnyConnection) -> DbResult<T>,
) -> DbResult<T> {
    let mut conn = reader(state).await?;
    f(&mut conn).await
}

/// Parses a `{id}` path segment.
///
/// # Errors
/// 400 naming `id`.
pub fn path_id(raw: &str) -> Result<u64, AppError> {
    raw.parse::<u64>().ok().filter(|v| *v > 0).ok_or_else(|| {
        AppError::field(
            StatusCode::BAD_REQUEST,
            "id",
            "id: expected a positive integer",
        )
    })
}

/// Bounds on an applied-state report.
///
/// # Errors
/// 422 naming `errors`.
pub fn check_applied(a: &AppliedState) -> Result<(), AppError> {
    if a.errors.len() > 1000 || a.errors.iter().any(|e| e.len() > 1000) {
        return Err(AppError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "errors",
            "errors: at most 1000 messages of 1000 bytes",
        ));
    }
    if a.version > i64::MAX as u64 {
        return Err(AppError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "version",
            "version: out of range",
        ));
    }
    Ok(())
}
