"""A family of Gaussian mixtures with exact denoisers, for the sampler benchmark (benchmarks/samplers.py).

Each member is hard in its own way: tight, well-separated modes (std 0.02), needle-shaped anisotropic
components, overlapping full covariances, many modes (50), many dimensions (64). Low-dimensional
members with full covariances are ``ddpm.oracle.GaussianMixture``; the high-dimensional ones have
diagonal covariances (``DiagonalMixture`` below) so that their exact denoiser costs O(N K D) -- a
rotation would not change what a sampler sees (the noise is isotropic), only the cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ddpm.oracle import GaussianMixture
from ddpm.schedules import NoiseSchedule

Tensor = torch.Tensor
_F64 = torch.float64


class DiagonalMixture:
    """sum_k w_k N(mu_k, diag(var_k)) in R^D (float64): weights [K], means [K, D], variances [K, D].

    Same interface as GaussianMixture where the benchmark needs it: ``dim``, ``num_components``,
    ``sample``, ``log_prob``, ``entropy_mc``, ``denoiser``."""

    def __init__(self, weights, means, variances) -> None:
        w = torch.as_tensor(weights, dtype=_F64)
        self.weights = w / w.sum()
        self.means = torch.as_tensor(means, dtype=_F64)
        self.variances = torch.as_tensor(variances, dtype=_F64)
        if self.means.shape != self.variances.shape or self.weights.shape[0] != self.means.shape[0]:
            raise ValueError("expected weights [K], means [K, D], variances [K, D]")
        if (self.variances <= 0).any():
            raise ValueError("variances must be positive")

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def num_components(self) -> int:
        return int(self.means.shape[0])

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=_F64, generator=generator)
        return self.means[k] + self.variances[k].sqrt() * z

    def _log_joint(self, x: Tensor, means: Tensor, variances: Tensor) -> Tensor:
        """log w_k + log N(x; means_k, diag(variances_k)), [N, K], via matrix products:
        sum_d (x_d - m_kd)^2 / v_kd = x^2 @ (1/v)^T - 2 x @ (m/v)^T + sum_d m_kd^2 / v_kd."""
        inv = 1 / variances
        maha = (x * x) @ inv.T - 2 * x @ (means * inv).T + (means * means * inv).sum(1)
        log_det = torch.log(variances).sum(1)
        return torch.log(self.weights) - 0.5 * (self.dim * math.log(2 * math.pi) + log_det + maha)

    def log_prob(self, x: Tensor) -> Tensor:
        x = x.to(_F64).reshape(x.shape[0], -1)
        return torch.logsumexp(self._log_joint(x, self.means, self.variances), dim=1)

    def entropy_mc(self, n: int = 200_000, generator: torch.Generator | None = None):
        lp = self.log_prob(self.sample(n, generator))
        return float(-lp.mean()), float(lp.std() / math.sqrt(n))

    def denoiser(self, schedule: NoiseSchedule):
        """The exact ``model(x_t, t) -> E[eps | x_t]``: with C_k = a^2 var_k + sigma^2 (diagonal),
        E[eps | x_t] = sigma sum_k r_k(x_t) (x_t - a mu_k) / C_k, r_k the posterior of component k."""

        def model(x_t: Tensor, t: Tensor) -> Tensor:
            x = x_t.to(_F64).reshape(x_t.shape[0], -1)
            index = torch.searchsorted(schedule.timesteps, torch.as_tensor(t).reshape(-1).cpu())
            out = torch.empty_like(x)
            for i in torch.unique(index).tolist():  # a sampler's batch shares one t
                rows = (index == i).nonzero().flatten() if index.numel() > 1 else slice(None)
                ab = schedule.alpha_bar[i].item()
                a, sigma = math.sqrt(ab), math.sqrt(1 - ab)
                c = ab * self.variances + (1 - ab)
                r = torch.softmax(self._log_joint(x[rows], a * self.means, c), dim=1)
                out[rows] = sigma * (x[rows] * (r @ (1 / c)) - a * (r @ (self.means / c)))
            return out.reshape(x_t.shape).to(x_t.dtype)

        return model


class ExactSlicedW:
    """Sliced Wasserstein-1 from a sample to the mixture itself, with no reference sample.

    Projected on a unit direction theta, a Gaussian mixture is the 1-D mixture
    sum_k w_k N(theta . mu_k, theta^T Sigma_k theta), whose CDF F is a sum of erf terms. For a sample
    of n points, W_1 = int_0^1 |Q_n(u) - F^{-1}(u)| du is taken on the n midpoints u_i = (i + 1/2) / n,
    where Q_n(u_i) is the i-th sorted projection; F^{-1} is interpolated from F on a dense grid (361
    points per component, +-9 std; error < 1e-3 of the narrowest std). A reference *sample* of size M
    adds its own noise (~ M^-1/2) to every cell; this estimator has only the sample's own."""

    def __init__(self, mixture, num_projections: int = 256, seed: int = 99) -> None:
        g = torch.Generator().manual_seed(seed)
        theta = torch.randn(mixture.dim, num_projections, dtype=_F64, generator=g)
        self.theta = theta / theta.norm(dim=0, keepdim=True)
        mean = (mixture.means @ self.theta).T  # [P, K]
        if isinstance(mixture, DiagonalMixture):
            var = (self.theta**2).T @ mixture.variances.T
        else:
            var = torch.einsum("dp,kde,ep->pk", self.theta, mixture.covs, self.theta)
        std = var.sqrt()
        z = torch.linspace(-9.0, 9.0, 361, dtype=_F64)
        points = (mean[:, :, None] + std[:, :, None] * z).flatten(1).sort(dim=1).values
        cdf = torch.zeros_like(points)
        for k in range(mean.shape[1]):  # one component at a time: [P, K * 361] stays small
            u = (points - mean[:, k : k + 1]) / (std[:, k : k + 1] * math.sqrt(2))
            cdf += mixture.weights[k] * 0.5 * (1 + torch.erf(u))
        self._points, self._cdf = points, cdf
        self._quantiles: dict[int, Tensor] = {}

    def quantiles(self, n: int) -> Tensor:
        """F^{-1}((i + 1/2) / n) for every projection, [n, P] (cached per n)."""
        if n not in self._quantiles:
            u = (torch.arange(n, dtype=_F64) + 0.5) / n
            rows = []
            for cdf, points in zip(self._cdf, self._points, strict=True):
                i = torch.searchsorted(cdf, u).clamp(1, len(cdf) - 1)
                lo, hi = cdf[i - 1], cdf[i]
                frac = (u - lo) / (hi - lo).clamp_min(1e-300)
                rows.append(points[i - 1] + frac * (points[i] - points[i - 1]))
            self._quantiles[n] = torch.stack(rows, 1)
        return self._quantiles[n]

    def __call__(self, x: Tensor) -> float:
        projected = (x.to(_F64).flatten(1) @ self.theta).sort(dim=0).values
        return float((projected - self.quantiles(len(projected))).abs().mean())


@dataclass(frozen=True)
class Member:
    name: str
    what: str
    mixture: GaussianMixture | DiagonalMixture


def _rotation(d: int, g: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, dtype=_F64, generator=g))
    return q * torch.sign(torch.diagonal(r))


def family() -> list[Member]:
    """The benchmark's mixtures (fixed seeds): from easy to the hard cases that decide."""
    g = torch.Generator().manual_seed(2026)
    members = [
        Member(
            "2d-3",
            "2-D, 3 modes, full covariances (the earlier benchmark's mixture)",
            GaussianMixture(
                [0.2, 0.5, 0.3],
                [[-2.0, 0.0], [1.5, 1.0], [0.5, -2.0]],
                [[[0.3, 0.1], [0.1, 0.2]], [[0.15, 0.0], [0.0, 0.4]], [[0.05, 0.0], [0.0, 0.05]]],
            ),
        )
    ]
    # 8 tight, well-separated modes on the unit circle, std 0.02, unequal weights.
    angles = torch.arange(8, dtype=_F64) * (2 * math.pi / 8)
    members.append(
        Member(
            "2d-8-tight",
            "2-D, 8 separated modes on a circle, isotropic std 0.02",
            GaussianMixture.isotropic(
                torch.linspace(1.0, 2.0, 8), torch.stack([angles.cos(), angles.sin()], 1), 0.02
            ),
        )
    )
    # 6 overlapping needles: std 0.6 along a random direction, 0.02 across.
    covs = []
    for _ in range(6):
        q = _rotation(2, g)
        covs.append(q @ torch.diag(torch.tensor([0.6**2, 0.02**2], dtype=_F64)) @ q.T)
    members.append(
        Member(
            "2d-6-needles",
            "2-D, 6 overlapping needles, std 0.6 x 0.02 (anisotropy 30)",
            GaussianMixture(
                torch.ones(6), 0.5 * torch.randn(6, 2, dtype=_F64, generator=g), torch.stack(covs)
            ),
        )
    )
    # 8-D, 10 overlapping components, full covariances with stds log-uniform in [0.05, 1].
    covs = []
    for _ in range(10):
        q = _rotation(8, g)
        std = torch.exp(torch.empty(8, dtype=_F64).uniform_(math.log(0.05), 0.0, generator=g))
        covs.append(q @ torch.diag(std**2) @ q.T)
    members.append(
        Member(
            "8d-10-overlap",
            "8-D, 10 overlapping modes, full covariances, stds 0.05-1",
            GaussianMixture(
                torch.rand(10, dtype=_F64, generator=g) + 0.5,
                0.5 * torch.randn(10, 8, dtype=_F64, generator=g),
                torch.stack(covs),
            ),
        )
    )
    # 16-D, 50 tight, separated modes (std 0.05).
    members.append(
        Member(
            "16d-50-tight",
            "16-D, 50 separated modes, isotropic std 0.05",
            DiagonalMixture(
                torch.rand(50, dtype=_F64, generator=g) + 0.5,
                0.3 * torch.randn(50, 16, dtype=_F64, generator=g),
                torch.full((50, 16), 0.05**2, dtype=_F64),
            ),
        )
    )
    # 64-D, 50 modes, axis stds log-uniform in [0.02, 1]: anisotropy up to 50, overlapping in
    # the wide directions, separated in the narrow ones.
    std = torch.exp(torch.empty(50, 64, dtype=_F64).uniform_(math.log(0.02), 0.0, generator=g))
    members.append(
        Member(
            "64d-50-aniso",
            "64-D, 50 modes, diagonal stds 0.02-1 (anisotropy up to 50)",
            DiagonalMixture(
                torch.rand(50, dtype=_F64, generator=g) + 0.5,
                0.3 * torch.randn(50, 64, dtype=_F64, generator=g),
                std**2,
            ),
        )
    )
    return members


def full_covariance_denoiser(mixture: GaussianMixture, schedule: NoiseSchedule):
    """``mixture.denoiser(schedule)`` computed once per distinct t: C_k^{-1} is [K, D, D] for the
    whole batch instead of [N, K, D, D] (same formula as ddpm.oracle, ~5x faster for D = 8)."""

    def model(x_t: Tensor, t: Tensor) -> Tensor:
        x = x_t.to(_F64).reshape(x_t.shape[0], -1)
        index = torch.searchsorted(schedule.timesteps, torch.as_tensor(t).reshape(-1).cpu())
        out = torch.empty_like(x)
        eye = torch.eye(mixture.dim, dtype=_F64)
        for i in torch.unique(index).tolist():
            rows = (index == i).nonzero().flatten() if index.numel() > 1 else slice(None)
            ab = schedule.alpha_bar[i].item()
            a, sigma = math.sqrt(ab), math.sqrt(1 - ab)
            chol = torch.linalg.cholesky(ab * mixture.covs + (1 - ab) * eye)  # [K, D, D]
            precision = torch.cholesky_inverse(chol)
            diff = x[rows][:, None, :] - a * mixture.means  # [n, K, D]
            solved = torch.einsum("kij,nkj->nki", precision, diff)
            log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
            log_r = torch.log(mixture.weights) - 0.5 * (log_det + (diff * solved).sum(-1))
            out[rows] = sigma * (torch.softmax(log_r, dim=1)[:, :, None] * solved).sum(1)
        return out.reshape(x_t.shape).to(x_t.dtype)

    return model


def exact_denoiser(mixture: GaussianMixture | DiagonalMixture, schedule: NoiseSchedule):
    """The fastest exact E[eps | x_t] for a member's mixture."""
    if isinstance(mixture, DiagonalMixture):
        return mixture.denoiser(schedule)
    return full_covariance_denoiser(mixture, schedule)


def exact_v_denoiser(mixture: GaussianMixture | DiagonalMixture, schedule: NoiseSchedule):
    """The exact v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (E[v | x_t]), for chains whose last
    alpha_bar is 0 (zero terminal SNR), where eps-prediction cannot give x_0: there E[x_0 | x_T] is the
    data mean; elsewhere x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)."""
    eps_model = exact_denoiser(mixture, schedule)
    data_mean = (mixture.weights[:, None] * mixture.means).sum(0)

    def model(x_t: Tensor, t: Tensor) -> Tensor:
        index = torch.searchsorted(schedule.timesteps, t.reshape(-1).contiguous())
        a = schedule.sqrt_alpha_bar[index].to(x_t.dtype)[:, None]
        s = schedule.sqrt_one_minus_alpha_bar[index].to(x_t.dtype)[:, None]
        eps = eps_model(x_t, t)
        x0 = torch.where(a > 0, (x_t - s * eps) / a.clamp_min(1e-300), data_mean.to(x_t.dtype))
        return a * eps - s * x0

    return model


def check_denoiser(mixture: GaussianMixture | DiagonalMixture, schedule: NoiseSchedule) -> float:
    """max |exact_denoiser - ddpm.oracle's denoiser| on 16 points at 16 timesteps (a diagonal mixture
    as a full-covariance GaussianMixture); raises if it exceeds 1e-9."""
    g = torch.Generator().manual_seed(0)
    reference = mixture
    if isinstance(mixture, DiagonalMixture):
        reference = GaussianMixture(
            mixture.weights, mixture.means, torch.diag_embed(mixture.variances)
        )
    x = 1.5 * mixture.sample(16, g)
    t = torch.randint(0, schedule.num_timesteps, (16,), generator=g)
    diff = float(
        (exact_denoiser(mixture, schedule)(x, t) - reference.denoiser(schedule)(x, t)).abs().max()
    )
    if diff > 1e-9:
        raise RuntimeError(f"the fast exact denoiser differs from ddpm.oracle's by {diff:.3g}")
    return diff
