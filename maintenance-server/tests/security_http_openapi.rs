//! The OpenAPI document against the server: every documented operation is
//! called (with valid credentials and a valid body) on an in-process
//! server, and its status and content type must be among the documented
//! ones; every route of the router is documented and every documented
//! operation is routed.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::{Value, json};
use vpnnat::messages::*;

/// `type/subtype` of a content type, without parameters.
fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_http_every_documented_operation_answers_as_documented() {
    let db = TestDb::new(Backend::Sqlite);
    let server = TestServer::start(db.settings()).await;
    let gw = add_gateway(&server, "gw1", 10, 1).await;
    gw.api.post(paths::GATEWAY_HEARTBEAT, &heartbeat(10)).await;
    let site = add_site(&server, "A", 1).await;
    let request: MaintenanceRequestView = site
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
        .await
        .json();
    let tech = technician(&server, &db, "alice", "correct horse").await;
    let fresh_site: SiteCreated = server
        .operator()
        .post(
            paths::SITES,
            &NewSite {
                name: "B".into(),
                tunnel: TunnelKind::Wireguard,
                ..Default::default()
            },
        )
        .await
        .json();
    // Each destructive operator operation gets an object of its own, so that
    // the order of the calls does not matter.
    let mut spare_gateways = Vec::new();
    for (i, path) in [
        paths::GATEWAY,
        paths::GATEWAY_DISABLE,
        paths::GATEWAY_ROTATE,
        paths::GATEWAY_ROTATE_KEY,
    ]
    .into_iter()
    .enumerate()
    {
        let n = u8::try_from(i).unwrap();
        let g = add_gateway(&server, &format!("spare{i}"), 1, 10 + n).await;
        spare_gateways.push((path, g.id.0));
    }
    let mut spare_sites = Vec::new();
    for (i, path) in [
        paths::SITE,
        paths::SITE_DISABLE,
        paths::SITE_ROTATE,
        paths::SITE_TUNNEL,
    ]
    .into_iter()
    .enumerate()
    {
        let n = u8::try_from(i).unwrap();
        let s = add_site(&server, &format!("spare{i}"), 110 + n).await;
        spare_sites.push((path, s.id.0));
    }
    let ipsec_site: SiteCreated = server
        .operator()
        .post(
            paths::SITES,
            &NewSite {
                name: "ipsec".into(),
                tunnel: TunnelKind::Ipsec,
                ..Default::default()
            },
        )
        .await
        .json();
    let agentless: SiteCreated = server
        .operator()
        .post(
            paths::SITES,
            &json!({ "name": "agentless", "agent": false }),
        )
        .await
        .json();
    let failure: FailureAccepted = site
        .agent
        .post(
            paths::AGENT_FAILURES,
            &FailureReport {
                code: FailureCode::Other,
                detail: "a report to acknowledge".into(),
                terminal: None,
                open_request: false,
            },
        )
        .await
        .json();
    add_technician(&db, "bob", "bob's long password").await;
    add_technician(&db, "carol", "carol's long password").await;
    let spare_team: TeamView = server
        .operator()
        .post(
            paths::TEAMS,
            &json!({ "name": "spare", "source_prefixes": [] }),
        )
        .await
        .json();
    let agent_version = agent_state(&site, 0, 0).await.version;
    let gw_version = gateway_state(&gw, 0, 0).await.version;

    let doc: Value = server.client(None).get(paths::OPENAPI).await.body;
    assert_eq!(doc["openapi"], "3.0.3");
    let mut operations: Vec<(String, String, Value)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            operations.push((method.clone(), path.clone(), op.clone()));
        }
    }
    // Signing out ends the session the other calls use: last.
    operations.sort_by_key(|(m, p, _)| (p == paths::LOGOUT, p.clone(), m.clone()));
    assert!(operations.len() > 25, "{}", operations.len());

    for (method, path, op) in &operations {
        let id = match path.as_str() {
            paths::AGENT_REVOKE | paths::REQUEST_START | paths::REQUEST_END => request.id.0,
            paths::SITE_TOKEN | paths::SITE_PLANNED_ROTATION | paths::SITE_TEAM => site.id.0,
            paths::TEAM => spare_team.id,
            paths::FAILURE_ACK => failure.failure_id,
            paths::SITE_IPSEC => ipsec_site.site_id.0,
            paths::SITE_WIREGUARD | paths::SITE_REQUESTS => agentless.site_id.0,
            paths::GATEWAY_DRAIN => gw.id.0,
            p if spare_gateways.iter().any(|(q, _)| *q == p) => {
                spare_gateways.iter().find(|(q, _)| *q == p).unwrap().1
            }
            p if spare_sites.iter().any(|(q, _)| *q == p) => {
                spare_sites.iter().find(|(q, _)| *q == p).unwrap().1
            }
            paths::TECHNICIAN | paths::TECHNICIAN_DISABLE | paths::TECHNICIAN_TEAM => 0,
            p => {
                assert!(!p.contains('{'), "no id known for {p}");
                0
            }
        };
        let technician_name = if path == paths::TECHNICIAN {
            "bob"
        } else {
            "carol"
        };
        let url = format!(
            "{}{}",
            server.base,
            at(path, id).replace("{name}", technician_name)
        );
        let body = match path.as_str() {
            paths::ENROLL => json!({ "token": fresh_site.enrollment_token, "public_key": key(50) }),
            paths::AGENT_REQUESTS => json!(new_request(&["pc-2"])),
            paths::SITE_REQUESTS => json!({
                "requester_name": "Anna", "level": "general", "urgency": "high",
                "terminals": [{ "name": "till", "lan_address": "192.168.1.10" }],
            }),
            paths::AGENT_FAILURES => json!({ "code": "other", "detail": "printer on fire" }),
            paths::AGENT_APPLIED => json!({ "version": agent_version, "errors": [] }),
            paths::GATEWAY_APPLIED => json!({ "version": gw_version, "errors": [] }),
            paths::GATEWAY_REGISTER => json!(GatewayRegistration {
                endpoints: vec!["203.0.113.1:51820".parse().unwrap()],
                public_key: key(201),
                tunnel_kinds: vec![TunnelKind::Wireguard],
                max_tunnels: 10,
                software_version: "test".into(),
                technician_prefixes: Vec::new(),
                tls: None,
                next_public_key: None,
            }),
            paths::GATEWAY_HEARTBEAT => json!(heartbeat(10)),
            paths::SITES => json!({ "name": "C" }),
            paths::GATEWAYS => json!({ "name": "gw2" }),
            paths::GATEWAY_DRAIN => json!({ "drain": false }),
            paths::SITE_TUNNEL => json!({ "tunnel": "ipsec" }),
            paths::LOGIN => json!({ "name": "alice", "password": "correct horse" }),
            paths::SITE_DISABLE | paths::GATEWAY_DISABLE | paths::TECHNICIAN_DISABLE => {
                json!({ "disabled": true })
            }
            paths::TECHNICIANS => json!({ "name": "dave", "password": "dave's long password" }),
            paths::AGENT_KEY | paths::AGENT_KEY_COMMIT => json!({ "public_key": key(70) }),
            paths::SITE_PLANNED_ROTATION => json!({ "key": true }),
            paths::TEAMS => json!({ "name": "t2", "source_prefixes": ["172.16.0.0/28"] }),
            paths::SITE_TEAM | paths::TECHNICIAN_TEAM => json!({ "team": null }),
            _ => Value::Null,
        };
        let http_method: reqwest::Method = method.to_uppercase().parse().unwrap();
        let mut req = tech.http.request(http_method, &url);
        // The first security alternative names the credential to send.
        let security = op["security"].as_array().unwrap();
        if let Some(first) = security.first().and_then(Value::as_object) {
            for scheme in first.keys() {
                req = match scheme.as_str() {
                    "siteCredential" => req.bearer_auth(&site.credential),
                    "gatewayCredential" => req.bearer_auth(&gw.credential),
                    "operatorToken" => req.bearer_auth(&server.operator),
                    "technicianSession" => req.header("cookie", tech.cookie.as_deref().unwrap()),
                    "csrfToken" => req.header("x-csrf-token", tech.csrf.as_deref().unwrap()),
                    s => panic!("{method} {path}: unknown security scheme {s}"),
                };
            }
        }
        if method == "get" {
            assert!(
                op.get("requestBody").is_none(),
                "{method} {path} declares a request body"
            );
        }
        if let Some(rb) = op.get("requestBody") {
            assert!(
                rb["content"]["application/json"].is_object(),
                "{method} {path}: {rb}"
            );
            assert!(
                !body.is_null(),
                "{method} {path}: the test has no body for it"
            );
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16().to_string();
        let content_type = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = resp.bytes().await.unwrap();
        let documented = &op["responses"][&status];
        assert!(
            documented.is_object(),
            "{method} {path} answered {status} ({}), documented: {:?}",
            String::from_utf8_lossy(&bytes),
            op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .collect::<Vec<_>>()
        );
        match documented.get("content").and_then(Value::as_object) {
            Some(content) => {
                let got = essence(content_type.as_deref().unwrap_or_default());
                assert!(
                    content.keys().any(|k| essence(k) == got),
                    "{method} {path} {status}: answered {content_type:?}, documented {:?}",
                    content.keys().collect::<Vec<_>>()
                );
                if got == "application/json" {
                    serde_json::from_slice::<Value>(&bytes)
                        .unwrap_or_else(|e| panic!("{method} {path}: not JSON: {e}"));
                }
            }
            None => assert!(
                bytes.is_empty(),
                "{method} {path} {status}: documented without content, answered {content_type:?} {}",
                String::from_utf8_lossy(&bytes)
            ),
        }
    }
    server.stop().await;
}

#[test]
fn security_http_every_route_is_documented() {
    let doc = maintenance_server::openapi::document();
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.clone(), path.clone()))
        })
        .collect();
    let routed: BTreeSet<(String, String)> = maintenance_server::routes::api_routes()
        .iter()
        .map(|(m, p, _)| (m.as_str().to_ascii_lowercase(), (*p).to_owned()))
        .chain(
            maintenance_server::console::ASSETS
                .iter()
                .map(|(p, _, _)| ("get".to_owned(), (*p).to_owned())),
        )
        .collect();
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty(),
        "routed, not documented: {undocumented:?}"
    );
    assert!(unrouted.is_empty(), "documented, not routed: {unrouted:?}");
}
