"""Samplers: functions with one shared signature, chosen by name from ``SAMPLERS``.

    sampler(model, schedule, x_T, *, prediction, variance, clip_x0, dynamic_threshold, generator,
            record, progress)
        -> SamplerOutput(x0, trajectory)

``schedule`` is the chain to walk: the full one, or one respaced onto a timestep grid (``GRIDS``), in
which case the previous step of every update is the previous point *of the grid*, never a fixed stride.
``model(x_t, t) -> output`` is any callable (a network in eval mode, the exact oracle, ...) and is always
called with the *original* timesteps ``schedule.timesteps[i]``; the updates themselves use only the
schedule's coefficients. Sampling runs under ``torch.no_grad``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from ddpm.diffusion import p_mean_variance, p_sample_step
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

    def update(i, t, t_model, x):
        out = model(x, t_model).to(x.dtype)
        pmv = p_mean_variance(
            schedule,
            x,
            t,
            out,
            prediction=prediction,
            variance=variance,
            clip_x0=clip_x0,
            dynamic_threshold=dynamic_threshold,
        )
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return p_sample_step(pmv, t, z)

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

    def update(i, t, t_model, x):
        out = model(x, t_model).to(x.dtype)
        pmv = p_mean_variance(
            schedule,
            x,
            t,
            out,
            prediction=prediction,
            variance=variance,
            clip_x0=clip_x0,
            dynamic_threshold=dynamic_threshold,
        )
        a, a_prev = ab[i].item(), ab_prev[i].item()
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        x_prev = (
            math.sqrt(a_prev) * pmv.x0_pred
            + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * pmv.eps_pred
        )
        if sigma > 0:
            x_prev = x_prev + sigma * torch.randn(
                x.shape, generator=generator, device=x.device, dtype=x.dtype
            )
        return x_prev

    return _loop(schedule, x_T, record, progress, update)


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
    """DPM-Solver++ multistep (Lu et al. 2022, Algorithm 2 / "3M"), in data prediction, on the grid.

    Translated into our names: their alpha_t is sqrt(alpha_bar), sigma_t = sqrt(1 - alpha_bar),
    lambda = log(alpha_t / sigma_t) = log_snr / 2. From grid point s (x_s) to the next, less noisy point
    u with h = lambda_u - lambda_s and D_s = x0_pred(x_s):
      order 1:  x_u = (sigma_u / sigma_s) x_s - alpha_u expm1(-h) D_s                     (= DDIM, eta = 0)
      order 2:  ... - alpha_u expm1(-h) (D_s + (D_s - D_prev) / (2 r)),  r = h_prev / h
      order 3:  adds the second divided difference (their eqs. for 3M).
    The first steps use lower orders (no history yet); with ``lower_order_final`` so do the last ones
    when there are fewer than 15 steps, as the authors recommend. The last update goes to alpha_bar = 1
    (x_0) and returns the data prediction there. Deterministic: ``generator`` is unused.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order}")
    T = schedule.num_timesteps
    alpha = schedule.sqrt_alpha_bar
    sigma = schedule.sqrt_one_minus_alpha_bar
    lam = torch.log(alpha) - torch.log(
        sigma
    )  # -inf at a zero-terminal-SNR step: expm1(-inf) = -1 works
    history: list[tuple[Tensor, float]] = []  # (x0_pred, lambda) of the latest points, newest last

    def update(i, t, t_model, x):
        out = model(x, t_model).to(x.dtype)
        pmv = p_mean_variance(
            schedule,
            x,
            t,
            out,
            prediction=prediction,
            variance=variance,
            clip_x0=clip_x0,
            dynamic_threshold=dynamic_threshold,
        )
        d = pmv.x0_pred
        if i == 0:
            return d  # the next point is x_0 itself (sigma = 0): the data prediction
        history.append((d, lam[i].item()))
        del history[:-3]
        lam_u, a_u, s_u, s_s = (
            lam[i - 1].item(),
            alpha[i - 1].item(),
            sigma[i - 1].item(),
            sigma[i].item(),
        )
        lam_s = lam[i].item()
        h = lam_u - lam_s
        phi_1 = math.expm1(-h)
        steps_left = i  # updates still to come after this one, counting the final jump to x_0
        k = min(order, len(history))
        if lower_order_final and T < 15:
            k = min(k, steps_left)
        x_u = (s_u / s_s) * x - a_u * phi_1 * d
        if k >= 2:
            d1, lam_1 = history[-2]
            r0 = (lam_s - lam_1) / h
            d1_0 = (d - d1) / r0
            if k == 2:
                x_u = x_u - 0.5 * a_u * phi_1 * d1_0
            else:
                d2, lam_2 = history[-3]
                r1 = (lam_1 - lam_2) / h
                d1_1 = (d1 - d2) / r1
                first = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                second = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = phi_1 / h + 1.0
                phi_3 = phi_2 / h - 0.5
                x_u = x_u + a_u * phi_2 * first - a_u * phi_3 * second
        return x_u

    return _loop(schedule, x_T, record, progress, update)


SAMPLERS: dict[str, Callable[..., SamplerOutput]] = {
    "ancestral": ancestral_sample,
    "ddim": ddim_sample,
    "dpm_solver": dpm_solver_sample,
}


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


def log_snr_timesteps(schedule: NoiseSchedule, num_steps: int) -> Tensor:
    """ "logsnr": the steps whose log-SNR is nearest to K values uniform in log-SNR between the last and
    the first step (DPM-Solver's "logSNR" spacing); starts at T-1, ends at 0."""
    T = schedule.num_timesteps
    _check_steps(T, num_steps)
    log_snr = schedule.log_snr.clamp(min=-30.0)  # a zero-terminal SNR is -inf
    targets = torch.linspace(float(log_snr[0]), float(log_snr[-1]), num_steps, dtype=torch.float64)
    grid = (log_snr[None, :] - targets[:, None]).abs().argmin(dim=1)
    return _distinct(grid.sort().values, T)


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
}


# The grid each sampler uses when none is named. Ancestral and DDIM: Improved DDPM's evenly spaced
# respacing, which keeps both ends of the chain. DPM-Solver++: uniform in log-SNR, where its steps are
# defined; on the linspace grid its 2M variant over-disperses at 20 steps (benchmarks/samplers.py).
DEFAULT_GRIDS = {"ancestral": "linspace", "ddim": "linspace", "dpm_solver": "logsnr"}


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
    dynamic_threshold, eta for DDIM, order for DPM-Solver++, record, progress)."""
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
    x_T = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    return SAMPLERS[sampler](model, schedule, x_T, generator=generator, **options)
