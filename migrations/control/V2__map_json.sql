-- The map as JSON, written by the publisher next to the TOML: routers parse
-- JSON about 3x faster than TOML, which matters for maps with many pins.
ALTER TABLE shard_router_maps ADD COLUMN map_json text;
