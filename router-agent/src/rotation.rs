//! Planned rotation of the tunnel key and the credential, without
//! interrupting the tunnel (docs/OPERATIONS.md, "Rotating keys and
//! credentials"). The server cannot reach the agent: it asks through the
//! desired state ([`AgentRotation`]), and this task acts on it.
//!
//! Key, step by step, each one stored before the next is taken:
//!
//! 1. *Generate*: a new key pair; the private key is stored in the identity
//!    file as `next_private_key` (mode 0600, replaced atomically).
//! 2. *Register*: its public key goes to the server, which publishes it to
//!    the site's gateway as the site's next key (the gateway then accepts
//!    either key).
//! 3. *Switch*, once the document says the gateway applied it
//!    (`next_key_ready`): the identity file is rewritten with the new key
//!    as the key, then the data plane uses it and handshakes at once.
//! 4. *Commit*: the server makes it the site's key and drops the old one.
//!
//! What each step depends on is recomputed from the identity file and the
//! document ([`key_step`]): a restart at any point resumes. Before step 4
//! the gateway accepts both keys, so whichever key the agent holds works;
//! after it the agent holds the new key (stored in step 3).
//!
//! Credential: a new one is asked for with the current one, stored, then
//! used; the server keeps the old one valid until the new one is first used
//! (or a bounded grace), so a crash before the store leaves the old one
//! working and the flag set (the agent asks again).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use vpnnat::messages::{AgentRotation, PublicKey, SiteKey};
use vpnnat::tunnel::PrivateKey;

use crate::app::App;
use crate::identity::Identity;

/// What to do next about the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStep {
    /// Nothing (or wait for the gateway).
    Idle,
    /// Make and store a next key.
    Generate,
    /// Send this next key to the server.
    Register(PublicKey),
    /// Store the next key as the key and use it.
    Switch,
    /// Tell the server that this key (now the key in use) is in use.
    Commit(PublicKey),
}

/// The key step for an agent whose key is `current` and which holds the
/// next key `next`, given what the server says.
pub fn key_step(current: PublicKey, next: Option<PublicKey>, r: &AgentRotation) -> KeyStep {
    if r.next_key == Some(current) {
        // Switched (maybe just before a restart); the server does not know yet.
        return KeyStep::Commit(current);
    }
    match next {
        Some(n) if r.next_key == Some(n) && r.next_key_ready => KeyStep::Switch,
        Some(n) if r.next_key == Some(n) => KeyStep::Idle,
        // Not registered yet, or the server holds another one (an agent
        // that lost its state before): this one replaces it.
        Some(n) => KeyStep::Register(n),
        None if r.rotate_key => KeyStep::Generate,
        None => KeyStep::Idle,
    }
}

/// The identity after [`KeyStep::Generate`] with `key`.
pub fn with_next_key(id: &Identity, key: &PrivateKey) -> Identity {
    Identity {
        next_private_key: Some(key.to_base64()),
        ..id.clone()
    }
}

/// The identity after [`KeyStep::Switch`]: the next key is the key.
pub fn switched(id: &Identity) -> Option<Identity> {
    let next = id.next_private_key.clone()?;
    Some(Identity {
        private_key: next,
        next_private_key: None,
        ..id.clone()
    })
}

/// A credential flag seen again this soon after a rotation succeeded comes
/// from a document sent before the new credential was used (which clears it).
const CREDENTIAL_SETTLE: Duration = Duration::from_secs(60);

/// How long a failed step waits before it is tried again.
const RETRY: Duration = Duration::from_secs(5);

/// Runs until `shutdown` turns true, acting on each rotation the desired
/// state carries (`rotations`).
pub async fn run(
    app: Arc<App>,
    mut identity: Identity,
    path: PathBuf,
    mut rotations: watch::Receiver<Option<AgentRotation>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(server) = app.server.clone() else {
        return;
    };
    let mut credential_rotated: Option<Instant> = None;
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let retry = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = rotations.changed() => if r.is_err() { return },
            () = retry => {}
            _ = shutdown.changed() => return,
        }
        retry_at = None;
        let mut r = rotations.borrow_and_update().clone().unwrap_or_default();
        if let Err(e) = rotate_key(&app, &server, &mut identity, &path, &mut r).await {
            tracing::warn!(error = %format!("{e:#}"), "key rotation step failed; retrying");
            app.update_control(|c| c.rotation_failures += 1);
            retry_at = Some(tokio::time::Instant::now() + RETRY);
        }
        let settled = credential_rotated.is_none_or(|t| t.elapsed() >= CREDENTIAL_SETTLE);
        if r.rotate_credential && settled {
            match rotate_credential(&server, &mut identity, &path).await {
                Ok(()) => {
                    credential_rotated = Some(Instant::now());
                    app.update_control(|c| c.credential_rotations += 1);
                }
                Err(e) => {
                    app.update_control(|c| c.rotation_failures += 1);
                    tracing::warn!(error = %format!("{e:#}"), "credential rotation failed; retrying");
                    retry_at = Some(tokio::time::Instant::now() + RETRY);
                }
            }
        }
    }
}

/// Takes key steps until it has to wait for the server.
async fn rotate_key(
    app: &App,
    server: &crate::client::ServerClient,
    id: &mut Identity,
    path: &std::path::Path,
    r: &mut AgentRotation,
) -> anyhow::Result<()> {
    // Bounded: each step moves the machine on (generate → register →
    // switch → commit), a repeated one would not.
    for _ in 0..6 {
        let current = id.key()?.public_key();
        let next = id.next_key()?;
        match key_step(current, next.as_ref().map(PrivateKey::public_key), r) {
            KeyStep::Idle => return Ok(()),
            KeyStep::Generate => {
                let key = vpnnat_shell::keys::generate_private_key();
                let new = with_next_key(id, &key);
                new.store(path, true)?;
                *id = new;
                tracing::info!(next_key = %key.public_key(), "key rotation: next key made and stored");
            }
            KeyStep::Register(key) => {
                *r = server.next_key(&SiteKey { public_key: key }).await?;
                tracing::info!(next_key = %key, ready = r.next_key_ready, "key rotation: next key registered");
            }
            KeyStep::Switch => {
                let Some(new) = switched(id) else {
                    return Ok(());
                };
                let key = new.key()?;
                // Stored first: from here on the agent only ever uses the
                // new key, which the gateway accepts until the commit and
                // as the site's key after it.
                new.store(path, true)?;
                *id = new;
                let started = Instant::now();
                app.dataplane.set_key(key.clone()).await?;
                tracing::info!(
                    key = %key.public_key(),
                    switch_ms = started.elapsed().as_millis() as u64,
                    "key rotation: switched to the new key; handshaking"
                );
            }
            KeyStep::Commit(key) => {
                server.commit_key(&SiteKey { public_key: key }).await?;
                r.next_key = None;
                r.next_key_ready = false;
                app.update_control(|c| c.key_rotations += 1);
                tracing::info!(key = %key, "key rotation: done, the old key is gone");
            }
        }
    }
    Ok(())
}

/// Asks for a new credential, stores it, then uses it.
async fn rotate_credential(
    server: &crate::client::ServerClient,
    id: &mut Identity,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    let answer = server.new_credential().await?;
    let new = Identity {
        credential: answer.credential.clone(),
        ..id.clone()
    };
    new.store(path, true)?;
    *id = new;
    server.set_credential(answer.credential);
    tracing::info!(
        previous_valid_until = answer.previous_valid_until.0,
        "credential rotation: new credential stored and in use"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vpnnat::messages::SiteId;

    fn key(b: u8) -> PrivateKey {
        PrivateKey::from_bytes([b; 32])
    }

    fn identity() -> Identity {
        Identity {
            site_id: SiteId(7),
            site_name: "Bakery".into(),
            server_url: "http://127.0.0.1:8080".into(),
            credential: "secret-credential".into(),
            private_key: key(1).to_base64(),
            next_private_key: None,
        }
    }

    fn server(next: Option<&PrivateKey>, ready: bool, rotate: bool) -> AgentRotation {
        AgentRotation {
            rotate_key: rotate,
            next_key: next.map(PrivateKey::public_key),
            next_key_ready: ready,
            ..AgentRotation::default()
        }
    }

    fn step(id: &Identity, r: &AgentRotation) -> KeyStep {
        key_step(
            id.key().unwrap().public_key(),
            id.next_key().unwrap().map(|k| k.public_key()),
            r,
        )
    }

    /// The server side of the protocol, as the maintenance server keeps it.
    #[derive(Clone)]
    struct Server {
        current: PublicKey,
        next: Option<PublicKey>,
        gateway_applied: bool,
        flag: bool,
    }

    impl Server {
        fn doc(&self) -> AgentRotation {
            AgentRotation {
                rotate_key: self.flag,
                next_key: self.next,
                next_key_ready: self.next.is_some() && self.gateway_applied,
                ..AgentRotation::default()
            }
        }
        /// The keys the gateway accepts for the site.
        fn accepted(&self) -> Vec<PublicKey> {
            let mut v = vec![self.current];
            v.extend(self.next.filter(|_| self.gateway_applied));
            v
        }
    }

    #[test]
    fn rotation_key_steps_follow_the_protocol() {
        let id = identity();
        assert_eq!(step(&id, &server(None, false, false)), KeyStep::Idle);
        assert_eq!(step(&id, &server(None, false, true)), KeyStep::Generate);
        let with = with_next_key(&id, &key(2));
        let n = key(2).public_key();
        assert_eq!(
            step(&with, &server(None, false, true)),
            KeyStep::Register(n)
        );
        // The server holds another next key: this one replaces it.
        assert_eq!(
            step(&with, &server(Some(&key(3)), true, false)),
            KeyStep::Register(n)
        );
        assert_eq!(
            step(&with, &server(Some(&key(2)), false, false)),
            KeyStep::Idle
        );
        assert_eq!(
            step(&with, &server(Some(&key(2)), true, false)),
            KeyStep::Switch
        );
        let done = switched(&with).unwrap();
        assert_eq!(done.key().unwrap().public_key(), n);
        assert!(done.next_private_key.is_none());
        assert_eq!(
            step(&done, &server(Some(&key(2)), true, false)),
            KeyStep::Commit(n)
        );
        assert_eq!(step(&done, &server(None, false, false)), KeyStep::Idle);
        assert!(switched(&id).is_none());
    }

    /// Runs the protocol against a model of the server and gateway, with the
    /// agent killed after each stored step (it comes back with what its
    /// identity file holds): at every point the agent's key is one the
    /// gateway accepts (once the tunnel matters: after the gateway applied
    /// the next key, or before the switch), and the rotation completes.
    #[test]
    fn rotation_a_crash_at_any_step_leaves_a_key_the_gateway_accepts() {
        for crash_at in 0..8 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("agent.identity");
            identity().store(&path, false).unwrap();
            let mut srv = Server {
                current: key(1).public_key(),
                next: None,
                gateway_applied: false,
                flag: true,
            };
            let mut steps = 0;
            let mut crashed = false;
            for _ in 0..20 {
                // A restart reads the file; a running agent has the same.
                let id = Identity::load(&path).unwrap();
                let mine = id.key().unwrap().public_key();
                assert!(
                    srv.accepted().contains(&mine),
                    "crash at {crash_at}: key not accepted by the gateway"
                );
                let s = step(&id, &srv.doc());
                if steps == crash_at && !crashed {
                    // Killed just before this step: nothing of it happened.
                    crashed = true;
                    continue;
                }
                steps += 1;
                match s {
                    KeyStep::Idle if srv.next.is_some() => srv.gateway_applied = true,
                    KeyStep::Idle => break,
                    KeyStep::Generate => with_next_key(&id, &key(9)).store(&path, true).unwrap(),
                    KeyStep::Register(k) => {
                        if srv.next != Some(k) {
                            srv.next = Some(k);
                            srv.gateway_applied = false;
                        }
                        srv.flag = false;
                    }
                    KeyStep::Switch => switched(&id).unwrap().store(&path, true).unwrap(),
                    KeyStep::Commit(k) => {
                        assert_eq!(srv.next, Some(k));
                        srv.current = k;
                        srv.next = None;
                    }
                }
            }
            let id = Identity::load(&path).unwrap();
            assert_eq!(srv.current, key(9).public_key(), "crash at {crash_at}");
            assert_eq!(id.key().unwrap().public_key(), srv.current);
            assert!(srv.next.is_none() && id.next_private_key.is_none());
        }
    }

    #[test]
    fn rotation_the_next_key_is_stored_0600_and_redacted() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.identity");
        identity().store(&path, false).unwrap();
        with_next_key(&identity(), &key(2))
            .store(&path, true)
            .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = Identity::load(&path).unwrap();
        assert_eq!(
            back.next_key().unwrap().unwrap().public_key(),
            key(2).public_key()
        );
        assert!(!format!("{back:?}").contains(&key(2).to_base64()));
        // A damaged next key is a clear error, not a panic.
        let mut bad = back.clone();
        bad.next_private_key = Some("nope".into());
        bad.store(&path, true).unwrap();
        let e = Identity::load(&path).unwrap_err().to_string();
        assert!(e.contains("next_private_key"), "{e}");
    }
}
