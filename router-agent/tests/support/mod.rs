//! Harness of the router-agent's own tests: the real maintenance server
//! in-process on `127.0.0.1:0` (a temporary SQLite file), a gateway that only
//! registers and heartbeats through the API (so that the server accepts
//! requests), and the real `router-agent` binary in netstack mode on
//! loopback. Everything talks to loopback only.
#![allow(dead_code, clippy::unwrap_used, clippy::print_stdout)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use maintenance_server::settings::Settings;
use serde_json::Value;
use vpnnat::messages::{
    GatewayCreated, GatewayHeartbeat, GatewayRegistration, Health, Login, LoginResponse,
    MaintenanceRequestView, NewGateway, NewSite, PublicKey, SiteCreated, TunnelKind, paths,
};
use vpnnat_test_support::server::InProcessServer;

/// The page password of every test agent.
pub const PASSWORD: &str = "test page password";

/// The real maintenance server, in-process.
pub struct Center {
    pub base: String,
    pub operator: String,
    pub dir: tempfile::TempDir,
    pub db_url: String,
    http: reqwest::Client,
    server: InProcessServer,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Center {
    fn drop(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
    }
}

impl Center {
    /// Starts the server; `max_duration_s` bounds each request's lifetime.
    pub async fn start(max_duration_s: u64) -> Self {
        Self::start_with(max_duration_s, 60_000).await
    }

    /// Like [`Self::start`], marking a gateway down after `down_after_ms`
    /// without heartbeats.
    pub async fn start_with(max_duration_s: u64, down_after_ms: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db_url = format!("sqlite://{}", dir.path().join("server.db").display());
        let mut s = Settings::default();
        s.state.dir = dir.path().join("state");
        s.database.url = db_url.clone();
        s.operator.token = maintenance_server::auth::Secret::generate(
            maintenance_server::auth::SecretKind::Operator,
        )
        .expose()
        .to_owned();
        s.gateways.heartbeat_interval_ms = 200;
        s.gateways.down_after_ms = down_after_ms;
        s.gateways.persistent_keepalive_s = 5;
        s.maintenance.expiry_check_ms = 100;
        s.maintenance.max_duration_s = max_duration_s;
        let operator = s.operator.token.clone();
        let server = InProcessServer::start(s).await;
        Self {
            base: server.base.clone(),
            operator,
            dir,
            db_url,
            http: reqwest::Client::new(),
            server,
            heartbeat: None,
        }
    }

    /// Stops the API gateway's heartbeats (the gateway is gone).
    pub fn stop_gateway(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
    }

    /// Stops the server (the agent then finds it unreachable).
    pub async fn stop(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        let _ = self.server.stop().await;
    }

    async fn operator_post<T: serde::Serialize>(&self, path: &str, body: &T) -> Value {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.operator)
            .json(body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.json().await.unwrap()
    }

    /// A new site and its one-time enrollment token.
    pub async fn add_site(&self, name: &str) -> SiteCreated {
        let v = self
            .operator_post(
                paths::SITES,
                &NewSite {
                    name: name.into(),
                    tunnel: TunnelKind::Wireguard,
                    ..Default::default()
                },
            )
            .await;
        serde_json::from_value(v).unwrap()
    }

    /// A gateway that registers with `endpoint` and keeps heartbeating (no
    /// data plane: enough for the server to accept requests).
    pub async fn add_api_gateway(&mut self, endpoint: SocketAddr, key: PublicKey) {
        let v = self
            .operator_post(paths::GATEWAYS, &NewGateway { name: "gw1".into() })
            .await;
        let created: GatewayCreated = serde_json::from_value(v).unwrap();
        let r = self
            .http
            .post(format!("{}{}", self.base, paths::GATEWAY_REGISTER))
            .bearer_auth(&created.credential)
            .json(&GatewayRegistration {
                endpoints: vec![endpoint],
                public_key: key,
                tunnel_kinds: vec![TunnelKind::Wireguard],
                max_tunnels: 10,
                software_version: "test".into(),
                technician_prefixes: Vec::new(),
                tls: None,
                next_public_key: None,
            })
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "register: {}", r.status());
        let http = self.http.clone();
        let base = self.base.clone();
        let cred = created.credential.clone();
        // Heartbeats, and reports every new document as applied the way a
        // real gateway does (the server announces a site's tunnel to its
        // agent only once the gateway holds the peer).
        self.heartbeat = Some(tokio::spawn(async move {
            let mut applied = 0;
            loop {
                let _ = http
                    .post(format!("{base}{}", paths::GATEWAY_HEARTBEAT))
                    .bearer_auth(&cred)
                    .json(&GatewayHeartbeat {
                        max_tunnels: 10,
                        active_tunnels: 0,
                        health: Health::Healthy,
                        applied_version: applied,
                        peers: vec![],
                        public_key: None,
                        next_public_key: None,
                    })
                    .send()
                    .await;
                let state = http
                    .get(format!(
                        "{base}{}?after={applied}&wait_ms=200",
                        paths::GATEWAY_STATE
                    ))
                    .bearer_auth(&cred)
                    .send()
                    .await;
                let doc = match state {
                    Ok(r) => r.json::<vpnnat::messages::GatewayDesiredState>().await.ok(),
                    Err(_) => None,
                };
                match doc {
                    Some(d) if d.version > applied => {
                        applied = d.version;
                        let _ = http
                            .post(format!("{base}{}", paths::GATEWAY_APPLIED))
                            .bearer_auth(&cred)
                            .json(&vpnnat::messages::AppliedState {
                                version: applied,
                                errors: vec![],
                            })
                            .send()
                            .await;
                    }
                    Some(_) => {}
                    None => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }));
    }

    /// Creates a technician directly in the database (as `maintenance-server
    /// technician add` does) and logs in; returns the technician's requests.
    pub async fn technician_requests(&self) -> Vec<MaintenanceRequestView> {
        let db = maintenance_server::db::Database::connect(&self.db_url, 2)
            .await
            .unwrap();
        let hash = maintenance_server::auth::hash_password("tech password").unwrap();
        let mut tx = db.begin().await.unwrap();
        maintenance_server::db::ops::upsert_technician(&mut tx, "alice", &hash, "test", 1)
            .await
            .unwrap();
        tx.commit(&maintenance_server::notify::Notifier::default())
            .await
            .unwrap();
        let r = self
            .http
            .post(format!("{}{}", self.base, paths::LOGIN))
            .json(&Login {
                name: "alice".into(),
                password: "tech password".into(),
            })
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        let cookie = r
            .headers()
            .get("set-cookie")
            .unwrap()
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned();
        let _: LoginResponse = r.json().await.unwrap();
        self.http
            .get(format!("{}{}", self.base, paths::REQUESTS))
            .header("cookie", cookie)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

/// A free TCP port on loopback (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `router-agent` binary, its configuration and (when started) its process.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub web: SocketAddr,
    child: Option<Child>,
    http: reqwest::Client,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_router-agent")
}

impl Agent {
    /// A netstack agent on loopback whose terminal `pc-1` is 127.0.0.1
    /// (checked with a TCP connect to `pc_port`).
    pub fn new(pc_port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let web: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = dir.path().join("router-agent.toml");
        let text = format!(
            "[agent]\nidentity_file = \"{id}\"\nstate_dir = \"{state}\"\nmode = \"netstack\"\n\
             [server]\npoll_wait_ms = 20000\n\
             [lan]\ninterface = \"\"\nallowed_prefixes = [\"127.0.0.0/8\"]\ndns = false\n\
             [web]\nlisten = \"{web}\"\npassword = \"{PASSWORD}\"\n\
             [[terminals]]\nname = \"pc-1\"\naddress = \"127.0.0.1\"\ndescription = \"Office PC\"\ncheck = \"tcp:{pc_port}\"\n\
             [failures]\nlink_watch = false\n",
            id = dir.path().join("agent.identity").display(),
            state = dir.path().join("state").display(),
        );
        std::fs::write(&config, text).unwrap();
        Self {
            dir,
            config,
            web,
            child: None,
            http: reqwest::Client::new(),
        }
    }

    /// Runs `router-agent --config … ARGS` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs `router-agent enroll --server SERVER --token TOKEN` (and
    /// `--force`) to completion.
    pub fn enroll(&self, server: &str, token: &str, force: bool) -> Output {
        let mut args = vec!["enroll", "--server", server, "--token", token];
        if force {
            args.push("--force");
        }
        self.run(&args)
    }

    pub fn identity_path(&self) -> PathBuf {
        self.dir.path().join("agent.identity")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the agent and waits for its page.
    pub async fn start(&mut self) {
        for _ in 0..5 {
            if self.try_start().await {
                return;
            }
            // Another test took the web port between `free_port` and the
            // agent's bind: move to another one.
            let web: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let text = std::fs::read_to_string(&self.config).unwrap().replace(
                &format!("listen = \"{}\"", self.web),
                &format!("listen = \"{web}\""),
            );
            std::fs::write(&self.config, text).unwrap();
            self.web = web;
        }
        panic!("the agent's web port was taken five times:\n{}", self.log());
    }

    /// One start; `false` when the agent found its web port taken.
    async fn try_start(&mut self) -> bool {
        let log = std::fs::File::create(self.log_path()).unwrap();
        let child = Command::new(bin())
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info,vpnnat=debug,router_agent=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        for _ in 0..400 {
            if self
                .http
                .get(format!("http://{}/healthz", self.web))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return true;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                let log = self.log();
                if log.contains("binding web.listen") && log.contains("Address already in use") {
                    return false;
                }
                panic!("the agent exited ({status}):\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the agent's page did not come up:\n{}", self.log());
    }

    /// Stops the agent with SIGTERM (clean shutdown) or SIGKILL.
    pub fn stop(&mut self, kill: bool) {
        if let Some(mut c) = self.child.take() {
            if kill {
                let _ = c.kill();
            } else {
                let _ = Command::new("kill")
                    .args(["-TERM", &c.id().to_string()])
                    .status();
            }
            let _ = c.wait();
        }
    }

    /// A JSON API call with the password as bearer token.
    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("http://{}{path}", self.web))
            .bearer_auth(PASSWORD);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// `GET /api/status`.
    pub async fn status(&self) -> Value {
        let (code, v) = self.api(reqwest::Method::GET, "/api/status", None).await;
        assert_eq!(code, 200, "{v}");
        v
    }

    /// Waits until `check(status)` holds; panics with the agent log after `timeout`.
    pub async fn wait_status(&self, what: &str, timeout: Duration, check: impl Fn(&Value) -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let s = self.status().await;
            if check(&s) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {s}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A TCP listener standing in for the LAN PC (accepts and closes).
pub async fn pc() -> (u16, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            drop(s);
        }
    });
    (port, task)
}

/// An enrolled agent at a center with a (registered, heartbeating) gateway.
pub async fn enrolled(center: &mut Center, pc_port: u16) -> Agent {
    let agent = Agent::new(pc_port);
    let site = center.add_site("Bakery Schmidt").await;
    // The agent dials this (a UDP socket nobody answers on loopback: no data
    // plane is needed to exercise the control plane and the page).
    let gw_key = vpnnat::tunnel::PrivateKey::from_bytes([7; 32]).public_key();
    center
        .add_api_gateway(
            format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            gw_key,
        )
        .await;
    let out = agent.enroll(&center.base, &site.enrollment_token, false);
    assert!(
        out.status.success(),
        "enroll: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent
}

/// The request body the page sends.
pub fn request_body(terminals: &[&str]) -> Value {
    serde_json::json!({
        "requester_name": "Anna Schmidt",
        "level": "administrator",
        "urgency": "high",
        "phone": "+49 30 1234 567",
        "content": "The till does not print receipts.",
        "terminals": terminals,
    })
}

/// Whether `path` exists with exactly mode `mode`.
pub fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}
