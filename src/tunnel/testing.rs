//! What the gateway's and the agent's state tests need to run once per
//! tunnel kind: a peer's client for each kind set, and [`for_each_kind!`],
//! which instantiates generic test functions for [`Builtin`] (WireGuard,
//! against a plain boringtun client) and for the test-only [`Null`] kind.

use std::net::SocketAddr;
use std::time::Instant;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;

use super::null::{Null, NullTunnel};
use crate::messages::{AgentTunnel, GatewayId};

use super::{Builtin, Decapsulated, Encapsulated, Kinds, PrivateKey, Tunnel, TunnelKind};

/// The far end of a tunnel as a site's client would run it.
pub(crate) trait TestClient {
    /// A client with the private key `[seed; 32]` and index `seed`, dialling
    /// the holder of `server`.
    fn new(seed: u8, server: &PrivateKey) -> Self;
    /// A handshake initiation (`force`: even if one is in progress).
    fn initiation(&mut self, force: bool) -> Vec<u8>;
    /// The datagram carrying `packet` (after a handshake).
    fn send(&mut self, packet: &[u8]) -> Vec<u8>;
    /// An inner packet (`Ok(Some)`), a message consumed (`Ok(None)`), or a
    /// rejected datagram (`Err`).
    fn try_receive(&mut self, datagram: &[u8]) -> Result<Option<Vec<u8>>, String>;
    /// The reply to a handshake response (the confirming keepalive).
    fn answer(&mut self, datagram: &[u8]) -> Vec<u8>;

    /// [`Self::try_receive`] that must not be rejected.
    fn receive(&mut self, datagram: &[u8]) -> Option<Vec<u8>> {
        match self.try_receive(datagram) {
            Ok(p) => p,
            Err(e) => panic!("client could not receive: {e}"),
        }
    }
}

/// A kind set the state tests run with.
pub(crate) trait TestKinds: Kinds {
    /// Its client.
    type Client: TestClient;
}

/// A customer's standard WireGuard client: a plain boringtun `Tunn`.
pub(crate) struct BoringtunClient(Tunn);

impl TestClient for BoringtunClient {
    fn new(seed: u8, server: &PrivateKey) -> Self {
        let server_public = x25519::PublicKey::from(server.public_key().0);
        Self(Tunn::new(
            x25519::StaticSecret::from([seed; 32]),
            server_public,
            None,
            Some(25),
            u32::from(seed),
            None,
        ))
    }

    fn initiation(&mut self, force: bool) -> Vec<u8> {
        let mut buf = vec![0; 256];
        match self.0.format_handshake_initiation(&mut buf, force) {
            TunnResult::WriteToNetwork(init) => init.to_vec(),
            other => panic!("no initiation: {other:?}"),
        }
    }

    fn send(&mut self, packet: &[u8]) -> Vec<u8> {
        let mut buf = vec![0; packet.len() + 200];
        match self.0.encapsulate(packet, &mut buf) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("client could not send: {other:?}"),
        }
    }

    fn try_receive(&mut self, datagram: &[u8]) -> Result<Option<Vec<u8>>, String> {
        let mut buf = vec![0; datagram.len() + 200];
        match self.0.decapsulate(None, datagram, &mut buf) {
            TunnResult::WriteToTunnelV4(p, _) => Ok(Some(p.to_vec())),
            TunnResult::Done => Ok(None),
            TunnResult::Err(e) => Err(format!("{e:?}")),
            other => panic!("unexpected: {other:?}"),
        }
    }

    fn answer(&mut self, datagram: &[u8]) -> Vec<u8> {
        let mut out = vec![0; 256];
        match self.0.decapsulate(None, datagram, &mut out) {
            TunnResult::WriteToNetwork(keepalive) => keepalive.to_vec(),
            other => panic!("client rejected the response: {other:?}"),
        }
    }
}

impl TestKinds for Builtin {
    type Client = BoringtunClient;
}

impl TestKinds for super::BuiltinIpsec {
    type Client = BoringtunClient;
}

/// The null kind's client: the core's own null tunnel as initiator.
pub(crate) struct NullClient(NullTunnel);

impl TestClient for NullClient {
    fn new(seed: u8, server: &PrivateKey) -> Self {
        Self(
            Null::initiator(
                &AgentTunnel {
                    gateway_id: GatewayId(1),
                    kind: TunnelKind::Wireguard,
                    endpoint: SocketAddr::from(([192, 0, 2, 1], 51820)),
                    public_key: server.public_key(),
                    persistent_keepalive_s: 25,
                    ipsec: None,
                    tls: None,
                },
                PrivateKey::from_bytes([seed; 32]),
                u32::from(seed),
                Instant::now(),
            )
            .expect("the null kind runs WireGuard"),
        )
    }

    fn initiation(&mut self, force: bool) -> Vec<u8> {
        let mut buf = vec![0; 256];
        match self.0.initiate_handshake(&mut buf, force, Instant::now()) {
            Ok(Some(init)) => init.to_vec(),
            other => panic!("no initiation: {other:?}"),
        }
    }

    fn send(&mut self, packet: &[u8]) -> Vec<u8> {
        let mut buf = vec![0; Null::buffer_len(packet.len())];
        match self.0.encapsulate(packet, &mut buf, Instant::now()) {
            Ok(Encapsulated::Network(d)) => d.to_vec(),
            other => panic!("client could not send: {other:?}"),
        }
    }

    fn try_receive(&mut self, datagram: &[u8]) -> Result<Option<Vec<u8>>, String> {
        let mut buf = vec![0; Null::buffer_len(datagram.len())];
        match self.0.decapsulate(None, datagram, &mut buf, Instant::now()) {
            Ok(Decapsulated::Tunnel(p)) => Ok(Some(p.to_vec())),
            Ok(Decapsulated::Nothing) => Ok(None),
            Ok(Decapsulated::Network(d)) => panic!("unexpected reply {d:?}"),
            Err(e) => Err(e.to_string()),
        }
    }

    fn answer(&mut self, datagram: &[u8]) -> Vec<u8> {
        let mut buf = vec![0; Null::buffer_len(datagram.len())];
        match self.0.decapsulate(None, datagram, &mut buf, Instant::now()) {
            Ok(Decapsulated::Network(keepalive)) => keepalive.to_vec(),
            other => panic!("client rejected the response: {other:?}"),
        }
    }
}

impl TestKinds for Null {
    type Client = NullClient;
}

/// Runs each generic test function `f::<K>()` as a `#[test]` once for the
/// WireGuard kind ([`Builtin`], module `wireguard`) and once for the null
/// kind (module `null`).
macro_rules! for_each_kind {
    ($($test:ident),* $(,)?) => {
        mod wireguard {
            $(
                #[test]
                fn $test() {
                    super::$test::<$crate::tunnel::Builtin>();
                }
            )*
        }
        mod null {
            $(
                #[test]
                fn $test() {
                    super::$test::<$crate::tunnel::null::Null>();
                }
            )*
        }
    };
}
pub(crate) use for_each_kind;
