//! The OS side of the netstack: tokio tasks that connect to the real host
//! with ordinary sockets and report back to the stack as [`RelayEvent`]s.
//! The stack holds one handle per connection or flow; dropping the handle
//! ends its task.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use vpnnat::nat::ftp::{
    FTP_PORT, FtpCounters, LineRewriter, data_port, eprt_command, port_command, rewrite_line,
};

use crate::probe;

/// Bytes per chunk moved between a relay task and the stack.
pub(super) const CHUNK: usize = 16 * 1024;
/// Chunks buffered per direction of a TCP relay.
const CHANNEL_CHUNKS: usize = 8;
/// How long the OS connect to a terminal may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Relay events queued at most; datagrams beyond it are dropped.
pub const EVENT_QUEUE: usize = 1024;
/// How long an active-mode FTP listener waits for the PC's data connection
/// (the gateway's expectation lives as long).
pub(super) const ACTIVE_WAIT: Duration = Duration::from_secs(30);
/// Active-mode FTP listeners waiting at once per control connection;
/// a `PORT` beyond them passes unchanged (and the PC refuses it).
const MAX_ACTIVE_PENDING: usize = 4;

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
    /// What the FTP rewriting of a control connection did since its last
    /// report (sent as it happens: the stack may end a connection's task
    /// before the task could report at its end).
    FtpCounted(FtpCounters),
    /// Active-mode FTP: the PC opened the data connection a technician's
    /// `PORT`/`EPRT` asked for (to the agent, which announced itself in
    /// the technician's place); the stack opens it on to the technician.
    ActiveData {
        /// The NAT address of the PC (the connection's source toward the
        /// technician).
        nat: Ipv4Addr,
        /// The address and port the technician announced.
        tech: SocketAddrV4,
        /// The PC's connection.
        stream: TcpStream,
    },
    /// Active-mode FTP: a technician's `PORT`/`EPRT` could not be taken
    /// over (no listener could be opened, or too many wait); it went to
    /// the PC unchanged.
    ActiveRefused,
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

/// Where relay tasks report (the data-plane task receives).
pub type EventSender = mpsc::Sender<RelayEvent>;

/// What the OS side of a TCP relay has for the stack.
pub(super) enum FromOs {
    /// A chunk of data.
    Chunk(Vec<u8>),
    /// Nothing now.
    Empty,
    /// The OS side will send nothing more.
    Closed,
}

/// A TCP connection to the real host: a task and a bounded channel each way.
pub(super) struct TcpRelay {
    /// Stack → OS (None once the technician sent FIN).
    to_os: Option<mpsc::Sender<Vec<u8>>>,
    /// OS → stack.
    from_os: mpsc::Receiver<Vec<u8>>,
    task: JoinHandle<()>,
}

impl TcpRelay {
    /// Starts connecting connection `id` from the technician `tech` to
    /// `target` (reached at `nat`); the outcome arrives as
    /// [`RelayEvent::TcpConnected`]. An FTP control connection (port 21)
    /// gets the addresses in its lines rewritten both ways
    /// ([`vpnnat::nat::ftp`]), and a `PORT`/`EPRT` naming the technician
    /// is taken over (active mode, [`ActiveProxy`]).
    pub(super) fn spawn(
        id: u64,
        target: SocketAddrV4,
        (nat, tech): (Ipv4Addr, Ipv4Addr),
        events: &EventSender,
    ) -> Self {
        let (to_os_tx, to_os_rx) = mpsc::channel::<Vec<u8>>(CHANNEL_CHUNKS);
        let (from_os_tx, from_os_rx) = mpsc::channel::<Vec<u8>>(CHANNEL_CHUNKS);
        let task = tokio::spawn(tcp_relay(
            id,
            target,
            (nat, tech),
            (to_os_rx, from_os_tx),
            events.clone(),
        ));
        Self {
            to_os: Some(to_os_tx),
            from_os: from_os_rx,
            task,
        }
    }

    /// Relays connection `id` over a connection the PC opened (an
    /// active-mode FTP data connection, [`RelayEvent::ActiveData`]).
    pub(super) fn adopt(id: u64, stream: TcpStream, events: &EventSender) -> Self {
        let (to_os_tx, to_os_rx) = mpsc::channel::<Vec<u8>>(CHANNEL_CHUNKS);
        let (from_os_tx, from_os_rx) = mpsc::channel::<Vec<u8>>(CHANNEL_CHUNKS);
        let events = events.clone();
        let task = tokio::spawn(async move {
            let reset = pipe(stream, None, (to_os_rx, from_os_tx), &events).await;
            let _ = events.send(RelayEvent::TcpDone { id, reset }).await;
        });
        Self {
            to_os: Some(to_os_tx),
            from_os: from_os_rx,
            task,
        }
    }

    /// Whether a chunk toward the real host would be taken now.
    pub(super) fn can_send(&self) -> bool {
        self.to_os
            .as_ref()
            .is_some_and(|tx| !tx.is_closed() && tx.capacity() > 0)
    }

    /// Queues a chunk toward the real host (after [`Self::can_send`]: the
    /// stack is the only sender, so the room is still there).
    pub(super) fn send(&mut self, chunk: Vec<u8>) {
        if let Some(tx) = &self.to_os {
            let _ = tx.try_send(chunk);
        }
    }

    /// Whether the direction toward the real host is still open.
    pub(super) fn sending(&self) -> bool {
        self.to_os.is_some()
    }

    /// Closes the direction toward the real host (a FIN to the terminal).
    pub(super) fn finish(&mut self) {
        self.to_os = None;
    }

    /// The next chunk from the real host, if any.
    pub(super) fn recv(&mut self) -> FromOs {
        match self.from_os.try_recv() {
            Ok(chunk) => FromOs::Chunk(chunk),
            Err(mpsc::error::TryRecvError::Empty) => FromOs::Empty,
            Err(mpsc::error::TryRecvError::Disconnected) => FromOs::Closed,
        }
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A datagram socket to the real host and the task reading it.
pub(super) struct DatagramRelay {
    os: Arc<UdpSocket>,
    task: JoinHandle<()>,
}

impl DatagramRelay {
    /// A UDP flow `id` to `target`; its datagrams arrive as [`RelayEvent::UdpData`].
    pub(super) fn udp(id: u64, target: SocketAddrV4, events: &EventSender) -> io::Result<Self> {
        let std_sock = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        std_sock.set_nonblocking(true)?;
        std_sock.connect(target)?;
        let os = Arc::new(UdpSocket::from_std(std_sock)?);
        let task = tokio::spawn(udp_reader(id, os.clone(), events.clone()));
        Ok(Self { os, task })
    }

    /// An ICMP echo flow `id` to `real` (an unprivileged ICMP socket); its
    /// replies arrive as [`RelayEvent::IcmpReply`].
    pub(super) fn icmp_echo(id: u64, real: Ipv4Addr, events: &EventSender) -> io::Result<Self> {
        let os = Arc::new(probe::ping_socket(real)?);
        let task = tokio::spawn(icmp_reader(id, os.clone(), events.clone()));
        Ok(Self { os, task })
    }

    /// Sends on the non-blocking socket now; false when it did not go out.
    /// (tokio's `try_send` refuses until the reactor has seen the socket
    /// writable once, which would lose the first datagram of every new flow.)
    pub(super) fn send(&self, data: &[u8]) -> bool {
        socket2::SockRef::from(&*self.os).send(data).is_ok()
    }
}

impl Drop for DatagramRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Active-mode FTP through the netstack. The technician's `PORT`/`EPRT`
/// names the technician, whom the PC cannot reach (the agent is not the
/// LAN's router) and whom the PC would refuse anyway (vsftpd, like most
/// servers, accepts only the control connection's peer, RFC 2577 §3). So
/// the agent announces itself instead: it listens on its own LAN address
/// (the control connection's source), rewrites the command to name that
/// listener, takes one connection from the PC within [`ACTIVE_WAIT`], and
/// hands it to the stack ([`RelayEvent::ActiveData`]), which opens the
/// data connection from the NAT address to the address the technician
/// announced. A command naming anyone else is only NAT-rewritten.
struct ActiveProxy {
    nat: Ipv4Addr,
    real: Ipv4Addr,
    tech: Ipv4Addr,
    /// The agent's address on the control connection (what the PC sees).
    local: Ipv4Addr,
    events: EventSender,
    waiting: JoinSet<()>,
}

impl ActiveProxy {
    /// Rewrites one control line toward the PC into `new`; `false` to pass
    /// it unchanged.
    fn rewrite(&mut self, line: &[u8], new: &mut Vec<u8>) -> bool {
        let Some(announced) = data_port(line).filter(|a| *a.ip() == self.tech) else {
            return rewrite_line(line, self.nat, self.real, new);
        };
        let Some(local) = self.listen(announced) else {
            let _ = self.events.try_send(RelayEvent::ActiveRefused);
            return false;
        };
        if line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"EPRT") {
            eprt_command(local, new);
        } else {
            port_command(local, new);
        }
        true
    }

    /// A listener for the PC's data connection toward `announced`; its
    /// address.
    fn listen(&mut self, announced: SocketAddrV4) -> Option<SocketAddrV4> {
        while self.waiting.try_join_next().is_some() {}
        if self.waiting.len() >= MAX_ACTIVE_PENDING {
            return None;
        }
        let std_listener = std::net::TcpListener::bind((self.local, 0)).ok()?;
        std_listener.set_nonblocking(true).ok()?;
        let listener = TcpListener::from_std(std_listener).ok()?;
        let local = match listener.local_addr().ok()? {
            std::net::SocketAddr::V4(a) => a,
            std::net::SocketAddr::V6(_) => return None,
        };
        let (nat, real, events) = (self.nat, self.real, self.events.clone());
        self.waiting.spawn(async move {
            let deadline = tokio::time::Instant::now() + ACTIVE_WAIT;
            loop {
                match tokio::time::timeout_at(deadline, listener.accept()).await {
                    Ok(Ok((stream, std::net::SocketAddr::V4(from)))) if *from.ip() == real => {
                        let _ = stream.set_nodelay(true);
                        let e = RelayEvent::ActiveData {
                            nat,
                            tech: announced,
                            stream,
                        };
                        let _ = events.send(e).await;
                        return;
                    }
                    // Another LAN host: not the PC's connection.
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) | Err(_) => {
                        tracing::debug!(%announced, "no active-mode FTP data connection came");
                        return;
                    }
                }
            }
        });
        Some(local)
    }
}

async fn tcp_relay(
    id: u64,
    target: SocketAddrV4,
    (nat, tech): (Ipv4Addr, Ipv4Addr),
    channels: (mpsc::Receiver<Vec<u8>>, mpsc::Sender<Vec<u8>>),
    events: EventSender,
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
    let real = *target.ip();
    let local = match stream.local_addr() {
        Ok(std::net::SocketAddr::V4(a)) => *a.ip(),
        _ => Ipv4Addr::UNSPECIFIED,
    };
    let ftp = (target.port() == FTP_PORT).then(|| ActiveProxy {
        nat,
        real,
        tech,
        local,
        events: events.clone(),
        waiting: JoinSet::new(),
    });
    let reset = pipe(stream, ftp, channels, &events).await;
    let _ = events.send(RelayEvent::TcpDone { id, reset }).await;
}

/// Tells the stack what a rewriter counted since `reported`.
async fn report(events: &EventSender, r: &LineRewriter, reported: &mut FtpCounters) {
    let now = r.counters();
    if now != *reported {
        let _ = events
            .send(RelayEvent::FtpCounted(now.since(reported)))
            .await;
        *reported = now;
    }
}

/// Moves data between `stream` and the stack's channels until both
/// directions closed (a control connection's lines through the FTP
/// rewriting, `ftp`); whether the OS side failed.
async fn pipe(
    stream: TcpStream,
    ftp: Option<ActiveProxy>,
    (mut to_os, from_os): (mpsc::Receiver<Vec<u8>>, mpsc::Sender<Vec<u8>>),
    events: &EventSender,
) -> bool {
    let (mut rd, mut wr) = stream.into_split();
    let ev = events.clone();
    let ev2 = events.clone();
    let mut from_pc = ftp.as_ref().map(|p| LineRewriter::new(p.real, p.nat));
    let mut to_pc = ftp.as_ref().map(|p| LineRewriter::new(p.nat, p.real));
    let mut proxy = ftp;
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        let mut reported = FtpCounters::default();
        loop {
            match rd.read(&mut buf).await {
                Ok(0) => {
                    if let Some(r) = from_pc.as_mut() {
                        let mut rest = Vec::new();
                        r.finish(&mut rest);
                        if !rest.is_empty() {
                            let _ = from_os.send(rest).await;
                        }
                    }
                    break false;
                }
                Ok(n) => {
                    let chunk = match from_pc.as_mut() {
                        Some(r) => {
                            let mut out = Vec::with_capacity(n);
                            r.push(&buf[..n], &mut out);
                            report(&ev, r, &mut reported).await;
                            out
                        }
                        None => buf[..n].to_vec(),
                    };
                    if !chunk.is_empty() && from_os.send(chunk).await.is_err() {
                        break false;
                    }
                    // A lost wake-up is harmless: a full queue means the stack polls anyway.
                    let _ = ev.try_send(RelayEvent::TcpWake);
                }
                Err(_) => break true,
            }
        }
    };
    let writer = async move {
        let mut reported = FtpCounters::default();
        let reset = 'relay: {
            while let Some(mut chunk) = to_os.recv().await {
                if let (Some(r), Some(p)) = (to_pc.as_mut(), proxy.as_mut()) {
                    let mut out = Vec::with_capacity(chunk.len());
                    r.push_with(&chunk, &mut out, |line, new| p.rewrite(line, new));
                    report(&ev2, r, &mut reported).await;
                    chunk = out;
                }
                if wr.write_all(&chunk).await.is_err() {
                    break 'relay true;
                }
                // Room in the channel again: the stack may move more.
                let _ = ev2.try_send(RelayEvent::TcpWake);
            }
            if let Some(r) = to_pc.as_mut() {
                let mut rest = Vec::new();
                r.finish(&mut rest);
                if wr.write_all(&rest).await.is_err() {
                    break 'relay true;
                }
            }
            let _ = wr.shutdown().await;
            false
        };
        // Listeners still waiting go with the control connection.
        drop(proxy);
        reset
    };
    let (read_reset, write_reset) = tokio::join!(reader, writer);
    read_reset || write_reset
}

async fn udp_reader(id: u64, sock: Arc<UdpSocket>, events: EventSender) {
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

async fn icmp_reader(id: u64, sock: Arc<UdpSocket>, events: EventSender) {
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
    use super::*;

    /// Everything the relay hands the stack until `want` bytes came.
    async fn read_from_os(r: &mut TcpRelay, want: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while got.len() < want {
            match r.recv() {
                FromOs::Chunk(c) => got.extend_from_slice(&c),
                FromOs::Empty => {
                    assert!(tokio::time::Instant::now() < deadline, "{got:?}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                FromOs::Closed => break,
            }
        }
        got
    }

    #[tokio::test]
    async fn an_ftp_control_connection_gets_its_addresses_rewritten_both_ways() {
        // A loopback address of its own (all of 127/8 is local), so port 21
        // is free.
        let real = Ipv4Addr::new(127, 21, (std::process::id() % 250) as u8, 7);
        let nat = Ipv4Addr::new(10, 64, 0, 5);
        let l = tokio::net::TcpListener::bind((real, FTP_PORT))
            .await
            .unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let o = real.octets();
            let reply = format!(
                "227 Entering Passive Mode ({},{},{},{},4,1).\r\n",
                o[0], o[1], o[2], o[3]
            );
            // The reply in two writes, cut inside the address.
            s.write_all(&reply.as_bytes()[..31]).await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.write_all(&reply.as_bytes()[31..]).await.unwrap();
            let mut cmd = vec![0u8; 64];
            let mut n = 0;
            while !cmd[..n].ends_with(b"\n") {
                n += s.read(&mut cmd[n..]).await.unwrap();
            }
            cmd.truncate(n);
            cmd
        });
        let (tx, _rx) = mpsc::channel(EVENT_QUEUE);
        let tech = Ipv4Addr::new(172, 16, 0, 50);
        let mut r = TcpRelay::spawn(1, SocketAddrV4::new(real, FTP_PORT), (nat, tech), &tx);
        let want = b"227 Entering Passive Mode (10,64,0,5,4,1).\r\n";
        assert_eq!(read_from_os(&mut r, want.len()).await, want);
        r.send(b"EPRT |1|10.64.0.5|1025|\r\n".to_vec());
        let cmd = server.await.unwrap();
        assert_eq!(cmd, format!("EPRT |1|{real}|1025|\r\n").as_bytes());
    }
    /// The technician's `PORT` naming itself is taken over: the PC is told
    /// the agent's address (the control connection's peer, the only one
    /// an FTP server accepts), the PC's connection from its own address
    /// reaches the stack, another host's is ignored, and a `PORT` naming
    /// someone else passes as it was.
    #[tokio::test]
    async fn an_active_mode_port_is_taken_over_for_the_technician() {
        let real = Ipv4Addr::new(127, 22, (std::process::id() % 250) as u8, 7);
        let other = Ipv4Addr::new(127, 23, (std::process::id() % 250) as u8, 9);
        let nat = Ipv4Addr::new(10, 64, 0, 5);
        let tech = Ipv4Addr::new(172, 16, 0, 50);
        let l = tokio::net::TcpListener::bind((real, FTP_PORT))
            .await
            .unwrap();
        let server = tokio::spawn(async move {
            let (mut s, peer) = l.accept().await.unwrap();
            let mut lines = Vec::new();
            let mut buf = Vec::new();
            while lines.len() < 2 {
                let mut b = [0u8; 256];
                let n = s.read(&mut b).await.unwrap();
                assert!(n > 0, "control connection closed early");
                buf.extend_from_slice(&b[..n]);
                while let Some(i) = buf.iter().position(|c| *c == b'\n') {
                    lines.push(buf.drain(..=i).collect::<Vec<u8>>());
                }
            }
            (s, peer, lines)
        });
        let (tx, mut rx) = mpsc::channel(EVENT_QUEUE);
        let mut r = TcpRelay::spawn(1, SocketAddrV4::new(real, FTP_PORT), (nat, tech), &tx);
        r.send(b"PORT 172,16,0,50,156,65\r\nPORT 172,16,0,51,156,66\r\n".to_vec());
        let (_control, peer, lines) = server.await.unwrap();
        let announced = data_port(&lines[0]).expect("a PORT for the PC");
        assert_eq!(
            std::net::IpAddr::V4(*announced.ip()),
            peer.ip(),
            "the agent names itself, the control connection's peer"
        );
        assert_eq!(lines[1], b"PORT 172,16,0,51,156,66\r\n", "someone else's");
        // Another host connects first: ignored. Then the PC.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind((other, 0).into()).unwrap();
        let _stranger = sock.connect(announced.into()).await.unwrap();
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind((real, 0).into()).unwrap();
        let mut pc = sock.connect(announced.into()).await.unwrap();
        let mut counted = FtpCounters::default();
        let e = loop {
            let e = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("the PC's connection reported")
                .unwrap();
            match e {
                RelayEvent::TcpConnected { .. } | RelayEvent::TcpWake => {}
                RelayEvent::FtpCounted(c) => counted.merge(&c),
                e => break e,
            }
        };
        // The takeover is counted as a rewritten line; the other PORT is not.
        assert_eq!(counted.rewritten, 1);
        let RelayEvent::ActiveData {
            nat: n,
            tech: t,
            stream,
        } = e
        else {
            panic!("{e:?}")
        };
        assert_eq!((n, t), (nat, SocketAddrV4::new(tech, 40001)));
        // The stream is the PC's.
        pc.write_all(b"data").await.unwrap();
        let mut got = [0u8; 4];
        let mut stream = stream;
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"data");
        // One connection per PORT: the listener is gone.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind((real, 0).into()).unwrap();
        assert!(sock.connect(announced.into()).await.is_err());
    }
}
