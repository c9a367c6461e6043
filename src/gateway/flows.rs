//! The gateway's flow table: only the center opens connections.
//!
//! A flow is started by a packet from the center side (a technician) to a
//! NAT address that is open: a TCP segment, a UDP datagram, an ICMP echo
//! request, or a packet of another IP protocol. A packet from a site passes
//! only as part of such a flow: a TCP or UDP packet whose addresses and ports
//! are the flow's reversed, an ICMP echo reply with the flow's identifier, an
//! ICMP error whose quoted header is a flow's packet (RFC 792: the quote holds
//! the IP header and the first 8 bytes of the datagram, enough for ports and
//! the echo identifier), or a later fragment of a datagram whose first
//! fragment passed. A site's packet never creates an entry.
//!
//! Any center packet of a flow (re)creates its entry, not only a TCP SYN:
//! a session that moves to another gateway (failover) or outlives a
//! gateway restart continues with the technician's next packet, as in a
//! stateless gateway. The price is that a site's packet that arrives before
//! it (e.g. output of an idle session right after a failover) is dropped
//! until the technician's side sends; TCP retransmits it.
//!
//! The table is bounded: a center packet that needs a new entry while the
//! table is full (after expired entries were swept, at most once a second)
//! is refused and counted; existing flows are never evicted for new ones.
//! Entries expire after a per-protocol idle time, driven by the `now` the
//! gateway receives (swept every [`SWEEP_INTERVAL_S`] by
//! [`FlowTable::handle_timeout`], and checked on every lookup).
//!
//! Per packet: a few header reads, one hash lookup with
//! [`crate::ipv4::FastHasher`] over two words, no allocation (the map
//! grows amortised until its bound).

use std::hash::{Hash, Hasher};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::DropReason;
use crate::ipv4::{FastMap, FixedHeader, Ipv4Header, PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use crate::messages::SiteId;

/// How often expired entries are swept, in seconds.
pub const SWEEP_INTERVAL_S: u32 = 1;
/// Idle time of a TCP flow the site has not answered yet, or after a FIN or
/// RST was seen (enough for the last ACKs and retransmissions).
pub const TCP_TRANSITORY_IDLE: Duration = Duration::from_secs(60);
/// Idle time of a fragment allowance: a site's later fragments pass this
/// long after their first fragment did (Linux's reassembly timeout).
pub const FRAGMENT_IDLE: Duration = Duration::from_secs(30);
/// Fragment allowances per table; beyond it later fragments are dropped.
pub const MAX_FRAGMENTS: usize = 4096;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;

/// Bounds and idle times of a [`FlowTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowLimits {
    /// The most flows at once; a new flow beyond it is refused.
    pub max_flows: usize,
    /// Idle time of an established TCP flow (the site has answered).
    pub tcp_idle: Duration,
    /// Idle time of a UDP flow, and of a flow of another IP protocol.
    pub udp_idle: Duration,
    /// Idle time of an ICMP echo flow.
    pub icmp_idle: Duration,
}

impl Default for FlowLimits {
    /// 65 536 flows; TCP 2 h, UDP and other protocols 120 s, ICMP echo 30 s
    /// (in the range of Linux conntrack's, shorter for TCP: a flow that
    /// expired comes back with the technician's next packet).
    fn default() -> Self {
        Self {
            max_flows: 65_536,
            tcp_idle: Duration::from_secs(2 * 3600),
            udp_idle: Duration::from_secs(120),
            icmp_idle: Duration::from_secs(30),
        }
    }
}

/// A flow as seen from the center: technician address and port, NAT address
/// and port, protocol. Ports are 0 for protocols without; an ICMP echo flow
/// has the identifier as the technician's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlowKey {
    /// Technician address (high half) and NAT address (low half).
    addrs: u64,
    /// Technician port, NAT port, protocol.
    rest: u64,
}

impl FlowKey {
    fn new(center: Ipv4Addr, nat: Ipv4Addr, center_port: u16, nat_port: u16, proto: u8) -> Self {
        Self {
            addrs: (u64::from(center.to_bits()) << 32) | u64::from(nat.to_bits()),
            rest: (u64::from(center_port) << 24) | (u64::from(nat_port) << 8) | u64::from(proto),
        }
    }

    fn nat(&self) -> Ipv4Addr {
        Ipv4Addr::from_bits(self.addrs as u32)
    }
}

impl Hash for FlowKey {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.addrs);
        state.write_u64(self.rest);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TcpState {
    /// Seen from the center only.
    Opening,
    /// The site has answered.
    Established,
    /// A FIN or RST was seen.
    Closing,
}

#[derive(Debug, Clone, Copy)]
struct Flow {
    site: SiteId,
    /// Seconds since the table's epoch at which it expires.
    expires: u32,
    tcp: TcpState,
}

/// What the ports and flags of a packet say, read once.
#[derive(Debug, Clone, Copy)]
enum Transport {
    Tcp { src: u16, dst: u16, flags: u8 },
    Udp { src: u16, dst: u16 },
    Icmp { kind: u8, id: u16 },
    Other,
}

/// The transport header of a first fragment or whole packet.
fn transport(proto: u8, payload: &[u8]) -> Result<Transport, DropReason> {
    let port = |i: usize| u16::from_be_bytes([payload[i], payload[i + 1]]);
    match proto {
        PROTO_TCP if payload.len() >= 14 => Ok(Transport::Tcp {
            src: port(0),
            dst: port(2),
            flags: payload[13],
        }),
        PROTO_UDP if payload.len() >= 8 => Ok(Transport::Udp {
            src: port(0),
            dst: port(2),
        }),
        PROTO_ICMP if payload.len() >= 8 => Ok(Transport::Icmp {
            kind: payload[0],
            id: port(4),
        }),
        PROTO_TCP | PROTO_UDP | PROTO_ICMP => Err(DropReason::Malformed),
        _ => Ok(Transport::Other),
    }
}

/// ICMP types that report an error about a datagram (RFC 792, RFC 1812):
/// destination unreachable, source quench, redirect, time exceeded,
/// parameter problem.
fn is_icmp_error(kind: u8) -> bool {
    matches!(kind, 3 | 4 | 5 | 11 | 12)
}

/// The flows of one gateway core (one shard). See the module docs.
#[derive(Debug)]
pub struct FlowTable {
    limits: FlowLimits,
    flows: FastMap<FlowKey, Flow>,
    /// Later fragments of the sites' datagrams that may pass: keyed by the
    /// datagram's technician and NAT address, IP identification (as the
    /// technician's port) and protocol.
    fragments: FastMap<FlowKey, Flow>,
    epoch: Instant,
    next_sweep: u32,
    /// When a full table was last swept outside the timer.
    swept_when_full: Option<u32>,
    idle_s: [u32; 5],
}

/// Indices into `FlowTable::idle_s`.
const IDLE_TCP: usize = 0;
const IDLE_TRANSITORY: usize = 1;
const IDLE_UDP: usize = 2;
const IDLE_ICMP: usize = 3;
const IDLE_FRAGMENT: usize = 4;

fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX).max(1)
}

impl FlowTable {
    /// An empty table; `now` is its epoch.
    pub fn new(limits: FlowLimits, now: Instant) -> Self {
        Self {
            limits,
            flows: FastMap::default(),
            fragments: FastMap::default(),
            epoch: now,
            next_sweep: SWEEP_INTERVAL_S,
            swept_when_full: None,
            idle_s: [
                secs(limits.tcp_idle),
                secs(TCP_TRANSITORY_IDLE),
                secs(limits.udp_idle),
                secs(limits.icmp_idle),
                secs(FRAGMENT_IDLE),
            ],
        }
    }

    /// Flows in the table (expired ones until they are swept).
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether there is no flow.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    #[inline]
    fn seconds(&self, now: Instant) -> u32 {
        u32::try_from(now.saturating_duration_since(self.epoch).as_secs()).unwrap_or(u32::MAX)
    }

    fn expiry(&self, now_s: u32, idle: usize) -> u32 {
        now_s.saturating_add(self.idle_s[idle])
    }

    /// A center → site packet: its source is a technician's and its
    /// destination a NAT address of `site` that is open (both checked by the
    /// caller). Creates or refreshes its flow.
    ///
    /// # Errors
    /// [`DropReason::FlowTableFull`] when a new flow finds no room,
    /// [`DropReason::Malformed`] for a truncated transport header.
    pub fn center_to_site(
        &mut self,
        h: &Ipv4Header<'_>,
        site: SiteId,
        now: Instant,
    ) -> Result<(), DropReason> {
        if h.is_later_fragment() {
            // Nothing can be started with it; its first fragment did or did not.
            return Ok(());
        }
        let now_s = self.seconds(now);
        let idle_s = self.idle_s;
        let (tech, nat) = (h.src(), h.dst());
        let (key, idle, tcp) = match transport(h.protocol(), h.payload())? {
            Transport::Tcp { src, dst, flags } => {
                let key = FlowKey::new(tech, nat, src, dst, PROTO_TCP);
                if let Some(f) = self.live_mut(&key, site, now_s) {
                    if flags & TCP_SYN != 0 && flags & TCP_ACK == 0 {
                        // A new connection on the same ports.
                        f.tcp = TcpState::Opening;
                    } else if flags & (TCP_FIN | TCP_RST) != 0 {
                        f.tcp = TcpState::Closing;
                    }
                    let idle = match f.tcp {
                        TcpState::Established => IDLE_TCP,
                        TcpState::Opening | TcpState::Closing => IDLE_TRANSITORY,
                    };
                    f.expires = now_s.saturating_add(idle_s[idle]);
                    return Ok(());
                }
                if flags & TCP_RST != 0 {
                    // Ends what the site no longer has; nothing to track.
                    return Ok(());
                }
                let state = if flags & TCP_FIN != 0 {
                    TcpState::Closing
                } else {
                    TcpState::Opening
                };
                (key, IDLE_TRANSITORY, state)
            }
            Transport::Udp { src, dst } => (
                FlowKey::new(tech, nat, src, dst, PROTO_UDP),
                IDLE_UDP,
                TcpState::Established,
            ),
            Transport::Icmp { kind, id } if kind == ICMP_ECHO_REQUEST => (
                FlowKey::new(tech, nat, id, 0, PROTO_ICMP),
                IDLE_ICMP,
                TcpState::Established,
            ),
            // Errors and other ICMP messages from the center open nothing
            // the site could answer.
            Transport::Icmp { .. } => return Ok(()),
            Transport::Other => (
                FlowKey::new(tech, nat, 0, 0, h.protocol()),
                IDLE_UDP,
                TcpState::Established,
            ),
        };
        let expires = self.expiry(now_s, idle);
        if let Some(f) = self.live_mut(&key, site, now_s) {
            f.expires = expires;
            return Ok(());
        }
        if self.flows.len() >= self.limits.max_flows && !self.flows.contains_key(&key) {
            self.sweep_when_full(now_s);
            if self.flows.len() >= self.limits.max_flows {
                return Err(DropReason::FlowTableFull);
            }
        }
        self.flows.insert(key, Flow { site, expires, tcp });
        Ok(())
    }

    /// A site → center packet from a NAT address of `site` (checked by the
    /// caller): passes only as part of a flow, which it refreshes.
    ///
    /// # Errors
    /// [`DropReason::SiteInitiated`] for a packet that would start a
    /// connection (TCP SYN without ACK, ICMP echo request),
    /// [`DropReason::NoFlow`] for any other packet outside a flow,
    /// [`DropReason::Malformed`] for a truncated transport header.
    pub fn site_to_center(
        &mut self,
        h: &Ipv4Header<'_>,
        site: SiteId,
        now: Instant,
    ) -> Result<(), DropReason> {
        let now_s = self.seconds(now);
        let (nat, tech) = (h.src(), h.dst());
        let fixed = h.fixed().bytes();
        let ip_id = u16::from_be_bytes([fixed[4], fixed[5]]);
        if h.is_later_fragment() {
            let key = FlowKey::new(tech, nat, ip_id, 0, h.protocol());
            return match self.fragments.get(&key) {
                Some(f) if f.site == site && f.expires > now_s => Ok(()),
                _ => Err(DropReason::NoFlow),
            };
        }
        let idle_s = self.idle_s;
        match transport(h.protocol(), h.payload())? {
            Transport::Tcp { src, dst, flags } => {
                if flags & TCP_SYN != 0 && flags & TCP_ACK == 0 {
                    return Err(DropReason::SiteInitiated);
                }
                let key = FlowKey::new(tech, nat, dst, src, PROTO_TCP);
                let f = self.live_mut(&key, site, now_s).ok_or(DropReason::NoFlow)?;
                if flags & (TCP_FIN | TCP_RST) != 0 {
                    f.tcp = TcpState::Closing;
                } else if f.tcp == TcpState::Opening {
                    f.tcp = TcpState::Established;
                }
                let idle = match f.tcp {
                    TcpState::Established => IDLE_TCP,
                    TcpState::Opening | TcpState::Closing => IDLE_TRANSITORY,
                };
                f.expires = now_s.saturating_add(idle_s[idle]);
            }
            Transport::Udp { src, dst } => {
                let key = FlowKey::new(tech, nat, dst, src, PROTO_UDP);
                let f = self.live_mut(&key, site, now_s).ok_or(DropReason::NoFlow)?;
                f.expires = now_s.saturating_add(idle_s[IDLE_UDP]);
            }
            Transport::Icmp { kind, id } if kind == ICMP_ECHO_REPLY => {
                let key = FlowKey::new(tech, nat, id, 0, PROTO_ICMP);
                let f = self.live_mut(&key, site, now_s).ok_or(DropReason::NoFlow)?;
                f.expires = now_s.saturating_add(idle_s[IDLE_ICMP]);
            }
            Transport::Icmp { kind, .. } if kind == ICMP_ECHO_REQUEST => {
                return Err(DropReason::SiteInitiated);
            }
            Transport::Icmp { kind, .. } if is_icmp_error(kind) => {
                self.quoted_flow(h, site, now_s)?;
            }
            Transport::Icmp { .. } => return Err(DropReason::NoFlow),
            Transport::Other => {
                let key = FlowKey::new(tech, nat, 0, 0, h.protocol());
                let f = self.live_mut(&key, site, now_s).ok_or(DropReason::NoFlow)?;
                f.expires = now_s.saturating_add(idle_s[IDLE_UDP]);
            }
        }
        let more_fragments = fixed[6] & 0x20 != 0;
        if more_fragments && self.fragments.len() < MAX_FRAGMENTS {
            let key = FlowKey::new(tech, nat, ip_id, 0, h.protocol());
            let expires = now_s.saturating_add(idle_s[IDLE_FRAGMENT]);
            self.fragments.insert(
                key,
                Flow {
                    site,
                    expires,
                    tcp: TcpState::Established,
                },
            );
        }
        Ok(())
    }

    /// An ICMP error from a site passes when it goes to the technician of a
    /// flow of that site and quotes a packet of that flow.
    fn quoted_flow(&self, h: &Ipv4Header<'_>, site: SiteId, now_s: u32) -> Result<(), DropReason> {
        let quote = h.payload().get(8..).ok_or(DropReason::Malformed)?;
        // The quote may be cut short of its own total length (RFC 1812
        // §4.3.2.3 only promises the header and 8 bytes): the fixed header
        // checks no total length.
        let q = FixedHeader::new(quote).map_err(|_| DropReason::NoFlow)?;
        let header_len = q.header_len();
        if header_len < 20 || quote.len() < header_len + 8 {
            return Err(DropReason::NoFlow);
        }
        let (q_src, q_dst, proto) = (q.src(), q.dst(), q.protocol());
        if q_src != h.dst() {
            return Err(DropReason::NoFlow);
        }
        let t = &quote[header_len..];
        let port = |i: usize| u16::from_be_bytes([t[i], t[i + 1]]);
        let key = match proto {
            _ if q.is_later_fragment() => return Err(DropReason::NoFlow),
            PROTO_TCP | PROTO_UDP => FlowKey::new(q_src, q_dst, port(0), port(2), proto),
            PROTO_ICMP if t[0] == ICMP_ECHO_REQUEST => {
                FlowKey::new(q_src, q_dst, port(4), 0, PROTO_ICMP)
            }
            PROTO_ICMP => return Err(DropReason::NoFlow),
            _ => FlowKey::new(q_src, q_dst, 0, 0, proto),
        };
        match self.flows.get(&key) {
            Some(f) if f.site == site && f.expires > now_s => Ok(()),
            _ => Err(DropReason::NoFlow),
        }
    }

    #[inline]
    fn live_mut(&mut self, key: &FlowKey, site: SiteId, now_s: u32) -> Option<&mut Flow> {
        self.flows
            .get_mut(key)
            .filter(|f| f.site == site && f.expires > now_s)
    }

    fn sweep_when_full(&mut self, now_s: u32) {
        if self.swept_when_full.is_some_and(|at| at == now_s) {
            return;
        }
        self.swept_when_full = Some(now_s);
        self.sweep(now_s);
    }

    fn sweep(&mut self, now_s: u32) {
        self.flows.retain(|_, f| f.expires > now_s);
        self.fragments.retain(|_, f| f.expires > now_s);
    }

    /// Removes expired entries, at most every [`SWEEP_INTERVAL_S`].
    pub fn handle_timeout(&mut self, now: Instant) {
        let now_s = self.seconds(now);
        if now_s < self.next_sweep {
            return;
        }
        self.next_sweep = now_s.saturating_add(SWEEP_INTERVAL_S);
        self.sweep(now_s);
    }

    /// Keeps only the flows whose NAT address `is_open` still for their
    /// site: a closed or reassigned address takes its flows with it.
    pub fn retain_open(&mut self, mut is_open: impl FnMut(Ipv4Addr, SiteId) -> bool) {
        self.flows.retain(|k, f| is_open(k.nat(), f.site));
        self.fragments.retain(|k, f| is_open(k.nat(), f.site));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TECH: [u8; 4] = [172, 16, 0, 50];
    const NAT: [u8; 4] = [10, 64, 0, 5];
    const SITE: SiteId = SiteId(3);

    fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: &str) -> Vec<u8> {
        let mut b = etherparse::PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 1, 1000);
        for f in flags.chars() {
            b = match f {
                'S' => b.syn(),
                'A' => b.ack(1),
                'F' => b.fin(),
                'R' => b.rst(),
                _ => panic!("flag {f}"),
            };
        }
        let mut p = Vec::new();
        b.write(&mut p, &[]).unwrap();
        p
    }

    fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut p = Vec::new();
        etherparse::PacketBuilder::ipv4(src, dst, 64)
            .udp(sport, dport)
            .write(&mut p, b"data")
            .unwrap();
        p
    }

    fn echo(src: [u8; 4], dst: [u8; 4], request: bool, id: u16) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ipv4(src, dst, 64);
        let b = if request {
            b.icmpv4_echo_request(id, 1)
        } else {
            b.icmpv4_echo_reply(id, 1)
        };
        let mut p = Vec::new();
        b.write(&mut p, &[0; 8]).unwrap();
        p
    }

    /// An ICMP port unreachable from `src` to `dst` quoting `original`'s
    /// header and first 8 bytes.
    fn unreachable_about(src: [u8; 4], dst: [u8; 4], original: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        etherparse::PacketBuilder::ipv4(src, dst, 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            ))
            .write(&mut p, &original[..28])
            .unwrap();
        p
    }

    fn h(p: &[u8]) -> Ipv4Header<'_> {
        Ipv4Header::new_checked(p).unwrap()
    }

    fn table(now: Instant) -> FlowTable {
        FlowTable::new(FlowLimits::default(), now)
    }

    fn center(t: &mut FlowTable, p: &[u8], now: Instant) -> Result<(), DropReason> {
        t.center_to_site(&h(p), SITE, now)
    }

    fn site(t: &mut FlowTable, p: &[u8], now: Instant) -> Result<(), DropReason> {
        t.site_to_center(&h(p), SITE, now)
    }

    #[test]
    fn security_a_site_initiated_connection_is_dropped() {
        let now = Instant::now();
        let mut t = table(now);
        assert_eq!(
            site(&mut t, &tcp(NAT, TECH, 40000, 22, "S"), now),
            Err(DropReason::SiteInitiated)
        );
        assert_eq!(
            site(&mut t, &echo(NAT, TECH, true, 7), now),
            Err(DropReason::SiteInitiated)
        );
        assert_eq!(
            site(&mut t, &udp(NAT, TECH, 40000, 53), now),
            Err(DropReason::NoFlow)
        );
        assert_eq!(
            site(&mut t, &tcp(NAT, TECH, 40000, 22, "A"), now),
            Err(DropReason::NoFlow)
        );
        // Even on the reversed ports of a technician's flow, a site's SYN
        // opens nothing.
        center(&mut t, &tcp(TECH, NAT, 50000, 22, "S"), now).unwrap();
        assert_eq!(
            site(&mut t, &tcp(NAT, TECH, 22, 50000, "S"), now),
            Err(DropReason::SiteInitiated)
        );
    }

    #[test]
    fn security_replies_of_the_centers_flows_pass() {
        let now = Instant::now();
        let mut t = table(now);
        center(&mut t, &tcp(TECH, NAT, 50000, 22, "S"), now).unwrap();
        site(&mut t, &tcp(NAT, TECH, 22, 50000, "SA"), now).unwrap();
        site(&mut t, &tcp(NAT, TECH, 22, 50000, "A"), now).unwrap();
        // Not the reversed 5-tuple: another port, another technician.
        assert_eq!(
            site(&mut t, &tcp(NAT, TECH, 22, 50001, "A"), now),
            Err(DropReason::NoFlow)
        );
        assert_eq!(
            site(&mut t, &tcp(NAT, [172, 16, 0, 51], 22, 50000, "A"), now),
            Err(DropReason::NoFlow)
        );
        center(&mut t, &udp(TECH, NAT, 50000, 161), now).unwrap();
        site(&mut t, &udp(NAT, TECH, 161, 50000), now).unwrap();
        assert_eq!(
            site(&mut t, &udp(NAT, TECH, 162, 50000), now),
            Err(DropReason::NoFlow)
        );
        center(&mut t, &echo(TECH, NAT, true, 9), now).unwrap();
        site(&mut t, &echo(NAT, TECH, false, 9), now).unwrap();
        assert_eq!(
            site(&mut t, &echo(NAT, TECH, false, 10), now),
            Err(DropReason::NoFlow)
        );
        // Another site's packet on the same addresses and ports does not
        // belong to this site's flow.
        assert_eq!(
            t.site_to_center(&h(&udp(NAT, TECH, 161, 50000)), SiteId(4), now),
            Err(DropReason::NoFlow)
        );
    }

    #[test]
    fn security_icmp_errors_pass_only_when_they_quote_a_flow() {
        let now = Instant::now();
        let mut t = table(now);
        let probe = udp(TECH, NAT, 50000, 9999);
        center(&mut t, &probe, now).unwrap();
        site(&mut t, &unreachable_about(NAT, TECH, &probe), now).unwrap();
        let ping = echo(TECH, NAT, true, 5);
        center(&mut t, &ping, now).unwrap();
        site(&mut t, &unreachable_about(NAT, TECH, &ping), now).unwrap();
        let syn = tcp(TECH, NAT, 50001, 22, "S");
        center(&mut t, &syn, now).unwrap();
        site(&mut t, &unreachable_about(NAT, TECH, &syn), now).unwrap();
        // Quoting a packet that no flow sent, or sent to another technician
        // than the one quoted, or sent by another site: dropped.
        let unknown = udp(TECH, NAT, 50000, 1234);
        assert_eq!(
            site(&mut t, &unreachable_about(NAT, TECH, &unknown), now),
            Err(DropReason::NoFlow)
        );
        assert_eq!(
            site(
                &mut t,
                &unreachable_about(NAT, [172, 16, 0, 99], &probe),
                now
            ),
            Err(DropReason::NoFlow)
        );
        assert_eq!(
            t.site_to_center(&h(&unreachable_about(NAT, TECH, &probe)), SiteId(4), now),
            Err(DropReason::NoFlow)
        );
        // Quoting the site's own packet (an error about its reply) is not a
        // flow's packet either.
        let reply = udp(NAT, TECH, 9999, 50000);
        assert_eq!(
            site(&mut t, &unreachable_about(NAT, TECH, &reply), now),
            Err(DropReason::NoFlow)
        );
        // Too short to quote anything.
        let mut short = unreachable_about(NAT, TECH, &probe);
        short.truncate(20 + 8 + 10);
        short[2..4].copy_from_slice(&(38u16).to_be_bytes());
        assert_eq!(site(&mut t, &short, now), Err(DropReason::NoFlow));
    }

    #[test]
    fn security_flows_expire_after_their_protocols_idle_time() {
        let now = Instant::now();
        let mut t = table(now);
        let s = |secs| now + Duration::from_secs(secs);
        center(&mut t, &tcp(TECH, NAT, 50000, 22, "S"), now).unwrap();
        center(&mut t, &tcp(TECH, NAT, 50001, 22, "S"), now).unwrap();
        site(&mut t, &tcp(NAT, TECH, 22, 50001, "SA"), now).unwrap();
        center(&mut t, &udp(TECH, NAT, 50000, 161), now).unwrap();
        center(&mut t, &echo(TECH, NAT, true, 9), now).unwrap();
        // ICMP echo: 30 s.
        site(&mut t, &echo(NAT, TECH, false, 9), s(29)).unwrap();
        assert_eq!(
            site(&mut t, &echo(NAT, TECH, false, 9), s(60)),
            Err(DropReason::NoFlow)
        );
        // A TCP flow the site never answered: 60 s; an answered one: 2 h.
        assert_eq!(
            site(&mut t, &tcp(NAT, TECH, 22, 50000, "SA"), s(61)),
            Err(DropReason::NoFlow)
        );
        site(&mut t, &tcp(NAT, TECH, 22, 50001, "A"), s(3600)).unwrap();
        // UDP: 120 s from the last packet.
        site(&mut t, &udp(NAT, TECH, 161, 50000), s(100)).unwrap();
        site(&mut t, &udp(NAT, TECH, 161, 50000), s(219)).unwrap();
        assert_eq!(
            site(&mut t, &udp(NAT, TECH, 161, 50000), s(400)),
            Err(DropReason::NoFlow)
        );
        // The timer sweeps what expired.
        t.handle_timeout(s(400));
        assert_eq!(t.len(), 1);
        site(&mut t, &tcp(NAT, TECH, 22, 50001, "A"), s(400)).unwrap();
        t.handle_timeout(s(400 + 2 * 3600 + 1));
        assert!(t.is_empty());
        // After a FIN the connection lingers 60 s, not 2 h.
        let later = s(10_000);
        center(&mut t, &tcp(TECH, NAT, 50002, 22, "S"), later).unwrap();
        site(&mut t, &tcp(NAT, TECH, 22, 50002, "SA"), later).unwrap();
        center(&mut t, &tcp(TECH, NAT, 50002, 22, "FA"), later).unwrap();
        site(&mut t, &tcp(NAT, TECH, 22, 50002, "FA"), later).unwrap();
        t.handle_timeout(later + Duration::from_secs(61));
        assert!(t.is_empty());
    }

    #[test]
    fn security_a_full_table_refuses_new_flows_and_keeps_the_old() {
        let now = Instant::now();
        let limits = FlowLimits {
            max_flows: 2,
            ..FlowLimits::default()
        };
        let mut t = FlowTable::new(limits, now);
        center(&mut t, &udp(TECH, NAT, 1, 161), now).unwrap();
        center(&mut t, &echo(TECH, NAT, true, 1), now).unwrap();
        assert_eq!(
            center(&mut t, &udp(TECH, NAT, 2, 161), now),
            Err(DropReason::FlowTableFull)
        );
        // Existing flows go on, in both directions.
        center(&mut t, &udp(TECH, NAT, 1, 161), now).unwrap();
        site(&mut t, &udp(NAT, TECH, 161, 1), now).unwrap();
        // Once one expired, a new flow takes its place (swept on demand).
        let later = now + Duration::from_secs(31);
        center(&mut t, &udp(TECH, NAT, 2, 161), later).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            site(&mut t, &echo(NAT, TECH, false, 1), later),
            Err(DropReason::NoFlow)
        );
    }

    #[test]
    fn security_a_mid_flow_center_packet_recreates_its_entry() {
        // A gateway that never saw the SYN (failover, restart).
        let now = Instant::now();
        let mut t = table(now);
        assert_eq!(
            site(&mut t, &tcp(NAT, TECH, 22, 50000, "A"), now),
            Err(DropReason::NoFlow)
        );
        center(&mut t, &tcp(TECH, NAT, 50000, 22, "A"), now).unwrap();
        site(&mut t, &tcp(NAT, TECH, 22, 50000, "A"), now).unwrap();
        // Answered: established, 2 h.
        site(
            &mut t,
            &tcp(NAT, TECH, 22, 50000, "A"),
            now + Duration::from_secs(3600),
        )
        .unwrap();
        // A RST from the center does not create anything.
        center(&mut t, &tcp(TECH, NAT, 50009, 22, "R"), now).unwrap();
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn security_a_site_packet_never_creates_an_entry() {
        let now = Instant::now();
        let mut t = table(now);
        for p in [
            tcp(NAT, TECH, 22, 50000, "SA"),
            tcp(NAT, TECH, 22, 50000, "A"),
            tcp(NAT, TECH, 40000, 22, "S"),
            udp(NAT, TECH, 53, 40000),
            echo(NAT, TECH, false, 1),
            echo(NAT, TECH, true, 1),
        ] {
            assert!(site(&mut t, &p, now).is_err());
        }
        assert!(t.is_empty());
        assert!(t.fragments.is_empty());
    }

    #[test]
    fn security_later_fragments_pass_only_after_their_first() {
        let now = Instant::now();
        let mut t = table(now);
        center(&mut t, &udp(TECH, NAT, 50000, 161), now).unwrap();
        let mut first = udp(NAT, TECH, 161, 50000);
        first[4..6].copy_from_slice(&77u16.to_be_bytes());
        first[6] = 0x20; // more fragments
        let mut later = udp(NAT, TECH, 0, 0);
        later[4..6].copy_from_slice(&77u16.to_be_bytes());
        later[7] = 0x10; // offset 128 bytes
        assert_eq!(site(&mut t, &later, now), Err(DropReason::NoFlow));
        site(&mut t, &first, now).unwrap();
        site(&mut t, &later, now).unwrap();
        let mut other_id = later.clone();
        other_id[4..6].copy_from_slice(&78u16.to_be_bytes());
        assert_eq!(site(&mut t, &other_id, now), Err(DropReason::NoFlow));
        assert_eq!(
            site(&mut t, &later, now + FRAGMENT_IDLE + Duration::from_secs(1)),
            Err(DropReason::NoFlow)
        );
        // The first fragment of a datagram outside any flow allows nothing.
        let mut stray = udp(NAT, TECH, 5353, 50000);
        stray[4..6].copy_from_slice(&79u16.to_be_bytes());
        stray[6] = 0x20;
        assert_eq!(site(&mut t, &stray, now), Err(DropReason::NoFlow));
        let mut stray_later = later.clone();
        stray_later[4..6].copy_from_slice(&79u16.to_be_bytes());
        assert_eq!(site(&mut t, &stray_later, now), Err(DropReason::NoFlow));
    }

    #[test]
    fn truncated_transport_headers_are_malformed() {
        let now = Instant::now();
        let mut t = table(now);
        let mut p = tcp(TECH, NAT, 50000, 22, "S");
        p.truncate(30);
        p[2..4].copy_from_slice(&30u16.to_be_bytes());
        assert_eq!(center(&mut t, &p, now), Err(DropReason::Malformed));
        p[12..16].copy_from_slice(&NAT);
        p[16..20].copy_from_slice(&TECH);
        assert_eq!(site(&mut t, &p, now), Err(DropReason::Malformed));
    }

    #[test]
    fn closed_addresses_take_their_flows_along() {
        let now = Instant::now();
        let mut t = table(now);
        center(&mut t, &udp(TECH, NAT, 50000, 161), now).unwrap();
        center(&mut t, &udp(TECH, [10, 64, 0, 6], 50000, 161), now).unwrap();
        t.retain_open(|nat, site| nat == Ipv4Addr::from(NAT) && site == SITE);
        assert_eq!(t.len(), 1);
        t.retain_open(|_, site| site != SITE);
        assert!(t.is_empty());
        assert_eq!(
            site(&mut t, &udp(NAT, TECH, 161, 50000), now),
            Err(DropReason::NoFlow)
        );
    }
}
