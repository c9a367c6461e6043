//! The gateway's WireGuard key and its rotation without interruption.
//!
//! The server asks for a rotation in the desired state
//! ([`GatewayKeyRotation::requested`]). The gateway then writes a next key
//! beside its key file (`<key>.next`, 0600), has every worker answer it
//! beside the current key, and announces it in its heartbeats and
//! registrations. The server records it, tells the gateway's sites' agents
//! to dial it and says so in the next document
//! ([`GatewayKeyRotation::published`]). From then on the gateway promotes the
//! next key, making it its only one, as soon as every WireGuard peer has
//! handshaken with it, or after `wireguard.key_rotation_grace_s` (a site
//! still on the old key, e.g. a router without an agent, then loses its
//! session and dials again). Before the server published the key no agent
//! dials it, so "every peer moved" is not checked earlier.
//!
//! Every step survives a restart: the next key is a file, read at start and
//! announced again; the promotion replaces the key file atomically before
//! the workers drop the old key, so a crash between the two starts the
//! gateway with the new key alone, which its agents were already told.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::Mutex;
use vpnnat::messages::{GatewayKeyRotation, PublicKey};
use vpnnat::tunnel::PrivateKey;
use vpnnat_shell::keys;

use crate::dataplane::Dataplane;

/// The gateway's key, and its next key during a rotation.
#[derive(Debug)]
pub struct GatewayKey {
    file: PathBuf,
    grace: Duration,
    state: Mutex<KeyState>,
}

#[derive(Debug)]
struct KeyState {
    current: PrivateKey,
    next: Option<PrivateKey>,
    /// The server asks for a rotation (the last document's flag).
    requested: bool,
    /// Since when the server publishes our next key to the agents.
    published_since: Option<Instant>,
    /// A rotation started, ended or was given up since the start.
    rotated: bool,
}

/// The public keys a registration and a heartbeat announce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKeys {
    /// The key every agent may dial.
    pub current: PublicKey,
    /// During a rotation, the key agents move to.
    pub next: Option<PublicKey>,
    /// Whether heartbeats name the keys: during a rotation and once one
    /// ran. Otherwise they leave them out, so that a server older than the
    /// rotation (which refuses unknown fields) still takes them.
    pub in_heartbeats: bool,
}

impl GatewayKey {
    /// The key in `file` (already read), and the next key when a rotation
    /// was under way before a restart (also already loaded into the
    /// workers).
    pub fn new(
        file: PathBuf,
        grace: Duration,
        current: PrivateKey,
        next: Option<PrivateKey>,
    ) -> Self {
        Self {
            file,
            grace,
            state: Mutex::new(KeyState {
                current,
                next,
                requested: false,
                published_since: None,
                rotated: false,
            }),
        }
    }

    /// The current and the next public key.
    pub async fn public_keys(&self) -> PublicKeys {
        let s = self.state.lock().await;
        PublicKeys {
            current: s.current.public_key(),
            next: s.next.as_ref().map(PrivateKey::public_key),
            in_heartbeats: s.rotated || s.next.is_some(),
        }
    }

    /// Takes the rotation part of a desired state the data plane applied:
    /// starts a rotation the server asks for, notes when the server
    /// publishes the next key, and promotes it when that is due.
    ///
    /// # Errors
    /// When the next key file cannot be written or the data plane stopped
    /// (a failed start is tried again by [`Self::tick`]).
    pub async fn follow(
        &self,
        rotation: Option<&GatewayKeyRotation>,
        dataplane: &Dataplane,
        now: Instant,
    ) -> anyhow::Result<()> {
        {
            let mut s = self.state.lock().await;
            s.requested = rotation.is_some_and(|r| r.requested);
            let published = rotation.and_then(|r| r.published);
            let next = s.next.as_ref().map(PrivateKey::public_key);
            if next.is_some() && published == next {
                s.published_since.get_or_insert(now);
            } else {
                s.published_since = None;
            }
        }
        self.tick(dataplane, now).await.map(|_| ())
    }

    /// Starts an asked-for rotation that has not started yet, and promotes
    /// the next key when every WireGuard peer moved to it or the grace time
    /// since the server published it passed. `true` when it promoted.
    ///
    /// # Errors
    /// When a key file cannot be written or the data plane stopped.
    pub async fn tick(&self, dataplane: &Dataplane, now: Instant) -> anyhow::Result<bool> {
        let mut s = self.state.lock().await;
        if s.requested && s.next.is_none() {
            let next = keys::create_next_private_key(&self.file, &s.current)
                .context("wireguard.private_key_file: the next key")?;
            dataplane.set_next_key(Some(next.clone())).await?;
            tracing::info!(
                next = %next.public_key(),
                "rotation of the gateway's key: answering the next key beside the current one"
            );
            s.next = Some(next);
            s.rotated = true;
            return Ok(false);
        }
        let (Some(next), Some(since)) = (s.next.as_ref(), s.published_since) else {
            return Ok(false);
        };
        let (moved, peers) = dataplane.snapshot().await?.on_next_key;
        let waited = now.saturating_duration_since(since);
        if moved < peers && waited < self.grace {
            return Ok(false);
        }
        let next_public = next.public_key();
        // The file first: from here a restart runs the new key alone.
        let Some(promoted) = keys::promote_next_private_key(&self.file, &s.current)
            .context("wireguard.private_key_file: promoting the next key")?
        else {
            // Someone removed the next key file: the key stays as it is, and
            // the heartbeat, naming no next key, tells the server, which
            // sends the agents back to the current key.
            tracing::warn!(
                path = %keys::next_key_path(&self.file).display(),
                "the next key file is gone: rotation of the gateway's key abandoned"
            );
            dataplane.set_next_key(None).await?;
            s.next = None;
            s.rotated = true;
            s.published_since = None;
            s.requested = false;
            return Ok(false);
        };
        dataplane.promote_next_key().await?;
        tracing::info!(
            public_key = %next_public,
            sites_moved = moved,
            sites = peers,
            waited_ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
            "rotation of the gateway's key done: the next key is the only one"
        );
        s.current = promoted;
        s.next = None;
        s.rotated = true;
        s.requested = false;
        s.published_since = None;
        Ok(true)
    }
}
