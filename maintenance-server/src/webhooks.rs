//! Signed webhooks for the provider's ticketing system: a new request, a
//! failure report, a request nearing its expiry.
//!
//! Events are queued in the transaction that makes them happen
//! ([`crate::db::outbox`]); the worker here posts each to its receiver and
//! retries failures with exponential back-off (jittered, capped at
//! `retry_max_ms`) until `max_attempts`, then gives it up (logged, counted).
//! Delivery is at least once: a receiver drops repeats by the
//! `Vpnnat-Event-Id` header.
//!
//! Every post is signed: `Vpnnat-Signature: t=UNIX_SECONDS,v1=HEX`, where
//! HEX is HMAC-SHA256 (RFC 2104) under the receiver's secret of
//! `UNIX_SECONDS "." BODY`. Binding the time into the signature lets a
//! receiver refuse replays of an old post (docs/OPERATIONS.md shows a check).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use hmac::{Hmac, Mac as _};
use rand::Rng as _;
use serde_json::json;
use sha2::Sha256;
use tokio::sync::watch;
use vpnnat::messages::{FailureView, MaintenanceRequestView};

use crate::db::outbox::{self, Due, Event, Route};
use crate::db::{DbError, OpError, Tx, now_ms};
use crate::notify::Topic;
use crate::settings::{Notifications, Settings};
use crate::state::AppState;

/// The event types, as `[[notifications.webhooks]] events` names them.
pub const EVENT_TYPES: [&str; 3] = [REQUEST_CREATED, FAILURE_REPORTED, REQUEST_EXPIRING];
/// A customer (or a technician on their behalf, or a failure report) opened a request.
pub const REQUEST_CREATED: &str = "request.created";
/// An agent reported a failure.
pub const FAILURE_REPORTED: &str = "failure.reported";
/// An open request reaches `expiry_warning_s` before its expiry.
pub const REQUEST_EXPIRING: &str = "request.expiring";

/// The signature header.
pub const SIGNATURE_HEADER: &str = "vpnnat-signature";
/// The event id header (the same for every attempt).
pub const EVENT_ID_HEADER: &str = "vpnnat-event-id";
/// The event type header.
pub const EVENT_TYPE_HEADER: &str = "vpnnat-event";

/// How many due deliveries one round of the worker takes.
const BATCH: i64 = 32;
/// How often the worker looks for due retries (new events wake it at once).
const POLL: Duration = Duration::from_secs(1);
/// Shortest accepted secret.
const MIN_SECRET_LEN: usize = 32;

/// Whether `url` may receive events: `https://`, or `http://` to a loopback
/// address only (a receiver on the same host, or behind a local proxy), since
/// the events carry customers' names and phone numbers.
///
/// # Errors
/// Why not, in a sentence.
pub fn check_url(url: &str) -> Result<(), String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("not a URL ({e})"))?;
    let Some(host) = u.host_str().filter(|h| !h.is_empty()) else {
        return Err("the URL names no host".into());
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback());
    match u.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err("plain http:// only to a loopback address; use https://".into()),
        s => Err(format!("scheme {s:?}: expected https://")),
    }
}

/// The signature header's value for `body` sent at `unix_s`.
pub fn sign(secret: &[u8], unix_s: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(unix_s.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={unix_s},v1={hex}")
}

/// The pause after failed attempt number `attempts` (1-based):
/// `initial · 2^(attempts-1)`, at most `max`, then between 80 % and 100 %
/// of that (`jitter` in 0..=1) so that deliveries that failed together
/// do not retry together.
pub fn backoff_ms(attempts: i64, initial: u64, max: u64, jitter: f64) -> u64 {
    let shift = u32::try_from(attempts.saturating_sub(1).clamp(0, 40)).unwrap_or(40);
    let base = initial.saturating_mul(1u64 << shift.min(40)).min(max);
    let factor = 0.8 + 0.2 * jitter.clamp(0.0, 1.0);
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let ms = (base as f64 * factor) as u64;
    ms.max(1)
}

fn event(event_type: &'static str, now: i64, data: serde_json::Value) -> Event {
    let mut id = [0u8; 16];
    rand::thread_rng().fill(&mut id);
    let id = format!(
        "evt_{}",
        id.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let body = json!({
        "id": id,
        "type": event_type,
        "created_at": now,
        "data": data,
    })
    .to_string();
    Event {
        id,
        event_type,
        body,
    }
}

/// Queues event `event_type` with `data` for every route that takes it
/// (nothing when no webhook is configured).
///
/// # Errors
/// Database failures.
pub async fn queue(
    tx: &mut Tx,
    routes: &[Route],
    event_type: &'static str,
    data: serde_json::Value,
    now: i64,
) -> Result<(), DbError> {
    if routes.is_empty() {
        return Ok(());
    }
    outbox::enqueue(tx, routes, &event(event_type, now, data), now).await
}

/// Queues `request.created` for `view`.
///
/// # Errors
/// Database failures.
pub async fn request_created(
    tx: &mut Tx,
    routes: &[Route],
    view: &MaintenanceRequestView,
    now: i64,
) -> Result<(), DbError> {
    queue(tx, routes, REQUEST_CREATED, json!({ "request": view }), now).await
}

/// Queues `failure.reported` for `view`.
///
/// # Errors
/// Database failures.
pub async fn failure_reported(
    tx: &mut Tx,
    routes: &[Route],
    view: &FailureView,
    now: i64,
) -> Result<(), DbError> {
    queue(
        tx,
        routes,
        FAILURE_REPORTED,
        json!({ "failure": view }),
        now,
    )
    .await
}

/// Queues `request.expiring` for `view`.
///
/// # Errors
/// Database failures.
pub async fn request_expiring(
    tx: &mut Tx,
    routes: &[Route],
    view: &MaintenanceRequestView,
    now: i64,
) -> Result<(), DbError> {
    queue(
        tx,
        routes,
        REQUEST_EXPIRING,
        json!({ "request": view }),
        now,
    )
    .await
}

/// The routes of `settings` (what [`crate::db::ops::Policy`] carries).
pub fn routes(settings: &Settings) -> Vec<Route> {
    settings
        .notifications
        .webhooks
        .iter()
        .map(|w| Route {
            name: w.name.clone(),
            events: w.events.clone(),
        })
        .collect()
}

/// What this replica's worker did since it started (`/metrics`).
#[derive(Debug, Default)]
pub struct Stats {
    /// Attempts the receiver accepted (2xx).
    pub delivered: AtomicU64,
    /// Attempts that failed (no answer, or not 2xx).
    pub failed: AtomicU64,
    /// Deliveries given up after `max_attempts`.
    pub given_up: AtomicU64,
}

struct Receiver {
    url: reqwest::Url,
    secret: Vec<u8>,
}

/// Posts the deliveries: the receivers with their secrets, and one HTTP client.
pub struct Sender {
    receivers: HashMap<String, Receiver>,
    client: reqwest::Client,
    cfg: Notifications,
}

impl Sender {
    /// Reads every receiver's secret file.
    ///
    /// # Errors
    /// One line naming the key and the file when a secret cannot be read
    /// or is too short.
    pub fn load(settings: &Settings) -> anyhow::Result<Self> {
        let cfg = settings.notifications.clone();
        let mut receivers = HashMap::new();
        for w in &cfg.webhooks {
            let path = &w.secret_file;
            let text = std::fs::read_to_string(path).with_context(|| {
                format!(
                    "notifications.webhooks.secret_file of {:?}: cannot read {}",
                    w.name,
                    path.display()
                )
            })?;
            let secret = text.trim();
            if secret.len() < MIN_SECRET_LEN {
                anyhow::bail!(
                    "notifications.webhooks.secret_file of {:?}: {} holds {} characters; at least {MIN_SECRET_LEN} are needed (e.g. `openssl rand -hex 32`)",
                    w.name,
                    path.display(),
                    secret.len()
                );
            }
            let url = reqwest::Url::parse(&w.url)
                .with_context(|| format!("notifications.webhooks.url of {:?}", w.name))?;
            receivers.insert(
                w.name.clone(),
                Receiver {
                    url,
                    secret: secret.as_bytes().to_vec(),
                },
            );
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .connect_timeout(Duration::from_millis(cfg.timeout_ms))
            // A receiver's redirect is not followed: the body would go
            // somewhere the operator did not configure.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!(
                "vpnnat-maintenance-server/",
                env!("CARGO_PKG_VERSION")
            ))
            .build()
            .context("the webhook HTTP client")?;
        Ok(Self {
            receivers,
            client,
            cfg,
        })
    }

    /// Whether any receiver is configured.
    pub fn is_empty(&self) -> bool {
        self.receivers.is_empty()
    }

    /// One attempt: `Ok` when the receiver answered 2xx.
    async fn post(&self, d: &Due) -> Result<(), String> {
        let Some(r) = self.receivers.get(&d.endpoint) else {
            return Err(format!(
                "no receiver {:?} is configured any more",
                d.endpoint
            ));
        };
        let unix_s = u64::try_from(now_ms() / 1000).unwrap_or(0);
        let signature = sign(&r.secret, unix_s, d.body.as_bytes());
        let resp = self
            .client
            .post(r.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature)
            .header(EVENT_ID_HEADER, &d.event_id)
            .header(EVENT_TYPE_HEADER, &d.event_type)
            .body(d.body.clone())
            .send()
            .await
            .map_err(|e| {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(": ");
                    msg.push_str(&s.to_string());
                    src = s.source();
                }
                msg
            })?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the receiver answered {status}"))
        }
    }
}

/// Delivers due webhook events until `shutdown` turns true. Woken at once
/// by a commit that queued deliveries (on any replica, through the
/// notifier); otherwise looks for due retries every second.
pub async fn run(state: AppState, sender: Sender, mut shutdown: watch::Receiver<bool>) {
    let mut wake = state.notifier.subscribe(Topic::Outbox);
    let keep_ms = i64::from(sender.cfg.keep_days) * 86_400_000;
    let mut last_purge = 0i64;
    loop {
        if let Err(e) = round(&state, &sender).await {
            tracing::warn!(error = %e, "webhook deliveries");
        }
        let now = now_ms();
        if now - last_purge > 3_600_000 {
            last_purge = now;
            let r = state
                .db
                .transaction(&state.notifier, async |tx| {
                    outbox::purge(tx, now - keep_ms)
                        .await
                        .map_err(OpError::from)
                })
                .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, "purging old webhook deliveries");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            r = wake.changed() => {
                if r.is_err() {
                    wake = state.notifier.subscribe(Topic::Outbox);
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Takes the due deliveries and makes one attempt at each (concurrently:
/// one slow receiver does not hold the others up).
async fn round(state: &AppState, sender: &Sender) -> Result<(), OpError> {
    loop {
        let now = now_ms();
        let due = {
            let mut conn = state.db.reader().acquire().await.map_err(DbError::from)?;
            outbox::due(&mut conn, now, BATCH).await?
        };
        if due.is_empty() {
            return Ok(());
        }
        let full = i64::try_from(due.len()).unwrap_or(0) == BATCH;
        // Long enough for the attempt and its record; a replica that dies
        // meanwhile leaves the delivery to whoever finds it due afterwards.
        let lease = now + i64::try_from(sender.cfg.timeout_ms).unwrap_or(10_000) + 30_000;
        let mut claimed = Vec::new();
        for d in due {
            let ok = state
                .db
                .transaction(&state.notifier, async |tx| {
                    outbox::claim(tx, &d, lease).await.map_err(OpError::from)
                })
                .await?;
            if ok {
                claimed.push(d);
            }
        }
        let attempts = claimed.iter().map(|d| attempt(state, sender, d));
        for r in futures_util::future::join_all(attempts).await {
            r?;
        }
        if !full {
            return Ok(());
        }
    }
}

async fn attempt(state: &AppState, sender: &Sender, d: &Due) -> Result<(), OpError> {
    let result = sender.post(d).await;
    let now = now_ms();
    let made = d.attempts + 1;
    let stats = &state.webhook_stats;
    match &result {
        Ok(()) => {
            stats.delivered.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                webhook = %d.endpoint, event.id = %d.event_id, event.kind = %d.event_type,
                attempts = made, "webhook delivered"
            );
        }
        Err(e) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            if made >= i64::from(sender.cfg.max_attempts) {
                stats.given_up.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    webhook = %d.endpoint, event.id = %d.event_id, event.kind = %d.event_type,
                    attempts = made, error = %e,
                    "webhook delivery given up (notifications.max_attempts)"
                );
            } else {
                tracing::warn!(
                    webhook = %d.endpoint, event.id = %d.event_id, event.kind = %d.event_type,
                    attempts = made, error = %e, "webhook delivery failed; will retry"
                );
            }
        }
    }
    let retry_at = (made < i64::from(sender.cfg.max_attempts)).then(|| {
        let pause = backoff_ms(
            made,
            sender.cfg.retry_initial_ms,
            sender.cfg.retry_max_ms,
            rand::thread_rng().r#gen::<f64>(),
        );
        now + i64::try_from(pause).unwrap_or(i64::MAX / 4)
    });
    state
        .db
        .transaction(&state.notifier, async |tx| {
            match &result {
                Ok(()) => outbox::delivered(tx, d.id, now).await,
                Err(e) => outbox::failed(tx, d.id, retry_at, e, now).await,
            }
            .map_err(OpError::from)
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_time_dot_body() {
        // The signed text is "TIME.BODY".
        let s = sign(b"Jefe", 0, b"what do ya want for nothing?");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"0.what do ya want for nothing?");
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(s, format!("t=0,v1={hex}"));
        // The primitive itself against RFC 4231 §4.3 (test case 2).
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_ne!(sign(b"Jefe", 1, b"x"), sign(b"Jefe", 2, b"x"));
        assert_ne!(sign(b"Jefe", 1, b"x"), sign(b"Jeff", 1, b"x"));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_bounded_jitter() {
        assert_eq!(backoff_ms(1, 5_000, 3_600_000, 1.0), 5_000);
        assert_eq!(backoff_ms(2, 5_000, 3_600_000, 1.0), 10_000);
        assert_eq!(backoff_ms(3, 5_000, 3_600_000, 1.0), 20_000);
        assert_eq!(backoff_ms(30, 5_000, 3_600_000, 1.0), 3_600_000);
        assert_eq!(backoff_ms(i64::MAX, 5_000, 3_600_000, 1.0), 3_600_000);
        assert_eq!(backoff_ms(0, 5_000, 3_600_000, 1.0), 5_000);
        assert_eq!(backoff_ms(1, 5_000, 3_600_000, 0.0), 4_000);
        for j in [0.0, 0.3, 0.99, 1.0] {
            let ms = backoff_ms(4, 1_000, 60_000, j);
            assert!((6_400..=8_000).contains(&ms), "{ms}");
        }
    }

    #[test]
    fn receivers_must_use_https_except_on_loopback() {
        assert!(check_url("https://tickets.example.net/hook").is_ok());
        assert!(check_url("http://127.0.0.1:9000/hook").is_ok());
        assert!(check_url("http://[::1]:9000/hook").is_ok());
        assert!(check_url("http://localhost/hook").is_ok());
        assert!(check_url("http://tickets.example.net/hook").is_err());
        assert!(check_url("http://10.1.2.3/hook").is_err());
        assert!(check_url("ftp://tickets.example.net/").is_err());
        assert!(check_url("tickets.example.net").is_err());
        assert!(check_url("").is_err());
    }
}
