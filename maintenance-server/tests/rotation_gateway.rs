//! Rotation of a gateway's own WireGuard key, each scenario on SQLite and
//! on PostgreSQL: the operator (API, CLI) or the schedule asks, the
//! gateway's document says so; the next key the gateway announces (in a
//! heartbeat or a registration) reaches its sites' agents and the wg-quick
//! files of sites without an agent; the gateway's promotion or abandonment
//! ends it; the state survives a restart of the server; every step is
//! audited; callers other than the operator are refused.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use serde_json::json;
use vpnnat::messages::*;

both!(
    rotation_gateway_key_is_asked_published_to_agents_and_promoted,
    rotation_gateway_key_abandoned_goes_back_to_the_current_key,
    rotation_gateway_key_registration_after_a_restart_carries_it,
    rotation_gateway_key_survives_a_server_restart,
    rotation_gateway_key_schedule_asks_old_keys_only,
    rotation_gateway_key_schedule_runs_in_the_background,
    rotation_gateway_key_schedule_spares_routers_without_an_agent,
    rotation_gateway_key_endpoint_refuses_other_callers_and_bad_gateways,
    rotation_gateway_key_agentless_files_name_the_next_key,
    rotation_gateway_key_cli_asks_and_reports,
);

/// The key `add_gateway(.., n)` registers with.
fn gw_key(n: u8) -> PublicKey {
    key(200 + n)
}

async fn audit_count(db: &TestDb, action: &str, detail: &str) -> i64 {
    db.scalar(&format!(
        "SELECT COUNT(*) FROM audit_log WHERE action = '{action}' AND detail LIKE '{detail}'"
    ))
    .await
}

/// A heartbeat of a gateway that knows its keys.
fn beat(current: PublicKey, next: Option<PublicKey>) -> GatewayHeartbeat {
    GatewayHeartbeat {
        public_key: Some(current),
        next_public_key: next,
        ..heartbeat(10)
    }
}

async fn send_beat(gw: &Gw, hb: &GatewayHeartbeat) -> HeartbeatAck {
    let a = gw.api.post(paths::GATEWAY_HEARTBEAT, hb).await;
    assert_eq!(a.status, 200, "{}", a.body);
    a.json()
}

fn registration(n: u8, current: PublicKey, next: Option<PublicKey>) -> GatewayRegistration {
    GatewayRegistration {
        endpoints: vec![format!("203.0.113.{n}:51820").parse().unwrap()],
        public_key: current,
        tunnel_kinds: vec![TunnelKind::Wireguard],
        max_tunnels: 10,
        software_version: "test".into(),
        technician_prefixes: Vec::new(),
        tls: None,
        next_public_key: next,
    }
}

async fn ask(server: &TestServer, gw: GatewayId) -> GatewayKeyRotationStatus {
    let a = server
        .operator()
        .post_empty(&at(paths::GATEWAY_ROTATE_KEY, gw))
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    // Null until announced, not left out.
    assert!(a.body.get("next_public_key").is_some(), "{}", a.body);
    a.json()
}

/// A gateway with an enrolled site whose tunnel it carries (applied): the
/// agent's document names the gateway's key.
async fn gateway_with_site(server: &TestServer) -> (Gw, Site) {
    let gw = add_gateway(server, "gw1", 10, 1).await;
    let site = add_site(server, "Bakery", 1).await;
    let r = site
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    report_applied(&gw).await;
    let s = agent_state(&site, 0, 0).await;
    assert_eq!(s.tunnel.as_ref().unwrap().public_key, gw_key(1));
    (gw, site)
}

fn tunnel_key(s: &AgentDesiredState) -> PublicKey {
    s.tunnel.as_ref().unwrap().public_key
}

async fn gateway_view(server: &TestServer, gw: GatewayId) -> GatewayView {
    let all: Vec<GatewayView> = server.operator().get(paths::GATEWAYS).await.json();
    all.into_iter().find(|g| g.gateway_id == gw).unwrap()
}

/// The `/metrics` gauge of gateways whose key rotation is pending.
async fn pending_gauge(server: &TestServer) -> i64 {
    let m = server.operator().get(paths::METRICS).await;
    let text = m.body.as_str().unwrap_or_default().to_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("vpnnat_gateway_key_rotations_pending "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no gauge:\n{text}"))
}

async fn rotation_gateway_key_is_asked_published_to_agents_and_promoted(b: Backend) {
    let db = TestDb::new(b);
    let mut settings = db.settings();
    settings.rotation.gateway_key_days = 0.0;
    let server = TestServer::start(settings).await;
    let (gw, site) = gateway_with_site(&server).await;
    let g0 = gateway_state(&gw, 0, 0).await;
    assert_eq!(g0.key_rotation, None);
    assert_eq!(pending_gauge(&server).await, 0);

    // The operator asks: the gateway's document says so, the agent's does
    // not change.
    let a0 = agent_state(&site, 0, 0).await;
    let asked = ask(&server, gw.id).await;
    assert_eq!(
        asked,
        GatewayKeyRotationStatus {
            gateway_id: gw.id,
            public_key: gw_key(1),
            next_public_key: None,
            requested: true,
        }
    );
    let g1 = gateway_state(&gw, g0.version, 0).await;
    assert!(g1.version > g0.version);
    assert_eq!(
        g1.key_rotation,
        Some(GatewayKeyRotation {
            requested: true,
            published: None
        })
    );
    assert_eq!(agent_state(&site, 0, 0).await.version, a0.version);
    assert_eq!(pending_gauge(&server).await, 1);
    // Asked again: the same answer, no new version, one audit row.
    assert_eq!(ask(&server, gw.id).await, asked);
    assert_eq!(gateway_state(&gw, 0, 0).await.version, g1.version);
    assert_eq!(
        db.scalar(
            "SELECT COUNT(*) FROM audit_log WHERE action = 'gateway.rotate_key' \
             AND actor = 'operator'"
        )
        .await,
        1
    );
    // A heartbeat without the next key yet changes nothing.
    let ack = send_beat(&gw, &beat(gw_key(1), None)).await;
    assert_eq!(ack.desired_version, g1.version);

    // The gateway announces its next key: the agent's long-poll wakes with
    // the next key as the gateway's key, the request is answered.
    let poll = spawn_agent_poll(&site, a0.version, 10_000);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ack = send_beat(&gw, &beat(gw_key(1), Some(key(90)))).await;
    let a1 = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(tunnel_key(&a1), key(90), "{a1:?}");
    let g2 = gateway_state(&gw, 0, 0).await;
    assert_eq!(ack.desired_version, g2.version);
    assert!(g2.version > g1.version);
    assert_eq!(
        g2.key_rotation,
        Some(GatewayKeyRotation {
            requested: false,
            published: Some(key(90))
        })
    );
    assert_eq!(
        audit_count(&db, "gateway.next_key", &key(90).to_base64()).await,
        1
    );
    let view = gateway_view(&server, gw.id).await;
    assert_eq!(
        (view.public_key, view.next_public_key),
        (Some(gw_key(1)), Some(key(90)))
    );
    // Repeated heartbeats and requests change nothing while it is under way.
    send_beat(&gw, &beat(gw_key(1), Some(key(90)))).await;
    assert_eq!(
        ask(&server, gw.id).await,
        GatewayKeyRotationStatus {
            gateway_id: gw.id,
            public_key: gw_key(1),
            next_public_key: Some(key(90)),
            requested: false,
        }
    );
    assert_eq!(gateway_state(&gw, 0, 0).await.version, g2.version);
    assert_eq!(agent_state(&site, 0, 0).await.version, a1.version);
    assert_eq!(audit_count(&db, "gateway.next_key", "%").await, 1);
    assert_eq!(audit_count(&db, "gateway.rotate_key", "%").await, 1);

    // The gateway promotes its next key: the rotation is over.
    let before = maintenance_server::db::now_ms();
    send_beat(&gw, &beat(key(90), None)).await;
    let a2 = agent_state(&site, a1.version, 0).await;
    assert!(a2.version > a1.version);
    assert_eq!(tunnel_key(&a2), key(90));
    let g3 = gateway_state(&gw, g2.version, 0).await;
    assert!(g3.version > g2.version);
    assert_eq!(g3.key_rotation, None);
    assert_eq!(pending_gauge(&server).await, 0);
    assert_eq!(
        audit_count(&db, "gateway.key", &key(90).to_base64()).await,
        1
    );
    assert!(
        db.scalar(&format!(
            "SELECT COUNT(*) FROM gateways WHERE id = {} AND key_since >= {before}",
            gw.id
        ))
        .await
            == 1
    );
    let view = gateway_view(&server, gw.id).await;
    assert_eq!(
        (view.public_key, view.next_public_key),
        (Some(key(90)), None)
    );
    // Steady again: the same heartbeat changes nothing.
    send_beat(&gw, &beat(key(90), None)).await;
    assert_eq!(gateway_state(&gw, 0, 0).await.version, g3.version);
    assert_eq!(agent_state(&site, 0, 0).await.version, a2.version);
    // A new rotation may be asked for now.
    assert!(ask(&server, gw.id).await.requested);
    server.stop().await;
}

async fn rotation_gateway_key_abandoned_goes_back_to_the_current_key(b: Backend) {
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    let (gw, site) = gateway_with_site(&server).await;
    ask(&server, gw.id).await;
    send_beat(&gw, &beat(gw_key(1), Some(key(90)))).await;
    let a1 = agent_state(&site, 0, 0).await;
    assert_eq!(tunnel_key(&a1), key(90));
    let g1 = gateway_state(&gw, 0, 0).await;

    // An older gateway's heartbeat names no key: nothing about keys changes.
    send_beat(&gw, &heartbeat(10)).await;
    let g = gateway_state(&gw, 0, 0).await;
    assert_eq!((g.version, g.key_rotation), (g1.version, g1.key_rotation));

    // The gateway lost its next key: its current one stays, the agents go
    // back to it.
    send_beat(&gw, &beat(gw_key(1), None)).await;
    let a2 = agent_state(&site, a1.version, 0).await;
    assert!(a2.version > a1.version);
    assert_eq!(tunnel_key(&a2), gw_key(1));
    let g2 = gateway_state(&gw, g1.version, 0).await;
    assert!(g2.version > g1.version);
    assert_eq!(g2.key_rotation, None);
    assert_eq!(audit_count(&db, "gateway.next_key.dropped", "%").await, 1);
    assert_eq!(audit_count(&db, "gateway.key", "%").await, 0);
    assert_eq!(gateway_view(&server, gw.id).await.next_public_key, None);

    // Another next key replaces one held (a gateway that made a new one).
    ask(&server, gw.id).await;
    send_beat(&gw, &beat(gw_key(1), Some(key(91)))).await;
    send_beat(&gw, &beat(gw_key(1), Some(key(92)))).await;
    assert_eq!(tunnel_key(&agent_state(&site, 0, 0).await), key(92));
    assert_eq!(
        gateway_state(&gw, 0, 0).await.key_rotation,
        Some(GatewayKeyRotation {
            requested: false,
            published: Some(key(92))
        })
    );
    assert_eq!(audit_count(&db, "gateway.next_key", "%").await, 3);
    // A next key equal to the current one is refused.
    gw.api
        .post(paths::GATEWAY_HEARTBEAT, &beat(gw_key(1), Some(gw_key(1))))
        .await
        .error(422, Some("next_public_key"));
    server.stop().await;
}

async fn rotation_gateway_key_registration_after_a_restart_carries_it(b: Backend) {
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    let (gw, site) = gateway_with_site(&server).await;
    ask(&server, gw.id).await;
    let a0 = agent_state(&site, 0, 0).await;

    // The gateway restarted after making its next key: it registers with it.
    let r = gw
        .api
        .post(
            paths::GATEWAY_REGISTER,
            &registration(1, gw_key(1), Some(key(90))),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let a1 = agent_state(&site, a0.version, 0).await;
    assert!(a1.version > a0.version);
    assert_eq!(tunnel_key(&a1), key(90));
    let g1 = gateway_state(&gw, 0, 0).await;
    assert_eq!(
        g1.key_rotation,
        Some(GatewayKeyRotation {
            requested: false,
            published: Some(key(90))
        })
    );
    assert_eq!(audit_count(&db, "gateway.next_key", "%").await, 1);
    // The same registration again: nothing changes.
    gw.api
        .post(
            paths::GATEWAY_REGISTER,
            &registration(1, gw_key(1), Some(key(90))),
        )
        .await;
    assert_eq!(agent_state(&site, 0, 0).await.version, a1.version);
    assert_eq!(gateway_state(&gw, 0, 0).await.version, g1.version);

    // Restarted after promoting it: it registers with the new key alone.
    let r = gw
        .api
        .post(paths::GATEWAY_REGISTER, &registration(1, key(90), None))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let a2 = agent_state(&site, a1.version, 0).await;
    assert!(a2.version > a1.version);
    assert_eq!(tunnel_key(&a2), key(90));
    let g2 = gateway_state(&gw, g1.version, 0).await;
    assert_eq!(g2.key_rotation, None);
    assert_eq!(
        audit_count(&db, "gateway.key", &key(90).to_base64()).await,
        1
    );
    let view = gateway_view(&server, gw.id).await;
    assert_eq!(
        (view.public_key, view.next_public_key),
        (Some(key(90)), None)
    );
    // Its heartbeats agree.
    let ack = send_beat(&gw, &beat(key(90), None)).await;
    assert_eq!(ack.desired_version, g2.version);
    server.stop().await;
}

async fn rotation_gateway_key_survives_a_server_restart(b: Backend) {
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    let (gw, site) = gateway_with_site(&server).await;
    ask(&server, gw.id).await;
    let asked = gateway_state(&gw, 0, 0).await;
    let addr = server.addr;
    server.stop().await;

    // Asked before the restart: still asked after it.
    let server = TestServer::start_at(db.settings(), addr).await;
    let g = gateway_state(&gw, 0, 0).await;
    assert_eq!(g.key_rotation, asked.key_rotation);
    send_beat(&gw, &beat(gw_key(1), Some(key(90)))).await;
    let published = gateway_state(&gw, 0, 0).await;
    server.stop().await;

    // Under way before the restart: the agents still dial the next key.
    let server = TestServer::start_at(db.settings(), addr).await;
    let g = gateway_state(&gw, 0, 0).await;
    assert_eq!(
        g.key_rotation,
        Some(GatewayKeyRotation {
            requested: false,
            published: Some(key(90))
        })
    );
    assert!(g.version >= published.version);
    assert_eq!(tunnel_key(&agent_state(&site, 0, 0).await), key(90));
    send_beat(&gw, &beat(key(90), None)).await;
    assert_eq!(gateway_state(&gw, 0, 0).await.key_rotation, None);
    server.stop().await;
}

/// Runs the schedule of gateway keys directly on the database at `now`.
async fn schedule_at(db: &TestDb, now: i64, period_ms: i64) -> usize {
    let d = maintenance_server::db::Database::connect(&db.url, 2)
        .await
        .unwrap();
    let mut tx = d.begin().await.unwrap();
    let n = maintenance_server::db::ops::schedule_key_rotations(&mut tx, now, period_ms)
        .await
        .unwrap();
    tx.commit(&maintenance_server::notify::Notifier::default())
        .await
        .unwrap();
    d.close().await;
    n
}

const DAY_MS: i64 = 86_400_000;

/// A server whose background schedule stays out of the test (which calls
/// the schedule itself, [`schedule_at`]).
async fn server_without_schedule(b: Backend) -> (TestDb, TestServer) {
    let db = TestDb::new(b);
    let mut settings = db.settings();
    settings.rotation.gateway_key_days = 0.0;
    let server = TestServer::start(settings).await;
    (db, server)
}

async fn rotation_gateway_key_schedule_asks_old_keys_only(b: Backend) {
    let (db, server) = server_without_schedule(b).await;
    let op = server.operator();
    let gw1 = add_gateway(&server, "gw1", 10, 1).await;
    let gw2 = add_gateway(&server, "gw2", 10, 2).await;
    let gw3 = add_gateway(&server, "gw3", 10, 3).await;
    // Never registered: no key to rotate.
    let _unregistered: GatewayCreated = op
        .post(paths::GATEWAYS, &NewGateway { name: "gw4".into() })
        .await
        .json();
    // Disabled: not asked.
    let d = op
        .post(
            &at(paths::GATEWAY_DISABLE, gw3.id),
            &SetDisabled { disabled: true },
        )
        .await;
    assert_eq!(d.status, 204, "{}", d.body);
    // Under way already: not asked again.
    ask(&server, gw2.id).await;
    send_beat(&gw2, &beat(gw_key(2), Some(key(90)))).await;
    let before = gateway_state(&gw2, 0, 0).await;

    let now = maintenance_server::db::now_ms();
    // Not old enough yet.
    assert_eq!(schedule_at(&db, now + 10 * DAY_MS, 90 * DAY_MS).await, 0);
    // Off.
    assert_eq!(schedule_at(&db, now + 1000 * DAY_MS, 0).await, 0);
    assert_eq!(schedule_at(&db, now + 100 * DAY_MS, 90 * DAY_MS).await, 1);
    assert_eq!(
        gateway_state(&gw1, 0, 0).await.key_rotation,
        Some(GatewayKeyRotation {
            requested: true,
            published: None
        })
    );
    assert_eq!(gateway_state(&gw2, 0, 0).await, before);
    assert_eq!(
        db.scalar(
            "SELECT COUNT(*) FROM audit_log WHERE action = 'gateway.rotate_key' \
             AND actor = 'schedule'"
        )
        .await,
        1
    );
    // Asked already: not again.
    assert_eq!(schedule_at(&db, now + 100 * DAY_MS, 90 * DAY_MS).await, 0);

    // gw1 rotates: its new key counts from now.
    send_beat(&gw1, &beat(gw_key(1), Some(key(91)))).await;
    send_beat(&gw1, &beat(key(91), None)).await;
    let now = maintenance_server::db::now_ms();
    assert_eq!(schedule_at(&db, now + 10 * DAY_MS, 90 * DAY_MS).await, 0);
    server.stop().await;
}

/// A router without an agent names the gateways' keys in its own files and
/// cannot follow a rotation: while such a WireGuard site exists the schedule
/// asks no gateway (the operator still can, on demand).
async fn rotation_gateway_key_schedule_spares_routers_without_an_agent(b: Backend) {
    let (db, server) = server_without_schedule(b).await;
    let op = server.operator();
    let gw = add_gateway(&server, "gw1", 10, 1).await;
    let site: SiteCreated = op
        .post(
            paths::SITES,
            &json!({ "name": "Florist", "agent": false, "public_key": key(77) }),
        )
        .await
        .json();
    let now = maintenance_server::db::now_ms();
    assert_eq!(schedule_at(&db, now + 100 * DAY_MS, 90 * DAY_MS).await, 0);
    assert_eq!(gateway_state(&gw, 0, 0).await.key_rotation, None);
    assert!(ask(&server, gw.id).await.requested, "on demand it is asked");
    send_beat(&gw, &beat(gw_key(1), Some(key(90)))).await;
    send_beat(&gw, &beat(key(90), None)).await;

    // Without such a site the schedule asks again.
    let d = op
        .raw(
            reqwest::Method::DELETE,
            &at(paths::SITE, site.site_id),
            None,
        )
        .await;
    assert_eq!(d.status, 204, "{}", d.body);
    let now = maintenance_server::db::now_ms();
    assert_eq!(schedule_at(&db, now + 100 * DAY_MS, 90 * DAY_MS).await, 1);
    server.stop().await;
}

async fn rotation_gateway_key_schedule_runs_in_the_background(b: Backend) {
    let db = TestDb::new(b);
    let mut settings = db.settings();
    // About 0.9 s; the sites' schedule is off.
    settings.rotation.gateway_key_days = 0.00001;
    settings.rotation.site_key_days = 0.0;
    settings.rotation.site_credential_days = 0.0;
    let server = TestServer::start(settings).await;
    let gw = add_gateway(&server, "gw1", 10, 1).await;
    let mut asked = None;
    for _ in 0..100 {
        if let Some(r) = gateway_state(&gw, 0, 0).await.key_rotation {
            asked = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        asked,
        Some(GatewayKeyRotation {
            requested: true,
            published: None
        }),
        "the schedule asks the gateway"
    );
    // Under way: not asked again, however old.
    send_beat(&gw, &beat(gw_key(1), Some(key(90)))).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        gateway_state(&gw, 0, 0).await.key_rotation,
        Some(GatewayKeyRotation {
            requested: false,
            published: Some(key(90))
        })
    );
    assert_eq!(
        db.scalar(
            "SELECT COUNT(*) FROM audit_log WHERE action = 'gateway.rotate_key' \
             AND actor = 'schedule'"
        )
        .await,
        1
    );
    server.stop().await;
}

async fn rotation_gateway_key_endpoint_refuses_other_callers_and_bad_gateways(b: Backend) {
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    let op = server.operator();
    let (gw, site) = gateway_with_site(&server).await;
    let path = at(paths::GATEWAY_ROTATE_KEY, gw.id);
    let version = gateway_state(&gw, 0, 0).await.version;

    // Nobody but the operator.
    server.client(None).post_empty(&path).await.error(401, None);
    gw.api.post_empty(&path).await.error(403, None);
    site.agent.post_empty(&path).await.error(403, None);
    server
        .client(Some("vnop_not-the-operator-token"))
        .post_empty(&path)
        .await
        .error(401, None);
    let tech = technician(&server, &db, "alice", "correct horse").await;
    tech.post_empty(&path).await.error(401, None);
    tech.post(&path, &json!({})).await.error(401, None);
    assert_eq!(gateway_state(&gw, 0, 0).await.version, version);
    assert_eq!(audit_count(&db, "gateway.rotate_key", "%").await, 0);

    // Unknown or malformed id.
    let e = op
        .post_empty(&at(paths::GATEWAY_ROTATE_KEY, 999))
        .await
        .error(404, None);
    assert!(!e.message.is_empty());
    let bad = op.post_empty("/api/v1/gateways/x/rotate-key").await;
    assert!(bad.status.is_client_error(), "{}", bad.body);
    let _: ApiError = bad.json();

    // Never registered: 409.
    let fresh: GatewayCreated = op
        .post(paths::GATEWAYS, &NewGateway { name: "gw2".into() })
        .await
        .json();
    let e = op
        .post_empty(&at(paths::GATEWAY_ROTATE_KEY, fresh.gateway_id))
        .await
        .error(409, None);
    assert!(e.message.contains("never registered"), "{}", e.message);

    // Disabled: 409, nothing asked.
    let d = op
        .post(
            &at(paths::GATEWAY_DISABLE, gw.id),
            &SetDisabled { disabled: true },
        )
        .await;
    assert_eq!(d.status, 204, "{}", d.body);
    let e = op.post_empty(&path).await.error(409, None);
    assert!(e.message.contains("disabled"), "{}", e.message);
    assert_eq!(audit_count(&db, "gateway.rotate_key", "%").await, 0);
    // Enabled again: it may be asked.
    op.post(
        &at(paths::GATEWAY_DISABLE, gw.id),
        &SetDisabled { disabled: false },
    )
    .await;
    assert!(ask(&server, gw.id).await.requested);

    // The credential rotation is another endpoint and keeps the key.
    let rotated: GatewayCreated = op
        .post_empty(&at(paths::GATEWAY_ROTATE, gw.id))
        .await
        .json();
    assert_ne!(rotated.credential, gw.credential);
    let view = gateway_view(&server, gw.id).await;
    assert_eq!(view.public_key, Some(gw_key(1)));
    server.stop().await;
}

async fn wg_config(op: &Api, site: SiteId) -> WireguardSiteConfig {
    op.get(&at(paths::SITE_WIREGUARD, site)).await.json()
}

async fn rotation_gateway_key_agentless_files_name_the_next_key(b: Backend) {
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    let op = server.operator();
    let created: GatewayCreated = op
        .post(paths::GATEWAYS, &NewGateway { name: "gw1".into() })
        .await
        .json();
    let api = server.client(Some(&created.credential));
    let gw = Gw {
        id: created.gateway_id,
        api,
        credential: created.credential,
    };
    // A router without an agent only gets files for gateways with
    // technician prefixes.
    let mut reg = registration(1, gw_key(1), None);
    reg.technician_prefixes = vec!["172.16.0.0/24".parse().unwrap()];
    let r = gw.api.post(paths::GATEWAY_REGISTER, &reg).await;
    assert_eq!(r.status, 200, "{}", r.body);
    send_beat(&gw, &beat(gw_key(1), None)).await;
    let site: SiteCreated = op
        .post(
            paths::SITES,
            &json!({ "name": "Florist", "agent": false, "public_key": key(77) }),
        )
        .await
        .json();
    let before = wg_config(&op, site.site_id).await;
    let conf = &before.files[0].content;
    assert!(
        conf.contains(&format!("PublicKey = {}", gw_key(1))),
        "{conf}"
    );
    assert!(!conf.contains("rotates its key"), "{conf}");

    ask(&server, gw.id).await;
    send_beat(&gw, &beat(gw_key(1), Some(key(90)))).await;
    let during = wg_config(&op, site.site_id).await;
    let conf = &during.files[0].content;
    assert!(conf.contains(&format!("PublicKey = {}", key(90))), "{conf}");
    assert!(conf.contains("rotates its key"), "{conf}");
    assert!(
        during.instructions.contains("rotates its key"),
        "{}",
        during.instructions
    );

    send_beat(&gw, &beat(key(90), None)).await;
    let after = wg_config(&op, site.site_id).await;
    let conf = &after.files[0].content;
    assert!(conf.contains(&format!("PublicKey = {}", key(90))), "{conf}");
    assert!(!conf.contains("rotates its key"), "{conf}");
    server.stop().await;
}

fn cli(config: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_maintenance-server"))
        .env_remove("RUST_LOG")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

async fn rotation_gateway_key_cli_asks_and_reports(b: Backend) {
    let db = TestDb::new(b);
    let settings = db.settings();
    let config = db.dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[state]\ndir = \"{}\"\n[database]\nurl = \"{}\"\n",
            settings.state.dir.display(),
            db.url
        ),
    )
    .unwrap();
    let server = TestServer::start(settings).await;
    let (gw, site) = gateway_with_site(&server).await;
    let id = gw.id.to_string();

    let o = cli(&config, &["gateway", "rotate-key", &id]);
    assert!(o.status.success(), "{o:?}");
    let line = out(&o);
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(
        line.starts_with(&format!("gateway {id}: key rotation asked for")),
        "{line}"
    );
    assert!(line.contains(&gw_key(1).to_base64()), "{line}");
    assert_eq!(
        gateway_state(&gw, 0, 0).await.key_rotation,
        Some(GatewayKeyRotation {
            requested: true,
            published: None
        })
    );
    // Again: the same, one audit row.
    let o = cli(&config, &["gateway", "rotate-key", &id]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(out(&o), line);
    assert_eq!(audit_count(&db, "gateway.rotate_key", "%").await, 1);

    send_beat(&gw, &beat(gw_key(1), Some(key(90)))).await;
    assert_eq!(tunnel_key(&agent_state(&site, 0, 0).await), key(90));
    let o = cli(&config, &["gateway", "rotate-key", &id]);
    assert!(o.status.success(), "{o:?}");
    let line = out(&o);
    assert!(line.contains("under way"), "{line}");
    assert!(line.contains(&key(90).to_base64()), "{line}");
    let o = cli(&config, &["gateway", "list"]);
    let list = out(&o);
    assert!(
        list.contains(&format!("(key rotating to {})", key(90).to_base64())),
        "{list}"
    );

    // Unknown gateway: a failure with a reason, not a panic.
    let o = cli(&config, &["gateway", "rotate-key", "999"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("not found") || err.contains("no gateway"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // The credential rotation keeps its name.
    let o = cli(&config, &["gateway", "rotate", &id]);
    assert!(o.status.success(), "{o:?}");
    assert!(out(&o).contains("new credential"));
    server.stop().await;
}
