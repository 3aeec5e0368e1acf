//! `ShardRouter::fan_out` against real Postgres: partial results, a per-shard
//! error, a deadline, and no tenant carried over from the pool.

mod common;

use std::time::{Duration, Instant};

use common::{Proxy, Shards, NOTES_SCHEMA};
use shard_router::map::MapLoader;
use shard_router::{FanOutError, ShardRouter, TenantId};

/// The tenant setting a connection handed to `db` carries.
async fn tenant_setting_seen(db: &shard_router::TenantDb) -> String {
    db.read()
        .await
        .unwrap()
        .query_one("SELECT current_setting('app.tenant_id')", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_fan_out_with_one_shard_down_and_one_slow_answers_the_rest_within_its_deadline() {
    let shards = Shards::create(3).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    let proxy = Proxy::start(5432).await;
    // a: one connection, last used by a tenant; b: slow; c: behind a cut proxy.
    let toml = format!(
        "version = 1\ntenant_setting = \"app.tenant_id\"\n\
         [shards.a]\nurl = \"{}\"\npool = {{ max_size = 1, wait_timeout_ms = 1000 }}\n\
         [shards.b]\nurl = \"{}\"\n\
         [shards.c]\nurl = \"{}\"\npool = {{ wait_timeout_ms = 1000, connect_timeout_ms = 1000 }}\n\
         [tenants]\nacme = \"a\"\n",
        shards.url(0),
        shards.url(1),
        proxy.url(&shards.names[2]),
    );
    let router = ShardRouter::new(MapLoader::without_env().load_str(&toml).unwrap()).unwrap();
    let acme = router.resolve(TenantId::new("acme").unwrap());
    let seen = tenant_setting_seen(&acme).await;
    assert_eq!(seen, "acme", "a's one connection now carries acme");
    proxy.cut();

    let started = Instant::now();
    let results = router
        .fan_out()
        .concurrency(3)
        .deadline(Duration::from_secs(1))
        .run(|client| async move {
            if client.shard() == "b" {
                client.execute("SELECT pg_sleep(30)", &[]).await?;
            }
            let row = client
                .query_one(
                    "SELECT coalesce(current_setting('app.tenant_id', true), '')",
                    &[],
                )
                .await?;
            Ok(row.get::<_, String>(0))
        })
        .await;
    let took = started.elapsed();
    let names: Vec<&str> = results.iter().map(|r| r.shard.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"], "map order");
    assert_eq!(
        results[0].result.as_ref().unwrap(),
        "",
        "the fan-out's connection carries no tenant"
    );
    assert!(
        matches!(results[1].result, Err(FanOutError::Deadline { .. })),
        "{:?}",
        results[1].result
    );
    let down = results[2].result.as_ref().unwrap_err();
    assert!(matches!(down, FanOutError::Unavailable { .. }), "{down:?}");
    assert!(down.to_string().contains("shard c unavailable"), "{down}");
    // Bounded by the deadline (1 s), not by the slow statement (30 s).
    assert!(took < Duration::from_secs(5), "took {took:?}");

    // The slow statement was cancelled, not left running on b.
    let admin = common::connect(&shards.url(1)).await;
    let db = shards.names[1].clone();
    let mut sleeping = 1i64;
    for _ in 0..200 {
        sleeping = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND query LIKE 'SELECT pg_sleep(30)%' AND state = 'active'",
                &[&db],
            )
            .await
            .unwrap()
            .get(0);
        if sleeping == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sleeping, 0, "the statement past the deadline was cancelled");

    // The shard comes back: the next fan-out reaches all three, and a's tenant
    // handle still gets its own setting.
    proxy.restore();
    let again = router
        .fan_out()
        .run(|client| async move {
            Ok(client
                .query_one("SELECT count(*) FROM notes", &[])
                .await?
                .get::<_, i64>(0))
        })
        .await;
    assert!(again.iter().all(|r| r.result.is_ok()), "{again:?}");
    let seen = tenant_setting_seen(&acme).await;
    assert_eq!(seen, "acme");
}

#[tokio::test]
async fn a_fan_out_runs_at_most_its_concurrency_at_once() {
    let shards = Shards::create(4).await;
    let router = ShardRouter::new(common::map(1, &shards, "")).unwrap();
    let in_flight = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let most = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let results = router
        .fan_out()
        .concurrency(2)
        .run(|client| {
            let (in_flight, most) = (in_flight.clone(), most.clone());
            async move {
                use std::sync::atomic::Ordering::SeqCst;
                let now = in_flight.fetch_add(1, SeqCst) + 1;
                most.fetch_max(now, SeqCst);
                client.execute("SELECT pg_sleep(0.1)", &[]).await?;
                in_flight.fetch_sub(1, SeqCst);
                Ok(())
            }
        })
        .await;
    assert_eq!(results.len(), 4);
    assert!(results.iter().all(|r| r.result.is_ok()), "{results:?}");
    assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// Issue 27.5: a job visits every tenant once, from the shard that serves it,
/// with a `TenantDb` and work that returns `DbError`. A stale copy left on a
/// shard the tenant moved away from is not visited; a failing tenant stops
/// its own shard's listing only.
#[tokio::test]
async fn each_tenant_visits_every_tenant_once_from_the_shard_that_serves_it() {
    let shards = Shards::create(2).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    // t1, t2 on a; t3, bad on b; t1 also has a stale row on b.
    let router = ShardRouter::new(common::map(
        1,
        &shards,
        "[tenants]\nt1 = \"a\"\nt2 = \"a\"\nt3 = \"b\"\nbad = \"b\"\n",
    ))
    .unwrap();
    let insert = "INSERT INTO notes (tenant_id, id, body) VALUES ($1, gen_random_uuid(), 'x')";
    for (shard, tenant) in [(0, "t1"), (0, "t2"), (1, "t3"), (1, "bad"), (1, "t1")] {
        common::connect(&shards.url(shard))
            .await
            .execute(insert, &[&tenant])
            .await
            .unwrap();
    }
    let visits = std::sync::Mutex::new(Vec::new());
    let results = router
        .fan_out()
        .each_tenant("SELECT DISTINCT tenant_id FROM notes ORDER BY 1", |db| {
            let visits = &visits;
            async move {
                visits
                    .lock()
                    .unwrap()
                    .push((db.tenant().to_string(), db.shard().to_owned()));
                let sql = if db.tenant().as_str() == "bad" {
                    "UPDATE no_such_table SET body = 'visited'"
                } else {
                    "UPDATE notes SET body = 'visited' WHERE tenant_id = $1"
                };
                let params: &[&(dyn shard_router::tokio_postgres::types::ToSql + Sync)] =
                    if db.tenant().as_str() == "bad" {
                        &[]
                    } else {
                        &[&db.tenant().as_str()]
                    };
                db.execute(sql, params).await?;
                Ok(())
            }
        })
        .await;
    let mut visits = visits.into_inner().unwrap();
    visits.sort();
    assert_eq!(
        visits,
        [("bad", "b"), ("t1", "a"), ("t2", "a")].map(|(t, s)| (t.to_owned(), s.to_owned())),
        "t1 once, from a; b stopped at bad (listed before t3)"
    );
    assert_eq!(results[0].shard, "a");
    assert_eq!(results[0].result.as_ref().unwrap(), &2);
    match &results[1].result {
        Err(FanOutError::Tenant {
            shard,
            tenant,
            cause,
            ..
        }) => {
            assert_eq!((shard.as_str(), tenant.as_str()), ("b", "bad"));
            assert_eq!(
                cause.kind(),
                shard_router::db::DbErrorKind::Other,
                "{cause}"
            );
        }
        other => panic!("{other:?}"),
    }
    let stale: String = common::connect(&shards.url(1))
        .await
        .query_one("SELECT body FROM notes WHERE tenant_id = 't1'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stale, "x", "the stale copy on b was not visited");
}
