-- Which map a router serves, by content as well as number: a control database
-- restored from a backup can hold a different map under the same version.
ALTER TABLE shard_router_routers ADD COLUMN applied_checksum text;
