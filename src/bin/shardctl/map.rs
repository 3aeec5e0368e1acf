//! `shardctl map ...`: validate, show, publish, history, diff, rollback.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use serde_json::json;
use shard_router::control::{PublishError, PublishOptions, Published, Rollout};
use shard_router::map::{MapDiff, MapLoader, ShardMap};
use shard_router::MapError;

use crate::{block_on, connect, load, print_json, stored, ControlArg};

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
    /// A shard's url now points at a database that holds its data though its
    /// identity says otherwise (a restored copy, a new server): rewrite that
    /// database's identity instead of refusing.
    #[arg(long)]
    reassign: bool,
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
                (None, Some(url)) => {
                    block_on(async { stored(&connect(&url).await?, version).await })?
                }
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
    options.reassign = args.reassign;
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
            for warning in &published.warnings {
                eprintln!("warning: {warning}");
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
        // Every router applied it: tenants that first wrote meanwhile on the
        // placement before are pinned there in a follow-up version.
        let stragglers = match &rollout {
            Some(r) if r.laggards.is_empty() => Some(
                control
                    .pin_rollout_stragglers(published.version)
                    .await
                    .map_err(|e| format!("after the rollout: {e}"))?,
            ),
            _ => None,
        };
        if json {
            #[derive(serde::Serialize)]
            struct Report<'a> {
                #[serde(flatten)]
                published: &'a Published,
                rollout: Option<&'a Rollout>,
                stragglers: Option<&'a shard_router::control::Stragglers>,
            }
            print_json(&Report {
                published: &published,
                rollout: rollout.as_ref(),
                stragglers: stragglers.as_ref(),
            });
        } else {
            if let Some(rollout) = &rollout {
                print_rollout(rollout, published.version);
            }
            if let Some(found) = &stragglers {
                for t in &found.pinned {
                    println!(
                        "  pinned {} to {}: it first wrote there during the rollout",
                        t.tenant, t.from
                    );
                }
                if let Some(v) = found.published {
                    println!("published version {v} with those pins");
                }
                for t in &found.split {
                    eprintln!(
                        "warning: tenant {} has rows on {} (written during the rollout) and on {}: neither holds all of its data; merge or move them by hand",
                        t.tenant, t.from, t.to
                    );
                }
            }
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

fn history(url: &str, json: bool) -> Result<(), String> {
    block_on(async {
        let control = connect(url).await?;
        let versions = control.history().await.map_err(|e| format!("{e}"))?;
        if json {
            print_json(&versions);
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
                        stored(control, Some(version)).await
                    }
                    Err(_) => load(Path::new(&spec)),
                }
            }
        };
        Ok::<_, String>((fetch(a.to_owned()).await?, fetch(b.to_owned()).await?))
    })?;
    let diff = MapDiff::between(&old, &new);
    if json {
        print_json(&diff);
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
