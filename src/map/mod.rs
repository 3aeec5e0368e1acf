//! The shard map: which shards exist, how tenants are placed on them, and which
//! tenants are pinned or moving.
//!
//! A [`ShardMap`] only exists validated: [`MapLoader`] (or [`ShardMap::from_file`])
//! parses TOML with the `config` crate, applies environment overrides, and checks
//! every rule, reporting each problem with its field. Placement is a pure
//! function of (map, tenant): moves first, then pins, then the ring
//! (see [`placement`]).
//!
//! # Example
//!
//! ```
//! use shard_router::map::{MapLoader, Reason};
//! use shard_router::TenantId;
//!
//! let map = MapLoader::without_env().load_str(r#"
//!     version = 3
//!     [shards.a]
//!     url = "postgres://postgres@127.0.0.1/shard_a"
//!     [shards.b]
//!     url = "postgres://postgres@127.0.0.1/shard_b"
//!     [tenants]
//!     acme = "b"
//! "#).unwrap();
//!
//! let location = map.locate(&TenantId::new("acme").unwrap());
//! assert_eq!(map.shard(location.shard).name(), "b");
//! assert_eq!(location.reason, Reason::Pin);
//! ```

mod diff;
mod document;
mod load;
mod pins;
pub mod placement;
mod plain_pins;
mod validate;

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

pub use diff::{MapDiff, MoveChange, Pin, ShardChange, TenantShardChange};
pub use document::MapDocument;
pub use load::{MapLoader, DEFAULT_ENV_PREFIX};
pub use validate::{MapError, Problem};

use crate::TenantId;
use pins::PinIndex;
use placement::Ring;

/// Default ring points per unit of weight.
pub const DEFAULT_VNODES: u32 = 128;

/// A validated, versioned shard map.
///
/// Build one with [`MapLoader`] or [`ShardMap::from_file`].
#[derive(Debug, Clone)]
pub struct ShardMap {
    version: u64,
    vnodes: u32,
    tenant_column: String,
    tenant_setting: Option<String>,
    tenant_case: TenantCase,
    shards: Vec<Shard>,
    pins: PinIndex,
    moves: HashMap<Box<str>, MoveRoute>,
    ring: Ring,
}

/// How tenant ids are compared (`tenant_case` in the map): one policy for
/// every extractor, for [`crate::ShardRouter::resolve`] and for `shardctl`.
///
/// ```
/// # use shard_router::{map::{MapLoader, TenantCase}, TenantId};
/// let map = MapLoader::without_env()
///     .load_str("version = 1\ntenant_case = \"lower\"\n[shards.a]\nurl = \"postgres://h/a\"")
///     .unwrap();
/// assert_eq!(map.tenant_case(), TenantCase::Lower);
/// assert_eq!(map.tenant_id(TenantId::new("ACME").unwrap()).as_str(), "acme");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TenantCase {
    /// `exact` (the default): ids are case-sensitive; `ACME` and `acme` are
    /// two tenants.
    #[default]
    Exact,
    /// `lower`: every id is lowercased (ASCII) before anything else sees it,
    /// so `ACME`, `Acme` and `acme` are one tenant, `acme`, everywhere,
    /// including in the handle's [`crate::TenantDb::tenant`] that your SQL uses.
    Lower,
}

impl TenantCase {
    /// The name used in the map file.
    ///
    /// ```
    /// assert_eq!(shard_router::map::TenantCase::Lower.as_str(), "lower");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            TenantCase::Exact => "exact",
            TenantCase::Lower => "lower",
        }
    }
}

/// The position of a shard in its map (shards are ordered by name).
///
/// Only meaningful together with the map it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardIndex(pub(crate) u16);

impl ShardIndex {
    /// The index as a `usize`.
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # let map = MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/db\"").unwrap();
    /// let first = map.shard_index("a").unwrap();
    /// assert_eq!(first.get(), 0);
    /// ```
    pub fn get(self) -> usize {
        self.0 as usize
    }
}

/// One shard: a Postgres database and its pool settings.
#[derive(Clone)]
pub struct Shard {
    name: String,
    url: String,
    pub(crate) endpoint: crate::pg::Endpoint,
    /// `admin_url` and its parsed form, when set.
    admin: Option<(String, crate::pg::Endpoint)>,
    weight: u32,
    pool: PoolSettings,
    replicas: Vec<Replica>,
    max_replica_lag: Duration,
}

/// A streaming replica of a shard (`replicas = [{ url = "...", weight = 1 }]`),
/// which serves the shard's reads while its lag is within the shard's
/// `max_replica_lag_ms`.
#[derive(Clone)]
pub struct Replica {
    url: String,
    pub(crate) endpoint: crate::pg::Endpoint,
    weight: u32,
    pool: PoolSettings,
}

impl Replica {
    /// The connection URL. It may hold a password: print
    /// [`Replica::redacted_url`] instead.
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # let map = MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/db\"\nreplicas = [{ url = \"postgres://r1/db\" }]").unwrap();
    /// assert_eq!(map.shards()[0].replicas()[0].url(), "postgres://r1/db");
    /// ```
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL with any password replaced by `***`.
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # let map = MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/db\"\nreplicas = [{ url = \"postgres://u:pw@r1/db\" }]").unwrap();
    /// assert_eq!(map.shards()[0].replicas()[0].redacted_url(), "postgres://u:***@r1/db");
    /// ```
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// Its share of the shard's replica reads, relative to the other replicas
    /// (`weight`, default 1; 0 takes none).
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # let map = MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/db\"\nreplicas = [{ url = \"postgres://r1/db\", weight = 3 }]").unwrap();
    /// assert_eq!(map.shards()[0].replicas()[0].weight(), 3);
    /// ```
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// Its pool settings (`pool`, as for a shard).
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # let map = MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/db\"\nreplicas = [{ url = \"postgres://r1/db\", pool = { max_size = 4 } }]").unwrap();
    /// assert_eq!(map.shards()[0].replicas()[0].pool().max_size, 4);
    /// ```
    pub fn pool(&self) -> &PoolSettings {
        &self.pool
    }
}

impl Shard {
    /// Connects for administrative work (the shard's `admin_url` if set, else
    /// its `url`) with the shard's own connect timeout.
    pub(crate) async fn connect_admin(
        &self,
    ) -> Result<tokio_postgres::Client, crate::pg::ShardError> {
        self.connect_to(self.admin_endpoint()).await
    }

    /// Connects through the shard's `url` (what routers use), with its own
    /// connect timeout.
    pub(crate) async fn connect_url(
        &self,
    ) -> Result<tokio_postgres::Client, crate::pg::ShardError> {
        self.connect_to(&self.endpoint).await
    }

    /// Connects to `endpoint` (one of this shard's) with the shard's connect
    /// timeout, driving the connection on a task.
    async fn connect_to(
        &self,
        endpoint: &crate::pg::Endpoint,
    ) -> Result<tokio_postgres::Client, crate::pg::ShardError> {
        let (client, connection) = endpoint
            .connect(self.pool().connect_timeout)
            .await
            .map_err(|cause| crate::pg::ShardError::Unreachable {
                shard: self.name().to_owned(),
                cause,
            })?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// The shard's streaming replicas (`replicas`), in the order written.
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # let map = MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/db\"").unwrap();
    /// assert!(map.shards()[0].replicas().is_empty());
    /// ```
    pub fn replicas(&self) -> &[Replica] {
        &self.replicas
    }

    /// How far behind its primary a replica may be and still serve reads
    /// (`max_replica_lag_ms`, default 1000).
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # let map = MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/db\"").unwrap();
    /// assert_eq!(map.shards()[0].max_replica_lag().as_millis(), 1000);
    /// ```
    pub fn max_replica_lag(&self) -> Duration {
        self.max_replica_lag
    }

    /// The shard's name, as written under `[shards.NAME]`.
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # let map = MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/db\"").unwrap();
    /// assert_eq!(map.shards()[0].name(), "a");
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The connection URL. It may hold a password: print [`Shard::redacted_url`] instead.
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # let map = MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/db\"").unwrap();
    /// assert_eq!(map.shards()[0].url(), "postgres://h/db");
    /// ```
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL with any password replaced by `***`, for logs and output.
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # let map = MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://app:secret@h/db\"").unwrap();
    /// assert_eq!(map.shards()[0].redacted_url(), "postgres://app:***@h/db");
    /// ```
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// The URL that `shardctl` and moves use for data checks, copies and DDL
    /// (`admin_url`), if the map sets one; otherwise they use [`Shard::url`].
    /// Set it when the application's role is subject to row-level security:
    /// the role behind it must see every tenant's rows (superuser, `BYPASSRLS`,
    /// or the owner of tables without `FORCE ROW LEVEL SECURITY`).
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # let map = MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://app@h/db\"\nadmin_url = \"postgres://admin:pw@h/db\"").unwrap();
    /// assert_eq!(map.shards()[0].admin_url(), Some("postgres://admin:pw@h/db"));
    /// ```
    pub fn admin_url(&self) -> Option<&str> {
        self.admin.as_ref().map(|(url, _)| url.as_str())
    }

    /// What administrative work connects with: `admin_url` if set, else `url`.
    pub(crate) fn admin_endpoint(&self) -> &crate::pg::Endpoint {
        self.admin.as_ref().map_or(&self.endpoint, |(_, e)| e)
    }

    /// The parsed connection settings.
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # let map = MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/db\"").unwrap();
    /// assert_eq!(map.shards()[0].pg_config().get_dbname(), Some("db"));
    /// ```
    pub fn pg_config(&self) -> &tokio_postgres::Config {
        &self.endpoint.config
    }

    /// How connections to the shard use TLS, from `sslmode` in its URL.
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// use shard_router::pg::SslMode;
    /// # let map = MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/db?sslmode=verify-full\"").unwrap();
    /// assert_eq!(map.shards()[0].ssl_mode(), SslMode::VerifyFull);
    /// ```
    pub fn ssl_mode(&self) -> crate::pg::SslMode {
        self.endpoint.tls.mode
    }

    /// Ring weight; 0 means the shard takes no new tenants but still serves its pins.
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # let map = MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/db\"").unwrap();
    /// assert_eq!(map.shards()[0].weight(), 1);
    /// ```
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// Pool settings.
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # let map = MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/db\"").unwrap();
    /// assert_eq!(map.shards()[0].pool().max_size, 16);
    /// ```
    pub fn pool(&self) -> &PoolSettings {
        &self.pool
    }

    /// Whether a router can keep this shard's pool when moving from `self` to `other`.
    pub(crate) fn same_connection(&self, other: &Shard) -> bool {
        self.url == other.url
            && self.pool == other.pool
            && self.replicas == other.replicas
            && self.max_replica_lag == other.max_replica_lag
    }
}

impl PartialEq for Shard {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.url == other.url
            && self.admin_url() == other.admin_url()
            && self.weight == other.weight
            && self.pool == other.pool
            && self.replicas == other.replicas
            && self.max_replica_lag == other.max_replica_lag
    }
}
impl Eq for Shard {}

impl PartialEq for Replica {
    fn eq(&self, other: &Self) -> bool {
        self.url == other.url && self.weight == other.weight && self.pool == other.pool
    }
}
impl Eq for Replica {}

impl fmt::Debug for Replica {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replica")
            .field("url", &self.redacted_url())
            .field("weight", &self.weight)
            .field("pool", &self.pool)
            .finish()
    }
}

impl fmt::Debug for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shard")
            .field("name", &self.name)
            .field("url", &self.redacted_url())
            .field("admin_url", &self.admin_url().map(redact_url))
            .field("weight", &self.weight)
            .field("pool", &self.pool)
            .field("replicas", &self.replicas)
            .field("max_replica_lag", &self.max_replica_lag)
            .finish()
    }
}

/// Pool settings of a shard (`pool = { ... }` under the shard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolSettings {
    /// Most connections open to the shard from one router. Default 16.
    pub max_size: usize,
    /// How long a request waits for a free connection before it gets 503. Default 2000 ms.
    pub wait_timeout: Duration,
    /// How long opening a new connection may take before it counts as failed. Default 2000 ms.
    pub connect_timeout: Duration,
    /// Most connections one tenant may hold at once from this shard's pool, so a
    /// hot tenant cannot starve the others (`tenant_max_connections`). Default: no cap.
    pub tenant_max_connections: Option<usize>,
    /// Connections unused for this long are closed (`idle_timeout_ms`; 0 in
    /// the map: never). Default 10 minutes.
    pub idle_timeout: Option<Duration>,
}

impl PoolSettings {
    /// What a pool built from these settings may hold and wait.
    pub(crate) fn limits(&self) -> crate::pg::PoolLimits {
        crate::pg::PoolLimits {
            max_size: self.max_size,
            wait_timeout: self.wait_timeout,
            connect_timeout: self.connect_timeout,
        }
    }
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_size: 16,
            wait_timeout: Duration::from_millis(2000),
            connect_timeout: Duration::from_millis(2000),
            tenant_max_connections: None,
            idle_timeout: Some(Duration::from_secs(600)),
        }
    }
}

/// How a tenant in flight is routed (`[moves.TENANT]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MoveRoute {
    /// The shard the tenant is leaving.
    pub from: ShardIndex,
    /// The shard the tenant is going to.
    pub to: ShardIndex,
    /// Which side serves reads.
    pub phase: MovePhase,
}

impl MoveRoute {
    /// The shard that serves reads in this phase.
    ///
    /// ```
    /// # use shard_router::map::{MapLoader, MovePhase};
    /// # use shard_router::TenantId;
    /// # let map = MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/a\"\n[shards.b]\nurl = \"postgres://h/b\"\n[moves.acme]\nfrom = \"a\"\nto = \"b\"\nphase = \"reversed\"").unwrap();
    /// let route = map.move_of(&TenantId::new("acme").unwrap()).unwrap();
    /// assert_eq!(route.phase, MovePhase::Reversed);
    /// assert_eq!(map.shard(route.reads()).name(), "b");
    /// ```
    pub fn reads(&self) -> ShardIndex {
        match self.phase {
            MovePhase::DualWrite => self.from,
            MovePhase::Reversed => self.to,
        }
    }
}

/// The phase of a move, as the map states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MovePhase {
    /// `dual_write`: reads from the source; writes go to both shards.
    DualWrite,
    /// `reversed`: reads from the target; writes still go to both shards.
    Reversed,
}

impl MovePhase {
    /// The phase's name in the map file.
    ///
    /// ```
    /// # use shard_router::map::MovePhase;
    /// assert_eq!(MovePhase::DualWrite.as_str(), "dual_write");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            MovePhase::DualWrite => "dual_write",
            MovePhase::Reversed => "reversed",
        }
    }
}

/// Where a tenant is served, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// The shard that serves the tenant's reads (and, unless moving, its writes).
    pub shard: ShardIndex,
    /// Why the tenant is there.
    pub reason: Reason,
}

/// Why a tenant is on its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reason {
    /// `[tenants]` pins it.
    Pin,
    /// The consistent-hash ring places it.
    Ring,
    /// It is moving (`[moves]`).
    Move(MoveRoute),
}

impl Reason {
    /// True for a tenant in flight whose reads come from the target.
    pub(crate) fn is_reversed_move(&self) -> bool {
        matches!(self, Reason::Move(route) if route.phase == MovePhase::Reversed)
    }

    /// `pin`, `ring` or `move`, as printed by `shardctl tenant locate --json`.
    ///
    /// ```
    /// # use shard_router::map::Reason;
    /// assert_eq!(Reason::Pin.as_str(), "pin");
    /// ```
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::Pin => "pin",
            Reason::Ring => "ring",
            Reason::Move(_) => "move",
        }
    }
}

impl ShardMap {
    /// Loads and validates `path`, with environment overrides (`SHARD_ROUTER__...`).
    /// Same as `MapLoader::new().load_file(path)`.
    ///
    /// ```no_run
    /// let map = shard_router::ShardMap::from_file("shard-map.toml").unwrap();
    /// ```
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<ShardMap, MapError> {
        MapLoader::new().load_file(path)
    }

    /// The map's version; routers never go back to a lower one.
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # let map = MapLoader::without_env().load_str("version = 4\n[shards.a]\nurl = \"postgres://h/db\"").unwrap();
    /// assert_eq!(map.version(), 4);
    /// ```
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Ring points per unit of weight (`[placement] vnodes`, default 128).
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # let map = MapLoader::without_env().load_str("version = 4\n[shards.a]\nurl = \"postgres://h/db\"").unwrap();
    /// assert_eq!(map.vnodes(), 128);
    /// ```
    pub fn vnodes(&self) -> u32 {
        self.vnodes
    }

    /// The column that marks a table as a tenant table (`tenant_column`, default `tenant_id`).
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # let map = MapLoader::without_env().load_str("version = 4\n[shards.a]\nurl = \"postgres://h/db\"").unwrap();
    /// assert_eq!(map.tenant_column(), "tenant_id");
    /// ```
    pub fn tenant_column(&self) -> &str {
        &self.tenant_column
    }

    /// The setting the router sets to the tenant id on every connection it gives
    /// out, for row-level security policies (`tenant_setting`, e.g. `app.tenant_id`).
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # let map = MapLoader::without_env().load_str("version = 4\ntenant_setting = \"app.tenant_id\"\n[shards.a]\nurl = \"postgres://h/db\"").unwrap();
    /// assert_eq!(map.tenant_setting(), Some("app.tenant_id"));
    /// ```
    pub fn tenant_setting(&self) -> Option<&str> {
        self.tenant_setting.as_deref()
    }

    /// How tenant ids are compared (`tenant_case`, default `exact`).
    ///
    /// ```
    /// # use shard_router::map::{MapLoader, TenantCase};
    /// # let map = MapLoader::without_env().load_str("version = 4\n[shards.a]\nurl = \"postgres://h/db\"").unwrap();
    /// assert_eq!(map.tenant_case(), TenantCase::Exact);
    /// ```
    pub fn tenant_case(&self) -> TenantCase {
        self.tenant_case
    }

    /// `tenant` as this map names it: lowercased under `tenant_case = "lower"`,
    /// unchanged otherwise. The router applies it to every id it is given.
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, TenantId};
    /// # let map = MapLoader::without_env().load_str("version = 4\n[shards.a]\nurl = \"postgres://h/db\"").unwrap();
    /// // The default, `exact`: ids are case-sensitive.
    /// assert_eq!(map.tenant_id(TenantId::new("ACME").unwrap()).as_str(), "ACME");
    /// ```
    pub fn tenant_id(&self, tenant: TenantId) -> TenantId {
        match self.tenant_case {
            TenantCase::Lower if has_upper(tenant.as_str()) => {
                TenantId::new(&tenant.as_str().to_ascii_lowercase())
                    .expect("lowercasing keeps a valid id valid")
            }
            _ => tenant,
        }
    }

    /// The shards, ordered by name; a [`ShardIndex`] is a position in this slice.
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # let map = MapLoader::without_env().load_str("version = 4\n[shards.b]\nurl = \"postgres://h/b\"\n[shards.a]\nurl = \"postgres://h/a\"").unwrap();
    /// let names: Vec<_> = map.shards().iter().map(|s| s.name()).collect();
    /// assert_eq!(names, ["a", "b"]);
    /// ```
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// The shard at `index`.
    ///
    /// # Panics
    /// If `index` came from another map with fewer shards.
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # let map = MapLoader::without_env().load_str("version = 4\n[shards.a]\nurl = \"postgres://h/a\"").unwrap();
    /// let a = map.shard_index("a").unwrap();
    /// assert_eq!(map.shard(a).name(), "a");
    /// ```
    pub fn shard(&self, index: ShardIndex) -> &Shard {
        &self.shards[index.get()]
    }

    /// The index of the shard named `name`.
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # let map = MapLoader::without_env().load_str("version = 4\n[shards.a]\nurl = \"postgres://h/a\"").unwrap();
    /// assert!(map.shard_index("zzz").is_none());
    /// ```
    pub fn shard_index(&self, name: &str) -> Option<ShardIndex> {
        self.shards
            .binary_search_by(|s| s.name.as_str().cmp(name))
            .ok()
            .map(|i| ShardIndex(i as u16))
    }

    /// Where `tenant` is served: its move if it is moving, else its pin, else the ring.
    ///
    /// ```
    /// # use shard_router::map::{MapLoader, Reason};
    /// # use shard_router::TenantId;
    /// # let map = MapLoader::without_env().load_str("version = 4\n[shards.a]\nurl = \"postgres://h/a\"").unwrap();
    /// let location = map.locate(&TenantId::new("anyone").unwrap());
    /// assert_eq!(location.reason, Reason::Ring);
    /// ```
    pub fn locate(&self, tenant: &TenantId) -> Location {
        let lowered;
        let id = match self.tenant_case {
            TenantCase::Lower if has_upper(tenant.as_str()) => {
                lowered = tenant.as_str().to_ascii_lowercase();
                lowered.as_str()
            }
            _ => tenant.as_str(),
        };
        if !self.moves.is_empty() {
            if let Some(route) = self.moves.get(id) {
                return Location {
                    shard: route.reads(),
                    reason: Reason::Move(*route),
                };
            }
        }
        if let Some(shard) = self.pins.get(id, pins::probe_hash(id.as_bytes())) {
            return Location {
                shard,
                reason: Reason::Pin,
            };
        }
        Location {
            // Validation guarantees a non-empty ring.
            shard: self.ring.locate(id).unwrap_or(ShardIndex(0)),
            reason: Reason::Ring,
        }
    }

    /// The move of `tenant`, if it is in flight.
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # use shard_router::TenantId;
    /// # let map = MapLoader::without_env().load_str("version = 4\n[shards.a]\nurl = \"postgres://h/a\"").unwrap();
    /// assert!(map.move_of(&TenantId::new("acme").unwrap()).is_none());
    /// ```
    pub fn move_of(&self, tenant: &TenantId) -> Option<MoveRoute> {
        self.moves.get(tenant.as_str()).copied()
    }

    /// The pins, sorted by tenant.
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # let map = MapLoader::without_env().load_str("version = 4\n[shards.a]\nurl = \"postgres://h/a\"\n[tenants]\nacme = \"a\"").unwrap();
    /// let pins = map.pins();
    /// assert_eq!(pins[0].0, "acme");
    /// ```
    pub fn pins(&self) -> Vec<(&str, ShardIndex)> {
        let mut pins: Vec<_> = self.pins.iter().collect();
        pins.sort_unstable();
        pins
    }

    /// Number of pinned tenants.
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # let map = MapLoader::without_env().load_str("version = 4\n[shards.a]\nurl = \"postgres://h/a\"").unwrap();
    /// assert_eq!(map.pin_count(), 0);
    /// ```
    pub fn pin_count(&self) -> usize {
        self.pins.len()
    }

    /// The moves in flight, sorted by tenant.
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # let map = MapLoader::without_env().load_str("version = 4\n[shards.a]\nurl = \"postgres://h/a\"").unwrap();
    /// assert!(map.moves().is_empty());
    /// ```
    pub fn moves(&self) -> Vec<(&str, MoveRoute)> {
        let mut moves: Vec<_> = self.moves.iter().map(|(t, m)| (&**t, *m)).collect();
        moves.sort_unstable_by(|a, b| a.0.cmp(b.0));
        moves
    }

    /// Number of points on the placement ring.
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # let map = MapLoader::without_env().load_str("version = 4\n[shards.a]\nurl = \"postgres://h/a\"\nweight = 2").unwrap();
    /// assert_eq!(map.ring_points(), 256);
    /// ```
    pub fn ring_points(&self) -> usize {
        self.ring.len()
    }

    /// True when `other` places every unpinned, unmoving tenant on the same shard.
    pub(crate) fn same_ring(&self, other: &ShardMap) -> bool {
        self.ring == other.ring
            && self.shards.len() == other.shards.len()
            && self
                .shards
                .iter()
                .zip(&other.shards)
                .all(|(a, b)| a.name == b.name)
    }

    /// Bytes of memory the pin index holds (about 40 to 90 per pin).
    ///
    /// ```
    /// # use shard_router::map::MapLoader;
    /// # let map = MapLoader::without_env().load_str("version = 4\n[shards.a]\nurl = \"postgres://h/a\"").unwrap();
    /// assert_eq!(map.pin_index_bytes(), 0);
    /// ```
    pub fn pin_index_bytes(&self) -> usize {
        self.pins.heap_bytes()
    }
}

/// Two maps are equal when they route every tenant alike over the same connections.
impl PartialEq for ShardMap {
    fn eq(&self, other: &Self) -> bool {
        self.version == other.version
            && self.vnodes == other.vnodes
            && self.tenant_column == other.tenant_column
            && self.tenant_setting == other.tenant_setting
            && self.tenant_case == other.tenant_case
            && self.shards == other.shards
            && self.pins == other.pins
            && self.moves == other.moves
    }
}
impl Eq for ShardMap {}

fn has_upper(id: &str) -> bool {
    id.bytes().any(|b| b.is_ascii_uppercase())
}

/// A connection string with every password replaced by `***`: the
/// `user:password@` of a URL, `password=` query parameters, and `password=`
/// in key=value strings (quoted values included). For logs and output.
///
/// ```
/// use shard_router::map::redact_url;
///
/// assert_eq!(redact_url("postgres://app:s3cret@h/db"), "postgres://app:***@h/db");
/// assert_eq!(redact_url("host=h password='s 3' dbname=db"), "host=h password=*** dbname=db");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return redact_key_values(url);
    };
    // First every secret parameter's value, wherever it stands (a value may
    // hold an `@`): up to the next `&`.
    let mut rest = rest.to_owned();
    let mut from = 0;
    while let Some(at) = rest[from..].find('=').map(|i| from + i) {
        let key_start = rest[..at].rfind(['?', '&']).map_or(0, |i| i + 1);
        let value_end = rest[at..].find('&').map_or(rest.len(), |i| at + i);
        if is_secret_key(&rest[key_start..at]) && rest[..key_start].contains('?') {
            rest.replace_range(at + 1..value_end, "***");
            from = at + 4;
        } else {
            from = at + 1;
        }
    }
    // Then the credentials: whatever comes before the last `@` (a password
    // may hold an unencoded `@`, `?`, `/` or `#`; tokio-postgres ends the
    // credentials at the first `@`, libpq at the last before the path, and
    // redacting too much is harmless).
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.find([':', '/', '?', '#']) {
            Some(end) => format!("{scheme}://{}:***@{host}", &userinfo[..end]),
            None => format!("{scheme}://{rest}"),
        },
        None => format!("{scheme}://{rest}"),
    }
}

/// Keys whose values are secrets, in URLs and key=value connection strings.
fn is_secret_key(key: &str) -> bool {
    key.trim().to_ascii_lowercase().ends_with("password")
}

/// `host=h password=secret dbname=d` with secret values replaced (quoted
/// values, with `\'` escapes, included).
fn redact_key_values(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            out.push(c);
            chars.next();
            continue;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek() != Some(&'=') {
            out.push_str(&key);
            continue;
        }
        chars.next();
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            value.push(chars.next().expect("peeked"));
            while let Some(c) = chars.next() {
                value.push(c);
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else if c == '\'' {
                    break;
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push_str(&key);
        out.push('=');
        out.push_str(if is_secret_key(&key) { "***" } else { &value });
    }
    out
}

#[cfg(test)]
mod redaction_tests {
    use super::redact_url;

    #[test]
    fn a_replica_password_shows_nowhere_in_a_map_or_the_router_status() {
        let map = super::MapLoader::without_env()
            .load_str(
                "version = 1\n[shards.a]\nurl = \"postgres://app@db/a\"\n\
                 replicas = [{ url = \"postgres://app:s3cret@replica/a\" }]",
            )
            .unwrap();
        assert!(!format!("{map:?}").contains("s3cret"));
        assert!(format!("{map:?}").contains("postgres://app:***@replica/a"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let router = crate::ShardRouter::new(map).unwrap();
            let status = serde_json::to_string(&router.status()).unwrap();
            assert!(!status.contains("s3cret"), "{status}");
            assert!(status.contains("***@replica"), "{status}");
        });
    }

    #[test]
    fn every_form_of_a_password_is_redacted() {
        for (url, want) in [
            ("postgres://app:s3cret@db/a", "postgres://app:***@db/a"),
            (
                "postgres://app@db/a?password=s3cret&sslmode=require",
                "postgres://app@db/a?password=***&sslmode=require",
            ),
            (
                "postgresql://db/a?user=app&PASSWORD=s3cret",
                "postgresql://db/a?user=app&PASSWORD=***",
            ),
            (
                "host=db user=app password=s3cret dbname=a",
                "host=db user=app password=*** dbname=a",
            ),
            (
                "host=db password = 's3 \\'cret' dbname=a",
                "host=db password=*** dbname=a",
            ),
            ("host=db sslpassword=s3cret", "host=db sslpassword=***"),
            ("postgres://db/a", "postgres://db/a"),
            // Unencoded `?`, `/` and `#` in a password (issue 26.5): the
            // credentials end at the first `@`, as tokio-postgres reads them.
            ("postgres://app:s3?cr/et#x@db/a", "postgres://app:***@db/a"),
            (
                "postgres://app:s3?cret@db/a?sslmode=require&password=s3",
                "postgres://app:***@db/a?sslmode=require&password=***",
            ),
            ("postgres://app:P@s3w0rd@db/a", "postgres://app:***@db/a"),
            (
                "postgres://db/a?user=app&password=p@s3",
                "postgres://db/a?user=app&password=***",
            ),
        ] {
            let got = redact_url(url);
            assert_eq!(got, want, "{url}");
            assert!(!got.contains("s3"), "{got}");
        }
    }
}
