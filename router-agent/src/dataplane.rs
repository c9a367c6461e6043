//! The data plane: one worker thread that pumps packets between the tunnel's
//! UDP socket and the LAN side (a TUN device in packet mode, the smoltcp
//! relay in netstack mode) through [`AgentState`].
//!
//! Packet mode batches IO both ways and allocates nothing per packet, like
//! the gateway's worker (`gateway/src/dataplane.rs`):
//! - UDP → TUN: `recvmmsg` with UDP GRO (quinn-udp); each datagram is
//!   decrypted straight into a TUN buffer after the virtio header room, the
//!   NAT rewrites it in place, and `send_multiple` coalesces TCP segments
//!   back into super-packets (TUN GRO).
//! - TUN → UDP: `recv_multiple` splits GSO super-packets (TUN offload); each
//!   segment is rewritten in place, encrypted into one contiguous buffer, and
//!   runs of equal-size datagrams leave as one `sendmsg` with UDP GSO (a run
//!   stays open across reads while the device has more ready).
//!
//! The loop order follows STYLE.md §2: commands, ready IO (bounded work per
//! wake-up), due timers, then queued outputs and events.

use std::collections::BTreeMap;
use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tun_rs::{AsyncDevice, GROTable, SyncDevice};
use vpnnat::agent::{
    AgentCounters, AgentEvent, AgentState, LanOutcome, MappingView, NetworkOutcome, TunnelView,
};
use vpnnat::messages::{AgentDesiredState, AppliedState, RequestId, TerminalName, UnixMillis};
use vpnnat::wg;

use crate::netstack::{self, Netstack, NetstackCounters, RelayEvent};

/// Headroom before each packet written to the TUN device (virtio-net header).
const TUN_OFFSET: usize = tun_rs::VIRTIO_NET_HDR_LEN;
/// Segment buffers for one TUN read.
const TUN_BATCH: usize = tun_rs::IDEAL_BATCH_SIZE;
/// Bytes per segment buffer: any MTU-sized packet.
const SEGMENT_BUF: usize = 4096;
/// Datagram buffers per `recvmmsg`; each takes a GRO train of up to 64 KiB.
const UDP_BATCH: usize = if quinn_udp::BATCH_SIZE < 16 {
    quinn_udp::BATCH_SIZE
} else {
    16
};
const UDP_BUF: usize = 65536;
/// A UDP GSO train stays under the 64 KiB UDP limit.
const MAX_GSO_BYTES: usize = 65000;
/// Reads per source per wake-up before yielding to the other source.
const BUDGET: usize = 32;

/// The wall clock as the wire carries it.
pub fn wall_now() -> UnixMillis {
    UnixMillis(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    )
}

/// A request from the control plane.
#[derive(Debug)]
pub enum Command {
    /// Reconcile to a desired state with these resolved terminal addresses.
    Apply {
        /// The document.
        desired: Box<AgentDesiredState>,
        /// Real addresses of the terminals that resolved.
        names: BTreeMap<TerminalName, Ipv4Addr>,
        /// What was applied, `None` for an old or foreign document.
        reply: oneshot::Sender<Option<AppliedState>>,
    },
    /// End access for a request now ("end access now" on the page).
    Revoke {
        /// The request.
        id: RequestId,
        /// How many mappings were removed.
        reply: oneshot::Sender<usize>,
    },
    /// Report the state.
    Snapshot(oneshot::Sender<Snapshot>),
    /// Stop the worker.
    Shutdown,
}

/// The data plane as the page, the status command and the metrics see it.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The desired-state version applied.
    pub applied_version: Option<u64>,
    /// Mappings in force.
    pub mappings: Vec<MappingView>,
    /// The tunnel.
    pub tunnel: Option<TunnelView>,
    /// Agent counters.
    pub counters: AgentCounters,
    /// IO counters.
    pub io: IoCounters,
    /// Netstack counters (netstack mode).
    pub netstack: Option<NetstackCounters>,
    /// When the last handshake completed, on the wall clock.
    pub last_handshake: Option<UnixMillis>,
    /// The local UDP port of the tunnel.
    pub local_port: u16,
}

/// How well batching works, and IO errors.
#[derive(Debug, Clone, Copy, Default)]
pub struct IoCounters {
    /// TUN reads.
    pub tun_reads: u64,
    /// Packets those reads returned.
    pub tun_packets: u64,
    /// `sendmsg` calls.
    pub udp_sends: u64,
    /// Datagrams sent.
    pub udp_datagrams_sent: u64,
    /// `recvmmsg` calls that returned data.
    pub udp_recvs: u64,
    /// Datagrams received.
    pub udp_datagrams_received: u64,
    /// Packets written to the TUN device.
    pub tun_packets_written: u64,
    /// IO errors (logged at debug).
    pub io_errors: u64,
}

/// The handle of the worker.
#[derive(Debug, Clone)]
pub struct Dataplane {
    tx: mpsc::Sender<Command>,
}

impl Dataplane {
    /// Applies a desired state.
    ///
    /// # Errors
    /// When the worker has stopped.
    pub async fn apply(
        &self,
        desired: AgentDesiredState,
        names: BTreeMap<TerminalName, Ipv4Addr>,
    ) -> anyhow::Result<Option<AppliedState>> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Apply {
                desired: Box::new(desired),
                names,
                reply,
            })
            .await
            .context("data plane stopped")?;
        rx.await.context("data plane stopped")
    }

    /// Removes the mappings of request `id` at once and keeps them off.
    ///
    /// # Errors
    /// When the worker has stopped.
    pub async fn revoke(&self, id: RequestId) -> anyhow::Result<usize> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Revoke { id, reply })
            .await
            .context("data plane stopped")?;
        rx.await.context("data plane stopped")
    }

    /// The worker's state.
    ///
    /// # Errors
    /// When the worker has stopped.
    pub async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Snapshot(tx))
            .await
            .context("data plane stopped")?;
        rx.await.context("data plane stopped")
    }

    /// Asks the worker to stop.
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown).await;
    }
}

/// The LAN side of the worker.
pub enum LanSide {
    /// Packet mode: the TUN device.
    Tun(SyncDevice),
    /// Netstack mode.
    Netstack {
        /// Inner MTU.
        mtu: usize,
        /// TCP buffer per connection.
        tcp_buffer: usize,
        /// UDP idle timeout.
        udp_idle: Duration,
    },
}

/// Starts the worker thread. Returns once it runs (or failed to start).
///
/// # Errors
/// When the thread, its runtime or its sockets cannot be set up.
pub fn spawn(
    state: AgentState,
    socket: std::net::UdpSocket,
    lan: LanSide,
) -> anyhow::Result<(Dataplane, std::thread::JoinHandle<anyhow::Result<()>>)> {
    let (tx, rx) = mpsc::channel(16);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    let thread = std::thread::Builder::new()
        .name("agent-dataplane".to_owned())
        .spawn(move || -> anyhow::Result<()> {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::anyhow!("runtime: {e}")));
                    return Err(e.into());
                }
            };
            rt.block_on(async move {
                let udp = match Udp::new(socket) {
                    Ok(u) => u,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!("{e:#}")));
                        return Err(e);
                    }
                };
                match lan {
                    LanSide::Tun(dev) => {
                        let tun = match AsyncDevice::new(dev).context("registering the TUN device")
                        {
                            Ok(t) => t,
                            Err(e) => {
                                let _ = ready_tx.send(Err(anyhow::anyhow!("{e:#}")));
                                return Err(e);
                            }
                        };
                        tracing::info!(
                            tcp_gso = tun.tcp_gso(),
                            udp_gso_segments = udp.state.max_gso_segments(),
                            udp_gro_segments = udp.state.gro_segments(),
                            "data plane ready (packet mode)"
                        );
                        let _ = ready_tx.send(Ok(()));
                        run_packet(state, udp, Arc::new(tun), rx).await
                    }
                    LanSide::Netstack {
                        mtu,
                        tcp_buffer,
                        udp_idle,
                    } => {
                        let _ = ready_tx.send(Ok(()));
                        tracing::info!("data plane ready (netstack mode)");
                        run_netstack(state, udp, rx, mtu, tcp_buffer, udp_idle).await
                    }
                }
            })
        })
        .context("starting the data-plane thread")?;
    ready_rx
        .recv()
        .context("data plane thread ended during start")??;
    Ok((Dataplane { tx }, thread))
}

struct Udp {
    sock: UdpSocket,
    state: quinn_udp::UdpSocketState,
    port: u16,
}

impl Udp {
    fn new(socket: std::net::UdpSocket) -> anyhow::Result<Self> {
        socket
            .set_nonblocking(true)
            .context("UDP socket non-blocking")?;
        let state =
            quinn_udp::UdpSocketState::new((&socket).into()).context("UDP socket options")?;
        let _ = state.set_recv_buffer_size((&socket).into(), 8 << 20);
        let _ = state.set_send_buffer_size((&socket).into(), 8 << 20);
        let port = socket.local_addr().context("UDP socket")?.port();
        let sock = UdpSocket::from_std(socket).context("registering the UDP socket")?;
        Ok(Self { sock, state, port })
    }

    async fn send(
        &self,
        dst: SocketAddr,
        contents: &[u8],
        segment: Option<usize>,
        count: usize,
        io: &mut IoCounters,
    ) {
        let transmit = quinn_udp::Transmit {
            destination: dst,
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: None,
        };
        io.udp_sends += 1;
        io.udp_datagrams_sent += count as u64;
        loop {
            match self.sock.try_io(Interest::WRITABLE, || {
                self.state.send((&self.sock).into(), &transmit)
            }) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.sock.writable().await.is_err() {
                        io.io_errors += 1;
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, %dst, "UDP send");
                    io.io_errors += 1;
                    return;
                }
            }
        }
    }

    /// One `recvmmsg`; `Ok(0)` when nothing is ready.
    fn try_recv(
        &self,
        bufs: &mut [Vec<u8>],
        metas: &mut [quinn_udp::RecvMeta; UDP_BATCH],
    ) -> io::Result<usize> {
        let mut it = bufs.iter_mut();
        let mut iovs: [IoSliceMut<'_>; UDP_BATCH] = std::array::from_fn(|_| {
            IoSliceMut::new(&mut it.next().expect("UDP_BATCH buffers allocated")[..])
        });
        match self.sock.try_io(Interest::READABLE, || {
            self.state.recv((&self.sock).into(), &mut iovs, metas)
        }) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }

    async fn send_transmits(&self, state: &mut AgentState, io: &mut IoCounters) {
        while let Some(t) = state.poll_transmit() {
            self.send(t.dst, &t.payload, None, 1, io).await;
            state.recycle(t.payload);
        }
    }
}

fn snapshot(
    state: &AgentState,
    io: IoCounters,
    netstack: Option<NetstackCounters>,
    port: u16,
) -> Snapshot {
    let tunnel = state.tunnel();
    let now = Instant::now();
    let wall = wall_now();
    let last_handshake = tunnel
        .as_ref()
        .and_then(|t| t.stats.last_handshake)
        .map(|t| {
            UnixMillis(wall.0.saturating_sub(
                u64::try_from(now.saturating_duration_since(t).as_millis()).unwrap_or(0),
            ))
        });
    Snapshot {
        applied_version: state.applied_version(),
        mappings: state.mappings().collect(),
        tunnel,
        counters: state.counters(),
        io,
        netstack,
        last_handshake,
        local_port: port,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Handles a command; returns `false` on shutdown.
fn command(
    state: &mut AgentState,
    cmd: Option<Command>,
    io: IoCounters,
    netstack: Option<&mut Netstack>,
    port: u16,
) -> bool {
    match cmd {
        None | Some(Command::Shutdown) => false,
        Some(Command::Apply {
            desired,
            names,
            reply,
        }) => {
            let applied = state.handle_desired_state(&desired, &names, Instant::now(), wall_now());
            let _ = reply.send(applied);
            true
        }
        Some(Command::Revoke { id, reply }) => {
            let _ = reply.send(state.revoke_request(id, Instant::now()));
            true
        }
        Some(Command::Snapshot(reply)) => {
            let ns = netstack.map(|n| n.counters());
            let _ = reply.send(snapshot(state, io, ns, port));
            true
        }
    }
}

async fn run_packet(
    mut state: AgentState,
    udp: Udp,
    tun: Arc<AsyncDevice>,
    mut cmds: mpsc::Receiver<Command>,
) -> anyhow::Result<()> {
    let mut io = IoCounters::default();
    // TUN → UDP buffers.
    let mut tun_orig = vec![0u8; TUN_OFFSET + 65535];
    let mut tun_in: Vec<Vec<u8>> = (0..TUN_BATCH)
        .map(|i| vec![0u8; if i == 0 { 65535 } else { SEGMENT_BUF }])
        .collect();
    let mut tun_sizes = vec![0usize; TUN_BATCH];
    let mut udp_out = vec![0u8; TUN_BATCH * (SEGMENT_BUF + wg::DATA_OVERHEAD) + 65535 + 64];
    // UDP → TUN buffers.
    let mut udp_in: Vec<Vec<u8>> = (0..UDP_BATCH).map(|_| vec![0u8; UDP_BUF]).collect();
    let mut metas = [quinn_udp::RecvMeta::default(); UDP_BATCH];
    let mut tun_out: Vec<Vec<u8>> = Vec::new();
    let mut gro = GROTable::default();

    loop {
        let deadline = state.poll_timeout();
        tokio::select! {
            biased;
            cmd = cmds.recv() => {
                if !command(&mut state, cmd, io, None, udp.port) {
                    break;
                }
                drain_events(&mut state, None);
                udp.send_transmits(&mut state, &mut io).await;
            }
            r = udp.sock.readable() => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "UDP socket");
                    io.io_errors += 1;
                }
                for _ in 0..BUDGET {
                    let n = match udp.try_recv(&mut udp_in, &mut metas) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) => {
                            tracing::debug!(error = %e, "UDP receive");
                            io.io_errors += 1;
                            break;
                        }
                    };
                    io.udp_recvs += 1;
                    let now = Instant::now();
                    let mut k = 0;
                    for (meta, buf) in metas[..n].iter().zip(udp_in.iter()) {
                        let stride = meta.stride.max(1);
                        for dgram in buf[..meta.len].chunks(stride) {
                            io.udp_datagrams_received += 1;
                            if k == tun_out.len() {
                                tun_out.push(Vec::with_capacity(TUN_OFFSET + SEGMENT_BUF));
                            }
                            let b = &mut tun_out[k];
                            let need = TUN_OFFSET + wg::buffer_len(dgram.len());
                            if b.len() < need {
                                b.resize(need, 0);
                            }
                            if let NetworkOutcome::Lan(p) = state.handle_network_input_into(
                                meta.addr,
                                dgram,
                                &mut b[TUN_OFFSET..need],
                                now,
                            ) {
                                let len = p.len();
                                b.truncate(TUN_OFFSET + len);
                                k += 1;
                            }
                        }
                    }
                    write_tun(&tun, &mut gro, &mut tun_out[..k], &mut io).await;
                    drain_events(&mut state, None);
                    udp.send_transmits(&mut state, &mut io).await;
                }
            }
            r = tun.recv_multiple(&mut tun_orig, &mut tun_in, &mut tun_sizes, 0) => {
                let mut result = r;
                // The open GSO train carries over to the next read while more
                // is ready (see `encrypt_and_send`).
                let mut open: Option<Train> = None;
                for round in 0..BUDGET {
                    let n = match result {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "TUN read");
                            io.io_errors += 1;
                            break;
                        }
                    };
                    io.tun_reads += 1;
                    io.tun_packets += n as u64;
                    let now = Instant::now();
                    encrypt_and_send(
                        &mut state,
                        tun_in.iter_mut().zip(tun_sizes.iter()).take(n).map(|(b, s)| &mut b[..*s]),
                        &mut udp_out,
                        &mut open,
                        &udp,
                        now,
                        &mut io,
                    )
                    .await;
                    udp.send_transmits(&mut state, &mut io).await;
                    if round + 1 < BUDGET {
                        result = tun.try_recv_multiple(&mut tun_orig, &mut tun_in, &mut tun_sizes, 0);
                    }
                }
                if let Some(t) = open.take() {
                    send_train(&udp, &udp_out[t.start..t.end], &t, &mut io).await;
                }
            }
            () = sleep_until(deadline) => {
                state.handle_timeout(Instant::now());
                drain_events(&mut state, None);
                udp.send_transmits(&mut state, &mut io).await;
            }
        }
    }
    tracing::info!("data plane stopped");
    Ok(())
}

fn drain_events(state: &mut AgentState, mut netstack: Option<&mut Netstack>) {
    while let Some(e) = state.poll_event() {
        if let Some(n) = netstack.as_deref_mut() {
            n.on_agent_event(&e);
        }
        match &e {
            AgentEvent::TunnelUp { gateway_id } => {
                tracing::info!(gateway.id = %gateway_id, "tunnel up");
            }
            AgentEvent::MappingRemoved { .. }
            | AgentEvent::MappingInstalled { .. }
            | AgentEvent::TunnelDialled { .. }
            | AgentEvent::TunnelClosed { .. } => {}
        }
    }
}

async fn write_tun(
    tun: &AsyncDevice,
    gro: &mut GROTable,
    bufs: &mut [Vec<u8>],
    io: &mut IoCounters,
) {
    if bufs.is_empty() {
        return;
    }
    io.tun_packets_written += bufs.len() as u64;
    if let Err(e) = tun.send_multiple(gro, bufs, TUN_OFFSET).await {
        tracing::debug!(error = %e, "TUN write");
        io.io_errors += 1;
    }
}

/// A run of equal-size datagrams to one destination in the send buffer.
struct Train {
    dst: SocketAddr,
    segment: usize,
    start: usize,
    end: usize,
    count: usize,
    closed: bool,
}

/// Rewrites and encrypts LAN packets and sends them in GSO trains.
///
/// The last train may stay open in `open` (its datagrams in `out`) so that
/// the packets of the next TUN read can extend it: one super-packet is often
/// only a few segments, and one train per read would mean one `sendmsg` (and
/// one skb through both kernels) for each. The caller sends it when nothing
/// more is ready.
async fn encrypt_and_send<'a>(
    state: &mut AgentState,
    packets: impl Iterator<Item = &'a mut [u8]>,
    out: &mut [u8],
    open: &mut Option<Train>,
    udp: &Udp,
    now: Instant,
    io: &mut IoCounters,
) {
    let max_segments = udp.state.max_gso_segments().max(1);
    let mut train = open.take();
    // Every datagram written so far belongs to the open train or was sent.
    let mut pos = train.as_ref().map_or(0, |t| t.end);
    for packet in packets {
        let need = wg::buffer_len(packet.len());
        if pos + need > out.len() {
            if let Some(t) = train.take() {
                send_train(udp, &out[t.start..t.end], &t, io).await;
            }
            pos = 0;
        }
        let (dst, len) = match state.handle_lan_input_into(packet, &mut out[pos..pos + need], now) {
            LanOutcome::Send { dst, datagram } => (dst, datagram.len()),
            LanOutcome::Queued | LanOutcome::Dropped(_) => continue,
        };
        let extends = train.as_ref().is_some_and(|t| {
            t.dst == dst
                && !t.closed
                && len <= t.segment
                && t.count < max_segments
                && t.end == pos
                && t.end + len - t.start <= MAX_GSO_BYTES
        });
        if extends {
            if let Some(t) = train.as_mut() {
                t.end += len;
                t.count += 1;
                t.closed = len < t.segment;
            }
        } else {
            if let Some(t) = train.take() {
                send_train(udp, &out[t.start..t.end], &t, io).await;
            }
            train = Some(Train {
                dst,
                segment: len,
                start: pos,
                end: pos + len,
                count: 1,
                closed: false,
            });
        }
        pos += len;
    }
    *open = train;
}

async fn send_train(udp: &Udp, contents: &[u8], t: &Train, io: &mut IoCounters) {
    udp.send(
        t.dst,
        contents,
        (t.count > 1).then_some(t.segment),
        t.count,
        io,
    )
    .await;
}

async fn run_netstack(
    mut state: AgentState,
    udp: Udp,
    mut cmds: mpsc::Receiver<Command>,
    mtu: usize,
    tcp_buffer: usize,
    udp_idle: Duration,
) -> anyhow::Result<()> {
    let mut io = IoCounters::default();
    let (ev_tx, mut ev_rx) = mpsc::channel::<RelayEvent>(netstack::EVENT_QUEUE);
    let seed = rand::random::<u64>();
    let mut stack = Netstack::new(mtu, tcp_buffer, udp_idle, seed, ev_tx);
    let mut udp_in: Vec<Vec<u8>> = (0..UDP_BATCH).map(|_| vec![0u8; UDP_BUF]).collect();
    let mut metas = [quinn_udp::RecvMeta::default(); UDP_BATCH];
    let mut lan_buf = vec![0u8; wg::buffer_len(UDP_BUF)];
    let mut out = vec![0u8; wg::buffer_len(65535)];

    loop {
        let now = Instant::now();
        let deadline = [state.poll_timeout(), stack.poll_at(now)]
            .into_iter()
            .flatten()
            .min();
        tokio::select! {
            biased;
            cmd = cmds.recv() => {
                if !command(&mut state, cmd, io, Some(&mut stack), udp.port) {
                    break;
                }
            }
            r = udp.sock.readable() => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "UDP socket");
                    io.io_errors += 1;
                }
                for _ in 0..BUDGET {
                    let n = match udp.try_recv(&mut udp_in, &mut metas) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) => {
                            tracing::debug!(error = %e, "UDP receive");
                            io.io_errors += 1;
                            break;
                        }
                    };
                    io.udp_recvs += 1;
                    let now = Instant::now();
                    for (meta, buf) in metas[..n].iter().zip(udp_in.iter()) {
                        let stride = meta.stride.max(1);
                        for dgram in buf[..meta.len].chunks(stride) {
                            io.udp_datagrams_received += 1;
                            let need = wg::buffer_len(dgram.len());
                            if let NetworkOutcome::Lan(p) = state.handle_network_input_into(
                                meta.addr,
                                dgram,
                                &mut lan_buf[..need],
                                now,
                            ) {
                                stack.input(p, now);
                            }
                        }
                    }
                }
            }
            Some(e) = ev_rx.recv() => {
                let now = Instant::now();
                stack.on_relay(e, now);
                for _ in 0..BUDGET * 8 {
                    match ev_rx.try_recv() {
                        Ok(e) => stack.on_relay(e, now),
                        Err(_) => break,
                    }
                }
            }
            () = sleep_until(deadline) => {
                state.handle_timeout(Instant::now());
            }
        }
        // Events first: a removed mapping closes its connections before
        // anything else is sent.
        drain_events(&mut state, Some(&mut stack));
        let now = Instant::now();
        stack.poll(now);
        while let Some(mut p) = stack.poll_output() {
            let need = wg::buffer_len(p.len());
            if let LanOutcome::Send { dst, datagram } =
                state.handle_lan_input_into(&mut p, &mut out[..need], now)
            {
                udp.send(dst, datagram, None, 1, &mut io).await;
            }
        }
        udp.send_transmits(&mut state, &mut io).await;
    }
    tracing::info!("data plane stopped");
    Ok(())
}
