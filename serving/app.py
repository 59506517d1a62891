"""The fp-ray Ray Serve application: an HTTP ingress (FastAPI) over encoder, generator and
decoder deployments that hold the model. Each render runs the coordinator in the ingress,
over the deployments' handles: the same path as a local or batch render.

    serve run serving.app:build_app model=/models/FramePackI2V_HY storage=/shared/fp-ray
    serve deploy serving/config.yaml        # scaling, GPUs, autoscaling: in the YAML
    fp-ray serve                            # locally, on the tiny checkpoint
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from typing import AsyncIterator

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from fp_ray import TINY_CHECKPOINT
from fp_ray.actors import LOST, own_error
from fp_ray.coordinator import WorkerLost
from fp_ray.encode import Encoded
from fp_ray.lora import LoraError, LoraRegistry
from fp_ray.models import ModelSpec
from fp_ray.request import RenderRequest
from fp_ray.speed import SpeedOptions
from fp_ray.storage import SectionStore
from fp_ray.workers import (Cancelled, DecoderWorker, EncoderWorker, GeneratorWorker, RenderContext, SectionJob, SegmentJob,
                            Shared, iterate_in_thread)
from serving.api import bind_service, make_api
from serving.service import CANCELLED_TOKEN, RenderService, ServiceConfig, owner_location, read_owner

log = logging.getLogger(__name__)


# Default CPU asks are small so the whole app fits a 2-core machine; serving/config.yaml sets
# GPUs and CPUs for a cluster.
@serve.deployment(max_ongoing_requests=4, ray_actor_options={"num_cpus": 0.25})
class Encoder:
    def __init__(self, spec: ModelSpec, loras: LoraRegistry | None = None):
        self.worker = EncoderWorker(spec, loras=loras or LoraRegistry({}))  # a server reads only its registered LoRAs

    async def encode(self, request: RenderRequest, images: tuple[bytes | None, ...] | None = None) -> Encoded:
        return await asyncio.to_thread(self.worker.encode, request, images)


@serve.deployment(max_ongoing_requests=1, ray_actor_options={"num_cpus": 0.5})  # one section per GPU at a time
class Generator:
    def __init__(self, spec: ModelSpec, speed: dict | None = None):
        self.worker = GeneratorWorker(spec, speed=speed)

    async def generate(self, job: SectionJob) -> AsyncIterator[dict]:
        """The section's events. Between two steps the render's owner token is read again: once
        it changed (a cancel, or another ingress took the render over) the section stops there,
        before its checkpoint, even if the caller's cancellation never reached this replica."""
        ctx = await asyncio.to_thread(self.worker.contexts.get, job.shared)
        token = owner_location(SectionStore(ctx.store), ctx.request_id)
        owner = await asyncio.to_thread(read_owner, token)
        if owner == CANCELLED_TOKEN:
            raise Cancelled(f"render {ctx.request_id}: section {job.position} not started, the render was cancelled")
        # No token: a render not run by the service (the coordinator called directly) has no owner to check.
        async for event in iterate_in_thread(self.worker.generate(job)):
            yield event
            if owner is not None and await asyncio.to_thread(read_owner, token) != owner:
                raise Cancelled(f"render {ctx.request_id}: section {job.position} stopped, its owner changed")


@serve.deployment(max_ongoing_requests=1, ray_actor_options={"num_cpus": 0.5})
class Decoder:
    def __init__(self, spec: ModelSpec):
        self.worker = DecoderWorker(spec)

    async def segment(self, job: SegmentJob) -> list[int]:
        """The segments made (see DecoderWorker.segment). A job of a cancelled render is not
        started; one that was running when its render was cancelled removes what it saved,
        since the cancel dropped the render's work files before this job's seam halves landed."""
        ctx = await asyncio.to_thread(self.worker.contexts.get, job.shared)
        store = SectionStore(ctx.store)
        token = owner_location(store, ctx.request_id)
        owner = await asyncio.to_thread(read_owner, token)
        if owner == CANCELLED_TOKEN:
            raise Cancelled(f"render {ctx.request_id}: chunk {job.position} not decoded, the render was cancelled")
        made = await asyncio.to_thread(self.worker.segment, job)
        # No token at the start: a render not run by the service. None at the end: its work files were dropped.
        if owner is not None and await asyncio.to_thread(read_owner, token) in (CANCELLED_TOKEN, None):
            await asyncio.to_thread(store.remove, ctx.request_id, ctx.fingerprint)
            raise Cancelled(f"render {ctx.request_id}: chunk {job.position} decoded after the render was cancelled")
        return made


class ServePools:
    """The coordinator's pools over deployment handles; Serve routes each call to a replica
    with room (max_ongoing_requests) and queues it otherwise."""

    def __init__(self, encoder: DeploymentHandle, generator: DeploymentHandle, decoder: DeploymentHandle):
        self.encoder, self.generator, self.decoder = encoder, generator, decoder

    async def encode(self, request: RenderRequest, images: tuple[bytes | None, ...] | None = None) -> Encoded:
        return await own_error(self.encoder.encode.remote(request, images))

    async def generate(self, job: SectionJob) -> AsyncIterator[dict]:
        stream = self.generator.options(stream=True).generate.remote(job)
        try:
            async for event in stream:
                yield event
        except LOST as e:
            log.warning("generator replica lost during section %s of %s: %r", job.position, job.shared.key, e)
            raise WorkerLost(f"generator replica lost during section {job.position}") from e
        except asyncio.CancelledError:
            stream.cancel()  # say so to the replica explicitly: its slot frees now, not after the section
            raise

    async def share(self, context: RenderContext) -> Shared:
        # One object ref per render; replicas fetch it once each. Segments go to the store:
        # the ingress sees no pixels.
        return Shared(context.key, ray.put(context))

    async def segment(self, job: SegmentJob, attempts: int = 3) -> list[int]:
        """A lost decoder replica is retried like a lost generator: Serve restarts the replica,
        and a segment job is pure (its inputs are here and in the store)."""
        for attempt in range(1, attempts + 1):
            try:
                return await self.decoder.segment.remote(job)
            except LOST as e:
                log.warning("decoder replica lost on chunk %s (attempt %d): %r", job.position, attempt, e)
                if attempt == attempts:
                    raise WorkerLost(f"decoder replica lost {attempts} times decoding section {job.position}") from e

    async def cancel(self, request_id: str) -> None:
        """Nothing to do: cancelling the render's task cancels its in-flight Serve requests."""


api = make_api()


@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class Ingress:
    def __init__(self, encoder: DeploymentHandle, generator: DeploymentHandle, decoder: DeploymentHandle,
                 model: str, storage: str, database: str | None = None, auth_token: str | None = None,
                 config: ServiceConfig = ServiceConfig(), tokens: dict[str, str] | None = None,
                 loras: LoraRegistry | None = None):
        token = auth_token or os.environ.get("FP_RAY_API_TOKEN") or None
        tokens = tokens or parse_tokens(os.environ.get("FP_RAY_API_TOKENS", ""))
        pools = ServePools(encoder, generator, decoder)
        self.service = RenderService(pools, model, storage, database, token, config, tokens, loras)
        bind_service(self.service)
        # Serve builds replicas inside their event loop: take over left-over renders right away
        # rather than at the first request.
        asyncio.get_running_loop().call_soon(self.service.start)

    async def __del__(self):
        """Serve calls this as the replica shuts down: its renders stay unfinished, to resume."""
        await self.service.stop()


def parse_tokens(text: str) -> dict[str, str]:
    """"name=token,name=token" (env FP_RAY_API_TOKENS) -> {name: token}."""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(pair) != 2 or not pair[0].strip() or not pair[1].strip() for pair in pairs):
        raise ValueError("FP_RAY_API_TOKENS: expected name=token[,name=token...]")
    return {name.strip(): token.strip() for name, token in pairs}


def service_config(args: dict) -> ServiceConfig:
    """The ServiceConfig fields found in `args`, coerced (`serve run ... key=value` gives strings)."""
    values = {}
    for f in dataclasses.fields(ServiceConfig):
        if f.name not in args or args[f.name] is None:
            continue
        value, default = args[f.name], f.default
        if f.name == "url_allow":
            value = tuple(value.replace(",", " ").split()) if isinstance(value, str) else tuple(value)
        elif default is None:
            value = float(value)
        elif isinstance(default, (int, float, str)):
            value = type(default)(value)
        values[f.name] = value
    return ServiceConfig(**values)


def build_app(args: dict) -> serve.Application:
    """`serve run` / `serve deploy` builder. args: model (default: the tiny checkpoint),
    storage (artifacts and section checkpoints; default ./fp-ray-data), database (SQLite file;
    default STORAGE/renders.db) or database_url (postgresql://...: for several ingress replicas),
    auth_token (or env FP_RAY_API_TOKEN), tokens ({name: token}, or env
    FP_RAY_API_TOKENS="name=token,..."), any ServiceConfig field (max_upload_mb, max_queued,
    url_allow, retention_days, ...); how the replicas load (models.ModelSpec): base,
    image_encoder (default: env FP_RAY_BASE_MODEL / FP_RAY_IMAGE_ENCODER, else the hub), device,
    dtype, memory (auto | resident | swap | offload), force_schedule; speed (the generators'
    `SpeedOptions`: {compile, attention, fp8}); loras ({name: location}: the LoRAs requests may
    name, each a .safetensors file, a folder holding one or a hub id; or "name=location,...");
    num_gpus ({"Generator": 1, ...}) for `fp-ray
    serve` on its own machine (a cluster's YAML declares them per deployment)."""
    model = args.get("model", str(TINY_CHECKPOINT))
    spec = ModelSpec(model, args.get("base"), args.get("image_encoder"), args.get("device"), args.get("dtype"),
                     args.get("memory") or "auto", bool(args.get("force_schedule", False)))
    storage = os.path.abspath(args.get("storage", "fp-ray-data"))
    loras = LoraRegistry.from_config(args.get("loras"))
    if loras.names and SpeedOptions.from_config(args.get("speed")).fp8:
        raise LoraError("loras: the generators run fp8 (speed: {fp8: true}), whose quantized layers PEFT cannot wrap; "
                        "configure one or the other")
    gpus = args.get("num_gpus") or {}

    def placed(deployment):  # a YAML's ray_actor_options still win over these
        if deployment.name not in gpus:
            return deployment
        return deployment.options(ray_actor_options={**deployment.ray_actor_options, "num_gpus": gpus[deployment.name]})

    return Ingress.bind(
        placed(Encoder).bind(spec, loras),
        placed(Generator).bind(spec, args.get("speed")),
        placed(Decoder).bind(spec),
        model,
        storage,
        args.get("database_url") or args.get("database"),
        args.get("auth_token"),
        service_config(args),
        args.get("tokens"),
        loras,
    )
