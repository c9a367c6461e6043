//! Teams of technicians (docs/OPERATIONS.md "Teams"): which sites a
//! technician sees and acts on ([`TeamScope`]), the operator's changes to
//! teams and assignments, and the per-NAT-address sources the gateways let
//! through ([`allowed_sources`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use sqlx::AnyConnection;
use vpnnat::ipv4::Prefix;
use vpnnat::messages::{AllowedSources, GatewayId, RequestId, SiteId, TeamView, UnixMillis};

use super::error::{OpError, OpResult};
use super::tunnels::site_gateway;
use super::views::{addr_of, decode_err};
use super::{DbResult, Tx, col, id64, u64_of};

/// The sites a technician sees: those of its team and those without a team.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TeamScope {
    /// The technician's team (`None`: it sees only sites without a team).
    pub team: Option<i64>,
}

impl TeamScope {
    /// What to bind for [`Self::sites_sql`]: the team's id, or -1 (no
    /// team has it) for a technician without a team.
    pub fn bind(self) -> i64 {
        self.team.unwrap_or(-1)
    }

    /// The condition "site `alias` is visible", with the team bound as `$n`.
    pub fn sites_sql(alias: &str, n: usize) -> String {
        format!("({alias}.team_id IS NULL OR {alias}.team_id = ${n})")
    }
}

fn prefixes_json(p: &[Prefix]) -> String {
    serde_json::to_string(p).unwrap_or_else(|_| "[]".to_owned())
}

fn prefixes_of(json: &str) -> DbResult<Vec<Prefix>> {
    serde_json::from_str(json).map_err(decode_err)
}

fn prefixes_text(p: &[Prefix]) -> String {
    p.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Creates a team; returns its id.
///
/// # Errors
/// `Conflict` on a taken name.
pub async fn create_team(
    tx: &mut Tx,
    name: &str,
    sources: &[Prefix],
    actor: &str,
    now: i64,
) -> OpResult<u64> {
    tx.name_free("SELECT id FROM teams WHERE name = $1", name, "team")
        .await?;
    let row = sqlx::query(
        "INSERT INTO teams (name, source_prefixes, created_at) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(name)
    .bind(prefixes_json(sources))
    .bind(now)
    .fetch_one(&mut *tx.inner)
    .await?;
    let id = u64_of(col(&row, "id")?);
    tx.audit(
        now,
        actor,
        "team.create",
        &format!("team:{id}"),
        &format!("{name} sources={}", prefixes_text(sources)),
    )
    .await?;
    Ok(id)
}

async fn team_exists(tx: &mut Tx, team: u64) -> OpResult<()> {
    sqlx::query("SELECT id FROM teams WHERE id = $1")
        .bind(id64(team))
        .fetch_optional(&mut *tx.inner)
        .await?
        .map(|_| ())
        .ok_or(OpError::NotFound("team"))
}

/// Deletes a team; its technicians are left without one.
///
/// # Errors
/// `NotFound`; `Conflict` while sites are assigned to it (deleting it would
/// show them to every technician).
pub async fn delete_team(tx: &mut Tx, team: u64, actor: &str, now: i64) -> OpResult<()> {
    team_exists(tx, team).await?;
    let sites: i64 = col(
        &sqlx::query("SELECT COUNT(*) AS n FROM sites WHERE team_id = $1")
            .bind(id64(team))
            .fetch_one(&mut *tx.inner)
            .await?,
        "n",
    )?;
    if sites > 0 {
        return Err(OpError::Conflict {
            field: "id",
            message: format!(
                "{sites} site(s) belong to this team; assign them elsewhere (or to none) first"
            ),
        });
    }
    sqlx::query("UPDATE technicians SET team_id = NULL WHERE team_id = $1")
        .bind(id64(team))
        .execute(&mut *tx.inner)
        .await?;
    sqlx::query("DELETE FROM teams WHERE id = $1")
        .bind(id64(team))
        .execute(&mut *tx.inner)
        .await?;
    tx.touch_console();
    tx.audit(now, actor, "team.delete", &format!("team:{team}"), "")
        .await?;
    Ok(())
}

/// Assigns a site to a team (or to none). Its gateway gets the new source
/// restrictions; the consoles show or hide the site's requests.
///
/// # Errors
/// `NotFound` (`"site"` or `"team"`).
pub async fn set_site_team(
    tx: &mut Tx,
    site: SiteId,
    team: Option<u64>,
    actor: &str,
    now: i64,
) -> OpResult<()> {
    tx.lock_site(site).await.map_err(|e| match e {
        super::DbError::NotFound => OpError::NotFound("site"),
        e => e.into(),
    })?;
    if let Some(t) = team {
        team_exists(tx, t).await?;
    }
    sqlx::query("UPDATE sites SET team_id = $1 WHERE id = $2")
        .bind(team.map(id64))
        .bind(id64(site.0))
        .execute(&mut *tx.inner)
        .await?;
    if let Some(gw) = site_gateway(tx, site).await? {
        tx.bump_gateway(gw).await?;
    }
    tx.touch_console();
    tx.audit(
        now,
        actor,
        "site.team",
        &format!("site:{site}"),
        &team.map_or_else(|| "none".to_owned(), |t| format!("team:{t}")),
    )
    .await?;
    Ok(())
}

/// Sets a technician's team (or none) and its own source prefixes (`None`:
/// the team's). The gateways carrying requests it started get the new
/// sources.
///
/// # Errors
/// `NotFound` (`"technician"` or `"team"`).
pub async fn set_technician_team(
    tx: &mut Tx,
    name: &str,
    team: Option<u64>,
    sources: Option<&[Prefix]>,
    actor: &str,
    now: i64,
) -> OpResult<()> {
    if let Some(t) = team {
        team_exists(tx, t).await?;
    }
    let r =
        sqlx::query("UPDATE technicians SET team_id = $1, source_prefixes = $2 WHERE name = $3")
            .bind(team.map(id64))
            .bind(sources.map(prefixes_json))
            .bind(name)
            .execute(&mut *tx.inner)
            .await?;
    if r.rows_affected() == 0 {
        return Err(OpError::NotFound("technician"));
    }
    let gws = sqlx::query(
        "SELECT DISTINCT t.gateway_id FROM requests r JOIN tunnels t ON t.site_id = r.site_id \
         WHERE r.state = 'in_progress' AND r.started_by = $1 ORDER BY t.gateway_id",
    )
    .bind(name)
    .fetch_all(&mut *tx.inner)
    .await?;
    for g in gws {
        tx.bump_gateway(GatewayId(u64_of(col(&g, "gateway_id")?)))
            .await?;
    }
    tx.touch_console();
    tx.audit(
        now,
        actor,
        "technician.team",
        &format!("technician:{name}"),
        &format!(
            "{} sources={}",
            team.map_or_else(|| "none".to_owned(), |t| format!("team:{t}")),
            sources.map_or_else(|| "team".to_owned(), prefixes_text)
        ),
    )
    .await?;
    Ok(())
}

/// `NotFound("request")` unless request `id` exists and is visible in `scope`.
///
/// # Errors
/// `NotFound`.
pub async fn check_request(tx: &mut Tx, id: RequestId, scope: TeamScope) -> OpResult<()> {
    let sql = format!(
        "SELECT r.id FROM requests r JOIN sites s ON s.id = r.site_id WHERE r.id = $1 AND {}",
        TeamScope::sites_sql("s", 2)
    );
    sqlx::query(&sql)
        .bind(id64(id.0))
        .bind(scope.bind())
        .fetch_optional(&mut *tx.inner)
        .await?
        .map(|_| ())
        .ok_or(OpError::NotFound("request"))
}

/// Whether site `site` exists and is visible in `scope` (for handlers that
/// take a site id from a technician: answer 404 when not).
///
/// # Errors
/// Database failures.
pub async fn site_visible(
    conn: &mut AnyConnection,
    site: SiteId,
    scope: TeamScope,
) -> DbResult<bool> {
    let sql = format!(
        "SELECT s.id FROM sites s WHERE s.id = $1 AND {}",
        TeamScope::sites_sql("s", 2)
    );
    Ok(sqlx::query(&sql)
        .bind(id64(site.0))
        .bind(scope.bind())
        .fetch_optional(&mut *conn)
        .await?
        .is_some())
}

/// `NotFound("failure")` unless failure report `id` exists and is visible in `scope`.
///
/// # Errors
/// `NotFound`.
pub async fn check_failure(tx: &mut Tx, id: u64, scope: TeamScope) -> OpResult<()> {
    let sql = format!(
        "SELECT f.id FROM failures f JOIN sites s ON s.id = f.site_id WHERE f.id = $1 AND {}",
        TeamScope::sites_sql("s", 2)
    );
    sqlx::query(&sql)
        .bind(id64(id))
        .bind(scope.bind())
        .fetch_optional(&mut *tx.inner)
        .await?
        .map(|_| ())
        .ok_or(OpError::NotFound("failure"))
}

/// Starts a request visible in `scope`. A team's site's gateway gets the
/// starter's sources for its NAT addresses.
///
/// # Errors
/// As [`super::ops::start_request`]; `NotFound` outside `scope`.
pub async fn start_request(
    tx: &mut Tx,
    id: RequestId,
    scope: TeamScope,
    technician: &str,
    actor: &str,
    now: i64,
) -> OpResult<()> {
    check_request(tx, id, scope).await?;
    super::ops::start_request(tx, id, technician, actor, now).await?;
    let row = sqlx::query(
        "SELECT r.site_id FROM requests r JOIN sites s ON s.id = r.site_id \
         WHERE r.id = $1 AND s.team_id IS NOT NULL",
    )
    .bind(id64(id.0))
    .fetch_optional(&mut *tx.inner)
    .await?;
    if let Some(row) = row {
        let site = SiteId(u64_of(col(&row, "site_id")?));
        if let Some(gw) = site_gateway(tx, site).await? {
            tx.bump_gateway(gw).await?;
        }
    }
    Ok(())
}

/// Every team, by id.
///
/// # Errors
/// Database failures.
pub async fn teams(conn: &mut AnyConnection) -> DbResult<Vec<TeamView>> {
    let rows = sqlx::query("SELECT id, name, source_prefixes, created_at FROM teams ORDER BY id")
        .fetch_all(&mut *conn)
        .await?;
    let mut sites: BTreeMap<i64, Vec<SiteId>> = BTreeMap::new();
    for r in sqlx::query("SELECT id, team_id FROM sites WHERE team_id IS NOT NULL ORDER BY id")
        .fetch_all(&mut *conn)
        .await?
    {
        sites
            .entry(col(&r, "team_id")?)
            .or_default()
            .push(SiteId(u64_of(col(&r, "id")?)));
    }
    let mut techs: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for r in
        sqlx::query("SELECT name, team_id FROM technicians WHERE team_id IS NOT NULL ORDER BY name")
            .fetch_all(&mut *conn)
            .await?
    {
        techs
            .entry(col(&r, "team_id")?)
            .or_default()
            .push(col(&r, "name")?);
    }
    rows.iter()
        .map(|r| {
            let id: i64 = col(r, "id")?;
            Ok(TeamView {
                id: u64_of(id),
                name: col(r, "name")?,
                source_prefixes: prefixes_of(&col::<String>(r, "source_prefixes")?)?,
                sites: sites.remove(&id).unwrap_or_default(),
                technicians: techs.remove(&id).unwrap_or_default(),
                created_at: UnixMillis(u64_of(col(r, "created_at")?)),
            })
        })
        .collect()
}

/// A technician's team: its id and name (`None`: no team).
///
/// # Errors
/// Database failures.
pub async fn team_of(conn: &mut AnyConnection, technician: i64) -> DbResult<Option<(i64, String)>> {
    let row = sqlx::query(
        "SELECT tm.id, tm.name FROM technicians t JOIN teams tm ON tm.id = t.team_id WHERE t.id = $1",
    )
    .bind(technician)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|r| Ok((col(&r, "id")?, col(&r, "name")?)))
        .transpose()
}

/// The source restrictions of gateway `gw`'s NAT addresses: for each NAT
/// address of a team's site, the sources of the technicians who started
/// its open requests (their own, else the team's), or the team's while
/// none is started. Addresses of sites without a team are not listed (any
/// technician reaches them).
///
/// # Errors
/// Database failures.
pub async fn allowed_sources(
    conn: &mut AnyConnection,
    gw: GatewayId,
) -> DbResult<Vec<AllowedSources>> {
    let mut by_nat: BTreeMap<Ipv4Addr, BTreeSet<Prefix>> = BTreeMap::new();
    // Started requests first: their starters decide for their addresses.
    let started = sqlx::query(
        "SELECT rt.nat_address, c.source_prefixes AS own, tm.source_prefixes AS team \
         FROM requests r JOIN request_terminals rt ON rt.request_id = r.id \
         JOIN sites s ON s.id = r.site_id JOIN tunnels t ON t.site_id = s.id \
         JOIN teams tm ON tm.id = s.team_id LEFT JOIN technicians c ON c.name = r.started_by \
         WHERE t.gateway_id = $1 AND r.state = 'in_progress' AND rt.nat_address IS NOT NULL \
         AND s.public_key IS NOT NULL",
    )
    .bind(id64(gw.0))
    .fetch_all(&mut *conn)
    .await?;
    for r in started {
        let nat = addr_of(col(&r, "nat_address")?);
        let own: Option<String> = col(&r, "own")?;
        let sources = match own {
            Some(own) => prefixes_of(&own)?,
            None => prefixes_of(&col::<String>(&r, "team")?)?,
        };
        by_nat.entry(nat).or_default().extend(sources);
    }
    let held = sqlx::query(
        "SELECT n.address, tm.source_prefixes FROM tunnels t JOIN sites s ON s.id = t.site_id \
         JOIN teams tm ON tm.id = s.team_id JOIN nat_addresses n ON n.site_id = s.id \
         WHERE t.gateway_id = $1 AND s.public_key IS NOT NULL",
    )
    .bind(id64(gw.0))
    .fetch_all(&mut *conn)
    .await?;
    for r in held {
        let nat = addr_of(col(&r, "address")?);
        if let std::collections::btree_map::Entry::Vacant(e) = by_nat.entry(nat) {
            e.insert(
                prefixes_of(&col::<String>(&r, "source_prefixes")?)?
                    .into_iter()
                    .collect(),
            );
        }
    }
    // Only addresses the gateway carries for these sites (a started
    // request's address is one of them while the request is open).
    let carried: BTreeSet<Ipv4Addr> = sqlx::query(
        "SELECT n.address FROM tunnels t JOIN sites s ON s.id = t.site_id \
         JOIN nat_addresses n ON n.site_id = s.id \
         WHERE t.gateway_id = $1 AND s.public_key IS NOT NULL",
    )
    .bind(id64(gw.0))
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|r| col(r, "address").map(addr_of))
    .collect::<DbResult<_>>()?;
    Ok(by_nat
        .into_iter()
        .filter(|(nat, _)| carried.contains(nat))
        .map(|(nat_address, sources)| AllowedSources {
            nat_address,
            sources: sources.into_iter().collect(),
        })
        .collect())
}
