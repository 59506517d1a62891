"""LoRAs on a resident generator: made here with PEFT on the tiny transformer, saved with
diffusers' helper, loaded by fp-ray; requests with different LoRAs back to back on one
transformer each get the latents they get alone, bit for bit."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import pytest
import torch
from diffusers import HunyuanVideoFramepackTransformer3DModel
from diffusers.loaders.lora_pipeline import HunyuanVideoLoraLoaderMixin

from fp_ray import SAMPLE_IMAGE, TINY_CHECKPOINT
from fp_ray.cli import main
from fp_ray.encode import encode_request, request_fingerprint
from fp_ray.generate import noise_stream, section_steps
from fp_ray.lora import LoadedAdapters, LoraError, LoraRegistry, adapters_of
from fp_ray.models import Components
from fp_ray.request import LoraChoice, RequestError, make_request
from fp_ray.speed import SpeedOptions, apply_speed

W, H, STEPS = 64, 48, 2
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
MLP = ["proj_mlp", "proj_out", "ff.net.2", "ff_context.net.2"]


def tiny_transformer() -> HunyuanVideoFramepackTransformer3DModel:
    return HunyuanVideoFramepackTransformer3DModel.from_pretrained(TINY_CHECKPOINT, subfolder="transformer").eval()


def make_lora(folder: Path, seed: int, targets: list[str], alpha: int = 8) -> Path:
    """A LoRA of rank 4 on `targets` with random non-zero B (PEFT starts B at zero), saved as
    diffusers saves one (`transformer.`-prefixed keys, PEFT config in the metadata)."""
    from peft import LoraConfig, get_peft_model_state_dict

    transformer = tiny_transformer()
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=alpha, target_modules=targets), adapter_name="made")
    generator = torch.Generator().manual_seed(seed)
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=generator) * 0.2
    HunyuanVideoLoraLoaderMixin.save_lora_weights(
        folder, transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name="made"),
        transformer_lora_adapter_metadata=transformer.peft_config["made"].to_dict())
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {name: make_lora(root / name, seed, targets)
            for name, seed, targets in (("attn", 1, ATTENTION), ("mlp", 2, MLP), ("both", 3, ATTENTION + MLP))}


@pytest.fixture(scope="module")
def encoded(components):
    request = make_request(prompt="a red house below the mountains", width=W, height=H, steps=STEPS, seconds=1.2, sampler="euler")
    return encode_request(components, request)


def own(components) -> Components:
    """The checkpoint with a transformer of its own (adapters change it in place)."""
    return Components(**{**components.__dict__, "transformer": tiny_transformer()})


def latents(c: Components, encoded, *weights: tuple[Path, float]) -> torch.Tensor:
    plan, cond = encoded.plan, encoded.cond
    section = plan.sections[0]
    files = LoraRegistry().resolve([LoraChoice(name=str(path), weight=w) for path, w in weights])
    steps = section_steps(c, plan, section, cond, {}, noise_stream(plan, cond, 7).draw(section.order), sampler="euler",
                          steps=STEPS, guidance=10.0, loras=files)
    return list(steps)[-1][2]


def test_requests_with_different_loras_back_to_back_each_get_their_own_latents(components, encoded, loras):
    c = own(components)
    base = latents(c, encoded)
    first = latents(c, encoded, (loras["attn"], 0.8))
    second = latents(c, encoded, (loras["mlp"], 1.0), (loras["attn"], 0.5))
    after = latents(c, encoded)
    again = latents(c, encoded, (loras["attn"], 0.8))
    assert not torch.equal(first, base) and not torch.equal(second, base) and not torch.equal(first, second)
    assert torch.equal(after, base)  # no LoRA right after LoRA requests: exactly the base output
    assert torch.equal(again, first)
    # each alone, on a transformer that never saw another adapter: the same bits
    assert torch.equal(latents(own(components), encoded, (loras["attn"], 0.8)), first)
    assert torch.equal(latents(own(components), encoded, (loras["mlp"], 1.0), (loras["attn"], 0.5)), second)
    assert not torch.equal(latents(c, encoded, (loras["attn"], 0.4)), first)  # the weight counts
    assert set(c.transformer.peft_config) == {f"lora_{n[:16]}" for n in adapters_of(c.transformer).loaded}


def test_adapters_are_loaded_once_and_the_least_recently_used_deleted(components, encoded, loras, monkeypatch):
    c = own(components)
    adapters = adapters_of(c.transformer)
    adapters.size = 2
    alone = latents(own(components), encoded, (loras["attn"], 1.0))
    loads = []
    load = LoadedAdapters._load
    monkeypatch.setattr(LoadedAdapters, "_load", lambda self, f: (loads.append(f.name), load(self, f)))
    latents(c, encoded, (loras["attn"], 1.0))
    latents(c, encoded, (loras["attn"], 0.5))  # already loaded: only its weight changes
    assert len(loads) == 1
    latents(c, encoded, (loras["mlp"], 1.0))
    latents(c, encoded, (loras["both"], 1.0))  # a third: the least recently used (attn) goes
    first = LoraRegistry().resolve([LoraChoice(name=str(loras["attn"]))])[0].adapter
    assert len(c.transformer.peft_config) == 2 and len(loads) == 3 and first not in c.transformer.peft_config
    assert torch.equal(latents(c, encoded, (loras["attn"], 1.0)), alone)  # loaded again, the same adapter
    assert len(loads) == 4 and len(c.transformer.peft_config) == 2


def test_compiled_blocks_with_loras_match_eager(components, encoded, loras, monkeypatch):
    # As in test_speed: the eager backend checks dynamo's tracing of PEFT's layers in seconds.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    c = own(components)
    base, eager, mlp = latents(c, encoded), latents(c, encoded, (loras["both"], 0.7)), latents(c, encoded, (loras["mlp"], 1.0))
    apply_speed(c.transformer, SpeedOptions(compile=True))
    try:
        assert (latents(c, encoded, (loras["both"], 0.7)) - eager).abs().max().item() <= 1e-5
        assert (latents(c, encoded) - base).abs().max().item() <= 1e-5
        assert (latents(c, encoded, (loras["mlp"], 1.0)) - mlp).abs().max().item() <= 1e-5
    finally:
        torch._dynamo.reset()  # the graphs traced through PEFT's layers stay with this test


def test_fp8_generators_refuse_loras(components, encoded, loras):
    c = own(components)
    c.transformer._fp_ray_speed = SpeedOptions(fp8=True)  # what apply_speed records (FP8 itself needs a GPU)
    with pytest.raises(LoraError, match="FP8"):
        latents(c, encoded, (loras["attn"], 1.0))
    assert not hasattr(c.transformer, "peft_config")


def test_fingerprint_holds_lora_bytes_and_weights_not_names(encoded, loras, tmp_path):
    images = (SAMPLE_IMAGE.read_bytes(), None)
    request = encoded.request

    def fp(path: Path, weight: float) -> str:
        with_lora = request.model_copy(update={"loras": (LoraChoice(name=str(path), weight=weight),)})
        return request_fingerprint(with_lora, images, LoraRegistry().resolve(with_lora.loras))

    copy = tmp_path / "renamed.safetensors"
    copy.write_bytes(loras["attn"].read_bytes())
    assert fp(loras["attn"], 0.8) == fp(copy, 0.8)  # where it lives does not matter
    assert fp(loras["attn"], 0.8) != fp(loras["attn"], 0.9)
    assert fp(loras["attn"], 0.8) != fp(loras["mlp"], 0.8)
    assert fp(loras["attn"], 0.8) != request_fingerprint(request, images)
    copy.write_bytes(loras["mlp"].read_bytes())  # the same name, other bytes
    assert fp(copy, 0.8) == fp(loras["mlp"], 0.8)
    with pytest.raises(ValueError, match="all 1 LoRAs"):  # never a LoRA request under a plain fingerprint
        request_fingerprint(request.model_copy(update={"loras": (LoraChoice(name="x"),)}), images)


def test_lora_text_and_registry(loras, tmp_path, monkeypatch):
    r = make_request(prompt="x", loras=f"{loras['attn']}:0.8, owner/repo, C:\\style.safetensors:-0.5")
    assert [(c.name, c.weight) for c in r.loras] == [(str(loras["attn"]), 0.8), ("owner/repo", 1.0), ("C:\\style.safetensors", -0.5)]
    for bad, message in [("a, a:0.5", "each LoRA once"), ("a:9", "less than or equal to 4"), ("a,b,c,d,e", "at most 4")]:
        with pytest.raises(RequestError, match=message):
            make_request(prompt="x", loras=bad)
    folder = LoraRegistry().resolve([LoraChoice(name=str(loras["attn"].parent))])[0]  # a folder: its one file
    assert folder.location == str(loras["attn"])
    with pytest.raises(LoraError, match="no such file or folder"):
        LoraRegistry().resolve([LoraChoice(name=str(tmp_path / "missing.safetensors"))])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for hub_id in ("fp-ray-test/no-such-lora", "fp-ray-test/no-such-lora/style.safetensors"):
        with pytest.raises(LoraError, match="not found as a hub id .HF_HUB_OFFLINE is set"):
            LoraRegistry().resolve([LoraChoice(name=hub_id)])
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(LoraError, match="not a readable safetensors file"):
        LoraRegistry().resolve([LoraChoice(name=str(tmp_path / "junk.safetensors"))])
    with pytest.raises(LoraError, match="same file"):
        LoraRegistry().resolve([LoraChoice(name=str(loras["attn"])), LoraChoice(name=str(loras["attn"].parent))])
    served = LoraRegistry.from_config({"style": str(loras["attn"])})
    assert served.resolve([LoraChoice(name="style", weight=0.5)])[0].location == str(loras["attn"])
    with pytest.raises(LoraError, match="unknown LoRA '/etc/passwd'; this server offers: style"):
        served.resolve([LoraChoice(name="/etc/passwd")])  # a path is never read from a request
    with pytest.raises(LoraError, match="'gone': the server cannot read its file") as error:
        LoraRegistry.from_config({"gone": "/srv/private/gone.safetensors"}).resolve([LoraChoice(name="gone")])
    assert "/srv" not in str(error.value)  # a server's paths stay in its log
    assert LoraRegistry.from_config("a=/x.safetensors, b=owner/repo").locations == {"a": "/x.safetensors", "b": "owner/repo"}
    with pytest.raises(LoraError, match="names must be"):
        LoraRegistry.from_config({"../x": "/x.safetensors"})


def test_cli_lora_errors_are_one_line(tmp_path, capsys, loras):
    out = tmp_path / "v.mp4"
    common = ["render", "--out", str(out), "--size", "64x48", "--steps", "1", "--seconds", "1.2"]
    for args, message in [(["--lora", str(tmp_path / "gone.safetensors:0.5")], "no such file or folder"),
                          (["--lora", f"{loras['attn']}:0.5", "--fp8"], "--lora"),
                          (["--lora", f"{loras['attn']}:7"], "less than or equal to 4")]:
        assert main([*common, *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fp-ray: error:") and message in err[0], err
    assert not out.exists()


def test_serve_app_refuses_fp8_generators_with_loras(loras):
    from serving.app import build_app

    with pytest.raises(LoraError, match="fp8"):
        build_app({"loras": {"style": str(loras["attn"])}, "speed": {"fp8": True}})
    with pytest.raises(LoraError, match="expected name=location"):
        build_app({"loras": "style"})


def test_video_records_its_loras_hashes_and_from_notes_a_changed_file(tmp_path, capsys, loras):
    import json
    import shutil

    lora = tmp_path / "style.safetensors"
    shutil.copy(loras["attn"], lora)
    out = tmp_path / "v.mp4"
    assert main(["render", "--out", str(out), "--size", "64x48", "--steps", "1", "--seconds", "1.2", "--lora", f"{lora}:0.5"]) == 0
    record = json.loads((tmp_path / "v.mp4.json").read_text())
    assert record["loras"] == [{"name": str(lora), "weight": 0.5, "sha256": hashlib.sha256(lora.read_bytes()).hexdigest()}]
    capsys.readouterr()
    assert main(["render", "--from", str(out), "--out", str(tmp_path / "same.mp4")]) == 0
    assert "LoRA" not in capsys.readouterr().err
    shutil.copy(loras["mlp"], lora)  # the same path, another file
    assert main(["render", "--from", str(out), "--out", str(tmp_path / "other.mp4")]) == 0
    assert f"LoRA {lora} is not the file recorded" in capsys.readouterr().err


def test_a_weight_that_is_no_plain_number_is_named_as_such():
    for text in ("x:nan", "x:1e999", "x:-inf"):
        with pytest.raises(RequestError, match="a weight is a plain number such as 0.8"):
            make_request(prompt="p", loras=text)
