//! Routing costs: tenant location, the layer's own cost, and loading/applying big maps.
//!
//! `cargo bench --bench routing`. Figures are in the README.

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use shard_router::map::MapLoader;
use shard_router::tenant::HeaderExtractor;
use shard_router::{ShardMap, ShardRouter, ShardRouterLayer, TenantId};
use tower::{service_fn, Layer, Service};

fn map_toml(version: u64, shards: usize, pins: usize) -> String {
    let mut toml = String::with_capacity(pins * 24 + shards * 64);
    toml += &format!("version = {version}\n");
    for s in 0..shards {
        toml += &format!("[shards.s{s:02}]\nurl = \"postgres://postgres@127.0.0.1:1/s{s:02}\"\n");
    }
    toml += "[tenants]\n";
    for p in 0..pins {
        toml += &format!("p{p:07} = \"s{:02}\"\n", p % shards);
    }
    toml
}

fn load(toml: &str) -> ShardMap {
    MapLoader::without_env().load_str(toml).unwrap()
}

fn tenants(prefix: &str, n: usize) -> Vec<TenantId> {
    (0..n)
        .map(|i| TenantId::new(&format!("{prefix}{i:07}")).unwrap())
        .collect()
}

/// Unpinned tenants probed (a power of two, to wrap with a mask).
const UNPINNED: usize = 4096;

fn location(c: &mut Criterion) {
    let big = load(&map_toml(1, 64, 1_000_000));
    let ring_only = load(&map_toml(1, 64, 0));
    let pinned = tenants("p", 1_000_000);
    let unpinned = tenants("u", UNPINNED);

    println!(
        "pin index: {} bytes for {} pins ({:.1} bytes per pin)",
        big.pin_index_bytes(),
        big.pin_count(),
        big.pin_index_bytes() as f64 / big.pin_count() as f64
    );

    let mut group = c.benchmark_group("locate");
    let mut i = 0usize;
    group.bench_function(
        "1M pins, 64 shards, the same pinned tenant (cache-warm)",
        |b| b.iter(|| black_box(big.locate(&pinned[4242]))),
    );
    group.bench_function("1M pins, 64 shards, pinned tenant", |b| {
        b.iter(|| {
            // Wrap without a division: a 64-bit `%` costs ~10 ns, as much as
            // a tenth of what is measured.
            i += 1;
            if i == pinned.len() {
                i = 0;
            }
            black_box(big.locate(&pinned[i]))
        })
    });
    group.bench_function("1M pins, 64 shards, ring tenant", |b| {
        b.iter(|| {
            i = (i + 1) & (UNPINNED - 1);
            black_box(big.locate(&unpinned[i]))
        })
    });
    group.bench_function("ring only, 64 shards", |b| {
        b.iter(|| {
            i = (i + 1) & (UNPINNED - 1);
            black_box(ring_only.locate(&unpinned[i]))
        })
    });
    group.finish();
}

/// Polls a future that is expected to be ready at once.
fn ready<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("future was not ready"),
    }
}

fn layer(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let router = ShardRouter::new(load(&map_toml(1, 64, 1_000))).unwrap();
    let handler = service_fn(|req: http::Request<String>| async move {
        black_box(&req);
        Ok::<_, Infallible>(http::Response::new(String::new()))
    });
    let mut bare = handler;
    let mut routed = ShardRouterLayer::new(router, HeaderExtractor::default()).layer(handler);
    let request = || {
        http::Request::builder()
            .uri("/notes")
            .header("x-tenant-id", "tenant-0042")
            .header("accept", "application/json")
            .body(String::new())
            .unwrap()
    };

    let mut group = c.benchmark_group("layer");
    group.bench_function("bare service", |b| {
        b.iter_batched(
            request,
            |req| ready(bare.call(req)).unwrap(),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("through ShardRouterLayer", |b| {
        b.iter_batched(
            request,
            |req| ready(routed.call(req)).unwrap(),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn big_maps(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let mut group = c.benchmark_group("1M-pin map");
    group.sample_size(10);
    let texts: Vec<String> = (1..=2).map(|v| map_toml(v, 64, 1_000_000)).collect();
    group.bench_function("load (parse + validate + index)", |b| {
        b.iter(|| black_box(load(&texts[0])))
    });

    let router = ShardRouter::new(load(&texts[0])).unwrap();
    let mut version = 1;
    group.bench_function("apply to a live router", |b| {
        b.iter_batched(
            || {
                version += 1;
                load(&map_toml(version, 64, 1_000_000))
            },
            |map| router.apply(map).unwrap(),
            BatchSize::PerIteration,
        )
    });
    group.finish();

    // Lookups while maps are applied on another thread: the slowest lookup seen.
    let stop = Arc::new(AtomicBool::new(false));
    let applier = {
        let (router, stop) = (router.clone(), stop.clone());
        let maps: Vec<ShardMap> = (0..3)
            .map(|i| load(&map_toml(1_000 + i, 64, 1_000_000)))
            .collect();
        let handle = runtime.handle().clone();
        std::thread::spawn(move || {
            let _guard = handle.enter();
            let mut applied = 0;
            for map in maps {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                router.apply(map).unwrap();
                applied += 1;
            }
            applied
        })
    };
    let probe = TenantId::new("p0000001").unwrap();
    let (mut lookups, mut worst) = (0u64, Duration::ZERO);
    while !applier.is_finished() {
        let started = Instant::now();
        // The request path: a handle holds the table for the request's life.
        black_box(router.resolve(probe.clone()));
        worst = worst.max(started.elapsed());
        lookups += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let applied = applier.join().unwrap();
    println!(
        "lookups during {applied} applies of 1M-pin maps: {lookups} lookups, slowest {worst:?}"
    );
}

/// Checking out a connection from a warm pool, bare and through the handle
/// (resolve + checkout). Needs the local Postgres; skipped without it.
fn checkout(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let map =
        load("version = 1\n[shards.a]\nurl = \"postgres://postgres@127.0.0.1:5432/postgres\"\n");
    let router = ShardRouter::new(map).unwrap();
    let tenant = TenantId::new("acme").unwrap();
    if runtime
        .block_on(router.resolve(tenant.clone()).read())
        .is_err()
    {
        println!("checkout: skipped, no Postgres at 127.0.0.1:5432");
        return;
    }
    let table = router.table();
    let (_, pool) = table.shards().next().unwrap();
    let mut group = c.benchmark_group("checkout (warm pool)");
    group.bench_function("deadpool Pool::get", |b| {
        b.iter(|| runtime.block_on(async { black_box(pool.get().await.unwrap()) }))
    });
    group.bench_function("TenantDb::read (resolve + get)", |b| {
        b.iter(|| {
            runtime
                .block_on(async { black_box(router.resolve(tenant.clone()).read().await.unwrap()) })
        })
    });
    group.finish();
}

/// A one-row statement through the handle with per-tenant counting on and
/// off, same router settings, same connection: what the counting costs per
/// statement. Needs the local Postgres; skipped without it.
fn accounting(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let toml = "version = 1\n[shards.a]\nurl = \"postgres://postgres@127.0.0.1:5432/postgres\"\npool = { max_size = 1 }\n";
    let on = ShardRouter::new(load(toml)).unwrap();
    let off = ShardRouter::new(load(toml)).unwrap().with_top_tenants(0);
    let tenant = TenantId::new("acme").unwrap();
    if runtime.block_on(on.resolve(tenant.clone()).read()).is_err() {
        println!("accounting: skipped, no Postgres at 127.0.0.1:5432");
        return;
    }
    let mut group = c.benchmark_group("statement through the handle (SELECT $1::text)");
    for (name, router) in [("counting off", &off), ("counting on", &on)] {
        let db = router.resolve(tenant.clone());
        group.bench_function(name, |b| {
            b.iter(|| {
                runtime.block_on(async {
                    let client = db.read().await.unwrap();
                    black_box(client.query("SELECT $1::text", &[&"acme"]).await.unwrap())
                })
            })
        });
    }
    group.finish();
}

/// Resident memory of this process, from `/proc/self/statm` (Linux).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// A map of 1,000 shards: start-up time (load + `ShardRouter::new`), the
/// memory one router adds, and that start-up opens no connection.
fn thousand_shards(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let toml = map_toml(1, 1_000, 0);
    let mut group = c.benchmark_group("1,000-shard map");
    group.sample_size(20);
    group.bench_function("load + ShardRouter::new", |b| {
        b.iter(|| black_box(ShardRouter::new(load(&toml)).unwrap()))
    });
    group.finish();
    // Memory: ten routers kept alive at once, so allocator noise averages out.
    let before = resident_bytes();
    let routers: Vec<ShardRouter> = (0..10)
        .map(|_| ShardRouter::new(load(&toml)).unwrap())
        .collect();
    let after = resident_bytes();
    let connections: usize = routers[0]
        .table()
        .shards()
        .map(|(_, pool)| pool.status().size)
        .sum();
    if let (Some(before), Some(after)) = (before, after) {
        println!(
            "1,000-shard map: {:.1} MB resident per router, {} connections open after start-up",
            (after.saturating_sub(before)) as f64 / 10.0 / 1e6,
            connections
        );
    }
}

criterion_group!(
    benches,
    location,
    layer,
    checkout,
    accounting,
    big_maps,
    thousand_shards
);
criterion_main!(benches);
