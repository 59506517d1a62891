"""fp-ray against diffusers' HunyuanVideoFramepackPipeline on one GPU, in one run.

Builds the full-size 13B FramePack transformer (FramePackI2V_HY config) and the HunyuanVideo
VAE with random weights directly on the GPU (timing does not depend on weight values), with
random encoder outputs of the real shapes, and measures side by side: time per forward (and
MFU against a bf16 matmul measured here), per section, per decode and end to end for a
2-section video, peak memory; every speed option on and off; exact mode's latent difference
from the reference and fast mode's PSNR against exact mode. Parts run in order of importance
under a time budget; one that would not fit is skipped, one that overruns its own limit is
stopped, and the JSON is rewritten after every part.

    python bench/gpu.py                 # full size on CUDA, ~8 minutes on an H100
    python bench/gpu.py --tiny          # the tiny checkpoint on the CPU, end to end
    python bench/gpu.py --table bench/results/gpu.json   # rewrite the docs table from a result
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import diffusers
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from fp_ray.encode import plan_request  # noqa: E402
from fp_ray.generate import noise_stream, section_steps  # noqa: E402
from fp_ray.request import make_request  # noqa: E402
from fp_ray.speed import FAST_CACHE_THRESHOLD, compile_blocks, quantize_fp8, set_attention_backend  # noqa: E402

import gpu_measure as m  # noqa: E402
from gpu_models import FULL, PROMPT, TINY, Setup, build_components, conditioning, reference_pipeline  # noqa: E402
from gpu_table import write_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SEED = 31337


class PartTimeout(Exception):
    """A part ran past its own time limit."""


class Runner:
    """Runs parts in order under a total budget and writes the JSON after each one."""

    def __init__(self, setup: Setup, out: Path, budget_s: float, parts: set[str] | None = None):
        self.setup, self.out, self.budget_s, self.t0 = setup, out, budget_s, time.perf_counter()
        self.parts = parts
        self.results = {"meta": meta(setup, budget_s), "parts": {}}
        signal.signal(signal.SIGALRM, self._alarm)

    def _alarm(self, *_):
        raise PartTimeout("part ran past its limit")

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def run(self, name: str, fn, estimate_s: float = 0.0) -> dict | None:
        if self.parts is not None and name not in self.parts:
            return None
        record = self.results["parts"][name] = {"status": "running"}
        if self.left() < estimate_s:
            record.update(status="skipped", reason=f"budget: {self.left():.0f} s left, needs ~{estimate_s:.0f} s")
            print(f"[{name}] skipped ({record['reason']})", flush=True)
            self.write()
            return None
        limit = max(1.0, min(self.setup.part_timeout_s, self.left()))
        t, before = time.perf_counter(), m.dynamo_counts()
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            record.update(fn() or {}, status="ok")
        except Exception as e:  # one failed part must not cost the others their results
            if isinstance(e, PartTimeout) or "PartTimeout" in str(e):  # also when raised inside the compiler
                record.update(status="timeout", reason=f"stopped after {limit:.0f} s")
            else:
                record.update(status="error", error=f"{type(e).__name__}: {e}"[:500], trace=traceback.format_exc()[-1500:])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        record["seconds"] = time.perf_counter() - t
        after = m.dynamo_counts()
        record["dynamo"] = {k: v - before[k] for k, v in after.items() if v != before[k]}
        if self.setup.device == "cuda":
            record["gpu_after"] = gpu_state()
        print(f"[{name}] {record['status']} in {record['seconds']:.1f} s: "
              f"{ {k: v for k, v in record.items() if k not in ('status', 'seconds', 'trace', 'top', 'all', 'step_s', 'residual_changes')} }", flush=True)
        self.write()
        return record if record["status"] == "ok" else None

    def write(self) -> None:
        self.results["meta"]["elapsed_s"] = time.perf_counter() - self.t0
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=1, default=float))


def meta(setup: Setup, budget_s: float) -> dict:
    cuda = torch.cuda.is_available() and setup.device == "cuda"
    return {
        "setup": setup.name, "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
        "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "budget_s": budget_s, "steps": setup.steps, "sections": setup.sections, "window": setup.window,
        "sizes": [f"{w}x{h}" for w, h in setup.sizes], "cache_threshold": FAST_CACHE_THRESHOLD,
    }


def bench_request(setup: Setup, width: int, height: int, cache_threshold: float | None = None, cache_method: str = "first_block"):
    return make_request(prompt=PROMPT, width=width, height=height, seconds=setup.sections * setup.window * 4 / 30,
                        window=setup.window, steps=setup.steps, sampler="euler", guidance=10.0, seed=SEED,
                        cache_threshold=cache_threshold, cache_method=cache_method)


def compare(ref: dict, ours: dict) -> dict:
    """Latent difference per section (generation order) and frame difference / PSNR."""
    lat = [float((a - b).abs().max()) for a, b in zip(ref["latents"], ours["latents"])]
    frames = ref["frames"].shape == ours["frames"].shape
    return {
        "max_abs_latent_diff": max(lat) if lat else None,
        "latent_scale": float(max(r.abs().max() for r in ref["latents"])) if ref["latents"] else None,
        "max_frame_diff": int(np.abs(ref["frames"].astype(int) - ours["frames"].astype(int)).max()) if frames else None,
        "psnr_db": m.psnr(ref["frames"], ours["frames"]) if frames else None,
    }


def summary(run: dict) -> dict:
    keys = ("total_s", "section_s", "decode_s", "step_s", "peak_gib")
    return {k: run[k] for k in keys if k in run}


class StepCount:
    """How many steps the step cache computed in full, and the relative change of the first
    block's residual it compared at each step (its formula, recomputed here): counts
    FirstBlockCache's decisions."""

    def __init__(self):
        from diffusers.hooks.first_block_cache import FBCHeadBlockHook

        self.cls, self.original = FBCHeadBlockHook, FBCHeadBlockHook._should_compute_remaining_blocks
        self.decisions: list[bool] = []
        self.changes: list[float] = []

    def __enter__(self):
        original, count = self.original, self

        def decide(hook, residual):
            previous = hook.state_manager.get_state().head_block_residual
            if previous is not None:
                count.changes.append(float((residual - previous).abs().mean() / previous.abs().mean()))
            count.decisions.append(original(hook, residual))
            return count.decisions[-1]

        self.cls._should_compute_remaining_blocks = decide
        return self

    def __exit__(self, *exc):
        self.cls._should_compute_remaining_blocks = self.original


def compile_times_table() -> list[str]:
    """Where compile time went so far (dynamo, AOT, Inductor phases), as torch reports it."""
    from torch._dynamo.utils import compile_times

    return str(compile_times(repr="str", aggregate=True)).splitlines()[:40]


class FullSteps:
    """Counts the transformer calls computed in full, whichever step cache runs: the calls that
    reach the last block's own forward (a cached step skips it)."""

    def __init__(self, transformer):
        self.block, self.count = transformer.single_transformer_blocks[-1], 0

    def __enter__(self):
        inner = self._inner = self.block.forward

        def counted(*args, **kwargs):
            self.count += 1
            return inner(*args, **kwargs)

        self.block.forward = counted
        return self

    def __exit__(self, *exc):
        self.block.forward = self._inner


def gpu_state() -> dict | None:
    """SM clock, temperature and power now (nvidia-smi), to tell a slow part from a slow card."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"nvidia_smi": out} if out else None


def main(setup: Setup, out: Path, docs: Path | None, parts: set[str] | None = None) -> dict:
    runner = Runner(setup, out, setup.budget_s, parts)
    # a recompile, a graph break or a block left eager is named in the log, with its reason
    torch._logging.set_logs(recompiles=True, graph_breaks=True)
    device = torch.device(setup.device)
    state: dict = {}
    (w, h), sizes = setup.sizes[0], setup.sizes
    main_size = f"{w}x{h}"

    def build():
        t = time.perf_counter()
        c = state["c"] = build_components(setup)
        for width, height in sizes:
            cond, image = conditioning(c, setup, width, height, SEED)
            plan = plan_request(bench_request(setup, width, height), width, height)
            state[f"{width}x{height}"] = (cond, image, plan)
        n = sum(p.numel() for p in c.transformer.parameters())
        return {"build_s": time.perf_counter() - t, "transformer_params_b": n / 1e9, "peak_gib": m.peak_gib(device)}

    if not runner.run("build", build):
        return runner.results
    c = state["c"]
    fwd = lambda size, trimmed: m.forward_inputs(c, state[size][2], state[size][0], trimmed)
    t_fwd = lambda: state.get("t_fwd", 1.0)
    e2e_estimate = lambda: setup.sections * setup.steps * t_fwd() * 1.15 + 15

    peak = runner.run("matmul_peak", lambda: m.matmul_peak(setup))
    tflops = peak["tflops"] if peak else None

    def timed(size: str, trimmed: bool, warmup: int = 1) -> dict:
        kwargs = fwd(size, trimmed)
        r = m.time_forward(c.transformer, kwargs, setup.forward_reps, warmup)
        key = f"flops {size} {trimmed}"
        flops = state[key] = state.get(key) or m.count_flops(c.transformer, kwargs)
        r.update(tflop=flops / 1e12, mfu=flops / r["seconds"] / (tflops * 1e12) if tflops else None)
        return r

    def forward_eager():
        r = {}
        for width, height in sizes:
            size = f"{width}x{height}"
            r[size] = {"stock": timed(size, False), "trimmed": timed(size, True)}
        state["t_fwd"] = r[main_size]["stock"]["seconds"]
        return r

    runner.run("forward_eager", forward_eager)
    runner.run("profile_stock", lambda: m.profile_forward(c.transformer, fwd(main_size, False)), 10 * t_fwd())

    def syncs():
        if device.type != "cuda":
            return {"per_step": None, "note": "CUDA only"}
        cond, _, plan = state[main_size]
        section = plan.sections[0]
        steps = section_steps(c, plan, section, cond, {}, noise_stream(plan, cond, SEED).draw(section.order), sampler="euler", steps=4, guidance=10.0)
        return m.count_syncs(steps)

    runner.run("syncs", syncs, 6 * t_fwd())

    def reference():
        cond, image, _ = state[main_size]
        run = state["ref"] = m.run_reference(reference_pipeline(c, cond.image_embeds), cond, image, setup, w, h, SEED)
        return summary(run)

    runner.run("reference_e2e", reference, e2e_estimate())

    def backends():
        kwargs = fwd(main_size, True)
        r = {"native": m.time_forward(c.transformer, kwargs, setup.forward_reps)}
        best = (None, r["native"]["seconds"])
        for backend in setup.attention_backends:
            try:
                set_attention_backend(c.transformer, backend, c.device)
                r[backend] = m.time_forward(c.transformer, kwargs, setup.forward_reps)
                if r[backend]["seconds"] < best[1]:
                    best = (backend, r[backend]["seconds"])
            except Exception as e:  # a backend this device or build lacks: recorded, not fatal
                r[backend] = {"error": f"{type(e).__name__}: {e}"[:300]}
            finally:
                c.transformer.set_attention_backend("native")
        state["backend"] = best[0]
        return {**r, "best": best[0]}

    runner.run("attention_backends", backends, (len(setup.attention_backends) + 1) * (setup.forward_reps + 1) * t_fwd())

    def compiled():
        if state.get("backend"):
            set_attention_backend(c.transformer, state["backend"], c.device)
        compile_blocks(c.transformer)
        state["compiled"] = True
        r = timed(main_size, True, warmup=2)
        state["compile_s"] = r["warmup_s"]
        return {"backend": state.get("backend"), main_size: r, "compile_times": compile_times_table()}

    # a (re)compile takes about as long as the first one did; 30 s is a guess before that
    recompile = lambda: state.get("compile_s", 30) + 4 * t_fwd()
    runner.run("compile", compiled, recompile())

    def exact():
        cond, _, plan = state[main_size]
        run = state["exact"] = m.run_fp_ray(c, plan, cond, bench_request(setup, w, h))
        return {**summary(run), "compiled": state.get("compiled", False), "backend": state.get("backend"),
                "vs_reference": compare(state["ref"], run) if "ref" in state else None}

    runner.run("exact_e2e", exact, e2e_estimate())
    runner.run("profile_exact", lambda: m.profile_forward(c.transformer, fwd(main_size, True)), 10 * t_fwd())
    # The other buckets recompile; they run only if fast mode's parts still fit after them.
    fast_reserve = lambda: recompile() + 1.3 * e2e_estimate()
    others = lambda: {f"{wd}x{ht}": timed(f"{wd}x{ht}", True, warmup=2) for wd, ht in sizes[1:]}
    runner.run("compile_other_sizes", others, recompile() * len(sizes[1:]) + fast_reserve())

    def fp8():
        quantize_fp8(c.transformer, c.device)
        # Compile again from the quantized blocks, as fp-ray's apply_speed orders it (FP8 first).
        # Re-tracing graphs compiled for the bf16 weights once failed on an H100 inside
        # torchao's __torch_function__ ("Polyfill handler ... does not have a traceable function").
        torch._dynamo.reset()
        state["fp8"] = True
        return {main_size: timed(main_size, True, warmup=2), "compile_times": compile_times_table()}

    runner.run("fp8_forward", fp8, recompile())

    def fast(overlap: bool, method: str, threshold=lambda: FAST_CACHE_THRESHOLD):
        def part():
            cond, _, plan = state[main_size]
            with StepCount() as count, FullSteps(c.transformer) as full:
                run = m.run_fp_ray(c, plan, cond, bench_request(setup, w, h, threshold(), method), overlap=overlap)
            state.setdefault("fast", run)
            if count.changes:
                state.setdefault("changes", count.changes)
            return {**summary(run), "fp8": state.get("fp8", False), "overlap": overlap, "method": method,
                    "threshold": threshold(), "steps_computed": full.count, "steps": setup.sections * setup.steps,
                    "residual_changes": [round(x, 4) for x in count.changes],
                    "vs_exact": compare(state["exact"], run) if "exact" in state else None}
        return part

    # Fast mode as --fast runs it: MagCache skips by calibrated ratios, so its speed is the same
    # on random weights as on trained ones (its quality here says nothing).
    runner.run("fast_e2e", fast(True, "mag"), e2e_estimate() * 0.6)
    # FirstBlockCache decides from the first block's residual, which random weights move far
    # more per step than trained ones, so the shipped threshold may skip nothing here: this run
    # first records the residual changes, then picks the threshold that skips about half.
    runner.run("fast_e2e_first_block", fast(True, "first_block"), e2e_estimate())
    median_change = lambda: float(np.median(state["changes"])) if state.get("changes") else FAST_CACHE_THRESHOLD
    runner.run("fast_e2e_half_skipped", fast(True, "first_block", median_change), e2e_estimate() * 0.5)
    runner.run("fast_e2e_decode_inline", fast(False, "mag"), e2e_estimate() * 0.7)
    if state.get("fp8"):
        runner.run("fp8_other_sizes", others, recompile() * len(sizes[1:]))

    def fp8_autotuned():
        # What torchao's recommended Inductor settings, which fp-ray leaves off, would give:
        # coordinate-descent autotuning of every kernel (and TF32, which bf16 work does not
        # use). Last, since they stay set for the rest of the process.
        from torchao.quantization.utils import recommended_inductor_config_setter

        recommended_inductor_config_setter()
        torch._dynamo.reset()
        return {main_size: timed(main_size, True, warmup=2), "compile_times": compile_times_table()}

    if state.get("fp8"):
        runner.run("fp8_autotuned", fp8_autotuned, 240)
    runner.results["meta"]["finished"] = True
    runner.results["meta"]["parts"] = sorted(parts) if parts else "all"
    runner.write()
    if docs is not None:
        write_table(runner.results, docs)
    return runner.results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny checkpoint on the CPU (a check of the whole script)")
    p.add_argument("--budget", type=float, help="total seconds for all parts (default: 470 full, 240 tiny)")
    p.add_argument("--part-timeout", type=float, help="seconds one part may run (default: 150 full, 120 tiny)")
    p.add_argument("--out", type=Path, help="results JSON (default: bench/results/gpu.json, tiny: gpu_tiny_cpu.json)")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md", help="markdown file whose table is rewritten")
    p.add_argument("--parts", help="comma-separated parts to run (default: all; 'build' always runs), e.g. "
                   "build,compile,exact_e2e,fast_e2e,reference_e2e")
    p.add_argument("--table", type=Path, help="only rewrite the docs table from this results JSON")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    if args.table:
        write_table(json.loads(args.table.read_text()), args.docs)
        sys.exit(0)
    setup = TINY if args.tiny else FULL
    if not setup.tiny and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device; run with --tiny on a CPU")
    setup = replace(setup, budget_s=args.budget or setup.budget_s, part_timeout_s=args.part_timeout or setup.part_timeout_s)
    out = args.out or ROOT / "bench" / "results" / ("gpu_tiny_cpu.json" if setup.tiny else "gpu.json")
    main(setup, out, args.docs, {"build", *args.parts.split(",")} if args.parts else None)
