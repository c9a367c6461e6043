//! The technician console: static HTML, JavaScript and CSS embedded in the
//! binary (no CDN, no build step), served with a strict Content Security
//! Policy. The page talks to the technician API and follows
//! `/api/v1/events` for live updates.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::state::AppState;

const INDEX: &str = include_str!("console/index.html");
const APP_JS: &str = include_str!("console/app.js");
const STYLE: &str = include_str!("console/style.css");
const FAVICON: &str = include_str!("console/favicon.svg");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
}

/// The console's pages and assets: path, content type, body.
pub const ASSETS: &[(&str, &str, &str)] = &[
    ("/", "text/html; charset=utf-8", INDEX),
    ("/console", "text/html; charset=utf-8", INDEX),
    ("/console/app.js", "text/javascript; charset=utf-8", APP_JS),
    ("/console/style.css", "text/css; charset=utf-8", STYLE),
    ("/console/favicon.svg", "image/svg+xml", FAVICON),
];

/// `/`, `/console` and the assets under `/console/` ([`ASSETS`]).
pub fn routes() -> Router<AppState> {
    ASSETS
        .iter()
        .fold(Router::new(), |router, &(path, content_type, body)| {
            router.route(path, get(move || async move { asset(content_type, body) }))
        })
}
