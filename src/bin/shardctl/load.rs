//! `shardctl tenants top` and `shardctl shards`: the load the routers report.

use clap::Subcommand;
use shard_router::control::{LoadOrder, LoadWindow};

use crate::{block_on, connect, print_json, ControlArg};

#[derive(Subcommand)]
pub(crate) enum TenantsCommand {
    /// The most expensive tenants, merged over every live router.
    Top {
        #[command(flatten)]
        control: ControlArg,
        /// Only this shard's tenants.
        #[arg(long)]
        shard: Option<String>,
        /// What to rank by.
        #[arg(long, value_enum, default_value_t = By::Time)]
        by: By,
        /// How many tenants to print.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Only the last minute, 5 minutes, 15 minutes or hour (default:
        /// since each router started).
        #[arg(long, value_enum)]
        since: Option<Since>,
    },
}

/// `--since`: the windows routers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Since {
    #[value(name = "1m")]
    Minute,
    #[value(name = "5m")]
    FiveMinutes,
    #[value(name = "15m")]
    FifteenMinutes,
    #[value(name = "1h")]
    Hour,
}

/// The window `--since` names (none: since each router started).
fn window(since: Option<Since>) -> LoadWindow {
    match since {
        None => LoadWindow::Total,
        Some(Since::Minute) => LoadWindow::Minute,
        Some(Since::FiveMinutes) => LoadWindow::FiveMinutes,
        Some(Since::FifteenMinutes) => LoadWindow::FifteenMinutes,
        Some(Since::Hour) => LoadWindow::Hour,
    }
}

/// `--by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum By {
    Time,
    Statements,
    Rows,
    Errors,
}

impl From<By> for LoadOrder {
    fn from(by: By) -> LoadOrder {
        match by {
            By::Time => LoadOrder::Time,
            By::Statements => LoadOrder::Statements,
            By::Rows => LoadOrder::Rows,
            By::Errors => LoadOrder::Errors,
        }
    }
}

pub(crate) fn tenants(command: TenantsCommand, json: bool) -> Result<(), String> {
    let TenantsCommand::Top {
        control,
        shard,
        by,
        limit,
        since,
    } = command;
    block_on(async {
        let control = connect(&control.control).await?;
        let top = control
            .tenants_top(shard.as_deref(), by.into(), window(since), limit)
            .await
            .map_err(|e| format!("{e}"))?;
        if json {
            print_json(&top);
            return Ok(());
        }
        if top.is_empty() {
            println!("no load reported by a live router yet");
            return Ok(());
        }
        println!(
            "{:<24} {:<12} {:>7} {:>12} {:>12} {:>12} {:>12} {:>8}",
            "tenant",
            "shard",
            "share",
            "statements",
            "rows",
            "db time ms",
            "pool wait ms",
            "errors"
        );
        for t in &top {
            println!(
                "{:<24} {:<12} {:>6.1}% {:>12} {:>12} {:>12.1} {:>12.1} {:>8}",
                t.tenant,
                t.shard,
                t.share * 100.0,
                t.statements,
                t.rows,
                t.db_time_us as f64 / 1000.0,
                t.pool_wait_us as f64 / 1000.0,
                t.errors
            );
        }
        Ok(())
    })
}

pub(crate) fn shards(arg: &ControlArg, json: bool) -> Result<(), String> {
    block_on(async {
        let control = connect(&arg.control).await?;
        let shards = control.shard_load().await.map_err(|e| format!("{e}"))?;
        if json {
            print_json(&shards);
            return Ok(());
        }
        if shards.is_empty() {
            println!("no load reported by a live router yet");
            return Ok(());
        }
        println!(
            "{:<12} {:>7} {:>12} {:>12} {:>8} {:>16} {:>8} {:>8}",
            "shard",
            "share",
            "statements",
            "db time ms",
            "tenants",
            "connections",
            "waiting",
            "routers"
        );
        for s in &shards {
            println!(
                "{:<12} {:>6.1}% {:>12} {:>12.1} {:>8} {:>7} busy/{:<6} {:>8} {:>8}",
                s.shard,
                s.share * 100.0,
                s.statements,
                s.db_time_us as f64 / 1000.0,
                s.tenants,
                s.pool_size - s.pool_available.min(s.pool_size),
                s.pool_max,
                s.pool_waiting,
                s.routers
            );
        }
        Ok(())
    })
}

/// `shardctl plan`.
#[derive(clap::Args)]
pub(crate) struct PlanArgs {
    #[command(flatten)]
    control: ControlArg,
    /// Every shard within this fraction of its target load.
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true)]
    max_imbalance: f64,
    /// At most this many moves.
    #[arg(long, default_value_t = 20)]
    max_moves: usize,
    /// A tenant that must not move (repeat for more).
    #[arg(long, value_name = "TENANT")]
    exclude: Vec<String>,
    /// Run the moves, one at a time, stopping at the first failure.
    #[arg(long)]
    apply: bool,
    /// With --apply: backfill at most this many rows per second per move.
    #[arg(long, value_name = "ROWS")]
    max_rows_per_sec: Option<u64>,
    /// With --apply: seconds to wait for every live router at each new map version.
    #[arg(long, default_value = "30", value_name = "SECS")]
    wait: u64,
    /// With --apply: keep each moved tenant's rows on its former shard
    /// (`shardctl tenant purge` removes them later). By default they are
    /// removed once every router has applied the move's last map.
    #[arg(long)]
    keep_source: bool,
    /// With --apply: a router silent for longer than this does not hold up
    /// removing a former copy.
    #[arg(long, default_value = "600", value_name = "SECS")]
    purge_grace: u64,
}

pub(crate) fn plan(args: &PlanArgs, json: bool) -> Result<(), String> {
    use shard_router::moves::{self, MoveOptions};
    use shard_router::plan::{plan, PlanOptions};
    if args.max_imbalance.is_nan() || args.max_imbalance < 0.0 {
        return Err(format!(
            "--max-imbalance {} must be 0 or more",
            args.max_imbalance
        ));
    }
    block_on(async {
        let mut control = connect(&args.control.control).await?;
        let (shards, tenants) = control.plan_inputs().await.map_err(|e| format!("{e}"))?;
        let mut options = PlanOptions::default();
        options.max_imbalance = args.max_imbalance;
        options.max_moves = args.max_moves;
        options.exclude = args.exclude.iter().cloned().collect();
        let planned = plan(&shards, &tenants, &options);
        if json && !args.apply {
            print_json(&planned);
        } else if !json {
            println!(
                "{:<12} {:>14} {:>14} {:>8} {:>14} {:>8}",
                "shard", "target ms", "before ms", "share", "after ms", "share"
            );
            for (b, a) in planned.before.iter().zip(&planned.after) {
                println!(
                    "{:<12} {:>14.1} {:>14.1} {:>7.1}% {:>14.1} {:>7.1}%",
                    b.shard,
                    b.target as f64 / 1000.0,
                    b.load as f64 / 1000.0,
                    b.share * 100.0,
                    a.load as f64 / 1000.0,
                    a.share * 100.0
                );
            }
            if planned.moves.is_empty() {
                println!(
                    "{}",
                    if planned.balanced {
                        "nothing to do: every shard is within the bound"
                    } else {
                        "no move would bring the shards closer to their targets"
                    }
                );
            }
            for m in &planned.moves {
                println!(
                    "move {} {} -> {} ({:.1} ms of database time)",
                    m.tenant,
                    m.from,
                    m.to,
                    m.load as f64 / 1000.0
                );
            }
            if !planned.balanced && !planned.moves.is_empty() {
                println!("the shards stay outside the bound after these moves (raise --max-moves, or move tenants by hand)");
            }
        }
        if !args.apply {
            return Ok(());
        }
        let mut move_options = MoveOptions::default();
        move_options.max_rows_per_sec = args.max_rows_per_sec;
        move_options.wait = std::time::Duration::from_secs(args.wait);
        move_options.purge_source = !args.keep_source;
        move_options.purge_grace = std::time::Duration::from_secs(args.purge_grace);
        let mut done = Vec::new();
        for m in &planned.moves {
            let tenant =
                shard_router::TenantId::new(&m.tenant).map_err(|e| format!("{}: {e}", m.tenant))?;
            if !json {
                println!("moving {} {} -> {} ...", m.tenant, m.from, m.to);
            }
            let status = moves::start(&mut control, &tenant, &m.to, &move_options, |_| {})
                .await
                .map_err(|e| {
                    format!(
                        "move of {} to {} failed: {e}; {} of {} planned moves done, the rest not started",
                        m.tenant,
                        m.to,
                        done.len(),
                        planned.moves.len()
                    )
                })?;
            done.push(status);
        }
        if json {
            print_json(&serde_json::json!({"plan": planned, "moved": done}));
        } else {
            println!("{} move(s) done", done.len());
        }
        Ok(())
    })
}
