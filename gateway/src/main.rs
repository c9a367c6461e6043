//! `gateway`: terminates many sites' tunnels (WireGuard, or IPsec: IKEv2
//! with ESP in UDP) and routes their pooled NAT addresses to and from the
//! center LAN.
//!
//! The packet logic is `vpnnat::gateway` (sans-IO); this binary is the IO
//! shell: the data-plane workers (`dataplane`), routes and proxy ARP
//! (`routes`, `garp`), the control-plane client (`control`), and the HTTP
//! listener for metrics and status (`http`, `status`).

mod app;
mod control;
mod dataplane;
mod garp;
mod http;
mod key;
mod routes;
mod settings;
mod status;
mod tls;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, anyhow};
use clap::{Parser, Subcommand};
use tokio::sync::watch;
use vpnnat::gateway::{GatewayConfig, GatewayState};
use vpnnat::messages::{GatewayDesiredState, TunnelKind};
use vpnnat::tunnel::{Builtin, BuiltinIpsec, Kinds, PrivateKey};
use vpnnat_dataplane::stream::{self, StreamTable};
use vpnnat_shell::cli::{CommonArgs, Signal, Signals, control_runtime, print_status, run_program};

use crate::app::{App, ControlState};
use crate::settings::Settings;

/// vpnnat gateway: userspace WireGuard for many customer sites, routing their
/// pooled NAT addresses to the center LAN.
///
/// Without a subcommand it runs the gateway. The configuration is layered:
/// defaults, the TOML file, then VPNNAT_<SECTION>__<KEY> environment overrides
/// (see `gateway --print-example-config`).
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Configuration file. Without this option /etc/vpnnat/gateway.toml is
    /// read when it exists.
    #[arg(short, long, env = "VPNNAT_GATEWAY_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,

    /// Standalone mode: apply this desired state (a GatewayDesiredState JSON
    /// document) instead of following a maintenance server. Re-read on SIGHUP.
    #[arg(long, env = "VPNNAT_GATEWAY_PEERS", value_name = "FILE")]
    peers: Option<PathBuf>,

    #[command(flatten)]
    common: CommonArgs,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the running gateway's peers the way `wg show` does.
    Status {
        /// The gateway's HTTP listener; default: `metrics.listen` from the configuration.
        #[arg(long, env = "VPNNAT_GATEWAY_URL", value_name = "URL")]
        url: Option<String>,
        /// Print the raw JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Print the gateway's public key (from `wireguard.private_key_file`).
    Pubkey,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let common = cli.common.clone();
    run_program("gateway", &common, settings::EXAMPLE, || real_main(cli))
}

#[allow(clippy::print_stdout)]
fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = load_settings(cli.config.as_deref())?;
    let runtime = control_runtime("gateway-control")?;
    match cli.command {
        Some(Command::Status { url, json }) => runtime.block_on(async {
            let url = url.unwrap_or_else(|| format!("http://{}", settings.metrics.listen));
            let s = status::fetch(&url).await?;
            print_status(json, &s, |s| status::render(s, SystemTime::now()))
        }),
        Some(Command::Pubkey) => {
            let key = load_or_create_key(&settings.wireguard.private_key_file)?;
            println!("{}", key.public_key());
            Ok(ExitCode::SUCCESS)
        }
        None => runtime.block_on(run(settings, cli.peers)),
    }
}

fn load_settings(path: Option<&Path>) -> anyhow::Result<Settings> {
    let loaded = vpnnat_shell::settings::load::<Settings>(path, settings::DEFAULT_PATH)?;
    loaded
        .settings
        .validate(&loaded.source)
        .map_err(|e| anyhow!("{e}"))?;
    Ok(loaded.settings)
}

/// Reads the private key, or creates it (0600, like `wg genkey > file` under umask 077).
fn load_or_create_key(path: &Path) -> anyhow::Result<PrivateKey> {
    vpnnat_shell::keys::load_or_create_private_key(path).context("wireguard.private_key_file")
}

fn read_peers(path: &Path) -> anyhow::Result<GatewayDesiredState> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --peers {}", path.display()))?;
    let mut de = serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(&mut de)
        .map_err(|e| anyhow!("{}: {}: {}", path.display(), e.path(), e.inner()))
}

async fn run(settings: Settings, peers_file: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let key = load_or_create_key(&settings.wireguard.private_key_file)?;
    let public_key = key.public_key();
    // A rotation of the key that was under way before a restart goes on.
    let next_key =
        vpnnat_shell::keys::read_next_private_key(&settings.wireguard.private_key_file, &key)
            .context("wireguard.private_key_file: the next key")?;
    let credential = if settings.server.url.is_empty() {
        None
    } else {
        let path = &settings.server.credential_file;
        let c = std::fs::read_to_string(path)
            .with_context(|| format!("server.credential_file {}", path.display()))?;
        Some(c.trim().to_owned())
    };
    if peers_file.is_none() && credential.is_none() {
        tracing::warn!("no server.url and no --peers: running with no peers");
    }
    let initial = peers_file.as_deref().map(read_peers).transpose()?;

    let workers = match settings.wireguard.workers {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    }
    .min(64);
    let sockets = vpnnat_dataplane::steering::bind_group(settings.wireguard.listen, workers)
        .context("wireguard.listen")?;
    let listen_port = sockets[0].local_addr().context("UDP socket")?.port();
    let ipsec_sockets = bind_ipsec(&settings, workers)?;
    let queues =
        vpnnat_dataplane::tun::create(&settings.center.tun_name, settings.center.tun_mtu, workers)?;
    let tun_name = settings.center.tun_name.clone();
    let config = GatewayConfig {
        pool: Some(settings.center.pool),
        max_tunnels: settings.wireguard.max_tunnels,
        handshake_limit: settings.wireguard.handshake_limit,
        icmp_source: settings.center.icmp_source,
        technician_prefixes: settings.center.technician_prefixes.clone(),
        flows: settings.flows.limits(),
        ..GatewayConfig::new(key.clone())
    };
    let gateway_key = key::GatewayKey::new(
        settings.wireguard.private_key_file.clone(),
        Duration::from_secs(settings.wireguard.key_rotation_grace_s),
        key,
        next_key.clone(),
    );
    let streams = StreamTable::new();
    let (inboxes, inbox_rx): (Vec<_>, Vec<_>) = (0..workers)
        .map(|_| tokio::sync::mpsc::channel(stream::INBOX_QUEUE))
        .unzip();
    let tls_listener = tls_listener(&settings, &streams, inboxes).await?;
    let io = WorkerIo {
        sockets,
        ipsec: ipsec_sockets,
        queues,
        streams: streams.clone(),
        inboxes: inbox_rx,
    };
    // The kinds follow the sockets: IPsec only with its ports bound, so
    // that the server never places an IPsec site on a gateway that cannot
    // hear it, and such a peer is refused here (an error in the applied
    // state) rather than left silent.
    let (dataplane, threads, tunnel_kinds) = if io.ipsec.is_some() {
        start_workers::<BuiltinIpsec>(config, io)?
    } else {
        start_workers::<Builtin>(config, io)?
    };
    if let Some(next) = &next_key {
        tracing::info!(next = %next.public_key(), "rotation of the gateway's key under way: answering the next key too");
        dataplane.set_next_key(Some(next.clone())).await?;
    }
    let routes =
        routes::Routes::new(&tun_name, &settings.center.interface, settings.center.pool).await?;
    let mode = match (&peers_file, &credential) {
        (Some(p), _) => format!("peers file {}", p.display()),
        (None, Some(_)) => settings.server.url.clone(),
        (None, None) => "standalone".to_owned(),
    };
    let app = Arc::new(App {
        dataplane,
        routes: tokio::sync::Mutex::new(routes),
        key: gateway_key,
        key_error: Mutex::new(None),
        listen_port,
        tunnel_kinds,
        tun_name,
        max_tunnels: settings.wireguard.max_tunnels,
        control: Mutex::new(ControlState {
            connected: peers_file.is_some() || credential.is_none(),
            mode,
            ..ControlState::default()
        }),
        route_errors: Mutex::new(Vec::new()),
        lease: Mutex::new(vpnnat::control::Lease::new()),
        streams,
        tls_tokens: tls_listener
            .as_ref()
            .map_or_else(Default::default, |(_, l, _)| l.tokens.clone()),
        tls: tls_listener.as_ref().and_then(|(_, _, t)| t.clone()),
    });
    tracing::info!(
        public_key = %public_key,
        listen = %settings.wireguard.listen,
        tun = %app.tun_name,
        workers,
        pool = %settings.center.pool,
        center = %settings.center.interface,
        kinds = ?app.tunnel_kinds,
        "gateway started"
    );

    let result = serve(
        app.clone(),
        settings,
        peers_file,
        initial,
        credential,
        &threads,
        tls_listener.map(|(tcp, l, _)| (tcp, l)),
    )
    .await;

    tracing::info!("shutting down: removing routes and proxy-ARP entries");
    app.routes.lock().await.remove_all().await;
    app.dataplane.shutdown().await;
    let joined = tokio::task::spawn_blocking(move || {
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(anyhow!("data plane panicked")))
            })
            .collect::<anyhow::Result<Vec<()>>>()
    })
    .await
    .context("joining the data plane")?;
    // A worker's own error says more than "a worker stopped".
    joined.context("data plane")?;
    result?;
    Ok(ExitCode::SUCCESS)
}

/// Binds the IPsec ports (`[ipsec]`) for `workers` workers: the IKE
/// port's group on the kernel's hash (IKE is routed by the shared
/// responder), the NAT-T port's group steered by the ESP SPI. `None` when
/// IPsec is off.
///
/// # Errors
/// When a port cannot be bound (the error names its key).
fn bind_ipsec(
    settings: &Settings,
    workers: usize,
) -> anyhow::Result<Option<Vec<(std::net::UdpSocket, std::net::UdpSocket)>>> {
    use vpnnat_dataplane::steering::{Steering, bind_group_steered};
    let Some((ike, nat_t)) = settings.ipsec.listen().map_err(|e| anyhow!("{e}"))? else {
        return Ok(None);
    };
    let ike = bind_group_steered(ike, workers, Steering::Hash).context("ipsec.ike_listen")?;
    let nat_t = bind_group_steered(nat_t, workers, Steering::Esp).context("ipsec.nat_t_listen")?;
    tracing::info!(
        ike = %ike[0].local_addr().context("UDP socket")?,
        nat_t = %nat_t[0].local_addr().context("UDP socket")?,
        "IPsec ports bound"
    );
    Ok(Some(ike.into_iter().zip(nat_t).collect()))
}

/// What each worker gets besides its state, one entry per worker.
struct WorkerIo {
    sockets: Vec<std::net::UdpSocket>,
    ipsec: Option<Vec<(std::net::UdpSocket, std::net::UdpSocket)>>,
    queues: Vec<tun_rs::SyncDevice>,
    streams: StreamTable,
    inboxes: Vec<vpnnat_dataplane::stream::Inbox>,
}

/// The data plane's handle, its threads and the tunnel kinds it runs.
type Started = (
    dataplane::Dataplane,
    Vec<std::thread::JoinHandle<anyhow::Result<()>>>,
    Vec<TunnelKind>,
);

/// Starts the data-plane workers running the tunnel kinds `K`; returns
/// their handle, threads and the kinds (to register).
fn start_workers<K: Kinds>(config: GatewayConfig, io: WorkerIo) -> anyhow::Result<Started> {
    let workers = io.sockets.len();
    // One handshake admission (cookie secret, load, per-source buckets) for
    // all workers: a cookie one worker gave must be valid at the owner.
    let states = GatewayState::<K>::shards(config, workers as u16, Instant::now());
    let mut ipsec = io.ipsec.map(Vec::into_iter);
    let setups = states
        .into_iter()
        .zip(io.sockets)
        .zip(io.queues)
        .zip(io.inboxes)
        .map(|(((state, socket), tun), inbox)| dataplane::WorkerSetup {
            state,
            socket,
            ipsec: ipsec.as_mut().and_then(Iterator::next),
            tun,
            streams: (io.streams.clone(), inbox),
        })
        .collect();
    let (dataplane, threads) = dataplane::spawn(setups)?;
    Ok((dataplane, threads, K::KINDS.to_vec()))
}

/// Runs the HTTP listener and the control plane until SIGTERM/SIGINT.
async fn serve(
    app: Arc<App>,
    settings: Settings,
    peers_file: Option<PathBuf>,
    initial: Option<GatewayDesiredState>,
    credential: Option<String>,
    workers: &[std::thread::JoinHandle<anyhow::Result<()>>],
    tls: Option<(tokio::net::TcpListener, tls::Listener)>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(settings.metrics.listen)
        .await
        .with_context(|| format!("binding metrics.listen {}", settings.metrics.listen))?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let http = {
        let mut rx = shutdown_rx.clone();
        let router = http::router(app.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = rx.changed().await;
                })
                .await;
        })
    };
    let tls = tls.map(|(tcp, shared)| tokio::spawn(tls::serve(tcp, shared, shutdown_rx.clone())));
    if let Some(desired) = initial {
        apply_logged(&app, desired).await;
    }
    let control = credential.map(|credential| {
        tokio::spawn(control::run(
            app.clone(),
            settings.clone(),
            credential,
            shutdown_rx.clone(),
        ))
    });
    let retry = {
        let app = app.clone();
        let mut rx = shutdown_rx.clone();
        tokio::spawn(async move {
            let mut retry = tokio::time::interval(Duration::from_secs(5));
            // Fine-grained: the lease runs out at the same moment the server
            // may move the sites; the server's failover tick comes later.
            let mut lease = tokio::time::interval(Duration::from_millis(100));
            let mut key = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = retry.tick() => app.retry_routes().await,
                    _ = key.tick() => app.key_tick().await,
                    _ = lease.tick() => app.lease_tick().await,
                    _ = rx.changed() => return,
                }
            }
        })
    };
    let mut signals = Signals::new()?;
    let mut watchdog = tokio::time::interval(Duration::from_secs(1));
    let mut failed = None;
    loop {
        tokio::select! {
            signal = signals.next() => match signal {
                Signal::Stop => break,
                Signal::Reload => if let Some(path) = &peers_file {
                    match read_peers(path) {
                        Ok(d) => apply_logged(&app, d).await,
                        Err(e) => tracing::warn!(error = %format!("{e:#}"), "--peers not reloaded"),
                    }
                }
            },
            _ = watchdog.tick() => {
                if workers.iter().any(std::thread::JoinHandle::is_finished) {
                    failed = Some(anyhow!("a data-plane worker stopped"));
                    break;
                }
            }
        }
    }
    let _ = shutdown_tx.send(true);
    let _ = http.await;
    let _ = retry.await;
    if let Some(t) = tls {
        let _ = t.await;
    }
    if let Some(c) = control {
        let _ = c.await;
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The TLS fallback's listener, bound, with what it shares and what the
/// registration announces (`None` when `tls.listen` is empty). A port that
/// cannot be bound leaves the gateway running without the fallback.
///
/// # Errors
/// When the certificate or key cannot be loaded or generated.
async fn tls_listener(
    settings: &Settings,
    streams: &StreamTable,
    inboxes: Vec<tokio::sync::mpsc::Sender<stream::Chunk>>,
) -> anyhow::Result<
    Option<(
        tokio::net::TcpListener,
        tls::Listener,
        Option<vpnnat::messages::GatewayTls>,
    )>,
> {
    let Some(addr) = settings.tls.listen().map_err(|e| anyhow!(e))? else {
        return Ok(None);
    };
    let (cert, key) = settings.tls.files(&settings.wireguard.private_key_file);
    let identity = tls::load_or_create(&cert, &key)?;
    let config = vpnnat_dataplane::tls::server_config(identity.chain, identity.key)
        .context("tls: the certificate and key do not fit together")?;
    let tcp = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %addr, error = %e, "tls.listen cannot be bound: running without the TLS fallback");
            return Ok(None);
        }
    };
    tracing::info!(listen = %addr, pin = %identity.spki_sha256, "TLS fallback listening");
    let announced = (!settings.tls.endpoints.is_empty()).then(|| vpnnat::messages::GatewayTls {
        endpoints: settings.tls.endpoints.clone(),
        spki_sha256: identity.spki_sha256.clone(),
    });
    let shared = tls::Listener {
        config,
        tokens: Arc::default(),
        streams: streams.clone(),
        inboxes,
    };
    Ok(Some((tcp, shared, announced)))
}

async fn apply_logged(app: &App, desired: GatewayDesiredState) {
    match app.apply(desired).await {
        Ok(Some(a)) if a.errors.is_empty() => {
            tracing::info!(version = a.version, "peers file applied");
        }
        Ok(Some(a)) => {
            for e in &a.errors {
                tracing::warn!(version = a.version, error = %e, "peers file applied in part");
            }
        }
        Ok(None) => tracing::warn!("peers file is older than the running state; ignored"),
        Err(e) => tracing::error!(error = %format!("{e:#}"), "data plane gone"),
    }
}
