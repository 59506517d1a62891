"""Whole-frame and tiled VAE use: images encode whole (the reference's start latent at any
size), chunks decode whole where the GPU has room and in tiles otherwise."""

from __future__ import annotations

import copy

import pytest
import torch

from fp_ray import decode
from fp_ray.decode import DECODE_HEADROOM_BYTES, UNTILED_DECODE_BYTES_PER_PIXEL, decode_chunk, decode_fits_untiled
from fp_ray.encode import encode_latent
from fp_ray.models import untiled

GIB = 1024**3


@pytest.fixture()
def pixels():
    g = torch.Generator().manual_seed(3)
    small = torch.rand(1, 3, 6, 6, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(small, size=(320, 288), mode="bilinear")  # above the 256 px tile


def test_untiled_view_shares_weights_and_leaves_the_vae_tiled(components):
    vae = components.vae
    view = untiled(vae)
    assert untiled(vae) is view and view.use_tiling is False and vae.use_tiling is True
    assert view.decoder is vae.decoder and view.post_quant_conv.weight is vae.post_quant_conv.weight
    assert "_fp_ray_untiled" not in dict(vae.named_modules()) and len(list(vae.parameters())) == len(list(view.parameters()))


def test_images_encode_whole_as_the_reference(components, pixels):
    """A 320x288 image with tiling on would encode in tiles: another latent than the
    reference's (diffusers' pipeline leaves tiling off)."""
    whole = copy.deepcopy(components.vae)
    whole.disable_tiling()
    latent = encode_latent(components, pixels, torch.Generator().manual_seed(0))
    video = pixels.unsqueeze(2)
    reference = whole.encode(video).latent_dist.sample(generator=torch.Generator().manual_seed(0)) * whole.config.scaling_factor
    tiled = components.vae.encode(video).latent_dist.sample(generator=torch.Generator().manual_seed(0)) * whole.config.scaling_factor
    assert torch.equal(latent, reference)
    assert (latent - tiled).abs().max() > 1e-3  # the test can tell the two apart


@pytest.fixture()
def fake_cuda(monkeypatch):
    """A CUDA device with `free` bytes free (and 1 GiB cached unused in this process)."""
    state = {"free": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"], 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * GIB)
    return state


def test_whole_frame_decode_needs_its_estimate_plus_headroom(fake_cuda):
    cuda = torch.device("cuda")
    need = UNTILED_DECODE_BYTES_PER_PIXEL * 640 * 640 + DECODE_HEADROOM_BYTES
    fake_cuda["free"] = need - GIB  # + 1 GiB cached in this process: exactly enough
    assert decode_fits_untiled(cuda, 640, 640)
    fake_cuda["free"] = need - GIB - 1
    assert not decode_fits_untiled(cuda, 640, 640)
    assert decode_fits_untiled(cuda, 320, 320)  # a quarter of the pixels
    fake_cuda["free"] = 10**15
    assert not decode_fits_untiled(torch.device("cpu"), 640, 640)  # host RAM: always tiles


def test_decode_falls_back_to_tiles_when_the_whole_decode_runs_out_of_memory(components, monkeypatch):
    vae = components.vae
    latents = torch.randn(1, 16, 3, 40, 36, generator=torch.Generator().manual_seed(1))
    tiled = decode_chunk(vae, latents)  # on the CPU: the tiled path
    calls = []

    def out_of_memory(*args, **kwargs):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory (test)")

    monkeypatch.setattr(decode, "decode_fits_untiled", lambda *a: True)
    monkeypatch.setattr(untiled(vae), "decode", out_of_memory)
    assert torch.equal(decode_chunk(vae, latents), tiled) and calls == [1]
    monkeypatch.undo()
    monkeypatch.setattr(decode, "decode_fits_untiled", lambda *a: True)
    whole = decode_chunk(vae, latents)  # the whole-frame path really differs at 320x288
    assert whole.shape == tiled.shape and (whole.float() - tiled.float()).abs().max() > 1e-4
