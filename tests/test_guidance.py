"""Classifier-free guidance against the labelled Gaussian-mixture oracle, whose conditional and
unconditional denoisers are exact: what guided sampling must give at w = 0 and w = 1 is known."""

import math

import pytest
import torch

from ddpm.diffusion import x0_from_eps
from ddpm.guidance import classifier_free_guidance, drop_labels
from ddpm.oracle import GaussianMixture
from ddpm.samplers import GRIDS, SAMPLERS, sample
from ddpm.schedules import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")


# Three overlapping classes in 2-D: conditional and unconditional sampling differ clearly.
GM = GaussianMixture(
    [0.2, 0.5, 0.3],
    [[-1.0, 0.0], [0.8, 0.5], [0.2, -0.9]],
    [[[0.30, 0.10], [0.10, 0.20]], [[0.25, -0.05], [-0.05, 0.30]], [[0.20, 0.0], [0.0, 0.15]]],
)
SCHEDULE = NoiseSchedule.from_name("linear", 1000)
ORACLE = GM.denoiser(SCHEDULE)
NULL = GM.null_label


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draw(model, n, sampler="dpm_solver", steps=20, seed=0, **options):
    return sample(
        model,
        SCHEDULE,
        (n, 2),
        sampler=sampler,
        num_steps=steps,
        generator=seeded(seed),
        dtype=torch.float64,
        **options,
    ).x0


def test_conditional_sampling_with_the_exact_denoiser_gives_each_class_its_component():
    n = 10_000
    labels = torch.arange(3).repeat_interleave(n)
    x = draw(classifier_free_guidance(ORACLE, labels, 1.0, NULL), 3 * n, steps=50, order=3)
    for k in range(3):
        xk = x[labels == k]
        var = GM.covs[k].diagonal()
        se_mean = (var / n).sqrt()
        # SE of a sample covariance entry: sqrt((S_ii S_jj + S_ij^2) / n).
        se_cov = ((var[:, None] * var[None, :] + GM.covs[k] ** 2) / n).sqrt()
        assert ((xk.mean(0) - GM.means[k]).abs() < 5 * se_mean).all(), (k, xk.mean(0))
        assert ((torch.cov(xk.T) - GM.covs[k]).abs() < 5 * se_cov).all(), (k, torch.cov(xk.T))


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_scale_one_is_exactly_conditional_sampling(sampler):
    labels = torch.tensor([0, 1, 2, 1] * 50)

    def conditional(x, t):
        return ORACLE(x, t, class_labels=labels)

    guided = classifier_free_guidance(ORACLE, labels, 1.0, NULL)
    assert torch.equal(draw(guided, 200, sampler), draw(conditional, 200, sampler))


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_scale_zero_is_exactly_unconditional_sampling(sampler):
    guided = classifier_free_guidance(ORACLE, 2, 0.0, NULL)
    assert torch.equal(draw(guided, 200, sampler), draw(ORACLE, 200, sampler))


def test_both_branches_come_from_one_call_on_the_doubled_batch_and_combine_as_stated():
    calls = []

    def counting(x, t, class_labels):
        calls.append((x.shape[0], class_labels.clone()))
        return ORACLE(x, t, class_labels=class_labels)

    x = torch.randn(6, 2, dtype=torch.float64, generator=seeded(1))
    t = torch.tensor([10, 200, 500, 500, 800, 999])
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    out = classifier_free_guidance(counting, labels, 3.0, NULL)(x, t)
    assert len(calls) == 1 and calls[0][0] == 12
    assert torch.equal(calls[0][1], torch.cat([labels, torch.full((6,), NULL)]))
    cond, uncond = ORACLE(x, t, class_labels=labels), ORACLE(x, t)
    assert torch.allclose(out, uncond + 3.0 * (cond - uncond), rtol=1e-12, atol=1e-12)


def test_guiding_x0_predictions_is_guiding_eps():
    # For fixed (x_t, t), x0 is affine in eps and the guided mix's weights sum to one.
    def x0_model(x, t, class_labels=None):
        return x0_from_eps(SCHEDULE, x, t, ORACLE(x, t, class_labels=class_labels))

    x = torch.randn(5, 2, dtype=torch.float64, generator=seeded(2))
    t = torch.tensor([3, 100, 400, 700, 990])
    eps = classifier_free_guidance(ORACLE, 1, 4.0, NULL)(x, t)
    x0 = classifier_free_guidance(x0_model, 1, 4.0, NULL)(x, t)
    assert torch.allclose(x0, x0_from_eps(SCHEDULE, x, t, eps), rtol=1e-9, atol=1e-9)


def test_learned_variance_channels_come_from_the_conditional_branch():
    def learned(x, t, class_labels):
        variance = class_labels.to(x.dtype)[:, None].expand_as(x)  # tells the branches apart
        return torch.cat([ORACLE(x, t, class_labels=class_labels), variance], dim=1)

    x = torch.randn(4, 2, dtype=torch.float64, generator=seeded(3))
    t = torch.full((4,), 300)
    out = classifier_free_guidance(learned, torch.tensor([0, 1, 2, 1]), 2.5, NULL)(x, t)
    assert out.shape == (4, 4)
    assert torch.equal(
        out[:, 2:], torch.tensor([0.0, 1, 2, 1], dtype=torch.float64)[:, None].expand(4, 2)
    )
    cond, uncond = ORACLE(x, t, class_labels=torch.tensor([0, 1, 2, 1])), ORACLE(x, t)
    assert torch.allclose(out[:, :2], uncond + 2.5 * (cond - uncond))


def log_posterior(x: torch.Tensor, k: int) -> torch.Tensor:
    """log p(class k | x) under the mixture (Bayes' rule), per sample."""
    log_joint = GM.component_log_prob(x)
    return log_joint[:, k] - torch.logsumexp(log_joint, 1)


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_guidance_sharpens_the_class_with_every_sampler_and_grid(sampler, grid):
    # Guided sampling targets p(x | c) p(c | x)^(w - 1): a larger w raises E[log p(c | x)]. Measured
    # gains from w = 1 to 3 are 0.1-0.5 nats, 10-40 standard errors.
    k = 0
    lp = {
        w: log_posterior(
            draw(classifier_free_guidance(ORACLE, k, w, NULL), 2000, sampler, 20, grid=grid), k
        )
        for w in (1.0, 3.0)
    }
    assert all(torch.isfinite(v).all() for v in lp.values())
    gain = lp[3.0].mean() - lp[1.0].mean()
    se = math.sqrt(sum(float(v.var()) / v.numel() for v in lp.values()))
    assert gain > 5 * se, (float(gain), se)


@pytest.mark.parametrize(
    "args, message",
    [
        ((1, float("nan"), 3), "finite"),
        ((1, "3", 3), "finite"),
        ((torch.tensor([0.5]), 2.0, 3), "integer"),
        ((4, 2.0, 3), r"\[0, 3\]"),
        ((torch.tensor([-1, 0]), 2.0, 3), r"\[0, 3\]"),
        ((1, 2.0, -1), "null_label"),
    ],
)
def test_bad_guidance_arguments_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        classifier_free_guidance(ORACLE, *args)


def test_labels_of_the_wrong_batch_size_are_refused_at_call_time():
    guided = classifier_free_guidance(ORACLE, torch.tensor([0, 1]), 2.0, NULL)
    with pytest.raises(ValueError, match="one per example"):
        guided(torch.zeros(3, 2, dtype=torch.float64), torch.full((3,), 5))


def test_guidance_scale_convention_is_linear_in_w():
    # eps~(w) = eps(null) + w (eps(c) - eps(null)): a straight line through w = 0 and w = 1.
    x = torch.randn(4, 2, dtype=torch.float64, generator=seeded(4))
    t = torch.full((4,), 250)
    at = {w: classifier_free_guidance(ORACLE, 2, w, NULL)(x, t) for w in (0.0, 1.0, 2.0, 5.0)}
    for w in (2.0, 5.0):
        assert torch.allclose(at[w], at[0.0] + w * (at[1.0] - at[0.0]), atol=1e-12)
    assert math.isfinite(float(at[5.0].abs().max()))


def test_drop_labels_replaces_each_label_by_null_with_probability_p():
    n, p = 20_000, 0.1
    labels = torch.arange(n) % 3
    dropped = drop_labels(labels, p, NULL, seeded(5))
    is_null = dropped == NULL
    assert abs(float(is_null.double().mean()) - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(dropped[~is_null], labels[~is_null])
    assert torch.equal(drop_labels(labels, 0.0, NULL, seeded(5)), labels)
    assert (drop_labels(labels, 1.0, NULL, seeded(5)) == NULL).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        drop_labels(labels, 1.5, NULL)
