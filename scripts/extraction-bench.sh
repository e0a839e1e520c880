#!/usr/bin/env bash
# The extraction benchmark, on a fresh local cluster (`shoal dev`, RUNNERS runners and a
# gateway) over Postgres and Redis:
#   1. extractions/s with the built-in provider through the gateway (closed loop,
#      CLIENTS clients, `?wait=true`, distinct texts), for SECONDS_BUILTIN;
#   2. a fake OpenAI-compatible provider with LATENCY_MS latency behind a RPM
#      requests/min limit (and concurrency CONCURRENCY), offered RATE extractions/s (two
#      calls each) for SECONDS_LIMITED: the provider's calls per clock minute across the
#      runners, and the rate-limit wait per call.
# Prints one JSON array [builtin, limited] (also written to $1, default
# extraction-bench.json). Installs aiohttp into a venv under target/ the first time.
#
# Knobs (environment): RUNNERS (3), CLIENTS (16), SECONDS_BUILTIN (20), LATENCY_MS (200),
# RPM (60), CONCURRENCY (10), RATE (1.0), SECONDS_LIMITED (60), PROFILE (release),
# SKIP_BUILD (set: use the binary already built).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-extraction-bench.json}"
source scripts/lib.sh
runners="${RUNNERS:-3}"
rpm="${RPM:-60}"
db="shoal_extraction_bench_$$"
dbs+=("$db")
bench_venv extraction-bench aiohttp==3.14.5
bench_build

fake_port=$(free_port)
"$py" scripts/extraction_bench.py fake-provider --port "$fake_port" --latency-ms "${LATENCY_MS:-200}" &
pids+=($!)

port=$(free_port)
# The load is the point: the gateway's per-client API limits are off for it.
# `shoal dev` hands --redis-url to its gateway only; the runners read it from the
# environment (the provider limits and breakers live there).
SHOAL__REDIS__API_LIMITS__ENABLED=false SHOAL__LOG__FILTER=warn \
SHOAL__REDIS__URL="$redis" SHOAL__REDIS__KEY_PREFIX="$db" \
SHOAL__EXTRACTION__PROVIDERS__FAKE__KIND=openai \
SHOAL__EXTRACTION__PROVIDERS__FAKE__BASE_URL="http://127.0.0.1:$fake_port" \
SHOAL__EXTRACTION__PROVIDERS__FAKE__MODEL=bench \
SHOAL__EXTRACTION__PROVIDERS__FAKE__API_KEY=sk-bench \
SHOAL__REDIS__PROVIDERS__FAKE__REQUESTS_PER_MINUTE="$rpm" \
SHOAL__REDIS__PROVIDERS__FAKE__CONCURRENCY="${CONCURRENCY:-10}" \
  "$bin" dev --database-url "$base/$db" --redis-url "$redis" \
  --runners "$runners" --gateway-port "$port" >"$target/extraction-bench-cluster.log" 2>&1 &
pids+=($!)
await_ready "127.0.0.1:$port"
echo "builtin: ${CLIENTS:-16} clients, $runners runners behind :$port" >&2
builtin=$("$py" scripts/extraction_bench.py builtin --gateway "http://127.0.0.1:$port" \
  --seconds "${SECONDS_BUILTIN:-20}" --concurrency "${CLIENTS:-16}")
echo "$builtin" >&2
echo "limited: $rpm requests/min, offered ${RATE:-1.0} extractions/s" >&2
limited=$("$py" scripts/extraction_bench.py limited --gateway "http://127.0.0.1:$port" \
  --fake "http://127.0.0.1:$fake_port" --rate "${RATE:-1.0}" --seconds "${SECONDS_LIMITED:-60}" \
  --rpm "$rpm" --runners "$runners")
echo "[$builtin,$limited]" | tee "$out"
