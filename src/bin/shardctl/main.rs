//! `shardctl`: operate shard-router: shard maps, rollouts, tenants, migrations.
//!
//! Exit codes: 0 success; 1 refused, invalid, failed or timed out (the reason is
//! printed); 2 bad command-line usage.

mod control;
mod load;
mod map;
mod migrate;
mod tenant;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shard_router::control::ControlPlane;
use shard_router::map::MapLoader;
use shard_router::ShardMap;

/// Operate shard-router: shard maps, rollouts, tenants, migrations.
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
    /// Shard maps: validate, show, publish, history, diff, rollback.
    #[command(subcommand)]
    Map(map::MapCommand),
    /// Tenants.
    #[command(subcommand)]
    Tenant(tenant::TenantCommand),
    /// Apply the migrations folder to every shard (`migrate status` to look only).
    Migrate(migrate::MigrateArgs),
    /// The control database.
    #[command(subcommand)]
    Control(control::ControlCommand),
    /// Running routers: instance, applied map version, last seen, login; stale ones marked.
    Routers(control::RoutersArgs),
    /// Load the routers report, by tenant.
    #[command(subcommand)]
    Tenants(load::TenantsCommand),
    /// Each shard's share of load, pool saturation and tenant count, as the routers report them.
    Shards(ControlArg),
    /// Propose (and with --apply, run) the tenant moves that balance the shards' load.
    Plan(load::PlanArgs),
}

/// Where the control database is.
#[derive(clap::Args, Clone)]
pub(crate) struct ControlArg {
    /// Control database URL.
    #[arg(long, env = "SHARD_ROUTER_CONTROL")]
    control: String,
}

/// A map from a file or from the control database (its newest version).
#[derive(clap::Args, Clone)]
pub(crate) struct MapSourceArgs {
    /// The shard map file (environment overrides apply).
    #[arg(long)]
    map: Option<PathBuf>,
    /// Or: the control database URL (its newest map).
    #[arg(long, env = "SHARD_ROUTER_CONTROL")]
    control: Option<String>,
}

impl MapSourceArgs {
    /// The file if given, else the control database's newest map.
    pub(crate) fn load(&self) -> Result<ShardMap, String> {
        match (&self.map, &self.control) {
            (Some(file), _) => load(file),
            (None, Some(url)) => block_on(async { stored(&connect(url).await?, None).await }),
            (None, None) => Err("give --map FILE or --control URL".to_owned()),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(control_after_subcommand(std::env::args_os().collect()));
    let json = cli.json;
    let result = match cli.command {
        Command::Map(command) => map::run(command, json),
        Command::Tenant(command) => tenant::run(command, json),
        Command::Migrate(args) => migrate::run(&args, json),
        Command::Control(command) => control::run(command, json),
        Command::Routers(arg) => control::routers(&arg, json),
        Command::Tenants(command) => load::tenants(command, json),
        Command::Shards(arg) => load::shards(&arg, json),
        Command::Plan(args) => load::plan(&args, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            // Empty: the command printed its own report (per-shard results).
            if !message.is_empty() {
                eprintln!("error: {message}");
            }
            ExitCode::from(1)
        }
    }
}

/// `--control URL` given before the subcommand, as `--json` may be, moved to
/// the end of the command line, where the subcommand that takes it reads it
/// (clap reads an option only at the level that defines it, and each command
/// defines its own `--control`).
fn control_after_subcommand(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut head = Vec::new();
    let mut moved = Vec::new();
    let mut rest = args.into_iter();
    if let Some(program) = rest.next() {
        head.push(program);
    }
    while let Some(arg) = rest.next() {
        match arg.to_str() {
            Some("--control") => {
                moved.push(arg);
                moved.extend(rest.next());
            }
            Some(flag) if flag.starts_with("--control=") => moved.push(arg),
            Some(flag) if flag.starts_with('-') => head.push(arg),
            _ => {
                // The subcommand: everything from here stays in order.
                head.push(arg);
                head.extend(rest.by_ref());
            }
        }
    }
    match head.iter().position(|a| a == "--") {
        Some(at) => {
            head.splice(at..at, moved);
        }
        None => head.extend(moved),
    }
    head
}

// Every command reads maps through these two: a file with the environment's
// overrides, or a published version with them.

/// Loads a map file with the environment's overrides.
pub(crate) fn load(file: &Path) -> Result<ShardMap, String> {
    MapLoader::new().load_file(file).map_err(|e| format!("{e}"))
}

/// Loads a published version (`None`: the newest) with the environment's overrides.
pub(crate) async fn stored(
    control: &ControlPlane,
    version: Option<u64>,
) -> Result<ShardMap, String> {
    let stored = match version {
        Some(v) => control
            .get(v)
            .await
            .map_err(|e| format!("{e}"))?
            .ok_or_else(|| format!("version {v} was never published"))?,
        None => control.latest().await.map_err(|e| format!("{e}"))?,
    };
    stored.load().map_err(|e| format!("{e}"))
}

/// Prints `value` as one line of JSON (`--json`), from the library's own serialization.
pub(crate) fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string(value).expect("library types serialize to JSON")
    );
}

/// Runs `future` on a single-threaded runtime.
pub(crate) fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime starts")
        .block_on(future)
}

pub(crate) async fn connect(url: &str) -> Result<ControlPlane, String> {
    ControlPlane::connect(url).await.map_err(|e| format!("{e}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_before_the_subcommand_is_read_by_it() {
        let args = |line: &str| line.split(' ').map(std::ffi::OsString::from).collect();
        let moved = |line: &str| {
            super::control_after_subcommand(args(line))
                .into_iter()
                .map(|a| a.into_string().unwrap())
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            moved("shardctl --json --control postgres://c routers"),
            "shardctl --json routers --control postgres://c"
        );
        assert_eq!(
            moved("shardctl --control=postgres://c map show"),
            "shardctl map show --control=postgres://c"
        );
        assert_eq!(
            moved("shardctl map show --control postgres://c"),
            "shardctl map show --control postgres://c"
        );
    }
}
