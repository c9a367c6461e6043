//! The maintenance request flow: the overview of terminals and requests,
//! the pre-request check (does each terminal answer on the LAN?), sending a
//! request to the maintenance server, and ending access now (revoke).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use vpnnat::messages::{
    ApiError, Level, MaintenanceRequestView, NewMaintenanceRequest, RequestId, TerminalName,
    Transport, UnixMillis, Urgency,
};

use super::auth::Authorized;
use super::{Web, call_error, error, mode_name, parse};
use crate::dataplane::Snapshot;
use crate::probe;
use crate::revocations::{self, Outcome};
use crate::settings::Check;

/// How long a terminal may take to answer the pre-request check.
const CHECK_TIMEOUT: Duration = Duration::from_millis(1500);

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
    /// `active` (mapped here), `setting_up` (not yet), `refused` (this
    /// router would not map it: see `reason`), `not_found` (no such
    /// computer on the LAN) or `closed` (the request is over).
    state: &'static str,
    /// Why the router refused the terminal, in plain words.
    reason: Option<String>,
}

/// The data plane's refusal of a mapping ("NAT: why", as it reports it in
/// the applied state) in words for the customer.
fn plain_refusal(why: &str) -> String {
    if why.contains("was not made on this router's page") {
        return "Not opened: this request was not made on this page, and this router only opens \
                access that was asked for here (or by a failure report you allowed below)."
            .to_owned();
    }
    if why.contains("does not resolve on the LAN") {
        return "Not opened: no computer of this name was found on your network.".to_owned();
    }
    if let Some((_, other)) = why.split_once("is already mapped as ") {
        return format!(
            "Not opened: this computer is already open to the technician under the address {other}."
        );
    }
    if let Some((_, other)) = why.split_once("the real address is already mapped to ") {
        return format!(
            "Not opened: this computer is already open to the technician under the address {other}."
        );
    }
    if why.contains("not a unicast NAT address") || why.contains("is the masquerade address") {
        return "Not opened: the address the maintenance center chose for it cannot be used on \
                this router. Please call your service provider."
            .to_owned();
    }
    if why.contains("listed twice") {
        return "Not opened: the maintenance center sent this address twice. Please call your \
                service provider."
            .to_owned();
    }
    format!("Not opened: the router could not set up its address ({why}).")
}

/// The refusal the last applied document recorded for `nat`, if any.
fn refusal_of(errors: &[String], nat: Ipv4Addr) -> Option<String> {
    let prefix = format!("{nat}: ");
    errors
        .iter()
        .find_map(|e| e.strip_prefix(&prefix))
        .map(plain_refusal)
}

#[derive(Debug, Serialize)]
struct Created {
    request: RequestInfo,
    warnings: Vec<Warning>,
}

fn no_terminal() -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_field",
        "terminals: choose at least one computer",
        Some("terminals"),
    )
}

/// Resolves what the customer entered; the first bad entry is a 400 naming `terminals`.
async fn resolve_entries(
    web: &Web,
    entries: &[String],
) -> Result<Vec<(String, TerminalName, Ipv4Addr)>, Response> {
    if entries.is_empty() {
        return Err(no_terminal());
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
        return Err(no_terminal());
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

/// `POST /api/check`: resolves the entries and asks each terminal whether it answers.
pub(super) async fn check(_: Authorized, State(web): State<Arc<Web>>, body: Bytes) -> Response {
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

/// `POST /api/requests`: checks the terminals, then sends the request to the server.
pub(super) async fn create_request(
    _: Authorized,
    State(web): State<Arc<Web>>,
    body: Bytes,
) -> Response {
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
    let view = {
        // Held until the id is recorded: the document that lists the new
        // request is applied only after that.
        let _creating = web.app.consent_gate.lock().await;
        let view = match server.create_request(&request).await {
            Ok(v) => v,
            Err(e) => return call_error(e),
        };
        if let Err(e) = web.app.consent.record_created(view.id) {
            tracing::error!(request.id = %view.id, error = %format!("{e:#}"), "request not recorded: its access is not opened after a restart");
        }
        if let Err(e) = web.app.dataplane.consent_to(view.id).await {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                &format!("{e:#}"),
                None,
            );
        }
        view
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
    let errors = web.app.control().apply_errors;
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
        let reason = match (mapped, t.nat_address) {
            (None, Some(nat)) if view.state.is_open() => refusal_of(&errors, nat),
            _ => None,
        };
        let state = if !view.state.is_open() {
            "closed"
        } else if mapped.is_some() {
            "active"
        } else if reason.is_some() {
            "refused"
        } else if address.is_none() {
            "not_found"
        } else {
            "setting_up"
        };
        local.push(TerminalLocal {
            name: t.name.clone(),
            address,
            nat_address: t.nat_address,
            active: mapped.is_some(),
            state,
            reason,
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
    /// `none`, `connecting`, `up` or `down` (see `status::tunnel_state`).
    tunnel_state: &'static str,
    /// Why the tunnel is down.
    tunnel_note: Option<String>,
    /// How the tunnel travels: `udp`, `tls` or `tls_proxy` (none without a tunnel).
    transport: Option<Transport>,
    failure_requests: bool,
    now: UnixMillis,
}

/// `GET /api/overview`: the page's terminals and requests.
pub(super) async fn overview(_: Authorized, State(web): State<Arc<Web>>) -> Response {
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
    let (tunnel_state, tunnel_note) = snap.as_ref().map_or(("none", None), |s| {
        super::status::tunnel_state(s, control.problem.as_deref())
    });
    axum::Json(Overview {
        site_name: app.site_name.clone(),
        mode: mode_name(app.mode),
        standalone: app.server.is_none(),
        server_connected: server_error.is_none() && (control.connected || app.server.is_none()),
        server_error: server_error.or(control.last_error),
        problem: control.problem,
        terminals,
        requests,
        tunnel_up: tunnel_state == "up",
        tunnel_state,
        tunnel_note,
        transport: app.carrier.transport(),
        failure_requests: app.consent.failure_requests(),
        now: crate::dataplane::wall_now(),
    })
    .into_response()
}

/// `POST /api/requests/{id}/revoke`: ends access here at once, then tells the server.
pub(super) async fn revoke(
    _: Authorized,
    State(web): State<Arc<Web>>,
    Path(id): Path<String>,
) -> Response {
    let Ok(id) = id.parse::<RequestId>() else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "id: not a request id",
            Some("id"),
        );
    };
    // Consent ends here first, recorded so that a restart keeps it ended,
    // whatever happens to the call below.
    if let Err(e) = web.app.consent.record_revoked(id) {
        tracing::error!(request.id = %id, error = %format!("{e:#}"), "revocation not recorded");
    }
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
    match revocations::tell(&web.app, &server, id).await {
        Outcome::Confirmed(view) => {
            let snap = web.app.dataplane.snapshot().await.ok();
            let info = request_info(&web, *view, snap.as_ref()).await;
            axum::Json(serde_json::json!({ "ended_locally": true, "request": info }))
                .into_response()
        }
        Outcome::Later(_) => {
            web.app.revocations.notify_one();
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
        Outcome::Refused(e) => call_error(e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Preferences {
    /// Whether a failure report may open access (a maintenance request the
    /// agent then installs).
    failure_requests: bool,
}

/// `GET /api/preferences`: the customer's toggles.
pub(super) async fn preferences(_: Authorized, State(web): State<Arc<Web>>) -> Response {
    axum::Json(serde_json::json!({
        "failure_requests": web.app.consent.failure_requests(),
    }))
    .into_response()
}

/// `POST /api/preferences`: sets the customer's toggles (kept across restarts).
pub(super) async fn set_preferences(
    _: Authorized,
    State(web): State<Arc<Web>>,
    body: Bytes,
) -> Response {
    let p: Preferences = match parse(&body) {
        Ok(p) => p,
        Err(r) => return r,
    };
    if let Err(e) = web.app.consent.set_failure_requests(p.failure_requests) {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &format!("{e:#}"),
            None,
        );
    }
    tracing::info!(
        failure_requests = p.failure_requests,
        "the customer changed whether failure reports may open access"
    );
    axum::Json(serde_json::json!({ "failure_requests": p.failure_requests })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_of_the_data_plane_reads_in_plain_words() {
        let nat = Ipv4Addr::new(10, 64, 0, 5);
        let errors = vec![
            "this router agent cannot run ipsec tunnels yet".to_owned(),
            "10.64.0.9: terminal nas does not resolve on the LAN".to_owned(),
            "10.64.0.5: request 7 was not made on this router's page; not installed".to_owned(),
        ];
        let r = refusal_of(&errors, nat).unwrap();
        assert!(r.contains("not made on this page"), "{r}");
        assert!(
            refusal_of(&errors, Ipv4Addr::new(10, 64, 0, 9))
                .unwrap()
                .contains("no computer of this name")
        );
        // A refusal of another address is not this terminal's.
        assert_eq!(refusal_of(&errors, Ipv4Addr::new(10, 64, 0, 50)), None);
        assert_eq!(refusal_of(&errors, Ipv4Addr::new(10, 64, 0, 1)), None);
        for (raw, want) in [
            ("terminal pc-1 is already mapped as 10.64.0.3", "10.64.0.3"),
            (
                "the real address is already mapped to 10.64.0.4",
                "10.64.0.4",
            ),
            ("not a unicast NAT address", "cannot be used"),
            ("10.64.0.1 is the masquerade address", "cannot be used"),
            ("listed twice", "twice"),
            ("something new", "(something new)"),
        ] {
            let got = plain_refusal(raw);
            assert!(got.starts_with("Not opened: "), "{got}");
            assert!(got.contains(want), "{raw}: {got}");
        }
    }
}
