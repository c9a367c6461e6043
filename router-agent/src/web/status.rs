//! The status document (`GET /api/status`): what `router-agent status`
//! prints.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use vpnnat::messages::{PublicKey, Transport, UnixMillis};

use super::auth::Authorized;
use super::{Web, error, mode_name};
use crate::dataplane::Snapshot;

/// The status document (`GET /api/status`, printed by `router-agent status`).
pub const STATUS_PATH: &str = "/api/status";

/// `POST` [`vpnnat::messages::PlannedRotation`] → 202: a planned rotation
/// asked for here (`router-agent rotate`) instead of by the server.
pub const ROTATE_PATH: &str = "/api/rotate";

/// `POST /api/rotate`: hands a local request for a planned rotation to the
/// task that carries out the server's ([`crate::rotation`]), as if the
/// server had asked (the server's next document replaces it: a key rotation
/// goes on from its registered next key, a credential is rotated once).
pub(super) async fn rotate(
    _: Authorized,
    State(web): State<Arc<Web>>,
    body: axum::body::Bytes,
) -> Response {
    let what: vpnnat::messages::PlannedRotation = match super::parse(&body) {
        Ok(w) => w,
        Err(r) => return r,
    };
    if let Err(e) = what.validate() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            &e.message,
            Some(e.field),
        );
    }
    if web.app.server.is_none() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "standalone",
            "this agent runs without a maintenance server; nothing to rotate with",
            None,
        );
    }
    web.app.rotation.send_modify(|r| {
        let mut next = r.clone().unwrap_or_default();
        next.rotate_key |= what.key;
        next.rotate_credential |= what.credential;
        *r = Some(next);
    });
    tracing::info!(
        key = what.key,
        credential = what.credential,
        "planned rotation asked for on this router"
    );
    (
        StatusCode::ACCEPTED,
        axum::Json(serde_json::json!({ "accepted": true })),
    )
        .into_response()
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
    /// Whether the tunnel works: a session is established and the gateway
    /// is not known to be gone (see `state`).
    pub up: bool,
    /// `up`, `connecting` or `down`.
    #[serde(default)]
    pub state: String,
    /// Why it is down.
    #[serde(default)]
    pub note: Option<String>,
    /// How its datagrams travel: `udp`, `tls` or `tls_proxy`.
    #[serde(default)]
    pub transport: Option<Transport>,
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

/// The tunnel as the customer and the status command see it: `none` (no
/// access open, no tunnel), `connecting`, `up`, or `down` with the reason.
/// Down within seconds of the gateway going away, not only once WireGuard's
/// own timers give up: when the server reports a problem while it still
/// names a gateway (the site's gateway is down and no other has a free
/// slot: the site is stranded), or when data sent into the tunnel has gone
/// unanswered for [`crate::dataplane::SILENCE_LIMIT`].
pub(super) fn tunnel_state(
    snap: &Snapshot,
    problem: Option<&str>,
) -> (&'static str, Option<String>) {
    let Some(t) = &snap.tunnel else {
        return ("none", None);
    };
    if let Some(p) = problem {
        return ("down", Some(p.to_owned()));
    }
    if let Some(d) = snap.silent_for {
        return (
            "down",
            Some(format!(
                "the gateway has not answered for {} s",
                d.as_secs()
            )),
        );
    }
    if t.up {
        ("up", None)
    } else {
        ("connecting", None)
    }
}

async fn status_view(web: &Web) -> anyhow::Result<StatusView> {
    let app = &web.app;
    let snap = app.dataplane.snapshot().await?;
    let control = app.control();
    let (state, note) = tunnel_state(&snap, control.problem.as_deref());
    Ok(StatusView {
        site_id: app.site_id.0,
        site_name: app.site_name.clone(),
        mode: mode_name(app.mode).to_owned(),
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
            up: state == "up",
            state: state.to_owned(),
            note: note.clone(),
            transport: app.carrier.transport(),
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

/// `GET /api/status`.
pub(super) async fn status(_: Authorized, State(web): State<Arc<Web>>) -> Response {
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
