//! `shardctl migrate ...`.

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::json;
use shard_router::migrate::{self, Migrations, ShardError, ShardStatus};

use crate::{block_on, print_json, MapSourceArgs};

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct MigrateArgs {
    #[command(subcommand)]
    command: Option<MigrateCommand>,
    #[command(flatten)]
    source: MapSourceArgs,
    /// The migrations folder: files named V{version}__{name}.sql (the
    /// example's is migrations/notes in this repository).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print what would run where, and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// How long a statement may wait for a table lock before its file is
    /// rolled back and tried again (a long transaction holding the table).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    lock_timeout_ms: u64,
    /// How many times a file is tried when it times out waiting for a lock.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    lock_attempts: u32,
}

#[derive(Subcommand)]
enum MigrateCommand {
    /// One row per shard: applied version, pending files, drift, reachability.
    Status {
        #[command(flatten)]
        source: MapSourceArgs,
        /// The migrations folder: files named V{version}__{name}.sql.
        #[arg(long)]
        dir: PathBuf,
    },
}

pub(crate) fn run(args: &MigrateArgs, json: bool) -> Result<(), String> {
    let (source, dir, status_only) = match &args.command {
        Some(MigrateCommand::Status { source, dir }) => (source, dir, true),
        None => (
            &args.source,
            args.dir.as_ref().ok_or(
                "--dir PATH is required: the migrations folder (files named V{version}__{name}.sql)",
            )?,
            args.dry_run,
        ),
    };
    let map = source.load()?;
    let migrations = Migrations::load(dir)
        .map_err(|e| format!("{e}"))?
        .lock_timeout(
            std::time::Duration::from_millis(args.lock_timeout_ms),
            args.lock_attempts,
        );
    let label = |v: u32| migrations.files()[v as usize - 1].label();
    let statuses = block_on(migrate::status(&map, &migrations));

    if status_only {
        /// A shard's row in `--json migrate status`.
        #[derive(serde::Serialize)]
        #[serde(untagged)]
        enum Row<'a> {
            Ok(&'a ShardStatus),
            Failed {
                shard: &'a str,
                #[serde(flatten)]
                error: &'a ShardError,
            },
        }
        let mut failed = false;
        let mut rows = Vec::new();
        for (shard, status) in &statuses {
            match status {
                Ok(s) => {
                    rows.push(Row::Ok(s));
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
                    rows.push(Row::Failed { shard, error: e });
                    if !json {
                        println!("{shard:<12} {}", e);
                    }
                }
            }
        }
        if json {
            print_json(
                &json!({"latest": migrations.latest(), "dry_run": args.dry_run, "shards": rows}),
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
    let reports = block_on(migrate::migrate(&map, &migrations, |shard, file| {
        bar.set_message(format!("{shard}: {}", file.label()));
        bar.inc(1);
    }));
    bar.finish_and_clear();
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| r.outcome.is_err())
        .map(|r| r.shard.as_str())
        .collect();
    if json {
        print_json(&json!({"latest": migrations.latest(), "shards": reports}));
    } else {
        for report in &reports {
            let applied: Vec<String> = report.applied.iter().map(|v| label(*v)).collect();
            match &report.outcome {
                Ok(version) => println!(
                    "{:<12} version {version:<4} {}",
                    report.shard,
                    if applied.is_empty() {
                        "already up to date".to_owned()
                    } else {
                        format!("applied: {}", applied.join(", "))
                    }
                ),
                Err(e) => println!("{:<12} FAILED {e}", report.shard),
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else if json {
        Err(String::new())
    } else {
        Err(format!("not migrated: {}", failed.join(", ")))
    }
}
