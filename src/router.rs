//! The live routing table: the current map and one connection pool per shard.
//!
//! [`ShardRouter`] keeps a [`RoutingTable`] behind `arc-swap`, so lookups never
//! take a lock and a new map replaces the old one atomically. Requests hold the
//! table they started with (see [`crate::TenantDb`]), so a swap never splits a
//! request across two versions; pools of removed shards close once the last
//! request that uses them ends.
//!
//! # Example
//!
//! ```
//! use shard_router::{map::MapLoader, ShardRouter, TenantId};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let map = MapLoader::without_env().load_str(r#"
//!     version = 1
//!     [shards.a]
//!     url = "postgres://postgres@127.0.0.1/shard_a"
//! "#).unwrap();
//! let router = ShardRouter::new(map).unwrap(); // pools connect lazily
//! let db = router.resolve(TenantId::new("acme").unwrap());
//! assert_eq!(db.shard(), "a");
//! assert_eq!(db.map_version(), 1);
//! # }
//! ```

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use deadpool_postgres::Pool;

use crate::accounting::{ShardLoad, ShardTenants, DEFAULT_TOP_TENANTS};
use crate::limit::TenantLimiter;
use crate::map::{Location, Shard, ShardIndex, ShardMap};
use crate::{TenantDb, TenantId};

/// Routes tenants to shards with the current map. Cheap to clone; clones share the table.
#[derive(Clone)]
pub struct ShardRouter {
    inner: Arc<Inner>,
}

struct Inner {
    table: ArcSwap<RoutingTable>,
    /// Where maps come from and when that source last confirmed the live map.
    source: Mutex<SourceState>,
    /// Serializes `apply` so version checks and swaps cannot interleave, and
    /// holds the maps it replaced (see [`Retired`]).
    apply_lock: Mutex<Retired>,
}

/// Maps replaced by `apply`, kept until no request uses them.
///
/// A big map (a million pins) takes milliseconds to free. Holding one reference
/// here means the last reference is never dropped by a request finishing on a
/// runtime thread; `apply` frees the maps nobody else holds, on its own thread.
#[derive(Default)]
struct Retired(Vec<Arc<ShardMap>>);

impl Retired {
    fn retire(&mut self, map: Arc<ShardMap>) {
        self.0.retain(|old| Arc::strong_count(old) > 1);
        self.0.push(map);
    }
}

/// One immutable version of routing: a map and the pools of its shards.
pub struct RoutingTable {
    map: Arc<ShardMap>,
    /// One pool per shard, in [`ShardIndex`] order.
    pools: Vec<Pool>,
    /// What else lives as long as each shard's pool, in the same order.
    shard_state: Vec<ShardState>,
    /// Per-tenant load, one table per shard (in [`ShardIndex`] order), kept
    /// across map versions by shard name.
    loads: Vec<Arc<ShardLoad>>,
    accounting: Arc<Accounting>,
    /// Where dual-write failures go to be recorded on their move (shared by all tables).
    move_failures: MoveFailures,
    /// How to apply row images to each (shard, table), built from the catalog
    /// on first use during a move.
    pub(crate) appliers: crate::db::apply::Appliers,
}

/// A dual write that failed on one side: (tenant, what happened).
pub(crate) type MoveFailure = (String, String);

/// The sink for [`MoveFailure`]s, set once by whoever records moves (the control agent).
pub(crate) type MoveFailures =
    Arc<std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<MoveFailure>>>;

/// Every shard's per-tenant load table, by shard name, so that a shard's
/// figures outlive map versions.
#[derive(Debug)]
struct Accounting {
    top: usize,
    shards: Mutex<std::collections::HashMap<String, Arc<ShardLoad>>>,
}

impl Accounting {
    fn new(top: usize) -> Arc<Accounting> {
        Arc::new(Accounting {
            top,
            shards: Mutex::new(Default::default()),
        })
    }

    /// The tables for `map`'s shards, in its order.
    fn for_map(&self, map: &ShardMap) -> Vec<Arc<ShardLoad>> {
        let mut shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        map.shards()
            .iter()
            .map(|shard| {
                Arc::clone(
                    shards
                        .entry(shard.name().to_owned())
                        .or_insert_with(|| Arc::new(ShardLoad::new(self.top))),
                )
            })
            .collect()
    }
}

impl RoutingTable {
    /// Where the tenants' load on shard `index` is counted.
    pub(crate) fn load(&self, index: ShardIndex) -> &ShardLoad {
        &self.loads[index.get()]
    }

    /// Every shard's load table, in [`ShardIndex`] order.
    pub(crate) fn loads(&self) -> &[Arc<ShardLoad>] {
        &self.loads
    }

    /// Reports a dual-write failure to be recorded on the tenant's move.
    pub(crate) fn report_move_failure(&self, tenant: &str, what: String) {
        tracing::error!(tenant, error = %what, "dual write failed");
        if let Some(sink) = self.move_failures.get() {
            let _ = sink.send((tenant.to_owned(), what));
        }
    }

    /// The map of this table.
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 2\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// assert_eq!(router.table().map().version(), 2);
    /// # }
    /// ```
    pub fn map(&self) -> &ShardMap {
        &self.map
    }

    /// The pool of shard `index`.
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 2\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// let table = router.table();
    /// let pool = table.pool(table.map().shard_index("a").unwrap());
    /// assert_eq!(pool.status().size, 0); // nothing connected yet
    /// # }
    /// ```
    pub fn pool(&self, index: ShardIndex) -> &Pool {
        &self.pools[index.get()]
    }

    /// Closes the pooled connections (shard and replica-mode pools) that have
    /// been idle longer than their shard's `idle_timeout`; returns how many.
    pub(crate) fn close_idle(&self) -> usize {
        let mut closed = 0;
        for (index, shard) in self.map.shards().iter().enumerate() {
            let Some(idle) = shard.pool().idle_timeout else {
                continue;
            };
            let mut pools = vec![&self.pools[index]];
            pools.extend(self.shard_state[index].replica_pool.get());
            for pool in pools {
                closed += pool.retain(|_, used| used.last_used() < idle).removed.len();
            }
        }
        closed
    }

    /// The read replicas of shard `index`, if it has any.
    pub(crate) fn read_replicas(
        &self,
        index: ShardIndex,
    ) -> Option<&crate::replicas::ShardReplicas> {
        self.shard_state[index.get()].read_replicas.as_deref()
    }

    /// Probes every shard's replicas once (see [`crate::replicas`]); returns
    /// how long to wait before the next probe.
    async fn probe_replicas(&self) -> Duration {
        let mut next = Duration::from_secs(1);
        for (index, state) in self.shard_state.iter().enumerate() {
            if let Some(replicas) = &state.read_replicas {
                replicas.probe(&self.pools[index]).await;
                next = next.min(replicas.probe_interval());
            }
        }
        next
    }

    pub(crate) fn limiter(&self, index: ShardIndex) -> Option<&TenantLimiter> {
        self.shard_state[index.get()].limiter.as_deref()
    }

    /// The pool of shard `index` whose connections run in replica mode (for
    /// applying a moving tenant's row images), built on first use. Its
    /// connections set `session_replication_role` once, at connect: setting it
    /// per transaction would throw away every cached plan of the connection.
    pub(crate) fn replica_pool(&self, index: ShardIndex) -> Result<&Pool, String> {
        let state = &self.shard_state[index.get()];
        if let Some(pool) = state.replica_pool.get() {
            return Ok(pool);
        }
        let shard = self.map.shard(index);
        let pool = build_pool_with(shard, state.connector.clone(), true)?;
        Ok(state.replica_pool.get_or_init(|| pool))
    }

    /// The TLS connector of shard `index`'s pool, for cancel requests.
    pub(crate) fn connector(&self, index: ShardIndex) -> &crate::pg::Connector {
        &self.shard_state[index.get()].connector
    }

    /// Every shard with its pool, in shard order.
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 2\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// for (shard, pool) in router.table().shards() {
    ///     println!("{}: {} connections", shard.name(), pool.status().size);
    /// }
    /// # }
    /// ```
    pub fn shards(&self) -> impl Iterator<Item = (&Shard, &Pool)> {
        self.map.shards().iter().zip(&self.pools)
    }
}

impl fmt::Debug for RoutingTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoutingTable")
            .field("version", &self.map.version())
            .field("shards", &self.map.shards().len())
            .finish()
    }
}

/// What [`ShardRouter::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Applied {
    /// The map was already current; nothing changed.
    Unchanged,
    /// The new map is live.
    Swapped {
        /// The version that was live before.
        from: u64,
        /// The version live now.
        to: u64,
        /// Shards whose pools were kept.
        pools_kept: usize,
        /// Shards that got new pools (new shards, or a changed URL or pool setting).
        pools_built: usize,
        /// Shards whose pools are dropped once in-flight requests finish.
        pools_dropped: usize,
    },
}

/// Why a map was not applied. The router keeps serving the map it had.
///
/// ```
/// # use shard_router::{map::MapLoader, ShardRouter, ApplyError};
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let load = |v: u64| MapLoader::without_env()
///     .load_str(&format!("version = {v}\n[shards.a]\nurl = \"postgres://h/a\"")).unwrap();
/// let router = ShardRouter::new(load(5)).unwrap();
/// let err = router.apply(load(4)).unwrap_err();
/// assert_eq!(err, ApplyError::Stale { current: 5, offered: 4 });
/// assert_eq!(router.version(), 5);
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// The offered version is lower than the live one.
    #[error(
        "map version {offered} is older than the live version {current}; versions only go forward"
    )]
    Stale {
        /// The live version.
        current: u64,
        /// The offered version.
        offered: u64,
    },
    /// The offered map has the live version but different content.
    #[error("map version {version} is already live with different content; publish changes under a higher version")]
    Conflict {
        /// The version both maps claim.
        version: u64,
    },
    /// A shard's pool could not be built.
    #[error("cannot build the pool of shard {shard} (map version {version}): {reason}")]
    Pool {
        /// The shard.
        shard: String,
        /// The offered map version.
        version: u64,
        /// Why.
        reason: String,
    },
}

impl ShardRouter {
    /// A router serving `map`. Pools are created but connect lazily, so a shard
    /// that is down does not stop start-up; its tenants get 503 until it is back.
    ///
    /// Needs a Tokio runtime (the pools' timeouts run on it).
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let map = MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://127.0.0.1:1/down\"").unwrap();
    /// assert!(ShardRouter::new(map).is_ok());
    /// # }
    /// ```
    pub fn new(map: ShardMap) -> Result<Self, ApplyError> {
        let (pools, shard_state) = map
            .shards()
            .iter()
            .map(|shard| build_pool(shard, map.version()))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .unzip();
        let accounting = Accounting::new(DEFAULT_TOP_TENANTS);
        let table = RoutingTable {
            loads: accounting.for_map(&map),
            accounting,
            map: Arc::new(map),
            pools,
            shard_state,
            move_failures: MoveFailures::default(),
            appliers: Default::default(),
        };
        let router = ShardRouter {
            inner: Arc::new(Inner {
                table: ArcSwap::from_pointee(table),
                apply_lock: Mutex::new(Retired::default()),
                source: Mutex::new(SourceState {
                    source: MapSource::Static,
                    last_confirmed: Some(SystemTime::now()),
                    unconfirmed_since: None,
                    last_refused: None,
                }),
            }),
        };
        router.spawn_idle_closer();
        router.spawn_replica_prober();
        Ok(router)
    }

    /// Measures the replicas' lag in the background (never on the request
    /// path), until the last clone of the router is dropped.
    fn spawn_replica_prober(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = Arc::downgrade(&self.inner);
        runtime.spawn(async move {
            loop {
                let Some(table) = inner.upgrade().map(|inner| inner.table.load_full()) else {
                    return;
                };
                let next = table.probe_replicas().await;
                drop(table);
                tokio::time::sleep(next).await;
            }
        });
    }

    /// Closes connections idle past their shard's `idle_timeout`, on the
    /// runtime `new` ran on, until the last clone of the router is dropped.
    fn spawn_idle_closer(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = Arc::downgrade(&self.inner);
        runtime.spawn(async move {
            loop {
                let period = match inner.upgrade() {
                    Some(inner) => idle_check_period(&inner.table.load().map),
                    None => return,
                };
                tokio::time::sleep(period).await;
                let Some(inner) = inner.upgrade() else {
                    return;
                };
                let closed = inner.table.load().close_idle();
                if closed > 0 {
                    tracing::debug!(closed, "closed idle shard connections");
                }
            }
        });
    }

    /// Makes `map` the live map, atomically.
    ///
    /// Refuses a lower version, and the same version with different content.
    /// Keeps the pools of shards whose URL and pool settings are unchanged, builds
    /// pools for the others, and lets removed shards' pools go once in-flight
    /// requests return their connections. Lookups are never blocked.
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter, Applied};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let load = |v: u64, extra: &str| MapLoader::without_env()
    ///     .load_str(&format!("version = {v}\n[shards.a]\nurl = \"postgres://h/a\"\n{extra}")).unwrap();
    /// let router = ShardRouter::new(load(1, "")).unwrap();
    /// let applied = router.apply(load(2, "[shards.b]\nurl = \"postgres://h/b\"\nweight = 0")).unwrap();
    /// assert!(matches!(applied, Applied::Swapped { pools_kept: 1, pools_built: 1, .. }));
    /// assert_eq!(router.apply(load(2, "[shards.b]\nurl = \"postgres://h/b\"\nweight = 0")).unwrap(), Applied::Unchanged);
    /// # }
    /// ```
    pub fn apply(&self, map: ShardMap) -> Result<Applied, ApplyError> {
        let mut retired = self
            .inner
            .apply_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let current = self.inner.table.load_full();
        let live = current.map.version();
        let offered = map.version();
        if offered < live {
            return Err(ApplyError::Stale {
                current: live,
                offered,
            });
        }
        if offered == live {
            return if *current.map == map {
                Ok(Applied::Unchanged)
            } else {
                Err(ApplyError::Conflict { version: offered })
            };
        }
        let (mut kept, mut built) = (0, 0);
        let mut pools = Vec::with_capacity(map.shards().len());
        let mut shard_state = Vec::with_capacity(map.shards().len());
        // Connections carry the tenant setting for the session: when its name
        // changes or it goes away, no old connection may be handed out again.
        let same_setting = current.map.tenant_setting() == map.tenant_setting();
        for shard in map.shards() {
            let reusable = current
                .map
                .shard_index(shard.name())
                .filter(|old| same_setting && current.map.shard(*old).same_connection(shard));
            match reusable {
                Some(old) => {
                    kept += 1;
                    pools.push(current.pool(old).clone());
                    shard_state.push(current.shard_state[old.get()].clone());
                }
                None => {
                    built += 1;
                    let (pool, state) = build_pool(shard, offered)?;
                    pools.push(pool);
                    shard_state.push(state);
                }
            }
        }
        let dropped = current.map.shards().len() - kept;
        let previous = self.inner.table.swap(Arc::new(RoutingTable {
            loads: current.accounting.for_map(&map),
            accounting: Arc::clone(&current.accounting),
            map: Arc::new(map),
            pools,
            shard_state,
            move_failures: Arc::clone(&current.move_failures),
            appliers: Default::default(),
        }));
        retired.retire(Arc::clone(&previous.map));
        tracing::info!(
            from = live,
            to = offered,
            pools_kept = kept,
            pools_built = built,
            pools_dropped = dropped,
            "shard map applied"
        );
        Ok(Applied::Swapped {
            from: live,
            to: offered,
            pools_kept: kept,
            pools_built: built,
            pools_dropped: dropped,
        })
    }

    /// The live table. Hold it for the length of one unit of work.
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 2\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// assert_eq!(router.table().map().shards().len(), 1);
    /// # }
    /// ```
    pub fn table(&self) -> Arc<RoutingTable> {
        self.inner.table.load_full()
    }

    /// Ranks `top` tenants per shard by database time instead of
    /// [`DEFAULT_TOP_TENANTS`] (memory: about `2 × top` small entries per
    /// shard; 0 counts nothing). Counting starts again from zero.
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let map = MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://127.0.0.1:1/down\"").unwrap();
    /// let router = ShardRouter::new(map).unwrap().with_top_tenants(50);
    /// assert!(router.tenant_load()[0].tenants.is_empty());
    /// # }
    /// ```
    pub fn with_top_tenants(self, top: usize) -> Self {
        {
            let _apply = self
                .inner
                .apply_lock
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let current = self.inner.table.load_full();
            let accounting = Accounting::new(top);
            self.inner.table.store(Arc::new(RoutingTable {
                loads: accounting.for_map(&current.map),
                accounting,
                map: Arc::clone(&current.map),
                pools: current.pools.clone(),
                shard_state: current.shard_state.clone(),
                move_failures: Arc::clone(&current.move_failures),
                appliers: Default::default(),
            }));
        }
        self
    }

    /// Each shard's most expensive tenants by database time, most first, as
    /// this router counted them (statements, rows, database time, pool wait,
    /// errors) since it started.
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let map = MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://127.0.0.1:1/down\"").unwrap();
    /// # let router = ShardRouter::new(map).unwrap();
    /// for shard in router.tenant_load() {
    ///     for t in shard.tenants.iter().take(3) {
    ///         println!("{} {}: {} statements, {} µs", shard.shard, t.tenant, t.statements, t.db_time_us);
    ///     }
    /// }
    /// # }
    /// ```
    pub fn tenant_load(&self) -> Vec<ShardTenants> {
        let table = self.inner.table.load();
        table
            .map
            .shards()
            .iter()
            .zip(&table.loads)
            .map(|(shard, load)| ShardTenants {
                shard: shard.name().to_owned(),
                tenants: load.top(),
            })
            .collect()
    }

    /// The live map version.
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 2\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// assert_eq!(router.version(), 2);
    /// # }
    /// ```
    pub fn version(&self) -> u64 {
        self.inner.table.load().map.version()
    }

    /// Where `tenant` is served under the live map.
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter, TenantId};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 2\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// assert_eq!(router.locate(&TenantId::new("acme").unwrap()).shard.get(), 0);
    /// # }
    /// ```
    pub fn locate(&self, tenant: &TenantId) -> Location {
        self.inner.table.load().map.locate(tenant)
    }

    /// A database handle for `tenant`, bound to the live table for its whole life.
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter, TenantId};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 2\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// let db = router.resolve(TenantId::new("acme").unwrap());
    /// assert_eq!((db.tenant().as_str(), db.shard()), ("acme", "a"));
    /// # }
    /// ```
    pub fn resolve(&self, tenant: TenantId) -> TenantDb {
        TenantDb::new(tenant, self.table()).with_router(self)
    }
}

/// Where a router's maps come from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MapSource {
    /// Given once to [`ShardRouter::new`]; changed only by [`ShardRouter::apply`].
    Static,
    /// A file, reloaded on change and on SIGHUP ([`crate::watch`]).
    File(String),
    /// A control database (URL without password), followed by [`crate::control::ControlAgent`].
    Control(String),
}

impl fmt::Display for MapSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapSource::Static => f.write_str("static"),
            MapSource::File(path) => write!(f, "file:{path}"),
            MapSource::Control(url) => write!(f, "control:{url}"),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct SourceState {
    pub(crate) source: MapSource,
    /// When the source last confirmed that the live map is current.
    pub(crate) last_confirmed: Option<SystemTime>,
    /// Since when the source has been unreachable.
    pub(crate) unconfirmed_since: Option<Instant>,
    /// The last map the source offered that was refused, and why.
    pub(crate) last_refused: Option<String>,
}

impl ShardRouter {
    /// Updates what the status reports about the map source.
    pub(crate) fn update_source(&self, update: impl FnOnce(&mut SourceState)) {
        let mut state = self
            .inner
            .source
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        update(&mut state);
    }

    /// Sends dual-write failures to `sink` from now on (first caller wins).
    pub(crate) fn set_move_failure_sink(
        &self,
        sink: tokio::sync::mpsc::UnboundedSender<MoveFailure>,
    ) {
        let _ = self.inner.table.load().move_failures.set(sink);
    }

    pub(crate) fn source_state(&self) -> SourceState {
        self.inner
            .source
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

impl fmt::Debug for ShardRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardRouter")
            .field("table", &*self.inner.table.load())
            .finish()
    }
}

/// What lives as long as a shard's pool, beside it.
#[derive(Clone)]
struct ShardState {
    /// Per-tenant connection cap.
    limiter: Option<Arc<TenantLimiter>>,
    /// The pool's TLS connector.
    connector: crate::pg::Connector,
    /// Replica-mode connections for applying row images, built on first use.
    replica_pool: Arc<std::sync::OnceLock<Pool>>,
    /// The shard's read replicas, when the map lists some.
    read_replicas: Option<Arc<crate::replicas::ShardReplicas>>,
}

fn build_pool(shard: &Shard, version: u64) -> Result<(Pool, ShardState), ApplyError> {
    let refused = |reason: String| ApplyError::Pool {
        shard: shard.name().to_owned(),
        version,
        reason,
    };
    let connector = shard.endpoint.tls.connector().map_err(refused)?;
    shard
        .endpoint
        .warn_if_unverified(&format!("shard {}", shard.name()));
    if shard.admin_url().is_some() {
        shard
            .admin_endpoint()
            .warn_if_unverified(&format!("admin_url of shard {}", shard.name()));
    }
    for (i, replica) in shard.replicas().iter().enumerate() {
        replica
            .endpoint
            .warn_if_unverified(&format!("replica {i} of shard {}", shard.name()));
    }
    let pool = build_pool_with(shard, connector.clone(), false).map_err(refused)?;
    let limiter = shard
        .pool()
        .tenant_max_connections
        .map(|max| Arc::new(TenantLimiter::new(max)));
    let read_replicas = crate::replicas::ShardReplicas::build(shard)
        .map_err(refused)?
        .map(Arc::new);
    Ok((
        pool,
        ShardState {
            limiter,
            connector,
            replica_pool: Default::default(),
            read_replicas,
        },
    ))
}

/// A pool of the shard's connections; in replica mode when `replica`.
/// How often to look for idle connections: a quarter of the shortest idle
/// timeout, between 250 ms and a minute.
fn idle_check_period(map: &ShardMap) -> Duration {
    map.shards()
        .iter()
        .filter_map(|s| s.pool().idle_timeout)
        .min()
        .map_or(Duration::from_secs(60), |idle| {
            (idle / 4).clamp(Duration::from_millis(250), Duration::from_secs(60))
        })
}

fn build_pool_with(
    shard: &Shard,
    connector: crate::pg::Connector,
    replica: bool,
) -> Result<Pool, String> {
    crate::pg::pool_for(
        shard.pg_config(),
        &shard.pool().limits(),
        connector,
        replica,
        Some(shard.name()),
    )
}
