"""The official FramePack demo's sampler: UniPC (variant bh1) for flow matching.

Differences from diffusers' `UniPCMultistepScheduler` that change the latents: the
log-SNR is lambda = -log(sigma) (not log(alpha/sigma)), the model is asked for the clean
sample x0 = x - sigma * v, the order is min(3, steps - 1) and is never lowered on the last
steps, and the walk stops at the last non-zero sigma, returning the model's x0 there.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

MAX_ORDER = 3

X0Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma of shape (1,)) -> x0


def flow_sigmas(steps: int, mu: float) -> torch.Tensor:
    """steps + 1 sigmas from 1 to 0, shifted by exp(mu) as Flux: e / (e + 1/t - 1), computed
    in float32 in this very form as the official demo does (t = 0 gives 1/0 = inf, sigma 0):
    the sampler is sensitive to the last bit of its sigmas."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    shift = math.exp(mu)
    return shift / (shift + (1.0 / t - 1.0))


def _coefficients(lambdas: list[torch.Tensor], lambda_t: torch.Tensor, order: int) -> tuple:
    """h, the ratios r_k of the earlier steps' log-SNR gaps to h, and the bh1 predictor /
    corrector weights (solutions of R rho = b, with R_ik = r_k^(i-1))."""
    h = lambda_t - lambdas[-1]
    rks = [(lambdas[-(k + 1)] - lambdas[-1]) / h for k in range(1, order)] + [torch.ones_like(h)]
    hh = -h
    phi = torch.expm1(hh) / hh - 1.0  # h_phi_k, k = 1
    b, factorial = [], 1
    for i in range(1, order + 1):
        b.append(phi * factorial / hh)  # bh1: B(h) = -h
        factorial *= i + 1
        phi = phi / hh - 1.0 / factorial
    r = torch.stack(rks)
    R = torch.stack([r ** (i - 1) for i in range(1, order + 1)])
    b = torch.stack(b)
    rhos_p = None
    if order == 2:
        rhos_p = torch.tensor([0.5])
    elif order > 2:
        rhos_p = torch.linalg.solve(R[:-1, :-1], b[:-1])
    rhos_c = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(R, b)
    return h, rks[:-1], rhos_p, rhos_c


def sample(model: X0Model, x: torch.Tensor, sigmas: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yield the latents after each of the len(sigmas) - 1 steps; the last one is the
    model's x0 at the last non-zero sigma (the sample). x: float32; sigmas: float32 (N + 1,)."""
    steps = len(sigmas) - 1
    order = min(MAX_ORDER, steps - 1)
    sigmas = sigmas.to(x.device)
    lambdas = -torch.log(sigmas[:-1])  # log-SNR of every sigma a model is evaluated at
    model_prev = [model(x, sigmas[0:1])]
    yield model_prev[0] if steps == 1 else x
    for i in range(1, steps):
        p = min(i, order)  # warm-up uses the history there is; never lowered at the end
        history = model_prev[-p:]
        h, rks, rhos_p, rhos_c = _coefficients([lambdas[j] for j in range(i - p, i)], lambdas[i], p)
        m0 = history[-1]
        B_h = -h
        diffs = [(history[-(k + 1)] - m0) / rk for k, rk in enumerate(rks, start=1)]
        x_base = (sigmas[i] / sigmas[i - 1]) * x - torch.expm1(-h) * m0
        predicted, correction = x_base, 0
        rhos_c = rhos_c.to(x.device)
        if diffs:
            # Weighted sums as the demo forms them, one tensordot over the stacked differences:
            # term by term they round otherwise (1e-6 apart after a few steps).
            stacked = torch.stack(diffs, dim=1)
            predicted = x_base - B_h * torch.tensordot(stacked, rhos_p.to(x.device), dims=([1], [0]))
            correction = torch.tensordot(stacked, rhos_c[:-1], dims=([1], [0]))
        m_t = model(predicted, sigmas[i : i + 1])
        x = x_base - B_h * (correction + rhos_c[-1] * (m_t - m0))
        model_prev = (model_prev + [m_t])[-order:]
        yield x if i < steps - 1 else m_t
