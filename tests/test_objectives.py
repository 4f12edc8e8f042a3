"""Training objectives (issue 5): eps / x0 / v prediction, the hybrid and L_vlb objectives, importance-
sampled timesteps, Min-SNR weighting, zero-terminal SNR, offset noise, and the sampler options."""

from __future__ import annotations

import math

import pytest
import torch

from ddpm.config import DiffusionConfig, SampleConfig, TrainConfig
from ddpm.data.toy import small_gmm
from ddpm.diffusion import dynamic_threshold_x0, p_mean_variance, q_sample
from ddpm.errors import ConfigError
from ddpm.losses import ImportanceSampler, training_loss, vlb_term
from ddpm.metrics import sliced_wasserstein
from ddpm.nets import MLP
from ddpm.samplers import sample
from ddpm.schedules import NoiseSchedule
from ddpm.train import draw_noise

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------
# every objective trains a 2-D model
# --------------------------------------------------------------------------------------------------


def _train_toy(*, prediction, variance, objective, gamma, ztsnr, importance, steps=700):
    """An MLP trained on the 3-component Gaussian mixture with T = 100, Algorithm 1 with the objective;
    returns (model, schedule, data)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = small_gmm()
    s = NoiseSchedule.from_name("linear", 100, zero_terminal_snr=ztsnr)
    model = MLP(hidden=64, num_layers=3, learn_sigma=variance == "learned_range")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sampler = ImportanceSampler(s.num_timesteps) if importance else None
    for _ in range(steps):
        x0 = data.sample(128, g).float()
        if sampler is None:
            t, weight = torch.randint(0, s.num_timesteps, (128,), generator=g), None
        else:
            t, weight = sampler.sample(128, g)
        eps = torch.randn(x0.shape, generator=g)
        x_t = q_sample(s, x0, t, eps)
        out = model(x_t, s.timesteps[t])
        losses = training_loss(
            s,
            out,
            x0,
            x_t,
            t,
            eps,
            prediction=prediction,
            variance=variance,
            objective=objective,
            min_snr_gamma=gamma,
            decoder="gaussian",
        )
        if sampler is not None:
            sampler.update(t, losses)
            losses = losses * weight
        opt.zero_grad()
        losses.mean().backward()
        opt.step()
    return model.eval(), s, data


# (prediction, variance, objective, min-SNR gamma, zero-terminal SNR, importance, stated SW bound).
# Measured after 700 steps with ancestral sampling on the full chain (2000 points): SW 0.07 (v),
# 0.09 (eps, hybrid), 0.11-0.17 (min-SNR, L_vlb), 0.32 (x0); the bounds are ~2x that. The true-vs-true
# floor is ~0.04; an untrained network gives > 100 and a wrong target or sign a diverging chain.
OBJECTIVES = [
    ("eps", "fixed_small", "simple", None, False, False, 0.2),
    ("x0", "fixed_small", "simple", None, False, False, 0.6),
    ("v", "fixed_small", "simple", None, False, False, 0.15),
    ("eps", "fixed_small", "simple", 5.0, False, False, 0.3),
    ("v", "fixed_small", "simple", None, True, False, 0.15),
    ("eps", "learned_range", "hybrid", None, False, False, 0.2),
    ("eps", "fixed_small", "vlb", None, False, False, 0.35),
    ("eps", "learned_range", "vlb", None, False, True, 0.25),
]


@pytest.mark.parametrize(
    "prediction,variance,objective,gamma,ztsnr,importance,bound",
    OBJECTIVES,
    ids=[
        f"{p}-{v}-{o}{'-minsnr' if g else ''}{'-ztsnr' if z else ''}{'-importance' if i else ''}"
        for p, v, o, g, z, i, _ in OBJECTIVES
    ],
)
def test_each_objective_trains_a_toy_model_to_its_stated_distance(
    prediction, variance, objective, gamma, ztsnr, importance, bound
):
    model, s, data = _train_toy(
        prediction=prediction,
        variance=variance,
        objective=objective,
        gamma=gamma,
        ztsnr=ztsnr,
        importance=importance,
    )
    g = torch.Generator().manual_seed(1)
    x = sample(model, s, (2000, 2), generator=g, prediction=prediction, variance=variance).x0
    sw = sliced_wasserstein(x, data.sample(2000, g).float(), generator=g)
    assert sw < bound, f"sliced Wasserstein {sw:.3f} >= {bound}"


# --------------------------------------------------------------------------------------------------
# the objectives' definitions
# --------------------------------------------------------------------------------------------------


def _learned_output_batch(seed=0, batch=16):
    g = torch.Generator().manual_seed(seed)
    s = NoiseSchedule.from_name("linear", 100)
    x0 = torch.rand(batch, 1, 4, 4, generator=g) * 2 - 1
    t = torch.randint(0, 100, (batch,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x_t = q_sample(s, x0, t, eps)
    out = torch.randn(batch, 2, 4, 4, generator=g).requires_grad_(True)
    return s, x0, x_t, t, eps, out


def test_vlb_objective_trains_the_mean_through_the_bound():
    s, x0, x_t, t, eps, out = _learned_output_batch()
    simple_free = training_loss(s, out, x0, x_t, t, eps, variance="learned_range", objective="vlb")
    (grad,) = torch.autograd.grad(simple_free.sum(), out)
    assert grad[:, :1].abs().sum() > 0  # the mean channel gets gradient from L_vlb alone
    assert grad[:, 1:].abs().sum() > 0


def test_vlb_objective_is_T_times_the_bound_term_in_bits_per_dim():
    s, x0, x_t, t, eps, out = _learned_output_batch()
    loss = training_loss(s, out, x0, x_t, t, eps, variance="learned_range", objective="vlb")
    pmv = p_mean_variance(s, x_t, t, out, variance="learned_range")
    nats = vlb_term(s, x0, x_t, t, pmv.model_mean, pmv.model_log_variance)
    expected = s.num_timesteps * nats / (16 * math.log(2))
    torch.testing.assert_close(loss, expected.float(), rtol=1e-5, atol=1e-6)


def test_hybrid_objective_needs_a_learned_variance():
    with pytest.raises(ConfigError, match="hybrid"):
        DiffusionConfig(loss="hybrid", variance="fixed_small")
    s, x0, x_t, t, eps, out = _learned_output_batch()
    with pytest.raises(ValueError, match="learned variance"):
        training_loss(s, out[:, :1], x0, x_t, t, eps, objective="hybrid")


def test_objective_defaults_to_hybrid_for_learned_variances_and_simple_otherwise():
    assert DiffusionConfig(variance="learned_range").objective == "hybrid"
    assert DiffusionConfig().objective == "simple"
    assert DiffusionConfig(loss="vlb").objective == "vlb"


# --------------------------------------------------------------------------------------------------
# importance-sampled timesteps
# --------------------------------------------------------------------------------------------------


def test_importance_sampler_is_uniform_until_every_step_has_its_history():
    sampler = ImportanceSampler(4, history=2)
    sampler.update(torch.tensor([0, 0, 1, 1, 2, 2, 3]), torch.tensor([9.0, 9, 1, 1, 1, 1, 1]))
    torch.testing.assert_close(sampler.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))
    sampler.update(torch.tensor([3]), torch.tensor([1.0]))
    assert sampler.probabilities()[0] > 0.5


def test_importance_sampler_probabilities_follow_the_root_mean_square_loss():
    sampler = ImportanceSampler(3, history=2, uniform_prob=0.0)
    sampler.update(torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([3.0, 4.0, 1.0, 1.0, 0.0, 2.0]))
    rms = torch.tensor([math.sqrt(12.5), 1.0, math.sqrt(2.0)], dtype=torch.float64)
    torch.testing.assert_close(sampler.probabilities(), rms / rms.sum())


def test_importance_sampler_keeps_the_newest_losses_of_each_step_in_batch_order():
    sampler = ImportanceSampler(3, history=3)
    sampler.update(torch.tensor([0, 1, 0, 0, 0]), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    sampler.update(torch.tensor([1, 1, 1]), torch.tensor([7.0, 8.0, 9.0]))
    assert sorted(sampler.losses[0].tolist()) == [3.0, 4.0, 5.0]
    assert sorted(sampler.losses[1].tolist()) == [7.0, 8.0, 9.0]
    assert sampler.counts.tolist() == [3, 3, 0]


def test_importance_sampler_state_round_trips():
    a = ImportanceSampler(5, history=2)
    a.update(torch.tensor([0, 1, 1, 4]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    b = ImportanceSampler(5, history=2)
    b.load_state_dict(a.state_dict())
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    with pytest.raises(ValueError, match="shape"):
        ImportanceSampler(6, history=2).load_state_dict(a.state_dict())


def test_importance_weighted_vlb_is_unbiased_and_has_lower_variance():
    """With the exact denoiser of a Gaussian mixture, the estimate w T L_t (t ~ p, w = 1/(T p(t))) of
    the bound has the uniform estimate's mean (within 4 standard errors) and a much smaller variance."""
    data = small_gmm()
    s = NoiseSchedule.from_name("linear", 100)
    model = data.denoiser(s)
    g = torch.Generator().manual_seed(0)

    def losses_at(t):
        x0 = data.sample(t.numel(), g).float()
        eps = torch.randn(x0.shape, generator=g)
        x_t = q_sample(s, x0, t, eps)
        out = model(x_t, s.timesteps[t]).float()
        return training_loss(s, out, x0, x_t, t, eps, objective="vlb", decoder="gaussian")

    sampler = ImportanceSampler(s.num_timesteps)
    for _ in range(10):
        t = torch.arange(s.num_timesteps)
        sampler.update(t, losses_at(t))
    n = 20000
    uniform = losses_at(torch.randint(0, s.num_timesteps, (n,), generator=g)).double()
    t, weight = sampler.sample(n, g)
    weighted = (losses_at(t) * weight).double()
    se = math.sqrt(uniform.var() / n + weighted.var() / n)
    assert abs(float(uniform.mean() - weighted.mean())) < 4 * se
    assert weighted.var() < 0.5 * uniform.var()


# --------------------------------------------------------------------------------------------------
# zero-terminal SNR, Min-SNR, offset noise
# --------------------------------------------------------------------------------------------------


def test_zero_terminal_snr_rejects_eps_prediction_with_a_clear_error():
    with pytest.raises(ConfigError, match="prediction 'v'"):
        DiffusionConfig(zero_terminal_snr=True, prediction="eps")
    DiffusionConfig(zero_terminal_snr=True, prediction="v")  # accepted
    s = NoiseSchedule.from_name("linear", 100, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        sample(lambda x, t: x, s, (4, 2), prediction="eps")


def test_min_snr_gamma_must_be_positive():
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        TrainConfig(min_snr_gamma=0.0)


def test_offset_noise_adds_one_shared_shift_per_image_and_channel():
    g = torch.Generator().manual_seed(0)
    plain = draw_noise((4000, 2, 8, 8), g)
    offset = draw_noise((4000, 2, 8, 8), g, offset_noise=0.5)
    # The per-image, per-channel mean of eps has variance 1/64 without offset, 1/64 + 0.25 with.
    for eps, expected in ((plain, 1 / 64), (offset, 1 / 64 + 0.25)):
        var = float(eps.mean(dim=(2, 3)).var())
        assert abs(var - expected) < 5 * expected * math.sqrt(2 / 8000), (var, expected)
    # Within an image the shift is shared: deviations from the image mean keep unit variance.
    within = offset - offset.mean(dim=(2, 3), keepdim=True)
    assert abs(float(within.var()) * 64 / 63 - 1.0) < 0.01


# --------------------------------------------------------------------------------------------------
# sampler options
# --------------------------------------------------------------------------------------------------


def test_dynamic_thresholding_leaves_predictions_inside_the_unit_box_alone():
    x0 = torch.rand(8, 1, 4, 4) * 1.8 - 0.9
    assert torch.equal(dynamic_threshold_x0(x0, 0.995), x0)


def test_dynamic_thresholding_rescales_each_image_by_its_own_percentile():
    x0 = torch.linspace(-3, 3, 101).reshape(1, 1, 101).repeat(2, 1, 1)
    x0[1] = x0[1] / 3  # already inside [-1, 1]
    out = dynamic_threshold_x0(x0, 0.9)
    s = torch.quantile(x0[0].abs().flatten(), 0.9)
    torch.testing.assert_close(out[0], x0[0].clamp(-s, s) / s)
    torch.testing.assert_close(out[1], x0[1])
    assert out.abs().max() <= 1.0


def test_sampler_options_go_only_to_the_sampler_that_takes_them():
    assert SampleConfig(sampler="ddim", eta=0.5).sampler_options() == {"eta": 0.5}
    assert SampleConfig(sampler="dpm_solver", order=3).sampler_options() == {"order": 3}
    assert SampleConfig(sampler="unipc", order=1).sampler_options() == {"order": 1}
    assert SampleConfig(sampler="ancestral").sampler_options() == {}
    assert SampleConfig(sampler="heun", order=3, eta=0.5).sampler_options() == {}


@pytest.mark.parametrize(
    "options,match",
    [
        ({"order": 4}, "order"),
        ({"grid": "cubic"}, "grid"),
        ({"eta": -1.0}, "eta"),
        ({"dynamic_threshold": 1.5}, "dynamic_threshold"),
    ],
)
def test_bad_sampler_options_are_refused(options, match):
    with pytest.raises(ConfigError, match=match):
        SampleConfig(**options)
