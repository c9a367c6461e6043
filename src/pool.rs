//! The VPN-NAT address pool: which addresses of a configured IPv4 prefix
//! are free to hand to a terminal for a maintenance, and which are taken.
//!
//! The pool is any prefix ("10.64.0.0/16" by default, docs/DESIGN.md "Address
//! plan"). Its network and broadcast addresses are never handed out; a /31
//! has no such addresses (RFC 3021: both are hosts on a point-to-point
//! link) and a /32 is its single address. Optional reserved ranges (e.g. a
//! gateway's own address) are never handed out either.
//!
//! The free addresses are kept as disjoint, non-adjacent inclusive ranges in
//! a `BTreeMap` (start → end), so allocation, release and holding a given
//! address are O(log r) in the number of ranges r, and memory grows with
//! fragmentation, not with the size of the prefix: a fresh /8 is one range.
//! Allocation always takes the lowest free address, so the order is
//! deterministic and the same sequence of calls gives the same addresses.
//!
//! This is the in-memory model. The maintenance server checks its
//! `pool.prefix` with it and keeps the authoritative allocation in its
//! database transactions; its tests check that allocation against this model.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

pub use crate::ipv4::Prefix;
use crate::ipv4::PrefixError;

/// Parses a pool prefix `a.b.c.d/len`, refusing host bits (in a configured
/// address plan they are a typo, not a subnet to round down to).
///
/// # Errors
/// [`PoolError::BadPrefix`] saying which part does not parse,
/// [`PoolError::HostBitsSet`] with the prefix the text probably meant.
pub fn parse_prefix(text: &str) -> Result<Prefix, PoolError> {
    Prefix::parse_exact(text).map_err(|e| {
        let text = text.to_owned();
        let reason = match e {
            PrefixError::HostBitsSet(network) => {
                return PoolError::HostBitsSet { text, network };
            }
            PrefixError::Syntax => "expected ADDRESS/LENGTH, e.g. 10.64.0.0/16",
            PrefixError::BadAddress => "not an IPv4 address before the '/'",
            PrefixError::BadLength => "the prefix length must be 0 to 32",
        };
        PoolError::BadPrefix { text, reason }
    })
}

/// Serde for [`PoolConfig::prefix`]: the text form, refusing host bits
/// with [`parse_prefix`]'s message.
fn deserialize_exact_prefix<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Prefix, D::Error> {
    let s = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
    parse_prefix(&s).map_err(serde::de::Error::custom)
}

/// The host addresses of `prefix` ([`Prefix::hosts`]) as a range.
fn hosts_of(prefix: Prefix) -> AddrRange {
    let hosts = prefix.hosts();
    AddrRange {
        first: *hosts.start(),
        last: *hosts.end(),
    }
}

/// An inclusive range of IPv4 addresses: written `10.64.0.1`,
/// `10.64.0.1-10.64.0.9` or `10.64.255.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AddrRange {
    first: Ipv4Addr,
    last: Ipv4Addr,
}

impl AddrRange {
    /// `first..=last`, or `None` when `first > last`.
    pub fn new(first: Ipv4Addr, last: Ipv4Addr) -> Option<Self> {
        (first <= last).then_some(Self { first, last })
    }

    /// The first address.
    pub fn first(&self) -> Ipv4Addr {
        self.first
    }

    /// The last address.
    pub fn last(&self) -> Ipv4Addr {
        self.last
    }

    /// The number of addresses.
    pub fn count(&self) -> u64 {
        u64::from(self.last.to_bits() - self.first.to_bits()) + 1
    }

    fn bits(&self) -> (u32, u32) {
        (self.first.to_bits(), self.last.to_bits())
    }
}

impl fmt::Display for AddrRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl FromStr for AddrRange {
    type Err = PoolError;

    fn from_str(s: &str) -> Result<Self, PoolError> {
        let bad = |reason| PoolError::BadRange {
            text: s.to_owned(),
            reason,
        };
        let t = s.trim();
        if t.contains('/') {
            let p = Prefix::parse_exact(t).map_err(|e| match e {
                PrefixError::HostBitsSet(_) => bad("the prefix has host bits set"),
                _ => bad("not a valid ADDRESS/LENGTH prefix"),
            })?;
            return Ok(Self {
                first: p.network(),
                last: p.last(),
            });
        }
        let (a, b) = t.split_once('-').unwrap_or((t, t));
        let addr = |x: &str| {
            x.trim()
                .parse::<Ipv4Addr>()
                .map_err(|_| bad("expected ADDRESS, FIRST-LAST or ADDRESS/LENGTH"))
        };
        Self::new(addr(a)?, addr(b)?).ok_or_else(|| bad("the first address is after the last"))
    }
}

impl TryFrom<String> for AddrRange {
    type Error = PoolError;

    fn try_from(s: String) -> Result<Self, PoolError> {
        s.parse()
    }
}

impl From<AddrRange> for String {
    fn from(r: AddrRange) -> String {
        r.to_string()
    }
}

/// The pool's configuration, as it appears in a TOML file:
///
/// ```toml
/// prefix = "10.64.0.0/16"
/// reserved = ["10.64.0.1", "10.64.255.0/24"]
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The prefix the NAT addresses come from (host bits clear).
    #[serde(deserialize_with = "deserialize_exact_prefix")]
    pub prefix: Prefix,
    /// Addresses never handed out.
    #[serde(default)]
    pub reserved: Vec<AddrRange>,
}

/// A configuration that cannot make a pool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// The prefix text does not parse.
    #[error("pool prefix {text:?}: {reason}")]
    BadPrefix {
        /// What was given.
        text: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The prefix has bits set past its length (`10.64.1.0/16`).
    #[error("pool prefix {text:?} has host bits set (did you mean {network}?)")]
    HostBitsSet {
        /// What was given.
        text: String,
        /// The prefix with the host bits cleared.
        network: Prefix,
    },
    /// A reserved range does not parse.
    #[error("reserved range {text:?}: {reason}")]
    BadRange {
        /// What was given.
        text: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A reserved range reaches outside the prefix.
    #[error("reserved range {range} is not inside the pool prefix {prefix}")]
    RangeOutsidePrefix {
        /// The range.
        range: AddrRange,
        /// The pool prefix.
        prefix: Prefix,
    },
    /// The reserved ranges cover every host address.
    #[error("the reserved ranges leave no address of {prefix} to hand out")]
    NothingToAllocate {
        /// The pool prefix.
        prefix: Prefix,
    },
}

/// Why a [`Pool::hold`] or [`Pool::release`] was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PoolOpError {
    /// Not a host address of the pool's prefix.
    #[error("{0} is not a host address of the pool")]
    OutsidePool(Ipv4Addr),
    /// A reserved address.
    #[error("{0} is reserved")]
    Reserved(Ipv4Addr),
    /// Hold: the address is already taken.
    #[error("{0} is already in use")]
    InUse(Ipv4Addr),
    /// Release: the address was not taken.
    #[error("{0} is not in use")]
    NotInUse(Ipv4Addr),
}

/// The VPN-NAT address allocator. See the module documentation.
#[derive(Debug, Clone)]
pub struct Pool {
    prefix: Prefix,
    hosts: (u32, u32),
    /// Sorted, disjoint, clipped to `hosts`.
    reserved: Vec<(u32, u32)>,
    /// start → end (inclusive) of each free range; disjoint, non-adjacent.
    free: BTreeMap<u32, u32>,
    free_count: u64,
    capacity: u64,
}

impl Pool {
    /// A pool with every non-reserved host address free.
    ///
    /// # Errors
    /// [`PoolError::RangeOutsidePrefix`] for a reserved range not inside the
    /// prefix, [`PoolError::NothingToAllocate`] when the reserved ranges
    /// cover every host address.
    pub fn new(config: &PoolConfig) -> Result<Self, PoolError> {
        let prefix = config.prefix;
        let mut reserved = Vec::with_capacity(config.reserved.len());
        for r in &config.reserved {
            if !prefix.contains(r.first) || !prefix.contains(r.last) {
                return Err(PoolError::RangeOutsidePrefix { range: *r, prefix });
            }
            reserved.push(r.bits());
        }
        let hosts = hosts_of(prefix).bits();
        reserved.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(reserved.len());
        for (s, e) in reserved {
            let (s, e) = (s.max(hosts.0), e.min(hosts.1));
            if s > e {
                continue;
            }
            match merged.last_mut() {
                Some(last) if u64::from(s) <= u64::from(last.1) + 1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        let mut free = BTreeMap::new();
        let mut next = Some(hosts.0);
        for &(s, e) in &merged {
            if let Some(n) = next
                && n < s
            {
                free.insert(n, s - 1);
            }
            next = e.checked_add(1);
        }
        if let Some(n) = next
            && n <= hosts.1
        {
            free.insert(n, hosts.1);
        }
        let capacity: u64 = free.iter().map(|(s, e)| u64::from(e - s) + 1).sum();
        if capacity == 0 {
            return Err(PoolError::NothingToAllocate { prefix });
        }
        Ok(Self {
            prefix,
            hosts,
            reserved: merged,
            free,
            free_count: capacity,
            capacity,
        })
    }

    /// The pool's prefix.
    pub fn prefix(&self) -> Prefix {
        self.prefix
    }

    /// How many addresses the pool can hand out in all.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// How many addresses are free.
    pub fn available(&self) -> u64 {
        self.free_count
    }

    /// How many addresses are taken.
    pub fn in_use(&self) -> u64 {
        self.capacity - self.free_count
    }

    /// Takes the lowest free address; `None` when the pool is exhausted.
    pub fn allocate(&mut self) -> Option<Ipv4Addr> {
        let (s, e) = self.free.pop_first()?;
        if s < e {
            self.free.insert(s + 1, e);
        }
        self.free_count -= 1;
        Some(Ipv4Addr::from_bits(s))
    }

    /// Takes `addr` itself (e.g. the address a terminal held before a
    /// restart).
    ///
    /// # Errors
    /// [`PoolOpError`] when `addr` is outside the pool, reserved or taken.
    pub fn hold(&mut self, addr: Ipv4Addr) -> Result<(), PoolOpError> {
        let a = self.check(addr)?;
        let (s, e) = self.free_range_of(a).ok_or(PoolOpError::InUse(addr))?;
        self.free.remove(&s);
        if s < a {
            self.free.insert(s, a - 1);
        }
        if a < e {
            self.free.insert(a + 1, e);
        }
        self.free_count -= 1;
        Ok(())
    }

    /// Gives `addr` back.
    ///
    /// # Errors
    /// [`PoolOpError`] when `addr` is outside the pool, reserved or not taken.
    pub fn release(&mut self, addr: Ipv4Addr) -> Result<(), PoolOpError> {
        let a = self.check(addr)?;
        if self.free_range_of(a).is_some() {
            return Err(PoolOpError::NotInUse(addr));
        }
        let mut start = a;
        let mut end = a;
        if let Some(prev) = a.checked_sub(1)
            && let Some((&s, _)) = self
                .free
                .range(..=prev)
                .next_back()
                .filter(|(_, e)| **e == prev)
        {
            self.free.remove(&s);
            start = s;
        }
        if let Some(next) = a.checked_add(1)
            && let Some(e) = self.free.remove(&next)
        {
            end = e;
        }
        self.free.insert(start, end);
        self.free_count += 1;
        Ok(())
    }

    /// Whether `addr` is free to allocate or hold.
    pub fn is_free(&self, addr: Ipv4Addr) -> bool {
        self.free_range_of(addr.to_bits()).is_some()
    }

    /// The free addresses, as ranges in ascending order.
    pub fn free_ranges(&self) -> impl Iterator<Item = AddrRange> + '_ {
        self.free.iter().map(|(s, e)| AddrRange {
            first: Ipv4Addr::from_bits(*s),
            last: Ipv4Addr::from_bits(*e),
        })
    }

    fn check(&self, addr: Ipv4Addr) -> Result<u32, PoolOpError> {
        let a = addr.to_bits();
        if a < self.hosts.0 || a > self.hosts.1 {
            return Err(PoolOpError::OutsidePool(addr));
        }
        let i = self.reserved.partition_point(|(_, e)| *e < a);
        if self.reserved.get(i).is_some_and(|(s, _)| *s <= a) {
            return Err(PoolOpError::Reserved(addr));
        }
        Ok(a)
    }

    fn free_range_of(&self, a: u32) -> Option<(u32, u32)> {
        self.free
            .range(..=a)
            .next_back()
            .filter(|(_, e)| **e >= a)
            .map(|(s, e)| (*s, *e))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;
    use test_strategy::proptest;

    use super::*;

    fn pool(prefix: &str, reserved: &[&str]) -> Result<Pool, PoolError> {
        Pool::new(&PoolConfig {
            prefix: parse_prefix(prefix)?,
            reserved: reserved
                .iter()
                .map(|r| r.parse())
                .collect::<Result<_, _>>()?,
        })
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn network_and_broadcast_are_never_handed_out() {
        let mut p = pool("10.64.0.0/30", &[]).unwrap();
        assert_eq!(p.capacity(), 2);
        assert_eq!(p.allocate(), Some(ip("10.64.0.1")));
        assert_eq!(p.allocate(), Some(ip("10.64.0.2")));
        assert_eq!(p.allocate(), None);
        assert_eq!(
            p.release(ip("10.64.0.3")),
            Err(PoolOpError::OutsidePool(ip("10.64.0.3")))
        );
        assert_eq!(
            p.hold(ip("10.64.0.0")),
            Err(PoolOpError::OutsidePool(ip("10.64.0.0")))
        );
    }

    #[test]
    fn a_slash_31_has_two_hosts_and_a_slash_32_one() {
        let mut p = pool("10.64.0.0/31", &[]).unwrap();
        assert_eq!(p.allocate(), Some(ip("10.64.0.0")));
        assert_eq!(p.allocate(), Some(ip("10.64.0.1")));
        assert_eq!(p.allocate(), None);
        let mut p = pool("10.64.0.7/32", &[]).unwrap();
        assert_eq!(p.allocate(), Some(ip("10.64.0.7")));
        assert_eq!(p.allocate(), None);
        p.release(ip("10.64.0.7")).unwrap();
        assert_eq!(p.available(), 1);
        assert_eq!(
            pool("10.64.0.7/32", &["10.64.0.7"]).unwrap_err(),
            PoolError::NothingToAllocate {
                prefix: "10.64.0.7/32".parse().unwrap()
            }
        );
    }

    #[test]
    fn the_whole_address_space_is_a_pool_too() {
        let mut p = pool("0.0.0.0/0", &["0.0.0.1-0.0.0.9"]).unwrap();
        assert_eq!(p.capacity(), (1u64 << 32) - 2 - 9);
        assert_eq!(p.allocate(), Some(ip("0.0.0.10")));
        p.hold(ip("255.255.255.254")).unwrap();
        p.release(ip("255.255.255.254")).unwrap();
        assert_eq!(p.free_ranges().count(), 1);
    }

    #[test]
    fn reserved_ranges_are_skipped_and_cannot_be_held_or_released() {
        let mut p = pool(
            "10.64.0.0/29",
            &["10.64.0.1", "10.64.0.3-10.64.0.4", "10.64.0.0/30"],
        )
        .unwrap();
        assert_eq!(p.capacity(), 2);
        assert_eq!(p.allocate(), Some(ip("10.64.0.5")));
        assert_eq!(
            p.hold(ip("10.64.0.2")),
            Err(PoolOpError::Reserved(ip("10.64.0.2")))
        );
        assert_eq!(
            p.release(ip("10.64.0.4")),
            Err(PoolOpError::Reserved(ip("10.64.0.4")))
        );
        assert_eq!(p.allocate(), Some(ip("10.64.0.6")));
        assert_eq!(p.allocate(), None);
    }

    #[test]
    fn hold_and_release_split_and_merge_free_ranges() {
        let mut p = pool("10.64.0.0/24", &[]).unwrap();
        p.hold(ip("10.64.0.100")).unwrap();
        assert_eq!(
            p.hold(ip("10.64.0.100")),
            Err(PoolOpError::InUse(ip("10.64.0.100")))
        );
        assert_eq!(p.free_ranges().count(), 2);
        assert_eq!(p.allocate(), Some(ip("10.64.0.1")));
        p.release(ip("10.64.0.100")).unwrap();
        assert_eq!(
            p.release(ip("10.64.0.100")),
            Err(PoolOpError::NotInUse(ip("10.64.0.100")))
        );
        p.release(ip("10.64.0.1")).unwrap();
        let ranges: Vec<String> = p.free_ranges().map(|r| r.to_string()).collect();
        assert_eq!(ranges, ["10.64.0.1-10.64.0.254"]);
        assert_eq!(p.in_use(), 0);
    }

    #[test]
    fn bad_configurations_are_explained() {
        let msg = |prefix: &str, reserved: &[&str]| pool(prefix, reserved).unwrap_err().to_string();
        assert_eq!(
            msg("10.64.1.0/16", &[]),
            "pool prefix \"10.64.1.0/16\" has host bits set (did you mean 10.64.0.0/16?)"
        );
        assert!(msg("10.64.0.0", &[]).contains("expected ADDRESS/LENGTH"));
        assert!(msg("10.64.0.0/33", &[]).contains("0 to 32"));
        assert!(msg("10.64.0/16", &[]).contains("not an IPv4 address"));
        assert!(msg("10.64.0.0/x", &[]).contains("0 to 32"));
        assert_eq!(
            msg("10.64.0.0/16", &["10.65.0.1"]),
            "reserved range 10.65.0.1 is not inside the pool prefix 10.64.0.0/16"
        );
        assert_eq!(
            msg("10.64.0.0/16", &["10.64.255.0-10.65.0.0"]),
            "reserved range 10.64.255.0-10.65.0.0 is not inside the pool prefix 10.64.0.0/16"
        );
        assert!(msg("10.64.0.0/16", &["10.64.0.9-10.64.0.1"]).contains("after the last"));
        assert!(msg("10.64.0.0/16", &["10.64.0.x"]).contains("expected ADDRESS"));
        assert!(msg("10.64.0.0/16", &["10.64.0.1/24"]).contains("host bits"));
        assert!(msg("10.64.0.0/30", &["10.64.0.0-10.64.0.3"]).contains("leave no address"));
    }

    #[test]
    fn the_config_reads_from_toml_with_clear_errors() {
        let c: PoolConfig = toml::from_str(
            "prefix = \"10.64.0.0/16\"\nreserved = [\"10.64.0.1\", \"10.64.255.0/24\"]",
        )
        .unwrap();
        let p = Pool::new(&c).unwrap();
        assert_eq!(p.capacity(), 65534 - 1 - 255);
        assert_eq!(
            toml::to_string(&c).unwrap(),
            "prefix = \"10.64.0.0/16\"\nreserved = [\"10.64.0.1\", \"10.64.255.0-10.64.255.255\"]\n"
        );
        let e = toml::from_str::<PoolConfig>("prefix = \"10.64.0.1/16\"").unwrap_err();
        assert!(e.to_string().contains("did you mean 10.64.0.0/16"), "{e}");
    }

    /// An operation of the model test.
    #[derive(Debug, Clone, test_strategy::Arbitrary)]
    enum Op {
        Allocate,
        /// An address by its offset from the network address.
        Hold(#[strategy(0u32..80)] u32),
        Release(#[strategy(0u32..80)] u32),
    }

    /// Random allocate / hold / release sequences against a plain set of the
    /// addresses handed out: never one address twice, always the lowest
    /// free one, and the same refusals.
    #[proptest]
    fn never_hands_out_an_address_twice(
        #[strategy(25u8..=32)] len: u8,
        #[strategy(proptest::collection::vec((0u32..80, 0u32..4), 0..3))] reserved: Vec<(u32, u32)>,
        #[strategy(proptest::collection::vec(any::<Op>(), 0..300))] ops: Vec<Op>,
    ) {
        let base = 0x0a40_0000u32;
        let prefix = Prefix::new(Ipv4Addr::from_bits(base), len).unwrap();
        let size = 1u32 << (32 - len);
        let ranges: Vec<AddrRange> = reserved
            .iter()
            .map(|(s, n)| {
                let s = s % size;
                let e = (s + n).min(size - 1);
                AddrRange::new(Ipv4Addr::from_bits(base + s), Ipv4Addr::from_bits(base + e))
                    .unwrap()
            })
            .collect();
        let is_reserved = |a: u32| {
            ranges
                .iter()
                .any(|r| r.first.to_bits() <= a && a <= r.last.to_bits())
        };
        let hosts: Vec<u32> = (0..size)
            .map(|i| base + i)
            .filter(|a| len >= 31 || (*a != base && *a != base + size - 1))
            .collect();
        let allocatable: BTreeSet<u32> =
            hosts.iter().copied().filter(|a| !is_reserved(*a)).collect();
        let result = Pool::new(&PoolConfig {
            prefix,
            reserved: ranges.clone(),
        });
        let Ok(mut p) = result else {
            prop_assert!(allocatable.is_empty());
            return Ok(());
        };
        let mut taken = BTreeSet::new();
        for op in ops {
            match op {
                Op::Allocate => {
                    let want = allocatable.difference(&taken).next().copied();
                    let got = p.allocate().map(Ipv4Addr::to_bits);
                    prop_assert_eq!(got, want);
                    if let Some(a) = got {
                        prop_assert!(taken.insert(a), "handed out twice");
                    }
                }
                Op::Hold(off) | Op::Release(off)
                    if off >= size || !hosts.contains(&(base + off)) =>
                {
                    let a = Ipv4Addr::from_bits(base.wrapping_add(off));
                    let e = Err(PoolOpError::OutsidePool(a));
                    prop_assert_eq!(p.hold(a), e);
                    prop_assert_eq!(p.release(a), e);
                }
                Op::Hold(off) => {
                    let a = base + off;
                    let want = if is_reserved(a) {
                        Err(PoolOpError::Reserved(Ipv4Addr::from_bits(a)))
                    } else if taken.contains(&a) {
                        Err(PoolOpError::InUse(Ipv4Addr::from_bits(a)))
                    } else {
                        taken.insert(a);
                        Ok(())
                    };
                    prop_assert_eq!(p.hold(Ipv4Addr::from_bits(a)), want);
                }
                Op::Release(off) => {
                    let a = base + off;
                    let want = if is_reserved(a) {
                        Err(PoolOpError::Reserved(Ipv4Addr::from_bits(a)))
                    } else if taken.remove(&a) {
                        Ok(())
                    } else {
                        Err(PoolOpError::NotInUse(Ipv4Addr::from_bits(a)))
                    };
                    prop_assert_eq!(p.release(Ipv4Addr::from_bits(a)), want);
                }
            }
            prop_assert_eq!(p.in_use(), taken.len() as u64);
            prop_assert_eq!(p.capacity(), allocatable.len() as u64);
            // The free ranges are exactly the model's free set, merged.
            let free: Vec<u32> = p
                .free_ranges()
                .flat_map(|r| r.first.to_bits()..=r.last.to_bits())
                .collect();
            let model: Vec<u32> = allocatable.difference(&taken).copied().collect();
            prop_assert_eq!(free, model);
            let ranges: Vec<AddrRange> = p.free_ranges().collect();
            for w in ranges.windows(2) {
                prop_assert!(w[0].last.to_bits() + 1 < w[1].first.to_bits(), "not merged");
            }
        }
    }
}
