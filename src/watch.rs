//! File mode: follow `shard-map.toml` on disk, for single instances.
//!
//! [`FileWatcher::spawn`] checks the file every `interval` and reloads it when
//! its content changes, and at once on SIGHUP. A changed file is applied only
//! once it has settled: read again after [`WatchOptions::settle`] with the same
//! bytes, so a file caught half-written (an editor or `cp` writing in two
//! steps) is never applied. Still, write the file elsewhere and `mv` it into
//! place: a rename is atomic. Each reload follows the same rules as any map
//! change: an invalid file, a lower version, or the same version with other
//! content is refused and logged, and so is a map under which a tenant with
//! data would change shard without a move (the check the control plane makes on
//! publish), unless [`WatchOptions::allow_rehoming`] says the operator has
//! dealt with it. The router keeps serving the map it has (see
//! [`RouterStatus::last_refused`](crate::status::RouterStatus::last_refused)).
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

use crate::control::tenants_rehomed;
use crate::map::MapLoader;
use crate::router::MapSource;
use crate::{Applied, ShardRouter};

/// Follows a map file; stops when dropped, so keep it as long as the router
/// serves.
///
/// ```compile_fail
/// #![deny(unused_must_use)]
/// # use std::time::Duration;
/// # use shard_router::{watch::FileWatcher, ShardMap, ShardRouter};
/// # #[tokio::main] async fn main() {
/// # let router = ShardRouter::new(ShardMap::from_file("shard-map.toml").unwrap()).unwrap();
/// FileWatcher::spawn(router, "shard-map.toml", Duration::from_secs(1)); // dropped at once: refused
/// # }
/// ```
#[derive(Debug)]
#[must_use = "the file is no longer followed once the watcher is dropped; keep it (bind it to a name such as `_watcher`)"]
pub struct FileWatcher {
    task: JoinHandle<()>,
}

/// How a [`FileWatcher`] follows its file.
///
/// ```
/// use std::time::Duration;
/// use shard_router::watch::WatchOptions;
///
/// let mut options = WatchOptions::default();
/// options.interval = Duration::from_millis(500);
/// assert_eq!(options.settle, Duration::from_millis(200));
/// assert!(!options.allow_rehoming);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WatchOptions {
    /// How often the file is checked for changes (default 1 s).
    pub interval: Duration,
    /// How long a changed file must stay the same before it is applied
    /// (default 200 ms).
    pub settle: Duration,
    /// Apply maps that would move tenants with data to another shard without
    /// a move (default false: refused, like `shardctl map publish`). Set it only
    /// when their rows have been copied by other means.
    pub allow_rehoming: bool,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            interval: Duration::from_secs(1),
            settle: Duration::from_millis(200),
            allow_rehoming: false,
        }
    }
}

impl FileWatcher {
    /// Starts following `path` for `router`, checking every `interval` and on
    /// SIGHUP, with the other [`WatchOptions`] at their defaults.
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
        let options = WatchOptions {
            interval,
            ..WatchOptions::default()
        };
        Self::with_options(router, path, options)
    }

    /// Starts following `path` for `router` with `options`.
    ///
    /// ```no_run
    /// # use shard_router::{watch::{FileWatcher, WatchOptions}, ShardMap, ShardRouter};
    /// # #[tokio::main] async fn main() {
    /// # let router = ShardRouter::new(ShardMap::from_file("shard-map.toml").unwrap()).unwrap();
    /// let watcher = FileWatcher::with_options(router, "shard-map.toml", WatchOptions::default());
    /// # }
    /// ```
    pub fn with_options(
        router: ShardRouter,
        path: impl AsRef<Path>,
        options: WatchOptions,
    ) -> Self {
        let path = path.as_ref().to_owned();
        router.update_source(|s| s.source = MapSource::File(path.display().to_string()));
        // Read now, not in the task: an edit made before the task first runs must count as a change.
        let seen = std::fs::read(&path).ok();
        let task = tokio::spawn(follow(router, path, seen, options));
        FileWatcher { task }
    }
}

impl Drop for FileWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn follow(
    router: ShardRouter,
    path: PathBuf,
    mut seen: Option<Vec<u8>>,
    options: WatchOptions,
) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reloading on change only");
            None
        }
    };
    let mut retry_at: Option<std::time::Instant> = None;
    let mut ticker = tokio::time::interval(options.interval);
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
        let Some(content) = read(&path) else {
            continue;
        };
        if !forced && seen.as_deref() == Some(&content[..]) {
            continue;
        }
        let Some(content) = settled(&path, content, options.settle).await else {
            continue; // still changing: try again at the next tick
        };
        if !forced && seen.as_deref() == Some(&content[..]) {
            continue;
        }
        if !forced && retry_at.is_some_and(|at| std::time::Instant::now() < at) {
            continue;
        }
        retry_at = None;
        seen = Some(content.clone());
        if reload(&router, &path, content, options.allow_rehoming).await == Reload::Retry {
            // Refused for a reason that may pass (a shard not reachable yet):
            // the same content is tried again, after a pause.
            seen = None;
            retry_at = Some(std::time::Instant::now() + RETRY_AFTER);
        }
    }
}

/// How long a map refused for a reason that may pass waits before it is tried
/// again (each try connects to the shards).
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// What became of one reload.
#[derive(Debug, PartialEq, Eq)]
enum Reload {
    /// Applied, unchanged, or refused for good (until the file changes).
    Done,
    /// Refused because a check could not run: try the same content again.
    Retry,
}

fn read(path: &Path) -> Option<Vec<u8>> {
    match std::fs::read(path) {
        Ok(content) => Some(content),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the shard map; keeping the live map");
            None
        }
    }
}

/// The file's content once two reads `settle` apart agree; `None` if it is
/// still changing after a few tries or cannot be read.
async fn settled(path: &Path, mut content: Vec<u8>, settle: Duration) -> Option<Vec<u8>> {
    for _ in 0..10 {
        tokio::time::sleep(settle).await;
        let again = read(path)?;
        if again == content {
            return Some(content);
        }
        content = again;
    }
    tracing::warn!(path = %path.display(), "the shard map keeps changing; waiting for it to settle");
    None
}

async fn reload(
    router: &ShardRouter,
    path: &Path,
    content: Vec<u8>,
    allow_rehoming: bool,
) -> Reload {
    let refuse = |reason: String| {
        tracing::warn!(path = %path.display(), %reason, live_version = router.version(), "shard map refused; keeping the live map");
        router.update_source(|s| s.last_refused = Some(reason));
        Reload::Done
    };
    // Parsing a big map is slow: keep it off the threads that serve requests.
    let loaded = tokio::task::spawn_blocking(move || match String::from_utf8(content) {
        Ok(text) => MapLoader::new().load_str(&text).map_err(|e| e.to_string()),
        Err(_) => Err("the shard map is not UTF-8".to_owned()),
    })
    .await
    .unwrap_or_else(|e| Err(format!("map loading panicked: {e}")));
    let map = match loaded {
        Ok(map) => map,
        Err(reason) => return refuse(reason),
    };
    let live = router.table();
    if let Some(reason) = moves_written_by_hand(live.map(), &map) {
        return refuse(reason);
    }
    if !allow_rehoming && map.version() > live.map().version() {
        match tenants_rehomed(live.map(), &map).await {
            Ok(rehomed) if rehomed.is_empty() => {}
            Ok(rehomed) => {
                let names: Vec<String> = rehomed
                    .iter()
                    .take(10)
                    .map(|r| format!("{} ({} -> {})", r.tenant, r.from, r.to))
                    .collect();
                return refuse(format!(
                    "version {}: would re-home {} tenant(s) that have data, without a move: {}{}; pin them where they are, or move them first",
                    map.version(),
                    rehomed.len(),
                    names.join(", "),
                    if rehomed.len() > 10 { ", ..." } else { "" }
                ));
            }
            Err(e @ crate::control::RehomeError(crate::pg::ShardError::Unreachable { .. })) => {
                refuse(format!("version {}: {e} (trying again)", map.version()));
                return Reload::Retry;
            }
            Err(e) => return refuse(format!("version {}: {e}", map.version())),
        }
    }
    match router.apply(map) {
        Err(e @ crate::router::ApplyError::Pool { .. }) => {
            refuse(format!("{e} (trying again)"));
            Reload::Retry
        }
        Err(e) => refuse(e.to_string()),
        Ok(applied) => {
            if let Applied::Swapped { from, to, .. } = applied {
                tracing::info!(path = %path.display(), from, to, "shard map reloaded");
                // A refusal of an earlier content no longer describes the file.
                router.update_source(|s| s.last_refused = None);
            }
            router.update_source(|s| s.last_confirmed = Some(SystemTime::now()));
            Reload::Done
        }
    }
}

/// Why `new` may not come from a file: it starts a move, or changes one's
/// route, that the live map does not have. Moves are started and stepped by
/// `shardctl tenant move` through the control database, which fences and
/// copies the tenant's rows; a `[moves]` entry written by hand would send
/// writes to a shard holding none of them.
fn moves_written_by_hand(live: &crate::ShardMap, new: &crate::ShardMap) -> Option<String> {
    let named = |map: &crate::ShardMap| -> Vec<(String, String, String, crate::map::MovePhase)> {
        map.moves()
            .into_iter()
            .map(|(tenant, route)| {
                let name = |i| map.shard(i).name().to_owned();
                (
                    tenant.to_owned(),
                    name(route.from),
                    name(route.to),
                    route.phase,
                )
            })
            .collect()
    };
    let live_moves = named(live);
    let added: Vec<String> = named(new)
        .into_iter()
        .filter(|m| !live_moves.contains(m))
        .map(|(tenant, ..)| tenant)
        .collect();
    (!added.is_empty()).then(|| {
        format!(
            "version {}: [moves] entries for {} are not the live map's; moves run through \
             `shardctl tenant move` with a control database, never from a map file",
            new.version(),
            added.join(", ")
        )
    })
}
