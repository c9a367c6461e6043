//! Failure reports (the patent's failure → request flow): the LAN link going
//! down, or a watched terminal failing its health check a configured number
//! of times in a row, is reported to the server with a failure code (and, when
//! configured, asks it to open a maintenance request). Each failure is
//! reported once per occurrence; undelivered reports are retried.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use vpnnat::backoff::Backoff;
use vpnnat::messages::{FailureCode, FailureReport, TerminalName};

use crate::app::App;
use crate::lan;
use crate::probe;

/// How often the link is looked at.
const LINK_PERIOD: Duration = Duration::from_secs(1);
/// Reports waiting for delivery at most.
const MAX_QUEUED: usize = 32;

/// Runs until `shutdown` turns true.
pub async fn run(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let settings = app.settings.failures.clone();
    let lan_if = app.settings.lan.interface.clone();
    let watched: Vec<_> = app
        .settings
        .terminals
        .iter()
        .filter(|t| t.watch)
        .cloned()
        .collect();
    if app.server.is_none() || (!settings.link_watch && watched.is_empty()) {
        return;
    }
    let interval = Duration::from_secs(settings.check_interval_s);
    let mut queue: VecDeque<FailureReport> = VecDeque::new();
    let mut link_up = if lan_if.is_empty() {
        None
    } else {
        lan::carrier(&lan_if)
    };
    let mut failures: BTreeMap<TerminalName, u32> = BTreeMap::new();
    let mut reported: BTreeMap<TerminalName, bool> = BTreeMap::new();
    let mut next_check = tokio::time::Instant::now() + interval;
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30), 7);
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep(LINK_PERIOD) => {}
            _ = shutdown.changed() => return,
        }
        if settings.link_watch && !lan_if.is_empty() {
            let now_up = lan::carrier(&lan_if).unwrap_or(false);
            if link_up == Some(true) && !now_up {
                tracing::warn!(interface = %lan_if, "LAN link down");
                push(
                    &mut queue,
                    FailureReport {
                        code: FailureCode::LanLinkDown,
                        detail: format!("{lan_if}: link down (no carrier)"),
                        terminal: None,
                        open_request: settings.open_request,
                    },
                );
            } else if link_up == Some(false) && now_up {
                tracing::info!(interface = %lan_if, "LAN link up again");
            }
            link_up = Some(now_up);
        }
        if tokio::time::Instant::now() >= next_check {
            next_check = tokio::time::Instant::now() + interval;
            for t in &watched {
                let addr = match app.names.resolve(&t.name).await {
                    Ok(addr) => addr,
                    Err(e) => {
                        tracing::debug!(terminal = %t.name, error = %e, "watched terminal not checked");
                        continue;
                    }
                };
                let ok = probe::answers(addr, t.check, Duration::from_secs(2)).await;
                tracing::debug!(terminal = %t.name, %addr, ok, "health check");
                let n = failures.entry(t.name.clone()).or_default();
                if ok {
                    if reported.remove(&t.name).is_some() {
                        tracing::info!(terminal = %t.name, "terminal answers again");
                    }
                    *n = 0;
                    continue;
                }
                *n += 1;
                if *n >= settings.threshold && !reported.contains_key(&t.name) {
                    tracing::warn!(terminal = %t.name, failures = *n, "terminal unreachable");
                    reported.insert(t.name.clone(), true);
                    push(
                        &mut queue,
                        FailureReport {
                            code: FailureCode::TerminalUnreachable,
                            detail: format!(
                                "{} did not answer {} health checks in a row",
                                t.name, n
                            ),
                            terminal: Some(t.name.clone()),
                            open_request: settings.open_request,
                        },
                    );
                }
            }
        }
        if retry_at.is_some_and(|at| tokio::time::Instant::now() < at) {
            continue;
        }
        while let Some(report) = queue.front() {
            match deliver(&app, report).await {
                true => {
                    queue.pop_front();
                    backoff.reset();
                    retry_at = None;
                }
                false => {
                    retry_at = Some(tokio::time::Instant::now() + backoff.next_delay());
                    break;
                }
            }
        }
    }
}

fn push(queue: &mut VecDeque<FailureReport>, r: FailureReport) {
    if queue.len() >= MAX_QUEUED {
        queue.pop_front();
    }
    queue.push_back(r);
}

async fn deliver(app: &App, report: &FailureReport) -> bool {
    let Some(server) = &app.server else {
        return true;
    };
    // A request opened for this failure is access to the LAN: only where the
    // customer allowed that on the page.
    let allowed = app.consent.failure_requests();
    let mut report = report.clone();
    report.open_request &= allowed;
    // A report that opens a request holds the gate until the request's id
    // is recorded, so that the document listing it is applied after; any
    // other report need not hold up the control plane.
    let _creating = if report.open_request {
        Some(app.consent_gate.lock().await)
    } else {
        None
    };
    match server.report_failure(&report).await {
        Ok(accepted) => {
            if let Some(r) = &accepted.request {
                if allowed {
                    if let Err(e) = app.consent.record_created(r.id) {
                        tracing::error!(error = %format!("{e:#}"), "request of a failure report not recorded");
                    }
                    let _ = app.dataplane.consent_to(r.id).await;
                } else {
                    tracing::warn!(
                        request.id = %r.id,
                        "the server opened a request for a failure report; not installed \
                         (the customer has not allowed failure reports to open access)"
                    );
                }
            }
            tracing::info!(
                failure.id = accepted.failure_id,
                code = ?report.code,
                request = ?accepted.request.as_ref().map(|r| &r.acceptance_number),
                "failure reported"
            );
            app.update_failures(|f| f.reported += 1);
            true
        }
        Err(e) if matches!(e, crate::client::CallError::Api { status, .. } if status.is_client_error()) =>
        {
            // The server will never take this one (e.g. a field it refuses).
            tracing::warn!(error = %e, "failure report refused");
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "failure report not delivered; will retry");
            app.update_failures(|f| f.undelivered += 1);
            false
        }
    }
}
