#!/usr/bin/env bash
# What one job costs, on the design jobs replace (a SKIP LOCKED table, scripts/jobs_bench.py)
# and on Shoal's jobs through a local cluster (`shoal dev`), for the same burst of no-op
# jobs: CPU per job of each process class (microseconds, from /proc/PID/stat), and what
# Postgres wrote per job (commits, rows inserted and updated, from pg_stat_database), plus
# the index tuples read per job. Prints one JSON array [skip_locked, jobs] (also to $1,
# default jobs-cost.json). Knobs: BURST (5000), CLIENTS (32), WORKERS (8), RUNNERS (3),
# SKIP_BUILD, PROFILE.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-jobs-cost.json}"
source scripts/lib.sh
db="shoal_jobs_cost_$$"
dbs+=("$db" "${db}_jobs")
burst="${BURST:-5000}"
load=(--burst "$burst" --concurrency "${CLIENTS:-32}" --rate 100 --seconds 1)
bench_venv jobs-bench asyncpg==0.32.0 aiohttp==3.14.5
bench_build

# measure SYSTEM DATABASE COMMAND…: runs the burst, prints the JSON object.
measure() {
  local system=$1 database=$2
  shift 2
  local hz before after w0 w1 result
  hz=$(getconf CLK_TCK)
  before=$(cpu_ticks); w0=$(pg_written "$database")
  result=$("$py" scripts/jobs_bench.py "$@" "${load[@]}")
  # The statistics collector publishes a backend's counters within a second of its
  # transaction; the next read sees them.
  sleep 1.5
  after=$(cpu_ticks); w1=$(pg_written "$database")
  python3 - "$system" "$burst" "$hz" "$before" "$after" "$w0" "$w1" "$result" <<'PY'
import json, sys
system, burst, hz, before, after, w0, w1, result = sys.argv[1:]
jobs = int(burst) + 100  # the burst and the short steady phase
def table(text):
    return {k: int(v) for k, v in (line.split() for line in text.splitlines() if line)}
b, a = table(before), table(after)
cpu = {k: round((a[k] - b.get(k, 0)) / int(hz) * 1e6 / jobs) for k in sorted(a)}
w0, w1 = [int(x) for x in w0.split("|")], [int(x) for x in w1.split("|")]
per = lambda i: round((w1[i] - w0[i]) / jobs, 2)
print(json.dumps({
    "system": system,
    "jobs": jobs,
    "completed_per_s": json.loads(result)["burst"]["completed_per_s"],
    "cpu_us_per_job": cpu,
    "cpu_us_per_job_total": sum(cpu.values()),
    "per_job": {"commits": per(0), "rows_inserted": per(1), "rows_updated": per(2),
                "index_tuples_read": per(3)},
}))
PY
}

psql "$base/postgres" -qc "CREATE DATABASE $db"
echo "skip-locked: ${WORKERS:-8} workers" >&2
skip=$(measure skip-locked "$db" skip-locked --database-url "$base/$db" --workers "${WORKERS:-8}")

port=$(free_port)
SHOAL__REDIS__API_LIMITS__ENABLED=false SHOAL__LOG__FILTER=warn "$bin" dev \
  --database-url "$base/${db}_jobs" --redis-url "$redis" --runners "${RUNNERS:-3}" \
  --gateway-port "$port" >"$target/jobs-cost-cluster.log" 2>&1 &
pids+=($!)
await_ready "127.0.0.1:$port"
echo "jobs: ${RUNNERS:-3} runners behind the gateway on :$port" >&2
jobs=$(measure jobs "${db}_jobs" jobs --gateway "http://127.0.0.1:$port")

echo "[$skip,$jobs]" | tee "$out"
