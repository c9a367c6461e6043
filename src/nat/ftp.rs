//! An FTP application-level gateway for the 1:1 NAT (RFC 2663 §2.9): FTP
//! names addresses inside its control channel, which a header-only NAT
//! cannot see.
//!
//! - **What is rewritten** (RFC 959 §4.1.2, §4.2; RFC 2428 §2): the
//!   `PORT h1,h2,h3,h4,p1,p2` command, the `227 Entering Passive Mode
//!   (h1,h2,h3,h4,p1,p2)` reply and the `EPRT |1|a.b.c.d|port|` command.
//!   From the PC, its LAN address becomes its NAT address; toward the PC, a
//!   NAT address the technician names becomes the LAN address. `EPSV` and its
//!   `229 (|||port|)` reply carry no address and pass unchanged: the data
//!   connection goes to the control connection's peer, which the NAT already
//!   translates. Ports are never changed (the NAT is 1:1).
//! - **Byte streams** ([`LineRewriter`], netstack mode): a line that may
//!   carry an address is held until its end of line (at most
//!   [`MAX_LINE`] bytes, then it passes unchanged and is counted); any other
//!   line passes at once.
//! - **Packets** ([`FtpAlg`], packet mode): complete lines inside a segment
//!   are rewritten in place, using the buffer's tailroom when a line grows.
//!   The length change is remembered per direction as a sequence-number
//!   correction (like RFC 3022 §4.2's "sequence number … delta"): later
//!   segments are shifted, and ACKs coming back are shifted the other way.
//!   A retransmission of a rewritten segment is rewritten identically and
//!   keeps its place. A line split across two segments cannot be rewritten
//!   without holding packets back and is counted instead.
//! - **Bounds**: at most [`MAX_FLOWS`] control connections are tracked,
//!   each with a fixed-size state; idle ones expire after [`FLOW_IDLE`].
//!   Anything malformed passes unchanged or is counted; nothing here panics
//!   on input.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use crate::ipv4::{Ipv4Header, PROTO_TCP, checksum};

/// The FTP control port (RFC 959 §3.2).
pub const FTP_PORT: u16 = 21;
/// The longest control line the ALG looks at (RFC 959 lines are short: the
/// longest address line, an `EPRT` with an IPv4 address, is under 40 bytes).
pub const MAX_LINE: usize = 128;
/// Control connections tracked at once.
pub const MAX_FLOWS: usize = 256;
/// A control connection silent this long is forgotten.
pub const FLOW_IDLE: Duration = Duration::from_secs(3600);
/// Recent line starts remembered per direction, so that a retransmitted
/// segment is recognised as starting a line.
const LINE_STARTS: usize = 8;

/// Which way a control line or segment travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the PC toward the technician: the LAN address becomes the NAT
    /// address.
    FromPc,
    /// From the technician toward the PC: the NAT address becomes the LAN
    /// address.
    ToPc,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Self::FromPc => 0,
            Self::ToPc => 1,
        }
    }
}

/// Rewrites one control line (with its line end, if any) naming `from` so
/// that it names `to`, into `out`. `false` (and `out` untouched) when the
/// line names no address or another one.
pub fn rewrite_line(line: &[u8], from: Ipv4Addr, to: Ipv4Addr, out: &mut Vec<u8>) -> bool {
    if let Some(rest) = strip_prefix_ci(line, b"PORT ") {
        let at = line.len() - rest.len();
        return rewrite_six(line, at, from, to, out);
    }
    if let Some(rest) = line.strip_prefix(b"227 ") {
        // RFC 959 fixes only the reply code; the numbers follow the text.
        let at = line.len() - rest.len();
        let Some(p) = rest.iter().position(u8::is_ascii_digit) else {
            return false;
        };
        return rewrite_six(line, at + p, from, to, out);
    }
    if let Some(rest) = strip_prefix_ci(line, b"EPRT ") {
        let at = line.len() - rest.len();
        return rewrite_eprt(line, at, from, to, out);
    }
    false
}

/// Whether a line beginning with `start` may turn out to name an address.
fn may_carry_address(start: &[u8]) -> bool {
    [&b"PORT "[..], b"EPRT ", b"227 "].iter().any(|p| {
        let n = start.len().min(p.len());
        start[..n].eq_ignore_ascii_case(&p[..n])
    })
}

fn strip_prefix_ci<'a>(line: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    let head = line.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &line[prefix.len()..])
}

/// A decimal number of 1–3 digits up to 255 at `at`; its value and end.
fn number(line: &[u8], at: usize) -> Option<(u8, usize)> {
    let mut v: u16 = 0;
    let mut i = at;
    while i < line.len() && line[i].is_ascii_digit() && i - at < 3 {
        v = v * 10 + u16::from(line[i] - b'0');
        i += 1;
    }
    if i == at || line.get(i).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    Some((u8::try_from(v).ok()?, i))
}

/// `h1,h2,h3,h4,p1,p2` at `at` (RFC 959 §4.1.2 "host-port"): the six
/// numbers, where the address part ends and where the last number ends.
fn six(line: &[u8], at: usize) -> Option<([u8; 6], usize, usize)> {
    let mut v = [0u8; 6];
    let mut i = at;
    let mut addr_end = at;
    for (k, slot) in v.iter_mut().enumerate() {
        if k > 0 {
            if line.get(i) != Some(&b',') {
                return None;
            }
            i += 1;
        }
        let (n, end) = number(line, i)?;
        *slot = n;
        i = end;
        if k == 3 {
            addr_end = i;
        }
    }
    Some((v, addr_end, i))
}

/// `h1,h2,h3,h4,p1,p2` at `at` naming `from`, rewritten to name `to`.
fn rewrite_six(line: &[u8], at: usize, from: Ipv4Addr, to: Ipv4Addr, out: &mut Vec<u8>) -> bool {
    let Some((v, addr_end, _)) = six(line, at) else {
        return false;
    };
    if Ipv4Addr::new(v[0], v[1], v[2], v[3]) != from {
        return false;
    }
    let o = to.octets();
    out.clear();
    out.extend_from_slice(&line[..at]);
    out.extend_from_slice(format!("{},{},{},{}", o[0], o[1], o[2], o[3]).as_bytes());
    out.extend_from_slice(&line[addr_end..]);
    true
}

/// `<d>1<d>a.b.c.d<d>port<d>` at `at` (RFC 2428 §2); only protocol 1
/// (IPv4): the address, the port field (unchecked) and the address's
/// length (it starts at `at + 3`).
fn eprt(line: &[u8], at: usize) -> Option<(Ipv4Addr, &[u8], usize)> {
    let &d = line.get(at)?;
    // RFC 2428 §2: the delimiter is a printable ASCII character.
    if !(33..=126).contains(&d) {
        return None;
    }
    let body = &line[at + 1..];
    let mut fields = body.splitn(4, |&b| b == d);
    let (Some(b"1"), Some(addr)) = (fields.next(), fields.next()) else {
        return None;
    };
    let port = fields.next()?;
    fields.next()?;
    let parsed = std::str::from_utf8(addr).ok()?.parse::<Ipv4Addr>().ok()?;
    Some((parsed, port, addr.len()))
}

/// An `EPRT` at `at` naming `from`, rewritten to name `to`.
fn rewrite_eprt(line: &[u8], at: usize, from: Ipv4Addr, to: Ipv4Addr, out: &mut Vec<u8>) -> bool {
    let Some((addr, _, addr_len)) = eprt(line, at) else {
        return false;
    };
    if addr != from {
        return false;
    }
    let addr_at = at + 3;
    out.clear();
    out.extend_from_slice(&line[..addr_at]);
    out.extend_from_slice(to.to_string().as_bytes());
    out.extend_from_slice(&line[addr_at + addr_len..]);
    true
}

/// The address and port an active-mode `PORT` or `EPRT` (IPv4) command line
/// announces (RFC 959 §4.1.2, RFC 2428 §2): where the server is to open the
/// data connection. `None` for any other line, a malformed one, or port 0.
pub fn data_port(line: &[u8]) -> Option<SocketAddrV4> {
    let line = line
        .strip_suffix(b"\n")
        .map_or(line, |l| l.strip_suffix(b"\r").unwrap_or(l));
    let (addr, port) = if let Some(rest) = strip_prefix_ci(line, b"PORT ") {
        let at = line.len() - rest.len();
        let (v, _, end) = six(line, at)?;
        // Nothing but blanks may follow the numbers.
        if !line[end..].iter().all(|b| *b == b' ') {
            return None;
        }
        (
            Ipv4Addr::new(v[0], v[1], v[2], v[3]),
            u16::from_be_bytes([v[4], v[5]]),
        )
    } else if let Some(rest) = strip_prefix_ci(line, b"EPRT ") {
        let at = line.len() - rest.len();
        let (addr, port, _) = eprt(line, at)?;
        if port.is_empty() || port.len() > 5 || !port.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let port = std::str::from_utf8(port).ok()?.parse::<u16>().ok()?;
        (addr, port)
    } else {
        return None;
    };
    (port != 0).then(|| SocketAddrV4::new(addr, port))
}

/// A `PORT` command line naming `addr` (RFC 959 §4.1.2), with CRLF.
pub fn port_command(addr: SocketAddrV4, out: &mut Vec<u8>) {
    let o = addr.ip().octets();
    let [p1, p2] = addr.port().to_be_bytes();
    out.extend_from_slice(
        format!("PORT {},{},{},{},{p1},{p2}\r\n", o[0], o[1], o[2], o[3]).as_bytes(),
    );
}

/// An `EPRT` command line naming `addr` (RFC 2428 §2), with CRLF.
pub fn eprt_command(addr: SocketAddrV4, out: &mut Vec<u8>) {
    out.extend_from_slice(format!("EPRT |1|{}|{}|\r\n", addr.ip(), addr.port()).as_bytes());
}

/// Counters of the ALG.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FtpCounters {
    /// Lines whose address was rewritten.
    pub rewritten: u64,
    /// Lines longer than [`MAX_LINE`] passed unchanged.
    pub long_lines: u64,
    /// Address lines split across segments, passed unchanged (packet mode).
    pub split_lines: u64,
    /// Rewrites left out because the buffer had no room for a longer line.
    pub no_room: u64,
    /// Control connections not tracked because the table was full.
    pub table_full: u64,
    /// Segments passed unchanged because their TCP checksum was wrong.
    pub bad_checksum: u64,
}

impl FtpCounters {
    /// What could not be rewritten, by reason (for the metrics).
    pub fn unrewritten(&self) -> impl Iterator<Item = (&'static str, u64)> {
        [
            ("long_line", self.long_lines),
            ("split_line", self.split_lines),
            ("no_room", self.no_room),
            ("table_full", self.table_full),
            ("bad_checksum", self.bad_checksum),
        ]
        .into_iter()
    }

    /// What was counted since `earlier` (a copy of these counters taken
    /// before).
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            rewritten: self.rewritten.saturating_sub(earlier.rewritten),
            long_lines: self.long_lines.saturating_sub(earlier.long_lines),
            split_lines: self.split_lines.saturating_sub(earlier.split_lines),
            no_room: self.no_room.saturating_sub(earlier.no_room),
            table_full: self.table_full.saturating_sub(earlier.table_full),
            bad_checksum: self.bad_checksum.saturating_sub(earlier.bad_checksum),
        }
    }

    /// Adds `other`'s counts.
    pub fn merge(&mut self, other: &Self) {
        self.rewritten += other.rewritten;
        self.long_lines += other.long_lines;
        self.split_lines += other.split_lines;
        self.no_room += other.no_room;
        self.table_full += other.table_full;
        self.bad_checksum += other.bad_checksum;
    }
}

/// One direction of a control connection as a byte stream (netstack mode):
/// address lines are held to their end and rewritten, other bytes pass.
#[derive(Debug, Clone)]
pub struct LineRewriter {
    from: Ipv4Addr,
    to: Ipv4Addr,
    line: [u8; MAX_LINE],
    len: usize,
    /// Inside a line that is passed through unchanged.
    passing: bool,
    scratch: Vec<u8>,
    counters: FtpCounters,
}

impl LineRewriter {
    /// Rewrites `from` into `to` in the stream.
    pub fn new(from: Ipv4Addr, to: Ipv4Addr) -> Self {
        Self {
            from,
            to,
            line: [0; MAX_LINE],
            len: 0,
            passing: false,
            scratch: Vec::new(),
            counters: FtpCounters::default(),
        }
    }

    /// Bytes held back (a possible address line without its end yet).
    pub fn held(&self) -> usize {
        self.len
    }

    /// What happened so far.
    pub fn counters(&self) -> FtpCounters {
        self.counters
    }

    /// Feeds `input`, appending what may be sent on to `out`.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let (from, to) = (self.from, self.to);
        self.push_with(input, out, |line, new| rewrite_line(line, from, to, new));
    }

    /// [`Self::push`] with another rewrite of the address lines: `rewrite`
    /// gets each complete line that may carry an address (`PORT`, `EPRT`,
    /// `227`, with its line end) and an empty buffer; it fills the buffer
    /// with the line to send instead and returns `true`, or returns `false`
    /// to send the line unchanged.
    pub fn push_with(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        mut rewrite: impl FnMut(&[u8], &mut Vec<u8>) -> bool,
    ) {
        for &b in input {
            if self.passing {
                out.push(b);
                self.passing = b != b'\n';
                continue;
            }
            self.line[self.len] = b;
            self.len += 1;
            let held = &self.line[..self.len];
            if b == b'\n' {
                self.scratch.clear();
                if rewrite(held, &mut self.scratch) {
                    self.counters.rewritten += 1;
                    out.extend_from_slice(&self.scratch);
                } else {
                    out.extend_from_slice(held);
                }
                self.len = 0;
            } else if !may_carry_address(held) || self.len == MAX_LINE {
                if self.len == MAX_LINE {
                    self.counters.long_lines += 1;
                }
                out.extend_from_slice(held);
                self.len = 0;
                self.passing = true;
            }
        }
    }

    /// The stream ended: what is still held, unchanged.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.line[..self.len]);
        self.len = 0;
    }
}

/// `a` comes after `b` in sequence space (RFC 793 §3.3, modulo 2^32).
fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// The sequence-number correction of one direction: segments after
/// `pos` are shifted by `after`, earlier ones (retransmissions) by `before`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct SeqAdjust {
    pos: u32,
    before: i32,
    after: i32,
    set: bool,
}

impl SeqAdjust {
    fn seq(&self, seq: u32) -> u32 {
        if !self.set {
            return seq;
        }
        let off = if seq_after(seq, self.pos) {
            self.after
        } else {
            self.before
        };
        seq.wrapping_add_signed(off)
    }

    /// An ACK from the other side, in the shifted space, back to ours.
    fn ack(&self, ack: u32) -> u32 {
        if !self.set {
            return ack;
        }
        let off = if seq_after(ack.wrapping_add_signed(-self.before), self.pos) {
            self.after
        } else {
            self.before
        };
        ack.wrapping_add_signed(-off)
    }

    /// The segment at `seq` changed length by `delta`. A retransmission
    /// (`seq` not after the last change) leaves the correction as it is.
    fn record(&mut self, seq: u32, delta: i32) {
        if self.set && !seq_after(seq, self.pos) {
            return;
        }
        self.before = self.after;
        self.after = self.after.wrapping_add(delta);
        self.pos = seq;
        self.set = true;
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct DirState {
    adj: SeqAdjust,
    /// Sequence numbers (before correction) where recent lines began.
    starts: [Option<u32>; LINE_STARTS],
    next: usize,
}

impl DirState {
    fn is_start(&self, seq: u32) -> bool {
        self.starts.contains(&Some(seq))
    }

    fn note_start(&mut self, seq: u32) {
        if !self.is_start(seq) {
            self.starts[self.next] = Some(seq);
            self.next = (self.next + 1) % LINE_STARTS;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlowKey {
    real: Ipv4Addr,
    pc_port: u16,
    tech: Ipv4Addr,
    tech_port: u16,
}

#[derive(Debug, Clone)]
struct Flow {
    key: FlowKey,
    dirs: [DirState; 2],
    last_seen: Instant,
}

/// The packet-mode FTP ALG: a bounded table of control connections.
#[derive(Debug, Default)]
pub struct FtpAlg {
    flows: Vec<Flow>,
    scratch: Vec<u8>,
    line: Vec<u8>,
    counters: FtpCounters,
}

/// Offsets inside IPv4 and TCP headers.
const IP_TOTAL_LEN: usize = 2;
const IP_CHECKSUM: usize = 10;
const TCP_SEQ: usize = 4;
const TCP_ACK: usize = 8;
const TCP_CHECKSUM: usize = 16;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK_FLAG: u8 = 0x10;

impl FtpAlg {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// What happened so far.
    pub fn counters(&self) -> FtpCounters {
        self.counters
    }

    /// Control connections tracked now.
    pub fn flows(&self) -> usize {
        self.flows.len()
    }

    /// Processes an IPv4 packet of `len` bytes at the start of `buf` going
    /// `dir` between the PC at LAN address `real` (NAT address `nat`) and a
    /// technician; `buf` past `len` is tailroom. The IP addresses in the
    /// header are not looked at (the NAT translates them, before or after).
    /// Returns the packet's new length. Anything that is not a well-formed,
    /// unfragmented FTP control segment is left as it is.
    pub fn process(
        &mut self,
        buf: &mut [u8],
        len: usize,
        dir: Direction,
        real: Ipv4Addr,
        nat: Ipv4Addr,
        now: Instant,
    ) -> usize {
        self.try_process(buf, len, dir, real, nat, now)
            .unwrap_or(len)
    }

    fn try_process(
        &mut self,
        buf: &mut [u8],
        len: usize,
        dir: Direction,
        real: Ipv4Addr,
        nat: Ipv4Addr,
        now: Instant,
    ) -> Option<usize> {
        let (ihl, total, src, dst) = {
            let ip = Ipv4Header::new_checked(buf.get(..len)?).ok()?;
            if ip.protocol() != PROTO_TCP
                || ip.is_later_fragment()
                || ip.fixed().bytes()[6] & 0x20 != 0
                || !ip.verify_checksum()
            {
                return None;
            }
            (ip.header_len(), ip.total_len(), ip.src(), ip.dst())
        };
        let tcp = &buf[ihl..total];
        if tcp.len() < 20 {
            return None;
        }
        let thl = usize::from(tcp[12] >> 4) * 4;
        if thl < 20 || thl > tcp.len() {
            return None;
        }
        let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
        let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
        if sport != FTP_PORT && dport != FTP_PORT {
            return None;
        }
        let key = match dir {
            Direction::FromPc => FlowKey {
                real,
                pc_port: sport,
                tech: dst,
                tech_port: dport,
            },
            Direction::ToPc => FlowKey {
                real,
                pc_port: dport,
                tech: src,
                tech_port: sport,
            },
        };
        let flags = tcp[13];
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
        let fi = self.flow(key, now)?;
        if flags & TCP_RST != 0 {
            // The connection is gone; the segment itself still needs shifting.
            let flow = self.flows.swap_remove(fi);
            return Some(self.finish(buf, len, ihl, seq, ack, flags, &flow, dir, None));
        }
        let (from, to) = match dir {
            Direction::FromPc => (real, nat),
            Direction::ToPc => (nat, real),
        };
        let me = dir.index();
        if flags & TCP_SYN != 0 {
            self.flows[fi].dirs[me].note_start(seq.wrapping_add(1));
        }
        let payload = &buf[ihl + thl..total];
        let at_start = self.flows[fi].dirs[me].is_start(seq);
        // Build the rewritten payload (if any line changes) in `scratch`.
        let mut changed = false;
        self.scratch.clear();
        let mut pos = 0;
        let mut line_start = at_start;
        while pos < payload.len() {
            let end = payload[pos..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|i| pos + i + 1);
            let piece = &payload[pos..end.unwrap_or(payload.len())];
            if line_start {
                match end {
                    Some(_) if piece.len() > MAX_LINE => self.counters.long_lines += 1,
                    Some(_) if rewrite_line(piece, from, to, &mut self.line) => {
                        changed = true;
                        self.counters.rewritten += 1;
                        self.scratch.extend_from_slice(&self.line);
                        pos += piece.len();
                        let next = seq.wrapping_add(pos as u32);
                        self.flows[fi].dirs[me].note_start(next);
                        continue;
                    }
                    Some(_) => {}
                    None if may_carry_address(&piece[..piece.len().min(5)]) => {
                        self.counters.split_lines += 1;
                    }
                    None => {}
                }
            }
            self.scratch.extend_from_slice(piece);
            pos += piece.len();
            if end.is_some() {
                self.flows[fi].dirs[me].note_start(seq.wrapping_add(pos as u32));
            }
            line_start = end.is_some();
        }
        let mut new_payload = None;
        if changed {
            let new_total = ihl + thl + self.scratch.len();
            if !tcp_checksum_ok(&buf[..total]) {
                self.counters.bad_checksum += 1;
            } else if new_total > buf.len() || new_total > usize::from(u16::MAX) {
                self.counters.no_room += 1;
            } else {
                let delta = self.scratch.len() as i32 - payload.len() as i32;
                if delta != 0 {
                    self.flows[fi].dirs[me].adj.record(seq, delta);
                }
                new_payload = Some(std::mem::take(&mut self.scratch));
            }
        }
        let flow = self.flows[fi].clone();
        let n = self.finish(
            buf,
            len,
            ihl,
            seq,
            ack,
            flags,
            &flow,
            dir,
            new_payload.as_deref(),
        );
        if let Some(p) = new_payload {
            self.scratch = p;
        }
        Some(n)
    }

    /// Shifts seq and ack, puts a new payload in, fixes lengths and
    /// checksums; the new packet length.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        buf: &mut [u8],
        len: usize,
        ihl: usize,
        seq: u32,
        ack: u32,
        flags: u8,
        flow: &Flow,
        dir: Direction,
        payload: Option<&[u8]>,
    ) -> usize {
        let me = dir.index();
        let new_seq = flow.dirs[me].adj.seq(seq);
        let new_ack = if flags & TCP_ACK_FLAG != 0 {
            flow.dirs[1 - me].adj.ack(ack)
        } else {
            ack
        };
        let thl = usize::from(buf[ihl + 12] >> 4) * 4;
        match payload {
            None => {
                if new_seq == seq && new_ack == ack {
                    return len;
                }
                let mut d = 0u32;
                for (old, new) in [(seq, new_seq), (ack, new_ack)] {
                    d += u32::from(!(old >> 16) as u16) + (new >> 16);
                    d += u32::from(!(old as u16)) + (new & 0xffff);
                }
                let at = ihl + TCP_CHECKSUM;
                let c = u16::from_be_bytes([buf[at], buf[at + 1]]);
                let mut sum = u32::from(!c) + d;
                while sum > 0xffff {
                    sum = (sum & 0xffff) + (sum >> 16);
                }
                buf[at..at + 2].copy_from_slice(&(!(sum as u16)).to_be_bytes());
                buf[ihl + TCP_SEQ..ihl + TCP_SEQ + 4].copy_from_slice(&new_seq.to_be_bytes());
                buf[ihl + TCP_ACK..ihl + TCP_ACK + 4].copy_from_slice(&new_ack.to_be_bytes());
                len
            }
            Some(p) => {
                let new_total = ihl + thl + p.len();
                buf[ihl + thl..new_total].copy_from_slice(p);
                buf[ihl + TCP_SEQ..ihl + TCP_SEQ + 4].copy_from_slice(&new_seq.to_be_bytes());
                buf[ihl + TCP_ACK..ihl + TCP_ACK + 4].copy_from_slice(&new_ack.to_be_bytes());
                // `new_total` fits in 16 bits: checked by the caller.
                buf[IP_TOTAL_LEN..IP_TOTAL_LEN + 2]
                    .copy_from_slice(&(new_total as u16).to_be_bytes());
                buf[IP_CHECKSUM..IP_CHECKSUM + 2].fill(0);
                let hc = checksum(&buf[..ihl]);
                buf[IP_CHECKSUM..IP_CHECKSUM + 2].copy_from_slice(&hc.to_be_bytes());
                buf[ihl + TCP_CHECKSUM..ihl + TCP_CHECKSUM + 2].fill(0);
                let tc = tcp_checksum(&buf[..new_total]);
                buf[ihl + TCP_CHECKSUM..ihl + TCP_CHECKSUM + 2].copy_from_slice(&tc.to_be_bytes());
                // Bytes past the old total length (link padding) are dropped.
                new_total
            }
        }
    }

    /// The index of `key`'s flow, made if there is room.
    fn flow(&mut self, key: FlowKey, now: Instant) -> Option<usize> {
        if let Some(i) = self.flows.iter().position(|f| f.key == key) {
            self.flows[i].last_seen = now;
            return Some(i);
        }
        if self.flows.len() >= MAX_FLOWS {
            self.flows
                .retain(|f| now.saturating_duration_since(f.last_seen) < FLOW_IDLE);
        }
        if self.flows.len() >= MAX_FLOWS {
            self.counters.table_full += 1;
            return None;
        }
        self.flows.push(Flow {
            key,
            dirs: [DirState::default(); 2],
            last_seen: now,
        });
        Some(self.flows.len() - 1)
    }
}

/// The TCP checksum field value over pseudo-header and segment of a
/// packet whose IPv4 header is checked (RFC 793 §3.1).
fn tcp_sum(p: &[u8]) -> u32 {
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let seg = &p[ihl..];
    let mut sum: u32 = 0;
    for w in p[12..20].chunks_exact(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    sum += u32::from(PROTO_TCP) + seg.len() as u32;
    let mut chunks = seg.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u32::from(*b) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

fn tcp_checksum(p: &[u8]) -> u16 {
    !(tcp_sum(p) as u16)
}

fn tcp_checksum_ok(p: &[u8]) -> bool {
    tcp_sum(p) == 0xffff
}

#[cfg(test)]
mod tests;
