"""Schedules: the order sections are generated in and the clean context each one reads.

A plan is a DAG of sections. Positions count sections in video time (0 = right after the
start image); the full latent video is [start image latent, section 0, ..., section N-1].

- forward (vanilla / F1): time order; context = start image + the nearest past.
- inverted (FramePackI2V_HY's own order): last section first, back to the start;
  context = start image as prefix, a padding gap, the nearest future.
- bidirectional: wave 0 generates the end section (the start endpoint is the image
  itself); every later wave fills the midpoints of the remaining gaps. A fill reads its
  left neighbour's last latent frame as prefix and its right neighbour (plus whatever is
  contiguous after it) as 1x/2x/4x history, on the inverted checkpoint's layout: padding
  encodes the gap to the left anchor, `gap` the gap to the right one (both capped at 3
  windows, as the reference caps padding). Fills of one wave are independent.

  Keyframes (images at section boundaries) cut the video into spans, each planned as above
  between its two anchors (multiple-endpoint planning): wave 0 generates every span's last
  section at once, reading the keyframe after it as the end image is read; the section that
  starts at a keyframe (and any fill with no section to its left) reads the keyframe's
  latent as prefix, as the first section reads the start image's.

A loop (inverted or bidirectional) is a cycle: the end image is the start image, so after
section N-1 the video goes on with the start latent and section 0 again. The last chunk decodes
across that wrap, and its tail crossfades into the first chunk (decode.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .packing import HISTORY_FRAMES, ContextLayout, ContextTokens, context_tokens

ScheduleName = Literal["forward", "inverted", "bidirectional"]
SCHEDULES: tuple[str, ...] = ("forward", "inverted", "bidirectional")
MAX_GAP_WINDOWS = 3  # the reference never pads more than 3 windows


@dataclass(frozen=True)
class Section:
    """One window at a fixed place in the video and the clean context it reads."""

    position: int  # place in video time, 0..N-1
    order: int  # generation order; also the index into the request's noise stream
    wave: int  # sections of one wave depend only on earlier waves
    layout: ContextLayout
    prefix: int | None  # section whose last latent frame is the prefix; None = the left anchor
    history: tuple[int, ...]  # sections read as 1x/2x/4x history, in time order
    history_starts_with_end: bool  # the right anchor's latent leads the history (inverted/bidirectional)
    prompt: str
    decode_span: tuple[int, int]  # [start, stop) in full-video latent frames, decoded as one chunk
    decode_needs: tuple[int, ...]  # sections whose latents the decode span covers
    # The images around the section's span: (left, right) keyframe indices (in the request's
    # order); None = the start image on the left, the end image (if any) on the right.
    anchors: tuple[int | None, int | None] = (None, None)

    @property
    def depends_on(self) -> tuple[int, ...]:
        deps = set(self.history)
        if self.prefix is not None:
            deps.add(self.prefix)
        return tuple(sorted(deps))


@dataclass(frozen=True)
class Plan:
    """A schedule applied to one request."""

    schedule: ScheduleName
    window: int
    latent_height: int
    latent_width: int
    sections: tuple[Section, ...] = field(repr=False)  # in generation order
    loop: bool = False  # the video is a cycle: section N-1 is followed by the start latent again

    @property
    def num_sections(self) -> int:
        return len(self.sections)

    @property
    def latent_frames(self) -> int:
        return 1 + self.num_sections * self.window

    @property
    def pixel_frames(self) -> int:
        # A loop's start latent sits mid-sequence (after section N-1), where a latent frame
        # is 4 pixel frames, not the causal VAE's single first frame.
        return 4 * self.latent_frames if self.loop else (self.latent_frames - 1) * 4 + 1

    @property
    def overlap_frames(self) -> int:
        """Pixel frames shared by neighbouring decode chunks (the reference soft-append)."""
        return (self.window - 1) * 4 + 1

    def by_position(self) -> list[Section]:
        return sorted(self.sections, key=lambda s: s.position)

    def section(self, position: int) -> Section:
        return next(s for s in self.sections if s.position == position)

    def waves(self) -> list[list[Section]]:
        out: dict[int, list[Section]] = {}
        for s in self.sections:
            out.setdefault(s.wave, []).append(s)
        return [out[w] for w in sorted(out)]

    def tokens(self) -> ContextTokens:
        return context_tokens(self.window, self.latent_height, self.latent_width)


def inverted_paddings(num_sections: int) -> list[int]:
    """Reference padding rule, in generation order (windows of gap after the prefix)."""
    if num_sections > 4:
        return [3] + [2] * (num_sections - 3) + [1, 0]
    return list(reversed(range(num_sections)))


def section_prompt(prompts: list[tuple[float, str]], start_seconds: float) -> str:
    """The prompt in force at a section's start: the last one whose timestamp <= start."""
    chosen = prompts[0][1]
    for at, text in prompts:
        if at <= start_seconds + 1e-9:
            chosen = text
    return chosen


def _sections_in_history(window: int) -> int:
    """Sections it takes to fill the 19-frame history; more are never read."""
    return -(-HISTORY_FRAMES // window)


def _future_run(position: int, num_sections: int, done: set[int], window: int) -> tuple[int, ...]:
    """Sections from `position` on that are already generated and contiguous."""
    run: list[int] = []
    p = position
    while p < num_sections and p in done and len(run) < _sections_in_history(window):
        run.append(p)
        p += 1
    return tuple(run)


def _decode_span(schedule: str, position: int, num_sections: int, window: int,
                 loop: bool = False) -> tuple[tuple[int, int], tuple[int, ...]]:
    """Latent frames each section decodes, exactly as the reference soft-append consumes them.

    forward decodes its own window plus the previous one (section 0: start image + own);
    inverted/bidirectional decode their own window plus the next one (section 0 also
    carries the start image; the last section decodes only its own window). In a loop the
    last section decodes its window plus the next `window` frames of the cycle (the start
    latent and section 0's first window-1 frames): frames past the video's end wrap.
    """
    own = 1 + position * window
    if loop:
        return (0 if position == 0 else own, own + 2 * window), tuple(dict.fromkeys((position, (position + 1) % num_sections)))
    if num_sections == 1:
        return (0, 1 + window), (0,)
    if schedule == "forward":
        if position == 0:
            return (0, 1 + window), (0,)
        return (own - window, own + window), (position - 1, position)
    if position == num_sections - 1:
        return (own, own + window), (position,)
    start = 0 if position == 0 else own
    return (start, own + 2 * window), (position, position + 1)


def make_plan(
    schedule: str,
    num_sections: int,
    window: int,
    latent_height: int,
    latent_width: int,
    prompts: list[tuple[float, str]],
    seconds_per_section: float,
    has_end_image: bool = False,
    keyframes: tuple[int, ...] = (),
    loop: bool = False,
) -> Plan:
    """Build the section DAG of a request. `prompts` are (start seconds, text), sorted;
    `keyframes`: the section boundary of each keyframe (bidirectional only), distinct, inside.
    `loop`: the end image is the start image, and the last chunk decodes across the wrap."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if num_sections < 1:
        raise ValueError(f"a plan needs at least one section, got {num_sections}")
    if has_end_image and schedule == "forward":
        raise ValueError("an end image needs the inverted or bidirectional schedule; forward has no future context")
    if loop and (schedule == "forward" or has_end_image):
        raise ValueError("a loop needs the inverted or bidirectional schedule and no end image of its own (its end is the start)")
    has_end_image = has_end_image or loop  # the start latent leads the last section's future

    if keyframes and schedule != "bidirectional":
        raise ValueError(f"keyframes need the bidirectional schedule, got {schedule}")
    if len(set(keyframes)) < len(keyframes) or not all(0 < b < num_sections for b in keyframes):
        raise ValueError(f"keyframe boundaries must be distinct and inside 1..{num_sections - 1}, got {list(keyframes)}")

    # (position, wave, layout, prefix, history, history_starts_with_end) in generation order
    steps: list[tuple[int, int, ContextLayout, int | None, tuple[int, ...], bool]] = []
    anchors: dict[int, tuple[int | None, int | None]] = {}
    if schedule == "forward":
        for p in range(num_sections):
            past = tuple(range(max(0, p - _sections_in_history(window)), p))
            steps.append((p, p, ContextLayout("forward", window), None, past, False))
    elif schedule == "inverted":
        for k, pad in enumerate(inverted_paddings(num_sections)):
            p = num_sections - 1 - k
            future = tuple(range(p + 1, min(num_sections, p + 1 + _sections_in_history(window))))
            layout = ContextLayout("inverted", window, padding=pad * window)
            steps.append((p, k, layout, None, future, has_end_image and k == 0))
    else:
        steps = _bidirectional(num_sections, window, has_end_image, keyframes, anchors)

    sections = []
    for order, (p, wave, layout, prefix, history, with_end) in enumerate(steps):
        span, needs = _decode_span(schedule, p, num_sections, window, loop)
        sections.append(
            Section(
                position=p,
                order=order,
                wave=wave,
                layout=layout,
                prefix=prefix,
                history=history,
                history_starts_with_end=with_end,
                prompt=section_prompt(prompts, p * seconds_per_section),
                decode_span=span,
                decode_needs=needs,
                anchors=anchors.get(p, (None, None)),
            )
        )
    return Plan(schedule, window, latent_height, latent_width, tuple(sections), loop)


def _bidirectional(num_sections: int, window: int, has_end_image: bool, keyframes: tuple[int, ...],
                   anchors: dict[int, tuple[int | None, int | None]]) -> list:
    """The bidirectional steps; fills `anchors` with each position's (left, right) keyframes."""
    cuts = sorted((b, i) for i, b in enumerate(keyframes))
    # spans [lo, hi) of sections between consecutive anchors, with the keyframes bounding them
    spans = list(zip([0] + [b for b, _ in cuts], [b for b, _ in cuts] + [num_sections],
                     [None] + [i for _, i in cuts], [i for _, i in cuts] + [None]))
    done: set[int] = set()
    steps: list = []
    gaps = []  # (left, right, lo, hi): sections strictly between left and right are to fill
    for lo, hi, left_kf, right_kf in spans:
        end = hi - 1
        pad = min(end - lo, MAX_GAP_WINDOWS) * window
        with_end = right_kf is not None or has_end_image
        steps.append((end, 0, ContextLayout("inverted", window, padding=pad), None, (), with_end))
        done.add(end)
        gaps.append((lo - 1, end, lo, hi))
        anchors.update({p: (left_kf, right_kf) for p in range(lo, hi)})
    wave = 1
    while gaps:
        next_gaps = []
        wave_steps = []
        for left, right, lo, hi in gaps:
            if right - left <= 1:
                continue
            m = (left + right + 1) // 2  # ceil: the fill nearest the right anchor comes first
            layout = ContextLayout(
                "inverted",
                window,
                padding=min(m - left - 1, MAX_GAP_WINDOWS) * window,
                gap=min(right - m - 1, MAX_GAP_WINDOWS) * window,
            )
            history = _future_run(right, hi, done, window)
            prefix = None if left < lo else left
            wave_steps.append((m, wave, layout, prefix, history, False))
            next_gaps += [(left, m, lo, hi), (m, right, lo, hi)]
        done.update(s[0] for s in wave_steps)
        steps += sorted(wave_steps)
        gaps = [g for g in next_gaps if g[1] - g[0] > 1]
        wave += 1
    return steps
