//! A tenant-sharding router for SaaS backends on Postgres, as a [tower] layer.
//!
//! For each request, [`ShardRouterLayer`] finds the tenant (a header, a
//! subdomain, a path segment or your own extractor), looks it up in a
//! versioned [`ShardMap`], and hands your handler a [`TenantDb`]: pooled
//! connections (deadpool-postgres over tokio-postgres) to that tenant's shard.
//!
//! ```rust,no_run
//! use axum::{routing::get, Json, Router};
//! use shard_router::{tenant::HeaderExtractor, DbError, ShardMap, ShardRouter, ShardRouterLayer, TenantDb};
//!
//! async fn count_notes(db: TenantDb) -> Result<Json<i64>, DbError> {
//!     let client = db.read().await?;
//!     let row = client
//!         .query_one("SELECT count(*) FROM notes WHERE tenant_id = $1", &[&db.tenant().as_str()])
//!         .await?;
//!     Ok(Json(row.get(0)))
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let router = ShardRouter::new(ShardMap::from_file("shard-map.toml")?)?;
//! let app: Router = Router::new()
//!     .route("/notes", get(count_notes))
//!     .layer(ShardRouterLayer::new(router, HeaderExtractor::default()));
//! # Ok(()) }
//! ```
//!
//! - [`TenantDb`]: reads, snapshots, single writes and transactions for one
//!   tenant, on one map version for the whole request.
//! - [`ShardRouter`]: the live map and the pools; [`ShardRouter::fan_out`] for
//!   work on every shard.
//! - [`control`]: maps published to a control database and followed by every
//!   router; [`watch`] for a map file.
//! - [`moves`]: moving a tenant between shards online (`shardctl tenant move`).
//! - [`migrate`]: one schema on every shard.
//! - [`guide`]: one page per task, from handlers to benchmarks.
//!
//! Features: `grpc` (tonic statuses and the handle from a `tonic::Request`),
//! `chrono`, `time`, `serde_json` (column types), `cli` (the `shardctl`
//! binary).
//!
//! [tower]: https://docs.rs/tower
#![forbid(unsafe_code)]
#![deny(missing_docs, missing_debug_implementations, unreachable_pub)]

pub mod accounting;
pub mod control;
pub mod db;
pub mod fan_out;
pub mod guide;
mod hash;
pub mod layer;
mod limit;
pub mod map;
pub mod metrics;
pub mod migrate;
pub mod moves;
pub mod pg;
pub mod plan;
pub mod read_token;
pub mod rejection;
pub mod replicas;
pub mod router;
pub mod status;
pub mod tenant;
#[cfg(feature = "testing")]
pub mod testing;
pub mod watch;

pub use db::{
    DbError, DbErrorKind, DbErrorReport, FromRow, TenantClient, TenantDb, TenantQuery,
    TenantSnapshot, TenantWriter,
};
/// The driver the handle's clients and rows come from, re-exported so that the
/// crate you build against is the one the API hands out.
pub use deadpool_postgres;
/// The driver the handle's clients and rows come from (see [`deadpool_postgres`]).
pub use tokio_postgres;

/// With the `chrono` feature: `timestamptz` as `chrono::DateTime<Utc>` and friends.
///
/// ```
/// # #[cfg(feature = "chrono")] {
/// use shard_router::chrono::{DateTime, Utc};
/// use shard_router::tokio_postgres::types::{FromSql, ToSql};
/// fn takes<T: ToSql + for<'a> FromSql<'a>>() {}
/// takes::<DateTime<Utc>>();
/// # }
/// ```
#[cfg(feature = "chrono")]
pub use chrono;
pub use fan_out::{FanOut, FanOutError, ShardClient, ShardResult};
pub use layer::{Protocol, ShardRouterLayer, ShardRouterService};
pub use map::{MapError, ShardMap};
pub use migrate::Migrations;
pub use read_token::{ReadToken, TOKEN_HEADER};
pub use rejection::Rejection;
pub use router::{Applied, ApplyError, MapSource, RoutingTable, ShardRouter};
/// With the `serde_json` feature: `json`/`jsonb` as `serde_json::Value`.
///
/// ```
/// # #[cfg(feature = "serde_json")] {
/// use shard_router::tokio_postgres::types::{FromSql, ToSql};
/// fn takes<T: ToSql + for<'a> FromSql<'a>>() {}
/// takes::<shard_router::serde_json::Value>();
/// # }
/// ```
#[cfg(feature = "serde_json")]
pub use serde_json;
pub use tenant::{TenantExtractor, TenantId, TenantIdError};
/// With the `time` feature: `timestamptz` as `time::OffsetDateTime` and friends.
///
/// ```
/// # #[cfg(feature = "time")] {
/// use shard_router::tokio_postgres::types::{FromSql, ToSql};
/// fn takes<T: ToSql + for<'a> FromSql<'a>>() {}
/// takes::<shard_router::time::OffsetDateTime>();
/// # }
/// ```
#[cfg(feature = "time")]
pub use time;
