//! A shard added to the map must already have the schema the others have:
//! otherwise the first tenant placed there fails every request.

use std::collections::BTreeSet;

use crate::pg::ShardError;
use crate::ShardMap;

/// What a new shard lacks, compared with a shard already in the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaGap {
    /// The new shard (or a shard whose URL changed).
    pub shard: String,
    /// The shard it was compared with.
    pub reference: String,
    /// `schema.table.column` present on the reference and missing on the shard.
    pub missing: Vec<String>,
}

/// For each shard that `new` adds (or points at a new URL), the columns of
/// user tables that the first unchanged shard of `old` has and it lacks.
/// Empty when every new shard has at least the reference's schema.
///
/// ```no_run
/// # async fn f(old: shard_router::ShardMap, new: shard_router::ShardMap) -> Result<(), Box<dyn std::error::Error>> {
/// for gap in shard_router::control::schema_gaps(&old, &new).await? {
///     println!("{} lacks {} of {}'s columns", gap.shard, gap.missing.len(), gap.reference);
/// }
/// # Ok(()) }
/// ```
pub async fn schema_gaps(old: &ShardMap, new: &ShardMap) -> Result<Vec<SchemaGap>, ShardError> {
    let fresh: Vec<_> = new
        .shards()
        .iter()
        .filter(|s| {
            old.shard_index(s.name())
                .is_none_or(|i| old.shard(i).url() != s.url())
        })
        .collect();
    if fresh.is_empty() {
        return Ok(Vec::new());
    }
    let Some(reference) = old.shards().iter().find(|s| {
        new.shard_index(s.name())
            .is_some_and(|i| new.shard(i).url() == s.url())
    }) else {
        return Ok(Vec::new()); // nothing unchanged to compare with
    };
    let expected = columns(reference).await?;
    let mut gaps = Vec::new();
    for shard in fresh {
        let have = columns(shard).await?;
        let missing: Vec<String> = expected.difference(&have).cloned().collect();
        if !missing.is_empty() {
            gaps.push(SchemaGap {
                shard: shard.name().to_owned(),
                reference: reference.name().to_owned(),
                missing,
            });
        }
    }
    Ok(gaps)
}

/// `schema.table.column` of every user table, the router's own tables left out.
async fn columns(shard: &crate::map::Shard) -> Result<BTreeSet<String>, ShardError> {
    let client = shard.connect_admin().await?;
    let rows = client
        .query(
            "SELECT format('%I.%I.%I', table_schema, table_name, column_name) \
             FROM information_schema.columns \
             WHERE table_schema NOT IN ('pg_catalog', 'information_schema') \
               AND table_schema NOT LIKE 'pg_toast%' \
               AND table_name NOT LIKE 'shard\\_router\\_%'",
            &[],
        )
        .await
        .map_err(|e| ShardError::database(shard.name(), e))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
