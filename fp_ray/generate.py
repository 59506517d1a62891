"""Generate one section: gather its packed context, draw its noise, run the sampler."""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from .encode import Conditioning
from .lora import LoraFile, lora_scope
from .packing import HISTORY_FRAMES, HISTORY_SIZES
from .sampling import NoiseStream, PackedContext, denoise
from .schedule import Plan, Section
from .speed import step_cache, trim_text

LATENT_CHANNELS = 16


def gather_context(section: Section, cond: Conditioning, done: Mapping[int, torch.Tensor]) -> PackedContext:
    """Assemble a section's clean context from the latents of the sections it depends on.

    forward: the past is [start latent, sections...]; its last 19 frames, zero-filled on
    the left, split 4x | 2x | 1x. inverted/bidirectional: the future is [end latent?,
    sections...]; its first 19 frames, zero-filled on the right, split 1x | 2x | 4x. Zeros
    stand for frames that do not exist, as in the reference's zero-initialised history.
    """
    start = cond.start_latent
    n1, n2, n4 = HISTORY_SIZES
    # An extended clip (extend.py) is the past before section 0 (forward) or the future after the
    # last section (inverted): a section whose history runs up to it reads on into it; one whose
    # history is full already cuts it off below. Forward, the clip's latents stand for a render's
    # [start latent, sections...]: its first frame, or frames later than the history reaches.
    clip = [] if cond.clip is None else [cond.clip]
    if section.layout.order == "forward":
        past = torch.cat((clip or [start]) + [done[p] for p in section.history], dim=2)[:, :, -HISTORY_FRAMES:]
        past = F.pad(past, (0, 0, 0, 0, HISTORY_FRAMES - past.shape[2], 0))
        four, two, one = past.split([n4, n2, n1], dim=2)
        prefix = start
    else:
        left, right = section.anchors
        left_anchor = start if left is None else cond.keyframe_latents[left]
        right_anchor = cond.end_latent if right is None else cond.keyframe_latents[right]
        parts = ([right_anchor] if section.history_starts_with_end else []) + [done[p] for p in section.history] + clip
        future = torch.cat(parts, dim=2)[:, :, :HISTORY_FRAMES] if parts else start[:, :, :0]
        future = F.pad(future, (0, 0, 0, 0, 0, HISTORY_FRAMES - future.shape[2]))
        one, two, four = future.split([n1, n2, n4], dim=2)
        prefix = left_anchor if section.prefix is None else done[section.prefix][:, :, -1:]
    return PackedContext(
        clean=torch.cat([prefix, one], dim=2),
        history_2x=two,
        history_4x=four,
        indices=section.layout.indices(),
    )


def section_image_embeds(section: Section, cond: Conditioning) -> torch.Tensor:
    """The SigLIP embedding a section reads: with keyframes, the average of the two images
    around its span (the start image or a keyframe on the left; a keyframe, else the end image
    if any, on the right), as the start and end images average without them."""
    if not cond.keyframe_latents:
        return cond.image_embeds
    left, right = section.anchors
    a = cond.start_embeds if left is None else cond.keyframe_embeds[left]
    b = cond.end_embeds if right is None else cond.keyframe_embeds[right]
    return a if b is None else (a + b) / 2


def noise_stream(plan: Plan, cond: Conditioning, seed: int) -> NoiseStream:
    """The request's noise stream: the image latent draws (start, end, keyframes) come first."""
    image_draws = [(tuple(cond.start_latent.shape), cond.vae_dtype)] * cond.image_draws
    shape = (1, LATENT_CHANNELS, plan.window, plan.latent_height, plan.latent_width)
    return NoiseStream(seed, image_draws, shape)


def section_steps(
    components,
    plan: Plan,
    section: Section,
    cond: Conditioning,
    done: Mapping[int, torch.Tensor],
    noise: torch.Tensor,
    *,
    sampler: str,
    steps: int,
    guidance: float,
    cache_threshold: float | None = None,
    cache_method: str = "first_block",
    cfg: float = 1.0,
    cfg_rescale: float = 0.0,
    loras: Sequence[LoraFile] = (),
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(step, steps, latents) after each step; the last latents are the section's clean
    (1, 16, window, h, w) float32 latents, on the CPU. `noise`: the section's draw from the
    request's stream (`NoiseStream.draw(section.order)`). Pure in its inputs. The prompt reaches
    the transformer without its padding; `cache_threshold` turns on the step cache (fast mode);
    `cfg` above 1 guides against `cond.negative` (two passes per step).
    `loras` are active, with their weights, for this section only."""
    missing = [p for p in section.depends_on if p not in done]
    if missing:
        raise ValueError(f"section {section.position} needs sections {missing} first")
    run = denoise(
        components.transformer,
        components.scheduler_config,
        sampler,
        steps,
        guidance,
        noise=noise,
        text=trim_text(cond.text[section.prompt]),
        image_embeds=section_image_embeds(section, cond),
        context=gather_context(section, cond, done),
        device=components.device,
        cfg=cfg,
        cfg_rescale=cfg_rescale,
        negative=None if cond.negative is None else trim_text(cond.negative),
    )
    cache = step_cache(components.transformer, cache_threshold, cache_method, steps, plan.schedule)
    with cache, lora_scope(components.transformer, loras):
        for step, total, latents in run:
            yield step, total, latents.cpu() if step == total else latents

