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
             GRANT SELECT ON shard_router_identity TO PUBLIC; \
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

/// What a publish will write to the shard databases once its version is in:
/// identities for databases that have none, and (with `--reassign`) rewritten
/// ones. Checked first, written after the map row is stored, so a publish
/// refused later changes no shard.
pub(crate) struct IdentityPlan<'a> {
    to_write: Vec<(&'a Shard, bool)>,
    /// What the operator should know: shards whose identity was not checked.
    pub(crate) warnings: Vec<String>,
}

/// Checks every shard of `new` against the identities its databases carry
/// and, for a shard whose `url` or `admin_url` changed, against the database
/// it had under `old`:
///
/// - a database that is another shard's is refused; with `reassign` only
///   when that shard is no longer in `new` (a live shard's database is never
///   taken), and two shards of `new` never share one database, identity or
///   not;
/// - `admin_url`, when set, must reach the database `url` does (routers use
///   `url`; moves and these checks, `admin_url`), and neither may be a
///   standby;
/// - a changed shard must reach, through its new `url`, the same database as
///   through its old one (an advisory lock held in a transaction through the
///   old URL blocks it through the new one), whatever the identities say: a
///   restored copy carries the same UUID but not the rows written since.
///   Another database is refused, unless `reassign`, which then compares the
///   rows of the tenants `new` routes to the shard, and is refused for a
///   shard a move of `new` goes from or to;
/// - when the old or the new database of a changed shard cannot be reached,
///   nothing can be compared: refused unless `reassign`, which warns.
///
/// An unchanged shard whose database cannot be reached is passed over with a
/// warning: the other checks of a publish say what that means for them.
pub(crate) async fn check<'a>(
    old: Option<&ShardMap>,
    new: &'a ShardMap,
    reassign_allowed: bool,
) -> Result<IdentityPlan<'a>, IdentityProblem> {
    let mut plan = IdentityPlan {
        to_write: Vec::new(),
        warnings: Vec::new(),
    };
    // Admin connections of the shards whose database has no identity yet:
    // checked below for two shards on one database.
    let mut unnamed: Vec<(&Shard, Client)> = Vec::new();
    for shard in new.shards() {
        let problem = |reason: String| IdentityProblem {
            shard: shard.name().to_owned(),
            reason,
        };
        let before = old
            .and_then(|old| old.shard_index(shard.name()).map(|i| old.shard(i)))
            .filter(|before| {
                before.url() != shard.url() || before.admin_url() != shard.admin_url()
            });
        // What cannot be reached or read: passed over for an unchanged shard,
        // refused for a changed one unless the operator reassigns it.
        let mut unverifiable = |e: String| -> Result<(), IdentityProblem> {
            if before.is_some() && !reassign_allowed {
                return Err(problem(format!(
                    "its url changed and {e}: nothing can be compared (if the database at the \
                     new url holds the shard's data, publish with --reassign)"
                )));
            }
            plan.warnings.push(format!(
                "shard {}: {e}; its identity was not checked{}",
                shard.name(),
                if before.is_some() {
                    " and its rows were not compared (--reassign)"
                } else {
                    ""
                }
            ));
            Ok(())
        };
        let (client, found) = match open(shard).await {
            Ok(opened) => opened,
            Err(e) => {
                unverifiable(format!("its database cannot be reached or read ({e})"))?;
                continue;
            }
        };
        let routed = if shard.admin_url().is_some() {
            match shard.connect_url().await {
                Ok(routed) => Some(routed),
                Err(e) => {
                    unverifiable(format!("its url cannot be reached ({e})"))?;
                    continue;
                }
            }
        } else {
            None
        };
        let routed_client = routed.as_ref().unwrap_or(&client);
        if routed.is_some()
            && !same_database(&client, routed_client).await.map_err(|e| {
                problem(format!(
                    "cannot tell whether its admin_url and url reach one database: {e}"
                ))
            })?
        {
            return Err(problem(
                "its admin_url and its url reach two different databases: routers would use \
                 one, moves and checks the other"
                    .to_owned(),
            ));
        }
        let standby: bool = routed_client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(|e| problem(crate::pg::error_text(&e)))?
            .get(0);
        if standby {
            return Err(problem(
                "the database at its url is a standby (in recovery): every write would fail"
                    .to_owned(),
            ));
        }
        if let Some(found) = found.as_ref().filter(|f| f.shard != shard.name()) {
            let live = new.shard_index(&found.shard).is_some();
            if live || !reassign_allowed {
                return Err(problem(format!(
                    "the database at its url is shard {}'s (its shard_router_identity says so): \
                     two shard names would share one database{}",
                    found.shard,
                    if live {
                        ", and --reassign does not take a database from a shard the map still has"
                    } else {
                        ""
                    }
                )));
            }
        }
        if let Some(before) = before {
            let moved = match before.connect_url().await {
                Err(e) => {
                    unverifiable(format!("the database it had cannot be reached ({e})"))?;
                    false
                }
                Ok(old_client) => {
                    !same_database(&old_client, routed_client)
                        .await
                        .map_err(|e| {
                            problem(format!(
                                "cannot tell whether its new url reaches the database it had: {e}"
                            ))
                        })?
                }
            };
            if moved && !reassign_allowed {
                return Err(problem(
                    "its new url points at another database than the one it had (a copy, even \
                     with the same identity, lacks what was written since it was made)"
                        .to_owned(),
                ));
            }
            if moved {
                let index = new.shard_index(shard.name());
                if let Some((tenant, _)) = new
                    .moves()
                    .into_iter()
                    .find(|(_, m)| Some(m.from) == index || Some(m.to) == index)
                {
                    return Err(problem(format!(
                        "tenant {tenant} is moving from or to it: --reassign waits until the \
                         move completes or is aborted"
                    )));
                }
                let old_column = old.map_or(new.tenant_column(), |m| m.tenant_column());
                rows_left_behind(before, old_column, shard, new)
                    .await
                    .map_err(problem)?;
            }
        }
        let mismatched = found.as_ref().is_some_and(|f| f.shard != shard.name());
        if found.is_none() || mismatched {
            plan.to_write.push((shard, mismatched));
        }
        if found.is_none() {
            unnamed.push((shard, client));
        }
    }
    if let Some((a, b)) = sharing(&unnamed).await.map_err(|e| IdentityProblem {
        shard: unnamed[0].0.name().to_owned(),
        reason: format!("cannot tell whether two shards share a database: {e}"),
    })? {
        return Err(IdentityProblem {
            shard: b.to_owned(),
            reason: format!(
                "it reaches the same database as shard {a}: two shard names would share one \
                 database"
            ),
        });
    }
    Ok(plan)
}

/// Two of `shards` whose connections reach one database, if any: each holds
/// an exclusive transaction-level advisory lock on a key of its own, then
/// tries a shared lock on every other key (shared locks do not conflict with
/// each other, so one try cannot spoil another).
async fn sharing<'s>(
    shards: &'s [(&Shard, Client)],
) -> Result<Option<(&'s str, &'s str)>, tokio_postgres::Error> {
    if shards.len() < 2 {
        return Ok(None);
    }
    let base = random_key();
    let keys: Vec<i64> = (0..shards.len() as i64)
        .map(|i| base.wrapping_add(i))
        .collect();
    for ((_, client), key) in shards.iter().zip(&keys) {
        client
            .batch_execute(&format!("BEGIN; SELECT pg_advisory_xact_lock({key})"))
            .await?;
    }
    let mut found = None;
    for (i, (shard, client)) in shards.iter().enumerate() {
        let blocked: Vec<i64> = client
            .query(
                "SELECT k FROM unnest($1::bigint[]) k WHERE NOT pg_try_advisory_xact_lock_shared(k)",
                &[&keys],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if let Some(j) = blocked
            .iter()
            .find_map(|k| keys.iter().position(|x| x == k))
            .filter(|j| *j != i)
        {
            found = Some((shards[j].0.name(), shard.name()));
            break;
        }
    }
    for (_, client) in shards {
        client.batch_execute("ROLLBACK").await?;
    }
    Ok(found)
}

/// A fresh advisory-lock key for one check.
fn random_key() -> i64 {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    crate::hash::sip13(
        format!("shard-router:same-database:{nonce}:{}", std::process::id()).as_bytes(),
    ) as i64
}

impl IdentityPlan<'_> {
    /// Gives every database that has none the identity of its shard, where
    /// the role may create the table (otherwise `shardctl migrate` does), and
    /// rewrites the reassigned ones. Run once the version is stored; what
    /// could not be written comes back as warnings.
    pub(crate) async fn write(self) -> Vec<String> {
        let mut warnings = Vec::new();
        for (shard, overwrite) in self.to_write {
            let written = async {
                let client = shard.connect_admin().await?;
                if overwrite {
                    reassign(&client, shard.name()).await
                } else {
                    let has = ensure(&client, shard.name()).await?;
                    if has.shard != shard.name() {
                        // Written by another shard of this publish, or in
                        // between: the database is that shard's.
                        return Err(ShardError::database(
                            shard.name(),
                            format!("the database took shard {}'s identity first", has.shard),
                        ));
                    }
                    Ok(())
                }
            }
            .await;
            match written {
                Ok(()) => {}
                Err(e) if overwrite => warnings.push(format!(
                    "shard {}: its identity could not be rewritten ({e}): routers refuse its \
                     database until it is; publish the map again, as a version above this one, \
                     with --reassign",
                    shard.name()
                )),
                // A role that may not create tables (the router's, say): the
                // identity comes with the next `shardctl migrate` instead.
                Err(e) => warnings.push(format!(
                    "shard {}: its identity could not be written ({e}); `shardctl migrate` writes it",
                    shard.name()
                )),
            }
        }
        warnings
    }
}

/// Whether two connections reach one database: an advisory lock held in a
/// transaction through `a` (which keeps a pooler in transaction mode on one
/// server connection) cannot be taken through `b` if so (advisory locks are
/// per database).
async fn same_database(a: &Client, b: &Client) -> Result<bool, tokio_postgres::Error> {
    let key = random_key();
    a.batch_execute(&format!("BEGIN; SELECT pg_advisory_xact_lock({key})"))
        .await?;
    let taken = b
        .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&key])
        .await
        .map(|r| r.get::<_, bool>(0));
    a.batch_execute("ROLLBACK").await?;
    Ok(!taken?)
}

/// `--reassign` points `shard` at a database other than the one `before`
/// reached: the rows there of every tenant `new` routes to the shard must be
/// in the new database too, table by table (at least as many), or the
/// reassignment would leave them behind where no router looks. Counts every
/// row of both: an explicit, rare step, and a count (stop the shard's writes
/// first: routers write to the old database until they apply the new map).
async fn rows_left_behind(
    before: &Shard,
    old_column: &str,
    shard: &Shard,
    new: &ShardMap,
) -> Result<(), String> {
    let column = new.tenant_column();
    // Only the tenants the new map routes here: rows of tenants that moved
    // away (a move completed without purge) are a stale copy either way.
    let served_here = |tenant: &str| {
        crate::TenantId::new(tenant).is_ok_and(|id| {
            let id = new.tenant_id(id);
            new.shard(new.locate(&id).shard).name() == shard.name()
        })
    };
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
        .filter(|((_, tenant), _)| served_here(tenant))
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

/// An administrative connection to `shard` and its database's identity.
async fn open(shard: &Shard) -> Result<(Client, Option<Identity>), String> {
    let client = shard.connect_admin().await.map_err(|e| e.to_string())?;
    let found = read(&client).await.map_err(|e| crate::pg::error_text(&e))?;
    Ok((client, found))
}
