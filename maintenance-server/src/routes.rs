//! Which handler answers which route (`vpnnat::messages::paths`), and the
//! layers every request passes: the body limit and the trace span.

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use tower_http::trace::TraceLayer;
use vpnnat::messages::paths;

use crate::console;
use crate::handlers::{agent, gateway, lifecycle, misc, operator, technician};
use crate::openapi;
use crate::state::AppState;

/// All routes.
pub fn router(state: AppState) -> Router {
    let limit = state.settings.http.body_limit_bytes;
    Router::new()
        .route(paths::ENROLL, post(agent::enroll))
        .route(paths::AGENT_REQUESTS, post(agent::create).get(agent::list))
        .route(paths::AGENT_REVOKE, post(agent::revoke))
        .route(paths::AGENT_FAILURES, post(agent::failure))
        .route(paths::AGENT_STATE, get(agent::state))
        .route(paths::AGENT_APPLIED, post(agent::applied))
        .route(paths::GATEWAY_REGISTER, post(gateway::register))
        .route(paths::GATEWAY_HEARTBEAT, post(gateway::heartbeat))
        .route(paths::GATEWAY_STATE, get(gateway::state))
        .route(paths::GATEWAY_APPLIED, post(gateway::applied))
        .route(
            paths::SITES,
            post(operator::create_site).get(operator::sites),
        )
        .route(paths::SITE_TOKEN, post(operator::site_token))
        .route(
            paths::GATEWAYS,
            post(operator::create_gateway).get(operator::gateways),
        )
        .route(paths::GATEWAY_DRAIN, post(operator::drain))
        .route(paths::SITE, delete(lifecycle::delete_site))
        .route(paths::SITE_DISABLE, post(lifecycle::disable_site))
        .route(paths::SITE_ROTATE, post(lifecycle::rotate_site))
        .route(paths::GATEWAY, delete(lifecycle::delete_gateway))
        .route(paths::GATEWAY_DISABLE, post(lifecycle::disable_gateway))
        .route(paths::GATEWAY_ROTATE, post(lifecycle::rotate_gateway))
        .route(paths::TECHNICIANS, post(lifecycle::set_technician))
        .route(paths::TECHNICIAN, delete(lifecycle::delete_technician))
        .route(
            paths::TECHNICIAN_DISABLE,
            post(lifecycle::disable_technician),
        )
        .route(paths::LOGIN, post(technician::login))
        .route(paths::LOGOUT, post(technician::logout))
        .route(paths::REQUESTS, get(technician::requests))
        .route(paths::REQUEST_START, post(technician::start))
        .route(paths::REQUEST_END, post(technician::end))
        .route(paths::FAILURES, get(technician::failures))
        .route(paths::AUDIT, get(technician::audit))
        .route(paths::CONSOLE_EVENTS, get(technician::events))
        .route(technician::ME, get(technician::me))
        .route(paths::OPENAPI, get(openapi::serve))
        .route(paths::HEALTH, get(misc::health))
        .route(paths::METRICS, get(misc::metrics))
        .merge(console::routes())
        .fallback(misc::not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<_>| {
                // Low cardinality: the matched route, not the raw path.
                let route = req
                    .extensions()
                    .get::<axum::extract::MatchedPath>()
                    .map_or("-", axum::extract::MatchedPath::as_str)
                    .to_owned();
                tracing::debug_span!("http", method = %req.method(), route)
            }),
        )
        .with_state(state)
}
