#!/usr/bin/env bash
# Starts pgbouncer in transaction pooling mode on 127.0.0.1:6432 in front of the
# local Postgres, for configuration D of examples/load_harness.rs.
# Installs Debian's pgbouncer if it is missing. Stop it with: pkill -f sr-pgbouncer
set -euo pipefail
if ! command -v pgbouncer >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null
fi
dir=/tmp/sr-pgbouncer
mkdir -p "$dir"
cat > "$dir/pgbouncer.ini" <<INI
[databases]
* = host=127.0.0.1 port=5432

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = 6432
auth_type = trust
auth_file = $dir/users.txt
pool_mode = transaction
default_pool_size = 16
max_client_conn = 1000
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
INI
echo '"postgres" ""' > "$dir/users.txt"
chown -R postgres "$dir"
pkill -f "pgbouncer.*sr-pgbouncer" 2>/dev/null || true
# pgbouncer refuses to run as root: -u drops to postgres.
pgbouncer -d -u postgres "$dir/pgbouncer.ini"
for _ in $(seq 1 50); do
  pg_isready -h 127.0.0.1 -p 6432 -q && { echo "pgbouncer (transaction pooling) on 127.0.0.1:6432"; exit 0; }
  sleep 0.1
done
echo "pgbouncer did not start; see $dir/pgbouncer.log" >&2
exit 1
