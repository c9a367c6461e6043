//! The policy knobs the operations take from the settings.

use vpnnat::messages::TerminalName;

use crate::settings::Settings;

/// The policy knobs operations need, taken from [`Settings`].
#[derive(Debug, Clone)]
pub struct Policy {
    /// Lease length, ms.
    pub max_duration_ms: i64,
    /// Enrollment token lifetime, ms.
    pub token_lifetime_ms: i64,
    /// Terminal name of automatic requests for the router.
    pub router_terminal: TerminalName,
    /// Failure reports open requests.
    pub failure_opens_request: bool,
    /// Heartbeat interval, ms.
    pub heartbeat_interval_ms: u64,
    /// Missing heartbeats → down, ms.
    pub down_after_ms: i64,
    /// Agents' keepalive, s.
    pub persistent_keepalive_s: u16,
    /// Per-site limits.
    pub quotas: crate::settings::Quotas,
    /// Where webhook events go.
    pub webhooks: Vec<super::outbox::Route>,
    /// How long before its expiry an open request is announced, ms (0: never).
    pub expiry_warning_ms: i64,
    /// How long a site's previous credential stays valid at most, ms.
    pub credential_grace_ms: i64,
}

impl Policy {
    /// From validated settings.
    pub fn new(s: &Settings) -> Self {
        Self {
            max_duration_ms: i64::try_from(s.maintenance.max_duration_s.saturating_mul(1000))
                .unwrap_or(i64::MAX / 4),
            token_lifetime_ms: i64::try_from(
                s.enrollment.token_lifetime_hours.saturating_mul(3_600_000),
            )
            .unwrap_or(i64::MAX / 4),
            router_terminal: TerminalName::new(s.maintenance.router_terminal.clone())
                .unwrap_or_else(|_| TerminalName::new("router").expect("a valid name")),
            failure_opens_request: s.maintenance.failure_opens_request,
            heartbeat_interval_ms: s.gateways.heartbeat_interval_ms,
            down_after_ms: i64::try_from(s.gateways.down_after_ms).unwrap_or(i64::MAX / 4),
            persistent_keepalive_s: s.gateways.persistent_keepalive_s,
            quotas: s.quotas.clone(),
            webhooks: crate::webhooks::routes(s),
            expiry_warning_ms: i64::try_from(s.notifications.expiry_warning_s.saturating_mul(1000))
                .unwrap_or(i64::MAX / 4),
            credential_grace_ms: i64::try_from(s.rotation.credential_grace_s.saturating_mul(1000))
                .unwrap_or(i64::MAX / 4),
        }
    }
}
