//! Read clients: a pooled connection on the tenant's shard (or one of its
//! replicas), and [`TenantQuery`], what every handle that runs statements has.

use super::*;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use deadpool_postgres::Object;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::map::ShardIndex;
use crate::TenantId;

/// A pooled connection to the tenant's shard. Returning it (dropping it) gives
/// the connection back to the pool and the tenant's slot back to its cap.
///
/// [`query`](Self::query), [`query_one`](Self::query_one),
/// [`query_opt`](Self::query_opt) and [`execute`](Self::execute) prepare each
/// statement once per connection and reuse it (the fast path: one round trip,
/// no parsing or planning by the server after the first time), and return
/// [`DbError`] with tenant, shard and map version. For SQL built at run time,
/// which would fill the cache with one-off statements, use
/// [`raw`](Self::raw): the `tokio_postgres` client itself. The client also
/// dereferences to deadpool's connection, for `COPY` and the rest of the
/// driver; several reads in one snapshot are [`TenantDb::snapshot`].
///
/// ```no_run
/// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
/// let client = db.read().await?;
/// let rows = client
///     .query("SELECT body FROM notes WHERE tenant_id = $1", &[&db.tenant().as_str()])
///     .await?;
/// drop(client); // back to the pool
/// # Ok(()) }
/// ```
pub struct TenantClient {
    pub(super) client: Object,
    pub(super) _slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Charges the connection's wait, statements and hold time to its
    /// tenant when it goes back.
    pub(super) held: HoldTimer,
    /// Who and where, for errors.
    pub(super) db: TenantDb,
    pub(super) shard: ShardIndex,
    /// The read replica it is connected to, if not the shard's primary.
    pub(super) replica: Option<usize>,
}

/// Charges a checked-out connection's cost to its tenant when dropped: its
/// wait for the pool, its statements, and how long it was held.
#[derive(Debug)]
pub(super) struct HoldTimer {
    pub(super) since: Instant,
    pub(super) pool_wait: std::time::Duration,
    pub(super) spend: crate::accounting::Spend,
    pub(super) load: Arc<crate::accounting::ShardLoad>,
    pub(super) tenant: TenantId,
}

impl Drop for HoldTimer {
    fn drop(&mut self) {
        let cost = crate::accounting::Cost {
            pool_wait: self.pool_wait,
            held: self.since.elapsed(),
            ..self.spend.cost()
        };
        self.load.charge(self.tenant.as_str(), cost);
    }
}

impl TenantClient {
    /// Counts a statement run on this connection, begun at `started`, that
    /// returned or affected `size` rows (or failed): in the shard's counters
    /// and the request's tally now, for its tenant when the connection goes
    /// back.
    pub(super) fn count<E>(&self, started: Instant, size: Result<u64, &E>) {
        let db_time = started.elapsed();
        self.db.tally(db_time);
        self.held.load.statement(size.is_err());
        self.held
            .spend
            .statement(*size.as_ref().unwrap_or(&0), db_time, size.is_err());
    }

    /// Runs a statement (prepared once per connection) and returns its rows.
    ///
    /// ```no_run
    /// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
    /// let rows = db.read().await?
    ///     .query("SELECT id, body FROM notes WHERE tenant_id = $1", &[&db.tenant().as_str()])
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, DbError> {
        let started = Instant::now();
        let result = async {
            let statement = self.client.prepare_cached(sql).await?;
            self.client.query(&statement, params).await
        }
        .await;
        self.count(started, result.as_ref().map(|r| r.len() as u64));
        result.map_err(|e| self.db.query_error_on(self.shard, e))
    }

    /// Runs a statement and builds a `T` from each row ([`FromRow`]).
    ///
    /// ```no_run
    /// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
    /// let notes: Vec<(uuid::Uuid, String)> = db.read().await?
    ///     .query_as("SELECT id, body FROM notes WHERE tenant_id = $1", &[&db.tenant().as_str()])
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn query_as<T: FromRow>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<T>, DbError> {
        let rows = self.query(sql, params).await?;
        row::all(&rows).map_err(|e| self.db.query_error_on(self.shard, e))
    }

    /// Runs a statement that returns exactly one row, as a `T`; none, or more
    /// than one, is [`DbError::RowCount`].
    ///
    /// ```no_run
    /// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
    /// let (count,): (i64,) = db.read().await?
    ///     .query_one_as("SELECT count(*) FROM notes WHERE tenant_id = $1", &[&db.tenant().as_str()])
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn query_one_as<T: FromRow>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<T, DbError> {
        let row = self.query_one(sql, params).await?;
        T::from_row(&row).map_err(|e| self.db.query_error_on(self.shard, e))
    }

    /// Runs a statement that returns at most one row, as a `T`; more than
    /// one is [`DbError::RowCount`].
    ///
    /// ```no_run
    /// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
    /// let body: Option<(String,)> = db.read().await?
    ///     .query_opt_as("SELECT body FROM notes WHERE tenant_id = $1 AND id = $2",
    ///                   &[&db.tenant().as_str(), &uuid::Uuid::nil()])
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn query_opt_as<T: FromRow>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<T>, DbError> {
        let row = self.query_opt(sql, params).await?;
        row.map(|row| T::from_row(&row))
            .transpose()
            .map_err(|e| self.db.query_error_on(self.shard, e))
    }

    /// Runs a statement that returns exactly one row; none, or more than one,
    /// is [`DbError::RowCount`].
    ///
    /// ```no_run
    /// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
    /// let count: i64 = db.read().await?
    ///     .query_one("SELECT count(*) FROM notes WHERE tenant_id = $1", &[&db.tenant().as_str()])
    ///     .await?
    ///     .get(0);
    /// # Ok(()) }
    /// ```
    pub async fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, DbError> {
        let rows = self.query(sql, params).await?;
        self.db.one_row(self.shard, rows)
    }

    /// Runs a statement that returns at most one row; more than one is
    /// [`DbError::RowCount`].
    ///
    /// ```no_run
    /// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
    /// let note = db.read().await?
    ///     .query_opt("SELECT body FROM notes WHERE tenant_id = $1 AND id = $2",
    ///                &[&db.tenant().as_str(), &uuid::Uuid::nil()])
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, DbError> {
        let rows = self.query(sql, params).await?;
        self.db.at_most_one_row(self.shard, rows)
    }

    /// Runs a statement (prepared once per connection) and returns the number
    /// of rows it affected. Writes belong in [`TenantDb::write`] or
    /// [`TenantDb::execute`], which the move fence protects.
    ///
    /// ```no_run
    /// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
    /// db.read().await?.execute("SELECT pg_notify('notes', $1)", &[&db.tenant().as_str()]).await?;
    /// # Ok(()) }
    /// ```
    pub async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, DbError> {
        let started = Instant::now();
        let result = async {
            let statement = self.client.prepare_cached(sql).await?;
            self.client.execute(&statement, params).await
        }
        .await;
        self.count(started, result.as_ref().copied());
        result.map_err(|e| self.db.query_error_on(self.shard, e))
    }

    /// The `tokio_postgres` client, without the statement cache: for SQL built
    /// at run time. Wrap its errors with [`TenantDb::query_error`].
    ///
    /// ```no_run
    /// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
    /// let client = db.read().await?;
    /// let column = "body"; // chosen from a fixed list, never from user input
    /// let sql = format!("SELECT {column} FROM notes WHERE tenant_id = $1");
    /// let rows = client.raw().query(&sql, &[&db.tenant().as_str()]).await
    ///     .map_err(|e| db.query_error(e))?;
    /// # Ok(()) }
    /// ```
    pub fn raw(&self) -> &tokio_postgres::Client {
        &self.client
    }

    /// Detaches the connection from the pool (it closes when dropped).
    pub(super) fn discard(self) {
        let _ = Object::take(self.client);
    }
}

/// What a read client and a writer have in common, in the style of
/// tokio-postgres's `GenericClient`: one query helper can serve both.
/// Statements are prepared once per connection; errors are [`DbError`].
///
/// ```no_run
/// use shard_router::{DbError, TenantDb, TenantQuery};
///
/// /// Works on a read client and inside a write transaction alike.
/// async fn note_count(q: &mut impl TenantQuery, tenant: &str) -> Result<i64, DbError> {
///     Ok(q.query_one("SELECT count(*) FROM notes WHERE tenant_id = $1", &[&tenant]).await?.get(0))
/// }
///
/// # async fn f(db: TenantDb) -> Result<(), DbError> {
/// let before = note_count(&mut db.read().await?, db.tenant().as_str()).await?;
/// let mut writer = db.write().await?;
/// writer.execute("DELETE FROM notes WHERE tenant_id = $1", &[&db.tenant().as_str()]).await?;
/// assert_eq!(note_count(&mut writer, db.tenant().as_str()).await?, 0);
/// writer.commit().await?;
/// # let _ = before; Ok(()) }
/// ```
pub trait TenantQuery {
    /// Runs a statement and returns its rows.
    fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl std::future::Future<Output = Result<Vec<Row>, DbError>> + Send;

    /// Runs a statement that returns exactly one row.
    fn query_one(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl std::future::Future<Output = Result<Row, DbError>> + Send;

    /// Runs a statement that returns at most one row.
    fn query_opt(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl std::future::Future<Output = Result<Option<Row>, DbError>> + Send;

    /// Runs a statement and returns the number of rows it affected.
    fn execute(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl std::future::Future<Output = Result<u64, DbError>> + Send;
}

impl TenantQuery for TenantClient {
    async fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, DbError> {
        TenantClient::query(self, sql, params).await
    }
    async fn query_one(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, DbError> {
        TenantClient::query_one(self, sql, params).await
    }
    async fn query_opt(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, DbError> {
        TenantClient::query_opt(self, sql, params).await
    }
    async fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, DbError> {
        TenantClient::execute(self, sql, params).await
    }
}

impl TenantQuery for TenantWriter {
    async fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, DbError> {
        TenantWriter::query(self, sql, params).await
    }
    async fn query_one(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, DbError> {
        TenantWriter::query_one(self, sql, params).await
    }
    async fn query_opt(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, DbError> {
        TenantWriter::query_opt(self, sql, params).await
    }
    async fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, DbError> {
        TenantWriter::execute(self, sql, params).await
    }
}

impl std::ops::Deref for TenantClient {
    type Target = Object;
    fn deref(&self) -> &Object {
        &self.client
    }
}

/// For the driver's own transactions (`build_transaction()`), with settings
/// [`TenantDb::snapshot`] does not choose.
impl std::ops::DerefMut for TenantClient {
    fn deref_mut(&mut self) -> &mut Object {
        &mut self.client
    }
}

impl fmt::Debug for TenantClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantClient").finish_non_exhaustive()
    }
}
