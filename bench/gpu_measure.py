"""Measuring tools of bench/gpu.py: clocks, forward inputs, FLOPs, profiles, host syncs,
the reference pipeline's and fp-ray's end-to-end runs."""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from fp_ray.decode import decode_chunk, decode_input, segment_pixels, split_chunk, to_frames
from fp_ray.encode import Conditioning
from fp_ray.generate import gather_context, noise_stream
from fp_ray.models import Components
from fp_ray.request import RenderRequest
from fp_ray.schedule import Plan
from fp_ray.speed import decode_stream, trim_text
from fp_ray.workers import GeneratorWorker, RenderContext, SectionJob, Shared

from gpu_models import PROMPT, ReferencePipeline, Setup


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


def matmul_peak(setup: Setup) -> dict:
    """bf16 (CPU: fp32) matrix product rate on random data: the MFU denominator."""
    device, n = torch.device(setup.device), setup.matmul_size
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        t = now(device)
        a @ b
        times.append(now(device) - t)
    return {"dtype": str(dtype), "n": n, "tflops": 2 * n**3 / statistics.median(times) / 1e12}


def forward_inputs(c: Components, plan: Plan, cond: Conditioning, trimmed: bool, seed: int = 0) -> dict:
    """The transformer's keyword arguments for the plan's second generated section (it has
    history, as a middle section does) at sigma 0.5, exactly as the sampling loop builds them."""
    device, dtype = c.transformer.device, c.transformer.dtype
    first, section = plan.sections[0], plan.sections[min(1, plan.num_sections - 1)]
    g = torch.Generator("cpu").manual_seed(seed)
    done = {first.position: torch.randn((1, 16, plan.window, plan.latent_height, plan.latent_width), generator=g)}
    context = gather_context(section, cond, done)
    text = trim_text(cond.text[PROMPT]) if trimmed else cond.text[PROMPT]
    idx = context.indices
    if trimmed:  # fp-ray's loop passes the RoPE indices on the device (no host copy per step)
        idx = type(idx)(*(getattr(idx, f).to(device) for f in ("latents", "clean", "history_2x", "history_4x")))
    noise = torch.randn((1, 16, plan.window, plan.latent_height, plan.latent_width), generator=g)
    return dict(
        hidden_states=noise.to(device, dtype), timestep=torch.tensor([500.0], device=device),
        encoder_hidden_states=text.embeds.to(device, dtype), encoder_attention_mask=text.mask.to(device, dtype),
        pooled_projections=text.pooled.to(device, dtype), image_embeds=cond.image_embeds.to(device, dtype),
        indices_latents=idx.latents, guidance=torch.tensor([10000.0], device=device, dtype=dtype),
        latents_clean=context.clean.to(device, dtype), indices_latents_clean=idx.clean,
        latents_history_2x=context.history_2x.to(device, dtype), indices_latents_history_2x=idx.history_2x,
        latents_history_4x=context.history_4x.to(device, dtype), indices_latents_history_4x=idx.history_4x,
        return_dict=False,
    )


@torch.no_grad()
def time_forward(transformer, kwargs: dict, reps: int, warmup: int = 1) -> dict:
    device = transformer.device
    t = now(device)
    for _ in range(warmup):
        out = transformer(**kwargs)[0]
    first = now(device) - t
    times = []
    for _ in range(reps):
        t = now(device)
        out = transformer(**kwargs)[0]
        times.append(now(device) - t)
    return {"seconds": statistics.median(times), "all": times, "warmup_s": first, "finite": bool(torch.isfinite(out).all())}


@torch.no_grad()
def count_flops(transformer, kwargs: dict) -> float:
    with FlopCounterMode(display=False) as counter:
        transformer(**kwargs)
    return float(counter.get_total_flops())


ATTENTION_KERNELS = ("flash", "fmha", "attention", "sdpa", "cudnn", "softmax")
MATMUL_KERNELS = ("gemm", "matmul", "xmma", "cutlass", "nvjet", "addmm", "mm", "linear", "scaled_mm")


@torch.no_grad()
def profile_forward(transformer, kwargs: dict, top: int = 12) -> dict:
    """Top kernels of one forward by device time, and the attention / matmul shares."""
    device = transformer.device
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    transformer(**kwargs)
    sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        transformer(**kwargs)
        sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    if device.type == "cuda":  # kernels only: CPU-side ops carry no device time of their own
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(getattr(e, attr) for e in events) or 1.0
    share = lambda keys: sum(getattr(e, attr) for e in events if any(k in e.key.lower() for k in keys)) / total
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return {
        "total_ms": total / 1e3,
        "attention_share": share(ATTENTION_KERNELS),
        "matmul_share": share(MATMUL_KERNELS),
        "top": [{"name": e.key[:120], "ms": getattr(e, attr) / 1e3, "share": getattr(e, attr) / total, "calls": e.count}
                for e in events[:top]],
    }


def count_syncs(steps_iter, skip_first: int = 1) -> dict:
    """Host-device syncs per step of a section's step iterator (CUDA's sync debug mode); the
    first steps (scheduler set-up) are left out. Where each sync comes from, by source line."""
    per_step, where = [], {}
    torch.cuda.set_sync_debug_mode("warn")
    try:
        for i in range(10**6):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step = next(steps_iter, None)
            if step is None:
                break
            syncs = [w for w in caught if "synchroniz" in str(w.message)]
            if i >= skip_first:
                per_step.append(len(syncs))
                for w in syncs:
                    key = f"{w.filename.rsplit('site-packages/', 1)[-1]}:{w.lineno}"
                    where[key] = where.get(key, 0) + 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
        steps_iter.close()
    return {"per_step": per_step, "where": where}


def dynamo_counts() -> dict:
    """torch.compile's running totals: graphs compiled, recompiles, graph breaks, and frames
    it gave up on (a compiled block that ran eager would show here, not in a timing)."""
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": counters["stats"]["unique_graphs"], "frames_ok": counters["frames"]["ok"],
        "frames_total": counters["frames"]["total"], "recompiles": sum(counters["recompiles"].values()),
        "graph_breaks": sum(counters["graph_break"].values()),
    }


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def run_reference(pipe: ReferencePipeline, cond: Conditioning, image, setup: Setup, width: int, height: int, seed: int) -> dict:
    """diffusers' pipeline end to end (inverted anti-drifting, Euler, untiled VAE as shipped):
    per-section generation time (from the step callback), each decode, the total, and each
    section's final latents in generation order."""
    device = pipe.transformer.device
    text = cond.text[PROMPT]
    marks, latents, decodes = [], [], []
    decode = pipe.vae.decode

    def timed_decode(*args, **kwargs):
        t = now(device)
        out = decode(*args, **kwargs)
        decodes.append(now(device) - t)
        return out

    def on_step(_pipe, i, t, kw):
        if i == setup.steps - 1:
            latents.append(kw["latents"].float().cpu())
            marks.append(now(device))
        return {}

    pipe.vae.decode = timed_decode
    pipe.vae.disable_tiling()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        t0 = now(device)
        video = pipe(
            image=image, prompt_embeds=text.embeds.to(device), prompt_attention_mask=text.mask.to(device),
            pooled_prompt_embeds=text.pooled.to(device), height=height, width=width,
            num_frames=setup.sections * (setup.window * 4 - 3), latent_window_size=setup.window,
            num_inference_steps=setup.steps, guidance_scale=10.0, generator=torch.Generator("cpu").manual_seed(seed),
            sampling_type="inverted_anti_drifting", output_type="np", callback_on_step_end=on_step,
        ).frames[0]
        total = now(device) - t0
    finally:
        del pipe.vae.decode
    starts = [t0] + [m + d for m, d in zip(marks, decodes)]
    sections = [m - s for m, s in zip(marks, starts)]
    frames = (np.clip(video, 0, 1) * 255).round().astype(np.uint8)
    return {"total_s": total, "section_s": sections, "decode_s": decodes, "latents": latents, "frames": frames,
            "peak_gib": peak_gib(device)}


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_fp_ray(c: Components, plan: Plan, cond: Conditioning, request: RenderRequest, overlap: bool = True) -> dict:
    """fp-ray's local path with its own workers, as the coordinator runs them: sections in
    generation order on the generator (the render's context shared once, section k's noise
    from its saved generator state), each chunk decoded (its own thread and CUDA stream) as
    soon as the latents it spans exist, then crossfaded into segments. `overlap=False`
    decodes in line instead. The segments' H.264 encoding is left out: PyAV is not needed to
    time the GPU, and it runs beside the GPU work on the decoder's CPU."""
    device = c.device
    generator = GeneratorWorker(components=c)
    c.vae.enable_tiling(tile_sample_min_height=256, tile_sample_min_width=256)  # as load_components sets it
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    done, chunks, section_s, decode_s, step_s = {}, {}, [], {}, []
    pending = set(s.position for s in plan.sections)
    states = noise_stream(plan, cond, request.seed).section_states(plan.num_sections)

    def decode(position: int) -> torch.Tensor:
        t = time.perf_counter()
        with decode_stream(device):
            chunk = decode_chunk(c.vae, decode_input(plan, plan.section(position), cond, done))
        decode_s[position] = time.perf_counter() - t
        return chunk

    with tempfile.TemporaryDirectory() as store:
        ctx = RenderContext("bench", "bench", request, plan, cond, tuple(states), store)
        shared = Shared(ctx.key, ctx)
        t0 = now(device)
        with ThreadPoolExecutor(1) as pool:
            for section in plan.sections:
                marks, events = [], []
                for event in generator.generate(SectionJob(shared, section.position, dict(done))):
                    marks.append(time.perf_counter())
                    events.append(event)
                done[section.position] = events[-1]["latents"]
                section_s.append(events[-1]["seconds"])
                # diffusers' forward syncs once near its start, so a step's host time is close
                # to the GPU time of the step before it: a slow loop shows here step by step
                step_s.append([round(b - a, 4) for a, b in zip(marks, marks[1:])])
                for s in plan.sections:
                    if s.position in pending and all(p in done for p in s.decode_needs):
                        pending.discard(s.position)
                        chunks[s.position] = pool.submit(decode, s.position) if overlap else decode(s.position)
            ordered = [chunks[p].result() if overlap else chunks[p] for p in range(plan.num_sections)]
        halves = [split_chunk(plan, k, chunk) for k, chunk in enumerate(ordered)]
        segments = [segment_pixels(plan, lead, halves[k - 1][1] if k else None) for k, (lead, _) in enumerate(halves)]
        frames = np.concatenate([to_frames(seg) for seg in segments])
        total = now(device) - t0
    latents = [done[s.position] for s in plan.sections]
    return {"total_s": total, "section_s": section_s, "decode_s": [decode_s[p] for p in sorted(decode_s)],
            "step_s": step_s, "latents": latents, "frames": frames, "peak_gib": peak_gib(device)}
