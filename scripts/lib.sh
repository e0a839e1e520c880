# Shared by the benchmark scripts (`source scripts/lib.sh` after `cd` to the repository):
# where things are, a virtual environment for the Python load drivers, the build, the
# processes and databases to clean up on exit, free ports, and readiness waits.
#
# Environment: SHOAL_BENCH_DATABASE_BASE (postgres://postgres@127.0.0.1:5432),
# SHOAL_BENCH_REDIS_URL (redis://127.0.0.1:6379), PROFILE (release), CARGO_TARGET_DIR
# (target), SKIP_BUILD (set: use the binary already built).

base="${SHOAL_BENCH_DATABASE_BASE:-postgres://postgres@127.0.0.1:5432}"
redis="${SHOAL_BENCH_REDIS_URL:-redis://127.0.0.1:6379}"
profile="${PROFILE:-release}"
target="${CARGO_TARGET_DIR:-target}"
bin="$target/$profile/shoal"
py=python3
# Runners and gateways refuse the built-in cluster secret: the benchmark's cluster gets one.
export SHOAL__CLUSTER__SECRET="${SHOAL__CLUSTER__SECRET:-bench-$RANDOM$RANDOM$RANDOM}"
# The load drivers use the diagnostic types (probe, diag.*).
export SHOAL__DIAGNOSTICS__ENABLED="${SHOAL__DIAGNOSTICS__ENABLED:-true}"
# Every load driver connects from 127.0.0.1: lift the gateway's per-client connection cap.
export SHOAL__GATEWAY__MAX_CONNECTIONS="${SHOAL__GATEWAY__MAX_CONNECTIONS:-100000}"
export SHOAL__GATEWAY__MAX_CONNECTIONS_PER_CLIENT="${SHOAL__GATEWAY__MAX_CONNECTIONS_PER_CLIENT:-100000}"

# Processes and databases the exit trap removes.
pids=()
dbs=()
bench_cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for d in "${dbs[@]}"; do
    psql "$base/postgres" -qc "DROP DATABASE IF EXISTS $d WITH (FORCE)" >/dev/null || true
  done
}
trap bench_cleanup EXIT

# bench_venv NAME PACKAGE…: a virtual environment under target/ with the packages (made
# once); sets `py` to its interpreter.
bench_venv() {
  local venv="$target/$1-venv"
  shift
  if [ ! -e "$venv/.installed" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "$@"
    touch "$venv/.installed"
  fi
  py="$venv/bin/python"
}

# bench_build: builds the `shoal` binary in PROFILE, unless SKIP_BUILD is set.
bench_build() {
  if [ -n "${SKIP_BUILD:-}" ]; then return; fi
  if [ "$profile" = release ]; then cargo build --release -q -p shoal-cli
  else cargo build -q -p shoal-cli; fi
}

# free_port: a TCP port free on 127.0.0.1 now.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# await_ready HOST:PORT [PATH]: waits up to 60 s for the node's PATH (/ready; a runner:
# /health); fails the script otherwise.
await_ready() {
  for _ in $(seq 1 300); do
    if curl -sf "http://$1${2:-/ready}" >/dev/null; then return; fi
    sleep 0.2
  done
  echo "$1 not ready" >&2
  exit 1
}

# cpu_ticks: CPU ticks by process class (runner, gateway, bench: the `shoal bench` client,
# postgres, redis). A backend that exited (pollers and clients disconnect) is in its
# postmaster's reaped-children time, so postgres counts live processes' own time plus the
# postmaster's children's. Python load drivers and pgbench are left out.
cpu_ticks() {
  for p in /proc/[0-9]*; do
    cmd=$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null | cut -c1-80) || continue
    stat=$(cat "$p/stat" 2>/dev/null) || continue
    # After the ")" ending the command name: utime, stime, cutime, cstime are fields 12-15.
    fields="${stat##*) }"
    case "$cmd" in
      *" runner "*) class=runner ;; *" gateway "*) class=gateway ;; *" bench "*) class=bench ;;
      */postgres\ -D*|*/bin/postgres*)
        echo "postgres $(echo "$fields" | awk '{print $12 + $13 + $14 + $15}')"
        continue ;;
      postgres:*) class=postgres ;; *redis-server*) class=redis ;; *) continue ;;
    esac
    echo "$class $(echo "$fields" | awk '{print $12 + $13}')"
  done | awk '{t[$1] += $2} END {for (c in t) print c, t[c]}'
}
# pg_written DATABASE: Postgres' counters for it as "commits inserted updated index_reads".
pg_written() {
  psql "$base/$1" -Atc "SELECT xact_commit, tup_inserted, tup_updated,
      (SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes)
      FROM pg_stat_database WHERE datname = current_database()"
}

# one_runner NAME: a fresh database shoal_NAME_$$ (migrated; `url` is set, the exit trap
# drops it) and one runner on it, listening on a free `port`, its pid in `runner`; returns
# once its /health answers. The caller's SHOAL__* environment reaches the runner.
one_runner() {
  local db="shoal_$1_$$"
  dbs+=("$db")
  psql "$base/postgres" -qc "CREATE DATABASE $db"
  url="$base/$db"
  "$bin" migrate --database-url "$url" >/dev/null
  port=$(free_port)
  SHOAL__LOG__FILTER="${SHOAL__LOG__FILTER:-warn}" \
    "$bin" runner --database-url "$url" --listen "127.0.0.1:$port" &
  runner=$!
  pids+=("$runner")
  await_ready "127.0.0.1:$port" /health
}
