"""Generate one section: gather its packed context, draw its noise, run the sampler."""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from .encode import Conditioning
from .packing import HISTORY_FRAMES, HISTORY_SIZES
from .sampling import PackedContext, noise_draw, sample_section
from .schedule import Plan, Section

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
    if section.layout.order == "forward":
        past = torch.cat([start] + [done[p] for p in section.history], dim=2)[:, :, -HISTORY_FRAMES:]
        past = F.pad(past, (0, 0, 0, 0, HISTORY_FRAMES - past.shape[2], 0))
        four, two, one = past.split([n4, n2, n1], dim=2)
        prefix = start
    else:
        parts = ([cond.end_latent] if section.history_starts_with_end else []) + [done[p] for p in section.history]
        future = torch.cat(parts, dim=2)[:, :, :HISTORY_FRAMES] if parts else start[:, :, :0]
        future = F.pad(future, (0, 0, 0, 0, 0, HISTORY_FRAMES - future.shape[2]))
        one, two, four = future.split([n1, n2, n4], dim=2)
        prefix = start if section.prefix is None else done[section.prefix][:, :, -1:]
    return PackedContext(
        clean=torch.cat([prefix, one], dim=2),
        history_2x=two,
        history_4x=four,
        indices=section.layout.indices(),
    )


def noise_shape(plan: Plan) -> tuple[int, ...]:
    return (1, LATENT_CHANNELS, plan.window, plan.latent_height, plan.latent_width)


def section_noise(plan: Plan, section: Section, seed: int, image_draws: list[tuple[tuple[int, ...], torch.dtype]]) -> torch.Tensor:
    """The section's noise: draw number `order` after the image latents' draws."""
    shape = noise_shape(plan)
    return noise_draw(seed, image_draws + [(shape, torch.float32)] * section.order, shape)


def generate_section(
    components,
    plan: Plan,
    section: Section,
    cond: Conditioning,
    done: Mapping[int, torch.Tensor],
    *,
    seed: int,
    sampler: str,
    steps: int,
    guidance: float,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """(1, 16, window, h, w) float32 clean latents of `section`. Pure in its inputs."""
    missing = [p for p in section.depends_on if p not in done]
    if missing:
        raise ValueError(f"section {section.position} needs sections {missing} first")
    vae_dtype = components.vae.dtype
    image_shape = tuple(cond.start_latent.shape)
    draws = [(image_shape, vae_dtype)] * (1 if cond.end_latent is None else 2)
    return sample_section(
        components.transformer,
        components.scheduler_config,
        sampler,
        steps,
        guidance,
        noise=section_noise(plan, section, seed, draws),
        text=cond.text[section.prompt],
        image_embeds=cond.image_embeds,
        context=gather_context(section, cond, done),
        on_step=on_step,
    ).cpu()
