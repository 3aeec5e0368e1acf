//! A multi-tenant notes API on shard-router.
//!
//! ```text
//! cargo run --release --example axum_app -- --map shard-map.toml --listen 127.0.0.1:3000
//! SHARD_ROUTER_CONTROL=postgres://postgres@127.0.0.1/control cargo run --release --example axum_app -- --listen 127.0.0.1:3000
//! curl -H 'x-tenant-id: acme' -H 'content-type: application/json' -d '{"body":"hi"}' localhost:3000/notes
//! curl -H 'x-tenant-id: acme' localhost:3000/notes
//! ```
//!
//! With replicas in the map (`replicas = [{ url = "..." }]` under a shard),
//! `GET /notes` reads from a replica, and `POST /notes` answers with an
//! `x-shard-router-token` header: send it back on the next request and that
//! request reads the note it just wrote (the layer does both; the handlers do
//! nothing for it).
//!
//! The tenant comes from the `x-tenant-id` header. With `--map`, the file is
//! reloaded when it changes and on SIGHUP; with `--control`, the router follows
//! the control database. `GET /_router` on the admin listener (`--admin-listen`,
//! default 127.0.0.1:9090) reports the router's state, `GET /metrics` its
//! Prometheus metrics. Its schema lives in
//! `migrations/notes/`; apply it to every shard first with
//! `shardctl migrate --map shard-map.toml --dir migrations/notes`.

mod common;

use common::{NewNote, Note};

use std::net::SocketAddr;

use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use clap::Parser;
use shard_router::metrics::MetricsService;
use shard_router::status::StatusService;
use shard_router::tenant::HeaderExtractor;
use shard_router::{DbError, ShardRouter, ShardRouterLayer, TenantDb};
use std::future::IntoFuture;
use tower_layer::Layer;

use uuid::Uuid;

/// Serves the notes API.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    source: common::MapSource,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// Address of the admin listener, which serves `GET /_router` (map
    /// version, control source, shards' pools) and `GET /metrics`
    /// (Prometheus). Keep it off the public network.
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin_listen: SocketAddr,
    /// Put the shard router's layer around the router rather than around
    /// each route (`Router::layer`): axum then has one boxed service less per
    /// request (docs/handlers.md, "Around the routes or around the router").
    #[arg(long)]
    around_router: bool,
    /// Tenants ranked per shard by the per-tenant load counting (0: off).
    #[arg(long, default_value_t = shard_router::accounting::DEFAULT_TOP_TENANTS)]
    top_tenants: usize,
}

/// A handler failure: a routing/database error, or a bad request body.
enum AppError {
    Db(DbError),
    Body(JsonRejection),
}

impl From<DbError> for AppError {
    fn from(e: DbError) -> Self {
        AppError::Db(e)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        match self {
            AppError::Db(e) => e.into_response(),
            AppError::Body(e) => (StatusCode::BAD_REQUEST, e.body_text()).into_response(),
        }
    }
}

async fn create_note(
    db: TenantDb,
    body: Result<Json<NewNote>, JsonRejection>,
) -> Result<(StatusCode, Json<Note>), AppError> {
    let Json(new) = body.map_err(AppError::Body)?;
    // The id is made here so the response can name it without a RETURNING of it;
    // database defaults work as well, moves copy the rows as written.
    let id = Uuid::new_v4();
    // One statement, committed on its own: an autocommit INSERT, one round
    // trip (`db.write()` gives a transaction for several statements).
    let rows = db
        .execute_returning(
            common::INSERT_NOTE,
            &[&db.tenant().as_str(), &id, &new.body],
        )
        .await?;
    let created_at = rows.first().map(|r| r.get(0)).unwrap_or_default();
    Ok((
        StatusCode::CREATED,
        Json(Note {
            id,
            body: new.body,
            created_at,
        }),
    ))
}

async fn list_notes(db: TenantDb) -> Result<Json<Vec<Note>>, AppError> {
    // Prepared once per connection, then reused: one round trip per query.
    let rows = db
        .read()
        .await?
        .query(common::LIST_NOTES, &[&db.tenant().as_str()])
        .await?;
    Ok(Json(
        rows.iter()
            .map(|r| Note {
                id: r.get(0),
                body: r.get(1),
                created_at: r.get(2),
            })
            .collect(),
    ))
}

/// The notes routes.
fn notes() -> Router {
    Router::new().route("/notes", get(list_notes).post(create_note))
}

/// The application: the notes routes behind the shard router.
fn app(router: ShardRouter) -> Router {
    notes().layer(ShardRouterLayer::new(router, HeaderExtractor::default()))
}

/// The operators' side, on its own listener: the router's status and metrics
/// (they need no tenant, and tell more than clients should see).
fn admin(router: ShardRouter) -> Router {
    Router::new()
        .route_service("/_router", StatusService::new(router.clone()))
        .route_service("/metrics", MetricsService::new(router))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::init_tracing();
    let args = Args::parse();
    // Keep the follower alive as long as the server runs.
    let (router, _follower) = args.source.start().await?;
    let router = router.with_top_tenants(args.top_tenants);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let admin_listener = tokio::net::TcpListener::bind(args.admin_listen).await?;
    tracing::info!(addr = %listener.local_addr()?, admin = %admin_listener.local_addr()?,
        map_version = router.version(), "listening");
    let admin = axum::serve(admin_listener, admin(router.clone())).into_future();
    if args.around_router {
        let app = ShardRouterLayer::new(router, HeaderExtractor::default()).layer(notes());
        let app = axum::ServiceExt::<axum::extract::Request>::into_make_service(app);
        tokio::try_join!(admin, axum::serve(listener, app).into_future())?;
    } else {
        tokio::try_join!(admin, axum::serve(listener, app(router)).into_future())?;
    }
    Ok(())
}
