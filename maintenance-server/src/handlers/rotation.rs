//! Planned rotation of a site's key and credential (docs/OPERATIONS.md,
//! "Rotating keys and credentials"): the agent's calls, authenticated by
//! its current credential, and the operator's request for one.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use vpnnat::messages::{AgentRotation, NewSiteCredential, PlannedRotation, SiteId, SiteKey};

use super::{path_id, read, write};
use crate::auth::{OperatorAuth, Secret, SiteAuth, bearer};
use crate::db::{now_ms, rotation};
use crate::error::{ApiJson, AppError};
use crate::state::AppState;

/// `POST /api/v1/agent/key`: the agent's next key.
pub async fn next_key(
    State(state): State<AppState>,
    auth: SiteAuth,
    ApiJson(body): ApiJson<SiteKey>,
) -> Result<Json<AgentRotation>, AppError> {
    let now = now_ms();
    write(&state, async |tx| {
        rotation::register_next_key(tx, auth.site, body.public_key, now).await
    })
    .await?;
    tracing::info!(site.id = %auth.site, next_key = %body.public_key, "site registered its next key");
    let r = read(&state, async |c| {
        rotation::agent_rotation(c, auth.site).await
    })
    .await?;
    Ok(Json(r.unwrap_or_default()))
}

/// `POST /api/v1/agent/key/commit`: the agent uses its next key.
pub async fn commit_key(
    State(state): State<AppState>,
    auth: SiteAuth,
    ApiJson(body): ApiJson<SiteKey>,
) -> Result<StatusCode, AppError> {
    let now = now_ms();
    write(&state, async |tx| {
        rotation::commit_key(tx, auth.site, body.public_key, now).await
    })
    .await?;
    tracing::info!(site.id = %auth.site, key = %body.public_key, "site key rotated");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/agent/credential`: a new credential.
pub async fn credential(
    State(state): State<AppState>,
    auth: SiteAuth,
    headers: HeaderMap,
) -> Result<Json<NewSiteCredential>, AppError> {
    // `SiteAuth` accepted it: the header is there.
    let presented = bearer(&headers)
        .map(Secret::hash_of)
        .ok_or_else(|| AppError::unauthorized("a bearer credential is required"))?;
    let now = now_ms();
    let grace_ms = state.policy.credential_grace_ms;
    let r = write(&state, async |tx| {
        rotation::new_credential(tx, auth.site, &presented, now, grace_ms).await
    })
    .await?;
    tracing::info!(site.id = %auth.site, previous_valid_until = r.previous_valid_until.0, "new site credential issued");
    Ok(Json(r))
}

/// `POST /api/v1/sites/{id}/planned-rotation`
pub async fn planned(
    State(state): State<AppState>,
    _op: OperatorAuth,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<PlannedRotation>,
) -> Result<StatusCode, AppError> {
    let site = SiteId(path_id(&id)?);
    body.validate()?;
    let now = now_ms();
    write(&state, async |tx| {
        rotation::request_rotation(tx, site, body, "operator", now).await
    })
    .await?;
    tracing::info!(site.id = %site, key = body.key, credential = body.credential, "planned rotation requested");
    Ok(StatusCode::NO_CONTENT)
}
