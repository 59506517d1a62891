"""Ray actors over the workers, and the pools the coordinator runs a render on.

Generators hold the transformer (one GPU each by default), decoders the tiled VAE and
encoders the text/image encoders (half a GPU each). Actors restart after a crash
(`max_restarts`); the task that was running fails and the coordinator retries it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Mapping

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, ObjectLostError, RayActorError, RayTaskError

from .coordinator import WorkerLost
from .encode import Encoded
from .models import ModelSpec
from .placement import check_placement
from .request import RenderRequest
from .speed import SpeedOptions
from .storage import SectionStore
from .workers import (DecoderWorker, EncoderWorker, GeneratorWorker, RenderContext, SectionJob, SectionOutOfMemory, SegmentJob,
                      Shared, WorkerStartError)

log = logging.getLogger(__name__)
LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


async def own_error(call):
    """The awaited result of a Ray call; an error the remote code raised comes back as itself
    (a bad image or clip a user must fix), not as Ray's wrapper with its traceback."""
    try:
        return await call
    except RayTaskError as e:
        if isinstance(e.cause, Exception):
            raise e.cause from None
        raise
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def start_error(e: BaseException) -> WorkerStartError:
    """An actor whose constructor raised, as that error's own last line (Ray's wrapper has the
    remote traceback, coloured)."""
    lines = [line.strip() for line in ANSI.sub("", str(e)).splitlines() if line.strip()]
    return WorkerStartError(f"a worker failed to load its model: {lines[-1] if lines else type(e).__name__}")


@dataclass(frozen=True)
class PoolConfig:
    """How many of each actor, what each one asks the cluster for (declared here, never read
    from the cluster: a cluster at zero GPU nodes is asked for the right ones), and how the
    actors load their models. On a GPU: one per generator, half for a decoder and for an
    encoder (encoders run fp16 on the GPU, as everywhere). `device="cpu"` asks for none."""

    generators: int = 1
    decoders: int = 1
    encoders: int = 1
    generator_gpus: float = 1.0
    decoder_gpus: float = 0.5
    encoder_gpus: float = 0.5
    cpus: float = 0.5  # per actor: GPU actors need little CPU, and 4 actors still fit on 2 cores
    resources: dict[str, dict[str, float]] = field(default_factory=dict)  # {"generator": {"fp_generator": 1}}
    max_restarts: int = 3
    autoscaling: bool = False  # the cluster adds nodes on demand: wait for them rather than fail
    # how the actors load: see models.ModelSpec
    device: str | None = None
    dtype: str | None = None
    memory: str = "auto"
    base: str | None = None
    image_encoder: str | None = None
    force_schedule: bool = False
    speed: SpeedOptions | None = None  # compile / attention backend / fp8 of the generators

    @classmethod
    def one_machine(cls, gpus: int, **fields) -> "PoolConfig":
        """The asks for a Ray that fp-ray starts on this machine with `gpus` GPUs: none on a
        CPU-only machine; on one GPU, every actor shares it (the memory mode keeps them in
        its memory)."""
        if gpus == 0:
            return cls(**{**fields, "device": fields.get("device") or "cpu"})
        if gpus == 1:
            n = fields.get("encoders", 1) + fields.get("generators", 1) + fields.get("decoders", 1)
            share = {f"{kind}_gpus": 1.0 / n for kind in ("generator", "decoder", "encoder")}
            return cls(**{**share, **fields})
        return cls(**fields)

    def gpus(self, kind: str) -> float:
        return 0.0 if self.device == "cpu" else getattr(self, f"{kind}_gpus")

    def bundle(self, kind: str, cpus: float | None = None) -> dict[str, float]:
        return {"CPU": self.cpus if cpus is None else cpus, "GPU": self.gpus(kind), **self.resources.get(kind, {})}

    def spec(self, model: str) -> ModelSpec:
        return ModelSpec(model, self.base, self.image_encoder, self.device, self.dtype, self.memory, self.force_schedule)

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


def by_value(ctx: RenderContext, latents: Mapping[int, object]) -> dict[int, torch.Tensor]:
    """A job's latents with the references resolved. Each section's latents travel from the
    generator that made them to the workers that read them as a Ray object the coordinator
    only holds the reference to (it never fetches them). An object lost with its node is read
    back from the render's store, where every section is saved before it counts as done."""
    out = dict(latents)
    for p, ref in latents.items():
        if not isinstance(ref, ray.ObjectRef):
            continue
        try:
            out[p] = ray.get(ref)
        except ObjectLostError as e:  # freed, its node gone, or its owner (OwnerDiedError)
            saved = SectionStore(ctx.store).load(ctx.request_id, ctx.fingerprint, p)
            if saved is None:
                raise FileNotFoundError(f"section {p} of render {ctx.request_id}: lost ({type(e).__name__}) and not in {ctx.store}") from e
            out[p] = saved
    return out


@ray.remote(concurrency_groups={"control": 1})
class GeneratorActor(GeneratorWorker):
    @ray.method(concurrency_group="control")
    def ready(self) -> str:
        return self.name

    def generate(self, job: SectionJob):
        """The worker's events; the finished latents follow their event as an object of their
        own, so that the coordinator can pass them on without fetching them."""
        job = replace(job, context=by_value(self.contexts.get(job.shared), job.context))
        for event in super().generate(job):
            if event["type"] == "latents":
                latents = event.pop("latents")
                yield event
                yield latents
            else:
                yield event

    @ray.method(concurrency_group="control")
    def cancel(self, request_id: str) -> None:
        super().cancel(request_id)


@ray.remote
class DecoderActor(DecoderWorker):
    def ready(self) -> str:
        return self.name

    def segment(self, job: SegmentJob) -> list[int]:
        if job.latents is not None:
            job = replace(job, latents=by_value(self.contexts.get(job.shared), job.latents))
        return super().segment(job)


class ActorQueue:
    """Hands out idle actors of one kind; a render waits when all are busy. An actor whose
    task was lost rejoins the queue once it answers again after its restart."""

    RESTART_POLL_S = 0.2

    def __init__(self, kind: str, actors: list):
        self.kind, self.actors = kind, list(actors)
        self._idle: asyncio.Queue | None = None
        self._loop = None

    @contextlib.asynccontextmanager
    async def use(self, avoid: list | None = None):
        """An idle actor, other than those in `avoid` while another one exists."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # one queue per event loop (each asyncio.run gets a fresh one)
            self._loop, self._idle = loop, asyncio.Queue()
            for actor in self.actors:
                self._idle.put_nowait(actor)
        if not self.actors:
            raise WorkerLost(f"every {self.kind} actor has died")
        actor = await self._idle.get()
        while avoid and actor in avoid and any(a not in avoid for a in self.actors):
            self._idle.put_nowait(actor)  # back in line; wait for one of the others to be idle
            await asyncio.sleep(self.RESTART_POLL_S)
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

    def __init__(self, model: str, config: PoolConfig = PoolConfig()):
        self.config = config
        check_placement({kind: (getattr(config, f"{kind}s"), config.bundle(kind)) for kind in ("encoder", "generator", "decoder")},
                        config.autoscaling)
        spec = config.spec(model)
        self.encoders = [EncoderActor.options(**config.options("encoder")).remote(spec) for _ in range(config.encoders)]
        self.generators = [GeneratorActor.options(**config.options("generator")).remote(spec, speed=config.speed)
                           for _ in range(config.generators)]
        self.decoders = [DecoderActor.options(**config.options("decoder")).remote(spec) for _ in range(config.decoders)]
        self._queues = {kind: ActorQueue(kind, getattr(self, kind)) for kind in ("encoders", "generators", "decoders")}

    def wait_ready(self, notify=None, every_s: float = 30.0) -> list[str]:
        """Block until every actor has loaded its model; their names. While some wait for
        resources (an autoscaling cluster adding nodes, or a cluster too small), `notify`
        gets a line saying what they wait for, every `every_s` seconds."""
        refs = [a.ready.remote() for a in self.encoders + self.generators + self.decoders]
        while True:
            ready, pending = ray.wait(refs, num_returns=len(refs), timeout=every_s)
            if not pending:
                try:
                    return ray.get(refs)
                except LOST as e:  # the constructor raised
                    raise start_error(e) from e
            if notify is not None:
                need = {k: self.config.gpus(k) for k in ("generator", "decoder", "encoder")}
                notify(f"waiting for {len(pending)} of {len(refs)} actors to start (GPUs each: {need}, CPUs each: "
                       f"{self.config.cpus}); cluster has {ray.cluster_resources()}, free {ray.available_resources()}")

    async def encode(self, request: RenderRequest, images: tuple[bytes | None, ...] | None = None) -> Encoded:
        async with self._queues["encoders"].use() as actor:
            return await own_error(actor.encode.remote(request, images))

    async def generate(self, job: SectionJob) -> AsyncIterator[dict]:
        """A section on an idle generator; one that runs out of GPU memory is tried once more
        on another generator (its memory may be free-er: another mode, a bigger card)."""
        tried = []
        while True:
            try:
                async with self._queues["generators"].use(avoid=tried) as actor:
                    tried.append(actor)
                    stream = actor.generate.remote(job)
                    async for ref in stream:
                        event = await ref
                        if event["type"] == "latents":  # the next object is the tensor: passed on by reference
                            event["latents"] = await stream.__anext__()
                        yield event
                return
            except LOST as e:
                raise WorkerLost(f"generator actor lost during section {job.position}: {type(e).__name__}") from e
            except SectionOutOfMemory:
                if len(tried) > 1 or len(self.generators) < 2:
                    raise

    async def share(self, context: RenderContext) -> Shared:
        # One object in the store per render: each actor fetches it once (ContextCache).
        return Shared(context.key, ray.put(context))

    async def segment(self, job: SegmentJob) -> list[int]:
        for attempt in range(1, self.config.max_restarts + 1):
            try:
                async with self._queues["decoders"].use() as actor:
                    return await actor.segment.remote(job)
            except LOST as e:  # a segment job is pure (same bytes again): run it on a restarted actor
                log.warning("fp-ray: decoder lost on chunk %d (%s); running it again (attempt %d)",
                            job.position, type(e).__name__, attempt + 1)
        async with self._queues["decoders"].use() as actor:
            return await actor.segment.remote(job)

    async def cancel(self, request_id: str) -> None:
        for actor in self.generators:
            actor.cancel.remote(request_id)

    def shutdown(self) -> None:
        for actor in self.encoders + self.generators + self.decoders:
            ray.kill(actor, no_restart=True)
