//! The errors of the database layer: storage failures ([`DbError`]) and the
//! reasons an operation refuses ([`OpError`]). They stay typed up to the
//! HTTP boundary (`crate::error`), where each becomes a status and a code.

use vpnnat::messages::TunnelKind;

/// A database failure.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// No such row.
    #[error("not found")]
    NotFound,
    /// Anything else.
    #[error(transparent)]
    Other(#[from] sqlx::Error),
}

impl DbError {
    /// Whether the transaction lost a race the database detected (PostgreSQL
    /// deadlock `40P01` or serialization failure `40001`): running it again
    /// from the start is safe and will most likely succeed.
    pub fn is_retryable(&self) -> bool {
        // PostgreSQL's deadlock and serialization failures, and SQLite's
        // SQLITE_BUSY_SNAPSHOT (517): a read snapshot another writer made
        // stale before this transaction wrote; rolled back, it can run again.
        matches!(self, Self::Other(sqlx::Error::Database(d))
            if matches!(d.code().as_deref(), Some("40P01" | "40001" | "517")))
    }
}

/// Result of a database operation.
pub type DbResult<T> = Result<T, DbError>;

/// Why an operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// Storage failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The object does not exist (or is not the caller's).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// A unique value is taken.
    #[error("{message}")]
    Conflict {
        /// The field.
        field: &'static str,
        /// Why.
        message: String,
    },
    /// No healthy gateway that runs the site's tunnel kind has a free
    /// tunnel slot. The message is what the customer is shown: the
    /// transaction is rolled back, nothing is held.
    #[error("{}", no_capacity(*.0))]
    NoCapacity(TunnelKind),
    /// Every pool address is held (message as for `NoCapacity`).
    #[error("the NAT-address pool is exhausted; nothing was allocated, try again later")]
    PoolExhausted,
    /// The request is not in a state that allows this.
    #[error("{0}")]
    InvalidState(String),
    /// An enrollment token that is unknown, used or expired.
    #[error("the enrollment token is unknown, used or expired")]
    BadToken,
    /// The gateway has not registered yet.
    #[error("the gateway has not registered")]
    NotRegistered,
    /// The site holds as much as its quota allows (`[quotas]`).
    #[error("{message}")]
    Quota {
        /// The limit's field (`open_requests`, `terminals`).
        field: &'static str,
        /// Which limit, and its value.
        message: String,
    },
    /// The site did this too often in the last minute (`[quotas]`).
    #[error("{0}")]
    RateLimited(String),
}

/// What a site is told when no gateway of its kind has a slot.
fn no_capacity(kind: TunnelKind) -> String {
    match kind {
        TunnelKind::Wireguard => {
            "no gateway has a free tunnel slot; nothing was allocated, try again later".to_owned()
        }
        k => format!(
            "no gateway that runs {} tunnels has a free tunnel slot; nothing was allocated, \
             try again later",
            k.label()
        ),
    }
}

impl From<sqlx::Error> for OpError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(DbError::Other(e))
    }
}

impl OpError {
    /// `Conflict` on `name`: a `what` of that name exists.
    pub fn name_taken(what: &str, name: &str) -> Self {
        Self::Conflict {
            field: "name",
            message: format!("a {what} named {name:?} exists"),
        }
    }

    /// Whether this is a refusal for want of capacity (a gateway slot or a
    /// pool address): the site is told, and the caller may try again later.
    pub fn is_capacity(&self) -> bool {
        matches!(self, Self::NoCapacity(_) | Self::PoolExhausted)
    }
}

impl OpError {
    /// Whether this is a refusal by a per-site limit (`[quotas]`).
    pub fn is_site_limit(&self) -> bool {
        matches!(self, Self::Quota { .. } | Self::RateLimited(_))
    }

    /// See [`DbError::is_retryable`].
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Db(e) if e.is_retryable())
    }
}

/// Result of an operation.
pub type OpResult<T> = Result<T, OpError>;

pub(super) fn is_unique_violation(e: &OpError) -> bool {
    matches!(e, OpError::Db(DbError::Other(sqlx::Error::Database(d))) if d.is_unique_violation())
}
