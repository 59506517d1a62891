"""Orchestration overhead of fp-ray on Ray, with the tiny checkpoint on this machine's CPUs.

1. Per section: the same inverted render through the coordinator with in-process workers
   (the reference) and with Ray actors; for each section, the time inside the section
   function (measured in the worker) against the coordinator's wall time from submitting
   it to holding its latents. The difference is Ray plumbing: scheduling, argument
   transfer (context latents + conditioning), the streamed step events, the result.
2. Batch throughput: the same manifest through `run_batch` with 1 and with 2 generator
   actors (fake GPUs on one machine).

    python bench/ray_overhead.py [--sections 6] [--steps 25] [--rows 8] [--out bench/results/ray_overhead.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from fp_ray import SAMPLE_IMAGE, TINY_CHECKPOINT
from fp_ray.actors import PoolConfig, RayPools
from fp_ray.batch import BatchConfig, run_batch
from fp_ray.coordinator import run_render
from fp_ray.models import cached_components
from fp_ray.render import LocalPools
from fp_ray.request import make_request


def section_walls(request, pools) -> list[dict]:
    """Per section: seconds in the section function, and wall seconds seen by the coordinator."""
    submitted, rows = {}, []

    def on_event(e):
        now = time.perf_counter()
        if e["type"] in ("plan", "section_finished"):
            submitted["next"] = now  # a chain: the next section is submitted right after this event
        if e["type"] == "section_started":
            submitted[e["position"]] = submitted.pop("next")
        if e["type"] == "section_finished":
            rows.append({"position": e["position"], "function_s": e["seconds"], "wall_s": now - submitted[e["position"]]})

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run_render(request, pools, out=Path(tmp) / "video.mp4", on_event=on_event))
    return rows


def summarize(rows: list[dict]) -> dict:
    fn = [r["function_s"] for r in rows]
    wall = [r["wall_s"] for r in rows]
    return {"sections": len(rows), "function_s_mean": statistics.mean(fn), "wall_s_mean": statistics.mean(wall),
            "overhead_ms_mean": 1000 * statistics.mean(w - f for w, f in zip(wall, fn)),
            "overhead_ms_median": 1000 * statistics.median(w - f for w, f in zip(wall, fn))}


def batch_throughput(generators: int, rows: int, steps: int, tmp: Path) -> dict:
    manifest = tmp / f"m{generators}.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"g{generators}-{i}", "prompt": "a quiet valley", "image": str(SAMPLE_IMAGE),
                                            "seconds": 2.4, "size": "64x48", "steps": steps, "seed": i}) + "\n" for i in range(rows)))
    config = BatchConfig(generators=(generators, generators), decoders=(2, 2),
                         pools=PoolConfig(generator_gpus=1, decoder_gpus=0, encoder_gpus=0, cpus=1))
    t = time.perf_counter()
    records = run_batch(str(manifest), str(tmp / f"out{generators}"), str(TINY_CHECKPOINT), config)
    wall = time.perf_counter() - t
    ok = [r for r in records if r["status"] == "ok"]
    return {"generators": generators, "rows": rows, "ok": len(ok), "wall_s": wall, "videos_per_min": 60 * len(ok) / wall,
            "generate_s_sum": sum(r["generate_s"] for r in ok), "decode_s_sum": sum(r["decode_s"] for r in ok)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", type=int, default=6)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--out", default="bench/results/ray_overhead.json")
    args = p.parse_args()

    request = make_request(prompt="a quiet valley", width=64, height=48, steps=args.steps, seconds=args.sections * 1.2)
    # Actors get one torch thread (Ray sets OMP_NUM_THREADS=1); the reference runs with one too.
    torch.set_num_threads(1)
    local = summarize(section_walls(request, LocalPools.from_components(cached_components(str(TINY_CHECKPOINT)))))

    ray.init(num_cpus=4, num_gpus=2, log_to_driver=False)
    pools = RayPools(str(TINY_CHECKPOINT), PoolConfig(generators=1, decoders=1, generator_gpus=1, decoder_gpus=0, encoder_gpus=0))
    pools.wait_ready()
    section_walls(request, pools)  # warm: first calls import and allocate
    on_ray = summarize(section_walls(request, pools))
    pools.shutdown()

    with tempfile.TemporaryDirectory() as tmp:
        batches = [batch_throughput(g, args.rows, args.steps, Path(tmp)) for g in (1, 2)]

    results = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{ray.cluster_resources().get('CPU')} Ray CPUs", "ray": ray.__version__, "torch": torch.__version__,
        "request": {"size": "64x48", "steps": args.steps, "sections": args.sections},
        "per_section": {"in_process": local, "ray_actors": on_ray,
                        "ray_over_in_process_wall": on_ray["wall_s_mean"] / local["wall_s_mean"]},
        "batch": batches, "batch_speedup_2_over_1": batches[1]["videos_per_min"] / batches[0]["videos_per_min"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"per section ({args.steps} steps, 64x48):")
    for name, r in (("in-process", local), ("ray actors", on_ray)):
        print(f"  {name:<11} function {r['function_s_mean'] * 1000:7.1f} ms  wall {r['wall_s_mean'] * 1000:7.1f} ms  "
              f"plumbing {r['overhead_ms_mean']:6.1f} ms (median {r['overhead_ms_median']:.1f})")
    print(f"  ray / in-process wall: {results['per_section']['ray_over_in_process_wall']:.2f}x")
    for b in batches:
        print(f"batch, {b['generators']} generator(s): {b['ok']}/{b['rows']} videos in {b['wall_s']:.1f} s = "
              f"{b['videos_per_min']:.1f} videos/min (generate {b['generate_s_sum']:.1f} s, decode {b['decode_s_sum']:.1f} s summed)")
    print(f"2 vs 1 generators: {results['batch_speedup_2_over_1']:.2f}x; wrote {args.out}")


if __name__ == "__main__":
    main()
