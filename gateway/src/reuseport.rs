//! Steering of WireGuard datagrams to the worker that owns their peer: the
//! `SO_REUSEPORT` group and its classic BPF program live in the shared data
//! plane ([`vpnnat_dataplane::steering`]).

pub use vpnnat_dataplane::steering::attach;
