//! The binary: its subcommands work directly on the database (both
//! backends), bad configuration is one line naming the file and key, the
//! served API matches its OpenAPI document, and HTTPS when `[tls]` is set.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::*;
use reqwest::Method;
use vpnnat::messages::*;
use vpnnat_test_support::run_with_input;

both!(subcommands_work_directly_on_the_database);

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_maintenance-server"));
    c.env_remove("RUST_LOG");
    c
}

fn run(config: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    run_with_input(bin().arg("--config").arg(config).args(args), stdin)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

async fn subcommands_work_directly_on_the_database(b: Backend) {
    let db = TestDb::new(b);
    let state = db.dir.path().join("state");
    let config = db.dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[state]\ndir = \"{}\"\n[database]\nurl = \"{}\"\n",
            state.display(),
            db.url
        ),
    )
    .unwrap();
    let site = stdout(&run(&config, &["site", "add", "Bakery Schmidt"], None));
    let token = site
        .lines()
        .find(|l| l.starts_with("vnenroll_"))
        .unwrap()
        .to_owned();
    assert!(site.starts_with("site 1: Bakery Schmidt"), "{site}");
    let gw = stdout(&run(&config, &["gateway", "add", "gw1"], None));
    let gw_cred = gw
        .lines()
        .find(|l| l.starts_with("vngw_"))
        .unwrap()
        .to_owned();
    run(
        &config,
        &["technician", "add", "alice", "--password-stdin"],
        Some("correct horse\n"),
    );
    let op = stdout(&run(&config, &["operator-token"], None))
        .trim()
        .to_owned();
    assert!(op.starts_with("vnop_"));
    // Generated once, mode 0600, the same afterwards.
    let meta = std::fs::metadata(state.join("operator.token")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );
    assert_eq!(stdout(&run(&config, &["operator-token"], None)).trim(), op);
    stdout(&run(&config, &["gateway", "drain", "1"], None));
    let list = stdout(&run(&config, &["gateway", "list"], None));
    assert!(list.lines().nth(1).unwrap().contains("gw1"), "{list}");
    assert!(list.contains(" yes "), "draining: {list}");
    run(&config, &["gateway", "drain", "1", "--off"], None);
    assert!(!stdout(&run(&config, &["gateway", "list"], None)).contains(" yes "));

    // The server started on the same database accepts all of it.
    let mut s = db.settings();
    s.operator.token = String::new(); // use the generated file
    let server = TestServer::start(s).await;
    let sites: Vec<SiteView> = server.client(Some(&op)).get(paths::SITES).await.json();
    assert_eq!(sites[0].name, "Bakery Schmidt");
    let enrolled: EnrollResponse = server
        .client(None)
        .post(
            paths::ENROLL,
            &EnrollRequest {
                token,
                public_key: key(1),
            },
        )
        .await
        .json();
    let reg = server
        .client(Some(&gw_cred))
        .post(
            paths::GATEWAY_REGISTER,
            &GatewayRegistration {
                endpoints: vec!["203.0.113.1:51820".parse().unwrap()],
                public_key: key(201),
                tunnel_kinds: vec![TunnelKind::Wireguard],
                max_tunnels: 5,
                software_version: "t".into(),
                technician_prefixes: Vec::new(),
                tls: None,
                next_public_key: None,
            },
        )
        .await;
    assert_eq!(reg.status, 200);
    let tech = login(&server, "alice", "correct horse").await;
    let r = server
        .client(Some(&enrolled.credential))
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(
        tech.get(paths::REQUESTS)
            .await
            .json::<Vec<MaintenanceRequestView>>()
            .len(),
        1
    );
    server.stop().await;

    // Lists show what the server did; a new token re-enrolls.
    let list = stdout(&run(&config, &["site", "list"], None));
    assert!(
        list.contains("Bakery Schmidt") && list.contains("10.64.0.1"),
        "{list}"
    );
    let again = stdout(&run(&config, &["site", "token", "1"], None));
    assert!(again.lines().any(|l| l.starts_with("vnenroll_")));
    // Errors are one line, exit code non-zero.
    let out = bin()
        .arg("--config")
        .arg(&config)
        .args(["site", "token", "99"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("site not found"), "{err}");
    let out = bin()
        .arg("--config")
        .arg(&config)
        .args(["technician", "add", "bob", "--password-stdin"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "an empty password is refused");
}

#[test]
fn bad_configuration_is_one_line_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    for (text, key) in [
        ("[pool]\nprefix = \"10.64.0.1/16\"\n", "pool.prefix"),
        (
            "[database]\nmax_connections = \"many\"\n",
            "database.max_connections",
        ),
        (
            "[gateways]\ndown_after_ms = 10\nheartbeat_interval_ms = 100\n",
            "gateways.down_after_ms",
        ),
        ("[nonsense]\nx = 1\n", "nonsense"),
        ("[operator]\ntoken = \"short\"\n", "operator.token"),
    ] {
        std::fs::write(&config, text).unwrap();
        let out = bin()
            .arg("--config")
            .arg(&config)
            .arg("site")
            .arg("list")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(&config.display().to_string()), "{err}");
        assert!(err.contains(key), "{key} not in {err}");
    }
    let out = bin()
        .args(["--config", "/nonexistent/vpnnat.toml", "site", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/vpnnat.toml"));
    let out = bin()
        .arg("--config")
        .arg(dir.path().join("none.toml"))
        .env("VPNNAT_POOL__PREFIX", "banana")
        .arg("site")
        .arg("list")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let help = bin().arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("operator-token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_api_matches_its_openapi_document() {
    let db = TestDb::new(Backend::Sqlite);
    let server = TestServer::start(db.settings()).await;
    let doc = server.client(None).get(paths::OPENAPI).await;
    assert_eq!(doc.status, 200);
    assert_eq!(doc.body["openapi"], "3.0.3");
    let anon = server.client(None);
    for (path, ops) in doc.body["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let a = anon.raw(m, &path.replace("{id}", "1"), None).await;
            // Routed: never the fallback's "no such endpoint" nor 405.
            assert_ne!(a.status, 405, "{method} {path}");
            assert!(
                !(a.status == 404 && a.body["message"] == "no such endpoint"),
                "{method} {path} is documented but not served"
            );
        }
    }
    // The console is served with a strict policy.
    let page = anon.get("/").await;
    assert_eq!(page.status, 200);
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"));
    assert!(page.body.as_str().unwrap().contains("Technician sign-in"));
    for asset in [
        "/console/app.js",
        "/console/style.css",
        "/console/favicon.svg",
    ] {
        assert_eq!(anon.get(asset).await.status, 200, "{asset}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_is_served_when_a_certificate_is_configured() {
    if !require_program("openssl") {
        return;
    }
    let db = TestDb::new(Backend::Sqlite);
    let dir = db.dir.path();
    let (cert, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    // A CA and a server certificate it signed (webpki refuses a CA as the server's own certificate).
    let ca = dir.join("ca.pem");
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-days",
                "2",
                "-subj",
                "/CN=vpnnat test CA",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-subj",
                "/CN=localhost",
                "-keyout",
                "key.pem",
                "-out",
                "leaf.csr",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
        "-out",
        "cert.pem",
    ]);
    let mut s = db.settings();
    s.tls.cert = cert.display().to_string();
    s.tls.key = key_file.display().to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let operator = s.operator.token.clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(maintenance_server::launch_with_listener(
        s,
        listener,
        async move {
            let _ = rx.await;
        },
    ));
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap())
        .build()
        .unwrap();
    let url = format!("https://localhost:{}", addr.port());
    let mut ok = false;
    for _ in 0..100 {
        match client.get(format!("{url}/healthz")).send().await {
            Ok(r) => {
                ok = r.status().is_success();
                break;
            }
            Err(e) => eprintln!("not yet: {e}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(ok, "HTTPS /healthz");
    let sites = client
        .get(format!("{url}{}", paths::SITES))
        .bearer_auth(&operator)
        .send()
        .await
        .unwrap();
    assert_eq!(sites.status(), 200);
    // Plain HTTP on the TLS port gets nothing useful.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/healthz", addr.port()))
        .timeout(std::time::Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    // The session cookie is Secure over HTTPS.
    add_technician(&db, "alice", "correct horse").await;
    let login = client
        .post(format!("{url}{}", paths::LOGIN))
        .json(&Login {
            name: "alice".into(),
            password: "correct horse".into(),
        })
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    let cookie = login.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.contains("; Secure"), "{cookie}");
    let _ = tx.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_operator_token_needs_no_prefix() {
    let db = TestDb::new(Backend::Sqlite);
    let mut s = db.settings();
    s.operator.token = "a-configured-operator-secret".into();
    let server = TestServer::start(s).await;
    let op = server.operator();
    assert_eq!(op.get(paths::SITES).await.status, 200);
    op.with_bearer("a-configured-operator-secreT")
        .get(paths::SITES)
        .await
        .error(401, None);
    let site = add_site(&server, "A", 1).await;
    op.with_bearer(&site.credential)
        .get(paths::SITES)
        .await
        .error(403, None);
    server.stop().await;
}

/// `backup` copies the SQLite database while the server runs; `restore`
/// (server stopped) brings back exactly the state at the backup, with
/// desired-state versions past any that agents and gateways have seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_while_serving_and_restore() {
    use std::os::unix::fs::PermissionsExt as _;
    let db = TestDb::new(Backend::Sqlite);
    let settings = db.settings();
    let server = TestServer::start(settings.clone()).await;
    let config = db.dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[http]\nlisten = \"{}\"\n[state]\ndir = \"{}\"\n[database]\nurl = \"{}\"\n",
            server.addr,
            settings.state.dir.display(),
            db.url
        ),
    )
    .unwrap();
    let a = add_site(&server, "Before the backup", 1).await;
    let backup = db.dir.path().join("backup.db");
    let out = run(&config, &["backup", backup.to_str().unwrap()], None);
    assert!(
        stdout(&out).contains("backup written to"),
        "{}",
        stdout(&out)
    );
    let mode = std::fs::metadata(&backup).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the copy holds credential hashes");
    let fails = |args: &[&str]| {
        let o = bin()
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    // An existing file is never overwritten; a running server is never restored under.
    assert!(fails(&["backup", backup.to_str().unwrap()]).contains("refusing to overwrite"));
    assert!(fails(&["restore", backup.to_str().unwrap()]).contains("stop the maintenance server"));
    let b = add_site(&server, "After the backup", 2).await;
    // What the agent of site A has seen last.
    let seen = agent_state(&a, 0, 0).await.version;
    server.stop().await;

    assert!(fails(&["restore", config.to_str().unwrap()]).contains("not an SQLite database"));
    let out = run(&config, &["restore", backup.to_str().unwrap()], None);
    assert!(stdout(&out).contains("restored"), "{}", stdout(&out));
    let server = TestServer::start(db.settings()).await;
    let sites: Vec<SiteView> = server.operator().get(paths::SITES).await.json();
    let ids: Vec<SiteId> = sites.iter().map(|s| s.site_id).collect();
    assert_eq!(ids, vec![a.id], "the state at the backup: {sites:?}");
    // The restored site's credential works, the later one's does not.
    let a = Site {
        id: a.id,
        agent: server.client(Some(&a.credential)),
        credential: a.credential,
    };
    assert_eq!(a.agent.get(paths::AGENT_REQUESTS).await.status, 200);
    let b_agent = server.client(Some(&b.credential));
    assert_eq!(b_agent.get(paths::AGENT_REQUESTS).await.status, 401);
    // The agent takes the restored document: its version is newer than any it saw.
    assert!(agent_state(&a, seen, 0).await.version > seen);
    server.stop().await;
}
