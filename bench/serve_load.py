"""Load check of the Serve app on loopback: N concurrent submissions on the tiny checkpoint,
plus extra SSE streams that only watch, plus image URLs that never answer, all at once; every
render must finish and none be lost, every hostile URL must get its 422, and /healthz is probed
throughout. Prints latency percentiles, and /healthz under load as a ratio of /healthz idle,
measured first in the same run.

    python bench/serve_load.py [--renders 50] [--streams 500] [--hostile 5] [--out bench/results/serve_load.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import ray
from ray import serve

from fp_ray import SAMPLE_IMAGE, TINY_CHECKPOINT
from serving.app import build_app

FIELDS = {"prompt": "a lake at dawn", "size": "64x48", "steps": "4", "seconds": "1.2"}


async def one(client: httpx.AsyncClient, i: int) -> dict:
    t0 = time.perf_counter()
    r = await client.post("/v1/renders", data={**FIELDS, "seed": str(i)},
                          files={"image": ("a.png", SAMPLE_IMAGE.read_bytes(), "image/png")})
    accepted = time.perf_counter() - t0
    r.raise_for_status()
    rid = r.json()["id"]
    async with client.stream("GET", f"/v1/renders/{rid}/events") as events:
        async for line in events.aiter_lines():
            if line.startswith("event: ") and line[7:] in ("finished", "failed", "cancelled"):
                status = line[7:]
                break
    return {"id": rid, "status": status, "accept_s": accepted, "total_s": time.perf_counter() - t0}


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


async def watch(client: httpx.AsyncClient, rid: str) -> int:
    """An extra SSE stream on a render: reads until the stream ends, returns the events seen."""
    seen = 0
    async with client.stream("GET", f"/v1/renders/{rid}/events") as events:
        events.raise_for_status()
        async for line in events.aiter_lines():
            seen += line.startswith("event: ")
    return seen


async def hostile(client: httpx.AsyncClient, url: str) -> int:
    r = await client.post("/v1/renders", json={**FIELDS, "image_url": url})
    return r.status_code


async def probe(client: httpx.AsyncClient, stop: asyncio.Event, every_s: float = 0.1) -> list[float]:
    out = []
    while not stop.is_set():
        t = time.perf_counter()
        (await client.get("/healthz")).raise_for_status()
        out.append(time.perf_counter() - t)
        await asyncio.sleep(every_s)  # a prober's period, not work
    return out


async def run(base: str, n: int, streams: int, hostile_url: str, n_hostile: int) -> dict:
    limits = httpx.Limits(max_connections=2 * n + streams + n_hostile + 10)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        idle_stop = asyncio.Event()
        idle = asyncio.create_task(probe(client, idle_stop))
        await asyncio.sleep(5)  # the reference: /healthz with nothing else going on
        idle_stop.set()
        stop = asyncio.Event()
        busy = asyncio.create_task(probe(client, stop))
        renders = [asyncio.create_task(one(client, i)) for i in range(n)]
        hostiles = [asyncio.create_task(hostile(client, hostile_url)) for _ in range(n_hostile)]
        listed: list[dict] = []
        while len(listed) < n:  # the extra watchers attach as the renders get their ids
            listed = (await client.get("/v1/renders", params={"limit": 1000})).json()["renders"]
            await asyncio.sleep(0.2)
        watchers = [asyncio.create_task(watch(client, listed[i % n]["id"])) for i in range(streams)]
        results = await asyncio.gather(*renders)
        watched = await asyncio.gather(*watchers)
        codes = await asyncio.gather(*hostiles)
        stop.set()
        return {"results": results, "watched": watched, "hostile": codes, "idle": await idle, "busy": await busy}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--renders", type=int, default=50)
    p.add_argument("--streams", type=int, default=500, help="extra SSE streams watching the renders")
    p.add_argument("--hostile", type=int, default=5, help="image_url submissions to a server that never answers")
    p.add_argument("--port", type=int, default=8137)
    p.add_argument("--out", default="bench/results/serve_load.json")
    args = p.parse_args()
    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    hostile_url = f"http://127.0.0.1:{silent.getsockname()[1]}/a.png"
    ray.init(address="local", log_to_driver=False)  # a Ray of its own, never one already running here
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    with tempfile.TemporaryDirectory() as storage:
        config = {"model": str(TINY_CHECKPOINT), "storage": storage, "url_allow": "127.0.0.1/32", "url_timeout_s": 10}
        serve.run(build_app(config), name="fp-ray", route_prefix="/")
        base = f"http://127.0.0.1:{args.port}"
        t0 = time.perf_counter()
        out = asyncio.run(run(base, args.renders, args.streams, hostile_url, args.hostile))
        wall = time.perf_counter() - t0
        listed = httpx.get(f"{base}/v1/renders", params={"limit": 1000}).json()["renders"]
        serve.shutdown()
    silent.close()
    results = out["results"]
    finished = [r for r in results if r["status"] == "finished"]
    ids = {r["id"] for r in results}
    healthz = {"idle": {q: pct(out["idle"], q) for q in (50, 99)}, "busy": {q: pct(out["busy"], q) for q in (50, 99)},
               "busy_max": max(out["busy"]), "busy_probes": len(out["busy"])}
    summary = {
        "date": time.strftime("%Y-%m-%d"), "renders": args.renders, "finished": len(finished),
        "recorded": len(ids & {r["id"] for r in listed if r["status"] == "finished"}), "wall_s": wall,
        "streams": args.streams, "streams_ended": sum(1 for w in out["watched"] if w > 0),
        "hostile": args.hostile, "hostile_422": out["hostile"].count(422),
        "accept_s": {q: pct([r["accept_s"] for r in results], q) for q in (50, 90, 99)},
        "total_s": {q: pct([r["total_s"] for r in results], q) for q in (50, 90, 99)},
        "healthz_s": healthz, "healthz_p99_busy_over_idle": healthz["busy"][99] / healthz["idle"][99],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{summary['finished']}/{args.renders} finished, {summary['recorded']} finished in the records, {wall:.1f} s wall; "
          f"{summary['streams_ended']}/{args.streams} extra streams ended; {summary['hostile_422']}/{args.hostile} hostile URLs got 422")
    for key in ("accept_s", "total_s"):
        print(f"{key}: " + "  ".join(f"p{q} {v:.2f} s" for q, v in summary[key].items()))
    print(f"/healthz p99: idle {healthz['idle'][99] * 1000:.1f} ms, under load {healthz['busy'][99] * 1000:.1f} ms "
          f"({summary['healthz_p99_busy_over_idle']:.1f}x), max {healthz['busy_max'] * 1000:.0f} ms over {len(out['busy'])} probes")
    lost = summary["finished"] != args.renders or summary["recorded"] != args.renders or summary["streams_ended"] != args.streams
    if lost or summary["hostile_422"] != args.hostile or healthz["busy"][99] >= 1.0:
        raise SystemExit("load check failed")


if __name__ == "__main__":
    main()
