"""Forward process, posterior, parameterizations and the reverse step, against independent truths."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ddpm.diffusion import (
    eps_from_v,
    eps_from_x0,
    fixed_large_variance,
    p_mean_variance,
    p_sample_step,
    q_posterior_mean_variance,
    q_sample,
    q_step,
    target_for,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_v,
)
from ddpm.schedules import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")


S = NoiseSchedule.from_name("linear", 1000)


def full(t, n):
    return torch.full((n,), t, dtype=torch.long)


def test_q_step_applied_t_times_matches_q_sample_in_mean_and_variance():
    g = torch.Generator().manual_seed(0)
    n, t_final = 200_000, 40
    s = NoiseSchedule.from_name("linear", 100)  # larger betas: the chain moves far in 40 steps
    x0 = torch.full((n, 1), 1.5, dtype=torch.float64)
    x = x0
    for t in range(t_final + 1):
        x = q_step(s, x, full(t, n), torch.randn(n, 1, generator=g, dtype=torch.float64))
    direct = q_sample(s, x0, full(t_final, n), torch.randn(n, 1, generator=g, dtype=torch.float64))
    mean, var = (s.sqrt_alpha_bar[t_final] * 1.5).item(), (1 - s.alpha_bar[t_final]).item()
    for sample in (x, direct):
        se_mean = (var / n) ** 0.5
        se_var = var * (2 / n) ** 0.5
        assert abs(sample.mean().item() - mean) < 4 * se_mean
        assert abs(sample.var().item() - var) < 4 * se_var


def bayes_posterior(x0, x_t, alpha_bar_prev, alpha, beta):
    """Generic product of Gaussians: prior x_{t-1} ~ N(sqrt(abp) x0, 1 - abp), likelihood
    x_t | x_{t-1} ~ N(sqrt(alpha) x_{t-1}, beta); precision adds, mean is precision-weighted."""
    prior_mean, prior_var = alpha_bar_prev**0.5 * x0, 1 - alpha_bar_prev
    precision = 1 / prior_var + alpha / beta
    variance = 1 / precision
    mean = variance * (prior_mean / prior_var + alpha**0.5 * x_t / beta)
    return mean, variance


@pytest.mark.parametrize("t", [1, 2, 10, 500, 999])
def test_posterior_equals_bayes_rule_for_gaussians(t):
    g = torch.Generator().manual_seed(t)
    x0 = torch.randn(8, 3, dtype=torch.float64, generator=g)
    x_t = torch.randn(8, 3, dtype=torch.float64, generator=g)
    post = q_posterior_mean_variance(S, x0, x_t, full(t, 8))
    mean, var = bayes_posterior(
        x0, x_t, S.alpha_bar_prev[t].item(), S.alpha[t].item(), S.beta[t].item()
    )
    assert torch.allclose(post.mean, mean, rtol=1e-9, atol=1e-12)
    assert post.variance.flatten()[0].item() == pytest.approx(var, rel=1e-9)


def test_posterior_at_t0_is_a_point_mass_at_x0():
    x0, x_t = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    post = q_posterior_mean_variance(S, x0, x_t, full(0, 4))
    assert torch.allclose(post.mean, x0, atol=1e-12)
    assert (post.variance == 0).all()


@pytest.mark.parametrize("t", [0, 1, 100, 999])
def test_posterior_mean_with_x0_from_eps_is_eq_11(t):
    g = torch.Generator().manual_seed(1)
    x_t, eps = torch.randn(2, 5, 5, 5, dtype=torch.float64, generator=g).unbind(0)
    x_t, eps = x_t[None], eps[None]
    tt = full(t, 1)
    mean = q_posterior_mean_variance(S, x0_from_eps(S, x_t, tt, eps), x_t, tt).mean
    eq11 = (x_t - S.beta[t] / S.sqrt_one_minus_alpha_bar[t] * eps) / S.alpha[t].sqrt()
    assert torch.allclose(mean, eq11, rtol=1e-9, atol=1e-10)


tensors = st.integers(0, 999).flatmap(
    lambda t: st.tuples(
        st.just(t), st.integers(0, 2**31 - 1), st.sampled_from([(3,), (2, 4), (1, 3, 4)])
    )
)


@settings(max_examples=40, deadline=None)
@given(tensors)
def test_eps_x0_v_conversions_round_trip(case):
    t, seed, shape = case
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, *shape, dtype=torch.float64, generator=g)
    eps = torch.randn(2, *shape, dtype=torch.float64, generator=g)
    tt = full(t, 2)
    x_t = q_sample(S, x0, tt, eps)
    assert torch.allclose(x0_from_eps(S, x_t, tt, eps), x0, atol=1e-6)  # 1/sqrt(alpha_bar) <= 158
    assert torch.allclose(eps_from_x0(S, x_t, tt, x0), eps, atol=1e-8)
    v = v_from_x0_eps(S, x0, tt, eps)
    assert torch.allclose(x0_from_v(S, x_t, tt, v), x0, atol=1e-10)
    assert torch.allclose(eps_from_v(S, x_t, tt, v), eps, atol=1e-10)
    assert torch.equal(target_for(S, x0, tt, eps, "v"), v)


@settings(max_examples=25, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    shape=st.sampled_from([(2,), (3, 8, 8), (1, 4, 4)]),
    batch=st.integers(1, 4),
    prediction=st.sampled_from(["eps", "x0", "v"]),
    variance=st.sampled_from(["fixed_small", "fixed_large", "learned_range"]),
)
def test_outputs_keep_the_data_shape_and_dtype(dtype, shape, batch, prediction, variance):
    x0 = torch.randn(batch, *shape).to(dtype)
    t = torch.randint(0, 1000, (batch,))
    x_t = q_sample(S, x0, t, torch.randn_like(x0))
    assert x_t.shape == x0.shape and x_t.dtype == dtype
    out = torch.randn(batch, shape[0] * (2 if variance == "learned_range" else 1), *shape[1:]).to(
        dtype
    )
    pmv = p_mean_variance(S, x_t, t, out, prediction=prediction, variance=variance)
    for value in pmv:
        assert value.dtype == dtype
        assert torch.broadcast_shapes(value.shape, x0.shape) == x0.shape
    assert S.beta.dtype == torch.float64  # the schedule itself never changes dtype


def test_p_mean_variance_with_the_true_x0_gives_the_posterior():
    x0 = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([0, 5, 500, 999])
    x_t = q_sample(S, x0, t, torch.randn_like(x0))
    pmv = p_mean_variance(S, x_t, t, x0, prediction="x0", variance="fixed_small")
    post = q_posterior_mean_variance(S, x0, x_t, t)
    assert torch.allclose(pmv.model_mean, post.mean, atol=1e-12)
    assert torch.allclose(pmv.model_log_variance, post.log_variance)


def test_fixed_large_variance_is_beta_with_the_released_t0_entry():
    large = fixed_large_variance(S)
    assert large[0] == S.posterior_variance[1]
    assert torch.equal(large[1:], S.beta[1:])
    t = torch.tensor([0, 1, 700])
    x = torch.zeros(3, 2, dtype=torch.float64)
    pmv = p_mean_variance(S, x, t, x, variance="fixed_large")
    assert torch.allclose(pmv.model_variance.flatten(), large[t])


def test_learned_range_interpolates_between_log_posterior_variance_and_log_beta():
    t = torch.tensor([3, 3, 3])
    x = torch.zeros(3, 1, dtype=torch.float64)
    out = torch.tensor([[0.0, -1.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    lv = p_mean_variance(S, x, t, out, variance="learned_range").model_log_variance.flatten()
    lo, hi = S.posterior_log_variance_clipped[3], torch.log(S.beta[3])
    assert torch.allclose(lv, torch.stack([lo, hi, (lo + hi) / 2]))


def test_learned_variance_takes_the_log_variance_from_the_second_half_of_channels():
    x = torch.zeros(2, 3, 4, 4)
    out = torch.cat([torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), -2.0)], dim=1)
    pmv = p_mean_variance(S, x, torch.tensor([1, 2]), out, variance="learned")
    assert torch.equal(pmv.model_log_variance, torch.full((2, 3, 4, 4), -2.0))


def test_learned_variance_with_an_odd_channel_count_is_refused():
    with pytest.raises(ValueError, match="2x channels"):
        p_mean_variance(
            S,
            torch.zeros(1, 3, 2, 2),
            torch.tensor([1]),
            torch.zeros(1, 3, 2, 2),
            variance="learned",
        )


def test_clip_x0_clamps_the_prediction_and_keeps_eps_consistent():
    x_t = torch.full((1, 4), 3.0, dtype=torch.float64)
    t = torch.tensor([10])
    pmv = p_mean_variance(S, x_t, t, torch.full((1, 4), -5.0, dtype=torch.float64), clip_x0=True)
    assert pmv.x0_pred.abs().max() <= 1.0
    assert torch.allclose(x0_from_eps(S, x_t, t, pmv.eps_pred), pmv.x0_pred)


@pytest.mark.parametrize(
    "kwargs",
    [{"prediction": "score"}, {"variance": "fixed_medium"}],
    ids=["prediction", "variance"],
)
def test_unknown_parameterization_names_are_refused(kwargs):
    with pytest.raises(ValueError, match="unknown"):
        p_mean_variance(S, torch.zeros(1, 2), torch.tensor([1]), torch.zeros(1, 2), **kwargs)


def test_sample_step_adds_noise_except_at_t0():
    x = torch.zeros(2, 3, dtype=torch.float64)
    t = torch.tensor([0, 5])
    pmv = p_mean_variance(S, x, t, torch.zeros(2, 3, dtype=torch.float64))
    z = torch.ones(2, 3, dtype=torch.float64)
    x_prev = p_sample_step(pmv, t, z)
    assert torch.equal(x_prev[0], pmv.model_mean[0])
    sigma = torch.exp(0.5 * S.posterior_log_variance_clipped[5])
    assert torch.allclose(x_prev[1], pmv.model_mean[1] + sigma)
