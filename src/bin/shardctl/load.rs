//! `shardctl tenants top` and `shardctl shards`: the load the routers report.

use clap::Subcommand;
use shard_router::control::LoadOrder;

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
    },
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
    } = command;
    block_on(async {
        let control = connect(&control.control).await?;
        let top = control
            .tenants_top(shard.as_deref(), by.into(), limit)
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
