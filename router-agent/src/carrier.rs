//! The tunnel's carrier: UDP, or the TLS fallback's stream to the gateway
//! (directly or through an HTTP CONNECT proxy), chosen by [`Fallback`].
//!
//! The stream is a virtual endpoint of the data plane
//! ([`vpnnat_dataplane::stream`]) with the gateway's UDP endpoint as its
//! address: while it is open, everything the tunnel sends to the gateway is
//! framed into it, and what it reads enters the tunnel as if it had come
//! over UDP from the gateway. The tunnel itself never notices the switch,
//! so its session (and the technician's connections inside) survives it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use vpnnat::backoff::Backoff;
use vpnnat::messages::{AgentTls, Transport, TunnelKind};
use vpnnat_dataplane::stream::{self, Chunk, StreamOptions, StreamTable};
use vpnnat_dataplane::tls::{self as carrier, Proxy};

use crate::app::App;
use crate::fallback::{Action, Fallback, Observed};
use crate::settings::TunnelSettings;

/// How long dialling (TCP, proxy, TLS, upgrade) may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// A stream that lasted this long resets the redial back-off.
const STABLE: Duration = Duration::from_secs(30);

/// Where the tunnel goes: the gateway's UDP endpoint and its TLS offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The gateway's UDP endpoint (also the stream's virtual endpoint).
    pub endpoint: SocketAddr,
    /// Its TLS fallback.
    pub tls: Option<AgentTls>,
}

/// The carrier as the rest of the agent sees it.
#[derive(Debug)]
pub struct Carrier {
    target: watch::Sender<Option<Target>>,
    shown: Mutex<Option<Transport>>,
    /// The data plane's virtual endpoints.
    pub streams: StreamTable,
    inbox: mpsc::Sender<Chunk>,
}

impl Carrier {
    /// A carrier feeding the data plane's inbox.
    pub fn new(streams: StreamTable, inbox: mpsc::Sender<Chunk>) -> Self {
        Self {
            target: watch::Sender::new(None),
            shown: Mutex::new(None),
            streams,
            inbox,
        }
    }

    /// The tunnel of the desired state just applied.
    pub fn set_target(&self, target: Option<Target>) {
        self.target.send_if_modified(|t| {
            let changed = *t != target;
            *t = target;
            changed
        });
    }

    /// The transport in use (`None` without a tunnel).
    pub fn transport(&self) -> Option<Transport> {
        *self
            .shown
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn show(&self, t: Option<Transport>) {
        *self
            .shown
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = t;
    }
}

/// Decides every second until `shutdown` turns true.
pub async fn run(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let t = &app.settings.tunnel;
    let mut fallback = Fallback::new(
        t.transport,
        Duration::from_secs(t.udp_timeout_s),
        Duration::from_secs(t.udp_probe_interval_s),
    );
    let mut targets = app.carrier.target.subscribe();
    let mut session: Option<tokio::task::JoinHandle<()>> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = targets.changed() => {
                if r.is_err() {
                    return;
                }
                // A new gateway or offer: UDP first again.
                fallback.reset();
                if let Some(s) = session.take() {
                    s.abort();
                }
            }
            _ = shutdown.changed() => {
                if let Some(s) = session.take() {
                    s.abort();
                }
                return;
            }
        }
        let target = targets.borrow().clone();
        let Ok(snap) = app.dataplane.snapshot().await else {
            return;
        };
        let now = Instant::now();
        // An IPsec tunnel sends to the gateway's NAT-T port, never to the
        // endpoint a stream stands for: it has no TLS carrier (yet) and
        // stays on UDP.
        let ipsec = snap
            .tunnel
            .as_ref()
            .is_some_and(|t| t.kind == TunnelKind::Ipsec);
        let seen = Observed {
            tunnel: snap.tunnel.is_some() && target.is_some(),
            tls_offered: target.as_ref().is_some_and(|t| t.tls.is_some()) && !ipsec,
            udp_heard: snap.udp_heard,
            silent: snap.silent_for.is_some(),
        };
        match fallback.tick(now, seen) {
            Action::Stay => {}
            Action::UseTls => {
                if let Some(Target {
                    endpoint,
                    tls: Some(tls),
                }) = target.clone()
                {
                    tracing::warn!(gateway = %endpoint, "no tunnel over UDP: falling back to TLS");
                    if let Some(s) = session.take() {
                        s.abort();
                    }
                    session = Some(tokio::spawn(keep_stream(app.clone(), endpoint, tls)));
                }
            }
            Action::UseUdp => {
                tracing::info!("the tunnel is back on UDP");
                if let Some(s) = session.take() {
                    s.abort();
                }
            }
            Action::ProbeUdp => {
                if app.dataplane.probe_udp().await.is_err() {
                    return;
                }
            }
        }
        let shown = match (&target, snap.tunnel.is_some()) {
            (Some(t), true) => Some(match app.carrier.streams.lookup(t.endpoint) {
                Some(true) => Transport::TlsProxy,
                Some(false) => Transport::Tls,
                None => Transport::Udp,
            }),
            _ => None,
        };
        app.carrier.show(shown);
    }
}

/// The proxy to use for `target`: the setting, else the environment.
fn proxy_for(settings: &TunnelSettings, target: SocketAddr) -> Option<Proxy> {
    if settings.https_proxy.trim().is_empty() {
        match Proxy::from_env(|k| std::env::var(k).ok(), target) {
            Ok(p) => p,
            Err(var) => {
                tracing::error!(
                    variable = var,
                    "the environment's proxy is not http://[user:pass@]host:port: dialling the gateway directly"
                );
                None
            }
        }
    } else {
        // Validated at start.
        Proxy::parse(&settings.https_proxy)
    }
}

/// Keeps a stream to the gateway open, redialling with back-off, until
/// aborted (which closes it and removes its virtual endpoint).
async fn keep_stream(app: Arc<App>, endpoint: SocketAddr, tls: AgentTls) {
    let mut backoff = Backoff::new(
        Duration::from_millis(500),
        Duration::from_secs(30),
        rand::random(),
    );
    loop {
        let proxy = proxy_for(&app.settings.tunnel, tls.endpoint);
        let dialled = tokio::time::timeout(DIAL_TIMEOUT, dial(&tls, proxy.as_ref())).await;
        match dialled {
            Ok(Ok((s, early))) => {
                let opened = Instant::now();
                tracing::info!(gateway = %tls.endpoint, proxy = ?proxy, "TLS stream open");
                let opts = StreamOptions {
                    endpoint,
                    client: true,
                    via_proxy: proxy.is_some(),
                    remote: tls.endpoint,
                    idle_timeout: stream::IDLE_TIMEOUT,
                };
                let r =
                    stream::run(s, &early, opts, &app.carrier.streams, &app.carrier.inbox).await;
                tracing::warn!(gateway = %tls.endpoint, result = ?r, "TLS stream ended");
                if opened.elapsed() >= STABLE {
                    backoff.reset();
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(gateway = %tls.endpoint, error = %e, "TLS stream not opened");
            }
            Err(_) => tracing::warn!(gateway = %tls.endpoint, "TLS stream: dialling timed out"),
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// TCP (through the proxy when there is one), TLS 1.3 with the pinned key,
/// the WebSocket upgrade with the site's token.
async fn dial(
    tls: &AgentTls,
    proxy: Option<&Proxy>,
) -> std::io::Result<(
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Vec<u8>,
)> {
    let invalid = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_owned());
    let pin = carrier::parse_pin(&tls.spki_sha256).ok_or_else(|| invalid("bad pin"))?;
    let config = carrier::client_config(pin).map_err(|e| invalid(&e.to_string()))?;
    let tcp = match proxy {
        Some(p) => p.connect(tls.endpoint).await?,
        None => {
            let s = tokio::net::TcpStream::connect(tls.endpoint).await?;
            s.set_nodelay(true)?;
            s
        }
    };
    let name = rustls::pki_types::ServerName::IpAddress(tls.endpoint.ip().into());
    let mut s = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    let early = carrier::upgrade_client(&mut s, tls.endpoint, &tls.token, proxy.is_some()).await?;
    Ok((s, early))
}
