"""Distances between sample sets, for low-dimensional data (2-D toy sets) and feature vectors.

Each takes two tensors [N, D] and [M, D] and returns a float; none knows about networks or training.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def sliced_wasserstein(
    x: Tensor, y: Tensor, *, num_projections: int = 256, generator: torch.Generator | None = None
) -> float:
    """SW_1(x, y) = E_theta W_1(<theta, x>, <theta, y>), theta uniform on the unit sphere, estimated
    with ``num_projections`` directions. The 1-D W_1 between the projected empirical distributions is
    computed exactly from their quantile functions on a common grid (so N need not equal M)."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    theta = torch.randn(x.shape[1], num_projections, dtype=torch.float64, generator=generator)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, py = (x @ theta).sort(dim=0).values, (y @ theta).sort(dim=0).values
    n = max(len(px), len(py))
    levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    qx = px[(levels * len(px)).long().clamp(max=len(px) - 1)]
    qy = py[(levels * len(py)).long().clamp(max=len(py) - 1)]
    return float((qx - qy).abs().mean())


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo), V-statistic; >= 0, and 0
    only when the two distributions are equal."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def mmd_rbf(x: Tensor, y: Tensor, *, bandwidth: float | None = None) -> float:
    """Unbiased squared MMD with a Gaussian kernel exp(-|a - b|^2 / (2 h^2)); h defaults to the median
    pairwise distance of the pooled sample."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    if bandwidth is None:
        pooled = torch.cat([x, y])[:2000]
        bandwidth = float(torch.cdist(pooled, pooled).median()) or 1.0
    gamma = 1 / (2 * bandwidth**2)
    kxx, kyy, kxy = (
        torch.exp(-gamma * torch.cdist(a, b) ** 2) for a, b in ((x, x), (y, y), (x, y))
    )
    n, m = len(x), len(y)
    return float(
        (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        - 2 * kxy.mean()
    )


def nats_to_bits(value: float) -> float:
    """Convert nats to bits."""
    return value / math.log(2)
