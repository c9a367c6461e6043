//! Who may use the page: the LAN-only guard, the `Host` check (a page that
//! answers only to its own names cannot be read through DNS rebinding), the
//! local password, sessions (an `HttpOnly`, `SameSite=Strict` cookie) with
//! their CSRF token, and the rate limit on failed logins, per client (IPv6
//! by /64) so that one LAN device cannot lock the customer out.

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
/// Failed logins allowed per client and minute.
const LOGIN_FAILURES_PER_MIN: usize = 5;
/// Clients whose failures are remembered at most (the least recent go first).
const MAX_LIMITED_CLIENTS: usize = 1024;
/// How long a failed login counts.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

struct Session {
    csrf: String,
    expires: Instant,
}

/// The password, the sessions and the client prefixes of the page.
pub(super) struct Auth {
    password_hash: [u8; 32],
    sessions: Mutex<HashMap<String, Session>>,
    login_failures: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
    pub(super) allowed: Vec<Prefix>,
    /// The names the page answers to (lower case, no port).
    hosts: Vec<String>,
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
    /// The page password, the client prefixes and the page's host names.
    pub(super) fn new(
        password: &str,
        allowed: Vec<Prefix>,
        denied: Vec<Ipv4Addr>,
        hosts: Vec<String>,
    ) -> Self {
        Self {
            password_hash: hash(password),
            sessions: Mutex::new(HashMap::new()),
            login_failures: Mutex::new(HashMap::new()),
            allowed,
            hosts: hosts.iter().map(|h| normal_host(h)).collect(),
            denied,
        }
    }

    /// Whether `host` (a `Host` header or URI authority) names this page.
    pub(super) fn host_allowed(&self, host: &str) -> bool {
        let host = normal_host(host);
        !host.is_empty() && self.hosts.contains(&host)
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

    /// Whether `client` may try another password now (forgets failures
    /// older than a minute).
    fn login_allowed(&self, client: IpAddr) -> bool {
        let mut all = self
            .login_failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(f) = all.get_mut(&client_key(client)) else {
            return true;
        };
        let now = Instant::now();
        while f
            .front()
            .is_some_and(|t| now.duration_since(*t) > FAILURE_WINDOW)
        {
            f.pop_front();
        }
        f.len() < LOGIN_FAILURES_PER_MIN
    }

    fn login_failed(&self, client: IpAddr) {
        let mut all = self
            .login_failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let key = client_key(client);
        let now = Instant::now();
        if !all.contains_key(&key) && all.len() >= MAX_LIMITED_CLIENTS {
            all.retain(|_, f| {
                f.back()
                    .is_some_and(|t| now.duration_since(*t) <= FAILURE_WINDOW)
            });
            if all.len() >= MAX_LIMITED_CLIENTS
                && let Some(oldest) = all
                    .iter()
                    .min_by_key(|(_, f)| f.back().copied())
                    .map(|(k, _)| *k)
            {
                all.remove(&oldest);
            }
        }
        let f = all.entry(key).or_default();
        if f.len() >= LOGIN_FAILURES_PER_MIN {
            f.pop_front();
        }
        f.push_back(now);
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

/// The unit the login limit counts: an IPv4 address, an IPv6 /64 (one
/// device easily has many addresses of its /64).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpAddr::V6(std::net::Ipv6Addr::from(o))
            }
        },
    }
}

/// A host name as compared: lower case, without the port, the brackets of
/// an IPv6 literal or a trailing dot.
fn normal_host(h: &str) -> String {
    let h = h.trim();
    if h.parse::<std::net::Ipv6Addr>().is_ok() {
        return h.to_ascii_lowercase();
    }
    let h = match h.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => h.rsplit_once(':').map_or(h, |(name, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) {
                name
            } else {
                h
            }
        }),
    };
    h.trim_end_matches('.').to_ascii_lowercase()
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

/// 403 for clients outside the LAN, 421 for a `Host` that is not one of
/// the page's names; security headers on every answer.
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
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    if !web.auth.host_allowed(&host) {
        tracing::warn!(client = %peer, host = %host, "request for another host name refused (DNS rebinding?)");
        let msg = "this page answers only to its own address; open it by the router's address";
        let html = req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/html"));
        if html {
            return (
                StatusCode::MISDIRECTED_REQUEST,
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                format!("<!doctype html><title>Wrong address</title><p>{msg}.</p>\n"),
            )
                .into_response();
        }
        return error(StatusCode::MISDIRECTED_REQUEST, "wrong_host", msg, None);
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
pub(super) async fn login(
    State(web): State<Arc<Web>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Response {
    let client = peer.ip();
    if !web.auth.login_allowed(client) {
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
        web.auth.login_failed(client);
        tracing::warn!(client = %peer, "wrong password on the customer page");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(
            "pw",
            vec![Prefix::new(Ipv4Addr::new(192, 168, 1, 0), 24).expect("prefix")],
            Vec::new(),
            vec!["192.168.1.1".into(), "Router.LAN".into(), "::1".into()],
        )
    }

    #[test]
    fn security_one_client_cannot_lock_out_another() {
        let a = auth();
        let guesser: IpAddr = "192.168.1.66".parse().expect("ip");
        let customer: IpAddr = "192.168.1.20".parse().expect("ip");
        for _ in 0..LOGIN_FAILURES_PER_MIN {
            assert!(a.login_allowed(guesser));
            a.login_failed(guesser);
        }
        assert!(!a.login_allowed(guesser));
        assert!(
            a.login_allowed(customer),
            "another device is not locked out"
        );
        // IPv6: one /64 is one client.
        let v6a: IpAddr = "2001:db8:1:2::10".parse().expect("ip");
        let v6b: IpAddr = "2001:db8:1:2:ffff::99".parse().expect("ip");
        let v6other: IpAddr = "2001:db8:1:3::10".parse().expect("ip");
        for _ in 0..LOGIN_FAILURES_PER_MIN {
            a.login_failed(v6a);
        }
        assert!(!a.login_allowed(v6b));
        assert!(a.login_allowed(v6other));
    }

    #[test]
    fn security_the_failure_table_is_bounded() {
        let a = auth();
        for i in 0..(MAX_LIMITED_CLIENTS as u32 + 50) {
            a.login_failed(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)));
        }
        let n = a
            .login_failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        assert!(n <= MAX_LIMITED_CLIENTS, "{n}");
    }

    #[test]
    fn security_only_the_pages_own_names_are_answered() {
        let a = auth();
        for ok in [
            "192.168.1.1",
            "192.168.1.1:8088",
            "router.lan",
            "ROUTER.lan.:8088",
            "[::1]:8088",
        ] {
            assert!(a.host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8088",
            "",
            "192.168.1.10",
            "router.lan.evil.example",
        ] {
            assert!(!a.host_allowed(bad), "{bad}");
        }
    }
}
