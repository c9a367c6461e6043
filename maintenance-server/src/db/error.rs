//! The errors of the database layer: storage failures ([`DbError`]) and the
//! reasons an operation refuses ([`OpError`]). They stay typed up to the
//! HTTP boundary (`crate::error`), where each becomes a status and a code.

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
    /// No healthy gateway has a free tunnel slot. The message is what the
    /// customer is shown: the transaction is rolled back, nothing is held.
    #[error("no gateway has a free tunnel slot; nothing was allocated, try again later")]
    NoCapacity,
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
        matches!(self, Self::NoCapacity | Self::PoolExhausted)
    }
}

/// Result of an operation.
pub type OpResult<T> = Result<T, OpError>;

pub(super) fn is_unique_violation(e: &OpError) -> bool {
    matches!(e, OpError::Db(DbError::Other(sqlx::Error::Database(d))) if d.is_unique_violation())
}
