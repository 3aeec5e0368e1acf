//! Applying a moving tenant's row images to the other shard.
//!
//! The primary's capture trigger records each changed row as JSON; the writer
//! drains them at commit and applies them here, in order, with one prepared
//! statement per table and kind (an upsert, a delete by key), built from the
//! shard's catalog on first use and kept for the routing table's life. They
//! run in the secondary's transaction, in replica mode, and are pipelined: one
//! round trip for all of a transaction's images (and, in `dual_write`, its
//! `COMMIT`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use deadpool_postgres::Object;
use serde::Deserialize;

use crate::map::ShardIndex;

/// Per (shard, table): how to apply its row images.
pub(crate) type Appliers = Mutex<HashMap<(ShardIndex, String), Arc<TableApplier>>>;

/// The statements that apply one table's row images.
#[derive(Debug)]
pub(crate) struct TableApplier {
    /// Inserts the image, or updates the row with its key (of the same tenant only).
    upsert: String,
    /// Deletes the row with the image's key (of the same tenant only).
    delete: String,
    /// The primary-key column names, to tell an update that changed the key.
    keys: Vec<String>,
}

/// One captured change, as the drain returns it.
#[derive(Debug, Deserialize)]
pub(crate) struct Image {
    t: String,
    op: String,
    old: Option<serde_json::Value>,
    new: Option<serde_json::Value>,
}

/// Builds a table's statements on the shard (identifiers quoted by Postgres).
const BUILD_SQL: &str = "WITH rel AS (SELECT $1::text::regclass AS r), \
 pk AS (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY k.ord) AS cols, \
               array_agg(a.attname::text ORDER BY k.ord) AS names \
        FROM rel, pg_index i \
        CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
        WHERE i.indrelid = rel.r AND i.indisprimary), \
 c AS (SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) AS cols, \
              string_agg(CASE WHEN NOT (attname::text = ANY ((SELECT names FROM pk)::text[])) \
                         THEN format('%I = EXCLUDED.%I', attname, attname) END, ', ' ORDER BY attnum) AS rest \
       FROM rel, pg_attribute WHERE attrelid = rel.r AND attnum > 0 AND NOT attisdropped AND attgenerated = '') \
 SELECT format('INSERT INTO %s AS t (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM jsonb_populate_record(NULL::%s, $1::text::jsonb) ON CONFLICT (%s) DO %s', \
               rel.r, c.cols, c.cols, rel.r, pk.cols, \
               CASE WHEN c.rest IS NULL THEN 'NOTHING' \
                    ELSE format('UPDATE SET %s WHERE t.%I = EXCLUDED.%I', c.rest, $2::text, $2::text) END), \
        format('DELETE FROM %s t WHERE (%s) = (SELECT %s FROM jsonb_populate_record(NULL::%s, $1::text::jsonb) r) AND t.%I = ($1::text::jsonb ->> %L)', \
               rel.r, pk.cols, pk.cols, rel.r, $2::text, $2::text), \
        pk.names \
 FROM rel, pk, c WHERE pk.cols IS NOT NULL";

/// The statements (and their parameter) that apply `images` on `shard`, in order.
pub(crate) async fn statements(
    appliers: &Appliers,
    shard: ShardIndex,
    client: &Object,
    column: &str,
    images: &[Image],
) -> Result<Vec<(String, String)>, tokio_postgres::Error> {
    let mut out = Vec::with_capacity(images.len());
    for image in images {
        let applier = applier(appliers, shard, client, column, &image.t).await?;
        let text =
            |v: &Option<serde_json::Value>| v.as_ref().map(|v| v.to_string()).unwrap_or_default();
        match image.op.as_str() {
            "D" => out.push((applier.delete.clone(), text(&image.old))),
            op => {
                let key_changed = op == "U"
                    && applier.keys.iter().any(|k| {
                        image.old.as_ref().and_then(|o| o.get(k))
                            != image.new.as_ref().and_then(|n| n.get(k))
                    });
                if key_changed {
                    out.push((applier.delete.clone(), text(&image.old)));
                }
                out.push((applier.upsert.clone(), text(&image.new)));
            }
        }
    }
    Ok(out)
}

async fn applier(
    appliers: &Appliers,
    shard: ShardIndex,
    client: &Object,
    column: &str,
    table: &str,
) -> Result<Arc<TableApplier>, tokio_postgres::Error> {
    let key = (shard, table.to_owned());
    if let Some(found) = appliers.lock().expect("appliers lock").get(&key) {
        return Ok(Arc::clone(found));
    }
    let row = client.query_one(BUILD_SQL, &[&table, &column]).await?;
    let built = Arc::new(TableApplier {
        upsert: row.get(0),
        delete: row.get(1),
        keys: row.get(2),
    });
    appliers
        .lock()
        .expect("appliers lock")
        .insert(key, Arc::clone(&built));
    Ok(built)
}
