//! The one place where routing and database failures become responses.
//!
//! Every failure maps to a fixed status and a fixed JSON body; internal error
//! text never reaches the client (it goes to the logs). The layer uses this for
//! requests it rejects, and [`DbError`] uses it when a handler returns it.
//!
//! | failure | HTTP | gRPC | body `error` |
//! | --- | --- | --- | --- |
//! | no tenant in the request | 400 | INVALID_ARGUMENT | `missing_tenant` |
//! | malformed tenant id | 400 | INVALID_ARGUMENT | `invalid_tenant` |
//! | shard cannot give a connection in time, or is unreachable | 503 + `Retry-After: 1` | UNAVAILABLE | `shard_unavailable` |
//! | a statement failed | 500 | INTERNAL | `database_error` |
//! | handle requested but `ShardRouterLayer` not installed | 500 | INTERNAL | `router_missing` |

use http::{header, HeaderValue, Response, StatusCode};

use crate::tenant::ExtractError;
use crate::DbError;

/// A failure as the client sees it: status, fixed body, and `Retry-After` where
/// retrying helps.
///
/// ```
/// use shard_router::{tenant::ExtractError, Rejection};
///
/// let rejection = Rejection::from(&ExtractError::Missing { what: "header" });
/// assert_eq!(rejection.status(), http::StatusCode::BAD_REQUEST);
/// let response: http::Response<String> = rejection.into_response();
/// assert_eq!(response.body(), r#"{"error":"missing_tenant","message":"the request names no tenant"}"#);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// The request names no tenant.
    MissingTenant,
    /// The tenant id is malformed.
    InvalidTenant,
    /// The tenant's shard cannot serve now.
    ShardUnavailable,
    /// The database refused a statement.
    DatabaseError,
    /// A handler asked for a [`crate::TenantDb`] but the layer is not installed.
    RouterMissing,
}

/// Seconds a client should wait before retrying a 503.
pub const RETRY_AFTER_SECS: u32 = 1;

impl Rejection {
    /// The HTTP status.
    ///
    /// ```
    /// # use shard_router::Rejection;
    /// assert_eq!(Rejection::ShardUnavailable.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    /// ```
    pub fn status(self) -> StatusCode {
        match self {
            Rejection::MissingTenant | Rejection::InvalidTenant => StatusCode::BAD_REQUEST,
            Rejection::ShardUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Rejection::DatabaseError | Rejection::RouterMissing => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// The gRPC status code (`INVALID_ARGUMENT` 3, `UNAVAILABLE` 14, `INTERNAL` 13).
    ///
    /// ```
    /// # use shard_router::Rejection;
    /// assert_eq!(Rejection::InvalidTenant.grpc_code(), 3);
    /// ```
    pub fn grpc_code(self) -> i32 {
        match self {
            Rejection::MissingTenant | Rejection::InvalidTenant => 3,
            Rejection::ShardUnavailable => 14,
            Rejection::DatabaseError | Rejection::RouterMissing => 13,
        }
    }

    /// The fixed JSON body.
    ///
    /// ```
    /// # use shard_router::Rejection;
    /// assert!(Rejection::InvalidTenant.body().contains("invalid_tenant"));
    /// ```
    pub fn body(self) -> &'static str {
        match self {
            Rejection::MissingTenant => {
                r#"{"error":"missing_tenant","message":"the request names no tenant"}"#
            }
            Rejection::InvalidTenant => {
                r#"{"error":"invalid_tenant","message":"the tenant id is not valid"}"#
            }
            Rejection::ShardUnavailable => {
                r#"{"error":"shard_unavailable","message":"the tenant's database is unavailable; retry later"}"#
            }
            Rejection::DatabaseError => {
                r#"{"error":"database_error","message":"the database refused the request"}"#
            }
            Rejection::RouterMissing => {
                r#"{"error":"router_missing","message":"the server is misconfigured: ShardRouterLayer is not installed"}"#
            }
        }
    }

    /// The HTTP response.
    ///
    /// ```
    /// # use shard_router::Rejection;
    /// let response: http::Response<String> = Rejection::ShardUnavailable.into_response();
    /// assert_eq!(response.headers()["retry-after"], "1");
    /// ```
    pub fn into_response<B: RejectionBody>(self) -> Response<B> {
        let mut response = Response::new(B::fixed(self.body()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if self == Rejection::ShardUnavailable {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }

    /// The gRPC response: trailers-only (HTTP 200, `grpc-status` and
    /// `grpc-message` in the headers, no body), as gRPC clients expect.
    ///
    /// ```
    /// # use shard_router::Rejection;
    /// let response: http::Response<String> = Rejection::MissingTenant.into_grpc_response();
    /// assert_eq!(response.headers()["grpc-status"], "3"); // INVALID_ARGUMENT
    /// assert!(response.body().is_empty());
    /// ```
    pub fn into_grpc_response<B: RejectionBody>(self) -> Response<B> {
        let mut response = Response::new(B::empty());
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(self.grpc_code()));
        headers.insert(
            "grpc-message",
            HeaderValue::from_static(self.grpc_message()),
        );
        response
    }

    /// A short fixed message for gRPC (`grpc-message`, percent-encoding-safe).
    ///
    /// ```
    /// # use shard_router::Rejection;
    /// assert_eq!(Rejection::MissingTenant.grpc_message(), "missing tenant: set the x-tenant-id metadata");
    /// ```
    pub fn grpc_message(self) -> &'static str {
        match self {
            Rejection::MissingTenant => "missing tenant: set the x-tenant-id metadata",
            Rejection::InvalidTenant => "invalid tenant id",
            Rejection::ShardUnavailable => "the tenant's database is unavailable; retry later",
            Rejection::DatabaseError => "the database refused the request",
            Rejection::RouterMissing => "server misconfigured: ShardRouterLayer is not installed",
        }
    }
}

/// A response body the layer can build its rejections from: a fixed text for
/// HTTP, nothing for gRPC's trailers-only responses.
///
/// Implemented for `String`, axum's body, and (feature `grpc`) tonic's body.
/// Implement it for your own body type to use the layer with it.
///
/// ```
/// use shard_router::rejection::RejectionBody;
/// assert_eq!(String::fixed("x"), "x");
/// assert!(String::empty().is_empty());
/// ```
pub trait RejectionBody: Sized {
    /// A body holding `text`.
    fn fixed(text: &'static str) -> Self;
    /// An empty body.
    fn empty() -> Self;
}

impl RejectionBody for String {
    fn fixed(text: &'static str) -> Self {
        text.to_owned()
    }
    fn empty() -> Self {
        String::new()
    }
}

impl RejectionBody for axum_core::body::Body {
    fn fixed(text: &'static str) -> Self {
        axum_core::body::Body::from(text)
    }
    fn empty() -> Self {
        axum_core::body::Body::empty()
    }
}

#[cfg(feature = "grpc")]
impl RejectionBody for tonic::body::Body {
    fn fixed(_text: &'static str) -> Self {
        // gRPC carries errors in grpc-status / grpc-message, never in the body.
        tonic::body::Body::empty()
    }
    fn empty() -> Self {
        tonic::body::Body::empty()
    }
}

/// Service methods may return `Err(DbError)` (through `?`): the client gets the
/// fixed status of the table above, the error goes to the logs.
#[cfg(feature = "grpc")]
impl From<DbError> for tonic::Status {
    fn from(err: DbError) -> Self {
        let rejection = log(&err);
        tonic::Status::new(
            tonic::Code::from_i32(rejection.grpc_code()),
            rejection.grpc_message(),
        )
    }
}

impl From<&ExtractError> for Rejection {
    fn from(err: &ExtractError) -> Self {
        match err {
            ExtractError::Missing { .. } => Rejection::MissingTenant,
            ExtractError::Invalid(_) | ExtractError::Ambiguous { .. } => Rejection::InvalidTenant,
        }
    }
}

impl From<&DbError> for Rejection {
    fn from(err: &DbError) -> Self {
        if err.is_unavailable() {
            Rejection::ShardUnavailable
        } else {
            Rejection::DatabaseError
        }
    }
}

impl axum_core::response::IntoResponse for Rejection {
    fn into_response(self) -> axum_core::response::Response {
        Rejection::into_response(self)
    }
}

/// Handlers can return `Result<_, DbError>`: the error is logged with its
/// tenant, shard and map version, and the client gets the fixed response.
impl axum_core::response::IntoResponse for DbError {
    fn into_response(self) -> axum_core::response::Response {
        Rejection::into_response(log(&self))
    }
}

/// Logs a handler's error with its cause (the one place a [`DbError`]'s
/// cause is printed) and says how the client is answered.
fn log(err: &DbError) -> Rejection {
    let rejection = Rejection::from(err);
    if rejection == Rejection::ShardUnavailable {
        tracing::warn!(error = %err.report(), "shard unavailable");
    } else {
        tracing::error!(error = %err.report(), "database error");
    }
    rejection
}
