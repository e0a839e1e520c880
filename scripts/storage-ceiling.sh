#!/usr/bin/env bash
# Storage alone: how many persisted messages per second Postgres on this machine can save
# and then complete (the runner's real completion statement, epoch check included) with a
# given number of messages in flight, with no Shoal process running. Each pgbench client is
# one pipeline: it saves a batch of B messages (one multi-row insert, one commit), then
# completes them (one statement, one commit), as group commit does; P pipelines keep P x B
# messages in flight. Prints one JSON array; needs pgbench and a release build.
#   PIPELINES="1 2 4" BATCHES="64 32 16" SECONDS_EACH=15 scripts/storage-ceiling.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
seconds="${SECONDS_EACH:-15}"
configs="${CONFIGS:-1x64 2x32 4x16 8x8 2x64 4x32}"
db="shoal_ceiling_$$"

if [ -z "${SKIP_BUILD:-}" ]; then cargo build --release -q -p shoal-cli; fi
psql "$base/postgres" -qc "CREATE DATABASE $db"
work=$(mktemp -d)
cleanup() {
  rm -rf "$work"
  psql "$base/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
}
trap cleanup EXIT
target/release/shoal migrate --database-url "$base/$db" >/dev/null
psql "$base/$db" -qc "INSERT INTO shoal_shards (cluster, shard, epoch, runner_id)
                      SELECT 'ceiling', s, 1, 1 FROM generate_series(0, 1023) s"

# Batch B of client C holds ids C * 10^12 + n * B + 1 ..= + B (n counts the client's batches).
series="FROM generate_series(1, :b) g"
{
  echo '\set base :client_id * 1000000000000 + :n * :b'
  echo '\set n :n + 1'
  cat <<SQL
INSERT INTO shoal_messages
    (id, cluster, shard, entity_type, entity_id, tag, payload, idempotency_key, deliver_at)
SELECT :base + g, 'ceiling', (:base + g) % 1024, 'counter', 'c-' || ((:base + g) % 1000),
       'increment', '{"by": 1}'::jsonb, NULL, NULL
  $series
ON CONFLICT DO NOTHING
RETURNING id;
SQL
  # The completion statement the runner runs, its array parameters built in SQL (no
  # outbox: its arrays, \$11 to \$19, are empty).
  grep -v '^ *--' src/message_storage/queries/complete_batch.sql \
    | sed -e "s/\\\$1[1-9]/'{}'/g" \
          -e "s/\\\$10/ARRAY(SELECT ('{\"count\": ' || g || '}')::jsonb $series)/g" \
          -e "s/\\\$9/ARRAY(SELECT 'c-' || ((:base + g) % 1000) $series)/g" \
          -e "s/\\\$8/ARRAY(SELECT 'counter'::text $series)/g" \
          -e "s/\\\$7/ARRAY(SELECT ('{\"value\": ' || g || '}')::jsonb $series)/g" \
          -e "s/\\\$6/ARRAY(SELECT true $series)/g" \
          -e "s/\\\$5/ARRAY(SELECT 1::int8 $series)/g" \
          -e "s/\\\$4/ARRAY(SELECT ((:base + g) % 1024)::int4 $series)/g" \
          -e "s/\\\$3/ARRAY(SELECT (:base + g)::int8 $series)/g" \
          -e "s/\\\$2/ARRAY(SELECT DISTINCT ((:base + g) % 1024)::int4 $series ORDER BY 1)/g" \
          -e "s/\\\$1/'ceiling'/g"
  echo ';'
} > "$work/pipeline.sql"

results=()
for config in $configs; do
  pipelines=${config%x*}
  batch=${config#*x}
  echo "pipelines=$pipelines batch=$batch" >&2
  pg0=$(cpu_ticks | awk '$1 == "postgres" {print $2}')
  out=$(pgbench "$base/$db" -n -c "$pipelines" -j "$pipelines" -T "$seconds" \
    -D n=0 -D b="$batch" -f "$work/pipeline.sql" 2>&1) || { echo "$out" >&2; exit 1; }
  pg1=$(cpu_ticks | awk '$1 == "postgres" {print $2}')
  tps=$(echo "$out" | awk '/^tps/ {print $3}')
  latency=$(echo "$out" | awk '/^latency average/ {print $4}')
  messages=$(awk -v t="$tps" -v b="$batch" 'BEGIN {printf "%.0f", t * b}')
  # Postgres' CPU (all its processes) per message completed, in microseconds.
  cpu=$(awk -v d=$((pg1 - pg0)) -v hz="$(getconf CLK_TCK)" -v m="$messages" -v s="$seconds" \
    'BEGIN {printf "%.0f", d / hz * 1e6 / (m * s)}')
  results+=("{\"pipelines\":$pipelines,\"batch\":$batch,\"in_flight\":$((pipelines * batch)),\"messages_per_s\":$messages,\"save_then_complete_ms\":$latency,\"postgres_cpu_us_per_message\":$cpu}")
done
(IFS=,; echo "[${results[*]}]")
