//! `testing::TestShards`: the fixture users get for their own tests.
#![cfg(feature = "testing")]

use shard_router::migrate::Migrations;
use shard_router::testing::TestShards;
use shard_router::TenantId;

mod common;

#[tokio::test]
async fn test_shards_are_made_migrated_routed_to_and_dropped() {
    let shards = TestShards::create(2).await.unwrap();
    let names = shards.names().to_vec();
    shards
        .migrate(&Migrations::load("migrations/notes").unwrap())
        .await
        .unwrap();
    let router = shards.router("[tenants]\nacme = \"b\"\n").unwrap();
    let db = router.resolve(TenantId::new("acme").unwrap());
    assert_eq!(db.shard(), "b");
    db.execute(
        "INSERT INTO notes (tenant_id, id, body) VALUES ($1, gen_random_uuid(), 'hi')",
        &[&"acme"],
    )
    .await
    .unwrap();
    assert_eq!(common::notes_of(&shards.url(1), "acme").await, 1);
    assert_eq!(common::notes_of(&shards.url(0), "acme").await, 0);
    // A bad map (an unknown shard in a pin) is an error, not a panic.
    assert!(shards.router("[tenants]\nacme = \"z\"\n").is_err());
    drop(router);
    drop(db);
    drop(shards);
    let admin = common::connect(&common::db_url("postgres")).await;
    let left: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = ANY($1)",
            &[&names],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the databases are dropped with the fixture");
}
