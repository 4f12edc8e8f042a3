"""The exact Gaussian-mixture denoiser against independent computations."""

import math

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from ddpm.oracle import GaussianMixture
from ddpm.schedules import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")


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


# --------------------------------------------------------------------------------------------------
# the labelled form: component k = class k, null label K
# --------------------------------------------------------------------------------------------------

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("t", [0, 300, 999])
def test_conditional_denoiser_is_the_components_own_denoiser(t):
    s = NoiseSchedule.from_name("cosine", 1000)
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2
    tt = torch.full((6,), t)
    for k in range(GM.num_components):
        want = GM.component(k).denoiser(s)(x, tt)
        got = GM.denoiser(s)(x, tt, class_labels=torch.full((6,), k))
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


def test_null_label_gives_the_unconditional_denoiser_and_labels_mix_in_one_batch():
    s = NoiseSchedule.from_name("linear", 1000)
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([5, 100, 500, 900])
    oracle = GM.denoiser(s)
    assert oracle.null_label == GM.null_label == 2
    assert torch.equal(oracle(x, t, class_labels=torch.full((4,), 2)), oracle(x, t))
    labels = torch.tensor([0, 2, 1, 0])
    mixed = oracle(x, t, class_labels=labels)
    for i, k in enumerate(labels.tolist()):
        alone = oracle(x[i : i + 1], t[i : i + 1], class_labels=torch.tensor([k]))
        assert torch.allclose(mixed[i : i + 1], alone, rtol=1e-12)


def test_labelled_samples_are_the_plain_samples_with_their_components():
    n = 20_000
    plain = GM.sample(n, torch.Generator().manual_seed(4))
    x, labels = GM.sample_labelled(n, torch.Generator().manual_seed(4))
    assert torch.equal(x, plain)
    for k in range(GM.num_components):
        share = float((labels == k).double().mean())
        w = float(GM.weights[k])
        assert abs(share - w) < 4 * math.sqrt(w * (1 - w) / n)
        xk = x[labels == k]
        se = (GM.covs[k].diagonal() / len(xk)).sqrt()
        assert ((xk.mean(0) - GM.means[k]).abs() < 4 * se).all()


def test_samples_given_a_class_have_that_components_moments():
    n = 50_000
    x, _ = GM.sample_labelled(n, torch.Generator().manual_seed(5), labels=torch.ones(n, dtype=int))
    assert torch.allclose(x.mean(0), GM.means[1], atol=4 * 0.7 / math.sqrt(n))
    assert torch.allclose(torch.cov(x.T), GM.covs[1], atol=0.01)


def test_bad_labels_are_refused():
    oracle = GM.denoiser(NoiseSchedule.from_name("linear", 100))
    x, t = torch.zeros(3, 2, dtype=torch.float64), torch.full((3,), 10)
    with pytest.raises(ValueError, match=r"\[0, 2\] \(2 = null\)"):
        oracle(x, t, class_labels=torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match="shape"):
        oracle(x, t, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        GM.sample_labelled(2, labels=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="component"):
        GM.component(2)


@pytest.mark.parametrize("device", DEVICES)
def test_denoiser_follows_the_inputs_device(device):
    # The schedule and mixture stay on the CPU; CUDA inputs once failed in searchsorted/indexing.
    s = NoiseSchedule.from_name("linear", 1000)
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([0, 1, 10, 100, 500, 500, 998, 999])
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    oracle = GM.denoiser(s)
    for kwargs in ({}, {"class_labels": labels}):
        moved = {k: v.to(device) for k, v in kwargs.items()}
        got = oracle(x.to(device), t.to(device), **moved)
        assert got.device.type == device
        assert torch.allclose(got.cpu(), oracle(x, t, **kwargs), rtol=1e-10, atol=1e-12)
    got32 = oracle(x.float().to(device), t.to(device))
    assert got32.dtype == torch.float32 and got32.device.type == device
