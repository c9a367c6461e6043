//! What the control plane, the HTTP listener and shutdown share: the data
//! plane's handle, the route manager, and the control-plane connection state.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vpnnat::control::{Lease, LeaseAction};
use vpnnat::gateway::GatewayEvent;
use vpnnat::messages::{
    AppliedState, GatewayDesiredState, GatewayId, Health, Transport, UnixMillis,
};

use crate::dataplane::{self, Snapshot};
use crate::routes::Routes;

/// The control-plane connection as the status page shows it.
#[derive(Debug, Clone, Default)]
pub struct ControlState {
    /// `standalone`, `peers-file` or the server URL.
    pub mode: String,
    /// Whether the last exchange with the server succeeded.
    pub connected: bool,
    /// The id the server gave us.
    pub gateway_id: Option<GatewayId>,
    /// The last control-plane error.
    pub last_error: Option<String>,
}

/// Shared by every task of the process.
#[derive(Debug)]
pub struct App {
    /// The data-plane workers.
    pub dataplane: dataplane::Dataplane,
    /// Routes and proxy-ARP entries.
    pub routes: tokio::sync::Mutex<Routes>,
    /// The gateway's WireGuard key, and its next key during a rotation.
    pub key: crate::key::GatewayKey,
    /// The last error of a step of the key's rotation (logged once).
    pub key_error: Mutex<Option<String>>,
    /// The UDP port of the WireGuard socket.
    pub listen_port: u16,
    /// The tunnel kinds the data plane runs (registered with the server).
    pub tunnel_kinds: Vec<vpnnat::messages::TunnelKind>,
    /// The TUN device.
    pub tun_name: String,
    /// Capacity announced to the server.
    pub max_tunnels: u32,
    /// Control-plane connection state.
    pub control: Mutex<ControlState>,
    /// Errors of the last route reconciliation (non-empty → degraded).
    pub route_errors: Mutex<Vec<String>>,
    /// The lease on announcing NAT addresses that acknowledged heartbeats renew.
    pub lease: Mutex<Lease>,
    /// The TLS fallback's streams (empty without the fallback).
    pub streams: vpnnat_dataplane::stream::StreamTable,
    /// The sites that may open a TLS stream.
    pub tls_tokens: Arc<crate::tls::Tokens>,
    /// The fallback as registered: its endpoints and pin (`None`: off).
    pub tls: Option<vpnnat::messages::GatewayTls>,
}

impl App {
    /// Applies a desired state to the data plane, then the kernel routes.
    /// `None` when the document is older than the running one.
    ///
    /// # Errors
    /// When the data plane has stopped.
    pub async fn apply(
        &self,
        desired: GatewayDesiredState,
    ) -> anyhow::Result<Option<AppliedState>> {
        let tokens: Vec<_> = desired.peers.clone();
        let rotation = desired.key_rotation.clone();
        let result = self.dataplane.apply(desired).await?;
        if result.applied.is_some() {
            self.tls_tokens.set(tokens.iter());
            if let Err(e) = self
                .key
                .follow(rotation.as_ref(), &self.dataplane, Instant::now())
                .await
            {
                tracing::error!(error = %format!("{e:#}"), "rotation of the gateway's key");
            }
        }
        // Net change per address over all workers: one that moves between
        // sites of two workers is removed by one and added by the other.
        let mut delta: BTreeMap<Ipv4Addr, i32> = BTreeMap::new();
        for e in &result.events {
            match e {
                GatewayEvent::AddressAdded { address } => *delta.entry(*address).or_default() += 1,
                GatewayEvent::AddressRemoved { address } => {
                    *delta.entry(*address).or_default() -= 1;
                }
                GatewayEvent::PeerAdded { .. }
                | GatewayEvent::PeerRekeyed { .. }
                | GatewayEvent::PeerRemoved { .. }
                | GatewayEvent::HandshakeCompleted { .. }
                | GatewayEvent::EndpointChanged { .. } => {}
            }
        }
        let mut routes = self.routes.lock().await;
        if self.lease_mut().applied(Instant::now()) == LeaseAction::Restore {
            tracing::info!("running the server's current document: announcing NAT addresses again");
            routes.set_withdrawn(false);
        }
        for (address, d) in delta {
            match d.cmp(&0) {
                std::cmp::Ordering::Greater => routes.want(address),
                std::cmp::Ordering::Less => routes.unwant(address),
                std::cmp::Ordering::Equal => {}
            }
        }
        let route_errors = routes.reconcile().await;
        drop(routes);
        *self.route_errors.lock().unwrap_or_else(|e| e.into_inner()) = route_errors.clone();
        Ok(result.applied.map(|mut a| {
            a.errors.extend(route_errors);
            a
        }))
    }

    /// Starts or ends a rotation of the gateway's key when due (called
    /// periodically).
    pub async fn key_tick(&self) {
        let result = self.key.tick(&self.dataplane, Instant::now()).await;
        let mut last = self.key_error.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(_) => *last = None,
            Err(e) => {
                // Tried every second: logged when it starts failing, or fails otherwise.
                let e = format!("{e:#}");
                if last.as_deref() != Some(e.as_str()) {
                    tracing::error!(error = %e, "rotation of the gateway's key (tried again every second)");
                    *last = Some(e);
                }
            }
        }
    }

    /// Retries routes that failed (called periodically).
    pub async fn retry_routes(&self) {
        let mut routes = self.routes.lock().await;
        let errors = routes.reconcile().await;
        *self.route_errors.lock().unwrap_or_else(|e| e.into_inner()) = errors;
    }

    /// The server acknowledged a heartbeat sent at `sent_at` (see
    /// [`Lease::acknowledged`]); `current`: this gateway runs the newest
    /// document the server has for it.
    pub async fn lease_acknowledged(&self, sent_at: Instant, lease_ms: Option<u64>, current: bool) {
        let length = lease_ms.map(Duration::from_millis);
        let action = self
            .lease_mut()
            .acknowledged(sent_at, length, current, Instant::now());
        if action == LeaseAction::Restore {
            tracing::info!("control plane back: announcing NAT addresses again");
            self.set_withdrawn(false).await;
        }
    }

    /// Withdraws every NAT address once the lease has run out.
    pub async fn lease_tick(&self) {
        if self.lease_mut().tick(Instant::now()) == LeaseAction::Withdraw {
            tracing::warn!(
                "no heartbeat acknowledged within the server's down_after_ms: withdrawing every \
                 NAT address's route and proxy-ARP entry (the server moves the sites elsewhere)"
            );
            self.set_withdrawn(true).await;
        }
    }

    fn lease_mut(&self) -> std::sync::MutexGuard<'_, Lease> {
        self.lease.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn set_withdrawn(&self, withdrawn: bool) {
        let mut routes = self.routes.lock().await;
        routes.set_withdrawn(withdrawn);
        let errors = routes.reconcile().await;
        *self.route_errors.lock().unwrap_or_else(|e| e.into_inner()) = errors;
    }

    /// Healthy unless routes could not be installed.
    pub fn health(&self) -> Health {
        if self
            .route_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            Health::Healthy
        } else {
            Health::Degraded
        }
    }

    /// A copy of the control-plane state.
    pub fn control_state(&self) -> ControlState {
        self.control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Updates the control-plane state.
    pub fn update_control(&self, f: impl FnOnce(&mut ControlState)) {
        f(&mut self.control.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// The data plane's counters and peers.
    ///
    /// # Errors
    /// When the data plane has stopped.
    pub async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        self.dataplane.snapshot().await
    }

    /// The address to show for a peer at `endpoint`: a TLS stream's TCP
    /// peer instead of its virtual endpoint.
    pub fn shown_endpoint(&self, endpoint: Option<SocketAddr>) -> Option<SocketAddr> {
        let e = endpoint?;
        Some(self.streams.remote_of(e).unwrap_or(e))
    }

    /// How a peer at `endpoint` is reached now: a TLS stream's virtual
    /// endpoint, or UDP.
    pub fn transport_of(&self, endpoint: Option<SocketAddr>) -> Option<Transport> {
        Some(match self.streams.lookup(endpoint?) {
            Some(true) => Transport::TlsProxy,
            Some(false) => Transport::Tls,
            None => Transport::Udp,
        })
    }
}

/// Converts a monotonic instant of a snapshot to wall-clock milliseconds.
pub fn unix_millis(at: Instant, snapshot_at: Instant) -> UnixMillis {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let ago = snapshot_at.saturating_duration_since(at);
    UnixMillis(u64::try_from(now.saturating_sub(ago).as_millis()).unwrap_or(u64::MAX))
}
