//! NAT addresses: the pool table, and claiming and releasing the address
//! of a (site, terminal).
//!
//! The pool configuration is checked with the core's address-pool model
//! ([`vpnnat::pool`]); the table holds the same host addresses that model
//! hands out. Claims run in SQL (a conditional update, `SKIP LOCKED` on
//! PostgreSQL) so that replicas sharing a database never hand out one
//! address twice; `maintenance-server/tests/pool_model.rs` checks them
//! against the model.

use std::net::Ipv4Addr;

use sqlx::Row as _;
use vpnnat::ipv4::Prefix;
use vpnnat::messages::{SiteId, TerminalName};
use vpnnat::pool::{Pool, PoolConfig, PoolError};

use super::error::{OpError, OpResult};
use super::views::{addr_of, addr_to_i64};
use super::{Database, DbKind, DbResult, Tx, id64};

/// The NAT-address pool that `prefix` (the `pool.prefix` setting) describes,
/// as the core's model: the text must be an IPv4 prefix with its host bits
/// clear that leaves an address to hand out.
///
/// # Errors
/// [`PoolError`] saying what is wrong with the text.
pub fn configured_pool(prefix: &str) -> Result<Pool, PoolError> {
    Pool::new(&PoolConfig {
        prefix: vpnnat::pool::parse_prefix(prefix)?,
        reserved: Vec::new(),
    })
}

impl Database {
    /// Makes the `nat_addresses` table hold exactly the usable addresses of
    /// `prefix` (its [`Prefix::hosts`]): adds missing ones, removes free ones outside it (held ones
    /// outside it stay until released). Safe to run from several replicas at once.
    ///
    /// # Errors
    /// Database failures.
    pub async fn sync_pool(&self, prefix: Prefix) -> DbResult<()> {
        let hosts = prefix.hosts();
        let (first, last) = (addr_to_i64(*hosts.start()), addr_to_i64(*hosts.end()));
        let mut tx = self.begin().await?;
        // The write first: SQLite then takes the write lock at once (waiting
        // for it, busy_timeout), instead of turning a read snapshot into a
        // write after a running server committed, which fails at once
        // ("database is locked", SQLITE_BUSY_SNAPSHOT) and broke a CLI
        // command run beside the server.
        sqlx::query(
            "DELETE FROM nat_addresses WHERE site_id IS NULL AND (address < $1 OR address > $2)",
        )
        .bind(first)
        .bind(last)
        .execute(&mut *tx.inner)
        .await?;
        let count: i64 =
            sqlx::query("SELECT COUNT(*) FROM nat_addresses WHERE address >= $1 AND address <= $2")
                .bind(first)
                .bind(last)
                .fetch_one(&mut *tx.inner)
                .await?
                .try_get(0)?;
        if count != last - first + 1 {
            let fill = match self.kind {
                DbKind::Postgres => {
                    "INSERT INTO nat_addresses (address) SELECT a FROM generate_series($1::BIGINT, $2::BIGINT) AS a \
                     ON CONFLICT DO NOTHING"
                }
                DbKind::Sqlite => {
                    "WITH RECURSIVE seq(a) AS (SELECT $1 UNION ALL SELECT a + 1 FROM seq WHERE a < $2) \
                     INSERT INTO nat_addresses (address) SELECT a FROM seq WHERE true ON CONFLICT DO NOTHING"
                }
            };
            sqlx::query(fill)
                .bind(first)
                .bind(last)
                .execute(&mut *tx.inner)
                .await?;
        }
        tx.inner.commit().await?;
        Ok(())
    }
}

/// The address (site, terminal) holds, claiming a free one when it holds none:
/// a terminal named by several open requests keeps one address.
pub(super) async fn address_for(
    tx: &mut Tx,
    site: SiteId,
    terminal: &TerminalName,
    now: i64,
) -> OpResult<Ipv4Addr> {
    let held =
        sqlx::query("SELECT address FROM nat_addresses WHERE site_id = $1 AND terminal = $2")
            .bind(id64(site.0))
            .bind(terminal.as_str())
            .fetch_optional(&mut *tx.inner)
            .await?;
    match held {
        Some(r) => Ok(addr_of(r.try_get(0)?)),
        None => allocate(tx, site, terminal, now).await,
    }
}

/// Claims a free pool address for (site, terminal).
pub(super) async fn allocate(
    tx: &mut Tx,
    site: SiteId,
    terminal: &TerminalName,
    now: i64,
) -> OpResult<Ipv4Addr> {
    // Least recently released first, so an address is not handed to another
    // site the moment it was given back.
    let sql = match tx.kind {
        DbKind::Postgres => {
            "UPDATE nat_addresses SET site_id = $1, terminal = $2, allocated_at = $3 \
             WHERE address = (SELECT address FROM nat_addresses WHERE site_id IS NULL \
                              ORDER BY released_at, address LIMIT 1 FOR UPDATE SKIP LOCKED) \
             AND site_id IS NULL RETURNING address"
        }
        // Without the hint SQLite walks the (site_id, terminal) index over
        // every free address and sorts them (milliseconds per claim).
        DbKind::Sqlite => {
            "UPDATE nat_addresses SET site_id = $1, terminal = $2, allocated_at = $3 \
             WHERE address = (SELECT address FROM nat_addresses INDEXED BY nat_addresses_free \
                              WHERE site_id IS NULL \
                              ORDER BY released_at, address LIMIT 1) \
             AND site_id IS NULL RETURNING address"
        }
    };
    // Under PostgreSQL a concurrent claim can make the subquery come back
    // empty although addresses are free (its row was re-checked after the
    // lock); try again before calling the pool exhausted.
    for _ in 0..8 {
        let r = sqlx::query(sql)
            .bind(id64(site.0))
            .bind(terminal.as_str())
            .bind(now)
            .fetch_optional(&mut *tx.inner)
            .await?;
        if let Some(r) = r {
            return Ok(addr_of(r.try_get(0)?));
        }
        let free = sqlx::query("SELECT COUNT(*) FROM nat_addresses WHERE site_id IS NULL")
            .fetch_one(&mut *tx.inner)
            .await?;
        if free.try_get::<i64, _>(0)? == 0 {
            break;
        }
    }
    Err(OpError::PoolExhausted)
}

/// Gives the address of (site, terminal) back to the pool, if it holds one.
pub(super) async fn release(
    tx: &mut Tx,
    site: SiteId,
    terminal: &str,
    now: i64,
) -> OpResult<Option<Ipv4Addr>> {
    let a = sqlx::query(
        "UPDATE nat_addresses SET site_id = NULL, terminal = NULL, allocated_at = NULL, released_at = $1 \
         WHERE site_id = $2 AND terminal = $3 RETURNING address",
    )
    .bind(now)
    .bind(id64(site.0))
    .bind(terminal)
    .fetch_optional(&mut *tx.inner)
    .await?;
    Ok(match a {
        Some(a) => Some(addr_of(a.try_get(0)?)),
        None => None,
    })
}

/// How many addresses `site` holds.
pub(super) async fn held_by(tx: &mut Tx, site: SiteId) -> OpResult<i64> {
    Ok(
        sqlx::query("SELECT COUNT(*) FROM nat_addresses WHERE site_id = $1")
            .bind(id64(site.0))
            .fetch_one(&mut *tx.inner)
            .await?
            .try_get::<i64, _>(0)?,
    )
}
