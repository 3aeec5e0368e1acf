//! What a router reports to operators: map version, source, confirmation, pools.
//!
//! [`ShardRouter::status`] returns a [`RouterStatus`]; [`StatusService`] serves
//! it as JSON, e.g. at `GET /_router` (mount it outside the tenant layer).
//!
//! # Example
//!
//! ```
//! use axum::{routing::get, Router};
//! use shard_router::{map::MapLoader, status::StatusService, ShardRouter};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
//! let app: Router = Router::new().route_service("/_router", StatusService::new(router.clone()));
//! assert_eq!(router.status().map_version, 1);
//! # }
//! ```

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::task::{Context, Poll};
use std::time::UNIX_EPOCH;

use http::{header, HeaderValue, Request, Response};
use serde::Serialize;
use tower_service::Service;

use crate::ShardRouter;

/// A router's state, as `GET /_router` shows it.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct RouterStatus {
    /// The live map version.
    pub map_version: u64,
    /// `static`, `file:PATH` or `control:URL` (no password).
    pub source: String,
    /// When the source last confirmed the live map (Unix milliseconds).
    pub last_confirmed_unix_ms: Option<u64>,
    /// How long the source has been unreachable, if it is (milliseconds).
    pub unconfirmed_for_ms: Option<u64>,
    /// The last map the source offered that was refused, and why.
    pub last_refused: Option<String>,
    /// One entry per shard of the live map.
    pub shards: Vec<ShardPoolStatus>,
}

/// Pool state of one shard.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct ShardPoolStatus {
    /// The shard.
    pub name: String,
    /// Most connections the pool may open.
    pub max_size: usize,
    /// Connections open now.
    pub size: usize,
    /// Open connections not in use.
    pub available: usize,
    /// Requests waiting for a connection.
    pub waiting: usize,
    /// The shard's read replicas: lag, health and reads served.
    pub replicas: Vec<crate::replicas::ReplicaStatus>,
}

impl ShardRouter {
    /// The router's state for operators.
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// let status = router.status();
    /// assert_eq!((status.source.as_str(), status.shards[0].size), ("static", 0));
    /// # }
    /// ```
    pub fn status(&self) -> RouterStatus {
        let table = self.table();
        let source = self.source_state();
        RouterStatus {
            map_version: table.map().version(),
            source: source.source.to_string(),
            last_confirmed_unix_ms: source
                .last_confirmed
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64),
            unconfirmed_for_ms: source
                .unconfirmed_since
                .map(|since| since.elapsed().as_millis() as u64),
            last_refused: source.last_refused,
            shards: table
                .shards()
                .enumerate()
                .map(|(i, (shard, pool))| {
                    let s = pool.status();
                    let index = crate::map::ShardIndex(i as u16);
                    ShardPoolStatus {
                        name: shard.name().to_owned(),
                        max_size: s.max_size,
                        size: s.size,
                        available: s.available,
                        waiting: s.waiting,
                        replicas: table
                            .read_replicas(index)
                            .map(|r| r.status())
                            .unwrap_or_default(),
                    }
                })
                .collect(),
        }
    }
}

/// A tower service answering every request with the router's status as JSON.
///
/// ```
/// use shard_router::{map::MapLoader, status::StatusService, ShardRouter};
/// use tower::ServiceExt;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 3\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
/// let response = StatusService::new(router).oneshot(http::Request::new(())).await.unwrap();
/// assert!(response.body().contains("\"map_version\":3"));
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct StatusService {
    router: ShardRouter,
}

impl StatusService {
    /// Reports on `router`.
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, status::StatusService, ShardRouter};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 3\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// let _ = StatusService::new(router);
    /// # }
    /// ```
    pub fn new(router: ShardRouter) -> Self {
        StatusService { router }
    }
}

impl<B> Service<Request<B>> for StatusService {
    type Response = Response<String>;
    type Error = Infallible;
    type Future = Ready<Result<Response<String>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<B>) -> Self::Future {
        let body = serde_json::to_string(&self.router.status()).unwrap_or_else(|_| "{}".to_owned());
        ready(Ok(answer(body, "application/json")))
    }
}

/// A 200 response with `body` as `content_type` (the admin services' answers).
pub(crate) fn answer(body: String, content_type: &'static str) -> Response<String> {
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
