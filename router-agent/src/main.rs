//! `router-agent`: the customer side of vpnnat. Enrolls once, serves the
//! customer's maintenance page on the LAN, dials the gateway the server
//! chose and installs the 1:1 NAT mappings of accepted requests until they
//! end, are revoked or expire.
//!
//! The packet logic is `vpnnat::agent` (sans-IO); this binary is the IO
//! shell: the data-plane worker (`dataplane`, `netstack`), the kernel side
//! of packet mode (`lan`), the control-plane client (`control`, `client`),
//! the page and API (`web`), the `status` command (`status`), names (`names`), the LAN's hosts
//! (`discovery`), health checks and failure
//! reports (`health`, `probe`).

mod app;
mod carrier;
mod client;
mod consent;
mod control;
mod dataplane;
mod discovery;
mod fallback;
mod health;
mod identity;
mod lan;
mod names;
mod netstack;
mod probe;
mod revocations;
mod rotation;
mod settings;
mod status;
mod web;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use clap::{Parser, Subcommand, ValueEnum};
use tokio::sync::watch;
use vpnnat::agent::{AgentConfig, DataMode};
use vpnnat::gateway::Prefix;
use vpnnat::messages::AgentDesiredState;
use vpnnat_shell::cli::{CommonArgs, Signal, Signals, control_runtime, print_status, run_program};

use crate::app::App;
use crate::identity::Identity;
use crate::settings::{Mode, Settings};

/// vpnnat router-agent: the customer's maintenance button, the tunnel to the
/// maintenance center, and the 1:1 NAT that lets a technician reach exactly
/// the computers the customer chose, for as long as the customer allows.
///
/// Without a subcommand it runs the agent (enroll first). The configuration
/// is layered: defaults, the TOML file, then VPNNAT_<SECTION>__<KEY>
/// environment overrides (see `router-agent --print-example-config`).
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Configuration file. Without this option /etc/vpnnat/router-agent.toml
    /// is read when it exists.
    #[arg(short, long, env = "VPNNAT_AGENT_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,

    /// Netstack mode: no root, no TUN device; connections to NAT addresses
    /// are relayed through ordinary sockets (overrides agent.mode).
    #[arg(long, env = "VPNNAT_AGENT_NETSTACK", conflicts_with = "mode")]
    netstack: bool,

    /// The data mode (overrides agent.mode; `--netstack` is `--mode netstack`).
    #[arg(long, env = "VPNNAT_AGENT_MODE", value_enum)]
    mode: Option<CliMode>,

    /// Standalone mode only: the tunnel private key (base64, as `wg genkey`
    /// writes it) instead of an enrolled identity.
    #[arg(
        long,
        env = "VPNNAT_AGENT_PRIVATE_KEY_FILE",
        value_name = "FILE",
        requires = "desired"
    )]
    private_key_file: Option<PathBuf>,

    /// Extra terminal names in /etc/hosts format ("192.168.1.10 pc-1"),
    /// looked up after the [[terminals]] table (overrides lan.hosts_file).
    #[arg(long, env = "VPNNAT_AGENT_HOSTS", value_name = "FILE")]
    hosts: Option<PathBuf>,

    /// Standalone mode: follow this desired state (an AgentDesiredState JSON
    /// document) instead of a maintenance server. Re-read on SIGHUP.
    #[arg(long, env = "VPNNAT_AGENT_DESIRED", value_name = "FILE")]
    desired: Option<PathBuf>,

    #[command(flatten)]
    common: CommonArgs,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CliMode {
    Packet,
    Netstack,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll this agent with the maintenance server (once per site): creates
    /// the tunnel key pair and stores the site identity (mode 0600).
    Enroll {
        /// The maintenance server's URL, e.g. https://center.example:8443.
        #[arg(long, env = "VPNNAT_ENROLL_SERVER", value_name = "URL")]
        server: String,
        /// The one-time enrollment token from the operator.
        #[arg(long, env = "VPNNAT_ENROLL_TOKEN", value_name = "TOKEN")]
        token: String,
        /// Replace an existing identity (re-enrollment with a new token).
        #[arg(long)]
        force: bool,
    },
    /// Show the running agent's tunnel and mappings the way `wg show` does.
    Status {
        /// The agent's page; default: derived from the configuration.
        #[arg(long, env = "VPNNAT_AGENT_URL", value_name = "URL")]
        url: Option<String>,
        /// Print the raw JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Ask the running agent to rotate its tunnel key and/or credential now,
    /// without interrupting the tunnel (both when neither flag is given).
    Rotate {
        /// The agent's page; default: derived from the configuration.
        #[arg(long, env = "VPNNAT_AGENT_URL", value_name = "URL")]
        url: Option<String>,
        /// Rotate the tunnel key.
        #[arg(long)]
        key: bool,
        /// Rotate the credential.
        #[arg(long)]
        credential: bool,
    },
    /// Print the customer page's password.
    Password,
    /// Print the tunnel public key (creating a key-only identity for
    /// standalone mode when none exists).
    Pubkey,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let common = cli.common.clone();
    run_program("router-agent", &common, settings::EXAMPLE, || {
        real_main(cli)
    })
}

#[allow(clippy::print_stdout)]
fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(cli.config.as_deref())?;
    let runtime = control_runtime("agent-control")?;
    match cli.command {
        Some(Command::Enroll {
            server,
            token,
            force,
        }) => runtime.block_on(async {
            check_server_url(&server, settings.server.allow_insecure_http, "--server")?;
            let client = identity::http_client(&settings.server.ca_file, Duration::from_secs(30))?;
            let id = identity::enroll(
                &client,
                &server,
                &token,
                &settings.agent.identity_file,
                force,
            )
            .await?;
            println!(
                "enrolled as site {} ({}); identity stored in {}",
                id.site_id,
                id.site_name,
                settings.agent.identity_file.display()
            );
            println!("tunnel public key: {}", id.key()?.public_key());
            Ok(ExitCode::SUCCESS)
        }),
        Some(Command::Status { url, json }) => runtime.block_on(async {
            let url = match url {
                Some(u) => u,
                None => format!(
                    "http://{}",
                    web_listen(&settings, lan_info(&settings).await.0)
                ),
            };
            let password = page_password(&settings, false)?;
            let s = status::fetch(&url, &password).await?;
            print_status(json, &s, |s| status::render(s, dataplane::wall_now()))
        }),
        Some(Command::Rotate {
            url,
            key,
            credential,
        }) => runtime.block_on(async {
            let url = match url {
                Some(u) => u,
                None => format!(
                    "http://{}",
                    web_listen(&settings, lan_info(&settings).await.0)
                ),
            };
            let password = page_password(&settings, false)?;
            let both = !key && !credential;
            status::rotate(&url, &password, key || both, credential || both).await?;
            println!("rotation asked for; the agent logs each step (key rotation: …, credential rotation: …)");
            Ok(ExitCode::SUCCESS)
        }),
        Some(Command::Password) => {
            println!("{}", page_password(&settings, false)?);
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Pubkey) => {
            let path = &settings.agent.identity_file;
            let id = match Identity::load(path) {
                Ok(id) => id,
                Err(_) if !path.exists() => {
                    let key = vpnnat_shell::keys::generate_private_key();
                    let id = Identity {
                        site_id: vpnnat::messages::SiteId(0),
                        site_name: "standalone".to_owned(),
                        server_url: String::new(),
                        credential: String::new(),
                        private_key: key.to_base64(),
                        next_private_key: None,
                    };
                    id.store(path, false)?;
                    tracing::info!(path = %path.display(), "created a key-only identity for standalone mode");
                    id
                }
                Err(e) => return Err(e),
            };
            println!("{}", id.key()?.public_key());
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let mut settings = settings;
            match (cli.netstack, cli.mode) {
                (true, _) | (false, Some(CliMode::Netstack)) => {
                    settings.agent.mode = Mode::Netstack
                }
                (false, Some(CliMode::Packet)) => settings.agent.mode = Mode::Packet,
                (false, None) => {}
            }
            if let Some(h) = cli.hosts {
                settings.lan.hosts_file = h;
            }
            runtime.block_on(run(settings, cli.desired, cli.private_key_file))
        }
    }
}

/// The agent's LAN address and prefix: configured, or read from the interface.
async fn lan_info(settings: &Settings) -> (Option<Ipv4Addr>, Option<Prefix>) {
    let from_if = if settings.lan.interface.is_empty() {
        None
    } else {
        match lan::interface_address(&settings.lan.interface).await {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "LAN address unknown");
                None
            }
        }
    };
    let addr = settings.lan.address.or(from_if.map(|(a, _)| a));
    (addr, from_if.map(|(_, p)| p))
}

fn web_listen(settings: &Settings, lan_address: Option<Ipv4Addr>) -> SocketAddr {
    settings
        .web
        .listen
        .unwrap_or_else(|| SocketAddr::from((lan_address.unwrap_or(Ipv4Addr::LOCALHOST), 8088)))
}

/// The names the page answers to (its `Host` header): `web.hostnames`, the
/// listen address (every address of this host when it listens on all), the
/// LAN address, localhost and the machine's host name.
fn page_hosts(settings: &Settings, listen: SocketAddr, lan: Option<Ipv4Addr>) -> Vec<String> {
    let mut hosts = settings.web.hostnames.clone();
    hosts.extend([
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ]);
    if listen.ip().is_unspecified() {
        hosts.extend(names::own_addresses().iter().map(ToString::to_string));
    } else {
        hosts.push(listen.ip().to_string());
    }
    hosts.extend(lan.map(|a| a.to_string()));
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() {
            hosts.push(h.to_owned());
        }
    }
    hosts
}

const PASSWORD_FILE: &str = "router-agent.password";

/// The page password: configured, or generated once into the state directory.
fn page_password(settings: &Settings, create: bool) -> anyhow::Result<String> {
    if !settings.web.password.is_empty() {
        return Ok(settings.web.password.clone());
    }
    let path = settings.agent.state_dir.join(PASSWORD_FILE);
    match std::fs::read_to_string(&path) {
        Ok(p) if !p.trim().is_empty() => return Ok(p.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    if !create {
        anyhow::bail!(
            "{}: no page password yet (it is generated at the agent's first start), \
             and web.password is not set",
            path.display()
        );
    }
    // Unambiguous characters, grouped for reading it aloud on the phone.
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
    let mut rng = rand::rngs::OsRng;
    let groups: Vec<String> = (0..4)
        .map(|_| {
            (0..4)
                .map(|_| {
                    let i = rand::Rng::gen_range(&mut rng, 0..ALPHABET.len());
                    char::from(ALPHABET[i])
                })
                .collect()
        })
        .collect();
    let password = groups.join("-");
    vpnnat_shell::keys::replace_private_file(&path, format!("{password}\n").as_bytes())
        .with_context(|| format!("storing the page password in {}", path.display()))?;
    eprintln!(
        "router-agent: the customer page password is {password} (stored in {}; \
         `router-agent password` prints it again)",
        path.display()
    );
    tracing::warn!(path = %path.display(), "generated the customer page password");
    Ok(password)
}

/// Refuses a server URL that would carry the site credential and the
/// customer's requests unencrypted: `http://` only to loopback, unless
/// `server.allow_insecure_http` is set.
fn check_server_url(url: &str, allow_insecure: bool, source: &str) -> anyhow::Result<()> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Ok(());
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.split(':').next().unwrap_or(""),
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback());
    if loopback || allow_insecure {
        return Ok(());
    }
    anyhow::bail!(
        "{source}: {url} is plain http:// to another host (the site credential would travel \
         unencrypted); use https://, or set server.allow_insecure_http = true"
    )
}

fn read_desired(path: &Path) -> anyhow::Result<AgentDesiredState> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --desired {}", path.display()))?;
    let mut de = serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(&mut de)
        .map_err(|e| anyhow!("{}: {}: {}", path.display(), e.path(), e.inner()))
}

async fn run(
    settings: Settings,
    desired_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let id = match &key_file {
        // Standalone with a bare key: no enrollment, no server.
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --private-key-file {}", path.display()))?;
            Identity {
                site_id: vpnnat::messages::SiteId(0),
                site_name: "standalone".to_owned(),
                server_url: String::new(),
                credential: String::new(),
                private_key: text.trim().to_owned(),
                next_private_key: None,
            }
        }
        None => Identity::load(&settings.agent.identity_file)?,
    };
    let key = id.key().with_context(|| {
        format!(
            "{}",
            key_file
                .as_deref()
                .unwrap_or(&settings.agent.identity_file)
                .display()
        )
    })?;
    let initial = desired_file.as_deref().map(read_desired).transpose()?;
    let site_id = initial.as_ref().map_or(id.site_id, |d| d.site_id);
    let server = if desired_file.is_some() {
        None
    } else {
        let url = if settings.server.url.is_empty() {
            id.server_url.clone()
        } else {
            settings.server.url.clone()
        };
        if url.is_empty() {
            anyhow::bail!(
                "{}: no server URL (a key-only identity); enroll, set server.url, or use --desired",
                settings.agent.identity_file.display()
            );
        }
        let source = if settings.server.url.is_empty() {
            format!(
                "{} (the enrolled server)",
                settings.agent.identity_file.display()
            )
        } else {
            "server.url".to_owned()
        };
        check_server_url(&url, settings.server.allow_insecure_http, &source)?;
        let http = identity::http_client(&settings.server.ca_file, Duration::from_secs(30))?;
        Some(client::ServerClient::new(http, &url, id.credential.clone()))
    };

    let consent = consent::Consent::load(Some(settings.agent.state_dir.join(consent::FILE)))?;
    let (lan_address, lan_prefix) = lan_info(&settings).await;
    let discovery = settings.discovery.enabled.then(|| {
        Arc::new(discovery::Discovery::new(
            &settings,
            lan_address,
            lan_prefix,
            Some(settings.agent.state_dir.join(discovery::FILE)),
        ))
    });
    let names = Arc::new(
        names::Names::new(
            &settings,
            lan_address,
            lan_prefix,
            Some(settings.agent.state_dir.join("router-agent.aliases.json")),
        )
        .with_discovery(discovery.clone()),
    );

    let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, settings.tunnel.listen_port))
        .with_context(|| format!("binding tunnel.listen_port {}", settings.tunnel.listen_port))?;
    let mode = settings.agent.mode;
    let masquerade = settings
        .packet
        .masquerade
        .then_some(settings.packet.masquerade_address)
        .flatten();
    let (data_mode, lan_side) = match mode {
        Mode::Packet => (
            DataMode::Packet { masquerade },
            dataplane::LanSide::Tun(lan::create_tun(
                &settings.packet.tun_name,
                settings.packet.tun_mtu,
            )?),
        ),
        Mode::Netstack => (
            DataMode::Netstack,
            dataplane::LanSide::Netstack {
                mtu: usize::from(settings.packet.tun_mtu),
                tcp_buffer: settings.netstack.tcp_buffer,
                udp_idle: Duration::from_secs(settings.netstack.udp_idle_s),
                limits: (
                    settings.netstack.max_udp_flows,
                    settings.netstack.max_icmp_flows,
                ),
            },
        ),
    };
    let state = dataplane::State::with_kinds(
        AgentConfig {
            site_id,
            private_key: key.clone(),
            mode: data_mode,
            seed: rand::random(),
            center_prefixes: settings.packet.center_prefixes.clone(),
        },
        Instant::now(),
    );
    let streams = vpnnat_dataplane::stream::StreamTable::new();
    let (inbox_tx, inbox) = tokio::sync::mpsc::channel(vpnnat_dataplane::stream::INBOX_QUEUE);
    let (dp, thread) = dataplane::spawn(state, socket, lan_side, (streams.clone(), inbox))?;
    // The customer's decisions of earlier runs hold before any document.
    let consent_required = server.is_some() && !settings.agent.install_server_requests;
    dp.require_consent(consent_required).await?;
    for id in consent.created() {
        dp.consent_to(id).await?;
    }
    for id in consent.revoked() {
        dp.revoke(id).await?;
    }

    let mut routes = match mode {
        Mode::Packet => {
            let masq = masquerade.map(|a| (a, settings.lan.interface.as_str()));
            if masq.is_some() && settings.lan.interface.is_empty() {
                anyhow::bail!("lan.interface: must be set for packet.masquerade (proxy ARP)");
            }
            match lan::KernelRoutes::install(
                &settings.packet.tun_name,
                &settings.packet.center_prefixes,
                masq,
                settings.packet.ip_forward,
                Some(&settings.agent.state_dir),
            )
            .await
            {
                Ok(r) => Some(r),
                Err(e) => {
                    dp.shutdown().await;
                    return Err(e);
                }
            }
        }
        Mode::Netstack => None,
    };

    let app = Arc::new(App {
        settings: settings.clone(),
        mode,
        site_id,
        site_name: id.site_name.clone(),
        server,
        names,
        dataplane: dp,
        lan_address,
        control: Mutex::new(app::ControlState::default()),
        failures: Mutex::new(app::FailureCounters::default()),
        consent,
        consent_gate: tokio::sync::Mutex::new(()),
        revocations: tokio::sync::Notify::new(),
        carrier: carrier::Carrier::new(streams, inbox_tx),
        discovery,
        rotation: watch::channel(None).0,
    });
    tracing::info!(
        site.id = %site_id,
        mode = ?mode,
        public_key = %key.public_key(),
        lan_address = ?lan_address,
        control = app.server.as_ref().map_or("standalone", |s| s.base()),
        "router agent started"
    );

    // Planned rotations rewrite the enrolled identity file (not a bare
    // --private-key-file of standalone mode).
    let rotating = key_file
        .is_none()
        .then(|| (id.clone(), settings.agent.identity_file.clone()));
    let result = serve(
        app.clone(),
        &settings,
        lan_prefix,
        (desired_file, initial),
        rotating,
    )
    .await;

    if let Some(r) = routes.as_mut() {
        r.remove_all().await;
    }
    app.dataplane.shutdown().await;
    let joined = tokio::task::spawn_blocking(move || {
        thread
            .join()
            .unwrap_or_else(|_| Err(anyhow!("data plane panicked")))
    })
    .await
    .context("joining the data plane")?;
    result?;
    joined.context("data plane")?;
    tracing::info!("router agent stopped");
    Ok(ExitCode::SUCCESS)
}

/// Runs the page, the control plane and the health checks until SIGTERM/SIGINT.
async fn serve(
    app: Arc<App>,
    settings: &Settings,
    lan_prefix: Option<Prefix>,
    (desired_file, initial): (Option<PathBuf>, Option<AgentDesiredState>),
    rotating: Option<(Identity, PathBuf)>,
) -> anyhow::Result<()> {
    let listen = web_listen(settings, app.lan_address);
    let password = page_password(settings, true)?;
    let allowed = if settings.web.allowed_clients.is_empty() {
        let mut v = vec![Prefix::new(Ipv4Addr::new(127, 0, 0, 0), 8).expect("valid prefix")];
        v.extend(lan_prefix);
        v
    } else {
        settings.web.allowed_clients.clone()
    };
    let denied: Vec<Ipv4Addr> = settings.packet.masquerade_address.into_iter().collect();
    let hosts = page_hosts(settings, listen, app.lan_address);
    tracing::debug!(?hosts, "the page answers to these host names");
    let web = Arc::new(web::Web::new(
        app.clone(),
        &password,
        allowed,
        denied,
        hosts,
    ));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding web.listen {listen}"))?;
    tracing::info!(%listen, "customer page listening");
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let http = {
        let mut rx = shutdown_rx.clone();
        let router = web::router(web);
        tokio::spawn(async move {
            let _ = axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async move {
                let _ = rx.changed().await;
            })
            .await;
        })
    };
    if let Some(d) = initial {
        apply_file(&app, d).await;
    }
    let control = tokio::spawn(control::run(app.clone(), shutdown_rx.clone()));
    let health = tokio::spawn(health::run(app.clone(), shutdown_rx.clone()));
    let revocations = tokio::spawn(revocations::run(app.clone(), shutdown_rx.clone()));
    let carrier = tokio::spawn(carrier::run(app.clone(), shutdown_rx.clone()));
    let discovery = tokio::spawn(discovery::run(app.clone(), shutdown_rx.clone()));
    let rotation = rotating.map(|(id, path)| {
        tokio::spawn(rotation::run(
            app.clone(),
            id,
            path,
            app.rotation.subscribe(),
            shutdown_rx.clone(),
        ))
    });
    let mut signals = Signals::new()?;
    loop {
        tokio::select! {
            // The worker's own error (e.g. the TUN device gone) is returned
            // by `run` after the cleanup.
            () = app.dataplane.stopped() => {
                tracing::error!("the data plane stopped");
                break;
            }
            signal = signals.next() => match signal {
                Signal::Stop => break,
                Signal::Reload => if let Some(path) = &desired_file {
                    match read_desired(path) {
                        Ok(d) => apply_file(&app, d).await,
                        Err(e) => tracing::warn!(error = %format!("{e:#}"), "--desired not reloaded"),
                    }
                }
            },
        }
    }
    tracing::info!("shutting down");
    let _ = shutdown_tx.send(true);
    let _ = http.await;
    let _ = control.await;
    let _ = health.await;
    let _ = revocations.await;
    let _ = carrier.await;
    let _ = discovery.await;
    if let Some(r) = rotation {
        let _ = r.await;
    }
    Ok(())
}

async fn apply_file(app: &App, desired: AgentDesiredState) {
    // A local file: its times are this router's.
    match control::apply(app, desired, dataplane::wall_now()).await {
        Ok(Some(_)) => {}
        Ok(None) => tracing::warn!("--desired is not newer than the running state; ignored"),
        Err(e) => tracing::error!(error = %format!("{e:#}"), "data plane gone"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_page_password_is_generated_once_and_kept_private() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Settings::default();
        s.agent.state_dir = dir.path().join("state");
        assert!(
            page_password(&s, false).is_err(),
            "not generated by readers"
        );
        let p = page_password(&s, true).unwrap();
        assert_eq!(p.len(), 19, "{p}");
        assert_eq!(page_password(&s, true).unwrap(), p, "stable");
        assert_eq!(page_password(&s, false).unwrap(), p);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(s.agent.state_dir.join(PASSWORD_FILE))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        s.web.password = "configured".into();
        assert_eq!(page_password(&s, true).unwrap(), "configured");
    }

    #[test]
    fn security_plain_http_to_another_host_is_refused_unless_allowed() {
        for ok in [
            "https://center.example:8443",
            "http://127.0.0.1:8080",
            "http://localhost:1/x",
            "http://[::1]:80",
        ] {
            check_server_url(ok, false, "server.url").unwrap();
        }
        let e = check_server_url("http://10.0.0.1:8080", false, "server.url").unwrap_err();
        let e = e.to_string();
        assert!(
            e.starts_with("server.url: ") && e.contains("server.allow_insecure_http"),
            "{e}"
        );
        assert!(check_server_url("http://user@127.0.0.1.evil:80", false, "x").is_err());
        check_server_url("http://10.0.0.1:8080", true, "server.url").unwrap();
    }

    #[test]
    fn the_page_listens_on_the_lan_address_by_default() {
        let mut s = Settings::default();
        assert_eq!(web_listen(&s, None).to_string(), "127.0.0.1:8088");
        assert_eq!(
            web_listen(&s, Some(Ipv4Addr::new(192, 168, 1, 1))).to_string(),
            "192.168.1.1:8088"
        );
        s.web.listen = Some("10.0.0.1:9000".parse().unwrap());
        assert_eq!(web_listen(&s, None).to_string(), "10.0.0.1:9000");
    }
}
