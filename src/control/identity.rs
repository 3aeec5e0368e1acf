//! Which shard a database is: `shard_router_identity` on each shard database
//! holds the shard's name and a UUID, written by `shardctl migrate` and by the
//! first publish that sees the database. A publish refuses a map that points a
//! shard's URL at a database that is another shard, or at another database
//! than the one the shard had, unless the operator says it now holds that
//! shard's data (`reassign`).

use tokio_postgres::Client;

use crate::map::Shard;
use crate::pg::ShardError;
use crate::ShardMap;

/// A database's identity: the shard it belongs to and its UUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    pub(crate) shard: String,
    pub(crate) id: String,
}

const CREATE: &str = "CREATE TABLE IF NOT EXISTS shard_router_identity (\
     singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton), \
     shard text NOT NULL, \
     id uuid NOT NULL DEFAULT gen_random_uuid(), \
     written_at timestamptz NOT NULL DEFAULT now())";

/// The identity of the database behind `client`, if it has one.
pub(crate) async fn read(client: &Client) -> Result<Option<Identity>, tokio_postgres::Error> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('shard_router_identity') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        return Ok(None);
    }
    Ok(client
        .query_opt("SELECT shard, id::text FROM shard_router_identity", &[])
        .await?
        .map(|r| Identity {
            shard: r.get(0),
            id: r.get(1),
        }))
}

/// Gives the database behind `client` the identity of `shard` unless it has
/// one, and returns the identity it has (another shard's, possibly: the
/// caller decides what that means).
pub(crate) async fn ensure(client: &Client, shard: &str) -> Result<Identity, ShardError> {
    write(client, shard, "ON CONFLICT DO NOTHING").await?;
    read(client)
        .await
        .map_err(|e| ShardError::database(shard, e))?
        .ok_or_else(|| ShardError::database(shard, "the identity just written is not there"))
}

/// Creates the identity table if needed and inserts `shard`'s identity, with
/// `on_conflict` deciding about an existing one; one writer at a time per
/// database.
async fn write(client: &Client, shard: &str, on_conflict: &str) -> Result<(), ShardError> {
    let key = crate::pg::lock_keys::identity();
    let written = client
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({key}); {CREATE}; \
             INSERT INTO shard_router_identity (shard) VALUES ({}) {on_conflict}; COMMIT",
            quote_literal(shard)
        ))
        .await;
    if let Err(e) = written {
        // The session goes on (a migration runs on it next).
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(ShardError::database(shard, e));
    }
    Ok(())
}

/// `text` as an SQL string literal (shard names are validated identifiers,
/// quoted all the same).
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Writes `shard`'s name over the database's identity (a reassignment the
/// operator asked for), keeping its UUID.
async fn reassign(client: &Client, shard: &str) -> Result<(), ShardError> {
    write(
        client,
        shard,
        "ON CONFLICT (singleton) DO UPDATE SET shard = EXCLUDED.shard, written_at = now()",
    )
    .await
}

/// Why a map may not point a shard at a database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IdentityProblem {
    pub(crate) shard: String,
    pub(crate) reason: String,
}

/// Checks every shard of `new` against the identities its databases carry
/// (and, for a shard whose URL changed, the one its database had under
/// `old`). Then, unless `dry_run`, gives every database that has none the
/// identity of its shard, where the role may create the table (otherwise
/// `shardctl migrate` does), and with `reassign` rewrites the identity of a
/// database the shard now points at. A database that cannot be reached is
/// passed over here: the other checks of a publish say what it means for them.
pub(crate) async fn check_and_write(
    old: Option<&ShardMap>,
    new: &ShardMap,
    reassign_allowed: bool,
    dry_run: bool,
) -> Result<Vec<String>, IdentityProblem> {
    let mut warnings = Vec::new();
    let mut to_write: Vec<(&Shard, bool)> = Vec::new();
    for shard in new.shards() {
        let Some((client, found)) = open(shard).await else {
            continue;
        };
        drop(client);
        let problem = |reason: String| IdentityProblem {
            shard: shard.name().to_owned(),
            reason,
        };
        if let Some(found) = &found {
            if found.shard != shard.name() && !reassign_allowed {
                return Err(problem(format!(
                    "the database at its url is shard {}'s (its shard_router_identity says so): \
                     two shard names would share one database",
                    found.shard
                )));
            }
        }
        let before = old
            .and_then(|old| old.shard_index(shard.name()).map(|i| old.shard(i)))
            .filter(|before| before.url() != shard.url());
        if let Some(before) = before {
            // `None`: the database it had cannot be reached (or read).
            let had = open(before).await.map(|(_, had)| had);
            let moved_to_another = match (&had, &found) {
                (Some(Some(had)), Some(found)) => had.id != found.id,
                (Some(Some(_)), None) => true,
                _ => false,
            };
            match (&had, &found) {
                (Some(Some(had)), Some(found)) if moved_to_another && !reassign_allowed => {
                    return Err(problem(format!(
                        "its new url points at another database (identity {}) than the one it had \
                         (identity {})",
                        found.id, had.id
                    )));
                }
                (Some(Some(had)), None) if !reassign_allowed => {
                    return Err(problem(format!(
                        "its new url points at a database without an identity, while the one it \
                         had is shard {}'s (identity {})",
                        had.shard, had.id
                    )));
                }
                // Nothing to compare with: only a database that says it is
                // this shard's is taken on its word.
                (None, None) if !reassign_allowed => {
                    return Err(problem(
                        "its url changed, the database it had cannot be reached to compare \
                         identities, and the new one has no identity"
                            .to_owned(),
                    ));
                }
                (None, _) if reassign_allowed => warnings.push(format!(
                    "shard {}: --reassign: the database it had cannot be reached, so its rows \
                     were not compared with the new database's",
                    shard.name()
                )),
                _ => {}
            }
            if moved_to_another && reassign_allowed {
                let old_column = old.map_or(new.tenant_column(), |m| m.tenant_column());
                rows_left_behind(before, old_column, shard, new.tenant_column())
                    .await
                    .map_err(problem)?;
            }
        }
        let mismatched = found.as_ref().is_some_and(|f| f.shard != shard.name());
        if found.is_none() || mismatched {
            to_write.push((shard, mismatched));
        }
    }
    if dry_run {
        return Ok(warnings);
    }
    for (shard, overwrite) in to_write {
        let written = async {
            let client = shard.connect_admin().await?;
            if overwrite {
                reassign(&client, shard.name()).await
            } else {
                ensure(&client, shard.name()).await.map(|_| ())
            }
        }
        .await;
        match written {
            Ok(()) => {}
            // Asked for: it must hold.
            Err(e) if overwrite => {
                return Err(IdentityProblem {
                    shard: shard.name().to_owned(),
                    reason: format!("its identity could not be rewritten: {e}"),
                })
            }
            // A role that may not create tables (the router's, say): the
            // identity comes with the next `shardctl migrate` instead.
            Err(e) => {
                tracing::warn!(shard = shard.name(), error = %e,
                    "publish: the shard's identity could not be written; `shardctl migrate` writes it");
            }
        }
    }
    Ok(warnings)
}

/// `--reassign` points `shard` at a database other than the one `before`
/// reached: every tenant's rows there must be in the new database too, table
/// by table (at least as many), or the reassignment would leave them behind
/// where no router looks. Counts every row of both: an explicit, rare step.
async fn rows_left_behind(
    before: &Shard,
    old_column: &str,
    shard: &Shard,
    column: &str,
) -> Result<(), String> {
    let counted = |which: &str, e: ShardError| {
        format!("--reassign could not count the rows of the database {which}: {e}")
    };
    let had = super::rehoming::row_counts(before, old_column)
        .await
        .map_err(|e| counted("it had", e))?;
    let has = super::rehoming::row_counts(shard, column)
        .await
        .map_err(|e| counted("its url now points at", e))?;
    let short: Vec<String> = had
        .iter()
        .filter_map(|((table, tenant), rows)| {
            let there = has
                .get(&(table.clone(), tenant.clone()))
                .copied()
                .unwrap_or(0);
            (there < *rows).then(|| {
                format!("tenant {tenant}: {rows} row(s) in {table}, {there} in the new database")
            })
        })
        .collect();
    if short.is_empty() {
        return Ok(());
    }
    let more = match short.len() {
        0..=5 => String::new(),
        n => format!("; and {} more", n - 5),
    };
    Err(format!(
        "--reassign would leave rows behind in the database it had ({}{more}): copy them to the \
         new database first, or move those tenants to another shard before re-pointing this one",
        short[..short.len().min(5)].join("; "),
    ))
}

/// An administrative connection to `shard` and its database's identity;
/// `None` when it cannot be reached or read.
async fn open(shard: &Shard) -> Option<(Client, Option<Identity>)> {
    let client = match shard.connect_admin().await {
        Ok(client) => client,
        Err(e) => {
            tracing::warn!(shard = shard.name(), error = %e, "publish: shard unreachable; its identity was not checked");
            return None;
        }
    };
    match read(&client).await {
        Ok(found) => Some((client, found)),
        Err(e) => {
            tracing::warn!(shard = shard.name(), error = %e, "publish: the shard's identity could not be read");
            None
        }
    }
}
