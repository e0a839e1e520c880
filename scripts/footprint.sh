#!/usr/bin/env bash
# Bytes per resident idle entity: starts one runner (resident cap raised above ENTITIES),
# activates ENTITIES never-seen counter entities with one volatile `get` each
# (`shoal bench`, CONCURRENCY callers), waits for the resident gauge and for the idle
# entities to fall asleep (`shoal_entities_awake` 0), and prints one JSON object: the
# runner's RSS before, at the end of the load and after, bytes per resident entity,
# and the activation
# rate. Knobs: ENTITIES (200000; 1000000 for the issue's measure), CONCURRENCY (64),
# SKIP_BUILD, PROFILE. Needs only Postgres.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
entities="${ENTITIES:-200000}"
concurrency="${CONCURRENCY:-64}"
bench_build
SHOAL__RUNNER__MAX_RESIDENT_ENTITIES=$((entities * 2)) one_runner footprint
rss() { awk '/^VmRSS:/ {print $2 * 1024}' "/proc/$runner/status"; }
gauge() {
  curl -sf -H "x-shoal-secret: $SHOAL__CLUSTER__SECRET" "http://127.0.0.1:$port/metrics" | awk -v name="$1" '$1 == name {print $2}'
}
resident() { gauge shoal_entities_resident; }
awake() { local n; n=$(gauge shoal_entities_awake); echo "${n:-0}"; }
# Warm the runner up (allocator arenas, the shards' first entities) before the baseline.
"$bin" bench --database-url "$url" --requests 2000 --entities 1000 --concurrency "$concurrency" \
  --prefix warm --json >/dev/null
before=$(rss)
resident_before=$(resident)
load=$("$bin" bench --database-url "$url" --requests "$entities" --entities "$entities" \
  --concurrency "$concurrency" --prefix idle --json)
for _ in $(seq 1 100); do
  now=$(resident)
  if [ "${now%.*}" -ge $((entities + ${resident_before%.*})) ]; then break; fi
  sleep 0.2
done
peak=$(rss)
# Idle entities go to sleep (`runner.sleep-after`): their actors stop, their state stays.
for _ in $(seq 1 150); do
  if [ "$(awake | cut -d. -f1)" -eq 0 ]; then break; fi
  sleep 0.2
done
after=$(rss)
python3 - "$entities" "$before" "$after" "$resident_before" "$(resident)" "$load" "$peak" "$(awake)" <<'PY'
import json, sys
entities, before, after = (int(x) for x in sys.argv[1:4])
resident_before, resident_after = (int(float(x)) for x in sys.argv[4:6])
load = json.loads(sys.argv[6])
peak, awake = int(sys.argv[7]), int(float(sys.argv[8]))
added = max(resident_after - resident_before, 1)
print(json.dumps({
    "entities": entities,
    "resident_added": added,
    "rss_before_bytes": before,
    "rss_after_bytes": after,
    "rss_peak_while_awake_bytes": peak,
    "awake_after": awake,
    "bytes_per_resident_entity": round((after - before) / added),
    "activations_per_s": load.get("throughput_per_s", load.get("requests_per_s")),
    "load": load,
}))
PY
