//! The per-request database handle: [`TenantDb`] and its [`TenantWriter`].
//!
//! A handle captures the routing table when it is made, so every statement of a
//! request goes where the map said when the request began (one request, one map
//! version). Connections are checked out lazily: a request that never calls
//! [`TenantDb::read`] or [`TenantDb::write`] never touches a pool.
//!
//! While a tenant is moving, [`TenantDb::write`] gives a writer that applies each
//! statement to both shards, in one order, under a per-tenant advisory lock
//! taken on the move's source shard; the secondary commits before the primary.
//! Mirrored statements must be deterministic: generate ids in the application
//! (UUIDs), never from per-shard sequences, and keep `now()` out of keys.

use std::fmt;
use std::sync::Arc;

use deadpool_postgres::{Object, PoolError};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::map::{placement, Location, MovePhase, Reason, ShardIndex};
use crate::router::RoutingTable;
use crate::TenantId;

/// A tenant's access to its shard for one unit of work (usually one request).
///
/// Handlers get it from the request extensions (the axum extractor does this);
/// [`crate::ShardRouter::resolve`] makes one directly. Cloning is cheap.
///
/// # Example
///
/// ```no_run
/// # async fn handler(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
/// let client = db.read().await?;
/// let rows = client
///     .query("SELECT body FROM notes WHERE tenant_id = $1", &[&db.tenant().as_str()])
///     .await
///     .map_err(|e| db.query_error(e))?;
///
/// let mut writer = db.write().await?;
/// writer.execute("DELETE FROM notes WHERE tenant_id = $1", &[&db.tenant().as_str()]).await?;
/// writer.commit().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TenantDb {
    tenant: TenantId,
    table: Arc<RoutingTable>,
    location: Location,
}

impl TenantDb {
    pub(crate) fn new(tenant: TenantId, table: Arc<RoutingTable>) -> Self {
        let location = table.map().locate(&tenant);
        TenantDb {
            tenant,
            table,
            location,
        }
    }

    /// The tenant this handle serves.
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter, TenantId};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 2\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// let db = router.resolve(TenantId::new("acme").unwrap());
    /// assert_eq!(db.tenant().as_str(), "acme");
    /// # }
    /// ```
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// The name of the shard that serves the tenant's reads.
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter, TenantId};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 2\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// assert_eq!(router.resolve(TenantId::new("acme").unwrap()).shard(), "a");
    /// # }
    /// ```
    pub fn shard(&self) -> &str {
        self.shard_name(self.location.shard)
    }

    /// The map version this handle routes with.
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter, TenantId};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 2\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// assert_eq!(router.resolve(TenantId::new("acme").unwrap()).map_version(), 2);
    /// # }
    /// ```
    pub fn map_version(&self) -> u64 {
        self.table.map().version()
    }

    /// Where the tenant is and why (pin, ring or move).
    ///
    /// ```
    /// # use shard_router::{map::{MapLoader, Reason}, ShardRouter, TenantId};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 2\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// assert_eq!(router.resolve(TenantId::new("acme").unwrap()).location().reason, Reason::Ring);
    /// # }
    /// ```
    pub fn location(&self) -> Location {
        self.location
    }

    /// A pooled client on the shard that serves the tenant's reads.
    ///
    /// Waits at most the shard's `pool.wait_timeout_ms` for a connection; past that,
    /// or if the shard cannot be reached, the error is [`DbError::Unavailable`]
    /// (503 with `Retry-After`). Always filter by tenant in your SQL, with the id
    /// as a parameter.
    ///
    /// ```no_run
    /// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
    /// let client = db.read().await?;
    /// let count: i64 = client
    ///     .query_one("SELECT count(*) FROM notes WHERE tenant_id = $1", &[&db.tenant().as_str()])
    ///     .await
    ///     .map_err(|e| db.query_error(e))?
    ///     .get(0);
    /// # Ok(()) }
    /// ```
    pub async fn read(&self) -> Result<TenantClient, DbError> {
        self.checkout(self.location.shard).await
    }

    /// A writer that opens a transaction on the tenant's shard, or on both shards
    /// while the tenant is moving. Apply statements with [`TenantWriter::execute`],
    /// then [`TenantWriter::commit`]; a writer dropped without commit rolls back.
    ///
    /// ```no_run
    /// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
    /// let mut writer = db.write().await?;
    /// // The id is made here, not in SQL: during a move both shards must get the same row.
    /// let id = uuid::Uuid::new_v4();
    /// writer
    ///     .execute("INSERT INTO notes (tenant_id, id, body) VALUES ($1, $2, 'hi')",
    ///              &[&db.tenant().as_str(), &id])
    ///     .await?;
    /// writer.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn write(&self) -> Result<TenantWriter, DbError> {
        let sides = match self.location.reason {
            Reason::Move(route) => {
                // Source first, and its lock before the target's connection, so
                // every writer of the tenant, on any map version, queues in one place.
                let source = self.begin(route.from, TenantLock::Exclusive).await?;
                let target = self.begin(route.to, TenantLock::None).await?;
                match route.phase {
                    MovePhase::DualWrite => vec![source, target],
                    MovePhase::Reversed => vec![target, source],
                }
            }
            Reason::Pin | Reason::Ring => {
                vec![self.begin(self.location.shard, TenantLock::None).await?]
            }
        };
        Ok(TenantWriter {
            db: self.clone(),
            sides,
            state: WriterState::Open,
        })
    }

    /// Wraps a `tokio_postgres` error from a client this handle gave out, adding
    /// tenant, shard and map version, so it converts to the right response.
    ///
    /// ```no_run
    /// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
    /// let client = db.read().await?;
    /// client.execute("SELECT 1", &[]).await.map_err(|e| db.query_error(e))?;
    /// # Ok(()) }
    /// ```
    pub fn query_error(&self, cause: tokio_postgres::Error) -> DbError {
        self.query_error_on(self.location.shard, cause)
    }

    fn query_error_on(&self, shard: ShardIndex, cause: tokio_postgres::Error) -> DbError {
        DbError::Query {
            tenant: self.tenant.clone(),
            shard: self.shard_name(shard).to_owned(),
            map_version: self.map_version(),
            cause,
        }
    }

    fn shard_name(&self, index: ShardIndex) -> &str {
        self.table.map().shard(index).name()
    }

    /// A connection within the shard's wait: first the tenant's slot (when the
    /// shard caps tenants), then a pooled connection, then the tenant setting
    /// for row-level security (when the map names one).
    async fn checkout(&self, shard: ShardIndex) -> Result<TenantClient, DbError> {
        let settings = self.table.map().shard(shard).pool();
        let pool = self.table.pool(shard);
        let unavailable = |cause: PoolError| DbError::Unavailable {
            tenant: self.tenant.clone(),
            shard: self.shard_name(shard).to_owned(),
            map_version: self.map_version(),
            cause: Box::new(cause),
        };
        let (client, slot) = match self.table.limiter(shard) {
            None => (pool.get().await.map_err(unavailable)?, None),
            Some(limiter) => {
                let started = std::time::Instant::now();
                let slot = limiter
                    .acquire(self.tenant.as_str(), settings.wait_timeout)
                    .await
                    .ok_or_else(|| {
                        unavailable(PoolError::Timeout(deadpool_postgres::TimeoutType::Wait))
                    })?;
                let mut timeouts = pool.timeouts();
                timeouts.wait = Some(settings.wait_timeout.saturating_sub(started.elapsed()));
                (
                    pool.timeout_get(&timeouts).await.map_err(unavailable)?,
                    Some(slot),
                )
            }
        };
        if let Some(setting) = self.table.map().tenant_setting() {
            // Session-wide, and set at every checkout: the previous user's tenant
            // never survives into this one.
            client
                .execute(
                    "SELECT set_config($1, $2, false)",
                    &[&setting, &self.tenant.as_str()],
                )
                .await
                .map_err(|e| self.query_error_on(shard, e))?;
        }
        Ok(TenantClient {
            client,
            _slot: slot,
        })
    }

    /// Opens a write transaction that declares this handle's map version (which
    /// the fence on the shards checks) and takes the tenant lock as asked.
    async fn begin(&self, shard: ShardIndex, lock: TenantLock) -> Result<Side, DbError> {
        let client = self.checkout(shard).await?;
        let lock = match lock {
            TenantLock::None => String::new(),
            TenantLock::Exclusive => format!(
                "; SELECT pg_advisory_xact_lock({})",
                move_lock_key(&self.tenant)
            ),
        };
        // One round trip; version and key are our own integers, never client input.
        client
            .batch_execute(&format!(
                "BEGIN; SET LOCAL {VERSION_SETTING} = '{}'{lock}",
                self.map_version()
            ))
            .await
            .map_err(|e| self.query_error_on(shard, e))?;
        Ok(Side { shard, client })
    }
}

/// The tenant lock a write transaction takes on its first shard.
///
/// A moving tenant's dual writers, and a move's backfill and verify, take it on
/// the source, so dual writes keep one order and no batch of the backfill races
/// a writer. Writers of tenants that are not moving take none: it measurably
/// costs throughput (about 10% end to end), and a move instead waits once for
/// writes already in flight on the source before it copies.
#[derive(Clone, Copy)]
enum TenantLock {
    None,
    Exclusive,
}

/// The transaction-local setting through which a write declares its map version.
pub const VERSION_SETTING: &str = "shard_router.map_version";

/// The SQLSTATE the fence raises for a write from a router on too old a map.
pub const FENCE_SQLSTATE: &str = "SRF01";

/// The advisory-lock key that serializes a moving tenant's writes:
/// SipHash-1-3 (keys 0) of `"shard-router:move:" + tenant`, as an `i64`.
pub fn move_lock_key(tenant: &TenantId) -> i64 {
    let mut key = b"shard-router:move:".to_vec();
    key.extend_from_slice(tenant.as_str().as_bytes());
    placement::hash_bytes(&key) as i64
}

impl fmt::Debug for TenantDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantDb")
            .field("tenant", &self.tenant)
            .field("shard", &self.shard())
            .field("map_version", &self.map_version())
            .finish()
    }
}

struct Side {
    shard: ShardIndex,
    client: TenantClient,
}

/// A pooled connection to the tenant's shard; dereferences to the
/// `tokio_postgres` client. Returning it (dropping it) gives the connection back
/// to the pool and the tenant's slot back to its cap.
///
/// ```no_run
/// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
/// let client = db.read().await?;
/// let rows = client
///     .query("SELECT body FROM notes WHERE tenant_id = $1", &[&db.tenant().as_str()])
///     .await
///     .map_err(|e| db.query_error(e))?;
/// drop(client); // back to the pool
/// # Ok(()) }
/// ```
pub struct TenantClient {
    client: Object,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl TenantClient {
    /// Detaches the connection from the pool (it closes when dropped).
    fn discard(self) {
        let _ = Object::take(self.client);
    }
}

impl std::ops::Deref for TenantClient {
    type Target = Object;
    fn deref(&self) -> &Object {
        &self.client
    }
}

impl fmt::Debug for TenantClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantClient").finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriterState {
    Open,
    /// A statement failed; the transactions can only roll back.
    Failed,
    Done,
}

/// A write transaction on the tenant's shard, or on both shards during a move.
///
/// Statements run on the primary (the shard serving reads), then on the
/// secondary. [`commit`](Self::commit) commits the secondary first, then the
/// primary. After any failed statement the writer only rolls back. A writer
/// dropped without `commit` or `rollback` rolls back in the background (or
/// discards its connections outside a runtime).
///
/// ```no_run
/// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
/// let mut w = db.write().await?;
/// let rows = w.query("UPDATE notes SET body = $2 WHERE tenant_id = $1 RETURNING id",
///                    &[&db.tenant().as_str(), &"edited"]).await?;
/// w.commit().await?;
/// # Ok(()) }
/// ```
pub struct TenantWriter {
    db: TenantDb,
    /// Primary first, then the secondary during a move.
    sides: Vec<Side>,
    state: WriterState,
}

impl TenantWriter {
    /// Runs a statement on every side; returns the primary's affected-row count.
    ///
    /// ```no_run
    /// # async fn f(mut w: shard_router::TenantWriter) -> Result<(), shard_router::DbError> {
    /// let n = w.execute("DELETE FROM notes WHERE tenant_id = $1", &[&"acme"]).await?;
    /// # Ok(()) }
    /// ```
    pub async fn execute(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, DbError> {
        self.ensure_open()?;
        let mut primary = 0;
        for i in 0..self.sides.len() {
            let side = &self.sides[i];
            let result = async {
                let statement = side.client.prepare_cached(sql).await?;
                side.client.execute(&statement, params).await
            }
            .await;
            match result {
                Ok(n) if i == 0 => primary = n,
                Ok(_) => {}
                Err(e) => return Err(self.fail(i, e)),
            }
        }
        Ok(primary)
    }

    /// Runs a statement on every side; returns the primary's rows.
    ///
    /// ```no_run
    /// # async fn f(mut w: shard_router::TenantWriter) -> Result<(), shard_router::DbError> {
    /// let rows = w.query("DELETE FROM notes WHERE tenant_id = $1 RETURNING id", &[&"acme"]).await?;
    /// # Ok(()) }
    /// ```
    pub async fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, DbError> {
        self.ensure_open()?;
        let mut primary = Vec::new();
        for i in 0..self.sides.len() {
            let side = &self.sides[i];
            let result = async {
                let statement = side.client.prepare_cached(sql).await?;
                side.client.query(&statement, params).await
            }
            .await;
            match result {
                Ok(rows) if i == 0 => primary = rows,
                Ok(_) => {}
                Err(e) => return Err(self.fail(i, e)),
            }
        }
        Ok(primary)
    }

    fn ensure_open(&self) -> Result<(), DbError> {
        match self.state {
            WriterState::Open => Ok(()),
            WriterState::Failed | WriterState::Done => Err(self.aborted()),
        }
    }

    /// Marks the writer failed after side `i` returned `cause`.
    fn fail(&mut self, i: usize, cause: tokio_postgres::Error) -> DbError {
        self.state = WriterState::Failed;
        let err = self.db.query_error_on(self.sides[i].shard, cause);
        if i > 0 {
            // The primary took the statement and the secondary refused it: the
            // shards would disagree. The write fails, and the move must know.
            self.db
                .table
                .report_move_failure(self.db.tenant.as_str(), err.to_string());
        }
        err
    }

    /// Commits: the secondary first, then the primary.
    ///
    /// Fails with [`DbError::Aborted`] (and rolls back) if a statement failed earlier.
    ///
    /// ```no_run
    /// # async fn f(w: shard_router::TenantWriter) -> Result<(), shard_router::DbError> {
    /// w.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn commit(mut self) -> Result<(), DbError> {
        if self.state != WriterState::Open {
            let err = self.aborted();
            self.finish("ROLLBACK").await?;
            return Err(err);
        }
        self.finish("COMMIT").await
    }

    /// Rolls back on every side.
    ///
    /// ```no_run
    /// # async fn f(w: shard_router::TenantWriter) -> Result<(), shard_router::DbError> {
    /// w.rollback().await?;
    /// # Ok(()) }
    /// ```
    pub async fn rollback(mut self) -> Result<(), DbError> {
        self.finish("ROLLBACK").await
    }

    /// Ends every side's transaction, secondary first.
    async fn finish(&mut self, command: &str) -> Result<(), DbError> {
        self.state = WriterState::Done;
        let mut result = Ok(());
        while let Some(side) = self.sides.pop() {
            if let Err(e) = side.client.batch_execute(command).await {
                // The connection's state is unknown: do not give it back to the pool.
                side.client.discard();
                if result.is_ok() {
                    let err = self.db.query_error_on(side.shard, e);
                    if command == "COMMIT" && self.db.location.reason.is_move() {
                        self.db
                            .table
                            .report_move_failure(self.db.tenant.as_str(), err.to_string());
                    }
                    result = Err(err);
                }
                if command == "COMMIT" {
                    // Do not commit the primary when the secondary could not commit.
                    command_rollback_rest(&mut self.sides).await;
                    break;
                }
            }
        }
        result
    }

    fn aborted(&self) -> DbError {
        DbError::Aborted {
            tenant: self.db.tenant.clone(),
            shard: self.db.shard().to_owned(),
            map_version: self.db.map_version(),
        }
    }
}

async fn command_rollback_rest(sides: &mut Vec<Side>) {
    while let Some(side) = sides.pop() {
        if side.client.batch_execute("ROLLBACK").await.is_err() {
            side.client.discard();
        }
    }
}

impl Drop for TenantWriter {
    fn drop(&mut self) {
        if self.sides.is_empty() {
            return;
        }
        let sides = std::mem::take(&mut self.sides);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let mut sides = sides;
                    command_rollback_rest(&mut sides).await;
                });
            }
            // No runtime to roll back on: closing the connections rolls back.
            Err(_) => sides.into_iter().for_each(|side| {
                side.client.discard();
            }),
        }
    }
}

impl fmt::Debug for TenantWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantWriter")
            .field("tenant", &self.db.tenant)
            .field(
                "shards",
                &self
                    .sides
                    .iter()
                    .map(|s| self.db.shard_name(s.shard))
                    .collect::<Vec<_>>(),
            )
            .field("state", &self.state)
            .finish()
    }
}

/// A database failure while serving a tenant. Carries tenant, shard and map
/// version; converts to a response with [`crate::Rejection`].
///
/// ```
/// # use shard_router::{DbError, Rejection};
/// # fn status(err: &DbError) -> http::StatusCode { Rejection::from(err).status() }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// The shard could not give a connection in time, or cannot be reached. 503.
    #[error(
        "shard {shard} is unavailable for tenant {tenant} (map version {map_version}): {cause}"
    )]
    Unavailable {
        /// The tenant.
        tenant: TenantId,
        /// The shard.
        shard: String,
        /// The map version of the request.
        map_version: u64,
        /// What the pool said: a timeout, or the connection error.
        cause: Box<PoolError>,
    },
    /// A statement failed. 503 if the connection broke, 500 otherwise.
    #[error(
        "query failed on shard {shard} for tenant {tenant} (map version {map_version}): {}",
        crate::migrate::error_text(cause)
    )]
    Query {
        /// The tenant.
        tenant: TenantId,
        /// The shard.
        shard: String,
        /// The map version of the request.
        map_version: u64,
        /// The driver's error; `cause.as_db_error()` gives the SQLSTATE.
        cause: tokio_postgres::Error,
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

impl DbError {
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
            DbError::Unavailable { .. } => true,
            DbError::Query { cause, .. } => {
                self.is_fenced()
                    || cause.is_closed()
                    || std::error::Error::source(cause)
                        .is_some_and(|source| source.is::<std::io::Error>())
            }
            DbError::Aborted { .. } => false,
        }
    }
}
