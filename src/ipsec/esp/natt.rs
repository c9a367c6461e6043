//! UDP encapsulation of ESP and IKE on port 4500 (RFC 3948 §2).
//!
//! Three kinds of datagram share the port, told apart by their first bytes:
//!
//! | first bytes | what | RFC 3948 |
//! | --- | --- | --- |
//! | the single byte `0xFF` | NAT keepalive, ignored | §2.3 |
//! | four zero bytes (the non-ESP marker) | an IKE message follows | §2.2 |
//! | a non-zero SPI | ESP | §2.1 |

/// The NAT keepalive: one byte `0xFF` (RFC 3948 §2.3).
pub const KEEPALIVE: [u8; 1] = [0xFF];

/// The non-ESP marker in front of an IKE message on port 4500: where an ESP
/// packet has its SPI, which is never 0 (RFC 3948 §2.2).
pub const NON_ESP_MARKER: [u8; 4] = [0; 4];

/// A datagram received on UDP 4500.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Udp4500<'a> {
    /// A NAT keepalive: nothing to do (it only refreshed the NAT's mapping).
    Keepalive,
    /// An IKE message (the marker stripped).
    Ike(&'a [u8]),
    /// An ESP packet (the whole datagram, starting with its SPI).
    Esp(&'a [u8]),
}

/// Neither a keepalive, nor a marked IKE message, nor ESP: shorter than an
/// SPI, or a lone marker with no IKE message after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed UDP-encapsulated datagram")]
pub struct Malformed;

/// Classifies a datagram received on UDP 4500 (RFC 3948 §2).
///
/// # Errors
/// [`Malformed`]: drop and count it.
pub fn classify(datagram: &[u8]) -> Result<Udp4500<'_>, Malformed> {
    match datagram {
        [0xFF] => Ok(Udp4500::Keepalive),
        [0, 0, 0, 0, ike @ ..] if !ike.is_empty() => Ok(Udp4500::Ike(ike)),
        [a, b, c, d, ..] if [*a, *b, *c, *d] != NON_ESP_MARKER => Ok(Udp4500::Esp(datagram)),
        _ => Err(Malformed),
    }
}

/// Writes `ike` behind the non-ESP marker into `out`, for sending on
/// UDP 4500. Returns the datagram's length.
///
/// # Errors
/// [`BufferTooSmall`] when `out` is shorter than `ike` plus the marker.
pub fn with_marker(ike: &[u8], out: &mut [u8]) -> Result<usize, BufferTooSmall> {
    let len = NON_ESP_MARKER.len() + ike.len();
    let out = out.get_mut(..len).ok_or(BufferTooSmall)?;
    let (marker, body) = out.split_at_mut(NON_ESP_MARKER.len());
    marker.copy_from_slice(&NON_ESP_MARKER);
    body.copy_from_slice(ike);
    Ok(len)
}

/// The caller's output buffer is too small.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("output buffer too small")]
pub struct BufferTooSmall;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_the_three_kinds() {
        assert_eq!(classify(&[0xFF]), Ok(Udp4500::Keepalive));
        let ike = [0u8, 0, 0, 0, 0x11, 0x22, 0x33];
        assert_eq!(classify(&ike), Ok(Udp4500::Ike(&[0x11, 0x22, 0x33])));
        let esp = [0u8, 0, 1, 0, 0, 0, 0, 1, 0xAA];
        assert_eq!(classify(&esp), Ok(Udp4500::Esp(&esp)));
        // A zero byte anywhere but all four SPI bytes is still an SPI.
        let esp = [0u8, 0, 0, 1];
        assert_eq!(classify(&esp), Ok(Udp4500::Esp(&esp)));
    }

    #[test]
    fn malformed_datagrams_are_refused() {
        for d in [
            &[][..],
            &[0xFE],
            &[0xFF, 0xFF],
            &[1, 2, 3],
            &[0, 0, 0, 0],
            &[0, 0, 0],
        ] {
            assert_eq!(classify(d), Err(Malformed), "{d:?}");
        }
    }

    #[test]
    fn marker_round_trips_an_ike_message() {
        let ike = [0x5au8; 28];
        let mut out = [0xa5u8; 40];
        let n = with_marker(&ike, &mut out).unwrap();
        assert_eq!(n, 32);
        assert_eq!(&out[..4], &[0, 0, 0, 0]);
        assert_eq!(classify(&out[..n]), Ok(Udp4500::Ike(&ike)));
        assert_eq!(with_marker(&ike, &mut out[..31]), Err(BufferTooSmall));
        assert_eq!(classify(&KEEPALIVE), Ok(Udp4500::Keepalive));
    }
}
