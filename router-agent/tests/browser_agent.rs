//! The customer's page in headless Chromium (Debian's chromium and
//! chromium-driver), driven over WebDriver by fantoccini, against the real
//! maintenance server: a wrong password is refused; log in, fill in the form,
//! press the button, see the acceptance number and the NAT address; press
//! "End access now" and see access end (on the page, in the agent, in the
//! technician's view).
//!
//! The page at 1366×900 and on a 390×844 phone: no sideways scrolling,
//! no serious or critical axe-core violation, errors next to their field
//! in plain words, honest access states, a warning when the router stops
//! answering and why the customer had to log in again after its restart.
//!
//! The customer sees who works on a request and since when, a terminal the
//! router refused with the reason in words, and a notice when the center
//! declines a request or the technician ends the work.
//!
//! Screenshots go to `target/screenshots/` (or `VPNNAT_SCREENSHOT_DIR`).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod support;

use std::time::{Duration, Instant};

use fantoccini::Locator;
use serde_json::Value;
use support::{Agent, Center, PASSWORD, enrolled, pc};
use vpnnat::messages::{
    Level, Login, LoginResponse, MaintenanceRequestView, NewMaintenanceRequest, RequestId,
    RequestState, TerminalName, Urgency, paths,
};
use vpnnat_test_support::browser::{Browser, require_browser};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_customer_requests_maintenance_and_ends_access() {
    if !require_browser() {
        return;
    }
    let mut center = Center::start(3600).await;
    let (port, _pc) = pc().await;
    let mut agent = enrolled(&mut center, port).await;
    agent.start().await;
    let b = Browser::start(1100, 1400).await;
    let page = format!("http://{}/", agent.web);
    b.c().goto(&page).await.unwrap();

    // A wrong password is refused.
    b.type_into("#password", "not the password").await;
    b.click("#login-button").await;
    b.wait_text("#login-error", "wrong password").await;
    assert!(
        !b.c()
            .find(Locator::Css("#main"))
            .await
            .unwrap()
            .is_displayed()
            .await
            .unwrap()
    );

    // The right one opens the page.
    b.type_into("#password", PASSWORD).await;
    b.click("#login-button").await;
    b.visible("#request-form").await;
    b.wait_text("#site-name", "Bakery Schmidt").await;
    b.screenshot("agent-1-form").await;

    // Fill in the form and press the button.
    b.type_into("#requester_name", "Anna Schmidt").await;
    b.type_into("#phone", "+49 30 1234 567").await;
    b.select("#level", "administrator").await;
    b.select("#urgency", "high").await;
    b.type_into("#content", "The till does not print receipts.")
        .await;
    b.click("#terminal-pc-1").await;
    b.click("#submit-request").await;

    // The acceptance number and the NAT address appear.
    let deadline = Instant::now() + Duration::from_secs(15);
    let number = loop {
        let text = match b.c().find(Locator::Css(".acceptance-number")).await {
            Ok(e) => e.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if !text.trim().is_empty() {
            break text.trim().to_owned();
        }
        assert!(Instant::now() < deadline, "no acceptance number appeared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let nat = b.wait_text("td.nat-address", "10.64.").await;
    b.wait_text(".request-state", "Waiting for a technician")
        .await;
    b.wait_text("#notice", &number).await;
    // Honest: the API gateway of this test brings no tunnel up, so the
    // page does not claim that a technician can connect.
    let access = b
        .wait_text("tr[data-terminal='pc-1'] td.active", "Ready here")
        .await;
    assert!(!access.contains("can connect"), "{access}");
    b.screenshot("agent-2-requested").await;
    println!("acceptance number {number}, NAT address {nat}");

    // It is what the server accepted and what the technician sees.
    let seen = center.technician_requests().await;
    let r = seen
        .iter()
        .find(|r| r.acceptance_number == number)
        .unwrap_or_else(|| panic!("{number} not in the console: {seen:?}"));
    assert_eq!(r.state, RequestState::Waiting);
    assert_eq!(r.requester_name, "Anna Schmidt");
    assert_eq!(
        r.terminals[0].nat_address.map(|a| a.to_string()),
        Some(nat.trim().to_owned())
    );
    let s = agent.status().await;
    assert_eq!(s["mappings"][0]["nat"], nat.trim());

    // End access now.
    b.click(".end-access").await;
    b.wait_text("#notice", "has ended").await;
    b.wait_text("#history", "Ended by you").await;
    let current = b.c().find(Locator::Css("#current")).await.unwrap();
    assert!(
        !current.is_displayed().await.unwrap(),
        "no open request left"
    );
    b.screenshot("agent-3-ended").await;
    agent
        .wait_status("the mapping removed", Duration::from_secs(1), |s| {
            s["mappings"].as_array().is_some_and(Vec::is_empty)
        })
        .await;
    let seen = center.technician_requests().await;
    assert_eq!(
        seen.iter()
            .find(|r| r.acceptance_number == number)
            .unwrap()
            .state,
        RequestState::Revoked
    );
    b.close().await;
}

async fn customer_page_at(width: u32, height: u32, tag: &str) {
    let mut center = Center::start(3600).await;
    let (port, _pc) = pc().await;
    let mut agent = enrolled(&mut center, port).await;
    agent.start().await;
    let b = Browser::start(width, height).await;
    let page = format!("http://{}/", agent.web);
    b.c().goto(&page).await.unwrap();
    b.visible("#password").await;
    b.assert_no_horizontal_overflow("log-in").await;
    b.assert_accessible("log-in").await;
    b.screenshot(&format!("agent-{tag}-login")).await;
    b.type_into("#password", PASSWORD).await;
    b.click("#login-button").await;
    b.visible("#request-form").await;
    b.wait_text("#site-name", "Bakery Schmidt").await;
    b.assert_no_horizontal_overflow("form").await;
    b.assert_accessible("form").await;

    // A missing name: the error next to the field, which gets the focus;
    // typing clears it.
    b.click("#submit-request").await;
    b.wait_text("#err-requester_name", "Please enter your name")
        .await;
    assert_eq!(b.focused().await, "requester_name");
    let invalid = b
        .c()
        .execute(
            "return document.getElementById('requester_name').getAttribute('aria-invalid');",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(invalid, serde_json::json!("true"));
    b.assert_accessible("field error").await;
    b.screenshot(&format!("agent-{tag}-field-error")).await;
    b.type_into("#requester_name", "Anna Schmidt").await;
    assert!(
        !b.c()
            .find(Locator::Id("err-requester_name"))
            .await
            .unwrap()
            .is_displayed()
            .await
            .unwrap(),
        "the error stayed after the fix"
    );

    // An address outside the LAN: refused in plain words, next to the field.
    b.type_into("#phone", "+49 30 1234 567").await;
    b.type_into("#other_terminals", "8.8.8.8").await;
    b.click("#submit-request").await;
    let err = b.wait_text("#err-terminals", "8.8.8.8").await;
    assert!(!err.starts_with("terminals:"), "a raw message: {err}");
    assert_eq!(b.focused().await, "other_terminals");
    b.screenshot(&format!("agent-{tag}-refused-address")).await;

    // A request: the table fits the phone.
    b.type_into("#other_terminals", "").await;
    b.click("#terminal-pc-1").await;
    b.click("#submit-request").await;
    b.wait_text("td.nat-address", "10.64.").await;
    b.wait_text("tr[data-terminal='pc-1'] td.active", "Ready here")
        .await;
    b.assert_no_horizontal_overflow("request").await;
    b.assert_accessible("request").await;
    b.screenshot(&format!("agent-{tag}-requested")).await;

    // The router stops answering: a warning, the buttons disabled.
    agent.stop(false);
    b.wait_text("#agent-down", "does not answer").await;
    assert!(
        !b.visible(".end-access").await.is_enabled().await.unwrap(),
        "End access stays enabled while the router does not answer"
    );
    b.assert_no_horizontal_overflow("router down").await;
    b.screenshot(&format!("agent-{tag}-router-down")).await;
    // Back after its restart: the session is gone, and the page says why.
    agent.start().await;
    b.wait_text("#login-reason", "the router restarted").await;
    b.assert_accessible("logged out").await;
    b.screenshot(&format!("agent-{tag}-logged-out")).await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_customer_page_at_1366() {
    if !require_browser() {
        return;
    }
    customer_page_at(1366, 900, "1366").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_customer_page_on_a_phone() {
    if !require_browser() {
        return;
    }
    customer_page_at(390, 844, "phone").await;
}

/// A technician at the console of `center`, through its API (session
/// cookie and CSRF token, as the console sends them).
struct Tech {
    http: reqwest::Client,
    base: String,
    cookie: String,
    csrf: String,
}

impl Tech {
    /// Creates the technician `alice` and signs in.
    async fn sign_in(center: &Center) -> Self {
        // Creates alice (setting her password ends her other sessions:
        // called once, before this session is opened).
        let _ = center.technician_requests().await;
        let http = reqwest::Client::new();
        let r = http
            .post(format!("{}{}", center.base, paths::LOGIN))
            .json(&Login {
                name: "alice".into(),
                password: "tech password".into(),
            })
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        let cookie = r.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned();
        let login: LoginResponse = r.json().await.unwrap();
        Self {
            http,
            base: center.base.clone(),
            cookie,
            csrf: login.csrf_token,
        }
    }

    /// Every request, as the console lists them.
    async fn requests(&self) -> Vec<MaintenanceRequestView> {
        self.http
            .get(format!("{}{}", self.base, paths::REQUESTS))
            .header("cookie", &self.cookie)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn act(&self, path: &str, id: RequestId) -> MaintenanceRequestView {
        let r = self
            .http
            .post(format!(
                "{}{}",
                self.base,
                path.replace("{id}", &id.to_string())
            ))
            .header("cookie", &self.cookie)
            .header("x-csrf-token", &self.csrf)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.json().await.unwrap()
    }
}

/// A request for `pc-1` sent to the server with the site's credential, not
/// from the page (as another tool holding the credential could): the
/// router has no consent for it.
async fn foreign_request(center: &Center, agent: &Agent) -> MaintenanceRequestView {
    let identity: Value =
        serde_json::from_str(&std::fs::read_to_string(agent.identity_path()).unwrap()).unwrap();
    let r = reqwest::Client::new()
        .post(format!("{}{}", center.base, paths::AGENT_REQUESTS))
        .bearer_auth(identity["credential"].as_str().unwrap())
        .json(&NewMaintenanceRequest {
            requester_name: "someone else".into(),
            level: Level::General,
            urgency: Urgency::Normal,
            phone: "+49 30 999".into(),
            content: "not asked for on the page".into(),
            terminals: vec![TerminalName::new("pc-1").unwrap()],
        })
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    r.json().await.unwrap()
}

/// HH:MM of `ms` in the browser's time zone.
async fn hh_mm(b: &Browser, ms: u64) -> String {
    let offset_min = b
        .c()
        .execute(
            "return new Date(arguments[0]).getTimezoneOffset();",
            vec![serde_json::json!(ms)],
        )
        .await
        .unwrap()
        .as_i64()
        .unwrap();
    let local = i64::try_from(ms / 1000).unwrap() - offset_min * 60;
    let min_of_day = local.rem_euclid(86_400) / 60;
    format!("{:02}:{:02}", min_of_day / 60, min_of_day % 60)
}

/// Who works and since when, a terminal the router refused (with its
/// reason), and notices when the center declines or the technician ends.
async fn customer_sees_the_work(width: u32, height: u32, tag: &str) {
    let mut center = Center::start(3600).await;
    let (port, _pc) = pc().await;
    let mut agent = enrolled(&mut center, port).await;
    agent.start().await;
    let tech = Tech::sign_in(&center).await;
    let b = Browser::start(width, height).await;
    b.c().goto(&format!("http://{}/", agent.web)).await.unwrap();
    b.type_into("#password", PASSWORD).await;
    b.click("#login-button").await;
    b.visible("#request-form").await;

    // A request this page did not make: the router refuses its terminal,
    // and the page says so and why, instead of "being set up" for ever.
    let foreign = foreign_request(&center, &agent).await;
    let row = format!(
        "div.request[data-request-id='{}'] tr[data-terminal='pc-1'] td.active",
        foreign.id
    );
    let why = b.wait_text(&row, "Not opened").await;
    assert!(why.contains("not made on this page"), "{why}");
    let state = b
        .c()
        .execute(
            "return document.querySelector(arguments[0]).dataset.state;",
            vec![serde_json::json!(row)],
        )
        .await
        .unwrap();
    assert_eq!(state, serde_json::json!("refused"));
    b.assert_no_horizontal_overflow("refused terminal").await;
    b.assert_accessible("refused terminal").await;
    b.screenshot(&format!("agent-{tag}-refused-terminal")).await;
    // The page's API carries the state and the reason per terminal.
    let (code, overview) = agent.api(reqwest::Method::GET, "/api/overview", None).await;
    assert_eq!(code, 200);
    let local = &overview["requests"][0]["local"][0];
    assert_eq!(local["state"], "refused", "{overview}");
    assert!(
        local["reason"]
            .as_str()
            .unwrap()
            .contains("not made on this page")
    );

    // The center declines it: a notice, not just a move to the history.
    tech.act(paths::REQUEST_END, foreign.id).await;
    b.wait_text("#notice", "declined by the maintenance center")
        .await;
    b.wait_text("#history", &foreign.acceptance_number).await;

    // A request from the page; a technician starts it.
    b.type_into("#requester_name", "Anna Schmidt").await;
    b.type_into("#phone", "+49 30 1234 567").await;
    b.type_into("#content", "The till does not print receipts.")
        .await;
    b.click("#terminal-pc-1").await;
    b.click("#submit-request").await;
    b.wait_text("tr[data-terminal='pc-1'] td.active", "Ready here")
        .await;
    let mine = tech
        .requests()
        .await
        .into_iter()
        .find(|r| r.state == RequestState::Waiting)
        .unwrap();
    let started = tech.act(paths::REQUEST_START, mine.id).await;
    assert_eq!(started.technician.as_deref(), Some("alice"));
    let since = hh_mm(&b, started.started_at.unwrap().0).await;
    let working = b.wait_text(".working", "alice is working since").await;
    assert!(working.contains(&format!("since {since}")), "{working}");
    b.assert_no_horizontal_overflow("working").await;
    b.assert_accessible("working").await;
    b.screenshot(&format!("agent-{tag}-working")).await;

    // The technician ends the work: the page says so.
    let ended = tech.act(paths::REQUEST_END, mine.id).await;
    let at = hh_mm(&b, ended.ended_at.unwrap().0).await;
    let notice = b
        .wait_text(
            "#notice",
            &format!(
                "alice finished the work on request {}",
                mine.acceptance_number
            ),
        )
        .await;
    assert!(notice.contains(&format!("at {at}")), "{notice}");
    b.wait_text("#history", "Finished by the technician").await;
    b.assert_no_horizontal_overflow("ended by the technician")
        .await;
    b.assert_accessible("ended by the technician").await;
    b.screenshot(&format!("agent-{tag}-ended-by-technician"))
        .await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_customer_sees_the_work_at_1366() {
    if !require_browser() {
        return;
    }
    customer_sees_the_work(1366, 900, "1366").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_customer_sees_the_work_on_a_phone() {
    if !require_browser() {
        return;
    }
    customer_sees_the_work(390, 844, "phone").await;
}
