"""2-D toy distributions, each drawn deterministically from ``num_points`` and ``seed``.

Every set is centred and scaled so that each coordinate has roughly unit standard deviation: moons and
swissroll by fixed constants measured on 2 million points (one scale for both axes, so the shape is
kept); checkerboard exactly (uniform marginals on [-2, 2] divided by their std 2 / sqrt(3)); the
Gaussian mixtures exactly, through their parameters. ``8gaussians`` and ``gmm`` are drawn from their
``GaussianMixture``, returned as ``density``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ddpm.data.dataset import ArrayDataset
from ddpm.errors import ConfigError

Draw = tuple[torch.Tensor, torch.Tensor | None, object | None]  # (x [N, 2], y or None, density)


def _moons(n: int, seed: int) -> Draw:
    from sklearn.datasets import make_moons

    x, y = make_moons(n, noise=0.05, random_state=np.random.RandomState(seed))
    x = (x - [0.5, 0.25]) / 0.707  # measured: mean (0.5, 0.25), per-axis std (0.867, 0.497)
    return torch.from_numpy(x).float(), torch.from_numpy(y.astype(np.int64)), None


def _swissroll(n: int, seed: int) -> Draw:
    from sklearn.datasets import make_swiss_roll

    x, _ = make_swiss_roll(n, noise=0.5, random_state=np.random.RandomState(seed))
    x = (x[:, [0, 2]] - [2.0, 0.2]) / 6.81  # the (x, z) plane; measured per-axis std (6.64, 6.97)
    return torch.from_numpy(x).float(), None, None


def _checkerboard(n: int, seed: int) -> Draw:
    g = torch.Generator().manual_seed(seed)
    x1 = torch.rand(n, generator=g, dtype=torch.float64) * 4 - 2
    # x2 in [-2, -1) or [0, 1), shifted up by one in every other column: a 4x4 board of 8 squares.
    x2 = torch.rand(n, generator=g, dtype=torch.float64)
    x2 = x2 - 2 * torch.randint(0, 2, (n,), generator=g) + torch.floor(x1).remainder(2)
    x = torch.stack([x1, x2], dim=1) * (math.sqrt(3) / 2)
    return x.float(), None, None


EIGHT_GAUSSIANS_STD = 0.15


def eight_gaussians():
    """Equal weights, means on a circle at angles k pi / 4, covariance s^2 I with s = 0.15.

    Per-coordinate variance is r^2 / 2 + s^2 (the mean of cos^2 over the 8 angles is 1/2), so the
    radius r = sqrt(2 (1 - s^2)) makes the covariance exactly I.
    """
    from ddpm.oracle import GaussianMixture

    s = EIGHT_GAUSSIANS_STD
    angle = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    means = math.sqrt(2 * (1 - s**2)) * torch.stack([angle.cos(), angle.sin()], dim=1)
    return GaussianMixture.isotropic(torch.full((8,), 1 / 8, dtype=torch.float64), means, s)


def small_gmm():
    """Three components with unequal weights (0.5, 0.3, 0.2) and full covariances, shifted and scaled
    (one scale for both axes) to mean 0 and a covariance of trace 2."""
    from ddpm.oracle import GaussianMixture

    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    means = torch.tensor([[-1.0, -0.5], [1.5, 0.5], [0.0, 2.0]], dtype=torch.float64)
    covs = torch.tensor(
        [[[0.30, 0.15], [0.15, 0.20]], [[0.10, -0.06], [-0.06, 0.25]], [[0.05, 0.0], [0.0, 0.40]]],
        dtype=torch.float64,
    )
    gm = GaussianMixture(weights, means, covs)
    scale = math.sqrt(float(torch.trace(gm.covariance())) / 2)
    return GaussianMixture(weights, (means - gm.mean()) / scale, covs / scale**2)


def _from_mixture(build: Callable[[], object]) -> Callable[[int, int], Draw]:
    def draw(n: int, seed: int) -> Draw:
        density = build()
        x = density.sample(n, generator=torch.Generator().manual_seed(seed))
        return x.float(), None, density

    return draw


TOY_SETS: dict[str, Callable[[int, int], Draw]] = {
    "moons": _moons,
    "swissroll": _swissroll,
    "8gaussians": _from_mixture(eight_gaussians),
    "checkerboard": _checkerboard,
    "gmm": _from_mixture(small_gmm),
}


# "train" and "all" are one draw; "test" is an independent draw from another stream of the same seed.
_SPLIT_STREAM = {"train": 0, "all": 0, "test": 1}


def load_toy(
    name: str, *, split: str, root=None, image_size=None, num_points: int, seed: int, **_: object
) -> ArrayDataset:
    """``num_points`` points [N, 2] of the toy set ``name``, float32."""
    if root is not None or image_size is not None:
        raise ConfigError(f"{name} is generated 2-D data: it takes no data root and no image size")
    stream = int(np.random.SeedSequence([seed, _SPLIT_STREAM[split]]).generate_state(1)[0])
    x, y, density = TOY_SETS[name](num_points, stream)
    return ArrayDataset(x=x, y=y, name=name, num_classes=None if y is None else 2, density=density)


def toy_loader(name: str) -> Callable[..., ArrayDataset]:
    """The registry entry for ``name``."""

    def load(**kwargs) -> ArrayDataset:
        return load_toy(name, **kwargs)

    load.__doc__ = load_toy.__doc__
    return load
