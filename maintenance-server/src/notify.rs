//! Change notifications for the long-polls.
//!
//! Inside one process a committed change wakes the waiters of its topic
//! directly (a `watch` channel per site, per gateway and for the console).
//! Between replicas on one PostgreSQL, the committing transaction sends
//! `NOTIFY vpnnat_changes, 's:3,g:1,c'` and every replica's listener wakes
//! its own waiters. Waiters always re-read the database after a wake-up, so a
//! spurious or duplicate wake-up costs one query and a lost one at most the
//! rest of the client's `wait_ms`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use vpnnat::messages::{GatewayId, SiteId};

/// The PostgreSQL channel.
pub const CHANNEL: &str = "vpnnat_changes";

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    /// A site's desired state.
    Site(SiteId),
    /// A gateway's desired state.
    Gateway(GatewayId),
    /// The technician console's feed.
    Console,
    /// New webhook deliveries are waiting (the delivery workers).
    Outbox,
}

impl Topic {
    /// `s:ID`, `g:ID`, `c` or `o`.
    pub fn encode(&self) -> String {
        match self {
            Self::Site(s) => format!("s:{s}"),
            Self::Gateway(g) => format!("g:{g}"),
            Self::Console => "c".to_owned(),
            Self::Outbox => "o".to_owned(),
        }
    }

    /// The inverse of [`Topic::encode`].
    pub fn decode(s: &str) -> Option<Self> {
        match s.split_once(':') {
            Some(("s", id)) => id.parse().ok().map(Self::Site),
            Some(("g", id)) => id.parse().ok().map(Self::Gateway),
            None if s == "c" => Some(Self::Console),
            None if s == "o" => Some(Self::Outbox),
            _ => None,
        }
    }
}

/// Wakes long-polls.
#[derive(Debug, Default)]
pub struct Notifier {
    topics: Mutex<HashMap<Topic, watch::Sender<u64>>>,
    waiting: AtomicI64,
    console_pending: AtomicBool,
}

impl Notifier {
    /// Subscribes to `topic`; the receiver sees every wake-up after this call.
    pub fn subscribe(&self, topic: Topic) -> watch::Receiver<u64> {
        let mut map = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(topic)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Wakes every subscriber of `topic`.
    pub fn wake(&self, topic: Topic) {
        let mut map = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = map.get(&topic) {
            if tx.receiver_count() == 0 {
                map.remove(&topic);
            } else {
                tx.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }

    /// Wakes everyone (after the PostgreSQL listener lost its connection).
    pub fn wake_all(&self) {
        let map = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        for tx in map.values() {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Notes a console change that need not reach the consoles at once
    /// (a failure report): the background task announces all such changes
    /// together at its next tick, so a burst of reports wakes every console
    /// once, not once per report.
    pub fn defer_console(&self) {
        self.console_pending.store(true, Ordering::Relaxed);
    }

    /// Whether a deferred console change waits to be announced (and clears it).
    pub fn take_console_pending(&self) -> bool {
        self.console_pending.swap(false, Ordering::Relaxed)
    }

    /// Long-polls waiting now.
    pub fn waiting(&self) -> i64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Counts a waiting long-poll until the guard drops.
    pub fn waiting_guard(&self) -> WaitingGuard<'_> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        WaitingGuard(self)
    }
}

/// See [`Notifier::waiting_guard`].
pub struct WaitingGuard<'a>(&'a Notifier);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Listens on PostgreSQL for other replicas' changes until `shutdown`.
pub async fn listen_postgres(
    url: String,
    notifier: std::sync::Arc<Notifier>,
    mut shutdown: watch::Receiver<bool>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    loop {
        let listener = async {
            let mut l = sqlx::postgres::PgListener::connect(&url).await?;
            l.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            l = listener => l,
            _ = shutdown.changed() => return,
        };
        match &mut listener {
            Ok(l) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
                // Whatever happened while we were not listening is unknown.
                notifier.wake_all();
                loop {
                    let n = tokio::select! {
                        n = l.try_recv() => n,
                        _ = shutdown.changed() => return,
                    };
                    match n {
                        Ok(Some(n)) => {
                            for t in n.payload().split(',').filter_map(Topic::decode) {
                                notifier.wake(t);
                            }
                        }
                        Ok(None) => {
                            tracing::warn!("PostgreSQL listener reconnecting");
                            notifier.wake_all();
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "PostgreSQL listener failed");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "PostgreSQL LISTEN failed; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn topics_round_trip() {
        for t in [
            Topic::Site(SiteId(3)),
            Topic::Gateway(GatewayId(12)),
            Topic::Console,
            Topic::Outbox,
        ] {
            assert_eq!(Topic::decode(&t.encode()), Some(t));
        }
        assert_eq!(Topic::decode("x:1"), None);
        assert_eq!(Topic::decode("s:abc"), None);
    }

    #[tokio::test]
    async fn a_wake_reaches_only_its_topic() {
        let n = Notifier::default();
        let mut a = n.subscribe(Topic::Site(SiteId(1)));
        let b = n.subscribe(Topic::Site(SiteId(2)));
        n.wake(Topic::Site(SiteId(1)));
        assert!(a.has_changed().unwrap());
        assert!(!b.has_changed().unwrap());
        a.borrow_and_update();
        n.wake_all();
        assert!(b.has_changed().unwrap());
        drop(a);
        drop(b);
        n.wake(Topic::Site(SiteId(1)));
        assert!(n.topics.lock().unwrap().len() <= 1);
    }
}
