"""Speed options on the tiny checkpoint: exact mode keeps the latents, fast options run and
change what they should, bad options are clear errors."""

from __future__ import annotations

import functools

import pytest
import torch
from diffusers import HunyuanVideoFramepackTransformer3DModel

from fp_ray import SAMPLE_IMAGE, TINY_CHECKPOINT
from fp_ray.cli import main
from fp_ray.encode import encode_request
from fp_ray.generate import noise_stream, section_steps
from fp_ray.models import Components
from fp_ray.request import RequestError, make_request
from fp_ray.speed import SpeedOptionError, SpeedOptions, apply_speed, trim_text

W, H, STEPS = 64, 48, 3


@pytest.fixture(scope="module")
def encoded(components):
    request = make_request(prompt="a red house below the mountains", width=W, height=H, steps=STEPS, seconds=2.4, sampler="euler")
    return encode_request(components, request)


def fresh(components) -> Components:
    """The checkpoint with a transformer of its own, for options that change it in place."""
    transformer = HunyuanVideoFramepackTransformer3DModel.from_pretrained(TINY_CHECKPOINT, subfolder="transformer").eval()
    return Components(**{**components.__dict__, "transformer": transformer})


def section_latents(c: Components, encoded, cache_threshold: float | None = None, position: int | None = None) -> torch.Tensor:
    plan, cond = encoded.plan, encoded.cond
    section = plan.sections[0] if position is None else plan.section(position)
    steps = section_steps(c, plan, section, cond, {}, noise_stream(plan, cond, 7).draw(section.order), sampler="euler", steps=STEPS,
                          guidance=10.0, cache_threshold=cache_threshold)
    return list(steps)[-1][2]


def full_block_runs(c: Components) -> list[int]:
    """Counts the steps in which the last block's own forward ran (the step cache wraps it and
    skips it on a cached step)."""
    runs, block = [], c.transformer.single_transformer_blocks[-1]
    inner = block.forward

    def counted(*args, **kwargs):
        runs.append(1)
        return inner(*args, **kwargs)

    block.forward = counted
    return runs


def test_trim_text_cuts_the_padding_only(encoded):
    text = next(iter(encoded.cond.text.values()))
    n = int(text.mask.sum())
    assert 0 < n < text.mask.shape[1]
    trimmed = trim_text(text)
    assert trimmed.embeds.shape[1] == trimmed.mask.shape[1] == n and bool(trimmed.mask.all())
    assert torch.equal(trimmed.embeds, text.embeds[:, :n]) and trimmed.pooled is text.pooled
    holes = text.mask.clone()
    holes[0, 0] = 0  # not right padding: nothing to cut safely
    assert trim_text(type(text)(text.embeds, holes, text.pooled)).embeds.shape == text.embeds.shape


def test_trimmed_prompt_keeps_the_latents(components, encoded):
    """The transformer on the padded prompt (what the reference passes) against the trimmed one."""
    from fp_ray import generate

    ours = section_latents(components, encoded)
    padded = functools.partial(section_latents, components, encoded)
    original = generate.trim_text
    generate.trim_text = lambda text: text
    try:
        reference = padded()
    finally:
        generate.trim_text = original
    assert ours.std() > 0.1
    assert (ours - reference).abs().max().item() <= 1e-5


def test_step_cache_skips_steps_and_changes_latents_only_when_asked(components, encoded):
    c = fresh(components)
    exact = section_latents(c, encoded)
    runs = full_block_runs(c)
    assert torch.equal(section_latents(c, encoded, cache_threshold=None), exact) and len(runs) == STEPS
    runs.clear()
    cached = section_latents(c, encoded, cache_threshold=1.0)  # the highest threshold skips every step it may
    assert 0 < len(runs) < STEPS
    assert not torch.equal(cached, exact) and torch.isfinite(cached).all()
    assert not c.transformer.is_cache_enabled  # hooks are off again after the section
    runs.clear()
    assert torch.equal(section_latents(c, encoded), exact) and len(runs) == STEPS  # no residual leaks into the next section


def test_mag_cache_skips_the_calibrated_steps_whatever_the_weights(components):
    """MagCache (FramePack-Studio's default) decides from its calibrated ratios alone: at
    threshold 0.1 a 25-step UniPC section of the tiny checkpoint computes 13 of 25 steps in full,
    the same 13 as for any weights, and comes out close to exact; the first block's residual
    plays no part. Each section starts the count afresh."""
    request = make_request(prompt="a red house", width=W, height=H, steps=25, seconds=1.2, sampler="unipc",
                           cache_threshold=0.1, cache_method="mag")
    enc = encode_request(components, request)
    c, plan, cond = fresh(components), enc.plan, enc.cond
    section = plan.sections[0]
    run = lambda threshold, method: list(section_steps(
        c, plan, section, cond, {}, noise_stream(plan, cond, 7).draw(section.order), sampler="unipc", steps=25,
        guidance=10.0, cache_threshold=threshold, cache_method=method))[-1][2]
    runs = full_block_runs(c)
    exact = run(None, "first_block")
    assert len(runs) == 25  # one transformer call per UniPC step: the ratios are indexed by call
    runs.clear()
    cached = run(0.1, "mag")
    assert len(runs) == 13 and not c.transformer.is_cache_enabled
    assert torch.isfinite(cached).all() and 0 < (cached - exact).norm() / exact.norm() < 0.05
    with torch.no_grad():  # other weights, the same steps skipped
        for p in c.transformer.parameters():
            p.mul_(1.5)
    runs.clear()
    run(0.1, "mag")
    assert len(runs) == 13
    runs.clear()
    run(0.01, "mag")  # a lower threshold skips fewer
    assert 13 < len(runs) < 25


def test_cache_method_is_checked_and_left_out_of_old_fingerprints(encoded, monkeypatch):
    import fp_ray.encode

    images = (SAMPLE_IMAGE.read_bytes(), None)
    first = encoded.request.model_copy(update={"cache_threshold": 0.1})
    mag = encoded.request.model_copy(update={"cache_threshold": 0.1, "cache_method": "mag"})
    hashed = []
    monkeypatch.setattr(fp_ray.encode, "fingerprint", lambda text, *a, f=fp_ray.encode.fingerprint: hashed.append(text) or f(text, *a))
    assert fp_ray.encode.request_fingerprint(first, images) != fp_ray.encode.request_fingerprint(mag, images)
    # at its default the field is not hashed: a request fingerprints as before the field existed
    assert '"cache_method"' not in hashed[0] and '"cache_method":"mag"' in hashed[1]
    with pytest.raises(RequestError, match="cache_method: mag needs a cache_threshold"):
        make_request(prompt="x", cache_method="mag")
    with pytest.raises(RequestError, match="cache_method"):
        make_request(prompt="x", cache_threshold=0.1, cache_method="tea")


def test_cli_cache_method_goes_into_the_request(tmp_path):
    from fp_ray.metadata import read_metadata

    out = tmp_path / "v.mp4"
    assert main(["render", "--out", str(out), "--size", "64x48", "--steps", "3", "--seconds", "1.2", "--cache-method", "mag"]) == 0
    request = read_metadata(out)["request"]
    assert (request["cache_method"], request["cache_threshold"]) == ("mag", 0.1)


def test_compiled_blocks_keep_the_latents_and_take_the_cache(components, encoded, monkeypatch):
    # Inductor's C++ build is minutes on a small CPU; the eager backend checks the wiring
    # (every block's forward goes through torch.compile, hooks wrap it) in seconds.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    c = fresh(components)
    exact = section_latents(c, encoded)
    apply_speed(c.transformer, SpeedOptions(compile=True))
    assert all(getattr(b.forward, "_torchdynamo_orig_callable", None) for b in c.transformer.transformer_blocks)
    assert (section_latents(c, encoded) - exact).abs().max().item() <= 1e-5
    runs = full_block_runs(c)
    section_latents(c, encoded, cache_threshold=1.0)
    assert 0 < len(runs) < STEPS


def test_attention_backend_and_option_errors(components, encoded):
    c = fresh(components)
    exact = section_latents(c, encoded)
    apply_speed(c.transformer, SpeedOptions(attention="_native_math"))
    assert (section_latents(c, encoded) - exact).abs().max().item() <= 1e-5
    apply_speed(c.transformer, SpeedOptions(attention="_native_math"))  # the same again: nothing to do
    with pytest.raises(SpeedOptionError, match="already runs with"):
        apply_speed(c.transformer, SpeedOptions(compile=True))
    with pytest.raises(SpeedOptionError, match="unknown attention backend 'warp'"):
        apply_speed(fresh(components).transformer, SpeedOptions(attention="warp"))
    with pytest.raises(SpeedOptionError, match="fp8 needs"):  # torchao missing, or no FP8 GPU here
        apply_speed(fresh(components).transformer, SpeedOptions(fp8=True))
    with pytest.raises(SpeedOptionError, match="unknown speed options"):
        SpeedOptions.from_config({"compile": True, "turbo": 1})
    assert SpeedOptions.from_config({"compile": True}) == SpeedOptions(compile=True)


def test_fp8_quantizes_the_blocks_only_and_keeps_the_process_settings(components, encoded, monkeypatch):
    """FP8 (torchao) run on the CPU past the FP8-GPU checks: the blocks' Linear layers hold
    float8 weights, the embedders and the output projection keep theirs; the process's Inductor
    settings (no autotuning of every kernel) and float32 matmul precision (no TF32) stay as they
    were; the latents stay close to the unquantized model's. Runs where torchao is installed
    (`pip install -c constraints.txt '.[fast]'`): not in the test extra, since importing it
    beside a CPU torch prints its own warnings into every command's output."""
    pytest.importorskip("torchao")
    import torchao.float8.inference
    import torchao.quantization.quant_api
    from torch._inductor import config as inductor

    for module in (torchao.float8.inference, torchao.quantization.quant_api):
        monkeypatch.setattr(module, "_check_hardware_support", lambda *a, **k: None)  # it asserts a CUDA device
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    with pytest.raises(SpeedOptionError, match="fp8 needs the transformer in bfloat16, not torch.float32"):
        apply_speed(fresh(components).transformer, SpeedOptions(fp8=True), torch.device("cuda"))
    c = fresh(components)
    c.transformer.to(torch.bfloat16)
    exact = section_latents(c, encoded)
    settings = lambda: (inductor.coordinate_descent_tuning, inductor.coordinate_descent_check_all_directions,
                        torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)
    before = settings()
    apply_speed(c.transformer, SpeedOptions(fp8=True), torch.device("cuda"))
    assert settings() == before
    kinds = {name: type(m.weight).__name__ for name, m in c.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    in_blocks = {n: k for n, k in kinds.items() if n.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    assert in_blocks and set(in_blocks.values()) == {"Float8Tensor"}
    assert {k for n, k in kinds.items() if n not in in_blocks} == {"Parameter"}  # embedders, norm_out, proj_out
    fp8 = section_latents(c, encoded)
    assert torch.isfinite(fp8).all() and not torch.equal(fp8, exact)
    assert (fp8 - exact).norm() / exact.norm() < 0.1


def test_cache_threshold_is_a_request_field_in_the_fingerprint(encoded):
    from fp_ray.encode import request_fingerprint

    fast = encoded.request.model_copy(update={"cache_threshold": 0.1})
    images = (SAMPLE_IMAGE.read_bytes(), None)
    assert request_fingerprint(fast, images) != request_fingerprint(encoded.request, images)


@pytest.mark.parametrize(
    "args,message",
    [(["--cache-threshold", "5"], "cache_threshold: Input should be less than or equal to 1"),
     (["--fp8"], "fp8 needs"),
     (["--fast", "--dtype", "fp16"], "--fp8 / --fast need the bf16 transformer, not --dtype fp16"),
     (["--attention", "warp"], "unknown attention backend"),
     (["--attention", "_native_cudnn"], "needs a GPU")],
)
def test_cli_speed_flags_fail_clearly(tmp_path, capsys, args, message):
    out = tmp_path / "v.mp4"
    assert main(["render", "--out", str(out), "--size", "64x48", "--steps", "1", "--seconds", "1.2", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fp-ray: error:") and message in err[-1]
    assert not out.exists()


def test_ray_render_checks_speed_options_before_ray_starts(tmp_path, capsys, monkeypatch):
    import fp_ray.cli

    def no_ray(address):
        raise AssertionError("Ray was started before the options were checked")

    monkeypatch.setattr(fp_ray.cli, "connect", no_ray)
    out = tmp_path / "v.mp4"
    assert main(["render", "--ray", "--out", str(out), "--size", "64x48", "--seconds", "1.2", "--attention", "warp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown attention backend 'warp'" in err[0]


def test_an_attention_backend_stays_with_its_model(components, encoded):
    """diffusers makes a backend set on one model the process-wide default; fp-ray keeps it to
    that model, so the other models of the process (the shared generator here) are unchanged."""
    exact = section_latents(components, encoded)
    apply_speed(fresh(components).transformer, SpeedOptions(attention="_native_math"))
    assert torch.equal(section_latents(components, encoded), exact)
