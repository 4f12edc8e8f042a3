"""Images from a NumPy ``.npz`` file: array ``x`` (else the first array) and optional labels ``y``.

Layouts: [N, H, W] (gray), [N, C, H, W] if C (axis 1) is 1 or 3, else [N, H, W, C] with C 1 or 3.
Values: integers must be 8-bit values 0..255 and map to k / 255 * 2 - 1. Floats with a negative value
are taken to be in [-1, 1] already; floats that are all >= 0 are taken to be in [0, 1] and map to
2 x - 1. Anything outside those ranges, NaN or inf is an error. The file is loaded with
``allow_pickle=False``, so it cannot run code.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from ddpm.data.dataset import ArrayDataset
from ddpm.data.transforms import bytes_to_unit, fit_to_size
from ddpm.errors import ConfigError, DataError


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(x, y or None) from an .npz (or a bare .npy holding x)."""
    if not path.is_file():
        raise DataError(f"npz file {path} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        with np.load(path, allow_pickle=False) as data:
            if isinstance(data, np.ndarray):
                return data, None
            if not data.files:
                raise DataError(f"{path} holds no arrays")
            key = "x" if "x" in data.files else data.files[0]
            y = data["y"] if "y" in data.files and key != "y" else None
            return data[key], y
    except DataError:
        raise
    except ValueError as e:
        if "pickle" not in str(e):
            raise DataError(f"cannot read {path} as .npz: {e}") from e
        # numpy's own message suggests allow_pickle=True: unpickling can run code, so say why not
        raise DataError(
            f"cannot read {path} as .npz: not plain arrays (reading it would need unpickling, "
            "which can run code; ddpm never unpickles)"
        ) from e
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read {path} as .npz: {e}") from e


def to_nchw(x: np.ndarray, path: Path) -> np.ndarray:
    """[N, H, W] / [N, C, H, W] / [N, H, W, C] to [N, C, H, W] (see the module docstring)."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return x
    if x.ndim == 4 and x.shape[3] in (1, 3):
        return x.transpose(0, 3, 1, 2)
    raise DataError(
        f"{path}: expected images [N, H, W], [N, C, H, W] or [N, H, W, C] with 1 or 3 channels, "
        f"got shape {x.shape}"
    )


def to_unit_range(x: np.ndarray, path: Path) -> torch.Tensor:
    """8-bit integers or [0, 1] / [-1, 1] floats to float32 in [-1, 1]."""
    if x.dtype.kind in "iu":
        if x.min() < 0 or x.max() > 255:
            raise DataError(f"{path}: integer pixels must be 0..255, found {x.min()}..{x.max()}")
        return bytes_to_unit(x)
    if x.dtype.kind != "f":
        raise DataError(f"{path}: expected integer or float pixels, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise DataError(f"{path}: x contains NaN or inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 or hi > 1:
        raise DataError(f"{path}: float pixels must be in [0, 1] or [-1, 1], found {lo}..{hi}")
    return torch.from_numpy(np.asarray(x if lo < 0 else 2 * x - 1, dtype=np.float32))


def load_npz(*, split: str, root=None, image_size: int | None = None, **_: object) -> ArrayDataset:
    """The images (and labels) of the .npz file ``root`` as [N, C, H, W] in [-1, 1]."""
    if root is None:
        raise ConfigError("npz data needs a root: the .npz file (--data-root FILE.npz)")
    if split == "test":
        raise ConfigError("npz data has one split: use split 'train' or 'all'")
    path = Path(root).expanduser()
    x, y = read_npz(path)
    if x.ndim == 0 or x.shape[0] == 0 or x.size == 0:
        raise DataError(f"{path}: x is empty (shape {x.shape})")
    x_t = to_unit_range(to_nchw(x, path), path).contiguous()
    if image_size is not None:
        x_t = fit_to_size(x_t, image_size, pad_background=False)
    labels, num_classes = None, None
    if y is not None:
        if y.shape != x.shape[:1] or y.dtype.kind not in "iu" or (y < 0).any():
            raise DataError(
                f"{path}: y must be non-negative integers [{x.shape[0]}], got {y.dtype} {y.shape}"
            )
        labels, num_classes = torch.from_numpy(y.astype(np.int64)), int(y.max()) + 1
    return ArrayDataset(x=x_t, y=labels, name="npz", num_classes=num_classes)
