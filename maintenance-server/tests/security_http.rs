//! The server's HTTP layer under abuse: technician logins (bounded password
//! checks, counted before checking, IPv6 per /64), `/metrics` behind a
//! token, the session cookie and HSTS behind a TLS proxy, JSON bodies only
//! as `application/json`, the console feed keeping every open request.
//! The server runs in-process on loopback; "other clients" are told apart
//! by `X-Forwarded-For` from a trusted proxy (127.0.0.1).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use maintenance_server::settings::Settings;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use vpnnat::messages::*;

both!(
    security_http_feed_keeps_every_open_request,
    security_http_metrics_need_a_token
);

/// Settings where 127.0.0.1 is a trusted proxy, so that each test can speak
/// as any client address through `X-Forwarded-For`.
fn proxied(db: &TestDb) -> Settings {
    let mut s = db.settings();
    s.http.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    s
}

/// A login attempt as the client `from`: status and headers.
async fn try_login(
    http: &reqwest::Client,
    server: &TestServer,
    from: &str,
    name: &str,
    password: &str,
) -> (u16, HeaderMap) {
    let r = http
        .post(format!("{}{}", server.base, paths::LOGIN))
        .header("x-forwarded-for", from)
        .json(&json!({ "name": name, "password": password }))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body: Value = r.json().await.unwrap();
    if status != 200 {
        assert!(body["error"].is_string(), "{status} {body}");
    }
    (status, headers)
}

/// The value of an unlabelled or labelled series in a scrape.
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{series} missing in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

async fn scrape(server: &TestServer) -> String {
    let m = server.operator().get(paths::METRICS).await;
    assert_eq!(m.status, 200, "{}", m.body);
    m.body.as_str().unwrap().to_owned()
}

fn count(statuses: &[u16], want: u16) -> usize {
    statuses.iter().filter(|s| **s == want).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_http_logins_are_counted_before_checking_and_bounded() {
    let db = TestDb::new(Backend::Sqlite);
    let mut settings = proxied(&db);
    settings.technicians.login_attempts_per_minute = 5;
    settings.technicians.concurrent_password_checks = 2;
    add_technician(&db, "alice", "correct horse").await;
    add_technician(&db, "bob", "battery staple").await;
    let server = TestServer::start(settings).await;
    let _gw = add_gateway(&server, "gw1", 10, 1).await;
    let site = add_site(&server, "A", 1).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(90))
        .build()
        .unwrap();

    // An agent's long-poll is held across the whole flood.
    let before = agent_state(&site, 0, 0).await.version;
    let poll = {
        let agent = site.agent.clone();
        tokio::spawn(async move {
            agent
                .get(&format!(
                    "{}?after={before}&wait_ms=60000",
                    paths::AGENT_STATE
                ))
                .await
        })
    };

    // 30 concurrent wrong passwords from one client: only the limit's worth
    // are checked, the rest are refused before any password work.
    let flood: Vec<_> = (0..30)
        .map(|_| {
            let (http, server) = (http.clone(), &server);
            async move { try_login(&http, server, "198.51.100.7", "alice", "guess").await }
        })
        .collect();
    let answers = futures_util::future::join_all(flood).await;
    let statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
    // (503 `busy`: checked later than a slow machine allowed; counted all the same.)
    assert_eq!(
        count(&statuses, 401) + count(&statuses, 503),
        5,
        "{statuses:?}"
    );
    assert_eq!(count(&statuses, 429), 25, "{statuses:?}");
    let (_, h) = answers.iter().find(|(s, _)| *s == 429).unwrap();
    assert!(h.contains_key("retry-after"), "{h:?}");
    // That client stays refused, even with a right password of another name.
    let (s, _) = try_login(&http, &server, "198.51.100.7", "bob", "battery staple").await;
    assert_eq!(s, 429);

    // Many clients at once (distinct names, so that only the check bound
    // applies): never more than 2 password checks run at the same time.
    let checks_before = metric(&scrape(&server).await, "vpnnat_login_password_checks_total");
    let many: Vec<_> = (0..24)
        .map(|i| {
            let (http, server) = (http.clone(), &server);
            async move {
                try_login(
                    &http,
                    server,
                    &format!("198.51.100.{}", 100 + i),
                    &format!("nobody-{i}"),
                    "guess",
                )
                .await
                .0
            }
        })
        .collect();
    let statuses = futures_util::future::join_all(many).await;
    // 503 `busy` when no check freed up in time on a slow machine.
    assert_eq!(
        count(&statuses, 401) + count(&statuses, 503),
        24,
        "{statuses:?}"
    );
    let text = scrape(&server).await;
    assert_eq!(metric(&text, "vpnnat_login_password_checks_limit"), 2);
    let peak = metric(&text, "vpnnat_login_password_checks_running_max");
    assert!((1..=2).contains(&peak), "{peak} checks ran at once\n{text}");
    assert_eq!(
        metric(&text, "vpnnat_login_password_checks_total") - checks_before,
        u64::try_from(count(&statuses, 401)).unwrap(),
        "{text}"
    );
    assert_eq!(metric(&text, "vpnnat_login_password_checks_running"), 0);
    assert!(metric(&text, "vpnnat_login_refused_total{reason=\"rate_limited\"}") >= 26);

    // A different client still signs in.
    let (s, h) = try_login(&http, &server, "203.0.113.9", "bob", "battery staple").await;
    assert_eq!(s, 200);
    assert!(h.contains_key("set-cookie"));

    // The agent's long-poll was never touched: it answers the change.
    let created = site
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let answered = tokio::time::timeout(Duration::from_secs(60), poll)
        .await
        .expect("the agent's long-poll answers")
        .unwrap();
    assert_eq!(answered.status, 200, "{}", answered.body);
    let doc: AgentDesiredState = answered.json();
    assert!(doc.version > before);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_http_ipv6_clients_are_limited_per_64() {
    let db = TestDb::new(Backend::Sqlite);
    let mut settings = proxied(&db);
    settings.technicians.login_attempts_per_minute = 3;
    let server = TestServer::start(settings).await;
    let http = reqwest::Client::new();
    // One host rotating through its /64, a new name each time (so only the
    // client key can stop it).
    let mut statuses = Vec::new();
    for i in 1..=6 {
        let from = format!("2001:db8:5:6:{i:x}:{i:x}::{i:x}");
        statuses.push(
            try_login(&http, &server, &from, &format!("eve-{i}"), "guess")
                .await
                .0,
        );
    }
    assert_eq!(statuses, [401, 401, 401, 429, 429, 429]);
    // The next /64 is another client.
    let (s, _) = try_login(&http, &server, "2001:db8:5:7::1", "eve-7", "guess").await;
    assert_eq!(s, 401);
    server.stop().await;
}

async fn security_http_metrics_need_a_token(b: Backend) {
    let db = TestDb::new(b);
    let mut settings = db.settings();
    let metrics_token = "scraper-secret-0123456789";
    settings.operator.metrics_token = metrics_token.to_owned();
    let server = TestServer::start(settings).await;
    let site = add_site(&server, "A", 1).await;

    let anonymous = server.client(None).get(paths::METRICS).await;
    let e = anonymous.error(401, None);
    assert_eq!(e.error, "unauthorized");
    assert!(
        anonymous.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    server
        .client(Some("not-a-known-token-at-all"))
        .get(paths::METRICS)
        .await
        .error(401, None);
    site.agent.get(paths::METRICS).await.error(403, None);
    for token in [metrics_token, server.operator.as_str()] {
        let m = server.client(Some(token)).get(paths::METRICS).await;
        assert_eq!(m.status, 200, "{}", m.body);
        assert!(
            m.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain; version=0.0.4")
        );
        assert!(m.body.as_str().unwrap().contains("vpnnat_sites 1"));
    }
    // The metrics token is good for nothing else.
    server
        .client(Some(metrics_token))
        .get(paths::SITES)
        .await
        .error(401, None);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_http_cookie_is_secure_and_hsts_sent_behind_a_tls_proxy() {
    // Plain HTTP (loopback, development): no Secure, no HSTS.
    let db = TestDb::new(Backend::Sqlite);
    add_technician(&db, "alice", "correct horse").await;
    let server = TestServer::start(db.settings()).await;
    let login = server
        .client(None)
        .post(
            paths::LOGIN,
            &Login {
                name: "alice".into(),
                password: "correct horse".into(),
            },
        )
        .await;
    assert_eq!(login.status, 200);
    let cookie = login.headers["set-cookie"].to_str().unwrap().to_owned();
    assert!(!cookie.contains("Secure"), "{cookie}");
    assert!(!login.headers.contains_key("strict-transport-security"));
    server.stop().await;

    // Behind a TLS-terminating proxy: the server itself speaks HTTP.
    let db = TestDb::new(Backend::Sqlite);
    add_technician(&db, "alice", "correct horse").await;
    let mut settings = db.settings();
    settings.http.public_url = "https://console.example.net".into();
    let server = TestServer::start(settings).await;
    let login = server
        .client(None)
        .post(
            paths::LOGIN,
            &Login {
                name: "alice".into(),
                password: "correct horse".into(),
            },
        )
        .await;
    assert_eq!(login.status, 200);
    let cookie = login.headers["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.split(';').any(|p| p.trim() == "Secure"), "{cookie}");
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    for path in [paths::LOGIN, "/", paths::HEALTH] {
        let a = if path == paths::LOGIN {
            login.headers.clone()
        } else {
            server.client(None).get(path).await.headers
        };
        let hsts = a
            .get("strict-transport-security")
            .unwrap_or_else(|| panic!("no HSTS on {path}: {a:?}"))
            .to_str()
            .unwrap();
        let max_age: u64 = hsts
            .split(';')
            .find_map(|p| p.trim().strip_prefix("max-age="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(max_age >= 15_552_000, "{hsts}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_http_json_bodies_need_the_json_content_type() {
    let db = TestDb::new(Backend::Sqlite);
    add_technician(&db, "alice", "correct horse").await;
    let server = TestServer::start(db.settings()).await;
    let http = reqwest::Client::new();
    let login = br#"{"name":"alice","password":"correct horse"}"#.to_vec();
    // What a plain HTML form (enctype text/plain) on another site can send.
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ] {
        let mut req = http
            .post(format!("{}{}", server.base, paths::LOGIN))
            .body(login.clone());
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 415, "{content_type:?}");
        assert!(!r.headers().contains_key("set-cookie"));
        let e: ApiError = r.json().await.unwrap();
        assert_eq!(e.error, "unsupported_media_type");
    }
    let r = http
        .post(format!("{}{}", server.base, paths::SITES))
        .bearer_auth(&server.operator)
        .header("content-type", "text/plain")
        .body(r#"{"name":"A"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    // JSON with parameters is JSON.
    let r = http
        .post(format!("{}{}", server.base, paths::LOGIN))
        .header("content-type", "application/json; charset=utf-8")
        .body(login)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    server.stop().await;
}

async fn security_http_feed_keeps_every_open_request(b: Backend) {
    let db = TestDb::new(b);
    let server = TestServer::start(db.settings()).await;
    let gw = add_gateway(&server, "gw1", 10, 1).await;
    gw.api.post(paths::GATEWAY_HEARTBEAT, &heartbeat(10)).await;
    let site = add_site(&server, "A", 1).await;
    let open: MaintenanceRequestView = site
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
        .await
        .json();
    // 350 newer requests, all closed (written directly: only their number
    // matters here, not how they closed).
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&db.url).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    for i in 0..350_i64 {
        sqlx::query(
            "INSERT INTO requests (site_id, requester_name, level, urgency, phone, content, state, \
             received_at, ended_at, expires_at) \
             VALUES ($1, 'old', 'general', 'low', '1', '', 'ended', $2, $2, $2)",
        )
        .bind(i64::try_from(site.id.0).unwrap())
        .bind(1_700_000_000_000 + i)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    pool.close().await;

    let tech = technician(&server, &db, "alice", "correct horse").await;
    let feed: ConsoleEvents = tech
        .get(&format!("{}?after=0", paths::CONSOLE_EVENTS))
        .await
        .json();
    assert!(
        feed.requests.iter().any(|r| r.id == open.id),
        "the open request {} vanished from the feed of {} requests",
        open.id,
        feed.requests.len()
    );
    let closed: Vec<&MaintenanceRequestView> = feed
        .requests
        .iter()
        .filter(|r| !r.state.is_open())
        .collect();
    assert_eq!(closed.len(), 100);
    assert!(feed.requests.windows(2).all(|w| w[0].id.0 > w[1].id.0));

    // The closed ones page backwards from the oldest in the feed.
    let mut oldest = closed.iter().map(|r| r.id.0).min().unwrap();
    let mut paged = closed.len();
    loop {
        let page: Vec<MaintenanceRequestView> = tech
            .get(&format!(
                "{}?state=closed&before={oldest}&limit=100",
                paths::REQUESTS
            ))
            .await
            .json();
        assert!(page.iter().all(|r| !r.state.is_open() && r.id.0 < oldest));
        paged += page.len();
        match page.last() {
            Some(last) => oldest = last.id.0,
            None => break,
        }
    }
    assert_eq!(paged, 350);
    let open_only: Vec<MaintenanceRequestView> = tech
        .get(&format!("{}?state=open", paths::REQUESTS))
        .await
        .json();
    assert_eq!(
        open_only.iter().map(|r| r.id).collect::<Vec<_>>(),
        [open.id]
    );
    tech.get(&format!("{}?state=bogus", paths::REQUESTS))
        .await
        .error(400, Some("state"));
    server.stop().await;
}

#[test]
fn security_http_bad_settings_name_their_key() {
    let load = |toml: &str| {
        let s: Settings =
            vpnnat::config::load(Some(("maintenance-server.toml", toml)), Vec::new()).unwrap();
        s.validate().err().map(|(key, _)| key)
    };
    assert_eq!(
        load("[http]\npublic_url = \"console.example.net\"\n"),
        Some("http.public_url")
    );
    assert_eq!(
        load("[operator]\nmetrics_token = \"short\"\n"),
        Some("operator.metrics_token")
    );
    assert_eq!(
        load("[http]\npublic_url = \"https://c.example.net\"\n"),
        None
    );
    let s: Settings = vpnnat::config::load(
        Some((
            "maintenance-server.toml",
            "[technicians]\nconcurrent_password_checks = 3\n",
        )),
        Vec::new(),
    )
    .unwrap();
    assert_eq!(s.password_checks(), 3);
    assert!(Settings::default().password_checks() >= 1);
    assert!(!Settings::default().console_https());
}
