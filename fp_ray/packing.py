"""FramePack context packing: the released checkpoints' layout and the paper's general math.

A section's transformer input is [4x history | 2x history | clean (prefix + 1x) | window]
tokens. Each part carries its own RoPE frame indices; the indices are what tell the
model where in time a context frame sits relative to the window being denoised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

# Released checkpoints: 1x (patch 1x2x2), 2x (2x4x4), 4x (4x8x8); sizes in latent frames.
HISTORY_SIZES: tuple[int, int, int] = (1, 2, 16)
HISTORY_FRAMES = sum(HISTORY_SIZES)
PATCH_1X = (1, 2, 2)
PATCH_2X = (2, 4, 4)
PATCH_4X = (4, 8, 8)

Order = Literal["inverted", "forward"]


@dataclass(frozen=True)
class PackedIndices:
    """RoPE frame indices (1-D int64) of each part of one section's packed input."""

    latents: torch.Tensor  # window being denoised, (window,)
    clean: torch.Tensor  # prefix + 1x history, (2,)
    history_2x: torch.Tensor  # (2,)
    history_4x: torch.Tensor  # (16,)


@dataclass(frozen=True)
class ContextLayout:
    """Where a section's window and its clean context sit on the frame-index axis.

    inverted (FramePackI2V_HY): [prefix | padding | window | gap | 1x | 2x | 4x]; the
    history is the *future* of the window. `gap` is 0 in the reference; bidirectional
    fills use it when their right neighbour is not adjacent.
    forward (F1): [prefix | 4x | 2x | 1x | window]; the history is the *past*.
    """

    order: Order
    window: int
    padding: int = 0
    gap: int = 0

    def indices(self) -> PackedIndices:
        n1, n2, n4 = HISTORY_SIZES
        if self.order == "inverted":
            window_start = 1 + self.padding
            history_start = window_start + self.window + self.gap
            latents = torch.arange(window_start, window_start + self.window)
            one = torch.arange(history_start, history_start + n1)
            two = torch.arange(history_start + n1, history_start + n1 + n2)
            four = torch.arange(history_start + n1 + n2, history_start + HISTORY_FRAMES)
        else:
            four = torch.arange(1, 1 + n4)
            two = torch.arange(1 + n4, 1 + n4 + n2)
            one = torch.arange(1 + n4 + n2, 1 + HISTORY_FRAMES)
            latents = torch.arange(1 + HISTORY_FRAMES, 1 + HISTORY_FRAMES + self.window)
        clean = torch.cat([torch.zeros(1, dtype=torch.int64), one])
        return PackedIndices(latents=latents, clean=clean, history_2x=two, history_4x=four)


def patch_tokens(frames: int, height: int, width: int, kernel: Sequence[int]) -> int:
    """Tokens a (frames, height, width) latent block yields under a patchify kernel.

    Matches diffusers' packing: the block is replicate-padded up to a multiple of the kernel.
    """
    kt, kh, kw = kernel
    return math.ceil(frames / kt) * math.ceil(height / kh) * math.ceil(width / kw)


@dataclass(frozen=True)
class ContextTokens:
    window: int
    clean: int
    history_2x: int
    history_4x: int

    @property
    def context(self) -> int:
        return self.clean + self.history_2x + self.history_4x

    @property
    def total(self) -> int:
        return self.window + self.context


def context_tokens(window: int, latent_height: int, latent_width: int) -> ContextTokens:
    """Transformer tokens of one section of the released layout (text tokens excluded)."""
    n1, n2, n4 = HISTORY_SIZES
    return ContextTokens(
        window=patch_tokens(window, latent_height, latent_width, PATCH_1X),
        clean=patch_tokens(1 + n1, latent_height, latent_width, PATCH_1X),
        history_2x=patch_tokens(n2, latent_height, latent_width, PATCH_2X),
        history_4x=patch_tokens(n4, latent_height, latent_width, PATCH_4X),
    )


# ---- the paper's general form -------------------------------------------------------


def frame_context_length(frame_length: float, compression: float, i: int) -> float:
    """phi(F_i) = L_f / lambda^i: context length of the i-th most important input frame."""
    return frame_length / compression**i


def total_context_length(frame_length: float, compression: float, input_frames: int, predicted_frames: int) -> float:
    """L = S*L_f + L_f * (1 - 1/lambda^T) / (1 - 1/lambda)."""
    lam = compression
    return predicted_frames * frame_length + frame_length * (1 - lam**-input_frames) / (1 - 1 / lam)


def context_length_bound(frame_length: float, compression: float, predicted_frames: int) -> float:
    """lim_{T->inf} L = L_f * (S + lambda / (lambda - 1)): the context never grows past this."""
    lam = compression
    return frame_length * (predicted_frames + lam / (lam - 1))


def level_rates(compression: float, repeats: Sequence[int]) -> list[float]:
    """Relative context length of each input frame when level i (rate 1/lambda^i) is used
    for repeats[i] frames, e.g. lambda=2, repeats=(1, 2, 2, 1) -> 1, 1/2, 1/2, 1/4, 1/4, 1/8."""
    return [compression**-level for level, count in enumerate(repeats) for _ in range(count)]


def packed_length(frame_length: float, rates: Sequence[float], predicted_frames: int = 0) -> float:
    """Context length of frames packed at the given relative rates, plus S full frames."""
    return frame_length * (predicted_frames + sum(rates))


def equal_compression_kernels(volume: int) -> list[tuple[int, int, int]]:
    """Square-spatial patchify kernels (t, s, s) of one volume, i.e. the same compression,
    from most spatial to most temporal: 64 -> (1,8,8), (4,4,4), (16,2,2), (64,1,1)."""
    kernels = []
    for t in range(1, volume + 1):
        if volume % t:
            continue
        side = math.isqrt(volume // t)
        if side * side == volume // t:
            kernels.append((t, side, side))
    return kernels


Tail = Literal["drop", "global_average", "pool3d"]


def pack_tail(tail: torch.Tensor, option: Tail, kernel: Sequence[int] = PATCH_4X) -> torch.Tensor | None:
    """Reduce the frames past the last compression level, (B, C, T, H, W).

    drop: nothing is kept. global_average: one frame, the mean over time (the model then
    patchifies it with the last level's kernel). pool3d: average-pool with the kernel,
    keeping every kernel-sized block as one voxel.
    """
    if option == "drop" or tail.shape[2] == 0:
        return None
    if option == "global_average":
        return tail.mean(dim=2, keepdim=True)
    if option == "pool3d":
        return torch.nn.functional.avg_pool3d(tail, kernel_size=tuple(kernel), stride=tuple(kernel), ceil_mode=True)
    raise ValueError(f"unknown tail option {option!r}; expected drop, global_average or pool3d")
