//! The control-plane loop: long-polls the site's desired state
//! (`GET /api/v1/agent/state?after=V&wait_ms=N`), resolves its terminal names
//! locally, hands it to the data plane and reports what was applied
//! (ARCHITECTURE.md, "Desired state by long-poll").
//!
//! After a (re)start the first poll asks with `after=0`, so the state comes
//! from the server, never from anything stored locally. While the server is
//! unreachable the data plane keeps what it has, and removes each mapping
//! at its expiry by itself.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use vpnnat::backoff::Backoff;
use vpnnat::messages::{AgentDesiredState, AppliedState};

use crate::app::App;

/// Runs until `shutdown` turns true.
pub async fn run(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let Some(server) = app.server.clone() else {
        return;
    };
    let wait_ms = app.settings.server.poll_wait_ms.clamp(1000, 60_000);
    let seed = app.site_id.0 ^ 0x5eed;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5), seed);
    let mut after = 0u64;
    loop {
        let polled = tokio::select! {
            r = server.desired_state(after, wait_ms) => r,
            _ = shutdown.changed() => return,
        };
        let desired = match polled {
            Ok(d) => d,
            Err(e) => {
                if e.is_unauthorized() {
                    tracing::error!(
                        error = %e,
                        "the server refuses this site's credential; re-enroll with \
                         `router-agent enroll --force`"
                    );
                } else {
                    tracing::warn!(error = %e, "control plane unreachable; mappings stay until they expire");
                }
                app.update_control(|c| {
                    c.connected = false;
                    c.last_error = Some(e.to_string());
                });
                let delay = backoff.next_delay();
                tokio::select! {
                    () = tokio::time::sleep(delay) => continue,
                    _ = shutdown.changed() => return,
                }
            }
        };
        backoff.reset();
        app.update_control(|c| {
            c.connected = true;
            c.last_error = None;
            c.desired_version = Some(desired.version);
            c.problem = desired.problem.clone();
        });
        if desired.version <= after && after != 0 {
            // The wait timed out with nothing new.
            continue;
        }
        let version = desired.version;
        match apply(&app, desired).await {
            Ok(Some(applied)) => {
                after = version;
                if let Err(e) = server.applied(&applied).await {
                    tracing::warn!(error = %e, "could not report the applied state");
                }
            }
            Ok(None) => after = after.max(version),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "data plane gone");
                return;
            }
        }
    }
}

/// Resolves the document's terminals and applies it to the data plane.
///
/// # Errors
/// When the data plane has stopped.
pub async fn apply(app: &App, desired: AgentDesiredState) -> anyhow::Result<Option<AppliedState>> {
    let wanted: Vec<_> = desired
        .mappings
        .iter()
        .map(|m| m.terminal.clone())
        .collect();
    let names = app.names.resolve_all(&wanted).await;
    let version = desired.version;
    let applied = app.dataplane.apply(desired, names).await?;
    if let Some(a) = &applied {
        if a.errors.is_empty() {
            tracing::info!(version, "desired state applied");
        }
        for e in &a.errors {
            tracing::warn!(version, error = %e, "desired state applied in part");
        }
        app.update_control(|c| c.apply_errors = a.errors.clone());
    }
    Ok(applied)
}
