"""Build the tiny checkpoint shipped in fp_ray/tiny.

Same classes and folder layout as the released FramePack checkpoints
(transformer/ from lllyasviel/FramePackI2V_HY; vae/, text_encoder/, tokenizer/,
text_encoder_2/, tokenizer_2/, scheduler/ from hunyuanvideo-community/HunyuanVideo;
image_encoder/, feature_extractor/ from lllyasviel/flux_redux_bfl), with small
sizes and weights drawn from a fixed seed. Tokenizers are real BPE tokenizers
trained on a fixed corpus, so prompts tokenize the way the real ones do (BOS,
the HunyuanVideo chat template, padding), only with a small vocabulary.

    python scripts/make_tiny_checkpoint.py [OUT_DIR]
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoFramepackTransformer3DModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

SEED = 20250417
HIDDEN = 32  # text / image encoder width; the transformer's embed dims follow it
IMAGE_SIZE = 32  # SigLIP input side (real: 384)
SMALL_ENCODER = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)

CORPUS = [
    "Describe the video by detailing the following aspects: 1. The main content and theme of the video.",
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects.",
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects.",
    "4. background environment, light, style and atmosphere.",
    "5. camera angles, movements, and transitions used in the video:",
    "The girl dances gracefully, with clear movements, full of charm.",
    "A man walks along the beach at sunset, waves rolling in, the camera follows him slowly.",
    "A penguin dancing in the snow. A cat jumps onto the table and looks around.",
    "The camera pans across a mountain lake, mist rising over the water in the morning light.",
    "A small blue bird takes off from the ground, flapping its wings under a bright blue sky.",
    "city street at night, neon lights, rain, people with umbrellas, cars passing by",
    "0123456789 seconds frames video image start end prompt section",
]

LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def llama_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE in the layout of the Llama 3 tokenizer HunyuanVideo uses."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=LLAMA_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B", special_tokens=[("<|begin_of_text|>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
        model_max_length=131072,
        padding_side="right",
    )


def clip_tokenizer() -> CLIPTokenizer:
    """CLIP's BPE format (lower-cased, end-of-word suffix) over the corpus characters, no merges.

    Written out rather than trained: the BPE trainer breaks frequency ties differently from
    run to run, and the shipped checkpoint must be reproducible.
    """
    chars = sorted(set("".join(CORPUS).lower()) - {" "})
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def build(out: Path) -> None:
    torch.manual_seed(SEED)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    tokenizer = llama_tokenizer()
    tokenizer.save_pretrained(out / "tokenizer")
    tokenizer_2 = clip_tokenizer()
    tokenizer_2.save_pretrained(out / "tokenizer_2")

    llama = LlamaModel(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=4,  # the pipeline reads hidden_states[-3]
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    llama.save_pretrained(out / "text_encoder")

    clip = CLIPTextModel(
        CLIPTextConfig(
            **SMALL_ENCODER,
            vocab_size=len(tokenizer_2),
            max_position_embeddings=77,
            projection_dim=HIDDEN,
            bos_token_id=tokenizer_2.bos_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            pad_token_id=tokenizer_2.pad_token_id,
        )
    )
    clip.save_pretrained(out / "text_encoder_2")

    siglip = SiglipVisionModel(
        SiglipVisionConfig(
            **SMALL_ENCODER,
            image_size=IMAGE_SIZE,
            patch_size=8,
        )
    )
    siglip.save_pretrained(out / "image_encoder")
    SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(out / "feature_extractor")

    vae = AutoencoderKLHunyuanVideo(
        latent_channels=16,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        mid_block_add_attention=True,
    )
    vae.save_pretrained(out / "vae")

    transformer = HunyuanVideoFramepackTransformer3DModel(
        in_channels=16,
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        text_embed_dim=HIDDEN,
        pooled_projection_dim=HIDDEN,
        rope_axes_dim=(4, 6, 6),
        has_image_proj=True,
        image_proj_dim=HIDDEN,
        has_clean_x_embedder=True,
    )
    # diffusers zero-initialises some output projections; random values everywhere make
    # every input (each context level, each embedding) visible in the output.
    with torch.no_grad():
        for p in transformer.parameters():
            if p.abs().sum() == 0:
                p.normal_(0.0, 0.02)
    transformer.save_pretrained(out / "transformer")

    # The scheduler config of hunyuanvideo-community/HunyuanVideo.
    FlowMatchEulerDiscreteScheduler(shift=7.0).save_pretrained(out / "scheduler")

    model_index = {
        "_class_name": "HunyuanVideoFramepackPipeline",
        "_diffusers_version": "0.33.0",
        "feature_extractor": ["transformers", "SiglipImageProcessor"],
        "image_encoder": ["transformers", "SiglipVisionModel"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "LlamaModel"],
        "text_encoder_2": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "transformer": ["diffusers", "HunyuanVideoFramepackTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLHunyuanVideo"],
    }
    # Renders on a CPU in seconds at this size; real checkpoints use the official 640. Its
    # random weights are trained for no layout, so it declares every schedule: the tests run
    # the inverted, forward and bidirectional paths on it.
    meta = {"default_resolution": 160, "schedules": ["inverted", "bidirectional", "forward"]}
    (out / "fp_ray.json").write_text(json.dumps(meta) + "\n")
    (out / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "fp_ray" / "tiny"
    build(target)
    print(f"wrote {target}")
