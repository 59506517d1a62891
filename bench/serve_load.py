"""Load check of the Serve app on loopback: N concurrent submissions on the tiny checkpoint,
every one must finish and none be lost; prints latency percentiles.

    python bench/serve_load.py [--renders 50] [--out bench/results/serve_load.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


async def run(base: str, n: int) -> list[dict]:
    limits = httpx.Limits(max_connections=2 * n)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        return await asyncio.gather(*(one(client, i) for i in range(n)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--renders", type=int, default=50)
    p.add_argument("--port", type=int, default=8137)
    p.add_argument("--out", default="bench/results/serve_load.json")
    args = p.parse_args()
    ray.init(log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    with tempfile.TemporaryDirectory() as storage:
        serve.run(build_app({"model": str(TINY_CHECKPOINT), "storage": storage}), name="fp-ray", route_prefix="/")
        base = f"http://127.0.0.1:{args.port}"
        t0 = time.perf_counter()
        results = asyncio.run(run(base, args.renders))
        wall = time.perf_counter() - t0
        listed = httpx.get(f"{base}/v1/renders", params={"limit": 1000}).json()["renders"]
        serve.shutdown()
    finished = [r for r in results if r["status"] == "finished"]
    ids = {r["id"] for r in results}
    summary = {
        "date": time.strftime("%Y-%m-%d"), "renders": args.renders, "finished": len(finished),
        "recorded": len(ids & {r["id"] for r in listed if r["status"] == "finished"}), "wall_s": wall,
        "accept_s": {q: pct([r["accept_s"] for r in results], q) for q in (50, 90, 99)},
        "total_s": {q: pct([r["total_s"] for r in results], q) for q in (50, 90, 99)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{summary['finished']}/{args.renders} finished, {summary['recorded']} finished in the records, {wall:.1f} s wall")
    for key in ("accept_s", "total_s"):
        print(f"{key}: " + "  ".join(f"p{q} {v:.2f} s" for q, v in summary[key].items()))
    if summary["finished"] != args.renders or summary["recorded"] != args.renders:
        raise SystemExit("renders were lost")


if __name__ == "__main__":
    main()
