//! The agent's own defences, with the real binary against the real
//! maintenance server (in-process, loopback): it installs only the requests
//! made on its page, its page answers only to its own names and one LAN
//! device cannot lock the customer out.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod support;

use std::time::Duration;

use reqwest::Method;
use serde_json::Value;
use support::{Center, PASSWORD, enrolled, pc, request_body};
use vpnnat::messages::paths;

fn mappings(s: &Value) -> usize {
    s["mappings"].as_array().map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_agent_installs_only_requests_made_on_its_page() {
    let mut center = Center::start(3600).await;
    let (port, _pc) = pc().await;
    let mut agent = enrolled(&mut center, port).await;
    agent.start().await;

    // A request that did not come from this page: made with the site's
    // credential directly at the server (what a compromised or mistaken
    // center could list in the document just as well).
    let id: Value =
        serde_json::from_str(&std::fs::read_to_string(agent.identity_path()).unwrap()).unwrap();
    let credential = id["credential"].as_str().unwrap().to_owned();
    let r = reqwest::Client::new()
        .post(format!("{}{}", center.base, paths::AGENT_REQUESTS))
        .bearer_auth(&credential)
        .json(&request_body(&["pc-1"]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let foreign: Value = r.json().await.unwrap();
    let foreign_id = foreign["id"].as_u64().unwrap();
    agent
        .wait_status(
            "the foreign request refused",
            Duration::from_secs(20),
            |s| {
                s["apply_errors"].as_array().is_some_and(|e| {
                    e.iter()
                        .any(|e| e.as_str().unwrap_or("").contains("not installed"))
                })
            },
        )
        .await;
    let s = agent.status().await;
    assert_eq!(mappings(&s), 0, "not installed: {s}");
    assert!(
        s["apply_errors"]
            .to_string()
            .contains(&format!("request {foreign_id}")),
        "{s}"
    );

    // End it (it is not ours) so that the site's terminal is free, then
    // the customer's own request is installed, also after a restart.
    let (code, v) = agent
        .api(
            Method::POST,
            &format!("/api/requests/{foreign_id}/revoke"),
            None,
        )
        .await;
    assert_eq!(code, 200, "{v}");
    let (code, created) = agent
        .api(Method::POST, "/api/requests", Some(request_body(&["pc-1"])))
        .await;
    assert_eq!(code, 201, "{created}");
    let own = created["request"]["id"].as_u64().unwrap();
    agent
        .wait_status(
            "the page's request installed",
            Duration::from_secs(20),
            |s| mappings(s) == 1 && s["mappings"][0]["request_id"] == own,
        )
        .await;
    agent.stop(true);
    agent.start().await;
    agent
        .wait_status(
            "installed again after kill -9",
            Duration::from_secs(20),
            |s| mappings(s) == 1 && s["mappings"][0]["request_id"] == own,
        )
        .await;
    // The consent record is private.
    let record = agent.dir.path().join("state/router-agent.consent.json");
    assert_eq!(support::mode_of(&record), 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_agent_page_answers_only_to_its_own_names_and_limits_each_client() {
    let mut center = Center::start(3600).await;
    let (port, _pc) = pc().await;
    let mut agent = enrolled(&mut center, port).await;
    agent.start().await;
    let base = format!("http://{}", agent.web);
    let http = reqwest::Client::new();

    // DNS rebinding: the browser sends the attacker's name as Host.
    for path in ["/api/overview", "/api/status", "/"] {
        let r = http
            .get(format!("{base}{path}"))
            .header("host", format!("evil.example:{}", agent.web.port()))
            .bearer_auth(PASSWORD)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 421, "{path}");
    }
    let r = http
        .get(format!("{base}/"))
        .header("host", "evil.example")
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 421);
    assert!(r.text().await.unwrap().contains("<title>"));
    let r = http
        .get(format!("{base}/api/status"))
        .header("host", "localhost")
        .bearer_auth(PASSWORD)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "its own names work");

    // A guesser at 127.0.0.2 is locked out; the customer at 127.0.0.1 is not.
    let guesser = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let mut codes = Vec::new();
    for _ in 0..7 {
        let r = guesser
            .post(format!("{base}/api/login"))
            .json(&serde_json::json!({"password": "guess"}))
            .send()
            .await
            .unwrap();
        codes.push(r.status().as_u16());
    }
    assert_eq!(codes[5..], [429, 429], "{codes:?}");
    let r = http
        .post(format!("{base}/api/login"))
        .json(&serde_json::json!({"password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "another device is not locked out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_agent_refuses_a_plain_http_server_on_another_host() {
    let (port, _pc) = pc().await;
    let agent = support::Agent::new(port);
    let out = agent.enroll("http://192.0.2.1:8080", "token", false);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--server") && err.contains("server.allow_insecure_http"),
        "{err}"
    );
    let text = std::fs::read_to_string(&agent.config)
        .unwrap()
        .replace("[server]\n", "[server]\nurl = \"http://192.0.2.1:8080\"\n");
    std::fs::write(&agent.config, text).unwrap();
    std::fs::write(
        agent.identity_path(),
        serde_json::json!({
            "site_id": 1, "site_name": "x", "server_url": "http://192.0.2.1:8080",
            "credential": "c", "private_key": vpnnat::tunnel::PrivateKey::from_bytes([3; 32]).to_base64(),
        })
        .to_string(),
    )
    .unwrap();
    let out = agent.run(&[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.url") && err.contains("server.allow_insecure_http"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_agent_shows_its_tunnel_down_when_its_gateway_is_gone() {
    let mut center = Center::start_with(3600, 1500).await;
    let (port, _pc) = pc().await;
    let mut agent = enrolled(&mut center, port).await;
    agent.start().await;
    let (code, created) = agent
        .api(Method::POST, "/api/requests", Some(request_body(&["pc-1"])))
        .await;
    assert_eq!(code, 201, "{created}");
    agent
        .wait_status("the tunnel dialled", Duration::from_secs(20), |s| {
            s["tunnel"].is_object()
        })
        .await;
    let (_, o) = agent.api(Method::GET, "/api/overview", None).await;
    assert_ne!(o["tunnel_state"], "down", "{o}");

    // The only gateway dies: no other has room, the site is stranded.
    center.stop_gateway();
    agent
        .wait_status("the tunnel shown down", Duration::from_secs(30), |s| {
            s["tunnel"]["state"] == "down"
        })
        .await;
    let s = agent.status().await;
    assert_eq!(s["tunnel"]["up"], false, "{s}");
    assert!(
        s["tunnel"]["note"]
            .as_str()
            .unwrap_or("")
            .contains("gateway"),
        "{s}"
    );
    let (_, o) = agent.api(Method::GET, "/api/overview", None).await;
    assert_eq!(o["tunnel_state"], "down", "{o}");
    assert!(o["problem"].as_str().is_some(), "the page says why: {o}");
    let out = agent.run(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("session: down"), "{text}");
}
