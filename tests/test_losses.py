"""Loss terms against torch.distributions and exact bin probabilities."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ddpm.diffusion import q_posterior_mean_variance
from ddpm.losses import (
    decoder_nll,
    discretized_gaussian_log_likelihood,
    min_snr_weight,
    nats_to_bpd,
    normal_kl,
    prior_kl,
    simple_loss,
    vlb_term,
)
from ddpm.schedules import NoiseSchedule

S = NoiseSchedule.from_name("linear", 1000)
BIN_CENTRES = torch.linspace(-1, 1, 256, dtype=torch.float64)


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = torch.randn(4, 50, dtype=torch.float64, generator=g).unbind(0)
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-10)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("mean,std", [(0.0, 0.01), (0.3, 0.1), (-0.99, 0.5), (2.0, 1.0)])
def test_discretized_decoder_bin_probabilities_sum_to_one(exact, mean, std):
    x = BIN_CENTRES[:, None]
    logp = discretized_gaussian_log_likelihood(
        x, torch.tensor(mean, dtype=torch.float64), torch.tensor(2 * math.log(std)), exact_cdf=exact
    )
    total = logp.exp().sum().item()
    # Bins too far out for the 1e-12 floor each add at most 1e-12.
    assert total == pytest.approx(1.0, abs=256e-12 + 1e-9)


def test_discretized_decoder_with_exact_cdf_gives_the_normal_mass_of_each_bin():
    mean, std = 0.1, 0.05
    dist = Normal(torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64))
    x = BIN_CENTRES[100:160]
    expected = dist.cdf(x + 1 / 255) - dist.cdf(x - 1 / 255)
    got = discretized_gaussian_log_likelihood(
        x, torch.tensor(mean, dtype=torch.float64), torch.tensor(2 * math.log(std)), exact_cdf=True
    ).exp()
    mask = expected > 1e-10
    assert torch.allclose(got[mask], expected[mask], rtol=1e-8)
    # The reference tanh approximation is close but not equal.
    approx = discretized_gaussian_log_likelihood(
        x, torch.tensor(mean, dtype=torch.float64), torch.tensor(2 * math.log(std))
    ).exp()
    assert torch.allclose(approx, expected, atol=1e-3)


def test_edge_bins_extend_to_infinity():
    far = torch.tensor(5.0, dtype=torch.float64)
    lp = discretized_gaussian_log_likelihood(
        torch.tensor([1.0], dtype=torch.float64), far, torch.tensor(0.0), exact_cdf=True
    )
    expected = Normal(5.0, 1.0).cdf(torch.tensor(1 - 1 / 255, dtype=torch.float64))
    assert lp.exp().item() == pytest.approx(1 - expected.item(), rel=1e-9)


def test_gaussian_decoder_is_the_normal_density():
    x, m = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    lv = torch.full((3, 4), -1.0, dtype=torch.float64)
    expected = -Normal(m, (0.5 * lv).exp()).log_prob(x).sum(dim=1)
    assert torch.allclose(decoder_nll(x, m, lv, "gaussian"), expected, rtol=1e-12)


def test_prior_kl_matches_torch_distributions():
    x0 = torch.randn(5, 2, 3, dtype=torch.float64)
    mean = S.sqrt_alpha_bar[-1] * x0
    std = S.sqrt_one_minus_alpha_bar[-1]
    expected = kl_divergence(Normal(mean, std), Normal(0.0, 1.0)).sum(dim=(1, 2))
    assert torch.allclose(prior_kl(S, x0), expected, rtol=1e-10)


def test_vlb_term_is_the_posterior_kl_for_t_above_zero_and_the_decoder_at_zero():
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    x_t = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    mean, lv = torch.randn_like(x0), torch.full_like(x0, -3.0)
    t = torch.tensor([0, 7])
    got = vlb_term(S, x0, x_t, t, mean, lv)
    post = q_posterior_mean_variance(S, x0, x_t, t)
    kl = normal_kl(post.mean, post.log_variance, mean, lv).sum(dim=(1, 2, 3))
    assert got[1] == pytest.approx(kl[1].item(), rel=1e-12)
    assert got[0] == pytest.approx(decoder_nll(x0, mean, lv)[0].item(), rel=1e-12)


def test_bits_per_dim_divides_nats_by_dims_times_ln2():
    assert nats_to_bpd(torch.tensor([3072 * math.log(2)]), 3072).item() == pytest.approx(1.0)


def test_simple_loss_is_the_per_example_mean_squared_error_times_its_weight():
    a, b = torch.zeros(2, 3, 2, 2), torch.ones(2, 3, 2, 2)
    b[1] *= 2
    assert torch.equal(simple_loss(a, b), torch.tensor([1.0, 4.0]))
    assert torch.equal(simple_loss(a, b, torch.tensor([0.5, 0.25])), torch.tensor([0.5, 1.0]))


def test_min_snr_weights_give_the_same_x0_space_weight_for_every_target():
    t = torch.tensor([0, 10, 100, 500, 999])
    snr = S.snr[t].float()
    w_x0 = min_snr_weight(S, t, 5.0, "x0")
    assert torch.allclose(w_x0, snr.clamp(max=5.0))
    assert torch.allclose(min_snr_weight(S, t, 5.0, "eps") * snr, w_x0, rtol=1e-5)
    assert torch.allclose(min_snr_weight(S, t, 5.0, "v") * (snr + 1), w_x0, rtol=1e-5)


def test_min_snr_eps_weight_is_one_at_zero_terminal_snr():
    zt = NoiseSchedule.from_name("linear", 100, zero_terminal_snr=True)
    assert min_snr_weight(zt, torch.tensor([99]), 5.0, "eps").item() == 1.0
