//! The ESP anti-replay window (RFC 4303 §3.4.3) as a ring of bitmap words
//! (RFC 6479).
//!
//! The bitmap is 2048 bits: 32 words of 64 bits, used as a ring indexed by
//! `seq / 64`. Advancing the window clears whole words instead of shifting
//! the bitmap, so a jump costs at most 32 word writes and an in-order packet
//! usually none. One word is always partly ahead of the highest number seen,
//! so the usable window is 31 words, [`WINDOW`] = 1984 sequence numbers
//! (RFC 6479): the highest seen and the 1983 below it. That absorbs the
//! reordering of a batched, multi-queue data plane (RFC 4303 §3.4.3 asks for
//! at least 32, 64 by default, and lets the receiver choose more).
//!
//! The check and the update are separate on purpose: the receiver checks
//! before it spends time on the ICV, and marks the number only once the ICV
//! verified (RFC 4303 §3.4.3), so forged packets cannot move the window.

/// Words of the bitmap ring.
const WORDS: usize = 32;
const WORD_BITS: u32 = u64::BITS;

/// How many sequence numbers the window accepts: the highest seen and the
/// `WINDOW - 1` below it.
pub const WINDOW: u32 = (WORDS as u32 - 1) * WORD_BITS;

/// Why the window refused a sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Sequence number 0, which no sender uses (the first packet is 1,
    /// RFC 4303 §3.3.3).
    Zero,
    /// Already received.
    Duplicate,
    /// Below the window.
    TooOld,
}

/// The receive window of one inbound SA.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    /// The highest sequence number marked so far (0: none yet).
    top: u32,
    bitmap: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    /// An empty window: every sequence number from 1 on is acceptable.
    pub const fn new() -> Self {
        Self {
            top: 0,
            bitmap: [0; WORDS],
        }
    }

    /// The highest sequence number marked so far (0 before the first).
    pub fn top(&self) -> u32 {
        self.top
    }

    /// Whether `seq` may be accepted, without changing the window.
    ///
    /// # Errors
    /// [`Refused`] says why not.
    pub fn check(&self, seq: u32) -> Result<(), Refused> {
        if seq == 0 {
            return Err(Refused::Zero);
        }
        if seq > self.top {
            return Ok(());
        }
        if u64::from(seq) + u64::from(WINDOW) <= u64::from(self.top) {
            return Err(Refused::TooOld);
        }
        let (word, bit) = Self::position(seq);
        if self.bitmap[word] & bit != 0 {
            return Err(Refused::Duplicate);
        }
        Ok(())
    }

    /// Marks `seq` as received, advancing the window when it is the new
    /// highest. Call only after [`ReplayWindow::check`] passed and the
    /// packet's ICV verified.
    ///
    /// # Errors
    /// As [`ReplayWindow::check`]; a refused number changes nothing.
    pub fn mark(&mut self, seq: u32) -> Result<(), Refused> {
        self.check(seq)?;
        if seq > self.top {
            // Clear the words between the old top's word and the new one
            // (at most the whole ring): they held numbers that are now below
            // the window, or none (RFC 6479).
            let old_word = self.top / WORD_BITS;
            let new_word = seq / WORD_BITS;
            let advance = (new_word - old_word).min(WORDS as u32);
            for k in 1..=advance {
                self.bitmap[(old_word.wrapping_add(k) as usize) % WORDS] = 0;
            }
            self.top = seq;
        }
        let (word, bit) = Self::position(seq);
        self.bitmap[word] |= bit;
        Ok(())
    }

    fn position(seq: u32) -> (usize, u64) {
        (
            (seq / WORD_BITS) as usize % WORDS,
            1u64 << (seq % WORD_BITS),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;
    use test_strategy::proptest;

    use super::*;

    /// The window's meaning, written as plainly as possible.
    #[derive(Default)]
    struct Model {
        seen: BTreeSet<u32>,
        top: u32,
    }

    impl Model {
        fn accept(&mut self, seq: u32) -> Result<(), Refused> {
            if seq == 0 {
                return Err(Refused::Zero);
            }
            if seq <= self.top && self.top - seq >= WINDOW {
                return Err(Refused::TooOld);
            }
            if !self.seen.insert(seq) {
                return Err(Refused::Duplicate);
            }
            self.top = self.top.max(seq);
            Ok(())
        }
    }

    #[test]
    fn window_is_at_least_1024() {
        assert_eq!(WINDOW, 1984);
        const { assert!(WINDOW >= 1024) };
    }

    #[test]
    fn in_order_numbers_are_accepted_once() {
        let mut w = ReplayWindow::new();
        for seq in 1..=10_000 {
            assert_eq!(w.mark(seq), Ok(()));
            assert_eq!(w.check(seq), Err(Refused::Duplicate));
        }
        assert_eq!(w.top(), 10_000);
        assert_eq!(w.check(10_000 - WINDOW + 1), Err(Refused::Duplicate));
        assert_eq!(w.check(10_000 - WINDOW), Err(Refused::TooOld));
        assert_eq!(w.check(0), Err(Refused::Zero));
    }

    #[test]
    fn a_jump_clears_the_words_it_passes() {
        let mut w = ReplayWindow::new();
        for seq in 1..=64 {
            w.mark(seq).unwrap();
        }
        // One ring turn later the same words hold numbers 2048 higher;
        // they must read as fresh, not as the old marks.
        w.mark(64 + 2048).unwrap();
        for seq in (64 + 2048 - WINDOW + 1)..(64 + 2048) {
            assert_eq!(w.check(seq), Ok(()), "seq {seq}");
        }
        // A jump of many ring turns clears everything.
        w.mark(1_000_000).unwrap();
        for seq in (1_000_000 - WINDOW + 1)..1_000_000 {
            assert_eq!(w.check(seq), Ok(()), "seq {seq}");
        }
    }

    #[test]
    fn the_last_sequence_number_is_usable() {
        let mut w = ReplayWindow::new();
        w.mark(u32::MAX - 5).unwrap();
        w.mark(u32::MAX).unwrap();
        assert_eq!(w.check(u32::MAX), Err(Refused::Duplicate));
        assert_eq!(w.check(u32::MAX - 5), Err(Refused::Duplicate));
        assert_eq!(w.check(u32::MAX - 4), Ok(()));
        assert_eq!(w.check(u32::MAX - WINDOW), Err(Refused::TooOld));
    }

    /// Every number of a window-sized block is accepted exactly once, in any
    /// order; replaying the block afterwards is refused entirely.
    #[proptest]
    fn every_number_in_the_window_is_accepted_once_in_any_order(
        #[strategy(0u32..u32::MAX - WINDOW)] base: u32,
        #[strategy(Just((1..=WINDOW).collect::<Vec<u32>>()).prop_shuffle())] order: Vec<u32>,
        #[strategy(proptest::collection::vec(0usize..WINDOW as usize, 0..200))] repeats: Vec<usize>,
    ) {
        let mut w = ReplayWindow::new();
        if base > 0 {
            w.mark(base).unwrap();
        }
        let mut accepted = BTreeSet::new();
        // Duplicates interleaved: each repeat re-sends an earlier number.
        let mut repeats = repeats.into_iter();
        for (i, offset) in order.iter().enumerate() {
            let seq = base + offset;
            prop_assert_eq!(w.mark(seq), Ok(()), "fresh {} refused", seq);
            prop_assert!(accepted.insert(seq));
            if let Some(r) = repeats.next() {
                let again = base + order[r.min(i)];
                prop_assert_eq!(w.mark(again), Err(Refused::Duplicate));
            }
        }
        for offset in order {
            prop_assert_eq!(w.mark(base + offset), Err(Refused::Duplicate));
        }
    }

    /// Against the model on arbitrary traffic around a moving top: fresh
    /// in-window numbers are never refused, duplicates and numbers below the
    /// window always are, and `check` agrees with `mark`.
    #[proptest]
    fn agrees_with_the_model(
        #[strategy(1u32..u32::MAX / 2)] start: u32,
        #[strategy(proptest::collection::vec(
            prop_oneof![8 => 0i64..64, 3 => -2100i64..0, 1 => -100_000i64..100_000],
            1..2000,
        ))]
        steps: Vec<i64>,
    ) {
        let mut w = ReplayWindow::new();
        let mut model = Model::default();
        let mut cursor = i64::from(start);
        for step in steps {
            // Mostly forward, often back inside or just outside the window,
            // sometimes a long jump either way.
            cursor = (cursor + step).max(0);
            let seq = u32::try_from(cursor).unwrap_or(u32::MAX);
            let expected = model.accept(seq);
            prop_assert_eq!(w.check(seq), expected, "check {}", seq);
            prop_assert_eq!(w.mark(seq), expected, "mark {}", seq);
            prop_assert_eq!(w.top(), model.top);
        }
    }

    /// Numbers at or below `top - WINDOW` are refused however the window
    /// got there.
    #[proptest]
    fn older_than_the_window_is_refused(
        #[strategy(WINDOW + 1..u32::MAX)] top: u32,
        #[strategy(1u32..=WINDOW)] below: u32,
        #[strategy(0u32..=4096)] older: u32,
    ) {
        let mut w = ReplayWindow::new();
        w.mark(top - below).unwrap();
        w.mark(top).unwrap();
        let old = (top - WINDOW).saturating_sub(older);
        prop_assume!(old > 0);
        prop_assert_eq!(w.check(old), Err(Refused::TooOld));
        prop_assert_eq!(w.mark(old), Err(Refused::TooOld));
    }
}
