//! What the three vpnnat programs' IO shells share around the sans-IO core
//! (`vpnnat`), so that each program keeps only what is its own:
//!
//! - [`settings`]: one settings loader (the TOML file, then
//!   `VPNNAT_<SECTION>__<KEY>` environment overrides; the rules are
//!   [`vpnnat::config`]'s).
//! - [`keys`]: private files (0600, parents 0700) and WireGuard private-key files.
//! - [`metrics`]: the Prometheus text exposition writer.
//! - [`http`]: the HTTP client of the control-plane API, with typed errors.
//! - [`cli`]: logging and the exit code of every program's `main`.
//! - [`follow`]: the async driver of [`vpnnat::control::Follower`].
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod cli;
pub mod follow;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod settings;
