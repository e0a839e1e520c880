"""Job-system load: the same load on two systems, one JSON object per system.

  jobs_bench.py skip-locked --database-url URL   the design jobs replace: a table and N
                                                 workers polling it with
                                                 SELECT ... FOR UPDATE SKIP LOCKED
  jobs_bench.py jobs --gateway URL               Shoal's job entity through POST /jobs,
                                                 with the no-op job type `diag.noop`

Each run has two phases with the same no-op work:
  burst   N jobs enqueued as fast as C concurrent clients can, one job per request (one
          INSERT per transaction for the table, one POST per job for the gateway): jobs/s
          enqueued, and jobs/s completed from the first enqueue to the last completion.
  steady  an open-loop generator enqueuing at a fixed rate (default 1,000 jobs/s) for S
          seconds: enqueue -> start latency p50/p99/max, each side measured on one clock
          (the table's on PostgreSQL's clock_timestamp(), the jobs' from their records).

Needs asyncpg and aiohttp (scripts/jobs-bench.sh installs them into a virtual environment).
"""

import argparse
import asyncio
import json
import sys
import time

import aiohttp
import asyncpg

TABLE = """
CREATE TABLE IF NOT EXISTS bench_jobs (
    id          bigserial PRIMARY KEY,
    phase       text        NOT NULL,
    state       text        NOT NULL DEFAULT 'available',
    payload     jsonb       NOT NULL,
    run_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    enqueued_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    started_at  timestamptz,
    finished_at timestamptz
);
CREATE INDEX IF NOT EXISTS bench_jobs_available ON bench_jobs (run_at, id)
    WHERE state = 'available';
"""

PICK = """
WITH picked AS (
    SELECT id FROM bench_jobs
    WHERE state = 'available' AND run_at <= clock_timestamp()
    ORDER BY run_at, id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE bench_jobs j SET state = 'running', started_at = clock_timestamp()
FROM picked WHERE j.id = picked.id
RETURNING j.id
"""


def percentiles(values):
    """p50, p99 and max of a list of milliseconds (nearest rank)."""
    if not values:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    values = sorted(values)

    def rank(q):
        return round(values[min(len(values) - 1, int(q * len(values)))], 2)

    return {"p50": rank(0.50), "p99": rank(0.99), "max": round(values[-1], 2), "n": len(values)}


async def wait_for(check, deadline_s, what):
    deadline = time.monotonic() + deadline_s
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def burst(enqueue, count, concurrency):
    """Enqueues `count` jobs with `concurrency` clients; returns (seconds, ids)."""
    queue = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    ids = []

    async def client():
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            ids.append(await enqueue("burst", i))

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.monotonic() - started, ids


async def steady(enqueue, rate, seconds, in_flight):
    """Enqueues at `rate` jobs/s for `seconds` (open loop); returns (achieved rate, ids,
    the largest lag behind schedule in ms)."""
    total = int(rate * seconds)
    gate = asyncio.Semaphore(in_flight)
    ids, tasks, worst_lag = [], [], 0.0

    async def one(i):
        try:
            ids.append(await enqueue("steady", i))
        finally:
            gate.release()

    started = time.monotonic()
    for i in range(total):
        due = started + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await gate.acquire()
        worst_lag = max(worst_lag, (time.monotonic() - due) * 1000)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    return total / elapsed, ids, worst_lag


class SkipLocked:
    """The table-and-pollers design: `workers` connections each polling every `interval`."""

    def __init__(self, args):
        self.args = args
        self.stop = asyncio.Event()

    async def start(self):
        self.pool = await asyncpg.create_pool(
            self.args.database_url, min_size=4, max_size=self.args.concurrency
        )
        await self.pool.execute("DROP TABLE IF EXISTS bench_jobs")
        await self.pool.execute(TABLE)
        self.workers = [asyncio.create_task(self.worker()) for _ in range(self.args.workers)]

    async def worker(self):
        conn = await asyncpg.connect(self.args.database_url)
        try:
            while not self.stop.is_set():
                ids = [r["id"] for r in await conn.fetch(PICK, self.args.batch)]
                if not ids:
                    await asyncio.sleep(self.args.poll_interval_ms / 1000)
                    continue
                # The no-op job, then its completion.
                await conn.execute(
                    "UPDATE bench_jobs SET state = 'completed', finished_at = clock_timestamp()"
                    " WHERE id = ANY($1)",
                    ids,
                )
        finally:
            await conn.close()

    async def enqueue(self, phase, i):
        return await self.pool.fetchval(
            "INSERT INTO bench_jobs (phase, payload) VALUES ($1, $2) RETURNING id",
            phase,
            json.dumps({"n": i}),
        )

    async def all_done(self, phase, ids):
        left = await self.pool.fetchval(
            "SELECT count(*) FROM bench_jobs WHERE phase = $1 AND state <> 'completed'", phase
        )
        return left == 0

    async def measure(self, phase, ids):
        row = await self.pool.fetchrow(
            "SELECT extract(epoch FROM max(finished_at) - min(enqueued_at)) AS span,"
            " array_agg(extract(epoch FROM started_at - enqueued_at) * 1000) AS lat"
            " FROM bench_jobs WHERE phase = $1",
            phase,
        )
        return float(row["span"]), [float(x) for x in row["lat"]]

    def settings(self):
        a = self.args
        return {"workers": a.workers, "poll_interval_ms": a.poll_interval_ms, "batch": a.batch}

    async def close(self):
        self.stop.set()
        await asyncio.gather(*self.workers)
        await self.pool.close()


class Jobs:
    """Shoal's jobs through the gateway: POST /jobs, then each job's record."""

    def __init__(self, args):
        self.args = args

    async def start(self):
        connector = aiohttp.TCPConnector(limit=self.args.concurrency * 2)
        self.http = aiohttp.ClientSession(self.args.gateway, connector=connector)

    async def enqueue(self, phase, i):
        body = {"type": "diag.noop", "payload": {"n": i}}
        async with self.http.post("/jobs", json=body) as response:
            if response.status != 202:
                raise SystemExit(f"POST /jobs: {response.status} {await response.text()}")
            return (await response.json())["id"]

    async def records(self, ids):
        gate = asyncio.Semaphore(self.args.concurrency)

        async def get(job_id):
            async with gate, self.http.get(f"/jobs/{job_id}") as response:
                return await response.json()

        return await asyncio.gather(*(get(job_id) for job_id in ids))

    async def all_done(self, phase, ids):
        # Sample first: a full pass over every record is only worth it once the last is done.
        tail = await self.records(ids[-20:])
        if any(r.get("status") != "succeeded" for r in tail):
            return False
        records = await self.records(ids)
        self.cached = records
        return all(r.get("status") == "succeeded" for r in records)

    async def measure(self, phase, ids):
        from datetime import datetime

        def at(text):
            return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()

        created, started, finished = [], [], []
        for record in self.cached:
            attempt = record["attempts"][0]
            created.append(at(record["created_at"]))
            started.append(at(attempt["started_at"]))
            finished.append(at(attempt["ended_at"]))
        latencies = [(s - c) * 1000 for c, s in zip(created, started)]
        return max(finished) - min(created), latencies

    def settings(self):
        return {"gateway": self.args.gateway}

    async def close(self):
        await self.http.close()


async def run(args):
    system = SkipLocked(args) if args.system == "skip-locked" else Jobs(args)
    await system.start()
    try:
        seconds, ids = await burst(system.enqueue, args.burst, args.concurrency)
        await wait_for(lambda: system.all_done("burst", ids), args.deadline, "the burst")
        span, _ = await system.measure("burst", ids)
        result = {
            "system": args.system,
            "settings": system.settings(),
            "burst": {
                "jobs": args.burst,
                "clients": args.concurrency,
                "enqueued_per_s": round(args.burst / seconds, 1),
                "completed_per_s": round(args.burst / span, 1),
            },
        }
        rate, ids, lag = await steady(system.enqueue, args.rate, args.seconds, args.in_flight)
        await wait_for(lambda: system.all_done("steady", ids), args.deadline, "the steady load")
        _, latencies = await system.measure("steady", ids)
        result["steady"] = {
            "target_per_s": args.rate,
            "achieved_per_s": round(rate, 1),
            "seconds": args.seconds,
            "generator_worst_lag_ms": round(lag, 1),
            "enqueue_to_start_ms": percentiles(latencies),
        }
        print(json.dumps(result), flush=True)
    finally:
        await system.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("system", choices=["skip-locked", "jobs"])
    parser.add_argument("--database-url", help="skip-locked: the PostgreSQL to use")
    parser.add_argument("--gateway", help="jobs: the gateway's base URL")
    parser.add_argument("--burst", type=int, default=5000, help="jobs in the burst phase")
    parser.add_argument("--concurrency", type=int, default=32, help="burst clients")
    parser.add_argument("--rate", type=float, default=1000, help="steady jobs/s")
    parser.add_argument("--seconds", type=float, default=10, help="steady phase length")
    parser.add_argument("--in-flight", type=int, default=256, help="steady: most open requests")
    parser.add_argument("--workers", type=int, default=8, help="skip-locked: polling workers")
    parser.add_argument("--poll-interval-ms", type=float, default=50, help="skip-locked: idle poll")
    parser.add_argument("--batch", type=int, default=10, help="skip-locked: jobs per poll")
    parser.add_argument("--deadline", type=float, default=120, help="seconds to wait for the end")
    args = parser.parse_args()
    if args.system == "skip-locked" and not args.database_url:
        parser.error("skip-locked needs --database-url")
    if args.system == "jobs" and not args.gateway:
        parser.error("jobs needs --gateway")
    asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
