//! Faults stay local, bad input changes nothing, no tenant leaks into another.
//! Each test prints the figures the README's reliability section quotes.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use axum::Router;
use common::{Proxy, Shards, NOTES_SCHEMA};
use proptest::prelude::*;
use shard_router::map::MapLoader;
use shard_router::tenant::HeaderExtractor;
use shard_router::{DbError, ShardRouter, ShardRouterLayer, TenantDb, TenantId};
use tower::ServiceExt;

/// Reads the tenant's notes, after sleeping `?sleep=` seconds in the database.
async fn handler(db: TenantDb, query: axum::extract::RawQuery) -> Result<String, DbError> {
    let sleep: f64 = query
        .0
        .and_then(|q| q.strip_prefix("sleep=").and_then(|s| s.parse().ok()))
        .unwrap_or(0.0);
    let client = db.read().await?;
    client
        .query_one(
            "SELECT count(*) FROM notes, pg_sleep($2) WHERE tenant_id = $1",
            &[&db.tenant().as_str(), &sleep],
        )
        .await?;
    Ok(db.shard().to_owned())
}

fn app(router: ShardRouter) -> Router {
    Router::new()
        .route("/notes", get(handler))
        .layer(ShardRouterLayer::new(router, HeaderExtractor::default()))
}

fn get_as(tenant: &str, query: &str) -> Request<Body> {
    Request::get(format!("/notes{query}"))
        .header("x-tenant-id", tenant)
        .body(Body::empty())
        .unwrap()
}

/// A tenant the map places on `shard`.
fn tenant_on(router: &ShardRouter, shard: &str, salt: &str) -> String {
    (0..10_000)
        .map(|i| format!("{salt}-{i}"))
        .find(|t| router.resolve(TenantId::new(t).unwrap()).shard() == shard)
        .unwrap()
}

#[derive(Default, Debug)]
struct Tally {
    tried: AtomicUsize,
    failed: AtomicUsize,
    slowest_failure_ms: AtomicUsize,
}

/// `workers` loops sending requests for `tenants` until `until`.
async fn load(
    app: Router,
    tenants: Vec<String>,
    until: Instant,
    tally: Arc<Tally>,
    query: &'static str,
) {
    let mut n = 0;
    while Instant::now() < until {
        let started = Instant::now();
        let response = app
            .clone()
            .oneshot(get_as(&tenants[n % tenants.len()], query))
            .await
            .unwrap();
        tally.tried.fetch_add(1, Ordering::Relaxed);
        if response.status() != StatusCode::OK {
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(response.headers()["retry-after"], "1");
            tally.failed.fetch_add(1, Ordering::Relaxed);
            tally
                .slowest_failure_ms
                .fetch_max(started.elapsed().as_millis() as usize, Ordering::Relaxed);
        }
        n += 1;
    }
}

fn two_shard_map(a: &str, b: &str, extra_pool: &str) -> shard_router::ShardMap {
    MapLoader::without_env()
        .load_str(&format!(
            "version = 1\n[shards.a]\nurl = \"{a}\"\npool = {{ max_size = 8, wait_timeout_ms = 300, connect_timeout_ms = 300 {extra_pool} }}\n\
             [shards.b]\nurl = \"{b}\"\npool = {{ max_size = 8, wait_timeout_ms = 300, connect_timeout_ms = 300 {extra_pool} }}\n"
        ))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_outage_fails_only_its_tenants_and_recovers_without_restart() {
    let shards = Shards::create(2).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    let proxy = Proxy::start(5432).await;
    let router = ShardRouter::new(two_shard_map(
        &shards.url(0),
        &proxy.url(&shards.names[1]),
        "",
    ))
    .unwrap();
    let on_a: Vec<String> = (0..4)
        .map(|i| tenant_on(&router, "a", &format!("a{i}")))
        .collect();
    let on_b: Vec<String> = (0..4)
        .map(|i| tenant_on(&router, "b", &format!("b{i}")))
        .collect();

    let mut report = Vec::new();
    for (phase, cut) in [("up", false), ("b down", true), ("b back", false)] {
        if cut {
            proxy.cut();
        } else {
            proxy.restore();
        }
        let (a, b) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
        let until = Instant::now() + Duration::from_millis(1500);
        let mut tasks = Vec::new();
        for _ in 0..3 {
            tasks.push(tokio::spawn(load(
                app(router.clone()),
                on_a.clone(),
                until,
                a.clone(),
                "",
            )));
            tasks.push(tokio::spawn(load(
                app(router.clone()),
                on_b.clone(),
                until,
                b.clone(),
                "",
            )));
        }
        for task in tasks {
            task.await.unwrap();
        }
        report.push((phase, a, b));
    }
    for (phase, a, b) in &report {
        println!(
            "outage [{phase}]: shard a {} tried, {} failed; shard b {} tried, {} failed (slowest 503: {} ms)",
            a.tried.load(Ordering::Relaxed),
            a.failed.load(Ordering::Relaxed),
            b.tried.load(Ordering::Relaxed),
            b.failed.load(Ordering::Relaxed),
            b.slowest_failure_ms.load(Ordering::Relaxed)
        );
    }
    let [(_, up_a, up_b), (_, down_a, down_b), (_, back_a, back_b)] = &report[..] else {
        panic!()
    };
    assert_eq!(
        up_a.failed.load(Ordering::Relaxed) + up_b.failed.load(Ordering::Relaxed),
        0
    );
    assert_eq!(
        down_a.failed.load(Ordering::Relaxed),
        0,
        "shard a's tenants keep full success"
    );
    assert!(down_a.tried.load(Ordering::Relaxed) > 50);
    assert_eq!(
        down_b.failed.load(Ordering::Relaxed),
        down_b.tried.load(Ordering::Relaxed),
        "every request of b's tenants fails while b is down"
    );
    assert!(
        down_b.slowest_failure_ms.load(Ordering::Relaxed) < 300 + 1000,
        "503 comes within the wait (300 ms) plus scheduling slack"
    );
    // Recovery: the first requests after the restore may still find dead
    // connections in the pool; then everything succeeds, with no restart.
    assert_eq!(back_a.failed.load(Ordering::Relaxed), 0);
    assert!(
        back_b.failed.load(Ordering::Relaxed) * 10 < back_b.tried.load(Ordering::Relaxed),
        "b recovered"
    );
    let last = app(router.clone())
        .oneshot(get_as(&on_b[0], ""))
        .await
        .unwrap();
    assert_eq!(last.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_shard_does_not_slow_the_other_shards_tenants() {
    let shards = Shards::create(2).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    let router = ShardRouter::new(two_shard_map(&shards.url(0), &shards.url(1), "")).unwrap();
    let on_a = tenant_on(&router, "a", "fast");
    let on_b = tenant_on(&router, "b", "slow");
    // Shard b answers in 250 ms and its pool (8) is saturated by 16 callers.
    let until = Instant::now() + Duration::from_millis(1500);
    let slow = Arc::new(Tally::default());
    let slow_tasks: Vec<_> = (0..16)
        .map(|_| {
            tokio::spawn(load(
                app(router.clone()),
                vec![on_b.clone()],
                until,
                slow.clone(),
                "?sleep=0.25",
            ))
        })
        .collect();
    let mut fast_latencies = Vec::new();
    while Instant::now() < until {
        let started = Instant::now();
        let response = app(router.clone())
            .oneshot(get_as(&on_a, ""))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        fast_latencies.push(started.elapsed());
    }
    for task in slow_tasks {
        task.await.unwrap();
    }
    fast_latencies.sort();
    let p99 = fast_latencies[fast_latencies.len() * 99 / 100];
    println!(
        "slow shard: {} requests to shard a while b took 250 ms per query: p99 {p99:?}, max {:?}; b: {} tried, {} got 503",
        fast_latencies.len(),
        fast_latencies.last().unwrap(),
        slow.tried.load(Ordering::Relaxed),
        slow.failed.load(Ordering::Relaxed)
    );
    assert!(fast_latencies.len() > 50);
    assert!(
        *fast_latencies.last().unwrap() < Duration::from_millis(250),
        "no request to a waited on b"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_exhaustion_is_bounded_and_a_tenant_cap_protects_neighbours() {
    let shards = Shards::create(1).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    let map = |cap: &str| {
        MapLoader::without_env()
            .load_str(&format!(
                "version = 1\n[shards.a]\nurl = \"{}\"\npool = {{ max_size = 4, wait_timeout_ms = 200 {cap} }}\n",
                shards.url(0)
            ))
            .unwrap()
    };
    let mut rates = Vec::new();
    for cap in ["", ", tenant_max_connections = 2"] {
        let router = ShardRouter::new(map(cap)).unwrap();
        // A hot tenant with 40 concurrent requests (10x the pool), each holding a
        // connection 100 ms; three quiet tenants with one request at a time.
        let until = Instant::now() + Duration::from_millis(1500);
        let (hot, quiet) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
        let mut tasks: Vec<_> = (0..40)
            .map(|_| {
                tokio::spawn(load(
                    app(router.clone()),
                    vec!["hot".into()],
                    until,
                    hot.clone(),
                    "?sleep=0.1",
                ))
            })
            .collect();
        for q in 0..3 {
            tasks.push(tokio::spawn(load(
                app(router.clone()),
                vec![format!("quiet-{q}")],
                until,
                quiet.clone(),
                "?sleep=0.01",
            )));
        }
        let all = futures_util::future::join_all(tasks);
        tokio::time::timeout(Duration::from_secs(10), all)
            .await
            .expect("nothing deadlocks");
        let rate = |t: &Tally| {
            1.0 - t.failed.load(Ordering::Relaxed) as f64
                / t.tried.load(Ordering::Relaxed).max(1) as f64
        };
        println!(
            "pool exhaustion (pool 4, wait 200 ms{cap}): hot {} tried, {} got 503 (slowest 503 {} ms); quiet tenants {} tried, {} got 503: success {:.1}%",
            hot.tried.load(Ordering::Relaxed),
            hot.failed.load(Ordering::Relaxed),
            hot.slowest_failure_ms.load(Ordering::Relaxed),
            quiet.tried.load(Ordering::Relaxed),
            quiet.failed.load(Ordering::Relaxed),
            rate(&quiet) * 100.0
        );
        assert!(
            hot.failed.load(Ordering::Relaxed) > 0,
            "excess requests get 503"
        );
        assert!(
            hot.slowest_failure_ms.load(Ordering::Relaxed) < 200 + 1000,
            "waits are bounded"
        );
        rates.push(rate(&quiet));
    }
    assert!(
        rates[0] < 0.9,
        "without a cap, the hot tenant starves its neighbours ({:.2})",
        rates[0]
    );
    assert!(
        rates[1] > 0.99,
        "with a cap, the neighbours are served ({:.2})",
        rates[1]
    );
}

#[tokio::test]
async fn with_row_level_security_a_recycled_connection_never_shows_another_tenant() {
    let shards = Shards::create(1).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    let role = format!("srt_app_{}", std::process::id());
    let admin = common::connect(&shards.url(0)).await;
    admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN;
             GRANT SELECT, INSERT, UPDATE, DELETE ON notes TO {role};
             ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
             CREATE POLICY tenant_isolation ON notes
               USING (tenant_id = current_setting('app.tenant_id', true))
               WITH CHECK (tenant_id = current_setting('app.tenant_id', true));"
        ))
        .await
        .unwrap();
    let url = shards.url(0).replace("postgres@", &format!("{role}@"));
    let router = ShardRouter::new(
        MapLoader::without_env()
            .load_str(&format!(
                "version = 1\ntenant_setting = \"app.tenant_id\"\n[shards.a]\nurl = \"{url}\"\npool = {{ max_size = 1 }}\n"
            ))
            .unwrap(),
    )
    .unwrap();
    for tenant in ["alice", "bob"] {
        let db = router.resolve(TenantId::new(tenant).unwrap());
        let mut w = db.write().await.unwrap();
        w.execute(
            "INSERT INTO notes (tenant_id, id, body) VALUES ($1, gen_random_uuid(), 'secret')",
            &[&tenant],
        )
        .await
        .unwrap();
        w.commit().await.unwrap();
    }
    // One connection in the pool: bob gets the one alice just used.
    let alice = router.resolve(TenantId::new("alice").unwrap());
    let pid_alice: i32 = alice
        .read()
        .await
        .unwrap()
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let bob = router.resolve(TenantId::new("bob").unwrap());
    let client = bob.read().await.unwrap();
    let pid_bob: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pid_alice, pid_bob, "the same connection, recycled");
    // A query that forgets its tenant filter still sees only its tenant.
    let rows = client
        .query("SELECT tenant_id FROM notes", &[])
        .await
        .unwrap();
    let seen: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(seen, ["bob"]);
    drop(client);
    // Writing another tenant's id is refused by the policy.
    let mut w = bob.write().await.unwrap();
    assert!(w
        .execute(
            "INSERT INTO notes (tenant_id, id, body) VALUES ('alice', gen_random_uuid(), 'forged')",
            &[]
        )
        .await
        .is_err());
    w.rollback().await.unwrap();
    drop(router);
    drop(bob);
    drop(alice);
    admin
        .batch_execute(&format!("DROP OWNED BY {role}; "))
        .await
        .unwrap();
    // The role goes once its connections are gone (the pool closed with the router).
    for _ in 0..50 {
        if admin
            .batch_execute(&format!("DROP ROLE IF EXISTS {role}"))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random bytes, huge values, look-alikes and SQL in the tenant header: a
    /// clear 400, never a panic, and the handler (so no query) never runs.
    #[test]
    fn hostile_tenant_headers_get_400_and_reach_no_handler(
        value in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            Just(vec![b'a'; 70_000]),
            Just("acme'; DROP TABLE notes; --".as_bytes().to_vec()),
            Just("\u{430}cme".as_bytes().to_vec()),
            Just("acme\u{200b}".as_bytes().to_vec()),
        ],
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let router = ShardRouter::new(
                MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://postgres@127.0.0.1:1/x\"").unwrap(),
            ).unwrap();
            let called = Arc::new(AtomicUsize::new(0));
            let c = called.clone();
            let app = Router::new()
                .route("/", get(move |_db: TenantDb| { c.fetch_add(1, Ordering::SeqCst); async { "ok" } }))
                .layer(ShardRouterLayer::new(router, HeaderExtractor::default()));
            let Ok(header) = http::HeaderValue::from_bytes(&value) else { return }; // not sendable at all
            let response = app.oneshot(Request::get("/").header("x-tenant-id", header).body(Body::empty()).unwrap()).await.unwrap();
            match TenantId::from_bytes(&value) {
                Ok(_) => assert_eq!(response.status(), StatusCode::OK),
                Err(_) => {
                    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
                    assert_eq!(called.load(Ordering::SeqCst), 0);
                }
            }
        });
    }
}
