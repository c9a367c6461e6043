//! Harness of the maintenance-server tests: prerequisites, a fresh database
//! per test (a temporary SQLite file, or `CREATE DATABASE test_<unique>` on
//! the local PostgreSQL, dropped afterwards), the server run in-process on
//! `127.0.0.1:0`, and small API clients. Everything talks to loopback only.
#![allow(dead_code, clippy::unwrap_used, clippy::print_stdout)]

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use maintenance_server::auth::{Secret, SecretKind};
use maintenance_server::settings::Settings;
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::Row as _;
use vpnnat::messages::*;
use vpnnat_test_support::server::InProcessServer;
use vpnnat_test_support::{Prereq, require};

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Generates `NAME_sqlite` and `NAME_postgres` tests from `async fn NAME(Backend)`.
#[macro_export]
macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await;
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if $crate::common::require_postgres() {
                        super::$name($crate::common::Backend::Postgres).await;
                    }
                }
            )*
        }
    };
}

/// Whether PostgreSQL is there. Outside CI a missing one skips with a
/// one-line reason; with `CI` set it fails the test.
pub fn require_postgres() -> bool {
    require(&[Prereq::Postgres])
}

/// Whether a program is on PATH (same CI rule as above).
pub fn require_program(name: &'static str) -> bool {
    require(&[Prereq::Program(name)])
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this test process.
pub fn unique(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{tag}_{}_{n}", std::process::id())
}

pub const PG_ADMIN: &str = "postgres://postgres:postgres@localhost:5432/postgres";

/// A database for one test; removed on drop.
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    pub dir: tempfile::TempDir,
    pg_name: Option<String>,
}

impl TestDb {
    pub fn new(backend: Backend) -> Self {
        let dir = tempfile::tempdir().unwrap();
        match backend {
            Backend::Sqlite => {
                let url = format!("sqlite://{}", dir.path().join("server.db").display());
                Self {
                    backend,
                    url,
                    dir,
                    pg_name: None,
                }
            }
            Backend::Postgres => {
                let name = unique("test");
                psql(&format!("CREATE DATABASE {name}"));
                Self {
                    backend,
                    url: format!("postgres://postgres:postgres@localhost:5432/{name}"),
                    dir,
                    pg_name: Some(name),
                }
            }
        }
    }

    /// Settings for a server on this database, tuned for fast tests.
    pub fn settings(&self) -> Settings {
        let mut s = Settings::default();
        s.state.dir = self.dir.path().join("state");
        s.database.url = self.url.clone();
        s.database.max_connections = 8;
        s.operator.token = Secret::generate(SecretKind::Operator).expose().to_owned();
        s.gateways.heartbeat_interval_ms = 200;
        s.gateways.down_after_ms = 60_000;
        s.maintenance.expiry_check_ms = 100;
        s
    }

    /// A fingerprint of everything stored: row counts, versions, the console
    /// counter. Equal fingerprints mean nothing changed.
    pub async fn fingerprint(&self) -> Vec<i64> {
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(&self.url).await.unwrap();
        let mut out = Vec::new();
        for q in [
            "SELECT COUNT(*) FROM sites",
            "SELECT COALESCE(MAX(version), 0) + COUNT(*) * 1000 FROM sites",
            "SELECT COUNT(*) FROM sites WHERE credential_hash IS NOT NULL",
            "SELECT COUNT(*) FROM enrollment_tokens WHERE used_at IS NULL",
            "SELECT COUNT(*) FROM gateways",
            "SELECT COALESCE(MAX(version), 0) FROM gateways",
            "SELECT COUNT(*) FROM gateways WHERE drain = 1",
            "SELECT COUNT(*) FROM tunnels",
            "SELECT COUNT(*) FROM nat_addresses WHERE site_id IS NOT NULL",
            "SELECT COUNT(*) FROM requests",
            "SELECT COUNT(*) FROM requests WHERE state = 'waiting'",
            "SELECT COUNT(*) FROM failures",
            "SELECT COUNT(*) FROM technician_sessions",
            "SELECT COUNT(*) FROM audit_log",
            "SELECT value FROM counters WHERE name = 'console'",
        ] {
            let v: i64 = sqlx::query(q).fetch_one(&pool).await.unwrap().get(0);
            out.push(v);
        }
        // Versions of every site and gateway.
        for q in [
            "SELECT id, version FROM sites ORDER BY id",
            "SELECT id, version FROM gateways ORDER BY id",
        ] {
            for r in sqlx::query(q).fetch_all(&pool).await.unwrap() {
                out.push(r.get::<i64, _>(0));
                out.push(r.get::<i64, _>(1));
            }
        }
        pool.close().await;
        out
    }

    /// Runs one scalar query.
    pub async fn scalar(&self, q: &str) -> i64 {
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(&self.url).await.unwrap();
        let v: i64 = sqlx::query(q).fetch_one(&pool).await.unwrap().get(0);
        pool.close().await;
        v
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(name) = &self.pg_name {
            psql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
        }
    }
}

fn psql(sql: &str) {
    let out = Command::new("psql")
        .args([PG_ADMIN, "-qAtc", sql])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A server running in this test's runtime (stopped on drop).
pub struct TestServer {
    pub addr: SocketAddr,
    pub base: String,
    pub operator: String,
    server: InProcessServer,
}

impl TestServer {
    pub async fn start(settings: Settings) -> Self {
        let operator = settings.operator.token.clone();
        let server = InProcessServer::start(settings).await;
        Self {
            addr: server.addr,
            base: server.base.clone(),
            operator,
            server,
        }
    }

    /// [`Self::start`] on `addr` (where a stopped server listened).
    pub async fn start_at(settings: Settings, addr: SocketAddr) -> Self {
        let operator = settings.operator.token.clone();
        let server = InProcessServer::start_at(settings, addr).await;
        Self {
            addr: server.addr,
            base: server.base.clone(),
            operator,
            server,
        }
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        self.server.stop().await.expect("server stops");
    }

    pub fn client(&self, bearer: Option<&str>) -> Api {
        Api::new(&self.base, bearer, Duration::from_secs(90))
    }

    pub fn operator(&self) -> Api {
        self.client(Some(&self.operator))
    }
}

/// A tiny API client.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    pub bearer: Option<String>,
    pub cookie: Option<String>,
    pub csrf: Option<String>,
}

/// A raw answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Answer {
    pub fn json<T: DeserializeOwned>(&self) -> T {
        serde_json::from_value(self.body.clone())
            .unwrap_or_else(|e| panic!("{e}: {} {}", self.status, self.body))
    }

    /// Asserts a JSON `ApiError` with this status (and field).
    pub fn error(&self, status: u16, field: Option<&str>) -> ApiError {
        assert_eq!(self.status.as_u16(), status, "{}", self.body);
        let e: ApiError = self.json();
        if let Some(f) = field {
            assert_eq!(e.field.as_deref(), Some(f), "{}", self.body);
        }
        e
    }
}

impl Api {
    /// A client of `base` with a `timeout` per call.
    pub fn new(base: &str, bearer: Option<&str>, timeout: Duration) -> Self {
        Self {
            http: reqwest::Client::builder().timeout(timeout).build().unwrap(),
            base: base.to_owned(),
            bearer: bearer.map(str::to_owned),
            cookie: None,
            csrf: None,
        }
    }

    pub async fn raw(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Answer {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = &self.bearer {
            req = req.bearer_auth(b);
        }
        if let Some(c) = &self.cookie {
            req = req.header("cookie", c);
        }
        if let Some(c) = &self.csrf {
            req = req.header("x-csrf-token", c);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Answer {
            status,
            body,
            headers,
        }
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.raw(Method::GET, path, None).await
    }

    pub async fn post<T: Serialize>(&self, path: &str, body: &T) -> Answer {
        self.raw(Method::POST, path, Some(serde_json::to_vec(body).unwrap()))
            .await
    }

    pub async fn post_empty(&self, path: &str) -> Answer {
        self.raw(Method::POST, path, None).await
    }

    pub fn with_bearer(&self, b: &str) -> Self {
        let mut a = self.clone();
        a.bearer = Some(b.to_owned());
        a
    }
}

/// `{id}` in a path.
pub fn at(path: &str, id: impl std::fmt::Display) -> String {
    path.replace("{id}", &id.to_string())
}

pub fn key(b: u8) -> PublicKey {
    PublicKey([b; 32])
}

pub fn names(list: &[&str]) -> Vec<TerminalName> {
    list.iter()
        .map(|n| TerminalName::new(*n).unwrap())
        .collect()
}

pub fn new_request(terminals: &[&str]) -> NewMaintenanceRequest {
    NewMaintenanceRequest {
        requester_name: "A. Schmidt".into(),
        level: Level::Administrator,
        urgency: Urgency::High,
        phone: "+49 30 1234".into(),
        content: "the printer is offline".into(),
        terminals: names(terminals),
    }
}

/// An enrolled site: its id and an agent client.
#[derive(Clone)]
pub struct Site {
    pub id: SiteId,
    pub agent: Api,
    pub credential: String,
}

pub async fn add_site(server: &TestServer, name: &str, key_byte: u8) -> Site {
    let created: SiteCreated = server
        .operator()
        .post(
            paths::SITES,
            &NewSite {
                name: name.into(),
                tunnel: TunnelKind::Wireguard,
                ..Default::default()
            },
        )
        .await
        .json();
    let enrolled: EnrollResponse = server
        .client(None)
        .post(
            paths::ENROLL,
            &EnrollRequest {
                token: created.enrollment_token,
                public_key: key(key_byte),
            },
        )
        .await
        .json();
    assert_eq!(enrolled.site_id, created.site_id);
    Site {
        id: enrolled.site_id,
        agent: server.client(Some(&enrolled.credential)),
        credential: enrolled.credential,
    }
}

/// A registered gateway: its id and a client.
pub struct Gw {
    pub id: GatewayId,
    pub api: Api,
    pub credential: String,
}

pub async fn add_gateway(server: &TestServer, name: &str, max_tunnels: u32, n: u8) -> Gw {
    let created: GatewayCreated = server
        .operator()
        .post(paths::GATEWAYS, &NewGateway { name: name.into() })
        .await
        .json();
    let api = server.client(Some(&created.credential));
    let reg: GatewayRegistered = api
        .post(
            paths::GATEWAY_REGISTER,
            &GatewayRegistration {
                endpoints: vec![format!("203.0.113.{n}:51820").parse().unwrap()],
                public_key: key(200 + n),
                tunnel_kinds: vec![TunnelKind::Wireguard],
                max_tunnels,
                software_version: "test".into(),
                technician_prefixes: Vec::new(),
                tls: None,
                next_public_key: None,
            },
        )
        .await
        .json();
    assert_eq!(reg.gateway_id, created.gateway_id);
    Gw {
        id: created.gateway_id,
        api,
        credential: created.credential,
    }
}

pub fn heartbeat(max_tunnels: u32) -> GatewayHeartbeat {
    GatewayHeartbeat {
        max_tunnels,
        active_tunnels: 0,
        health: Health::Healthy,
        applied_version: 0,
        peers: vec![],
        public_key: None,
        next_public_key: None,
    }
}

/// Logs a technician in (after creating it directly in the database).
pub async fn technician(server: &TestServer, db: &TestDb, name: &str, password: &str) -> Api {
    add_technician(db, name, password).await;
    login(server, name, password).await
}

pub async fn add_technician(db: &TestDb, name: &str, password: &str) {
    let mut s = Settings::default();
    s.database.url = db.url.clone();
    s.state.dir = db.dir.path().join("state");
    let d = maintenance_server::db::Database::connect(&db.url, 2)
        .await
        .unwrap();
    let hash = maintenance_server::auth::hash_password(password).unwrap();
    let mut tx = d.begin().await.unwrap();
    maintenance_server::db::ops::upsert_technician(&mut tx, name, &hash, "test", 1)
        .await
        .unwrap();
    tx.commit(&maintenance_server::notify::Notifier::default())
        .await
        .unwrap();
}

pub async fn login(server: &TestServer, name: &str, password: &str) -> Api {
    let mut api = server.client(None);
    let a = api
        .post(
            paths::LOGIN,
            &Login {
                name: name.into(),
                password: password.into(),
            },
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let cookie = a.headers.get("set-cookie").unwrap().to_str().unwrap();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    api.cookie = Some(cookie.split(';').next().unwrap().to_owned());
    let r: LoginResponse = a.json();
    api.csrf = Some(r.csrf_token);
    api
}

pub async fn agent_state(site: &Site, after: u64, wait_ms: u64) -> AgentDesiredState {
    site.agent
        .get(&format!(
            "{}?after={after}&wait_ms={wait_ms}",
            paths::AGENT_STATE
        ))
        .await
        .json()
}

/// An agent's long-poll for a document newer than `after`, held in the
/// background while the test changes something (up to `wait_ms`).
pub fn spawn_agent_poll(
    site: &Site,
    after: u64,
    wait_ms: u64,
) -> tokio::task::JoinHandle<AgentDesiredState> {
    let site = site.clone();
    tokio::spawn(async move { agent_state(&site, after, wait_ms).await })
}

/// The gateway reports that it applied its current document (as a real
/// gateway does after reconciling); returns that document's version.
pub async fn report_applied(gw: &Gw) -> u64 {
    let version = gateway_state(gw, 0, 0).await.version;
    let r = gw
        .api
        .post(
            paths::GATEWAY_APPLIED,
            &vpnnat::messages::AppliedState {
                version,
                errors: vec![],
            },
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    version
}

pub async fn gateway_state(gw: &Gw, after: u64, wait_ms: u64) -> GatewayDesiredState {
    gw.api
        .get(&format!(
            "{}?after={after}&wait_ms={wait_ms}",
            paths::GATEWAY_STATE
        ))
        .await
        .json()
}
