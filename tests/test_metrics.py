"""Sample-set distances: zero for equal sets, and known values for shifted ones."""

import math

import pytest
import torch

from ddpm.metrics import energy_distance, mmd_rbf, sliced_wasserstein


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
