//! `router-agent status`: asks a running agent's page for its status
//! document (with the page password) and prints it the way `wg show` prints
//! an interface.

use std::fmt::Write as _;
use std::time::Duration;

use vpnnat::messages::UnixMillis;

use crate::web::{STATUS_PATH, StatusView};

/// Fetches the status document from a running agent (`router-agent status`).
///
/// # Errors
/// When the agent cannot be reached or refuses the password.
pub async fn fetch(url: &str, password: &str) -> anyhow::Result<StatusView> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let resp = client
        .get(format!("{}{STATUS_PATH}", url.trim_end_matches('/')))
        .bearer_auth(password)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the agent at {url}: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        anyhow::bail!("{url}{STATUS_PATH}: HTTP {status}: {body}");
    }
    Ok(resp.json().await?)
}

/// Asks a running agent for a planned rotation (`router-agent rotate`).
///
/// # Errors
/// When the agent cannot be reached or refuses.
pub async fn rotate(url: &str, password: &str, key: bool, credential: bool) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let path = crate::web::ROTATE_PATH;
    let resp = client
        .post(format!("{}{path}", url.trim_end_matches('/')))
        .bearer_auth(password)
        .json(&vpnnat::messages::PlannedRotation { key, credential })
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the agent at {url}: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        anyhow::bail!("{url}{path}: HTTP {status}: {body}");
    }
    Ok(())
}

/// Renders the status the way `wg show` renders an interface.
pub fn render(s: &StatusView, now: UnixMillis) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "site: {} ({})", s.site_name, s.site_id);
    let _ = writeln!(o, "  mode: {}", s.mode);
    let _ = writeln!(
        o,
        "  server: {} ({})",
        s.server,
        if s.connected {
            "connected"
        } else {
            "unreachable"
        }
    );
    if let Some(e) = &s.last_error {
        let _ = writeln!(o, "  last error: {e}");
    }
    if let Some(p) = &s.problem {
        let _ = writeln!(o, "  problem: {p}");
    }
    let _ = writeln!(
        o,
        "  desired state: {} (applied {})",
        s.desired_version.map_or("-".to_owned(), |v| v.to_string()),
        s.applied_version.map_or("-".to_owned(), |v| v.to_string())
    );
    for e in &s.apply_errors {
        let _ = writeln!(o, "  apply error: {e}");
    }
    let _ = writeln!(o, "  listening port: {}", s.local_port);
    match &s.tunnel {
        None => {
            let _ = writeln!(o, "\ntunnel: none (no mapping)");
        }
        Some(t) => {
            let _ = writeln!(o, "\npeer: {} (gateway {})", t.public_key, t.gateway_id);
            match t.transport {
                Some(tr) if tr != vpnnat::messages::Transport::Udp => {
                    let _ = writeln!(o, "  endpoint: {} ({})", t.endpoint, tr.as_str());
                }
                _ => {
                    let _ = writeln!(o, "  endpoint: {}", t.endpoint);
                }
            }
            let state = match (t.state.as_str(), t.up) {
                ("", true) | ("up", _) => "up",
                ("", false) | ("connecting", _) => "handshaking",
                (other, _) => other,
            };
            match &t.note {
                Some(note) => {
                    let _ = writeln!(o, "  session: {state} ({note})");
                }
                None => {
                    let _ = writeln!(o, "  session: {state}");
                }
            }
            if let Some(h) = t.latest_handshake {
                let ago = now.0.saturating_sub(h.0) / 1000;
                let _ = writeln!(o, "  latest handshake: {ago} seconds ago");
            }
            let _ = writeln!(
                o,
                "  transfer: {} B received, {} B sent",
                t.rx_bytes, t.tx_bytes
            );
        }
    }
    if !s.mappings.is_empty() {
        let _ = writeln!(o, "\nmappings:");
        for m in &s.mappings {
            let left = m.expires_at.0.saturating_sub(now.0) / 1000;
            let _ = writeln!(
                o,
                "  {} -> {} ({}, request {}, expires in {}s)",
                m.nat, m.real, m.terminal, m.request_id, left
            );
        }
    }
    let _ = writeln!(
        o,
        "\npackets: {} to LAN, {} to tunnel; {} mappings expired locally",
        s.to_lan_packets, s.to_tunnel_packets, s.mappings_expired
    );
    if !s.drops.is_empty() {
        let drops: Vec<String> = s.drops.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(o, "drops: {}", drops.join(" "));
    }
    o
}
