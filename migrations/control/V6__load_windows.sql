-- Reports also cover recent windows (the last 1, 5, 15 and 60 minutes):
-- window_s says which (0: since the router started).
ALTER TABLE shard_router_tenant_load ADD COLUMN window_s integer NOT NULL DEFAULT 0;
ALTER TABLE shard_router_tenant_load DROP CONSTRAINT shard_router_tenant_load_pkey;
ALTER TABLE shard_router_tenant_load ADD PRIMARY KEY (instance_id, window_s, shard, tenant);
