//! The shipped Grafana dashboard and Prometheus alert rules name only metrics
//! the router exports (issue 27.6), and the dashboard is valid JSON.

use std::collections::BTreeSet;

use shard_router::map::MapLoader;
use shard_router::ShardRouter;

const DASHBOARD: &str = include_str!("../dashboards/grafana-shard-router.json");
const ALERTS: &str = include_str!("../dashboards/prometheus-alerts.yml");

/// Every `shard_router_...` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("shard_router_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

#[tokio::test]
async fn every_expression_names_a_metric_the_router_exports() {
    let map = MapLoader::without_env()
        .load_str(
            "version = 1\n[shards.a]\nurl = \"postgres://h/a\"\n\
             replicas = [{ url = \"postgres://r/a\" }]\n[shards.b]\nurl = \"postgres://h/b\"\n",
        )
        .unwrap();
    let exported = ShardRouter::new(map).unwrap().metrics(10);
    let families: BTreeSet<&str> = exported
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).unwrap();
    let exprs: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap())
        .map(|t| t["expr"].as_str().unwrap())
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    let mut named = metric_names(&exprs.join("\n"));
    assert!(ALERTS.matches("- alert:").count() >= 8);
    named.extend(metric_names(ALERTS));
    for name in &named {
        // A histogram's series carry a suffix on its family's name.
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| families.contains(f)))
            .unwrap_or(name);
        assert!(
            families.contains(family),
            "{name} is not exported; the router exports {families:?}"
        );
    }
    // Pool saturation, errors by shard, moves, rollout lag and replica lag.
    for needed in [
        "shard_router_pool_connections",
        "shard_router_statements_total",
        "shard_router_move_in_flight",
        "shard_router_map_version",
        "shard_router_replica_lag_seconds",
    ] {
        assert!(named.contains(needed), "{needed} is not watched");
    }
}
