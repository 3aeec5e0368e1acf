//! Tenant moves on a schema shaped like a real SaaS app's, with writers in
//! every phase, and a mover killed with SIGKILL at random moments.
//!
//! The schema has what users have: foreign keys with ON DELETE CASCADE,
//! `DEFAULT now()`, an `updated_at` trigger on `clock_timestamp()`, ids from
//! `gen_random_uuid()` and from an identity column, a composite key, and a
//! table added by a later migration. Writers let the database make every id and
//! timestamp, and log only what they were told succeeded.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{connect, map_toml, Shards};
use shard_router::control::{ControlAgent, ControlOptions, ControlPlane, PublishOptions};
use shard_router::moves::{self, MoveError, MoveOptions, Step};
use shard_router::{ShardRouter, TenantId};
use uuid::Uuid;

const SCHEMA: &str = "
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.updated_at := clock_timestamp(); RETURN NEW; END $$;
CREATE TABLE projects (
  tenant_id text NOT NULL,
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  name text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TRIGGER projects_touch BEFORE UPDATE ON projects FOR EACH ROW EXECUTE FUNCTION touch();
CREATE TABLE tasks (
  tenant_id text NOT NULL,
  id bigint GENERATED ALWAYS AS IDENTITY,
  project_id uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
  title text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (tenant_id, id));
CREATE TABLE memberships (
  tenant_id text NOT NULL,
  project_id uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
  user_name text NOT NULL,
  role text NOT NULL DEFAULT 'member',
  joined_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (tenant_id, project_id, user_name));
";

/// A later migration: a table added after the app went live.
const LATER: &str = "
CREATE TABLE labels (
  tenant_id text NOT NULL,
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  project_id uuid REFERENCES projects (id) ON DELETE CASCADE,
  name text NOT NULL,
  added_at timestamptz DEFAULT now());
";

fn agent_options(id: &str) -> ControlOptions {
    let mut o = ControlOptions::default();
    o.instance_id = id.to_owned();
    o.heartbeat = Duration::from_millis(100);
    o.lease = Duration::from_millis(1500);
    o.poll = Duration::from_millis(500);
    o
}

struct World {
    control_db: Shards,
    shards: Shards,
    control: ControlPlane,
}

async fn world(tenants: &[&str]) -> World {
    let control_db = Shards::create(1).await;
    let shards = Shards::create(2).await;
    shards.run_everywhere(SCHEMA).await;
    shards.run_everywhere(LATER).await;
    let mut control = ControlPlane::connect(&control_db.url(0)).await.unwrap();
    control.init().await.unwrap();
    let pins: String = tenants.iter().map(|t| format!("{t} = \"a\"\n")).collect();
    control
        .publish(
            &map_toml(1, &shards, &format!("[tenants]\n{pins}")),
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

/// Seeds `n` projects, each with two tasks and a member, through SQL on `url`.
async fn seed(url: &str, tenant: &str, n: usize) -> Vec<Uuid> {
    let client = connect(url).await;
    let rows = client
        .query(
            "INSERT INTO projects (tenant_id, name) SELECT $1, 'p' || g FROM generate_series(1, $2) g RETURNING id",
            &[&tenant, &(n as i32)],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO tasks (tenant_id, project_id, title) \
             SELECT tenant_id, id, 't' || g FROM projects, generate_series(1, 2) g WHERE tenant_id = $1",
            &[&tenant],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO memberships (tenant_id, project_id, user_name) \
             SELECT tenant_id, id, 'owner' FROM projects WHERE tenant_id = $1",
            &[&tenant],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

/// What the writers were told succeeded.
#[derive(Default, Clone, Debug)]
struct Acked {
    /// project id -> latest name, None once deleted.
    projects: BTreeMap<Uuid, Option<String>>,
    /// task id -> its project.
    tasks: BTreeMap<i64, Uuid>,
    /// label id -> its project.
    labels: BTreeMap<Uuid, Uuid>,
}

#[derive(Clone)]
struct Writers {
    acked: Arc<Mutex<Acked>>,
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicUsize>,
    errors: Arc<Mutex<Vec<String>>>,
    done: Arc<AtomicUsize>,
}

impl Writers {
    fn start(
        router: &ShardRouter,
        tenant: &str,
        seeded: &[Uuid],
        n: usize,
    ) -> (Writers, Vec<tokio::task::JoinHandle<()>>) {
        let writers = Writers {
            acked: Arc::default(),
            stop: Arc::default(),
            failed: Arc::default(),
            errors: Arc::default(),
            done: Arc::default(),
        };
        {
            let mut acked = writers.acked.lock().unwrap();
            for id in seeded {
                acked.projects.insert(*id, Some(String::new()));
            }
        }
        let tasks = writers.spawn(router, tenant, seeded, n);
        (writers, tasks)
    }

    /// Starts `n` writer tasks sharing this log.
    fn spawn(
        &self,
        router: &ShardRouter,
        tenant: &str,
        seeded: &[Uuid],
        n: usize,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        self.stop.store(false, Ordering::Relaxed);
        (0..n)
            .map(|k| {
                let (router, tenant, w, seeded) = (
                    router.clone(),
                    TenantId::new(tenant).unwrap(),
                    self.clone(),
                    seeded.to_vec(),
                );
                tokio::spawn(async move { w.run(router, tenant, seeded, k).await })
            })
            .collect()
    }

    /// Stops the writer tasks and waits for them.
    async fn halt(&self, tasks: Vec<tokio::task::JoinHandle<()>>) -> Acked {
        self.stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        self.acked.lock().unwrap().clone()
    }

    async fn run(self, router: ShardRouter, tenant: TenantId, seeded: Vec<Uuid>, k: usize) {
        let t = tenant.as_str();
        let mut mine: Vec<Uuid> = Vec::new();
        let mut n = k as u64 * 7;
        while !self.stop.load(Ordering::Relaxed) {
            n += 1;
            let db = router.resolve(tenant.clone());
            let op = n % 6;
            let result: Result<(), shard_router::DbError> = async {
                let mut w = db.write().await?;
                match op {
                    // A new project (id and timestamps from the database), with a task and a member.
                    0 | 1 => {
                        let name = format!("new-{k}-{n}");
                        let pid: Uuid = w
                            .query("INSERT INTO projects (tenant_id, name) VALUES ($1, $2) RETURNING id", &[&t, &name])
                            .await?[0]
                            .get(0);
                        let tid: i64 = w
                            .query("INSERT INTO tasks (tenant_id, project_id, title) VALUES ($1, $2, 'w') RETURNING id", &[&t, &pid])
                            .await?[0]
                            .get(0);
                        w.execute("INSERT INTO memberships (tenant_id, project_id, user_name) VALUES ($1, $2, 'w')", &[&t, &pid])
                            .await?;
                        w.commit().await?;
                        let mut acked = self.acked.lock().unwrap();
                        acked.projects.insert(pid, Some(name));
                        acked.tasks.insert(tid, pid);
                        mine.push(pid);
                    }
                    // A task under a seeded project: its parent may not be copied yet.
                    2 => {
                        let pid = seeded[(n as usize * 31) % seeded.len()];
                        if self.acked.lock().unwrap().projects.get(&pid) == Some(&None) {
                            return w.rollback().await;
                        }
                        let tid: i64 = w
                            .query("INSERT INTO tasks (tenant_id, project_id, title) VALUES ($1, $2, 'child') RETURNING id", &[&t, &pid])
                            .await?[0]
                            .get(0);
                        let lid: Uuid = w
                            .query("INSERT INTO labels (tenant_id, project_id, name) VALUES ($1, $2, 'l') RETURNING id", &[&t, &pid])
                            .await?[0]
                            .get(0);
                        w.commit().await?;
                        let mut acked = self.acked.lock().unwrap();
                        acked.tasks.insert(tid, pid);
                        acked.labels.insert(lid, pid);
                    }
                    // Rename (the trigger sets updated_at).
                    3 | 4 => {
                        let pid = if op == 3 && !mine.is_empty() {
                            mine[n as usize % mine.len()]
                        } else {
                            seeded[(n as usize * 17) % seeded.len()]
                        };
                        let name = format!("renamed-{k}-{n}");
                        let changed = w
                            .execute("UPDATE projects SET name = $3 WHERE tenant_id = $1 AND id = $2", &[&t, &pid, &name])
                            .await?;
                        w.commit().await?;
                        if changed == 1 {
                            self.acked.lock().unwrap().projects.insert(pid, Some(name));
                        }
                    }
                    // Delete one of mine: tasks, members and labels go with it.
                    _ => {
                        if mine.len() < 3 {
                            return w.rollback().await;
                        }
                        let pid = mine.remove(0);
                        w.execute("DELETE FROM projects WHERE tenant_id = $1 AND id = $2", &[&t, &pid])
                            .await?;
                        w.commit().await?;
                        self.acked.lock().unwrap().projects.insert(pid, None);
                    }
                }
                Ok(())
            }
            .await;
            match result {
                Ok(()) => {
                    self.done.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                    self.errors.lock().unwrap().push(e.to_string());
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Asserts the shard at `url` holds exactly the acknowledged state of `tenant`.
async fn assert_holds(url: &str, tenant: &str, acked: &Acked) {
    let client = connect(url).await;
    let projects: BTreeMap<Uuid, String> = client
        .query(
            "SELECT id, name FROM projects WHERE tenant_id = $1",
            &[&tenant],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let live: BTreeMap<&Uuid, &String> = acked
        .projects
        .iter()
        .filter_map(|(id, name)| name.as_ref().map(|n| (id, n)))
        .collect();
    assert_eq!(
        projects.keys().collect::<BTreeSet<_>>(),
        live.keys().copied().collect::<BTreeSet<_>>(),
        "projects: nothing acknowledged lost, nothing deleted back"
    );
    for (id, name) in live {
        if !name.is_empty() {
            assert_eq!(&projects[id], name, "latest acknowledged name of {id}");
        }
    }
    let tasks: BTreeSet<i64> = client
        .query("SELECT id FROM tasks WHERE tenant_id = $1", &[&tenant])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (task, project) in &acked.tasks {
        let alive = matches!(acked.projects.get(project), Some(Some(_)));
        assert_eq!(
            tasks.contains(task),
            alive,
            "task {task} of project {project}"
        );
    }
    let labels: BTreeSet<Uuid> = client
        .query("SELECT id FROM labels WHERE tenant_id = $1", &[&tenant])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (label, project) in &acked.labels {
        let alive = matches!(acked.projects.get(project), Some(Some(_)));
        assert_eq!(labels.contains(label), alive, "label {label}");
    }
    // No orphan survived a cascade.
    let orphans: i64 = client
        .query_one(
            "SELECT count(*) FROM tasks t WHERE tenant_id = $1 AND NOT EXISTS \
             (SELECT 1 FROM projects p WHERE p.id = t.project_id)",
            &[&tenant],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(orphans, 0, "orphaned tasks");
}

/// Every row of `tenant` in every table, as text, from `url`.
async fn rows_of(url: &str, tenant: &str) -> BTreeMap<String, Vec<String>> {
    let client = connect(url).await;
    let mut all = BTreeMap::new();
    for (table, key) in [
        ("projects", "id"),
        ("tasks", "id"),
        ("memberships", "project_id, user_name"),
        ("labels", "id"),
    ] {
        let rows = client
            .query(
                &format!(
                    "SELECT to_jsonb(t)::text FROM {table} t WHERE tenant_id = $1 ORDER BY {key}"
                ),
                &[&tenant],
            )
            .await
            .unwrap();
        all.insert(table.to_owned(), rows.iter().map(|r| r.get(0)).collect());
    }
    all
}

fn options() -> MoveOptions {
    let mut o = MoveOptions::default();
    o.wait = Duration::from_secs(10);
    o.batch_rows = 100;
    o.lease = Duration::from_millis(1500);
    o.purge_grace = Duration::from_secs(5);
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_schema_moves_under_writers_in_every_phase_with_nothing_failed_or_lost() {
    let tenant = "acme";
    let mut w = world(&[tenant, "bystander"]).await;
    let seeded = seed(&w.shards.url(0), tenant, 300).await;
    let (router, _agent) = ControlAgent::start(&w.control_db.url(0), agent_options("r1"))
        .await
        .unwrap();
    let id = TenantId::new(tenant).unwrap();
    let (writers, tasks) = Writers::start(&router, tenant, &seeded, 4);

    // Step by step, with writes between every two steps.
    let mut phases = Vec::new();
    for until in [
        Step::Start,
        Step::Backfill,
        Step::Verify,
        Step::Cutover,
        Step::Complete,
    ] {
        let before = writers.done.load(Ordering::Relaxed);
        let mut o = options();
        o.until = until;
        o.purge_source = until == Step::Complete;
        let status = if until == Step::Start {
            moves::start(&mut w.control, &id, "b", &o, |_| {}).await
        } else {
            moves::resume(&mut w.control, &id, &o, |_| {}).await
        }
        .unwrap_or_else(|e| panic!("{until:?}: {e}"));
        // Let writers run in this phase.
        common::eventually(Duration::from_secs(10), || {
            writers.done.load(Ordering::Relaxed) >= before + 40
        })
        .await;
        phases.push((
            status.phase.clone(),
            writers.done.load(Ordering::Relaxed) - before,
        ));
    }
    writers.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let acked = writers.acked.lock().unwrap().clone();
    let failed = writers.failed.load(Ordering::Relaxed);
    println!(
        "writes acknowledged per phase: {phases:?}; failed: {failed}; first errors: {:?}",
        writers
            .errors
            .lock()
            .unwrap()
            .iter()
            .take(3)
            .collect::<Vec<_>>()
    );
    assert_eq!(failed, 0, "no write failed because of the move");
    assert!(
        phases.iter().all(|(_, n)| *n >= 40),
        "writes in every phase: {phases:?}"
    );
    assert_eq!(router.resolve(id.clone()).shard(), "b");
    assert_holds(&w.shards.url(1), tenant, &acked).await;
    let source = rows_of(&w.shards.url(0), tenant).await;
    assert!(source.values().all(|rows| rows.is_empty()), "source purged");
    // The bystander on the source never had a fence row or a capture.
    let fence: i64 = connect(&w.shards.url(1))
        .await
        .query_one(
            "SELECT count(*) FROM shard_router_fence WHERE tenant = $1",
            &[&tenant],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        fence, 0,
        "the fence row left the shard that owns the tenant"
    );
}

/// Kills `shardctl tenant move` with SIGKILL at 20 random moments spread over
/// the phases, each followed by `--resume` or `--abort` (alternately), while
/// writers run; after each, the shard that owns the tenant holds exactly the
/// acknowledged state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_mover_at_20_moments_loses_nothing() {
    let tenant = "initech";
    let mut w = world(&[tenant]).await;
    let seeded = seed(&w.shards.url(0), tenant, 1500).await;
    let (router, _agent) = ControlAgent::start(&w.control_db.url(0), agent_options("r1"))
        .await
        .unwrap();
    let id = TenantId::new(tenant).unwrap();
    let (writers, mut tasks) = Writers::start(&router, tenant, &seeded, 2);
    let control_url = w.control_db.url(0);
    let common_args = ["--wait", "10", "--lease", "1", "--purge-grace", "5"];
    let mut seed_state = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = move |below: u64| {
        seed_state ^= seed_state << 13;
        seed_state ^= seed_state >> 7;
        seed_state ^= seed_state << 17;
        seed_state % below
    };
    // One uninterrupted move first: how long a move takes here, start to purge.
    let started = std::time::Instant::now();
    let mut args = vec!["tenant", "move", tenant, "--to", "b", "--purge-source"];
    args.extend_from_slice(&common_args);
    let out = common::shardctl(&control_url, &args).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let full = started.elapsed().as_millis() as u64;
    let mut killed_in: BTreeMap<String, usize> = BTreeMap::new();
    let mut outcomes = Vec::new();
    for round in 0..20 {
        let owner = router.resolve(id.clone()).shard().to_owned();
        let to = if owner == "a" { "b" } else { "a" };
        let mut args = vec!["tenant", "move", tenant, "--to", to, "--purge-source"];
        args.extend_from_slice(&common_args);
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_shardctl"))
            .args(&args)
            .env("SHARD_ROUTER_CONTROL", &control_url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Uniform over the whole move, process start-up included.
        tokio::time::sleep(Duration::from_millis(random(full))).await;
        let _ = child.start_kill(); // SIGKILL
        let _ = child.wait().await;
        let status = moves::status(&w.control, &id).await.unwrap().unwrap();
        let at = format!(
            "{}{}",
            status.phase,
            status.intent.map(|i| format!("->{i}")).unwrap_or_default()
        );
        *killed_in.entry(at.clone()).or_default() += 1;
        // Then an operator resumes or aborts, retrying while the dead mover's lease runs.
        let finished = loop {
            let result = if status.phase == "complete" || status.phase == "aborted" {
                break status.phase.clone();
            } else if round % 2 == 0 {
                moves::resume(&mut w.control, &id, &options_purging(), |_| {}).await
            } else {
                match moves::abort(&mut w.control, &id, &options()).await {
                    Err(MoveError::Finished { .. }) => {
                        moves::resume(&mut w.control, &id, &options_purging(), |_| {}).await
                    }
                    other => other,
                }
            };
            match result {
                Ok(s) => break s.phase,
                Err(MoveError::LeaseHeld { .. }) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                // The killed mover's last statement was already on the wire:
                // the server committed it after the status above was read.
                Err(MoveError::NoMove { .. }) => {
                    let now = moves::status(&w.control, &id).await.unwrap().unwrap();
                    assert!(
                        now.phase == "complete" || now.phase == "aborted",
                        "round {round}, killed at {at}: no unfinished move, yet phase {}",
                        now.phase
                    );
                    break now.phase;
                }
                Err(e) => panic!("round {round}, killed at {at}: {e}"),
            }
        };
        outcomes.push(format!("{at}=>{finished}"));
        // The owner holds exactly what was acknowledged so far; the other shard none of it.
        let acked = writers.halt(std::mem::take(&mut tasks)).await;
        let owner = router.resolve(id.clone()).shard().to_owned();
        let (mine, other) = if owner == "a" { (0, 1) } else { (1, 0) };
        assert_holds(&w.shards.url(mine), tenant, &acked).await;
        let leftovers = rows_of(&w.shards.url(other), tenant).await;
        assert!(
            leftovers.values().all(|r| r.is_empty()),
            "round {round} ({at}): the other shard holds none of the tenant's rows"
        );
        tasks = writers.spawn(&router, tenant, &seeded, 2);
    }
    writers.halt(tasks).await;
    println!(
        "a whole move took {full} ms\nkilled in: {killed_in:?}\noutcomes: {outcomes:?}\nwrites acknowledged: {}, failed: {}",
        writers.done.load(Ordering::Relaxed),
        writers.failed.load(Ordering::Relaxed)
    );
    assert!(
        killed_in.len() >= 4,
        "kills spread over the phases: {killed_in:?}"
    );
}

fn options_purging() -> MoveOptions {
    let mut o = options();
    o.purge_source = true;
    o
}
