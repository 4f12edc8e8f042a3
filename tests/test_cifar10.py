"""CIFAR-10 on small files the tests write in both official formats, and random horizontal flips."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.data import DATASETS, load_dataset, random_hflip
from ddpm.data.cifar10 import CIFAR10_CLASSES
from ddpm.errors import DataError

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def make_batches(n: int = 3, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random uint8 images [n, 3, 32, 32] and labels for each of the six batch files."""
    rs = np.random.RandomState(seed)
    return {
        name: (
            rs.randint(0, 256, size=(n, 3, 32, 32)).astype(np.uint8),
            rs.randint(0, 10, size=n).astype(np.uint8),
        )
        for name in BATCHES
    }


def binary_bytes(x: np.ndarray, y: np.ndarray) -> bytes:
    """The binary release's records, built from the documented layout: label, R, G, B planes."""
    out = bytearray()
    for image, label in zip(x, y, strict=True):
        out.append(int(label))
        for channel in range(3):
            for row in range(32):
                out.extend(image[channel, row].tobytes())
    return bytes(out)


def python_bytes(x: np.ndarray, y: np.ndarray) -> bytes:
    """The python release's layout: a dict with data uint8 [n, 3072] and a list of labels."""
    record = {
        "batch_label": "testing batch",
        "labels": [int(v) for v in y],
        "data": x.reshape(len(x), 3072),
        "filenames": [f"img_{i}.png" for i in range(len(x))],
    }
    return pickle.dumps(record, protocol=2)


def write_release(root: Path, kind: str, batches, *, archive: bool = False) -> Path:
    """The release's folder (cifar-10-batches-bin/ or -py/) under root, or its .tar.gz."""
    folder = f"cifar-10-batches-{kind}"
    suffix = ".bin" if kind == "bin" else ""
    encode = binary_bytes if kind == "bin" else python_bytes
    files = {f"{folder}/{name}{suffix}": encode(*batches[name]) for name in BATCHES}
    if not archive:
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        return root / folder
    path = root / ("cifar-10-binary.tar.gz" if kind == "bin" else "cifar-10-python.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def expected(batches, names):
    x = np.concatenate([batches[n][0] for n in names]).astype(np.float32) / 127.5 - 1
    y = np.concatenate([batches[n][1] for n in names]).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


@pytest.mark.parametrize("kind", ["bin", "py"])
@pytest.mark.parametrize("archive", [False, True], ids=["folder", "tar.gz"])
def test_both_releases_give_the_images_and_labels_written(tmp_path, kind, archive):
    batches = make_batches()
    root = write_release(tmp_path, kind, batches, archive=archive)
    train = load_dataset("cifar10", split="train", root=str(root))
    x, y = expected(batches, BATCHES[:5])
    assert train.x.shape == (15, 3, 32, 32) and train.x.dtype == torch.float32
    assert torch.equal(train.x, x) and torch.equal(train.y, y)
    test = load_dataset("cifar10", split="test", root=str(tmp_path))  # the parent folder works too
    x, y = expected(batches, ["test_batch"])
    assert torch.equal(test.x, x) and torch.equal(test.y, y)
    assert train.num_classes == 10 and train.class_names == CIFAR10_CLASSES


def test_split_all_is_train_then_test_and_image_size_resizes(tmp_path):
    batches = make_batches(n=2)
    write_release(tmp_path, "bin", batches)
    data = load_dataset("cifar10", split="all", root=str(tmp_path), image_size=16)
    assert data.x.shape == (12, 3, 16, 16)
    assert torch.equal(data.y, expected(batches, BATCHES)[1])


def test_extracted_batch_files_directly_under_root_are_read(tmp_path):
    batches = make_batches(n=1)
    folder = write_release(tmp_path, "bin", batches)
    data = load_dataset("cifar10", split="test", root=str(folder))
    assert torch.equal(data.x, expected(batches, ["test_batch"])[0])


def test_cifar10_is_registered_like_the_other_sets():
    assert "cifar10" in DATASETS


def test_missing_root_says_where_to_get_the_data(tmp_path):
    with pytest.raises(DataError, match=r"cs\.toronto\.edu/~kriz/cifar\.html"):
        load_dataset("cifar10", split="train")
    with pytest.raises(DataError, match="no CIFAR-10 files"):
        load_dataset("cifar10", split="train", root=str(tmp_path))


def test_a_missing_batch_is_named(tmp_path):
    folder = write_release(tmp_path, "bin", make_batches(n=1))
    (folder / "data_batch_3.bin").unlink()
    with pytest.raises(DataError, match="data_batch_3.bin"):
        load_dataset("cifar10", split="train", root=str(tmp_path))


def test_a_truncated_binary_batch_is_refused(tmp_path):
    folder = write_release(tmp_path, "bin", make_batches(n=2))
    path = folder / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="3073-byte records"):
        load_dataset("cifar10", split="test", root=str(tmp_path))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_python_batch_that_runs_code_is_refused_and_never_runs(tmp_path):
    folder = write_release(tmp_path, "py", make_batches(n=1))
    marker = tmp_path / "pwned"
    (folder / "test_batch").write_bytes(pickle.dumps({"data": _RunsCode(marker)}, protocol=2))
    with pytest.raises(DataError, match="refusing to load global"):
        load_dataset("cifar10", split="test", root=str(tmp_path))
    assert not marker.exists()


# ---------------------------------------------------------------- random horizontal flips


def test_random_hflip_mirrors_exactly_the_images_its_draws_pick():
    x = torch.randn(64, 3, 4, 5)
    out = random_hflip(x, torch.Generator().manual_seed(3))
    picked = torch.rand(64, generator=torch.Generator().manual_seed(3)) < 0.5
    assert torch.equal(out[picked], x[picked].flip(-1))
    assert torch.equal(out[~picked], x[~picked])
    assert 0 < int(picked.sum()) < 64


def test_random_hflip_is_reproducible_and_advances_the_generator_by_one_draw_per_image():
    x = torch.randn(8, 1, 3, 3)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(random_hflip(x, g1), random_hflip(x, g2))
    g3 = torch.Generator().manual_seed(0)
    torch.rand(8, generator=g3)
    assert torch.equal(g1.get_state(), g3.get_state())


def test_random_hflip_flips_about_half_of_many_images():
    x = torch.arange(4.0).reshape(1, 1, 1, 4).expand(4000, 1, 1, 4)
    flipped = (random_hflip(x, torch.Generator().manual_seed(1))[:, 0, 0, 0] == 3).float()
    # Binomial(4000, 1/2): the mean's standard error is 0.0079; allow 4 of them.
    assert abs(flipped.mean().item() - 0.5) < 4 * 0.0079
