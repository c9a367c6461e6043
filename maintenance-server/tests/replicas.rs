//! Two real server processes (the built binary) on one PostgreSQL: 2 × 500
//! concurrent maintenance requests hand out every NAT address exactly once
//! and lose none, and a change committed by one replica wakes the
//! long-polls held by the other (LISTEN/NOTIFY).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead as _, BufReader};
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use maintenance_server::auth::{Secret, SecretKind};
use vpnnat::messages::*;

/// A server process, killed on drop.
struct Replica {
    child: Child,
    base: String,
}

impl Replica {
    fn start(db: &TestDb, operator: &str, tag: &str) -> Self {
        let config = db.dir.path().join(format!("{tag}.toml"));
        std::fs::write(
            &config,
            format!(
                "[http]\nlisten = \"127.0.0.1:0\"\n[state]\ndir = \"{}\"\n[database]\nurl = \"{}\"\nmax_connections = 10\n\
                 [operator]\ntoken = \"{operator}\"\n[gateways]\ndown_after_ms = 600000\n\
                 [quotas]\nopen_requests_per_site = 1000\nterminals_per_site = 1000\nrequests_per_minute = 1000\n",
                db.dir.path().join(tag).display(),
                db.url
            ),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_maintenance-server"))
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .env("RUST_LOG", "info")
            .env_remove("VPNNAT_DATABASE__URL")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.split("listening addr=").nth(1) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.split_whitespace().next().unwrap().to_owned());
                    }
                } else if line.contains("ERROR") {
                    eprintln!("replica: {line}");
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the replica announces its address");
        Self {
            child,
            base: format!("http://{addr}"),
        }
    }

    fn client(&self, bearer: Option<&str>) -> Api {
        Api::new(&self.base, bearer, Duration::from_secs(120))
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SITES: usize = 50;
const PER_REPLICA: usize = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_hand_out_every_address_once_and_wake_each_other() {
    if !require_postgres() {
        return;
    }
    let db = TestDb::new(Backend::Postgres);
    let operator = Secret::generate(SecretKind::Operator).expose().to_owned();
    let r1 = Replica::start(&db, &operator, "r1");
    let r2 = Replica::start(&db, &operator, "r2");
    let replicas = [&r1, &r2];

    // A gateway with room for every site, registered through replica 1.
    let gw: GatewayCreated = r1
        .client(Some(&operator))
        .post(paths::GATEWAYS, &NewGateway { name: "gw1".into() })
        .await
        .json();
    let gw_api = r1.client(Some(&gw.credential));
    let reg = gw_api
        .post(
            paths::GATEWAY_REGISTER,
            &GatewayRegistration {
                endpoints: vec!["203.0.113.1:51820".parse().unwrap()],
                public_key: key(250),
                tunnel_kinds: vec![TunnelKind::Wireguard],
                max_tunnels: 1000,
                software_version: "test".into(),
                technician_prefixes: Vec::new(),
                tls: None,
                next_public_key: None,
            },
        )
        .await;
    assert_eq!(reg.status, 200, "{}", reg.body);

    // Sites, enrolled alternately through both replicas.
    let mut creds = Vec::new();
    for i in 0..SITES {
        let r = replicas[i % 2];
        let created: SiteCreated = r
            .client(Some(&operator))
            .post(
                paths::SITES,
                &NewSite {
                    name: format!("site-{i}"),
                    tunnel: TunnelKind::Wireguard,
                    ..Default::default()
                },
            )
            .await
            .json();
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        let e: EnrollResponse = replicas[(i + 1) % 2]
            .client(None)
            .post(
                paths::ENROLL,
                &EnrollRequest {
                    token: created.enrollment_token,
                    public_key: PublicKey(k),
                },
            )
            .await
            .json();
        creds.push((e.site_id, e.credential));
    }

    // LISTEN/NOTIFY: an agent long-polls replica 2, the request goes to replica 1.
    let (site0, cred0) = creds[0].clone();
    let agent_r2 = r2.client(Some(&cred0));
    let s0: AgentDesiredState = agent_r2.get(paths::AGENT_STATE).await.json();
    let gw_r2 = r2.client(Some(&gw.credential));
    let g0: GatewayDesiredState = gw_r2.get(paths::GATEWAY_STATE).await.json();
    let poll = {
        let a = agent_r2.clone();
        tokio::spawn(async move {
            a.get(&format!(
                "{}?after={}&wait_ms=30000",
                paths::AGENT_STATE,
                s0.version
            ))
            .await
            .json::<AgentDesiredState>()
        })
    };
    let gpoll = {
        let a = gw_r2.clone();
        tokio::spawn(async move {
            a.get(&format!(
                "{}?after={}&wait_ms=30000",
                paths::GATEWAY_STATE,
                g0.version
            ))
            .await
            .json::<GatewayDesiredState>()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first: MaintenanceRequestView = r1
        .client(Some(&cred0))
        .post(paths::AGENT_REQUESTS, &new_request(&["warmup"]))
        .await
        .json();
    let woke = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .expect("replica 2's long-poll answers a change committed by replica 1")
        .unwrap();
    assert!(woke.version > s0.version);
    assert_eq!(woke.site_id, site0);
    assert_eq!(
        woke.mappings[0].nat_address,
        first.terminals[0].nat_address.unwrap()
    );
    let gwoke = tokio::time::timeout(Duration::from_secs(10), gpoll)
        .await
        .expect("the gateway's long-poll on replica 2 answers too")
        .unwrap();
    assert!(gwoke.peers.iter().any(|p| p.site_id == site0));

    // 2 replicas × 500 concurrent requests, each for a terminal of its own.
    let mut tasks = Vec::new();
    for (ri, r) in replicas.iter().enumerate() {
        for j in 0..PER_REPLICA {
            let n = ri * PER_REPLICA + j;
            let (site, cred) = creds[n % SITES].clone();
            let api = r.client(Some(&cred));
            let terminal = format!("pc-{n}");
            tasks.push(tokio::spawn(async move {
                let a = api
                    .post(paths::AGENT_REQUESTS, &new_request(&[terminal.as_str()]))
                    .await;
                (site, terminal, a)
            }));
        }
    }
    let mut handed: BTreeMap<Ipv4Addr, (SiteId, String)> = BTreeMap::new();
    for t in tasks {
        let (site, terminal, a) = t.await.unwrap();
        assert_eq!(a.status, 201, "{}", a.body);
        let v: MaintenanceRequestView = a.json();
        assert_eq!(v.site_id, site);
        let addr = v.terminals[0].nat_address.unwrap();
        let prev = handed.insert(addr, (site, terminal.clone()));
        assert!(
            prev.is_none(),
            "{addr} handed out twice: {prev:?} and {site}/{terminal}"
        );
    }
    assert_eq!(
        handed.len(),
        2 * PER_REPLICA,
        "every request got its own address"
    );

    // None lost: the database holds exactly these (plus the warm-up) and the rest is free.
    let used = db
        .scalar("SELECT COUNT(*) FROM nat_addresses WHERE site_id IS NOT NULL")
        .await;
    assert_eq!(used, 2 * PER_REPLICA as i64 + 1);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM nat_addresses").await, 65534);
    assert_eq!(
        db.scalar("SELECT COUNT(DISTINCT nat_address) FROM request_terminals WHERE nat_address IS NOT NULL")
            .await,
        2 * PER_REPLICA as i64 + 1
    );
    // Every agent's document lists exactly what its requests were given.
    let mut per_site: BTreeMap<SiteId, BTreeSet<Ipv4Addr>> = BTreeMap::new();
    for (addr, (site, _)) in &handed {
        per_site.entry(*site).or_default().insert(*addr);
    }
    per_site
        .entry(site0)
        .or_default()
        .insert(first.terminals[0].nat_address.unwrap());
    for (i, (site, cred)) in creds.iter().enumerate() {
        let s: AgentDesiredState = replicas[i % 2]
            .client(Some(cred))
            .get(paths::AGENT_STATE)
            .await
            .json();
        let got: BTreeSet<Ipv4Addr> = s.mappings.iter().map(|m| m.nat_address).collect();
        assert_eq!(&got, per_site.get(site).unwrap(), "site {site}");
    }
    // And the gateway carries all of them, one peer per site.
    let g: GatewayDesiredState = gw_r2.get(paths::GATEWAY_STATE).await.json();
    assert_eq!(g.peers.len(), SITES);
    let all: usize = g.peers.iter().map(|p| p.nat_addresses.len()).sum();
    assert_eq!(all, 2 * PER_REPLICA + 1);
    let gws: Vec<GatewayView> = r2.client(Some(&operator)).get(paths::GATEWAYS).await.json();
    assert_eq!(gws[0].tunnels as usize, SITES);
}
