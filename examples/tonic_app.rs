//! The notes service of `axum_app`, over gRPC with tonic, on the same tables.
//!
//! ```text
//! cargo run --release --features grpc --example tonic_app -- --map shard-map.toml --listen 127.0.0.1:50051
//! cargo run --release --features grpc --example tonic_client -- --addr http://127.0.0.1:50051 --tenant acme create "hello"
//! cargo run --release --features grpc --example tonic_client -- --addr http://127.0.0.1:50051 --tenant acme list
//! ```
//!
//! The tenant comes from the `x-tenant-id` metadata key. A missing or invalid
//! tenant is INVALID_ARGUMENT before any query; a shard that cannot give a
//! connection in time is UNAVAILABLE. Apply the schema first with
//! `shardctl migrate --map shard-map.toml --dir migrations/notes`.

mod common;

use shard_router::chrono::{DateTime, Utc};
use std::net::SocketAddr;

use clap::Parser;
use shard_router::tenant::HeaderExtractor;
use shard_router::{ShardRouterLayer, TenantDb};
use tonic::{Request, Response, Status};
use uuid::Uuid;

/// The code generated from examples/proto/notes.proto (see tests/grpc_codegen.rs).
pub mod pb {
    include!("proto/notes.v1.rs");
}

use pb::notes_server::{Notes, NotesServer};
use pb::{CreateNoteRequest, ListNotesRequest, ListNotesResponse, Note};

/// Serves the notes API over gRPC.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    source: common::MapSource,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
}

/// The service: every method takes its handle from the request.
#[derive(Debug, Default)]
pub struct NotesService;

#[tonic::async_trait]
impl Notes for NotesService {
    async fn create_note(
        &self,
        request: Request<CreateNoteRequest>,
    ) -> Result<Response<Note>, Status> {
        let db = TenantDb::from_grpc(&request)?;
        let body = request.into_inner().body;
        // The id is made here so the reply can name it; database defaults work as
        // well, moves copy the rows as written.
        let id = Uuid::new_v4();
        // One statement committed on its own: one round trip.
        let rows = db
            .execute_returning(common::INSERT_NOTE, &[&db.tenant().as_str(), &id, &body])
            .await?;
        let created_at: DateTime<Utc> = rows.first().map(|r| r.get(0)).unwrap_or_default();
        Ok(Response::new(Note {
            id: id.to_string(),
            body,
            created_at: created_at.to_rfc3339(),
        }))
    }

    async fn list_notes(
        &self,
        request: Request<ListNotesRequest>,
    ) -> Result<Response<ListNotesResponse>, Status> {
        let db = TenantDb::from_grpc(&request)?;
        let rows = db
            .read()
            .await?
            .query(common::LIST_NOTES, &[&db.tenant().as_str()])
            .await?;
        let notes = rows
            .iter()
            .map(|r| Note {
                id: r.get::<_, Uuid>(0).to_string(),
                body: r.get(1),
                created_at: r.get::<_, DateTime<Utc>>(2).to_rfc3339(),
            })
            .collect();
        Ok(Response::new(ListNotesResponse { notes }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::init_tracing();
    let args = Args::parse();
    // Keep the follower alive as long as the server runs.
    let (router, _follower) = args.source.start().await?;
    tracing::info!(addr = %args.listen, map_version = router.version(), "serving gRPC");
    tonic::transport::Server::builder()
        .layer(ShardRouterLayer::grpc(router, HeaderExtractor::default()))
        .add_service(NotesServer::new(NotesService))
        .serve(args.listen)
        .await?;
    Ok(())
}
