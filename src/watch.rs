//! File mode: follow `shard-map.toml` on disk, for single instances.
//!
//! [`FileWatcher::spawn`] checks the file every `interval` and reloads it when
//! its content changes, and at once on SIGHUP. Each reload follows the same rules
//! as any map change: an invalid file, a lower version, or the same version with
//! other content is refused and logged, and the router keeps serving the map it
//! has (see [`RouterStatus::last_refused`](crate::status::RouterStatus::last_refused)).
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use shard_router::{watch::FileWatcher, ShardMap, ShardRouter};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let router = ShardRouter::new(ShardMap::from_file("shard-map.toml")?)?;
//! let _watcher = FileWatcher::spawn(router.clone(), "shard-map.toml", Duration::from_secs(1));
//! // ... serve; dropping the watcher stops it.
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::task::JoinHandle;

use crate::map::MapLoader;
use crate::router::MapSource;
use crate::{Applied, ShardRouter};

/// Follows a map file; stops when dropped.
#[derive(Debug)]
pub struct FileWatcher {
    task: JoinHandle<()>,
}

impl FileWatcher {
    /// Starts following `path` for `router`, checking every `interval` and on SIGHUP.
    ///
    /// Needs a Tokio runtime. The file's current content is taken as already
    /// applied; only later changes are loaded.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use shard_router::{watch::FileWatcher, ShardMap, ShardRouter};
    /// # #[tokio::main] async fn main() {
    /// # let router = ShardRouter::new(ShardMap::from_file("shard-map.toml").unwrap()).unwrap();
    /// let watcher = FileWatcher::spawn(router, "shard-map.toml", Duration::from_millis(500));
    /// # }
    /// ```
    pub fn spawn(router: ShardRouter, path: impl AsRef<Path>, interval: Duration) -> Self {
        let path = path.as_ref().to_owned();
        router.update_source(|s| s.source = MapSource::File(path.display().to_string()));
        // Read now, not in the task: an edit made before the task first runs must count as a change.
        let seen = std::fs::read(&path).ok();
        let task = tokio::spawn(follow(router, path, seen, interval));
        FileWatcher { task }
    }
}

impl Drop for FileWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn follow(router: ShardRouter, path: PathBuf, mut seen: Option<Vec<u8>>, interval: Duration) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reloading on change only");
            None
        }
    };
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            _ = ticker.tick() => false,
            Some(()) = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            } => true,
        };
        let content = match std::fs::read(&path) {
            Ok(content) => content,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the shard map; keeping the live map");
                continue;
            }
        };
        if !forced && seen.as_deref() == Some(&content[..]) {
            continue;
        }
        seen = Some(content);
        // Parsing a big map is slow: keep it off the threads that serve requests.
        let (router, path) = (router.clone(), path.clone());
        let _ = tokio::task::spawn_blocking(move || reload(&router, &path)).await;
    }
}

fn reload(router: &ShardRouter, path: &Path) {
    let refuse = |reason: String| {
        tracing::warn!(path = %path.display(), %reason, live_version = router.version(), "shard map refused; keeping the live map");
        router.update_source(|s| s.last_refused = Some(reason));
    };
    match MapLoader::new().load_file(path) {
        Err(e) => refuse(e.to_string()),
        Ok(map) => match router.apply(map) {
            Err(e) => refuse(e.to_string()),
            Ok(applied) => {
                if let Applied::Swapped { from, to, .. } = applied {
                    tracing::info!(path = %path.display(), from, to, "shard map reloaded");
                }
                router.update_source(|s| s.last_confirmed = Some(SystemTime::now()));
            }
        },
    }
}
