//! Moving a tenant between shards online: start, backfill, verify, cutover,
//! complete, or abort; every step resumable after a crash.
//!
//! | step | the map says | reads | writes | done when |
//! | --- | --- | --- | --- | --- |
//! | start | tenant in `moves`, `dual_write` | source | source, then target, under the source lock | target cleared of the tenant's stale rows, map applied by every live router, fence raised |
//! | backfill | unchanged | source | both | every tenant table copied in key order, batch by batch under the tenant lock |
//! | verify | unchanged | source | both | row counts and content checksums equal on both shards, taken under the tenant lock |
//! | cutover | `reversed` | target | target and source | map applied by every live router, fence raised |
//! | complete | tenant pinned to target | target | target | map applied, fence raised; source rows purged if asked |
//! | abort | tenant pinned to source | source | source | target's copied rows removed (after cutover, reads go back to the source first) |
//!
//! Each step that changes routing publishes a new map version through the
//! control database, waits for every live router to apply it, and then raises
//! the tenant's [`fence`] on both shards to that version, so a router
//! left on an older map has its writes for the tenant refused by the shards.
//! The move's phase and progress live in the control table `shard_router_moves`;
//! [`resume`] continues from the last finished step.
//!
//! Mirrored writes must be deterministic (see [`crate::db`]); verify catches
//! rows that differ, such as ids drawn from per-shard sequences.

mod catalog;
pub mod fence;

use std::time::{Duration, Instant};

use serde_json::json;
use tokio_postgres::Client;

pub use catalog::TenantTable;

use crate::control::{ControlError, ControlPlane, PublishError, PublishOptions};
use crate::db::{move_lock_key, VERSION_SETTING};
use crate::map::Shard;
use crate::migrate::{self, error_text, ShardError};
use crate::{ShardMap, TenantId};

/// The steps of a move, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// Dual writes on: the map names the move, the target is cleared, the fence is up.
    Start,
    /// The tenant's rows are copied to the target.
    Backfill,
    /// Both shards hold the same rows.
    Verify,
    /// Reads come from the target.
    Cutover,
    /// The tenant is pinned to the target; the move is over.
    Complete,
}

impl Step {
    const ALL: [Step; 5] = [
        Step::Start,
        Step::Backfill,
        Step::Verify,
        Step::Cutover,
        Step::Complete,
    ];

    /// The phase recorded once this step is done.
    fn done_phase(self) -> &'static str {
        match self {
            Step::Start => "dual_write",
            Step::Backfill => "backfilled",
            Step::Verify => "verified",
            Step::Cutover => "reversed",
            Step::Complete => "complete",
        }
    }

    /// The step's name, as `--until` takes it.
    ///
    /// ```
    /// assert_eq!(shard_router::moves::Step::Backfill.as_str(), "backfill");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Start => "start",
            Step::Backfill => "backfill",
            Step::Verify => "verify",
            Step::Cutover => "cutover",
            Step::Complete => "complete",
        }
    }

    /// Parses a step name.
    ///
    /// ```
    /// use shard_router::moves::Step;
    /// assert_eq!(Step::parse("verify"), Some(Step::Verify));
    /// ```
    pub fn parse(name: &str) -> Option<Step> {
        Step::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// The next step to run after `phase` was recorded.
    fn after(phase: &str) -> Option<Step> {
        match phase {
            "starting" => Some(Step::Start),
            "dual_write" => Some(Step::Backfill),
            "backfilled" => Some(Step::Verify),
            "verified" => Some(Step::Cutover),
            "reversed" => Some(Step::Complete),
            _ => None,
        }
    }
}

/// How to run a move.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MoveOptions {
    /// How long to wait for every live router to apply each new map. Default 30 s.
    pub wait: Duration,
    /// Rows per backfill batch (each under the tenant lock). Default 1000.
    pub batch_rows: usize,
    /// Delete the tenant's rows from the source after complete. Default false.
    pub purge_source: bool,
    /// Stop after this step. Default: run to complete.
    pub until: Step,
}

impl Default for MoveOptions {
    fn default() -> Self {
        MoveOptions {
            wait: Duration::from_secs(30),
            batch_rows: 1000,
            purge_source: false,
            until: Step::Complete,
        }
    }
}

/// Progress reports for bars and logs.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Progress {
    /// A step began.
    Step(Step),
    /// Backfill copied `rows` more rows of `table`.
    Copied {
        /// The table.
        table: String,
        /// Rows in this batch.
        rows: u64,
    },
    /// Verify checked `table`.
    Verified {
        /// The table.
        table: String,
        /// Its rows on the source.
        rows: i64,
    },
}

/// One table whose copies differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The table.
    pub table: String,
    /// Rows on the source.
    pub source_rows: i64,
    /// Rows on the target.
    pub target_rows: i64,
    /// Whether the contents' checksums differ (they can differ with equal counts).
    pub checksums_differ: bool,
}

/// Why a move step failed. The move keeps the phase it had reached; fix the
/// cause and `resume`, or `abort`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MoveError {
    /// The control database failed.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// A map version could not be published.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// A shard could not be reached.
    #[error(transparent)]
    Shard(#[from] ShardError),
    /// A statement failed on a shard.
    #[error("move: {cause}")]
    Database {
        /// The database's error.
        cause: String,
    },
    /// A tenant table has no primary key, so rows cannot be copied in key order.
    #[error("tenant table {table} has no primary key; moves copy in key order and need one")]
    NoPrimaryKey {
        /// The table.
        table: String,
    },
    /// Foreign keys among tenant tables form a cycle.
    #[error("foreign keys among tenant tables form a cycle: {}", tables.join(", "))]
    ForeignKeyCycle {
        /// The tables in the cycle (and those behind them).
        tables: Vec<String>,
    },
    /// The tenant already has a move that is not finished.
    #[error("tenant {tenant} is already moving ({phase}); resume or abort that move")]
    AlreadyMoving {
        /// The tenant.
        tenant: String,
        /// That move's phase.
        phase: String,
    },
    /// There is no unfinished move of the tenant.
    #[error("tenant {tenant} has no unfinished move")]
    NoMove {
        /// The tenant.
        tenant: String,
    },
    /// The target shard is not in the map, or is the tenant's shard already.
    #[error("cannot move tenant {tenant} to {to}: {reason}")]
    BadTarget {
        /// The tenant.
        tenant: String,
        /// The shard asked for.
        to: String,
        /// Why.
        reason: String,
    },
    /// Live routers did not apply a map version in time.
    #[error("map version {version} not applied within {waited:?} by: {}; the move stays where it was, resume when they catch up", laggards.join(", "))]
    RoutersBehind {
        /// The version.
        version: u64,
        /// How long it waited.
        waited: Duration,
        /// The routers still behind.
        laggards: Vec<String>,
    },
    /// Verify found differences; cutover is refused.
    #[error("verify failed for tenant {tenant}; cutover refused: {}", mismatches.iter().map(|m| format!("{} (source {} rows, target {} rows{})", m.table, m.source_rows, m.target_rows, if m.checksums_differ { ", contents differ" } else { "" })).collect::<Vec<_>>().join("; "))]
    VerifyFailed {
        /// The tenant.
        tenant: String,
        /// The tables that differ.
        mismatches: Vec<Mismatch>,
    },
    /// The move is complete; it can no longer be aborted.
    #[error("the move of tenant {tenant} is complete; move it back with a new move instead")]
    Finished {
        /// The tenant.
        tenant: String,
    },
}

impl MoveError {
    fn db(e: tokio_postgres::Error) -> MoveError {
        MoveError::Database {
            cause: error_text(&e),
        }
    }
}

/// A move as the control database records it.
#[derive(Debug, Clone, PartialEq)]
pub struct MoveStatus {
    /// The tenant.
    pub tenant: String,
    /// Source shard.
    pub from: String,
    /// Target shard.
    pub to: String,
    /// `starting`, `dual_write`, `backfilled`, `verified`, `reversed`, `complete` or `aborted`.
    pub phase: String,
    /// Rows copied per table, checksums, versions published, step timings.
    pub state: serde_json::Value,
    /// The last error, if the move stopped on one.
    pub error: Option<String>,
}

/// Starts moving `tenant` to shard `to` and runs it up to `options.until`.
///
/// ```no_run
/// # use shard_router::{control::ControlPlane, moves::{self, MoveOptions}, TenantId};
/// # async fn f(mut control: ControlPlane) -> Result<(), shard_router::moves::MoveError> {
/// let tenant = TenantId::new("acme").unwrap();
/// moves::start(&mut control, &tenant, "b", &MoveOptions::default(), |p| println!("{p:?}")).await?;
/// # Ok(()) }
/// ```
pub async fn start(
    control: &mut ControlPlane,
    tenant: &TenantId,
    to: &str,
    options: &MoveOptions,
    progress: impl FnMut(Progress),
) -> Result<MoveStatus, MoveError> {
    if let Some(existing) = status(control, tenant).await? {
        if existing.phase != "complete" && existing.phase != "aborted" {
            return Err(MoveError::AlreadyMoving {
                tenant: tenant.to_string(),
                phase: existing.phase,
            });
        }
    }
    let map = control.latest().await?.load()?;
    let bad = |reason: &str| MoveError::BadTarget {
        tenant: tenant.to_string(),
        to: to.to_owned(),
        reason: reason.to_owned(),
    };
    if map.shard_index(to).is_none() {
        return Err(bad("no such shard in the map"));
    }
    if map.move_of(tenant).is_some() {
        return Err(bad("the map already shows the tenant moving"));
    }
    let from = map.shard(map.locate(tenant).shard).name().to_owned();
    if from == to {
        return Err(bad("the tenant is already there"));
    }
    // Refuse what backfill cannot copy before anything is recorded or changed.
    for name in [&from, &to.to_owned()] {
        let client = migrate::connect(shard_named(&map, name)?).await?;
        catalog::tenant_tables(&client, map.tenant_column()).await?;
    }
    control
        .client
        .execute(
            "INSERT INTO shard_router_moves (tenant, from_shard, to_shard, phase, state) \
             VALUES ($1, $2, $3, 'starting', '{}') \
             ON CONFLICT (tenant) DO UPDATE SET from_shard = EXCLUDED.from_shard, \
               to_shard = EXCLUDED.to_shard, phase = 'starting', state = '{}', error = NULL, \
               started_at = now(), updated_at = now()",
            &[&tenant.as_str(), &from, &to],
        )
        .await
        .map_err(ControlError::from)?;
    resume(control, tenant, options, progress).await
}

/// Continues the tenant's unfinished move from its last finished step.
///
/// ```no_run
/// # use shard_router::{control::ControlPlane, moves::{self, MoveOptions}, TenantId};
/// # async fn f(mut control: ControlPlane) -> Result<(), shard_router::moves::MoveError> {
/// moves::resume(&mut control, &TenantId::new("acme").unwrap(), &MoveOptions::default(), |_| {}).await?;
/// # Ok(()) }
/// ```
pub async fn resume(
    control: &mut ControlPlane,
    tenant: &TenantId,
    options: &MoveOptions,
    mut progress: impl FnMut(Progress),
) -> Result<MoveStatus, MoveError> {
    let record = recorded(control, tenant).await?;
    let Some(first) = Step::after(&record.phase) else {
        return Err(no_move(tenant));
    };
    let mut mover = Mover::new(control, tenant, &record, options);
    for step in Step::ALL
        .into_iter()
        .filter(|s| *s >= first && *s <= options.until)
    {
        progress(Progress::Step(step));
        let started = Instant::now();
        let result = match step {
            Step::Start => mover.start().await,
            Step::Backfill => mover.backfill(&mut progress).await,
            Step::Verify => mover.verify(&mut progress).await,
            Step::Cutover => mover.route(MapChange::Phase("reversed")).await,
            Step::Complete => mover.complete().await,
        };
        match result {
            Ok(()) => {
                mover
                    .record(step.done_phase(), json!({ format!("{}_ms", step.as_str()): started.elapsed().as_millis() as u64 }), None)
                    .await?;
            }
            Err(e) => {
                let _ = mover.record_error(&e).await;
                return Err(e);
            }
        }
    }
    recorded(mover.control, tenant).await
}

fn no_move(tenant: &TenantId) -> MoveError {
    MoveError::NoMove {
        tenant: tenant.to_string(),
    }
}

/// The tenant's move record, which must exist.
async fn recorded(control: &ControlPlane, tenant: &TenantId) -> Result<MoveStatus, MoveError> {
    status(control, tenant)
        .await?
        .ok_or_else(|| no_move(tenant))
}

/// Aborts the tenant's unfinished move: reads go back to the source (first, if
/// the move was past cutover), the tenant is pinned to the source, and the rows
/// copied to the target are removed. Refused once the move is complete.
///
/// ```no_run
/// # use shard_router::{control::ControlPlane, moves::{self, MoveOptions}, TenantId};
/// # async fn f(mut control: ControlPlane) -> Result<(), shard_router::moves::MoveError> {
/// moves::abort(&mut control, &TenantId::new("acme").unwrap(), &MoveOptions::default()).await?;
/// # Ok(()) }
/// ```
pub async fn abort(
    control: &mut ControlPlane,
    tenant: &TenantId,
    options: &MoveOptions,
) -> Result<MoveStatus, MoveError> {
    let record = recorded(control, tenant).await?;
    match record.phase.as_str() {
        "complete" => {
            return Err(MoveError::Finished {
                tenant: tenant.to_string(),
            })
        }
        "aborted" => return Err(no_move(tenant)),
        _ => {}
    }
    let mut mover = Mover::new(control, tenant, &record, options);
    let result = async {
        if record.phase == "reversed" {
            // Reads back to the source while writes still reach both shards.
            mover.route(MapChange::Phase("dual_write")).await?;
        }
        // A move stopped while starting may not have published its map yet.
        if record.phase != "starting" || mover.map_shows_move().await? {
            mover.route(MapChange::PinTo(Side::Source)).await?;
        }
        let map = mover.control.latest().await?.load()?;
        let target = shard_named(&map, &mover.to)?;
        let client = migrate::connect(target).await?;
        mover.delete_rows(&client, &map).await
    }
    .await;
    match result {
        Ok(()) => mover.record("aborted", json!({}), None).await?,
        Err(e) => {
            let _ = mover.record_error(&e).await;
            return Err(e);
        }
    }
    recorded(mover.control, tenant).await
}

/// The tenant's move as recorded, if it ever had one.
///
/// ```no_run
/// # use shard_router::{control::ControlPlane, moves, TenantId};
/// # async fn f(control: ControlPlane) -> Result<(), shard_router::moves::MoveError> {
/// if let Some(m) = moves::status(&control, &TenantId::new("acme").unwrap()).await? {
///     println!("{} -> {}: {}", m.from, m.to, m.phase);
/// }
/// # Ok(()) }
/// ```
pub async fn status(
    control: &ControlPlane,
    tenant: &TenantId,
) -> Result<Option<MoveStatus>, MoveError> {
    let row = control
        .client
        .query_opt(
            "SELECT tenant, from_shard, to_shard, phase, state::text, error FROM shard_router_moves WHERE tenant = $1",
            &[&tenant.as_str()],
        )
        .await
        .map_err(ControlError::from)?;
    Ok(row.map(|r| MoveStatus {
        tenant: r.get(0),
        from: r.get(1),
        to: r.get(2),
        phase: r.get(3),
        state: serde_json::from_str(r.get::<_, &str>(4)).unwrap_or_default(),
        error: r.get(5),
    }))
}

#[derive(Clone, Copy)]
enum Side {
    Source,
    Target,
}

enum MapChange {
    /// The tenant in `moves` with this phase.
    Phase(&'static str),
    /// The tenant out of `moves`, pinned to a side.
    PinTo(Side),
}

struct Mover<'a> {
    control: &'a mut ControlPlane,
    tenant: TenantId,
    from: String,
    to: String,
    options: MoveOptions,
}

fn shard_named<'m>(map: &'m ShardMap, name: &str) -> Result<&'m Shard, MoveError> {
    map.shard_index(name)
        .map(|i| map.shard(i))
        .ok_or_else(|| MoveError::Database {
            cause: format!("shard {name} is no longer in the map"),
        })
}

/// Runs a verify query: (rows, md5 of their contents in key order).
async fn count_and_sum(
    client: &Client,
    sql: &str,
    tenant: &TenantId,
) -> Result<(i64, String), MoveError> {
    let row = client
        .query_one(sql, &[&tenant.as_str()])
        .await
        .map_err(MoveError::db)?;
    Ok((row.get(0), row.get(1)))
}

/// A transaction that declares `version`, so the fence lets it write.
async fn begin(client: &Client, version: u64) -> Result<(), MoveError> {
    client
        .batch_execute(&format!("BEGIN; SET LOCAL {VERSION_SETTING} = '{version}'"))
        .await
        .map_err(MoveError::db)
}

impl<'a> Mover<'a> {
    fn new(
        control: &'a mut ControlPlane,
        tenant: &TenantId,
        record: &MoveStatus,
        options: &MoveOptions,
    ) -> Self {
        Mover {
            control,
            tenant: tenant.clone(),
            from: record.from.clone(),
            to: record.to.clone(),
            options: options.clone(),
        }
    }

    async fn record(
        &mut self,
        phase: &str,
        patch: serde_json::Value,
        error: Option<String>,
    ) -> Result<(), MoveError> {
        self.control
            .client
            .execute(
                "UPDATE shard_router_moves SET phase = $2, state = state || $3::text::jsonb, \
                 error = $4, updated_at = now() WHERE tenant = $1",
                &[&self.tenant.as_str(), &phase, &patch.to_string(), &error],
            )
            .await
            .map_err(ControlError::from)?;
        Ok(())
    }

    async fn record_error(&mut self, e: &MoveError) -> Result<(), MoveError> {
        self.control
            .client
            .execute(
                "UPDATE shard_router_moves SET error = $2, updated_at = now() WHERE tenant = $1",
                &[&self.tenant.as_str(), &e.to_string()],
            )
            .await
            .map_err(ControlError::from)?;
        Ok(())
    }

    async fn map_shows_move(&mut self) -> Result<bool, MoveError> {
        let map = self.control.latest().await?.load()?;
        Ok(map.move_of(&self.tenant).is_some())
    }

    /// Both shards' clients, and the map.
    async fn shards(&mut self) -> Result<(ShardMap, Client, Client), MoveError> {
        let map = self.control.latest().await?.load()?;
        let source = migrate::connect(shard_named(&map, &self.from)?).await?;
        let target = migrate::connect(shard_named(&map, &self.to)?).await?;
        Ok((map, source, target))
    }

    async fn start(&mut self) -> Result<(), MoveError> {
        let (map, source, target) = self.shards().await?;
        let tables = catalog::tenant_tables(&source, map.tenant_column()).await?;
        fence::install(&source, map.tenant_column(), &tables).await?;
        let target_tables = catalog::tenant_tables(&target, map.tenant_column()).await?;
        fence::install(&target, map.tenant_column(), &target_tables).await?;
        // Stale rows of the tenant on the target (an earlier move, say) go first,
        // before any dual write can reach it.
        self.delete_rows(&target, &map).await?;
        self.route(MapChange::Phase("dual_write")).await
    }

    /// Publishes the change unless the newest map already has it, waits for the
    /// routers, and raises the fence on both shards to that version.
    async fn route(&mut self, change: MapChange) -> Result<(), MoveError> {
        let stored = self.control.latest().await?;
        let map = stored.load()?;
        let mut doc: toml::Table = stored
            .toml
            .parse()
            .map_err(|e: toml::de::Error| PublishError::Rewrite(e.to_string()))?;
        let tenant = self.tenant.as_str().to_owned();
        let (note, wanted_shard) = match change {
            MapChange::Phase(phase) => {
                if let Some(toml::Value::Table(pins)) = doc.get_mut("tenants") {
                    pins.remove(&tenant);
                }
                let moves = doc
                    .entry("moves")
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if let toml::Value::Table(moves) = moves {
                    let mut entry = toml::Table::new();
                    entry.insert("from".into(), toml::Value::String(self.from.clone()));
                    entry.insert("to".into(), toml::Value::String(self.to.clone()));
                    entry.insert("phase".into(), toml::Value::String(phase.into()));
                    moves.insert(tenant.clone(), toml::Value::Table(entry));
                }
                (format!("move {tenant}: {phase}"), None)
            }
            MapChange::PinTo(side) => {
                let shard = match side {
                    Side::Source => self.from.clone(),
                    Side::Target => self.to.clone(),
                };
                if let Some(toml::Value::Table(moves)) = doc.get_mut("moves") {
                    moves.remove(&tenant);
                }
                let pins = doc
                    .entry("tenants")
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if let toml::Value::Table(pins) = pins {
                    pins.insert(tenant.clone(), toml::Value::String(shard.clone()));
                }
                (format!("move {tenant}: pinned to {shard}"), Some(shard))
            }
        };
        // Already published (a resumed move)? Then only wait and fence.
        let current = map.move_of(&self.tenant);
        let already = match (&change, current) {
            (MapChange::Phase(phase), Some(route)) => route.phase.as_str() == *phase,
            (MapChange::PinTo(_), None) => map.pins().iter().any(|(t, s)| {
                *t == tenant && Some(map.shard(*s).name().to_owned()) == wanted_shard
            }),
            _ => false,
        };
        let version = if already {
            map.version()
        } else {
            doc.insert(
                "version".into(),
                toml::Value::Integer(map.version() as i64 + 1),
            );
            let text = toml::to_string(&doc).map_err(|e| PublishError::Rewrite(e.to_string()))?;
            self.control
                .publish(&text, &PublishOptions::with_note(&note))
                .await?
                .version
        };
        let rollout = self.control.wait_for(version, self.options.wait).await?;
        if !rollout.laggards.is_empty() {
            return Err(MoveError::RoutersBehind {
                version,
                waited: self.options.wait,
                laggards: rollout
                    .laggards
                    .into_iter()
                    .map(|r| r.instance_id)
                    .collect(),
            });
        }
        let (_, source, target) = self.shards().await?;
        fence::raise(&source, &tenant, version).await?;
        fence::raise(&target, &tenant, version).await?;
        self.record_version(&note, version).await
    }

    async fn record_version(&mut self, what: &str, version: u64) -> Result<(), MoveError> {
        self.control
            .client
            .execute(
                "UPDATE shard_router_moves SET state = jsonb_set(state, '{versions}', \
                   coalesce(state->'versions', '{}') || jsonb_build_object($2::text, $3::bigint)), \
                 updated_at = now() WHERE tenant = $1",
                &[&self.tenant.as_str(), &what, &(version as i64)],
            )
            .await
            .map_err(ControlError::from)?;
        Ok(())
    }

    async fn backfill(&mut self, progress: &mut impl FnMut(Progress)) -> Result<(), MoveError> {
        let (map, source, target) = self.shards().await?;
        let version = map.version();
        let column = map.tenant_column().to_owned();
        let tables = catalog::tenant_tables(&source, &column).await?;
        self.wait_for_writes_in_flight(&source, &tables).await?;
        let mut copied = serde_json::Map::new();
        for table in &tables {
            let total = self
                .copy_table(&source, &target, table, &column, version, progress)
                .await?;
            copied.insert(table.name.clone(), json!(total));
            self.record("dual_write", json!({ "rows_copied": copied }), None)
                .await?;
        }
        Ok(())
    }

    /// Copies one table's rows of the tenant in key order, batch by batch. Each
    /// batch streams with binary COPY into a staging table on the target and is
    /// upserted from there, all while the tenant lock is held on the source, so
    /// no dual write slips between reading a batch and writing it.
    async fn copy_table(
        &self,
        source: &Client,
        target: &Client,
        table: &TenantTable,
        column: &str,
        version: u64,
        progress: &mut impl FnMut(Progress),
    ) -> Result<u64, MoveError> {
        let name = &table.name;
        let columns = table.columns.join(", ");
        let order = table.key.join(", ");
        let non_key: Vec<&String> = table
            .columns
            .iter()
            .filter(|c| !table.key.contains(c))
            .collect();
        let on_conflict = if non_key.is_empty() {
            "DO NOTHING".to_owned()
        } else {
            format!(
                "DO UPDATE SET ({}) = ROW({})",
                non_key
                    .iter()
                    .map(|c| c.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                non_key
                    .iter()
                    .map(|c| format!("EXCLUDED.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        // COPY takes no parameters: tenant and resume key travel in
        // transaction-local settings, so no value is ever spliced into SQL.
        let after = format!(
            "({order}) > (SELECT {keys} FROM jsonb_populate_record(NULL::{name}, \
             current_setting('shard_router.copy_after')::jsonb) r)",
            keys = table
                .key
                .iter()
                .map(|k| format!("r.{k}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let select = |resume: bool| {
            format!(
                "COPY (SELECT {columns} FROM {name} WHERE {column} = current_setting('shard_router.copy_tenant') \
                 {} ORDER BY {order} LIMIT {}) TO STDOUT (FORMAT binary)",
                if resume { format!("AND {after}") } else { String::new() },
                self.options.batch_rows
            )
        };
        target
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS pg_temp.shard_router_stage; \
                 CREATE TEMP TABLE shard_router_stage AS SELECT {columns} FROM {name} WITH NO DATA"
            ))
            .await
            .map_err(MoveError::db)?;
        let upsert = format!(
            "INSERT INTO {name} ({columns}) SELECT {columns} FROM pg_temp.shard_router_stage \
             ON CONFLICT ({order}) {on_conflict}"
        );
        let last_key = format!(
            "SELECT to_jsonb(s)::text FROM pg_temp.shard_router_stage s ORDER BY {} LIMIT 1",
            table
                .key
                .iter()
                .map(|k| format!("{k} DESC"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let lock = move_lock_key(&self.tenant);
        let mut total = 0u64;
        let mut last: Option<String> = None;
        loop {
            begin(source, version).await?;
            begin(target, version).await?;
            let batch = async {
                source
                    .query(
                        "SELECT pg_advisory_xact_lock($1), set_config('shard_router.copy_tenant', $2, true), \
                         set_config('shard_router.copy_after', $3, true)",
                        &[&lock, &self.tenant.as_str(), &last.clone().unwrap_or_default()],
                    )
                    .await?;
                let rows = source.copy_out(&select(last.is_some())).await?;
                let sink = target
                    .copy_in(&format!("COPY pg_temp.shard_router_stage ({columns}) FROM STDIN (FORMAT binary)"))
                    .await?;
                futures_util::pin_mut!(rows);
                futures_util::pin_mut!(sink);
                while let Some(chunk) = futures_util::StreamExt::next(&mut rows).await {
                    futures_util::SinkExt::send(&mut sink, chunk?).await?;
                }
                let n = sink.finish().await?;
                if n == 0 {
                    return Ok((0, None));
                }
                target.execute(&upsert, &[]).await?;
                let key: String = target.query_one(&last_key, &[]).await?.get(0);
                target.execute("TRUNCATE pg_temp.shard_router_stage", &[]).await?;
                Ok::<_, tokio_postgres::Error>((n, Some(key)))
            }
            .await;
            match batch {
                Ok((n, key)) => {
                    // Target first: the source's lock must outlive the target's write.
                    target
                        .batch_execute("COMMIT")
                        .await
                        .map_err(MoveError::db)?;
                    source
                        .batch_execute("COMMIT")
                        .await
                        .map_err(MoveError::db)?;
                    if n == 0 {
                        break;
                    }
                    total += n;
                    progress(Progress::Copied {
                        table: name.clone(),
                        rows: n,
                    });
                    last = key;
                }
                Err(e) => {
                    let _ = target.batch_execute("ROLLBACK").await;
                    let _ = source.batch_execute("ROLLBACK").await;
                    return Err(MoveError::db(e));
                }
            }
        }
        target
            .batch_execute("DROP TABLE IF EXISTS pg_temp.shard_router_stage")
            .await
            .map_err(MoveError::db)?;
        Ok(total)
    }

    async fn verify(&mut self, progress: &mut impl FnMut(Progress)) -> Result<(), MoveError> {
        let (map, source, target) = self.shards().await?;
        let column = map.tenant_column().to_owned();
        let tables = catalog::tenant_tables(&source, &column).await?;
        begin(&source, map.version()).await?;
        source
            .execute(
                "SELECT pg_advisory_xact_lock($1)",
                &[&move_lock_key(&self.tenant)],
            )
            .await
            .map_err(MoveError::db)?;
        let mut mismatches = Vec::new();
        let mut sums = serde_json::Map::new();
        for table in &tables {
            let sql = format!(
                "SELECT count(*), coalesce(md5(string_agg(to_jsonb(t)::text, E'\\n' ORDER BY {})), '') \
                 FROM {} t WHERE {column} = $1",
                table.key.join(", "),
                table.name
            );
            let (source_rows, source_sum) = count_and_sum(&source, &sql, &self.tenant).await?;
            let (target_rows, target_sum) = count_and_sum(&target, &sql, &self.tenant).await?;
            progress(Progress::Verified {
                table: table.name.clone(),
                rows: source_rows,
            });
            sums.insert(
                table.name.clone(),
                json!({"source_rows": source_rows, "target_rows": target_rows,
                       "source_md5": source_sum, "target_md5": target_sum}),
            );
            if source_rows != target_rows || source_sum != target_sum {
                mismatches.push(Mismatch {
                    table: table.name.clone(),
                    source_rows,
                    target_rows,
                    checksums_differ: source_sum != target_sum,
                });
            }
        }
        source
            .batch_execute("COMMIT")
            .await
            .map_err(MoveError::db)?;
        self.record("backfilled", json!({ "verify": sums }), None)
            .await?;
        if mismatches.is_empty() {
            Ok(())
        } else {
            Err(MoveError::VerifyFailed {
                tenant: self.tenant.to_string(),
                mismatches,
            })
        }
    }

    async fn complete(&mut self) -> Result<(), MoveError> {
        self.route(MapChange::PinTo(Side::Target)).await?;
        if self.options.purge_source {
            let (map, source, _) = self.shards().await?;
            let tables = catalog::tenant_tables(&source, map.tenant_column()).await?;
            self.wait_for_writes_in_flight(&source, &tables).await?;
            self.delete_rows(&source, &map).await?;
        }
        Ok(())
    }

    /// Waits until every write transaction already open on the tenant tables
    /// has ended. A writer that began on an older map checked the fence before
    /// it was raised and takes no tenant lock; once it is done, every later
    /// write of the tenant is either fenced out or a dual write under the lock.
    /// A SHARE lock does this: it waits for the open writers (of all tenants)
    /// and holds new ones back only while it waits, at most `options.wait`.
    async fn wait_for_writes_in_flight(
        &self,
        client: &Client,
        tables: &[TenantTable],
    ) -> Result<(), MoveError> {
        if tables.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
        client
            .batch_execute(&format!(
                "BEGIN; SET LOCAL lock_timeout = '{}ms'; LOCK TABLE {} IN SHARE MODE; COMMIT",
                self.options.wait.as_millis(),
                names.join(", ")
            ))
            .await
            .map_err(MoveError::db)
    }

    /// Deletes the tenant's rows from every tenant table, children first, in one
    /// transaction that declares the newest version.
    async fn delete_rows(&self, client: &Client, map: &ShardMap) -> Result<(), MoveError> {
        let column = map.tenant_column();
        let tables = catalog::tenant_tables(client, column).await?;
        begin(client, map.version()).await?;
        for table in tables.iter().rev() {
            if let Err(e) = client
                .execute(
                    &format!("DELETE FROM {} WHERE {column} = $1", table.name),
                    &[&self.tenant.as_str()],
                )
                .await
            {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(MoveError::db(e));
            }
        }
        client.batch_execute("COMMIT").await.map_err(MoveError::db)
    }
}
