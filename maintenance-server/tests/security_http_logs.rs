//! What the server logs and queries, seen by a tracing subscriber in this
//! test process: an intended 503 is not an ERROR, and a `/metrics` scrape
//! runs no query that scans a table growing with use (each statement sqlx
//! logs is run through SQLite's `EXPLAIN QUERY PLAN`).
//!
//! The subscriber is global (the SQLite driver logs from its own threads),
//! so the tests of this file run one at a time.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Mutex, Once};
use std::time::Duration;

use common::*;
use sqlx::Row as _;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::{Layer, Registry};
use vpnnat::messages::*;

/// One captured event.
#[derive(Debug, Clone)]
struct Captured {
    level: Level,
    target: String,
    fields: Vec<(String, String)>,
}

impl Captured {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

static EVENTS: Mutex<Vec<Captured>> = Mutex::new(Vec::new());
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Capture;

#[derive(Default)]
struct Fields(Vec<(String, String)>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
}

impl<S: Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() > Level::DEBUG {
            return;
        }
        let mut f = Fields::default();
        event.record(&mut f);
        EVENTS.lock().unwrap().push(Captured {
            level: *meta.level(),
            target: meta.target().to_owned(),
            fields: f.0,
        });
    }
}

fn capture() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        tracing::subscriber::set_global_default(Registry::default().with(Capture)).unwrap();
    });
}

/// The events captured while `f` runs.
async fn during<T>(f: impl Future<Output = T>) -> (T, Vec<Captured>) {
    EVENTS.lock().unwrap().clear();
    let out = f.await;
    // Anything a worker thread logs after the answer arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    (out, std::mem::take(&mut *EVENTS.lock().unwrap()))
}

/// Settings whose background tasks stay quiet during a test.
fn quiet(db: &TestDb) -> maintenance_server::settings::Settings {
    let mut s = db.settings();
    s.maintenance.expiry_check_ms = 3_600_000;
    s.gateways.heartbeat_interval_ms = 1_800_000;
    s.gateways.down_after_ms = 3_600_000;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_http_an_intended_503_is_not_logged_as_an_error() {
    let _one = ONE_AT_A_TIME.lock().await;
    capture();
    let db = TestDb::new(Backend::Sqlite);
    let server = TestServer::start(quiet(&db)).await;
    let site = add_site(&server, "A", 1).await;
    let tech = technician(&server, &db, "alice", "correct horse").await;

    // No gateway: no capacity, a normal refusal.
    let (refused, events) = during(
        site.agent
            .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"])),
    )
    .await;
    assert_eq!(refused.error(503, None).error, "no_capacity");
    let errors: Vec<&Captured> = events.iter().filter(|e| e.level == Level::ERROR).collect();
    assert!(errors.is_empty(), "logged at ERROR: {errors:?}");
    assert!(
        events
            .iter()
            .any(|e| e.level == Level::WARN && e.field("status") == Some("503")),
        "the refusal is logged at WARN: {events:?}"
    );

    // A real failure stays an ERROR.
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&db.url).await.unwrap();
    sqlx::query("ALTER TABLE failures RENAME TO failures_gone")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let (failed, events) = during(tech.get(paths::FAILURES)).await;
    failed.error(500, None);
    assert!(
        events
            .iter()
            .any(|e| e.level == Level::ERROR && e.field("status") == Some("500")),
        "the 500 is logged at ERROR: {events:?}"
    );
    server.stop().await;
}

/// Tables that grow with use (requests, pool addresses, reports, logs),
/// which a scrape must never scan. `sites` and `gateways` are created by
/// the operator by hand and stay small.
const GROWING: &[&str] = &[
    "requests",
    "request_terminals",
    "nat_addresses",
    "failures",
    "audit_log",
    "technician_sessions",
    "enrollment_tokens",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_http_a_metrics_scrape_scans_no_growing_table() {
    let _one = ONE_AT_A_TIME.lock().await;
    capture();
    let db = TestDb::new(Backend::Sqlite);
    let server = TestServer::start(quiet(&db)).await;
    let gw = add_gateway(&server, "gw1", 10, 1).await;
    gw.api.post(paths::GATEWAY_HEARTBEAT, &heartbeat(10)).await;
    let site = add_site(&server, "A", 1).await;
    let created = site
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1", "pc-2"]))
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (scrape, events) = during(server.operator().get(paths::METRICS)).await;
    assert_eq!(scrape.status, 200, "{}", scrape.body);
    let text = scrape.body.as_str().unwrap();
    assert!(
        text.contains("vpnnat_pool_addresses{use=\"used\"} 2"),
        "{text}"
    );
    let statements: Vec<String> = events
        .iter()
        .filter(|e| e.target == "sqlx::query")
        .filter_map(|e| {
            let full = e.field("db.statement").unwrap_or_default().trim();
            let sql = if full.is_empty() {
                e.field("summary")?.trim()
            } else {
                full
            };
            Some(sql.to_owned())
        })
        .filter(|sql| sql.to_ascii_uppercase().starts_with("SELECT"))
        .collect();
    assert!(
        statements.iter().any(|s| s.contains("requests")),
        "the scrape's queries were not captured: {statements:?}"
    );

    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&db.url).await.unwrap();
    let mut scans = Vec::new();
    for sql in &statements {
        let params = (1..=20).filter(|n| sql.contains(&format!("${n}"))).count();
        let explain = format!("EXPLAIN QUERY PLAN {sql}");
        let mut q = sqlx::query(&explain);
        for _ in 0..params {
            q = q.bind(0_i64);
        }
        for row in q.fetch_all(&pool).await.unwrap() {
            let detail: String = row.get("detail");
            let scanned = detail
                .strip_prefix("SCAN ")
                .and_then(|rest| rest.split_whitespace().next());
            if let Some(table) = scanned
                && GROWING.contains(&table)
            {
                scans.push(format!("{detail}  ←  {sql}"));
            }
        }
    }
    pool.close().await;
    assert!(
        scans.is_empty(),
        "a scrape scans whole tables:\n{}",
        scans.join("\n")
    );
    server.stop().await;
}
