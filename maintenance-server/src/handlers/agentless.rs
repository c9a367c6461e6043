//! Sites without a router agent: the router's rendered configuration
//! (operator or technician) and requests a technician opens on the
//! customer's behalf.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use vpnnat::messages::{MaintenanceRequestView, NewSiteRequest, SiteId, WireguardSiteConfig};

use super::agent::open_request;
use super::{only_params, path_id, write};
use crate::auth::{OperatorOrTechnician, TechnicianWrite};
use crate::db::now_ms;
use crate::db::ops::{self, OpError, Origin};
use crate::db::teams;
use crate::error::{ApiJson, AppError};
use crate::state::AppState;

/// `GET /api/v1/sites/{id}/wireguard`
pub async fn site_wireguard(
    State(state): State<AppState>,
    who: OperatorOrTechnician,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<WireguardSiteConfig>, AppError> {
    only_params(&q, &[])?;
    let site = SiteId(path_id(&id)?);
    let now = now_ms();
    let r = write(&state, async |tx| {
        // Another team's site is answered like one that does not exist.
        if let Some(scope) = who.scope
            && !teams::site_visible(&mut tx.inner, site, scope).await?
        {
            return Err(OpError::NotFound("site"));
        }
        ops::read_wireguard_config(tx, site, &who.actor, now).await
    })
    .await?;
    Ok(Json(r))
}

/// `POST /api/v1/sites/{id}/requests`: the same path as an agent's request
/// (pool, gateway choice, quotas, expiry), with the terminals' LAN
/// addresses and the technician as the audit actor.
pub async fn create_site_request(
    State(state): State<AppState>,
    TechnicianWrite(t): TechnicianWrite,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<NewSiteRequest>,
) -> Result<(StatusCode, Json<MaintenanceRequestView>), AppError> {
    let site = SiteId(path_id(&id)?);
    body.validate()?;
    let origin = Origin {
        actor: t.actor(),
        global_address: None,
        failure_id: None,
        lan_addresses: body.lan_addresses(),
    };
    let scope = t.scope;
    let visible = super::read(&state, async |c| teams::site_visible(c, site, scope).await).await?;
    if !visible {
        return Err(OpError::NotFound("site").into());
    }
    let view = open_request(&state, site, &body.request(), &origin).await?;
    Ok((StatusCode::CREATED, Json(view)))
}
