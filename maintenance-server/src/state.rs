//! What every handler shares: the database, the long-poll notifier, the
//! settings and policy, the login limiter; and the peer address of a
//! connection.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::db::Database;
use crate::db::ops::Policy;
use crate::notify::Notifier;
use crate::settings::Settings;
use crate::tls;

/// Shared state of all handlers.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

/// What [`AppState`] holds.
pub struct Inner {
    /// The database.
    pub db: Database,
    /// Long-poll wake-ups.
    pub notifier: Arc<Notifier>,
    /// The settings.
    pub settings: Settings,
    /// Policy derived from the settings.
    pub policy: Policy,
    /// SHA-256 of the operator token.
    pub operator_hash: String,
    /// Failed logins per key.
    pub login_limiter: RateLimiter,
    /// Turns true at shutdown (long-polls answer at once).
    pub shutdown: watch::Receiver<bool>,
    /// The bound on concurrent password checks of logins.
    pub password_checks: crate::auth::PasswordChecks,
    /// What this replica's webhook worker did.
    pub webhook_stats: crate::webhooks::Stats,
}

impl AppState {
    /// Shares `inner` with every handler.
    pub fn new(inner: Inner) -> Self {
        Self(Arc::new(inner))
    }
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// A fixed-window counter of failures per key.
#[derive(Debug)]
pub struct RateLimiter {
    limit: u32,
    window: Duration,
    hits: Mutex<HashMap<String, (Instant, u32)>>,
}

impl RateLimiter {
    /// `limit` failures per `window`.
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit,
            window,
            hits: Mutex::new(HashMap::new()),
        }
    }

    /// Counts an attempt of every key in `keys` unless one of them is over
    /// its limit already (then counts nothing and returns false). Counting
    /// before the work, not after, keeps concurrent attempts within the limit.
    pub fn attempt(&self, keys: &[&str], now: Instant) -> bool {
        let mut hits = self.hits.lock().unwrap_or_else(|e| e.into_inner());
        let window = self.window;
        let live = |e: &(Instant, u32)| now.duration_since(e.0) < window;
        if keys
            .iter()
            .any(|k| hits.get(*k).is_some_and(|e| live(e) && e.1 >= self.limit))
        {
            return false;
        }
        if hits.len() > 100_000 {
            hits.retain(|_, e| live(e));
        }
        for k in keys {
            let e = hits.entry((*k).to_owned()).or_insert((now, 0));
            if !live(e) {
                *e = (now, 0);
            }
            e.1 += 1;
        }
        true
    }

    /// Takes back an attempt of each key (it succeeded: only failures count).
    pub fn forgive(&self, keys: &[&str]) {
        let mut hits = self.hits.lock().unwrap_or_else(|e| e.into_inner());
        for k in keys {
            if let Some(e) = hits.get_mut(*k) {
                e.1 = e.1.saturating_sub(1);
            }
        }
    }
}

/// The TCP peer of a connection (the TLS listener reports it too).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TcpListener>>
    for PeerAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TcpListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tls::TlsListener>>
    for PeerAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, tls::TlsListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

impl AppState {
    /// The global address a request came from: the TCP peer, or the last
    /// `X-Forwarded-For` hop when the peer is a trusted proxy.
    pub fn client_address(&self, peer: SocketAddr, headers: &axum::http::HeaderMap) -> IpAddr {
        let ip = peer.ip();
        if !self.settings.http.trusted_proxies.contains(&ip) {
            return ip;
        }
        headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|s| s.trim().parse::<IpAddr>().ok())
            .next_back()
            .unwrap_or(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limiter_opens_again_after_its_window() {
        let l = RateLimiter::new(2, Duration::from_secs(60));
        let t = Instant::now();
        assert!(l.attempt(&["a"], t));
        assert!(l.attempt(&["a"], t));
        assert!(!l.attempt(&["a"], t), "a is over its limit");
        assert!(l.attempt(&["b"], t));
        assert!(
            !l.attempt(&["a", "b"], t),
            "one key over its limit refuses all"
        );
        let later = t + Duration::from_secs(61);
        assert!(l.attempt(&["a"], later));
        // A success is taken back: it does not count toward the limit.
        l.forgive(&["a"]);
        assert!(l.attempt(&["a"], later));
        assert!(l.attempt(&["a"], later));
        assert!(!l.attempt(&["a"], later));
    }
}
