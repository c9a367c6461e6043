//! A gateway's lease on the NAT addresses it announces.
//!
//! The server marks a gateway down when no heartbeat arrived for its
//! `down_after_ms` and moves the gateway's sites to another gateway, which
//! then announces their NAT addresses on the center LAN (proxy ARP). A gateway
//! that is alive but cut off from the server must stop announcing them by
//! then, or two gateways answer ARP for one address (docs/DESIGN.md, "Data
//! plane"). So every acknowledged heartbeat renews a lease of that length,
//! counted from when the heartbeat was *sent*: the server saw it no earlier,
//! so its own deadline is no earlier than ours. When the lease runs out, the
//! gateway withdraws its routes and proxy-ARP entries and keeps them withdrawn
//! until it runs the server's current document again.

use std::time::{Duration, Instant};

/// Whether the gateway may announce its NAT addresses.
#[derive(Debug, Clone, Default)]
pub struct Lease {
    /// When the lease runs out; `None` before the first acknowledgement or
    /// when the server names no lease (it then never moves sites away).
    expires_at: Option<Instant>,
    withdrawn: bool,
}

/// What the caller does after an input to the [`Lease`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseAction {
    /// Nothing changes.
    Keep,
    /// Remove every route and proxy-ARP entry now.
    Withdraw,
    /// Install the running document's routes again.
    Restore,
}

impl Lease {
    /// A lease that has not started: nothing is withdrawn.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the addresses are withdrawn.
    pub fn is_withdrawn(&self) -> bool {
        self.withdrawn
    }

    /// When the lease runs out (for the status page).
    pub fn expires_at(&self) -> Option<Instant> {
        self.expires_at
    }

    /// The server acknowledged a heartbeat sent at `sent_at`, granting
    /// `length` (`None`: no lease). `current` says whether the gateway
    /// already runs the newest document the server has for it: only then
    /// may withdrawn addresses come back, else they wait for that document
    /// ([`Self::applied`]), which may move them elsewhere.
    pub fn acknowledged(
        &mut self,
        sent_at: Instant,
        length: Option<Duration>,
        current: bool,
        now: Instant,
    ) -> LeaseAction {
        let Some(length) = length else {
            self.expires_at = None;
            return self.restore_if(true);
        };
        let expires_at = sent_at + length;
        // Acknowledgements can arrive out of order: a lease never shrinks.
        if self.expires_at.is_none_or(|e| expires_at > e) {
            self.expires_at = Some(expires_at);
        }
        self.restore_if(current && !self.expired(now))
    }

    /// The gateway applied a document it just received from the server.
    pub fn applied(&mut self, now: Instant) -> LeaseAction {
        self.restore_if(!self.expired(now))
    }

    /// Time passed: withdraws once the lease has run out.
    pub fn tick(&mut self, now: Instant) -> LeaseAction {
        if !self.withdrawn && self.expired(now) {
            self.withdrawn = true;
            LeaseAction::Withdraw
        } else {
            LeaseAction::Keep
        }
    }

    fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|e| now >= e)
    }

    fn restore_if(&mut self, allowed: bool) -> LeaseAction {
        if self.withdrawn && allowed {
            self.withdrawn = false;
            LeaseAction::Restore
        } else {
            LeaseAction::Keep
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Option<Duration> = Some(Duration::from_secs(15));

    #[test]
    fn no_acknowledgement_yet_never_withdraws() {
        let t0 = Instant::now();
        let mut lease = Lease::new();
        assert_eq!(
            lease.tick(t0 + Duration::from_secs(3600)),
            LeaseAction::Keep
        );
        assert!(!lease.is_withdrawn());
    }

    #[test]
    fn runs_out_counted_from_the_send_time_and_withdraws_once() {
        let t0 = Instant::now();
        let mut lease = Lease::new();
        // Sent at t0, acknowledged 2 s later: the server's deadline is ≥ t0 + 15 s.
        let ack = t0 + Duration::from_secs(2);
        assert_eq!(lease.acknowledged(t0, LEASE, true, ack), LeaseAction::Keep);
        assert_eq!(
            lease.tick(t0 + Duration::from_millis(14_999)),
            LeaseAction::Keep
        );
        assert_eq!(
            lease.tick(t0 + Duration::from_secs(15)),
            LeaseAction::Withdraw
        );
        assert_eq!(lease.tick(t0 + Duration::from_secs(16)), LeaseAction::Keep);
        assert!(lease.is_withdrawn());
    }

    #[test]
    fn a_late_acknowledgement_of_an_old_heartbeat_does_not_shorten_it() {
        let t0 = Instant::now();
        let mut lease = Lease::new();
        lease.acknowledged(t0 + Duration::from_secs(5), LEASE, true, t0);
        lease.acknowledged(t0, LEASE, true, t0 + Duration::from_secs(6));
        assert_eq!(lease.tick(t0 + Duration::from_secs(16)), LeaseAction::Keep);
        assert_eq!(
            lease.tick(t0 + Duration::from_secs(20)),
            LeaseAction::Withdraw
        );
    }

    #[test]
    fn comes_back_only_with_the_current_document() {
        let t0 = Instant::now();
        let mut lease = Lease::new();
        lease.acknowledged(t0, LEASE, true, t0);
        let cut = t0 + Duration::from_secs(15);
        assert_eq!(lease.tick(cut), LeaseAction::Withdraw);
        // The link is back, but the server has a newer document (the sites
        // moved away): stay withdrawn until it is applied.
        let back = cut + Duration::from_secs(10);
        assert_eq!(
            lease.acknowledged(back, LEASE, false, back),
            LeaseAction::Keep
        );
        assert!(lease.is_withdrawn());
        assert_eq!(
            lease.applied(back + Duration::from_secs(1)),
            LeaseAction::Restore
        );
        assert!(!lease.is_withdrawn());
        // Or the gateway already runs the current document.
        let mut lease = Lease::new();
        lease.acknowledged(t0, LEASE, true, t0);
        lease.tick(cut);
        assert_eq!(
            lease.acknowledged(back, LEASE, true, back),
            LeaseAction::Restore
        );
    }

    #[test]
    fn a_document_applied_after_the_lease_ran_out_does_not_restore() {
        // A long-poll answered before the cut and applied after it.
        let t0 = Instant::now();
        let mut lease = Lease::new();
        lease.acknowledged(t0, LEASE, true, t0);
        let late = t0 + Duration::from_secs(20);
        assert_eq!(lease.tick(late), LeaseAction::Withdraw);
        assert_eq!(lease.applied(late), LeaseAction::Keep);
        assert!(lease.is_withdrawn());
    }

    #[test]
    fn a_server_without_leases_restores() {
        let t0 = Instant::now();
        let mut lease = Lease::new();
        lease.acknowledged(t0, LEASE, true, t0);
        lease.tick(t0 + Duration::from_secs(15));
        assert_eq!(
            lease.acknowledged(t0 + Duration::from_secs(30), None, false, t0),
            LeaseAction::Restore
        );
        assert_eq!(lease.tick(t0 + Duration::from_secs(99)), LeaseAction::Keep);
    }
}
