"""Conditioning: prompts -> Llama + CLIP embeddings, images -> SigLIP embedding + VAE latent."""

from __future__ import annotations

import io
import json
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .lora import LoraFile, LoraRegistry
from .metadata import Provenance, model_identity, sha256
from .models import Components, default_resolution, untiled
from .request import RenderRequest, bucket_size, excerpt
from .schedule import Plan, make_plan
from .storage import TooLarge, fingerprint, read_bytes

# HunyuanVideo's prompt template (the text goes in the user turn).
PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
MAX_PROMPT_TOKENS = 256
CLIP_TOKENS = 77
LLAMA_SKIP_LAYERS = 2  # HunyuanVideo reads the third-to-last hidden state


class ImageError(ValueError):
    """An input image that cannot be read."""


@dataclass(frozen=True)
class TextEmbedding:
    embeds: torch.Tensor  # (1, MAX_PROMPT_TOKENS, D_llama)
    mask: torch.Tensor  # (1, MAX_PROMPT_TOKENS), 1 for real tokens
    pooled: torch.Tensor  # (1, D_clip)

    def cpu(self) -> "TextEmbedding":
        return TextEmbedding(self.embeds.cpu(), self.mask.cpu(), self.pooled.cpu())


@dataclass(frozen=True)
class Conditioning:
    """Everything a section needs besides its packed latents."""

    text: dict[str, TextEmbedding]  # by prompt text
    image_embeds: torch.Tensor  # (1, tokens, D_siglip); start image, averaged with the end image if any
    start_latent: torch.Tensor  # (1, 16, 1, h, w) float32, VAE-scaled
    end_latent: torch.Tensor | None
    vae_dtype: torch.dtype = torch.float32  # the image-latent noise draws were taken in it
    negative: TextEmbedding | None = None  # the negative prompt's, when real guidance (cfg > 1) is on
    # Keyframes, in the request's order: their latents and SigLIP embeddings; with them, the
    # start and end images' own embeddings (each section averages its two anchors').
    keyframe_latents: tuple[torch.Tensor, ...] = ()
    keyframe_embeds: tuple[torch.Tensor, ...] = ()
    start_embeds: torch.Tensor | None = None
    end_embeds: torch.Tensor | None = None
    end_is_start: bool = False  # a loop: end_latent is start_latent itself, no draw of its own
    # Extending a clip (extend.py): its latent frames next to the new part, (1, 16, T, h, w)
    # float32, VAE-scaled: the clip's last frames (forward) or its first (inverted).
    clip: torch.Tensor | None = None

    def cpu(self) -> "Conditioning":
        """A copy on the CPU, to hand to other processes (actors, the object store)."""
        text = {k: v.cpu() for k, v in self.text.items()}
        start = self.start_latent.cpu()
        cpu = lambda t: None if t is None else t.cpu()
        end = start if self.end_is_start else cpu(self.end_latent)
        negative = None if self.negative is None else self.negative.cpu()
        return replace(self, text=text, image_embeds=self.image_embeds.cpu(), start_latent=start, end_latent=end, negative=negative,
                       keyframe_latents=tuple(t.cpu() for t in self.keyframe_latents),
                       keyframe_embeds=tuple(t.cpu() for t in self.keyframe_embeds),
                       start_embeds=cpu(self.start_embeds), end_embeds=cpu(self.end_embeds), clip=cpu(self.clip))

    @property
    def image_draws(self) -> int:
        """Posterior samples encode() drew from the request's noise stream before any section
        (a loop's end is its start latent, drawn once; an extended clip is encoded without a draw)."""
        return 1 + (self.end_latent is not None and not self.end_is_start) + len(self.keyframe_latents)


# Every image that enters (CLI, manifest row, HTTP upload or URL) passes these limits before
# it is decoded: the header gives the size, so a decompression bomb is refused unread.
MAX_IMAGE_PIXELS = 64_000_000  # 8000x8000; larger photos are downscaled to 640-ish anyway
MAX_IMAGE_BYTES = 256 * 2**20  # a 64-megapixel PNG compresses below this
MIN_IMAGE_SIDE = 16


def read_image_bytes(location: str | Path, what: str = "image") -> bytes:
    """The raw bytes of an image at a local path, http(s) URL or pyarrow.fs URI: a regular file
    of at most MAX_IMAGE_BYTES (a device or a huge file is refused, never read whole)."""
    try:
        return read_bytes(location, MAX_IMAGE_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        raise ImageError(f"{what}: file not found: {excerpt(location, 200)}") from None
    except IsADirectoryError:
        raise ImageError(f"{what}: {excerpt(location, 200)} is a folder, not an image") from None
    except TooLarge:
        raise ImageError(f"{what}: {excerpt(location, 200)} is over {MAX_IMAGE_BYTES // 2**20} MB, too large for an image") from None
    except OSError as e:
        raise ImageError(f"{what}: cannot read {excerpt(location, 200)}: {e.strerror or e}") from None


def check_image_size(width: int, height: int, what: str = "image") -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(f"{what}: {width}x{height} is too large ({width * height:,} pixels; at most {MAX_IMAGE_PIXELS:,})")
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ImageError(f"{what}: {width}x{height} is too small (each side at least {MIN_IMAGE_SIDE} pixels)")


def decode_image(data: bytes, what: str = "image", location: str | Path = "") -> Image.Image:
    """Decode image bytes to RGB, upright (EXIF orientation applied), within the size limits."""
    where = excerpt(location, 200) if location else "the data"
    if not data:
        raise ImageError(f"{what}: {where} is empty")
    try:
        with warnings.catch_warnings():
            # PIL warns (and past twice its limit refuses) on huge images; ours is lower.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                check_image_size(im.width, im.height, what)
                im.load()
                upright = ImageOps.exif_transpose(im)
                if upright.mode.startswith("I;16"):  # 16-bit greyscale: convert() clips it at 255 (a white frame)
                    upright = Image.fromarray((np.asarray(upright) >> 8).astype(np.uint8))
                return upright.convert("RGB")
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{what}: {where} is not an image (PNG, JPEG, WebP, ...)") from None
    except Image.DecompressionBombError as e:  # PIL's own check, at open, for far larger images
        claimed = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(claimed.group(1)):,} pixels" if claimed else f"more than {MAX_IMAGE_PIXELS:,} pixels"
        raise ImageError(f"{what}: {where} is too large ({size}; at most {MAX_IMAGE_PIXELS:,})") from None
    except MemoryError:
        raise
    except Exception as e:  # a corrupt file makes PIL raise almost anything (OSError, SyntaxError, struct.error ...)
        raise ImageError(f"{what}: cannot read {where}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None


def load_image(location: str | Path, what: str = "image") -> Image.Image:
    return decode_image(read_image_bytes(location, what), what, location)


def resize_and_center_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Fill (width, height) keeping the aspect ratio, cropping the overflow (official demo)."""
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    resized = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    # The demo's box is in halves, (resized - target) / 2, which PIL's crop rounds half to even
    # as Python's round does: an odd overflow of 3, 7, 11 ... pixels starts one pixel past the floor.
    left = round((resized.width - width) / 2)
    top = round((resized.height - height) / 2)
    return resized.crop((left, top, left + width, top + height))


def image_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """(1, 3, H, W) float32 in [-1, 1], the same arithmetic as diffusers' VaeImageProcessor."""
    pixels = np.asarray(resize_and_center_crop(image, width, height)).astype(np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0


def prompt_crop_start(tokenizer) -> int:
    """Tokens of the template before the user text (95 for the Llama 3 tokenizer)."""
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    return len(tokenizer(prefix, add_special_tokens=True).input_ids)


@torch.no_grad()
def encode_prompt(c: Components, text: str) -> TextEmbedding:
    crop = prompt_crop_start(c.tokenizer)
    tokens = c.tokenizer(
        [PROMPT_TEMPLATE.format(text)],
        max_length=MAX_PROMPT_TOKENS + crop,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
        return_attention_mask=True,
    )
    ids, mask = tokens.input_ids.to(c.device), tokens.attention_mask.to(c.device)
    hidden = c.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    embeds = hidden[-(LLAMA_SKIP_LAYERS + 1)][:, crop:]
    clip_ids = c.tokenizer_2([text], padding="max_length", max_length=CLIP_TOKENS, truncation=True, return_tensors="pt")
    pooled = c.text_encoder_2(clip_ids.input_ids.to(c.device), output_hidden_states=False).pooler_output
    return TextEmbedding(embeds=embeds, mask=mask[:, crop:], pooled=pooled)


@torch.no_grad()
def encode_siglip(c: Components, pixels: torch.Tensor) -> torch.Tensor:
    inputs = c.feature_extractor(images=(pixels + 1) / 2.0, return_tensors="pt", do_rescale=False)
    inputs = inputs.to(device=c.device, dtype=c.image_encoder.dtype)
    return c.image_encoder(**inputs).last_hidden_state


@torch.no_grad()
def encode_latent(c: Components, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(1, 16, 1, h, w) float32: a posterior sample, drawn from `generator` as the reference does
    (the whole image at once: a tiled encode would give another latent)."""
    video = pixels.unsqueeze(2).to(device=c.device, dtype=c.vae.dtype)
    latent = untiled(c.vae).encode(video).latent_dist.sample(generator=generator)
    return (latent * c.vae.config.scaling_factor).to(torch.float32)


def encode(
    c: Components,
    prompts: list[str],
    start: Image.Image,
    width: int,
    height: int,
    seed: int,
    end: Image.Image | None = None,
    negative_prompt: str | None = None,
    keyframes: tuple[Image.Image, ...] = (),
    with_end_latent: bool = True,
) -> Conditioning:
    """Encode a request's prompts and images. Latent samples use the request's noise stream
    (start image, end image, keyframes), so section noise that follows stays reproducible.
    `negative_prompt`: encoded once for every section when real guidance is on (None: off).
    `with_end_latent`: False when only the end image's SigLIP embedding is used (an extension led
    into: the clip's own latents are the future)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    start_pixels = image_tensor(start, width, height)
    start_embeds = image_embeds = encode_siglip(c, start_pixels)
    start_latent = encode_latent(c, start_pixels, generator)
    end_latent = end_embeds = None
    if end is not None:
        end_pixels = image_tensor(end, width, height)
        # The end image's SigLIP embedding reaches every section, averaged with the start's
        # (FramePack PR 167); the reference pipeline computes this average and drops it.
        end_embeds = encode_siglip(c, end_pixels)
        image_embeds = (image_embeds + end_embeds) / 2
        end_latent = encode_latent(c, end_pixels, generator) if with_end_latent else None
    key_pixels = [image_tensor(k, width, height) for k in keyframes]
    key_latents = tuple(encode_latent(c, px, generator) for px in key_pixels)
    key_embeds = tuple(encode_siglip(c, px) for px in key_pixels)
    text = {p: encode_prompt(c, p) for p in dict.fromkeys(prompts)}
    negative = None
    if negative_prompt is not None:
        negative = text[negative_prompt] if negative_prompt in text else encode_prompt(c, negative_prompt)
    anchors = {}
    if keyframes:
        anchors = {"keyframe_latents": key_latents, "keyframe_embeds": key_embeds, "start_embeds": start_embeds, "end_embeds": end_embeds}
    return Conditioning(text=text, image_embeds=image_embeds, start_latent=start_latent, end_latent=end_latent, vae_dtype=c.vae.dtype,
                        negative=negative, **anchors)


LATENT_SCALE = 8  # VAE spatial compression


def frame_size(request: RenderRequest, image_width: int, image_height: int) -> tuple[int, int]:
    if request.width is not None:
        return request.width, request.height
    return bucket_size(image_width, image_height, request.resolution or default_resolution(request.model))


def plan_request(request: RenderRequest, width: int, height: int) -> Plan:
    return make_plan(
        request.schedule,
        request.num_sections,
        request.window,
        height // LATENT_SCALE,
        width // LATENT_SCALE,
        request.prompts,
        request.seconds_per_section,
        has_end_image=request.end_image is not None,
        keyframes=request.keyframe_boundaries,
        loop=request.loop,
    )


@dataclass(frozen=True)
class Encoded:
    """A request ready to generate: its plan, its conditioning (on the CPU), its LoRAs'
    files and the fingerprint of everything that decides its output (request fields, image
    bytes, LoRA bytes and weights)."""

    request: RenderRequest
    plan: Plan
    cond: Conditioning
    fingerprint: str
    loras: tuple[LoraFile, ...] = ()
    provenance: Provenance | None = None  # image hashes and the model loaded: what the video records


# A request's image bytes: (start, end or None, then one per keyframe in the request's order).
Images = tuple[bytes | None, ...]


def keyframe_what(i: int, request: RenderRequest) -> str:
    """How errors name keyframe i: by its time, as the user gave it."""
    return f"keyframes[{request.keyframes[i].at:g}s]"


def read_request_images(request: RenderRequest) -> Images:
    start = read_image_bytes(request.image_path, "image")
    end = read_image_bytes(request.end_image, "end_image") if request.end_image else None
    keys = tuple(read_image_bytes(k.image, keyframe_what(i, request)) for i, k in enumerate(request.keyframes))
    return (start, end) + keys


def decode_request_images(request: RenderRequest, images: Images) -> tuple[Image.Image, Image.Image | None, tuple[Image.Image, ...]]:
    """(start, end, keyframes) decoded, each within the image limits (ImageError naming it)."""
    if len(images) != 2 + len(request.keyframes):
        raise ValueError(f"expected the bytes of 2 + {len(request.keyframes)} images, got {len(images)}")
    start = decode_image(images[0], "image", request.image_path)
    end = decode_image(images[1], "end_image", request.end_image) if images[1] is not None else None
    keys = tuple(decode_image(data, keyframe_what(i, request), request.keyframes[i].image) for i, data in enumerate(images[2:]))
    return start, end, keys


# Raised whenever fp-ray makes other numbers from the same request and weights, so that a store
# or a batch's finished rows from before are never mixed with, or taken for, the new output
# (the version itself stays out: releases that keep the numbers keep every store).
# 2: the official demo's section count (5.4 s is 4 sections) and crop rounding, UniPC sums as
# one tensordot.
OUTPUT_REVISION = 2


def request_fingerprint(request: RenderRequest, images: Images, loras: tuple[LoraFile, ...] = (),
                        clip_sha256: str | None = None, model: dict | None = None) -> str:
    """Where the images, LoRAs and the clip to extend came from does not change the video;
    their bytes (and the LoRAs' weights, the keyframes' times) do. A request without LoRAs,
    keyframes, loop or clip keeps the fingerprint it had before they existed. `model`: the
    model's identity (metadata.model_identity): other weights under the same folder name are
    another render, whose store never hands back the old weights' sections. `OUTPUT_REVISION`:
    a store written by an fp-ray that made other numbers is another render too."""
    if len(loras) != len(request.loras):
        raise ValueError(f"the fingerprint needs the files of all {len(request.loras)} LoRAs, got {len(loras)}")
    if (clip_sha256 is None) != (request.extend is None):
        raise ValueError("the fingerprint of an extension needs the clip's hash (and only an extension has one)")
    if request.extend is not None and request.image is None:
        images = (None, *images[1:])  # the start frame is the clip's first: in the clip's hash, not the sample image's
    # fields added since the first fingerprints, left out at their defaults: older renders keep theirs
    defaults = {"loop"} if not request.loop else set()
    defaults |= {"cache_method"} if request.cache_method == "first_block" else set()
    text = request.model_dump_json(exclude={"image", "end_image", "loras", "keyframes", "extend"} | defaults)
    if loras:
        text += json.dumps([[f.digest, f.weight] for f in loras])
    if request.keyframes:
        text += json.dumps({"keyframes": [k.at for k in request.keyframes]})
    if clip_sha256:
        text += f"clip:{clip_sha256}"
    if model is not None:
        text += json.dumps({"model": {name: part["sha256"] for name, part in sorted(model.items())}})
    text += f"revision:{OUTPUT_REVISION}"
    return fingerprint(text, *images)


def encode_request(c: Components, request: RenderRequest, images: Images | None = None,
                   loras: tuple[LoraFile, ...] | None = None) -> Encoded:
    """Plan and encode `request`; `images` are its image bytes when the caller read them
    already, `loras` its LoRAs' files (None: found as paths or hub ids)."""
    loras = LoraRegistry().resolve(request.loras) if loras is None else loras
    images = images or read_request_images(request)
    clip = None
    if request.extend is not None:
        from .extend import encode_clip_inputs  # it builds on this module

        clip = encode_clip_inputs(c, request, images)
        request, start, end, keys = clip.request, clip.start, clip.end, ()
    else:
        start, end, keys = decode_request_images(request, images)
    width, height = frame_size(request, *start.size)
    plan = plan_request(request, width, height)
    # The official demo encodes n_prompt only when cfg is above 1 (zeros stand in otherwise,
    # never read: cfg 1 makes no negative pass).
    negative = request.negative_prompt if request.cfg > 1 else None
    cond = encode(c, [s.prompt for s in plan.sections], start, width, height, request.seed, end, negative, keys,
                  with_end_latent=clip is None)
    if request.loop:  # the end is the start latent itself, not a second posterior sample
        cond = replace(cond, end_latent=cond.start_latent, end_is_start=True, end_embeds=cond.start_embeds)
    if clip is not None:  # no end latent: the clip's latents (frame 0 first) are the future instead
        cond = replace(cond, clip=clip.latents)
    clip_sha = None if clip is None else clip.sha256
    spec = c.spec
    provenance = Provenance(sha256(images[0]), None if images[1] is None else sha256(images[1]),
                            model_identity(spec.model, spec.base, spec.image_encoder), tuple(sha256(k) for k in images[2:]),
                            tuple(f.digest for f in loras), clip_sha)
    return Encoded(request, plan, cond.cpu(), request_fingerprint(request, images, loras, clip_sha, provenance.model), loras, provenance)
