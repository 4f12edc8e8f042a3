"""Ancestral sampling (Algorithm 2) with the exact denoiser reproduces the data distribution."""

import math

import pytest
import torch

from ddpm.oracle import GaussianMixture
from ddpm.samplers import SAMPLERS, ancestral_sample, evenly_spaced_timesteps, sample
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
N = 4000


@pytest.fixture(scope="module")
def samples():
    s = NoiseSchedule.from_name("linear", 1000)
    g = torch.Generator().manual_seed(0)
    out = sample(GM.denoiser(s), s, (N, 2), generator=g, dtype=torch.float64)
    return out.x0


def test_ancestral_samples_have_the_mixture_mean(samples):
    se = torch.diagonal(GM.covariance()).sqrt() / math.sqrt(N)
    assert ((samples.mean(0) - GM.mean()).abs() < 4 * se).all()


def test_ancestral_samples_have_the_mixture_covariance(samples):
    cov = GM.covariance()
    # SE of a covariance entry ~ sqrt((s_ii s_jj + s_ij^2) / N) for near-Gaussian data; mixtures are
    # heavier-tailed, so allow 5 of them.
    se = ((torch.outer(cov.diagonal(), cov.diagonal()) + cov**2) / N).sqrt()
    assert ((torch.cov(samples.T) - cov).abs() < 5 * se).all()


def test_ancestral_samples_have_the_mixture_weights(samples):
    component = GM.component_log_prob(samples).argmax(1)
    share = (component == 0).double().mean().item()
    # The components barely overlap, so the most likely one is the true one almost always.
    assert abs(share - 0.3) < 4 * math.sqrt(0.3 * 0.7 / N) + 0.005


def test_sampling_is_deterministic_for_a_seed():
    s = NoiseSchedule.from_name("linear", 50)
    model = GM.denoiser(s)
    a = sample(model, s, (16, 2), generator=torch.Generator().manual_seed(5)).x0
    b = sample(model, s, (16, 2), generator=torch.Generator().manual_seed(5)).x0
    c = sample(model, s, (16, 2), generator=torch.Generator().manual_seed(6)).x0
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_respaced_sampling_calls_the_model_with_original_timesteps():
    s = NoiseSchedule.from_name("linear", 1000)
    seen = []

    def model(x_t, t):
        seen.append(int(t[0]))
        return torch.zeros_like(x_t)

    out = sample(model, s, (3, 1, 4, 4), num_steps=10)
    assert out.x0.shape == (3, 1, 4, 4)
    assert seen == evenly_spaced_timesteps(1000, 10).flip(0).tolist()
    assert seen[0] == 999 and seen[-1] == 0


def test_trajectory_records_the_requested_steps_and_the_result():
    s = NoiseSchedule.from_name("linear", 100)
    x_T = torch.randn(2, 2, dtype=torch.float64)
    out = ancestral_sample(GM.denoiser(s), s, x_T, record=[99, 10, 0])
    assert set(out.trajectory) == {99, 10, 0, -1}
    assert torch.equal(out.trajectory[99], x_T)
    assert torch.equal(out.trajectory[-1], out.x0)


def test_evenly_spaced_grid_starts_at_T_minus_1_and_ends_at_0():
    grid = evenly_spaced_timesteps(1000, 7)
    assert grid[0] == 0 and grid[-1] == 999 and len(grid) == 7
    with pytest.raises(ValueError, match="steps"):
        evenly_spaced_timesteps(1000, 0)


def test_unknown_sampler_is_refused():
    s = NoiseSchedule.from_name("linear", 100)
    with pytest.raises(ValueError, match="ancestral"):
        sample(GM.denoiser(s), s, (1, 2), sampler="euler")
    assert "ancestral" in SAMPLERS
