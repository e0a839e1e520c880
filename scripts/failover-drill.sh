#!/usr/bin/env bash
# Repeated kill -9 failover drills against fresh clusters in a fresh database (dropped at
# the end); prints one JSON object with p50/p99 (see `shoal drill failover --help`). Needs
# only Postgres. SHOAL_DRILL_DATABASE_BASE names the server (default the local one).
# FREEZE=SECONDS freezes the victim with SIGSTOP for that long instead of killing it.
set -euo pipefail
cd "$(dirname "$0")/.."
base="${SHOAL_DRILL_DATABASE_BASE:-postgres://postgres@127.0.0.1:5432}"
db="shoal_drill_$$"
cargo build --release -q -p shoal-cli
psql "$base/postgres" -qc "CREATE DATABASE $db"
trap 'psql "$base/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null || true' EXIT
target/release/shoal migrate --database-url "$base/$db" >/dev/null
target/release/shoal drill failover --database-url "$base/$db" --runners "${RUNNERS:-3}" \
  --repeat "${REPEAT:-10}" ${FREEZE:+--freeze "$FREEZE"} --json
