use super::*;
use proptest::prelude::*;

const REAL: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
const NAT: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 5);
const TECH: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 50);

fn rw(line: &str, from: Ipv4Addr, to: Ipv4Addr) -> Option<String> {
    let mut out = Vec::new();
    rewrite_line(line.as_bytes(), from, to, &mut out).then(|| String::from_utf8(out).unwrap())
}

#[test]
fn pasv_port_and_eprt_lines_are_rewritten() {
    assert_eq!(
        rw(
            "227 Entering Passive Mode (192,168,1,10,195,80).\r\n",
            REAL,
            NAT
        )
        .as_deref(),
        Some("227 Entering Passive Mode (10,64,0,5,195,80).\r\n")
    );
    assert_eq!(
        rw("PORT 192,168,1,10,4,1\r\n", REAL, NAT).as_deref(),
        Some("PORT 10,64,0,5,4,1\r\n")
    );
    assert_eq!(
        rw("port 192,168,1,10,4,1\r\n", REAL, NAT).as_deref(),
        Some("port 10,64,0,5,4,1\r\n")
    );
    assert_eq!(
        rw("EPRT |1|192.168.1.10|6446|\r\n", REAL, NAT).as_deref(),
        Some("EPRT |1|10.64.0.5|6446|\r\n")
    );
    // The technician naming the NAT address, toward the PC.
    assert_eq!(
        rw("EPRT !1!10.64.0.5!6446!\r\n", NAT, REAL).as_deref(),
        Some("EPRT !1!192.168.1.10!6446!\r\n")
    );
}

#[test]
fn other_addresses_epsv_and_malformed_lines_pass() {
    for line in [
        // Another address: not ours to change.
        "PORT 172,16,0,50,4,1\r\n",
        "227 Entering Passive Mode (172,16,0,50,195,80).\r\n",
        // RFC 2428: no address in EPSV or its reply.
        "EPSV\r\n",
        "229 Entering Extended Passive Mode (|||6446|)\r\n",
        "EPRT |2|::1|6446|\r\n",
        // Malformed.
        "PORT 192,168,1,10,4\r\n",
        "PORT 192,168,1,10,4,256\r\n",
        "PORT 192,168,1,0010,4,1\r\n",
        "PORT 192,168,1,1000,4,1\r\n",
        "PORT ,,,,,\r\n",
        "PORT \r\n",
        "EPRT |1|192.168.1.10\r\n",
        "EPRT \u{7f}1\u{7f}192.168.1.10\u{7f}1\u{7f}\r\n",
        "EPRT ",
        "227 \r\n",
        "227 (192,168,1,10)\r\n",
        "RETR 192,168,1,10,4,1\r\n",
        "2270 (192,168,1,10,195,80)\r\n",
    ] {
        assert_eq!(rw(line, REAL, NAT), None, "{line:?}");
    }
}

#[test]
fn data_port_reads_active_mode_commands_only() {
    let at = |s: &str| s.parse::<SocketAddrV4>().unwrap();
    for (line, want) in [
        ("PORT 172,16,0,50,156,65\r\n", "172.16.0.50:40001"),
        ("port 172,16,0,50,0,21", "172.16.0.50:21"),
        ("PORT 172,16,0,50,255,255 \r\n", "172.16.0.50:65535"),
        ("EPRT |1|172.16.0.50|40001|\r\n", "172.16.0.50:40001"),
        ("eprt !1!10.0.0.1!7!\n", "10.0.0.1:7"),
    ] {
        assert_eq!(data_port(line.as_bytes()), Some(at(want)), "{line:?}");
    }
    for line in [
        "PORT 172,16,0,50,0,0\r\n",
        "PORT 172,16,0,50,4\r\n",
        "PORT 172,16,0,50,4,1,9\r\n",
        "PORT 172,16,0,50,4,1x\r\n",
        "PORT 172,16,0,256,4,1\r\n",
        "EPRT |1|172.16.0.50|0|\r\n",
        "EPRT |1|172.16.0.50|65536|\r\n",
        "EPRT |1|172.16.0.50|+1|\r\n",
        "EPRT |1|172.16.0.50||\r\n",
        "EPRT |2|::1|40001|\r\n",
        "EPRT |1|172.16.0.50|40001\r\n",
        "227 Entering Passive Mode (172,16,0,50,156,65).\r\n",
        "EPSV\r\n",
        "RETR file\r\n",
        "",
    ] {
        assert_eq!(data_port(line.as_bytes()), None, "{line:?}");
    }
}

#[test]
fn port_and_eprt_commands_read_back() {
    let a: SocketAddrV4 = "192.168.1.20:40001".parse().unwrap();
    let mut out = Vec::new();
    port_command(a, &mut out);
    assert_eq!(out, b"PORT 192,168,1,20,156,65\r\n");
    assert_eq!(data_port(&out), Some(a));
    out.clear();
    eprt_command(a, &mut out);
    assert_eq!(out, b"EPRT |1|192.168.1.20|40001|\r\n");
    assert_eq!(data_port(&out), Some(a));
}

#[test]
fn a_stream_can_rewrite_its_address_lines_its_own_way() {
    let mut r = LineRewriter::new(NAT, REAL);
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for chunk in [
        &b"USER x\r\nPO"[..],
        b"RT 172,16,0,50,4,1\r\n",
        b"RETR f\r\n",
    ] {
        r.push_with(chunk, &mut out, |line, new| {
            seen.push(line.to_vec());
            match data_port(line) {
                Some(_) => {
                    port_command("192.168.1.20:1025".parse().unwrap(), new);
                    true
                }
                None => false,
            }
        });
    }
    assert_eq!(out, b"USER x\r\nPORT 192,168,1,20,4,1\r\nRETR f\r\n");
    // Only the line that may carry an address was handed over.
    assert_eq!(seen, vec![b"PORT 172,16,0,50,4,1\r\n".to_vec()]);
    assert_eq!(r.counters().rewritten, 1);
}

fn stream(r: &mut LineRewriter, chunks: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in chunks {
        r.push(c, &mut out);
    }
    out
}

#[test]
fn a_stream_line_split_anywhere_is_rewritten() {
    let input = b"220 hi\r\n227 Entering Passive Mode (192,168,1,10,195,80).\r\n226 ok\r\n";
    let want = b"220 hi\r\n227 Entering Passive Mode (10,64,0,5,195,80).\r\n226 ok\r\n";
    for cut in 0..input.len() {
        let mut r = LineRewriter::new(REAL, NAT);
        let out = stream(&mut r, &[&input[..cut], &input[cut..]]);
        assert_eq!(out, want, "cut at {cut}");
        assert_eq!(r.counters().rewritten, 1);
        assert_eq!(r.held(), 0);
    }
    // Byte by byte.
    let mut r = LineRewriter::new(REAL, NAT);
    let chunks: Vec<&[u8]> = input.chunks(1).collect();
    assert_eq!(stream(&mut r, &chunks), want);
}

#[test]
fn a_stream_holds_only_possible_address_lines_and_only_so_long() {
    let mut r = LineRewriter::new(REAL, NAT);
    // Not an address line: passes at once, without its end of line.
    assert_eq!(stream(&mut r, &[b"150 Opening"]), b"150 Opening");
    assert_eq!(stream(&mut r, &[b" data\r\nPORT 192,"]), b" data\r\n");
    assert_eq!(r.held(), 9);
    let mut out = Vec::new();
    r.finish(&mut out);
    assert_eq!(out, b"PORT 192,");
    // A line too long for an address line passes unchanged and is counted.
    let mut r = LineRewriter::new(REAL, NAT);
    let mut long = b"PORT ".to_vec();
    long.extend(std::iter::repeat_n(b' ', MAX_LINE));
    long.extend_from_slice(b"192,168,1,10,4,1\r\nPORT 192,168,1,10,4,1\r\n");
    let out = stream(&mut r, &[&long]);
    assert!(out.starts_with(&long[..MAX_LINE + 5]));
    assert!(out.ends_with(b"\r\nPORT 10,64,0,5,4,1\r\n"));
    assert_eq!(r.counters().long_lines, 1);
    assert_eq!(r.counters().rewritten, 1);
}

/// An IPv4/TCP segment `src:sport → dst:dport` with valid checksums.
#[allow(clippy::too_many_arguments)]
fn segment(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    seq: u32,
    ack: Option<u32>,
    syn: bool,
    payload: &[u8],
) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ipv4(src.octets(), dst.octets(), 64);
    let mut b = b.tcp(sport, dport, seq, 65535);
    if let Some(a) = ack {
        b = b.ack(a);
    }
    if syn {
        b = b.syn();
    }
    let mut p = Vec::new();
    b.write(&mut p, payload).unwrap();
    p
}

struct Parsed {
    seq: u32,
    ack: u32,
    payload: Vec<u8>,
}

/// Parses and checks both checksums of a packet the ALG produced.
fn parse(p: &[u8]) -> Parsed {
    let ihl = usize::from(p[0] & 0x0f) * 4;
    assert_eq!(checksum(&p[..ihl]), 0, "IPv4 header checksum");
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    assert_eq!(total, p.len());
    assert!(tcp_checksum_ok(p), "TCP checksum");
    let thl = usize::from(p[ihl + 12] >> 4) * 4;
    let t = &p[ihl..];
    Parsed {
        seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        ack: u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
        payload: p[ihl + thl..].to_vec(),
    }
}

/// Runs a packet through the ALG with `room` bytes of tailroom.
fn run(
    alg: &mut FtpAlg,
    p: &[u8],
    dir: Direction,
    nat: Ipv4Addr,
    room: usize,
    now: Instant,
) -> Vec<u8> {
    let mut buf = p.to_vec();
    buf.resize(p.len() + room, 0);
    let n = alg.process(&mut buf, p.len(), dir, REAL, nat, now);
    buf.truncate(n);
    buf
}

const PC_ISN: u32 = 1_000;
const TECH_ISN: u32 = 5_000;

/// A control connection technician:40000 → PC:21 with its handshake done.
fn connected(alg: &mut FtpAlg, now: Instant) {
    let syn = segment(TECH, 40000, REAL, 21, TECH_ISN, None, true, b"");
    run(alg, &syn, Direction::ToPc, NAT, 0, now);
    let syn_ack = segment(REAL, 21, TECH, 40000, PC_ISN, Some(TECH_ISN + 1), true, b"");
    run(alg, &syn_ack, Direction::FromPc, NAT, 0, now);
}

#[test]
fn a_pasv_reply_is_rewritten_and_later_sequence_numbers_follow() {
    let now = Instant::now();
    let mut alg = FtpAlg::new();
    connected(&mut alg, now);
    let reply = b"227 Entering Passive Mode (192,168,1,10,195,80).\r\n";
    let mut seq = PC_ISN + 1;
    let p = segment(REAL, 21, TECH, 40000, seq, Some(TECH_ISN + 1), false, reply);
    let out = parse(&run(&mut alg, &p, Direction::FromPc, NAT, 0, now));
    assert_eq!(
        out.payload,
        b"227 Entering Passive Mode (10,64,0,5,195,80).\r\n"
    );
    assert_eq!(out.seq, seq);
    // Three bytes shorter: the next segment moves back by three …
    seq += reply.len() as u32;
    let p = segment(
        REAL,
        21,
        TECH,
        40000,
        seq,
        Some(TECH_ISN + 1),
        false,
        b"150 ok\r\n",
    );
    let out = parse(&run(&mut alg, &p, Direction::FromPc, NAT, 0, now));
    assert_eq!(out.seq, seq - 3);
    assert_eq!(out.payload, b"150 ok\r\n");
    // … and the technician's ACK of it moves forward by three.
    let tech_ack = seq - 3 + 8;
    let p = segment(
        TECH,
        40000,
        REAL,
        21,
        TECH_ISN + 1,
        Some(tech_ack),
        false,
        b"",
    );
    let out = parse(&run(&mut alg, &p, Direction::ToPc, NAT, 0, now));
    assert_eq!(out.ack, seq + 8);
    // An ACK of only the rewritten segment's start (before the change).
    let p = segment(
        TECH,
        40000,
        REAL,
        21,
        TECH_ISN + 1,
        Some(PC_ISN + 1),
        false,
        b"",
    );
    assert_eq!(
        parse(&run(&mut alg, &p, Direction::ToPc, NAT, 0, now)).ack,
        PC_ISN + 1
    );
    assert_eq!(alg.counters().rewritten, 1);
}

#[test]
fn a_retransmitted_rewritten_segment_is_rewritten_alike_and_keeps_its_place() {
    let now = Instant::now();
    let mut alg = FtpAlg::new();
    connected(&mut alg, now);
    let reply = b"227 Entering Passive Mode (192,168,1,10,195,80).\r\n";
    let p = segment(
        REAL,
        21,
        TECH,
        40000,
        PC_ISN + 1,
        Some(TECH_ISN + 1),
        false,
        reply,
    );
    let first = run(&mut alg, &p, Direction::FromPc, NAT, 0, now);
    let next = segment(
        REAL,
        21,
        TECH,
        40000,
        PC_ISN + 1 + reply.len() as u32,
        Some(TECH_ISN + 1),
        false,
        b"x\r\n",
    );
    let next_out = parse(&run(&mut alg, &next, Direction::FromPc, NAT, 0, now));
    for _ in 0..3 {
        assert_eq!(run(&mut alg, &p, Direction::FromPc, NAT, 0, now), first);
        assert_eq!(
            parse(&run(&mut alg, &next, Direction::FromPc, NAT, 0, now)).seq,
            next_out.seq
        );
    }
    assert_eq!(next_out.seq, PC_ISN + 1 + reply.len() as u32 - 3);
}

#[test]
fn the_delta_adds_up_over_many_rewrites_and_segments() {
    let now = Instant::now();
    let mut alg = FtpAlg::new();
    // The technician is the server here: the PC sends PORT commands
    // (active mode toward the technician), each one 5 bytes longer.
    let real = Ipv4Addr::new(10, 1, 1, 1);
    let nat = Ipv4Addr::new(10, 64, 100, 200);
    let syn = segment(real, 40000, TECH, 21, PC_ISN, None, true, b"");
    let mut buf = syn.clone();
    alg.process(&mut buf, syn.len(), Direction::FromPc, real, nat, now);
    let cmd = b"PORT 10,1,1,1,4,1\r\n";
    let mut seq = PC_ISN + 1;
    for i in 0..200u32 {
        let p = segment(real, 40000, TECH, 21, seq, Some(TECH_ISN + 1), false, cmd);
        let mut buf = p.clone();
        buf.resize(p.len() + 64, 0);
        let n = alg.process(&mut buf, p.len(), Direction::FromPc, real, nat, now);
        let out = parse(&buf[..n]);
        assert_eq!(out.payload, b"PORT 10,64,100,200,4,1\r\n");
        assert_eq!(out.seq, seq + 5 * i);
        seq += cmd.len() as u32;
        // The technician acknowledges everything so far in its space.
        let a = segment(
            TECH,
            21,
            real,
            40000,
            TECH_ISN + 1,
            Some(seq + 5 * (i + 1)),
            false,
            b"",
        );
        let mut buf = a.clone();
        let n = alg.process(&mut buf, a.len(), Direction::ToPc, real, nat, now);
        assert_eq!(parse(&buf[..n]).ack, seq);
    }
    assert_eq!(alg.counters().rewritten, 200);
}

#[test]
fn sequence_numbers_wrap() {
    let mut a = SeqAdjust::default();
    a.record(u32::MAX - 10, -3);
    assert_eq!(a.seq(u32::MAX - 10), u32::MAX - 10);
    assert_eq!(a.seq(5), 2);
    assert_eq!(a.ack(2), 5);
    a.record(20, 7);
    assert_eq!(a.seq(20), 17);
    assert_eq!(a.seq(30), 34);
    assert_eq!(a.ack(34), 30);
}

#[test]
fn a_longer_line_needs_tailroom() {
    let now = Instant::now();
    let real = Ipv4Addr::new(10, 1, 1, 1);
    let nat = Ipv4Addr::new(10, 64, 100, 200);
    let mut alg = FtpAlg::new();
    let p = segment(
        real,
        40000,
        TECH,
        21,
        7,
        Some(1),
        false,
        b"PORT 10,1,1,1,4,1\r\n",
    );
    let mut buf = p.clone();
    assert_eq!(
        alg.process(&mut buf, p.len(), Direction::FromPc, real, nat, now),
        p.len()
    );
    assert_eq!(buf, p);
    assert_eq!(alg.counters().no_room, 0, "not known to start a line");
    let mut alg = FtpAlg::new();
    let syn = segment(real, 40000, TECH, 21, 6, None, true, b"");
    let mut b = syn.clone();
    alg.process(&mut b, syn.len(), Direction::FromPc, real, nat, now);
    assert_eq!(
        alg.process(&mut buf, p.len(), Direction::FromPc, real, nat, now),
        p.len()
    );
    assert_eq!(buf, p);
    assert_eq!(alg.counters().no_room, 1);
    assert_eq!(alg.counters().rewritten, 1);
}

#[test]
fn split_lines_and_bad_checksums_pass_unchanged_and_are_counted() {
    let now = Instant::now();
    let mut alg = FtpAlg::new();
    connected(&mut alg, now);
    let p = segment(
        REAL,
        21,
        TECH,
        40000,
        PC_ISN + 1,
        Some(TECH_ISN + 1),
        false,
        b"227 Entering Passive Mode (192,",
    );
    assert_eq!(run(&mut alg, &p, Direction::FromPc, NAT, 64, now), p);
    assert_eq!(alg.counters().split_lines, 1);
    let mut p = segment(
        REAL,
        21,
        TECH,
        40000,
        PC_ISN + 1,
        Some(TECH_ISN + 1),
        false,
        b"227 (192,168,1,10,1,2)\r\n",
    );
    let last = p.len() - 3;
    p[last] ^= 1;
    assert_eq!(run(&mut alg, &p, Direction::FromPc, NAT, 64, now), p);
    assert_eq!(alg.counters().bad_checksum, 1);
}

#[test]
fn the_flow_table_is_bounded_and_idle_flows_make_room() {
    let now = Instant::now();
    let mut alg = FtpAlg::new();
    for port in 0..(MAX_FLOWS as u16 + 10) {
        let p = segment(TECH, 1024 + port, REAL, 21, 1, None, true, b"");
        run(&mut alg, &p, Direction::ToPc, NAT, 0, now);
    }
    assert_eq!(alg.flows(), MAX_FLOWS);
    assert_eq!(alg.counters().table_full, 10);
    let later = now + FLOW_IDLE;
    let p = segment(TECH, 9, REAL, 21, 1, None, true, b"");
    run(&mut alg, &p, Direction::ToPc, NAT, 0, later);
    assert_eq!(alg.flows(), 1);
    // A reset forgets the flow.
    let mut p = segment(TECH, 9, REAL, 21, 2, None, false, b"");
    let ihl = 20;
    p[ihl + 13] |= TCP_RST;
    p[ihl + 16..ihl + 18].fill(0);
    let c = tcp_checksum(&p);
    p[ihl + 16..ihl + 18].copy_from_slice(&c.to_be_bytes());
    run(&mut alg, &p, Direction::ToPc, NAT, 0, later);
    assert_eq!(alg.flows(), 0);
}

#[test]
fn non_ftp_and_malformed_packets_are_left_alone() {
    let now = Instant::now();
    let mut alg = FtpAlg::new();
    let p = segment(
        REAL,
        80,
        TECH,
        40000,
        1,
        Some(1),
        false,
        b"PORT 192,168,1,10,4,1\r\n",
    );
    assert_eq!(run(&mut alg, &p, Direction::FromPc, NAT, 64, now), p);
    for cut in 0..p.len() {
        let mut buf = p[..cut].to_vec();
        assert_eq!(
            alg.process(&mut buf, cut, Direction::FromPc, REAL, NAT, now),
            cut
        );
    }
    assert_eq!(alg.flows(), 0);
}

fn address_line() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"PORT 192,168,1,10,4,1\r\n".to_vec()),
        Just(b"227 Entering Passive Mode (192,168,1,10,195,80).\r\n".to_vec()),
        Just(b"EPRT |1|192.168.1.10|6446|\r\n".to_vec()),
        Just(b"229 Entering Extended Passive Mode (|||6446|)\r\n".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..200),
        proptest::collection::vec(
            prop_oneof![Just(b'P'), Just(b'\n'), Just(b','), Just(b'1')],
            0..40
        ),
    ]
}

proptest! {
    /// Any control stream, cut anywhere: no panic, the state stays bounded,
    /// and the output does not depend on where the stream was cut.
    #[test]
    fn a_stream_is_bounded_and_independent_of_its_cuts(
        lines in proptest::collection::vec(address_line(), 0..20),
        cuts in proptest::collection::vec(1usize..64, 1..20),
    ) {
        let input: Vec<u8> = lines.concat();
        let mut whole = LineRewriter::new(REAL, NAT);
        let mut want = Vec::new();
        whole.push(&input, &mut want);
        whole.finish(&mut want);
        let mut r = LineRewriter::new(REAL, NAT);
        let mut out = Vec::new();
        let mut rest = &input[..];
        for c in cuts.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (a, b) = rest.split_at((*c).min(rest.len()));
            r.push(a, &mut out);
            prop_assert!(r.held() < MAX_LINE);
            rest = b;
        }
        r.finish(&mut out);
        prop_assert_eq!(&out, &want);
        // Nothing is lost or invented: only the address changes length.
        let diff = (input.len() as i64 - out.len() as i64).unsigned_abs();
        prop_assert_eq!(diff % 3, 0);
    }

    /// Any line: no panic; an address and port the command helpers write
    /// are read back exactly, in either form and either case.
    #[test]
    fn data_port_reads_back_what_is_written_and_survives_anything(
        junk in proptest::collection::vec(any::<u8>(), 0..80),
        addr in any::<[u8; 4]>(),
        port in 1u16..,
        lower in any::<bool>(),
    ) {
        let _ = data_port(&junk);
        let a = SocketAddrV4::new(Ipv4Addr::from(addr), port);
        for write in [port_command, eprt_command] {
            let mut line = Vec::new();
            write(a, &mut line);
            if lower {
                line[..4].make_ascii_lowercase();
            }
            prop_assert_eq!(data_port(&line), Some(a));
        }
    }

    /// Arbitrary segments on tracked and untracked flows: no panic, the
    /// packet length stays within the buffer, the table within its cap.
    #[test]
    fn arbitrary_segments_never_break_the_bounds(
        segs in proptest::collection::vec(
            (any::<bool>(), 0u16..4, any::<u32>(), any::<u32>(), any::<bool>(), address_line(), 0usize..16),
            1..40,
        ),
    ) {
        let now = Instant::now();
        let mut alg = FtpAlg::new();
        for (from_pc, port, seq, ack, syn, payload, room) in segs {
            let p = if from_pc {
                segment(REAL, 21, TECH, 40000 + port, seq, Some(ack), syn, &payload)
            } else {
                segment(TECH, 40000 + port, REAL, 21, seq, Some(ack), syn, &payload)
            };
            let dir = if from_pc { Direction::FromPc } else { Direction::ToPc };
            let mut buf = p.clone();
            buf.resize(p.len() + room, 0);
            let n = alg.process(&mut buf, p.len(), dir, REAL, NAT, now);
            prop_assert!(n <= buf.len());
            parse(&buf[..n]);
            prop_assert!(alg.flows() <= MAX_FLOWS);
        }
    }
}
