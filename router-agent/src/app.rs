//! What the control plane, the web page and shutdown share.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use vpnnat::messages::{MaintenanceRequestView, SiteId};

use crate::client::ServerClient;
use crate::consent::Consent;
use crate::dataplane::Dataplane;
use crate::names::Names;
use crate::settings::{Mode, Settings};

/// The control-plane connection as the page and the status command show it.
#[derive(Debug, Clone, Default)]
pub struct ControlState {
    /// Whether the last exchange with the server succeeded.
    pub connected: bool,
    /// The last control-plane error.
    pub last_error: Option<String>,
    /// The desired-state version received last.
    pub desired_version: Option<u64>,
    /// The server's note when no gateway had room.
    pub problem: Option<String>,
    /// Errors of the last reconciliation (e.g. a terminal that no longer resolves).
    pub apply_errors: Vec<String>,
    /// The site's requests as last fetched (shown when the server is unreachable).
    pub requests: Vec<MaintenanceRequestView>,
    /// Planned key rotations completed since start.
    pub key_rotations: u64,
    /// Planned credential rotations completed since start.
    pub credential_rotations: u64,
    /// Rotation steps that failed (each is tried again).
    pub rotation_failures: u64,
}

/// Counters of failure reporting.
#[derive(Debug, Clone, Copy, Default)]
pub struct FailureCounters {
    /// Reports the server accepted.
    pub reported: u64,
    /// Reports that could not be delivered (retried).
    pub undelivered: u64,
}

/// Shared by every task of the process.
#[derive(Debug)]
pub struct App {
    /// The configuration.
    pub settings: Settings,
    /// Packet or netstack.
    pub mode: Mode,
    /// The site.
    pub site_id: SiteId,
    /// Its name.
    pub site_name: String,
    /// The server; `None` in standalone mode (`--desired FILE`).
    pub server: Option<ServerClient>,
    /// Name resolution.
    pub names: Arc<Names>,
    /// The data plane.
    pub dataplane: Dataplane,
    /// The agent's own LAN address.
    pub lan_address: Option<Ipv4Addr>,
    /// Control-plane connection state.
    pub control: Mutex<ControlState>,
    /// Failure reporting.
    pub failures: Mutex<FailureCounters>,
    /// The customer's decisions (requests made here, revocations), persisted.
    pub consent: Consent,
    /// Held while a request is being created (page or failure report) until
    /// its id is recorded, and while a document is applied.
    pub consent_gate: tokio::sync::Mutex<()>,
    /// Wakes the task that tells the server about revocations.
    pub revocations: tokio::sync::Notify,
    /// The tunnel's carrier: UDP or the TLS fallback.
    pub carrier: crate::carrier::Carrier,
    /// The LAN's hosts (`None` when `discovery.enabled` is off).
    pub discovery: Option<Arc<crate::discovery::Discovery>>,
    /// The planned rotation of the last desired state, for the task that
    /// carries it out ([`crate::rotation`]).
    pub rotation: tokio::sync::watch::Sender<Option<vpnnat::messages::AgentRotation>>,
}

impl App {
    /// Changes the control state under its lock.
    pub fn update_control(&self, f: impl FnOnce(&mut ControlState)) {
        f(&mut locked(&self.control));
    }

    /// A copy of the control state.
    pub fn control(&self) -> ControlState {
        locked(&self.control).clone()
    }

    /// Changes the failure counters under their lock.
    pub fn update_failures(&self, f: impl FnOnce(&mut FailureCounters)) {
        f(&mut locked(&self.failures));
    }
}

/// The lock's guard; a panic elsewhere while holding it leaves plain data
/// that is still worth showing.
fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
