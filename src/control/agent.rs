//! Keeping a router on the newest published map.

use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Client};

use super::{ControlError, ControlPlane, CHANNEL};
use crate::map::{redact_url, MapLoader};
use crate::router::{MapSource, MoveFailure};
use crate::{Applied, ShardRouter};

/// How long a map refused for a reason that may pass waits before it is
/// tried again.
const RETRY_REFUSED: Duration = Duration::from_secs(5);

/// How a router follows the control database.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ControlOptions {
    /// This router's id in `shard_router_routers`. Default: `{host}-{pid}-{random}`.
    pub instance_id: String,
    /// The host reported with heartbeats. Default: `$HOSTNAME` or `/etc/hostname`.
    pub host: String,
    /// How often the router reports the version it applied. Default 1 s.
    pub heartbeat: Duration,
    /// Past this without a heartbeat, the router counts as stopped. Default 3 s.
    pub lease: Duration,
    /// How often to look for new versions besides NOTIFY. Default 5 s.
    pub poll: Duration,
    /// The longest wait between reconnection attempts. Default 5 s.
    pub max_backoff: Duration,
    /// How often the router reports its per-tenant load and pools (for
    /// `shardctl tenants top` and `shardctl shards`). Default 10 s; zero: never.
    pub report_load: Duration,
    /// The most tenant rows one report holds (the router's most expensive
    /// tenants by database time, over all shards). Default 1,000.
    pub report_rows: usize,
}

impl Default for ControlOptions {
    fn default() -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown".to_owned());
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        ControlOptions {
            instance_id: format!("{host}-{}-{nanos:08x}", std::process::id()),
            host,
            heartbeat: Duration::from_secs(1),
            lease: Duration::from_secs(3),
            poll: Duration::from_secs(5),
            max_backoff: Duration::from_secs(5),
            report_load: Duration::from_secs(10),
            report_rows: 1000,
        }
    }
}

/// Follows the control database for one router: applies every new map version
/// (told by NOTIFY, with a polling fallback), reports heartbeats with the version
/// applied, and reconnects with backoff when the database goes away, while the
/// router keeps serving the map it has. Stops when dropped.
///
/// A version that does not load or apply here (invalid under this process's
/// environment, say) is refused and logged; the router keeps its map and the
/// refusal shows in [`ShardRouter::status`].
///
/// ```no_run
/// use shard_router::control::{ControlAgent, ControlOptions};
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let (router, agent) =
///     ControlAgent::start("postgres://postgres@127.0.0.1/control", ControlOptions::default()).await?;
/// println!("{} serving map version {}", agent.instance_id(), router.version());
/// # Ok(()) }
/// ```
///
/// Keep the agent as long as the router serves: dropping it stops following
/// (the router keeps its last map). Binding it to `_` drops it at once; bind it
/// to a name such as `_agent`.
///
/// ```compile_fail
/// #![deny(unused_must_use)]
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// # let (router, agent) = shard_router::control::ControlAgent::start("postgres://h/c", Default::default()).await?;
/// agent; // an agent that nobody keeps is a mistake the compiler reports
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "the router stops following the control database when its agent is dropped; keep it (bind it to a name such as `_agent`)"]
pub struct ControlAgent {
    task: JoinHandle<()>,
    instance_id: String,
}

impl ControlAgent {
    /// Connects to the control database at `url`, builds a router on the newest
    /// map, and starts following. Fails if the database cannot be reached or has
    /// no map yet: a router needs one map to start.
    ///
    /// ```no_run
    /// # use shard_router::control::{ControlAgent, ControlOptions};
    /// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
    /// let (router, _agent) = ControlAgent::start("postgres://postgres@127.0.0.1/control", ControlOptions::default()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn start(
        url: &str,
        options: ControlOptions,
    ) -> Result<(ShardRouter, ControlAgent), ControlError> {
        if options.heartbeat.is_zero() || options.poll.is_zero() {
            return Err(ControlError::InvalidOptions(
                "heartbeat and poll must be longer than zero".into(),
            ));
        }
        if let Ok(endpoint) = crate::pg::Endpoint::parse(url) {
            endpoint.warn_if_unverified("the control database");
        }
        if options.heartbeat >= options.lease {
            return Err(ControlError::InvalidOptions(format!(
                "heartbeat ({:?}) must be shorter than the lease ({:?}), or the router looks stopped between heartbeats",
                options.heartbeat, options.lease
            )));
        }
        let session = Session::open(url).await?;
        let control = ControlPlane {
            client: session.client,
            url: redact_url(url),
            connect_url: url.to_owned(),
        };
        let latest = control.latest().await?;
        let map = latest.load()?;
        let session = Session {
            client: control.client,
            notifications: session.notifications,
        };
        let router = ShardRouter::new(map)?;
        router.update_source(|s| {
            s.source = MapSource::Control(redact_url(url));
            s.last_confirmed = Some(SystemTime::now());
        });
        let instance_id = options.instance_id.clone();
        let follower = Follower {
            router: router.clone(),
            options,
            started_at: SystemTime::now(),
            history: LoadHistory::default(),
            refused: None,
            checksum: Some(latest.checksum.clone()),
            diverged: false,
        };
        // Register before returning, so `map publish --wait` knows this router from now on.
        follower.heartbeat(&session.client).await?;
        let (failures, failed_writes) = mpsc::unbounded_channel();
        router.set_move_failure_sink(failures);
        let task = tokio::spawn(follow(
            follower,
            url.to_owned(),
            Some(session),
            failed_writes,
        ));
        Ok((router, ControlAgent { task, instance_id }))
    }

    /// This router's instance id.
    ///
    /// ```no_run
    /// # fn f(agent: shard_router::control::ControlAgent) { println!("{}", agent.instance_id()); }
    /// ```
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }
}

impl Drop for ControlAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A LISTENing connection: the client, and a signal per notification.
struct Session {
    client: Client,
    notifications: mpsc::UnboundedReceiver<()>,
}

impl Session {
    async fn open(url: &str) -> Result<Session, ControlError> {
        let (client, mut connection) = super::open(url).await?;
        let (tx, notifications) = mpsc::unbounded_channel();
        // Drive the connection ourselves to see its notifications; when it ends,
        // the channel closes and the session knows.
        tokio::spawn(async move {
            while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => {
                        if tx.send(()).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .map_err(ControlError::from)?;
        Ok(Session {
            client,
            notifications,
        })
    }
}

struct Follower {
    router: ShardRouter,
    /// Snapshots of the per-tenant load, for the windows reports cover.
    history: LoadHistory,
    options: ControlOptions,
    started_at: SystemTime,
    /// The newest version refused, so a poll does not log it again, and when
    /// to try it again if the refusal may pass (a shard's pool could not be
    /// built yet).
    refused: Option<(u64, Option<Instant>)>,
    /// The checksum of the live map as stored in the control database.
    checksum: Option<String>,
    /// The control database does not hold the live map (said once).
    diverged: bool,
}

async fn follow(
    mut follower: Follower,
    url: String,
    mut first: Option<Session>,
    mut failed_writes: mpsc::UnboundedReceiver<MoveFailure>,
) {
    let initial_backoff = Duration::from_millis(100);
    let mut backoff = initial_backoff;
    loop {
        let session = match first.take() {
            Some(session) => Ok(session),
            None => Session::open(&url).await,
        };
        let cause = match session {
            Ok(mut session) => {
                backoff = initial_backoff;
                follower.run(&mut session, &mut failed_writes).await
            }
            Err(e) => e,
        };
        follower.unconfirmed(&cause);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(follower.options.max_backoff);
    }
}

impl Follower {
    /// Serves one session until its connection fails.
    async fn run(
        &mut self,
        session: &mut Session,
        failed_writes: &mut mpsc::UnboundedReceiver<MoveFailure>,
    ) -> ControlError {
        let mut heartbeat = tokio::time::interval(self.options.heartbeat);
        let mut poll = tokio::time::interval(self.options.poll);
        // A zero period means never: an interval that never comes due.
        let mut report = tokio::time::interval(if self.options.report_load.is_zero() {
            Duration::from_secs(365 * 24 * 3600)
        } else {
            self.options.report_load
        });
        report.reset();
        for ticker in [&mut heartbeat, &mut poll, &mut report] {
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        if let Err(e) = self.catch_up(&session.client).await {
            return e;
        }
        loop {
            // Reporting needs the client mutably (a transaction): it runs after
            // the select, which borrows the client in every branch.
            let mut report_due = false;
            let result = tokio::select! {
                signal = session.notifications.recv() => match signal {
                    None => return ControlError::Unreachable {
                        url: self.router.source_state().source.to_string(),
                        cause: "connection closed".into(),
                    },
                    Some(()) => {
                        while session.notifications.try_recv().is_ok() {} // coalesce a burst
                        self.catch_up(&session.client).await
                    }
                },
                _ = heartbeat.tick() => self.heartbeat(&session.client).await,
                Some((tenant, what)) = failed_writes.recv() => self.record_failure(&session.client, &tenant, &what).await,
                _ = poll.tick() => self.catch_up(&session.client).await,
                _ = report.tick(), if !self.options.report_load.is_zero() => {
                    report_due = true;
                    Ok(())
                }
            };
            let result = match result {
                Ok(()) if report_due => self.report_load(&mut session.client).await,
                other => other,
            };
            if let Err(e) = result {
                return e;
            }
        }
    }

    /// Applies the newest version if it is newer than the live one, then heartbeats.
    async fn catch_up(&mut self, client: &Client) -> Result<(), ControlError> {
        let live = self.router.version();
        let row = self
            .bounded(client.query_opt(
                "SELECT version, coalesce(map_json, map), map_json IS NOT NULL, checksum \
                 FROM shard_router_maps WHERE version > $1 ORDER BY version DESC LIMIT 1",
                &[&(live as i64)],
            ))
            .await?;
        match row {
            Some(row) => {
                let version = row.get::<_, i64>(0) as u64;
                let text: String = row.get(1);
                let json: bool = row.get(2);
                let settled = match self.refused {
                    Some((refused, retry_at)) if refused == version => {
                        retry_at.is_none_or(|at| Instant::now() < at)
                    }
                    _ => false,
                };
                if !settled {
                    self.apply(version, text, json, row.get(3)).await;
                }
            }
            None => self.check_live_map_is_held(client, live).await?,
        }
        self.heartbeat(client).await
    }

    /// Says so, once, when the control database no longer holds the live map:
    /// restored from an older backup, its newest version is below ours, or it
    /// holds another map under our version. The router keeps its map (going
    /// back would re-home tenants silently) until a newer version comes.
    async fn check_live_map_is_held(
        &mut self,
        client: &Client,
        live: u64,
    ) -> Result<(), ControlError> {
        let row = self
            .bounded(client.query_one(
                "SELECT (SELECT max(version) FROM shard_router_maps), \
                   (SELECT checksum FROM shard_router_maps WHERE version = $1)",
                &[&(live as i64)],
            ))
            .await?;
        let newest: Option<i64> = row.get(0);
        let stored: Option<String> = row.get(1);
        let held = match (&stored, &self.checksum) {
            (Some(stored), Some(ours)) => stored == ours,
            (Some(_), None) => true, // a map from elsewhere (a file) with this number
            (None, _) => false,
        };
        if held || self.diverged {
            self.diverged = !held;
            return Ok(());
        }
        self.diverged = true;
        let newest = newest.unwrap_or(0);
        let reason = if stored.is_some() {
            format!("the control database holds a different map under version {live}, which this router serves (restored from a backup?); keeping the live map until a version above {live} is published")
        } else {
            format!("the control database's newest map is version {newest}, below version {live}, which this router serves (restored from a backup?); keeping the live map until a version above {live} is published")
        };
        tracing::error!(live, newest, "{reason}");
        self.router.update_source(|s| s.last_refused = Some(reason));
        Ok(())
    }

    async fn apply(&mut self, version: u64, text: String, json: bool, checksum: String) {
        // Parsing a big map takes milliseconds to seconds: keep it off the
        // runtime threads that serve requests.
        let router = self.router.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let loader = MapLoader::new();
            if json {
                loader.load_json(&text)
            } else {
                loader.load_str(&text)
            }
            .map_err(|e| (e.to_string(), false))
            .and_then(|map| {
                router.apply(map).map_err(|e| {
                    // A pool that could not be built (a certificate file not
                    // there yet, say) may be built later: tried again.
                    let transient = matches!(e, crate::router::ApplyError::Pool { .. });
                    (e.to_string(), transient)
                })
            })
        })
        .await
        .unwrap_or_else(|e| Err((format!("map loading panicked: {e}"), false)));
        match outcome {
            Ok(Applied::Swapped { from, to, .. }) => {
                tracing::info!(from, to, "applied map from the control database");
                self.checksum = Some(checksum);
                self.diverged = false;
                self.refused = None;
                // An earlier refusal no longer describes what this router serves.
                self.router.update_source(|s| s.last_refused = None);
            }
            Ok(_) => {}
            Err((reason, transient)) => {
                tracing::error!(version, live = self.router.version(), %reason, transient,
                    "map version refused; keeping the live map");
                let retry_at = transient.then(|| Instant::now() + RETRY_REFUSED);
                self.refused = Some((version, retry_at));
                self.router.update_source(|s| {
                    s.last_refused = Some(format!("version {version}: {reason}"));
                });
            }
        }
    }

    async fn heartbeat(&self, client: &Client) -> Result<(), ControlError> {
        self.bounded(client.execute(
            "INSERT INTO shard_router_routers \
               (instance_id, host, applied_version, started_at, last_seen, lease_ms, applied_checksum) \
             VALUES ($1, $2, $3, $4, clock_timestamp(), $5, $6) \
             ON CONFLICT (instance_id) DO UPDATE SET host = EXCLUDED.host, \
               applied_version = EXCLUDED.applied_version, last_seen = EXCLUDED.last_seen, \
               lease_ms = EXCLUDED.lease_ms, applied_checksum = EXCLUDED.applied_checksum",
            &[
                &self.options.instance_id,
                &self.options.host,
                &(self.router.version() as i64),
                &self.started_at,
                &(self.options.lease.as_millis() as i64),
                &self.checksum,
            ],
        ))
        .await?;
        self.router.update_source(|s| {
            if let Some(since) = s.unconfirmed_since.take() {
                tracing::info!(unconfirmed_for = ?since.elapsed(), "control database reachable again");
            }
            s.last_confirmed = Some(SystemTime::now());
        });
        Ok(())
    }

    /// Replaces this router's rows of per-tenant load (since it started, and
    /// over each recent window) and pool figures.
    async fn report_load(&mut self, client: &mut Client) -> Result<(), ControlError> {
        let load = self.router.tenant_load();
        let current: Snapshot = load
            .iter()
            .flat_map(|s| {
                s.tenants.iter().map(move |t| {
                    (
                        (s.shard.clone(), t.tenant.clone()),
                        [t.statements, t.rows, t.db_time_us, t.pool_wait_us, t.errors],
                    )
                })
            })
            .collect();
        let rows = self
            .history
            .report(Instant::now(), current, self.options.report_rows);
        let column = |i: usize| -> Vec<i64> {
            rows.iter()
                .map(|(_, _, c)| c[i].min(i64::MAX as u64) as i64)
                .collect()
        };
        let windows: Vec<i32> = rows.iter().map(|(w, _, _)| *w as i32).collect();
        let shards: Vec<&str> = rows.iter().map(|(_, k, _)| k.0.as_str()).collect();
        let tenants: Vec<&str> = rows.iter().map(|(_, k, _)| k.1.as_str()).collect();
        let table = self.router.table();
        let pools: Vec<_> = table
            .shards()
            .zip(&load)
            .map(|((name, pool), shard)| {
                let status = pool.status();
                let sum = |f: fn(&crate::accounting::TenantLoad) -> u64| -> i64 {
                    shard
                        .tenants
                        .iter()
                        .map(f)
                        .sum::<u64>()
                        .min(i64::MAX as u64) as i64
                };
                (
                    name.name().to_owned(),
                    [
                        status.max_size as i64,
                        status.size as i64,
                        status.available as i64,
                        status.waiting as i64,
                        shard.tenants.len() as i64,
                        sum(|t| t.statements),
                        sum(|t| t.db_time_us),
                    ],
                )
            })
            .collect();
        let id = &self.options.instance_id;
        let work = async {
            let tx = client.transaction().await?;
            tx.execute(
                "DELETE FROM shard_router_tenant_load WHERE instance_id = $1",
                &[id],
            )
            .await?;
            tx.execute(
                "INSERT INTO shard_router_tenant_load \
                   (instance_id, window_s, shard, tenant, statements, rows, db_time_us, pool_wait_us, errors) \
                 SELECT $1, * FROM unnest($2::int4[], $3::text[], $4::text[], $5::int8[], $6::int8[], \
                   $7::int8[], $8::int8[], $9::int8[])",
                &[
                    id,
                    &windows,
                    &shards,
                    &tenants,
                    &column(0),
                    &column(1),
                    &column(2),
                    &column(3),
                    &column(4),
                ],
            )
            .await?;
            tx.execute(
                "DELETE FROM shard_router_shard_load WHERE instance_id = $1",
                &[id],
            )
            .await?;
            for (shard, f) in &pools {
                tx.execute(
                    "INSERT INTO shard_router_shard_load (instance_id, shard, pool_max, pool_size, \
                       pool_available, pool_waiting, tenants, statements, db_time_us) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    &[id, shard, &f[0], &f[1], &f[2], &f[3], &f[4], &f[5], &f[6]],
                )
                .await?;
            }
            tx.commit().await
        };
        match tokio::time::timeout(self.options.lease, work).await {
            Ok(result) => result.map_err(ControlError::from),
            Err(_) => Err(ControlError::Timeout {
                waited: self.options.lease,
            }),
        }
    }

    /// Records a failed dual write on the tenant's unfinished move.
    async fn record_failure(
        &self,
        client: &Client,
        tenant: &str,
        what: &str,
    ) -> Result<(), ControlError> {
        self.bounded(client.execute(
            "UPDATE shard_router_moves SET error = $2, updated_at = now() \
             WHERE tenant = $1 AND phase NOT IN ('complete', 'aborted')",
            &[
                &tenant,
                &format!("dual write failed on {}: {what}", self.options.instance_id),
            ],
        ))
        .await
        .map(|_| ())
    }

    /// Runs a control query for at most one lease: a hung connection must not
    /// keep the router from noticing it is cut off.
    async fn bounded<T>(
        &self,
        query: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, ControlError> {
        match tokio::time::timeout(self.options.lease, query).await {
            Ok(result) => result.map_err(ControlError::from),
            Err(_) => Err(ControlError::Timeout {
                waited: self.options.lease,
            }),
        }
    }

    fn unconfirmed(&self, cause: &ControlError) {
        let mut since = Instant::now();
        self.router.update_source(|s| {
            since = *s.unconfirmed_since.get_or_insert(since);
        });
        tracing::warn!(error = %cause, unconfirmed_for = ?since.elapsed(),
            map_version = self.router.version(),
            "control database unreachable; serving the last applied map");
    }
}

/// A tenant's counters: statements, rows, database time (µs), pool wait (µs), errors.
type Counters = [u64; 5];

/// Every tracked (shard, tenant)'s counters at one moment.
type Snapshot = std::collections::HashMap<(String, String), Counters>;

/// A report row: window (seconds, 0 = since start), (shard, tenant), counters.
type ReportRow = (u32, (String, String), Counters);

/// Snapshots of the router's per-tenant counters, one a minute for the last
/// hour, so a report can give each recent window's difference.
#[derive(Debug, Default)]
struct LoadHistory {
    kept: std::collections::VecDeque<(Instant, Snapshot)>,
}

impl LoadHistory {
    /// How often a snapshot is kept, and for how long.
    const EVERY: Duration = Duration::from_secs(60);
    const FOR: Duration = Duration::from_secs(3660);

    /// The rows of a report made at `now` from `current`: for each window,
    /// the `rows` tenants with the most database time in it. Keeps `current`
    /// (its `2 × rows` largest) if a minute passed since the last one kept.
    fn report(&mut self, now: Instant, current: Snapshot, rows: usize) -> Vec<ReportRow> {
        let mut report = Vec::new();
        for window in super::LoadWindow::ALL {
            let seconds = window.seconds();
            // The newest snapshot at least the window old; none: the router
            // is younger than the window, and its whole life is the window.
            let base = (seconds > 0)
                .then(|| {
                    self.kept.iter().rev().find(|(at, _)| {
                        now.saturating_duration_since(*at) >= Duration::from_secs(seconds.into())
                    })
                })
                .flatten()
                .map(|(_, snapshot)| snapshot);
            let mut deltas: Vec<ReportRow> = current
                .iter()
                .map(|(key, now)| {
                    let before = base.and_then(|b| b.get(key)).copied().unwrap_or_default();
                    let delta = std::array::from_fn(|i| now[i].saturating_sub(before[i]));
                    (seconds, key.clone(), delta)
                })
                .filter(|(_, _, c)| c[0] > 0 || c[3] > 0)
                .collect();
            deltas.sort_by(|a, b| b.2[2].cmp(&a.2[2]).then_with(|| a.1.cmp(&b.1)));
            deltas.truncate(rows);
            report.extend(deltas);
        }
        if self
            .kept
            .back()
            .is_none_or(|(at, _)| now.saturating_duration_since(*at) >= Self::EVERY)
        {
            let mut largest: Vec<_> = current.into_iter().collect();
            largest.sort_by(|a, b| b.1[2].cmp(&a.1[2]));
            largest.truncate(2 * rows);
            self.kept.push_back((now, largest.into_iter().collect()));
        }
        while self
            .kept
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > Self::FOR)
        {
            self.kept.pop_front();
        }
        report
    }
}

#[cfg(test)]
mod load_history_tests {
    use super::*;

    fn snapshot(entries: &[(&str, u64)]) -> Snapshot {
        entries
            .iter()
            .map(|(t, n)| (("a".to_owned(), (*t).to_owned()), [*n, 0, *n * 10, 0, 0]))
            .collect()
    }

    #[test]
    fn each_window_reports_what_happened_in_it() {
        let start = Instant::now();
        let mut history = LoadHistory::default();
        let at = |s: u64| start + Duration::from_secs(s);
        // Minute 0: "old" is busy. Then only "new" works.
        history.report(at(0), snapshot(&[("old", 100)]), 10);
        history.report(at(60), snapshot(&[("old", 100), ("new", 5)]), 10);
        let rows = history.report(at(130), snapshot(&[("old", 100), ("new", 20)]), 10);
        let get = |window: u32, tenant: &str| {
            rows.iter()
                .find(|(w, k, _)| *w == window && k.1 == tenant)
                .map(|(_, _, c)| c[0])
        };
        assert_eq!(get(0, "old"), Some(100));
        assert_eq!(get(0, "new"), Some(20));
        // The last minute (base: the snapshot at 60 s): only new's 15.
        assert_eq!(get(60, "new"), Some(15));
        assert_eq!(get(60, "old"), None, "idle in the window");
        // The last 5 minutes reach back before the first snapshot: whole life.
        assert_eq!(get(300, "old"), Some(100));
        // Bounded: at most `rows` per window.
        let rows = history.report(at(200), snapshot(&[("x", 1), ("y", 2), ("z", 3)]), 2);
        assert!(rows.iter().filter(|(w, _, _)| *w == 0).count() <= 2);
        assert!(history.kept.len() <= 4);
    }
}
