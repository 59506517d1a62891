"""The one device, precision and memory policy every render path uses (CLI, `--ray`, batch,
Serve): on a GPU the transformer is bf16, encoders and VAE fp16, as the official demo;
on the CPU everything is fp32. Memory modes decide what stays on the GPU:

- resident: every model on the GPU, loaded straight onto it.
- swap: models live in host RAM and come onto the GPU when they run (accelerate's
  `cpu_offload_with_hook`, the mechanism of diffusers' model CPU offload); the encoders
  (Llama, CLIP, SigLIP, VAE encoder) are sent back once a request is encoded, so the
  transformer and the VAE decoder have the GPU to themselves.
- offload: swap, and the transformer and the Llama text encoder are moved block by block
  (diffusers' group offloading, with a CUDA stream prefetching the next block).

`auto` picks by free GPU memory (docs/memory.md has the figures behind the thresholds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MEMORY_MODES = ("auto", "resident", "swap", "offload")
GIB = 1024**3
# Free GPU memory each mode needs for the 13B checkpoint at 608x640 (docs/memory.md, computed
# from parameter counts): resident peaks at 40.6 GiB, swap at 25.6 GiB, plus margins for the VAE
# decode, the CUDA context and fragmentation (the official demo's own line is 60 GB).
RESIDENT_MIN_FREE_GIB = 56
SWAP_MIN_FREE_GIB = 34


class MemoryModeError(ValueError):
    """An unknown memory mode."""


@dataclass(frozen=True)
class DevicePolicy:
    """Where the models run, in which precision, and which memory mode holds them."""

    device: torch.device
    transformer_dtype: torch.dtype
    encoder_dtype: torch.dtype
    vae_dtype: torch.dtype
    memory: str  # resident | swap | offload

    @property
    def on_gpu(self) -> bool:
        return self.device.type != "cpu"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def free_gpu_bytes(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[0]


def auto_memory_mode(free_bytes: int) -> str:
    if free_bytes >= RESIDENT_MIN_FREE_GIB * GIB:
        return "resident"
    if free_bytes >= SWAP_MIN_FREE_GIB * GIB:
        return "swap"
    return "offload"


def choose_policy(
    device: str | torch.device | None = None,
    transformer_dtype: str | torch.dtype | None = None,
    memory: str = "auto",
    free_bytes: int | None = None,
) -> DevicePolicy:
    """The policy for `device` (None: CUDA when visible, else the CPU). `transformer_dtype`
    overrides the transformer's precision only; `memory` "auto" resolves from the free GPU
    memory (`free_bytes`, measured when None) and to "resident" on the CPU."""
    if memory not in MEMORY_MODES:
        raise MemoryModeError(f"memory mode: expected one of {', '.join(MEMORY_MODES)}, got {memory!r}")
    device = torch.device(device or default_device())
    if isinstance(transformer_dtype, str):
        transformer_dtype = getattr(torch, transformer_dtype)
    if device.type == "cpu":
        dtypes = (torch.float32, torch.float32, torch.float32)
    else:
        dtypes = (torch.bfloat16, torch.float16, torch.float16)
    if memory == "auto":
        memory = "resident" if device.type == "cpu" else auto_memory_mode(free_gpu_bytes(device) if free_bytes is None else free_bytes)
    return DevicePolicy(device, transformer_dtype or dtypes[0], dtypes[1], dtypes[2], memory)


def memory_figures(device: torch.device) -> str:
    """What the device's memory looks like now, for error messages."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"{device}: no GPU memory figures"
    free, total = torch.cuda.mem_get_info(device)
    return (f"{torch.cuda.memory_allocated(device) / GIB:.1f} GiB allocated, {torch.cuda.memory_reserved(device) / GIB:.1f} GiB "
            f"reserved by this process, {free / GIB:.1f} of {total / GIB:.1f} GiB free on {device}")
