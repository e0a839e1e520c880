#!/usr/bin/env bash
# The notification benchmark: two runners and two gateways of a fresh cluster (release
# build) on the local Postgres and Redis; then scripts/notify_bench.py measures
# (1) publish → deliver latency with SUBSCRIBERS SSE subscribers spread over both gateways
# and TENANTS tenants at RATE events/s for SECONDS_STEADY s, and (2) the idle subscribers
# one gateway holds within 1 GiB RSS (IDLE opened, extrapolated from the RSS slope).
# Prints one JSON array [latency, idle] (also written to $1, default notify-bench.json).
#
# Knobs (environment): SUBSCRIBERS (1000), TENANTS (100), RATE (200), SECONDS_STEADY (20),
# IDLE (20000), PROFILE (release), SKIP_BUILD (set: use the binary already built).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-notify-bench.json}"
source scripts/lib.sh
db="shoal_notify_bench_$$"
dbs+=("$db")
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
bench_build

psql "$base/postgres" -qc "CREATE DATABASE $db"
"$bin" migrate --database-url "$base/$db" >/dev/null
export SHOAL__DATABASE__URL="$base/$db" SHOAL__CLUSTER__NAME=notify-bench SHOAL__REDIS__URL="$redis" \
  SHOAL__REDIS__KEY_PREFIX="shoal-bench:$db" SHOAL__REDIS__API_LIMITS__ENABLED=false \
  SHOAL__NOTIFICATIONS__MAX_SUBSCRIBERS=1000000 SHOAL__LOG__FILTER=warn
for i in 1 2; do
  "$bin" runner --listen "127.0.0.1:$(free_port)" >"$target/notify-bench-runner-$i.log" 2>&1 &
  pids+=($!)
done
gateways=()
gateway_pids=()
for i in 1 2; do
  port=$(free_port)
  "$bin" gateway --listen "127.0.0.1:$port" >"$target/notify-bench-gateway-$i.log" 2>&1 &
  pids+=($!)
  gateway_pids+=($!)
  gateways+=("127.0.0.1:$port")
done
for g in "${gateways[@]}"; do await_ready "$g"; done
echo "cluster ready: gateways ${gateways[*]}" >&2
latency=$(python3 scripts/notify_bench.py latency --gateways "${gateways[@]}" \
  --subscribers "${SUBSCRIBERS:-1000}" --tenants "${TENANTS:-100}" --rate "${RATE:-200}" \
  --seconds "${SECONDS_STEADY:-20}")
echo "$latency" >&2
idle=$(python3 scripts/notify_bench.py idle --gateways "${gateways[0]}" --pid "${gateway_pids[0]}" \
  --idle "${IDLE:-20000}")
echo "[$latency,$idle]" | tee "$out"
