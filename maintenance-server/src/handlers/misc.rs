//! Health, metrics and the JSON 404.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::json;

use super::read;
use crate::db::views;
use crate::error::AppError;
use crate::state::AppState;

/// `GET /healthz`: the process serves and its database answers.
pub async fn health(State(state): State<AppState>) -> Result<impl IntoResponse, AppError> {
    read(&state, async |c| views::console_version(c).await).await?;
    Ok(Json(json!({ "status": "ok" })))
}

/// `GET /metrics`
pub async fn metrics(State(state): State<AppState>) -> Result<impl IntoResponse, AppError> {
    let counts = read(&state, async |c| views::counts(c).await).await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(&counts, state.notifier.waiting()),
    ))
}

/// Unknown routes.
pub async fn not_found() -> AppError {
    AppError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}
