"""The IDX file format of MNIST and Fashion-MNIST (plain or gzip-compressed), validated.

Layout: two zero bytes, a type code, the number of dimensions d, d big-endian uint32 sizes, then the
values in C order. ``train-images-idx3-ubyte`` holds uint8 [N, 28, 28]; ``...-labels-idx1-ubyte`` [N].
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from ddpm.errors import DataError

_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped if it starts with the gzip magic number (whatever its name)."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == _GZIP_MAGIC else raw
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def read_idx(path: str | Path, *, ndim: int | None = None) -> np.ndarray:
    """The array in an IDX file, checking its magic number, rank (if ``ndim`` is given) and length."""
    path = Path(path)
    data = read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _TYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {data[:4].hex() or 'none'})")
    dtype, rank = _TYPES[data[2]], data[3]
    if ndim is not None and rank != ndim:
        raise DataError(f"{path}: expected an IDX array of rank {ndim}, the header says {rank}")
    header = 4 + 4 * rank
    if len(data) < header:
        raise DataError(f"{path}: IDX header truncated")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=rank, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{path}: IDX header says {shape} ({expected} bytes), the file has {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def find_idx_file(folder: Path, prefix: str, kind: str, ndim: int) -> Path | None:
    """``{prefix}-{kind}-idx{ndim}-ubyte`` in ``folder``, also spelt ``.idx`` and with ``.gz``."""
    for stem in (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def read_idx_pair(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(images uint8 [N, H, W], labels uint8 [N]) of ``prefix`` ("train" / "t10k"), or None if absent."""
    images_path = find_idx_file(folder, prefix, "images", 3)
    labels_path = find_idx_file(folder, prefix, "labels", 1)
    if images_path is None or labels_path is None:
        return None
    images, labels = read_idx(images_path, ndim=3), read_idx(labels_path, ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise DataError(f"{folder}: expected uint8 IDX images and labels for {prefix}")
    if len(images) != len(labels):
        raise DataError(
            f"{folder}: {images_path.name} has {len(images)} images but {labels_path.name} has "
            f"{len(labels)} labels"
        )
    return images, labels
