//! The customer's page in headless Chromium (Debian's chromium and
//! chromium-driver), driven over WebDriver by fantoccini, against the real
//! maintenance server: a wrong password is refused; log in, fill in the form,
//! press the button, see the acceptance number and the NAT address; press
//! "End access now" and see access end (on the page, in the agent, in the
//! technician's view).
//!
//! Set `VPNNAT_SCREENSHOT_DIR` to keep screenshots of the page.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod support;

use std::time::{Duration, Instant};

use fantoccini::Locator;
use support::{Center, PASSWORD, enrolled, pc};
use vpnnat::messages::RequestState;
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
    b.visible("#login-button").await.click().await.unwrap();
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
    b.visible("#login-button").await.click().await.unwrap();
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
    b.visible("#terminal-pc-1").await.click().await.unwrap();
    b.visible("#submit-request").await.click().await.unwrap();

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
    b.wait_text("tr[data-terminal='pc-1'] td.active", "yes")
        .await;
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
    b.visible(".end-access").await.click().await.unwrap();
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
