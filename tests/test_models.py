from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_script_rebuilds_the_shipped_checkpoint(tmp_path):
    out = tmp_path / "tiny"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_checkpoint.py"), str(out)], check=True, capture_output=True)
    shipped = sorted(p.relative_to(TINY_CHECKPOINT) for p in TINY_CHECKPOINT.rglob("*") if p.is_file())
    rebuilt = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert shipped == rebuilt
    _, mismatch, errors = filecmp.cmpfiles(TINY_CHECKPOINT, out, [str(p) for p in shipped], shallow=False)
    assert not mismatch and not errors
