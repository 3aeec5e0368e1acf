#!/usr/bin/env bash
# Regenerates every figure of docs/benchmarks.md in one run:
# pgbouncer for configuration D, the criterion benches, the rollout and move
# benches, and the end-to-end load harness. Output: target/bench-figures.txt
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/bench-figures.txt
mkdir -p target
pg_isready -h 127.0.0.1 -q || pg_ctlcluster --skip-systemctl-redirect 15 main start
bash examples/pgbouncer.sh
cargo build --release --features chrono --examples
{
  echo "== cargo bench --bench routing"; cargo bench --bench routing 2>&1 | grep -E "^[a-zA-Z1].*|time:|pin index|lookups during"
  echo "== cargo bench --bench rollout"; cargo bench --bench rollout 2>&1 | grep -vE "^\s*(Compiling|Finished|Running)"
  echo "== THROTTLES=none,5000,1000 cargo bench --bench moves"
  THROTTLES=none,5000,1000 cargo bench --bench moves 2>&1 | grep -vE "^\s*(Compiling|Finished|Running)"
  echo "== TARGET_CLUSTER=1 THROTTLES=none,20000,5000,1000 cargo bench --bench moves (shard b in a cluster of its own)"
  TARGET_CLUSTER=1 THROTTLES=none,20000,5000,1000 cargo bench --bench moves 2>&1 | grep -vE "^\s*(Compiling|Finished|Running)"
  echo "== BENCH_ROWS=1000000 cargo bench --bench moves (backfill figures)"
  BENCH_ROWS=1000000 cargo bench --bench moves 2>&1 | grep -A2 "^backfill of"
  echo "== WHOLE_MOVE=300000,1000000 cargo bench --bench moves (slowest writes during whole moves)"
  WHOLE_MOVE=300000,1000000 cargo bench --bench moves 2>&1 | grep -vE "^\s*(Compiling|Finished|Running)"
  echo "== load harness";                ./target/release/examples/load_harness --seconds 5 --connections 32 --rounds 5
  echo "== load harness, A and B side by side"
  ./target/release/examples/load_harness --together 16 --slice 3 --connections 32 --workloads get,post
  echo "== instructions and L1 misses per request"; CACHE_SIM=1 bash benches/callgrind_ab.sh 2000
} | tee "$out"
echo "figures written to $out"
