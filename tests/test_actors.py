"""The coordinator over Ray actors on a local fake-GPU cluster: same video as a local render,
concurrent fills, crashed actors, restarted renders."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
import ray
import torch

from fp_ray import TINY_CHECKPOINT
from fp_ray.actors import PoolConfig, RayPools
from fp_ray.coordinator import run_render
from fp_ray.render import render
from fp_ray.request import make_request
from fp_ray.storage import SectionStore
from fp_ray.speed import SpeedOptions
from fp_ray.workers import SectionOutOfMemory, WorkerStartError

REQUEST = dict(prompt="a quiet valley", width=64, height=48, steps=4)


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def pools(ray_cluster):
    """Two generators (one fake GPU each) and one decoder (half a GPU)."""
    pools = RayPools(str(TINY_CHECKPOINT), PoolConfig(generators=2, decoders=1, max_restarts=2))
    pools.wait_ready()
    yield pools
    pools.shutdown()


def ray_render(request, pools, **kwargs):
    events = []
    result = asyncio.run(run_render(request, pools, on_event=events.append, **kwargs))
    return result, events


def test_actors_hold_their_gpus(pools):
    assert len(set(ray.get([g.ready.remote() for g in pools.generators]))) == 2
    assert pools.config.gpus("generator") == 1.0 and pools.config.gpus("decoder") == 0.5
    # 4 fake GPUs: two generators hold one each, the decoder and the encoder half of one each
    assert ray.available_resources().get("GPU", 0) == pytest.approx(1.0)


@pytest.mark.parametrize("schedule,seconds,keyframe", [("bidirectional", 6.0, None), ("inverted", 3.6, None), ("bidirectional", 4.8, 2.4)])
def test_distributed_video_is_byte_identical_to_local(pools, components, tmp_path, schedule, seconds, keyframe, monkeypatch):
    """...with each section's latents passed from its generator to the generators and decoders
    that read them by reference: the coordinator holds Ray object references, never a tensor.
    A keyframe's latent and embedding reach the generators with the render's conditioning."""
    from PIL import Image, ImageOps

    from fp_ray import SAMPLE_IMAGE
    from fp_ray.coordinator import SectionLatents

    held = []
    add = SectionLatents.add
    monkeypatch.setattr(SectionLatents, "add", lambda self, p, latents: held.append(type(latents)) or add(self, p, latents))
    keyframes = ()
    if keyframe is not None:
        ImageOps.mirror(Image.open(SAMPLE_IMAGE)).save(tmp_path / "key.png")
        keyframes = ({"at": keyframe, "image": str(tmp_path / "key.png")},)
    request = make_request(**REQUEST, schedule=schedule, seconds=seconds, keyframes=keyframes)
    distributed, _ = ray_render(request, pools, out=tmp_path / "ray.mp4", keep_latents=True)
    assert len(held) == distributed.plan.num_sections and set(held) == {ray.ObjectRef}
    monkeypatch.undo()
    local = render(request, tmp_path / "local.mp4", components=components, keep_latents=True)
    assert (local.latents - distributed.latents).abs().max().item() == 0.0
    assert sha(local.path) == sha(distributed.path)


def test_bidirectional_fills_of_a_wave_run_at_once_on_different_actors(pools, tmp_path):
    request = make_request(**{**REQUEST, "steps": 12}, schedule="bidirectional", seconds=6.0)
    result, events = ray_render(request, pools, out=tmp_path / "v.mp4")
    spans = {}
    for e in events:
        if e["type"] == "section_started":
            spans[e["position"]] = [e["time"], None, e["worker"], e["wave"]]
        elif e["type"] == "section_finished":
            spans[e["position"]][1] = e["time"]
    waves = {}
    for position, (start, end, worker, wave) in spans.items():
        waves.setdefault(wave, []).append((start, end, worker))
    multi = [w for w in waves.values() if len(w) == 2]
    assert multi, f"no wave with two fills in {waves}"
    for (s1, e1, w1), (s2, e2, w2) in multi:
        assert w1 != w2
        assert s1 < e2 and s2 < e1, "fills of one wave did not overlap in time"


def test_killed_generator_is_restarted_and_only_its_section_regenerated(pools, components, tmp_path):
    request = make_request(**{**REQUEST, "steps": 40}, seconds=4.8)  # inverted, 4 sections
    store = SectionStore(tmp_path / "sections")
    victim = request.num_sections - 2  # the second section generated (inverted runs backwards)
    by_name = dict(zip(ray.get([g.ready.remote() for g in pools.generators]), pools.generators))
    killed = []

    def kill_mid_section(e):
        if e["type"] == "step" and e["position"] == victim and e["step"] == 3 and not killed:
            killed.append(e["worker"])
            ray.kill(by_name[e["worker"]], no_restart=False)

    events = []
    result = asyncio.run(run_render(request, pools, out=tmp_path / "ray.mp4", store=store, request_id="kill-test",
                                    on_event=lambda e: (events.append(e), kill_mid_section(e))))
    assert killed
    retries = [e for e in events if e["type"] == "section_retry"]
    assert [e["position"] for e in retries] == [victim], retries
    started = [e["position"] for e in events if e["type"] == "section_started"]
    assert sorted(started) == sorted(list(range(4)) + [victim])  # only the lost section ran twice
    local = render(request, tmp_path / "local.mp4", components=components)
    assert sha(result.path) == sha(local.path)
    assert all(store.has("kill-test", result.fingerprint, p, "section") for p in range(4))


class CoordinatorCrash(RuntimeError):
    pass


def test_loop_on_actors_is_byte_identical_to_local_and_resumes(pools, components, tmp_path):
    """The seam segment needs the last chunk and the first; a render stopped after its first
    section and run again on the actors gives the local video's bytes."""
    request = make_request(**REQUEST, window=2, seconds=0.8, loop=True)  # 3 sections
    store = SectionStore(tmp_path / "sections")

    def crash_after_one(e):
        if e["type"] == "section_finished":
            raise CoordinatorCrash

    with pytest.raises(CoordinatorCrash):
        asyncio.run(run_render(request, pools, out=tmp_path / "ray.mp4", store=store, request_id="loop", on_event=crash_after_one))
    distributed, _ = ray_render(request, pools, out=tmp_path / "ray.mp4", store=store, request_id="loop")
    assert distributed.reused == [2] and distributed.generated == [0, 1]
    local = render(request, tmp_path / "local.mp4", components=components)
    assert distributed.frames == local.frames == 28 and sha(distributed.path) == sha(local.path)


def test_restarted_render_reuses_checkpointed_sections(pools, tmp_path):
    request = make_request(**REQUEST, seconds=4.8)
    store = SectionStore(tmp_path / "sections")
    finished = []

    def crash_after_two(e):
        if e["type"] == "section_finished":
            finished.append(e["position"])
            if len(finished) == 2:
                raise CoordinatorCrash

    with pytest.raises(CoordinatorCrash):
        asyncio.run(run_render(request, pools, out=tmp_path / "a.mp4", store=store, request_id="r1", on_event=crash_after_two))
    assert not (tmp_path / "a.mp4").exists()
    result, events = ray_render(request, pools, out=tmp_path / "a.mp4", store=store, request_id="r1")
    assert result.reused == sorted(finished) == [2, 3]
    assert result.generated == [0, 1]
    assert sorted(e["position"] for e in events if e["type"] == "section_started") == [0, 1]
    fresh, _ = ray_render(request, pools, out=tmp_path / "b.mp4")
    assert sha(result.path) == sha(fresh.path)


def test_out_of_memory_section_is_retried_once_on_another_generator(pools, components, tmp_path):
    def _set_oom(worker, on: bool) -> None:  # runs inside a generator actor (defined here: shipped by value)
        transformer = worker.components.transformer
        if on:
            def oom(module, args):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

            worker._oom = transformer.register_forward_pre_hook(oom)
        else:
            worker._oom.remove()

    request = make_request(**REQUEST, seconds=1.2)
    first = pools.generators[0]  # a fresh queue hands out the actors in order: this one goes first
    ray.get(first.__ray_call__.remote(_set_oom, True))
    try:
        result, events = ray_render(request, pools, out=tmp_path / "a.mp4", keep_latents=True)
        started = [e["worker"] for e in events if e["type"] == "section_started"]
        assert len(started) == 2 and started[0] != started[1]
        assert torch.equal(result.latents, render(request, tmp_path / "b.mp4", components=components, keep_latents=True).latents)
        ray.get(pools.generators[1].__ray_call__.remote(_set_oom, True))
        try:
            with pytest.raises(SectionOutOfMemory, match="section 0 ran out of GPU memory .* memory mode resident"):
                ray_render(request, pools, out=tmp_path / "c.mp4")
        finally:
            ray.get(pools.generators[1].__ray_call__.remote(_set_oom, False))
    finally:
        ray.get(first.__ray_call__.remote(_set_oom, False))


def test_lora_renders_on_actors_match_local_and_leave_no_trace(pools, components, tmp_path):
    """The adapters load inside the generator actors (from the file the encoder hashed); a
    plain request after a LoRA one on the same actors is the plain local video again."""
    from test_lora import ATTENTION, make_lora, own

    lora = make_lora(tmp_path / "style", 1, ATTENTION)
    styled = make_request(**REQUEST, schedule="bidirectional", seconds=6.0, loras=f"{lora}:0.8")
    local = render(styled, tmp_path / "local.mp4", components=own(components), keep_latents=True)
    distributed, _ = ray_render(styled, pools, out=tmp_path / "ray.mp4", keep_latents=True)
    assert torch.equal(local.latents, distributed.latents) and local.fingerprint == distributed.fingerprint
    plain = make_request(**REQUEST, schedule="bidirectional", seconds=6.0)
    base, _ = ray_render(plain, pools, out=tmp_path / "plain.mp4", keep_latents=True)
    assert torch.equal(base.latents, render(plain, tmp_path / "p.mp4", components=components, keep_latents=True).latents)
    assert not torch.equal(base.latents, distributed.latents)


def test_a_worker_that_cannot_load_its_model_fails_in_one_line(ray_cluster):
    """A generator whose speed option cannot run where it landed (FP8 on a CPU) ends the wait
    with its own error, not a Ray traceback."""
    bad = RayPools(str(TINY_CHECKPOINT), PoolConfig(device="cpu", speed=SpeedOptions(fp8=True)))
    try:
        with pytest.raises(WorkerStartError, match="fp8 needs") as caught:
            bad.wait_ready()
        assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)
    finally:
        bad.shutdown()


@ray.remote(num_cpus=0)
class Owner:
    """Puts objects it owns: they are lost with it, as a dead node's are."""

    def put(self, value):
        return [ray.put(value)]  # nested in a list: the object stays this actor's


def lost_ref():
    # On another node than this driver's: an object in the driver's own node's store can still
    # be read there until that node frees it, which races with the owner's death.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    there = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != here)
    owner = Owner.options(scheduling_strategy=NodeAffinitySchedulingStrategy(there, soft=False)).remote()
    # 4 MB: kept in the object store (small objects travel inlined with the reference)
    [ref] = ray.get(owner.put.remote(torch.zeros(1_000_000)))
    ray.kill(owner)
    with pytest.raises(ray.exceptions.RayActorError):  # returns once the owner is gone for sure
        for _ in range(100):
            ray.get(owner.put.remote(None), timeout=30)
    return ref


def test_a_lost_latents_object_is_read_back_from_the_store(ray_cluster, components, tmp_path):
    """Latents pass by reference; one whose object is gone (its owner or node died) comes from
    the render's store, where the generator saved it before reporting it; one that is in
    neither is a clear error."""
    from fp_ray.actors import by_value
    from fp_ray.coordinator import render_context
    from fp_ray.encode import encode_request

    ctx = render_context(encode_request(components, make_request(**REQUEST, seconds=2.4)), "lost", SectionStore(tmp_path))
    saved, other = torch.randn(1, 16, 9, 6, 8), torch.randn(1, 16, 9, 6, 8)
    SectionStore(tmp_path).save(ctx.request_id, ctx.fingerprint, 0, saved)
    out = by_value(ctx, {0: lost_ref(), 1: ray.put(other)})
    assert torch.equal(out[0], saved) and torch.equal(out[1], other)
    with pytest.raises(FileNotFoundError, match="section 2 of render lost"):
        by_value(ctx, {2: lost_ref()})
