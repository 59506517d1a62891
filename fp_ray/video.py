"""mp4 writing through PyAV (libx264). Files appear whole or not at all."""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# A fixed thread count keeps x264's output byte-identical on machines with any core count.
X264_THREADS = 4


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = 30, crf: int = 16) -> Path:
    """Encode (F, H, W, 3) uint8 frames as H.264 yuv420p. Written to a temporary file in the
    target folder and renamed into place, so a crash never leaves a truncated video."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames_count, height, width, _ = frames.shape
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".mp4", dir=path.parent)
    os.close(fd)
    try:
        with av.open(tmp, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height = width, height
            stream.pix_fmt = "yuv420p"
            stream.time_base = Fraction(1, fps)
            # mbtree off: with it x264 gave different bytes for the same frames from run to
            # run (seen at every size tried); renders must be byte-identical wherever they run.
            stream.options = {"crf": str(crf), "preset": "medium", "threads": str(X264_THREADS), "x264-params": "mbtree=0"}
            for i in range(frames_count):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
                frame.pts = i  # explicit timestamps: the encoder must not guess them
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a video is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_frames(path: str | Path) -> np.ndarray:
    """Decode a video to (F, H, W, 3) uint8 RGB."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
