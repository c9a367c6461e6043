//! The SPI layout of the gateway's inbound SAs: the peer's 24-bit tunnel
//! index in the low bits, so the data fast path finds the peer (and its
//! worker) from the first four bytes of a datagram without any lookup or
//! crypto.
//!
//! ```text
//!  31       24 23                                   0
//! +-----------+--------------------------------------+
//! |  random   |            tunnel index              |
//! |  1..=255  |             (24 bits)                |
//! +-----------+--------------------------------------+
//! ```
//!
//! The high byte is never 0, so an SPI is never in the reserved range 0–255
//! (RFC 4303 §2.1) whatever the index, and index 0 is usable. It is drawn
//! at random for each SA so that the old and the new inbound SA of one peer
//! (both alive during a rekey, RFC 7296 §2.8) have different SPIs; the
//! caller draws again if it happens to equal the current one.

use super::HEADER_LEN;

/// The largest tunnel index: 24 bits, as the gateway hands them out.
pub const MAX_INDEX: u32 = (1 << 24) - 1;

/// The SPI for the tunnel `index` (at most 24 bits; higher bits are
/// ignored) with its high byte derived from `random`.
pub fn spi_from_index(index: u32, random: u32) -> u32 {
    // 1..=255, close to uniform for a uniform `random`.
    let high = random % 255 + 1;
    (high << 24) | (index & MAX_INDEX)
}

/// The tunnel index in an SPI made by [`spi_from_index`]; `None` for an SPI
/// that is not of that layout (high byte 0, which includes the reserved
/// SPIs 0–255).
pub fn index_from_spi(spi: u32) -> Option<u32> {
    (spi >> 24 != 0).then_some(spi & MAX_INDEX)
}

/// The SPI of a datagram received on UDP 4500 that is long enough to be ESP
/// (RFC 3948 §2.1), the fast-path peek: `None` for a keepalive, a marked
/// IKE message (SPI 0, RFC 3948 §2.2) or anything too short.
pub fn esp_spi(datagram: &[u8]) -> Option<u32> {
    if datagram.len() < HEADER_LEN {
        return None;
    }
    let spi = u32::from_be_bytes([datagram[0], datagram[1], datagram[2], datagram[3]]);
    (spi != 0).then_some(spi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_width_is_the_gateways() {
        use crate::tunnel::{Builtin, Kinds};
        assert_eq!(MAX_INDEX, <Builtin as Kinds>::MAX_INDEX);
    }

    #[test]
    fn index_round_trips_and_spi_avoids_the_reserved_range() {
        for index in [0, 1, 42, 0x0F_FFFF, MAX_INDEX] {
            for random in [0, 1, 254, 255, 256, 0xDEAD_BEEF, u32::MAX] {
                let spi = spi_from_index(index, random);
                assert!(spi > 255, "index {index} random {random}: {spi:#x}");
                assert_eq!(index_from_spi(spi), Some(index));
            }
        }
        // Different random values give different SPIs for one index.
        assert_ne!(spi_from_index(7, 0), spi_from_index(7, 1));
        assert_eq!(spi_from_index(7, 0) >> 24, 1);
        assert_eq!(spi_from_index(7, 254) >> 24, 255);
        assert_eq!(index_from_spi(0x00FF_FFFF), None);
        assert_eq!(index_from_spi(200), None);
        assert_eq!(index_from_spi(0), None);
    }

    #[test]
    fn esp_spi_peeks_esp_only() {
        let mut d = [0u8; HEADER_LEN];
        assert_eq!(esp_spi(&d), None, "a marked IKE message");
        d[..4].copy_from_slice(&0x0100_002Au32.to_be_bytes());
        assert_eq!(esp_spi(&d), Some(0x0100_002A));
        assert_eq!(esp_spi(&d[..HEADER_LEN - 1]), None);
        assert_eq!(esp_spi(&[0xFF]), None, "a keepalive");
    }
}
