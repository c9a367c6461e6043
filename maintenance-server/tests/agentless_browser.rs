//! The console's view of a site without an agent, in headless Chromium
//! (Debian's chromium and chromium-driver, driven by fantoccini): the
//! technician opens a request on the customer's behalf from the "Sites
//! without agent" tab (a wrong LAN address is refused with the server's
//! message, shown in the form), then reads the router configuration with
//! its QR code and the NAT rule for the new request. axe-core finds no
//! serious or critical violation in either dialog.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::json;
use vpnnat::messages::*;
use vpnnat_test_support::browser::{Browser, require_browser};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agentless_console_opens_a_request_and_shows_the_router_configuration() {
    if !require_browser() {
        return;
    }
    let db = TestDb::new(Backend::Sqlite);
    let server = TestServer::start(db.settings()).await;
    let op = server.operator();
    let created: GatewayCreated = op
        .post(paths::GATEWAYS, &NewGateway { name: "gw1".into() })
        .await
        .json();
    let gw = server.client(Some(&created.credential));
    let r = gw
        .post(
            paths::GATEWAY_REGISTER,
            &GatewayRegistration {
                endpoints: vec!["203.0.113.1:51820".parse().unwrap()],
                public_key: key(201),
                tunnel_kinds: vec![TunnelKind::Wireguard],
                max_tunnels: 10,
                software_version: "test".into(),
                technician_prefixes: vec!["172.16.0.0/24".parse().unwrap()],
                tls: None,
                next_public_key: None,
            },
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let site: SiteCreated = op
        .post(
            paths::SITES,
            &json!({ "name": "Bakery Schmidt", "agent": false }),
        )
        .await
        .json();
    add_technician(&db, "alice", "correct horse").await;

    let b = Browser::start(1366, 900).await;
    b.c().goto(&server.base).await.unwrap();
    b.type_into("#login-name", "alice").await;
    b.type_into("#login-password", "correct horse").await;
    b.click("#login-submit").await;
    b.click("#tab-sites").await;
    b.wait_text("#sites tbody", "Bakery Schmidt").await;
    b.visible(&format!("button[data-site=\"{}\"]", site.site_id))
        .await
        .click()
        .await
        .unwrap();
    let form = "form.site-request";
    b.type_into(&format!("{form} input[name=\"requester\"]"), "Anna Schmidt")
        .await;
    b.select(&format!("{form} select[name=\"urgency\"]"), "high")
        .await;
    b.type_into(&format!("{form} input[name=\"phone\"]"), "+49 30 1234 567")
        .await;
    b.type_into(
        &format!("{form} textarea[name=\"content\"]"),
        "The till does not print.",
    )
    .await;
    b.type_into(&format!("{form} input[name=\"terminal-name\"]"), "till")
        .await;
    // A wrong address: the server's message, in the form.
    b.type_into(
        &format!("{form} input[name=\"terminal-address\"]"),
        "127.0.0.1",
    )
    .await;
    b.assert_accessible("the request form").await;
    b.screenshot("agentless-request-form").await;
    b.visible(&format!("{form} button[type=\"submit\"]"))
        .await
        .click()
        .await
        .unwrap();
    b.wait_text(&format!("{form} .error"), "not a LAN host's address")
        .await;
    b.type_into(
        &format!("{form} input[name=\"terminal-address\"]"),
        "192.168.1.10",
    )
    .await;
    b.visible(&format!("{form} button[type=\"submit\"]"))
        .await
        .click()
        .await
        .unwrap();
    let toast = b.wait_text("#toasts", "Opened").await;
    assert!(toast.contains("till = 10.64."), "{toast}");

    // The request is there, with the technician as who opened it.
    let tech = login(&server, "alice", "correct horse").await;
    let open: Vec<MaintenanceRequestView> = tech.get(paths::REQUESTS).await.json();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].site_id, site.site_id);
    assert_eq!(open[0].urgency, Urgency::High);
    let nat = open[0].terminals[0].nat_address.unwrap();

    // The router configuration: the wg-quick file with its QR code, and the
    // NAT rule of the new request.
    b.visible(&format!("button[data-site-config=\"{}\"]", site.site_id))
        .await
        .click()
        .await
        .unwrap();
    b.wait_text("#detail-body", "vpnnat-g1.conf").await;
    b.wait_text(
        "#detail-body",
        &format!("ip daddr {nat} dnat to 192.168.1.10"),
    )
    .await;
    let qr = b.visible("#detail-body svg.qr").await;
    assert!(qr.find(fantoccini::Locator::Css("path")).await.is_ok());
    b.assert_accessible("the router configuration").await;
    b.screenshot("agentless-router-configuration").await;
    b.close().await;
}
