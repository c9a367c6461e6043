//! The site identity (`router-agent enroll`): site id, credential, tunnel
//! private key and the server's URL, in one JSON file of mode 0600.
//!
//! Enrollment generates the WireGuard key pair here; only the public key goes
//! to the server (`POST /api/v1/enroll` with the operator's one-time token).

use std::fmt;
use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use serde::{Deserialize, Serialize};
use vpnnat::messages::{EnrollRequest, EnrollResponse, SiteId, paths};
use vpnnat::tunnel::PrivateKey;
use vpnnat_shell::http::{ApiClient, CallError, HttpOptions, TransportError};
use vpnnat_shell::keys;

/// What the agent stores after enrolling.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// The site this agent speaks for.
    pub site_id: SiteId,
    /// The operator's name for it.
    pub site_name: String,
    /// The maintenance server's base URL.
    pub server_url: String,
    /// The bearer credential.
    pub credential: String,
    /// The tunnel private key (base64).
    pub private_key: String,
    /// The next tunnel private key while a planned key rotation is under
    /// way (base64): stored before its public key is sent to the server,
    /// so that a restart at any step finds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_private_key: Option<String>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("site_id", &self.site_id)
            .field("site_name", &self.site_name)
            .field("server_url", &self.server_url)
            .field("credential", &"<redacted>")
            .field("private_key", &"<redacted>")
            .field(
                "next_private_key",
                &self.next_private_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl Identity {
    /// The tunnel key.
    ///
    /// # Errors
    /// When the stored key is not base64 of 32 bytes.
    pub fn key(&self) -> anyhow::Result<PrivateKey> {
        self.private_key
            .parse()
            .map_err(|_| anyhow!("private_key: not a base64 WireGuard key"))
    }

    /// The next tunnel key of a planned rotation, if one is held.
    ///
    /// # Errors
    /// When the stored key is not base64 of 32 bytes.
    pub fn next_key(&self) -> anyhow::Result<Option<PrivateKey>> {
        self.next_private_key
            .as_deref()
            .map(|k| {
                k.parse()
                    .map_err(|_| anyhow!("next_private_key: not a base64 WireGuard key"))
            })
            .transpose()
    }

    /// Reads the identity file.
    ///
    /// # Errors
    /// When it is missing (with a hint to enroll), unreadable or malformed.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "{}: no site identity; enroll first: router-agent enroll --server URL --token TOKEN",
                path.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let id: Identity = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: not a site identity: {e}", path.display()))?;
        id.key().map_err(|e| anyhow!("{}: {e}", path.display()))?;
        id.next_key()
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        keys::warn_if_readable_by_others(path, "identity file");
        Ok(id)
    }

    /// Writes the identity file with mode 0600. Without `force` an existing
    /// file is never touched; with it the file is replaced atomically.
    ///
    /// # Errors
    /// When the file exists (without `force`) or cannot be written.
    pub fn store(&self, path: &Path, force: bool) -> anyhow::Result<()> {
        let json = serde_json::to_string_pretty(self).context("encoding the identity")?;
        let target = if force {
            path.with_extension("identity.tmp")
        } else {
            path.to_path_buf()
        };
        if force {
            let _ = std::fs::remove_file(&target);
        }
        let mut f = keys::create_private_file(&target).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                anyhow!(
                    "{}: this agent is already enrolled; use --force to replace its identity",
                    path.display()
                )
            } else {
                anyhow!("creating {}: {e}", target.display())
            }
        })?;
        f.write_all(json.as_bytes())
            .and_then(|()| f.write_all(b"\n"))
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", target.display()))?;
        if force {
            std::fs::rename(&target, path)
                .with_context(|| format!("replacing {}", path.display()))?;
        }
        Ok(())
    }
}

/// Builds the HTTP client for the maintenance server (with an extra CA when configured).
///
/// # Errors
/// When the CA file cannot be read or parsed.
pub fn http_client(ca_file: &str, timeout: Duration) -> anyhow::Result<reqwest::Client> {
    vpnnat_shell::http::http_client(&HttpOptions {
        timeout,
        ca_file: (!ca_file.is_empty()).then(|| ca_file.into()),
        user_agent: Some(concat!("vpnnat-router-agent/", env!("CARGO_PKG_VERSION")).to_owned()),
        ..HttpOptions::default()
    })
    .context("server.ca_file")
}

/// Enrolls: generates the key pair, presents the token, stores the identity.
/// Refuses before contacting the server when an identity exists and `force`
/// is not given (a used token cannot be taken back).
///
/// # Errors
/// A sentence for the operator: identity exists, server unreachable, token
/// used or expired, or the file cannot be written.
pub async fn enroll(
    client: &reqwest::Client,
    server: &str,
    token: &str,
    path: &Path,
    force: bool,
) -> anyhow::Result<Identity> {
    if !force && path.exists() {
        bail!(
            "{}: this agent is already enrolled; use --force to replace its identity",
            path.display()
        );
    }
    let server = server.trim_end_matches('/').to_owned();
    if !(server.starts_with("http://") || server.starts_with("https://")) {
        bail!("--server {server}: must start with http:// or https://");
    }
    let token = token.trim();
    if token.is_empty() {
        bail!("--token: the enrollment token is empty");
    }
    let key = keys::generate_private_key();
    let req = EnrollRequest {
        token: token.to_owned(),
        public_key: key.public_key(),
    };
    let answer: EnrollResponse = ApiClient::new(client.clone(), &server, None)
        .post_json("enrollment", paths::ENROLL, &req)
        .await
        .map_err(|e| match e {
            CallError::Api { status, body }
                if matches!(status.as_u16(), 401 | 403 | 404 | 409 | 410) =>
            {
                anyhow!(
                    "enrollment refused: the token was already used, has expired or is not valid \
                 (HTTP {status}: {}); ask the operator for a new one \
                 (maintenance-server site token ID)",
                    body.message
                )
            }
            CallError::Api { status, body } => {
                anyhow!("enrollment failed: HTTP {status}: {}", body.message)
            }
            CallError::Transport(TransportError::Decode { .. }) => {
                anyhow!("enrollment: the server's answer is not an EnrollResponse: {e}")
            }
            CallError::Transport(e) => {
                anyhow!("cannot reach the maintenance server at {server}: {e}")
            }
        })?;
    let id = Identity {
        site_id: answer.site_id,
        site_name: answer.site_name,
        server_url: server,
        credential: answer.credential,
        private_key: key.to_base64(),
        next_private_key: None,
    };
    id.store(path, force)?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn id() -> Identity {
        Identity {
            site_id: SiteId(7),
            site_name: "Bakery".into(),
            server_url: "http://127.0.0.1:8080".into(),
            credential: "secret-credential".into(),
            private_key: PrivateKey::from_bytes([9; 32]).to_base64(),
            next_private_key: None,
        }
    }

    #[test]
    fn store_is_0600_refuses_to_overwrite_and_force_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/agent.identity");
        id().store(&path, false).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let e = id().store(&path, false).unwrap_err().to_string();
        assert!(e.contains("--force"), "{e}");
        let mut other = id();
        other.site_id = SiteId(8);
        other.store(&path, true).unwrap();
        let back = Identity::load(&path).unwrap();
        assert_eq!(back.site_id, SiteId(8));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!format!("{back:?}").contains("secret-credential"));
    }

    #[test]
    fn load_explains_a_missing_or_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = Identity::load(&dir.path().join("none")).unwrap_err();
        assert!(e.to_string().contains("enroll"), "{e}");
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "{\"site_id\": 1}").unwrap();
        assert!(
            Identity::load(&bad)
                .unwrap_err()
                .to_string()
                .contains("not a site identity")
        );
    }
}
