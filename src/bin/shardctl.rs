//! `shardctl`: operate shard-router shard maps.
//!
//! Exit codes: 0 success, 1 the map or the request is invalid (the problems are
//! printed), 2 bad command-line usage.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::json;
use shard_router::map::{MapLoader, Reason, ShardMap};
use shard_router::migrate::{self, Migrations, ShardError};
use shard_router::{MapError, TenantId};

/// Operate shard-router shard maps.
#[derive(Parser)]
#[command(name = "shardctl", version)]
struct Cli {
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Shard map files.
    #[command(subcommand)]
    Map(MapCommand),
    /// Tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Apply the migrations folder to every shard (`migrate status` to look only).
    Migrate(MigrateArgs),
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct MigrateArgs {
    #[command(subcommand)]
    command: Option<MigrateCommand>,
    /// The shard map file (environment overrides apply).
    #[arg(long, required = true)]
    map: Option<PathBuf>,
    /// The migrations folder: files named V{version}__{name}.sql.
    #[arg(long, default_value = "migrations/notes")]
    dir: PathBuf,
    /// Print what would run where, and change nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Subcommand)]
enum MigrateCommand {
    /// One row per shard: applied version, pending files, drift, reachability.
    Status(MigrateTarget),
}

#[derive(clap::Args)]
struct MigrateTarget {
    /// The shard map file (environment overrides apply).
    #[arg(long)]
    map: PathBuf,
    /// The migrations folder: files named V{version}__{name}.sql.
    #[arg(long, default_value = "migrations/notes")]
    dir: PathBuf,
}

#[derive(Subcommand)]
enum MapCommand {
    /// Check a map file; print every problem, one per line, and exit 1 if there is any.
    Validate {
        /// The shard map file (environment overrides apply).
        file: PathBuf,
    },
    /// Print a map file as the router sees it (passwords redacted).
    Show {
        /// The shard map file (environment overrides apply).
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Print the shard that serves a tenant, and why (pin, ring or move).
    Locate {
        /// The tenant id.
        tenant: String,
        /// The shard map file (environment overrides apply).
        #[arg(long)]
        map: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Migrate(args) => run_migrate(args, cli.json),
        Command::Map(MapCommand::Validate { file }) => validate(file, cli.json),
        Command::Map(MapCommand::Show { file }) => load(file).map(|map| show(&map, cli.json)),
        Command::Tenant(TenantCommand::Locate { tenant, map }) => locate(tenant, map, cli.json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("{message}");
            }
            ExitCode::from(1)
        }
    }
}

fn load(file: &PathBuf) -> Result<ShardMap, String> {
    MapLoader::new().load_file(file).map_err(|e| e.to_string())
}

fn validate(file: &PathBuf, json: bool) -> Result<(), String> {
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
                Err(problems
                    .iter()
                    .map(|p| format!("error: {p}"))
                    .collect::<Vec<_>>()
                    .join("\n"))
            }
        }
        Err(other) => Err(format!("error: {other}")),
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
                    "weight": s.weight(),
                    "pool": {
                        "max_size": s.pool().max_size,
                        "wait_timeout_ms": s.pool().wait_timeout.as_millis() as u64,
                        "connect_timeout_ms": s.pool().connect_timeout.as_millis() as u64,
                    },
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

fn locate(tenant: &str, file: &PathBuf, json: bool) -> Result<(), String> {
    let tenant = TenantId::new(tenant).map_err(|e| format!("error: {tenant:?}: {e}"))?;
    let map = load(file)?;
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

fn run_migrate(args: &MigrateArgs, json: bool) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("error: cannot start the runtime: {e}"))?;
    let (map, dir, status_only) = match &args.command {
        Some(MigrateCommand::Status(target)) => (&target.map, &target.dir, true),
        // clap requires --map when there is no subcommand.
        None => (
            args.map.as_ref().expect("--map is required"),
            &args.dir,
            args.dry_run,
        ),
    };
    let map = load(map)?;
    let migrations = Migrations::load(dir).map_err(|e| format!("error: {e}"))?;
    let label = |v: u32| migrations.files()[v as usize - 1].label();
    let statuses = runtime.block_on(migrate::status(&map, &migrations));

    if status_only {
        let mut failed = false;
        let mut rows = Vec::new();
        for (shard, status) in &statuses {
            match status {
                Ok(s) => {
                    rows.push(json!({"shard": shard, "version": s.version,
                        "pending": s.pending.iter().map(|v| label(*v)).collect::<Vec<_>>(), "error": null}));
                    if !json {
                        let pending: Vec<String> = s.pending.iter().map(|v| label(*v)).collect();
                        let verb = if args.dry_run {
                            "would apply"
                        } else {
                            "pending"
                        };
                        println!(
                            "{shard:<12} version {:<4} {}",
                            s.version,
                            if pending.is_empty() {
                                "up to date".to_owned()
                            } else {
                                format!("{verb}: {}", pending.join(", "))
                            }
                        );
                    }
                }
                Err(e) => {
                    failed = true;
                    rows.push(json!({"shard": shard, "version": null, "pending": null,
                        "error": e.to_string(), "kind": kind(e)}));
                    if !json {
                        println!("{shard:<12} {}", e);
                    }
                }
            }
        }
        if json {
            println!(
                "{}",
                json!({"latest": migrations.latest(), "dry_run": args.dry_run, "shards": rows})
            );
        }
        return if failed { Err(String::new()) } else { Ok(()) };
    }

    let total: u64 = statuses
        .iter()
        .filter_map(|(_, s)| s.as_ref().ok())
        .map(|s| s.pending.len() as u64)
        .sum();
    let bar = if json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(total).with_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} shard×file {msg}")
                .expect("static template"),
        )
    };
    let reports = runtime.block_on(migrate::migrate(&map, &migrations, |shard, file| {
        bar.set_message(format!("{shard}: {}", file.label()));
        bar.inc(1);
    }));
    bar.finish_and_clear();
    let mut failed = Vec::new();
    let mut rows = Vec::new();
    for report in &reports {
        let applied: Vec<String> = report.applied.iter().map(|v| label(*v)).collect();
        match &report.outcome {
            Ok(version) => {
                rows.push(json!({"shard": report.shard, "version": version, "applied": applied, "error": null}));
                if !json {
                    println!(
                        "{:<12} version {version:<4} {}",
                        report.shard,
                        if applied.is_empty() {
                            "already up to date".to_owned()
                        } else {
                            format!("applied: {}", applied.join(", "))
                        }
                    );
                }
            }
            Err(e) => {
                failed.push(report.shard.clone());
                rows.push(
                    json!({"shard": report.shard, "version": null, "applied": applied,
                    "error": e.to_string(), "kind": kind(e)}),
                );
                if !json {
                    println!("{:<12} FAILED {e}", report.shard);
                }
            }
        }
    }
    if json {
        println!("{}", json!({"latest": migrations.latest(), "shards": rows}));
    }
    if failed.is_empty() {
        Ok(())
    } else if json {
        Err(String::new())
    } else {
        Err(format!("error: not migrated: {}", failed.join(", ")))
    }
}

/// A stable word for each shard failure, for `--json` consumers.
fn kind(err: &ShardError) -> &'static str {
    match err {
        ShardError::Unreachable { .. } => "unreachable",
        ShardError::Drift { .. } => "drift",
        ShardError::Missing { .. } => "missing",
        ShardError::Failed { .. } => "failed",
        _ => "database",
    }
}
