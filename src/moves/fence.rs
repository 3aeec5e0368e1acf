//! The fence: shards refuse writes for a moving or moved tenant from routers on
//! a map older than the move allows.
//!
//! Each shard gets a table `shard_router_fence (tenant, min_version)` and a row
//! trigger on every tenant table. A write transaction declares its map version
//! in the transaction-local setting `shard_router.map_version` (the
//! [`TenantWriter`](crate::TenantWriter) does this); a write to a fenced tenant
//! that declares no version, or an older one, fails with SQLSTATE `SRF01`.
//! Tenants without a fence row are not affected.

use tokio_postgres::Client;

use super::catalog::TenantTable;
use super::MoveError;
use crate::db::{FENCE_SQLSTATE, VERSION_SETTING};

/// Installs (or refreshes) the fence table, its function and the triggers on
/// `tables`. Idempotent. `column` is the map's validated tenant column.
pub(crate) async fn install(
    client: &Client,
    column: &str,
    tables: &[TenantTable],
) -> Result<(), MoveError> {
    // `column` is a validated lowercase identifier (see the map's `tenant_column`).
    let mut sql = format!(
        "CREATE TABLE IF NOT EXISTS shard_router_fence (\n\
           tenant text PRIMARY KEY,\n\
           min_version bigint NOT NULL\n\
         );\n\
         CREATE OR REPLACE FUNCTION shard_router_fence_check() RETURNS trigger LANGUAGE plpgsql AS $f$\n\
         DECLARE\n\
           t text;\n\
           fenced bigint;\n\
           declared text := current_setting('{VERSION_SETTING}', true);\n\
         BEGIN\n\
           IF TG_OP = 'DELETE' THEN t := OLD.{column}; ELSE t := NEW.{column}; END IF;\n\
           SELECT min_version INTO fenced FROM shard_router_fence WHERE tenant = t;\n\
           IF fenced IS NULL AND TG_OP = 'UPDATE' AND OLD.{column} IS DISTINCT FROM t THEN\n\
             t := OLD.{column};\n\
             SELECT min_version INTO fenced FROM shard_router_fence WHERE tenant = t;\n\
           END IF;\n\
           IF fenced IS NOT NULL AND (coalesce(declared, '') = '' OR declared::bigint < fenced) THEN\n\
             RAISE EXCEPTION USING ERRCODE = '{FENCE_SQLSTATE}',\n\
               MESSAGE = format('shard-router fence: writes for tenant %s need map version %s or later; this transaction declared %s',\n\
                                t, fenced, coalesce(nullif(declared, ''), 'none')),\n\
               HINT = 'the router writing is on an old shard map; it must apply the newest one';\n\
           END IF;\n\
           IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;\n\
           RETURN NEW;\n\
         END $f$;\n"
    );
    for table in tables {
        sql += &format!(
            "CREATE OR REPLACE TRIGGER shard_router_fence BEFORE INSERT OR UPDATE OR DELETE ON {} \
             FOR EACH ROW EXECUTE FUNCTION shard_router_fence_check();\n",
            table.name
        );
    }
    client.batch_execute(&sql).await.map_err(MoveError::db)
}

/// Raises the tenant's fence to `version` (never lowers it).
pub(crate) async fn raise(client: &Client, tenant: &str, version: u64) -> Result<(), MoveError> {
    client
        .execute(
            "INSERT INTO shard_router_fence (tenant, min_version) VALUES ($1, $2) \
             ON CONFLICT (tenant) DO UPDATE \
             SET min_version = greatest(shard_router_fence.min_version, EXCLUDED.min_version)",
            &[&tenant, &(version as i64)],
        )
        .await
        .map(|_| ())
        .map_err(MoveError::db)
}
