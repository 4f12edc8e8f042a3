"""Editing an existing x_0 with a trained model, no retraining: inpainting (RePaint and plain
replacement), SDEdit, DDIM inversion and reconstruction, and slerp interpolation between two x_T.

Like the samplers, every function takes ``model(x_t, t) -> output`` as a callable (wrap a
class-conditional one with :func:`ddpm.guidance.classifier_free_guidance`), the chain to walk (the
full schedule, or one respaced onto a grid; the model always sees the original timesteps
``schedule.timesteps[i]``), and a ``generator`` for its noise, which may live on the CPU while the
data are elsewhere. Indices are 0-based as in ``ddpm.schedules``: index i is the paper's step i + 1,
and "index -1" below is x_0 itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from ddpm.diffusion import p_mean_variance, p_sample_step, q_sample, q_step
from ddpm.samplers import SAMPLERS, SamplerOutput
from ddpm.schedules import NoiseSchedule, respace

Tensor = torch.Tensor
Model = Callable[[Tensor, Tensor], Tensor]


def _randn(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """N(0, I) noise shaped like x, drawn on the generator's device and moved to x's."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _index(i: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)


def _model_t(schedule: NoiseSchedule, i: int, x: Tensor) -> Tensor:
    """The original timestep [B] the network sees at index i of the chain."""
    return schedule.timesteps[i].expand(x.shape[0]).to(x.device)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------------------------------
# inpainting: RePaint (Lugmayr et al. 2022) and plain replacement (resample = 1)
# --------------------------------------------------------------------------------------------------


class InpaintOutput(NamedTuple):
    """The inpainted x_0 (known entries exactly the input's) and the number of network calls."""

    x0: Tensor
    num_model_calls: int


def repaint_schedule(num_timesteps: int, jump_length: int = 10, resample: int = 10) -> list[int]:
    """The order in which RePaint visits the indices (their ``get_schedule_jump``): from T-1 down by
    one to -1 (x_0), except that on reaching index j, 2j, ... (below T - jump_length; index 0
    included) it goes back up ``jump_length`` steps, ``resample - 1`` times, before going on down.
    Consecutive entries differ by one: down is a reverse step, up a forward step q(x_{i+1} | x_i).
    ``resample = 1`` has no jumps: T-1, T-2, ..., 0, -1."""
    _check_positive_int("num_timesteps", num_timesteps)
    _check_positive_int("jump_length", jump_length)
    _check_positive_int("resample", resample)
    jumps = {j: resample - 1 for j in range(0, num_timesteps - jump_length, jump_length)}
    t = num_timesteps
    order = []
    while t >= 1:
        t -= 1
        order.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                order.append(t)
    order.append(-1)
    return order


def _check_mask(x0: Tensor, mask: Tensor) -> Tensor:
    mask = torch.as_tensor(mask, device=x0.device)
    try:
        shape = torch.broadcast_shapes(mask.shape, x0.shape)
    except RuntimeError:
        shape = None
    if shape != x0.shape:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not fit the image of shape {tuple(x0.shape)} "
            "(it must have that shape, or broadcast to it, e.g. [1, 1, H, W])"
        )
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must hold only 0 (to fill in) and 1 (known)")
    return mask.to(x0.dtype)


@torch.no_grad()
def inpaint(
    model: Model,
    schedule: NoiseSchedule,
    x0: Tensor,
    mask: Tensor,
    *,
    jump_length: int = 10,
    resample: int = 10,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = False,
    dynamic_threshold: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> InpaintOutput:
    """Fill in the entries of x0 where ``mask`` is 0, keeping those where it is 1 (RePaint, Lugmayr
    et al. 2022, Algorithm 1 with the jumps of their sec. 4.2).

    Each reverse step from index i draws both parts of x_{i-1} and joins them (eq. 8):
        known    x_{i-1} ~ q(x_{i-1} | x_0) = N(sqrt(alpha_bar_{i-1}) x_0, (1 - alpha_bar_{i-1}) I)
        unknown  x_{i-1} ~ p_theta(x_{i-1} | x_i)        (Algorithm 2's step; x_0 itself at i = 0)
        x_{i-1} = mask * known + (1 - mask) * unknown;
    each forward step of :func:`repaint_schedule` goes back up with q(x_{i+1} | x_i) (eq. 2), so
    that the unknown part can harmonise with the known part. ``resample = 1`` is plain replacement
    (the baseline: no forward steps). ``mask`` has x0's shape or broadcasts to it (1 = known).
    """
    mask = _check_mask(x0, mask)
    order = repaint_schedule(schedule.num_timesteps, jump_length, resample)

    def known_at(i: int) -> Tensor:  # a fresh draw from q(x at index i | x_0); x_0 itself at -1
        return x0 if i < 0 else q_sample(schedule, x0, _index(i, x0), _randn(x0, generator))

    x = mask * known_at(order[0]) + (1 - mask) * _randn(x0, generator)
    calls = 0
    for cur, nxt in tqdm(
        list(zip(order[:-1], order[1:], strict=True)),
        desc="inpainting",
        disable=not progress,
        leave=False,
    ):
        if nxt > cur:  # forward: x_{cur+1} ~ q(x_{cur+1} | x_cur), i.e. q_step at index nxt
            x = q_step(schedule, x, _index(nxt, x), _randn(x, generator))
            continue
        t = _index(cur, x)
        out = model(x, _model_t(schedule, cur, x)).to(x.dtype)
        calls += 1
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
        unknown = p_sample_step(pmv, t, _randn(x, generator))
        x = mask * known_at(nxt) + (1 - mask) * unknown
    return InpaintOutput(x, calls)


# --------------------------------------------------------------------------------------------------
# SDEdit (Meng et al. 2022): noise to t0 = strength T with q(x_t0 | x_0), then denoise from there
# --------------------------------------------------------------------------------------------------


class SDEditOutput(NamedTuple):
    """The edited x_0, the noised input x_start it was denoised from, and that index."""

    x0: Tensor
    x_start: Tensor
    start_index: int


def start_index(num_timesteps: int, strength: float) -> int:
    """The index at which a fraction ``strength`` in (0, 1] of the chain remains: round(strength K) - 1,
    at least 0 (1 is the full chain, from x_T)."""
    if (
        isinstance(strength, bool)
        or not isinstance(strength, (int, float))
        or not 0.0 < strength <= 1.0
    ):
        raise ValueError(f"strength must lie in (0, 1], got {strength!r}")
    return max(round(strength * num_timesteps), 1) - 1


def denoise_from(
    model: Model,
    schedule: NoiseSchedule,
    x_t: Tensor,
    index: int,
    *,
    sampler: str = "ancestral",
    generator: torch.Generator | None = None,
    **options,
) -> SamplerOutput:
    """Run the named sampler (``SAMPLERS``) from x_t, a sample at ``index`` of ``schedule``, to x_0:
    on the chain cut at that index (``respace`` to its first index + 1 steps, which keeps every
    alpha_bar and original timestep, so the sampler's first step is at ``index``). ``options`` go to
    the sampler (prediction, variance, clip_x0, eta, order, ...)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(sorted(SAMPLERS))}")
    if not 0 <= index < schedule.num_timesteps:
        raise ValueError(f"index must lie in [0, {schedule.num_timesteps - 1}], got {index}")
    if options.get("prediction", "eps") == "eps" and float(schedule.alpha_bar[index]) == 0.0:
        raise ValueError(
            "a zero-terminal-SNR step needs prediction 'v' or 'x0': eps-prediction cannot "
            "recover x_0 there"
        )
    chain = schedule
    if index < schedule.num_timesteps - 1:
        chain = respace(schedule, torch.arange(index + 1))
    return SAMPLERS[sampler](model, chain, x_t, generator=generator, **options)


@torch.no_grad()
def sdedit(
    model: Model,
    schedule: NoiseSchedule,
    x0: Tensor,
    strength: float,
    *,
    sampler: str = "ancestral",
    generator: torch.Generator | None = None,
    **options,
) -> SDEditOutput:
    """SDEdit (Meng et al. 2022, Algorithm 1 in DDPM form): x_start ~ q(x_k | x0) =
    N(sqrt(alpha_bar_k) x0, (1 - alpha_bar_k) I) with k = :func:`start_index` (strength of the chain),
    then the named sampler from x_start to x_0 (:func:`denoise_from`). Small strengths stay close to
    x0; strength 1 keeps almost nothing of it."""
    k = start_index(schedule.num_timesteps, strength)
    x_start = q_sample(schedule, x0, _index(k, x0), _randn(x0, generator))
    out = denoise_from(model, schedule, x_start, k, sampler=sampler, generator=generator, **options)
    return SDEditOutput(out.x0, x_start, k)


# --------------------------------------------------------------------------------------------------
# DDIM inversion: the deterministic DDIM update (eta = 0) run from x_0 towards x_T
# --------------------------------------------------------------------------------------------------


class InversionOutput(NamedTuple):
    """The x_T that DDIM (eta = 0) on the same chain maps back to (approximately) the given x_0."""

    x_T: Tensor


class ReconstructionOutput(NamedTuple):
    """x_T from :func:`ddim_invert`, x0 generated back from it, and the RMS error per example [B]."""

    x_T: Tensor
    x0: Tensor
    error: Tensor


@torch.no_grad()
def ddim_invert(
    model: Model,
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    progress: bool = False,
) -> InversionOutput:
    """DDIM inversion (Song et al. 2021 sec. 4.3; Dhariwal & Nichol 2021 app. F): eq. 12 with
    eta = 0 run upwards, for i = 0 .. K-1,

        x_i = sqrt(alpha_bar_i) x0_pred + sqrt(1 - alpha_bar_i) eps_pred,

    with (x0_pred, eps_pred) from the model at the point just left, (x_{i-1}, t_{i-1}): the update
    is explicit, and the approximation eps(x_{i-1}) ~ eps(x_i) is the error that more steps shrink.
    At i = 0 the point left is x_0 itself (x0_pred = x_0), with eps_pred from the model at t_0.
    """
    x = x0
    ab = schedule.alpha_bar
    for i in tqdm(
        range(schedule.num_timesteps), desc="inverting", disable=not progress, leave=False
    ):
        e = max(i - 1, 0)
        out = model(x, _model_t(schedule, e, x)).to(x.dtype)
        pmv = p_mean_variance(
            schedule, x, _index(e, x), out, prediction=prediction, variance=variance
        )
        x0_pred = x if i == 0 else pmv.x0_pred
        x = math.sqrt(ab[i].item()) * x0_pred + math.sqrt(1 - ab[i].item()) * pmv.eps_pred
    return InversionOutput(x)


def ddim_reconstruct(
    model: Model,
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    progress: bool = False,
) -> ReconstructionOutput:
    """:func:`ddim_invert`, then DDIM (eta = 0) on the same chain back to x_0; the error is
    sqrt(mean((x0_rec - x0)^2)) over all but the batch dimension."""
    x_T = ddim_invert(
        model, schedule, x0, prediction=prediction, variance=variance, progress=progress
    ).x_T
    rec = SAMPLERS["ddim"](
        model, schedule, x_T, eta=0.0, prediction=prediction, variance=variance, progress=progress
    ).x0
    error = (rec - x0).reshape(x0.shape[0], -1).square().mean(1).sqrt()
    return ReconstructionOutput(x_T, rec, error)


# --------------------------------------------------------------------------------------------------
# interpolation between two x_T
# --------------------------------------------------------------------------------------------------


class InterpolationOutput(NamedTuple):
    """Frames along the slerp path: weights [F], their x_T [F, ...] and the decoded x_0 [F, ...]."""

    weights: Tensor
    x_T: Tensor
    x0: Tensor


def slerp(x_a: Tensor, x_b: Tensor, weights: Tensor) -> Tensor:
    """Spherical interpolation between two points (all elements one vector), one frame per weight:

        slerp(w) = sin((1 - w) theta) / sin(theta) x_a + sin(w theta) / sin(theta) x_b,
        cos(theta) = <x_a, x_b> / (|x_a| |x_b|),

    shape [F, *x_a.shape]. Why not a straight line: for Gaussian x_T in high dimension the norm
    concentrates near sqrt(D), and the midpoint of a line between two independent draws has norm
    ~ sqrt(D / 2), a point the model has never seen; slerp keeps the norm. Falls back to the
    straight line when the two are (nearly) parallel."""
    if x_a.shape != x_b.shape:
        raise ValueError(
            f"slerp needs two points of one shape, got {tuple(x_a.shape)} and {tuple(x_b.shape)}"
        )
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1, *([1] * x_a.ndim))
    if not torch.isfinite(w).all():
        raise ValueError("slerp weights must be finite")
    a, b = x_a.to(torch.float64), x_b.to(torch.float64)
    cos = (a * b).sum() / (a.norm() * b.norm())
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    if torch.sin(theta) < 1e-6:
        out = (1 - w) * a + w * b
    else:
        out = (torch.sin((1 - w) * theta) * a + torch.sin(w * theta) * b) / torch.sin(theta)
    return out.to(device=x_a.device, dtype=x_a.dtype)


def interpolate(
    model: Model,
    schedule: NoiseSchedule,
    x_T_a: Tensor,
    x_T_b: Tensor,
    num_frames: int,
    *,
    sampler: str = "ddim",
    generator: torch.Generator | None = None,
    **options,
) -> InterpolationOutput:
    """``num_frames`` evenly spaced slerp frames from x_T_a to x_T_b (one example each, e.g.
    [C, H, W]; inverted with :func:`ddim_invert` or drawn at random), decoded in one batch by the
    named sampler (DDIM with eta = 0 by default: deterministic, so the strip varies smoothly)."""
    _check_positive_int("num_frames", num_frames)
    if num_frames < 2:
        raise ValueError(f"num_frames must be at least 2, got {num_frames}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(sorted(SAMPLERS))}")
    weights = torch.linspace(0, 1, num_frames, dtype=torch.float64)
    x_T = slerp(x_T_a, x_T_b, weights)
    x0 = SAMPLERS[sampler](model, schedule, x_T, generator=generator, **options).x0
    return InterpolationOutput(weights, x_T, x0)
