//! The TLS fallback's listener (docs/DESIGN.md, "Tunnels"): TLS 1.3 on a
//! TCP port (443 by default), where an enrolled site's agent upgrades to a
//! WebSocket with its bearer token and then carries the same tunnel
//! datagrams as over UDP. The stream is a virtual endpoint of the data
//! plane ([`vpnnat_dataplane::stream`]): its datagrams enter the owning
//! worker like UDP datagrams, and what the worker sends to it is framed into
//! the stream's bounded queue.
//!
//! Anything that is not an upgrade with a token of a current peer gets an
//! ordinary HTTPS answer (a small page on `/`, 404 elsewhere): the port
//! never shows a tunnel to a client that is not an enrolled site, and the
//! tunnel's own handshake still authenticates the peer inside.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use vpnnat::gateway::Shard;
use vpnnat::messages::{GatewayPeer, SiteId};
use vpnnat_dataplane::stream::{self, Chunk, StreamOptions, StreamTable};
use vpnnat_dataplane::tls::{self as carrier, Request};

/// How long a client has for the TLS handshake and its request head.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections being set up at once; more wait in the kernel's backlog.
const MAX_PENDING: usize = 256;

/// The certificate, its key and the pin agents verify it by.
pub struct Identity {
    /// The certificate chain (one self-signed certificate, or what the
    /// operator put in the file).
    pub chain: Vec<CertificateDer<'static>>,
    /// Its key.
    pub key: PrivateKeyDer<'static>,
    /// SHA-256 of the certificate's SubjectPublicKeyInfo, hex.
    pub spki_sha256: String,
}

/// Loads the certificate and key, generating a self-signed pair (key file
/// mode 0600) when neither exists.
///
/// # Errors
/// When the files cannot be read, written or parsed, or only one exists.
pub fn load_or_create(cert: &Path, key: &Path) -> anyhow::Result<Identity> {
    match (cert.exists(), key.exists()) {
        (false, false) => {
            let pair = rcgen::KeyPair::generate().context("generating the TLS key")?;
            let params = rcgen::CertificateParams::new(vec!["vpnnat-gateway".to_owned()])
                .context("certificate parameters")?;
            let c = params
                .self_signed(&pair)
                .context("signing the TLS certificate")?;
            if let Some(dir) = key.parent() {
                vpnnat_shell::keys::create_private_dir(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            {
                use std::io::Write as _;
                let mut f = vpnnat_shell::keys::create_private_file(key)
                    .with_context(|| format!("tls.key_file {}", key.display()))?;
                f.write_all(pair.serialize_pem().as_bytes())
                    .with_context(|| format!("tls.key_file {}", key.display()))?;
            }
            std::fs::write(cert, c.pem())
                .with_context(|| format!("tls.certificate_file {}", cert.display()))?;
            tracing::info!(
                certificate = %cert.display(),
                key = %key.display(),
                "generated a self-signed TLS certificate"
            );
        }
        (true, true) => vpnnat_shell::keys::warn_if_readable_by_others(key, "tls.key_file"),
        _ => anyhow::bail!(
            "tls: {} and {} must both exist or both be missing",
            cert.display(),
            key.display()
        ),
    }
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| anyhow::anyhow!("tls.certificate_file {}: {e}", cert.display()))?;
    let first = chain
        .first()
        .with_context(|| format!("tls.certificate_file {}: no certificate", cert.display()))?;
    let spki_sha256 = carrier::spki_sha256(first).with_context(|| {
        format!(
            "tls.certificate_file {}: not an X.509 certificate",
            cert.display()
        )
    })?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("tls.key_file {}: {e}", key.display()))?;
    Ok(Identity {
        chain,
        key,
        spki_sha256,
    })
}

/// The sites that may open a stream: token hash → site, from the desired
/// state the gateway runs.
#[derive(Debug, Default)]
pub struct Tokens {
    by_hash: RwLock<HashMap<String, SiteId>>,
}

impl Tokens {
    /// Replaces the table with the peers' token hashes.
    pub fn set<'a>(&self, peers: impl Iterator<Item = &'a GatewayPeer>) {
        let table = peers
            .filter_map(|p| Some((p.tls_token_sha256.clone()?, p.site_id)))
            .collect();
        if let Ok(mut t) = self.by_hash.write() {
            *t = table;
        }
    }

    /// The site whose token hashes to `sha256_hex`.
    pub fn site(&self, sha256_hex: &str) -> Option<SiteId> {
        self.by_hash.read().ok()?.get(sha256_hex).copied()
    }
}

/// What the listener shares with the rest of the gateway.
#[derive(Clone)]
pub struct Listener {
    /// The TLS configuration.
    pub config: Arc<rustls::ServerConfig>,
    /// The sites that may open a stream.
    pub tokens: Arc<Tokens>,
    /// The streams, as the workers route to them.
    pub streams: StreamTable,
    /// Each worker's inbox (stream datagrams go to the site's owner).
    pub inboxes: Vec<mpsc::Sender<Chunk>>,
}

/// Accepts connections until `shutdown` turns true.
pub async fn serve(listener: TcpListener, shared: Listener, mut shutdown: watch::Receiver<bool>) {
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "TLS accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = pending.clone().acquire_owned().await else {
            return;
        };
        let shared = shared.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = connection(tcp, peer, &shared, permit) => {}
                _ = stop.changed() => {}
            }
        });
    }
}

/// One connection: TLS, the request head, then the stream or an ordinary
/// answer.
async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: &Listener,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    // Tunnel datagrams must not wait for Nagle's algorithm.
    let _ = tcp.set_nodelay(true);
    let acceptor = tokio_rustls::TlsAcceptor::from(shared.config.clone());
    let setup = async {
        let mut tls = acceptor.accept(tcp).await?;
        let (head, early) = carrier::read_head(&mut tls).await?;
        std::io::Result::Ok((tls, head, early))
    };
    let (mut tls, head, early) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, setup).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS connection setup");
            return;
        }
        Err(_) => return,
    };
    let (token_sha256, key, via_proxy) = match carrier::classify(&head) {
        Request::Upgrade {
            token_sha256,
            key,
            via_proxy,
        } => (token_sha256, key, via_proxy),
        other => {
            let head_only = head.first.starts_with("HEAD ");
            let answer = carrier::ordinary_response(other == Request::Page, head_only);
            let _ = tls.write_all(answer.as_bytes()).await;
            let _ = tls.shutdown().await;
            return;
        }
    };
    let Some(site) = shared.tokens.site(&token_sha256) else {
        tracing::debug!(%peer, "TLS upgrade with an unknown token");
        let _ = tls
            .write_all(carrier::ordinary_response(false, false).as_bytes())
            .await;
        let _ = tls.shutdown().await;
        return;
    };
    if tls
        .write_all(carrier::upgrade_response(&key).as_bytes())
        .await
        .is_err()
    {
        return;
    }
    drop(permit);
    let owner = usize::from(Shard::of(shared.inboxes.len() as u16, site));
    let Some(inbox) = shared.inboxes.get(owner) else {
        return;
    };
    tracing::info!(%peer, site = %site, via_proxy, "TLS stream open");
    let opts = StreamOptions {
        endpoint: peer,
        client: false,
        via_proxy,
    };
    match stream::run(tls, &early, opts, &shared.streams, inbox).await {
        Ok(()) => tracing::info!(%peer, site = %site, "TLS stream closed"),
        Err(e) => tracing::info!(%peer, site = %site, error = %e, "TLS stream ended"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vpnnat::messages::{PublicKey, TunnelKind};

    #[test]
    fn a_certificate_is_generated_once_and_its_pin_is_stable() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("d/tls.crt"), dir.path().join("d/tls.key"));
        let first = load_or_create(&cert, &key).unwrap();
        assert!(!vpnnat_shell::keys::readable_by_others(&key));
        let again = load_or_create(&cert, &key).unwrap();
        assert_eq!(first.spki_sha256, again.spki_sha256);
        assert_eq!(first.chain, again.chain);
        carrier::server_config(again.chain, again.key).unwrap();
        std::fs::remove_file(&cert).unwrap();
        assert!(
            load_or_create(&cert, &key).is_err(),
            "a lone key is refused"
        );
    }

    #[test]
    fn tokens_follow_the_peers() {
        let peer = |site: u64, token: Option<&str>| GatewayPeer {
            site_id: SiteId(site),
            public_key: PublicKey([site as u8; 32]),
            nat_addresses: Vec::new(),
            tunnel: TunnelKind::Wireguard,
            ipsec: None,
            tls_token_sha256: token.map(|t| carrier::sha256_hex(t.as_bytes())),
        };
        let tokens = Tokens::default();
        tokens.set([peer(1, Some("a")), peer(2, None)].iter());
        assert_eq!(tokens.site(&carrier::sha256_hex(b"a")), Some(SiteId(1)));
        assert_eq!(tokens.site(&carrier::sha256_hex(b"b")), None);
        tokens.set([peer(2, Some("b"))].iter());
        assert_eq!(tokens.site(&carrier::sha256_hex(b"a")), None, "site 1 left");
        assert_eq!(tokens.site(&carrier::sha256_hex(b"b")), Some(SiteId(2)));
    }
}
