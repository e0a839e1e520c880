"""Extraction benchmark helpers (run by scripts/extraction-bench.sh).

  fake-provider --port P [--latency-ms 200]
      An OpenAI-compatible chat-completions server answering from the request's JSON schema
      after a fixed latency; GET /log returns the arrival time (ms) of every call.
  builtin --gateway URL --seconds S --concurrency C
      Closed loop: C clients POST /extractions?wait=true with distinct texts (builtin
      provider) for S seconds. Prints JSON: extractions/s and latency percentiles.
  limited --gateway URL --fake URL --rate R --seconds S --rpm N
      Open loop: R extractions/s with provider `fake` for S seconds, then waits for all to
      finish. Prints JSON: provider calls per clock minute (complete minutes), the limit,
      and the rate-limit wait per call (each stage's limit_wait_ms) p50/p99/max.
"""

import argparse
import asyncio
import json
import time

import aiohttp
from aiohttp import web

MENTIONS = [{"text": "Ada Lovelace", "type": "foaf:Person"},
            {"text": "Analytical Society", "type": "foaf:Organization"}]
RELATIONS = [{"subject": "Ada Lovelace", "predicate": "shoal:memberOf",
              "object": "Analytical Society"}]


def pct(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(p / 100 * len(values) + 0.5)) - 1))]


async def fake_provider(args):
    log = []

    async def complete(request):
        body = await request.json()
        log.append(int(time.time() * 1000))
        task = body["response_format"]["json_schema"]["schema"]["required"][0]
        await asyncio.sleep(args.latency_ms / 1000)
        content = json.dumps({task: MENTIONS if task == "mentions" else RELATIONS})
        return web.json_response({
            "id": "chatcmpl-bench", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 200, "completion_tokens": 40, "total_tokens": 240}})

    async def show_log(_):
        return web.json_response(log)

    app = web.Application()
    app.add_routes([web.post("/v1/chat/completions", complete), web.get("/log", show_log)])
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    await asyncio.Event().wait()


async def builtin(args):
    latencies, errors, n = [], 0, 0
    deadline = time.monotonic() + args.seconds
    async with aiohttp.ClientSession() as session:
        async def client(c):
            nonlocal errors, n
            while time.monotonic() < deadline:
                n += 1
                text = f"Ada Lovelace number {c}-{n} worked with Charles Babbage at the Analytical Society."
                started = time.monotonic()
                async with session.post(f"{args.gateway}/extractions?wait=true",
                                        json={"text": text, "ontology_id": "foaf"}) as r:
                    body = await r.json()
                    if r.status == 200 and body.get("status") == "completed":
                        latencies.append(round((time.monotonic() - started) * 1000, 1))
                    else:
                        errors += 1
        began = time.monotonic()
        await asyncio.gather(*(client(c) for c in range(args.concurrency)))
        took = time.monotonic() - began
    print(json.dumps({"bench": "extraction-builtin", "concurrency": args.concurrency,
                      "seconds": round(took, 1), "completed": len(latencies), "errors": errors,
                      "extractions_per_s": round(len(latencies) / took, 1),
                      "latency_ms": {"p50": pct(latencies, 50), "p99": pct(latencies, 99)}}))


async def limited(args):
    ids = []
    async with aiohttp.ClientSession() as session:
        began = time.time()
        total = int(args.rate * args.seconds)
        for i in range(total):
            due = began + i / args.rate
            await asyncio.sleep(max(0, due - time.time()))
            body = {"text": f"Ada Lovelace, text {i} of run {int(began)}.", "ontology_id": "foaf",
                    "options": {"provider": "fake"}}
            async with session.post(f"{args.gateway}/extractions", json=body) as r:
                ids.append((await r.json())["id"])
        waits, unfinished = [], 0
        for id in ids:
            while True:
                async with session.get(f"{args.gateway}/extractions/{id}") as r:
                    view = await r.json()
                if view.get("status") in ("completed", "failed"):
                    break
                await asyncio.sleep(1)
            if view["status"] != "completed":
                unfinished += 1
            for stage in view.get("stages", []):
                if stage.get("provider_calls"):
                    waits.append(stage.get("limit_wait_ms", 0))
        ended = time.time()
        async with session.get(f"{args.fake}/log") as r:
            log = await r.json()
    minutes = {}
    for at in log:
        minutes[at // 60000] = minutes.get(at // 60000, 0) + 1
    complete = [m for m in minutes if m * 60000 >= began * 1000 and (m + 1) * 60000 <= ended * 1000]
    per_minute = [minutes[m] for m in sorted(complete)]
    print(json.dumps({"bench": "extraction-limited", "runners": args.runners,
                      "offered_calls_per_min": round(args.rate * 2 * 60),
                      "limit_requests_per_min": args.rpm, "extractions": len(ids),
                      "failed": unfinished, "provider_calls": len(log),
                      "calls_per_complete_minute": per_minute,
                      "max_calls_in_a_minute": max(minutes.values()) if minutes else 0,
                      "limit_wait_ms": {"p50": pct(waits, 50), "p99": pct(waits, 99),
                                        "max": max(waits) if waits else None},
                      "seconds": round(ended - began, 1)}))


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fake-provider")
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--latency-ms", type=int, default=200)
    b = sub.add_parser("builtin")
    b.add_argument("--gateway", required=True)
    b.add_argument("--seconds", type=float, default=20)
    b.add_argument("--concurrency", type=int, default=16)
    lim = sub.add_parser("limited")
    lim.add_argument("--gateway", required=True)
    lim.add_argument("--fake", required=True)
    lim.add_argument("--rate", type=float, default=1.0)
    lim.add_argument("--seconds", type=float, default=120)
    lim.add_argument("--rpm", type=int, default=60)
    lim.add_argument("--runners", type=int, default=3)
    args = parser.parse_args()
    asyncio.run({"fake-provider": fake_provider, "builtin": builtin, "limited": limited}[args.command](args))


if __name__ == "__main__":
    main()
