//! Which handler answers which route (`vpnnat::messages::paths`), and the
//! layers every request passes: the body limit, HSTS when the console is
//! reached over HTTPS, and the trace span (whose log level says whether a
//! 5xx is a failure or an intended refusal).

use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, Method, Response, header};
use axum::routing::{MethodRouter, delete, get, post};
use tower_http::classify::ServerErrorsFailureClass;
use tower_http::trace::TraceLayer;
use vpnnat::messages::paths;

use crate::console;
use crate::error::IntendedRefusal;
use crate::handlers::{
    agent, agentless, gateway, lifecycle, misc, operator, rotation, teams, technician,
};
use crate::openapi;
use crate::state::AppState;

/// `Strict-Transport-Security` when the console is reached over HTTPS: a
/// year, so that a browser never again sends the session cookie in clear.
pub const HSTS: &str = "max-age=31536000";

/// Every API route, one method each: (method, path, handler). The router is
/// built from this list, and the OpenAPI test checks it against the document.
pub fn api_routes() -> Vec<(Method, &'static str, MethodRouter<AppState>)> {
    vec![
        (Method::POST, paths::ENROLL, post(agent::enroll)),
        (Method::POST, paths::AGENT_REQUESTS, post(agent::create)),
        (Method::GET, paths::AGENT_REQUESTS, get(agent::list)),
        (Method::POST, paths::AGENT_REVOKE, post(agent::revoke)),
        (Method::POST, paths::AGENT_FAILURES, post(agent::failure)),
        (Method::GET, paths::AGENT_STATE, get(agent::state)),
        (Method::POST, paths::AGENT_APPLIED, post(agent::applied)),
        (Method::POST, paths::AGENT_KEY, post(rotation::next_key)),
        (
            Method::POST,
            paths::AGENT_KEY_COMMIT,
            post(rotation::commit_key),
        ),
        (
            Method::POST,
            paths::AGENT_CREDENTIAL,
            post(rotation::credential),
        ),
        (
            Method::POST,
            paths::SITE_PLANNED_ROTATION,
            post(rotation::planned),
        ),
        (
            Method::POST,
            paths::GATEWAY_REGISTER,
            post(gateway::register),
        ),
        (
            Method::POST,
            paths::GATEWAY_HEARTBEAT,
            post(gateway::heartbeat),
        ),
        (Method::GET, paths::GATEWAY_STATE, get(gateway::state)),
        (Method::POST, paths::GATEWAY_APPLIED, post(gateway::applied)),
        (Method::POST, paths::SITES, post(operator::create_site)),
        (Method::GET, paths::SITES, get(operator::sites)),
        (Method::POST, paths::SITE_TOKEN, post(operator::site_token)),
        (
            Method::POST,
            paths::GATEWAYS,
            post(operator::create_gateway),
        ),
        (Method::GET, paths::GATEWAYS, get(operator::gateways)),
        (Method::POST, paths::GATEWAY_DRAIN, post(operator::drain)),
        (Method::DELETE, paths::SITE, delete(lifecycle::delete_site)),
        (
            Method::POST,
            paths::SITE_DISABLE,
            post(lifecycle::disable_site),
        ),
        (
            Method::POST,
            paths::SITE_ROTATE,
            post(lifecycle::rotate_site),
        ),
        (
            Method::POST,
            paths::SITE_TUNNEL,
            post(operator::site_tunnel),
        ),
        (Method::GET, paths::SITE_IPSEC, get(operator::site_ipsec)),
        (
            Method::GET,
            paths::SITE_WIREGUARD,
            get(agentless::site_wireguard),
        ),
        (
            Method::POST,
            paths::SITE_REQUESTS,
            post(agentless::create_site_request),
        ),
        (
            Method::DELETE,
            paths::GATEWAY,
            delete(lifecycle::delete_gateway),
        ),
        (
            Method::POST,
            paths::GATEWAY_DISABLE,
            post(lifecycle::disable_gateway),
        ),
        (
            Method::POST,
            paths::GATEWAY_ROTATE,
            post(lifecycle::rotate_gateway),
        ),
        (
            Method::POST,
            paths::GATEWAY_ROTATE_KEY,
            post(lifecycle::rotate_gateway_key),
        ),
        (
            Method::POST,
            paths::TECHNICIANS,
            post(lifecycle::set_technician),
        ),
        (
            Method::DELETE,
            paths::TECHNICIAN,
            delete(lifecycle::delete_technician),
        ),
        (
            Method::POST,
            paths::TECHNICIAN_DISABLE,
            post(lifecycle::disable_technician),
        ),
        (Method::POST, paths::TEAMS, post(teams::create_team)),
        (Method::GET, paths::TEAMS, get(teams::list_teams)),
        (Method::DELETE, paths::TEAM, delete(teams::delete_team)),
        (Method::POST, paths::SITE_TEAM, post(teams::site_team)),
        (
            Method::POST,
            paths::TECHNICIAN_TEAM,
            post(teams::technician_team),
        ),
        (Method::POST, paths::LOGIN, post(technician::login)),
        (Method::POST, paths::LOGOUT, post(technician::logout)),
        (Method::GET, paths::REQUESTS, get(technician::requests)),
        (Method::POST, paths::REQUEST_START, post(technician::start)),
        (Method::POST, paths::REQUEST_END, post(technician::end)),
        (Method::GET, paths::FAILURES, get(technician::failures)),
        (
            Method::POST,
            paths::FAILURE_ACK,
            post(technician::acknowledge_failure),
        ),
        (Method::GET, paths::AUDIT, get(technician::audit)),
        (Method::GET, paths::CONSOLE_EVENTS, get(technician::events)),
        (Method::GET, technician::ME, get(technician::me)),
        (Method::GET, paths::OPENAPI, get(openapi::serve)),
        (Method::GET, paths::HEALTH, get(misc::health)),
        (Method::GET, paths::METRICS, get(misc::metrics)),
    ]
}

/// All routes.
pub fn router(state: AppState) -> Router {
    let limit = state.settings.http.body_limit_bytes;
    let https = state.settings.console_https();
    let mut router = api_routes()
        .into_iter()
        .fold(Router::new(), |r, (_, path, handler)| {
            r.route(path, handler)
        })
        .merge(console::routes())
        .fallback(misc::not_found)
        .layer(DefaultBodyLimit::max(limit));
    if https {
        router = router.layer(axum::middleware::map_response(
            |mut resp: axum::response::Response| async move {
                resp.headers_mut().insert(
                    header::STRICT_TRANSPORT_SECURITY,
                    HeaderValue::from_static(HSTS),
                );
                resp
            },
        ));
    }
    router
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &axum::http::Request<_>| {
                    // Low cardinality: the matched route, not the raw path.
                    let route = req
                        .extensions()
                        .get::<axum::extract::MatchedPath>()
                        .map_or("-", axum::extract::MatchedPath::as_str)
                        .to_owned();
                    tracing::debug_span!("http", method = %req.method(), route)
                })
                .on_response(log_response)
                .on_failure(log_failure),
        )
        .with_state(state)
}

/// A 5xx is logged at ERROR unless it is an [`IntendedRefusal`] (no
/// capacity, pool exhausted, busy: normal answers under load, at WARN, so
/// that they do not page anyone); everything else at DEBUG.
fn log_response<B>(resp: &Response<B>, latency: Duration, _span: &tracing::Span) {
    let status = resp.status().as_u16();
    let ms = latency.as_millis();
    if !resp.status().is_server_error() {
        tracing::debug!(status, latency_ms = ms, "answered");
    } else if resp.extensions().get::<IntendedRefusal>().is_some() {
        tracing::warn!(status, latency_ms = ms, "refused (intended)");
    } else {
        tracing::error!(status, latency_ms = ms, "server error");
    }
}

/// Failures other than a status (the answer's body failed); statuses are
/// logged by [`log_response`].
fn log_failure(class: ServerErrorsFailureClass, latency: Duration, _span: &tracing::Span) {
    if let ServerErrorsFailureClass::Error(e) = class {
        tracing::error!(error = %e, latency_ms = latency.as_millis(), "response failed");
    }
}
