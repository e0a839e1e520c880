#!/usr/bin/env bash
# Soak: one runner under steady persisted load (the client API, `shoal bench --persisted`,
# run back to back) on a fixed set of 1,001 counter entities for SOAK_SECONDS (default 120;
# or $1), sampling the runner's resident memory (VmRSS from /proc/PID/status) and its
# processed-message counter every SOAK_SAMPLE_EVERY seconds (default 5). A runner whose
# memory keeps growing while the set of entities stays fixed holds something per message.
# Its own fresh database, dropped at the end; prints one JSON object:
#   {"seconds", "entities", "concurrency", "samples": [{"t_s", "rss_mb", "processed"}],
#    "rss_start_mb", "rss_end_mb", "messages", "errors"}
# (`SECONDS` itself cannot name the duration: it is bash's own clock.) Needs Postgres, curl
# and jq. SHOAL_SOAK_DATABASE_BASE names the server (default the local one).
set -euo pipefail
# Runners and gateways refuse the built-in cluster secret; this cluster gets its own.
export SHOAL__CLUSTER__SECRET="${SHOAL__CLUSTER__SECRET:-bench-$RANDOM$RANDOM$RANDOM}"
export SHOAL__DIAGNOSTICS__ENABLED="${SHOAL__DIAGNOSTICS__ENABLED:-true}"
cd "$(dirname "$0")/.."
base="${SHOAL_SOAK_DATABASE_BASE:-postgres://postgres@127.0.0.1:5432}"
db="shoal_soak_$$"
duration="${1:-${SOAK_SECONDS:-120}}"
every="${SOAK_SAMPLE_EVERY:-5}"
entities=1001
concurrency="${SOAK_CONCURRENCY:-64}"
# Requests per bench run: a few seconds of load, so the loop stops close to the deadline.
chunk="${SOAK_CHUNK:-5000}"

cargo build --release -q -p shoal-cli
bin="${CARGO_TARGET_DIR:-target}/release/shoal"
work="$(mktemp -d)"
psql "$base/postgres" -qc "CREATE DATABASE $db"
url="$base/$db"
runner=""
sampler=""
cleanup() {
  [ -n "$sampler" ] && kill "$sampler" 2>/dev/null || true
  [ -n "$runner" ] && kill -TERM "$runner" 2>/dev/null || true
  wait 2>/dev/null || true
  psql "$base/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
"$bin" migrate --database-url "$url" >/dev/null

# A port of our own for the runner, so its /metrics can be read.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
SHOAL__LOG__FILTER=warn "$bin" runner --database-url "$url" --listen "127.0.0.1:$port" \
  >"$work/runner.log" 2>&1 &
runner=$!
for _ in $(seq 1 150); do
  if "$bin" status --database-url "$url" --json 2>/dev/null | grep -q '"unowned":0'; then break; fi
  sleep 0.2
done
"$bin" status --database-url "$url" --json | grep -q '"unowned":0' \
  || { echo "the runner did not take every shard; its log:" >&2; tail -20 "$work/runner.log" >&2; exit 1; }

rss_mb() { awk '/^VmRSS:/ {printf "%.1f", $2 / 1024}' "/proc/$runner/status"; }
processed() {
  curl -sf -H "x-shoal-secret: $SHOAL__CLUSTER__SECRET" "http://127.0.0.1:$port/metrics" \
    | awk '/^shoal_messages_processed_total/ {n += $2} END {printf "%d", n}'
}
started=$(date +%s.%N)
sample() {
  local now
  now=$(date +%s.%N)
  printf '{"t_s":%s,"rss_mb":%s,"processed":%s}\n' \
    "$(awk -v a="$now" -v b="$started" 'BEGIN {printf "%.1f", a - b}')" "$(rss_mb)" \
    "$(processed)" >>"$work/samples.jsonl"
}
sample
(
  while sleep "$every"; do sample; done
) &
sampler=$!

end=$(( $(date +%s) + duration ))
runs=0
while [ "$(date +%s)" -lt "$end" ]; do
  "$bin" bench --database-url "$url" --persisted --entities "$entities" --prefix soak \
    --concurrency "$concurrency" --requests "$chunk" --json >>"$work/bench.jsonl"
  runs=$((runs + 1))
done
kill "$sampler" 2>/dev/null || true
wait "$sampler" 2>/dev/null || true
sampler=""
sample
echo "soak: $runs bench runs of $chunk requests" >&2

jq -s --slurpfile bench "$work/bench.jsonl" \
  --argjson seconds "$duration" --argjson entities "$entities" \
  --argjson concurrency "$concurrency" '
  {
    seconds: $seconds,
    entities: $entities,
    concurrency: $concurrency,
    samples: .,
    rss_start_mb: .[0].rss_mb,
    rss_end_mb: .[-1].rss_mb,
    messages: (.[-1].processed - .[0].processed),
    errors: ([$bench[].errors] | add // 0)
  }' "$work/samples.jsonl"
