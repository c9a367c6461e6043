//! Technician endpoints: login (rate-limited), logout, the request list,
//! start / end, failures (and acknowledging them), the audit log and the console's live feed. Reads
//! need the session cookie; changes need the cookie and `X-CSRF-Token`.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Instant;

use axum::Json;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use vpnnat::messages::{
    AuditEntry, ConsoleEvents, FailureView, Login, LoginResponse, MaintenanceRequestView,
    RequestId, RequestState, SiteId,
};

use super::{limit_param, long_poll, only_params, path_id, poll_params, query_u64, read, write};
use crate::auth::{
    SESSION_COOKIE, Secret, SecretKind, Technician, TechnicianWrite, client_key, hash_password,
    verify_password,
};
use crate::db::{now_ms, ops, teams, views};
use crate::error::{ApiJson, AppError};
use crate::notify::Topic;
use crate::state::{AppState, PeerAddr};

/// Closed requests the console's live feed carries (the newest; older ones
/// are paged with `GET /api/v1/requests?state=closed&before=ID`). Open
/// requests are always all in the feed.
pub const CONSOLE_CLOSED_REQUESTS: u32 = 100;
/// Failures the console shows at most.
pub const CONSOLE_FAILURES: u32 = 100;

fn dummy_hash() -> &'static str {
    static H: OnceLock<String> = OnceLock::new();
    H.get_or_init(|| hash_password("not a password of anyone").unwrap_or_default())
}

/// `POST /api/v1/login`
pub async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerAddr>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Login>,
) -> Result<Response, AppError> {
    if body.name.trim().is_empty() || body.name.len() > 100 {
        return Err(AppError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "name",
            "name: 1 to 100 characters",
        ));
    }
    if body.password.is_empty() || body.password.len() > 1024 {
        return Err(AppError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "password",
            "password: 1 to 1024 characters",
        ));
    }
    // Every attempt counts before its password is checked, so concurrent
    // attempts cannot all slip under the limit; a success is taken back.
    let ip_key = format!("ip:{}", client_key(state.client_address(peer.0, &headers)));
    let name_key = format!("name:{}", body.name);
    let keys = [ip_key.as_str(), name_key.as_str()];
    let limiter = &state.login_limiter;
    if !limiter.attempt(&keys, Instant::now()) {
        state.password_checks.count_rate_limited();
        return Err(AppError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many failed logins; wait a minute",
        )
        .retry_after(60));
    }
    let name = body.name.clone();
    let found = read(&state, async |c| ops::password_of(c, &name).await).await?;
    let (id, hash) = match found {
        Some((id, hash)) => (Some(id), Some(hash)),
        None => (None, None),
    };
    let password = body.password.clone();
    // argon2 is deliberately slow and big: at most a few run at once, off
    // the async workers. An unknown name is checked against a dummy hash
    // so both take the same time.
    // A login refused as busy had its password never checked: it does not
    // count toward the client's limit.
    let check = state
        .password_checks
        .begin()
        .await
        .inspect_err(|_| limiter.forgive(&keys))?;
    let ok = tokio::task::spawn_blocking(move || {
        // (The dummy hash is made here too the first time: argon2 work.)
        let ok = verify_password(&password, hash.as_deref().unwrap_or_else(|| dummy_hash()));
        drop(check);
        ok
    })
    .await
    .map_err(AppError::internal)?;
    let Some(id) = id.filter(|_| ok) else {
        tracing::warn!(technician = %body.name, "failed login");
        // Recorded for the console's audit view; the limiter above bounds
        // how many a client can add.
        let client = state.client_address(peer.0, &headers).to_string();
        let t = now_ms();
        write(&state, async |tx| {
            ops::record_failed_login(tx, &name, &client, t).await
        })
        .await?;
        return Err(AppError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
            "wrong name or password",
        ));
    };
    limiter.forgive(&keys);
    let session = Secret::generate(SecretKind::Session);
    let csrf = Secret::generate(SecretKind::Csrf);
    let t = now_ms();
    let lifetime_ms =
        i64::try_from(state.settings.technicians.session_hours * 3_600_000).unwrap_or(i64::MAX / 4);
    let actor = format!("technician:{}", body.name);
    let new_session = ops::NewSession {
        technician_id: id,
        token_hash: &session.hash(),
        csrf_hash: &csrf.hash(),
        expires_at: t.saturating_add(lifetime_ms),
    };
    write(&state, async |tx| {
        ops::open_session(tx, new_session, &actor, t).await
    })
    .await?;
    let secure = if state.settings.console_https() {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{SESSION_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        session.expose(),
        lifetime_ms / 1000
    );
    let mut resp = Json(LoginResponse {
        name: body.name.clone(),
        csrf_token: csrf.expose().to_owned(),
    })
    .into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(AppError::internal)?,
    );
    Ok(resp)
}

/// `POST /api/v1/logout`
pub async fn logout(
    State(state): State<AppState>,
    TechnicianWrite(t): TechnicianWrite,
) -> Result<Response, AppError> {
    let now = now_ms();
    let actor = t.actor();
    write(&state, async |tx| {
        ops::close_session(tx, &t.session_hash, &actor, now).await
    })
    .await?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("vpnnat_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    Ok(resp)
}

/// `GET`: who is logged in (the console's check of its session).
pub const ME: &str = "/api/v1/me";

/// Who is logged in.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Me {
    /// The technician's name.
    pub name: String,
    /// Its team's name (absent: no team; it sees only sites without a team).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
}

/// `GET /api/v1/me`
pub async fn me(State(state): State<AppState>, t: Technician) -> Result<Json<Me>, AppError> {
    let team = read(&state, async |c| teams::team_of(c, t.id).await).await?;
    Ok(Json(Me {
        name: t.name,
        team: team.map(|(_, name)| name),
    }))
}

/// `GET /api/v1/requests?state=&site=&before=&limit=`; `state` is one
/// request state, or `open` / `closed`.
pub async fn requests(
    State(state): State<AppState>,
    t: Technician,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Vec<MaintenanceRequestView>>, AppError> {
    only_params(&q, &["state", "site", "before", "limit"])?;
    let (filter_state, open) = match q.get("state").map(String::as_str) {
        None | Some("") => (None, None),
        Some("open") => (None, Some(true)),
        Some("closed") => (None, Some(false)),
        Some(s) => (
            Some(views::enum_parse::<RequestState>(s).map_err(|_| {
                AppError::field(
                    StatusCode::BAD_REQUEST,
                    "state",
                    "state: one of waiting, in_progress, ended, revoked, expired, open, closed",
                )
            })?),
            None,
        ),
    };
    let site = query_u64(&q, "site")?.map(SiteId);
    let before = query_u64(&q, "before")?.map(RequestId);
    let limit = limit_param(&q, 500, 1000)?;
    let filter = views::RequestFilter {
        state: filter_state,
        site,
        open,
        before,
        limit: Some(limit),
        scope: Some(t.scope),
        ..Default::default()
    };
    Ok(Json(
        read(&state, async |c| views::requests(c, &filter).await).await?,
    ))
}

/// `POST /api/v1/requests/{id}/start`
pub async fn start(
    State(state): State<AppState>,
    TechnicianWrite(t): TechnicianWrite,
    Path(id): Path<String>,
) -> Result<Json<MaintenanceRequestView>, AppError> {
    let id = RequestId(path_id(&id)?);
    let now = now_ms();
    let actor = t.actor();
    let scope = t.scope;
    write(&state, async |tx| {
        teams::start_request(tx, id, scope, &t.name, &actor, now).await
    })
    .await?;
    tracing::info!(request.id = %id, technician = %t.name, "maintenance started");
    Ok(Json(
        read(&state, async |c| views::request(c, id).await).await?,
    ))
}

/// `POST /api/v1/requests/{id}/end`
pub async fn end(
    State(state): State<AppState>,
    TechnicianWrite(t): TechnicianWrite,
    Path(id): Path<String>,
) -> Result<Json<MaintenanceRequestView>, AppError> {
    let id = RequestId(path_id(&id)?);
    let now = now_ms();
    let actor = t.actor();
    let scope = t.scope;
    write(&state, async |tx| {
        teams::check_request(tx, id, scope).await?;
        ops::close_request(tx, id, RequestState::Ended, None, &actor, now).await
    })
    .await?;
    tracing::info!(request.id = %id, technician = %t.name, "maintenance ended");
    Ok(Json(
        read(&state, async |c| views::request(c, id).await).await?,
    ))
}

/// `GET /api/v1/failures?limit=`
pub async fn failures(
    State(state): State<AppState>,
    t: Technician,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Vec<FailureView>>, AppError> {
    only_params(&q, &["limit"])?;
    let limit = limit_param(&q, 200, 1000)?;
    Ok(Json(
        read(&state, async |c| {
            views::failures_in(c, limit, t.scope).await
        })
        .await?,
    ))
}

/// `POST /api/v1/failures/{id}/acknowledge`
pub async fn acknowledge_failure(
    State(state): State<AppState>,
    TechnicianWrite(t): TechnicianWrite,
    Path(id): Path<String>,
) -> Result<Json<FailureView>, AppError> {
    let id = path_id(&id)?;
    let now = now_ms();
    let actor = t.actor();
    let scope = t.scope;
    write(&state, async |tx| {
        teams::check_failure(tx, id, scope).await?;
        ops::acknowledge_failure(tx, id, &t.name, &actor, now).await
    })
    .await?;
    tracing::info!(failure.id = id, technician = %t.name, "failure report acknowledged");
    Ok(Json(
        read(&state, async |c| views::failure(c, id).await).await?,
    ))
}

/// `GET /api/v1/audit?before=&limit=&actor=&object=&kind=&site=&since=&until=`
pub async fn audit(
    State(state): State<AppState>,
    t: Technician,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Vec<AuditEntry>>, AppError> {
    only_params(
        &q,
        &[
            "before", "limit", "actor", "object", "kind", "site", "since", "until",
        ],
    )?;
    let text = |name: &str| -> Result<Option<String>, AppError> {
        match q.get(name).map(String::as_str) {
            None | Some("") => Ok(None),
            Some(v) if v.len() <= 200 => Ok(Some(v.to_owned())),
            Some(_) => Err(AppError::field(
                StatusCode::BAD_REQUEST,
                name,
                format!("{name}: at most 200 characters"),
            )),
        }
    };
    let kind = text("kind")?;
    if kind.as_deref().is_some_and(|k| {
        !k.chars()
            .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.')
    }) {
        return Err(AppError::field(
            StatusCode::BAD_REQUEST,
            "kind",
            "kind: an action or its prefix, e.g. request or technician.login",
        ));
    }
    let time = |name: &str| -> Result<Option<i64>, AppError> {
        Ok(query_u64(&q, name)?.map(|t| i64::try_from(t).unwrap_or(i64::MAX)))
    };
    let filter = views::AuditFilter {
        before: query_u64(&q, "before")?,
        limit: limit_param(&q, 100, 500)?,
        actor: text("actor")?,
        object: text("object")?,
        kind,
        site: query_u64(&q, "site")?.map(SiteId),
        since: time("since")?,
        until: time("until")?,
        scope: Some(t.scope),
    };
    Ok(Json(
        read(&state, async |c| views::audit(c, &filter).await).await?,
    ))
}

/// `GET /api/v1/events?after=V&wait_ms=N` (long-poll for the console).
pub async fn events(
    State(state): State<AppState>,
    t: Technician,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<ConsoleEvents>, AppError> {
    only_params(&q, &["after", "wait_ms"])?;
    let params = poll_params(&q)?;
    let doc = long_poll(&state, Topic::Console, params, || {
        let state = state.clone();
        async move {
            read(&state, async |c| {
                let version = views::console_version(c).await?;
                // Every open request, however many newer ones there are;
                // closed ones only the newest (the console pages the rest).
                let mut requests = views::requests(
                    c,
                    &views::RequestFilter {
                        open: Some(true),
                        scope: Some(t.scope),
                        ..Default::default()
                    },
                )
                .await?;
                requests.extend(
                    views::requests(
                        c,
                        &views::RequestFilter {
                            open: Some(false),
                            limit: Some(CONSOLE_CLOSED_REQUESTS),
                            scope: Some(t.scope),
                            ..Default::default()
                        },
                    )
                    .await?,
                );
                requests.sort_by_key(|r| std::cmp::Reverse(r.id.0));
                // One that closed between the two reads is in both: keep
                // the later (closed) view.
                requests.dedup_by(|later, earlier| {
                    let same = later.id == earlier.id;
                    if same {
                        std::mem::swap(later, earlier);
                    }
                    same
                });
                let failures = views::failures_in(c, CONSOLE_FAILURES, t.scope).await?;
                let agentless_sites = crate::db::agentless::console_sites(c, t.scope).await?;
                Ok(ConsoleEvents {
                    version,
                    requests,
                    failures,
                    agentless_sites,
                })
            })
            .await
        }
    })
    .await?;
    Ok(Json(doc))
}
