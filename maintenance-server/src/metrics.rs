//! `/metrics`: Prometheus text exposition (format 0.0.4).

use vpnnat_shell::metrics::{Exposition, Kind::Gauge};

use crate::db::views::Counts;

/// Renders the gauges; every labelled series is present, zero when nothing counts.
pub fn render(c: &Counts, long_polls: i64) -> String {
    let count = |rows: &[(String, i64)], key: &str| {
        rows.iter().find(|(k, _)| k == key).map_or(0, |(_, n)| *n)
    };
    let mut m = Exposition::new("vpnnat_");
    m.family("requests", Gauge, "Maintenance requests by state.");
    for state in ["waiting", "in_progress", "ended", "revoked", "expired"] {
        m.sample("requests", &[("state", state)], count(&c.requests, state));
    }
    m.family("gateways", Gauge, "Gateways by health.");
    for health in ["healthy", "degraded", "down"] {
        m.sample(
            "gateways",
            &[("health", health)],
            count(&c.gateways, health),
        );
    }
    m.family(
        "pool_addresses",
        Gauge,
        "NAT-address pool addresses by use.",
    );
    m.sample("pool_addresses", &[("use", "free")], c.pool_free);
    m.sample("pool_addresses", &[("use", "used")], c.pool_used);
    m.single("sites", Gauge, "Sites.", c.sites);
    m.single(
        "long_polls_waiting",
        Gauge,
        "Desired-state and console long-polls held by this replica.",
        long_polls,
    );
    m.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_present_even_when_zero() {
        let c = Counts {
            requests: vec![("waiting".into(), 2)],
            gateways: vec![("healthy".into(), 1)],
            pool_free: 10,
            pool_used: 2,
            sites: 3,
        };
        let t = render(&c, 4);
        for line in [
            "vpnnat_requests{state=\"waiting\"} 2",
            "vpnnat_requests{state=\"expired\"} 0",
            "vpnnat_gateways{health=\"healthy\"} 1",
            "vpnnat_gateways{health=\"down\"} 0",
            "vpnnat_pool_addresses{use=\"free\"} 10",
            "vpnnat_pool_addresses{use=\"used\"} 2",
            "vpnnat_sites 3",
            "vpnnat_long_polls_waiting 4",
        ] {
            assert!(t.lines().any(|l| l == line), "{line} missing in\n{t}");
        }
    }
}
