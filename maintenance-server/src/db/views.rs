//! The read side: documents and lists built from the tables.
//!
//! A desired-state document reads its version first and its content after,
//! so the content is never older than the version it is labelled with.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::AnyConnection;
use sqlx::any::AnyRow;
use vpnnat::ipv4::Prefix;
use vpnnat::messages::{
    AgentDesiredState, AgentMapping, AgentTls, AgentTunnel, AuditEntry, FailureView,
    GatewayDesiredState, GatewayId, GatewayKeyRotation, GatewayPeer, GatewayTls, GatewayView,
    IKE_PORT, IpsecParams, IpsecSiteConfig, MaintenanceRequestView, PublicKey, RequestId,
    RequestState, SiteId, SiteView, TerminalAssignment, TerminalName, Transport, TunnelKind,
    UnixMillis,
};

use super::teams::TeamScope;
use super::{DbError, DbResult, col, id64, u64_of};

/// A serde unit-variant enum as its wire string (`"in_progress"` → `in_progress`).
pub fn enum_str<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// The inverse of [`enum_str`].
///
/// # Errors
/// When the stored text is not a variant (a corrupted row).
pub fn enum_parse<T: DeserializeOwned>(s: &str) -> DbResult<T> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|e| DbError::Other(sqlx::Error::Decode(Box::new(e))))
}

pub(super) fn decode_err(e: impl std::error::Error + Send + Sync + 'static) -> DbError {
    DbError::Other(sqlx::Error::Decode(Box::new(e)))
}

/// An address as stored.
pub fn addr_to_i64(a: Ipv4Addr) -> i64 {
    i64::from(u32::from(a))
}

/// A stored address.
pub fn addr_of(v: i64) -> Ipv4Addr {
    Ipv4Addr::from(u32::try_from(v).unwrap_or(0))
}

fn opt_ms(v: Option<i64>) -> Option<UnixMillis> {
    v.map(|t| UnixMillis(u64_of(t)))
}

fn ms(v: i64) -> UnixMillis {
    UnixMillis(u64_of(v))
}

/// The acceptance number the customer quotes: `YYYYMMDD-NNNNNN` (UTC date of receipt, request id).
pub fn acceptance_number(id: RequestId, received_at_ms: i64) -> String {
    let days = received_at_ms.div_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}{m:02}{d:02}-{:06}", id.0)
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A site's bearer token for its gateway's TLS port: derived from the hash
/// of its credential (which only the database holds), so it needs no
/// storage of its own and changes when the credential does. The gateway gets
/// only its SHA-256.
pub fn tls_token(credential_hash: &str) -> String {
    sha256_hex(format!("vpnnat tls token\n{credential_hash}").as_bytes())
}

/// The TLS fallback for an agent: its gateway's first TLS endpoint and pin,
/// and the site's token (none when the gateway offers no TLS or the site
/// has no credential).
fn agent_tls(gateway_tls: Option<String>, credential_hash: Option<&str>) -> Option<AgentTls> {
    let tls: GatewayTls = serde_json::from_str(&gateway_tls?).ok()?;
    Some(AgentTls {
        endpoint: *tls.endpoints.first()?,
        spki_sha256: tls.spki_sha256,
        token: tls_token(credential_hash?),
    })
}

/// The agent's desired state, or `NotFound`.
///
/// # Errors
/// Database failures.
pub async fn agent_state(
    conn: &mut AnyConnection,
    site: SiteId,
    keepalive_s: u16,
) -> DbResult<AgentDesiredState> {
    let row = sqlx::query("SELECT version, problem, tunnel, ipsec_psk FROM sites WHERE id = $1")
        .bind(id64(site.0))
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(DbError::NotFound)?;
    let version = u64_of(col(&row, "version")?);
    let problem: Option<String> = col(&row, "problem")?;
    let kind: TunnelKind = enum_parse(&col::<String>(&row, "tunnel")?)?;
    let psk: Option<String> = col(&row, "ipsec_psk")?;
    let rows = sqlx::query(
        "SELECT n.address, n.terminal, MAX(r.expires_at) AS expires_at, MAX(r.id) AS request_id \
         FROM nat_addresses n \
         JOIN request_terminals rt ON rt.nat_address = n.address \
         JOIN requests r ON r.id = rt.request_id AND r.site_id = n.site_id \
              AND r.state IN ('waiting', 'in_progress') \
         WHERE n.site_id = $1 GROUP BY n.address, n.terminal ORDER BY n.address",
    )
    .bind(id64(site.0))
    .fetch_all(&mut *conn)
    .await?;
    let mut mappings = Vec::with_capacity(rows.len());
    for r in rows {
        mappings.push(AgentMapping {
            nat_address: addr_of(col(&r, "address")?),
            terminal: TerminalName::new(col::<String>(&r, "terminal")?).map_err(decode_err)?,
            request_id: RequestId(u64_of(col(&r, "request_id")?)),
            expires_at: ms(col(&r, "expires_at")?),
        });
    }
    let tunnel = sqlx::query(
        // Only once the gateway has applied a document holding this peer:
        // a handshake that arrived earlier would be dropped (unknown key).
        // During a rotation of the gateway's key the agent dials its next
        // key, which the gateway answers from the moment it announced it.
        "SELECT g.id, g.endpoints, COALESCE(g.next_public_key, g.public_key) AS public_key, \
         g.technician_prefixes, g.tls, s.credential_hash \
         FROM tunnels t JOIN gateways g ON g.id = t.gateway_id JOIN sites s ON s.id = t.site_id \
         WHERE t.site_id = $1 AND t.ready_version >= 0 AND t.ready_version <= g.applied_version",
    )
    .bind(id64(site.0))
    .fetch_optional(&mut *conn)
    .await?;
    let tunnel = match tunnel {
        Some(r) => {
            let endpoints: Vec<std::net::SocketAddr> =
                serde_json::from_str(&col::<String>(&r, "endpoints")?).map_err(decode_err)?;
            let key: Option<String> = col(&r, "public_key")?;
            match (
                endpoints.first(),
                key.and_then(|k| k.parse::<PublicKey>().ok()),
            ) {
                (Some(ep), Some(key)) => {
                    let (endpoint, ipsec) = match kind {
                        TunnelKind::Wireguard => (*ep, None),
                        TunnelKind::Ipsec => {
                            let center: Vec<Prefix> =
                                serde_json::from_str(&col::<String>(&r, "technician_prefixes")?)
                                    .map_err(decode_err)?;
                            let nat: Vec<Ipv4Addr> =
                                mappings.iter().map(|m| m.nat_address).collect();
                            (
                                SocketAddr::new(ep.ip(), IKE_PORT),
                                psk.clone().map(|psk| {
                                    IpsecParams::for_site(site, psk, host_prefixes(&nat), center)
                                }),
                            )
                        }
                    };
                    Some(AgentTunnel {
                        gateway_id: GatewayId(u64_of(col(&r, "id")?)),
                        kind,
                        endpoint,
                        public_key: key,
                        persistent_keepalive_s: keepalive_s,
                        ipsec,
                        tls: agent_tls(
                            col(&r, "tls")?,
                            col::<Option<String>>(&r, "credential_hash")?.as_deref(),
                        ),
                    })
                }
                _ => None,
            }
        }
        None => None,
    };
    let rotation = super::rotation::agent_rotation(conn, site).await?;
    Ok(AgentDesiredState {
        version,
        site_id: site,
        tunnel,
        mappings,
        problem,
        rotation,
    })
}

/// One /32 traffic selector per address (RFC 7296 §2.9).
pub fn host_prefixes(addresses: &[Ipv4Addr]) -> Vec<Prefix> {
    addresses
        .iter()
        .filter_map(|a| Prefix::new(*a, 32).ok())
        .collect()
}

/// The gateway's desired state, or `NotFound`.
///
/// # Errors
/// Database failures.
pub async fn gateway_state(
    conn: &mut AnyConnection,
    gw: GatewayId,
) -> DbResult<GatewayDesiredState> {
    let row = sqlx::query(
        "SELECT version, technician_prefixes, rotate_key, next_public_key FROM gateways \
         WHERE id = $1",
    )
    .bind(id64(gw.0))
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(DbError::NotFound)?;
    let version: i64 = col(&row, "version")?;
    let requested = col::<i64>(&row, "rotate_key")? != 0;
    let published: Option<PublicKey> = col::<Option<String>>(&row, "next_public_key")?
        .map(|k| k.parse())
        .transpose()
        .map_err(decode_err)?;
    let key_rotation = (requested || published.is_some()).then_some(GatewayKeyRotation {
        requested,
        published,
    });
    let center: Vec<Prefix> =
        serde_json::from_str(&col::<String>(&row, "technician_prefixes")?).map_err(decode_err)?;
    let rows = sqlx::query(
        "SELECT s.id, s.public_key, s.tunnel, s.ipsec_psk, s.credential_hash, n.address \
         FROM tunnels t JOIN sites s ON s.id = t.site_id \
         LEFT JOIN nat_addresses n ON n.site_id = s.id \
         WHERE t.gateway_id = $1 AND s.public_key IS NOT NULL ORDER BY s.id, n.address",
    )
    .bind(id64(gw.0))
    .fetch_all(&mut *conn)
    .await?;
    let mut peers: Vec<GatewayPeer> = Vec::new();
    for r in rows {
        let site = SiteId(u64_of(col(&r, "id")?));
        let addr: Option<i64> = col(&r, "address")?;
        if peers.last().is_none_or(|p| p.site_id != site) {
            let key: String = col(&r, "public_key")?;
            let kind: TunnelKind = enum_parse(&col::<String>(&r, "tunnel")?)?;
            let psk: Option<String> = col(&r, "ipsec_psk")?;
            peers.push(GatewayPeer {
                site_id: site,
                public_key: key.parse().map_err(decode_err)?,
                nat_addresses: Vec::new(),
                tunnel: kind,
                ipsec: psk.filter(|_| kind == TunnelKind::Ipsec).map(|psk| {
                    IpsecParams::for_site(site, psk, Vec::new(), center.clone()).mirrored()
                }),
                tls_token_sha256: col::<Option<String>>(&r, "credential_hash")?
                    .map(|h| sha256_hex(tls_token(&h).as_bytes())),
            });
        }
        if let (Some(a), Some(p)) = (addr, peers.last_mut()) {
            p.nat_addresses.push(addr_of(a));
        }
    }
    for p in &mut peers {
        if let Some(ipsec) = p.ipsec.as_mut() {
            ipsec.remote_ts = host_prefixes(&p.nat_addresses);
        }
    }
    let next_keys = super::rotation::gateway_next_keys(conn, gw).await?;
    Ok(GatewayDesiredState {
        version: u64_of(version),
        gateway_id: gw,
        allowed_sources: super::teams::allowed_sources(conn, gw).await?,
        key_rotation,
        peers,
        next_keys,
    })
}

/// Which requests to list.
#[derive(Debug, Clone, Default)]
pub struct RequestFilter {
    /// Only this state.
    pub state: Option<RequestState>,
    /// Only this site.
    pub site: Option<SiteId>,
    /// Only this request.
    pub id: Option<RequestId>,
    /// Only open (waiting, in progress) requests, or only closed ones.
    pub open: Option<bool>,
    /// Only requests with a smaller id (paging, newest first).
    pub before: Option<RequestId>,
    /// At most this many (newest first).
    pub limit: Option<u32>,
    /// Only requests of sites visible to a technician (`None`: all).
    pub scope: Option<TeamScope>,
}

/// Requests, newest first.
///
/// # Errors
/// Database failures.
pub async fn requests(
    conn: &mut AnyConnection,
    filter: &RequestFilter,
) -> DbResult<Vec<MaintenanceRequestView>> {
    let mut sql = String::from(
        "SELECT r.id, r.site_id, s.name AS site_name, r.global_address, r.requester_name, r.level, \
         r.urgency, r.phone, r.content, r.state, t.gateway_id, r.received_at, r.started_at, \
         r.ended_at, r.expires_at, s.tunnel, t.transport, r.started_by, r.expiry_warned_at \
         FROM requests r JOIN sites s ON s.id = r.site_id \
         LEFT JOIN tunnels t ON t.site_id = r.site_id WHERE 1 = 1",
    );
    let mut n = 0;
    let mut next = || {
        n += 1;
        n
    };
    if filter.state.is_some() {
        sql.push_str(&format!(" AND r.state = ${}", next()));
    }
    if filter.site.is_some() {
        sql.push_str(&format!(" AND r.site_id = ${}", next()));
    }
    if filter.id.is_some() {
        sql.push_str(&format!(" AND r.id = ${}", next()));
    }
    if filter.scope.is_some() {
        sql.push_str(&format!(" AND {}", TeamScope::sites_sql("s", next())));
    }
    match filter.open {
        Some(true) => sql.push_str(" AND r.state IN ('waiting', 'in_progress')"),
        Some(false) => sql.push_str(" AND r.state NOT IN ('waiting', 'in_progress')"),
        None => {}
    }
    if filter.before.is_some() {
        sql.push_str(&format!(" AND r.id < ${}", next()));
    }
    sql.push_str(" ORDER BY r.id DESC");
    if filter.limit.is_some() {
        sql.push_str(&format!(" LIMIT ${}", next()));
    }
    let mut q = sqlx::query(&sql);
    if let Some(s) = filter.state {
        q = q.bind(enum_str(&s));
    }
    if let Some(s) = filter.site {
        q = q.bind(id64(s.0));
    }
    if let Some(id) = filter.id {
        q = q.bind(id64(id.0));
    }
    if let Some(scope) = filter.scope {
        q = q.bind(scope.bind());
    }
    if let Some(b) = filter.before {
        q = q.bind(id64(b.0));
    }
    if let Some(l) = filter.limit {
        q = q.bind(i64::from(l));
    }
    let rows = q.fetch_all(&mut *conn).await?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = rows
        .iter()
        .map(|r| col::<i64>(r, "id"))
        .collect::<DbResult<_>>()?;
    let mut terminals: BTreeMap<i64, Vec<TerminalAssignment>> = BTreeMap::new();
    for chunk in ids.chunks(500) {
        let placeholders: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT request_id, terminal, nat_address FROM request_terminals \
             WHERE request_id IN ({}) ORDER BY request_id, position",
            placeholders.join(", ")
        );
        let mut q = sqlx::query(&sql);
        for id in chunk {
            q = q.bind(*id);
        }
        for r in q.fetch_all(&mut *conn).await? {
            let nat: Option<i64> = col(&r, "nat_address")?;
            terminals
                .entry(col(&r, "request_id")?)
                .or_default()
                .push(TerminalAssignment {
                    name: TerminalName::new(col::<String>(&r, "terminal")?).map_err(decode_err)?,
                    nat_address: nat.map(addr_of),
                });
        }
    }
    rows.iter()
        .map(|r| request_from_row(r, &mut terminals))
        .collect()
}

fn request_from_row(
    r: &AnyRow,
    terminals: &mut BTreeMap<i64, Vec<TerminalAssignment>>,
) -> DbResult<MaintenanceRequestView> {
    let id: i64 = col(r, "id")?;
    let received: i64 = col(r, "received_at")?;
    let state: RequestState = enum_parse(&col::<String>(r, "state")?)?;
    let global: Option<String> = col(r, "global_address")?;
    let gw: Option<i64> = col(r, "gateway_id")?;
    Ok(MaintenanceRequestView {
        id: RequestId(u64_of(id)),
        acceptance_number: acceptance_number(RequestId(u64_of(id)), received),
        site_id: SiteId(u64_of(col(r, "site_id")?)),
        site_name: col(r, "site_name")?,
        global_address: global.and_then(|g| g.parse::<IpAddr>().ok()),
        requester_name: col(r, "requester_name")?,
        level: enum_parse(&col::<String>(r, "level")?)?,
        urgency: enum_parse(&col::<String>(r, "urgency")?)?,
        phone: col(r, "phone")?,
        content: col(r, "content")?,
        terminals: terminals.remove(&id).unwrap_or_default(),
        state,
        gateway_id: gw.filter(|_| state.is_open()).map(|g| GatewayId(u64_of(g))),
        received_at: ms(received),
        started_at: opt_ms(col(r, "started_at")?),
        ended_at: opt_ms(col(r, "ended_at")?),
        expires_at: ms(col(r, "expires_at")?),
        tunnel: enum_parse(&col::<String>(r, "tunnel")?)?,
        transport: col::<Option<String>>(r, "transport")?
            .filter(|_| state.is_open())
            .and_then(|t| enum_parse::<Transport>(&t).ok()),
        technician: col(r, "started_by")?,
        expiry_warned_at: opt_ms(col(r, "expiry_warned_at")?),
    })
}

/// One request.
///
/// # Errors
/// `NotFound` or database failures.
pub async fn request(conn: &mut AnyConnection, id: RequestId) -> DbResult<MaintenanceRequestView> {
    requests(
        conn,
        &RequestFilter {
            id: Some(id),
            ..RequestFilter::default()
        },
    )
    .await?
    .into_iter()
    .next()
    .ok_or(DbError::NotFound)
}

/// All sites.
///
/// # Errors
/// Database failures.
pub async fn sites(conn: &mut AnyConnection) -> DbResult<Vec<SiteView>> {
    let rows = sqlx::query(
        "SELECT s.id, s.name, s.public_key, s.created_at, s.tunnel, s.agentless, t.gateway_id, t.transport \
         FROM sites s \
         LEFT JOIN tunnels t ON t.site_id = s.id ORDER BY s.id",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut addrs: BTreeMap<i64, Vec<Ipv4Addr>> = BTreeMap::new();
    for r in sqlx::query(
        "SELECT site_id, address FROM nat_addresses WHERE site_id IS NOT NULL ORDER BY address",
    )
    .fetch_all(&mut *conn)
    .await?
    {
        addrs
            .entry(col(&r, "site_id")?)
            .or_default()
            .push(addr_of(col(&r, "address")?));
    }
    rows.iter()
        .map(|r| {
            let id: i64 = col(r, "id")?;
            let key: Option<String> = col(r, "public_key")?;
            let gw: Option<i64> = col(r, "gateway_id")?;
            let agent = col::<i64>(r, "agentless")? == 0;
            Ok(SiteView {
                site_id: SiteId(u64_of(id)),
                name: col(r, "name")?,
                enrolled: agent && key.is_some(),
                gateway_id: gw.map(|g| GatewayId(u64_of(g))),
                nat_addresses: addrs.remove(&id).unwrap_or_default(),
                created_at: ms(col(r, "created_at")?),
                tunnel: enum_parse(&col::<String>(r, "tunnel")?)?,
                transport: col::<Option<String>>(r, "transport")?
                    .and_then(|t| enum_parse::<Transport>(&t).ok()),
                agent,
            })
        })
        .collect()
}

/// What a hand-configured router needs for IPsec site `site` (`None` for a
/// WireGuard site), or `NotFound`.
///
/// # Errors
/// Database failures.
pub async fn ipsec_config(
    conn: &mut AnyConnection,
    site: SiteId,
) -> DbResult<Option<IpsecSiteConfig>> {
    let row = sqlx::query("SELECT name, tunnel, ipsec_psk FROM sites WHERE id = $1")
        .bind(id64(site.0))
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(DbError::NotFound)?;
    let kind: TunnelKind = enum_parse(&col::<String>(&row, "tunnel")?)?;
    let (TunnelKind::Ipsec, Some(psk)) = (kind, col::<Option<String>>(&row, "ipsec_psk")?) else {
        return Ok(None);
    };
    let name: String = col(&row, "name")?;
    let current: Option<i64> = sqlx::query("SELECT gateway_id FROM tunnels WHERE site_id = $1")
        .bind(id64(site.0))
        .fetch_optional(&mut *conn)
        .await?
        .map(|r| col(&r, "gateway_id"))
        .transpose()?;
    // The carrying gateway first, then every other one registered with IPsec.
    let rows = sqlx::query(
        "SELECT id, endpoints, technician_prefixes FROM gateways \
         WHERE id = $1 OR (tunnel_kinds LIKE $2 AND disabled = 0 AND public_key IS NOT NULL) \
         ORDER BY CASE WHEN id = $1 THEN 0 ELSE 1 END, id",
    )
    .bind(current.unwrap_or(0))
    .bind(format!("%\"{}\"%", TunnelKind::Ipsec))
    .fetch_all(&mut *conn)
    .await?;
    let mut gateway_addresses: Vec<IpAddr> = Vec::new();
    let mut center: Option<Vec<Prefix>> = None;
    for r in &rows {
        let endpoints: Vec<SocketAddr> =
            serde_json::from_str(&col::<String>(r, "endpoints")?).map_err(decode_err)?;
        if let Some(ep) = endpoints.first()
            && !gateway_addresses.contains(&ep.ip())
        {
            gateway_addresses.push(ep.ip());
        }
        if center.is_none() {
            let prefixes: Vec<Prefix> =
                serde_json::from_str(&col::<String>(r, "technician_prefixes")?)
                    .map_err(decode_err)?;
            center = Some(prefixes).filter(|p| !p.is_empty());
        }
    }
    let nat: Vec<Ipv4Addr> =
        sqlx::query("SELECT address FROM nat_addresses WHERE site_id = $1 ORDER BY address")
            .bind(id64(site.0))
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|r| col(r, "address").map(addr_of))
            .collect::<DbResult<_>>()?;
    let ipsec = IpsecParams::for_site(site, psk, host_prefixes(&nat), center.unwrap_or_default());
    let swanctl_conf = crate::swanctl::swanctl_conf(site, &name, &gateway_addresses, &ipsec);
    Ok(Some(IpsecSiteConfig {
        site_id: site,
        name,
        gateway_id: current.map(|g| GatewayId(u64_of(g))),
        gateway_addresses,
        ipsec,
        swanctl_conf,
    }))
}

/// All gateways (or one).
///
/// # Errors
/// Database failures.
pub async fn gateways(
    conn: &mut AnyConnection,
    only: Option<GatewayId>,
) -> DbResult<Vec<GatewayView>> {
    let sql = "SELECT id, name, endpoints, public_key, tunnel_kinds, max_tunnels, tunnels, health, \
               drain, last_heartbeat, tls, next_public_key FROM gateways \
               WHERE ($1 = 0 OR id = $1) ORDER BY id";
    let rows = sqlx::query(sql)
        .bind(only.map_or(0, |g| id64(g.0)))
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|r| {
            let key: Option<String> = col(r, "public_key")?;
            Ok(GatewayView {
                gateway_id: GatewayId(u64_of(col(r, "id")?)),
                name: col(r, "name")?,
                endpoints: serde_json::from_str(&col::<String>(r, "endpoints")?)
                    .map_err(decode_err)?,
                public_key: key.and_then(|k| k.parse().ok()),
                tunnel_kinds: serde_json::from_str(&col::<String>(r, "tunnel_kinds")?)
                    .map_err(decode_err)?,
                max_tunnels: u32::try_from(col::<i64>(r, "max_tunnels")?).unwrap_or(0),
                tunnels: u32::try_from(col::<i64>(r, "tunnels")?).unwrap_or(0),
                health: enum_parse(&col::<String>(r, "health")?)?,
                drain: col::<i64>(r, "drain")? != 0,
                last_heartbeat: opt_ms(col(r, "last_heartbeat")?),
                tls: col::<Option<String>>(r, "tls")?.and_then(|t| serde_json::from_str(&t).ok()),
                next_public_key: col::<Option<String>>(r, "next_public_key")?
                    .and_then(|k| k.parse().ok()),
            })
        })
        .collect()
}

/// Failure reports, newest first.
///
/// # Errors
/// Database failures.
pub async fn failures(conn: &mut AnyConnection, limit: u32) -> DbResult<Vec<FailureView>> {
    failure_rows(conn, None, limit, None).await
}

/// Failure reports of the sites visible in `scope`, newest first.
///
/// # Errors
/// Database failures.
pub async fn failures_in(
    conn: &mut AnyConnection,
    limit: u32,
    scope: TeamScope,
) -> DbResult<Vec<FailureView>> {
    failure_rows(conn, None, limit, Some(scope)).await
}

/// One failure report.
///
/// # Errors
/// `NotFound` or database failures.
pub async fn failure(conn: &mut AnyConnection, id: u64) -> DbResult<FailureView> {
    failure_rows(conn, Some(id), 1, None)
        .await?
        .into_iter()
        .next()
        .ok_or(DbError::NotFound)
}

async fn failure_rows(
    conn: &mut AnyConnection,
    id: Option<u64>,
    limit: u32,
    scope: Option<TeamScope>,
) -> DbResult<Vec<FailureView>> {
    let mut cond = String::new();
    let mut n = 1;
    if id.is_some() {
        n += 1;
        cond.push_str(&format!(" AND f.id = ${n}"));
    }
    if scope.is_some() {
        n += 1;
        cond.push_str(&format!(" AND {}", TeamScope::sites_sql("s", n)));
    }
    let sql = format!(
        "SELECT f.id, f.site_id, s.name AS site_name, f.code, f.detail, f.terminal, f.received_at, \
         f.request_id, f.acknowledged_at, f.acknowledged_by \
         FROM failures f JOIN sites s ON s.id = f.site_id WHERE 1 = 1{cond} \
         ORDER BY f.id DESC LIMIT $1"
    );
    let mut q = sqlx::query(&sql).bind(i64::from(limit));
    if let Some(id) = id {
        q = q.bind(id64(id));
    }
    if let Some(scope) = scope {
        q = q.bind(scope.bind());
    }
    let rows = q.fetch_all(&mut *conn).await?;
    rows.iter()
        .map(|r| {
            let terminal: Option<String> = col(r, "terminal")?;
            let req: Option<i64> = col(r, "request_id")?;
            Ok(FailureView {
                id: u64_of(col(r, "id")?),
                site_id: SiteId(u64_of(col(r, "site_id")?)),
                site_name: col(r, "site_name")?,
                code: enum_parse(&col::<String>(r, "code")?)?,
                detail: col(r, "detail")?,
                terminal: terminal.and_then(|t| TerminalName::new(t).ok()),
                received_at: ms(col(r, "received_at")?),
                request_id: req.map(|q| RequestId(u64_of(q))),
                acknowledged_at: opt_ms(col(r, "acknowledged_at")?),
                acknowledged_by: col(r, "acknowledged_by")?,
            })
        })
        .collect()
}

/// Which audit entries to list.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only entries with a smaller id (paging, newest first).
    pub before: Option<u64>,
    /// At most this many.
    pub limit: u32,
    /// Only this actor, e.g. `technician:alice`.
    pub actor: Option<String>,
    /// Only this object, e.g. `request:17`.
    pub object: Option<String>,
    /// Only actions of this kind: the action itself or its prefix before
    /// the dot (`request` matches `request.start`).
    pub kind: Option<String>,
    /// Only entries about this site: by it, on it, or on one of its requests.
    pub site: Option<SiteId>,
    /// Only entries at or after this time (ms since the epoch).
    pub since: Option<i64>,
    /// Only entries before this time (ms since the epoch).
    pub until: Option<i64>,
    /// Without the entries about sites outside this technician's view (by
    /// or on such a site, or on one of its requests or failure reports), and
    /// about other teams and their technicians.
    pub scope: Option<TeamScope>,
}

/// Audit entries matching `filter`, newest first, with their actors and
/// objects named ([`AuditEntry::actor_label`], [`AuditEntry::object_label`]).
///
/// # Errors
/// Database failures.
pub async fn audit(conn: &mut AnyConnection, filter: &AuditFilter) -> DbResult<Vec<AuditEntry>> {
    let mut sql =
        String::from("SELECT id, at, actor, action, object, detail FROM audit_log WHERE id < $1");
    let mut n = 1;
    let mut next = || {
        n += 1;
        n
    };
    if filter.actor.is_some() {
        sql.push_str(&format!(" AND actor = ${}", next()));
    }
    if filter.object.is_some() {
        sql.push_str(&format!(" AND object = ${}", next()));
    }
    if filter.kind.is_some() {
        let (a, b) = (next(), next());
        sql.push_str(&format!(" AND (action = ${a} OR action LIKE ${b})"));
    }
    if filter.site.is_some() {
        let (a, b) = (next(), next());
        sql.push_str(&format!(
            " AND (actor = ${a} OR object = ${a} OR object IN \
             (SELECT 'request:' || CAST(id AS TEXT) FROM requests WHERE site_id = ${b}))"
        ));
    }
    if filter.since.is_some() {
        sql.push_str(&format!(" AND at >= ${}", next()));
    }
    if filter.until.is_some() {
        sql.push_str(&format!(" AND at < ${}", next()));
    }
    if filter.scope.is_some() {
        // Uncorrelated subqueries: evaluated once per query, not per row.
        let t = next();
        let hidden = format!("s.team_id IS NOT NULL AND s.team_id <> ${t}");
        sql.push_str(&format!(
            " AND actor NOT IN (SELECT 'site:' || CAST(s.id AS TEXT) FROM sites s WHERE {hidden}) \
             AND object NOT IN (SELECT 'site:' || CAST(s.id AS TEXT) FROM sites s WHERE {hidden} \
             UNION ALL SELECT 'request:' || CAST(r.id AS TEXT) FROM requests r \
             JOIN sites s ON s.id = r.site_id WHERE {hidden} \
             UNION ALL SELECT 'failure:' || CAST(f.id AS TEXT) FROM failures f \
             JOIN sites s ON s.id = f.site_id WHERE {hidden} \
             UNION ALL SELECT 'team:' || CAST(s.id AS TEXT) FROM teams s WHERE s.id <> ${t} \
             UNION ALL SELECT 'technician:' || s.name FROM technicians s WHERE {hidden}) \
             AND actor NOT IN (SELECT 'technician:' || s.name FROM technicians s WHERE {hidden})"
        ));
    }
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", next()));
    let mut q = sqlx::query(&sql).bind(filter.before.map_or(i64::MAX, id64));
    if let Some(a) = &filter.actor {
        q = q.bind(a.clone());
    }
    if let Some(o) = &filter.object {
        q = q.bind(o.clone());
    }
    if let Some(k) = &filter.kind {
        // The kind is a word of letters and underscores (checked by the
        // handler), so it holds no LIKE wildcard of its own but `_`,
        // which matches itself too.
        q = q.bind(k.clone()).bind(format!("{k}.%"));
    }
    if let Some(site) = filter.site {
        q = q.bind(format!("site:{site}")).bind(id64(site.0));
    }
    if let Some(t) = filter.since {
        q = q.bind(t);
    }
    if let Some(t) = filter.until {
        q = q.bind(t);
    }
    if let Some(scope) = filter.scope {
        q = q.bind(scope.bind());
    }
    let rows = q
        .bind(i64::from(filter.limit))
        .fetch_all(&mut *conn)
        .await?;
    let mut entries = rows
        .iter()
        .map(|r| {
            Ok(AuditEntry {
                id: u64_of(col(r, "id")?),
                at: ms(col(r, "at")?),
                actor: col(r, "actor")?,
                action: col(r, "action")?,
                object: col(r, "object")?,
                detail: col(r, "detail")?,
                actor_label: None,
                object_label: None,
            })
        })
        .collect::<DbResult<Vec<_>>>()?;
    let labels = audit_labels(conn, &entries).await?;
    for e in &mut entries {
        e.actor_label = labels.get(&e.actor).cloned();
        e.object_label = labels.get(&e.object).cloned();
    }
    Ok(entries)
}

/// `kind:id` → words, for the sites, gateways and requests that `entries`
/// name and that still exist.
async fn audit_labels(
    conn: &mut AnyConnection,
    entries: &[AuditEntry],
) -> DbResult<BTreeMap<String, String>> {
    let mut ids: BTreeMap<&str, std::collections::BTreeSet<i64>> = BTreeMap::new();
    for e in entries {
        for who in [&e.actor, &e.object] {
            if let Some((kind, id)) = who.split_once(':')
                && matches!(kind, "site" | "gateway" | "request")
                && let Ok(id) = id.parse::<i64>()
            {
                ids.entry(kind).or_default().insert(id);
            }
        }
    }
    let mut labels = BTreeMap::new();
    for (kind, set) in ids {
        let list: Vec<i64> = set.into_iter().collect();
        for chunk in list.chunks(500) {
            let placeholders: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = match kind {
                "site" => format!(
                    "SELECT id, name, 0 AS received_at FROM sites WHERE id IN ({})",
                    placeholders.join(", ")
                ),
                "gateway" => format!(
                    "SELECT id, name, 0 AS received_at FROM gateways WHERE id IN ({})",
                    placeholders.join(", ")
                ),
                _ => format!(
                    "SELECT r.id, s.name, r.received_at FROM requests r JOIN sites s ON s.id = r.site_id \
                     WHERE r.id IN ({})",
                    placeholders.join(", ")
                ),
            };
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(*id);
            }
            for r in q.fetch_all(&mut *conn).await? {
                let id: i64 = col(&r, "id")?;
                let name: String = col(&r, "name")?;
                let label = if kind == "request" {
                    let number = acceptance_number(RequestId(u64_of(id)), col(&r, "received_at")?);
                    format!("{number} ({name})")
                } else {
                    name
                };
                labels.insert(format!("{kind}:{id}"), label);
            }
        }
    }
    Ok(labels)
}

/// The console feed's version.
///
/// # Errors
/// Database failures.
pub async fn console_version(conn: &mut AnyConnection) -> DbResult<u64> {
    let r = sqlx::query("SELECT value FROM counters WHERE name = 'console'")
        .fetch_one(&mut *conn)
        .await?;
    Ok(u64_of(col(&r, "value")?))
}

/// Held and total addresses of the NAT-address pool.
///
/// # Errors
/// Database failures.
pub async fn pool_usage(conn: &mut AnyConnection) -> DbResult<(i64, i64)> {
    let r = sqlx::query("SELECT COUNT(*) AS total, COUNT(site_id) AS used FROM nat_addresses")
        .fetch_one(&mut *conn)
        .await?;
    Ok((col(&r, "used")?, col(&r, "total")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acceptance_numbers_carry_the_utc_date() {
        // 2023-11-14T22:13:20Z
        assert_eq!(
            acceptance_number(RequestId(17), 1_700_000_000_000),
            "20231114-000017"
        );
        assert_eq!(acceptance_number(RequestId(1), 0), "19700101-000001");
        // 2024-02-29 (leap day) 12:00
        assert_eq!(
            acceptance_number(RequestId(1_234_567), 1_709_208_000_000),
            "20240229-1234567"
        );
    }

    #[test]
    fn enums_use_their_wire_names() {
        assert_eq!(enum_str(&RequestState::InProgress), "in_progress");
        assert_eq!(
            enum_parse::<RequestState>("in_progress").ok(),
            Some(RequestState::InProgress)
        );
        assert!(enum_parse::<RequestState>("bogus").is_err());
    }
}
