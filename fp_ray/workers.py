"""The three kinds of work a render is made of, each holding the model parts it needs, and
the jobs that ask for them.

Ray actors, Ray Data stages and Serve replicas wrap these classes and add no model logic;
`fp-ray render` runs them in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import AsyncIterator, Iterator, Mapping

import torch

from .decode import decode_chunk, decode_input, next_chunk, previous_chunk, segment_pixels, split_chunk, to_frames
from .encode import Conditioning, Encoded, Images, encode_request
from .extend import without_clip_frames
from .generate import noise_stream, section_steps
from .devices import memory_figures
from .lora import LoraFile, LoraRegistry
from .models import Components, ModelSpec
from .request import RenderRequest
from .schedule import Plan
from .speed import SpeedOptions, apply_speed, decode_stream
from .storage import SectionStore, delete


class Cancelled(RuntimeError):
    """The render was cancelled; the section stopped between two steps."""


_END = object()


async def iterate_in_thread(items: Iterator) -> AsyncIterator:
    """Consume a blocking iterator one item at a time in a worker thread. If the consumer is
    cancelled, the item in flight (one sampler step) finishes in its thread and the
    iterator is never resumed: the work stops there."""
    while (item := await asyncio.to_thread(next, items, _END)) is not _END:
        yield item


class WorkerStartError(RuntimeError):
    """A worker failed while loading its model (a Ray actor's constructor raised): that error, in one line."""


class SectionOutOfMemory(RuntimeError):
    """A section ran out of GPU memory; the message names the section, the memory mode and
    the device's memory figures."""


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class RenderContext:
    """What every task of one render shares. It goes to each worker once per render (the
    coordinator shares it, e.g. as one Ray object ref); tasks carry only a `Shared` handle."""

    request_id: str
    fingerprint: str
    request: RenderRequest
    plan: Plan
    cond: Conditioning
    noise_states: tuple[torch.Tensor, ...]  # generator state before each section's draw, by order
    store: str  # SectionStore root: section latents, segments, seam pixels
    loras: tuple[LoraFile, ...] = ()  # the request's LoRAs, resolved by the encoder
    metadata: str = ""  # the render record (JSON) the mp4 and its sidecar carry (metadata.py)
    clip_sha256: str | None = None  # an extension's clip, as encoded: the mp4 gets the very same clip

    @property
    def key(self) -> str:
        # the store too: the same request rendered again into another (temporary) store is
        # another context, never a cached one pointing at a folder that is gone
        return f"{self.request_id}/{self.fingerprint}/{self.store}"


@dataclass(frozen=True)
class Shared:
    """A handle on a RenderContext: the context itself (one process) or a Ray ObjectRef."""

    key: str
    ref: object


def resolve(ref: object) -> RenderContext:
    if isinstance(ref, RenderContext):
        return ref
    import ray  # only a Ray pool hands out object refs

    return ray.get(ref)


class ContextCache:
    """The contexts of a worker's recent renders, each fetched once."""

    SIZE = 8

    def __init__(self):
        self._contexts: OrderedDict[str, RenderContext] = OrderedDict()

    def get(self, shared: Shared) -> RenderContext:
        context = self._contexts.pop(shared.key, None) or resolve(shared.ref)
        self._contexts[shared.key] = context
        while len(self._contexts) > self.SIZE:
            self._contexts.popitem(last=False)
        return context


@dataclass(frozen=True)
class SectionJob:
    """One section to generate. `context` holds the latents of the sections it depends on."""

    shared: Shared
    position: int
    context: Mapping[int, torch.Tensor]


class SegmentAction(str, Enum):
    MAKE = "make"  # encode the segment now (its other half is in the store, or not needed)
    KEEP = "keep"  # save this half to the store for whichever task decodes the neighbour
    SKIP = "skip"  # the segment exists already (a resumed render)


@dataclass(frozen=True)
class SegmentJob:
    """Decode chunk `position` (latents: the sections its span covers) and deal with its two
    halves: the lead ends segment `position`, the tail starts the next segment (`decode.next_chunk`).
    latents None: a join, both halves of segment `position` wait in the store."""

    shared: Shared
    position: int
    latents: Mapping[int, torch.Tensor] | None
    left: SegmentAction = SegmentAction.MAKE
    right: SegmentAction = SegmentAction.SKIP


class EncoderWorker:
    """Text encoders, SigLIP and the VAE encoder: request -> Encoded. `loras`: where the
    request's LoRAs are found (default: paths and hub ids; Serve: its registry)."""

    def __init__(self, spec: ModelSpec | None = None, components: Components | None = None,
                 loras: LoraRegistry | None = None):
        self.components = components or spec.load(("vae", "encoders"))
        self.loras = loras or LoraRegistry()
        # Outside the resident mode an encode brings the encoders in and sends them back after:
        # two encodes at once (a Serve replica takes several) would move the weights from
        # under each other, so they take turns there.
        resident = self.components.policy.memory == "resident"
        self._turns = contextlib.nullcontext() if resident else threading.Lock()

    def encode(self, request: RenderRequest, images: Images | None = None) -> Encoded:
        self.components.spec.check(request.schedule)
        loras = self.loras.resolve(request.loras)
        with self._turns:
            try:
                return encode_request(self.components, request, images, loras)
            finally:
                self.components.release_encoders()


class GeneratorWorker:
    """The transformer, resident: generates sections of any request, one at a time."""

    def __init__(self, spec: ModelSpec | None = None, components: Components | None = None, speed: SpeedOptions | dict | None = None):
        self.components = components or spec.load(("transformer",))
        if speed is not None:  # None: the components run as they were prepared
            apply_speed(self.components.transformer, SpeedOptions.from_config(speed), self.components.device)
        self.contexts = ContextCache()
        self._cancelled: set[str] = set()
        self.name = worker_name()

    def cancel(self, request_id: str) -> None:
        """Stop `request_id`'s section at its next step (called from another thread)."""
        self._cancelled.add(request_id)

    def generate(self, job: SectionJob) -> Iterator[dict]:
        """Yield {"type": "step"} events, then {"type": "latents", "latents": (1, 16, W, h, w)}.
        The section is checkpointed in the render's store before it is reported finished."""
        ctx = self.contexts.get(job.shared)
        self._cancelled.discard(ctx.request_id)
        self.components.spec.check(ctx.request.schedule)  # the weights this worker holds
        t0 = time.perf_counter()
        section = ctx.plan.section(job.position)
        r = ctx.request
        yield {"type": "started", "position": job.position, "worker": self.name}
        noise = noise_stream(ctx.plan, ctx.cond, r.seed).draw_at(ctx.noise_states[section.order])
        steps = section_steps(
            self.components, ctx.plan, section, ctx.cond, job.context, noise,
            sampler=r.sampler, steps=r.steps, guidance=r.guidance, cache_threshold=r.cache_threshold, cache_method=r.cache_method,
            cfg=r.cfg, cfg_rescale=r.cfg_rescale, loras=ctx.loras,
        )
        try:
            for step, total, latents in steps:
                if ctx.request_id in self._cancelled:
                    steps.close()
                    raise Cancelled(f"render {ctx.request_id} cancelled at section {job.position}, step {step}")
                yield {"type": "step", "position": job.position, "step": step, "steps": total, "worker": self.name}
        except torch.OutOfMemoryError as e:
            policy = self.components.policy
            raise SectionOutOfMemory(
                f"section {job.position} ran out of GPU memory on {self.name} in memory mode {policy.memory} "
                f"({ctx.plan.latent_width * 8}x{ctx.plan.latent_height * 8}, window {ctx.plan.window}): "
                f"{memory_figures(policy.device)}; try --memory offload or a smaller size") from e
        SectionStore(ctx.store).save(ctx.request_id, ctx.fingerprint, job.position, latents)
        yield {"type": "latents", "position": job.position, "latents": latents, "worker": self.name,
               "seconds": time.perf_counter() - t0, "steps": total}


class DecoderWorker:
    """The tiled VAE decoder: decodes a section's chunk, crossfades its seams and encodes the
    segments it completes (H.264) into the render's store. No pixels leave the worker except
    a seam's half, through the store, when its neighbour is not decoded yet."""

    def __init__(self, spec: ModelSpec | None = None, components: Components | None = None):
        self.components = components or spec.load(("vae",))
        self.contexts = ContextCache()
        self.name = worker_name()

    def segment(self, job: SegmentJob) -> list[int]:
        """The segments this job finished (written to the store)."""
        ctx = self.contexts.get(job.shared)
        store, k, ids = SectionStore(ctx.store), job.position, (ctx.request_id, ctx.fingerprint)
        if job.latents is None:
            lead, tail = store.load(*ids, k, "lead"), None
        else:
            with decode_stream(self.components.device):  # overlaps the generator's kernels on a shared GPU
                section = ctx.plan.section(k)
                latents = decode_input(ctx.plan, section, ctx.cond, job.latents)
                chunk = without_clip_frames(ctx.plan, section, ctx.cond, decode_chunk(self.components.vae, latents, self.components.device))
            lead, tail = split_chunk(ctx.plan, k, chunk)
        made = []
        previous, following = previous_chunk(ctx.plan, k), next_chunk(ctx.plan, k)
        if job.left == SegmentAction.MAKE:
            # a one-chunk loop crossfades its own tail into its head
            previous_tail = tail if previous == k else None if previous is None else store.load(*ids, previous, "tail")
            made.append(self._make(ctx, store, k, lead, previous_tail))
        elif job.left == SegmentAction.KEEP:
            store.save(*ids, k, lead, "lead")
        if tail is not None and job.right == SegmentAction.MAKE:
            made.append(self._make(ctx, store, following, store.load(*ids, following, "lead"), tail))
        elif tail is not None and job.right == SegmentAction.KEEP:
            store.save(*ids, k, tail, "tail")
        return made

    @staticmethod
    def _make(ctx: RenderContext, store: SectionStore, k: int, lead: torch.Tensor, previous_tail: torch.Tensor | None) -> int:
        previous = previous_chunk(ctx.plan, k)
        ids = (ctx.request_id, ctx.fingerprint)
        if lead is None or (previous is not None and previous_tail is None):
            if store.has(*ids, k, "segment"):
                return k  # another run of the same render (same store and id, at the same time) made it and took the halves
            raise FileNotFoundError(f"segment {k} of render {ctx.request_id}: a seam half is missing from {ctx.store}")
        from .video import encode_segment  # PyAV: only where segments are encoded, not on every generator box

        frames = to_frames(segment_pixels(ctx.plan, lead, previous_tail))
        store.save_segment(*ids, k, encode_segment(frames, ctx.request.fps, ctx.request.crf))
        delete(store.location(*ids, k, "lead"))
        if previous is not None:
            delete(store.location(*ids, previous, "tail"))
        return k
