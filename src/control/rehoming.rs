//! No silent re-homing: which tenants with data a new map would move without a move.

use std::collections::{BTreeMap, BTreeSet};

use crate::map::{MapDiff, Shard, ShardIndex};
use crate::pg::ShardError;
use crate::{ShardMap, TenantId};

/// A tenant with data that a new map would place on another shard.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
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
pub struct RehomeError(#[from] pub ShardError);

/// The tenants that have data on their shard under `old` and that `new` would
/// place elsewhere without a move, or name otherwise (a `tenant_case` of
/// `lower` where `old` kept `ACME` as it is). Tenants moving in either map are left to the
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
    // The rows are found by the new map's column: the one that will route
    // them. A changed column (or a new case policy, which can send a tenant's
    // requests to another id: under `lower`, `ACME` becomes `acme`) has every
    // shard scanned.
    let column = new.tenant_column();
    let mut rehomed = Vec::new();
    if old.same_ring(new)
        && old.tenant_case() == new.tenant_case()
        && old.tenant_column() == new.tenant_column()
    {
        // Only named tenants can change shard: look them up per old shard, one
        // connection and one query per tenant table for all of them.
        let mut by_shard: BTreeMap<ShardIndex, BTreeMap<String, String>> = BTreeMap::new();
        for change in MapDiff::between(old, new).named_tenants_moved {
            let (tenant, to) = (change.tenant, change.to);
            let Ok(id) = TenantId::new(&tenant) else {
                continue;
            };
            if !moving(&id) {
                by_shard
                    .entry(old.locate(&id).shard)
                    .or_default()
                    .insert(tenant, to);
            }
        }
        for (index, tenants) in by_shard {
            let shard = old.shard(index);
            let scan = Scan::open(shard, column).await?;
            let names: Vec<&str> = tenants.keys().map(String::as_str).collect();
            for tenant in scan.tenants_among(&names).await? {
                let to = tenants[&tenant].clone();
                rehomed.push(Rehomed {
                    tenant,
                    from: shard.name().to_owned(),
                    to,
                });
            }
        }
        rehomed.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        return Ok(rehomed);
    }
    for shard in old.shards() {
        let scan = Scan::open(shard, column).await?;
        for tenant in scan.all_tenants().await? {
            let Ok(id) = TenantId::new(&tenant) else {
                tracing::warn!(shard = shard.name(), tenant = %tenant.escape_debug(), "row with an invalid tenant id; it cannot be routed");
                continue;
            };
            if moving(&id) || name(old, &id) != shard.name() {
                continue; // moving, or stray rows away from the tenant's home
            }
            let named = new.tenant_id(id.clone());
            if named != id {
                // Its rows keep the old spelling; its requests would not.
                rehomed.push(Rehomed {
                    to: format!("{} (as {named})", name(new, &named)),
                    tenant,
                    from: shard.name().to_owned(),
                });
                continue;
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

/// Of `tenants`, those with rows on `shard` (one connection, one query per
/// tenant table).
pub(crate) async fn with_rows_on(
    shard: &Shard,
    column: &str,
    tenants: &[&str],
) -> Result<BTreeSet<String>, ShardError> {
    Scan::open(shard, column)
        .await?
        .tenants_among(tenants)
        .await
}

/// Rows per (tenant table, tenant) on `shard`'s database: a full count, for
/// `--reassign` to compare the database a shard had with the one it gets.
pub(crate) async fn row_counts(
    shard: &Shard,
    column: &str,
) -> Result<BTreeMap<(String, String), i64>, ShardError> {
    Scan::open(shard, column).await?.row_counts().await
}

/// What the shards say against a new map, beyond the diff with the stored
/// newest map (the model's `publish_checks_shards`, issue 26.1).
#[derive(Debug, Default)]
pub(crate) struct ShardTruth {
    /// Tenants whose fence on some shard says a move is in flight, while the
    /// new map shows no move for them.
    pub(crate) moving_unshown: Vec<String>,
    /// Tenants with rows on a shard (not one their fence marks as left) that
    /// the new map routes elsewhere: checked only when the stored base is
    /// suspect.
    pub(crate) stranded: Vec<Rehomed>,
    /// (tenant, shard) pairs whose fence marks the shard as one the tenant
    /// left in a move (`moving = false`): its rows there are a stale copy,
    /// never where to pin it.
    pub(crate) former: BTreeSet<(String, String)>,
    /// The highest version any fence requires: a map below it would have
    /// that tenant's writes refused.
    pub(crate) highest_fence: u64,
}

/// Reads every shard of `new` for fences and, when `suspect` (routers serve
/// maps the control database does not hold) or when a fence is newer than
/// `newest_stored`, for every tenant with rows. `in_flight` are the tenants
/// whose move the control database records as unfinished: their fences and
/// rows are the move's business.
///
/// A shard that cannot be reached is passed over for the fence check with a
/// warning, but fails a full check: then nothing can be promised.
pub(crate) async fn check_against_shards(
    new: &ShardMap,
    newest_stored: u64,
    mut suspect: bool,
    in_flight: &BTreeSet<String>,
) -> Result<ShardTruth, RehomeError> {
    let column = new.tenant_column();
    let mut truth = ShardTruth::default();
    let mut scans = Vec::new();
    let mut fences: Vec<BTreeMap<String, (i64, bool)>> = Vec::new();
    for shard in new.shards() {
        let scan = match Scan::open(shard, column).await {
            Ok(scan) => scan,
            Err(e @ ShardError::Unreachable { .. }) if !suspect => {
                tracing::warn!(shard = shard.name(), error = %e, "publish: shard unreachable; its fences were not checked");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let here = scan.fences().await?;
        for (tenant, (min_version, moving)) in &here {
            if !*moving {
                truth
                    .former
                    .insert((tenant.clone(), shard.name().to_owned()));
            }
            if *min_version as u64 > newest_stored {
                suspect = true;
            }
            truth.highest_fence = truth.highest_fence.max(*min_version as u64);
            let shown = TenantId::new(tenant).is_ok_and(|id| new.move_of(&id).is_some());
            if *moving && !shown && !in_flight.contains(tenant) {
                truth.moving_unshown.push(tenant.clone());
            }
        }
        fences.push(here);
        scans.push(scan);
    }
    truth.moving_unshown.sort();
    truth.moving_unshown.dedup();
    if !suspect {
        return Ok(truth);
    }
    if scans.len() != new.shards().len() {
        // A shard skipped above while the base was not yet known suspect.
        for shard in new.shards() {
            Scan::open(shard, column).await?;
        }
    }
    for (scan, fenced) in scans.iter().zip(&fences) {
        for tenant in scan.all_tenants().await? {
            if in_flight.contains(&tenant) || fenced.get(&tenant).is_some_and(|(_, moving)| !moving)
            {
                continue; // rows the tenant left behind in a move
            }
            let Ok(id) = TenantId::new(&tenant) else {
                continue;
            };
            if new.move_of(&id).is_some() {
                continue;
            }
            let named = new.tenant_id(id.clone());
            let to = new.shard(new.locate(&named).shard).name().to_owned();
            if to != scan.shard || named != id {
                truth.stranded.push(Rehomed {
                    tenant,
                    from: scan.shard.to_owned(),
                    to,
                });
            }
        }
    }
    truth.stranded.sort_by(|a, b| a.tenant.cmp(&b.tenant));
    Ok(truth)
}

/// One shard's tenant tables, read through a connection that sees every row.
struct Scan<'a> {
    shard: &'a str,
    client: tokio_postgres::Client,
    tables: Vec<TenantTable>,
}

/// A table with the tenant column, both quoted by Postgres (safe to splice).
struct TenantTable {
    name: String,
    column: String,
    /// A text-like column: compared as it is, so its index serves the lookup.
    text: bool,
}

impl<'a> Scan<'a> {
    /// Connects for administrative work, refuses a role that row-level security
    /// blinds, and reads the tenant tables.
    async fn open(shard: &'a Shard, column: &str) -> Result<Scan<'a>, ShardError> {
        let client = shard.connect_admin().await?;
        crate::pg::refuse_hidden_rows(&client, shard.name(), column).await?;
        let rows = client
            .query(
                "SELECT format('%I.%I', n.nspname, c.relname), quote_ident(a.attname), \
                   ty.typcategory = 'S' \
                 FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = $1 AND NOT a.attisdropped \
                 JOIN pg_type ty ON ty.oid = a.atttypid \
                 WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't' AND NOT c.relispartition \
                   AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                   AND n.nspname NOT LIKE 'pg_toast%' \
                   AND c.relname NOT LIKE 'shard\\_router\\_%' \
                 ORDER BY 1",
                &[&column],
            )
            .await
            .map_err(|e| ShardError::database(shard.name(), e))?;
        let tables: Vec<TenantTable> = rows
            .iter()
            .map(|r| TenantTable {
                name: r.get(0),
                column: r.get(1),
                text: r.get(2),
            })
            .collect();
        if tables.is_empty() {
            // No tenant table: a new shard, or a misspelt column that would
            // make every check below find "no data". The router's own tables
            // and extensions' (PostGIS's `spatial_ref_sys`) do not count.
            let others: Vec<String> = client
                .query(
                    "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
                     JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't' AND NOT c.relispartition \
                       AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                       AND n.nspname NOT LIKE 'pg_toast%' \
                       AND c.relname NOT LIKE 'shard\\_router\\_%' \
                       AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
                                       AND d.objid = c.oid AND d.deptype = 'e') \
                     ORDER BY 1 LIMIT 5",
                    &[],
                )
                .await
                .map_err(|e| ShardError::database(shard.name(), e))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if !others.is_empty() {
                return Err(ShardError::NoTenantColumn {
                    shard: shard.name().to_owned(),
                    column: column.to_owned(),
                    tables: others,
                });
            }
        }
        Ok(Scan {
            shard: shard.name(),
            client,
            tables,
        })
    }

    /// Which of `tenants` have a row in some tenant table.
    async fn tenants_among(&self, tenants: &[&str]) -> Result<BTreeSet<String>, ShardError> {
        let mut found = BTreeSet::new();
        let mut left: Vec<&str> = tenants.to_vec();
        for table in &self.tables {
            if left.is_empty() {
                break;
            }
            let TenantTable { name, column, text } = table;
            let sql = if *text {
                format!(
                    "SELECT DISTINCT {column}::text FROM {name} WHERE {column} = ANY($1::text[])"
                )
            } else {
                format!("SELECT DISTINCT {column}::text FROM {name} WHERE {column}::text = ANY($1::text[])")
            };
            let rows = self
                .client
                .query(&sql, &[&left])
                .await
                .map_err(|e| ShardError::database(self.shard, e))?;
            let here: BTreeSet<String> = rows.iter().map(|r| r.get(0)).collect();
            left.retain(|t| !here.contains(*t));
            found.extend(here);
        }
        Ok(found)
    }

    /// The shard's fence rows: tenant -> (min_version, moving).
    async fn fences(&self) -> Result<BTreeMap<String, (i64, bool)>, ShardError> {
        let exists: bool = self
            .client
            .query_one("SELECT to_regclass('shard_router_fence') IS NOT NULL", &[])
            .await
            .map_err(|e| ShardError::database(self.shard, e))?
            .get(0);
        if !exists {
            return Ok(BTreeMap::new());
        }
        let rows = self
            .client
            .query(
                "SELECT tenant, min_version, moving FROM shard_router_fence",
                &[],
            )
            .await
            .map_err(|e| ShardError::database(self.shard, e))?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect())
    }

    /// Rows per (tenant table, tenant) in every tenant table.
    async fn row_counts(&self) -> Result<BTreeMap<(String, String), i64>, ShardError> {
        let mut counts = BTreeMap::new();
        for TenantTable { name, column, .. } in &self.tables {
            let rows = self
                .client
                .query(
                    &format!(
                        "SELECT {column}::text, count(*) FROM {name} WHERE {column} IS NOT NULL GROUP BY 1"
                    ),
                    &[],
                )
                .await
                .map_err(|e| ShardError::database(self.shard, e))?;
            for row in rows {
                counts.insert(
                    (name.clone(), row.get::<_, String>(0)),
                    row.get::<_, i64>(1),
                );
            }
        }
        Ok(counts)
    }

    /// Distinct tenant ids in every tenant table.
    async fn all_tenants(&self) -> Result<BTreeSet<String>, ShardError> {
        let mut tenants = BTreeSet::new();
        for TenantTable { name, column, .. } in &self.tables {
            let rows = self
                .client
                .query(
                    &format!(
                        "SELECT DISTINCT {column}::text FROM {name} WHERE {column} IS NOT NULL"
                    ),
                    &[],
                )
                .await
                .map_err(|e| ShardError::database(self.shard, e))?;
            tenants.extend(rows.iter().map(|r| r.get::<_, String>(0)));
        }
        Ok(tenants)
    }
}
