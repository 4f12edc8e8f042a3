"""Schedules: the named betas, the derived quantities, respacing and validation."""

import math

import pytest
import torch

from ddpm.schedules import (
    BETA_SCHEDULES,
    NoiseSchedule,
    extract,
    rescale_zero_terminal_snr,
    respace,
)

FIELDS = [
    "beta", "alpha", "alpha_bar", "alpha_bar_prev", "sqrt_alpha_bar", "sqrt_one_minus_alpha_bar",
    "snr", "log_snr", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef_x0", "posterior_mean_coef_xt",
]  # fmt: skip


@pytest.mark.parametrize("name", sorted(BETA_SCHEDULES))
def test_every_field_is_float64_of_length_T(name):
    s = NoiseSchedule.from_name(name, 200)
    for field in FIELDS:
        value = getattr(s, field)
        assert value.dtype == torch.float64, field
        assert value.shape == (200,), field
    assert torch.equal(s.timesteps, torch.arange(200))


def test_alpha_bar_is_the_running_product_of_alpha():
    s = NoiseSchedule.from_name("linear", 300)
    product, expected = 1.0, []
    for beta in s.beta.tolist():
        product *= 1.0 - beta
        expected.append(product)
    assert torch.allclose(s.alpha_bar, torch.tensor(expected, dtype=torch.float64), rtol=1e-12)
    assert s.alpha_bar_prev[0] == 1.0
    assert torch.equal(s.alpha_bar_prev[1:], s.alpha_bar[:-1])


def test_linear_schedule_has_ho_et_al_endpoints_at_T_1000_and_scales_with_1000_over_T():
    s = NoiseSchedule.from_name("linear", 1000)
    assert s.beta[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert s.beta[-1].item() == pytest.approx(0.02, rel=1e-12)
    half = NoiseSchedule.from_name("linear", 500)
    assert half.beta[0].item() == pytest.approx(2e-4, rel=1e-12)
    assert half.beta[-1].item() == pytest.approx(0.04, rel=1e-12)


def test_quadratic_schedule_is_linear_in_sqrt_beta():
    s = NoiseSchedule.from_name("quadratic", 100)
    second_difference = s.beta.sqrt().diff().diff()
    assert second_difference.abs().max() < 1e-12
    assert s.beta[0].item() == pytest.approx(1e-3, rel=1e-9)  # 1e-4 * 1000/100


def test_cosine_schedule_follows_its_alpha_bar_and_clips_exactly_the_last_beta():
    T, s_off = 1000, 0.008
    s = NoiseSchedule.from_name("cosine", T)
    clipped = s.beta >= 0.999
    assert clipped.tolist() == [False] * (T - 1) + [True]
    f = [math.cos((t / T + s_off) / (1 + s_off) * math.pi / 2) ** 2 for t in range(T + 1)]
    expected = torch.tensor([f[t + 1] / f[0] for t in range(T - 1)], dtype=torch.float64)
    assert torch.allclose(s.alpha_bar[:-1], expected, rtol=1e-10)


def test_posterior_coefficients_match_eq_7():
    s = NoiseSchedule.from_name("cosine", 100)
    b, ab, abp = s.beta, s.alpha_bar, s.alpha_bar_prev
    assert torch.allclose(s.posterior_variance, b * (1 - abp) / (1 - ab), rtol=1e-12)
    assert torch.allclose(s.posterior_mean_coef_x0, b * abp.sqrt() / (1 - ab), rtol=1e-12)
    assert torch.allclose(
        s.posterior_mean_coef_xt, (1 - b).sqrt() * (1 - abp) / (1 - ab), rtol=1e-12
    )
    assert s.posterior_variance[0] == 0.0
    assert (s.posterior_variance <= s.beta).all()


def test_posterior_log_variance_at_t0_uses_the_released_codes_clipping():
    s = NoiseSchedule.from_name("linear", 50)
    assert s.posterior_log_variance_clipped[0] == torch.log(s.posterior_variance[1])
    assert torch.allclose(s.posterior_log_variance_clipped[1:], torch.log(s.posterior_variance[1:]))
    assert torch.isfinite(s.posterior_log_variance_clipped).all()


def test_snr_and_log_snr_agree():
    s = NoiseSchedule.from_name("sigmoid", 100)
    assert torch.allclose(s.snr, s.alpha_bar / (1 - s.alpha_bar), rtol=1e-12)
    assert torch.allclose(s.log_snr, torch.log(s.snr), rtol=1e-10)
    assert (s.log_snr.diff() < 0).all()


def test_respace_keeping_every_step_gives_back_the_same_schedule():
    s = NoiseSchedule.from_name("cosine", 120)
    r = respace(s, range(120))
    for field in FIELDS:
        assert torch.allclose(getattr(r, field), getattr(s, field), rtol=1e-10, atol=1e-14), field
    assert torch.equal(r.timesteps, s.timesteps)


def test_respace_keeps_alpha_bar_on_the_kept_steps_and_maps_back_to_original_t():
    s = NoiseSchedule.from_name("linear", 1000)
    kept = torch.tensor([0, 99, 250, 600, 999])
    r = respace(s, kept)
    assert torch.allclose(r.alpha_bar, s.alpha_bar[kept], rtol=1e-12)
    assert torch.equal(r.timesteps, kept)
    assert r.beta[0] == pytest.approx(1 - s.alpha_bar[0].item(), rel=1e-12)
    # Respacing a respaced schedule still maps to the original chain.
    rr = respace(r, [1, 3])
    assert torch.equal(rr.timesteps, torch.tensor([99, 600]))
    assert torch.allclose(rr.alpha_bar, s.alpha_bar[[99, 600]], rtol=1e-12)


def test_respaced_posterior_variance_comes_from_the_respaced_betas():
    s = NoiseSchedule.from_name("linear", 1000)
    r = respace(s, range(0, 1000, 10))
    expected = r.beta * (1 - r.alpha_bar_prev) / (1 - r.alpha_bar)
    assert torch.allclose(r.posterior_variance, expected, rtol=1e-12)
    assert (r.beta[1:] > s.beta[10:1000:10] * 5).all()  # a 10x stride carries ~10x the noise


def test_zero_terminal_snr_rescaling_ends_at_zero_and_keeps_the_first_step():
    beta = NoiseSchedule.from_name("linear", 1000).beta
    s = NoiseSchedule.from_betas(rescale_zero_terminal_snr(beta))
    assert s.alpha_bar[-1] == 0.0
    assert s.snr[-1] == 0.0
    assert s.sqrt_alpha_bar[0].item() == pytest.approx(math.sqrt(1 - beta[0].item()), rel=1e-12)
    zt = NoiseSchedule.from_name("linear", 1000, zero_terminal_snr=True)
    assert torch.allclose(zt.beta, s.beta)


@pytest.mark.parametrize(
    "betas",
    [
        [0.1, 0.0, 0.2],
        [0.1, -0.2],
        [0.1, 1.0, 0.2],
        [0.1, 1.5],
        [0.1, float("nan")],
        [0.1, float("inf")],
        [],
        [[0.1, 0.2]],
    ],
    ids=["zero", "negative", "one-not-last", "above-one", "nan", "inf", "empty", "2-d"],
)
def test_invalid_betas_raise_value_error(betas):
    with pytest.raises(ValueError):
        NoiseSchedule.from_betas(betas)


@pytest.mark.parametrize("T", [0, -5, 2.5, True])
def test_invalid_num_timesteps_raise_value_error(T):
    with pytest.raises(ValueError, match="num_timesteps"):
        NoiseSchedule.from_name("linear", T)


def test_unknown_schedule_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="cosine"):
        NoiseSchedule.from_name("cosinus", 100)


def test_linear_schedule_too_short_to_stay_below_one_is_refused_clearly():
    with pytest.raises(ValueError, match="T=10"):
        NoiseSchedule.from_name("linear", 10)
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        NoiseSchedule.from_name("linear", 20)  # would end at beta = 1 exactly


def test_single_step_schedule_is_valid():
    s = NoiseSchedule.from_betas([0.5])
    assert s.num_timesteps == 1
    assert torch.isfinite(s.posterior_log_variance_clipped).all()


def test_extract_gathers_broadcasts_and_casts_to_the_data_dtype():
    s = NoiseSchedule.from_name("linear", 100)
    x = torch.zeros(3, 2, 4, 4, dtype=torch.bfloat16)
    t = torch.tensor([0, 50, 99])
    out = extract(s.alpha_bar, t, x)
    assert out.shape == (3, 1, 1, 1)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.flatten(), s.alpha_bar[t].to(torch.bfloat16))
    assert extract(s.alpha_bar, 5, x.float()).item() == pytest.approx(
        s.alpha_bar[5].item(), rel=1e-6
    )
