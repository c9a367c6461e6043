//! Operator endpoints for teams (docs/OPERATIONS.md "Teams"): create, list
//! and delete teams; assign a site or a technician (with its own sources).

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use vpnnat::messages::{NewTeam, SiteId, SiteTeam, TeamView, TechnicianTeam};

use super::{only_params, path_id, read, write};
use crate::auth::OperatorAuth;
use crate::db::{OpError, now_ms, teams};
use crate::error::{ApiJson, AppError};
use crate::state::AppState;

const ACTOR: &str = "operator";

/// An unknown team in a request body is bad input (422 naming `team`), not
/// a missing resource.
fn team_field(e: OpError) -> AppError {
    match e {
        OpError::NotFound("team") => AppError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "team",
            "team: no team with this id",
        ),
        e => e.into(),
    }
}

/// `POST /api/v1/teams`
pub async fn create_team(
    State(state): State<AppState>,
    _op: OperatorAuth,
    ApiJson(body): ApiJson<NewTeam>,
) -> Result<(StatusCode, Json<TeamView>), AppError> {
    body.validate()?;
    let now = now_ms();
    let name = body.name.trim().to_owned();
    let sources = body.source_prefixes.clone();
    let id = write(&state, async |tx| {
        teams::create_team(tx, &name, &sources, ACTOR, now).await
    })
    .await?;
    tracing::info!(team.id = id, team = %name, "team created");
    let all = read(&state, async |c| teams::teams(c).await).await?;
    all.into_iter()
        .find(|t| t.id == id)
        .map(|t| (StatusCode::CREATED, Json(t)))
        .ok_or_else(|| AppError::not_found("team"))
}

/// `GET /api/v1/teams`
pub async fn list_teams(
    State(state): State<AppState>,
    _op: OperatorAuth,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Vec<TeamView>>, AppError> {
    only_params(&q, &[])?;
    Ok(Json(read(&state, async |c| teams::teams(c).await).await?))
}

/// `DELETE /api/v1/teams/{id}`
pub async fn delete_team(
    State(state): State<AppState>,
    _op: OperatorAuth,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    let id = path_id(&id)?;
    let now = now_ms();
    write(&state, async |tx| {
        teams::delete_team(tx, id, ACTOR, now).await
    })
    .await?;
    tracing::info!(team.id = id, "team deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/sites/{id}/team`
pub async fn site_team(
    State(state): State<AppState>,
    _op: OperatorAuth,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<SiteTeam>,
) -> Result<StatusCode, AppError> {
    let site = SiteId(path_id(&id)?);
    let now = now_ms();
    let team = body.team;
    write(&state, async |tx| {
        teams::set_site_team(tx, site, team, ACTOR, now).await
    })
    .await
    .map_err(team_field)?;
    tracing::info!(site.id = %site, team = ?team, "site team set");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/technicians/{name}/team`
pub async fn technician_team(
    State(state): State<AppState>,
    _op: OperatorAuth,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<TechnicianTeam>,
) -> Result<StatusCode, AppError> {
    body.validate()?;
    let now = now_ms();
    write(&state, async |tx| {
        teams::set_technician_team(tx, &name, body.team, body.sources.as_deref(), ACTOR, now).await
    })
    .await
    .map_err(team_field)?;
    tracing::info!(technician = %name, team = ?body.team, "technician team set");
    Ok(StatusCode::NO_CONTENT)
}
