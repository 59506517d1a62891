"""One request through the four paths (CLI, `render --ray` actors, batch, Serve deployments)
on the shared fake-GPU cluster: every path loads through the one device policy, so the
latents and the video bytes are the same."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest
import torch
from ray import serve

from fp_ray import SAMPLE_IMAGE, TINY_CHECKPOINT
from fp_ray.actors import PoolConfig, RayPools
from fp_ray.batch import BatchConfig, run_batch
from fp_ray.cli import main
from fp_ray.coordinator import run_render
from fp_ray.render import render
from fp_ray.request import make_request
from serving.app import ServePools, build_app
from conftest import free_port

FIELDS = dict(prompt="a red house", seconds=1.2, steps=2, seed=11)
SIZE = (64, 48)


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def request_():
    return make_request(**FIELDS, width=SIZE[0], height=SIZE[1], image=str(SAMPLE_IMAGE))


def test_the_four_paths_give_the_same_latents_and_video(ray_cluster, components, request_, tmp_path):
    videos = {}
    # CLI: fp-ray render, in this process
    cli_out = tmp_path / "cli.mp4"
    argv = ["render", "--image", str(SAMPLE_IMAGE), "--size", "x".join(map(str, SIZE)), "--out", str(cli_out)]
    argv += [a for k, v in FIELDS.items() for a in (f"--{k}", str(v))]
    assert main(argv) == 0
    videos["cli"] = sha(cli_out)
    local = render(request_, tmp_path / "local.mp4", components=components, keep_latents=True)
    assert sha(local.path) == videos["cli"]

    # render --ray: actors with the declared (fake) GPUs
    pools = RayPools(str(TINY_CHECKPOINT), PoolConfig())
    pools.wait_ready()
    try:
        on_ray = asyncio.run(run_render(request_, pools, out=tmp_path / "ray.mp4", keep_latents=True))
    finally:
        pools.shutdown()
    videos["ray"] = sha(on_ray.path)

    # batch: Ray Data stages
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "one", **FIELDS, "image": str(SAMPLE_IMAGE), "size": "x".join(map(str, SIZE))}) + "\n")
    (record,) = run_batch(str(manifest), str(tmp_path / "batch"), str(TINY_CHECKPOINT), BatchConfig())
    assert record["status"] == "ok", record
    videos["batch"] = sha(record["output"])

    # Serve: the app's deployments, driven by the same coordinator the ingress runs
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    try:
        serve.run(build_app({"model": str(TINY_CHECKPOINT), "storage": str(tmp_path / "serve")}), name="paths",
                  route_prefix="/paths")
        handles = [serve.get_deployment_handle(name, app_name="paths") for name in ("Encoder", "Generator", "Decoder")]
        on_serve = asyncio.run(run_render(request_, ServePools(*handles), out=tmp_path / "serve.mp4", keep_latents=True))
    finally:
        serve.shutdown()
    videos["serve"] = sha(on_serve.path)

    assert torch.equal(on_ray.latents, local.latents) and torch.equal(on_serve.latents, local.latents)
    assert len(set(videos.values())) == 1, videos
