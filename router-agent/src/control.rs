//! The agent's side of the control plane: long-polls the site's desired state
//! (`GET /api/v1/agent/state?after=V&wait_ms=N`), resolves its terminal names
//! locally, hands it to the data plane and reports what was applied
//! (docs/DESIGN.md, "Control plane"). When to call what, the cursor and the
//! backoff are the core's follower ([`vpnnat::control::Follower`]).
//!
//! After a (re)start the first poll asks with `after=0`, so the state comes
//! from the server, never from anything stored locally. While the server is
//! unreachable the data plane keeps what it has, and removes each mapping
//! at its expiry by itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use vpnnat::control::{Call, Follower, FollowerConfig, FollowerEvent, Reply};
use vpnnat::messages::{AgentDesiredState, AppliedState, UnixMillis};
use vpnnat_shell::follow::{ControlCalls, follow};

use crate::app::App;
use crate::client::ServerClient;
use crate::dataplane::wall_now;

/// Runs until `shutdown` turns true.
pub async fn run(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let Some(server) = app.server.clone() else {
        return;
    };
    let wait_ms = app.settings.server.poll_wait_ms.clamp(1000, 60_000);
    let follower = Follower::new(
        FollowerConfig {
            wait: Duration::from_millis(wait_ms),
            // Enrollment is separate; a refused credential needs an operator.
            register: false,
            heartbeat: false,
            seed: app.site_id.0 ^ 0x5eed,
        },
        Instant::now(),
    );
    let calls = AgentCalls {
        app,
        server,
        server_clock: std::sync::Mutex::new(None),
    };
    if let Err(e) = follow(&calls, follower, &mut shutdown).await {
        tracing::error!(error = %format!("{e:#}"), "data plane gone");
    }
}

struct AgentCalls {
    app: Arc<App>,
    server: ServerClient,
    /// The server's clock when it answered the last poll (its `Date`).
    server_clock: std::sync::Mutex<Option<UnixMillis>>,
}

impl ControlCalls for AgentCalls {
    type Document = AgentDesiredState;

    async fn call(&self, call: Call) -> anyhow::Result<Reply<AgentDesiredState>> {
        Ok(match call {
            Call::Poll { after, wait } => {
                let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
                match self.server.desired_state(after, wait_ms).await {
                    Ok((desired, date)) => {
                        *self
                            .server_clock
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = date;
                        let before = self.app.control().problem;
                        if desired.problem != before
                            && let Some(p) = &desired.problem
                        {
                            tracing::warn!(problem = %p, "the maintenance center reports a problem for this site");
                        }
                        self.app.update_control(|c| {
                            c.desired_version = Some(desired.version);
                            c.problem = desired.problem.clone();
                        });
                        // Every document, also an unchanged one: a step
                        // that failed is tried again.
                        self.app.rotation.send_replace(desired.rotation.clone());
                        Reply::Document(desired)
                    }
                    Err(e) => Reply::Failed(e.failure()),
                }
            }
            Call::ReportApplied(applied) => match self.server.applied(&applied).await {
                Ok(()) => Reply::Accepted,
                Err(e) => Reply::Failed(e.failure()),
            },
            Call::Register | Call::Heartbeat => {
                anyhow::bail!("the agent neither registers nor heartbeats")
            }
        })
    }

    async fn apply(&self, desired: AgentDesiredState) -> anyhow::Result<Option<AppliedState>> {
        let date = *self
            .server_clock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let reference = date.unwrap_or_else(|| {
            tracing::warn!(
                "the server's answer has no Date header: expiry counts on this router's clock"
            );
            wall_now()
        });
        apply(&self.app, desired, reference).await
    }

    fn event(&self, event: &FollowerEvent) {
        match event {
            FollowerEvent::Connected => self.app.update_control(|c| {
                c.connected = true;
                c.last_error = None;
            }),
            FollowerEvent::Disconnected(e) | FollowerEvent::Forgotten(e) => {
                if e.is_unauthorized() {
                    tracing::error!(
                        error = %e,
                        "the server refuses this site's credential; re-enroll with \
                         `router-agent enroll --force`"
                    );
                } else {
                    tracing::warn!(error = %e, "control plane unreachable; mappings stay until they expire");
                }
                self.app.update_control(|c| {
                    c.connected = false;
                    c.last_error = Some(e.to_string());
                });
            }
        }
    }
}

/// Resolves the document's terminals and applies it to the data plane.
/// `reference` is the time of the clock that wrote the document (the
/// server's when it answered): each mapping lives for `expires_at -
/// reference` from now, so that a wrong clock on this router neither
/// extends nor shortens the customer's consent.
///
/// # Errors
/// When the data plane has stopped.
pub async fn apply(
    app: &App,
    desired: AgentDesiredState,
    reference: UnixMillis,
) -> anyhow::Result<Option<AppliedState>> {
    let wanted: Vec<_> = desired
        .mappings
        .iter()
        .map(|m| m.terminal.clone())
        .collect();
    let names = app.names.resolve_all(&wanted).await;
    let version = desired.version;
    let target = desired.tunnel.as_ref().map(|t| crate::carrier::Target {
        endpoint: t.endpoint,
        tls: t.tls.clone(),
    });
    // A request being created on the page right now is recorded before its
    // document is applied (the server may announce it before it answers).
    let _creating = app.consent_gate.lock().await;
    let applied = app.dataplane.apply(desired, names, reference).await?;
    if let Some(a) = &applied {
        if a.errors.is_empty() {
            tracing::info!(version, "desired state applied");
        }
        for e in &a.errors {
            tracing::warn!(version, error = %e, "desired state applied in part");
        }
        app.update_control(|c| c.apply_errors = a.errors.clone());
        app.carrier.set_target(target);
    }
    Ok(applied)
}
