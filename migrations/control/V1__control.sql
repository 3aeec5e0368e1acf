-- shard-router control plane (applied by `shardctl control init --control URL`).

-- Every published shard map. Versions only go forward.
CREATE TABLE shard_router_maps (
    version    bigint      PRIMARY KEY CHECK (version > 0),
    map        text        NOT NULL,  -- the TOML as published (secrets come from each router's environment)
    checksum   text        NOT NULL,  -- SipHash-1-3 (keys 0) of the TOML, hex
    note       text,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Publishing a version tells every listening router at once.
CREATE FUNCTION shard_router_notify_map() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('shard_router_maps', NEW.version::text);
    RETURN NEW;
END $$;
CREATE TRIGGER shard_router_maps_notify AFTER INSERT ON shard_router_maps
    FOR EACH ROW EXECUTE FUNCTION shard_router_notify_map();

-- One row per running router, refreshed by its heartbeat.
CREATE TABLE shard_router_routers (
    instance_id     text        PRIMARY KEY,
    host            text        NOT NULL,
    applied_version bigint      NOT NULL,
    started_at      timestamptz NOT NULL,
    last_seen       timestamptz NOT NULL,
    lease_ms        bigint      NOT NULL CHECK (lease_ms > 0)  -- past last_seen + lease, the router counts as stopped
);

-- Tenant moves: one row per move, its phase and progress (used by tenant moves).
CREATE TABLE shard_router_moves (
    tenant     text        PRIMARY KEY,
    from_shard text        NOT NULL,
    to_shard   text        NOT NULL,
    phase      text        NOT NULL,
    state      jsonb       NOT NULL DEFAULT '{}',
    error      text,
    started_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
