//! Shard databases for one test, as `#[sqlx::test]` gives one database:
//! [`TestShards`] creates N uniquely named databases on a test server, applies
//! your migrations to each, hands you a map and a router over them, and drops
//! the databases when it is dropped. Behind the `testing` feature (enable it
//! in `[dev-dependencies]`).
//!
//! The server is `SHARD_ROUTER_TEST_PG` (default
//! `postgres://postgres@127.0.0.1:5432`); the role needs `CREATEDB`.
//!
//! ```no_run
//! use shard_router::migrate::Migrations;
//! use shard_router::testing::TestShards;
//! use shard_router::TenantId;
//!
//! #[tokio::test]
//! async fn notes_land_on_the_tenants_shard() {
//!     let shards = TestShards::create(2).await.unwrap();
//!     shards.migrate(&Migrations::load("migrations/notes").unwrap()).await.unwrap();
//!     let router = shards.router("[tenants]\nacme = \"b\"\n").unwrap();
//!     let db = router.resolve(TenantId::new("acme").unwrap());
//!     db.execute(
//!         "INSERT INTO notes (tenant_id, id, body) VALUES ($1, gen_random_uuid(), 'hi')",
//!         &[&"acme"],
//!     )
//!     .await
//!     .unwrap();
//!     assert_eq!(db.shard(), "b");
//! } // both databases are dropped here
//! ```

use std::sync::atomic::{AtomicU32, Ordering};

use crate::map::MapLoader;
use crate::migrate::Migrations;
use crate::{ShardMap, ShardRouter};

/// The environment variable naming the test server.
pub const TEST_SERVER_ENV: &str = "SHARD_ROUTER_TEST_PG";

const DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Why [`TestShards`] could not set the databases up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestShardsError {
    /// The test server could not be reached, or refused a statement.
    #[error("test server {server}: {message}")]
    Server {
        /// The server's URL (password redacted).
        server: String,
        /// What it said.
        message: String,
    },
    /// A migration failed on a shard.
    #[error("migrating shard {shard}: {message}")]
    Migrate {
        /// The shard.
        shard: String,
        /// What failed.
        message: String,
    },
    /// The map over the databases (with the extra TOML) is not valid.
    #[error(transparent)]
    Map(#[from] crate::MapError),
}

/// N shard databases for one test, dropped with it: see the [module](self).
pub struct TestShards {
    server: String,
    names: Vec<String>,
}

impl TestShards {
    /// Creates `n` empty databases named `srtest_<pid>_<sequence>_<nanos>_<i>`,
    /// for shards `a`, `b`, ... (at most 26).
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let shards = shard_router::testing::TestShards::create(3).await.unwrap();
    /// assert_eq!(shards.names().len(), 3);
    /// # }
    /// ```
    pub async fn create(n: usize) -> Result<TestShards, TestShardsError> {
        assert!((1..=26).contains(&n), "1 to 26 shards");
        let server = std::env::var(TEST_SERVER_ENV).unwrap_or_else(|_| DEFAULT_SERVER.to_owned());
        let seq = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mut shards = TestShards {
            server,
            names: Vec::with_capacity(n),
        };
        let admin = shards.admin().await?;
        for i in 0..n {
            let name = format!("srtest_{}_{seq}_{nanos}_{i}", std::process::id());
            admin
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .map_err(|e| shards.server_error(&e))?;
            // Pushed once it exists: dropped with `shards` from here on.
            shards.names.push(name);
        }
        Ok(shards)
    }

    /// The databases' names, shard `a` first.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The URL of shard `i`'s database.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let shards = shard_router::testing::TestShards::create(1).await.unwrap();
    /// let (client, connection) =
    ///     tokio_postgres::connect(&shards.url(0), tokio_postgres::NoTls).await.unwrap();
    /// # }
    /// ```
    pub fn url(&self, i: usize) -> String {
        format!("{}/{}", self.server.trim_end_matches('/'), self.names[i])
    }

    /// The map's TOML: version 1, the shards `a`, `b`, ... at their
    /// databases, then `extra` (pins, settings).
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let shards = shard_router::testing::TestShards::create(2).await.unwrap();
    /// assert!(shards.map_toml("").contains("[shards.b]"));
    /// # }
    /// ```
    pub fn map_toml(&self, extra: &str) -> String {
        let mut toml = "version = 1\n".to_owned();
        for i in 0..self.names.len() {
            toml += &format!("[shards.{}]\nurl = \"{}\"\n", shard_name(i), self.url(i));
        }
        toml + extra
    }

    /// The map of [`map_toml`](Self::map_toml), without environment overrides.
    pub fn map(&self, extra: &str) -> Result<ShardMap, TestShardsError> {
        Ok(MapLoader::without_env().load_str(&self.map_toml(extra))?)
    }

    /// A router over the map of [`map_toml`](Self::map_toml).
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let shards = shard_router::testing::TestShards::create(2).await.unwrap();
    /// let router = shards.router("[tenants]\nacme = \"a\"\n").unwrap();
    /// # }
    /// ```
    pub fn router(&self, extra: &str) -> Result<ShardRouter, TestShardsError> {
        ShardRouter::new(self.map(extra)?).map_err(|e| TestShardsError::Server {
            server: crate::map::redact_url(&self.server),
            message: e.to_string(),
        })
    }

    /// Applies `migrations` to every shard, as `shardctl migrate` does.
    pub async fn migrate(&self, migrations: &Migrations) -> Result<(), TestShardsError> {
        let map = self.map("")?;
        for report in crate::migrate::migrate(&map, migrations, |_, _| {}).await {
            if let Err(e) = report.outcome {
                return Err(TestShardsError::Migrate {
                    shard: report.shard,
                    message: e.to_string(),
                });
            }
        }
        Ok(())
    }

    async fn admin(&self) -> Result<tokio_postgres::Client, TestShardsError> {
        let url = format!("{}/postgres", self.server.trim_end_matches('/'));
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .map_err(|e| self.server_error(&e))?;
        tokio::spawn(connection);
        Ok(client)
    }

    fn server_error(&self, e: &tokio_postgres::Error) -> TestShardsError {
        TestShardsError::Server {
            server: crate::map::redact_url(&self.server),
            message: crate::pg::error_text(e),
        }
    }
}

impl Drop for TestShards {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.names);
        if names.is_empty() {
            return;
        }
        let url = format!("{}/postgres", self.server.trim_end_matches('/'));
        // Drop runs inside the test's runtime, which cannot be blocked on:
        // a thread with a runtime of its own waits for the drops.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let (client, connection) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                tokio::spawn(connection);
                for name in names {
                    client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await?;
                }
                Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("shard-router TestShards: dropping the test databases failed: {e}");
        }
    }
}

/// `a`, `b`, ... for shard `i`.
fn shard_name(i: usize) -> String {
    ((b'a' + i as u8) as char).to_string()
}

impl std::fmt::Debug for TestShards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestShards")
            .field("server", &crate::map::redact_url(&self.server))
            .field("names", &self.names)
            .finish()
    }
}
