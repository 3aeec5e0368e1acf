//! The mover's claim on each shard: the shard-side half of the lease.
//!
//! The lease's fencing token stops a mover that lost its lease from changing
//! the control database, but the shards are other databases. So each mover,
//! before its first step on a shard (and again whenever it connects), writes
//! its token and holder into `shard_router_move_claim` there, refusing if a
//! newer mover claimed it already; and every transaction it opens on that
//! shard checks the claim, with a share lock that makes a newer claim wait
//! until the step has committed. A mover that lost its lease therefore changes
//! nothing on a shard once its successor has claimed it: the model's
//! `ClaimShards` transition and its property "at most one mover changes the
//! move at a time" (`tests/move_model.rs`).

use tokio_postgres::Client;

use super::record::Lease;
use super::MoveError;
use crate::TenantId;

/// The session setting that names this connection's claim (tenant, token and
/// holder, separated by U+001F), read by `shard_router_claim_check()`.
const CLAIM_SETTING: &str = "shard_router.mover_claim";

/// SQLSTATE of a step refused because a newer mover claimed the shard.
pub(crate) const CLAIM_SQLSTATE: &str = "SRF02";

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS shard_router_move_claim (\n\
       tenant text PRIMARY KEY,\n\
       token bigint NOT NULL,\n\
       holder text NOT NULL,\n\
       claimed_at timestamptz NOT NULL DEFAULT now()\n\
     );\n\
     CREATE OR REPLACE FUNCTION shard_router_claim_check() RETURNS void LANGUAGE plpgsql AS $f$\n\
     DECLARE\n\
       c text := current_setting('shard_router.mover_claim', true);\n\
       parts text[];\n\
     BEGIN\n\
       IF coalesce(c, '') = '' THEN RETURN; END IF;\n\
       parts := string_to_array(c, chr(31));\n\
       PERFORM 1 FROM shard_router_move_claim\n\
         WHERE tenant = parts[1] AND token = parts[2]::bigint AND holder = parts[3] FOR SHARE;\n\
       IF NOT FOUND THEN\n\
         RAISE EXCEPTION USING ERRCODE = 'SRF02',\n\
           MESSAGE = format('shard-router: mover %s (lease token %s) no longer holds tenant %s''s move on this shard; a newer mover claimed it', parts[3], parts[2], parts[1]);\n\
       END IF;\n\
     END $f$;";

/// Claims the shard behind `client` for `lease` and marks the session with
/// it. Refused with [`MoveError::LeaseLost`] when a mover with a newer token,
/// or the same token and another holder, claimed it first (after a restored
/// control database gave a token out twice).
pub(crate) async fn claim(
    client: &Client,
    shard: &str,
    tenant: &TenantId,
    lease: &Lease,
) -> Result<(), MoveError> {
    client.batch_execute(SCHEMA).await.map_err(MoveError::db)?;
    let claimed = client
        .query_opt(
            "INSERT INTO shard_router_move_claim (tenant, token, holder) VALUES ($1, $2, $3) \
             ON CONFLICT (tenant) DO UPDATE SET token = EXCLUDED.token, holder = EXCLUDED.holder, \
               claimed_at = now() \
             WHERE shard_router_move_claim.token < EXCLUDED.token \
                OR (shard_router_move_claim.token = EXCLUDED.token \
                    AND shard_router_move_claim.holder = EXCLUDED.holder) \
             RETURNING 1",
            &[&tenant.as_str(), &lease.token, &lease.holder],
        )
        .await
        .map_err(MoveError::db)?;
    if claimed.is_none() {
        tracing::warn!(
            shard,
            tenant = tenant.as_str(),
            token = lease.token,
            "a newer mover claimed the shard; this mover stops"
        );
        return Err(MoveError::LeaseLost {
            tenant: tenant.to_string(),
        });
    }
    let value = format!(
        "{}\u{1f}{}\u{1f}{}",
        tenant.as_str(),
        lease.token,
        lease.holder
    );
    client
        .execute(
            "SELECT set_config($1, $2, false)",
            &[&CLAIM_SETTING, &value],
        )
        .await
        .map_err(MoveError::db)?;
    Ok(())
}

/// The highest token a mover has claimed the shard behind `client` with, for
/// `tenant` (0 when none).
pub(crate) async fn highest(client: &Client, tenant: &TenantId) -> Result<i64, MoveError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('shard_router_move_claim') IS NOT NULL",
            &[],
        )
        .await
        .map_err(MoveError::db)?
        .get(0);
    if !exists {
        return Ok(0);
    }
    Ok(client
        .query_opt(
            "SELECT token FROM shard_router_move_claim WHERE tenant = $1",
            &[&tenant.as_str()],
        )
        .await
        .map_err(MoveError::db)?
        .map_or(0, |r| r.get(0)))
}

/// The statement every mover transaction runs first (see [`claim`]).
pub(crate) const CHECK_SQL: &str = "SELECT shard_router_claim_check()";

/// Whether `e` is a step refused by the claim check.
pub(crate) fn is_claim_refusal(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code() == CLAIM_SQLSTATE)
}
