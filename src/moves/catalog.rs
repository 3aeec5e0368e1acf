//! Tenant tables as the catalog describes them: names, keys, columns, and the
//! order foreign keys impose.

use std::collections::{BTreeMap, BTreeSet};

use tokio_postgres::Client;

use super::MoveError;

/// A table with the tenant column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantTable {
    /// `schema.table`, quoted as Postgres quotes it (safe to splice into SQL).
    pub name: String,
    /// Primary-key columns, quoted, in key order.
    pub key: Vec<String>,
    /// Every insertable column, quoted (generated columns left out).
    pub columns: Vec<String>,
}

/// The tenant tables of the database behind `client`, parents before children.
/// Refuses a tenant table without a primary key, naming it.
pub(crate) async fn tenant_tables(
    client: &Client,
    column: &str,
) -> Result<Vec<TenantTable>, MoveError> {
    let rows = client
        .query(
            "SELECT c.oid, format('%I.%I', n.nspname, c.relname), \
               coalesce((SELECT array_agg(quote_ident(a.attname) ORDER BY k.ord) \
                 FROM pg_index i \
                 CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                 WHERE i.indrelid = c.oid AND i.indisprimary), '{}'), \
               (SELECT array_agg(quote_ident(a.attname) ORDER BY a.attnum) FROM pg_attribute a \
                 WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '') \
             FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute t ON t.attrelid = c.oid AND t.attname = $1 AND NOT t.attisdropped \
             WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't' \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg_toast%' \
               AND c.relname NOT LIKE 'shard\\_router\\_%' \
               AND NOT c.relispartition \
             ORDER BY 2",
            &[&column],
        )
        .await
        .map_err(MoveError::db)?;
    let mut tables = BTreeMap::new();
    for row in &rows {
        let oid: u32 = row.get(0);
        let table = TenantTable {
            name: row.get(1),
            key: row.get(2),
            columns: row.get(3),
        };
        if table.key.is_empty() {
            return Err(MoveError::NoPrimaryKey { table: table.name });
        }
        tables.insert(oid, table);
    }
    let edges = client
        .query(
            "SELECT conrelid, confrelid FROM pg_constraint WHERE contype = 'f' AND conrelid <> confrelid",
            &[],
        )
        .await
        .map_err(MoveError::db)?;
    // parent -> children, among tenant tables only
    let mut parents_of: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
    for edge in &edges {
        let (child, parent): (u32, u32) = (edge.get(0), edge.get(1));
        if tables.contains_key(&child) && tables.contains_key(&parent) {
            parents_of.entry(child).or_default().insert(parent);
        }
    }
    // Kahn's algorithm, ties broken by name for a stable order.
    let mut order = Vec::with_capacity(tables.len());
    let mut done = BTreeSet::new();
    while done.len() < tables.len() {
        let ready: Vec<u32> = tables
            .keys()
            .filter(|oid| !done.contains(*oid))
            .filter(|oid| {
                parents_of
                    .get(*oid)
                    .is_none_or(|parents| parents.iter().all(|p| done.contains(p)))
            })
            .copied()
            .collect();
        if ready.is_empty() {
            let stuck: Vec<String> = tables
                .iter()
                .filter(|(oid, _)| !done.contains(*oid))
                .map(|(_, t)| t.name.clone())
                .collect();
            return Err(MoveError::ForeignKeyCycle { tables: stuck });
        }
        for oid in ready {
            done.insert(oid);
            order.push(tables[&oid].clone());
        }
    }
    Ok(order)
}
