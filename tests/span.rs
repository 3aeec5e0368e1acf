//! The request span's fields, in a test binary of its own: tracing caches
//! whether a span is enabled per call site for the whole process, and tests
//! running beside this one on other threads (with no subscriber) would race
//! that cache against this test's thread-local subscriber.

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::Router;
use common::{map, Shards, NOTES_SCHEMA};
use shard_router::tenant::HeaderExtractor;
use shard_router::{DbError, ShardRouter, ShardRouterLayer, TenantDb};
use tower::ServiceExt;

fn post_as(tenant: &str) -> Request<Body> {
    Request::post("/notes")
        .header("x-tenant-id", tenant)
        .body(Body::empty())
        .unwrap()
}

/// Collects the `u64` fields recorded on spans after they were created.
#[derive(Clone, Default)]
struct Recorded(Arc<std::sync::Mutex<Vec<(String, u64)>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Recorded {
    fn on_record(
        &self,
        _span: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        struct Visit<'a>(&'a mut Vec<(String, u64)>);
        impl tracing::field::Visit for Visit<'_> {
            fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
                self.0.push((field.name().to_owned(), value));
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        values.record(&mut Visit(&mut self.0.lock().unwrap()));
    }
}

#[tokio::test]
async fn the_request_span_records_its_statements_and_database_time() {
    use tracing_subscriber::layer::SubscriberExt;
    let recorded = Recorded::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(recorded.clone()));
    let shards = Shards::create(1).await;
    shards.run_everywhere(NOTES_SCHEMA).await;
    let router = ShardRouter::new(map(1, &shards, "")).unwrap();
    // insert_note runs one statement; this handler three.
    async fn three(db: TenantDb) -> Result<String, DbError> {
        let client = db.read().await?;
        for _ in 0..3 {
            client.query("SELECT 1", &[]).await?;
        }
        Ok(String::new())
    }
    let app = Router::new()
        .route("/notes", post(three))
        .layer(ShardRouterLayer::new(router, HeaderExtractor::default()));
    let response = app.oneshot(post_as("acme")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let fields = recorded.0.lock().unwrap().clone();
    let get = |name: &str| fields.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
    assert_eq!(get("statements"), Some(3), "{fields:?}");
    assert!(get("db_time_us").is_some_and(|us| us > 0), "{fields:?}");
}
