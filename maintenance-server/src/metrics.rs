//! `/metrics`: Prometheus text exposition (format 0.0.4).

use std::fmt::Write as _;

use crate::db::views::Counts;

/// Renders the gauges.
pub fn render(c: &Counts, long_polls: i64) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# HELP vpnnat_requests Maintenance requests by state.\n# TYPE vpnnat_requests gauge"
    );
    for state in ["waiting", "in_progress", "ended", "revoked", "expired"] {
        let n = c
            .requests
            .iter()
            .find(|(k, _)| k == state)
            .map_or(0, |(_, n)| *n);
        let _ = writeln!(s, "vpnnat_requests{{state=\"{state}\"}} {n}");
    }
    let _ = writeln!(
        s,
        "# HELP vpnnat_gateways Gateways by health.\n# TYPE vpnnat_gateways gauge"
    );
    for health in ["healthy", "degraded", "down"] {
        let n = c
            .gateways
            .iter()
            .find(|(k, _)| k == health)
            .map_or(0, |(_, n)| *n);
        let _ = writeln!(s, "vpnnat_gateways{{health=\"{health}\"}} {n}");
    }
    let _ = writeln!(
        s,
        "# HELP vpnnat_pool_addresses NAT-address pool addresses by use.\n# TYPE vpnnat_pool_addresses gauge"
    );
    let _ = writeln!(s, "vpnnat_pool_addresses{{use=\"free\"}} {}", c.pool_free);
    let _ = writeln!(s, "vpnnat_pool_addresses{{use=\"used\"}} {}", c.pool_used);
    let _ = writeln!(
        s,
        "# HELP vpnnat_sites Sites.\n# TYPE vpnnat_sites gauge\nvpnnat_sites {}",
        c.sites
    );
    let _ = writeln!(
        s,
        "# HELP vpnnat_long_polls_waiting Desired-state and console long-polls held by this replica.\n\
         # TYPE vpnnat_long_polls_waiting gauge\nvpnnat_long_polls_waiting {long_polls}"
    );
    s
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
