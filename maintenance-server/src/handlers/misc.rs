//! Health, metrics and the JSON 404.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::json;

use vpnnat_shell::metrics::CONTENT_TYPE as METRICS_CONTENT_TYPE;

use super::read;
use crate::auth::MetricsAuth;
use crate::db::views;
use crate::error::AppError;
use crate::state::AppState;

/// `GET /healthz`: the process serves and its database answers.
pub async fn health(State(state): State<AppState>) -> Result<impl IntoResponse, AppError> {
    read(&state, async |c| views::console_version(c).await).await?;
    Ok(Json(json!({ "status": "ok" })))
}

/// `GET /metrics` (operator or metrics token)
pub async fn metrics(
    State(state): State<AppState>,
    _auth: MetricsAuth,
) -> Result<impl IntoResponse, AppError> {
    let pool_size = state.settings.pool_prefix().map_or(0, |p| {
        let hosts = p.hosts();
        i64::from(u32::from(*hosts.end())) - i64::from(u32::from(*hosts.start())) + 1
    });
    let counts = read(&state, async |c| crate::metrics::counts(c, pool_size).await).await?;
    Ok((
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        crate::metrics::render(
            &counts,
            state.notifier.waiting(),
            &state.password_checks.counts(),
            &state.webhook_stats,
        ),
    ))
}

/// Unknown routes.
pub async fn not_found() -> AppError {
    AppError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}
