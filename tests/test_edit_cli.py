"""``ddpm edit``: each mode reads PNGs in the run's format, writes a PNG and an .npz, and refuses bad
input in one line with its exit code, writing nothing. The algorithms are checked against exact
answers in test_editing.py; here the assembly: what reaches them and what comes back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.cli import main
from ddpm.data import load_dataset
from ddpm.data.transforms import bytes_to_unit

QUICK = ["--steps", "4", "--device", "cpu", "-q"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _save(path, array: np.ndarray):
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


@pytest.fixture
def inputs(tmp_path):
    """Two test digits as 8x8 PNGs, and a mask whose right half (white) is to be filled in."""
    x = load_dataset("digits", split="test").x[:2, 0]
    a, b = (np.rint((d.numpy() + 1) * 127.5) for d in x)
    mask = np.zeros((8, 8))
    mask[:, 4:] = 255
    folder = tmp_path / "in"
    folder.mkdir()
    return {
        "a": _save(folder / "a.png", a),
        "b": _save(folder / "b.png", b),
        "mask": _save(folder / "mask.png", mask),
        "big": _save(folder / "big.png", np.zeros((9, 9))),
        "colour": _save(folder / "colour.png", np.stack([a, b, a], axis=-1)),
    }


def _edit(run, mode, out, *args) -> dict[str, np.ndarray]:
    assert main(["edit", mode, str(run), *map(str, args), "--out", str(out), *QUICK]) == 0
    (png,), (npz,) = out.glob("*.png"), out.glob("*.npz")
    Image.open(png).verify()
    with np.load(npz, allow_pickle=False) as f:
        return {k: f[k] for k in f}


def _pixels(path) -> torch.Tensor:
    return bytes_to_unit(np.asarray(Image.open(path)))


def test_inpaint_keeps_the_black_pixels_of_the_mask_exactly(trained_run, inputs, tmp_path):
    args = ["--image", inputs["a"], "--mask", inputs["mask"], "--num", "2", "--jumps", "2"]
    arrays = _edit(trained_run, "inpaint", tmp_path / "out", *args, "--resample", "2")
    x0, image = torch.from_numpy(arrays["x0"]), _pixels(inputs["a"])
    assert x0.shape == (2, 1, 8, 8)
    assert torch.equal(x0[:, 0, :, :4], image[:, :4].expand(2, -1, -1))  # kept: the input's
    assert not torch.equal(x0[:, 0, :, 4:], image[:, 4:].expand(2, -1, -1))  # filled in
    assert arrays["mask"][0, 0].tolist() == [[1.0] * 4 + [0.0] * 4] * 8  # 1 = keep


def test_sdedit_writes_its_results_and_the_noised_input(trained_run, inputs, tmp_path):
    args = ["--image", inputs["a"], "--strength", "0.5", "--num", "3"]
    arrays = _edit(trained_run, "sdedit", tmp_path / "out", *args)
    assert arrays["x0"].shape == arrays["x_start"].shape == (3, 1, 8, 8)
    assert np.isfinite(arrays["x0"]).all()


def test_the_seed_decides_the_draws(trained_run, inputs, tmp_path):
    args = ["--image", inputs["a"], "--num", "1"]
    default = _edit(trained_run, "sdedit", tmp_path / "a", *args)["x0"]
    seed0 = _edit(trained_run, "sdedit", tmp_path / "b", *args, "--seed", 0)["x0"]
    seed1 = _edit(trained_run, "sdedit", tmp_path / "c", *args, "--seed", 1)["x0"]
    assert np.array_equal(default, seed0) and not np.array_equal(seed0, seed1)


def test_invert_reports_the_error_of_its_own_reconstruction(trained_run, inputs, tmp_path):
    arrays = _edit(trained_run, "invert", tmp_path / "out", "--image", inputs["a"])
    image = _pixels(inputs["a"]).numpy()
    rms = np.sqrt(np.mean((arrays["x0"][0, 0] - image) ** 2))
    assert arrays["rms_error"][0] == pytest.approx(rms, rel=1e-5)
    assert arrays["x_T"].shape == (1, 1, 8, 8)


def test_interpolate_between_two_seeds_starts_at_their_noise(trained_run, tmp_path):
    arrays = _edit(trained_run, "interpolate", tmp_path / "out", "--seed", 1, "--seed", 2,
                   "--frames", 5)  # fmt: skip
    assert arrays["weights"].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    x_T_a = torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(1))
    x_T_b = torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(2))
    assert np.allclose(arrays["x_T"][0], x_T_a.numpy(), atol=1e-6)
    assert np.allclose(arrays["x_T"][-1], x_T_b.numpy(), atol=1e-6)
    assert arrays["x0"].shape == (5, 1, 8, 8)


def test_interpolate_between_two_images_draws_them_at_the_ends(trained_run, inputs, tmp_path):
    out = tmp_path / "out"
    arrays = _edit(trained_run, "interpolate", out, "--image", inputs["a"], "--image", inputs["b"])
    assert arrays["x0"].shape == (8, 1, 8, 8) and arrays["images"].shape == (2, 1, 8, 8)
    (png,) = out.glob("*.png")
    width, height = Image.open(png).size
    tile = height - 14 - 2 * 2  # one row under a 14-px caption band, 2 px padding
    assert width == 2 + (8 + 2) * (tile + 2)  # image a, 8 frames, image b


def test_edit_guides_a_conditional_run_towards_a_class(cond_run, inputs, tmp_path):
    args = ["--image", inputs["a"], "--strength", "1", "--num", "1", "--seed", "0"]
    plain = _edit(cond_run, "sdedit", tmp_path / "plain", *args)["x0"]
    guided = _edit(cond_run, "sdedit", tmp_path / "guided", *args, "--class", "7")["x0"]
    assert not np.array_equal(plain, guided)


# --------------------------------------------------------------------------------------------------
# bad input: one line, its exit code, nothing written
# --------------------------------------------------------------------------------------------------

BAD = {
    "mask of the wrong size": (["inpaint", "--image", "a", "--mask", "big"], 3, "mask"),
    "image of the wrong size": (["sdedit", "--image", "big"], 3, "is 9x9 pixels"),
    "colour image for a gray run": (["invert", "--image", "colour"], 3, "has 3 channel"),
    "missing image": (["invert", "--image", "nowhere"], 3, "no such image file"),
    "all-black mask": (["inpaint", "--image", "a", "--mask", "a0"], 3, "marks no pixel"),
    "not an image": (["invert", "--image", "text"], 3, "cannot read image"),
    "strength 0": (["sdedit", "--image", "a", "--strength", "0"], 2, "strength must lie in (0, 1]"),
    "strength above 1": (["sdedit", "--image", "a", "--strength", "1.5"], 2, "(0, 1]"),
    "one image to interpolate": (["interpolate", "--image", "a"], 2, "two --image or two --seed"),
    "steps above T": (["invert", "--image", "a", "--steps", "101"], 2, "--steps must lie in"),
    "zero resample": (["inpaint", "--image", "a", "--mask", "mask", "--resample", "0"], 2, "resam"),
    "class on an unconditional run": (
        ["sdedit", "--image", "a", "--class", "3"],
        2,
        "not class-conditional",
    ),
    "missing mask option": (["inpaint", "--image", "a"], 2, "--mask"),
}


@pytest.mark.parametrize("name", BAD, ids=list(BAD))
def test_bad_edit_input_is_one_line_and_writes_nothing(
    name, trained_run, inputs, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    _save(tmp_path / "in" / "a0.png", np.zeros((8, 8)))
    (tmp_path / "in" / "text.png").write_text("not a picture")
    mode, *rest = BAD[name][0]
    args = [str(tmp_path / "in" / f"{a}.png") if a.isidentifier() else a for a in rest]
    code, message = BAD[name][1:]
    argv = ["edit", mode, str(trained_run), *QUICK, *args, "--out", str(tmp_path / "out")]
    before = sorted(tmp_path.rglob("*")), sorted(trained_run.rglob("*"))
    try:
        got = main(argv)
    except SystemExit as exit:  # argparse's usage errors
        got = exit.code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddpm: error: ") and message in err[0], err
    assert got == code, err
    assert (sorted(tmp_path.rglob("*")), sorted(trained_run.rglob("*"))) == before


def test_an_out_that_names_a_file_is_refused_before_any_work(trained_run, inputs, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    argv = ["edit", "sdedit", str(trained_run), "--image", str(inputs["a"]), *QUICK]
    assert main([*argv, "--out", str(tmp_path / "taken")]) == 2
    assert main([*argv, "--out", str(tmp_path / "edit.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "must be a folder" in err[0] and "looks like a file name" in err[1]
    assert not (tmp_path / "edit.png").exists()
