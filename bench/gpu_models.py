"""What bench/gpu.py runs on: the full-size FramePack transformer and HunyuanVideo VAE with
random weights built on the GPU (or the tiny checkpoint on the CPU), random encoder outputs of
the real shapes, and diffusers' pipeline as shipped. Imports only fp-ray's Ray-free modules."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoFramepackPipeline,
    HunyuanVideoFramepackTransformer3DModel,
)
from PIL import Image

from fp_ray import TINY_CHECKPOINT
from fp_ray.encode import MAX_PROMPT_TOKENS, Conditioning, TextEmbedding, encode_latent, image_tensor
from fp_ray.devices import DevicePolicy
from fp_ray.models import TRANSFORMERS, Components, ModelSpec

# lllyasviel/FramePackI2V_HY transformer/config.json (HunyuanVideo 13B + image projection + clean-x embedder)
FRAMEPACK_I2V_HY = {
    "attention_head_dim": 128, "guidance_embeds": True, "has_clean_x_embedder": True, "has_image_proj": True,
    "image_proj_dim": 1152, "in_channels": 16, "mlp_ratio": 4.0, "num_attention_heads": 24, "num_layers": 20,
    "num_refiner_layers": 2, "num_single_layers": 40, "out_channels": 16, "patch_size": 2, "patch_size_t": 1,
    "pooled_projection_dim": 768, "qk_norm": "rms_norm", "rope_axes_dim": [16, 56, 56], "rope_theta": 256.0,
    "text_embed_dim": 4096, "image_condition_type": None,
}
# hunyuanvideo-community/HunyuanVideo vae/config.json
HUNYUAN_VIDEO_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "in_channels": 3, "latent_channels": 16,
    "layers_per_block": 2, "mid_block_add_attention": True, "norm_num_groups": 32, "out_channels": 3,
    "scaling_factor": 0.476986, "spatial_compression_ratio": 8, "temporal_compression_ratio": 4,
    "down_block_types": ["HunyuanVideoDownBlock3D"] * 4, "up_block_types": ["HunyuanVideoUpBlock3D"] * 4,
}
# hunyuanvideo-community/HunyuanVideo scheduler/scheduler_config.json (the tiny checkpoint ships the same)
SCHEDULER = json.loads((TINY_CHECKPOINT / "scheduler" / "scheduler_config.json").read_text())


@dataclass(frozen=True)
class Setup:
    """One benchmark configuration: the models, sizes and step counts it runs."""

    name: str
    device: str
    sizes: tuple[tuple[int, int], ...]  # (width, height); the first is the main one
    steps: int
    sections: int
    window: int
    prompt_tokens: int  # real tokens of the prompt; the rest of MAX_PROMPT_TOKENS is padding
    image_tokens: int  # SigLIP tokens (729 for 384x384 patches of 14)
    forward_reps: int
    attention_backends: tuple[str, ...]
    matmul_size: int
    budget_s: float
    part_timeout_s: float

    @property
    def tiny(self) -> bool:
        return self.name == "tiny"


FULL = Setup("full", "cuda", ((640, 640), (640, 608)), steps=25, sections=2, window=9, prompt_tokens=40,
             image_tokens=729, forward_reps=3, attention_backends=("_native_cudnn", "_native_flash"),
             matmul_size=8192, budget_s=470.0, part_timeout_s=150.0)
# The tiny run checks every part of the script on a CPU; its figures say nothing about a GPU.
TINY = Setup("tiny", "cpu", ((96, 64), (64, 48)), steps=3, sections=2, window=5, prompt_tokens=12,
             image_tokens=16, forward_reps=2, attention_backends=("_native_math",),
             matmul_size=512, budget_s=240.0, part_timeout_s=120.0)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_components(setup: Setup) -> Components:
    """The transformer and VAE: tiny from its checkpoint; full size with random weights, built
    directly on the GPU in bf16 (transformer) and fp16 (VAE), as fp-ray runs them. Timing does
    not depend on the weights' values."""
    if setup.tiny:
        transformer = HunyuanVideoFramepackTransformer3DModel.from_pretrained(TINY_CHECKPOINT, subfolder="transformer")
        vae = AutoencoderKLHunyuanVideo.from_pretrained(TINY_CHECKPOINT, subfolder="vae")
    else:
        torch.manual_seed(0)
        with torch.device(setup.device), default_dtype(torch.bfloat16):
            transformer = HunyuanVideoFramepackTransformer3DModel.from_config(FRAMEPACK_I2V_HY)
        with torch.device(setup.device), default_dtype(torch.float16):
            vae = AutoencoderKLHunyuanVideo.from_config(HUNYUAN_VIDEO_VAE)
    for module in (transformer, vae):
        module.eval().requires_grad_(False)
    device = torch.device(setup.device)
    policy = DevicePolicy(device, transformer.dtype, torch.float16 if device.type == "cuda" else torch.float32, vae.dtype, "resident")
    spec = ModelSpec(str(TINY_CHECKPOINT) if setup.tiny else TRANSFORMERS["inverted"], device=setup.device, memory="resident")
    return Components(transformer, vae, None, None, None, None, None, None, dict(SCHEDULER), policy=policy, spec=spec)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random image (noise would make the VAE's job unlike a photo's)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


PROMPT = "benchmark prompt"


def conditioning(c: Components, setup: Setup, width: int, height: int, seed: int) -> tuple[Conditioning, Image.Image]:
    """Random encoder outputs of the real shapes (Llama states padded to 256 tokens, pooled CLIP,
    SigLIP tokens) and the start image's VAE latent, drawn from the request's noise stream as
    the reference does."""
    cfg = c.transformer.config
    g = torch.Generator("cpu").manual_seed(seed + 1)
    mask = torch.zeros(1, MAX_PROMPT_TOKENS, dtype=torch.int64)
    mask[:, : setup.prompt_tokens] = 1
    embeds = torch.randn(1, MAX_PROMPT_TOKENS, cfg.text_embed_dim, generator=g) * mask[..., None]
    text = TextEmbedding(embeds=embeds, mask=mask, pooled=torch.randn(1, cfg.pooled_projection_dim, generator=g))
    image_embeds = torch.randn(1, setup.image_tokens, cfg.image_proj_dim, generator=g)
    image = random_image(width, height, seed)
    start = encode_latent(c, image_tensor(image, width, height), torch.Generator("cpu").manual_seed(seed)).cpu()
    return Conditioning({PROMPT: text}, image_embeds, start, None, vae_dtype=c.vae.dtype), image


class ReferencePipeline(HunyuanVideoFramepackPipeline):
    """diffusers' pipeline as shipped; only the SigLIP call returns the precomputed embedding
    (the encoders run once per video and are not what is compared)."""

    bench_image_embeds: torch.Tensor

    def encode_image(self, image: torch.Tensor, device: torch.device | None = None, dtype: torch.dtype | None = None):
        return self.bench_image_embeds.to(device or self._execution_device)


def reference_pipeline(c: Components, image_embeds: torch.Tensor) -> ReferencePipeline:
    pipe = ReferencePipeline(
        text_encoder=None, tokenizer=None, transformer=c.transformer, vae=c.vae,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(c.scheduler_config),
        text_encoder_2=None, tokenizer_2=None, image_encoder=None, feature_extractor=None,
    )
    pipe.bench_image_embeds = image_embeds
    pipe.set_progress_bar_config(disable=True)
    return pipe
