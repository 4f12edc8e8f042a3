"""Distances between sample sets, for low-dimensional data (2-D toy sets) and feature vectors.

Each takes two tensors [N, D] and [M, D] (points, or features from some extractor) and returns floats;
none knows about networks, data sets or training.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
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


# --------------------------------------------------------------------------------------------------
# feature-space metrics for images: FID, KID, precision/recall, Inception Score
# Each takes feature vectors (or class probabilities) already computed by some extractor.
# --------------------------------------------------------------------------------------------------


def feature_statistics(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma): the mean [D] and the unbiased covariance [D, D] of features [N, D], float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, FID):

        d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2})

    The matrix square root is scipy.linalg.sqrtm, handled as pytorch-fid does: if it is not finite,
    eps I is added to both covariances; a complex result from rounding is replaced by its real part.
    If the imaginary part is not negligible (e.g. singular covariances from fewer samples than
    dimensions), tr((sigma1 sigma2)^{1/2}) is computed instead as the sum of the square roots of the
    eigenvalues of the symmetric PSD matrix sigma1^{1/2} sigma2 sigma1^{1/2}, which has the same
    trace."""
    import scipy.linalg

    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # "matrix is singular": the result is checked below
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(sigma1)) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            tr_covmean = float(np.trace(covmean.real))
        else:
            root1 = _psd_sqrt(sigma1)
            eig = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
            tr_covmean = float(np.sqrt(np.clip(eig, 0, None)).sum())
    else:
        tr_covmean = float(np.trace(covmean))
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance_from_features(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> float:
    """``frechet_distance`` between the Gaussians fitted to two feature sets [N, D] and [M, D]."""
    return frechet_distance(*feature_statistics(x), *feature_statistics(y))


def polynomial_mmd2_unbiased(x: Tensor, y: Tensor) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel k(a, b) = (<a, b> / D + 1)^3 of KID:
    mean over i != j of k(x_i, x_j) + the same for y - 2 mean over all i, j of k(x_i, y_j)."""
    x, y = _as_double(x), _as_double(y)
    d = x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError("the unbiased MMD needs at least two samples in each set")
    return float(
        (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        - 2 * kxy.mean()
    )


def kernel_inception_distance(
    x: Tensor,
    y: Tensor,
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): the unbiased polynomial-kernel MMD^2 on ``num_subsets`` random
    subsets of ``min(subset_size, N, M)`` features drawn without replacement from each set, as in
    their reference code. Returns (mean, standard deviation over the subsets; NaN when a subset is
    the whole of both sets). The mean is an unbiased estimate of the population MMD^2 (so it can be
    slightly negative)."""
    x, y = _as_double(x), _as_double(y)
    m = min(subset_size, len(x), len(y))
    values = []
    for _ in range(num_subsets):
        ix = torch.randperm(len(x), generator=generator)[:m]
        iy = torch.randperm(len(y), generator=generator)[:m]
        values.append(polynomial_mmd2_unbiased(x[ix], y[iy]))
    v = torch.tensor(values, dtype=torch.float64)
    # When a subset is a whole set, every subset is the same pair of sets: no spread to report.
    whole = m == len(x) and m == len(y)
    return float(v.mean()), float(v.std()) if len(v) > 1 and not whole else float("nan")


def precision_recall(
    real: Tensor, fake: Tensor, *, k: int = 3, batch_size: int = 2048
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019). Each set's manifold is the union of
    balls around its points with radius the distance to the point's k-th nearest neighbour (itself
    excluded). precision = fraction of fake points inside the real manifold; recall = fraction of
    real points inside the fake manifold."""
    real, fake = _as_double(real), _as_double(fake)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points in each set")
    return (
        _manifold_coverage(real, fake, k, batch_size),
        _manifold_coverage(fake, real, k, batch_size),
    )


def _kth_neighbour_radii(x: Tensor, k: int, batch_size: int) -> Tensor:
    radii = []
    for chunk in x.split(batch_size):
        # k + 1 smallest: the point itself (distance 0) comes first.
        radii.append(torch.cdist(chunk, x).kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _manifold_coverage(support: Tensor, queries: Tensor, k: int, batch_size: int) -> float:
    radii = _kth_neighbour_radii(support, k, batch_size)
    inside = []
    for chunk in queries.split(batch_size):
        inside.append((torch.cdist(chunk, support) <= radii[None, :]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def inception_score(probs: Tensor, *, splits: int = 1) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016) of class probabilities p(y|x) [N, C], computed with any
    classifier (here usually the domain classifier): exp(E_x KL(p(y|x) || p(y))), p(y) the mean of
    p(y|x) over the split. Returns (mean, std) over ``splits`` equal parts (std NaN for one split).
    It lies in [1, C]: C for confident predictions spread evenly over the classes."""
    p = _as_double(probs)
    scores = []
    for part in p.chunk(splits):
        marginal = part.mean(dim=0, keepdim=True)
        kl = (part * (torch.log(part.clamp_min(1e-30)) - torch.log(marginal.clamp_min(1e-30)))).sum(
            1
        )
        scores.append(math.exp(float(kl.mean())))
    v = torch.tensor(scores, dtype=torch.float64)
    return float(v.mean()), float(v.std()) if len(v) > 1 else float("nan")


def _as_double(x: Tensor | np.ndarray) -> Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).double().flatten(1)
