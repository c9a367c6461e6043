//! The database: SQLite (default, one file, WAL) or PostgreSQL, through sqlx's
//! `Any` driver so that one set of queries serves both. Queries use `$N`
//! placeholders, which both backends accept; the few dialect differences
//! (row locks) are explicit on [`DbKind`].
//!
//! Concurrency: on SQLite all writes go through one connection (a pool of
//! one), so write transactions are serialized and can never hit
//! `SQLITE_BUSY`; reads use their own connections and see committed
//! snapshots (WAL). On PostgreSQL every write transaction first locks the
//! row of the site it touches (`SELECT … FOR UPDATE`), and NAT addresses are
//! claimed with `FOR UPDATE SKIP LOCKED` from a pre-populated table whose
//! primary key is the address: two replicas can never hand out one address twice.
//!
//! Lock order (PostgreSQL): site rows first (ascending id when several),
//! then gateway rows, then the console counter (at the commit). A
//! transaction that nevertheless loses a deadlock or serialization race is
//! run again ([`TX_ATTEMPTS`], [`retry_pause`]) instead of failing.

pub mod addresses;
pub mod agentless;
mod error;
mod gateways;
pub mod ops;
pub mod outbox;
mod policy;
mod requests;
mod restore;
pub mod rotation;
mod sites;
pub mod teams;
mod technicians;
mod tunnels;
pub mod views;

use std::collections::BTreeSet;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Row as _, Transaction};
use vpnnat::messages::{GatewayId, SiteId};

pub use self::error::{DbError, DbResult, OpError, OpResult};
use crate::notify::{Notifier, Topic};

/// Which SQL backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    /// One file.
    Sqlite,
    /// Shared by replicas.
    Postgres,
}

impl DbKind {
    /// An SQL expression for the database's clock, milliseconds since the
    /// Unix epoch. Heartbeat ages are measured with it, so that replicas
    /// whose own clocks differ agree on which gateway is silent.
    pub fn now_ms_sql(self) -> &'static str {
        match self {
            Self::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
            Self::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }
}

/// How often a transaction that lost a deadlock or serialization race is
/// run again before the error is returned.
pub const TX_ATTEMPTS: u32 = 6;

/// A random pause before attempt `attempt` (1-based) of a transaction that
/// lost a race: growing with the attempt, jittered so that the transactions
/// that collided do not collide again.
pub fn retry_pause(attempt: u32) -> Duration {
    use rand::Rng as _;
    let cap_ms = 5u64 << attempt.min(6);
    Duration::from_millis(rand::thread_rng().gen_range(1..=cap_ms))
}

/// The connection pools.
#[derive(Clone)]
pub struct Database {
    /// The backend.
    pub kind: DbKind,
    write: AnyPool,
    read: AnyPool,
    url: String,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("kind", &self.kind)
            .finish()
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Database {
    /// Connects, creating the SQLite file when needed, and runs the migrations.
    ///
    /// # Errors
    /// When the database cannot be reached or migrated.
    pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        sqlx::any::install_default_drivers();
        let kind = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            DbKind::Postgres
        } else {
            DbKind::Sqlite
        };
        let (write, read) = match kind {
            DbKind::Sqlite => {
                let path = url
                    .trim_start_matches("sqlite://")
                    .trim_start_matches("sqlite:");
                let path = path.split('?').next().unwrap_or(path);
                if let Some(dir) = std::path::Path::new(path).parent()
                    && !dir.as_os_str().is_empty()
                {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                }
                let url = format!("sqlite://{path}?mode=rwc");
                let opts = || {
                    AnyPoolOptions::new()
                        .acquire_timeout(Duration::from_secs(30))
                        .after_connect(|conn, _| {
                            Box::pin(async move {
                                for pragma in [
                                    "PRAGMA journal_mode = WAL",
                                    "PRAGMA synchronous = NORMAL",
                                    "PRAGMA busy_timeout = 10000",
                                    "PRAGMA foreign_keys = ON",
                                ] {
                                    sqlx::Executor::execute(&mut *conn, pragma).await?;
                                }
                                Ok(())
                            })
                        })
                };
                let write = opts()
                    .max_connections(1)
                    .connect(&url)
                    .await
                    .with_context(|| format!("opening SQLite database {path}"))?;
                let read = opts()
                    .max_connections(max_connections.max(2))
                    .connect(&url)
                    .await
                    .with_context(|| format!("opening SQLite database {path}"))?;
                (write, read)
            }
            DbKind::Postgres => {
                let pool = AnyPoolOptions::new()
                    .max_connections(max_connections)
                    .acquire_timeout(Duration::from_secs(30))
                    .connect(url)
                    .await
                    .context("connecting to PostgreSQL")?;
                (pool.clone(), pool)
            }
        };
        let db = Self {
            kind,
            write,
            read,
            url: url.to_owned(),
        };
        match kind {
            DbKind::Sqlite => sqlx::migrate!("migrations/sqlite").run(&db.write).await,
            DbKind::Postgres => sqlx::migrate!("migrations/postgres").run(&db.write).await,
        }
        .context("running database migrations")?;
        Ok(db)
    }

    /// The URL it was opened with (PostgreSQL `LISTEN` needs it).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Writes a consistent copy of the SQLite database to `dest` while the
    /// server may keep running (`VACUUM INTO`: one read transaction, so the
    /// copy is a snapshot; the result is a compact database without WAL).
    /// PostgreSQL is backed up with its own tools (`pg_dump`).
    ///
    /// # Errors
    /// PostgreSQL, an existing `dest`, or a failed copy.
    pub async fn backup_sqlite(&self, dest: &std::path::Path) -> anyhow::Result<()> {
        use anyhow::Context as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        if self.kind != DbKind::Sqlite {
            anyhow::bail!(
                "the database is PostgreSQL: back it up with `pg_dump --format=custom` (see docs/OPERATIONS.md)"
            );
        }
        let path = dest
            .to_str()
            .ok_or_else(|| anyhow::anyhow!("{} is not valid UTF-8", dest.display()))?;
        // The copy holds credential hashes: private from the start. VACUUM
        // INTO accepts an empty file.
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dest)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                anyhow::bail!(
                    "{} exists already; refusing to overwrite it",
                    dest.display()
                )
            }
            Err(e) => return Err(e).with_context(|| format!("creating {}", dest.display())),
        }
        // VACUUM INTO takes a literal (no bind parameter); quotes are doubled.
        let sql = format!("VACUUM INTO '{}'", path.replace('\'', "''"));
        let r = sqlx::query(&sql)
            .execute(&self.read)
            .await
            .with_context(|| format!("writing the backup to {}", dest.display()));
        if r.is_err() {
            let _ = std::fs::remove_file(dest);
        }
        r.map(|_| ())
    }

    /// Closes both pools, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self.write.close().await;
        self.read.close().await;
    }

    /// The pool for reads.
    pub fn reader(&self) -> &AnyPool {
        &self.read
    }

    /// Runs `f` in a write transaction and commits it (announcing its
    /// changes). A transaction that loses a deadlock or serialization race
    /// (PostgreSQL) is rolled back and run again, up to [`TX_ATTEMPTS`]
    /// times with a jittered pause ([`retry_pause`]); any other error is
    /// returned at once (then nothing is committed).
    ///
    /// # Errors
    /// `f`'s error or a failed commit.
    pub async fn transaction<T, E>(
        &self,
        notifier: &Notifier,
        f: impl AsyncFnOnce(&mut Tx) -> Result<T, E> + Clone,
    ) -> Result<T, E>
    where
        E: From<DbError> + Retryable,
    {
        let mut attempt = 1;
        loop {
            // Each attempt calls its own copy (closures capture references).
            let f = f.clone();
            let r: Result<T, E> = async {
                let mut tx = self.begin().await?;
                let out = f(&mut tx).await?;
                tx.commit(notifier).await?;
                Ok(out)
            }
            .await;
            match r {
                Err(e) if attempt < TX_ATTEMPTS && e.is_retryable() => {
                    tracing::debug!(
                        attempt,
                        "transaction lost a deadlock or serialization race; running it again"
                    );
                    tokio::time::sleep(retry_pause(attempt)).await;
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    /// Starts a write transaction.
    ///
    /// # Errors
    /// When no connection can be had.
    pub async fn begin(&self) -> DbResult<Tx> {
        Ok(Tx {
            inner: self.write.begin().await?,
            kind: self.kind,
            changes: Changes::default(),
        })
    }
}

/// An error after which a transaction may be run again.
pub trait Retryable {
    /// Whether it is a lost deadlock or serialization race.
    fn is_retryable(&self) -> bool;
}

impl Retryable for DbError {
    fn is_retryable(&self) -> bool {
        DbError::is_retryable(self)
    }
}

impl Retryable for OpError {
    fn is_retryable(&self) -> bool {
        OpError::is_retryable(self)
    }
}

/// Document versions a transaction changed; announced after the commit.
#[derive(Debug, Default, Clone)]
pub struct Changes {
    /// Sites whose desired state changed.
    pub sites: BTreeSet<SiteId>,
    /// Gateways whose desired state changed.
    pub gateways: BTreeSet<GatewayId>,
    /// Whether the console feed changed.
    pub console: bool,
    /// Whether the console feed changed in a way announced later, together
    /// with others ([`Notifier::defer_console`]).
    pub console_later: bool,
    /// Gateways that got a site's tunnel (new or moved) in this transaction:
    /// its `ready_version` is set at the commit.
    pub tunnels_placed: BTreeSet<GatewayId>,
    /// Whether webhook deliveries were queued (the delivery workers wake).
    pub outbox: bool,
}

impl Changes {
    fn topics(&self) -> Vec<Topic> {
        let mut t: Vec<Topic> = self.sites.iter().map(|s| Topic::Site(*s)).collect();
        t.extend(self.gateways.iter().map(|g| Topic::Gateway(*g)));
        if self.console {
            t.push(Topic::Console);
        }
        if self.outbox {
            t.push(Topic::Outbox);
        }
        t
    }
}

/// A write transaction that remembers which documents it changed.
pub struct Tx {
    /// The sqlx transaction.
    pub inner: Transaction<'static, Any>,
    /// The backend (for dialect differences).
    pub kind: DbKind,
    /// What to announce after the commit.
    pub changes: Changes,
}

impl Tx {
    /// Bumps a site's desired-state version.
    ///
    /// # Errors
    /// Database failures.
    pub async fn bump_site(&mut self, site: SiteId) -> DbResult<()> {
        sqlx::query("UPDATE sites SET version = version + 1 WHERE id = $1")
            .bind(id64(site.0))
            .execute(&mut *self.inner)
            .await?;
        self.changes.sites.insert(site);
        Ok(())
    }

    /// Bumps a gateway's desired-state version.
    ///
    /// # Errors
    /// Database failures.
    pub async fn bump_gateway(&mut self, gw: GatewayId) -> DbResult<()> {
        sqlx::query("UPDATE gateways SET version = version + 1 WHERE id = $1")
            .bind(id64(gw.0))
            .execute(&mut *self.inner)
            .await?;
        self.changes.gateways.insert(gw);
        Ok(())
    }

    /// Marks the console feed changed (bumped once, at commit).
    pub fn touch_console(&mut self) {
        self.changes.console = true;
    }

    /// Turns this transaction's console change into a deferred one: the
    /// consoles learn of it at the background task's next tick, together
    /// with every other deferred change (failure reports come in bursts).
    pub fn defer_console(&mut self) {
        if self.changes.console {
            self.changes.console = false;
            self.changes.console_later = true;
        }
    }

    /// Locks a site's row until the commit (PostgreSQL; SQLite writers are
    /// serialized anyway). Every transaction that changes a site's addresses,
    /// tunnel or requests takes this lock first, so they cannot interleave.
    ///
    /// Returns the site's name.
    ///
    /// # Errors
    /// [`DbError::NotFound`] when the site does not exist.
    pub async fn lock_site(&mut self, site: SiteId) -> DbResult<String> {
        let sql = match self.kind {
            DbKind::Postgres => "SELECT name FROM sites WHERE id = $1 FOR UPDATE",
            DbKind::Sqlite => "SELECT name FROM sites WHERE id = $1",
        };
        let row = sqlx::query(sql)
            .bind(id64(site.0))
            .fetch_optional(&mut *self.inner)
            .await?
            .ok_or(DbError::NotFound)?;
        col(&row, "name")
    }

    /// The row that `select` (whose one parameter `$1` is an id) finds for
    /// `id`.
    ///
    /// # Errors
    /// [`OpError::NotFound`] naming `what` when there is none.
    pub async fn row_by_id(
        &mut self,
        select: &'static str,
        id: u64,
        what: &'static str,
    ) -> OpResult<AnyRow> {
        sqlx::query(select)
            .bind(id64(id))
            .fetch_optional(&mut *self.inner)
            .await?
            .ok_or(OpError::NotFound(what))
    }

    /// Checks that `select` (whose one parameter `$1` is a name) finds no row.
    ///
    /// # Errors
    /// [`OpError::Conflict`] on `name` when it does.
    pub async fn name_free(
        &mut self,
        select: &'static str,
        name: &str,
        what: &str,
    ) -> OpResult<()> {
        let taken = sqlx::query(select)
            .bind(name)
            .fetch_optional(&mut *self.inner)
            .await?;
        match taken {
            Some(_) => Err(OpError::name_taken(what, name)),
            None => Ok(()),
        }
    }

    /// Checks that no site other than `site` (any site when `None`) holds
    /// the WireGuard public key `key_b64`, as its key or as the next key of a
    /// rotation: gateways find a site's tunnel by key.
    ///
    /// # Errors
    /// [`OpError::Conflict`] on `public_key` when one does.
    pub async fn site_key_free(&mut self, key_b64: &str, site: Option<SiteId>) -> OpResult<()> {
        let other = sqlx::query(
            "SELECT id FROM sites WHERE (public_key = $1 OR next_public_key = $1) AND id <> $2",
        )
        .bind(key_b64)
        .bind(site.map_or(-1, |s| id64(s.0)))
        .fetch_optional(&mut *self.inner)
        .await?;
        match other {
            Some(_) => Err(OpError::Conflict {
                field: "public_key",
                message: "another site uses this public key".into(),
            }),
            None => Ok(()),
        }
    }

    /// Appends to the audit log.
    ///
    /// # Errors
    /// Database failures.
    pub async fn audit(
        &mut self,
        now: i64,
        actor: &str,
        action: &str,
        object: &str,
        detail: &str,
    ) -> DbResult<()> {
        sqlx::query(
            "INSERT INTO audit_log (at, actor, action, object, detail) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(now)
        .bind(actor)
        .bind(action)
        .bind(object)
        .bind(detail)
        .execute(&mut *self.inner)
        .await?;
        self.changes.console = true;
        Ok(())
    }

    /// Commits and wakes every long-poll waiting on a changed document, in
    /// this process directly and in other replicas through `NOTIFY`.
    ///
    /// # Errors
    /// When the commit fails (nothing is announced then).
    pub async fn commit(mut self, notifier: &Notifier) -> DbResult<()> {
        // A tunnel created or moved in this transaction becomes ready with
        // the first version of its gateway's document that holds it: the one
        // this transaction ends with.
        for gw in &self.changes.tunnels_placed {
            sqlx::query(
                "UPDATE tunnels SET ready_version = (SELECT version FROM gateways WHERE id = $1) \
                 WHERE gateway_id = $1 AND ready_version = -1",
            )
            .bind(id64(gw.0))
            .execute(&mut *self.inner)
            .await?;
        }
        if self.changes.console {
            // Last statement: on PostgreSQL this hot row stays locked only until the commit.
            sqlx::query("UPDATE counters SET value = value + 1 WHERE name = 'console'")
                .execute(&mut *self.inner)
                .await?;
        }
        let topics = self.changes.topics();
        if self.kind == DbKind::Postgres && !topics.is_empty() {
            // Delivered at commit, to every listening replica (this one too).
            let payload = topics
                .iter()
                .map(Topic::encode)
                .collect::<Vec<_>>()
                .join(",");
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(crate::notify::CHANNEL)
                .bind(payload)
                .execute(&mut *self.inner)
                .await?;
        }
        self.inner.commit().await?;
        for t in topics {
            notifier.wake(t);
        }
        if self.changes.console_later && !self.changes.console {
            notifier.defer_console();
        }
        Ok(())
    }
}

/// An id as stored (ids are positive and far below 2^63).
pub fn id64(id: u64) -> i64 {
    i64::try_from(id).unwrap_or(i64::MAX)
}

/// A stored id or counter back to `u64`.
pub fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Reads column `name` of `row`.
///
/// # Errors
/// When the column is missing or has another type.
pub fn col<'r, T>(row: &'r AnyRow, name: &str) -> DbResult<T>
where
    T: sqlx::Decode<'r, Any> + sqlx::Type<Any>,
{
    Ok(row.try_get(name)?)
}

/// Column `name` of every row, as ids made by `make`.
///
/// # Errors
/// When a row lacks the column.
pub fn ids_of<T>(rows: &[AnyRow], name: &str, make: impl Fn(u64) -> T) -> DbResult<Vec<T>> {
    rows.iter()
        .map(|r| Ok(make(u64_of(col(r, name)?))))
        .collect()
}
