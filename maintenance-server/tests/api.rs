//! The control plane end to end through its HTTP API, each scenario on
//! SQLite and on PostgreSQL: enrollment, requests and their NAT addresses,
//! both desired-state documents and their long-polls, gateway selection,
//! drain, failover, lease expiry, failure reports, technician actions and
//! the audit log, versions across restarts.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::*;
use vpnnat::messages::*;

both!(
    enrollment_is_single_use_and_rotates_the_credential,
    a_request_reaches_the_agent_and_the_gateway_and_ends_cleanly,
    gateway_selection_is_sticky_least_loaded_and_respects_drain,
    no_capacity_is_503_and_allocates_nothing,
    an_exhausted_pool_allocates_nothing,
    failover_moves_sites_and_keeps_their_addresses,
    lease_expiry_returns_the_addresses,
    a_failure_report_is_stored_and_can_open_a_request_for_the_router,
    technicians_start_and_end_and_everything_is_audited,
    long_polls_answer_on_change_and_on_timeout,
    versions_survive_a_restart,
);

async fn enrollment_is_single_use_and_rotates_the_credential(b: Backend) {
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    let op = server.operator();
    let created: SiteCreated = op
        .post(
            paths::SITES,
            &NewSite {
                name: "Bakery".into(),
                tunnel: TunnelKind::Wireguard,
                ..Default::default()
            },
        )
        .await
        .json();
    assert!(created.enrollment_token.starts_with("vnenroll_"));
    let anon = server.client(None);
    let enroll = |token: String, k: u8| EnrollRequest {
        token,
        public_key: key(k),
    };
    let first: EnrollResponse = anon
        .post(paths::ENROLL, &enroll(created.enrollment_token.clone(), 1))
        .await
        .json();
    assert_eq!(first.site_name, "Bakery");
    // Single use.
    anon.post(paths::ENROLL, &enroll(created.enrollment_token.clone(), 1))
        .await
        .error(401, Some("token"));
    anon.post(paths::ENROLL, &enroll("vnenroll_bogus".into(), 1))
        .await
        .error(401, Some("token"));
    let agent1 = server.client(Some(&first.credential));
    assert_eq!(
        agent_state(
            &Site {
                id: first.site_id,
                agent: agent1.clone(),
                credential: first.credential.clone()
            },
            0,
            0
        )
        .await
        .site_id,
        first.site_id
    );

    // Another site cannot take the same public key.
    let other: SiteCreated = op
        .post(
            paths::SITES,
            &NewSite {
                name: "Other".into(),
                tunnel: TunnelKind::Wireguard,
                ..Default::default()
            },
        )
        .await
        .json();
    anon.post(paths::ENROLL, &enroll(other.enrollment_token, 1))
        .await
        .error(409, Some("public_key"));
    // A duplicate site name is a conflict.
    op.post(
        paths::SITES,
        &NewSite {
            name: "Bakery".into(),
            tunnel: TunnelKind::Wireguard,
            ..Default::default()
        },
    )
    .await
    .error(409, Some("name"));

    // Re-enrollment: a fresh token, a new key, a new credential; the old one is dead.
    let again: SiteCreated = op
        .post_empty(&at(paths::SITE_TOKEN, first.site_id))
        .await
        .json();
    let second: EnrollResponse = anon
        .post(paths::ENROLL, &enroll(again.enrollment_token, 2))
        .await
        .json();
    assert_eq!(second.site_id, first.site_id);
    assert_ne!(second.credential, first.credential);
    agent1.get(paths::AGENT_STATE).await.error(401, None);
    let agent2 = server.client(Some(&second.credential));
    assert_eq!(agent2.get(paths::AGENT_STATE).await.status, 200);
    let sites: Vec<SiteView> = op.get(paths::SITES).await.json();
    assert_eq!(sites.len(), 2);
    assert!(sites[0].enrolled && !sites[1].enrolled);
    // An expired token is refused.
    let mut s = db.settings();
    s.operator.token = server.operator.clone();
    server.stop().await;
    s.enrollment.token_lifetime_hours = 1;
    let server = TestServer::start(s).await;
    let t: SiteCreated = server
        .operator()
        .post(
            paths::SITES,
            &NewSite {
                name: "Late".into(),
                tunnel: TunnelKind::Wireguard,
                ..Default::default()
            },
        )
        .await
        .json();
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&db.url).await.unwrap();
    sqlx::query("UPDATE enrollment_tokens SET expires_at = 1 WHERE site_id = $1")
        .bind(i64::try_from(t.site_id.0).unwrap())
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    server
        .client(None)
        .post(paths::ENROLL, &enroll(t.enrollment_token, 9))
        .await
        .error(401, Some("token"));
    server.stop().await;
}

async fn a_request_reaches_the_agent_and_the_gateway_and_ends_cleanly(b: Backend) {
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    let gw = add_gateway(&server, "gw1", 10, 1).await;
    let site = add_site(&server, "Bakery", 1).await;
    let tech = technician(&server, &db, "alice", "correct horse").await;

    let s0 = agent_state(&site, 0, 0).await;
    assert!(s0.tunnel.is_none() && s0.mappings.is_empty());
    let g0 = gateway_state(&gw, 0, 0).await;
    assert!(g0.peers.is_empty());

    // Both long-polls are waiting when the request arrives.
    let agent_poll = spawn_agent_poll(&site, s0.version, 30_000);
    let gw_poll = {
        let gw = Gw {
            id: gw.id,
            api: gw.api.clone(),
            credential: gw.credential.clone(),
        };
        tokio::spawn(async move { gateway_state(&gw, g0.version, 30_000).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let a = site
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1", "nas"]))
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let r1: MaintenanceRequestView = a.json();
    assert_eq!(r1.state, RequestState::Waiting);
    assert_eq!(r1.global_address, Some("127.0.0.1".parse().unwrap()));
    assert_eq!(r1.gateway_id, Some(gw.id));
    assert_eq!(r1.site_name, "Bakery");
    assert!(r1.acceptance_number.ends_with(&format!("-{:06}", r1.id.0)));
    let addrs: Vec<Ipv4Addr> = r1
        .terminals
        .iter()
        .map(|t| t.nat_address.unwrap())
        .collect();
    assert_eq!(addrs.len(), 2);
    assert_ne!(addrs[0], addrs[1]);
    for a in &addrs {
        assert_eq!(a.octets()[..2], [10, 64]);
    }

    let s1 = tokio::time::timeout(Duration::from_secs(10), agent_poll)
        .await
        .expect("the agent's long-poll answers on the change")
        .unwrap();
    assert!(s1.version > s0.version);
    // The agent does not dial before the gateway holds its peer (its
    // handshake would be dropped): no tunnel until the gateway applied.
    assert!(s1.tunnel.is_none(), "{s1:?}");
    let mapped: BTreeSet<(Ipv4Addr, String)> = s1
        .mappings
        .iter()
        .map(|m| (m.nat_address, m.terminal.to_string()))
        .collect();
    let expected: BTreeSet<(Ipv4Addr, String)> = r1
        .terminals
        .iter()
        .map(|t| (t.nat_address.unwrap(), t.name.to_string()))
        .collect();
    assert_eq!(mapped, expected);
    assert!(
        s1.mappings
            .iter()
            .all(|m| m.request_id == r1.id && m.expires_at == r1.expires_at)
    );
    let g1 = tokio::time::timeout(Duration::from_secs(10), gw_poll)
        .await
        .expect("the gateway's long-poll answers on the change")
        .unwrap();
    assert!(g1.version > g0.version);
    assert_eq!(g1.peers.len(), 1);
    assert_eq!(g1.peers[0].site_id, site.id);
    assert_eq!(g1.peers[0].public_key, key(1));
    let mut sorted = addrs.clone();
    sorted.sort();
    assert_eq!(g1.peers[0].nat_addresses, sorted);
    // The gateway reports it applied that document: the agent's long-poll
    // answers with the tunnel to dial.
    let agent_poll = spawn_agent_poll(&site, s1.version, 30_000);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(report_applied(&gw).await, g1.version);
    let s1 = tokio::time::timeout(Duration::from_secs(10), agent_poll)
        .await
        .expect("the agent's long-poll answers when the gateway applied")
        .unwrap();
    let tunnel = s1.tunnel.clone().unwrap();
    assert_eq!(tunnel.gateway_id, gw.id);
    assert_eq!(tunnel.endpoint, "203.0.113.1:51820".parse().unwrap());
    assert_eq!(tunnel.public_key, key(201));
    assert_eq!(s1.mappings.len(), 2);

    // A terminal that holds an address keeps it; a new one gets a new one.
    let r2: MaintenanceRequestView = site
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1", "pc-2"]))
        .await
        .json();
    assert_eq!(r2.terminals[0].nat_address, Some(addrs[0]));
    let pc2 = r2.terminals[1].nat_address.unwrap();
    assert!(!addrs.contains(&pc2));
    let own: Vec<MaintenanceRequestView> = site.agent.get(paths::AGENT_REQUESTS).await.json();
    assert_eq!(
        own.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![r2.id, r1.id]
    );
    // What the POST answered is what is stored.
    assert_eq!(own[1], r1);
    assert_eq!(own[0], r2);

    // Revoking the first frees only what the second does not use.
    let revoked: MaintenanceRequestView = site
        .agent
        .post_empty(&at(paths::AGENT_REVOKE, r1.id))
        .await
        .json();
    assert_eq!(revoked.state, RequestState::Revoked);
    assert!(revoked.ended_at.is_some());
    assert!(revoked.terminals.iter().all(|t| t.nat_address.is_none()));
    let s2 = agent_state(&site, 0, 0).await;
    let now_mapped: BTreeSet<Ipv4Addr> = s2.mappings.iter().map(|m| m.nat_address).collect();
    assert_eq!(now_mapped, BTreeSet::from([addrs[0], pc2]));
    assert!(s2.mappings.iter().all(|m| m.request_id == r2.id));
    // Revoking twice is refused and changes nothing.
    site.agent
        .post_empty(&at(paths::AGENT_REVOKE, r1.id))
        .await
        .error(409, None);

    // The technician ends the second: everything returns, the tunnel slot is freed.
    let ended: MaintenanceRequestView =
        tech.post_empty(&at(paths::REQUEST_END, r2.id)).await.json();
    assert_eq!(ended.state, RequestState::Ended);
    let s3 = agent_state(&site, 0, 0).await;
    assert!(s3.version > s2.version);
    assert!(s3.tunnel.is_none() && s3.mappings.is_empty());
    let g3 = gateway_state(&gw, 0, 0).await;
    assert!(g3.version > g1.version && g3.peers.is_empty());
    let gws: Vec<GatewayView> = server.operator().get(paths::GATEWAYS).await.json();
    assert_eq!(gws[0].tunnels, 0);
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM nat_addresses WHERE site_id IS NOT NULL")
            .await,
        0
    );
    assert_eq!(db.scalar("SELECT COUNT(*) FROM nat_addresses").await, 65534);
    // Applied-state reports are accepted.
    assert_eq!(
        site.agent
            .post(
                paths::AGENT_APPLIED,
                &AppliedState {
                    version: s3.version,
                    errors: vec![]
                }
            )
            .await
            .status,
        204
    );
    assert_eq!(
        gw.api
            .post(
                paths::GATEWAY_APPLIED,
                &AppliedState {
                    version: g3.version,
                    errors: vec!["route: EPERM".into()]
                }
            )
            .await
            .status,
        204
    );
    server.stop().await;
}

async fn gateway_selection_is_sticky_least_loaded_and_respects_drain(b: Backend) {
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    let op = server.operator();
    let g1 = add_gateway(&server, "gw1", 2, 1).await;
    let g2 = add_gateway(&server, "gw2", 2, 2).await;
    let a = add_site(&server, "A", 1).await;
    let bb = add_site(&server, "B", 2).await;
    let c = add_site(&server, "C", 3).await;
    let d = add_site(&server, "D", 4).await;
    let req = async |s: &Site, t: &str| {
        s.agent
            .post(paths::AGENT_REQUESTS, &new_request(&[t]))
            .await
    };
    let ra: MaintenanceRequestView = req(&a, "pc").await.json();
    assert_eq!(ra.gateway_id, Some(g1.id));
    let rb: MaintenanceRequestView = req(&bb, "pc").await.json();
    assert_eq!(rb.gateway_id, Some(g2.id), "least loaded");
    let ra2: MaintenanceRequestView = req(&a, "pc-2").await.json();
    assert_eq!(ra2.gateway_id, Some(g1.id), "sticky");
    // Drain gw2: it keeps B but takes no new site.
    let v: GatewayView = op
        .post(
            &at(paths::GATEWAY_DRAIN, g2.id),
            &DrainGateway { drain: true },
        )
        .await
        .json();
    assert!(v.drain);
    let ack: HeartbeatAck = g2
        .api
        .post(paths::GATEWAY_HEARTBEAT, &heartbeat(2))
        .await
        .json();
    assert!(ack.drain);
    let rc: MaintenanceRequestView = req(&c, "pc").await.json();
    assert_eq!(rc.gateway_id, Some(g1.id));
    let rb2: MaintenanceRequestView = req(&bb, "pc-2").await.json();
    assert_eq!(
        rb2.gateway_id,
        Some(g2.id),
        "a draining gateway keeps its sites"
    );
    // gw1 is full (A, C), gw2 drains: D gets 503.
    let e = req(&d, "pc").await.error(503, None);
    assert_eq!(e.error, "no_capacity");
    let sd = agent_state(&d, 0, 0).await;
    assert!(sd.problem.is_some() && sd.tunnel.is_none());
    // Undrain: D fits on gw2 and its problem clears.
    op.post(
        &at(paths::GATEWAY_DRAIN, g2.id),
        &DrainGateway { drain: false },
    )
    .await;
    let rd: MaintenanceRequestView = req(&d, "pc").await.json();
    assert_eq!(rd.gateway_id, Some(g2.id));
    assert!(agent_state(&d, 0, 0).await.problem.is_none());
    let gws: Vec<GatewayView> = op.get(paths::GATEWAYS).await.json();
    assert_eq!((gws[0].tunnels, gws[1].tunnels), (2, 2));
    server.stop().await;
}

async fn no_capacity_is_503_and_allocates_nothing(b: Backend) {
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    let site = add_site(&server, "A", 1).await;
    // A gateway that never registered has no endpoint and takes no site.
    let _unregistered: GatewayCreated = server
        .operator()
        .post(
            paths::GATEWAYS,
            &NewGateway {
                name: "idle".into(),
            },
        )
        .await
        .json();
    let e = site
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
        .await
        .error(503, None);
    assert_eq!(e.error, "no_capacity");
    assert_eq!(db.scalar("SELECT COUNT(*) FROM requests").await, 0);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM tunnels").await, 0);
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM nat_addresses WHERE site_id IS NOT NULL")
            .await,
        0
    );
    server.stop().await;
}

async fn an_exhausted_pool_allocates_nothing(b: Backend) {
    let db = TestDb::new(b);
    let mut s = db.settings();
    s.pool.prefix = "10.64.0.0/30".into(); // 10.64.0.1 and .2
    let server = TestServer::start(s).await;
    let gw = add_gateway(&server, "gw1", 10, 1).await;
    let a = add_site(&server, "A", 1).await;
    let bsite = add_site(&server, "B", 2).await;
    let r: MaintenanceRequestView = a
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
        .await
        .json();
    assert_eq!(
        r.terminals[0].nat_address,
        Some(Ipv4Addr::new(10, 64, 0, 1))
    );
    let before = db
        .scalar("SELECT COUNT(*) FROM nat_addresses WHERE site_id IS NOT NULL")
        .await;
    let e = bsite
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1", "pc-2"]))
        .await
        .error(503, None);
    assert_eq!(e.error, "pool_exhausted");
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM nat_addresses WHERE site_id IS NOT NULL")
            .await,
        before
    );
    assert_eq!(db.scalar("SELECT COUNT(*) FROM requests").await, 1);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM tunnels").await, 1);
    let gws: Vec<GatewayView> = server.operator().get(paths::GATEWAYS).await.json();
    assert_eq!(gws[0].tunnels, 1);
    assert_eq!(gateway_state(&gw, 0, 0).await.peers.len(), 1);
    // One address is left: a one-terminal request fits.
    let r: MaintenanceRequestView = bsite
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-9"]))
        .await
        .json();
    assert_eq!(
        r.terminals[0].nat_address,
        Some(Ipv4Addr::new(10, 64, 0, 2))
    );
    server.stop().await;
}

async fn failover_moves_sites_and_keeps_their_addresses(b: Backend) {
    let db = TestDb::new(b);
    let mut s = db.settings();
    s.gateways.down_after_ms = 1500;
    let server = TestServer::start(s).await;
    let g1 = add_gateway(&server, "gw1", 10, 1).await;
    let g2 = add_gateway(&server, "gw2", 10, 2).await;
    // gw2 keeps heartbeating; gw1 falls silent.
    let g2_api = g2.api.clone();
    let beat = tokio::spawn(async move {
        loop {
            let _ = g2_api.post(paths::GATEWAY_HEARTBEAT, &heartbeat(10)).await;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    });
    let site = add_site(&server, "A", 1).await;
    let r: MaintenanceRequestView = site
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1", "pc-2"]))
        .await
        .json();
    assert_eq!(r.gateway_id, Some(g1.id));
    report_applied(&g1).await;
    let before = agent_state(&site, 0, 0).await;
    assert_eq!(before.tunnel.as_ref().unwrap().gateway_id, g1.id);
    let g2_before = gateway_state(&g2, 0, 0).await;
    // The agent's long-poll answers when the site moves (and gw2, which
    // follows its document, has applied it).
    let mut state = before.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    while state.tunnel.as_ref().is_none_or(|t| t.gateway_id == g1.id) {
        assert!(
            Instant::now() < deadline,
            "the site did not move: {state:?}"
        );
        report_applied(&g2).await;
        state = agent_state(&site, state.version, 500).await;
    }
    let tunnel = state.tunnel.clone().unwrap();
    assert_eq!(tunnel.gateway_id, g2.id);
    assert_eq!(tunnel.public_key, key(202));
    assert_eq!(tunnel.endpoint, "203.0.113.2:51820".parse().unwrap());
    assert_eq!(
        state.mappings, before.mappings,
        "a site keeps its NAT addresses"
    );
    let g2_after = gateway_state(&g2, g2_before.version, 5_000).await;
    assert_eq!(g2_after.peers.len(), 1);
    assert_eq!(
        g2_after.peers[0].nat_addresses,
        before
            .mappings
            .iter()
            .map(|m| m.nat_address)
            .collect::<Vec<_>>()
    );
    assert!(gateway_state(&g1, 0, 0).await.peers.is_empty());
    let gws: Vec<GatewayView> = server.operator().get(paths::GATEWAYS).await.json();
    assert_eq!(gws[0].health, Health::Down);
    assert_eq!((gws[0].tunnels, gws[1].tunnels), (0, 1));
    let view: Vec<MaintenanceRequestView> = site.agent.get(paths::AGENT_REQUESTS).await.json();
    assert_eq!(view[0].gateway_id, Some(g2.id));
    // gw1 comes back healthy but the site stays where it is.
    let ack = g1.api.post(paths::GATEWAY_HEARTBEAT, &heartbeat(10)).await;
    assert_eq!(ack.status, 200);
    let gws: Vec<GatewayView> = server.operator().get(paths::GATEWAYS).await.json();
    assert_eq!(gws[0].health, Health::Healthy);
    assert_eq!(
        agent_state(&site, 0, 0).await.tunnel.unwrap().gateway_id,
        g2.id
    );
    beat.abort();
    server.stop().await;
}

async fn lease_expiry_returns_the_addresses(b: Backend) {
    let db = TestDb::new(b);
    let mut s = db.settings();
    s.maintenance.max_duration_s = 1;
    let server = TestServer::start(s).await;
    let gw = add_gateway(&server, "gw1", 10, 1).await;
    let g2_api = gw.api.clone();
    let beat = tokio::spawn(async move {
        loop {
            let _ = g2_api.post(paths::GATEWAY_HEARTBEAT, &heartbeat(10)).await;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    });
    let site = add_site(&server, "A", 1).await;
    let r: MaintenanceRequestView = site
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
        .await
        .json();
    assert!(r.expires_at.0 - r.received_at.0 == 1000);
    let mut state = agent_state(&site, 0, 0).await;
    assert_eq!(state.mappings.len(), 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !state.mappings.is_empty() {
        assert!(Instant::now() < deadline, "the lease did not expire");
        state = agent_state(&site, state.version, 5_000).await;
    }
    assert!(state.tunnel.is_none());
    let own: Vec<MaintenanceRequestView> = site.agent.get(paths::AGENT_REQUESTS).await.json();
    assert_eq!(own[0].state, RequestState::Expired);
    assert!(gateway_state(&gw, 0, 0).await.peers.is_empty());
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM nat_addresses WHERE site_id IS NOT NULL")
            .await,
        0
    );
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM audit_log WHERE action = 'request.expire'")
            .await,
        1
    );
    beat.abort();
    server.stop().await;
}

async fn a_failure_report_is_stored_and_can_open_a_request_for_the_router(b: Backend) {
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    add_gateway(&server, "gw1", 10, 1).await;
    let site = add_site(&server, "A", 1).await;
    let tech = technician(&server, &db, "alice", "correct horse").await;
    let plain: FailureAccepted = site
        .agent
        .post(
            paths::AGENT_FAILURES,
            &FailureReport {
                code: FailureCode::TerminalUnreachable,
                detail: "nas does not answer".into(),
                terminal: Some(TerminalName::new("nas").unwrap()),
                open_request: false,
            },
        )
        .await
        .json();
    assert!(plain.request.is_none());
    let with: FailureAccepted = site
        .agent
        .post(
            paths::AGENT_FAILURES,
            &FailureReport {
                code: FailureCode::LanLinkDown,
                detail: "eth1 carrier lost".into(),
                terminal: None,
                open_request: true,
            },
        )
        .await
        .json();
    let req = with.request.unwrap();
    assert_eq!(req.terminals.len(), 1);
    assert_eq!(req.terminals[0].name.as_str(), "router");
    assert!(req.terminals[0].nat_address.is_some());
    assert!(req.content.contains("lan_link_down"));
    let failures: Vec<FailureView> = tech.get(paths::FAILURES).await.json();
    assert_eq!(failures.len(), 2);
    assert_eq!(failures[0].id, with.failure_id);
    assert_eq!(failures[0].request_id, Some(req.id));
    assert_eq!(failures[1].terminal.as_ref().unwrap().as_str(), "nas");
    assert_eq!(failures[1].request_id, None);
    let state = agent_state(&site, 0, 0).await;
    assert_eq!(state.mappings[0].terminal.as_str(), "router");
    server.stop().await;

    // Configured: every report opens a request.
    let mut s = db.settings();
    s.maintenance.failure_opens_request = true;
    s.maintenance.router_terminal = "gw-router".into();
    let server = TestServer::start(s).await;
    let agent = server.client(Some(&site.credential));
    let auto: FailureAccepted = agent
        .post(
            paths::AGENT_FAILURES,
            &FailureReport {
                code: FailureCode::Other,
                detail: String::new(),
                terminal: None,
                open_request: false,
            },
        )
        .await
        .json();
    assert_eq!(
        auto.request.unwrap().terminals[0].name.as_str(),
        "gw-router"
    );
    server.stop().await;
}

async fn technicians_start_and_end_and_everything_is_audited(b: Backend) {
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    add_gateway(&server, "gw1", 10, 1).await;
    let site = add_site(&server, "A", 1).await;
    let tech = technician(&server, &db, "alice", "correct horse").await;
    let r: MaintenanceRequestView = site
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
        .await
        .json();
    let waiting: Vec<MaintenanceRequestView> = tech
        .get(&format!("{}?state=waiting", paths::REQUESTS))
        .await
        .json();
    assert_eq!(waiting.len(), 1);
    let started: MaintenanceRequestView = tech
        .post_empty(&at(paths::REQUEST_START, r.id))
        .await
        .json();
    assert_eq!(started.state, RequestState::InProgress);
    assert!(started.started_at.is_some());
    tech.post_empty(&at(paths::REQUEST_START, r.id))
        .await
        .error(409, None);
    assert!(
        tech.get(&format!("{}?state=waiting", paths::REQUESTS))
            .await
            .json::<Vec<MaintenanceRequestView>>()
            .is_empty()
    );
    let by_site: Vec<MaintenanceRequestView> = tech
        .get(&format!("{}?site={}", paths::REQUESTS, site.id))
        .await
        .json();
    assert_eq!(by_site.len(), 1);
    let ended: MaintenanceRequestView = tech.post_empty(&at(paths::REQUEST_END, r.id)).await.json();
    assert_eq!(ended.state, RequestState::Ended);
    tech.post_empty(&at(paths::REQUEST_END, r.id))
        .await
        .error(409, None);
    tech.post_empty(&at(paths::REQUEST_END, 999))
        .await
        .error(404, None);
    let audit: Vec<AuditEntry> = tech.get(paths::AUDIT).await.json();
    let actions: Vec<&str> = audit.iter().rev().map(|e| e.action.as_str()).collect();
    for want in [
        "gateway.create",
        "gateway.register",
        "site.create",
        "site.enroll",
        "technician.set",
        "technician.login",
        "request.create",
        "request.start",
        "request.end",
    ] {
        assert!(actions.contains(&want), "{want} not in {actions:?}");
    }
    let start = audit.iter().find(|e| e.action == "request.start").unwrap();
    assert_eq!(start.actor, "technician:alice");
    assert_eq!(start.object, format!("request:{}", r.id));
    // Paging.
    let page: Vec<AuditEntry> = tech
        .get(&format!("{}?before={}&limit=2", paths::AUDIT, audit[0].id))
        .await
        .json();
    assert_eq!(page.len(), 2);
    assert_eq!(page[0].id, audit[1].id);
    // Names instead of ids.
    assert_eq!(
        start.object_label.as_deref(),
        Some(format!("{} (A)", r.acceptance_number).as_str())
    );
    let create = audit.iter().find(|e| e.action == "site.create").unwrap();
    assert_eq!(create.object_label.as_deref(), Some("A"));
    // A refused sign-in is recorded, with where it came from.
    server
        .client(None)
        .post(
            paths::LOGIN,
            &Login {
                name: "alice".into(),
                password: "wrong horse".into(),
            },
        )
        .await
        .error(401, None);
    // Filters: kind (an action or its prefix), actor, object, site, time.
    let get = |q: String| {
        let tech = tech.clone();
        async move {
            tech.get(&format!("{}?{q}", paths::AUDIT))
                .await
                .json::<Vec<AuditEntry>>()
        }
    };
    let failed = get("kind=technician.login_failed".into()).await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].object, "technician:alice");
    assert!(
        failed[0].actor.starts_with("client:127.0.0.1"),
        "{:?}",
        failed[0]
    );
    let requests = get("kind=request".into()).await;
    let kinds: Vec<&str> = requests.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(kinds, ["request.end", "request.start", "request.create"]);
    let by_alice = get("actor=technician:alice".into()).await;
    assert!(by_alice.iter().all(|e| e.actor == "technician:alice"));
    assert!(by_alice.iter().any(|e| e.action == "request.end"));
    let on_request = get(format!("object=request:{}", r.id)).await;
    assert_eq!(on_request.len(), 3);
    let on_site = get(format!("site={}", site.id)).await;
    let site_actions: Vec<&str> = on_site.iter().map(|e| e.action.as_str()).collect();
    for want in [
        "site.create",
        "site.enroll",
        "request.create",
        "request.end",
    ] {
        assert!(
            site_actions.contains(&want),
            "{want} not in {site_actions:?}"
        );
    }
    assert!(!site_actions.contains(&"technician.login"));
    let later = start.at.0 + 1;
    let since = get(format!("since={later}&kind=request")).await;
    assert!(since.iter().all(|e| e.at.0 >= later));
    assert!(since.iter().all(|e| e.action != "request.create"));
    let until = get(format!("until={later}&kind=request")).await;
    assert!(until.iter().any(|e| e.action == "request.create"));
    tech.get(&format!("{}?kind=a%25", paths::AUDIT))
        .await
        .error(400, Some("kind"));
    // The log cannot be rewritten, not even by the database owner.
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&db.url).await.unwrap();
    assert!(
        sqlx::query("UPDATE audit_log SET actor = 'x'")
            .execute(&pool)
            .await
            .is_err()
    );
    assert!(
        sqlx::query("DELETE FROM audit_log")
            .execute(&pool)
            .await
            .is_err()
    );
    pool.close().await;
    // Logout ends the session.
    assert_eq!(tech.post_empty(paths::LOGOUT).await.status, 204);
    tech.get(paths::REQUESTS).await.error(401, None);
    server.stop().await;
}

async fn long_polls_answer_on_change_and_on_timeout(b: Backend) {
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    let gw = add_gateway(&server, "gw1", 10, 1).await;
    let site = add_site(&server, "A", 1).await;
    let tech = technician(&server, &db, "alice", "correct horse").await;
    let s0 = agent_state(&site, 0, 0).await;
    // Nothing changes: the current document after the wait.
    let t = Instant::now();
    let same = agent_state(&site, s0.version, 300).await;
    assert!(t.elapsed() >= Duration::from_millis(290));
    assert_eq!(same.version, s0.version);
    // An older `after` answers at once.
    let t = Instant::now();
    assert_eq!(
        agent_state(&site, s0.version - 1, 30_000).await.version,
        s0.version
    );
    assert!(t.elapsed() < Duration::from_secs(20));
    // The console feed wakes on a new request.
    let e0: ConsoleEvents = tech.get(paths::CONSOLE_EVENTS).await.json();
    let tech2 = tech.clone();
    let poll = tokio::spawn(async move {
        tech2
            .get(&format!(
                "{}?after={}&wait_ms=30000",
                paths::CONSOLE_EVENTS,
                e0.version
            ))
            .await
            .json::<ConsoleEvents>()
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r: MaintenanceRequestView = site
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
        .await
        .json();
    let e1 = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .unwrap()
        .unwrap();
    assert!(e1.version > e0.version);
    assert_eq!(e1.requests[0].id, r.id);
    // A change of another site does not answer this site's long-poll early.
    let other = add_site(&server, "B", 2).await;
    let s1 = agent_state(&site, 0, 0).await;
    let site2 = Site {
        id: site.id,
        agent: site.agent.clone(),
        credential: site.credential.clone(),
    };
    let t = Instant::now();
    let poll = tokio::spawn(async move { agent_state(&site2, s1.version, 1_500).await });
    let other_req = other
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
        .await;
    assert_eq!(other_req.status, 201);
    let unchanged = poll.await.unwrap();
    assert_eq!(unchanged.version, s1.version);
    // It waited its full time: the other site's change did not answer it.
    assert!(t.elapsed() >= Duration::from_millis(1_500));
    // wait_ms is capped and bad parameters are refused.
    site.agent
        .get(&format!("{}?after=x", paths::AGENT_STATE))
        .await
        .error(400, Some("after"));
    gw.api
        .get(&format!("{}?wait_ms=-1", paths::GATEWAY_STATE))
        .await
        .error(400, Some("wait_ms"));
    let m = server.operator().get(paths::METRICS).await;
    let text = m.body.as_str().unwrap().to_owned();
    assert!(
        text.contains("vpnnat_requests{state=\"waiting\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("vpnnat_gateways{health=\"healthy\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("vpnnat_pool_addresses{use=\"used\"} 2"),
        "{text}"
    );
    assert!(text.contains("vpnnat_long_polls_waiting"), "{text}");
    server.stop().await;
}

async fn versions_survive_a_restart(b: Backend) {
    let db = TestDb::new(b);
    let settings = db.settings();
    let server = TestServer::start(settings.clone()).await;
    let gw = add_gateway(&server, "gw1", 10, 1).await;
    let site = add_site(&server, "A", 1).await;
    site.agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
        .await;
    let s1 = agent_state(&site, 0, 0).await;
    let g1 = gateway_state(&gw, 0, 0).await;
    server.stop().await;
    let server = TestServer::start(settings).await;
    let agent = server.client(Some(&site.credential));
    let s2: AgentDesiredState = agent.get(paths::AGENT_STATE).await.json();
    assert_eq!(s2, s1);
    let gapi = server.client(Some(&gw.credential));
    let g2: GatewayDesiredState = gapi.get(paths::GATEWAY_STATE).await.json();
    assert_eq!(g2, g1);
    agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-2"]))
        .await;
    let s3: AgentDesiredState = agent.get(paths::AGENT_STATE).await.json();
    assert!(s3.version > s1.version);
    server.stop().await;
}
