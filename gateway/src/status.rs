//! `gateway status`: asks a running gateway's HTTP listener for its status and
//! prints it the way `wg show` prints an interface.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use vpnnat_shell::http::{ApiClient, HttpOptions, http_client};

use crate::http::{STATUS_PATH, StatusView};

/// Fetches `base` + [`STATUS_PATH`].
///
/// # Errors
/// When the gateway does not answer or answers something else.
pub async fn fetch(base: &str) -> anyhow::Result<StatusView> {
    let http = http_client(&HttpOptions {
        timeout: Duration::from_secs(5),
        ..HttpOptions::default()
    })?;
    let gateway = ApiClient::new(http, base, None);
    let url = gateway.url(STATUS_PATH);
    gateway
        .get_json("status", STATUS_PATH)
        .await
        .with_context(|| format!("no status from a gateway at {url}"))
}

/// Renders a status like `wg show`.
pub fn render(s: &StatusView, now: SystemTime) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "interface: {}", s.tun);
    let _ = writeln!(o, "  public key: {}", s.public_key);
    if let Some(next) = &s.next_public_key {
        let _ = writeln!(o, "  next public key: {next} (rotation under way)");
    }
    let _ = writeln!(o, "  listening port: {}", s.listen_port);
    let _ = writeln!(o, "  health: {:?}", s.health);
    let control = if s.connected {
        format!("{} (connected)", s.control)
    } else {
        format!("{} (not connected)", s.control)
    };
    let _ = writeln!(o, "  control: {control}");
    if let Some(id) = s.gateway_id {
        let _ = writeln!(o, "  gateway id: {id}");
    }
    if let Some(e) = &s.last_error {
        let _ = writeln!(o, "  last error: {e}");
    }
    match s.applied_version {
        Some(v) => {
            let _ = writeln!(o, "  desired state: version {v}");
        }
        None => {
            let _ = writeln!(o, "  desired state: none yet");
        }
    }
    let _ = writeln!(o, "  routed addresses: {}", s.routed_addresses.len());
    if s.addresses_withdrawn {
        let _ = writeln!(
            o,
            "  addresses withdrawn: no heartbeat acknowledged within the server's lease"
        );
    }
    if !s.drops.is_empty() {
        let _ = writeln!(o, "  drops: {}", join_counts(&s.drops));
    }
    for p in &s.peers {
        let _ = writeln!(o);
        let _ = writeln!(o, "peer: {}", p.public_key);
        let _ = writeln!(o, "  site: {}", p.site_id);
        if let Some(ep) = p.endpoint {
            match p.transport {
                Some(t) if t != vpnnat::messages::Transport::Udp => {
                    let _ = writeln!(o, "  endpoint: {ep} ({})", t.as_str());
                }
                _ => {
                    let _ = writeln!(o, "  endpoint: {ep}");
                }
            }
        }
        let allowed = if p.nat_addresses.is_empty() {
            "(none)".to_owned()
        } else {
            p.nat_addresses
                .iter()
                .map(|a| format!("{a}/32"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(o, "  allowed ips: {allowed}");
        if let Some(t) = p.latest_handshake {
            let then = UNIX_EPOCH + Duration::from_millis(t.0);
            let ago = now.duration_since(then).unwrap_or(Duration::ZERO);
            let _ = writeln!(o, "  latest handshake: {}", ago_text(ago));
        }
        if p.rx_bytes > 0 || p.tx_bytes > 0 {
            let _ = writeln!(
                o,
                "  transfer: {} received, {} sent",
                bytes_text(p.rx_bytes),
                bytes_text(p.tx_bytes)
            );
        }
        if !p.drops.is_empty() {
            let _ = writeln!(o, "  drops: {}", join_counts(&p.drops));
        }
    }
    o
}

fn join_counts(m: &std::collections::BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `wg show` style: "1 minute, 5 seconds ago".
fn ago_text(d: Duration) -> String {
    let mut secs = d.as_secs();
    if secs == 0 {
        return "Now".to_owned();
    }
    let mut parts = Vec::new();
    for (unit, size) in [
        ("day", 86_400),
        ("hour", 3600),
        ("minute", 60),
        ("second", 1),
    ] {
        if secs >= size {
            let n = secs / size;
            secs %= size;
            parts.push(format!("{n} {unit}{}", if n == 1 { "" } else { "s" }));
        }
    }
    format!("{} ago", parts.join(", "))
}

/// `wg show` style: B, KiB, MiB, GiB, TiB with two decimals.
fn bytes_text(b: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.2} {unit}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::http::PeerStatusView;
    use vpnnat::messages::{Health, PublicKey, SiteId, UnixMillis};

    #[test]
    fn renders_like_wg_show() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_100);
        let s = StatusView {
            public_key: PublicKey([0; 32]),
            next_public_key: None,
            listen_port: 51820,
            tun: "vpnnat0".into(),
            health: Health::Healthy,
            applied_version: Some(4),
            control: "standalone".into(),
            connected: true,
            gateway_id: None,
            last_error: None,
            routed_addresses: vec!["10.64.0.5".parse().unwrap()],
            addresses_withdrawn: false,
            drops: [("spoofed_source".to_owned(), 2)].into_iter().collect(),
            peers: vec![PeerStatusView {
                site_id: SiteId(3),
                public_key: PublicKey([1; 32]),
                endpoint: Some("198.51.100.7:40000".parse().unwrap()),
                nat_addresses: vec!["10.64.0.5".parse().unwrap()],
                latest_handshake: Some(UnixMillis(1_700_000_035_000)),
                handshakes: 1,
                rx_bytes: 1536,
                tx_bytes: 3 * 1024 * 1024,
                transport: Some(vpnnat::messages::Transport::Tls),
                rx_packets: 2,
                tx_packets: 3,
                drops: Default::default(),
            }],
        };
        let text = render(&s, now);
        assert!(text.starts_with("interface: vpnnat0\n"), "{text}");
        assert!(text.contains("  listening port: 51820\n"));
        assert!(text.contains("\npeer: AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n"));
        assert!(text.contains("  endpoint: 198.51.100.7:40000 (tls)\n"));
        assert!(text.contains("  allowed ips: 10.64.0.5/32\n"));
        assert!(
            text.contains("  latest handshake: 1 minute, 5 seconds ago\n"),
            "{text}"
        );
        assert!(text.contains("  transfer: 1.50 KiB received, 3.00 MiB sent\n"));
        assert!(text.contains("  drops: spoofed_source 2\n"));
    }
}
