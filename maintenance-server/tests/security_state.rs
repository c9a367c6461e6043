//! The server's own state under abuse and faults: per-site quotas,
//! retention, the pool-usage warning, a restart after an outage, stranded
//! sites, lock order and retried transactions on PostgreSQL. The operator's
//! lifecycle operations are in `security_state_operators.rs`.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use vpnnat::messages::*;

async fn failure_report(site: &Site, detail: &str) -> Answer {
    site.agent
        .post(
            paths::AGENT_FAILURES,
            &FailureReport {
                code: FailureCode::TerminalUnreachable,
                detail: detail.into(),
                terminal: None,
                open_request: false,
            },
        )
        .await
}

async fn gateway_health(server: &TestServer, gw: GatewayId) -> Health {
    let all: Vec<GatewayView> = server.operator().get(paths::GATEWAYS).await.json();
    all.into_iter().find(|g| g.gateway_id == gw).unwrap().health
}

/// With the default `[quotas]`, one site that floods the server with
/// requests, terminals and failure reports is refused with 409/429 JSON
/// errors, while another site still gets its address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_one_flooding_site_does_not_starve_another() {
    let db = TestDb::new(Backend::Sqlite);
    let server = TestServer::start(db.settings()).await;
    let _gw = add_gateway(&server, "gw1", 10, 1).await;
    let flood = add_site(&server, "flood", 1).await;
    let calm = add_site(&server, "calm", 2).await;

    // 64 terminals (one request's maximum) is the site's whole share.
    let many: Vec<String> = (0..64).map(|i| format!("pc{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let first = flood
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&many))
        .await;
    assert_eq!(first.status, 201, "{}", first.body);
    let more = flood
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["one-more"]))
        .await;
    let e = more.error(409, Some("terminals"));
    assert_eq!(e.error, "quota_exceeded", "{}", more.body);

    // Open requests: 8 at most (terminals it holds already cost nothing).
    let mut open = vec![first.json::<MaintenanceRequestView>().id];
    for _ in 1..8 {
        let a = flood
            .agent
            .post(paths::AGENT_REQUESTS, &new_request(&["pc1"]))
            .await;
        assert_eq!(a.status, 201, "{}", a.body);
        open.push(a.json::<MaintenanceRequestView>().id);
    }
    let ninth = flood
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc1"]))
        .await;
    let e = ninth.error(409, Some("open_requests"));
    assert_eq!(e.error, "quota_exceeded");

    // Requests per minute: open and revoke until refused with 429.
    for id in open {
        let r = flood.agent.post_empty(&at(paths::AGENT_REVOKE, id)).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let mut limited = None;
    for _ in 0..40 {
        let a = flood
            .agent
            .post(paths::AGENT_REQUESTS, &new_request(&["pc1"]))
            .await;
        if a.status == 429 {
            limited = Some(a);
            break;
        }
        assert_eq!(a.status, 201, "{}", a.body);
        let id = a.json::<MaintenanceRequestView>().id;
        let r = flood.agent.post_empty(&at(paths::AGENT_REVOKE, id)).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let limited = limited.expect("requests beyond 30 a minute are refused");
    assert_eq!(limited.error(429, None).error, "rate_limited");

    // A failure report asking for a request the site may not open now is
    // still accepted (else the agent would send it again), without request.
    let a = flood
        .agent
        .post(
            paths::AGENT_FAILURES,
            &FailureReport {
                code: FailureCode::LanLinkDown,
                detail: "asks for a request".into(),
                terminal: None,
                open_request: true,
            },
        )
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(a.json::<FailureAccepted>().request, None);

    // Failure reports: 10 a minute are accepted, then 429.
    let mut accepted = 1;
    let mut refused = None;
    for i in 0..15 {
        let a = failure_report(&flood, &format!("report {i}")).await;
        if a.status == 429 {
            refused = Some(a);
            break;
        }
        assert_eq!(a.status, 201, "{}", a.body);
        accepted += 1;
    }
    let refused = refused.expect("failure reports beyond 10 a minute are refused");
    assert_eq!(refused.error(429, None).error, "rate_limited");
    assert_eq!(accepted, 10);

    // The other site still gets its address and its report stored.
    let a = calm
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["printer"]))
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let v: MaintenanceRequestView = a.json();
    assert!(v.terminals[0].nat_address.is_some());
    assert_eq!(failure_report(&calm, "its own").await.status, 201);
    server.stop().await;
}

/// A burst of failure reports wakes the consoles once, at the background
/// task's next tick, not once per report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_failure_reports_wake_the_consoles_together() {
    let db = TestDb::new(Backend::Sqlite);
    let mut settings = db.settings();
    // The background task ticks at start and then only every 30 s.
    settings.maintenance.expiry_check_ms = 30_000;
    settings.gateways.heartbeat_interval_ms = 30_000;
    settings.gateways.down_after_ms = 120_000;
    let server = TestServer::start(settings).await;
    let site = add_site(&server, "noisy", 1).await;
    let tech = technician(&server, &db, "tom", "correct horse").await;
    let before: ConsoleEvents = tech.get(paths::CONSOLE_EVENTS).await.json();
    for i in 0..6 {
        assert_eq!(
            failure_report(&site, &format!("burst {i}")).await.status,
            201
        );
    }
    let after: ConsoleEvents = tech.get(paths::CONSOLE_EVENTS).await.json();
    // The reports are stored (a read shows them) ...
    assert_eq!(after.failures.len(), 6);
    // ... but the six reports moved the feed's version by at most one tick's bump.
    assert!(
        after.version <= before.version + 1,
        "console version {} -> {}: every report woke the consoles",
        before.version,
        after.version
    );
    server.stop().await;
}

/// After a restart following an outage every heartbeat is old: no gateway
/// is marked down before one `down_after_ms` has passed since the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_restart_with_stale_heartbeats_keeps_gateways_up_for_a_grace_period() {
    let db = TestDb::new(Backend::Sqlite);
    let mut settings = db.settings();
    settings.gateways.down_after_ms = 20_000;
    let server = TestServer::start(settings.clone()).await;
    let gw = add_gateway(&server, "gw1", 10, 1).await;
    assert_eq!(
        gw.api
            .post(paths::GATEWAY_HEARTBEAT, &heartbeat(10))
            .await
            .status,
        200
    );
    server.stop().await;
    // The outage: the server (and its database) was away for an hour.
    db.scalar("UPDATE gateways SET last_heartbeat = last_heartbeat - 3600000 RETURNING 0")
        .await;
    let server = TestServer::start(settings).await;
    // Many failover ticks (every 100 ms) pass well inside the grace period.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        gateway_health(&server, gw.id).await,
        Health::Healthy,
        "marked down although the server only just started"
    );
    // The gateway reaches the restarted server and stays up.
    let gw_api = server.client(Some(&gw.credential));
    assert_eq!(
        gw_api
            .post(paths::GATEWAY_HEARTBEAT, &heartbeat(10))
            .await
            .status,
        200
    );
    assert_eq!(gateway_health(&server, gw.id).await, Health::Healthy);
    // Silent after that, it is marked down once the grace and its own
    // down_after_ms have passed.
    let mut down = false;
    for _ in 0..120 {
        if gateway_health(&server, gw.id).await == Health::Down {
            down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        down,
        "a silent gateway is still marked down after the grace"
    );
    server.stop().await;
}

/// A gateway dies and no other has a free slot: every stranded site's
/// document carries the problem and the console gets a report for each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_every_stranded_site_is_told() {
    let db = TestDb::new(Backend::Sqlite);
    let mut settings = db.settings();
    settings.gateways.down_after_ms = 1_500;
    let server = TestServer::start(settings).await;
    let gw1 = add_gateway(&server, "gw1", 10, 1).await;
    let mut sites = Vec::new();
    for i in 0..3u8 {
        let s = add_site(&server, &format!("site{i}"), 10 + i).await;
        let a = s
            .agent
            .post(paths::AGENT_REQUESTS, &new_request(&["pc"]))
            .await;
        assert_eq!(a.status, 201, "{}", a.body);
        assert_eq!(a.json::<MaintenanceRequestView>().gateway_id, Some(gw1.id));
        sites.push(s);
    }
    // The other gateway is full.
    let gw2 = add_gateway(&server, "gw2", 1, 2).await;
    let filler = add_site(&server, "filler", 20).await;
    let a = filler
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc"]))
        .await;
    assert_eq!(a.json::<MaintenanceRequestView>().gateway_id, Some(gw2.id));
    // gw2 keeps heartbeating; gw1 falls silent.
    let hb = tokio::spawn({
        let api = gw2.api.clone();
        async move {
            loop {
                let _ = api.post(paths::GATEWAY_HEARTBEAT, &heartbeat(1)).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    let mut told = vec![false; sites.len()];
    for _ in 0..120 {
        for (i, s) in sites.iter().enumerate() {
            let st = agent_state(s, 0, 0).await;
            told[i] = st.problem.is_some_and(|p| p.contains("no other gateway"));
        }
        if told.iter().all(|t| *t) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        told,
        vec![true; sites.len()],
        "not every stranded site was told"
    );
    let tech = technician(&server, &db, "tom", "correct horse").await;
    let failures: Vec<FailureView> = tech.get(paths::FAILURES).await.json();
    for s in &sites {
        assert!(
            failures
                .iter()
                .any(|f| f.site_id == s.id && f.code == FailureCode::TunnelDown),
            "the console has no report for site {}: {failures:?}",
            s.id
        );
    }
    // gw1 restarts: it registers before its first heartbeat, and that
    // already tells the sites they are no longer stranded.
    let reg = gw1
        .api
        .post(
            paths::GATEWAY_REGISTER,
            &GatewayRegistration {
                endpoints: vec!["203.0.113.1:51820".parse().unwrap()],
                public_key: key(201),
                tunnel_kinds: vec![TunnelKind::Wireguard],
                max_tunnels: 10,
                software_version: "test".into(),
                technician_prefixes: Vec::new(),
                tls: None,
                next_public_key: None,
            },
        )
        .await;
    assert_eq!(reg.status, 200, "{}", reg.body);
    for s in &sites {
        let st = agent_state(s, 0, 0).await;
        assert_eq!(st.problem, None, "site {} after gw1 registered", s.id);
    }
    for _ in 0..5 {
        let a = gw1.api.post(paths::GATEWAY_HEARTBEAT, &heartbeat(10)).await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    for s in &sites {
        let st = agent_state(s, 0, 0).await;
        assert_eq!(st.problem, None, "site {}", s.id);
    }
    hb.abort();
    server.stop().await;
}

/// PostgreSQL: `gateway/applied` reports racing maintenance requests being
/// opened and closed never end in a 500 (one lock order; a lost deadlock or
/// serialization race is retried).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn security_applied_reports_racing_requests_never_fail_on_postgres() {
    if !require_postgres() {
        return;
    }
    let db = TestDb::new(Backend::Postgres);
    let server = TestServer::start(db.settings()).await;
    let gw = add_gateway(&server, "gw1", 1000, 1).await;
    let mut sites = Vec::new();
    for i in 0..16u8 {
        sites.push(add_site(&server, &format!("site{i}"), 10 + i).await);
    }
    let failures = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut gateway_tasks = Vec::new();
    for _ in 0..4 {
        let api = gw.api.clone();
        let failures = failures.clone();
        let stop = stop.clone();
        gateway_tasks.push(tokio::spawn(async move {
            let mut version = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let doc = api
                    .get(&format!(
                        "{}?after={version}&wait_ms=200",
                        paths::GATEWAY_STATE
                    ))
                    .await;
                if doc.status != 200 {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("state {} {}", doc.status, doc.body));
                    continue;
                }
                let d: GatewayDesiredState = doc.json();
                version = d.version;
                let a = api
                    .post(
                        paths::GATEWAY_APPLIED,
                        &AppliedState {
                            version,
                            errors: vec![],
                        },
                    )
                    .await;
                if a.status.is_server_error() {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("applied {} {}", a.status, a.body));
                }
            }
        }));
    }
    let mut site_tasks = Vec::new();
    for s in sites {
        let failures = failures.clone();
        site_tasks.push(tokio::spawn(async move {
            for _ in 0..12 {
                let a = s
                    .agent
                    .post(paths::AGENT_REQUESTS, &new_request(&["pc", "router"]))
                    .await;
                if a.status != 201 {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("create {} {}", a.status, a.body));
                    continue;
                }
                let id = a.json::<MaintenanceRequestView>().id;
                let r = s.agent.post_empty(&at(paths::AGENT_REVOKE, id)).await;
                if r.status != 200 {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("revoke {} {}", r.status, r.body));
                }
            }
        }));
    }
    for t in site_tasks {
        t.await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in gateway_tasks {
        t.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed calls: {failures:?}",
        failures.len()
    );
    server.stop().await;
}

/// Failure reports are capped per site and both they and audit rows are
/// deleted after their retention; the database itself refuses to delete
/// audit rows younger than 30 days.
async fn security_failures_and_audit_rows_do_not_grow_without_bound(backend: Backend) {
    use maintenance_server::db::{Database, ops};
    use maintenance_server::notify::Notifier;
    use maintenance_server::settings::{Quotas, Retention};
    let db = TestDb::new(backend);
    let d = Database::connect(&db.url, 2).await.unwrap();
    let n = Notifier::default();
    let now = maintenance_server::db::now_ms();
    let policy = ops::Policy::new(&db.settings());
    let mut tx = d.begin().await.unwrap();
    let site = ops::create_site(&mut tx, "s", TunnelKind::Wireguard, "test", now, &policy)
        .await
        .unwrap()
        .site_id;
    tx.commit(&n).await.unwrap();
    let quotas = Quotas {
        failures_kept_per_site: 3,
        ..Quotas::default()
    };
    for i in 0..5 {
        let report = FailureReport {
            code: FailureCode::Other,
            detail: format!("r{i}"),
            terminal: None,
            open_request: false,
        };
        let mut tx = d.begin().await.unwrap();
        ops::store_failure(&mut tx, site, &report, now + i, &quotas)
            .await
            .unwrap();
        tx.commit(&n).await.unwrap();
    }
    assert_eq!(db.scalar("SELECT COUNT(*) FROM failures").await, 3);
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM failures WHERE detail = 'r4'")
            .await,
        1
    );
    // An audit row from long ago, and the young ones.
    let mut tx = d.begin().await.unwrap();
    tx.audit(1_000, "test", "ancient", "x", "").await.unwrap();
    tx.commit(&n).await.unwrap();
    let young = db
        .scalar("SELECT COUNT(*) FROM audit_log WHERE action <> 'ancient'")
        .await;
    assert!(young > 0);
    let mut tx = d.begin().await.unwrap();
    ops::apply_retention(
        &mut tx,
        now + 100 * 86_400_000,
        &Retention {
            failure_days: 90,
            audit_days: 400,
        },
    )
    .await
    .unwrap();
    tx.commit(&n).await.unwrap();
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM audit_log WHERE action = 'ancient'")
            .await,
        0
    );
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM audit_log").await,
        young,
        "young audit rows must stay"
    );
    // Failure reports past their 90 days went.
    assert_eq!(db.scalar("SELECT COUNT(*) FROM failures").await, 0);
    // Young audit rows cannot be deleted, whatever asks.
    let mut tx = d.begin().await.unwrap();
    let r = sqlx::query("DELETE FROM audit_log")
        .execute(&mut *tx.inner)
        .await;
    assert!(r.is_err(), "a young audit row was deleted");
    drop(tx);
    d.close().await;
}

mod retention {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn security_failures_and_audit_rows_do_not_grow_without_bound_sqlite() {
        security_failures_and_audit_rows_do_not_grow_without_bound(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn security_failures_and_audit_rows_do_not_grow_without_bound_postgres() {
        if require_postgres() {
            security_failures_and_audit_rows_do_not_grow_without_bound(Backend::Postgres).await;
        }
    }
}

/// PostgreSQL: a transaction that fails with a deadlock (40P01) or
/// serialization (40001) error is run again from the start; other errors
/// are returned at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_lost_races_are_run_again_on_postgres() {
    use std::sync::atomic::{AtomicU32, Ordering};

    use maintenance_server::db::{Database, DbError, Tx};
    use maintenance_server::notify::Notifier;
    if !require_postgres() {
        return;
    }
    let db = TestDb::new(Backend::Postgres);
    let d = Database::connect(&db.url, 2).await.unwrap();
    let n = Notifier::default();
    for code in ["40001", "40P01"] {
        let attempts = AtomicU32::new(0);
        let raise = format!("DO $$ BEGIN RAISE EXCEPTION 'lost' USING ERRCODE = '{code}'; END $$");
        let r = d
            .transaction(&n, async |tx: &mut Tx| {
                if attempts.fetch_add(1, Ordering::Relaxed) < 2 {
                    sqlx::query(&raise).execute(&mut *tx.inner).await?;
                }
                tx.audit(1, "test", "retried", code, "").await?;
                Ok::<_, DbError>(())
            })
            .await;
        assert!(r.is_ok(), "{code}: {r:?}");
        assert_eq!(attempts.load(Ordering::Relaxed), 3, "{code}");
    }
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM audit_log WHERE action = 'retried'")
            .await,
        2
    );
    // Any other error: no second attempt.
    let attempts = AtomicU32::new(0);
    let r = d
        .transaction(&n, async |tx: &mut Tx| {
            attempts.fetch_add(1, Ordering::Relaxed);
            sqlx::query("SELECT * FROM no_such_table")
                .execute(&mut *tx.inner)
                .await?;
            Ok::<_, DbError>(())
        })
        .await;
    assert!(r.is_err());
    assert_eq!(attempts.load(Ordering::Relaxed), 1);
    d.close().await;
}

/// The server program, its base URL and its log lines; killed on drop.
struct ServerProcess {
    child: std::process::Child,
    base: String,
    lines: std::sync::mpsc::Receiver<String>,
}

impl ServerProcess {
    fn start(config: &std::path::Path) -> Self {
        use std::io::BufRead as _;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_maintenance-server"))
            .arg("--config")
            .arg(config)
            .arg("serve")
            .env("RUST_LOG", "info")
            .env_remove("VPNNAT_DATABASE__URL")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut base = None;
        while base.is_none() {
            let line = lines
                .recv_timeout(Duration::from_secs(60))
                .expect("the server announces its address");
            if let Some(addr) = line.split("listening addr=").nth(1) {
                base = Some(format!(
                    "http://{}",
                    addr.split_whitespace().next().unwrap()
                ));
            }
        }
        Self {
            child,
            base: base.unwrap(),
            lines,
        }
    }

    /// Waits (up to 60 s) for a log line containing `needle`.
    fn wait_for_line(&self, needle: &str) -> Option<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return Some(l),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Holding `pool.usage_warn_percent` of the pool logs a WARN naming the
/// counts; `/metrics` has the used and free addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_pool_usage_over_the_threshold_is_logged() {
    let db = TestDb::new(Backend::Sqlite);
    let settings = db.settings();
    let config = db.dir.path().join("server.toml");
    // A /29: six addresses; warn at half of them.
    std::fs::write(
        &config,
        format!(
            "[http]\nlisten = \"127.0.0.1:0\"\n[state]\ndir = \"{}\"\n[database]\nurl = \"{}\"\n\
             [operator]\ntoken = \"{}\"\n[pool]\nprefix = \"10.99.0.0/29\"\nusage_warn_percent = 50\n",
            settings.state.dir.display(),
            db.url,
            settings.operator.token
        ),
    )
    .unwrap();
    let server = ServerProcess::start(&config);
    let op = Api::new(
        &server.base,
        Some(&settings.operator.token),
        Duration::from_secs(30),
    );
    let gw: GatewayCreated = op
        .post(paths::GATEWAYS, &NewGateway { name: "gw1".into() })
        .await
        .json();
    let reg = Api::new(&server.base, Some(&gw.credential), Duration::from_secs(30))
        .post(
            paths::GATEWAY_REGISTER,
            &GatewayRegistration {
                endpoints: vec!["203.0.113.1:51820".parse().unwrap()],
                public_key: key(201),
                tunnel_kinds: vec![TunnelKind::Wireguard],
                max_tunnels: 10,
                software_version: "test".into(),
                technician_prefixes: Vec::new(),
                tls: None,
                next_public_key: None,
            },
        )
        .await;
    assert_eq!(reg.status, 200, "{}", reg.body);
    let created: SiteCreated = op
        .post(
            paths::SITES,
            &NewSite {
                name: "s".into(),
                tunnel: TunnelKind::Wireguard,
                ..Default::default()
            },
        )
        .await
        .json();
    let enrolled: EnrollResponse = Api::new(&server.base, None, Duration::from_secs(30))
        .post(
            paths::ENROLL,
            &EnrollRequest {
                token: created.enrollment_token,
                public_key: key(1),
            },
        )
        .await
        .json();
    let agent = Api::new(
        &server.base,
        Some(&enrolled.credential),
        Duration::from_secs(30),
    );
    let a = agent
        .post(paths::AGENT_REQUESTS, &new_request(&["a", "b", "c", "d"]))
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let line = tokio::task::spawn_blocking(move || {
        let l = server.wait_for_line("pool usage reached");
        (server, l)
    })
    .await
    .unwrap();
    let (server, line) = line;
    let line = line.expect("no WARN about the pool's usage");
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains("used=4") && line.contains("total=6"),
        "{line}"
    );
    let m = op.get(paths::METRICS).await;
    let text = m.body.as_str().unwrap_or_default().to_owned();
    assert!(
        text.lines()
            .any(|l| l == "vpnnat_pool_addresses{use=\"used\"} 4"),
        "{text}"
    );
    drop(server);
}
