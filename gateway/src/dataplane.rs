//! The data plane: a worker thread that pumps packets between the gateway's
//! UDP socket and its TUN device through [`GatewayState`].
//!
//! IO is batched both ways and nothing is allocated per packet:
//! - TUN → UDP: `recv_multiple` returns the segments of a TCP/UDP GSO
//!   super-packet (TUN offload); each is encrypted straight into one
//!   contiguous send buffer, and runs of equal-size datagrams to the same
//!   peer leave as one `sendmsg` with UDP GSO (quinn-udp). A run stays open
//!   across reads while the device has more ready, so small super-packets
//!   still make long trains.
//! - UDP → TUN: `recvmmsg` with UDP GRO (quinn-udp) returns many datagrams per
//!   call; each is decrypted straight into a TUN buffer after the virtio
//!   header room, and `send_multiple` coalesces TCP segments back into
//!   super-packets (TUN GRO) before writing.
//!
//! The event loop follows STYLE.md §2: commands from the control plane, then
//! ready IO (bounded work per wake-up), then due timers, then queued outputs.
//!
//! **Workers.** With several workers, each owns the peers of one shard (by
//! site id, [`vpnnat::gateway::Shard`]), its own `SO_REUSEPORT` socket and its
//! own queue of a multi-queue TUN device, so all cores forward. The kernel
//! steers a peer's datagrams to its owner by receiver index (`reuseport`),
//! and a TUN flow to the queue that last wrote it (tun's automq), i.e. to
//! the owner once the peer has answered. What still arrives at the wrong
//! worker (handshake initiations, the first packets of a flow opened from the
//! center) is handed to the owner over a channel, in buffers that travel back
//! to the sender for reuse.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tun_rs::{AsyncDevice, GROTable, SyncDevice};
use vpnnat::gateway::{
    GatewayCounters, GatewayEvent, GatewayState, NetworkOutcome, PeerView, TunOutcome,
};
use vpnnat::messages::{AppliedState, GatewayDesiredState};
use vpnnat::wg;

/// Headroom before each packet written to the TUN device (virtio-net header).
const TUN_OFFSET: usize = tun_rs::VIRTIO_NET_HDR_LEN;
/// Segment buffers for one TUN read (a 64 KiB super-packet at MTU 1280 is ~50).
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

/// A request from the control plane.
#[derive(Debug)]
pub enum Command {
    /// Reconcile to a desired state.
    Apply(Box<GatewayDesiredState>, oneshot::Sender<ApplyResult>),
    /// Report counters and peers.
    Snapshot(oneshot::Sender<Snapshot>),
    /// Stop the worker.
    Shutdown,
}

/// What applying a desired state did.
#[derive(Debug)]
pub struct ApplyResult {
    /// `None` when the document was older than the running one.
    pub applied: Option<AppliedState>,
    /// Address events for the route manager, in order.
    pub events: Vec<GatewayEvent>,
}

/// The worker's state as the metrics and `gateway status` show it.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// When it was taken.
    pub at: Instant,
    /// Peers by site.
    pub peers: Vec<PeerView>,
    /// Drops and generated messages.
    pub counters: GatewayCounters,
    /// The desired-state version applied.
    pub applied_version: Option<u64>,
    /// IO batching counters.
    pub io: IoCounters,
}

/// How well batching works.
#[derive(Debug, Clone, Copy, Default)]
pub struct IoCounters {
    /// TUN reads.
    pub tun_reads: u64,
    /// Packets those reads returned (after GSO split).
    pub tun_packets: u64,
    /// `sendmsg` calls on the UDP socket.
    pub udp_sends: u64,
    /// Datagrams those calls carried.
    pub udp_datagrams_sent: u64,
    /// `recvmmsg` calls that returned data.
    pub udp_recvs: u64,
    /// Datagrams received.
    pub udp_datagrams_received: u64,
    /// TUN write batches.
    pub tun_write_batches: u64,
    /// Packets written to the TUN device (before GRO coalescing).
    pub tun_packets_written: u64,
    /// IO errors (logged).
    pub io_errors: u64,
    /// Packets handed to another worker.
    pub handoffs_sent: u64,
    /// Packets taken over from another worker.
    pub handoffs_received: u64,
    /// Handoffs dropped (queue full).
    pub handoff_dropped: u64,
}

impl IoCounters {
    fn merge(&mut self, o: &IoCounters) {
        self.tun_reads += o.tun_reads;
        self.tun_packets += o.tun_packets;
        self.udp_sends += o.udp_sends;
        self.udp_datagrams_sent += o.udp_datagrams_sent;
        self.udp_recvs += o.udp_recvs;
        self.udp_datagrams_received += o.udp_datagrams_received;
        self.tun_write_batches += o.tun_write_batches;
        self.tun_packets_written += o.tun_packets_written;
        self.io_errors += o.io_errors;
        self.handoffs_sent += o.handoffs_sent;
        self.handoffs_received += o.handoffs_received;
        self.handoff_dropped += o.handoff_dropped;
    }
}

/// The handle of one worker.
#[derive(Debug, Clone)]
struct Handle {
    tx: mpsc::Sender<Command>,
}

impl Handle {
    /// Applies a desired state and waits for the result.
    ///
    /// # Errors
    /// When the worker has stopped.
    async fn apply(&self, desired: GatewayDesiredState) -> anyhow::Result<ApplyResult> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Apply(Box::new(desired), tx))
            .await
            .context("data plane stopped")?;
        rx.await.context("data plane stopped")
    }

    /// The worker's counters and peers.
    ///
    /// # Errors
    /// When the worker has stopped.
    async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Snapshot(tx))
            .await
            .context("data plane stopped")?;
        rx.await.context("data plane stopped")
    }

    /// Asks the worker to stop.
    async fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown).await;
    }
}

/// All workers, as the control plane sees them.
#[derive(Debug, Clone)]
pub struct Dataplane {
    workers: Vec<Handle>,
}

impl Dataplane {
    /// Applies a desired state on every worker. Address events of all
    /// workers are returned together (an address moving between two sites of
    /// different workers is removed by one and added by the other).
    ///
    /// # Errors
    /// When a worker has stopped.
    pub async fn apply(&self, desired: GatewayDesiredState) -> anyhow::Result<ApplyResult> {
        let mut applied = None;
        let mut events = Vec::new();
        for (i, w) in self.workers.iter().enumerate() {
            let r = w.apply(desired.clone()).await?;
            // Every worker validates the same document the same way.
            if i == 0 {
                applied = r.applied;
            }
            events.extend(r.events);
        }
        Ok(ApplyResult { applied, events })
    }

    /// Counters and peers of all workers together.
    ///
    /// # Errors
    /// When a worker has stopped.
    pub async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let mut all: Option<Snapshot> = None;
        for w in &self.workers {
            let s = w.snapshot().await?;
            match &mut all {
                None => all = Some(s),
                Some(a) => {
                    a.peers.extend(s.peers);
                    a.counters.drops.merge(&s.counters.drops);
                    a.counters.icmp_unreachable_sent += s.counters.icmp_unreachable_sent;
                    a.counters.cookie_replies_sent += s.counters.cookie_replies_sent;
                    a.io.merge(&s.io);
                    a.applied_version = a.applied_version.min(s.applied_version);
                }
            }
        }
        let mut all = all.context("no data-plane workers")?;
        all.peers.sort_by_key(|p| p.site_id);
        Ok(all)
    }

    /// Stops every worker.
    pub async fn shutdown(&self) {
        for w in &self.workers {
            w.shutdown().await;
        }
    }
}

/// A datagram (`from` set) or TUN packet (`from` unset) for another worker.
#[derive(Debug)]
struct Handoff {
    from: Option<SocketAddr>,
    buf: Vec<u8>,
    origin: usize,
}

/// A worker's links to the others.
struct Mesh {
    me: usize,
    to: Vec<mpsc::Sender<Handoff>>,
    rx: mpsc::Receiver<Handoff>,
    recycle_to: Vec<std::sync::mpsc::Sender<Vec<u8>>>,
    recycled: std::sync::mpsc::Receiver<Vec<u8>>,
    free: Vec<Vec<u8>>,
}

impl Mesh {
    fn send(&mut self, to: u16, from: Option<SocketAddr>, bytes: &[u8], io: &mut IoCounters) {
        let Some(tx) = self.to.get(usize::from(to)) else {
            io.handoff_dropped += 1;
            return;
        };
        let mut buf = self
            .free
            .pop()
            .or_else(|| self.recycled.try_recv().ok())
            .unwrap_or_else(|| Vec::with_capacity(SEGMENT_BUF));
        buf.clear();
        buf.extend_from_slice(bytes);
        match tx.try_send(Handoff {
            from,
            buf,
            origin: self.me,
        }) {
            Ok(()) => io.handoffs_sent += 1,
            Err(e) => {
                io.handoff_dropped += 1;
                let (mpsc::error::TrySendError::Full(h) | mpsc::error::TrySendError::Closed(h)) = e;
                self.free.push(h.buf);
            }
        }
    }

    fn give_back(&mut self, h: Handoff) {
        if h.origin == self.me {
            self.free.push(h.buf);
        } else if let Some(tx) = self.recycle_to.get(h.origin) {
            let _ = tx.send(h.buf);
        }
    }
}

/// What a worker needs to start.
pub struct WorkerSetup {
    /// The sans-IO gateway, owning this worker's shard of peers.
    pub state: GatewayState,
    /// The bound UDP socket.
    pub socket: std::net::UdpSocket,
    /// This worker's queue of the TUN device.
    pub tun: SyncDevice,
}

/// Starts one thread per worker. Returns once every worker runs (or one failed).
///
/// # Errors
/// When a thread, its runtime or its TUN queue cannot be set up.
pub fn spawn(
    setups: Vec<WorkerSetup>,
) -> anyhow::Result<(Dataplane, Vec<std::thread::JoinHandle<anyhow::Result<()>>>)> {
    let n = setups.len();
    let (handoff_tx, handoff_rx): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::channel(4096)).unzip();
    let (recycle_tx, recycle_rx): (Vec<_>, Vec<_>) =
        (0..n).map(|_| std::sync::mpsc::channel()).unzip();
    let mut workers = Vec::new();
    let mut threads = Vec::new();
    for (i, ((setup, rx), recycled)) in setups
        .into_iter()
        .zip(handoff_rx)
        .zip(recycle_rx)
        .enumerate()
    {
        let mesh = Mesh {
            me: i,
            to: handoff_tx.clone(),
            rx,
            recycle_to: recycle_tx.clone(),
            recycled,
            free: Vec::new(),
        };
        let (handle, thread) = spawn_one(format!("gateway-dp{i}"), setup, mesh)?;
        workers.push(handle);
        threads.push(thread);
    }
    Ok((Dataplane { workers }, threads))
}

fn spawn_one(
    name: String,
    setup: WorkerSetup,
    mesh: Mesh,
) -> anyhow::Result<(Handle, std::thread::JoinHandle<anyhow::Result<()>>)> {
    let (tx, rx) = mpsc::channel(16);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    let thread = std::thread::Builder::new()
        .name(name.clone())
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
                let worker = match Worker::new(setup, rx, mesh) {
                    Ok(w) => {
                        let _ = ready_tx.send(Ok(()));
                        w
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!("{e:#}")));
                        return Err(e);
                    }
                };
                worker.run().await
            })
        })
        .with_context(|| format!("starting thread {name}"))?;
    ready_rx
        .recv()
        .context("data plane thread ended during start")??;
    Ok((Handle { tx }, thread))
}

struct Worker {
    state: GatewayState,
    udp: UdpSocket,
    udp_state: quinn_udp::UdpSocketState,
    tun: Arc<AsyncDevice>,
    cmds: mpsc::Receiver<Command>,
    mesh: Mesh,
}

impl Worker {
    fn new(setup: WorkerSetup, cmds: mpsc::Receiver<Command>, mesh: Mesh) -> anyhow::Result<Self> {
        let tun = AsyncDevice::new(setup.tun).context("registering the TUN queue")?;
        setup
            .socket
            .set_nonblocking(true)
            .context("UDP socket non-blocking")?;
        let udp_state =
            quinn_udp::UdpSocketState::new((&setup.socket).into()).context("UDP socket options")?;
        // Large socket buffers absorb bursts between wake-ups.
        let _ = udp_state.set_recv_buffer_size((&setup.socket).into(), 8 << 20);
        let _ = udp_state.set_send_buffer_size((&setup.socket).into(), 8 << 20);
        let udp = UdpSocket::from_std(setup.socket).context("registering the UDP socket")?;
        tracing::info!(
            worker = mesh.me,
            tcp_gso = tun.tcp_gso(),
            udp_gso_tun = tun.udp_gso(),
            udp_gso_segments = udp_state.max_gso_segments(),
            udp_gro_segments = udp_state.gro_segments(),
            "data plane ready"
        );
        Ok(Self {
            state: setup.state,
            udp,
            udp_state,
            tun: Arc::new(tun),
            cmds,
            mesh,
        })
    }

    async fn run(self) -> anyhow::Result<()> {
        let Worker {
            mut state,
            udp,
            udp_state,
            tun,
            mut cmds,
            mut mesh,
        } = self;
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
        // TUN packets handed over by other workers, waiting for encryption.
        let mut handed_tun: Vec<Handoff> = Vec::new();

        loop {
            let deadline = state.poll_timeout();
            tokio::select! {
                biased;
                cmd = cmds.recv() => {
                    match cmd {
                        None | Some(Command::Shutdown) => break,
                        Some(Command::Apply(desired, reply)) => {
                            let applied = state.handle_control(&desired, Instant::now());
                            let events = std::iter::from_fn(|| state.poll_event()).collect();
                            let _ = reply.send(ApplyResult { applied, events });
                        }
                        Some(Command::Snapshot(reply)) => {
                            let _ = reply.send(Snapshot {
                                at: Instant::now(),
                                peers: state.peers().collect(),
                                counters: state.counters(),
                                applied_version: state.applied_version(),
                                io,
                            });
                        }
                    }
                }
                r = udp.readable() => {
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "UDP socket");
                        io.io_errors += 1;
                    }
                    for _ in 0..BUDGET {
                        let n = {
                            let mut iovs: [IoSliceMut<'_>; UDP_BATCH] =
                                udp_in.each_mut_array().map(|b| IoSliceMut::new(&mut b[..]));
                            match udp.try_io(Interest::READABLE, || {
                                udp_state.recv((&udp).into(), &mut iovs, &mut metas)
                            }) {
                                Ok(n) => n,
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                                Err(e) => {
                                    tracing::debug!(error = %e, "UDP receive");
                                    io.io_errors += 1;
                                    break;
                                }
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
                                match state.handle_network_input_into(
                                    meta.addr,
                                    dgram,
                                    &mut b[TUN_OFFSET..need],
                                    now,
                                ) {
                                    NetworkOutcome::Tunnel(p) => {
                                        let len = p.len();
                                        b.truncate(TUN_OFFSET + len);
                                        k += 1;
                                    }
                                    NetworkOutcome::Handoff(owner) => {
                                        mesh.send(owner, Some(meta.addr), dgram, &mut io);
                                    }
                                    NetworkOutcome::Consumed | NetworkOutcome::Dropped(_) => {}
                                }
                            }
                        }
                        k = queue_tun_outputs(&mut state, &mut tun_out, k);
                        write_tun(&tun, &mut gro, &mut tun_out[..k], &mut io).await;
                        send_transmits(&mut state, &udp, &udp_state, &mut io).await;
                    }
                }
                r = tun.recv_multiple(&mut tun_orig, &mut tun_in, &mut tun_sizes, 0) => {
                    let mut result = r;
                    // The open GSO train carries over to the next read while
                    // more is ready: one super-packet is often only a few
                    // segments, and one train per read would mean one
                    // `sendmsg` (and one skb through both kernels) for each.
                    let mut open: Option<Train> = None;
                    for round in 0..BUDGET {
                        let n = match result {
                            Ok(n) => n,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) if e.raw_os_error().is_some_and(|c| {
                                c == libc::EBADFD || c == libc::ENODEV || c == libc::EBADF
                            }) =>
                            {
                                // The device is gone (deleted under us): stop, and
                                // let the process exit and be restarted.
                                return Err(e).context("TUN device");
                            }
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
                            tun_in.iter().zip(tun_sizes.iter()).take(n).map(|(b, s)| &b[..*s]),
                            &mut udp_out,
                            &mut open,
                            &udp,
                            &udp_state,
                            Some(&mut mesh),
                            now,
                            &mut io,
                        )
                        .await;
                        let k = queue_tun_outputs(&mut state, &mut tun_out, 0);
                        write_tun(&tun, &mut gro, &mut tun_out[..k], &mut io).await;
                        send_transmits(&mut state, &udp, &udp_state, &mut io).await;
                        if round + 1 < BUDGET {
                            result = tun.try_recv_multiple(
                                &mut tun_orig,
                                &mut tun_in,
                                &mut tun_sizes,
                                0,
                            );
                        }
                    }
                    flush_train(&udp, &udp_state, &udp_out, &mut open, &mut io).await;
                }
                Some(first) = mesh.rx.recv() => {
                    let now = Instant::now();
                    let mut next = Some(first);
                    let mut k = 0;
                    let mut budget = BUDGET * 4;
                    while let Some(h) = next.take() {
                        if let Some(from) = h.from {
                            if k == tun_out.len() {
                                tun_out.push(Vec::with_capacity(TUN_OFFSET + SEGMENT_BUF));
                            }
                            let b = &mut tun_out[k];
                            let need = TUN_OFFSET + wg::buffer_len(h.buf.len());
                            if b.len() < need {
                                b.resize(need, 0);
                            }
                            match state.handle_network_input_into(
                                from,
                                &h.buf,
                                &mut b[TUN_OFFSET..need],
                                now,
                            ) {
                                NetworkOutcome::Tunnel(p) => {
                                    let len = p.len();
                                    b.truncate(TUN_OFFSET + len);
                                    k += 1;
                                }
                                // Owners never disagree (site id % workers), so a
                                // second handoff cannot happen; drop rather than loop.
                                NetworkOutcome::Handoff(_) => io.handoff_dropped += 1,
                                NetworkOutcome::Consumed | NetworkOutcome::Dropped(_) => {}
                            }
                            mesh.give_back(h);
                        } else {
                            handed_tun.push(h);
                        }
                        budget -= 1;
                        if budget > 0 {
                            next = mesh.rx.try_recv().ok();
                        }
                    }
                    io.handoffs_received += (BUDGET * 4 - budget) as u64;
                    let k = queue_tun_outputs(&mut state, &mut tun_out, k);
                    write_tun(&tun, &mut gro, &mut tun_out[..k], &mut io).await;
                    if !handed_tun.is_empty() {
                        let mut open = None;
                        encrypt_and_send(
                            &mut state,
                            handed_tun.iter().map(|h| &h.buf[..]),
                            &mut udp_out,
                            &mut open,
                            &udp,
                            &udp_state,
                            None,
                            now,
                            &mut io,
                        )
                        .await;
                        flush_train(&udp, &udp_state, &udp_out, &mut open, &mut io).await;
                        for h in handed_tun.drain(..) {
                            mesh.give_back(h);
                        }
                        let k = queue_tun_outputs(&mut state, &mut tun_out, 0);
                        write_tun(&tun, &mut gro, &mut tun_out[..k], &mut io).await;
                    }
                    send_transmits(&mut state, &udp, &udp_state, &mut io).await;
                }
                () = sleep_until(deadline) => {
                    state.handle_timeout(Instant::now());
                    let k = queue_tun_outputs(&mut state, &mut tun_out, 0);
                    write_tun(&tun, &mut gro, &mut tun_out[..k], &mut io).await;
                    send_transmits(&mut state, &udp, &udp_state, &mut io).await;
                }
            }
        }
        tracing::info!("data plane stopped");
        Ok(())
    }
}

/// Arrays of `IoSliceMut` without allocating.
trait EachMutArray {
    fn each_mut_array(&mut self) -> [&mut Vec<u8>; UDP_BATCH];
}

impl EachMutArray for Vec<Vec<u8>> {
    fn each_mut_array(&mut self) -> [&mut Vec<u8>; UDP_BATCH] {
        let mut it = self.iter_mut();
        std::array::from_fn(|_| it.next().expect("UDP_BATCH buffers allocated"))
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Appends packets the state queued for the TUN device (ICMP errors) after the
/// first `k` buffers; returns the new count.
fn queue_tun_outputs(state: &mut GatewayState, bufs: &mut Vec<Vec<u8>>, mut k: usize) -> usize {
    while let Some(p) = state.poll_tun_output() {
        if k == bufs.len() {
            bufs.push(Vec::with_capacity(TUN_OFFSET + SEGMENT_BUF));
        }
        let b = &mut bufs[k];
        b.clear();
        b.resize(TUN_OFFSET, 0);
        b.extend_from_slice(&p);
        state.recycle(p);
        k += 1;
    }
    k
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
    io.tun_write_batches += 1;
    io.tun_packets_written += bufs.len() as u64;
    if let Err(e) = tun.send_multiple(gro, bufs, TUN_OFFSET).await {
        tracing::debug!(error = %e, "TUN write");
        io.io_errors += 1;
    }
}

/// A run of datagrams to one destination in the send buffer.
struct Train {
    dst: SocketAddr,
    segment: usize,
    start: usize,
    end: usize,
    count: usize,
    /// A shorter datagram ended the train (only the last may be shorter).
    closed: bool,
}

/// Encrypts TUN packets and sends them in GSO trains. Packets of another
/// worker's peers are handed to it through `mesh` (or dropped when `mesh` is
/// `None`: they were handed over already).
///
/// The last train may stay open in `open` (its datagrams in `out`) so that
/// the packets of the next call can extend it; the caller sends it with
/// [`flush_train`] when nothing more is ready.
#[allow(clippy::too_many_arguments)]
async fn encrypt_and_send<'a>(
    state: &mut GatewayState,
    packets: impl Iterator<Item = &'a [u8]>,
    out: &mut [u8],
    open: &mut Option<Train>,
    udp: &UdpSocket,
    udp_state: &quinn_udp::UdpSocketState,
    mut mesh: Option<&mut Mesh>,
    now: Instant,
    io: &mut IoCounters,
) {
    let max_segments = udp_state.max_gso_segments().max(1);
    let mut train = open.take();
    // Every datagram written so far belongs to the open train or was sent.
    let mut pos = train.as_ref().map_or(0, |t| t.end);
    for packet in packets {
        let need = wg::buffer_len(packet.len());
        if pos + need > out.len() {
            if let Some(t) = train.take() {
                send_train(udp, udp_state, &out[t.start..t.end], &t, io).await;
            }
            pos = 0;
        }
        let (dst, len) = match state.handle_tun_input_into(packet, &mut out[pos..pos + need], now) {
            TunOutcome::Send { dst, datagram } => (dst, datagram.len()),
            TunOutcome::Handoff(owner) => {
                match mesh.as_deref_mut() {
                    Some(m) => m.send(owner, None, packet, io),
                    None => io.handoff_dropped += 1,
                }
                continue;
            }
            TunOutcome::Queued | TunOutcome::Dropped(_) => continue,
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
                send_train(udp, udp_state, &out[t.start..t.end], &t, io).await;
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

/// Sends the train [`encrypt_and_send`] left open, if any.
async fn flush_train(
    udp: &UdpSocket,
    udp_state: &quinn_udp::UdpSocketState,
    out: &[u8],
    open: &mut Option<Train>,
    io: &mut IoCounters,
) {
    if let Some(t) = open.take() {
        send_train(udp, udp_state, &out[t.start..t.end], &t, io).await;
    }
}

async fn send_train(
    udp: &UdpSocket,
    udp_state: &quinn_udp::UdpSocketState,
    contents: &[u8],
    t: &Train,
    io: &mut IoCounters,
) {
    let transmit = quinn_udp::Transmit {
        destination: t.dst,
        ecn: None,
        contents,
        segment_size: (t.count > 1).then_some(t.segment),
        src_ip: None,
    };
    io.udp_sends += 1;
    io.udp_datagrams_sent += t.count as u64;
    send_one(udp, udp_state, &transmit, io).await;
}

async fn send_one(
    udp: &UdpSocket,
    udp_state: &quinn_udp::UdpSocketState,
    transmit: &quinn_udp::Transmit<'_>,
    io: &mut IoCounters,
) {
    loop {
        match udp.try_io(Interest::WRITABLE, || udp_state.send(udp.into(), transmit)) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if udp.writable().await.is_err() {
                    io.io_errors += 1;
                    return;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, dst = %transmit.destination, "UDP send");
                io.io_errors += 1;
                return;
            }
        }
    }
}

async fn send_transmits(
    state: &mut GatewayState,
    udp: &UdpSocket,
    udp_state: &quinn_udp::UdpSocketState,
    io: &mut IoCounters,
) {
    while let Some(t) = state.poll_transmit() {
        let transmit = quinn_udp::Transmit {
            destination: t.dst,
            ecn: None,
            contents: &t.payload,
            segment_size: None,
            src_ip: None,
        };
        io.udp_sends += 1;
        io.udp_datagrams_sent += 1;
        send_one(udp, udp_state, &transmit, io).await;
        state.recycle(t.payload);
    }
}
