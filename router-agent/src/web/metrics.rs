//! `GET /metrics`: the agent's counters in the Prometheus text exposition
//! format (version 0.0.4).

use std::sync::{Arc, PoisonError};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use vpnnat_shell::metrics::{CONTENT_TYPE, Exposition, Kind};

use super::{Web, error};
use crate::app::{ControlState, FailureCounters};
use crate::dataplane::Snapshot;
use vpnnat::messages::Transport;
use vpnnat_dataplane::stream::StreamStats;

/// Renders the exposition of a data-plane snapshot, the control-plane state
/// and the failure reports.
fn render(
    snap: &Snapshot,
    control: &ControlState,
    failures: FailureCounters,
    carrier: (Option<Transport>, StreamStats),
) -> String {
    use Kind::{Counter, Gauge};
    let mut m = Exposition::new("vpnnat_agent_");
    let c = &snap.counters;
    let up = snap.tunnel.as_ref().is_some_and(|t| t.up);
    #[rustfmt::skip]
    let basics: [(&str, Kind, &str, u64); 3] = [
        ("mappings", Gauge, "NAT mappings in force.", snap.mappings.len() as u64),
        ("tunnel_up", Gauge, "Whether the tunnel to the gateway has a session.", u64::from(up)),
        ("control_connected", Gauge, "Whether the maintenance server answers.", u64::from(control.connected)),
    ];
    for (name, kind, help, value) in basics {
        m.single(name, kind, help, value);
    }
    #[rustfmt::skip]
    let traffic: [(&str, &str, u64, u64); 2] = [
        ("packets_total", "Packets forwarded, by direction.", c.to_lan_packets, c.to_tunnel_packets),
        ("bytes_total", "Inner bytes forwarded, by direction.", c.to_lan_bytes, c.to_tunnel_bytes),
    ];
    for (name, help, to_lan, to_tunnel) in traffic {
        let samples = [("to_lan", to_lan), ("to_tunnel", to_tunnel)];
        m.labelled(name, Counter, help, "direction", samples);
    }
    let drops = c.drops.iter().map(|(r, n)| (r.as_str(), n));
    m.labelled(
        "drops_total",
        Counter,
        "Packets dropped, by reason.",
        "reason",
        drops,
    );
    #[rustfmt::skip]
    m.single("mappings_expired_total", Counter, "Mappings the agent removed at their expiry.", c.mappings_expired);
    // The FTP ALG: packet mode's in the agent state, netstack mode's in
    // the relays of FTP control connections.
    let mut ftp = c.ftp;
    if let Some(n) = &snap.netstack {
        ftp.merge(&n.ftp);
    }
    #[rustfmt::skip]
    m.single("ftp_alg_lines_rewritten_total", Counter, "FTP control lines (PORT, EPRT, 227) whose address the ALG rewrote.", ftp.rewritten);
    #[rustfmt::skip]
    m.labelled("ftp_alg_unrewritten_total", Counter, "FTP control lines the ALG passed unchanged although they may name an address, by reason.", "reason", ftp.unrewritten());
    if let Some(t) = &snap.tunnel {
        m.single(
            "tunnel_handshakes_total",
            Counter,
            "Handshakes completed.",
            t.stats.handshakes,
        );
    }
    m.single(
        "io_errors_total",
        Counter,
        "Socket and TUN errors.",
        snap.io.io_errors,
    );
    let datagrams = [
        ("received", snap.io.udp_datagrams_received),
        ("sent", snap.io.udp_datagrams_sent),
    ];
    #[rustfmt::skip]
    m.labelled("udp_datagrams_total", Counter, "Tunnel datagrams, by direction.", "direction", datagrams);
    if let Some(n) = &snap.netstack {
        #[rustfmt::skip]
        let netstack: [(&str, Kind, &str, u64); 7] = [
            ("netstack_tcp_connections_total", Counter, "TCP connections relayed.", n.tcp_connections),
            ("netstack_tcp_open", Gauge, "TCP connections open.", n.tcp_open),
            ("netstack_tcp_refused_total", Counter, "TCP connections the terminal refused.", n.tcp_refused),
            ("netstack_udp_flows_total", Counter, "UDP flows relayed.", n.udp_flows),
            ("netstack_dropped_total", Counter, "Packets the netstack dropped.", n.dropped),
            ("netstack_ftp_active_data_total", Counter, "Active-mode FTP data connections opened toward technicians.", n.ftp_active_data),
            ("netstack_ftp_active_refused_total", Counter, "Active-mode FTP commands not taken over, or whose data connection could not be opened.", n.ftp_active_refused),
        ];
        for (name, kind, help, value) in netstack {
            m.single(name, kind, help, value);
        }
        let echoes = [
            ("request", n.icmp_echo_requests),
            ("reply", n.icmp_echo_replies),
            ("unavailable", n.icmp_unavailable),
        ];
        #[rustfmt::skip]
        m.labelled("netstack_icmp_echo_total", Counter, "ICMP echoes relayed, by kind.", "kind", echoes);
    }
    let outcomes = [
        ("reported", failures.reported),
        ("undelivered", failures.undelivered),
    ];
    #[rustfmt::skip]
    m.labelled("failure_reports_total", Counter, "Failure reports, by outcome.", "outcome", outcomes);
    let rotations = [
        ("key", control.key_rotations),
        ("credential", control.credential_rotations),
    ];
    #[rustfmt::skip]
    m.labelled("rotations_total", Counter, "Planned rotations completed, by what was rotated.", "what", rotations);
    #[rustfmt::skip]
    m.single("rotation_step_failures_total", Counter, "Planned-rotation steps that failed (tried again).", control.rotation_failures);
    let (transport, streams) = carrier;
    m.labelled(
        "transport",
        Gauge,
        "The tunnel's transport now (1 for the one in use; none without a tunnel).",
        "transport",
        transport.map(|t| (t.as_str(), 1u64)),
    );
    #[rustfmt::skip]
    let tls: [(&str, Kind, &str, u64); 4] = [
        ("tls_streams_opened_total", Counter, "TLS fallback streams opened.", streams.opened),
        ("tls_stream_datagrams_sent_total", Counter, "Tunnel datagrams queued to the TLS stream.", streams.datagrams_sent),
        ("tls_stream_datagrams_received_total", Counter, "Tunnel datagrams read from the TLS stream.", streams.datagrams_received),
        ("tls_stream_queue_drops_total", Counter, "Tunnel datagrams dropped because the TLS stream's queue was full.", streams.queue_drops),
    ];
    for (name, kind, help, value) in tls {
        m.single(name, kind, help, value);
    }
    m.finish()
}

/// `GET /metrics`.
pub(super) async fn metrics(State(web): State<Arc<Web>>) -> Response {
    let Ok(snap) = web.app.dataplane.snapshot().await else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "internal",
            "data plane stopped",
            None,
        );
    };
    let control = web.app.control();
    let failures = *web
        .app
        .failures
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let mut text = render(
        &snap,
        &control,
        failures,
        (web.app.carrier.transport(), web.app.carrier.streams.stats()),
    );
    if let Some(d) = &web.app.discovery {
        let mut m = Exposition::new("vpnnat_agent_");
        for (name, help, value) in d.counters.samples() {
            m.single(name, Kind::Counter, help, value);
        }
        m.single(
            "discovery_hosts",
            Kind::Gauge,
            "Hosts listed on the page.",
            d.hosts().len() as u64,
        );
        text.push_str(&m.finish());
    }
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}
