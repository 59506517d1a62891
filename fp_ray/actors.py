"""Ray actors over the workers, and the pools the coordinator runs a render on.

Generators hold the transformer (one GPU each by default), decoders the tiled VAE
(fractional GPUs), encoders the text/image encoders. Actors restart after a crash
(`max_restarts`); the task that was running fails and the coordinator retries it.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import AsyncIterator

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from .coordinator import WorkerLost
from .encode import Encoded
from .request import RenderRequest
from .workers import DecoderWorker, EncoderWorker, GeneratorWorker, RenderContext, SectionJob, SegmentJob, Shared

LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


@dataclass(frozen=True)
class PoolConfig:
    """How many of each actor, and what each one asks the cluster for. GPUs None: one per
    generator and half per decoder when the cluster has GPUs, none on a CPU-only cluster."""

    generators: int = 1
    decoders: int = 1
    encoders: int = 1
    generator_gpus: float | None = None
    decoder_gpus: float | None = None
    encoder_gpus: float | None = 0
    cpus: float = 0.5  # per actor: GPU actors need little CPU, and 4 actors still fit on 2 cores
    resources: dict[str, dict[str, float]] = field(default_factory=dict)  # {"generator": {"H100": 1}}
    max_restarts: int = 3
    dtype: str | None = None  # transformer precision; None: bf16 on GPU, fp32 on CPU

    def gpus(self, kind: str) -> float:
        chosen = getattr(self, f"{kind}_gpus")
        if chosen is not None:
            return chosen
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        return {"generator": 1.0, "decoder": 0.5, "encoder": 0.0}[kind] if has_gpus else 0.0

    def options(self, kind: str) -> dict:
        return dict(
            num_gpus=self.gpus(kind),
            num_cpus=self.cpus,
            resources=self.resources.get(kind, {}),
            max_restarts=self.max_restarts,
            max_task_retries=0,  # the coordinator decides what to retry (and reuses checkpoints)
        )


@ray.remote
class EncoderActor(EncoderWorker):
    def ready(self) -> str:
        return "encoder"


@ray.remote(concurrency_groups={"control": 1})
class GeneratorActor(GeneratorWorker):
    @ray.method(concurrency_group="control")
    def ready(self) -> str:
        return self.name

    @ray.method(concurrency_group="control")
    def cancel(self, request_id: str) -> None:
        super().cancel(request_id)


@ray.remote
class DecoderActor(DecoderWorker):
    def ready(self) -> str:
        return self.name


class ActorQueue:
    """Hands out idle actors of one kind; a render waits when all are busy. An actor whose
    task was lost rejoins the queue once it answers again after its restart."""

    RESTART_POLL_S = 0.2

    def __init__(self, kind: str, actors: list):
        self.kind, self.actors = kind, list(actors)
        self._idle: asyncio.Queue | None = None
        self._loop = None

    @contextlib.asynccontextmanager
    async def use(self):
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # one queue per event loop (each asyncio.run gets a fresh one)
            self._loop, self._idle = loop, asyncio.Queue()
            for actor in self.actors:
                self._idle.put_nowait(actor)
        if not self.actors:
            raise WorkerLost(f"every {self.kind} actor has died")
        actor = await self._idle.get()
        if actor is None:  # the last actor died while this render waited
            self._idle.put_nowait(None)
            raise WorkerLost(f"every {self.kind} actor has died")
        try:
            yield actor
        except LOST:
            asyncio.create_task(self._rejoin(actor))
            raise
        except BaseException:
            self._idle.put_nowait(actor)
            raise
        else:
            self._idle.put_nowait(actor)

    async def _rejoin(self, actor) -> None:
        while True:
            try:
                await actor.ready.remote()
            except ActorUnavailableError:  # still restarting
                await asyncio.sleep(self.RESTART_POLL_S)
                continue
            except RayActorError:  # out of restarts
                self.actors.remove(actor)
                if not self.actors:
                    self._idle.put_nowait(None)
                return
            self._idle.put_nowait(actor)
            return


class RayPools:
    """Encoder, generator and decoder actors for `model` on the connected Ray cluster."""

    def __init__(self, model: str, config: PoolConfig = PoolConfig(), device: str | None = None):
        self.config = config
        self.encoders = [EncoderActor.options(**config.options("encoder")).remote(model, device) for _ in range(config.encoders)]
        self.generators = [
            GeneratorActor.options(**config.options("generator")).remote(model, device, config.dtype)
            for _ in range(config.generators)
        ]
        self.decoders = [DecoderActor.options(**config.options("decoder")).remote(model, device) for _ in range(config.decoders)]
        self._queues = {kind: ActorQueue(kind, getattr(self, kind)) for kind in ("encoders", "generators", "decoders")}

    def wait_ready(self, notify=None, every_s: float = 30.0) -> list[str]:
        """Block until every actor has loaded its model; their names. While some wait for
        resources (an autoscaling cluster adding nodes, or a cluster too small), `notify`
        gets a line saying what they wait for, every `every_s` seconds."""
        refs = [a.ready.remote() for a in self.encoders + self.generators + self.decoders]
        while True:
            ready, pending = ray.wait(refs, num_returns=len(refs), timeout=every_s)
            if not pending:
                return ray.get(refs)
            if notify is not None:
                need = {k: self.config.gpus(k) for k in ("generator", "decoder", "encoder")}
                notify(f"waiting for {len(pending)} of {len(refs)} actors to start (GPUs each: {need}, CPUs each: "
                       f"{self.config.cpus}); cluster has {ray.cluster_resources()}, free {ray.available_resources()}")

    async def encode(self, request: RenderRequest, images: tuple[bytes, bytes | None] | None = None) -> Encoded:
        async with self._queues["encoders"].use() as actor:
            return await actor.encode.remote(request, images)

    async def generate(self, job: SectionJob) -> AsyncIterator[dict]:
        try:
            async with self._queues["generators"].use() as actor:
                async for ref in actor.generate.remote(job):
                    yield await ref
        except LOST as e:
            raise WorkerLost(f"generator actor lost during section {job.position}: {type(e).__name__}") from e

    async def share(self, context: RenderContext) -> Shared:
        # One object in the store per render: each actor fetches it once (ContextCache).
        return Shared(context.key, ray.put(context))

    async def segment(self, job: SegmentJob) -> list[int]:
        for _ in range(self.config.max_restarts):
            try:
                async with self._queues["decoders"].use() as actor:
                    return await actor.segment.remote(job)
            except LOST:
                continue  # a segment job is pure (same bytes again): run it on a restarted actor
        async with self._queues["decoders"].use() as actor:
            return await actor.segment.remote(job)

    async def cancel(self, request_id: str) -> None:
        for actor in self.generators:
            actor.cancel.remote(request_id)

    def shutdown(self) -> None:
        for actor in self.encoders + self.generators + self.decoders:
            ray.kill(actor, no_restart=True)
