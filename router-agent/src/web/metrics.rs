//! `GET /metrics`: the agent's counters in the Prometheus text exposition
//! format (version 0.0.4).

use std::fmt::Write as _;
use std::sync::{Arc, PoisonError};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{Web, error};
use crate::app::FailureCounters;
use crate::dataplane::Snapshot;

const GAUGE: &str = "gauge";
const COUNTER: &str = "counter";

/// A sample's label: none, or one `key="value"`.
type Label<'a> = Option<(&'a str, &'a str)>;

/// Writes one metric family: its `HELP` and `TYPE` lines, then its samples.
fn family<'a>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Label<'a>, u64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (label, value) in samples {
        let _ = match label {
            Some((key, label)) => writeln!(out, "{name}{{{key}=\"{label}\"}} {value}"),
            None => writeln!(out, "{name} {value}"),
        };
    }
}

/// A family of one unlabelled sample.
fn single(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    family(out, name, kind, help, [(None, value)]);
}

fn direction(d: &str) -> Label<'_> {
    Some(("direction", d))
}

/// Renders the exposition of a data-plane snapshot, the control-plane state
/// and the failure reports.
fn render(snap: &Snapshot, control_connected: bool, failures: FailureCounters) -> String {
    let mut m = String::new();
    let c = &snap.counters;
    let up = snap.tunnel.as_ref().is_some_and(|t| t.up);
    #[rustfmt::skip]
    let basics: [(&str, &str, &str, u64); 3] = [
        ("vpnnat_agent_mappings", GAUGE, "NAT mappings in force.", snap.mappings.len() as u64),
        ("vpnnat_agent_tunnel_up", GAUGE, "Whether the tunnel to the gateway has a session.", u64::from(up)),
        ("vpnnat_agent_control_connected", GAUGE, "Whether the maintenance server answers.", u64::from(control_connected)),
    ];
    for (name, kind, help, value) in basics {
        single(&mut m, name, kind, help, value);
    }
    #[rustfmt::skip]
    let traffic: [(&str, &str, u64, u64); 2] = [
        ("vpnnat_agent_packets_total", "Packets forwarded, by direction.", c.to_lan_packets, c.to_tunnel_packets),
        ("vpnnat_agent_bytes_total", "Inner bytes forwarded, by direction.", c.to_lan_bytes, c.to_tunnel_bytes),
    ];
    for (name, help, to_lan, to_tunnel) in traffic {
        let samples = [
            (direction("to_lan"), to_lan),
            (direction("to_tunnel"), to_tunnel),
        ];
        family(&mut m, name, COUNTER, help, samples);
    }
    family(
        &mut m,
        "vpnnat_agent_drops_total",
        COUNTER,
        "Packets dropped, by reason.",
        c.drops
            .iter()
            .map(|(r, n)| (Some(("reason", r.as_str())), n)),
    );
    #[rustfmt::skip]
    single(&mut m, "vpnnat_agent_mappings_expired_total", COUNTER, "Mappings the agent removed at their expiry.", c.mappings_expired);
    if let Some(t) = &snap.tunnel {
        #[rustfmt::skip]
        single(&mut m, "vpnnat_agent_tunnel_handshakes_total", COUNTER, "Handshakes completed.", t.stats.handshakes);
    }
    #[rustfmt::skip]
    single(&mut m, "vpnnat_agent_io_errors_total", COUNTER, "Socket and TUN errors.", snap.io.io_errors);
    family(
        &mut m,
        "vpnnat_agent_udp_datagrams_total",
        COUNTER,
        "Tunnel datagrams, by direction.",
        [
            (direction("received"), snap.io.udp_datagrams_received),
            (direction("sent"), snap.io.udp_datagrams_sent),
        ],
    );
    if let Some(n) = &snap.netstack {
        #[rustfmt::skip]
        let netstack: [(&str, &str, &str, u64); 4] = [
            ("vpnnat_agent_netstack_tcp_connections_total", COUNTER, "TCP connections relayed.", n.tcp_connections),
            ("vpnnat_agent_netstack_tcp_open", GAUGE, "TCP connections open.", n.tcp_open),
            ("vpnnat_agent_netstack_tcp_refused_total", COUNTER, "TCP connections the terminal refused.", n.tcp_refused),
            ("vpnnat_agent_netstack_udp_flows_total", COUNTER, "UDP flows relayed.", n.udp_flows),
        ];
        for (name, kind, help, value) in netstack {
            single(&mut m, name, kind, help, value);
        }
        let kind = |k| Some(("kind", k));
        family(
            &mut m,
            "vpnnat_agent_netstack_icmp_echo_total",
            COUNTER,
            "ICMP echoes relayed, by kind.",
            [
                (kind("request"), n.icmp_echo_requests),
                (kind("reply"), n.icmp_echo_replies),
                (kind("unavailable"), n.icmp_unavailable),
            ],
        );
        #[rustfmt::skip]
        single(&mut m, "vpnnat_agent_netstack_dropped_total", COUNTER, "Packets the netstack dropped.", n.dropped);
    }
    let outcome = |o| Some(("outcome", o));
    family(
        &mut m,
        "vpnnat_agent_failure_reports_total",
        COUNTER,
        "Failure reports, by outcome.",
        [
            (outcome("reported"), failures.reported),
            (outcome("undelivered"), failures.undelivered),
        ],
    );
    m
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
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(&snap, control.connected, failures),
    )
        .into_response()
}
