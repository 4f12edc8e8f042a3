"""Ancestral sampling (Algorithm 2) with the exact denoiser reproduces the data distribution."""

import math

import pytest
import torch

from ddpm.oracle import GaussianMixture
from ddpm.samplers import (
    LOG_SNR_LOW,
    SAMPLERS,
    ancestral_sample,
    ddim_sample,
    dpm_solver_sample,
    evenly_spaced_timesteps,
    sample,
    timestep_grid,
)
from ddpm.schedules import NoiseSchedule, respace

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_ddim_with_eta_one_on_the_full_grid_equals_ancestral_sampling():
    s = NoiseSchedule.from_name("linear", 200)
    model, x_T = GM.denoiser(s), torch.randn(64, 2, dtype=torch.float64)
    ancestral = ancestral_sample(model, s, x_T, generator=torch.Generator().manual_seed(1)).x0
    ddim = ddim_sample(model, s, x_T, eta=1.0, generator=torch.Generator().manual_seed(1)).x0
    assert torch.allclose(ddim, ancestral, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("grid", ["linspace", "logsnr", "trailing"])
def test_dpm_solver_order_one_equals_ddim_with_eta_zero(grid):
    s = NoiseSchedule.from_name("cosine", 1000)
    r = respace(s, timestep_grid(s, 12, grid))
    model, x_T = GM.denoiser(s), torch.randn(64, 2, dtype=torch.float64)
    ddim = ddim_sample(model, r, x_T, eta=0.0).x0
    dpm = dpm_solver_sample(model, r, x_T, order=1).x0
    assert torch.allclose(dpm, ddim, rtol=1e-9, atol=1e-9)


def test_ddim_with_eta_zero_is_deterministic_given_x_T():
    s = respace(NoiseSchedule.from_name("linear", 1000), evenly_spaced_timesteps(1000, 10))
    model, x_T = GM.denoiser(NoiseSchedule.from_name("linear", 1000)), torch.randn(8, 2)
    a = ddim_sample(model, s, x_T, generator=torch.Generator().manual_seed(1)).x0
    b = ddim_sample(model, s, x_T, generator=torch.Generator().manual_seed(2)).x0
    assert torch.equal(a, b)


@pytest.mark.parametrize("order", [2, 3])
def test_higher_order_dpm_solver_converges_to_the_full_chain_result(order):
    # The deterministic samplers solve the same probability-flow ODE: with many steps they agree.
    s = NoiseSchedule.from_name("linear", 1000)
    model, x_T = GM.denoiser(s), torch.randn(256, 2, dtype=torch.float64)
    reference = ddim_sample(model, s, x_T).x0
    errors = []
    for k in (25, 100):
        r = respace(s, timestep_grid(s, k, "logsnr"))
        errors.append(
            (dpm_solver_sample(model, r, x_T, order=order).x0 - reference).abs().median().item()
        )
    assert errors[1] < errors[0]
    assert errors[1] < 0.02


@pytest.mark.parametrize(
    "grid,first,last",
    [
        ("linspace", 0, 999),
        ("leading", 0, 950),
        ("trailing", 49, 999),
        ("quadratic", 0, 999),
        ("logsnr", 0, 999),
        ("logsnr_sparse", 0, 999),
        ("karras", 0, 999),
    ],
)
def test_every_grid_has_distinct_ascending_steps_between_its_defined_ends(grid, first, last):
    steps = timestep_grid(NoiseSchedule.from_name("linear", 1000), 20, grid)
    assert len(steps) == 20
    assert (steps.diff() > 0).all()
    assert (int(steps[0]), int(steps[-1])) == (first, last)


def test_grid_with_as_many_steps_as_the_chain_is_the_chain():
    s = NoiseSchedule.from_name("linear", 100)
    for grid in (
        "linspace",
        "quadratic",
        "logsnr",
        "logsnr_sparse",
        "trailing",
        "leading",
        "karras",
    ):
        assert torch.equal(timestep_grid(s, 100, grid), torch.arange(100)), grid


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_logsnr_sparse_grid_is_uniform_in_log_snr_above_minus_4_and_five_times_sparser_below(
    schedule,
):
    s = NoiseSchedule.from_name(schedule, 1000)
    log_snr = s.log_snr[timestep_grid(s, 40, "logsnr_sparse")].flip(0)  # from T-1 down to 0
    gaps = log_snr.diff()
    # Where the chain's own steps are fine (log-SNR -10..5; at either end one step of the chain can
    # span more than a gap), the nearest steps land close to the uniform spacing of each part.
    high = gaps[(log_snr[:-1] >= -4) & (log_snr[1:] <= 5)]
    low = gaps[(log_snr[:-1] >= -10) & (log_snr[1:] <= -4)]
    assert torch.allclose(high, high.median().expand_as(high), rtol=0.1)
    assert abs(float(low.median() / high.median()) - 5) < 0.6
    assert float(log_snr[0]) == float(s.log_snr[-1]) and float(log_snr[-1]) == float(s.log_snr[0])


@pytest.mark.parametrize("schedule", ["linear", "quadratic", "sigmoid"])
def test_logsnr_grid_is_uniform_in_log_snr_over_a_chain_that_ends_above_the_low_cutoff(schedule):
    s = NoiseSchedule.from_name(schedule, 1000)
    log_snr = s.log_snr[timestep_grid(s, 10, "logsnr")]
    uniform = torch.linspace(float(s.log_snr[0]), float(s.log_snr[-1]), 10, dtype=torch.float64)
    assert (log_snr - uniform).abs().max() < 0.1


@pytest.mark.parametrize("zero_terminal_snr,schedule", [(False, "cosine"), (True, "linear")])
def test_logsnr_grid_crosses_the_chain_below_the_low_cutoff_in_one_step(
    zero_terminal_snr, schedule
):
    # cosine spends its last 3 steps from log-SNR -11.5 to -19.8; a zero terminal SNR ends at -inf.
    s = NoiseSchedule.from_name(schedule, 1000, zero_terminal_snr=zero_terminal_snr)
    for k in (5, 10, 20):
        steps = timestep_grid(s, k, "logsnr")
        log_snr = s.log_snr[steps].clamp(min=-30.0)
        assert len(steps) == k and int(steps[0]) == 0 and int(steps[-1]) == 999
        assert (log_snr[:-1] > LOG_SNR_LOW - 0.5).all()  # one point below the cutoff: T-1
        # The rest: the chain's steps nearest to uniform values between log-SNR at t = 0 and the
        # cutoff (near the cutoff, cosine's own steps are 0.5-0.8 apart).
        uniform = torch.linspace(float(s.log_snr[0]), LOG_SNR_LOW, k - 1, dtype=torch.float64)
        assert (log_snr[:-1] - uniform).abs().max() < 0.45


def test_logsnr_sparse_grid_converges_to_the_full_chain():
    """Its largest log-SNR gap shrinks as the grid grows (a fixed first jump would not)."""
    s = NoiseSchedule.from_name("linear", 1000)
    widest = [float(s.log_snr[timestep_grid(s, k, "logsnr_sparse")].diff().abs().max())
              for k in (10, 40, 160)]  # fmt: skip
    assert widest[0] > 2 * widest[1] > 4 * widest[2]


@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5])
def test_grid_with_a_bad_step_count_is_refused(steps):
    with pytest.raises(ValueError, match="steps"):
        timestep_grid(NoiseSchedule.from_name("linear", 1000), steps, "linspace")


def test_unknown_grid_is_refused():
    with pytest.raises(ValueError, match="trailing"):
        timestep_grid(NoiseSchedule.from_name("linear", 1000), 10, "cubic")


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "sde_dpm_solver", "unipc"])
def test_a_cpu_generator_gives_the_same_samples_on_every_device(device, sampler):
    # x_T and every reverse-step z are drawn on the generator's device, then moved to the data's.
    s = NoiseSchedule.from_name("linear", 50)
    model = lambda x, t: 0.5 * x  # noqa: E731  device-agnostic stand-in for a network
    options = {"eta": 1.0} if sampler == "ddim" else {}
    cpu = sample(model, s, (16, 2), sampler=sampler, num_steps=10,
                 generator=torch.Generator().manual_seed(3), dtype=torch.float64, **options).x0  # fmt: skip
    out = sample(model, s, (16, 2), sampler=sampler, num_steps=10, device=device,
                 generator=torch.Generator().manual_seed(3), dtype=torch.float64, **options).x0  # fmt: skip
    assert out.device.type == device
    assert torch.allclose(out.cpu(), cpu, rtol=1e-12, atol=1e-12)


def test_the_first_noise_draw_is_x_T_from_the_generator():
    s = NoiseSchedule.from_name("linear", 50)
    seen = []
    sample(lambda x, t: seen.append(x.clone()) or torch.zeros_like(x), s, (4, 3),
           sampler="ddim", generator=torch.Generator().manual_seed(8))  # fmt: skip
    assert torch.equal(seen[0], torch.randn(4, 3, generator=torch.Generator().manual_seed(8)))
