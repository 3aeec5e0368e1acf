//! [`DbError`]: every failure of the handle, with tenant, shard and map
//! version, and its kind for callers that branch on it.

use super::*;
use deadpool_postgres::PoolError;

use crate::TenantId;

/// A database failure while serving a tenant. Carries tenant, shard and map
/// version; converts to a response with [`crate::Rejection`].
///
/// Its `Display` says what failed and where; the driver's or the pool's error
/// is the [`source`](std::error::Error::source), never repeated in the
/// message, so error reporters that walk the chain print it once.
/// [`DbError::report`] renders both on one line, as the router's own logs do.
///
/// ```
/// # use shard_router::{DbError, Rejection};
/// # fn status(err: &DbError) -> http::StatusCode { Rejection::from(err).status() }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// The shard could not give a connection in time, or cannot be reached. 503.
    #[error("shard {shard} is unavailable for tenant {tenant} (map version {map_version})")]
    Unavailable {
        /// The tenant.
        tenant: TenantId,
        /// The shard.
        shard: String,
        /// The map version of the request.
        map_version: u64,
        /// What the pool said: a timeout, or the connection error.
        #[source]
        cause: Box<PoolError>,
    },
    /// A statement failed. 503 if the connection broke, 500 otherwise.
    #[error("query failed on shard {shard} for tenant {tenant} (map version {map_version})")]
    Query {
        /// The tenant.
        tenant: TenantId,
        /// The shard.
        shard: String,
        /// The map version of the request.
        map_version: u64,
        /// The driver's error; `cause.as_db_error()` gives the SQLSTATE.
        #[source]
        cause: tokio_postgres::Error,
    },
    /// The shard's fence refused the write: this router's map is older than the
    /// tenant's move allows (found for a statement that changed no row). 503.
    #[error("shard {shard} refuses writes for tenant {tenant} from map version {map_version}; the tenant's move needs version {min_version} or later")]
    Fenced {
        /// The tenant.
        tenant: TenantId,
        /// The shard.
        shard: String,
        /// The map version of the request.
        map_version: u64,
        /// The lowest version the shard accepts for the tenant.
        min_version: u64,
    },
    /// The map shows the tenant moving, but its shards were never prepared for
    /// a move (`[moves]` edited by hand instead of `shardctl tenant move`).
    /// Nothing was written. 500.
    #[error("tenant {tenant} is in [moves] of map version {map_version}, but shard {shard} was never prepared for its move; moves are run with `shardctl tenant move`, never by editing [moves]")]
    MoveNotPrepared {
        /// The tenant.
        tenant: TenantId,
        /// The shard.
        shard: String,
        /// The map version of the request.
        map_version: u64,
    },
    /// `query_one` found no row or more than one, or `query_opt` more than
    /// one. 500: match it to answer 404 where no row means "not found".
    #[error("expected {expected} row from shard {shard} for tenant {tenant} (map version {map_version}), got {rows}")]
    RowCount {
        /// The tenant.
        tenant: TenantId,
        /// The shard.
        shard: String,
        /// The map version of the request.
        map_version: u64,
        /// `"one"` or `"at most one"`.
        expected: &'static str,
        /// Rows returned.
        rows: usize,
    },
    /// A statement of this writer failed earlier, so it can only roll back. 500.
    #[error("write transaction for tenant {tenant} on shard {shard} (map version {map_version}) was aborted by an earlier error")]
    Aborted {
        /// The tenant.
        tenant: TenantId,
        /// The shard.
        shard: String,
        /// The map version of the request.
        map_version: u64,
    },
}

/// What kind of failure a [`DbError`] is, to answer it: see [`DbError::kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DbErrorKind {
    /// The shard cannot serve now: pool wait timed out, connection refused or
    /// broken. Default answer 503 with `Retry-After`.
    Unavailable,
    /// The move fence refused a write from a router on an old map. 503.
    Fenced,
    /// A unique or primary-key constraint (SQLSTATE 23505). 500 unless the
    /// application says otherwise (409 is usual).
    UniqueViolation,
    /// A foreign-key constraint (23503). 500 unless the application says otherwise.
    ForeignKeyViolation,
    /// A check or not-null constraint (23514, 23502). 500 unless the
    /// application says otherwise (422 is usual).
    CheckViolation,
    /// A serialization failure or deadlock (40001, 40P01): the transaction may
    /// be retried. 500 unless the application retries it.
    SerializationFailure,
    /// `query_one` or `query_opt` got an unexpected number of rows. 500
    /// unless the application says otherwise (404 is usual for "no row").
    RowCount,
    /// Anything else (a missing table, a type mismatch, an aborted writer). 500.
    Other,
}

/// A [`DbError`] with its cause, on one line: see [`DbError::report`].
#[derive(Debug, Clone, Copy)]
pub struct DbErrorReport<'a>(&'a DbError);

impl std::fmt::Display for DbErrorReport<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        if let Some(cause) = std::error::Error::source(self.0) {
            write!(f, ": {}", crate::pg::error_text(cause))?;
        }
        Ok(())
    }
}

impl DbError {
    /// The message and its cause on one line (the database's own words for a
    /// failed statement: `query failed on shard a for tenant acme (map version
    /// 3): relation "notez" does not exist`), for logs.
    ///
    /// ```
    /// # fn log(err: &shard_router::DbError) {
    /// tracing::error!(error = %err.report(), "could not list notes");
    /// # }
    /// ```
    pub fn report(&self) -> DbErrorReport<'_> {
        DbErrorReport(self)
    }

    /// The kind of failure, for an application that answers some kinds
    /// itself; the router's own answer ([`crate::Rejection`]) is 503 for
    /// `Unavailable` and `Fenced` and 500 for the rest.
    ///
    /// ```
    /// use axum::response::{IntoResponse, Response};
    /// use http::StatusCode;
    /// use shard_router::{DbError, DbErrorKind};
    ///
    /// fn answer(err: DbError) -> Response {
    ///     match err.kind() {
    ///         DbErrorKind::UniqueViolation => StatusCode::CONFLICT.into_response(),
    ///         DbErrorKind::RowCount => StatusCode::NOT_FOUND.into_response(),
    ///         _ => err.into_response(), // 503 or 500, logged with tenant, shard and version
    ///     }
    /// }
    /// ```
    pub fn kind(&self) -> DbErrorKind {
        use tokio_postgres::error::SqlState;
        match self {
            _ if self.is_fenced() => DbErrorKind::Fenced,
            _ if self.is_unavailable() => DbErrorKind::Unavailable,
            DbError::RowCount { .. } => DbErrorKind::RowCount,
            _ => match self.sqlstate() {
                Some(s) if *s == SqlState::UNIQUE_VIOLATION => DbErrorKind::UniqueViolation,
                Some(s) if *s == SqlState::FOREIGN_KEY_VIOLATION => {
                    DbErrorKind::ForeignKeyViolation
                }
                Some(s)
                    if *s == SqlState::CHECK_VIOLATION || *s == SqlState::NOT_NULL_VIOLATION =>
                {
                    DbErrorKind::CheckViolation
                }
                Some(s)
                    if *s == SqlState::T_R_SERIALIZATION_FAILURE
                        || *s == SqlState::T_R_DEADLOCK_DETECTED =>
                {
                    DbErrorKind::SerializationFailure
                }
                _ => DbErrorKind::Other,
            },
        }
    }

    /// The SQLSTATE the database answered, when a statement failed there.
    ///
    /// ```
    /// # fn f(err: shard_router::DbError) {
    /// if let Some(state) = err.sqlstate() {
    ///     eprintln!("SQLSTATE {}", state.code());
    /// }
    /// # }
    /// ```
    pub fn sqlstate(&self) -> Option<&tokio_postgres::error::SqlState> {
        match self {
            DbError::Query { cause, .. } => cause.code(),
            _ => None,
        }
    }

    /// True when the shard's fence refused the write: this router's map is older
    /// than the tenant's move allows. It clears once the router applies the new map.
    ///
    /// ```
    /// # fn f(err: shard_router::DbError) -> bool {
    /// err.is_fenced()
    /// # }
    /// ```
    pub fn is_fenced(&self) -> bool {
        match self {
            DbError::Fenced { .. } => true,
            DbError::Query { cause, .. } => cause
                .as_db_error()
                .is_some_and(|db| db.code().code() == FENCE_SQLSTATE),
            _ => false,
        }
    }

    /// True when the shard, not the statement, is at fault: retrying later may succeed.
    ///
    /// ```
    /// # fn f(err: shard_router::DbError) -> bool {
    /// err.is_unavailable()
    /// # }
    /// ```
    pub fn is_unavailable(&self) -> bool {
        match self {
            DbError::Unavailable { .. } | DbError::Fenced { .. } => true,
            DbError::Query { cause, .. } => {
                self.is_fenced()
                    || cause.is_closed()
                    || std::error::Error::source(cause)
                        .is_some_and(|source| source.is::<std::io::Error>())
            }
            DbError::Aborted { .. }
            | DbError::MoveNotPrepared { .. }
            | DbError::RowCount { .. } => false,
        }
    }
}
