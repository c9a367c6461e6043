//! The data plane: one worker thread that pumps packets between the tunnel's
//! UDP socket and the LAN side (a TUN device in packet mode, the smoltcp
//! relay in netstack mode) through [`AgentState`].
//!
//! Packet mode is the shared [`vpnnat_dataplane::pump::Pump`] (batched IO
//! both ways, nothing allocated per packet, as the gateway's workers) with
//! the agent's packet logic plugged in ([`AgentPath`]: the NAT rewrites each
//! packet in place on its way through). Netstack mode receives the same way
//! and relays through [`Netstack`].
//!
//! The event loop takes commands first, then ready IO (bounded work per
//! wake-up), then due timers; queued outputs and events follow each step
//! (docs/DESIGN.md, "Data plane").
//!
//! **IPsec.** The agent runs IPsec tunnels too ([`Kinds`]: WireGuard and
//! IPsec) from the same socket: everything, IKE_SA_INIT included, goes to
//! the gateway's NAT-T port 4500 (RFC 7296 §2.23 lets an initiator use 4500
//! from the start; userspace cannot send raw ESP, so ESP is always in UDP,
//! RFC 3948, as strongSwan's `encap = yes`). The core makes datagrams for
//! port 500 behind a tag ([`IKE_500_TAG`]); on their way out here the tag
//! becomes the non-ESP marker that IKE carries on 4500. What comes back from
//! the gateway's 4500 is presented to the core as coming from the one
//! endpoint of its desired state (the gateway's IKE port), and anything from
//! that port itself gets the tag ([`AgentPath::decapsulate`]).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot};
use tun_rs::{AsyncDevice, SyncDevice};
use vpnnat::agent::{
    AgentCounters, AgentEvent, AgentState, LanOutcome, MappingView, NetworkOutcome, TunnelView,
};
use vpnnat::ipsec::esp::natt::NON_ESP_MARKER;
use vpnnat::ipsec::ike::NAT_T_PORT;
use vpnnat::messages::{
    AgentDesiredState, AppliedState, RequestId, TerminalName, TunnelKind, UnixMillis,
};
use vpnnat::tunnel::ipsec::IKE_500_TAG;
use vpnnat::tunnel::{BuiltinIpsec, Kinds as _};
use vpnnat_dataplane::pump::{BUDGET, Pump, Ready, next_chunk};
use vpnnat_dataplane::stream::{Inbox, StreamTable};
use vpnnat_dataplane::udp::{RecvBatch, UDP_BUF, Udp};
use vpnnat_dataplane::{Datagram, PacketPath, Sent, Step, Via, sleep_until, worker};

pub use vpnnat_dataplane::IoCounters;

/// The tunnel kinds the agent runs: WireGuard and IPsec.
pub type Kinds = BuiltinIpsec;

/// The agent's state with its kinds.
pub type State = AgentState<Kinds>;

use crate::netstack::{self, Netstack, NetstackCounters, RelayEvent};

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
        /// The document's own clock now (the server's time of its answer):
        /// expiry times count from it, not from this host's wall clock.
        reference: UnixMillis,
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
    /// The terminal's host moved to another LAN address (discovery saw its
    /// MAC there): its mappings follow, under the same NAT addresses.
    MoveTerminal {
        /// The terminal.
        terminal: TerminalName,
        /// Its new real address.
        real: Ipv4Addr,
        /// How many mappings moved.
        reply: oneshot::Sender<usize>,
    },
    /// Install only mappings of requests given by [`Command::ConsentTo`].
    RequireConsent(bool),
    /// The customer made this request on this agent.
    ConsentTo(RequestId),
    /// Test UDP while the tunnel is on the TLS stream: a handshake
    /// initiation leaves over UDP (the gateway answers the way it came).
    ProbeUdp,
    /// Use this tunnel key from now on (planned key rotation): a tunnel in
    /// use handshakes again with it at once.
    SetKey {
        /// The new key.
        key: vpnnat::tunnel::PrivateKey,
        /// Whether it changed.
        reply: oneshot::Sender<bool>,
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
    /// Data sent into the tunnel has gone unanswered this long (at least
    /// [`SILENCE_LIMIT`]): the gateway is gone or cut off.
    pub silent_for: Option<Duration>,
    /// The local UDP port of the tunnel.
    pub local_port: u16,
    /// When an authenticated datagram last arrived over UDP (not over the
    /// TLS fallback's stream).
    pub udp_heard: Option<Instant>,
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
        reference: UnixMillis,
    ) -> anyhow::Result<Option<AppliedState>> {
        worker::request(&self.tx, |reply| Command::Apply {
            desired: Box::new(desired),
            names,
            reference,
            reply,
        })
        .await
    }

    /// Points the mappings of `terminal` at its new real address
    /// ([`Command::MoveTerminal`]); returns how many moved.
    ///
    /// # Errors
    /// When the worker has stopped.
    pub async fn move_terminal(
        &self,
        terminal: TerminalName,
        real: Ipv4Addr,
    ) -> anyhow::Result<usize> {
        worker::request(&self.tx, |reply| Command::MoveTerminal {
            terminal,
            real,
            reply,
        })
        .await
    }

    /// Installs only mappings of requests passed to [`Self::consent_to`] (`true`).
    ///
    /// # Errors
    /// When the worker has stopped.
    pub async fn require_consent(&self, on: bool) -> anyhow::Result<()> {
        self.tx
            .send(Command::RequireConsent(on))
            .await
            .map_err(|_| anyhow::anyhow!("the data plane has stopped"))
    }

    /// The customer made request `id` here: its mappings may be installed.
    ///
    /// # Errors
    /// When the worker has stopped.
    pub async fn consent_to(&self, id: RequestId) -> anyhow::Result<()> {
        self.tx
            .send(Command::ConsentTo(id))
            .await
            .map_err(|_| anyhow::anyhow!("the data plane has stopped"))
    }

    /// Removes the mappings of request `id` at once and keeps them off.
    ///
    /// # Errors
    /// When the worker has stopped.
    pub async fn revoke(&self, id: RequestId) -> anyhow::Result<usize> {
        worker::request(&self.tx, |reply| Command::Revoke { id, reply }).await
    }

    /// Switches the tunnel key ([`Command::SetKey`]).
    ///
    /// # Errors
    /// When the worker has stopped.
    pub async fn set_key(&self, key: vpnnat::tunnel::PrivateKey) -> anyhow::Result<bool> {
        worker::request(&self.tx, |reply| Command::SetKey { key, reply }).await
    }

    /// Probes UDP while on the TLS stream ([`Command::ProbeUdp`]).
    ///
    /// # Errors
    /// When the worker has stopped.
    pub async fn probe_udp(&self) -> anyhow::Result<()> {
        self.tx
            .send(Command::ProbeUdp)
            .await
            .map_err(|_| anyhow::anyhow!("the data plane has stopped"))
    }

    /// The worker's state.
    ///
    /// # Errors
    /// When the worker has stopped.
    pub async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        worker::request(&self.tx, Command::Snapshot).await
    }

    /// Asks the worker to stop.
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown).await;
    }

    /// Resolves when the worker has stopped on its own (e.g. the TUN device
    /// was deleted): the program then cleans up and exits with the worker's
    /// error.
    pub async fn stopped(&self) {
        self.tx.closed().await;
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
        /// UDP flows and ICMP echo flows at most.
        limits: (usize, usize),
    },
}

/// What the worker runs, once started.
enum Started {
    Packet(Box<Pump>),
    Netstack {
        udp: Udp,
        inbox: Inbox,
        mtu: usize,
        tcp_buffer: usize,
        udp_idle: Duration,
        limits: (usize, usize),
    },
}

/// Starts the worker thread. Returns once it runs (or failed to start).
///
/// # Errors
/// When the thread, its runtime or its sockets cannot be set up.
pub fn spawn(
    state: State,
    socket: std::net::UdpSocket,
    lan: LanSide,
    (streams, inbox): (StreamTable, Inbox),
) -> anyhow::Result<(Dataplane, std::thread::JoinHandle<anyhow::Result<()>>)> {
    let (tx, cmds) = mpsc::channel(16);
    let table = streams.clone();
    let start = move || -> anyhow::Result<Started> {
        let mut udp = Udp::new(socket)?;
        udp.set_streams(streams.clone());
        Ok(match lan {
            LanSide::Tun(dev) => {
                let tun = AsyncDevice::new(dev).context("registering the TUN device")?;
                tracing::info!(
                    tcp_gso = tun.tcp_gso(),
                    udp_gso_segments = udp.max_gso_segments(),
                    udp_gro_segments = udp.gro_segments(),
                    "data plane ready (packet mode)"
                );
                let mut pump = Pump::new(udp, tun, Kinds::DATA_OVERHEAD + IKE_500_TAG.len());
                pump.set_streams(streams, inbox);
                Started::Packet(Box::new(pump))
            }
            LanSide::Netstack {
                mtu,
                tcp_buffer,
                udp_idle,
                limits,
            } => {
                tracing::info!("data plane ready (netstack mode)");
                Started::Netstack {
                    udp,
                    inbox,
                    mtu,
                    tcp_buffer,
                    udp_idle,
                    limits,
                }
            }
        })
    };
    let run = move |started: Started| async move {
        let path = AgentPath::new(state, table);
        match started {
            Started::Packet(pump) => run_packet(path, *pump, cmds).await,
            Started::Netstack {
                udp,
                inbox,
                mtu,
                tcp_buffer,
                udp_idle,
                limits,
            } => {
                run_netstack(
                    path,
                    (udp, inbox),
                    cmds,
                    (mtu, tcp_buffer, udp_idle),
                    limits,
                )
                .await
            }
        }
    };
    let thread = worker::spawn("agent-dataplane".to_owned(), start, run)?;
    Ok((Dataplane { tx }, thread))
}

/// An IPsec tunnel's gateway: the endpoint of the desired state (its IKE
/// port) and its NAT-T port, where everything goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IpsecGateway {
    endpoint: SocketAddr,
    nat_t: SocketAddr,
}

impl IpsecGateway {
    /// The gateway of `state`'s tunnel, when it is an IPsec one.
    fn of(state: &State) -> Option<Self> {
        let t = state.tunnel()?;
        (t.kind == TunnelKind::Ipsec).then(|| Self {
            endpoint: t.endpoint,
            nat_t: SocketAddr::new(t.endpoint.ip(), NAT_T_PORT),
        })
    }

    /// A datagram of the core for the gateway, as sent to its NAT-T port:
    /// one the core made for port 500 (behind the tag) carries the non-ESP
    /// marker instead (RFC 3948 §2.2), in place (both are four bytes).
    fn outbound(&self, dst: SocketAddr, datagram: &mut [u8]) -> SocketAddr {
        if dst != self.endpoint {
            return dst;
        }
        if datagram.starts_with(&IKE_500_TAG) {
            datagram[..NON_ESP_MARKER.len()].copy_from_slice(&NON_ESP_MARKER);
        }
        self.nat_t
    }
}

/// The agent's packet logic as the pump drives it: [`AgentState`] (the
/// tunnel and the NAT).
struct AgentPath {
    state: State,
    /// The tunnel's gateway when it is an IPsec one (follows each applied
    /// desired state).
    ipsec: Option<IpsecGateway>,
    /// A datagram from the gateway's IKE port with the tag in front
    /// (allocated once, for the rare IKE message from there).
    tagged: Vec<u8>,
    /// When the gateway last sent an authenticated datagram (data,
    /// keepalive, handshake response).
    last_heard: Option<Instant>,
    /// The first packet sent into the tunnel since the gateway was last
    /// heard: a live gateway answers within WireGuard's keepalive timeout
    /// (it sends a keepalive at the latest 10 s after data it received).
    unanswered_since: Option<Instant>,
    /// The datagrams being decapsulated came over UDP (not a stream).
    via_udp: bool,
    /// When an authenticated datagram last came over UDP.
    udp_heard: Option<Instant>,
    /// The TLS fallback's virtual endpoints (for the UDP probe).
    streams: StreamTable,
}

/// How long sent data may go unanswered before the tunnel counts as down:
/// WireGuard's keepalive timeout (10 s) plus its rekey timeout (5 s).
pub const SILENCE_LIMIT: Duration = Duration::from_secs(15);

impl AgentPath {
    fn new(state: State, streams: StreamTable) -> Self {
        Self {
            ipsec: IpsecGateway::of(&state),
            tagged: vec![0; UDP_BUF + IKE_500_TAG.len()],
            state,
            last_heard: None,
            unanswered_since: None,
            via_udp: true,
            udp_heard: None,
            streams,
        }
    }

    /// How long data sent to the gateway has gone unanswered.
    fn silence(&self, now: Instant) -> Option<Duration> {
        self.state.tunnel()?;
        self.unanswered_since
            .map(|t| now.saturating_duration_since(t))
    }
}

impl PacketPath for AgentPath {
    fn decapsulate(&mut self, dgram: Datagram, out: &mut [u8], step: &mut Step) -> Option<usize> {
        let Datagram {
            mut from,
            mut bytes,
            ..
        } = dgram;
        if let Some(g) = self.ipsec {
            if from == g.nat_t {
                // The gateway's NAT-T port: the core's form as it is, from
                // the one endpoint it knows.
                from = g.endpoint;
            } else if from == g.endpoint {
                // The gateway's IKE port (we never send there, but a
                // gateway may answer from it): the core wants the tag.
                let n = IKE_500_TAG.len() + bytes.len();
                let buf = self.tagged.get_mut(..n)?;
                buf[..IKE_500_TAG.len()].copy_from_slice(&IKE_500_TAG);
                buf[IKE_500_TAG.len()..].copy_from_slice(bytes);
                bytes = &self.tagged[..n];
            }
        }
        let state = &mut self.state;
        let outcome = match state.handle_network_input_into(from, bytes, out, step.now) {
            NetworkOutcome::Lan(p) => Some(p.len()),
            NetworkOutcome::Consumed => Some(0),
            NetworkOutcome::Dropped(_) => None,
        };
        if outcome.is_some() {
            self.last_heard = Some(step.now);
            self.unanswered_since = None;
            if self.via_udp {
                self.udp_heard = Some(step.now);
            }
        }
        outcome.filter(|n| *n > 0)
    }

    fn encapsulate(&mut self, packet: &mut [u8], out: &mut [u8], step: &mut Step) -> Sent {
        let sent = match self.state.handle_lan_input_into(packet, out, step.now) {
            LanOutcome::Send { dst, datagram } => {
                let len = datagram.len();
                let dst = match &self.ipsec {
                    Some(g) => g.outbound(dst, &mut out[..len]),
                    None => dst,
                };
                Some((dst, Via::MAIN, len))
            }
            LanOutcome::Queued | LanOutcome::Dropped(_) => None,
        };
        if sent.is_some() && self.unanswered_since.is_none() {
            self.unanswered_since = Some(step.now);
        }
        sent
    }

    fn room(&self, len: usize) -> usize {
        // Room for the tag of a datagram from the gateway's IKE port, too.
        Kinds::buffer_len(len + IKE_500_TAG.len())
    }

    fn poll_transmit(&mut self) -> Option<(SocketAddr, Via, Vec<u8>)> {
        let mut t = self.state.poll_transmit()?;
        let dst = match &self.ipsec {
            Some(g) => g.outbound(t.dst, &mut t.payload),
            None => t.dst,
        };
        Some((dst, Via::MAIN, t.payload))
    }

    fn recycle(&mut self, buf: Vec<u8>) {
        self.state.recycle(buf);
    }

    fn after_batch(&mut self) {
        drain_events(&mut self.state, None);
    }
}

fn snapshot(
    path: &AgentPath,
    io: IoCounters,
    netstack: Option<NetstackCounters>,
    port: u16,
) -> Snapshot {
    let state = &path.state;
    let tunnel = state.tunnel();
    let now = Instant::now();
    let silent_for = path.silence(now).filter(|d| *d >= SILENCE_LIMIT);
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
        silent_for,
        local_port: port,
        udp_heard: path.udp_heard,
    }
}

/// Handles a command; returns `false` on shutdown.
fn command(
    path: &mut AgentPath,
    cmd: Option<Command>,
    io: IoCounters,
    netstack: Option<&mut Netstack>,
    port: u16,
) -> bool {
    let state = &mut path.state;
    match cmd {
        None | Some(Command::Shutdown) => false,
        Some(Command::Apply {
            desired,
            names,
            reference,
            reply,
        }) => {
            let applied = state.handle_desired_state(&desired, &names, Instant::now(), reference);
            path.ipsec = IpsecGateway::of(&path.state);
            let _ = reply.send(applied);
            true
        }
        Some(Command::MoveTerminal {
            terminal,
            real,
            reply,
        }) => {
            let _ = reply.send(state.move_terminal(&terminal, real));
            true
        }
        Some(Command::RequireConsent(on)) => {
            state.require_consent(on);
            true
        }
        Some(Command::ConsentTo(id)) => {
            state.consent_to(id);
            true
        }
        Some(Command::Revoke { id, reply }) => {
            let _ = reply.send(state.revoke_request(id, Instant::now()));
            true
        }
        Some(Command::ProbeUdp) => {
            let endpoint = state.tunnel().map(|t| t.endpoint);
            if endpoint.is_some_and(|e| path.streams.probe_udp(e)) {
                state.initiate_handshake(Instant::now());
            }
            true
        }
        Some(Command::SetKey { key, reply }) => {
            let _ = reply.send(state.set_private_key(key, Instant::now()));
            true
        }
        Some(Command::Snapshot(reply)) => {
            let ns = netstack.map(|n| n.counters());
            let _ = reply.send(snapshot(path, io, ns, port));
            true
        }
    }
}

/// Packet mode: the pump between the TUN device and the socket. A lost TUN
/// device ends it with an error (the program exits after its cleanup).
async fn run_packet(
    mut path: AgentPath,
    mut pump: Pump,
    mut cmds: mpsc::Receiver<Command>,
) -> anyhow::Result<()> {
    loop {
        let deadline = path.state.poll_timeout();
        tokio::select! {
            biased;
            cmd = cmds.recv() => {
                if !command(&mut path, cmd, pump.io, None, pump.udp.port()) {
                    break;
                }
                pump.send_transmits(&mut path).await;
            }
            ready = pump.ready() => {
                path.via_udp = !matches!(ready, Ready::Stream(_));
                pump.on_ready(&mut path, ready).await.context("TUN device")?;
            }
            () = sleep_until(deadline) => {
                path.state.handle_timeout(Instant::now());
                pump.send_transmits(&mut path).await;
            }
        }
    }
    tracing::info!("data plane stopped");
    Ok(())
}

fn drain_events(state: &mut State, mut netstack: Option<&mut Netstack>) {
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

/// Netstack mode: datagrams are decrypted into the smoltcp relay, and what it
/// sends is encrypted one datagram at a time.
async fn run_netstack(
    mut path: AgentPath,
    (udp, inbox): (Udp, Inbox),
    mut cmds: mpsc::Receiver<Command>,
    (mtu, tcp_buffer, udp_idle): (usize, usize, Duration),
    (max_udp, max_icmp): (usize, usize),
) -> anyhow::Result<()> {
    let mut io = IoCounters::default();
    let (ev_tx, mut ev_rx) = mpsc::channel::<RelayEvent>(netstack::EVENT_QUEUE);
    let seed = rand::random::<u64>();
    let mut stack = Netstack::new(mtu, tcp_buffer, udp_idle, seed, ev_tx);
    stack.set_limits(max_udp, max_icmp);
    let mut recv = RecvBatch::new();
    let mut inbox = Some(inbox);
    let mut lan_buf = vec![0u8; Kinds::buffer_len(UDP_BUF + IKE_500_TAG.len())];
    let mut out = vec![0u8; Kinds::buffer_len(65535)];

    loop {
        let now = Instant::now();
        let deadline = [path.state.poll_timeout(), stack.poll_at(now)]
            .into_iter()
            .flatten()
            .min();
        tokio::select! {
            biased;
            cmd = cmds.recv() => {
                if !command(&mut path, cmd, io, Some(&mut stack), udp.port()) {
                    break;
                }
            }
            Some(chunk) = next_chunk(&mut inbox) => {
                path.via_udp = false;
                let now = Instant::now();
                for bytes in chunk.datagrams() {
                    let need = path.room(bytes.len());
                    let dgram = Datagram { from: chunk.from, bytes, via: Via::MAIN };
                    let mut step = Step { now, io: &mut io };
                    if let Some(len) = path.decapsulate(dgram, &mut lan_buf[..need], &mut step) {
                        stack.input(&lan_buf[..len], now);
                    }
                }
            }
            r = udp.readable() => {
                path.via_udp = true;
                if let Err(e) = r {
                    tracing::warn!(error = %e, "UDP socket");
                    io.io_errors += 1;
                }
                for _ in 0..BUDGET {
                    if !recv.fill(&udp, &mut io) {
                        break;
                    }
                    let now = Instant::now();
                    for (from, bytes) in recv.datagrams() {
                        let need = path.room(bytes.len());
                        let dgram = Datagram { from, bytes, via: Via::MAIN };
                        let mut step = Step { now, io: &mut io };
                        if let Some(len) = path.decapsulate(dgram, &mut lan_buf[..need], &mut step) {
                            stack.input(&lan_buf[..len], now);
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
                path.state.handle_timeout(Instant::now());
            }
        }
        // Events first: a removed mapping closes its connections before
        // anything else is sent.
        drain_events(&mut path.state, Some(&mut stack));
        let now = Instant::now();
        stack.poll(now);
        while let Some(mut p) = stack.poll_output() {
            let need = path.room(p.len());
            let mut step = Step { now, io: &mut io };
            if let Some((dst, _, len)) = path.encapsulate(&mut p, &mut out[..need], &mut step) {
                udp.send_one(dst, &out[..len], &mut io).await;
            }
        }
        vpnnat_dataplane::pump::send_transmits(&mut path, (&udp, &[]), &mut io).await;
    }
    tracing::info!("data plane stopped");
    Ok(())
}
