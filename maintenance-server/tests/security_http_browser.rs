//! The console in headless Chromium with more closed requests than the
//! live feed carries: the old open request stays on screen, and the older
//! closed ones load page by page with "Older closed requests".
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use fantoccini::Locator;
use serde_json::Value;
use vpnnat::messages::*;
use vpnnat_test_support::browser::{Browser, require_browser};

/// Polls the number of request rows until it is `want` (or fails after a minute).
async fn wait_rows(b: &Browser, want: u64) {
    let mut last = Value::Null;
    for _ in 0..240 {
        last = b
            .c()
            .execute(
                "return document.querySelectorAll('#requests tbody tr').length;",
                vec![],
            )
            .await
            .unwrap();
        if last.as_u64() == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("{last} request rows, want {want}");
}

async fn more_hidden(b: &Browser) -> bool {
    b.c()
        .execute(
            "return document.getElementById('requests-more').hidden;",
            vec![],
        )
        .await
        .unwrap()
        .as_bool()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_http_console_shows_old_open_requests_and_pages_closed_ones() {
    if !require_browser() {
        return;
    }
    let db = TestDb::new(Backend::Sqlite);
    let server = TestServer::start(db.settings()).await;
    let gw = add_gateway(&server, "gw1", 10, 1).await;
    gw.api.post(paths::GATEWAY_HEARTBEAT, &heartbeat(10)).await;
    let site = add_site(&server, "Bakery Schmidt", 1).await;
    let open: MaintenanceRequestView = site
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
        .await
        .json();
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&db.url).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    for i in 0..330_i64 {
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
    add_technician(&db, "alice", "correct horse").await;

    let b = Browser::start(1500, 900).await;
    b.c().goto(&server.base).await.unwrap();
    b.type_into("#login-name", "alice").await;
    b.type_into("#login-password", "correct horse").await;
    b.c()
        .find(Locator::Id("login-submit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_text("#live-text", "live").await;
    // The default view (open requests) shows the oldest request.
    b.wait_for(&format!("#requests tbody tr[data-id=\"{}\"]", open.id))
        .await;
    wait_rows(&b, 1).await;
    b.select("#filter-state", "").await;
    wait_rows(&b, 101).await;
    for want in [201, 301, 331] {
        assert!(!more_hidden(&b).await, "no more button before {want}");
        b.c()
            .find(Locator::Id("requests-more"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        wait_rows(&b, want).await;
    }
    assert!(more_hidden(&b).await, "everything is loaded");
    b.screenshot("console-older-closed").await;
    b.close().await;
    server.stop().await;
}
