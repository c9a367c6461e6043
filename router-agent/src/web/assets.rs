//! The page itself: HTML, script and style, compiled into the binary.

use axum::http::header;
use axum::response::{IntoResponse, Response};

const PAGE: &str = include_str!("../page/index.html");
const SCRIPT: &str = include_str!("../page/app.js");
const STYLE: &str = include_str!("../page/style.css");

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

/// `GET /`.
pub(super) async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

/// `GET /app.js`.
pub(super) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /style.css`.
pub(super) async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}
