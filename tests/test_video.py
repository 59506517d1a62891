from __future__ import annotations

import numpy as np
import pytest

from fp_ray.video import encode_segment, join_segments, read_frames


def test_roundtrip_keeps_frames(tmp_path):
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.integers(0, 255, (5, 1, 32, 48, 3), dtype=np.uint8), 1, axis=1)[:, 0]
    frames[:] = np.linspace(0, 255, 48, dtype=np.uint8)[None, None, :, None]  # smooth, compresses well
    path = join_segments([encode_segment(frames, 30, 0)], tmp_path / "sub" / "v.mp4", fps=30)
    back = read_frames(path)
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 3
    assert (path.stat().st_mode & 0o777) != 0o600


def test_failed_write_leaves_nothing(tmp_path):
    bad = np.zeros((2, 31, 47, 3), dtype=np.uint8)  # odd sizes: yuv420p refuses
    with pytest.raises(Exception):
        encode_segment(bad, 30, 16)
    good = encode_segment(np.zeros((2, 32, 48, 3), dtype=np.uint8), 30, 16)
    with pytest.raises(Exception):  # a broken segment half-way through the join
        join_segments([good, b"not an mp4"], tmp_path / "v.mp4", fps=30)
    assert list(tmp_path.iterdir()) == []


def test_same_frames_same_bytes(components, tmp_path):
    """Rendered frames (the content on which x264's mb-tree once made writes differ) encode
    to one byte string, write after write."""
    from fp_ray.render import render
    from fp_ray.request import make_request

    rendered = render(make_request(prompt="x", width=160, height=128, steps=2, seconds=1.2), tmp_path / "r.mp4", components=components)
    frames = read_frames(rendered.path)
    digests = {encode_segment(frames, 30, 16) for _ in range(10)}
    assert len(digests) == 1
