//! The per-request database handle: [`TenantDb`] and its [`TenantWriter`].
//!
//! A handle captures the routing table when it is made, so every statement of a
//! request goes where the map said when the request began (one request, one map
//! version). Connections are checked out lazily: a request that never calls
//! [`TenantDb::read`] or [`TenantDb::write`] never touches a pool.
//!
//! While a tenant is moving, [`TenantDb::write`] gives a writer that runs each
//! statement on the primary (the shard serving reads) and, at commit, applies
//! the primary's row images to the other shard, under a per-tenant advisory
//! lock taken on both shards (the source's first) and held by each until its
//! own `COMMIT`; the two `COMMIT`s go out together. `DEFAULT now()`,
//! triggers, identity columns and generated ids therefore end identical on both
//! shards.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

pub(crate) mod apply;
mod client;
mod error;
mod reads;
mod row;
mod snapshot;
mod transaction;
mod writer;

#[allow(unused_imports)]
use client::*;
pub use client::{TenantClient, TenantQuery};
pub use error::{DbError, DbErrorKind, DbErrorReport};
pub use row::FromRow;
pub use snapshot::TenantSnapshot;
pub use transaction::TRANSACTION_ATTEMPTS;
pub(crate) use writer::Side;
pub use writer::TenantWriter;
#[allow(unused_imports)]
use writer::*;

use deadpool_postgres::PoolError;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::accounting::Cost;
use crate::map::{Location, MovePhase, Reason, ShardIndex};
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
///     .await?;
/// drop(client);
///
/// // One statement, committed on its own (autocommit, one round trip):
/// db.execute("DELETE FROM notes WHERE tenant_id = $1 AND body = ''", &[&db.tenant().as_str()])
///     .await?;
///
/// // Several statements in one transaction:
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
    /// What replica reads must have replayed (a token the client carried).
    read_after: reads::ReadAfter,
    /// The token of this handle's (and its clones') last committed write, when
    /// the shard has replicas: the layer returns it to the client.
    written: Option<WrittenSlot>,
    /// The request's statements and database time, for its span (set by
    /// the layer when the span is enabled).
    tally: Option<RequestTally>,
    /// The router it came from, for a retried transaction to find a newer map.
    router: Option<crate::ShardRouter>,
}

/// A request's statement count and database time (µs), shared by the
/// handle's clones and read by the layer when the response is ready.
pub(crate) type RequestTally = Arc<[std::sync::atomic::AtomicU64; 2]>;

/// Where a handle and its clones record their last write's token.
pub(crate) type WrittenSlot = Arc<std::sync::Mutex<Option<crate::ReadToken>>>;

impl TenantDb {
    /// The routing table this handle resolved against.
    pub(crate) fn table(&self) -> &RoutingTable {
        &self.table
    }

    pub(crate) fn new(tenant: TenantId, table: Arc<RoutingTable>) -> Self {
        let tenant = table.map().tenant_id(tenant);
        let location = table.map().locate(&tenant);
        let written = table
            .read_replicas(location.shard)
            .map(|_| Arc::new(std::sync::Mutex::new(None)));
        TenantDb {
            tenant,
            table,
            location,
            read_after: reads::ReadAfter::Nothing,
            written,
            tally: None,
            router: None,
        }
    }

    /// This handle, able to find the router's newer maps (for
    /// [`TenantDb::transaction`]).
    pub(crate) fn with_router(mut self, router: &crate::ShardRouter) -> Self {
        self.router = Some(router.clone());
        self
    }

    /// This handle, counting its statements and database time for the
    /// request's span; the tally to read when the request ends.
    pub(crate) fn tallied(mut self) -> (Self, RequestTally) {
        let tally = RequestTally::default();
        self.tally = Some(Arc::clone(&tally));
        (self, tally)
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
    ///     .await?
    ///     .get(0);
    /// # Ok(()) }
    /// ```
    pub async fn read(&self) -> Result<TenantClient, DbError> {
        // Boxed: inline, the replica path's future (a token's wait included)
        // would grow every read's, replicas or not.
        if self.table.read_replicas(self.location.shard).is_some() {
            if let Some(client) = Box::pin(self.replica_read()).await {
                return Ok(client);
            }
        }
        self.checkout(self.location.shard).await
    }

    /// A writer that opens a transaction on the tenant's shard, or on both shards
    /// while the tenant is moving. Apply statements with [`TenantWriter::execute`],
    /// then [`TenantWriter::commit`]; a writer dropped without commit rolls back.
    ///
    /// ```no_run
    /// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
    /// let mut writer = db.write().await?;
    /// // Ids may come from the application or from the database (defaults, identity):
    /// // during a move the other shard receives the row as it was written here.
    /// let id = uuid::Uuid::new_v4();
    /// writer
    ///     .execute("INSERT INTO notes (tenant_id, id, body) VALUES ($1, $2, 'hi')",
    ///              &[&db.tenant().as_str(), &id])
    ///     .await?;
    /// writer.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn write(&self) -> Result<TenantWriter, DbError> {
        let writer = match self.location.reason {
            Reason::Move(route) => {
                let tenant = self.tenant.as_str();
                let reversed = route.phase == MovePhase::Reversed;
                // Every writer of the tenant, on any map version, queues on the
                // source's lock. The primary captures its changed rows; the
                // secondary takes them in replica mode.
                // Both sides open at once; the target's connection may then
                // wait with the writer for the source's lock.
                let (source, target) = tokio::join!(
                    self.begin(route.from, Begin::lock(!reversed, tenant)),
                    self.begin(route.to, Begin::mirror(reversed, tenant))
                );
                let (source, target) = (source?, target?);
                let (primary, secondary) = if reversed {
                    (target, source)
                } else {
                    (source, target)
                };
                TenantWriter {
                    db: self.clone(),
                    primary,
                    secondary: Some(secondary),
                    state: WriterState::Open,
                }
            }
            Reason::Pin | Reason::Ring => TenantWriter {
                db: self.clone(),
                primary: self.begin(self.location.shard, Begin::PLAIN).await?,
                secondary: None,
                state: WriterState::Open,
            },
        };
        Ok(writer)
    }

    /// Wraps a `tokio_postgres` error from a client this handle gave out, adding
    /// tenant, shard and map version, so it converts to the right response.
    ///
    /// ```no_run
    /// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
    /// let client = db.read().await?;
    /// client.raw().execute("SELECT 1", &[]).await.map_err(|e| db.query_error(e))?;
    /// # Ok(()) }
    /// ```
    pub fn query_error(&self, cause: tokio_postgres::Error) -> DbError {
        self.query_error_on(self.location.shard, cause)
    }

    // Cold: kept out of line, the request path's code stays dense in the
    // instruction cache.
    #[cold]
    fn query_error_on(&self, shard: ShardIndex, cause: tokio_postgres::Error) -> DbError {
        if is_fence_refusal(&cause) {
            self.table.load(shard).fence_refused();
        }
        DbError::Query {
            tenant: self.tenant.clone(),
            shard: self.shard_name(shard).to_owned(),
            map_version: self.map_version(),
            cause,
        }
    }

    /// The only row of `rows`, or [`DbError::RowCount`].
    fn one_row(&self, shard: ShardIndex, mut rows: Vec<Row>) -> Result<Row, DbError> {
        match rows.len() {
            1 => Ok(rows.pop().expect("one row")),
            n => Err(self.row_count(shard, "one", n)),
        }
    }

    /// The row of `rows` if there is one, or [`DbError::RowCount`] if more.
    fn at_most_one_row(
        &self,
        shard: ShardIndex,
        mut rows: Vec<Row>,
    ) -> Result<Option<Row>, DbError> {
        match rows.len() {
            0 | 1 => Ok(rows.pop()),
            n => Err(self.row_count(shard, "at most one", n)),
        }
    }

    fn row_count(&self, shard: ShardIndex, expected: &'static str, rows: usize) -> DbError {
        DbError::RowCount {
            tenant: self.tenant.clone(),
            shard: self.shard_name(shard).to_owned(),
            map_version: self.map_version(),
            expected,
            rows,
        }
    }

    /// Runs one write statement in a transaction of its own and commits it.
    /// The statement (prepared once per connection) goes out alone, in
    /// autocommit, as an application without the router would send it: one
    /// message, one round trip. Where the tenant has a fence row on the shard
    /// (it is moving, or moved and a stale router might still write), the
    /// fence refuses an undeclared write and the statement goes again inside
    /// `BEGIN`, the declaration of the handle's map version and `COMMIT`,
    /// pipelined. The fence guarantees of [`TenantDb::write`] hold, and a
    /// moving tenant's write goes through a writer as usual. Returns the
    /// affected-row count.
    ///
    /// ```no_run
    /// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
    /// let n = db
    ///     .execute("DELETE FROM notes WHERE tenant_id = $1 AND id = $2",
    ///              &[&db.tenant().as_str(), &uuid::Uuid::nil()])
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, DbError> {
        Ok(self.write_one(sql, params, false).await?.count())
    }

    /// [`TenantDb::execute`] for a statement with `RETURNING`: its rows.
    ///
    /// ```no_run
    /// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
    /// let rows = db
    ///     .execute_returning("INSERT INTO notes (tenant_id, id, body) VALUES ($1, $2, 'hi') RETURNING created_at",
    ///                        &[&db.tenant().as_str(), &uuid::Uuid::new_v4()])
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn execute_returning(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, DbError> {
        Ok(self.write_one(sql, params, true).await?.rows())
    }

    async fn write_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        rows: bool,
    ) -> Result<Outcome, DbError> {
        // The rare paths (a moving tenant, a fence refusal, a statement that
        // changed nothing) are boxed: inline, their futures made this one,
        // and the handler's that awaits it, kilobytes, copied each time the
        // handler's future moves (the example's POST handler: 10,056 bytes).
        if let Reason::Move(_) = self.location.reason {
            return Box::pin(async {
                let mut writer = self.write().await?;
                let out = writer.statement(sql, params, rows).await?;
                writer.commit().await?;
                Ok(out)
            })
            .await;
        }
        let shard = self.location.shard;
        let client = self.checkout(shard).await?;
        self.write_plain(client, sql, params, rows).await
    }

    /// [`TenantDb::write_one`] for a tenant not moving, on a checked-out client.
    async fn write_plain(
        &self,
        client: TenantClient,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        rows: bool,
    ) -> Result<Outcome, DbError> {
        let shard = client.shard;
        let started = Instant::now();
        let statement = match client.prepare_cached(sql).await {
            Ok(statement) => statement,
            Err(e) => {
                client.count(started, Err::<u64, _>(&e));
                return Err(self.query_error_on(shard, e));
            }
        };
        // First the statement alone, in a transaction of its own: one message,
        // what an application without the router sends. A tenant without a
        // fence row on the shard (every tenant not moving or just moved) needs
        // no declared version. For one with a fence row the trigger refuses an
        // undeclared write (SRF01, nothing written, no transaction left open),
        // and the statement goes again below, declaring the handle's version.
        // The pool's connections default to READ COMMITTED, so the trigger
        // sees a fence raised after the statement took its snapshot.
        // After the statement commits: where a replica must have replayed to
        // show it. Pipelined, so no extra round trip.
        let (result, position) = if self.wants_position() {
            // Boxed: rarely wanted, and large.
            Box::pin(async {
                tokio::join!(
                    run(&client, &statement, params, rows),
                    position_of(&client, true)
                )
            })
            .await
        } else {
            (run(&client, &statement, params, rows).await, None)
        };
        match result {
            Ok(out) => {
                self.wrote(position);
                let checked = if out.is_empty() {
                    // A statement that changed no row fired no fence trigger.
                    Box::pin(async {
                        let min = fence_of(&client, &self.tenant)
                            .await
                            .map_err(|e| self.query_error_on(shard, e))?;
                        self.fenced(shard, min)
                    })
                    .await
                } else {
                    Ok(())
                };
                // Counted as the caller sees it: a fence check that fails
                // fails the write.
                client.count(started, checked.as_ref().map(|()| out.size()));
                checked.map(|()| out)
            }
            // Counted by the declared write, from `started`.
            Err(e) if is_fence_refusal(&e) => {
                Box::pin(self.write_declared(client, &statement, params, rows, started)).await
            }
            Err(e) => {
                client.count(started, Err::<u64, _>(&e));
                Err(self.query_error_on(shard, e))
            }
        }
    }

    /// [`TenantDb::write_plain`] again after the fence refused the statement
    /// alone: in a transaction that declares the handle's map version. One
    /// statement in the counts, from `started` (the refused attempt's).
    async fn write_declared(
        &self,
        client: TenantClient,
        statement: &tokio_postgres::Statement,
        params: &[&(dyn ToSql + Sync)],
        rows: bool,
        started: Instant,
    ) -> Result<Outcome, DbError> {
        let shard = client.shard;
        let mut side = Side {
            shard,
            unbegun: false,
            connector: self.table.connector(shard).clone(),
            client: Some(client),
            clean: false,
        };
        let version = self.map_version();
        let client = side.client();
        // Pipelined: BEGIN, the declaration, the statement and COMMIT all go
        // out before any answer comes back. A failed statement turns the
        // COMMIT into a rollback.
        let result = after_begin(client, version, async {
            let (out, committed, position) = tokio::join!(
                run(client, statement, params, rows),
                client.raw().batch_execute("COMMIT"),
                position_of(client, self.wants_position())
            );
            out.and_then(|out| committed.map(|()| (out, position)))
        })
        .await
        .map(|(out, position)| {
            self.wrote(position);
            out
        });
        let result = match result {
            Ok(out) => {
                drop(side.client.take()); // committed: back to the pool
                if out.is_empty() {
                    // A statement that changed no row fired no fence trigger.
                    self.check_fence_on(shard).await.map(|()| out)
                } else {
                    Ok(out)
                }
            }
            Err(e) => {
                if e.as_db_error().is_some() {
                    side.clean = true; // the server answered: the transaction is over
                    drop(side.client.take());
                }
                Err(self.query_error_on(shard, e))
            }
        };
        // Counted apart from the connection, gone back to the pool by now.
        self.count(shard, started, result.as_ref().map(Outcome::size));
        result
    }

    /// [`TenantWriter::check_fence`] for a statement already committed.
    async fn check_fence_on(&self, shard: ShardIndex) -> Result<(), DbError> {
        let client = self.checkout(shard).await?;
        let min = fence_of(&client, &self.tenant)
            .await
            .map_err(|e| self.query_error_on(shard, e))?;
        self.fenced(shard, min)
    }

    /// [`DbError::Fenced`] if the shard's fence for the tenant is above this handle's map.
    fn fenced(&self, shard: ShardIndex, min_version: Option<i64>) -> Result<(), DbError> {
        match min_version {
            Some(min) if min > self.map_version() as i64 => Err({
                self.table.load(shard).fence_refused();
                DbError::Fenced {
                    tenant: self.tenant.clone(),
                    shard: self.shard_name(shard).to_owned(),
                    map_version: self.map_version(),
                    min_version: min as u64,
                }
            }),
            _ => Ok(()),
        }
    }

    fn shard_name(&self, index: ShardIndex) -> &str {
        self.table.map().shard(index).name()
    }

    /// Counts a statement of this tenant on `shard`, begun at `started`, that
    /// returned or affected `size` rows (or failed), run on no
    /// [`TenantClient`] of its own (those count with [`TenantClient::count`]).
    fn count<E>(&self, shard: ShardIndex, started: Instant, size: Result<u64, &E>) {
        let (rows, errors) = match size {
            Ok(rows) => (rows, 0),
            Err(_) => (0, 1),
        };
        let db_time = started.elapsed();
        self.tally(db_time);
        self.table.load(shard).record(
            self.tenant.as_str(),
            Cost {
                statements: 1,
                rows,
                db_time,
                errors,
                ..Cost::default()
            },
        );
    }

    /// Adds a statement to the request's tally, when its span records one.
    fn tally(&self, db_time: std::time::Duration) {
        if let Some(tally) = &self.tally {
            use std::sync::atomic::Ordering::Relaxed;
            tally[0].fetch_add(1, Relaxed);
            tally[1].fetch_add(db_time.as_micros() as u64, Relaxed);
        }
    }

    /// A connection within the shard's wait: first the tenant's slot (when the
    /// shard caps tenants), then a pooled connection, then the tenant setting
    /// for row-level security (when the map names one).
    async fn checkout(&self, shard: ShardIndex) -> Result<TenantClient, DbError> {
        self.checkout_from(shard, Source::Primary).await
    }

    /// A connection from the shard's pool, its replica-mode pool, or one of
    /// its read replicas' pools.
    async fn checkout_from(
        &self,
        shard: ShardIndex,
        source: Source,
    ) -> Result<TenantClient, DbError> {
        let (pool, limiter) = self.pool_of(shard, source)?;
        let waited = Instant::now();
        // A pool without a per-tenant cap, the common case, inline; the cap's
        // wait boxed: inline, its future would grow every handler's future,
        // which is copied each time it moves.
        let got = match limiter {
            None => pool
                .get()
                .await
                .map(|client| (client, None))
                .map_err(|cause| self.unavailable(shard, cause)),
            Some(limiter) => Box::pin(self.capped_get(shard, pool, limiter, waited)).await,
        };
        let checked_out = Instant::now();
        let pool_wait = checked_out.saturating_duration_since(waited);
        let load = &self.table.loads()[shard.get()];
        // Replica-mode connections apply a move's row images: the move's work,
        // not the tenant's wait.
        let counted = !matches!(source, Source::ReplicaMode);
        let (client, slot) = match got {
            Ok(got) => got,
            Err(e) => {
                if counted {
                    let failed = Cost {
                        pool_wait,
                        errors: 1,
                        ..Cost::default()
                    };
                    load.record(self.tenant.as_str(), failed);
                }
                return Err(e);
            }
        };
        if counted {
            load.checkout(pool_wait, false);
        }
        let mut client = TenantClient {
            client,
            _slot: slot,
            held: HoldTimer {
                since: checked_out,
                pool_wait: if counted {
                    pool_wait
                } else {
                    std::time::Duration::ZERO
                },
                spend: Default::default(),
                load: Arc::clone(load),
                tenant: self.tenant.clone(),
            },
            db: self.clone(),
            shard,
            replica: match source {
                Source::ReadReplica(i) => Some(i),
                _ => None,
            },
        };
        if let Some(setting) = self.table.map().tenant_setting() {
            // Session-wide, and set at every checkout: the previous user's
            // tenant never survives into this one.
            Box::pin(client.raw().execute(
                "SELECT set_config($1, $2, false)",
                &[&setting, &self.tenant.as_str()],
            ))
            .await
            .map_err(|e| self.query_error_on(shard, e))?;
            // Held from here, as before the setting (the checkout's work).
            client.held.since = Instant::now();
        }
        Ok(client)
    }

    /// The pool a checkout from `source` takes from, and the per-tenant cap
    /// in front of it, if any.
    fn pool_of(
        &self,
        shard: ShardIndex,
        source: Source,
    ) -> Result<
        (
            &deadpool_postgres::Pool,
            Option<&crate::limit::TenantLimiter>,
        ),
        DbError,
    > {
        Ok(match source {
            Source::ReplicaMode => {
                // Building a pool fails only on a bad configuration, which the
                // shard's own pool would have shown already.
                let pool = self.table.replica_pool(shard).map_err(|reason| {
                    tracing::error!(shard = self.shard_name(shard), %reason, "cannot build the replica-mode pool");
                    self.unavailable(shard, PoolError::Closed)
                })?;
                (pool, None)
            }
            Source::ReadReplica(i) => {
                let replicas = self
                    .table
                    .read_replicas(shard)
                    .ok_or_else(|| self.unavailable(shard, PoolError::Closed))?;
                let replica = &replicas.replicas[i];
                (&replica.pool, replica.limiter.as_deref())
            }
            Source::Primary => (self.table.pool(shard), self.table.limiter(shard)),
        })
    }

    /// A connection behind the shard's per-tenant cap: first the tenant's
    /// slot, then the pool, both within the shard's wait.
    async fn capped_get(
        &self,
        shard: ShardIndex,
        pool: &deadpool_postgres::Pool,
        limiter: &crate::limit::TenantLimiter,
        waited: Instant,
    ) -> Result<
        (
            deadpool_postgres::Object,
            Option<tokio::sync::OwnedSemaphorePermit>,
        ),
        DbError,
    > {
        let wait = self.table.map().shard(shard).pool().wait_timeout;
        let slot = limiter
            .acquire(self.tenant.as_str(), wait)
            .await
            .ok_or_else(|| {
                self.unavailable(
                    shard,
                    PoolError::Timeout(deadpool_postgres::TimeoutType::Wait),
                )
            })?;
        let mut timeouts = pool.timeouts();
        timeouts.wait = Some(wait.saturating_sub(waited.elapsed()));
        let client = pool
            .timeout_get(&timeouts)
            .await
            .map_err(|cause| self.unavailable(shard, cause))?;
        Ok((client, Some(slot)))
    }

    /// [`DbError::Unavailable`]: no connection to `shard` within its wait.
    #[cold]
    fn unavailable(&self, shard: ShardIndex, cause: PoolError) -> DbError {
        DbError::Unavailable {
            tenant: self.tenant.clone(),
            shard: self.shard_name(shard).to_owned(),
            map_version: self.map_version(),
            cause: Box::new(cause),
        }
    }

    /// Opens a write transaction that declares this handle's map version (which
    /// the fence on the shards checks), in one round trip where it can. The
    /// side is dirty until the transaction is open: dropped before that (a
    /// cancelled request, a failed lock), its connection is closed, never
    /// returned to the pool with a transaction open.
    async fn begin(&self, shard: ShardIndex, how: Begin<'_>) -> Result<Side, DbError> {
        let mut side = Side {
            shard,
            unbegun: false,
            connector: self.table.connector(shard).clone(),
            client: Some(
                self.checkout_from(
                    shard,
                    if how.replica {
                        Source::ReplicaMode
                    } else {
                        Source::Primary
                    },
                )
                .await?,
            ),
            clean: false,
        };
        // READ COMMITTED: every statement sees the fence as committed when it
        // starts, whatever the database's default isolation.
        if how.lazy() {
            side.unbegun = true;
            side.clean = true;
            return Ok(side);
        }
        // BEGIN, the declaration and the move's settings and lock go out
        // together, all but BEGIN as statements prepared once per connection.
        let client = side.client();
        let version = self.map_version();
        let result = match (how.capture, how.lock) {
            (None, false) => after_begin(client, version, async { Ok(()) }).await,
            (capture, lock) => {
                let sql = if lock {
                    "SELECT set_config('shard_router.capture', $1, true), pg_advisory_xact_lock($2)"
                } else {
                    "SELECT set_config('shard_router.capture', $1, true)"
                };
                match client.prepare_cached(sql).await {
                    Err(e) => Err(e),
                    Ok(statement) => {
                        let key = move_lock_key(&self.tenant);
                        let capture = capture.unwrap_or("");
                        let params: &[&(dyn ToSql + Sync)] =
                            if lock { &[&capture, &key] } else { &[&capture] };
                        after_begin(client, version, client.raw().query(&statement, params))
                            .await
                            .map(|_| ())
                    }
                }
            }
        };
        result.map_err(|e| self.query_error_on(shard, e))?;
        side.clean = true;
        Ok(side)
    }
}

/// Which pool of a shard a connection comes from.
#[derive(Clone, Copy)]
enum Source {
    /// The shard's own pool.
    Primary,
    /// The pool whose connections apply row images in replica mode.
    ReplicaMode,
    /// Read replica `i` of the shard.
    ReadReplica(usize),
}

/// How a write transaction opens on one shard.
#[derive(Clone, Copy)]
struct Begin<'a> {
    /// Take the tenant's move lock (a moving tenant's source).
    lock: bool,
    /// Capture the tenant's changed rows (a moving tenant's primary).
    capture: Option<&'a str>,
    /// Apply row images in replica mode (a moving tenant's secondary).
    replica: bool,
}

impl<'a> Begin<'a> {
    const PLAIN: Begin<'static> = Begin {
        lock: false,
        capture: None,
        replica: false,
    };

    /// A plain transaction's `BEGIN` can wait for its first statement.
    fn lazy(&self) -> bool {
        !self.lock && self.capture.is_none() && !self.replica
    }

    /// The source of a move: locked; the primary unless `reversed`.
    fn lock(primary: bool, tenant: &'a str) -> Self {
        Begin {
            lock: true,
            capture: primary.then_some(tenant),
            replica: !primary,
        }
    }

    /// The target of a move: the primary when `reversed`.
    fn mirror(primary: bool, tenant: &'a str) -> Self {
        Begin {
            lock: false,
            capture: primary.then_some(tenant),
            replica: !primary,
        }
    }
}

/// The statement that declares `version` for the current transaction only:
/// the value carries the transaction's start time, which the fence compares, so
/// a session-wide `SET` left by an earlier transaction does not pass.
pub(crate) fn declare_version_sql(version: u64) -> String {
    format!(
        "SELECT set_config('{VERSION_SETTING}', '{version}@' || extract(epoch FROM now())::text, true)"
    )
}

/// The transaction-local setting through which a write declares its map version.
pub const VERSION_SETTING: &str = "shard_router.map_version";

/// The SQLSTATE the fence raises for a write from a router on too old a map.
pub const FENCE_SQLSTATE: &str = "SRF01";

/// The advisory-lock key that serializes a moving tenant's writes:
/// SipHash-1-3 (keys 0) of `"shard-router:move:" + tenant`, as an `i64`.
pub fn move_lock_key(tenant: &TenantId) -> i64 {
    crate::pg::lock_keys::tenant_move(tenant)
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
