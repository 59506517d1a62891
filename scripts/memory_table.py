"""Peak GPU memory of each memory mode for the 13B checkpoint, COMPUTED from parameter counts
(no GPU needed): the released models are built on the meta device from their published
configurations, their parameters counted, and each mode's largest set of weights on the GPU
at once added up, plus an estimate of the transformer's activations at the given size.

    python scripts/memory_table.py [--size 608x640] [--out bench/results/memory_modes.json]

Where a GPU is at hand, measure instead (torch.cuda.max_memory_allocated around a render).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel
from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel, SiglipVisionConfig, SiglipVisionModel

from fp_ray.devices import GIB
from fp_ray.packing import context_tokens

# The published configurations: lllyasviel/FramePackI2V_HY (transformer),
# hunyuanvideo-community/HunyuanVideo (text_encoder, text_encoder_2, vae), lllyasviel/flux_redux_bfl (SigLIP).
TRANSFORMER = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
                   num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
                   qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
                   rope_theta=256.0, rope_axes_dim=(16, 56, 56), image_condition_type=None, has_image_proj=True,
                   image_proj_dim=1152, has_clean_x_embedder=True)
LLAMA = dict(vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, max_position_embeddings=8192)
CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, projection_dim=768)
SIGLIP = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384,
              patch_size=14)
BF16 = FP16 = 2  # bytes per parameter: transformer bf16, encoders and VAE fp16 (the GPU policy)
TEXT_TOKENS = 256


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build() -> dict[str, torch.nn.Module]:
    with init_empty_weights():
        return {
            "transformer": HunyuanVideoFramepackTransformer3DModel(**TRANSFORMER),
            "text_encoder": LlamaModel(LlamaConfig(**LLAMA)),
            "text_encoder_2": CLIPTextModel(CLIPTextConfig(**CLIP)),
            "image_encoder": SiglipVisionModel(SiglipVisionConfig(**SIGLIP)),
            "vae": AutoencoderKLHunyuanVideo(),
        }


def largest_block(blocks) -> int:
    return max(count(b) for b in blocks)


def activations_gib(width: int, height: int, window: int = 9) -> float:
    """The largest live tensors of one transformer block in bf16: the hidden states of every
    token (section + packed context + text) with q, k, v, attention output and the 4x MLP
    hidden layer; attention itself is SDPA (no tokens x tokens matrix)."""
    hidden = TRANSFORMER["num_attention_heads"] * TRANSFORMER["attention_head_dim"]
    tokens = context_tokens(window, height // 8, width // 8).total + TEXT_TOKENS
    live = tokens * hidden * (1 + 3 + 1 + TRANSFORMER["mlp_ratio"] + 2)  # x, qkv, attn out, mlp, residual + norm
    return live * BF16 / GIB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="608x640", help="WIDTHxHEIGHT of a section (default: the square bucket)")
    p.add_argument("--out", default="bench/results/memory_modes.json")
    args = p.parse_args()
    width, height = map(int, args.size.split("x"))
    models = build()
    params = {name: count(m) for name, m in models.items()}
    t, llama = models["transformer"], models["text_encoder"]
    gib = {name: n * (BF16 if name == "transformer" else FP16) / GIB for name, n in params.items()}
    encoders = gib["text_encoder"] + gib["text_encoder_2"] + gib["image_encoder"]
    # offload: everything but the blocks stays; two blocks are on the GPU (the one computing,
    # the one the side stream prefetches)
    t_blocks = [*t.transformer_blocks, *t.single_transformer_blocks]
    t_rest = (params["transformer"] - sum(count(b) for b in t_blocks)) * BF16 / GIB
    t_offload = t_rest + 2 * largest_block(t_blocks) * BF16 / GIB
    l_rest = (params["text_encoder"] - sum(count(b) for b in llama.layers)) * FP16 / GIB
    l_offload = l_rest + 2 * largest_block(llama.layers) * FP16 / GIB
    act = activations_gib(width, height)
    modes = {
        # every model on the GPU for the whole render
        "resident": {"encode": gib["transformer"] + encoders + gib["vae"], "generate": gib["transformer"] + encoders + gib["vae"] + act},
        # encoders (and the VAE that encoded) leave after encoding; the transformer comes at its first step
        "swap": {"encode": encoders + gib["vae"], "generate": gib["transformer"] + gib["vae"] + act},
        # swap, with the transformer and Llama block by block
        "offload": {"encode": l_offload + gib["text_encoder_2"] + gib["image_encoder"] + gib["vae"],
                    "generate": t_offload + gib["vae"] + act},
    }
    result = {
        "date": time.strftime("%Y-%m-%d"), "kind": "computed from parameter counts (no GPU measurement)",
        "size": f"{width}x{height}", "parameters": params, "weights_gib": gib, "activations_gib_estimate": act,
        "peak_gib": {mode: {**phases, "peak": max(phases.values())} for mode, phases in modes.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for name, n in params.items():
        print(f"{name:15s} {n / 1e9:6.2f} B parameters  {gib[name]:6.1f} GiB")
    print(f"activations at {width}x{height} (estimate): {act:.1f} GiB")
    for mode, phases in modes.items():
        print(f"{mode:9s} encode {phases['encode']:5.1f} GiB  generate {phases['generate']:5.1f} GiB  peak {max(phases.values()):5.1f} GiB")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
