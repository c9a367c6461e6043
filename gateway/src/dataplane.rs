//! The data plane: worker threads that pump packets between the gateway's
//! UDP sockets and its TUN queues through [`GatewayState`].
//!
//! The batched IO (UDP GSO/GRO, TUN offload, GSO trains) is the shared
//! [`vpnnat_dataplane::pump::Pump`]; this module plugs the gateway's packet
//! logic into it ([`GatewayPath`]) and adds what only the gateway has: several
//! workers with the hand-off between them, and its commands.
//!
//! The event loop takes commands from the control plane first, then ready IO
//! (bounded work per wake-up), then hand-offs, then due timers; queued
//! outputs leave after each step (docs/DESIGN.md, "Data plane").
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
//!
//! **One handshake admission per gateway.** The workers' states share one
//! responder ([`GatewayState::shards`]): one cookie secret, one handshake
//! limit and one token bucket per source address. The worker that receives
//! an initiation admits it; the owner takes a handed-over one without
//! checking it again ([`GatewayState::handle_handed_over_input_into`]), so a
//! cookie is valid whichever worker the retry reaches and an initiation is
//! counted once.
//!
//! **IPsec ports.** A gateway that runs IPsec has two more sockets per worker
//! on the same pump: IKE on UDP 500 and NAT-T on UDP 4500 (RFC 7296 §2.23,
//! RFC 3948). The core takes both ports' datagrams in one form (as on 4500;
//! a datagram of 500 behind [`IKE_500_TAG`], see [`vpnnat::tunnel::ipsec`]),
//! so the tag is put on and taken off here, at the IO boundary: what the
//! IKE socket receives gets the tag in front, and a datagram the core sends
//! leaves from the IKE socket without the tag when it has one, from the
//! NAT-T socket when it belongs to an IPsec peer, and from the WireGuard
//! socket otherwise ([`egress`]).

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot};
use tun_rs::{AsyncDevice, SyncDevice};
use vpnnat::gateway::{
    GatewayCounters, GatewayEvent, GatewayState, NetworkOutcome, NextKeyShare, PeerView, TunOutcome,
};
use vpnnat::messages::{AppliedState, GatewayDesiredState, TunnelKind};
use vpnnat::tunnel::ipsec::{IKE_500_TAG, looks_like_wireguard};
use vpnnat::tunnel::{Kinds, PrivateKey};
use vpnnat_dataplane::pump::{BUDGET, Pump};
use vpnnat_dataplane::stream::{Inbox, StreamTable};
use vpnnat_dataplane::tun::SEGMENT_BUF;
use vpnnat_dataplane::udp::{UDP_BUF, Udp};
use vpnnat_dataplane::{Datagram, PacketPath, Sent, Step, Via, sleep_until, worker};

pub use vpnnat_dataplane::IoCounters;

/// A request from the control plane.
#[derive(Debug)]
pub enum Command {
    /// Reconcile to a desired state.
    Apply(Box<GatewayDesiredState>, oneshot::Sender<ApplyResult>),
    /// Report counters and peers.
    Snapshot(oneshot::Sender<Snapshot>),
    /// Start (`Some`) or abandon (`None`) a rotation of the gateway's key
    /// at this worker; answers that many copies of what the other workers
    /// take ([`Command::ShareNextKey`]).
    SetNextKey(Option<PrivateKey>, usize, oneshot::Sender<Vec<NextKey>>),
    /// Take the next key another worker set, with its cookie secrets.
    ShareNextKey(NextKey, oneshot::Sender<()>),
    /// End a rotation of the gateway's key: the next key becomes the only one.
    PromoteNextKey(oneshot::Sender<bool>),
    /// Stop the worker.
    Shutdown,
}

/// A worker's next key for the others ([`vpnnat::gateway::NextKeyShare`] of
/// the workers' tunnel kinds, which this command type does not name).
pub type NextKey = Box<dyn std::any::Any + Send>;

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
    /// During a rotation of the gateway's key: the WireGuard peers that
    /// handshook with the next key, and all WireGuard peers.
    pub on_next_key: (usize, usize),
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
        worker::request(&self.tx, |reply| Command::Apply(Box::new(desired), reply)).await
    }

    /// The worker's counters and peers.
    ///
    /// # Errors
    /// When the worker has stopped.
    async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        worker::request(&self.tx, Command::Snapshot).await
    }

    /// Starts or abandons a rotation of the gateway's key at this worker;
    /// `copies` of its next key for the other workers.
    async fn set_next_key(
        &self,
        next: Option<PrivateKey>,
        copies: usize,
    ) -> anyhow::Result<Vec<NextKey>> {
        worker::request(&self.tx, |reply| Command::SetNextKey(next, copies, reply)).await
    }

    /// Takes the next key another worker set.
    async fn share_next_key(&self, share: NextKey) -> anyhow::Result<()> {
        worker::request(&self.tx, |reply| Command::ShareNextKey(share, reply)).await
    }

    /// Ends a rotation of the gateway's key at this worker.
    async fn promote_next_key(&self) -> anyhow::Result<bool> {
        worker::request(&self.tx, Command::PromoteNextKey).await
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
                    a.counters
                        .ftp_expectations
                        .merge(&s.counters.ftp_expectations);
                    a.io.merge(&s.io);
                    a.applied_version = a.applied_version.min(s.applied_version);
                    a.on_next_key.0 += s.on_next_key.0;
                    a.on_next_key.1 += s.on_next_key.1;
                }
            }
        }
        let mut all = all.context("no data-plane workers")?;
        all.peers.sort_by_key(|p| p.site_id);
        Ok(all)
    }

    /// Starts (`Some`) or abandons (`None`) a rotation of the gateway's key
    /// at every worker: initiations to either key are answered, each peer's
    /// tunnel holding the key its agent dialed.
    ///
    /// # Errors
    /// When a worker has stopped.
    pub async fn set_next_key(&self, next: Option<PrivateKey>) -> anyhow::Result<()> {
        let Some((first, rest)) = self.workers.split_first() else {
            return Ok(());
        };
        if next.is_none() {
            for w in &self.workers {
                w.set_next_key(None, 0).await?;
            }
            return Ok(());
        }
        // Made once, then shared: one cookie secret per key for the whole
        // gateway, as for the current key.
        let shares = first.set_next_key(next, rest.len()).await?;
        for (w, share) in rest.iter().zip(shares) {
            w.share_next_key(share).await?;
        }
        Ok(())
    }

    /// Ends a rotation of the gateway's key at every worker; `false` when
    /// none was under way.
    ///
    /// # Errors
    /// When a worker has stopped.
    pub async fn promote_next_key(&self) -> anyhow::Result<bool> {
        let mut promoted = false;
        for w in &self.workers {
            promoted |= w.promote_next_key().await?;
        }
        Ok(promoted)
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
pub struct WorkerSetup<K: Kinds> {
    /// The sans-IO gateway, owning this worker's shard of peers.
    pub state: GatewayState<K>,
    /// The bound WireGuard socket.
    pub socket: std::net::UdpSocket,
    /// The bound IKE (UDP 500) and NAT-T (UDP 4500) sockets, when the
    /// gateway runs IPsec.
    pub ipsec: Option<(std::net::UdpSocket, std::net::UdpSocket)>,
    /// This worker's queue of the TUN device.
    pub tun: SyncDevice,
    /// The TLS fallback's streams (virtual endpoints) and this worker's
    /// inbox of their datagrams.
    pub streams: (StreamTable, Inbox),
}

/// Starts one thread per worker. Returns once every worker runs (or one failed).
///
/// # Errors
/// When a thread, its runtime or its TUN queue cannot be set up.
pub fn spawn<K: Kinds>(
    setups: Vec<WorkerSetup<K>>,
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
        let (tx, cmds) = mpsc::channel(16);
        let thread = worker::spawn(
            format!("gateway-dp{i}"),
            move || Worker::new(setup, cmds, mesh),
            Worker::run,
        )?;
        workers.push(Handle { tx });
        threads.push(thread);
    }
    Ok((Dataplane { workers }, threads))
}

/// The pump's sockets of the IPsec ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IpsecVia {
    /// IKE, UDP 500: datagrams carry [`IKE_500_TAG`] in the core.
    ike: Via,
    /// NAT-T, UDP 4500: ESP and IKE as on the wire.
    nat_t: Via,
}

/// The socket a datagram from the core leaves from, and whether the
/// port-500 tag comes off first. `kind` is the kind of the peer whose
/// tunnel made it (`None`: an answer of a responder before any peer is
/// known, which its shape tells: only WireGuard's messages start with a
/// type 1–4 and three zero bytes). A WireGuard peer's datagram never starts
/// with the tag (its first byte is its type), and an ESP SPI is the peer's
/// choice, so an IPsec peer's datagram goes by its peer, not its shape.
fn egress(ipsec: Option<IpsecVia>, kind: Option<TunnelKind>, datagram: &[u8]) -> (Via, bool) {
    let Some(p) = ipsec else {
        return (Via::MAIN, false);
    };
    let wireguard = match kind {
        Some(k) => k == TunnelKind::Wireguard,
        None => looks_like_wireguard(datagram),
    };
    if wireguard {
        (Via::MAIN, false)
    } else if datagram.starts_with(&IKE_500_TAG) {
        (p.ike, true)
    } else {
        (p.nat_t, false)
    }
}

/// The gateway's packet logic as the pump drives it: [`GatewayState`], with
/// packets of another worker's peers handed to that worker.
struct GatewayPath<K: Kinds> {
    state: GatewayState<K>,
    mesh: Mesh,
    /// The packets being processed were handed over by another worker.
    handed_over: bool,
    /// The IPsec ports' sockets, when the gateway runs IPsec.
    ipsec: Option<IpsecVia>,
    /// A datagram of the IKE port with the tag in front (allocated once;
    /// IKE is rare, so one copy per message costs nothing that matters).
    tagged: Vec<u8>,
}

impl Mesh {
    /// Hands `bytes` to the worker `owner` unless they were handed over
    /// already (`handed_over`).
    fn hand_off(
        &mut self,
        handed_over: bool,
        owner: u16,
        from: Option<SocketAddr>,
        bytes: &[u8],
        io: &mut IoCounters,
    ) {
        if handed_over {
            // Owners never disagree (site id % workers), so a second handoff
            // cannot happen; drop rather than loop.
            io.handoff_dropped += 1;
        } else {
            self.send(owner, from, bytes, io);
        }
    }
}

impl<K: Kinds> PacketPath for GatewayPath<K> {
    fn room(&self, len: usize) -> usize {
        // Room for the tag of a datagram of the IKE port, too.
        K::buffer_len(len + IKE_500_TAG.len())
    }

    fn encapsulate(&mut self, packet: &mut [u8], out: &mut [u8], step: &mut Step) -> Sent {
        match self.state.handle_tun_input_into(packet, out, step.now) {
            TunOutcome::Send {
                dst,
                kind,
                datagram,
            } => {
                let len = datagram.len();
                match egress(self.ipsec, Some(kind), datagram) {
                    (via, false) => Some((dst, via, len)),
                    (via, true) => {
                        // A responder tunnel never dials, so no IKE message
                        // leaves here today; should one, it leaves untagged.
                        out.copy_within(IKE_500_TAG.len()..len, 0);
                        Some((dst, via, len - IKE_500_TAG.len()))
                    }
                }
            }
            TunOutcome::Handoff(owner) => {
                self.mesh
                    .hand_off(self.handed_over, owner, None, packet, step.io);
                None
            }
            TunOutcome::Queued | TunOutcome::Dropped(_) => None,
        }
    }

    fn decapsulate(&mut self, dgram: Datagram, out: &mut [u8], step: &mut Step) -> Option<usize> {
        let Datagram { from, bytes, via } = dgram;
        let bytes = match self.ipsec {
            Some(p) if via == p.ike => {
                // UDP 500 → the core's form: the tag in front. `tagged`
                // holds a whole receive buffer and the tag.
                let n = IKE_500_TAG.len() + bytes.len();
                let buf = self.tagged.get_mut(..n)?;
                buf[..IKE_500_TAG.len()].copy_from_slice(&IKE_500_TAG);
                buf[IKE_500_TAG.len()..].copy_from_slice(bytes);
                &self.tagged[..n]
            }
            _ => bytes,
        };
        let outcome = if self.handed_over {
            // The receiving worker admitted it (one admission per gateway).
            self.state
                .handle_handed_over_input_into(from, bytes, out, step.now)
        } else {
            self.state
                .handle_network_input_into(from, bytes, out, step.now)
        };
        match outcome {
            NetworkOutcome::Tunnel(p) => Some(p.len()),
            NetworkOutcome::Handoff(owner) => {
                self.mesh
                    .hand_off(self.handed_over, owner, Some(from), bytes, step.io);
                None
            }
            NetworkOutcome::Consumed | NetworkOutcome::Dropped(_) => None,
        }
    }

    fn poll_tun_output(&mut self) -> Option<Vec<u8>> {
        self.state.poll_tun_output()
    }

    fn poll_transmit(&mut self) -> Option<(SocketAddr, Via, Vec<u8>)> {
        let mut t = self.state.poll_transmit()?;
        let (via, untag) = egress(self.ipsec, t.kind, &t.payload);
        if untag {
            t.payload.drain(..IKE_500_TAG.len());
        }
        Some((t.dst, via, t.payload))
    }

    fn recycle(&mut self, buf: Vec<u8>) {
        self.state.recycle(buf);
    }
}

struct Worker<K: Kinds> {
    pump: Pump,
    path: GatewayPath<K>,
    cmds: mpsc::Receiver<Command>,
    /// TUN packets handed over by other workers, waiting for encryption.
    handed_tun: Vec<Handoff>,
}

impl<K: Kinds> Worker<K> {
    fn new(
        setup: WorkerSetup<K>,
        cmds: mpsc::Receiver<Command>,
        mesh: Mesh,
    ) -> anyhow::Result<Self> {
        let tun = AsyncDevice::new(setup.tun).context("registering the TUN queue")?;
        let udp = Udp::new(setup.socket)?;
        tracing::info!(
            worker = mesh.me,
            tcp_gso = tun.tcp_gso(),
            udp_gso_tun = tun.udp_gso(),
            udp_gso_segments = udp.max_gso_segments(),
            udp_gro_segments = udp.gro_segments(),
            "data plane ready"
        );
        let mut pump = Pump::new(udp, tun, K::DATA_OVERHEAD + IKE_500_TAG.len());
        let ipsec = match setup.ipsec {
            Some((ike, nat_t)) => Some(IpsecVia {
                ike: pump.add_socket(Udp::new(ike)?)?,
                nat_t: pump.add_socket(Udp::new(nat_t)?)?,
            }),
            None => None,
        };
        let (streams, inbox) = setup.streams;
        pump.set_streams(streams, inbox);
        Ok(Self {
            pump,
            path: GatewayPath {
                state: setup.state,
                mesh,
                handed_over: false,
                ipsec,
                tagged: if ipsec.is_some() {
                    vec![0; UDP_BUF + IKE_500_TAG.len()]
                } else {
                    Vec::new()
                },
            },
            cmds,
            handed_tun: Vec::new(),
        })
    }

    async fn run(mut self) -> anyhow::Result<()> {
        loop {
            let deadline = self.path.state.poll_timeout();
            tokio::select! {
                biased;
                cmd = self.cmds.recv() => {
                    if !self.on_command(cmd) {
                        break;
                    }
                }
                ready = self.pump.ready() => {
                    self.pump
                        .on_ready(&mut self.path, ready)
                        .await
                        .context("TUN device")?;
                }
                Some(first) = self.path.mesh.rx.recv() => self.on_handoff(first).await,
                () = sleep_until(deadline) => self.on_timer().await,
            }
        }
        tracing::info!("data plane stopped");
        Ok(())
    }

    /// Handles a command; returns `false` on shutdown.
    fn on_command(&mut self, cmd: Option<Command>) -> bool {
        let state = &mut self.path.state;
        match cmd {
            None | Some(Command::Shutdown) => return false,
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
                    io: self.pump.io,
                    on_next_key: state.peers_on_next_key(),
                });
            }
            Some(Command::SetNextKey(next, copies, reply)) => {
                state.set_next_key(next);
                let shares = (0..copies)
                    .map(|_| Box::new(state.next_key_share()) as NextKey)
                    .collect();
                let _ = reply.send(shares);
            }
            Some(Command::ShareNextKey(share, reply)) => {
                match share.downcast::<NextKeyShare<K>>() {
                    Ok(share) => state.share_next_key(&share),
                    // Every worker runs the same kinds.
                    Err(_) => tracing::error!("a next key of other tunnel kinds: ignored"),
                }
                let _ = reply.send(());
            }
            Some(Command::PromoteNextKey(reply)) => {
                let _ = reply.send(state.promote_next_key(Instant::now()));
            }
        }
        true
    }

    /// Packets other workers handed over (datagrams of this worker's peers,
    /// TUN packets for them), up to a budget.
    async fn on_handoff(&mut self, first: Handoff) {
        let now = Instant::now();
        let budget = BUDGET * 4;
        let mut taken = 0;
        let mut next = Some(first);
        self.path.handed_over = true;
        while let Some(h) = next.take() {
            match h.from {
                Some(from) => {
                    // Already in the core's form (tagged when it came on 500).
                    let dgram = Datagram {
                        from,
                        bytes: &h.buf,
                        via: Via::MAIN,
                    };
                    self.pump.decapsulate(&mut self.path, dgram, now);
                    self.path.mesh.give_back(h);
                }
                None => self.handed_tun.push(h),
            }
            taken += 1;
            if taken < budget {
                next = self.path.mesh.rx.try_recv().ok();
            }
        }
        self.pump.io.handoffs_received += taken as u64;
        self.pump.write_tun(&mut self.path).await;
        if !self.handed_tun.is_empty() {
            let packets = self.handed_tun.iter_mut().map(|h| &mut h.buf[..]);
            self.pump
                .encapsulate_and_send(&mut self.path, packets, now)
                .await;
            for h in self.handed_tun.drain(..) {
                self.path.mesh.give_back(h);
            }
            self.pump.write_tun(&mut self.path).await;
        }
        self.path.handed_over = false;
        self.pump.send_transmits(&mut self.path).await;
    }

    /// Due timers (handshakes, keepalives, expiry), then what they queued.
    async fn on_timer(&mut self) {
        self.path.state.handle_timeout(Instant::now());
        self.pump.flush_outputs(&mut self.path).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PORTS: Option<IpsecVia> = Some(IpsecVia {
        ike: Via(1),
        nat_t: Via(2),
    });

    #[test]
    fn ike_of_port_500_leaves_from_the_ike_socket_without_its_tag() {
        let init = [&IKE_500_TAG[..], &[0x11; 28]].concat();
        assert_eq!(egress(PORTS, None, &init), (Via(1), true));
        assert_eq!(
            egress(PORTS, Some(TunnelKind::Ipsec), &init),
            (Via(1), true)
        );
    }

    #[test]
    fn an_ipsec_peers_datagrams_leave_from_nat_t_whatever_their_shape() {
        // IKE behind the non-ESP marker, a keepalive, ESP.
        for d in [
            &[0, 0, 0, 0, 0x11, 0x22][..],
            &[0xff],
            &[0xc1, 2, 3, 4, 0, 0, 0, 1],
        ] {
            assert_eq!(egress(PORTS, Some(TunnelKind::Ipsec), d), (Via(2), false));
            assert_eq!(egress(PORTS, None, d), (Via(2), false));
        }
        // ESP to an SPI the peer chose as 0x02000000 looks like a WireGuard
        // message; the peer's kind decides.
        let esp = [2, 0, 0, 0, 0, 0, 0, 1, 0xaa];
        assert_eq!(
            egress(PORTS, Some(TunnelKind::Ipsec), &esp),
            (Via(2), false)
        );
    }

    #[test]
    fn wireguard_leaves_from_the_main_socket() {
        let data = [4, 0, 0, 0, 7, 0, 0, 0, 1, 2, 3];
        let cookie = [3, 0, 0, 0, 7, 0, 0, 0];
        assert_eq!(
            egress(PORTS, Some(TunnelKind::Wireguard), &data),
            (Via::MAIN, false)
        );
        assert_eq!(egress(PORTS, None, &cookie), (Via::MAIN, false));
        // Without IPsec ports everything leaves from the main socket.
        assert_eq!(egress(None, None, &[0, 0, 0, 0xF4, 1]), (Via::MAIN, false));
    }
}
