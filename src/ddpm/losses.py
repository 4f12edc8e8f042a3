"""Training objectives and the terms of the variational bound (Ho et al. 2020, eqs. 5, 12, 14).

Per-example results are [B]; the caller reduces. Bound terms come in nats per example unless their
name ends in ``_bpd`` (bits per dimension: nats / (num_dims * ln 2)).
"""

from __future__ import annotations

import math

import torch

from ddpm.diffusion import p_mean_variance, q_posterior_mean_variance, target_for
from ddpm.schedules import NoiseSchedule, extract

Tensor = torch.Tensor

# Reference DDPM code clamps probabilities at 1e-12 before the log so that an empty bin costs
# ~27.6 nats instead of inf; we keep it so our bits/dim compare with published figures.
_LOG_FLOOR = 1e-12


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the first: [B, ...] -> [B]."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def nats_to_bpd(nats: Tensor, num_dims: int) -> Tensor:
    """Convert a per-example negative log-likelihood in nats to bits per dimension."""
    return nats / (num_dims * math.log(2.0))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats:
    0.5 (-1 + logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^(-logvar2))."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Phi(x) ~ 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the approximation of the reference
    DDPM code (kept by default so our bits/dim compare with published ones)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x0: Tensor, mean: Tensor, log_variance: Tensor, *, exact_cdf: bool = False
) -> Tensor:
    """log p(x_0 | x_1) of Ho et al. eq. 13, elementwise, in nats, for 8-bit data scaled to [-1, 1].

    Each value owns the bin [x - 1/255, x + 1/255] of N(mean, e^log_variance); the edge bins extend to
    -inf (x = -1) and +inf (x = 1), so the 256 bin probabilities sum to exactly 1. ``exact_cdf`` uses
    the exact normal CDF (``torch.special``) instead of the reference tanh approximation.
    """
    centered = x0 - mean
    inv_std = torch.exp(-0.5 * log_variance)
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    if exact_cdf:
        log_cdf_upper = torch.special.log_ndtr(upper)
        log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)
        cdf_delta = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    else:
        cdf_upper = approx_standard_normal_cdf(upper)
        cdf_lower = approx_standard_normal_cdf(lower)
        log_cdf_upper = torch.log(cdf_upper.clamp(min=_LOG_FLOOR))
        log_one_minus_cdf_lower = torch.log((1.0 - cdf_lower).clamp(min=_LOG_FLOOR))
        cdf_delta = cdf_upper - cdf_lower
    log_delta = torch.log(cdf_delta.clamp(min=_LOG_FLOOR))
    # Thresholds at +-0.999 rather than +-1: data scaled from uint8 land on the edges only up to rounding.
    return torch.where(
        x0 < -0.999,
        log_cdf_upper,
        torch.where(x0 > 0.999, log_one_minus_cdf_lower, log_delta),
    )


def gaussian_log_likelihood(x0: Tensor, mean: Tensor, log_variance: Tensor) -> Tensor:
    """log N(x_0; mean, e^log_variance), elementwise, in nats: the decoder for continuous data."""
    return -0.5 * (
        math.log(2 * math.pi) + log_variance + (x0 - mean) ** 2 * torch.exp(-log_variance)
    )


DECODERS = ("discretized", "discretized_exact", "gaussian")


def decoder_nll(
    x0: Tensor, mean: Tensor, log_variance: Tensor, decoder: str = "discretized"
) -> Tensor:
    """L_0 = -log p_theta(x_0 | x_1) per example, in nats (summed over dimensions).

    ``discretized``: eq. 13 with the reference CDF approximation; ``discretized_exact``: the exact CDF;
    ``gaussian``: a continuous density, for data that are not 8-bit images (e.g. 2-D toy data).
    """
    if decoder == "discretized":
        ll = discretized_gaussian_log_likelihood(x0, mean, log_variance)
    elif decoder == "discretized_exact":
        ll = discretized_gaussian_log_likelihood(x0, mean, log_variance, exact_cdf=True)
    elif decoder == "gaussian":
        ll = gaussian_log_likelihood(x0, mean, log_variance)
    else:
        raise ValueError(f"unknown decoder {decoder!r}; known: {', '.join(DECODERS)}")
    return -ll.reshape(ll.shape[0], -1).sum(dim=1)


def vlb_term(
    s: NoiseSchedule,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    model_mean: Tensor,
    model_log_variance: Tensor,
    *,
    decoder: str = "discretized",
) -> Tensor:
    """One term of the bound (eq. 5), per example, in nats:
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) for t > 0, and L_0 = -log p(x_0 | x_1)
    at t = 0 (0-based index). ``model_mean``/``model_log_variance`` come from ``p_mean_variance``."""
    true = q_posterior_mean_variance(s, x0, x_t, t)
    kl = normal_kl(true.mean, true.log_variance, model_mean, model_log_variance)
    kl = kl.reshape(kl.shape[0], -1).sum(dim=1)
    nll = decoder_nll(x0, model_mean, model_log_variance, decoder)
    return torch.where(torch.as_tensor(t, device=kl.device) == 0, nll, kl)


def prior_kl(s: NoiseSchedule, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) per example, in nats. It has no parameters (eq. 5)."""
    t_last = torch.full((x0.shape[0],), s.num_timesteps - 1, dtype=torch.long)
    mean = extract(s.sqrt_alpha_bar, t_last, x0) * x0
    log_variance = extract(torch.log1p(-s.alpha_bar), t_last, x0)
    kl = normal_kl(mean, log_variance, torch.zeros_like(x0), torch.zeros_like(x0))
    return kl.reshape(kl.shape[0], -1).sum(dim=1)


def simple_loss(target: Tensor, prediction: Tensor, weight: Tensor | None = None) -> Tensor:
    """L_simple (eq. 14), per example: mean over dimensions of ||target - prediction||^2, optionally
    times a per-example weight [B] (e.g. ``min_snr_weight``). With target = eps this is
    ||eps - eps_theta(sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps, t)||^2."""
    loss = mean_flat((target - prediction) ** 2)
    return loss if weight is None else loss * weight.to(loss.dtype)


def min_snr_weight(
    s: NoiseSchedule, t: Tensor, gamma: float = 5.0, prediction: str = "eps"
) -> Tensor:
    """Min-SNR-gamma weight (Hang et al. 2023), [B] float32, expressed for the given target so that the
    effective x_0-space weight is min(SNR_t, gamma): eps -> min(SNR, gamma)/SNR, x0 -> min(SNR, gamma),
    v -> min(SNR, gamma)/(SNR + 1)."""
    snr = s.snr[torch.as_tensor(t, device=s.snr.device).long()]
    clipped = torch.clamp(snr, max=gamma)
    if prediction == "eps":
        # SNR = 0 at a zero-terminal step: the limit of min(SNR, gamma)/SNR there is 1.
        w = torch.where(
            snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr)
        )
    elif prediction == "x0":
        w = clipped
    elif prediction == "v":
        w = clipped / (snr + 1)
    else:
        raise ValueError(f"unknown prediction {prediction!r}")
    return w.float()


OBJECTIVES = ("simple", "hybrid", "vlb")


def training_loss(
    s: NoiseSchedule,
    model_output: Tensor,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    eps: Tensor,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    objective: str | None = None,
    vlb_weight: float = 0.001,
    min_snr_gamma: float | None = None,
    decoder: str = "discretized",
) -> Tensor:
    """The per-example training loss [B] at the drawn t, for x_t = q_sample(x0, t, eps).

      simple  L_simple (eq. 14) on the prediction's target (eps, x0 or v), optionally Min-SNR weighted
      hybrid  L_simple + lambda T L_t (Nichol & Dhariwal eq. 16): T L_t in bits/dim is an unbiased
              estimate of L_vlb = sum_t L_t, and the mean is detached inside it so that L_vlb trains
              only the learned variance
      vlb     T L_t alone, through the mean and the variance (their L_vlb)
    ``objective`` None means hybrid for learned variances, simple otherwise. Learned variances need
    2C output channels (prediction, then variance)."""
    learned = variance in ("learned", "learned_range")
    objective = objective or ("hybrid" if learned else "simple")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    if objective == "hybrid" and not learned:
        raise ValueError("the hybrid objective needs a learned variance")
    out = model_output.float()
    mean_out = out.chunk(2, dim=1)[0] if learned else out
    if objective == "vlb":
        return _vlb_loss(s, out, x0, x_t, t, prediction, variance, decoder)
    weight = None if min_snr_gamma is None else min_snr_weight(s, t, min_snr_gamma, prediction)
    loss = simple_loss(target_for(s, x0, t, eps, prediction), mean_out, weight)
    if objective == "hybrid":
        frozen = torch.cat([mean_out.detach(), out.chunk(2, dim=1)[1]], dim=1)
        loss = loss + vlb_weight * _vlb_loss(s, frozen, x0, x_t, t, prediction, variance, decoder)
    return loss


def _vlb_loss(s, out, x0, x_t, t, prediction, variance, decoder) -> Tensor:
    """T L_t in bits/dim: the single-term estimate of the whole sum_t L_t (t uniform)."""
    pmv = p_mean_variance(s, x_t, t, out, prediction=prediction, variance=variance)
    nats = vlb_term(s, x0, x_t, t, pmv.model_mean, pmv.model_log_variance, decoder=decoder)
    return s.num_timesteps * nats_to_bpd(nats, x0[0].numel())


class ImportanceSampler:
    """Importance sampling of t for L_vlb (Nichol & Dhariwal sec. 3.3): p(t) proportional to
    sqrt(E[L_t^2]), estimated from the last ``history`` losses seen at each t, mixed with a uniform
    share ``uniform_prob``; uniform until every t has its full history. Drawing t ~ p and weighting
    the loss by 1 / (T p(t)) keeps the estimate of sum_t L_t unbiased while lowering its variance.
    The state (``state_dict``) belongs in checkpoints so that a resumed run draws the same t."""

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        self.num_timesteps, self.history, self.uniform_prob = num_timesteps, history, uniform_prob
        # A ring buffer per t: losses[t, pos[t]] is overwritten next once counts[t] == history.
        self.losses = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)
        self.pos = torch.zeros(num_timesteps, dtype=torch.long)

    def probabilities(self) -> Tensor:
        """p(t) [T], float64."""
        T = self.num_timesteps
        if bool((self.counts < self.history).any()):
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        w = self.losses.pow(2).mean(dim=1).sqrt()
        w = w / w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / T

    def sample(self, batch: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(t [B] long, weight [B] float32 = 1 / (T p(t)))."""
        p = self.probabilities()
        t = torch.multinomial(p, batch, replacement=True, generator=generator)
        return t, (1.0 / (self.num_timesteps * p[t])).float()

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record the (unweighted) per-example losses [B] seen at timesteps t [B], in batch order."""
        t = t.detach().long().cpu()
        losses = losses.detach().double().cpu()
        t_sorted, order = torch.sort(t, stable=True)  # stable: batch order within each t
        seen = torch.bincount(t, minlength=self.num_timesteps)
        first = torch.cumsum(seen, 0) - seen
        rank = torch.arange(t.numel()) - first[t_sorted]  # 0, 1, .. within each t
        keep = rank >= seen[t_sorted] - self.history  # only the newest `history` of a t survive
        slot = (self.pos[t_sorted] + rank) % self.history
        self.losses[t_sorted[keep], slot[keep]] = losses[order][keep]
        self.pos = (self.pos + seen) % self.history
        self.counts = torch.clamp(self.counts + seen, max=self.history)

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "losses": self.losses.clone(),
            "counts": self.counts.clone(),
            "pos": self.pos.clone(),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state["losses"].shape != self.losses.shape:
            raise ValueError(
                f"importance sampler state has shape {tuple(state['losses'].shape)}, "
                f"expected {tuple(self.losses.shape)}"
            )
        self.losses = state["losses"].to(torch.float64).clone()
        self.counts = state["counts"].to(torch.long).clone()
        self.pos = state["pos"].to(torch.long).clone()
