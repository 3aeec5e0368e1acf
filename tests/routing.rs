//! The layer, the router and the handle against real Postgres.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::Router;
use common::{map, notes_of, shard_name, Shards, NOTES_SCHEMA};
use shard_router::map::MapLoader;
use shard_router::tenant::HeaderExtractor;
use shard_router::{ApplyError, DbError, ShardRouter, ShardRouterLayer, TenantDb, TenantId};
use tower::ServiceExt;
use uuid::Uuid;

/// Inserts one note for the request's tenant; answers the shard and map version.
async fn insert_note(db: TenantDb) -> Result<String, DbError> {
    let mut writer = db.write().await?;
    writer
        .execute(
            "INSERT INTO notes (tenant_id, id, body) VALUES ($1, $2, 'x')",
            &[&db.tenant().as_str(), &Uuid::new_v4()],
        )
        .await?;
    writer.commit().await?;
    Ok(format!("{} {}", db.shard(), db.map_version()))
}

fn notes_app(router: ShardRouter) -> Router {
    Router::new()
        .route("/notes", post(insert_note))
        .layer(ShardRouterLayer::new(router, HeaderExtractor::default()))
}

fn post_as(tenant: &str) -> Request<Body> {
    Request::post("/notes")
        .header("x-tenant-id", tenant)
        .body(Body::empty())
        .unwrap()
}

async fn body_text(response: axum::response::Response) -> String {
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn every_tenant_lands_on_its_located_shard_and_no_other() {
    let shards = Shards::create(3).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    let router = ShardRouter::new(map(1, &shards, "[tenants]\npinned = \"c\"\n")).unwrap();
    let app = notes_app(router.clone());

    let tenants: Vec<String> = (0..30)
        .map(|i| format!("tenant-{i}"))
        .chain(["pinned".to_owned()])
        .collect();
    for tenant in &tenants {
        let response = app.clone().oneshot(post_as(tenant)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{tenant}");
    }

    let mut used = std::collections::HashSet::new();
    for tenant in &tenants {
        let located = router.locate(&TenantId::new(tenant).unwrap()).shard.get();
        used.insert(located);
        for i in 0..3 {
            let expected = if i == located { 1 } else { 0 };
            assert_eq!(
                notes_of(&shards.url(i), tenant).await,
                expected,
                "{tenant} on shard {}",
                shard_name(i)
            );
        }
    }
    assert_eq!(used.len(), 3, "30 tenants should spread over all 3 shards");
    assert_eq!(
        router.locate(&TenantId::new("pinned").unwrap()).shard.get(),
        2
    );
}

#[tokio::test]
async fn a_map_swap_mid_request_keeps_each_request_on_one_version() {
    let shards = Shards::create(2).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    // v1: everyone on a. v2: everyone on b (a takes no new tenants).
    let toml = |version: u64, weight_a: u32, weight_b: u32| {
        MapLoader::without_env()
            .load_str(&format!(
                "version = {version}\n[shards.a]\nurl = \"{}\"\nweight = {weight_a}\n[shards.b]\nurl = \"{}\"\nweight = {weight_b}\n",
                shards.url(0),
                shards.url(1)
            ))
            .unwrap()
    };
    let router = ShardRouter::new(toml(1, 1, 0)).unwrap();

    // Each request writes twice; between the writes it waits until the map has been swapped.
    let halfway = Arc::new(tokio::sync::Barrier::new(9));
    let swapped = Arc::new(tokio::sync::Notify::new());
    let swapped_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    #[derive(Clone)]
    struct Gate {
        halfway: Arc<tokio::sync::Barrier>,
        swapped: Arc<tokio::sync::Notify>,
        swapped_flag: Arc<std::sync::atomic::AtomicBool>,
    }
    async fn two_writes(State(gate): State<Gate>, db: TenantDb) -> Result<String, DbError> {
        for step in 0..2 {
            let mut writer = db.write().await?;
            writer
                .execute(
                    "INSERT INTO notes (tenant_id, id, body) VALUES ($1, $2, $3)",
                    &[
                        &db.tenant().as_str(),
                        &Uuid::new_v4(),
                        &format!("step {step}"),
                    ],
                )
                .await?;
            writer.commit().await?;
            if step == 0 {
                gate.halfway.wait().await;
                while !gate.swapped_flag.load(Ordering::Acquire) {
                    gate.swapped.notified().await;
                }
            }
        }
        Ok(format!("{}", db.map_version()))
    }
    let gate = Gate {
        halfway: halfway.clone(),
        swapped: swapped.clone(),
        swapped_flag: swapped_flag.clone(),
    };
    let app = Router::new()
        .route("/notes", post(two_writes))
        .with_state(gate)
        .layer(ShardRouterLayer::new(
            router.clone(),
            HeaderExtractor::default(),
        ));

    let requests: Vec<_> = (0..8)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move { app.oneshot(post_as(&format!("mid-{i}"))).await.unwrap() })
        })
        .collect();
    halfway.wait().await; // every request has done its first write under v1
    router.apply(toml(2, 0, 1)).unwrap();
    swapped_flag.store(true, Ordering::Release);
    swapped.notify_waiters();

    for request in requests {
        let response = request.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            body_text(response).await,
            "1",
            "in-flight requests keep version 1"
        );
    }
    for i in 0..8 {
        let tenant = format!("mid-{i}");
        assert_eq!(
            notes_of(&shards.url(0), &tenant).await,
            2,
            "both writes of {tenant} on a"
        );
        assert_eq!(notes_of(&shards.url(1), &tenant).await, 0);
    }
    // After the swap, new requests use version 2 and shard b.
    let response = notes_app(router.clone())
        .oneshot(post_as("after"))
        .await
        .unwrap();
    assert_eq!(body_text(response).await, "b 2");
    assert_eq!(notes_of(&shards.url(1), "after").await, 1);
}

#[tokio::test]
async fn bad_tenant_ids_get_400_issue_no_query_and_change_nothing() {
    let shards = Shards::create(1).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    let router = ShardRouter::new(map(1, &shards, "")).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let app = Router::new()
        .route(
            "/notes",
            post(move |db: TenantDb| {
                counted.fetch_add(1, Ordering::SeqCst);
                insert_note(db)
            }),
        )
        .layer(ShardRouterLayer::new(
            router.clone(),
            HeaderExtractor::default(),
        ));

    let long = "a".repeat(65);
    let cases: Vec<(Request<Body>, &str)> = vec![
        (
            Request::post("/notes").body(Body::empty()).unwrap(),
            "missing_tenant",
        ),
        (post_as(""), "invalid_tenant"),
        (post_as(&long), "invalid_tenant"),
        (post_as("acme'; DROP TABLE notes; --"), "invalid_tenant"),
        (post_as("a b"), "invalid_tenant"),
        (
            Request::post("/notes")
                .header(
                    "x-tenant-id",
                    http::HeaderValue::from_bytes(b"ac\xffme").unwrap(),
                )
                .body(Body::empty())
                .unwrap(),
            "invalid_tenant",
        ),
        (
            Request::post("/notes")
                .header("x-tenant-id", "acme")
                .header("x-tenant-id", "globex")
                .body(Body::empty())
                .unwrap(),
            "invalid_tenant",
        ),
    ];
    for (request, code) in cases {
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(response.headers()["content-type"], "application/json");
        assert!(body_text(response).await.contains(code));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0, "no handler ran");
    let table = router.table();
    let (_, pool) = table.shards().next().unwrap();
    assert_eq!(pool.status().size, 0, "no connection was ever opened");
    let rows: i64 = common::connect(&shards.url(0))
        .await
        .query_one("SELECT count(*) FROM notes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);
    assert_eq!(router.version(), 1);
}

#[tokio::test]
async fn refused_maps_leave_the_router_on_its_map() {
    let shards = Shards::create(2).await;
    let router = ShardRouter::new(map(5, &shards, "")).unwrap();
    let before = router.table();

    // Invalid maps never become ShardMaps, so they cannot reach the router.
    let invalid = MapLoader::without_env().load_str(&common::map_toml(
        6,
        &shards,
        "[tenants]\nacme = \"nope\"\n",
    ));
    assert!(invalid
        .unwrap_err()
        .to_string()
        .contains("tenants.acme: pinned to unknown shard"));

    assert_eq!(
        router.apply(map(4, &shards, "")).unwrap_err(),
        ApplyError::Stale {
            current: 5,
            offered: 4
        }
    );
    assert_eq!(
        router
            .apply(map(5, &shards, "[tenants]\nacme = \"b\"\n"))
            .unwrap_err(),
        ApplyError::Conflict { version: 5 }
    );
    let after = router.table();
    assert!(Arc::ptr_eq(&before, &after), "the live table is untouched");
    assert_eq!(router.version(), 5);
}

#[tokio::test]
async fn a_down_shard_fails_only_its_tenants_with_503_in_time() {
    let shards = Shards::create(1).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    // Port 1 on loopback: nothing listens there, connections are refused.
    let toml = format!(
        "version = 1\n\
         [shards.up]\nurl = \"{}\"\n\
         [shards.down]\nurl = \"postgres://postgres@127.0.0.1:1/nothing\"\nweight = 0\n\
         pool = {{ wait_timeout_ms = 500, connect_timeout_ms = 500 }}\n\
         [tenants]\nunlucky = \"down\"\n",
        shards.url(0)
    );
    let router = ShardRouter::new(MapLoader::without_env().load_str(&toml).unwrap()).unwrap();
    let app = notes_app(router);

    let started = Instant::now();
    let response = app.clone().oneshot(post_as("unlucky")).await.unwrap();
    let waited = started.elapsed();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    assert!(body_text(response).await.contains("shard_unavailable"));
    assert!(
        waited < Duration::from_millis(500) + Duration::from_secs(2),
        "{waited:?}"
    );

    for i in 0..10 {
        let response = app
            .clone()
            .oneshot(post_as(&format!("lucky-{i}")))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
}

#[tokio::test]
async fn writers_roll_back_unless_committed() {
    let shards = Shards::create(1).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    let router = ShardRouter::new(map(1, &shards, "")).unwrap();
    let db = router.resolve(TenantId::new("acme").unwrap());
    let insert = "INSERT INTO notes (tenant_id, id, body) VALUES ($1, $2, 'x')";

    // Dropped without commit.
    let mut writer = db.write().await.unwrap();
    writer
        .execute(insert, &[&"acme", &Uuid::new_v4()])
        .await
        .unwrap();
    drop(writer);

    // Explicit rollback.
    let mut writer = db.write().await.unwrap();
    writer
        .execute(insert, &[&"acme", &Uuid::new_v4()])
        .await
        .unwrap();
    writer.rollback().await.unwrap();

    // A failed statement makes commit refuse, even if the caller ignores the error.
    let mut writer = db.write().await.unwrap();
    writer
        .execute(insert, &[&"acme", &Uuid::new_v4()])
        .await
        .unwrap();
    assert!(writer
        .execute("INSERT INTO no_such_table VALUES (1)", &[])
        .await
        .is_err());
    let err = writer.commit().await.unwrap_err();
    assert!(matches!(err, DbError::Aborted { .. }), "{err}");
    assert!(err.to_string().contains("tenant acme"), "{err}");

    // The pool's connections are clean: a new writer commits normally.
    let mut writer = db.write().await.unwrap();
    writer
        .execute(insert, &[&"acme", &Uuid::new_v4()])
        .await
        .unwrap();
    writer.commit().await.unwrap();
    // The dropped writer's rollback runs in the background; wait for it through the pool.
    let client = db.read().await.unwrap();
    let mut count: i64 = 0;
    for _ in 0..100 {
        count = client
            .query_one("SELECT count(*) FROM notes WHERE tenant_id = 'acme'", &[])
            .await
            .unwrap()
            .get(0);
        let open: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND state LIKE 'idle in transaction%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if open == 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(count, 1, "only the committed note exists");
}

#[tokio::test]
async fn a_move_entry_written_by_hand_reads_by_phase_and_refuses_writes_clearly() {
    let shards = Shards::create(2).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    let moving = |version: u64, phase: &str| {
        map(
            version,
            &shards,
            &format!("[moves.globex]\nfrom = \"a\"\nto = \"b\"\nphase = \"{phase}\"\n"),
        )
    };
    let router = ShardRouter::new(moving(1, "dual_write")).unwrap();
    let tenant = TenantId::new("globex").unwrap();
    let db = router.resolve(tenant.clone());
    assert_eq!(db.shard(), "a", "dual_write reads from the source");
    // The shards were never prepared by a mover: the write fails, naming why,
    // and nothing is written on either shard.
    let mut writer = db.write().await.unwrap();
    writer
        .execute(
            "INSERT INTO notes (tenant_id, id, body) VALUES ($1, $2, 'both')",
            &[&"globex", &Uuid::new_v4()],
        )
        .await
        .unwrap();
    let err = writer.commit().await.unwrap_err();
    assert!(
        matches!(err, shard_router::DbError::MoveNotPrepared { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("shardctl tenant move"), "{err}");
    assert_eq!(notes_of(&shards.url(0), "globex").await, 0);
    assert_eq!(notes_of(&shards.url(1), "globex").await, 0);

    router.apply(moving(2, "reversed")).unwrap();
    assert_eq!(
        router.resolve(tenant).shard(),
        "b",
        "reversed reads from the target"
    );
}

#[tokio::test]
async fn applying_a_map_keeps_unchanged_pools_and_serves_new_shards() {
    let shards = Shards::create(2).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    let only_a = MapLoader::without_env()
        .load_str(&format!(
            "version = 1\n[shards.a]\nurl = \"{}\"\npool = {{ max_size = 8, wait_timeout_ms = 1000 }}\n",
            shards.url(0)
        ))
        .unwrap();
    let router = ShardRouter::new(only_a).unwrap();
    let app = notes_app(router.clone());
    assert_eq!(
        app.clone().oneshot(post_as("warm")).await.unwrap().status(),
        StatusCode::OK
    );
    let pool_a_before = router.table().shards().next().unwrap().1.clone();

    let applied = router
        .apply(map(2, &shards, "[tenants]\nnewcomer = \"b\"\n"))
        .unwrap();
    assert!(matches!(
        applied,
        shard_router::Applied::Swapped {
            pools_kept: 1,
            pools_built: 1,
            pools_dropped: 0,
            ..
        }
    ));
    let table = router.table();
    let pool_a_after = table.shards().next().unwrap().1;
    assert_eq!(pool_a_after.status().size, pool_a_before.status().size);
    assert!(pool_a_after.status().size >= 1, "the warm pool was kept");

    assert_eq!(
        app.oneshot(post_as("newcomer")).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(notes_of(&shards.url(1), "newcomer").await, 1);
}

/// Version 1 over `shards` with a pool of one connection per shard.
fn one_connection(shards: &Shards) -> shard_router::ShardMap {
    MapLoader::without_env()
        .load_str(&common::map_toml(1, shards, "").replace("max_size = 8", "max_size = 1"))
        .unwrap()
}

/// The statements a connection holds prepared (named, from the extended protocol).
async fn prepared_on(client: &shard_router::TenantClient, sql: &str) -> i64 {
    client
        .raw()
        .query_one(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement = $1",
            &[&sql],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn reads_and_writes_prepare_each_statement_once_per_connection() {
    let shards = Shards::create(1).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    // One connection: every call below shares it.
    let router = ShardRouter::new(one_connection(&shards)).unwrap();
    let db = router.resolve(TenantId::new("acme").unwrap());
    const INSERT: &str = "INSERT INTO notes (tenant_id, id, body) VALUES ($1, $2, 'x')";
    const COUNT: &str = "SELECT count(*) FROM notes WHERE tenant_id = $1";
    for _ in 0..3 {
        assert_eq!(
            db.execute(INSERT, &[&"acme", &Uuid::new_v4()])
                .await
                .unwrap(),
            1
        );
        let mut writer = db.write().await.unwrap();
        writer
            .execute(INSERT, &[&"acme", &Uuid::new_v4()])
            .await
            .unwrap();
        writer.commit().await.unwrap();
        let client = db.read().await.unwrap();
        client.query_one(COUNT, &[&"acme"]).await.unwrap();
        client.query(COUNT, &[&"acme"]).await.unwrap();
    }
    let client = db.read().await.unwrap();
    let count: i64 = client.query_one(COUNT, &[&"acme"]).await.unwrap().get(0);
    assert_eq!(count, 6, "every write committed");
    // Prepared once each, then reused: a second Parse would have left a
    // second named statement behind.
    assert_eq!(prepared_on(&client, INSERT).await, 1);
    assert_eq!(prepared_on(&client, COUNT).await, 1);
    // One helper serves a read client and a writer alike.
    async fn notes_count(q: &mut impl shard_router::TenantQuery) -> i64 {
        q.query_one(
            "SELECT count(*) FROM notes WHERE tenant_id = $1",
            &[&"acme"],
        )
        .await
        .unwrap()
        .get(0)
    }
    drop(client);
    let mut writer = db.write().await.unwrap();
    writer
        .execute(INSERT, &[&"acme", &Uuid::new_v4()])
        .await
        .unwrap();
    assert_eq!(
        notes_count(&mut writer).await,
        7,
        "the writer sees its own insert"
    );
    writer.rollback().await.unwrap();
    let mut client = db.read().await.unwrap();
    assert_eq!(notes_count(&mut client).await, 6, "rolled back");
    // raw() is the uncached way: nothing is left prepared for it.
    const DYNAMIC: &str = "SELECT count(*) FROM notes WHERE tenant_id = $1 AND body = 'x'";
    client.raw().query(DYNAMIC, &[&"acme"]).await.unwrap();
    assert_eq!(prepared_on(&client, DYNAMIC).await, 0);
}

#[tokio::test]
async fn a_one_round_trip_write_that_fails_commits_nothing_and_leaves_a_clean_connection() {
    let shards = Shards::create(1).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    let router = ShardRouter::new(one_connection(&shards)).unwrap();
    let db = router.resolve(TenantId::new("acme").unwrap());
    let id = Uuid::new_v4();
    let insert = "INSERT INTO notes (tenant_id, id, body) VALUES ($1, $2, 'x') RETURNING id";
    let rows = db.execute_returning(insert, &[&"acme", &id]).await.unwrap();
    assert_eq!(rows[0].get::<_, Uuid>(0), id);
    // The same id again: the statement fails, the COMMIT sent with it rolls back.
    let err = db
        .execute_returning(insert, &[&"acme", &id])
        .await
        .unwrap_err();
    // The message says where; the driver's words come once, through source().
    let message = err.to_string();
    assert!(
        message.contains("shard a") && message.contains("tenant acme"),
        "{message}"
    );
    assert!(!message.contains("duplicate key"), "{message}");
    let source = std::error::Error::source(&err).expect("the driver's error");
    assert!(
        source.is::<shard_router::tokio_postgres::Error>(),
        "{source:?}"
    );
    let report = err.report().to_string();
    assert!(
        report.starts_with(&message) && report.contains("duplicate key"),
        "{report}"
    );
    assert!(!err.is_unavailable());
    assert_eq!(err.kind(), shard_router::DbErrorKind::UniqueViolation);
    assert_eq!(err.sqlstate().map(|s| s.code()), Some("23505"));
    let none = db
        .read()
        .await
        .unwrap()
        .query_one(
            "SELECT id FROM notes WHERE tenant_id = $1 AND false",
            &[&"acme"],
        )
        .await
        .unwrap_err();
    assert_eq!(none.kind(), shard_router::DbErrorKind::RowCount);
    // The one connection is back in the pool with no transaction open.
    let client = db.read().await.unwrap();
    // SAVEPOINT is refused outside a transaction block.
    let savepoint = client.raw().batch_execute("SAVEPOINT probe").await;
    assert!(savepoint.is_err(), "a transaction was left open");
    drop(client);
    assert_eq!(notes_of(&shards.url(0), "acme").await, 1);
    // A writer whose BEGIN waits for its first statement: nothing was begun if
    // it is dropped before one, and commit with no statement is a no-op.
    let writer = db.write().await.unwrap();
    writer.commit().await.unwrap();
    drop(db.write().await.unwrap());
    assert_eq!(
        db.execute(insert, &[&"acme", &Uuid::new_v4()])
            .await
            .unwrap(),
        1
    );
    assert_eq!(notes_of(&shards.url(0), "acme").await, 2);
}

#[tokio::test]
async fn a_snapshot_reads_one_state_refuses_writes_and_leaves_a_clean_connection() {
    let shards = Shards::create(1).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    let router = ShardRouter::new(one_connection(&shards)).unwrap();
    let db = router.resolve(TenantId::new("acme").unwrap());
    const INSERT: &str = "INSERT INTO notes (tenant_id, id, body) VALUES ($1, $2, 'x')";
    const COUNT: &str = "SELECT count(*) FROM notes WHERE tenant_id = $1";
    db.execute(INSERT, &[&"acme", &Uuid::new_v4()])
        .await
        .unwrap();
    // Another session writes between the snapshot's two reads.
    let other = common::connect(&shards.url(0)).await;
    let mut snap = db.snapshot().await.unwrap();
    let before: i64 = snap.query_one(COUNT, &[&"acme"]).await.unwrap().get(0);
    other
        .execute(INSERT, &[&"acme", &Uuid::new_v4()])
        .await
        .unwrap();
    let after: i64 = snap.query_one(COUNT, &[&"acme"]).await.unwrap().get(0);
    assert_eq!((before, after), (1, 1), "both reads see the snapshot");
    let levels = snap
        .query_one(
            "SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(levels.get::<_, String>(0), "repeatable read");
    assert_eq!(levels.get::<_, String>(1), "on");
    // A write is refused by the server, and nothing changes.
    let err = snap
        .execute(INSERT, &[&"acme", &Uuid::new_v4()])
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate().map(|s| s.code()), Some("25006"), "{err}");
    snap.finish().await.unwrap();
    // The pool's one connection is back with no transaction open, and sees
    // the other session's write.
    let client = db.read().await.unwrap();
    let now: i64 = client.query_one(COUNT, &[&"acme"]).await.unwrap().get(0);
    assert_eq!(now, 2, "the refused write left nothing");
    let status: String = client
        .raw()
        .query_one("SELECT current_setting('transaction_isolation')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        status, "read committed",
        "no snapshot left on the connection"
    );
    drop(client);
    // Dropped without finish: the connection still comes back clean.
    let mut snap = db.snapshot().await.unwrap();
    snap.query(COUNT, &[&"acme"]).await.unwrap();
    drop(snap);
    let client = db.read().await.unwrap();
    let status: String = client
        .raw()
        .query_one("SELECT current_setting('transaction_isolation')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "read committed", "the dropped snapshot ended");
    // A helper written against TenantQuery serves a snapshot too.
    async fn count(q: &mut impl shard_router::TenantQuery) -> i64 {
        q.query_one(COUNT, &[&"acme"]).await.unwrap().get(0)
    }
    drop(client);
    assert_eq!(count(&mut db.snapshot().await.unwrap()).await, 2);
}

#[tokio::test]
async fn tenant_case_lower_makes_every_spelling_one_tenant_and_exact_keeps_them_apart() {
    let shards = Shards::create(2).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    let lower = MapLoader::without_env()
        .load_str(&format!(
            "tenant_case = \"lower\"\n{}",
            common::map_toml(1, &shards, "")
        ))
        .unwrap();
    let router = ShardRouter::new(lower).unwrap();
    let app = notes_app(router.clone());
    for spelling in ["ACME", "Acme", "acme"] {
        let response = app.clone().oneshot(post_as(spelling)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{spelling}");
    }
    // One tenant, `acme`, on one shard; the handle handed the lowercased id to SQL.
    let db = router.resolve(TenantId::new("ACME").unwrap());
    assert_eq!(db.tenant().as_str(), "acme");
    let home = router.locate(&TenantId::new("acme").unwrap()).shard.get() as usize;
    assert_eq!(notes_of(&shards.url(home), "acme").await, 3);
    assert_eq!(notes_of(&shards.url(1 - home), "acme").await, 0);
    for upper in ["ACME", "Acme"] {
        assert_eq!(notes_of(&shards.url(0), upper).await, 0);
        assert_eq!(notes_of(&shards.url(1), upper).await, 0);
    }

    // The default, `exact`: two spellings are two tenants, each on its own
    // ring position, and the handle keeps the id as sent.
    let exact = ShardRouter::new(map(1, &shards, "")).unwrap();
    let db = exact.resolve(TenantId::new("ACME").unwrap());
    assert_eq!(db.tenant().as_str(), "ACME");
    let response = notes_app(exact.clone())
        .oneshot(post_as("ACME"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let home = exact.locate(&TenantId::new("ACME").unwrap()).shard.get() as usize;
    assert_eq!(notes_of(&shards.url(home), "ACME").await, 1);
}

/// Backends the router holds open on database `db`.
async fn router_connections(admin: &tokio_postgres::Client, db: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'shard-router'",
            &[&db],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn untouched_shards_get_no_connections_and_idle_ones_are_closed() {
    let shards = Shards::create(3).await;
    let toml = common::map_toml(1, &shards, "").replace(
        "pool = { max_size = 8, wait_timeout_ms = 1000 }",
        "pool = { max_size = 8, wait_timeout_ms = 1000, idle_timeout_ms = 1000 }",
    );
    let router = ShardRouter::new(MapLoader::without_env().load_str(&toml).unwrap()).unwrap();
    let admin = common::connect(&common::db_url("postgres")).await;
    for name in &shards.names {
        assert_eq!(router_connections(&admin, name).await, 0, "lazy: {name}");
    }
    // Two connections on one shard, held at once, then returned.
    let tenant = (0..)
        .map(|i| TenantId::new(&format!("t{i}")).unwrap())
        .find(|t| router.locate(t).shard.get() == 0)
        .unwrap();
    let db = router.resolve(tenant);
    let (one, two) = (db.read().await.unwrap(), db.read().await.unwrap());
    drop((one, two));
    assert_eq!(router_connections(&admin, &shards.names[0]).await, 2);
    for name in &shards.names[1..] {
        assert_eq!(
            router_connections(&admin, name).await,
            0,
            "untouched: {name}"
        );
    }
    // Unused for a second: closed, within a few checks (every 250 ms here).
    let mut left = 2;
    for _ in 0..100 {
        left = router_connections(&admin, &shards.names[0]).await;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(left, 0, "idle connections closed");
    let table = router.table();
    let first = table.map().shard_index(&common::shard_name(0)).unwrap();
    assert_eq!(table.pool(first).status().size, 0);
    // The pool opens new ones on demand.
    db.read()
        .await
        .unwrap()
        .query_one("SELECT 1", &[])
        .await
        .unwrap();
}

#[tokio::test]
async fn router_connections_run_read_committed_whatever_the_database_default() {
    let shards = Shards::create(1).await;
    common::connect(&shards.url(0))
        .await
        .batch_execute(&format!(
            "ALTER DATABASE {} SET default_transaction_isolation = 'repeatable read'",
            shards.names[0]
        ))
        .await
        .unwrap();
    let plain = common::connect(&shards.url(0)).await;
    let default: String = plain
        .query_one("SHOW transaction_isolation", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(default, "repeatable read", "the database's default");
    // One-statement writes go out alone; the fence trigger must see a fence
    // raised after their snapshot, which only READ COMMITTED gives.
    let router = ShardRouter::new(map(1, &shards, "")).unwrap();
    let db = router.resolve(TenantId::new("acme").unwrap());
    let level: String = db
        .read()
        .await
        .unwrap()
        .query_one("SHOW transaction_isolation", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(level, "read committed");
}

#[tokio::test]
async fn the_handle_counts_each_tenants_statements_and_ranks_the_hot_one_first() {
    let shards = Shards::create(1).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    let router = ShardRouter::new(map(1, &shards, ""))
        .unwrap()
        .with_top_tenants(10);
    let count = "SELECT count(*) FROM notes WHERE tenant_id = $1";
    let insert = "INSERT INTO notes (tenant_id, id, body) VALUES ($1, $2, 'x')";
    // Known shape: "hot" sends 10x the statements of each of five others.
    let mut sent = std::collections::HashMap::new();
    for (tenant, rounds) in [
        ("hot", 100),
        ("a1", 10),
        ("a2", 10),
        ("a3", 10),
        ("a4", 10),
        ("a5", 10),
    ] {
        let db = router.resolve(TenantId::new(tenant).unwrap());
        for _ in 0..rounds {
            db.execute(insert, &[&tenant, &Uuid::new_v4()])
                .await
                .unwrap();
            db.read()
                .await
                .unwrap()
                .query_one(count, &[&tenant])
                .await
                .unwrap();
        }
        sent.insert(tenant, 2 * rounds as u64);
    }
    // A failing statement is an error of its tenant.
    let db = router.resolve(TenantId::new("a1").unwrap());
    let failed = db
        .read()
        .await
        .unwrap()
        .query("SELECT nope FROM notes", &[])
        .await;
    assert!(failed.is_err());
    let load = router.tenant_load();
    assert_eq!(load.len(), 1);
    let top = &load[0].tenants;
    assert_eq!(top.len(), 6);
    assert_eq!(top[0].tenant, "hot", "{top:?}");
    // Six tenants in a table of up to 20 entries: nothing was dropped, so the
    // counts are exact and nothing is overstated.
    assert_eq!(top[0].statements, sent["hot"]);
    assert_eq!(top[0].rows, 200, "100 inserted + 100 counted");
    assert_eq!((top[0].errors, top[0].overstated_by_us), (0, 0));
    assert!(top[0].db_time_us > 0);
    // Connections are held at least while their statements run.
    assert!(top[0].hold_time_us >= top[0].db_time_us, "{:?}", top[0]);
    let a1 = top.iter().find(|t| t.tenant == "a1").unwrap();
    assert_eq!((a1.statements, a1.errors), (sent["a1"] + 1, 1));
    // Checkouts count their wait (not statements) and the hot tenant's share
    // of statements is what was sent: 200 of 300 (plus a1's failure).
    let statements: u64 = top.iter().map(|t| t.statements).sum();
    assert_eq!(statements, 301);
}

/// A sample: metric name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// Checks that `text` is Prometheus text exposition: `# HELP` / `# TYPE`
/// lines and samples `name{label="value",...} number`. Returns the samples.
fn prometheus_samples(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            assert!(
                rest.starts_with("HELP ") || rest.starts_with("TYPE "),
                "{line}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
        let (name, labels) = match series.split_once('{') {
            None => (series, Vec::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("{line}"));
                let labels = body
                    .split("\",")
                    .map(|pair| {
                        let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("{line}"));
                        (k.to_owned(), v.trim_end_matches('"').to_owned())
                    })
                    .collect();
                (name, labels)
            }
        };
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        samples.push((name.to_owned(), labels, value));
    }
    samples
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_stay_bounded_under_100000_tenants() {
    let shards = Shards::create(2).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    let moving = "[moves.globex]\nfrom = \"a\"\nto = \"b\"\n";
    let router = ShardRouter::new(map(1, &shards, moving)).unwrap();
    // 100,000 distinct tenants check out a connection (each counted), and a
    // hot one runs statements.
    for i in 0..100_000 {
        let db = router.resolve(TenantId::new(&format!("tenant-{i}")).unwrap());
        drop(db.read().await.unwrap());
    }
    let hot = router.resolve(TenantId::new("hot").unwrap());
    for _ in 0..20 {
        hot.read()
            .await
            .unwrap()
            .query_one("SELECT count(*) FROM notes WHERE tenant_id = $1", &[&"hot"])
            .await
            .unwrap();
    }
    let text = router.metrics(10);
    let samples = prometheus_samples(&text);
    let with_tenant = samples
        .iter()
        .filter(|(name, labels, _)| {
            name.starts_with("shard_router_tenant_") && labels.iter().any(|(k, _)| k == "tenant")
        })
        .count();
    // Two tenant families, at most 10 tenants per shard each.
    assert!(with_tenant <= 2 * 10 * 2, "{with_tenant} tenant series");
    assert!(samples.len() < 150, "{} series", samples.len());
    let checkouts: f64 = samples
        .iter()
        .filter(|(name, labels, _)| {
            name == "shard_router_checkouts_total" && labels.iter().any(|(_, v)| v == "ok")
        })
        .map(|(_, _, v)| v)
        .sum();
    assert_eq!(checkouts, 100_020.0);
    let hot_statements = samples.iter().find(|(name, labels, _)| {
        name == "shard_router_tenant_statements_total"
            && labels.iter().any(|(k, v)| k == "tenant" && v == "hot")
    });
    assert_eq!(hot_statements.map(|s| s.2), Some(20.0), "{text}");
    assert!(
        text.contains(
            "shard_router_move_in_flight{tenant=\"globex\",from=\"a\",to=\"b\",phase=\"dual_write\"} 1"
        ),
        "{text}"
    );
    // The per-tenant tables stay bounded too (2K entries at most, K = 1,000).
    for shard in router.tenant_load() {
        assert!(shard.tenants.len() <= 1000);
    }
}

/// Issue 26.3: a router refuses connections to a database whose
/// `shard_router_identity` names another shard (a URL re-pointed by hand, or
/// a map file whose names disagree with the identities): requests fail as
/// the shard being unavailable, naming both shards, and nothing is read or
/// written there. The shard it belongs to connects as before.
#[tokio::test]
async fn a_router_refuses_a_database_whose_identity_names_another_shard() {
    let shards = Shards::create(2).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    common::connect(&shards.url(0))
        .await
        .batch_execute(
            "CREATE TABLE shard_router_identity (singleton boolean PRIMARY KEY DEFAULT true, \
             shard text NOT NULL, id uuid NOT NULL DEFAULT gen_random_uuid()); \
             INSERT INTO shard_router_identity (shard) VALUES ('b')",
        )
        .await
        .unwrap();
    // Shard a's url points at the database that is shard b.
    let swapped = format!(
        "version = 1\n[shards.a]\nurl = \"{}\"\n[shards.b]\nurl = \"{}\"\n[tenants]\nacme = \"a\"\nglobex = \"b\"\n",
        shards.url(1),
        shards.url(0)
    );
    let router = ShardRouter::new(MapLoader::without_env().load_str(&swapped).unwrap()).unwrap();
    let acme = router.resolve(TenantId::new("acme").unwrap());
    let globex = router.resolve(TenantId::new("globex").unwrap());
    // Shard b's url leads to the database that says b: it works.
    globex
        .execute(
            "INSERT INTO notes (tenant_id, id, body) VALUES ($1, $2, 'ok')",
            &[&"globex", &Uuid::new_v4()],
        )
        .await
        .unwrap();
    // Shard a's url is the database without an identity: it works too.
    acme.read().await.unwrap();

    let wrong = format!(
        "version = 1\n[shards.a]\nurl = \"{}\"\n[shards.b]\nurl = \"{}\"\n[tenants]\nacme = \"a\"\n",
        shards.url(0),
        shards.url(1)
    );
    let router = ShardRouter::new(MapLoader::without_env().load_str(&wrong).unwrap()).unwrap();
    let acme = router.resolve(TenantId::new("acme").unwrap());
    let err = acme
        .execute(
            "INSERT INTO notes (tenant_id, id, body) VALUES ($1, $2, 'wrong')",
            &[&"acme", &Uuid::new_v4()],
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), shard_router::DbErrorKind::Unavailable, "{err}");
    let text = format!("{err} {}", err.report());
    assert!(text.contains("shard_router_identity"), "{text}");
    assert_eq!(notes_of(&shards.url(0), "acme").await, 0, "nothing written");
}
