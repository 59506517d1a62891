"""The device/precision policy, memory modes (the libraries' offloading, exercised on the
CPU), model sources, the schedule <-> checkpoint check and section out-of-memory errors."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from fp_ray import TINY_CHECKPOINT
from fp_ray.devices import GIB, MemoryModeError, auto_memory_mode, choose_policy
from fp_ray.encode import encode_request
from fp_ray.models import (BASE_ENV, IMAGE_ENCODER_ENV, TRANSFORMERS, ModelNotFoundError, ModelSources, ModelSpec,
                           ScheduleMismatchError, check_schedule, load_components, transformer_for)
from fp_ray.render import render
from fp_ray.request import make_request
from fp_ray.coordinator import render_context
from fp_ray.storage import SectionStore
from fp_ray.workers import GeneratorWorker, SectionJob, SectionOutOfMemory, Shared

REQUEST = dict(prompt="a quiet valley", width=64, height=48, steps=2, seconds=2.4)


def test_gpu_policy_is_bf16_transformer_fp16_encoders_and_vae():
    p = choose_policy("cuda:0", memory="resident")
    assert (p.transformer_dtype, p.encoder_dtype, p.vae_dtype) == (torch.bfloat16, torch.float16, torch.float16)
    assert p.device == torch.device("cuda:0") and p.on_gpu


def test_cpu_policy_is_fp32_and_resident():
    p = choose_policy("cpu")
    assert {p.transformer_dtype, p.encoder_dtype, p.vae_dtype} == {torch.float32}
    assert p.memory == "resident" and not p.on_gpu
    assert choose_policy("cpu", "bfloat16").transformer_dtype == torch.bfloat16  # --dtype: the transformer only


def test_auto_memory_mode_from_free_memory():
    assert choose_policy("cuda", memory="auto", free_bytes=75 * GIB).memory == "resident"
    assert auto_memory_mode(40 * GIB) == "swap"
    assert auto_memory_mode(20 * GIB) == "offload"
    with pytest.raises(MemoryModeError, match="memory mode"):
        choose_policy("cpu", memory="lots")


@pytest.fixture(scope="module")
def resident_render(components, tmp_path_factory):
    return render(make_request(**REQUEST), tmp_path_factory.mktemp("resident") / "v.mp4", components=components, keep_latents=True)


@pytest.mark.parametrize("memory", ["swap", "offload"])
def test_memory_modes_offload_with_the_libraries_and_render_the_same(resident_render, memory, tmp_path):
    c = load_components(str(TINY_CHECKPOINT), "cpu", memory=memory)
    assert c.policy.memory == memory
    assert hasattr(c.text_encoder_2, "_hf_hook") and hasattr(c.vae, "_hf_hook")  # accelerate's cpu_offload_with_hook
    offloaded = c.transformer if memory == "offload" else None
    if offloaded is not None:  # diffusers' group offloading, block by block
        assert getattr(offloaded.transformer_blocks[0], "_diffusers_hook", None) is not None
    result = render(make_request(**REQUEST), tmp_path / "v.mp4", components=c, keep_latents=True)
    assert torch.equal(result.latents, resident_render.latents)


def test_released_hub_id_follows_the_schedule():
    assert transformer_for(TRANSFORMERS["inverted"], "forward") == TRANSFORMERS["forward"]
    assert transformer_for(TRANSFORMERS["forward"], "bidirectional") == TRANSFORMERS["inverted"]
    assert ModelSpec(TRANSFORMERS["inverted"]).for_schedule("forward").model == TRANSFORMERS["forward"]
    assert transformer_for("/models/mine", "forward") == "/models/mine"


def test_folder_schedule_mismatch_is_a_clear_error_unless_forced(tmp_path):
    i2v = tmp_path / "FramePackI2V_HY"  # as huggingface-cli download --local-dir names it
    i2v.mkdir()
    with pytest.raises(ScheduleMismatchError, match="made for inverted / bidirectional, not forward"):
        check_schedule(str(i2v), "forward")
    check_schedule(str(i2v), "forward", force=True)
    declared = tmp_path / "mine"
    declared.mkdir()
    (declared / "fp_ray.json").write_text(json.dumps({"schedules": ["forward"]}))
    with pytest.raises(ScheduleMismatchError, match="FramePackI2V_HY"):
        check_schedule(str(declared), "bidirectional")
    check_schedule(str(tmp_path), "forward")  # nothing declared: nothing to check
    for schedule in ("inverted", "forward", "bidirectional"):  # tiny declares every layout
        check_schedule(str(TINY_CHECKPOINT), schedule)


def section_job(encoded, position: int, tmp_path) -> SectionJob:
    ctx = render_context(encoded, "r", SectionStore(tmp_path / "sections"))
    return SectionJob(Shared(ctx.key, ctx), position, {})


def test_generator_refuses_a_schedule_its_weights_are_not_for(components, tmp_path):
    worker = GeneratorWorker(components=replace(components, spec=ModelSpec(TRANSFORMERS["inverted"])))
    request = make_request(**REQUEST, schedule="forward")
    encoded = encode_request(components, request)
    job = section_job(encoded, 0, tmp_path)
    with pytest.raises(ScheduleMismatchError, match="not forward"):
        next(worker.generate(job))


def test_sources_from_env_and_arguments(monkeypatch):
    monkeypatch.setenv(BASE_ENV, "/models/HunyuanVideo")
    monkeypatch.setenv(IMAGE_ENCODER_ENV, "/models/flux_redux_bfl")
    s = ModelSources.resolve(TRANSFORMERS["inverted"])
    assert (s.base, s.image_encoder) == ("/models/HunyuanVideo", "/models/flux_redux_bfl")
    s = ModelSources.resolve(TRANSFORMERS["inverted"], base="/mirror/base")
    assert s.base == "/mirror/base"


def test_offline_never_asks_the_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(BASE_ENV, str(tmp_path / "no-base"))
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        load_components("lllyasviel/NotCached_HY", "cpu", parts=("transformer",))


def test_section_out_of_memory_names_section_mode_and_memory(components, tmp_path):
    def oom(module, args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    hook = components.transformer.register_forward_pre_hook(oom)
    try:
        request = make_request(**REQUEST)
        encoded = encode_request(components, request)
        job = section_job(encoded, 1, tmp_path)
        with pytest.raises(SectionOutOfMemory, match=r"section 1 ran out of GPU memory .* memory mode resident .*64x48"):
            list(GeneratorWorker(components=components).generate(job))
    finally:
        hook.remove()
