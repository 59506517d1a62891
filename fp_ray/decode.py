"""Decode sections on the VAE and cut the video into segments with the reference soft-append.

Chunk k (time order) is section k's decode span. Neighbouring chunks share `overlap` pixel
frames, which the reference crossfades (soft-append); no output frame depends on more than
two chunks, so the timeline cuts into segments at fixed places:

    segment 0 = lead 0                      lead k = chunk k without its tail
    segment k = crossfade(tail k-1, lead k) tail k = the last `overlap` frames of chunk k

Segment k is final once chunks k-1 and k are decoded, whatever order they decode in; its
frames are those of the old whole-video fold, bit for bit (same ops on the same values).

A loop is a cycle: the last chunk decodes across the wrap and has a tail too, and segment 0 =
crossfade(tail N-1, lead 0), so the last frame runs into the first when the video repeats
(one chunk: its tail crossfades into its own head).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from .encode import Conditioning
from .extend import seam_context
from .models import untiled
from .schedule import Plan, Section


def full_latents(plan: Plan, cond: Conditioning, done: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """(1, 16, 1 + N*window, h, w): the start latent followed by every section in time order."""
    return torch.cat([cond.start_latent] + [done[p] for p in range(plan.num_sections)], dim=2)


def decode_input(plan: Plan, section: Section, cond: Conditioning, done: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """The latent frames `section`'s chunk decodes, its decode_span of the full video; in a
    loop, frames past the end wrap round to the start latent and section 0."""
    start, stop = section.decode_span
    parts, frame = [], start
    while frame < stop:
        at = frame % plan.latent_frames
        source = cond.start_latent if at == 0 else done[(at - 1) // plan.window][:, :, (at - 1) % plan.window :]
        parts.append(source[:, :, : stop - frame])
        frame += parts[-1].shape[2]
    span = torch.cat(parts, dim=2)
    context = seam_context(plan, section, cond)  # extending a clip forward: decode after its last frames
    return span if context is None else torch.cat([context, span[:, :, 1:]], dim=2)


def previous_chunk(plan: Plan, segment: int) -> int | None:
    """The chunk whose tail segment `segment` starts with: the one before; for segment 0 none,
    or in a loop the last chunk (itself, when there is one)."""
    if segment > 0:
        return segment - 1
    return plan.num_sections - 1 if plan.loop else None


def next_chunk(plan: Plan, position: int) -> int | None:
    """The chunk whose segment chunk `position`'s tail starts (None: it has no tail)."""
    if position < plan.num_sections - 1:
        return position + 1
    return 0 if plan.loop else None


# Peak memory of a spatially whole HunyuanVideo VAE decode in fp16, per pixel of frame area
# (its temporal tiles bound the frame count): 21.4 GiB over the weights at 640x640, measured on
# an H200 (docs/benchmarks.md), is 55 KiB; with a margin.
UNTILED_DECODE_BYTES_PER_PIXEL = 64 * 1024
# Left free beside a whole-frame decode for a generator sharing the GPU (its activations peak at
# about 4 GiB over the weights at 640x640).
DECODE_HEADROOM_BYTES = 4 * 1024**3


def decode_fits_untiled(device: torch.device, height: int, width: int) -> bool:
    """Whether a whole-frame decode of `height` x `width` pixels fits in the memory `device` has
    free now (the CUDA free memory plus this process's cached, unused blocks). Never on the CPU:
    there the tiles bound host RAM."""
    if device.type != "cuda":
        return False
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return UNTILED_DECODE_BYTES_PER_PIXEL * height * width + DECODE_HEADROOM_BYTES <= free


@torch.no_grad()
def decode_chunk(vae, latents: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """VAE-decode latents (1, 16, T, h, w) -> pixels (1, 3, 4(T-1)+1, 8h, 8w) in [-1, 1], VAE dtype.
    Whole frames, as the reference decodes, where the GPU has room (`decode_fits_untiled`; several
    times faster than tiles: docs/benchmarks.md), else the VAE's spatial tiles, also when the
    whole decode runs out of memory after all (another process took the room).
    `device`: where the VAE computes (the policy's; an offloaded VAE's weights sit in host RAM
    between uses, and its hook moves only the weights)."""
    device = torch.device(device or vae.device)
    z = latents.to(device=device, dtype=vae.dtype) / vae.config.scaling_factor
    if decode_fits_untiled(device, 8 * z.shape[-2], 8 * z.shape[-1]):
        try:
            return untiled(vae).decode(z, return_dict=False)[0].cpu()
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
    return vae.decode(z, return_dict=False)[0].cpu()


def soft_append(history: torch.Tensor, current: torch.Tensor, overlap: int) -> torch.Tensor:
    """Crossfade the last `overlap` frames of history into the first of current (dim 2),
    with the reference's linear weights, in history's dtype."""
    if overlap <= 0:
        return torch.cat([history, current], dim=2)
    weights = torch.linspace(1, 0, overlap, dtype=history.dtype, device=history.device).view(1, 1, -1, 1, 1)
    blended = weights * history[:, :, -overlap:] + (1 - weights) * current[:, :, :overlap]
    return torch.cat([history[:, :, :-overlap], blended, current[:, :, overlap:]], dim=2).to(history)


def split_chunk(plan: Plan, position: int, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(lead, tail) of chunk `position`: the tail is what the next chunk crossfades into
    (None for the last chunk, unless the video loops)."""
    if next_chunk(plan, position) is None:
        return chunk, None
    overlap = plan.overlap_frames
    return chunk[:, :, :-overlap], chunk[:, :, -overlap:]


def segment_pixels(plan: Plan, lead: torch.Tensor, previous_tail: torch.Tensor | None) -> torch.Tensor:
    """Segment k's pixels (1, 3, F, H, W): lead k, crossfaded from tail `previous_chunk(k)`
    (None for segment 0 of a video that does not loop)."""
    return lead if previous_tail is None else soft_append(previous_tail, lead, plan.overlap_frames)


def segment_frames(plan: Plan) -> list[int]:
    """Pixel frames of each segment, a pure function of the plan: its place in the mp4."""
    overlap = plan.overlap_frames
    counts = []
    for s in plan.by_position():
        start, stop = s.decode_span
        frames = 4 * (stop - start - 1) + 1
        counts.append(frames - (0 if next_chunk(plan, s.position) is None else overlap))
    return counts


def to_frames(video: torch.Tensor) -> np.ndarray:
    """(1, 3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8, rounding as diffusers' numpy_to_pil."""
    x = (video[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).numpy()
    return (x * 255).round().astype(np.uint8)
