//! Sites without a router agent in the control plane, each scenario on
//! SQLite and on PostgreSQL: creation (generated or given router key, no
//! enrollment token), requests a technician opens on the customer's
//! behalf (the same pool, gateway and audit as an agent's), the rendered
//! router configuration, and the refusals (bad input, the wrong kind of
//! site, the wrong caller) as 4xx JSON.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::{Value, json};
use vpnnat::messages::*;

both!(
    agentless_sites_are_created_without_a_token_and_validated,
    agentless_requests_are_opened_by_technicians_and_rendered,
    agentless_cli_creates_sites_and_prints_or_writes_the_files,
);

/// A gateway registered with WireGuard and the technician prefix
/// 172.16.0.0/24, healthy.
async fn wireguard_gateway(server: &TestServer, name: &str, n: u8) -> Gw {
    let created: GatewayCreated = server
        .operator()
        .post(paths::GATEWAYS, &NewGateway { name: name.into() })
        .await
        .json();
    let api = server.client(Some(&created.credential));
    let r = api
        .post(
            paths::GATEWAY_REGISTER,
            &GatewayRegistration {
                endpoints: vec![format!("203.0.113.{n}:51820").parse().unwrap()],
                public_key: key(200 + n),
                tunnel_kinds: vec![TunnelKind::Wireguard],
                max_tunnels: 10,
                software_version: "test".into(),
                technician_prefixes: vec!["172.16.0.0/24".parse().unwrap()],
                tls: None,
                next_public_key: None,
            },
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let gw = Gw {
        id: created.gateway_id,
        api,
        credential: created.credential,
    };
    let h = gw.api.post(paths::GATEWAY_HEARTBEAT, &heartbeat(10)).await;
    assert!(h.status.is_success(), "{}", h.body);
    gw
}

fn request(terminals: Value) -> Value {
    json!({
        "requester_name": "Anna Schmidt",
        "level": "general",
        "urgency": "high",
        "phone": "+49 30 1234 567",
        "content": "The till does not print.",
        "terminals": terminals,
    })
}

async fn agentless_sites_are_created_without_a_token_and_validated(b: Backend) {
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    let op = server.operator();

    // Generated key pair: no token in the answer, the router's public key.
    let a = op
        .post(paths::SITES, &json!({ "name": "Bakery", "agent": false }))
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    assert!(a.body.get("enrollment_token").is_none(), "{}", a.body);
    assert!(a.body.get("token_expires_at").is_none(), "{}", a.body);
    let generated: SiteCreated = a.json();
    assert!(!generated.agent);
    let gen_key = generated.public_key.unwrap();
    assert_eq!(
        db.scalar(&format!(
            "SELECT COUNT(*) FROM enrollment_tokens WHERE site_id = {}",
            generated.site_id
        ))
        .await,
        0
    );

    // The router's own key: the files get a placeholder.
    let own: SiteCreated = op
        .post(
            paths::SITES,
            &json!({ "name": "Florist", "agent": false, "public_key": key(77) }),
        )
        .await
        .json();
    assert_eq!(own.public_key, Some(key(77)));
    wireguard_gateway(&server, "gw1", 1).await;
    let cfg: WireguardSiteConfig = op.get(&at(paths::SITE_WIREGUARD, own.site_id)).await.json();
    assert!(!cfg.private_key_included);
    assert!(
        cfg.files[0]
            .content
            .contains("PrivateKey = <the router's own private key>"),
        "{}",
        cfg.files[0].content
    );
    let cfg: WireguardSiteConfig = op
        .get(&at(paths::SITE_WIREGUARD, generated.site_id))
        .await
        .json();
    assert!(cfg.private_key_included);
    assert_eq!(cfg.public_key, gen_key);

    let sites: Vec<SiteView> = op.get(paths::SITES).await.json();
    assert!(sites.iter().all(|s| !s.agent && !s.enrolled), "{sites:?}");

    // Bad input: 4xx JSON naming the field; nothing is created.
    op.post(
        paths::SITES,
        &json!({ "name": "x", "agent": true, "public_key": key(5) }),
    )
    .await
    .error(422, Some("public_key"));
    op.post(
        paths::SITES,
        &json!({ "name": "x", "agent": false, "tunnel": "ipsec" }),
    )
    .await
    .error(422, Some("tunnel"));
    op.post(
        paths::SITES,
        &json!({ "name": "x", "agent": false, "public_key": "short" }),
    )
    .await
    .error(422, Some("public_key"));
    op.post(paths::SITES, &json!({ "name": "x", "agent": "no" }))
        .await
        .error(422, Some("agent"));
    // A key another site uses.
    op.post(
        paths::SITES,
        &json!({ "name": "x", "agent": false, "public_key": key(77) }),
    )
    .await
    .error(409, Some("public_key"));
    let sites: Vec<SiteView> = op.get(paths::SITES).await.json();
    assert_eq!(sites.len(), 2);

    // Nothing enrolls there: no token, no rotation.
    op.post_empty(&at(paths::SITE_TOKEN, generated.site_id))
        .await
        .error(409, None);
    op.post_empty(&at(paths::SITE_ROTATE, generated.site_id))
        .await
        .error(409, None);
    // It stays a WireGuard site.
    op.post(
        &at(paths::SITE_TUNNEL, generated.site_id),
        &json!({ "tunnel": "ipsec" }),
    )
    .await
    .error(409, None);

    // The configuration: the operator or a technician; nobody else.
    server
        .client(None)
        .get(&at(paths::SITE_WIREGUARD, generated.site_id))
        .await
        .error(401, None);
    let tech = technician(&server, &db, "alice", "tech password 1").await;
    assert_eq!(
        tech.get(&at(paths::SITE_WIREGUARD, generated.site_id))
            .await
            .status,
        200
    );
    op.get(&at(paths::SITE_WIREGUARD, 999))
        .await
        .error(404, None);
    op.get("/api/v1/sites/x/wireguard")
        .await
        .error(400, Some("id"));
    // A site with an agent has no rendered configuration.
    let with_agent = add_site(&server, "agent site", 9).await;
    op.get(&at(paths::SITE_WIREGUARD, with_agent.id))
        .await
        .error(409, None);
    // Reading it is audited (with who read it).
    let audit = tech.get(paths::AUDIT).await.body.to_string();
    assert!(audit.contains("site.wireguard_config"), "{audit}");
    assert!(audit.contains("technician:alice"), "{audit}");
}

async fn agentless_requests_are_opened_by_technicians_and_rendered(b: Backend) {
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    let op = server.operator();
    let gw1 = wireguard_gateway(&server, "gw1", 1).await;
    let gw2 = wireguard_gateway(&server, "gw2", 2).await;
    let site: SiteCreated = op
        .post(paths::SITES, &json!({ "name": "Bakery", "agent": false }))
        .await
        .json();
    let path = at(paths::SITE_REQUESTS, site.site_id);
    let tech = technician(&server, &db, "alice", "tech password 1").await;

    // Bad input: 4xx JSON, nothing allocated.
    for (body, field) in [
        (
            request(json!([{ "name": "till", "lan_address": "999.1.1.1" }])),
            "terminals",
        ),
        (
            request(json!([{ "name": "till", "lan_address": "127.0.0.1" }])),
            "terminals",
        ),
        (
            request(json!([{ "name": "till", "lan_address": "224.0.0.1" }])),
            "terminals",
        ),
        (
            request(json!([
                { "name": "till", "lan_address": "192.168.1.10" },
                { "name": "nas", "lan_address": "192.168.1.10" }
            ])),
            "terminals",
        ),
        (request(json!([{ "name": "till" }])), "terminals"),
        (request(json!([])), "terminals"),
        (
            request(json!([{ "name": "-bad", "lan_address": "192.168.1.10" }])),
            "terminals",
        ),
    ] {
        let e = tech.post(&path, &body).await.error(422, None);
        assert!(
            e.field.as_deref().is_some_and(|f| f.starts_with(field)),
            "{e:?}"
        );
    }
    let mut extra = request(json!([{ "name": "till", "lan_address": "192.168.1.10" }]));
    extra["terminal_names"] = json!(["x"]);
    tech.post(&path, &extra).await.error(422, None);
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM nat_addresses WHERE site_id IS NOT NULL")
            .await,
        0
    );

    // Only a technician with the CSRF header.
    let body = request(json!([{ "name": "till", "lan_address": "192.168.1.10" }]));
    op.post(&path, &body).await.error(403, None);
    let mut no_csrf = tech.clone();
    no_csrf.csrf = None;
    no_csrf.post(&path, &body).await.error(403, None);

    // Accepted: the same pool, gateway choice and expiry as an agent's.
    let a = tech.post(&path, &body).await;
    assert_eq!(a.status, 201, "{}", a.body);
    let view: MaintenanceRequestView = a.json();
    assert_eq!(view.state, RequestState::Waiting);
    let nat = view.terminals[0].nat_address.unwrap();
    let carrying = view.gateway_id.unwrap();
    assert!(carrying == gw1.id || carrying == gw2.id);
    let carrier = if carrying == gw1.id { &gw1 } else { &gw2 };
    let state = gateway_state(carrier, 0, 0).await;
    let peer = state
        .peers
        .iter()
        .find(|p| p.site_id == site.site_id)
        .unwrap();
    assert_eq!(Some(peer.public_key), site.public_key);
    assert_eq!(peer.nat_addresses, vec![nat]);
    let audit = tech.get(paths::AUDIT).await.body.to_string();
    assert!(audit.contains("technician:alice"), "{audit}");
    assert!(audit.contains("request.create"), "{audit}");

    // The rendered configuration maps the NAT address onto the LAN host and
    // has one tunnel per gateway.
    let cfg: WireguardSiteConfig = tech
        .get(&at(paths::SITE_WIREGUARD, site.site_id))
        .await
        .json();
    assert_eq!(cfg.gateway_id, Some(carrying));
    assert_eq!(cfg.mappings.len(), 1);
    assert_eq!(cfg.mappings[0].nat_address, nat);
    assert_eq!(cfg.mappings[0].lan_address.to_string(), "192.168.1.10");
    let names: Vec<&str> = cfg.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            format!("vpnnat-g{}.conf", gw1.id),
            format!("vpnnat-g{}.conf", gw2.id),
            "vpnnat-nat.nft".to_owned()
        ]
    );
    assert!(cfg.files[0].content.contains(&key(201).to_base64()));
    assert!(
        cfg.files[1]
            .content
            .contains("Endpoint = 203.0.113.2:51820")
    );
    assert!(cfg.files[0].qr_svg.as_deref().unwrap().contains("<svg"));
    assert!(
        cfg.files[2]
            .content
            .contains(&format!("ip daddr {nat} dnat to 192.168.1.10")),
        "{}",
        cfg.files[2].content
    );

    // Another open request must agree on the terminals' LAN addresses.
    tech.post(
        &path,
        &request(json!([{ "name": "till", "lan_address": "192.168.1.11" }])),
    )
    .await
    .error(409, Some("terminals"));
    tech.post(
        &path,
        &request(json!([{ "name": "nas", "lan_address": "192.168.1.10" }])),
    )
    .await
    .error(409, Some("terminals"));
    // The same terminal again keeps its NAT address.
    let again: MaintenanceRequestView = tech.post(&path, &body).await.json();
    assert_eq!(again.terminals[0].nat_address, Some(nat));

    // The wrong kind of site, both ways.
    let with_agent = add_site(&server, "agent site", 9).await;
    tech.post(&at(paths::SITE_REQUESTS, with_agent.id), &body)
        .await
        .error(409, None);
    tech.post(&at(paths::SITE_REQUESTS, 999), &body)
        .await
        .error(404, None);
    let dbh = maintenance_server::db::Database::connect(&db.url, 1)
        .await
        .unwrap();
    let mut tx = dbh.begin().await.unwrap();
    let origin = maintenance_server::db::ops::Origin {
        actor: format!("site:{}", site.site_id),
        global_address: None,
        failure_id: None,
        lan_addresses: Vec::new(),
    };
    let refused = maintenance_server::db::ops::new_request(
        &mut tx,
        site.site_id,
        &new_request(&["till"]),
        &origin,
        maintenance_server::db::now_ms(),
        &maintenance_server::db::ops::Policy::new(&db.settings()),
    )
    .await;
    assert!(
        matches!(
            refused,
            Err(maintenance_server::db::ops::OpError::InvalidState(_))
        ),
        "{refused:?}"
    );
    drop(tx);

    // Ending both requests empties the NAT rules and frees the address.
    for id in [view.id, again.id] {
        let r = tech.post_empty(&at(paths::REQUEST_END, id)).await;
        assert!(r.status.is_success(), "{}", r.body);
    }
    let cfg: WireguardSiteConfig = op
        .get(&at(paths::SITE_WIREGUARD, site.site_id))
        .await
        .json();
    assert!(cfg.mappings.is_empty());
    assert!(!cfg.files[2].content.contains("dnat"));
    assert_eq!(cfg.gateway_id, None);

    // A disabled site takes no request.
    let disable = at(paths::SITE_DISABLE, site.site_id);
    assert_eq!(
        op.post(&disable, &json!({ "disabled": true })).await.status,
        204
    );
    tech.post(&path, &body).await.error(409, None);
    assert_eq!(
        op.post(&disable, &json!({ "disabled": false }))
            .await
            .status,
        204
    );
    assert_eq!(tech.post(&path, &body).await.status, 201);
}

async fn agentless_cli_creates_sites_and_prints_or_writes_the_files(b: Backend) {
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
    let cli = |args: &[&str]| {
        let out = vpnnat_test_support::run_with_input(
            std::process::Command::new(env!("CARGO_BIN_EXE_maintenance-server"))
                .env_remove("RUST_LOG")
                .arg("--config")
                .arg(&config)
                .args(args),
            None,
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = cli(&["site", "add", "Bakery", "--agentless"]);
    assert!(
        out.starts_with("site 1: Bakery (no agent; router public key "),
        "{out}"
    );
    assert!(!out.contains("vnenroll_"), "{out}");
    let own = key(42).to_base64();
    let out = cli(&[
        "site",
        "add",
        "Florist",
        "--agentless",
        "--public-key",
        &own,
    ]);
    assert!(out.contains(&own), "{out}");
    // --public-key only with --agentless; a bad key is refused.
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_maintenance-server"))
        .arg("--config")
        .arg(&config)
        .args(["site", "add", "x", "--public-key", &own])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_maintenance-server"))
        .arg("--config")
        .arg(&config)
        .args(["site", "add", "x", "--agentless", "--public-key", "nope"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let list = cli(&["site", "list"]);
    assert_eq!(list.matches("no agent").count(), 2, "{list}");

    let out = cli(&["site", "wireguard-config", "1"]);
    assert!(out.contains("# ---- vpnnat-nat.nft"), "{out}");
    assert!(out.contains("flush table ip vpnnat"), "{out}");
    let dir = db.dir.path().join("router");
    std::fs::create_dir_all(&dir).unwrap();
    let out = cli(&[
        "site",
        "wireguard-config",
        "2",
        "--dir",
        dir.to_str().unwrap(),
    ]);
    assert!(out.contains("wrote "), "{out}");
    assert!(out.contains("placeholder"), "{out}");
    let nft = std::fs::read_to_string(dir.join("vpnnat-nat.nft")).unwrap();
    assert!(nft.contains("table ip vpnnat {"), "{nft}");
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_maintenance-server"))
        .arg("--config")
        .arg(&config)
        .args(["site", "token", "1"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("no agent"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
