//! The gateway's side of the control plane: registers with the maintenance
//! server, heartbeats capacity, load, health and per-peer counters, follows
//! the desired-state long-poll and reports what it applied (docs/DESIGN.md,
//! "Control plane"). When to call what, the cursor, backoff and registering
//! again are the core's follower ([`vpnnat::control::Follower`]); this module
//! makes the calls. The data plane keeps forwarding with the state it has
//! while the server is away.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use vpnnat::control::{Call, CallFailure, Follower, FollowerConfig, FollowerEvent, Reply};
use vpnnat::messages::{
    AppliedState, GatewayDesiredState, GatewayHeartbeat, GatewayRegistered, GatewayRegistration,
    HeartbeatAck, PeerStatus, paths,
};
use vpnnat_shell::follow::{ControlCalls, follow};
use vpnnat_shell::http::{ApiClient, CallError, HttpOptions, http_client};

use crate::app::{App, unix_millis};
use crate::settings::Settings;

/// Runs until `shutdown` turns true.
pub async fn run(
    app: Arc<App>,
    settings: Settings,
    credential: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let wait = Duration::from_millis(settings.server.poll_wait_ms);
    let http = match http_client(&HttpOptions {
        // The long-poll is held up to `wait`.
        timeout: wait + Duration::from_secs(15),
        ..HttpOptions::default()
    }) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "HTTP client");
            return;
        }
    };
    let keys = app.key.public_keys().await;
    let registration = GatewayRegistration {
        endpoints: settings.wireguard.endpoints.clone(),
        public_key: keys.current,
        // Only the kinds its data plane runs: the server places a site of
        // another kind elsewhere.
        tunnel_kinds: app.tunnel_kinds.clone(),
        max_tunnels: settings.wireguard.max_tunnels,
        software_version: env!("CARGO_PKG_VERSION").to_owned(),
        technician_prefixes: settings.center.technician_prefixes.clone(),
        tls: app.tls.clone(),
        next_public_key: None,
    };
    let seed = u64::from_le_bytes(keys.current.0[..8].try_into().unwrap_or([1; 8]));
    let follower = Follower::new(
        FollowerConfig {
            wait,
            register: true,
            heartbeat: true,
            seed,
        },
        Instant::now(),
    );
    let calls = GatewayCalls {
        server: ApiClient::new(http, &settings.server.url, Some(credential)),
        registration,
        app,
    };
    if let Err(e) = follow(&calls, follower, &mut shutdown).await {
        tracing::error!(error = %format!("{e:#}"), "data plane gone");
    }
}

struct GatewayCalls {
    app: Arc<App>,
    server: ApiClient,
    registration: GatewayRegistration,
}

impl GatewayCalls {
    async fn register(&self) -> Reply<GatewayDesiredState> {
        // The keys of now: a rotation may have started or ended since.
        let keys = self.app.key.public_keys().await;
        let registration = GatewayRegistration {
            public_key: keys.current,
            next_public_key: keys.next,
            ..self.registration.clone()
        };
        let answer: Result<GatewayRegistered, _> = self
            .server
            .post_json("register", paths::GATEWAY_REGISTER, &registration)
            .await;
        match answer {
            Ok(r) => {
                tracing::info!(gateway.id = %r.gateway_id, "registered with the server");
                self.app
                    .update_control(|c| c.gateway_id = Some(r.gateway_id));
                Reply::Registered {
                    heartbeat_interval: Duration::from_millis(r.heartbeat_interval_ms),
                }
            }
            Err(e) => failed(&e),
        }
    }

    async fn poll(&self, after: u64, wait: Duration) -> Reply<GatewayDesiredState> {
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        let request = self
            .server
            .get(paths::GATEWAY_STATE)
            .query(&[("after", after), ("wait_ms", wait_ms)]);
        let desired: GatewayDesiredState = match self.server.send("desired state", request).await {
            Ok(d) => d,
            Err(e) => return failed(&e),
        };
        let ours = self.app.control_state().gateway_id;
        if ours != Some(desired.gateway_id) {
            let ours = ours.map_or_else(|| "unregistered".to_owned(), |id| id.to_string());
            return Reply::Failed(CallFailure::Rejected(format!(
                "desired state is for gateway {}, not {ours}",
                desired.gateway_id
            )));
        }
        Reply::Document(desired)
    }

    async fn report(&self, applied: &AppliedState) -> Reply<GatewayDesiredState> {
        let request = self.server.post(paths::GATEWAY_APPLIED).json(applied);
        match self.server.send_for_success("applied", request).await {
            Ok(()) => Reply::Accepted,
            Err(e) => failed(&e),
        }
    }

    async fn heartbeat(&self) -> anyhow::Result<Reply<GatewayDesiredState>> {
        let beat = heartbeat(&self.app).await?;
        let sent_at = Instant::now();
        let ack: Result<HeartbeatAck, _> = self
            .server
            .post_json("heartbeat", paths::GATEWAY_HEARTBEAT, &beat)
            .await;
        Ok(match ack {
            Ok(ack) => {
                tracing::debug!(
                    desired = ack.desired_version,
                    drain = ack.drain,
                    "heartbeat"
                );
                let current = beat.applied_version == ack.desired_version;
                self.app
                    .lease_acknowledged(sent_at, ack.lease_ms, current)
                    .await;
                self.app.retry_routes().await;
                Reply::Accepted
            }
            Err(e) => failed(&e),
        })
    }
}

fn failed(e: &CallError) -> Reply<GatewayDesiredState> {
    Reply::Failed(e.failure())
}

impl ControlCalls for GatewayCalls {
    type Document = GatewayDesiredState;

    async fn call(&self, call: Call) -> anyhow::Result<Reply<GatewayDesiredState>> {
        Ok(match call {
            Call::Register => self.register().await,
            Call::Poll { after, wait } => self.poll(after, wait).await,
            Call::ReportApplied(applied) => self.report(&applied).await,
            Call::Heartbeat => return self.heartbeat().await,
        })
    }

    async fn apply(&self, desired: GatewayDesiredState) -> anyhow::Result<Option<AppliedState>> {
        self.app.apply(desired).await
    }

    fn event(&self, event: &FollowerEvent) {
        match event {
            FollowerEvent::Connected => self.app.update_control(|c| {
                c.connected = true;
                c.last_error = None;
            }),
            FollowerEvent::Disconnected(e) => {
                tracing::warn!(error = %e, "control plane unreachable; forwarding continues");
                self.app.update_control(|c| {
                    c.connected = false;
                    c.last_error = Some(e.to_string());
                });
            }
            FollowerEvent::Forgotten(e) => tracing::warn!(
                error = %e,
                "the server does not know this gateway any more; registering again"
            ),
        }
    }
}

async fn heartbeat(app: &App) -> anyhow::Result<GatewayHeartbeat> {
    let snap = app.snapshot().await?;
    let keys = app.key.public_keys().await;
    let peers: Vec<PeerStatus> = snap
        .peers
        .iter()
        .map(|p| PeerStatus {
            site_id: p.site_id,
            endpoint: app.shown_endpoint(p.endpoint),
            last_handshake: p.stats.last_handshake.map(|t| unix_millis(t, snap.at)),
            rx_bytes: p.stats.rx_bytes,
            tx_bytes: p.stats.tx_bytes,
            transport: app.transport_of(p.endpoint),
        })
        .collect();
    Ok(GatewayHeartbeat {
        max_tunnels: app.max_tunnels,
        active_tunnels: u32::try_from(peers.len()).unwrap_or(u32::MAX),
        health: app.health(),
        applied_version: snap.applied_version.unwrap_or(0),
        peers,
        public_key: keys.in_heartbeats.then_some(keys.current),
        next_public_key: keys.next,
    })
}
