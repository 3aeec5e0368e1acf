//! Several reads in one snapshot: [`TenantSnapshot`].

use std::fmt;

use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::{run, DbError, Outcome, Side, TenantDb, TenantQuery};

/// Opens the snapshot: every statement after it sees the database as of the
/// first one, and none may write.
const BEGIN_SNAPSHOT: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";

/// A read-only transaction on the shard that serves the tenant's reads, in
/// which every statement sees one snapshot (`REPEATABLE READ READ ONLY`): a
/// row and its children read together, a page and its total that agree.
///
/// Made by [`TenantDb::snapshot`]. Its `BEGIN` travels with the first
/// statement, so a snapshot costs no extra round trip; statements are prepared
/// once per connection, as on [`TenantClient`](super::TenantClient). Dropping
/// it ends the transaction (there is nothing to commit);
/// [`finish`](Self::finish) does so without handing the connection to a
/// background task. A write statement is refused by the server
/// (`read_only_sql_transaction`, 25006).
///
/// ```no_run
/// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
/// let id = uuid::Uuid::nil();
/// let mut snap = db.snapshot().await?;
/// let invoice = snap
///     .query_opt("SELECT total FROM invoices WHERE tenant_id = $1 AND id = $2", &[&db.tenant().as_str(), &id])
///     .await?;
/// let lines = snap
///     .query("SELECT amount FROM invoice_lines WHERE tenant_id = $1 AND invoice_id = $2", &[&db.tenant().as_str(), &id])
///     .await?;
/// snap.finish().await?;
/// # let _ = (invoice, lines); Ok(()) }
/// ```
#[must_use = "a snapshot does nothing until queried"]
pub struct TenantSnapshot {
    db: TenantDb,
    side: Side,
}

impl TenantDb {
    /// A read-only transaction in one snapshot on the shard that serves the
    /// tenant's reads: see [`TenantSnapshot`]. Checks out a connection (within
    /// the shard's wait, as [`read`](Self::read) does); the transaction itself
    /// begins with the first statement.
    ///
    /// ```no_run
    /// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
    /// let mut snap = db.snapshot().await?;
    /// let total: i64 = snap
    ///     .query_one("SELECT count(*) FROM notes WHERE tenant_id = $1", &[&db.tenant().as_str()])
    ///     .await?
    ///     .get(0);
    /// let page = snap
    ///     .query("SELECT body FROM notes WHERE tenant_id = $1 ORDER BY created_at LIMIT 20", &[&db.tenant().as_str()])
    ///     .await?;
    /// # let _ = (total, page); Ok(()) }
    /// ```
    pub async fn snapshot(&self) -> Result<TenantSnapshot, DbError> {
        let shard = self.location.shard;
        Ok(TenantSnapshot {
            db: self.clone(),
            side: Side {
                shard,
                unbegun: true,
                connector: self.table.connector(shard).clone(),
                client: Some(self.checkout(shard).await?),
                clean: true,
            },
        })
    }
}

impl TenantSnapshot {
    /// Runs a statement in the snapshot and returns its rows.
    ///
    /// ```no_run
    /// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
    /// let rows = db.snapshot().await?
    ///     .query("SELECT body FROM notes WHERE tenant_id = $1", &[&db.tenant().as_str()])
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, DbError> {
        Ok(self.statement(sql, params, true).await?.rows())
    }

    /// Runs a statement that returns exactly one row; none, or more than one,
    /// is [`DbError::RowCount`].
    ///
    /// ```no_run
    /// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
    /// let n: i64 = db.snapshot().await?
    ///     .query_one("SELECT count(*) FROM notes WHERE tenant_id = $1", &[&db.tenant().as_str()])
    ///     .await?
    ///     .get(0);
    /// # Ok(()) }
    /// ```
    pub async fn query_one(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, DbError> {
        let rows = self.query(sql, params).await?;
        self.db.one_row(self.side.shard, rows)
    }

    /// Runs a statement that returns at most one row; more than one is
    /// [`DbError::RowCount`].
    ///
    /// ```no_run
    /// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
    /// let note = db.snapshot().await?
    ///     .query_opt("SELECT body FROM notes WHERE tenant_id = $1 AND id = $2",
    ///                &[&db.tenant().as_str(), &uuid::Uuid::nil()])
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn query_opt(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, DbError> {
        let rows = self.query(sql, params).await?;
        self.db.at_most_one_row(self.side.shard, rows)
    }

    /// Runs a statement in the snapshot and returns the number of rows it
    /// returned or affected (a write is refused: the snapshot is read-only).
    ///
    /// ```no_run
    /// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
    /// let mut snap = db.snapshot().await?;
    /// snap.execute("SELECT 1", &[]).await?;
    /// # Ok(()) }
    /// ```
    pub async fn execute(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, DbError> {
        Ok(self.statement(sql, params, false).await?.count())
    }

    /// Ends the transaction and returns the connection to the pool.
    ///
    /// ```no_run
    /// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
    /// let mut snap = db.snapshot().await?;
    /// snap.execute("SELECT 1", &[]).await?;
    /// snap.finish().await?;
    /// # Ok(()) }
    /// ```
    pub async fn finish(self) -> Result<(), DbError> {
        let shard = self.side.shard;
        // A read-only transaction has nothing to keep: COMMIT and ROLLBACK
        // do the same, and ROLLBACK also ends one a failed statement aborted.
        self.side
            .end("ROLLBACK")
            .await
            .map_err(|e| self.db.query_error_on(shard, e))
    }

    /// One statement, with the snapshot's `BEGIN` ahead of it in the same
    /// round trip if it is the first.
    async fn statement(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        rows: bool,
    ) -> Result<Outcome, DbError> {
        self.side.clean = false;
        let unbegun = std::mem::take(&mut self.side.unbegun);
        let client = self.side.client();
        let result = async {
            let statement = client.prepare_cached(sql).await?;
            if unbegun {
                let (began, out) = tokio::join!(
                    client.raw().batch_execute(BEGIN_SNAPSHOT),
                    run(client, &statement, params, rows)
                );
                began.and(out)
            } else {
                run(client, &statement, params, rows).await
            }
        }
        .await;
        // Reached only when the server answered: the transaction's state is known.
        self.side.clean = true;
        result.map_err(|e| self.db.query_error_on(self.side.shard, e))
    }
}

impl TenantQuery for TenantSnapshot {
    async fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, DbError> {
        TenantSnapshot::query(self, sql, params).await
    }
    async fn query_one(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, DbError> {
        TenantSnapshot::query_one(self, sql, params).await
    }
    async fn query_opt(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, DbError> {
        TenantSnapshot::query_opt(self, sql, params).await
    }
    async fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, DbError> {
        TenantSnapshot::execute(self, sql, params).await
    }
}

impl fmt::Debug for TenantSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantSnapshot")
            .field("tenant", &self.db.tenant)
            .field("shard", &self.db.shard_name(self.side.shard))
            .finish_non_exhaustive()
    }
}
