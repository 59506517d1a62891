"""Long videos: wall time, time per section and peak memory against video length, the old
path (every chunk kept, the whole video assembled and written at the end) beside the new
one (segments made by the decoders, joined without re-encoding), measured in this run.

1. Renders on the tiny checkpoint (small frames, few steps) of 10 s, 60 s and 300 s; each in
   a fresh process, timed around `render()` after the model is loaded, with the process's
   peak RSS (coordinator and in-process workers together: an upper bound for each). The old
   path runs where it fits (`--old-up-to`), from a `git archive` of the commit before
   segments (`--old-tree`).
2. decode + segment + write at 640x640 over synthetic latents for 1..N sections (the tiny
   VAE, new path): the slope of time and memory per section, and the projected peak for a
   10-minute video.

3. The coordinator alone (`--coordinator 10 60 300`): the same renders over Ray actors, with
   the coordinator's own peak RSS and the most sections' latents it held at once, projected
   to a 10-minute 640x640 video.

    python bench/long_video.py [--seconds 10 60 300] [--old-up-to 60] [--sizes 1 2 3] [--coordinator 10 60 300]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUEST = dict(prompt="a quiet valley", width=64, height=48, steps=2)


def child_render(seconds: float, out: str) -> dict:
    """Runs in a fresh process, on whatever fp_ray is first on sys.path."""
    import torch

    from fp_ray import TINY_CHECKPOINT
    from fp_ray.models import load_components
    from fp_ray.render import render
    from fp_ray.request import make_request

    components = load_components(str(TINY_CHECKPOINT), "cpu")
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    request = make_request(**REQUEST, seconds=seconds)
    t = time.perf_counter()
    result = render(request, out, components)
    wall = time.perf_counter() - t
    return {"wall_s": wall, "sections": result.plan.num_sections, "frames": result.plan.pixel_frames,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "loaded_rss_mb": loaded / 1024,
            "torch_threads": torch.get_num_threads()}


def child_coordinator(seconds: float, out: str) -> dict:
    """The coordinator alone in this process, over Ray actors (one of each kind, their models
    in their own processes): this process's peak RSS is the coordinator's, and the most
    sections' latents it held at once."""
    import asyncio

    import ray

    from fp_ray import TINY_CHECKPOINT
    from fp_ray.actors import PoolConfig, RayPools
    from fp_ray.coordinator import SectionLatents, run_render
    from fp_ray.request import make_request

    held = [0]
    add = SectionLatents.add

    def counting_add(self, position, latents):
        add(self, position, latents)
        held[0] = max(held[0], len(self.in_memory()))

    SectionLatents.add = counting_add
    ray.init(address="local", num_cpus=4, log_to_driver=False, include_dashboard=False)  # its own instance
    pools = RayPools(str(TINY_CHECKPOINT), PoolConfig(device="cpu"))
    pools.wait_ready()
    ready = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    request = make_request(**REQUEST, seconds=seconds)
    t = time.perf_counter()
    result = asyncio.run(run_render(request, pools, out=out))
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pools.shutdown()
    ray.shutdown()
    return {"wall_s": wall, "sections": result.plan.num_sections, "frames": result.plan.pixel_frames,
            "coordinator_peak_rss_mb": peak / 1024, "ready_rss_mb": ready / 1024, "max_sections_in_memory": held[0]}


def child_synthetic(sections: int, size: int, window: int) -> dict:
    """decode + segment + write of `sections` random sections at size x size (new path)."""
    import asyncio

    import torch

    from fp_ray import TINY_CHECKPOINT
    from fp_ray.coordinator import render_context
    from fp_ray.encode import encode_request
    from fp_ray.models import load_components
    from fp_ray.render import LocalPools
    from fp_ray.request import make_request
    from fp_ray.segments import finish_video
    from fp_ray.storage import SectionStore

    components = load_components(str(TINY_CHECKPOINT), "cpu")
    request = make_request(prompt="x", width=size, height=size, steps=1, window=window, seconds=sections * 4 * window / 30)
    with tempfile.TemporaryDirectory() as tmp:
        encoded = encode_request(components, request)
        ctx = render_context(encoded, "synthetic", SectionStore(tmp))
        g = torch.Generator().manual_seed(0)
        shape = (1, 16, ctx.plan.window, ctx.plan.latent_height, ctx.plan.latent_width)
        done = {p: torch.randn(shape, generator=g) for p in range(ctx.plan.num_sections)}
        pools = LocalPools.from_components(components)
        loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        async def run():
            return await finish_video(ctx, await pools.share(ctx), pools, done, Path(tmp) / "video.mp4")

        t = time.perf_counter()
        _, timings = asyncio.run(run())
        wall = time.perf_counter() - t
    assert ctx.plan.num_sections == sections, ctx.plan.num_sections
    return {"sections": sections, "size": size, "window": window, "wall_s": wall, **{f"{k}_s": v for k, v in timings.items()},
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "loaded_rss_mb": loaded / 1024}


def project_coordinator(rows: list[dict], size: int) -> dict | None:
    """The coordinator's peak for a 10-minute video at size x size, from its measured peaks:
    the longest run's peak, plus its slope per section (least squares) over the sections a
    10-minute video adds, plus the latents it holds at once grown to that size (the
    sections held in memory and the chunk decodes in flight, two sections each)."""
    if len(rows) < 2:
        return None
    from fp_ray.segments import DECODES_IN_FLIGHT

    rows = sorted(rows, key=lambda r: r["sections"])
    slope = least_squares([r["sections"] for r in rows], [r["coordinator_peak_rss_mb"] for r in rows])
    ten_minutes = round(600 * 30 / (4 * 9))
    last = rows[-1]
    section_mb = 16 * 9 * (size // 8) ** 2 * 4 / 2**20  # float32 latents of one section
    held = max(r["max_sections_in_memory"] for r in rows) + 2 * DECODES_IN_FLIGHT
    projected = last["coordinator_peak_rss_mb"] + max(slope, 0) * (ten_minutes - last["sections"]) + held * section_mb
    print(f"\ncoordinator alone: {slope:+.3f} MB per section (least squares over {len(rows)} runs, "
          f"{rows[0]['coordinator_peak_rss_mb']:.0f} MB at {rows[0]['sections']} sections, {last['coordinator_peak_rss_mb']:.0f} MB at "
          f"{last['sections']}); at most {held - 2 * DECODES_IN_FLIGHT} sections' latents held at once. Projected for 10 minutes at "
          f"{size}x{size} ({ten_minutes} sections, {section_mb:.1f} MB of latents a section, {held} held): {projected:.0f} MB")
    return {"slope_mb_per_section": slope, "sections": ten_minutes, "section_latents_mb": section_mb,
            "sections_held": held, "projected_peak_mb": projected}


def spawn(tree: Path, *args: str) -> dict:
    """One measurement in a fresh process with `tree`'s fp_ray first on the path."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    code = subprocess.run([sys.executable, __file__, "--child", *args], env=env, cwd=tree, capture_output=True, text=True)
    if code.returncode != 0:
        return {"error": code.stderr.strip().splitlines()[-1] if code.stderr.strip() else f"exit {code.returncode}"}
    return json.loads(code.stdout.strip().splitlines()[-1])


def least_squares(x: list[float], y: list[float]) -> float:
    """Slope of the least-squares line through (x, y)."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def svg_chart(path: Path, title: str, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str) -> None:
    """A small line chart, without a plotting dependency."""
    w, h, pad = 520, 300, 50
    points = [p for s in series.values() for p in s]
    xmax = max(x for x, _ in points) or 1
    ymax = max(y for _, y in points) * 1.1 or 1
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    sx = lambda x: pad + x / xmax * (w - 2 * pad)  # noqa: E731
    sy = lambda y: h - pad - y / ymax * (h - 2 * pad)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
             f'<text x="{w / 2}" y="18" text-anchor="middle">{title}</text>',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
             f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">{xlabel}</text>',
             f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle">{ylabel}</text>',
             f'<text x="{pad - 4}" y="{pad}" text-anchor="end">{ymax:.0f}</text>',
             f'<text x="{w - pad}" y="{h - pad + 14}" text-anchor="end">{xmax:.0f}</text>']
    for i, (name, pts) in enumerate(series.items()):
        c = colours[i % len(colours)]
        d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in sorted(pts))
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{d}"/>')
        parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{c}"/>' for x, y in pts]
        parts.append(f'<text x="{pad + 10}" y="{pad + 14 * i}" fill="{c}">{name}</text>')
    path.write_text("\n".join(parts + ["</svg>"]) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, nargs="+", default=[10, 60, 300])
    p.add_argument("--old-up-to", type=float, default=60, help="run the old path up to this length (default %(default)s)")
    p.add_argument("--old-tree", type=Path, default=Path("/tmp/fp-ray-before-segments"),
                   help="a tree holding the old fp_ray/ (git archive ea28ecd fp_ray | tar -x -C DIR)")
    p.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 16], help="sections for the 640x640 run")
    p.add_argument("--window", type=int, default=1,
                   help="latent window of the 640x640 run (default %(default)s: small chunks, so many sections fit the time)")
    p.add_argument("--reuse", type=Path, help="rows this script printed (JSON lines): kinds present there are not measured again")
    p.add_argument("--coordinator", type=float, nargs="*", default=[10, 60, 300],
                   help="video lengths for the coordinator alone over Ray actors (none: skip)")
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/long_video.json")
    p.add_argument("--figures", type=Path, default=ROOT / "docs")
    args = p.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "render":
            print(json.dumps(child_render(float(rest[0]), rest[1])))
        elif kind == "coordinator":
            print(json.dumps(child_coordinator(float(rest[0]), rest[1])))
        else:
            print(json.dumps(child_synthetic(int(rest[0]), int(rest[1]), int(rest[2]))))
        return

    reused = [json.loads(line) for line in args.reuse.read_text().splitlines() if line.strip()] if args.reuse else []
    renders = [r for r in reused if "seconds" in r]
    with tempfile.TemporaryDirectory() as tmp:
        for seconds in [] if renders else args.seconds:
            row = {"seconds": seconds, "new": spawn(ROOT, "render", str(seconds), f"{tmp}/new.mp4")}
            if seconds <= args.old_up_to and (args.old_tree / "fp_ray").is_dir():
                row["old"] = spawn(args.old_tree, "render", str(seconds), f"{tmp}/old.mp4")
            for path in ("new", "old"):
                if path in row and "wall_s" in row[path]:
                    row[path]["per_section_s"] = row[path]["wall_s"] / row[path]["sections"]
            renders.append(row)
            print(json.dumps(row), flush=True)
    base = renders[0]["new"]
    print(f"\n{'video':>7} {'sections':>8} | {'new s':>7} {'s/sec':>6} {'x10s':>5} {'peak MB':>8} {'x10s':>5} | "
          f"{'old s':>7} {'s/sec':>6} {'peak MB':>8}")
    for r in renders:
        n, o = r["new"], r.get("old", {})
        old = (f"{o['wall_s']:7.1f} {o['per_section_s']:6.3f} {o['peak_rss_mb']:8.0f}" if "wall_s" in o
               else f"{'-':>7} {'-':>6} {'-':>8}")
        print(f"{r['seconds']:6.0f}s {n['sections']:8d} | {n['wall_s']:7.1f} {n['per_section_s']:6.3f} "
              f"{n['per_section_s'] / base['per_section_s']:5.2f} {n['peak_rss_mb']:8.0f} "
              f"{n['peak_rss_mb'] / base['peak_rss_mb']:5.2f} | {old}")

    coordinator = [r for r in reused if "coordinator_peak_rss_mb" in r]
    with tempfile.TemporaryDirectory() as tmp:
        for seconds in [] if coordinator else args.coordinator:
            row = {"seconds": seconds, **spawn(ROOT, "coordinator", str(seconds), f"{tmp}/ray.mp4")}
            coordinator.append(row)
            print(json.dumps(row), flush=True)
    coordinator_projection = project_coordinator([r for r in coordinator if "coordinator_peak_rss_mb" in r], args.size)

    synthetic = [r for r in reused if "size" in r]
    have = {(r["sections"], r.get("window", 9)) for r in synthetic}
    for n in [n for n in args.sizes if (n, args.window) not in have]:
        row = spawn(ROOT, "synthetic", str(n), str(args.size), str(args.window))
        synthetic.append(row)
        print(json.dumps(row), flush=True)
    ok = [r for r in synthetic if "wall_s" in r and r.get("window", 9) == args.window]
    slope_s = slope_mb = projected = None
    fit = [r for r in ok if r["sections"] >= 2]  # from 2 sections on the largest chunk no longer grows
    if len(fit) >= 3:
        slope_s, slope_mb = (least_squares([r["sections"] for r in fit], [r[k] for r in fit]) for k in ("wall_s", "peak_rss_mb"))
        ten_minutes = round(600 * 30 / (4 * 9))
        last = fit[-1]
        projected = last["peak_rss_mb"] + max(slope_mb, 0) * (ten_minutes - last["sections"])
        print(f"\n{args.size}x{args.size}, window {args.window}: {slope_s:.2f} s and {slope_mb:+.1f} MB peak per extra section "
              f"(least squares over {len(fit)} runs); projected peak for 10 minutes ({ten_minutes} sections): {projected:.0f} MB")

    result = {"machine": platform.platform(), "cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg(),
              "request": REQUEST, "renders": renders, "synthetic": synthetic,
              "synthetic_slope_s_per_section": slope_s, "synthetic_slope_mb_per_section": slope_mb,
              "projected_10min_peak_mb": projected, "coordinator": coordinator,
              "coordinator_projection": coordinator_projection}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.figures.mkdir(parents=True, exist_ok=True)
    series = {"new s/section": [(r["seconds"], r["new"]["per_section_s"]) for r in renders if "per_section_s" in r["new"]]}
    old = [(r["seconds"], r["old"]["per_section_s"]) for r in renders if "per_section_s" in r.get("old", {})]
    if old:
        series["old s/section"] = old
    svg_chart(args.figures / "long_video_time.svg", "tiny checkpoint, 64x48: seconds per section", series, "video seconds", "s")
    series = {"new peak MB": [(r["seconds"], r["new"]["peak_rss_mb"]) for r in renders if "peak_rss_mb" in r["new"]]}
    old = [(r["seconds"], r["old"]["peak_rss_mb"]) for r in renders if "peak_rss_mb" in r.get("old", {})]
    if old:
        series["old peak MB"] = old
    svg_chart(args.figures / "long_video_memory.svg", "tiny checkpoint, 64x48: peak RSS", series, "video seconds", "MB")
    if ok:
        svg_chart(args.figures / "long_video_640.svg", f"{args.size}x{args.size} decode+segment+write (new)",
                  {"wall s": [(r["sections"], r["wall_s"]) for r in ok], "peak MB / 100": [(r["sections"], r["peak_rss_mb"] / 100) for r in ok]},
                  "sections", "")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
