//! What a move installs on both shards: the fence, the row-image capture and
//! the function that applies row images.
//!
//! * **Fence.** A table `shard_router_fence (tenant, min_version, moving)` and a
//!   row trigger on every tenant table. A write transaction declares its map
//!   version in the transaction-local setting `shard_router.map_version`, bound
//!   to its transaction (see [`crate::db`]); a write to a fenced tenant that
//!   declares no version, an older one, or one set by an earlier transaction
//!   fails with SQLSTATE `SRF01`. The trigger is `ENABLE ALWAYS`, so it also
//!   guards row images applied in replica mode. `TRUNCATE` of a tenant table is
//!   refused while any tenant of the shard is moving. Tenants without a fence
//!   row are not affected.
//! * **Capture.** An `AFTER` row trigger, active only in transactions that set
//!   `shard_router.capture` to the tenant being written, records each changed
//!   row's final image (after defaults, identity, and every `BEFORE` trigger) in
//!   the unlogged table `shard_router_capture`. A row of any other tenant
//!   touched by such a transaction is refused.
//! * **Write chain.** `shard_router_write_chain (tenant, writes)`: every
//!   moving write appends one token to its tenant's row (`md5(writes ||
//!   token)`, through the `SECURITY DEFINER` function
//!   `shard_router_append_write`, so the writing role needs no right on the
//!   table) on both shards, each in its own shard's transaction, in the order
//!   the tenant lock gives them. Equal chains mean the same writes committed
//!   on both sides; a COMMIT that landed on one shard only leaves them
//!   different for good. Verify resets both under the tenant lock before its
//!   first key range and compares them after its last (the model's
//!   `VerifyChains`); complete compares them under the lock once no moving
//!   write is left. A table of its own keeps the fence row, which every
//!   write's trigger reads, free of the updates.
//! * **New tables.** An event trigger gives a tenant table created while a
//!   tenant of the shard is moving, by any tool, the fence, truncate and
//!   capture triggers in its own DDL transaction.
//! * **Snapshots older than a fence.** Every raise records its transaction id
//!   in the sequence `shard_router_fence_xid` (read outside any snapshot); the
//!   fence trigger refuses a `REPEATABLE READ` or `SERIALIZABLE` write whose
//!   snapshot does not include that transaction (SQLSTATE `40001`).
//! * **Apply** (in the writer, `crate::db::apply`): the images are replayed on
//!   the other shard in order, by primary key, in replica mode, so foreign keys
//!   whose parents are not copied yet, triggers and defaults on that shard
//!   cannot change or refuse the rows.

use tokio_postgres::Client;

use super::catalog::TenantTable;
use super::MoveError;
use crate::db::{FENCE_SQLSTATE, VERSION_SETTING};

/// The transaction-local setting that turns capture on for one tenant.
pub(crate) const CAPTURE_SETTING: &str = "shard_router.capture";

/// Installs (or refreshes) the fence, capture and apply objects and the
/// triggers on `tables`. Idempotent, and without table DDL where the triggers
/// are in place already. `column` is the map's validated tenant column, quoted
/// here as an identifier.
///
/// Trigger DDL needs a lock that waits for every open write on the table and
/// holds later writes back while it waits, so each table's DDL runs in its own
/// transaction with a 50 ms `lock_timeout`, retried until `wait`: no writer of
/// another tenant waits behind it for longer than that.
pub(crate) async fn install(
    client: &Client,
    column: &str,
    tables: &[TenantTable],
    wait: std::time::Duration,
) -> Result<(), MoveError> {
    let col = quote_ident(column);
    // Function bodies name the move's objects with the schema they are
    // installed in: they run under the writer's search_path, whatever it is.
    let schema: String = client
        .query_one("SELECT quote_ident(current_schema())", &[])
        .await
        .map_err(MoveError::db)?
        .get(0);
    let column_literal = format!("'{}'", column.replace('\'', "''"));
    let functions = String::from(
        "CREATE TABLE IF NOT EXISTS shard_router_fence (\n\
           tenant text PRIMARY KEY,\n\
           min_version bigint NOT NULL,\n\
           moving boolean NOT NULL DEFAULT true\n\
         );\n\
         DO $d$ BEGIN\n\
           IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'shard_router_fence'::regclass\n\
                          AND attname = 'moving' AND NOT attisdropped) THEN\n\
             ALTER TABLE shard_router_fence ADD COLUMN moving boolean NOT NULL DEFAULT true;\n\
           END IF;\n\
         END $d$;\n\
         CREATE UNLOGGED TABLE IF NOT EXISTS shard_router_capture (\n\
           xid xid8 NOT NULL DEFAULT pg_current_xact_id(),\n\
           seq bigserial,\n\
           tbl regclass NOT NULL,\n\
           op \"char\" NOT NULL,\n\
           old jsonb,\n\
           new jsonb\n\
         );\n\
         CREATE INDEX IF NOT EXISTS shard_router_capture_xid ON shard_router_capture (xid, seq);\n\
         CREATE SEQUENCE IF NOT EXISTS shard_router_fence_xid;\n\
         GRANT SELECT ON SEQUENCE shard_router_fence_xid TO PUBLIC;\n\
         SELECT setval('shard_router_fence_xid', 1, false) FROM shard_router_fence_xid\n\
           WHERE last_value > pg_current_xact_id()::text::bigint;\n\
         CREATE TABLE IF NOT EXISTS shard_router_write_chain (\n\
           tenant text PRIMARY KEY,\n\
           writes text NOT NULL DEFAULT ''\n\
         );\n"
    );
    let definitions = format!(
        "{functions}\
CREATE OR REPLACE FUNCTION shard_router_fence_check() RETURNS trigger LANGUAGE plpgsql AS $f$\n\
         DECLARE\n\
           t text;\n\
           fenced bigint;\n\
           declared text := current_setting('{VERSION_SETTING}', true);\n\
           version text := split_part(coalesce(declared, ''), '@', 1);\n\
           bound text := split_part(coalesce(declared, ''), '@', 2);\n\
           raised bigint;\n\
         BEGIN\n\
           IF current_setting('transaction_isolation') <> 'read committed' THEN\n\
             SELECT last_value INTO raised FROM {schema}.shard_router_fence_xid;\n\
             IF NOT pg_visible_in_snapshot(raised::text::xid8, pg_current_snapshot()) THEN\n\
               RAISE EXCEPTION USING ERRCODE = '40001',\n\
                 MESSAGE = format('shard-router fence: a tenant fence on this shard was raised after this %s transaction took its snapshot, so the fence it sees may be stale; retry the transaction', current_setting('transaction_isolation')),\n\
                 HINT = 'write through TenantDb::write, or retry on serialization failures as REPEATABLE READ and SERIALIZABLE transactions must';\n\
             END IF;\n\
           END IF;\n\
           IF TG_OP = 'DELETE' THEN t := OLD.{col}; ELSE t := NEW.{col}; END IF;\n\
           SELECT min_version INTO fenced FROM {schema}.shard_router_fence WHERE tenant = t;\n\
           IF fenced IS NULL AND TG_OP = 'UPDATE' AND OLD.{col} IS DISTINCT FROM t THEN\n\
             t := OLD.{col};\n\
             SELECT min_version INTO fenced FROM {schema}.shard_router_fence WHERE tenant = t;\n\
           END IF;\n\
           IF fenced IS NOT NULL AND (version = '' OR version::bigint < fenced\n\
                                      OR bound IS DISTINCT FROM {schema}.shard_router_tx_bound()) THEN\n\
             RAISE EXCEPTION USING ERRCODE = '{FENCE_SQLSTATE}',\n\
               MESSAGE = format('shard-router fence: writes for tenant %s need map version %s or later, declared by the writing transaction; this transaction declared %s',\n\
                                t, fenced, coalesce(nullif(declared, ''), 'none')),\n\
               HINT = 'the router writing is on an old shard map, or wrote outside TenantDb::write; it must apply the newest map';\n\
           END IF;\n\
           IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;\n\
           RETURN NEW;\n\
         END $f$;\n\
         CREATE OR REPLACE FUNCTION shard_router_truncate_check() RETURNS trigger LANGUAGE plpgsql AS $f$\n\
         DECLARE moving text;\n\
         BEGIN\n\
           SELECT string_agg(tenant, ', ') INTO moving FROM {schema}.shard_router_fence f WHERE f.moving;\n\
           IF moving IS NOT NULL THEN\n\
             RAISE EXCEPTION USING ERRCODE = '{FENCE_SQLSTATE}',\n\
               MESSAGE = format('shard-router fence: TRUNCATE of %s is refused while tenants are moving: %s', TG_TABLE_NAME, moving);\n\
           END IF;\n\
           RETURN NULL;\n\
         END $f$;\n\
         CREATE OR REPLACE FUNCTION shard_router_capture_row() RETURNS trigger LANGUAGE plpgsql AS $f$\n\
         DECLARE\n\
           want text := current_setting('{CAPTURE_SETTING}', true);\n\
         BEGIN\n\
           IF (TG_OP <> 'INSERT' AND OLD.{col} IS DISTINCT FROM want)\n\
              OR (TG_OP <> 'DELETE' AND NEW.{col} IS DISTINCT FROM want) THEN\n\
             RAISE EXCEPTION USING ERRCODE = '{FENCE_SQLSTATE}',\n\
               MESSAGE = format('shard-router: a write of moving tenant %s touched a row of another tenant in %s', want, TG_TABLE_NAME);\n\
           END IF;\n\
           INSERT INTO {schema}.shard_router_capture (tbl, op, old, new)\n\
           VALUES (TG_RELID, left(TG_OP, 1),\n\
                   CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END,\n\
                   CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END);\n\
           RETURN NULL;\n\
         END $f$;\n\
         {BOUND_FUNCTION}\n\
         CREATE OR REPLACE FUNCTION shard_router_append_write(t text, token text) RETURNS void\n\
           LANGUAGE sql SECURITY DEFINER SET search_path = {schema}, pg_temp AS $f$\n\
           UPDATE {schema}.shard_router_write_chain SET writes = md5(writes || token) WHERE tenant = t $f$;\n\
         CREATE OR REPLACE FUNCTION shard_router_cover_new_tables() RETURNS event_trigger\n\
           LANGUAGE plpgsql SET search_path = {schema}, pg_temp AS $f$\n\
         DECLARE r record;\n\
         BEGIN\n\
           IF NOT EXISTS (SELECT 1 FROM {schema}.shard_router_fence WHERE moving) THEN RETURN; END IF;\n\
           FOR r IN SELECT DISTINCT c.oid::regclass AS tbl FROM pg_event_trigger_ddl_commands() d\n\
                    JOIN pg_class c ON c.oid = d.objid\n\
                    WHERE d.classid = 'pg_class'::regclass AND c.relkind IN ('r', 'p')\n\
                      AND c.relpersistence <> 't' AND NOT c.relispartition\n\
                      AND c.relname NOT LIKE 'shard\\_router\\_%'\n\
                      AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid\n\
                                  AND a.attname = {column_literal} AND NOT a.attisdropped)\n\
                      AND NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid\n\
                                      AND t.tgname = 'shard_router_fence')\n\
           LOOP\n\
             EXECUTE format('CREATE TRIGGER shard_router_fence BEFORE INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW EXECUTE FUNCTION {schema}.shard_router_fence_check(); ALTER TABLE %s ENABLE ALWAYS TRIGGER shard_router_fence; CREATE OR REPLACE TRIGGER shard_router_truncate BEFORE TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION {schema}.shard_router_truncate_check(); ALTER TABLE %s ENABLE ALWAYS TRIGGER shard_router_truncate; CREATE OR REPLACE TRIGGER zz_shard_router_capture AFTER INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW WHEN (coalesce(current_setting(%L, true), %L) <> %L) EXECUTE FUNCTION {schema}.shard_router_capture_row()',\n\
                            r.tbl, r.tbl, r.tbl, r.tbl, r.tbl, '{CAPTURE_SETTING}', '', '');\n\
           END LOOP;\n\
         END $f$;\n"
    );
    // Definitions only: no lock on any tenant table. One installer at a time
    // per shard (two moves of different tenants may start together).
    let key = crate::pg::lock_keys::fence_install();
    retry_with_lock_timeout(
        client,
        &format!("BEGIN; SELECT pg_advisory_xact_lock({key}); {definitions} COMMIT"),
        wait,
    )
    .await?;
    cover_new_tables(client).await?;
    for table in tables {
        let name = &table.name;
        let present: Vec<(String, i8)> = client
            .query(
                "SELECT tgname::text, tgenabled::\"char\"::text::\"char\" FROM pg_trigger \
                 WHERE tgrelid = $1::text::regclass AND NOT tgisinternal",
                &[name],
            )
            .await
            .map_err(MoveError::db)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let has = |trigger: &str, always: bool| {
            present
                .iter()
                .any(|(n, e)| n == trigger && (!always || *e == b'A' as i8))
        };
        let mut ddl = String::new();
        if !has("shard_router_fence", true) {
            ddl += &format!(
                "CREATE OR REPLACE TRIGGER shard_router_fence BEFORE INSERT OR UPDATE OR DELETE ON {name} \
                 FOR EACH ROW EXECUTE FUNCTION {schema}.shard_router_fence_check(); \
                 ALTER TABLE {name} ENABLE ALWAYS TRIGGER shard_router_fence; "
            );
        }
        if !has("shard_router_truncate", true) {
            ddl += &format!(
                "CREATE OR REPLACE TRIGGER shard_router_truncate BEFORE TRUNCATE ON {name} \
                 FOR EACH STATEMENT EXECUTE FUNCTION {schema}.shard_router_truncate_check(); \
                 ALTER TABLE {name} ENABLE ALWAYS TRIGGER shard_router_truncate; "
            );
        }
        if !has("zz_shard_router_capture", false) {
            ddl += &format!(
                "CREATE OR REPLACE TRIGGER zz_shard_router_capture AFTER INSERT OR UPDATE OR DELETE ON {name} \
                 FOR EACH ROW WHEN (coalesce(current_setting('{CAPTURE_SETTING}', true), '') <> '') \
                 EXECUTE FUNCTION {schema}.shard_router_capture_row(); "
            );
        }
        if !ddl.is_empty() {
            retry_with_lock_timeout(
                client,
                &format!("BEGIN; SET LOCAL lock_timeout = '50ms'; {ddl} COMMIT"),
                wait,
            )
            .await?;
        }
    }
    Ok(())
}

/// Creates the event trigger that gives every tenant table created while a
/// tenant of the shard is moving, by any tool, the fence, truncate and
/// capture triggers in the DDL's own transaction (`CREATE TABLE`, `ALTER
/// TABLE ... ADD COLUMN` of the tenant column, `CREATE TABLE AS`). Event
/// triggers need a superuser; without one this logs a warning, and tenant
/// tables must be created before a move starts or after it ends.
async fn cover_new_tables(client: &Client) -> Result<(), MoveError> {
    let sql = "DO $d$ BEGIN \
         IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'shard_router_cover_new_tables') THEN \
           CREATE EVENT TRIGGER shard_router_cover_new_tables ON ddl_command_end \
             WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE', 'CREATE TABLE AS', 'SELECT INTO') \
             EXECUTE FUNCTION shard_router_cover_new_tables(); \
         END IF; END $d$";
    match client.batch_execute(sql).await {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            tracing::warn!(
                "the move's role cannot create event triggers (a superuser can): a tenant table \
                 created during a move gets no fence or capture trigger, and writes to it would \
                 reach one shard only; create tenant tables before a move or after it"
            );
            Ok(())
        }
        Err(e) => Err(MoveError::db(e)),
    }
}

/// Runs `sql` (a whole transaction), retrying while it fails on a lock
/// timeout or a deadlock, for at most `wait`.
async fn retry_with_lock_timeout(
    client: &Client,
    sql: &str,
    wait: std::time::Duration,
) -> Result<(), MoveError> {
    use tokio_postgres::error::SqlState;
    let started = std::time::Instant::now();
    loop {
        match client.batch_execute(sql).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                let retry = matches!(
                    e.code(),
                    Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE || *c == SqlState::T_R_DEADLOCK_DETECTED
                );
                if !retry || started.elapsed() >= wait {
                    return Err(MoveError::db(e));
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}

/// Binds a declared version to its transaction: a session-wide `SET` of the
/// version setting, left over from an earlier transaction, no longer matches.
const BOUND_FUNCTION: &str = "CREATE OR REPLACE FUNCTION shard_router_tx_bound() RETURNS text \
    LANGUAGE sql STABLE AS $f$ SELECT extract(epoch FROM now())::text $f$;";

/// Raises the tenant's fence to `version` (never lowers it) and marks it moving.
pub(crate) async fn raise(client: &Client, tenant: &str, version: u64) -> Result<(), MoveError> {
    claimed(client, |tx| async move {
        // A REPEATABLE READ or SERIALIZABLE transaction whose snapshot is
        // older than this one cannot see the row: the fence trigger refuses
        // its writes (40001) while this transaction is not in its snapshot.
        // One raise at a time per shard: the sequence holds the last raise
        // only, so a snapshot that holds it must hold every earlier one.
        tx.execute(
            "SELECT pg_advisory_xact_lock($1), \
                    setval('shard_router_fence_xid', pg_current_xact_id()::text::bigint)",
            &[&crate::pg::lock_keys::fence_install()],
        )
        .await?;
        tx.execute(
            "INSERT INTO shard_router_fence (tenant, min_version, moving) VALUES ($1, $2, true) \
             ON CONFLICT (tenant) DO UPDATE \
             SET min_version = greatest(shard_router_fence.min_version, EXCLUDED.min_version), moving = true",
            &[&tenant, &(version as i64)],
        )
        .await
        .map(|_| ())
    })
    .await
}

/// After a move ends: the shard that keeps the tenant drops its fence row (its
/// writers no longer need to declare a version), the shard that lost it keeps
/// the row, no longer marked moving, so routers on old maps stay refused there.
pub(crate) async fn settle(owner: &Client, former: &Client, tenant: &str) -> Result<(), MoveError> {
    claimed(former, |tx| async move {
        tx.execute(
            "UPDATE shard_router_fence SET moving = false WHERE tenant = $1",
            &[&tenant],
        )
        .await
        .map(|_| ())
    })
    .await?;
    claimed(owner, |tx| async move {
        tx.execute(
            "DELETE FROM shard_router_fence WHERE tenant = $1",
            &[&tenant],
        )
        .await
        .map(|_| ())
    })
    .await
}

/// Runs `step` in a transaction that first checks the mover's claim on the
/// shard (see [`super::claim`]).
async fn claimed<'c, F, Fut>(client: &'c Client, step: F) -> Result<(), MoveError>
where
    F: FnOnce(&'c Client) -> Fut,
    Fut: std::future::Future<Output = Result<(), tokio_postgres::Error>>,
{
    if let Err(e) = client
        .batch_execute(&format!("BEGIN; {}", super::claim::CHECK_SQL))
        .await
    {
        // A failed check leaves the session in an aborted transaction.
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(MoveError::db(e));
    }
    if let Err(e) = step(client).await {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(MoveError::db(e));
    }
    client.batch_execute("COMMIT").await.map_err(MoveError::db)
}

/// A tenant's write chain on one shard (NULL without a row: verify never
/// reset it there).
pub(crate) const READ_CHAIN_SQL: &str =
    "SELECT (SELECT writes FROM shard_router_write_chain WHERE tenant = $1)";

/// Resets a tenant's write chain on one shard (verify, under the tenant lock).
pub(crate) const RESET_CHAIN_SQL: &str =
    "INSERT INTO shard_router_write_chain (tenant, writes) VALUES ($1, '') \
     ON CONFLICT (tenant) DO UPDATE SET writes = ''";

/// The fence row of `tenant` on the shard behind `client`: `(min_version,
/// moving)`, or `None` when it has none (or the shard never had a move).
pub(crate) async fn of(
    client: &Client,
    tenant: &str,
) -> Result<Option<(i64, bool)>, tokio_postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass('shard_router_fence') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(None);
    }
    Ok(client
        .query_opt(
            "SELECT min_version, moving FROM shard_router_fence WHERE tenant = $1",
            &[&tenant],
        )
        .await?
        .map(|r| (r.get(0), r.get(1))))
}

/// Tenants whose move is in flight on the shard behind `client` (empty when the
/// shard never had a move).
pub(crate) async fn moving_tenants(client: &Client) -> Result<Vec<String>, tokio_postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass('shard_router_fence') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT tenant FROM shard_router_fence WHERE moving ORDER BY tenant",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Quotes an identifier as Postgres does (`"..."`, inner quotes doubled).
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::quote_ident;

    #[test]
    fn identifiers_are_always_quoted() {
        assert_eq!(quote_ident("tenant_id"), "\"tenant_id\"");
        assert_eq!(quote_ident("user"), "\"user\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
