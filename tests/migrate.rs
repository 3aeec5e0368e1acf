//! `shard_router::migrate` and `shardctl migrate` against real Postgres.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{connect, Shards};
use shard_router::map::MapLoader;
use shard_router::migrate::{self, FolderError, Migrations, ShardError, HISTORY_TABLE};
use shard_router::ShardMap;

const V1: (&str, &str) = (
    "V1__counter.sql",
    "CREATE TABLE counter (file int NOT NULL);\nINSERT INTO counter VALUES (1);",
);
const V2: (&str, &str) = (
    "V2__second.sql",
    "CREATE TABLE second (id int);\nINSERT INTO counter VALUES (2);",
);
const V3: (&str, &str) = (
    "V3__third.sql",
    "SELECT pg_sleep(0.1);\nCREATE TABLE third (id int);\nINSERT INTO counter VALUES (3);",
);

/// A fresh migrations folder holding `files`.
fn folder(files: &[(&str, &str)]) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "sr-migrate-it-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, sql) in files {
        std::fs::write(dir.join(name), sql).unwrap();
    }
    dir
}

fn only(shards: &Shards, i: usize) -> ShardMap {
    MapLoader::without_env()
        .load_str(&format!(
            "version = 1\n[shards.s]\nurl = \"{}\"\n",
            shards.url(i)
        ))
        .unwrap()
}

/// The versions in the shard's history, and the rows of `counter` (which file inserted each).
async fn state(url: &str) -> (Vec<i32>, Vec<i32>) {
    let client = connect(url).await;
    let has_history: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&HISTORY_TABLE])
        .await
        .unwrap()
        .get(0);
    if !has_history {
        return (vec![], vec![]);
    }
    let versions = client
        .query(
            &format!("SELECT version FROM {HISTORY_TABLE} ORDER BY version"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let counter = client
        .query("SELECT file FROM counter ORDER BY file", &[])
        .await
        .map(|rows| rows.iter().map(|r| r.get(0)).collect())
        .unwrap_or_default();
    (versions, counter)
}

#[tokio::test]
async fn shards_at_different_versions_end_at_the_same_and_a_rerun_is_a_no_op() {
    let shards = Shards::create(3).await;
    // a at V1, b at V2, c at nothing.
    let upto1 = Migrations::load(folder(&[V1])).unwrap();
    let upto2 = Migrations::load(folder(&[V1, V2])).unwrap();
    assert!(
        migrate::migrate(&only(&shards, 0), &upto1, |_, _| {}).await[0]
            .outcome
            .is_ok()
    );
    assert!(
        migrate::migrate(&only(&shards, 1), &upto2, |_, _| {}).await[0]
            .outcome
            .is_ok()
    );

    let all = Migrations::load(folder(&[V1, V2, V3])).unwrap();
    let map = common::map(1, &shards, "");
    let before: Vec<_> = migrate::status(&map, &all)
        .await
        .into_iter()
        .map(|(_, s)| s.unwrap().version)
        .collect();
    assert_eq!(before, [1, 2, 0]);

    let mut progress = Vec::new();
    let reports = migrate::migrate(&map, &all, |shard, file| {
        progress.push(format!("{shard}:{}", file.version))
    })
    .await;
    let applied: Vec<_> = reports.iter().map(|r| r.applied.clone()).collect();
    assert_eq!(applied, [vec![2, 3], vec![3], vec![1, 2, 3]]);
    assert_eq!(progress, ["a:2", "a:3", "b:3", "c:1", "c:2", "c:3"]);
    for (i, report) in reports.iter().enumerate() {
        assert_eq!(report.outcome.as_ref().unwrap(), &3);
        assert_eq!(state(&shards.url(i)).await, (vec![1, 2, 3], vec![1, 2, 3]));
    }

    let again = migrate::migrate(&map, &all, |_, _| panic!("nothing should run")).await;
    assert!(again
        .iter()
        .all(|r| r.applied.is_empty() && matches!(r.outcome, Ok(3))));
    for i in 0..3 {
        assert_eq!(state(&shards.url(i)).await, (vec![1, 2, 3], vec![1, 2, 3]));
    }
}

#[tokio::test]
async fn two_concurrent_runs_apply_each_file_once_per_shard() {
    let shards = Shards::create(3).await;
    let map = common::map(1, &shards, "");
    let all = Migrations::load(folder(&[V1, V2, V3])).unwrap();
    let (first, second) = tokio::join!(
        migrate::migrate(&map, &all, |_, _| {}),
        migrate::migrate(&map, &all, |_, _| {}),
    );
    for i in 0..3 {
        assert!(matches!(first[i].outcome, Ok(3)), "{:?}", first[i].outcome);
        assert!(
            matches!(second[i].outcome, Ok(3)),
            "{:?}",
            second[i].outcome
        );
        let mut applied = first[i].applied.clone();
        applied.extend(&second[i].applied);
        applied.sort();
        assert_eq!(applied, [1, 2, 3], "each file applied by exactly one run");
        assert_eq!(state(&shards.url(i)).await, (vec![1, 2, 3], vec![1, 2, 3]));
    }
}

#[tokio::test]
async fn a_changed_applied_file_is_refused_and_nothing_runs() {
    let shards = Shards::create(1).await;
    let map = only(&shards, 0);
    assert!(
        migrate::migrate(&map, &Migrations::load(folder(&[V1])).unwrap(), |_, _| {}).await[0]
            .outcome
            .is_ok()
    );
    let edited = ("V1__counter.sql", "CREATE TABLE counter (file bigint);");
    let drifted = Migrations::load(folder(&[edited, V2])).unwrap();

    let (_, status) = &migrate::status(&map, &drifted).await[0];
    assert!(
        matches!(status, Err(ShardError::Drift { .. })),
        "{status:?}"
    );
    let report = &migrate::migrate(&map, &drifted, |_, _| {}).await[0];
    let err = report.outcome.as_ref().unwrap_err();
    assert!(matches!(err, ShardError::Drift { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("V1__counter changed after it was applied"),
        "{err}"
    );
    assert_eq!(
        state(&shards.url(0)).await,
        (vec![1], vec![1]),
        "V2 did not run"
    );
}

#[tokio::test]
async fn a_version_gap_is_refused_before_any_shard_is_touched() {
    let shards = Shards::create(1).await;
    let err = Migrations::load(folder(&[V1, V3])).unwrap_err();
    assert!(matches!(err, FolderError::Gap { missing: 2 }), "{err}");

    // Through the CLI: exit 1, the reason, and the shard untouched.
    let dir = folder(&[V1, V3]);
    let map_file = dir.join("map.toml");
    std::fs::write(&map_file, common::map_toml(1, &shards, "")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shardctl"))
        .args([
            "migrate",
            "--map",
            map_file.to_str().unwrap(),
            "--dir",
            dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("version 2 is missing"));
    assert_eq!(state(&shards.url(0)).await, (vec![], vec![]));
}

#[tokio::test]
async fn a_broken_file_stops_its_shard_at_the_last_good_version() {
    let shards = Shards::create(2).await;
    let map = common::map(1, &shards, "");
    let broken = (
        "V2__broken.sql",
        "CREATE TABLE half_done (id int);\nSELEC 'typo';",
    );
    let all = Migrations::load(folder(&[V1, broken, V3])).unwrap();
    let reports = migrate::migrate(&map, &all, |_, _| {}).await;
    for (i, report) in reports.iter().enumerate() {
        assert_eq!(report.applied, [1]);
        let err = report.outcome.as_ref().unwrap_err();
        match err {
            ShardError::Failed { file, version, .. } => {
                assert_eq!((file.as_str(), *version), ("V2__broken", 1));
                assert!(err.to_string().contains("syntax error"), "{err}");
                // The driver's error stays reachable through the runner's.
                assert_eq!(
                    err.sqlstate(),
                    Some(&shard_router::tokio_postgres::error::SqlState::SYNTAX_ERROR)
                );
            }
            other => panic!("expected Failed, got {other}"),
        }
        assert_eq!(state(&shards.url(i)).await, (vec![1], vec![1]));
        let half: bool = connect(&shards.url(i))
            .await
            .query_one("SELECT to_regclass('half_done') IS NOT NULL", &[])
            .await
            .unwrap()
            .get(0);
        assert!(!half, "the failing file's transaction was rolled back");
    }
}

#[tokio::test]
async fn a_down_shard_is_named_the_others_migrate_and_a_rerun_finishes_it() {
    let shards = Shards::create(2).await;
    let dir = folder(&[V1, V2]);
    let down = format!(
        "version = 1\n[shards.a]\nurl = \"{}\"\n[shards.b]\nurl = \"postgres://postgres@127.0.0.1:1/down\"\npool = {{ connect_timeout_ms = 500 }}\n",
        shards.url(0)
    );
    let map_file = dir.join("down.toml");
    std::fs::write(&map_file, &down).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shardctl"))
        .args([
            "--json",
            "migrate",
            "--map",
            map_file.to_str().unwrap(),
            "--dir",
            dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["shards"][0]["version"], 2);
    assert_eq!(json["shards"][1]["kind"], "unreachable");
    assert_eq!(state(&shards.url(0)).await, (vec![1, 2], vec![1, 2]));

    // Human output names the shard too.
    let out = Command::new(env!("CARGO_BIN_EXE_shardctl"))
        .args([
            "migrate",
            "--map",
            map_file.to_str().unwrap(),
            "--dir",
            dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not migrated: b"));

    // The shard comes back (here: the map points b at a live database); a re-run finishes it.
    let back = MapLoader::without_env()
        .load_str(&common::map_toml(1, &shards, ""))
        .unwrap();
    let reports = migrate::migrate(&back, &Migrations::load(&dir).unwrap(), |_, _| {}).await;
    assert_eq!(reports[0].applied, Vec::<u32>::new());
    assert_eq!(reports[1].applied, [1, 2]);
    assert_eq!(state(&shards.url(1)).await, (vec![1, 2], vec![1, 2]));
}

#[tokio::test]
async fn a_file_with_its_own_commit_is_refused_before_any_shard_is_touched() {
    let shards = Shards::create(1).await;
    // Run in one transaction, this file would commit its first half, fail, and
    // leave the shard between versions with no history row.
    let own_commit = (
        "V2__own_commit.sql",
        "CREATE TABLE half (id int);\nCOMMIT;\nINSERT INTO nowhere VALUES (1);",
    );
    // A function body's BEGIN ... END is not transaction control.
    let function = (
        "V3__function.sql",
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN 1; END $$;",
    );
    let err = Migrations::load(folder(&[V1, own_commit, function])).unwrap_err();
    assert!(
        matches!(&err, FolderError::TransactionControl { statement: 2, keyword, .. } if keyword == "COMMIT"),
        "{err}"
    );
    assert!(err.to_string().contains("V2__own_commit.sql"), "{err}");
    assert!(Migrations::load(folder(&[V1, ("V2__function.sql", function.1)])).is_ok());

    let dir = folder(&[V1, own_commit]);
    let map_file = dir.join("map.toml");
    std::fs::write(&map_file, common::map_toml(1, &shards, "")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shardctl"))
        .args([
            "migrate",
            "--map",
            map_file.to_str().unwrap(),
            "--dir",
            dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`COMMIT`"));
    assert_eq!(
        state(&shards.url(0)).await,
        (vec![], vec![]),
        "nothing ran, not even V1"
    );
}

/// A long batch transaction that has read `counter` (and so holds a lock an
/// `ALTER TABLE` must wait for), committed after `hold`.
async fn long_reader(url: &str, hold: std::time::Duration) -> tokio::task::JoinHandle<()> {
    let client = connect(url).await;
    client
        .batch_execute("BEGIN; SELECT count(*) FROM counter;")
        .await
        .unwrap();
    tokio::spawn(async move {
        tokio::time::sleep(hold).await;
        client.batch_execute("COMMIT").await.unwrap();
    })
}

#[tokio::test]
async fn an_alter_behind_a_long_transaction_times_out_retries_and_never_stalls_the_table() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    let shards = Shards::create(1).await;
    let map = only(&shards, 0);
    let v1 = Migrations::load(folder(&[V1])).unwrap();
    assert!(migrate::migrate(&map, &v1, |_, _| {}).await[0]
        .outcome
        .is_ok());
    let alter = (
        "V2__alter.sql",
        "ALTER TABLE counter ADD COLUMN note text;\nINSERT INTO counter VALUES (2);",
    );
    let v2 = Migrations::load(folder(&[V1, alter]))
        .unwrap()
        .lock_timeout(Duration::from_millis(200), 3);

    // A reader of the table the whole time: with the ALTER queued, it waits
    // at most one lock timeout, never for the long transaction.
    let stop = Arc::new(AtomicBool::new(false));
    let slowest = Arc::new(AtomicU64::new(0));
    let reader = {
        let (client, stop, slowest) =
            (connect(&shards.url(0)).await, stop.clone(), slowest.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                client
                    .query_one("SELECT count(*) FROM counter", &[])
                    .await
                    .unwrap();
                slowest.fetch_max(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // The long transaction outlives every attempt: the file is rolled back
    // each time and the shard stays at version 1, by name.
    let holder = long_reader(&shards.url(0), Duration::from_secs(3)).await;
    let report = &migrate::migrate(&map, &v2, |_, _| {}).await[0];
    match &report.outcome {
        Err(ShardError::LockTimeout {
            file,
            version,
            attempts,
            timeout_ms,
            ..
        }) => {
            assert_eq!(file, "V2__alter");
            assert_eq!((*version, *attempts, *timeout_ms), (1, 3, 200));
        }
        other => panic!("expected LockTimeout, got {other:?}"),
    }
    assert_eq!(state(&shards.url(0)).await, (vec![1], vec![1]));
    holder.await.unwrap();

    // A transaction that ends during the retries: a later attempt succeeds.
    let holder = long_reader(&shards.url(0), Duration::from_millis(500)).await;
    let report = &migrate::migrate(&map, &v2, |_, _| {}).await[0];
    assert!(matches!(report.outcome, Ok(2)), "{:?}", report.outcome);
    assert_eq!(state(&shards.url(0)).await, (vec![1, 2], vec![1, 2]));
    holder.await.unwrap();

    stop.store(true, Ordering::Relaxed);
    reader.await.unwrap();
    let slowest = slowest.load(Ordering::Relaxed);
    println!(
        "slowest read of the table while the ALTER waited: {slowest} ms (lock timeout 200 ms)"
    );
    assert!(
        slowest < 3_000,
        "a reader waited for the long transaction: {slowest} ms"
    );
}
