"""mp4 through PyAV (libx264): encode a segment, join segments without re-encoding, and a
fragmented mp4 that grows as the time-ordered prefix of a render finishes. Files appear
whole or not at all."""

from __future__ import annotations

import io
import itertools
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Mapping

import av
import numpy as np

from .storage import atomic_file

# A fixed thread count keeps x264's output byte-identical on machines with any core count.
X264_THREADS = 4
FASTSTART = {"movflags": "+faststart", "fflags": "+bitexact"}  # moov first: plays before it is all loaded
# flush_packets: each fragment reaches the file as it closes (at the next segment's keyframe), not when
# the stream ends: readers of a growing file, and whatever is left after a kill, see the finished start
FRAGMENTED = {"movflags": "+frag_keyframe+empty_moov+default_base_moof", "fflags": "+bitexact", "flush_packets": "1"}


def encode_frames(frames: Iterable[np.ndarray], target, fps: int, crf: int) -> int:
    """Encode (H, W, 3) uint8 frames one at a time (a stream of any length) as an mp4 at
    `target` (a path or a file object); returns the frame count."""
    frames = iter(frames)
    first = next(frames)
    height, width, _ = first.shape
    count = 0
    with av.open(target, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        # mbtree off: with it x264 gave different bytes for the same frames from run to
        # run (seen at every size tried); renders must be byte-identical wherever they run.
        stream.options = {"crf": str(crf), "preset": "medium", "threads": str(X264_THREADS), "x264-params": "mbtree=0"}
        for pixels in itertools.chain([first], frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            frame.pts = count  # explicit timestamps: the encoder must not guess them
            for packet in stream.encode(frame):
                container.mux(packet)
            count += 1
        for packet in stream.encode():
            container.mux(packet)
    return count


def encode_segment(frames: np.ndarray, fps: int, crf: int) -> bytes:
    """(F, H, W, 3) uint8 -> the bytes of an mp4 (a segment: a few MB, starts on a keyframe)."""
    buffer = io.BytesIO()
    encode_frames(frames, buffer, fps, crf)
    return buffer.getvalue()


class SegmentJoiner:
    """Muxes segments (mp4 bytes, same codec settings) one after another into one stream,
    copying packets and shifting their timestamps: no re-encoding. `metadata`: container
    tags (e.g. {"comment": ...}), written with the header, before the first packet."""

    def __init__(self, target: str, fps: int, options: dict[str, str], metadata: Mapping[str, str] | None = None):
        self.fps = fps
        self.container = av.open(target, mode="w", format="mp4", options=options)
        self.container.metadata.update(metadata or {})
        self.stream = None
        self.frames = 0

    def append(self, segment: bytes | str) -> int:
        """Mux one segment (its bytes, or the path of a local mp4 read as it streams) after
        those before; returns its frame count."""
        frame_time = Fraction(1, self.fps)
        count = 0
        with av.open(io.BytesIO(segment) if isinstance(segment, bytes) else segment) as source:
            src = source.streams.video[0]
            if self.stream is None:
                self.stream = self.container.add_stream_from_template(src)
                self.stream.time_base = frame_time
            for packet in source.demux(src):
                if packet.dts is None:  # the demuxer's end-of-stream marker
                    continue
                # timestamps in frames: exact at any fps, whatever timescale the muxer chose
                pts, dts, duration = (round(t * packet.time_base / frame_time) for t in (packet.pts, packet.dts, packet.duration))
                packet.time_base = frame_time
                packet.pts, packet.dts, packet.duration = pts + self.frames, dts + self.frames, duration
                packet.stream = self.stream
                self.container.mux(packet)
                count += 1
        self.frames += count
        return count

    def close(self) -> None:
        self.container.close()


def join_segments(segments: Iterable[bytes | str], path: str | Path, fps: int, metadata: Mapping[str, str] | None = None) -> Path:
    """The segments in order as one mp4 (`write_joined`), written atomically."""
    with atomic_file(path) as tmp:
        write_joined(segments, tmp, fps, metadata)
    return Path(path)


def write_joined(segments: Iterable[bytes | str], target: str, fps: int, metadata: Mapping[str, str] | None = None) -> None:
    """The segments in order as one mp4 at `target` (moov at the front, with the `metadata` tags)."""
    joiner = SegmentJoiner(target, fps, FASTSTART, metadata)
    try:
        for segment in segments:
            joiner.append(segment)
    finally:
        joiner.close()


def frame_count(path: str | Path) -> int:
    """Frames of a video fp-ray wrote, from its header (the mp4's sample table; nothing decoded)."""
    with av.open(str(path)) as container:
        return container.streams.video[0].frames


def read_frames(path: str | Path | io.BytesIO) -> np.ndarray:
    """Decode a video (a file or its bytes in a BytesIO) to (F, H, W, 3) uint8 RGB."""
    with av.open(path if isinstance(path, io.BytesIO) else str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
