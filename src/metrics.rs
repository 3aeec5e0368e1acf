//! Prometheus metrics in the text exposition format, without a metrics
//! crate: [`ShardRouter::metrics`] renders them, [`MetricsService`] serves
//! them (e.g. at `GET /metrics`, outside the tenant layer).
//!
//! Every label's values are bounded: shards come from the map, moves from its
//! `[moves]`, and tenants only as each shard's top [`MetricsService::top_tenants`]
//! by database time (default 10), however many tenants the router serves.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `shard_router_map_version` | gauge | |
//! | `shard_router_pool_connections` | gauge | `shard`, `state` = `max`, `open`, `idle` |
//! | `shard_router_pool_waiting` | gauge | `shard` |
//! | `shard_router_checkout_wait_seconds` | histogram | `shard` |
//! | `shard_router_checkouts_total` | counter | `shard`, `outcome` = `ok`, `unavailable` |
//! | `shard_router_statements_total` | counter | `shard`, `outcome` = `ok`, `error` |
//! | `shard_router_fence_refusals_total` | counter | `shard` |
//! | `shard_router_move_in_flight` | gauge (1) | `tenant`, `from`, `to`, `phase` |
//! | `shard_router_replica_healthy` | gauge (0 or 1) | `shard`, `replica` (its position in the map, from 0) |
//! | `shard_router_replica_lag_seconds` | gauge | `shard`, `replica` (absent while unknown) |
//! | `shard_router_tenant_db_seconds_total` | counter | `shard`, `tenant` (top N per shard) |
//! | `shard_router_tenant_statements_total` | counter | `shard`, `tenant` (top N per shard) |
//!
//! # Example
//!
//! ```
//! use axum::Router;
//! use shard_router::{map::MapLoader, metrics::MetricsService, ShardRouter};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
//! let admin: Router = Router::new().route_service("/metrics", MetricsService::new(router.clone()));
//! assert!(router.metrics(10).contains("shard_router_map_version 1"));
//! # }
//! ```

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::{ready, Ready};
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use crate::accounting::WAIT_BUCKETS;
use crate::ShardRouter;

/// Tenants per shard shown as labels by default.
pub const DEFAULT_METRICS_TENANTS: usize = 10;

impl ShardRouter {
    /// The router's metrics in Prometheus text format, with each shard's
    /// `top_tenants` most expensive tenants by database time.
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// let text = router.metrics(10);
    /// assert!(text.contains("shard_router_pool_connections{shard=\"a\",state=\"max\"} 16"));
    /// # }
    /// ```
    pub fn metrics(&self, top_tenants: usize) -> String {
        let table = self.table();
        let map = table.map();
        let mut out = String::new();
        let shards: Vec<_> = table
            .shards()
            .zip(table.loads())
            .map(|((shard, pool), load)| (label(shard.name()), pool.status(), load))
            .collect();
        let mut section = |name: &str, kind: &str, help: &str, lines: Vec<String>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for line in lines {
                out.push_str(&line);
                out.push('\n');
            }
        };
        section(
            "shard_router_map_version",
            "gauge",
            "The live shard map version.",
            vec![format!("shard_router_map_version {}", map.version())],
        );
        section(
            "shard_router_pool_connections",
            "gauge",
            "Connections of each shard's pool: the most it may open, open now, idle now.",
            shards
                .iter()
                .flat_map(|(s, status, _)| {
                    [
                        ("max", status.max_size),
                        ("open", status.size),
                        ("idle", status.available),
                    ]
                    .map(|(state, n)| {
                        format!(
                            "shard_router_pool_connections{{shard=\"{s}\",state=\"{state}\"}} {n}"
                        )
                    })
                })
                .collect(),
        );
        section(
            "shard_router_pool_waiting",
            "gauge",
            "Requests waiting for a connection of each shard's pool.",
            shards
                .iter()
                .map(|(s, status, _)| {
                    format!(
                        "shard_router_pool_waiting{{shard=\"{s}\"}} {}",
                        status.waiting
                    )
                })
                .collect(),
        );
        section(
            "shard_router_checkout_wait_seconds",
            "histogram",
            "Time requests waited for a pooled connection.",
            shards
                .iter()
                .flat_map(|(s, _, load)| {
                    let c = &load.counters;
                    let mut cumulative = 0;
                    let mut lines: Vec<String> = WAIT_BUCKETS
                        .iter()
                        .zip(&c.wait_buckets)
                        .map(|(le, n)| {
                            cumulative += n.load(Relaxed);
                            format!("shard_router_checkout_wait_seconds_bucket{{shard=\"{s}\",le=\"{le}\"}} {cumulative}")
                        })
                        .collect();
                    let count = c.checkouts.load(Relaxed);
                    lines.push(format!(
                        "shard_router_checkout_wait_seconds_bucket{{shard=\"{s}\",le=\"+Inf\"}} {count}"
                    ));
                    lines.push(format!(
                        "shard_router_checkout_wait_seconds_sum{{shard=\"{s}\"}} {}",
                        c.wait_sum_us.load(Relaxed) as f64 / 1e6
                    ));
                    lines.push(format!(
                        "shard_router_checkout_wait_seconds_count{{shard=\"{s}\"}} {count}"
                    ));
                    lines
                })
                .collect(),
        );
        section(
            "shard_router_checkouts_total",
            "counter",
            "Connection checkouts by outcome (unavailable: none within the pool's wait).",
            shards
                .iter()
                .flat_map(|(s, _, load)| {
                    let c = &load.counters;
                    let failed = c.checkouts_failed.load(Relaxed);
                    let ok = c.checkouts.load(Relaxed).saturating_sub(failed);
                    [("ok", ok), ("unavailable", failed)].map(|(outcome, n)| {
                        format!("shard_router_checkouts_total{{shard=\"{s}\",outcome=\"{outcome}\"}} {n}")
                    })
                })
                .collect(),
        );
        section(
            "shard_router_statements_total",
            "counter",
            "Statements run through the handle, by outcome.",
            shards
                .iter()
                .flat_map(|(s, _, load)| {
                    let c = &load.counters;
                    [
                        ("ok", c.statements_ok.load(Relaxed)),
                        ("error", c.statements_failed.load(Relaxed)),
                    ]
                    .map(|(outcome, n)| {
                        format!("shard_router_statements_total{{shard=\"{s}\",outcome=\"{outcome}\"}} {n}")
                    })
                })
                .collect(),
        );
        section(
            "shard_router_fence_refusals_total",
            "counter",
            "Writes the move fence refused (this router's map was older than a move allows).",
            shards
                .iter()
                .map(|(s, _, load)| {
                    format!(
                        "shard_router_fence_refusals_total{{shard=\"{s}\"}} {}",
                        load.counters.fence_refusals.load(Relaxed)
                    )
                })
                .collect(),
        );
        section(
            "shard_router_move_in_flight",
            "gauge",
            "Moves in the live map, with their phase.",
            map.moves()
                .iter()
                .map(|(tenant, m)| {
                    format!(
                        "shard_router_move_in_flight{{tenant=\"{}\",from=\"{}\",to=\"{}\",phase=\"{}\"}} 1",
                        label(tenant),
                        label(map.shard(m.from).name()),
                        label(map.shard(m.to).name()),
                        m.phase.as_str()
                    )
                })
                .collect(),
        );
        // Replicas by position, never by URL (it may carry a password).
        let replicas: Vec<(String, usize, crate::replicas::ReplicaStatus)> = map
            .shards()
            .iter()
            .filter_map(|shard| {
                let index = map.shard_index(shard.name())?;
                let status = table.read_replicas(index)?.status();
                Some((label(shard.name()), status))
            })
            .flat_map(|(s, status)| {
                status
                    .into_iter()
                    .enumerate()
                    .map(move |(i, r)| (s.clone(), i, r))
            })
            .collect();
        section(
            "shard_router_replica_healthy",
            "gauge",
            "Whether each replica serves reads: reachable, in recovery, within the lag bound.",
            replicas
                .iter()
                .map(|(s, i, r)| {
                    format!(
                        "shard_router_replica_healthy{{shard=\"{s}\",replica=\"{i}\"}} {}",
                        u8::from(r.healthy)
                    )
                })
                .collect(),
        );
        section(
            "shard_router_replica_lag_seconds",
            "gauge",
            "How far behind its primary each replica was at most, at the last probe.",
            replicas
                .iter()
                .filter_map(|(s, i, r)| {
                    r.lag_ms.map(|lag| {
                        format!(
                            "shard_router_replica_lag_seconds{{shard=\"{s}\",replica=\"{i}\"}} {}",
                            lag as f64 / 1000.0
                        )
                    })
                })
                .collect(),
        );
        let top: Vec<_> = shards
            .iter()
            .map(|(s, _, load)| (s, load.top_n(top_tenants)))
            .collect();
        type Figure = fn(&crate::accounting::TenantLoad) -> f64;
        let families: [(&str, &str, Figure); 2] = [
            (
                "shard_router_tenant_db_seconds_total",
                "Database time of each shard's most expensive tenants (a bounded set).",
                |t| t.db_time_us as f64 / 1e6,
            ),
            (
                "shard_router_tenant_statements_total",
                "Statements of each shard's most expensive tenants (a bounded set).",
                |t| t.statements as f64,
            ),
        ];
        for (name, help, figure) in families {
            section(
                name,
                "counter",
                help,
                top.iter()
                    .flat_map(|(s, tenants)| {
                        tenants.iter().map(move |t| {
                            format!(
                                "{name}{{shard=\"{s}\",tenant=\"{}\"}} {}",
                                label(&t.tenant),
                                figure(t)
                            )
                        })
                    })
                    .collect(),
            );
        }
        out
    }
}

/// A label value, escaped as the text format requires.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A tower service answering any request with [`ShardRouter::metrics`] as
/// `text/plain; version=0.0.4`.
#[derive(Clone, Debug)]
pub struct MetricsService {
    router: ShardRouter,
    top_tenants: usize,
}

impl MetricsService {
    /// Serves `router`'s metrics with [`DEFAULT_METRICS_TENANTS`] tenants per shard.
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, metrics::MetricsService, ShardRouter};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// let service = MetricsService::new(router);
    /// # }
    /// ```
    pub fn new(router: ShardRouter) -> Self {
        MetricsService {
            router,
            top_tenants: DEFAULT_METRICS_TENANTS,
        }
    }

    /// Shows `n` tenants per shard as labels (0: none).
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, metrics::MetricsService, ShardRouter};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// let service = MetricsService::new(router).top_tenants(25);
    /// # }
    /// ```
    pub fn top_tenants(mut self, n: usize) -> Self {
        self.top_tenants = n;
        self
    }
}

impl<B> Service<Request<B>> for MetricsService {
    type Response = Response<String>;
    type Error = Infallible;
    type Future = Ready<Result<Response<String>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<B>) -> Self::Future {
        let body = self.router.metrics(self.top_tenants);
        ready(Ok(crate::status::answer(body, "text/plain; version=0.0.4")))
    }
}
