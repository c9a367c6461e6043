//! The agent's packet-mode NAT: the core's [`crate::nat::StaticNat`] behind
//! the [`PacketNat`] seam, with its drop reasons folded into the agent's.

use std::net::Ipv4Addr;
use std::time::Instant;

pub use crate::nat::{InsertError, NatConfig, StaticNat as AgentNat};

use super::{DropReason, PacketNat};
use crate::nat::{self, StaticNat};

impl From<nat::DropReason> for DropReason {
    fn from(r: nat::DropReason) -> Self {
        match r {
            nat::DropReason::Empty => Self::Malformed,
            nat::DropReason::NotIpv4 => Self::NotIpv4,
            nat::DropReason::BadHeader | nat::DropReason::Truncated => Self::BadHeader,
            nat::DropReason::NotMapped => Self::NotMapped,
            nat::DropReason::Expired => Self::Expired,
            nat::DropReason::UnmappedSource => Self::UnmappedSource,
            nat::DropReason::Unsupported => Self::Unsupported,
            nat::DropReason::TableFull => Self::MasqueradeFull,
        }
    }
}

impl PacketNat for StaticNat {
    fn insert(
        &mut self,
        nat: Ipv4Addr,
        real: Ipv4Addr,
        expires_at: Option<Instant>,
    ) -> Result<(), String> {
        StaticNat::insert(self, nat, real, expires_at).map_err(|e| e.to_string())
    }

    fn remove(&mut self, nat: Ipv4Addr) -> bool {
        StaticNat::remove(self, nat).is_some()
    }

    fn translate_inbound(&mut self, packet: &mut [u8], now: Instant) -> Result<(), DropReason> {
        StaticNat::translate_inbound(self, packet, now)
            .into_result()
            .map_err(DropReason::from)
    }

    fn translate_outbound(&mut self, packet: &mut [u8], now: Instant) -> Result<(), DropReason> {
        StaticNat::translate_outbound(self, packet, now)
            .into_result()
            .map_err(DropReason::from)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        StaticNat::poll_timeout(self)
    }

    fn handle_timeout(&mut self, now: Instant) {
        StaticNat::handle_timeout(self, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seam_maps_core_reasons_onto_the_agents() {
        let now = Instant::now();
        let mut n: Box<dyn PacketNat> = Box::new(AgentNat::new(NatConfig::default()));
        n.insert(
            Ipv4Addr::new(10, 64, 0, 5),
            Ipv4Addr::new(192, 168, 1, 10),
            None,
        )
        .unwrap();
        assert!(
            n.insert(
                Ipv4Addr::new(10, 64, 0, 6),
                Ipv4Addr::new(192, 168, 1, 10),
                None
            )
            .unwrap_err()
            .contains("10.64.0.5")
        );
        assert_eq!(
            n.translate_inbound(&mut [], now),
            Err(DropReason::Malformed)
        );
        assert_eq!(
            n.translate_inbound(&mut [0x45; 10], now),
            Err(DropReason::BadHeader)
        );
        assert_eq!(
            n.translate_outbound(&mut [0x60; 40], now),
            Err(DropReason::NotIpv4)
        );
        assert!(n.remove(Ipv4Addr::new(10, 64, 0, 5)));
        assert!(!n.remove(Ipv4Addr::new(10, 64, 0, 5)));
        for r in nat::DropReason::ALL {
            assert!(DropReason::ALL.contains(&DropReason::from(*r)));
        }
    }
}
