//! A small client for `tonic_app`.
//!
//! ```text
//! cargo run --features grpc --example tonic_client -- --addr http://127.0.0.1:50051 --tenant acme create "hello"
//! cargo run --features grpc --example tonic_client -- --addr http://127.0.0.1:50051 --tenant acme list
//! ```

use clap::{Parser, Subcommand};

/// The code generated from examples/proto/notes.proto.
pub mod pb {
    include!("proto/notes.v1.rs");
}

/// Talks to the notes gRPC service as one tenant.
#[derive(Parser)]
struct Args {
    /// The server.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Sent as the `x-tenant-id` metadata.
    #[arg(long)]
    tenant: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a note.
    Create {
        /// Its text.
        body: String,
    },
    /// List the tenant's notes.
    List,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mut client = pb::notes_client::NotesClient::connect(args.addr).await?;
    match args.command {
        Command::Create { body } => {
            let request = with_tenant(&args.tenant, pb::CreateNoteRequest { body });
            println!("{:?}", client.create_note(request).await?.into_inner());
        }
        Command::List => {
            let request = with_tenant(&args.tenant, pb::ListNotesRequest {});
            for note in client.list_notes(request).await?.into_inner().notes {
                println!("{} {} {}", note.id, note.created_at, note.body);
            }
        }
    }
    Ok(())
}

/// A request carrying the tenant in the `x-tenant-id` metadata.
fn with_tenant<T>(tenant: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-tenant-id", tenant.parse().expect("an ASCII tenant id"));
    request
}
