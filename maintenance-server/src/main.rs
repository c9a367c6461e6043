//! `maintenance-server`: the vpnnat control plane (see ../README.md).
//!
//! `serve` (the default) runs the API and the technician console; the other
//! subcommands work directly on the database, no running server needed.

use std::io::{BufRead as _, IsTerminal as _};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use maintenance_server::db::{now_ms, ops, views};
use maintenance_server::settings::Settings;
use vpnnat::messages::{GatewayId, SiteId, TunnelKind};

/// vpnnat maintenance-server: enrollment, maintenance requests, the
/// NAT-address pool, gateway selection and failover, technician console.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (default /etc/vpnnat/maintenance-server.toml, used when present).
    #[arg(long, global = true, env = "VPNNAT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API and the console (the default).
    Serve,
    /// Customer sites.
    #[command(subcommand)]
    Site(SiteCmd),
    /// Gateways.
    #[command(subcommand)]
    Gateway(GatewayCmd),
    /// Technicians (console users).
    #[command(subcommand)]
    Technician(TechnicianCmd),
    /// Teams of technicians: who sees which sites (docs/OPERATIONS.md "Teams").
    #[command(subcommand)]
    Team(TeamCmd),
    /// Print the operator token (generating it on first use).
    OperatorToken,
    /// Write a consistent copy of the SQLite database to PATH while the
    /// server keeps running (mode 0600; PATH must not exist). Bring it back
    /// with `restore PATH`.
    Backup {
        /// Where to write the copy (must not exist).
        path: PathBuf,
    },
    /// Restore the SQLite database from a copy made by `backup` (the server
    /// must be stopped), or, without PATH, finish a PostgreSQL `pg_restore`.
    /// Either way every desired-state version is advanced past any version
    /// gateways and agents have seen, so they take the restored state
    /// instead of ignoring it as older.
    Restore {
        /// The copy to restore (SQLite); none after a `pg_restore`.
        path: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum SiteCmd {
    /// Create a site; prints its id and one-time enrollment token.
    Add {
        /// The site's name.
        name: String,
        /// Its tunnel kind: wireguard or ipsec (an IPsec site gets a
        /// pre-shared key and identities; see `site ipsec-config`).
        #[arg(long, default_value = "wireguard")]
        tunnel: TunnelKind,
        /// A site without a router agent: its router is a standard
        /// WireGuard device configured from `site wireguard-config ID`
        /// (no enrollment token; technicians open its requests).
        #[arg(long)]
        agentless: bool,
        /// With --agentless: the router's own WireGuard public key
        /// (default: the server generates the router's key pair).
        #[arg(long, requires = "agentless")]
        public_key: Option<vpnnat::messages::PublicKey>,
    },
    /// List sites.
    List,
    /// A new enrollment token for a site (re-enrollment rotates its credential).
    Token {
        /// The site id.
        id: u64,
    },
    /// Revoke a site's credential now and print a new enrollment token (the
    /// agent is refused until it enrolls again with it).
    Rotate {
        /// The site id.
        id: u64,
    },
    /// Ask the site's agent to rotate its WireGuard key without
    /// interruption (planned; `rotate` is the compromised-key path).
    RotateKey {
        /// The site id.
        id: u64,
    },
    /// Ask the site's agent to rotate its credential without interruption.
    RotateCredential {
        /// The site id.
        id: u64,
    },
    /// Disable a site: its agent is refused, its open requests are revoked.
    Disable {
        /// The site id.
        id: u64,
    },
    /// Enable a disabled site again.
    Enable {
        /// The site id.
        id: u64,
    },
    /// Delete a site, its requests (open ones revoked first), failure
    /// reports and enrollment tokens (the audit log keeps its history).
    Delete {
        /// The site id.
        id: u64,
    },
    /// Set a site's tunnel kind (refused while it has a tunnel); an IPsec
    /// site gets a new pre-shared key.
    Tunnel {
        /// The site id.
        id: u64,
        /// wireguard or ipsec.
        kind: TunnelKind,
    },
    /// Print an IPsec site's parameters (pre-shared key, identities,
    /// proposals, traffic selectors, gateway addresses) and a strongSwan
    /// swanctl.conf for a router configured by hand.
    IpsecConfig {
        /// The site id.
        id: u64,
    },
    /// Print the router configuration of a site without an agent: one
    /// wg-quick file per gateway and the nftables rules; `--dir DIR`
    /// writes them there as files instead.
    WireguardConfig {
        /// The site id.
        id: u64,
        /// Write the files into this directory.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum GatewayCmd {
    /// Create a gateway identity; prints its credential once.
    Add {
        /// The gateway's name.
        name: String,
    },
    /// List gateways.
    List,
    /// Drain a gateway (it keeps its sites, takes no new ones).
    Drain {
        /// The gateway id.
        id: u64,
        /// End draining.
        #[arg(long)]
        off: bool,
    },
    /// Give a gateway a new credential (printed once); the old one is
    /// refused from now on. Its id, key and sites stay.
    Rotate {
        /// The gateway id.
        id: u64,
    },
    /// Ask a gateway to rotate its own WireGuard key without interrupting
    /// its sites (it makes the next key; agents follow; it drops the old
    /// one after). Repeating it while a rotation is under way changes nothing.
    RotateKey {
        /// The gateway id.
        id: u64,
    },
    /// Disable a gateway: its credential is refused, it is marked down and
    /// its sites move to other gateways.
    Disable {
        /// The gateway id.
        id: u64,
    },
    /// Enable a disabled gateway again (it is up once it heartbeats).
    Enable {
        /// The gateway id.
        id: u64,
    },
    /// Delete a gateway identity (refused while it carries sites).
    Delete {
        /// The gateway id.
        id: u64,
    },
}

#[derive(Subcommand)]
enum TechnicianCmd {
    /// Add a technician, or set the password of an existing one (which
    /// ends its sessions).
    Add {
        /// The login name.
        name: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Disable a technician: its sessions end, its logins are refused.
    Disable {
        /// The login name.
        name: String,
    },
    /// Enable a disabled technician again.
    Enable {
        /// The login name.
        name: String,
    },
    /// Delete a technician and its sessions.
    Delete {
        /// The login name.
        name: String,
    },
}

#[derive(Subcommand)]
enum TeamCmd {
    /// Create a team with its technician subnets.
    Add {
        /// A unique name.
        name: String,
        /// A source prefix of the team (a.b.c.d/len); repeat for more.
        #[arg(long = "source")]
        sources: Vec<vpnnat::ipv4::Prefix>,
    },
    /// List teams with their sites and technicians.
    List,
    /// Delete a team (refused while sites belong to it).
    Delete {
        /// The team id.
        id: u64,
    },
    /// Assign a site to a team, or with --none to no team (every technician sees it).
    Site {
        /// The site id.
        site: u64,
        /// The team id.
        #[arg(long, conflicts_with = "none", required_unless_present = "none")]
        team: Option<u64>,
        /// No team.
        #[arg(long)]
        none: bool,
    },
    /// Set a technician's team (none without --team) and its own sources
    /// (the team's without --source).
    Technician {
        /// The login name.
        name: String,
        /// The team id.
        #[arg(long)]
        team: Option<u64>,
        /// An own source prefix of the technician (a.b.c.d/len); repeat for more.
        #[arg(long = "source")]
        sources: Vec<vpnnat::ipv4::Prefix>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("maintenance-server: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("maintenance-server: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command.unwrap_or(Command::Serve), settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("maintenance-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Serve => serve(settings).await,
        Command::OperatorToken => print_line(&maintenance_server::operator_token(&settings)?),
        Command::Site(c) => site(c, &settings).await,
        Command::Gateway(c) => gateway(c, &settings).await,
        Command::Technician(c) => technician(c, &settings).await,
        Command::Team(c) => team(c, &settings).await,
        Command::Backup { path } => {
            let db = open(&settings).await?;
            db.backup_sqlite(&path).await?;
            print_line(&format!("backup written to {}", path.display()))
        }
        Command::Restore { path } => restore(path, &settings).await,
    }
}

#[allow(clippy::print_stdout)]
fn print_line(s: &str) -> anyhow::Result<()> {
    println!("{s}");
    Ok(())
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let addr = settings
        .listen()
        .map_err(|e| anyhow::anyhow!("http.listen: {e}"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler cannot fail");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    };
    maintenance_server::launch_with_listener(settings, listener, shutdown).await
}

async fn restore(path: Option<PathBuf>, settings: &Settings) -> anyhow::Result<()> {
    // A running server would keep writing to the file being replaced.
    let addr = settings
        .listen()
        .map_err(|e| anyhow::anyhow!("http.listen: {e}"))?;
    if std::net::TcpListener::bind(addr).is_err() {
        anyhow::bail!(
            "{addr} is in use: stop the maintenance server (every replica) before restoring"
        );
    }
    if let Some(src) = path {
        let url = settings.database_url();
        let Some(file) = url.strip_prefix("sqlite://") else {
            anyhow::bail!(
                "the database is PostgreSQL: restore it with pg_restore, then run `maintenance-server restore` without PATH"
            );
        };
        let file = PathBuf::from(file.split('?').next().unwrap_or(file));
        let mut magic = [0u8; 16];
        std::io::Read::read_exact(
            &mut std::fs::File::open(&src).with_context(|| format!("opening {}", src.display()))?,
            &mut magic,
        )
        .with_context(|| format!("reading {}", src.display()))?;
        if &magic != b"SQLite format 3\0" {
            anyhow::bail!("{} is not an SQLite database", src.display());
        }
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // Copy next to the target, then rename: the database file is either
        // the old one or the whole copy, never half of it.
        let tmp = file.with_extension("db.restoring");
        let _ = std::fs::remove_file(&tmp);
        std::fs::copy(&src, &tmp).with_context(|| format!("copying {}", src.display()))?;
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
        }
        std::fs::rename(&tmp, &file).with_context(|| format!("replacing {}", file.display()))?;
    }
    let db = open(settings).await?;
    let notifier = maintenance_server::notify::Notifier::default();
    let mut tx = db.begin().await?;
    let floor = ops::advance_versions(&mut tx, "operator", now_ms()).await?;
    tx.commit(&notifier).await?;
    db.close().await;
    print_line(&format!(
        "restored; desired-state versions advanced to at least {floor}: gateways and agents take the restored state when they next poll"
    ))
}

async fn open(settings: &Settings) -> anyhow::Result<maintenance_server::db::Database> {
    if settings.database.url.is_empty() {
        std::fs::create_dir_all(&settings.state.dir)
            .with_context(|| format!("creating {}", settings.state.dir.display()))?;
    }
    maintenance_server::open_database(settings).await
}

async fn site(c: SiteCmd, settings: &Settings) -> anyhow::Result<()> {
    let db = open(settings).await?;
    let notifier = maintenance_server::notify::Notifier::default();
    let policy = ops::Policy::new(settings);
    match c {
        SiteCmd::Add {
            name,
            tunnel,
            agentless,
            public_key,
        } => {
            vpnnat::messages::NewSite {
                name: name.clone(),
                tunnel,
                agent: !agentless,
                public_key,
            }
            .validate()?;
            if agentless {
                let now = now_ms();
                let r = db
                    .transaction(&notifier, async |tx| {
                        ops::create_agentless_site(tx, name.trim(), public_key, "operator", now)
                            .await
                    })
                    .await?;
                return print_line(&format!(
                    "site {}: {} (no agent; router public key {})
                     its router's configuration: site wireguard-config {}",
                    r.site_id,
                    r.name,
                    r.public_key.map(|k| k.to_base64()).unwrap_or_default(),
                    r.site_id
                ));
            }
            let mut tx = db.begin().await?;
            let r = ops::create_site(&mut tx, name.trim(), tunnel, "operator", now_ms(), &policy)
                .await?;
            tx.commit(&notifier).await?;
            print_line(&format!(
                "site {}: {}\nenrollment token (shown once, valid until {} ms since epoch):\n{}",
                r.site_id, r.name, r.token_expires_at.0, r.enrollment_token
            ))
        }
        SiteCmd::List => {
            let mut c = db.reader().acquire().await?;
            let sites = views::sites(&mut c).await?;
            let mut out = format!(
                "{:>6}  {:<30}  {:<9}  {:<9}  {:<8}  {:<7}  NAT addresses",
                "ID", "NAME", "TUNNEL", "TRANSPORT", "ENROLLED", "GATEWAY"
            );
            for s in sites {
                out.push_str(&format!(
                    "\n{:>6}  {:<30}  {:<9}  {:<9}  {:<8}  {:<7}  {}",
                    s.site_id,
                    s.name,
                    s.tunnel,
                    s.transport.map_or("-", |t| t.as_str()),
                    if !s.agent {
                        "no agent"
                    } else if s.enrolled {
                        "yes"
                    } else {
                        "no"
                    },
                    s.gateway_id.map_or("-".into(), |g| g.to_string()),
                    s.nat_addresses
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(" ")
                ));
            }
            print_line(&out)
        }
        SiteCmd::Token { id } => {
            let mut tx = db.begin().await?;
            let r = ops::new_site_token(&mut tx, SiteId(id), "operator", now_ms(), &policy).await?;
            tx.commit(&notifier).await?;
            print_line(&format!(
                "site {}: {}\nenrollment token (shown once):\n{}",
                r.site_id, r.name, r.enrollment_token
            ))
        }
        SiteCmd::Rotate { id } => {
            let now = now_ms();
            let r = db
                .transaction(&notifier, async |tx| {
                    ops::rotate_site(tx, SiteId(id), "operator", now, &policy).await
                })
                .await?;
            print_line(&format!(
                "site {}: {}: credential revoked\nenrollment token (shown once; enroll the agent again with it):\n{}",
                r.site_id, r.name, r.enrollment_token
            ))
        }
        SiteCmd::RotateKey { id } | SiteCmd::RotateCredential { id } => {
            let key = matches!(c, SiteCmd::RotateKey { .. });
            let what = vpnnat::messages::PlannedRotation {
                key,
                credential: !key,
            };
            let now = now_ms();
            db.transaction(&notifier, async |tx| {
                maintenance_server::db::rotation::request_rotation(
                    tx,
                    SiteId(id),
                    what,
                    "operator",
                    now,
                )
                .await
            })
            .await?;
            print_line(&format!(
                "site {id}: planned {} rotation requested; the agent carries it out at its next poll",
                if key { "key" } else { "credential" }
            ))
        }
        SiteCmd::Disable { id } | SiteCmd::Enable { id } => {
            let disabled = matches!(c, SiteCmd::Disable { .. });
            let now = now_ms();
            db.transaction(&notifier, async |tx| {
                ops::set_site_disabled(tx, SiteId(id), disabled, "operator", now).await
            })
            .await?;
            print_line(&format!(
                "site {id}: {}",
                if disabled { "disabled" } else { "enabled" }
            ))
        }
        SiteCmd::Delete { id } => {
            let now = now_ms();
            db.transaction(&notifier, async |tx| {
                ops::delete_site(tx, SiteId(id), "operator", now).await
            })
            .await?;
            print_line(&format!("site {id}: deleted"))
        }
        SiteCmd::Tunnel { id, kind } => {
            let now = now_ms();
            db.transaction(&notifier, async |tx| {
                ops::set_site_tunnel(tx, SiteId(id), kind, "operator", now).await
            })
            .await?;
            print_line(&format!("site {id}: tunnel {kind}"))
        }
        SiteCmd::WireguardConfig { id, dir } => {
            let now = now_ms();
            let c = db
                .transaction(&notifier, async |tx| {
                    ops::read_wireguard_config(tx, SiteId(id), "operator", now).await
                })
                .await?;
            let mut out = format!(
                "site {}: {} (no agent)
router public key: {}
carried by gateway: {}
",
                c.site_id,
                c.name,
                c.public_key,
                c.gateway_id.map_or("-".into(), |g| g.to_string())
            );
            for m in &c.mappings {
                out.push_str(&format!(
                    "NAT {} -> {} ({})\n",
                    m.nat_address, m.lan_address, m.terminal
                ));
            }
            out.push_str(&c.instructions);
            out.push('\n');
            for f in &c.files {
                match &dir {
                    Some(d) => {
                        let path = d.join(&f.name);
                        std::fs::write(&path, &f.content)
                            .with_context(|| format!("writing {}", path.display()))?;
                        out.push_str(&format!("wrote {}\n", path.display()));
                    }
                    None => out.push_str(&format!("\n# ---- {}\n{}", f.name, f.content)),
                }
            }
            print_line(out.trim_end())
        }
        SiteCmd::IpsecConfig { id } => {
            let now = now_ms();
            let c = db
                .transaction(&notifier, async |tx| {
                    ops::read_ipsec_config(tx, SiteId(id), "operator", now).await
                })
                .await?;
            let list = |v: Vec<String>| {
                if v.is_empty() {
                    "-".to_owned()
                } else {
                    v.join(", ")
                }
            };
            let p = &c.ipsec;
            print_line(&format!(
                "site {}: {}\n\
                 gateway addresses: {} (IKE on UDP 500, NAT-T 4500)\n\
                 pre-shared key:    {}\n\
                 site identity:     {} (ID_FQDN)\n\
                 gateway identity:  {} (ID_FQDN)\n\
                 IKE proposal:      {}\n\
                 ESP proposal:      {}\n\
                 site traffic selectors (NAT addresses): {}\n\
                 center traffic selectors (technicians): {}\n\
                 \n# swanctl.conf\n{}",
                c.site_id,
                c.name,
                list(
                    c.gateway_addresses
                        .iter()
                        .map(ToString::to_string)
                        .collect()
                ),
                p.psk,
                p.local_id,
                p.remote_id,
                p.ike_proposal,
                p.esp_proposal,
                list(p.local_ts.iter().map(ToString::to_string).collect()),
                list(p.remote_ts.iter().map(ToString::to_string).collect()),
                c.swanctl_conf.trim_end(),
            ))
        }
    }
}

async fn gateway(c: GatewayCmd, settings: &Settings) -> anyhow::Result<()> {
    let db = open(settings).await?;
    let notifier = maintenance_server::notify::Notifier::default();
    match c {
        GatewayCmd::Add { name } => {
            vpnnat::messages::NewGateway { name: name.clone() }.validate()?;
            let mut tx = db.begin().await?;
            let r = ops::create_gateway(&mut tx, name.trim(), "operator", now_ms()).await?;
            tx.commit(&notifier).await?;
            print_line(&format!(
                "gateway {}: {}\ncredential (shown once; put it into the gateway's credential file):\n{}",
                r.gateway_id, r.name, r.credential
            ))
        }
        GatewayCmd::List => {
            let mut c = db.reader().acquire().await?;
            let gws = views::gateways(&mut c, None).await?;
            let mut out = format!(
                "{:>4}  {:<20}  {:<8}  {:<5}  {:>7}  {:<24}  LAST HEARTBEAT (ms)",
                "ID", "NAME", "HEALTH", "DRAIN", "TUNNELS", "ENDPOINT"
            );
            for g in gws {
                out.push_str(&format!(
                    "\n{:>4}  {:<20}  {:<8}  {:<5}  {:>7}  {:<24}  {}{}",
                    g.gateway_id,
                    g.name,
                    views::enum_str(&g.health),
                    if g.drain { "yes" } else { "no" },
                    format!("{}/{}", g.tunnels, g.max_tunnels),
                    g.endpoints.first().map_or("-".into(), ToString::to_string),
                    g.last_heartbeat.map_or("-".into(), |t| t.0.to_string()),
                    g.next_public_key
                        .map_or(String::new(), |k| format!("  (key rotating to {k})")),
                ));
            }
            print_line(&out)
        }
        GatewayCmd::Drain { id, off } => {
            let mut tx = db.begin().await?;
            ops::drain(&mut tx, GatewayId(id), !off, "operator", now_ms()).await?;
            tx.commit(&notifier).await?;
            print_line(&format!(
                "gateway {id}: {}",
                if off {
                    "takes new sites again"
                } else {
                    "draining (takes no new sites)"
                }
            ))
        }
        GatewayCmd::Rotate { id } => {
            let now = now_ms();
            let r = db
                .transaction(&notifier, async |tx| {
                    ops::rotate_gateway(tx, GatewayId(id), "operator", now).await
                })
                .await?;
            print_line(&format!(
                "gateway {}: {}\nnew credential (shown once; put it into the gateway's credential file):\n{}",
                r.gateway_id, r.name, r.credential
            ))
        }
        GatewayCmd::RotateKey { id } => {
            let now = now_ms();
            let (r, without_agent) = db
                .transaction(&notifier, async |tx| {
                    let r = ops::request_key_rotation(tx, GatewayId(id), "operator", now).await?;
                    Ok::<_, ops::OpError>((r, ops::wireguard_sites_without_agent(tx).await?))
                })
                .await?;
            if without_agent > 0 {
                eprintln!(
                    "note: {without_agent} WireGuard site(s) without an agent name this gateway's                      key in their router's files: apply their new files (`site wireguard-config                      ID`) before the gateway's key_rotation_grace_s ends"
                );
            }
            print_line(&match r.next_public_key {
                Some(next) => format!(
                    "gateway {id}: key rotation under way: current key {}, next key {next} \
                     (its sites dial the next key)",
                    r.public_key
                ),
                None => format!(
                    "gateway {id}: key rotation asked for (current key {}); the gateway announces \
                     its next key in its heartbeats once it made one",
                    r.public_key
                ),
            })
        }
        GatewayCmd::Disable { id } | GatewayCmd::Enable { id } => {
            let disabled = matches!(c, GatewayCmd::Disable { .. });
            let now = now_ms();
            db.transaction(&notifier, async |tx| {
                ops::set_gateway_disabled(tx, GatewayId(id), disabled, "operator", now).await
            })
            .await?;
            print_line(&format!(
                "gateway {id}: {}",
                if disabled {
                    "disabled (marked down; its sites move)"
                } else {
                    "enabled"
                }
            ))
        }
        GatewayCmd::Delete { id } => {
            let now = now_ms();
            db.transaction(&notifier, async |tx| {
                ops::delete_gateway(tx, GatewayId(id), "operator", now).await
            })
            .await?;
            print_line(&format!("gateway {id}: deleted"))
        }
    }
}

async fn technician(c: TechnicianCmd, settings: &Settings) -> anyhow::Result<()> {
    let disabled = matches!(c, TechnicianCmd::Disable { .. });
    let (name, password_stdin) = match c {
        TechnicianCmd::Add {
            name,
            password_stdin,
        } => (name, password_stdin),
        TechnicianCmd::Disable { name } | TechnicianCmd::Enable { name } => {
            let db = open(settings).await?;
            let notifier = maintenance_server::notify::Notifier::default();
            let now = now_ms();
            db.transaction(&notifier, async |tx| {
                ops::set_technician_disabled(tx, name.trim(), disabled, "operator", now).await
            })
            .await?;
            return print_line(&format!(
                "technician {}: {}",
                name.trim(),
                if disabled {
                    "disabled (its sessions ended)"
                } else {
                    "enabled"
                }
            ));
        }
        TechnicianCmd::Delete { name } => {
            let db = open(settings).await?;
            let notifier = maintenance_server::notify::Notifier::default();
            let now = now_ms();
            db.transaction(&notifier, async |tx| {
                ops::delete_technician(tx, name.trim(), "operator", now).await
            })
            .await?;
            return print_line(&format!("technician {}: deleted", name.trim()));
        }
    };
    if name.trim().is_empty() || name.len() > 100 {
        anyhow::bail!("NAME: 1 to 100 characters");
    }
    let password = read_password(password_stdin)?;
    if password.len() < 8 {
        anyhow::bail!("the password must have at least 8 characters");
    }
    let hash =
        tokio::task::spawn_blocking(move || maintenance_server::auth::hash_password(&password))
            .await
            .context("hashing")??;
    let db = open(settings).await?;
    let notifier = maintenance_server::notify::Notifier::default();
    let mut tx = db.begin().await?;
    ops::upsert_technician(&mut tx, name.trim(), &hash, "operator", now_ms()).await?;
    tx.commit(&notifier).await?;
    print_line(&format!("technician {}: password set", name.trim()))
}

async fn team(c: TeamCmd, settings: &Settings) -> anyhow::Result<()> {
    use maintenance_server::db::teams;
    let db = open(settings).await?;
    let notifier = maintenance_server::notify::Notifier::default();
    let now = now_ms();
    let list = |p: &[vpnnat::ipv4::Prefix]| {
        p.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    match c {
        TeamCmd::Add { name, sources } => {
            vpnnat::messages::NewTeam {
                name: name.clone(),
                source_prefixes: sources.clone(),
            }
            .validate()?;
            let id = db
                .transaction(&notifier, async |tx| {
                    teams::create_team(tx, name.trim(), &sources, "operator", now).await
                })
                .await?;
            print_line(&format!("team {id}: {} created", name.trim()))
        }
        TeamCmd::List => {
            let mut c = db.reader().acquire().await?;
            let all = teams::teams(&mut c).await?;
            let mut out = format!(
                "{:>6}  {:<20}  {:<30}  {:<20}  TECHNICIANS",
                "ID", "NAME", "SOURCES", "SITES"
            );
            for t in all {
                let sites: Vec<String> = t.sites.iter().map(ToString::to_string).collect();
                out.push_str(&format!(
                    "\n{:>6}  {:<20}  {:<30}  {:<20}  {}",
                    t.id,
                    t.name,
                    list(&t.source_prefixes),
                    sites.join(","),
                    t.technicians.join(",")
                ));
            }
            print_line(&out)
        }
        TeamCmd::Delete { id } => {
            db.transaction(&notifier, async |tx| {
                teams::delete_team(tx, id, "operator", now).await
            })
            .await?;
            print_line(&format!("team {id}: deleted"))
        }
        TeamCmd::Site { site, team, none } => {
            let team = team.filter(|_| !none);
            db.transaction(&notifier, async |tx| {
                teams::set_site_team(tx, SiteId(site), team, "operator", now).await
            })
            .await?;
            print_line(&format!(
                "site {site}: {}",
                team.map_or_else(|| "no team".to_owned(), |t| format!("team {t}"))
            ))
        }
        TeamCmd::Technician {
            name,
            team,
            sources,
        } => {
            let sources = Some(sources).filter(|s| !s.is_empty());
            vpnnat::messages::TechnicianTeam {
                team,
                sources: sources.clone(),
            }
            .validate()?;
            db.transaction(&notifier, async |tx| {
                teams::set_technician_team(
                    tx,
                    name.trim(),
                    team,
                    sources.as_deref(),
                    "operator",
                    now,
                )
                .await
            })
            .await?;
            print_line(&format!(
                "technician {}: {}, sources {}",
                name.trim(),
                team.map_or_else(|| "no team".to_owned(), |t| format!("team {t}")),
                sources
                    .as_deref()
                    .map_or_else(|| "of the team".to_owned(), list)
            ))
        }
    }
}

fn read_password(from_stdin: bool) -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    if !from_stdin && !tty {
        anyhow::bail!("no terminal to prompt on: pass --password-stdin");
    }
    if !from_stdin {
        eprint!("password: ");
        // Hide the typed password.
        let _ = std::process::Command::new("stty").arg("-echo").status();
    }
    let mut line = String::new();
    let r = stdin.lock().read_line(&mut line);
    if !from_stdin {
        let _ = std::process::Command::new("stty").arg("echo").status();
        eprintln!();
    }
    r.context("reading the password")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}
