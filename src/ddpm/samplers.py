"""Samplers: functions with one shared signature, chosen by name from ``SAMPLERS``.

    sampler(model, schedule, x_T, *, prediction, variance, clip_x0, generator, record, progress)
        -> SamplerOutput(x0, trajectory)

``model(x_t, t) -> output`` is any callable (a network in eval mode, the exact oracle, ...) and is
always called with the *original* timesteps ``schedule.timesteps[i]``; the step itself uses only
``ddpm.diffusion``. Sampling runs under ``torch.no_grad``.
"""

from __future__ import annotations

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


@torch.no_grad()
def ancestral_sample(
    model: Model,
    schedule: NoiseSchedule,
    x_T: Tensor,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = False,
    generator: torch.Generator | None = None,
    record: Sequence[int] = (),
    progress: bool = False,
) -> SamplerOutput:
    """Algorithm 2 of Ho et al.: for i = T-1 .. 0, x_{i-1} = mu_theta(x_i, i) + sigma_i z, z ~ N(0, I)
    (no noise at i = 0). On a respaced schedule this is Improved DDPM's strided ancestral sampler."""
    x = x_T
    record = set(int(r) for r in record)
    trajectory: dict[int, Tensor] = {}
    batch = x.shape[0]
    steps = range(schedule.num_timesteps - 1, -1, -1)
    for i in tqdm(steps, desc="sampling", disable=not progress, leave=False):
        if i in record:
            trajectory[i] = x.detach().cpu()
        t = torch.full((batch,), i, dtype=torch.long, device=x.device)
        t_model = schedule.timesteps[t.cpu()].to(x.device)
        out = model(x, t_model)
        pmv = p_mean_variance(
            schedule,
            x,
            t,
            out.to(x.dtype),
            prediction=prediction,
            variance=variance,
            clip_x0=clip_x0,
        )
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = p_sample_step(pmv, t, z)
    trajectory[-1] = x.detach().cpu()
    return SamplerOutput(x, trajectory)


SAMPLERS: dict[str, Callable[..., SamplerOutput]] = {"ancestral": ancestral_sample}


def evenly_spaced_timesteps(num_timesteps: int, num_steps: int) -> Tensor:
    """num_steps indices spread evenly over [0, T-1], always including 0 and T-1 ("linspace" grid)."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {num_steps}")
    if num_steps == 1:
        return torch.tensor([num_timesteps - 1])
    return torch.linspace(0, num_timesteps - 1, num_steps, dtype=torch.float64).round().long()


def sample(
    model: Model,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    *,
    sampler: str = "ancestral",
    num_steps: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    **options,
) -> SamplerOutput:
    """Draw x_T ~ N(0, I) of the given shape and run the named sampler on it, on the full chain or, with
    num_steps < T, on the schedule respaced to that many evenly spaced steps."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(sorted(SAMPLERS))}")
    if num_steps is not None and num_steps != schedule.num_timesteps:
        schedule = respace(schedule, evenly_spaced_timesteps(schedule.num_timesteps, num_steps))
    x_T = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    return SAMPLERS[sampler](model, schedule, x_T, generator=generator, **options)
