//! The control-plane protocol: the JSON documents that the maintenance server,
//! the gateways and the router agents exchange over HTTP(S).
//!
//! These types are the single definition of the API contract; the server
//! generates its OpenAPI document from them and the gateway and the agent
//! deserialize exactly these. The HTTP routes are listed in [`paths`].
//!
//! Control is declarative (docs/DESIGN.md, "Control plane"): gateways and
//! agents pull a versioned desired-state document ([`GatewayDesiredState`],
//! [`AgentDesiredState`]) over a long-poll (`GET …/state?after=VERSION`,
//! answered as soon as the version exceeds `after`, or with the current
//! document when the wait times out), reconcile to it, and report what they
//! applied ([`AppliedState`]).
//!
//! The files follow the parties: [`paths`] (the routes), `common` (ids,
//! keys, terminal names, errors), `enrollment`, `operator`, `gateway`,
//! `agent` (its desired state, requests and failure reports), `ipsec`
//! (the parameters of IPsec sites) and `technician`; everything is
//! re-exported here.
//!
//! Times on the wire are milliseconds since the Unix epoch ([`UnixMillis`]).
//! Keys are standard base64, as `wg` prints them.

pub mod paths;

mod agent;
mod agentless;
mod common;
mod enrollment;
mod gateway;
mod ipsec;
mod operator;
mod rotation;
mod teams;
mod technician;

pub use agent::*;
pub use agentless::*;
pub use common::*;
pub use enrollment::*;
pub use gateway::*;
pub use ipsec::*;
pub use operator::*;
pub use rotation::*;
pub use teams::*;
pub use technician::*;

#[cfg(test)]
mod tests;
