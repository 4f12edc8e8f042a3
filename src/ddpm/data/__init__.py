"""Data sets as in-memory tensors: images [N, C, H, W] in [-1, 1], or 2-D points [N, 2].

Nothing is downloaded or cached: every source reads files already on the machine or generates its
data. ``load_dataset(name, ...)`` looks ``name`` up in ``DATASETS``; a new source is a function there.

Sources: ``digits`` (the default; scikit-learn's 8x8 digits), ``mnist``, ``fashion-mnist`` (installed
packages or IDX files under ``root``), ``cifar10`` (either official release under ``root``), ``folder`` (PNG / JPEG images under ``root``), ``npz`` (arrays
in the file ``root``), and the 2-D toy sets ``moons``, ``swissroll``, ``8gaussians``, ``checkerboard``
and ``gmm`` (the last two Gaussian ones carry their exact density).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ddpm.data.cifar10 import load_cifar10
from ddpm.data.dataset import ArrayDataset
from ddpm.data.digits import load_digits
from ddpm.data.folder import load_folder
from ddpm.data.mnist import mnist_loader
from ddpm.data.npz import load_npz
from ddpm.data.toy import TOY_SETS, toy_loader
from ddpm.data.transforms import random_hflip
from ddpm.errors import ConfigError

__all__ = ["DATASETS", "SPLITS", "ArrayDataset", "load_dataset", "random_hflip"]

SPLITS = ("train", "test", "all")

DATASETS: dict[str, Callable[..., ArrayDataset]] = {
    "digits": load_digits,
    "mnist": mnist_loader("mnist"),
    "fashion-mnist": mnist_loader("fashion-mnist"),
    "cifar10": load_cifar10,
    "folder": load_folder,
    "npz": load_npz,
    **{name: toy_loader(name) for name in TOY_SETS},
}


def load_dataset(
    name: str,
    *,
    split: str = "train",
    root: str | Path | None = None,
    image_size: int | None = None,
    num_points: int = 10000,
    seed: int = 0,
) -> ArrayDataset:
    """The data set ``name`` from ``DATASETS``, whole, in memory.

    ``split`` is "train", "test" or "all"; ``root`` a folder or file for the sources that read one;
    ``image_size`` resizes images to image_size x image_size; ``num_points`` and ``seed`` apply to
    the 2-D toy sets. Raises ConfigError for bad options, DataError for data that cannot be read.
    """
    if name not in DATASETS:
        raise ConfigError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
        raise ConfigError(f"num_points must be a positive integer, got {num_points!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError(f"seed must be a non-negative integer below 2^63, got {seed!r}")
    return DATASETS[name](
        split=split, root=root, image_size=image_size, num_points=num_points, seed=seed
    )
