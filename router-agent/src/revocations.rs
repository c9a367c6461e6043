//! Telling the server about "end access now" until it confirms. The
//! revocation is in force on this router from the moment the customer
//! pressed the button (the data plane removed the mappings and refuses them
//! from then on, also after a restart: [`crate::consent`]); this task makes
//! the server close the request too, so that the technician's console shows
//! it ended. It retries on network errors and on the server's own errors
//! (5xx, 429, a refused credential an operator may fix) with backoff, and
//! stops only when the server confirms or answers that the request is not
//! open any more (a definitive 4xx such as 404 or 409).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use vpnnat::backoff::Backoff;
use vpnnat::messages::{MaintenanceRequestView, RequestId};

use crate::app::App;
use crate::client::{CallError, ServerClient};

/// How a call to revoke went.
#[derive(Debug)]
pub enum Outcome {
    /// The server closed the request (its view).
    Confirmed(Box<MaintenanceRequestView>),
    /// The server will never close it (it is closed or unknown there): done.
    Refused(CallError),
    /// Try again later.
    Later(CallError),
}

/// Whether the server's refusal is final: a 4xx other than the ones a
/// retry can get past (a rate limit, a timeout, a credential refused for
/// now).
pub fn definitive(e: &CallError) -> bool {
    e.status()
        .is_some_and(|s| s.is_client_error() && ![401, 403, 408, 425, 429].contains(&s.as_u16()))
}

/// Asks the server once; a confirmation (or a definitive refusal) is recorded.
pub async fn tell(app: &App, server: &ServerClient, id: RequestId) -> Outcome {
    let outcome = match server.revoke(id).await {
        Ok(view) => Outcome::Confirmed(Box::new(view)),
        Err(e) if definitive(&e) => Outcome::Refused(e),
        Err(e) => Outcome::Later(e),
    };
    match &outcome {
        Outcome::Confirmed(_) => {
            tracing::info!(request.id = %id, "revocation confirmed by the server")
        }
        Outcome::Refused(e) => {
            tracing::warn!(request.id = %id, error = %e, "the server does not revoke this request (not open there)")
        }
        Outcome::Later(e) => {
            tracing::warn!(request.id = %id, error = %e, "revocation not delivered; retrying")
        }
    }
    if !matches!(outcome, Outcome::Later(_))
        && let Err(e) = app.consent.confirm_revoked(id)
    {
        tracing::error!(error = %format!("{e:#}"), "revocation confirmed but not recorded");
    }
    outcome
}

/// Runs until `shutdown` turns true: delivers every pending revocation
/// (those of earlier runs too), woken by [`App::revocations`].
pub async fn run(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let Some(server) = app.server.clone() else {
        return;
    };
    let mut backoff = Backoff::new(
        Duration::from_millis(500),
        Duration::from_secs(30),
        app.site_id.0 ^ 0x7e70,
    );
    loop {
        let mut failed = false;
        for id in app.consent.pending_revocations() {
            if let Outcome::Later(_) = tell(&app, &server, id).await {
                failed = true;
                break;
            }
        }
        let wait = if failed {
            backoff.next_delay()
        } else {
            backoff.reset();
            Duration::from_secs(3600)
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = app.revocations.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vpnnat::messages::ApiError;

    fn api(status: u16) -> CallError {
        CallError::Api {
            status: reqwest::StatusCode::from_u16(status).expect("a status"),
            body: ApiError {
                error: "x".into(),
                message: "x".into(),
                field: None,
            },
        }
    }

    #[test]
    fn security_only_a_final_refusal_stops_the_retries() {
        // Closed or unknown there: nothing left to tell.
        for s in [400, 404, 409, 410, 422] {
            assert!(definitive(&api(s)), "{s}");
        }
        // The server's trouble, a rate limit, a credential being fixed: retry.
        for s in [401, 403, 408, 429, 500, 502, 503, 504] {
            assert!(!definitive(&api(s)), "{s}");
        }
    }
}
