//! Drop reasons and their counters, one definition for every packet path
//! (the NAT, the agent, the gateway): a malformed or refused packet is never
//! a panic, it is dropped and counted by a reason that is also its metrics
//! label.

/// Defines, in the calling module, `enum DropReason` (with `ALL` in counter
/// order and `as_str`, the metrics label), `N_REASONS`, and `DropCounters`
/// (one `u64` per reason, no allocation, `add` private to the module).
///
/// ```text
/// drop_reasons! {
///     /// Why the NAT refused a packet.
///     enum DropReason;
///     /// Shorter than its headers.
///     Truncated = "truncated",
/// }
/// ```
macro_rules! drop_reasons {
    (
        $(#[$enum_meta:meta])*
        enum DropReason;
        $($(#[$m:meta])* $name:ident = $label:literal,)*
    ) => {
        $(#[$enum_meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum DropReason { $($(#[$m])* $name,)* }

        impl DropReason {
            /// Every reason, in counter order.
            pub const ALL: &'static [DropReason] = &[$(DropReason::$name,)*];
            /// The metrics label.
            pub fn as_str(self) -> &'static str {
                match self { $(DropReason::$name => $label,)* }
            }
        }

        const N_REASONS: usize = DropReason::ALL.len();

        /// Drop counters by reason.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct DropCounters([u64; N_REASONS]);

        impl Default for DropCounters {
            fn default() -> Self {
                Self([0; N_REASONS])
            }
        }

        impl DropCounters {
            /// The count for `reason`.
            pub fn get(&self, reason: DropReason) -> u64 {
                self.0[reason as usize]
            }

            /// `(reason, count)` for every reason, in a fixed order.
            pub fn iter(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
                DropReason::ALL.iter().map(|r| (*r, self.0[*r as usize]))
            }

            /// The sum over all reasons.
            pub fn total(&self) -> u64 {
                self.0.iter().sum()
            }

            fn add(&mut self, reason: DropReason) {
                self.0[reason as usize] += 1;
            }

            /// Adds `other` into `self` (aggregating shards or workers).
            pub fn merge(&mut self, other: &DropCounters) {
                for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
                    *a += b;
                }
            }
        }
    };
}

pub(crate) use drop_reasons;

/// `From<tunnel::Error>` for a role's `DropReason`, whose set must name
/// every tunnel error: a tunnel's refusal is counted under the same name in
/// the gateway and the agent.
macro_rules! from_tunnel_errors {
    ($reason:ident) => {
        impl From<$crate::tunnel::Error> for $reason {
            fn from(e: $crate::tunnel::Error) -> Self {
                use $crate::tunnel::Error as E;
                match e {
                    E::BufferTooSmall => Self::BufferTooSmall,
                    E::Malformed => Self::Malformed,
                    E::InvalidMac => Self::InvalidMac,
                    E::AuthenticationFailed => Self::AuthenticationFailed,
                    E::Replay => Self::Replay,
                    E::NoSession => Self::NoSession,
                    E::UnderLoad => Self::UnderLoad,
                    E::RateLimited => Self::RateLimited,
                    E::UnknownPeer => Self::UnknownPeer,
                    E::OutsideSelectors => Self::OutsideSelectors,
                }
            }
        }
    };
}
pub(crate) use from_tunnel_errors;
