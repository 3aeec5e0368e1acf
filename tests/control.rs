//! The control plane against real Postgres: rollout to several routers, refusals,
//! the control database going away, rollback, and file mode.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{eventually, map_toml, Proxy, Shards, NOTES_SCHEMA};
use shard_router::control::{
    ControlAgent, ControlOptions, ControlPlane, PublishError, PublishOptions,
};
use shard_router::map::{MapDiff, MapLoader};
use shard_router::watch::FileWatcher;
use shard_router::{ShardRouter, TenantId};

fn options(id: &str) -> ControlOptions {
    let mut o = ControlOptions::default();
    o.instance_id = id.to_owned();
    o.heartbeat = Duration::from_millis(100);
    o.lease = Duration::from_millis(800);
    o.poll = Duration::from_secs(30); // NOTIFY must do the work in these tests
    o.max_backoff = Duration::from_millis(200);
    o
}

/// A control database (initialized) and shard databases with the notes schema.
async fn setup(shards: usize) -> (Shards, Shards, ControlPlane) {
    let control_db = Shards::create(1).await;
    let shard_dbs = Shards::create(shards).await;
    shard_dbs.run_everywhere(NOTES_SCHEMA).await;
    let mut control = ControlPlane::connect(&control_db.url(0)).await.unwrap();
    control.init().await.unwrap();
    assert!(
        control.init().await.unwrap().is_empty(),
        "init is idempotent"
    );
    (control_db, shard_dbs, control)
}

/// Whether `router` reports a refusal that says `text` within `limit`.
async fn refused_within(router: &ShardRouter, limit: Duration, text: &str) -> bool {
    eventually(limit, || {
        router
            .status()
            .last_refused
            .is_some_and(|r| r.contains(text))
    })
    .await
}

async fn history_len(control: &ControlPlane) -> usize {
    control.history().await.unwrap().len()
}

#[tokio::test]
async fn a_publish_reaches_two_routers_and_wait_sees_both_heartbeats() {
    let (control_db, shards, mut control) = setup(2).await;
    control
        .publish(&map_toml(1, &shards, ""), &PublishOptions::default())
        .await
        .unwrap();
    let (r1, _a1) = ControlAgent::start(&control_db.url(0), options("r1"))
        .await
        .unwrap();
    let (r2, _a2) = ControlAgent::start(&control_db.url(0), options("r2"))
        .await
        .unwrap();
    assert_eq!((r1.version(), r2.version()), (1, 1));

    let published_at = Instant::now();
    control
        .publish(
            &map_toml(2, &shards, "[tenants]\nnewcomer = \"b\"\n"),
            &PublishOptions::with_note("pin newcomer"),
        )
        .await
        .unwrap();
    let rollout = control.wait_for(2, Duration::from_secs(5)).await.unwrap();
    let waited = published_at.elapsed();
    assert!(
        rollout.laggards.is_empty() && rollout.stale.is_empty(),
        "{rollout:?}"
    );
    let mut ids: Vec<_> = rollout
        .applied
        .iter()
        .map(|r| r.instance_id.as_str())
        .collect();
    ids.sort();
    assert_eq!(ids, ["r1", "r2"]);
    // wait_for returned only once both heartbeats showed version 2 ...
    assert!(control
        .routers()
        .await
        .unwrap()
        .iter()
        .all(|r| r.applied_version == 2));
    // ... and both routers serve it, within a second of the NOTIFY.
    assert_eq!((r1.version(), r2.version()), (2, 2));
    assert!(waited < Duration::from_secs(1), "{waited:?}");
    let newcomer = TenantId::new("newcomer").unwrap();
    assert_eq!(r1.resolve(newcomer).shard(), "b");
    assert_eq!(r1.status().source, format!("control:{}", control_db.url(0)));
}

#[tokio::test]
async fn wait_names_a_stopped_router_stale_and_a_live_one_that_lags() {
    let (control_db, shards, mut control) = setup(1).await;
    control
        .publish(&map_toml(1, &shards, ""), &PublishOptions::default())
        .await
        .unwrap();
    let (_r1, _a1) = ControlAgent::start(&control_db.url(0), options("r1"))
        .await
        .unwrap();
    let (_r2, a2) = ControlAgent::start(&control_db.url(0), options("r2"))
        .await
        .unwrap();
    assert!(control
        .wait_for(1, Duration::from_secs(5))
        .await
        .unwrap()
        .laggards
        .is_empty());
    drop(a2); // r2 stops: no more heartbeats

    // Through the CLI, as an operator would: --wait returns once r2's lease has passed.
    let file = std::env::temp_dir().join(format!("control-wait-{}.toml", std::process::id()));
    std::fs::write(&file, map_toml(2, &shards, "[tenants]\nx = \"a\"\n")).unwrap();
    let started = Instant::now();
    // Without blocking: the routers in this process keep heartbeating meanwhile.
    let file_arg = file.to_str().unwrap();
    let out = common::shardctl(
        &control_db.url(0),
        &["--json", "map", "publish", file_arg, "--wait", "10"],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids = |rows: &serde_json::Value| -> Vec<String> {
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| r["instance_id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&json["rollout"]["applied"]), ["r1"]);
    assert_eq!(ids(&json["rollout"]["stale"]), ["r2"]);
    assert_eq!(json["rollout"]["stale"][0]["stale"], true);
    assert_eq!(json["version"], 2);
    assert_eq!(json["diff"]["pins_added"][0]["tenant"], "x");
    assert!(started.elapsed() < Duration::from_secs(10));

    // A router that is alive but stays behind makes --wait fail and is named.
    control_db_exec(
        &control_db.url(0),
        "INSERT INTO shard_router_routers VALUES ('stuck', 'h', 1, now(), now() + interval '1 hour', 600000)",
    )
    .await;
    std::fs::write(
        &file,
        map_toml(3, &shards, "[tenants]\nx = \"a\"\ny = \"a\"\n"),
    )
    .unwrap();
    let out = common::shardctl(
        &control_db.url(0),
        &["map", "publish", file_arg, "--wait", "1"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not applied within 1s by: stuck (at version 1)"),
        "{stderr}"
    );
}

async fn control_db_exec(url: &str, sql: &str) {
    common::connect(url).await.batch_execute(sql).await.unwrap();
}

#[tokio::test]
async fn refused_publishes_change_nothing_anywhere() {
    let (control_db, shards, mut control) = setup(2).await;
    control
        .publish(
            &map_toml(5, &shards, "[tenants]\nacme = \"a\"\n"),
            &PublishOptions::default(),
        )
        .await
        .unwrap();
    let (router, _agent) = ControlAgent::start(&control_db.url(0), options("r1"))
        .await
        .unwrap();
    // acme has data on a.
    let db = router.resolve(TenantId::new("acme").unwrap());
    let mut w = db.write().await.unwrap();
    w.execute(
        "INSERT INTO notes (tenant_id, id, body) VALUES ('acme', gen_random_uuid(), 'x')",
        &[],
    )
    .await
    .unwrap();
    w.commit().await.unwrap();

    let invalid = control
        .publish(
            &map_toml(6, &shards, "[tenants]\nacme = \"nowhere\"\n"),
            &PublishOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(invalid, PublishError::Invalid(_)), "{invalid}");
    assert!(invalid
        .to_string()
        .contains("tenants.acme: pinned to unknown shard"));

    let lower = control
        .publish(
            &map_toml(4, &shards, "[tenants]\nacme = \"a\"\n"),
            &PublishOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            lower,
            PublishError::NotNewer {
                newest: 5,
                offered: 4
            }
        ),
        "{lower}"
    );

    let rehome = control
        .publish(
            &map_toml(6, &shards, "[tenants]\nacme = \"b\"\n"),
            &PublishOptions::default(),
        )
        .await
        .unwrap_err();
    match &rehome {
        PublishError::Rehoming { tenants } => {
            assert_eq!(tenants.len(), 1);
            assert_eq!(
                (
                    tenants[0].tenant.as_str(),
                    tenants[0].from.as_str(),
                    tenants[0].to.as_str()
                ),
                ("acme", "a", "b")
            );
        }
        other => panic!("expected Rehoming, got {other}"),
    }
    assert!(rehome.to_string().contains("acme (a -> b)"));

    // A ring change (dropping shard b's weight) re-homes every tenant with data on b.
    let mut on_b = None;
    for i in 0..50 {
        let t = format!("ringer-{i}");
        if router.locate(&TenantId::new(&t).unwrap()).shard.get() == 1 {
            on_b = Some(t);
            break;
        }
    }
    let on_b = on_b.expect("some tenant hashes to b");
    let db = router.resolve(TenantId::new(&on_b).unwrap());
    let mut w = db.write().await.unwrap();
    w.execute(
        "INSERT INTO notes (tenant_id, id, body) VALUES ($1, gen_random_uuid(), 'x')",
        &[&on_b.as_str()],
    )
    .await
    .unwrap();
    w.commit().await.unwrap();
    let drain_b = format!(
        "version = 6\n[shards.a]\nurl = \"{}\"\n[shards.b]\nurl = \"{}\"\nweight = 0\n[tenants]\nacme = \"a\"\n",
        shards.url(0),
        shards.url(1)
    );
    let err = control
        .publish(&drain_b, &PublishOptions::default())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(&format!("{on_b} (b -> a)")),
        "{err}"
    );

    // Nothing changed: the control database holds one version, the router serves it.
    assert_eq!(history_len(&control).await, 1);
    assert_eq!(router.version(), 5);

    // --pin-existing pins the tenant where its data is, and the map goes through.
    let mut pin = PublishOptions::default();
    pin.pin_existing = true;
    let published = control.publish(&drain_b, &pin).await.unwrap();
    assert_eq!(published.pinned.len(), 1);
    assert!(eventually(Duration::from_secs(2), || router.version() == 6).await);
    assert_eq!(router.resolve(TenantId::new(&on_b).unwrap()).shard(), "b");
}

#[tokio::test]
async fn routers_keep_serving_through_a_control_outage_and_catch_up() {
    let (control_db, shards, mut control) = setup(2).await;
    control
        .publish(&map_toml(1, &shards, ""), &PublishOptions::default())
        .await
        .unwrap();
    let proxy = Proxy::start(5432).await;
    let via_proxy = proxy.url(&control_db.names[0]);
    let (r1, _a1) = ControlAgent::start(&via_proxy, options("r1"))
        .await
        .unwrap();
    let (r2, _a2) = ControlAgent::start(&via_proxy, options("r2"))
        .await
        .unwrap();

    // Traffic for tenants that are not moving, through both routers, the whole time.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for (i, router) in [r1.clone(), r2.clone()].into_iter().enumerate() {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let db = router.resolve(TenantId::new(&format!("steady-{i}-{}", n % 7)).unwrap());
                let result = async {
                    let client = db.read().await?;
                    client
                        .query_one(
                            "SELECT count(*) FROM notes WHERE tenant_id = $1",
                            &[&db.tenant().as_str()],
                        )
                        .await
                }
                .await;
                match result {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                n += 1;
                tokio::task::yield_now().await;
            }
        }));
    }

    proxy.cut();
    assert!(
        eventually(Duration::from_secs(3), || r1
            .status()
            .unconfirmed_for_ms
            .is_some()
            && r2.status().unconfirmed_for_ms.is_some())
        .await,
        "routers notice they are cut off"
    );
    // Versions published while the routers cannot see the control database.
    control
        .publish(
            &map_toml(2, &shards, "[tenants]\nlate = \"a\"\n"),
            &PublishOptions::default(),
        )
        .await
        .unwrap();
    control
        .publish(
            &map_toml(3, &shards, "[tenants]\nlate = \"a\"\nlater = \"b\"\n"),
            &PublishOptions::default(),
        )
        .await
        .unwrap();
    let served_during_outage = ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await; // keep serving while cut off
    assert_eq!((r1.version(), r2.version()), (1, 1));
    assert!(r1.status().unconfirmed_for_ms.unwrap() > 0);

    proxy.restore();
    assert!(
        eventually(Duration::from_secs(5), || r1.version() == 3
            && r2.version() == 3)
        .await,
        "routers catch up on every version published meanwhile"
    );
    assert!(
        eventually(Duration::from_secs(2), || r1
            .status()
            .unconfirmed_for_ms
            .is_none())
        .await
    );
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    assert!(
        ok.load(Ordering::Relaxed) > served_during_outage,
        "traffic continued"
    );
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request failed");
}

#[tokio::test]
async fn rollback_publishes_a_higher_version_that_routes_like_the_old_one() {
    let (_control_db, shards, mut control) = setup(2).await;
    let v1 = map_toml(1, &shards, "[tenants]\nacme = \"a\"\n");
    control
        .publish(&v1, &PublishOptions::default())
        .await
        .unwrap();
    control
        .publish(
            &map_toml(2, &shards, "[tenants]\nacme = \"a\"\nglobex = \"b\"\n"),
            &PublishOptions::default(),
        )
        .await
        .unwrap();
    let rolled = control
        .rollback(1, &PublishOptions::default())
        .await
        .unwrap();
    assert_eq!(rolled.version, 3);
    let history = control.history().await.unwrap();
    assert_eq!(history.len(), 3);
    assert_eq!(history[2].note.as_deref(), Some("rollback to version 1"));

    let old = MapLoader::without_env().load_str(&v1).unwrap();
    let new = control.get(3).await.unwrap().unwrap().load().unwrap();
    assert_eq!(new.version(), 3);
    let mut diff = MapDiff::between(&old, &new);
    assert!(diff.is_empty(), "{diff}");
    diff.to_version = 1;
    for i in 0..500 {
        let t = TenantId::new(&format!("t{i}")).unwrap();
        assert_eq!(old.locate(&t).shard, new.locate(&t).shard);
    }
    assert!(control
        .rollback(99, &PublishOptions::default())
        .await
        .is_err());
    assert_eq!(control.history().await.unwrap().len(), 3);
}

#[tokio::test]
async fn file_mode_applies_valid_edits_refuses_invalid_ones_and_never_stops_serving() {
    let shards = Shards::create(2).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    let path = std::env::temp_dir().join(format!("file-mode-{}.toml", std::process::id()));
    std::fs::write(&path, map_toml(1, &shards, "")).unwrap();
    let router = ShardRouter::new(MapLoader::new().load_file(&path).unwrap()).unwrap();
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let _watcher = FileWatcher::spawn(router.clone(), &path, Duration::from_millis(20));

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let traffic = {
        let (router, stop, failed, served) =
            (router.clone(), stop.clone(), failed.clone(), served.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let db = router.resolve(TenantId::new("steady").unwrap());
                let result = match db.read().await {
                    Ok(client) => client
                        .query_one("SELECT 1", &[])
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if result.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                served.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        })
    };

    std::fs::write(&path, map_toml(2, &shards, "[tenants]\nsteady = \"b\"\n")).unwrap();
    assert!(
        eventually(Duration::from_secs(3), || router.version() == 2).await,
        "valid edit applied"
    );
    assert_eq!(
        router.resolve(TenantId::new("steady").unwrap()).shard(),
        "b"
    );

    std::fs::write(
        &path,
        map_toml(3, &shards, "[tenants]\nsteady = \"nowhere\"\n"),
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(3), || router
            .status()
            .last_refused
            .is_some())
        .await,
        "invalid edit refused"
    );
    let refused = router.status().last_refused.unwrap();
    assert!(
        refused.contains("tenants.steady: pinned to unknown shard"),
        "{refused}"
    );
    assert_eq!(router.version(), 2);

    // Same version, different content: refused too.
    std::fs::write(&path, map_toml(2, &shards, "")).unwrap();
    assert!(
        refused_within(
            &router,
            Duration::from_secs(3),
            "already live with different content"
        )
        .await
    );
    assert_eq!(router.version(), 2);

    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    assert!(served.load(Ordering::Relaxed) > 0);
    assert_eq!(failed.load(Ordering::Relaxed), 0, "serving never stopped");
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn cli_commands_read_the_newest_map_from_the_control_database() {
    let (control_db, shards, mut control) = setup(2).await;
    control
        .publish(
            &map_toml(1, &shards, "[tenants]\nacme = \"b\"\n"),
            &PublishOptions::with_note("first"),
        )
        .await
        .unwrap();
    let control_url = control_db.url(0);
    let out = common::shardctl(&control_url, &["--json", "tenant", "locate", "acme"]).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (json["shard"].as_str(), json["map_version"].as_u64()),
        (Some("b"), Some(1))
    );

    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/notes");
    let out = common::shardctl(&control_url, &["--json", "migrate", "status", "--dir", dir]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["shards"].as_array().unwrap().len(), 2);

    let out = common::shardctl(&control_url, &["--json", "map", "history"]).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["note"], "first");

    let out = common::shardctl(&control_url, &["map", "show", "--version", "1"]).await;
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("version 1"));

    let out = common::shardctl(&control_url, &["--json", "routers"]).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["newest_version"], 1);
}

#[tokio::test]
async fn agent_options_that_cannot_work_are_refused_and_a_router_ahead_is_named() {
    let (control_db, shards, mut control) = setup(1).await;
    control
        .publish(&map_toml(2, &shards, ""), &PublishOptions::default())
        .await
        .unwrap();
    let url = control_db.url(0);
    for (heartbeat, lease) in [(0, 800), (900, 800), (800, 800)] {
        let mut o = options("bad");
        o.heartbeat = Duration::from_millis(heartbeat);
        o.lease = Duration::from_millis(lease);
        let err = ControlAgent::start(&url, o).await.unwrap_err();
        assert!(
            err.to_string().contains("invalid control agent options"),
            "{err}"
        );
    }
    // A router on version 9 while the newest is 2 (a restored control database).
    control_db_exec(
        &url,
        "INSERT INTO shard_router_routers VALUES ('restored', 'h', 9, now(), now(), 60000)",
    )
    .await;
    let out = common::shardctl(&url, &["routers"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("AHEAD of the newest version"), "{text}");
    assert!(!text.contains("behind"), "{text}");
}

#[tokio::test]
async fn a_control_database_restored_from_an_older_backup_is_noticed_and_never_counted_as_applied()
{
    let (control_db, shards, mut control) = setup(1).await;
    for version in 1..=3 {
        control
            .publish(&map_toml(version, &shards, ""), &PublishOptions::default())
            .await
            .unwrap();
    }
    let url = control_db.url(0);
    let mut o = options("r1");
    o.poll = Duration::from_millis(200);
    let (router, _agent) = ControlAgent::start(&url, o).await.unwrap();
    assert_eq!(router.version(), 3);

    // A restore from a backup taken at version 2.
    control_db_exec(&url, "DELETE FROM shard_router_maps WHERE version = 3").await;
    // The router says so, keeps serving its map, and is not counted as having
    // applied anything here.
    assert!(
        refused_within(
            &router,
            Duration::from_secs(5),
            "newest map is version 2, below version 3"
        )
        .await,
        "{:?}",
        router.status()
    );
    assert_eq!(router.version(), 3);
    let rollout = control
        .wait_for(2, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(rollout.applied.is_empty(), "{rollout:?}");
    assert_eq!(rollout.laggards.len(), 1);

    // Publishing a version the router already has a different map for is refused
    // by name; nothing is stored.
    let err = control
        .publish(
            &map_toml(3, &shards, "[tenants]\nacme = \"a\"\n"),
            &PublishOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PublishError::RoutersAhead { offered: 3, routers, .. } if routers == &[("r1".to_owned(), 3)]),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("publish a version above 3"),
        "{err}"
    );
    assert_eq!(control.latest().await.unwrap().version, 2);

    // Another map stored under version 3 behind publish's back (an old shardctl):
    // the router is not counted as having applied it.
    let other = map_toml(3, &shards, "[tenants]\nacme = \"a\"\n");
    control_db_exec(
        &url,
        &format!(
            "INSERT INTO shard_router_maps (version, map, checksum) VALUES (3, '{}', 'other')",
            other.replace('\'', "''")
        ),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rows = control.routers().await.unwrap();
    assert!(!rows[0].known, "{rows:?}");
    let rollout = control
        .wait_for(3, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(rollout.applied.is_empty(), "{rollout:?}");
    let out = common::shardctl(&url, &["routers"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("DIVERGED"), "{text}");

    // A version above the router's brings everything back in line.
    control
        .publish(&map_toml(4, &shards, ""), &PublishOptions::default())
        .await
        .unwrap();
    let rollout = control.wait_for(4, Duration::from_secs(5)).await.unwrap();
    assert_eq!(rollout.applied.len(), 1, "{rollout:?}");
    assert!(control.routers().await.unwrap()[0].known);
}

#[tokio::test]
async fn file_mode_never_applies_a_half_written_file_and_refuses_rehoming_tenants_with_data() {
    use shard_router::watch::WatchOptions;
    let shards = Shards::create(2).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    // A tenant the ring puts on b, pinned to a, with data on a.
    let ring = map_toml(1, &shards, "");
    let ring_map = MapLoader::without_env().load_str(&ring).unwrap();
    let tenant = (0..100)
        .map(|i| format!("t{i}"))
        .find(|t| {
            ring_map
                .shard(ring_map.locate(&TenantId::new(t).unwrap()).shard)
                .name()
                == "b"
        })
        .unwrap();
    let pinned = |v: u64| map_toml(v, &shards, &format!("[tenants]\n{tenant} = \"a\"\n"));
    common::connect(&shards.url(0))
        .await
        .execute(
            "INSERT INTO notes (tenant_id, id, body) VALUES ($1, gen_random_uuid(), 'x')",
            &[&tenant],
        )
        .await
        .unwrap();
    let path = std::env::temp_dir().join(format!("file-settle-{}.toml", std::process::id()));
    std::fs::write(&path, pinned(1)).unwrap();
    let router = ShardRouter::new(MapLoader::new().load_file(&path).unwrap()).unwrap();
    let mut options = WatchOptions::default();
    options.interval = Duration::from_millis(10);
    options.settle = Duration::from_millis(150);
    let watcher = FileWatcher::with_options(router.clone(), &path, options.clone());
    let id = TenantId::new(&tenant).unwrap();

    // `cp` writing in two steps: first a prefix that is itself a valid map
    // (version 2, pins cut off), then the rest.
    let full = pinned(2);
    let cut = full.find("[tenants]").unwrap();
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&full.as_bytes()[..cut]).unwrap();
        file.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(40)).await;
        file.write_all(&full.as_bytes()[cut..]).unwrap();
    }
    assert!(eventually(Duration::from_secs(3), || router.version() == 2).await);
    assert_eq!(
        router.resolve(id.clone()).shard(),
        "a",
        "the complete file, pin included"
    );
    assert!(
        router.status().last_refused.is_none(),
        "{:?}",
        router.status()
    );

    // A complete map that drops the pin would send the tenant's reads to b,
    // where it has no rows: refused, the live map kept.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, map_toml(3, &shards, "")).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    assert!(
        refused_within(&router, Duration::from_secs(3), "would re-home 1 tenant(s)").await,
        "{:?}",
        router.status()
    );
    assert_eq!(router.version(), 2);
    assert_eq!(router.resolve(id.clone()).shard(), "a");

    // An operator who copied the rows by other means says so.
    drop(watcher);
    options.allow_rehoming = true;
    let _watcher = FileWatcher::with_options(router.clone(), &path, options);
    std::fs::write(&tmp, map_toml(4, &shards, "")).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    assert!(eventually(Duration::from_secs(3), || router.version() == 4).await);
    assert_eq!(router.resolve(id).shard(), "b");
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn a_shard_added_without_the_schema_is_refused_until_migrated() {
    let (_control_db, shards, mut control) = setup(1).await;
    let empty = Shards::create(1).await;
    let one = format!("version = 1\n[shards.a]\nurl = \"{}\"\n", shards.url(0));
    control
        .publish(&one, &PublishOptions::default())
        .await
        .unwrap();
    let two = format!(
        "version = 2\n[shards.a]\nurl = \"{}\"\n[shards.c]\nurl = \"{}\"\nweight = 0\n",
        shards.url(0),
        empty.url(0)
    );
    let err = control
        .publish(&two, &PublishOptions::default())
        .await
        .unwrap_err();
    match &err {
        PublishError::SchemaMissing(gap) => {
            assert_eq!((gap.shard.as_str(), gap.reference.as_str()), ("c", "a"));
            assert!(
                gap.missing.contains(&"public.notes.body".to_owned()),
                "{gap:?}"
            );
        }
        other => panic!("expected SchemaMissing, got {other:?}"),
    }
    assert!(err.to_string().contains("shardctl migrate"), "{err}");
    assert_eq!(
        control.latest().await.unwrap().version,
        1,
        "nothing published"
    );

    empty.run_everywhere(NOTES_SCHEMA).await;
    control
        .publish(&two, &PublishOptions::default())
        .await
        .unwrap();
    assert_eq!(control.latest().await.unwrap().version, 2);
}

#[tokio::test]
async fn a_new_tenant_case_that_would_rename_a_tenant_with_data_is_refused() {
    let (_control_db, shards, mut control) = setup(1).await;
    control
        .publish(&map_toml(1, &shards, ""), &PublishOptions::default())
        .await
        .unwrap();
    // `ACME` has rows under the default, `exact`.
    let router = ShardRouter::new(common::map(1, &shards, "")).unwrap();
    router
        .resolve(TenantId::new("ACME").unwrap())
        .execute(
            "INSERT INTO notes (tenant_id, id, body) VALUES ('ACME', gen_random_uuid(), 'x')",
            &[],
        )
        .await
        .unwrap();
    let lower = format!("tenant_case = \"lower\"\n{}", map_toml(2, &shards, ""));
    let err = control
        .publish(&lower, &PublishOptions::default())
        .await
        .unwrap_err();
    let PublishError::Rehoming { tenants } = &err else {
        panic!("expected Rehoming, got {err}");
    };
    assert_eq!(tenants.len(), 1, "{tenants:?}");
    assert_eq!(tenants[0].tenant, "ACME");
    assert_eq!(tenants[0].to, "a (as acme)");
    assert_eq!(history_len(&control).await, 1, "nothing published");
    // Pinning it cannot help: a pin spelled ACME could never be reached.
    let mut pin = PublishOptions::default();
    pin.pin_existing = true;
    let pinned = control.publish(&lower, &pin).await.unwrap_err();
    assert!(
        pinned.to_string().contains("could never be reached"),
        "{pinned}"
    );
    assert_eq!(history_len(&control).await, 1, "nothing published");
    // Once the rows carry the lowercase id, the same file is accepted.
    common::connect(&shards.url(0))
        .await
        .batch_execute("UPDATE notes SET tenant_id = lower(tenant_id)")
        .await
        .unwrap();
    control
        .publish(&lower, &PublishOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn control_and_move_errors_keep_the_driver_error_as_their_source() {
    use shard_router::control::ControlError;
    use shard_router::moves::MoveError;
    use std::error::Error as _;
    let client = common::connect(&common::db_url("postgres")).await;
    let failed = || async { client.query_one("SELECT 1/0", &[]).await.unwrap_err() };
    let control = ControlError::from(failed().await);
    let ControlError::Database { cause } = &control else {
        panic!("expected Database, got {control:?}");
    };
    assert_eq!(
        cause.code(),
        Some(&tokio_postgres::error::SqlState::DIVISION_BY_ZERO)
    );
    assert!(control.source().is_some());
    assert!(
        control.to_string().contains("division by zero"),
        "{control}"
    );
    let moved = MoveError::from(ControlError::from(failed().await));
    assert!(moved.source().is_some(), "{moved}");
}

#[tokio::test]
async fn tenants_top_merges_two_routers_and_ranks_the_tenant_with_ten_times_the_statements_first() {
    use shard_router::control::{LoadOrder, LoadWindow};
    let (control_db, shards, mut control) = setup(2).await;
    let pins =
        "[tenants]\nhot = \"a\"\nt1 = \"a\"\nt2 = \"b\"\nt3 = \"b\"\nt4 = \"b\"\nt5 = \"a\"\n";
    control
        .publish(&map_toml(1, &shards, pins), &PublishOptions::default())
        .await
        .unwrap();
    let url = control_db.url(0);
    let start = |id: &str, rows: usize| {
        let mut o = options(id);
        o.report_load = Duration::from_millis(150);
        o.report_rows = rows;
        ControlAgent::start(&url, o)
    };
    let (r1, _a1) = start("r1", 1000).await.unwrap();
    let (r2, _a2) = start("r2", 4).await.unwrap();
    // Known shape over both routers: "hot" sends 200 statements (140 through
    // r1, 60 through r2), each other tenant 20 (10 through each).
    let query = "SELECT count(*) FROM notes WHERE tenant_id = $1";
    let run = |router: &ShardRouter, tenant: &str, n: usize| {
        let db = router.resolve(TenantId::new(tenant).unwrap());
        let tenant = tenant.to_owned();
        async move {
            let client = db.read().await.unwrap();
            for _ in 0..n {
                client.query_one(query, &[&tenant]).await.unwrap();
            }
        }
    };
    run(&r1, "hot", 140).await;
    run(&r2, "hot", 60).await;
    for t in ["t1", "t2", "t3", "t4", "t5"] {
        run(&r1, t, 10).await;
        run(&r2, t, 10).await;
    }
    // Merged once both routers have reported everything (r2 only its top 4).
    let mut top = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        top = control
            .tenants_top(None, LoadOrder::Statements, LoadWindow::Total, 10)
            .await
            .unwrap();
        if top.first().is_some_and(|t| t.statements == 200) && top.len() == 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(top[0].tenant, "hot", "{top:?}");
    assert_eq!(
        (top[0].statements, top[0].routers, top[0].shard.as_str()),
        (200, 2, "a")
    );
    // The truth: 200 of 300 statements. r2 reports only its top 4 tenants (by
    // time), so some of the others' statements are missing from the merge,
    // which only raises hot's share; within 10% of the truth either way.
    let truth = 200.0 / 300.0;
    assert!(
        (top[0].share - truth).abs() / truth < 0.10,
        "share {}",
        top[0].share
    );
    let r2_rows: i64 = common::connect(&url)
        .await
        .query_one(
            "SELECT count(*) FROM shard_router_tenant_load WHERE instance_id = 'r2' AND window_s = 0",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        r2_rows <= 4,
        "a report holds at most report_rows rows: {r2_rows}"
    );
    // One shard only.
    let on_b = control
        .tenants_top(Some("b"), LoadOrder::Statements, LoadWindow::Total, 10)
        .await
        .unwrap();
    assert!(
        on_b.iter().all(|t| t.shard == "b") && !on_b.is_empty(),
        "{on_b:?}"
    );
    // shardctl prints the same, and the shards' view.
    let out = common::shardctl(&url, &["--json", "tenants", "top", "--by", "statements"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["tenant"], "hot");
    // The routers are younger than a minute: the last minute is all they did.
    let out = common::shardctl(
        &url,
        &[
            "--json",
            "tenants",
            "top",
            "--by",
            "statements",
            "--since",
            "1m",
        ],
    )
    .await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (json[0]["tenant"].as_str(), json[0]["statements"].as_u64()),
        (Some("hot"), Some(200))
    );
    let out = common::shardctl(&url, &["tenants", "top", "--since", "2m"]).await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "only the reported windows are accepted"
    );
    let out = common::shardctl(&url, &["--json", "shards"]).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let shards_seen: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["shard"].as_str().unwrap())
        .collect();
    assert_eq!(shards_seen.len(), 2, "{json}");
    assert_eq!(json[0]["routers"], 2);
    let out = common::shardctl(&url, &["tenants", "top"]).await;
    println!("{}", String::from_utf8_lossy(&out.stdout));
    let out = common::shardctl(&url, &["shards"]).await;
    println!("{}", String::from_utf8_lossy(&out.stdout));
}

#[tokio::test]
async fn plan_balances_a_skewed_placement_apply_carries_it_out_and_a_second_plan_finds_nothing() {
    let (control_db, shards, mut control) = setup(2).await;
    // Skewed: four tenants, all on a; b empty.
    let pins = "[tenants]\nt1 = \"a\"\nt2 = \"a\"\nt3 = \"a\"\nt4 = \"a\"\n";
    control
        .publish(&map_toml(1, &shards, pins), &PublishOptions::default())
        .await
        .unwrap();
    let a = common::connect(&shards.url(0)).await;
    a.batch_execute(
        "INSERT INTO notes (tenant_id, id, body) \
         SELECT 't' || (g % 4 + 1), gen_random_uuid(), 'n' FROM generate_series(1, 200) g",
    )
    .await
    .unwrap();
    let url = control_db.url(0);
    let mut o = options("r1");
    o.report_load = Duration::from_millis(150);
    o.lease = Duration::from_secs(3);
    let (router, _agent) = ControlAgent::start(&url, o).await.unwrap();
    for t in ["t1", "t2", "t3", "t4"] {
        let db = router.resolve(TenantId::new(t).unwrap());
        let client = db.read().await.unwrap();
        for _ in 0..30 {
            client
                .query("SELECT * FROM notes WHERE tenant_id = $1", &[&t])
                .await
                .unwrap();
        }
    }
    let reported = eventually_async(Duration::from_secs(10), || async {
        control
            .tenants_top(
                None,
                shard_router::control::LoadOrder::Statements,
                shard_router::control::LoadWindow::Total,
                10,
            )
            .await
            .unwrap()
            .iter()
            .filter(|t| t.statements == 30)
            .count()
            == 4
    })
    .await;
    assert!(reported, "the router reported its load");

    let plan = |args: Vec<&'static str>| {
        let url = url.clone();
        async move {
            let mut all = vec!["--json", "plan", "--max-imbalance", "0.5"];
            all.extend(args);
            let out = common::shardctl(&url, &all).await;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
        }
    };
    // Bad input is refused with a clear error and changes nothing.
    let versions = history_len(&control).await;
    for bad in [["--max-imbalance", "-1"], ["--max-imbalance", "NaN"]] {
        let mut args = vec!["plan", "--apply"];
        args.extend(bad);
        let out = common::shardctl(&url, &args).await;
        assert!(!out.status.success(), "{bad:?} refused");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("max-imbalance"), "{stderr}");
    }
    assert_eq!(history_len(&control).await, versions, "nothing published");
    let first = plan(vec![]).await;
    let moves = first["moves"].as_array().unwrap().clone();
    assert!(!moves.is_empty(), "{first}");
    assert!(
        moves.iter().all(|m| m["from"] == "a" && m["to"] == "b"),
        "{first}"
    );
    assert_eq!(first["balanced"], true, "{first}");
    assert_eq!(first["before"][1]["load"], 0, "b carries nothing yet");
    // Excluding every tenant leaves nothing to move.
    let none = plan(vec![
        "--exclude",
        "t1",
        "--exclude",
        "t2",
        "--exclude",
        "t3",
        "--exclude",
        "t4",
    ])
    .await;
    assert!(
        none["moves"].as_array().unwrap().is_empty() && none["balanced"] == false,
        "{none}"
    );

    let applied = plan(vec!["--apply", "--wait", "10"]).await;
    assert_eq!(
        applied["moved"].as_array().unwrap().len(),
        moves.len(),
        "{applied}"
    );
    for m in &moves {
        let tenant = m["tenant"].as_str().unwrap();
        let on_b = common::notes_of(&shards.url(1), tenant).await;
        assert_eq!(on_b, 50, "{tenant}'s notes moved to b");
        // Issue 25.5: plan --apply removes the former copy by default.
        let on_a = common::notes_of(&shards.url(0), tenant).await;
        assert_eq!(on_a, 0, "{tenant}'s former copy on a purged");
    }
    let second = plan(vec![]).await;
    assert!(second["moves"].as_array().unwrap().is_empty(), "{second}");
    assert_eq!(second["balanced"], true, "{second}");
    let out = common::shardctl(&url, &["plan", "--max-imbalance", "0.5"]).await;
    println!("{}", String::from_utf8_lossy(&out.stdout));

    // Evacuating b is the same command: publish its weight as 0 (tenants with
    // data there stay pinned), then plan sends every one of them to a.
    let latest = control.latest().await.unwrap();
    let toml = latest
        .toml
        .replacen(
            &format!("version = {}", latest.version),
            &format!("version = {}", latest.version + 1),
            1,
        )
        .replacen("[shards.b]\n", "[shards.b]\nweight = 0\n", 1);
    let mut pin = PublishOptions::default();
    pin.pin_existing = true;
    control.publish(&toml, &pin).await.unwrap();
    let evacuate = plan(vec!["--apply", "--wait", "10"]).await;
    assert_eq!(evacuate["plan"]["after"][1]["load"], 0, "{evacuate}");
    assert_eq!(evacuate["plan"]["balanced"], true, "{evacuate}");
    let map = control.latest().await.unwrap().load().unwrap();
    for t in ["t1", "t2", "t3", "t4"] {
        let at = map.locate(&TenantId::new(t).unwrap()).shard;
        assert_eq!(map.shard(at).name(), "a", "{t} left b");
    }
}

/// Polls an async condition until it holds or `limit` passes.
async fn eventually_async<F, Fut>(limit: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    condition().await
}

/// Issue 26.1 (the model's `publish_checks_shards`, property "no tenant with
/// data is routed to a shard that lacks it"): version 2 pinned `t1` to `b` and
/// `t1` wrote there; the control database was restored to version 1. The
/// documented recovery (publish the map from git above every router's
/// version) is checked against the shards, not against the stale newest
/// map: it is refused naming `t1`, and `--pin-existing` keeps it on `b`.
#[tokio::test]
async fn the_recovery_publish_after_a_restore_is_checked_against_the_shards() {
    let (control_db, shards, mut control) = setup(2).await;
    let url = control_db.url(0);
    let from_git = |version| map_toml(version, &shards, "");
    control
        .publish(&from_git(1), &PublishOptions::default())
        .await
        .unwrap();
    // `t1` must land on `a` by the ring for the test to mean anything.
    let ring = common::map(1, &shards, "");
    let t1 = (0..1000)
        .map(|i| format!("t{i}"))
        .find(|t| {
            ring.shard(ring.locate(&TenantId::new(t).unwrap()).shard)
                .name()
                == "a"
        })
        .unwrap();
    control
        .publish(
            &map_toml(2, &shards, &format!("[tenants]\n{t1} = \"b\"\n")),
            &PublishOptions::default(),
        )
        .await
        .unwrap();
    let (router, _agent) = ControlAgent::start(&url, options("r1")).await.unwrap();
    assert_eq!(router.version(), 2);
    let db = router.resolve(TenantId::new(&t1).unwrap());
    let mut writer = db.write().await.unwrap();
    writer
        .execute(
            "INSERT INTO notes (tenant_id, id, body) VALUES ($1, gen_random_uuid(), 'on b')",
            &[&t1.as_str()],
        )
        .await
        .unwrap();
    writer.commit().await.unwrap();
    // The restore: version 2 is gone from the control database.
    control_db_exec(&url, "DELETE FROM shard_router_maps WHERE version = 2").await;
    let err = control
        .publish(&from_git(3), &PublishOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PublishError::Rehoming { tenants } if tenants.len() == 1 && tenants[0].tenant == t1 && tenants[0].from == "b"),
        "{err:?}"
    );
    assert_eq!(control.latest().await.unwrap().version, 1, "nothing stored");
    let mut pin = PublishOptions::default();
    pin.pin_existing = true;
    let published = control.publish(&from_git(3), &pin).await.unwrap();
    assert_eq!(published.pinned.len(), 1);
    assert!(
        eventually(Duration::from_secs(5), || router.version() == 3).await,
        "{:?}",
        router.status()
    );
    let db = router.resolve(TenantId::new(&t1).unwrap());
    assert_eq!(db.shard(), "b");
}

/// Issue 26.9: in file mode, a map refused because a check could not run (a
/// shard's database not there yet) is tried again and applied once it can be,
/// and the refusal is cleared; a hand-written `[moves]` entry is refused.
#[tokio::test]
async fn file_mode_retries_a_map_refused_for_a_passing_reason_and_refuses_hand_written_moves() {
    use shard_router::watch::WatchOptions;
    let mut shards = Shards::create(2).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    // Shard b's database is created later.
    let later = format!("{}_later", shards.names[1]);
    let later_url = common::db_url(&later);
    let shard = |name: &str, url: &str| format!("[shards.{name}]\nurl = \"{url}\"\n");
    let two = |v: u64| {
        format!(
            "version = {v}\n{}{}",
            shard("a", &shards.url(0)),
            shard("b", &later_url)
        )
    };
    let path = std::env::temp_dir().join(format!("file-retry-{}.toml", std::process::id()));
    std::fs::write(&path, two(1)).unwrap();
    let router = ShardRouter::new(MapLoader::new().load_file(&path).unwrap()).unwrap();
    let mut options = WatchOptions::default();
    options.interval = Duration::from_millis(20);
    options.settle = Duration::from_millis(50);
    let _watcher = FileWatcher::with_options(router.clone(), &path, options);

    // Version 2 adds shard c: the ring changes, so every old shard is scanned
    // for tenants that would change shard, and b cannot be reached.
    let three = format!("{}{}", two(2), shard("c", &shards.url(1)));
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &three).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    assert!(
        refused_within(&router, Duration::from_secs(5), "trying again").await,
        "{:?}",
        router.status()
    );
    assert_eq!(router.version(), 1);
    common::connect(&common::db_url("postgres"))
        .await
        .batch_execute(&format!("CREATE DATABASE {later}"))
        .await
        .unwrap();
    shards.names.push(later); // dropped with the others
    common::connect(&later_url)
        .await
        .batch_execute(NOTES_SCHEMA)
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || router.version() == 2).await,
        "the same file applied once b is there: {:?}",
        router.status()
    );
    assert!(
        router.status().last_refused.is_none(),
        "{:?}",
        router.status()
    );

    // A `[moves]` entry written by hand: refused, the live map kept.
    let moving =
        three.replace("version = 2", "version = 3") + "[moves.acme]\nfrom = \"a\"\nto = \"c\"\n";
    std::fs::write(&tmp, &moving).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    assert!(
        refused_within(&router, Duration::from_secs(5), "never from a map file").await,
        "{:?}",
        router.status()
    );
    assert_eq!(router.version(), 2);
    assert!(router.table().map().moves().is_empty());
    let _ = std::fs::remove_file(&path);
}

/// Issue 26.2: a `tenant_column` that no table on a shard has, while the
/// shard has tables, is refused by name, in one version and in two (first the
/// typo, then the pin dropped), and nothing is stored.
#[tokio::test]
async fn a_misspelt_tenant_column_is_refused_by_name_and_cannot_blind_the_check() {
    let (_control_db, shards, mut control) = setup(2).await;
    // A tenant the ring puts on b, pinned to a, with a row on a.
    let ring = common::map(1, &shards, "");
    let tenant = (0..100)
        .map(|i| format!("t{i}"))
        .find(|t| {
            ring.shard(ring.locate(&TenantId::new(t).unwrap()).shard)
                .name()
                == "b"
        })
        .unwrap();
    common::connect(&shards.url(0))
        .await
        .execute(
            "INSERT INTO notes (tenant_id, id, body) VALUES ($1, gen_random_uuid(), 'x')",
            &[&tenant],
        )
        .await
        .unwrap();
    let pin = format!("[tenants]\n{tenant} = \"a\"\n");
    control
        .publish(&map_toml(1, &shards, &pin), &PublishOptions::default())
        .await
        .unwrap();
    let typo = |v: u64, extra: &str| {
        map_toml(v, &shards, extra).replacen('\n', "\ntenant_column = \"tenant_idd\"\n", 1)
    };
    let refused_by_name = |err: PublishError| {
        let text = err.to_string();
        assert!(
            text.contains("no table has the tenant column \"tenant_idd\""),
            "{text}"
        );
        assert!(text.contains("public.notes"), "{text}");
    };
    // In one version: the typo and the pin dropped.
    refused_by_name(
        control
            .publish(&typo(2, ""), &PublishOptions::default())
            .await
            .unwrap_err(),
    );
    // In two: the typo alone (pin kept) is refused just the same.
    refused_by_name(
        control
            .publish(&typo(2, &pin), &PublishOptions::default())
            .await
            .unwrap_err(),
    );
    assert_eq!(history_len(&control).await, 1, "nothing stored");
    // With the column spelt right, the row is seen: dropping the pin is refused.
    let err = control
        .publish(&map_toml(2, &shards, ""), &PublishOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, PublishError::Rehoming { .. }), "{err}");
    assert_eq!(history_len(&control).await, 1);
}

/// Issue 26.3: each shard database carries an identity (written by the first
/// publish that sees it, or by `shardctl migrate`). A shard's URL re-pointed
/// at another database, or two shard names on one database, are refused and
/// nothing is stored; `reassign` rewrites the identity when the operator says
/// the database holds the shard's data.
#[tokio::test]
async fn a_shard_url_pointed_at_another_database_is_refused_unless_reassigned() {
    let (_control_db, shards, mut control) = setup(2).await;
    let other = Shards::create(1).await;
    other.run_everywhere(NOTES_SCHEMA).await;
    let add_t1_row = |url: String| async move {
        common::connect(&url)
            .await
            .execute(
                "INSERT INTO notes (tenant_id, id, body) VALUES ('t1', gen_random_uuid(), 'x')",
                &[],
            )
            .await
            .unwrap();
    };
    add_t1_row(shards.url(1)).await;
    let t1_on_b = "[tenants]\nt1 = \"b\"\n";
    control
        .publish(&map_toml(1, &shards, t1_on_b), &PublishOptions::default())
        .await
        .unwrap();
    let identity = |url: String| async move {
        common::connect(&url)
            .await
            .query_opt("SELECT shard FROM shard_router_identity", &[])
            .await
            .ok()
            .flatten()
            .map(|r| r.get::<_, String>(0))
    };
    assert_eq!(identity(shards.url(0)).await.as_deref(), Some("a"));
    assert_eq!(identity(shards.url(1)).await.as_deref(), Some("b"));
    let with_b = |v: u64, url: &str| {
        format!(
            "version = {v}\n[shards.a]\nurl = \"{}\"\n[shards.b]\nurl = \"{url}\"\n{t1_on_b}",
            shards.url(0)
        )
    };
    // b re-pointed at a database with the same schema and no identity.
    let err = control
        .publish(&with_b(2, &other.url(0)), &PublishOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PublishError::ShardIdentity { shard, .. } if shard == "b"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("another database than the one it had"),
        "{err}"
    );
    // b pointed at shard a's database.
    let err = control
        .publish(&with_b(2, &shards.url(0)), &PublishOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("shard a's"), "{err}");
    // Not even with --reassign: a is still in the map, and would lose its
    // database.
    let mut reassign = PublishOptions::default();
    reassign.reassign = true;
    let err = control
        .publish(&with_b(2, &shards.url(0)), &reassign)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("does not take a database from a shard the map still has"),
        "{err}"
    );
    assert_eq!(identity(shards.url(0)).await.as_deref(), Some("a"));
    assert_eq!(history_len(&control).await, 1, "nothing stored");
    assert_eq!(identity(other.url(0)).await, None, "nothing written");
    // The operator says the other database holds b's data now, but it does
    // not hold t1's row: --reassign compares the rows and refuses.
    let err = control
        .publish(&with_b(2, &other.url(0)), &reassign)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("leave rows behind in the database it had (tenant t1: 1 row(s) in public.notes, 0 in the new database)"),
        "{err}"
    );
    assert_eq!(history_len(&control).await, 1, "nothing stored");
    assert_eq!(identity(other.url(0)).await, None, "nothing written");
    // Once the rows are there, the reassignment goes through.
    add_t1_row(other.url(0)).await;
    control
        .publish(&with_b(2, &other.url(0)), &reassign)
        .await
        .unwrap();
    assert_eq!(identity(other.url(0)).await.as_deref(), Some("b"));
    assert_eq!(history_len(&control).await, 2);
    // A copy of b's database (a restored backup: the same identity, UUID
    // included, and none of what was written since) is another database.
    let copy = Shards::create(1).await;
    copy.run_everywhere(NOTES_SCHEMA).await;
    let uuid: String = common::connect(&other.url(0))
        .await
        .query_one("SELECT id::text FROM shard_router_identity", &[])
        .await
        .unwrap()
        .get(0);
    common::connect(&copy.url(0))
        .await
        .batch_execute(&format!(
            "CREATE TABLE shard_router_identity (singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton), \
               shard text NOT NULL, id uuid NOT NULL, written_at timestamptz NOT NULL DEFAULT now()); \
             INSERT INTO shard_router_identity (shard, id) VALUES ('b', '{uuid}')"
        ))
        .await
        .unwrap();
    let err = control
        .publish(&with_b(3, &copy.url(0)), &PublishOptions::default())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("even with the same identity"),
        "{err}"
    );
    let err = control
        .publish(&with_b(3, &copy.url(0)), &reassign)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("tenant t1: 1 row(s) in public.notes, 0 in the new database"),
        "{err}"
    );
    assert_eq!(history_len(&control).await, 2, "nothing stored");
    // Another name for the same database passes.
    let same = other.url(0).replacen("127.0.0.1", "localhost", 1);
    assert_ne!(same, other.url(0));
    control
        .publish(&with_b(3, &same), &PublishOptions::default())
        .await
        .unwrap();
    // The database b has now is gone (dropped, or its server down): a URL
    // pointing b at a database without an identity cannot be compared with
    // anything, and is refused unless reassigned, with a warning that no
    // rows were compared.
    let fresh = Shards::create(1).await;
    fresh.run_everywhere(NOTES_SCHEMA).await;
    common::connect(&common::db_url("postgres"))
        .await
        .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", other.names[0]))
        .await
        .unwrap();
    let err = control
        .publish(&with_b(4, &fresh.url(0)), &PublishOptions::default())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("the database it had cannot be reached"),
        "{err}"
    );
    assert_eq!(history_len(&control).await, 3, "nothing stored");
    let published = control
        .publish(&with_b(4, &fresh.url(0)), &reassign)
        .await
        .unwrap();
    assert!(
        published
            .warnings
            .iter()
            .any(|w| w.contains("its rows were not compared")),
        "{:?}",
        published.warnings
    );
}

/// Issue 26.5: a publish warns about every URL that carries a password (the
/// map is stored in the control database, where every router reads it), naming
/// the key and never the password; `password_env` keeps it out of the map.
#[tokio::test]
async fn a_publish_warns_about_passwords_in_urls_without_printing_them() {
    let (_control_db, shards, mut control) = setup(1).await;
    let with_password =
        map_toml(1, &shards, "").replace("postgres://postgres@", "postgres://postgres:Tr0ub4dor@");
    let published = control
        .publish(&with_password, &PublishOptions::default())
        .await
        .unwrap();
    assert_eq!(published.warnings.len(), 1, "{:?}", published.warnings);
    assert!(published.warnings[0].starts_with("shards.a.url carries a password"));
    assert!(!published.warnings[0].contains("Tr0ub4dor"));
    std::env::set_var("SR_TEST_CONTROL_PASSWORD", "Tr0ub4dor");
    let from_env = map_toml(2, &shards, "").replacen(
        "pool =",
        "password_env = \"SR_TEST_CONTROL_PASSWORD\"\npool =",
        1,
    );
    let published = control
        .publish(&from_env, &PublishOptions::default())
        .await
        .unwrap();
    assert!(published.warnings.is_empty(), "{:?}", published.warnings);
    assert!(!control.latest().await.unwrap().toml.contains("Tr0ub4dor"));
}

/// Issue 26.7: a tenant's first writes during a rollout. Version 2 adds
/// shard b to the ring, checked while `t_new` had no data; a router still on
/// version 1 then gives it rows on a. Once every router applied version 2,
/// `pin_rollout_stragglers` pins it to a in version 3; a tenant with rows on
/// both shards is reported as split, not pinned.
#[tokio::test]
async fn tenants_that_first_write_during_a_rollout_are_pinned_where_they_wrote() {
    let (_control_db, shards, mut control) = setup(2).await;
    let one = |v: u64| {
        format!(
            "version = {v}\n[shards.a]\nurl = \"{}\"\n[shards.b]\nurl = \"{}\"\nweight = 0\n",
            shards.url(0),
            shards.url(1)
        )
    };
    control
        .publish(&one(1), &PublishOptions::default())
        .await
        .unwrap();
    let two = map_toml(2, &shards, "");
    control
        .publish(&two, &PublishOptions::default())
        .await
        .unwrap();
    // Tenants version 2 sends to b (version 1 had every tenant on a).
    let v2 = MapLoader::without_env().load_str(&two).unwrap();
    let mut on_b = (0..200)
        .map(|i| format!("r{i}"))
        .filter(|t| v2.shard(v2.locate(&TenantId::new(t).unwrap()).shard).name() == "b");
    let (straggler, split) = (on_b.next().unwrap(), on_b.next().unwrap());
    let insert = |url: String, tenant: String| async move {
        common::connect(&url)
            .await
            .execute(
                "INSERT INTO notes (tenant_id, id, body) VALUES ($1, gen_random_uuid(), 'x')",
                &[&tenant],
            )
            .await
            .unwrap();
    };
    // Written by a router still on version 1 (on a), and for `split` also on b.
    insert(shards.url(0), straggler.clone()).await;
    insert(shards.url(0), split.clone()).await;
    insert(shards.url(1), split.clone()).await;

    let found = control.pin_rollout_stragglers(2).await.unwrap();
    assert_eq!(found.published, Some(3));
    let pinned: Vec<&str> = found.pinned.iter().map(|r| r.tenant.as_str()).collect();
    assert_eq!(pinned, [straggler.as_str()]);
    let split_found: Vec<&str> = found.split.iter().map(|r| r.tenant.as_str()).collect();
    assert_eq!(split_found, [split.as_str()]);
    let v3 = control.latest().await.unwrap().load().unwrap();
    let at = |t: &str| {
        v3.shard(v3.locate(&TenantId::new(t).unwrap()).shard)
            .name()
            .to_owned()
    };
    assert_eq!(at(&straggler), "a", "pinned where it wrote");
    assert_eq!(at(&split), "b", "a split tenant is reported, not pinned");
    // Run again: nothing more to do (version 3 is not a rollout of a ring change).
    let again = control.pin_rollout_stragglers(3).await.unwrap();
    assert!(
        again.pinned.is_empty() && again.published.is_none(),
        "{again:?}"
    );
}

/// Issue 26.4: `control init` creates three roles. A router's login can start,
/// follow maps and heartbeat, and nothing more: it cannot publish, edit a
/// move, or block later publishes with a forged version. A publisher's login
/// publishes but cannot edit moves; a mover's login can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_three_control_roles_do_their_jobs_and_no_more() {
    let (control_db, shards, mut control) = setup(1).await;
    control
        .publish(&map_toml(1, &shards, ""), &PublishOptions::default())
        .await
        .unwrap();
    let admin = common::connect(&control_db.url(0)).await;
    let login = |role: &str| {
        let url = control_db.url(0);
        let changed = url.replacen("://postgres@", &format!("://{role}@"), 1);
        assert_ne!(url, changed, "the test server's user is postgres");
        changed
    };
    let base = &control_db.names[0];
    let (router_role, publisher_role, mover_role) = (
        format!("{base}_router"),
        format!("{base}_publisher"),
        format!("{base}_mover"),
    );
    admin
        .batch_execute(&format!(
            "CREATE ROLE {router_role} LOGIN IN ROLE shard_router_router; \
             CREATE ROLE {publisher_role} LOGIN IN ROLE shard_router_publisher; \
             CREATE ROLE {mover_role} LOGIN IN ROLE shard_router_mover;"
        ))
        .await
        .unwrap();
    let code = |e: tokio_postgres::Error| e.code().unwrap().code().to_owned();

    let (router, agent) = ControlAgent::start(&login(&router_role), options("r1"))
        .await
        .unwrap();
    assert_eq!(router.version(), 1);
    let as_router = common::connect(&login(&router_role)).await;
    let denied = as_router
        .execute(
            "INSERT INTO shard_router_maps (version, map, checksum) VALUES (2, '', '')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(code(denied), "42501", "a router cannot publish");
    let denied = as_router
        .execute("UPDATE shard_router_moves SET phase = 'complete'", &[])
        .await
        .unwrap_err();
    assert_eq!(code(denied), "42501", "a router cannot edit a move");
    let forged = as_router
        .execute(
            "UPDATE shard_router_routers SET applied_version = 9000000000000000000 WHERE instance_id = 'r1'",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(code(forged), "23514", "a forged version is refused");
    // A row of its own only, seen no later than now, for at most ten minutes.
    as_router
        .execute(
            "INSERT INTO shard_router_routers (instance_id, host, applied_version, started_at, last_seen, lease_ms) \
             VALUES ('ghost', 'h', 2, now(), 'infinity', 9000000000000)",
            &[],
        )
        .await
        .unwrap();
    let (future, lease): (bool, i64) = {
        let row = admin
            .query_one(
                "SELECT last_seen > clock_timestamp(), lease_ms FROM shard_router_routers WHERE instance_id = 'ghost'",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((future, lease), (false, 600000));
    admin
        .execute(
            "INSERT INTO shard_router_routers (instance_id, host, applied_version, started_at, last_seen, lease_ms) \
             VALUES ('other', 'h', 1, now(), now(), 60000)",
            &[],
        )
        .await
        .unwrap();
    let touched = as_router
        .execute(
            "UPDATE shard_router_routers SET applied_version = 2 WHERE instance_id = 'other'",
            &[],
        )
        .await
        .unwrap()
        + as_router
            .execute(
                "DELETE FROM shard_router_routers WHERE instance_id = 'other'",
                &[],
            )
            .await
            .unwrap();
    assert_eq!(touched, 0, "another login's router row is out of reach");
    // Load rows too: under another router's instance id, a router login's
    // rows are not that router's report (not counted), and the real report
    // is out of its reach.
    admin
        .execute(
            "INSERT INTO shard_router_tenant_load (instance_id, window_s, shard, tenant, statements, rows, db_time_us, pool_wait_us, errors) \
             VALUES ('other', 0, 'a', 'real', 10, 0, 10, 0, 0)",
            &[],
        )
        .await
        .unwrap();
    as_router
        .execute(
            "INSERT INTO shard_router_tenant_load (instance_id, window_s, shard, tenant, statements, rows, db_time_us, pool_wait_us, errors) \
             VALUES ('other', 0, 'a', 'forged', 1000000, 0, 1000000, 0, 0), ('other', 0, 'a', 'real', 1000000, 0, 1000000, 0, 0)",
            &[],
        )
        .await
        .unwrap();
    let touched = as_router
        .execute(
            "DELETE FROM shard_router_tenant_load WHERE instance_id = 'other' AND login <> current_user",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(touched, 0, "another login's load rows are out of reach");
    use shard_router::control::{LoadOrder, LoadWindow};
    let top = control
        .tenants_top(None, LoadOrder::Statements, LoadWindow::Total, 10)
        .await
        .unwrap();
    let ranked: Vec<(&str, u64)> = top
        .iter()
        .map(|t| (t.tenant.as_str(), t.statements))
        .collect();
    assert_eq!(
        ranked,
        [("real", 10)],
        "only the router's own login's report counts"
    );
    admin
        .batch_execute(
            "DELETE FROM shard_router_routers WHERE instance_id IN ('ghost', 'other'); \
             DELETE FROM shard_router_tenant_load WHERE instance_id = 'other'",
        )
        .await
        .unwrap();

    // A stolen router login reports a router ahead (within the bound): the
    // publish is refused naming the login; the operator revokes its router
    // role (its reports stop at once), forgets the row, and publishes the
    // version meant.
    as_router
        .execute(
            "INSERT INTO shard_router_routers (instance_id, host, applied_version, started_at, last_seen, lease_ms) \
             VALUES ('forger', 'h', 999999, now(), now(), 600000)",
            &[],
        )
        .await
        .unwrap();
    let mut publisher = ControlPlane::connect(&login(&publisher_role))
        .await
        .unwrap();
    let err = publisher
        .publish(
            &map_toml(2, &shards, "[tenants]\nacme = \"a\"\n"),
            &PublishOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PublishError::RoutersAhead { logins, .. } if logins == std::slice::from_ref(&router_role)),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("shardctl routers --forget"),
        "{err}"
    );
    admin
        .batch_execute(&format!("REVOKE shard_router_router FROM {router_role}"))
        .await
        .unwrap();
    let denied = as_router
        .execute(
            "UPDATE shard_router_routers SET last_seen = now() WHERE instance_id = 'forger'",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(code(denied), "42501", "a revoked login reports nothing");
    assert!(publisher.forget_router("forger").await.unwrap());
    assert!(!publisher.forget_router("forger").await.unwrap());
    admin
        .batch_execute(&format!("GRANT shard_router_router TO {router_role}"))
        .await
        .unwrap();
    publisher
        .publish(
            &map_toml(2, &shards, "[tenants]\nacme = \"a\"\n"),
            &PublishOptions::default(),
        )
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || router.version() == 2).await);
    let as_publisher = common::connect(&login(&publisher_role)).await;
    let denied = as_publisher
        .execute(
            "INSERT INTO shard_router_moves (tenant, from_shard, to_shard, phase) VALUES ('t', 'a', 'b', 'starting')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(
        code(denied),
        "42501",
        "a publisher cannot start a move by hand"
    );
    let as_mover = common::connect(&login(&mover_role)).await;
    as_mover
        .execute(
            "INSERT INTO shard_router_moves (tenant, from_shard, to_shard, phase) VALUES ('t', 'a', 'b', 'aborted')",
            &[],
        )
        .await
        .unwrap();

    drop((agent, router, as_router, as_publisher, as_mover, publisher));
    drop(control);
    drop(admin);
    drop(control_db);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cluster = common::connect(&common::db_url("postgres")).await;
    cluster
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {router_role}; DROP ROLE IF EXISTS {publisher_role}; DROP ROLE IF EXISTS {mover_role};"
        ))
        .await
        .unwrap();
}

/// Second audit of issue 26.3: two shards of a map on one database without
/// an identity, and an `admin_url` that reaches another database than `url`
/// (routers use `url`; moves and checks, `admin_url`), are refused, nothing
/// stored or written.
#[tokio::test]
async fn two_shards_on_one_database_or_a_split_admin_url_are_refused() {
    let (_control_db, shards, mut control) = setup(2).await;
    control
        .publish(&map_toml(1, &shards, ""), &PublishOptions::default())
        .await
        .unwrap();
    let extra = Shards::create(1).await;
    extra.run_everywhere(NOTES_SCHEMA).await;
    let both = format!(
        "{}[shards.c]\nurl = \"{}\"\n[shards.d]\nurl = \"{}\"\n",
        map_toml(2, &shards, ""),
        extra.url(0),
        extra.url(0).replacen("127.0.0.1", "localhost", 1),
    );
    let err = control
        .publish(&both, &PublishOptions::default())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("reaches the same database as shard"),
        "{err}"
    );
    let split = map_toml(2, &shards, "").replacen(
        "pool =",
        &format!("admin_url = \"{}\"\npool =", extra.url(0)),
        2,
    );
    assert!(split.contains("admin_url"), "{split}");
    let err = control
        .publish(&split, &PublishOptions::default())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("reach two different databases"),
        "{err}"
    );
    assert_eq!(history_len(&control).await, 1, "nothing stored");
    let named: bool = common::connect(&extra.url(0))
        .await
        .query_one(
            "SELECT to_regclass('shard_router_identity') IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!named, "nothing written");
}

/// Second audit of issue 26: a control database rebuilt (or restored from
/// before its first map) while routers serve a map: the first publish is
/// checked against the shards, so a tenant with rows is not routed away.
#[tokio::test]
async fn the_first_publish_beside_live_routers_is_checked_against_the_shards() {
    let (control_db, shards, mut control) = setup(2).await;
    let map = common::map(1, &shards, "");
    let tenant = (0..)
        .map(|i| format!("t{i}"))
        .find(|t| {
            map.shard(map.locate(&TenantId::new(t).unwrap()).shard)
                .name()
                == "a"
        })
        .unwrap();
    common::connect(&shards.url(1))
        .await
        .execute(
            "INSERT INTO notes (tenant_id, id, body) VALUES ($1, gen_random_uuid(), 'x')",
            &[&tenant],
        )
        .await
        .unwrap();
    common::connect(&control_db.url(0))
        .await
        .execute(
            "INSERT INTO shard_router_routers (instance_id, host, applied_version, started_at, last_seen, lease_ms) \
             VALUES ('r1', 'h', 5, now(), now(), 60000)",
            &[],
        )
        .await
        .unwrap();
    let err = control
        .publish(&map_toml(6, &shards, ""), &PublishOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PublishError::Rehoming { tenants } if tenants.iter().any(|r| r.tenant == tenant && r.from == "b")),
        "{err}"
    );
    assert_eq!(history_len(&control).await, 0, "nothing stored");
    let mut pin = PublishOptions::default();
    pin.pin_existing = true;
    let published = control
        .publish(&map_toml(6, &shards, ""), &pin)
        .await
        .unwrap();
    assert!(published.pinned.iter().any(|r| r.tenant == tenant));
    let stored = control.latest().await.unwrap().load().unwrap();
    assert_eq!(
        stored
            .shard(stored.locate(&TenantId::new(&tenant).unwrap()).shard)
            .name(),
        "b"
    );
}
