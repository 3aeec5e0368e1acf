//! The control plane: shard maps, routers and moves in a Postgres database.
//!
//! The control database holds every published map version, a heartbeat row per
//! running router (with the version it applied), and move state. Publishing a
//! map inserts a version; a trigger NOTIFYs `shard_router_maps`, and every
//! [`ControlAgent`] applies it at once (with a polling fallback).
//!
//! * [`ControlPlane`]: a connection for operators and tools (`shardctl`): init,
//!   publish, history, routers, waiting for a rollout.
//! * [`ControlAgent`]: runs inside each router process and keeps its
//!   [`ShardRouter`](crate::ShardRouter) on the newest map.
//!
//! Maps are stored as published TOML. Each reader applies its own environment
//! overrides, so secrets such as passwords can stay out of the control database.

mod agent;
pub(crate) mod identity;
mod load;
mod publish;
mod rehoming;
mod schema;

use std::time::Duration;

use tokio_postgres::Client;

pub use agent::{ControlAgent, ControlOptions};
pub use load::{LoadOrder, LoadWindow, ReportedShard, ReportedTenant};
pub(crate) use publish::MoverPublish;
pub use publish::{PublishError, PublishOptions, Published, Stragglers};
pub use rehoming::{tenants_rehomed, RehomeError, Rehomed};
pub use schema::{schema_gaps, SchemaGap};

use crate::map::{placement, redact_url, MapLoader};
use crate::migrate::{self, Migrations};
use crate::ShardMap;

/// The control schema's own migration history table.
const CONTROL_HISTORY: &str = "shard_router_control_migrations";

/// The NOTIFY channel of new map versions.
pub(crate) const CHANNEL: &str = "shard_router_maps";

fn control_migrations() -> Migrations {
    Migrations::embedded(
        CONTROL_HISTORY,
        &[
            (
                "V1__control",
                include_str!("../../migrations/control/V1__control.sql"),
            ),
            (
                "V2__map_json",
                include_str!("../../migrations/control/V2__map_json.sql"),
            ),
            (
                "V3__move_lease",
                include_str!("../../migrations/control/V3__move_lease.sql"),
            ),
            (
                "V4__router_checksum",
                include_str!("../../migrations/control/V4__router_checksum.sql"),
            ),
            (
                "V5__load_reports",
                include_str!("../../migrations/control/V5__load_reports.sql"),
            ),
            (
                "V6__load_windows",
                include_str!("../../migrations/control/V6__load_windows.sql"),
            ),
            (
                "V7__roles",
                include_str!("../../migrations/control/V7__roles.sql"),
            ),
            (
                "V8__load_rows_own",
                include_str!("../../migrations/control/V8__load_rows_own.sql"),
            ),
        ],
    )
}

/// A failure talking to the control database.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The control database cannot be reached.
    #[error("control database {url} is unreachable: {}", crate::pg::error_text(&**.cause))]
    Unreachable {
        /// The URL, password redacted.
        url: String,
        /// Why: the driver's error, or what is wrong with the URL.
        #[source]
        cause: crate::pg::BoxError,
    },
    /// A statement failed.
    #[error("control database: {}", crate::pg::error_text(.cause))]
    Database {
        /// The driver's error: its SQLSTATE through `cause.code()`.
        #[source]
        cause: tokio_postgres::Error,
    },
    /// The control database did not answer in time.
    #[error("control database: no answer within {waited:?}")]
    Timeout {
        /// How long the router waited.
        waited: std::time::Duration,
    },
    /// Creating or upgrading the control schema failed.
    #[error("control database: schema migration failed: {cause}")]
    Schema {
        /// What the migration reported.
        cause: String,
    },
    /// The control schema is missing: run `shardctl control init`.
    #[error("the control database has no shard-router schema; run `shardctl control init --control URL`")]
    NotInitialized,
    /// The agent's options cannot work (a zero heartbeat, or a heartbeat not
    /// shorter than the lease, which would make a live router look stopped).
    #[error("invalid control agent options: {0}")]
    InvalidOptions(String),
    /// No map has been published yet.
    #[error("no shard map has been published to the control database yet")]
    NoMap,
    /// The router could not be built on the stored map.
    #[error("cannot build the router: {0}")]
    Router(#[from] crate::ApplyError),
    /// A stored map does not load here.
    #[error("stored map version {version} does not load: {cause}")]
    BadStoredMap {
        /// Its version.
        version: u64,
        /// Why.
        cause: String,
    },
}

impl From<tokio_postgres::Error> for ControlError {
    fn from(e: tokio_postgres::Error) -> Self {
        if e.as_db_error().map(|d| d.code())
            == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
        {
            return ControlError::NotInitialized;
        }
        ControlError::Database { cause: e }
    }
}

/// A published map version. Serializes without its TOML (as `shardctl --json
/// map history` prints it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct StoredMap {
    /// Its version.
    pub version: u64,
    /// The TOML as published.
    #[serde(skip)]
    pub toml: String,
    /// SipHash-1-3 (keys 0) of the TOML, hex.
    pub checksum: String,
    /// The publisher's note.
    pub note: Option<String>,
    /// When it was published (UTC, RFC 3339).
    pub created_at: String,
}

impl StoredMap {
    /// Loads the stored TOML with this process's environment overrides.
    ///
    /// ```no_run
    /// # async fn f(control: shard_router::control::ControlPlane) -> Result<(), Box<dyn std::error::Error>> {
    /// let map = control.latest().await?.load()?;
    /// # Ok(()) }
    /// ```
    pub fn load(&self) -> Result<ShardMap, ControlError> {
        MapLoader::new()
            .load_str(&self.toml)
            .map_err(|e| ControlError::BadStoredMap {
                version: self.version,
                cause: e.to_string(),
            })
    }
}

/// A router as its heartbeats show it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RouterRow {
    /// Its instance id.
    pub instance_id: String,
    /// Its host.
    pub host: String,
    /// The map version it applied.
    pub applied_version: u64,
    /// Milliseconds since its last heartbeat.
    pub last_seen_ms: u64,
    /// Its lease: past this since its last heartbeat it counts as stopped.
    pub lease_ms: u64,
    /// Whether this control database holds the map the router serves (same
    /// version, same checksum). False after a restore from a backup older
    /// than the router's map: such a router has not applied anything here.
    pub known: bool,
    /// The login that wrote the row (a router login may write only its own).
    pub login: String,
}

/// As `shardctl --json routers` prints it: the fields, and `stale`.
impl serde::Serialize for RouterRow {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut row = serializer.serialize_struct("RouterRow", 8)?;
        row.serialize_field("instance_id", &self.instance_id)?;
        row.serialize_field("host", &self.host)?;
        row.serialize_field("applied_version", &self.applied_version)?;
        row.serialize_field("last_seen_ms", &self.last_seen_ms)?;
        row.serialize_field("lease_ms", &self.lease_ms)?;
        row.serialize_field("stale", &self.is_stale())?;
        row.serialize_field("known", &self.known)?;
        row.serialize_field("login", &self.login)?;
        row.end()
    }
}

impl RouterRow {
    /// True when the router missed its lease (stopped, or cut off from the control database).
    ///
    /// ```no_run
    /// # async fn f(control: shard_router::control::ControlPlane) -> Result<(), shard_router::control::ControlError> {
    /// for row in control.routers().await? {
    ///     if row.is_stale() {
    ///         println!("{} missed its lease", row.instance_id);
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn is_stale(&self) -> bool {
        self.last_seen_ms > self.lease_ms
    }
}

#[cfg(test)]
mod router_row_tests {
    use super::RouterRow;

    #[test]
    fn a_router_is_stale_only_past_its_lease() {
        let row = |last_seen_ms| RouterRow {
            instance_id: "r1".into(),
            host: "h".into(),
            applied_version: 3,
            last_seen_ms,
            lease_ms: 3_000,
            known: true,
            login: "app_router".into(),
        };
        assert!(row(5_000).is_stale());
        assert!(!row(3_000).is_stale());
    }
}

/// How a rollout ended: routers that applied the version, and stale ones not waited for.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct Rollout {
    /// Live routers at or past the version.
    pub applied: Vec<RouterRow>,
    /// Routers whose lease passed; they are not waited for.
    pub stale: Vec<RouterRow>,
    /// Live routers still behind (empty unless the wait timed out).
    pub laggards: Vec<RouterRow>,
}

/// A connection to the control database, for operators and tools.
///
/// ```no_run
/// use shard_router::control::ControlPlane;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut control = ControlPlane::connect("postgres://postgres@127.0.0.1/control").await?;
/// control.init().await?;
/// for router in control.routers().await? {
///     println!("{} applied {}", router.instance_id, router.applied_version);
/// }
/// # Ok(()) }
/// ```
pub struct ControlPlane {
    pub(crate) client: Client,
    url: String,
    /// The URL as given (secrets included), for a mover's own session.
    connect_url: String,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("url", &self.url)
            .finish()
    }
}

impl ControlPlane {
    /// Connects to the control database at `url` (5 s connect timeout).
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), shard_router::control::ControlError> {
    /// let control = shard_router::control::ControlPlane::connect("postgres://postgres@127.0.0.1/control").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str) -> Result<Self, ControlError> {
        if let Ok(endpoint) = crate::pg::Endpoint::parse(url) {
            endpoint.warn_if_unverified("the control database");
        }
        let client = connect_client(url).await?;
        Ok(ControlPlane {
            client,
            url: redact_url(url),
            connect_url: url.to_owned(),
        })
    }

    /// Tenants whose move is recorded and not finished.
    pub(crate) async fn unfinished_moves(
        &self,
    ) -> Result<std::collections::BTreeSet<String>, ControlError> {
        Ok(self
            .client
            .query(
                "SELECT tenant FROM shard_router_moves WHERE phase NOT IN ('complete', 'aborted')",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// A new session on the same control database, for a mover's lock: it
    /// lives as long as the returned client, and the server drops it within
    /// about 11 s of the mover's host going silent (TCP keepalives), so a
    /// dead mover's lock ends even without a clean close.
    pub(crate) async fn mover_session(&self) -> Result<Client, ControlError> {
        let client = connect_client(&self.connect_url).await?;
        client
            .batch_execute(
                "SET application_name = 'shard-router mover'; SET tcp_keepalives_idle = 5; \
                 SET tcp_keepalives_interval = 2; SET tcp_keepalives_count = 3",
            )
            .await?;
        Ok(client)
    }

    /// The URL, password redacted.
    ///
    /// ```no_run
    /// # fn f(c: shard_router::control::ControlPlane) { println!("{}", c.url()); }
    /// ```
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Creates or upgrades the control schema; idempotent. Returns the
    /// schema versions applied now (empty when it was current).
    ///
    /// ```no_run
    /// # async fn f(mut c: shard_router::control::ControlPlane) -> Result<(), shard_router::control::ControlError> {
    /// let applied = c.init().await?;
    /// # Ok(()) }
    /// ```
    pub async fn init(&mut self) -> Result<Vec<u32>, ControlError> {
        let mut applied = Vec::new();
        migrate::apply_pending(
            "control",
            &mut self.client,
            &control_migrations(),
            &mut applied,
            &mut |_, _| {},
        )
        .await
        .map_err(|e| ControlError::Schema {
            cause: e.to_string(),
        })?;
        Ok(applied)
    }

    /// The newest published map.
    ///
    /// ```no_run
    /// # async fn f(c: shard_router::control::ControlPlane) -> Result<(), shard_router::control::ControlError> {
    /// println!("live: v{}", c.latest().await?.version);
    /// # Ok(()) }
    /// ```
    pub async fn latest(&self) -> Result<StoredMap, ControlError> {
        self.latest_opt().await?.ok_or(ControlError::NoMap)
    }

    pub(crate) async fn latest_opt(&self) -> Result<Option<StoredMap>, ControlError> {
        let rows = self
            .client
            .query(&format!("{SELECT_MAP} ORDER BY version DESC LIMIT 1"), &[])
            .await?;
        Ok(rows.first().map(stored_map))
    }

    /// Map version `version`, if it was published.
    ///
    /// ```no_run
    /// # async fn f(c: shard_router::control::ControlPlane) -> Result<(), shard_router::control::ControlError> {
    /// let v3 = c.get(3).await?;
    /// # Ok(()) }
    /// ```
    pub async fn get(&self, version: u64) -> Result<Option<StoredMap>, ControlError> {
        let rows = self
            .client
            .query(
                &format!("{SELECT_MAP} WHERE version = $1"),
                &[&(version as i64)],
            )
            .await?;
        Ok(rows.first().map(stored_map))
    }

    /// Every published version, oldest first.
    ///
    /// ```no_run
    /// # async fn f(c: shard_router::control::ControlPlane) -> Result<(), shard_router::control::ControlError> {
    /// for m in c.history().await? { println!("v{} {}", m.version, m.created_at); }
    /// # Ok(()) }
    /// ```
    pub async fn history(&self) -> Result<Vec<StoredMap>, ControlError> {
        let rows = self
            .client
            .query(&format!("{SELECT_MAP} ORDER BY version"), &[])
            .await?;
        Ok(rows.iter().map(stored_map).collect())
    }

    /// Every router that has sent a heartbeat, by instance id.
    ///
    /// ```no_run
    /// # async fn f(c: shard_router::control::ControlPlane) -> Result<(), shard_router::control::ControlError> {
    /// let stale = c.routers().await?.into_iter().filter(|r| r.is_stale()).count();
    /// # Ok(()) }
    /// ```
    pub async fn routers(&self) -> Result<Vec<RouterRow>, ControlError> {
        let rows = self
            .client
            .query(
                "SELECT instance_id, host, applied_version, \
                 greatest(0, (extract(epoch FROM clock_timestamp() - last_seen) * 1000))::bigint, lease_ms, \
                 EXISTS (SELECT 1 FROM shard_router_maps m WHERE m.version = r.applied_version \
                   AND (r.applied_checksum IS NULL OR m.checksum = r.applied_checksum)), \
                 login::text \
                 FROM shard_router_routers r ORDER BY instance_id",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| RouterRow {
                instance_id: r.get(0),
                host: r.get(1),
                applied_version: r.get::<_, i64>(2) as u64,
                last_seen_ms: r.get::<_, i64>(3) as u64,
                lease_ms: r.get::<_, i64>(4) as u64,
                known: r.get(5),
                login: r.get(6),
            })
            .collect())
    }

    /// Deletes router `instance_id`'s heartbeat row, so it no longer counts
    /// for `--wait` or as a router ahead; returns whether there was one. For
    /// a router that stopped for good, or one whose login reported what its
    /// router never served (revoke that login first, or it reports again).
    ///
    /// ```no_run
    /// # async fn f(c: shard_router::control::ControlPlane) -> Result<(), shard_router::control::ControlError> {
    /// if c.forget_router("router-7f3a").await? {
    ///     println!("forgotten");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn forget_router(&self, instance_id: &str) -> Result<bool, ControlError> {
        Ok(self
            .client
            .execute(
                "DELETE FROM shard_router_routers WHERE instance_id = $1",
                &[&instance_id],
            )
            .await?
            > 0)
    }

    /// Waits until every live router has applied `version` or later, for at most
    /// `timeout`. Routers whose lease passes are reported stale and not waited for.
    /// On timeout, [`Rollout::laggards`] names the routers still behind.
    ///
    /// ```no_run
    /// # async fn f(c: shard_router::control::ControlPlane) -> Result<(), shard_router::control::ControlError> {
    /// let rollout = c.wait_for(8, std::time::Duration::from_secs(30)).await?;
    /// assert!(rollout.laggards.is_empty());
    /// # Ok(()) }
    /// ```
    pub async fn wait_for(&self, version: u64, timeout: Duration) -> Result<Rollout, ControlError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let routers = self.routers().await?;
            let (stale, live): (Vec<_>, Vec<_>) = routers.into_iter().partition(|r| r.is_stale());
            // A router serving a map this database does not hold (a restore)
            // has applied nothing from here, whatever its number.
            let (applied, behind): (Vec<_>, Vec<_>) = live
                .into_iter()
                .partition(|r| r.known && r.applied_version >= version);
            if behind.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(Rollout {
                    applied,
                    stale,
                    laggards: behind,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the newest stored map (version `newest`) may not be what the
    /// routers serve: a live router reports a version above it, or a version
    /// whose map here has another checksum (a restored control database). With
    /// no map stored (`newest` 0), any live router at all.
    pub(crate) async fn base_is_suspect(&self, newest: u64) -> Result<bool, ControlError> {
        Ok(self
            .client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM shard_router_routers r \
                   LEFT JOIN shard_router_maps m ON m.version = r.applied_version \
                   WHERE (r.applied_version > $1 \
                      OR (r.applied_checksum IS NOT NULL AND m.checksum IS DISTINCT FROM r.applied_checksum)) \
                     AND clock_timestamp() - r.last_seen < r.lease_ms * interval '1 millisecond')",
                &[&(newest as i64)],
            )
            .await?
            .get(0))
    }

    /// Inserts `toml` as `version`, refusing a version that is not above the
    /// newest, a newest that is no longer `base` (the version the publisher's
    /// checks ran against), a change of move entries by anyone but their mover,
    /// and a mover whose lease token is no longer the move's.
    pub(crate) async fn insert(
        &mut self,
        version: u64,
        toml: &str,
        note: Option<&str>,
        base: Option<u64>,
        mover: Option<&publish::MoverPublish>,
    ) -> Result<(), PublishError> {
        let tx = self
            .client
            .transaction()
            .await
            .map_err(ControlError::from)?;
        // One publisher at a time, so "higher than the newest" holds at commit.
        tx.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&crate::pg::lock_keys::publish()],
        )
        .await
        .map_err(ControlError::from)?;
        let newest: Option<i64> = tx
            .query_one("SELECT max(version) FROM shard_router_maps", &[])
            .await
            .map_err(ControlError::from)?
            .get(0);
        if let Some(newest) = newest {
            if version <= newest as u64 {
                return Err(PublishError::NotNewer {
                    newest: newest as u64,
                    offered: version,
                });
            }
        }
        // After a restore from an older backup, routers may serve versions this
        // database never held: a new version must pass them, or it would be
        // refused by them as a conflict, or fence them by number alone.
        let ahead = tx
            .query(
                "SELECT instance_id, applied_version, login::text FROM shard_router_routers \
                 WHERE applied_version >= $1 \
                   AND clock_timestamp() - last_seen < lease_ms * interval '1 millisecond' \
                 ORDER BY instance_id",
                &[&(version as i64)],
            )
            .await
            .map_err(ControlError::from)?;
        if !ahead.is_empty() {
            let mut logins: Vec<String> = ahead.iter().map(|r| r.get(2)).collect();
            logins.sort();
            logins.dedup();
            return Err(PublishError::RoutersAhead {
                offered: version,
                routers: ahead
                    .iter()
                    .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
                    .collect(),
                logins,
            });
        }
        if newest.map(|v| v as u64) != base {
            return Err(PublishError::Concurrent {
                base: base.unwrap_or(0),
                newest: newest.unwrap_or(0) as u64,
            });
        }
        if let Some(newest) = newest {
            let stored: String = tx
                .query_one(
                    "SELECT map FROM shard_router_maps WHERE version = $1",
                    &[&newest],
                )
                .await
                .map_err(ControlError::from)?
                .get(0);
            publish::check_moves(&stored, toml, mover)?;
        }
        if let Some(mover) = mover {
            // The move row stays locked until this version is in. Token,
            // holder and intent must all still be this mover's: a restore can
            // bring a token back, or roll the intent back under a live mover.
            let current = tx
                .query_opt(
                    "SELECT 1 FROM shard_router_moves WHERE tenant = $1 AND lease_token = $2 \
                       AND lease_holder = $3 AND intent = $4 FOR UPDATE",
                    &[&mover.tenant, &mover.token, &mover.holder, &mover.intent],
                )
                .await
                .map_err(ControlError::from)?;
            if current.is_none() {
                return Err(PublishError::MoverFenced {
                    tenant: mover.tenant.clone(),
                });
            }
        }
        let json = toml_to_json(toml).map_err(PublishError::Rewrite)?;
        tx.execute(
            "INSERT INTO shard_router_maps (version, map, map_json, checksum, note) \
             VALUES ($1, $2, $3, $4, $5)",
            &[&(version as i64), &toml, &json, &checksum(toml), &note],
        )
        .await
        .map_err(ControlError::from)?;
        tx.commit().await.map_err(ControlError::from)?;
        Ok(())
    }
}

const SELECT_MAP: &str = "SELECT version, map, checksum, note, \
     to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') \
     FROM shard_router_maps";

fn stored_map(row: &tokio_postgres::Row) -> StoredMap {
    StoredMap {
        version: row.get::<_, i64>(0) as u64,
        toml: row.get(1),
        checksum: row.get(2),
        note: row.get(3),
        created_at: row.get(4),
    }
}

/// The JSON form of a map's TOML, stored for routers to parse quickly.
pub fn toml_to_json(toml: &str) -> Result<String, String> {
    let table: toml::Table = toml.parse().map_err(|e: toml::de::Error| e.to_string())?;
    serde_json::to_string(&table).map_err(|e| e.to_string())
}

/// The checksum stored with a map: SipHash-1-3 (keys 0) of its text, hex.
pub(crate) fn checksum(toml: &str) -> String {
    format!("{:016x}", placement::hash_bytes(toml.as_bytes()))
}

/// A connection to the control database; the caller drives the connection.
pub(crate) async fn open(url: &str) -> Result<(Client, ControlConnection), ControlError> {
    let unreachable = |cause| ControlError::Unreachable {
        url: redact_url(url),
        cause,
    };
    crate::pg::Endpoint::parse(url)
        .map_err(|e| unreachable(e.into()))?
        .connect(Duration::from_secs(5))
        .await
        .map_err(unreachable)
}

/// The connection half of [`open`].
pub(crate) type ControlConnection = crate::pg::Connection;

async fn connect_client(url: &str) -> Result<Client, ControlError> {
    let (client, connection) = open(url).await?;
    tokio::spawn(connection);
    Ok(client)
}
