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
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use vpnnat::gateway::Shard;
use vpnnat::messages::{GatewayPeer, SiteId};
use vpnnat_dataplane::stream::{self, Chunk, StreamOptions, StreamTable};
use vpnnat_dataplane::tls::{self as carrier, Request};

/// How long a client has for the TLS handshake and its request head
/// together. An agent needs two round trips; a slow client is cut off
/// before it can hold a setup slot for long.
const SETUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections in setup (before the upgrade) at once. Beyond it new
/// connections are closed at once instead of waiting: an accept loop that
/// waited would let a few thousand idle connections shut the port for
/// everybody.
const MAX_SETUPS: usize = 1024;
/// Connections in setup at once from one source address (IPv6: its /64).
/// Several sites behind one web proxy share an address, so this is not 1.
const MAX_SETUPS_PER_SOURCE: usize = 16;

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
            let params = rcgen::CertificateParams::new(vec!["gateway".to_owned()])
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

/// Why connections were refused or closed before carrying a tunnel.
#[derive(Debug, Default)]
pub struct Refusals {
    /// All setup slots were taken.
    pub busy: AtomicU64,
    /// The source already had [`MAX_SETUPS_PER_SOURCE`] connections in setup.
    pub source_limit: AtomicU64,
    /// The TLS handshake and request head took longer than [`SETUP_TIMEOUT`].
    pub setup_timeout: AtomicU64,
    /// An upgrade with a token of no current peer.
    pub unknown_token: AtomicU64,
    /// Open streams ended because a newer stream of the same site came, or
    /// its token was withdrawn.
    pub replaced: AtomicU64,
}

impl Refusals {
    /// The counters by reason, for the metrics.
    pub fn by_reason(&self) -> [(&'static str, u64); 5] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("busy", get(&self.busy)),
            ("source_limit", get(&self.source_limit)),
            ("setup_timeout", get(&self.setup_timeout)),
            ("unknown_token", get(&self.unknown_token)),
            ("replaced", get(&self.replaced)),
        ]
    }
}

/// A stream open now: its number, the token it came with, and the sender
/// whose drop ends it.
#[derive(Debug)]
struct Open {
    id: u64,
    token_sha256: String,
    _kick: oneshot::Sender<()>,
}

#[derive(Debug, Default)]
struct Table {
    by_hash: HashMap<String, SiteId>,
    /// At most one stream per site: a reconnecting agent's new stream
    /// replaces its old one (which may be half-dead behind a NAT), and a
    /// site cannot pile up streams.
    open: HashMap<SiteId, Open>,
}

/// The sites that may open a stream (token hash → site, from the desired
/// state the gateway runs) and the stream each has open.
#[derive(Debug, Default)]
pub struct Tokens {
    table: Mutex<Table>,
    next_id: AtomicU64,
    /// Refusals, for the metrics.
    pub refusals: Refusals,
}

/// A stream admitted for a site; dropping it forgets the stream.
#[derive(Debug)]
pub struct Admitted<'a> {
    tokens: &'a Tokens,
    /// The site.
    pub site: SiteId,
    id: u64,
    /// Resolves when the stream must end: a newer one of the site came, or
    /// the site's token is no longer valid.
    pub ended: oneshot::Receiver<()>,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        let mut t = self.tokens.lock();
        if t.open.get(&self.site).is_some_and(|o| o.id == self.id) {
            t.open.remove(&self.site);
        }
    }
}

impl Tokens {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the table with the peers' token hashes; streams of sites
    /// that left, or whose token changed (a rotated credential), end.
    pub fn set<'a>(&self, peers: impl Iterator<Item = &'a GatewayPeer>) {
        let by_hash: HashMap<String, SiteId> = peers
            .filter_map(|p| Some((p.tls_token_sha256.clone()?, p.site_id)))
            .collect();
        let mut t = self.lock();
        let before = t.open.len();
        t.open
            .retain(|site, o| by_hash.get(&o.token_sha256) == Some(site));
        let ended = before - t.open.len();
        self.refusals
            .replaced
            .fetch_add(ended as u64, Ordering::Relaxed);
        t.by_hash = by_hash;
    }

    /// The site whose token hashes to `sha256_hex`.
    #[cfg(test)]
    pub fn site(&self, sha256_hex: &str) -> Option<SiteId> {
        self.lock().by_hash.get(sha256_hex).copied()
    }

    /// Admits a stream with the token hashing to `sha256_hex`, ending the
    /// site's older stream; `None` for a token of no current peer.
    pub fn admit(&self, sha256_hex: &str) -> Option<Admitted<'_>> {
        let mut t = self.lock();
        let site = *t.by_hash.get(sha256_hex)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (kick, ended) = oneshot::channel();
        let open = Open {
            id,
            token_sha256: sha256_hex.to_owned(),
            _kick: kick,
        };
        if t.open.insert(site, open).is_some() {
            self.refusals.replaced.fetch_add(1, Ordering::Relaxed);
        }
        Some(Admitted {
            tokens: self,
            site,
            id,
            ended,
        })
    }

    /// Streams open now.
    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.lock().open.len()
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

/// The key a source's setups are counted under: its address, or an IPv6
/// address's /64 (one subscriber's prefix).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
        v4 @ IpAddr::V4(_) => v4,
    }
}

/// Connections in setup by source.
#[derive(Debug, Default)]
struct Sources(Mutex<HashMap<IpAddr, usize>>);

/// One setup slot of a source; given back on drop.
struct SourceSlot {
    sources: Arc<Sources>,
    key: IpAddr,
}

impl Sources {
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let key = source_key(ip);
        let mut m = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let n = m.entry(key).or_default();
        if *n >= MAX_SETUPS_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            sources: self.clone(),
            key,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self
            .sources
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// What a connection holds while it is being set up.
struct Setup {
    _slot: tokio::sync::OwnedSemaphorePermit,
    _source: SourceSlot,
}

/// Accepts connections until `shutdown` turns true.
pub async fn serve(listener: TcpListener, shared: Listener, mut shutdown: watch::Receiver<bool>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SETUPS));
    let sources = Arc::new(Sources::default());
    let refusals = &shared.tokens.refusals;
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
        // Refusing closes the connection at once: the loop never waits.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refusals.busy.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let Some(source) = sources.take(peer.ip()) else {
            refusals.source_limit.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let setup = Setup {
            _slot: slot,
            _source: source,
        };
        let shared = shared.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = connection(tcp, peer, &shared, setup) => {}
                _ = stop.changed() => {}
            }
        });
    }
}

/// One connection: TLS, the request head, then the stream or an ordinary
/// answer.
async fn connection(tcp: tokio::net::TcpStream, peer: SocketAddr, shared: &Listener, setup: Setup) {
    // Tunnel datagrams must not wait for Nagle's algorithm.
    let _ = tcp.set_nodelay(true);
    let refusals = &shared.tokens.refusals;
    let acceptor = tokio_rustls::TlsAcceptor::from(shared.config.clone());
    let handshake = async {
        let mut tls = acceptor.accept(tcp).await?;
        let (head, early) = carrier::read_head(&mut tls).await?;
        std::io::Result::Ok((tls, head, early))
    };
    let (mut tls, head, early) = match tokio::time::timeout(SETUP_TIMEOUT, handshake).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS connection setup");
            return;
        }
        Err(_) => {
            refusals.setup_timeout.fetch_add(1, Ordering::Relaxed);
            return;
        }
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
            let _ = tokio::time::timeout(SETUP_TIMEOUT, async {
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            })
            .await;
            return;
        }
    };
    let Some(mut admitted) = shared.tokens.admit(&token_sha256) else {
        refusals.unknown_token.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%peer, "TLS upgrade with an unknown token");
        let _ = tokio::time::timeout(SETUP_TIMEOUT, async {
            let answer = carrier::ordinary_response(false, false);
            let _ = tls.write_all(answer.as_bytes()).await;
            let _ = tls.shutdown().await;
        })
        .await;
        return;
    };
    let upgraded = tokio::time::timeout(
        SETUP_TIMEOUT,
        tls.write_all(carrier::upgrade_response(&key).as_bytes()),
    )
    .await;
    if !matches!(upgraded, Ok(Ok(()))) {
        return;
    }
    // Set up: the slots go back; the stream is bounded by one per site.
    drop(setup);
    let site = admitted.site;
    let owner = usize::from(Shard::of(shared.inboxes.len() as u16, site));
    let Some(inbox) = shared.inboxes.get(owner) else {
        return;
    };
    let endpoint = shared.streams.allocate_endpoint();
    tracing::info!(%peer, site = %site, via_proxy, %endpoint, "TLS stream open");
    let opts = StreamOptions {
        endpoint,
        client: false,
        via_proxy,
        remote: peer,
        idle_timeout: stream::IDLE_TIMEOUT,
    };
    tokio::select! {
        r = stream::run(tls, &early, opts, &shared.streams, inbox) => match r {
            Ok(()) => tracing::info!(%peer, site = %site, "TLS stream closed"),
            Err(e) => tracing::info!(%peer, site = %site, error = %e, "TLS stream ended"),
        },
        _ = &mut admitted.ended => {
            tracing::info!(%peer, site = %site, "TLS stream replaced by a newer one of the site, or its token was withdrawn");
        }
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

    fn peer(site: u64, token: &str) -> GatewayPeer {
        GatewayPeer {
            site_id: SiteId(site),
            public_key: PublicKey([site as u8; 32]),
            nat_addresses: Vec::new(),
            tunnel: TunnelKind::Wireguard,
            ipsec: None,
            tls_token_sha256: Some(carrier::sha256_hex(token.as_bytes())),
        }
    }

    fn ended(a: &mut Admitted<'_>) -> bool {
        matches!(
            a.ended.try_recv(),
            Err(oneshot::error::TryRecvError::Closed) | Ok(())
        )
    }

    #[test]
    fn a_site_has_one_stream_and_a_newer_one_ends_the_older() {
        let tokens = Tokens::default();
        tokens.set([peer(1, "a"), peer(2, "b")].iter());
        let a = carrier::sha256_hex(b"a");
        assert!(tokens.admit(&carrier::sha256_hex(b"nope")).is_none());
        let mut first = tokens.admit(&a).unwrap();
        let mut other = tokens.admit(&carrier::sha256_hex(b"b")).unwrap();
        assert!(!ended(&mut first));
        let mut second = tokens.admit(&a).unwrap();
        assert!(ended(&mut first), "the older stream of site 1 ends");
        assert!(!ended(&mut second) && !ended(&mut other));
        assert_eq!(tokens.open(), 2);
        // The older one's cleanup leaves the newer registered.
        drop(first);
        assert_eq!(tokens.open(), 2);
        drop(second);
        assert_eq!(tokens.open(), 1);
        assert_eq!(tokens.refusals.replaced.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_withdrawn_or_rotated_token_ends_the_site_stream() {
        let tokens = Tokens::default();
        tokens.set([peer(1, "a"), peer(2, "b"), peer(3, "c")].iter());
        let mut one = tokens.admit(&carrier::sha256_hex(b"a")).unwrap();
        let mut two = tokens.admit(&carrier::sha256_hex(b"b")).unwrap();
        let mut three = tokens.admit(&carrier::sha256_hex(b"c")).unwrap();
        // Site 1's credential was rotated, site 2 left, site 3 is unchanged.
        tokens.set([peer(1, "a2"), peer(3, "c")].iter());
        assert!(ended(&mut one) && ended(&mut two));
        assert!(!ended(&mut three));
        assert_eq!(tokens.open(), 1);
        assert!(tokens.admit(&carrier::sha256_hex(b"a")).is_none());
    }

    #[test]
    fn setups_are_counted_per_address_and_per_ipv6_64() {
        let sources = Arc::new(Sources::default());
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        let held: Vec<_> = (0..MAX_SETUPS_PER_SOURCE)
            .map(|i| sources.take(v6(&format!("2001:db8::{i:x}"))).unwrap())
            .collect();
        assert!(sources.take(v6("2001:db8::ffff")).is_none(), "same /64");
        assert!(sources.take(v6("2001:db8:0:1::1")).is_some(), "another /64");
        assert!(sources.take(v6("192.0.2.1")).is_some());
        drop(held);
        assert!(sources.take(v6("2001:db8::1")).is_some());
        assert_eq!(
            source_key(v6("::ffff:192.0.2.1")),
            v6("192.0.2.1"),
            "a mapped IPv4 address counts as itself"
        );
    }

    /// A listener on 127.0.0.1 with site 1's token "a"; returns its port.
    async fn listen() -> (SocketAddr, Listener, [u8; 32], watch::Sender<bool>) {
        let dir = tempfile::tempdir().unwrap();
        let id = load_or_create(&dir.path().join("c"), &dir.path().join("k")).unwrap();
        let pin = carrier::parse_pin(&id.spki_sha256).unwrap();
        let config = carrier::server_config(id.chain, id.key).unwrap();
        let (inbox, rx) = mpsc::channel(16);
        std::mem::forget(rx);
        let shared = Listener {
            config,
            tokens: Arc::default(),
            streams: StreamTable::new(),
            inboxes: vec![inbox],
        };
        shared.tokens.set([peer(1, "a")].iter());
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(serve(tcp, shared.clone(), stopped));
        (addr, shared, pin, stop)
    }

    /// A TLS client from `source` (a loopback address).
    async fn dial(
        addr: SocketAddr,
        source: &str,
        pin: [u8; 32],
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(format!("{source}:0").parse().unwrap())?;
        let tcp = sock.connect(addr).await?;
        let connector = tokio_rustls::TlsConnector::from(carrier::client_config(pin).unwrap());
        let name = rustls::pki_types::ServerName::try_from("gateway").unwrap();
        connector.connect(name, tcp).await
    }

    #[tokio::test]
    async fn idle_connections_from_one_source_do_not_shut_the_port_for_others() {
        let (addr, shared, pin, _stop) = listen().await;
        // More idle connections than the old wait-for-a-slot loop had slots
        // (256): they send nothing at all.
        let mut idle = Vec::new();
        for _ in 0..300 {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
            idle.push(sock.connect(addr).await.unwrap());
        }
        // Another source completes TLS and a request well within the setup
        // timeout, while the idle ones are still open.
        let served = tokio::time::timeout(SETUP_TIMEOUT - Duration::from_secs(1), async {
            let mut tls = dial(addr, "127.0.0.2", pin).await.unwrap();
            tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            carrier::read_head(&mut tls).await.unwrap().0
        })
        .await
        .expect("another source is served while one source holds idle connections");
        assert_eq!(served.status(), Some(200));
        let refused = shared.tokens.refusals.source_limit.load(Ordering::Relaxed);
        assert!(
            refused >= (300 - MAX_SETUPS_PER_SOURCE) as u64,
            "{refused} refused"
        );
        drop(idle);
    }

    #[tokio::test]
    async fn a_second_stream_of_a_site_closes_the_first() {
        let (addr, shared, pin, _stop) = listen().await;
        let mut first = dial(addr, "127.0.0.1", pin).await.unwrap();
        carrier::upgrade_client(&mut first, addr, "a", false)
            .await
            .unwrap();
        let mut second = dial(addr, "127.0.0.3", pin).await.unwrap();
        carrier::upgrade_client(&mut second, addr, "a", false)
            .await
            .unwrap();
        // The first stream is closed by the gateway.
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(30), async {
            use tokio::io::AsyncReadExt as _;
            first.read(&mut buf).await.unwrap_or(0)
        })
        .await
        .expect("the first stream ends");
        assert_eq!(n, 0);
        assert_eq!(shared.tokens.open(), 1);
        // A rotated token ends the second one too.
        shared.tokens.set([peer(1, "a2")].iter());
        let n = tokio::time::timeout(Duration::from_secs(30), async {
            use tokio::io::AsyncReadExt as _;
            second.read(&mut buf).await.unwrap_or(0)
        })
        .await
        .expect("the second stream ends");
        assert_eq!(n, 0);
        assert_eq!(shared.tokens.open(), 0);
    }
}
