//! [`ShardError`]: what went wrong on one shard, for every part that does
//! administrative work there (migrations, checks, moves), and the one way to
//! connect for that work.

use super::error_text;

/// What went wrong on one shard.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShardError {
    /// The shard cannot be reached; nothing ran there.
    #[error("shard {shard} is unreachable: {}", error_text(&**.cause))]
    Unreachable {
        /// The shard.
        shard: String,
        /// The connection error (the driver's, or the TLS setup's).
        #[source]
        cause: BoxError,
    },
    /// A file applied on the shard has changed since; nothing ran there.
    #[error("shard {shard}: {file} changed after it was applied (checksum {applied} on the shard, {current} now); restore the file or add a new migration")]
    Drift {
        /// The shard.
        shard: String,
        /// `V{version}__{name}`.
        file: String,
        /// The checksum recorded on the shard.
        applied: u64,
        /// The file's checksum now.
        current: u64,
    },
    /// The shard has a version the folder lacks; nothing ran there.
    #[error("shard {shard}: applied migration {file} is not in the migrations folder")]
    Missing {
        /// The shard.
        shard: String,
        /// `V{version}__{name}` as recorded on the shard.
        file: String,
    },
    /// A file failed; its transaction rolled back, the shard stays at `version`.
    #[error("shard {shard}: {file} failed and was rolled back; the shard stays at version {version}: {}", error_text(&**.cause))]
    Failed {
        /// The shard.
        shard: String,
        /// The file that failed.
        file: String,
        /// The shard's version now.
        version: u32,
        /// The migration runner's error; its chain ends in the driver's
        /// (see [`ShardError::sqlstate`]).
        #[source]
        cause: BoxError,
    },
    /// Row-level security hides rows of these tenant tables from the role
    /// that administrative work connects as: checks, copies and deletes would
    /// see none of them. Nothing ran there.
    #[error("shard {shard}: row-level security hides rows of {} from role {role}; set the shard's admin_url to a role that sees every tenant (superuser, BYPASSRLS, or the tables' owner without FORCE ROW LEVEL SECURITY)", tables.join(", "))]
    RowSecurity {
        /// The shard.
        shard: String,
        /// The role connected.
        role: String,
        /// The tenant tables whose rows it cannot all see.
        tables: Vec<String>,
    },
    /// A file waited for a table lock longer than the lock timeout on every
    /// attempt (a long transaction holds the table); each attempt rolled back.
    #[error("shard {shard}: {file} waited more than {timeout_ms} ms for a table lock on each of {attempts} attempts and was rolled back; the shard stays at version {version}: end the long transaction holding the table ({}), or raise --lock-timeout-ms", error_text(&**.cause))]
    LockTimeout {
        /// The shard.
        shard: String,
        /// The file.
        file: String,
        /// The shard's version now.
        version: u32,
        /// Attempts made.
        attempts: u32,
        /// The lock timeout of each attempt.
        timeout_ms: u64,
        /// The last attempt's error (SQLSTATE 55P03 through [`ShardError::sqlstate`]).
        #[source]
        cause: BoxError,
    },
    /// Tenants of the shard are moving: a table created or altered now would
    /// miss the move's fence and row capture. Nothing ran there.
    #[error("shard {shard}: tenants are moving ({}); finish or abort their moves, then migrate", tenants.join(", "))]
    MoveInFlight {
        /// The shard.
        shard: String,
        /// The moving tenants.
        tenants: Vec<String>,
    },
    /// The map's `tenant_column` is on no table of the shard, while the shard
    /// has tables: a misspelt column would make every check see "no data".
    /// Nothing ran there.
    #[error("shard {shard}: no table has the tenant column {column:?} (the map's tenant_column), but the shard has tables ({}); check the column's spelling", tables.join(", "))]
    NoTenantColumn {
        /// The shard.
        shard: String,
        /// The map's tenant column.
        column: String,
        /// Some of the shard's tables (at most five).
        tables: Vec<String>,
    },
    /// A statement failed, or reading the shard's history did.
    #[error("shard {shard}: {}", error_text(&**.cause))]
    Database {
        /// The shard.
        shard: String,
        /// The driver's error, or the migration runner's wrapping it
        /// (see [`ShardError::sqlstate`]).
        #[source]
        cause: BoxError,
    },
}

/// A cause kept whole, so its chain (and the driver's SQLSTATE) stays reachable.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl ShardError {
    /// A stable word for the failure, for scripts: `unreachable`, `drift`,
    /// `missing`, `failed`, `row_security`, `lock_timeout`,
    /// `move_in_flight`, `no_tenant_column` or `database`.
    ///
    /// ```
    /// use shard_router::migrate::ShardError;
    ///
    /// let err = ShardError::Missing { shard: "a".into(), file: "V3__x".into() };
    /// assert_eq!(err.kind(), "missing");
    /// ```
    pub fn kind(&self) -> &'static str {
        match self {
            ShardError::Unreachable { .. } => "unreachable",
            ShardError::Drift { .. } => "drift",
            ShardError::Missing { .. } => "missing",
            ShardError::Failed { .. } => "failed",
            ShardError::RowSecurity { .. } => "row_security",
            ShardError::LockTimeout { .. } => "lock_timeout",
            ShardError::MoveInFlight { .. } => "move_in_flight",
            ShardError::NoTenantColumn { .. } => "no_tenant_column",
            ShardError::Database { .. } => "database",
        }
    }

    /// The SQLSTATE the shard answered, found anywhere in the cause's chain;
    /// `None` when the failure was not the database's (a changed file, an
    /// unreachable host).
    ///
    /// ```
    /// use shard_router::migrate::ShardError;
    ///
    /// let err = ShardError::Missing { shard: "a".into(), file: "V3__x".into() };
    /// assert!(err.sqlstate().is_none());
    /// ```
    pub fn sqlstate(&self) -> Option<&tokio_postgres::error::SqlState> {
        let mut next = std::error::Error::source(self);
        while let Some(err) = next {
            if let Some(db) = err.downcast_ref::<tokio_postgres::error::DbError>() {
                return Some(db.code());
            }
            if let Some(pg) = err.downcast_ref::<tokio_postgres::Error>() {
                if let Some(code) = pg.code() {
                    return Some(code);
                }
            }
            next = err.source();
        }
        None
    }

    /// Wraps a driver error for `shard`.
    pub(crate) fn database(shard: &str, cause: impl Into<BoxError>) -> ShardError {
        ShardError::Database {
            shard: shard.to_owned(),
            cause: cause.into(),
        }
    }
}

/// `{"kind": ..., "error": message}`: the [`ShardError::kind`] and the text.
impl serde::Serialize for ShardError {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut err = serializer.serialize_struct("ShardError", 2)?;
        err.serialize_field("kind", self.kind())?;
        err.serialize_field("error", &self.to_string())?;
        err.end()
    }
}
