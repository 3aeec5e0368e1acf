-- What each router counted: its most expensive tenants per shard (cumulative
-- since the router started, replaced at every report, a bounded number of
-- rows per router) and each shard's pool as that router sees it.
CREATE TABLE shard_router_tenant_load (
    instance_id  text NOT NULL,
    shard        text NOT NULL,
    tenant       text NOT NULL,
    statements   bigint NOT NULL,
    rows         bigint NOT NULL,
    db_time_us   bigint NOT NULL,
    pool_wait_us bigint NOT NULL,
    errors       bigint NOT NULL,
    reported_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_id, shard, tenant)
);

CREATE TABLE shard_router_shard_load (
    instance_id    text NOT NULL,
    shard          text NOT NULL,
    pool_max       bigint NOT NULL,
    pool_size      bigint NOT NULL,
    pool_available bigint NOT NULL,
    pool_waiting   bigint NOT NULL,
    tenants        bigint NOT NULL,
    statements     bigint NOT NULL,
    db_time_us     bigint NOT NULL,
    reported_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_id, shard)
);
