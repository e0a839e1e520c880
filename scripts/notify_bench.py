#!/usr/bin/env python3
"""The notification benchmark's load (stdlib only; scripts/notify-bench.sh starts the cluster).

latency: SUBSCRIBERS SSE subscribers spread evenly over the gateways and TENANTS tenants;
events published at RATE/s for SECONDS through the gateways in turn, each carrying its
send time; every delivery's latency is (arrival - send), on one machine's clock. Also
checks each subscriber saw its tenant's seqs once and in order.

idle: opens IDLE idle subscribers on one gateway and samples its RSS along the way; the
most subscribers within 1 GiB is extrapolated from the per-subscriber slope.

Prints one JSON object.
"""
import argparse
import asyncio
import json
import os
import sys
import time


async def open_stream(host, port, path):
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    writer.write(
        f"GET {path} HTTP/1.1\r\nhost: {host}\r\naccept: text/event-stream\r\n\r\n".encode()
    )
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"subscribe {path}: {status!r}")
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    return reader, writer


async def subscriber(host, port, tenant, results, ready):
    reader, writer = await open_stream(host, port, f"/tenants/{tenant}/events")
    ready.append(1)
    last, bad, lat = None, 0, results["latencies"]
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            if line.startswith(b"id: "):
                seq = int(line[4:])
                if last is not None and seq != last + 1:
                    bad += 1
                last = seq
            elif line.startswith(b"data: ") and b'"t"' in line:
                data = json.loads(line[6:])
                lat.append(time.time() * 1000 - data["t"])
    except asyncio.CancelledError:
        pass
    finally:
        results["out_of_order"] += bad
        writer.close()


async def publisher(gateways, tenants, rate, seconds):
    conns = []
    for host, port in gateways:
        for _ in range(32):
            conns.append(await asyncio.open_connection(host, port))
    locks = [asyncio.Lock() for _ in conns]
    sent, errors = 0, 0
    start = time.perf_counter()
    total = int(rate * seconds)

    async def post(i):
        nonlocal sent, errors
        k = i % len(conns)
        reader, writer = conns[k]
        tenant = tenants[i % len(tenants)]
        async with locks[k]:
            # The send time is taken once the connection is free: waiting for it is the
            # generator's queue, not the cluster's latency.
            body = json.dumps({"topic": "tick", "data": {"t": time.time() * 1000, "i": i}}).encode()
            writer.write(
                f"POST /tenants/{tenant}/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n\r\n".encode() + body
            )
            await writer.drain()
            status = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
        if b" 201 " in status:
            sent += 1
        else:
            errors += 1

    tasks = []
    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(post(i)))
    await asyncio.gather(*tasks)
    for _, writer in conns:
        writer.close()
    return sent, errors, time.perf_counter() - start


def pct(values, p):
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(len(values) * p))], 1)


async def latency(args):
    gateways = [(h, int(p)) for h, p in (g.split(":") for g in args.gateways)]
    tenants = [f"bench-{i}" for i in range(args.tenants)]
    results = {"latencies": [], "out_of_order": 0}
    ready, subs = [], []
    for i in range(args.subscribers):
        host, port = gateways[i % len(gateways)]
        subs.append(asyncio.create_task(subscriber(host, port, tenants[i % len(tenants)], results, ready)))
        if i % 50 == 49:
            await asyncio.sleep(0.05)
    while len(ready) < args.subscribers:
        await asyncio.sleep(0.1)
    sent, errors, took = await publisher(gateways, tenants, args.rate, args.seconds)
    await asyncio.sleep(2)
    for task in subs:
        task.cancel()
    await asyncio.gather(*subs, return_exceptions=True)
    lat = results["latencies"]
    expected = sent * args.subscribers // args.tenants
    return {
        "bench": "notify-latency",
        "subscribers": args.subscribers,
        "gateways": len(gateways),
        "tenants": args.tenants,
        "rate": args.rate,
        "published": sent,
        "publish_errors": errors,
        "achieved_rate": round(sent / took, 1),
        "deliveries": len(lat),
        "expected_deliveries": expected,
        "out_of_order": results["out_of_order"],
        "latency_ms": {"p50": pct(lat, 0.5), "p90": pct(lat, 0.9), "p99": pct(lat, 0.99), "max": pct(lat, 1.0)},
    }


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def idle(args):
    host, port = args.gateways[0].split(":")
    port = int(port)
    base = rss_kib(args.pid)
    held, samples = [], []
    for i in range(args.idle):
        try:
            held.append(await open_stream(host, port, f"/tenants/idle-{i % 1000}/events"))
        except Exception as e:  # noqa: BLE001 - the first refusal ends the ramp
            print(f"stopped at {i}: {e}", file=sys.stderr)
            break
        if (i + 1) % 2000 == 0:
            samples.append((i + 1, rss_kib(args.pid)))
            print(f"{i + 1} subscribers: {samples[-1][1] // 1024} MiB", file=sys.stderr)
    await asyncio.sleep(1)
    final = rss_kib(args.pid)
    n = len(held)
    per_sub = (final - base) / n if n else None
    within = int((1024 * 1024 - base) / per_sub) if per_sub else None
    for _, writer in held:
        writer.close()
    return {
        "bench": "notify-idle",
        "subscribers": n,
        "rss_base_mib": round(base / 1024, 1),
        "rss_mib": round(final / 1024, 1),
        "kib_per_subscriber": round(per_sub, 2) if per_sub else None,
        "subscribers_within_1gib": within,
        "samples": [{"subscribers": s, "rss_mib": round(r / 1024, 1)} for s, r in samples],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["latency", "idle"])
    parser.add_argument("--gateways", nargs="+", required=True)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--idle", type=int, default=20000)
    parser.add_argument("--pid", type=int)
    args = parser.parse_args()
    result = asyncio.run(latency(args) if args.mode == "latency" else idle(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
