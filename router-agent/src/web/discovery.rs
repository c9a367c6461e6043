//! The page's list of the LAN's computers (`GET /api/discovery`), the
//! "search the network" button (`POST /api/discovery/sweep`) and the
//! customer's names for them (`POST /api/discovery/hosts/{mac}/name`).
//! Addresses and MAC addresses are shown here, on the customer's own LAN,
//! and never sent to the server.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::auth::Authorized;
use super::{Web, error, parse};
use crate::discovery::{DiscoveryError, Mac};

fn off() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "discovery_off",
        "the list of computers is turned off on this router (discovery.enabled)",
        None,
    )
}

/// `GET /api/discovery`: the hosts, by address.
pub(super) async fn list(_: Authorized, State(web): State<Arc<Web>>) -> Response {
    let Some(d) = &web.app.discovery else {
        return axum::Json(serde_json::json!({
            "enabled": false, "sweep": false, "sweeping": false, "hosts": [],
        }))
        .into_response();
    };
    let (sweep, sweeping) = d.sweep_state();
    axum::Json(serde_json::json!({
        "enabled": true,
        "sweep": sweep,
        "sweeping": sweeping,
        "hosts": d.hosts(),
    }))
    .into_response()
}

/// `POST /api/discovery/sweep`: searches the LAN now (202), unless turned
/// off or unbounded (409) or too soon after the last search (429).
pub(super) async fn sweep(_: Authorized, State(web): State<Arc<Web>>) -> Response {
    let Some(d) = &web.app.discovery else {
        return off();
    };
    match d.sweep() {
        Ok(n) => (
            StatusCode::ACCEPTED,
            axum::Json(serde_json::json!({ "addresses": n })),
        )
            .into_response(),
        Err(e @ DiscoveryError::TooSoon(_)) => error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_soon",
            &e.to_string(),
            None,
        ),
        Err(e) => error(
            StatusCode::CONFLICT,
            "sweep_unavailable",
            &e.to_string(),
            None,
        ),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rename {
    name: String,
}

/// `POST /api/discovery/hosts/{mac}/name`: the customer's name for a host
/// (empty: forget it); kept across restarts.
pub(super) async fn rename(
    _: Authorized,
    State(web): State<Arc<Web>>,
    Path(mac): Path<String>,
    body: Bytes,
) -> Response {
    let Some(d) = &web.app.discovery else {
        return off();
    };
    let Ok(mac) = mac.parse::<Mac>() else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "mac: not a MAC address (aa:bb:cc:dd:ee:ff)",
            Some("mac"),
        );
    };
    let r: Rename = match parse(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    match d.rename(mac, &r.name) {
        Ok(h) => axum::Json(h).into_response(),
        Err(e @ DiscoveryError::Unknown(_)) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            &e.to_string(),
            Some("mac"),
        ),
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            &format!("name: {e}"),
            Some("name"),
        ),
    }
}
