"""The one request type, validated once at the edge (CLI, HTTP, manifest row)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import SAMPLE_IMAGE, TINY_CHECKPOINT
from .buckets import nearest_bucket
from .schedule import SCHEDULES

MAX_SECONDS = 600.0
MIN_SIDE, MAX_SIDE = 32, 2048
PIXEL_FRAMES_PER_LATENT = 4
MAX_LORAS = 4
MAX_KEYFRAMES = 64


class RequestError(ValueError):
    """A request a user must fix; the message names the field and the offending value."""


def excerpt(value: object, limit: int = 80) -> str:
    """A value as it may appear in an error line: its repr, cut to `limit` characters, so a
    100 KB prompt or URL never floods a terminal or an HTTP response."""
    text = repr(str(value)) if isinstance(value, Path) else repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


_TIMESTAMP = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*s\s*:\s*(.*?)\s*$", re.S)


def parse_prompts(text: str) -> list[tuple[float, str]]:
    """'0s: a cat sits; 4s: the cat jumps' -> [(0.0, 'a cat sits'), (4.0, 'the cat jumps')].

    A prompt without timestamps is one prompt from 0 s. Timestamps must start at 0 and
    increase; parts are separated by ';' or new lines.
    """
    parts = [p for p in re.split(r"[;\n]", text) if p.strip()]
    matches = [_TIMESTAMP.match(p) for p in parts]
    if not any(matches):
        return [(0.0, text.strip())]
    if not all(matches):
        bad = next(p for p, m in zip(parts, matches) if not m)
        raise RequestError(f"prompt: every part needs a timestamp like '4s: ...' once one has; got {excerpt(bad.strip())}")
    prompts = [(float(m.group(1)), m.group(2)) for m in matches]
    times = [t for t, _ in prompts]
    if times[0] != 0.0 or any(b <= a for a, b in zip(times, times[1:])):
        raise RequestError(f"prompt: timestamps must start at 0s and increase, got {excerpt(times)}")
    if any(not p for _, p in prompts):
        raise RequestError("prompt: a timestamped part is empty")
    return prompts


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*([0-9]{1,6})\s*[xX]\s*([0-9]{1,6})\s*", text)
    if not m:
        raise RequestError(f"size: expected WIDTHxHEIGHT such as 640x480, got {excerpt(text)}")
    return int(m.group(1)), int(m.group(2))


def bucket_size(image_width: int, image_height: int, resolution: int) -> tuple[int, int]:
    """(width, height): the official demo's bucket nearest the image's aspect ratio, from its
    640 table scaled to `resolution`."""
    return nearest_bucket(image_width, image_height, resolution)


_LORA_WEIGHT = re.compile(r"^(.*):\s*([-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))\s*$", re.S)


# what a user means as a weight but is none: nan, inf, 1e999
_LORA_BAD_WEIGHT = re.compile(r"^.*:\s*[-+]?(?:nan|inf(?:inity)?|[0-9.]*e[-+]?[0-9]+)\s*$", re.S | re.I)


def parse_loras(text: str) -> list[dict]:
    """'style.safetensors:0.8, owner/repo' -> [{name, weight: 0.8}, {name, weight: 1.0}]: a
    LoRA's path, hub id or registered name, then optionally ':' and its weight."""
    items = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = _LORA_WEIGHT.match(part)
        if not m and _LORA_BAD_WEIGHT.match(part):
            raise RequestError(f"loras: a weight is a plain number such as 0.8, got {excerpt(part)}")
        items.append({"name": m.group(1).strip(), "weight": float(m.group(2))} if m else {"name": part})
    return items


class LoraChoice(BaseModel):
    """One LoRA of a request: where it is (a path or hub id; on a server, a registered name)
    and its weight (the scale of its low-rank update; 1 as trained, 0 none)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=500)
    weight: float = Field(default=1.0, ge=-4.0, le=4.0, allow_inf_nan=False)


_KEYFRAME = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*s?\s*:\s*(.+?)\s*$", re.S)


def parse_keyframes(text: str) -> list[dict]:
    """'4s:pose.png; 8s:https://host/jump.png' -> [{at: 4.0, image: 'pose.png'}, ...]: each part a
    time in seconds (the 's' is optional), ':', then an image path, URL or URI."""
    items = []
    for part in (p.strip() for p in re.split(r"[;\n]", text)):
        if not part:
            continue
        m = _KEYFRAME.match(part)
        if not m:
            raise RequestError(f"keyframes: expected TIME:IMAGE such as 4s:pose.png, got {excerpt(part)}")
        items.append({"at": float(m.group(1)), "image": m.group(2)})
    return items


class Keyframe(BaseModel):
    """An image the video passes through at a time: snapped to the nearest section boundary
    (`RenderRequest.keyframe_boundaries`), where it anchors the sections on both sides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at: float = Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False)  # seconds
    image: str = Field(min_length=1, max_length=2000)  # path, http(s) URL or pyarrow.fs URI


class RenderRequest(BaseModel):
    """An image-to-video render. Defaults follow the official FramePack demo."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, max_length=4000)
    image: str | None = None  # path; None renders the sample image the package ships
    end_image: str | None = None
    # A clip to extend (path, http(s) URL or pyarrow.fs URI; extend.py): the forward schedule
    # continues it, inverted leads into it. `seconds` is then the length of the new part.
    extend: str | None = None
    seconds: float = Field(default=5.0, gt=0, le=MAX_SECONDS, allow_inf_nan=False)
    schedule: Literal["forward", "inverted", "bidirectional"] = "inverted"
    sampler: Literal["unipc", "euler"] = "unipc"
    steps: int = Field(default=25, ge=1, le=100)
    guidance: float = Field(default=10.0, ge=1.0, le=32.0, allow_inf_nan=False)  # distilled guidance
    seed: int = Field(default=31337, ge=0, le=2**63 - 1)
    width: int | None = None
    height: int | None = None
    resolution: int | None = Field(default=None, ge=MIN_SIDE, le=MAX_SIDE)  # bucket side; None: the model's
    window: int = Field(default=9, ge=1, le=33)  # latent_window_size
    fps: int = Field(default=30, ge=1, le=120)
    crf: int = Field(default=16, ge=0, le=51)
    model: str = str(TINY_CHECKPOINT)
    # Fast mode's step cache (FirstBlockCache threshold); None: exact. Part of the request,
    # and so of its fingerprint, because it changes the video.
    cache_threshold: float | None = Field(default=None, gt=0, le=1)
    cache_method: Literal["first_block", "mag"] = "first_block"  # which step cache (speed.CACHE_METHODS)
    # Real classifier-free guidance, the official demo's cfg / n_prompt / rs (off there, as here):
    # above 1 every step runs the transformer twice, on the prompt and on the negative prompt.
    cfg: float = Field(default=1.0, ge=1.0, le=32.0, allow_inf_nan=False)
    negative_prompt: str = Field(default="", max_length=4000)
    cfg_rescale: float = Field(default=0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    # LoRAs applied to the transformer, in this order; "name:weight, ..." text is parsed.
    loras: tuple[LoraChoice, ...] = Field(default=(), max_length=MAX_LORAS)
    # Images the video passes through, at times snapped to section boundaries (bidirectional only).
    keyframes: tuple[Keyframe, ...] = Field(default=(), max_length=MAX_KEYFRAMES)
    # A video that plays seamlessly when repeated: the start image is also the end image and
    # the last frames crossfade into the first (docs/loop.md).
    loop: bool = False

    @field_validator("seconds", "steps", "guidance", "seed", "width", "height", "resolution", "window", "fps", "crf",
                     "cache_threshold", "cfg", "cfg_rescale", mode="before")
    @classmethod
    def _not_a_boolean(cls, v):
        """A number, never true or false (pydantic reads them as 1 and 0: a JSON "seed": true was seed 1)."""
        if isinstance(v, bool):
            raise ValueError(f"expected a number, got {str(v).lower()}")
        return v

    @field_validator("keyframes", "loras", mode="before")
    @classmethod
    def _texts(cls, v, info):
        """Text parts ("4s:a.png; 8s:b.png", "a:0.8, b") parsed, alone or as list items."""
        parse = parse_keyframes if info.field_name == "keyframes" else parse_loras
        if isinstance(v, str):
            return parse(v)
        if isinstance(v, (list, tuple)):
            return [item for x in v for item in (parse(x) if isinstance(x, str) else [x])]
        return v

    @field_validator("loras")
    @classmethod
    def _distinct_loras(cls, v: tuple[LoraChoice, ...]) -> tuple[LoraChoice, ...]:
        names = [c.name for c in v]
        if len(set(names)) < len(names):
            raise ValueError(f"each LoRA once, with one weight; {excerpt(names)} repeats one")
        return v

    @field_validator("width", "height")
    @classmethod
    def _side(cls, v: int | None, info) -> int | None:
        if v is None:
            return v
        if v % 16:
            raise ValueError(f"must be a multiple of 16, got {v}")
        if not MIN_SIDE <= v <= MAX_SIDE:
            raise ValueError(f"must be between {MIN_SIDE} and {MAX_SIDE}, got {v}")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        parse_prompts(v)
        return v

    @model_validator(mode="after")
    def _combination(self) -> "RenderRequest":
        if (self.width is None) != (self.height is None):
            raise ValueError("size: give both width and height, or neither")
        if self.seconds < self.seconds_per_section / 2:
            # The section count rounds seconds to whole sections; below half a section it
            # would round to none, and one section would silently be a much longer video.
            spp = self.seconds_per_section
            raise ValueError(
                f"seconds: {self.seconds:g} s is less than half a section (a section is {spp:g} s: "
                f"{self.window} latent frames at {self.fps} fps); ask for at least {spp / 2:g} s, a higher fps or a smaller window"
            )
        if self.cfg == 1.0 and (self.negative_prompt or self.cfg_rescale):
            # With cfg 1 there is no negative pass (the demo's default): a negative prompt or a
            # rescale would be silently ignored, so they are refused.
            given = "negative_prompt" if self.negative_prompt else "cfg_rescale"
            raise ValueError(f"{given}: needs cfg above 1 (real guidance, two passes per step); cfg is 1, which turns it off")
        if self.cache_method != "first_block" and self.cache_threshold is None:
            raise ValueError(f"cache_method: {self.cache_method} needs a cache_threshold (the step cache is off without one)")
        if self.end_image is not None and self.schedule == "forward":
            raise ValueError("end_image needs the inverted or bidirectional schedule; forward has no future context")
        if self.keyframes:
            self.keyframe_boundaries  # snaps and checks them
        if self.loop and self.end_image is not None:
            raise ValueError("loop: the end image is the start image; drop end_image")
        if self.loop and self.schedule == "forward":
            raise ValueError("loop: needs the inverted or bidirectional schedule (the last section reads the start image "
                             "as its future); forward has no future context")
        if self.extend is not None:
            if self.end_image is not None:
                raise ValueError("extend: give a clip to extend or an end_image, not both (extending backward, the clip's first frame is the end image)")
            if self.schedule == "bidirectional":
                raise ValueError("extend: the forward schedule continues a clip, inverted leads into it; bidirectional cannot extend one")
            if self.schedule == "inverted" and self.image is None:
                raise ValueError("extend: the inverted schedule extends the clip backward and needs an image to start from; "
                                 "give one, or use the forward schedule to continue the clip")
            if self.loop:
                raise ValueError("extend: a loop ends on its own start image, an extension on the clip; give one of loop and extend")
        return self

    @property
    def keyframe_boundaries(self) -> tuple[int, ...]:
        """The section boundary of each keyframe, in the request's order: boundary b is where
        section b starts (b * seconds_per_section), the nearest to the keyframe's time. A
        keyframe must land strictly inside the video (the start is the image, the end the
        end image), one per boundary."""
        if not self.keyframes:
            return ()
        spp, n = self.seconds_per_section, self.num_sections
        if self.schedule != "bidirectional":
            raise ValueError(f"keyframes need the bidirectional schedule (it plans them first, then fills between); got {self.schedule}")
        out = []
        for k in self.keyframes:
            b = math.floor(k.at / spp + 0.5 + 1e-9)  # half up (0.6 s in sections of 0.4 s is 1.4999...)
            if not 1 <= b <= n - 1:
                first, last = spp, (n - 1) * spp
                where = ("a one-section video has none" if n == 1 else f"the only boundary is {first:g}s" if n == 2
                         else f"the boundaries are {first:g}s to {last:g}s")
                ends = "the first frame is the image, the last the end_image" if self.end_image else "the first frame is the image"
                raise ValueError(f"keyframes: {k.at:g}s snaps to section boundary {b} ({b * spp:g}s), which is not inside the "
                                 f"video ({n} sections of {spp:g}s; {where}; {ends})")
            out.append(b)
        if len(set(out)) < len(out):
            seen: dict[int, float] = {}
            for k, b in zip(self.keyframes, out):
                if b in seen:
                    raise ValueError(f"keyframes: {seen[b]:g}s and {k.at:g}s both snap to section boundary {b} ({b * spp:g}s); one keyframe per boundary")
                seen[b] = k.at
        return tuple(out)

    @property
    def image_path(self) -> str:
        """A local path, http(s) URL or pyarrow.fs URI; the sample image when none is given."""
        return self.image or str(SAMPLE_IMAGE)

    @property
    def prompts(self) -> list[tuple[float, str]]:
        return parse_prompts(self.prompt)

    @property
    def seconds_per_section(self) -> float:
        return self.window * PIXEL_FRAMES_PER_LATENT / self.fps

    @property
    def num_sections(self) -> int:
        """As the official demo: round(seconds * fps / (window * 4)), at least one, in this
        order of operations: seconds / seconds_per_section rounds the other way where the demo
        lands on a half (5.4 s: 162 / 36 = 4.5 -> 4, but 5.4 / 1.2 = 4.500000000000001 -> 5)."""
        return max(1, round(self.seconds * self.fps / (self.window * PIXEL_FRAMES_PER_LATENT)))


def make_request(**fields) -> RenderRequest:
    """Build a request, turning pydantic's errors into one line a user can act on."""
    try:
        return RenderRequest(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        raise RequestError("; ".join(_error_line(err) for err in e.errors())) from None


def _error_line(err: dict) -> str:
    """'field: reason (got value)', the value cut short, the field named once."""
    where = ".".join(str(x) for x in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if not where:  # a check across fields names its own fields
        return msg
    msg = msg.removeprefix(f"{where}: ")
    value = err.get("input")
    shown = "" if isinstance(value, dict) or "got" in msg else f" (got {excerpt(value)})"
    return f"{where}: {msg}{shown}"


__all__ = ["Keyframe", "LoraChoice", "parse_keyframes", "RenderRequest", "parse_loras", "RequestError", "make_request", "parse_prompts", "parse_size", "bucket_size", "SCHEDULES"]
