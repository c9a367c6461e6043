//! The customer's page and its JSON API (the page uses the API; scripts and
//! tests can press the same buttons), `/metrics` and `/healthz`.
//!
//! Reachable only from the LAN side: the listener binds the LAN address, and
//! a client outside the allowed prefixes gets 403. Protected by the local
//! password: the page logs in (`POST /api/login`) and gets an `HttpOnly`,
//! `SameSite=Strict` session cookie plus a CSRF token that every
//! state-changing call sends back as `X-CSRF-Token`; a script may instead
//! send `Authorization: Bearer <password>` (never sent by a browser on its
//! own, so no CSRF token is needed). Failed logins are rate-limited.
//!
//! The real LAN addresses of terminals appear on this page (the customer's
//! own LAN) and never in anything sent to the server.

// Handlers return a finished `Response` as their error: boxing it would
// only move the allocation.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use vpnnat::gateway::Prefix;
use vpnnat::messages::{
    ApiError, Level, MaintenanceRequestView, NewMaintenanceRequest, PublicKey, RequestId,
    TerminalName, UnixMillis, Urgency, paths,
};

use crate::app::App;
use crate::client::CallError;
use crate::dataplane::Snapshot;
use crate::probe;
use crate::settings::{Check, Mode};

const PAGE: &str = include_str!("page/index.html");
const SCRIPT: &str = include_str!("page/app.js");
const STYLE: &str = include_str!("page/style.css");

/// The session cookie.
const COOKIE: &str = "vpnnat_agent";
/// Session lifetime.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most (the oldest is dropped).
const MAX_SESSIONS: usize = 64;
/// Failed logins allowed per minute.
const LOGIN_FAILURES_PER_MIN: usize = 5;
/// Largest request body.
const BODY_LIMIT: usize = 64 * 1024;
/// How long a terminal may take to answer the pre-request check.
const CHECK_TIMEOUT: Duration = Duration::from_millis(1500);

/// The status document (`GET /api/status`, printed by `router-agent status`).
pub const STATUS_PATH: &str = "/api/status";

struct Session {
    csrf: String,
    expires: Instant,
}

/// The web layer's state.
pub struct Web {
    app: Arc<App>,
    password_hash: [u8; 32],
    sessions: Mutex<HashMap<String, Session>>,
    login_failures: Mutex<VecDeque<Instant>>,
    allowed: Vec<Prefix>,
    /// Never allowed, even inside an allowed prefix (the masquerade address:
    /// technicians' packets come from it).
    denied: Vec<Ipv4Addr>,
}

impl std::fmt::Debug for Web {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Web")
            .field("allowed", &self.allowed)
            .finish_non_exhaustive()
    }
}

fn hash(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// Equality that takes the same time wherever the inputs differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    b.iter().fold(String::with_capacity(64), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

impl Web {
    /// The web layer for `app` with the page password and the client prefixes.
    pub fn new(app: Arc<App>, password: &str, allowed: Vec<Prefix>, denied: Vec<Ipv4Addr>) -> Self {
        Self {
            app,
            password_hash: hash(password),
            sessions: Mutex::new(HashMap::new()),
            login_failures: Mutex::new(VecDeque::new()),
            allowed,
            denied,
        }
    }

    fn client_allowed(&self, ip: std::net::IpAddr) -> bool {
        let v4 = match ip {
            std::net::IpAddr::V4(v4) => v4,
            std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4,
                None => return v6.is_loopback(),
            },
        };
        !self.denied.contains(&v4) && self.allowed.iter().any(|p| p.contains(v4))
    }

    fn session_csrf(&self, headers: &HeaderMap) -> Option<String> {
        let token = cookie(headers, COOKIE)?;
        let mut sessions = self
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        sessions.get(&token).map(|s| s.csrf.clone())
    }

    /// Authenticates a request: the bearer password, or a session (plus the
    /// CSRF token on state-changing methods).
    fn authorize(&self, method: &Method, headers: &HeaderMap) -> Result<(), Response> {
        if let Some(auth) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            && let Some(pw) = auth.strip_prefix("Bearer ")
        {
            if same(&hash(pw), &self.password_hash) {
                return Ok(());
            }
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "wrong password",
                None,
            ));
        }
        let Some(csrf) = self.session_csrf(headers) else {
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "please log in",
                None,
            ));
        };
        if *method != Method::GET && *method != Method::HEAD {
            let sent = headers
                .get("x-csrf-token")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !same(&hash(sent), &hash(&csrf)) {
                return Err(error(
                    StatusCode::FORBIDDEN,
                    "csrf",
                    "missing or wrong X-CSRF-Token header",
                    None,
                ));
            }
        }
        Ok(())
    }
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// A JSON [`ApiError`] response.
fn error(status: StatusCode, code: &str, message: &str, field: Option<&str>) -> Response {
    let body = ApiError {
        error: code.to_owned(),
        message: message.to_owned(),
        field: field.map(str::to_owned),
    };
    (status, axum::Json(body)).into_response()
}

/// Parses a JSON body, naming the field at fault.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = (path != ".").then_some(path);
        // Strip serde's position suffix so the message reads as a sentence.
        let inner = e.into_inner().to_string();
        let msg = inner.split(" at line ").next().unwrap_or(&inner).to_owned();
        error(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            &match &field {
                Some(f) => format!("{f}: {msg}"),
                None => format!("not a valid JSON body: {msg}"),
            },
            field.as_deref(),
        )
    })
}

fn call_error(e: CallError) -> Response {
    match e {
        CallError::Api { status, body } => (status, axum::Json(body)).into_response(),
        CallError::Transport(detail) => {
            tracing::warn!(error = %detail, "maintenance server unreachable");
            error(
                StatusCode::BAD_GATEWAY,
                "server_unreachable",
                "The maintenance center cannot be reached right now. Please try again in a moment, or call us.",
                None,
            )
        }
    }
}

/// The router: page, API, metrics.
pub fn router(web: Arc<Web>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/app.js", get(script))
        .route("/style.css", get(style))
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .route("/api/session", get(session))
        .route("/api/overview", get(overview))
        .route("/api/check", post(check))
        .route("/api/requests", post(create_request))
        .route("/api/requests/{id}/revoke", post(revoke))
        .route(STATUS_PATH, get(status))
        .route(paths::METRICS, get(metrics))
        .route(paths::HEALTH, get(health))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(web.clone(), lan_only))
        .with_state(web)
}

/// 403 for clients outside the LAN.
async fn lan_only(
    State(web): State<Arc<Web>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    if !web.client_allowed(peer.ip()) {
        tracing::debug!(client = %peer, "web client outside the LAN refused");
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this page is only reachable from the local network",
            None,
        );
    }
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
            ),
        ],
        body,
    )
        .into_response()
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    password: String,
}

#[derive(Serialize)]
struct SessionInfo {
    csrf_token: String,
    site_name: String,
}

async fn login(State(web): State<Arc<Web>>, body: Bytes) -> Response {
    {
        let mut f = web
            .login_failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        while f
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
        {
            f.pop_front();
        }
        if f.len() >= LOGIN_FAILURES_PER_MIN {
            return error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many wrong passwords; wait a minute",
                None,
            );
        }
    }
    let b: LoginBody = match parse(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    if !same(&hash(&b.password), &web.password_hash) {
        web.login_failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push_back(Instant::now());
        tracing::warn!("wrong password on the customer page");
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "wrong password",
            Some("password"),
        );
    }
    let token = random_token();
    let csrf = random_token();
    {
        let mut s = web
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if s.len() >= MAX_SESSIONS
            && let Some(oldest) = s
                .iter()
                .min_by_key(|(_, v)| v.expires)
                .map(|(k, _)| k.clone())
        {
            s.remove(&oldest);
        }
        s.insert(
            token.clone(),
            Session {
                csrf: csrf.clone(),
                expires: Instant::now() + SESSION_TTL,
            },
        );
    }
    let cookie = format!(
        "{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        SESSION_TTL.as_secs()
    );
    (
        [(header::SET_COOKIE, cookie)],
        axum::Json(SessionInfo {
            csrf_token: csrf,
            site_name: web.app.site_name.clone(),
        }),
    )
        .into_response()
}

async fn logout(State(web): State<Arc<Web>>, method: Method, headers: HeaderMap) -> Response {
    if let Err(r) = web.authorize(&method, &headers) {
        return r;
    }
    if let Some(token) = cookie(&headers, COOKIE) {
        web.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&token);
    }
    (
        StatusCode::NO_CONTENT,
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
        )],
    )
        .into_response()
}

async fn session(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    match web.session_csrf(&headers) {
        Some(csrf) => axum::Json(SessionInfo {
            csrf_token: csrf,
            site_name: web.app.site_name.clone(),
        })
        .into_response(),
        None => error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "please log in",
            None,
        ),
    }
}

/// What the customer submits: like [`NewMaintenanceRequest`], but terminals
/// may be typed addresses (resolved and aliased here).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalRequest {
    requester_name: String,
    level: Level,
    urgency: Urgency,
    phone: String,
    #[serde(default)]
    content: String,
    terminals: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckBody {
    terminals: Vec<String>,
}

/// One terminal in the answer of a check.
#[derive(Debug, Serialize)]
struct TerminalCheck {
    /// What was typed or ticked.
    input: String,
    /// The name the server will see.
    name: String,
    /// The real address (this LAN only).
    address: Ipv4Addr,
    /// Whether it answered.
    answers: bool,
}

/// A warning for the customer.
#[derive(Debug, Serialize)]
struct Warning {
    terminal: String,
    message: String,
}

/// A request as the page shows it.
#[derive(Debug, Serialize)]
struct RequestInfo {
    #[serde(flatten)]
    view: MaintenanceRequestView,
    /// Per terminal: the real address here and whether its mapping is active on this router.
    local: Vec<TerminalLocal>,
}

#[derive(Debug, Serialize)]
struct TerminalLocal {
    name: TerminalName,
    address: Option<Ipv4Addr>,
    nat_address: Option<Ipv4Addr>,
    active: bool,
}

#[derive(Debug, Serialize)]
struct Created {
    request: RequestInfo,
    warnings: Vec<Warning>,
}

/// Resolves what the customer entered; the first bad entry is a 400 naming `terminals`.
async fn resolve_entries(
    web: &Web,
    entries: &[String],
) -> Result<Vec<(String, TerminalName, Ipv4Addr)>, Response> {
    if entries.is_empty() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "terminals: choose at least one computer",
            Some("terminals"),
        ));
    }
    let mut out: Vec<(String, TerminalName, Ipv4Addr)> = Vec::new();
    for e in entries {
        let e = e.trim();
        if e.is_empty() {
            continue;
        }
        match web.app.names.resolve_input(e).await {
            Ok((name, addr)) => {
                if !out.iter().any(|(_, n, _)| *n == name) {
                    out.push((e.to_owned(), name, addr));
                }
            }
            Err(err) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "invalid_field",
                    &format!("terminals: {err}"),
                    Some("terminals"),
                ));
            }
        }
    }
    if out.is_empty() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "terminals: choose at least one computer",
            Some("terminals"),
        ));
    }
    Ok(out)
}

fn check_of(web: &Web, name: &TerminalName) -> Check {
    web.app
        .settings
        .terminals
        .iter()
        .find(|t| t.name == *name)
        .map_or(Check::Auto, |t| t.check)
}

async fn probe_all(web: &Web, resolved: &[(String, TerminalName, Ipv4Addr)]) -> Vec<bool> {
    let probes = resolved
        .iter()
        .map(|(_, name, addr)| probe::answers(*addr, check_of(web, name), CHECK_TIMEOUT));
    futures_util::future::join_all(probes).await
}

async fn check(
    State(web): State<Arc<Web>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = web.authorize(&method, &headers) {
        return r;
    }
    let b: CheckBody = match parse(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let resolved = match resolve_entries(&web, &b.terminals).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let answers = probe_all(&web, &resolved).await;
    let out: Vec<TerminalCheck> = resolved
        .into_iter()
        .zip(answers)
        .map(|((input, name, address), answers)| TerminalCheck {
            input,
            name: name.to_string(),
            address,
            answers,
        })
        .collect();
    axum::Json(serde_json::json!({ "terminals": out })).into_response()
}

async fn create_request(
    State(web): State<Arc<Web>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = web.authorize(&method, &headers) {
        return r;
    }
    let Some(server) = web.app.server.clone() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "standalone",
            "this agent runs without a maintenance server (--desired); requests cannot be sent",
            None,
        );
    };
    let b: LocalRequest = match parse(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let resolved = match resolve_entries(&web, &b.terminals).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let request = NewMaintenanceRequest {
        requester_name: b.requester_name.trim().to_owned(),
        level: b.level,
        urgency: b.urgency,
        phone: b.phone.trim().to_owned(),
        content: b.content,
        terminals: resolved.iter().map(|(_, n, _)| n.clone()).collect(),
    };
    if let Err(e) = request.validate() {
        let api: ApiError = e.into();
        return (StatusCode::BAD_REQUEST, axum::Json(api)).into_response();
    }
    // Before anything is sent: does each terminal answer on the LAN?
    let answers = probe_all(&web, &resolved).await;
    let warnings: Vec<Warning> = resolved
        .iter()
        .zip(answers)
        .filter(|(_, ok)| !ok)
        .map(|((_, name, addr), _)| Warning {
            terminal: name.to_string(),
            message: format!(
                "{name} ({addr}) does not answer on the local network right now. \
                 Please make sure it is switched on and connected."
            ),
        })
        .collect();
    let view = match server.create_request(&request).await {
        Ok(v) => v,
        Err(e) => return call_error(e),
    };
    tracing::info!(
        request.id = %view.id,
        acceptance = %view.acceptance_number,
        terminals = view.terminals.len(),
        warnings = warnings.len(),
        "maintenance request sent"
    );
    let snap = web.app.dataplane.snapshot().await.ok();
    let info = request_info(&web, view, snap.as_ref()).await;
    (
        StatusCode::CREATED,
        axum::Json(Created {
            request: info,
            warnings,
        }),
    )
        .into_response()
}

async fn request_info(
    web: &Web,
    view: MaintenanceRequestView,
    snap: Option<&Snapshot>,
) -> RequestInfo {
    let mut local = Vec::with_capacity(view.terminals.len());
    for t in &view.terminals {
        let mapped = snap.and_then(|s| {
            s.mappings
                .iter()
                .find(|m| m.terminal == t.name && m.request_id == view.id)
        });
        let address = match mapped {
            Some(m) => Some(m.real),
            None => web.app.names.resolve(&t.name).await.ok(),
        };
        local.push(TerminalLocal {
            name: t.name.clone(),
            address,
            nat_address: t.nat_address,
            active: mapped.is_some(),
        });
    }
    RequestInfo { view, local }
}

#[derive(Debug, Serialize)]
struct Choice {
    name: TerminalName,
    description: String,
    address: Option<Ipv4Addr>,
}

#[derive(Debug, Serialize)]
struct Overview {
    site_name: String,
    mode: &'static str,
    standalone: bool,
    server_connected: bool,
    server_error: Option<String>,
    problem: Option<String>,
    terminals: Vec<Choice>,
    requests: Vec<RequestInfo>,
    tunnel_up: bool,
    now: UnixMillis,
}

async fn overview(State(web): State<Arc<Web>>, method: Method, headers: HeaderMap) -> Response {
    if let Err(r) = web.authorize(&method, &headers) {
        return r;
    }
    let app = &web.app;
    let mut server_error = None;
    let mut views = match &app.server {
        Some(server) => {
            match tokio::time::timeout(Duration::from_secs(3), server.requests()).await {
                Ok(Ok(v)) => {
                    app.update_control(|c| c.requests = v.clone());
                    v
                }
                Ok(Err(e)) => {
                    server_error = Some(e.to_string());
                    app.control().requests
                }
                Err(_) => {
                    server_error = Some("the maintenance center does not answer".to_owned());
                    app.control().requests
                }
            }
        }
        None => Vec::new(),
    };
    // Open requests first, newest first; then the five latest closed ones.
    views.sort_by(|a, b| {
        b.state
            .is_open()
            .cmp(&a.state.is_open())
            .then(b.received_at.cmp(&a.received_at))
    });
    let open = views.iter().filter(|v| v.state.is_open()).count();
    views.truncate(open + 5);
    let snap = app.dataplane.snapshot().await.ok();
    let mut requests = Vec::with_capacity(views.len());
    for v in views {
        requests.push(request_info(&web, v, snap.as_ref()).await);
    }
    let descriptions: BTreeMap<&TerminalName, &str> = app
        .settings
        .terminals
        .iter()
        .map(|t| (&t.name, t.description.as_str()))
        .collect();
    let terminals = app
        .names
        .configured()
        .map(|(n, a)| Choice {
            name: n.clone(),
            description: descriptions.get(n).copied().unwrap_or("").to_owned(),
            address: a,
        })
        .collect();
    let control = app.control();
    axum::Json(Overview {
        site_name: app.site_name.clone(),
        mode: match app.mode {
            Mode::Packet => "packet",
            Mode::Netstack => "netstack",
        },
        standalone: app.server.is_none(),
        server_connected: server_error.is_none() && (control.connected || app.server.is_none()),
        server_error: server_error.or(control.last_error),
        problem: control.problem,
        terminals,
        requests,
        tunnel_up: snap
            .as_ref()
            .and_then(|s| s.tunnel.as_ref())
            .is_some_and(|t| t.up),
        now: crate::dataplane::wall_now(),
    })
    .into_response()
}

async fn revoke(
    State(web): State<Arc<Web>>,
    Path(id): Path<String>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = web.authorize(&method, &headers) {
        return r;
    }
    let Ok(id) = id.parse::<RequestId>() else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "id: not a request id",
            Some("id"),
        );
    };
    // Consent ends here first: whatever happens to the call below.
    let removed = match web.app.dataplane.revoke(id).await {
        Ok(n) => n,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                &format!("{e:#}"),
                None,
            );
        }
    };
    tracing::info!(request.id = %id, removed, "end access now");
    let Some(server) = web.app.server.clone() else {
        return axum::Json(serde_json::json!({ "ended_locally": true, "request": null }))
            .into_response();
    };
    match server.revoke(id).await {
        Ok(view) => {
            let snap = web.app.dataplane.snapshot().await.ok();
            let info = request_info(&web, view, snap.as_ref()).await;
            axum::Json(serde_json::json!({ "ended_locally": true, "request": info }))
                .into_response()
        }
        Err(CallError::Transport(detail)) => {
            tracing::warn!(request.id = %id, error = %detail, "revoke not delivered; retrying in the background");
            tokio::spawn(retry_revoke(web.app.clone(), id));
            (
                StatusCode::ACCEPTED,
                axum::Json(serde_json::json!({
                    "ended_locally": true,
                    "request": null,
                    "message": "Access has ended on this router. The maintenance center will be told as soon as it can be reached.",
                })),
            )
                .into_response()
        }
        Err(e) => call_error(e),
    }
}

async fn retry_revoke(app: Arc<App>, id: RequestId) {
    let Some(server) = app.server.clone() else {
        return;
    };
    let mut backoff =
        vpnnat::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(30), id.0 | 1);
    for _ in 0..1000 {
        tokio::time::sleep(backoff.next_delay()).await;
        match server.revoke(id).await {
            Ok(_) => {
                tracing::info!(request.id = %id, "revoke delivered");
                return;
            }
            Err(CallError::Transport(_)) => {}
            Err(e) => {
                tracing::warn!(request.id = %id, error = %e, "revoke refused by the server");
                return;
            }
        }
    }
}

/// The status document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    /// The site.
    pub site_id: u64,
    /// Its name.
    pub site_name: String,
    /// `packet` or `netstack`.
    pub mode: String,
    /// The server URL, or `standalone`.
    pub server: String,
    /// Whether the server is reachable.
    pub connected: bool,
    /// The last control-plane error.
    pub last_error: Option<String>,
    /// The desired-state version received.
    pub desired_version: Option<u64>,
    /// The version applied.
    pub applied_version: Option<u64>,
    /// The server's capacity note.
    pub problem: Option<String>,
    /// Errors of the last reconciliation.
    pub apply_errors: Vec<String>,
    /// The local UDP port of the tunnel.
    pub local_port: u16,
    /// The tunnel.
    pub tunnel: Option<TunnelStatus>,
    /// Mappings in force.
    pub mappings: Vec<MappingStatus>,
    /// Drops by reason (non-zero only).
    pub drops: BTreeMap<String, u64>,
    /// Packets into the LAN side.
    pub to_lan_packets: u64,
    /// Packets into the tunnel.
    pub to_tunnel_packets: u64,
    /// Mappings removed at their expiry by the agent itself.
    pub mappings_expired: u64,
    /// Failure reports accepted by the server.
    pub failures_reported: u64,
}

/// The tunnel in [`StatusView`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TunnelStatus {
    /// The gateway.
    pub gateway_id: u64,
    /// Its endpoint.
    pub endpoint: SocketAddr,
    /// Its key.
    pub public_key: PublicKey,
    /// Whether a session is established.
    pub up: bool,
    /// The last handshake.
    pub latest_handshake: Option<UnixMillis>,
    /// Handshakes completed.
    pub handshakes: u64,
    /// Inner bytes received.
    pub rx_bytes: u64,
    /// Inner bytes sent.
    pub tx_bytes: u64,
}

/// A mapping in [`StatusView`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MappingStatus {
    /// NAT address.
    pub nat: Ipv4Addr,
    /// Terminal.
    pub terminal: String,
    /// Real address.
    pub real: Ipv4Addr,
    /// Request.
    pub request_id: u64,
    /// Expiry.
    pub expires_at: UnixMillis,
}

async fn status_view(web: &Web) -> anyhow::Result<StatusView> {
    let app = &web.app;
    let snap = app.dataplane.snapshot().await?;
    let control = app.control();
    Ok(StatusView {
        site_id: app.site_id.0,
        site_name: app.site_name.clone(),
        mode: match app.mode {
            Mode::Packet => "packet".to_owned(),
            Mode::Netstack => "netstack".to_owned(),
        },
        server: app
            .server
            .as_ref()
            .map_or_else(|| "standalone".to_owned(), |s| s.base().to_owned()),
        connected: control.connected || app.server.is_none(),
        last_error: control.last_error,
        desired_version: control.desired_version,
        applied_version: snap.applied_version,
        problem: control.problem,
        apply_errors: control.apply_errors,
        local_port: snap.local_port,
        tunnel: snap.tunnel.as_ref().map(|t| TunnelStatus {
            gateway_id: t.gateway_id.0,
            endpoint: t.endpoint,
            public_key: t.public_key,
            up: t.up,
            latest_handshake: snap.last_handshake,
            handshakes: t.stats.handshakes,
            rx_bytes: t.stats.rx_bytes,
            tx_bytes: t.stats.tx_bytes,
        }),
        mappings: snap
            .mappings
            .iter()
            .map(|m| MappingStatus {
                nat: m.nat,
                terminal: m.terminal.to_string(),
                real: m.real,
                request_id: m.request_id.0,
                expires_at: m.expires_at,
            })
            .collect(),
        drops: snap
            .counters
            .drops
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| (r.as_str().to_owned(), n))
            .collect(),
        to_lan_packets: snap.counters.to_lan_packets,
        to_tunnel_packets: snap.counters.to_tunnel_packets,
        mappings_expired: snap.counters.mappings_expired,
        failures_reported: app
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .reported,
    })
}

async fn status(State(web): State<Arc<Web>>, method: Method, headers: HeaderMap) -> Response {
    if let Err(r) = web.authorize(&method, &headers) {
        return r;
    }
    match status_view(&web).await {
        Ok(s) => axum::Json(s).into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &format!("{e:#}"),
            None,
        ),
    }
}

async fn health() -> Response {
    axum::Json(serde_json::json!({ "status": "ok" })).into_response()
}

async fn metrics(State(web): State<Arc<Web>>) -> Response {
    let Ok(snap) = web.app.dataplane.snapshot().await else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "internal",
            "data plane stopped",
            None,
        );
    };
    let control = web.app.control();
    let failures = *web
        .app
        .failures
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut m = String::new();
    let c = &snap.counters;
    let _ = writeln!(m, "# HELP vpnnat_agent_mappings NAT mappings in force.");
    let _ = writeln!(m, "# TYPE vpnnat_agent_mappings gauge");
    let _ = writeln!(m, "vpnnat_agent_mappings {}", snap.mappings.len());
    let _ = writeln!(
        m,
        "# HELP vpnnat_agent_tunnel_up Whether the tunnel to the gateway has a session."
    );
    let _ = writeln!(m, "# TYPE vpnnat_agent_tunnel_up gauge");
    let up = snap.tunnel.as_ref().is_some_and(|t| t.up);
    let _ = writeln!(m, "vpnnat_agent_tunnel_up {}", u8::from(up));
    let _ = writeln!(
        m,
        "# HELP vpnnat_agent_control_connected Whether the maintenance server answers."
    );
    let _ = writeln!(m, "# TYPE vpnnat_agent_control_connected gauge");
    let _ = writeln!(
        m,
        "vpnnat_agent_control_connected {}",
        u8::from(control.connected)
    );
    let _ = writeln!(
        m,
        "# HELP vpnnat_agent_packets_total Packets forwarded, by direction."
    );
    let _ = writeln!(m, "# TYPE vpnnat_agent_packets_total counter");
    let _ = writeln!(
        m,
        "vpnnat_agent_packets_total{{direction=\"to_lan\"}} {}",
        c.to_lan_packets
    );
    let _ = writeln!(
        m,
        "vpnnat_agent_packets_total{{direction=\"to_tunnel\"}} {}",
        c.to_tunnel_packets
    );
    let _ = writeln!(
        m,
        "# HELP vpnnat_agent_bytes_total Inner bytes forwarded, by direction."
    );
    let _ = writeln!(m, "# TYPE vpnnat_agent_bytes_total counter");
    let _ = writeln!(
        m,
        "vpnnat_agent_bytes_total{{direction=\"to_lan\"}} {}",
        c.to_lan_bytes
    );
    let _ = writeln!(
        m,
        "vpnnat_agent_bytes_total{{direction=\"to_tunnel\"}} {}",
        c.to_tunnel_bytes
    );
    let _ = writeln!(
        m,
        "# HELP vpnnat_agent_drops_total Packets dropped, by reason."
    );
    let _ = writeln!(m, "# TYPE vpnnat_agent_drops_total counter");
    for (r, n) in c.drops.iter() {
        let _ = writeln!(
            m,
            "vpnnat_agent_drops_total{{reason=\"{}\"}} {n}",
            r.as_str()
        );
    }
    let _ = writeln!(
        m,
        "# HELP vpnnat_agent_mappings_expired_total Mappings the agent removed at their expiry."
    );
    let _ = writeln!(m, "# TYPE vpnnat_agent_mappings_expired_total counter");
    let _ = writeln!(
        m,
        "vpnnat_agent_mappings_expired_total {}",
        c.mappings_expired
    );
    if let Some(t) = &snap.tunnel {
        let _ = writeln!(
            m,
            "# HELP vpnnat_agent_tunnel_handshakes_total Handshakes completed."
        );
        let _ = writeln!(m, "# TYPE vpnnat_agent_tunnel_handshakes_total counter");
        let _ = writeln!(
            m,
            "vpnnat_agent_tunnel_handshakes_total {}",
            t.stats.handshakes
        );
    }
    let _ = writeln!(
        m,
        "# HELP vpnnat_agent_io_errors_total Socket and TUN errors."
    );
    let _ = writeln!(m, "# TYPE vpnnat_agent_io_errors_total counter");
    let _ = writeln!(m, "vpnnat_agent_io_errors_total {}", snap.io.io_errors);
    let _ = writeln!(
        m,
        "# HELP vpnnat_agent_udp_datagrams_total Tunnel datagrams, by direction."
    );
    let _ = writeln!(m, "# TYPE vpnnat_agent_udp_datagrams_total counter");
    let _ = writeln!(
        m,
        "vpnnat_agent_udp_datagrams_total{{direction=\"received\"}} {}",
        snap.io.udp_datagrams_received
    );
    let _ = writeln!(
        m,
        "vpnnat_agent_udp_datagrams_total{{direction=\"sent\"}} {}",
        snap.io.udp_datagrams_sent
    );
    if let Some(n) = &snap.netstack {
        let _ = writeln!(
            m,
            "# HELP vpnnat_agent_netstack_tcp_connections_total TCP connections relayed."
        );
        let _ = writeln!(
            m,
            "# TYPE vpnnat_agent_netstack_tcp_connections_total counter"
        );
        let _ = writeln!(
            m,
            "vpnnat_agent_netstack_tcp_connections_total {}",
            n.tcp_connections
        );
        let _ = writeln!(
            m,
            "# HELP vpnnat_agent_netstack_tcp_open TCP connections open."
        );
        let _ = writeln!(m, "# TYPE vpnnat_agent_netstack_tcp_open gauge");
        let _ = writeln!(m, "vpnnat_agent_netstack_tcp_open {}", n.tcp_open);
        let _ = writeln!(
            m,
            "# HELP vpnnat_agent_netstack_tcp_refused_total TCP connections the terminal refused."
        );
        let _ = writeln!(m, "# TYPE vpnnat_agent_netstack_tcp_refused_total counter");
        let _ = writeln!(
            m,
            "vpnnat_agent_netstack_tcp_refused_total {}",
            n.tcp_refused
        );
        let _ = writeln!(
            m,
            "# HELP vpnnat_agent_netstack_udp_flows_total UDP flows relayed."
        );
        let _ = writeln!(m, "# TYPE vpnnat_agent_netstack_udp_flows_total counter");
        let _ = writeln!(m, "vpnnat_agent_netstack_udp_flows_total {}", n.udp_flows);
        let _ = writeln!(
            m,
            "# HELP vpnnat_agent_netstack_icmp_echo_total ICMP echoes relayed, by kind."
        );
        let _ = writeln!(m, "# TYPE vpnnat_agent_netstack_icmp_echo_total counter");
        let _ = writeln!(
            m,
            "vpnnat_agent_netstack_icmp_echo_total{{kind=\"request\"}} {}",
            n.icmp_echo_requests
        );
        let _ = writeln!(
            m,
            "vpnnat_agent_netstack_icmp_echo_total{{kind=\"reply\"}} {}",
            n.icmp_echo_replies
        );
        let _ = writeln!(
            m,
            "vpnnat_agent_netstack_icmp_echo_total{{kind=\"unavailable\"}} {}",
            n.icmp_unavailable
        );
        let _ = writeln!(
            m,
            "# HELP vpnnat_agent_netstack_dropped_total Packets the netstack dropped."
        );
        let _ = writeln!(m, "# TYPE vpnnat_agent_netstack_dropped_total counter");
        let _ = writeln!(m, "vpnnat_agent_netstack_dropped_total {}", n.dropped);
    }
    let _ = writeln!(
        m,
        "# HELP vpnnat_agent_failure_reports_total Failure reports, by outcome."
    );
    let _ = writeln!(m, "# TYPE vpnnat_agent_failure_reports_total counter");
    let _ = writeln!(
        m,
        "vpnnat_agent_failure_reports_total{{outcome=\"reported\"}} {}",
        failures.reported
    );
    let _ = writeln!(
        m,
        "vpnnat_agent_failure_reports_total{{outcome=\"undelivered\"}} {}",
        failures.undelivered
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m,
    )
        .into_response()
}

/// Fetches the status document from a running agent (`router-agent status`).
///
/// # Errors
/// When the agent cannot be reached or refuses the password.
pub async fn fetch_status(url: &str, password: &str) -> anyhow::Result<StatusView> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let resp = client
        .get(format!("{}{STATUS_PATH}", url.trim_end_matches('/')))
        .bearer_auth(password)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the agent at {url}: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        anyhow::bail!("{url}{STATUS_PATH}: HTTP {status}: {body}");
    }
    Ok(resp.json().await?)
}

/// Renders the status the way `wg show` renders an interface.
pub fn render_status(s: &StatusView, now: UnixMillis) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "site: {} ({})", s.site_name, s.site_id);
    let _ = writeln!(o, "  mode: {}", s.mode);
    let _ = writeln!(
        o,
        "  server: {} ({})",
        s.server,
        if s.connected {
            "connected"
        } else {
            "unreachable"
        }
    );
    if let Some(e) = &s.last_error {
        let _ = writeln!(o, "  last error: {e}");
    }
    if let Some(p) = &s.problem {
        let _ = writeln!(o, "  problem: {p}");
    }
    let _ = writeln!(
        o,
        "  desired state: {} (applied {})",
        s.desired_version.map_or("-".to_owned(), |v| v.to_string()),
        s.applied_version.map_or("-".to_owned(), |v| v.to_string())
    );
    for e in &s.apply_errors {
        let _ = writeln!(o, "  apply error: {e}");
    }
    let _ = writeln!(o, "  listening port: {}", s.local_port);
    match &s.tunnel {
        None => {
            let _ = writeln!(o, "\ntunnel: none (no mapping)");
        }
        Some(t) => {
            let _ = writeln!(o, "\npeer: {} (gateway {})", t.public_key, t.gateway_id);
            let _ = writeln!(o, "  endpoint: {}", t.endpoint);
            let _ = writeln!(o, "  session: {}", if t.up { "up" } else { "handshaking" });
            if let Some(h) = t.latest_handshake {
                let ago = now.0.saturating_sub(h.0) / 1000;
                let _ = writeln!(o, "  latest handshake: {ago} seconds ago");
            }
            let _ = writeln!(
                o,
                "  transfer: {} B received, {} B sent",
                t.rx_bytes, t.tx_bytes
            );
        }
    }
    if !s.mappings.is_empty() {
        let _ = writeln!(o, "\nmappings:");
        for m in &s.mappings {
            let left = m.expires_at.0.saturating_sub(now.0) / 1000;
            let _ = writeln!(
                o,
                "  {} -> {} ({}, request {}, expires in {}s)",
                m.nat, m.real, m.terminal, m.request_id, left
            );
        }
    }
    let _ = writeln!(
        o,
        "\npackets: {} to LAN, {} to tunnel; {} mappings expired locally",
        s.to_lan_packets, s.to_tunnel_packets, s.mappings_expired
    );
    if !s.drops.is_empty() {
        let drops: Vec<String> = s.drops.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(o, "drops: {}", drops.join(" "));
    }
    o
}
