"""One request, start to finish, in this process: validate -> plan -> encode -> generate
-> decode -> assemble -> mp4. The Ray path runs the same functions in actors."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .decode import assemble, decode_chunk, decode_input, full_latents, to_frames
from .encode import Conditioning, encode, load_image
from .generate import generate_section, noise_stream
from .models import Components, cached_components, default_resolution
from .request import RenderRequest, bucket_size
from .schedule import Plan, make_plan
from .video import write_mp4

LATENT_SCALE = 8  # VAE spatial compression

Event = dict
OnEvent = Callable[[Event], None]


def frame_size(request: RenderRequest, image_width: int, image_height: int) -> tuple[int, int]:
    if request.width is not None:
        return request.width, request.height
    return bucket_size(image_width, image_height, request.resolution or default_resolution(request.model))


def plan_request(request: RenderRequest, width: int, height: int) -> Plan:
    return make_plan(
        request.schedule,
        request.num_sections,
        request.window,
        height // LATENT_SCALE,
        width // LATENT_SCALE,
        request.prompts,
        request.seconds_per_section,
        has_end_image=request.end_image is not None,
    )


@dataclass
class RenderResult:
    path: Path | None
    plan: Plan
    latents: torch.Tensor  # (1, 16, 1 + N*window, h, w): start latent + all sections
    frames: "object"  # (F, H, W, 3) uint8
    timings: dict[str, float] = field(default_factory=dict)


def encode_request(c: Components, request: RenderRequest) -> tuple[Plan, Conditioning]:
    start = load_image(request.image_path, "image")
    end = load_image(request.end_image, "end_image") if request.end_image else None
    width, height = frame_size(request, *start.size)
    plan = plan_request(request, width, height)
    prompts = [s.prompt for s in plan.sections]
    return plan, encode(c, prompts, start, width, height, request.seed, end)


def render(
    request: RenderRequest,
    out: str | Path | None,
    components: Components | None = None,
    on_event: OnEvent | None = None,
    preview_dir: str | Path | None = None,
) -> RenderResult:
    """Render `request` to the mp4 at `out` (None: keep frames in memory only).

    Sections run in plan order; each section's chunk is decoded as soon as the latents it
    covers exist, and written as a preview mp4 when `preview_dir` is given.
    """
    emit = on_event or (lambda event: None)
    c = components or cached_components(request.model)
    t0 = time.perf_counter()
    plan, cond = encode_request(c, request)
    timings = {"encode": time.perf_counter() - t0, "generate": 0.0, "decode": 0.0}
    emit({"type": "plan", "sections": plan.num_sections, "frames": plan.pixel_frames})

    noise = noise_stream(c, plan, cond, request.seed)
    done: dict[int, torch.Tensor] = {}
    chunks: dict[int, torch.Tensor] = {}
    for section in plan.sections:
        emit({"type": "section_started", "position": section.position, "order": section.order, "steps": request.steps})
        t = time.perf_counter()
        done[section.position] = generate_section(
            c, plan, section, cond, done, noise,
            sampler=request.sampler, steps=request.steps, guidance=request.guidance,
            on_step=lambda i, n, p=section.position: emit({"type": "step", "position": p, "step": i, "steps": n}),
        )
        elapsed = time.perf_counter() - t
        timings["generate"] += elapsed
        emit({"type": "section_finished", "position": section.position, "seconds": elapsed})
        for ready in plan.sections:
            if ready.position in chunks or any(p not in done for p in ready.decode_needs):
                continue
            t = time.perf_counter()
            chunks[ready.position] = decode_chunk(c.vae, decode_input(plan, ready, cond, done))
            timings["decode"] += time.perf_counter() - t
            if preview_dir is not None:
                preview = Path(preview_dir) / f"section_{ready.position:03d}.mp4"
                write_mp4(to_frames(chunks[ready.position]), preview, request.fps, request.crf)
            emit({"type": "section_decoded", "position": ready.position})

    video = assemble([chunks[p] for p in range(plan.num_sections)], plan.overlap_frames)
    frames = to_frames(video)
    path = None
    if out is not None:
        t = time.perf_counter()
        path = write_mp4(frames, out, request.fps, request.crf)
        timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    emit({"type": "finished", "path": str(path) if path else None, "frames": len(frames)})
    return RenderResult(path=path, plan=plan, latents=full_latents(plan, cond, done), frames=frames, timings=timings)
