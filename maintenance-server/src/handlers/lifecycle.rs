//! Operator endpoints (bearer operator token) that disable, delete and
//! rotate sites, gateways and technicians. Each change is audited with the
//! actor `operator`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use vpnnat::messages::{
    GatewayCreated, GatewayId, GatewayKeyRotationStatus, NewTechnician, SetDisabled, SiteCreated,
    SiteId,
};

use super::{path_id, write};
use crate::auth::OperatorAuth;
use crate::db::{now_ms, ops};
use crate::error::{ApiJson, AppError};
use crate::state::AppState;

const ACTOR: &str = "operator";

/// `DELETE /api/v1/sites/{id}`
pub async fn delete_site(
    State(state): State<AppState>,
    _op: OperatorAuth,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    let site = SiteId(path_id(&id)?);
    let now = now_ms();
    write(&state, async |tx| {
        ops::delete_site(tx, site, ACTOR, now).await
    })
    .await?;
    tracing::info!(site.id = %site, "site deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/sites/{id}/disable`
pub async fn disable_site(
    State(state): State<AppState>,
    _op: OperatorAuth,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<SetDisabled>,
) -> Result<StatusCode, AppError> {
    let site = SiteId(path_id(&id)?);
    let now = now_ms();
    write(&state, async |tx| {
        ops::set_site_disabled(tx, site, body.disabled, ACTOR, now).await
    })
    .await?;
    tracing::info!(site.id = %site, disabled = body.disabled, "site disabled flag set");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/sites/{id}/rotate`
pub async fn rotate_site(
    State(state): State<AppState>,
    _op: OperatorAuth,
    Path(id): Path<String>,
) -> Result<Json<SiteCreated>, AppError> {
    let site = SiteId(path_id(&id)?);
    let now = now_ms();
    let policy = state.policy.clone();
    let r = write(&state, async |tx| {
        ops::rotate_site(tx, site, ACTOR, now, &policy).await
    })
    .await?;
    tracing::info!(site.id = %site, "site credential revoked; new enrollment token issued");
    Ok(Json(r))
}

/// `DELETE /api/v1/gateways/{id}`
pub async fn delete_gateway(
    State(state): State<AppState>,
    _op: OperatorAuth,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    let gw = GatewayId(path_id(&id)?);
    let now = now_ms();
    write(&state, async |tx| {
        ops::delete_gateway(tx, gw, ACTOR, now).await
    })
    .await?;
    tracing::info!(gateway.id = %gw, "gateway deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/gateways/{id}/disable`
pub async fn disable_gateway(
    State(state): State<AppState>,
    _op: OperatorAuth,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<SetDisabled>,
) -> Result<StatusCode, AppError> {
    let gw = GatewayId(path_id(&id)?);
    let now = now_ms();
    write(&state, async |tx| {
        ops::set_gateway_disabled(tx, gw, body.disabled, ACTOR, now).await
    })
    .await?;
    tracing::info!(gateway.id = %gw, disabled = body.disabled, "gateway disabled flag set");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/gateways/{id}/rotate`
pub async fn rotate_gateway(
    State(state): State<AppState>,
    _op: OperatorAuth,
    Path(id): Path<String>,
) -> Result<Json<GatewayCreated>, AppError> {
    let gw = GatewayId(path_id(&id)?);
    let now = now_ms();
    let r = write(&state, async |tx| {
        ops::rotate_gateway(tx, gw, ACTOR, now).await
    })
    .await?;
    tracing::info!(gateway.id = %gw, "gateway credential rotated");
    Ok(Json(r))
}

/// `POST /api/v1/gateways/{id}/rotate-key`: asks the gateway for a new
/// WireGuard key (the credential is `rotate`).
pub async fn rotate_gateway_key(
    State(state): State<AppState>,
    _op: OperatorAuth,
    Path(id): Path<String>,
) -> Result<Json<GatewayKeyRotationStatus>, AppError> {
    let gw = GatewayId(path_id(&id)?);
    let now = now_ms();
    let r = write(&state, async |tx| {
        ops::request_key_rotation(tx, gw, ACTOR, now).await
    })
    .await?;
    tracing::info!(
        gateway.id = %gw,
        requested = r.requested,
        next_key = ?r.next_public_key,
        "gateway key rotation asked for"
    );
    Ok(Json(r))
}

/// `POST /api/v1/technicians`
pub async fn set_technician(
    State(state): State<AppState>,
    _op: OperatorAuth,
    ApiJson(body): ApiJson<NewTechnician>,
) -> Result<StatusCode, AppError> {
    body.validate()?;
    let name = body.name.trim().to_owned();
    let password = body.password;
    // argon2 is deliberately slow: off the async workers.
    let hash = tokio::task::spawn_blocking(move || crate::secrets::hash_password(&password))
        .await
        .map_err(AppError::internal)?
        .map_err(AppError::internal)?;
    let now = now_ms();
    write(&state, async |tx| {
        ops::upsert_technician(tx, &name, &hash, ACTOR, now).await
    })
    .await?;
    tracing::info!(technician = %name, "technician password set");
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /api/v1/technicians/{name}`
pub async fn delete_technician(
    State(state): State<AppState>,
    _op: OperatorAuth,
    Path(name): Path<String>,
) -> Result<StatusCode, AppError> {
    let now = now_ms();
    write(&state, async |tx| {
        ops::delete_technician(tx, &name, ACTOR, now).await
    })
    .await?;
    tracing::info!(technician = %name, "technician deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/technicians/{name}/disable`
pub async fn disable_technician(
    State(state): State<AppState>,
    _op: OperatorAuth,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<SetDisabled>,
) -> Result<StatusCode, AppError> {
    let now = now_ms();
    write(&state, async |tx| {
        ops::set_technician_disabled(tx, &name, body.disabled, ACTOR, now).await
    })
    .await?;
    tracing::info!(technician = %name, disabled = body.disabled, "technician disabled flag set");
    Ok(StatusCode::NO_CONTENT)
}
