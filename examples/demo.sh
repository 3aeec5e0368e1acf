#!/usr/bin/env bash
# End to end on local Postgres: create two shard databases, start the notes
# example on shard-map.toml, write and read notes for a few tenants, and show
# which shard each tenant's rows landed on.
set -euo pipefail
cd "$(dirname "$0")/.."
PSQL="psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -qAt"
ADDR=127.0.0.1:${PORT:-3000}

pg_isready -h 127.0.0.1 -q || pg_ctlcluster --skip-systemctl-redirect 15 main start
for db in shard_a shard_b; do
  $PSQL -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1 \
    || $PSQL -d postgres -c "CREATE DATABASE $db"
done

cargo build --release --features cli,chrono --example axum_app --bin shardctl
./target/release/shardctl map validate shard-map.toml
./target/release/shardctl migrate --map shard-map.toml --dir migrations/notes
ADMIN=${ADMIN:-127.0.0.1:9090}
./target/release/examples/axum_app --map shard-map.toml --listen "$ADDR" --admin-listen "$ADMIN" &
APP=$!
trap 'kill $APP 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -s -o /dev/null "http://$ADDR/" && break; sleep 0.1; done

for tenant in acme globex initech umbrella; do
  curl -s -X POST "http://$ADDR/notes" -H "x-tenant-id: $tenant" \
    -H 'content-type: application/json' -d "{\"body\":\"hello from $tenant\"}"
  echo
done
echo "GET /notes as acme:"
curl -s "http://$ADDR/notes" -H 'x-tenant-id: acme'; echo
echo "GET /notes without a tenant:"
curl -s -w ' (HTTP %{http_code})\n' "http://$ADDR/notes"
echo "GET /_router on the admin listener:"
curl -s "http://$ADMIN/_router"; echo

echo
echo "where each tenant lives:"
for tenant in acme globex initech umbrella; do
  printf '  %-9s shardctl says %-2s  rows: shard_a=%s shard_b=%s\n' "$tenant" \
    "$(./target/release/shardctl tenant locate "$tenant" --map shard-map.toml)" \
    "$($PSQL -d shard_a -c "SELECT count(*) FROM notes WHERE tenant_id = '$tenant'")" \
    "$($PSQL -d shard_b -c "SELECT count(*) FROM notes WHERE tenant_id = '$tenant'")"
done
