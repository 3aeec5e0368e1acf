//! `shardctl control ...` and `shardctl routers`.

use clap::Subcommand;
use serde_json::json;

use crate::{block_on, connect, print_json, ControlArg};

#[derive(Subcommand)]
pub(crate) enum ControlCommand {
    /// Create or upgrade the control schema (idempotent).
    Init(ControlArg),
}

pub(crate) fn run(command: ControlCommand, json: bool) -> Result<(), String> {
    match command {
        ControlCommand::Init(arg) => block_on(async {
            let mut control = connect(&arg.control).await?;
            let applied = control.init().await.map_err(|e| format!("{e}"))?;
            if json {
                println!("{}", json!({"control": control.url(), "applied": applied}));
            } else if applied.is_empty() {
                println!("control schema in {} is up to date", control.url());
            } else {
                println!(
                    "control schema in {} created (versions {applied:?})",
                    control.url()
                );
            }
            Ok(())
        }),
    }
}

/// `shardctl routers [--forget INSTANCE]`.
#[derive(clap::Args)]
pub(crate) struct RoutersArgs {
    #[command(flatten)]
    control: ControlArg,
    /// Delete this router's heartbeat row (a router stopped for good, or rows
    /// a revoked login reported), then list.
    #[arg(long, value_name = "INSTANCE")]
    forget: Option<String>,
}

pub(crate) fn routers(args: &RoutersArgs, json: bool) -> Result<(), String> {
    block_on(async {
        let control = connect(&args.control.control).await?;
        if let Some(instance) = &args.forget {
            if !control
                .forget_router(instance)
                .await
                .map_err(|e| format!("{e}"))?
            {
                return Err(format!("no router {instance} to forget"));
            }
            if !json {
                println!("forgot router {instance}");
            }
        }
        let routers = control.routers().await.map_err(|e| format!("{e}"))?;
        let newest = control.latest().await.ok().map(|m| m.version);
        if json {
            print_json(&json!({"newest_version": newest, "routers": routers}));
            return Ok(());
        }
        println!(
            "{:<40} {:<20} {:>8} {:>12}  {:<16} state",
            "instance", "host", "version", "last seen", "login"
        );
        for r in &routers {
            let state = match newest {
                _ if r.is_stale() => "STALE",
                Some(newest) if r.applied_version > newest => {
                    "AHEAD of the newest version (was the control database restored?)"
                }
                _ if !r.known => {
                    "DIVERGED: serves another map under this version (was the control database restored?)"
                }
                Some(newest) if r.applied_version == newest => "current",
                _ => "behind",
            };
            println!(
                "{:<40} {:<20} {:>8} {:>10}ms  {:<16} {state}",
                r.instance_id, r.host, r.applied_version, r.last_seen_ms, r.login
            );
        }
        Ok(())
    })
}
