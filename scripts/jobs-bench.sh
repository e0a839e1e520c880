#!/usr/bin/env bash
# The job benchmark: the same load, in one run, on (1) the design jobs replace — a table and
# N workers polling it with SELECT ... FOR UPDATE SKIP LOCKED (scripts/jobs_bench.py) — and
# (2) Shoal's jobs through the gateway of a local cluster (`shoal dev`), with the no-op job
# type `diag.noop`. Prints one JSON array [skip_locked, jobs] (also written to $1, default
# jobs-bench.json). Needs Postgres and Redis; installs asyncpg and aiohttp into a virtual
# environment under target/ the first time.
#
# Knobs (environment): BURST (jobs, 5000), CLIENTS (burst concurrency, 32), RATE (steady
# jobs/s, 1000), SECONDS_STEADY (steady length, 10), WORKERS (SKIP LOCKED pollers, 8),
# POLL_MS (their idle poll interval, 50), RUNNERS (Shoal runners, 3), PROFILE (release),
# SKIP_BUILD (set: use the binary already built).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-jobs-bench.json}"
source scripts/lib.sh
db="shoal_jobs_bench_$$"
dbs+=("$db" "${db}_jobs")
load=(--burst "${BURST:-5000}" --concurrency "${CLIENTS:-32}" --rate "${RATE:-1000}"
  --seconds "${SECONDS_STEADY:-10}")
bench_venv jobs-bench asyncpg==0.32.0 aiohttp==3.14.5
bench_build

# 1. The SKIP LOCKED table, alone on the machine.
psql "$base/postgres" -qc "CREATE DATABASE $db"
echo "skip-locked: ${WORKERS:-8} workers polling every ${POLL_MS:-50} ms" >&2
skip=$("$py" scripts/jobs_bench.py skip-locked --database-url "$base/$db" "${load[@]}" \
  --workers "${WORKERS:-8}" --poll-interval-ms "${POLL_MS:-50}")

# 2. Shoal's jobs through the gateway of a fresh local cluster on the same Postgres.
port=$(free_port)
# The load is the point: the gateway's per-client API limits are off for it.
SHOAL__REDIS__API_LIMITS__ENABLED=false SHOAL__LOG__FILTER=warn "$bin" dev --database-url "$base/${db}_jobs" --redis-url "$redis" \
  --runners "${RUNNERS:-3}" --gateway-port "$port" >"$target/jobs-bench-cluster.log" 2>&1 &
pids+=($!)
await_ready "127.0.0.1:$port"
echo "jobs: ${RUNNERS:-3} runners behind the gateway on :$port" >&2
jobs=$("$py" scripts/jobs_bench.py jobs --gateway "http://127.0.0.1:$port" "${load[@]}")

echo "[$skip,$jobs]" | tee "$out"
