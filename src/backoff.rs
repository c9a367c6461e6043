//! Reconnection delays for the control-plane clients of the gateway and the
//! agent: exponential with full jitter (AWS architecture blog, "Exponential
//! Backoff And Jitter"), capped, reset by a success. Sans-IO: the caller owns
//! the clock and the sleep; randomness comes from a seed.

use std::time::Duration;

/// Exponential backoff with jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// Delays start near `initial` and double up to `max`.
    pub fn new(initial: Duration, max: Duration, seed: u64) -> Self {
        Self {
            initial,
            max: max.max(initial),
            attempt: 0,
            // xorshift64* must not start at zero.
            rng: seed | 1,
        }
    }

    /// The delay before the next attempt after a failure.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self
            .initial
            .saturating_mul(1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // Half fixed, half random: never hammer, never wait much longer than `exp`.
        let half = exp / 2;
        let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        let r = if jitter_ms == 0 {
            0
        } else {
            self.next_random() % (jitter_ms + 1)
        };
        half + Duration::from_millis(r)
    }

    /// Call after a success: the next failure starts from `initial` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// How many failures in a row so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: plenty for jitter, deterministic for tests.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5), 7);
        let mut last_upper = Duration::ZERO;
        for i in 0..12 {
            let d = b.next_delay();
            let exp = Duration::from_millis(100 * (1 << i.min(20))).min(Duration::from_secs(5));
            assert!(
                d >= exp / 2 && d <= exp,
                "attempt {i}: {d:?} not in [{:?}, {exp:?}]",
                exp / 2
            );
            assert!(exp >= last_upper);
            last_upper = exp;
        }
        assert_eq!(b.attempts(), 12);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn same_seed_same_delays() {
        let mut a = Backoff::new(Duration::from_millis(50), Duration::from_secs(2), 42);
        let mut b = Backoff::new(Duration::from_millis(50), Duration::from_secs(2), 42);
        for _ in 0..10 {
            assert_eq!(a.next_delay(), b.next_delay());
        }
    }
}
