"""The variational bound on -log p_theta(x_0) (Ho et al. eq. 5), in bits per dimension.

    L = L_T + sum_{t=2}^{T} L_{t-1} + L_0
      = KL(q(x_T|x_0) || N(0,I)) + sum_t KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) - log p(x_0|x_1)

Each L_{t-1} is estimated with one draw x_t ~ q(x_t | x_0) per image. With ``num_eval_steps = K < T``
the sum is estimated by stratified sampling: {0} (the decoder L_0) is a stratum of its own, and steps
1..T-1 are cut into strata of geometrically growing size (the terms fall off roughly like 1/t, so the
first steps get strata of their own). Each stratum gets two independent draws of (step, noise), for
each image separately, and contributes n_h times their mean: the estimate is unbiased, and the pairs
give an unbiased variance, sum_h n_h^2 s_h^2 / 2, covering both the choice of steps and the noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from ddpm.diffusion import p_mean_variance, q_sample
from ddpm.losses import mean_flat, nats_to_bpd, prior_kl, vlb_term
from ddpm.schedules import NoiseSchedule

Tensor = torch.Tensor


class BoundTerms(NamedTuple):
    """The bound of each image, in bits/dim. ``terms_bpd[b, j]`` is the term at step index
    ``timesteps[b, j]`` (column 0 is always the decoder L_0; index i > 0 is L_i, 0-based).

    total_bpd = prior_bpd + sum of terms (stratified estimate when only a subset was evaluated);
    total_stderr_bpd is that estimate's standard error per image (NaN for the full chain, which has a
    single draw per step; use the spread over images, ``bits_per_dim_summary``)."""

    total_bpd: Tensor  # [B]
    total_stderr_bpd: Tensor  # [B]
    prior_bpd: Tensor  # [B]
    terms_bpd: Tensor  # [B, K]
    timesteps: (
        Tensor  # [B, K], the step index of each term (arange(T) in every row for the full chain)
    )
    x0_mse: Tensor  # [B, K]
    eps_mse: Tensor  # [B, K]

    @property
    def decoder_bpd(self) -> Tensor:
        """L_0 per image (column 0 is always the decoder)."""
        return self.terms_bpd[:, 0]


@torch.no_grad()
def variational_bound(
    model: Callable[[Tensor, Tensor], Tensor],
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    decoder: str = "discretized",
    num_eval_steps: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    clip_x0: bool = False,
) -> BoundTerms:
    """L_T + sum_t L_{t-1} + L_0 for a batch x0 [B, ...], each term in bits/dim (see module docstring).

    ``decoder`` is "discretized" for 8-bit images in [-1, 1] (eq. 13) or "gaussian" for continuous data.
    The model is called as ``model(x_t, schedule.timesteps[t])`` on the chain it was trained on.

    ``clip_x0`` clamps the x_0 prediction to [-1, 1] before the posterior mean mu~_t(x0_pred, x_t)
    is formed (``p_mean_variance(clip_x0=True)``): the bound of the model that a clipping sampler
    draws from, and what improved-diffusion's ``calc_bpd_loop`` reports by default
    (``clip_denoised=True``). x0_mse and eps_mse then measure the clamped prediction, as there.
    """
    T = schedule.num_timesteps
    num_dims = x0[0].numel()
    batch = x0.shape[0]
    if num_eval_steps is None or num_eval_steps >= T:
        steps, strata = torch.arange(T).expand(batch, T), None
    else:
        steps, strata = _stratified_steps(T, num_eval_steps, batch, generator)

    terms, x0_mse, eps_mse = [], [], []
    for j in tqdm(range(steps.shape[1]), desc="bound", disable=not progress, leave=False):
        t = steps[:, j].to(x0.device)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        x_t = q_sample(schedule, x0, t, eps)
        out = model(x_t, schedule.timesteps[t.cpu()].to(x0.device))
        pmv = p_mean_variance(
            schedule,
            x_t,
            t,
            out.to(x0.dtype),
            prediction=prediction,
            variance=variance,
            clip_x0=clip_x0,
        )
        nats = vlb_term(
            schedule, x0, x_t, t, pmv.model_mean, pmv.model_log_variance, decoder=decoder
        )
        terms.append(nats_to_bpd(nats, num_dims))
        x0_mse.append(mean_flat((pmv.x0_pred - x0) ** 2))
        eps_mse.append(mean_flat((pmv.eps_pred - eps) ** 2))
    terms_bpd = torch.stack(terms, dim=1)
    prior_bpd = nats_to_bpd(prior_kl(schedule, x0), num_dims)

    if strata is None:
        total = prior_bpd + terms_bpd.sum(dim=1)
        stderr = torch.full_like(total, float("nan"))  # one draw per step: no replicate to measure
    else:
        total, variance = prior_bpd.clone(), torch.zeros_like(prior_bpd)
        for columns, size in strata:
            picked = terms_bpd[:, columns]
            total = total + size * picked.mean(dim=1)
            # Two i.i.d. draws (step and noise): Var(size * mean) = size^2 s^2 / 2, s^2 unbiased.
            variance = variance + size**2 * picked.var(dim=1, unbiased=True) / 2
        stderr = variance.sqrt()
    return BoundTerms(
        total,
        stderr,
        prior_bpd,
        terms_bpd,
        steps,
        torch.stack(x0_mse, 1),
        torch.stack(eps_mse, 1),
    )


def _stratified_steps(
    T: int, num_eval_steps: int, batch: int, generator: torch.Generator | None
) -> tuple[Tensor, list[tuple[list[int], int]]]:
    """Steps [batch, K]: stratum {0} (the decoder), then strata of [1, T-1] with geometrically growing
    sizes; each stratum gets two independent uniform draws, separately for every image, so that the
    images' errors are independent. Also returns, per stratum, its two columns and its size."""
    if num_eval_steps < 4:
        raise ValueError(
            "a strided bound needs num_eval_steps >= 4 (two draws for L_0 and for one stratum)"
        )
    edges = torch.tensor([0, 1])
    for num_strata in range(num_eval_steps // 2 - 1, 0, -1):
        edges = torch.unique(torch.round(torch.logspace(0, math.log10(T), num_strata + 1)).long())
        if len(edges) - 1 <= num_eval_steps // 2 - 1:
            break
    bounds = [(0, 1), *zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True)]
    columns, strata = [], []
    for h, (lo, hi) in enumerate(bounds):
        columns.append(torch.randint(lo, hi, (batch, 2), generator=generator))
        strata.append(([2 * h, 2 * h + 1], hi - lo))
    return torch.cat(columns, dim=1), strata


def bits_per_dim_summary(totals: Tensor) -> tuple[float, float]:
    """Mean bound over images and its standard error (for a 95% interval, mean +- 1.96 se)."""
    n = totals.numel()
    se = float(totals.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    return float(totals.mean()), se
