//! The agent binary against the real maintenance server (in-process), on
//! loopback: enrollment, the page's JSON API (request, end access now),
//! reconciliation (restart, technician end, expiry without the server), and
//! the page's protection (password, session, CSRF, rate limit, LAN only).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod support;

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;
use support::{Agent, Center, PASSWORD, enrolled, mode_of, pc, request_body};
use vpnnat::messages::{RequestState, paths};

fn mappings(s: &Value) -> usize {
    s["mappings"].as_array().map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_stores_a_private_identity_and_a_used_token_is_refused() {
    let mut center = Center::start(3600).await;
    let (port, _pc) = pc().await;
    let agent = Agent::new(port);
    let site = center.add_site("Bakery").await;
    let _ = &mut center;
    let ok = agent.enroll(&center.base, &site.enrollment_token, false);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        stdout.contains(&format!("site {}", site.site_id)),
        "{stdout}"
    );
    let id_path = agent.identity_path();
    assert_eq!(mode_of(&id_path), 0o600);
    let stored = std::fs::read_to_string(&id_path).unwrap();
    let id: Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(id["site_id"], site.site_id.0);
    assert!(!id["credential"].as_str().unwrap().is_empty());

    // Again without --force: refused before contacting the server.
    let again = agent.enroll(&center.base, &site.enrollment_token, false);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("already enrolled") && err.contains("--force"),
        "{err}"
    );
    // With --force but the used token: a clear error, identity untouched.
    let used = agent.enroll(&center.base, &site.enrollment_token, true);
    assert!(!used.status.success());
    let err = String::from_utf8_lossy(&used.stderr);
    assert!(
        err.contains("already used") && err.contains("expired"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&id_path).unwrap(), stored);
    // A nonsense token and an unreachable server are explained too.
    let bad = agent.enroll(&center.base, "nonsense", true);
    assert!(!bad.status.success());
    let down = agent.enroll("http://127.0.0.1:9", "x", true);
    let err = String::from_utf8_lossy(&down.stderr);
    assert!(err.contains("cannot reach the maintenance server"), "{err}");

    // A fresh token (re-enrollment) with --force replaces the identity.
    let r = reqwest::Client::new()
        .post(format!(
            "{}{}",
            center.base,
            paths::SITE_TOKEN.replace("{id}", &site.site_id.to_string())
        ))
        .bearer_auth(&center.operator)
        .send()
        .await
        .unwrap();
    let fresh: vpnnat::messages::SiteCreated = r.json().await.unwrap();
    let re = agent.enroll(&center.base, &fresh.enrollment_token, true);
    assert!(
        re.status.success(),
        "{}",
        String::from_utf8_lossy(&re.stderr)
    );
    let id2: Value = serde_json::from_str(&std::fs::read_to_string(&id_path).unwrap()).unwrap();
    assert_ne!(
        id2["credential"], id["credential"],
        "the credential rotates"
    );
    assert_ne!(id2["private_key"], id["private_key"], "a new key pair");
    assert_eq!(mode_of(&id_path), 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_from_the_page_api_reaches_the_console_and_end_access_now_removes_it() {
    let mut center = Center::start(3600).await;
    let (port, _pc) = pc().await;
    let mut agent = enrolled(&mut center, port).await;
    agent.start().await;

    let (code, created) = agent
        .api(Method::POST, "/api/requests", Some(request_body(&["pc-1"])))
        .await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(created["warnings"], Value::Array(vec![]), "pc-1 answers");
    let request = &created["request"];
    let nat = request["terminals"][0]["nat_address"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(nat.starts_with("10.64."), "{nat}");
    let id = request["id"].as_u64().unwrap();
    let number = request["acceptance_number"].as_str().unwrap().to_owned();
    // The real address stays here: the page shows it, the server never saw it.
    assert_eq!(request["local"][0]["address"], "127.0.0.1");

    // The mapping at once; the tunnel as soon as the gateway holds the peer.
    agent
        .wait_status("the mapping and the tunnel", Duration::from_secs(2), |s| {
            mappings(s) == 1 && s["mappings"][0]["nat"] == nat.as_str() && s["tunnel"].is_object()
        })
        .await;
    let s = agent.status().await;
    assert!(s["tunnel"].is_object(), "the gateway is dialled: {s}");
    // `router-agent status` shows the same, the way `wg show` would.
    let out = agent.run(&["status"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("site: Bakery Schmidt"), "{text}");
    assert!(
        text.contains(&format!("{nat} -> 127.0.0.1 (pc-1")),
        "{text}"
    );
    assert!(text.contains("peer: "), "{text}");
    let out = agent.run(&["status", "--json"]);
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["mappings"][0]["terminal"], "pc-1");
    let out = agent.run(&["password"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), PASSWORD);

    // The technician console lists it, without any real LAN address.
    let seen = center.technician_requests().await;
    let r = seen.iter().find(|r| r.acceptance_number == number).unwrap();
    assert_eq!(r.state, RequestState::Waiting);
    assert_eq!(r.requester_name, "Anna Schmidt");
    // (Here the agent's global address is loopback too: only the terminals matter.)
    assert!(
        !serde_json::to_string(&r.terminals)
            .unwrap()
            .contains("127.0.0.1")
    );

    // The overview shows it as open.
    let (code, o) = agent.api(Method::GET, "/api/overview", None).await;
    assert_eq!(code, 200);
    assert_eq!(o["requests"][0]["acceptance_number"], number.as_str());
    assert_eq!(o["requests"][0]["local"][0]["active"], true);

    // End access now: the mapping is gone within a second, the tunnel too.
    let t0 = Instant::now();
    let (code, v) = agent
        .api(Method::POST, &format!("/api/requests/{id}/revoke"), None)
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["request"]["state"], "revoked");
    agent
        .wait_status("the mapping removed", Duration::from_secs(1), |s| {
            mappings(s) == 0 && s["tunnel"].is_null()
        })
        .await;
    println!("end access now → mapping removed in {:?}", t0.elapsed());
    let seen = center.technician_requests().await;
    assert_eq!(
        seen.iter()
            .find(|r| r.acceptance_number == number)
            .unwrap()
            .state,
        RequestState::Revoked
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_the_field_named_and_nothing_is_sent() {
    let mut center = Center::start(3600).await;
    let (port, _pc) = pc().await;
    let mut agent = enrolled(&mut center, port).await;
    agent.start().await;
    let cases = [
        (request_body(&["ghost"]), "terminals"),
        (request_body(&["10.1.2.3"]), "terminals"),
        (request_body(&["pc 1"]), "terminals"),
        (request_body(&[]), "terminals"),
        (
            serde_json::json!({"requester_name": "A", "level": "general", "urgency": "normal",
                               "phone": "call me", "terminals": ["pc-1"]}),
            "phone",
        ),
        (
            serde_json::json!({"requester_name": " ", "level": "general", "urgency": "normal",
                               "phone": "1", "terminals": ["pc-1"]}),
            "requester_name",
        ),
        (
            serde_json::json!({"requester_name": "A", "level": "boss", "urgency": "normal",
                               "phone": "1", "terminals": ["pc-1"]}),
            "level",
        ),
        (
            serde_json::json!({"requester_name": "A", "level": "general", "urgency": "normal",
                               "phone": "1", "terminals": ["pc-1"], "extra": 1}),
            "",
        ),
    ];
    for (body, field) in cases {
        let (code, v) = agent
            .api(Method::POST, "/api/requests", Some(body.clone()))
            .await;
        assert_eq!(code, 400, "{body} → {v}");
        assert_eq!(v["error"], "invalid_field", "{v}");
        if !field.is_empty() {
            assert_eq!(v["field"], field, "{body} → {v}");
        }
        assert!(!v["message"].as_str().unwrap().is_empty());
    }
    let (code, v) = agent
        .api(Method::POST, "/api/requests/abc/revoke", None)
        .await;
    assert_eq!((code, v["field"].as_str()), (400, Some("id")));
    // Nothing reached the server.
    assert!(center.technician_requests().await.is_empty());
    // The check endpoint resolves without sending anything.
    let (code, v) = agent
        .api(
            Method::POST,
            "/api/check",
            Some(serde_json::json!({"terminals": ["pc-1", "127.0.0.1"]})),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v["terminals"].as_array().unwrap().len(),
        1,
        "same terminal twice: {v}"
    );
    assert_eq!(v["terminals"][0]["answers"], true);
    assert!(center.technician_requests().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_needs_the_password_a_session_and_the_csrf_token() {
    let mut center = Center::start(3600).await;
    let (port, _pc) = pc().await;
    let mut agent = enrolled(&mut center, port).await;
    agent.start().await;
    let base = format!("http://{}", agent.web);
    let http = reqwest::Client::new();
    // No credentials, wrong bearer.
    let r = http
        .get(format!("{base}/api/overview"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .get(format!("{base}/api/overview"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // The page itself and its assets are public, with a strict CSP.
    let r = http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    // Log in: an HttpOnly, SameSite=Strict cookie and a CSRF token.
    let r = http
        .post(format!("{base}/api/login"))
        .json(&serde_json::json!({"password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_owned();
    let csrf = r.json::<Value>().await.unwrap()["csrf_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = http
        .get(format!("{base}/api/overview"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A state-changing call without the CSRF token is refused.
    let r = http
        .post(format!("{base}/api/requests"))
        .header("cookie", &session)
        .json(&request_body(&["ghost"]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .post(format!("{base}/api/requests"))
        .header("cookie", &session)
        .header("x-csrf-token", "not-it")
        .json(&request_body(&["ghost"]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // With it, the request gets as far as validation.
    let r = http
        .post(format!("{base}/api/requests"))
        .header("cookie", &session)
        .header("x-csrf-token", &csrf)
        .json(&request_body(&["ghost"]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Logout ends the session.
    let r = http
        .post(format!("{base}/api/logout"))
        .header("cookie", &session)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = http
        .get(format!("{base}/api/overview"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Guessing is rate-limited.
    let mut codes = Vec::new();
    for _ in 0..7 {
        let r = http
            .post(format!("{base}/api/login"))
            .json(&serde_json::json!({"password": "guess"}))
            .send()
            .await
            .unwrap();
        codes.push(r.status().as_u16());
    }
    assert_eq!(codes[..5], [401; 5]);
    assert_eq!(codes[5..], [429, 429]);
    let r = http
        .post(format!("{base}/api/login"))
        .json(&serde_json::json!({"password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429, "even the right password waits");
    agent.stop(false);

    // Clients outside the allowed prefixes get nothing.
    let mut outsider = Agent::new(port);
    std::fs::copy(agent.identity_path(), outsider.identity_path()).unwrap();
    let text = std::fs::read_to_string(&outsider.config)
        .unwrap()
        .replace("[web]\n", "[web]\nallowed_clients = [\"192.168.1.0/24\"]\n");
    std::fs::write(&outsider.config, text).unwrap();
    let log = std::fs::File::create(outsider.log_path()).unwrap();
    let mut child = std::process::Command::new(support::bin())
        .arg("--config")
        .arg(&outsider.config)
        .stderr(log)
        .spawn()
        .unwrap();
    let url = format!("http://{}/healthz", outsider.web);
    let mut status = None;
    for _ in 0..200 {
        if let Ok(r) = http.get(&url).send().await {
            status = Some(r.status().as_u16());
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, Some(403), "{}", outsider.log());
    let _ = &mut outsider;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_state_comes_from_the_server_and_a_technician_end_removes_it() {
    let mut center = Center::start(3600).await;
    let (port, _pc) = pc().await;
    let mut agent = enrolled(&mut center, port).await;
    agent.start().await;
    let (code, created) = agent
        .api(Method::POST, "/api/requests", Some(request_body(&["pc-1"])))
        .await;
    assert_eq!(code, 201, "{created}");
    let id = created["request"]["id"].as_u64().unwrap();
    agent
        .wait_status("the mapping", Duration::from_secs(2), |s| mappings(s) == 1)
        .await;
    // Killed without any cleanup, started again: the mapping is back, from the server.
    agent.stop(true);
    agent.start().await;
    agent
        .wait_status("the mapping restored", Duration::from_secs(3), |s| {
            mappings(s) == 1 && s["applied_version"].as_u64().is_some()
        })
        .await;
    // The technician ends it: gone within a second.
    assert_eq!(center.technician_requests().await.len(), 1);
    let tech = reqwest::Client::new();
    let r = tech
        .post(format!("{}{}", center.base, paths::LOGIN))
        .json(&serde_json::json!({"name": "alice", "password": "tech password"}))
        .send()
        .await
        .unwrap();
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let csrf = r.json::<Value>().await.unwrap()["csrf_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let t0 = Instant::now();
    let r = tech
        .post(format!(
            "{}{}",
            center.base,
            paths::REQUEST_END.replace("{id}", &id.to_string())
        ))
        .header("cookie", cookie)
        .header("x-csrf-token", csrf)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    agent
        .wait_status("the mapping removed", Duration::from_secs(1), |s| {
            mappings(s) == 0
        })
        .await;
    println!("technician end → mapping removed in {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapping_expires_on_time_even_when_the_server_is_gone() {
    // Requests last 5 s.
    let mut center = Center::start(5).await;
    let (port, _pc) = pc().await;
    let mut agent = enrolled(&mut center, port).await;
    agent.start().await;
    let (code, created) = agent
        .api(Method::POST, "/api/requests", Some(request_body(&["pc-1"])))
        .await;
    assert_eq!(code, 201, "{created}");
    let expires_at = created["request"]["expires_at"].as_u64().unwrap();
    agent
        .wait_status("the mapping", Duration::from_secs(2), |s| mappings(s) == 1)
        .await;
    center.stop().await;
    agent
        .wait_status(
            "the server seen as unreachable",
            Duration::from_secs(5),
            |s| s["connected"] == false,
        )
        .await;
    assert_eq!(
        mappings(&agent.status().await),
        1,
        "kept while consent lasts"
    );
    agent
        .wait_status("the expiry", Duration::from_secs(8), |s| {
            mappings(s) == 0 && s["mappings_expired"] == 1
        })
        .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(now >= expires_at, "not before the consent ended");
    assert!(
        now < expires_at + 1500,
        "within a second or so: {} ms late",
        now - expires_at
    );
    assert!(agent.status().await["tunnel"].is_null());
}
