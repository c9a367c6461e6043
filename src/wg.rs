//! The WireGuard kind under its former path: a re-export of
//! [`crate::tunnel::wireguard`] and the seam's shared types, kept so that
//! the programs and integration tests build while they move to
//! [`crate::tunnel`].

pub use crate::tunnel::wireguard::*;
pub use crate::tunnel::{Decapsulated, Encapsulated, Error, Incoming, TunnelEvent, TunnelStats};
