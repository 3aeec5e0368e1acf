//! Row-level security must not blind the data checks, and connections must
//! never carry one tenant's setting into another's request.

mod common;

use std::time::Duration;

use common::{map_toml, Shards, NOTES_SCHEMA};
use shard_router::control::{ControlPlane, PublishError, PublishOptions};
use shard_router::map::MapLoader;
use shard_router::migrate::ShardError;
use shard_router::moves::{self, MoveError, MoveOptions};
use shard_router::{ShardRouter, TenantId};

/// A login role subject to RLS on `notes` (policy on `app.tenant_id`), on every shard.
async fn app_role(shards: &Shards) -> String {
    let role = format!("srt_rls_{}", shards.names[0]);
    let admin = common::connect(&shards.url(0)).await;
    let _ = admin
        .batch_execute(&format!("CREATE ROLE {role} LOGIN"))
        .await;
    // Row images of a moving tenant are applied in replica mode by the routers' role.
    admin
        .batch_execute(&format!(
            "GRANT SET ON PARAMETER session_replication_role TO {role}"
        ))
        .await
        .unwrap();
    shards
        .run_everywhere(&format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON notes TO {role};
             ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
             CREATE POLICY tenant_isolation ON notes
               USING (tenant_id = current_setting('app.tenant_id', true))
               WITH CHECK (tenant_id = current_setting('app.tenant_id', true));"
        ))
        .await;
    role
}

async fn drop_role(shards: &Shards, role: &str) {
    shards
        .run_everywhere(&format!("DROP OWNED BY {role}"))
        .await;
    let admin = common::connect(&shards.url(0)).await;
    for _ in 0..50 {
        if admin
            .batch_execute(&format!("DROP ROLE IF EXISTS {role}"))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The TOML of a map whose shards connect as `role`, optionally with admin URLs.
fn rls_map(version: u64, shards: &Shards, role: &str, admin: bool, extra: &str) -> String {
    let mut toml = format!("version = {version}\ntenant_setting = \"app.tenant_id\"\n");
    for (i, _) in shards.names.iter().enumerate() {
        toml += &format!(
            "[shards.{}]\nurl = \"{}\"\n",
            common::shard_name(i),
            shards.url(i).replace("postgres@", &format!("{role}@"))
        );
        if admin {
            toml += &format!("admin_url = \"{}\"\n", shards.url(i));
        }
    }
    toml + extra
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_level_security_cannot_blind_the_rehoming_check_or_a_move() {
    let control_db = Shards::create(1).await;
    let shards = Shards::create(2).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    let role = app_role(&shards).await;
    // Ten tenants with data, all on a (pinned there in v1).
    let tenants: Vec<String> = (0..10).map(|i| format!("t{i}")).collect();
    let seed = common::connect(&shards.url(0)).await;
    let mut pins = String::from("[tenants]\n");
    for t in &tenants {
        seed.execute(
            "INSERT INTO notes (tenant_id, id, body) VALUES ($1, gen_random_uuid(), 'x')",
            &[t],
        )
        .await
        .unwrap();
        pins += &format!("{t} = \"a\"\n");
    }
    let mut control = ControlPlane::connect(&control_db.url(0)).await.unwrap();
    control.init().await.unwrap();
    control
        .publish(
            &rls_map(1, &shards, &role, false, &pins),
            &PublishOptions::default(),
        )
        .await
        .unwrap();

    // Unpinning them all would send some to b. As the app role the check would
    // see no rows and pass; it must refuse, naming the table and the role.
    let unpinned = rls_map(2, &shards, &role, false, "");
    let err = control
        .publish(&unpinned, &PublishOptions::default())
        .await
        .expect_err("a blinded check is refused");
    match &err {
        PublishError::Check(e) => match &e.0 {
            ShardError::RowSecurity {
                shard,
                role: r,
                tables,
            } => {
                assert_eq!(shard, "a");
                assert_eq!(r, &role);
                assert_eq!(tables, &["public.notes"]);
            }
            other => panic!("expected RowSecurity, got {other:?}"),
        },
        other => panic!("expected a check error, got {other:?}"),
    }
    assert_eq!(
        control.latest().await.unwrap().version,
        1,
        "nothing published"
    );

    // A move through the app role is refused before anything is recorded.
    let id = TenantId::new("t0").unwrap();
    let err = moves::start(&mut control, &id, "b", &MoveOptions::default(), |_| {})
        .await
        .expect_err("a blinded move is refused");
    assert!(
        matches!(err, MoveError::Shard(ShardError::RowSecurity { .. })),
        "{err:?}"
    );
    assert!(moves::status(&control, &id).await.unwrap().is_none());
    assert_eq!(control.latest().await.unwrap().version, 1);

    // With admin_url set the check sees every tenant and refuses the unpin
    // for what it is: re-homing tenants with data.
    control
        .publish(
            &rls_map(2, &shards, &role, true, &pins),
            &PublishOptions::default(),
        )
        .await
        .unwrap();
    let err = control
        .publish(
            &rls_map(3, &shards, &role, true, ""),
            &PublishOptions::default(),
        )
        .await
        .expect_err("re-homing refused");
    let PublishError::Rehoming {
        tenants: rehomed, ..
    } = &err
    else {
        panic!("expected Rehoming, got {err:?}");
    };
    assert!(!rehomed.is_empty());
    assert!(rehomed.iter().all(|r| r.from == "a" && r.to == "b"));

    // The routers' role applies a moving tenant's row images in replica mode:
    // without the right to, the move is refused before anything changes.
    let admin = common::connect(&shards.url(0)).await;
    let grant = |verb: &str| {
        format!(
            "{verb} SET ON PARAMETER session_replication_role {} {role}",
            if verb == "GRANT" { "TO" } else { "FROM" }
        )
    };
    admin.batch_execute(&grant("REVOKE")).await.unwrap();
    let err = moves::start(&mut control, &id, "b", &MoveOptions::default(), |_| {})
        .await
        .expect_err("the routers' role cannot apply row images");
    assert!(
        matches!(err, MoveError::ReplicaRoleRefused { .. }),
        "{err:?}"
    );
    assert!(moves::status(&control, &id).await.unwrap().is_none());
    admin.batch_execute(&grant("GRANT")).await.unwrap();

    // And a move copies every row through the admin role.
    let mut options = MoveOptions::default();
    options.wait = Duration::from_secs(5);
    options.purge_source = true;
    options.purge_grace = Duration::from_millis(10);
    let status = moves::start(&mut control, &id, "b", &options, |_| {})
        .await
        .unwrap();
    assert_eq!(status.phase, "complete");
    assert_eq!(common::notes_of(&shards.url(1), "t0").await, 1);
    assert_eq!(common::notes_of(&shards.url(0), "t0").await, 0);
    drop(control);
    drop_role(&shards, &role).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_or_renaming_tenant_setting_never_hands_out_the_previous_tenant() {
    let shards = Shards::create(1).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    let role = app_role(&shards).await;
    common::connect(&shards.url(0))
        .await
        .batch_execute(
            "INSERT INTO notes (tenant_id, id, body) VALUES ('alice', gen_random_uuid(), 'secret')",
        )
        .await
        .unwrap();
    let load = |toml: String| MapLoader::without_env().load_str(&toml).unwrap();
    // One connection: whatever bob gets is the one alice used.
    let one = "[shards.a.pool]\nmax_size = 1\n";
    let with_setting = |v| rls_map(v, &shards, &role, false, "") + one;
    let router = ShardRouter::new(load(with_setting(1))).unwrap();
    let alice = router.resolve(TenantId::new("alice").unwrap());
    let seen: i64 = alice
        .read()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM notes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 1, "alice sees her row");

    for (version, setting) in [(2, "tenant_setting = \"app.other\"\n"), (3, "")] {
        let toml = with_setting(version).replace("tenant_setting = \"app.tenant_id\"\n", setting);
        router.apply(load(toml)).unwrap();
        let bob = router.resolve(TenantId::new("bob").unwrap());
        let client = bob.read().await.unwrap();
        let row = client
            .query_one(
                "SELECT current_setting('app.tenant_id', true), (SELECT count(*) FROM notes)",
                &[],
            )
            .await
            .unwrap();
        let (left, visible): (Option<String>, i64) = (row.get(0), row.get(1));
        assert_ne!(
            left.as_deref(),
            Some("alice"),
            "v{version}: alice's setting survived"
        );
        assert_eq!(visible, 0, "v{version}: bob saw alice's rows");
    }
    drop(router);
    drop(alice);
    drop_role(&shards, &role).await;
}

#[tokio::test]
async fn admin_url_is_validated_redacted_and_overridable() {
    let shards = Shards::create(1).await;
    let toml = map_toml(1, &shards, "") + "";
    let with_admin = toml.replacen(
        "pool = ",
        "admin_url = \"postgres://admin:hunter2@h/db\"\npool = ",
        1,
    );
    let map = MapLoader::without_env().load_str(&with_admin).unwrap();
    assert_eq!(
        map.shards()[0].admin_url(),
        Some("postgres://admin:hunter2@h/db")
    );
    assert!(!format!("{map:?}").contains("hunter2"));
    let bad = toml.replacen(
        "pool = ",
        "admin_url = \"postgres://h/db?sslmode=bogus\"\npool = ",
        1,
    );
    let err = MapLoader::without_env()
        .load_str(&bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("shards.a.admin_url"), "{err}");
}

/// Every surface an operator sees, with a known password in every URL (the
/// server trusts local connections, so the password is carried but unused):
/// the example's logs at debug level (including a control connection lost and
/// regained, and a refused map), `GET /_router`, and shardctl in text and JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_password_appears_on_no_output_surface() {
    use std::process::{Command, Stdio};
    const SECRET: &str = "Pa55w0rdNeverShown";
    let shards = Shards::create(2).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    let control_db = Shards::create(1).await;
    let with_password = |url: String| url.replace("postgres@", &format!("postgres:{SECRET}@"));
    let control_url = with_password(control_db.url(0));
    let mut toml = String::from("version = 1\n");
    for i in 0..2 {
        toml += &format!(
            "[shards.{}]\nurl = \"{}?application_name=x&password={SECRET}\"\nadmin_url = \"host=127.0.0.1 user=postgres password='{SECRET}' dbname={}\"\n\
             replicas = [{{ url = \"{}\" }}]\n",
            common::shard_name(i),
            with_password(shards.url(i)).split('?').next().unwrap(),
            shards.names[i],
            // Not a standby (the probe keeps it out of reads), but its URL
            // carries the password to every surface that shows replicas.
            with_password(shards.url(i)),
        );
    }
    let mut control = ControlPlane::connect(&control_url).await.unwrap();
    control.init().await.unwrap();
    control
        .publish(&toml, &PublishOptions::default())
        .await
        .unwrap();

    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (addr, admin) = (free(), free());
    let log = std::env::temp_dir().join(format!("secrets-{}.log", std::process::id()));
    let server = common::Server(
        Command::new(common::example_binary("axum_app"))
            .args(["--control", &control_url])
            .args([
                "--listen",
                &addr.to_string(),
                "--admin-listen",
                &admin.to_string(),
            ])
            .env("RUST_LOG", "debug")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::from(
                std::fs::File::create(log.with_extension("err")).unwrap(),
            ))
            .spawn()
            .unwrap(),
    );
    let http = |method: &str, path: &str, port: u16| {
        let out = Command::new("curl")
            .args([
                "-s",
                "-X",
                method,
                "-H",
                "x-tenant-id: acme",
                "-H",
                "content-type: application/json",
            ])
            .args([
                "-d",
                if method == "POST" {
                    "{\"body\":\"hi\"}"
                } else {
                    ""
                },
            ])
            .arg(format!("http://127.0.0.1:{port}{path}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for _ in 0..100 {
        if std::net::TcpStream::connect(admin).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut seen = String::new();
    seen += &http("POST", "/notes", addr.port());
    seen += &http("GET", "/notes", addr.port());
    // The control connection lost and regained, and a map the router refuses.
    common::connect(&control_db.url(0))
        .await
        .batch_execute(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{}' AND pid <> pg_backend_pid()",
            control_db.names[0]
        ))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = http("GET", "/_router", admin.port());
    assert!(status.contains("\"map_version\":1"), "{status}");
    assert!(
        status.contains("***"),
        "the control URL is shown, redacted: {status}"
    );
    seen += &status;
    assert!(
        http("GET", "/_router", addr.port()).is_empty()
            || !http("GET", "/_router", addr.port()).contains("map_version"),
        "/_router is not served on the public listener"
    );

    for args in [
        &["map", "show"][..],
        &["--json", "map", "show"][..],
        &["map", "history"][..],
        &["--json", "map", "history"][..],
        &["routers"][..],
        &["--json", "routers"][..],
        &["tenant", "locate", "acme"][..],
        &["--json", "tenant", "locate", "acme"][..],
        &["migrate", "status", "--dir", "migrations/notes"][..],
        &["--json", "migrate", "status", "--dir", "migrations/notes"][..],
        &["control", "init"][..],
        &["--json", "control", "init"][..],
    ] {
        let out = common::shardctl(&control_url, args).await;
        seen += &String::from_utf8_lossy(&out.stdout);
        seen += &String::from_utf8_lossy(&out.stderr);
    }
    // An unreachable control database, by the CLI.
    let down = common::shardctl(
        &format!("postgres://postgres:{SECRET}@127.0.0.1:1/x"),
        &["map", "show"],
    )
    .await;
    assert!(!down.status.success());
    seen += &String::from_utf8_lossy(&down.stderr);

    // The surfaces did show the URLs, redacted.
    assert!(seen.contains("postgres:***@"), "{seen}");
    assert!(seen.contains("password=***"), "{seen}");
    drop(server);
    let logs = std::fs::read_to_string(&log).unwrap()
        + &std::fs::read_to_string(log.with_extension("err")).unwrap();
    assert!(logs.contains("DEBUG"), "the example logged at debug level");
    assert!(
        logs.contains("control database unreachable"),
        "the lost control connection was logged"
    );
    for (surface, text) in [("logs", &logs), ("HTTP and CLI output", &seen)] {
        if let Some(at) = text.find(SECRET) {
            let line = text[..at].rsplit('\n').next().unwrap_or("");
            panic!("{surface} show the password: ...{line}{SECRET}...");
        }
    }
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(log.with_extension("err"));
}
