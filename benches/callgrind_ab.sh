#!/usr/bin/env bash
# Instructions per request, the example (A) against the plain deadpool app
# (B, the load harness's baseline), counted by valgrind's callgrind: the same
# figure every run for the same binaries and requests, whatever else the
# machine does (CPU seconds from /proc are not, on two shared cores).
#
#   bash benches/callgrind_ab.sh [REQUESTS]      # default 4000 per workload
#   CACHE_SIM=1 bash benches/callgrind_ab.sh     # also simulated L1 misses per request
#   A_ARGS=--around-router bash benches/callgrind_ab.sh   # more arguments for A
#
# Counts the server process only (both send the same statements to Postgres;
# the script checks that with log_statement). Needs valgrind and python3.
set -euo pipefail
requests=${1:-4000}
cd "$(dirname "$0")/.."
cargo build -q --release --features chrono --example axum_app --example load_harness
db=srl_callgrind_$$
psql=(psql -h 127.0.0.1 -U postgres -qAt)
"${psql[@]}" -c "CREATE DATABASE $db"
trap '"${psql[@]}" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null; rm -rf "$dir"' EXIT
dir=$(mktemp -d)
"${psql[@]}" -d "$db" -f migrations/notes/V1__notes.sql
"${psql[@]}" -d "$db" -c "INSERT INTO notes (tenant_id, id, body) SELECT 't1', gen_random_uuid(), 'note ' || g FROM generate_series(1, 5) g"
printf 'version = 1\n[shards.s0]\nurl = "postgres://postgres@127.0.0.1:5432/%s"\npool = { max_size = 16 }\n' "$db" > "$dir/map.toml"

cat > "$dir/load.py" <<'PY'
import http.client, json, sys, threading
port, n, method = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def worker():
    c = http.client.HTTPConnection('127.0.0.1', port)
    for _ in range(n // 4):
        if method == 'GET':
            c.request('GET', '/notes', headers={'x-tenant-id': 't1'})
        else:
            c.request('POST', '/notes', body=json.dumps({'body': 'hello'}),
                      headers={'x-tenant-id': 't2', 'content-type': 'application/json'})
        r = c.getresponse(); r.read()
        assert r.status in (200, 201), r.status
threads = [threading.Thread(target=worker) for _ in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
PY

# Instructions of `requests` requests of `method` against the server the
# rest of the arguments start on `port`, after 400 requests of warm-up.
count() {
  local method=$1 port=$2; shift 2
  RUST_LOG=info valgrind --tool=callgrind ${CACHE_SIM:+--cache-sim=yes} --callgrind-out-file="$dir/cg.%p" "$@" >"$dir/server.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 400); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $port))" 2>/dev/null && break
    sleep 0.25
  done
  python3 "$dir/load.py" "$port" 400 "$method"
  callgrind_control -z "$pid" >/dev/null 2>&1
  python3 "$dir/load.py" "$port" "$requests" "$method"
  callgrind_control -d "$pid" >/dev/null 2>&1
  kill "$pid"; wait "$pid" 2>/dev/null || true
  # Instructions per request; with CACHE_SIM, then instruction-cache and
  # data-cache (read + write) L1 misses per request.
  grep -h '^summary:' "$dir"/cg.$pid.1 |
    awk -v n="$requests" '{ if (NF > 2) printf "%d %d %d\n", $2 / n, $5 / n, ($6 + $7) / n; else printf "%d\n", $2 / n }'
  rm -f "$dir"/cg.$pid*
}

a_server=(./target/release/examples/axum_app --map "$dir/map.toml" --listen 127.0.0.1:3811 --admin-listen 127.0.0.1:3812 ${A_ARGS:-})
b_server=(./target/release/examples/load_harness serve-baseline --db-url "postgres://postgres@127.0.0.1:5432/$db" --listen 127.0.0.1:3813)
echo "instructions per request (server process, callgrind), $requests requests, 4 keep-alive connections"
for method in GET POST; do
  read -r a a_i1 a_d1 <<<"$(count "$method" 3811 "${a_server[@]}")"
  read -r b b_i1 b_d1 <<<"$(count "$method" 3813 "${b_server[@]}")"
  python3 -c "print(f'$method: A {$a:,}  B {$b:,}  A/B {$a / $b:.3f}')"
  if [ -n "${CACHE_SIM:-}" ]; then
    echo "  L1 misses per request: instructions A $a_i1 B $b_i1, data A $a_d1 B $b_d1"
  fi
done
