"""Samplers: functions with one shared signature, chosen by name from ``SAMPLERS``.

    sampler(model, schedule, x_T, *, prediction, variance, clip_x0, dynamic_threshold, generator,
            record, progress)
        -> SamplerOutput(x0, trajectory)

``schedule`` is the chain to walk: the full one, or one respaced onto a timestep grid (``GRIDS``), in
which case the previous step of every update is the previous point *of the grid*, never a fixed stride.
``model(x_t, t) -> output`` is any callable (a network in eval mode, the exact oracle, ...) and is always
called with the *original* timesteps ``schedule.timesteps[i]``; the updates themselves use only the
schedule's coefficients. Sampling runs under ``torch.no_grad``.

Every solver's update is also a public *step function* that never calls the model (like diffusers'
``step()``): it takes the schedule, the grid index ``i`` it steps from, x at that point and the x_0
predictions the caller got from the model, and returns x at index i - 1 (at i = 0: the sample x_0).
``dpm_solver_step``, ``sde_dpm_solver_step`` (and the step's noise), ``unipc_step`` / ``unipc_correct``,
``euler_step`` / ``heun_step``, ``ipndm_step`` (which takes eps predictions). Multistep solvers take ``x0_preds``, the predictions at the latest grid
points i, i + 1, ... *newest last*, and ``multistep_order`` gives the order the samplers use at i.

Notation of the ODE solvers, translated into our names: their alpha_t is sqrt(alpha_bar) ("alpha" below),
sigma_t = sqrt(1 - alpha_bar) ("sigma"), lambda = log(alpha / sigma) = log_snr / 2, and EDM's sigma is
sigma / alpha = exp(-lambda). The point after index 0 is x_0 itself: alpha = 1, sigma = 0, lambda = inf.
A sampler on a K-point grid makes K network evaluations, except ``heun`` (2K - 1; see
``network_evaluations``).

Noise (x_T and every reverse-step z) is drawn on the *generator's* device and moved to the data's, so a
CPU generator gives the same numbers whether the model runs on a CPU or a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from ddpm.diffusion import PMeanVariance, p_mean_variance, p_sample_step
from ddpm.schedules import NoiseSchedule, respace

Tensor = torch.Tensor
Model = Callable[[Tensor, Tensor], Tensor]


class SamplerOutput(NamedTuple):
    """The final samples and, for each recorded step index i, x at that index *before* the step
    (x_{i+1} in the paper's numbering); index -1 holds the final x_0."""

    x0: Tensor
    trajectory: dict[int, Tensor]


def _loop(
    schedule: NoiseSchedule,
    x_T: Tensor,
    record: Sequence[int],
    progress: bool,
    update: Callable[[int, Tensor, Tensor, Tensor], Tensor],
) -> SamplerOutput:
    """x <- update(i, t, t_model, x) for i = T-1 .. 0, where t is the index [B] into the schedule and
    t_model the original timestep [B] the network sees; records x before the requested steps."""
    wanted = set(int(r) for r in record)
    trajectory: dict[int, Tensor] = {}
    x = x_T
    for i in tqdm(
        range(schedule.num_timesteps - 1, -1, -1),
        desc="sampling",
        disable=not progress,
        leave=False,
    ):
        if i in wanted:
            trajectory[i] = x.detach().cpu()
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        x = update(i, t, schedule.timesteps[t.cpu()].to(x.device), x)
    trajectory[-1] = x.detach().cpu()
    return SamplerOutput(x, trajectory)


def _randn(
    shape: Sequence[int],
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype,
) -> Tensor:
    """N(0, I) of the given shape on ``device``, drawn on the generator's device (a CPU generator cannot
    draw on a GPU, and drawing on the CPU makes a seed give the same numbers on every device)."""
    where = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=where, dtype=dtype).to(device)


def _denoiser(
    model: Model,
    schedule: NoiseSchedule,
    prediction: str,
    variance: str,
    clip_x0: bool,
    dynamic_threshold: float | None,
) -> Callable[[Tensor, Tensor, Tensor], PMeanVariance]:
    """(x, t, t_model) -> p_mean_variance of the model's output at x: the one place a sampler calls it."""

    def denoise(x: Tensor, t: Tensor, t_model: Tensor) -> PMeanVariance:
        out = model(x, t_model).to(x.dtype)
        return p_mean_variance(
            schedule,
            x,
            t,
            out,
            prediction=prediction,
            variance=variance,
            clip_x0=clip_x0,
            dynamic_threshold=dynamic_threshold,
        )

    return denoise


@torch.no_grad()
def ancestral_sample(
    model: Model,
    schedule: NoiseSchedule,
    x_T: Tensor,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = False,
    dynamic_threshold: float | None = None,
    generator: torch.Generator | None = None,
    record: Sequence[int] = (),
    progress: bool = False,
) -> SamplerOutput:
    """Algorithm 2 of Ho et al.: for i = T-1 .. 0, x_{i-1} = mu_theta(x_i, i) + sigma_i z, z ~ N(0, I)
    (no noise at i = 0). On a respaced schedule this is Improved DDPM's strided ancestral sampler, whose
    variances come from the respaced betas."""
    denoise = _denoiser(model, schedule, prediction, variance, clip_x0, dynamic_threshold)

    def update(i, t, t_model, x):
        pmv = denoise(x, t, t_model)
        return p_sample_step(pmv, t, _randn(x.shape, generator, x.device, x.dtype))

    return _loop(schedule, x_T, record, progress, update)


@torch.no_grad()
def ddim_sample(
    model: Model,
    schedule: NoiseSchedule,
    x_T: Tensor,
    *,
    eta: float = 0.0,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = False,
    dynamic_threshold: float | None = None,
    generator: torch.Generator | None = None,
    record: Sequence[int] = (),
    progress: bool = False,
) -> SamplerOutput:
    """DDIM (Song et al. 2021, eq. 12), from index i to the grid's previous point (alpha_bar_prev[i]):
    x_prev = sqrt(alpha_bar_prev) x0_pred + sqrt(1 - alpha_bar_prev - sigma^2) eps_pred + sigma z,
    sigma = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) sqrt(1 - alpha_bar / alpha_bar_prev)
    (eq. 16). eta = 0 is deterministic; eta = 1 is the ancestral sampler with sigma^2 = beta~.
    ``variance`` is accepted for the shared signature; a learned variance's channels are dropped."""
    ab, ab_prev = schedule.alpha_bar, schedule.alpha_bar_prev
    denoise = _denoiser(model, schedule, prediction, variance, clip_x0, dynamic_threshold)

    def update(i, t, t_model, x):
        pmv = denoise(x, t, t_model)
        a, a_prev = ab[i].item(), ab_prev[i].item()
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        x_prev = (
            math.sqrt(a_prev) * pmv.x0_pred
            + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * pmv.eps_pred
        )
        if sigma > 0:
            x_prev = x_prev + sigma * _randn(x.shape, generator, x.device, x.dtype)
        return x_prev

    return _loop(schedule, x_T, record, progress, update)


# --------------------------------------------------------------------------------------------------
# ODE solvers in data prediction: pure step functions, then the samplers that loop over them
# --------------------------------------------------------------------------------------------------


def _half_log_snr(schedule: NoiseSchedule) -> Tensor:
    """lambda = log(alpha) - log(sigma) [T] (-inf at a zero-terminal-SNR step: expm1(-inf) = -1 works).
    Computed over the whole chain, as the first DPM-Solver++ did, so that its outputs stay bit-equal."""
    return torch.log(schedule.sqrt_alpha_bar) - torch.log(schedule.sqrt_one_minus_alpha_bar)


def _check_step(schedule: NoiseSchedule, i: int, x0_preds: Sequence[Tensor], order: int) -> None:
    if not 0 <= i < schedule.num_timesteps:
        raise ValueError(f"step index i must lie in [0, {schedule.num_timesteps - 1}], got {i}")
    if order not in (1, 2, 3):
        raise ValueError(f"solver order must be 1, 2 or 3, got {order!r}")
    if len(x0_preds) < order:
        raise ValueError(
            f"an order-{order} step needs the x0 predictions of the last {order} grid points, "
            f"got {len(x0_preds)}"
        )
    if i + order - 1 >= schedule.num_timesteps:
        raise ValueError(f"an order-{order} step from index {i} needs points up to {i + order - 1}")


def dpm_solver_step(
    schedule: NoiseSchedule, i: int, x: Tensor, x0_preds: Sequence[Tensor], *, order: int
) -> Tensor:
    """One DPM-Solver++ multistep update (Lu et al. 2022, Algorithm 2 and the "3M" variant) from grid
    index i to i - 1, given D_0 = x0_preds[-1] (at i), D_1 = x0_preds[-2] (at i + 1), D_2 (at i + 2).

    With h = lambda_{i-1} - lambda_i and phi_1 = expm1(-h):
      (1) x_{i-1} = (sigma_{i-1} / sigma_i) x - alpha_{i-1} phi_1 D_0                (order 1 = DDIM)
      (2) order 2 subtracts alpha_{i-1} phi_1 (D_0 - D_1) / (2 r0), r0 = h_1 / h   (h_1: previous step)
      (3) order 3 adds alpha_{i-1} (phi_2 first - phi_3 second), with the first and second divided
          differences of D and phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 1/2.
    At i = 0 the next point is x_0 (sigma = 0) and the update is D_0 itself: the final denoising step.
    Order 3 is kept exactly as published (and as in diffusers), but its second difference estimates
    h^2 D''/2 where the phi_3 term needs h^2 D'': it converges at second order (tests/test_solvers.py);
    ``unipc_step`` with order 3 is a third-order multistep update.
    """
    _check_step(schedule, i, x0_preds, order)
    d = x0_preds[-1]
    if i == 0:
        return d  # the next point is x_0 itself (sigma = 0): the data prediction
    alpha, sigma, lam = (
        schedule.sqrt_alpha_bar,
        schedule.sqrt_one_minus_alpha_bar,
        _half_log_snr(schedule),
    )
    lam_u, a_u, s_u, s_s = (
        lam[i - 1].item(),
        alpha[i - 1].item(),
        sigma[i - 1].item(),
        sigma[i].item(),
    )
    lam_s = lam[i].item()
    h = lam_u - lam_s
    phi_1 = math.expm1(-h)
    x_u = (s_u / s_s) * x - a_u * phi_1 * d  # (1)
    if order >= 2:
        d1_0, first, second = _differences(lam, i, x0_preds, h, order)
        if order == 2:
            x_u = x_u - 0.5 * a_u * phi_1 * d1_0  # (2)
        else:
            phi_2 = phi_1 / h + 1.0
            phi_3 = phi_2 / h - 0.5
            x_u = x_u + a_u * phi_2 * first - a_u * phi_3 * second  # (3)
    return x_u


def _differences(
    lam: Tensor, i: int, x0_preds: Sequence[Tensor], h: float, order: int
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The multistep differences of DPM-Solver++ from index i (step h): D1_0 = (D_0 - D_1) / r0 with
    r0 = (lambda_i - lambda_{i+1}) / h, and at order 3 the first and second divided differences
    first = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), second = (D1_0 - D1_1) / (r0 + r1) (else None)."""
    lam_s, lam_1 = lam[i].item(), lam[i + 1].item()
    r0 = (lam_s - lam_1) / h
    d1_0 = (x0_preds[-1] - x0_preds[-2]) / r0
    if order < 3:
        return d1_0, None, None
    r1 = (lam_1 - lam[i + 2].item()) / h
    d1_1 = (x0_preds[-2] - x0_preds[-3]) / r1
    first = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    second = (d1_0 - d1_1) / (r0 + r1)
    return d1_0, first, second


# A multistep update extrapolates D along lambda from the previous steps; where this step is more than
# MAX_STEP_GROWTH times one of them, the extrapolation amplifies their differences (and, in the SDE
# form, the noise between consecutive predictions) instead of estimating a derivative. On grids
# uneven in lambda (linspace for the linear schedule: its last step is 4x the one before), at 20
# points, SDE-DPM-Solver++ 3M then ended 123x, its 2M 18x and DPM-Solver++ 2M 14x worse than the
# chain on the worst exact mixture of benchmarks/samplers.py; with the order lowered there, 3.9x,
# 2.1x and 1.9x (README, "Sampler accuracy"). On the linear chain, log-SNR grids never trigger it
# at order 2 (the cosine chain's can, where rounding to whole steps near t = 0 makes them uneven).
MAX_STEP_GROWTH = 2.0


def multistep_order(
    schedule: NoiseSchedule, i: int, order: int, history: int, *, lower_order_final: bool = True
) -> int:
    """The order of a DPM-Solver++ (ODE or SDE) update from grid index i: at most ``order`` and the
    number of x0 predictions so far (``history``: the first steps warm up); with
    ``lower_order_final`` and fewer than 15 points, lowered at the end as the authors recommend
    (i = updates still to come, counting the final jump to x_0); and lowered to j wherever the step
    j back is shorter than this one by more than ``MAX_STEP_GROWTH`` in lambda."""
    k = min(order, history)
    if lower_order_final and schedule.num_timesteps < 15:
        k = min(k, max(i, 1))
    return _within_step_growth(schedule, i, k)


def _within_step_growth(schedule: NoiseSchedule, i: int, k: int) -> int:
    """k, or the largest j < k such that none of the j - 1 steps before the one from index i is
    shorter than it by more than MAX_STEP_GROWTH in lambda, and none of the points i .. i + j - 1
    is at lambda = -inf (a zero terminal SNR: no difference quotient reaches it; DPM-Solver's
    formulas give that point weight 0 there, UniPC's linear system gives NaN)."""
    if i == 0 or k < 2:
        return k
    lam = _half_log_snr(schedule)
    h = float(lam[i - 1] - lam[i])
    for j in range(1, k):
        if (
            math.isinf(float(lam[i + j]))
            or MAX_STEP_GROWTH * float(lam[i + j - 1] - lam[i + j]) < h
        ):
            return j
    return k


def _multistep(
    denoise: Callable[[Tensor, Tensor, Tensor], PMeanVariance],
    schedule: NoiseSchedule,
    order: int,
    lower_order_final: bool,
    step: Callable[[int, Tensor, list[Tensor], int], Tensor],
) -> Callable[[int, Tensor, Tensor, Tensor], Tensor]:
    """The update of a DPM-Solver++ loop: the model's x0 prediction at every point (the last three
    kept, newest last), the order of ``multistep_order``; ``step(i, x, x0_preds, order)`` makes the
    move."""
    x0_preds: list[Tensor] = []

    def update(i, t, t_model, x):
        x0_preds.append(denoise(x, t, t_model).x0_pred)
        del x0_preds[:-3]
        k = multistep_order(schedule, i, order, len(x0_preds), lower_order_final=lower_order_final)
        return step(i, x, x0_preds, k)

    return update


@torch.no_grad()
def dpm_solver_sample(
    model: Model,
    schedule: NoiseSchedule,
    x_T: Tensor,
    *,
    order: int = 2,
    lower_order_final: bool = True,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = False,
    dynamic_threshold: float | None = None,
    generator: torch.Generator | None = None,
    record: Sequence[int] = (),
    progress: bool = False,
) -> SamplerOutput:
    """DPM-Solver++ multistep (Lu et al. 2022, Algorithm 2 / "3M"), in data prediction, on the grid:
    ``dpm_solver_step`` at every point, with the model's x0 prediction there.

    The first steps use lower orders (no history yet); with ``lower_order_final`` so do the last ones
    when there are fewer than 15 steps, as the authors recommend, and so does any step more than
    ``MAX_STEP_GROWTH`` times a previous one (``multistep_order``; rare on log-SNR grids). The last
    update goes to alpha_bar = 1 (x_0) and returns the data prediction there (the final denoising
    step). Deterministic: ``generator`` is unused.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order}")
    denoise = _denoiser(model, schedule, prediction, variance, clip_x0, dynamic_threshold)

    def step(i, x, x0_preds, k):
        return dpm_solver_step(schedule, i, x, x0_preds, order=k)

    update = _multistep(denoise, schedule, order, lower_order_final, step)
    return _loop(schedule, x_T, record, progress, update)


def sde_dpm_solver_step(
    schedule: NoiseSchedule,
    i: int,
    x: Tensor,
    x0_preds: Sequence[Tensor],
    noise: Tensor,
    *,
    order: int,
) -> Tensor:
    """One SDE-DPM-Solver++ multistep update (Lu et al. 2022, sec. 5 and Appendix; diffusers'
    "sde-dpmsolver++", midpoint at order 2) from grid index i to i - 1, with D_0 = x0_preds[-1] (at
    i), D_1 = x0_preds[-2] (at i + 1), D_2 = x0_preds[-3] and ``noise`` ~ N(0, I) of x's shape. With
    h = lambda_{i-1} - lambda_i and k = 1 - e^{-2h}:

      (1) x_{i-1} = (sigma_{i-1} / sigma_i) e^{-h} x + alpha_{i-1} k D_0 + sigma_{i-1} sqrt(k) noise
      (2) order 2 adds alpha_{i-1} k (D_0 - D_1) / (2 r0),   r0 = h_1 / h;
      (3) order 3 adds alpha_{i-1} ((k / (-2h) + 1) first + ((k - 2h) / (2h)^2 - 1/2) second), with
          the first and second divided differences of ``dpm_solver_step``'s order 3 (as diffusers).

    Order 1 *is* ancestral sampling with x_0 = D_0: the coefficients are those of the posterior
    q(x_{i-1} | x_i, x_0) on the grid, e^{-2h} = (alpha_i sigma_{i-1} / (sigma_i alpha_{i-1}))^2. The
    noise the stochastic steps inject corrects part of the network's own error, which the probability-
    flow ODE solvers carry to the end. At i = 0 the update is D_0 (the final denoising step, no noise).
    """
    _check_step(schedule, i, x0_preds, order)
    d = x0_preds[-1]
    if i == 0:
        return d
    alpha, sigma, lam = (
        schedule.sqrt_alpha_bar,
        schedule.sqrt_one_minus_alpha_bar,
        _half_log_snr(schedule),
    )
    a_u, s_u, s_s = alpha[i - 1].item(), sigma[i - 1].item(), sigma[i].item()
    h = lam[i - 1].item() - lam[i].item()
    keep = -math.expm1(-2 * h)  # 1 - e^{-2h}
    x_u = (s_u / s_s * math.exp(-h)) * x + (a_u * keep) * d + (s_u * math.sqrt(keep)) * noise
    if order >= 2:
        d1_0, first, second = _differences(lam, i, x0_preds, h, order)
        if order == 2:
            x_u = x_u + (0.5 * a_u * keep) * d1_0
        else:
            x_u = x_u + (a_u * (keep / (-2 * h) + 1.0)) * first
            x_u = x_u + (a_u * ((keep - 2 * h) / (2 * h) ** 2 - 0.5)) * second
    return x_u


@torch.no_grad()
def sde_dpm_solver_sample(
    model: Model,
    schedule: NoiseSchedule,
    x_T: Tensor,
    *,
    order: int = 2,
    lower_order_final: bool = True,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = False,
    dynamic_threshold: float | None = None,
    generator: torch.Generator | None = None,
    record: Sequence[int] = (),
    progress: bool = False,
) -> SamplerOutput:
    """SDE-DPM-Solver++ (1, 2M or 3M) on the grid: ``sde_dpm_solver_step`` at every point with the model's x0
    prediction there and fresh noise (drawn like the ancestral sampler's: on the generator's device).
    Orders warm up and, with ``lower_order_final`` and fewer than 15 points, come down at the end, as
    in ``dpm_solver_sample``. Order 1 is the ancestral sampler with the posterior's variance
    (fixed_small), whatever ``variance`` says; a learned variance's channels are dropped."""
    if order not in (1, 2, 3):
        raise ValueError(f"SDE-DPM-Solver++ order must be 1, 2 or 3, got {order}")
    denoise = _denoiser(model, schedule, prediction, variance, clip_x0, dynamic_threshold)

    def step(i, x, x0_preds, k):
        if i == 0:
            return x0_preds[-1]  # the final denoising step draws no noise
        noise = _randn(x.shape, generator, x.device, x.dtype)
        return sde_dpm_solver_step(schedule, i, x, x0_preds, noise, order=k)

    update = _multistep(denoise, schedule, order, lower_order_final, step)
    return _loop(schedule, x_T, record, progress, update)


UNIPC_VARIANTS = ("bh1", "bh2")


def _unipc(
    schedule: NoiseSchedule,
    i: int,
    x: Tensor,
    x0_preds: Sequence[Tensor],
    order: int,
    variant: str,
    x0_pred_next: Tensor | None,
) -> Tensor:
    # Zhao et al. 2023, Algorithms 2-3 (UniP-p / UniC-p) in data prediction with B(h) = h ("bh1") or
    # e^h - 1 ("bh2"), written as in their released code and diffusers' UniPCMultistepScheduler.
    if variant not in UNIPC_VARIANTS:
        raise ValueError(
            f"UniPC variant must be one of {', '.join(UNIPC_VARIANTS)}, got {variant!r}"
        )
    _check_step(schedule, i, x0_preds, order)
    m0 = x0_preds[-1]
    if i == 0:
        if x0_pred_next is not None:
            raise ValueError("there is nothing to correct after the final step to x_0")
        return m0  # the next point is x_0 (sigma = 0): the final denoising step
    alpha, sigma, lam = (
        schedule.sqrt_alpha_bar,
        schedule.sqrt_one_minus_alpha_bar,
        _half_log_snr(schedule),
    )
    a_t, s_t, s_s0 = alpha[i - 1].item(), sigma[i - 1].item(), sigma[i].item()
    lam_s0 = lam[i].item()
    h = lam[i - 1].item() - lam_s0
    hh = -h  # data prediction integrates e^{-lambda}
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    # r_k = (lambda_{i+k} - lambda_i) / h and the scaled differences D1_k = (m_k - m0) / r_k of the
    # older predictions; the corrector appends r = 1 for the new prediction at i - 1.
    rks, d1s = [], []
    for k in range(1, order):
        rk = (lam[i + k].item() - lam_s0) / h
        rks.append(rk)
        d1s.append((x0_preds[-1 - k] - m0) / rk)
    rks.append(1.0)
    # Eq. (9)-(10): R_p rho = g_p(h) with R_p[j, k] = r_k^j and g_j = h phi_{j+1}(h) j! / B(h).
    R, b, h_phi_k, factorial = [], [], h_phi_1 / hh - 1, 1
    for j in range(1, order + 1):
        R.append([r ** (j - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    x_t = (s_t / s_s0) * x - a_t * h_phi_1 * m0  # the order-1 (DDIM) part
    if x0_pred_next is None:  # predictor UniP-p
        if order == 1:
            return x_t
        # Order 2 uses rho = 1/2 (their code's choice; it makes UniP-2 with bh2 DPM-Solver++ 2M).
        rhos = [0.5] if order == 2 else _solve(R[:-1], b[:-1], order - 1)
        return x_t - a_t * b_h * sum(r * d for r, d in zip(rhos, d1s, strict=True))
    # corrector UniC-p: the prediction at the new point enters with r = 1.
    rhos = [0.5] if order == 1 else _solve(R, b, order)
    res = rhos[-1] * (x0_pred_next - m0)
    for r, d in zip(rhos[:-1], d1s, strict=True):
        res = res + r * d
    return x_t - a_t * b_h * res


def _solve(R: list[list[float]], b: list[float], n: int) -> list[float]:
    """The n x n system R[:n, :n] rho = b[:n], in float64."""
    A = torch.tensor([row[:n] for row in R[:n]], dtype=torch.float64)
    return torch.linalg.solve(A, torch.tensor(b[:n], dtype=torch.float64)).tolist()


def unipc_step(
    schedule: NoiseSchedule,
    i: int,
    x: Tensor,
    x0_preds: Sequence[Tensor],
    *,
    order: int,
    variant: str = "bh2",
) -> Tensor:
    """The UniP-p predictor of UniPC (Zhao et al. 2023, Algorithm 2, data prediction) from grid index i
    to i - 1, given x0_preds[-1] = m_0 at i and m_k = x0_preds[-1-k] at i + k, k < p:

      x_{i-1} = (sigma_{i-1} / sigma_i) x - alpha_{i-1} (e^{-h} - 1) m_0
                - alpha_{i-1} B(h) sum_k rho_k (m_k - m_0) / r_k,       r_k = (lambda_{i+k} - lambda_i) / h,

    h = lambda_{i-1} - lambda_i, B(h) = -h ("bh1") or e^{-h} - 1 ("bh2"), rho from R_{p-1} rho = g
    (eq. 10; rho = 1/2 at p = 2). Order 1 is DDIM. At i = 0 it returns m_0 (the step to x_0)."""
    return _unipc(schedule, i, x, x0_preds, order, variant, None)


def unipc_correct(
    schedule: NoiseSchedule,
    i: int,
    x: Tensor,
    x0_preds: Sequence[Tensor],
    x0_pred_next: Tensor,
    *,
    order: int,
    variant: str = "bh2",
) -> Tensor:
    """The UniC-p corrector of UniPC (Zhao et al. 2023, Algorithm 3): the point at index i - 1 again,
    from the same x at i and predictions as ``unipc_step``, now also using ``x0_pred_next``, the model's
    prediction at the *predicted* point i - 1 (r = 1 in eq. 10; rho = 1/2 at p = 1):

      x^c_{i-1} = (sigma_{i-1} / sigma_i) x - alpha_{i-1} (e^{-h} - 1) m_0
                  - alpha_{i-1} B(h) (sum_{k<p} rho_k (m_k - m_0) / r_k + rho_p (x0_pred_next - m_0)).

    Order p + 1 for the price of no extra evaluation: the next step reuses x0_pred_next, evaluated at
    the uncorrected point. ``order`` is the order of the predictor step being corrected."""
    return _unipc(schedule, i, x, x0_preds, order, variant, x0_pred_next)


@torch.no_grad()
def unipc_sample(
    model: Model,
    schedule: NoiseSchedule,
    x_T: Tensor,
    *,
    order: int = 2,
    variant: str = "bh2",
    corrector: bool = True,
    lower_order_final: bool = True,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = False,
    dynamic_threshold: float | None = None,
    generator: torch.Generator | None = None,
    record: Sequence[int] = (),
    progress: bool = False,
) -> SamplerOutput:
    """UniPC (Zhao et al. 2023): at every grid point the model's x0 prediction first corrects the point
    just predicted (``unipc_correct``, skipped at the first point or with ``corrector=False``), then
    the predictor (``unipc_step``) moves on from the corrected point. Orders warm up from 1 and, with
    ``lower_order_final`` (their code's default), come down at the end: order <= i + 1 at index i,
    and at any step more than ``MAX_STEP_GROWTH`` times a previous one (rare on log-SNR grids).
    The last update returns the x0 prediction at index 0 (the final denoising step). Deterministic."""
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
    if variant not in UNIPC_VARIANTS:
        raise ValueError(
            f"UniPC variant must be one of {', '.join(UNIPC_VARIANTS)}, got {variant!r}"
        )
    denoise = _denoiser(model, schedule, prediction, variance, clip_x0, dynamic_threshold)
    x0_preds: list[Tensor] = []  # at the latest grid points, newest last
    last: list = []  # (x, order) of the previous predictor step

    def update(i, t, t_model, x):
        x0_pred = denoise(x, t, t_model).x0_pred
        if corrector and last:
            x_from, k_from = last[0]
            x = unipc_correct(
                schedule, i + 1, x_from, x0_preds, x0_pred, order=k_from, variant=variant
            )
        x0_preds.append(x0_pred)
        del x0_preds[:-order]
        k = min(order, len(x0_preds), i + 1 if lower_order_final else order)
        k = _within_step_growth(schedule, i, k)  # see MAX_STEP_GROWTH
        last[:] = [(x, k)]
        return unipc_step(schedule, i, x, x0_preds, order=k, variant=variant)

    return _loop(schedule, x_T, record, progress, update)


def euler_step(schedule: NoiseSchedule, i: int, x: Tensor, x0_pred: Tensor) -> Tensor:
    """Euler's method for the probability-flow ODE in EDM's variables (y = x / alpha, sigma~ = sigma /
    alpha, dy/dsigma~ = (y - D) / sigma~; Karras et al. 2022, Algorithm 1 line 4), from index i to
    i - 1. In ours it is x_{i-1} = alpha_{i-1} D + sigma_{i-1} (x - alpha_i D) / sigma_i: exactly DDIM
    with eta = 0 and DPM-Solver++ order 1. At i = 0 it returns D (the step to sigma = 0)."""
    return dpm_solver_step(schedule, i, x, [x0_pred], order=1)


def heun_step(
    schedule: NoiseSchedule, i: int, x: Tensor, x0_pred: Tensor, x0_pred_euler: Tensor
) -> Tensor:
    """Heun's second-order step of EDM (Karras et al. 2022, Algorithm 1 lines 4-8, no churn) from grid
    index i >= 1 to i - 1. ``x0_pred`` is D at (x, i); ``x0_pred_euler`` is D at the Euler point
    x' = euler_step(schedule, i, x, x0_pred), index i - 1. With d = (x - alpha_i D) / sigma_i and
    d' = (x' - alpha_{i-1} D') / sigma_{i-1} (each dy/dsigma~, i.e. an eps prediction):

      x_{i-1} = (alpha_{i-1} / alpha_i) x + (sigma_{i-1} - alpha_{i-1} sigma_i / alpha_i) (d + d') / 2,

    the trapezoidal rule in EDM's variables mapped back by x = alpha y."""
    if not 1 <= i < schedule.num_timesteps:
        raise ValueError(
            f"a Heun step needs an index in [1, {schedule.num_timesteps - 1}] (the last step to x_0 "
            f"is euler_step), got {i}"
        )
    a_s, s_s = schedule.sqrt_alpha_bar[i].item(), schedule.sqrt_one_minus_alpha_bar[i].item()
    a_u, s_u = (
        schedule.sqrt_alpha_bar[i - 1].item(),
        schedule.sqrt_one_minus_alpha_bar[i - 1].item(),
    )
    if a_s == 0.0:
        raise ValueError(
            "a Heun step from a zero-SNR point is undefined (sigma~ = inf); use euler_step"
        )
    x_euler = euler_step(schedule, i, x, x0_pred)
    d = (x - a_s * x0_pred) / s_s
    d_euler = (x_euler - a_u * x0_pred_euler) / s_u
    return (a_u / a_s) * x + (s_u - a_u * s_s / a_s) * 0.5 * (d + d_euler)


@torch.no_grad()
def heun_sample(
    model: Model,
    schedule: NoiseSchedule,
    x_T: Tensor,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = False,
    dynamic_threshold: float | None = None,
    generator: torch.Generator | None = None,
    record: Sequence[int] = (),
    progress: bool = False,
) -> SamplerOutput:
    """EDM's deterministic sampler (Karras et al. 2022, Algorithm 1, S_churn = 0): ``heun_step`` between
    grid points, two network evaluations each, and an Euler step (one evaluation, returning D) from the
    last point to x_0: 2K - 1 evaluations on a K-point grid. Their sigma grid (rho = 7) on our discrete
    chain is the "karras" grid, its default. A step from a zero-SNR point (zero-terminal-SNR
    schedules) is an Euler step. Deterministic."""
    denoise = _denoiser(model, schedule, prediction, variance, clip_x0, dynamic_threshold)
    alpha = schedule.sqrt_alpha_bar

    def update(i, t, t_model, x):
        x0_pred = denoise(x, t, t_model).x0_pred
        x_euler = euler_step(schedule, i, x, x0_pred)
        if i == 0 or alpha[i].item() == 0.0:
            return x_euler
        # The second evaluation: at the Euler point, at the grid's next (original) timestep.
        t_next, t_model_next = t - 1, schedule.timesteps[(t - 1).cpu()].to(x.device)
        x0_pred_euler = denoise(x_euler, t_next, t_model_next).x0_pred
        return heun_step(schedule, i, x, x0_pred, x0_pred_euler)

    return _loop(schedule, x_T, record, progress, update)


# Adams-Bashforth weights of iPNDM, newest prediction first (Zhang & Chen 2023, eq. 26).
_IPNDM_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def ipndm_step(schedule: NoiseSchedule, i: int, x: Tensor, eps_preds: Sequence[Tensor]) -> Tensor:
    """One step of iPNDM (Zhang & Chen 2023, "improved PNDM" of the DEIS paper) from grid index i to
    i - 1 (at i = 0: to sigma = 0, the sample). In EDM's variables y = x / alpha, sigma~ = sigma /
    alpha the probability-flow ODE is dy/dsigma~ = eps(x); iPNDM is the explicit Adams-Bashforth
    method on it with the fixed weights of equal steps, of order len(eps_preds) (1-4):

      y_{i-1} = y_i + (sigma~_{i-1} - sigma~_i) sum_j w_j eps_{i+j},   x_{i-1} = alpha_{i-1} y_{i-1},

    with w = (1), (3/2, -1/2), (23, -16, 5)/12, (55, -59, 37, -9)/24. ``eps_preds``: the model's eps
    predictions at the latest grid points i, i + 1, ... *newest last* (as the other multistep
    steps take x0_preds). Order 1 is DDIM. From a zero-SNR point (alpha = 0: sigma~ = inf) the step
    is undefined; ``ipndm_sample`` takes ``euler_step`` there."""
    k = len(eps_preds)
    if k not in _IPNDM_WEIGHTS:
        raise ValueError(f"an iPNDM step takes 1 to 4 eps predictions, got {k}")
    a_i, s_i = schedule.sqrt_alpha_bar[i].item(), schedule.sqrt_one_minus_alpha_bar[i].item()
    if a_i == 0.0:
        raise ValueError("an iPNDM step from a zero-SNR point is undefined; use euler_step")
    a_n = schedule.sqrt_alpha_bar[i - 1].item() if i > 0 else 1.0
    s_n = schedule.sqrt_one_minus_alpha_bar[i - 1].item() if i > 0 else 0.0
    d = sum(w * e for w, e in zip(_IPNDM_WEIGHTS[k], reversed(eps_preds), strict=False))
    return a_n * (x / a_i + (s_n / a_n - s_i / a_i) * d)


@torch.no_grad()
def ipndm_sample(
    model: Model,
    schedule: NoiseSchedule,
    x_T: Tensor,
    *,
    order: int = 3,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = False,
    dynamic_threshold: float | None = None,
    generator: torch.Generator | None = None,
    record: Sequence[int] = (),
    progress: bool = False,
) -> SamplerOutput:
    """iPNDM (``ipndm_step``) on the grid: one evaluation per point, the order growing from 1 as eps
    predictions accumulate (no Runge-Kutta warm start: the "improved" in iPNDM), up to ``order``
    (1-4). Deterministic: ``generator`` is unused. With the eps of the (possibly clipped) x0
    prediction, eps = (x - alpha x0_pred) / sigma, so clipping and thresholding act as in the others."""
    if order not in _IPNDM_WEIGHTS:
        raise ValueError(f"iPNDM order must be 1, 2, 3 or 4, got {order}")
    denoise = _denoiser(model, schedule, prediction, variance, clip_x0, dynamic_threshold)
    eps_preds: list[Tensor] = []

    def update(i, t, t_model, x):
        pmv = denoise(x, t, t_model)
        a_i, s_i = schedule.sqrt_alpha_bar[i].item(), schedule.sqrt_one_minus_alpha_bar[i].item()
        eps_preds.append((x - a_i * pmv.x0_pred) / s_i)
        del eps_preds[:-order]
        if a_i == 0.0:  # zero terminal SNR: x is all noise, the x0 prediction carries the step
            return euler_step(schedule, i, x, pmv.x0_pred)
        return ipndm_step(schedule, i, x, eps_preds)

    return _loop(schedule, x_T, record, progress, update)


SAMPLERS: dict[str, Callable[..., SamplerOutput]] = {
    "ancestral": ancestral_sample,
    "ddim": ddim_sample,
    "dpm_solver": dpm_solver_sample,
    "sde_dpm_solver": sde_dpm_solver_sample,
    "unipc": unipc_sample,
    "heun": heun_sample,
    "ipndm": ipndm_sample,
}


def network_evaluations(sampler: str, num_steps: int) -> int:
    """How many times ``sampler`` calls the model on a grid of num_steps points: 2K - 1 for ``heun``
    (two per step, one for the last), K for the others."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(sorted(SAMPLERS))}")
    return 2 * num_steps - 1 if sampler == "heun" else num_steps


def steps_for_evaluations(sampler: str, nfe: int) -> int:
    """The longest grid whose sampling costs at most ``nfe`` network evaluations (at least 1 point)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(sorted(SAMPLERS))}")
    return max(1, (nfe + 1) // 2) if sampler == "heun" else nfe


# --------------------------------------------------------------------------------------------------
# timestep grids: K indices into the full chain, ascending; respace() turns them into a chain
# --------------------------------------------------------------------------------------------------


def _check_steps(num_timesteps: int, num_steps: int) -> None:
    if (
        isinstance(num_steps, bool)
        or not isinstance(num_steps, int)
        or not 1 <= num_steps <= num_timesteps
    ):
        raise ValueError(f"steps must be an integer in [1, {num_timesteps}], got {num_steps!r}")


def evenly_spaced_timesteps(num_timesteps: int, num_steps: int) -> Tensor:
    """ "linspace": round(linspace(0, T-1, K)); starts at T-1 and ends at 0 (Improved DDPM's respacing)."""
    _check_steps(num_timesteps, num_steps)
    if num_steps == 1:
        return torch.tensor([num_timesteps - 1])
    return torch.linspace(0, num_timesteps - 1, num_steps, dtype=torch.float64).round().long()


def leading_timesteps(num_timesteps: int, num_steps: int) -> Tensor:
    """ "leading" (DDIM's and Stable Diffusion's): 0, c, 2c, ..., (K-1)c with c = T // K. By definition it
    starts below T-1 (at T - c) -- the flaw Lin et al. 2023 point out; use trailing for zero-terminal-SNR."""
    _check_steps(num_timesteps, num_steps)
    return torch.arange(num_steps) * (num_timesteps // num_steps)


def trailing_timesteps(num_timesteps: int, num_steps: int) -> Tensor:
    """ "trailing" (Lin et al. 2023, Table 2): round(T - j T/K) - 1 for j = 0..K-1; starts at T-1, and its
    smallest point is T/K - 1 (the last update still goes to x_0)."""
    _check_steps(num_timesteps, num_steps)
    grid = torch.round(
        num_timesteps - torch.arange(num_steps, dtype=torch.float64) * num_timesteps / num_steps
    )
    return (grid.long() - 1).flip(0)


def quadratic_timesteps(num_timesteps: int, num_steps: int) -> Tensor:
    """ "quadratic": round(linspace(0, sqrt(T-1), K)^2), dense near t = 0 (cf. DDIM's "quad"); starts at
    T-1 and ends at 0; duplicates at small t are moved up so that K distinct steps remain."""
    _check_steps(num_timesteps, num_steps)
    grid = (
        (torch.linspace(0, math.sqrt(num_timesteps - 1), num_steps, dtype=torch.float64) ** 2)
        .round()
        .long()
    )
    return _distinct(grid, num_timesteps)


# Below this log-SNR (SNR 1.7e-5, EDM sigma 245) the x_0 prediction of data with unit variance is its mean
# to within 0.5% of a standard deviation, so one step crosses the rest of the chain exactly.
LOG_SNR_LOW = -11.0


def log_snr_timesteps(schedule: NoiseSchedule, num_steps: int) -> Tensor:
    """ "logsnr": the steps whose log-SNR is nearest to K values uniform in log-SNR between the last and
    the first step (DPM-Solver's "logSNR" spacing); starts at T-1, ends at 0.

    A chain that reaches below ``LOG_SNR_LOW`` (cosine: its clipped last beta takes log-SNR from -12.9
    to -19.8 in one step; a zero terminal SNR: to -inf) gets T-1 and K-1 values uniform between
    LOG_SNR_LOW and the first step: spread over the whole range, a third of a 10-point grid would sit in
    the chain's last six steps (cosine), where the x_0 prediction no longer changes. The linear,
    quadratic, sigmoid and constant chains end above it and keep DPM-Solver's grid."""
    T = schedule.num_timesteps
    _check_steps(T, num_steps)
    log_snr = schedule.log_snr.clamp(min=-30.0)  # a zero-terminal SNR is -inf
    low = float(log_snr[-1])
    if low >= LOG_SNR_LOW or num_steps < 3:
        targets = torch.linspace(float(log_snr[0]), low, num_steps, dtype=torch.float64)
        return _nearest_log_snr(schedule, targets)
    targets = torch.linspace(float(log_snr[0]), LOG_SNR_LOW, num_steps - 1, dtype=torch.float64)
    grid = torch.cat([_nearest_log_snr(schedule, targets), torch.tensor([T - 1])])
    return _distinct(grid.sort().values, T)


# "logsnr_sparse": below this log-SNR its points are LOW_SNR_SPARSITY times sparser than above it.
LOW_SNR_FLOOR = -4.0
LOW_SNR_SPARSITY = 5.0


def log_snr_sparse_timesteps(
    schedule: NoiseSchedule,
    num_steps: int,
    floor: float = LOW_SNR_FLOOR,
    sparsity: float = LOW_SNR_SPARSITY,
) -> Tensor:
    """ "logsnr_sparse": the steps nearest to K points uniform in u, where u = log-SNR above ``floor`` and
    u = floor + (log-SNR - floor) / sparsity below it; starts at T-1, ends at 0.

    Why: below log-SNR -4 (SNR < 2%) the x_0 prediction of data with variance up to a few units
    (images in [-1, 1] have less than 1) stays near the data mean, so few, long steps cross that stretch
    accurately, while "logsnr" spends a third of its points there (-10.1 to -4 of its -10.1 to 9.2 for the
    linear schedule) -- the budget the low-noise end lacks at 10-20 points. Unlike a fixed first jump, the
    low-SNR spacing shrinks with K, so the grid still converges to the ODE. ``benchmarks/samplers.py``
    measures it against "logsnr" (README, "Sampler accuracy")."""
    T = schedule.num_timesteps
    _check_steps(T, num_steps)
    log_snr = schedule.log_snr.clamp(min=-30.0).to(torch.float64)  # a zero-terminal SNR is -inf
    low = float(log_snr[-1])
    u_low = floor + (low - floor) / sparsity if low < floor else low
    u = torch.linspace(float(log_snr[0]), u_low, num_steps, dtype=torch.float64)
    return _nearest_log_snr(schedule, torch.where(u < floor, floor + (u - floor) * sparsity, u))


def karras_timesteps(schedule: NoiseSchedule, num_steps: int, rho: float = 7.0) -> Tensor:
    """ "karras": EDM's noise levels (Karras et al. 2022, eq. 5) mapped onto the discrete chain:
    s_j = (s_max^(1/rho) + j / (K-1) (s_min^(1/rho) - s_max^(1/rho)))^rho for j = 0..K-1, where EDM's
    sigma is ours sqrt((1 - alpha_bar) / alpha_bar) = exp(-log_snr / 2), s_max and s_min those of the
    last and first step; each s_j becomes the step with the nearest log-SNR. rho = 7 spends most points
    at low noise (their Fig. 13); starts at T-1, ends at 0."""
    T = schedule.num_timesteps
    _check_steps(T, num_steps)
    log_snr = schedule.log_snr.clamp(min=-30.0)  # a zero-terminal SNR is -inf (s_max = e^15 then)
    s_min, s_max = torch.exp(-0.5 * log_snr[0]), torch.exp(-0.5 * log_snr[-1])
    ramp = torch.linspace(1.0, 0.0, num_steps, dtype=torch.float64)
    sigmas = (s_min ** (1 / rho) + ramp * (s_max ** (1 / rho) - s_min ** (1 / rho))) ** rho
    return _nearest_log_snr(schedule, -2 * torch.log(sigmas))


def _nearest_log_snr(schedule: NoiseSchedule, targets: Tensor) -> Tensor:
    """For each target log-SNR the step nearest to it, ascending and made distinct."""
    log_snr = schedule.log_snr.clamp(min=-30.0)
    grid = (log_snr[None, :] - targets[:, None]).abs().argmin(dim=1)
    return _distinct(grid.sort().values, schedule.num_timesteps)


def _distinct(grid: Tensor, num_timesteps: int) -> Tensor:
    """Make an ascending grid strictly increasing by pushing repeats up (keeping its ends)."""
    out = grid.clone()
    for j in range(1, len(out)):
        out[j] = max(int(out[j]), int(out[j - 1]) + 1)
    over = out[-1] - (num_timesteps - 1)
    if over > 0:  # pushed past the end: pull the tail back down
        for j in range(len(out) - 1, 0, -1):
            out[j] = min(int(out[j]), num_timesteps - 1 - (len(out) - 1 - j))
    return out


GRIDS: dict[str, Callable[[NoiseSchedule, int], Tensor]] = {
    "linspace": lambda s, k: evenly_spaced_timesteps(s.num_timesteps, k),
    "leading": lambda s, k: leading_timesteps(s.num_timesteps, k),
    "trailing": lambda s, k: trailing_timesteps(s.num_timesteps, k),
    "quadratic": lambda s, k: quadratic_timesteps(s.num_timesteps, k),
    "logsnr": log_snr_timesteps,
    "logsnr_sparse": log_snr_sparse_timesteps,
    "karras": karras_timesteps,
}


# The grid each sampler uses when none is named. Ancestral and DDIM: Improved DDPM's evenly spaced
# respacing, which keeps both ends of the chain. DPM-Solver++ (ODE and SDE) and UniPC: uniform in
# log-SNR, where their steps are defined ("logsnr_sparse" is better on every exact mixture of benchmarks/samplers.py at 5-20
# evaluations but worse on a trained MNIST model, benchmarks/results/sampler_quality_mnist.json, so it
# is not the default). Heun: EDM's own grid.
DEFAULT_GRIDS = {
    "ancestral": "linspace",
    "ddim": "linspace",
    "dpm_solver": "logsnr",
    "sde_dpm_solver": "logsnr",
    "unipc": "logsnr",
    "heun": "karras",
    "ipndm": "logsnr_sparse",
}


def timestep_grid(schedule: NoiseSchedule, num_steps: int, grid: str = "linspace") -> Tensor:
    """The named grid of num_steps indices into ``schedule``, ascending (see ``GRIDS``)."""
    if grid not in GRIDS:
        raise ValueError(f"unknown timestep grid {grid!r}; known: {', '.join(GRIDS)}")
    return GRIDS[grid](schedule, num_steps)


def sample(
    model: Model,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    *,
    sampler: str = "ancestral",
    num_steps: int | None = None,
    grid: str | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    **options,
) -> SamplerOutput:
    """Draw x_T ~ N(0, I) of the given shape and run the named sampler, on the full chain or, with
    num_steps < T, on the schedule respaced onto that many points of the named grid (default: the
    sampler's entry in ``DEFAULT_GRIDS``). ``options`` go to the sampler (prediction, variance, clip_x0,
    dynamic_threshold, eta for DDIM, order for DPM-Solver++ and UniPC, variant and corrector for UniPC,
    record, progress). x_T and all noise are drawn on the generator's device (a CPU generator gives the
    same numbers for every ``device``) and moved to ``device``."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(sorted(SAMPLERS))}")
    if options.get("prediction", "eps") == "eps" and float(schedule.alpha_bar[-1]) == 0.0:
        # x0 = (x_T - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) is undefined at alpha_bar = 0.
        raise ValueError(
            "a zero-terminal-SNR schedule needs prediction 'v' or 'x0': eps-prediction cannot "
            "recover x_0 at the last step"
        )
    grid = DEFAULT_GRIDS[sampler] if grid is None else grid
    if num_steps is not None and (num_steps != schedule.num_timesteps or grid != "linspace"):
        schedule = respace(schedule, timestep_grid(schedule, num_steps, grid))
    x_T = _randn(shape, generator, device, dtype)
    return SAMPLERS[sampler](model, schedule, x_T, generator=generator, **options)
