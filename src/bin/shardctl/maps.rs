//! `shardctl map ...` and `shardctl tenant ...`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use serde_json::json;
use shard_router::control::{
    ControlError, ControlPlane, PublishError, PublishOptions, Published, Rollout,
};
use shard_router::map::{MapDiff, MapLoader, Reason, ShardMap};
use shard_router::moves::{self, MoveOptions, Progress, Step};
use shard_router::{MapError, TenantId};

use crate::{block_on, connect, load, ControlArg, MapSourceArgs};

#[derive(Subcommand)]
pub(crate) enum MapCommand {
    /// Check a map file; print every problem, one per line, and exit 1 if there is any.
    Validate {
        /// The shard map file (environment overrides apply).
        file: PathBuf,
    },
    /// Print a map as the router sees it (passwords redacted): a file, or a
    /// version from the control database.
    Show {
        /// The shard map file.
        file: Option<PathBuf>,
        /// Control database URL (instead of FILE).
        #[arg(long, env = "SHARD_ROUTER_CONTROL")]
        control: Option<String>,
        /// The version to show (default: the newest).
        #[arg(long)]
        version: Option<u64>,
    },
    /// Validate, diff against the newest version, and publish a map to every router.
    Publish {
        /// The shard map file.
        file: PathBuf,
        #[command(flatten)]
        control: ControlArg,
        #[command(flatten)]
        options: PublishArgs,
    },
    /// Every published version: version, time, checksum, note.
    History(ControlArg),
    /// What changes between two versions (or map files).
    Diff {
        /// The older version number, or a map file.
        a: String,
        /// The newer version number, or a map file.
        b: String,
        /// Control database URL (needed for version numbers).
        #[arg(long, env = "SHARD_ROUTER_CONTROL")]
        control: Option<String>,
    },
    /// Publish the content of an old version as a new, higher version.
    Rollback {
        /// The version whose routing to restore.
        #[arg(long)]
        to: u64,
        #[command(flatten)]
        control: ControlArg,
        #[command(flatten)]
        options: PublishArgs,
    },
}

#[derive(clap::Args)]
pub(crate) struct PublishArgs {
    /// A note stored with the version.
    #[arg(long)]
    note: Option<String>,
    /// Wait up to SECS for every live router to apply the version; exit 1 naming the laggards.
    #[arg(long, value_name = "SECS")]
    wait: Option<u64>,
    /// Pin tenants that have data where they are, instead of refusing a map that would re-home them.
    #[arg(long)]
    pin_existing: bool,
    /// Check and print the plan; publish nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Subcommand)]
pub(crate) enum TenantCommand {
    /// Move a tenant to another shard online: start, backfill, verify, cutover, complete.
    Move {
        /// The tenant id.
        tenant: String,
        /// The target shard (to start a move).
        #[arg(long, required_unless_present_any = ["resume", "abort"])]
        to: Option<String>,
        #[command(flatten)]
        control: ControlArg,
        /// Stop after this step.
        #[arg(long, value_enum, default_value_t = Until::Complete)]
        until: Until,
        /// Delete the tenant's rows from the source after complete.
        #[arg(long)]
        purge_source: bool,
        /// Continue a move that stopped or crashed.
        #[arg(long, conflicts_with_all = ["to", "abort"])]
        resume: bool,
        /// Return the tenant to its source and remove what was copied (until complete).
        #[arg(long, conflicts_with_all = ["to", "resume"])]
        abort: bool,
        /// Seconds to wait for every live router at each new map version.
        #[arg(long, default_value = "30", value_name = "SECS")]
        wait: u64,
        /// Seconds this mover's lease lasts without renewal; a mover that died
        /// blocks others this long. Must exceed --wait.
        #[arg(long, default_value = "60", value_name = "SECS")]
        lease: u64,
        /// Purge waits for every router that ever reported to apply the
        /// complete map, or to be silent this many seconds.
        #[arg(long, default_value = "600", value_name = "SECS")]
        purge_grace: u64,
        /// Backfill at most this many rows per second (default: no limit).
        #[arg(long, value_name = "ROWS")]
        max_rows_per_sec: Option<u64>,
    },
    /// Phase, rows copied per table, checksums, versions, timings and errors of a tenant's move.
    MoveStatus {
        /// The tenant id.
        tenant: String,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Print the shard that serves a tenant, and why (pin, ring or move).
    Locate {
        /// The tenant id.
        tenant: String,
        #[command(flatten)]
        source: MapSourceArgs,
    },
}

pub(crate) fn run(command: MapCommand, json: bool) -> Result<(), String> {
    match command {
        MapCommand::Validate { file } => validate(&file, json),
        MapCommand::Show {
            file,
            control,
            version,
        } => {
            let map = match (file, control) {
                (Some(file), _) => load(&file)?,
                (None, Some(url)) => block_on(async {
                    let control = connect(&url).await?;
                    let stored = match version {
                        Some(v) => control
                            .get(v)
                            .await
                            .map_err(|e| format!("{e}"))?
                            .ok_or_else(|| format!("version {v} was never published"))?,
                        None => control.latest().await.map_err(|e| format!("{e}"))?,
                    };
                    stored.load().map_err(|e| format!("{e}"))
                })?,
                (None, None) => return Err("give FILE or --control URL".into()),
            };
            show(&map, json);
            Ok(())
        }
        MapCommand::Publish {
            file,
            control,
            options,
        } => {
            let toml = std::fs::read_to_string(&file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            publish(&control.control, &options, json, |c, o| {
                Box::pin(async move { c.publish(&toml, o).await })
            })
        }
        MapCommand::Rollback {
            to,
            control,
            options,
        } => publish(&control.control, &options, json, move |c, o| {
            Box::pin(async move { c.rollback(to, o).await })
        }),
        MapCommand::History(control) => history(&control.control, json),
        MapCommand::Diff { a, b, control } => diff(&a, &b, control.as_deref(), json),
    }
}

pub(crate) fn run_tenant(command: TenantCommand, json: bool) -> Result<(), String> {
    match command {
        TenantCommand::Locate { tenant, source } => locate(&tenant, &source, json),
        TenantCommand::MoveStatus { tenant, control } => {
            let tenant = TenantId::new(&tenant).map_err(|e| format!("{tenant:?}: {e}"))?;
            block_on(async {
                let control = connect(&control.control).await?;
                let tenant = as_named_by_map(&control, tenant).await?;
                let status = moves::status(&control, &tenant)
                    .await
                    .map_err(|e| format!("{e}"))?
                    .ok_or_else(|| format!("tenant {tenant} has never moved"))?;
                print_move(&status, json);
                Ok(())
            })
        }
        TenantCommand::Move {
            tenant,
            to,
            control,
            until,
            purge_source,
            resume,
            abort,
            wait,
            lease,
            purge_grace,
            max_rows_per_sec,
        } => {
            let tenant = TenantId::new(&tenant).map_err(|e| format!("{tenant:?}: {e}"))?;
            let mut options = MoveOptions::default();
            options.until = until.into();
            options.purge_source = purge_source;
            options.wait = Duration::from_secs(wait);
            options.lease = Duration::from_secs(lease);
            options.purge_grace = Duration::from_secs(purge_grace);
            options.max_rows_per_sec = max_rows_per_sec;
            let bar = if json {
                indicatif::ProgressBar::hidden()
            } else {
                indicatif::ProgressBar::new_spinner().with_style(
                    indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
                        .expect("static template"),
                )
            };
            let mut copied = 0u64;
            let progress = |p: Progress| match p {
                Progress::Step(step) => bar.set_message(format!("{}...", step.as_str())),
                Progress::Copied { table, rows } => {
                    copied += rows;
                    bar.set_message(format!("backfill: {copied} rows copied ({table})"));
                    bar.tick();
                }
                Progress::Verified { table, rows } => {
                    bar.set_message(format!("verify: {table} ({rows} rows) matches so far"));
                    bar.tick();
                }
                _ => {}
            };
            let result = block_on(async {
                let mut control = connect(&control.control).await?;
                let tenant = as_named_by_map(&control, tenant).await?;
                let outcome = if abort {
                    moves::abort(&mut control, &tenant, &options).await
                } else if resume {
                    moves::resume(&mut control, &tenant, &options, progress).await
                } else {
                    let to = to.expect("clap requires --to");
                    moves::start(&mut control, &tenant, &to, &options, progress).await
                };
                outcome.map_err(|e| format!("{e}"))
            });
            bar.finish_and_clear();
            let status = result?;
            print_move(&status, json);
            Ok(())
        }
    }
}

/// The steps `--until` takes (clap lists and checks them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Until {
    Start,
    Backfill,
    Verify,
    Cutover,
    Complete,
}

impl From<Until> for Step {
    fn from(until: Until) -> Step {
        match until {
            Until::Start => Step::Start,
            Until::Backfill => Step::Backfill,
            Until::Verify => Step::Verify,
            Until::Cutover => Step::Cutover,
            Until::Complete => Step::Complete,
        }
    }
}

/// A pool's settings as `map show --json` prints them.
fn pool_json(pool: &shard_router::map::PoolSettings) -> serde_json::Value {
    json!({
        "max_size": pool.max_size,
        "wait_timeout_ms": pool.wait_timeout.as_millis() as u64,
        "connect_timeout_ms": pool.connect_timeout.as_millis() as u64,
        "tenant_max_connections": pool.tenant_max_connections,
        "idle_timeout_ms": pool.idle_timeout.map(|d| d.as_millis() as u64),
    })
}

/// `tenant` as the live map names it (`tenant_case`), so that `ACME` and
/// `acme` are one tenant for shardctl when they are one for the routers.
async fn as_named_by_map(control: &ControlPlane, tenant: TenantId) -> Result<TenantId, String> {
    match control.latest().await {
        Err(ControlError::NoMap) => Ok(tenant),
        Err(e) => Err(format!("{e}")),
        Ok(stored) => Ok(stored.load().map_err(|e| format!("{e}"))?.tenant_id(tenant)),
    }
}

fn print_move(status: &moves::MoveStatus, json: bool) {
    if json {
        println!(
            "{}",
            json!({"tenant": status.tenant, "from": status.from, "to": status.to,
                   "phase": status.phase, "state": status.state, "error": status.error,
                   "intent": status.intent, "lease_holder": status.lease_holder,
                   "lease_left_ms": status.lease_left_ms})
        );
        return;
    }
    println!(
        "tenant {}: {} -> {}, phase {}",
        status.tenant, status.from, status.to, status.phase
    );
    if let Some(intent) = &status.intent {
        println!("  last map change recorded: {intent}");
    }
    if let (Some(holder), Some(left)) = (&status.lease_holder, status.lease_left_ms) {
        if left > 0 {
            println!("  held by mover {holder} for {left} ms more");
        }
    }
    if let Some(rows) = status.state.get("rows_copied").and_then(|r| r.as_object()) {
        for (table, n) in rows {
            println!("  copied {table}: {n} rows");
        }
    }
    if let Some(verify) = status.state.get("verify").and_then(|r| r.as_object()) {
        for (table, v) in verify {
            println!(
                "  verify {table}: source {} rows, target {} rows, checksums {}",
                v["source_rows"],
                v["target_rows"],
                if v["source_md5"] == v["target_md5"] {
                    "equal"
                } else {
                    "DIFFER"
                }
            );
        }
    }
    if let Some(versions) = status.state.get("versions").and_then(|r| r.as_object()) {
        for (what, v) in versions {
            println!("  map version {v}: {what}");
        }
    }
    for step in ["start", "backfill", "verify", "cutover", "complete"] {
        if let Some(ms) = status.state.get(format!("{step}_ms")) {
            println!("  {step} took {ms} ms");
        }
    }
    if let Some(error) = &status.error {
        println!("  last error: {error}");
    }
}

type PublishFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Published, PublishError>> + 'a>>;

fn publish(
    url: &str,
    args: &PublishArgs,
    json: bool,
    action: impl for<'a> FnOnce(
        &'a mut shard_router::control::ControlPlane,
        &'a PublishOptions,
    ) -> PublishFuture<'a>,
) -> Result<(), String> {
    let mut options = PublishOptions::default();
    options.note = args.note.clone();
    options.pin_existing = args.pin_existing;
    options.dry_run = args.dry_run;
    block_on(async {
        let mut control = connect(url).await?;
        let published = action(&mut control, &options)
            .await
            .map_err(|e| format!("{e}"))?;
        if !json {
            match &published.diff {
                Some(diff) => print!("{diff}"),
                None => println!("first map: version {}", published.version),
            }
            for pin in &published.pinned {
                println!(
                    "  pinned {} to {} (it has data there)",
                    pin.tenant, pin.from
                );
            }
            if published.published {
                println!("published version {}", published.version);
            } else {
                println!("dry run: version {} not published", published.version);
            }
        }
        let rollout = match (args.wait, published.published) {
            (Some(secs), true) => Some(
                control
                    .wait_for(published.version, Duration::from_secs(secs))
                    .await
                    .map_err(|e| format!("{e}"))?,
            ),
            _ => None,
        };
        if json {
            println!(
                "{}",
                json!({
                    "version": published.version,
                    "published": published.published,
                    "diff": published.diff.as_ref().map(diff_json),
                    "pinned": published.pinned.iter().map(|p| json!({"tenant": p.tenant, "shard": p.from})).collect::<Vec<_>>(),
                    "rollout": rollout.as_ref().map(rollout_json),
                })
            );
        } else if let Some(rollout) = &rollout {
            print_rollout(rollout, published.version);
        }
        match rollout {
            Some(r) if !r.laggards.is_empty() => Err(format!(
                "not applied within {}s by: {}",
                args.wait.unwrap_or_default(),
                r.laggards
                    .iter()
                    .map(|l| format!("{} (at version {})", l.instance_id, l.applied_version))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            _ => Ok(()),
        }
    })
}

fn print_rollout(rollout: &Rollout, version: u64) {
    println!(
        "applied by {} live router(s): {}",
        rollout.applied.len(),
        rollout
            .applied
            .iter()
            .map(|r| r.instance_id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for r in &rollout.stale {
        println!(
            "warning: router {} is stale (last seen {} ms ago, lease {} ms, at version {}); not waited for",
            r.instance_id, r.last_seen_ms, r.lease_ms, r.applied_version
        );
    }
    for r in &rollout.laggards {
        println!(
            "router {} is still at version {} (wanted {version})",
            r.instance_id, r.applied_version
        );
    }
}

fn rollout_json(rollout: &Rollout) -> serde_json::Value {
    let ids = |rows: &[shard_router::control::RouterRow]| {
        rows.iter()
            .map(|r| r.instance_id.clone())
            .collect::<Vec<_>>()
    };
    json!({"applied": ids(&rollout.applied), "stale": ids(&rollout.stale), "laggards": ids(&rollout.laggards)})
}

fn diff_json(diff: &MapDiff) -> serde_json::Value {
    json!({
        "from_version": diff.from_version,
        "to_version": diff.to_version,
        "shards_added": diff.shards_added,
        "shards_removed": diff.shards_removed,
        "shards_changed": diff.shards_changed.iter().map(|(s, what)| json!({"shard": s, "changed": what})).collect::<Vec<_>>(),
        "pins_added": diff.pins_added.iter().map(|(t, s)| json!({"tenant": t, "shard": s})).collect::<Vec<_>>(),
        "pins_removed": diff.pins_removed.iter().map(|(t, s)| json!({"tenant": t, "shard": s})).collect::<Vec<_>>(),
        "pins_changed": diff.pins_changed.iter().map(|(t, a, b)| json!({"tenant": t, "from": a, "to": b})).collect::<Vec<_>>(),
        "moves_changed": diff.moves_changed.iter().map(|(t, a, b)| json!({"tenant": t, "before": a, "after": b})).collect::<Vec<_>>(),
        "ring_moved": diff.ring_moved,
        "tenants_changing_shard": diff.named_tenants_moved.iter().map(|(t, a, b)| json!({"tenant": t, "from": a, "to": b})).collect::<Vec<_>>(),
    })
}

fn history(url: &str, json: bool) -> Result<(), String> {
    block_on(async {
        let control = connect(url).await?;
        let versions = control.history().await.map_err(|e| format!("{e}"))?;
        if json {
            let rows: Vec<_> = versions
                .iter()
                .map(|m| json!({"version": m.version, "created_at": m.created_at, "checksum": m.checksum, "note": m.note}))
                .collect();
            println!("{}", json!(rows));
        } else {
            for m in &versions {
                println!(
                    "{:>6}  {}  {}  {}",
                    m.version,
                    m.created_at,
                    m.checksum,
                    m.note.as_deref().unwrap_or("")
                );
            }
        }
        Ok(())
    })
}

fn diff(a: &str, b: &str, control: Option<&str>, json: bool) -> Result<(), String> {
    let (old, new) = block_on(async {
        let control = match control {
            Some(url) => Some(connect(url).await?),
            None => None,
        };
        let fetch = |spec: String| {
            let control = control.as_ref();
            async move {
                match spec.parse::<u64>() {
                    Ok(version) => {
                        let control = control.ok_or("version numbers need --control URL")?;
                        control
                            .get(version)
                            .await
                            .map_err(|e| format!("{e}"))?
                            .ok_or_else(|| format!("version {version} was never published"))?
                            .load()
                            .map_err(|e| format!("{e}"))
                    }
                    Err(_) => load(&PathBuf::from(spec)),
                }
            }
        };
        Ok::<_, String>((fetch(a.to_owned()).await?, fetch(b.to_owned()).await?))
    })?;
    let diff = MapDiff::between(&old, &new);
    if json {
        println!("{}", diff_json(&diff));
    } else {
        print!("{diff}");
    }
    Ok(())
}

fn validate(file: &Path, json: bool) -> Result<(), String> {
    match MapLoader::new().load_file(file) {
        Ok(map) => {
            if json {
                println!("{}", json!({"valid": true, "version": map.version()}));
            } else {
                println!(
                    "ok: {} is valid (version {}, {} shards, {} pins, {} moves)",
                    file.display(),
                    map.version(),
                    map.shards().len(),
                    map.pin_count(),
                    map.moves().len()
                );
            }
            Ok(())
        }
        Err(MapError::Invalid { problems }) => {
            if json {
                let list: Vec<_> = problems
                    .iter()
                    .map(|p| json!({"field": p.field, "reason": p.reason}))
                    .collect();
                println!("{}", json!({"valid": false, "problems": list}));
                Err(String::new())
            } else {
                // One `error:` line per problem (main prefixes the first).
                Err(problems
                    .iter()
                    .map(|p| format!("{p}"))
                    .collect::<Vec<_>>()
                    .join("\nerror: "))
            }
        }
        Err(other) => Err(format!("{other}")),
    }
}

fn show(map: &ShardMap, json: bool) {
    let name = |i| map.shard(i).name();
    if json {
        let shards: Vec<_> = map
            .shards()
            .iter()
            .map(|s| {
                json!({
                    "name": s.name(),
                    "url": s.redacted_url(),
                    "admin_url": s.admin_url().map(shard_router::map::redact_url),
                    "sslmode": s.ssl_mode().as_str(),
                    "weight": s.weight(),
                    "pool": pool_json(s.pool()),
                    "replicas": s.replicas().iter().map(|r| json!({
                        "url": r.redacted_url(),
                        "weight": r.weight(),
                        "pool": pool_json(r.pool()),
                    })).collect::<Vec<_>>(),
                    "max_replica_lag_ms": s.max_replica_lag().as_millis() as u64,
                })
            })
            .collect();
        let pins: serde_json::Map<_, _> = map
            .pins()
            .into_iter()
            .map(|(t, s)| (t.to_owned(), json!(name(s))))
            .collect();
        let moves: serde_json::Map<_, _> = map
            .moves()
            .into_iter()
            .map(|(t, m)| {
                (
                    t.to_owned(),
                    json!({"from": name(m.from), "to": name(m.to), "phase": m.phase.as_str()}),
                )
            })
            .collect();
        let out = json!({
            "version": map.version(),
            "vnodes": map.vnodes(),
            "tenant_column": map.tenant_column(),
            "tenant_setting": map.tenant_setting(),
            "tenant_case": map.tenant_case().as_str(),
            "ring_points": map.ring_points(),
            "shards": shards,
            "tenants": pins,
            "moves": moves,
        });
        println!("{out:#}");
        return;
    }
    println!("version {}", map.version());
    println!(
        "placement: {} vnodes per unit of weight, {} ring points",
        map.vnodes(),
        map.ring_points()
    );
    println!("shards:");
    for s in map.shards() {
        println!(
            "  {:<12} weight {:<3} pool {}/{}ms  {}",
            s.name(),
            s.weight(),
            s.pool().max_size,
            s.pool().wait_timeout.as_millis(),
            s.redacted_url()
        );
    }
    println!("pins: {}", map.pin_count());
    for (tenant, shard) in map.pins().into_iter().take(20) {
        println!("  {tenant} -> {}", name(shard));
    }
    if map.pin_count() > 20 {
        println!("  ... ({} more)", map.pin_count() - 20);
    }
    println!("moves: {}", map.moves().len());
    for (tenant, m) in map.moves() {
        println!(
            "  {tenant}: {} -> {} ({})",
            name(m.from),
            name(m.to),
            m.phase.as_str()
        );
    }
}

fn locate(tenant: &str, source: &MapSourceArgs, json: bool) -> Result<(), String> {
    let tenant = TenantId::new(tenant).map_err(|e| format!("{tenant:?}: {e}"))?;
    let map = source.load()?;
    let tenant = map.tenant_id(tenant);
    let location = map.locate(&tenant);
    let shard = map.shard(location.shard).name();
    if json {
        let mut out = json!({
            "tenant": tenant.as_str(),
            "shard": shard,
            "reason": location.reason.as_str(),
            "map_version": map.version(),
        });
        if let Reason::Move(m) = location.reason {
            out["move"] = json!({
                "from": map.shard(m.from).name(),
                "to": map.shard(m.to).name(),
                "phase": m.phase.as_str(),
            });
        }
        println!("{out}");
    } else {
        println!("{shard}");
    }
    Ok(())
}
