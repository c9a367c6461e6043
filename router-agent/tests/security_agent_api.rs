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

/// A stand-in for the maintenance server whose clock is an hour ahead of
/// this host's (the same as a router clock an hour behind): it serves one
/// desired state whose mapping ends 3 s after the server's now, and dates
/// its answers with that clock.
async fn skewed_server(skew_ms: u64, lifetime_ms: u64) -> (String, tokio::task::JoinHandle<()>) {
    use axum::routing::{get, post};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    // The server's clock, whole seconds (what a Date header can say).
    let server_now = (now() + skew_ms) / 1000 * 1000;
    let doc = serde_json::json!({
        "version": 1,
        "site_id": 1,
        "tunnel": null,
        "mappings": [{
            "nat_address": "10.64.0.5",
            "terminal": "pc-1",
            "request_id": 7,
            "expires_at": server_now + lifetime_ms,
        }],
    });
    let started = std::time::Instant::now();
    let state = get(move || {
        let doc = doc.clone();
        async move {
            let at = server_now + started.elapsed().as_millis() as u64;
            // IMF-fixdate of the server's clock.
            let secs = at / 1000;
            let (days, rem) = (secs / 86_400, secs % 86_400);
            let (y, m, d) = civil(days as i64);
            const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
            const MONTHS: [&str; 12] = [
                "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
            ];
            let date = format!(
                "{}, {d:02} {} {y} {:02}:{:02}:{:02} GMT",
                DAYS[(days % 7) as usize],
                MONTHS[(m - 1) as usize],
                rem / 3600,
                rem / 60 % 60,
                rem % 60
            );
            ([(axum::http::header::DATE, date)], axum::Json(doc))
        }
    });
    let app = axum::Router::new()
        .route(paths::AGENT_STATE, state)
        .route(
            paths::AGENT_APPLIED,
            post(|| async { axum::http::StatusCode::NO_CONTENT }),
        )
        .route(
            paths::AGENT_REQUESTS,
            get(|| async { axum::Json(serde_json::json!([])) }),
        );
    let task = tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    (base, task)
}

/// Year, month, day of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_agent_expiry_counts_the_servers_remaining_time_not_the_routers_clock() {
    let (port, _pc) = pc().await;
    // An hour of skew: the router's clock says consent has an hour more.
    let (base, _server) = skewed_server(3_600_000, 4_000).await;
    let mut agent = support::Agent::new(port);
    let text = std::fs::read_to_string(&agent.config)
        .unwrap()
        .replace("[agent]\n", "[agent]\ninstall_server_requests = true\n");
    std::fs::write(&agent.config, text).unwrap();
    std::fs::write(
        agent.identity_path(),
        serde_json::json!({
            "site_id": 1, "site_name": "Skewed", "server_url": base,
            "credential": "c",
            "private_key": vpnnat::tunnel::PrivateKey::from_bytes([3; 32]).to_base64(),
        })
        .to_string(),
    )
    .unwrap();
    agent.start().await;
    agent
        .wait_status("the mapping installed", Duration::from_secs(20), |s| {
            mappings(s) == 1
        })
        .await;
    // Removed once the server's 4 s are over, not an hour later.
    agent
        .wait_status("the mapping expired", Duration::from_secs(30), |s| {
            mappings(s) == 0 && s["mappings_expired"] == 1
        })
        .await;
}

/// A port on loopback that does not answer a TCP probe (a refused
/// connection counts as an answering host): a listener with a backlog of
/// zero whose one queue slot is taken, so the kernel drops further SYNs.
async fn unanswering(port: u16) -> (tokio::net::TcpListener, tokio::net::TcpStream) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .unwrap();
    let listener = socket.listen(0).unwrap();
    let filler = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    (listener, filler)
}

/// The site's requests as the server has them.
async fn server_requests(center: &Center, agent: &support::Agent) -> Vec<Value> {
    let id: Value =
        serde_json::from_str(&std::fs::read_to_string(agent.identity_path()).unwrap()).unwrap();
    let r = reqwest::Client::new()
        .get(format!("{}{}", center.base, paths::AGENT_REQUESTS))
        .bearer_auth(id["credential"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap().as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_agent_failure_reports_open_access_only_where_the_customer_allows_it() {
    let mut center = Center::start(3600).await;
    // The terminal's health check port: a PC that does not answer.
    let pc_port = support::free_port();
    let silent_pc = unanswering(pc_port).await;
    let mut agent = enrolled(&mut center, pc_port).await;
    // The operator configured the PC's health to be watched and failure
    // reports to ask for access.
    let config = std::fs::read_to_string(&agent.config)
        .unwrap()
        .replace(
            &format!("check = \"tcp:{pc_port}\"\n"),
            &format!("check = \"tcp:{pc_port}\"\nwatch = true\n"),
        )
        .replace(
            "[failures]\nlink_watch = false\n",
            "[failures]\nlink_watch = false\ncheck_interval_s = 1\nthreshold = 1\nopen_request = true\n",
        );
    std::fs::write(&agent.config, config).unwrap();
    agent.start().await;

    // The customer has not allowed it (the default): the failure is
    // reported, no request is opened, nothing is installed.
    agent
        .wait_status("the failure reported", Duration::from_secs(20), |s| {
            s["failures_reported"].as_u64() >= Some(1)
        })
        .await;
    assert!(server_requests(&center, &agent).await.is_empty());
    assert_eq!(mappings(&agent.status().await), 0);

    // The customer allows it on the page; the PC recovers and fails again:
    // this time the report opens a request, and the agent installs it.
    let (code, v) = agent
        .api(
            Method::POST,
            "/api/preferences",
            Some(serde_json::json!({ "failure_requests": true })),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    drop(silent_pc);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _silent_again = unanswering(pc_port).await;
    agent
        .wait_status(
            "the failure request installed",
            Duration::from_secs(30),
            |s| mappings(s) == 1,
        )
        .await;
    let requests = server_requests(&center, &agent).await;
    assert_eq!(requests.len(), 1, "{requests:?}");
    // Access to what failed: the PC, not the router.
    assert_eq!(requests[0]["terminals"][0]["name"], "pc-1", "{requests:?}");
}
