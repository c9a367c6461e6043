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
//! **Expectations (active-mode FTP).** In active mode the FTP server opens
//! the data connection toward the client (RFC 959 §3.2), i.e. the site
//! toward the center. A technician's `PORT` or `EPRT` command (RFC 959
//! §4.1.2, RFC 2428 §2) on a control connection to a NAT address's port 21
//! that names the technician's own source address and a port of at least
//! [`MIN_DATA_PORT`] arms one expectation: for [`EXPECTATION_TTL`], one TCP
//! SYN from that NAT address (any source port) to exactly that address and
//! port opens a flow, once. Any other address or port in such a command is
//! ignored and counted (`refused`); a site's SYN that matches no live,
//! unused expectation is still [`DropReason::SiteInitiated`]. At most
//! [`MAX_EXPECTATIONS`] are kept per table, the oldest evicted first. A
//! retransmitted command (same TCP sequence number) does not re-arm a used
//! expectation. The command must start the segment's payload or follow a
//! line end inside it; a command split across segments arms nothing.
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
/// How long an FTP data-connection expectation waits for its SYN.
pub const EXPECTATION_TTL: Duration = Duration::from_secs(30);
/// Expectations per table; a new one evicts the oldest.
pub const MAX_EXPECTATIONS: usize = 32;
/// The lowest technician port an expectation opens: below are the
/// well-known services (RFC 6335 §6), never an FTP client's data port.
pub const MIN_DATA_PORT: u16 = 1024;
/// The FTP control port (RFC 959 §3.2).
const FTP_CONTROL_PORT: u16 = crate::nat::ftp::FTP_PORT;

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
    /// Opened by the site's SYN under an expectation; the site has sent
    /// nothing but SYNs yet (a retransmitted SYN passes).
    SiteOpening,
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

/// What happened to FTP data-connection expectations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpectationCounters {
    /// Armed by a technician's `PORT`/`EPRT`.
    pub created: u64,
    /// Matched by a site's SYN, which opened its flow.
    pub used: u64,
    /// `PORT`/`EPRT` commands ignored: another address than the
    /// technician's, a port below [`MIN_DATA_PORT`].
    pub refused: u64,
    /// Unused ones evicted for a newer one (the table was full).
    pub evicted: u64,
    /// Unused ones whose time ran out.
    pub expired: u64,
}

impl ExpectationCounters {
    /// Adds `other`'s counts (the workers' tables into one view).
    pub fn merge(&mut self, other: &Self) {
        self.created += other.created;
        self.used += other.used;
        self.refused += other.refused;
        self.evicted += other.evicted;
        self.expired += other.expired;
    }

    /// Each count with its name, for the metrics.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> {
        [
            ("created", self.created),
            ("used", self.used),
            ("refused", self.refused),
            ("evicted", self.evicted),
            ("expired", self.expired),
        ]
        .into_iter()
    }
}

/// One armed expectation: the site's NAT address may open one TCP
/// connection to the technician's address and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Expectation {
    site: SiteId,
    nat: Ipv4Addr,
    tech: Ipv4Addr,
    port: u16,
    /// The TCP sequence number of the control segment that armed it.
    seq: u32,
    /// Seconds since the table's epoch at which it expires.
    expires: u32,
    /// Matched already (kept until it expires so that a retransmitted
    /// command does not arm it again).
    used: bool,
    /// Arming order (the oldest is evicted first).
    order: u64,
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
    /// FTP data-connection expectations, at most [`MAX_EXPECTATIONS`].
    expectations: Vec<Expectation>,
    next_order: u64,
    expectation_counters: ExpectationCounters,
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
            expectations: Vec::with_capacity(MAX_EXPECTATIONS),
            next_order: 0,
            expectation_counters: ExpectationCounters::default(),
        }
    }

    /// What happened to FTP data-connection expectations so far.
    pub fn expectation_counters(&self) -> ExpectationCounters {
        self.expectation_counters
    }

    /// Expectations held now (used and expired ones until they are swept).
    pub fn expectations(&self) -> usize {
        self.expectations.len()
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
                if dst == FTP_CONTROL_PORT {
                    self.arm_expectations(h, site, now_s);
                }
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
                        TcpState::Opening | TcpState::SiteOpening | TcpState::Closing => {
                            IDLE_TRANSITORY
                        }
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
                let key = FlowKey::new(tech, nat, dst, src, PROTO_TCP);
                if flags & TCP_SYN != 0 && flags & TCP_ACK == 0 {
                    return self.site_syn(key, site, now_s);
                }
                let f = self.live_mut(&key, site, now_s).ok_or(DropReason::NoFlow)?;
                if flags & (TCP_FIN | TCP_RST) != 0 {
                    f.tcp = TcpState::Closing;
                } else if matches!(f.tcp, TcpState::Opening | TcpState::SiteOpening) {
                    f.tcp = TcpState::Established;
                }
                let idle = match f.tcp {
                    TcpState::Established => IDLE_TCP,
                    TcpState::Opening | TcpState::SiteOpening | TcpState::Closing => {
                        IDLE_TRANSITORY
                    }
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

    /// A site's TCP SYN (without ACK) for the flow `key`: a retransmission
    /// of a SYN an expectation let through passes; otherwise it needs a
    /// live, unused expectation, which it uses up to open the flow.
    fn site_syn(&mut self, key: FlowKey, site: SiteId, now_s: u32) -> Result<(), DropReason> {
        let transitory = self.idle_s[IDLE_TRANSITORY];
        if let Some(f) = self.live_mut(&key, site, now_s)
            && f.tcp == TcpState::SiteOpening
        {
            f.expires = now_s.saturating_add(transitory);
            return Ok(());
        }
        let nat = key.nat();
        let tech = Ipv4Addr::from_bits((key.addrs >> 32) as u32);
        let tech_port = (key.rest >> 24) as u16;
        let matches = |e: &Expectation| {
            !e.used
                && e.expires > now_s
                && e.site == site
                && e.nat == nat
                && e.tech == tech
                && e.port == tech_port
        };
        if !self.expectations.iter().any(matches) {
            return Err(DropReason::SiteInitiated);
        }
        if self.flows.len() >= self.limits.max_flows && !self.flows.contains_key(&key) {
            self.sweep_when_full(now_s);
            if self.flows.len() >= self.limits.max_flows {
                return Err(DropReason::FlowTableFull);
            }
        }
        // A sweep removes only expired expectations: the match is still there.
        if let Some(e) = self.expectations.iter_mut().find(|e| matches(e)) {
            e.used = true;
        }
        self.expectation_counters.used += 1;
        self.flows.insert(
            key,
            Flow {
                site,
                expires: now_s.saturating_add(transitory),
                tcp: TcpState::SiteOpening,
            },
        );
        Ok(())
    }

    /// A technician's segment to a NAT address's FTP control port: every
    /// `PORT`/`EPRT` line in it that names the technician's own address and
    /// a port of at least [`MIN_DATA_PORT`] arms an expectation.
    fn arm_expectations(&mut self, h: &Ipv4Header<'_>, site: SiteId, now_s: u32) {
        let tcp = h.payload();
        let Some(&off) = tcp.get(12) else {
            return;
        };
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        let Some(payload) = tcp.get(usize::from(off >> 4) * 4..) else {
            return;
        };
        let (tech, nat) = (h.src(), h.dst());
        for line in payload.split_inclusive(|b| *b == b'\n') {
            if line.last() != Some(&b'\n') {
                // Cut off by the segment's end: a command split across
                // segments arms nothing (the client retries or fails).
                break;
            }
            let Some(addr) = crate::nat::ftp::data_port(line) else {
                continue;
            };
            if *addr.ip() != tech || addr.port() < MIN_DATA_PORT {
                self.expectation_counters.refused += 1;
                continue;
            }
            self.arm(Expectation {
                site,
                nat,
                tech,
                port: addr.port(),
                seq,
                expires: now_s.saturating_add(secs(EXPECTATION_TTL)),
                used: false,
                order: 0,
            });
        }
    }

    fn arm(&mut self, mut new: Expectation) {
        let same = |e: &Expectation| {
            e.site == new.site && e.nat == new.nat && e.tech == new.tech && e.port == new.port
        };
        if let Some(e) = self.expectations.iter_mut().find(|e| same(e)) {
            if e.seq == new.seq && e.used {
                // A retransmission of the command whose connection came.
                return;
            }
            // Armed again (a retransmission, or a new command naming the
            // same port): one connection, from now.
            if e.used {
                self.expectation_counters.created += 1;
            }
            e.seq = new.seq;
            e.expires = new.expires;
            e.used = false;
            return;
        }
        self.next_order += 1;
        new.order = self.next_order;
        self.expectation_counters.created += 1;
        if self.expectations.len() < MAX_EXPECTATIONS {
            self.expectations.push(new);
            return;
        }
        let oldest = self
            .expectations
            .iter()
            .enumerate()
            .min_by_key(|(_, e)| e.order)
            .map_or(0, |(i, _)| i);
        if !self.expectations[oldest].used {
            self.expectation_counters.evicted += 1;
        }
        self.expectations[oldest] = new;
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
        let c = &mut self.expectation_counters;
        self.expectations.retain(|e| {
            let live = e.expires > now_s;
            if !live && !e.used {
                c.expired += 1;
            }
            live
        });
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
        self.expectations.retain(|e| is_open(e.nat, e.site));
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

    /// A technician's segment with `payload` on the FTP control connection
    /// (`seq` its sequence number).
    fn ftp_command(tech: [u8; 4], payload: &str, seq: u32) -> Vec<u8> {
        let mut p = Vec::new();
        etherparse::PacketBuilder::ipv4(tech, NAT, 64)
            .tcp(50000, 21, seq, 1000)
            .ack(1)
            .psh()
            .write(&mut p, payload.as_bytes())
            .unwrap();
        p
    }

    /// The technician at TECH has sent `PORT` for `port` (and the control
    /// connection exists).
    fn announce(t: &mut FlowTable, port: u16, now: Instant) {
        let [hi, lo] = port.to_be_bytes();
        center(t, &tcp(TECH, NAT, 50000, 21, "S"), now).unwrap();
        let cmd = format!("PORT 172,16,0,50,{hi},{lo}\r\n");
        center(t, &ftp_command(TECH, &cmd, 7), now).unwrap();
    }

    #[test]
    fn security_an_announced_active_ftp_connection_is_let_through_once() {
        let now = Instant::now();
        let mut t = table(now);
        announce(&mut t, 40001, now);
        assert_eq!(t.expectation_counters().created, 1);
        // The PC's SYN from port 20 to the announced port opens the flow;
        // the technician's SYN-ACK and the rest pass both ways.
        site(&mut t, &tcp(NAT, TECH, 20, 40001, "S"), now).unwrap();
        center(&mut t, &tcp(TECH, NAT, 40001, 20, "SA"), now).unwrap();
        site(&mut t, &tcp(NAT, TECH, 20, 40001, "A"), now).unwrap();
        center(&mut t, &tcp(TECH, NAT, 40001, 20, "A"), now).unwrap();
        site(&mut t, &tcp(NAT, TECH, 20, 40001, "FA"), now).unwrap();
        assert_eq!(t.expectation_counters().used, 1);
        // Once: a second connection to the same port is refused, from any
        // source port.
        assert_eq!(
            site(&mut t, &tcp(NAT, TECH, 21, 40001, "S"), now),
            Err(DropReason::SiteInitiated)
        );
        assert_eq!(
            site(&mut t, &tcp(NAT, TECH, 20, 40002, "S"), now),
            Err(DropReason::SiteInitiated)
        );
    }

    #[test]
    fn security_a_retransmitted_syn_of_an_expected_connection_passes_until_answered() {
        let now = Instant::now();
        let mut t = table(now);
        announce(&mut t, 40001, now);
        site(&mut t, &tcp(NAT, TECH, 20, 40001, "S"), now).unwrap();
        site(&mut t, &tcp(NAT, TECH, 20, 40001, "S"), now).unwrap();
        center(&mut t, &tcp(TECH, NAT, 40001, 20, "SA"), now).unwrap();
        site(&mut t, &tcp(NAT, TECH, 20, 40001, "A"), now).unwrap();
        // Established: a SYN on it now is a new connection, refused.
        assert_eq!(
            site(&mut t, &tcp(NAT, TECH, 20, 40001, "S"), now),
            Err(DropReason::SiteInitiated)
        );
        assert_eq!(t.expectation_counters().used, 1);
    }

    #[test]
    fn security_an_expectation_is_only_for_the_announcing_technician_and_its_port() {
        let now = Instant::now();
        let mut t = table(now);
        announce(&mut t, 40001, now);
        for p in [
            // Another technician, another NAT address, another port.
            tcp(NAT, [172, 16, 0, 51], 20, 40001, "S"),
            tcp([10, 64, 0, 6], TECH, 20, 40001, "S"),
            tcp(NAT, TECH, 20, 40000, "S"),
            tcp(NAT, TECH, 20, 40002, "S"),
        ] {
            assert_eq!(site(&mut t, &p, now), Err(DropReason::SiteInitiated));
        }
        // Another site holding the same NAT address number.
        assert_eq!(
            t.site_to_center(&h(&tcp(NAT, TECH, 20, 40001, "S")), SiteId(4), now),
            Err(DropReason::SiteInitiated)
        );
        // UDP to the announced port is still no flow.
        assert_eq!(
            site(&mut t, &udp(NAT, TECH, 20, 40001), now),
            Err(DropReason::NoFlow)
        );
        // The right one still passes afterwards.
        site(&mut t, &tcp(NAT, TECH, 20, 40001, "S"), now).unwrap();
    }

    #[test]
    fn security_port_commands_naming_others_or_low_ports_arm_nothing() {
        let now = Instant::now();
        let mut t = table(now);
        for (cmd, port) in [
            // Another technician's address (an FTP bounce toward a colleague).
            ("PORT 172,16,0,51,156,65\r\n", 40001),
            // A server on the center LAN.
            ("EPRT |1|172.16.0.10|40001|\r\n", 40001),
            // The technician's own address, but a service port (ssh).
            ("PORT 172,16,0,50,0,22\r\n", 22),
            ("EPRT |1|172.16.0.50|1023|\r\n", 1023),
        ] {
            center(&mut t, &ftp_command(TECH, cmd, 7), now).unwrap();
            assert_eq!(
                site(&mut t, &tcp(NAT, TECH, 20, port, "S"), now),
                Err(DropReason::SiteInitiated),
                "{cmd}"
            );
            assert_eq!(
                site(&mut t, &tcp(NAT, [172, 16, 0, 51], 20, port, "S"), now),
                Err(DropReason::SiteInitiated),
                "{cmd}"
            );
        }
        assert_eq!(t.expectation_counters().refused, 4);
        assert_eq!(t.expectation_counters().created, 0);
        assert_eq!(t.expectations(), 0);
        // Not the FTP control port, not a command, or cut off before its
        // line end: nothing either.
        let mut other = Vec::new();
        etherparse::PacketBuilder::ipv4(TECH, NAT, 64)
            .tcp(50000, 2121, 7, 1000)
            .ack(1)
            .write(&mut other, b"PORT 172,16,0,50,156,65\r\n")
            .unwrap();
        center(&mut t, &other, now).unwrap();
        center(
            &mut t,
            &ftp_command(TECH, "NOOP 172,16,0,50,156,65\r\n", 7),
            now,
        )
        .unwrap();
        center(&mut t, &ftp_command(TECH, "PORT 172,16,0,50,156,6", 7), now).unwrap();
        assert_eq!(t.expectations(), 0);
        // A site's segment to port 21 of the technician arms nothing.
        let mut from_site = Vec::new();
        etherparse::PacketBuilder::ipv4(NAT, TECH, 64)
            .tcp(50000, 21, 7, 1000)
            .ack(1)
            .write(&mut from_site, b"PORT 172,16,0,50,156,65\r\n")
            .unwrap();
        let _ = site(&mut t, &from_site, now);
        assert_eq!(t.expectations(), 0);
        // EPRT of the technician's own address works as PORT does, and so
        // does a command after another line in the same segment.
        center(
            &mut t,
            &ftp_command(TECH, "TYPE I\r\nEPRT |1|172.16.0.50|40001|\r\n", 8),
            now,
        )
        .unwrap();
        site(&mut t, &tcp(NAT, TECH, 20, 40001, "S"), now).unwrap();
    }

    #[test]
    fn security_an_expectation_expires() {
        let now = Instant::now();
        let mut t = table(now);
        announce(&mut t, 40001, now);
        announce(&mut t, 40002, now);
        let late = now + EXPECTATION_TTL + Duration::from_secs(1);
        assert_eq!(
            site(&mut t, &tcp(NAT, TECH, 20, 40001, "S"), late),
            Err(DropReason::SiteInitiated)
        );
        site(
            &mut t,
            &tcp(NAT, TECH, 20, 40002, "S"),
            now + EXPECTATION_TTL - Duration::from_secs(2),
        )
        .unwrap();
        t.handle_timeout(late);
        assert_eq!(t.expectations(), 0);
        let c = t.expectation_counters();
        assert_eq!((c.created, c.used, c.expired), (2, 1, 1));
    }

    #[test]
    fn security_a_retransmitted_port_command_does_not_rearm_a_used_expectation() {
        let now = Instant::now();
        let mut t = table(now);
        announce(&mut t, 40001, now);
        site(&mut t, &tcp(NAT, TECH, 20, 40001, "S"), now).unwrap();
        center(&mut t, &tcp(TECH, NAT, 40001, 20, "R"), now).unwrap();
        // The same segment again (a retransmission the site provoked by
        // withholding its ACK): no second connection.
        center(
            &mut t,
            &ftp_command(TECH, "PORT 172,16,0,50,156,65\r\n", 7),
            now,
        )
        .unwrap();
        assert_eq!(
            site(&mut t, &tcp(NAT, TECH, 20, 40001, "S"), now),
            Err(DropReason::SiteInitiated)
        );
        // A new command (later in the stream) naming the same port does.
        center(
            &mut t,
            &ftp_command(TECH, "PORT 172,16,0,50,156,65\r\n", 40),
            now,
        )
        .unwrap();
        site(&mut t, &tcp(NAT, TECH, 20, 40001, "S"), now).unwrap();
        assert_eq!(t.expectation_counters().used, 2);
    }

    #[test]
    fn security_expectations_are_bounded_and_the_oldest_goes_first() {
        let now = Instant::now();
        let mut t = table(now);
        for i in 0..=MAX_EXPECTATIONS as u16 {
            announce(&mut t, 40000 + i, now);
        }
        assert_eq!(t.expectations(), MAX_EXPECTATIONS);
        assert_eq!(t.expectation_counters().evicted, 1);
        assert_eq!(
            site(&mut t, &tcp(NAT, TECH, 20, 40000, "S"), now),
            Err(DropReason::SiteInitiated)
        );
        site(&mut t, &tcp(NAT, TECH, 20, 40001, "S"), now).unwrap();
        site(
            &mut t,
            &tcp(NAT, TECH, 20, 40000 + MAX_EXPECTATIONS as u16, "S"),
            now,
        )
        .unwrap();
    }

    #[test]
    fn security_closing_a_nat_address_drops_its_expectations() {
        let now = Instant::now();
        let mut t = table(now);
        announce(&mut t, 40001, now);
        t.retain_open(|_, _| false);
        assert_eq!(t.expectations(), 0);
        assert_eq!(
            site(&mut t, &tcp(NAT, TECH, 20, 40001, "S"), now),
            Err(DropReason::SiteInitiated)
        );
    }

    proptest::proptest! {
        /// Any payload toward port 21 and any site SYNs: no panic, the
        /// expectations stay within their bound, and a site SYN passes only
        /// toward an address and port a command of the technician named.
        #[test]
        fn expectations_stay_bounded_and_open_only_what_was_named(
            cmds in proptest::collection::vec(
                (proptest::collection::vec(proptest::prelude::any::<u8>(), 0..60), 0u16..4),
                0..60,
            ),
            syns in proptest::collection::vec((0u16..4, 1000u16..1030), 0..20),
        ) {
            let now = Instant::now();
            let mut t = table(now);
            let mut named = Vec::new();
            for (junk, k) in &cmds {
                let port = 40000 + k;
                let [hi, lo] = port.to_be_bytes();
                let mut payload = junk.clone();
                if k % 2 == 0 {
                    payload.extend_from_slice(format!("\r\nPORT 172,16,0,50,{hi},{lo}\r\n").as_bytes());
                    named.push(port);
                }
                let mut p = Vec::new();
                etherparse::PacketBuilder::ipv4(TECH, NAT, 64)
                    .tcp(50000, 21, 7, 1000)
                    .ack(1)
                    .write(&mut p, &payload)
                    .unwrap();
                center(&mut t, &p, now).unwrap();
                proptest::prop_assert!(t.expectations() <= MAX_EXPECTATIONS);
            }
            for (k, sport) in syns {
                let port = 40000 + k;
                if site(&mut t, &tcp(NAT, TECH, sport, port, "S"), now).is_ok() {
                    proptest::prop_assert!(named.contains(&port), "{port} was not named");
                }
            }
        }
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
