//! Per-tenant load, as the handle sees it: statements, rows, database time,
//! pool wait and errors, per shard, for the tenants that cost the most.
//!
//! Memory is bounded: each shard keeps at most `2 × K` tenants (K from
//! [`DEFAULT_TOP_TENANTS`], or set with [`ShardRouter::with_top_tenants`];
//! 0 turns counting off).
//! When the table fills, the half with the least database time is dropped, and
//! a tenant seen after that starts from the largest time dropped (`floor`),
//! as in the Space-Saving sketch: a tenant's time is then overstated by at most
//! `floor`, never understated, and any tenant whose true time exceeds `floor`
//! is in the table. Ranking the top K by time is what finding hot tenants needs.
//!
//! [`ShardRouter::with_top_tenants`]: crate::ShardRouter::with_top_tenants

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

/// Tenants ranked per shard by default (K).
pub const DEFAULT_TOP_TENANTS: usize = 1000;

/// One tenant's load on one shard since the router started (or since it
/// entered the table; see `overstated_by`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct TenantLoad {
    /// The tenant.
    pub tenant: String,
    /// Statements run.
    pub statements: u64,
    /// Rows returned or affected.
    pub rows: u64,
    /// Time from sending statements to their answers, in microseconds.
    pub db_time_us: u64,
    /// Time waiting for a pooled connection, in microseconds.
    pub pool_wait_us: u64,
    /// Time holding connections (from checkout to their return), in
    /// microseconds: database time plus what the application did meanwhile.
    pub hold_time_us: u64,
    /// Statements that failed (and checkouts that timed out).
    pub errors: u64,
    /// How much of `db_time_us` may belong to tenants dropped from the table
    /// before this one entered it (0 while the table never filled).
    pub overstated_by_us: u64,
}

/// One shard's most expensive tenants: see [`crate::ShardRouter::tenant_load`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct ShardTenants {
    /// The shard.
    pub shard: String,
    /// Its top tenants by database time, most first.
    pub tenants: Vec<TenantLoad>,
}

/// What one statement (or checkout) cost.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Cost {
    pub(crate) statements: u64,
    pub(crate) rows: u64,
    pub(crate) db_time: Duration,
    pub(crate) pool_wait: Duration,
    pub(crate) held: Duration,
    pub(crate) errors: u64,
}

/// What one checked-out connection has spent for its tenant so far: its
/// statements add here (atomics, no lock), and the tenant's entry is charged
/// once, when the connection goes back to the pool. One table update per
/// checkout instead of one per statement, checkout and release.
#[derive(Debug, Default)]
pub(crate) struct Spend {
    statements: AtomicU64,
    rows: AtomicU64,
    db_time_us: AtomicU64,
    errors: AtomicU64,
}

impl Spend {
    /// Adds one statement that returned or affected `rows` rows (or failed).
    pub(crate) fn statement(&self, rows: u64, db_time: Duration, failed: bool) {
        self.statements.fetch_add(1, Relaxed);
        self.rows.fetch_add(rows, Relaxed);
        self.db_time_us.fetch_add(micros(db_time), Relaxed);
        if failed {
            self.errors.fetch_add(1, Relaxed);
        }
    }

    /// The statements' share of a [`Cost`]: statements, rows, time, errors.
    pub(crate) fn cost(&self) -> Cost {
        Cost {
            statements: self.statements.load(Relaxed),
            rows: self.rows.load(Relaxed),
            db_time: Duration::from_micros(self.db_time_us.load(Relaxed)),
            errors: self.errors.load(Relaxed),
            ..Cost::default()
        }
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u64::MAX as u128) as u64
}

/// Upper bounds (seconds) of the checkout-wait histogram's buckets.
pub(crate) const WAIT_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The bounded per-tenant table of one shard, and its counters for metrics
/// (kept whether or not tenants are counted).
#[derive(Debug)]
pub(crate) struct ShardLoad {
    top: usize,
    inner: Mutex<Table>,
    pub(crate) counters: ShardCounters,
}

/// A shard's request counters, for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct ShardCounters {
    pub(crate) statements_ok: AtomicU64,
    pub(crate) statements_failed: AtomicU64,
    pub(crate) checkouts: AtomicU64,
    pub(crate) checkouts_failed: AtomicU64,
    pub(crate) fence_refusals: AtomicU64,
    /// Checkouts that waited at most each of [`WAIT_BUCKETS`] (not cumulative).
    pub(crate) wait_buckets: [AtomicU64; WAIT_BUCKETS.len()],
    pub(crate) wait_sum_us: AtomicU64,
}

#[derive(Debug, Default)]
struct Table {
    tenants: HashMap<Box<str>, Entry>,
    /// The largest database time dropped so far (µs).
    floor: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Entry {
    statements: u64,
    rows: u64,
    db_time_us: u64,
    pool_wait_us: u64,
    hold_time_us: u64,
    errors: u64,
    overstated_by_us: u64,
}

impl ShardLoad {
    /// A table ranking `top` tenants (0: counting is off).
    pub(crate) fn new(top: usize) -> ShardLoad {
        ShardLoad {
            top,
            inner: Mutex::new(Table::default()),
            counters: ShardCounters::default(),
        }
    }

    /// Counts a write the move fence refused.
    pub(crate) fn fence_refused(&self) {
        self.counters.fence_refusals.fetch_add(1, Relaxed);
    }

    /// Counts `cost` in the shard's counters and charges it to `tenant`: a
    /// statement's (`statements > 0`) or a checkout's.
    pub(crate) fn record(&self, tenant: &str, cost: Cost) {
        if cost.statements > 0 {
            self.statement(cost.errors > 0);
        } else {
            self.checkout(cost.pool_wait, cost.errors > 0);
        }
        self.charge(tenant, cost);
    }

    /// A statement in the shard's counters (its tenant is charged apart).
    pub(crate) fn statement(&self, failed: bool) {
        let c = &self.counters;
        let counter = if failed {
            &c.statements_failed
        } else {
            &c.statements_ok
        };
        counter.fetch_add(1, Relaxed);
    }

    /// A checkout that waited `waited` in the shard's counters (its tenant is
    /// charged apart).
    pub(crate) fn checkout(&self, waited: Duration, failed: bool) {
        let c = &self.counters;
        c.checkouts.fetch_add(1, Relaxed);
        if failed {
            c.checkouts_failed.fetch_add(1, Relaxed);
        }
        let seconds = waited.as_secs_f64();
        if let Some(i) = WAIT_BUCKETS.iter().position(|le| seconds <= *le) {
            c.wait_buckets[i].fetch_add(1, Relaxed);
        }
        c.wait_sum_us.fetch_add(micros(waited), Relaxed);
    }

    /// Adds `cost` to `tenant`'s entry (the shard's counters untouched).
    pub(crate) fn charge(&self, tenant: &str, cost: Cost) {
        self.update(tenant, |entry| entry.add(cost));
    }

    /// Applies `change` to `tenant`'s entry, making room for it if it is new.
    fn update(&self, tenant: &str, change: impl FnOnce(&mut Entry)) {
        if self.top == 0 {
            return;
        }
        let mut table = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = table.tenants.get_mut(tenant) {
            change(entry);
            return;
        }
        if table.tenants.len() >= 2 * self.top {
            table.prune(self.top);
        }
        let floor = table.floor;
        let mut entry = Entry {
            db_time_us: floor,
            overstated_by_us: floor,
            ..Entry::default()
        };
        change(&mut entry);
        table.tenants.insert(tenant.into(), entry);
    }

    /// The top tenants by database time, most first.
    pub(crate) fn top(&self) -> Vec<TenantLoad> {
        self.top_n(self.top)
    }

    /// The `n` top tenants by database time (at most the table's K), most first.
    pub(crate) fn top_n(&self, n: usize) -> Vec<TenantLoad> {
        let table = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<TenantLoad> = table
            .tenants
            .iter()
            .map(|(tenant, e)| TenantLoad {
                tenant: tenant.to_string(),
                statements: e.statements,
                rows: e.rows,
                db_time_us: e.db_time_us,
                pool_wait_us: e.pool_wait_us,
                hold_time_us: e.hold_time_us,
                errors: e.errors,
                overstated_by_us: e.overstated_by_us,
            })
            .collect();
        drop(table);
        all.sort_by(|a, b| {
            b.db_time_us
                .cmp(&a.db_time_us)
                .then_with(|| a.tenant.cmp(&b.tenant))
        });
        all.truncate(n.min(self.top));
        all
    }
}

impl Entry {
    fn add(&mut self, cost: Cost) {
        self.statements += cost.statements;
        self.rows += cost.rows;
        self.db_time_us += micros(cost.db_time);
        self.pool_wait_us += micros(cost.pool_wait);
        self.hold_time_us += micros(cost.held);
        self.errors += cost.errors;
    }
}

impl Table {
    /// Keeps the `keep` tenants with the most database time; the largest time
    /// dropped becomes the floor new tenants start from.
    fn prune(&mut self, keep: usize) {
        let mut times: Vec<u64> = self.tenants.values().map(|e| e.db_time_us).collect();
        let cut = times.len() - keep;
        let (_, nth, _) = times.select_nth_unstable(cut - 1);
        let threshold = *nth;
        // Drop entries at or below the threshold until `keep` remain.
        let mut to_drop = cut;
        self.tenants.retain(|_, e| {
            if to_drop > 0 && e.db_time_us <= threshold {
                to_drop -= 1;
                false
            } else {
                true
            }
        });
        self.floor = self.floor.max(threshold);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn cost(micros: u64) -> Cost {
        Cost {
            statements: 1,
            rows: 2,
            db_time: Duration::from_micros(micros),
            ..Cost::default()
        }
    }

    #[test]
    fn counts_add_up_and_rank_by_time() {
        let load = ShardLoad::new(10);
        for _ in 0..10 {
            load.record("hot", cost(100));
        }
        load.record("cold", cost(50));
        let top = load.top();
        assert_eq!(top[0].tenant, "hot");
        assert_eq!(
            (top[0].statements, top[0].rows, top[0].db_time_us),
            (10, 20, 1000)
        );
        assert_eq!(top[1].tenant, "cold");
        assert_eq!(top[1].overstated_by_us, 0);
    }

    #[test]
    fn a_connections_spend_is_charged_once_with_its_wait_and_hold() {
        let load = ShardLoad::new(10);
        let spend = Spend::default();
        spend.statement(3, Duration::from_micros(40), false);
        spend.statement(0, Duration::from_micros(10), true);
        load.statement(false);
        load.statement(true);
        load.charge(
            "t",
            Cost {
                pool_wait: Duration::from_micros(7),
                held: Duration::from_micros(90),
                ..spend.cost()
            },
        );
        let t = &load.top()[0];
        assert_eq!(
            (
                t.statements,
                t.rows,
                t.db_time_us,
                t.errors,
                t.pool_wait_us,
                t.hold_time_us
            ),
            (2, 3, 50, 1, 7, 90)
        );
        let c = &load.counters;
        assert_eq!(
            (
                c.statements_ok.load(Relaxed),
                c.statements_failed.load(Relaxed)
            ),
            (1, 1)
        );
    }

    #[test]
    fn memory_stays_bounded_and_the_heavy_tenant_stays_first() {
        let load = ShardLoad::new(100);
        for i in 0..100_000u64 {
            load.record(&format!("t{i}"), cost(10));
            if i % 10 == 0 {
                load.record("heavy", cost(1_000));
            }
        }
        assert!(load.inner.lock().unwrap().tenants.len() <= 200);
        let top = load.top();
        assert_eq!(top.len(), 100);
        assert_eq!(top[0].tenant, "heavy");
        assert_eq!(top[0].db_time_us, 10_000 * 1_000, "never pruned, so exact");
    }
}

#[cfg(test)]
mod properties {
    use super::tests::cost;
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A tenant whose true time exceeds the floor is in the table, its time
        /// is never understated and overstated by at most the floor.
        #[test]
        fn times_are_bounded_by_the_floor(events in prop::collection::vec((0u8..60, 1u64..500), 1..2000)) {
            let load = ShardLoad::new(8);
            let mut truth: HashMap<String, u64> = HashMap::new();
            for (tenant, micros) in &events {
                let name = format!("t{tenant}");
                load.record(&name, cost(*micros));
                *truth.entry(name).or_default() += micros;
            }
            let floor = load.inner.lock().unwrap().floor;
            let table = load.inner.lock().unwrap().tenants.clone();
            for (tenant, true_time) in &truth {
                match table.get(tenant.as_str()) {
                    Some(e) => {
                        prop_assert!(e.db_time_us >= *true_time);
                        prop_assert!(e.db_time_us <= true_time + floor);
                    }
                    None => prop_assert!(*true_time <= floor, "{tenant} ({true_time}) dropped above floor {floor}"),
                }
            }
        }
    }
}
