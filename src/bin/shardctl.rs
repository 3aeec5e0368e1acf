//! `shardctl`: operate shard-router shard maps.
//!
//! Exit codes: 0 success, 1 the map or the request is invalid (the problems are
//! printed), 2 bad command-line usage.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::json;
use shard_router::map::{MapLoader, Reason, ShardMap};
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
