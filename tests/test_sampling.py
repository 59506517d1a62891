"""Real classifier-free guidance in the sampler on the tiny checkpoint: cfg 1 is the single pass
it always was, cfg > 1 is the official demo's fm_wrapper (two passes, combine, rescale), and
the step cache keeps the two passes apart."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import FirstBlockCacheConfig, FlowMatchEulerDiscreteScheduler

from fp_ray.encode import encode_request
from fp_ray.generate import gather_context, noise_stream, section_steps
from fp_ray.request import make_request
from fp_ray.sampling import section_mu, transformer_inputs
from fp_ray.speed import trim_text
from fp_ray.unipc import flow_sigmas, sample as unipc_sample

STEPS, NEGATIVE = 4, "blurry, static, low quality"


def section_inputs(c, request):
    """(encoded, section, noise, positive inputs, negative inputs or None) of the first section."""
    encoded = encode_request(c, request)
    section, cond = encoded.plan.sections[0], encoded.cond
    noise = noise_stream(encoded.plan, cond, request.seed).draw(section.order)
    context = gather_context(section, cond, {})
    fixed = transformer_inputs(c.transformer, trim_text(cond.text[section.prompt]), cond.image_embeds, context, request.guidance)
    negative = None
    if cond.negative is not None:
        negative = transformer_inputs(c.transformer, trim_text(cond.negative), cond.image_embeds, context, request.guidance)
    return encoded, section, noise, fixed, negative


def ours(c, encoded, section, noise, cache_threshold=None):
    r = encoded.request
    run = section_steps(c, encoded.plan, section, encoded.cond, {}, noise, sampler=r.sampler, steps=r.steps, guidance=r.guidance,
                        cache_threshold=cache_threshold, cfg=r.cfg, cfg_rescale=r.cfg_rescale)
    return list(run)[-1][2]


def counted_passes(transformer) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls: list[int] = []
    return calls, transformer.register_forward_pre_hook(lambda module, args: calls.append(1))


def official_x0(positive, negative, x, sigma, cfg, rescale):
    """The official demo's fm_wrapper after the transformer calls, written from its source:
    cfg == 1 never reads the negative; rescale 0 returns the guided prediction as it is."""
    pred_negative = torch.zeros_like(positive) if cfg == 1.0 else negative
    pred = pred_negative + cfg * (positive - pred_negative)
    if rescale != 0:
        dims = list(range(1, positive.ndim))
        rescaled = pred * (positive.std(dim=dims, keepdim=True) / pred.std(dim=dims, keepdim=True))
        pred = rescale * rescaled + (1.0 - rescale) * pred
    return x.float() - pred * sigma


@pytest.mark.parametrize("sampler", ["unipc", "euler"])
def test_cfg_1_is_one_pass_per_step_with_the_latents_of_before(components, sampler):
    """cfg 1 (the default) encodes no negative prompt and runs the transformer once per step,
    exactly as the sampler ran before guidance existed: the same latents, bit for bit."""
    c = components
    request = make_request(prompt="a red house", width=64, height=48, steps=STEPS, seconds=1.2, sampler=sampler)
    encoded, section, noise, fixed, negative = section_inputs(c, request)
    assert encoded.cond.negative is None and negative is None
    calls, hook = counted_passes(c.transformer)
    try:
        latents = ours(c, encoded, section, noise)
    finally:
        hook.remove()
    assert len(calls) == STEPS

    t = c.transformer
    mu = section_mu(t, c.scheduler_config, noise.shape)
    with torch.no_grad():
        if sampler == "unipc":
            def model(x, sigma):
                x = x.to(t.dtype)
                v = t(hidden_states=x, timestep=(sigma * 1000.0).to(t.dtype), **fixed)[0]
                return x.float() - v.float() * sigma.float()
            *_, before = unipc_sample(model, noise.clone(), flow_sigmas(STEPS, mu))
        else:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(c.scheduler_config)
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, STEPS + 1)[:-1], mu=mu)
            before = noise.clone()
            for step in scheduler.timesteps:
                v = t(hidden_states=before.to(t.dtype), timestep=step.expand(1), **fixed)[0]
                before = scheduler.step(v.float(), step, before, return_dict=False)[0]
    assert torch.equal(latents, before)


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_real_cfg_is_the_official_wrapper(components, rescale):
    """unipc at cfg 3 against the demo's fm_wrapper around the same UniPC walk: two passes per
    step, and the rescale moves the result."""
    c, cfg = components, 3.0
    request = make_request(prompt="a red house", width=64, height=48, steps=STEPS, seconds=1.2, cfg=cfg,
                           negative_prompt=NEGATIVE, cfg_rescale=rescale)
    encoded, section, noise, fixed, negative = section_inputs(c, request)
    calls, hook = counted_passes(c.transformer)
    try:
        latents = ours(c, encoded, section, noise)
    finally:
        hook.remove()
    assert len(calls) == 2 * STEPS

    t = c.transformer

    def model(x, sigma):
        x = x.to(t.dtype)
        timestep = (sigma * 1000.0).to(t.dtype)
        positive = t(hidden_states=x, timestep=timestep, **fixed)[0].float()
        negative_v = t(hidden_states=x, timestep=timestep, **negative)[0].float()
        return official_x0(positive, negative_v, x, sigma.float(), cfg, rescale)

    with torch.no_grad():
        *_, reference = unipc_sample(model, noise.clone(), flow_sigmas(STEPS, section_mu(t, c.scheduler_config, noise.shape)))
    assert (latents - reference).abs().max().item() <= 1e-6
    unguided = make_request(prompt="a red house", width=64, height=48, steps=STEPS, seconds=1.2)
    assert (ours(c, encode_request(c, unguided), section, noise) - latents).abs().max().item() > 1e-2
    if rescale:
        plain = encode_request(c, request.model_copy(update={"cfg_rescale": 0.0}))
        assert (ours(c, plain, section, noise) - latents).abs().max().item() > 1e-4


def test_step_cache_keeps_the_positive_and_negative_passes_apart(components):
    """With the step cache on, a guided section equals two independently cached models, one
    per prompt: the negative pass neither reuses nor is compared with the positive one."""
    c, cfg, threshold = components, 4.0, 0.5
    request = make_request(prompt="a red house", width=64, height=48, steps=6, seconds=1.2, cfg=cfg, negative_prompt=NEGATIVE)
    encoded, section, noise, fixed, negative = section_inputs(c, request)
    cached = ours(c, encoded, section, noise, cache_threshold=threshold)
    assert not c.transformer.is_cache_enabled
    exact = ours(c, encoded, section, noise)
    assert (cached - exact).abs().max().item() > 1e-4  # the cache skipped work

    copies = [copy.deepcopy(c.transformer) for _ in range(2)]
    for t in copies:
        t.enable_cache(FirstBlockCacheConfig(threshold=threshold))

    def model(x, sigma):
        x = x.to(c.transformer.dtype)
        timestep = (sigma * 1000.0).to(c.transformer.dtype)
        predictions = []
        for t, inputs in zip(copies, (fixed, negative)):
            with t.cache_context("only"):
                predictions.append(t(hidden_states=x, timestep=timestep, **inputs)[0].float())
        return official_x0(*predictions, x, sigma.float(), cfg, 0.0)

    with torch.no_grad():
        *_, reference = unipc_sample(model, noise.clone(), flow_sigmas(6, section_mu(c.transformer, c.scheduler_config, noise.shape)))
    assert torch.equal(cached, reference)


def test_the_negative_prompt_is_encoded_once_per_render(components, monkeypatch):
    from fp_ray import encode

    c, encoded_texts = components, []
    original = encode.encode_prompt
    monkeypatch.setattr(encode, "encode_prompt", lambda c, text: encoded_texts.append(text) or original(c, text))
    request = make_request(prompt="0s: a calm lake; 2s: a storm", width=64, height=48, steps=1, seconds=3.6, cfg=2.0,
                           negative_prompt=NEGATIVE)
    cond = encode_request(c, request).cond
    assert sorted(encoded_texts) == sorted(["a calm lake", "a storm", NEGATIVE])
    assert set(cond.text) == {"a calm lake", "a storm"}  # the negative is not a section prompt
    assert torch.equal(cond.negative.embeds, original(c, NEGATIVE).embeds)
    encoded_texts.clear()
    same = encode_request(c, request.model_copy(update={"negative_prompt": "a storm"})).cond
    assert sorted(encoded_texts) == ["a calm lake", "a storm"]  # a prompt already encoded is not encoded again
    assert torch.equal(same.negative.embeds, same.text["a storm"].embeds)
    encoded_texts.clear()
    assert encode_request(c, request.model_copy(update={"cfg": 1.0, "negative_prompt": ""})).cond.negative is None
    assert sorted(encoded_texts) == ["a calm lake", "a storm"]  # cfg 1: no negative prompt to encode
