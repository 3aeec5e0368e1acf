#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![deny(missing_docs, missing_debug_implementations, unreachable_pub)]

pub mod accounting;
pub mod control;
pub mod db;
pub mod fan_out;
pub mod layer;
mod limit;
pub mod map;
pub mod metrics;
pub mod migrate;
pub mod moves;
pub mod pg;
pub mod plan;
pub mod rejection;
pub mod replicas;
pub mod router;
pub mod status;
pub mod tenant;
pub mod watch;

pub use db::{
    DbError, DbErrorKind, DbErrorReport, TenantClient, TenantDb, TenantQuery, TenantSnapshot,
    TenantWriter,
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
pub use rejection::Rejection;
pub use replicas::{ReadToken, TOKEN_HEADER};
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
