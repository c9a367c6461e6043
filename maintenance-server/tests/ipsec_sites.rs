//! IPsec sites in the control plane, each scenario on SQLite and on
//! PostgreSQL: the per-site `tunnel` setting, the pre-shared key (length,
//! randomness, uniqueness, rotation, and where it must never appear), the
//! IPsec parameters in the agent's and the gateway's desired states,
//! placement by tunnel kind, and the operator's parameters endpoint for a
//! router configured by hand.
//!
//! Every event the server logs in this test process is captured (a global
//! subscriber, all levels, the database driver's included) and searched for
//! the keys.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Mutex, Once};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::*;
use serde_json::json;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::{Layer, Registry};
use vpnnat::ipv4::Prefix;
use vpnnat::messages::*;

both!(
    the_tunnel_setting_round_trips_and_is_validated,
    psks_are_long_random_unique_and_stay_out_of_logs_audit_and_other_documents,
    desired_states_carry_the_ipsec_parameters,
    placement_follows_the_tunnel_kind,
    the_parameters_endpoint_is_operator_only_audited_and_ipsec_only,
    rotation_replaces_the_psk_everywhere,
    the_cli_sets_the_kind_and_prints_the_parameters,
);

static LOGGED: Mutex<String> = Mutex::new(String::new());

struct Capture;

struct Text<'a>(&'a mut String);

impl Visit for Text<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push_str(&format!(" {}={value}", field.name()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={value:?}", field.name()));
    }
}

impl<S: Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut line = String::new();
        event.record(&mut Text(&mut line));
        let mut all = LOGGED.lock().unwrap_or_else(|e| e.into_inner());
        all.push_str(&line);
        all.push('\n');
    }
}

/// Captures every event of this process from now on.
fn capture() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        tracing::subscriber::set_global_default(Registry::default().with(Capture)).unwrap();
    });
}

fn logged() -> String {
    LOGGED.lock().unwrap().clone()
}

const TECHNICIANS: &str = "172.16.0.0/24";

/// A gateway that registers with IPsec (and WireGuard) and its technician prefix.
async fn add_ipsec_gateway(server: &TestServer, name: &str, max_tunnels: u32, n: u8) -> Gw {
    let created: GatewayCreated = server
        .operator()
        .post(paths::GATEWAYS, &NewGateway { name: name.into() })
        .await
        .json();
    let api = server.client(Some(&created.credential));
    let reg = api
        .post(
            paths::GATEWAY_REGISTER,
            &GatewayRegistration {
                endpoints: vec![format!("203.0.113.{n}:51820").parse().unwrap()],
                public_key: key(200 + n),
                tunnel_kinds: vec![TunnelKind::Wireguard, TunnelKind::Ipsec],
                max_tunnels,
                software_version: "test".into(),
                technician_prefixes: vec![TECHNICIANS.parse().unwrap()],
                tls: None,
                next_public_key: None,
            },
        )
        .await;
    assert_eq!(reg.status, 200, "{}", reg.body);
    Gw {
        id: created.gateway_id,
        api,
        credential: created.credential,
    }
}

/// Creates a site of `kind` (not enrolled).
async fn create_site(server: &TestServer, name: &str, kind: TunnelKind) -> SiteCreated {
    let r = server
        .operator()
        .post(
            paths::SITES,
            &NewSite {
                name: name.into(),
                tunnel: kind,
                ..Default::default()
            },
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()
}

/// Creates and enrolls an IPsec site.
async fn add_ipsec_site(server: &TestServer, name: &str, key_byte: u8) -> Site {
    let created = create_site(server, name, TunnelKind::Ipsec).await;
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
    Site {
        id: enrolled.site_id,
        agent: server.client(Some(&enrolled.credential)),
        credential: enrolled.credential,
    }
}

async fn site_view(server: &TestServer, site: SiteId) -> SiteView {
    let sites: Vec<SiteView> = server.operator().get(paths::SITES).await.json();
    sites.into_iter().find(|s| s.site_id == site).unwrap()
}

async fn ipsec_config(server: &TestServer, site: SiteId) -> IpsecSiteConfig {
    let r = server.operator().get(&at(paths::SITE_IPSEC, site)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

async fn set_tunnel(server: &TestServer, site: SiteId, kind: TunnelKind) -> Answer {
    server
        .operator()
        .post(&at(paths::SITE_TUNNEL, site), &SiteTunnel { tunnel: kind })
        .await
}

fn host(a: std::net::Ipv4Addr) -> Prefix {
    Prefix::new(a, 32).unwrap()
}

async fn the_tunnel_setting_round_trips_and_is_validated(b: Backend) {
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    let op = server.operator();
    // Absent means WireGuard.
    let plain: SiteCreated = op
        .post(paths::SITES, &json!({ "name": "plain" }))
        .await
        .json();
    assert_eq!(
        site_view(&server, plain.site_id).await.tunnel,
        TunnelKind::Wireguard
    );
    let ipsec = create_site(&server, "ipsec", TunnelKind::Ipsec).await;
    assert_eq!(
        site_view(&server, ipsec.site_id).await.tunnel,
        TunnelKind::Ipsec
    );
    let listed = op.get(paths::SITES).await.body.to_string();
    assert!(listed.contains(r#""tunnel":"ipsec""#), "{listed}");

    // Bad input names the field; nothing is created.
    op.post(paths::SITES, &json!({ "name": "x", "tunnel": "gre" }))
        .await
        .error(422, Some("tunnel"));
    op.post(paths::SITES, &json!({ "name": "x", "tunnel": 1 }))
        .await
        .error(422, Some("tunnel"));
    let sites: Vec<SiteView> = op.get(paths::SITES).await.json();
    assert_eq!(sites.len(), 2);
    op.post(
        &at(paths::SITE_TUNNEL, plain.site_id),
        &json!({ "tunnel": "ppp" }),
    )
    .await
    .error(422, Some("tunnel"));
    op.post(
        &at(paths::SITE_TUNNEL, plain.site_id),
        &json!({ "tunnel": "ipsec", "psk": "mine" }),
    )
    .await
    .error(422, Some("psk"));
    op.post(&at(paths::SITE_TUNNEL, 999), &json!({ "tunnel": "ipsec" }))
        .await
        .error(404, None);
    op.post("/api/v1/sites/zero/tunnel", &json!({ "tunnel": "ipsec" }))
        .await
        .error(400, Some("id"));
    // Only the operator.
    server
        .client(None)
        .post(
            &at(paths::SITE_TUNNEL, plain.site_id),
            &json!({ "tunnel": "ipsec" }),
        )
        .await
        .error(401, None);

    // Update: WireGuard → IPsec gets a key, back to WireGuard drops it.
    assert_eq!(
        set_tunnel(&server, plain.site_id, TunnelKind::Ipsec)
            .await
            .status,
        204
    );
    assert_eq!(
        site_view(&server, plain.site_id).await.tunnel,
        TunnelKind::Ipsec
    );
    let cfg = ipsec_config(&server, plain.site_id).await;
    assert_eq!(STANDARD.decode(&cfg.ipsec.psk).unwrap().len(), 32);
    // Setting the same kind again changes nothing (not even the key).
    assert_eq!(
        set_tunnel(&server, plain.site_id, TunnelKind::Ipsec)
            .await
            .status,
        204
    );
    assert_eq!(
        ipsec_config(&server, plain.site_id).await.ipsec.psk,
        cfg.ipsec.psk
    );
    assert_eq!(
        set_tunnel(&server, plain.site_id, TunnelKind::Wireguard)
            .await
            .status,
        204
    );
    op.get(&at(paths::SITE_IPSEC, plain.site_id))
        .await
        .error(404, None);
    assert_eq!(
        db.scalar(&format!(
            "SELECT COUNT(*) FROM sites WHERE id = {} AND ipsec_psk IS NULL",
            plain.site_id
        ))
        .await,
        1
    );

    // Refused while the site has a tunnel.
    let gw = add_ipsec_gateway(&server, "gw1", 10, 1).await;
    gw.api.post(paths::GATEWAY_HEARTBEAT, &heartbeat(10)).await;
    let site = add_ipsec_site(&server, "busy", 30).await;
    let r = site
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let e = set_tunnel(&server, site.id, TunnelKind::Wireguard)
        .await
        .error(409, None);
    assert_eq!(e.error, "invalid_state");
    assert_eq!(site_view(&server, site.id).await.tunnel, TunnelKind::Ipsec);
    server.stop().await;
}

async fn psks_are_long_random_unique_and_stay_out_of_logs_audit_and_other_documents(b: Backend) {
    capture();
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    let gw = add_ipsec_gateway(&server, "gw1", 10, 1).await;
    gw.api.post(paths::GATEWAY_HEARTBEAT, &heartbeat(10)).await;
    let other_gw = add_ipsec_gateway(&server, "gw2", 10, 2).await;
    other_gw
        .api
        .post(paths::GATEWAY_HEARTBEAT, &heartbeat(10))
        .await;
    let a = add_ipsec_site(&server, "A", 1).await;
    let b_site = add_ipsec_site(&server, "B", 2).await;
    let wg = add_site(&server, "W", 3).await;
    for s in [&a, &b_site, &wg] {
        let r = s
            .agent
            .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    report_applied(&gw).await;
    report_applied(&other_gw).await;

    let mut psks = Vec::new();
    for s in [&a, &b_site] {
        let cfg = ipsec_config(&server, s.id).await;
        let bytes = STANDARD.decode(&cfg.ipsec.psk).unwrap();
        assert_eq!(bytes.len(), 32, "{}", cfg.ipsec.psk);
        // 32 bytes from a CSPRNG: not constant, not a short repeated pattern.
        assert!(
            bytes
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                > 8,
            "{bytes:?}"
        );
        cfg.ipsec.validate().unwrap();
        psks.push(cfg.ipsec.psk);
    }
    // Many more: all distinct.
    let mut seen: std::collections::BTreeSet<String> = psks.iter().cloned().collect();
    for i in 0..20 {
        let c = create_site(&server, &format!("more{i}"), TunnelKind::Ipsec).await;
        assert!(seen.insert(ipsec_config(&server, c.site_id).await.ipsec.psk));
    }

    // Each agent sees its own key only.
    let a_state = serde_json::to_string(&agent_state(&a, 0, 0).await).unwrap();
    let b_state = serde_json::to_string(&agent_state(&b_site, 0, 0).await).unwrap();
    let wg_state = serde_json::to_string(&agent_state(&wg, 0, 0).await).unwrap();
    assert!(
        a_state.contains(&psks[0]) && !a_state.contains(&psks[1]),
        "{a_state}"
    );
    assert!(
        b_state.contains(&psks[1]) && !b_state.contains(&psks[0]),
        "{b_state}"
    );
    assert!(!wg_state.contains(&psks[0]) && !wg_state.contains(&psks[1]));
    // Gateways see the keys of the sites they carry only.
    let gw1 = gateway_state(&gw, 0, 0).await;
    let gw2 = gateway_state(&other_gw, 0, 0).await;
    for (i, s) in [&a, &b_site].into_iter().enumerate() {
        let (mine, other) = if gw1.peers.iter().any(|p| p.site_id == s.id) {
            (&gw1, &gw2)
        } else {
            (&gw2, &gw1)
        };
        assert!(serde_json::to_string(mine).unwrap().contains(&psks[i]));
        assert!(!serde_json::to_string(other).unwrap().contains(&psks[i]));
    }
    // Nor in the site list, the console feed, the audit log or any log line.
    let tech = technician(&server, &db, "alice", "correct horse").await;
    let listed = server.operator().get(paths::SITES).await.body.to_string();
    let audit = tech.get(&format!("{}?limit=500", paths::AUDIT)).await;
    assert_eq!(audit.status, 200);
    let audit = audit.body.to_string();
    assert!(audit.contains("site.ipsec_config"), "{audit}");
    let events = tech.get(paths::CONSOLE_EVENTS).await.body.to_string();
    let rotated: SiteCreated = server
        .operator()
        .post_empty(&at(paths::SITE_ROTATE, a.id))
        .await
        .json();
    assert!(!rotated.enrollment_token.is_empty());
    let log = logged();
    assert!(log.contains("site.id"), "the capture works: {log}");
    for psk in seen
        .iter()
        .chain([&ipsec_config(&server, a.id).await.ipsec.psk])
    {
        assert!(!listed.contains(psk.as_str()));
        assert!(!audit.contains(psk.as_str()));
        assert!(!events.contains(psk.as_str()));
        assert!(!log.contains(psk.as_str()), "a key was logged");
    }
    server.stop().await;
}

async fn desired_states_carry_the_ipsec_parameters(b: Backend) {
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    let gw = add_ipsec_gateway(&server, "gw1", 10, 7).await;
    gw.api.post(paths::GATEWAY_HEARTBEAT, &heartbeat(10)).await;
    let site = add_ipsec_site(&server, "A", 1).await;
    let view: MaintenanceRequestView = site
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1", "pc-2"]))
        .await
        .json();
    let nat: Vec<_> = view
        .terminals
        .iter()
        .map(|t| t.nat_address.unwrap())
        .collect();
    let psk = ipsec_config(&server, site.id).await.ipsec.psk;

    let g = gateway_state(&gw, 0, 0).await;
    let peer = g.peers.iter().find(|p| p.site_id == site.id).unwrap();
    assert_eq!(peer.tunnel, TunnelKind::Ipsec);
    let p = peer.ipsec.as_ref().unwrap();
    assert_eq!(p.psk, psk);
    assert_eq!(p.local_id, format!("gw-{}.vpnnat", site.id));
    assert_eq!(p.remote_id, format!("site-{}.vpnnat", site.id));
    assert_eq!(p.ike_proposal, "aes256gcm16-prfsha256-x25519-modp2048");
    assert_eq!(p.esp_proposal, "aes256gcm16-x25519-modp2048");
    assert_eq!(p.local_ts, vec![TECHNICIANS.parse::<Prefix>().unwrap()]);
    let mut site_ts: Vec<Prefix> = nat.iter().copied().map(host).collect();
    site_ts.sort();
    assert_eq!(p.remote_ts, site_ts);
    p.validate().unwrap();
    // On the wire a WireGuard peer carries no `ipsec` at all.
    let wg = add_site(&server, "W", 2).await;
    wg.agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
        .await;
    let raw = gw
        .api
        .get(&format!("{}?after=0", paths::GATEWAY_STATE))
        .await
        .body;
    let wg_peer = raw["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["site_id"] == json!(wg.id.0))
        .unwrap();
    assert_eq!(wg_peer["tunnel"], "wireguard");
    assert!(wg_peer.get("ipsec").is_none(), "{wg_peer}");

    // The agent learns its tunnel once the gateway applied the peer.
    assert!(agent_state(&site, 0, 0).await.tunnel.is_none());
    report_applied(&gw).await;
    let a = agent_state(&site, 0, 0).await;
    let t = a.tunnel.unwrap();
    assert_eq!(t.kind, TunnelKind::Ipsec);
    assert_eq!(t.gateway_id, gw.id);
    assert_eq!(t.endpoint, "203.0.113.7:500".parse().unwrap());
    let p = t.ipsec.unwrap();
    assert_eq!(p.psk, psk);
    assert_eq!(p.local_id, format!("site-{}.vpnnat", site.id));
    assert_eq!(p.remote_id, format!("gw-{}.vpnnat", site.id));
    assert_eq!(p.local_ts, site_ts);
    assert_eq!(p.remote_ts, vec![TECHNICIANS.parse::<Prefix>().unwrap()]);
    p.validate().unwrap();

    // New technician prefixes at the next registration reach both documents.
    let before = a.version;
    let reg = gw
        .api
        .post(
            paths::GATEWAY_REGISTER,
            &GatewayRegistration {
                endpoints: vec!["203.0.113.7:51820".parse().unwrap()],
                public_key: key(207),
                tunnel_kinds: vec![TunnelKind::Wireguard, TunnelKind::Ipsec],
                max_tunnels: 10,
                software_version: "test".into(),
                technician_prefixes: vec![
                    TECHNICIANS.parse().unwrap(),
                    "172.16.9.0/24".parse().unwrap(),
                ],
                tls: None,
                next_public_key: None,
            },
        )
        .await;
    assert_eq!(reg.status, 200, "{}", reg.body);
    let g = gateway_state(&gw, 0, 0).await;
    let p = g.peers.iter().find(|p| p.site_id == site.id).unwrap();
    assert_eq!(p.ipsec.as_ref().unwrap().local_ts.len(), 2);
    report_applied(&gw).await;
    let a = agent_state(&site, before, 5_000).await;
    assert!(a.version > before);
    assert_eq!(a.tunnel.unwrap().ipsec.unwrap().remote_ts.len(), 2);
    server.stop().await;
}

async fn placement_follows_the_tunnel_kind(b: Backend) {
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    // Only a WireGuard gateway: the IPsec site is refused, worded for its kind.
    let wg_gw = add_gateway(&server, "wg", 10, 1).await;
    wg_gw
        .api
        .post(paths::GATEWAY_HEARTBEAT, &heartbeat(10))
        .await;
    let site = add_ipsec_site(&server, "A", 1).await;
    let e = site
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
        .await
        .error(503, None);
    assert_eq!(e.error, "no_capacity");
    assert!(e.message.contains("IPsec"), "{}", e.message);
    let problem = agent_state(&site, 0, 0).await.problem.unwrap();
    assert!(problem.contains("IPsec"), "{problem}");
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM nat_addresses WHERE site_id IS NOT NULL")
            .await,
        0
    );
    // A WireGuard site still goes to the WireGuard gateway.
    let wg = add_site(&server, "W", 2).await;
    let r: MaintenanceRequestView = wg
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
        .await
        .json();
    assert_eq!(r.gateway_id, Some(wg_gw.id));

    // An IPsec gateway arrives: the site is placed there, never on the other.
    let ipsec_gw = add_ipsec_gateway(&server, "ipsec", 10, 2).await;
    ipsec_gw
        .api
        .post(paths::GATEWAY_HEARTBEAT, &heartbeat(10))
        .await;
    let r: MaintenanceRequestView = site
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
        .await
        .json();
    assert_eq!(r.gateway_id, Some(ipsec_gw.id));
    assert!(agent_state(&site, 0, 0).await.problem.is_none());
    assert!(
        gateway_state(&wg_gw, 0, 0)
            .await
            .peers
            .iter()
            .all(|p| p.site_id != site.id)
    );

    // Failover: with the IPsec gateway down and only WireGuard left, the
    // site is stranded, not moved onto a gateway that cannot run it.
    let op = server.operator();
    let r = op
        .post(
            &at(paths::GATEWAY_DISABLE, ipsec_gw.id),
            &SetDisabled { disabled: true },
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let a = agent_state(&site, 0, 0).await;
        if a.problem.is_some() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never stranded: {a:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        gateway_state(&wg_gw, 0, 0)
            .await
            .peers
            .iter()
            .all(|p| p.site_id != site.id)
    );
    // A second IPsec gateway takes it over.
    let spare = add_ipsec_gateway(&server, "ipsec2", 10, 3).await;
    spare
        .api
        .post(paths::GATEWAY_HEARTBEAT, &heartbeat(10))
        .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !gateway_state(&spare, 0, 0)
        .await
        .peers
        .iter()
        .any(|p| p.site_id == site.id)
    {
        assert!(std::time::Instant::now() < deadline, "never moved");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    server.stop().await;
}

async fn the_parameters_endpoint_is_operator_only_audited_and_ipsec_only(b: Backend) {
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    let gw = add_ipsec_gateway(&server, "gw1", 10, 4).await;
    gw.api.post(paths::GATEWAY_HEARTBEAT, &heartbeat(10)).await;
    // A router configured by hand: the site is never enrolled.
    let hand = create_site(&server, "hand", TunnelKind::Ipsec).await;
    let agent_site = add_ipsec_site(&server, "agent", 1).await;
    let wg = add_site(&server, "W", 2).await;
    let path = at(paths::SITE_IPSEC, hand.site_id);

    let cfg = ipsec_config(&server, hand.site_id).await;
    assert_eq!(cfg.site_id, hand.site_id);
    assert_eq!(cfg.name, "hand");
    assert_eq!(cfg.gateway_id, None);
    assert_eq!(
        cfg.gateway_addresses,
        vec!["203.0.113.4".parse::<std::net::IpAddr>().unwrap()]
    );
    let p = &cfg.ipsec;
    assert_eq!(p.local_id, format!("site-{}.vpnnat", hand.site_id));
    assert_eq!(p.remote_id, format!("gw-{}.vpnnat", hand.site_id));
    assert_eq!(p.remote_ts, vec![TECHNICIANS.parse::<Prefix>().unwrap()]);
    assert!(p.local_ts.is_empty());
    for line in [
        "remote_addrs = 203.0.113.4".to_owned(),
        format!("id = {}", p.local_id),
        format!("id = {}", p.remote_id),
        format!("remote_ts = {TECHNICIANS}"),
        format!("secret = \"{}\"", p.psk),
        "proposals = aes256gcm16-prfsha256-x25519-modp2048".to_owned(),
        "esp_proposals = aes256gcm16-x25519-modp2048".to_owned(),
    ] {
        assert!(
            cfg.swanctl_conf.lines().any(|l| l.trim() == line),
            "{line:?} missing:\n{}",
            cfg.swanctl_conf
        );
    }
    // Each read is audited, without the key.
    let n = db
        .scalar("SELECT COUNT(*) FROM audit_log WHERE action = 'site.ipsec_config'")
        .await;
    assert_eq!(n, 1);
    assert_eq!(
        db.scalar(&format!(
            "SELECT COUNT(*) FROM audit_log WHERE detail LIKE '%{}%'",
            p.psk
        ))
        .await,
        0
    );

    // Only the operator: not the site itself, a gateway, a technician or anyone.
    server.client(None).get(&path).await.error(401, None);
    let e = agent_site.agent.get(&path).await;
    assert!(e.status == 401 || e.status == 403, "{}", e.status);
    let own = agent_site
        .agent
        .get(&at(paths::SITE_IPSEC, agent_site.id))
        .await;
    assert!(own.status == 401 || own.status == 403, "{}", own.status);
    let e = gw.api.get(&path).await;
    assert!(e.status == 401 || e.status == 403, "{}", e.status);
    let tech = technician(&server, &db, "alice", "correct horse").await;
    let e = tech.get(&path).await;
    assert!(e.status == 401 || e.status == 403, "{}", e.status);
    // Refused reads are not audited.
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM audit_log WHERE action = 'site.ipsec_config'")
            .await,
        1
    );

    // 404 for a WireGuard site and an unknown one; 400 for a bad id; no query.
    let op = server.operator();
    op.get(&at(paths::SITE_IPSEC, wg.id)).await.error(404, None);
    op.get(&at(paths::SITE_IPSEC, 999)).await.error(404, None);
    op.get("/api/v1/sites/x/ipsec").await.error(400, Some("id"));
    op.get(&format!("{path}?secret=1"))
        .await
        .error(400, Some("secret"));

    // With a request open, the site's traffic selectors are its NAT addresses
    // and the carrying gateway comes first.
    let view: MaintenanceRequestView = agent_site
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
        .await
        .json();
    let cfg = ipsec_config(&server, agent_site.id).await;
    assert_eq!(cfg.gateway_id, Some(gw.id));
    assert_eq!(
        cfg.ipsec.local_ts,
        vec![host(view.terminals[0].nat_address.unwrap())]
    );
    assert!(
        cfg.swanctl_conf.contains(&format!(
            "local_ts = {}/32",
            view.terminals[0].nat_address.unwrap()
        )),
        "{}",
        cfg.swanctl_conf
    );
    server.stop().await;
}

async fn rotation_replaces_the_psk_everywhere(b: Backend) {
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    let gw = add_ipsec_gateway(&server, "gw1", 10, 5).await;
    gw.api.post(paths::GATEWAY_HEARTBEAT, &heartbeat(10)).await;
    let site = add_ipsec_site(&server, "A", 1).await;
    site.agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
        .await;
    report_applied(&gw).await;
    let old = ipsec_config(&server, site.id).await.ipsec.psk;
    let g0 = gateway_state(&gw, 0, 0).await;

    let rotated: SiteCreated = server
        .operator()
        .post_empty(&at(paths::SITE_ROTATE, site.id))
        .await
        .json();
    let new = ipsec_config(&server, site.id).await.ipsec.psk;
    assert_ne!(old, new);
    assert_eq!(STANDARD.decode(&new).unwrap().len(), 32);
    // The gateway's document changed and carries the new key only.
    let g1 = gateway_state(&gw, g0.version, 5_000).await;
    assert!(g1.version > g0.version);
    let text = serde_json::to_string(&g1).unwrap();
    assert!(text.contains(&new) && !text.contains(&old));
    // The agent, enrolled again, gets the new key.
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
    let agent = Site {
        id: site.id,
        agent: server.client(Some(&enrolled.credential)),
        credential: enrolled.credential,
    };
    report_applied(&gw).await;
    let a = agent_state(&agent, 0, 0).await;
    assert_eq!(a.tunnel.unwrap().ipsec.unwrap().psk, new);
    let audit = db
        .scalar("SELECT COUNT(*) FROM audit_log WHERE action = 'site.rotate' AND detail LIKE '%pre-shared key%'")
        .await;
    assert_eq!(audit, 1);
    // A WireGuard site's rotation touches no key.
    let wg = add_site(&server, "W", 2).await;
    server
        .operator()
        .post_empty(&at(paths::SITE_ROTATE, wg.id))
        .await;
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM sites WHERE ipsec_psk IS NOT NULL")
            .await,
        1
    );
    server.stop().await;
}

/// Runs the binary on the test's database; its standard output, or a panic
/// with its standard error.
fn cli(config: &std::path::Path, args: &[&str], ok: bool) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_maintenance-server"))
        .env_remove("RUST_LOG")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    assert_eq!(
        out.status.success(),
        ok,
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if ok {
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else {
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

async fn the_cli_sets_the_kind_and_prints_the_parameters(b: Backend) {
    let db = TestDb::new(b);
    let config = db.dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[state]\ndir = \"{}\"\n[database]\nurl = \"{}\"\n",
            db.dir.path().join("state").display(),
            db.url
        ),
    )
    .unwrap();
    let out = cli(&config, &["site", "add", "hand", "--tunnel", "ipsec"], true);
    assert!(out.starts_with("site 1: hand"), "{out}");
    cli(&config, &["site", "add", "plain"], true);
    let err = cli(&config, &["site", "add", "x", "--tunnel", "gre"], false);
    assert!(err.contains("gre"), "{err}");
    let list = cli(&config, &["site", "list"], true);
    assert!(list.lines().next().unwrap().contains("TUNNEL"), "{list}");
    assert!(list.lines().nth(1).unwrap().contains(" ipsec "), "{list}");
    assert!(
        list.lines().nth(2).unwrap().contains(" wireguard "),
        "{list}"
    );

    let out = cli(&config, &["site", "ipsec-config", "1"], true);
    let psk = out
        .lines()
        .find_map(|l| l.strip_prefix("pre-shared key:"))
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(STANDARD.decode(&psk).unwrap().len(), 32);
    for needle in [
        "site identity:     site-1.vpnnat (ID_FQDN)",
        "gateway identity:  gw-1.vpnnat (ID_FQDN)",
        "IKE proposal:      aes256gcm16-prfsha256-x25519-modp2048",
        "ESP proposal:      aes256gcm16-x25519-modp2048",
        "# swanctl.conf",
        "connections {",
    ] {
        assert!(out.contains(needle), "{needle:?} missing:\n{out}");
    }
    assert!(out.contains(&format!("secret = \"{psk}\"")), "{out}");
    // A WireGuard site has none; switching it makes one, with its own key.
    let err = cli(&config, &["site", "ipsec-config", "2"], false);
    assert!(err.contains("not found"), "{err}");
    assert_eq!(
        cli(&config, &["site", "tunnel", "2", "ipsec"], true).trim(),
        "site 2: tunnel ipsec"
    );
    let out2 = cli(&config, &["site", "ipsec-config", "2"], true);
    assert!(!out2.contains(&psk), "{out2}");
    // Rotation replaces the key.
    cli(&config, &["site", "rotate", "1"], true);
    let out = cli(&config, &["site", "ipsec-config", "1"], true);
    assert!(!out.contains(&psk), "{out}");
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM audit_log WHERE action = 'site.ipsec_config'")
            .await,
        3
    );
}
