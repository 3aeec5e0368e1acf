//! TLS end to end: a Postgres cluster of its own with `ssl = on`, a certificate
//! this test makes, and a `pg_hba.conf` that refuses plaintext over TCP.
//! Shards, the control database, a tenant move and `shardctl` all go over it;
//! `verify-full` refuses a host name the certificate does not carry, and both
//! verifying modes refuse a certificate from another CA.
//!
//! Needs `pg_createcluster` and `openssl` (both on a Debian PostgreSQL host) and
//! root, as CI has; skipped with a message when they are missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use shard_router::control::{ControlPlane, PublishOptions};
use shard_router::map::MapLoader;
use shard_router::moves::{self, MoveOptions};
use shard_router::{ShardRouter, TenantId};

const PASSWORD: &str = "tls-test-secret";

/// A throwaway cluster with TLS on, dropped on drop.
struct TlsCluster {
    name: String,
    port: u16,
    dir: PathBuf,
}

use common::run_command as run;

/// A CA (`{name}.pem`, `{name}.key`) made with openssl.
fn make_ca(dir: &Path, name: &str) {
    let (key, pem) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.pem")),
    );
    run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=shard-router test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            pem.to_str().unwrap(),
        ],
    );
}

impl TlsCluster {
    fn create(tag: &str) -> Option<TlsCluster> {
        let available = |p: &str| {
            Command::new("which")
                .arg(p)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !available("pg_createcluster") || !available("openssl") {
            eprintln!("skipped: needs pg_createcluster and openssl");
            return None;
        }
        let name = format!("srt_tls_{}_{tag}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        make_ca(&dir, "ca");
        make_ca(&dir, "other_ca");
        // The server's certificate names `localhost` only, not 127.0.0.1.
        let path = |f: &str| dir.join(f).to_str().unwrap().to_owned();
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        run(
            "openssl",
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                "/CN=localhost",
                "-keyout",
                &path("server.key"),
                "-out",
                &path("server.csr"),
            ],
        );
        run(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &path("server.csr"),
                "-CA",
                &path("ca.pem"),
                "-CAkey",
                &path("ca.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &path("server.ext"),
                "-out",
                &path("server.pem"),
            ],
        );
        run("chown", &["-R", "postgres", dir.to_str().unwrap()]);
        run("chmod", &["755", dir.to_str().unwrap()]);
        run("chmod", &["600", &path("server.key")]);

        let port = common::free_port();
        run(
            "pg_createcluster",
            &[
                "15",
                &name,
                "-p",
                &port.to_string(),
                "-o",
                "ssl=on",
                "-o",
                &format!("ssl_cert_file={}", path("server.pem")),
                "-o",
                &format!("ssl_key_file={}", path("server.key")),
                "-o",
                "max_connections=100",
            ],
        );
        let cluster = TlsCluster { name, port, dir };
        // Plaintext over TCP is refused; a password is required over TLS, so the
        // tests carry one in every URL (the secrets check looks for it).
        std::fs::write(
            format!("/etc/postgresql/15/{}/pg_hba.conf", cluster.name),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n\
             hostssl all all ::1/128 scram-sha-256\n\
             hostnossl all all all reject\n",
        )
        .unwrap();
        run(
            "pg_ctlcluster",
            &["--skip-systemctl-redirect", "15", &cluster.name, "start"],
        );
        Some(cluster)
    }

    /// A URL to `db` over TCP as the password-carrying test role.
    fn url(&self, host: &str, db: &str, params: &str) -> String {
        format!(
            "postgres://postgres:{PASSWORD}@{host}:{}/{db}?{params}",
            self.port
        )
    }

    fn ca(&self, name: &str) -> String {
        self.dir
            .join(format!("{name}.pem"))
            .to_str()
            .unwrap()
            .to_owned()
    }

    /// A superuser session over the Unix socket (trusted), for setup.
    async fn admin(&self, db: &str) -> tokio_postgres::Client {
        common::connect(&format!(
            "host=/var/run/postgresql port={} user=postgres dbname={db}",
            self.port
        ))
        .await
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        let _ = Command::new("pg_dropcluster")
            .args(["--stop", "15", &self.name])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether a server-side session over `url` is encrypted.
async fn session_is_encrypted(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_control_moves_and_shardctl_work_over_verified_tls() {
    let Some(cluster) = TlsCluster::create("e2e") else {
        return;
    };
    let admin = cluster.admin("postgres").await;
    for sql in [
        format!("ALTER ROLE postgres PASSWORD '{PASSWORD}'"),
        "CREATE DATABASE shard_a".to_owned(),
        "CREATE DATABASE shard_b".to_owned(),
        "CREATE DATABASE control".to_owned(),
    ] {
        admin.batch_execute(&sql).await.unwrap();
    }
    for db in ["shard_a", "shard_b"] {
        cluster
            .admin(db)
            .await
            .batch_execute(common::NOTES_SCHEMA)
            .await
            .unwrap();
    }
    let full = format!("sslmode=verify-full&sslrootcert={}", cluster.ca("ca"));
    let map_toml = |version: u64, extra: &str| {
        format!(
            "version = {version}\n\
             [shards.a]\nurl = \"{}\"\n\
             [shards.b]\nurl = \"{}\"\n{extra}",
            cluster.url("localhost", "shard_a", &full),
            cluster.url("localhost", "shard_b", &full),
        )
    };

    // Shards: the router's pools connect with verify-full, and the server sees TLS.
    let router = ShardRouter::new(
        MapLoader::without_env()
            .load_str(&map_toml(1, "[tenants]\nacme = \"a\"\n"))
            .unwrap(),
    )
    .unwrap();
    let db = router.resolve(TenantId::new("acme").unwrap());
    let mut writer = db.write().await.expect("a write over TLS");
    for i in 0..5 {
        writer
            .execute(
                "INSERT INTO notes (tenant_id, id, body) VALUES ($1, $2, $3)",
                &[&"acme", &uuid::Uuid::new_v4(), &format!("note {i}")],
            )
            .await
            .unwrap();
    }
    writer.commit().await.unwrap();
    let reader = db.read().await.expect("a read over TLS");
    assert!(session_is_encrypted(&reader).await);
    drop(reader);

    // Control database over TLS: init, publish, fetch.
    let control_url = cluster.url("localhost", "control", &full);
    let mut control = ControlPlane::connect(&control_url)
        .await
        .expect("control over TLS");
    control.init().await.unwrap();
    control
        .publish(
            &map_toml(1, "[tenants]\nacme = \"a\"\n"),
            &PublishOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(control.latest().await.unwrap().version, 1);

    // A move between two TLS shards, its control record on the TLS control database.
    let mut options = MoveOptions::default();
    options.wait = Duration::from_secs(10);
    options.purge_grace = Duration::from_millis(10);
    options.purge_source = true;
    let status = moves::start(
        &mut control,
        &TenantId::new("acme").unwrap(),
        "b",
        &options,
        |_| {},
    )
    .await
    .expect("a move over TLS");
    assert_eq!(status.phase, "complete", "{status:?}");
    let on_b: i64 = cluster
        .admin("shard_b")
        .await
        .query_one("SELECT count(*) FROM notes WHERE tenant_id = 'acme'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(on_b, 5);

    // shardctl over TLS, text and JSON, and never the password.
    for args in [
        &["map", "show"][..],
        &["--json", "map", "show"][..],
        &["tenant", "locate", "acme"][..],
        &["migrate", "--dir", "migrations/notes", "--dry-run"][..],
    ] {
        let out = common::shardctl(&control_url, args).await;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "shardctl {args:?}: {text}");
        assert!(
            !text.contains(PASSWORD),
            "shardctl {args:?} printed the password: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sslmode_encrypts_and_verifies_as_libpq_does() {
    let Some(cluster) = TlsCluster::create("modes") else {
        return;
    };
    cluster
        .admin("postgres")
        .await
        .batch_execute(&format!("ALTER ROLE postgres PASSWORD '{PASSWORD}'"))
        .await
        .unwrap();
    let ca = cluster.ca("ca");
    let other = cluster.ca("other_ca");
    let connect = |host: &str, params: String| {
        let url = cluster.url(host, "postgres", &params);
        async move {
            ControlPlane::connect(&url)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    let accepted = [
        ("localhost", format!("sslmode=verify-full&sslrootcert={ca}")),
        // verify-ca checks the chain, not the name.
        ("127.0.0.1", format!("sslmode=verify-ca&sslrootcert={ca}")),
        // require encrypts without checking (libpq's meaning).
        ("127.0.0.1", "sslmode=require".to_owned()),
        ("localhost", format!("sslmode=require&sslrootcert={ca}")),
    ];
    for (host, params) in accepted {
        connect(host, params.clone())
            .await
            .unwrap_or_else(|e| panic!("{host} {params}: {e}"));
    }
    let refused = [
        // The certificate names localhost, not 127.0.0.1.
        (
            "127.0.0.1",
            format!("sslmode=verify-full&sslrootcert={ca}"),
            "certificate",
        ),
        // Another CA's roots.
        (
            "localhost",
            format!("sslmode=verify-full&sslrootcert={other}"),
            "certificate",
        ),
        (
            "localhost",
            format!("sslmode=verify-ca&sslrootcert={other}"),
            "certificate",
        ),
        // require with a root file verifies the chain, as libpq does.
        (
            "localhost",
            format!("sslmode=require&sslrootcert={other}"),
            "certificate",
        ),
        // Plaintext is refused by this server's pg_hba.conf.
        ("localhost", "sslmode=disable".to_owned(), "no encryption"),
        // A root file that is not there.
        (
            "localhost",
            "sslmode=verify-full&sslrootcert=/nonexistent.pem".to_owned(),
            "/nonexistent.pem",
        ),
    ];
    for (host, params, expect) in refused {
        let err = connect(host, params.clone())
            .await
            .expect_err(&format!("{host} {params} must be refused"));
        assert!(err.contains(expect), "{host} {params}: {err}");
        assert!(!err.contains(PASSWORD), "{err}");
    }

    // A router whose shard's name does not match: its requests are refused as
    // unavailable, and it never falls back to plaintext.
    let map = MapLoader::without_env()
        .load_str(&format!(
            "version = 1\n[shards.a]\nurl = \"{}\"\npool = {{ connect_timeout_ms = 2000 }}\n",
            cluster.url(
                "127.0.0.1",
                "postgres",
                &format!("sslmode=verify-full&sslrootcert={ca}")
            )
        ))
        .unwrap();
    let router = ShardRouter::new(map).unwrap();
    let err = router
        .resolve(TenantId::new("acme").unwrap())
        .read()
        .await
        .expect_err("a wrong host name is refused");
    assert!(err.is_unavailable(), "{err}");

    // A router given a map whose root file is missing refuses the map and keeps its own.
    let bad = MapLoader::without_env()
        .load_str(&format!(
            "version = 2\n[shards.a]\nurl = \"{}\"\n",
            cluster.url(
                "localhost",
                "postgres",
                "sslmode=verify-full&sslrootcert=/nonexistent.pem"
            )
        ))
        .unwrap();
    let err = router.apply(bad).expect_err("missing root file refused");
    assert!(err.to_string().contains("/nonexistent.pem"), "{err}");
    assert_eq!(router.version(), 1);
}
