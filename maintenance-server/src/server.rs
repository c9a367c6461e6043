//! Starting the server: the database (opened, migrated, its address pool
//! filled), the operator token, the background tasks and the HTTP(S) listener.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::db::ops::Policy;
use crate::db::{self, Database, addresses};
use crate::notify::{self, Notifier};
use crate::secrets::{Secret, SecretKind};
use crate::settings::Settings;
use crate::state::{AppState, Inner, PeerAddr, RateLimiter};
use crate::{routes, tasks, tls};

/// Opens the database named by the settings, migrates it and brings the pool
/// table in line with `pool.prefix` (checked with the core's pool model first).
///
/// # Errors
/// When the database cannot be opened.
pub async fn open_database(settings: &Settings) -> anyhow::Result<Database> {
    let pool = addresses::configured_pool(&settings.pool.prefix).context("pool.prefix")?;
    let db = Database::connect(&settings.database_url(), settings.database.max_connections).await?;
    db.sync_pool(pool.prefix())
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
    let token = Secret::generate(SecretKind::Operator);
    write_secret_file(&path, token.expose())?;
    tracing::info!(path = %path.display(), "generated the operator token");
    Ok(token.expose().to_owned())
}

/// Creates the state directory (mode 0700, like the parents
/// [`vpnnat_shell::keys::create_private_file`] creates) when it is missing.
fn ensure_state_dir(dir: &Path) -> anyhow::Result<()> {
    vpnnat_shell::keys::create_private_dir(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// Writes `secret` to a new file (mode 0600, parents 0700); never overwrites.
fn write_secret_file(path: &Path, secret: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut f = vpnnat_shell::keys::create_private_file(path)
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
    let webhook_sender = crate::webhooks::Sender::load(&settings)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let notifier = Arc::new(Notifier::default());
    let state = AppState::new(Inner {
        db: db.clone(),
        notifier: notifier.clone(),
        policy: Policy::new(&settings),
        operator_hash: Secret::hash_of(&token),
        login_limiter: RateLimiter::new(
            settings.technicians.login_attempts_per_minute,
            Duration::from_secs(60),
        ),
        shutdown: stop_rx.clone(),
        password_checks: crate::auth::PasswordChecks::new(
            settings.password_checks(),
            crate::auth::PASSWORD_CHECK_WAIT,
        ),
        webhook_stats: crate::webhooks::Stats::default(),
        settings: settings.clone(),
    });
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
    if !webhook_sender.is_empty() {
        background.push(tokio::spawn(crate::webhooks::run(
            state.clone(),
            webhook_sender,
            stop_rx.clone(),
        )));
    }
    let app = routes::router(state.clone());
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
