//! The moving write's protocol, step by step, beside the move whose phases it
//! follows (see the [module](super) for the phases; the model's `Write`
//! states and its `Execute` and `Commit` transitions): on the primary, the transaction's deferred
//! constraints are checked, the tenant lock taken, the write's token appended
//! to the tenant's write chain and its captured row images drained, in one
//! round trip ([`drain`]); on the other shard the same lock, the images and
//! the chain token go in another ([`apply_images`]). The transaction's two
//! sides and their commits are `crate::db::TenantWriter`'s.

use tokio_postgres::types::ToSql;

use crate::db::apply;
use crate::db::{Side, TenantClient, TenantDb};

/// Takes the transaction's captured row images off the primary, as one JSON array.
pub(crate) const DRAIN_SQL: &str = "WITH d AS (DELETE FROM shard_router_capture WHERE xid = pg_current_xact_id() \
     RETURNING seq, tbl, op, old, new) \
     SELECT coalesce(jsonb_agg(jsonb_build_object('t', tbl::text, 'op', op, 'old', old, 'new', new) \
     ORDER BY seq)::text, '[]') FROM d";

/// Appends a moving write's token to the tenant's write chain on one shard,
/// in the write's transaction (no chain row yet: nothing to append to; verify
/// creates it). See `crate::moves::fence`.
pub(crate) const APPEND_WRITE_SQL: &str = "SELECT shard_router_append_write($1, $2)";

/// A token that names one moving write on both shards: random, so two
/// routers' writes never share one.
pub(crate) fn write_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{:016x}", hasher.finish())
}

/// The tenant lock some sides take before their first move statement.
pub(crate) const LOCK_SQL: &str = "SELECT pg_advisory_xact_lock($1)";

/// Runs the transaction's deferred constraint checks now.
pub(crate) const CONSTRAINTS_NOW_SQL: &str = "SET CONSTRAINTS ALL IMMEDIATE";

/// The primary's captured row images of this transaction, removed from the
/// capture table; with `lock`, the tenant lock is taken first, in the same
/// round trip. Deferred constraints (Django's `DEFERRABLE INITIALLY DEFERRED`
/// foreign keys, deferrable unique keys, constraint triggers) are checked on
/// the primary first, in that round trip too: a write the primary refuses is
/// refused before any image reaches the other shard, whose replica mode would
/// skip those checks (the model's `constraints_before_images`). The write's
/// `token` is appended to the tenant's write chain after the lock.
pub(crate) async fn drain(
    client: &TenantClient,
    tenant: &str,
    token: &str,
    lock: Option<i64>,
) -> Result<Vec<apply::Image>, tokio_postgres::Error> {
    let drain = client.prepare_cached(DRAIN_SQL).await?;
    let immediate = client.prepare_cached(CONSTRAINTS_NOW_SQL).await?;
    let append = client.prepare_cached(APPEND_WRITE_SQL).await?;
    let chained: [&(dyn ToSql + Sync); 2] = [&tenant, &token];
    let images = match lock {
        None => {
            let (checked, appended, images) = tokio::join!(
                client.raw().execute(&immediate, &[]),
                client.raw().execute(&append, &chained),
                client.raw().query_one(&drain, &[])
            );
            checked?;
            appended?;
            images?
        }
        Some(key) => {
            let lock = client.prepare_cached(LOCK_SQL).await?;
            let key: [&(dyn ToSql + Sync); 1] = [&key];
            let (checked, locked, appended, images) = tokio::join!(
                client.raw().execute(&immediate, &[]),
                client.raw().execute(&lock, &key),
                client.raw().execute(&append, &chained),
                client.raw().query_one(&drain, &[])
            );
            checked?;
            locked?;
            appended?;
            images?
        }
    };
    let images: String = images.get(0);
    Ok(if images == "[]" {
        Vec::new()
    } else {
        serde_json::from_str(&images).expect("the drain returns a JSON array of images")
    })
}

/// Applies `images` on `side` (the secondary) in one round trip, after taking
/// the tenant lock `lock` when given, and appends `chain`'s token (tenant,
/// token) to the tenant's write chain last. Statements are prepared first (cached
/// per connection): an unprepared one would send its Execute only after its
/// Parse came back, and the next would overtake it.
pub(crate) async fn apply_images(
    db: &TenantDb,
    side: &mut Side,
    column: &str,
    images: &[apply::Image],
    lock: Option<i64>,
    chain: Option<(&str, &str)>,
) -> Result<(), tokio_postgres::Error> {
    side.clean = false;
    let client = side.client();
    let statements =
        apply::statements(&db.table().appliers, side.shard, client, column, images).await?;
    let mut prepared = Vec::with_capacity(statements.len());
    for (sql, param) in &statements {
        prepared.push((client.prepare_cached(sql).await?, param));
    }
    let lock_statement = match lock {
        Some(_) => Some(client.prepare_cached(LOCK_SQL).await?),
        None => None,
    };
    let append_statement = match chain {
        Some(_) => Some(client.prepare_cached(APPEND_WRITE_SQL).await?),
        None => None,
    };
    let (chain_tenant, chain_token) = chain.unwrap_or_default();
    let chain_params: [&(dyn ToSql + Sync); 2] = [&chain_tenant, &chain_token];
    let params: Vec<[&(dyn ToSql + Sync); 1]> = prepared
        .iter()
        .map(|(_, param)| [*param as &(dyn ToSql + Sync)])
        .collect();
    let key = lock.unwrap_or_default();
    let key_param: [&(dyn ToSql + Sync); 1] = [&key];
    // Futures of one client are sent in the order they are first polled:
    // join_all polls the lock first.
    let locked = lock_statement
        .iter()
        .map(|statement| client.raw().execute(statement, &key_param));
    let applies = prepared
        .iter()
        .zip(&params)
        .map(|((statement, _), param)| client.raw().execute(statement, param));
    let appended = append_statement
        .iter()
        .map(|statement| client.raw().execute(statement, &chain_params));
    let result = futures_util::future::join_all(locked.chain(applies).chain(appended))
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map(|_| ());
    side.clean = true;
    result
}
