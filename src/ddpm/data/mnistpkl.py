"""MNIST in the classic ``mnist.pkl.gz`` layout, read with an unpickler that can build arrays and nothing else.

Layout (Python 2 pickle, protocol 2): ``((x_train, y_train), (x_valid, y_valid), (x_test, y_test))``
with x float32 [n, 784] holding k / 256 for the 8-bit value k and y int64 [n]; n = 50000, 10000, 10000.
The first 60000 images are MNIST's training set (train then valid), the last 10000 its test set.
"""

from __future__ import annotations

import codecs
import gzip
import pickle
import zlib
from pathlib import Path

import numpy as np

from ddpm.errors import DataError


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Python 3 pickles of bytes at protocol 2 call _codecs.encode(str, "latin1"); allow only that.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


# The only callables a pickle may name: what numpy arrays reduce to (old and new module spellings).
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles tuples, lists, numbers, strings and numpy arrays; refuses every other global.

    Why: a pickle can call any importable function while loading (``os.system`` included).
    """

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def load_array_pickle(path: str | Path) -> object:
    """The object in a (gzip-compressed) pickle that holds only arrays, or DataError."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb") as f:
            # latin1: Python 2 pickles store numpy's raw bytes as str.
            return ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, OSError, EOFError, zlib.error, ValueError, TypeError) as e:
        raise DataError(f"cannot read {path} as a pickle of arrays: {e}") from e


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def read_mnist_pickle(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (uint8 [60000, 28, 28], labels [60000]), "test": (... [10000] ...)} from mnist.pkl.gz."""
    obj = load_array_pickle(path)
    try:
        parts = [(np.asarray(x), np.asarray(y)) for x, y in obj]
    except (TypeError, ValueError):
        parts = []
    if len(parts) != 3 or any(
        x.ndim != 2 or x.shape[1] != 784 or x.dtype.kind != "f" or y.shape != x.shape[:1]
        for x, y in parts
    ):
        raise DataError(f"{path}: expected ((x, y), (x, y), (x, y)) with x float [n, 784]")
    out = {}
    for split, (x, y) in (("train", _join(parts[:2])), ("test", parts[2])):
        if y.dtype.kind not in "iu" or (y.size and (y.min() < 0 or y.max() > 9)):
            raise DataError(f"{path}: labels must be integers 0..9")
        out[split] = (_to_bytes(x, path).reshape(-1, 28, 28), y.astype(np.uint8))
    return out


def _join(parts):
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def _to_bytes(x: np.ndarray, path) -> np.ndarray:
    """k / 256 floats back to the 8-bit values k (any other [0, 1] floats: round(x * 255))."""
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise DataError(f"{path}: pixel values must be finite and in [0, 1]")
    k = x * 256.0
    if np.array_equal(k, np.round(k)) and k.max() <= 255:
        return k.astype(np.uint8)
    return np.round(x * 255.0).astype(np.uint8)
