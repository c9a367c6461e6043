//! The gateway's HTTP listener: Prometheus `/metrics`, `/healthz`, and
//! `/api/v1/status` (the JSON that `gateway status` prints like `wg show`).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use vpnnat::messages::{
    ApiError, GatewayId, Health, PublicKey, SiteId, Transport, UnixMillis, paths,
};
use vpnnat_shell::metrics::{
    CONTENT_TYPE as METRICS_CONTENT_TYPE, Exposition, Kind::Counter, Kind::Gauge,
};

use crate::app::{App, unix_millis};

/// The route of the status document.
pub const STATUS_PATH: &str = "/api/v1/status";

/// What `gateway status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    /// The gateway's public key.
    pub public_key: PublicKey,
    /// During a rotation of its key, the next key (answered too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<PublicKey>,
    /// Its UDP port.
    pub listen_port: u16,
    /// Its TUN device.
    pub tun: String,
    /// Its health.
    pub health: Health,
    /// The desired-state version it runs.
    pub applied_version: Option<u64>,
    /// `standalone`, `peers-file …` or the server URL.
    pub control: String,
    /// Whether the server is reachable.
    pub connected: bool,
    /// The id the server gave it.
    pub gateway_id: Option<GatewayId>,
    /// The last control-plane error.
    pub last_error: Option<String>,
    /// NAT addresses routed here.
    pub routed_addresses: Vec<Ipv4Addr>,
    /// No heartbeat was acknowledged within the server's lease: every NAT
    /// address is withdrawn until the server's current document runs again.
    #[serde(default)]
    pub addresses_withdrawn: bool,
    /// Drops by reason (non-zero only).
    pub drops: BTreeMap<String, u64>,
    /// The peers.
    pub peers: Vec<PeerStatusView>,
}

/// One peer in [`StatusView`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatusView {
    /// Its site.
    pub site_id: SiteId,
    /// Its key.
    pub public_key: PublicKey,
    /// Its last authenticated endpoint.
    pub endpoint: Option<SocketAddr>,
    /// Its NAT addresses.
    pub nat_addresses: Vec<Ipv4Addr>,
    /// The last completed handshake.
    pub latest_handshake: Option<UnixMillis>,
    /// Handshakes completed.
    pub handshakes: u64,
    /// Inner bytes received.
    pub rx_bytes: u64,
    /// Inner bytes sent.
    pub tx_bytes: u64,
    /// How its datagrams travel now (`udp`, `tls`, `tls_proxy`).
    #[serde(default)]
    pub transport: Option<Transport>,
    /// Inner packets received.
    pub rx_packets: u64,
    /// Inner packets sent.
    pub tx_packets: u64,
    /// Drops by reason (non-zero only).
    pub drops: BTreeMap<String, u64>,
}

/// The router.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route(paths::METRICS, get(metrics))
        .route(paths::HEALTH, get(health))
        .route(STATUS_PATH, get(status))
        .with_state(app)
}

async fn health() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

fn unavailable(e: &anyhow::Error) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(ApiError {
            error: "unavailable".to_owned(),
            message: format!("{e:#}"),
            field: None,
        }),
    )
        .into_response()
}

async fn status(State(app): State<Arc<App>>) -> Response {
    match status_view(&app).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => unavailable(&e),
    }
}

async fn status_view(app: &App) -> anyhow::Result<StatusView> {
    let snap = app.snapshot().await?;
    let control = app.control_state();
    let (routed, addresses_withdrawn) = {
        let routes = app.routes.lock().await;
        (
            routes.installed().iter().copied().collect(),
            routes.is_withdrawn(),
        )
    };
    let nonzero = |d: &vpnnat::gateway::DropCounters| {
        d.iter()
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| (r.as_str().to_owned(), n))
            .collect()
    };
    let keys = app.key.public_keys().await;
    Ok(StatusView {
        public_key: keys.current,
        next_public_key: keys.next,
        listen_port: app.listen_port,
        tun: app.tun_name.clone(),
        health: app.health(),
        applied_version: snap.applied_version,
        control: control.mode,
        connected: control.connected,
        gateway_id: control.gateway_id,
        last_error: control.last_error,
        routed_addresses: routed,
        addresses_withdrawn,
        drops: nonzero(&snap.counters.drops),
        peers: snap
            .peers
            .iter()
            .map(|p| PeerStatusView {
                site_id: p.site_id,
                public_key: p.public_key,
                endpoint: app.shown_endpoint(p.endpoint),
                nat_addresses: p.nat_addresses.clone(),
                latest_handshake: p.stats.last_handshake.map(|t| unix_millis(t, snap.at)),
                handshakes: p.stats.handshakes,
                rx_bytes: p.stats.rx_bytes,
                tx_bytes: p.stats.tx_bytes,
                transport: app.transport_of(p.endpoint),
                rx_packets: p.stats.rx_packets,
                tx_packets: p.stats.tx_packets,
                drops: nonzero(&p.drops),
            })
            .collect(),
    })
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    match render_metrics(&app).await {
        Ok(text) => ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], text).into_response(),
        Err(e) => unavailable(&e),
    }
}

async fn render_metrics(app: &App) -> anyhow::Result<String> {
    let snap = app.snapshot().await?;
    let control = app.control_state();
    let (routed, withdrawn) = {
        let routes = app.routes.lock().await;
        (routes.installed().len(), routes.is_withdrawn())
    };
    let mut m = Exposition::new("vpnnat_gateway_");
    m.single(
        "peers",
        Gauge,
        "Peers (sites) configured.",
        snap.peers.len(),
    );
    m.single(
        "routed_addresses",
        Gauge,
        "NAT addresses routed to this gateway.",
        routed,
    );
    m.single(
        "addresses_withdrawn",
        Gauge,
        "1 while NAT addresses are withdrawn because no heartbeat was acknowledged within the lease.",
        u8::from(withdrawn),
    );
    let rotating = app.key.public_keys().await.next.is_some();
    m.single(
        "key_rotation_sites_waiting",
        Gauge,
        "WireGuard sites still on the old key during a rotation of the gateway's key.",
        if rotating {
            snap.on_next_key.1 - snap.on_next_key.0.min(snap.on_next_key.1)
        } else {
            0
        },
    );
    m.single(
        "key_rotating",
        Gauge,
        "1 while the gateway answers a next key beside its key (a rotation under way).",
        u8::from(rotating),
    );
    m.single(
        "applied_version",
        Gauge,
        "Desired-state version applied.",
        snap.applied_version.unwrap_or(0),
    );
    m.single(
        "control_connected",
        Gauge,
        "1 when the maintenance server is reachable.",
        u8::from(control.connected),
    );
    m.single(
        "healthy",
        Gauge,
        "1 when healthy, 0 when degraded.",
        u8::from(app.health() == Health::Healthy),
    );
    m.labelled(
        "drops_total",
        Counter,
        "Packets dropped, by reason.",
        "reason",
        snap.counters.drops.iter().map(|(r, n)| (r.as_str(), n)),
    );
    m.single(
        "icmp_unreachable_sent_total",
        Counter,
        "ICMP host-unreachable messages sent.",
        snap.counters.icmp_unreachable_sent,
    );
    m.single(
        "cookie_replies_sent_total",
        Counter,
        "WireGuard cookie replies sent under load.",
        snap.counters.cookie_replies_sent,
    );
    m.labelled(
        "ftp_expectations_total",
        Counter,
        "Active-mode FTP data-connection expectations: created by a technician's PORT/EPRT, used by the site's connection, refused (another address or a port below 1024), evicted, expired.",
        "event",
        snap.counters.ftp_expectations.iter(),
    );
    let streams = app.streams.stats();
    m.single(
        "tls_streams_open",
        Gauge,
        "TLS fallback streams open now.",
        streams.open,
    );
    m.single(
        "tls_streams_opened_total",
        Counter,
        "TLS fallback streams opened.",
        streams.opened,
    );
    m.single(
        "tls_stream_datagrams_sent_total",
        Counter,
        "Tunnel datagrams queued to TLS streams.",
        streams.datagrams_sent,
    );
    m.single(
        "tls_stream_datagrams_received_total",
        Counter,
        "Tunnel datagrams read from TLS streams.",
        streams.datagrams_received,
    );
    m.single(
        "tls_stream_queue_drops_total",
        Counter,
        "Tunnel datagrams dropped because a TLS stream's queue was full.",
        streams.queue_drops,
    );
    m.single(
        "tls_streams_malformed_total",
        Counter,
        "TLS streams closed for a malformed frame.",
        streams.malformed,
    );
    m.single(
        "tls_streams_timed_out_total",
        Counter,
        "TLS streams closed because nothing was read for the idle timeout or a write was stuck.",
        streams.timed_out,
    );
    m.single(
        "tls_stream_closed_drops_total",
        Counter,
        "Tunnel datagrams dropped because their TLS stream had just closed.",
        streams.closed_drops,
    );
    m.labelled(
        "tls_connections_refused_total",
        Counter,
        "TLS connections refused or streams ended before their time, by reason.",
        "reason",
        app.tls_tokens.refusals.by_reason(),
    );

    let sites: Vec<String> = snap.peers.iter().map(|p| p.site_id.to_string()).collect();
    type Field = fn(&vpnnat::tunnel::TunnelStats) -> u64;
    let per_peer: [(&str, &str, Field); 5] = [
        (
            "peer_rx_bytes_total",
            "Inner bytes received from a peer.",
            |s| s.rx_bytes,
        ),
        ("peer_tx_bytes_total", "Inner bytes sent to a peer.", |s| {
            s.tx_bytes
        }),
        (
            "peer_rx_packets_total",
            "Inner packets received from a peer.",
            |s| s.rx_packets,
        ),
        (
            "peer_tx_packets_total",
            "Inner packets sent to a peer.",
            |s| s.tx_packets,
        ),
        (
            "peer_handshakes_total",
            "Handshakes completed with a peer.",
            |s| s.handshakes,
        ),
    ];
    for (name, help, field) in per_peer {
        m.family(name, Counter, help);
        for (p, site) in snap.peers.iter().zip(&sites) {
            m.sample(name, &[("site", site)], field(&p.stats));
        }
    }
    m.family(
        "peer_last_handshake_seconds",
        Gauge,
        "Unix time of a peer's last handshake.",
    );
    for (p, site) in snap.peers.iter().zip(&sites) {
        if let Some(t) = p.stats.last_handshake {
            let UnixMillis(ms) = unix_millis(t, snap.at);
            m.sample(
                "peer_last_handshake_seconds",
                &[("site", site)],
                format_args!("{}.{:03}", ms / 1000, ms % 1000),
            );
        }
    }
    m.family(
        "peer_drops_total",
        Counter,
        "Packets from or to a peer dropped, by reason.",
    );
    for (p, site) in snap.peers.iter().zip(&sites) {
        for (reason, n) in p.drops.iter().filter(|(_, n)| *n > 0) {
            m.sample(
                "peer_drops_total",
                &[("site", site), ("reason", reason.as_str())],
                n,
            );
        }
    }
    let io = snap.io;
    m.labelled(
        "io_total",
        Counter,
        "Data-plane IO operations and packets, by kind.",
        "kind",
        [
            ("tun_reads", io.tun_reads),
            ("tun_packets_read", io.tun_packets),
            ("tun_write_batches", io.tun_write_batches),
            ("tun_packets_written", io.tun_packets_written),
            ("udp_sends", io.udp_sends),
            ("udp_datagrams_sent", io.udp_datagrams_sent),
            ("udp_recvs", io.udp_recvs),
            ("udp_datagrams_received", io.udp_datagrams_received),
            ("errors", io.io_errors),
            ("handoffs_sent", io.handoffs_sent),
            ("handoffs_received", io.handoffs_received),
            ("handoffs_dropped", io.handoff_dropped),
        ],
    );
    Ok(m.finish())
}
