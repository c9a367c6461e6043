use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::{
    HardwareAddress, Icmpv4Packet, Icmpv4Repr, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint,
    IpProtocol, Ipv4Packet, Ipv4Repr, TcpPacket, UdpPacket,
};
use vpnnat::agent::AgentEvent;

use vpnnat::nat::ftp::FtpCounters;

use super::relay::{CHUNK, DatagramRelay, EventSender, FromOs, RelayEvent, TcpRelay};
use crate::probe;

/// Flows of ICMP echo are closed after this long without a request.
const ICMP_IDLE: Duration = Duration::from_secs(30);
/// Packets queued toward the tunnel at most (beyond: dropped, counted).
const MAX_TX: usize = 4096;
/// TCP connections at most (each holds two buffers).
const MAX_TCP: usize = 4096;
/// Default bound of UDP flows (and of destination ports, each a smoltcp
/// socket with its own buffers).
pub const DEFAULT_MAX_UDP: usize = 512;
/// Default bound of ICMP echo flows (each an OS socket).
pub const DEFAULT_MAX_ICMP: usize = 256;
/// The source port of an FTP server's active-mode data connections
/// (RFC 959 §3.2, L-1).
const FTP_DATA_PORT: u16 = 20;
/// Source ports of active-mode data connections when port 20 is taken
/// toward the same technician endpoint: 4096 from here.
const ACTIVE_PORTS_FROM: u16 = 61440;

/// Counters of the netstack.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetstackCounters {
    /// TCP connections relayed (connected to the real host).
    pub tcp_connections: u64,
    /// TCP connections refused by the real host (answered with RST).
    pub tcp_refused: u64,
    /// TCP connections open now.
    pub tcp_open: u64,
    /// UDP flows created.
    pub udp_flows: u64,
    /// ICMP echo requests relayed.
    pub icmp_echo_requests: u64,
    /// ICMP echo replies returned to the technician.
    pub icmp_echo_replies: u64,
    /// ICMP echoes not relayed because ICMP sockets are not allowed.
    pub icmp_unavailable: u64,
    /// Packets dropped (unsupported protocol, malformed, full queues).
    pub dropped: u64,
    /// The FTP rewriting of control connections.
    pub ftp: FtpCounters,
    /// Active-mode FTP data connections opened toward technicians.
    pub ftp_active_data: u64,
    /// Active-mode FTP commands that could not be taken over (passed to
    /// the PC unchanged), or whose connection could not be opened.
    pub ftp_active_refused: u64,
}

/// The tunnel side as a smoltcp device: packets in, packets out.
struct QueueDevice {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    mtu: usize,
    dropped: u64,
}

struct QueueRx(Vec<u8>);
struct QueueTx<'a>(&'a mut VecDeque<Vec<u8>>, &'a mut u64);

impl RxToken for QueueRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for QueueTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        if self.0.len() < MAX_TX {
            self.0.push_back(buf);
        } else {
            *self.1 += 1;
        }
        r
    }
}

impl Device for QueueDevice {
    type RxToken<'a> = QueueRx;
    type TxToken<'a> = QueueTx<'a>;

    fn receive(
        &mut self,
        _timestamp: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let p = self.rx.pop_front()?;
        Some((QueueRx(p), QueueTx(&mut self.tx, &mut self.dropped)))
    }

    fn transmit(&mut self, _timestamp: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        Some(QueueTx(&mut self.tx, &mut self.dropped))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}

/// The 4-tuple of a TCP connection from the technician's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct FlowKey {
    nat: Ipv4Addr,
    port: u16,
    remote: SocketAddrV4,
}

enum TcpPhase {
    /// The OS connect is running; the SYN waits.
    Connecting { syn: Vec<u8> },
    /// Relaying.
    Open { handle: SocketHandle },
}

struct TcpConn {
    key: FlowKey,
    phase: TcpPhase,
    /// The connection to the real host.
    relay: TcpRelay,
    /// A chunk partly written into the smoltcp socket.
    pending: Option<(Vec<u8>, usize)>,
    /// The OS side sent EOF.
    os_eof: bool,
}

struct UdpFlow {
    key: FlowKey,
    relay: DatagramRelay,
    last: Instant,
}

struct IcmpFlow {
    nat: Ipv4Addr,
    tech: Ipv4Addr,
    ident: u16,
    relay: DatagramRelay,
    last: Instant,
}

/// The netstack. Lives on the data-plane task; relay tasks run on the same
/// runtime. Reads no clock: every method that needs the time takes `now`.
pub struct Netstack {
    iface: Interface,
    sockets: SocketSet<'static>,
    device: QueueDevice,
    /// The time smoltcp counts from: the first `now` this stack was given.
    epoch: Option<Instant>,
    tcp_buffer: usize,
    udp_idle: Duration,
    /// NAT address → real address (from the agent's events).
    mappings: BTreeMap<Ipv4Addr, Ipv4Addr>,
    next_id: u64,
    tcp: HashMap<u64, TcpConn>,
    tcp_by_key: HashMap<FlowKey, u64>,
    udp_sockets: HashMap<u16, SocketHandle>,
    udp: HashMap<u64, UdpFlow>,
    udp_by_key: HashMap<FlowKey, u64>,
    icmp: HashMap<u64, IcmpFlow>,
    icmp_by_key: HashMap<(Ipv4Addr, Ipv4Addr, u16), u64>,
    icmp_denied_logged: bool,
    max_udp: usize,
    max_icmp: usize,
    /// Packets built here (echo replies) for the tunnel.
    direct_tx: VecDeque<Vec<u8>>,
    events: EventSender,
    counters: NetstackCounters,
}

impl std::fmt::Debug for Netstack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netstack")
            .field("mappings", &self.mappings.len())
            .field("tcp", &self.tcp.len())
            .field("udp", &self.udp.len())
            .finish_non_exhaustive()
    }
}

fn v4(a: IpAddress) -> Ipv4Addr {
    match a {
        IpAddress::Ipv4(a) => a,
    }
}

impl Netstack {
    /// A stack with no mapping. `events` is where relay tasks report.
    pub fn new(
        mtu: usize,
        tcp_buffer: usize,
        udp_idle: Duration,
        seed: u64,
        events: EventSender,
    ) -> Self {
        let mut device = QueueDevice {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            mtu,
            dropped: 0,
        };
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = seed;
        let mut iface = Interface::new(config, &mut device, smoltcp::time::Instant::ZERO);
        // Every address is ours (the agent state lets only mapped NAT
        // addresses through); a /0 makes every destination "on-link" so that
        // replies never wait for a route.
        iface.set_any_ip(true);
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::v4(192, 0, 0, 8), 0));
        });
        Self {
            iface,
            sockets: SocketSet::new(Vec::new()),
            device,
            epoch: None,
            tcp_buffer,
            udp_idle,
            mappings: BTreeMap::new(),
            next_id: 1,
            tcp: HashMap::new(),
            tcp_by_key: HashMap::new(),
            udp_sockets: HashMap::new(),
            udp: HashMap::new(),
            udp_by_key: HashMap::new(),
            icmp: HashMap::new(),
            icmp_by_key: HashMap::new(),
            icmp_denied_logged: false,
            max_udp: DEFAULT_MAX_UDP,
            max_icmp: DEFAULT_MAX_ICMP,
            direct_tx: VecDeque::new(),
            events,
            counters: NetstackCounters::default(),
        }
    }

    /// Bounds the UDP flows (and destination ports) and the ICMP echo
    /// flows; beyond them new flows are dropped and counted.
    pub fn set_limits(&mut self, max_udp_flows: usize, max_icmp_flows: usize) {
        self.max_udp = max_udp_flows.max(1);
        self.max_icmp = max_icmp_flows.max(1);
    }

    /// UDP flows and the smoltcp sockets of their destination ports.
    #[cfg(test)]
    pub(super) fn udp_in_use(&self) -> (usize, usize) {
        (self.udp.len(), self.udp_sockets.len())
    }

    /// ICMP echo flows.
    #[cfg(test)]
    pub(super) fn icmp_in_use(&self) -> usize {
        self.icmp.len()
    }

    fn ts(&mut self, now: Instant) -> smoltcp::time::Instant {
        let epoch = *self.epoch.get_or_insert(now);
        smoltcp::time::Instant::from_micros(
            i64::try_from(now.saturating_duration_since(epoch).as_micros()).unwrap_or(i64::MAX),
        )
    }

    /// Counters so far.
    pub fn counters(&self) -> NetstackCounters {
        let mut c = self.counters;
        c.tcp_open = self.tcp.len() as u64;
        c.dropped += self.device.dropped;
        c
    }

    /// Follows the agent's mapping events.
    pub fn on_agent_event(&mut self, e: &AgentEvent) {
        match e {
            AgentEvent::MappingInstalled { nat, real, .. } => {
                self.mappings.insert(*nat, *real);
            }
            AgentEvent::MappingRemoved { nat, .. } => {
                self.mappings.remove(nat);
                self.drop_nat(*nat);
            }
            AgentEvent::TunnelDialled { .. }
            | AgentEvent::TunnelUp { .. }
            | AgentEvent::TunnelClosed { .. } => {}
        }
    }

    /// Drops every connection and flow of `nat`, silently (its consent ended).
    fn drop_nat(&mut self, nat: Ipv4Addr) {
        let tcp: Vec<u64> = self
            .tcp
            .iter()
            .filter(|(_, c)| c.key.nat == nat)
            .map(|(id, _)| *id)
            .collect();
        for id in tcp {
            self.remove_tcp(id);
        }
        let udp: Vec<u64> = self
            .udp
            .iter()
            .filter(|(_, f)| f.key.nat == nat)
            .map(|(id, _)| *id)
            .collect();
        for id in udp {
            self.remove_udp(id);
        }
        let icmp: Vec<u64> = self
            .icmp
            .iter()
            .filter(|(_, f)| f.nat == nat)
            .map(|(id, _)| *id)
            .collect();
        for id in icmp {
            self.remove_icmp(id);
        }
    }

    fn remove_tcp(&mut self, id: u64) {
        if let Some(c) = self.tcp.remove(&id) {
            self.tcp_by_key.remove(&c.key);
            if let TcpPhase::Open { handle } = c.phase {
                self.sockets.remove(handle);
            }
        }
    }

    fn remove_udp(&mut self, id: u64) {
        if let Some(f) = self.udp.remove(&id) {
            self.udp_by_key.remove(&f.key);
            let port = f.key.port;
            if !self.udp.values().any(|o| o.key.port == port)
                && let Some(h) = self.udp_sockets.remove(&port)
            {
                self.sockets.remove(h);
            }
        }
    }

    /// Removes an ICMP echo flow (its relay task ends with it).
    fn remove_icmp(&mut self, id: u64) {
        if let Some(f) = self.icmp.remove(&id) {
            self.icmp_by_key.remove(&(f.nat, f.tech, f.ident));
        }
    }

    /// A packet from the tunnel, already checked by the agent state (its
    /// destination is a mapped NAT address, its IPv4 header is sound).
    pub fn input(&mut self, packet: &[u8], now: Instant) {
        let Ok(ip) = Ipv4Packet::new_checked(packet) else {
            self.counters.dropped += 1;
            return;
        };
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        let Some(&real) = self.mappings.get(&dst) else {
            self.counters.dropped += 1;
            return;
        };
        match ip.next_header() {
            IpProtocol::Tcp => {
                let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
                    self.counters.dropped += 1;
                    return;
                };
                let key = FlowKey {
                    nat: dst,
                    port: tcp.dst_port(),
                    remote: SocketAddrV4::new(src, tcp.src_port()),
                };
                if tcp.syn() && !tcp.ack() && !tcp.rst() {
                    match self.tcp_by_key.get(&key).and_then(|id| self.tcp.get(id)) {
                        // A retransmitted SYN while the OS connect runs.
                        Some(TcpConn {
                            phase: TcpPhase::Connecting { .. },
                            ..
                        }) => return,
                        Some(_) => {}
                        None => {
                            if ip.more_frags() || ip.frag_offset() != 0 {
                                self.counters.dropped += 1;
                                return;
                            }
                            self.start_tcp(key, real, packet.to_vec());
                            return;
                        }
                    }
                }
                self.device.rx.push_back(packet.to_vec());
            }
            IpProtocol::Udp => {
                let Ok(u) = UdpPacket::new_checked(ip.payload()) else {
                    self.counters.dropped += 1;
                    return;
                };
                let port = u.dst_port();
                if port == 0 {
                    self.counters.dropped += 1;
                    return;
                }
                if !self.udp_sockets.contains_key(&port) && self.udp_sockets.len() >= self.max_udp {
                    self.counters.dropped += 1;
                    return;
                }
                if let std::collections::hash_map::Entry::Vacant(v) = self.udp_sockets.entry(port) {
                    let mut s = udp::Socket::new(
                        udp::PacketBuffer::new(
                            vec![udp::PacketMetadata::EMPTY; 64],
                            vec![0; 65536],
                        ),
                        udp::PacketBuffer::new(
                            vec![udp::PacketMetadata::EMPTY; 64],
                            vec![0; 65536],
                        ),
                    );
                    if s.bind(IpListenEndpoint { addr: None, port }).is_err() {
                        self.counters.dropped += 1;
                        return;
                    }
                    v.insert(self.sockets.add(s));
                }
                self.device.rx.push_back(packet.to_vec());
            }
            IpProtocol::Icmp => self.icmp_input(src, dst, real, ip.payload(), now),
            _ => self.counters.dropped += 1,
        }
    }

    fn start_tcp(&mut self, key: FlowKey, real: Ipv4Addr, syn: Vec<u8>) {
        if self.tcp.len() >= MAX_TCP {
            self.counters.dropped += 1;
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let relay = TcpRelay::spawn(
            id,
            SocketAddrV4::new(real, key.port),
            (key.nat, *key.remote.ip()),
            &self.events,
        );
        self.tcp_by_key.insert(key, id);
        self.tcp.insert(
            id,
            TcpConn {
                key,
                phase: TcpPhase::Connecting { syn },
                relay,
                pending: None,
                os_eof: false,
            },
        );
    }

    fn icmp_input(
        &mut self,
        tech: Ipv4Addr,
        nat: Ipv4Addr,
        real: Ipv4Addr,
        payload: &[u8],
        now: Instant,
    ) {
        let Ok(icmp) = Icmpv4Packet::new_checked(payload) else {
            self.counters.dropped += 1;
            return;
        };
        let Ok(Icmpv4Repr::EchoRequest {
            ident,
            seq_no,
            data,
        }) = Icmpv4Repr::parse(&icmp, &smoltcp::phy::ChecksumCapabilities::default())
        else {
            // Only echo requests are relayed; ICMP errors toward a terminal are not.
            self.counters.dropped += 1;
            return;
        };
        let key = (nat, tech, ident);
        let id = match self.icmp_by_key.get(&key) {
            Some(id) => *id,
            None => {
                if self.icmp.len() >= self.max_icmp {
                    self.counters.dropped += 1;
                    return;
                }
                let id = self.next_id;
                let relay = match DatagramRelay::icmp_echo(id, real, &self.events) {
                    Ok(r) => r,
                    Err(e) => {
                        self.counters.icmp_unavailable += 1;
                        if !self.icmp_denied_logged {
                            self.icmp_denied_logged = true;
                            tracing::warn!(
                                error = %e,
                                "ICMP sockets are not allowed: pings to NAT addresses go \
                                 unanswered (set net.ipv4.ping_group_range to include this \
                                 process's group)"
                            );
                        }
                        return;
                    }
                };
                self.next_id += 1;
                self.icmp.insert(
                    id,
                    IcmpFlow {
                        nat,
                        tech,
                        ident,
                        relay,
                        last: now,
                    },
                );
                self.icmp_by_key.insert(key, id);
                id
            }
        };
        let Some(flow) = self.icmp.get_mut(&id) else {
            return;
        };
        flow.last = now;
        let mut buf = vec![0u8; 8 + data.len()];
        let n = probe::echo_request(&mut buf, ident, seq_no, data);
        // Non-blocking: a full socket buffer loses this echo, as the network may.
        if flow.relay.send(&buf[..n]) {
            self.counters.icmp_echo_requests += 1;
        } else {
            self.counters.dropped += 1;
        }
    }

    /// Something a relay task reported.
    pub fn on_relay(&mut self, e: RelayEvent, now: Instant) {
        match e {
            RelayEvent::TcpConnected { id, ok } => {
                let Some(c) = self.tcp.get_mut(&id) else {
                    return;
                };
                let TcpPhase::Connecting { syn } = &mut c.phase else {
                    return;
                };
                let syn = std::mem::take(syn);
                if ok {
                    let mut s = tcp_socket(self.tcp_buffer);
                    if s.listen(IpListenEndpoint {
                        addr: Some(c.key.nat.into()),
                        port: c.key.port,
                    })
                    .is_err()
                    {
                        self.remove_tcp(id);
                        return;
                    }
                    let handle = self.sockets.add(s);
                    c.phase = TcpPhase::Open { handle };
                    self.counters.tcp_connections += 1;
                    self.device.rx.push_back(syn);
                    // Poll now so that this listener, and no other, takes this SYN.
                    self.poll(now);
                } else {
                    self.counters.tcp_refused += 1;
                    self.remove_tcp(id);
                    // No socket takes it: smoltcp answers with a RST.
                    self.device.rx.push_back(syn);
                    self.poll(now);
                }
            }
            RelayEvent::TcpWake => {}
            RelayEvent::ActiveData { nat, tech, stream } => {
                self.active_data(nat, tech, stream, now)
            }
            RelayEvent::ActiveRefused => self.counters.ftp_active_refused += 1,
            RelayEvent::FtpCounted(ftp) => self.counters.ftp.merge(&ftp),
            RelayEvent::TcpDone { id, reset } => {
                let Some(c) = self.tcp.get_mut(&id) else {
                    return;
                };
                if reset {
                    if let TcpPhase::Open { handle } = c.phase {
                        self.sockets.get_mut::<tcp::Socket>(handle).abort();
                    }
                } else {
                    c.os_eof = true;
                }
            }
            RelayEvent::UdpData { id, data } => {
                let Some(f) = self.udp.get_mut(&id) else {
                    return;
                };
                f.last = now;
                let Some(&h) = self.udp_sockets.get(&f.key.port) else {
                    return;
                };
                let meta = udp::UdpMetadata {
                    endpoint: IpEndpoint::new(
                        f.key.remote.ip().to_owned().into(),
                        f.key.remote.port(),
                    ),
                    local_address: Some(f.key.nat.into()),
                    meta: Default::default(),
                };
                if self
                    .sockets
                    .get_mut::<udp::Socket>(h)
                    .send_slice(&data, meta)
                    .is_err()
                {
                    self.counters.dropped += 1;
                }
            }
            RelayEvent::IcmpReply { id, seq, data } => {
                let Some(f) = self.icmp.get(&id) else {
                    return;
                };
                let reply = Icmpv4Repr::EchoReply {
                    ident: f.ident,
                    seq_no: seq,
                    data: &data,
                };
                let ip = Ipv4Repr {
                    src_addr: f.nat,
                    dst_addr: f.tech,
                    next_header: IpProtocol::Icmp,
                    payload_len: reply.buffer_len(),
                    hop_limit: 64,
                };
                let mut buf = vec![0u8; ip.buffer_len() + reply.buffer_len()];
                let caps = smoltcp::phy::ChecksumCapabilities::default();
                let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
                ip.emit(&mut p, &caps);
                let mut icmp = Icmpv4Packet::new_unchecked(p.payload_mut());
                reply.emit(&mut icmp, &caps);
                if self.direct_tx.len() < MAX_TX {
                    self.direct_tx.push_back(buf);
                    self.counters.icmp_echo_replies += 1;
                }
            }
        }
    }

    /// Active-mode FTP: the PC connected to the agent in the technician's
    /// place; open the data connection from its NAT address (port 20, as
    /// an FTP server's, or another one when that is taken) to the address
    /// the technician announced, and relay the two.
    fn active_data(
        &mut self,
        nat: Ipv4Addr,
        tech: SocketAddrV4,
        stream: tokio::net::TcpStream,
        now: Instant,
    ) {
        if !self.mappings.contains_key(&nat) || self.tcp.len() >= MAX_TCP {
            self.counters.ftp_active_refused += 1;
            return;
        }
        let key_for = |port| FlowKey {
            nat,
            port,
            remote: tech,
        };
        let port = std::iter::once(FTP_DATA_PORT)
            .chain((0..64).map(|i| ACTIVE_PORTS_FROM + ((self.next_id + i) % 4096) as u16))
            .find(|p| !self.tcp_by_key.contains_key(&key_for(*p)));
        let Some(port) = port else {
            self.counters.ftp_active_refused += 1;
            return;
        };
        let mut s = tcp_socket(self.tcp_buffer);
        let remote = IpEndpoint::new((*tech.ip()).into(), tech.port());
        let local = IpListenEndpoint {
            addr: Some(nat.into()),
            port,
        };
        if s.connect(self.iface.context(), remote, local).is_err() {
            self.counters.ftp_active_refused += 1;
            return;
        }
        let handle = self.sockets.add(s);
        let id = self.next_id;
        self.next_id += 1;
        let key = key_for(port);
        self.tcp_by_key.insert(key, id);
        self.tcp.insert(
            id,
            TcpConn {
                key,
                phase: TcpPhase::Open { handle },
                relay: TcpRelay::adopt(id, stream, &self.events),
                pending: None,
                os_eof: false,
            },
        );
        self.counters.ftp_active_data += 1;
        self.counters.tcp_connections += 1;
        self.poll(now);
    }

    /// Runs the stack: processes queued input, moves data between sockets and
    /// relays, closes what is finished. Afterwards drain [`Self::poll_output`].
    pub fn poll(&mut self, now: Instant) {
        let ts = self.ts(now);
        for _ in 0..8 {
            let _ = self.iface.poll(ts, &mut self.device, &mut self.sockets);
            let moved = self.pump();
            self.dispatch_udp(now);
            if !moved && self.device.rx.is_empty() {
                break;
            }
        }
        let _ = self.iface.poll(ts, &mut self.device, &mut self.sockets);
        self.reap(now);
    }

    /// Moves data between smoltcp sockets and relay channels. Returns whether
    /// anything moved (then poll again: ACKs and window updates are due).
    fn pump(&mut self) -> bool {
        let mut moved = false;
        let mut finished = Vec::new();
        for (id, c) in &mut self.tcp {
            let TcpPhase::Open { handle } = c.phase else {
                continue;
            };
            let s = self.sockets.get_mut::<tcp::Socket>(handle);
            // Technician → terminal.
            while s.can_recv() {
                if !c.relay.can_send() {
                    break;
                }
                let mut chunk = vec![0u8; CHUNK.min(s.recv_queue())];
                match s.recv_slice(&mut chunk) {
                    Ok(n) if n > 0 => {
                        chunk.truncate(n);
                        c.relay.send(chunk);
                        moved = true;
                    }
                    _ => break,
                }
            }
            let fin_received = matches!(
                s.state(),
                tcp::State::CloseWait
                    | tcp::State::LastAck
                    | tcp::State::Closing
                    | tcp::State::TimeWait
                    | tcp::State::Closed
            );
            if fin_received && !s.can_recv() && c.relay.sending() {
                // The technician closed its side: FIN to the terminal.
                c.relay.finish();
            }
            // Terminal → technician.
            loop {
                if c.pending.is_none() {
                    match c.relay.recv() {
                        FromOs::Chunk(chunk) => c.pending = Some((chunk, 0)),
                        FromOs::Empty => break,
                        FromOs::Closed => {
                            c.os_eof = true;
                            break;
                        }
                    }
                }
                let Some((chunk, off)) = &mut c.pending else {
                    break;
                };
                if !s.can_send() {
                    break;
                }
                match s.send_slice(&chunk[*off..]) {
                    Ok(n) => {
                        *off += n;
                        if n > 0 {
                            moved = true;
                        }
                        if *off == chunk.len() {
                            c.pending = None;
                        } else {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            if c.os_eof && c.pending.is_none() && s.may_send() {
                s.close();
            }
            if matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait) {
                finished.push(*id);
            }
        }
        for id in finished {
            self.remove_tcp(id);
        }
        moved
    }

    /// Datagrams the technician sent on UDP sockets → the relay flows.
    fn dispatch_udp(&mut self, now: Instant) {
        let handles: Vec<(u16, SocketHandle)> =
            self.udp_sockets.iter().map(|(p, h)| (*p, *h)).collect();
        for (port, h) in handles {
            loop {
                let (data, meta) = {
                    let s = self.sockets.get_mut::<udp::Socket>(h);
                    match s.recv() {
                        Ok((d, m)) => (d.to_vec(), m),
                        Err(_) => break,
                    }
                };
                let Some(local) = meta.local_address.map(v4) else {
                    continue;
                };
                let remote = SocketAddrV4::new(v4(meta.endpoint.addr), meta.endpoint.port);
                let key = FlowKey {
                    nat: local,
                    port,
                    remote,
                };
                let id = match self.udp_by_key.get(&key) {
                    Some(id) => *id,
                    None => match self.start_udp(key, now) {
                        Some(id) => id,
                        None => {
                            self.counters.dropped += 1;
                            continue;
                        }
                    },
                };
                if let Some(f) = self.udp.get_mut(&id) {
                    f.last = now;
                    if !f.relay.send(&data) {
                        self.counters.dropped += 1;
                    }
                }
            }
        }
    }

    fn start_udp(&mut self, key: FlowKey, now: Instant) -> Option<u64> {
        if self.udp.len() >= self.max_udp {
            return None;
        }
        let real = *self.mappings.get(&key.nat)?;
        let id = self.next_id;
        let relay = match DatagramRelay::udp(id, SocketAddrV4::new(real, key.port), &self.events) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%real, port = key.port, error = %e, "UDP relay socket failed");
                return None;
            }
        };
        self.next_id += 1;
        self.udp.insert(
            id,
            UdpFlow {
                key,
                relay,
                last: now,
            },
        );
        self.udp_by_key.insert(key, id);
        self.counters.udp_flows += 1;
        Some(id)
    }

    /// Closes idle UDP and ICMP flows, and the sockets of destination ports
    /// no flow uses (e.g. their relay socket could not be opened).
    fn reap(&mut self, now: Instant) {
        if self.device.rx.is_empty() {
            let orphans: Vec<u16> = self
                .udp_sockets
                .keys()
                .filter(|p| !self.udp.values().any(|f| f.key.port == **p))
                .copied()
                .collect();
            for port in orphans {
                if let Some(h) = self.udp_sockets.remove(&port) {
                    self.sockets.remove(h);
                }
            }
        }
        let idle: Vec<u64> = self
            .udp
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.last) > self.udp_idle)
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            self.remove_udp(id);
        }
        let idle: Vec<u64> = self
            .icmp
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.last) > ICMP_IDLE)
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            self.remove_icmp(id);
        }
    }

    /// The next packet for the tunnel.
    pub fn poll_output(&mut self) -> Option<Vec<u8>> {
        self.device
            .tx
            .pop_front()
            .or_else(|| self.direct_tx.pop_front())
    }

    /// When [`Self::poll`] wants to run next (TCP timers, idle flows).
    pub fn poll_at(&mut self, now: Instant) -> Option<Instant> {
        let ts = self.ts(now);
        let stack = self
            .iface
            .poll_delay(ts, &self.sockets)
            .map(|d| now + Duration::from_micros(d.total_micros()));
        let flows =
            (!self.udp.is_empty() || !self.icmp.is_empty()).then(|| now + Duration::from_secs(5));
        [stack, flows].into_iter().flatten().min()
    }
}

/// A relayed TCP connection's socket: `buffer` bytes each way, no Nagle,
/// keep-alive after 60 s, given up after 300 s without an answer.
fn tcp_socket(buffer: usize) -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; buffer]),
        tcp::SocketBuffer::new(vec![0; buffer]),
    );
    s.set_nagle_enabled(false);
    s.set_keep_alive(Some(smoltcp::time::Duration::from_secs(60)));
    s.set_timeout(Some(smoltcp::time::Duration::from_secs(300)));
    s
}
