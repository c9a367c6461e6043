//! The OpenAPI 3.0 document served at `/api/openapi.json`, generated from
//! the code: the routes are the `vpnnat::messages::paths` constants the
//! router uses, the schemas are derived from the `vpnnat::messages` types
//! (their `schemars` feature), so the document cannot drift from what the
//! server and its clients (de)serialize.

use axum::http::header;
use axum::response::IntoResponse;
use schemars::generate::{SchemaGenerator, SchemaSettings};
use schemars::{JsonSchema, Schema};
use serde_json::{Map, Value, json};
use vpnnat::messages::*;

/// Who may call an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// Anyone (authenticated by something in the body, or public).
    Public,
    /// A router agent's site credential.
    Site,
    /// A gateway credential.
    Gateway,
    /// The operator token.
    Operator,
    /// The operator token or the metrics token.
    Metrics,
    /// A technician session (reads).
    Session,
    /// A technician session and the CSRF header (changes).
    SessionCsrf,
    /// The operator token or a technician session (reads).
    OperatorOrSession,
}

/// Query parameters of an operation.
#[derive(Debug, Clone, Copy)]
pub enum Query {
    /// None.
    None,
    /// `after`, `wait_ms`.
    LongPoll,
    /// `state`, `site`, `limit`.
    RequestFilter,
    /// `before`, `limit`.
    Audit,
    /// `limit`.
    Limit,
}

/// One documented operation.
pub struct Operation {
    /// HTTP method.
    pub method: &'static str,
    /// The route (a `paths` constant).
    pub path: &'static str,
    /// Who may call it.
    pub auth: Auth,
    /// One line.
    pub summary: &'static str,
    /// Query parameters.
    pub query: Query,
    /// The success status.
    pub status: u16,
    request: Option<fn(&mut SchemaGenerator) -> Schema>,
    response: Option<fn(&mut SchemaGenerator) -> Schema>,
}

fn s<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

macro_rules! op {
    ($m:literal, $path:expr, $auth:ident, $query:ident, $status:literal, $req:ty, $resp:ty, $summary:literal) => {
        Operation {
            method: $m,
            path: $path,
            auth: Auth::$auth,
            summary: $summary,
            query: Query::$query,
            status: $status,
            request: op!(@f $req),
            response: op!(@f $resp),
        }
    };
    // `()` means no body. A `ty` fragment handed on from the rule above no
    // longer matches a literal `()` pattern, so the type itself is compared.
    (@f $t:ty) => {
        if std::any::TypeId::of::<$t>() == std::any::TypeId::of::<()>() {
            None
        } else {
            Some(s::<$t>)
        }
    };
}

/// Every operation of the API, as the router serves it.
pub fn operations() -> Vec<Operation> {
    let mut ops = vec![
        op!(
            "post",
            paths::ENROLL,
            Public,
            None,
            200,
            EnrollRequest,
            EnrollResponse,
            "Agent: redeem a one-time enrollment token; returns the site credential"
        ),
        op!(
            "post",
            paths::AGENT_REQUESTS,
            Site,
            None,
            201,
            NewMaintenanceRequest,
            MaintenanceRequestView,
            "Agent: request maintenance (allocates NAT addresses; 503 no_capacity / pool_exhausted allocates nothing)"
        ),
        op!(
            "get",
            paths::AGENT_REQUESTS,
            Site,
            None,
            200,
            (),
            Vec<MaintenanceRequestView>,
            "Agent: the site's own requests, newest first"
        ),
        op!(
            "post",
            paths::AGENT_REVOKE,
            Site,
            None,
            200,
            (),
            MaintenanceRequestView,
            "Agent: the customer ends access (addresses return to the pool)"
        ),
        op!(
            "post",
            paths::AGENT_FAILURES,
            Site,
            None,
            201,
            FailureReport,
            FailureAccepted,
            "Agent: report a failure (may open a request for the router itself)"
        ),
        op!(
            "get",
            paths::AGENT_STATE,
            Site,
            LongPoll,
            200,
            (),
            AgentDesiredState,
            "Agent: desired state, long-poll (answered when version > after, or after wait_ms ≤ 60000)"
        ),
        op!(
            "post",
            paths::AGENT_APPLIED,
            Site,
            None,
            204,
            AppliedState,
            (),
            "Agent: report the applied version"
        ),
        op!(
            "post",
            paths::GATEWAY_REGISTER,
            Gateway,
            None,
            200,
            GatewayRegistration,
            GatewayRegistered,
            "Gateway: announce endpoints, key, capacity"
        ),
        op!(
            "post",
            paths::GATEWAY_HEARTBEAT,
            Gateway,
            None,
            200,
            GatewayHeartbeat,
            HeartbeatAck,
            "Gateway: heartbeat (capacity, load, health); 404 not_registered before registering"
        ),
        op!(
            "get",
            paths::GATEWAY_STATE,
            Gateway,
            LongPoll,
            200,
            (),
            GatewayDesiredState,
            "Gateway: desired state (peers and their NAT addresses), long-poll"
        ),
        op!(
            "post",
            paths::GATEWAY_APPLIED,
            Gateway,
            None,
            204,
            AppliedState,
            (),
            "Gateway: report the applied version"
        ),
        op!(
            "post",
            paths::SITES,
            Operator,
            None,
            201,
            NewSite,
            SiteCreated,
            "Operator: create a site and its one-time enrollment token"
        ),
        op!(
            "get",
            paths::SITES,
            Operator,
            None,
            200,
            (),
            Vec<SiteView>,
            "Operator: list sites"
        ),
        op!(
            "post",
            paths::SITE_TOKEN,
            Operator,
            None,
            200,
            (),
            SiteCreated,
            "Operator: a fresh enrollment token (re-enrollment rotates the credential)"
        ),
        op!(
            "post",
            paths::GATEWAYS,
            Operator,
            None,
            201,
            NewGateway,
            GatewayCreated,
            "Operator: create a gateway identity; its credential is shown once"
        ),
        op!(
            "get",
            paths::GATEWAYS,
            Operator,
            None,
            200,
            (),
            Vec<GatewayView>,
            "Operator: list gateways"
        ),
        op!(
            "post",
            paths::GATEWAY_DRAIN,
            Operator,
            None,
            200,
            DrainGateway,
            GatewayView,
            "Operator: drain a gateway (keeps its sites, takes no new ones) or end draining"
        ),
        op!(
            "post",
            paths::TEAMS,
            Operator,
            None,
            201,
            NewTeam,
            TeamView,
            "Operator: create a team of technicians with its source prefixes"
        ),
        op!(
            "get",
            paths::TEAMS,
            Operator,
            None,
            200,
            (),
            Vec<TeamView>,
            "Operator: list teams with their sites and technicians"
        ),
        op!(
            "delete",
            paths::TEAM,
            Operator,
            None,
            204,
            (),
            (),
            "Operator: delete a team (409 while sites belong to it)"
        ),
        op!(
            "post",
            paths::SITE_TEAM,
            Operator,
            None,
            204,
            SiteTeam,
            (),
            "Operator: assign a site to a team (null: none, seen by every technician)"
        ),
        op!(
            "post",
            paths::TECHNICIAN_TEAM,
            Operator,
            None,
            204,
            TechnicianTeam,
            (),
            "Operator: a technician's team and own source prefixes"
        ),
        op!(
            "post",
            paths::LOGIN,
            Public,
            None,
            200,
            Login,
            LoginResponse,
            "Technician: sign in; sets the HttpOnly session cookie (rate-limited: 429)"
        ),
        op!(
            "post",
            paths::LOGOUT,
            SessionCsrf,
            None,
            204,
            (),
            (),
            "Technician: sign out"
        ),
        op!(
            "get",
            paths::REQUESTS,
            Session,
            RequestFilter,
            200,
            (),
            Vec<MaintenanceRequestView>,
            "Technician: requests, newest first"
        ),
        op!(
            "post",
            paths::REQUEST_START,
            SessionCsrf,
            None,
            200,
            (),
            MaintenanceRequestView,
            "Technician: start work (waiting → in progress)"
        ),
        op!(
            "post",
            paths::REQUEST_END,
            SessionCsrf,
            None,
            200,
            (),
            MaintenanceRequestView,
            "Technician: end (addresses return to the pool; the tunnel slot is freed with the last one)"
        ),
        op!(
            "get",
            paths::FAILURES,
            Session,
            Limit,
            200,
            (),
            Vec<FailureView>,
            "Technician: failure reports, newest first"
        ),
        op!(
            "post",
            paths::FAILURE_ACK,
            SessionCsrf,
            None,
            200,
            (),
            FailureView,
            "Technician: acknowledge a failure report (seen and taken on; 409 when acknowledged already)"
        ),
        op!(
            "get",
            paths::AUDIT,
            Session,
            Audit,
            200,
            (),
            Vec<AuditEntry>,
            "Technician: the append-only audit log, newest first"
        ),
        op!(
            "get",
            paths::CONSOLE_EVENTS,
            Session,
            LongPoll,
            200,
            (),
            ConsoleEvents,
            "Technician: the console feed, long-poll"
        ),
        op!(
            "get",
            crate::handlers::technician::ME,
            Session,
            None,
            200,
            (),
            crate::handlers::technician::Me,
            "Technician: who is signed in"
        ),
        op!(
            "get",
            paths::HEALTH,
            Public,
            None,
            200,
            (),
            (),
            "Liveness and database reachability"
        ),
        op!(
            "get",
            paths::METRICS,
            Metrics,
            None,
            200,
            (),
            (),
            "Prometheus text exposition (operator token or operator.metrics_token)"
        ),
        op!(
            "get",
            paths::OPENAPI,
            Public,
            None,
            200,
            (),
            (),
            "This document"
        ),
    ];
    ops.extend(lifecycle_operations());
    ops.extend(agentless_operations());
    ops.extend(rotation_operations());
    ops
}

/// Planned rotation of a site's key and credential.
fn rotation_operations() -> Vec<Operation> {
    vec![
        op!(
            "post",
            paths::AGENT_KEY,
            Site,
            None,
            200,
            SiteKey,
            AgentRotation,
            "Agent: register the next WireGuard key (published to the site's gateway next to the current one; switch when next_key_ready)"
        ),
        op!(
            "post",
            paths::AGENT_KEY_COMMIT,
            Site,
            None,
            204,
            SiteKey,
            (),
            "Agent: the next key is in use; the old one is dropped"
        ),
        op!(
            "post",
            paths::AGENT_CREDENTIAL,
            Site,
            None,
            200,
            (),
            NewSiteCredential,
            "Agent: a new credential; the one presented stays valid until the new one is first used or [rotation] credential_grace_s passes"
        ),
        op!(
            "post",
            paths::SITE_PLANNED_ROTATION,
            Operator,
            None,
            204,
            PlannedRotation,
            (),
            "Operator: ask a site's agent to rotate its key and/or credential without interruption"
        ),
    ]
}

/// Sites without a router agent (a standard WireGuard router).
fn agentless_operations() -> Vec<Operation> {
    vec![
        op!(
            "get",
            paths::SITE_WIREGUARD,
            OperatorOrSession,
            None,
            200,
            (),
            WireguardSiteConfig,
            "Operator or technician: the wg-quick files (one per gateway, with QR codes) and nftables rules of a site without an agent (audited; 409 for a site with an agent)"
        ),
        op!(
            "post",
            paths::SITE_REQUESTS,
            SessionCsrf,
            None,
            201,
            NewSiteRequest,
            MaintenanceRequestView,
            "Technician: open a request on the customer's behalf for a site without an agent, naming each terminal's LAN address (409 for a site with an agent)"
        ),
    ]
}

/// The operator's disable, delete and rotate operations on sites, gateways
/// and technicians.
fn lifecycle_operations() -> Vec<Operation> {
    vec![
        op!(
            "delete",
            paths::SITE,
            Operator,
            None,
            204,
            (),
            (),
            "Operator: delete a site (open requests revoked; its requests, failure reports and tokens deleted)"
        ),
        op!(
            "post",
            paths::SITE_DISABLE,
            Operator,
            None,
            204,
            SetDisabled,
            (),
            "Operator: disable a site (its agent gets 401, its open requests are revoked) or enable it"
        ),
        op!(
            "post",
            paths::SITE_ROTATE,
            Operator,
            None,
            200,
            (),
            SiteCreated,
            "Operator: revoke a site's credential now; the new enrollment token enrolls the agent again (an IPsec site also gets a new pre-shared key)"
        ),
        op!(
            "post",
            paths::SITE_TUNNEL,
            Operator,
            None,
            204,
            SiteTunnel,
            (),
            "Operator: set a site's tunnel kind (wireguard, ipsec; an IPsec site gets a new pre-shared key); 409 while it has a tunnel"
        ),
        op!(
            "get",
            paths::SITE_IPSEC,
            Operator,
            None,
            200,
            (),
            IpsecSiteConfig,
            "Operator: an IPsec site's parameters and a strongSwan swanctl.conf for a router configured by hand (audited; 404 for a WireGuard site)"
        ),
        op!(
            "delete",
            paths::GATEWAY,
            Operator,
            None,
            204,
            (),
            (),
            "Operator: delete a gateway identity (refused while it carries sites)"
        ),
        op!(
            "post",
            paths::GATEWAY_DISABLE,
            Operator,
            None,
            204,
            SetDisabled,
            (),
            "Operator: disable a gateway (401 for it, marked down, its sites move) or enable it"
        ),
        op!(
            "post",
            paths::GATEWAY_ROTATE,
            Operator,
            None,
            200,
            (),
            GatewayCreated,
            "Operator: a new gateway credential (shown once); the old one is refused from now on"
        ),
        op!(
            "post",
            paths::GATEWAY_ROTATE_KEY,
            Operator,
            None,
            200,
            (),
            GatewayKeyRotationStatus,
            "Operator: ask a gateway to rotate its WireGuard key without interrupting its sites (idempotent while one is under way; 409 for a disabled or never registered gateway)"
        ),
        op!(
            "post",
            paths::TECHNICIANS,
            Operator,
            None,
            204,
            NewTechnician,
            (),
            "Operator: add a technician or set its password (ends its sessions)"
        ),
        op!(
            "delete",
            paths::TECHNICIAN,
            Operator,
            None,
            204,
            (),
            (),
            "Operator: delete a technician and its sessions"
        ),
        op!(
            "post",
            paths::TECHNICIAN_DISABLE,
            Operator,
            None,
            204,
            SetDisabled,
            (),
            "Operator: disable a technician (ends its sessions, refuses its login) or enable it"
        ),
    ]
}

fn param(name: &str, place: &str, ty: &str, desc: &str) -> Value {
    json!({
        "name": name, "in": place, "required": place == "path",
        "description": desc, "schema": { "type": ty },
    })
}

fn error_response(desc: &str) -> Value {
    json!({ "description": desc, "content": { "application/json": {
        "schema": { "$ref": "#/components/schemas/ApiError" } } } })
}

/// The document.
pub fn document() -> Value {
    let mut g = SchemaSettings::openapi3().into_generator();
    g.subschema_for::<ApiError>();
    let mut paths_obj: Map<String, Value> = Map::new();
    for op in operations() {
        let mut o = Map::new();
        o.insert("summary".into(), op.summary.into());
        let mut params = Vec::new();
        if op.path.contains("{id}") {
            params.push(param("id", "path", "integer", "the object's id"));
        }
        if op.path.contains("{name}") {
            params.push(param(
                "name",
                "path",
                "string",
                "the technician's login name",
            ));
        }
        match op.query {
            Query::None => {}
            Query::LongPoll => {
                params.push(param(
                    "after",
                    "query",
                    "integer",
                    "answer as soon as the version exceeds this (default 0)",
                ));
                params.push(param(
                    "wait_ms",
                    "query",
                    "integer",
                    "hold the request at most this long (default 0, at most 60000)",
                ));
            }
            Query::RequestFilter => {
                params.push(param(
                    "state",
                    "query",
                    "string",
                    "waiting, in_progress, ended, revoked or expired; open or closed",
                ));
                params.push(param("site", "query", "integer", "only this site"));
                params.push(param(
                    "before",
                    "query",
                    "integer",
                    "only requests with a smaller id (paging)",
                ));
                params.push(param(
                    "limit",
                    "query",
                    "integer",
                    "at most this many (1–1000, default 500)",
                ));
            }
            Query::Audit => {
                params.push(param(
                    "before",
                    "query",
                    "integer",
                    "only entries with a smaller id (paging)",
                ));
                params.push(param(
                    "limit",
                    "query",
                    "integer",
                    "at most this many (1–500, default 100)",
                ));
                for (name, ty, desc) in [
                    ("actor", "string", "only this actor, e.g. technician:alice"),
                    ("object", "string", "only this object, e.g. request:17"),
                    (
                        "kind",
                        "string",
                        "only this action or actions with this prefix, e.g. request",
                    ),
                    (
                        "site",
                        "integer",
                        "only entries by, on or about a request of this site",
                    ),
                    (
                        "since",
                        "integer",
                        "only entries at or after this time (ms)",
                    ),
                    ("until", "integer", "only entries before this time (ms)"),
                ] {
                    params.push(param(name, "query", ty, desc));
                }
            }
            Query::Limit => {
                params.push(param(
                    "limit",
                    "query",
                    "integer",
                    "at most this many (1–1000)",
                ));
            }
        }
        if !params.is_empty() {
            o.insert("parameters".into(), Value::Array(params));
        }
        if let Some(req) = op.request {
            o.insert(
                "requestBody".into(),
                json!({ "required": true, "content": { "application/json": { "schema": req(&mut g) } } }),
            );
        }
        let mut responses = Map::new();
        let ok = match (op.response, op.path) {
            (Some(resp), _) => json!({ "description": "success",
                "content": { "application/json": { "schema": resp(&mut g) } } }),
            (None, paths::METRICS) => json!({ "description": "metrics",
                "content": { "text/plain; version=0.0.4": { "schema": { "type": "string" } } } }),
            (None, paths::HEALTH) => json!({ "description": "ok",
                "content": { "application/json": { "schema": {
                    "type": "object", "required": ["status"],
                    "properties": { "status": { "type": "string", "enum": ["ok"] } } } } } }),
            (None, paths::OPENAPI) => json!({ "description": "the OpenAPI 3.0 document",
                "content": { "application/json": { "schema": { "type": "object" } } } }),
            (None, _) => json!({ "description": "done, no content" }),
        };
        responses.insert(op.status.to_string(), ok);
        if op.request.is_some() || op.path.contains("{id}") || !matches!(op.query, Query::None) {
            responses.insert(
                "400".into(),
                error_response("malformed JSON, path id or query parameter (`field` names it)"),
            );
        }
        if op.request.is_some() {
            responses.insert(
                "413".into(),
                error_response("body larger than http.body_limit_bytes"),
            );
            responses.insert(
                "415".into(),
                error_response("the body is not sent as Content-Type: application/json"),
            );
            responses.insert(
                "422".into(),
                error_response("a field is invalid (`field` names it)"),
            );
        }
        if op.auth != Auth::Public || op.path == paths::ENROLL || op.path == paths::LOGIN {
            responses.insert("401".into(), error_response("no or an unknown credential"));
        }
        if op.auth != Auth::Public {
            responses.insert(
                "403".into(),
                error_response("a credential of another kind (or a missing CSRF header)"),
            );
        }
        if op.path.contains("{id}") || op.path.contains("{name}") {
            responses.insert(
                "404".into(),
                error_response("no such object (or not the caller's)"),
            );
        }
        if matches!(
            op.path,
            paths::AGENT_REVOKE
                | paths::REQUEST_START
                | paths::REQUEST_END
                | paths::FAILURE_ACK
                | paths::SITES
                | paths::GATEWAYS
                | paths::ENROLL
        ) && op.method == "post"
        {
            responses.insert(
                "409".into(),
                error_response(
                    "conflict (taken name or key, a request not in a state that allows this, or a failure report acknowledged already)",
                ),
            );
        }
        if op.path == paths::LOGIN {
            responses.insert(
                "429".into(),
                error_response("too many failed logins from this client (IPv6: its /64) or for this name; Retry-After"),
            );
            responses.insert(
                "503".into(),
                error_response("busy: too many password checks at once; Retry-After"),
            );
        }
        if op.path == paths::HEALTH {
            responses.insert("500".into(), error_response("the database does not answer"));
        }
        if op.path == paths::AGENT_REQUESTS && op.method == "post"
            || op.path == paths::AGENT_FAILURES
        {
            responses.insert(
                "503".into(),
                error_response("no_capacity or pool_exhausted: nothing was allocated"),
            );
        }
        // Per-site quotas ([quotas]) and lifecycle refusals.
        if op.path == paths::AGENT_REQUESTS && op.method == "post" {
            responses.insert(
                "409".into(),
                error_response(
                    "quota_exceeded: the site holds as many open requests or addresses as allowed",
                ),
            );
        }
        if op.path == paths::AGENT_REQUESTS && op.method == "post"
            || op.path == paths::AGENT_FAILURES
        {
            responses.insert(
                "429".into(),
                error_response("rate_limited: too many requests or failure reports from this site in the last minute"),
            );
        }
        if matches!(op.path, paths::SITE_WIREGUARD | paths::SITE_REQUESTS) {
            responses.insert(
                "409".into(),
                error_response(
                    "invalid_state: the site has an agent; conflict: a terminal's LAN address disagrees with an open request; quota_exceeded",
                ),
            );
        }
        if op.path == paths::SITE_REQUESTS {
            responses.insert(
                "503".into(),
                error_response("no_capacity or pool_exhausted: nothing was allocated"),
            );
            responses.insert(
                "429".into(),
                error_response("rate_limited: too many requests for this site in the last minute"),
            );
        }
        if op.path == paths::SITE_TUNNEL {
            responses.insert(
                "409".into(),
                error_response("invalid_state: the site has a tunnel (open requests)"),
            );
        }
        if op.path == paths::GATEWAY && op.method == "delete" {
            responses.insert(
                "409".into(),
                error_response("invalid_state: the gateway still carries sites"),
            );
        }
        o.insert("responses".into(), Value::Object(responses));
        let security = match op.auth {
            Auth::Public => json!([]),
            Auth::Site => json!([{ "siteCredential": [] }]),
            Auth::Gateway => json!([{ "gatewayCredential": [] }]),
            Auth::Operator => json!([{ "operatorToken": [] }]),
            Auth::Metrics => json!([{ "operatorToken": [] }, { "metricsToken": [] }]),
            Auth::Session => json!([{ "technicianSession": [] }]),
            Auth::SessionCsrf => json!([{ "technicianSession": [], "csrfToken": [] }]),
            Auth::OperatorOrSession => {
                json!([{ "operatorToken": [] }, { "technicianSession": [] }])
            }
        };
        o.insert("security".into(), security);
        let entry = paths_obj
            .entry(op.path.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(m) = entry {
            m.insert(op.method.to_owned(), Value::Object(o));
        }
    }
    for &(path, content_type, _) in crate::console::ASSETS {
        let mime = content_type.split(';').next().unwrap_or(content_type);
        paths_obj.insert(
            path.to_owned(),
            json!({ "get": {
                "summary": "Technician console (page or asset)",
                "responses": { "200": { "description": "the page or asset",
                    "content": { mime: { "schema": { "type": "string" } } } } },
                "security": [],
            } }),
        );
    }
    let schemas = g.take_definitions(true);
    let bearer = |desc: &str| json!({ "type": "http", "scheme": "bearer", "description": desc });
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "vpnnat maintenance-server",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Control plane of vpnnat: enrollment, maintenance requests, the VPN-NAT address pool, \
                gateway desired state, technician console. Errors are ApiError JSON. Desired-state \
                endpoints are long-polls (`after`, `wait_ms`).",
        },
        "paths": paths_obj,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "siteCredential": bearer("`vnsite_…` from POST /api/v1/enroll"),
                "gatewayCredential": bearer("`vngw_…` from `maintenance-server gateway add` or POST /api/v1/gateways"),
                "operatorToken": bearer("`vnop_…` from `maintenance-server operator-token`"),
                "metricsToken": bearer("`operator.metrics_token` of the settings (reads /metrics only)"),
                "technicianSession": { "type": "apiKey", "in": "cookie", "name": crate::auth::SESSION_COOKIE },
                "csrfToken": { "type": "apiKey", "in": "header", "name": "X-CSRF-Token" },
            },
        },
    })
}

/// `GET /api/openapi.json`: the document, generated once.
pub async fn serve() -> impl IntoResponse {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let doc = DOC.get_or_init(|| document().to_string());
    ([(header::CONTENT_TYPE, "application/json")], doc.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_and_message_is_documented() {
        let doc = document();
        let paths_doc = doc["paths"].as_object().unwrap();
        for p in [
            paths::ENROLL,
            paths::AGENT_REQUESTS,
            paths::AGENT_REVOKE,
            paths::AGENT_FAILURES,
            paths::AGENT_STATE,
            paths::AGENT_APPLIED,
            paths::GATEWAY_REGISTER,
            paths::GATEWAY_HEARTBEAT,
            paths::GATEWAY_STATE,
            paths::GATEWAY_APPLIED,
            paths::SITES,
            paths::SITE_TOKEN,
            paths::GATEWAYS,
            paths::GATEWAY_DRAIN,
            paths::LOGIN,
            paths::LOGOUT,
            paths::REQUESTS,
            paths::REQUEST_START,
            paths::REQUEST_END,
            paths::FAILURES,
            paths::FAILURE_ACK,
            paths::AUDIT,
            paths::CONSOLE_EVENTS,
            paths::HEALTH,
            paths::METRICS,
            paths::SITE,
            paths::SITE_DISABLE,
            paths::SITE_ROTATE,
            paths::SITE_TUNNEL,
            paths::SITE_IPSEC,
            paths::SITE_WIREGUARD,
            paths::SITE_REQUESTS,
            paths::GATEWAY,
            paths::GATEWAY_DISABLE,
            paths::GATEWAY_ROTATE,
            paths::GATEWAY_ROTATE_KEY,
            paths::TECHNICIANS,
            paths::TECHNICIAN,
            paths::TECHNICIAN_DISABLE,
            paths::AGENT_KEY,
            paths::AGENT_KEY_COMMIT,
            paths::AGENT_CREDENTIAL,
            paths::SITE_PLANNED_ROTATION,
        ] {
            assert!(paths_doc.contains_key(p), "{p} undocumented");
        }
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for name in [
            "ApiError",
            "EnrollRequest",
            "NewMaintenanceRequest",
            "MaintenanceRequestView",
            "AgentDesiredState",
            "GatewayDesiredState",
            "GatewayRegistration",
            "PublicKey",
            "TerminalName",
            "RequestState",
            "ConsoleEvents",
            "IpsecParams",
            "IpsecSiteConfig",
            "SiteTunnel",
            "WireguardSiteConfig",
            "NewSiteRequest",
        ] {
            assert!(
                schemas.contains_key(name),
                "{name} missing: {:?}",
                schemas.keys()
            );
        }
        // Every reference resolves.
        let text = doc.to_string();
        for r in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = r.split('"').next().unwrap();
            assert!(schemas.contains_key(name), "dangling $ref {name}");
        }
        let state = &doc["paths"][paths::AGENT_STATE]["get"];
        assert_eq!(state["parameters"][0]["name"], "after");
        assert_eq!(state["security"][0]["siteCredential"], json!([]));
        let st = schemas["RequestState"].to_string();
        assert!(st.contains("in_progress"), "{st}");
    }
}
