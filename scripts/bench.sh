#!/usr/bin/env bash
# Runs the load matrix (persisted and volatile; 1 runner, then 2) against a fresh cluster in
# a fresh database, then the persisted path against Postgres alone: `shoal bench
# --persisted` on 1 runner at each of RATIO_CONCURRENCY (64 256) in flight, and, once the
# cluster has stopped, `storage-ceiling.sh` running the runner's own statements with the
# same number in flight (the best split into pgbench pipelines × batch). Writes one JSON
# object {"runs": [...], "versus_postgres": [{concurrency, shoal_per_s, postgres_alone_per_s,
# ratio, ...}]} to bench.json (or $1). Needs Postgres and pgbench. SKIP_CEILING=1 skips the
# comparison; SECONDS_EACH (10) is each pgbench run.
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

if [ -z "${SKIP_BUILD:-}" ]; then cargo build --release -q -p shoal-cli; fi
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

ratio_concurrency="${RATIO_CONCURRENCY:-64 256}"
results=()
persisted_one=()
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
  if [ "$runners" = 1 ] && [ -z "${SKIP_CEILING:-}" ]; then
    for c in $ratio_concurrency; do
      echo "runners=1 mode=persisted concurrency=$c (against Postgres alone)" >&2
      json=$("$bin" bench --database-url "$url" --requests "$requests" --entities "$entities" \
        --concurrency "$c" --persisted --json)
      persisted_one+=("$json")
    done
  fi
done
for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
wait 2>/dev/null || true
pids=()

ceilings=()
if [ -z "${SKIP_CEILING:-}" ]; then
  for c in $ratio_concurrency; do
    # Every split of c in flight into pipelines × batch, 1 to 16 pipelines.
    splits=""
    for p in 1 2 4 8 16; do
      if [ $((c % p)) -eq 0 ] && [ $((c / p)) -ge 4 ]; then splits="$splits ${p}x$((c / p))"; fi
    done
    echo "Postgres alone at $c in flight:$splits" >&2
    ceilings+=("$(CONFIGS="$splits" SECONDS_EACH="${SECONDS_EACH:-10}" scripts/storage-ceiling.sh)")
  done
fi

python3 - "$ratio_concurrency" "[$(IFS=,; echo "${results[*]}")]" \
  "[$(IFS=,; echo "${persisted_one[*]}")]" "[$(IFS=,; echo "${ceilings[*]}")]" <<'PY' | tee "$out"
import json, sys
levels = [int(c) for c in sys.argv[1].split()]
runs, shoal, ceilings = (json.loads(a) for a in sys.argv[2:5])
versus = []
for c, ours, splits in zip(levels, shoal, ceilings):
    best = max(splits, key=lambda s: s["messages_per_s"])
    ours_per_s = ours.get("throughput_per_s")
    versus.append({
        "concurrency": c,
        "shoal_per_s": round(ours_per_s),
        "shoal_p99_ms": ours.get("p99_ms"),
        "postgres_alone_per_s": best["messages_per_s"],
        "postgres_alone_split": f'{best["pipelines"]}x{best["batch"]}',
        "ratio": round(ours_per_s / best["messages_per_s"], 3),
        "postgres_alone_splits": splits,
    })
print(json.dumps({"runs": runs, "versus_postgres": versus}))
PY
