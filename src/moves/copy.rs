//! The data steps of a move, on the shards: copying a tenant's rows in key
//! order under the tenant lock, verifying both copies, waiting for writes in
//! flight, carrying sequences over, and deleting a tenant's rows.

use std::time::{Duration, Instant};

use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use super::catalog::TenantTable;
use super::fence::quote_ident;
use super::{Mismatch, MoveError, Progress};
use crate::db::{declare_version_sql, move_lock_key};
use crate::TenantId;

/// A transaction that declares `version`, so the fence lets it write; in
/// replica mode when it writes row images (no triggers, no foreign-key checks
/// on the copy: the rows are the primary's, already checked there).
pub(crate) async fn begin(client: &Client, version: u64, replica: bool) -> Result<(), MoveError> {
    begin_with(client, version, replica, "").await
}

/// [`begin`] for one backfill batch: its statements walk a key range in key
/// order, and must do so through the key's index whatever the table's
/// statistics say. Freshly loaded or freshly copied rows are not analyzed yet,
/// and with the range's bounds unknown at planning time the planner would
/// otherwise scan (and sort) everything after the range's start on every
/// batch, which makes a backfill quadratic in the tenant's size.
async fn begin_batch(client: &Client, version: u64, replica: bool) -> Result<(), MoveError> {
    begin_with(
        client,
        version,
        replica,
        "; SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off; \
         SET LOCAL enable_sort = off",
    )
    .await
}

/// [`begin_batch`] on both shards at once; neither is left in a transaction
/// if either fails.
async fn begin_on_both(source: &Client, target: &Client, version: u64) -> Result<(), MoveError> {
    let (on_source, on_target) = tokio::join!(
        begin_batch(source, version, false),
        begin_batch(target, version, false)
    );
    if let Err(e) = on_source.and(on_target) {
        let _ = tokio::join!(
            source.batch_execute("ROLLBACK"),
            target.batch_execute("ROLLBACK")
        );
        return Err(e);
    }
    Ok(())
}

async fn begin_with(
    client: &Client,
    version: u64,
    replica: bool,
    more: &str,
) -> Result<(), MoveError> {
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL READ COMMITTED; {}; {}{}{more}",
            super::claim::CHECK_SQL,
            declare_version_sql(version),
            if replica {
                "; SET LOCAL session_replication_role = replica"
            } else {
                ""
            }
        ))
        .await
        .map_err(MoveError::db)
}

/// Takes the tenant's move lock in the open transaction on `client` (the source).
pub(crate) async fn lock(client: &Client, tenant: &TenantId) -> Result<(), MoveError> {
    client
        .execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&move_lock_key(tenant)],
        )
        .await
        .map(|_| ())
        .map_err(MoveError::db)
}

/// `(key) op (key held in value)`: the table's key compared with a key given
/// as a JSON row (`value`, SQL yielding text), read back through
/// `jsonb_populate_record` whatever the key's types.
fn key_compared(table: &TenantTable, op: &str, value: &str) -> String {
    let keys: Vec<String> = table.key.iter().map(|k| format!("r.{k}")).collect();
    format!(
        "({}) {op} (SELECT {} FROM jsonb_populate_record(NULL::{}, ({value})::jsonb) r)",
        table.key.join(", "),
        keys.join(", "),
        table.name
    )
}

/// Renews the move's lease before a batch or a range unless that was done
/// moments ago (250 ms, or a twentieth of the lease if shorter): a mover
/// paused past its lease finds it lost on waking, and renewing after every
/// short batch would add a control-database commit to each.
struct Renewal<'a> {
    lease: (&'a crate::control::ControlPlane, &'a super::record::Lease),
    every: Duration,
    last: Option<Instant>,
}

impl<'a> Renewal<'a> {
    fn new(lease: (&'a crate::control::ControlPlane, &'a super::record::Lease)) -> Self {
        let every = (lease.1.duration / 20).min(Duration::from_millis(250));
        Renewal {
            lease,
            every,
            last: None,
        }
    }

    async fn if_due(&mut self, tenant: &TenantId) -> Result<(), MoveError> {
        if self.last.is_none_or(|at| at.elapsed() >= self.every) {
            super::record::renew(self.lease.0, tenant, self.lease.1).await?;
            self.last = Some(Instant::now());
        }
        Ok(())
    }
}

/// Rows per batch for a configured size and throttle: at most
/// `rate / 20` (at least 50) under a throttle.
fn batch_rows_under(configured: usize, max_rows_per_sec: Option<u64>) -> usize {
    let configured = configured.max(1);
    match max_rows_per_sec.filter(|r| *r > 0) {
        Some(rate) => configured.min((rate / 20).max(50) as usize),
        None => configured,
    }
}

/// Where a copy reads, where it writes, and which of the two is the source
/// (whose lock every writer of the tenant takes).
pub(crate) struct Copy<'a> {
    pub(crate) from: &'a Client,
    pub(crate) to: &'a Client,
    pub(crate) lock_on_from: bool,
    pub(crate) tenant: &'a TenantId,
    pub(crate) column: &'a str,
    pub(crate) version: u64,
    pub(crate) batch_rows: usize,
    /// The move's lease, renewed before a batch once 250 ms (or a twentieth
    /// of the lease, if shorter) have passed since the last renewal: a mover
    /// copies only while its lease surely holds, and one that lost it stops.
    pub(crate) lease: (&'a crate::control::ControlPlane, &'a super::record::Lease),
    /// At most this many rows per second (`None`: as fast as it goes).
    pub(crate) max_rows_per_sec: Option<u64>,
}

impl Copy<'_> {
    fn lock_side(&self) -> &Client {
        if self.lock_on_from {
            self.from
        } else {
            self.to
        }
    }

    fn other_side(&self) -> &Client {
        if self.lock_on_from {
            self.to
        } else {
            self.from
        }
    }

    /// Rows per batch. Under a throttle, batches shrink so that at least 20
    /// go out per second: the same rows per second in short bursts, which
    /// other tenants' statements wait behind for less time than one long one.
    fn effective_batch_rows(&self) -> usize {
        batch_rows_under(self.batch_rows, self.max_rows_per_sec)
    }

    /// Copies one table's rows of the tenant in key order, batch by batch.
    /// Each batch, while the tenant lock is held on the source (so no writer
    /// of the tenant slips in): find the key that ends the batch, delete the
    /// target's rows of the tenant in that key range (row images may have put
    /// some there), and stream the source's rows of the range into the table
    /// with binary COPY, in replica mode. Returns the rows copied.
    pub(crate) async fn table(
        &self,
        table: &TenantTable,
        progress: &mut impl FnMut(Progress),
    ) -> Result<u64, MoveError> {
        let (from, to) = (self.from, self.to);
        let name = &table.name;
        let col = quote_ident(self.column);
        let columns = table.columns.join(", ");
        let order = table.key.join(", ");
        // COPY takes no parameters: tenant and keys travel in transaction-local
        // settings, so no value is ever spliced into SQL. The table's key
        // compared with a key held in a setting, as a JSON row.
        let key_vs = |op: &str, setting: &str| {
            key_compared(table, op, &format!("current_setting('{setting}')"))
        };
        let descending = table
            .key
            .iter()
            .map(|k| format!("{k} DESC"))
            .collect::<Vec<_>>()
            .join(", ");
        let tenant_is = format!("{col} = current_setting('shard_router.copy_tenant')");
        let after = key_vs(">", "shard_router.copy_after");
        let through = key_vs("<=", "shard_router.copy_end");
        // Rows with a key past the last one when the copy began were written
        // after dual writes began, so row images brought them already: the
        // copy stops there instead of chasing an append-only key.
        let within = |resume: bool| {
            if resume {
                format!("{tenant_is} AND {after} AND {through}")
            } else {
                format!("{tenant_is} AND {through}")
            }
        };
        let batch_end = |resume: bool| {
            format!(
                "SELECT to_jsonb(r)::text FROM (SELECT {order} FROM {name} WHERE {} \
                 ORDER BY {order} LIMIT 1 OFFSET {}) r",
                within(resume),
                self.effective_batch_rows() - 1
            )
        };
        let bound: Option<String> = from
            .query_opt(
                &format!(
                    "SELECT to_jsonb(r)::text FROM (SELECT {order} FROM {name} WHERE {col} = $1 \
                     ORDER BY {descending} LIMIT 1) r"
                ),
                &[&self.tenant.as_str()],
            )
            .await
            .map_err(MoveError::db)?
            .map(|r| r.get(0));
        let Some(bound) = bound else {
            return Ok(0);
        };
        let settings = "SELECT set_config('shard_router.copy_tenant', $1, true), \
                        set_config('shard_router.copy_after', $2, true), \
                        set_config('shard_router.copy_end', $3, true)";
        let mut total = 0u64;
        let mut last: Option<String> = None;
        let started = Instant::now();
        let mut renewal = Renewal::new(self.lease);
        loop {
            renewal.if_due(self.tenant).await?;
            let (a, b) = tokio::join!(
                begin_batch(from, self.version, false),
                begin_batch(to, self.version, true)
            );
            if let Err(e) = a.and(b) {
                let _ = tokio::join!(to.batch_execute("ROLLBACK"), from.batch_execute("ROLLBACK"));
                return Err(e);
            }
            let resume = last.is_some();
            let batch = async {
                // The source's lock first, then the other side's, as every
                // writer takes them: a writer's COMMITs on the two shards are
                // both done before this batch reads either.
                lock(self.lock_side(), self.tenant).await?;
                lock(self.other_side(), self.tenant).await?;
                async {
                let after_key = last.clone().unwrap_or_default();
                // Up to the batch's last key, or to the bound for the last batch.
                from.query(settings, &[&self.tenant.as_str(), &after_key, &bound])
                    .await?;
                let end: Option<String> = from
                    .query_opt(&batch_end(resume), &[])
                    .await?
                    .map(|r| r.get(0));
                let end = end.unwrap_or_else(|| bound.clone());
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
                    [&self.tenant.as_str(), &after_key, &end];
                let (on_from, on_to) = tokio::join!(from.query(settings, &params), to.query(settings, &params));
                on_from.and(on_to)?;
                to.execute(&format!("DELETE FROM {name} WHERE {}", within(resume)), &[])
                    .await?;
                let rows = from
                    .copy_out(&format!(
                        "COPY (SELECT {columns} FROM {name} WHERE {} ORDER BY {order}) TO STDOUT (FORMAT binary)",
                        within(resume)
                    ))
                    .await?;
                let sink = to
                    .copy_in(&format!("COPY {name} ({columns}) FROM STDIN (FORMAT binary)"))
                    .await?;
                futures_util::pin_mut!(rows);
                futures_util::pin_mut!(sink);
                while let Some(chunk) = futures_util::StreamExt::next(&mut rows).await {
                    futures_util::SinkExt::send(&mut sink, chunk?).await?;
                }
                let n = sink.finish().await?;
                Ok::<_, tokio_postgres::Error>((n, end))
                }
                .await
                .map_err(MoveError::db)
            }
            .await;
            match batch {
                Ok((n, end)) => {
                    // Both sides hold the lock until their own COMMIT.
                    let (on_to, on_from) =
                        tokio::join!(to.batch_execute("COMMIT"), from.batch_execute("COMMIT"));
                    on_to.and(on_from).map_err(MoveError::db)?;
                    total += n;
                    if n > 0 {
                        progress(Progress::Copied {
                            table: name.clone(),
                            rows: n,
                        });
                    }
                    if end == bound {
                        break;
                    }
                    if let Some(rate) = self.max_rows_per_sec.filter(|r| *r > 0) {
                        // Sleep off what this table ran ahead of the rate,
                        // outside any transaction and lock.
                        let due = Duration::from_secs_f64(total as f64 / rate as f64);
                        if let Some(ahead) = due.checked_sub(started.elapsed()) {
                            tokio::time::sleep(ahead).await;
                        }
                    }
                    last = Some(end);
                }
                Err(e) => {
                    let _ = to.batch_execute("ROLLBACK").await;
                    let _ = from.batch_execute("ROLLBACK").await;
                    return Err(e);
                }
            }
        }
        Ok(total)
    }
}

/// Per-table row counts and content checksums of the tenant on both shards:
/// what differs. The tenant's rows are checked in key ranges of
/// `chunk_rows` rows, each under the tenant lock on both shards (the source's
/// first, as writers take them), so a writer of the tenant waits for one range
/// at most, never for the whole tenant. Writes between two ranges go through
/// dual writes to both shards under the same locks, as every write after
/// verify does, so equal ranges stay equal. The exception is a write whose
/// COMMIT succeeds on one shard only (a lost connection): it may land in a
/// range already checked. So before the first range both shards' write
/// chains are reset, under the tenant lock, and after the last they are
/// compared under it (the model's `VerifyChains`): every moving write appends
/// to both, so they differ exactly when a write committed on one side only
/// in between; the third value returned says so. Each side's checksum chains
/// the ranges' checksums in key order, so equal checksums mean equal rows at
/// the moments they were taken.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn verify(
    source: &Client,
    target: &Client,
    tables: &[TenantTable],
    tenant: &TenantId,
    column: &str,
    version: u64,
    chunk_rows: usize,
    lease: (&crate::control::ControlPlane, &super::record::Lease),
    mut progress: impl FnMut(Progress),
) -> Result<Verified, MoveError> {
    let mut mismatches = Vec::new();
    let mut sums = serde_json::Map::new();
    let mut renewal = Renewal::new(lease);
    let tenant_str = tenant.as_str();
    write_chains(source, target, tenant, version, ChainStep::Reset).await?;
    for table in tables {
        let ranges = KeyRanges::new(table, column, chunk_rows);
        let (mut source_rows, mut target_rows) = (0i64, 0i64);
        let (mut source_sum, mut target_sum) = (String::new(), String::new());
        let mut after: Option<String> = None;
        loop {
            renewal.if_due(tenant).await?;
            // Through the key's index whatever the statistics say (a freshly
            // copied target is not analyzed yet), as backfill batches do.
            begin_on_both(source, target, version).await?;
            let range = async {
                lock(source, tenant).await?;
                lock(target, tenant).await?;
                let mut params: Vec<&(dyn ToSql + Sync)> = vec![&tenant_str];
                params.extend(after.iter().map(|k| k as &(dyn ToSql + Sync)));
                let end: Option<String> = source
                    .query_opt(&ranges.end_after(after.is_some()), &params)
                    .await
                    .map_err(MoveError::db)?
                    .map(|r| r.get(0));
                params.extend(end.iter().map(|k| k as &(dyn ToSql + Sync)));
                let sql = ranges.checksum(after.is_some(), end.is_some());
                let mut source_params = params.clone();
                source_params.push(&source_sum);
                let mut target_params = params;
                target_params.push(&target_sum);
                let (on_source, on_target) = tokio::join!(
                    source.query_one(&sql, &source_params),
                    target.query_one(&sql, &target_params),
                );
                let (on_source, on_target) = (
                    on_source.map_err(MoveError::db)?,
                    on_target.map_err(MoveError::db)?,
                );
                Ok::<_, MoveError>((
                    end,
                    (on_source.get::<_, i64>(0), on_source.get::<_, String>(1)),
                    (on_target.get::<_, i64>(0), on_target.get::<_, String>(1)),
                ))
            }
            .await;
            // Both sides hold the lock until their own COMMIT (a read-only
            // transaction: nothing to keep on an error).
            let (on_source, on_target) = tokio::join!(
                source.batch_execute("COMMIT"),
                target.batch_execute("COMMIT")
            );
            let (end, (s_rows, s_sum), (t_rows, t_sum)) = range?;
            on_source.and(on_target).map_err(MoveError::db)?;
            source_rows += s_rows;
            target_rows += t_rows;
            source_sum = s_sum;
            target_sum = t_sum;
            if s_rows > 0 {
                progress(Progress::Verified {
                    table: table.name.clone(),
                    rows: s_rows,
                });
            }
            match end {
                Some(end) => after = Some(end),
                None => break,
            }
        }
        sums.insert(
            table.name.clone(),
            serde_json::json!({"source_rows": source_rows, "target_rows": target_rows,
                   "source_md5": source_sum, "target_md5": target_sum}),
        );
        if source_rows != target_rows || source_sum != target_sum {
            mismatches.push(Mismatch {
                table: table.name.clone(),
                source_rows,
                target_rows,
                checksums_differ: source_sum != target_sum,
            });
        }
    }
    let (source_chain, target_chain) =
        write_chains(source, target, tenant, version, ChainStep::Compare).await?;
    Ok(Verified {
        mismatches,
        sums,
        one_sided_write: source_chain != target_chain,
    })
}

/// What [`verify`] found.
pub(crate) struct Verified {
    /// The tables whose rows differ.
    pub(crate) mismatches: Vec<Mismatch>,
    /// Per table: rows and checksums on both sides, for the move record.
    pub(crate) sums: serde_json::Map<String, serde_json::Value>,
    /// A moving write committed on one shard only while verify ran: the
    /// copies may differ in a range already checked.
    pub(crate) one_sided_write: bool,
}

impl Verified {
    /// Both copies are known equal.
    pub(crate) fn equal(&self) -> bool {
        self.mismatches.is_empty() && !self.one_sided_write
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChainStep {
    /// `reset_write_chains`: before the first range.
    Reset,
    /// `compare_write_chains` (`VerifyChains`): after the last range.
    Compare,
}

/// Resets or reads the tenant's write chains on both shards, under the
/// tenant lock on both (the source's first) and the mover's claim, so no
/// moving write is between its two sides and no displaced mover resets them
/// behind a verify. Returns the chains read (empty after a reset; `None` on a
/// shard where verify never created the tenant's chain).
pub(crate) async fn write_chains(
    source: &Client,
    target: &Client,
    tenant: &TenantId,
    version: u64,
    step: ChainStep,
) -> Result<(Option<String>, Option<String>), MoveError> {
    begin_on_both(source, target, version).await?;
    let chains = async {
        lock(source, tenant).await?;
        lock(target, tenant).await?;
        let tenant = tenant.as_str();
        let params: [&(dyn ToSql + Sync); 1] = [&tenant];
        if step == ChainStep::Reset {
            let (on_source, on_target) = tokio::join!(
                source.execute(super::fence::RESET_CHAIN_SQL, &params),
                target.execute(super::fence::RESET_CHAIN_SQL, &params)
            );
            on_source.and(on_target).map_err(MoveError::db)?;
            return Ok((Some(String::new()), Some(String::new())));
        }
        let (on_source, on_target) = tokio::join!(
            source.query_one(super::fence::READ_CHAIN_SQL, &params),
            target.query_one(super::fence::READ_CHAIN_SQL, &params)
        );
        Ok::<_, MoveError>((
            on_source.map_err(MoveError::db)?.get(0),
            on_target.map_err(MoveError::db)?.get(0),
        ))
    }
    .await;
    let end = if chains.is_ok() { "COMMIT" } else { "ROLLBACK" };
    let (on_source, on_target) = tokio::join!(source.batch_execute(end), target.batch_execute(end));
    let chains = chains?;
    on_source.and(on_target).map_err(MoveError::db)?;
    Ok(chains)
}

/// The statements that walk one table's rows of a tenant in key ranges: a
/// range's last key, and a range's count and checksum. Keys travel as JSON
/// rows read back through `jsonb_populate_record`, whatever the key's types.
struct KeyRanges<'a> {
    table: &'a TenantTable,
    column: String,
    chunk_rows: usize,
}

impl<'a> KeyRanges<'a> {
    fn new(table: &'a TenantTable, column: &str, chunk_rows: usize) -> Self {
        KeyRanges {
            table,
            column: quote_ident(column),
            chunk_rows: chunk_rows.max(1),
        }
    }

    /// `$1` the tenant, then the key after which the range starts (when
    /// `after`), then the key that ends it (when `through`); returns the next
    /// free parameter number too.
    fn filter(&self, after: bool, through: bool) -> (String, usize) {
        let key_vs = |op: &str, param: usize| {
            format!(
                " AND {}",
                key_compared(self.table, op, &format!("${param}::text"))
            )
        };
        let mut sql = format!("{} = $1", self.column);
        let mut next = 2;
        if after {
            sql += &key_vs(">", next);
            next += 1;
        }
        if through {
            sql += &key_vs("<=", next);
            next += 1;
        }
        (sql, next)
    }

    /// The key that ends the range after `$2`: `None` when fewer than
    /// `chunk_rows` rows remain (the last range runs to the end).
    fn end_after(&self, after: bool) -> String {
        let order = self.table.key.join(", ");
        format!(
            "SELECT to_jsonb(r)::text FROM (SELECT {order} FROM {name} WHERE {filter} \
             ORDER BY {order} LIMIT 1 OFFSET {skip}) r",
            name = self.table.name,
            filter = self.filter(after, false).0,
            skip = self.chunk_rows - 1,
        )
    }

    /// The range's rows and `md5(prior || rows in key order)`, `prior` (the
    /// last parameter) being the checksum of the ranges before: the last
    /// range's covers the whole table.
    fn checksum(&self, after: bool, through: bool) -> String {
        let (filter, prior) = self.filter(after, through);
        format!(
            "SELECT count(*), md5(${prior}::text || coalesce(string_agg(to_jsonb(shard_router_row)::text, \
             E'\\n' ORDER BY {order}), '')) FROM {name} shard_router_row WHERE {filter}",
            order = self.table.key.join(", "),
            name = self.table.name,
        )
    }
}

/// The first tenant table holding rows whose tenant column is `tenant` in
/// another case (`ACME` for `acme`), and how many: under `tenant_case =
/// "lower"` those are the tenant's rows too, but every step of a move matches
/// the column exactly. ASCII folding (`COLLATE "C"`), as the router folds ids,
/// whatever the database's locale. A scan of each table (no index serves
/// `lower()`), run once before a move under that policy.
pub(crate) async fn rows_in_another_case(
    client: &Client,
    tables: &[TenantTable],
    tenant: &TenantId,
    column: &str,
) -> Result<Option<(String, i64)>, MoveError> {
    let col = quote_ident(column);
    for table in tables {
        let rows: i64 = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {} WHERE lower({col}::text COLLATE \"C\") = $1 AND {col}::text <> $1",
                    table.name
                ),
                &[&tenant.as_str()],
            )
            .await
            .map_err(MoveError::db)?
            .get(0);
        if rows > 0 {
            return Ok(Some((table.name.clone(), rows)));
        }
    }
    Ok(None)
}

/// Waits until every transaction that holds or waits for a write lock on a
/// tenant table now has ended, as `CREATE INDEX CONCURRENTLY` waits for
/// lockers: a writer that checked the fence before it rose is then done, and
/// every later write of the tenant is fenced out or a dual write under the
/// lock. Takes no lock itself, so no other tenant's writes queue behind it.
/// Gives up after `wait`, naming the backends still open.
pub(crate) async fn wait_for_writers(
    client: &Client,
    tables: &[TenantTable],
    wait: Duration,
) -> Result<(), MoveError> {
    if tables.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
    let holders: Vec<String> = client
        .query(
            "SELECT DISTINCT virtualtransaction FROM pg_locks \
             WHERE locktype = 'relation' AND mode = 'RowExclusiveLock' \
               AND relation = ANY (SELECT n::regclass FROM unnest($1::text[]) n) \
               AND pid IS DISTINCT FROM pg_backend_pid()",
            &[&names],
        )
        .await
        .map_err(MoveError::db)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    poll_until_none(
        client,
        "SELECT DISTINCT pid FROM pg_locks WHERE locktype = 'virtualxid' \
         AND virtualxid = ANY ($1) AND granted",
        &[&holders],
        wait,
    )
    .await
}

/// Runs `sql` (it lists backend pids) until it lists none, for at most `wait`;
/// then [`MoveError::WritersInFlight`] names those left.
async fn poll_until_none(
    client: &Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    wait: Duration,
) -> Result<(), MoveError> {
    let started = Instant::now();
    loop {
        let pids: Vec<i32> = client
            .query(sql, params)
            .await
            .map_err(MoveError::db)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if pids.is_empty() {
            return Ok(());
        }
        if started.elapsed() >= wait {
            return Err(MoveError::WritersInFlight { pids, waited: wait });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until no backend holds or waits for the tenant's move lock on
/// `client` (the source). Once every router applied a map that pins the
/// tenant, only writers on older maps take that lock: this lets those in
/// flight finish before the fence refuses their kind. Gives up after `wait`.
pub(crate) async fn wait_for_lock_holders(
    client: &Client,
    tenant: &TenantId,
    wait: Duration,
) -> Result<(), MoveError> {
    let key = move_lock_key(tenant) as u64;
    let (high, low) = ((key >> 32) as u32, key as u32);
    poll_until_none(
        client,
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND database = \
         (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND classid::text::bigint = $1 AND objid::text::bigint = $2 AND objsubid = 1",
        &[&(high as i64), &(low as i64)],
        wait,
    )
    .await
}

/// Tables whose primary key is drawn from a per-shard sequence (serial or
/// identity) without the tenant column: the copied ids would collide with the
/// target's own tenants. `(table, column)` pairs.
pub(crate) async fn shared_sequence_keys(
    client: &Client,
    tables: &[TenantTable],
    column: &str,
) -> Result<Vec<(String, String)>, MoveError> {
    let col = quote_ident(column);
    let mut found = Vec::new();
    let has_tenant = |t: &TenantTable| t.key.iter().any(|k| k == column || *k == col);
    for table in tables.iter().filter(|t| !has_tenant(t)) {
        let rows = client
            .query(
                "SELECT a.attname::text FROM pg_index i \
                 CROSS JOIN LATERAL unnest(i.indkey) AS k(attnum) \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                 WHERE i.indrelid = $1::text::regclass AND i.indisprimary \
                   AND pg_get_serial_sequence($1, a.attname) IS NOT NULL",
                &[&table.name],
            )
            .await
            .map_err(MoveError::db)?;
        for row in rows {
            found.push((table.name.clone(), row.get(0)));
        }
    }
    Ok(found)
}

/// Gap left between the ids a sequence handed out on the old primary and those
/// the new primary hands out, for writers on the two map versions that overlap
/// during a rollout.
pub(crate) const SEQUENCE_GAP: i64 = 1_000_000;

/// Moves every sequence behind a tenant table's column on `to` past its value
/// on `from` (plus [`SEQUENCE_GAP`]), so the shard about to become primary
/// never hands out an id that a copied row already has. Returns the sequences set.
pub(crate) async fn carry_sequences(
    from: &Client,
    to: &Client,
    tables: &[TenantTable],
) -> Result<Vec<String>, MoveError> {
    let names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
    let rows = from
        .query(
            "SELECT s.seq, coalesce(pg_sequence_last_value(s.seq::regclass), 0) FROM ( \
               SELECT DISTINCT pg_get_serial_sequence(n, a.attname) AS seq \
               FROM unnest($1::text[]) n \
               JOIN pg_attribute a ON a.attrelid = n::regclass AND a.attnum > 0 AND NOT a.attisdropped \
             ) s WHERE s.seq IS NOT NULL",
            &[&names],
        )
        .await
        .map_err(MoveError::db)?;
    let mut set = Vec::new();
    for row in rows {
        let (seq, last): (String, i64) = (row.get(0), row.get(1));
        to.execute(
            "SELECT setval($1::text::regclass, \
             greatest(coalesce(pg_sequence_last_value($1::text::regclass), 1), $2))",
            &[&seq, &last.saturating_add(SEQUENCE_GAP)],
        )
        .await
        .map_err(MoveError::db)?;
        set.push(seq);
    }
    Ok(set)
}

/// Whether any tenant table on `client` holds a row of `tenant`.
pub(crate) async fn tenant_has_rows(
    client: &Client,
    tables: &[TenantTable],
    tenant: &TenantId,
    column: &str,
) -> Result<bool, MoveError> {
    let col = quote_ident(column);
    for table in tables {
        let found: bool = client
            .query_one(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM {} WHERE {col} = $1)",
                    table.name
                ),
                &[&tenant.as_str()],
            )
            .await
            .map_err(MoveError::db)?
            .get(0);
        if found {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Deletes the tenant's rows from every tenant table, children first, in one
/// transaction that declares `version`, while holding the tenant lock on
/// `lock_on` (the source; `None` when `client` is the source), so no dual
/// write of the tenant interleaves.
pub(crate) async fn delete_rows(
    client: &Client,
    lock_on: Option<&Client>,
    tables: &[TenantTable],
    tenant: &TenantId,
    column: &str,
    version: u64,
) -> Result<(), MoveError> {
    let col = quote_ident(column);
    if let Some(source) = lock_on {
        begin(source, version, false).await?;
        if let Err(e) = lock(source, tenant).await {
            let _ = source.batch_execute("ROLLBACK").await;
            return Err(e);
        }
    }
    let result = async {
        // Replica mode: children go first anyway, and ON DELETE actions of the
        // shard must not reach beyond the tenant's rows listed here.
        // This side's tenant lock too (after the source's, when given): a
        // writer between its two COMMITs holds it, and its rows land first.
        begin(client, version, true).await?;
        if let Err(e) = lock(client, tenant).await {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(e);
        }
        for table in tables.iter().rev() {
            if let Err(e) = client
                .execute(
                    &format!("DELETE FROM {} WHERE {col} = $1", table.name),
                    &[&tenant.as_str()],
                )
                .await
            {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(MoveError::db(e));
            }
        }
        client.batch_execute("COMMIT").await.map_err(MoveError::db)
    }
    .await;
    if let Some(source) = lock_on {
        let _ = source.batch_execute("COMMIT").await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::batch_rows_under;

    #[test]
    fn a_throttle_shortens_batches_to_twenty_a_second_but_never_below_fifty() {
        assert_eq!(batch_rows_under(1000, None), 1000);
        assert_eq!(batch_rows_under(1000, Some(0)), 1000, "0 is no throttle");
        assert_eq!(batch_rows_under(1000, Some(100_000)), 1000);
        assert_eq!(batch_rows_under(1000, Some(5_000)), 250);
        assert_eq!(batch_rows_under(1000, Some(200)), 50);
        assert_eq!(
            batch_rows_under(20, Some(5_000)),
            20,
            "a smaller setting wins"
        );
        assert_eq!(batch_rows_under(0, None), 1);
    }
}
