//! The extractors that check credentials (the credentials themselves are
//! in [`crate::secrets`]).
//!
//! Scopes: no or an unknown credential → 401; a valid-looking credential of
//! another kind → 403.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use vpnnat::messages::{GatewayId, SiteId};

use crate::db::{col, u64_of};
use crate::error::AppError;
pub use crate::secrets::{Secret, SecretKind, hash_password, verify_password};
use crate::state::AppState;

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn check_kind(token: Option<&str>, want: SecretKind) -> Result<&str, AppError> {
    let token = token.ok_or_else(|| AppError::unauthorized("a bearer credential is required"))?;
    match SecretKind::of(token) {
        Some(k) if k == want => Ok(token),
        Some(_) => Err(AppError::forbidden(
            "this credential is not valid for this endpoint",
        )),
        None => Err(AppError::unauthorized("unknown credential")),
    }
}

/// An authenticated router agent.
#[derive(Debug, Clone, Copy)]
pub struct SiteAuth {
    /// The site it speaks for.
    pub site: SiteId,
}

impl FromRequestParts<AppState> for SiteAuth {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let token = check_kind(bearer(&parts.headers), SecretKind::Site)?;
        let hash = Secret::hash_of(token);
        let now = crate::db::now_ms();
        // The previous credential of a planned rotation is valid until the
        // new one is first used or its deadline passes.
        let row = sqlx::query(
            "SELECT id, credential_hash, previous_credential_hash FROM sites \
             WHERE (credential_hash = $1 \
                    OR (previous_credential_hash = $1 AND previous_credential_until > $2)) \
               AND disabled = 0",
        )
        .bind(&hash)
        .bind(now)
        .fetch_optional(state.db.reader())
        .await
        .map_err(AppError::internal)?
        .ok_or_else(|| AppError::unauthorized("unknown credential"))?;
        let site = SiteId(u64_of(col(&row, "id").map_err(AppError::internal)?));
        let current: Option<String> = col(&row, "credential_hash").map_err(AppError::internal)?;
        let previous: Option<String> =
            col(&row, "previous_credential_hash").map_err(AppError::internal)?;
        if previous.is_some() && current.as_deref() == Some(hash.as_str()) {
            // The first use of the new credential ends the previous one.
            crate::handlers::write(state, async |tx| {
                crate::db::rotation::credential_in_use(tx, site, &hash, now).await
            })
            .await?;
            tracing::info!(site.id = %site, "new site credential in use; the previous one ends");
        }
        Ok(Self { site })
    }
}

/// The id of the row that `select_id` finds by the hash of the request's
/// bearer credential of `kind`.
async fn credential_owner(
    parts: &Parts,
    state: &AppState,
    kind: SecretKind,
    select_id: &'static str,
) -> Result<u64, AppError> {
    let token = check_kind(bearer(&parts.headers), kind)?;
    let row = sqlx::query(select_id)
        .bind(Secret::hash_of(token))
        .fetch_optional(state.db.reader())
        .await
        .map_err(AppError::internal)?
        .ok_or_else(|| AppError::unauthorized("unknown credential"))?;
    Ok(u64_of(col(&row, "id").map_err(AppError::internal)?))
}

/// An authenticated gateway.
#[derive(Debug, Clone, Copy)]
pub struct GatewayAuth {
    /// Which one.
    pub gateway: GatewayId,
}

impl FromRequestParts<AppState> for GatewayAuth {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let id = credential_owner(
            parts,
            state,
            SecretKind::Gateway,
            "SELECT id FROM gateways WHERE credential_hash = $1 AND disabled = 0",
        )
        .await?;
        Ok(Self {
            gateway: GatewayId(id),
        })
    }
}

/// The operator.
#[derive(Debug, Clone, Copy)]
pub struct OperatorAuth;

impl FromRequestParts<AppState> for OperatorAuth {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let token = bearer(&parts.headers)
            .ok_or_else(|| AppError::unauthorized("a bearer credential is required"))?;
        // A configured operator token may lack the `vnop_` prefix; a
        // credential of another kind never passes.
        match SecretKind::of(token) {
            None | Some(SecretKind::Operator) => {}
            Some(_) => {
                return Err(AppError::forbidden(
                    "this credential is not valid for this endpoint",
                ));
            }
        }
        if Secret::hash_of(token) == state.operator_hash {
            Ok(Self)
        } else {
            Err(AppError::unauthorized("unknown credential"))
        }
    }
}

/// Who may read `/metrics`: the operator, or the scraper with the separate
/// `operator.metrics_token`.
#[derive(Debug, Clone, Copy)]
pub struct MetricsAuth;

impl FromRequestParts<AppState> for MetricsAuth {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let metrics_token = &state.settings.operator.metrics_token;
        if let Some(token) = bearer(&parts.headers)
            && !metrics_token.is_empty()
            && Secret::hash_of(token) == Secret::hash_of(metrics_token)
        {
            return Ok(Self);
        }
        OperatorAuth::from_request_parts(parts, state)
            .await
            .map(|OperatorAuth| Self)
    }
}

/// The key a client's login attempts count under: an IPv4 address, or the
/// /64 of an IPv6 address (one host usually holds a whole /64, so counting
/// single IPv6 addresses would let it rotate through 2^64 of them).
pub fn client_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

/// How long a login waits for a free password check before it gets 503.
pub const PASSWORD_CHECK_WAIT: Duration = Duration::from_secs(5);

/// The bound on concurrent password checks (argon2id: 19 MiB and a CPU
/// each), with counters for `/metrics`. Only the login uses it: agents'
/// and gateways' credentials are SHA-256 lookups and never wait here.
#[derive(Debug)]
pub struct PasswordChecks {
    permits: Arc<Semaphore>,
    counters: Arc<CheckCounters>,
    max: usize,
    wait: Duration,
}

#[derive(Debug, Default)]
struct CheckCounters {
    running: AtomicUsize,
    running_max: AtomicUsize,
    total: AtomicU64,
    busy: AtomicU64,
    rate_limited: AtomicU64,
}

/// One running password check: holds its permit (and is counted) until
/// dropped. Move it into the blocking task that checks, so that a client
/// that goes away does not free the permit while the check still runs.
#[derive(Debug)]
pub struct PasswordCheck {
    counters: Arc<CheckCounters>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for PasswordCheck {
    fn drop(&mut self) {
        self.counters.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A snapshot of [`PasswordChecks`]' counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct PasswordCheckCounts {
    /// The bound.
    pub max: usize,
    /// Running now.
    pub running: usize,
    /// The most that ever ran at once.
    pub running_max: usize,
    /// Checks started.
    pub total: u64,
    /// Logins refused with 503 `busy` (no check free in time).
    pub busy: u64,
    /// Logins refused with 429 (rate limit), never checked.
    pub rate_limited: u64,
}

impl PasswordChecks {
    /// At most `max` (at least 1) checks at once; a login waits up to
    /// `wait` for one.
    pub fn new(max: usize, wait: Duration) -> Self {
        let max = max.max(1);
        Self {
            permits: Arc::new(Semaphore::new(max)),
            counters: Arc::default(),
            max,
            wait,
        }
    }

    /// Waits (up to its `wait`) for a free check.
    ///
    /// # Errors
    /// 503 `busy` with `Retry-After` when none frees up in time.
    pub async fn begin(&self) -> Result<PasswordCheck, AppError> {
        let permit = tokio::time::timeout(self.wait, self.permits.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok);
        let c = &self.counters;
        let Some(permit) = permit else {
            c.busy.fetch_add(1, Ordering::Relaxed);
            return Err(AppError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "too many sign-ins at once; try again in a moment",
            )
            .retry_after(1));
        };
        let running = c.running.fetch_add(1, Ordering::SeqCst) + 1;
        c.running_max.fetch_max(running, Ordering::SeqCst);
        c.total.fetch_add(1, Ordering::Relaxed);
        Ok(PasswordCheck {
            counters: c.clone(),
            _permit: permit,
        })
    }

    /// Counts a login refused by the rate limit.
    pub fn count_rate_limited(&self) {
        self.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn counts(&self) -> PasswordCheckCounts {
        let c = &self.counters;
        PasswordCheckCounts {
            max: self.max,
            running: c.running.load(Ordering::SeqCst),
            running_max: c.running_max.load(Ordering::SeqCst),
            total: c.total.load(Ordering::Relaxed),
            busy: c.busy.load(Ordering::Relaxed),
            rate_limited: c.rate_limited.load(Ordering::Relaxed),
        }
    }
}

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "vpnnat_session";
/// The CSRF header's name.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The session cookie of a request.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v)
}

/// A logged-in technician (read access). State-changing handlers take
/// [`TechnicianWrite`], which also checks the CSRF header.
#[derive(Debug, Clone)]
pub struct Technician {
    /// Technician id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// The sites it sees and acts on (its team's and those without a team).
    pub scope: crate::db::teams::TeamScope,
    /// The session's hash (for logout).
    pub session_hash: String,
    csrf_hash: String,
}

impl Technician {
    /// `technician:NAME` for the audit log.
    pub fn actor(&self) -> String {
        format!("technician:{}", self.name)
    }
}

impl FromRequestParts<AppState> for Technician {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let cookie = session_cookie(&parts.headers);
        if cookie.is_none() && bearer(&parts.headers).is_some() {
            return Err(AppError::forbidden(
                "technician endpoints take a session cookie, not a bearer credential",
            ));
        }
        let cookie = cookie.ok_or_else(|| AppError::unauthorized("log in first"))?;
        if SecretKind::of(cookie) != Some(SecretKind::Session) {
            return Err(AppError::unauthorized("log in first"));
        }
        let hash = Secret::hash_of(cookie);
        let row = sqlx::query(
            "SELECT t.id, t.name, t.team_id, s.csrf_hash, s.expires_at FROM technician_sessions s \
             JOIN technicians t ON t.id = s.technician_id WHERE s.token_hash = $1 AND t.disabled = 0",
        )
        .bind(&hash)
        .fetch_optional(state.db.reader())
        .await
        .map_err(AppError::internal)?
        .ok_or_else(|| AppError::unauthorized("the session ended; log in again"))?;
        let expires: i64 = col(&row, "expires_at").map_err(AppError::internal)?;
        if expires <= crate::db::now_ms() {
            return Err(AppError::unauthorized("the session ended; log in again"));
        }
        Ok(Self {
            id: col(&row, "id").map_err(AppError::internal)?,
            name: col(&row, "name").map_err(AppError::internal)?,
            scope: crate::db::teams::TeamScope {
                team: col(&row, "team_id").map_err(AppError::internal)?,
            },
            session_hash: hash,
            csrf_hash: col(&row, "csrf_hash").map_err(AppError::internal)?,
        })
    }
}

/// A logged-in technician whose request carries the session's CSRF token
/// (`X-CSRF-Token`). The cookie is `SameSite=Strict` as well; the header
/// is the defence that does not depend on the browser.
#[derive(Debug, Clone)]
pub struct TechnicianWrite(pub Technician);

impl FromRequestParts<AppState> for TechnicianWrite {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let t = Technician::from_request_parts(parts, state).await?;
        let header = parts
            .headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| AppError::forbidden("the X-CSRF-Token header is missing"))?;
        if Secret::hash_of(header) != t.csrf_hash {
            return Err(AppError::forbidden("the X-CSRF-Token header is wrong"));
        }
        Ok(Self(t))
    }
}

/// The operator (bearer token) or a logged-in technician (session cookie),
/// for reads both may make; the audit actor says which.
#[derive(Debug, Clone)]
pub struct OperatorOrTechnician {
    /// `operator` or `technician:NAME`.
    pub actor: String,
    /// The technician's team scope; `None` for the operator (sees all).
    pub scope: Option<crate::db::teams::TeamScope>,
}

impl FromRequestParts<AppState> for OperatorOrTechnician {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        if session_cookie(&parts.headers).is_none() && bearer(&parts.headers).is_some() {
            OperatorAuth::from_request_parts(parts, state).await?;
            return Ok(Self {
                actor: "operator".to_owned(),
                scope: None,
            });
        }
        let t = Technician::from_request_parts(parts, state).await?;
        Ok(Self {
            actor: t.actor(),
            scope: Some(t.scope),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bearer_and_cookie_parsing() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer  vnop_x ".parse().unwrap());
        h.insert(
            header::COOKIE,
            "a=b; vpnnat_session=vnsess_y".parse().unwrap(),
        );
        assert_eq!(bearer(&h), Some("vnop_x"));
        assert_eq!(session_cookie(&h), Some("vnsess_y"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn ipv6_clients_count_per_64() {
        let k = |s: &str| client_key(s.parse().unwrap());
        assert_eq!(k("192.0.2.7"), "192.0.2.7");
        assert_eq!(k("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff:1:2:3"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
    }

    #[tokio::test]
    async fn password_checks_are_bounded() {
        let c = PasswordChecks::new(2, Duration::from_millis(50));
        let a = c.begin().await.unwrap();
        let b = c.begin().await.unwrap();
        assert_eq!(c.counts().running, 2);
        let e = c.begin().await.unwrap_err();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.retry_after, Some(1));
        drop((a, b));
        let counts = c.counts();
        assert_eq!(
            (
                counts.running,
                counts.running_max,
                counts.total,
                counts.busy
            ),
            (0, 2, 2, 1)
        );
    }
}
