//! A client that is no enrolled site and connects to the gateway's TLS port
//! sees an ordinary HTTPS server: a page on `/`, 404 elsewhere, TLS 1.3
//! only, and never a tunnel answer, neither to a WebSocket upgrade nor to a
//! CONNECT with a wrong token; the gateway counts no tunnel datagram from it.
#![allow(clippy::unwrap_used)]

use vpnnat_test_support::fallback_world::{FallbackWorld, GATEWAY_WAN, PREREQS, TLS_PORT};
use vpnnat_test_support::require;

/// Counters of tunnel datagrams and of what the gateway dropped.
fn tunnel_counters(w: &FallbackWorld) -> Vec<String> {
    w.gateway_metrics()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            (l.contains("datagram") && l.contains("received"))
                || l.contains("tls_streams")
                || l.contains("drops")
                || l.contains("handshake")
        })
        // A timestamp rendered from the clock at each scrape (it moves by a
        // millisecond between two scrapes); the handshake count stays.
        .filter(|l| !l.contains("last_handshake_seconds"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn fallback_unenrolled_client_sees_an_ordinary_https_server() {
    if !require(PREREQS) {
        return;
    }
    let mut w = FallbackWorld::up("fn");
    // An enrolled site exists (so the gateway has a peer with a token).
    w.start_agent(None);
    w.request_pc1();
    w.wait_transport("udp", std::time::Duration::from_secs(20));
    w.kill_agent();
    // What was in flight when the agent died has arrived.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let before = tunnel_counters(&w);
    let base = format!("https://{GATEWAY_WAN}:{TLS_PORT}");
    let curl = |args: &str| -> String {
        w.stranger
            .sh(&format!("curl -sk --max-time 5 {args}; echo \" code=$?\""))
    };

    // A page on /, 404 elsewhere.
    let page = curl(&format!("-i {base}/"));
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.to_ascii_lowercase()
            .contains("content-type: text/html"),
        "{page}"
    );
    for path in [
        "/v1/stream",
        "/tunnel",
        "/ws",
        "/favicon.ico",
        "/.well-known/x",
    ] {
        let r = curl(&format!("-o /dev/null -w '%{{http_code}}' {base}{path}"));
        assert!(r.starts_with("404"), "{path}: {r}");
    }
    // TLS 1.3 only.
    let old = curl(&format!("--tlsv1.2 --tls-max 1.2 -o /dev/null {base}/"));
    assert!(
        !old.contains("code=0"),
        "a TLS 1.2 handshake succeeded: {old}"
    );

    // A WebSocket upgrade with a wrong token, on any path: no 101, no tunnel.
    for path in ["/v1/stream", "/", "/tunnel", "/ws"] {
        let r = curl(&format!(
            "-i -H 'Connection: Upgrade' -H 'Upgrade: websocket' \
             -H 'Sec-WebSocket-Version: 13' -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' \
             -H 'Authorization: Bearer {}' {base}{path}",
            "A".repeat(43)
        ));
        let want = if path == "/" {
            "HTTP/1.1 200"
        } else {
            "HTTP/1.1 404"
        };
        assert!(r.starts_with(want), "upgrade at {path}: {r}");
        assert!(
            !r.to_ascii_lowercase().contains("sec-websocket-accept"),
            "{r}"
        );
    }
    // CONNECT with a wrong token, and an upgrade with a wrong token
    // followed by a WebSocket binary frame the size of a WireGuard handshake
    // initiation: both get a 404.
    let script = r#"
import socket, ssl
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
reqs = [
    b"CONNECT 10.64.0.1:80 HTTP/1.1\r\nHost: 10.64.0.1:80\r\nAuthorization: Bearer wrong\r\n\r\n",
    b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Authorization: Bearer wrong\r\n\r\n" + bytes([0x82, 0x7e, 0, 148, 1, 0, 0, 0]) + bytes(144),
]
for req in reqs:
    s = ctx.wrap_socket(socket.create_connection(("ADDR", PORT), timeout=5))
    s.sendall(req)
    try:
        got = s.recv(4096)
    except OSError:
        got = b""
    print("answer:", got.split(b"\r\n")[0].decode(errors="replace"))
"#
    .replace("ADDR", GATEWAY_WAN)
    .replace("PORT", &TLS_PORT.to_string());
    let raw = w.stranger.sh(&format!("python3 - <<'EOF'\n{script}\nEOF"));
    let answers: Vec<&str> = raw.lines().filter(|l| l.starts_with("answer:")).collect();
    assert_eq!(answers.len(), 2, "{raw}");
    for a in answers {
        assert!(
            a.starts_with("answer: HTTP/1.1 404"),
            "an ordinary 404, not a tunnel: {raw}"
        );
    }
    assert_eq!(
        tunnel_counters(&w),
        before,
        "the gateway counted tunnel traffic from a stranger"
    );
}
