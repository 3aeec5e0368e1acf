//! Rollout figures against the local Postgres (`cargo bench --bench rollout`):
//!
//! 1. publish → applied: time from a map version's commit in the control
//!    database until two routers (each with its own connections) serve it,
//!    over repeated publishes;
//! 2. request latency with and without a 100,000-pin map published every
//!    second, in the same run;
//! 3. the re-homing check of a publish that changes 100,000 pins of tenants
//!    that all have data (a dry run, refused as it should be).
//!
//! It creates its own databases (`srb_<pid>_...`) and drops them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shard_router::control::{ControlAgent, ControlOptions, ControlPlane, PublishOptions};
use shard_router::{ShardRouter, TenantId};
use tokio_postgres::NoTls;

const SERVER: &str = "postgres://postgres@127.0.0.1:5432";

async fn admin() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&format!("{SERVER}/postgres"), NoTls)
        .await
        .expect("Postgres at 127.0.0.1:5432");
    tokio::spawn(connection);
    client
}

fn map_toml(version: u64, shards: &[String], pins: usize) -> String {
    let mut toml = format!("version = {version}\n");
    for (i, db) in shards.iter().enumerate() {
        toml += &format!("[shards.s{i}]\nurl = \"{SERVER}/{db}\"\npool = {{ max_size = 16 }}\n");
    }
    toml += "[tenants]\n";
    for p in 0..pins {
        toml += &format!("p{p:06} = \"s{}\"\n", p % shards.len());
    }
    toml
}

fn options(id: &str) -> ControlOptions {
    let mut o = ControlOptions::default();
    o.instance_id = id.to_owned();
    o.heartbeat = Duration::from_millis(200);
    o.poll = Duration::from_secs(60); // measure NOTIFY, not polling
    o
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let admin = admin().await;
    let names: Vec<String> = (0..3)
        .map(|i| format!("srb_{}_{i}", std::process::id()))
        .collect();
    for name in &names {
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
    }
    let control_url = format!("{SERVER}/{}", names[0]);
    let shards = names[1..].to_vec();
    let result = tokio::spawn(measure(control_url, shards)).await;
    for name in &names {
        let _ = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
    }
    result.unwrap();
}

async fn measure(control_url: String, shards: Vec<String>) {
    let mut control = ControlPlane::connect(&control_url).await.unwrap();
    control.init().await.unwrap();
    control
        .publish(&map_toml(1, &shards, 0), &PublishOptions::default())
        .await
        .unwrap();

    // 1. publish -> applied in two routers.
    let (r1, a1) = ControlAgent::start(&control_url, options("bench-r1"))
        .await
        .unwrap();
    let (r2, a2) = ControlAgent::start(&control_url, options("bench-r2"))
        .await
        .unwrap();
    let raw = tokio_postgres::connect(&control_url, NoTls).await.unwrap();
    tokio::spawn(raw.1);
    let raw = raw.0;
    let mut latencies = Vec::new();
    for version in 2..=101u64 {
        let toml = map_toml(version, &shards, 10);
        let started = Instant::now();
        let json = shard_router::control::toml_to_json(&toml).unwrap();
        raw.execute(
            "INSERT INTO shard_router_maps (version, map, map_json, checksum) VALUES ($1, $2, $3, 'bench')",
            &[&(version as i64), &toml, &json],
        )
        .await
        .unwrap();
        while r1.version() < version || r2.version() < version {
            tokio::task::yield_now().await;
        }
        latencies.push(started.elapsed());
    }
    latencies.sort();
    println!(
        "publish -> applied in 2 routers, {} publishes: median {:?}, p90 {:?}, max {:?}",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.9),
        latencies[latencies.len() - 1]
    );
    drop((a1, a2));

    // 2. request latency without, then with, a 100,000-pin map every second.
    let (router, _agent) = ControlAgent::start(&control_url, options("bench-r3"))
        .await
        .unwrap();
    let mut next_version = 1_000;
    for (label, pace) in [
        ("back to back, both cores saturated", None),
        (
            "paced, 1 ms between requests per worker",
            Some(Duration::from_millis(1)),
        ),
    ] {
        println!("load: 4 workers, {label}");
        let quiet = load(&router, Duration::from_secs(8), None, pace).await;
        // Rendered before the load starts: the publisher's own work is not measured.
        let big: Vec<Rendered> = (0..9)
            .map(|i| {
                let toml = map_toml(next_version + i, &shards, 100_000);
                let json = shard_router::control::toml_to_json(&toml).unwrap();
                ((next_version + i) as i64, toml, json)
            })
            .collect();
        next_version += 100;
        let busy = load(&router, Duration::from_secs(8), Some((&raw, big)), pace).await;
        let quiet_again = load(&router, Duration::from_secs(8), None, pace).await;
        report("without publishes", &quiet.0);
        report("without publishes, again (noise)", &quiet_again.0);
        report(
            &format!(
                "with a 100,000-pin map published every second ({} applied)",
                busy.1
            ),
            &busy.0,
        );
        let (q, q2, b) = (
            percentile(&quiet.0, 0.99),
            percentile(&quiet_again.0, 0.99),
            percentile(&busy.0, 0.99),
        );
        println!(
            "  p99 with publishes / without: {:.2} (the two runs without differ by {:.2})",
            b.as_secs_f64() / q.min(q2).as_secs_f64(),
            q.max(q2).as_secs_f64() / q.min(q2).as_secs_f64()
        );
    }

    // 3. The re-homing check of a pin-only publish.
    pin_only_publish(&mut control, &shards, next_version + 1_000).await;
}

/// 3. A publish whose only change is 100,000 pins, every pinned tenant with data.
async fn pin_only_publish(control: &mut ControlPlane, shards: &[String], version: u64) {
    for (i, db) in shards.iter().enumerate() {
        let (client, connection) = tokio_postgres::connect(&format!("{SERVER}/{db}"), NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
            .batch_execute(&format!(
                "CREATE TABLE notes (tenant_id text NOT NULL, id bigint, PRIMARY KEY (tenant_id, id));
                 INSERT INTO notes SELECT format('p%s', lpad(g::text, 6, '0')), 1
                   FROM generate_series(0, 99999) g WHERE g % {} = {i};",
                shards.len()
            ))
            .await
            .unwrap();
    }
    let flipped = |version: u64, shift: usize| {
        let mut toml = map_toml(version, shards, 0); // ends with [tenants]
        for p in 0..100_000 {
            toml += &format!("p{p:06} = \"s{}\"\n", (p + shift) % shards.len());
        }
        toml
    };
    // Where the data is, published directly (the base of the check).
    let base = flipped(version, 0);
    let json = shard_router::control::toml_to_json(&base).unwrap();
    let (raw, connection) = tokio_postgres::connect(control.url(), NoTls).await.unwrap();
    tokio::spawn(connection);
    raw.execute(
        "INSERT INTO shard_router_maps (version, map, map_json, checksum) VALUES ($1, $2, $3, 'bench')",
        &[&(version as i64), &base, &json],
    )
    .await
    .unwrap();
    let next = flipped(version + 1, 1);
    let mut options = PublishOptions::default();
    options.dry_run = true;
    let started = Instant::now();
    let result = control.publish(&next, &options).await;
    let took = started.elapsed();
    let refused = match &result {
        Err(shard_router::control::PublishError::Rehoming { tenants, .. }) => tenants.len(),
        other => panic!("expected the check to refuse, got {other:?}"),
    };
    println!(
        "pin-only publish, 100,000 changed pins of tenants with data: checked in {:.2} s ({refused} re-homings found)",
        took.as_secs_f64()
    );
}

/// A map ready to insert: version, TOML, JSON.
type Rendered = (i64, String, String);

fn report(label: &str, sorted: &[Duration]) {
    println!(
        "  requests {label}: {} requests, p50 {:?}, p99 {:?}, p99.9 {:?}",
        sorted.len(),
        percentile(sorted, 0.5),
        percentile(sorted, 0.99),
        percentile(sorted, 0.999)
    );
}

/// Four workers send requests (resolve, check out, one query) for `length`,
/// back to back (as many as two cores serve, so any CPU the publishes take
/// shows), or with `pace` between requests. Meanwhile `publishes`, if any, are
/// inserted one per second.
async fn load(
    router: &ShardRouter,
    length: Duration,
    publishes: Option<(&tokio_postgres::Client, Vec<Rendered>)>,
    pace: Option<Duration>,
) -> (Vec<Duration>, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (router, stop) = (router.clone(), stop.clone());
            tokio::spawn(async move {
                let mut samples = Vec::new();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let tenant = TenantId::new(&format!("t{w}-{}", n % 1000)).unwrap();
                    let started = Instant::now();
                    let db = router.resolve(tenant);
                    let client = db.read().await.unwrap();
                    client.query_one("SELECT 1", &[]).await.unwrap();
                    drop(client);
                    samples.push(started.elapsed());
                    n += 1;
                    if let Some(pace) = pace {
                        tokio::time::sleep(pace).await;
                    }
                }
                samples
            })
        })
        .collect();
    let mut applied = 0;
    let deadline = Instant::now() + length;
    if let Some((raw, maps)) = publishes {
        for (version, toml, json) in maps {
            if Instant::now() >= deadline {
                break;
            }
            raw.execute(
                "INSERT INTO shard_router_maps (version, map, map_json, checksum) VALUES ($1, $2, $3, 'bench')",
                &[&version, &toml, &json],
            )
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
            if router.version() >= version as u64 {
                applied += 1;
            }
        }
    }
    tokio::time::sleep(deadline.saturating_duration_since(Instant::now())).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await.unwrap());
    }
    all.sort();
    (all, applied)
}
