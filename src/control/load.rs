//! What the routers report about load: their most expensive tenants and
//! their pools, merged over every live router (`shardctl tenants top`,
//! `shardctl shards`).
//!
//! Each router reports the figures it counted since it started (see
//! [`crate::ShardRouter::tenant_load`]), every `ControlOptions::report_load`;
//! a router whose lease passed is left out.

use super::{ControlError, ControlPlane};

/// What to rank tenants by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LoadOrder {
    /// Database time (the default).
    #[default]
    Time,
    /// Statements.
    Statements,
    /// Rows returned or affected.
    Rows,
    /// Errors.
    Errors,
}

impl LoadOrder {
    fn column(self) -> &'static str {
        match self {
            LoadOrder::Time => "db_time_us",
            LoadOrder::Statements => "statements",
            LoadOrder::Rows => "rows",
            LoadOrder::Errors => "errors",
        }
    }
}

/// The time a report covers: everything since each router started, or a
/// recent window. A window ends at the router's last report and begins
/// between its length and a minute more before (routers keep a snapshot a
/// minute; one younger than the window reports its whole life).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LoadWindow {
    /// Since each router started (the default).
    #[default]
    Total,
    /// The last minute.
    Minute,
    /// The last 5 minutes.
    FiveMinutes,
    /// The last 15 minutes.
    FifteenMinutes,
    /// The last hour.
    Hour,
}

impl LoadWindow {
    /// Every window a router reports.
    pub const ALL: [LoadWindow; 5] = [
        LoadWindow::Total,
        LoadWindow::Minute,
        LoadWindow::FiveMinutes,
        LoadWindow::FifteenMinutes,
        LoadWindow::Hour,
    ];

    /// Its length in seconds (0: since the router started).
    ///
    /// ```
    /// # use shard_router::control::LoadWindow;
    /// assert_eq!(LoadWindow::FiveMinutes.seconds(), 300);
    /// ```
    pub fn seconds(self) -> u32 {
        match self {
            LoadWindow::Total => 0,
            LoadWindow::Minute => 60,
            LoadWindow::FiveMinutes => 300,
            LoadWindow::FifteenMinutes => 900,
            LoadWindow::Hour => 3600,
        }
    }
}

/// A tenant's load on one shard, summed over the live routers.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct ReportedTenant {
    /// The shard.
    pub shard: String,
    /// The tenant.
    pub tenant: String,
    /// Statements run.
    pub statements: u64,
    /// Rows returned or affected.
    pub rows: u64,
    /// Database time, microseconds.
    pub db_time_us: u64,
    /// Pool wait, microseconds.
    pub pool_wait_us: u64,
    /// Errors.
    pub errors: u64,
    /// Its share (0 to 1) of the ranked figure over every reported tenant in
    /// the scope asked for (one shard, or all).
    pub share: f64,
    /// How many live routers reported it.
    pub routers: u64,
}

/// A shard's load and pools, summed over the live routers.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct ReportedShard {
    /// The shard.
    pub shard: String,
    /// Statements of the tenants the routers track.
    pub statements: u64,
    /// Their database time, microseconds.
    pub db_time_us: u64,
    /// This shard's share (0 to 1) of the database time of every shard.
    pub share: f64,
    /// Distinct tenants reported for the shard.
    pub tenants: u64,
    /// Connections the routers may open to it (sum of their pools' max).
    pub pool_max: u64,
    /// Connections open.
    pub pool_size: u64,
    /// Open and idle.
    pub pool_available: u64,
    /// Requests waiting for a connection.
    pub pool_waiting: u64,
    /// Live routers reporting.
    pub routers: u64,
}

/// Live routers: reported within their lease, the load rows written by the
/// router row's login (another login's rows under its instance id are not
/// its reports).
const LIVE: &str = "JOIN shard_router_routers r USING (instance_id, login) \
                    WHERE r.last_seen + r.lease_ms * interval '1 millisecond' > clock_timestamp()";

impl ControlPlane {
    /// The `limit` most expensive tenants by `by` over `window`, on `shard`
    /// or on all shards, merged over every live router.
    ///
    /// ```no_run
    /// # async fn f(c: shard_router::control::ControlPlane) -> Result<(), shard_router::control::ControlError> {
    /// use shard_router::control::{LoadOrder, LoadWindow};
    /// for t in c.tenants_top(None, LoadOrder::Time, LoadWindow::Total, 10).await? {
    ///     println!("{} on {}: {:.1}% of database time", t.tenant, t.shard, t.share * 100.0);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn tenants_top(
        &self,
        shard: Option<&str>,
        by: LoadOrder,
        window: LoadWindow,
        limit: usize,
    ) -> Result<Vec<ReportedTenant>, ControlError> {
        let column = by.column();
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT shard, tenant, statements, rows, db_time_us, pool_wait_us, errors, routers, \
                       coalesce({column}::float8 / nullif(sum({column}) OVER (), 0), 0) \
                     FROM (SELECT shard, tenant, sum(statements)::int8 statements, sum(rows)::int8 rows, \
                             sum(db_time_us)::int8 db_time_us, sum(pool_wait_us)::int8 pool_wait_us, \
                             sum(errors)::int8 errors, count(*) routers \
                           FROM shard_router_tenant_load {LIVE} AND ($1::text IS NULL OR shard = $1) \
                             AND window_s = $3 \
                           GROUP BY shard, tenant) t \
                     ORDER BY {column} DESC, shard, tenant LIMIT $2"
                ),
                &[
                    &shard,
                    &(limit.min(i64::MAX as usize) as i64),
                    &(window.seconds() as i32),
                ],
            )
            .await?;
        let n = |r: &tokio_postgres::Row, i| r.get::<_, i64>(i).max(0) as u64;
        Ok(rows
            .iter()
            .map(|r| ReportedTenant {
                shard: r.get(0),
                tenant: r.get(1),
                statements: n(r, 2),
                rows: n(r, 3),
                db_time_us: n(r, 4),
                pool_wait_us: n(r, 5),
                errors: n(r, 6),
                routers: n(r, 7),
                share: r.get(8),
            })
            .collect())
    }

    /// Every shard's reported load and pools, merged over the live routers,
    /// busiest first.
    ///
    /// ```no_run
    /// # async fn f(c: shard_router::control::ControlPlane) -> Result<(), shard_router::control::ControlError> {
    /// for s in c.shard_load().await? {
    ///     println!("{}: {:.0}% of load, {} of {} connections busy", s.shard, s.share * 100.0,
    ///              s.pool_size - s.pool_available, s.pool_max);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn shard_load(&self) -> Result<Vec<ReportedShard>, ControlError> {
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT s.shard, s.statements, s.db_time_us, \
                       coalesce(s.db_time_us::float8 / nullif(sum(s.db_time_us) OVER (), 0), 0), \
                       coalesce(t.tenants, 0), s.pool_max, s.pool_size, s.pool_available, s.pool_waiting, s.routers \
                     FROM (SELECT shard, sum(statements)::int8 statements, sum(db_time_us)::int8 db_time_us, \
                             sum(pool_max)::int8 pool_max, sum(pool_size)::int8 pool_size, \
                             sum(pool_available)::int8 pool_available, sum(pool_waiting)::int8 pool_waiting, \
                             count(*) routers \
                           FROM shard_router_shard_load {LIVE} GROUP BY shard) s \
                     LEFT JOIN (SELECT shard, count(DISTINCT tenant) tenants \
                                FROM shard_router_tenant_load {LIVE} AND window_s = 0 \
                                GROUP BY shard) t USING (shard) \
                     ORDER BY s.db_time_us DESC, s.shard"
                ),
                &[],
            )
            .await?;
        let n = |r: &tokio_postgres::Row, i| r.get::<_, i64>(i).max(0) as u64;
        Ok(rows
            .iter()
            .map(|r| ReportedShard {
                shard: r.get(0),
                statements: n(r, 1),
                db_time_us: n(r, 2),
                share: r.get(3),
                tenants: n(r, 4),
                pool_max: n(r, 5),
                pool_size: n(r, 6),
                pool_available: n(r, 7),
                pool_waiting: n(r, 8),
                routers: n(r, 9),
            })
            .collect())
    }
}

impl ControlPlane {
    /// What [`crate::plan::plan`] needs, from the newest map and the live
    /// routers' reports: each shard's weight and load, and each reported
    /// tenant's load on the shard that serves it under that map (its load
    /// follows it when it moves). A shard's load its routers could not
    /// attribute to a named tenant stays on it. Tenants in `[moves]` are left
    /// out (they are moving).
    ///
    /// ```no_run
    /// # async fn f(c: shard_router::control::ControlPlane) -> Result<(), shard_router::control::ControlError> {
    /// use shard_router::plan::{plan, PlanOptions};
    /// let (shards, tenants) = c.plan_inputs().await?;
    /// let p = plan(&shards, &tenants, &PlanOptions::default());
    /// # Ok(()) }
    /// ```
    pub async fn plan_inputs(
        &self,
    ) -> Result<
        (
            Vec<crate::plan::ShardLoadInput>,
            Vec<crate::plan::TenantLoadInput>,
        ),
        ControlError,
    > {
        use crate::plan::{ShardLoadInput, TenantLoadInput};
        use std::collections::BTreeMap;
        let map = self.latest().await?.load()?;
        let reported = self
            .tenants_top(None, LoadOrder::Time, LoadWindow::Total, usize::MAX >> 1)
            .await?;
        let shard_totals = self.shard_load().await?;
        // Per shard as reported: total, and what named tenants account for.
        let mut named_on: BTreeMap<&str, u64> = BTreeMap::new();
        let mut by_tenant: BTreeMap<&str, u64> = BTreeMap::new();
        for t in &reported {
            *named_on.entry(&t.shard).or_default() += t.db_time_us;
            *by_tenant.entry(&t.tenant).or_default() += t.db_time_us;
        }
        let mut loads: BTreeMap<String, u64> = map
            .shards()
            .iter()
            .map(|s| (s.name().to_owned(), 0))
            .collect();
        for s in &shard_totals {
            let residual = s
                .db_time_us
                .saturating_sub(named_on.get(s.shard.as_str()).copied().unwrap_or(0));
            if let Some(load) = loads.get_mut(&s.shard) {
                *load += residual;
            }
        }
        let mut tenants = Vec::new();
        for (tenant, load) in by_tenant {
            let Ok(id) = crate::TenantId::new(tenant) else {
                continue;
            };
            let id = map.tenant_id(id);
            if map.move_of(&id).is_some() {
                continue;
            }
            let shard = map.shard(map.locate(&id).shard).name();
            *loads.entry(shard.to_owned()).or_default() += load;
            tenants.push(TenantLoadInput::new(id.as_str(), shard, load));
        }
        let shards = map
            .shards()
            .iter()
            .map(|s| ShardLoadInput::new(s.name(), s.weight(), loads[s.name()]))
            .collect();
        Ok((shards, tenants))
    }
}
