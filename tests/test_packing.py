from __future__ import annotations

import math

import pytest
import torch

from fp_ray.packing import (
    ContextLayout,
    context_length_bound,
    context_tokens,
    equal_compression_kernels,
    frame_context_length,
    level_rates,
    pack_tail,
    packed_length,
    patch_tokens,
    total_context_length,
)


def reference_inverted(padding: int, window: int):
    """The reference pipeline's own construction, for comparison."""
    idx = torch.arange(0, sum([1, padding, window, 1, 2, 16]))
    prefix, _, latents, one, two, four = idx.split([1, padding, window, 1, 2, 16])
    return latents, torch.cat([prefix, one]), two, four


@pytest.mark.parametrize("padding,window", [(0, 9), (9, 9), (27, 9), (6, 3)])
def test_inverted_indices_match_reference(padding, window):
    got = ContextLayout("inverted", window, padding).indices()
    want = reference_inverted(padding, window)
    for a, b in zip((got.latents, got.clean, got.history_2x, got.history_4x), want):
        assert torch.equal(a, b)


def test_forward_indices_match_reference():
    idx = torch.arange(0, 1 + 16 + 2 + 1 + 9)
    prefix, four, two, one, latents = idx.split([1, 16, 2, 1, 9])
    got = ContextLayout("forward", 9).indices()
    assert torch.equal(got.latents, latents)
    assert torch.equal(got.clean, torch.cat([prefix, one]))
    assert torch.equal(got.history_2x, two) and torch.equal(got.history_4x, four)


def test_gap_moves_history_right():
    plain = ContextLayout("inverted", 9, 9).indices()
    gapped = ContextLayout("inverted", 9, 9, gap=18).indices()
    assert torch.equal(plain.latents, gapped.latents)
    assert gapped.clean[1] == plain.clean[1] + 18 and gapped.history_4x[-1] == plain.history_4x[-1] + 18


def test_context_tokens_640():
    # 640x640 -> 80x80 latents: 1x patches are 2x2, 2x are 2x4x4, 4x are 4x8x8
    t = context_tokens(9, 80, 80)
    assert t.window == 9 * 40 * 40
    assert t.clean == 2 * 40 * 40
    assert t.history_2x == 1 * 20 * 20
    assert t.history_4x == 4 * 10 * 10
    assert t.total == t.window + t.clean + t.history_2x + t.history_4x


def test_patch_tokens_pad_up():
    # 2 frames at 4x (4,8,8) on a 60x44 latent: replicate-padded to 4x64x48
    assert patch_tokens(2, 60, 44, (4, 8, 8)) == 1 * 8 * 6


def test_geometric_context_converges_to_bound():
    lf, lam, s = 1536.0, 2.0, 1
    assert frame_context_length(lf, lam, 0) == lf
    assert frame_context_length(lf, lam, 5) == lf / 32
    lengths = [total_context_length(lf, lam, t, s) for t in (1, 2, 4, 8, 40)]
    assert lengths[0] == lf * 2  # one full input frame plus S
    assert all(a < b for a, b in zip(lengths, lengths[1:]))
    bound = context_length_bound(lf, lam, s)
    assert bound == lf * (s + 2)
    assert lengths[-1] < bound and math.isclose(lengths[-1], bound, rel_tol=1e-12)
    # sum of phi over T frames equals the closed form
    assert math.isclose(
        sum(frame_context_length(lf, lam, i) for i in range(10)) + s * lf, total_context_length(lf, lam, 10, s)
    )


def test_repeated_levels():
    rates = level_rates(2.0, (1, 2, 2, 1))
    assert rates == [1, 0.5, 0.5, 0.25, 0.25, 0.125]
    assert packed_length(1.0, rates) == 2.625
    assert packed_length(100.0, rates, predicted_frames=1) == 362.5


def test_equal_compression_kernels():
    assert equal_compression_kernels(64) == [(1, 8, 8), (4, 4, 4), (16, 2, 2), (64, 1, 1)]
    for k in equal_compression_kernels(64):
        assert math.prod(k) == 64


def test_tail_options():
    tail = torch.arange(2 * 16 * 6 * 8 * 8, dtype=torch.float32).reshape(2, 16, 6, 8, 8)
    assert pack_tail(tail, "drop") is None
    avg = pack_tail(tail, "global_average")
    assert avg.shape == (2, 16, 1, 8, 8) and torch.allclose(avg[:, :, 0], tail.mean(2))
    pooled = pack_tail(tail, "pool3d", (4, 8, 8))
    assert pooled.shape == (2, 16, 2, 1, 1)
    assert torch.allclose(pooled[:, :, 0, 0, 0], tail[:, :, :4].mean((2, 3, 4)))
    with pytest.raises(ValueError, match="unknown tail"):
        pack_tail(tail, "median")
