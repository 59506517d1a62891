"""The three kinds of work a render is made of, each holding the model parts it needs.

Ray actors, Ray Data stages and Serve replicas wrap these classes and add no model logic;
`fp-ray render` runs them in one process.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import AsyncIterator, Iterator, Mapping

import torch

from .decode import decode_chunk, decode_input
from .encode import Conditioning, Encoded, encode_request
from .generate import noise_stream, section_steps
from .devices import memory_figures
from .models import Components, ModelSpec
from .request import RenderRequest
from .sampling import NoiseStream
from .schedule import Plan
from .speed import SpeedOptions, apply_speed, decode_stream
from .storage import SectionStore


class Cancelled(RuntimeError):
    """The render was cancelled; the section stopped between two steps."""


_END = object()


async def iterate_in_thread(items: Iterator) -> AsyncIterator:
    """Consume a blocking iterator one item at a time in a worker thread. If the consumer is
    cancelled, the item in flight (one sampler step) finishes in its thread and the
    iterator is never resumed: the work stops there."""
    while (item := await asyncio.to_thread(next, items, _END)) is not _END:
        yield item


class SectionOutOfMemory(RuntimeError):
    """A section ran out of GPU memory; the message names the section, the memory mode and
    the device's memory figures."""


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class SectionJob:
    """One section to generate. `context` holds the latents of the sections it depends on."""

    request_id: str
    fingerprint: str
    request: RenderRequest
    plan: Plan
    position: int
    cond: Conditioning
    context: Mapping[int, torch.Tensor]
    store: str | None = None  # SectionStore root: the finished section is saved there first


class EncoderWorker:
    """Text encoders, SigLIP and the VAE encoder: request -> Encoded."""

    def __init__(self, spec: ModelSpec | None = None, components: Components | None = None):
        self.components = components or spec.load(("vae", "encoders"))

    def encode(self, request: RenderRequest, images: tuple[bytes, bytes | None] | None = None) -> Encoded:
        self.components.spec.check(request.schedule)
        try:
            return encode_request(self.components, request, images)
        finally:
            self.components.release_encoders()


class GeneratorWorker:
    """The transformer, resident: generates sections of any request, one at a time."""

    NOISE_STREAMS = 8  # requests whose noise streams are kept warm

    def __init__(self, spec: ModelSpec | None = None, components: Components | None = None, speed: SpeedOptions | dict | None = None):
        self.components = components or spec.load(("transformer",))
        if speed is not None:  # None: the components run as they were prepared
            apply_speed(self.components.transformer, SpeedOptions.from_config(speed))
        self._noise: OrderedDict[str, NoiseStream] = OrderedDict()
        self._cancelled: set[str] = set()
        self.name = worker_name()

    def cancel(self, request_id: str) -> None:
        """Stop `request_id`'s section at its next step (called from another thread)."""
        self._cancelled.add(request_id)

    def _noise_stream(self, job: SectionJob) -> NoiseStream:
        # Sections of one request asked in order continue the stream instead of replaying it.
        stream = self._noise.pop(job.fingerprint, None) or noise_stream(job.plan, job.cond, job.request.seed)
        self._noise[job.fingerprint] = stream
        while len(self._noise) > self.NOISE_STREAMS:
            self._noise.popitem(last=False)
        return stream

    def generate(self, job: SectionJob) -> Iterator[dict]:
        """Yield {"type": "step"} events, then {"type": "latents", "latents": (1, 16, W, h, w)}.
        With `job.store` the section is checkpointed before it is reported finished."""
        self._cancelled.discard(job.request_id)
        self.components.spec.check(job.request.schedule)  # the weights this worker holds
        t0 = time.perf_counter()
        section = job.plan.section(job.position)
        r = job.request
        yield {"type": "started", "position": job.position, "worker": self.name}
        steps = section_steps(
            self.components, job.plan, section, job.cond, job.context, self._noise_stream(job),
            sampler=r.sampler, steps=r.steps, guidance=r.guidance, cache_threshold=r.cache_threshold,
        )
        try:
            for step, total, latents in steps:
                if job.request_id in self._cancelled:
                    steps.close()
                    raise Cancelled(f"render {job.request_id} cancelled at section {job.position}, step {step}")
                yield {"type": "step", "position": job.position, "step": step, "steps": total, "worker": self.name}
        except torch.OutOfMemoryError as e:
            policy = self.components.policy
            raise SectionOutOfMemory(
                f"section {job.position} ran out of GPU memory on {self.name} in memory mode {policy.memory} "
                f"({job.plan.latent_width * 8}x{job.plan.latent_height * 8}, window {job.plan.window}): "
                f"{memory_figures(policy.device)}; try --memory offload or a smaller size") from e
        if job.store is not None:
            SectionStore(job.store).save(job.request_id, job.fingerprint, job.position, latents)
        yield {"type": "latents", "position": job.position, "latents": latents, "worker": self.name,
               "seconds": time.perf_counter() - t0, "steps": total}


class DecoderWorker:
    """The tiled VAE decoder: a section's latent span -> its pixel chunk."""

    def __init__(self, spec: ModelSpec | None = None, components: Components | None = None):
        self.components = components or spec.load(("vae",))
        self.name = worker_name()

    def decode(self, plan: Plan, position: int, cond: Conditioning, latents: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """(1, 3, F, H, W) in [-1, 1], VAE dtype, on the CPU."""
        section = plan.section(position)
        with decode_stream(self.components.device):  # overlaps the generator's kernels on a shared GPU
            return decode_chunk(self.components.vae, decode_input(plan, section, cond, latents))
