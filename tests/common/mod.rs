//! Helpers shared by the integration tests: real Postgres, uniquely named databases.
//!
//! The server comes from `SHARD_ROUTER_TEST_PG` (default
//! `postgres://postgres@127.0.0.1:5432`); every test creates its own databases
//! and drops them when done, even if it fails.
#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicU32, Ordering};

use shard_router::map::MapLoader;
use shard_router::ShardMap;
use tokio_postgres::NoTls;

/// The server the tests use.
pub fn server() -> String {
    std::env::var("SHARD_ROUTER_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// A URL for database `db` on the test server.
pub fn db_url(db: &str) -> String {
    format!("{}/{db}", server())
}

/// Connects to `url`, driving the connection on a task.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e} (is Postgres running?)"));
    tokio::spawn(connection);
    client
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Uniquely named shard databases, dropped on drop.
pub struct Shards {
    pub names: Vec<String>,
}

impl Shards {
    /// Creates `n` empty databases named `srt_<pid>_<seq>_<i>`.
    pub async fn create(n: usize) -> Shards {
        let admin = connect(&db_url("postgres")).await;
        let seq = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let mut names = Vec::new();
        for i in 0..n {
            let name = format!("srt_{}_{seq}_{nanos}_{i}", std::process::id());
            admin
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .unwrap();
            names.push(name);
        }
        Shards { names }
    }

    /// The URL of database `i`.
    pub fn url(&self, i: usize) -> String {
        db_url(&self.names[i])
    }

    /// Runs `sql` on every database.
    pub async fn run_everywhere(&self, sql: &str) {
        for i in 0..self.names.len() {
            connect(&self.url(i))
                .await
                .batch_execute(sql)
                .await
                .unwrap();
        }
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.names);
        // Drop runs inside a runtime; use a thread with its own to wait for the drops.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let admin = connect(&db_url("postgres")).await;
                for name in names {
                    let _ = admin
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join()
        .unwrap();
    }
}

/// The example's schema.
pub const NOTES_SCHEMA: &str = include_str!("../../migrations/notes/V1__notes.sql");

/// A map of `version` over shards named `a`, `b`, ... on `shards`, plus `extra` TOML.
pub fn map(version: u64, shards: &Shards, extra: &str) -> ShardMap {
    MapLoader::without_env()
        .load_str(&map_toml(version, shards, extra))
        .unwrap()
}

/// The TOML of [`map`].
pub fn map_toml(version: u64, shards: &Shards, extra: &str) -> String {
    let mut toml = format!("version = {version}\n");
    for (i, _) in shards.names.iter().enumerate() {
        toml += &format!(
            "[shards.{}]\nurl = \"{}\"\npool = {{ max_size = 8, wait_timeout_ms = 1000 }}\n",
            shard_name(i),
            shards.url(i)
        );
    }
    toml + extra
}

/// `a`, `b`, `c`, ... for shard `i`.
pub fn shard_name(i: usize) -> String {
    ((b'a' + i as u8) as char).to_string()
}

/// Number of notes of `tenant` in database `url`.
pub async fn notes_of(url: &str, tenant: &str) -> i64 {
    connect(url)
        .await
        .query_one(
            "SELECT count(*) FROM notes WHERE tenant_id = $1",
            &[&tenant],
        )
        .await
        .unwrap()
        .get(0)
}

/// A TCP proxy to the test server that the test can cut and restore, to play a
/// database that goes away and comes back.
pub struct Proxy {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to 127.0.0.1:`target`.
    pub async fn start(target: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let links = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (cut2, links2) = (cut.clone(), links.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if cut2.load(Ordering::SeqCst) {
                    drop(inbound); // refused while cut
                    continue;
                }
                let link = tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                links2.lock().unwrap().push(link.abort_handle());
            }
        });
        Proxy {
            port,
            cut,
            links,
            accept,
        }
    }

    /// A URL for database `db` through the proxy.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    /// Whether it is cut now.
    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Polls `condition` every 5 ms until it holds or `limit` passes; returns whether it held.
pub async fn eventually(limit: std::time::Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    condition()
}

/// The example binary `name`, built with the features this test was built with
/// (so the library is not rebuilt for it).
pub fn example_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let binary = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build
        .args(["build", "--features", "chrono", "--example", name])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if cfg!(feature = "grpc") {
        build.args(["--features", "grpc"]);
    }
    assert!(
        build.status().unwrap().success(),
        "cannot build example {name}"
    );
    binary
}

/// A server process, killed when dropped.
pub struct Server(pub std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `shardctl` with `SHARD_ROUTER_CONTROL` set to `control_url`, run without blocking the runtime.
pub async fn shardctl(control_url: &str, args: &[&str]) -> std::process::Output {
    // Built only with the `cli` feature (the README's test command has it).
    let Some(binary) = option_env!("CARGO_BIN_EXE_shardctl") else {
        panic!("shardctl is built with the `cli` feature: cargo test --all-features");
    };
    tokio::process::Command::new(binary)
        .args(args)
        .env("SHARD_ROUTER_CONTROL", control_url)
        .output()
        .await
        .unwrap()
}

/// Runs `program` with `args`, panicking with its output if it fails (for
/// tests that set up clusters with `pg_createcluster`, `openssl` and the like).
pub fn run_command(program: &str, args: &[&str]) {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A loopback port free at the time of asking (for extra test clusters).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
