//! The TLS fallback through the control plane, on SQLite and PostgreSQL: a
//! gateway registers its TLS endpoint and pin, the agent gets them with its
//! site's token, the gateway gets only the token's hash, and the transport
//! a heartbeat reports shows in the operator's site list.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use sha2::Digest as _;
use vpnnat::messages::*;

both!(the_tls_offer_reaches_the_agent_and_the_token_hash_the_gateway);

fn sha256_hex(s: &str) -> String {
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn the_tls_offer_reaches_the_agent_and_the_token_hash_the_gateway(b: Backend) {
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    let gw = add_gateway(&server, "gw1", 10, 1).await;
    let tls = GatewayTls {
        endpoints: vec!["203.0.113.1:443".parse().unwrap()],
        spki_sha256: "5a".repeat(32),
    };
    let r = gw
        .api
        .post(
            paths::GATEWAY_REGISTER,
            &GatewayRegistration {
                endpoints: vec!["203.0.113.1:51820".parse().unwrap()],
                public_key: key(201),
                tunnel_kinds: vec![TunnelKind::Wireguard],
                max_tunnels: 10,
                software_version: "test".into(),
                technician_prefixes: Vec::new(),
                tls: Some(tls.clone()),
                next_public_key: None,
            },
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let site = add_site(&server, "Bakery", 1).await;
    let a = site
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    report_applied(&gw).await;

    let peers = gateway_state(&gw, 0, 0).await.peers;
    let hash = peers[0].tls_token_sha256.clone().expect("a token hash");
    let agent = agent_state(&site, 0, 0).await.tunnel.unwrap().tls.unwrap();
    assert_eq!(agent.endpoint, tls.endpoints[0]);
    assert_eq!(agent.spki_sha256, tls.spki_sha256);
    assert_eq!(sha256_hex(&agent.token), hash, "the gateway holds its hash");
    assert_ne!(agent.token, hash);

    let views: Vec<GatewayView> = server.operator().get(paths::GATEWAYS).await.json();
    assert_eq!(views[0].tls.as_ref(), Some(&tls));

    let mut hb = heartbeat(10);
    hb.peers = vec![PeerStatus {
        site_id: site.id,
        endpoint: Some("198.51.100.9:40000".parse().unwrap()),
        last_handshake: None,
        rx_bytes: 0,
        tx_bytes: 0,
        transport: Some(Transport::TlsProxy),
    }];
    let r = gw.api.post(paths::GATEWAY_HEARTBEAT, &hb).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let sites: Vec<SiteView> = server.operator().get(paths::SITES).await.json();
    let view = sites.iter().find(|s| s.site_id == site.id).unwrap();
    assert_eq!(view.transport, Some(Transport::TlsProxy));
}
