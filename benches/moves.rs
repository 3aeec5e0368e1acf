//! Move figures against the local Postgres (`cargo bench --bench moves`):
//!
//! 1. the fence trigger's cost per written row (server-side inserts, so the
//!    network does not hide it), against the same table without the trigger;
//! 2. backfill throughput against raw `COPY` of the same rows, in the same run,
//!    and a bystander tenant's write latency during that backfill against the
//!    same writes with no move;
//! 3. a single-statement write through `TenantDb::write` for a moving tenant
//!    (row images applied on the other shard) against a tenant that is not
//!    moving, p50 and p99.
//!
//! It creates its own databases (`srm_<pid>_...`) and drops them. With
//! `TARGET_CLUSTER=1` shard b lives in a Postgres cluster of its own made for
//! the run (`srm_<pid>`, dropped after), as a target on another server would:
//! its WAL and its flushes are not the source's. `SPLIT_CPUS=1` (with
//! `TARGET_CLUSTER=1`) also gives the source its own core, as the source's
//! server would have: the main cluster's new backends and the bystander's
//! thread run on CPU 0; the target cluster, the control database (moved to the
//! target's cluster) and the mover's thread on CPU 1 (`taskset`; the main
//! cluster's affinity is restored after).

use std::time::{Duration, Instant};

use futures_util::{pin_mut, SinkExt, StreamExt};
use shard_router::control::{ControlPlane, PublishOptions};
use shard_router::moves::{self, MoveOptions, Step};
use shard_router::{ShardRouter, TenantId};
use tokio_postgres::{Client, NoTls};

const SERVER: &str = "postgres://postgres@127.0.0.1:5432";
/// Rows of the big tenant (`BENCH_ROWS`, default 100,000).
static ROWS_CELL: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
fn rows() -> i64 {
    *ROWS_CELL.get_or_init(|| {
        std::env::var("BENCH_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000)
    })
}

/// Rows for the fence figures and the throttle rounds: `BENCH_ROWS`, at most
/// 100,000 (a large `BENCH_ROWS` is for the backfill figures).
fn fence_rows() -> i64 {
    rows().min(100_000)
}

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("Postgres at 127.0.0.1:5432");
    tokio::spawn(connection);
    client
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cluster = std::env::var("TARGET_CLUSTER")
        .is_ok_and(|v| v == "1")
        .then(|| TargetCluster::create(&format!("srm_{}", std::process::id())));
    let target_server = cluster.as_ref().map_or(SERVER.to_owned(), |c| c.server());
    let split = cluster.is_some() && std::env::var("SPLIT_CPUS").is_ok_and(|v| v == "1");
    if let (true, Some(cluster)) = (split, &cluster) {
        pin_current_thread("0");
        taskset(&postmaster_pid("main"), "0");
        taskset(&postmaster_pid(&cluster.name), "1");
    }
    let urls: Vec<String> = (0..3)
        .map(|i| {
            let server = if i == 2 || (i == 0 && split) {
                &target_server
            } else {
                SERVER
            };
            format!("{server}/srm_{}_{i}", std::process::id())
        })
        .collect();
    for url in &urls {
        let (server, name) = url.rsplit_once('/').unwrap();
        connect(&format!("{server}/postgres"))
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
    }
    let result = tokio::spawn(run(urls.clone())).await;
    for url in &urls {
        let (server, name) = url.rsplit_once('/').unwrap();
        let _ = connect(&format!("{server}/postgres"))
            .await
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
    }
    drop(cluster);
    if split {
        taskset(&postmaster_pid("main"), "0-1");
    }
    result.unwrap();
}

/// `SPLIT_CPUS=1`: pins the calling thread to `cpus` (a `taskset -c` list).
fn pin_current_thread(cpus: &str) {
    let link = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
    let tid = link.file_name().unwrap().to_string_lossy().into_owned();
    taskset(&tid, cpus);
}

/// Sets the CPU affinity of every thread of `pid`; processes it forks later inherit it.
fn taskset(pid: &str, cpus: &str) {
    let status = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, pid])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("taskset");
    assert!(status.success(), "taskset -a -p -c {cpus} {pid}");
}

/// The postmaster of PostgreSQL 15 cluster `cluster` on this host.
fn postmaster_pid(cluster: &str) -> String {
    std::fs::read_to_string(format!("/var/lib/postgresql/15/{cluster}/postmaster.pid"))
        .expect("postmaster.pid")
        .lines()
        .next()
        .unwrap()
        .trim()
        .to_owned()
}

/// A Postgres cluster of this machine's version made for the run (trust
/// authentication on loopback), dropped with the value.
struct TargetCluster {
    name: String,
    port: u16,
}

impl TargetCluster {
    fn create(name: &str) -> TargetCluster {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let run = |program: &str, args: &[&str]| {
            let status = std::process::Command::new(program)
                .args(args)
                .stdout(std::process::Stdio::null())
                .status()
                .expect(program);
            assert!(status.success(), "{program} {args:?}");
        };
        run("pg_createcluster", &["15", name, "-p", &port.to_string()]);
        std::fs::write(
            format!("/etc/postgresql/15/{name}/pg_hba.conf"),
            "local all all trust\nhost all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        run(
            "pg_ctlcluster",
            &["--skip-systemctl-redirect", "15", name, "start"],
        );
        TargetCluster {
            name: name.to_owned(),
            port,
        }
    }

    fn server(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }
}

impl Drop for TargetCluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("pg_dropcluster")
            .args(["--stop", "15", &self.name])
            .status();
    }
}

/// What `TenantDb::write` sends to declare map version 10 for its transaction.
const DECLARE_10: &str = "BEGIN; SELECT set_config('shard_router.map_version', \
     '10@' || extract(epoch FROM now())::text, true)";

fn percentile(mut samples: Vec<Duration>, p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)]
}

/// `n` single-row inserts of `tenant` through the handle, one transaction each.
async fn handle_writes(router: &ShardRouter, tenant: &str, n: usize) -> Vec<Duration> {
    let tenant = TenantId::new(tenant).unwrap();
    let mut samples = Vec::with_capacity(n);
    let pace = pace();
    for i in 0..n {
        if let Some(pause) = pace {
            tokio::time::sleep(pause).await;
        }
        let started = Instant::now();
        let db = router.resolve(tenant.clone());
        let mut w = db.write().await.unwrap();
        w.execute(
            "INSERT INTO items (tenant_id, id, n, body) VALUES ($1, gen_random_uuid(), $2, 'x')",
            &[&tenant.as_str(), &(i as i64)],
        )
        .await
        .unwrap();
        w.commit().await.unwrap();
        samples.push(started.elapsed());
    }
    samples
}

const SCHEMA: &str = "CREATE TABLE items (tenant_id text NOT NULL, id uuid PRIMARY KEY, \
                      n bigint NOT NULL, body text NOT NULL, at timestamptz NOT NULL DEFAULT now())";

/// The backfill throttles (rows/s) of the bystander rounds: `THROTTLES`, a
/// comma-separated list where `none` means no throttle (default
/// `none,20000,5000`; empty skips the rounds).
fn throttles() -> Vec<Option<u64>> {
    std::env::var("THROTTLES")
        .unwrap_or_else(|_| "none,20000,5000".to_owned())
        .split(',')
        .filter(|t| !t.trim().is_empty())
        .map(|t| match t.trim() {
            "none" => None,
            rate => Some(rate.parse().expect("THROTTLES: rows/s or none")),
        })
        .collect()
}

/// `PACE_US`: the bystander (and each measured writer) pauses this long before
/// each write, so it leaves the CPU idle between writes as a service below
/// saturation does (default 0: back to back, which keeps a core busy and
/// turns any other work on the machine into queueing).
fn pace() -> Option<Duration> {
    std::env::var("PACE_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|us| *us > 0)
        .map(Duration::from_micros)
}

/// Rows per backfill batch: `BATCH_ROWS`, default the move's default.
fn batch_rows() -> usize {
    std::env::var("BATCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MoveOptions::default().batch_rows)
}

/// Moves `tenant` to shard b up to the end of backfill on a thread of its own
/// (as `shardctl` would, in a process of its own); the thread returns how long
/// that took.
fn move_on_own_thread(
    control_url: String,
    tenant: &str,
    max_rows_per_sec: Option<u64>,
) -> std::thread::JoinHandle<Duration> {
    let tenant = TenantId::new(tenant).unwrap();
    std::thread::spawn(move || {
        if std::env::var("SPLIT_CPUS").is_ok_and(|v| v == "1")
            && std::env::var("TARGET_CLUSTER").is_ok_and(|v| v == "1")
        {
            pin_current_thread("1");
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let mut control = ControlPlane::connect(&control_url).await.unwrap();
            let mut options = MoveOptions::default();
            options.until = Step::Backfill;
            options.max_rows_per_sec = max_rows_per_sec;
            options.batch_rows = batch_rows();
            let started = Instant::now();
            moves::start(&mut control, &tenant, "b", &options, |_| {})
                .await
                .unwrap();
            started.elapsed()
        })
    })
}

/// A bystander's single-row writes on the source until `mover` finishes.
async fn writes_until_done(
    router: &ShardRouter,
    mover: &std::thread::JoinHandle<Duration>,
) -> Vec<Duration> {
    let mut samples = Vec::new();
    while !mover.is_finished() {
        samples.extend(handle_writes(router, "bystander", 20).await);
    }
    samples
}

async fn run(names: Vec<String>) {
    let (control_db, a, b) = (&names[0], &names[1], &names[2]);
    let source = connect(a).await;
    let target = connect(b).await;
    let control_url = control_db.clone();
    for client in [&source, &target] {
        client.batch_execute(SCHEMA).await.unwrap();
    }
    let sizes = whole_move_sizes();
    if !sizes.is_empty() {
        whole_moves(&control_url, a, b, &source, &sizes).await;
        return;
    }

    // 1. The fence's cost per row.
    let insert = format!(
        "INSERT INTO items (tenant_id, id, n, body) \
         SELECT $1, gen_random_uuid(), g, 'row ' || g FROM generate_series(1, {}) g",
        fence_rows()
    );
    let timed = |tenant: &'static str| {
        let (insert, source) = (insert.clone(), &source);
        async move {
            let mut samples = Vec::new();
            for _ in 0..5 {
                source.batch_execute(DECLARE_10).await.unwrap();
                let started = Instant::now();
                source.execute(&insert, &[&tenant]).await.unwrap();
                samples.push(started.elapsed());
                source.batch_execute("ROLLBACK").await.unwrap();
            }
            median(samples)
        }
    };
    let bare = timed("bare").await;
    // Install the fence exactly as a move does, by starting (and aborting) one.
    let mut control = ControlPlane::connect(&control_url).await.unwrap();
    control.init().await.unwrap();
    let map = format!(
        "version = 1\n[shards.a]\nurl = \"{a}\"\n[shards.b]\nurl = \"{b}\"\n[tenants]\nbig = \"a\"\nprobe = \"a\"\n"
    );
    control
        .publish(&map, &PublishOptions::default())
        .await
        .unwrap();
    let probe = TenantId::new("probe").unwrap();
    let mut only_start = MoveOptions::default();
    only_start.until = Step::Start;
    moves::start(&mut control, &probe, "b", &only_start, |_| {})
        .await
        .unwrap();
    let unfenced = timed("bystander").await; // trigger runs, tenant has no fence row
    let fenced = timed("probe").await; // trigger runs, tenant fenced, version allowed
    let per_row =
        |d: Duration| (d.as_nanos() as f64 - bare.as_nanos() as f64) / fence_rows() as f64;
    println!("fence: {} server-side inserts, median of 5", fence_rows());
    println!("  without trigger:              {bare:?}");
    println!(
        "  trigger, tenant not fenced:   {unfenced:?} (+{:.0} ns per row)",
        per_row(unfenced)
    );
    println!(
        "  trigger, tenant fenced:       {fenced:?} (+{:.0} ns per row)",
        per_row(fenced)
    );

    // Per statement: single-row inserts, as an application writes.
    let single = |tenant: &'static str| {
        let source = &source;
        async move {
            let mut samples = Vec::new();
            for _ in 0..5 {
                source.batch_execute(DECLARE_10).await.unwrap();
                let statement = source
                    .prepare("INSERT INTO items (tenant_id, id, n, body) VALUES ($1, gen_random_uuid(), 1, 'x')")
                    .await
                    .unwrap();
                let started = Instant::now();
                for _ in 0..2_000 {
                    source.execute(&statement, &[&tenant]).await.unwrap();
                }
                samples.push(started.elapsed() / 2_000);
                source.batch_execute("ROLLBACK").await.unwrap();
            }
            median(samples)
        }
    };
    let (single_fenced, single_bystander) = (single("probe").await, single("bystander").await);
    source
        .batch_execute("DROP TRIGGER shard_router_fence ON items")
        .await
        .unwrap();
    let single_bare = single("probe").await;
    println!("  single-row INSERT statements (2,000 per run, over loopback):");
    println!("    without trigger {single_bare:?}; trigger, not fenced {single_bystander:?}; trigger, fenced {single_fenced:?} per statement");
    source.batch_execute("VACUUM items").await.unwrap();

    // 2. Backfill against raw COPY, same rows.
    source
        .batch_execute(&format!(
            "BEGIN; SELECT set_config('shard_router.map_version', '100@' || extract(epoch FROM now())::text, true);
             INSERT INTO items (tenant_id, id, n, body) SELECT 'big', gen_random_uuid(), g, repeat('x', 64) FROM generate_series(1, {}) g;
             COMMIT",
            rows()
        ))
        .await
        .unwrap();
    let started = Instant::now();
    let mut copied_bytes = 0usize;
    {
        let out = source
            .copy_out(
                "COPY (SELECT * FROM items WHERE tenant_id = 'big') TO STDOUT (FORMAT binary)",
            )
            .await
            .unwrap();
        let sink = target
            .copy_in("COPY items FROM STDIN (FORMAT binary)")
            .await
            .unwrap();
        pin_mut!(out);
        pin_mut!(sink);
        while let Some(chunk) = out.next().await {
            let chunk = chunk.unwrap();
            copied_bytes += chunk.len();
            sink.send(chunk).await.unwrap();
        }
        sink.close().await.unwrap();
    }
    let copy = started.elapsed();
    target
        .batch_execute("DELETE FROM items WHERE tenant_id = 'big'")
        .await
        .unwrap();

    moves::abort(&mut control, &probe, &MoveOptions::default())
        .await
        .unwrap();
    target.batch_execute("VACUUM items").await.unwrap();
    let big = TenantId::new("big").unwrap();
    let mut until_backfill = MoveOptions::default();
    until_backfill.until = Step::Backfill;
    until_backfill.max_rows_per_sec = std::env::var("MAX_ROWS_PER_SEC")
        .ok()
        .and_then(|v| v.parse().ok());
    // The move runs on a thread of its own, as shardctl runs in a process of
    // its own; a bystander on the source writes through its own router.
    let router = ShardRouter::new(control.latest().await.unwrap().load().unwrap()).unwrap();
    handle_writes(&router, "bystander", 200).await; // warm the pool and statements
    let quiet = handle_writes(&router, "bystander", 1500).await;
    let mover = move_on_own_thread(control_url.clone(), "big", until_backfill.max_rows_per_sec);
    let during = writes_until_done(&router, &mover).await;
    let backfill = mover.join().unwrap();
    let rate = |d: Duration| rows() as f64 / d.as_secs_f64();
    let batch_rows = batch_rows();
    println!("backfill of {} rows (5 columns, ~100 bytes each):", rows());
    let mb = |d: Duration| copied_bytes as f64 / 1e6 / d.as_secs_f64();
    println!(
        "  raw COPY (binary), one stream:       {copy:?} ({:.0} rows/s, {:.1} MB/s of COPY data)",
        rate(copy),
        mb(copy)
    );
    println!(
        "  move start + backfill ({batch_rows}-row batches under the tenant lock): {backfill:?} ({:.0} rows/s, {:.1} MB/s, {:.2}x COPY's time, {:.2}x its throughput)",
        rate(backfill),
        mb(backfill),
        backfill.as_secs_f64() / copy.as_secs_f64(),
        copy.as_secs_f64() / backfill.as_secs_f64()
    );
    let (q50, q99) = (percentile(quiet.clone(), 0.5), percentile(quiet, 0.99));
    let (d50, d99) = (percentile(during.clone(), 0.5), percentile(during, 0.99));
    println!(
        "bystander single-row writes on the source (through the handle), backfill throttle {:?} rows/s:",
        until_backfill.max_rows_per_sec
    );
    println!("  no move:           p50 {q50:?}, p99 {q99:?}");
    println!(
        "  during backfill:   p50 {d50:?}, p99 {d99:?} ({:.2}x p99)",
        d99.as_secs_f64() / q99.as_secs_f64()
    );

    // 2b. The bystander's p99 by backfill throttle, in interleaved rounds: a
    //     quiet window, then the backfill of a fresh tenant (sized to take a
    //     few seconds), three times per throttle; the median ratio counts.
    println!("bystander write p99 during backfill / in the quiet window just before, by throttle (3 rounds each):");
    let map = control.latest().await.unwrap().load().unwrap();
    let mut candidates = (0..).map(|i| format!("m{i}")).filter(|t| {
        let id = TenantId::new(t).unwrap();
        map.move_of(&id).is_none() && map.shard(map.locate(&id).shard).name() == "a"
    });
    for throttle in throttles() {
        let rows_each = throttle.map_or(fence_rows(), |t| (t as i64 * 3).min(fence_rows()));
        let mut ratios = Vec::new();
        let mut rates = Vec::new();
        let mut p99s = Vec::new();
        for _ in 0..3 {
            let tenant = candidates.next().unwrap();
            source
                .batch_execute(&format!(
                    "BEGIN; SELECT set_config('shard_router.map_version', '100000@' || extract(epoch FROM now())::text, true);
                     INSERT INTO items (tenant_id, id, n, body) SELECT '{tenant}', gen_random_uuid(), g, repeat('x', 64) FROM generate_series(1, {rows_each}) g;
                     COMMIT"
                ))
                .await
                .unwrap();
            source.batch_execute("VACUUM ANALYZE items").await.unwrap();
            let started = Instant::now();
            let mut quiet = Vec::new();
            while started.elapsed() < Duration::from_secs(2) {
                quiet.extend(handle_writes(&router, "bystander", 20).await);
            }
            let mover = move_on_own_thread(control_url.clone(), &tenant, throttle);
            let during = writes_until_done(&router, &mover).await;
            let took = mover.join().unwrap();
            rates.push(rows_each as f64 / took.as_secs_f64());
            let (q99, d99) = (percentile(quiet, 0.99), percentile(during, 0.99));
            p99s.push(format!("{q99:.1?}->{d99:.1?}"));
            ratios.push(d99.as_secs_f64() / q99.as_secs_f64());
        }
        let shown: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        ratios.sort_by(f64::total_cmp);
        rates.sort_by(f64::total_cmp);
        println!(
            "  throttle {:>14}: p99 ratio median {:.2}x (rounds {}; quiet->during {}), backfill {:.0} rows/s",
            throttle.map_or("none".to_owned(), |t| format!("{t} rows/s")),
            ratios[1],
            shown.join(", "),
            p99s.join(", "),
            rates[1]
        );
    }

    // 3. A moving tenant's single-statement write against one not moving, on
    //    the same shards, interleaved in rounds.
    let router = ShardRouter::new(control.latest().await.unwrap().load().unwrap()).unwrap();
    assert!(router.resolve(big.clone()).location().reason.as_str() == "move");
    handle_writes(&router, "big", 200).await;
    handle_writes(&router, "bystander", 200).await;
    let (mut moving, mut still) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        moving.extend(handle_writes(&router, "big", 400).await);
        still.extend(handle_writes(&router, "bystander", 400).await);
    }
    let (m50, m99) = (percentile(moving.clone(), 0.5), percentile(moving, 0.99));
    let (s50, s99) = (percentile(still.clone(), 0.5), percentile(still, 0.99));
    println!("single-statement write (BEGIN, INSERT, COMMIT through TenantDb::write), 2,000 each:");
    println!("  tenant not moving:             p50 {s50:?}, p99 {s99:?}");
    println!(
        "  tenant moving (dual_write):    p50 {m50:?}, p99 {m99:?} ({:.2}x p50)",
        m50.as_secs_f64() / s50.as_secs_f64()
    );
}

/// `WHOLE_MOVE`: tenant sizes (rows, comma-separated) for the whole-move
/// figures; set, the bench runs only those (`WHOLE_MOVE=300000,1000000`).
fn whole_move_sizes() -> Vec<i64> {
    std::env::var("WHOLE_MOVE")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().expect("WHOLE_MOVE: row counts"))
        .collect()
}

/// What one writer saw: each write's latency with the step the move was in
/// when it began, and the writes refused (then retried).
#[derive(Default)]
struct Seen {
    writes: Vec<(Duration, &'static str)>,
    refused: usize,
}

/// Single-row writes of `tenant` through a router that follows the control
/// database, one transaction each, until `stop`.
async fn write_while(
    router: ShardRouter,
    tenant: &'static str,
    step: std::sync::Arc<std::sync::Mutex<&'static str>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Seen {
    let id = TenantId::new(tenant).unwrap();
    let mut seen = Seen::default();
    let mut n = 0i64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        n += 1;
        let during = *step.lock().unwrap();
        let started = Instant::now();
        let written: Result<(), shard_router::DbError> = async {
            let db = router.resolve(id.clone());
            let mut w = db.write().await?;
            w.execute(
                "INSERT INTO items (tenant_id, id, n, body) VALUES ($1, gen_random_uuid(), $2, 'w')",
                &[&tenant, &n],
            )
            .await?;
            w.commit().await
        }
        .await;
        match written {
            Ok(()) => seen.writes.push((started.elapsed(), during)),
            Err(_) => seen.refused += 1,
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    seen
}

/// 4. A whole move (start to complete, default options) of a tenant of each
///    size while two writers of that tenant and a bystander on the same
///    source write through a router that follows the control database: each
///    one's slowest write, and in which step.
async fn whole_moves(control_url: &str, a: &str, b: &str, source: &Client, sizes: &[i64]) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let mut control = ControlPlane::connect(control_url).await.unwrap();
    control.init().await.unwrap();
    let pins: String = sizes.iter().map(|n| format!("w{n} = \"a\"\n")).collect();
    let map = format!(
        "version = 1\n[shards.a]\nurl = \"{a}\"\n[shards.b]\nurl = \"{b}\"\n[tenants]\nbystander = \"a\"\n{pins}"
    );
    control
        .publish(&map, &PublishOptions::default())
        .await
        .unwrap();
    let mut options = shard_router::control::ControlOptions::default();
    options.instance_id = format!("bench-{}", std::process::id());
    let (router, _agent) = shard_router::control::ControlAgent::start(control_url, options)
        .await
        .unwrap();
    for &rows in sizes {
        let tenant: &'static str = Box::leak(format!("w{rows}").into_boxed_str());
        source
            .batch_execute(&format!(
                "INSERT INTO items (tenant_id, id, n, body) SELECT '{tenant}', gen_random_uuid(), g, repeat('x', 64) \
                 FROM generate_series(1, {rows}) g"
            ))
            .await
            .unwrap();
        source.batch_execute("VACUUM ANALYZE items").await.unwrap();
        let step = Arc::new(Mutex::new("before"));
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = [tenant, tenant, "bystander"]
            .into_iter()
            .map(|t| tokio::spawn(write_while(router.clone(), t, step.clone(), stop.clone())))
            .collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mover = {
            let (control_url, step) = (control_url.to_owned(), step.clone());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let mut control = ControlPlane::connect(&control_url).await.unwrap();
                    let id = TenantId::new(tenant).unwrap();
                    let started = Instant::now();
                    moves::start(&mut control, &id, "b", &MoveOptions::default(), |p| {
                        if let moves::Progress::Step(s) = p {
                            *step.lock().unwrap() = s.as_str();
                        }
                    })
                    .await
                    .unwrap();
                    *step.lock().unwrap() = "after";
                    started.elapsed()
                })
            })
        };
        while !mover.is_finished() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let took = mover.join().unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, Ordering::Relaxed);
        let mut seen = Vec::new();
        for w in writers {
            seen.push(w.await.unwrap());
        }
        println!("whole move of {rows} rows (default options), two writers of the tenant and a bystander on the source, 2 ms between writes: {took:.1?}");
        let report = |who: &str, seen: &[&Seen]| {
            let mut all: Vec<(Duration, &str)> =
                seen.iter().flat_map(|s| s.writes.iter().copied()).collect();
            let refused: usize = seen.iter().map(|s| s.refused).sum();
            all.sort();
            let (slowest, step) = *all.last().unwrap();
            let p99 = all[((all.len() as f64 * 0.99) as usize).min(all.len() - 1)].0;
            let over_1s = all
                .iter()
                .filter(|(d, _)| *d > Duration::from_secs(1))
                .count();
            let over_100ms = all
                .iter()
                .filter(|(d, _)| *d > Duration::from_millis(100))
                .count();
            println!(
                "  {who:<17} {} writes, slowest {slowest:.1?} (begun in {step}), p99 {p99:.1?}, {over_100ms} over 100 ms, {over_1s} over 1 s, {refused} refused and retried",
                all.len()
            );
        };
        report("moving tenant:", &[&seen[0], &seen[1]]);
        report("bystander:", &[&seen[2]]);
    }
}
