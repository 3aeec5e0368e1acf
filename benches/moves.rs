//! Move figures against the local Postgres (`cargo bench --bench moves`):
//!
//! 1. the fence trigger's cost per written row (server-side inserts, so the
//!    network does not hide it), against the same table without the trigger;
//! 2. backfill throughput against raw `COPY` of the same rows, in the same run.
//!
//! It creates its own databases (`srm_<pid>_...`) and drops them.

use std::time::{Duration, Instant};

use futures_util::{pin_mut, SinkExt, StreamExt};
use shard_router::control::{ControlPlane, PublishOptions};
use shard_router::moves::{self, MoveOptions, Step};
use shard_router::TenantId;
use tokio_postgres::{Client, NoTls};

const SERVER: &str = "postgres://postgres@127.0.0.1:5432";
const ROWS: i64 = 100_000;

async fn connect(db: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(&format!("{SERVER}/{db}"), NoTls)
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
    let admin = connect("postgres").await;
    let names: Vec<String> = (0..3)
        .map(|i| format!("srm_{}_{i}", std::process::id()))
        .collect();
    for name in &names {
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
    }
    let result = tokio::spawn(run(names.clone())).await;
    for name in &names {
        let _ = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
    }
    result.unwrap();
}

const SCHEMA: &str = "CREATE TABLE items (tenant_id text NOT NULL, id uuid PRIMARY KEY, \
                      n bigint NOT NULL, body text NOT NULL, at timestamptz NOT NULL DEFAULT now())";

async fn run(names: Vec<String>) {
    let (control_db, a, b) = (&names[0], &names[1], &names[2]);
    let source = connect(a).await;
    let target = connect(b).await;
    for client in [&source, &target] {
        client.batch_execute(SCHEMA).await.unwrap();
    }

    // 1. The fence's cost per row.
    let insert = format!(
        "INSERT INTO items (tenant_id, id, n, body) \
         SELECT $1, gen_random_uuid(), g, 'row ' || g FROM generate_series(1, {ROWS}) g"
    );
    let timed = |tenant: &'static str| {
        let (insert, source) = (insert.clone(), &source);
        async move {
            let mut samples = Vec::new();
            for _ in 0..5 {
                source
                    .batch_execute("BEGIN; SET LOCAL shard_router.map_version = '10'")
                    .await
                    .unwrap();
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
    let mut control = ControlPlane::connect(&format!("{SERVER}/{control_db}"))
        .await
        .unwrap();
    control.init().await.unwrap();
    let map = format!(
        "version = 1\n[shards.a]\nurl = \"{SERVER}/{a}\"\n[shards.b]\nurl = \"{SERVER}/{b}\"\n[tenants]\nbig = \"a\"\nprobe = \"a\"\n"
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
    let per_row = |d: Duration| (d.as_nanos() as f64 - bare.as_nanos() as f64) / ROWS as f64;
    println!("fence: {ROWS} server-side inserts, median of 5");
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
                source
                    .batch_execute("BEGIN; SET LOCAL shard_router.map_version = '10'")
                    .await
                    .unwrap();
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
            "BEGIN; SET LOCAL shard_router.map_version = '100';
             INSERT INTO items (tenant_id, id, n, body) SELECT 'big', gen_random_uuid(), g, repeat('x', 64) FROM generate_series(1, {ROWS}) g;
             COMMIT"
        ))
        .await
        .unwrap();
    let started = Instant::now();
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
            sink.send(chunk.unwrap()).await.unwrap();
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
    let started = Instant::now();
    moves::start(&mut control, &big, "b", &until_backfill, |_| {})
        .await
        .unwrap();
    let backfill = started.elapsed();
    let rate = |d: Duration| ROWS as f64 / d.as_secs_f64();
    println!("backfill of {ROWS} rows (5 columns, ~100 bytes each):");
    println!(
        "  raw COPY (binary), one stream:       {copy:?} ({:.0} rows/s)",
        rate(copy)
    );
    println!(
        "  move start + backfill (1000-row batches under the tenant lock): {backfill:?} ({:.0} rows/s, {:.2}x COPY's time)",
        rate(backfill),
        backfill.as_secs_f64() / copy.as_secs_f64()
    );
}
