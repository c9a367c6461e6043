//! Router-agent endpoints, authenticated by the site credential
//! (enrollment by the one-time token in its body). A site only ever sees
//! and changes its own requests and state.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use vpnnat::messages::{
    AgentDesiredState, AppliedState, EnrollRequest, EnrollResponse, FailureAccepted, FailureReport,
    Level, MaintenanceRequestView, NewMaintenanceRequest, RequestId, RequestState, Urgency,
};

use super::{check_applied, long_poll, only_params, path_id, poll_params, read, write};
use crate::auth::SiteAuth;
use crate::db::ops::{self, OpError, Origin};
use crate::db::{now_ms, views};
use crate::error::{ApiJson, AppError};
use crate::notify::Topic;
use crate::state::{AppState, PeerAddr};

/// `POST /api/v1/enroll`
pub async fn enroll(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<EnrollRequest>,
) -> Result<Json<EnrollResponse>, AppError> {
    if body.token.is_empty() || body.token.len() > 200 {
        return Err(AppError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "token",
            "token: expected the enrollment token",
        ));
    }
    let now = now_ms();
    let r = write(&state, async |tx| {
        ops::enroll(tx, &body.token, body.public_key, now).await
    })
    .await?;
    tracing::info!(site.id = %r.site_id, "site enrolled");
    Ok(Json(r))
}

/// Opens a request and answers with its view. When there is no capacity
/// (no gateway slot, no pool address) nothing is allocated; the refusal is
/// recorded as the site's problem (in a separate transaction) for the agent
/// to show, and returned.
///
/// # Errors
/// The refusal, or a database failure.
pub async fn open_request(
    state: &AppState,
    site: vpnnat::messages::SiteId,
    body: &NewMaintenanceRequest,
    origin: &Origin,
) -> Result<MaintenanceRequestView, OpError> {
    let now = now_ms();
    let policy = state.policy.clone();
    let r = write(state, async |tx| {
        let view = ops::new_request(tx, site, body, origin, now, &policy).await?;
        crate::webhooks::request_created(tx, &policy.webhooks, &view, now).await?;
        Ok::<_, OpError>(view)
    })
    .await;
    match r {
        Ok(view) => {
            tracing::info!(site.id = %site, request.id = %view.id, "maintenance request accepted");
            Ok(view)
        }
        Err(e) if e.is_capacity() => {
            let problem = e.to_string();
            write(state, async |tx| ops::set_problem(tx, site, &problem).await).await?;
            tracing::warn!(site.id = %site, error = %e, "maintenance request refused");
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// `POST /api/v1/agent/requests`
pub async fn create(
    State(state): State<AppState>,
    auth: SiteAuth,
    ConnectInfo(peer): ConnectInfo<PeerAddr>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<NewMaintenanceRequest>,
) -> Result<(StatusCode, Json<MaintenanceRequestView>), AppError> {
    body.validate()?;
    let origin = Origin {
        actor: format!("site:{}", auth.site),
        global_address: Some(state.client_address(peer.0, &headers)),
        failure_id: None,
        lan_addresses: Vec::new(),
    };
    let view = open_request(&state, auth.site, &body, &origin).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// `GET /api/v1/agent/requests`: the site's own requests, newest first.
pub async fn list(
    State(state): State<AppState>,
    auth: SiteAuth,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Vec<MaintenanceRequestView>>, AppError> {
    only_params(&q, &[])?;
    let filter = views::RequestFilter {
        site: Some(auth.site),
        limit: Some(500),
        ..Default::default()
    };
    Ok(Json(
        read(&state, async |c| views::requests(c, &filter).await).await?,
    ))
}

/// `POST /api/v1/agent/requests/{id}/revoke`: the customer ends access.
pub async fn revoke(
    State(state): State<AppState>,
    auth: SiteAuth,
    Path(id): Path<String>,
) -> Result<Json<MaintenanceRequestView>, AppError> {
    let id = RequestId(path_id(&id)?);
    let now = now_ms();
    let actor = format!("site:{}", auth.site);
    write(&state, async |tx| {
        ops::close_request(tx, id, RequestState::Revoked, Some(auth.site), &actor, now).await
    })
    .await?;
    Ok(Json(
        read(&state, async |c| views::request(c, id).await).await?,
    ))
}

/// `POST /api/v1/agent/failures`
pub async fn failure(
    State(state): State<AppState>,
    auth: SiteAuth,
    ConnectInfo(peer): ConnectInfo<PeerAddr>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<FailureReport>,
) -> Result<(StatusCode, Json<FailureAccepted>), AppError> {
    body.validate()?;
    let now = now_ms();
    let site = auth.site;
    let quotas = &state.policy.quotas;
    let routes = &state.policy.webhooks;
    let failure_id = write(&state, async |tx| {
        let id = ops::store_failure(tx, site, &body, now, quotas).await?;
        if !routes.is_empty() {
            let view = views::failure(&mut tx.inner, id).await?;
            crate::webhooks::failure_reported(tx, routes, &view, now).await?;
        }
        Ok::<_, OpError>(id)
    })
    .await?;
    tracing::info!(site.id = %site, failure.id = failure_id, code = ?body.code, "failure reported");
    let mut request = None;
    if body.open_request || state.policy.failure_opens_request {
        // Access to what failed: the terminal the report names (one that
        // stopped answering), else the configured router terminal.
        let terminal = body
            .terminal
            .clone()
            .unwrap_or_else(|| state.policy.router_terminal.clone());
        let req = NewMaintenanceRequest {
            requester_name: "automatic (failure report)".to_owned(),
            level: Level::Administrator,
            urgency: Urgency::High,
            phone: String::new(),
            content: format!(
                "failure {}: {}",
                views::enum_str(&body.code),
                body.detail.chars().take(3900).collect::<String>()
            ),
            terminals: vec![terminal],
        };
        let origin = Origin {
            actor: format!("site:{site}"),
            global_address: Some(state.client_address(peer.0, &headers)),
            failure_id: Some(failure_id),
            lan_addresses: Vec::new(),
        };
        // The report is stored whatever happens to the request.
        match open_request(&state, site, &req, &origin).await {
            Ok(view) => {
                let rid = view.id;
                write(&state, async |tx| {
                    ops::link_failure(tx, failure_id, rid).await
                })
                .await?;
                request = Some(view);
            }
            // The report is accepted all the same: answering its refusal
            // would make the agent send it again.
            Err(e) if e.is_capacity() || e.is_site_limit() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok((
        StatusCode::CREATED,
        Json(FailureAccepted {
            failure_id,
            request,
        }),
    ))
}

/// `GET /api/v1/agent/state?after=V&wait_ms=N` (long-poll).
pub async fn state(
    State(state): State<AppState>,
    auth: SiteAuth,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<AgentDesiredState>, AppError> {
    only_params(&q, &["after", "wait_ms"])?;
    let params = poll_params(&q)?;
    let keepalive = state.policy.persistent_keepalive_s;
    let doc = long_poll(&state, Topic::Site(auth.site), params, || {
        let state = state.clone();
        async move {
            read(&state, async |c| {
                views::agent_state(c, auth.site, keepalive).await
            })
            .await
        }
    })
    .await?;
    Ok(Json(doc))
}

/// `POST /api/v1/agent/applied`
pub async fn applied(
    State(state): State<AppState>,
    auth: SiteAuth,
    ApiJson(body): ApiJson<AppliedState>,
) -> Result<StatusCode, AppError> {
    check_applied(&body)?;
    if !body.errors.is_empty() {
        tracing::warn!(site.id = %auth.site, version = body.version, errors = ?body.errors, "agent could not apply everything");
    }
    write(&state, async |tx| {
        ops::site_applied(tx, auth.site, body.version, &body.errors).await
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
