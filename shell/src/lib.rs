//! What the three vpnnat programs' IO shells share around the sans-IO core
//! (`vpnnat`), so that each program keeps only what is its own:
//!
//! - [`settings`]: one settings loader (the TOML file, then
//!   `VPNNAT_<SECTION>__<KEY>` environment overrides; the rules are
//!   [`vpnnat::config`]'s).
//! - [`keys`]: private files (0600, parents 0700) and WireGuard private-key files.
//! - [`metrics`]: the Prometheus text exposition writer.
//! - [`http`]: the HTTP client of the control-plane API, with typed errors.
//! - [`follow`]: the async driver of [`vpnnat::control::Follower`].
//! - [`logging`]: the log subscriber and the one-line exit on error.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod follow;
pub mod http;
pub mod keys;
pub mod logging;
pub mod metrics;
pub mod settings;
