"""Variance schedules beta_1..beta_T and every quantity derived from them, held in float64.

Timestep convention, stated once for the whole package: ``t`` is **0-based**. Index ``i`` holds the
paper's step ``i + 1``: ``beta[0]`` is beta_1, ``alpha_bar[T - 1]`` is alpha_bar_T, a sample "at t = i"
is the paper's x_{i+1}, and the posterior at index ``i`` is q(x_{i} | x_{i+1}, x_0) -- at index 0 the
"previous" sample is x_0 itself, so ``alpha_bar_prev[0] = 1``.

Networks are always called with the *original* timestep ``schedule.timesteps[i]`` (the identity map
unless the schedule was respaced), while every coefficient here is gathered by index ``i``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

_F64 = torch.float64


# --------------------------------------------------------------------------------------------------
# beta schedules: a function (num_timesteps, **options) -> beta [T] float64, plus a registry entry
# --------------------------------------------------------------------------------------------------


def _scaled_endpoints(num_timesteps: int, start: float, end: float) -> tuple[float, float]:
    # Improved DDPM rescales Ho et al.'s T=1000 endpoints by 1000/T so that other T keep a similar
    # total noise level (sum of beta).
    scale = 1000.0 / num_timesteps
    return scale * start, scale * end


def linear_beta(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """beta_t linear from beta_start to beta_end (Ho et al. sec. 4), endpoints scaled by 1000/T."""
    lo, hi = _scaled_endpoints(num_timesteps, beta_start, beta_end)
    return torch.linspace(lo, hi, num_timesteps, dtype=_F64)


def quadratic_beta(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """sqrt(beta_t) linear from sqrt(beta_start) to sqrt(beta_end) (Ho et al.'s "quad"), scaled by 1000/T."""
    lo, hi = _scaled_endpoints(num_timesteps, beta_start, beta_end)
    return torch.linspace(math.sqrt(lo), math.sqrt(hi), num_timesteps, dtype=_F64) ** 2


def cosine_beta(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal (2021) eq. 17: alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2);
    beta_t = min(1 - alpha_bar(t)/alpha_bar(t-1), max_beta). The cap only bites at the last step,
    where f(T) = 0 would give beta_T = 1."""
    steps = torch.arange(num_timesteps + 1, dtype=_F64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return torch.clamp(1 - f[1:] / f[:-1], max=max_beta)


def sigmoid_beta(
    num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02, width: float = 6.0
) -> Tensor:
    """beta_t = beta_start + (beta_end - beta_start) sigmoid(u), u linear in [-width, width] (GeoDiff)."""
    lo, hi = _scaled_endpoints(num_timesteps, beta_start, beta_end)
    u = torch.linspace(-width, width, num_timesteps, dtype=_F64)
    return lo + (hi - lo) * torch.sigmoid(u)


def constant_beta(num_timesteps: int, beta: float = 0.01) -> Tensor:
    """beta_t = beta for every t, scaled by 1000/T (so alpha_bar_T ~ exp(-10) at the default)."""
    return torch.full((num_timesteps,), beta * 1000.0 / num_timesteps, dtype=_F64)


BETA_SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "linear": linear_beta,
    "quadratic": quadratic_beta,
    "cosine": cosine_beta,
    "sigmoid": sigmoid_beta,
    "constant": constant_beta,
}


def rescale_zero_terminal_snr(beta: Tensor) -> Tensor:
    """Lin et al. (2023) Algorithm 1: shift and scale sqrt(alpha_bar) so that sqrt(alpha_bar_1) is kept
    and sqrt(alpha_bar_T) = 0 (terminal SNR exactly zero); returns the new beta (beta_T = 1)."""
    beta = torch.as_tensor(beta, dtype=_F64)
    sqrt_ab = torch.cumprod(1 - beta, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alpha = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alpha


# --------------------------------------------------------------------------------------------------
# the schedule object
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A variance schedule and its derived quantities, all float64 tensors of shape [T].

    alpha = 1 - beta;  alpha_bar = prod_{s<=t} alpha_s;  alpha_bar_prev[t] = alpha_bar[t-1] (1 at t=0);
    snr = alpha_bar / (1 - alpha_bar);  log_snr = log(snr);
    posterior_variance = beta~_t = (1 - alpha_bar_prev) / (1 - alpha_bar) * beta          (Ho et al. eq. 7)
    posterior_mean_coef_x0 = sqrt(alpha_bar_prev) beta / (1 - alpha_bar)                   (eq. 7)
    posterior_mean_coef_xt = sqrt(alpha) (1 - alpha_bar_prev) / (1 - alpha_bar)            (eq. 7)
    posterior_log_variance_clipped = log(beta~_t), except at t = 0 where beta~ = 0 and the released
    DDPM code uses log(beta~ at index 1) instead (the log of zero would be -inf).

    ``timesteps`` maps each index back to the original chain's t (arange(T) unless respaced).
    Build with :meth:`from_betas` or :meth:`from_name`; the fields are never written afterwards.
    """

    beta: Tensor
    alpha: Tensor
    alpha_bar: Tensor
    alpha_bar_prev: Tensor
    sqrt_alpha_bar: Tensor
    sqrt_one_minus_alpha_bar: Tensor
    snr: Tensor
    log_snr: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef_x0: Tensor
    posterior_mean_coef_xt: Tensor
    timesteps: Tensor

    @property
    def num_timesteps(self) -> int:
        return int(self.beta.shape[0])

    def __len__(self) -> int:
        return self.num_timesteps

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """The same schedule with every tensor on ``device`` (float64 stays float64)."""
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)}
        )

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(num_timesteps={self.num_timesteps}, beta=[{self.beta[0]:.3g} .. "
            f"{self.beta[-1]:.3g}], alpha_bar_T={self.alpha_bar[-1]:.3g})"
        )

    @classmethod
    def from_betas(
        cls, beta: Sequence[float] | Tensor, timesteps: Sequence[int] | Tensor | None = None
    ) -> NoiseSchedule:
        """The schedule of the given beta_1..beta_T (any array-like), validated and in float64.

        Every beta must lie in (0, 1); only the last may equal 1 (a zero-terminal-SNR schedule).
        """
        beta = _validated_beta(beta)
        n = beta.shape[0]
        alpha = 1 - beta
        alpha_bar = torch.cumprod(alpha, 0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=_F64), alpha_bar[:-1]])
        one_minus_ab = 1 - alpha_bar
        posterior_variance = beta * (1 - alpha_bar_prev) / one_minus_ab
        # beta~ at index 0 is exactly 0; the released code clips its log to beta~ at index 1. With T=1
        # there is no index 1 and we fall back to log(beta_1), the "fixed large" choice.
        first = posterior_variance[1] if n > 1 else beta[0]
        posterior_log_variance_clipped = torch.log(
            torch.cat([first.reshape(1), posterior_variance[1:]])
        )
        if timesteps is None:
            timesteps = torch.arange(n, dtype=torch.long)
        timesteps = torch.as_tensor(timesteps, dtype=torch.long)
        if timesteps.shape != (n,):
            raise ValueError(f"timesteps must have shape ({n},), got {tuple(timesteps.shape)}")
        return cls(
            beta=beta,
            alpha=alpha,
            alpha_bar=alpha_bar,
            alpha_bar_prev=alpha_bar_prev,
            sqrt_alpha_bar=alpha_bar.sqrt(),
            sqrt_one_minus_alpha_bar=one_minus_ab.sqrt(),
            snr=alpha_bar / one_minus_ab,
            log_snr=torch.log(alpha_bar) - torch.log(one_minus_ab),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=posterior_log_variance_clipped,
            posterior_mean_coef_x0=beta * alpha_bar_prev.sqrt() / one_minus_ab,
            posterior_mean_coef_xt=alpha.sqrt() * (1 - alpha_bar_prev) / one_minus_ab,
            timesteps=timesteps,
        )

    @classmethod
    def from_name(
        cls, name: str, num_timesteps: int = 1000, *, zero_terminal_snr: bool = False, **options
    ) -> NoiseSchedule:
        """The named schedule (see ``BETA_SCHEDULES``) with T = num_timesteps; options go to its function."""
        if name not in BETA_SCHEDULES:
            known = ", ".join(sorted(BETA_SCHEDULES))
            raise ValueError(f"unknown beta schedule {name!r}; known: {known}")
        if (
            isinstance(num_timesteps, bool)
            or not isinstance(num_timesteps, int)
            or num_timesteps < 1
        ):
            raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
        beta = BETA_SCHEDULES[name](num_timesteps, **options)
        if zero_terminal_snr:
            beta = rescale_zero_terminal_snr(beta)
        elif beta[-1] >= 1:
            # Only an explicit zero-terminal-SNR request may end at beta = 1 (alpha_bar_T = 0), where
            # eps-prediction cannot recover x_0.
            raise ValueError(
                f"{name} schedule with T={num_timesteps} reaches beta = {float(beta[-1]):.3g} >= 1; "
                "use more timesteps or zero_terminal_snr=True"
            )
        try:
            return cls.from_betas(beta)
        except ValueError as err:
            raise ValueError(f"{name} schedule with T={num_timesteps}: {err}") from None


def _validated_beta(beta) -> Tensor:
    beta = torch.as_tensor(beta, dtype=_F64).detach().cpu()
    if beta.ndim != 1 or beta.shape[0] < 1:
        raise ValueError(
            f"beta must be a non-empty 1-D array (T >= 1), got shape {tuple(beta.shape)}"
        )
    if not torch.isfinite(beta).all():
        raise ValueError("beta contains NaN or infinite values")
    inner = beta[:-1]
    if (beta <= 0).any() or (inner >= 1).any() or beta[-1] > 1:
        raise ValueError(
            f"every beta must lie in (0, 1) (only the last may be 1); got min {beta.min():.4g}, "
            f"max {beta.max():.4g}"
        )
    return beta.clone()


def respace(schedule: NoiseSchedule, kept_timesteps: Sequence[int] | Tensor) -> NoiseSchedule:
    """The schedule restricted to a subset of steps (Nichol & Dhariwal 2021, sec. 4).

    alpha_bar is kept on the kept steps k_0 < k_1 < ...; the new betas are
    beta_i = 1 - alpha_bar[k_i] / alpha_bar[k_{i-1}] (with alpha_bar[k_{-1}] = 1), so every derived
    quantity, the posterior variance included, is computed from the respaced betas, not the old ones.
    ``timesteps`` of the result maps each new index to the original chain's t.
    """
    kept = torch.as_tensor(kept_timesteps, dtype=torch.long).flatten()
    if kept.numel() == 0:
        raise ValueError("respace needs at least one timestep to keep")
    kept = torch.unique(kept)  # sorted, duplicates dropped
    if kept[0] < 0 or kept[-1] >= schedule.num_timesteps:
        raise ValueError(
            f"kept timesteps must lie in [0, {schedule.num_timesteps - 1}], got "
            f"[{int(kept[0])}, {int(kept[-1])}]"
        )
    alpha_bar = schedule.alpha_bar[kept]
    prev = torch.cat([torch.ones(1, dtype=_F64), alpha_bar[:-1]])
    return NoiseSchedule.from_betas(1 - alpha_bar / prev, timesteps=schedule.timesteps[kept])


def extract(coef: Tensor, t: Tensor | int, x: Tensor) -> Tensor:
    """coef[t] reshaped to [B, 1, ..., 1] (broadcastable against x) and cast to x's dtype and device.

    The single place where float64 schedule values meet the data: gathered on the schedule's device
    in float64, cast only afterwards (MPS has no float64; bf16 data gets the nearest bf16 value).
    """
    t = torch.as_tensor(t, device=coef.device).long()
    out = coef[t]
    if t.ndim == 0:
        return out.to(device=x.device, dtype=x.dtype)
    return out.to(device=x.device, dtype=x.dtype).reshape(t.shape[0], *([1] * (x.ndim - 1)))
