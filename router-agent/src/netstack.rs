//! Netstack mode (`--netstack`, no privileges, any LAN host): a smoltcp
//! interface holds the mapped NAT addresses; the "device" is the decrypted
//! side of the tunnel. TCP connections and UDP flows to a NAT address are
//! terminated here and relayed through ordinary OS sockets to the real
//! address; an ICMP echo is answered when the real host answers one
//! (unprivileged ICMP socket, `net.ipv4.ping_group_range`).
//!
//! TCP: the technician's SYN is held until the OS connect to the real host
//! succeeds; only then does a smoltcp socket listen for it, so a closed port
//! on the terminal is answered with a RST (smoltcp's answer to a segment no
//! socket takes) rather than a connection that dies at once. Data moves
//! through bounded channels in both directions, so a slow side slows the
//! other down (TCP windows on the tunnel side, the kernel's on the LAN side).
//!
//! Only packets the agent state has already checked reach this module: the
//! destination is a mapped NAT address. When a mapping goes away every
//! connection and flow of its NAT address is dropped at once.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::{
    HardwareAddress, Icmpv4Packet, Icmpv4Repr, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint,
    IpProtocol, Ipv4Packet, Ipv4Repr, TcpPacket, UdpPacket,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use vpnnat::agent::AgentEvent;

use crate::probe;

/// Bytes per chunk moved between a relay task and the stack.
const CHUNK: usize = 16 * 1024;
/// Chunks buffered per direction of a TCP relay.
const CHANNEL_CHUNKS: usize = 8;
/// How long the OS connect to a terminal may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Flows of ICMP echo are closed after this long without a request.
const ICMP_IDLE: Duration = Duration::from_secs(30);
/// Packets queued toward the tunnel at most (beyond: dropped, counted).
const MAX_TX: usize = 4096;
/// Relay events queued at most; datagrams beyond it are dropped.
pub const EVENT_QUEUE: usize = 1024;
/// TCP connections at most (each holds two buffers).
const MAX_TCP: usize = 4096;

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
}

/// What relay tasks tell the stack.
#[derive(Debug)]
pub enum RelayEvent {
    /// The OS connect of a pending TCP connection finished.
    TcpConnected {
        /// The connection.
        id: u64,
        /// Whether the real host accepted.
        ok: bool,
    },
    /// A TCP relay moved data (the stack checks every relay's channels).
    TcpWake,
    /// A TCP relay ended (error or both directions closed).
    TcpDone {
        /// The connection.
        id: u64,
        /// The OS side failed (reset): abort toward the technician.
        reset: bool,
    },
    /// A datagram from the real host of a UDP flow.
    UdpData {
        /// The flow.
        id: u64,
        /// The payload.
        data: Vec<u8>,
    },
    /// An echo reply from the real host.
    IcmpReply {
        /// The flow.
        id: u64,
        /// Its sequence number.
        seq: u16,
        /// Its payload.
        data: Vec<u8>,
    },
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
    /// Stack → OS (None once the technician sent FIN).
    to_os: Option<mpsc::Sender<Vec<u8>>>,
    /// OS → stack.
    from_os: mpsc::Receiver<Vec<u8>>,
    /// A chunk partly written into the smoltcp socket.
    pending: Option<(Vec<u8>, usize)>,
    /// The OS side sent EOF.
    os_eof: bool,
    task: JoinHandle<()>,
}

struct UdpFlow {
    key: FlowKey,
    os: Arc<UdpSocket>,
    last: Instant,
    task: JoinHandle<()>,
}

struct IcmpFlow {
    nat: Ipv4Addr,
    tech: Ipv4Addr,
    ident: u16,
    os: Arc<UdpSocket>,
    last: Instant,
    task: JoinHandle<()>,
}

/// The netstack. Lives on the data-plane task; relay tasks run on the same runtime.
pub struct Netstack {
    iface: Interface,
    sockets: SocketSet<'static>,
    device: QueueDevice,
    epoch: Instant,
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
    /// Packets built here (echo replies) for the tunnel.
    direct_tx: VecDeque<Vec<u8>>,
    events: mpsc::Sender<RelayEvent>,
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
        events: mpsc::Sender<RelayEvent>,
    ) -> Self {
        let mut device = QueueDevice {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            mtu,
            dropped: 0,
        };
        let epoch = Instant::now();
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
            epoch,
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
            direct_tx: VecDeque::new(),
            events,
            counters: NetstackCounters::default(),
        }
    }

    fn ts(&self, now: Instant) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(
            i64::try_from(now.saturating_duration_since(self.epoch).as_micros())
                .unwrap_or(i64::MAX),
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
            if let Some(f) = self.icmp.remove(&id) {
                f.task.abort();
                self.icmp_by_key.remove(&(f.nat, f.tech, f.ident));
            }
        }
    }

    fn remove_tcp(&mut self, id: u64) {
        if let Some(c) = self.tcp.remove(&id) {
            c.task.abort();
            self.tcp_by_key.remove(&c.key);
            if let TcpPhase::Open { handle } = c.phase {
                self.sockets.remove(handle);
            }
        }
    }

    fn remove_udp(&mut self, id: u64) {
        if let Some(f) = self.udp.remove(&id) {
            f.task.abort();
            self.udp_by_key.remove(&f.key);
            let port = f.key.port;
            if !self.udp.values().any(|o| o.key.port == port)
                && let Some(h) = self.udp_sockets.remove(&port)
            {
                self.sockets.remove(h);
            }
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
        let (to_os_tx, to_os_rx) = mpsc::channel::<Vec<u8>>(CHANNEL_CHUNKS);
        let (from_os_tx, from_os_rx) = mpsc::channel::<Vec<u8>>(CHANNEL_CHUNKS);
        let events = self.events.clone();
        let target = SocketAddrV4::new(real, key.port);
        let task = tokio::spawn(tcp_relay(id, target, to_os_rx, from_os_tx, events));
        self.tcp_by_key.insert(key, id);
        self.tcp.insert(
            id,
            TcpConn {
                key,
                phase: TcpPhase::Connecting { syn },
                to_os: Some(to_os_tx),
                from_os: from_os_rx,
                pending: None,
                os_eof: false,
                task,
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
                let sock = match probe::ping_socket(real) {
                    Ok(s) => Arc::new(s),
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
                let id = self.next_id;
                self.next_id += 1;
                let events = self.events.clone();
                let task = tokio::spawn(icmp_reader(id, sock.clone(), events));
                self.icmp.insert(
                    id,
                    IcmpFlow {
                        nat,
                        tech,
                        ident,
                        os: sock,
                        last: now,
                        task,
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
        if send_now(&flow.os, &buf[..n]) {
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
                    let mut s = tcp::Socket::new(
                        tcp::SocketBuffer::new(vec![0; self.tcp_buffer]),
                        tcp::SocketBuffer::new(vec![0; self.tcp_buffer]),
                    );
                    s.set_nagle_enabled(false);
                    s.set_keep_alive(Some(smoltcp::time::Duration::from_secs(60)));
                    s.set_timeout(Some(smoltcp::time::Duration::from_secs(300)));
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

    /// Runs the stack: processes queued input, moves data between sockets and
    /// relays, closes what is finished. Afterwards drain [`Self::poll_output`].
    pub fn poll(&mut self, now: Instant) {
        let ts = self.ts(now);
        for _ in 0..8 {
            let _ = self.iface.poll(ts, &mut self.device, &mut self.sockets);
            let moved = self.pump();
            self.dispatch_udp();
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
                let Some(tx) = &c.to_os else { break };
                let Ok(permit) = tx.try_reserve() else { break };
                let mut chunk = vec![0u8; CHUNK.min(s.recv_queue())];
                match s.recv_slice(&mut chunk) {
                    Ok(n) if n > 0 => {
                        chunk.truncate(n);
                        permit.send(chunk);
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
            if fin_received && !s.can_recv() && c.to_os.is_some() {
                // The technician closed its side: FIN to the terminal.
                c.to_os = None;
            }
            // Terminal → technician.
            loop {
                if c.pending.is_none() {
                    match c.from_os.try_recv() {
                        Ok(chunk) => c.pending = Some((chunk, 0)),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
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
    fn dispatch_udp(&mut self) {
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
                    None => match self.start_udp(key) {
                        Some(id) => id,
                        None => {
                            self.counters.dropped += 1;
                            continue;
                        }
                    },
                };
                if let Some(f) = self.udp.get_mut(&id) {
                    f.last = Instant::now();
                    if !send_now(&f.os, &data) {
                        self.counters.dropped += 1;
                    }
                }
            }
        }
    }

    fn start_udp(&mut self, key: FlowKey) -> Option<u64> {
        let real = *self.mappings.get(&key.nat)?;
        let std_sock = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
        std_sock.set_nonblocking(true).ok()?;
        std_sock.connect((real, key.port)).ok()?;
        let sock = Arc::new(UdpSocket::from_std(std_sock).ok()?);
        let id = self.next_id;
        self.next_id += 1;
        let task = tokio::spawn(udp_reader(id, sock.clone(), self.events.clone()));
        self.udp.insert(
            id,
            UdpFlow {
                key,
                os: sock,
                last: Instant::now(),
                task,
            },
        );
        self.udp_by_key.insert(key, id);
        self.counters.udp_flows += 1;
        Some(id)
    }

    /// Closes idle UDP and ICMP flows.
    fn reap(&mut self, now: Instant) {
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
            if let Some(f) = self.icmp.remove(&id) {
                f.task.abort();
                self.icmp_by_key.remove(&(f.nat, f.tech, f.ident));
            }
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

impl Drop for Netstack {
    fn drop(&mut self) {
        for c in self.tcp.values() {
            c.task.abort();
        }
        for f in self.udp.values() {
            f.task.abort();
        }
        for f in self.icmp.values() {
            f.task.abort();
        }
    }
}

/// Sends on a non-blocking socket now. (tokio's `try_send` refuses until
/// the reactor has seen the socket writable once, which would lose the
/// first datagram of every new flow.)
fn send_now(sock: &UdpSocket, data: &[u8]) -> bool {
    socket2::SockRef::from(sock).send(data).is_ok()
}

async fn tcp_relay(
    id: u64,
    target: SocketAddrV4,
    mut to_os: mpsc::Receiver<Vec<u8>>,
    from_os: mpsc::Sender<Vec<u8>>,
    events: mpsc::Sender<RelayEvent>,
) {
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%target, error = %e, "terminal refused a relayed connection");
            let _ = events
                .send(RelayEvent::TcpConnected { id, ok: false })
                .await;
            return;
        }
        Err(_) => {
            tracing::debug!(%target, "terminal did not answer a relayed connection");
            let _ = events
                .send(RelayEvent::TcpConnected { id, ok: false })
                .await;
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let _ = events.send(RelayEvent::TcpConnected { id, ok: true }).await;
    let (mut rd, mut wr) = stream.into_split();
    let ev = events.clone();
    let ev2 = events.clone();
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) => return false,
                Ok(n) => {
                    if from_os.send(buf[..n].to_vec()).await.is_err() {
                        return false;
                    }
                    // A lost wake-up is harmless: a full queue means the stack polls anyway.
                    let _ = ev.try_send(RelayEvent::TcpWake);
                }
                Err(_) => return true,
            }
        }
    };
    let writer = async move {
        while let Some(chunk) = to_os.recv().await {
            if wr.write_all(&chunk).await.is_err() {
                return true;
            }
            // Room in the channel again: the stack may move more.
            let _ = ev2.try_send(RelayEvent::TcpWake);
        }
        let _ = wr.shutdown().await;
        false
    };
    let (read_reset, write_reset) = tokio::join!(reader, writer);
    let _ = events
        .send(RelayEvent::TcpDone {
            id,
            reset: read_reset || write_reset,
        })
        .await;
}

async fn udp_reader(id: u64, sock: Arc<UdpSocket>, events: mpsc::Sender<RelayEvent>) {
    let mut buf = vec![0u8; 65536];
    loop {
        match sock.recv(&mut buf).await {
            Ok(n) => {
                // A flood from the terminal loses datagrams, never memory.
                let e = RelayEvent::UdpData {
                    id,
                    data: buf[..n].to_vec(),
                };
                if let Err(mpsc::error::TrySendError::Closed(_)) = events.try_send(e) {
                    return;
                }
            }
            // ICMP port unreachable from the terminal surfaces as an error; keep the flow.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn icmp_reader(id: u64, sock: Arc<UdpSocket>, events: mpsc::Sender<RelayEvent>) {
    let mut buf = vec![0u8; 65536];
    loop {
        match sock.recv(&mut buf).await {
            Ok(n) if n >= 8 && buf[0] == 0 => {
                let seq = u16::from_be_bytes([buf[6], buf[7]]);
                let e = RelayEvent::IcmpReply {
                    id,
                    seq,
                    data: buf[8..n].to_vec(),
                };
                if let Err(mpsc::error::TrySendError::Closed(_)) = events.try_send(e) {
                    return;
                }
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vpnnat::messages::TerminalName;

    const NAT: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 5);
    const TECH: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 50);

    fn stack() -> (Netstack, mpsc::Receiver<RelayEvent>) {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let mut n = Netstack::new(1420, 65536, Duration::from_secs(120), 1, tx);
        n.on_agent_event(&AgentEvent::MappingInstalled {
            nat: NAT,
            real: Ipv4Addr::LOCALHOST,
            terminal: TerminalName::new("pc-1").unwrap(),
        });
        (n, rx)
    }

    fn tcp(flags: &str, seq: u32, ack: u32, port: u16, payload: &[u8]) -> Vec<u8> {
        let mut b = etherparse::PacketBuilder::ipv4(TECH.octets(), NAT.octets(), 64)
            .tcp(40000, port, seq, 64000);
        if flags.contains('S') {
            b = b.syn();
        }
        if flags.contains('A') {
            b = b.ack(ack);
        }
        if flags.contains('F') {
            b = b.fin();
        }
        let mut p = Vec::new();
        b.write(&mut p, payload).unwrap();
        p
    }

    fn outputs(n: &mut Netstack) -> Vec<etherparse::TcpHeader> {
        std::iter::from_fn(|| n.poll_output())
            .filter_map(|p| {
                let s = etherparse::SlicedPacket::from_ip(&p).ok()?;
                match s.transport? {
                    etherparse::TransportSlice::Tcp(t) => Some(t.to_header()),
                    _ => None,
                }
            })
            .collect()
    }

    async fn relay_until(
        n: &mut Netstack,
        rx: &mut mpsc::Receiver<RelayEvent>,
        mut done: impl FnMut(&mut Netstack) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !done(n) {
            let e = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .expect("relay event in time")
                .unwrap();
            n.on_relay(e, Instant::now());
            n.poll(Instant::now());
        }
    }

    #[tokio::test]
    async fn a_tcp_connection_is_relayed_to_the_real_host() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(b"world").await.unwrap();
            buf
        });
        let (mut n, mut rx) = stack();
        n.input(&tcp("S", 1000, 0, port, &[]), Instant::now());
        n.poll(Instant::now());
        assert!(
            outputs(&mut n).is_empty(),
            "the SYN waits for the real host"
        );
        let mut synack = None;
        relay_until(&mut n, &mut rx, |n| {
            synack = outputs(n).into_iter().find(|t| t.syn && t.ack);
            synack.is_some()
        })
        .await;
        let synack = synack.unwrap();
        assert_eq!(synack.acknowledgment_number, 1001);
        let isn = synack.sequence_number;
        n.input(&tcp("A", 1001, isn + 1, port, b"hello"), Instant::now());
        n.poll(Instant::now());
        let mut data = Vec::new();
        relay_until(&mut n, &mut rx, |n| {
            for p in std::iter::from_fn(|| n.poll_output()) {
                let s = etherparse::SlicedPacket::from_ip(&p).unwrap();
                if let Some(etherparse::TransportSlice::Tcp(t)) = s.transport {
                    data.extend_from_slice(t.payload());
                }
            }
            data == b"world"
        })
        .await;
        assert_eq!(&server.await.unwrap(), b"hello");
        assert_eq!(n.counters().tcp_connections, 1);
    }

    #[tokio::test]
    async fn a_closed_port_is_answered_with_a_reset() {
        // Bind and drop: nothing listens there now.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (mut n, mut rx) = stack();
        n.input(&tcp("S", 1000, 0, port, &[]), Instant::now());
        let mut rst = false;
        relay_until(&mut n, &mut rx, |n| {
            rst |= outputs(n).iter().any(|t| t.rst);
            rst
        })
        .await;
        assert_eq!(n.counters().tcp_refused, 1);
    }
}
