-- Load rows are their login's, as router rows are (V7): a router login can
-- neither change nor delete another router's report, nor block it with a row
-- under its key (the login is part of the key), and the load queries count a
-- report only when the live router row with its instance id is of the same
-- login.
--
-- Rows from before: V7 gave the router rows that existed then the migrating
-- login, under which a router with a login of its own can no longer see (and
-- so update) its row; load rows would get it here. Both go: every router
-- writes its row again at its next heartbeat, and its load at its next
-- report.
DELETE FROM shard_router_routers WHERE login = session_user;
DELETE FROM shard_router_tenant_load;
DELETE FROM shard_router_shard_load;
ALTER TABLE shard_router_tenant_load ADD COLUMN login name NOT NULL DEFAULT session_user;
ALTER TABLE shard_router_tenant_load DROP CONSTRAINT shard_router_tenant_load_pkey;
ALTER TABLE shard_router_tenant_load ADD PRIMARY KEY (instance_id, login, window_s, shard, tenant);
ALTER TABLE shard_router_shard_load ADD COLUMN login name NOT NULL DEFAULT session_user;
ALTER TABLE shard_router_shard_load DROP CONSTRAINT shard_router_shard_load_pkey;
ALTER TABLE shard_router_shard_load ADD PRIMARY KEY (instance_id, login, shard);

DO $own$
DECLARE
    t text;
BEGIN
    -- Where V7 set up the roles here (it needs CREATEROLE; otherwise the
    -- owner grants by hand, row-level security included).
    IF NOT (SELECT relrowsecurity FROM pg_class WHERE oid = 'shard_router_routers'::regclass)
       OR NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'shard_router_router') THEN
        RETURN;
    END IF;
    FOREACH t IN ARRAY ARRAY['shard_router_tenant_load', 'shard_router_shard_load'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY %I ON %I TO shard_router_router USING (login = session_user) WITH CHECK (login = session_user)', t || '_own', t);
        EXECUTE format('CREATE POLICY %I ON %I TO shard_router_publisher, shard_router_mover USING (true)', t || '_operators', t);
    END LOOP;
END $own$;
