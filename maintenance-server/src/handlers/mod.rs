//! The HTTP API: routes (`vpnnat::messages::paths`), long-polls, and the
//! small helpers handlers share.

pub mod agent;
pub mod gateway;
pub mod misc;
pub mod operator;
pub mod technician;

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post};
use sqlx::AnyConnection;
use tower_http::trace::TraceLayer;
use vpnnat::messages::paths;

use crate::AppState;
use crate::db::{DbResult, Tx};
use crate::error::AppError;
use crate::notify::Topic;

/// The longest a long-poll is held.
pub const MAX_WAIT_MS: u64 = 60_000;

/// All routes.
pub fn router(state: AppState) -> Router {
    let limit = state.settings.http.body_limit_bytes;
    Router::new()
        .route(paths::ENROLL, post(agent::enroll))
        .route(paths::AGENT_REQUESTS, post(agent::create).get(agent::list))
        .route(paths::AGENT_REVOKE, post(agent::revoke))
        .route(paths::AGENT_FAILURES, post(agent::failure))
        .route(paths::AGENT_STATE, get(agent::state))
        .route(paths::AGENT_APPLIED, post(agent::applied))
        .route(paths::GATEWAY_REGISTER, post(gateway::register))
        .route(paths::GATEWAY_HEARTBEAT, post(gateway::heartbeat))
        .route(paths::GATEWAY_STATE, get(gateway::state))
        .route(paths::GATEWAY_APPLIED, post(gateway::applied))
        .route(
            paths::SITES,
            post(operator::create_site).get(operator::sites),
        )
        .route(paths::SITE_TOKEN, post(operator::site_token))
        .route(
            paths::GATEWAYS,
            post(operator::create_gateway).get(operator::gateways),
        )
        .route(paths::GATEWAY_DRAIN, post(operator::drain))
        .route(paths::LOGIN, post(technician::login))
        .route(paths::LOGOUT, post(technician::logout))
        .route(paths::REQUESTS, get(technician::requests))
        .route(paths::REQUEST_START, post(technician::start))
        .route(paths::REQUEST_END, post(technician::end))
        .route(paths::FAILURES, get(technician::failures))
        .route(paths::AUDIT, get(technician::audit))
        .route(paths::CONSOLE_EVENTS, get(technician::events))
        .route(technician::ME, get(technician::me))
        .route(paths::OPENAPI, get(misc::openapi))
        .route(paths::HEALTH, get(misc::health))
        .route(paths::METRICS, get(misc::metrics))
        .merge(crate::console::routes())
        .fallback(misc::not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<_>| {
                // Low cardinality: the matched route, not the raw path.
                let route = req
                    .extensions()
                    .get::<axum::extract::MatchedPath>()
                    .map_or("-", axum::extract::MatchedPath::as_str)
                    .to_owned();
                tracing::debug_span!("http", method = %req.method(), route)
            }),
        )
        .with_state(state)
}

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
pub async fn long_poll<T, F, Fut>(
    state: &AppState,
    topic: Topic,
    params: PollParams,
    mut load: F,
) -> Result<T, AppError>
where
    T: Versioned,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, AppError>>,
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
pub async fn reader(state: &AppState) -> Result<sqlx::pool::PoolConnection<sqlx::Any>, AppError> {
    state
        .db
        .reader()
        .acquire()
        .await
        .map_err(AppError::internal)
}

/// Runs `f` in a write transaction and commits it (announcing its changes).
///
/// # Errors
/// `f`'s error (then nothing is committed) or a failed commit.
pub async fn write<T, E>(
    state: &AppState,
    f: impl AsyncFnOnce(&mut Tx) -> Result<T, E>,
) -> Result<T, AppError>
where
    AppError: From<E>,
{
    let mut tx = state.db.begin().await?;
    let out = f(&mut tx).await?;
    tx.commit(&state.notifier).await?;
    Ok(out)
}

/// Convenience for reads that map `DbError` to `AppError`.
///
/// # Errors
/// Database failures.
pub async fn read<T>(
    state: &AppState,
    f: impl AsyncFnOnce(&mut AnyConnection) -> DbResult<T>,
) -> Result<T, AppError> {
    let mut conn = reader(state).await?;
    Ok(f(&mut conn).await?)
}
