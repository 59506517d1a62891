"""Checkpoint loading: every component through `from_pretrained`, local folder or hub id."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel
from transformers import AutoTokenizer, CLIPTextModel, LlamaModel, SiglipImageProcessor, SiglipVisionModel

BASE_MODEL = "hunyuanvideo-community/HunyuanVideo"  # text encoders, tokenizers, VAE, scheduler
IMAGE_ENCODER_MODEL = "lllyasviel/flux_redux_bfl"  # SigLIP + its processor
TRANSFORMERS = {"inverted": "lllyasviel/FramePackI2V_HY", "forward": "lllyasviel/FramePack_F1_I2V_HY_20250503"}


DEFAULT_RESOLUTION = 640  # the official demo's bucket


def default_resolution(model: str) -> int:
    """The bucket side a checkpoint renders at when a request names no size: the official
    640, unless the folder's fp_ray.json says otherwise (the tiny checkpoint: small, for CPUs)."""
    meta = Path(model).expanduser() / "fp_ray.json"
    if meta.is_file():
        return int(json.loads(meta.read_text()).get("default_resolution", DEFAULT_RESOLUTION))
    return DEFAULT_RESOLUTION


class ModelNotFoundError(FileNotFoundError):
    """A model folder or hub id that cannot be loaded."""


@dataclass(frozen=True)
class ModelSources:
    """Where each component comes from: (repo or folder, subfolder)."""

    transformer: tuple[str, str | None]
    base: str
    image_encoder: str

    @classmethod
    def resolve(cls, model: str, base: str = BASE_MODEL, image_encoder: str = IMAGE_ENCODER_MODEL) -> "ModelSources":
        """A folder holding `transformer/` carries every component (the tiny checkpoint's
        layout); otherwise `model` is the transformer alone and the rest come from `base`
        and `image_encoder`."""
        path = Path(model).expanduser()
        if (path / "transformer").is_dir():
            return cls((str(path), "transformer"), str(path), str(path))
        if path.is_dir():
            return cls((str(path), None), base, image_encoder)
        if model.startswith((".", "/", "~")) or model.count("/") != 1:
            raise ModelNotFoundError(f"model folder not found: {model}")
        return cls((model, None), base, image_encoder)


PARTS = ("transformer", "vae", "encoders")  # what a worker may load: generator, decoder, encoder


@dataclass
class Components:
    """The loaded checkpoint; parts a worker did not ask for are None."""

    transformer: HunyuanVideoFramepackTransformer3DModel | None
    vae: AutoencoderKLHunyuanVideo | None
    text_encoder: LlamaModel | None
    tokenizer: object
    text_encoder_2: CLIPTextModel | None
    tokenizer_2: object
    image_encoder: SiglipVisionModel | None
    feature_extractor: SiglipImageProcessor | None
    scheduler_config: dict
    device: torch.device

    @property
    def transformer_dtype(self) -> torch.dtype:
        return self.transformer.dtype


def default_dtypes(device: torch.device) -> dict[str, torch.dtype]:
    """The official demo's precisions on GPU (bf16 transformer, fp16 encoders and VAE); fp32 on CPU."""
    if device.type == "cpu":
        return {"transformer": torch.float32, "encoders": torch.float32, "vae": torch.float32}
    return {"transformer": torch.bfloat16, "encoders": torch.float16, "vae": torch.float16}


def _load(cls, repo: str, subfolder: str | None, **kwargs):
    try:
        return cls.from_pretrained(repo, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as e:
        where = f"{repo}/{subfolder}" if subfolder else repo
        raise ModelNotFoundError(f"cannot load {cls.__name__} from {where}: {str(e).splitlines()[0]}") from e


def load_components(
    model: str,
    device: str | torch.device = "cpu",
    transformer_dtype: torch.dtype | str | None = None,
    base: str = BASE_MODEL,
    image_encoder: str = IMAGE_ENCODER_MODEL,
    vae_tile_size: int = 256,
    parts: tuple[str, ...] = PARTS,
) -> Components:
    """Load a FramePack checkpoint, or only the `parts` a worker needs: "transformer"
    (generators), "vae" (decoders), "encoders" (Llama, CLIP, SigLIP; encoders also need
    "vae"). The VAE decodes in spatial tiles of `vae_tile_size` pixels, bounding decode
    memory at any resolution (smaller frames are not tiled)."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown model parts {sorted(unknown)}; expected some of {PARTS}")
    device = torch.device(device)
    if isinstance(transformer_dtype, str):
        transformer_dtype = getattr(torch, transformer_dtype)
    sources = ModelSources.resolve(model, base, image_encoder)
    dtypes = default_dtypes(device)
    enc = dtypes["encoders"]
    loaded: dict[str, object] = dict.fromkeys(
        ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "image_encoder", "feature_extractor")
    )
    if "transformer" in parts:
        loaded["transformer"] = _load(
            HunyuanVideoFramepackTransformer3DModel, *sources.transformer, torch_dtype=transformer_dtype or dtypes["transformer"]
        )
    if "vae" in parts:
        loaded["vae"] = _load(AutoencoderKLHunyuanVideo, sources.base, "vae", torch_dtype=dtypes["vae"])
        loaded["vae"].enable_tiling(tile_sample_min_height=vae_tile_size, tile_sample_min_width=vae_tile_size)
    if "encoders" in parts:
        loaded.update(
            text_encoder=_load(LlamaModel, sources.base, "text_encoder", torch_dtype=enc),
            tokenizer=_load(AutoTokenizer, sources.base, "tokenizer"),
            text_encoder_2=_load(CLIPTextModel, sources.base, "text_encoder_2", torch_dtype=enc),
            tokenizer_2=_load(AutoTokenizer, sources.base, "tokenizer_2"),
            image_encoder=_load(SiglipVisionModel, sources.image_encoder, "image_encoder", torch_dtype=enc),
            feature_extractor=_load(SiglipImageProcessor, sources.image_encoder, "feature_extractor"),
        )
    components = Components(**loaded, scheduler_config=_scheduler_config(sources.base), device=device)
    for module in (components.transformer, components.vae, components.text_encoder, components.text_encoder_2, components.image_encoder):
        if module is not None:
            module.to(device).eval().requires_grad_(False)
    if components.vae is not None:
        prefer_onednn_convs(components.vae)
    return components


def prefer_onednn_convs(vae) -> None:
    """Run the VAE's 3D convolutions on oneDNN on the CPU.

    PyTorch sends a CPU float32 convolution to its slow im2col kernel when
    N*C*T*H <= 20480 (a heuristic written for 2D convolutions). The tiny checkpoint's VAE
    has 8-16 channels, so most of its full-resolution convolutions fell under it and ran
    5-10x slower than oneDNN on the same shapes: the decoder was most of a CPU render.
    Real checkpoints (128+ channels) never hit it; on them this changes nothing.
    """
    if vae.device.type != "cpu" or vae.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return
    for module in vae.modules():
        if isinstance(module, torch.nn.Conv3d) and module.padding_mode == "zeros":
            module.forward = _OneDnnConv3d(module)


class _OneDnnConv3d:
    """Conv3d.forward through aten's oneDNN kernel (same weights, same padding)."""

    def __init__(self, conv: torch.nn.Conv3d):
        self.conv = conv

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if x.device.type != "cpu" or x.dtype != torch.float32:
            return torch.nn.functional.conv3d(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
        return torch.mkldnn_convolution(x.contiguous(), c.weight, c.bias, c.padding, c.stride, c.dilation, c.groups)


def _scheduler_config(base: str) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return dict(_load(FlowMatchEulerDiscreteScheduler, base, "scheduler").config)


@functools.lru_cache(maxsize=2)
def cached_components(model: str, device: str = "cpu") -> Components:
    """One resident copy per process (CLI, tests, actors)."""
    return load_components(model, device)
