"""The fp-ray Ray Serve application: an HTTP ingress (FastAPI) over encoder, generator and
decoder deployments that hold the model. Each render runs the coordinator in the ingress,
over the deployments' handles: the same path as a local or batch render.

    serve run serving.app:build_app model=/models/FramePackI2V_HY storage=/shared/fp-ray
    serve deploy serving/config.yaml        # scaling, GPUs, autoscaling: in the YAML
    fp-ray serve                            # locally, on the tiny checkpoint
"""

from __future__ import annotations

import asyncio
import os
from typing import AsyncIterator

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from fp_ray import TINY_CHECKPOINT
from fp_ray.actors import LOST
from fp_ray.coordinator import WorkerLost
from fp_ray.encode import Encoded
from fp_ray.request import RenderRequest
from fp_ray.workers import (DecoderWorker, EncoderWorker, GeneratorWorker, RenderContext, SectionJob, SegmentJob, Shared,
                            iterate_in_thread)
from serving.api import bind_service, make_api
from serving.service import RenderService


# Default CPU asks are small so the whole app fits a 2-core machine; serving/config.yaml sets
# GPUs and CPUs for a cluster.
@serve.deployment(max_ongoing_requests=4, ray_actor_options={"num_cpus": 0.25})
class Encoder:
    def __init__(self, model: str, device: str | None = None):
        self.worker = EncoderWorker(model, device)

    async def encode(self, request: RenderRequest, images: tuple[bytes, bytes | None] | None = None) -> Encoded:
        return await asyncio.to_thread(self.worker.encode, request, images)


@serve.deployment(max_ongoing_requests=1, ray_actor_options={"num_cpus": 0.5})  # one section per GPU at a time
class Generator:
    def __init__(self, model: str, device: str | None = None, dtype: str | None = None):
        self.worker = GeneratorWorker(model, device, dtype)

    async def generate(self, job: SectionJob) -> AsyncIterator[dict]:
        async for event in iterate_in_thread(self.worker.generate(job)):
            yield event


@serve.deployment(max_ongoing_requests=1, ray_actor_options={"num_cpus": 0.5})
class Decoder:
    def __init__(self, model: str, device: str | None = None):
        self.worker = DecoderWorker(model, device)

    async def segment(self, job: SegmentJob) -> list[int]:
        return await asyncio.to_thread(self.worker.segment, job)


class ServePools:
    """The coordinator's pools over deployment handles; Serve routes each call to a replica
    with room (max_ongoing_requests) and queues it otherwise."""

    def __init__(self, encoder: DeploymentHandle, generator: DeploymentHandle, decoder: DeploymentHandle):
        self.encoder, self.generator, self.decoder = encoder, generator, decoder

    async def encode(self, request: RenderRequest, images: tuple[bytes, bytes | None] | None = None) -> Encoded:
        return await self.encoder.encode.remote(request, images)

    async def generate(self, job: SectionJob) -> AsyncIterator[dict]:
        try:
            async for event in self.generator.options(stream=True).generate.remote(job):
                yield event
        except LOST as e:
            raise WorkerLost(f"generator replica lost during section {job.position}: {type(e).__name__}") from e

    async def share(self, context: RenderContext) -> Shared:
        # One object ref per render; replicas fetch it once each. Segments go to the store:
        # the ingress sees no pixels.
        return Shared(context.key, ray.put(context))

    async def segment(self, job: SegmentJob) -> list[int]:
        return await self.decoder.segment.remote(job)

    async def cancel(self, request_id: str) -> None:
        """Nothing to do: cancelling the render's task cancels its in-flight Serve requests."""


api = make_api()


@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class Ingress:
    def __init__(self, encoder: DeploymentHandle, generator: DeploymentHandle, decoder: DeploymentHandle,
                 model: str, storage: str, database: str | None = None, auth_token: str | None = None,
                 max_upload_mb: float = 25.0):
        token = auth_token or os.environ.get("FP_RAY_API_TOKEN") or None
        pools = ServePools(encoder, generator, decoder)
        self.service = RenderService(pools, model, storage, database, token, max_upload_mb)
        bind_service(self.service)
        # Serve builds replicas inside their event loop: resume left-over renders right away
        # rather than at the first request.
        asyncio.get_running_loop().call_soon(self.service.resume_unfinished)


def build_app(args: dict) -> serve.Application:
    """`serve run` / `serve deploy` builder. args: model (default: the tiny checkpoint),
    storage (artifacts and section checkpoints; default ./fp-ray-data), database (SQLite;
    default STORAGE/renders.db), auth_token (or env FP_RAY_API_TOKEN), device, dtype,
    max_upload_mb."""
    model = args.get("model", str(TINY_CHECKPOINT))
    device, dtype = args.get("device"), args.get("dtype")
    storage = os.path.abspath(args.get("storage", "fp-ray-data"))
    return Ingress.bind(
        Encoder.bind(model, device),
        Generator.bind(model, device, dtype),
        Decoder.bind(model, device),
        model,
        storage,
        args.get("database"),
        args.get("auth_token"),
        float(args.get("max_upload_mb", 25.0)),
    )
