//! The technician console in headless Chromium (Debian's chromium and
//! chromium-driver), driven over WebDriver by fantoccini: sign in, see a
//! request that an agent makes appear without reloading, start it, end it,
//! see the state change; a wrong password is refused.
//!
//! Set `VPNNAT_SCREENSHOT_DIR` to keep screenshots of the console.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use fantoccini::Locator;
use serde_json::json;
use vpnnat::messages::*;
use vpnnat_test_support::browser::{Browser, require_browser};

/// Signs in on the console at `base`.
async fn login(b: &Browser, base: &str, name: &str, password: &str) {
    b.c().goto(base).await.unwrap();
    let n = b.wait_for("#login-name").await;
    n.clear().await.unwrap();
    n.send_keys(name).await.unwrap();
    let p = b.c().find(Locator::Id("login-password")).await.unwrap();
    p.clear().await.unwrap();
    p.send_keys(password).await.unwrap();
    b.c()
        .find(Locator::Id("login-submit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
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

    let b = Browser::start(1500, 900).await;
    login(&b, &server.base, "alice", "correct horse").await;
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
    let b = Browser::start(1500, 900).await;
    login(&b, &server.base, "alice", "wrong horse").await;
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
    login(&b, &server.base, "alice", "correct horse").await;
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
