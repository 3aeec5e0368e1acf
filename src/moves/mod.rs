//! Moving a tenant between shards online: start, backfill, verify, cutover,
//! complete, or abort; every step resumable after a crash.
//!
//! | step | the map says | reads | writes | done when |
//! | --- | --- | --- | --- | --- |
//! | start | tenant in `moves`, `dual_write` | source | source (primary), row images to target, under the tenant locks (the source's first) | target cleared of the tenant's stale rows, map applied by every live router, fence raised, writes in flight before it finished |
//! | backfill | unchanged | source | both | every tenant table copied in key order, batch by batch under the tenant lock on both shards |
//! | verify | unchanged | source | both | row counts and content checksums equal on both shards, taken under the tenant lock on both shards |
//! | cutover | `reversed` | target | target (primary), row images to source | verified again, target sequences past the source's, map applied by every live router, fence raised |
//! | complete | tenant pinned to target | target | target | map applied, fence raised and settled; source rows purged if asked, once every router confirmed |
//! | abort | tenant pinned to source | source | source | (after cutover: source verified equal, reads back on the source first) target's copied rows removed |
//!
//! **Row images, not statements.** During a move the handle runs each
//! statement on the primary only; the primary's capture trigger records every
//! changed row as it finally is (after `DEFAULT now()`, identity values,
//! `gen_random_uuid()` and every trigger), and the writer applies those images
//! to the other shard in replica mode before committing. So both shards hold
//! the same rows on any schema, and a child whose parent is not copied yet is
//! accepted on the target. This needs a role that may set
//! `session_replication_role` (a superuser, or on PostgreSQL 15 and later
//! `GRANT SET ON PARAMETER session_replication_role TO app`); `start` checks it
//! before anything changes.
//!
//! **Routing.** Each step that changes routing records its intent, publishes a
//! new map version through the control database (only the mover holding the
//! move's lease may change a move entry), waits for every live router to apply
//! it, and raises the tenant's [`fence`] on both shards to that version, so a
//! router left on an older map has its writes for the tenant refused by the
//! shards. The move's phase, intent, lease and progress live in the control
//! table `shard_router_moves`; [`resume`] continues from the last finished step.

mod catalog;
mod claim;
pub mod fence;

mod copy;
pub(crate) mod dual_write;
mod record;

use std::time::{Duration, Instant};

use serde_json::json;
use tokio_postgres::Client;

pub use catalog::TenantTable;

use crate::control::{ControlError, ControlPlane, PublishError, PublishOptions};
use crate::map::Shard;
use crate::pg::error_text;
use crate::pg::ShardError;
use crate::{ShardMap, TenantId};

/// The steps of a move, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
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
    /// Rows per backfill batch (each under the tenant lock, so the moving
    /// tenant's own writes wait at most one batch: about 30 ms at the
    /// default). Verify checks four times as many rows per lock (a checksum
    /// costs about a quarter of a copy per row). Default 2500.
    pub batch_rows: usize,
    /// Backfill throttle: at most this many rows per second, so a move cannot
    /// starve the source's other tenants. Batches then shrink to at most
    /// `rate / 20` rows (at least 50), so the copy comes in short bursts.
    /// Default: none.
    pub max_rows_per_sec: Option<u64>,
    /// Delete the tenant's rows from the source after complete. Default false.
    pub purge_source: bool,
    /// Stop after this step. Default: run to complete.
    pub until: Step,
    /// How long the move record shows this mover's lease past its last
    /// renewal (`shardctl tenant move-status` prints it; the mover renews at every
    /// step, batch and wait). The lease's liveness is the mover's own control
    /// session, not this clock: a mover that dies or loses that connection
    /// frees the tenant at once, and a live one keeps it whatever it waits
    /// for. Default 60 s.
    pub lease: Duration,
    /// Purging the source waits until every router that ever reported
    /// (including stopped ones) has applied the complete map, or has been
    /// silent for longer than this. Default 10 minutes.
    pub purge_grace: Duration,
}

impl MoveOptions {
    /// Rows verify checks under one hold of the tenant lock.
    fn verify_rows(&self) -> usize {
        self.batch_rows.max(1).saturating_mul(4)
    }
}

impl Default for MoveOptions {
    fn default() -> Self {
        MoveOptions {
            wait: Duration::from_secs(30),
            batch_rows: 2500,
            max_rows_per_sec: None,
            purge_source: false,
            until: Step::Complete,
            lease: Duration::from_secs(60),
            purge_grace: Duration::from_secs(600),
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
    /// Verify found `rows` more rows of `table` equal on both shards so far
    /// (one key range, checked under the tenant lock).
    Verified {
        /// The table.
        table: String,
        /// The source's rows in this range.
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
    #[error("move: {}", error_text(.cause))]
    Database {
        /// The driver's error: its SQLSTATE through `cause.code()`.
        #[source]
        cause: tokio_postgres::Error,
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
    /// A read replica of the shard that reads switch to did not replay the
    /// move's rows in time; the move stays where it was.
    #[error("replica {replica} of shard {shard} did not catch up within {waited:?}; reads stay on the primary, resume when it has")]
    ReplicasBehind {
        /// The shard.
        shard: String,
        /// The replica, password redacted.
        replica: String,
        /// How long it waited.
        waited: Duration,
    },
    /// Verify found differences; cutover is refused.
    #[error("verify failed for tenant {tenant}; cutover refused: {}", mismatches.iter().map(|m| format!("{} (source {} rows, target {} rows{})", m.table, m.source_rows, m.target_rows, if m.checksums_differ { ", contents differ" } else { "" })).collect::<Vec<_>>().join("; "))]
    VerifyFailed {
        /// The tenant.
        tenant: String,
        /// The tables that differ.
        mismatches: Vec<Mismatch>,
    },
    /// A moving write committed on one shard only while verify ran (its
    /// COMMIT was lost on the other), so the copies may differ in a key range
    /// verify had already checked; cutover is refused.
    #[error("tenant {tenant}: a write committed on one shard only while verify ran (its other COMMIT was lost; its client was told the write failed), so the copies may differ where verify had already looked; cutover refused. Resume to verify again; if that finds differences, abort the move")]
    WriteOnOneShard {
        /// The tenant.
        tenant: String,
    },
    /// The move is complete, or its complete map may already be live; it can
    /// no longer be aborted.
    #[error("the move of tenant {tenant} is complete or its complete map is published; resume to finish it, then move the tenant back with a new move")]
    Finished {
        /// The tenant.
        tenant: String,
    },
    /// Another live mover holds the move's lease: its session on the control
    /// database holds the tenant's mover lock. A mover that dies, or loses its
    /// control connection, frees it at once.
    #[error("tenant {tenant}'s move is held by live mover {holder} (lease renewed {left:?} ahead); it keeps the move while its control connection lives, and a mover that died frees it at once: retry, or stop that mover")]
    LeaseHeld {
        /// The tenant.
        tenant: String,
        /// The holder (`host:pid`).
        holder: String,
        /// Time left on its recorded lease (informational: liveness is the
        /// control connection).
        left: Duration,
    },
    /// Another mover took the move over; this one stopped without changing more.
    #[error("another mover took over tenant {tenant}'s move; this one stopped")]
    LeaseLost {
        /// The tenant.
        tenant: String,
    },
    /// Write transactions open on the source did not end in time.
    #[error("write transactions open on the source did not end within {waited:?} (backends {pids:?}); nothing was copied, resume later")]
    WritersInFlight {
        /// Their backend pids.
        pids: Vec<i32>,
        /// How long the move waited.
        waited: Duration,
    },
    /// A tenant table's primary key comes from a per-shard sequence without the
    /// tenant column: copied ids would collide with the target's tenants.
    #[error("tenant table {table}: primary key column {column} comes from a per-shard sequence and the key lacks the tenant column; copied ids would collide on the target. Make the key ({tenant_column}, {column}) or use UUIDs")]
    SharedSequenceKey {
        /// The table.
        table: String,
        /// The sequence-backed key column.
        column: String,
        /// The map's tenant column.
        tenant_column: String,
    },
    /// The shard's role may not write row images in replica mode.
    #[error("shard {shard}: the role cannot set session_replication_role, which moves need to apply row images: {cause}; use a superuser, or GRANT SET ON PARAMETER session_replication_role TO the role (PostgreSQL 15+)")]
    ReplicaRoleRefused {
        /// The shard.
        shard: String,
        /// The database's error.
        cause: String,
    },
    /// The newest map no longer shows the move where this step expects it (a
    /// control database restored from a backup, then a map published over
    /// it); the move stops before changing anything more.
    #[error("tenant {tenant}'s move: map version {version} shows the tenant {found}, not the step before {expected}; the control database may have been restored. Nothing more was changed; see the moves guide on restores")]
    MapChanged {
        /// The tenant.
        tenant: String,
        /// The newest map's version.
        version: u64,
        /// The change this step makes.
        expected: String,
        /// What the map shows instead.
        found: String,
    },
    /// Under `tenant_case = "lower"`, the source holds rows whose tenant column
    /// names the tenant in another case (`ACME` for `acme`): a move copies,
    /// verifies, fences and purges the tenant's rows by its id as the map
    /// names it, so it would leave those behind. Nothing was changed.
    #[error("shard {shard} holds {rows} row(s) of {table} whose tenant column names tenant {tenant} in another case; tenant_case = \"lower\" names it {tenant}, and a move would leave those rows behind. Nothing was changed. Store the ids lowercased first, e.g. UPDATE {table} SET <tenant column> = lower(<tenant column>) WHERE lower(<tenant column>) = '{tenant}'")]
    RowsInAnotherCase {
        /// The tenant, as the map names it.
        tenant: String,
        /// The source shard.
        shard: String,
        /// The first table with such rows.
        table: String,
        /// How many rows of that table.
        rows: i64,
    },
    /// The target holds rows of the tenant that no fence marks as left over
    /// from an earlier move: they may be its only copy. Nothing was deleted.
    #[error("shard {shard} holds rows of tenant {tenant} and no fence marks them stale: it may be the tenant's home (a map from a restored control database?); nothing was deleted. Check where the tenant's data is; remove those rows by hand if they are stale")]
    TargetHoldsTenant {
        /// The tenant.
        tenant: String,
        /// The target shard.
        shard: String,
    },
    /// Routers serve map versions the control database does not hold: it
    /// was restored from a backup. The move changes nothing until the
    /// recovery publish.
    #[error("tenant {tenant}'s move: routers serve maps the control database (newest version {newest}) does not hold; it was restored from a backup? Nothing was changed; publish the recovery map first")]
    ControlBehind {
        /// The tenant.
        tenant: String,
        /// The newest version the control database holds.
        newest: u64,
    },
    /// A shard's fence does not show the tenant moving while the move record
    /// says it is (a move record restored from a backup); nothing is copied.
    #[error("tenant {tenant}'s move: shard {shard}'s fence does not show it moving, though the move record does (a control database restored from a backup?); nothing was copied")]
    FenceDisagrees {
        /// The tenant.
        tenant: String,
        /// The shard.
        shard: String,
    },
    /// Purge needs a completed move.
    #[error("tenant {tenant}'s move is {phase}, not complete; only a completed move's former copy can be purged")]
    NotComplete {
        /// The tenant.
        tenant: String,
        /// The move's phase.
        phase: String,
    },
    /// A shard of the move is no longer in the newest map.
    #[error("shard {shard} of the move is no longer in the map")]
    ShardGone {
        /// The shard.
        shard: String,
    },
}

impl MoveError {
    fn db(e: tokio_postgres::Error) -> MoveError {
        MoveError::Database { cause: e }
    }
}

/// A move as the control database records it (and as `shardctl --json tenant
/// move-status` prints it).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct MoveStatus {
    /// The tenant.
    pub tenant: String,
    /// Source shard.
    pub from: String,
    /// Target shard.
    pub to: String,
    /// The last finished step: `starting`, `dual_write`, `backfilled`,
    /// `verified`, `reversed`, `complete` or `aborted`.
    pub phase: String,
    /// Rows copied per table, checksums, versions published, step timings.
    pub state: serde_json::Value,
    /// The last error, if the move stopped on one.
    pub error: Option<String>,
    /// The map change the mover recorded before publishing it: `dual_write`,
    /// `reversed`, `complete` or `abort`.
    pub intent: Option<String>,
    /// The mover holding the lease (`host:pid`), if any.
    pub lease_holder: Option<String>,
    /// Time left on that lease, in milliseconds.
    pub lease_left_ms: Option<u64>,
}

/// Starts moving `tenant` to shard `to` and runs it up to `options.until`.
///
/// Refuses, before anything is recorded or changed: a target not in the map or
/// already the tenant's, a tenant already moving, a tenant table without a
/// primary key or with a sequence-drawn key that lacks the tenant column, and
/// a role that cannot apply row images.
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
    if let Some(existing) = record::load(control, tenant).await? {
        if existing.phase != "complete" && existing.phase != "aborted" {
            return Err(MoveError::AlreadyMoving {
                tenant: tenant.to_string(),
                phase: existing.phase,
            });
        }
    }
    let map = control.latest().await?.load()?;
    if map.tenant_id(tenant.clone()) != *tenant {
        return Err(MoveError::BadTarget {
            tenant: tenant.to_string(),
            to: to.to_owned(),
            reason: format!(
                "the map has tenant_case = \"lower\": this tenant is {}",
                map.tenant_id(tenant.clone())
            ),
        });
    }
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
    // Refuse what a move cannot do before anything is recorded or changed.
    for name in [from.as_str(), to] {
        let shard = shard_named(&map, name)?;
        let client = shard.connect_admin().await?;
        crate::pg::refuse_hidden_rows(&client, name, map.tenant_column()).await?;
        let tables = catalog::tenant_tables(&client, map.tenant_column()).await?;
        if map.tenant_case() == crate::map::TenantCase::Lower && name == from {
            if let Some((table, rows)) =
                copy::rows_in_another_case(&client, &tables, tenant, map.tenant_column()).await?
            {
                return Err(MoveError::RowsInAnotherCase {
                    tenant: tenant.to_string(),
                    shard: from.clone(),
                    table,
                    rows,
                });
            }
        }
        if let Some((table, column)) =
            copy::shared_sequence_keys(&client, &tables, map.tenant_column())
                .await?
                .into_iter()
                .next()
        {
            return Err(MoveError::SharedSequenceKey {
                table,
                column,
                tenant_column: map.tenant_column().to_owned(),
            });
        }
        // Both roles apply rows in replica mode: the mover's (backfill) and the
        // routers' (row images of dual writes).
        let app = match shard.admin_url() {
            None => None,
            Some(_) => {
                let (app, connection) = shard
                    .endpoint
                    .connect(shard.pool().connect_timeout)
                    .await
                    .map_err(|cause| ShardError::Unreachable {
                        shard: name.to_owned(),
                        cause,
                    })?;
                tokio::spawn(connection);
                Some(app)
            }
        };
        for client in [Some(&client), app.as_ref()].into_iter().flatten() {
            if let Err(e) = client
                .batch_execute("BEGIN; SET LOCAL session_replication_role = replica; ROLLBACK")
                .await
            {
                return Err(MoveError::ReplicaRoleRefused {
                    shard: name.to_owned(),
                    cause: error_text(&e),
                });
            }
        }
    }
    let floor = claim_floor(&map, tenant, &from, to).await?;
    let lease = record::create(control, tenant, &from, to, options.lease, floor).await?;
    run(control, tenant, lease, options, progress).await
}

/// Continues the tenant's unfinished move from its last finished step, once no
/// other mover holds its lease.
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
    progress: impl FnMut(Progress),
) -> Result<MoveStatus, MoveError> {
    let recorded = recorded(control, tenant).await?;
    if Step::after(&recorded.phase).is_none() {
        return Err(no_move(tenant));
    }
    // An abort that stopped part way (its intent is `abort`) is finished as
    // an abort, never carried forward: the model's `Resume` transition.
    let (lease, recorded) = take_over(control, tenant, &recorded, options).await?;
    if Step::after(&recorded.phase).is_none() {
        // Finished meanwhile, by another mover.
        record::release(control, tenant, &lease).await;
        return Err(no_move(tenant));
    }
    if recorded.intent.as_deref() == Some("abort") {
        return run_abort(control, tenant, lease, &recorded, options).await;
    }
    run(control, tenant, lease, options, progress).await
}

/// Runs the steps after the recorded phase, up to `options.until`, holding `lease`.
async fn run(
    control: &mut ControlPlane,
    tenant: &TenantId,
    lease: Lease,
    options: &MoveOptions,
    mut progress: impl FnMut(Progress),
) -> Result<MoveStatus, MoveError> {
    let recorded = recorded(control, tenant).await?;
    let mut mover = Mover::new(control, tenant, &recorded, options, lease);
    let result = async {
        let Some(first) = Step::after(&recorded.phase) else {
            return Err(no_move(tenant));
        };
        for step in Step::ALL
            .into_iter()
            .filter(|s| *s >= first && *s <= options.until)
        {
            progress(Progress::Step(step));
            let started = Instant::now();
            match step {
                Step::Start => mover.start().await?,
                Step::Backfill => mover.backfill(&mut progress).await?,
                Step::Verify => mover.verify(false, &mut progress).await?,
                Step::Cutover => mover.cutover(&mut progress).await?,
                Step::Complete => mover.complete().await?,
            }
            record::phase(
                mover.control,
                tenant,
                &mover.lease,
                step.done_phase(),
                json!({ format!("{}_ms", step.as_str()): started.elapsed().as_millis() as u64 }),
            )
            .await?;
        }
        Ok(())
    }
    .await;
    mover.finish(result).await?;
    self::recorded(mover.control, tenant).await
}

/// `Acquire` for resume, abort and purge: the lease of the recorded move,
/// with a token above every claim on its shards, and the record re-read under
/// it (another mover may have moved on meanwhile).
async fn take_over(
    control: &mut ControlPlane,
    tenant: &TenantId,
    recorded: &MoveStatus,
    options: &MoveOptions,
) -> Result<(Lease, MoveStatus), MoveError> {
    let floor = claim_floor(
        &control.latest().await?.load()?,
        tenant,
        &recorded.from,
        &recorded.to,
    )
    .await?;
    let lease = record::acquire(control, tenant, options.lease, floor).await?;
    match self::recorded(control, tenant).await {
        Ok(r) => Ok((lease, r)),
        Err(e) => {
            record::release(control, tenant, &lease).await;
            Err(e)
        }
    }
}

/// The highest token any mover claimed the move's shards with: a new lease
/// goes above it, whatever a restored control database remembers.
async fn claim_floor(
    map: &ShardMap,
    tenant: &TenantId,
    from: &str,
    to: &str,
) -> Result<i64, MoveError> {
    let mut floor = 0;
    for name in [from, to] {
        let client = shard_named(map, name)?.connect_admin().await?;
        floor = floor.max(claim::highest(&client, tenant).await?);
    }
    Ok(floor)
}

fn no_move(tenant: &TenantId) -> MoveError {
    MoveError::NoMove {
        tenant: tenant.to_string(),
    }
}

/// The tenant's move record, which must exist.
async fn recorded(control: &ControlPlane, tenant: &TenantId) -> Result<MoveStatus, MoveError> {
    record::load(control, tenant)
        .await?
        .ok_or_else(|| no_move(tenant))
}

/// Aborts the tenant's unfinished move: after cutover, the source is checked
/// equal to the target (and re-copied from it where not) and reads go back to
/// it first; then the tenant is pinned to the source and the rows copied to
/// the target are removed. Refused once the complete map may be live (the
/// move's intent says `complete`): resume finishes such a move instead.
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
    let recorded = recorded(control, tenant).await?;
    match recorded.phase.as_str() {
        "complete" => {
            return Err(MoveError::Finished {
                tenant: tenant.to_string(),
            })
        }
        "aborted" => return Err(no_move(tenant)),
        _ => {}
    }
    if recorded.intent.as_deref() == Some("complete") {
        return Err(MoveError::Finished {
            tenant: tenant.to_string(),
        });
    }
    let (lease, recorded) = take_over(control, tenant, &recorded, options).await?;
    if recorded.intent.as_deref() == Some("complete") || recorded.phase == "complete" {
        record::release(control, tenant, &lease).await;
        return Err(MoveError::Finished {
            tenant: tenant.to_string(),
        });
    }
    if recorded.phase == "aborted" {
        // Aborted meanwhile, by another mover.
        record::release(control, tenant, &lease).await;
        return Err(no_move(tenant));
    }
    run_abort(control, tenant, lease, &recorded, options).await
}

/// The abort's steps under a held lease: `AbortBegin` records the intent
/// `abort` before anything else, so a resume finishes it as an abort.
async fn run_abort(
    control: &mut ControlPlane,
    tenant: &TenantId,
    lease: Lease,
    recorded: &MoveStatus,
    options: &MoveOptions,
) -> Result<MoveStatus, MoveError> {
    let mut mover = Mover::new(control, tenant, recorded, options, lease);
    mover.aborting = true;
    let result = async {
        mover.abort_begin().await?;
        mover.abort(recorded).await?;
        record::phase(mover.control, tenant, &mover.lease, "aborted", json!({})).await
    }
    .await;
    mover.finish(result).await?;
    self::recorded(mover.control, tenant).await
}

/// Removes a completed move's copy of the tenant from its former shard (a
/// move run without `purge_source`): once every router that ever reported
/// has applied the newest map, or has been silent longer than
/// `options.purge_grace`, the former shard's fence is raised to that map, the
/// writers in flight there finish, and the tenant's rows are deleted. The
/// fence row stays (`moving = false`), so a router still on an old map is
/// refused there. Idempotent: a purged move is returned as it is.
///
/// Refused unless the move is complete and the newest map pins the tenant to
/// its target.
///
/// ```no_run
/// # use shard_router::{control::ControlPlane, moves::{self, MoveOptions}, TenantId};
/// # async fn f(mut control: ControlPlane) -> Result<(), shard_router::moves::MoveError> {
/// moves::purge(&mut control, &TenantId::new("acme").unwrap(), &MoveOptions::default()).await?;
/// # Ok(()) }
/// ```
pub async fn purge(
    control: &mut ControlPlane,
    tenant: &TenantId,
    options: &MoveOptions,
) -> Result<MoveStatus, MoveError> {
    let recorded = recorded(control, tenant).await?;
    if recorded.phase != "complete" {
        return Err(MoveError::NotComplete {
            tenant: tenant.to_string(),
            phase: recorded.phase,
        });
    }
    if recorded.state.get("purged") == Some(&json!(true)) {
        return Ok(recorded);
    }
    let (lease, recorded) = take_over(control, tenant, &recorded, options).await?;
    let mut mover = Mover::new(control, tenant, &recorded, options, lease);
    let result = mover.purge().await;
    mover.finish(result).await?;
    self::recorded(mover.control, tenant).await
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
    record::load(control, tenant).await
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Target,
}

#[derive(Clone, Copy)]
enum MapChange {
    /// The tenant in `moves` with this phase.
    Phase(&'static str),
    /// The tenant out of `moves`, pinned to a side.
    PinTo(Side),
}

impl MapChange {
    /// The intent recorded before publishing this change.
    fn intent(self) -> &'static str {
        match self {
            MapChange::Phase(phase) => phase,
            MapChange::PinTo(Side::Target) => "complete",
            MapChange::PinTo(Side::Source) => "abort",
        }
    }
}

use record::Lease;

/// What the move record's state says (`one_sided_after_verify`) when complete
/// found the write chains different.
pub(crate) const ONE_SIDED_AFTER_VERIFY: &str = "a write committed on one shard only after cutover's verify (its client was told it failed); the target keeps what it served since cutover, and the former copy was kept, not purged, so the two can be compared; shardctl tenant purge removes it";

struct Mover<'a> {
    control: &'a mut ControlPlane,
    tenant: TenantId,
    from: String,
    to: String,
    options: MoveOptions,
    lease: Lease,
    /// An abort's routing steps keep the intent `abort`.
    aborting: bool,
}

fn shard_named<'m>(map: &'m ShardMap, name: &str) -> Result<&'m Shard, MoveError> {
    map.shard_index(name)
        .map(|i| map.shard(i))
        .ok_or_else(|| MoveError::ShardGone {
            shard: name.to_owned(),
        })
}

impl<'a> Mover<'a> {
    fn new(
        control: &'a mut ControlPlane,
        tenant: &TenantId,
        record: &MoveStatus,
        options: &MoveOptions,
        lease: Lease,
    ) -> Self {
        Mover {
            control,
            tenant: tenant.clone(),
            from: record.from.clone(),
            to: record.to.clone(),
            options: options.clone(),
            lease,
            aborting: false,
        }
    }

    /// Records how the run ended and gives the lease up.
    async fn finish(&mut self, result: Result<(), MoveError>) -> Result<(), MoveError> {
        if let Err(e) = &result {
            let fenced_out = match e {
                MoveError::LeaseLost { .. } => true,
                MoveError::Database { cause } => claim::is_claim_refusal(cause),
                _ => false,
            };
            if !fenced_out {
                let _ =
                    record::error(self.control, &self.tenant, &self.lease, &e.to_string()).await;
            }
        }
        record::release(self.control, &self.tenant, &self.lease).await;
        result
    }

    /// Merges `patch` into the move's recorded state (rows copied, checksums, versions).
    async fn note(&self, patch: serde_json::Value) -> Result<(), MoveError> {
        record::progress(self.control, &self.tenant, &self.lease, patch).await
    }

    async fn renew(&self) -> Result<(), MoveError> {
        record::renew(self.control, &self.tenant, &self.lease).await
    }

    /// Both shards' clients, and the newest map.
    async fn shards(&self) -> Result<(ShardMap, Client, Client), MoveError> {
        let map = self.control.latest().await?.load()?;
        let source = shard_named(&map, &self.from)?.connect_admin().await?;
        let target = shard_named(&map, &self.to)?.connect_admin().await?;
        // Every step checks: a role's rights can change while a move is parked.
        crate::pg::refuse_hidden_rows(&source, &self.from, map.tenant_column()).await?;
        crate::pg::refuse_hidden_rows(&target, &self.to, map.tenant_column()).await?;
        // `ClaimShards`: nothing changes on a shard a newer mover claimed.
        claim::claim(&source, &self.from, &self.tenant, &self.lease).await?;
        claim::claim(&target, &self.to, &self.tenant, &self.lease).await?;
        Ok((map, source, target))
    }

    async fn start(&mut self) -> Result<(), MoveError> {
        let (map, source, target) = self.shards().await?;
        let column = map.tenant_column();
        let tables = catalog::tenant_tables(&source, column).await?;
        fence::install(&source, column, &tables, self.options.wait).await?;
        let target_tables = catalog::tenant_tables(&target, column).await?;
        fence::install(&target, column, &target_tables, self.options.wait).await?;
        // `ClearTarget`: stale rows of the tenant on the target go first,
        // before any row image can reach it, but only rows a fence marks as
        // left by an earlier move or abort (`moving = false`). Under a moving
        // fence they are this move's own row images (a resumed start), or,
        // after a restored control database, the tenant's home; rows without
        // a fence may be its only copy.
        match fence::of(&target, self.tenant.as_str())
            .await
            .map_err(MoveError::db)?
        {
            Some((_, false)) => {
                copy::delete_rows(
                    &target,
                    Some(&source),
                    &target_tables,
                    &self.tenant,
                    column,
                    map.version(),
                )
                .await?
            }
            Some((_, true)) => {}
            None => {
                if copy::tenant_has_rows(&target, &target_tables, &self.tenant, column).await? {
                    return Err(MoveError::TargetHoldsTenant {
                        tenant: self.tenant.to_string(),
                        shard: self.to.clone(),
                    });
                }
            }
        }
        // The target is marked moving before any row image can reach it, so
        // an abort knows that the tenant's rows there are the move's.
        fence::raise(&target, self.tenant.as_str(), map.version()).await?;
        let version = self.route(MapChange::Phase("dual_write")).await?;
        // Let writes begun on the old map finish before the fence refuses
        // that map, then wait again for any that slipped in meanwhile.
        copy::wait_for_writers(&source, &tables, self.options.wait).await?;
        fence::raise(&source, self.tenant.as_str(), version).await?;
        fence::raise(&target, self.tenant.as_str(), version).await?;
        // A tenant table created since the install above, before the source's
        // fence showed a move (the event trigger covers new tables only while
        // one does), gets the triggers now; install is idempotent.
        let tables = catalog::tenant_tables(&source, column).await?;
        fence::install(&source, column, &tables, self.options.wait).await?;
        // Writers that began on the old map wrote the source only and took no
        // tenant lock: wait for those still open before anything is copied.
        copy::wait_for_writers(&source, &tables, self.options.wait).await
    }

    /// Records the intent, publishes the change unless the newest map already
    /// has it, and waits for the routers. The caller raises the fence where a
    /// router still on the map before would write wrongly: at start (it would
    /// write the source only), before a purge and after an abort (it would
    /// write a shard that no longer has the tenant). Between dual_write,
    /// reversed and complete, writers of either version keep both shards
    /// identical under the tenant locks, so they are not failed.
    async fn route(&mut self, change: MapChange) -> Result<u64, MoveError> {
        // `Intent`: an abort keeps `abort` through all its publishes.
        let intent = if self.aborting {
            "abort"
        } else {
            change.intent()
        };
        record::intent(self.control, &self.tenant, &self.lease, intent).await?;
        let stored = self.control.latest().await?;
        let map = stored.load()?;
        let mut doc =
            crate::map::MapDocument::parse(&stored.toml).map_err(PublishError::Rewrite)?;
        let tenant = self.tenant.as_str();
        let note = match change {
            MapChange::Phase(phase) => {
                doc.set_move(tenant, &self.from, &self.to, phase)
                    .map_err(PublishError::Rewrite)?;
                format!("move {tenant}: {phase}")
            }
            MapChange::PinTo(side) => {
                let shard = match side {
                    Side::Source => &self.from,
                    Side::Target => &self.to,
                };
                doc.clear_move(tenant);
                doc.pin(tenant, shard).map_err(PublishError::Rewrite)?;
                format!("move {tenant}: pinned to {shard}")
            }
        };
        // `Publish`: skipped when the newest map has the change already (a
        // resumed move); refused unless it shows the phase before this one.
        let already = self.entry_is(&map, change);
        if !already {
            self.refuse_unless_follows(&map, change)?;
        }
        let version = if already {
            map.version()
        } else {
            doc.set_version(map.version() + 1);
            let mut options = PublishOptions::with_note(&note);
            options.mover = Some(crate::control::MoverPublish {
                tenant: tenant.to_owned(),
                token: self.lease.token,
                holder: self.lease.holder.clone(),
                intent: intent.to_owned(),
            });
            self.control.publish(&doc.render(), &options).await?.version
        };
        // `WaitForRouters`, then: the newest map must still show the change
        // (a recovery publish after a restore can have dropped the move).
        self.wait_for_routers(version).await?;
        let newest = self.control.latest().await?.load()?;
        if !self.entry_is(&newest, change) {
            return Err(self.map_changed(&newest, change));
        }
        self.record_version(&note, version).await?;
        Ok(version)
    }

    /// Whether `map`'s entry for the tenant is what `change` publishes.
    fn entry_is(&self, map: &ShardMap, change: MapChange) -> bool {
        match (change, map.move_of(&self.tenant)) {
            (MapChange::Phase(phase), Some(route)) => {
                route.phase.as_str() == phase
                    && map.shard(route.from).name() == self.from
                    && map.shard(route.to).name() == self.to
            }
            (MapChange::PinTo(side), None) => {
                let want = match side {
                    Side::Source => &self.from,
                    Side::Target => &self.to,
                };
                map.pins()
                    .iter()
                    .any(|(t, s)| *t == self.tenant.as_str() && map.shard(*s).name() == want)
            }
            _ => false,
        }
    }

    /// A phase is published only over the one before it: `dual_write` over the
    /// tenant on its source (or over `reversed`, aborting), `reversed` over
    /// `dual_write`, the target's pin over `reversed`, the source's pin over
    /// `dual_write` (or a move that never got published).
    fn refuse_unless_follows(&self, map: &ShardMap, change: MapChange) -> Result<(), MoveError> {
        let entry = map.move_of(&self.tenant);
        let ours = entry.is_some_and(|route| {
            map.shard(route.from).name() == self.from && map.shard(route.to).name() == self.to
        });
        let phase = entry.map(|route| route.phase.as_str());
        let on_source =
            entry.is_none() && map.shard(map.locate(&self.tenant).shard).name() == self.from;
        let follows = match change {
            MapChange::Phase("dual_write") => on_source || (ours && phase == Some("reversed")),
            MapChange::Phase(_) => ours && phase == Some("dual_write"),
            MapChange::PinTo(Side::Target) => ours && phase == Some("reversed"),
            MapChange::PinTo(Side::Source) => on_source || (ours && phase == Some("dual_write")),
        };
        if follows {
            Ok(())
        } else {
            Err(self.map_changed(map, change))
        }
    }

    fn map_changed(&self, map: &ShardMap, change: MapChange) -> MoveError {
        let found = match map.move_of(&self.tenant) {
            Some(route) => format!(
                "moving {} -> {} ({})",
                map.shard(route.from).name(),
                map.shard(route.to).name(),
                route.phase.as_str()
            ),
            None => format!("on {}", map.shard(map.locate(&self.tenant).shard).name()),
        };
        MoveError::MapChanged {
            tenant: self.tenant.to_string(),
            version: map.version(),
            expected: change.intent().to_owned(),
            found,
        }
    }

    /// Waits for every live router to apply `version`, renewing the lease.
    async fn wait_for_routers(&self, version: u64) -> Result<(), MoveError> {
        let started = Instant::now();
        let slice = (self.options.lease / 3).max(Duration::from_millis(100));
        loop {
            let left = self.options.wait.saturating_sub(started.elapsed());
            let rollout = self.control.wait_for(version, left.min(slice)).await?;
            if rollout.laggards.is_empty() {
                return Ok(());
            }
            if left <= slice {
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
            self.renew().await?;
        }
    }

    async fn record_version(&mut self, what: &str, version: u64) -> Result<(), MoveError> {
        self.note(json!({ "versions": { what: version } })).await
    }

    /// Before a data step (`Backfill`, `Verify`, `AbortRecopy`): both shards'
    /// fences must show the tenant moving, and the routers must serve maps
    /// this control database holds. A move record restored from a backup
    /// would otherwise copy the source's older rows over a target that has
    /// been the tenant's home since.
    async fn check_in_flight(&self, source: &Client, target: &Client) -> Result<(), MoveError> {
        let newest = self.control.latest().await?.version;
        if self.control.base_is_suspect(newest).await? {
            return Err(MoveError::ControlBehind {
                tenant: self.tenant.to_string(),
                newest,
            });
        }
        for (client, shard) in [(source, &self.from), (target, &self.to)] {
            let fence = fence::of(client, self.tenant.as_str())
                .await
                .map_err(MoveError::db)?;
            if !fence.is_some_and(|(_, moving)| moving) {
                return Err(MoveError::FenceDisagrees {
                    tenant: self.tenant.to_string(),
                    shard: shard.clone(),
                });
            }
        }
        Ok(())
    }

    async fn backfill(&mut self, progress: &mut impl FnMut(Progress)) -> Result<(), MoveError> {
        let (map, source, target) = self.shards().await?;
        self.check_in_flight(&source, &target).await?;
        let column = map.tenant_column().to_owned();
        let tables = catalog::tenant_tables(&source, &column).await?;
        let copier = copy::Copy {
            from: &source,
            to: &target,
            lock_on_from: true,
            tenant: &self.tenant,
            column: &column,
            version: map.version(),
            batch_rows: self.options.batch_rows,
            lease: (self.control, &self.lease),
            max_rows_per_sec: self.options.max_rows_per_sec,
        };
        let mut copied = serde_json::Map::new();
        for table in &tables {
            let total = copier.table(table, progress).await?;
            copied.insert(table.name.clone(), json!(total));
            self.note(json!({ "rows_copied": copied })).await?;
        }
        Ok(())
    }

    /// Verifies both copies; refuses on any difference.
    ///
    /// The write chains see moving writes only, so verify runs only while the
    /// newest map dual-writes the tenant (found by the model: after a
    /// restore, a resumed verify beside routers on the complete map); for
    /// cutover's verify, `reversed` too: a cutover stopped in its wait for
    /// the routers has published it, and its writers dual-write as well.
    async fn verify(
        &mut self,
        cutover: bool,
        progress: &mut impl FnMut(Progress),
    ) -> Result<(), MoveError> {
        let (map, source, target) = self.shards().await?;
        self.check_in_flight(&source, &target).await?;
        let dual_write = MapChange::Phase("dual_write");
        let reversed = MapChange::Phase("reversed");
        if !(self.entry_is(&map, dual_write) || cutover && self.entry_is(&map, reversed)) {
            return Err(self.map_changed(&map, dual_write));
        }
        let column = map.tenant_column();
        let tables = catalog::tenant_tables(&source, column).await?;
        let verified = copy::verify(
            &source,
            &target,
            &tables,
            &self.tenant,
            column,
            map.version(),
            self.options.verify_rows(),
            (self.control, &self.lease),
            progress,
        )
        .await?;
        self.note(json!({ "verify": verified.sums })).await?;
        if !verified.mismatches.is_empty() {
            Err(MoveError::VerifyFailed {
                tenant: self.tenant.to_string(),
                mismatches: verified.mismatches,
            })
        } else if verified.one_sided_write {
            Err(MoveError::WriteOnOneShard {
                tenant: self.tenant.to_string(),
            })
        } else {
            Ok(())
        }
    }

    /// Verifies again (nothing reaches cutover without a verify after the last
    /// change), carries sequences to the target, then switches reads to it.
    async fn cutover(&mut self, progress: &mut impl FnMut(Progress)) -> Result<(), MoveError> {
        self.verify(true, progress).await?;
        let (map, source, target) = self.shards().await?;
        let tables = catalog::tenant_tables(&source, map.tenant_column()).await?;
        copy::carry_sequences(&source, &target, &tables).await?;
        self.route(MapChange::Phase("reversed")).await?;
        Ok(())
    }

    async fn complete(&mut self) -> Result<(), MoveError> {
        {
            // Reads leave the target's primary for its replicas: they must
            // hold everything the move brought first.
            let (map, _source, target) = self.shards().await?;
            self.replicas_caught_up(shard_named(&map, &self.to)?, &target)
                .await?;
        }
        let version = self.route(MapChange::PinTo(Side::Target)).await?;
        let (map, source, target) = self.shards().await?;
        // `FenceFormer`: from here a writer on any older map is refused on the
        // source; those in flight (the only ones still taking the move lock)
        // finish first (`WaitForLockHolders`), then `Settle`.
        fence::raise(&source, self.tenant.as_str(), version).await?;
        copy::wait_for_lock_holders(&source, &self.tenant, self.options.wait).await?;
        // `CompareWriteChains`: no moving write is left. Cutover's verify left
        // the chains equal; if they differ now, a write committed on one side
        // only after it. The target keeps what it served since `reversed`
        // (that write's client was told it failed); the former copy is kept
        // for comparison instead of purged, and the record says so.
        // Under both tenant locks: a writer's two COMMITs may still be on
        // their way when the source's lock is free.
        let chains = copy::write_chains(
            &source,
            &target,
            &self.tenant,
            map.version(),
            copy::ChainStep::Compare,
        )
        .await?;
        let one_sided = match chains {
            (Some(on_source), Some(on_target)) => on_source != on_target,
            // No chain to compare (a move verified before chains existed):
            // what an earlier run of this step recorded stands.
            _ => recorded(self.control, &self.tenant)
                .await?
                .state
                .get("one_sided_after_verify")
                .is_some(),
        };
        if one_sided {
            tracing::warn!(tenant = %self.tenant, from = %self.from, to = %self.to,
                "a write committed on one shard only after cutover's verify; the former copy is kept");
            self.note(json!({ "one_sided_after_verify": ONE_SIDED_AFTER_VERIFY }))
                .await?;
        }
        fence::settle(&target, &source, self.tenant.as_str()).await?;
        if self.options.purge_source && !one_sided {
            self.purge_rows(&map, &source, version).await?;
        }
        Ok(())
    }

    /// `moves::purge`: a completed move's former copy removed.
    async fn purge(&mut self) -> Result<(), MoveError> {
        let map = self.control.latest().await?.load()?;
        if !self.entry_is(&map, MapChange::PinTo(Side::Target)) {
            return Err(self.map_changed(&map, MapChange::PinTo(Side::Target)));
        }
        let (map, source, target) = self.shards().await?;
        let version = map.version();
        self.wait_for_every_router(version).await?;
        // Writers on any older map are refused on the former shard from here.
        fence::raise(&source, self.tenant.as_str(), version).await?;
        copy::wait_for_lock_holders(&source, &self.tenant, self.options.wait).await?;
        fence::settle(&target, &source, self.tenant.as_str()).await?;
        self.purge_rows(&map, &source, version).await
    }

    /// Deletes the tenant's rows from the former shard, once every router
    /// that ever reported applied `version` (or went silent past the grace).
    async fn purge_rows(
        &mut self,
        map: &ShardMap,
        source: &Client,
        version: u64,
    ) -> Result<(), MoveError> {
        self.wait_for_every_router(version).await?;
        self.renew().await?;
        let tables = catalog::tenant_tables(source, map.tenant_column()).await?;
        copy::delete_rows(
            source,
            None,
            &tables,
            &self.tenant,
            map.tenant_column(),
            map.version(),
        )
        .await?;
        self.note(json!({ "purged": true })).await
    }

    /// Waits until every reachable read replica of `shard` has replayed what
    /// its primary (`primary`) holds now, so that reads switching to them
    /// (the tenant leaving the move) never see its rows older than the move.
    /// A replica that cannot be reached is skipped: the routers' probes keep
    /// it out of reads until it catches up.
    async fn replicas_caught_up(&self, shard: &Shard, primary: &Client) -> Result<(), MoveError> {
        if shard.replicas().is_empty() {
            return Ok(());
        }
        let position: String = primary
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(MoveError::db)?
            .get(0);
        let started = Instant::now();
        for replica in shard.replicas() {
            let client = match replica.endpoint.connect(Duration::from_secs(2)).await {
                Ok((client, connection)) => {
                    tokio::spawn(connection);
                    client
                }
                Err(reason) => {
                    tracing::warn!(shard = shard.name(), replica = %replica.redacted_url(), %reason, "replica unreachable; not waited for");
                    continue;
                }
            };
            loop {
                let replayed: bool = client
                    .query_one(
                        "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, true)",
                        &[&position],
                    )
                    .await
                    .map_err(MoveError::db)?
                    .get(0);
                if replayed {
                    break;
                }
                if started.elapsed() >= self.options.wait {
                    return Err(MoveError::ReplicasBehind {
                        shard: shard.name().to_owned(),
                        replica: replica.redacted_url(),
                        waited: self.options.wait,
                    });
                }
                self.renew().await?;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// Waits until every router that ever reported, live or not, has applied
    /// `version` or has been silent for longer than the purge grace: a router
    /// cut off from the control database must not read a purged source.
    async fn wait_for_every_router(&self, version: u64) -> Result<(), MoveError> {
        let grace = self.options.purge_grace.as_millis() as u64;
        let started = Instant::now();
        loop {
            let behind: Vec<String> = self
                .control
                .routers()
                .await?
                .into_iter()
                .filter(|r| r.applied_version < version && r.last_seen_ms <= grace)
                .map(|r| r.instance_id)
                .collect();
            if behind.is_empty() {
                return Ok(());
            }
            if started.elapsed() >= self.options.wait {
                return Err(MoveError::RoutersBehind {
                    version,
                    waited: self.options.wait,
                    laggards: behind,
                });
            }
            self.renew().await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `AbortBegin`: the intent `abort` is recorded before anything else, so
    /// a resume finishes the abort instead of carrying the move forward.
    /// Refused once the newest map pins the tenant to the target: the complete
    /// map may be live, and resume finishes that move.
    async fn abort_begin(&mut self) -> Result<(), MoveError> {
        let map = self.control.latest().await?.load()?;
        if self.entry_is(&map, MapChange::PinTo(Side::Target)) {
            return Err(MoveError::Finished {
                tenant: self.tenant.to_string(),
            });
        }
        record::intent(self.control, &self.tenant, &self.lease, "abort").await
    }

    async fn abort(&mut self, recorded: &MoveStatus) -> Result<(), MoveError> {
        let map = self.control.latest().await?.load()?;
        let reversed = map
            .move_of(&self.tenant)
            .is_some_and(|route| route.phase.as_str() == "reversed");
        let dual_write = map
            .move_of(&self.tenant)
            .is_some_and(|route| route.phase.as_str() == "dual_write");
        if dual_write {
            // An earlier abort may have published `dual_write` and stopped in
            // its wait: routers may still read from the target. Wait for every
            // one to apply it before pinning the source.
            self.route(MapChange::Phase("dual_write")).await?;
        }
        if reversed {
            // Reads go back to the source: it must hold exactly what the target
            // (the primary until now) holds.
            let (map, source, target) = self.shards().await?;
            let column = map.tenant_column().to_owned();
            let tables = catalog::tenant_tables(&target, &column).await?;
            let verify = || {
                copy::verify(
                    &source,
                    &target,
                    &tables,
                    &self.tenant,
                    &column,
                    map.version(),
                    self.options.verify_rows(),
                    (self.control, &self.lease),
                    |_| {},
                )
            };
            self.check_in_flight(&source, &target).await?;
            if !verify().await?.equal() {
                let copier = copy::Copy {
                    from: &target,
                    to: &source,
                    lock_on_from: false,
                    tenant: &self.tenant,
                    column: &column,
                    version: map.version(),
                    batch_rows: self.options.batch_rows,
                    lease: (self.control, &self.lease),
                    max_rows_per_sec: self.options.max_rows_per_sec,
                };
                for table in &tables {
                    copier.table(table, &mut |_| {}).await?;
                }
                let verified = verify().await?;
                if !verified.mismatches.is_empty() {
                    return Err(MoveError::VerifyFailed {
                        tenant: self.tenant.to_string(),
                        mismatches: verified.mismatches,
                    });
                }
                if verified.one_sided_write {
                    return Err(MoveError::WriteOnOneShard {
                        tenant: self.tenant.to_string(),
                    });
                }
            }
            copy::carry_sequences(&target, &source, &tables).await?;
            self.route(MapChange::Phase("dual_write")).await?;
        }
        // A move stopped while starting may not have published its map yet.
        let shows_move = map.move_of(&self.tenant).is_some();
        let pinned = if recorded.phase != "starting" || shows_move || recorded.intent.is_some() {
            // Reads leave the source's primary for its replicas: they must
            // hold the row images the move applied there.
            let (map, source, _target) = self.shards().await?;
            self.replicas_caught_up(shard_named(&map, &self.from)?, &source)
                .await?;
            Some(self.route(MapChange::PinTo(Side::Source)).await?)
        } else {
            None
        };
        let (map, source, target) = self.shards().await?;
        if let Some(version) = pinned {
            if fence::moving_tenants(&target)
                .await
                .map_err(MoveError::db)?
                .iter()
                .any(|t| t == self.tenant.as_str())
            {
                // Row images from writers on older maps no longer reach the target.
                fence::raise(&target, self.tenant.as_str(), version).await?;
            }
        }
        if let Some(version) = pinned.filter(|_| reversed || recorded.phase == "reversed") {
            // Reads were served from the target: a router paused past its
            // lease may still read there. Before the target's copy goes,
            // every router that ever reported must have applied the pin (or
            // been silent past the purge grace), as for a purge.
            self.wait_for_every_router(version).await?;
        }
        let column = map.tenant_column();
        let tables = catalog::tenant_tables(&target, column).await?;
        // `AbortClearTarget`: only rows under a fence are the move's; a target
        // without one never received any (its start refused the tenant's rows
        // there, or never ran), and they stay.
        if fence::of(&target, self.tenant.as_str())
            .await
            .map_err(MoveError::db)?
            .is_some()
        {
            copy::delete_rows(
                &target,
                Some(&source),
                &tables,
                &self.tenant,
                column,
                map.version(),
            )
            .await?;
        }
        if fence::moving_tenants(&source)
            .await
            .map_err(MoveError::db)?
            .iter()
            .any(|t| t == self.tenant.as_str())
            || fence::moving_tenants(&target)
                .await
                .map_err(MoveError::db)?
                .iter()
                .any(|t| t == self.tenant.as_str())
        {
            fence::settle(&source, &target, self.tenant.as_str()).await?;
        }
        Ok(())
    }
}
