//! The page's list of discovered computers in headless Chromium, against the
//! real agent and the real maintenance server: the agent learns two hosts
//! from a dnsmasq leases file (`discovery.leases_file`, on loopback
//! addresses the test's `lan.allowed_prefixes` admit); the customer sees
//! them with address, MAC and last seen, names one, ticks the other and
//! opens a request. The server gets the host's name, never its MAC or
//! address.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod support;

use std::time::{Duration, Instant};

use fantoccini::Locator;
use support::{Center, PASSWORD, enrolled, pc};
use vpnnat::messages::RequestState;
use vpnnat_test_support::browser::{Browser, require_browser};

const TILL_MAC: &str = "02:00:00:00:00:02";
const KITCHEN_MAC: &str = "02:00:00:00:00:03";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_browser_customer_ticks_a_discovered_pc_and_asks_for_help() {
    if !require_browser() {
        return;
    }
    let mut center = Center::start(3600).await;
    let (port, _pc) = pc().await;
    let mut agent = enrolled(&mut center, port).await;
    let leases = agent.dir.path().join("dnsmasq.leases");
    std::fs::write(
        &leases,
        format!(
            "0 {TILL_MAC} 127.0.0.2 till-2 01:{TILL_MAC}\n\
             0 {KITCHEN_MAC} 127.0.0.3 * *\n\
             this line is no lease\n"
        ),
    )
    .unwrap();
    let mut config = std::fs::read_to_string(&agent.config).unwrap();
    config.push_str(&format!(
        "[discovery]\nrefresh_s = 1\nmdns = false\nnetbios = false\nleases_file = \"{}\"\n",
        leases.display()
    ));
    std::fs::write(&agent.config, config).unwrap();
    agent.start().await;

    let b = Browser::start(1100, 1400).await;
    b.c().goto(&format!("http://{}/", agent.web)).await.unwrap();
    b.type_into("#password", PASSWORD).await;
    b.click("#login-button").await;
    b.visible("#request-form").await;

    // The list: name, address, MAC, last seen.
    let till = b
        .wait_text("#discovered-list [data-mac='02:00:00:00:00:02']", "till-2")
        .await;
    assert!(
        till.contains("127.0.0.2") && till.contains(TILL_MAC),
        "{till}"
    );
    assert!(till.contains("seen"), "{till}");
    let kitchen = b
        .wait_text(
            "#discovered-list [data-mac='02:00:00:00:00:03']",
            "Unnamed computer",
        )
        .await;
    assert!(kitchen.contains("127.0.0.3"), "{kitchen}");
    b.screenshot("discovery-1-list").await;

    // The customer names the second one.
    b.visible("[data-mac='02:00:00:00:00:03'] .rename")
        .await
        .click()
        .await
        .unwrap();
    b.type_into("[data-mac='02:00:00:00:00:03'] .rename-input", "Kitchen PC")
        .await;
    b.visible("[data-mac='02:00:00:00:00:03'] .save-name")
        .await
        .click()
        .await
        .unwrap();
    b.wait_text("[data-mac='02:00:00:00:00:03'] .host-name", "Kitchen PC")
        .await;
    let (code, list) = agent
        .api(reqwest::Method::GET, "/api/discovery", None)
        .await;
    assert_eq!(code, 200);
    let k = list["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["mac"] == KITCHEN_MAC)
        .cloned()
        .unwrap();
    assert_eq!(k["custom_name"], "Kitchen PC", "{list}");

    // Tick till-2 and ask for help.
    b.type_into("#requester_name", "Anna Schmidt").await;
    b.type_into("#phone", "+49 30 1234 567").await;
    b.type_into("#content", "The till does not print receipts.")
        .await;
    b.click("#host-020000000002").await;
    b.click("#submit-request").await;
    // The pre-request check may find the loopback host silent; send anyway.
    let deadline = Instant::now() + Duration::from_secs(20);
    let number = loop {
        if let Ok(e) = b.c().find(Locator::Css("#send-anyway")).await
            && e.is_displayed().await.unwrap_or(false)
        {
            e.click().await.unwrap();
        }
        let text = match b.c().find(Locator::Css(".acceptance-number")).await {
            Ok(e) => e.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if !text.trim().is_empty() {
            break text.trim().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no acceptance number appeared:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    b.wait_text("tr[data-terminal='till-2']", "till-2").await;
    b.screenshot("discovery-2-requested").await;

    // The server got the name the list showed, and nothing else of the host.
    let seen = center.technician_requests().await;
    let r = seen
        .iter()
        .find(|r| r.acceptance_number == number)
        .unwrap_or_else(|| panic!("{number} not in the console: {seen:?}"));
    assert_eq!(r.state, RequestState::Waiting);
    assert_eq!(r.terminals.len(), 1);
    assert_eq!(r.terminals[0].name.as_str(), "till-2");
    let text = format!("{r:?}");
    assert!(
        !text.contains(TILL_MAC) && !text.contains("127.0.0.2"),
        "{text}"
    );
    // The page's list now shows the binding.
    let (_, list) = agent
        .api(reqwest::Method::GET, "/api/discovery", None)
        .await;
    let t = list["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["mac"] == TILL_MAC)
        .cloned()
        .unwrap();
    assert_eq!(t["terminal"], "till-2", "{list}");
    b.assert_accessible("discovered list").await;
    b.close().await;

    // On a phone: the list fits without sideways scrolling.
    let phone = Browser::start(390, 844).await;
    phone
        .c()
        .goto(&format!("http://{}/", agent.web))
        .await
        .unwrap();
    phone.type_into("#password", PASSWORD).await;
    phone.click("#login-button").await;
    phone
        .wait_text(
            "#discovered-list [data-mac='02:00:00:00:00:03']",
            "Kitchen PC",
        )
        .await;
    phone.assert_no_horizontal_overflow("discovered list").await;
    phone.assert_accessible("discovered list on a phone").await;
    phone.screenshot("discovery-3-phone").await;
    phone.close().await;
}
