//! Who may use the page: the LAN-only guard, the local password, sessions
//! (an `HttpOnly`, `SameSite=Strict` cookie) with their CSRF token, and the
//! rate limit on failed logins.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use vpnnat::gateway::Prefix;

use super::{Web, error, parse};

/// The session cookie.
const COOKIE: &str = "vpnnat_agent";
/// Session lifetime.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most (the oldest is dropped).
const MAX_SESSIONS: usize = 64;
/// Failed logins allowed per minute.
const LOGIN_FAILURES_PER_MIN: usize = 5;

struct Session {
    csrf: String,
    expires: Instant,
}

/// The password, the sessions and the client prefixes of the page.
pub(super) struct Auth {
    password_hash: [u8; 32],
    sessions: Mutex<HashMap<String, Session>>,
    login_failures: Mutex<VecDeque<Instant>>,
    pub(super) allowed: Vec<Prefix>,
    /// Never allowed, even inside an allowed prefix (the masquerade address:
    /// technicians' packets come from it).
    denied: Vec<Ipv4Addr>,
}

fn hash(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// Equality that takes the same time wherever the inputs differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    b.iter().fold(String::with_capacity(64), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

impl Auth {
    /// The page password and the client prefixes.
    pub(super) fn new(password: &str, allowed: Vec<Prefix>, denied: Vec<Ipv4Addr>) -> Self {
        Self {
            password_hash: hash(password),
            sessions: Mutex::new(HashMap::new()),
            login_failures: Mutex::new(VecDeque::new()),
            allowed,
            denied,
        }
    }

    fn client_allowed(&self, ip: IpAddr) -> bool {
        let v4 = match ip {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4,
                None => return v6.is_loopback(),
            },
        };
        !self.denied.contains(&v4) && self.allowed.iter().any(|p| p.contains(v4))
    }

    fn session_csrf(&self, headers: &HeaderMap) -> Option<String> {
        let token = cookie(headers, COOKIE)?;
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        sessions.get(&token).map(|s| s.csrf.clone())
    }

    /// Authenticates a request: the bearer password, or a session (plus the
    /// CSRF token on state-changing methods).
    fn authorize(&self, method: &Method, headers: &HeaderMap) -> Result<(), Response> {
        if let Some(auth) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            && let Some(pw) = auth.strip_prefix("Bearer ")
        {
            if same(&hash(pw), &self.password_hash) {
                return Ok(());
            }
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "wrong password",
                None,
            ));
        }
        let Some(csrf) = self.session_csrf(headers) else {
            return Err(please_log_in());
        };
        if *method != Method::GET && *method != Method::HEAD {
            let sent = headers
                .get("x-csrf-token")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !same(&hash(sent), &hash(&csrf)) {
                return Err(error(
                    StatusCode::FORBIDDEN,
                    "csrf",
                    "missing or wrong X-CSRF-Token header",
                    None,
                ));
            }
        }
        Ok(())
    }

    /// Whether another wrong password may be tried now (forgets failures
    /// older than a minute).
    fn login_allowed(&self) -> bool {
        let mut f = self
            .login_failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        while f
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
        {
            f.pop_front();
        }
        f.len() < LOGIN_FAILURES_PER_MIN
    }

    fn login_failed(&self) {
        self.login_failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(Instant::now());
    }

    /// A new session; returns its cookie token and CSRF token. The oldest
    /// session goes when there are too many.
    fn open_session(&self) -> (String, String) {
        let token = random_token();
        let csrf = random_token();
        let mut s = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        if s.len() >= MAX_SESSIONS
            && let Some(oldest) = s
                .iter()
                .min_by_key(|(_, v)| v.expires)
                .map(|(k, _)| k.clone())
        {
            s.remove(&oldest);
        }
        s.insert(
            token.clone(),
            Session {
                csrf: csrf.clone(),
                expires: Instant::now() + SESSION_TTL,
            },
        );
        (token, csrf)
    }

    fn close_session(&self, headers: &HeaderMap) {
        if let Some(token) = cookie(headers, COOKIE) {
            self.sessions
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&token);
        }
    }
}

/// An extractor that lets a handler run only for an authorized call (see
/// [`Auth::authorize`]); otherwise the call is answered with its refusal.
pub(super) struct Authorized;

impl FromRequestParts<Arc<Web>> for Authorized {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, web: &Arc<Web>) -> Result<Self, Response> {
        web.auth
            .authorize(&parts.method, &parts.headers)
            .map(|()| Self)
    }
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

fn please_log_in() -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "please log in",
        None,
    )
}

/// 403 for clients outside the LAN; security headers on every answer.
pub(super) async fn lan_only(
    State(web): State<Arc<Web>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    if !web.auth.client_allowed(peer.ip()) {
        tracing::debug!(client = %peer, "web client outside the LAN refused");
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this page is only reachable from the local network",
            None,
        );
    }
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    password: String,
}

#[derive(Serialize)]
struct SessionInfo {
    csrf_token: String,
    site_name: String,
}

/// `POST /api/login`.
pub(super) async fn login(State(web): State<Arc<Web>>, body: Bytes) -> Response {
    if !web.auth.login_allowed() {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many wrong passwords; wait a minute",
            None,
        );
    }
    let b: LoginBody = match parse(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    if !same(&hash(&b.password), &web.auth.password_hash) {
        web.auth.login_failed();
        tracing::warn!("wrong password on the customer page");
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "wrong password",
            Some("password"),
        );
    }
    let (token, csrf) = web.auth.open_session();
    let cookie = format!(
        "{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        SESSION_TTL.as_secs()
    );
    (
        [(header::SET_COOKIE, cookie)],
        axum::Json(SessionInfo {
            csrf_token: csrf,
            site_name: web.app.site_name.clone(),
        }),
    )
        .into_response()
}

/// `POST /api/logout`.
pub(super) async fn logout(
    _: Authorized,
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
) -> Response {
    web.auth.close_session(&headers);
    (
        StatusCode::NO_CONTENT,
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
        )],
    )
        .into_response()
}

/// `GET /api/session`: the CSRF token of the caller's session.
pub(super) async fn session(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    match web.auth.session_csrf(&headers) {
        Some(csrf) => axum::Json(SessionInfo {
            csrf_token: csrf,
            site_name: web.app.site_name.clone(),
        })
        .into_response(),
        None => please_log_in(),
    }
}
