//! What the customer decided on this router, kept in the state directory
//! (mode 0600) so that a restart (or a `kill -9`) forgets none of it:
//!
//! - the requests made on this page (only their mappings are installed,
//!   unless `agent.install_server_requests` says otherwise);
//! - the requests whose access the customer ended ("end access now"): never
//!   installed again, and the server is told until it confirms;
//! - whether a failure report may open access (a toggle on the page).
//!
//! Every change is written (temporary file, then rename) before it is acted
//! on, so that what the page answered is what a restart finds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use vpnnat::messages::RequestId;

/// The file in `agent.state_dir`.
pub const FILE: &str = "router-agent.consent.json";
/// Request ids kept per list at most; the oldest (smallest) go first.
const MAX_IDS: usize = 4096;

/// Whether the server has been told about a revocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Told {
    /// Not yet: retried until the server confirms.
    Pending,
    /// The server confirmed (or the request was closed there already).
    Confirmed,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Stored {
    created: BTreeSet<RequestId>,
    revoked: BTreeMap<RequestId, Told>,
    failure_requests: bool,
}

/// The customer's decisions. Cheap to share behind the `App`.
#[derive(Debug)]
pub struct Consent {
    path: Option<PathBuf>,
    stored: Mutex<Stored>,
}

impl Consent {
    /// Reads `path` (a missing file is an empty record). `None`: kept in
    /// memory only (standalone tests).
    ///
    /// # Errors
    /// When the file exists but cannot be read or parsed (naming it).
    pub fn load(path: Option<PathBuf>) -> anyhow::Result<Self> {
        let stored = match &path {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(text) => serde_json::from_str(&text)
                    .with_context(|| format!("{}: not a consent record", p.display()))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Stored::default(),
                Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
            },
            None => Stored::default(),
        };
        Ok(Self {
            path,
            stored: Mutex::new(stored),
        })
    }

    fn change<R>(&self, f: impl FnOnce(&mut Stored) -> R) -> anyhow::Result<R> {
        let mut s = self
            .stored
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let r = f(&mut s);
        trim(&mut s.created);
        while s.revoked.len() > MAX_IDS {
            // Forget the oldest confirmed one; pending ones are kept.
            let Some(id) = s
                .revoked
                .iter()
                .find(|(_, t)| **t == Told::Confirmed)
                .map(|(id, _)| *id)
            else {
                break;
            };
            s.revoked.remove(&id);
        }
        if let Some(p) = &self.path {
            vpnnat_shell::keys::replace_private_file(
                p,
                serde_json::to_string_pretty(&*s)?.as_bytes(),
            )
            .with_context(|| format!("storing {}", p.display()))?;
        }
        Ok(r)
    }

    fn read<R>(&self, f: impl FnOnce(&Stored) -> R) -> R {
        f(&self
            .stored
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Records a request made on this page.
    ///
    /// # Errors
    /// When the record cannot be written.
    pub fn record_created(&self, id: RequestId) -> anyhow::Result<()> {
        self.change(|s| {
            s.created.insert(id);
        })
    }

    /// The requests made on this page.
    pub fn created(&self) -> Vec<RequestId> {
        self.read(|s| s.created.iter().copied().collect())
    }

    /// Records "end access now" for `id` (pending until the server confirms).
    ///
    /// # Errors
    /// When the record cannot be written.
    pub fn record_revoked(&self, id: RequestId) -> anyhow::Result<()> {
        self.change(|s| {
            s.revoked.entry(id).or_insert(Told::Pending);
        })
    }

    /// The server confirmed the revocation of `id`.
    ///
    /// # Errors
    /// When the record cannot be written.
    pub fn confirm_revoked(&self, id: RequestId) -> anyhow::Result<()> {
        self.change(|s| {
            s.revoked.insert(id, Told::Confirmed);
        })
    }

    /// Every revoked request (never installed again).
    pub fn revoked(&self) -> Vec<RequestId> {
        self.read(|s| s.revoked.keys().copied().collect())
    }

    /// Revocations the server has not confirmed yet.
    pub fn pending_revocations(&self) -> Vec<RequestId> {
        self.read(|s| {
            s.revoked
                .iter()
                .filter(|(_, t)| **t == Told::Pending)
                .map(|(id, _)| *id)
                .collect()
        })
    }

    /// Whether a failure report may open access (the page's toggle; off
    /// until the customer turns it on).
    pub fn failure_requests(&self) -> bool {
        self.read(|s| s.failure_requests)
    }

    /// Sets the page's toggle.
    ///
    /// # Errors
    /// When the record cannot be written.
    pub fn set_failure_requests(&self, on: bool) -> anyhow::Result<()> {
        self.change(|s| s.failure_requests = on)
    }
}

fn trim(ids: &mut BTreeSet<RequestId>) {
    while ids.len() > MAX_IDS {
        ids.pop_first();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn security_decisions_survive_a_restart_in_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join(FILE);
        let c = Consent::load(Some(path.clone())).unwrap();
        assert!(!c.failure_requests(), "off by default");
        c.record_created(RequestId(5)).unwrap();
        c.record_revoked(RequestId(5)).unwrap();
        c.record_revoked(RequestId(6)).unwrap();
        c.confirm_revoked(RequestId(6)).unwrap();
        c.set_failure_requests(true).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let again = Consent::load(Some(path.clone())).unwrap();
        assert_eq!(again.created(), vec![RequestId(5)]);
        assert_eq!(again.revoked(), vec![RequestId(5), RequestId(6)]);
        assert_eq!(again.pending_revocations(), vec![RequestId(5)]);
        assert!(again.failure_requests());
        std::fs::write(&path, "nonsense").unwrap();
        let e = Consent::load(Some(path.clone())).unwrap_err();
        assert!(format!("{e:#}").contains(FILE), "{e:#}");
    }

    #[test]
    fn the_record_is_bounded_and_keeps_pending_revocations() {
        let c = Consent::load(None).unwrap();
        for i in 0..(MAX_IDS as u64 + 10) {
            c.record_created(RequestId(i)).unwrap();
            c.record_revoked(RequestId(i)).unwrap();
            if i >= 5 {
                c.confirm_revoked(RequestId(i)).unwrap();
            }
        }
        assert_eq!(c.created().len(), MAX_IDS);
        assert_eq!(c.created()[0], RequestId(10));
        assert_eq!(c.revoked().len(), MAX_IDS);
        assert_eq!(c.pending_revocations().len(), 5);
    }
}
