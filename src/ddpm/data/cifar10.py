"""CIFAR-10 [N, 3, 32, 32] from its official releases, already on the machine (nothing is downloaded).

``root`` (``--data-root``) is any of: the archive ``cifar-10-binary.tar.gz`` or
``cifar-10-python.tar.gz``, a folder holding one of them, a folder holding ``cifar-10-batches-bin/``
or ``cifar-10-batches-py/``, or such a batches folder itself. Archives are read in place.

- Binary release: ``data_batch_1.bin`` .. ``data_batch_5.bin`` (train) and ``test_batch.bin``, each a
  run of 3073-byte records: the label (0..9), then 1024 red, 1024 green and 1024 blue bytes, rows of
  32 pixels top to bottom. Plain bytes, no pickle.
- Python release: ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``, pickles of
  ``{"data": uint8 [10000, 3072], "labels": [...], ...}``, read with ``mnistpkl``'s unpickler, which
  builds arrays, lists and dicts and refuses every other global (so it cannot run code).

Splits: "train" 50000 images, "test" 10000, "all" both; labels 0..9 with ``CIFAR10_CLASSES``.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch

from ddpm.data.dataset import ArrayDataset
from ddpm.data.mnistpkl import ArrayUnpickler
from ddpm.data.transforms import bytes_to_unit, fit_to_size
from ddpm.errors import DataError

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
ARCHIVES = {"cifar-10-binary.tar.gz": "bin", "cifar-10-python.tar.gz": "py"}
FOLDERS = {"cifar-10-batches-bin": "bin", "cifar-10-batches-py": "py"}
_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_RECORD = 1 + 3 * 32 * 32
_HOW_TO_GET = (
    f"download cifar-10-binary.tar.gz (or cifar-10-python.tar.gz) from {URL} and pass "
    "--data-root with the archive or the folder it unpacks to"
)


def parse_binary_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [n, 3, 32, 32], uint8 labels [n]) of one binary-release batch file."""
    if not data or len(data) % _RECORD:
        raise DataError(f"{name}: {len(data)} bytes is not a whole number of 3073-byte records")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].copy()


def parse_python_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [n, 3, 32, 32], uint8 labels [n]) of one python-release batch pickle."""
    try:
        # latin1: the release is a Python 2 pickle whose numpy bytes are stored as str.
        obj = ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise DataError(f"cannot read {name} as a pickle of arrays: {err}") from None
    if isinstance(obj, dict):  # Python 3 pickles may have bytes keys
        obj = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if not isinstance(obj, dict) or "data" not in obj or "labels" not in obj:
        raise DataError(f"{name}: expected a dict with 'data' and 'labels'")
    x, y = np.asarray(obj["data"]), np.asarray(obj["labels"])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or y.shape != x.shape[:1]:
        raise DataError(f"{name}: expected data uint8 [n, 3072] and n labels")
    if y.dtype.kind not in "iu":
        raise DataError(f"{name}: labels must be integers")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


def _locate(root: Path) -> tuple[Path, str, str]:
    """(folder or archive, "bin"/"py", member prefix inside an archive)."""
    if root.is_file():
        kind = ARCHIVES.get(root.name)
        if kind is None:
            raise DataError(f"cifar10: {root} is not {' or '.join(ARCHIVES)}; {_HOW_TO_GET}")
        return root, kind, next(f for f, k in FOLDERS.items() if k == kind)
    if not root.is_dir():
        raise DataError(f"cifar10: data root {root} does not exist; {_HOW_TO_GET}")
    for folder, kind in FOLDERS.items():
        if (root / folder).is_dir():
            return root / folder, kind, ""
    if (root / "data_batch_1.bin").is_file() or (root / "test_batch.bin").is_file():
        return root, "bin", ""
    if (root / "data_batch_1").is_file() or (root / "test_batch").is_file():
        return root, "py", ""
    for archive, kind in ARCHIVES.items():
        if (root / archive).is_file():
            return root / archive, kind, next(f for f, k in FOLDERS.items() if k == kind)
    raise DataError(f"cifar10: no CIFAR-10 files in {root}; {_HOW_TO_GET}")


def _read_members(path: Path, names: list[str]) -> dict[str, bytes]:
    """The named files of a folder, or of a .tar.gz (read in place, nothing extracted)."""
    if path.is_dir():
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise DataError(f"cifar10: {path} lacks {', '.join(missing)}; {_HOW_TO_GET}")
        return {n: (path / n).read_bytes() for n in names}
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in names if n not in members]
            if missing:
                raise DataError(f"cifar10: {path} lacks {', '.join(missing)}")
            return {n: tar.extractfile(members[n]).read() for n in names}
    except (tarfile.TarError, OSError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(f"cifar10: cannot read {path} ({err})") from None


def read_cifar10(
    root: str | Path, splits: tuple[str, ...]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (uint8 images [N, 3, 32, 32], labels [N])} for the requested splits."""
    path, kind, prefix = _locate(Path(root).expanduser())
    suffix = ".bin" if kind == "bin" else ""
    parse = parse_binary_batch if kind == "bin" else parse_python_batch
    out = {}
    for split in splits:
        names = [f"{prefix}/{b}{suffix}" if prefix else f"{b}{suffix}" for b in _BATCHES[split]]
        files = _read_members(path, names)
        parts = [parse(files[n], f"{path}/{n}" if path.is_dir() else f"{path}:{n}") for n in names]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts]).astype(np.int64)
        if y.size and (y.min() < 0 or y.max() > 9):
            raise DataError(f"cifar10: labels must be 0..9 in {path}, found {int(y.max())}")
        out[split] = (x, y)
    return out


def load_cifar10(
    *, split: str, root=None, image_size: int | None = None, **_: object
) -> ArrayDataset:
    """CIFAR-10 as [N, 3, 32, 32], bytes k scaled to k / 255 * 2 - 1 (see the module docstring).

    ``image_size`` other than 32 resizes (see ``fit_to_size``)."""
    if root is None:
        raise DataError(f"cifar10 needs --data-root: {_HOW_TO_GET}")
    needed = ("train", "test") if split == "all" else (split,)
    splits = read_cifar10(root, needed)
    images = np.concatenate([splits[s][0] for s in needed])
    labels = np.concatenate([splits[s][1] for s in needed])
    x = bytes_to_unit(images)
    if image_size is not None:
        x = fit_to_size(x, image_size, pad_background=False)
    return ArrayDataset(
        x=x,
        y=torch.from_numpy(labels),
        name="cifar10",
        num_classes=10,
        class_names=CIFAR10_CLASSES,
    )
