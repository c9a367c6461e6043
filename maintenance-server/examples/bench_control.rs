//! Load generator of `scripts/bench-control.sh` (a benchmark, not a test):
//! enrolls N sites and two gateways on a running maintenance server, keeps
//! the gateways heartbeating, optionally holds one agent long-poll per site
//! (as real agents do), then fires maintenance requests with a fixed number
//! in flight and reports requests per second and latency percentiles.
//!
//! ```text
//! bench_control --url http://127.0.0.1:8080 --operator-token vnop_… --sites 1000 --requests 20000
//! ```
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use vpnnat::messages::*;

/// Control-plane load generator.
#[derive(Parser)]
struct Args {
    /// The server's base URL.
    #[arg(long)]
    url: String,
    /// The operator token.
    #[arg(long, env = "VPNNAT_OPERATOR_TOKEN")]
    operator_token: String,
    /// Sites to enroll.
    #[arg(long, default_value_t = 1000)]
    sites: usize,
    /// Maintenance requests to send in the measured phase.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Distinct terminals per site (a terminal keeps its address across requests).
    #[arg(long, default_value_t = 4)]
    terminals: usize,
    /// Hold one desired-state long-poll per site during the run.
    #[arg(long)]
    long_polls: bool,
    /// A label for the result line.
    #[arg(long, default_value = "")]
    label: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .timeout(Duration::from_secs(120))
        .build()?;
    let base = args.url.trim_end_matches('/').to_owned();
    let op = args.operator_token.clone();

    // Two gateways with room for every site.
    let mut gateway_creds = Vec::new();
    for g in 0..2u8 {
        let created: GatewayCreated = http
            .post(format!("{base}{}", paths::GATEWAYS))
            .bearer_auth(&op)
            .json(&NewGateway {
                name: format!("bench-gw-{g}-{}", std::process::id()),
            })
            .send()
            .await?
            .error_for_status()
            .context("creating a gateway")?
            .json()
            .await?;
        http.post(format!("{base}{}", paths::GATEWAY_REGISTER))
            .bearer_auth(&created.credential)
            .json(&GatewayRegistration {
                endpoints: vec![format!("203.0.113.{}:51820", g + 1).parse()?],
                public_key: PublicKey([200 + g; 32]),
                tunnel_kinds: vec![TunnelKind::Wireguard],
                max_tunnels: u32::try_from(args.sites)?,
                software_version: "bench".into(),
                technician_prefixes: Vec::new(),
                tls: None,
                next_public_key: None,
            })
            .send()
            .await?
            .error_for_status()
            .context("registering a gateway")?;
        gateway_creds.push(created.credential);
    }
    for cred in gateway_creds.clone() {
        let http = http.clone();
        let base = base.clone();
        tokio::spawn(async move {
            loop {
                let _ = http
                    .post(format!("{base}{}", paths::GATEWAY_HEARTBEAT))
                    .bearer_auth(&cred)
                    .json(&GatewayHeartbeat {
                        max_tunnels: 100_000,
                        active_tunnels: 0,
                        health: Health::Healthy,
                        applied_version: 0,
                        peers: vec![],
                        public_key: None,
                        next_public_key: None,
                    })
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    // Enroll the sites, 32 at a time.
    let t = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let creds = Arc::new(std::sync::Mutex::new(vec![String::new(); args.sites]));
    let pid = std::process::id();
    let mut workers = Vec::new();
    for _ in 0..32 {
        let (http, base, op, next, creds) = (
            http.clone(),
            base.clone(),
            op.clone(),
            next.clone(),
            creds.clone(),
        );
        let sites = args.sites;
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= sites {
                    return Ok::<_, anyhow::Error>(());
                }
                let created: SiteCreated = http
                    .post(format!("{base}{}", paths::SITES))
                    .bearer_auth(&op)
                    .json(&NewSite {
                        name: format!("bench-{pid}-{i}"),
                        tunnel: TunnelKind::Wireguard,
                        ..Default::default()
                    })
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                let mut key = [7u8; 32];
                key[..8].copy_from_slice(&(u64::from(pid) << 32 | i as u64).to_le_bytes());
                let e: EnrollResponse = http
                    .post(format!("{base}{}", paths::ENROLL))
                    .json(&EnrollRequest {
                        token: created.enrollment_token,
                        public_key: PublicKey(key),
                    })
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                creds.lock().unwrap()[i] = e.credential;
            }
        }));
    }
    for w in workers {
        w.await??;
    }
    let creds: Arc<Vec<String>> = Arc::new(creds.lock().unwrap().clone());
    eprintln!(
        "enrolled {} sites in {:.1} s",
        args.sites,
        t.elapsed().as_secs_f64()
    );

    // Optionally, every agent long-polls its desired state (and re-polls on each answer).
    let answered = Arc::new(AtomicU64::new(0));
    if args.long_polls {
        for cred in creds.iter() {
            let cred = cred.clone();
            let (http, base, answered) = (http.clone(), base.clone(), answered.clone());
            tokio::spawn(async move {
                let mut after = 0;
                loop {
                    let r = http
                        .get(format!("{base}{}", paths::AGENT_STATE))
                        .bearer_auth(&cred)
                        .query(&[("after", after), ("wait_ms", 25_000)])
                        .send()
                        .await;
                    if let Ok(r) = r
                        && let Ok(s) = r.json::<AgentDesiredState>().await
                    {
                        after = s.version;
                        answered.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        }
        // Let the first round of answers settle.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let answered_before = answered.load(Ordering::Relaxed);

    // The measured phase.
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (http, base, creds, next, failures) = (
            http.clone(),
            base.clone(),
            creds.clone(),
            next.clone(),
            failures.clone(),
        );
        let (total, sites, terminals) = (args.requests, args.sites, args.terminals);
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return lat;
                }
                let site = n % sites;
                let terminal =
                    TerminalName::new(format!("pc-{}", (n / sites) % terminals)).unwrap();
                let body = NewMaintenanceRequest {
                    requester_name: "bench".into(),
                    level: Level::General,
                    urgency: Urgency::Normal,
                    phone: "0301234".into(),
                    content: "load test".into(),
                    terminals: vec![terminal],
                };
                let start = Instant::now();
                let r = http
                    .post(format!("{base}{}", paths::AGENT_REQUESTS))
                    .bearer_auth(&creds[site])
                    .json(&body)
                    .send()
                    .await;
                let ok = match r {
                    Ok(r) => r.status() == 201 && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                lat.push(start.elapsed());
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let mut lat: Vec<Duration> = Vec::with_capacity(args.requests);
    for w in workers {
        lat.extend(w.await?);
    }
    let elapsed = t.elapsed();
    let failed = failures.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("{failed} requests failed");
    }
    lat.sort();
    let pct = |p: f64| {
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i].as_secs_f64() * 1000.0
    };
    let rps = lat.len() as f64 / elapsed.as_secs_f64();
    let wakeups = answered.load(Ordering::Relaxed) - answered_before;
    println!(
        "| {} | {} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {} |",
        args.label,
        args.sites,
        if args.long_polls { "yes" } else { "no" },
        args.requests,
        args.concurrency,
        rps,
        pct(0.50),
        pct(0.99),
        lat.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        if args.long_polls {
            wakeups.to_string()
        } else {
            "-".into()
        },
    );
    Ok(())
}
