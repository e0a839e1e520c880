#!/usr/bin/env bash
# The longest progress gap of healthy runners, to size `runner.hang-timeout`: starts RUNNERS
# runners (default 2) in a fresh database (dropped at the end), samples their lock sessions
# in pg_stat_activity every 50 ms for SECONDS (default 60) from one server-side loop, and
# prints one JSON object: the longest time any healthy lock session went without running a
# statement, and the p99 of the samples. Run it while something else loads the machine
# (e.g. the test suite) to see the gap under load. Needs only Postgres.
set -euo pipefail
# Runners and gateways refuse the built-in cluster secret; this cluster gets its own.
export SHOAL__CLUSTER__SECRET="${SHOAL__CLUSTER__SECRET:-bench-$RANDOM$RANDOM$RANDOM}"
export SHOAL__DIAGNOSTICS__ENABLED="${SHOAL__DIAGNOSTICS__ENABLED:-true}"
cd "$(dirname "$0")/.."
base="${SHOAL_DRILL_DATABASE_BASE:-postgres://postgres@127.0.0.1:5432}"
seconds="${SECONDS_TOTAL:-60}"
runners="${RUNNERS:-2}"
db="shoal_gap_$$"
cargo build --release -q -p shoal-cli
psql "$base/postgres" -qc "CREATE DATABASE $db"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql "$base/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null || true
}
trap cleanup EXIT
target/release/shoal migrate --database-url "$base/$db" >/dev/null
for _ in $(seq 1 "$runners"); do
  SHOAL__LOG__FILTER=warn target/release/shoal runner --database-url "$base/$db" \
    --listen 127.0.0.1:0 --cluster gap >/dev/null 2>&1 &
  pids+=("$!")
done
# Wait until every runner holds its liveness lock.
for _ in $(seq 1 300); do
  n=$(psql "$base/$db" -Atc "SELECT count(*) FROM pg_stat_activity
        WHERE datname = current_database() AND application_name LIKE 'shoal-locks:%'")
  [ "$n" -ge "$runners" ] && break
  sleep 0.1
done
samples=$(( seconds * 20 ))
psql "$base/$db" -Atq <<SQL
CREATE FUNCTION pg_temp.gaps(samples int) RETURNS TABLE (max_s float8, p99_s float8, n int)
LANGUAGE plpgsql AS \$\$
DECLARE
  gap float8;
  seen float8[] := '{}';
BEGIN
  FOR i IN 1..samples LOOP
    PERFORM pg_stat_clear_snapshot();
    SELECT max(extract(epoch FROM clock_timestamp() - state_change)) INTO gap
      FROM pg_stat_activity
     WHERE datname = current_database() AND application_name LIKE 'shoal-locks:%'
       AND state = 'idle';
    IF gap IS NOT NULL THEN seen := seen || gap; END IF;
    PERFORM pg_sleep(0.05);
  END LOOP;
  RETURN QUERY SELECT max(x), percentile_disc(0.99) WITHIN GROUP (ORDER BY x), count(*)::int
                 FROM unnest(seen) AS x;
END \$\$;
SELECT json_build_object('runners', $runners, 'seconds', $seconds,
         'max_gap_ms', round((max_s * 1000)::numeric, 1),
         'p99_gap_ms', round((p99_s * 1000)::numeric, 1), 'samples', n)
  FROM pg_temp.gaps($samples);
SQL
