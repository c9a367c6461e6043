//! The technician console in headless Chromium (Debian's chromium and
//! chromium-driver), driven over WebDriver by fantoccini: sign in, see a
//! request that an agent makes appear without reloading, start it, end it,
//! see the state change; a wrong password is refused.
//!
//! Set `VPNNAT_SCREENSHOT_DIR` to keep screenshots of the console.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;
use vpnnat::messages::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

fn require_browser() -> bool {
    for p in [CHROMIUM, CHROMEDRIVER] {
        if !std::path::Path::new(p).is_file() {
            assert!(
                std::env::var_os("CI").is_none(),
                "prerequisite missing in CI: {p} (run scripts/setup.sh as root)"
            );
            eprintln!("SKIP: needs {p} (apt-get install chromium chromium-driver)");
            return false;
        }
    }
    true
}

/// chromedriver on a free loopback port and a fresh browser profile; both go away on drop.
struct Browser {
    driver: Child,
    client: Option<Client>,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Self {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let profile = tempfile::tempdir().unwrap();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1500,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            match ClientBuilder::new(HttpConnector::new())
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => break c,
                Err(e) => {
                    assert!(Instant::now() < deadline, "chromedriver: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        Self {
            driver,
            client: Some(client),
            _profile: profile,
        }
    }

    fn c(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    async fn close(mut self) {
        if let Some(c) = self.client.take() {
            let _ = c.close().await;
        }
    }

    async fn wait_for(&self, css: &str) -> fantoccini::elements::Element {
        self.c()
            .wait()
            .at_most(Duration::from_secs(15))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css} did not appear: {e}"))
    }

    async fn wait_text(&self, css: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let text = match self.c().find(Locator::Css(css)).await {
                Ok(e) => e.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if text.contains(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{css}: {text:?} never contained {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&self, name: &str) {
        if let Some(dir) = std::env::var_os("VPNNAT_SCREENSHOT_DIR") {
            let png = self.c().screenshot().await.unwrap();
            std::fs::write(std::path::Path::new(&dir).join(format!("{name}.png")), png).unwrap();
        }
    }

    async fn login(&self, base: &str, name: &str, password: &str) {
        self.c().goto(base).await.unwrap();
        let n = self.wait_for("#login-name").await;
        n.clear().await.unwrap();
        n.send_keys(name).await.unwrap();
        let p = self.c().find(Locator::Id("login-password")).await.unwrap();
        p.clear().await.unwrap();
        p.send_keys(password).await.unwrap();
        self.c()
            .find(Locator::Id("login-submit"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_technician_sees_a_new_request_live_then_starts_and_ends_it() {
    if !require_browser() {
        return;
    }
    let db = TestDb::new(Backend::Sqlite);
    let server = TestServer::start(db.settings()).await;
    add_gateway(&server, "gw1", 10, 1).await;
    let site = add_site(&server, "Bakery Schmidt", 1).await;
    add_technician(&db, "alice", "correct horse").await;

    let b = Browser::start().await;
    b.login(&server.base, "alice", "correct horse").await;
    b.wait_text("#who", "alice").await;
    b.wait_text("#live-text", "live").await;
    // Show every state, so the row stays visible after the end.
    b.c()
        .find(Locator::Id("filter-state"))
        .await
        .unwrap()
        .select_by_value("")
        .await
        .unwrap();
    // A marker that a reload would lose.
    b.c()
        .execute("window.__noReload = 42; return null;", vec![])
        .await
        .unwrap();

    // The agent asks for maintenance; the row appears by itself.
    let r: MaintenanceRequestView = site
        .agent
        .post(
            paths::AGENT_REQUESTS,
            &NewMaintenanceRequest {
                requester_name: "Anna Schmidt".into(),
                level: Level::Administrator,
                urgency: Urgency::Emergency,
                phone: "+49 30 1234".into(),
                content: "Till PC <b>does not</b> boot".into(),
                terminals: names(&["till-pc", "nas"]),
            },
        )
        .await
        .json();
    let row = format!("#requests tbody tr[data-id=\"{}\"]", r.id);
    b.wait_for(&row).await;
    let text = b
        .c()
        .find(Locator::Css(&row))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for want in [
        r.acceptance_number.as_str(),
        "Bakery Schmidt",
        "127.0.0.1",
        "Anna Schmidt",
        "administrator",
        "+49 30 1234",
        "emergency",
        "Till PC <b>does not</b> boot",
        "till-pc",
        &r.terminals[0].nat_address.unwrap().to_string(),
        &r.terminals[1].nat_address.unwrap().to_string(),
        "waiting",
    ] {
        assert!(text.contains(want), "{want:?} not in the row: {text:?}");
    }
    let no_reload = b
        .c()
        .execute("return window.__noReload;", vec![])
        .await
        .unwrap();
    assert_eq!(no_reload, json!(42), "the page was reloaded");
    b.screenshot("console-waiting").await;

    // Start.
    b.c()
        .find(Locator::Css(&format!("{row} button.start")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_text(&format!("{row} td.state"), "in progress").await;
    let own: Vec<MaintenanceRequestView> = site.agent.get(paths::AGENT_REQUESTS).await.json();
    assert_eq!(own[0].state, RequestState::InProgress);

    // End.
    b.c()
        .find(Locator::Css(&format!("{row} button.end")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_text(&format!("{row} td.state"), "ended").await;
    let own: Vec<MaintenanceRequestView> = site.agent.get(paths::AGENT_REQUESTS).await.json();
    assert_eq!(own[0].state, RequestState::Ended);
    assert!(agent_state(&site, 0, 0).await.mappings.is_empty());
    assert!(
        b.c()
            .find_all(Locator::Css(&format!("{row} button")))
            .await
            .unwrap()
            .is_empty(),
        "an ended request has no buttons"
    );

    // A failure report shows up in the failures tab; the audit log has it all.
    site.agent
        .post(
            paths::AGENT_FAILURES,
            &FailureReport {
                code: FailureCode::LanLinkDown,
                detail: "eth1 carrier lost".into(),
                terminal: None,
                open_request: false,
            },
        )
        .await;
    b.wait_text("#failures-badge", "1").await;
    b.c()
        .find(Locator::Id("tab-failures"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_text("#failures tbody", "eth1 carrier lost").await;
    b.c()
        .find(Locator::Id("tab-audit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_text("#audit tbody", "request.end").await;
    b.wait_text("#audit tbody", "technician:alice").await;
    b.screenshot("console-audit").await;

    // Log out: back at the sign-in form, and the session is gone.
    b.c()
        .find(Locator::Id("logout"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_for("#login-view:not([hidden]) #login-name").await;
    b.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_a_wrong_password_is_refused() {
    if !require_browser() {
        return;
    }
    let db = TestDb::new(Backend::Sqlite);
    let server = TestServer::start(db.settings()).await;
    add_technician(&db, "alice", "correct horse").await;
    let b = Browser::start().await;
    b.login(&server.base, "alice", "wrong horse").await;
    b.wait_text("#login-error", "Wrong name or password").await;
    assert!(
        !b.c()
            .find(Locator::Id("app-view"))
            .await
            .unwrap()
            .is_displayed()
            .await
            .unwrap()
    );
    b.screenshot("console-refused").await;
    // No session cookie was set.
    let cookies = b.c().get_all_cookies().await.unwrap();
    assert!(cookies.iter().all(|c| c.name() != "vpnnat_session"));
    // The right one works.
    b.login(&server.base, "alice", "correct horse").await;
    b.wait_text("#who", "alice").await;
    let cookies = b.c().get_all_cookies().await.unwrap();
    let session = cookies
        .iter()
        .find(|c| c.name() == "vpnnat_session")
        .unwrap();
    assert_eq!(session.http_only(), Some(true));
    // The page cannot read its own session cookie.
    let visible = b
        .c()
        .execute("return document.cookie;", vec![])
        .await
        .unwrap();
    assert!(!visible.as_str().unwrap().contains("vpnnat_session"));
    b.close().await;
    server.stop().await;
}
