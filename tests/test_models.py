from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fp_ray import TINY_CHECKPOINT
from fp_ray.models import BASE_MODEL, IMAGE_ENCODER_MODEL, ModelNotFoundError, ModelSources, default_resolution, load_components

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_folder_carries_every_component():
    s = ModelSources.resolve(str(TINY_CHECKPOINT))
    assert s.transformer == (str(TINY_CHECKPOINT), "transformer")
    assert s.base == s.image_encoder == str(TINY_CHECKPOINT)


def test_transformer_folder_or_hub_id_takes_the_rest_from_the_base_repos(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert ModelSources.resolve(str(tmp_path)) == ModelSources((str(tmp_path), None), BASE_MODEL, IMAGE_ENCODER_MODEL)
    hub = ModelSources.resolve("lllyasviel/FramePackI2V_HY")  # resolved, not downloaded
    assert hub.transformer == ("lllyasviel/FramePackI2V_HY", None) and hub.base == BASE_MODEL


@pytest.mark.parametrize("model", ["/no/such/folder", "./missing", "not-a-repo-id"])
def test_missing_model_is_a_clear_error(model):
    with pytest.raises(ModelNotFoundError, match="model folder not found"):
        ModelSources.resolve(model)


def test_broken_folder_names_the_component(tmp_path):
    (tmp_path / "transformer").mkdir()
    with pytest.raises(ModelNotFoundError, match="HunyuanVideoFramepackTransformer3DModel"):
        load_components(str(tmp_path))


def test_default_resolution():
    assert default_resolution(str(TINY_CHECKPOINT)) == 160
    assert default_resolution("lllyasviel/FramePackI2V_HY") == 640


def test_dtype_option():
    c = load_components(str(TINY_CHECKPOINT), "cpu", "bfloat16")
    assert c.transformer.dtype == torch.bfloat16 and c.vae.dtype == torch.float32
    assert c.vae.use_tiling


# What a library writes about itself, not about the checkpoint: the version that wrote a
# config changes with every upgrade and decides nothing about the model.
WRITER_STAMPS = {"transformers_version", "_diffusers_version"}


def checkpoint_content(path: Path):
    """What a checkpoint file means: tensors for weights, JSON values less the writers'
    version stamps for configs and tokenizers, raw bytes for anything else."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return {k: v for k, v in data.items() if k not in WRITER_STAMPS} if isinstance(data, dict) else data
    return path.read_bytes()


def same_content(a, b) -> bool:
    if isinstance(a, tuple):
        (meta_a, tensors_a), (meta_b, tensors_b) = a, b
        return meta_a == meta_b and tensors_a.keys() == tensors_b.keys() and all(
            tensors_a[k].dtype == tensors_b[k].dtype and torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a
        )
    return a == b


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    out = tmp_path_factory.mktemp("rebuilt") / "tiny"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_checkpoint.py"), str(out)], check=True, capture_output=True)
    return out


def test_script_rebuilds_the_shipped_checkpoint(rebuilt):
    shipped = sorted(p.relative_to(TINY_CHECKPOINT) for p in TINY_CHECKPOINT.rglob("*") if p.is_file())
    assert shipped == sorted(p.relative_to(rebuilt) for p in rebuilt.rglob("*") if p.is_file())
    differ = [str(p) for p in shipped if not same_content(checkpoint_content(TINY_CHECKPOINT / p), checkpoint_content(rebuilt / p))]
    assert not differ, f"rebuilt files differ from the shipped ones: {differ}"


@pytest.mark.parametrize("change", ["weight", "config", "tokenizer"])
def test_checkpoint_comparison_sees_real_changes(rebuilt, tmp_path, change):
    """The comparison ignores version stamps only: a changed weight, config value or
    tokenizer entry still fails it."""
    copy = tmp_path / "tiny"
    shutil.copytree(rebuilt, copy)
    if change == "weight":
        target = copy / "vae" / "diffusion_pytorch_model.safetensors"
        meta, tensors = checkpoint_content(target)
        name = next(iter(tensors))
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] += 1e-3
        save_file(tensors, str(target), metadata=meta)
    elif change == "config":
        target = copy / "transformer" / "config.json"
        config = json.loads(target.read_text())
        config["num_layers"] += 1
        target.write_text(json.dumps(config))
    else:
        target = copy / "tokenizer_2" / "tokenizer.json"
        tokenizer = json.loads(target.read_text())
        vocab = tokenizer["model"]["vocab"]
        first = next(iter(vocab))
        vocab[first] = vocab[first] + 10_000
        target.write_text(json.dumps(tokenizer))
    assert not same_content(checkpoint_content(rebuilt / target.relative_to(copy)), checkpoint_content(target))


def test_version_stamps_alone_do_not_count(rebuilt, tmp_path):
    target = tmp_path / "config.json"
    config = json.loads((rebuilt / "text_encoder" / "config.json").read_text())
    target.write_text(json.dumps({**config, "transformers_version": "99.0.0"}))
    assert same_content(checkpoint_content(rebuilt / "text_encoder" / "config.json"), checkpoint_content(target))
