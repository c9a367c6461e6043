//! vpnnat maintenance-server: the control plane.
//!
//! It owns the database (SQLite or PostgreSQL, [`db`]), the HTTP API for
//! operators, router agents, gateways and technicians ([`routes`],
//! [`handlers`], credentials checked by [`auth`] with the primitives of
//! [`secrets`], errors answered by [`error`]), the
//! desired-state long-polls and their wake-ups ([`notify`]), gateway
//! selection, failover and lease expiry ([`tasks`], [`db::ops`]) and the
//! technician console ([`console`]); [`swanctl`] writes the strongSwan
//! configuration of a hand-configured IPsec site; [`webhooks`] delivers the
//! signed notifications for the provider's ticketing system. [`server`] starts it all around the
//! shared [`state`]; the binary (`main.rs`) is the CLI around
//! [`launch_with_listener`].
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod auth;
pub mod console;
pub mod db;
pub mod error;
pub mod handlers;
pub mod metrics;
pub mod notify;
pub mod openapi;
pub mod routes;
pub mod secrets;
pub mod server;
pub mod settings;
pub mod state;
pub mod swanctl;
pub mod tasks;
pub mod tls;
pub mod webhooks;
pub mod wgquick;

pub use server::{launch_with_listener, open_database, operator_token};
pub use state::{AppState, Inner, PeerAddr, RateLimiter};
