//! What the examples share: where the map comes from, logging, and the notes
//! API's SQL and JSON (so the load harness's baseline runs the same queries).
// Each example uses a part of this module.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use shard_router::control::{ControlAgent, ControlOptions};
use shard_router::watch::FileWatcher;
use shard_router::{ShardMap, ShardRouter};

/// Where the router's map comes from: a file, or the control database.
#[derive(clap::Args)]
pub struct MapSource {
    /// The shard map file (reloaded on change and on SIGHUP).
    #[arg(long, required_unless_present = "control")]
    pub map: Option<PathBuf>,
    /// Or: follow the control database at this URL (a file given with
    /// `--map` wins). Prefer the environment variable: a command line is
    /// visible to every user of the machine.
    #[arg(long, env = "SHARD_ROUTER_CONTROL")]
    pub control: Option<String>,
}

/// What keeps the router's map current; keep it alive while serving.
pub enum Follower {
    /// Reloads the file.
    File(FileWatcher),
    /// Follows the control database.
    Control(ControlAgent),
}

impl MapSource {
    /// A router on the map, and what keeps that map current.
    pub async fn start(&self) -> Result<(ShardRouter, Follower), Box<dyn std::error::Error>> {
        match (&self.map, &self.control) {
            (Some(path), _) => {
                let router = ShardRouter::new(ShardMap::from_file(path)?)?;
                let watcher = FileWatcher::spawn(router.clone(), path, Duration::from_secs(1));
                Ok((router, Follower::File(watcher)))
            }
            (None, Some(url)) => {
                let (router, agent) = ControlAgent::start(url, ControlOptions::default()).await?;
                Ok((router, Follower::Control(agent)))
            }
            (None, None) => Err("give --map FILE or --control URL".into()),
        }
    }
}

/// Logs to stderr; `RUST_LOG` filters (default `info`).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
}

/// Creates a note; `$1` tenant, `$2` id (made by the application), `$3` body.
/// Returns `created_at` (a `timestamptz`, read as `chrono::DateTime<Utc>`).
pub const INSERT_NOTE: &str = "INSERT INTO notes (tenant_id, id, body) VALUES ($1, $2, $3) \
                               RETURNING created_at";

/// The tenant's notes, oldest first: id, body, created_at.
pub const LIST_NOTES: &str = "SELECT id, body, created_at FROM notes \
                              WHERE tenant_id = $1 ORDER BY created_at, id";

/// `POST /notes` body.
#[derive(serde::Deserialize)]
pub struct NewNote {
    pub body: String,
}

/// A note as the HTTP API returns it.
#[derive(serde::Serialize)]
pub struct Note {
    pub id: uuid::Uuid,
    pub body: String,
    /// Serialized as RFC 3339 (chrono's `serde` feature, which the
    /// re-exported `shard_router::chrono` carries).
    pub created_at: shard_router::chrono::DateTime<shard_router::chrono::Utc>,
}
