//! The control plane's sans-IO side: the desired-state follower that the
//! gateway and the router agent drive (docs/DESIGN.md, "Control plane").
//!
//! The programs make the HTTP calls and apply documents to their data
//! planes; everything that decides *which* call comes next, *when*, and what
//! a reply means (the cursor, stale replies, backoff, registering again,
//! reporting what was applied) is here, once, and tested without a network.

mod follower;
mod lease;
#[cfg(test)]
mod tests;

pub use follower::{
    Call, CallFailure, DesiredDocument, Follower, FollowerConfig, FollowerEvent, Lane,
    RETRY_INITIAL, RETRY_MAX, Reply, Request, Ticket,
};
pub use lease::{Lease, LeaseAction};
