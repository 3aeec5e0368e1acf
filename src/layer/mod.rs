//! The tower middleware: find the tenant, resolve its shard, hand the handler a
//! [`TenantDb`](crate::TenantDb).
//!
//! [`ShardRouterLayer`] wraps any `Service<http::Request<B>>` (an axum `Router`, a
//! tonic server, a bare `service_fn`). For each request it runs the tenant
//! extractor, resolves the tenant against the live map, inserts a
//! [`TenantDb`](crate::TenantDb) into the request's extensions and calls the inner
//! service inside a tracing span carrying `tenant`, `shard` and `map_version`.
//! A request without a valid tenant is answered 400 here and never reaches the
//! inner service, so it issues no query. Connections are checked out lazily by the
//! handle, so the layer itself never waits on a pool.
//!
//! # Example
//!
//! ```
//! use axum::{routing::get, Router};
//! use shard_router::{map::MapLoader, ShardRouter, ShardRouterLayer, TenantDb};
//! use shard_router::tenant::HeaderExtractor;
//!
//! async fn whoami(db: TenantDb) -> String {
//!     format!("{} on {} (map v{})", db.tenant(), db.shard(), db.map_version())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let map = MapLoader::without_env()
//!     .load_str("version = 1\n[shards.a]\nurl = \"postgres://postgres@127.0.0.1/app\"")
//!     .unwrap();
//! let router = ShardRouter::new(map).unwrap();
//! let app: Router = Router::new()
//!     .route("/whoami", get(whoami))
//!     .layer(ShardRouterLayer::new(router, HeaderExtractor::default()));
//! # }
//! ```

mod extract;
mod future;

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

pub use future::ResponseFuture;

/// [`crate::TOKEN_HEADER`] as a header name made once: looking a header up
/// by a `&str` parses and validates the name on every request.
static TOKEN: http::HeaderName = http::HeaderName::from_static(crate::TOKEN_HEADER);

use crate::rejection::RejectionBody;
use crate::tenant::TenantExtractor;
use crate::{Rejection, ShardRouter};

/// Applies [`ShardRouterService`] to a service. Cheap to clone.
///
/// ```
/// # use shard_router::{map::MapLoader, ShardRouter, ShardRouterLayer, tenant::PathSegmentExtractor};
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
/// let layer = ShardRouterLayer::new(router, PathSegmentExtractor::new(1));
/// # }
/// ```
#[derive(Debug)]
pub struct ShardRouterLayer<E> {
    router: ShardRouter,
    extractor: Arc<E>,
    protocol: Protocol,
}

/// How the layer answers the requests it rejects. Chosen explicitly when the
/// layer is built, never guessed from the request (a content type can lie).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Protocol {
    /// HTTP statuses with a fixed JSON body (400, 503 + `Retry-After`, 500).
    Http,
    /// gRPC trailers-only responses (INVALID_ARGUMENT, UNAVAILABLE, INTERNAL).
    Grpc,
}

impl<E> Clone for ShardRouterLayer<E> {
    fn clone(&self) -> Self {
        ShardRouterLayer {
            router: self.router.clone(),
            extractor: Arc::clone(&self.extractor),
            protocol: self.protocol,
        }
    }
}

impl<E: TenantExtractor> ShardRouterLayer<E> {
    /// Routes with `router`, finding tenants with `extractor`.
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter, ShardRouterLayer, tenant::HeaderExtractor};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// let layer = ShardRouterLayer::new(router, HeaderExtractor::default());
    /// # }
    /// ```
    pub fn new(router: ShardRouter, extractor: E) -> Self {
        ShardRouterLayer {
            router,
            extractor: Arc::new(extractor),
            protocol: Protocol::Http,
        }
    }

    /// For gRPC servers (tonic): rejections are trailers-only gRPC statuses.
    /// Tenant metadata arrives as headers, so [`HeaderExtractor`](crate::tenant::HeaderExtractor)
    /// reads `x-tenant-id` metadata.
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter, ShardRouterLayer, tenant::HeaderExtractor};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// let layer = ShardRouterLayer::grpc(router, HeaderExtractor::default());
    /// // tonic::transport::Server::builder().layer(layer).add_service(...)
    /// # }
    /// ```
    pub fn grpc(router: ShardRouter, extractor: E) -> Self {
        ShardRouterLayer {
            protocol: Protocol::Grpc,
            ..ShardRouterLayer::new(router, extractor)
        }
    }
}

impl<S, E> Layer<S> for ShardRouterLayer<E> {
    type Service = ShardRouterService<S, E>;

    fn layer(&self, inner: S) -> Self::Service {
        ShardRouterService {
            inner,
            router: self.router.clone(),
            extractor: Arc::clone(&self.extractor),
            protocol: self.protocol,
        }
    }
}

/// The middleware made by [`ShardRouterLayer`].
///
/// `poll_ready` is the inner service's; a rejected request does not call the
/// inner service.
///
/// ```
/// use shard_router::{map::MapLoader, ShardRouter, ShardRouterLayer, TenantDb};
/// use shard_router::tenant::HeaderExtractor;
/// use tower::{service_fn, Layer, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
/// let inner = service_fn(|req: http::Request<String>| async move {
///     let db = req.extensions().get::<TenantDb>().unwrap();
///     Ok::<_, std::convert::Infallible>(http::Response::new(db.shard().to_owned()))
/// });
/// let service = ShardRouterLayer::new(router, HeaderExtractor::default()).layer(inner);
///
/// let ok = service.clone().oneshot(
///     http::Request::builder().header("x-tenant-id", "acme").body(String::new()).unwrap()
/// ).await.unwrap();
/// assert_eq!(ok.body(), "a");
///
/// let missing = service.oneshot(http::Request::new(String::new())).await.unwrap();
/// assert_eq!(missing.status(), 400);
/// # }
/// ```
#[derive(Debug)]
pub struct ShardRouterService<S, E> {
    inner: S,
    router: ShardRouter,
    extractor: Arc<E>,
    protocol: Protocol,
}

impl<S, E> ShardRouterService<S, E> {
    /// The wrapped service.
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter, ShardRouterLayer, tenant::HeaderExtractor};
    /// # use tower::Layer;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// let service = ShardRouterLayer::new(router, HeaderExtractor::default()).layer(7_u32);
    /// assert_eq!(*service.get_ref(), 7);
    /// # }
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter, ShardRouterLayer, tenant::HeaderExtractor};
    /// # use tower::Layer;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// let mut service = ShardRouterLayer::new(router, HeaderExtractor::default()).layer(7_u32);
    /// *service.get_mut() += 1;
    /// assert_eq!(*service.get_ref(), 8);
    /// # }
    /// ```
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, unwrapped.
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter, ShardRouterLayer, tenant::HeaderExtractor};
    /// # use tower::Layer;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// let service = ShardRouterLayer::new(router, HeaderExtractor::default()).layer(7_u32);
    /// assert_eq!(service.into_inner(), 7);
    /// # }
    /// ```
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, E> Clone for ShardRouterService<S, E> {
    fn clone(&self) -> Self {
        ShardRouterService {
            inner: self.inner.clone(),
            router: self.router.clone(),
            extractor: Arc::clone(&self.extractor),
            protocol: self.protocol,
        }
    }
}

impl<S, E, ReqBody, ResBody> Service<Request<ReqBody>> for ShardRouterService<S, E>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    E: TenantExtractor,
    ResBody: RejectionBody,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let (parts, body) = req.into_parts();
        let tenant = match self.extractor.extract(&parts) {
            Ok(tenant) => tenant,
            Err(err) => {
                tracing::debug!(error = %err, path = parts.uri.path(), "request rejected: no valid tenant");
                let rejection = Rejection::from(&err);
                return ResponseFuture::rejected(match self.protocol {
                    Protocol::Http => rejection.into_response(),
                    Protocol::Grpc => rejection.into_grpc_response(),
                });
            }
        };
        let mut db = self.router.resolve(tenant);
        if let Some(value) = parts.headers.get(&TOKEN) {
            // The client's last write: replicas serve it only once past it. A
            // token that cannot be read sends its reads to the primary.
            db = match value.to_str().ok().and_then(|v| v.parse().ok()) {
                Some(token) => db.with_token(token),
                None => db.read_primary(),
            };
        }
        let written = db.written_slot();
        // DEBUG, as tower-http's TraceLayer: at INFO a span per request (its
        // fields formatted by the fmt subscriber) cost more than the rest of
        // the router's request path together.
        let span = tracing::debug_span!(
            "tenant_request",
            tenant = %db.tenant(),
            shard = db.shard(),
            map_version = db.map_version(),
            statements = tracing::field::Empty,
            db_time_us = tracing::field::Empty,
        );
        // Counted for the span only when something records it.
        let (db, tally) = if span.is_disabled() {
            (db, None)
        } else {
            let (db, tally) = db.tallied();
            (db, Some(tally))
        };
        let mut req = Request::from_parts(parts, body);
        req.extensions_mut().insert(db);
        let future = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        ResponseFuture::inner(future, span, written, tally)
    }
}
