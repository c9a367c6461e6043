//! Planned rotation of a site's WireGuard key and credential, each scenario
//! on SQLite and on PostgreSQL: the next key reaches the gateway first and
//! the agent only once the gateway applied it; the old credential stays
//! valid until the new one is used (or its grace passes); the immediate
//! rotation revokes both; the schedule flags old keys and credentials;
//! every step is audited.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use vpnnat::messages::*;

both!(
    rotation_site_key_reaches_the_gateway_first_and_is_committed_by_the_agent,
    rotation_site_key_refuses_bad_and_taken_keys,
    rotation_site_credential_old_one_valid_until_the_new_one_is_used,
    rotation_site_credential_grace_ends_the_old_one,
    rotation_immediate_rotate_revokes_a_pending_rotation,
    rotation_schedule_flags_old_keys_and_credentials,
    rotation_operator_request_is_validated,
);

fn planned(key: bool, credential: bool) -> PlannedRotation {
    PlannedRotation { key, credential }
}

async fn audit_count(db: &TestDb, action: &str) -> i64 {
    db.scalar(&format!(
        "SELECT COUNT(*) FROM audit_log WHERE action = '{action}'"
    ))
    .await
}

async fn rotation_site_key_reaches_the_gateway_first_and_is_committed_by_the_agent(b: Backend) {
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    let gw = add_gateway(&server, "gw1", 10, 1).await;
    let site = add_site(&server, "Bakery", 1).await;
    let r = site
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    report_applied(&gw).await;
    let s = agent_state(&site, 0, 0).await;
    assert!(s.tunnel.is_some());
    assert_eq!(s.rotation, None);

    // The operator asks; the flag is in the agent's document.
    let a = server
        .operator()
        .post(
            &at(paths::SITE_PLANNED_ROTATION, site.id),
            &planned(true, false),
        )
        .await;
    assert_eq!(a.status, 204, "{}", a.body);
    let s1 = agent_state(&site, s.version, 0).await;
    assert!(s1.version > s.version);
    let r1 = s1.rotation.clone().unwrap();
    assert!(r1.rotate_key && !r1.rotate_credential && r1.next_key.is_none());

    // The agent registers its next key: the gateway gets it, the agent
    // does not switch yet.
    let g_before = gateway_state(&gw, 0, 0).await;
    let answer: AgentRotation = site
        .agent
        .post(
            paths::AGENT_KEY,
            &SiteKey {
                public_key: key(50),
            },
        )
        .await
        .json();
    assert_eq!(answer.next_key, Some(key(50)));
    assert!(!answer.next_key_ready && !answer.rotate_key);
    // Repeated (an agent that restarted): the same answer, no new version.
    let again: AgentRotation = site
        .agent
        .post(
            paths::AGENT_KEY,
            &SiteKey {
                public_key: key(50),
            },
        )
        .await
        .json();
    assert_eq!(again, answer);
    let g = gateway_state(&gw, g_before.version, 0).await;
    assert!(g.version > g_before.version);
    assert_eq!(g.peers[0].public_key, key(1), "the current key stays");
    assert_eq!(
        g.next_keys,
        vec![NextPeerKey {
            site_id: site.id,
            public_key: key(50)
        }]
    );
    let s2 = agent_state(&site, 0, 0).await;
    assert!(!s2.rotation.as_ref().unwrap().next_key_ready);
    let m = server.operator().get(paths::METRICS).await;
    let text = m.body.as_str().unwrap().to_owned();
    assert!(
        text.contains("vpnnat_site_rotations_pending{what=\"key\"} 1"),
        "{text}"
    );

    // The gateway applies it: the agent's long-poll wakes with "ready".
    let poll = spawn_agent_poll(&site, s2.version, 10_000);
    tokio::time::sleep(Duration::from_millis(100)).await;
    report_applied(&gw).await;
    let s3 = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .unwrap()
        .unwrap();
    assert!(s3.rotation.as_ref().unwrap().next_key_ready, "{s3:?}");
    assert_eq!(s3.rotation.as_ref().unwrap().next_key, Some(key(50)));

    // Confirming another key is refused; the next key commits, twice.
    site.agent
        .post(
            paths::AGENT_KEY_COMMIT,
            &SiteKey {
                public_key: key(51),
            },
        )
        .await
        .error(409, Some("public_key"));
    for _ in 0..2 {
        let c = site
            .agent
            .post(
                paths::AGENT_KEY_COMMIT,
                &SiteKey {
                    public_key: key(50),
                },
            )
            .await;
        assert_eq!(c.status, 204, "{}", c.body);
    }
    let g2 = gateway_state(&gw, 0, 0).await;
    assert_eq!(g2.peers[0].public_key, key(50));
    assert!(g2.next_keys.is_empty());
    let s4 = agent_state(&site, 0, 0).await;
    assert_eq!(s4.rotation, None);
    assert!(s4.tunnel.is_some(), "the tunnel stays announced");
    let sites: Vec<SiteView> = server.operator().get(paths::SITES).await.json();
    assert!(sites[0].enrolled);

    assert_eq!(audit_count(&db, "site.rotation.requested").await, 1);
    assert_eq!(audit_count(&db, "site.key.next").await, 1);
    assert_eq!(audit_count(&db, "site.key.rotated").await, 1);
    server.stop().await;
}

async fn rotation_site_key_refuses_bad_and_taken_keys(b: Backend) {
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    let a = add_site(&server, "A", 1).await;
    let other = add_site(&server, "B", 2).await;
    a.agent
        .post(paths::AGENT_KEY, &SiteKey { public_key: key(1) })
        .await
        .error(409, Some("public_key"));
    a.agent
        .post(paths::AGENT_KEY, &SiteKey { public_key: key(2) })
        .await
        .error(409, Some("public_key"));
    // B's next key is taken for A, and for enrollment.
    let ok = other
        .agent
        .post(
            paths::AGENT_KEY,
            &SiteKey {
                public_key: key(60),
            },
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    a.agent
        .post(
            paths::AGENT_KEY,
            &SiteKey {
                public_key: key(60),
            },
        )
        .await
        .error(409, Some("public_key"));
    let bad = a
        .agent
        .post(paths::AGENT_KEY, &json!({"public_key": "not a key"}))
        .await;
    assert_eq!(bad.status.as_u16(), 422, "{}", bad.body);
    let extra = a
        .agent
        .post(
            paths::AGENT_KEY,
            &json!({"public_key": key(61).to_base64(), "x": 1}),
        )
        .await;
    assert_eq!(extra.status.as_u16(), 422, "{}", extra.body);
    // Without a tunnel there is no gateway to wait for: ready at once.
    let r: AgentRotation = a
        .agent
        .post(
            paths::AGENT_KEY,
            &SiteKey {
                public_key: key(61),
            },
        )
        .await
        .json();
    assert!(r.next_key_ready);
    // A replaced next key (an agent that lost its state) is accepted.
    let r: AgentRotation = a
        .agent
        .post(
            paths::AGENT_KEY,
            &SiteKey {
                public_key: key(62),
            },
        )
        .await
        .json();
    assert_eq!(r.next_key, Some(key(62)));
    // No credential: 401.
    server
        .client(None)
        .post(
            paths::AGENT_KEY,
            &SiteKey {
                public_key: key(63),
            },
        )
        .await
        .error(401, None);
    server.stop().await;
}

async fn rotation_site_credential_old_one_valid_until_the_new_one_is_used(b: Backend) {
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    let gw = add_gateway(&server, "gw1", 10, 1).await;
    let site = add_site(&server, "Bakery", 1).await;
    let r = site
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    report_applied(&gw).await;
    let tls_before = gateway_state(&gw, 0, 0).await.peers[0]
        .tls_token_sha256
        .clone();
    server
        .operator()
        .post(
            &at(paths::SITE_PLANNED_ROTATION, site.id),
            &planned(false, true),
        )
        .await;
    assert!(
        agent_state(&site, 0, 0)
            .await
            .rotation
            .unwrap()
            .rotate_credential
    );

    let first: NewSiteCredential = site.agent.post_empty(paths::AGENT_CREDENTIAL).await.json();
    assert!(
        first.credential.starts_with(&site.credential[..4]),
        "same kind"
    );
    assert_ne!(first.credential, site.credential);
    // The answer was lost: asked again with the old credential, which
    // still works; the unused first one is replaced.
    assert_eq!(site.agent.get(paths::AGENT_REQUESTS).await.status, 200);
    let second: NewSiteCredential = site.agent.post_empty(paths::AGENT_CREDENTIAL).await.json();
    assert_eq!(second.previous_valid_until, first.previous_valid_until);
    let first_api = site.agent.with_bearer(&first.credential);
    first_api.get(paths::AGENT_REQUESTS).await.error(401, None);
    assert_eq!(site.agent.get(paths::AGENT_REQUESTS).await.status, 200);

    // The first use of the new one ends the old one.
    let new_api = site.agent.with_bearer(&second.credential);
    let s: AgentDesiredState = new_api
        .get(&format!("{}?after=0&wait_ms=0", paths::AGENT_STATE))
        .await
        .json();
    assert_eq!(s.rotation, None, "the flag is cleared by the first use");
    site.agent.get(paths::AGENT_REQUESTS).await.error(401, None);
    assert_eq!(new_api.get(paths::AGENT_REQUESTS).await.status, 200);
    // The gateway's TLS token follows the credential.
    let tls_after = gateway_state(&gw, 0, 0).await.peers[0]
        .tls_token_sha256
        .clone();
    assert_ne!(tls_before, tls_after);

    assert_eq!(audit_count(&db, "site.credential.next").await, 2);
    assert_eq!(audit_count(&db, "site.credential.rotated").await, 1);
    server.stop().await;
}

async fn rotation_site_credential_grace_ends_the_old_one(b: Backend) {
    let db = TestDb::new(b);
    let mut settings = db.settings();
    settings.rotation.credential_grace_s = 1;
    let server = TestServer::start(settings).await;
    let site = add_site(&server, "Bakery", 1).await;
    let new: NewSiteCredential = site.agent.post_empty(paths::AGENT_CREDENTIAL).await.json();
    assert_eq!(site.agent.get(paths::AGENT_REQUESTS).await.status, 200);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    site.agent.get(paths::AGENT_REQUESTS).await.error(401, None);
    let api = site.agent.with_bearer(&new.credential);
    assert_eq!(api.get(paths::AGENT_REQUESTS).await.status, 200);
    server.stop().await;
}

async fn rotation_immediate_rotate_revokes_a_pending_rotation(b: Backend) {
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    let gw = add_gateway(&server, "gw1", 10, 1).await;
    let site = add_site(&server, "Bakery", 1).await;
    let r = site
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    report_applied(&gw).await;
    let ok = site
        .agent
        .post(
            paths::AGENT_KEY,
            &SiteKey {
                public_key: key(50),
            },
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let new: NewSiteCredential = site.agent.post_empty(paths::AGENT_CREDENTIAL).await.json();
    assert_eq!(gateway_state(&gw, 0, 0).await.next_keys.len(), 1);

    let rotated = server
        .operator()
        .post_empty(&at(paths::SITE_ROTATE, site.id))
        .await;
    assert_eq!(rotated.status, 200, "{}", rotated.body);
    site.agent.get(paths::AGENT_REQUESTS).await.error(401, None);
    site.agent
        .with_bearer(&new.credential)
        .get(paths::AGENT_REQUESTS)
        .await
        .error(401, None);
    assert!(gateway_state(&gw, 0, 0).await.next_keys.is_empty());
    server.stop().await;
}

async fn rotation_schedule_flags_old_keys_and_credentials(b: Backend) {
    let db = TestDb::new(b);
    let mut settings = db.settings();
    // About 0.9 s.
    settings.rotation.site_key_days = 0.00001;
    settings.rotation.site_credential_days = 0.00001;
    let server = TestServer::start(settings).await;
    let site = add_site(&server, "Bakery", 1).await;
    let mut flagged = None;
    for _ in 0..100 {
        let s = agent_state(&site, 0, 0).await;
        if let Some(r) = s.rotation.filter(|r| r.rotate_key && r.rotate_credential) {
            flagged = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(flagged.is_some(), "the schedule flags the site");
    assert_eq!(
        db.scalar(
            "SELECT COUNT(*) FROM audit_log WHERE actor = 'schedule' \
             AND action = 'site.rotation.requested'"
        )
        .await,
        2
    );
    // A rotation under way is not flagged again.
    site.agent
        .post(
            paths::AGENT_KEY,
            &SiteKey {
                public_key: key(50),
            },
        )
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = agent_state(&site, 0, 0).await.rotation.unwrap();
    assert!(!r.rotate_key && r.next_key == Some(key(50)), "{r:?}");
    server.stop().await;
}

async fn rotation_operator_request_is_validated(b: Backend) {
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    let op = server.operator();
    let site = add_site(&server, "Bakery", 1).await;
    op.post(&at(paths::SITE_PLANNED_ROTATION, site.id), &json!({}))
        .await
        .error(422, Some("key"));
    let unknown = op
        .post(&at(paths::SITE_PLANNED_ROTATION, 999), &planned(true, true))
        .await;
    assert_eq!(unknown.status.as_u16(), 404, "{}", unknown.body);
    op.post(
        &at(paths::SITE_PLANNED_ROTATION, site.id),
        &json!({"key": "yes"}),
    )
    .await
    .error(422, None);
    // The agent's credential is not the operator's.
    site.agent
        .post(
            &at(paths::SITE_PLANNED_ROTATION, site.id),
            &planned(true, false),
        )
        .await
        .error(403, None);
    server.stop().await;
}
