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
//! FTP (port 21): the relay rewrites the addresses in the control lines
//! both ways, and takes an active-mode `PORT`/`EPRT` naming the technician
//! over: the PC connects to the agent, and the stack opens the data
//! connection from the NAT address to the technician (docs/ARCHITECTURE.md,
//! "FTP: the ALG and the expectations").
//!
//! Only packets the agent state has already checked reach this module: the
//! destination is a mapped NAT address. When a mapping goes away every
//! connection and flow of its NAT address is dropped at once.
//!
//! `stack` is the smoltcp interface and the flow table: it takes the time
//! as `now` and reads no clock. `relay` is the OS side: the tokio tasks with
//! their sockets, which report back as [`RelayEvent`]s.

mod relay;
mod stack;

pub use self::relay::{EVENT_QUEUE, RelayEvent};
pub use self::stack::{Netstack, NetstackCounters};

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::net::Ipv4Addr;
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::sync::mpsc;
    use vpnnat::agent::AgentEvent;
    use vpnnat::messages::TerminalName;

    use super::*;

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

    /// Appends the TCP payloads of everything the stack sends to `data`.
    fn take_tcp_payloads(n: &mut Netstack, data: &mut Vec<u8>) {
        for p in std::iter::from_fn(|| n.poll_output()) {
            let s = etherparse::SlicedPacket::from_ip(&p).unwrap();
            if let Some(etherparse::TransportSlice::Tcp(t)) = s.transport {
                data.extend_from_slice(t.payload());
            }
        }
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
            take_tcp_payloads(n, &mut data);
            data == b"world"
        })
        .await;
        assert_eq!(&server.await.unwrap(), b"hello");
        assert_eq!(n.counters().tcp_connections, 1);
    }

    fn udp(sport: u16, dport: u16) -> Vec<u8> {
        let mut p = Vec::new();
        etherparse::PacketBuilder::ipv4(TECH.octets(), NAT.octets(), 64)
            .udp(sport, dport)
            .write(&mut p, b"x")
            .unwrap();
        p
    }

    fn ping(ident: u16) -> Vec<u8> {
        let mut p = Vec::new();
        etherparse::PacketBuilder::ipv4(TECH.octets(), NAT.octets(), 64)
            .icmpv4_echo_request(ident, 1)
            .write(&mut p, b"ping")
            .unwrap();
        p
    }

    #[tokio::test]
    async fn security_udp_and_icmp_flows_are_bounded() {
        let (mut n, _rx) = stack();
        n.set_limits(8, 4);
        let now = Instant::now();
        // Many destination ports, then many sources toward one port.
        for port in 0..20u16 {
            n.input(&udp(40000, 5000 + port), now);
            n.poll(now);
        }
        for sport in 0..20u16 {
            n.input(&udp(41000 + sport, 5000), now);
            n.poll(now);
        }
        let (flows, sockets) = n.udp_in_use();
        assert!(
            flows <= 8 && sockets <= 8,
            "{flows} flows, {sockets} port sockets"
        );
        assert_eq!(n.counters().udp_flows, 8);
        assert!(n.counters().dropped >= 32, "{:?}", n.counters());
        for ident in 0..10u16 {
            n.input(&ping(ident), now);
        }
        assert!(n.icmp_in_use() <= 4, "{}", n.icmp_in_use());
        assert!(
            n.counters().icmp_unavailable > 0 || n.counters().dropped >= 32 + 6,
            "{:?}",
            n.counters()
        );
    }

    #[tokio::test]
    async fn security_a_failed_relay_socket_leaves_nothing_behind() {
        let (tx, _rx) = mpsc::channel(EVENT_QUEUE);
        let mut n = Netstack::new(1420, 65536, Duration::from_secs(120), 1, tx);
        // A real address no UDP socket may connect to (broadcast without
        // SO_BROADCAST): every relay socket fails.
        n.on_agent_event(&AgentEvent::MappingInstalled {
            nat: NAT,
            real: Ipv4Addr::BROADCAST,
            terminal: TerminalName::new("pc-1").unwrap(),
        });
        let now = Instant::now();
        for port in 0..50u16 {
            n.input(&udp(40000, 6000 + port), now);
            n.poll(now);
        }
        assert_eq!(n.udp_in_use(), (0, 0), "no flow and no port socket kept");
        assert_eq!(n.counters().udp_flows, 0);
        assert!(n.counters().dropped >= 50, "{:?}", n.counters());
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
    /// Active-mode FTP: the PC's data connection (taken over by the relay)
    /// becomes a connection from the NAT address's port 20 to the address
    /// the technician announced, and the PC's data reaches the technician.
    #[tokio::test]
    async fn an_active_ftp_data_connection_is_opened_toward_the_technician() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut pc = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (agent_side, _) = l.accept().await.unwrap();
        let (mut n, mut rx) = stack();
        let announced = std::net::SocketAddrV4::new(TECH, 40000);
        n.on_relay(
            RelayEvent::ActiveData {
                nat: NAT,
                tech: announced,
                stream: agent_side,
            },
            Instant::now(),
        );
        let out: Vec<Vec<u8>> = std::iter::from_fn(|| n.poll_output()).collect();
        let syn = out
            .iter()
            .find_map(|p| {
                let s = etherparse::SlicedPacket::from_ip(p).ok()?;
                let Some(etherparse::NetSlice::Ipv4(ip)) = &s.net else {
                    return None;
                };
                let (src, dst) = (ip.header().source_addr(), ip.header().destination_addr());
                match s.transport? {
                    etherparse::TransportSlice::Tcp(t) if t.syn() && !t.ack() => {
                        Some((src, dst, t.to_header()))
                    }
                    _ => None,
                }
            })
            .expect("a SYN toward the technician");
        assert_eq!((syn.0, syn.1), (NAT, TECH));
        assert_eq!((syn.2.source_port, syn.2.destination_port), (20, 40000));
        // The technician accepts; the PC's data follows.
        let isn = syn.2.sequence_number;
        n.input(&tcp("SA", 7000, isn + 1, 20, &[]), Instant::now());
        n.poll(Instant::now());
        pc.write_all(b"file contents").await.unwrap();
        let mut data = Vec::new();
        relay_until(&mut n, &mut rx, |n| {
            take_tcp_payloads(n, &mut data);
            data == b"file contents"
        })
        .await;
        let c = n.counters();
        assert_eq!((c.ftp_active_data, c.ftp_active_refused), (1, 0));
        // A second data connection to the same technician endpoint while
        // the first is open leaves from another port.
        let mut pc2 = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (agent_side, _) = l.accept().await.unwrap();
        n.on_relay(
            RelayEvent::ActiveData {
                nat: NAT,
                tech: announced,
                stream: agent_side,
            },
            Instant::now(),
        );
        let second = outputs(&mut n)
            .into_iter()
            .find(|t| t.syn && !t.ack)
            .expect("a second SYN");
        assert_ne!(second.source_port, 20);
        pc2.write_all(b"x").await.unwrap();
        // A connection for a NAT address that is no longer mapped is refused.
        n.on_agent_event(&AgentEvent::MappingRemoved {
            nat: NAT,
            real: Ipv4Addr::LOCALHOST,
            terminal: TerminalName::new("pc-1").unwrap(),
            because: vpnnat::agent::RemovedBecause::Revoked,
        });
        let _pc3 = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (agent_side, _) = l.accept().await.unwrap();
        n.on_relay(
            RelayEvent::ActiveData {
                nat: NAT,
                tech: announced,
                stream: agent_side,
            },
            Instant::now(),
        );
        assert!(outputs(&mut n).iter().all(|t| !t.syn));
        assert_eq!(n.counters().ftp_active_refused, 1);
    }
}
