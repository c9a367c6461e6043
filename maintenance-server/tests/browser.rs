//! The technician console in headless Chromium (Debian's chromium and
//! chromium-driver), driven over WebDriver by fantoccini, as a technician
//! uses it: at 1366×900 and on a 390×844 phone, with eight requests of
//! every urgency and long problem descriptions. The page never scrolls
//! sideways; a request's detail shows its timeline; End and Decline ask
//! first; focus stays where the technician acted; events (the customer
//! ends access, a request expires, a failure report) are announced and the
//! row kept; two tabs share one session; a stale session says "sign in
//! again"; a server outage marks the data stale and disables the actions.
//! A failure report is acknowledged from the failures tab (then shown as
//! such, and filtered). axe-core finds no serious or critical violation in
//! any of the views.
//!
//! Screenshots of every state go to `target/screenshots/` (or
//! `VPNNAT_SCREENSHOT_DIR`).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use fantoccini::Locator;
use serde_json::json;
use vpnnat::messages::*;
use vpnnat_test_support::browser::{Browser, require_browser};

/// Signs in on the console at `base`.
async fn login(b: &Browser, base: &str, name: &str, password: &str) {
    b.c().goto(base).await.unwrap();
    sign_in(b, name, password).await;
}

/// Fills and submits the sign-in form already shown.
async fn sign_in(b: &Browser, name: &str, password: &str) {
    b.type_into("#login-name", name).await;
    b.type_into("#login-password", password).await;
    click(b, "#login-submit").await;
}

/// Clicks `css` once displayed, scrolled to the middle of the window
/// (clear of the sticky top bar).
async fn click(b: &Browser, css: &str) {
    let e = b.visible(css).await;
    b.c()
        .execute(
            "arguments[0].scrollIntoView({ block: 'center' }); return null;",
            vec![serde_json::to_value(&e).unwrap()],
        )
        .await
        .unwrap();
    e.click().await.unwrap();
}

async fn text_of(b: &Browser, css: &str) -> String {
    b.c()
        .find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Waits until the focused element's id or `data-key` is `want`.
async fn wait_focus(b: &Browser, want: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let f = b.focused().await;
        if f == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "focus is on {f:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A request from `site`.
async fn ask(
    site: &Site,
    who: &str,
    urgency: Urgency,
    content: &str,
    terminal: &str,
) -> MaintenanceRequestView {
    site.agent
        .post(
            paths::AGENT_REQUESTS,
            &NewMaintenanceRequest {
                requester_name: who.into(),
                level: Level::Administrator,
                urgency,
                phone: "+49 30 1234 5678".into(),
                content: content.into(),
                terminals: names(&[terminal]),
            },
        )
        .await
        .json()
}

const LONG: &str = "The till PC in the shop does not boot since this morning: it shows a blue \
screen with INACCESSIBLE_BOOT_DEVICE, then restarts. We tried unplugging it, the printer next to it \
still works, the card terminal too. Please look at it before the lunch rush, we cannot sell anything \
without it. Verylongwordwithoutanyspacesthatwouldotherwisepushthetablewiderthanthescreen1234567890.";

/// Two sites with eight open requests, two of each urgency; the first
/// emergency is returned.
async fn eight_requests(a: &Site, b: &Site) -> Vec<MaintenanceRequestView> {
    let mut out = Vec::new();
    for (i, u) in [
        Urgency::Low,
        Urgency::Normal,
        Urgency::High,
        Urgency::Emergency,
    ]
    .into_iter()
    .enumerate()
    {
        out.push(ask(a, "Anna Schmidt", u, LONG, &format!("till-{i}")).await);
        out.push(ask(b, "Bernd Müller", u, "Printer offline", &format!("pc-{i}")).await);
    }
    out
}

async fn console_layout_detail_confirmation(width: u32, height: u32, tag: &str) {
    let db = TestDb::new(Backend::Sqlite);
    let server = TestServer::start(db.settings()).await;
    add_gateway(&server, "gw1", 10, 1).await;
    let a = add_site(&server, "Bakery Schmidt", 1).await;
    let s2 = add_site(&server, "Pharmacy Müller am Marktplatz", 2).await;
    add_technician(&db, "alice", "correct horse").await;
    let reqs = eight_requests(&a, &s2).await;

    let b = Browser::start(width, height).await;
    b.c().goto(&server.base).await.unwrap();
    b.visible("#login-name").await;
    b.assert_no_horizontal_overflow("sign-in").await;
    b.assert_accessible("sign-in").await;
    b.screenshot(&format!("console-{tag}-sign-in")).await;

    // A failed sign-in: the error next to the fields, focus back in the password.
    sign_in(&b, "alice", "wrong horse").await;
    b.wait_text("#login-error", "Wrong name or password").await;
    wait_focus(&b, "login-password").await;
    let invalid = b
        .c()
        .execute(
            "return document.getElementById('login-password').getAttribute('aria-invalid');",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(invalid, json!("true"));
    // A screen reader reads the error with the field.
    let described = b
        .c()
        .execute(
            "return document.getElementById('login-password').getAttribute('aria-describedby');",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(described, json!("login-error"));
    b.screenshot(&format!("console-{tag}-sign-in-refused"))
        .await;
    sign_in(&b, "alice", "correct horse").await;
    b.wait_text("#live-text", "live").await;
    b.wait_for("#requests tbody tr[data-id]").await;

    // All eight fit; the most urgent, longest-waiting comes first.
    let rows = b
        .c()
        .find_all(Locator::Css("#requests tbody tr[data-id]"))
        .await
        .unwrap();
    assert_eq!(rows.len(), 8);
    let first = rows[0].attr("data-id").await.unwrap().unwrap();
    assert_eq!(
        first,
        reqs[6].id.to_string(),
        "the oldest emergency is first"
    );
    assert!(b.c().title().await.unwrap().starts_with("(8 waiting)"));
    b.assert_no_horizontal_overflow("request list").await;
    // Every row's actions are inside the window.
    let outside = b
        .c()
        .execute(
            "return [...document.querySelectorAll('#requests button.act')] \
               .filter((e) => e.getBoundingClientRect().right > window.innerWidth).length;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(outside, json!(0), "actions off-screen");
    b.assert_accessible("request list").await;
    b.screenshot(&format!("console-{tag}-requests")).await;

    // A long problem is shortened; "Show all" expands it.
    let row = format!("#requests tbody tr[data-id=\"{}\"]", reqs[6].id);
    let more = format!("{row} button.more-text");
    click(&b, &more).await;
    b.wait_for(&format!("{row} .text:not(.clamp)")).await;
    wait_focus(&b, &format!("c{}:more", reqs[6].id)).await;

    // The detail view, with its timeline; closing it returns the focus.
    click(&b, &format!("{row} button.details")).await;
    b.visible("#detail").await;
    b.wait_text("#detail-timeline", "request received").await;
    b.wait_text("#detail-body", "till-3").await;
    b.assert_no_horizontal_overflow("detail").await;
    b.assert_accessible("detail").await;
    b.screenshot(&format!("console-{tag}-detail")).await;
    click(&b, "#detail-close").await;
    wait_focus(&b, &format!("{}:details", reqs[6].id)).await;

    // Start: focus moves to End of the same request; the row names who works.
    click(&b, &format!("{row} button.start")).await;
    b.wait_text(&format!("{row} td.state"), "in progress").await;
    b.wait_text(&format!("{row} td.state"), "alice since").await;
    wait_focus(&b, &format!("{}:end", reqs[6].id)).await;

    // End asks first; Cancel changes nothing and keeps the focus.
    click(&b, &format!("{row} button.end")).await;
    b.visible("#confirm").await;
    b.wait_text("#confirm-ok", "End access").await;
    b.assert_accessible("end confirmation").await;
    b.screenshot(&format!("console-{tag}-confirm-end")).await;
    click(&b, "#confirm-cancel").await;
    wait_focus(&b, &format!("{}:end", reqs[6].id)).await;
    let own: Vec<MaintenanceRequestView> = a.agent.get(paths::AGENT_REQUESTS).await.json();
    let me = own.iter().find(|r| r.id == reqs[6].id).unwrap();
    assert_eq!(me.state, RequestState::InProgress);
    // The site's agent learns who works on it.
    assert_eq!(me.technician.as_deref(), Some("alice"));
    assert!(me.started_at.is_some());

    // Confirmed: ended, the row stays (marked) with its NAT address.
    let nat = reqs[6].terminals[0].nat_address.unwrap().to_string();
    click(&b, &format!("{row} button.end")).await;
    click(&b, "#confirm-ok").await;
    b.wait_text(&format!("{row} td.state"), "ended").await;
    b.wait_text(&format!("{row} td.state"), "Ended by you")
        .await;
    assert!(text_of(&b, &format!("{row} td.nat")).await.contains(&nat));
    wait_focus(&b, &format!("{}:details", reqs[6].id)).await;
    let own: Vec<MaintenanceRequestView> = a.agent.get(paths::AGENT_REQUESTS).await.json();
    let me = own.iter().find(|r| r.id == reqs[6].id).unwrap();
    assert_eq!(me.state, RequestState::Ended);
    // Its detail still names the address it had, and who ended it.
    click(&b, &format!("{row} button.details")).await;
    b.wait_text("#detail-timeline", "ended the work — alice")
        .await;
    b.wait_text("#detail-body", &nat).await;
    b.screenshot(&format!("console-{tag}-detail-ended")).await;
    click(&b, "#detail-close").await;

    // A waiting request offers Decline (not End), and asks first too.
    let w = format!("#requests tbody tr[data-id=\"{}\"]", reqs[7].id);
    b.wait_text(&format!("{w} button.decline"), "Decline").await;
    click(&b, &format!("{w} button.decline")).await;
    b.wait_text("#confirm-title", "Decline").await;
    click(&b, "#confirm-ok").await;
    b.wait_text(&format!("{w} td.state"), "Declined by you")
        .await;
    assert!(b.c().title().await.unwrap().starts_with("(6 waiting)"));
    b.assert_no_horizontal_overflow("after the end").await;

    // The audit log: names instead of ids, the failed sign-in recorded.
    click(&b, "#tab-audit").await;
    b.wait_text("#audit tbody", "ended the work").await;
    let audit = text_of(&b, "#audit tbody").await;
    assert!(
        audit.contains(&format!("{} (Bakery Schmidt)", reqs[6].acceptance_number)),
        "{audit}"
    );
    assert!(
        !audit.contains("signed in"),
        "sign-ins are hidden by default"
    );
    b.select("#audit-kind", "technician.login_failed").await;
    b.wait_text("#audit tbody", "failed sign-in").await;
    // The other filters: one site, then one technician, then a time window.
    b.select("#audit-kind", "request").await;
    b.select("#audit-site", &s2.id.0.to_string()).await;
    b.wait_text("#audit tbody", "Pharmacy Müller").await;
    let one_site = text_of(&b, "#audit tbody").await;
    assert!(!one_site.contains("Bakery Schmidt"), "{one_site}");
    b.select("#audit-site", &a.id.0.to_string()).await;
    b.wait_text("#audit tbody", "ended the work").await;
    b.type_into("#audit-tech", "bob").await;
    click(&b, "#audit-refresh").await;
    b.visible("#audit-empty").await;
    b.type_into("#audit-tech", "alice").await;
    click(&b, "#audit-refresh").await;
    b.wait_text("#audit tbody", "ended the work").await;
    let by_alice = text_of(&b, "#audit tbody").await;
    assert!(!by_alice.contains("request received"), "{by_alice}");
    b.select("#audit-since", "3600000").await;
    b.wait_text("#audit tbody", "started the work").await;
    b.type_into("#audit-tech", "").await;
    b.select("#audit-site", "").await;
    b.select("#audit-since", "").await;
    b.select("#audit-kind", "technician.login_failed").await;
    b.wait_text("#audit tbody", "failed sign-in").await;
    b.assert_no_horizontal_overflow("audit").await;
    b.assert_accessible("audit").await;
    b.screenshot(&format!("console-{tag}-audit")).await;

    // Tabs: arrow keys move between them, aria-selected follows.
    b.visible("#tab-audit")
        .await
        .send_keys(&fantoccini::key::Key::Left.to_string())
        .await
        .unwrap();
    wait_focus(&b, "tab-failures").await;
    let sel = b
        .c()
        .execute(
            "return document.getElementById('tab-failures').getAttribute('aria-selected');",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(sel, json!("true"));
    b.visible("#panel-failures").await;

    // A failure report, in words, not acknowledged yet; acknowledged, it
    // leaves the default list and the badge, and is shown as such.
    a.agent
        .post(
            paths::AGENT_FAILURES,
            &FailureReport {
                code: FailureCode::TerminalUnreachable,
                detail: "till-0 does not answer".into(),
                terminal: None,
                open_request: false,
            },
        )
        .await;
    b.wait_text("#failures-badge", "1").await;
    let fresh = "#failures tbody tr.unacknowledged";
    b.wait_text(fresh, "Terminal not answering").await;
    b.wait_text(fresh, "Not acknowledged yet").await;
    let failure_id = b
        .visible(fresh)
        .await
        .attr("data-id")
        .await
        .unwrap()
        .unwrap();
    b.assert_no_horizontal_overflow("failures").await;
    b.assert_accessible("failures").await;
    b.screenshot(&format!("console-{tag}-failures")).await;
    click(&b, &format!("{fresh} button.ack")).await;
    b.visible("#failures-empty").await;
    wait_focus(&b, "failures-filter").await;
    let badge = b.c().find(Locator::Id("failures-badge")).await.unwrap();
    assert!(!badge.is_displayed().await.unwrap(), "the badge stayed");
    b.select("#failures-filter", "acknowledged").await;
    let done = format!("#failures tbody tr.acknowledged[data-id=\"{failure_id}\"]");
    b.wait_text(&done, "Acknowledged by alice at").await;
    b.wait_text(&done, "Terminal not answering").await;
    assert!(
        b.c()
            .find(Locator::Css(&format!("{done} button.ack")))
            .await
            .is_err(),
        "an acknowledged report offers Acknowledge"
    );
    b.assert_no_horizontal_overflow("acknowledged failures")
        .await;
    b.assert_accessible("acknowledged failures").await;
    b.screenshot(&format!("console-{tag}-failures-acknowledged"))
        .await;
    // The route: the CSRF header is required, a second acknowledgement is a
    // conflict, an unknown report is 404; the list names who acknowledged.
    let answers = b
        .c()
        .execute_async(
            "const [id, done] = [arguments[0], arguments[arguments.length - 1]]; \
             const t = localStorage.getItem('vpnnat.csrf'); \
             const post = (i, h) => fetch('/api/v1/failures/' + i + '/acknowledge', \
               { method: 'POST', headers: h }).then((r) => r.status); \
             Promise.all([post(id, {}), post(id, { 'X-CSRF-Token': t }), post(999999, { 'X-CSRF-Token': t }), \
               fetch('/api/v1/failures').then((r) => r.json())]).then(done);",
            vec![json!(failure_id)],
        )
        .await
        .unwrap();
    assert_eq!(answers[0], json!(403), "{answers}");
    assert_eq!(answers[1], json!(409), "{answers}");
    assert_eq!(answers[2], json!(404), "{answers}");
    let listed = answers[3]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["id"].as_u64().map(|i| i.to_string()).as_deref() == Some(failure_id.as_str()))
        .unwrap();
    assert_eq!(listed["acknowledged_by"], json!("alice"), "{listed}");
    assert!(listed["acknowledged_at"].as_u64().is_some(), "{listed}");
    // The audit log records it in words.
    click(&b, "#tab-audit").await;
    b.select("#audit-kind", "failure").await;
    b.wait_text("#audit tbody", "acknowledged a failure report")
        .await;
    b.close().await;
    server.stop().await;
}

/// The console's notices of events it did not cause (the customer ends
/// access, a request expires, a failure report) on a phone: announced, the
/// rows kept and marked, nothing wider than the screen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_console_event_notices_on_a_phone() {
    if !require_browser() {
        return;
    }
    let db = TestDb::new(Backend::Sqlite);
    let server = TestServer::start(db.settings()).await;
    add_gateway(&server, "gw1", 10, 1).await;
    let site = add_site(&server, "Bakery Schmidt", 1).await;
    add_technician(&db, "alice", "correct horse").await;
    let b = Browser::start(390, 844).await;
    login(&b, &server.base, "alice", "correct horse").await;
    b.wait_text("#live-text", "live").await;
    let gone = ask(&site, "Anna Schmidt", Urgency::High, "Till PC", "till-pc").await;
    let expiring = ask(&site, "Anna Schmidt", Urgency::Low, "NAS slow", "nas").await;
    let row = |r: &MaintenanceRequestView| format!("#requests tbody tr[data-id=\"{}\"]", r.id);
    b.wait_for(&row(&gone)).await;
    b.wait_for(&row(&expiring)).await;

    site.agent
        .post_empty(&at(paths::AGENT_REVOKE, gone.id))
        .await;
    b.wait_text("#toasts", "The customer ended access").await;
    b.wait_text(
        &format!("{} td.state", row(&gone)),
        "The customer ended access",
    )
    .await;
    db.scalar(&format!(
        "UPDATE requests SET expires_at = 1 WHERE id = {} RETURNING id",
        expiring.id
    ))
    .await;
    b.wait_text("#toasts", "The request expired").await;
    b.wait_text(
        &format!("{} td.state", row(&expiring)),
        "The request expired",
    )
    .await;
    site.agent
        .post(
            paths::AGENT_FAILURES,
            &FailureReport {
                code: FailureCode::TunnelDown,
                detail: "no handshake for 3 minutes".into(),
                terminal: None,
                open_request: false,
            },
        )
        .await;
    b.wait_text(
        "#toasts",
        "Failure report from Bakery Schmidt: Tunnel to the gateway down",
    )
    .await;
    b.wait_text("#failures-badge", "1").await;
    b.assert_no_horizontal_overflow("event notices").await;
    b.assert_accessible("event notices").await;
    b.screenshot("console-phone-events").await;
    // Acknowledging the report from the failures tab takes its notice away.
    click(&b, "#tab-failures").await;
    click(&b, "#failures tbody tr.unacknowledged button.ack").await;
    b.visible("#failures-empty").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while text_of(&b, "#toasts").await.contains("Failure report from") {
        assert!(
            std::time::Instant::now() < deadline,
            "the failure notice stayed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_console_at_1366_fits_shows_detail_and_confirms() {
    if !require_browser() {
        return;
    }
    console_layout_detail_confirmation(1366, 900, "1366").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_console_on_a_phone_fits_shows_detail_and_confirms() {
    if !require_browser() {
        return;
    }
    console_layout_detail_confirmation(390, 844, "phone").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_console_events_two_tabs_and_outage() {
    if !require_browser() {
        return;
    }
    let db = TestDb::new(Backend::Sqlite);
    let settings = db.settings();
    let server = TestServer::start(settings.clone()).await;
    add_gateway(&server, "gw1", 10, 1).await;
    let site = add_site(&server, "Bakery Schmidt", 1).await;
    add_technician(&db, "alice", "correct horse").await;

    let b = Browser::start(1366, 900).await;
    login(&b, &server.base, "alice", "correct horse").await;
    b.wait_text("#live-text", "live").await;
    b.c()
        .execute("window.__noReload = 42; return null;", vec![])
        .await
        .unwrap();

    // A new request appears by itself; the title counts it.
    let gone = ask(&site, "Anna Schmidt", Urgency::High, "Till PC", "till-pc").await;
    let expiring = ask(&site, "Anna Schmidt", Urgency::Low, "NAS slow", "nas").await;
    let row = |r: &MaintenanceRequestView| format!("#requests tbody tr[data-id=\"{}\"]", r.id);
    b.wait_for(&row(&gone)).await;
    b.wait_for(&row(&expiring)).await;
    let no_reload = b
        .c()
        .execute("return window.__noReload;", vec![])
        .await
        .unwrap();
    assert_eq!(no_reload, json!(42), "the page was reloaded");

    // The customer ends access: a notice, and the row stays, marked.
    site.agent
        .post_empty(&at(paths::AGENT_REVOKE, gone.id))
        .await;
    b.wait_text("#toasts", "The customer ended access").await;
    b.wait_text(
        &format!("{} td.state", row(&gone)),
        "The customer ended access",
    )
    .await;
    // A failure report.
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
    b.wait_text(
        "#toasts",
        "Failure report from Bakery Schmidt: LAN link down",
    )
    .await;
    b.wait_text("#failures-badge", "1").await;
    b.assert_accessible("event notices").await;
    b.screenshot("console-events").await;
    // Dismissed, the ended row leaves the default (open) list.
    click(&b, &format!("{} button.dismiss-row", row(&gone))).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while b.c().find(Locator::Css(&row(&gone))).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "the row stayed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The other request's time runs out (moved to the past in the
    // database; the server's own expiry scan ends it): announced too.
    db.scalar(&format!(
        "UPDATE requests SET expires_at = 1 WHERE id = {} RETURNING id",
        expiring.id
    ))
    .await;
    b.wait_text("#toasts", "The request expired").await;
    b.wait_text(&format!("{} td.state", row(&expiring)), "expired")
        .await;
    b.screenshot("console-expired").await;

    // Failures in words, with the failures tab.
    click(&b, "#tab-failures").await;
    b.wait_text("#failures tbody", "LAN link down").await;
    b.wait_text("#failures tbody", "eth1 carrier lost").await;
    b.assert_accessible("failures").await;
    b.screenshot("console-failures").await;
    click(&b, "#tab-requests").await;

    // Two tabs: signing in in the second one keeps the first working.
    let work = ask(&site, "Anna Schmidt", Urgency::Normal, "Printer", "printer").await;
    b.wait_for(&row(&work)).await;
    let first = b.c().window().await.unwrap();
    let second = b.c().new_window(true).await.unwrap();
    b.c().switch_to_window(second.handle).await.unwrap();
    b.c().goto(&server.base).await.unwrap();
    // The session is shared: the second tab is signed in already.
    b.wait_text("#who", "alice").await;
    click(&b, "#logout").await;
    b.visible("#login-name").await;
    sign_in(&b, "alice", "correct horse").await;
    b.wait_text("#live-text", "live").await;
    b.c().switch_to_window(first.clone()).await.unwrap();
    click(&b, &format!("{} button.start", row(&work))).await;
    b.wait_text(&format!("{} td.state", row(&work)), "in progress")
        .await;

    // A session that changed behind the tab's back: "sign in again".
    // (A sign-in behind the console's back replaces the browser's cookie
    // and leaves the tab with the old CSRF token.)
    b.c()
        .execute_async(
            "const done = arguments[arguments.length - 1]; \
             fetch('/api/v1/login', { method: 'POST', headers: { 'Content-Type': 'application/json' }, \
               body: JSON.stringify({ name: 'alice', password: 'correct horse' }) }).then((r) => done(r.status));",
            vec![],
        )
        .await
        .unwrap();
    click(&b, &format!("{} button.end", row(&work))).await;
    click(&b, "#confirm-ok").await;
    b.wait_text("#login-notice", "Please sign in again").await;
    let page = text_of(&b, "body").await;
    assert!(!page.contains("X-CSRF-Token"), "a raw error was shown");
    b.screenshot("console-sign-in-again").await;
    sign_in(&b, "alice", "correct horse").await;
    b.wait_text("#live-text", "live").await;
    b.wait_for(&format!("{} button.end", row(&work))).await;

    // The server goes away: stale, actions disabled; back when it returns.
    let addr = server.addr;
    server.stop().await;
    b.visible("#stale").await;
    b.wait_text("#live-text", "offline").await;
    let enabled = b
        .c()
        .execute(
            "return [...document.querySelectorAll('button.act')].filter((e) => !e.disabled).length;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(enabled, json!(0), "actions stay enabled during the outage");
    b.assert_no_horizontal_overflow("outage").await;
    b.assert_accessible("outage").await;
    b.screenshot("console-outage").await;
    let server = TestServer::start_at(settings, addr).await;
    b.wait_text("#live-text", "live").await;
    assert!(
        !b.c()
            .find(Locator::Id("stale"))
            .await
            .unwrap()
            .is_displayed()
            .await
            .unwrap()
    );
    b.wait_for(&format!("{} button.end:not([disabled])", row(&work)))
        .await;
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
    sign_in(&b, "alice", "correct horse").await;
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
    // Log out: back at the sign-in form.
    click(&b, "#logout").await;
    b.wait_for("#login-view:not([hidden]) #login-name").await;
    b.close().await;
    server.stop().await;
}
