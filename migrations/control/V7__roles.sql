-- Three roles for the control database, as NOLOGIN group roles: grant one to
-- each login role (`GRANT shard_router_router TO app_router`). Creating them
-- needs CREATEROLE; without it the roles are left out and the owner grants
-- what the security guide lists by hand.
--
--   shard_router_router     a running router: reads maps, writes its own
--                           heartbeat and load rows, records a failed dual
--                           write on a move (error column only)
--   shard_router_publisher  an operator's shardctl: publishes and rolls back
--                           maps, reads everything, forgets stopped routers
--   shard_router_mover      shardctl tenant move / plan --apply: what a
--                           publisher may, plus the move records
-- Which login wrote each router row (row-level security below keys on it).
ALTER TABLE shard_router_routers ADD COLUMN login name NOT NULL DEFAULT session_user;

DO $roles$
DECLARE
    r text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = current_user AND (rolsuper OR rolcreaterole)) THEN
        RAISE NOTICE 'shard-router: % cannot create roles; grant the control tables by hand (see docs/security.md)', current_user;
        RETURN;
    END IF;
    FOREACH r IN ARRAY ARRAY['shard_router_router', 'shard_router_publisher', 'shard_router_mover'] LOOP
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            END IF;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL; -- another control database created it at the same moment
        END;
    END LOOP;
    EXECUTE 'GRANT SELECT ON shard_router_maps TO shard_router_router';
    EXECUTE 'GRANT SELECT, INSERT, UPDATE, DELETE ON shard_router_routers, shard_router_tenant_load, shard_router_shard_load TO shard_router_router';
    -- A router's rows in shard_router_routers are its login's: it cannot
    -- forge, move or delete another router's heartbeat.
    EXECUTE 'ALTER TABLE shard_router_routers ENABLE ROW LEVEL SECURITY';
    EXECUTE 'CREATE POLICY shard_router_routers_own ON shard_router_routers TO shard_router_router USING (login = session_user) WITH CHECK (login = session_user)';
    EXECUTE 'CREATE POLICY shard_router_routers_operators ON shard_router_routers TO shard_router_publisher, shard_router_mover USING (true)';
    EXECUTE 'GRANT SELECT (tenant, phase), UPDATE (error, updated_at) ON shard_router_moves TO shard_router_router';

    EXECUTE 'GRANT SELECT, INSERT ON shard_router_maps TO shard_router_publisher, shard_router_mover';
    EXECUTE 'GRANT SELECT, DELETE ON shard_router_routers TO shard_router_publisher, shard_router_mover';
    EXECUTE 'GRANT SELECT ON shard_router_tenant_load, shard_router_shard_load, shard_router_moves TO shard_router_publisher';
    EXECUTE 'GRANT SELECT ON shard_router_tenant_load, shard_router_shard_load TO shard_router_mover';
    EXECUTE 'GRANT SELECT, INSERT, UPDATE, DELETE ON shard_router_moves TO shard_router_mover';
END $roles$;

-- A router reports the version it applied; publishes go above every live
-- router's (a control database restored from a backup is behind them). A
-- report far above anything published is not a restore but a forgery or a
-- bug, and would push every later publish out of reach: refused. A report
-- cannot claim to be seen in the future, and a lease is at most ten minutes,
-- so a row stops counting soon after its router stops reporting.
CREATE FUNCTION shard_router_routers_check() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    newest bigint := coalesce((SELECT max(version) FROM shard_router_maps), 0);
BEGIN
    IF NEW.applied_version > newest + 1000000 THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation',
            MESSAGE = format('router %s reports map version %s, more than 1000000 above the newest published version %s', NEW.instance_id, NEW.applied_version, newest);
    END IF;
    NEW.last_seen := least(NEW.last_seen, clock_timestamp());
    NEW.started_at := least(NEW.started_at, clock_timestamp());
    NEW.lease_ms := least(NEW.lease_ms, 600000);
    RETURN NEW;
END $$;
CREATE TRIGGER shard_router_routers_check BEFORE INSERT OR UPDATE ON shard_router_routers
    FOR EACH ROW EXECUTE FUNCTION shard_router_routers_check();
