"""Extending a video: `extend` names a clip, and the render's new sections continue it
(forward schedule: the F1 layout, the clip is the past) or lead into it (inverted: the
clip is the future, its first frame the end image). The output is the clip's own frames,
untouched, followed (forward) or preceded (inverted) by the new ones.

- Context: the new sections read the clip's latent frames next to them, as if the clip
  were sections already generated: forward, its last frames are the 1x/2x/4x history;
  inverted, its first frames (frame 0 alone first: the end image's latent) are the future.
  Only those `4 * max(19, window) + 1` pixel frames are VAE-encoded (the posterior mean: no
  draw from the request's noise stream, so the section noise is that of a plain render).
- Seam: forward, the first new chunk is decoded after the clip's last latent frames (up to
  a window, as a forward chunk decodes after the section before it), and the frames of that
  decode that stand for the clip are dropped: the first new frame continues the clip, which
  is never blended or altered. Inverted needs no such context: the VAE decoder is causal in
  time, so the last new frames do not depend on the clip's latents after them.
- Scale: the clip streams through PyAV frame by frame; no more than the context frames are
  held. Its packets are copied into the output when they decode with the segments' own
  parameter sets (an fp-ray output at the same crf); any other clip is re-encoded frame by
  frame at the request's crf. Audio is not kept.
- Size and rate: the output has the clip's size and frame rate. The clip's frames are kept
  as they are, so its sides must already be multiples of 16 within the request limits (no
  resize), a `width`/`height` must match it, and a `fps` other than the clip's (rounded to a
  whole number) is an error; without one the request takes the clip's.
- A clip shorter than the context (fewer than 77 frames) is used whole: the missing history
  is zeros, as the reference's history is before its first sections.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import os
import shutil
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np
import torch
from pydantic import ValidationError

from .packing import HISTORY_FRAMES
from .request import MAX_SIDE, MIN_SIDE, RenderRequest, RequestError, excerpt
from .storage import file_sha256, is_uri, temporary_folder

if TYPE_CHECKING:
    from PIL import Image

    from .encode import Conditioning
    from .models import Components
    from .schedule import Plan, Section

MAX_CLIP_SECONDS = 3600.0  # an hour of video to copy or re-encode; longer is refused
MIN_CLIP_FRAMES = 5  # one latent frame past the first; fewer is a still, not a clip to continue
MAX_CLIP_BYTES = 16 * 2**30  # a downloaded clip's temporary copy: an hour at high quality fits
CHUNK = 1 << 20


class ClipError(RequestError):
    """A clip to extend that cannot be used; the message names it and says why."""


@dataclass(frozen=True)
class ClipInfo:
    """What the container's header says about a clip's video stream."""

    width: int
    height: int
    fps: int  # the average frame rate, rounded to a whole number
    exact_rate: Fraction
    codec: str
    extradata: bytes | None
    duration_s: float | None
    frames: int  # as the header counts them (0: it does not say)


def forward(request: RenderRequest) -> bool:
    """The direction of an extension: the forward schedule continues the clip."""
    return request.schedule == "forward"


@contextlib.contextmanager
def local_clip(location: str) -> Iterator[Path]:
    """The clip as a local file: a path as it is; a URL or pyarrow.fs URI streamed into a
    temporary file (never whole in memory), removed after, or, inside `downloads_held`, kept
    there for the next read of the same location."""
    what = f"extend: {excerpt(location, 200)}"
    if not is_uri(location):
        path = Path(location).expanduser()
        if path.is_dir():
            raise ClipError(f"{what}: is a folder, not a video")
        if not path.is_file():  # a fifo or device is never opened: reading one may never end
            raise ClipError(f"{what}: {'is not a regular file' if path.exists() else 'file not found'}")
        yield path
        return
    held = _held.get()
    if held is None:
        with temporary_folder("clip") as tmp:
            yield _download(location, tmp / "clip", what)
        return
    if location not in held.paths:
        with contextlib.ExitStack() as folder:
            path = _download(location, folder.enter_context(temporary_folder("clip")) / "clip", what)
            held.paths[location] = path
            held.folders.push(folder.pop_all())  # removed when the scope ends
    yield held.paths[location]


@dataclass
class _Downloads:
    paths: dict[str, Path]
    folders: contextlib.ExitStack


_held: contextvars.ContextVar[_Downloads | None] = contextvars.ContextVar("held_clip_downloads", default=None)


@contextlib.contextmanager
def downloads_held() -> Iterator[None]:
    """Within it, a clip at a URL or URI is downloaded once, at its first read: a command's
    check of the request, its encoder and its output (one process) read that copy, where each
    downloaded the clip again (three downloads of what may be a gigabyte), and the output
    joins the very bytes that were encoded. Worker threads started with asyncio.to_thread
    see the scope (they copy the context). Nested, the outer scope holds them."""
    if _held.get() is not None:
        yield
        return
    with contextlib.ExitStack() as folders:
        token = _held.set(_Downloads({}, folders))
        try:
            yield
        finally:
            _held.reset(token)


def _download(location: str, path: Path, what: str) -> Path:
    from .storage import open_remote

    try:
        with open_remote(location) as src, path.open("wb") as dst:
            copied = 0
            while block := src.read(CHUNK):
                copied += len(block)
                if copied > MAX_CLIP_BYTES:
                    raise ClipError(f"{what}: is over {MAX_CLIP_BYTES // 2**30} GB")
                dst.write(block)
    except FileNotFoundError:
        raise ClipError(f"{what}: file not found") from None
    except (OSError, ValueError) as e:  # StorageError (an HTTP error, an unreachable host) is an OSError
        raise ClipError(f"{what}: cannot read it: {e}") from None
    return path


def _av_errors() -> tuple[type[BaseException], ...]:
    import av

    # a corrupt or foreign file makes FFmpeg fail in many ways; each is "cannot read it"
    return (av.FFmpegError, ValueError, EOFError, IndexError, UnicodeDecodeError)


def probe(path: Path, what: str) -> ClipInfo:
    """The clip's video stream as its header describes it; ClipError when there is none."""
    import av

    try:
        with av.open(str(path)) as container:
            if container.format.name == "image2" or container.format.name.endswith("_pipe"):
                # FFmpeg reads a PNG or JPEG as a one-frame video; as a clip it is a mistake
                raise ClipError(f"{what}: is a still image, not a video; a start image is --image")
            if not container.streams.video:
                raise ClipError(f"{what}: has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            ctx = stream.codec_context
            duration = float(container.duration / av.time_base) if container.duration else None
            info = ClipInfo(ctx.width, ctx.height, round(rate) if rate else 0, Fraction(rate or 0), ctx.name,
                            bytes(ctx.extradata) if ctx.extradata else None, duration, stream.frames or 0)
    except ClipError:
        raise
    except _av_errors():
        raise ClipError(f"{what}: is not a video PyAV can read") from None
    if info.width <= 0 or info.height <= 0 or info.fps <= 0:
        raise ClipError(f"{what}: its video stream has no frame size or rate")
    return info


def adapted(request: RenderRequest, info: ClipInfo) -> RenderRequest:
    """`request` with the clip's size and frame rate (a request that sets either must agree),
    after checking that the clip's size can be the video's."""
    what = f"extend: {excerpt(request.extend, 120)}"
    w, h = info.width, info.height
    if w % 16 or h % 16 or not (MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE):
        raise ClipError(f"{what} is {w}x{h}; the new frames take the clip's size and it is kept as it is, so each side "
                        f"must be a multiple of 16 between {MIN_SIDE} and {MAX_SIDE}: crop or scale it first")
    if request.width is not None and (request.width, request.height) != (w, h):
        raise ClipError(f"size: {request.width}x{request.height} is not the clip's {w}x{h}; leave it out to take the clip's")
    if info.duration_s is None:  # a raw stream: its length is known only once decoded through
        raise ClipError(f"{what} does not say how long it is (a raw stream?); put it in an mp4 or another container first")
    if info.duration_s > MAX_CLIP_SECONDS:
        raise ClipError(f"{what} is too long ({info.duration_s:.0f} s; at most {MAX_CLIP_SECONDS:.0f} s)")
    if (frames := info.frames or round(info.duration_s * info.fps)) < MIN_CLIP_FRAMES:
        raise ClipError(f"{what} is {frames} frame{'s' * (frames != 1)}; a clip to extend has at least {MIN_CLIP_FRAMES}")
    if request.fps != info.fps and "fps" in request.model_fields_set:
        raise ClipError(f"fps: {request.fps} is not the clip's {info.fps} fps; leave it out to take the clip's")
    if (request.fps, request.width, request.height) == (info.fps, w, h):
        return request
    try:
        return RenderRequest.model_validate({**request.model_dump(), "fps": info.fps, "width": w, "height": h})
    except ValidationError as e:
        reason = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise ClipError(f"{what} at {info.fps} fps: {reason}") from None


def checked_request(request: RenderRequest) -> tuple[RenderRequest, str]:
    """At the edge (CLI, manifest row, HTTP): the request adapted to its clip (`adapted`) and
    the clip's sha256, from its header and bytes, without decoding it."""
    with local_clip(request.extend) as path:
        info = probe(path, f"extend: {excerpt(request.extend, 120)}")
        return adapted(request, info), file_sha256(path)


def context_frames(window: int) -> int:
    """Latent frames of the clip the new sections may read: the 19-frame history, or a whole
    window as the seam's decode context, whichever is more."""
    return max(HISTORY_FRAMES, window)


SEEK_MARGIN_S = 4.0  # decoded before the last frames a forward extension needs: covers a GOP or two


def _decode(container, frames: collections.deque, stop_when_full: bool) -> np.ndarray | None:
    """Append the container's frames (from where it stands) to `frames`; the first one decoded."""
    first = None
    for frame in container.decode(video=0):
        frames.append(frame.to_ndarray(format="rgb24"))
        first = frames[-1] if first is None else first
        if stop_when_full and len(frames) == frames.maxlen:
            break
    return first


def _tail_start(container, keep: int) -> float:
    """Seconds into the clip from which its last `keep` frames, and a margin, are decoded
    (0: decode it all)."""
    import av

    seconds = float(container.duration / av.time_base) if container.duration else 0.0
    rate = float(container.streams.video[0].average_rate or 0)
    return max(0.0, seconds - keep / rate - SEEK_MARGIN_S) if rate and seconds else 0.0


def read_context(path: Path, what: str, at_end: bool, latent_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(first frame (H, W, 3), context frames (F, H, W, 3)) uint8 of the clip, decoded as it
    streams: at_end, its last 4k+1 frames (k <= latent_frames), else its first. A long clip is
    not decoded through for its end: it is entered at the keyframe before its last seconds
    (and decoded whole only when that seek did not land early enough)."""
    import av

    frames: collections.deque[np.ndarray] = collections.deque(maxlen=4 * latent_frames + 1)
    try:
        with av.open(str(path)) as container:
            start_s, first = _tail_start(container, frames.maxlen) if at_end else 0.0, None
            stream = container.streams.video[0]
            if start_s > 0 and stream.time_base:
                first = _decode(container, collections.deque(maxlen=1), True)
                container.seek(int(start_s / stream.time_base), stream=stream, backward=True)
                _decode(container, frames, False)
        if len(frames) < frames.maxlen:  # a short clip, its start, or a seek that landed too late (odd timestamps)
            frames.clear()
            with av.open(str(path)) as container:
                first = _decode(container, frames, not at_end)
    except _av_errors():
        raise ClipError(f"{what}: is corrupt (a frame does not decode)") from None
    if first is None:
        raise ClipError(f"{what}: has no frames")
    usable = 4 * ((len(frames) - 1) // 4) + 1  # a causal VAE encodes 4k+1 frames into k+1 latents
    context = list(frames)[-usable:] if at_end else list(frames)[:usable]
    return first, np.stack(context)


@torch.no_grad()
def encode_clip(c: "Components", frames: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (1, 16, (F-1)/4 + 1, h, w) float32 VAE-scaled latents, the
    posterior mean, through the VAE's own tiles (a clip is a video, not the reference's one image)."""
    pixels = torch.from_numpy(frames).permute(3, 0, 1, 2).unsqueeze(0).float() / 255.0 * 2.0 - 1.0
    latents = c.vae.encode(pixels.to(device=c.device, dtype=c.vae.dtype)).latent_dist.mode()
    return (latents * c.vae.config.scaling_factor).to(torch.float32)


@dataclass(frozen=True)
class EncodedClip:
    """What encoding an extension takes from its clip."""

    request: RenderRequest  # adapted to the clip's size and fps
    start: "Image.Image"  # the start image: --image, or forward the clip's first frame
    end: "Image.Image | None"  # backward, the clip's first frame: its SigLIP embedding joins the start's
    latents: torch.Tensor  # the clip's context latent frames (Conditioning.clip)
    sha256: str


def encode_clip_inputs(c: "Components", request: RenderRequest, images: tuple[bytes | None, ...]) -> EncodedClip:
    """The clip's part of `encode_request` for a request that extends one: read once, streamed."""
    from PIL import Image

    from .encode import decode_image

    what = f"extend: {excerpt(request.extend, 120)}"
    with local_clip(request.extend) as path:
        request = adapted(request, probe(path, what))
        clip_sha = file_sha256(path)
        first, frames = read_context(path, what, forward(request), context_frames(request.window))
    clip_first = Image.fromarray(first)
    if forward(request):
        # The start image (prefix and SigLIP input) is the clip's first frame unless an image is
        # given: F1 reads the video's first frame as its prefix for the whole video (the demo never
        # swaps it), so a clip fp-ray rendered forward continues with the conditioning it had.
        start = decode_image(images[0], "image", request.image_path) if request.image else clip_first
        end = None
    else:
        # Backward, the clip's first frame is the end image: its SigLIP embedding is averaged with
        # the start's as an end image's is; its latent leads the future as the clip's frame 0.
        start, end = decode_image(images[0], "image", request.image_path), clip_first
    return EncodedClip(request, start, end, encode_clip(c, frames), clip_sha)


# ---- the seam and the output -------------------------------------------------------------


def seam_context(plan: "Plan", section: "Section", cond: "Conditioning") -> torch.Tensor | None:
    """Forward extension, the chunk at the clip: the clip's last latent frames (a window at
    most) it decodes after, in place of the start latent. None for every other chunk."""
    if cond.clip is None or plan.schedule != "forward" or section.decode_span[0] != 0:
        return None
    return cond.clip[:, :, -plan.window:]


def without_clip_frames(plan: "Plan", section: "Section", cond: "Conditioning", chunk: torch.Tensor) -> torch.Tensor:
    """A decoded chunk (1, 3, F, H, W) without the frames that stand for the clip's latents
    (`seam_context`): 4(T-1)+1 for T latent frames of context."""
    context = seam_context(plan, section, cond)
    return chunk if context is None else chunk[:, :, 4 * (context.shape[2] - 1) + 1 :]


def new_segment_frames(plan: "Plan", cond: "Conditioning") -> list[int]:
    """Each segment's frames (decode.segment_frames), less the start frame a forward
    extension's first chunk does not have (`without_clip_frames`: the clip's last frame is it)."""
    from .decode import segment_frames

    frames = segment_frames(plan)
    first = min(plan.sections, key=lambda s: s.decode_span[0])
    if seam_context(plan, first, cond) is not None:
        frames[first.position] -= 1
    return frames


def _stream_matches(path: Path, segment: bytes, fps: int) -> bool:
    """Whether the clip's packets decode with the segment's stream parameters (codec, size,
    parameter sets) at exactly `fps`: then they can be copied."""
    import io

    import av

    info = probe(path, "extend")
    with av.open(io.BytesIO(segment)) as container:
        ctx = container.streams.video[0].codec_context
        ours = (ctx.name, ctx.width, ctx.height, bytes(ctx.extradata or b""))
    return (info.codec, info.width, info.height, info.extradata or b"") == ours and info.exact_rate == fps


def _keep(download: Path, target: Path) -> None:
    """The downloaded clip at `target` too, without a copy where the file system allows: a
    link outlives the download's own folder (removed as the read ends, or with its
    `downloads_held` scope)."""
    try:
        os.link(download, target)
    except OSError:
        shutil.copyfile(download, target)


def clip_frames(path: Path, check: Callable[[], None] = lambda: None) -> Iterator[np.ndarray]:
    """The clip's frames; `check` runs before each and raises to end the read (a stopped render)."""
    import av

    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            check()
            yield frame.to_ndarray(format="rgb24")


class ClipJoin:
    """The clip as the output joins it: the new segments with the clip before them (forward)
    or after them (inverted), as a local mp4 whose packets join with theirs. The clip is
    prepared once per render (checked against its hash, downloaded, re-encoded where its
    packets cannot be copied), and the progressive output and the final mp4 share it. `sha256`:
    the clip's as it was encoded; one that changed since is a ClipError, not a video of two clips.
    `check`: raises once the render is stopped, so a re-encode (an hour of frames, at most) ends
    at its next frame rather than after the whole clip."""

    def __init__(self, request: RenderRequest, sha256: str | None = None, check: Callable[[], None] = lambda: None):
        self.request, self.sha256, self._check = request, sha256, check
        self._folder = contextlib.ExitStack()  # the prepared clip's temporary folder, until close()
        self._path: str | None = None

    def parts(self, segments: Iterable[bytes], *, start: bool = True, end: bool = True) -> Iterator[bytes | str]:
        """The parts in time order. `start` / `end`: whether these segments begin / end the new
        part (a progressive output gets them one at a time); the clip goes only where it touches them."""
        segments = iter(segments)
        clip_first = forward(self.request) and start
        if self.request.extend is None or not (clip_first or (not forward(self.request) and end)):
            yield from segments
            return
        first = next(segments)
        clip = self._prepared(first)
        if clip_first:
            yield clip
        yield first
        yield from segments
        if not clip_first:
            yield clip

    def _prepared(self, segment: bytes) -> str:
        if self._path is not None:
            return self._path
        from .video import encode_frames

        what = f"extend: {excerpt(self.request.extend, 120)}"
        target = self._folder.enter_context(temporary_folder("clip")) / "clip.mp4"
        with local_clip(self.request.extend) as path:
            if self.sha256 is not None and (now := file_sha256(path)) != self.sha256:
                raise ClipError(f"{what} changed while it rendered (sha256 {now[:16]}..., encoded {self.sha256[:16]}...); "
                                "render it again")
            if not _stream_matches(path, segment, self.request.fps):
                try:
                    encode_frames(clip_frames(path, self._check), str(target), self.request.fps, self.request.crf)
                except _av_errors():
                    raise ClipError(f"{what}: is corrupt (a frame does not decode)") from None
            elif is_uri(self.request.extend):
                _keep(path, target)  # a download: kept for the parts still to come
            else:
                target = path  # a local file: joined where it is
        self._path = str(target)
        return self._path

    def close(self) -> None:
        self._folder.close()
