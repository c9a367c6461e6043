//! Operator endpoints (bearer operator token): sites, enrollment tokens,
//! gateway identities, drain.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use vpnnat::messages::{
    DrainGateway, GatewayCreated, GatewayId, GatewayView, IpsecSiteConfig, NewGateway, NewSite,
    SiteCreated, SiteId, SiteTunnel, SiteView,
};

use super::{only_params, path_id, read, write};
use crate::auth::OperatorAuth;
use crate::db::{now_ms, ops, views};
use crate::error::{ApiJson, AppError};
use crate::state::AppState;

const ACTOR: &str = "operator";

/// `POST /api/v1/sites`
pub async fn create_site(
    State(state): State<AppState>,
    _op: OperatorAuth,
    ApiJson(body): ApiJson<NewSite>,
) -> Result<(StatusCode, Json<SiteCreated>), AppError> {
    body.validate()?;
    let now = now_ms();
    let policy = state.policy.clone();
    let name = body.name.trim().to_owned();
    let tunnel = body.tunnel;
    let key = body.public_key;
    let r = if body.agent {
        write(&state, async |tx| {
            ops::create_site(tx, &name, tunnel, ACTOR, now, &policy).await
        })
        .await?
    } else {
        write(&state, async |tx| {
            ops::create_agentless_site(tx, &name, key, ACTOR, now).await
        })
        .await?
    };
    Ok((StatusCode::CREATED, Json(r)))
}

/// `GET /api/v1/sites`
pub async fn sites(
    State(state): State<AppState>,
    _op: OperatorAuth,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Vec<SiteView>>, AppError> {
    only_params(&q, &[])?;
    Ok(Json(read(&state, async |c| views::sites(c).await).await?))
}

/// `POST /api/v1/sites/{id}/token`
pub async fn site_token(
    State(state): State<AppState>,
    _op: OperatorAuth,
    Path(id): Path<String>,
) -> Result<Json<SiteCreated>, AppError> {
    let site = SiteId(path_id(&id)?);
    let now = now_ms();
    let policy = state.policy.clone();
    Ok(Json(
        write(&state, async |tx| {
            ops::new_site_token(tx, site, ACTOR, now, &policy).await
        })
        .await?,
    ))
}

/// `POST /api/v1/sites/{id}/tunnel`
pub async fn site_tunnel(
    State(state): State<AppState>,
    _op: OperatorAuth,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<SiteTunnel>,
) -> Result<StatusCode, AppError> {
    let site = SiteId(path_id(&id)?);
    let now = now_ms();
    write(&state, async |tx| {
        ops::set_site_tunnel(tx, site, body.tunnel, ACTOR, now).await
    })
    .await?;
    tracing::info!(site.id = %site, tunnel = %body.tunnel, "site tunnel kind set");
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/v1/sites/{id}/ipsec`
pub async fn site_ipsec(
    State(state): State<AppState>,
    _op: OperatorAuth,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<IpsecSiteConfig>, AppError> {
    only_params(&q, &[])?;
    let site = SiteId(path_id(&id)?);
    let now = now_ms();
    let r = write(&state, async |tx| {
        ops::read_ipsec_config(tx, site, ACTOR, now).await
    })
    .await?;
    Ok(Json(r))
}

/// `POST /api/v1/gateways`
pub async fn create_gateway(
    State(state): State<AppState>,
    _op: OperatorAuth,
    ApiJson(body): ApiJson<NewGateway>,
) -> Result<(StatusCode, Json<GatewayCreated>), AppError> {
    body.validate()?;
    let now = now_ms();
    let name = body.name.trim().to_owned();
    let r = write(&state, async |tx| {
        ops::create_gateway(tx, &name, ACTOR, now).await
    })
    .await?;
    Ok((StatusCode::CREATED, Json(r)))
}

/// `GET /api/v1/gateways`
pub async fn gateways(
    State(state): State<AppState>,
    _op: OperatorAuth,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Vec<GatewayView>>, AppError> {
    only_params(&q, &[])?;
    Ok(Json(
        read(&state, async |c| views::gateways(c, None).await).await?,
    ))
}

/// `POST /api/v1/gateways/{id}/drain`
pub async fn drain(
    State(state): State<AppState>,
    _op: OperatorAuth,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<DrainGateway>,
) -> Result<Json<GatewayView>, AppError> {
    let gw = GatewayId(path_id(&id)?);
    let now = now_ms();
    write(&state, async |tx| {
        ops::drain(tx, gw, body.drain, ACTOR, now).await
    })
    .await?;
    let v = read(&state, async |c| views::gateways(c, Some(gw)).await).await?;
    v.into_iter()
        .next()
        .map(Json)
        .ok_or_else(|| AppError::not_found("gateway"))
}
