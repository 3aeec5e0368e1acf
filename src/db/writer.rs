//! A tenant's write transaction. During a move it follows the moving write's
//! protocol, whose steps (drain the primary's captured row images, apply them
//! on the other shard, chain the write) live beside the move in
//! `crate::moves::dual_write`; this file holds the transaction's two sides
//! and their commits.

use super::*;
use std::fmt;
use std::time::Instant;

use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::map::ShardIndex;
use crate::moves::dual_write::{apply_images, drain, write_token};
use crate::TenantId;

/// One shard's write transaction. Its connection goes back to the pool only
/// after a clean `COMMIT` or `ROLLBACK`; dropped with a statement in flight (a
/// cancelled request) it is closed, which ends the transaction on the server
/// and releases any lock it held.
pub(crate) struct Side {
    pub(crate) shard: ShardIndex,
    /// `BEGIN` (with the handle's map version) is not sent yet: it goes out
    /// with the first statement, in the same round trip. Until then the
    /// connection has no transaction open.
    pub(crate) unbegun: bool,
    /// For a cancel request over the same TLS as the connection.
    pub(crate) connector: crate::pg::Connector,
    pub(crate) client: Option<TenantClient>,
    /// No statement in flight, and the transaction state known.
    pub(crate) clean: bool,
}

impl Side {
    pub(crate) fn client(&self) -> &TenantClient {
        self.client
            .as_ref()
            .expect("a side keeps its client until it ends")
    }

    /// Runs `command` (`COMMIT` or `ROLLBACK`); the connection returns to the
    /// pool only if it succeeded.
    pub(crate) async fn end(mut self, command: &str) -> Result<(), tokio_postgres::Error> {
        if self.unbegun {
            drop(self.client.take()); // nothing began: back to the pool as it is
            return Ok(());
        }
        self.clean = false;
        let result = self.client().batch_execute(command).await;
        if result.is_ok() {
            self.clean = true;
            drop(self.client.take()); // back to the pool, no transaction open
        }
        result
    }
}

impl Side {
    /// Commits; with `position`, also reads the WAL position after the
    /// commit (pipelined) for a read-your-writes token.
    pub(crate) async fn commit(
        mut self,
        position: bool,
    ) -> Result<Option<crate::replicas::Lsn>, tokio_postgres::Error> {
        if !position || self.unbegun {
            return self.end("COMMIT").await.map(|()| None);
        }
        self.clean = false;
        let client = self.client();
        let (committed, position) =
            tokio::join!(client.batch_execute("COMMIT"), position_of(client, true));
        committed?;
        self.clean = true;
        drop(self.client.take()); // back to the pool, no transaction open
        Ok(position)
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        if self.unbegun {
            return; // no transaction was begun: the connection goes back as it is
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if self.clean => {
                runtime.spawn(async move {
                    if client.batch_execute("ROLLBACK").await.is_err() {
                        client.discard();
                    }
                });
            }
            // A statement was in flight: the server would run it to its end
            // (holding the tenant lock) before noticing the closed socket, so
            // cancel it, then close the connection, which rolls back.
            Ok(runtime) => {
                let cancel = client.cancel_token();
                client.discard();
                let connector = self.connector.clone();
                runtime.spawn(async move {
                    let _ = cancel.cancel_query(connector).await;
                });
            }
            // No runtime: closing the connection rolls back.
            Err(_) => client.discard(),
        }
    }
}

/// What a statement gave back.
pub(super) enum Outcome {
    Count(u64),
    Rows(Vec<Row>),
}

impl Outcome {
    /// The count asked for (or the number of rows returned).
    pub(super) fn count(self) -> u64 {
        match self {
            Outcome::Count(n) => n,
            Outcome::Rows(rows) => rows.len() as u64,
        }
    }

    /// The rows asked for (none when a count was asked for).
    pub(super) fn rows(self) -> Vec<Row> {
        match self {
            Outcome::Rows(rows) => rows,
            Outcome::Count(_) => Vec::new(),
        }
    }

    /// Rows returned or affected.
    pub(super) fn size(&self) -> u64 {
        match self {
            Outcome::Count(n) => *n,
            Outcome::Rows(rows) => rows.len() as u64,
        }
    }

    /// It changed or returned no row.
    pub(super) fn is_empty(&self) -> bool {
        match self {
            Outcome::Count(n) => *n == 0,
            Outcome::Rows(rows) => rows.is_empty(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WriterState {
    Open,
    /// A statement failed; the transactions can only roll back.
    Failed,
}

/// A write transaction on the tenant's shard, or on both shards during a move.
///
/// Statements run on the primary (the shard serving reads). During a move the
/// primary records the final image of every row they change (after defaults,
/// identity values and triggers), and [`commit`](Self::commit) applies those
/// images to the other shard before committing both, so the two shards hold the
/// same rows whatever the schema generates. Both sides hold the tenant's move
/// lock (the source's taken first) until they commit, and both commit at once.
/// After any failed statement the writer only
/// rolls back; a writer dropped without `commit` or `rollback` rolls back (its
/// connections are closed if a statement was in flight).
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
    pub(super) db: TenantDb,
    pub(super) primary: Side,
    /// The other shard of a move.
    pub(super) secondary: Option<Side>,
    pub(super) state: WriterState,
}

impl TenantWriter {
    /// Runs a statement on the tenant's primary shard; returns the affected-row count.
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
        Ok(self.statement(sql, params, false).await?.count())
    }

    /// Runs a statement on the tenant's primary shard; returns its rows.
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
        Ok(self.statement(sql, params, true).await?.rows())
    }

    /// Runs a statement and builds a `T` from each row ([`FromRow`]).
    ///
    /// ```no_run
    /// # async fn f(db: shard_router::TenantDb, mut w: shard_router::TenantWriter) -> Result<(), shard_router::DbError> {
    /// let notes: Vec<(uuid::Uuid, String)> = w
    ///     .query_as("SELECT id, body FROM notes WHERE tenant_id = $1", &[&db.tenant().as_str()])
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn query_as<T: FromRow>(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<T>, DbError> {
        let rows = self.query(sql, params).await?;
        row::all(&rows).map_err(|e| self.db.query_error_on(self.primary.shard, e))
    }

    /// Runs a statement that returns exactly one row, as a `T`; none, or more
    /// than one, is [`DbError::RowCount`].
    ///
    /// ```no_run
    /// # async fn f(db: shard_router::TenantDb, mut w: shard_router::TenantWriter) -> Result<(), shard_router::DbError> {
    /// let (count,): (i64,) = w
    ///     .query_one_as("SELECT count(*) FROM notes WHERE tenant_id = $1", &[&db.tenant().as_str()])
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn query_one_as<T: FromRow>(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<T, DbError> {
        let row = self.query_one(sql, params).await?;
        T::from_row(&row).map_err(|e| self.db.query_error_on(self.primary.shard, e))
    }

    /// Runs a statement that returns at most one row, as a `T`; more than
    /// one is [`DbError::RowCount`].
    ///
    /// ```no_run
    /// # async fn f(db: shard_router::TenantDb, mut w: shard_router::TenantWriter) -> Result<(), shard_router::DbError> {
    /// let body: Option<(String,)> = w
    ///     .query_opt_as("SELECT body FROM notes WHERE tenant_id = $1 AND id = $2",
    ///                   &[&db.tenant().as_str(), &uuid::Uuid::nil()])
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn query_opt_as<T: FromRow>(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<T>, DbError> {
        let row = self.query_opt(sql, params).await?;
        row.map(|row| T::from_row(&row))
            .transpose()
            .map_err(|e| self.db.query_error_on(self.primary.shard, e))
    }

    /// Runs a statement that returns exactly one row; no row, or more than
    /// one, is [`DbError::RowCount`].
    ///
    /// ```no_run
    /// # async fn f(mut w: shard_router::TenantWriter) -> Result<(), shard_router::DbError> {
    /// let row = w.query_one("UPDATE notes SET body = 'x' WHERE tenant_id = $1 AND id = $2 RETURNING body",
    ///                       &[&"acme", &uuid::Uuid::nil()]).await?;
    /// # Ok(()) }
    /// ```
    pub async fn query_one(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, DbError> {
        let rows = self.query(sql, params).await?;
        self.db.one_row(self.primary.shard, rows)
    }

    /// Runs a statement that returns at most one row; more than one is
    /// [`DbError::RowCount`].
    ///
    /// ```no_run
    /// # async fn f(mut w: shard_router::TenantWriter) -> Result<(), shard_router::DbError> {
    /// let deleted = w.query_opt("DELETE FROM notes WHERE tenant_id = $1 AND id = $2 RETURNING id",
    ///                           &[&"acme", &uuid::Uuid::nil()]).await?;
    /// # Ok(()) }
    /// ```
    pub async fn query_opt(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, DbError> {
        let rows = self.query(sql, params).await?;
        self.db.at_most_one_row(self.primary.shard, rows)
    }

    /// Runs one statement on the primary (prepared once per connection), with
    /// the transaction's `BEGIN` in the same round trip if it is not sent yet.
    pub(super) async fn statement(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        rows: bool,
    ) -> Result<Outcome, DbError> {
        self.ensure_open()?;
        let started = Instant::now();
        let result = self.statement_counted(sql, params, rows).await;
        self.primary
            .client()
            .count(started, result.as_ref().map(Outcome::size));
        result
    }

    pub(super) async fn statement_counted(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        rows: bool,
    ) -> Result<Outcome, DbError> {
        self.primary.clean = false;
        let unbegun = std::mem::take(&mut self.primary.unbegun);
        let version = self.db.map_version();
        let client = self.primary.client();
        let result = async {
            let statement = client.prepare_cached(sql).await?;
            if unbegun {
                after_begin(client, version, run(client, &statement, params, rows)).await
            } else {
                run(client, &statement, params, rows).await
            }
        }
        .await;
        self.primary.clean = true;
        let out = result.map_err(|e| self.fail(e))?;
        if out.is_empty() {
            self.check_fence().await?;
        }
        Ok(out)
    }

    pub(super) fn ensure_open(&self) -> Result<(), DbError> {
        match self.state {
            WriterState::Open => Ok(()),
            WriterState::Failed => Err(self.aborted()),
        }
    }

    /// Marks the writer failed after the primary returned `cause`.
    pub(super) fn fail(&mut self, cause: tokio_postgres::Error) -> DbError {
        self.state = WriterState::Failed;
        self.db.query_error_on(self.primary.shard, cause)
    }

    /// A statement that changed no row fires no row trigger, so the fence never
    /// saw it: a router on an old map would be told that an UPDATE or DELETE of a
    /// moved tenant's purged rows succeeded. Check the fence row directly.
    pub(super) async fn check_fence(&mut self) -> Result<(), DbError> {
        self.primary.clean = false;
        let result = fence_of(self.primary.client(), &self.db.tenant).await;
        self.primary.clean = true;
        let min = result.map_err(|e| self.fail(e))?;
        let refused = self.db.fenced(self.primary.shard, min);
        if refused.is_err() {
            self.state = WriterState::Failed;
        }
        refused
    }

    /// Commits. During a move: the primary's row images go to the secondary,
    /// under the tenant lock on both shards, then both sides commit at once.
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
            self.rollback().await?;
            return Err(err);
        }
        let Some(mut secondary) = self.secondary.take() else {
            let primary = self.primary_side();
            let shard = primary.shard;
            return match primary.commit(self.db.wants_position()).await {
                Ok(position) => {
                    self.db.wrote(position);
                    Ok(())
                }
                Err(e) => Err(self.db.query_error_on(shard, e)),
            };
        };
        let tenant = self.db.tenant.clone();
        let column = self.db.table.map().tenant_column().to_owned();
        let reversed = self.db.location.reason.is_reversed_move();
        let key = move_lock_key(&tenant);
        // The token this write appends to the tenant's write chain on both
        // shards (see `crate::moves::fence`): a COMMIT that lands on one side
        // only leaves the chains different, which verify and complete see.
        let token = write_token();
        // 1. The primary's captured row images, in the order they changed.
        //    When the primary is the target (reversed), the target's tenant
        //    lock goes out with the drain: see 3.
        self.primary.clean = false;
        let images = drain(
            self.primary.client(),
            tenant.as_str(),
            &token,
            reversed.then_some(key),
        )
        .await;
        self.primary.clean = true;
        let images = match images {
            Ok(images) => images,
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                self.state = WriterState::Failed;
                return Err(DbError::MoveNotPrepared {
                    tenant: self.db.tenant.clone(),
                    shard: self.db.shard_name(self.primary.shard).to_owned(),
                    map_version: self.db.map_version(),
                });
            }
            Err(e) => return Err(self.fail(e)),
        };
        // 2. Applied on the secondary, pipelined (with the target's lock first
        //    when the secondary is the target).
        let applied = apply_images(
            &self.db,
            &mut secondary,
            &column,
            &images,
            (!reversed).then_some(key),
            Some((tenant.as_str(), &token)),
        )
        .await;
        if let Err(e) = applied {
            let err = self.db.query_error_on(secondary.shard, e);
            // The write fails and nothing commits; the move hears of it.
            self.db
                .table
                .report_move_failure(tenant.as_str(), err.report().to_string());
            self.state = WriterState::Failed;
            return Err(err);
        }
        // 3. Both sides commit at once, so their WAL flushes overlap instead of
        //    following each other. Each side holds the tenant's move lock until
        //    its own COMMIT (the source's since BEGIN, the target's since 1 or
        //    2), and every taker of both locks (writers, backfill batches,
        //    verify, the removal of copied rows) takes the source's first: so
        //    no one holding them can see one side committed and the other not,
        //    and the next writer's images reach the secondary after these.
        let (primary, primary_shard, secondary_shard) =
            (self.primary_side(), self.primary.shard, secondary.shard);
        let (on_primary, on_secondary) = tokio::join!(
            primary.commit(self.db.wants_position()),
            secondary.end("COMMIT")
        );
        match (on_primary, on_secondary) {
            // The reader's token: the primary, which serves reads, has it.
            (Ok(position), Ok(())) => {
                self.db.wrote(position);
                Ok(())
            }
            (Err(e), Err(_)) => Err(self.db.query_error_on(primary_shard, e)),
            (Err(e), Ok(())) => {
                let err = self.db.query_error_on(primary_shard, e);
                self.db.table.report_move_failure(
                    tenant.as_str(),
                    format!("committed on the secondary only: {}", err.report()),
                );
                Err(err)
            }
            (Ok(_), Err(e)) => {
                let err = self.db.query_error_on(secondary_shard, e);
                self.db.table.report_move_failure(
                    tenant.as_str(),
                    format!("committed on the primary only: {}", err.report()),
                );
                Err(err)
            }
        }
    }

    /// Rolls back on every side.
    ///
    /// ```no_run
    /// # async fn f(w: shard_router::TenantWriter) -> Result<(), shard_router::DbError> {
    /// w.rollback().await?;
    /// # Ok(()) }
    /// ```
    pub async fn rollback(mut self) -> Result<(), DbError> {
        let mut result = Ok(());
        if let Some(secondary) = self.secondary.take() {
            let shard = secondary.shard;
            if let Err(e) = secondary.end("ROLLBACK").await {
                result = Err(self.db.query_error_on(shard, e));
            }
        }
        let primary = self.primary_side();
        let shard = primary.shard;
        if let Err(e) = primary.end("ROLLBACK").await {
            result = result.and(Err(self.db.query_error_on(shard, e)));
        }
        result
    }

    /// Takes the primary out of the writer (which then has nothing left to roll back).
    pub(super) fn primary_side(&mut self) -> Side {
        Side {
            shard: self.primary.shard,
            unbegun: std::mem::take(&mut self.primary.unbegun),
            connector: self.primary.connector.clone(),
            client: self.primary.client.take(),
            clean: self.primary.clean,
        }
    }

    pub(super) fn aborted(&self) -> DbError {
        DbError::Aborted {
            tenant: self.db.tenant.clone(),
            shard: self.db.shard().to_owned(),
            map_version: self.db.map_version(),
        }
    }
}

/// Declares a map version for the current transaction only (in
/// [`VERSION_SETTING`]; a unit test checks they agree), as
/// [`declare_version_sql`] does, as a statement prepared once per connection.
pub(super) const DECLARE_SQL: &str = "SELECT set_config('shard_router.map_version', \
     $1::text || '@' || extract(epoch FROM now())::text, true)";

/// Sends `BEGIN` and the declaration of `version` ahead of `then`, pipelined:
/// nothing waits for an answer in between.
pub(super) async fn after_begin<T>(
    client: &TenantClient,
    version: u64,
    then: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, tokio_postgres::Error> {
    let declare = client.prepare_cached(DECLARE_SQL).await?;
    let version = version.to_string();
    let params: [&(dyn ToSql + Sync); 1] = [&version];
    let (began, declared, out) = tokio::join!(
        client
            .raw()
            .batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED"),
        client.raw().query(&declare, &params),
        then
    );
    began?;
    declared?;
    out
}

/// The primary's WAL position, read on `client` (after whatever it ran
/// before) when `wanted` (the shard has replicas); `None` if not wanted or
/// not readable, which only costs a replica read.
pub(super) async fn position_of(
    client: &TenantClient,
    wanted: bool,
) -> Option<crate::replicas::Lsn> {
    if !wanted {
        return None;
    }
    let statement = client
        .prepare_cached(crate::replicas::POSITION_ON_PRIMARY)
        .await
        .ok()?;
    let row = client.raw().query_one(&statement, &[]).await.ok()?;
    row.get::<_, Option<i64>>(0)
        .map(|lsn| lsn as crate::replicas::Lsn)
}

/// The fence trigger refused the statement.
pub(super) fn is_fence_refusal(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|db| db.code().code() == FENCE_SQLSTATE)
}

/// Runs a prepared statement for its rows, or for the count of rows it changed.
pub(super) async fn run(
    client: &TenantClient,
    statement: &tokio_postgres::Statement,
    params: &[&(dyn ToSql + Sync)],
    rows: bool,
) -> Result<Outcome, tokio_postgres::Error> {
    if rows {
        client
            .raw()
            .query(statement, params)
            .await
            .map(Outcome::Rows)
    } else {
        client
            .raw()
            .execute(statement, params)
            .await
            .map(Outcome::Count)
    }
}

/// The lowest map version the shard's fence accepts for `tenant`, if it has one.
pub(super) async fn fence_of(
    client: &TenantClient,
    tenant: &TenantId,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let installed: Option<i64> = client
        .raw()
        .query_one(
            "SELECT CASE WHEN to_regclass('shard_router_fence') IS NOT NULL THEN 0::bigint END",
            &[],
        )
        .await?
        .get(0);
    if installed.is_none() {
        return Ok(None);
    }
    let row = client
        .raw()
        .query_opt(
            "SELECT min_version FROM shard_router_fence WHERE tenant = $1",
            &[&tenant.as_str()],
        )
        .await?;
    Ok(row.map(|r| r.get::<_, i64>(0)))
}

impl fmt::Debug for TenantWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shards = vec![self.db.shard_name(self.primary.shard)];
        if let Some(secondary) = &self.secondary {
            shards.push(self.db.shard_name(secondary.shard));
        }
        f.debug_struct("TenantWriter")
            .field("tenant", &self.db.tenant)
            .field("shards", &shards)
            .field("state", &self.state)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_declarations_name_the_version_setting() {
        assert!(DECLARE_SQL.contains(&format!("'{VERSION_SETTING}'")));
        assert!(declare_version_sql(7).contains(&format!("'{VERSION_SETTING}'")));
    }
}
