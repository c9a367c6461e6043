//! What discovery reads and hears, parsed without trust: the kernel's
//! neighbour table (`/proc/net/arp`), dnsmasq's leases file, replies to a
//! reverse mDNS query (RFC 6762, DNS message format RFC 1035 §4) and to a
//! NetBIOS node status query (RFC 1002 §4.2.17/§4.2.18).
//!
//! Every parser takes arbitrary bytes: what does not fit is skipped and
//! counted by the caller, never a panic (proptests below feed random input).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// A MAC address (EUI-48).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// Neither all zeros (an incomplete neighbour entry) nor a group
    /// address (the low bit of the first octet, IEEE 802): no host has it.
    pub fn is_host(&self) -> bool {
        self.0 != [0; 6] && self.0[0] & 1 == 0
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for Mac {
    type Err = ();

    /// `aa:bb:cc:dd:ee:ff` or `aa-bb-cc-dd-ee-ff`, either case.
    fn from_str(s: &str) -> Result<Self, ()> {
        let s = s.trim();
        let sep = if s.contains('-') { '-' } else { ':' };
        let mut out = [0u8; 6];
        let mut parts = s.split(sep);
        for o in &mut out {
            let p = parts.next().ok_or(())?;
            if p.len() != 2 {
                return Err(());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| ())?;
        }
        if parts.next().is_some() {
            return Err(());
        }
        Ok(Self(out))
    }
}

impl serde::Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|()| serde::de::Error::custom("expected a MAC address aa:bb:cc:dd:ee:ff"))
    }
}

/// One complete entry of the neighbour table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    /// Its IPv4 address.
    pub address: Ipv4Addr,
    /// Its MAC address.
    pub mac: Mac,
    /// The interface.
    pub device: String,
}

/// What a parser kept and how many lines or records it dropped as malformed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed<T> {
    /// The well-formed entries.
    pub entries: Vec<T>,
    /// Lines that did not parse.
    pub malformed: u64,
}

impl<T> Default for Parsed<T> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            malformed: 0,
        }
    }
}

/// `ATF_COM` (linux/if_arp.h): the entry is resolved. Entries without it
/// are still being resolved or failed; they are skipped, not malformed.
const ATF_COM: u32 = 0x2;

/// `/proc/net/arp`: a header line, then "IP address, HW type, Flags, HW
/// address, Mask, Device" separated by blanks. Only complete entries of
/// Ethernet-like hosts are kept.
pub fn proc_net_arp(text: &str) -> Parsed<Neighbour> {
    let mut out = Parsed::default();
    for line in text.lines().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let [ip, _hw_type, flags, mac, _mask, device] = f.as_slice() else {
            out.malformed += 1;
            continue;
        };
        let flags = flags
            .strip_prefix("0x")
            .and_then(|h| u32::from_str_radix(h, 16).ok());
        let (Ok(address), Some(flags), Ok(mac)) =
            (ip.parse::<Ipv4Addr>(), flags, mac.parse::<Mac>())
        else {
            out.malformed += 1;
            continue;
        };
        if flags & ATF_COM == 0 || !mac.is_host() {
            continue;
        }
        out.entries.push(Neighbour {
            address,
            mac,
            device: (*device).to_owned(),
        });
    }
    out
}

/// One DHCP lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// When it ends (Unix seconds; 0 = never).
    pub expiry: u64,
    /// The client's MAC address.
    pub mac: Mac,
    /// The address leased.
    pub address: Ipv4Addr,
    /// The host name the client sent, if any.
    pub hostname: Option<String>,
}

/// dnsmasq's leases file: "expiry mac ip hostname clientid" per line, `*`
/// for an unknown host name. IPv6 lines ("duid ...") and anything else that
/// does not fit are counted as malformed, except the DUID line, which is
/// dnsmasq's own.
pub fn dnsmasq_leases(text: &str) -> Parsed<Lease> {
    let mut out = Parsed::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.is_empty() || f[0] == "duid" {
            continue;
        }
        let (Some(expiry), Some(mac), Some(ip), Some(host)) = (
            f.first().and_then(|e| e.parse::<u64>().ok()),
            f.get(1).and_then(|m| m.parse::<Mac>().ok()),
            f.get(2).and_then(|a| a.parse::<Ipv4Addr>().ok()),
            f.get(3),
        ) else {
            out.malformed += 1;
            continue;
        };
        out.entries.push(Lease {
            expiry,
            mac,
            address: ip,
            hostname: (*host != "*").then(|| (*host).to_owned()),
        });
    }
    out
}

/// The reverse-lookup name of `a` (RFC 1035 §3.5).
pub fn reverse_name(a: Ipv4Addr) -> String {
    let [w, x, y, z] = a.octets();
    format!("{z}.{y}.{x}.{w}.in-addr.arpa")
}

const TYPE_PTR: u16 = 12;
const CLASS_IN: u16 = 1;
/// The "unicast response" bit of a question's class (RFC 6762 §5.4).
const QU: u16 = 0x8000;
/// A reply's cache-flush bit shares the class field (RFC 6762 §10.2).
const CLASS_MASK: u16 = 0x7fff;

/// A one-question mDNS query for the PTR record of `a`'s reverse name,
/// asking for a unicast reply (the QU bit, RFC 6762 §5.4). `id` is echoed
/// by responders that answer a query from a port other than 5353 (§6.7).
pub fn mdns_ptr_query(id: u16, a: Ipv4Addr) -> Vec<u8> {
    let mut q = Vec::with_capacity(48);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in reverse_name(a).split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&TYPE_PTR.to_be_bytes());
    q.extend_from_slice(&(CLASS_IN | QU).to_be_bytes());
    q
}

/// Reads a possibly compressed domain name at `pos` (RFC 1035 §4.1.4);
/// returns it (labels joined by dots, lower case) and the position after it
/// in the original sequence. Pointers are followed a bounded number of
/// times, so that a loop of pointers ends.
fn read_name(msg: &[u8], mut pos: usize) -> Option<(String, usize)> {
    let mut name = String::new();
    let mut after = None;
    let mut jumps = 0;
    loop {
        let len = *msg.get(pos)?;
        match len & 0xc0 {
            0x00 => {
                if len == 0 {
                    return Some((name, after.unwrap_or(pos + 1)));
                }
                let label = msg.get(pos + 1..pos + 1 + usize::from(len))?;
                if !name.is_empty() {
                    name.push('.');
                }
                if name.len() + label.len() > 255 {
                    return None;
                }
                name.extend(label.iter().map(|b| char::from(b.to_ascii_lowercase())));
                pos += 1 + usize::from(len);
            }
            0xc0 => {
                let lo = *msg.get(pos + 1)?;
                after.get_or_insert(pos + 2);
                jumps += 1;
                if jumps > 16 {
                    return None;
                }
                pos = (usize::from(len & 0x3f) << 8) | usize::from(lo);
            }
            _ => return None,
        }
    }
}

fn u16_at(msg: &[u8], pos: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*msg.get(pos)?, *msg.get(pos + 1)?]))
}

/// The host name in a reply to [`mdns_ptr_query`]: the first PTR answer
/// for `a`'s reverse name, its target's first label ("pc-7.local" → "pc-7").
/// `None` for anything else: a query, a reply without such an answer, or
/// bytes that are not a DNS message.
pub fn mdns_ptr_reply(msg: &[u8], a: Ipv4Addr) -> Option<String> {
    let flags = u16_at(msg, 2)?;
    if flags & 0x8000 == 0 {
        return None;
    }
    let qd = u16_at(msg, 4)?;
    let an = u16_at(msg, 6)?;
    let mut pos = 12;
    for _ in 0..qd {
        let (_, next) = read_name(msg, pos)?;
        pos = next.checked_add(4)?;
    }
    let want = reverse_name(a);
    for _ in 0..an {
        let (owner, next) = read_name(msg, pos)?;
        let rtype = u16_at(msg, next)?;
        let class = u16_at(msg, next + 2)? & CLASS_MASK;
        let rdlen = usize::from(u16_at(msg, next + 8)?);
        let rdata = next + 10;
        msg.get(rdata..rdata + rdlen)?;
        if rtype == TYPE_PTR && class == CLASS_IN && owner == want {
            let (target, _) = read_name(msg, rdata)?;
            let host = target.split('.').next().unwrap_or("");
            return (!host.is_empty()).then(|| host.to_owned());
        }
        pos = rdata + rdlen;
    }
    None
}

/// NBSTAT, the node status question type (RFC 1002 §4.2.1.2).
const TYPE_NBSTAT: u16 = 0x21;

/// A NetBIOS node status request for the wildcard name `*` (RFC 1002
/// §4.2.17), sent by unicast to UDP 137 of one host.
pub fn netbios_status_query(id: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(50);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    // The name "*" padded with NULs to 16 bytes, in first-level encoding
    // (RFC 1001 §14.1: each half-octet plus 'A').
    let mut raw = [0u8; 16];
    raw[0] = b'*';
    q.push(32);
    for b in raw {
        q.push(b'A' + (b >> 4));
        q.push(b'A' + (b & 0x0f));
    }
    q.push(0);
    q.extend_from_slice(&TYPE_NBSTAT.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    q
}

/// The workstation name in a node status response (RFC 1002 §4.2.18): the
/// first unique (not group) name with suffix 0x00, trailing blanks
/// removed. `None` for anything else.
pub fn netbios_status_reply(msg: &[u8], id: u16) -> Option<String> {
    if u16_at(msg, 0)? != id || u16_at(msg, 2)? & 0x8000 == 0 || u16_at(msg, 6)? == 0 {
        return None;
    }
    let (_, next) = read_name(msg, 12)?;
    if u16_at(msg, next)? != TYPE_NBSTAT {
        return None;
    }
    let rdlen = usize::from(u16_at(msg, next + 8)?);
    let rdata = msg.get(next + 10..next + 10 + rdlen)?;
    let (&count, names) = rdata.split_first()?;
    for entry in names.chunks_exact(18).take(usize::from(count)) {
        let (name, rest) = entry.split_at(15);
        let suffix = rest[0];
        let group = rest[1] & 0x80 != 0;
        if suffix == 0 && !group {
            let name: String = name
                .iter()
                .map(|&b| char::from(b))
                .collect::<String>()
                .trim_end_matches([' ', '\0'])
                .to_owned();
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_graphic()) {
                return Some(name);
            }
        }
    }
    None
}

/// A host name as a terminal name may carry it: lower case, characters
/// outside `A-Z a-z 0-9 . _ -` become `-`, leading ones that are not a
/// letter or digit dropped, at most 63 characters. `None` when nothing is left.
pub fn terminal_like(name: &str) -> Option<String> {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    let s: String = s.chars().take(63).collect();
    let s = s.trim_end_matches(['-', '.', '_']).to_owned();
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    const ARP: &str = "IP address       HW type     Flags       HW address            Mask     Device\n\
        192.168.1.10     0x1         0x2         02:00:00:00:01:0a     *        lan0\n\
        192.168.1.11     0x1         0x0         00:00:00:00:00:00     *        lan0\n\
        198.51.100.1     0x1         0x2         02:00:00:00:00:01     *        wan0\n\
        garbage line\n\
        192.168.1.300    0x1         0x2         02:00:00:00:01:0b     *        lan0\n\
        192.168.1.12     0x1         0x6         02:00:00:00:01:0c     *        lan0\n";

    #[test]
    fn the_neighbour_table_keeps_complete_entries_and_counts_the_rest() {
        let p = proc_net_arp(ARP);
        let got: Vec<(String, String, &str)> = p
            .entries
            .iter()
            .map(|n| (n.address.to_string(), n.mac.to_string(), n.device.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("192.168.1.10", "02:00:00:00:01:0a", "lan0"),
                ("198.51.100.1", "02:00:00:00:00:01", "wan0"),
                ("192.168.1.12", "02:00:00:00:01:0c", "lan0"),
            ]
            .map(|(a, m, d)| (a.to_owned(), m.to_owned(), d))
        );
        assert_eq!(p.malformed, 2, "the garbage line and 192.168.1.300");
        assert_eq!(proc_net_arp("").entries.len(), 0);
    }

    #[test]
    fn macs_parse_in_both_notations_and_group_addresses_are_no_hosts() {
        let m: Mac = "02-AB-00-00-00-01".parse().unwrap();
        assert_eq!(m.to_string(), "02:ab:00:00:00:01");
        assert!(m.is_host());
        for bad in [
            "",
            "02:ab:00:00:00",
            "02:ab:00:00:00:01:02",
            "2:ab:0:0:0:1",
            "zz:00:00:00:00:00",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
        assert!(!"01:00:5e:00:00:fb".parse::<Mac>().unwrap().is_host());
        assert!(!Mac([0; 6]).is_host());
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<Mac>(&json).unwrap(), m);
    }

    #[test]
    fn dnsmasq_leases_are_read_and_bad_lines_counted() {
        let p = dnsmasq_leases(
            "1700000000 02:00:00:00:01:0a 192.168.1.50 till-2 01:02:00:00:00:01:0a\n\
             0 02:00:00:00:01:0b 192.168.1.51 * *\n\
             duid 00:01:00:01:2c:aa\n\
             1700000000 not-a-mac 192.168.1.52 x *\n\
             \n\
             1700000000 02:00:00:00:01:0c\n",
        );
        assert_eq!(p.entries.len(), 2);
        assert_eq!(p.entries[0].hostname.as_deref(), Some("till-2"));
        assert_eq!(p.entries[0].address, Ipv4Addr::new(192, 168, 1, 50));
        assert_eq!(p.entries[1].hostname, None);
        assert_eq!(p.entries[1].expiry, 0);
        assert_eq!(p.malformed, 2);
    }

    /// A reply as a responder writes it: the question echoed, one PTR
    /// answer whose owner name points back at the question (compression).
    fn mdns_reply(id: u16, a: Ipv4Addr, target: &str) -> Vec<u8> {
        let mut m = mdns_ptr_query(id, a);
        m[2] = 0x84; // QR, AA
        m[7] = 1; // one answer
        m.extend_from_slice(&[0xc0, 12]);
        m.extend_from_slice(&TYPE_PTR.to_be_bytes());
        m.extend_from_slice(&(0x8000 | CLASS_IN).to_be_bytes());
        m.extend_from_slice(&120u32.to_be_bytes());
        let mut rdata = Vec::new();
        for l in target.split('.') {
            rdata.push(l.len() as u8);
            rdata.extend_from_slice(l.as_bytes());
        }
        rdata.push(0);
        m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        m.extend_from_slice(&rdata);
        m
    }

    #[test]
    fn mdns_reverse_replies_name_the_host() {
        let a = Ipv4Addr::new(192, 168, 1, 10);
        let q = mdns_ptr_query(7, a);
        assert_eq!(&q[..2], &[0, 7]);
        assert_eq!(read_name(&q, 12).unwrap().0, "10.1.168.192.in-addr.arpa");
        assert_eq!(mdns_ptr_query(7, a)[q.len() - 2] & 0x80, 0x80, "QU");
        let r = mdns_reply(7, a, "Frontdesk.local");
        assert_eq!(mdns_ptr_reply(&r, a).as_deref(), Some("frontdesk"));
        // Another host's answer, the query itself, truncation: nothing.
        assert_eq!(mdns_ptr_reply(&r, Ipv4Addr::new(192, 168, 1, 11)), None);
        assert_eq!(mdns_ptr_reply(&q, a), None);
        for n in 0..r.len() {
            assert_eq!(mdns_ptr_reply(&r[..n], a), None, "{n}");
        }
        // A pointer loop (the answer's owner name points at itself) ends.
        let mut l = r.clone();
        let at = q.len();
        l[at] = 0xc0;
        l[at + 1] = at as u8;
        assert_eq!(mdns_ptr_reply(&l, a), None);
    }

    fn netbios_reply(id: u16, names: &[(&str, u8, bool)]) -> Vec<u8> {
        let q = netbios_status_query(id);
        let mut m = q[..12].to_vec();
        m[2] = 0x84;
        m[5] = 0; // no question in a response
        m[7] = 1;
        m.extend_from_slice(&q[12..12 + 34]);
        m.extend_from_slice(&TYPE_NBSTAT.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        m.extend_from_slice(&0u32.to_be_bytes());
        let mut rdata = vec![names.len() as u8];
        for (n, suffix, group) in names {
            let mut raw = [b' '; 15];
            raw[..n.len()].copy_from_slice(n.as_bytes());
            rdata.extend_from_slice(&raw);
            rdata.push(*suffix);
            rdata.extend_from_slice(&[if *group { 0x84 } else { 0x04 }, 0]);
        }
        rdata.extend_from_slice(&[0; 46]); // statistics
        m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        m.extend_from_slice(&rdata);
        m
    }

    #[test]
    fn netbios_status_replies_name_the_workstation() {
        let q = netbios_status_query(0x1234);
        assert_eq!(q.len(), 12 + 34 + 4);
        assert_eq!(&q[13..15], b"CK", "'*' is 0x2a: C, K");
        let r = netbios_reply(
            0x1234,
            &[
                ("WORKGROUP", 0, true),
                ("RECEPTION", 0x20, false),
                ("RECEPTION", 0, false),
            ],
        );
        assert_eq!(
            netbios_status_reply(&r, 0x1234).as_deref(),
            Some("RECEPTION")
        );
        assert_eq!(netbios_status_reply(&r, 0x1235), None, "another id");
        assert_eq!(netbios_status_reply(&q, 0x1234), None, "the query");
        for n in 0..r.len() - 46 {
            assert_eq!(netbios_status_reply(&r[..n], 0x1234), None, "{n}");
        }
        let only_group = netbios_reply(1, &[("WORKGROUP", 0, true)]);
        assert_eq!(netbios_status_reply(&only_group, 1), None);
    }

    #[test]
    fn host_names_become_terminal_like_names() {
        assert_eq!(terminal_like("RECEPTION").as_deref(), Some("reception"));
        assert_eq!(terminal_like("Anna's PC").as_deref(), Some("anna-s-pc"));
        assert_eq!(terminal_like("--x--").as_deref(), Some("x"));
        assert_eq!(terminal_like("***"), None);
        assert_eq!(terminal_like(&"a".repeat(100)).unwrap().len(), 63);
        for n in ["RECEPTION", "Anna's PC", "ü-pc"] {
            let t = terminal_like(n).unwrap();
            vpnnat::messages::TerminalName::new(t).unwrap();
        }
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic_a_parser(bytes in proptest::collection::vec(any::<u8>(), 0..600), id: u16, a: [u8; 4]) {
            let a = Ipv4Addr::from(a);
            let _ = mdns_ptr_reply(&bytes, a);
            let _ = netbios_status_reply(&bytes, id);
            let text = String::from_utf8_lossy(&bytes);
            let _ = proc_net_arp(&text);
            let _ = dnsmasq_leases(&text);
            if let Some(t) = terminal_like(&text) {
                prop_assert!(vpnnat::messages::TerminalName::new(t).is_ok());
            }
        }

        #[test]
        fn mutated_replies_never_panic(flip in 0usize..200, byte: u8, cut in 0usize..200) {
            let a = Ipv4Addr::new(192, 168, 1, 10);
            let mut r = mdns_reply(7, a, "frontdesk.local");
            let i = flip % r.len();
            r[i] = byte;
            r.truncate(cut.max(1).min(r.len()));
            let _ = mdns_ptr_reply(&r, a);
            let mut n = netbios_reply(7, &[("RECEPTION", 0, false)]);
            let i = flip % n.len();
            n[i] = byte;
            n.truncate(cut.max(1).min(n.len()));
            let _ = netbios_status_reply(&n, 7);
        }

        #[test]
        fn arp_lines_of_random_fields_never_panic(fields in proptest::collection::vec("[0-9a-fx.:*]{0,20}", 0..8)) {
            let text = format!("header\n{}\n", fields.join(" "));
            let p = proc_net_arp(&text);
            prop_assert!(p.entries.len() + p.malformed as usize <= 1);
        }
    }
}
