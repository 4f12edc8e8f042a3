"""The forward process, its posterior, and the reverse step's mean and variance (Ho et al. 2020).

Tensors in, tensors out: nothing here calls a network, draws noise, or keeps state. ``s`` is a
:class:`~ddpm.schedules.NoiseSchedule`; ``t`` is a 0-based LongTensor [B] of *indices* into it (see
``ddpm.schedules`` for the convention); data tensors are [B, ...] in any floating dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ddpm.schedules import NoiseSchedule, extract

Tensor = torch.Tensor

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned", "learned_range")


class Gaussian(NamedTuple):
    """A diagonal Gaussian: mean, variance and log-variance, each broadcastable to the data."""

    mean: Tensor
    variance: Tensor
    log_variance: Tensor


class PMeanVariance(NamedTuple):
    """p_theta(x_{t-1} | x_t) = N(model_mean, model_variance), with the x0 and eps it implies."""

    model_mean: Tensor
    model_variance: Tensor
    model_log_variance: Tensor
    x0_pred: Tensor
    eps_pred: Tensor


# --------------------------------------------------------------------------------------------------
# forward process
# --------------------------------------------------------------------------------------------------


def q_step(s: NoiseSchedule, x_prev: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """One step of the kernel, eq. 2: x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps,
    i.e. a draw from q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I). At t = 0, x_prev is x_0."""
    return extract(s.alpha.sqrt(), t, x_prev) * x_prev + extract(s.beta.sqrt(), t, x_prev) * eps


def q_mean_variance(s: NoiseSchedule, x0: Tensor, t: Tensor) -> Gaussian:
    """q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), eq. 4."""
    variance = extract(1 - s.alpha_bar, t, x0)
    return Gaussian(extract(s.sqrt_alpha_bar, t, x0) * x0, variance, torch.log(variance))


def q_sample(s: NoiseSchedule, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """A draw from q(x_t | x_0) by reparameterization (eq. 4 and Algorithm 1):
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
    return extract(s.sqrt_alpha_bar, t, x0) * x0 + extract(s.sqrt_one_minus_alpha_bar, t, x0) * eps


def q_posterior_mean_variance(s: NoiseSchedule, x0: Tensor, x_t: Tensor, t: Tensor) -> Gaussian:
    """q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I), eqs. 6-7:
    mu~_t = posterior_mean_coef_x0 x_0 + posterior_mean_coef_xt x_t, variance beta~_t, and
    log-variance clipped at t = 0 (see ``NoiseSchedule``)."""
    mean = (
        extract(s.posterior_mean_coef_x0, t, x_t) * x0
        + extract(s.posterior_mean_coef_xt, t, x_t) * x_t
    )
    variance = extract(s.posterior_variance, t, x_t)
    log_variance = extract(s.posterior_log_variance_clipped, t, x_t)
    return Gaussian(mean, variance, log_variance)


# --------------------------------------------------------------------------------------------------
# parameterizations: eps, x0 and v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022)
# --------------------------------------------------------------------------------------------------


def x0_from_eps(s: NoiseSchedule, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), eq. 4 solved for x_0."""
    return (x_t - extract(s.sqrt_one_minus_alpha_bar, t, x_t) * eps) / extract(
        s.sqrt_alpha_bar, t, x_t
    )


def eps_from_x0(s: NoiseSchedule, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    """eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t), eq. 4 solved for eps."""
    return (x_t - extract(s.sqrt_alpha_bar, t, x_t) * x0) / extract(
        s.sqrt_one_minus_alpha_bar, t, x_t
    )


def v_from_x0_eps(s: NoiseSchedule, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, sec. 4)."""
    return extract(s.sqrt_alpha_bar, t, x0) * eps - extract(s.sqrt_one_minus_alpha_bar, t, x0) * x0


def x0_from_v(s: NoiseSchedule, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v."""
    return extract(s.sqrt_alpha_bar, t, x_t) * x_t - extract(s.sqrt_one_minus_alpha_bar, t, x_t) * v


def eps_from_v(s: NoiseSchedule, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """eps = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v."""
    return extract(s.sqrt_one_minus_alpha_bar, t, x_t) * x_t + extract(s.sqrt_alpha_bar, t, x_t) * v


def predict_x0_eps(
    s: NoiseSchedule, x_t: Tensor, t: Tensor, prediction_out: Tensor, prediction: str = "eps"
) -> tuple[Tensor, Tensor]:
    """(x0_pred, eps_pred) implied by a network's output under the given parameterization."""
    if prediction == "eps":
        return x0_from_eps(s, x_t, t, prediction_out), prediction_out
    if prediction == "x0":
        return prediction_out, eps_from_x0(s, x_t, t, prediction_out)
    if prediction == "v":
        return x0_from_v(s, x_t, t, prediction_out), eps_from_v(s, x_t, t, prediction_out)
    raise ValueError(f"unknown prediction {prediction!r}; known: {', '.join(PREDICTIONS)}")


def target_for(
    s: NoiseSchedule, x0: Tensor, t: Tensor, eps: Tensor, prediction: str = "eps"
) -> Tensor:
    """The regression target of the simplified loss for a parameterization: eps, x_0 or v."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return v_from_x0_eps(s, x0, t, eps)
    raise ValueError(f"unknown prediction {prediction!r}; known: {', '.join(PREDICTIONS)}")


# --------------------------------------------------------------------------------------------------
# reverse process
# --------------------------------------------------------------------------------------------------


def fixed_large_variance(s: NoiseSchedule) -> Tensor:
    """Sigma_t = beta_t (Ho et al. sec. 3.2), with the released code's t = 0 entry beta~ at index 1:
    the decoder's variance should match the posterior's scale, not beta_1."""
    first = s.posterior_variance[1:2] if s.num_timesteps > 1 else s.beta[:1]
    return torch.cat([first, s.beta[1:]])


def dynamic_threshold_x0(x0_pred: Tensor, percentile: float = 0.995) -> Tensor:
    """Dynamic thresholding (Saharia et al. 2022, sec. 2.3): per example, s = max(1, the given
    percentile of |x0_pred|), then x0 <- clamp(x0_pred, -s, s) / s. Saturated pixels are pulled inwards
    instead of being cut off as by a static clip to [-1, 1]; with s = 1 the two agree."""
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"dynamic threshold percentile must lie in (0, 1], got {percentile}")
    flat = x0_pred.reshape(x0_pred.shape[0], -1).abs().float()
    s = torch.quantile(flat, percentile, dim=1).clamp(min=1.0).to(x0_pred.dtype)
    s = s.reshape(-1, *([1] * (x0_pred.ndim - 1)))
    return torch.maximum(torch.minimum(x0_pred, s), -s) / s


def p_mean_variance(
    s: NoiseSchedule,
    x_t: Tensor,
    t: Tensor,
    model_output: Tensor,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = False,
    dynamic_threshold: float | None = None,
) -> PMeanVariance:
    """p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), Sigma_theta(x_t, t)) from a network's output.

    mu_theta = mu~_t(x0_pred, x_t) (eq. 7 with x_0 replaced by its prediction; for eps this is eq. 11,
    mu_theta = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_t)). Variance:
      fixed_small    Sigma = beta~_t (log clipped at t=0)      fixed_large   Sigma = beta_t (t=0: beta~_1)
      learned        log Sigma = network's second half of channels
      learned_range  log Sigma = f log beta_t + (1 - f) log beta~_t, f = (out + 1)/2 (Nichol & Dhariwal eq. 15)
    For the learned variants the output has 2C channels on dim 1: the prediction, then the variance.
    clip_x0 clamps x0_pred to [-1, 1] before the mean is formed (sampling images only);
    dynamic_threshold = p applies ``dynamic_threshold`` with that percentile instead.
    """
    if variance in ("learned", "learned_range"):
        if model_output.shape[1] % 2:
            raise ValueError(
                f"variance={variance!r} needs 2x channels in the model output, got {model_output.shape[1]}"
            )
        model_output, var_out = model_output.chunk(2, dim=1)
        if variance == "learned":
            model_log_variance = var_out
        else:
            min_log = extract(s.posterior_log_variance_clipped, t, x_t)
            max_log = extract(torch.log(s.beta), t, x_t)
            frac = (var_out + 1) / 2
            model_log_variance = frac * max_log + (1 - frac) * min_log
        model_variance = torch.exp(model_log_variance)
    elif variance == "fixed_small":
        model_variance = extract(s.posterior_variance, t, x_t)
        model_log_variance = extract(s.posterior_log_variance_clipped, t, x_t)
    elif variance == "fixed_large":
        large = fixed_large_variance(s)
        model_variance = extract(large, t, x_t)
        model_log_variance = extract(torch.log(large), t, x_t)
    else:
        raise ValueError(f"unknown variance {variance!r}; known: {', '.join(VARIANCES)}")

    x0_pred, eps_pred = predict_x0_eps(s, x_t, t, model_output, prediction)
    if dynamic_threshold is not None:
        x0_pred = dynamic_threshold_x0(x0_pred, dynamic_threshold)
        eps_pred = eps_from_x0(s, x_t, t, x0_pred)
    elif clip_x0:
        x0_pred = x0_pred.clamp(-1, 1)
        eps_pred = eps_from_x0(s, x_t, t, x0_pred)
    model_mean = q_posterior_mean_variance(s, x0_pred, x_t, t).mean
    return PMeanVariance(model_mean, model_variance, model_log_variance, x0_pred, eps_pred)


def p_sample_step(pmv: PMeanVariance, t: Tensor, z: Tensor) -> Tensor:
    """Algorithm 2, line 4: x_{t-1} = mu_theta + sigma_t z, with no noise at the last step (t = 0)."""
    nonzero = (torch.as_tensor(t) != 0).to(z.dtype).reshape(-1, *([1] * (z.ndim - 1)))
    return pmv.model_mean + nonzero * torch.exp(0.5 * pmv.model_log_variance) * z
