#!/usr/bin/env bash
# Repeated kill -9 failover drills against fresh clusters; prints one JSON object with
# p50/p99 (see `shoal drill failover --help`). Needs only Postgres.
set -euo pipefail
cd "$(dirname "$0")/.."
url="${SHOAL__DATABASE__URL:-postgres://postgres@127.0.0.1:5432/shoal}"
cargo build --release -q -p shoal-entities
target/release/shoal drill failover --database-url "$url" --runners "${RUNNERS:-3}" \
  --repeat "${REPEAT:-10}" --json
