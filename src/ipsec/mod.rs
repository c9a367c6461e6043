//! IPsec, the second tunnel kind: ESP in UDP for the data (RFC 4303 with
//! AES-GCM-256, RFC 4106; UDP encapsulation, RFC 3948), keyed by IKEv2
//! (RFC 7296). Sans-IO like the rest of the core: the data plane passes
//! buffers in and sends what comes out.

pub mod esp;
