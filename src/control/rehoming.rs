//! No silent re-homing: which tenants with data a new map would move without a move.

use std::collections::BTreeSet;

use crate::map::MapDiff;
use crate::migrate::{self, ShardError};
use crate::{ShardMap, TenantId};

/// A tenant with data that a new map would place on another shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rehomed {
    /// The tenant.
    pub tenant: String,
    /// Where its data is (its shard under the old map).
    pub from: String,
    /// Where the new map would send it.
    pub to: String,
}

/// The check could not be made: a shard could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot check which tenants have data: {0}")]
pub struct RehomeError(#[from] ShardError);

/// The tenants that have data on their shard under `old` and that `new` would
/// place elsewhere without a move. Tenants moving in either map are left to the
/// move workflow.
///
/// Tenant tables are the base tables with the map's tenant column (found in
/// `information_schema`). When the ring is unchanged only tenants named by pins
/// or moves can change shard, and only they are looked up; when the ring changes,
/// every shard is scanned for its distinct tenants (`SELECT DISTINCT` on each
/// tenant table: an index on the tenant column keeps this cheap).
///
/// ```no_run
/// # async fn f(old: shard_router::ShardMap, new: shard_router::ShardMap) -> Result<(), Box<dyn std::error::Error>> {
/// for r in shard_router::control::tenants_rehomed(&old, &new).await? {
///     println!("{} would move {} -> {}", r.tenant, r.from, r.to);
/// }
/// # Ok(()) }
/// ```
pub async fn tenants_rehomed(old: &ShardMap, new: &ShardMap) -> Result<Vec<Rehomed>, RehomeError> {
    let moving = |t: &TenantId| old.move_of(t).is_some() || new.move_of(t).is_some();
    let name = |map: &ShardMap, t: &TenantId| map.shard(map.locate(t).shard).name().to_owned();
    let mut rehomed = Vec::new();
    if old.same_ring(new) {
        for (tenant, from, to) in MapDiff::between(old, new).named_tenants_moved {
            let Ok(id) = TenantId::new(&tenant) else {
                continue;
            };
            if moving(&id) {
                continue;
            }
            let shard = old.shard(old.locate(&id).shard);
            let mut client = migrate::connect(shard).await?;
            if has_data(&mut client, shard.name(), old.tenant_column(), &tenant).await? {
                rehomed.push(Rehomed { tenant, from, to });
            }
        }
        return Ok(rehomed);
    }
    for shard in old.shards() {
        let mut client = migrate::connect(shard).await?;
        for tenant in tenants_with_data(&mut client, shard.name(), old.tenant_column()).await? {
            let Ok(id) = TenantId::new(&tenant) else {
                tracing::warn!(shard = shard.name(), tenant = %tenant.escape_debug(), "row with an invalid tenant id; it cannot be routed");
                continue;
            };
            if moving(&id) || name(old, &id) != shard.name() {
                continue; // moving, or stray rows away from the tenant's home
            }
            let to = name(new, &id);
            if to != shard.name() {
                rehomed.push(Rehomed {
                    tenant,
                    from: shard.name().to_owned(),
                    to,
                });
            }
        }
    }
    rehomed.sort_by(|a, b| a.tenant.cmp(&b.tenant));
    Ok(rehomed)
}

/// `schema.table` and column, both quoted by Postgres, of every tenant table.
async fn tenant_tables(
    client: &mut tokio_postgres::Client,
    shard: &str,
    column: &str,
) -> Result<Vec<(String, String)>, ShardError> {
    let rows = client
        .query(
            "SELECT format('%I.%I', c.table_schema, c.table_name), quote_ident(c.column_name) \
             FROM information_schema.columns c \
             JOIN information_schema.tables t \
               ON t.table_schema = c.table_schema AND t.table_name = c.table_name \
             WHERE c.column_name = $1 AND t.table_type = 'BASE TABLE' \
               AND c.table_schema NOT IN ('pg_catalog', 'information_schema') \
             ORDER BY 1",
            &[&column],
        )
        .await
        .map_err(|e| database(shard, &e))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

fn database(shard: &str, e: &tokio_postgres::Error) -> ShardError {
    ShardError::Database {
        shard: shard.to_owned(),
        cause: crate::pg::error_text(e),
    }
}

/// Distinct tenant ids in every tenant table of the shard.
pub(crate) async fn tenants_with_data(
    client: &mut tokio_postgres::Client,
    shard: &str,
    column: &str,
) -> Result<BTreeSet<String>, ShardError> {
    let mut tenants = BTreeSet::new();
    for (table, col) in tenant_tables(client, shard, column).await? {
        // Both names come quoted from quote_ident/format('%I'); nothing else is spliced.
        let rows = client
            .query(
                &format!("SELECT DISTINCT {col}::text FROM {table} WHERE {col} IS NOT NULL"),
                &[],
            )
            .await
            .map_err(|e| database(shard, &e))?;
        tenants.extend(rows.iter().map(|r| r.get::<_, String>(0)));
    }
    Ok(tenants)
}

async fn has_data(
    client: &mut tokio_postgres::Client,
    shard: &str,
    column: &str,
    tenant: &str,
) -> Result<bool, ShardError> {
    for (table, col) in tenant_tables(client, shard, column).await? {
        let found: bool = client
            .query_one(
                &format!("SELECT EXISTS (SELECT 1 FROM {table} WHERE {col}::text = $1)"),
                &[&tenant],
            )
            .await
            .map_err(|e| database(shard, &e))?
            .get(0);
        if found {
            return Ok(true);
        }
    }
    Ok(false)
}
