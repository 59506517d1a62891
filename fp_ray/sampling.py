"""Per-section flow-matching sampling.

euler: FlowMatchEulerDiscreteScheduler from the checkpoint's scheduler config, driven
exactly as diffusers' HunyuanVideoFramepackPipeline drives it.
unipc: the official demo's FlowMatch UniPC (`unipc.py`) on flow sigmas shifted by
mu = min(flux mu, ln 7).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.guiders.guider_utils import rescale_noise_cfg
from diffusers.utils.torch_utils import randn_tensor

from .encode import TextEmbedding
from .packing import PackedIndices
from .unipc import flow_sigmas, sample as unipc_sample

SAMPLERS = ("unipc", "euler")
MAX_SHIFT_EXP = 7.0


@dataclass(frozen=True)
class PackedContext:
    """The clean latents a section reads, with their RoPE indices. float32, (1, 16, T, h, w)."""

    clean: torch.Tensor  # prefix + 1x, T = 2
    history_2x: torch.Tensor  # T = 2
    history_4x: torch.Tensor  # T = 16
    indices: PackedIndices


def flux_mu(sequence_length: float, base_len: int = 256, max_len: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's resolution-dependent shift, capped at ln 7 as FramePack does."""
    slope = (max_shift - base_shift) / (max_len - base_len)
    mu = sequence_length * slope + (base_shift - slope * base_len)
    return min(mu, math.log(MAX_SHIFT_EXP))




Draw = tuple[tuple[int, ...], torch.dtype]


class NoiseStream:
    """The request's random stream: image-latent draws, then one draw per section.

    The reference takes every random number from one generator: image latents first,
    then each section's noise in generation order. Section k's noise is draw k after the
    image draws, so it is a pure function of (seed, k) wherever and whenever it is asked
    for. Asking in increasing order (a local render) continues the generator; asking out
    of order replays the stream from the seed.
    """

    def __init__(self, seed: int, image_draws: list[Draw], shape: tuple[int, ...]):
        self.seed, self.image_draws, self.shape = seed, image_draws, shape
        self._generator: torch.Generator | None = None
        self._next = 0

    def _restart(self) -> None:
        self._generator = torch.Generator("cpu").manual_seed(self.seed)
        for shape, dtype in self.image_draws:
            randn_tensor(shape, generator=self._generator, dtype=dtype)
        self._next = 0

    def section_states(self, count: int) -> list[torch.Tensor]:
        """The generator's state before each of the first `count` section draws, taken in one
        pass: with them section k's noise is one draw (`draw_at`), not a replay of k draws."""
        self._restart()
        states = []
        for _ in range(count):
            states.append(self._generator.get_state())
            randn_tensor(self.shape, generator=self._generator, dtype=torch.float32)
        self._next = count
        return states

    def draw_at(self, state: torch.Tensor) -> torch.Tensor:
        """The section draw that starts at generator `state` (from `section_states`)."""
        generator = torch.Generator("cpu")
        generator.set_state(state)
        return randn_tensor(self.shape, generator=generator, dtype=torch.float32)

    def draw(self, order: int) -> torch.Tensor:
        if self._generator is None or order < self._next:
            self._restart()
        while self._next < order:
            randn_tensor(self.shape, generator=self._generator, dtype=torch.float32)
            self._next += 1
        self._next += 1
        return randn_tensor(self.shape, generator=self._generator, dtype=torch.float32)


def text_inputs(transformer, text: TextEmbedding, device: torch.device | None = None) -> dict:
    """The prompt's transformer keyword arguments (the part the negative pass replaces)."""
    device, dtype = device or transformer.device, transformer.dtype
    return dict(
        encoder_hidden_states=text.embeds.to(device, dtype),
        encoder_attention_mask=text.mask.to(device, dtype),
        pooled_projections=text.pooled.to(device, dtype),
    )


def transformer_inputs(transformer, text: TextEmbedding, image_embeds: torch.Tensor, context: PackedContext,
                       guidance: float, device: torch.device | None = None) -> dict:
    """The transformer's keyword arguments that stay fixed over a section's steps, on the
    device it computes on (`device`: where an offloaded transformer's weights come to). The
    RoPE indices go there too: the model would copy them from host memory at every step,
    each copy a host sync (4 of the 5 per step measured on an H200)."""
    device, dtype = device or transformer.device, transformer.dtype
    idx = context.indices
    return dict(
        **text_inputs(transformer, text, device),
        image_embeds=image_embeds.to(device, dtype),
        indices_latents=idx.latents.to(device),
        guidance=torch.tensor([guidance], dtype=dtype, device=device) * 1000.0,
        latents_clean=context.clean.to(device, dtype),
        indices_latents_clean=idx.clean.to(device),
        latents_history_2x=context.history_2x.to(device, dtype),
        indices_latents_history_2x=idx.history_2x.to(device),
        latents_history_4x=context.history_4x.to(device, dtype),
        indices_latents_history_4x=idx.history_4x.to(device),
        return_dict=False,
    )


@dataclass(frozen=True)
class RealGuidance:
    """Real classifier-free guidance (the official demo's cfg, n_prompt, rs; diffusers'
    true_cfg_scale): a second pass per step on the negative prompt's inputs."""

    scale: float  # > 1
    rescale: float  # 0..1: how far the guided velocity's std is pulled back to the positive one's
    negative: dict  # transformer inputs: the positive ones with the negative prompt's text


def _branch(transformer, name: str, inputs: dict, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    # With the step cache on, each pass keeps its own cache state (diffusers' cache_context,
    # as its pipelines name "cond" and "uncond"): the negative pass never reuses, or is
    # compared against, the positive pass's residuals.
    with transformer.cache_context(name) if transformer.is_cache_enabled else nullcontext():
        return transformer(hidden_states=x, timestep=timestep, **inputs)[0]


def velocity(transformer, inputs: dict, x: torch.Tensor, timestep: torch.Tensor, real: RealGuidance | None = None) -> torch.Tensor:
    """The flow velocity at x (in the transformer's dtype) and `timestep`, float32. With real
    guidance, v = v_neg + scale * (v_pos - v_neg), then rescaled as diffusers' and the demo's
    rescale_noise_cfg, in float32 as the demo's fm_wrapper (diffusers' pipeline: in the
    transformer's dtype, the same on the CPU)."""
    positive = _branch(transformer, "positive", inputs, x, timestep).float()
    if real is None:
        return positive
    negative = _branch(transformer, "negative", real.negative, x, timestep).float()
    guided = negative + real.scale * (positive - negative)
    return rescale_noise_cfg(guided, positive, real.rescale) if real.rescale > 0 else guided


def x0_prediction(transformer, inputs: dict, x: torch.Tensor, sigma: torch.Tensor, real: RealGuidance | None = None) -> torch.Tensor:
    """The clean sample the flow model predicts, x0 = x - sigma * v, float32; the model sees
    x and sigma * 1000 in its own precision, as the official demo's wrapper feeds it."""
    dtype = transformer.dtype
    x = x.to(dtype)
    return x.float() - velocity(transformer, inputs, x, (sigma * 1000.0).to(dtype), real) * sigma.float()


def section_mu(transformer, scheduler_config: dict, shape: torch.Size) -> float:
    _, _, frames, height, width = shape
    return flux_mu(
        frames * height * width / transformer.config.patch_size**2,
        scheduler_config.get("base_image_seq_len", 256),
        scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5),
        scheduler_config.get("max_shift", 1.15),
    )


@torch.no_grad()
def denoise(
    transformer,
    scheduler_config: dict,
    sampler: str,
    steps: int,
    guidance: float,
    noise: torch.Tensor,
    text: TextEmbedding,
    image_embeds: torch.Tensor,
    context: PackedContext,
    device: torch.device | None = None,
    cfg: float = 1.0,
    cfg_rescale: float = 0.0,
    negative: TextEmbedding | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (step, steps, latents) after each sampler step; the last latents are the clean
    section. A consumer that stops iterating stops the work between two steps. `device`:
    where the transformer computes (default: where its weights are). `cfg` above 1: real
    guidance against the `negative` prompt, two transformer passes per step; 1: one pass."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    if cfg > 1 and negative is None:
        raise ValueError(f"cfg {cfg:g} needs the negative prompt's embedding")
    device = device or transformer.device
    mu = section_mu(transformer, scheduler_config, noise.shape)
    fixed = transformer_inputs(transformer, text, image_embeds, context, guidance, device)
    real = RealGuidance(cfg, cfg_rescale, {**fixed, **text_inputs(transformer, negative, device)}) if cfg > 1 else None
    latents = noise.to(device)
    if sampler == "unipc":
        model = lambda x, sigma: x0_prediction(transformer, fixed, x, sigma, real)  # noqa: E731
        for i, latents in enumerate(unipc_sample(model, latents, flow_sigmas(steps, mu))):
            yield i + 1, steps, latents
        return
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1], device=device, mu=mu)
    dtype = transformer.dtype
    for i, t in enumerate(scheduler.timesteps):
        v = velocity(transformer, fixed, latents.to(dtype), t.expand(1), real)
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
        yield i + 1, steps, latents
