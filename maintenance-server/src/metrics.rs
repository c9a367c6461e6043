//! `/metrics`: Prometheus text exposition (format 0.0.4).
//!
//! A scrape must stay cheap however long the server runs: it reads only
//! aggregates an index answers in time proportional to what is open or in
//! use (requests by open state, held pool addresses), plus the two tables
//! the operator creates by hand (gateways, sites). Closed requests, which
//! grow without bound, are not counted here (the audit log and the request
//! list have them).

use sqlx::AnyConnection;
use vpnnat_shell::metrics::{
    Exposition,
    Kind::{Counter, Gauge},
};

use crate::auth::PasswordCheckCounts;
use crate::db::{DbResult, col};

/// The request states a scrape counts (the open ones).
pub const OPEN_STATES: [&str; 2] = ["waiting", "in_progress"];

/// What a scrape reads from the database.
#[derive(Debug, Default)]
pub struct Counts {
    /// Open requests per state.
    pub requests: Vec<(String, i64)>,
    /// Gateways per health.
    pub gateways: Vec<(String, i64)>,
    /// Free pool addresses.
    pub pool_free: i64,
    /// Held pool addresses.
    pub pool_used: i64,
    /// Sites.
    pub sites: i64,
    /// Webhook deliveries not yet delivered nor given up.
    pub webhooks_pending: i64,
    /// Sites with a planned key rotation, and credential rotation, under
    /// way or asked for.
    pub site_rotations: [i64; 2],
    /// Gateways whose key rotation is asked for or under way.
    pub gateway_key_rotations: i64,
}

/// Reads the counts; `pool_size` is the number of addresses the configured
/// pool hands out (the pool table holds exactly those).
///
/// # Errors
/// Database failures.
pub async fn counts(conn: &mut AnyConnection, pool_size: i64) -> DbResult<Counts> {
    let mut c = Counts::default();
    for state in OPEN_STATES {
        // Answered from the index on (state, expires_at): only open rows are visited.
        let r = sqlx::query("SELECT COUNT(*) AS n FROM requests WHERE state = $1")
            .bind(state)
            .fetch_one(&mut *conn)
            .await?;
        c.requests.push((state.to_owned(), col(&r, "n")?));
    }
    for r in
        sqlx::query("SELECT health, COUNT(*) AS n FROM gateways GROUP BY health ORDER BY health")
            .fetch_all(&mut *conn)
            .await?
    {
        c.gateways.push((col(&r, "health")?, col(&r, "n")?));
    }
    // Answered from the (site_id, terminal) index: only held addresses are visited.
    let r = sqlx::query("SELECT COUNT(*) AS n FROM nat_addresses WHERE site_id IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    c.pool_used = col(&r, "n")?;
    c.pool_free = (pool_size - c.pool_used).max(0);
    let r = sqlx::query("SELECT COUNT(*) AS n FROM sites")
        .fetch_one(&mut *conn)
        .await?;
    c.sites = col(&r, "n")?;
    for (i, pending) in [
        "next_public_key IS NOT NULL OR rotate_key <> 0",
        "previous_credential_hash IS NOT NULL OR rotate_credential <> 0",
    ]
    .into_iter()
    .enumerate()
    {
        let sql = format!("SELECT COUNT(*) AS n FROM sites WHERE {pending}");
        let r = sqlx::query(&sql).fetch_one(&mut *conn).await?;
        c.site_rotations[i] = col(&r, "n")?;
    }
    let r = sqlx::query(
        "SELECT COUNT(*) AS n FROM gateways WHERE next_public_key IS NOT NULL OR rotate_key <> 0",
    )
    .fetch_one(&mut *conn)
    .await?;
    c.gateway_key_rotations = col(&r, "n")?;
    // Answered from the partial index of waiting deliveries.
    c.webhooks_pending = crate::db::outbox::pending(conn).await?;
    Ok(c)
}

/// Renders the gauges and counters; every labelled series is present, zero
/// when nothing counts.
pub fn render(
    c: &Counts,
    long_polls: i64,
    logins: &PasswordCheckCounts,
    webhooks: &crate::webhooks::Stats,
) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let count = |rows: &[(String, i64)], key: &str| {
        rows.iter().find(|(k, _)| k == key).map_or(0, |(_, n)| *n)
    };
    let mut m = Exposition::new("vpnnat_");
    m.family("requests", Gauge, "Open maintenance requests by state.");
    for state in OPEN_STATES {
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
    m.family(
        "site_rotations_pending",
        Gauge,
        "Sites whose planned key or credential rotation is asked for or under way.",
    );
    m.sample(
        "site_rotations_pending",
        &[("what", "key")],
        c.site_rotations[0],
    );
    m.sample(
        "site_rotations_pending",
        &[("what", "credential")],
        c.site_rotations[1],
    );
    m.single(
        "gateway_key_rotations_pending",
        Gauge,
        "Gateways whose key rotation is asked for or under way.",
        c.gateway_key_rotations,
    );
    m.single(
        "long_polls_waiting",
        Gauge,
        "Desired-state and console long-polls held by this replica.",
        long_polls,
    );
    m.single(
        "login_password_checks_total",
        Counter,
        "Technician password checks (argon2id) this replica started.",
        logins.total,
    );
    m.single(
        "login_password_checks_running",
        Gauge,
        "Technician password checks running now.",
        logins.running,
    );
    m.single(
        "login_password_checks_running_max",
        Gauge,
        "The most technician password checks that ran at once since start.",
        logins.running_max,
    );
    m.single(
        "login_password_checks_limit",
        Gauge,
        "technicians.concurrent_password_checks in effect.",
        logins.max,
    );
    m.family(
        "login_refused_total",
        Counter,
        "Technician logins refused before their password was checked.",
    );
    m.sample(
        "login_refused_total",
        &[("reason", "rate_limited")],
        logins.rate_limited,
    );
    m.sample("login_refused_total", &[("reason", "busy")], logins.busy);
    m.single(
        "webhook_deliveries_pending",
        Gauge,
        "Webhook deliveries waiting for their next attempt (all replicas).",
        c.webhooks_pending,
    );
    m.family(
        "webhook_attempts_total",
        Counter,
        "Webhook delivery attempts this replica made, by outcome.",
    );
    m.sample(
        "webhook_attempts_total",
        &[("outcome", "delivered")],
        webhooks.delivered.load(Relaxed),
    );
    m.sample(
        "webhook_attempts_total",
        &[("outcome", "failed")],
        webhooks.failed.load(Relaxed),
    );
    m.single(
        "webhook_deliveries_given_up_total",
        Counter,
        "Webhook deliveries this replica gave up after notifications.max_attempts.",
        webhooks.given_up.load(Relaxed),
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
            webhooks_pending: 5,
            site_rotations: [1, 0],
            gateway_key_rotations: 1,
        };
        let logins = PasswordCheckCounts {
            max: 4,
            running_max: 3,
            total: 7,
            ..Default::default()
        };
        let hooks = crate::webhooks::Stats::default();
        hooks.failed.store(2, std::sync::atomic::Ordering::Relaxed);
        let t = render(&c, 4, &logins, &hooks);
        for line in [
            "vpnnat_requests{state=\"waiting\"} 2",
            "vpnnat_requests{state=\"in_progress\"} 0",
            "vpnnat_gateways{health=\"healthy\"} 1",
            "vpnnat_gateways{health=\"down\"} 0",
            "vpnnat_pool_addresses{use=\"free\"} 10",
            "vpnnat_pool_addresses{use=\"used\"} 2",
            "vpnnat_sites 3",
            "vpnnat_site_rotations_pending{what=\"key\"} 1",
            "vpnnat_site_rotations_pending{what=\"credential\"} 0",
            "vpnnat_gateway_key_rotations_pending 1",
            "vpnnat_long_polls_waiting 4",
            "vpnnat_login_password_checks_total 7",
            "vpnnat_login_password_checks_running_max 3",
            "vpnnat_login_password_checks_limit 4",
            "vpnnat_login_refused_total{reason=\"busy\"} 0",
            "vpnnat_webhook_deliveries_pending 5",
            "vpnnat_webhook_attempts_total{outcome=\"delivered\"} 0",
            "vpnnat_webhook_attempts_total{outcome=\"failed\"} 2",
            "vpnnat_webhook_deliveries_given_up_total 0",
        ] {
            assert!(t.lines().any(|l| l == line), "{line} missing in\n{t}");
        }
    }
}
