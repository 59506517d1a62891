from __future__ import annotations

import io
import json

import av
import numpy as np
import pytest

from fp_ray.video import FASTSTART, FRAGMENTED, SegmentJoiner, encode_segment, join_segments, read_frames


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


@pytest.mark.parametrize("options", [FASTSTART, FRAGMENTED], ids=["faststart", "fragmented"])
def test_joined_and_progressive_mp4s_keep_their_tags(tmp_path, options):
    """The render record rides in the comment tag through the packet-copying join, in the
    moov-first mp4 and in the fragmented one, and reads back through PyAV (what ffprobe shows)."""
    frames = np.zeros((4, 48, 64, 3), dtype=np.uint8)
    segment = encode_segment(frames, 30, 16)
    comment = json.dumps({"prompt": "é \"quoted\"\n" + "x" * 4000})
    target = tmp_path / "v.mp4"
    if options is FASTSTART:
        join_segments([segment, segment], target, 30, {"comment": comment})
    else:
        joiner = SegmentJoiner(str(target), 30, options, {"comment": comment})
        joiner.append(segment)
        joiner.append(segment)
        joiner.close()
    with av.open(str(target)) as container:
        assert container.metadata["comment"] == comment
    assert read_frames(target).shape == (8, 48, 64, 3)


def test_a_growing_progressive_file_holds_the_finished_segments(tmp_path):
    """Each segment's fragment is on disk once the next one starts, not only at the end: a
    player reading the growing file, or what a killed render leaves, has the finished start."""
    rng = np.random.default_rng(0)
    segments = [encode_segment(rng.integers(0, 255, (5, 32, 48, 3), dtype=np.uint8), 30, 16) for _ in range(3)]
    path = tmp_path / "progressive.mp4"
    joiner = SegmentJoiner(str(path), 30, FRAGMENTED)
    for segment in segments:
        joiner.append(segment)
    assert read_frames(io.BytesIO(path.read_bytes())).shape[0] == 10  # the first two, before close
    joiner.close()
    assert read_frames(path).shape[0] == 15


def test_temporary_files_of_a_killed_write_are_removed_by_the_next(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    orphan = tmp_path / f".v.mp4.{host}-{int(gone.stdout)}.abc.tmp"  # a process killed while joining
    running = tmp_path / f".v.mp4.{host}-{os.getpid()}.def.tmp"  # a join in flight
    other = tmp_path / f".w.mp4.{host}-{int(gone.stdout)}.abc.tmp"  # another video's
    for path in (orphan, running, other):
        path.write_bytes(b"part of a video")
    join_segments([encode_segment(np.zeros((2, 32, 48, 3), dtype=np.uint8), 30, 16)], tmp_path / "v.mp4", 30)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, other.name, "v.mp4"])
