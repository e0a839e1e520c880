#!/usr/bin/env bash
# Runs the load matrix (persisted and volatile; 1 runner, then 2) against a fresh cluster in
# a fresh database and writes one JSON array to bench.json (or $1). Needs only Postgres.
set -euo pipefail
# Runners and gateways refuse the built-in cluster secret; this cluster gets its own.
export SHOAL__CLUSTER__SECRET="${SHOAL__CLUSTER__SECRET:-bench-$RANDOM$RANDOM$RANDOM}"
export SHOAL__DIAGNOSTICS__ENABLED="${SHOAL__DIAGNOSTICS__ENABLED:-true}"
# Every load driver connects from 127.0.0.1: lift the gateway's per-client connection cap.
export SHOAL__GATEWAY__MAX_CONNECTIONS="${SHOAL__GATEWAY__MAX_CONNECTIONS:-100000}"
export SHOAL__GATEWAY__MAX_CONNECTIONS_PER_CLIENT="${SHOAL__GATEWAY__MAX_CONNECTIONS_PER_CLIENT:-100000}"
cd "$(dirname "$0")/.."
out="${1:-bench.json}"
base="${SHOAL_BENCH_DATABASE_BASE:-postgres://postgres@127.0.0.1:5432}"
db="shoal_bench_$$"
requests="${SHOAL_BENCH_REQUESTS:-20000}"
entities="${SHOAL_BENCH_ENTITIES:-1000}"
concurrency="${SHOAL_BENCH_CONCURRENCY:-64}"

cargo build --release -q -p shoal-cli
bin=target/release/shoal
psql "$base/postgres" -qc "CREATE DATABASE $db"
url="$base/$db"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql "$base/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
}
trap cleanup EXIT
"$bin" migrate --database-url "$url" >/dev/null

start_runner() {
  SHOAL__LOG__FILTER=warn "$bin" runner --database-url "$url" --listen "127.0.0.1:0" &
  pids+=($!)
}
wait_owned() {
  for _ in $(seq 1 100); do
    if "$bin" status --database-url "$url" --json | grep -q '"unowned":0'; then return; fi
    sleep 0.2
  done
  echo "cluster did not settle" >&2; exit 1
}

results=()
for runners in 1 2; do
  while [ "${#pids[@]}" -lt "$runners" ]; do start_runner; done
  wait_owned
  sleep 1
  for mode in persisted volatile; do
    flag=""; [ "$mode" = persisted ] && flag="--persisted"
    echo "runners=$runners mode=$mode" >&2
    json=$("$bin" bench --database-url "$url" --requests "$requests" --entities "$entities" \
      --concurrency "$concurrency" $flag --json)
    results+=("{\"runners\":$runners,${json#\{}")
  done
done
(IFS=,; echo "[${results[*]}]") | tee "$out"
