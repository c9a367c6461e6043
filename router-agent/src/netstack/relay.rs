//! The OS side of the netstack: tokio tasks that connect to the real host
//! with ordinary sockets and report back to the stack as [`RelayEvent`]s.
//! The stack holds one handle per connection or flow; dropping the handle
//! ends its task.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use vpnnat::nat::ftp::{FTP_PORT, LineRewriter};

use crate::probe;

/// Bytes per chunk moved between a relay task and the stack.
pub(super) const CHUNK: usize = 16 * 1024;
/// Chunks buffered per direction of a TCP relay.
const CHANNEL_CHUNKS: usize = 8;
/// How long the OS connect to a terminal may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Relay events queued at most; datagrams beyond it are dropped.
pub const EVENT_QUEUE: usize = 1024;

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
    /// Starts connecting connection `id` to `target` (reached by the
    /// technician at `nat`); the outcome arrives as
    /// [`RelayEvent::TcpConnected`]. An FTP control connection (port 21)
    /// gets the addresses in its lines rewritten both ways
    /// ([`vpnnat::nat::ftp`]).
    pub(super) fn spawn(
        id: u64,
        target: SocketAddrV4,
        nat: Ipv4Addr,
        events: &EventSender,
    ) -> Self {
        let (to_os_tx, to_os_rx) = mpsc::channel::<Vec<u8>>(CHANNEL_CHUNKS);
        let (from_os_tx, from_os_rx) = mpsc::channel::<Vec<u8>>(CHANNEL_CHUNKS);
        let task = tokio::spawn(tcp_relay(
            id,
            target,
            nat,
            to_os_rx,
            from_os_tx,
            events.clone(),
        ));
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

/// The FTP rewriter of one direction, for a control connection only.
fn ftp_rewriter(target: SocketAddrV4, from: Ipv4Addr, to: Ipv4Addr) -> Option<LineRewriter> {
    (target.port() == FTP_PORT).then(|| LineRewriter::new(from, to))
}

async fn tcp_relay(
    id: u64,
    target: SocketAddrV4,
    nat: Ipv4Addr,
    mut to_os: mpsc::Receiver<Vec<u8>>,
    from_os: mpsc::Sender<Vec<u8>>,
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
    let (mut rd, mut wr) = stream.into_split();
    let ev = events.clone();
    let ev2 = events.clone();
    let real = *target.ip();
    let mut from_pc = ftp_rewriter(target, real, nat);
    let mut to_pc = ftp_rewriter(target, nat, real);
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
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
                    return false;
                }
                Ok(n) => {
                    let chunk = match from_pc.as_mut() {
                        Some(r) => {
                            let mut out = Vec::with_capacity(n);
                            r.push(&buf[..n], &mut out);
                            out
                        }
                        None => buf[..n].to_vec(),
                    };
                    if !chunk.is_empty() && from_os.send(chunk).await.is_err() {
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
        while let Some(mut chunk) = to_os.recv().await {
            if let Some(r) = to_pc.as_mut() {
                let mut out = Vec::with_capacity(chunk.len());
                r.push(&chunk, &mut out);
                chunk = out;
            }
            if wr.write_all(&chunk).await.is_err() {
                return true;
            }
            // Room in the channel again: the stack may move more.
            let _ = ev2.try_send(RelayEvent::TcpWake);
        }
        if let Some(r) = to_pc.as_mut() {
            let mut rest = Vec::new();
            r.finish(&mut rest);
            if wr.write_all(&rest).await.is_err() {
                return true;
            }
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
        let mut r = TcpRelay::spawn(1, SocketAddrV4::new(real, FTP_PORT), nat, &tx);
        let want = b"227 Entering Passive Mode (10,64,0,5,4,1).\r\n";
        assert_eq!(read_from_os(&mut r, want.len()).await, want);
        r.send(b"EPRT |1|10.64.0.5|1025|\r\n".to_vec());
        let cmd = server.await.unwrap();
        assert_eq!(cmd, format!("EPRT |1|{real}|1025|\r\n").as_bytes());
    }
}
