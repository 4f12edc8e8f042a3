"""Editing (inpainting, SDEdit, DDIM inversion, interpolation) against closed forms: for one
Gaussian x_0 ~ N(mu, S) with the exact denoiser, every distribution these methods should produce is
Gaussian and known."""

import math

import pytest
import torch

from ddpm.editing import (
    ddim_invert,
    ddim_reconstruct,
    denoise_from,
    inpaint,
    interpolate,
    repaint_schedule,
    sdedit,
    slerp,
    start_index,
)
from ddpm.oracle import GaussianMixture
from ddpm.samplers import SAMPLERS, timestep_grid
from ddpm.schedules import NoiseSchedule, respace

pytestmark = pytest.mark.usefixtures("one_thread")


F64 = torch.float64
MU = torch.tensor([0.3, -0.2, 0.5], dtype=F64)
S = 0.5 * torch.tensor([[1.0, 0.8, 0.6], [0.8, 1.0, 0.7], [0.6, 0.7, 1.0]], dtype=F64)
GAUSSIAN = GaussianMixture([1.0], MU[None], S[None])
# A 2-D mixture for the nonlinear cases (inversion error, interpolation).
MIXTURE = GaussianMixture(
    [0.2, 0.5, 0.3],
    [[-1.0, 0.0], [0.8, 0.5], [0.2, -0.9]],
    [[[0.30, 0.10], [0.10, 0.20]], [[0.25, -0.05], [-0.05, 0.30]], [[0.20, 0.0], [0.0, 0.15]]],
)
LINEAR = NoiseSchedule.from_name("linear", 1000)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def matrix_function(m: torch.Tensor, f) -> torch.Tensor:
    """f applied to the eigenvalues of a symmetric matrix."""
    lam, q = torch.linalg.eigh(m)
    return q @ torch.diag(f(lam)) @ q.T


def moments_se(cov: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard errors of a sample mean and of each sample-covariance entry (Gaussian data)."""
    var = cov.diagonal()
    return (var / n).sqrt(), ((var[:, None] * var[None, :] + cov**2) / n).sqrt()


# --------------------------------------------------------------------------------------------------
# inpainting
# --------------------------------------------------------------------------------------------------


def test_repaint_schedule_follows_the_papers_jumps():
    # get_schedule_jump(T=6, jump_length=2, jump_n_sample=2) by hand: jumps back up at 2 and at 0.
    assert repaint_schedule(6, 2, 2) == [5, 4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0, -1]
    assert repaint_schedule(5, 3, 1) == [4, 3, 2, 1, 0, -1]  # resample 1: plain replacement


@pytest.mark.parametrize("T, j, r", [(50, 1, 4), (100, 10, 10), (37, 5, 3)])
def test_repaint_schedule_moves_by_one_step_from_x_T_to_x_0(T, j, r):
    order = repaint_schedule(T, j, r)
    assert order[0] == T - 1 and order[-1] == -1
    assert all(abs(b - a) == 1 for a, b in zip(order[:-1], order[1:], strict=True))
    downs = sum(b < a for a, b in zip(order[:-1], order[1:], strict=True))
    assert downs == T + (r - 1) * j * len(range(0, T - j, j))


OBSERVED, MISSING = [0], [1, 2]
X_OBS = torch.tensor([1.2], dtype=F64)


def exact_conditional() -> tuple[torch.Tensor, torch.Tensor]:
    """x_u | x_o for x ~ N(mu, S): N(mu_u + S_uo S_oo^-1 (x_o - mu_o), S_uu - S_uo S_oo^-1 S_ou)."""
    s_uo, s_oo = S[MISSING][:, OBSERVED], S[OBSERVED][:, OBSERVED]
    mean = MU[MISSING] + s_uo @ torch.linalg.solve(s_oo, X_OBS - MU[OBSERVED])
    cov = S[MISSING][:, MISSING] - s_uo @ torch.linalg.solve(s_oo, s_uo.T)
    return mean, cov


def inpaint_gaussian(n: int, schedule, **options) -> torch.Tensor:
    x0 = torch.zeros(n, 3, dtype=F64)
    x0[:, OBSERVED] = X_OBS
    mask = torch.tensor([1.0, 0.0, 0.0], dtype=F64)  # broadcasts over the batch
    out = inpaint(GAUSSIAN.denoiser(schedule), schedule, x0, mask, generator=seeded(), **options)
    assert torch.equal(out.x0[:, OBSERVED], x0[:, OBSERVED])  # the known entries, exactly
    return out.x0[:, MISSING]


def test_inpainting_one_gaussian_against_the_exact_conditional(capsys):
    # Neither method samples x_u | x_o exactly, even with the exact denoiser. Replacement does not
    # let the unknown part react to the known one (it lands about half-way between the prior and the
    # conditional mean). RePaint's resampling fixes most of the mean, but at each noise level the
    # unknown part sees a fresh draw of the known part every round and averages over them: its
    # spread shrinks towards the variance given one noisy known part, and falls below the truth as
    # the resampling count grows. Measured, printed, and held to bounds well outside the noise.
    n, schedule = 4000, NoiseSchedule.from_name("linear", 200)
    mean, cov = exact_conditional()
    se_mean, se_cov = moments_se(cov, n)
    shift = (mean - MU[MISSING]).norm()
    errors = {}
    for name, j, r in [("replacement", 1, 1), ("RePaint j=10 r=10", 10, 10)]:
        x = inpaint_gaussian(n, schedule, jump_length=j, resample=r)
        errors[name] = ((x.mean(0) - mean).norm(), (torch.cov(x.T) - cov).abs().max())
        with capsys.disabled():
            print(
                f"\n{name:>18} (T=200, n={n}): mean {x.mean(0).tolist()} vs {mean.tolist()}, "
                f"error {float(errors[name][0]):.3f} = {float(errors[name][0] / shift):.0%} of "
                f"the shift; covariance error (max entry) {float(errors[name][1]):.3f} "
                f"(mean SE {float(se_mean.max()):.3f}, covariance SE {float(se_cov.max()):.3f})"
            )
    (rep_mean, rep_cov), (rp_mean, rp_cov) = errors.values()
    assert rep_mean > 0.3 * shift  # the baseline's known bias: much more than noise (~0.01)
    assert rp_mean < rep_mean / 3 and rp_mean < 0.15 * shift
    assert rp_cov < 0.05  # entries 0.11-0.32


def test_inpainting_with_nothing_known_samples_the_data():
    n = 4000
    x0 = torch.zeros(n, 3, dtype=F64)
    schedule = NoiseSchedule.from_name("linear", 100)
    out = inpaint(
        GAUSSIAN.denoiser(schedule), schedule, x0, torch.zeros(3, dtype=F64), resample=1,
        generator=seeded(),
    )  # fmt: skip
    se_mean, se_cov = moments_se(S, n)
    assert ((out.x0.mean(0) - MU).abs() < 5 * se_mean).all()
    assert ((torch.cov(out.x0.T) - S).abs() < 5 * se_cov + 0.01).all()  # + 100-step bias
    assert out.num_model_calls == 100


def test_inpainting_with_everything_known_returns_the_input():
    x0 = GAUSSIAN.sample(5, seeded(1))
    schedule = NoiseSchedule.from_name("cosine", 20)
    out = inpaint(
        GAUSSIAN.denoiser(schedule), schedule, x0, torch.ones_like(x0), generator=seeded()
    )
    assert torch.equal(out.x0, x0)


# --------------------------------------------------------------------------------------------------
# SDEdit
# --------------------------------------------------------------------------------------------------

X_IN = torch.tensor([1.5, -1.0, 0.0], dtype=F64)  # an "input" far from typical data


def sdedit_gaussian(n, schedule, strength, **options):
    model = GAUSSIAN.denoiser(schedule)
    out = sdedit(model, schedule, X_IN.expand(n, 3), strength, generator=seeded(), **options)
    a = schedule.sqrt_alpha_bar[out.start_index].item()
    return out, a, 1 - a * a


def test_sdedit_with_ancestral_sampling_draws_from_the_posterior_given_the_noised_input():
    # x_k = a x_in + sigma eps, then exact reverse sampling from x_k draws x_0 | x_k, which is
    # N(mu + a S C^-1 (x_k - a mu), S - a^2 S C^-1 S), C = a^2 S + sigma^2 I; averaged over eps:
    # mean mu + a^2 S C^-1 (x_in - mu), covariance S - a^2 S C^-1 S + a^2 sigma^2 S C^-2 S.
    n = 4000
    out, a, sigma2 = sdedit_gaussian(n, LINEAR, 0.3, sampler="ancestral")
    assert out.start_index == 299
    c_inv = torch.linalg.inv(a * a * S + sigma2 * torch.eye(3, dtype=F64))
    mean = MU + a * a * S @ c_inv @ (X_IN - MU)
    cov = S - a * a * S @ c_inv @ S + a * a * sigma2 * S @ c_inv @ c_inv @ S
    se_mean, se_cov = moments_se(cov, n)
    assert ((out.x0.mean(0) - mean).abs() < 5 * se_mean).all(), (out.x0.mean(0), mean)
    assert ((torch.cov(out.x0.T) - cov).abs() < 5 * se_cov).all()


def test_sdedit_with_dpm_solver_on_a_respaced_chain_follows_the_probability_flow_map():
    # The probability-flow ODE of one Gaussian maps x_k to mu + S^1/2 C^-1/2 (x_k - a mu) (S and C
    # commute), so the edits are N(mu + a S^1/2 C^-1/2 (x_in - mu), sigma^2 S C^-1).
    n = 4000
    chain = respace(LINEAR, timestep_grid(LINEAR, 50, "logsnr"))
    out, a, sigma2 = sdedit_gaussian(n, chain, 0.6, sampler="dpm_solver", order=3)
    assert out.start_index == 29
    c = a * a * S + sigma2 * torch.eye(3, dtype=F64)
    flow = matrix_function(S, torch.sqrt) @ matrix_function(c, torch.rsqrt)
    mean = MU + a * flow @ (X_IN - MU)
    cov = sigma2 * S @ torch.linalg.inv(c)
    se_mean, se_cov = moments_se(cov, n)
    assert ((out.x0.mean(0) - mean).abs() < 5 * se_mean).all(), (out.x0.mean(0), mean)
    assert ((torch.cov(out.x0.T) - cov).abs() < 5 * se_cov).all()


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_denoising_from_the_last_index_is_the_sampler_itself(sampler):
    chain = respace(LINEAR, timestep_grid(LINEAR, 10, "linspace"))
    model = MIXTURE.denoiser(LINEAR)
    x_T = torch.randn(64, 2, dtype=F64, generator=seeded(3))
    got = denoise_from(model, chain, x_T, 9, sampler=sampler, generator=seeded(4)).x0
    want = SAMPLERS[sampler](model, chain, x_T, generator=seeded(4)).x0
    assert torch.equal(got, want)


@pytest.mark.parametrize("strength, index", [(1.0, 999), (0.5, 499), (0.3, 299), (1e-6, 0)])
def test_strength_maps_to_the_start_index(strength, index):
    assert start_index(1000, strength) == index


# --------------------------------------------------------------------------------------------------
# DDIM inversion
# --------------------------------------------------------------------------------------------------


def test_ddim_inversion_of_one_gaussian_follows_the_probability_flow_map():
    # x_T = a mu + C^1/2 S^-1/2 (x_0 - mu), C = a^2 S + sigma^2 I at the last index.
    x0 = GAUSSIAN.sample(200, seeded(5))
    a = LINEAR.sqrt_alpha_bar[-1].item()
    c = a * a * S + (1 - a * a) * torch.eye(3, dtype=F64)
    flow = matrix_function(c, torch.sqrt) @ matrix_function(S, torch.rsqrt)
    want = a * MU + (x0 - MU) @ flow.T
    got = ddim_invert(GAUSSIAN.denoiser(LINEAR), LINEAR, x0).x_T
    assert (got - want).abs().max() < 0.02  # measured 1000-step error: see the next test


def test_ddim_reconstruction_error_is_small_at_1000_steps_and_shrinks_with_steps():
    # The inversion uses eps at the point just left, a first-order approximation: the error falls
    # like 1/K (measured on this mixture: max 8.4e-3 at K = 1000, 8.3e-2 at 100, 0.38 at 20).
    x0 = MIXTURE.sample(300, seeded(6))
    model = MIXTURE.denoiser(LINEAR)
    errors = {}
    for k in (20, 100, 1000):
        chain = LINEAR if k == 1000 else respace(LINEAR, timestep_grid(LINEAR, k, "linspace"))
        errors[k] = float(ddim_reconstruct(model, chain, x0).error.max())
    assert errors[1000] < 0.02
    assert errors[1000] < errors[100] / 4 < errors[20] / 8


# --------------------------------------------------------------------------------------------------
# interpolation
# --------------------------------------------------------------------------------------------------


def test_slerp_of_orthogonal_unit_vectors_walks_the_quarter_circle():
    w = torch.linspace(0, 1, 7, dtype=F64)
    got = slerp(torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), w)
    want = torch.stack([torch.cos(w * math.pi / 2), torch.sin(w * math.pi / 2)], dim=1)
    assert torch.allclose(got, want, atol=1e-12)


def test_slerp_keeps_the_endpoints_and_equal_norms():
    a = torch.randn(3, 4, 4, generator=seeded(7))
    b = torch.randn(3, 4, 4, generator=seeded(8))
    b = b * a.norm() / b.norm()
    frames = slerp(a, b, torch.linspace(0, 1, 5))
    assert frames.shape == (5, 3, 4, 4)
    assert torch.allclose(frames[0], a, atol=1e-6) and torch.allclose(frames[-1], b, atol=1e-6)
    assert torch.allclose(frames.flatten(1).norm(dim=1), a.norm().expand(5), rtol=1e-5)


def test_interpolation_decodes_each_frame_as_the_sampler_would():
    x_T_a, x_T_b = torch.randn(2, 2, dtype=F64, generator=seeded(9))
    chain = respace(LINEAR, timestep_grid(LINEAR, 20, "linspace"))
    model = MIXTURE.denoiser(LINEAR)
    out = interpolate(model, chain, x_T_a, x_T_b, 6)
    assert out.x_T.shape == out.x0.shape == (6, 2) and out.weights.shape == (6,)
    alone = SAMPLERS["ddim"](model, chain, torch.stack([x_T_a, x_T_b])).x0
    assert torch.allclose(out.x0[[0, -1]], alone, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------

SMALL = NoiseSchedule.from_name("cosine", 10)
MODEL = GAUSSIAN.denoiser(SMALL)
X = torch.zeros(4, 3, dtype=F64)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: inpaint(MODEL, SMALL, X, torch.ones(4, 2)), "does not fit the image"),
        (lambda: inpaint(MODEL, SMALL, X, torch.ones(5, 3)), "does not fit the image"),
        (lambda: inpaint(MODEL, SMALL, X, torch.full((3,), 0.5)), "only 0"),
        (lambda: inpaint(MODEL, SMALL, X, torch.ones(3), jump_length=0), "jump_length"),
        (lambda: inpaint(MODEL, SMALL, X, torch.ones(3), resample=1.5), "resample"),
        (lambda: sdedit(MODEL, SMALL, X, 0.0), r"strength must lie in \(0, 1\]"),
        (lambda: sdedit(MODEL, SMALL, X, 1.5), r"strength must lie in \(0, 1\]"),
        (lambda: sdedit(MODEL, SMALL, X, float("nan")), r"strength must lie in \(0, 1\]"),
        (lambda: sdedit(MODEL, SMALL, X, 0.5, sampler="euler"), "unknown sampler"),
        (lambda: denoise_from(MODEL, SMALL, X, 10), r"index must lie in \[0, 9\]"),
        (lambda: slerp(torch.zeros(3), torch.zeros(4), [0.5]), "one shape"),
        (lambda: interpolate(MODEL, SMALL, X[0], X[1], 1), "at least 2"),
    ],
)
def test_bad_editing_input_is_refused_with_a_clear_message(call, message):
    with pytest.raises(ValueError, match=message):
        call()
