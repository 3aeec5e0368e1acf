//! End-to-end load harness: the notes API under concurrent keep-alive HTTP
//! clients over loopback, in up to four configurations and three workloads,
//! measured in interleaved rounds in one run.
//!
//! ```text
//! bash examples/pgbouncer.sh        # optional: pgbouncer (transaction pooling) on 127.0.0.1:6432 for D
//! cargo run --release --example load_harness -- --seconds 5 --connections 32 --rounds 3
//! cargo run --release --example load_harness -- --together 16 --workloads get,post
//! ```
//!
//! `--together N` compares A with B only, side by side: both servers loaded
//! at once from half the connections each, N times with fresh processes, each
//! side's CPU per request its server's and its own Postgres backends'. It is
//! the steadiest A/B figure on a shared machine; the rounds below suit the
//! other configurations.
//!
//! * A: `axum_app` (the router) on 1 shard.
//! * B: the baseline, an idiomatic plain app written without the router: one
//!   deadpool pool, statements prepared once per connection (`prepare_cached`),
//!   each `POST` a single autocommit `INSERT`.
//! * C: `axum_app` on 4 shard databases with 1,000 tenants.
//! * D: B behind pgbouncer in transaction pooling mode (unnamed statements,
//!   `query_typed`, because named ones need pgbouncer 1.21's
//!   `max_prepared_statements`).
//! * E: A with the per-tenant load counting off (`--top-tenants 0`), to
//!   measure what the counting costs end to end (not run by default).
//!
//! Workloads: `GET /notes` only, `POST /notes` only, and 80% GET / 20% POST;
//! each tenant starts every measurement with 5 notes. Each server is a
//! separate process (A, C and E run the real example binary; B and D run this
//! binary's `serve-baseline`). Prints requests/s and p50/p99/p99.9 per round,
//! medians over rounds, and A/B per workload. The databases it creates
//! (`srl_*`) are dropped after.

mod common;

use common::{NewNote, Note};

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use clap::{Parser, Subcommand};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use uuid::Uuid;

const SERVER: &str = "postgres://postgres@127.0.0.1:5432";
const SCHEMA: &str = include_str!("../migrations/notes/V1__notes.sql");

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Option<Sub>,
    /// Seconds of load per configuration.
    #[arg(long, default_value = "10")]
    seconds: u64,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value = "32")]
    connections: usize,
    /// Rounds of every workload and configuration, interleaved; figures are medians over rounds.
    #[arg(long, default_value = "3")]
    rounds: usize,
    /// Workloads to run: any of get, post, mix.
    #[arg(long, value_delimiter = ',', default_value = "get,post,mix")]
    workloads: Vec<String>,
    /// Configurations to run: any of A, B, C, D, E (D also needs pgbouncer;
    /// E is A with the per-tenant counting off).
    #[arg(long, value_delimiter = ',', default_value = "A,B,C,D")]
    configs: Vec<String>,
    /// pgbouncer's address for configuration D.
    #[arg(long, default_value = "127.0.0.1:6432")]
    pgbouncer: String,
    /// A against B only, side by side: both servers loaded at the same time,
    /// each from half the connections, so that both see the machine exactly
    /// alike; this many runs per workload, each with freshly started servers
    /// (a process's memory layout biases it for as long as it lives). Each
    /// side's CPU is its server's and its own Postgres backends', from
    /// `schedstat`. 0: the rounds above instead.
    #[arg(long, default_value = "0")]
    together: usize,
    /// Seconds of load per run in `--together` mode, after 1 s of warm-up.
    #[arg(long, default_value = "3")]
    slice: f64,
    /// In `--together` mode, A with the layer around the router rather than
    /// around each route (`axum_app --around-router`).
    #[arg(long)]
    around_router: bool,
    /// A's per-tenant counting in `--together` mode (0: off, as E).
    #[arg(long, default_value = "1000")]
    top_tenants: usize,
}

#[derive(Subcommand)]
enum Sub {
    /// The baseline server: the notes handlers on one plain deadpool pool.
    ServeBaseline {
        /// The database.
        #[arg(long)]
        db_url: String,
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// Use unnamed statements (needed behind pgbouncer's transaction pooling).
        #[arg(long)]
        unnamed: bool,
    },
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    match args.command {
        Some(Sub::ServeBaseline {
            ref db_url,
            listen,
            unnamed,
        }) => runtime.block_on(serve_baseline(db_url.clone(), listen, unnamed)),
        None => runtime.block_on(harness(args)),
    }
}

// ---------- the baseline server (B and D) ----------

#[derive(Clone)]
struct Baseline {
    pool: deadpool_postgres::Pool,
    unnamed: bool,
}

fn tenant_of(headers: &HeaderMap) -> Result<String, StatusCode> {
    headers
        .get("x-tenant-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or(StatusCode::BAD_REQUEST)
}

async fn baseline_list(
    State(s): State<Baseline>,
    headers: HeaderMap,
) -> Result<Json<Vec<Note>>, StatusCode> {
    let tenant = tenant_of(&headers)?;
    let client = s
        .pool
        .get()
        .await
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    let rows = if s.unnamed {
        let text = tokio_postgres::types::Type::TEXT;
        client
            .query_typed(common::LIST_NOTES, &[(&tenant, text)])
            .await
    } else {
        match client.prepare_cached(common::LIST_NOTES).await {
            Ok(statement) => client.query(&statement, &[&tenant]).await,
            Err(e) => Err(e),
        }
    }
    .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    let notes = rows
        .iter()
        .map(|r| Note {
            id: r.get(0),
            body: r.get(1),
            created_at: r.get(2),
        })
        .collect();
    Ok(Json(notes))
}

async fn baseline_create(
    State(s): State<Baseline>,
    headers: HeaderMap,
    Json(new): Json<NewNote>,
) -> Result<(StatusCode, Json<Note>), StatusCode> {
    let tenant = tenant_of(&headers)?;
    let id = Uuid::new_v4();
    let client = s
        .pool
        .get()
        .await
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    // One statement, autocommit: what a plain app does for a single insert.
    let rows = if s.unnamed {
        use tokio_postgres::types::Type;
        let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 3] = [
            (&tenant, Type::TEXT),
            (&id, Type::UUID),
            (&new.body, Type::TEXT),
        ];
        client.query_typed(common::INSERT_NOTE, &params).await
    } else {
        match client.prepare_cached(common::INSERT_NOTE).await {
            Ok(statement) => client.query(&statement, &[&tenant, &id, &new.body]).await,
            Err(e) => Err(e),
        }
    }
    .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    let note = Note {
        id,
        body: new.body,
        created_at: rows.first().map(|r| r.get(0)).unwrap_or_default(),
    };
    Ok((StatusCode::CREATED, Json(note)))
}

async fn serve_baseline(
    db_url: String,
    listen: SocketAddr,
    unnamed: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let pg: tokio_postgres::Config = db_url.parse()?;
    let manager = deadpool_postgres::Manager::from_config(
        pg,
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    // The same pool settings as the router's default.
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(16)
        .wait_timeout(Some(Duration::from_secs(2)))
        .create_timeout(Some(Duration::from_secs(2)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()?;
    let app = Router::new()
        .route("/notes", get(baseline_list).post(baseline_create))
        .with_state(Baseline { pool, unnamed });
    let listener = tokio::net::TcpListener::bind(listen).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

// ---------- the harness ----------

struct Server(Child);

/// Starts a server process, its output discarded.
fn start_server(command: &mut Command) -> Server {
    Server(
        command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .env("RUST_LOG", "error")
            .spawn()
            .expect("server binary (cargo build --release --examples)"),
    )
}
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn admin() -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(&format!("{SERVER}/postgres"), tokio_postgres::NoTls)
            .await
            .expect("Postgres at 127.0.0.1:5432");
    tokio::spawn(connection);
    client
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn sibling(name: &str) -> std::path::PathBuf {
    std::env::current_exe().unwrap().with_file_name(name)
}

async fn wait_listening(addr: SocketAddr) {
    for _ in 0..400 {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listens on {addr}");
}

fn router_map(dbs: &[String], dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let mut toml = "version = 1\n".to_owned();
    for (i, db) in dbs.iter().enumerate() {
        // 16 connections per shard, as the baseline's one pool.
        toml += &format!("[shards.s{i}]\nurl = \"{SERVER}/{db}\"\npool = {{ max_size = 16 }}\n");
    }
    let path = dir.join(name);
    std::fs::write(&path, toml).unwrap();
    path
}

/// Requests/s, p50, p99, p99.9, errors, and CPU per request in µs (the
/// server process's and every Postgres process's, user + system).
type Figures = (f64, Duration, Duration, Duration, u64, f64);

/// CPU seconds (user + system) of process `pid` so far, from `/proc` (clock
/// ticks of 1/100 s: Linux's `USER_HZ`); 0 if it is gone.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name is in parentheses and may hold spaces: split after it.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Fields 14 and 15 of stat (utime, stime); `rest` starts at field 3.
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// CPU nanoseconds of process `pid` so far, every thread's, from
/// `/proc/<pid>/task/*/schedstat`: time on a CPU as the scheduler counts it,
/// exact where `stat`'s ticks are sampled; 0 if it is gone (a thread or
/// backend that ends during a measurement takes its time with it: the
/// servers' runtime threads and pooled connections live throughout).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| {
            let stat = std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok()?;
            stat.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

/// Every process named `postgres`: the server's backends and its background processes.
fn postgres_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "postgres")
        })
        .collect()
}

/// Steal time so far, in clock ticks, from `/proc/stat`: time the hypervisor
/// ran something else while this machine's CPUs were ready to run.
fn steal_ticks() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let cpu = s.lines().next()?.to_owned();
            cpu.split_whitespace().nth(8)?.parse().ok()
        })
        .unwrap_or(0)
}

/// The port of [`SERVER`].
fn pg_port() -> i32 {
    SERVER
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(5432)
}

/// The Postgres backends serving process `pid`: its sockets' inodes, their
/// local ports in `/proc/net/tcp{,6}`, then `pg_stat_activity.client_port`.
async fn backends_of(admin: &tokio_postgres::Client, pid: u32) -> Vec<u32> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .filter_map(|fd| {
            let link = std::fs::read_link(fd.ok()?.path()).ok()?;
            let link = link.to_str()?;
            Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let mut ports: Vec<i32> = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port = |addr: &str| {
                addr.rsplit_once(':')
                    .and_then(|(_, p)| i32::from_str_radix(p, 16).ok())
            };
            if f.len() > 9 && inodes.contains(f[9]) && port(f[2]) == Some(pg_port()) {
                ports.extend(port(f[1]));
            }
        }
    }
    admin
        .query(
            "SELECT pid FROM pg_stat_activity WHERE client_port = ANY($1)",
            &[&ports],
        )
        .await
        .map(|rows| rows.iter().map(|r| r.get::<_, i32>(0) as u32).collect())
        .unwrap_or_default()
}

/// A against B side by side (`--together`): per run, the ratio of
/// throughput and of CPU per request; medians and quartiles over the runs.
async fn run_together(args: &Args, single: &str) -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("load-harness-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let tenants = 100;
    let dbs = vec![single.to_owned()];
    let map = router_map(&dbs, &dir, "A.toml");
    let admin = admin().await;
    let slice = Duration::from_secs_f64(args.slice);
    let half = (args.connections / 2).max(1);
    for workload in [Workload::Get, Workload::Post, Workload::Mix] {
        let name = format!("{workload:?}").to_lowercase();
        if !args.workloads.contains(&name) {
            continue;
        }
        let steal_before = steal_ticks();
        let started = Instant::now();
        let (mut rps, mut cpu) = (Vec::new(), Vec::new());
        let mut errors = 0;
        for run in 1..=args.together {
            reset_notes(&dbs, tenants).await?;
            let (a_addr, b_addr) = (free_addr(), free_addr());
            let servers = [
                start_server(
                    Command::new(sibling("axum_app"))
                        .args(args.around_router.then_some("--around-router"))
                        .args([
                            "--map",
                            map.to_str().unwrap(),
                            "--listen",
                            &a_addr.to_string(),
                            "--admin-listen",
                            "127.0.0.1:0",
                            "--top-tenants",
                            &args.top_tenants.to_string(),
                        ]),
                ),
                start_server(Command::new(std::env::current_exe()?).args([
                    "serve-baseline",
                    "--db-url",
                    &format!("{SERVER}/{single}"),
                    "--listen",
                    &b_addr.to_string(),
                ])),
            ];
            wait_listening(a_addr).await;
            wait_listening(b_addr).await;
            let warm = Duration::from_secs(1);
            tokio::join!(
                drive(a_addr, tenants, half, warm, workload),
                drive(b_addr, tenants, half, warm, workload)
            );
            let pids = [servers[0].0.id(), servers[1].0.id()];
            // Each side's backends and their CPU so far; looked for again at
            // the end, so that a connection opened during the window counts
            // (from 0: all of its time is in the window).
            let mut before: [std::collections::HashMap<u32, u64>; 2] = Default::default();
            for side in 0..2 {
                for pid in backends_of(&admin, pids[side]).await {
                    before[side].insert(pid, cpu_ns(pid));
                }
            }
            let app_before = [cpu_ns(pids[0]), cpu_ns(pids[1])];
            let outcomes = tokio::join!(
                drive(a_addr, tenants, half, slice, workload),
                drive(b_addr, tenants, half, slice, workload)
            );
            // (requests/s, CPU µs per request: all, app, Postgres) per side.
            let mut figures = [(0.0, 0.0, 0.0, 0.0); 2];
            for (side, o) in [(0, outcomes.0), (1, outcomes.1)] {
                let app = cpu_ns(pids[side]).saturating_sub(app_before[side]) as f64;
                let mut backends: Vec<u32> = backends_of(&admin, pids[side]).await;
                backends.extend(before[side].keys());
                backends.sort_unstable();
                backends.dedup();
                let pg: u64 = backends
                    .iter()
                    .map(|pid| cpu_ns(*pid).saturating_sub(*before[side].get(pid).unwrap_or(&0)))
                    .sum();
                let pg = pg as f64;
                errors += o.errors;
                // Per answered request: a failure would make a side look cheap.
                let served = (o.latencies.len() as u64).saturating_sub(o.errors).max(1);
                let per_request = |ns: f64| ns / 1e3 / served as f64;
                figures[side] = (
                    o.rps(),
                    per_request(app + pg),
                    per_request(app),
                    per_request(pg),
                );
            }
            drop(servers);
            let [a, b] = figures;
            println!(
                "run {run:>2} {:<9} A {:>6.0} req/s {:>5.1} µs/req ({:>5.1} app + {:>5.1} pg)   B {:>6.0} req/s {:>5.1} µs/req ({:>5.1} + {:>5.1})   A/B throughput {:.3}  CPU per request {:.3}",
                workload.label(),
                a.0, a.1, a.2, a.3, b.0, b.1, b.2, b.3,
                a.0 / b.0,
                a.1 / b.1
            );
            rps.push(a.0 / b.0);
            cpu.push(a.1 / b.1);
        }
        let steal = (steal_ticks() - steal_before) as f64 / 100.0 / started.elapsed().as_secs_f64();
        let quartiles = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
            (at(0.25), at(0.5), at(0.75))
        };
        let (r1, r2, r3) = quartiles(rps);
        let (c1, c2, c3) = quartiles(cpu);
        println!(
            "{}: A/B side by side, {} runs of {:.1} s: throughput median {r2:.3} (quartiles {r1:.3}-{r3:.3}, target >= 0.97); \
             CPU per request median {c2:.3} (quartiles {c1:.3}-{c3:.3}, target <= 1.03); errors {errors}; steal {:.1}% of a CPU",
            workload.label(),
            args.together,
            args.slice,
            steal * 100.0
        );
    }
    println!(
        "machine: {} cores; {} connections, half to each side",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.connections
    );
    Ok(())
}

/// CPU seconds so far of every process named `postgres` (the server's
/// backends and its background processes).
fn postgres_cpu_seconds() -> f64 {
    postgres_pids().into_iter().map(cpu_seconds).sum()
}

#[derive(Default)]
struct Outcome {
    latencies: Vec<Duration>,
    errors: u64,
    elapsed: Duration,
}

impl Outcome {
    fn rps(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }
    fn pct(&self, p: f64) -> Duration {
        self.latencies[((self.latencies.len() - 1) as f64 * p).round() as usize]
    }
}

/// What the clients send.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    Get,
    Post,
    /// 80% GET, 20% POST.
    Mix,
}

impl Workload {
    fn label(self) -> &'static str {
        match self {
            Workload::Get => "GET only",
            Workload::Post => "POST only",
            Workload::Mix => "80% GET / 20% POST",
        }
    }

    fn posts(self, n: usize) -> bool {
        match self {
            Workload::Get => false,
            Workload::Post => true,
            Workload::Mix => n % 5 == 0,
        }
    }
}

/// Keep-alive HTTP/1.1 clients for `seconds`, each on its own connection.
async fn drive(
    addr: SocketAddr,
    tenants: usize,
    connections: usize,
    length: Duration,
    workload: Workload,
) -> Outcome {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut stream = BufReader::new(TcpStream::connect(addr).await.unwrap());
                stream.get_mut().set_nodelay(true).unwrap();
                let (mut latencies, mut errors) = (Vec::new(), 0u64);
                let mut n = c;
                while !stop.load(Ordering::Relaxed) {
                    let tenant = format!("tenant-{:04}", n % tenants);
                    let request = if workload.posts(n) {
                        let body = format!("{{\"body\":\"note {n}\"}}");
                        format!("POST /notes HTTP/1.1\r\nhost: h\r\nx-tenant-id: {tenant}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len())
                    } else {
                        format!("GET /notes HTTP/1.1\r\nhost: h\r\nx-tenant-id: {tenant}\r\n\r\n")
                    };
                    let sent = Instant::now();
                    stream.get_mut().write_all(request.as_bytes()).await.unwrap();
                    let status = read_response(&mut stream).await;
                    latencies.push(sent.elapsed());
                    if !(200..300).contains(&status) {
                        errors += 1;
                    }
                    n += connections;
                }
                (latencies, errors)
            })
        })
        .collect();
    tokio::time::sleep(length).await;
    stop.store(true, Ordering::Relaxed);
    let mut outcome = Outcome::default();
    for task in tasks {
        let (latencies, errors) = task.await.unwrap();
        outcome.latencies.extend(latencies);
        outcome.errors += errors;
    }
    outcome.elapsed = started.elapsed();
    outcome.latencies.sort();
    outcome
}

/// Reads one response; returns its status.
async fn read_response(stream: &mut BufReader<TcpStream>) -> u16 {
    let mut line = String::new();
    stream.read_line(&mut line).await.unwrap();
    let status = line.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut length = 0usize;
    loop {
        line.clear();
        stream.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.unwrap();
    status
}

async fn harness(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let admin = admin().await;
    let pid = std::process::id();
    let single = format!("srl_{pid}_single");
    let four: Vec<String> = (0..4).map(|i| format!("srl_{pid}_four_{i}")).collect();
    let all: Vec<String> = std::iter::once(single.clone())
        .chain(four.clone())
        .collect();
    for db in &all {
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await?;
        let (client, connection) =
            tokio_postgres::connect(&format!("{SERVER}/{db}"), tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        client.batch_execute(SCHEMA).await?;
    }
    let result = if args.together > 0 {
        run_together(&args, &single).await
    } else {
        run_configs(&args, &single, &four).await
    };
    for db in &all {
        let _ = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await;
    }
    result
}

/// Every tenant starts a measurement with the same 5 notes: nothing a
/// previous run posted stays to make lists longer for the next configuration.
async fn reset_notes(dbs: &[String], tenants: usize) -> Result<(), Box<dyn std::error::Error>> {
    for db in dbs {
        let (client, connection) =
            tokio_postgres::connect(&format!("{SERVER}/{db}"), tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        client
            .batch_execute(&format!(
                "TRUNCATE notes;
                 INSERT INTO notes (tenant_id, id, body)
                   SELECT format('tenant-%s', lpad(t::text, 4, '0')), gen_random_uuid(), 'seed ' || i
                   FROM generate_series(0, {}) t, generate_series(1, 5) i;
                 ANALYZE notes;",
                tenants - 1
            ))
            .await?;
    }
    Ok(())
}

async fn run_configs(
    args: &Args,
    single: &str,
    four: &[String],
) -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("load-harness-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let length = Duration::from_secs(args.seconds);
    let start = start_server;

    let configs: [(&str, usize); 5] = [
        ("A router, 1 shard", 100),
        ("B plain app, no router", 100),
        ("C router, 4 shards", 1000),
        ("D pgbouncer (transaction), plain app", 100),
        ("E router, 1 shard, tenant counting off", 100),
    ];
    let workloads: Vec<Workload> = [Workload::Get, Workload::Post, Workload::Mix]
        .into_iter()
        .filter(|w| {
            let name = match w {
                Workload::Get => "get",
                Workload::Post => "post",
                Workload::Mix => "mix",
            };
            args.workloads.iter().any(|x| x == name)
        })
        .collect();
    // figures[workload][config]: one entry per round.
    let mut figures: Vec<Vec<Vec<Figures>>> =
        vec![vec![Vec::new(); configs.len()]; workloads.len()];
    let pgbouncer_up = TcpStream::connect(&args.pgbouncer).await.is_ok();
    if !pgbouncer_up {
        println!(
            "D: skipped, nothing listens on {} (run examples/pgbouncer.sh)",
            args.pgbouncer
        );
    }
    for round in 1..=args.rounds {
        for (w, workload) in workloads.iter().enumerate() {
            // Every other round runs the configurations in reverse order, so
            // that neither always runs first (on a warmer or colder machine).
            let mut order: Vec<usize> = (0..configs.len()).collect();
            if round % 2 == 0 {
                order.reverse();
            }
            for i in order {
                let (label, tenants) = &configs[i];
                if (label.starts_with('D') && !pgbouncer_up)
                    || !args.configs.iter().any(|c| label.starts_with(c.as_str()))
                {
                    continue;
                }
                let dbs: Vec<String> = if label.starts_with('C') {
                    four.to_vec()
                } else {
                    vec![single.to_owned()]
                };
                reset_notes(&dbs, *tenants).await?;
                let addr = free_addr();
                let listen = addr.to_string();
                let server = match &label[..1] {
                    "A" | "C" | "E" => start(
                        Command::new(sibling("axum_app")).args([
                            "--map",
                            router_map(&dbs, &dir, &format!("{}.toml", &label[..1]))
                                .to_str()
                                .unwrap(),
                            "--listen",
                            &listen,
                            "--admin-listen",
                            "127.0.0.1:0",
                            "--top-tenants",
                            if label.starts_with('E') { "0" } else { "1000" },
                        ]),
                    ),
                    "B" => start(Command::new(std::env::current_exe()?).args([
                        "serve-baseline",
                        "--db-url",
                        &format!("{SERVER}/{single}"),
                        "--listen",
                        &listen,
                    ])),
                    _ => start(Command::new(std::env::current_exe()?).args([
                        "serve-baseline",
                        "--db-url",
                        &format!("postgres://postgres@{}/{single}", args.pgbouncer),
                        "--listen",
                        &listen,
                        "--unnamed",
                    ])),
                };
                wait_listening(addr).await;
                // Warm up pools and statement caches, then start clean and measure.
                drive(
                    addr,
                    *tenants,
                    args.connections,
                    Duration::from_secs(1),
                    *workload,
                )
                .await;
                reset_notes(&dbs, *tenants).await?;
                let server_pid = server.0.id();
                let cpu_before = cpu_seconds(server_pid) + postgres_cpu_seconds();
                let o = drive(addr, *tenants, args.connections, length, *workload).await;
                let cpu = cpu_seconds(server_pid) + postgres_cpu_seconds() - cpu_before;
                let cpu_per_request = cpu * 1e6 / o.latencies.len().max(1) as f64;
                drop(server);
                println!(
                    "round {round} {:<20} {label:<38} {:>9.0} req/s  p50 {:>8.2?}  p99 {:>8.2?}  p99.9 {:>8.2?}  cpu/req {:>6.1} µs  errors {}",
                    workload.label(),
                    o.rps(),
                    o.pct(0.5),
                    o.pct(0.99),
                    o.pct(0.999),
                    cpu_per_request,
                    o.errors
                );
                figures[w][i].push((
                    o.rps(),
                    o.pct(0.5),
                    o.pct(0.99),
                    o.pct(0.999),
                    o.errors,
                    cpu_per_request,
                ));
            }
        }
    }
    fn median<T: PartialOrd + Copy>(mut v: Vec<T>) -> T {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    }
    println!("medians over {} rounds:", args.rounds);
    for (w, workload) in workloads.iter().enumerate() {
        println!("{}:", workload.label());
        let mut medians = Vec::new();
        for (i, (label, _)) in configs.iter().enumerate() {
            let f = &figures[w][i];
            if f.is_empty() {
                medians.push(None);
                continue;
            }
            let m = (
                median(f.iter().map(|x| x.0).collect()),
                median(f.iter().map(|x| x.1).collect()),
                median(f.iter().map(|x| x.2).collect()),
                median(f.iter().map(|x| x.3).collect()),
                f.iter().map(|x| x.4).sum::<u64>(),
            );
            let cpu = median(f.iter().map(|x| x.5).collect());
            println!(
                "  {label:<38} {:>9.0} req/s  p50 {:>8.2?}  p99 {:>8.2?}  p99.9 {:>8.2?}  cpu/req {cpu:>6.1} µs  errors {}",
                m.0, m.1, m.2, m.3, m.4
            );
            medians.push(Some(m));
        }
        if let (Some(a), Some(b)) = (medians[0], medians[1]) {
            // Rounds are interleaved so that each round's A and B share the
            // machine's state: the median of the per-round ratios cancels
            // drift between rounds, which the ratio of medians does not.
            let (fa, fb) = (&figures[w][0], &figures[w][1]);
            let per_round = |f: &dyn Fn(&Figures) -> f64| -> Vec<f64> {
                fa.iter().zip(fb).map(|(a, b)| f(a) / f(b)).collect()
            };
            let rps = per_round(&|x| x.0);
            let p99 = per_round(&|x| x.2.as_secs_f64());
            let cpu = per_round(&|x| x.5);
            let list = |v: &[f64]| {
                v.iter()
                    .map(|r| format!("{r:.3}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            println!(
                "  A/B per round: throughput {} -> median {:.3}; p99 {} -> median {:.3} (targets: >= 0.97, <= 1.05)",
                list(&rps),
                median(rps.clone()),
                list(&p99),
                median(p99.clone())
            );
            println!(
                "  A/B per round: CPU per request (app + Postgres) {} -> median {:.3} (target <= 1.03)",
                list(&cpu),
                median(cpu.clone())
            );
            println!(
                "  A/B of the medians: throughput {:.3}, p99 {:.3}",
                a.0 / b.0,
                a.2.as_secs_f64() / b.2.as_secs_f64()
            );
        }
        if let (Some(a), Some(d)) = (medians[0], medians[3]) {
            println!("  A/D: throughput {:.3}", a.0 / d.0);
        }
        if !figures[w][0].is_empty() && !figures[w][4].is_empty() {
            let ratios: Vec<f64> = figures[w][0]
                .iter()
                .zip(&figures[w][4])
                .map(|(a, e)| a.0 / e.0)
                .collect();
            println!(
                "  A/E (tenant counting on / off) per round: throughput {} -> median {:.3} (target >= 0.98)",
                ratios
                    .iter()
                    .map(|r| format!("{r:.3}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                median(ratios.clone())
            );
        }
    }
    println!(
        "machine: {} cores; {} connections, {} s per measurement, {} interleaved rounds",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.connections,
        args.seconds,
        args.rounds
    );
    Ok(())
}
