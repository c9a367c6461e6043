//! vpnnat maintenance-server: the control plane.
//!
//! It owns the database (SQLite or PostgreSQL, [`db`]), the HTTP API for
//! operators, router agents, gateways and technicians ([`handlers`]), the
//! desired-state long-polls and their wake-ups ([`notify`]), gateway
//! selection, failover and lease expiry ([`tasks`], [`db::ops`]) and the
//! technician console ([`console`]). The binary (`main.rs`) is the CLI
//! around [`launch_with_listener`].
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod auth;
pub mod console;

pub mod db;
pub mod error;
pub mod handlers;
pub mod metrics;
pub mod notify;
pub mod openapi;

pub mod settings;
pub mod tasks;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::{Secret, SecretKind};
use crate::db::Database;
use crate::db::ops::Policy;
use crate::notify::Notifier;
use crate::settings::Settings;

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

    /// Whether `key` is over its limit now.
    pub fn blocked(&self, key: &str, now: Instant) -> bool {
        let hits = self.hits.lock().unwrap_or_else(|e| e.into_inner());
        hits.get(key)
            .is_some_and(|(start, n)| now.duration_since(*start) < self.window && *n >= self.limit)
    }

    /// Counts a failure of `key`.
    pub fn fail(&self, key: &str, now: Instant) {
        let mut hits = self.hits.lock().unwrap_or_else(|e| e.into_inner());
        if hits.len() > 100_000 {
            let window = self.window;
            hits.retain(|_, (start, _)| now.duration_since(*start) < window);
        }
        let e = hits.entry(key.to_owned()).or_insert((now, 0));
        if now.duration_since(e.0) >= self.window {
            *e = (now, 0);
        }
        e.1 += 1;
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

/// Opens the database named by the settings, migrates it and brings the pool table in line.
///
/// # Errors
/// When the database cannot be opened.
pub async fn open_database(settings: &Settings) -> anyhow::Result<Database> {
    let db = Database::connect(&settings.database_url(), settings.database.max_connections).await?;
    let prefix = settings
        .pool_prefix()
        .map_err(|e| anyhow::anyhow!("pool.prefix: {e}"))?;
    db.sync_pool(prefix)
        .await
        .context("filling the NAT-address pool table")?;
    Ok(db)
}

/// The operator token: configured, or read from (or generated into)
/// `<state.dir>/operator.token` with mode 0600.
///
/// # Errors
/// When the file cannot be read or written.
pub fn operator_token(settings: &Settings) -> anyhow::Result<String> {
    if !settings.operator.token.is_empty() {
        return Ok(settings.operator.token.clone());
    }
    let path = settings.state.dir.join("operator.token");
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    ensure_state_dir(&settings.state.dir)?;
    let token = Secret::generate(SecretKind::Operator);
    write_secret_file(&path, token.expose())?;
    tracing::info!(path = %path.display(), "generated the operator token");
    Ok(token.expose().to_owned())
}

fn ensure_state_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

fn write_secret_file(path: &Path, secret: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{secret}").with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Runs the server on `listener` until `shutdown` completes: opens and
/// migrates the database, starts the background tasks (lease expiry,
/// failover, PostgreSQL `LISTEN`) and serves the API and console (HTTPS when
/// `[tls]` is configured).
///
/// # Errors
/// When the database, the TLS files or the listener fail.
pub async fn launch_with_listener(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    settings
        .validate()
        .map_err(|(k, m)| anyhow::anyhow!("{k}: {m}"))?;
    if settings.database.url.is_empty() {
        ensure_state_dir(&settings.state.dir)?;
    }
    let db = open_database(&settings).await?;
    let token = operator_token(&settings)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let notifier = Arc::new(Notifier::default());
    let state = AppState(Arc::new(Inner {
        db: db.clone(),
        notifier: notifier.clone(),
        policy: Policy::new(&settings),
        operator_hash: Secret::hash_of(&token),
        login_limiter: RateLimiter::new(
            settings.technicians.login_attempts_per_minute,
            Duration::from_secs(60),
        ),
        shutdown: stop_rx.clone(),
        settings: settings.clone(),
    }));
    let mut background = Vec::new();
    if db.kind == db::DbKind::Postgres {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        background.push(tokio::spawn(notify::listen_postgres(
            db.url().to_owned(),
            notifier.clone(),
            stop_rx.clone(),
            ready_tx,
        )));
        // Serve only once changes of other replicas reach us.
        let _ = tokio::time::timeout(Duration::from_secs(10), ready_rx).await;
    }
    background.push(tokio::spawn(tasks::run(state.clone(), stop_rx.clone())));
    let app = handlers::router(state.clone());
    let local = listener.local_addr().context("listener address")?;
    let stop = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let result = if settings.tls.enabled() {
        let tls = tls::TlsListener::new(listener, &settings.tls)?;
        tracing::info!(addr = %local, tls = true, db = ?db.kind, "listening");
        axum::serve(tls, app.into_make_service_with_connect_info::<PeerAddr>())
            .with_graceful_shutdown(stop)
            .await
    } else {
        tracing::info!(addr = %local, tls = false, db = ?db.kind, "listening");
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<PeerAddr>(),
        )
        .with_graceful_shutdown(stop)
        .await
    };
    for b in background {
        let _ = tokio::time::timeout(Duration::from_secs(5), b).await;
    }
    // Close the pools: SQLite checkpoints its WAL into the database file as
    // the last connection closes, so the file alone is the whole state.
    drop(state);
    db.close().await;
    result.context("serving HTTP")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limiter_opens_again_after_its_window() {
        let l = RateLimiter::new(2, Duration::from_secs(60));
        let t = Instant::now();
        assert!(!l.blocked("a", t));
        l.fail("a", t);
        l.fail("a", t);
        assert!(l.blocked("a", t));
        assert!(!l.blocked("b", t));
        assert!(!l.blocked("a", t + Duration::from_secs(61)));
        l.fail("a", t + Duration::from_secs(61));
        assert!(!l.blocked("a", t + Duration::from_secs(61)));
    }
}
