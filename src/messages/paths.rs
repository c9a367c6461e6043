//! HTTP routes of the maintenance server API, relative to its base URL.

/// `POST` [`super::EnrollRequest`] → [`super::EnrollResponse`]. Authenticated by the token in the body.
pub const ENROLL: &str = "/api/v1/enroll";
/// `POST` [`super::NewMaintenanceRequest`] → [`super::MaintenanceRequestView`]; `GET` → `Vec<MaintenanceRequestView>` (the site's own).
pub const AGENT_REQUESTS: &str = "/api/v1/agent/requests";
/// `POST` (empty body) → [`super::MaintenanceRequestView`]. `{id}` is a [`super::RequestId`].
pub const AGENT_REVOKE: &str = "/api/v1/agent/requests/{id}/revoke";
/// `POST` [`super::FailureReport`] → [`super::FailureAccepted`].
pub const AGENT_FAILURES: &str = "/api/v1/agent/failures";
/// `GET ?after=VERSION&wait_ms=N` → [`super::AgentDesiredState`] (long-poll).
pub const AGENT_STATE: &str = "/api/v1/agent/state";
/// `POST` [`super::AppliedState`] → 204.
pub const AGENT_APPLIED: &str = "/api/v1/agent/applied";
/// `POST` [`super::SiteKey`] → [`super::AgentRotation`]: the agent's next
/// WireGuard key, published to its gateway next to the current one.
pub const AGENT_KEY: &str = "/api/v1/agent/key";
/// `POST` [`super::SiteKey`] → 204: the agent now uses its next key; the
/// old one is dropped.
pub const AGENT_KEY_COMMIT: &str = "/api/v1/agent/key/commit";
/// `POST` (empty body) → [`super::NewSiteCredential`]: a new credential;
/// the one of this call stays valid until the new one is first used or
/// `[rotation] credential_grace_s` passes.
pub const AGENT_CREDENTIAL: &str = "/api/v1/agent/credential";

/// `POST` [`super::GatewayRegistration`] → [`super::GatewayRegistered`].
pub const GATEWAY_REGISTER: &str = "/api/v1/gateway/register";
/// `POST` [`super::GatewayHeartbeat`] → [`super::HeartbeatAck`].
pub const GATEWAY_HEARTBEAT: &str = "/api/v1/gateway/heartbeat";
/// `GET ?after=VERSION&wait_ms=N` → [`super::GatewayDesiredState`] (long-poll).
pub const GATEWAY_STATE: &str = "/api/v1/gateway/state";
/// `POST` [`super::AppliedState`] → 204.
pub const GATEWAY_APPLIED: &str = "/api/v1/gateway/applied";

/// Operator: `POST` [`super::NewSite`] → [`super::SiteCreated`]; `GET` → `Vec<SiteView>`.
pub const SITES: &str = "/api/v1/sites";
/// Operator: `POST` → [`super::SiteCreated`] with a fresh enrollment token (re-enrollment).
pub const SITE_TOKEN: &str = "/api/v1/sites/{id}/token";
/// Operator: `POST` [`super::NewGateway`] → [`super::GatewayCreated`]; `GET` → `Vec<GatewayView>`.
pub const GATEWAYS: &str = "/api/v1/gateways";
/// Operator: `POST` [`super::DrainGateway`] → [`super::GatewayView`].
pub const GATEWAY_DRAIN: &str = "/api/v1/gateways/{id}/drain";

/// Operator: `DELETE` → 204: the site, its requests (open ones revoked
/// first), failure reports and enrollment tokens.
pub const SITE: &str = "/api/v1/sites/{id}";
/// Operator: `POST` [`super::SetDisabled`] → 204. A disabled site's agent gets 401.
pub const SITE_DISABLE: &str = "/api/v1/sites/{id}/disable";
/// Operator: `POST` → [`super::SiteCreated`]: the site's credential is refused
/// from now on; the new enrollment token enrolls the agent again.
pub const SITE_ROTATE: &str = "/api/v1/sites/{id}/rotate";
/// Operator: `POST` [`super::PlannedRotation`] → 204: asks the site's agent
/// to rotate its key and/or credential without interruption (the old ones
/// stay valid until the new ones are in use).
pub const SITE_PLANNED_ROTATION: &str = "/api/v1/sites/{id}/planned-rotation";
/// Operator: `POST` [`super::SiteTunnel`] → 204: the site's tunnel kind (an
/// IPsec site gets a new pre-shared key). 409 while the site has a tunnel.
pub const SITE_TUNNEL: &str = "/api/v1/sites/{id}/tunnel";
/// Operator: `GET` → [`super::IpsecSiteConfig`]: what a hand-configured
/// router needs (the pre-shared key included; audited without it). 404 for
/// a WireGuard site.
pub const SITE_IPSEC: &str = "/api/v1/sites/{id}/ipsec";
/// Operator (bearer) or technician (session): `GET` →
/// [`super::WireguardSiteConfig`]: the wg-quick files (one per gateway) and
/// nftables rules of a site without an agent. 409 for a site with an agent.
pub const SITE_WIREGUARD: &str = "/api/v1/sites/{id}/wireguard";
/// Technician: `POST` [`super::NewSiteRequest`] → 201
/// [`super::MaintenanceRequestView`]: a request opened on the customer's
/// behalf for a site without an agent. 409 for a site with an agent.
pub const SITE_REQUESTS: &str = "/api/v1/sites/{id}/requests";
/// Operator: `DELETE` → 204 (refused while the gateway carries sites).
pub const GATEWAY: &str = "/api/v1/gateways/{id}";
/// Operator: `POST` [`super::SetDisabled`] → 204. A disabled gateway gets 401
/// and is marked down (its sites move).
pub const GATEWAY_DISABLE: &str = "/api/v1/gateways/{id}/disable";
/// Operator: `POST` → [`super::GatewayCreated`] with a new credential; the old
/// one is refused from now on. Id, key and sites stay.
pub const GATEWAY_ROTATE: &str = "/api/v1/gateways/{id}/rotate";
/// Operator: `POST` → [`super::GatewayKeyRotationStatus`]: asks the gateway
/// to rotate its WireGuard key without interrupting its sites (idempotent
/// while one is asked for or under way). 409 for a disabled gateway or one
/// that never registered.
pub const GATEWAY_ROTATE_KEY: &str = "/api/v1/gateways/{id}/rotate-key";
/// Operator: `POST` [`super::NewTechnician`] → 204: adds a technician or sets
/// its password (ending its sessions).
pub const TECHNICIANS: &str = "/api/v1/technicians";
/// Operator: `DELETE` → 204: the technician and its sessions.
pub const TECHNICIAN: &str = "/api/v1/technicians/{name}";
/// Operator: `POST` [`super::SetDisabled`] → 204. Disabling ends its sessions.
pub const TECHNICIAN_DISABLE: &str = "/api/v1/technicians/{name}/disable";
/// Operator: `POST` [`super::NewTeam`] → 201 [`super::TeamView`]; `GET` → `Vec<TeamView>`.
pub const TEAMS: &str = "/api/v1/teams";
/// Operator: `DELETE` → 204 (409 while sites are assigned to the team; its
/// technicians are left without a team).
pub const TEAM: &str = "/api/v1/teams/{id}";
/// Operator: `POST` [`super::SiteTeam`] → 204: assigns the site to a team (or none).
pub const SITE_TEAM: &str = "/api/v1/sites/{id}/team";
/// Operator: `POST` [`super::TechnicianTeam`] → 204: a technician's team and own sources.
pub const TECHNICIAN_TEAM: &str = "/api/v1/technicians/{name}/team";

/// Technician: `POST` [`super::Login`] → [`super::LoginResponse`] + session cookie.
pub const LOGIN: &str = "/api/v1/login";
/// Technician: `POST` → 204, clears the session.
pub const LOGOUT: &str = "/api/v1/logout";
/// Technician: `GET ?state=&site=` → `Vec<MaintenanceRequestView>`.
pub const REQUESTS: &str = "/api/v1/requests";
/// Technician: `POST` → [`super::MaintenanceRequestView`].
pub const REQUEST_START: &str = "/api/v1/requests/{id}/start";
/// Technician: `POST` → [`super::MaintenanceRequestView`].
pub const REQUEST_END: &str = "/api/v1/requests/{id}/end";
/// Technician: `GET` → `Vec<FailureView>`.
pub const FAILURES: &str = "/api/v1/failures";
/// Technician: `POST` → [`super::FailureView`] (the report, acknowledged).
pub const FAILURE_ACK: &str = "/api/v1/failures/{id}/acknowledge";
/// Technician: `GET ?before=ID&limit=N` → `Vec<AuditEntry>`.
pub const AUDIT: &str = "/api/v1/audit";
/// Technician: `GET ?after=VERSION&wait_ms=N` → [`super::ConsoleEvents`] (long-poll for live updates).
pub const CONSOLE_EVENTS: &str = "/api/v1/events";

/// The OpenAPI document of all of the above.
pub const OPENAPI: &str = "/api/openapi.json";
/// Liveness: `GET` → 200 `{"status":"ok"}`.
pub const HEALTH: &str = "/healthz";
/// Prometheus text exposition.
pub const METRICS: &str = "/metrics";
