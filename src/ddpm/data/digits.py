"""scikit-learn's 8x8 handwritten digits (1797 images, shipped with scikit-learn: no download)."""

from __future__ import annotations

import numpy as np
import torch

from ddpm.data.dataset import ArrayDataset
from ddpm.data.transforms import fit_to_size
from ddpm.errors import ConfigError

TEST_PER_CLASS = 30  # test split: 30 of each digit (300 images); train: the other 1497
_SPLIT_SEED = 0


def digits_split(y: np.ndarray, split: str) -> np.ndarray:
    """Indices of ``split`` ("train", "test" or "all"), in the original order.

    The test split is ``TEST_PER_CLASS`` images of each class drawn by ``np.random.RandomState(0)``
    (whose stream numpy keeps fixed across versions), so it is the same on every machine.
    """
    if split == "all":
        return np.arange(len(y))
    rs = np.random.RandomState(_SPLIT_SEED)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        test[rs.permutation(np.flatnonzero(y == c))[:TEST_PER_CLASS]] = True
    return np.flatnonzero(test if split == "test" else ~test)


def load_digits(
    *, split: str, root=None, image_size: int | None = None, **_: object
) -> ArrayDataset:
    """Digits as [N, 1, 8, 8] with pixel values v in 0..16 scaled to v / 16 * 2 - 1 (17 levels)."""
    from sklearn.datasets import load_digits as sklearn_digits  # slow import: only when used

    if root is not None:
        raise ConfigError("digits takes no data root: it ships with scikit-learn")
    images, labels = sklearn_digits(return_X_y=True)
    idx = digits_split(labels, split)
    x = torch.from_numpy(images[idx].reshape(-1, 1, 8, 8) / 16.0 * 2.0 - 1.0).float()
    if image_size is not None:
        x = fit_to_size(x, image_size, pad_background=True)
    y = torch.from_numpy(labels[idx].astype(np.int64))
    return ArrayDataset(x=x, y=y, name="digits", num_classes=10)
