//! What the workspace's tests (and `examples/demo.rs`) share instead of
//! copying it: the prerequisites a test needs from the machine and the CI
//! rule for a missing one ([`prereq`]), network namespaces joined by veth
//! pairs that clean up after themselves ([`netns`]), running the built
//! programs ([`process`]), echo checks through a namespace ([`echo`]), the
//! TLS-fallback tests' world of a site without UDP or behind a proxy
//! ([`fallback_world`]), the
//! end-to-end mission played by the real programs ([`mission`]), a handshake
//! flood while real agents rekey ([`handshake_flood`]), a strongSwan IPsec
//! peer in a namespace ([`strongswan`]); with the
//! `server` feature the maintenance server in-process ([`server`]), with the
//! `browser` feature headless Chromium over WebDriver ([`browser`]).
//!
//! Test code: a failure panics with what was expected (that is how a test
//! fails), so `unwrap` is fine here.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::print_stdout)]

pub mod agent_world;
#[cfg(feature = "browser")]
pub mod browser;
pub mod echo;
pub mod fallback_world;
pub mod handshake_flood;
pub mod mission;
pub mod netns;
pub mod prereq;
pub mod process;
#[cfg(feature = "server")]
pub mod server;
pub mod strongswan;

pub use netns::{Netns, temp_dir, unique, veth, wait_until};
pub use prereq::{Prereq, require};
pub use process::{bin, repo_path, run, run_with_input};

/// 32 random bytes from the kernel (a WireGuard key for a test).
pub fn rand_bytes() -> [u8; 32] {
    let mut b = [0u8; 32];
    let mut f = std::fs::File::open("/dev/urandom").unwrap();
    std::io::Read::read_exact(&mut f, &mut b).unwrap();
    b
}
