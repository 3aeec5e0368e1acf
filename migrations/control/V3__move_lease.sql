-- One mover per tenant: a lease with a fencing token, checked on every record
-- and on every publish of the move's map entry. `intent` is the map change the
-- mover is about to publish, recorded first, so resume and abort know which
-- map may be live after a crash.
ALTER TABLE shard_router_moves
    ADD COLUMN lease_token  bigint      NOT NULL DEFAULT 0,
    ADD COLUMN lease_holder text,
    ADD COLUMN lease_until  timestamptz,
    ADD COLUMN intent       text;
