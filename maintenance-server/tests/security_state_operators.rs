//! The operator's disable, delete and rotate operations on technicians,
//! sites and gateways (API and CLI), each audited; a new password or a
//! disabled technician ends its sessions.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use vpnnat::messages::*;

async fn gateway_health(server: &TestServer, gw: GatewayId) -> Health {
    let all: Vec<GatewayView> = server.operator().get(paths::GATEWAYS).await.json();
    all.into_iter().find(|g| g.gateway_id == gw).unwrap().health
}

async fn audit_actions(db: &TestDb, action: &str) -> i64 {
    db.scalar(&format!(
        "SELECT COUNT(*) FROM audit_log WHERE action = '{action}'"
    ))
    .await
}

/// Technicians: added, disabled (sessions end, login refused), enabled,
/// password changed (old sessions end), deleted; each audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_operator_disables_rotates_and_deletes_technicians() {
    let db = TestDb::new(Backend::Sqlite);
    let server = TestServer::start(db.settings()).await;
    let op = server.operator();
    let set = |password: &str| NewTechnician {
        name: "tina".into(),
        password: password.into(),
    };
    assert_eq!(
        op.post(paths::TECHNICIANS, &set("first password"))
            .await
            .status,
        204
    );
    let session = login(&server, "tina", "first password").await;
    assert_eq!(session.get("/api/v1/me").await.status, 200);

    let disable = at(paths::TECHNICIAN_DISABLE, "").replace("{name}", "tina");
    let a = op.post(&disable, &SetDisabled { disabled: true }).await;
    assert_eq!(a.status, 204, "{}", a.body);
    assert_eq!(session.get("/api/v1/me").await.status, 401);
    let refused = server
        .client(None)
        .post(
            paths::LOGIN,
            &Login {
                name: "tina".into(),
                password: "first password".into(),
            },
        )
        .await;
    assert_eq!(refused.status, 401, "{}", refused.body);

    assert_eq!(
        op.post(&disable, &SetDisabled { disabled: false })
            .await
            .status,
        204
    );
    let session = login(&server, "tina", "first password").await;
    // A new password ends the sessions opened with the old one.
    assert_eq!(
        op.post(paths::TECHNICIANS, &set("second password"))
            .await
            .status,
        204
    );
    assert_eq!(session.get("/api/v1/me").await.status, 401);
    let session = login(&server, "tina", "second password").await;

    let delete = paths::TECHNICIAN.replace("{name}", "tina");
    let a = op.raw(reqwest::Method::DELETE, &delete, None).await;
    assert_eq!(a.status, 204, "{}", a.body);
    assert_eq!(session.get("/api/v1/me").await.status, 401);
    let a = op.raw(reqwest::Method::DELETE, &delete, None).await;
    a.error(404, None);

    assert_eq!(audit_actions(&db, "technician.disable").await, 1);
    assert_eq!(audit_actions(&db, "technician.enable").await, 1);
    assert_eq!(audit_actions(&db, "technician.set").await, 2);
    assert_eq!(audit_actions(&db, "technician.delete").await, 1);
    server.stop().await;
}

/// Sites: disabled (the agent gets 401, its open request is revoked),
/// enabled, credential rotated (old one refused, re-enrollment works),
/// deleted; each audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_operator_disables_rotates_and_deletes_sites() {
    let db = TestDb::new(Backend::Sqlite);
    let server = TestServer::start(db.settings()).await;
    let op = server.operator();
    let _gw = add_gateway(&server, "gw1", 10, 1).await;
    let site = add_site(&server, "acme", 1).await;
    let a = site
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc"]))
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let rid = a.json::<MaintenanceRequestView>().id;

    let a = op
        .post(
            &at(paths::SITE_DISABLE, site.id),
            &SetDisabled { disabled: true },
        )
        .await;
    assert_eq!(a.status, 204, "{}", a.body);
    assert_eq!(site.agent.get(paths::AGENT_STATE).await.status, 401);
    let a = site
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc"]))
        .await;
    assert_eq!(a.status, 401, "{}", a.body);
    assert_eq!(
        db.scalar(&format!(
            "SELECT COUNT(*) FROM requests WHERE id = {rid} AND state = 'revoked'"
        ))
        .await,
        1
    );
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM nat_addresses WHERE site_id IS NOT NULL")
            .await,
        0
    );
    let a = op
        .post(
            &at(paths::SITE_DISABLE, site.id),
            &SetDisabled { disabled: false },
        )
        .await;
    assert_eq!(a.status, 204, "{}", a.body);
    assert_eq!(site.agent.get(paths::AGENT_STATE).await.status, 200);

    // Rotation: the old credential is refused at once; the token enrolls again.
    let a = op.post_empty(&at(paths::SITE_ROTATE, site.id)).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let rotated: SiteCreated = a.json();
    assert_eq!(site.agent.get(paths::AGENT_STATE).await.status, 401);
    let enrolled: EnrollResponse = server
        .client(None)
        .post(
            paths::ENROLL,
            &EnrollRequest {
                token: rotated.enrollment_token,
                public_key: key(1),
            },
        )
        .await
        .json();
    let agent = server.client(Some(&enrolled.credential));
    assert_eq!(agent.get(paths::AGENT_STATE).await.status, 200);

    let a = op
        .raw(reqwest::Method::DELETE, &at(paths::SITE, site.id), None)
        .await;
    assert_eq!(a.status, 204, "{}", a.body);
    assert_eq!(agent.get(paths::AGENT_STATE).await.status, 401);
    let sites: Vec<SiteView> = op.get(paths::SITES).await.json();
    assert!(sites.iter().all(|s| s.site_id != site.id));
    let again = op
        .raw(reqwest::Method::DELETE, &at(paths::SITE, site.id), None)
        .await;
    again.error(404, None);
    let again = op
        .post(
            &at(paths::SITE_DISABLE, site.id),
            &SetDisabled { disabled: true },
        )
        .await;
    again.error(404, None);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM requests").await, 0);

    for action in ["site.disable", "site.enable", "site.rotate", "site.delete"] {
        assert_eq!(audit_actions(&db, action).await, 1, "{action}");
    }
    server.stop().await;
}

/// Gateways: credential rotated without re-registering (the new one works,
/// the old one not), disabled (401, marked down, its site moves), deleted
/// only once it carries no site; each audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_operator_disables_rotates_and_deletes_gateways() {
    let db = TestDb::new(Backend::Sqlite);
    let server = TestServer::start(db.settings()).await;
    let op = server.operator();
    let gw1 = add_gateway(&server, "gw1", 10, 1).await;
    let site = add_site(&server, "acme", 1).await;
    let a = site
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc"]))
        .await;
    assert_eq!(a.json::<MaintenanceRequestView>().gateway_id, Some(gw1.id));

    let a = op.post_empty(&at(paths::GATEWAY_ROTATE, gw1.id)).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let rotated: GatewayCreated = a.json();
    assert_eq!(rotated.gateway_id, gw1.id);
    assert_ne!(rotated.credential, gw1.credential);
    let old = gw1.api.post(paths::GATEWAY_HEARTBEAT, &heartbeat(10)).await;
    assert_eq!(old.status, 401, "{}", old.body);
    let new_api = server.client(Some(&rotated.credential));
    let ok = new_api.post(paths::GATEWAY_HEARTBEAT, &heartbeat(10)).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    // Same gateway, same sites: nothing was re-registered.
    let st: GatewayDesiredState = new_api.get(paths::GATEWAY_STATE).await.json();
    assert_eq!(st.peers.len(), 1);

    // A second gateway to take the site over.
    let gw2 = add_gateway(&server, "gw2", 10, 2).await;
    let a = op
        .raw(reqwest::Method::DELETE, &at(paths::GATEWAY, gw1.id), None)
        .await;
    assert_eq!(a.error(409, None).error, "invalid_state");
    let a = op
        .post(
            &at(paths::GATEWAY_DISABLE, gw1.id),
            &SetDisabled { disabled: true },
        )
        .await;
    assert_eq!(a.status, 204, "{}", a.body);
    assert_eq!(
        new_api
            .post(paths::GATEWAY_HEARTBEAT, &heartbeat(10))
            .await
            .status,
        401
    );
    assert_eq!(gateway_health(&server, gw1.id).await, Health::Down);
    let mut moved = false;
    for _ in 0..120 {
        let sites: Vec<SiteView> = op.get(paths::SITES).await.json();
        if sites[0].gateway_id == Some(gw2.id) {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(moved, "the disabled gateway's site did not move");
    let a = op
        .raw(reqwest::Method::DELETE, &at(paths::GATEWAY, gw1.id), None)
        .await;
    assert_eq!(a.status, 204, "{}", a.body);
    let all: Vec<GatewayView> = op.get(paths::GATEWAYS).await.json();
    assert!(all.iter().all(|g| g.gateway_id != gw1.id));

    for action in ["gateway.rotate", "gateway.disable", "gateway.delete"] {
        assert_eq!(audit_actions(&db, action).await, 1, "{action}");
    }
    server.stop().await;
}

/// The CLI path: `technician disable` on the database ends the sessions and
/// refuses the login of a running server's technician.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_cli_disables_a_technician() {
    let db = TestDb::new(Backend::Sqlite);
    let settings = db.settings();
    let server = TestServer::start(settings.clone()).await;
    let session = technician(&server, &db, "carl", "correct horse").await;
    assert_eq!(session.get("/api/v1/me").await.status, 200);
    let config = db.dir.path().join("cli.toml");
    std::fs::write(
        &config,
        format!(
            "[state]\ndir = \"{}\"\n[database]\nurl = \"{}\"\n[operator]\ntoken = \"{}\"\n",
            settings.state.dir.display(),
            db.url,
            settings.operator.token
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_maintenance-server"))
        .arg("--config")
        .arg(&config)
        .args(["technician", "disable", "carl"])
        .env_remove("RUST_LOG")
        .env_remove("VPNNAT_DATABASE__URL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("disabled"));
    assert_eq!(session.get("/api/v1/me").await.status, 401);
    let refused = server
        .client(None)
        .post(
            paths::LOGIN,
            &Login {
                name: "carl".into(),
                password: "correct horse".into(),
            },
        )
        .await;
    assert_eq!(refused.status, 401);
    assert_eq!(audit_actions(&db, "technician.disable").await, 1);
    server.stop().await;
}

/// Setting a new password (here the way `technician add` does it) ends the
/// technician's sessions opened with the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_a_new_password_ends_the_old_sessions() {
    let db = TestDb::new(Backend::Sqlite);
    let server = TestServer::start(db.settings()).await;
    let session = technician(&server, &db, "pat", "old password").await;
    assert_eq!(session.get("/api/v1/me").await.status, 200);
    add_technician(&db, "pat", "new password").await;
    assert_eq!(session.get("/api/v1/me").await.status, 401);
    let again = login(&server, "pat", "new password").await;
    assert_eq!(again.get("/api/v1/me").await.status, 200);
    server.stop().await;
}
