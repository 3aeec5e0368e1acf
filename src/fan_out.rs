//! One query on every shard, bounded: [`FanOut`].
//!
//! For background jobs and admin reports that are not about one tenant: count
//! rows per shard, list a shard's tenants, check a migration landed. The work
//! runs on every shard of one map version with at most `concurrency`
//! connections in flight, and stops at a deadline; each shard answers with its
//! own result or its own error, so one shard that is down or slow costs only
//! its own answer.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Object, PoolError};
use futures_util::stream::{self, StreamExt};

use crate::map::ShardIndex;
use crate::router::RoutingTable;
use crate::ShardRouter;

/// A bounded run of one piece of work on every shard: see the [module](self).
///
/// Made by [`ShardRouter::fan_out`]; defaults: 4 shards at a time, a 30 s
/// deadline for the whole run.
///
/// ```no_run
/// # async fn f(router: shard_router::ShardRouter) {
/// use std::time::Duration;
///
/// let counts = router
///     .fan_out()
///     .concurrency(8)
///     .deadline(Duration::from_secs(2))
///     .run(|client| async move {
///         let row = client.query_one("SELECT count(DISTINCT tenant_id) FROM notes", &[]).await?;
///         Ok(row.get::<_, i64>(0))
///     })
///     .await;
/// for shard in &counts {
///     match &shard.result {
///         Ok(n) => println!("{}: {n} tenants", shard.shard),
///         Err(e) => eprintln!("{}: {e}", shard.shard), // down, failed or too slow
///     }
/// }
/// # }
/// ```
#[must_use = "a fan-out does nothing until run"]
pub struct FanOut {
    router: ShardRouter,
    table: Arc<RoutingTable>,
    concurrency: usize,
    deadline: Duration,
}

/// One shard's answer in a [`FanOut`].
#[derive(Debug)]
pub struct ShardResult<T> {
    /// The shard's name.
    pub shard: String,
    /// What the work returned there, or why it has no answer.
    pub result: Result<T, FanOutError>,
}

/// Why one shard of a [`FanOut`] has no answer. The others are unaffected.
/// As with [`crate::DbError`], the pool's or driver's error is the `source()`,
/// not part of the message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FanOutError {
    /// No connection within the shard's wait (down, or its pool exhausted).
    #[error("shard {shard} unavailable (map version {map_version})")]
    Unavailable {
        /// The shard.
        shard: String,
        /// The map version the fan-out ran on.
        map_version: u64,
        /// The pool's error.
        #[source]
        cause: PoolError,
    },
    /// The work returned an error.
    #[error("query failed on shard {shard} (map version {map_version})")]
    Query {
        /// The shard.
        shard: String,
        /// The map version the fan-out ran on.
        map_version: u64,
        /// The driver's error (SQLSTATE through `code()`).
        #[source]
        cause: tokio_postgres::Error,
    },
    /// [`FanOut::each_tenant`]'s work failed for a tenant (the shard's other
    /// tenants after it were not visited).
    #[error("work for tenant {tenant} failed on shard {shard} (map version {map_version})")]
    Tenant {
        /// The shard whose listing named the tenant.
        shard: String,
        /// The map version the listing ran on.
        map_version: u64,
        /// The tenant.
        tenant: String,
        /// What the work returned.
        #[source]
        cause: crate::DbError,
    },
    /// The deadline passed first; a statement still running was cancelled.
    #[error("shard {shard} did not answer within {deadline:?} (map version {map_version})")]
    Deadline {
        /// The shard.
        shard: String,
        /// The map version the fan-out ran on.
        map_version: u64,
        /// The fan-out's deadline.
        deadline: Duration,
    },
}

/// A pooled connection to one shard, lent to a [`FanOut`]'s work. It carries
/// no tenant: when the map names a `tenant_setting`, it is cleared, so
/// row-level security shows no tenant's rows rather than the last user's.
/// Dereferences to the `tokio_postgres` client.
pub struct ShardClient {
    client: Option<Object>,
    shard: String,
    /// Set when the deadline passed with this client still lent out.
    expired: Arc<AtomicBool>,
    connector: crate::pg::Connector,
}

impl ShardRouter {
    /// A bounded fan-out over every shard of the live map: see [`FanOut`].
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 2\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// let fan_out = router.fan_out().concurrency(2);
    /// assert_eq!(fan_out.map_version(), 2);
    /// # }
    /// ```
    pub fn fan_out(&self) -> FanOut {
        FanOut {
            router: self.clone(),
            table: self.table(),
            concurrency: 4,
            deadline: Duration::from_secs(30),
        }
    }
}

impl FanOut {
    /// At most `n` shards at a time (at least 1).
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 2\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// let fan_out = router.fan_out().concurrency(16);
    /// # }
    /// ```
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// The whole run ends by `deadline` after it starts: a shard without an
    /// answer by then gets [`FanOutError::Deadline`], and its statement is
    /// cancelled.
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 2\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// let fan_out = router.fan_out().deadline(std::time::Duration::from_millis(500));
    /// # }
    /// ```
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The map version every shard's work runs on (the live one when the
    /// fan-out was made).
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 2\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// assert_eq!(router.fan_out().map_version(), 2);
    /// # }
    /// ```
    pub fn map_version(&self) -> u64 {
        self.table.map().version()
    }

    /// Runs `work` once per shard, with a client of that shard, and returns
    /// every shard's answer in map order (by shard name). The work runs on the
    /// caller's task, `concurrency` shards at a time.
    ///
    /// ```no_run
    /// # async fn f(router: shard_router::ShardRouter) {
    /// let results = router
    ///     .fan_out()
    ///     .run(|client| async move { client.execute("ANALYZE notes", &[]).await })
    ///     .await;
    /// let failed: Vec<_> = results.iter().filter(|r| r.result.is_err()).collect();
    /// # }
    /// ```
    pub async fn run<T, F, Fut>(self, work: F) -> Vec<ShardResult<T>>
    where
        F: Fn(ShardClient) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.deadline;
        let indexes = (0..self.table.map().shards().len()).map(|i| ShardIndex(i as u16));
        let mut results: Vec<(ShardIndex, ShardResult<T>)> = stream::iter(indexes)
            .map(|index| {
                let one = self.one(index, deadline, &work);
                async move { (index, one.await) }
            })
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        results.sort_by_key(|(index, _)| *index);
        results.into_iter().map(|(_, result)| result).collect()
    }

    /// Runs `work` once for every tenant, each from the shard that serves it:
    /// `list` (one text column of tenant ids, such as
    /// `SELECT id FROM tenants` or `SELECT DISTINCT tenant_id FROM notes`) runs
    /// on every shard as in [`run`](Self::run), and of the ids a shard lists
    /// only those the map routes to that shard are kept, so a tenant's stale
    /// copy left on a shard it moved away from is not visited and a tenant
    /// listed on two shards during a move is visited once. Each tenant gets a
    /// [`TenantDb`](crate::TenantDb) resolved when its turn comes (the live
    /// map then, as a job should), and the work returns
    /// [`DbError`](crate::DbError) like the rest of the API.
    ///
    /// Shards run `concurrency` at a time, their tenants one after another; the
    /// deadline bounds the listing, not the work. Each shard answers with the
    /// number of tenants visited, or why it stopped: the listing failed (as in
    /// `run`), or the work failed for a tenant ([`FanOutError::Tenant`]; that
    /// shard's later tenants are not visited, the other shards go on). An id
    /// that is not a valid tenant id is skipped with a warning.
    ///
    /// ```no_run
    /// # async fn f(router: shard_router::ShardRouter) {
    /// let visited = router
    ///     .fan_out()
    ///     .each_tenant("SELECT DISTINCT tenant_id FROM notes", |db| async move {
    ///         db.execute(
    ///             "DELETE FROM notes WHERE tenant_id = $1 AND created_at < now() - interval '90 days'",
    ///             &[&db.tenant().as_str()],
    ///         )
    ///         .await?;
    ///         Ok(())
    ///     })
    ///     .await;
    /// for shard in visited {
    ///     match shard.result {
    ///         Ok(n) => println!("{}: {n} tenants", shard.shard),
    ///         Err(e) => eprintln!("{e}"),
    ///     }
    /// }
    /// # }
    /// ```
    pub async fn each_tenant<F, Fut>(self, list: &str, work: F) -> Vec<ShardResult<usize>>
    where
        F: Fn(crate::TenantDb) -> Fut,
        Fut: Future<Output = Result<(), crate::DbError>>,
    {
        let router = self.router.clone();
        let table = self.table.clone();
        let map_version = self.map_version();
        let concurrency = self.concurrency;
        let listed = self
            .run(|client| async move { client.query(list, &[]).await })
            .await;
        let work = &work;
        let (router, table) = (&router, &table);
        let mut results: Vec<(usize, ShardResult<usize>)> = stream::iter(listed.into_iter().enumerate())
            .map(|(i, shard)| async move {
                let result = match shard.result {
                    Err(e) => Err(e),
                    Ok(rows) => {
                        let map = table.map();
                        let mut visited = 0;
                        let mut failed = None;
                        for row in rows {
                            let Ok(Some(id)) = row.try_get::<_, Option<String>>(0) else {
                                continue;
                            };
                            let Ok(tenant) = crate::TenantId::new(&id) else {
                                tracing::warn!(shard = %shard.shard, tenant = %id.escape_debug(), "each_tenant: not a valid tenant id; skipped");
                                continue;
                            };
                            let routed = map.tenant_id(tenant);
                            if map.shard(map.locate(&routed).shard).name() != shard.shard {
                                continue; // served by another shard: visited there
                            }
                            if let Err(cause) = work(router.resolve(routed)).await {
                                failed = Some(FanOutError::Tenant {
                                    shard: shard.shard.clone(),
                                    map_version,
                                    tenant: id,
                                    cause,
                                });
                                break;
                            }
                            visited += 1;
                        }
                        failed.map_or(Ok(visited), Err)
                    }
                };
                (
                    i,
                    ShardResult {
                        shard: shard.shard,
                        result,
                    },
                )
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        results.sort_by_key(|(i, _)| *i);
        results.into_iter().map(|(_, result)| result).collect()
    }

    async fn one<T, F, Fut>(
        &self,
        index: ShardIndex,
        deadline: tokio::time::Instant,
        work: &F,
    ) -> ShardResult<T>
    where
        F: Fn(ShardClient) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let shard = self.table.map().shard(index).name().to_owned();
        let map_version = self.map_version();
        let expired = Arc::new(AtomicBool::new(false));
        let run =
            async {
                let client = self.table.pool(index).get().await.map_err(|cause| {
                    FanOutError::Unavailable {
                        shard: shard.clone(),
                        map_version,
                        cause,
                    }
                })?;
                let query = |cause| FanOutError::Query {
                    shard: shard.clone(),
                    map_version,
                    cause,
                };
                if let Some(setting) = self.table.map().tenant_setting() {
                    // The pool's connections carry whichever tenant used them last.
                    client
                        .execute("SELECT set_config($1, '', false)", &[&setting])
                        .await
                        .map_err(query)?;
                }
                let lent = ShardClient {
                    client: Some(client),
                    shard: shard.clone(),
                    expired: expired.clone(),
                    connector: self.table.connector(index).clone(),
                };
                work(lent).await.map_err(query)
            };
        let mut run = std::pin::pin!(run);
        let result = tokio::select! {
            result = &mut run => result,
            () = tokio::time::sleep_until(deadline) => {
                // Before `run` (and the client lent inside it) is dropped, at
                // the end of this function: the client then cancels.
                expired.store(true, Ordering::SeqCst);
                Err(FanOutError::Deadline {
                    shard: shard.clone(),
                    map_version,
                    deadline: self.deadline,
                })
            }
        };
        ShardResult {
            shard: shard.clone(),
            result,
        }
    }
}

impl fmt::Debug for FanOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FanOut")
            .field("map_version", &self.map_version())
            .field("concurrency", &self.concurrency)
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl ShardClient {
    /// The shard this client is connected to.
    ///
    /// ```no_run
    /// # async fn f(router: shard_router::ShardRouter) {
    /// let names = router.fan_out().run(|client| async move { Ok(client.shard().to_owned()) }).await;
    /// # }
    /// ```
    pub fn shard(&self) -> &str {
        &self.shard
    }
}

impl std::ops::Deref for ShardClient {
    type Target = tokio_postgres::Client;
    fn deref(&self) -> &tokio_postgres::Client {
        self.client.as_ref().expect("held until dropped")
    }
}

impl Drop for ShardClient {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        if !self.expired.load(Ordering::SeqCst) {
            return; // the work finished with it: back to the pool
        }
        // Dropped at the deadline, perhaps mid-statement: cancel it and close
        // the connection rather than give the pool one still busy.
        let cancel = client.cancel_token();
        drop(Object::take(client));
        let connector = self.connector.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = cancel.cancel_query(connector).await;
            });
        }
    }
}

impl fmt::Debug for ShardClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardClient")
            .field("shard", &self.shard)
            .finish_non_exhaustive()
    }
}
