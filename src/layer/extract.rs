//! Getting the [`TenantDb`] in an axum handler.

use axum_core::extract::FromRequestParts;
use http::request::Parts;

use crate::{Rejection, TenantDb};

/// Takes the handle that [`ShardRouterLayer`](crate::ShardRouterLayer) put into
/// the request. Without the layer, the handler answers 500 `router_missing` and
/// logs which layer to add.
///
/// ```
/// async fn handler(db: shard_router::TenantDb) -> String {
///     db.shard().to_owned()
/// }
/// let _app: axum::Router = axum::Router::new().route("/", axum::routing::get(handler));
/// ```
impl<S: Send + Sync> FromRequestParts<S> for TenantDb {
    type Rejection = Rejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<TenantDb>().cloned().ok_or_else(|| {
            tracing::error!(
                "a handler asked for TenantDb but the request has none: add \
                 ShardRouterLayer around the routes that use it"
            );
            Rejection::RouterMissing
        })
    }
}

#[cfg(feature = "grpc")]
impl TenantDb {
    /// The handle inside a tonic service method. Without the layer, the
    /// status is INTERNAL and the log says which layer to add.
    ///
    /// ```
    /// # use shard_router::TenantDb;
    /// let request = tonic::Request::new(());
    /// let status = TenantDb::from_grpc(&request).unwrap_err();
    /// assert_eq!(status.code(), tonic::Code::Internal);
    /// ```
    pub fn from_grpc<T>(request: &tonic::Request<T>) -> Result<TenantDb, tonic::Status> {
        request
            .extensions()
            .get::<TenantDb>()
            .cloned()
            .ok_or_else(|| {
                tracing::error!(
                    "a service method asked for TenantDb but the request has none: add \
                 ShardRouterLayer::grpc to the server"
                );
                tonic::Status::internal(Rejection::RouterMissing.grpc_message())
            })
    }
}
