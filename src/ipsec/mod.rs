//! IPsec, the second tunnel kind: IKEv2 (RFC 7296) negotiates the keys of
//! ESP security associations.
//!
//! - [`ike`]: the IKEv2 engine, sans-IO: its codec, its cryptography and
//!   the state machine of one IKE SA with one CHILD_SA.
pub mod ike;
