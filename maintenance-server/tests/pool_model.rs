//! The server's NAT-address allocation (SQL, in `db::addresses`) checked
//! against the core's address-pool model, `vpnnat::pool`.
//!
//! A pseudo-random sequence of maintenance requests (opened and closed
//! through the real write operations, on SQLite) is replayed on the model,
//! and every address the server hands out must be the one the model
//! predicts. The server's rule is the model's "lowest free address first"
//! for addresses never handed out before, and after those "least recently
//! released first" (so an address is not given to another site the moment
//! it came back); the model below is `vpnnat::pool::Pool` plus that order
//! of the released ones.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use maintenance_server::db::addresses::configured_pool;
use maintenance_server::db::ops::{self, OpError, Origin, Policy};
use maintenance_server::db::{Database, Tx};
use maintenance_server::notify::Notifier;
use maintenance_server::settings::Settings;
use sqlx::Row as _;
use vpnnat::messages::{
    GatewayRegistration, Level, NewMaintenanceRequest, PublicKey, RequestId, RequestState, SiteId,
    TerminalName, TunnelKind, Urgency,
};
use vpnnat::pool::{Pool, PoolError};

/// What the server should hand out next, by the core's pool model.
struct Model {
    /// Which addresses are free and which are held.
    pool: Pool,
    /// The addresses never handed out yet; its `allocate` is "lowest first".
    never_used: Pool,
    /// Free addresses that were handed out before, by (release time, address).
    released: BTreeSet<(i64, Ipv4Addr)>,
}

impl Model {
    fn new(prefix: &str) -> Self {
        let pool = configured_pool(prefix).unwrap();
        Self {
            never_used: pool.clone(),
            pool,
            released: BTreeSet::new(),
        }
    }

    fn allocate(&mut self) -> Option<Ipv4Addr> {
        let addr = match self.never_used.allocate() {
            Some(a) => a,
            None => {
                let oldest = self.released.pop_first()?;
                oldest.1
            }
        };
        self.pool
            .hold(addr)
            .expect("the model hands out free addresses only");
        Some(addr)
    }

    fn release(&mut self, addr: Ipv4Addr, now: i64) {
        self.pool.release(addr).unwrap();
        self.released.insert((now, addr));
    }
}

/// A small deterministic generator (no seed to pass around, no dependency).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        usize::try_from((self.0 >> 33) % n as u64).unwrap()
    }
}

struct Server {
    db: Database,
    notifier: Notifier,
    policy: Policy,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn open(prefix: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("pool.db").display());
        let db = Database::connect(&url, 2).await.unwrap();
        db.sync_pool(configured_pool(prefix).unwrap().prefix())
            .await
            .unwrap();
        // The model checks allocation, not the per-site quotas: no quota binds.
        let mut settings = Settings::default();
        settings.quotas.open_requests_per_site = u32::MAX;
        settings.quotas.terminals_per_site = u32::MAX;
        settings.quotas.requests_per_minute = u32::MAX;
        Self {
            db,
            notifier: Notifier::default(),
            policy: Policy::new(&settings),
            _dir: dir,
        }
    }

    async fn tx(&self) -> Tx {
        self.db.begin().await.unwrap()
    }

    async fn commit(&self, tx: Tx) {
        tx.commit(&self.notifier).await.unwrap();
    }

    /// A registered, healthy gateway with room for every site.
    async fn gateway(&self, now: i64) {
        let mut tx = self.tx().await;
        let gw = ops::create_gateway(&mut tx, "gw", "test", now)
            .await
            .unwrap()
            .gateway_id;
        let reg = GatewayRegistration {
            endpoints: vec!["192.0.2.1:51820".parse().unwrap()],
            public_key: PublicKey([7; 32]),
            tunnel_kinds: vec![TunnelKind::Wireguard],
            max_tunnels: 100,
            software_version: "test".into(),
            technician_prefixes: Vec::new(),
            tls: None,
            next_public_key: None,
        };
        ops::register_gateway(&mut tx, gw, &reg, now, &self.policy)
            .await
            .unwrap();
        self.commit(tx).await;
    }

    async fn site(&self, name: &str, now: i64) -> SiteId {
        let mut tx = self.tx().await;
        let site = ops::create_site(
            &mut tx,
            name,
            TunnelKind::Wireguard,
            "test",
            now,
            &self.policy,
        )
        .await
        .unwrap()
        .site_id;
        self.commit(tx).await;
        site
    }

    /// Opens a request; the addresses in the order of `terminals`.
    async fn open_request(
        &self,
        site: SiteId,
        terminals: &[TerminalName],
        now: i64,
    ) -> Result<(RequestId, Vec<Ipv4Addr>), OpError> {
        let req = NewMaintenanceRequest {
            requester_name: "model".into(),
            level: Level::General,
            urgency: Urgency::Low,
            phone: String::new(),
            content: String::new(),
            terminals: terminals.to_vec(),
        };
        let origin = Origin {
            actor: "test".into(),
            global_address: None,
            failure_id: None,
            lan_addresses: Vec::new(),
        };
        let mut tx = self.tx().await;
        // On an error the transaction is dropped: rolled back, as in a handler.
        let view = ops::new_request(&mut tx, site, &req, &origin, now, &self.policy).await?;
        self.commit(tx).await;
        let addrs = view
            .terminals
            .iter()
            .map(|t| t.nat_address.unwrap())
            .collect();
        Ok((view.id, addrs))
    }

    async fn close_request(&self, id: RequestId, now: i64) {
        let mut tx = self.tx().await;
        ops::close_request(&mut tx, id, RequestState::Ended, None, "test", now)
            .await
            .unwrap();
        self.commit(tx).await;
    }

    /// The free addresses of the table.
    async fn free(&self) -> BTreeSet<Ipv4Addr> {
        sqlx::query("SELECT address FROM nat_addresses WHERE site_id IS NULL")
            .fetch_all(self.db.reader())
            .await
            .unwrap()
            .iter()
            .map(|r| Ipv4Addr::from_bits(u32::try_from(r.get::<i64, _>(0)).unwrap()))
            .collect()
    }
}

fn model_free(pool: &Pool) -> BTreeSet<Ipv4Addr> {
    pool.free_ranges()
        .flat_map(|r| r.first().to_bits()..=r.last().to_bits())
        .map(Ipv4Addr::from_bits)
        .collect()
}

/// An open request as the test remembers it.
struct Open {
    site: SiteId,
    terminals: Vec<TerminalName>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_allocation_follows_the_pool_model() {
    // 14 host addresses for 3 sites: the sequence runs into exhaustion often.
    let prefix = "10.64.0.0/28";
    let server = Server::open(prefix).await;
    let mut model = Model::new(prefix);
    assert_eq!(server.free().await, model_free(&model.pool));
    let mut now = 1_000i64;
    server.gateway(now).await;
    let mut sites = Vec::new();
    for name in ["a", "b", "c"] {
        sites.push(server.site(name, now).await);
    }
    // (site, terminal) → its address while an open request names it.
    let mut held: BTreeMap<(SiteId, TerminalName), Ipv4Addr> = BTreeMap::new();
    let mut open: BTreeMap<RequestId, Open> = BTreeMap::new();
    let mut rng = Lcg(9);
    let (mut opened, mut refused, mut closed) = (0, 0, 0);
    for step in 0..400 {
        now += 1;
        if open.is_empty() || rng.below(5) < 3 {
            let site = sites[rng.below(sites.len())];
            // One to three distinct terminals out of six per site, so that
            // some are already held by another open request of the site.
            let mut names = BTreeSet::new();
            for _ in 0..=rng.below(3) {
                names.insert(format!("pc-{}", rng.below(6)));
            }
            let terminals: Vec<TerminalName> = names
                .into_iter()
                .map(|n| TerminalName::new(n).unwrap())
                .collect();
            let new: Vec<&TerminalName> = terminals
                .iter()
                .filter(|t| !held.contains_key(&(site, (*t).clone())))
                .collect();
            let fits = model.pool.available() >= new.len() as u64;
            match server.open_request(site, &terminals, now).await {
                Ok((id, addrs)) => {
                    assert!(
                        fits,
                        "step {step}: the server allocated past the model's pool"
                    );
                    for (t, got) in terminals.iter().zip(addrs) {
                        let want = match held.get(&(site, t.clone())) {
                            Some(a) => *a,
                            None => model.allocate().unwrap(),
                        };
                        assert_eq!(got, want, "step {step}: address of {t} at site {site}");
                        held.insert((site, t.clone()), got);
                    }
                    open.insert(id, Open { site, terminals });
                    opened += 1;
                }
                Err(OpError::PoolExhausted) => {
                    assert!(!fits, "step {step}: refused although the model has room");
                    refused += 1;
                }
                Err(e) => panic!("step {step}: {e}"),
            }
        } else {
            let id = *open.keys().nth(rng.below(open.len())).unwrap();
            let req = open.remove(&id).unwrap();
            server.close_request(id, now).await;
            for t in &req.terminals {
                let still_named = open
                    .values()
                    .any(|o| o.site == req.site && o.terminals.contains(t));
                if !still_named {
                    let a = held.remove(&(req.site, t.clone())).unwrap();
                    model.release(a, now);
                }
            }
            closed += 1;
        }
        assert_eq!(
            server.free().await,
            model_free(&model.pool),
            "step {step}: the free addresses differ"
        );
    }
    // The sequence covered what it is meant to.
    assert!(
        opened > 50 && refused > 5 && closed > 50,
        "{opened} {refused} {closed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_table_holds_the_models_host_addresses() {
    for (prefix, count) in [
        ("10.64.0.0/29", 6),
        ("10.64.0.0/31", 2),
        ("10.64.0.7/32", 1),
    ] {
        let server = Server::open(prefix).await;
        let model = Model::new(prefix);
        assert_eq!(model.pool.capacity(), count);
        assert_eq!(server.free().await, model_free(&model.pool), "{prefix}");
    }
}

#[test]
fn the_pool_configuration_is_checked_by_the_model() {
    assert!(matches!(
        configured_pool("10.64.1.0/16"),
        Err(PoolError::HostBitsSet { .. })
    ));
    assert!(matches!(
        configured_pool("10.64.0.0"),
        Err(PoolError::BadPrefix { .. })
    ));
    assert!(matches!(
        configured_pool("10.64.0.0/33"),
        Err(PoolError::BadPrefix { .. })
    ));
    assert_eq!(configured_pool("10.64.0.0/16").unwrap().capacity(), 65_534);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_pool_prefix_is_refused_before_the_database_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.database.url = format!("sqlite://{}", dir.path().join("x.db").display());
    settings.pool.prefix = "10.64.1.0/16".into();
    let e = maintenance_server::open_database(&settings)
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("pool.prefix"), "{e:#}");
    assert!(format!("{e:#}").contains("host bits"), "{e:#}");
    assert!(!dir.path().join("x.db").exists());
}
