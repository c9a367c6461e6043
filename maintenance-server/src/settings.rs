//! The server's settings: defaults, `/etc/vpnnat/maintenance-server.toml`
//! (or `--config PATH`), then `VPNNAT_<SECTION>__<KEY>` overrides (only
//! variables with `__`, like the other programs), read by
//! [`vpnnat_shell::settings::load`]. The commented example is `config/maintenance-server.toml`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use vpnnat::ipv4::Prefix;
use vpnnat::pool::PoolConfig;

/// The commented example configuration (also the documentation of every key).
pub const EXAMPLE: &str = include_str!("../../config/maintenance-server.toml");

/// The default configuration file.
pub const DEFAULT_PATH: &str = "/etc/vpnnat/maintenance-server.toml";

/// Everything the server can be configured with.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// The listener.
    pub http: Http,
    /// HTTPS.
    pub tls: Tls,
    /// The state directory.
    pub state: State,
    /// The database.
    pub database: DatabaseSettings,
    /// The operator credential.
    pub operator: Operator,
    /// The NAT-address pool.
    pub pool: Pool,
    /// Maintenance requests.
    pub maintenance: Maintenance,
    /// Gateway heartbeats and failover.
    pub gateways: Gateways,
    /// Enrollment tokens.
    pub enrollment: Enrollment,
    /// Technician logins.
    pub technicians: Technicians,
    /// Per-site limits.
    pub quotas: Quotas,
    /// How long failure reports and audit rows are kept.
    pub retention: Retention,
    /// Expiry warnings and webhooks.
    pub notifications: Notifications,
    /// Planned rotation of sites' keys and credentials.
    pub rotation: Rotation,
}

/// `[rotation]`: when sites rotate their WireGuard key and credential by
/// themselves (without interruption; docs/OPERATIONS.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rotation {
    /// A site's key older than this many days is rotated; 0: never
    /// (fractions allowed).
    pub site_key_days: f64,
    /// A site's credential older than this many days is rotated; 0: never.
    pub site_credential_days: f64,
    /// A gateway's own WireGuard key older than this many days is rotated
    /// (its sites' agents follow without interruption); 0: never.
    pub gateway_key_days: f64,
    /// How long the previous credential stays valid, at most, after a new
    /// one was issued (its first use ends the previous one at once).
    pub credential_grace_s: u64,
}

impl Default for Rotation {
    fn default() -> Self {
        Self {
            site_key_days: 90.0,
            site_credential_days: 90.0,
            gateway_key_days: 90.0,
            credential_grace_s: 7 * 86_400,
        }
    }
}

impl Rotation {
    /// Milliseconds of `days` (0: off).
    pub fn period_ms(days: f64) -> i64 {
        // Validated: finite and between 0 and 36500.
        (days * 86_400_000.0) as i64
    }
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http {
    /// Empty: 127.0.0.1:8080, or 0.0.0.0:8443 with TLS.
    pub listen: String,
    /// Largest request body, bytes.
    pub body_limit_bytes: usize,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpAddr>,
    /// The URL technicians open the console at. An `https://` URL (e.g.
    /// behind a TLS-terminating proxy) makes the session cookie `Secure`
    /// and adds `Strict-Transport-Security`, as `[tls]` does. Empty: only
    /// `[tls]` decides.
    pub public_url: String,
}

impl Default for Http {
    fn default() -> Self {
        Self {
            listen: String::new(),
            body_limit_bytes: 65536,
            trusted_proxies: Vec::new(),
            public_url: String::new(),
        }
    }
}

/// `[tls]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// PEM certificate chain file.
    pub cert: String,
    /// PEM private key file.
    pub key: String,
}

impl Tls {
    /// Whether HTTPS is configured.
    pub fn enabled(&self) -> bool {
        !self.cert.is_empty() && !self.key.is_empty()
    }
}

/// `[state]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct State {
    /// The state directory.
    pub dir: PathBuf,
}

impl Default for State {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/lib/vpnnat"),
        }
    }
}

/// `[database]`
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// Empty: SQLite in the state directory.
    pub url: String,
    /// Pool size.
    pub max_connections: u32,
}

impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password.
        f.debug_struct("DatabaseSettings")
            .field("url", &redact_url(&self.url))
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://<redacted>{}", &url[..s], &url[at..]),
        _ => url.to_owned(),
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            max_connections: 8,
        }
    }
}

/// `[operator]`
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Operator {
    /// Empty: generated into the state directory.
    pub token: String,
    /// A bearer token that may read `/metrics` only (for the scraper), in
    /// addition to the operator token. Empty: only the operator token.
    pub metrics_token: String,
}

impl std::fmt::Debug for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operator")
            .field(
                "token",
                &if self.token.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field(
                "metrics_token",
                &if self.metrics_token.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .finish()
    }
}

/// `[pool]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pool {
    /// `a.b.c.d/len`
    pub prefix: String,
    /// A WARN is logged when this share of the pool (percent, 1–100) is
    /// held, and again when usage falls back below it.
    pub usage_warn_percent: u8,
}

impl Default for Pool {
    fn default() -> Self {
        Self {
            prefix: "10.64.0.0/16".to_owned(),
            usage_warn_percent: 80,
        }
    }
}

/// `[maintenance]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Maintenance {
    /// Lease length.
    pub max_duration_s: u64,
    /// Every failure report opens a request for what failed (the terminal
    /// it names, else [`Self::router_terminal`]).
    pub failure_opens_request: bool,
    /// The terminal of failure requests whose report names none (e.g. the
    /// LAN link).
    pub router_terminal: String,
    /// Expiry scan interval.
    pub expiry_check_ms: u64,
}

impl Default for Maintenance {
    fn default() -> Self {
        Self {
            max_duration_s: 14_400,
            failure_opens_request: false,
            router_terminal: "router".to_owned(),
            expiry_check_ms: 1000,
        }
    }
}

/// `[gateways]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gateways {
    /// Heartbeat interval told to gateways.
    pub heartbeat_interval_ms: u64,
    /// Missing heartbeats for this long → down.
    pub down_after_ms: u64,
    /// Agents' keepalive.
    pub persistent_keepalive_s: u16,
}

impl Default for Gateways {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 5000,
            down_after_ms: 15000,
            persistent_keepalive_s: 25,
        }
    }
}

/// `[enrollment]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Enrollment {
    /// Token lifetime.
    pub token_lifetime_hours: u64,
}

impl Default for Enrollment {
    fn default() -> Self {
        Self {
            token_lifetime_hours: 72,
        }
    }
}

/// `[technicians]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Technicians {
    /// Failed logins per minute per address and per name.
    pub login_attempts_per_minute: u32,
    /// Session lifetime.
    pub session_hours: u64,
    /// At most this many password checks (argon2id, 19 MiB and a CPU each)
    /// run at once; further logins wait up to a few seconds, then get 503
    /// `busy` with `Retry-After`. 0: the number of CPUs.
    pub concurrent_password_checks: u32,
}

impl Default for Technicians {
    fn default() -> Self {
        Self {
            login_attempts_per_minute: 10,
            session_hours: 12,
            concurrent_password_checks: 0,
        }
    }
}

/// `[quotas]`: what one site credential may hold and do, so that one
/// site (or whoever holds its key) cannot take the pool, the gateways'
/// routes or the console from the others.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Quotas {
    /// Open (waiting or in-progress) requests per site; one more → 409.
    pub open_requests_per_site: u32,
    /// NAT addresses (terminals) a site holds at once; more → 409.
    pub terminals_per_site: u32,
    /// Maintenance requests a site may open per minute; more → 429.
    pub requests_per_minute: u32,
    /// Failure reports a site may send per minute; more → 429.
    pub failure_reports_per_minute: u32,
    /// Failure reports kept per site (the oldest go first); at least
    /// `failure_reports_per_minute`.
    pub failures_kept_per_site: u32,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            open_requests_per_site: 8,
            terminals_per_site: 64,
            requests_per_minute: 30,
            failure_reports_per_minute: 10,
            failures_kept_per_site: 1000,
        }
    }
}

/// `[retention]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    /// Failure reports older than this many days are deleted.
    pub failure_days: u32,
    /// Audit rows older than this many days are deleted (at least 30: the
    /// database refuses to delete younger rows).
    pub audit_days: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            failure_days: 90,
            audit_days: 400,
        }
    }
}

/// `[notifications]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Notifications {
    /// An open request this many seconds before its expiry is announced
    /// once (`request.expiring`); 0: never.
    pub expiry_warning_s: u64,
    /// The first retry of a failed webhook delivery comes after this many
    /// milliseconds; each further one after twice as long (jittered).
    pub retry_initial_ms: u64,
    /// The longest pause between two attempts, ms.
    pub retry_max_ms: u64,
    /// Attempts before a delivery is given up.
    pub max_attempts: u32,
    /// How long one attempt may take, ms.
    pub timeout_ms: u64,
    /// Delivered and given-up deliveries are deleted after this many days.
    pub keep_days: u32,
    /// The receivers.
    pub webhooks: Vec<Webhook>,
}

impl Default for Notifications {
    fn default() -> Self {
        Self {
            expiry_warning_s: 900,
            retry_initial_ms: 5_000,
            retry_max_ms: 3_600_000,
            max_attempts: 20,
            timeout_ms: 10_000,
            keep_days: 7,
            webhooks: Vec::new(),
        }
    }
}

/// `[[notifications.webhooks]]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Webhook {
    /// A short name (letters, digits, `-`, `_`): the key of its deliveries.
    pub name: String,
    /// Where events are posted (`https://…`; `http://` only to loopback).
    pub url: String,
    /// A file holding the shared secret of the signature (at least 32
    /// characters; surrounding whitespace is ignored).
    pub secret_file: PathBuf,
    /// The event types sent (`request.created`, `failure.reported`,
    /// `request.expiring`); empty: all.
    pub events: Vec<String>,
}

impl Settings {
    /// Loads the settings from `path` (or the default file when it exists) and the environment.
    ///
    /// # Errors
    /// One line naming the file or variable and the key.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let loaded = vpnnat_shell::settings::load::<Self>(path, DEFAULT_PATH)?;
        let source = loaded.source;
        loaded
            .settings
            .validate()
            .map_err(|(key, msg)| anyhow::anyhow!("{source}: {key}: {msg}"))?;
        Ok(loaded.settings)
    }

    /// Checks values that parse but cannot work; returns the key at fault.
    ///
    /// # Errors
    /// `(key, message)`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        self.pool_prefix().map_err(|m| ("pool.prefix", m))?;
        self.listen().map_err(|m| ("http.listen", m))?;
        if self.tls.cert.is_empty() != self.tls.key.is_empty() {
            return Err((
                "tls.cert",
                "set both tls.cert and tls.key, or neither".into(),
            ));
        }
        if self.http.body_limit_bytes < 1024 {
            return Err(("http.body_limit_bytes", "at least 1024".into()));
        }
        if self.maintenance.max_duration_s == 0 {
            return Err(("maintenance.max_duration_s", "at least 1".into()));
        }
        vpnnat::messages::TerminalName::new(self.maintenance.router_terminal.clone())
            .map_err(|e| ("maintenance.router_terminal", e.message))?;
        if self.gateways.heartbeat_interval_ms == 0
            || self.gateways.down_after_ms <= self.gateways.heartbeat_interval_ms
        {
            return Err((
                "gateways.down_after_ms",
                "must be greater than gateways.heartbeat_interval_ms (> 0)".into(),
            ));
        }
        for (key, days) in [
            ("rotation.site_key_days", self.rotation.site_key_days),
            (
                "rotation.site_credential_days",
                self.rotation.site_credential_days,
            ),
            ("rotation.gateway_key_days", self.rotation.gateway_key_days),
        ] {
            if !days.is_finite() || !(0.0..=36_500.0).contains(&days) {
                return Err((key, "0 (off) to 36500 days".into()));
            }
        }
        if self.rotation.credential_grace_s == 0 || self.rotation.credential_grace_s > 365 * 86_400
        {
            return Err(("rotation.credential_grace_s", "1 to 31536000".into()));
        }
        if self.enrollment.token_lifetime_hours == 0 {
            return Err(("enrollment.token_lifetime_hours", "at least 1".into()));
        }
        if self.technicians.login_attempts_per_minute == 0 {
            return Err(("technicians.login_attempts_per_minute", "at least 1".into()));
        }
        let token = &self.operator.token;
        if !token.is_empty()
            && (token.len() < 16
                || token.chars().any(|c| c.is_whitespace() || c.is_control())
                || crate::secrets::SecretKind::of(token)
                    .is_some_and(|k| k != crate::secrets::SecretKind::Operator))
        {
            return Err((
                "operator.token",
                "at least 16 characters, no spaces, and not another kind's prefix (or empty: generated)".into(),
            ));
        }
        let metrics_token = &self.operator.metrics_token;
        if !metrics_token.is_empty()
            && (metrics_token.len() < 16
                || metrics_token
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err((
                "operator.metrics_token",
                "at least 16 characters, no spaces (or empty: only the operator token)".into(),
            ));
        }
        let url = &self.http.public_url;
        if !(url.is_empty() || url.starts_with("https://") || url.starts_with("http://")) {
            return Err((
                "http.public_url",
                "expected empty, https://… or http://…".into(),
            ));
        }
        if self.pool.usage_warn_percent == 0 || self.pool.usage_warn_percent > 100 {
            return Err(("pool.usage_warn_percent", "1 to 100".into()));
        }
        for (key, v) in [
            (
                "quotas.open_requests_per_site",
                self.quotas.open_requests_per_site,
            ),
            ("quotas.terminals_per_site", self.quotas.terminals_per_site),
            (
                "quotas.requests_per_minute",
                self.quotas.requests_per_minute,
            ),
            (
                "quotas.failure_reports_per_minute",
                self.quotas.failure_reports_per_minute,
            ),
            (
                "quotas.failures_kept_per_site",
                self.quotas.failures_kept_per_site,
            ),
            ("retention.failure_days", self.retention.failure_days),
        ] {
            if v == 0 {
                return Err((key, "at least 1".into()));
            }
        }
        if self.quotas.failures_kept_per_site < self.quotas.failure_reports_per_minute {
            // The per-minute limit counts the stored reports.
            return Err((
                "quotas.failures_kept_per_site",
                "at least quotas.failure_reports_per_minute".into(),
            ));
        }
        if self.retention.audit_days < 30 {
            return Err((
                "retention.audit_days",
                "at least 30 (younger audit rows cannot be deleted)".into(),
            ));
        }
        self.validate_notifications()?;
        if self.database.max_connections == 0 {
            return Err(("database.max_connections", "at least 1".into()));
        }
        let url = &self.database.url;
        if !(url.is_empty()
            || url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return Err((
                "database.url",
                "expected empty, sqlite://PATH or postgres://…".into(),
            ));
        }
        Ok(())
    }

    fn validate_notifications(&self) -> Result<(), (&'static str, String)> {
        let n = &self.notifications;
        if n.retry_initial_ms == 0 || n.retry_max_ms < n.retry_initial_ms {
            return Err((
                "notifications.retry_max_ms",
                "retry_initial_ms at least 1 and retry_max_ms at least retry_initial_ms".into(),
            ));
        }
        if n.max_attempts == 0 {
            return Err(("notifications.max_attempts", "at least 1".into()));
        }
        if n.timeout_ms < 100 {
            return Err(("notifications.timeout_ms", "at least 100".into()));
        }
        if n.keep_days == 0 {
            return Err(("notifications.keep_days", "at least 1".into()));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, w) in n.webhooks.iter().enumerate() {
            let which = |m: &str| format!("webhook #{} ({:?}): {m}", i + 1, w.name);
            if w.name.is_empty()
                || w.name.len() > 64
                || !w
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err((
                    "notifications.webhooks.name",
                    which("1 to 64 letters, digits, - or _"),
                ));
            }
            if !names.insert(w.name.as_str()) {
                return Err(("notifications.webhooks.name", which("used twice")));
            }
            crate::webhooks::check_url(&w.url)
                .map_err(|m| ("notifications.webhooks.url", which(&m)))?;
            if w.secret_file.as_os_str().is_empty() {
                return Err((
                    "notifications.webhooks.secret_file",
                    which("required: a file holding the signing secret"),
                ));
            }
            for e in &w.events {
                if !crate::webhooks::EVENT_TYPES.contains(&e.as_str()) {
                    return Err((
                        "notifications.webhooks.events",
                        which(&format!(
                            "unknown event {e:?}; known: {}",
                            crate::webhooks::EVENT_TYPES.join(", ")
                        )),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The listen address.
    ///
    /// # Errors
    /// When `http.listen` is not `IP:PORT`.
    pub fn listen(&self) -> Result<SocketAddr, String> {
        if self.http.listen.is_empty() {
            return Ok(if self.tls.enabled() {
                SocketAddr::from(([0, 0, 0, 0], 8443))
            } else {
                SocketAddr::from(([127, 0, 0, 1], 8080))
            });
        }
        self.http
            .listen
            .parse()
            .map_err(|_| format!("expected IP:PORT, got {:?}", self.http.listen))
    }

    /// The parsed pool prefix.
    ///
    /// # Errors
    /// When `pool.prefix` is not an IPv4 prefix with host bits clear and length 8–32.
    pub fn pool_prefix(&self) -> Result<Prefix, String> {
        parse_prefix(&self.pool.prefix)
    }

    /// Whether technicians reach the console over HTTPS (here or at a TLS
    /// proxy): the session cookie is then `Secure` and HSTS is sent.
    pub fn console_https(&self) -> bool {
        self.tls.enabled() || self.http.public_url.starts_with("https://")
    }

    /// The most password checks that run at once.
    pub fn password_checks(&self) -> usize {
        match self.technicians.concurrent_password_checks {
            0 => std::thread::available_parallelism().map_or(2, std::num::NonZero::get),
            n => usize::try_from(n).unwrap_or(usize::MAX),
        }
    }

    /// The database URL with the SQLite default filled in.
    pub fn database_url(&self) -> String {
        if self.database.url.is_empty() {
            format!(
                "sqlite://{}",
                self.state.dir.join("maintenance-server.db").display()
            )
        } else {
            self.database.url.clone()
        }
    }
}

/// Parses a `pool.prefix` value `a.b.c.d/len` (8 ≤ len ≤ 32, host bits
/// zero) and checks with the core's pool model that it leaves an address to
/// hand out. A shorter prefix than /8 would be a pool table of tens of
/// millions of rows.
///
/// # Errors
/// A sentence saying what is wrong.
pub fn parse_prefix(s: &str) -> Result<Prefix, String> {
    let prefix = vpnnat::pool::parse_prefix(s).map_err(|e| e.to_string())?;
    if prefix.prefix_len() < 8 {
        return Err("the prefix length must be 8 to 32".to_owned());
    }
    vpnnat::pool::Pool::new(&PoolConfig {
        prefix,
        reserved: Vec::new(),
    })
    .map_err(|e| e.to_string())?;
    Ok(prefix)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn the_example_parses_and_matches_the_defaults() {
        let s: Settings =
            vpnnat::config::load(Some(("maintenance-server.toml", EXAMPLE)), Vec::new()).unwrap();
        s.validate().unwrap();
        let d = Settings::default();
        assert_eq!(s.listen(), d.listen());
        assert_eq!(s.listen().unwrap(), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(s.pool.prefix, d.pool.prefix);
        assert_eq!(s.state.dir, d.state.dir);
        assert_eq!(s.http.body_limit_bytes, d.http.body_limit_bytes);
        assert_eq!(s.maintenance.max_duration_s, d.maintenance.max_duration_s);
        assert_eq!(s.gateways.down_after_ms, d.gateways.down_after_ms);
        assert_eq!(s.pool.usage_warn_percent, d.pool.usage_warn_percent);
        assert_eq!(
            s.quotas.open_requests_per_site,
            d.quotas.open_requests_per_site
        );
        assert_eq!(s.quotas.terminals_per_site, d.quotas.terminals_per_site);
        assert_eq!(s.quotas.requests_per_minute, d.quotas.requests_per_minute);
        assert_eq!(
            s.quotas.failure_reports_per_minute,
            d.quotas.failure_reports_per_minute
        );
        assert_eq!(
            s.quotas.failures_kept_per_site,
            d.quotas.failures_kept_per_site
        );
        assert_eq!(s.retention.failure_days, d.retention.failure_days);
        assert_eq!(s.retention.audit_days, d.retention.audit_days);
        assert_eq!(
            s.database_url(),
            "sqlite:///var/lib/vpnnat/maintenance-server.db"
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        let e =
            vpnnat::config::load::<Settings>(Some(("f.toml", "[pool]\nprefix = 5\n")), Vec::new())
                .unwrap_err();
        assert_eq!(e.key, "pool.prefix");
        let s: Settings = vpnnat::config::load(
            Some(("f.toml", "[pool]\nprefix = \"10.64.0.1/16\"\n")),
            Vec::new(),
        )
        .unwrap();
        assert_eq!(s.validate().unwrap_err().0, "pool.prefix");
        let s: Settings = vpnnat::config::load(
            None,
            vec![("VPNNAT_DATABASE__URL".into(), "mysql://x".into())],
        )
        .unwrap();
        assert_eq!(s.validate().unwrap_err().0, "database.url");
        for (toml, key) in [
            (
                "[quotas]\nopen_requests_per_site = 0\n",
                "quotas.open_requests_per_site",
            ),
            (
                "[quotas]\nfailures_kept_per_site = 5\n",
                "quotas.failures_kept_per_site",
            ),
            ("[retention]\naudit_days = 29\n", "retention.audit_days"),
            (
                "[pool]\nusage_warn_percent = 101\n",
                "pool.usage_warn_percent",
            ),
        ] {
            let s: Settings = vpnnat::config::load(Some(("f.toml", toml)), Vec::new()).unwrap();
            assert_eq!(s.validate().unwrap_err().0, key, "{toml}");
        }
    }

    #[test]
    fn tls_moves_the_default_port() {
        let mut s = Settings::default();
        s.tls.cert = "c.pem".into();
        s.tls.key = "k.pem".into();
        assert_eq!(s.listen().unwrap(), "0.0.0.0:8443".parse().unwrap());
    }

    #[test]
    fn prefixes() {
        let p = parse_prefix("10.64.0.0/16").unwrap();
        assert_eq!(
            p.hosts(),
            Ipv4Addr::new(10, 64, 0, 1)..=Ipv4Addr::new(10, 64, 255, 254)
        );
        assert!(p.contains(Ipv4Addr::new(10, 64, 9, 9)));
        assert!(!p.contains(Ipv4Addr::new(10, 65, 0, 1)));
        assert!(parse_prefix("10.64.0.0").is_err());
        assert!(parse_prefix("10.64.0.0/33").is_err());
        assert_eq!(
            u32::from(*parse_prefix("10.64.0.8/32").unwrap().hosts().start()),
            0x0a40_0008
        );
    }

    #[test]
    fn database_url_is_redacted_in_debug() {
        let d = DatabaseSettings {
            url: "postgres://u:secret@h/db".into(),
            max_connections: 1,
        };
        assert!(!format!("{d:?}").contains("secret"));
    }
}
