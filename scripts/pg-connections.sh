#!/usr/bin/env bash
# Prints, as JSON, the test suite's PostgreSQL connection peak per test binary (recorded by
# the testkit's sampler under target/tmp/pg-connections/), so a shortage on a shared server
# is seen as one. Usage: scripts/pg-connections.sh [TARGET_DIR]
set -euo pipefail
dir="${1:-target}/tmp/pg-connections"
python3 - "$dir" <<'PY'
import json, os, sys
d = sys.argv[1]
reports = []
if os.path.isdir(d):
    for name in sorted(os.listdir(d)):
        try:
            reports.append(json.load(open(os.path.join(d, name))))
        except (OSError, ValueError):
            pass
peak = max(reports, key=lambda r: r["peak_suite_connections"], default=None)
print(json.dumps({
    "max_connections": peak["max_connections"] if peak else None,
    "suite_peak": peak["peak_suite_connections"] if peak else None,
    "suite_peak_binary": peak["binary"] if peak else None,
    "others_at_peak": peak["others_at_peak"] if peak else None,
    "by_binary": {r["binary"]: r["peak_suite_connections"] for r in reports},
}, indent=2))
PY
