"""Sample-set distances: zero for equal sets, and known values for shifted ones."""

import math

import numpy as np
import pytest
import torch

from ddpm.metrics import (
    energy_distance,
    frechet_distance,
    frechet_distance_from_features,
    inception_score,
    kernel_inception_distance,
    mmd_rbf,
    polynomial_mmd2_unbiased,
    precision_recall,
    sliced_wasserstein,
)


def test_sliced_wasserstein_of_a_set_against_itself_is_zero():
    x = torch.randn(500, 2)
    assert sliced_wasserstein(x, x) == 0.0


def test_sliced_wasserstein_of_a_shift_is_its_mean_projected_length():
    # Shifting by delta moves every 1-D projection by <theta, delta>; in 2-D E|<theta, delta>| = 2|delta|/pi.
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    delta = torch.tensor([3.0, 4.0])
    got = sliced_wasserstein(
        x, x + delta, num_projections=4000, generator=torch.Generator().manual_seed(1)
    )
    assert got == pytest.approx(5 * 2 / math.pi, rel=0.03)


def test_sliced_wasserstein_handles_sets_of_different_sizes():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3000, 2, generator=g), torch.randn(1000, 2, generator=g)
    assert sliced_wasserstein(a, b) < 0.1
    assert sliced_wasserstein(a, b * 2) > 0.3


def test_energy_distance_is_zero_for_equal_sets_and_grows_with_a_shift():
    x = torch.randn(400, 2, generator=torch.Generator().manual_seed(3))
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    assert 0 < energy_distance(x, x + 0.5) < energy_distance(x, x + 1.0)


def test_unbiased_mmd_is_near_zero_for_two_samples_of_one_distribution():
    g = torch.Generator().manual_seed(4)
    values = [
        mmd_rbf(torch.randn(300, 2, generator=g), torch.randn(300, 2, generator=g))
        for _ in range(20)
    ]
    mean = sum(values) / len(values)
    spread = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    assert abs(mean) < 3 * spread / math.sqrt(len(values))
    assert (
        mmd_rbf(torch.randn(300, 2, generator=g), torch.randn(300, 2, generator=g) + 1)
        > 10 * spread
    )


# --------------------------------------------------------------------------------------------------
# feature-space metrics: FID, KID, precision/recall, Inception Score
# --------------------------------------------------------------------------------------------------


def _gaussian(n, mean, cov, seed):
    g = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(torch.as_tensor(cov, dtype=torch.float64))
    z = torch.randn(n, len(mean), generator=g, dtype=torch.float64)
    return torch.as_tensor(mean, dtype=torch.float64) + z @ chol.T


def test_frechet_distance_of_a_set_against_itself_is_zero_and_grows_with_noise():
    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(frechet_distance_from_features(x, x)) < 1e-8
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    values = [frechet_distance_from_features(x, x + s * noise) for s in (0.05, 0.2, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False)), values
    assert values[0] > 0


def test_frechet_distance_matches_the_closed_form_for_two_gaussians():
    # For 2x2 SPD matrices, M = S1 S2 has positive eigenvalues and tr(M^{1/2}) = sqrt(tr M + 2 sqrt(det M))
    # (the eigenvalues l1, l2 of M give (sqrt l1 + sqrt l2)^2 = tr M + 2 sqrt(det M)): an independent truth.
    mu1, mu2 = np.array([0.5, -1.0]), np.array([2.0, 0.5])
    s1 = np.array([[2.0, 0.6], [0.6, 0.5]])
    s2 = np.array([[0.3, -0.2], [-0.2, 1.5]])  # does not commute with s1
    m = s1 @ s2
    tr_root = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
    expected = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_root)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # From samples: converges to the same value (FID's bias is O(D / N)).
    x, y = _gaussian(200_000, mu1, s1, 2), _gaussian(200_000, mu2, s2, 3)
    assert frechet_distance_from_features(x, y) == pytest.approx(expected, rel=0.02)


def test_frechet_distance_stays_finite_with_singular_covariances():
    # Fewer samples than dimensions (as for FID on few images): sqrtm of a singular product.
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(20, 64, generator=g), torch.randn(20, 64, generator=g) + 1.0
    d = frechet_distance_from_features(x, y)
    assert math.isfinite(d) and d > 64 * 0.5  # the mean shift alone gives |1|^2 * 64


def test_polynomial_mmd_is_unbiased_for_two_samples_of_one_distribution():
    g = torch.Generator().manual_seed(5)
    same = [
        polynomial_mmd2_unbiased(torch.randn(60, 8, generator=g), torch.randn(60, 8, generator=g))
        for _ in range(300)
    ]
    v = torch.tensor(same, dtype=torch.float64)
    se = float(v.std()) / math.sqrt(len(v))
    assert abs(float(v.mean())) < 4 * se  # unbiased: centred on the true value 0
    shifted = [
        polynomial_mmd2_unbiased(
            torch.randn(60, 8, generator=g), torch.randn(60, 8, generator=g) + 0.3
        )
        for _ in range(50)
    ]
    w = torch.tensor(shifted, dtype=torch.float64)
    assert float(w.mean()) > 10 * float(w.std()) / math.sqrt(len(w))


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(1500, 16, generator=g), torch.randn(1500, 16, generator=g)
    mean, std = kernel_inception_distance(x, y, num_subsets=50, subset_size=500, generator=g)
    assert abs(mean) < 3 * std
    mean2, std2 = kernel_inception_distance(
        x, y * 1.3, num_subsets=50, subset_size=500, generator=g
    )
    assert mean2 > 5 * std2


def test_precision_and_recall_on_constructed_sets():
    g = torch.Generator().manual_seed(7)
    real = torch.randn(600, 4, generator=g)
    assert precision_recall(real, real) == (1.0, 1.0)  # every point lies in its own ball
    far = torch.randn(600, 4, generator=g) + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    # Mode dropping: real has two far-apart clusters, fake only the first -> high precision, recall ~1/2.
    two = torch.cat([torch.randn(400, 4, generator=g), torch.randn(400, 4, generator=g) + 50.0])
    one = torch.randn(800, 4, generator=g)
    precision, recall = precision_recall(two, one)
    assert precision > 0.8
    assert 0.3 < recall <= 0.5 + 1e-9


def test_inception_score_bounds():
    c = 10
    confident_uniform = torch.eye(c).repeat(50, 1)  # one-hot, every class equally often
    assert inception_score(confident_uniform)[0] == pytest.approx(c)
    one_class = torch.eye(c)[torch.zeros(500, dtype=torch.long)]
    assert inception_score(one_class)[0] == pytest.approx(1.0)
    unsure = torch.full((500, c), 1.0 / c)
    assert inception_score(unsure)[0] == pytest.approx(1.0)
    mean, std = inception_score(confident_uniform, splits=5)
    assert mean == pytest.approx(c) and std == pytest.approx(0.0, abs=1e-9)
