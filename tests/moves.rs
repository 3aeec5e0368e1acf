//! Tenant moves against real Postgres: concurrent writers through every phase,
//! crash and resume, abort from each phase, the fence against a stale router,
//! and verify catching per-shard sequence ids.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{connect, map_toml, Shards};
use shard_router::control::{ControlAgent, ControlOptions, ControlPlane, PublishOptions};
use shard_router::map::MapLoader;
use shard_router::moves::{self, MoveError, MoveOptions, Progress, Step};
use shard_router::{ShardRouter, TenantId};
use uuid::Uuid;

const SCHEMA: &str = "
CREATE TABLE projects (tenant_id text NOT NULL, id uuid PRIMARY KEY, name text NOT NULL);
CREATE TABLE tasks (tenant_id text NOT NULL, id uuid PRIMARY KEY,
                    project_id uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
                    title text NOT NULL, done boolean NOT NULL DEFAULT false);
CREATE TABLE comments (tenant_id text NOT NULL, id uuid PRIMARY KEY,
                       task_id uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
                       body text NOT NULL, at timestamptz NOT NULL);
CREATE TABLE events (tenant_id text NOT NULL, id uuid PRIMARY KEY, seq bigserial NOT NULL, what text NOT NULL);
";

struct World {
    control_db: Shards,
    shards: Shards,
    control: ControlPlane,
}

fn agent_options(id: &str) -> ControlOptions {
    let mut o = ControlOptions::default();
    o.instance_id = id.to_owned();
    o.heartbeat = Duration::from_millis(100);
    o.lease = Duration::from_millis(1500);
    o.poll = Duration::from_millis(500);
    o
}

/// [`fast`] options that stop after `step`.
fn until(step: Step) -> MoveOptions {
    let mut o = fast();
    o.until = step;
    o
}

fn fast() -> MoveOptions {
    let mut o = MoveOptions::default();
    o.wait = Duration::from_secs(10);
    o.batch_rows = 200;
    o.lease = Duration::from_millis(1500);
    o.purge_grace = Duration::from_secs(5);
    o
}

/// Resumes once a crashed mover's lease has run out, as an operator retrying would.
async fn resume_when_free(
    control: &mut ControlPlane,
    id: &TenantId,
    options: &MoveOptions,
) -> Result<moves::MoveStatus, MoveError> {
    for _ in 0..100 {
        match moves::resume(control, id, options, |_| {}).await {
            Err(MoveError::LeaseHeld { .. }) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => return other,
        }
    }
    panic!("the lease never ran out");
}

/// A mover, on a thread and runtime of its own as another process would be,
/// started on `id` and paused in its first backfill batch's progress report;
/// returns once it is paused. Sending on (or dropping) the sender wakes it.
async fn paused_mover(
    control_url: String,
    id: TenantId,
    options: MoveOptions,
) -> (
    std::thread::JoinHandle<Result<moves::MoveStatus, MoveError>>,
    std::sync::mpsc::Sender<()>,
) {
    let (paused_tx, paused_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let mover = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut control = ControlPlane::connect(&control_url).await.unwrap();
            let mut sent = false;
            moves::start(&mut control, &id, "b", &options, |p| {
                if matches!(p, Progress::Copied { .. }) && !sent {
                    sent = true;
                    paused_tx.send(()).unwrap();
                    let _ = go_rx.recv();
                }
            })
            .await
        })
    });
    tokio::task::spawn_blocking(move || paused_rx.recv().unwrap())
        .await
        .unwrap();
    (mover, go_tx)
}

/// Waits for a [`paused_mover`]'s thread.
async fn joined(
    mover: std::thread::JoinHandle<Result<moves::MoveStatus, MoveError>>,
) -> Result<moves::MoveStatus, MoveError> {
    tokio::task::spawn_blocking(move || mover.join().unwrap())
        .await
        .unwrap()
}

/// Ends every session on the control database that holds a mover lock (as a
/// mover's lost connection or a kill -9 would); returns how many.
async fn terminate_movers(control_url: &str) -> i64 {
    connect(control_url)
        .await
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Control database, two shards with the schema, map v1 with `tenant` pinned to a.
async fn world(tenant: &str) -> World {
    let control_db = Shards::create(1).await;
    let shards = Shards::create(2).await;
    shards.run_everywhere(SCHEMA).await;
    let mut control = ControlPlane::connect(&control_db.url(0)).await.unwrap();
    control.init().await.unwrap();
    control
        .publish(
            &map_toml(1, &shards, &format!("[tenants]\n{tenant} = \"a\"\n")),
            &PublishOptions::default(),
        )
        .await
        .unwrap();
    World {
        control_db,
        shards,
        control,
    }
}

/// Seeds `projects` projects, each with 2 tasks, each with 1 comment, through SQL on shard a.
async fn seed(url: &str, tenant: &str, projects: usize) -> BTreeSet<Uuid> {
    let client = connect(url).await;
    let mut ids = BTreeSet::new();
    for p in 0..projects {
        let pid = Uuid::new_v4();
        ids.insert(pid);
        client
            .execute(
                "INSERT INTO projects VALUES ($1, $2, $3)",
                &[&tenant, &pid, &format!("p{p}")],
            )
            .await
            .unwrap();
        for t in 0..2 {
            let tid = Uuid::new_v4();
            client
                .execute(
                    "INSERT INTO tasks VALUES ($1, $2, $3, $4, false)",
                    &[&tenant, &tid, &pid, &format!("t{t}")],
                )
                .await
                .unwrap();
            client
                .execute(
                    "INSERT INTO comments VALUES ($1, $2, $3, 'seed', now())",
                    &[&tenant, &Uuid::new_v4(), &tid],
                )
                .await
                .unwrap();
        }
    }
    ids
}

async fn count(url: &str, table: &str, tenant: &str) -> i64 {
    connect(url)
        .await
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE tenant_id = $1"),
            &[&tenant],
        )
        .await
        .unwrap()
        .get(0)
}

/// The projects of `tenant` in `url`: id -> name.
async fn projects(url: &str, tenant: &str) -> BTreeMap<Uuid, String> {
    connect(url)
        .await
        .query(
            "SELECT id, name FROM projects WHERE tenant_id = $1",
            &[&tenant],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// What writers were told succeeded: project id -> its latest name, or None once deleted.
type Log = Arc<Mutex<BTreeMap<Uuid, Option<String>>>>;

/// A writer through the router's handle: inserts projects (with a task and a
/// comment), renames and deletes its own, logging only acknowledged writes.
async fn writer(
    router: ShardRouter,
    tenant: TenantId,
    log: Log,
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
) {
    let mut mine: Vec<Uuid> = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let db = router.resolve(tenant.clone());
        let result: Result<(Uuid, Option<String>), shard_router::DbError> = async {
            let mut w = db.write().await?;
            let outcome = match n % 5 {
                3 if !mine.is_empty() => {
                    let id = mine[(n as usize) % mine.len()];
                    let name = format!("renamed-{n}");
                    w.execute(
                        "UPDATE projects SET name = $3 WHERE tenant_id = $1 AND id = $2",
                        &[&tenant.as_str(), &id, &name],
                    )
                    .await?;
                    (id, Some(name))
                }
                4 if mine.len() > 3 => {
                    let id = mine[0];
                    w.execute(
                        "DELETE FROM projects WHERE tenant_id = $1 AND id = $2",
                        &[&tenant.as_str(), &id],
                    )
                    .await?;
                    (id, None)
                }
                _ => {
                    let (pid, tid) = (Uuid::new_v4(), Uuid::new_v4());
                    let name = format!("new-{n}");
                    w.execute(
                        "INSERT INTO projects VALUES ($1, $2, $3)",
                        &[&tenant.as_str(), &pid, &name],
                    )
                    .await?;
                    w.execute(
                        "INSERT INTO tasks VALUES ($1, $2, $3, 'w', false)",
                        &[&tenant.as_str(), &tid, &pid],
                    )
                    .await?;
                    w.execute(
                        "INSERT INTO comments VALUES ($1, $2, $3, 'w', '2026-01-01T00:00:00Z')",
                        &[&tenant.as_str(), &Uuid::new_v4(), &tid],
                    )
                    .await?;
                    (pid, Some(name))
                }
            };
            w.commit().await?;
            Ok(outcome)
        }
        .await;
        match result {
            Ok((id, state)) => {
                match &state {
                    None => mine.retain(|m| *m != id),
                    Some(_) if !mine.contains(&id) => mine.push(id),
                    Some(_) => {}
                }
                log.lock().unwrap().insert(id, state);
            }
            // Refused writes (fence, a map change mid-flight) are not acknowledged; retry.
            Err(_) => {
                refused.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::task::yield_now().await;
    }
}

/// Four writers, their log of acknowledged writes, and how many were refused.
struct Writers {
    log: Log,
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    fn start(router: &ShardRouter, tenant: &TenantId, n: usize) -> Writers {
        let (log, stop, refused): (Log, _, _) = (Arc::default(), Arc::default(), Arc::default());
        let tasks = (0..n)
            .map(|_| {
                tokio::spawn(writer(
                    router.clone(),
                    tenant.clone(),
                    Arc::clone(&log),
                    Arc::clone(&stop),
                    Arc::clone(&refused),
                ))
            })
            .collect();
        Writers {
            log,
            stop,
            refused,
            tasks,
        }
    }

    /// Stops them; returns the log and the number of refused (retried) writes.
    async fn stop(self) -> (BTreeMap<Uuid, Option<String>>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let log = self.log.lock().unwrap().clone();
        (log, self.refused.load(Ordering::Relaxed))
    }
}

/// Asserts that the target holds exactly the seeded projects plus the
/// acknowledged writes: nothing lost, nothing duplicated, latest names. Returns
/// the projects found.
async fn assert_target_holds(
    url: &str,
    tenant: &str,
    seeded: &BTreeSet<Uuid>,
    log: &BTreeMap<Uuid, Option<String>>,
) -> BTreeMap<Uuid, String> {
    let mut expected: BTreeMap<Uuid, Option<String>> =
        seeded.iter().map(|id| (*id, None)).collect();
    for (id, state) in log {
        match state {
            Some(name) => {
                expected.insert(*id, Some(name.clone()));
            }
            None => {
                expected.remove(id);
            }
        }
    }
    let on_target = projects(url, tenant).await;
    assert_eq!(
        on_target.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "no acknowledged write lost or duplicated"
    );
    for (id, name) in &expected {
        if let Some(name) = name {
            assert_eq!(&on_target[id], name, "latest acknowledged name of {id}");
        }
    }
    on_target
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_under_concurrent_writers_keeps_every_acknowledged_write() {
    let tenant = "acme";
    let mut w = world(tenant).await;
    let seeded = seed(&w.shards.url(0), tenant, 400).await; // 400 + 800 + 800 rows
    let (router, _agent) = ControlAgent::start(&w.control_db.url(0), agent_options("r1"))
        .await
        .unwrap();
    let id = TenantId::new(tenant).unwrap();

    let writers = Writers::start(&router, &id, 4);
    let stop = writers.stop.clone();
    // A reader that must never see a seeded project disappear, whichever shard serves it.
    let reader = {
        let (router, id, stop, seeded) = (router.clone(), id.clone(), stop.clone(), seeded.clone());
        tokio::spawn(async move {
            let mut reads = 0;
            while !stop.load(Ordering::Relaxed) {
                let db = router.resolve(id.clone());
                let client = db.read().await.unwrap();
                let seen: BTreeSet<Uuid> = client
                    .query(
                        "SELECT id FROM projects WHERE tenant_id = $1 AND name LIKE 'p%'",
                        &[&id.as_str()],
                    )
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                assert_eq!(
                    seen,
                    seeded,
                    "a seeded project disappeared from reads on {}",
                    db.shard()
                );
                reads += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            reads
        })
    };

    let mut steps = Vec::new();
    let mut options = fast();
    options.purge_source = true;
    let status = moves::start(&mut w.control, &id, "b", &options, |p| {
        if let Progress::Step(s) = p {
            steps.push(s)
        }
    })
    .await
    .unwrap();
    assert_eq!(status.phase, "complete");
    assert_eq!(
        steps,
        [
            Step::Start,
            Step::Backfill,
            Step::Verify,
            Step::Cutover,
            Step::Complete
        ]
    );
    // Keep writing a little after the move, then stop.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (log, _) = writers.stop().await;
    let reads = reader.await.unwrap();
    assert!(
        reads > 10,
        "the reader ran through the move ({reads} reads)"
    );

    // The target holds exactly the acknowledged state; the source was purged.
    assert!(
        log.len() > 20,
        "writers wrote during the move ({} writes acknowledged)",
        log.len()
    );
    let on_target = assert_target_holds(&w.shards.url(1), tenant, &seeded, &log).await;
    for table in ["projects", "tasks", "comments"] {
        assert_eq!(
            count(&w.shards.url(0), table, tenant).await,
            0,
            "source purged: {table}"
        );
    }
    // Tasks and comments followed their projects (2 per seeded project, 1 per written one).
    let tasks = count(&w.shards.url(1), "tasks", tenant).await;
    assert!(
        tasks >= on_target.len() as i64,
        "{tasks} tasks for {} projects",
        on_target.len()
    );
    assert_eq!(router.resolve(id.clone()).shard(), "b");
    let recorded = moves::status(&w.control, &id).await.unwrap().unwrap();
    let copied = recorded.state["rows_copied"]["public.projects"]
        .as_u64()
        .unwrap();
    assert!(copied >= 400, "move-status records rows copied: {copied}");
}

#[tokio::test]
async fn a_crash_mid_backfill_resumes_and_verifies() {
    let tenant = "globex";
    let mut w = world(tenant).await;
    seed(&w.shards.url(0), tenant, 300).await;
    let (router, _agent) = ControlAgent::start(&w.control_db.url(0), agent_options("r1"))
        .await
        .unwrap();
    let id = TenantId::new(tenant).unwrap();

    // Run the move in a task and kill it once backfill has copied a few batches.
    let control_url = w.control_db.url(0);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let mover = {
        let id = id.clone();
        tokio::spawn(async move {
            let mut control = ControlPlane::connect(&control_url).await.unwrap();
            let mut options = fast();
            options.batch_rows = 50;
            let mut tx = Some(tx);
            let mut batches = 0;
            let _ = moves::start(&mut control, &id, "b", &options, |p| {
                if let Progress::Copied { .. } = p {
                    batches += 1;
                    if batches == 3 {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                    }
                }
            })
            .await;
        })
    };
    rx.await.unwrap();
    mover.abort(); // the crash
    let _ = mover.await;
    let crashed = moves::status(&w.control, &id).await.unwrap().unwrap();
    assert_eq!(crashed.phase, "dual_write", "stopped inside backfill");
    let partial = count(&w.shards.url(1), "projects", tenant).await;
    assert!(partial > 0 && partial < 300, "part copied: {partial}");

    let status = resume_when_free(&mut w.control, &id, &fast())
        .await
        .unwrap();
    assert_eq!(status.phase, "complete");
    for table in ["projects", "tasks", "comments"] {
        assert_eq!(
            count(&w.shards.url(1), table, tenant).await,
            count(&w.shards.url(0), table, tenant).await,
            "{table}"
        );
    }
    assert_eq!(count(&w.shards.url(1), "projects", tenant).await, 300);
    let verify = &status.state["verify"]["public.comments"];
    assert_eq!(verify["source_md5"], verify["target_md5"]);
    assert_eq!(router.resolve(id).shard(), "b");
}

#[tokio::test]
async fn abort_from_each_phase_returns_the_tenant_to_its_source() {
    let tenant = "initech";
    let mut w = world(tenant).await;
    seed(&w.shards.url(0), tenant, 50).await;
    let (router, _agent) = ControlAgent::start(&w.control_db.url(0), agent_options("r1"))
        .await
        .unwrap();
    let id = TenantId::new(tenant).unwrap();

    for until in [Step::Start, Step::Backfill, Step::Verify, Step::Cutover] {
        let mut options = fast();
        options.until = until;
        moves::start(&mut w.control, &id, "b", &options, |_| {})
            .await
            .unwrap();
        // Writes during the move reach both shards.
        let db = router.resolve(id.clone());
        let mut writer = db.write().await.unwrap();
        writer
            .execute(
                "INSERT INTO projects VALUES ($1, $2, $3)",
                &[
                    &tenant,
                    &Uuid::new_v4(),
                    &format!("during {}", until.as_str()),
                ],
            )
            .await
            .unwrap();
        writer.commit().await.unwrap();

        let second = moves::start(&mut w.control, &id, "b", &fast(), |_| {})
            .await
            .unwrap_err();
        assert!(
            matches!(second, MoveError::AlreadyMoving { .. }),
            "{second}"
        );

        let status = moves::abort(&mut w.control, &id, &fast()).await.unwrap();
        assert_eq!(status.phase, "aborted", "abort after {}", until.as_str());
        assert_eq!(
            router.resolve(id.clone()).shard(),
            "a",
            "served from the source after abort from {}",
            until.as_str()
        );
        for table in ["projects", "tasks", "comments"] {
            assert_eq!(
                count(&w.shards.url(1), table, tenant).await,
                0,
                "target holds none of its {table} ({})",
                until.as_str()
            );
        }
        assert!(count(&w.shards.url(0), "projects", tenant).await >= 50);
        assert_eq!(count(&w.shards.url(0), "tasks", tenant).await, 100);
    }
    // Every write made during the four moves is on the source.
    assert_eq!(count(&w.shards.url(0), "projects", tenant).await, 54);
    // The router still writes normally afterwards.
    let db = router.resolve(id.clone());
    let mut writer = db.write().await.unwrap();
    writer
        .execute("DELETE FROM comments WHERE tenant_id = $1", &[&tenant])
        .await
        .unwrap();
    writer.commit().await.unwrap();
}

#[tokio::test]
async fn a_router_on_the_old_map_is_refused_by_the_fence_on_both_shards() {
    let tenant = "umbrella";
    let mut w = world(tenant).await;
    seed(&w.shards.url(0), tenant, 20).await;
    let (_router, _agent) = ControlAgent::start(&w.control_db.url(0), agent_options("r1"))
        .await
        .unwrap();
    // A router held on version 1: built from it, never following the control database.
    let stale = ShardRouter::new(
        MapLoader::without_env()
            .load_str(&map_toml(
                1,
                &w.shards,
                &format!("[tenants]\n{tenant} = \"a\"\n"),
            ))
            .unwrap(),
    )
    .unwrap();
    let id = TenantId::new(tenant).unwrap();
    let mut options = fast();
    for until in [Step::Start, Step::Cutover, Step::Complete] {
        options.until = until;
        if until == Step::Start {
            moves::start(&mut w.control, &id, "b", &options, |_| {})
                .await
                .unwrap();
        } else {
            moves::resume(&mut w.control, &id, &options, |_| {})
                .await
                .unwrap();
        }
        for attempt in 0..5 {
            let db = stale.resolve(id.clone());
            assert_eq!((db.map_version(), db.shard()), (1, "a"));
            let mut writer = db.write().await.unwrap();
            let err = writer
                .execute(
                    "INSERT INTO projects VALUES ($1, $2, $3)",
                    &[
                        &tenant,
                        &Uuid::new_v4(),
                        &format!("stale-{}-{attempt}", until.as_str()),
                    ],
                )
                .await
                .unwrap_err();
            assert!(err.is_fenced(), "{err}");
            let report = err.report().to_string();
            assert!(report.contains("need map version"), "{report}");
            assert_eq!(shard_router::Rejection::from(&err).status(), 503);
            writer.rollback().await.unwrap();
            // The one-round-trip write is fenced the same way: a row it
            // writes, and a statement that changes no row.
            let err = db
                .execute(
                    "INSERT INTO projects VALUES ($1, $2, $3)",
                    &[
                        &tenant,
                        &Uuid::new_v4(),
                        &format!("stale-once-{}-{attempt}", until.as_str()),
                    ],
                )
                .await
                .unwrap_err();
            assert!(err.is_fenced(), "{err}");
            // The tenant's counts on shard a: (statements, errors).
            let counts = || {
                stale
                    .tenant_load()
                    .into_iter()
                    .filter(|s| s.shard == "a")
                    .flat_map(|s| s.tenants)
                    .find(|t| t.tenant == tenant)
                    .map_or((0, 0), |t| (t.statements, t.errors))
            };
            let before = counts();
            let err = db
                .execute(
                    "UPDATE projects SET name = 'stale-none' WHERE tenant_id = $1 AND false",
                    &[&tenant],
                )
                .await
                .unwrap_err();
            assert!(err.is_fenced(), "{err}");
            // Counted as the caller saw it: one statement, failed.
            let after = counts();
            assert_eq!((after.0 - before.0, after.1 - before.1), (1, 1));
        }
    }
    for i in 0..2 {
        let stale_rows: i64 = connect(&w.shards.url(i))
            .await
            .query_one(
                "SELECT count(*) FROM projects WHERE name LIKE 'stale-%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(stale_rows, 0, "no stale write reached shard {i}");
    }
    // Other tenants on the same shard are not fenced.
    let other = stale.resolve(TenantId::new("bystander").unwrap());
    let mut writer = other.write().await.unwrap();
    writer
        .execute(
            "INSERT INTO events (tenant_id, id, what) VALUES ('bystander', $1, 'x')",
            &[&Uuid::new_v4()],
        )
        .await
        .unwrap();
    writer.commit().await.unwrap();
}

#[tokio::test]
async fn per_shard_sequence_values_reach_the_target_as_the_source_drew_them() {
    let tenant = "hooli";
    let mut w = world(tenant).await;
    let source = connect(&w.shards.url(0)).await;
    // Spread the sequences apart, as on two shards with different histories.
    source
        .batch_execute("SELECT setval('events_seq_seq', 500)")
        .await
        .unwrap();
    for i in 0..30 {
        source
            .execute(
                "INSERT INTO events (tenant_id, id, what) VALUES ($1, $2, $3)",
                &[&tenant, &Uuid::new_v4(), &format!("e{i}")],
            )
            .await
            .unwrap();
    }
    let (router, _agent) = ControlAgent::start(&w.control_db.url(0), agent_options("r1"))
        .await
        .unwrap();
    let id = TenantId::new(tenant).unwrap();
    moves::start(&mut w.control, &id, "b", &until(Step::Backfill), |_| {})
        .await
        .unwrap();

    // A write during the move whose `seq` comes from the source's sequence.
    let db = router.resolve(id.clone());
    let mut writer = db.write().await.unwrap();
    writer
        .execute(
            "INSERT INTO events (tenant_id, id, what) VALUES ($1, $2, 'sequenced')",
            &[&tenant, &Uuid::new_v4()],
        )
        .await
        .unwrap();
    writer.commit().await.unwrap();

    let status = moves::resume(&mut w.control, &id, &fast(), |_| {})
        .await
        .unwrap();
    assert_eq!(status.phase, "complete");
    let seqs = |url: String| async move {
        connect(&url)
            .await
            .query(
                "SELECT seq FROM events WHERE tenant_id = $1 ORDER BY seq",
                &[&tenant],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, i64>(0))
            .collect::<Vec<_>>()
    };
    let on_source = seqs(w.shards.url(0)).await;
    assert_eq!(on_source.len(), 31);
    assert_eq!(
        seqs(w.shards.url(1)).await,
        on_source,
        "the same values on the target"
    );
    // The target, now primary, draws past every copied value.
    let db = router.resolve(id.clone());
    assert_eq!(db.shard(), "b");
    let mut writer = db.write().await.unwrap();
    let row = writer
        .query(
            "INSERT INTO events (tenant_id, id, what) VALUES ($1, $2, 'after') RETURNING seq",
            &[&tenant, &Uuid::new_v4()],
        )
        .await
        .unwrap();
    writer.commit().await.unwrap();
    let fresh: i64 = row[0].get(0);
    assert!(
        fresh > *on_source.last().unwrap(),
        "{fresh} after {on_source:?}"
    );
}

#[tokio::test]
async fn verify_catches_a_target_changed_behind_the_move_and_refuses_cutover() {
    let tenant = "hooli2";
    let (mut w, router, _agent, id) = parked_after(tenant, 20, Step::Backfill).await;
    // Someone edits the target directly, around the fence.
    connect(&w.shards.url(1))
        .await
        .batch_execute(&format!(
            "ALTER TABLE projects DISABLE TRIGGER shard_router_fence; \
             UPDATE projects SET name = 'tampered' WHERE tenant_id = '{tenant}'; \
             ALTER TABLE projects ENABLE ALWAYS TRIGGER shard_router_fence;"
        ))
        .await
        .unwrap();
    let err = moves::resume(&mut w.control, &id, &fast(), |_| {})
        .await
        .unwrap_err();
    match &err {
        MoveError::VerifyFailed { mismatches, .. } => {
            assert_eq!(mismatches.len(), 1, "{err}");
            assert_eq!(mismatches[0].table, "public.projects");
            assert_eq!(
                (mismatches[0].source_rows, mismatches[0].target_rows),
                (20, 20)
            );
            assert!(mismatches[0].checksums_differ);
        }
        other => panic!("expected VerifyFailed, got {other}"),
    }
    assert!(err.to_string().contains("cutover refused"), "{err}");
    let status = moves::status(&w.control, &id).await.unwrap().unwrap();
    assert_eq!(status.phase, "backfilled", "cutover did not happen");
    assert!(status.error.unwrap().contains("public.projects"));
    assert_eq!(
        router.resolve(id.clone()).shard(),
        "a",
        "reads stay on the source"
    );
    // Abort still works from here.
    moves::abort(&mut w.control, &id, &fast()).await.unwrap();
    assert_eq!(count(&w.shards.url(1), "projects", tenant).await, 0);
}

/// A writer sends its two COMMITs at once, so for a moment one shard has its
/// row and the other not yet. It holds the tenant lock on each shard until that
/// shard's COMMIT; verify takes both locks (the source's first), so it waits
/// for the late side instead of reporting shards that differ.
#[tokio::test]
async fn verify_waits_for_a_writer_between_its_two_commits() {
    let tenant = "initech";
    let mut w = world(tenant).await;
    seed(&w.shards.url(0), tenant, 5).await;
    let id = TenantId::new(tenant).unwrap();
    moves::start(&mut w.control, &id, "b", &until(Step::Backfill), |_| {})
        .await
        .unwrap();
    let version = w.control.latest().await.unwrap().version;
    let declare = format!(
        "SELECT set_config('{}', '{version}@' || extract(epoch FROM now())::text, true)",
        shard_router::db::VERSION_SETTING
    );
    let row = format!(
        "INSERT INTO projects VALUES ('{tenant}', '{}', 'late')",
        Uuid::new_v4()
    );
    // The target's half: lock held, row in, COMMIT not sent yet.
    let late = connect(&w.shards.url(1)).await;
    late.batch_execute(&format!(
        "BEGIN; SET LOCAL session_replication_role = replica; {declare}; \
         SELECT pg_advisory_xact_lock({}); {row}",
        shard_router::db::move_lock_key(&id)
    ))
    .await
    .unwrap();
    // The source's half has committed.
    connect(&w.shards.url(0))
        .await
        .batch_execute(&format!("BEGIN; {declare}; {row}; COMMIT"))
        .await
        .unwrap();
    let committer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        late.batch_execute("COMMIT").await.unwrap();
    });
    let verified = moves::resume(&mut w.control, &id, &until(Step::Verify), |_| {}).await;
    committer.await.unwrap();
    verified.expect("verify saw both COMMITs");
    let status = moves::status(&w.control, &id).await.unwrap().unwrap();
    assert_eq!(status.phase, "verified");
    assert_eq!(count(&w.shards.url(1), "projects", tenant).await, 6);
}

#[tokio::test]
async fn a_tenant_table_without_a_primary_key_is_refused_by_name() {
    let tenant = "stark";
    let mut w = world(tenant).await;
    w.shards
        .run_everywhere("CREATE TABLE audit (tenant_id text NOT NULL, line text)")
        .await;
    let id = TenantId::new(tenant).unwrap();
    let err = moves::start(&mut w.control, &id, "b", &fast(), |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, MoveError::NoPrimaryKey { .. }), "{err}");
    assert!(
        err.to_string().contains("public.audit has no primary key"),
        "{err}"
    );
    // Nothing was published: the map still has version 1 and no move.
    let latest = w.control.latest().await.unwrap();
    assert_eq!(latest.version, 1);
    let bad_target = moves::start(
        &mut w.control,
        &TenantId::new("other").unwrap(),
        "zz",
        &fast(),
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(
        matches!(bad_target, MoveError::BadTarget { .. }),
        "{bad_target}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_write_refused_by_one_side_fails_and_is_recorded_on_the_move() {
    let tenant = "wayne";
    let (w, router, _agent, id) = parked_after(tenant, 5, Step::Backfill).await;
    // Only the target refuses this name.
    connect(&w.shards.url(1))
        .await
        .batch_execute("ALTER TABLE projects ADD CONSTRAINT no_poison CHECK (name <> 'poison')")
        .await
        .unwrap();
    let err = insert_project_refused(&router, &id, "poison").await;
    assert!(
        err.to_string().contains("shard b"),
        "the write fails as a whole: {err}"
    );
    assert_eq!(
        count_named(&w.shards.url(0), "poison").await,
        0,
        "rolled back on the source too"
    );

    let recorded = recorded_failure(&w.control, &id).await;
    assert!(
        recorded.contains("dual write failed") && recorded.contains("no_poison"),
        "{recorded}"
    );
}

/// Both COMMITs of a moving write go out at once, so one can fail while the
/// other succeeds (here: a deferred trigger only the target has; in life, a
/// connection lost during COMMIT). The client gets the error, the move records
/// it, and verify refuses cutover until the move is aborted.
#[tokio::test]
async fn a_commit_refused_by_one_side_is_recorded_and_verify_refuses_cutover() {
    let tenant = "umbrella";
    let (mut w, router, _agent, id) = parked_after(tenant, 5, Step::Backfill).await;
    // Only the target refuses this name, and only at COMMIT.
    connect(&w.shards.url(1))
        .await
        .batch_execute(
            "CREATE FUNCTION refuse_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.name = 'late poison' THEN RAISE EXCEPTION 'refused at commit'; END IF; \
             RETURN NULL; END $$; \
             CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON projects \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_at_commit(); \
             ALTER TABLE projects ENABLE ALWAYS TRIGGER refuse_at_commit;",
        )
        .await
        .unwrap();
    let err = insert_project_refused(&router, &id, "late poison").await;
    assert!(err.to_string().contains("shard b"), "{err}");
    // The source (the primary, serving reads) committed it; the target did not.
    assert_eq!(count_named(&w.shards.url(0), "late poison").await, 1);
    assert_eq!(count_named(&w.shards.url(1), "late poison").await, 0);
    let recorded = recorded_failure(&w.control, &id).await;
    assert!(
        recorded.contains("committed on the primary only")
            && recorded.contains("refused at commit"),
        "{recorded}"
    );
    let err = moves::resume(&mut w.control, &id, &until(Step::Cutover), |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, MoveError::VerifyFailed { .. }), "{err}");
    assert_eq!(
        router.resolve(id.clone()).shard(),
        "a",
        "reads stay on the source"
    );
    moves::abort(&mut w.control, &id, &fast()).await.unwrap();
    assert_eq!(count(&w.shards.url(1), "projects", tenant).await, 0);
    assert_eq!(count_named(&w.shards.url(0), "late poison").await, 1);
}

/// Inserts a project named `name` for the tenant in a writer whose commit must
/// fail; returns that error.
/// One project of `id` written through `router`, in a transaction of its own.
async fn insert_project(
    router: &ShardRouter,
    id: &TenantId,
    name: &str,
) -> Result<(), shard_router::DbError> {
    let db = router.resolve(id.clone());
    let mut writer = db.write().await?;
    writer
        .execute(
            "INSERT INTO projects VALUES ($1, $2, $3)",
            &[&id.as_str(), &Uuid::new_v4(), &name],
        )
        .await?;
    writer.commit().await
}

async fn insert_project_refused(
    router: &ShardRouter,
    id: &TenantId,
    name: &str,
) -> shard_router::DbError {
    let db = router.resolve(id.clone());
    let mut writer = db.write().await.unwrap();
    writer
        .execute(
            "INSERT INTO projects VALUES ($1, $2, $3)",
            &[&id.as_str(), &Uuid::new_v4(), &name],
        )
        .await
        .unwrap();
    writer.commit().await.unwrap_err()
}

/// The failure the router reported on the move, once the control database has it.
async fn recorded_failure(control: &ControlPlane, id: &TenantId) -> String {
    for _ in 0..200 {
        if let Some(error) = moves::status(control, id).await.unwrap().unwrap().error {
            return error;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the failure is recorded on the move");
}

async fn count_named(url: &str, name: &str) -> i64 {
    connect(url)
        .await
        .query_one("SELECT count(*) FROM projects WHERE name = $1", &[&name])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shardctl_runs_a_move_step_by_step() {
    let tenant = "tyrell";
    let w = world(tenant).await;
    seed(&w.shards.url(0), tenant, 30).await;
    let (router, _agent) = ControlAgent::start(&w.control_db.url(0), agent_options("r1"))
        .await
        .unwrap();
    let control_url = w.control_db.url(0);
    let out = common::shardctl(
        &control_url,
        &[
            "--json", "tenant", "move", tenant, "--to", "b", "--until", "backfill", "--wait", "10",
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["phase"], "backfilled");
    assert_eq!(json["state"]["rows_copied"]["public.projects"], 30);

    let out = common::shardctl(&control_url, &["tenant", "move", tenant, "--to", "b"]).await;
    assert_eq!(out.status.code(), Some(1), "one move per tenant");
    assert!(String::from_utf8_lossy(&out.stderr).contains("already moving"));

    let out = common::shardctl(
        &control_url,
        &["tenant", "move", tenant, "--resume", "--purge-source"],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = common::shardctl(&control_url, &["tenant", "move-status", tenant]).await;
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("phase complete"), "{text}");
    assert!(
        text.contains("verify public.tasks: source 60 rows, target 60 rows, checksums equal"),
        "{text}"
    );
    assert_eq!(
        count(&w.shards.url(0), "projects", tenant).await,
        0,
        "--purge-source"
    );
    assert_eq!(count(&w.shards.url(1), "projects", tenant).await, 30);
    assert_eq!(router.resolve(TenantId::new(tenant).unwrap()).shard(), "b");

    let out = common::shardctl(&control_url, &["tenant", "move", tenant, "--abort"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is complete"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_database_going_away_mid_move_loses_nothing_and_the_move_resumes() {
    let tenant = "cyberdyne";
    let w = world(tenant).await;
    let seeded = seed(&w.shards.url(0), tenant, 200).await;
    // Routers and the mover reach the control database through a proxy the test cuts.
    let proxy = common::Proxy::start(5432).await;
    let control_url = proxy.url(&w.control_db.names[0]);
    let (router, _agent) = ControlAgent::start(&control_url, agent_options("r1"))
        .await
        .unwrap();
    let id = TenantId::new(tenant).unwrap();
    let writers = Writers::start(&router, &id, 4);
    let log = writers.log.clone();

    // Cut the control database once backfill has copied a few batches.
    let mut options = fast();
    options.batch_rows = 20;
    let mut control = ControlPlane::connect(&control_url).await.unwrap();
    let mut batches = 0;
    let cut = &proxy;
    let err = moves::start(&mut control, &id, "b", &options, |p| {
        if let Progress::Copied { .. } = p {
            batches += 1;
            if batches == 3 {
                cut.cut();
            }
        }
    })
    .await
    .unwrap_err();
    println!("move stopped by the outage: {err}");
    let acked_before = log.lock().unwrap().len();
    // The router keeps serving its last map (dual writes) while cut off.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(router.status().unconfirmed_for_ms.is_some());
    assert!(
        log.lock().unwrap().len() > acked_before,
        "writes kept being acknowledged during the outage"
    );

    proxy.restore();
    let mut control = ControlPlane::connect(&control_url).await.unwrap();
    let status = resume_when_free(&mut control, &id, &fast()).await.unwrap();
    assert_eq!(status.phase, "complete");
    let (log, refused) = writers.stop().await;
    assert_target_holds(&w.shards.url(1), tenant, &seeded, &log).await;
    println!(
        "control outage mid-move: {} writes acknowledged, {} refused and retried, 0 lost",
        log.len(),
        refused
    );
}

/// A move parked at verify; a router following the control database.
async fn parked(tenant: &str, projects: usize) -> (World, ShardRouter, ControlAgent, TenantId) {
    parked_after(tenant, projects, Step::Verify).await
}

/// A move parked after `step`; a router following the control database.
async fn parked_after(
    tenant: &str,
    projects: usize,
    step: Step,
) -> (World, ShardRouter, ControlAgent, TenantId) {
    let mut w = world(tenant).await;
    seed(&w.shards.url(0), tenant, projects).await;
    let (router, agent) = ControlAgent::start(&w.control_db.url(0), agent_options("r1"))
        .await
        .unwrap();
    let id = TenantId::new(tenant).unwrap();
    moves::start(&mut w.control, &id, "b", &until(step), |_| {})
        .await
        .unwrap();
    (w, router, agent, id)
}

#[tokio::test]
async fn a_republish_or_rollback_cannot_drop_change_or_bring_back_a_move() {
    let tenant = "umbrella";
    let (mut w, _router, _agent, id) = parked(tenant, 10).await;
    let newest = w.control.latest().await.unwrap().version;

    // The usual file from git: higher version, no [moves].
    let from_git = map_toml(
        newest + 1,
        &w.shards,
        &format!("[tenants]\n{tenant} = \"a\"\n"),
    );
    let err = w
        .control
        .publish(&from_git, &PublishOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("umbrella"), "{err}");
    assert!(
        matches!(
            err,
            shard_router::control::PublishError::MovesChanged { .. }
        ),
        "{err}"
    );
    // A changed entry (reads flipped by hand) is refused too.
    let flipped = map_toml(
        newest + 1,
        &w.shards,
        &format!("[moves.{tenant}]\nfrom = \"a\"\nto = \"b\"\nphase = \"reversed\"\n"),
    );
    assert!(w
        .control
        .publish(&flipped, &PublishOptions::default())
        .await
        .is_err());
    // Rollback to the map before the move.
    let err = w
        .control
        .rollback(1, &PublishOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("umbrella"), "{err}");
    assert_eq!(
        w.control.latest().await.unwrap().version,
        newest,
        "nothing published"
    );
    // Republishing the entry unchanged (with another change) is fine.
    let same = w.control.latest().await.unwrap().toml.replace(
        &format!("version = {newest}"),
        &format!("version = {}", newest + 1),
    );
    w.control
        .publish(&same, &PublishOptions::default())
        .await
        .unwrap();

    // Finish the move; an old file that still holds the move cannot bring it back.
    let status = moves::resume(&mut w.control, &id, &fast(), |_| {})
        .await
        .unwrap();
    assert_eq!(status.phase, "complete");
    let newest = w.control.latest().await.unwrap().version;
    let old = w
        .control
        .get(newest - 1)
        .await
        .unwrap()
        .unwrap()
        .toml
        .replace(
            &format!("version = {}", newest - 1),
            &format!("version = {}", newest + 1),
        );
    let err = w
        .control
        .publish(&old, &PublishOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("umbrella"), "{err}");
    assert_eq!(w.control.latest().await.unwrap().version, newest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_checked_against_a_version_that_is_no_longer_the_newest_is_refused() {
    let tenant = "t1";
    let w = world(tenant).await;
    // Hold the publishers' lock, so operator 2's publish is checked against
    // version 1 and then waits to insert.
    let key = shard_router::map::placement::hash_bytes(b"shard-router:publish") as i64;
    let gate = connect(&w.control_db.url(0)).await;
    gate.execute("SELECT pg_advisory_lock($1)", &[&key])
        .await
        .unwrap();
    let second = {
        let (url, toml) = (
            w.control_db.url(0),
            map_toml(
                3,
                &w.shards,
                "[placement]\nvnodes = 64\n[tenants]\nt1 = \"a\"\n",
            ),
        );
        tokio::spawn(async move {
            let mut control = ControlPlane::connect(&url).await.unwrap();
            control.publish(&toml, &PublishOptions::default()).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Meanwhile operator 1's version 2 lands (it pins t1 elsewhere).
    let v2 = map_toml(2, &w.shards, "[tenants]\nt1 = \"b\"\n");
    gate.execute(
        "INSERT INTO shard_router_maps (version, map, map_json, checksum) VALUES (2, $1, $2, 'x')",
        &[&v2, &shard_router::control::toml_to_json(&v2).unwrap()],
    )
    .await
    .unwrap();
    gate.execute("SELECT pg_advisory_unlock($1)", &[&key])
        .await
        .unwrap();
    let err = second.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            shard_router::control::PublishError::Concurrent { base: 1, newest: 2 }
        ),
        "{err}"
    );
    assert_eq!(
        w.control.latest().await.unwrap().version,
        2,
        "version 3 not published"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_once_the_complete_map_is_published_is_refused_and_resume_finishes() {
    let tenant = "tyrell";
    let (mut w, router, _agent, id) = parked(tenant, 20).await;
    moves::resume(&mut w.control, &id, &until(Step::Cutover), |_| {})
        .await
        .unwrap();
    // A live router that never applies anything: complete publishes, then times out.
    let control = connect(&w.control_db.url(0)).await;
    control
        .execute(
            "INSERT INTO shard_router_routers VALUES ('stuck', 'h', 1, now(), now() + interval '1 hour', 3600000)",
            &[],
        )
        .await
        .unwrap();
    let mut options = fast();
    options.wait = Duration::from_millis(500);
    let err = moves::resume(&mut w.control, &id, &options, |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, MoveError::RoutersBehind { .. }), "{err}");
    let status = moves::status(&w.control, &id).await.unwrap().unwrap();
    assert_eq!(status.intent.as_deref(), Some("complete"));
    // Writes acknowledged under the complete map land on the target only.
    common::eventually(Duration::from_secs(5), || {
        router.resolve(id.clone()).location().reason == shard_router::map::Reason::Pin
    })
    .await;
    insert_project(&router, &id, "after-complete")
        .await
        .unwrap();
    // Abort would send reads back to a source without that write: refused.
    let err = moves::abort(&mut w.control, &id, &fast())
        .await
        .unwrap_err();
    assert!(matches!(err, MoveError::Finished { .. }), "{err}");
    assert_eq!(count_named(&w.shards.url(1), "after-complete").await, 1);
    // Once the router is gone, resume finishes the move.
    control
        .execute(
            "DELETE FROM shard_router_routers WHERE instance_id = 'stuck'",
            &[],
        )
        .await
        .unwrap();
    let status = moves::resume(&mut w.control, &id, &fast(), |_| {})
        .await
        .unwrap();
    assert_eq!(status.phase, "complete");
    assert_eq!(count_named(&w.shards.url(1), "after-complete").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_mover_is_refused_and_a_mover_whose_lease_was_taken_stops() {
    let tenant = "soylent";
    let mut w = world(tenant).await;
    seed(&w.shards.url(0), tenant, 200).await;
    let (_router, _agent) = ControlAgent::start(&w.control_db.url(0), agent_options("r1"))
        .await
        .unwrap();
    let id = TenantId::new(tenant).unwrap();
    // Mover A pauses inside backfill (blocked in its progress callback).
    let mut options = fast();
    options.batch_rows = 20;
    let (mover_a, go_tx) = paused_mover(w.control_db.url(0), id.clone(), options).await;
    // An operator who thinks A hung: both a resume and an abort are refused.
    let err = moves::resume(&mut w.control, &id, &fast(), |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, MoveError::LeaseHeld { .. }), "{err}");
    let err = moves::abort(&mut w.control, &id, &fast())
        .await
        .unwrap_err();
    assert!(matches!(err, MoveError::LeaseHeld { .. }), "{err}");
    assert!(err.to_string().contains("held by live mover"), "{err}");
    // A stuck past its lease keeps the move: its control session holds the
    // mover lock (issue 25.4: a live mover keeps its lease whatever it waits for).
    tokio::time::sleep(fast().lease + Duration::from_millis(200)).await;
    let err = moves::abort(&mut w.control, &id, &fast())
        .await
        .unwrap_err();
    assert!(matches!(err, MoveError::LeaseHeld { .. }), "{err}");
    // A loses its control connection: the lease is free at once; B takes over
    // and aborts.
    let killed = terminate_movers(&w.control_db.url(0)).await;
    assert_eq!(killed, 1, "A's control session held the mover lock");
    let status = moves::abort(&mut w.control, &id, &fast()).await.unwrap();
    assert_eq!(status.phase, "aborted");
    // A wakes up: it can neither record, publish nor change a shard that B
    // claimed, and changes nothing more.
    go_tx.send(()).unwrap();
    let err = joined(mover_a).await.unwrap_err();
    assert!(
        matches!(
            err,
            MoveError::LeaseLost { .. }
                | MoveError::Control(_)
                | MoveError::Publish(shard_router::control::PublishError::MoverFenced { .. })
        ) || err.to_string().contains("a newer mover claimed it"),
        "{err}"
    );
    let status = moves::status(&w.control, &id).await.unwrap().unwrap();
    assert_eq!(status.phase, "aborted");
    assert_eq!(count(&w.shards.url(0), "projects", tenant).await, 200);
    assert_eq!(count(&w.shards.url(1), "projects", tenant).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bystander_write_does_not_wait_behind_a_move_beside_a_long_transaction() {
    let tenant = "moving";
    let w = world(tenant).await;
    seed(&w.shards.url(0), tenant, 50).await;
    let (router, _agent) = ControlAgent::start(&w.control_db.url(0), agent_options("r1"))
        .await
        .unwrap();
    // Another tenant's long batch transaction on the source, open for 2 s.
    let batch = connect(&w.shards.url(0)).await;
    batch
        .batch_execute(
            "BEGIN; INSERT INTO events (tenant_id, id, what) VALUES ('batchy', gen_random_uuid(), 'batch')",
        )
        .await
        .unwrap();
    let bystander = TenantId::new("bystander").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let latencies = {
        let (router, stop) = (router.clone(), stop.clone());
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let started = std::time::Instant::now();
                let db = router.resolve(bystander.clone());
                let mut w = db.write().await.unwrap();
                w.execute(
                    "INSERT INTO events (tenant_id, id, what) VALUES ('bystander', $1, 'b')",
                    &[&Uuid::new_v4()],
                )
                .await
                .unwrap();
                w.commit().await.unwrap();
                worst = worst.max(started.elapsed());
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (worst, n)
        })
    };
    let id = TenantId::new(tenant).unwrap();
    let mover = {
        let control_url = w.control_db.url(0);
        let id = id.clone();
        tokio::spawn(async move {
            let mut control = ControlPlane::connect(&control_url).await.unwrap();
            moves::start(&mut control, &id, "b", &fast(), |_| {}).await
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    batch.batch_execute("COMMIT").await.unwrap();
    let status = mover.await.unwrap().unwrap();
    assert_eq!(status.phase, "complete");
    stop.store(true, Ordering::Relaxed);
    let (worst, n) = latencies.await.unwrap();
    println!("bystander writes during the move beside a 2 s transaction: {n}, slowest {worst:?}");
    // Blocked behind a table lock it would take about 2 s; it never waits on the move.
    assert!(
        worst < Duration::from_millis(500),
        "slowest bystander write {worst:?}"
    );
    drop(w.control);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_or_failed_write_leaves_no_transaction_holding_the_tenant_lock() {
    let tenant = "lockme";
    let (w, router, _agent, id) = parked(tenant, 5).await;
    let lock_key = shard_router::db::move_lock_key(&id);
    let source = connect(&w.shards.url(0)).await;
    // 1. Cancelled while waiting for the tenant lock (another session holds it).
    let holder = connect(&w.shards.url(0)).await;
    holder
        .batch_execute(&format!("BEGIN; SELECT pg_advisory_xact_lock({lock_key})"))
        .await
        .unwrap();
    let db = router.resolve(id.clone());
    let cancelled = tokio::time::timeout(Duration::from_millis(200), db.write()).await;
    assert!(cancelled.is_err(), "the write was waiting for the lock");
    holder.batch_execute("COMMIT").await.unwrap();
    // 2. A write that fails on its statement, dropped without rollback.
    {
        let mut writer = db.write().await.unwrap();
        assert!(writer
            .execute("SELECT no_such_column FROM projects", &[])
            .await
            .is_err());
    }
    // 3. A write dropped mid-statement.
    {
        let mut writer = db.write().await.unwrap();
        let _ = tokio::time::timeout(
            Duration::from_millis(100),
            writer.execute("SELECT pg_sleep(5)", &[]),
        )
        .await;
    }
    // Nothing holds the lock or a transaction open for long: a new writer gets it at once.
    let free = common::eventually(Duration::from_secs(3), || true).await;
    assert!(free);
    let mut got = false;
    for _ in 0..100 {
        got = source
            .query_one("SELECT pg_try_advisory_lock($1)", &[&lock_key])
            .await
            .unwrap()
            .get(0);
        if got {
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(got, "the tenant lock was left held");
    source
        .query_one("SELECT pg_advisory_unlock($1)", &[&lock_key])
        .await
        .unwrap();
    let open: i64 = source
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND state LIKE 'idle in transaction%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(open, 0, "no connection left idle in a transaction");
    let started = std::time::Instant::now();
    let mut writer = router.resolve(id.clone()).write().await.unwrap();
    writer
        .execute(
            "INSERT INTO projects VALUES ($1, $2, 'next')",
            &[&tenant, &Uuid::new_v4()],
        )
        .await
        .unwrap();
    writer.commit().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_based_writes_in_the_reversed_phase_leave_both_shards_identical() {
    let tenant = "counter";
    let (mut w, router, _agent, id) = parked(tenant, 10).await;
    connect(&w.shards.url(0))
        .await
        .batch_execute("ALTER TABLE projects ADD COLUMN hits bigint NOT NULL DEFAULT 0")
        .await
        .unwrap();
    connect(&w.shards.url(1))
        .await
        .batch_execute("ALTER TABLE projects ADD COLUMN hits bigint NOT NULL DEFAULT 0")
        .await
        .unwrap();
    moves::resume(&mut w.control, &id, &until(Step::Cutover), |_| {})
        .await
        .unwrap();
    common::eventually(Duration::from_secs(5), || {
        router.resolve(id.clone()).shard() == "b"
    })
    .await;
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (router, id) = (router.clone(), id.clone());
            tokio::spawn(async move {
                for _ in 0..50 {
                    let db = router.resolve(id.clone());
                    let mut w = db.write().await.unwrap();
                    w.execute(
                        "UPDATE projects SET hits = hits + 1 WHERE tenant_id = $1",
                        &[&id.as_str()],
                    )
                    .await
                    .unwrap();
                    w.commit().await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let hits = |url: String| async move {
        connect(&url)
            .await
            .query(
                "SELECT id, hits FROM projects WHERE tenant_id = $1 ORDER BY id",
                &[&"counter"],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, Uuid>(0), r.get::<_, i64>(1)))
            .collect::<Vec<_>>()
    };
    let (on_source, on_target) = (hits(w.shards.url(0)).await, hits(w.shards.url(1)).await);
    assert!(on_target.iter().all(|(_, h)| *h == 200), "{on_target:?}");
    assert_eq!(on_source, on_target, "both shards identical");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_gaps_are_closed_and_fence_rows_leave_after_the_move() {
    let tenant = "gaps";
    let (mut w, router, _agent, id) = parked(tenant, 5).await;
    let source = connect(&w.shards.url(0)).await;
    // TRUNCATE of a tenant table while a tenant moves.
    let err = source.batch_execute("TRUNCATE events").await.unwrap_err();
    assert!(format!("{err:?}").contains("TRUNCATE"), "{err:?}");
    // migrate refuses while a move is in flight, naming it.
    let dir = std::env::temp_dir().join(format!("srt-mig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("V1__later.sql"),
        "CREATE TABLE later (tenant_id text, id int PRIMARY KEY)",
    )
    .unwrap();
    let migrations = shard_router::Migrations::load(&dir).unwrap();
    let map = w.control.latest().await.unwrap().load().unwrap();
    let reports = shard_router::migrate::migrate(&map, &migrations, |_, _| {}).await;
    for report in &reports {
        let err = report.outcome.as_ref().unwrap_err().to_string();
        assert!(err.contains("tenants are moving (gaps)"), "{err}");
    }
    let exists: bool = source
        .query_one("SELECT to_regclass('later') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!exists, "nothing ran");
    // A session-wide version set on a read() client is not a declaration.
    let db = router.resolve(id.clone());
    let client = db.read().await.unwrap();
    client
        .batch_execute("SET shard_router.map_version = '999999'")
        .await
        .unwrap();
    let err = client
        .raw()
        .execute(
            "UPDATE projects SET name = 'sneaky' WHERE tenant_id = $1",
            &[&tenant],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "SRF01", "{err:?}");
    client
        .batch_execute("RESET shard_router.map_version")
        .await
        .unwrap();
    drop(client);

    // A stale router (on the map before the move) after complete and purge.
    let stale = ShardRouter::new(
        MapLoader::without_env()
            .load_str(&w.control.get(1).await.unwrap().unwrap().toml)
            .unwrap(),
    )
    .unwrap();
    let mut options = fast();
    options.purge_source = true;
    moves::resume(&mut w.control, &id, &options, |_| {})
        .await
        .unwrap();
    let old = stale.resolve(id.clone());
    assert_eq!(old.shard(), "a");
    let mut writer = old.write().await.unwrap();
    let err = writer
        .execute(
            "UPDATE projects SET name = 'lost' WHERE tenant_id = $1 AND name = 'p0'",
            &[&tenant],
        )
        .await
        .unwrap_err();
    assert!(err.is_fenced(), "a zero-row stale UPDATE is refused: {err}");
    let mut writer = old.write().await.unwrap();
    let err = writer
        .execute("DELETE FROM projects WHERE tenant_id = $1", &[&tenant])
        .await
        .unwrap_err();
    assert!(err.is_fenced(), "a zero-row stale DELETE is refused: {err}");
    // After complete the owner keeps no fence row: plain writes work there again.
    let target = connect(&w.shards.url(1)).await;
    let rows: i64 = target
        .query_one(
            "SELECT count(*) FROM shard_router_fence WHERE tenant = $1",
            &[&tenant],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);
    target
        .execute(
            "UPDATE projects SET name = name WHERE tenant_id = $1",
            &[&tenant],
        )
        .await
        .unwrap();
    // TRUNCATE is allowed again once nothing moves.
    target.batch_execute("TRUNCATE events").await.unwrap();

    // A one-statement write goes out alone, undeclared; where the tenant has a
    // fence row the trigger refuses that, and it goes again declaring the
    // handle's version: passed when the version is high enough, refused (and
    // nothing written) when not.
    let current = ShardRouter::new(w.control.latest().await.unwrap().load().unwrap()).unwrap();
    let db = current.resolve(id.clone());
    assert_eq!(db.shard(), "b");
    let version = db.map_version() as i64;
    for (min_version, passes) in [(version, true), (version + 1, false)] {
        target
            .execute(
                "INSERT INTO shard_router_fence (tenant, min_version, moving) VALUES ($1, $2, false) \
                 ON CONFLICT (tenant) DO UPDATE SET min_version = EXCLUDED.min_version",
                &[&tenant, &min_version],
            )
            .await
            .unwrap();
        let name = format!("fenced-{min_version}");
        let result = db
            .execute(
                "INSERT INTO projects VALUES ($1, $2, $3)",
                &[&tenant, &Uuid::new_v4(), &name],
            )
            .await;
        let written: i64 = target
            .query_one("SELECT count(*) FROM projects WHERE name = $1", &[&name])
            .await
            .unwrap()
            .get(0);
        if passes {
            assert_eq!(result.unwrap(), 1);
            assert_eq!(written, 1);
        } else {
            let err = result.unwrap_err();
            assert!(err.is_fenced(), "{err}");
            assert_eq!(written, 0, "a refused write leaves nothing");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_waits_for_a_router_that_has_not_confirmed_the_complete_map() {
    let tenant = "purgeme";
    let (mut w, _router, _agent, id) = parked(tenant, 5).await;
    moves::resume(&mut w.control, &id, &until(Step::Cutover), |_| {})
        .await
        .unwrap();
    // A router cut off from the control database on the cutover map, past its lease
    // but within the purge grace: it may still read the source.
    let control = connect(&w.control_db.url(0)).await;
    let cutover = w.control.latest().await.unwrap().version as i64;
    control
        .execute(
            "INSERT INTO shard_router_routers VALUES ('partitioned', 'h', $1, now(), now() - interval '3 seconds', 1000)",
            &[&cutover],
        )
        .await
        .unwrap();
    let mut options = fast();
    options.purge_source = true;
    options.wait = Duration::from_millis(700);
    let err = moves::resume(&mut w.control, &id, &options, |_| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("partitioned"), "{err}");
    assert_eq!(
        count(&w.shards.url(0), "projects", tenant).await,
        5,
        "not purged"
    );
    // Once it has been silent longer than the grace (5 s here), purge goes ahead.
    control
        .execute(
            "UPDATE shard_router_routers SET last_seen = now() - interval '6 seconds' WHERE instance_id = 'partitioned'",
            &[],
        )
        .await
        .unwrap();
    let mut options = fast();
    options.purge_source = true;
    let status = moves::resume(&mut w.control, &id, &options, |_| {})
        .await
        .unwrap();
    assert_eq!(status.phase, "complete");
    assert_eq!(count(&w.shards.url(0), "projects", tenant).await, 0);
}

#[tokio::test]
async fn a_tenant_column_named_like_a_keyword_is_quoted_and_purge_touches_only_the_tenant() {
    // Spliced unquoted, `WHERE user = 'x'` would compare CURRENT_USER: copy
    // nothing, verify 0 = 0, and purge every tenant's rows.
    let control_db = Shards::create(1).await;
    let shards = Shards::create(2).await;
    shards
        .run_everywhere(
            "CREATE TABLE docs (\"user\" text NOT NULL, id uuid PRIMARY KEY, body text NOT NULL)",
        )
        .await;
    let source = connect(&shards.url(0)).await;
    for (tenant, n) in [("alice", 30), ("postgres", 5)] {
        for i in 0..n {
            source
                .execute(
                    "INSERT INTO docs VALUES ($1, $2, $3)",
                    &[&tenant, &Uuid::new_v4(), &format!("d{i}")],
                )
                .await
                .unwrap();
        }
    }
    let mut control = ControlPlane::connect(&control_db.url(0)).await.unwrap();
    control.init().await.unwrap();
    let toml = map_toml(1, &shards, "[tenants]\nalice = \"a\"\npostgres = \"a\"\n").replacen(
        "version = 1\n",
        "version = 1\ntenant_column = \"user\"\n",
        1,
    );
    control
        .publish(&toml, &PublishOptions::default())
        .await
        .unwrap();
    let mut options = fast();
    options.purge_source = true;
    let status = moves::start(
        &mut control,
        &TenantId::new("alice").unwrap(),
        "b",
        &options,
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(status.phase, "complete");
    assert_eq!(status.state["rows_copied"]["public.docs"], 30);
    let count_of = |url: String, tenant: &'static str| async move {
        connect(&url)
            .await
            .query_one("SELECT count(*) FROM docs WHERE \"user\" = $1", &[&tenant])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(count_of(shards.url(1), "alice").await, 30);
    assert_eq!(count_of(shards.url(0), "alice").await, 0);
    assert_eq!(
        count_of(shards.url(0), "postgres").await,
        5,
        "the other tenant untouched"
    );
    drop(control_db);
}

/// Inserts a live router row that applied the newest map and never applies
/// another: the next wait for routers runs out on it.
async fn pause_a_router(control_url: &str, name: &str) {
    connect(control_url)
        .await
        .execute(
            "INSERT INTO shard_router_routers \
               (instance_id, host, applied_version, applied_checksum, started_at, last_seen, lease_ms) \
             SELECT $1, 'h', version, checksum, now(), now() + interval '1 hour', 3600000 \
             FROM shard_router_maps ORDER BY version DESC LIMIT 1",
            &[&name],
        )
        .await
        .unwrap();
}

async fn unpause_router(control_url: &str, name: &str) {
    connect(control_url)
        .await
        .execute(
            "DELETE FROM shard_router_routers WHERE instance_id = $1",
            &[&name],
        )
        .await
        .unwrap();
}

/// Issue 25.1 (the model's `Resume` transition, property "an abort once begun
/// ends as an abort"): an abort that published the pin to the source and then
/// stopped on a paused router is finished as an abort by `resume`, which used
/// to verify and cut over, losing the writes made on the pinned source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_abort_finishes_as_an_abort_and_keeps_the_writes_made_meanwhile() {
    let tenant = "initech";
    let (mut w, router, _agent, id) = parked(tenant, 20).await;
    let control_url = w.control_db.url(0);
    pause_a_router(&control_url, "paused").await;
    let mut options = fast();
    options.wait = Duration::from_millis(500);
    let err = moves::abort(&mut w.control, &id, &options)
        .await
        .unwrap_err();
    assert!(matches!(err, MoveError::RoutersBehind { .. }), "{err}");
    let status = moves::status(&w.control, &id).await.unwrap().unwrap();
    assert_eq!(status.intent.as_deref(), Some("abort"));
    assert_eq!(status.phase, "verified");
    // The live router serves the pin to the source: a write lands there only.
    assert!(
        common::eventually(Duration::from_secs(5), || {
            router.resolve(id.clone()).location().reason == shard_router::map::Reason::Pin
        })
        .await
    );
    insert_project(&router, &id, "between").await.unwrap();
    // Still paused: resume continues the abort, and stops again in its wait.
    let err = moves::resume(&mut w.control, &id, &options, |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, MoveError::RoutersBehind { .. }), "{err}");
    let status = moves::status(&w.control, &id).await.unwrap().unwrap();
    assert_eq!(status.intent.as_deref(), Some("abort"));
    unpause_router(&control_url, "paused").await;
    let status = moves::resume(&mut w.control, &id, &fast(), |_| {})
        .await
        .unwrap();
    assert_eq!(status.phase, "aborted");
    assert_eq!(count_named(&w.shards.url(0), "between").await, 1);
    assert_eq!(count(&w.shards.url(0), "projects", tenant).await, 21);
    assert_eq!(count(&w.shards.url(1), "projects", tenant).await, 0);
    let map = w.control.latest().await.unwrap().load().unwrap();
    assert_eq!(map.shard(map.locate(&id).shard).name(), "a");
}

/// Issue 25.2 (the model's property "a write the source refused exists
/// nowhere"): Django creates foreign keys `DEFERRABLE INITIALLY DEFERRED`. A
/// client that adds a child to a parent it deleted, or breaks a deferrable
/// unique key, is refused at COMMIT on the primary; the row images must not
/// have reached the other shard (whose replica mode skips those checks), so
/// verify passes and the move completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_constraints_refuse_a_moving_write_on_both_shards() {
    let tenant = "django";
    let mut w = world(tenant).await;
    w.shards
        .run_everywhere(
            "CREATE TABLE blog (tenant_id text NOT NULL, id bigint NOT NULL, slug text NOT NULL, \
               PRIMARY KEY (tenant_id, id), \
               CONSTRAINT blog_slug UNIQUE (tenant_id, slug) DEFERRABLE INITIALLY DEFERRED);
             CREATE TABLE entry (tenant_id text NOT NULL, id bigint NOT NULL, blog_id bigint NOT NULL, \
               PRIMARY KEY (tenant_id, id), \
               FOREIGN KEY (tenant_id, blog_id) REFERENCES blog (tenant_id, id) \
                 DEFERRABLE INITIALLY DEFERRED);",
        )
        .await;
    let source = connect(&w.shards.url(0)).await;
    source
        .batch_execute(&format!(
            "INSERT INTO blog SELECT '{tenant}', g, 'b' || g FROM generate_series(1, 50) g;
             INSERT INTO entry SELECT '{tenant}', g, g FROM generate_series(1, 50) g;"
        ))
        .await
        .unwrap();
    let (router, _agent) = ControlAgent::start(&w.control_db.url(0), agent_options("r1"))
        .await
        .unwrap();
    let id = TenantId::new(tenant).unwrap();
    moves::start(&mut w.control, &id, "b", &until(Step::Backfill), |_| {})
        .await
        .unwrap();
    assert!(
        common::eventually(Duration::from_secs(5), || {
            matches!(
                router.resolve(id.clone()).location().reason,
                shard_router::map::Reason::Move(_)
            )
        })
        .await
    );
    let db = router.resolve(id.clone());
    // A stale client: deletes blog 7, then adds an entry to it.
    let mut writer = db.write().await.unwrap();
    writer
        .execute(
            "DELETE FROM blog WHERE tenant_id = $1 AND id = 7",
            &[&tenant],
        )
        .await
        .unwrap();
    writer
        .execute("INSERT INTO entry VALUES ($1, 1000, 7)", &[&tenant])
        .await
        .unwrap();
    let err = writer.commit().await.unwrap_err();
    assert!(
        err.to_string().contains("foreign key") || format!("{err:?}").contains("23503"),
        "{err:?}"
    );
    // Two blogs with one slug, caught by the deferrable unique key at COMMIT.
    let mut writer = db.write().await.unwrap();
    writer
        .execute("INSERT INTO blog VALUES ($1, 2000, 'dup')", &[&tenant])
        .await
        .unwrap();
    writer
        .execute("INSERT INTO blog VALUES ($1, 2001, 'dup')", &[&tenant])
        .await
        .unwrap();
    assert!(writer.commit().await.is_err());
    for url in [w.shards.url(0), w.shards.url(1)] {
        let c = connect(&url).await;
        let orphans: i64 = c
            .query_one("SELECT count(*) FROM entry WHERE id = 1000", &[])
            .await
            .unwrap()
            .get(0);
        let dups: i64 = c
            .query_one("SELECT count(*) FROM blog WHERE slug = 'dup'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!((orphans, dups), (0, 0), "no refused row on {url}");
        assert_eq!(
            count(&url, "blog", tenant).await,
            50,
            "blog 7 is back on {url}"
        );
    }
    let status = moves::resume(&mut w.control, &id, &fast(), |_| {})
        .await
        .unwrap();
    assert_eq!(status.phase, "complete");
}

/// Issue 25.4 and the model's `LoseConnection`: a mover whose control session
/// ends (kill -9, a cut connection) frees the tenant at once; the next resume
/// does not wait for a lease to run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_mover_frees_the_tenant_at_once() {
    let tenant = "hooli";
    let mut w = world(tenant).await;
    seed(&w.shards.url(0), tenant, 100).await;
    let (_router, _agent) = ControlAgent::start(&w.control_db.url(0), agent_options("r1"))
        .await
        .unwrap();
    let id = TenantId::new(tenant).unwrap();
    let control_url = w.control_db.url(0);
    let mut options = fast();
    options.batch_rows = 20;
    options.lease = Duration::from_secs(60);
    let (mover, go_tx) = paused_mover(control_url.clone(), id.clone(), options).await;
    // Its recorded lease has almost a minute left; its session ends.
    assert_eq!(terminate_movers(&control_url).await, 1);
    let started = std::time::Instant::now();
    let status = moves::resume(&mut w.control, &id, &fast(), |_| {})
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(status.phase, "complete");
    assert_eq!(count(&w.shards.url(1), "projects", tenant).await, 100);
    // The dead mover wakes: it changes nothing on the shards it lost.
    drop(go_tx);
    let woke = joined(mover).await;
    assert!(woke.is_err(), "{woke:?}");
    assert_eq!(count(&w.shards.url(1), "projects", tenant).await, 100);
    let status = moves::status(&w.control, &id).await.unwrap().unwrap();
    assert_eq!(status.phase, "complete");
}

/// The model's `ClearTarget` (found by the model after a restore): rows of the
/// tenant on the target that no fence marks as stale may be its only copy, so
/// start refuses and deletes nothing; an abort of that move leaves them too.
#[tokio::test]
async fn a_move_refuses_a_target_holding_unfenced_rows_of_the_tenant() {
    let tenant = "piedpiper";
    let mut w = world(tenant).await;
    seed(&w.shards.url(0), tenant, 5).await;
    seed(&w.shards.url(1), tenant, 3).await;
    let id = TenantId::new(tenant).unwrap();
    let err = moves::start(&mut w.control, &id, "b", &fast(), |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, MoveError::TargetHoldsTenant { .. }), "{err}");
    assert!(err.to_string().contains("nothing was deleted"), "{err}");
    assert_eq!(count(&w.shards.url(1), "projects", tenant).await, 3);
    let status = moves::abort(&mut w.control, &id, &fast()).await.unwrap();
    assert_eq!(status.phase, "aborted");
    assert_eq!(count(&w.shards.url(1), "projects", tenant).await, 3);
    assert_eq!(count(&w.shards.url(0), "projects", tenant).await, 5);
}

/// The model's `WaitForRouters` check (found by the model after a restore): a
/// map published over the move that drops its entry stops the mover before
/// it changes anything more, naming what it found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_whose_entry_was_dropped_from_the_map_stops_and_changes_nothing() {
    let tenant = "aviato";
    let (mut w, _router, _agent, id) = parked(tenant, 10).await;
    // As a restore and a recovery publish would leave it: a newer map
    // without the move (inserted behind the publish checks).
    let control = connect(&w.control_db.url(0)).await;
    let newest = w.control.latest().await.unwrap();
    let mut doc = shard_router::map::MapDocument::parse(&newest.toml).unwrap();
    doc.clear_move(tenant);
    doc.set_version(newest.version + 1);
    let toml = doc.render();
    control
        .execute(
            "INSERT INTO shard_router_maps (version, map, map_json, checksum, note) \
             SELECT $1, $2, map_json, md5($2), 'restored' FROM shard_router_maps WHERE version = $3",
            &[&((newest.version + 1) as i64), &toml, &(newest.version as i64)],
        )
        .await
        .unwrap();
    let before = moves::status(&w.control, &id).await.unwrap().unwrap();
    let err = moves::resume(&mut w.control, &id, &fast(), |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, MoveError::MapChanged { .. }), "{err}");
    let after = moves::status(&w.control, &id).await.unwrap().unwrap();
    assert_eq!(after.phase, before.phase);
    let latest = w.control.latest().await.unwrap();
    assert_eq!(latest.version, newest.version + 1, "nothing was published");
}

/// Issue 25.5: a move run without `--purge-source` leaves the tenant's rows
/// on its former shard, where a data migration (a plain `UPDATE`, no map
/// version declared) is refused by the fence. `moves::purge` (`shardctl
/// tenant purge`) removes that copy once every router applied the newest map;
/// the migration then runs, and the target keeps every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_removes_a_completed_moves_former_copy_and_migrations_run_there_again() {
    let tenant = "gavin";
    let (mut w, _router, _agent, id) = parked(tenant, 10).await;
    let err = moves::purge(&mut w.control, &id, &fast())
        .await
        .unwrap_err();
    assert!(matches!(err, MoveError::NotComplete { .. }), "{err}");
    let status = moves::resume(&mut w.control, &id, &fast(), |_| {})
        .await
        .unwrap();
    assert_eq!(status.phase, "complete");
    let migration = "UPDATE projects SET name = upper(name)";
    let former = connect(&w.shards.url(0)).await;
    let err = former.batch_execute(migration).await.unwrap_err();
    assert!(format!("{err:?}").contains("SRF01"), "{err:?}");
    let status = moves::purge(&mut w.control, &id, &fast()).await.unwrap();
    assert_eq!(status.state["purged"], serde_json::json!(true));
    assert_eq!(count(&w.shards.url(0), "projects", tenant).await, 0);
    assert_eq!(count(&w.shards.url(1), "projects", tenant).await, 10);
    former.batch_execute(migration).await.unwrap();
    // Idempotent.
    let again = moves::purge(&mut w.control, &id, &fast()).await.unwrap();
    assert_eq!(again.phase, "complete");
    assert_eq!(count(&w.shards.url(1), "projects", tenant).await, 10);
}

/// Found by the nemesis (seed 43 of a 100-seed run): after a restore, the
/// stored newest map still pins a tenant to a shard it has since left in a
/// second move. The recovery publish with `--pin-existing` pinned it back to
/// that stale copy (the check saw its rows there), routing it away from the
/// writes made since. Rows under a fence that marks the shard as left are now
/// a stale copy: no reason to refuse, never a place to pin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recovery_publish_never_pins_a_tenant_to_a_shard_it_left() {
    let tenant = "bachman";
    let mut w = world(tenant).await;
    seed(&w.shards.url(0), tenant, 5).await;
    let (router, _agent) = ControlAgent::start(&w.control_db.url(0), agent_options("r1"))
        .await
        .unwrap();
    let id = TenantId::new(tenant).unwrap();
    moves::start(&mut w.control, &id, "b", &fast(), |_| {})
        .await
        .unwrap();
    let backup = w.control.latest().await.unwrap().version;
    moves::start(&mut w.control, &id, "a", &fast(), |_| {})
        .await
        .unwrap();
    assert!(
        common::eventually(Duration::from_secs(5), || {
            router.resolve(id.clone()).shard() == "a"
        })
        .await
    );
    insert_project(&router, &id, "after-both-moves")
        .await
        .unwrap();
    // The restore: the maps after the first move are gone.
    connect(&w.control_db.url(0))
        .await
        .execute(
            "DELETE FROM shard_router_maps WHERE version > $1",
            &[&(backup as i64)],
        )
        .await
        .unwrap();
    // A version below what the shards' fences require is refused, naming it.
    let err = w
        .control
        .publish(
            &map_toml(
                backup + 1,
                &w.shards,
                &format!("[tenants]\n{tenant} = \"a\"\n"),
            ),
            &PublishOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, shard_router::control::PublishError::FencesAhead { needed, .. } if needed > backup + 1),
        "{err:?}"
    );
    // The documented recovery: the map from git (the tenant on `a`) above
    // every router's version, with --pin-existing.
    let above = router.version().max(backup) + 1;
    let mut options = PublishOptions::default();
    options.pin_existing = true;
    let published = w
        .control
        .publish(
            &map_toml(above, &w.shards, &format!("[tenants]\n{tenant} = \"a\"\n")),
            &options,
        )
        .await
        .unwrap();
    assert!(published.pinned.is_empty(), "{:?}", published.pinned);
    assert!(common::eventually(Duration::from_secs(5), || router.version() == above).await);
    assert_eq!(router.resolve(id.clone()).shard(), "a");
    assert_eq!(count_named(&w.shards.url(0), "after-both-moves").await, 1);
}

/// Verify checks a tenant in key ranges, each under the tenant lock on both
/// shards (issue 25.3): the tenant's writes go through between ranges instead
/// of waiting behind the whole tenant, and a difference in any range, or in
/// rows past the source's last key, is still found.
#[tokio::test]
async fn verify_checks_key_ranges_and_lets_the_tenants_writes_through_between_them() {
    let tenant = "piedpiper";
    let (mut w, router, _agent, id) = parked_after(tenant, 400, Step::Backfill).await;
    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(Mutex::new(Vec::<std::time::Instant>::new()));
    let writes = tokio::spawn({
        let (router, id, stop, commits) =
            (router.clone(), id.clone(), stop.clone(), commits.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                if insert_project(&router, &id, "between").await.is_ok() {
                    commits.lock().unwrap().push(std::time::Instant::now());
                }
            }
        }
    });
    // 400 projects, 800 tasks, 800 comments; ranges of 4 × 10 = 40 rows.
    let mut options = until(Step::Verify);
    options.batch_rows = 10;
    let mut ranges = Vec::new();
    moves::resume(&mut w.control, &id, &options, |p| {
        if let Progress::Verified { .. } = p {
            ranges.push(std::time::Instant::now());
        }
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    writes.await.unwrap();
    assert!(ranges.len() >= 50, "{} ranges", ranges.len());
    let (first, last) = (ranges[0], *ranges.last().unwrap());
    let between = commits
        .lock()
        .unwrap()
        .iter()
        .filter(|at| **at > first && **at < last)
        .count();
    assert!(
        between > 0,
        "no write of the tenant committed while verify ran"
    );

    // A row changed in the middle of the key order, around the fence.
    let target = connect(&w.shards.url(1)).await;
    let around_fence = |sql: String| {
        format!(
            "ALTER TABLE projects DISABLE TRIGGER shard_router_fence; {sql}; \
             ALTER TABLE projects ENABLE ALWAYS TRIGGER shard_router_fence;"
        )
    };
    let middle: Uuid = target
        .query_one(
            "SELECT id FROM projects WHERE tenant_id = $1 ORDER BY id OFFSET 200 LIMIT 1",
            &[&tenant],
        )
        .await
        .unwrap()
        .get(0);
    target
        .batch_execute(&around_fence(format!(
            "UPDATE projects SET name = 'tampered' WHERE id = '{middle}'"
        )))
        .await
        .unwrap();
    // Cutover verifies again before it switches reads.
    let mut cutover = until(Step::Cutover);
    cutover.batch_rows = 10;
    let mismatch = |err: MoveError| match err {
        MoveError::VerifyFailed { mismatches, .. } => {
            assert_eq!(mismatches.len(), 1, "{mismatches:?}");
            assert_eq!(mismatches[0].table, "public.projects");
            mismatches[0].clone()
        }
        other => panic!("expected VerifyFailed, got {other}"),
    };
    let err = moves::resume(&mut w.control, &id, &cutover, |_| {})
        .await
        .unwrap_err();
    let found = mismatch(err);
    assert_eq!(found.source_rows, found.target_rows);
    assert!(found.checksums_differ);
    let status = moves::status(&w.control, &id).await.unwrap().unwrap();
    assert_eq!(status.phase, "verified", "cutover refused");

    // Put it back; then a row only the target has, past the source's last key.
    let name: String = connect(&w.shards.url(0))
        .await
        .query_one("SELECT name FROM projects WHERE id = $1", &[&middle])
        .await
        .unwrap()
        .get(0);
    target
        .batch_execute(&around_fence(format!(
            "UPDATE projects SET name = '{name}' WHERE id = '{middle}'; \
             INSERT INTO projects VALUES ('{tenant}', 'ffffffff-ffff-ffff-ffff-ffffffffffff', 'stray')"
        )))
        .await
        .unwrap();
    let err = moves::resume(&mut w.control, &id, &cutover, |_| {})
        .await
        .unwrap_err();
    let found = mismatch(err);
    assert_eq!(found.target_rows, found.source_rows + 1);
    assert_eq!(
        router.resolve(id.clone()).shard(),
        "a",
        "reads stay on the source"
    );
}

/// Issue 25.8: under `tenant_case = "lower"` a move refuses to start while
/// the source holds rows naming the tenant in another case (a move matches
/// the column exactly and would leave them behind), and changes nothing;
/// once they are stored lowercased, the move takes every row.
#[tokio::test]
async fn under_lower_case_ids_a_move_refuses_rows_stored_in_another_case() {
    let tenant = "umbrella";
    let control_db = Shards::create(1).await;
    let shards = Shards::create(2).await;
    shards.run_everywhere(SCHEMA).await;
    let mut control = ControlPlane::connect(&control_db.url(0)).await.unwrap();
    control.init().await.unwrap();
    let lower = map_toml(1, &shards, &format!("[tenants]\n{tenant} = \"a\"\n")).replacen(
        '\n',
        "\ntenant_case = \"lower\"\n",
        1,
    );
    control
        .publish(&lower, &PublishOptions::default())
        .await
        .unwrap();
    seed(&shards.url(0), tenant, 10).await;
    let source = connect(&shards.url(0)).await;
    source
        .execute(
            "INSERT INTO projects VALUES ('Umbrella', $1, 'stored by an older client')",
            &[&Uuid::new_v4()],
        )
        .await
        .unwrap();
    let id = TenantId::new(tenant).unwrap();
    let err = moves::start(&mut control, &id, "b", &fast(), |_| {})
        .await
        .unwrap_err();
    match &err {
        MoveError::RowsInAnotherCase { table, rows, .. } => {
            assert_eq!((table.as_str(), *rows), ("public.projects", 1), "{err}");
        }
        other => panic!("expected RowsInAnotherCase, got {other}"),
    }
    assert!(
        moves::status(&control, &id).await.unwrap().is_none(),
        "nothing recorded"
    );
    assert_eq!(
        control.latest().await.unwrap().version,
        1,
        "nothing published"
    );
    assert_eq!(count(&shards.url(1), "projects", tenant).await, 0);

    source
        .batch_execute("UPDATE projects SET tenant_id = lower(tenant_id)")
        .await
        .unwrap();
    let status = moves::start(&mut control, &id, "b", &fast(), |_| {})
        .await
        .unwrap();
    assert_eq!(status.phase, "complete");
    assert_eq!(count(&shards.url(1), "projects", tenant).await, 11);
}

/// Installs, on the shard behind `url`, a deferred trigger that refuses a
/// project named `name` at COMMIT only: that side's COMMIT fails while the
/// other's succeeds, as when a connection is lost during COMMIT.
async fn refuse_at_commit_on(url: &str, name: &str) {
    connect(url)
        .await
        .batch_execute(&format!(
            "CREATE FUNCTION refuse_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.name = '{name}' THEN RAISE EXCEPTION 'refused at commit'; END IF; \
             RETURN NULL; END $$; \
             CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT OR UPDATE ON projects \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_at_commit(); \
             ALTER TABLE projects ENABLE ALWAYS TRIGGER refuse_at_commit;"
        ))
        .await
        .unwrap();
}

/// Issue 25.7: a write whose COMMIT lands on the source only, in a key range
/// verify has already checked. The ranges alone cannot see it; the write
/// chains can: verify refuses, and changes nothing. The next verify sees the
/// difference in the rows, and abort keeps the source's copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_sided_commit_in_a_range_verify_already_checked_is_caught() {
    let tenant = "hooli";
    let (mut w, router, _agent, id) = parked_after(tenant, 200, Step::Backfill).await;
    refuse_at_commit_on(&w.shards.url(1), "one-sided").await;
    let (go, went) = std::sync::mpsc::channel::<()>();
    let (done, finished) = std::sync::mpsc::channel::<shard_router::DbError>();
    let writer = tokio::spawn({
        let (router, id) = (router.clone(), id.clone());
        async move {
            tokio::task::spawn_blocking(move || went.recv().unwrap())
                .await
                .unwrap();
            // The lowest key of all: inside the first range, already checked.
            let db = router.resolve(id.clone());
            let mut writer = db.write().await.unwrap();
            writer
                .execute(
                    "INSERT INTO projects VALUES ($1, '00000000-0000-0000-0000-000000000001', 'one-sided')",
                    &[&id.as_str()],
                )
                .await
                .unwrap();
            done.send(writer.commit().await.unwrap_err()).unwrap();
        }
    });
    let mut options = until(Step::Verify);
    options.batch_rows = 10; // ranges of 40 rows: 5 of projects
    let mut ranges = 0;
    let err = moves::resume(&mut w.control, &id, &options, |p| {
        if let Progress::Verified { .. } = p {
            ranges += 1;
            if ranges == 1 {
                go.send(()).unwrap();
                let refused = tokio::task::block_in_place(|| finished.recv().unwrap());
                assert!(refused.to_string().contains("shard b"), "{refused}");
            }
        }
    })
    .await
    .unwrap_err();
    writer.await.unwrap();
    assert!(ranges > 5, "verify went on past the first range: {ranges}");
    assert!(
        matches!(err, MoveError::WriteOnOneShard { .. }),
        "expected WriteOnOneShard, got {err}"
    );
    assert_eq!(count_named(&w.shards.url(0), "one-sided").await, 1);
    assert_eq!(count_named(&w.shards.url(1), "one-sided").await, 0);
    let status = moves::status(&w.control, &id).await.unwrap().unwrap();
    assert_eq!(status.phase, "backfilled", "nothing moved on");
    assert_eq!(router.resolve(id.clone()).shard(), "a");

    // Verified again, the rows show the difference; abort keeps the source's.
    let err = moves::resume(&mut w.control, &id, &options, |_| {})
        .await
        .unwrap_err();
    match err {
        MoveError::VerifyFailed { mismatches, .. } => {
            assert_eq!(mismatches.len(), 1, "{mismatches:?}");
            assert_eq!(mismatches[0].table, "public.projects");
            assert_eq!(mismatches[0].source_rows, mismatches[0].target_rows + 1);
        }
        other => panic!("expected VerifyFailed, got {other}"),
    }
    moves::abort(&mut w.control, &id, &fast()).await.unwrap();
    assert_eq!(count(&w.shards.url(1), "projects", tenant).await, 0);
    assert_eq!(count_named(&w.shards.url(0), "one-sided").await, 1);
}

/// Issue 25.7, after cutover: a write in the `reversed` phase commits on the
/// target (the primary) only. Complete compares the write chains once no
/// moving write is left, records what it found, and keeps the former copy
/// for comparison instead of purging it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_finds_a_one_sided_commit_after_cutover_and_keeps_the_former_copy() {
    let tenant = "raviga";
    let (mut w, router, _agent, id) = parked_after(tenant, 5, Step::Cutover).await;
    refuse_at_commit_on(&w.shards.url(0), "one-sided").await;
    let err = insert_project_refused(&router, &id, "one-sided").await;
    assert!(err.to_string().contains("shard a"), "{err}");
    assert_eq!(count_named(&w.shards.url(1), "one-sided").await, 1);
    assert_eq!(count_named(&w.shards.url(0), "one-sided").await, 0);

    let mut options = fast();
    options.purge_source = true;
    moves::resume(&mut w.control, &id, &options, |_| {})
        .await
        .unwrap();
    let status = moves::status(&w.control, &id).await.unwrap().unwrap();
    assert_eq!(status.phase, "complete");
    let warning = status.state["one_sided_after_verify"].as_str().unwrap();
    assert!(warning.contains("former copy was kept"), "{warning}");
    assert_eq!(
        count(&w.shards.url(0), "projects", tenant).await,
        5,
        "the former copy is kept, not purged"
    );
    assert_eq!(router.resolve(id.clone()).shard(), "b");
}

/// Complete without a one-sided write purges as asked and records nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_with_equal_write_chains_purges_the_former_copy() {
    let tenant = "bachmanity";
    let (mut w, router, _agent, id) = parked_after(tenant, 5, Step::Cutover).await;
    insert_project(&router, &id, "both sides").await.unwrap();
    let mut options = fast();
    options.purge_source = true;
    moves::resume(&mut w.control, &id, &options, |_| {})
        .await
        .unwrap();
    let status = moves::status(&w.control, &id).await.unwrap().unwrap();
    assert_eq!(status.phase, "complete");
    assert!(status.state.get("one_sided_after_verify").is_none());
    assert_eq!(count(&w.shards.url(0), "projects", tenant).await, 0);
    assert_eq!(count(&w.shards.url(1), "projects", tenant).await, 6);
}

/// Issue 25.6: a REPEATABLE READ or SERIALIZABLE transaction that took its
/// snapshot before the fence was raised cannot see the fence row; its write
/// is refused as a serialization failure (retry it), and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_older_than_the_fence_cannot_write_past_it() {
    let tenant = "endframe";
    let mut w = world(tenant).await;
    seed(&w.shards.url(0), tenant, 3).await;
    let (_router, _agent) = ControlAgent::start(&w.control_db.url(0), agent_options("r1"))
        .await
        .unwrap();
    let id = TenantId::new(tenant).unwrap();
    let mut stale = Vec::new();
    for level in ["REPEATABLE READ", "SERIALIZABLE"] {
        let client = connect(&w.shards.url(0)).await;
        client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL {level}; SELECT count(*) FROM projects"
            ))
            .await
            .unwrap();
        stale.push((level, client));
    }
    moves::start(&mut w.control, &id, "b", &until(Step::Start), |_| {})
        .await
        .unwrap();
    for (level, client) in stale {
        let err = client
            .execute(
                "INSERT INTO projects VALUES ($1, $2, 'stale snapshot')",
                &[&tenant, &Uuid::new_v4()],
            )
            .await
            .unwrap_err();
        let db = err.as_db_error().expect("a database error");
        assert_eq!(db.code().code(), "40001", "{level}: {db}");
        assert!(db.message().contains("snapshot"), "{level}: {db}");
    }
    assert_eq!(count_named(&w.shards.url(0), "stale snapshot").await, 0);
    // A fresh snapshot sees the fence, and a write that declares no version
    // is refused by it as before.
    let client = connect(&w.shards.url(0)).await;
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    let err = client
        .execute(
            "INSERT INTO projects VALUES ($1, $2, 'no version')",
            &[&tenant, &Uuid::new_v4()],
        )
        .await
        .unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "SRF01", "{err}");
    moves::abort(&mut w.control, &id, &fast()).await.unwrap();
}

/// Issue 25.6: a tenant table created during a move by a tool other than
/// `shardctl migrate` gets the fence and capture triggers in its own DDL
/// transaction, so the move's writes reach both shards and the move finishes
/// with its rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_table_created_during_a_move_by_another_tool_is_covered() {
    let tenant = "aviato";
    let (mut w, router, _agent, id) = parked_after(tenant, 3, Step::Backfill).await;
    for shard in 0..2 {
        connect(&w.shards.url(shard))
            .await
            .batch_execute(
                "CREATE TABLE labels (tenant_id text NOT NULL, id uuid PRIMARY KEY, name text NOT NULL); \
                 CREATE SCHEMA app; SET search_path = app; \
                 CREATE TABLE tags (tenant_id text NOT NULL, id uuid PRIMARY KEY); \
                 RESET search_path;",
            )
            .await
            .unwrap();
    }
    let triggers: Vec<String> = connect(&w.shards.url(0))
        .await
        .query(
            "SELECT tgname::text FROM pg_trigger WHERE tgrelid = 'labels'::regclass ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        triggers,
        [
            "shard_router_fence",
            "shard_router_truncate",
            "zz_shard_router_capture"
        ]
    );
    // Created with a search_path that does not hold the move's functions.
    let covered: i64 = connect(&w.shards.url(0))
        .await
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'app.tags'::regclass AND tgname LIKE '%shard_router%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(covered, 3);
    // Its triggers find the move's objects whatever the writer's search_path.
    connect(&w.shards.url(0))
        .await
        .batch_execute(
            "SET search_path = app; INSERT INTO tags VALUES ('someone_else', gen_random_uuid())",
        )
        .await
        .unwrap();
    let db = router.resolve(id.clone());
    let mut writer = db.write().await.unwrap();
    writer
        .execute(
            "INSERT INTO labels VALUES ($1, $2, 'urgent')",
            &[&tenant, &Uuid::new_v4()],
        )
        .await
        .unwrap();
    writer.commit().await.unwrap();
    // A write outside TenantDb::write is refused by the new table's fence.
    let err = connect(&w.shards.url(0))
        .await
        .execute(
            "INSERT INTO labels VALUES ($1, $2, 'stray')",
            &[&tenant, &Uuid::new_v4()],
        )
        .await
        .unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "SRF01", "{err}");
    moves::resume(&mut w.control, &id, &fast(), |_| {})
        .await
        .unwrap();
    assert_eq!(count(&w.shards.url(1), "labels", tenant).await, 1);
    assert_eq!(router.resolve(id.clone()).shard(), "b");
}

/// A cutover that published `reversed` and then stopped in its wait for the
/// routers (one paused) is resumed: cutover's verify runs over the `reversed`
/// map it published (its writers dual-write too), and the move completes
/// with the writes made meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cutover_stopped_in_its_router_wait_resumes_to_complete() {
    let tenant = "yao_net";
    let (mut w, router, _agent, id) = parked(tenant, 20).await;
    let control_url = w.control_db.url(0);
    pause_a_router(&control_url, "paused").await;
    let mut options = until(Step::Cutover);
    options.wait = Duration::from_millis(500);
    let err = moves::resume(&mut w.control, &id, &options, |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, MoveError::RoutersBehind { .. }), "{err}");
    let status = moves::status(&w.control, &id).await.unwrap().unwrap();
    assert_eq!(status.phase, "verified", "reversed published, not recorded");
    insert_project(&router, &id, "meanwhile").await.unwrap();
    unpause_router(&control_url, "paused").await;
    let status = moves::resume(&mut w.control, &id, &fast(), |_| {})
        .await
        .unwrap();
    assert_eq!(status.phase, "complete");
    assert_eq!(count_named(&w.shards.url(1), "meanwhile").await, 1);
    assert_eq!(count(&w.shards.url(1), "projects", tenant).await, 21);
    assert_eq!(router.resolve(id.clone()).shard(), "b");
}

/// Issue 27.5: `TenantDb::transaction` runs its closure again after a
/// serialization failure (only once committed), returns other errors at
/// once, and after a fence refusal runs on the newer map once the router
/// applied it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closure_transaction_retries_conflicts_and_fence_refusals_only() {
    let tenant = "sliceline";
    let mut w = world(tenant).await;
    seed(&w.shards.url(0), tenant, 2).await;
    connect(&w.shards.url(0))
        .await
        .batch_execute(
            "CREATE FUNCTION conflict() RETURNS void LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION USING ERRCODE = '40001', MESSAGE = 'conflict'; END $$",
        )
        .await
        .unwrap();
    let stale = ShardRouter::new(
        MapLoader::without_env()
            .load_str(&map_toml(
                1,
                &w.shards,
                &format!("[tenants]\n{tenant} = \"a\"\n"),
            ))
            .unwrap(),
    )
    .unwrap();
    let id = TenantId::new(tenant).unwrap();
    type Work = Box<
        dyn for<'w> FnMut(
                &'w mut shard_router::TenantWriter,
            ) -> futures_util::future::BoxFuture<
                'w,
                Result<usize, shard_router::DbError>,
            > + Send,
    >;
    fn insert(name: &'static str, fail_first: bool, runs: Arc<AtomicUsize>) -> Work {
        Box::new(move |w| {
            let run = runs.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                w.execute(
                    "INSERT INTO projects VALUES ($1, $2, $3)",
                    &[&"sliceline", &Uuid::new_v4(), &name],
                )
                .await?;
                if fail_first && run == 0 {
                    w.execute("SELECT conflict()", &[]).await?;
                }
                Ok(run)
            })
        })
    }
    let db = stale.resolve(id.clone());
    let runs = Arc::new(AtomicUsize::new(0));
    let run = db
        .transaction(insert("retried", true, runs.clone()))
        .await
        .unwrap();
    assert_eq!((run, runs.load(Ordering::SeqCst)), (1, 2));
    assert_eq!(count_named(&w.shards.url(0), "retried").await, 1, "once");

    // An error the closure returns is not retried, and nothing is kept.
    let runs = Arc::new(AtomicUsize::new(0));
    let err = db
        .transaction({
            let runs = runs.clone();
            move |w| {
                runs.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move {
                    w.execute(
                        "INSERT INTO projects VALUES ($1, $2, 'refused')",
                        &[&"sliceline", &Uuid::nil()],
                    )
                    .await?;
                    w.execute(
                        "INSERT INTO projects VALUES ($1, $2, 'refused')",
                        &[&"sliceline", &Uuid::nil()],
                    )
                    .await?;
                    Ok(())
                })
            }
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), shard_router::DbErrorKind::UniqueViolation);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(count_named(&w.shards.url(0), "refused").await, 0);

    // The move fences version 1 out; the router applies the newer map while
    // the transaction waits, and its second run writes both shards.
    moves::start(&mut w.control, &id, "b", &until(Step::Backfill), |_| {})
        .await
        .unwrap();
    let newer = w.control.latest().await.unwrap().load().unwrap();
    let applier = tokio::spawn({
        let stale = stale.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            stale.apply(newer).unwrap();
        }
    });
    let runs = Arc::new(AtomicUsize::new(0));
    let run = stale
        .resolve(id.clone())
        .transaction(insert("after the fence", false, runs.clone()))
        .await
        .unwrap();
    applier.await.unwrap();
    assert_eq!(run, 1, "the first run was fenced");
    assert_eq!(count_named(&w.shards.url(0), "after the fence").await, 1);
    assert_eq!(count_named(&w.shards.url(1), "after the fence").await, 1);
    moves::abort(&mut w.control, &id, &fast()).await.unwrap();
}

/// Issue 27.5: rows into tuples and structs (`FromRow`, `query_as`), on a
/// read client and in a writer; a column of another type names the error.
#[tokio::test]
async fn query_as_builds_tuples_and_structs_from_rows() {
    struct Project {
        id: Uuid,
        name: String,
    }
    impl shard_router::FromRow for Project {
        fn from_row(row: &tokio_postgres::Row) -> Result<Self, tokio_postgres::Error> {
            Ok(Project {
                id: row.try_get("id")?,
                name: row.try_get("name")?,
            })
        }
    }
    let tenant = "gavin";
    let w = world(tenant).await;
    let ids = seed(&w.shards.url(0), tenant, 3).await;
    let router = ShardRouter::new(
        MapLoader::without_env()
            .load_str(&map_toml(
                1,
                &w.shards,
                &format!("[tenants]\n{tenant} = \"a\"\n"),
            ))
            .unwrap(),
    )
    .unwrap();
    let db = router.resolve(TenantId::new(tenant).unwrap());
    let client = db.read().await.unwrap();
    let projects: Vec<Project> = client
        .query_as(
            "SELECT id, name FROM projects WHERE tenant_id = $1 ORDER BY id",
            &[&tenant],
        )
        .await
        .unwrap();
    assert_eq!(projects.iter().map(|p| p.id).collect::<BTreeSet<_>>(), ids);
    assert!(projects.iter().all(|p| !p.name.is_empty()));
    let (count,): (i64,) = client
        .query_one_as(
            "SELECT count(*) FROM projects WHERE tenant_id = $1",
            &[&tenant],
        )
        .await
        .unwrap();
    assert_eq!(count, 3);
    let none: Option<(String,)> = client
        .query_opt_as(
            "SELECT name FROM projects WHERE tenant_id = $1 AND id = $2",
            &[&tenant, &Uuid::nil()],
        )
        .await
        .unwrap();
    assert!(none.is_none());
    let err = client
        .query_one_as::<(String,)>(
            "SELECT count(*) FROM projects WHERE tenant_id = $1",
            &[&tenant],
        )
        .await
        .map(|_| ())
        .expect_err("bigint is not text");
    assert!(err.to_string().contains("shard a"), "{err}");
    drop(client);
    let mut writer = db.write().await.unwrap();
    let (id, name): (Uuid, String) = writer
        .query_one_as(
            "INSERT INTO projects VALUES ($1, $2, 'mapped') RETURNING id, name",
            &[&tenant, &Uuid::nil()],
        )
        .await
        .unwrap();
    writer.commit().await.unwrap();
    assert_eq!((id, name.as_str()), (Uuid::nil(), "mapped"));
}
