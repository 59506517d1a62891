"""`unipc` against an independent implementation of the official demo's FlowMatch UniPC
(bh1, lambda = -log sigma, order min(3, steps - 1), no order lowering at the end), written
here, on the tiny checkpoint's real section inputs."""

from __future__ import annotations

import math

import pytest
import torch

from fp_ray.encode import encode_request
from fp_ray.generate import gather_context, noise_stream
from fp_ray.request import make_request
from fp_ray.sampling import denoise, section_mu, transformer_inputs, x0_prediction


def official_sigmas(steps: int, mu: float) -> torch.Tensor:
    """The demo's flux_time_shift on its float32 grid."""
    t = torch.linspace(1, 0, steps + 1)
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def reference_unipc(model, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Multistep predictor-corrector on x0 predictions, coefficients as float32 tensors:
    the latents are sensitive to the last bit of them (float64 coefficients move the
    25-step result by ~4e-5), so the precision is the demo's."""
    n = len(sigmas) - 1
    order = min(3, n - 1)
    lam = -torch.log(sigmas[:-1])
    ms = [model(x, sigmas[0:1])]
    for i in range(1, n):
        p = min(i, order)
        h = lam[i] - lam[i - 1]
        hh = -h
        r = torch.stack([(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, p)] + [torch.tensor(1.0)])
        # phi_k(-h) recursion of UniPC with B(h) = -h (bh1)
        b, phi, fact = [], torch.expm1(hh) / hh - 1, 1
        for k in range(1, p + 1):
            b.append(phi * fact / hh)
            fact *= k + 1
            phi = phi / hh - 1 / fact
        b = torch.stack(b)
        R = torch.stack([torch.ones_like(r)] + [r**k for k in range(1, p)])  # row k: r ** k
        m0 = ms[-1]
        D = [(ms[-1 - k] - m0) / r[k - 1] for k in range(1, p)]
        base = sigmas[i] / sigmas[i - 1] * x - torch.expm1(hh) * m0
        if p == 1:
            pred, rho_c = base, torch.tensor([0.5])
        else:
            rho_p = torch.tensor([0.5]) if p == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
            pred = base + h * sum(c * d for c, d in zip(rho_p, D))
            rho_c = torch.linalg.solve(R, b)
        m = model(pred, sigmas[i : i + 1])
        x = base + h * (sum((c * d for c, d in zip(rho_c[:-1], D)), torch.zeros_like(x)) + rho_c[-1] * (m - m0))
        ms = (ms + [m])[-order:]
    return ms[-1]


@pytest.mark.parametrize("steps", [25, 4])
def test_unipc_matches_the_official_algorithm(components, steps):
    c = components
    request = make_request(prompt="a lake", width=64, height=48, seconds=1.2, steps=steps, sampler="unipc")
    encoded = encode_request(c, request)
    section = encoded.plan.section(0)
    cond = encoded.cond
    context = gather_context(section, cond, {})
    noise = noise_stream(encoded.plan, cond, request.seed).draw(section.order)
    text = cond.text[section.prompt]
    *_, (step, total, ours) = denoise(c.transformer, c.scheduler_config, "unipc", steps, request.guidance, noise, text,
                                     cond.image_embeds, context)
    assert step == total == steps

    inputs = transformer_inputs(c.transformer, text, cond.image_embeds, context, request.guidance)
    sigmas = official_sigmas(steps, section_mu(c.transformer, c.scheduler_config, noise.shape))

    def model(x, sigma):
        return x0_prediction(c.transformer, inputs, x, sigma)

    with torch.no_grad():
        ref = reference_unipc(model, noise.clone(), sigmas)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-5
    # the comparison can fail: a first-order walk (Euler on x0) lands measurably elsewhere
    with torch.no_grad():
        x = noise.clone()
        for i in range(steps - 1):
            m = model(x, sigmas[i : i + 1])
            x = m + (sigmas[i + 1] / sigmas[i]) * (x - m)
        euler = model(x, sigmas[steps - 1 : steps])
    assert (euler - ref).abs().max().item() > 1e-3
