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
//!
//! By concern: who may call (`auth`), the page's files (`assets`), the
//! maintenance request flow (`requests`), the LAN's computers (`discovery`),
//! the status document (`status`),
//! the Prometheus counters (`metrics`).

// Handlers return a finished `Response` as their error: boxing it would
// only move the allocation.
#![allow(clippy::result_large_err)]

mod assets;
mod auth;
mod discovery;
mod metrics;
mod requests;
mod status;

use std::net::Ipv4Addr;
use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use vpnnat::gateway::Prefix;
use vpnnat::messages::{ApiError, paths};

pub use self::status::{ROTATE_PATH, STATUS_PATH, StatusView};
use crate::app::App;
use crate::client::CallError;
use crate::settings::Mode;

/// Largest request body.
const BODY_LIMIT: usize = 64 * 1024;

/// The web layer's state.
pub struct Web {
    app: Arc<App>,
    auth: auth::Auth,
}

impl std::fmt::Debug for Web {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Web")
            .field("allowed", &self.auth.allowed)
            .finish_non_exhaustive()
    }
}

impl Web {
    /// The web layer for `app` with the page password, the client prefixes
    /// and the host names the page answers to.
    pub fn new(
        app: Arc<App>,
        password: &str,
        allowed: Vec<Prefix>,
        denied: Vec<Ipv4Addr>,
        hosts: Vec<String>,
    ) -> Self {
        Self {
            app,
            auth: auth::Auth::new(password, allowed, denied, hosts),
        }
    }
}

/// The router: page, API, metrics.
pub fn router(web: Arc<Web>) -> Router {
    Router::new()
        .route("/", get(assets::page))
        .route("/app.js", get(assets::script))
        .route("/style.css", get(assets::style))
        .route("/api/login", post(auth::login))
        .route("/api/logout", post(auth::logout))
        .route("/api/session", get(auth::session))
        .route("/api/overview", get(requests::overview))
        .route("/api/check", post(requests::check))
        .route("/api/requests", post(requests::create_request))
        .route("/api/requests/{id}/revoke", post(requests::revoke))
        .route("/api/discovery", get(discovery::list))
        .route("/api/discovery/sweep", post(discovery::sweep))
        .route("/api/discovery/hosts/{mac}/name", post(discovery::rename))
        .route(
            "/api/preferences",
            get(requests::preferences).post(requests::set_preferences),
        )
        .route(STATUS_PATH, get(status::status))
        .route(ROTATE_PATH, post(status::rotate))
        .route(paths::METRICS, get(metrics::metrics))
        .route(paths::HEALTH, get(health))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(
            web.clone(),
            auth::lan_only,
        ))
        .with_state(web)
}

async fn health() -> Response {
    axum::Json(serde_json::json!({ "status": "ok" })).into_response()
}

/// How the page and the status document name the data-plane mode.
fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Packet => "packet",
        Mode::Netstack => "netstack",
    }
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
