//! Read replicas against a real streaming replica: a primary and a standby
//! cluster made for this test binary with `pg_createcluster` and
//! `pg_basebackup`, dropped when it ends.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::Router;
use shard_router::map::MapLoader;
use shard_router::tenant::HeaderExtractor;
use shard_router::{DbError, ShardRouter, ShardRouterLayer, TenantDb, TenantId, TOKEN_HEADER};
use tower::ServiceExt;
use uuid::Uuid;

use common::run_command as run;

use common::free_port;

/// A primary and its streaming standby, on ports of their own.
struct ReplicaPair {
    primary: (String, u16),
    standby: (String, u16),
}

const TRUST: &str = "local all all trust\n\
                     host replication all 127.0.0.1/32 trust\n\
                     host all all 127.0.0.1/32 trust\n";

static NEXT: AtomicU32 = AtomicU32::new(0);

impl ReplicaPair {
    fn create() -> ReplicaPair {
        let tag = format!(
            "{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let cluster = |role: &str| {
            let name = format!("srt_rp_{tag}_{role}");
            let port = free_port();
            run(
                "pg_createcluster",
                &[
                    "15",
                    &name,
                    "-p",
                    &port.to_string(),
                    "-o",
                    "max_connections=60",
                ],
            );
            std::fs::write(format!("/etc/postgresql/15/{name}/pg_hba.conf"), TRUST).unwrap();
            (name, port)
        };
        let primary = cluster("primary");
        let standby = cluster("standby");
        let pair = ReplicaPair { primary, standby };
        pair.ctl(&pair.primary.0, "start");
        // The standby's data directory is a base backup of the primary.
        let data = format!("/var/lib/postgresql/15/{}", pair.standby.0);
        std::fs::remove_dir_all(&data).unwrap();
        std::fs::create_dir(&data).unwrap();
        run("chown", &["postgres:postgres", &data]);
        run("chmod", &["700", &data]);
        run(
            "runuser",
            &[
                "-u",
                "postgres",
                "--",
                "/usr/lib/postgresql/15/bin/pg_basebackup",
                "-w",
                "-h",
                "127.0.0.1",
                "-p",
                &pair.primary.1.to_string(),
                "-U",
                "postgres",
                "-D",
                &data,
                "-R",
                "-X",
                "stream",
            ],
        );
        pair.ctl(&pair.standby.0, "start");
        pair
    }

    fn ctl(&self, name: &str, action: &str) {
        run(
            "pg_ctlcluster",
            &["--skip-systemctl-redirect", "15", name, action],
        );
    }

    fn primary_url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.primary.1)
    }

    fn standby_url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.standby.1)
    }

    /// A database with the notes schema on the primary, visible on the standby.
    async fn database(&self) -> String {
        let db = format!("notes_{}", NEXT.fetch_add(1, Ordering::Relaxed));
        common::connect(&self.primary_url("postgres"))
            .await
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
        common::connect(&self.primary_url(&db))
            .await
            .batch_execute(common::NOTES_SCHEMA)
            .await
            .unwrap();
        // The standby replays the new database and its schema a moment later
        // (longer on a loaded machine): wait for both there.
        let standby = self.standby_url(&db);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((client, connection)) =
                tokio_postgres::connect(&standby, tokio_postgres::NoTls).await
            {
                tokio::spawn(connection);
                let table = client
                    .query_one("SELECT to_regclass('notes') IS NOT NULL", &[])
                    .await;
                if table.is_ok_and(|row| row.get::<_, bool>(0)) {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "the standby never showed {db}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        db
    }

    fn router(&self, db: &str) -> ShardRouter {
        let toml = format!(
            "version = 1\n[shards.a]\nurl = \"{}\"\npool = {{ max_size = 8, wait_timeout_ms = 1000 }}\n\
             max_replica_lag_ms = 1000\n\
             replicas = [{{ url = \"{}\", pool = {{ max_size = 8, wait_timeout_ms = 500, connect_timeout_ms = 500 }} }}]\n",
            self.primary_url(db),
            self.standby_url(db),
        );
        ShardRouter::new(MapLoader::without_env().load_str(&toml).unwrap()).unwrap()
    }

    async fn standby_admin(&self, db: &str) -> tokio_postgres::Client {
        common::connect(&self.standby_url(db)).await
    }
}

impl Drop for ReplicaPair {
    fn drop(&mut self) {
        for (name, _) in [&self.standby, &self.primary] {
            let _ = Command::new("pg_dropcluster")
                .args(["--stop", "15", name])
                .output();
        }
    }
}

/// Waits until the router's probes find every replica healthy (or not).
async fn replica_healthy(router: &ShardRouter, healthy: bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if router
            .status()
            .shards
            .iter()
            .flat_map(|s| &s.replicas)
            .all(|r| r.healthy == healthy)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

async fn add_note(db: TenantDb) -> Result<String, DbError> {
    db.execute(
        "INSERT INTO notes (tenant_id, id, body) VALUES ($1, $2, 'x')",
        &[&db.tenant().as_str(), &Uuid::new_v4()],
    )
    .await?;
    Ok(String::new())
}

/// The tenant's note count, and where it was read.
async fn count_notes(db: TenantDb) -> Result<String, DbError> {
    let client = db.read().await?;
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM notes WHERE tenant_id = $1",
            &[&db.tenant().as_str()],
        )
        .await?
        .get(0);
    Ok(format!(
        "{n} {}",
        if client.on_replica() {
            "replica"
        } else {
            "primary"
        }
    ))
}

fn app(router: ShardRouter) -> Router {
    Router::new()
        .route("/notes", post(add_note).get(count_notes))
        .layer(ShardRouterLayer::new(router, HeaderExtractor::default()))
}

async fn send(
    app: &Router,
    method: &str,
    token: Option<&str>,
) -> (StatusCode, Option<String>, String) {
    let mut request = Request::builder()
        .method(method)
        .uri("/notes")
        .header("x-tenant-id", "acme");
    if let Some(token) = token {
        request = request.header(TOKEN_HEADER, token);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let token = response
        .headers()
        .get(TOKEN_HEADER)
        .map(|v| v.to_str().unwrap().to_owned());
    let body = axum::body::to_bytes(response.into_body(), 1 << 16)
        .await
        .unwrap();
    (status, token, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_serve_reads_never_stale_for_the_writer_and_fall_back_when_stopped() {
    let pair = ReplicaPair::create();
    let db = pair.database().await;
    let router = pair.router(&db);
    let app = app(router.clone());
    assert!(
        replica_healthy(&router, true).await,
        "{:?}",
        router.status()
    );

    // 1. Healthy replica: reads without a token go to it.
    let (status, token, _) = send(&app, "POST", None).await;
    assert_eq!(status, StatusCode::OK);
    let token = token.expect("a write returns a token");
    let mut on_replica = 0;
    for _ in 0..200 {
        let (status, _, body) = send(&app, "GET", None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        on_replica += body.ends_with("replica") as usize;
    }
    assert!(
        on_replica >= 180,
        "{on_replica} of 200 reads on the replica"
    );
    // The token is sealed: the primary's WAL position is not in it, and an
    // altered one proves nothing (its reads go to the primary) while the
    // token as written reads from the caught-up replica.
    let position: i64 = common::connect(&pair.primary_url(&db))
        .await
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        token.starts_with("v2.") && !token.contains(&format!("{:X}", position >> 8)),
        "{token}"
    );
    let (_, _, body) = send(&app, "GET", Some(&token)).await;
    assert_eq!(body, "1 replica");
    let mut altered = token.clone().into_bytes();
    altered[10] = if altered[10] == b'0' { b'1' } else { b'0' };
    let altered = String::from_utf8(altered).unwrap();
    let (status, _, body) = send(&app, "GET", Some(&altered)).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "1 primary"));

    // 2. Replay paused: every read carrying the client's latest token sees
    //    its write; the replica serves none of them.
    let standby = pair.standby_admin(&db).await;
    standby
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    let mut token = token;
    let mut stale = 0;
    for i in 1..=100 {
        let (status, written, _) = send(&app, "POST", Some(&token)).await;
        assert_eq!(status, StatusCode::OK);
        token = written.expect("a write returns a token");
        let (status, _, body) = send(&app, "GET", Some(&token)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let seen: i64 = body.split(' ').next().unwrap().parse().unwrap();
        stale += (seen != 1 + i) as usize;
    }
    assert_eq!(stale, 0, "stale reads while replay was paused");
    // Without a token the paused replica drops out once past the lag bound.
    assert!(
        replica_healthy(&router, false).await,
        "{:?}",
        router.status()
    );
    let (_, _, body) = send(&app, "GET", None).await;
    assert_eq!(body, "101 primary");
    standby
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    assert!(
        replica_healthy(&router, true).await,
        "{:?}",
        router.status()
    );

    // 3. Replica stopped: reads fall back to the primary with no errors;
    //    started again: used again.
    drop(standby);
    pair.ctl(&pair.standby.0, "stop");
    let started = Instant::now();
    for _ in 0..50 {
        let (status, _, body) = send(&app, "GET", None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body, "101 primary");
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(replica_healthy(&router, false).await);
    pair.ctl(&pair.standby.0, "start");
    assert!(
        replica_healthy(&router, true).await,
        "{:?}",
        router.status()
    );
    let (_, _, body) = send(&app, "GET", None).await;
    assert_eq!(body, "101 replica");
    let status = router.status();
    assert!(status.shards[0].replicas[0].reads >= 180, "{status:?}");

    // A job takes the token too; another tenant's token is ignored.
    let token: shard_router::ReadToken = token.parse().unwrap();
    let job = router
        .resolve(TenantId::new("acme").unwrap())
        .with_token(token.clone());
    assert_eq!(count_notes(job).await.unwrap(), "101 replica");
    let other = router
        .resolve(TenantId::new("globex").unwrap())
        .with_token(token);
    assert!(count_notes(other).await.unwrap().starts_with("0 "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_completes_only_once_the_targets_replica_holds_the_rows() {
    use shard_router::control::{ControlPlane, PublishOptions};
    use shard_router::moves::{self, MoveError, MoveOptions};

    let pair = ReplicaPair::create();
    let (a, b) = (pair.database().await, pair.database().await);
    let control_db = common::Shards::create(1).await;
    let mut control = ControlPlane::connect(&control_db.url(0)).await.unwrap();
    control.init().await.unwrap();
    let shard = |name: &str, db: &str| {
        format!(
            "[shards.{name}]\nurl = \"{}\"\nreplicas = [{{ url = \"{}\" }}]\n",
            pair.primary_url(db),
            pair.standby_url(db)
        )
    };
    let toml = format!(
        "version = 1\n{}{}[tenants]\nacme = \"a\"\n",
        shard("a", &a),
        shard("b", &b)
    );
    control
        .publish(&toml, &PublishOptions::default())
        .await
        .unwrap();
    common::connect(&pair.primary_url(&a))
        .await
        .batch_execute(
            "INSERT INTO notes (tenant_id, id, body) SELECT 'acme', gen_random_uuid(), 'n' || g FROM generate_series(1, 50) g",
        )
        .await
        .unwrap();

    // The standby stops replaying: the move runs up to complete, and there
    // waits for b's replica to hold what b's primary holds, then gives up.
    let standby = pair.standby_admin(&b).await;
    standby
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    let tenant = TenantId::new("acme").unwrap();
    let mut options = MoveOptions::default();
    options.wait = Duration::from_secs(1);
    options.lease = Duration::from_millis(1500);
    let err = moves::start(&mut control, &tenant, "b", &options, |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(&err, MoveError::ReplicasBehind { shard, .. } if shard == "b"),
        "{err}"
    );
    let map = control.latest().await.unwrap().load().unwrap();
    assert!(
        map.move_of(&tenant).is_some(),
        "reads stay with the move (on primaries) until the replica catches up"
    );

    // Replay resumes: the move completes, and b's replica serves every row.
    standby
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    let mut done = None;
    for _ in 0..50 {
        match moves::resume(&mut control, &tenant, &options, |_| {}).await {
            Err(MoveError::LeaseHeld { .. }) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => {
                done = Some(other);
                break;
            }
        }
    }
    done.expect("the lease ran out").unwrap();
    let router = ShardRouter::new(control.latest().await.unwrap().load().unwrap()).unwrap();
    assert!(
        replica_healthy(&router, true).await,
        "{:?}",
        router.status()
    );
    let db = router.resolve(tenant.clone());
    assert_eq!(db.shard(), "b");
    let client = db.read().await.unwrap();
    assert!(client.on_replica());
    let n: i64 = client
        .query_one("SELECT count(*) FROM notes WHERE tenant_id = 'acme'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 50);
}

/// Issue 26.8: replicas under load. A tenant at its cap on the replica pool
/// (`tenant_max_connections`), or a replica pool with every connection in use
/// for longer than the probe's timeout, sends that read to the primary; the
/// replica stays healthy (its lag probe has a connection of its own) and
/// serves the next reads once connections are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_replica_pool_or_a_capped_tenant_reads_from_the_primary_without_marking_it_down() {
    let pair = ReplicaPair::create();
    let db = pair.database().await;
    let toml = format!(
        "version = 1\n[shards.a]\nurl = \"{}\"\npool = {{ max_size = 8, wait_timeout_ms = 1000 }}\n\
         max_replica_lag_ms = 1000\n\
         replicas = [{{ url = \"{}\", pool = {{ max_size = 2, wait_timeout_ms = 300, tenant_max_connections = 1 }} }}]\n",
        pair.primary_url(&db),
        pair.standby_url(&db),
    );
    let router = ShardRouter::new(MapLoader::without_env().load_str(&toml).unwrap()).unwrap();
    assert!(
        replica_healthy(&router, true).await,
        "{:?}",
        router.status()
    );
    let read = |tenant: &str| router.resolve(TenantId::new(tenant).unwrap());

    // `hot` holds its one replica connection: its next read goes to the primary.
    let hot = read("hot");
    let held = hot.read().await.unwrap();
    assert!(held.on_replica());
    let second = hot.read().await.unwrap();
    assert!(!second.on_replica(), "over its cap on the replica: primary");
    drop(second);

    // Every replica connection in use for longer than a probe's timeout.
    let other = read("other").read().await.unwrap();
    assert!(other.on_replica());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let third = read("third").read().await.unwrap();
    assert!(!third.on_replica(), "replica pool busy: primary");
    assert!(
        router
            .status()
            .shards
            .iter()
            .flat_map(|s| &s.replicas)
            .all(|r| r.healthy),
        "a busy pool is not a replica down: {:?}",
        router.status()
    );
    drop((held, other, third));
    let back = read("third").read().await.unwrap();
    assert!(back.on_replica(), "free connections: the replica again");
}
