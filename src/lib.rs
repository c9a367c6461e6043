//! Sans-IO core of vpnnat.
//!
//! This crate holds everything that decides what happens to a packet or a
//! control-plane message, and nothing that performs IO: no sockets, no files,
//! no async runtime, no clock. Time comes in as a `now` parameter, randomness
//! as a seed, and outputs are drained by the caller (`poll_*`). The three
//! programs (`gateway`, `router-agent`, `maintenance-server`) are the thin IO
//! shells around it.
//!
//! - [`messages`]: the control-plane protocol shared by all three programs.
//! - [`backoff`]: reconnection delays for the control-plane clients.
//! - [`control`]: the desired-state follower the gateway and the agent drive.
//! - [`config`]: layering of TOML text and `VPNNAT_*` overrides into typed settings.
//! - [`ipv4`]: the IPv4 vocabulary: prefixes, a checked header view, a fast hasher.
//! - [`nat`]: the 1:1 static NAT (NAT address ↔ real LAN address), in-place IPv4
//!   rewriting with incremental checksums, optional masquerade.
//! - [`pool`]: the VPN-NAT address pool (allocation over any IPv4 prefix, reserved ranges).
//! - [`gateway`]: the gateway's sans-IO packet logic (many peers, one socket, NAT-address routing).
//! - [`agent`]: the router agent's sans-IO state (tunnel to its gateway, consent, 1:1 NAT).
//! - [`ipsec`]: IPsec: the IKEv2 engine.
//! - [`tunnel`]: the tunnel seam the packet logic talks to, and its kinds (WireGuard).
//! - [`ipsec`]: ESP in UDP (RFC 4303, RFC 4106, RFC 3948) for the IPsec tunnel kind.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod agent;
pub mod backoff;
pub mod config;
pub mod control;
mod drops;
pub mod gateway;
pub mod ipsec;
pub mod ipv4;
pub mod messages;
pub mod nat;
pub mod pool;
pub mod tunnel;
