//! Admission of handshake initiations at a responder, shared by every worker
//! of one gateway: the load that decides when initiators must prove their
//! address with a cookie (WireGuard paper §5.4.7), and a token bucket per
//! source address for initiations that did prove it.
//!
//! Both follow Linux's WireGuard (`drivers/net/wireguard`): a responder is
//! *under load* while more initiations arrive than it wants to answer, and
//! stays so for one second after the last excess; under load only an
//! initiation with a valid cookie (mac2) is answered, and only while its
//! source address has tokens: 20 initiations per second with a burst of 5,
//! IPv4 per address, IPv6 per /64 (one customer's prefix). Charging only
//! cookie-proven addresses means a spoofed flood cannot drain the bucket of
//! the address it forges.
//!
//! The table of buckets is bounded ([`MAX_SOURCES`]); entries idle for a
//! second are collected once a second. When it is full, a new source is
//! refused until collection makes room (an address that already has a bucket
//! keeps it).
//!
//! Time is the caller's `now`; nothing here reads a clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Initiations per second a cookie-proven source address may send under load.
pub const SOURCE_RATE_PER_S: u64 = 20;
/// How many of them may come at once.
pub const SOURCE_BURST: u64 = 5;
/// Source addresses tracked at most (Linux's bound on a host with more than
/// 1 GiB of memory).
pub const MAX_SOURCES: usize = 65_536;
/// How long a responder stays under load after the last excess initiation,
/// and how often idle buckets are collected.
const SECOND: Duration = Duration::from_secs(1);
const NANOS_PER_S: u64 = 1_000_000_000;
/// Tokens are nanoseconds of sending time: one initiation costs this much.
const PACKET_COST: u64 = NANOS_PER_S / SOURCE_RATE_PER_S;
const TOKEN_MAX: u64 = PACKET_COST * SOURCE_BURST;

/// The key of a source's bucket: an IPv4 address, or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SourceKey {
    V4(u32),
    V6(u64),
}

impl From<IpAddr> for SourceKey {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(a) => Self::V4(u32::from(a)),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => Self::V4(u32::from(v4)),
                None => Self::V6((u128::from(a) >> 64) as u64),
            },
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Nanoseconds of credit, at most [`TOKEN_MAX`].
    tokens: u64,
    last: Instant,
}

/// Token buckets per source address (see the module docs).
#[derive(Debug)]
pub struct SourceLimiter {
    // SipHash with a per-process key: the keys are chosen by senders.
    buckets: HashMap<SourceKey, Bucket>,
    max_sources: usize,
    next_gc: Option<Instant>,
}

/// Why [`SourceLimiter::allow`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The source has used its tokens.
    RateLimited,
    /// The table is full and the source has no bucket yet.
    TableFull,
}

impl Default for SourceLimiter {
    fn default() -> Self {
        Self::new(MAX_SOURCES)
    }
}

impl SourceLimiter {
    /// A limiter that tracks at most `max_sources` addresses.
    pub fn new(max_sources: usize) -> Self {
        Self {
            buckets: HashMap::new(),
            max_sources,
            next_gc: None,
        }
    }

    /// Takes one token of `source`'s bucket.
    ///
    /// # Errors
    /// Why the initiation must be dropped.
    pub fn allow(&mut self, source: IpAddr, now: Instant) -> Result<(), Refusal> {
        self.collect(now);
        let key = SourceKey::from(source);
        if let Some(b) = self.buckets.get_mut(&key) {
            let elapsed = now.saturating_duration_since(b.last).as_nanos();
            let tokens = u64::try_from(elapsed)
                .unwrap_or(u64::MAX)
                .saturating_add(b.tokens)
                .min(TOKEN_MAX);
            b.last = now;
            if tokens >= PACKET_COST {
                b.tokens = tokens - PACKET_COST;
                Ok(())
            } else {
                b.tokens = tokens;
                Err(Refusal::RateLimited)
            }
        } else if self.buckets.len() >= self.max_sources {
            Err(Refusal::TableFull)
        } else {
            self.buckets.insert(
                key,
                Bucket {
                    tokens: TOKEN_MAX - PACKET_COST,
                    last: now,
                },
            );
            Ok(())
        }
    }

    /// Source addresses tracked now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Once a second: forgets sources idle for more than a second (their
    /// bucket would be full again).
    fn collect(&mut self, now: Instant) {
        if self.next_gc.is_some_and(|t| now < t) {
            return;
        }
        self.next_gc = Some(now + SECOND);
        self.buckets
            .retain(|_, b| now.saturating_duration_since(b.last) <= SECOND);
    }
}

/// Whether a responder is under load: more than `limit` initiations within
/// one second, and for one second after the last excess.
#[derive(Debug)]
pub struct HandshakeLoad {
    limit: u64,
    window_start: Option<Instant>,
    count: u64,
    last_excess: Option<Instant>,
}

impl HandshakeLoad {
    /// Load above `limit` initiations per second (0: always under load).
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            window_start: None,
            count: 0,
            last_excess: None,
        }
    }

    /// Counts one initiation; returns whether the responder is under load.
    pub fn note(&mut self, now: Instant) -> bool {
        if self
            .window_start
            .is_none_or(|s| now.saturating_duration_since(s) >= SECOND)
        {
            self.window_start = Some(now);
            self.count = 0;
        }
        self.count += 1;
        if self.count > self.limit {
            self.last_excess = Some(now);
        }
        self.last_excess
            .is_some_and(|t| now.saturating_duration_since(t) < SECOND)
    }
}

/// The load and the source buckets of one responder, behind one lock.
#[derive(Debug)]
pub struct Admission {
    load: HandshakeLoad,
    sources: SourceLimiter,
}

impl Admission {
    /// Admission with cookies above `limit` initiations per second.
    pub fn new(limit: u64) -> Self {
        Self {
            load: HandshakeLoad::new(limit),
            sources: SourceLimiter::default(),
        }
    }

    /// Counts one initiation (with a valid mac1); whether it needs a cookie.
    pub fn note_initiation(&mut self, now: Instant) -> bool {
        self.load.note(now)
    }

    /// Under load, a cookie-proven initiation from `source`: whether it may
    /// be answered.
    ///
    /// # Errors
    /// Why it must be dropped.
    pub fn allow_source(&mut self, source: IpAddr, now: Instant) -> Result<(), Refusal> {
        self.sources.allow(source, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_gets_a_burst_of_five_then_twenty_per_second() {
        let t0 = Instant::now();
        let mut l = SourceLimiter::default();
        let a = ip("198.51.100.7");
        let allowed = (0..50).filter(|_| l.allow(a, t0).is_ok()).count();
        assert_eq!(allowed, 5, "the burst");
        // 50 ms buys one more initiation, 49 ms does not.
        assert_eq!(
            l.allow(a, t0 + Duration::from_millis(49)),
            Err(Refusal::RateLimited)
        );
        assert_eq!(l.allow(a, t0 + Duration::from_millis(50)), Ok(()));
        // Over ten seconds at 1000 per second: 20 per second pass.
        let mut passed = 0;
        for ms in 1..=10_000u64 {
            if l.allow(a, t0 + Duration::from_millis(50 + ms)).is_ok() {
                passed += 1;
            }
        }
        assert!((200..=201).contains(&passed), "{passed}");
        // Another address has its own bucket.
        assert_eq!(l.allow(ip("198.51.100.8"), t0), Ok(()));
    }

    #[test]
    fn ipv6_sources_share_a_bucket_per_64() {
        let t0 = Instant::now();
        let mut l = SourceLimiter::default();
        for i in 0..5 {
            assert!(l.allow(ip(&format!("2001:db8:1:2::{i}")), t0).is_ok());
        }
        assert_eq!(
            l.allow(ip("2001:db8:1:2:ffff::1"), t0),
            Err(Refusal::RateLimited)
        );
        assert!(l.allow(ip("2001:db8:1:3::1"), t0).is_ok());
        // An IPv4-mapped address is the IPv4 address.
        assert!(l.allow(ip("192.0.2.1"), t0).is_ok());
        assert_eq!(l.len(), 3);
        for _ in 0..4 {
            assert!(l.allow(ip("::ffff:192.0.2.1"), t0).is_ok());
        }
        assert_eq!(l.allow(ip("192.0.2.1"), t0), Err(Refusal::RateLimited));
    }

    #[test]
    fn the_table_is_bounded_and_idle_sources_are_collected() {
        let t0 = Instant::now();
        let mut l = SourceLimiter::new(3);
        for i in 1..=3 {
            assert!(l.allow(ip(&format!("192.0.2.{i}")), t0).is_ok());
        }
        assert_eq!(l.allow(ip("192.0.2.4"), t0), Err(Refusal::TableFull));
        // A known source keeps its bucket while the table is full.
        assert!(l.allow(ip("192.0.2.1"), t0).is_ok());
        assert_eq!(l.len(), 3);
        // Two seconds later everyone is idle: collected, room again.
        let later = t0 + Duration::from_secs(2);
        assert!(l.allow(ip("192.0.2.4"), later).is_ok());
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn load_starts_above_the_limit_and_lasts_a_second_after_the_excess() {
        let t0 = Instant::now();
        let mut load = HandshakeLoad::new(3);
        assert!(!load.note(t0));
        assert!(!load.note(t0));
        assert!(!load.note(t0));
        assert!(load.note(t0), "the fourth in one second");
        assert!(load.note(t0 + Duration::from_millis(500)), "the fifth");
        // A new second with one initiation, but within a second of the excess.
        assert!(load.note(t0 + Duration::from_millis(1000)));
        // More than a second after the excess, with few initiations: calm.
        assert!(!load.note(t0 + Duration::from_millis(1600)));
        let mut always = HandshakeLoad::new(0);
        assert!(always.note(t0));
    }
}
