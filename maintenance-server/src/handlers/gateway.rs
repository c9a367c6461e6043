//! Gateway endpoints, authenticated by the gateway credential.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use vpnnat::messages::{
    AppliedState, GatewayDesiredState, GatewayHeartbeat, GatewayRegistered, GatewayRegistration,
    HeartbeatAck,
};

use super::{check_applied, long_poll, only_params, poll_params, read, write};
use crate::auth::GatewayAuth;
use crate::db::{now_ms, ops, views};
use crate::error::{ApiJson, AppError};
use crate::notify::Topic;
use crate::state::AppState;

/// `POST /api/v1/gateway/register`
pub async fn register(
    State(state): State<AppState>,
    auth: GatewayAuth,
    ApiJson(body): ApiJson<GatewayRegistration>,
) -> Result<Json<GatewayRegistered>, AppError> {
    body.validate()?;
    let now = now_ms();
    let policy = state.policy.clone();
    let r = write(&state, async |tx| {
        ops::register_gateway(tx, auth.gateway, &body, now, &policy).await
    })
    .await?;
    tracing::info!(gateway.id = %auth.gateway, endpoints = ?body.endpoints, max_tunnels = body.max_tunnels, "gateway registered");
    Ok(Json(r))
}

/// `POST /api/v1/gateway/heartbeat`
pub async fn heartbeat(
    State(state): State<AppState>,
    auth: GatewayAuth,
    ApiJson(body): ApiJson<GatewayHeartbeat>,
) -> Result<Json<HeartbeatAck>, AppError> {
    body.validate()?;
    let now = now_ms();
    let mut r = write(&state, async |tx| {
        ops::heartbeat(tx, auth.gateway, &body, now).await
    })
    .await?;
    // The gateway withdraws its addresses when this runs out without another
    // heartbeat: by then this server has moved its sites elsewhere.
    r.lease_ms = u64::try_from(state.policy.down_after_ms).ok();
    Ok(Json(r))
}

/// `GET /api/v1/gateway/state?after=V&wait_ms=N` (long-poll).
pub async fn state(
    State(state): State<AppState>,
    auth: GatewayAuth,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<GatewayDesiredState>, AppError> {
    only_params(&q, &["after", "wait_ms"])?;
    let params = poll_params(&q)?;
    let doc = long_poll(&state, Topic::Gateway(auth.gateway), params, || {
        let state = state.clone();
        async move {
            read(&state, async |c| {
                views::gateway_state(c, auth.gateway).await
            })
            .await
        }
    })
    .await?;
    Ok(Json(doc))
}

/// `POST /api/v1/gateway/applied`
pub async fn applied(
    State(state): State<AppState>,
    auth: GatewayAuth,
    ApiJson(body): ApiJson<AppliedState>,
) -> Result<StatusCode, AppError> {
    check_applied(&body)?;
    if !body.errors.is_empty() {
        tracing::warn!(gateway.id = %auth.gateway, version = body.version, errors = ?body.errors, "gateway could not apply everything");
    }
    write(&state, async |tx| {
        ops::gateway_applied(tx, auth.gateway, body.version, &body.errors).await
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
