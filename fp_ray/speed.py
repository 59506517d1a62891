"""Speed options for the generator and decoder.

Exact mode keeps the reference's math and only changes how it runs (a tolerance, never a
different video):
- the prompt is cut to its real tokens before the transformer (`trim_text`): the token
  refiner then attends without a padding mask, and the main blocks get the same trimmed
  text diffusers cuts them to at batch size 1;
- `compile`: torch.compile of each transformer block (regional: the 20 double and 40 single
  blocks share two compiled graphs), fusing norms, modulation, RoPE and activations;
- `attention`: a diffusers attention backend (e.g. `_native_cudnn`, `_native_flash`, `flash`);
- the decoder runs on its own CUDA stream (`decode_stream`), so a decode overlaps the next
  section's steps on the GPU, not only on the host.

Fast mode is opt-in and changes the video a little:
- a step cache (`step_cache`): diffusers' MagCache or FirstBlockCache (`CACHE_METHODS`) reuses
  the blocks' last residual in steps it deems close to the last computed one; per request
  (`cache_threshold`, `cache_method`), since it changes the output; with real guidance (cfg > 1)
  the positive and negative passes are cached apart;
- `fp8`: torchao float8 matmuls (dynamic activation + weight scaling, per row) in the
  transformer blocks; needs torchao and a GPU with FP8 tensor cores (compute capability >= 8.9).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from .encode import TextEmbedding

# The step cache's threshold when none is given (`--fast`, `--cache-method`): for MagCache,
# the accumulated error FramePack-Studio uses by default (13 of 25 steps computed); for
# FirstBlockCache, the relative change of the first block's residual under which a step reuses
# the other blocks' last residual (ParaAttention's HunyuanVideo setting is 0.06, about 1.6x at
# 720p). Higher skips more.
FAST_CACHE_THRESHOLD = 0.1

# The step caches a request may pick (`cache_method`):
# - "first_block": diffusers' FirstBlockCache; a step reuses the other blocks' residual when
#   the first block's residual changed by less than the threshold (relative L1).
# - "mag": diffusers' MagCache, FramePack-Studio's default; steps are skipped while the error
#   accumulated from calibrated per-step magnitude ratios of the model's residual stays under
#   the threshold, at most MAG_MAX_SKIPS in a row, never in the first MAG_RETENTION of the
#   steps. Which steps are skipped depends on the ratios alone, not on the weights' values.
CACHE_METHODS = ("first_block", "mag")
MAG_MAX_SKIPS, MAG_RETENTION = 2, 0.25  # FramePack-Studio's defaults (K=2, retention ratio 0.25)
# Magnitude ratios of the transformer's residual from one step to the next, calibrated at 640 px
# and 25 steps (FramePack-Studio's calibration, seed 31337), for the inverted checkpoint
# (FramePackI2V_HY: the inverted and bidirectional schedules) and F1 (the forward schedule).
# diffusers stretches them to other step counts (nearest step).
MAG_RATIOS = {
    "inverted": (1.0, 1.30469, 1.22656, 1.05469, 1.02344, 1.03906, 1.02344, 1.03906, 1.05469, 1.02344, 1.03906,
                 0.99609, 1.02344, 1.03125, 1.01562, 1.02344, 1.00781, 1.03906, 0.98828, 1.0, 1.0, 0.98828,
                 0.94531, 0.93359, 0.78516),
    "forward": (1.0, 1.27344, 1.07031, 1.03906, 1.00781, 1.00781, 1.00781, 1.03125, 1.04688, 1.00781, 1.03125,
                0.99219, 1.01562, 1.01562, 1.01562, 1.00781, 0.98438, 1.05469, 0.98438, 0.96875, 1.03125,
                0.97266, 0.92578, 0.95703, 0.77734),
}


class SpeedOptionError(ValueError):
    """A speed option that cannot be used here (missing package, unsupported device, bad name)."""


@dataclass(frozen=True)
class SpeedOptions:
    """How a generator runs its transformer; set when the worker loads the model."""

    compile: bool = False
    attention: str | None = None  # diffusers AttentionBackendName value; None: torch SDPA's own choice
    fp8: bool = False  # fast mode: FP8 matmuls in the transformer blocks (approximate)

    def __post_init__(self):
        # Checked where the options are given (CLI, config), not first in a worker far away;
        # whether the backend runs on the worker's device is checked there.
        if self.attention is not None:
            from diffusers.models.attention_dispatch import AttentionBackendName

            names = [b.value for b in AttentionBackendName]
            if self.attention not in names:
                raise SpeedOptionError(f"unknown attention backend {self.attention!r}; expected one of {', '.join(names)}")

    @classmethod
    def from_config(cls, config: "SpeedOptions | dict | None") -> "SpeedOptions":
        """From YAML/JSON config (`{compile: true, fp8: false, attention: _native_cudnn}`)."""
        if config is None or isinstance(config, SpeedOptions):
            return config or cls()
        unknown = set(config) - {"compile", "attention", "fp8"}
        if unknown:
            raise SpeedOptionError(f"unknown speed options {sorted(unknown)}; expected compile, attention, fp8")
        return cls(**config)


def transformer_blocks(transformer) -> list[torch.nn.Module]:
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def apply_speed(transformer, options: SpeedOptions, device: torch.device | None = None) -> None:
    """Apply `options` to a loaded transformer, in place, once. FP8 goes first so that the
    compiled graphs see the quantized weights. `device`: where it computes (the policy's; in
    the swap and offload memory modes its weights sit in host RAM between uses)."""
    device = device or next(transformer.parameters()).device
    applied = applied_speed(transformer)
    if applied == options:
        return
    if applied != SpeedOptions():
        raise SpeedOptionError(f"the transformer already runs with {applied}; load a fresh one for {options}")
    if options.fp8:
        quantize_fp8(transformer, device)
    if options.attention:
        set_attention_backend(transformer, options.attention, device)
    if options.compile:
        compile_blocks(transformer)
    transformer._fp_ray_speed = options


def applied_speed(transformer) -> SpeedOptions:
    """The options `apply_speed` applied to this transformer (none: the defaults)."""
    return getattr(transformer, "_fp_ray_speed", SpeedOptions())


CPU_ATTENTION_BACKENDS = ("native", "_native_math", "flex")


def set_attention_backend(transformer, backend: str, device: torch.device) -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName

    names = [b.value for b in AttentionBackendName]
    if backend not in names:
        raise SpeedOptionError(f"unknown attention backend {backend!r}; expected one of {', '.join(names)}")
    if device.type == "cpu" and backend not in CPU_ATTENTION_BACKENDS:
        raise SpeedOptionError(f"attention backend {backend!r} needs a GPU; on the CPU: {', '.join(CPU_ATTENTION_BACKENDS)}")
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    # diffusers also makes the backend the process-wide default, which every other model here
    # whose attention has no backend of its own would then run: keep this one's to itself.
    default = _AttentionBackendRegistry._active_backend
    try:
        transformer.set_attention_backend(backend)
    except (RuntimeError, ImportError) as e:  # the backend's package or device is missing
        raise SpeedOptionError(f"attention backend {backend!r}: {e}") from e
    finally:
        _AttentionBackendRegistry.set_active_backend(default)


def compile_blocks(transformer) -> None:
    """Regional compile: each block's forward, not the whole model, so compile time stays that
    of two block graphs and cache hooks (which wrap `forward`) stay outside the graphs."""
    for block in transformer_blocks(transformer):
        block.forward = torch.compile(block.forward, dynamic=False)


def quantize_fp8(transformer, device: torch.device) -> None:
    """FP8 weights and activations (per-row scales) for the Linear layers of the blocks; the
    embedders, final norm and projection stay in the transformer's dtype."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as e:
        raise SpeedOptionError("fp8 needs torchao: pip install 'fp-ray[fast]' (or torchao matching your torch)") from e
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise SpeedOptionError(f"fp8 needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9), not {device}")
    if transformer.dtype != torch.bfloat16:  # torchao's per-row scaling asserts it
        raise SpeedOptionError(f"fp8 needs the transformer in bfloat16, not {transformer.dtype}")
    # set_inductor_config=False: torchao's default switches on, for the whole process, Inductor's
    # coordinate-descent autotuning of every kernel it compiles afterwards and TF32 for every
    # float32 matmul. With the first, FP8's first compile took 230 s on an H200 (bf16's: 17 s),
    # paid again per frame size; the second would change other models' results in this process.
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    for block in transformer_blocks(transformer):
        quantize_(block, config)


def trim_text(text: TextEmbedding) -> TextEmbedding:
    """Cut the prompt to its real tokens. The mask is ones then zeros (right padding), so the
    first `mask.sum()` tokens are the prompt; anything else is returned unchanged."""
    n = int(text.mask[0].sum())
    if n == 0 or bool(text.mask[0, n:].any()):
        return text
    return TextEmbedding(embeds=text.embeds[:, :n], mask=text.mask[:, :n], pooled=text.pooled)


def cache_config(method: str, threshold: float, steps: int, schedule: str):
    """diffusers' config of the step cache `method` (CACHE_METHODS) for a section of `steps`
    transformer calls (one per sampler step) on the checkpoint of `schedule`."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig

    if method == "first_block":
        return FirstBlockCacheConfig(threshold=threshold)
    if method == "mag":
        ratios = torch.tensor(MAG_RATIOS["forward" if schedule == "forward" else "inverted"])
        return MagCacheConfig(threshold=threshold, max_skip_steps=MAG_MAX_SKIPS, retention_ratio=MAG_RETENTION,
                              num_inference_steps=steps, mag_ratios=ratios)
    raise SpeedOptionError(f"unknown step cache {method!r}; expected one of {', '.join(CACHE_METHODS)}")


@contextmanager
def step_cache(transformer, threshold: float | None, method: str = "first_block", steps: int = 25,
               schedule: str = "inverted") -> Iterator[None]:
    """The step cache over one section's steps (no-op for None; see `cache_config`): enabled
    fresh per section so no residual leaks from one section (or request) into the next. Each
    transformer pass names its cache context (`sampling.velocity`: positive, and negative under
    real guidance), so the two passes of a guided step keep separate cache states."""
    if threshold is None:
        yield
        return
    transformer.enable_cache(cache_config(method, threshold, steps, schedule))
    try:
        yield
    finally:
        transformer.disable_cache()


_streams: dict[torch.device, torch.cuda.Stream] = {}


@contextmanager
def decode_stream(device: torch.device) -> Iterator[None]:
    """Run the enclosed CUDA work on a side stream of `device` (its own per device), so it runs
    alongside the generator's kernels on the default stream; waits for it at the end."""
    if device.type != "cuda":
        yield
        return
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    stream = _streams[device]
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()
