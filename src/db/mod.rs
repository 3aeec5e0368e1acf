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
mod reads;
mod snapshot;

pub use snapshot::TenantSnapshot;

use deadpool_postgres::{Object, PoolError};
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
}

/// A request's statement count and database time (µs), shared by the
/// handle's clones and read by the layer when the response is ready.
pub(crate) type RequestTally = Arc<[std::sync::atomic::AtomicU64; 2]>;

/// Where a handle and its clones record their last write's token.
pub(crate) type WrittenSlot = Arc<std::sync::Mutex<Option<crate::ReadToken>>>;

impl TenantDb {
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
        }
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
        if let Some(client) = self.replica_read().await {
            return Ok(client);
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
        if let Reason::Move(_) = self.location.reason {
            let mut writer = self.write().await?;
            let out = writer.statement(sql, params, rows).await?;
            writer.commit().await?;
            return Ok(out);
        }
        let shard = self.location.shard;
        let client = self.checkout(shard).await?;
        let started = Instant::now();
        let result = self.write_plain(client, sql, params, rows).await;
        self.count(shard, started, result.as_ref().map(Outcome::size));
        result
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
        let statement = client
            .prepare_cached(sql)
            .await
            .map_err(|e| self.query_error_on(shard, e))?;
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
        let (result, position) = tokio::join!(
            run(&client, &statement, params, rows),
            position_of(&client, self.wants_position())
        );
        match result {
            Ok(out) => {
                self.wrote(position);
                if out.is_empty() {
                    // A statement that changed no row fired no fence trigger.
                    let min = fence_of(&client, &self.tenant)
                        .await
                        .map_err(|e| self.query_error_on(shard, e))?;
                    self.fenced(shard, min)?;
                }
                return Ok(out);
            }
            Err(e) if is_fence_refusal(&e) => {}
            Err(e) => return Err(self.query_error_on(shard, e)),
        }
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
                run(client, &statement, params, rows),
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
        if let Ok(out) = &result {
            drop(side.client.take()); // committed: back to the pool
            if out.is_empty() {
                // A statement that changed no row fired no fence trigger.
                self.check_fence_on(shard).await?;
            }
        } else if let Err(e) = &result {
            if e.as_db_error().is_some() {
                side.clean = true; // the server answered: the transaction is over
                drop(side.client.take());
            }
        }
        result.map_err(|e| self.query_error_on(shard, e))
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
    /// returned or affected `size` rows (or failed).
    fn count<E>(&self, shard: ShardIndex, started: Instant, size: Result<u64, &E>) {
        let (rows, errors) = match size {
            Ok(rows) => (rows, 0),
            Err(_) => (0, 1),
        };
        let db_time = started.elapsed();
        if let Some(tally) = &self.tally {
            use std::sync::atomic::Ordering::Relaxed;
            tally[0].fetch_add(1, Relaxed);
            tally[1].fetch_add(db_time.as_micros() as u64, Relaxed);
        }
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
        let settings = self.table.map().shard(shard).pool();
        let unavailable = |cause: PoolError| DbError::Unavailable {
            tenant: self.tenant.clone(),
            shard: self.shard_name(shard).to_owned(),
            map_version: self.map_version(),
            cause: Box::new(cause),
        };
        let (pool, limiter) = match source {
            Source::ReplicaMode => {
                // Building a pool fails only on a bad configuration, which the
                // shard's own pool would have shown already.
                let pool = self.table.replica_pool(shard).map_err(|reason| {
                    tracing::error!(shard = self.shard_name(shard), %reason, "cannot build the replica-mode pool");
                    unavailable(PoolError::Closed)
                })?;
                (pool, None)
            }
            Source::ReadReplica(i) => {
                let replicas = self
                    .table
                    .read_replicas(shard)
                    .ok_or_else(|| unavailable(PoolError::Closed))?;
                (&replicas.replicas[i].pool, None)
            }
            Source::Primary => (self.table.pool(shard), self.table.limiter(shard)),
        };
        let waited = Instant::now();
        let got = async {
            Ok(match limiter {
                None => (pool.get().await.map_err(unavailable)?, None),
                Some(limiter) => {
                    let slot = limiter
                        .acquire(self.tenant.as_str(), settings.wait_timeout)
                        .await
                        .ok_or_else(|| {
                            unavailable(PoolError::Timeout(deadpool_postgres::TimeoutType::Wait))
                        })?;
                    let mut timeouts = pool.timeouts();
                    timeouts.wait = Some(settings.wait_timeout.saturating_sub(waited.elapsed()));
                    (
                        pool.timeout_get(&timeouts).await.map_err(unavailable)?,
                        Some(slot),
                    )
                }
            })
        }
        .await;
        if !matches!(source, Source::ReplicaMode) {
            self.table.load(shard).record(
                self.tenant.as_str(),
                Cost {
                    pool_wait: waited.elapsed(),
                    errors: u64::from(got.is_err()),
                    ..Cost::default()
                },
            );
        }
        let (client, slot) = got?;
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
            _held: HoldTimer {
                since: Instant::now(),
                load: Arc::clone(&self.table.loads()[shard.get()]),
                tenant: self.tenant.clone(),
            },
            db: self.clone(),
            shard,
            replica: match source {
                Source::ReadReplica(i) => Some(i),
                _ => None,
            },
        })
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

/// One shard's write transaction. Its connection goes back to the pool only
/// after a clean `COMMIT` or `ROLLBACK`; dropped with a statement in flight (a
/// cancelled request) it is closed, which ends the transaction on the server
/// and releases any lock it held.
struct Side {
    shard: ShardIndex,
    /// `BEGIN` (with the handle's map version) is not sent yet: it goes out
    /// with the first statement, in the same round trip. Until then the
    /// connection has no transaction open.
    unbegun: bool,
    /// For a cancel request over the same TLS as the connection.
    connector: crate::pg::Connector,
    client: Option<TenantClient>,
    /// No statement in flight, and the transaction state known.
    clean: bool,
}

impl Side {
    fn client(&self) -> &TenantClient {
        self.client
            .as_ref()
            .expect("a side keeps its client until it ends")
    }

    /// Runs `command` (`COMMIT` or `ROLLBACK`); the connection returns to the
    /// pool only if it succeeded.
    async fn end(mut self, command: &str) -> Result<(), tokio_postgres::Error> {
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
    async fn commit(
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
    client: Object,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Counts the connection's hold time for its tenant when it goes back.
    _held: HoldTimer,
    /// Who and where, for errors.
    db: TenantDb,
    shard: ShardIndex,
    /// The read replica it is connected to, if not the shard's primary.
    replica: Option<usize>,
}

/// Records how long a checked-out connection was held, when dropped.
#[derive(Debug)]
struct HoldTimer {
    since: Instant,
    load: Arc<crate::accounting::ShardLoad>,
    tenant: TenantId,
}

impl Drop for HoldTimer {
    fn drop(&mut self) {
        self.load
            .record_hold(self.tenant.as_str(), self.since.elapsed());
    }
}

impl TenantClient {
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
        self.db
            .count(self.shard, started, result.as_ref().map(|r| r.len() as u64));
        result.map_err(|e| self.db.query_error_on(self.shard, e))
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
        self.db.count(self.shard, started, result.as_ref().copied());
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
    fn discard(self) {
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

/// What a statement gave back.
enum Outcome {
    Count(u64),
    Rows(Vec<Row>),
}

impl Outcome {
    /// The count asked for (or the number of rows returned).
    fn count(self) -> u64 {
        match self {
            Outcome::Count(n) => n,
            Outcome::Rows(rows) => rows.len() as u64,
        }
    }

    /// The rows asked for (none when a count was asked for).
    fn rows(self) -> Vec<Row> {
        match self {
            Outcome::Rows(rows) => rows,
            Outcome::Count(_) => Vec::new(),
        }
    }

    /// Rows returned or affected.
    fn size(&self) -> u64 {
        match self {
            Outcome::Count(n) => *n,
            Outcome::Rows(rows) => rows.len() as u64,
        }
    }

    /// It changed or returned no row.
    fn is_empty(&self) -> bool {
        match self {
            Outcome::Count(n) => *n == 0,
            Outcome::Rows(rows) => rows.is_empty(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriterState {
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
    db: TenantDb,
    primary: Side,
    /// The other shard of a move.
    secondary: Option<Side>,
    state: WriterState,
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
    async fn statement(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        rows: bool,
    ) -> Result<Outcome, DbError> {
        self.ensure_open()?;
        let started = Instant::now();
        let shard = self.primary.shard;
        let result = self.statement_counted(sql, params, rows).await;
        self.db
            .count(shard, started, result.as_ref().map(Outcome::size));
        result
    }

    async fn statement_counted(
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

    fn ensure_open(&self) -> Result<(), DbError> {
        match self.state {
            WriterState::Open => Ok(()),
            WriterState::Failed => Err(self.aborted()),
        }
    }

    /// Marks the writer failed after the primary returned `cause`.
    fn fail(&mut self, cause: tokio_postgres::Error) -> DbError {
        self.state = WriterState::Failed;
        self.db.query_error_on(self.primary.shard, cause)
    }

    /// A statement that changed no row fires no row trigger, so the fence never
    /// saw it: a router on an old map would be told that an UPDATE or DELETE of a
    /// moved tenant's purged rows succeeded. Check the fence row directly.
    async fn check_fence(&mut self) -> Result<(), DbError> {
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
        // 1. The primary's captured row images, in the order they changed.
        //    When the primary is the target (reversed), the target's tenant
        //    lock goes out with the drain: see 3.
        self.primary.clean = false;
        let images = drain(self.primary.client(), reversed.then_some(key)).await;
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
    fn primary_side(&mut self) -> Side {
        Side {
            shard: self.primary.shard,
            unbegun: std::mem::take(&mut self.primary.unbegun),
            connector: self.primary.connector.clone(),
            client: self.primary.client.take(),
            clean: self.primary.clean,
        }
    }

    fn aborted(&self) -> DbError {
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
const DECLARE_SQL: &str = "SELECT set_config('shard_router.map_version', \
     $1::text || '@' || extract(epoch FROM now())::text, true)";

/// Sends `BEGIN` and the declaration of `version` ahead of `then`, pipelined:
/// nothing waits for an answer in between.
async fn after_begin<T>(
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
async fn position_of(client: &TenantClient, wanted: bool) -> Option<crate::replicas::Lsn> {
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
fn is_fence_refusal(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|db| db.code().code() == FENCE_SQLSTATE)
}

/// Runs a prepared statement for its rows, or for the count of rows it changed.
async fn run(
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
async fn fence_of(
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

/// Takes the transaction's captured row images off the primary, as one JSON array.
const DRAIN_SQL: &str = "WITH d AS (DELETE FROM shard_router_capture WHERE xid = pg_current_xact_id() \
     RETURNING seq, tbl, op, old, new) \
     SELECT coalesce(jsonb_agg(jsonb_build_object('t', tbl::text, 'op', op, 'old', old, 'new', new) \
     ORDER BY seq)::text, '[]') FROM d";

/// The tenant lock some sides take before their first move statement.
const LOCK_SQL: &str = "SELECT pg_advisory_xact_lock($1)";

/// Runs the transaction's deferred constraint checks now.
const CONSTRAINTS_NOW_SQL: &str = "SET CONSTRAINTS ALL IMMEDIATE";

/// The primary's captured row images of this transaction, removed from the
/// capture table; with `lock`, the tenant lock is taken first, in the same
/// round trip. Deferred constraints (Django's `DEFERRABLE INITIALLY DEFERRED`
/// foreign keys, deferrable unique keys, constraint triggers) are checked on
/// the primary first, in that round trip too: a write the primary refuses is
/// refused before any image reaches the other shard, whose replica mode would
/// skip those checks (the model's `constraints_before_images`).
async fn drain(
    client: &TenantClient,
    lock: Option<i64>,
) -> Result<Vec<apply::Image>, tokio_postgres::Error> {
    let drain = client.prepare_cached(DRAIN_SQL).await?;
    let immediate = client.prepare_cached(CONSTRAINTS_NOW_SQL).await?;
    let images = match lock {
        None => {
            let (checked, images) = tokio::join!(
                client.raw().execute(&immediate, &[]),
                client.raw().query_one(&drain, &[])
            );
            checked?;
            images?
        }
        Some(key) => {
            let lock = client.prepare_cached(LOCK_SQL).await?;
            let key: [&(dyn ToSql + Sync); 1] = [&key];
            let (checked, locked, images) = tokio::join!(
                client.raw().execute(&immediate, &[]),
                client.raw().execute(&lock, &key),
                client.raw().query_one(&drain, &[])
            );
            checked?;
            locked?;
            images?
        }
    };
    let images: String = images.get(0);
    Ok(if images == "[]" {
        Vec::new()
    } else {
        serde_json::from_str(&images).expect("the drain returns a JSON array of images")
    })
}

/// Applies `images` on `side` (the secondary) in one round trip, after taking
/// the tenant lock `lock` when given. Statements are prepared first (cached
/// per connection): an unprepared one would send its Execute only after its
/// Parse came back, and the next would overtake it.
async fn apply_images(
    db: &TenantDb,
    side: &mut Side,
    column: &str,
    images: &[apply::Image],
    lock: Option<i64>,
) -> Result<(), tokio_postgres::Error> {
    side.clean = false;
    let client = side.client();
    let statements =
        apply::statements(&db.table.appliers, side.shard, client, column, images).await?;
    let mut prepared = Vec::with_capacity(statements.len());
    for (sql, param) in &statements {
        prepared.push((client.prepare_cached(sql).await?, param));
    }
    let lock_statement = match lock {
        Some(_) => Some(client.prepare_cached(LOCK_SQL).await?),
        None => None,
    };
    let params: Vec<[&(dyn ToSql + Sync); 1]> = prepared
        .iter()
        .map(|(_, param)| [*param as &(dyn ToSql + Sync)])
        .collect();
    let key = lock.unwrap_or_default();
    let key_param: [&(dyn ToSql + Sync); 1] = [&key];
    // Futures of one client are sent in the order they are first polled:
    // join_all polls the lock first.
    let locked = lock_statement
        .iter()
        .map(|statement| client.raw().execute(statement, &key_param));
    let applies = prepared
        .iter()
        .zip(&params)
        .map(|((statement, _), param)| client.raw().execute(statement, param));
    let result = futures_util::future::join_all(locked.chain(applies))
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map(|_| ());
    side.clean = true;
    result
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_declarations_name_the_version_setting() {
        assert!(DECLARE_SQL.contains(&format!("'{VERSION_SETTING}'")));
        assert!(declare_version_sql(7).contains(&format!("'{VERSION_SETTING}'")));
    }
}
