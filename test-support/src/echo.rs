//! Echo checks run inside a namespace: data sent through the network under
//! test must come back unchanged.

use std::time::{Duration, Instant};

use crate::netns::Netns;

/// Sends `bytes` random bytes from `ns` to the TCP echo at `addr`:7 and
/// checks that the same bytes come back (data flows both ways on one
/// connection; compared by hash).
pub fn tcp_echo_transfer(ns: &Netns, addr: &str, bytes: usize) {
    let script = format!(
        r#"
import hashlib, os, socket, threading
data = os.urandom({bytes})
s = socket.create_connection(("{addr}", 7), timeout=20)
def send():
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
t = threading.Thread(target=send); t.start()
got = bytearray()
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    got += chunk
t.join()
assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), (len(got), len(data))
print("echo ok", len(got))
"#
    );
    let out = ns.sh(&format!("python3 - <<'EOF'\n{script}\nEOF"));
    assert!(out.contains(&format!("echo ok {bytes}")), "{out}");
}

/// The UDP port of [`start_udp_responder`].
pub const UDP_RESPONDER_PORT: u16 = 5353;

/// Starts a UDP responder in `ns` (on [`UDP_RESPONDER_PORT`]; it answers
/// each datagram with the datagram in upper case). The script is written to
/// `dir`; the process lives as long as the namespace.
pub fn start_udp_responder(ns: &mut Netns, dir: &std::path::Path) {
    let script = "import socket\n\
                  s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                  s.bind(('0.0.0.0', 5353))\n\
                  while True:\n    d, a = s.recvfrom(2048)\n    s.sendto(d.upper(), a)\n";
    let path = dir.join("udp-responder.py");
    std::fs::write(&path, script).unwrap();
    let mut cmd = ns.command("python3");
    cmd.arg(&path);
    ns.spawn(&mut cmd, None);
}

/// Whether a datagram from `ns` to the [`start_udp_responder`] at `addr`
/// comes back upper-cased (one try, 2 s).
pub fn udp_exchange(ns: &Netns, addr: &str) -> bool {
    let script = format!(
        r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.sendto(b"hello-udp", ("{addr}", 5353))
data, _ = s.recvfrom(2048)
print("udp", data.decode())
"#
    );
    ns.command("sh")
        .args(["-c", &format!("python3 - <<'EOF'\n{script}\nEOF")])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("udp HELLO-UDP"))
}

/// Whether `ns` can ping `addr` within `timeout` (one probe per second).
pub fn ping_within(ns: &Netns, addr: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ns.try_sh(&format!("ping -c 1 -W 1 {addr}")) {
            return true;
        }
    }
    false
}
