"""What a video records about how it was made, so that it can be made again: the whole
request, its images (content hash and, where known, path or URL), the fp-ray version and
the model (each component's source and a hash of its folder). It travels in the mp4's
`comment` tag and in a sidecar JSON next to the mp4 (`video.mp4.json`); `fp-ray render
--from` and the Serve page read it back. The images themselves are not embedded.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import SAMPLE_IMAGE, TINY_CHECKPOINT, __version__
from .models import ModelSources
from .request import RenderRequest, excerpt
from .storage import file_sha256, is_uri, read_bytes

FORMAT = "fp-ray/render/1"
# The mp4 muxer writes the standard tags (©cmt: ffprobe, players and tag editors show and keep
# it) and drops custom keys unless told otherwise; the comment carries the JSON.
TAG = "comment"
SIDECAR_SUFFIX = ".json"  # video.mp4 -> video.mp4.json: never clashes with a manifest or record named video.json
MAX_METADATA_BYTES = 1 << 20  # a sidecar or tag this large is not ours
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
WEIGHT_SAMPLE = 1 << 20  # bytes hashed at each end of a weight file


class MetadataError(ValueError):
    """A video or JSON file that carries no usable fp-ray render record; the message says why."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sidecar_location(video: str | os.PathLike) -> str:
    return f"{video}{SIDECAR_SUFFIX}"


@functools.lru_cache(maxsize=16)
def folder_digest(folder: str) -> str:
    """sha256 of a checkpoint folder as cheaply as it identifies it: every config, index and
    tokenizer file (*.json, *.txt, *.model) whole, and each weight file's size with its first
    and last MiB (13B of weights are not read for a tag). Hidden folders (caches) are skipped."""
    root = Path(folder)
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if name.endswith(WEIGHT_SUFFIXES):
                size = path.stat().st_size
                with path.open("rb") as f:
                    head = f.read(WEIGHT_SAMPLE)
                    f.seek(max(0, size - WEIGHT_SAMPLE))
                    tail = f.read(WEIGHT_SAMPLE)
                h.update(f"{rel}\0{size}\0".encode() + hashlib.sha256(head + tail).digest())
            elif name.endswith((".json", ".txt", ".model")):
                h.update(f"{rel}\0".encode() + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _component(source: str) -> dict:
    """{"source": folder or hub id (None: the checkpoint fp-ray ships), "sha256": the folder's
    digest (None: a hub id, not on this machine)}."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return {"source": source, "sha256": None}
    path = path.resolve()
    return {"source": None if path == TINY_CHECKPOINT else str(path), "sha256": folder_digest(str(path))}


def model_identity(model: str, base: str | None = None, image_encoder: str | None = None) -> dict:
    """Where each component of a render's model came from, and a digest of each local folder
    (the tiny layout holds all three in one)."""
    sources = ModelSources.resolve(model, base, image_encoder)
    return {"transformer": _component(sources.transformer[0]), "base": _component(sources.base),
            "image_encoder": _component(sources.image_encoder)}


@dataclass(frozen=True)
class Provenance:
    """What the encoder saw besides the request: the images' hashes and the model it loaded."""

    image_sha256: str
    end_image_sha256: str | None
    model: dict
    keyframe_sha256: tuple[str, ...] = ()  # in the request's order
    lora_sha256: tuple[str, ...] = ()  # the LoRA files', in the request's order
    extend_sha256: str | None = None  # the clip a video extends (extend.py)


def portable_source(location: str | None) -> str | None:
    """A local path made absolute (a re-render may run from another folder); URIs as given."""
    if location is None or is_uri(location):
        return location
    return str(Path(location).expanduser().resolve())


def render_metadata(request: RenderRequest, provenance: Provenance, sources: tuple[str | None, ...] | None = None) -> dict:
    """The record a video carries. `sources`: where the images came from (start, end, then
    keyframes), as a user could give them again (None: the request's own paths; (None, None)
    for uploads, known by hash only). The shipped tiny checkpoint and the sample image are recorded as None, as the
    request's own defaults: a record made on one install re-renders on another."""
    fields = request.model_dump(mode="json")
    image, end_image = sources[:2] if sources is not None else (request.image, request.end_image)
    fields["image"], fields["end_image"] = portable_source(image), portable_source(end_image) if request.end_image else None
    # keyframes: sources[2:] when given (missing ones, as uploads, by hash only)
    key_sources = [k.image for k in request.keyframes] if sources is None else list(sources[2:]) + [None] * len(request.keyframes)
    for k, source in zip(fields["keyframes"], key_sources):
        k["image"] = portable_source(source)
    if Path(request.model).expanduser().resolve() == TINY_CHECKPOINT:
        fields["model"] = None
    end = None if provenance.end_image_sha256 is None else {"sha256": provenance.end_image_sha256}
    images = {"image": {"sha256": provenance.image_sha256}, "end_image": end}
    if provenance.keyframe_sha256:
        images["keyframes"] = [{"sha256": h} for h in provenance.keyframe_sha256]
    if provenance.extend_sha256 is not None:
        # like an image: its hash, and its path where the caller gave one (Serve keeps an
        # upload or fetched clip in its own storage: known by hash only)
        images["extend"] = {"sha256": provenance.extend_sha256}
        fields["extend"] = portable_source(request.extend) if sources is None else None
    record = {"format": FORMAT, "fp_ray_version": __version__, "request": fields, "images": images, "model": provenance.model}
    if provenance.lora_sha256:
        record["loras"] = [{"name": c.name, "weight": c.weight, "sha256": h} for c, h in zip(request.loras, provenance.lora_sha256)]
    return record


def dumps(metadata: dict) -> str:
    """Canonical JSON (sorted keys): the same request writes the same bytes."""
    return json.dumps(metadata, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def parse_metadata(data: bytes, what: str = "the file") -> dict:
    """The render record in an mp4's bytes (its comment tag; the first MB of a video hold it)
    or in a sidecar JSON's, checked; MetadataError with a short reason otherwise."""
    text = data if data.lstrip()[:1] == b"{" else _mp4_comment(io.BytesIO(data), what)
    return _checked(text, what)


def read_metadata(location: str | os.PathLike, what: str | None = None) -> dict:
    """The render record of a video or sidecar at a path or URI. A local video is opened in
    place: only its header is read, however long the video."""
    what = what or excerpt(str(location), 120)
    try:
        if is_uri(location):
            return parse_metadata(read_bytes(location), what)
        path = Path(location).expanduser()
        if path.exists() and not (path.is_file() or path.is_dir()):  # a fifo would wait for a writer forever
            raise MetadataError(f"{what}: not a regular file")
        with path.open("rb") as f:
            head = f.read(1 << 16)
        if head.lstrip()[:1] != b"{":
            return _checked(_mp4_comment(str(path), what), what)
        if path.stat().st_size > MAX_METADATA_BYTES:
            raise MetadataError(f"{what}: {path.stat().st_size} bytes is too large for a render record")
        return _checked(path.read_bytes(), what)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise MetadataError(f"{what}: file not found") from None
    except OSError as e:
        raise MetadataError(f"{what}: cannot read it: {e.strerror or e}") from None


def _checked(text: str | bytes, what: str) -> dict:
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise MetadataError(f"{what} has no fp-ray render record (its JSON does not parse)") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise MetadataError(f"{what} has no fp-ray render record (expected format {FORMAT!r})")
    images = record.get("images")
    hashed = lambda image: isinstance(image, dict) and isinstance(image.get("sha256"), str)
    if not isinstance(record.get("request"), dict) or not isinstance(images, dict) or not hashed(images.get("image")) \
            or not (images.get("end_image") is None or hashed(images["end_image"])):
        raise MetadataError(f"{what}: the fp-ray render record is incomplete (request and image hashes are required)")
    return record


def _mp4_comment(source: str | io.BytesIO, what: str) -> str:
    import av  # PyAV only where a video is read

    try:
        with av.open(source) as container:
            comment = container.metadata.get(TAG)
    except (av.FFmpegError, ValueError, EOFError):
        raise MetadataError(f"{what} is neither an mp4 nor a JSON file") from None
    if not comment:
        raise MetadataError(f"{what} is not a video fp-ray made (no fp-ray render record in its metadata)")
    return comment


def recorded_image(record: dict, key: str, given: str | None, flag: str) -> str | None:
    """The image to re-render `record` with: `given` when the user names one; else the
    recorded path or URL if it still holds the same bytes; None for no image (or the sample
    image, for the start image). MetadataError, saying which flag to give, otherwise."""
    if given is not None:
        return given
    image = record["images"].get(key)
    if image is None:
        return None
    what = {"image": "start image", "end_image": "end image", "extend": "clip to extend"}[key]
    return _unchanged_source(image["sha256"], record["request"].get(key), key, what, flag)


def recorded_keyframes(record: dict, given: list[str] | None, flag: str = "--keyframe") -> list[dict] | None:
    """The keyframes to re-render `record` with: `given` (TIME:IMAGE texts) when the user names
    any; else the recorded ones, each image checked as recorded_image checks."""
    if given:
        return None
    recorded, hashes = record["request"].get("keyframes") or [], record["images"].get("keyframes") or []
    if len(recorded) != len(hashes) or not all(isinstance(k, dict) for k in [*recorded, *hashes]):
        raise MetadataError("the fp-ray render record is incomplete (its keyframes and their hashes differ)")
    return [{"at": k.get("at"), "image": _unchanged_source(h.get("sha256"), k.get("image"), "keyframe", f"keyframe at {k.get('at')}s", flag)}
            for k, h in zip(recorded, hashes)]


def _source_sha256(source: str) -> str:
    """sha256 of a file's bytes, a local one read in chunks (a clip to extend may be gigabytes)."""
    return sha256(read_bytes(source)) if is_uri(source) else file_sha256(Path(source).expanduser())


def _unchanged_source(want: str, source: str | None, key: str, what: str, flag: str) -> str | None:
    if source is None:
        if key == "image" and want == sha256(SAMPLE_IMAGE.read_bytes()):
            return None
        raise MetadataError(f"{flag}: the video does not say where its {what} is (sha256 {want[:16]}...); give it with {flag}")
    try:
        got = _source_sha256(source)
    except OSError:
        raise MetadataError(f"{flag}: the {what} {excerpt(source, 120)} is gone; give it with {flag}") from None
    if got != want:
        raise MetadataError(f"{flag}: the {what} {excerpt(source, 120)} has changed since the render "
                            f"(sha256 {got[:16]}..., recorded {want[:16]}...); give the original with {flag}")
    return source
