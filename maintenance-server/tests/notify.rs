//! Notifications: signed webhooks for the provider's ticketing system (a
//! new request, a failure report, a request nearing its expiry), retried
//! with back-off across a server restart and given up after
//! `max_attempts`; and the console's desktop notifications in headless
//! Chromium. The receiver is a small HTTP server on loopback that checks
//! nothing itself: the tests check the signature with their own HMAC.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::*;
use hmac::{Hmac, Mac as _};
use maintenance_server::settings::{Settings, Webhook};
use serde_json::Value;
use sha2::Sha256;
use vpnnat::messages::*;

/// One post the receiver got.
#[derive(Debug, Clone)]
struct Post {
    headers: HeaderMap,
    body: Vec<u8>,
    json: Value,
}

#[derive(Default)]
struct Inbox {
    posts: Vec<Post>,
    /// Statuses to answer, one per post; afterwards 200.
    script: Vec<u16>,
}

/// A webhook receiver on loopback.
struct Receiver {
    url: String,
    inbox: Arc<Mutex<Inbox>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(script: &[u16]) -> Self {
        let inbox = Arc::new(Mutex::new(Inbox {
            posts: Vec::new(),
            script: script.iter().rev().copied().collect(),
        }));
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(inbox.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { url, inbox, task }
    }

    fn posts(&self) -> Vec<Post> {
        self.inbox.lock().unwrap().posts.clone()
    }

    /// Waits until a post satisfies `pred`; returns it.
    async fn wait_for(&self, what: &str, pred: impl Fn(&Post) -> bool) -> Post {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(p) = self.posts().into_iter().find(|p| pred(p)) {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "no webhook post {what} within 30 s; got {:#?}",
                self.posts().iter().map(|p| &p.json).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(
    State(inbox): State<Arc<Mutex<Inbox>>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let mut i = inbox.lock().unwrap();
    let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
    i.posts.push(Post {
        headers,
        body: body.to_vec(),
        json,
    });
    StatusCode::from_u16(i.script.pop().unwrap_or(200)).unwrap()
}

const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";

/// Settings with one webhook to `url` (its secret in a 0600 file of the
/// test's directory) and quick retries.
fn with_webhook(db: &TestDb, url: &str) -> Settings {
    let mut s = db.settings();
    let file: PathBuf = db.dir.path().join("webhook.secret");
    std::fs::write(&file, format!("{SECRET}\n")).unwrap();
    s.notifications.webhooks = vec![Webhook {
        name: "tickets".into(),
        url: url.into(),
        secret_file: file,
        events: Vec::new(),
    }];
    s.notifications.retry_initial_ms = 200;
    s.notifications.retry_max_ms = 1_000;
    s.notifications.timeout_ms = 2_000;
    s
}

/// Checks the post's signature as a receiver would: HMAC-SHA256 under the
/// secret of "t.body", with `t` within five minutes of now.
fn assert_signed(p: &Post) {
    let sig = p.headers["vpnnat-signature"].to_str().unwrap();
    let (t, v1) = sig
        .strip_prefix("t=")
        .and_then(|r| r.split_once(",v1="))
        .unwrap_or_else(|| panic!("signature header {sig:?}"));
    let t: i64 = t.parse().unwrap();
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap();
    assert!((now - t).abs() < 300, "signature time {t}, now {now}");
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&p.body);
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(v1, want, "signature does not verify");
    // A receiver holding another secret, or seeing another body, refuses it.
    let mut other = Hmac::<Sha256>::new_from_slice(b"another secret of 32 characters!").unwrap();
    other.update(format!("{t}.").as_bytes());
    other.update(&p.body);
    assert_ne!(
        v1,
        other
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    assert_eq!(
        p.headers["vpnnat-event-id"].to_str().unwrap(),
        p.json["id"].as_str().unwrap()
    );
    assert_eq!(
        p.headers["vpnnat-event"].to_str().unwrap(),
        p.json["type"].as_str().unwrap()
    );
    assert_eq!(p.headers["content-type"], "application/json");
}

fn of_type(t: &'static str) -> impl Fn(&Post) -> bool {
    move |p| p.json["type"] == t
}

async fn request_from(site: &Site, terminal: &str) -> MaintenanceRequestView {
    let a = site
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&[terminal]))
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    a.json()
}

async fn metric(server: &TestServer, line_start: &str) -> i64 {
    let a = server.operator().get(paths::METRICS).await;
    let text = a.body.as_str().unwrap_or_default().to_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .unwrap_or_else(|| panic!("{line_start} missing in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// A request, a failure report and a request nearing its expiry each reach
/// the receiver once, signed; the console's view of the request carries
/// the expiry warning.
async fn notify_webhooks_signed_for_request_failure_and_expiry(backend: Backend) {
    let db = TestDb::new(backend);
    let rx = Receiver::start(&[]).await;
    let mut s = with_webhook(&db, &rx.url);
    // Leases of 20 min, announced 20 min before: at once.
    s.maintenance.max_duration_s = 1_200;
    s.notifications.expiry_warning_s = 1_200;
    let server = TestServer::start(s).await;
    add_gateway(&server, "gw1", 10, 1).await;
    let site = add_site(&server, "Bakery", 1).await;
    let tech = technician(&server, &db, "alice", "correct horse").await;

    let req = request_from(&site, "till").await;
    let created = rx
        .wait_for("request.created", of_type("request.created"))
        .await;
    assert_signed(&created);
    let r = &created.json["data"]["request"];
    assert_eq!(r["acceptance_number"], req.acceptance_number.as_str());
    assert_eq!(r["site_name"], "Bakery");
    assert_eq!(r["terminals"][0]["name"], "till");
    assert_eq!(r["urgency"], "high");

    let expiring = rx
        .wait_for("request.expiring", of_type("request.expiring"))
        .await;
    assert_signed(&expiring);
    assert_eq!(
        expiring.json["data"]["request"]["id"],
        serde_json::json!(req.id.0)
    );
    let views: Vec<MaintenanceRequestView> = tech.get(paths::REQUESTS).await.json();
    let v = views.iter().find(|v| v.id == req.id).unwrap();
    assert!(v.expiry_warned_at.is_some(), "{v:?}");

    let accepted: FailureAccepted = site
        .agent
        .post(
            paths::AGENT_FAILURES,
            &FailureReport {
                code: FailureCode::TerminalUnreachable,
                detail: "the till does not answer".into(),
                terminal: Some(TerminalName::new("till").unwrap()),
                open_request: false,
            },
        )
        .await
        .json();
    let failure = rx
        .wait_for("failure.reported", of_type("failure.reported"))
        .await;
    assert_signed(&failure);
    let f = &failure.json["data"]["failure"];
    assert_eq!(f["id"], serde_json::json!(accepted.failure_id));
    assert_eq!(f["code"], "terminal_unreachable");
    assert_eq!(f["site_name"], "Bakery");

    // Each event once: nothing more arrives (the expiry warning is not
    // repeated on the next ticks of the background task).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let posts = rx.posts();
    for t in ["request.created", "request.expiring", "failure.reported"] {
        assert_eq!(
            posts.iter().filter(|p| p.json["type"] == t).count(),
            1,
            "{t}: {:#?}",
            posts.iter().map(|p| &p.json).collect::<Vec<_>>()
        );
    }
    assert_eq!(
        metric(
            &server,
            "vpnnat_webhook_attempts_total{outcome=\"delivered\"} "
        )
        .await,
        3
    );
    assert_eq!(
        metric(&server, "vpnnat_webhook_deliveries_pending ").await,
        0
    );
    server.stop().await;
}

/// A receiver that fails is retried with growing pauses, also after the
/// server restarted in between; every attempt carries the same event id,
/// and the delivery ends once the receiver accepts it.
async fn notify_webhook_retries_with_backoff_across_a_restart(backend: Backend) {
    let db = TestDb::new(backend);
    // Three refusals, then 200.
    let rx = Receiver::start(&[503, 500, 502]).await;
    let mut s = with_webhook(&db, &rx.url);
    s.notifications.expiry_warning_s = 0;
    s.notifications.retry_initial_ms = 1_500;
    s.notifications.retry_max_ms = 2_000;
    let server = TestServer::start(s.clone()).await;
    add_gateway(&server, "gw1", 10, 1).await;
    let site = add_site(&server, "Bakery", 1).await;
    request_from(&site, "till").await;
    // The first refusal is recorded, then the server goes away before the
    // retry is due.
    rx.wait_for("a first attempt", |_| true).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while db
        .scalar("SELECT COUNT(*) FROM webhook_deliveries WHERE last_error IS NOT NULL")
        .await
        == 0
    {
        assert!(Instant::now() < deadline, "the refusal was never recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let addr = server.addr;
    server.stop().await;
    let server = TestServer::start_at(s, addr).await;
    let delivered = rx
        .wait_for("a fourth attempt", |_| rx.posts().len() >= 4)
        .await;
    let posts = rx.posts();
    assert_eq!(posts.len(), 4, "{posts:#?}");
    let id = posts[0].json["id"].as_str().unwrap().to_owned();
    for p in &posts {
        assert_signed(p);
        assert_eq!(p.json["id"], id.as_str(), "every attempt is the same event");
    }
    assert_eq!(delivered.json["type"], "request.created");
    // Delivered: nothing more is sent.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(rx.posts().len(), 4);
    assert_eq!(
        db.scalar("SELECT attempts FROM webhook_deliveries").await,
        4
    );
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM webhook_deliveries WHERE delivered_at IS NOT NULL")
            .await,
        1
    );
    server.stop().await;
}

/// A receiver that never accepts: the delivery is given up after
/// `max_attempts`, counted, and not tried again.
async fn notify_webhook_given_up_after_max_attempts(backend: Backend) {
    let db = TestDb::new(backend);
    let rx = Receiver::start(&[500; 50]).await;
    let mut s = with_webhook(&db, &rx.url);
    s.notifications.expiry_warning_s = 0;
    s.notifications.max_attempts = 3;
    s.notifications.retry_initial_ms = 100;
    s.notifications.retry_max_ms = 200;
    let server = TestServer::start(s).await;
    add_gateway(&server, "gw1", 10, 1).await;
    let site = add_site(&server, "Bakery", 1).await;
    request_from(&site, "till").await;
    rx.wait_for("three attempts", |_| rx.posts().len() >= 3)
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&server, "vpnnat_webhook_deliveries_given_up_total ").await < 1 {
        assert!(Instant::now() < deadline, "never given up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(rx.posts().len(), 3, "no attempt after giving up");
    assert_eq!(
        metric(&server, "vpnnat_webhook_deliveries_pending ").await,
        0
    );
    assert_eq!(
        metric(
            &server,
            "vpnnat_webhook_attempts_total{outcome=\"failed\"} "
        )
        .await,
        3
    );
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM webhook_deliveries WHERE given_up_at IS NOT NULL")
            .await,
        1
    );
    server.stop().await;
}

both!(
    notify_webhooks_signed_for_request_failure_and_expiry,
    notify_webhook_retries_with_backoff_across_a_restart,
    notify_webhook_given_up_after_max_attempts,
);

/// Bad webhook settings: refused before anything starts, with the key.
#[tokio::test]
async fn notify_bad_webhook_settings_name_the_key() {
    let db = TestDb::new(Backend::Sqlite);
    let mut s = with_webhook(&db, "http://tickets.example.net/hook");
    let (key, msg) = s.validate().unwrap_err();
    assert_eq!(key, "notifications.webhooks.url");
    assert!(msg.contains("https://"), "{msg}");

    s.notifications.webhooks[0].url = "https://tickets.example.net/hook".into();
    s.notifications.webhooks[0].events = vec!["request.deleted".into()];
    assert_eq!(s.validate().unwrap_err().0, "notifications.webhooks.events");

    s.notifications.webhooks[0].events = Vec::new();
    s.notifications
        .webhooks
        .push(s.notifications.webhooks[0].clone());
    assert_eq!(s.validate().unwrap_err().0, "notifications.webhooks.name");
    s.notifications.webhooks.pop();

    let short = db.dir.path().join("short.secret");
    std::fs::write(&short, "too short").unwrap();
    s.notifications.webhooks[0].secret_file = short;
    assert!(s.validate().is_ok());
    let e = maintenance_server::webhooks::Sender::load(&s)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("notifications.webhooks.secret_file") && e.contains("at least 32"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
    s.notifications.webhooks[0].secret_file = db.dir.path().join("missing.secret");
    let e = format!(
        "{:#}",
        maintenance_server::webhooks::Sender::load(&s)
            .err()
            .unwrap()
    );
    assert!(e.contains("missing.secret"), "{e}");
}

mod browser {
    use super::*;
    use vpnnat_test_support::browser::{Browser, require_browser};

    /// Records every desktop notification the page creates (and still
    /// creates it: the browser's own API runs underneath).
    const RECORD: &str = "window.__shown = []; const N = window.Notification; \
        class Recorded extends N { constructor(title, opts) { \
            window.__shown.push({ title, tag: opts && opts.tag, body: opts && opts.body }); \
            super(title, opts); } } \
        Object.defineProperty(Recorded, 'permission', { get: () => N.permission }); \
        Recorded.requestPermission = (...a) => N.requestPermission(...a); \
        window.Notification = Recorded; return N.permission;";

    async fn shown(b: &Browser, want: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let v = b
                .c()
                .execute("return window.__shown;", vec![])
                .await
                .unwrap();
            if let Some(n) = v
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["title"].as_str().unwrap_or("").contains(want))
            {
                return n.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no desktop notification {want:?}; shown: {v}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A technician who allowed notifications gets one for a new request,
    /// a failure report and a request nearing its expiry, each tagged so
    /// that several tabs show it once; a browser that has not been asked
    /// offers the button instead.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn notify_console_desktop_notifications() {
        if !require_browser() {
            return;
        }
        let db = TestDb::new(Backend::Sqlite);
        let mut s = db.settings();
        // Leases of 20 min, announced 20 min before: at once.
        s.maintenance.max_duration_s = 1_200;
        s.notifications.expiry_warning_s = 1_200;
        let server = TestServer::start(s).await;
        add_gateway(&server, "gw1", 10, 1).await;
        let site = add_site(&server, "Bakery", 1).await;
        add_technician(&db, "alice", "correct horse").await;

        // Not asked yet: the button is offered.
        let plain = Browser::start(1366, 900).await;
        plain.c().goto(&server.base).await.unwrap();
        plain.type_into("#login-name", "alice").await;
        plain.type_into("#login-password", "correct horse").await;
        plain.click("#login-submit").await;
        plain.visible("#notify-on").await;
        plain.close().await;

        let b = Browser::start_allowing_notifications(1366, 900).await;
        b.c().goto(&server.base).await.unwrap();
        b.type_into("#login-name", "alice").await;
        b.type_into("#login-password", "correct horse").await;
        b.click("#login-submit").await;
        b.wait_text("#who", "alice").await;
        let permission = b.c().execute(RECORD, vec![]).await.unwrap();
        assert_eq!(permission, "granted");
        let hidden = b
            .c()
            .execute(
                "return document.getElementById('notify-on').hidden;",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(hidden, true, "permission given: no button");
        // Wait for the first feed, so that the request below is news.
        b.wait_for("#live.on").await;

        let req = request_from(&site, "till").await;
        let n = shown(&b, &format!("New request {}", req.acceptance_number)).await;
        assert_eq!(n["tag"], format!("vpnnat-request-{}", req.id.0));
        assert!(n["body"].as_str().unwrap().contains("Bakery"), "{n}");
        // And its expiry warning, which the server sends at once here.
        let n = shown(&b, "expires soon").await;
        assert_eq!(n["tag"], format!("vpnnat-expiring-{}", req.id.0));
        b.wait_text("#requests", "expires").await;

        let accepted: FailureAccepted = site
            .agent
            .post(
                paths::AGENT_FAILURES,
                &FailureReport {
                    code: FailureCode::LanLinkDown,
                    detail: "eth1 carrier lost".into(),
                    terminal: None,
                    open_request: false,
                },
            )
            .await
            .json();
        let n = shown(&b, "Failure report from Bakery").await;
        assert_eq!(n["tag"], format!("vpnnat-failure-{}", accepted.failure_id));
        b.screenshot("console-notifications").await;
        b.close().await;
        server.stop().await;
    }
}
