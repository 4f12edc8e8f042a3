"""The exact Gaussian-mixture denoiser against independent computations."""

import math

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from ddpm.oracle import GaussianMixture
from ddpm.schedules import NoiseSchedule


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: a second OpenMP thread only adds synchronisation (and stalls badly under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


GM = GaussianMixture(
    [0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], [[[0.5, 0.1], [0.1, 0.3]], [[0.2, 0.0], [0.0, 0.4]]]
)


def test_log_prob_matches_torch_mixture_distribution():
    ref = MixtureSameFamily(Categorical(GM.weights), MultivariateNormal(GM.means, GM.covs))
    x = torch.randn(100, 2, dtype=torch.float64) * 2
    assert torch.allclose(GM.log_prob(x), ref.log_prob(x), rtol=1e-10)


def test_samples_have_the_mixture_mean_and_covariance():
    x = GM.sample(200_000, torch.Generator().manual_seed(0))
    assert torch.allclose(x.mean(0), GM.mean(), atol=4 * 2.0 / math.sqrt(200_000))
    assert torch.allclose(torch.cov(x.T), GM.covariance(), atol=0.03)


@pytest.mark.parametrize("t", [0, 50, 300, 999])
def test_oracle_on_a_single_gaussian_is_the_linear_posterior_mean_of_eps(t):
    # 1-D N(m, v): Cov(eps, x_t) = sigma, Var(x_t) = a^2 v + sigma^2, so E[eps | x_t] is linear.
    m, v = 0.7, 0.3
    single = GaussianMixture([1.0], [[m]], [[[v]]])
    s = NoiseSchedule.from_name("cosine", 1000)
    a, sigma2 = s.sqrt_alpha_bar[t].item(), 1 - s.alpha_bar[t].item()
    x_t = torch.linspace(-3, 3, 13, dtype=torch.float64)[:, None]
    expected = sigma2**0.5 * (x_t - a * m) / (a * a * v + sigma2)
    got = single.denoiser(s)(x_t, torch.full((13,), t))
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("t", [20, 200, 700])
def test_oracle_on_a_mixture_matches_numerical_integration(t):
    # 1-D mixture; E[eps | x_t] = (x_t - a E[x0 | x_t]) / sigma with E[x0 | x_t] by quadrature over x0.
    gm = GaussianMixture([0.25, 0.75], [[-1.5], [1.0]], [[[0.1]], [[0.3]]])
    s = NoiseSchedule.from_name("linear", 1000)
    a, sigma = s.sqrt_alpha_bar[t].item(), s.sqrt_one_minus_alpha_bar[t].item()
    grid = torch.linspace(-6, 6, 20001, dtype=torch.float64)
    prior = gm.log_prob(grid[:, None]).exp()
    x_t = torch.tensor([-1.2, 0.0, 0.4, 2.0], dtype=torch.float64)
    lik = torch.exp(-0.5 * ((x_t[:, None] - a * grid) / sigma) ** 2)
    post = prior * lik
    x0_mean = (post * grid).sum(1) / post.sum(1)
    expected = (x_t - a * x0_mean) / sigma
    got = gm.denoiser(s)(x_t[:, None], torch.full((4,), t)).flatten()
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_oracle_follows_original_timesteps_on_a_respaced_chain():
    from ddpm.schedules import respace

    s = NoiseSchedule.from_name("linear", 1000)
    r = respace(s, [0, 400, 999])
    x = torch.randn(3, 2, dtype=torch.float64)
    t = torch.tensor([0, 400, 999])
    assert torch.allclose(GM.denoiser(r)(x, t), GM.denoiser(s)(x, t))


def test_marginal_of_x_t_matches_forward_samples():
    ab = 0.3
    x0 = GM.sample(100_000, torch.Generator().manual_seed(1))
    x_t = ab**0.5 * x0 + (1 - ab) ** 0.5 * torch.randn(x0.shape, dtype=torch.float64)
    marginal = GM.marginal(ab)
    assert torch.allclose(x_t.mean(0), marginal.mean(), atol=0.015)
    assert torch.allclose(torch.cov(x_t.T), marginal.covariance(), atol=0.02)


def test_non_positive_definite_covariance_is_refused():
    with pytest.raises(Exception, match="positive-definite|positive definite"):
        GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]])


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="expected weights"):
        GaussianMixture([0.5, 0.5], [[0.0, 0.0]], [[[1.0, 0.0], [0.0, 1.0]]])
