#!/usr/bin/env bash
# What one persisted message costs, by stage: CPU per message (microseconds, /proc) of the
# `shoal bench --persisted` client (save, push, wait), the runner (deliver, handle,
# complete) and Postgres, and what Postgres did per message (commits, rows inserted and
# updated, index tuples read); beside it, Postgres alone running the runner's own save and
# completion statements at the same number in flight (`storage-ceiling.sh`, split
# PIPELINES x CONCURRENCY/PIPELINES). Prints one JSON object {shoal, postgres_alone}.
# Knobs: REQUESTS (30000), ENTITIES (1000), CONCURRENCY (64), PIPELINES (2), SKIP_BUILD,
# PROFILE. Needs Postgres and pgbench.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
requests="${REQUESTS:-30000}"
entities="${ENTITIES:-1000}"
concurrency="${CONCURRENCY:-64}"
pipelines="${PIPELINES:-2}"
bench_build
one_runner persisted_cost
db="${url##*/}"
load=(--database-url "$url" --entities "$entities" --concurrency "$concurrency" --persisted --json)
# Warm up: every entity activated, the pools full.
"$bin" bench "${load[@]}" --requests "$((entities * 2))" --prefix warm >/dev/null 2>&1

# Index tuples read, by index (which statement reads what).
by_index() {
  psql "$url" -Atc "SELECT indexrelname, idx_tup_read FROM pg_stat_user_indexes WHERE idx_tup_read > 0"
}
before=$(cpu_ticks)
w0=$(pg_written "$db")
i0=$(by_index)
# The client's CPU is its own rusage (it has exited by the second snapshot).
client=$(python3 - "$bin" bench "${load[@]}" --requests "$requests" --prefix cost <<'PY'
import json, resource, subprocess, sys
out = subprocess.run(sys.argv[1:], check=True, capture_output=True, text=True).stdout
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"cpu_s": usage.ru_utime + usage.ru_stime, "result": json.loads(out)}))
PY
)
# The statistics collector publishes a backend's counters within a second of its
# transaction; the next read sees them.
sleep 1.5
after=$(cpu_ticks)
w1=$(pg_written "$db")
i1=$(by_index)
for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
wait 2>/dev/null || true
pids=()

alone=$(CONFIGS="${pipelines}x$((concurrency / pipelines))" SKIP_BUILD=1 scripts/storage-ceiling.sh)

python3 - "$requests" "$(getconf CLK_TCK)" "$before" "$after" "$w0" "$w1" "$client" "$alone" "$i0" "$i1" <<'PY'
import json, sys
requests, hz = int(sys.argv[1]), int(sys.argv[2])
before, after, w0, w1, client, alone, i0, i1 = sys.argv[3:]
def rows(text):
    return {k: int(v) for k, v in (line.split("|") for line in text.splitlines() if line)}
i0, i1 = rows(i0), rows(i1)
reads = {k: round((v - i0.get(k, 0)) / requests, 2) for k, v in sorted(i1.items())}
def table(text):
    return {k: int(v) for k, v in (line.split() for line in text.splitlines() if line)}
b, a = table(before), table(after)
client = json.loads(client)
us = lambda seconds: round(seconds * 1e6 / requests)
cpu = {k: us((a[k] - b.get(k, 0)) / hz) for k in ("runner", "postgres") if k in a}
cpu["client"] = us(client["cpu_s"])
w0, w1 = [int(x) for x in w0.split("|")], [int(x) for x in w1.split("|")]
per = lambda i: round((w1[i] - w0[i]) / requests, 2)
alone = json.loads(alone)[0]
print(json.dumps({
    "shoal": {
        "messages": requests,
        "messages_per_s": round(client["result"]["throughput_per_s"]),
        "p99_ms": client["result"]["p99_ms"],
        "cpu_us_per_message": cpu,
        "cpu_us_per_message_total": sum(cpu.values()),
        "per_message": {"commits": per(0), "rows_inserted": per(1), "rows_updated": per(2),
                        "index_tuples_read": per(3), "index_tuples_read_by_index": reads},
    },
    "postgres_alone": alone,
}))
PY
