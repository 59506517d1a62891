"""fp-ray's local render against the official FramePack demo's whole worker loop, as an oracle.

The demo (lllyasviel/FramePack: demo_gradio.py for the inverted checkpoint, demo_gradio_f1.py
for F1) is re-implemented here step by step from its source, on the tiny checkpoint's models:
image crop and bucket, prompt conditioning cropped / padded to 512 tokens with a zero negative
at cfg 1, one CPU generator drawn section after section, the latent paddings (with the
`[3] + [2] * (n - 3) + [1, 0]` trick past 4 sections), the history and its clean 1x / 2x / 4x
split with the demo's RoPE indices, sample_hunyuan's shifted sigmas and FlowMatch UniPC (bh1)
behind fm_wrapper, and the per-section VAE decode folded with soft_append_bcthw.

Where the demo's source and diffusers' HunyuanVideoFramepackPipeline (the other reference,
tests/test_parity.py) disagree, fp-ray follows diffusers; `test_where_the_references_disagree`
pins each such place with its size. The whole-video oracle then takes the diffusers side of
exactly those inputs (named where it does), and everything else as the demo has it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from PIL import Image

from fp_ray import SAMPLE_IMAGE, TINY_CHECKPOINT
from fp_ray.buckets import nearest_bucket
from fp_ray.encode import encode_prompt, encode_request, plan_request, resize_and_center_crop
from fp_ray.generate import noise_stream
from fp_ray.render import render
from fp_ray.request import make_request
from fp_ray.speed import trim_text

W, H, STEPS, SEED, GS, PROMPT = 64, 48, 4, 31337, 10.0, "a red house below the mountains"
WINDOW, FPS = 9, 30  # the demo's latent_window_size and frame rate
TEMPLATE = DEFAULT_PROMPT_TEMPLATE["template"]  # the demo's, from diffusers: never fp-ray's own copy

# ---- the demo's helpers (diffusers_helper/*), written from their source -------------------

# bucket_tools.bucket_options[640], (height, width) in the demo's order
DEMO_BUCKETS = ((416, 960), (448, 864), (480, 832), (512, 768), (544, 704), (576, 672), (608, 640),
                (640, 608), (672, 576), (704, 544), (768, 512), (832, 480), (864, 448), (960, 416))


def demo_bucket(h: int, w: int) -> tuple[int, int]:
    """find_nearest_bucket: (height, width); `<=` lets a later bucket win a tie."""
    best, best_metric = None, float("inf")
    for bh, bw in DEMO_BUCKETS:
        metric = abs(h * bw - w * bh)
        if metric <= best_metric:
            best, best_metric = (bh, bw), metric
    return best


def demo_sections(seconds: float, window: int) -> int:
    """The worker's total_latent_sections, in its order of operations."""
    return int(max(round((seconds * 30) / (window * 4)), 1))


def demo_paddings(sections: int) -> list[int]:
    paddings = list(reversed(range(sections)))
    return [3] + [2] * (sections - 3) + [1, 0] if sections > 4 else paddings


def demo_crop(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """utils.resize_and_center_crop: LANCZOS to cover, then a crop box in halves (PIL rounds it)."""
    if (height, width) == image.shape[:2]:
        return image
    pil = Image.fromarray(image)
    scale = max(width / pil.width, height / pil.height)
    rw, rh = int(round(pil.width * scale)), int(round(pil.height * scale))
    resized = pil.resize((rw, rh), Image.LANCZOS)
    return np.array(resized.crop(((rw - width) / 2, (rh - height) / 2, (rw + width) / 2, (rh + height) / 2)))


def crop_or_pad_yield_mask(x: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, f, d = x.shape
    if f >= length:
        return x[:, :length], torch.ones((b, length), dtype=torch.bool)
    y, mask = torch.zeros((b, length, d), dtype=x.dtype), torch.zeros((b, length), dtype=torch.bool)
    y[:, :f], mask[:, :f] = x, True
    return y, mask


def soft_append_bcthw(history: torch.Tensor, current: torch.Tensor, overlap: int) -> torch.Tensor:
    w = torch.linspace(1, 0, overlap, dtype=history.dtype).view(1, 1, -1, 1, 1)
    mixed = w * history[:, :, -overlap:] + (1 - w) * current[:, :, :overlap]
    return torch.cat([history[:, :, :-overlap], mixed, current[:, :, overlap:]], dim=2).to(history)


def demo_uint8(pixels: torch.Tensor) -> np.ndarray:
    """save_bcthw_as_mp4's frames: (F, H, W, 3), scaled by 127.5 and truncated by the cast."""
    x = (torch.clamp(pixels.float(), -1.0, 1.0) * 127.5 + 127.5).to(torch.uint8)
    return x[0].permute(1, 2, 3, 0).numpy()


def rounded_uint8(pixels: torch.Tensor) -> np.ndarray:
    """The same frames rounded, as diffusers' numpy_to_pil and fp-ray's frames."""
    return ((pixels[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).numpy() * 255).round().astype(np.uint8)


# ---- conditioning: demo_gradio.py's worker before sampling ---------------------------------


@dataclass(frozen=True)
class DemoInputs:
    llama_vec: torch.Tensor  # (1, 512, D), zero padded
    llama_mask: torch.Tensor  # (1, 512) bool
    clip_pooler: torch.Tensor
    llama_vec_n: torch.Tensor  # cfg 1: zeros, never read
    llama_mask_n: torch.Tensor
    clip_pooler_n: torch.Tensor
    image_embeds: torch.Tensor
    start_latent: torch.Tensor  # (1, 16, 1, h, w) float32
    pixels_uint8: np.ndarray  # the cropped input image


def template_crop_start(tokenizer) -> int:
    """Tokens of the prompt template before the user text. The demo takes diffusers'
    DEFAULT_PROMPT_TEMPLATE's constant 95, which holds for HunyuanVideo's Llama 3 tokenizer
    only; the tiny checkpoint's tokenizer splits the same template into another count."""
    return len(tokenizer(TEMPLATE.split("{}")[0]).input_ids)


@torch.no_grad()
def demo_prompt(c, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """hunyuan.encode_prompt_conds: Llama's third-to-last hidden state cut to the prompt's
    real tokens, and CLIP-L's pooled output of the bare prompt."""
    crop = template_crop_start(c.tokenizer)
    t = c.tokenizer([TEMPLATE.format(prompt)], padding="max_length", max_length=256 + crop, truncation=True,
                    return_tensors="pt", return_attention_mask=True)
    length = int(t.attention_mask.sum())
    hidden = c.text_encoder(input_ids=t.input_ids, attention_mask=t.attention_mask, output_hidden_states=True).hidden_states
    assert bool(t.attention_mask[:, crop:length].all())
    ids = c.tokenizer_2([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return hidden[-3][:, crop:length], c.text_encoder_2(ids, output_hidden_states=False).pooler_output


@torch.no_grad()
def demo_siglip(c, pixels_uint8: np.ndarray) -> torch.Tensor:
    """clip_vision.hf_clip_vision_encode: the processor gets the uint8 image."""
    inputs = c.feature_extractor.preprocess(images=pixels_uint8, return_tensors="pt").to(dtype=c.image_encoder.dtype)
    return c.image_encoder(**inputs).last_hidden_state


@torch.no_grad()
def diffusers_siglip(c, pixels_uint8: np.ndarray) -> torch.Tensor:
    """HunyuanVideoFramepackPipeline.encode_image: the [-1, 1] tensor of its video processor,
    mapped to [0, 1] floats, processor told not to rescale."""
    x = torch.from_numpy(pixels_uint8.astype(np.float32) / 255.0).permute(2, 0, 1)[None] * 2.0 - 1.0
    inputs = c.feature_extractor(images=(x + 1) / 2.0, return_tensors="pt", do_rescale=False).to(dtype=c.image_encoder.dtype)
    return c.image_encoder(**inputs).last_hidden_state


@torch.no_grad()
def demo_inputs(c, image: np.ndarray, prompt: str, width: int, height: int, posterior: torch.Generator) -> DemoInputs:
    """The worker's encoding at cfg 1. `posterior`: the generator of the start latent's posterior
    sample (the demo's vae_encode draws it from torch's global one)."""
    llama_vec, clip_pooler = demo_prompt(c, prompt)
    llama_vec_n, clip_pooler_n = torch.zeros_like(llama_vec), torch.zeros_like(clip_pooler)
    llama_vec, llama_mask = crop_or_pad_yield_mask(llama_vec, 512)
    llama_vec_n, llama_mask_n = crop_or_pad_yield_mask(llama_vec_n, 512)
    pixels = demo_crop(image, width, height)
    x = (torch.from_numpy(pixels).float() / 127.5 - 1).permute(2, 0, 1)[None, :, None]
    vae = c.vae
    start_latent = vae.encode(x.to(vae.dtype)).latent_dist.sample(generator=posterior) * vae.config.scaling_factor
    dtype = c.transformer.dtype
    return DemoInputs(llama_vec.to(dtype), llama_mask, clip_pooler.to(dtype), llama_vec_n.to(dtype), llama_mask_n,
                      clip_pooler_n.to(dtype), demo_siglip(c, pixels).to(dtype), start_latent.float(), pixels)


# ---- sampling: k_diffusion_hunyuan.sample_hunyuan, wrapper.fm_wrapper, uni_pc_fm -----------


def flux_mu(context_length: int) -> float:
    k = (1.15 - 0.5) / (4096 - 256)
    return min(k * context_length + (0.5 - k * 256), math.log(7.0))


def flux_sigmas(steps: int, mu: float) -> torch.Tensor:
    t = torch.linspace(1, 0, steps=steps + 1)
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)


def fm_model(transformer, dtype, cfg: float, positive: dict, negative: dict):
    """fm_wrapper: x0 = x - sigma * v, the model seeing x and sigma * 1000 in `dtype`."""

    def k_model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        original, sigma = x.dtype, sigma.float()
        x = x.to(dtype)
        timestep = (sigma * 1000.0).to(dtype)
        pos = transformer(hidden_states=x, timestep=timestep, return_dict=False, **positive)[0].float()
        neg = torch.zeros_like(pos) if cfg == 1.0 else transformer(hidden_states=x, timestep=timestep, return_dict=False, **negative)[0].float()
        pred = neg + cfg * (pos - neg)  # rescale 0: rescale_noise_cfg returns it as it is
        return (x.float() - pred.float() * sigma[:, None, None, None, None]).to(original)

    return k_model


def unipc_update(model, x, models, ts, t, order):
    """FlowMatchUniPC.update_fn, variant bh1, with the demo's tensor shapes and precisions."""
    lam0 = -torch.log(ts[-1])
    h = -torch.log(t) - lam0
    rks, d1s = [], []
    for i in range(1, order):
        rk = ((-torch.log(ts[-(i + 1)]) - lam0) / h)[0]
        rks.append(rk)
        d1s.append((models[-(i + 1)] - models[-1]) / rk)
    rks = torch.tensor(rks + [1.0])
    hh = -h[0]
    h_phi_1 = torch.expm1(hh)
    h_phi_k, factorial, rows, b = h_phi_1 / hh - 1, 1, [], []
    for i in range(1, order + 1):
        rows.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * factorial / hh)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = torch.stack(rows), torch.tensor(b)
    D1s = torch.stack(d1s, dim=1) if d1s else None
    rhos_p = None if D1s is None else torch.tensor([0.5]) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
    rhos_c = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(R, b)
    x_base = (t / ts[-1])[:, None, None, None, None] * x - h_phi_1 * models[-1]
    x_t = x_base - hh * (torch.tensordot(D1s, rhos_p, dims=([1], [0])) if D1s is not None else 0)
    model_t = model(x_t, t)
    corr = torch.tensordot(D1s, rhos_c[:-1], dims=([1], [0])) if D1s is not None else 0
    return x_base - hh * (corr + rhos_c[-1] * (model_t - models[-1])), model_t


def demo_unipc(model, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """FlowMatchUniPC.sample: order min(3, steps - 1), warm-up orders 1, 2; the x0 at the last
    non-zero sigma is the result."""
    order = min(3, len(sigmas) - 2)
    models, ts = [], []
    for i in range(len(sigmas) - 1):
        t = sigmas[i].expand(x.shape[0])
        if i == 0:
            models, ts = [model(x, t)], [t]
        else:
            x, m = unipc_update(model, x, models, ts, t, min(i, order))
            models, ts = models + [m], ts + [t]
        models, ts = models[-order:], ts[-order:]
    return models[-1]


@torch.no_grad()
def sample_hunyuan(c, inputs: DemoInputs, rnd: torch.Generator, width: int, height: int, frames: int, steps: int,
                   gs: float, **packed) -> torch.Tensor:
    latents = torch.randn((1, 16, (frames + 3) // 4, height // 8, width // 8), generator=rnd).float()
    _, _, t, h, w = latents.shape
    sigmas = flux_sigmas(steps, flux_mu(t * h * w // 4))
    dtype = c.transformer.dtype
    common = dict(guidance=torch.tensor([gs * 1000.0]).to(dtype), image_embeds=inputs.image_embeds, **packed)
    positive = dict(pooled_projections=inputs.clip_pooler, encoder_hidden_states=inputs.llama_vec,
                    encoder_attention_mask=inputs.llama_mask, **common)
    negative = dict(pooled_projections=inputs.clip_pooler_n, encoder_hidden_states=inputs.llama_vec_n,
                    encoder_attention_mask=inputs.llama_mask_n, **common)
    return demo_unipc(fm_model(c.transformer, dtype, 1.0, positive, negative), latents, sigmas)


def packed_inputs(indices, clean, clean_2x, clean_4x, dtype) -> dict:
    """The demo's clean-latent arguments, under the diffusers transformer's names; its index
    rows (1, n) become the 1-D indices that transformer takes for a batch of one."""
    latent_idx, clean_idx, idx_2x, idx_4x = (i[0] for i in indices)
    return dict(indices_latents=latent_idx, latents_clean=clean.to(dtype), indices_latents_clean=clean_idx,
                latents_history_2x=clean_2x.to(dtype), indices_latents_history_2x=idx_2x,
                latents_history_4x=clean_4x.to(dtype), indices_latents_history_4x=idx_4x)


@torch.no_grad()
def vae_decode(c, latents: torch.Tensor) -> torch.Tensor:
    return c.vae.decode((latents / c.vae.config.scaling_factor).to(c.vae.dtype)).sample


# ---- the two workers' loops ----------------------------------------------------------------


def demo_worker(c, inputs: DemoInputs, rnd: torch.Generator, seconds: float, f1: bool, window: int = WINDOW,
                steps: int = STEPS, gs: float = GS) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (1, 16, 1 + N * window, h, w) in time order, pixels (1, 3, F, H, W) in [-1, 1])."""
    loop = f1_loop if f1 else inverted_loop
    return loop(c, inputs, rnd, demo_sections(seconds, window), window, steps, gs)


def inverted_loop(c, inputs, rnd, sections, window, steps, gs):
    _, _, _, h, w = inputs.start_latent.shape
    history = torch.zeros((1, 16, 1 + 2 + 16, h, w))
    pixels, generated = None, 0
    for padding in demo_paddings(sections):
        last = padding == 0
        pad = padding * window
        split = [1, pad, window, 1, 2, 16]
        pre, _, latent_idx, post, idx_2x, idx_4x = torch.arange(0, sum(split)).unsqueeze(0).split(split, dim=1)
        clean_post, clean_2x, clean_4x = history[:, :, :19].split([1, 2, 16], dim=2)
        clean = torch.cat([inputs.start_latent.to(history), clean_post], dim=2)
        packed = packed_inputs((latent_idx, torch.cat([pre, post], dim=1), idx_2x, idx_4x), clean, clean_2x, clean_4x,
                               c.transformer.dtype)
        new = sample_hunyuan(c, inputs, rnd, 8 * w, 8 * h, window * 4 - 3, steps, gs, **packed)
        if last:
            new = torch.cat([inputs.start_latent.to(new), new], dim=2)
        generated += new.shape[2]
        history = torch.cat([new.to(history), history], dim=2)
        real = history[:, :, :generated]
        if pixels is None:
            pixels = vae_decode(c, real)
        else:
            current = vae_decode(c, real[:, :, : window * 2 + (1 if last else 0)])
            pixels = soft_append_bcthw(current, pixels, window * 4 - 3)
        if last:
            break
    return real, pixels


def f1_loop(c, inputs, rnd, sections, window, steps, gs):
    _, _, _, h, w = inputs.start_latent.shape
    history = torch.cat([torch.zeros((1, 16, 16 + 2 + 1, h, w)), inputs.start_latent.float()], dim=2)
    pixels, generated = None, 1
    split = [1, 16, 2, 1, window]
    start_idx, idx_4x, idx_2x, idx_1x, latent_idx = torch.arange(0, sum(split)).unsqueeze(0).split(split, dim=1)
    for _ in range(sections):
        clean_4x, clean_2x, clean_1x = history[:, :, -19:].split([16, 2, 1], dim=2)
        clean = torch.cat([inputs.start_latent.to(history), clean_1x], dim=2)
        packed = packed_inputs((latent_idx, torch.cat([start_idx, idx_1x], dim=1), idx_2x, idx_4x), clean, clean_2x,
                               clean_4x, c.transformer.dtype)
        new = sample_hunyuan(c, inputs, rnd, 8 * w, 8 * h, window * 4 - 3, steps, gs, **packed)
        generated += new.shape[2]
        history = torch.cat([history, new.to(history)], dim=2)
        real = history[:, :, -generated:]
        if pixels is None:
            pixels = vae_decode(c, real)
        else:
            pixels = soft_append_bcthw(pixels, vae_decode(c, real[:, :, -window * 2:]), window * 4 - 3)
    return real, pixels


# ---- fp-ray against the oracle -------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_pixels() -> np.ndarray:
    """The image as the demo's numpy input has it, read by PIL, not by fp-ray."""
    with Image.open(SAMPLE_IMAGE) as image:
        return np.asarray(image.convert("RGB"))


def aligned_inputs(c, image: np.ndarray, seed: int, width: int = W, height: int = H) -> tuple[DemoInputs, torch.Generator]:
    """The demo's inputs with the diffusers side of the two conditioning disagreements: the start
    latent's posterior sample is the first draw of the seed's generator, which then goes on to
    the sections; SigLIP reads the [0, 1] floats."""
    rnd = torch.Generator("cpu").manual_seed(seed)
    inputs = demo_inputs(c, image, PROMPT, width, height, posterior=rnd)
    return replace(inputs, image_embeds=diffusers_siglip(c, inputs.pixels_uint8).to(c.transformer.dtype)), rnd


def render_and_oracle(components, oracle_components, video_frames, image, tmp_path, schedule, sections, width=W, height=H):
    """(fp-ray's latents, its frames before H.264, the oracle's latents, its pixels) of one video."""
    seconds = sections * WINDOW * 4 / FPS
    request = make_request(prompt=PROMPT, schedule=schedule, sampler="unipc", steps=STEPS, seed=SEED, width=width, height=height,
                           seconds=seconds, guidance=GS, window=WINDOW, fps=FPS)
    result = render(request, tmp_path / "v.mp4", components=components, keep_latents=True)
    assert result.plan.num_sections == sections == demo_sections(seconds, WINDOW)
    done = {p: result.latents[:, :, 1 + p * WINDOW : 1 + (p + 1) * WINDOW] for p in range(sections)}
    frames = video_frames(result.plan, encode_request(components, request).cond, done)

    inputs, rnd = aligned_inputs(oracle_components, image, SEED, width, height)
    ref_latents, ref_pixels = demo_worker(oracle_components, inputs, rnd, seconds, f1=schedule == "forward")
    assert result.latents.shape == ref_latents.shape == (1, 16, 1 + sections * WINDOW, height // 8, width // 8)
    assert frames.shape == (4 * sections * WINDOW + 1, height, width, 3) == demo_uint8(ref_pixels).shape
    assert frames.std() > 10  # real content, not a constant that would match anything
    return result.latents, frames, ref_latents, ref_pixels


@pytest.mark.parametrize("schedule,sections,width,height", [
    ("inverted", 1, W, H), ("inverted", 2, W, H), ("inverted", 5, W, H), ("forward", 1, W, H), ("forward", 3, W, H),
    ("inverted", 1, 96, 80),  # a crop box on a half pixel (test_crop_matches_the_demo)
])
def test_whole_video_matches_the_demo(components, video_frames, sample_pixels, tmp_path, schedule, sections, width, height):
    latents, frames, ref_latents, ref_pixels = render_and_oracle(components, components, video_frames, sample_pixels, tmp_path,
                                                                 schedule, sections, width, height)
    # Bit for bit: the same ops on the same values (the padded prompt's masked tokens add exact
    # zeros to the token refiner's attention; fp-ray cuts them off, speed.trim_text).
    assert torch.equal(latents, ref_latents)
    # the same pixels, rounded alike (fp-ray's chunks decode in the same temporal tiles)
    assert np.array_equal(frames, rounded_uint8(ref_pixels))
    # the demo's mp4 frames are truncated, not rounded: one level apart, about half of them
    truncated = demo_uint8(ref_pixels)
    assert np.abs(frames.astype(int) - truncated).max() == 1 and 0.4 < (frames != truncated).mean() < 0.6


def test_an_oracle_on_a_stock_vae_lands_within_float_noise(components, video_frames, sample_pixels, tmp_path):
    """The VAE as diffusers loads it, as an outside oracle would: on the CPU fp-ray runs the VAE's
    3D convolutions on oneDNN (models.prefer_onednn_convs), which round otherwise than the stock
    kernel, so the start latent and every decode move in the last bits; nothing more."""
    stock = AutoencoderKLHunyuanVideo.from_pretrained(str(TINY_CHECKPOINT), subfolder="vae").eval()
    latents, frames, ref_latents, ref_pixels = render_and_oracle(components, replace(components, vae=stock), video_frames,
                                                                 sample_pixels, tmp_path, "inverted", 1)
    assert 0 < (latents - ref_latents).abs().max().item() <= 1e-5
    rounded = rounded_uint8(ref_pixels)
    assert np.abs(frames.astype(int) - rounded).max() <= 1 and (frames != rounded).mean() < 1e-3


def test_where_the_references_disagree(components, sample_pixels, tmp_path):
    """The demo's source against diffusers' pipeline (whose side fp-ray takes), each place pinned."""
    c = components
    # 1. Noise. The demo's vae_encode draws the start latent's posterior sample from torch's
    # global generator and seeds a fresh one for the sections; diffusers draws the posterior
    # sample from the seed's generator first, so every section's noise comes one image draw later.
    request = make_request(prompt=PROMPT, steps=STEPS, seed=SEED, width=W, height=H, seconds=2.4, sampler="unipc")
    encoded = encode_request(c, request)
    ours_first = noise_stream(encoded.plan, encoded.cond, SEED).draw(0)
    g = torch.Generator("cpu").manual_seed(SEED)
    demo_first = torch.randn(ours_first.shape, generator=g)
    g = torch.Generator("cpu").manual_seed(SEED)
    torch.randn((1, 16, 1, H // 8, W // 8), generator=g)  # the posterior sample's draw
    assert torch.equal(ours_first, torch.randn(ours_first.shape, generator=g))
    assert not torch.allclose(ours_first, demo_first)

    # 2. SigLIP's input. The demo hands the processor the uint8 crop; diffusers hands it [0, 1]
    # floats, which its resize turns back into uint8 by truncation, a level lower where x / 255 * 255
    # falls below x in float32.
    pixels = demo_crop(sample_pixels, W, H)
    floats = torch.from_numpy(pixels.astype(np.float32) / 255.0) * 2.0 - 1.0
    back = (((floats + 1) / 2).numpy() * 255).astype(np.uint8)
    assert 0.01 < (back != pixels).mean() and np.abs(back.astype(int) - pixels).max() == 1
    assert (demo_siglip(c, pixels) - diffusers_siglip(c, pixels)).abs().max().item() > 1e-3

    # 3. Distilled guidance. The demo casts gs * 1000 to the transformer's dtype; diffusers (and
    # fp-ray) cast gs, then multiply: in float32 the slider's 4.01 gives 4010.0002 against 4010.
    # The default 10 is exact both ways.
    for dtype, count in ((torch.float32, 34), (torch.bfloat16, 788)):
        grid = [k / 100 for k in range(100, 3201)]
        differ = [g for g in grid if not torch.equal(torch.tensor([g * 1000.0]).to(dtype), torch.tensor([g], dtype=dtype) * 1000.0)]
        assert len(differ) == count and 10.0 not in differ

    # 1 and 2 as a one-section video sees them: the demo as it is, against the
    # oracle taking the diffusers side (which fp-ray matches, test above).
    image_g = torch.Generator("cpu").manual_seed(SEED)  # stands for the demo's global generator
    demo = demo_inputs(c, sample_pixels, PROMPT, W, H, posterior=image_g)
    demo_latents, _ = demo_worker(c, demo, torch.Generator("cpu").manual_seed(SEED), 1.2, f1=False)
    aligned, rnd = aligned_inputs(c, sample_pixels, SEED)
    aligned_latents, _ = demo_worker(c, aligned, rnd, 1.2, f1=False)
    assert torch.equal(demo_latents[:, :, :1], aligned_latents[:, :, :1])  # the same posterior draw
    assert (demo_latents - aligned_latents).abs().max().item() > 0.1


@pytest.mark.parametrize("seconds", [1, 2.5, 5, 5.4, 10, 24.6, 60, 120])
def test_section_and_frame_counts_match_the_demo(seconds):
    """Sections from seconds as the demo counts them (30 fps, round half to even), and the
    frames each of its loops writes: the first decode, then each soft-append's new frames."""
    n = demo_sections(seconds, WINDOW)
    overlap = WINDOW * 4 - 3

    def pixels(latent_frames: int) -> int:
        return 4 * (latent_frames - 1) + 1

    # inverted: the window (with the start latent when it is also the last), then 2 windows (+1)
    inverted = pixels(WINDOW + (n == 1)) + sum(pixels(2 * WINDOW + (k == n - 1)) - overlap for k in range(1, n))
    f1 = pixels(1 + WINDOW) + sum(pixels(2 * WINDOW) - overlap for _ in range(1, n))  # start + window, then 2 windows
    for schedule in ("inverted", "forward"):
        request = make_request(prompt="p", seconds=seconds, width=W, height=H, schedule=schedule)
        assert request.num_sections == n
        assert plan_request(request, W, H).pixel_frames == inverted == f1


def test_section_count_over_the_demo_slider():
    """Every length the demo's slider offers (1 to 120 s in steps of 0.1): 5.4 s is 4.5 sections
    by the demo's arithmetic, which rounds to 4; seconds / 1.2 gives 4.500000000000001."""
    for k in range(10, 1201):
        seconds = k / 10
        assert make_request(prompt="p", seconds=seconds).num_sections == demo_sections(seconds, WINDOW), seconds


@pytest.mark.parametrize("window", [1, 4, 9, 16, 33])
def test_packed_indices_match_the_demo(window):
    """Every section's place and RoPE indices for any window of the demo's hidden slider: the
    inverted split [1, padding, window, 1, 2, 16] with the paddings past 4 sections
    [3, 2, 2, 2, 1, 0], and F1's [1, 16, 2, 1, window]."""
    sections = 6
    for schedule in ("inverted", "forward"):
        request = make_request(prompt="p", seconds=sections * window * 4 / FPS, width=W, height=H, window=window, schedule=schedule)
        plan = plan_request(request, W, H)
        assert plan.num_sections == sections == demo_sections(request.seconds, window)
        in_time = list(range(sections))
        assert [s.position for s in plan.sections] == (in_time[::-1] if schedule == "inverted" else in_time)
        for section, padding in zip(plan.sections, demo_paddings(sections) if schedule == "inverted" else [0] * sections):
            if schedule == "inverted":
                split = [1, padding * window, window, 1, 2, 16]
                pre, _, latents, post, two, four = torch.arange(sum(split)).split(split)
            else:
                split = [1, 16, 2, 1, window]
                pre, four, two, post, latents = torch.arange(sum(split)).split(split)
            idx = section.layout.indices()
            assert torch.equal(idx.latents, latents) and torch.equal(idx.clean, torch.cat([pre, post]))
            assert torch.equal(idx.history_2x, two) and torch.equal(idx.history_4x, four)


def test_buckets_match_the_demo():
    """Aspect ratios from 1:4 to 4:1, the table's own sizes and its ties."""
    sizes = [(h, w) for h in (90, 480, 512, 720, 1000, 1080, 1920, 4000) for w in (90, 480, 512, 720, 1000, 1080, 1920, 4000)]
    sizes += list(DEMO_BUCKETS) + [(h + 1, w) for h, w in DEMO_BUCKETS] + [(623, 624), (624, 623)]
    for h, w in sizes:
        bh, bw = demo_bucket(h, w)
        assert nearest_bucket(w, h) == (bw, bh), (h, w)


@pytest.mark.parametrize("width,height", [(64, 48), (96, 80), (640, 608), (608, 640), (832, 480), (64, 64), (112, 64)])
def test_crop_matches_the_demo(sample_pixels, width, height):
    """The demo's crop box is in halves and PIL rounds it half to even: from 640x480, 96x80
    covers at 107x80, 11 columns over, box left 5.5 -> 6, not 5."""
    ours = np.asarray(resize_and_center_crop(Image.fromarray(sample_pixels), width, height))
    assert np.array_equal(ours, demo_crop(sample_pixels, width, height))


def test_prompt_conditioning_matches_the_demo(components):
    """fp-ray's prompt embedding, cut to its real tokens, is the demo's before its padding to 512."""
    llama_vec, pooler = demo_prompt(components, PROMPT)
    ours = trim_text(encode_prompt(components, PROMPT))
    assert torch.equal(ours.embeds, llama_vec) and torch.equal(ours.pooled, pooler)
    padded, mask = crop_or_pad_yield_mask(llama_vec, 512)
    assert padded.shape[1] == 512 and int(mask.sum()) == llama_vec.shape[1] == ours.mask.shape[1]
    assert not padded[:, llama_vec.shape[1]:].any()
