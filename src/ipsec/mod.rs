//! IPsec, the second tunnel kind: IKEv2 (RFC 7296) negotiates the keys of
//! ESP security associations that carry the data in UDP (RFC 4303 with
//! AES-GCM-256, RFC 4106; UDP encapsulation, RFC 3948). Sans-IO like the
//! rest of the core: the data plane passes buffers in and sends what comes
//! out.
//!
//! - [`ike`]: the IKEv2 engine: its codec, its cryptography and the state
//!   machine of one IKE SA with one CHILD_SA.
//! - [`esp`]: ESP security associations, the anti-replay window and the
//!   port-4500 framing.
pub mod esp;
pub mod ike;
