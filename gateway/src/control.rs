//! The control-plane client: registers with the maintenance server,
//! heartbeats capacity, load, health and per-peer counters, follows the
//! desired-state long-poll and reports what it applied (ARCHITECTURE.md,
//! "Desired state by long-poll"). Reconnects with exponential backoff; the
//! data plane keeps forwarding with the state it has meanwhile.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use reqwest::StatusCode;
use tokio::sync::watch;
use vpnnat::backoff::Backoff;
use vpnnat::messages::{
    AppliedState, GatewayDesiredState, GatewayHeartbeat, GatewayId, GatewayRegistered,
    GatewayRegistration, HeartbeatAck, PeerStatus, TunnelKind, paths,
};

use crate::app::{App, unix_millis};
use crate::settings::Settings;

/// Why a loop stopped.
enum Stop {
    /// The server no longer knows us (401/403/404): register again.
    Reregister,
    /// Shutting down.
    Shutdown,
}

/// Runs until `shutdown` turns true.
pub async fn run(
    app: Arc<App>,
    settings: Settings,
    credential: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let base = settings.server.url.trim_end_matches('/').to_owned();
    let wait_ms = settings.server.poll_wait_ms;
    let client = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_millis(wait_ms) + Duration::from_secs(15))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "HTTP client");
            return;
        }
    };
    let client = Client {
        http: client,
        base,
        credential,
    };
    let seed = u64::from_le_bytes(app.public_key.0[..8].try_into().unwrap_or([1; 8]));
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5), seed);
    let registration = GatewayRegistration {
        endpoints: settings.wireguard.endpoints.clone(),
        public_key: app.public_key,
        tunnel_kinds: vec![TunnelKind::Wireguard],
        max_tunnels: settings.wireguard.max_tunnels,
        software_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    loop {
        let registered = tokio::select! {
            r = client.register(&registration) => r,
            _ = shutdown.changed() => return,
        };
        let registered = match registered {
            Ok(r) => r,
            Err(e) => {
                disconnected(&app, &e);
                if sleep_or_shutdown(backoff.next_delay(), &mut shutdown).await {
                    return;
                }
                continue;
            }
        };
        backoff.reset();
        tracing::info!(gateway.id = %registered.gateway_id, "registered with the server");
        app.update_control(|c| {
            c.connected = true;
            c.gateway_id = Some(registered.gateway_id);
            c.last_error = None;
        });
        let interval = Duration::from_millis(registered.heartbeat_interval_ms.clamp(200, 60_000));
        let stop = tokio::select! {
            s = heartbeat_loop(&app, &client, interval, seed) => s,
            s = state_loop(&app, &client, registered.gateway_id, wait_ms, seed) => s,
            _ = shutdown.changed() => Stop::Shutdown,
        };
        match stop {
            Stop::Shutdown => return,
            Stop::Reregister => {
                tracing::warn!("the server does not know this gateway any more; registering again");
                if sleep_or_shutdown(backoff.next_delay(), &mut shutdown).await {
                    return;
                }
            }
        }
    }
}

fn disconnected(app: &App, e: &anyhow::Error) {
    tracing::warn!(error = %format!("{e:#}"), "control plane unreachable; forwarding continues");
    app.update_control(|c| {
        c.connected = false;
        c.last_error = Some(format!("{e:#}"));
    });
}

async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        _ = shutdown.changed() => true,
    }
}

async fn heartbeat_loop(app: &App, client: &Client, interval: Duration, seed: u64) -> Stop {
    let mut backoff = Backoff::new(interval, Duration::from_secs(5).max(interval), seed ^ 0x5a);
    loop {
        let beat = match heartbeat(app).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "data plane gone");
                return Stop::Shutdown;
            }
        };
        let delay = match client.heartbeat(&beat).await {
            Ok(Ok(ack)) => {
                backoff.reset();
                app.update_control(|c| c.connected = true);
                tracing::debug!(
                    desired = ack.desired_version,
                    drain = ack.drain,
                    "heartbeat"
                );
                app.retry_routes().await;
                interval
            }
            Ok(Err(Unknown)) => return Stop::Reregister,
            Err(e) => {
                disconnected(app, &e);
                backoff.next_delay()
            }
        };
        tokio::time::sleep(delay).await;
    }
}

async fn heartbeat(app: &App) -> anyhow::Result<GatewayHeartbeat> {
    let snap = app.snapshot().await?;
    let peers: Vec<PeerStatus> = snap
        .peers
        .iter()
        .map(|p| PeerStatus {
            site_id: p.site_id,
            endpoint: p.endpoint,
            last_handshake: p.stats.last_handshake.map(|t| unix_millis(t, snap.at)),
            rx_bytes: p.stats.rx_bytes,
            tx_bytes: p.stats.tx_bytes,
        })
        .collect();
    Ok(GatewayHeartbeat {
        max_tunnels: app.max_tunnels,
        active_tunnels: u32::try_from(peers.len()).unwrap_or(u32::MAX),
        health: app.health(),
        applied_version: snap.applied_version.unwrap_or(0),
        peers,
    })
}

async fn state_loop(
    app: &App,
    client: &Client,
    gateway_id: GatewayId,
    wait_ms: u64,
    seed: u64,
) -> Stop {
    let mut backoff = Backoff::new(
        Duration::from_millis(200),
        Duration::from_secs(5),
        seed ^ 0xa5,
    );
    loop {
        let running = match app.snapshot().await {
            Ok(s) => s.applied_version,
            Err(_) => return Stop::Shutdown,
        };
        let desired = match client.desired_state(running.unwrap_or(0), wait_ms).await {
            Ok(Ok(d)) => d,
            Ok(Err(Unknown)) => return Stop::Reregister,
            Err(e) => {
                disconnected(app, &e);
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        backoff.reset();
        app.update_control(|c| c.connected = true);
        if desired.gateway_id != gateway_id {
            disconnected(
                app,
                &anyhow!(
                    "desired state is for gateway {}, not {gateway_id}",
                    desired.gateway_id
                ),
            );
            tokio::time::sleep(backoff.next_delay()).await;
            continue;
        }
        if running.is_some_and(|v| desired.version <= v) {
            // The wait timed out with nothing new.
            continue;
        }
        let applied = match app.apply(desired).await {
            Ok(Some(a)) => a,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "data plane gone");
                return Stop::Shutdown;
            }
        };
        match client.applied(&applied).await {
            Ok(Ok(())) => {}
            Ok(Err(Unknown)) => return Stop::Reregister,
            Err(e) => disconnected(app, &e),
        }
    }
}

/// The server answered 401, 403 or 404: it does not know this gateway (any more).
struct Unknown;

struct Client {
    http: reqwest::Client,
    base: String,
    credential: String,
}

impl Client {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn register(&self, r: &GatewayRegistration) -> anyhow::Result<GatewayRegistered> {
        let resp = self
            .http
            .post(self.url(paths::GATEWAY_REGISTER))
            .bearer_auth(&self.credential)
            .json(r)
            .send()
            .await
            .context("register")?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(anyhow!("register: HTTP {status}: {body}"));
        }
        resp.json().await.context("register: response")
    }

    async fn heartbeat(
        &self,
        b: &GatewayHeartbeat,
    ) -> anyhow::Result<Result<HeartbeatAck, Unknown>> {
        let resp = self
            .http
            .post(self.url(paths::GATEWAY_HEARTBEAT))
            .bearer_auth(&self.credential)
            .json(b)
            .send()
            .await
            .context("heartbeat")?;
        if is_unknown(resp.status()) {
            return Ok(Err(Unknown));
        }
        let status = resp.status();
        if !status.is_success() {
            return Err(anyhow!("heartbeat: HTTP {status}"));
        }
        Ok(Ok(resp.json().await.context("heartbeat: response")?))
    }

    async fn desired_state(
        &self,
        after: u64,
        wait_ms: u64,
    ) -> anyhow::Result<Result<GatewayDesiredState, Unknown>> {
        let resp = self
            .http
            .get(self.url(paths::GATEWAY_STATE))
            .bearer_auth(&self.credential)
            .query(&[("after", after), ("wait_ms", wait_ms)])
            .send()
            .await
            .context("desired state")?;
        if is_unknown(resp.status()) {
            return Ok(Err(Unknown));
        }
        let status = resp.status();
        if !status.is_success() {
            return Err(anyhow!("desired state: HTTP {status}"));
        }
        Ok(Ok(resp.json().await.context("desired state: document")?))
    }

    async fn applied(&self, a: &AppliedState) -> anyhow::Result<Result<(), Unknown>> {
        let resp = self
            .http
            .post(self.url(paths::GATEWAY_APPLIED))
            .bearer_auth(&self.credential)
            .json(a)
            .send()
            .await
            .context("applied")?;
        if is_unknown(resp.status()) {
            return Ok(Err(Unknown));
        }
        let status = resp.status();
        if !status.is_success() {
            return Err(anyhow!("applied: HTTP {status}"));
        }
        Ok(Ok(()))
    }
}

fn is_unknown(s: StatusCode) -> bool {
    matches!(
        s,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND
    )
}
