#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![deny(missing_docs, missing_debug_implementations, unreachable_pub)]

pub mod control;
pub mod db;
pub mod layer;
mod limit;
pub mod map;
pub mod migrate;
pub mod moves;
pub mod pg;
pub mod rejection;
pub mod router;
pub mod status;
pub mod tenant;
pub mod watch;

pub use db::{DbError, TenantClient, TenantDb, TenantWriter};
pub use layer::{Protocol, ShardRouterLayer, ShardRouterService};
pub use map::{MapError, ShardMap};
pub use migrate::Migrations;
pub use rejection::Rejection;
pub use router::{Applied, ApplyError, MapSource, RoutingTable, ShardRouter};
pub use tenant::{TenantExtractor, TenantId, TenantIdError};
