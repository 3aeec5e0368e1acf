//! `shardctl tenant ...`: locate, move, move-status.

use std::time::Duration;

use clap::Subcommand;
use serde_json::json;
use shard_router::control::{ControlError, ControlPlane};
use shard_router::map::Reason;
use shard_router::moves::{self, MoveOptions, Progress, Step};
use shard_router::TenantId;

use crate::{block_on, connect, print_json, ControlArg, MapSourceArgs};

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
        /// Seconds the recorded lease runs ahead of its last renewal (shown by
        /// move-status). Liveness is the mover's control session: a mover that
        /// dies frees the tenant at once.
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
    /// Delete a completed move's copy of the tenant from its former shard,
    /// once every router has applied the newest map (or been silent past
    /// --purge-grace). For moves run without --purge-source.
    Purge {
        /// The tenant id.
        tenant: String,
        #[command(flatten)]
        control: ControlArg,
        /// Seconds to wait for every router.
        #[arg(long, default_value = "30", value_name = "SECS")]
        wait: u64,
        /// Routers silent this many seconds are not waited for.
        #[arg(long, default_value = "600", value_name = "SECS")]
        purge_grace: u64,
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

pub(crate) fn run(command: TenantCommand, json: bool) -> Result<(), String> {
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
        TenantCommand::Purge {
            tenant,
            control,
            wait,
            purge_grace,
        } => {
            let tenant = TenantId::new(&tenant).map_err(|e| format!("{tenant:?}: {e}"))?;
            let mut options = MoveOptions::default();
            options.wait = Duration::from_secs(wait);
            options.purge_grace = Duration::from_secs(purge_grace);
            let status = block_on(async {
                let mut control = connect(&control.control).await?;
                let tenant = as_named_by_map(&control, tenant).await?;
                moves::purge(&mut control, &tenant, &options)
                    .await
                    .map_err(|e| format!("{e}"))
            })?;
            print_move(&status, json);
            Ok(())
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
            let mut verified = 0i64;
            let progress = |p: Progress| match p {
                Progress::Step(step) => {
                    verified = 0;
                    bar.set_message(format!("{}...", step.as_str()))
                }
                Progress::Copied { table, rows } => {
                    copied += rows;
                    bar.set_message(format!("backfill: {copied} rows copied ({table})"));
                    bar.tick();
                }
                Progress::Verified { table, rows } => {
                    verified += rows;
                    bar.set_message(format!("verify: {verified} rows checked ({table})"));
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
        print_json(status);
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
    if let Some(warning) = status
        .state
        .get("one_sided_after_verify")
        .and_then(|w| w.as_str())
    {
        println!("  warning: {warning}");
    }
    if let Some(error) = &status.error {
        println!("  last error: {error}");
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
