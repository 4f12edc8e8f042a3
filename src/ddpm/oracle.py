"""The exact denoiser for Gaussian-mixture data: a "perfectly trained network" with no training.

If x_0 ~ sum_k w_k N(mu_k, S_k), then x_t = a x_0 + sigma eps (a = sqrt(alpha_bar_t),
sigma = sqrt(1 - alpha_bar_t)) is again a mixture, sum_k w_k N(a mu_k, C_k) with C_k = a^2 S_k + sigma^2 I,
and because Cov(eps, x_t | k) = sigma I the optimal eps-prediction has the closed form

    E[eps | x_t] = sum_k r_k(x_t) sigma C_k^{-1} (x_t - a mu_k),   r_k = posterior probability of k.

The labelled form (component k = class k, Ho & Salimans' classifier-free setting) has the exact
*conditional* denoiser too: given class k, x_0 ~ N(mu_k, S_k) alone and r is one-hot at k,

    E[eps | x_t, k] = sigma C_k^{-1} (x_t - a mu_k).

It is written for low-dimensional data (full covariances, D up to a few dozen). Every result follows
the device of its input; the mixture's own tensors stay on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ddpm.schedules import NoiseSchedule

Tensor = torch.Tensor
_F64 = torch.float64


class LabelledSample(NamedTuple):
    """Draws x [n, D] (float64) and the component each came from, labels [n] (int64)."""

    x: Tensor
    labels: Tensor


class GaussianMixture:
    """sum_k weights[k] N(means[k], covs[k]) in R^D, held in float64.

    weights [K] (normalised here), means [K, D], covs [K, D, D] symmetric positive definite.
    """

    def __init__(self, weights: Sequence[float] | Tensor, means, covs) -> None:
        w = torch.as_tensor(weights, dtype=_F64).flatten()
        mu = torch.as_tensor(means, dtype=_F64)
        cov = torch.as_tensor(covs, dtype=_F64)
        if (
            mu.ndim != 2
            or cov.shape != (mu.shape[0], mu.shape[1], mu.shape[1])
            or w.shape[0] != mu.shape[0]
        ):
            raise ValueError(
                f"expected weights [K], means [K, D], covs [K, D, D]; got {tuple(w.shape)}, "
                f"{tuple(mu.shape)}, {tuple(cov.shape)}"
            )
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError("mixture weights must be non-negative and not all zero")
        self.weights = w / w.sum()
        self.means = mu
        self.covs = 0.5 * (cov + cov.transpose(-1, -2))
        self._chol = torch.linalg.cholesky(
            self.covs
        )  # raises if a covariance is not positive definite

    @classmethod
    def isotropic(cls, weights, means, std: float) -> GaussianMixture:
        """A mixture whose components all have covariance std^2 I."""
        mu = torch.as_tensor(means, dtype=_F64)
        eye = torch.eye(mu.shape[1], dtype=_F64)
        return cls(weights, mu, (std**2 * eye).expand(mu.shape[0], -1, -1).clone())

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def num_components(self) -> int:
        return int(self.means.shape[0])

    def mean(self) -> Tensor:
        """E[x] = sum_k w_k mu_k."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Cov[x] = sum_k w_k (S_k + mu_k mu_k^T) - E[x] E[x]^T."""
        m = self.mean()
        second = torch.einsum(
            "k,kij->ij", self.weights, self.covs + self.means[:, :, None] * self.means[:, None, :]
        )
        return second - torch.outer(m, m)

    @property
    def null_label(self) -> int:
        """The "null" class label, K: it asks the conditional denoiser for the whole mixture's."""
        return self.num_components

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws [n, D] (float64), with their components chosen by the weights."""
        return self.sample_labelled(n, generator).x

    def sample_labelled(
        self, n: int, generator: torch.Generator | None = None, labels: Tensor | None = None
    ) -> LabelledSample:
        """n draws with their components (= class labels): the components chosen by the weights, or
        the given ``labels`` [n] (then x_i ~ N(mu_{labels_i}, S_{labels_i}), the class-conditional
        data). Without labels it draws the same numbers as :meth:`sample`."""
        if labels is None:
            k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        else:
            k = self._checked_labels(labels, n, allow_null=False).cpu()
        z = torch.randn(n, self.dim, dtype=_F64, generator=generator)
        return LabelledSample(self.means[k] + torch.einsum("nij,nj->ni", self._chol[k], z), k)

    def component(self, k: int) -> GaussianMixture:
        """Component k alone, N(mu_k, S_k): the data of class k."""
        if not 0 <= k < self.num_components:
            raise ValueError(f"component must lie in [0, {self.num_components - 1}], got {k}")
        return GaussianMixture([1.0], self.means[k : k + 1], self.covs[k : k + 1])

    def _checked_labels(self, labels, n: int, *, allow_null: bool) -> Tensor:
        labels = torch.as_tensor(labels)
        if labels.ndim == 0:
            labels = labels.expand(n)
        top = self.num_components if allow_null else self.num_components - 1
        if labels.shape != (n,) or labels.is_floating_point():
            raise ValueError(
                f"class labels must be integers of shape [{n}] (or one), got {tuple(labels.shape)}"
            )
        if n and (labels.min() < 0 or labels.max() > top):
            raise ValueError(
                f"class labels must lie in [0, {top}]"
                + (f" ({top} = null)" if allow_null else "")
                + f", got [{int(labels.min())}, {int(labels.max())}]"
            )
        return labels.long()

    def component_log_prob(self, x: Tensor) -> Tensor:
        """log w_k + log N(x; mu_k, S_k) for every k: [N, K]."""
        return _component_log_prob(x.to(_F64), self.weights, self.means, self._chol)

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) = logsumexp_k (log w_k + log N(x; mu_k, S_k)), [N], float64."""
        return torch.logsumexp(self.component_log_prob(x), dim=1)

    def marginal(self, alpha_bar: float) -> GaussianMixture:
        """q(x_t) for x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps: means a mu_k, covs a^2 S_k + (1 - alpha_bar) I."""
        eye = torch.eye(self.dim, dtype=_F64)
        return GaussianMixture(
            self.weights,
            math.sqrt(alpha_bar) * self.means,
            alpha_bar * self.covs + (1 - alpha_bar) * eye,
        )

    def entropy_mc(
        self, n: int = 200_000, generator: torch.Generator | None = None
    ) -> tuple[float, float]:
        """Monte-Carlo differential entropy H = -E[log p(x)] in nats, with its standard error."""
        lp = self.log_prob(self.sample(n, generator))
        return float(-lp.mean()), float(lp.std() / math.sqrt(n))

    def denoiser(self, schedule: NoiseSchedule) -> OracleDenoiser:
        """The exact eps-predictor ``model(x_t, t, class_labels=None) -> E[eps | x_t (, k)]`` for data
        from this mixture, where t is the *original* timestep of ``schedule`` (0-based), as networks are
        called; labels k < K give component k's own denoiser, K (``null_label``) or None the mixture's."""
        return OracleDenoiser(self, schedule)


def _component_log_prob(x: Tensor, weights: Tensor, means: Tensor, chol: Tensor) -> Tensor:
    # Batched over x: [N, D]; means [K, D] or [N, K, D]; chol [K, D, D] or [N, K, D, D].
    diff = x[:, None, :] - means  # [N, K, D]
    chol = chol.expand(diff.shape[0], *chol.shape[-3:]) if chol.ndim == 3 else chol
    sol = torch.linalg.solve_triangular(chol, diff.unsqueeze(-1), upper=False).squeeze(-1)
    maha = (sol**2).sum(-1)
    log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    d = x.shape[1]
    return torch.log(weights) - 0.5 * (d * math.log(2 * math.pi) + log_det + maha)


class OracleDenoiser:
    """``model(x_t, t, class_labels=None) -> E[eps | x_t]`` (or E[eps | x_t, k]) for a Gaussian
    mixture; behaves like a trained eps-network, class-conditional with null label K."""

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule) -> None:
        self.mixture = mixture
        self.schedule = schedule
        self._tensors: dict[torch.device, tuple[Tensor, ...]] = {}

    @property
    def null_label(self) -> int:
        return self.mixture.null_label

    def _on(self, device: torch.device) -> tuple[Tensor, ...]:
        # The mixture and schedule live on the CPU; index them on the input's device (searchsorted
        # and gathers refuse a CUDA index into a CPU tensor). Copied once per device.
        if device not in self._tensors:
            gm, s = self.mixture, self.schedule
            self._tensors[device] = tuple(
                v.to(device)
                for v in (
                    s.timesteps,
                    s.alpha_bar,
                    s.sqrt_alpha_bar,
                    s.sqrt_one_minus_alpha_bar,
                    gm.weights,
                    gm.means,
                    gm.covs,
                )
            )
        return self._tensors[device]

    def __call__(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        gm = self.mixture
        device = x_t.device
        timesteps, alpha_bar_all, sqrt_ab, sqrt_1m_ab, weights, means, covs = self._on(device)
        x = x_t.to(_F64).reshape(x_t.shape[0], -1)
        t = torch.as_tensor(t, dtype=torch.long, device=device).reshape(-1).expand(x.shape[0])
        t = t.contiguous()  # searchsorted copies (and warns about) an expanded tensor
        # The network sees original timesteps; look them up in the original (un-respaced) chain.
        index = torch.searchsorted(timesteps, t)
        # A batch usually holds a few distinct t: factor C_k once per distinct t, not per sample.
        uniq, inverse = torch.unique(index, return_inverse=True)
        alpha_bar = alpha_bar_all[uniq][:, None, None, None]  # [U, 1, 1, 1]
        eye = torch.eye(gm.dim, dtype=_F64, device=device)
        cov_t = alpha_bar * covs + (1 - alpha_bar) * eye  # [U, K, D, D]
        chol = torch.linalg.cholesky(cov_t)
        precision = torch.cholesky_inverse(chol)[inverse]  # [N, K, D, D]
        log_det = (2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1))[inverse]  # [N, K]
        a = sqrt_ab[index][:, None, None]  # [N, 1, 1]
        diff = x[:, None, :] - a * means  # [N, K, D]
        solved = torch.einsum("nkij,nkj->nki", precision, diff)  # C_k^{-1} (x_t - a mu_k)
        maha = (diff * solved).sum(-1)
        log_r = torch.log(weights) - 0.5 * (log_det + maha)  # the shared 2 pi term cancels
        r = torch.softmax(log_r, dim=1)  # [N, K]
        if class_labels is not None:
            # Given class k the data are component k alone: its posterior probability is one-hot.
            labels = gm._checked_labels(class_labels, x.shape[0], allow_null=True).to(device)
            cond = labels < gm.num_components
            one_hot = torch.nn.functional.one_hot(
                labels.clamp(max=gm.num_components - 1), gm.num_components
            ).to(_F64)
            r = torch.where(cond[:, None], one_hot, r)
        sigma = sqrt_1m_ab[index][:, None]  # [N, 1]
        eps = sigma * (r[:, :, None] * solved).sum(1)
        return eps.reshape(x_t.shape).to(x_t.dtype)
