"""Bad input, table-driven: each malformed input gets one line on stderr, its documented exit code, no
traceback and no half-written file.

Exit codes (ddpm.errors): 1 I/O (disk full, permission) or other error, 2 bad option or config,
3 data, 4 run directory, 5 checkpoint, 6 training diverged. Each row builds its input under tmp_path and
returns the command line; the test runs it in-process, except the rows that need another process
(a file-size limit, another user).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

from ddpm.checkpoint import list_checkpoints
from ddpm.cli import main
from ddpm.config import RunConfig

SHORT = ["--num", "2", "--steps", "2", "-q"]  # a quick `ddpm sample`
RESUME = ["train", "--run-dir", "RUN", "--steps", "31", "-q"]  # one more step of the copied run


class Row(NamedTuple):
    build: Callable[[Path, Path], list[str]]  # (tmp_path, trained run) -> the command line
    code: int
    message: str  # a fragment of the one-line message


# ---------------------------------------------------------------- inputs


def _folder(tmp: Path, images: dict[str, Callable[[Path], None]]) -> Path:
    folder = tmp / "images"
    folder.mkdir()
    for name, write in images.items():
        write(folder / name)
    return folder


def _png(size=(8, 8), mode="L") -> Callable[[Path], None]:
    def write(path: Path) -> None:
        shape = size if mode == "L" else (*size, len(mode))
        Image.fromarray(np.full(shape, 128, dtype=np.uint8), mode=mode).save(path, format="PNG")

    return write


def _bytes(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def _float_tiff(path: Path) -> None:  # a 32-bit float image, named .png
    Image.fromarray(np.zeros((8, 8), dtype=np.float32), mode="F").save(path, format="TIFF")


def train_folder(images: dict[str, Callable[[Path], None]]) -> Callable[[Path, Path], list[str]]:
    def build(tmp: Path, _run: Path) -> list[str]:
        root = _folder(tmp, images)
        return ["train", "--data", "folder", "--data-root", str(root), "--run-dir", str(tmp / "r")]

    return build


def train_npz(x: np.ndarray | None = None, raw: bytes | None = None) -> Callable:
    def build(tmp: Path, _run: Path) -> list[str]:
        path = tmp / "data.npz"
        if raw is not None:
            path.write_bytes(raw)
        else:
            np.savez(path, x=x)
        return ["train", "--data", "npz", "--data-root", str(path), "--run-dir", str(tmp / "r")]

    return build


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _object_npz() -> Callable:
    def build(tmp: Path, _run: Path) -> list[str]:
        path = tmp / "data.npz"
        np.savez(path, x=np.array([_RunsCode()], dtype=object), allow_pickle=True)
        return ["train", "--data", "npz", "--data-root", str(path), "--run-dir", str(tmp / "r")]

    return build


def train_mnist(files: dict[str, bytes] | None) -> Callable:
    def build(tmp: Path, _run: Path) -> list[str]:
        root = tmp / "mnist"
        if files is not None:
            root.mkdir()
            for name, data in files.items():
                (root / name).write_bytes(data)
        return ["train", "--data", "mnist", "--data-root", str(root), "--run-dir", str(tmp / "r")]

    return build


def _idx(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    return header + array.tobytes()


MNIST_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")


def with_file(name: str, build: Callable) -> Callable:
    """build, after writing a plain file tmp/name, with FILE in its arguments standing for it."""

    def wrapped(tmp: Path, run: Path) -> list[str]:
        (tmp / name).write_text("not a directory")
        return [a.replace("FILE", str(tmp / name)) for a in build(tmp, run)]

    return wrapped


def train_with(*args: str) -> Callable:
    return lambda tmp, _run: ["train", *args, "--run-dir", str(tmp / "r")]


def train_with_toml(text: str | bytes) -> Callable:
    def build(tmp: Path, _run: Path) -> list[str]:
        path = tmp / "c.toml"
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
        return ["train", "--config", str(tmp / "c.toml"), "--run-dir", str(tmp / "r")]

    return build


def run_dir_with(prepare: Callable[[Path], None], command: str = "train") -> Callable:
    def build(tmp: Path, _run: Path) -> list[str]:
        run = tmp / "r"
        prepare(run)
        return [command, str(run)] if command != "train" else ["train", "--run-dir", str(run)]

    return build


def _config_json(version) -> Callable[[Path], None]:
    def prepare(run: Path) -> None:
        run.mkdir()
        record = {"run_format": version, **RunConfig().to_dict()}
        (run / "config.json").write_text(json.dumps(record))

    return prepare


def copied_run(edit: Callable[[Path], None], *args: str) -> Callable:
    def build(tmp: Path, trained: Path) -> list[str]:
        run = tmp / "r"
        shutil.copytree(trained, run)
        edit(run)
        return [a.replace("RUN", str(run)) for a in args]

    return build


def _newer_checkpoint(run: Path) -> None:
    meta = run / "checkpoints" / "step_0000030" / "meta.json"
    meta.write_text(meta.read_text().replace('"version": 1', '"version": 99'))


def _edited_meta(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """Change the newest checkpoint's meta.json (which no checksum covers)."""

    def prepare(run: Path) -> None:
        path = run / "checkpoints" / "step_0000030" / "meta.json"
        meta = json.loads(path.read_text())
        edit(meta)
        path.write_text(json.dumps(meta))

    return prepare


def _no_checkpoints(run: Path) -> None:
    shutil.rmtree(run / "checkpoints")


def _nothing(run: Path) -> None:
    pass


GRAY = {"a.png": _png(), "b.png": _png()}

ROWS: dict[str, Row] = {
    # ---- data: images
    "corrupt image": Row(
        train_folder({**GRAY, "c.png": _bytes(b"\x89PNG\r\n\x1a\n garbage")}),
        3,
        "cannot read image",
    ),
    "zero-byte image": Row(train_folder({**GRAY, "c.png": _bytes(b"")}), 3, "empty image file"),
    "truncated image": Row(
        train_folder({"a.png": lambda p: (_png()(p), p.write_bytes(p.read_bytes()[:40]))}),
        3,
        "cannot read image",
    ),
    "mixed image sizes": Row(
        train_folder({"a.png": _png((8, 8)), "b.png": _png((12, 12))}), 3, "different sizes"
    ),
    "unsupported image mode": Row(
        train_folder({**GRAY, "c.png": _float_tiff}), 3, "unsupported image mode F"
    ),
    "empty folder": Row(train_folder({}), 3, "no PNG or JPEG images"),
    "missing folder": Row(
        train_with("--data", "folder", "--data-root", "/no/such/dir"), 3, "does not exist"
    ),
    "folder root is a file": Row(
        with_file("f", train_with("--data", "folder", "--data-root", "FILE")), 3, "is not a folder"
    ),
    # ---- data: arrays
    "NaN in npz": Row(train_npz(np.full((4, 8, 8), np.nan, np.float32)), 3, "NaN or inf"),
    "inf in npz": Row(train_npz(np.full((4, 8, 8), np.inf, np.float32)), 3, "NaN or inf"),
    "npz of rank 1": Row(train_npz(np.zeros(16, np.float32)), 3, "expected images"),
    "npz of rank 5": Row(train_npz(np.zeros((2, 1, 1, 8, 8), np.float32)), 3, "expected images"),
    "npz with 2 channels": Row(train_npz(np.zeros((4, 8, 8, 2), np.uint8)), 3, "expected images"),
    "npz pixels above 255": Row(train_npz(np.full((4, 8, 8), 300, np.int32)), 3, "0..255"),
    "empty npz array": Row(train_npz(np.zeros((0, 8, 8), np.float32)), 3, "empty"),
    "npz that is not a zip": Row(train_npz(raw=b"just text"), 3, "would need unpickling"),
    "npz holding a pickle": Row(_object_npz(), 3, "would need unpickling"),
    "non-IDX file named like one": Row(
        train_mnist({name: b"<html>not found</html>" for name in MNIST_NAMES}),
        3,
        "is not an IDX file",
    ),
    "truncated IDX file": Row(
        train_mnist(
            {
                MNIST_NAMES[0]: _idx(np.zeros((4, 28, 28)))[:100],
                MNIST_NAMES[1]: _idx(np.zeros(4)),
            }
        ),
        3,
        "IDX header says",
    ),
    "missing MNIST root": Row(train_mnist(None), 3, "does not exist"),
    # ---- names and numbers
    "unknown data set": Row(train_with("--data", "cifar-11"), 2, "unknown data set 'cifar-11'"),
    "unknown schedule": Row(train_with("--schedule", "wobbly"), 2, "unknown schedule 'wobbly'"),
    "unknown sampler": Row(
        train_with_toml('[sample]\nsampler = "teleport"\n'), 2, "unknown sampler 'teleport'"
    ),
    "unknown model": Row(train_with("--model", "gigantic"), 2, "unknown model 'gigantic'"),
    "unknown prediction": Row(train_with("--prediction", "z"), 2, "unknown prediction 'z'"),
    "learned variance with L_simple": Row(
        train_with("--variance", "learned_range", "--loss", "simple"), 2, "leaves variance"
    ),
    "zero steps": Row(train_with("--steps", "0"), 2, "steps must be a positive integer"),
    "negative steps": Row(train_with("--steps", "-5"), 2, "steps must be a positive integer"),
    "T = 0": Row(train_with("--timesteps", "0"), 2, "num_timesteps must be a positive integer"),
    "zero batch size": Row(train_with("--batch-size", "0"), 2, "batch_size must be a positive"),
    "NaN learning rate": Row(train_with("--lr", "nan"), 2, "lr must be a positive number"),
    "EMA decay above 1": Row(train_with("--ema-decay", "1.5"), 2, "ema_decay must lie in [0, 1)"),
    "image size the U-Net cannot take": Row(
        train_with("--image-size", "7"), 2, "image size 7 is not divisible"
    ),
    "steps not a number": Row(train_with("--steps", "ten"), 2, "invalid int value"),
    "batch size that fills the machine": Row(
        train_with("--batch-size", "99999999999999999"), 2, "batch_size must be at most 1048576"
    ),
    "T that fills the machine": Row(
        train_with("--timesteps", "10000000000"), 2, "num_timesteps must be at most 100000"
    ),
    "channel_mult of 0": Row(
        train_with_toml("[model]\nchannel_mult = [0]\n"), 2, "channel_mult entries must be a"
    ),
    "a class for the pictures of an unconditional run": Row(
        train_with_toml("[sample]\nclass_label = 3\n"), 2, "needs a class-conditional run"
    ),
    "forward picture where no file can be": Row(
        lambda tmp, _r: ["forward", "--out", "/proc/ddpm-test.png"],
        1,
        "No such file or directory: /proc/ddpm-test.png",  # the picture, not a temporary file
    ),
    "samples where no file can be": Row(
        copied_run(_nothing, "sample", "RUN", "--out", "/proc/ddpm-test", *SHORT),
        1,
        "cannot write under /proc: not a writable file system",  # was "0 GB free"
    ),
    "TOML saved as UTF-16": Row(
        train_with_toml("[train]\nsteps = 1\n".encode("utf-16")), 2, "is not UTF-8 text"
    ),
    "forward picture under a JPEG name": Row(
        lambda tmp, _r: ["forward", "--out", str(tmp / "f.jpg")], 2, "must end in .png"
    ),
    "sample seed beyond 64 bits": Row(
        copied_run(_nothing, "sample", "RUN", "--seed", "99999999999999999999999", *SHORT),
        2,
        "sample.seed must be at most",
    ),
    "edit seed below 0": Row(
        copied_run(_nothing, "edit", "interpolate", "RUN", "--seed", "-1", "--seed", "2", "-q"),
        2,
        "--seed must be an integer in 0..2^63-1",
    ),
    "forward seed beyond 64 bits": Row(
        lambda tmp, _r: ["forward", "--seed", str(2**64), "--out", str(tmp / "f.png")],
        2,
        "seed must be a non-negative integer below 2^63",
    ),
    "nll with a negative seed": Row(
        copied_run(_nothing, "nll", "RUN", "--num", "2", "--seed", "-1", "-q"),
        2,
        "seed must be a non-negative integer",
    ),
    "sample from a run dir that is a file": Row(
        with_file("f", lambda tmp, run: ["sample", "FILE", *SHORT]), 4, "is a file, not a run"
    ),
    "forward of -1 examples": Row(
        lambda tmp, _r: ["forward", "--num", "-1", "--out", str(tmp / "f.png")],
        2,
        "--num must be between 1 and 1000",
    ),
    "interpolation of 10^8 frames": Row(
        copied_run(
            _nothing,
            "edit",
            "interpolate",
            "RUN",
            "--seed",
            "1",
            "--seed",
            "2",
            "--frames",
            "100000000",
            "-q",
        ),  # fmt: skip
        2,
        "--frames must be between 2 and 1000",
    ),
    "unknown option": Row(train_with("--learning-rate", "1"), 2, "unrecognized arguments"),
    "invalid TOML": Row(train_with_toml("[train\nsteps = 1\n"), 2, "invalid TOML"),
    "unknown TOML key": Row(train_with_toml("[train]\nstpes = 1\n"), 2, "train.stpes"),
    "missing config file": Row(
        lambda tmp, _r: ["train", "--config", str(tmp / "none.toml"), "--run-dir", str(tmp / "r")],
        2,
        "config file not found",
    ),
    "sample count 0": Row(copied_run(_nothing, "sample", "RUN", "--num", "0"), 2, "sample.num"),
    "DDIM eta above 1": Row(
        copied_run(_nothing, "sample", "RUN", "--sampler", "ddim", "--eta", "1.5"),
        2,
        "eta must lie",
    ),
    "sample steps above T": Row(
        copied_run(_nothing, "sample", "RUN", "--steps", "5000"), 2, "steps must be at most T=100"
    ),
    # ---- run directories and checkpoints
    "run dir is a file": Row(with_file("r", train_with()), 4, "is not a directory"),
    "non-empty dir that is not a run": Row(
        run_dir_with(lambda run: (run.mkdir(), (run / "thesis.tex").write_text("x"))),
        4,
        "is not a ddpm run directory",
    ),
    "run dir from a newer ddpm": Row(
        run_dir_with(_config_json(99)), 4, "run directory of format 99"
    ),
    "run dir with corrupt config.json": Row(
        run_dir_with(lambda run: (run.mkdir(), (run / "config.json").write_text("{"))),
        4,
        "not valid JSON",
    ),
    "sample from a missing run": Row(
        lambda tmp, _r: ["sample", str(tmp / "nowhere")], 4, "no such run directory"
    ),
    "sample from a run without checkpoints": Row(
        copied_run(_no_checkpoints, "sample", "RUN"), 4, "has no checkpoint yet"
    ),
    "checkpoint from a newer ddpm": Row(
        copied_run(_newer_checkpoint, "sample", "RUN", "-q"), 5, "is newer than this ddpm reads"
    ),
    "checkpoint whose step is not a number": Row(
        copied_run(_edited_meta(lambda m: m.update(step="ten")), "sample", "RUN", *SHORT),
        5,
        "corrupt metadata",
    ),
    "checkpoint whose file list is corrupt": Row(
        copied_run(
            _edited_meta(lambda m: m["files"].update({"ema.safetensors": "abc"})),
            "sample",
            "RUN",
            *SHORT,
        ),  # fmt: skip
        5,
        "corrupt metadata",
    ),
    "checkpoint with impossible network settings": Row(
        copied_run(
            _edited_meta(lambda m: m["model"]["config"].update(num_heads=0)),
            "sample",
            "RUN",
            *SHORT,
        ),  # fmt: skip
        5,
        "network settings are invalid",
    ),
    "checkpoint with an unknown network setting": Row(
        copied_run(
            _edited_meta(lambda m: m["model"]["config"].update(bogus=1)),
            "sample",
            "RUN",
            *SHORT,
        ),  # fmt: skip
        5,
        "network settings are invalid",
    ),
    "checkpoint whose weights are of another network": Row(
        copied_run(
            _edited_meta(lambda m: m["model"]["config"].update(base_channels=8)),
            "sample",
            "RUN",
            *SHORT,
        ),  # fmt: skip
        5,
        "weights do not fit the network: size mismatch",
    ),
    "checkpoint with a corrupt data order": Row(
        copied_run(
            _edited_meta(lambda m: m.update(data_order=5)),
            *RESUME,
        ),
        4,
        "cannot restore the training state",
    ),
    "checkpoint with a NaN training time": Row(
        copied_run(
            _edited_meta(lambda m: m.update(elapsed_s=float("nan"))),
            *RESUME,
        ),
        4,
        "cannot restore the training state (elapsed_s nan",
    ),
    "checkpoint with no skip counts": Row(
        copied_run(
            _edited_meta(lambda m: m.update(nonfinite=None)),
            *RESUME,
        ),
        4,
        "cannot restore the training state",
    ),
    "sample --out names a file": Row(
        with_file("f", lambda tmp, run: ["sample", str(run), "--out", "FILE", *SHORT]),
        2,
        "must be a folder",
    ),
    "eval --out names a file": Row(
        with_file("f", lambda tmp, run: ["eval", str(run), "--out", "FILE", "--num", "4", "-q"]),
        2,
        "must be a folder",
    ),
    "nll --out names a file": Row(
        with_file("f", lambda tmp, run: ["nll", str(run), "--out", "FILE", "--num", "2", "-q"]),
        2,
        "must be a folder",
    ),
    "sample --out empty": Row(
        copied_run(_nothing, "sample", "RUN", "--out", "", *SHORT), 2, "--out is empty"
    ),
    "eval --out looks like a file name": Row(
        lambda tmp, run: ["eval", str(run), "--out", str(tmp / "result.json"), "-q"],
        2,
        "looks like a file name",
    ),
    "output directory under a file": Row(
        with_file("f", lambda tmp, run: ["sample", str(run), "--out", "FILE/out", *SHORT]),
        1,
        "Not a directory",
    ),
}


# ---------------------------------------------------------------- the checks


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit:  # argparse's usage errors
        return exit.code


def assert_one_line(err: str, code: int, row: Row) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ddpm: error: "), err
    assert row.message in lines[0], err
    assert "Traceback" not in err
    assert code == row.code, f"exit code {code}, documented {row.code}: {err}"


@pytest.mark.parametrize("name", ROWS, ids=list(ROWS))
def test_bad_input_is_one_line_with_its_exit_code_and_writes_nothing(
    name, tmp_path, trained_run, capsys, monkeypatch
):
    row = ROWS[name]
    monkeypatch.chdir(tmp_path)
    argv = row.build(tmp_path, trained_run)
    before = _files(tmp_path)
    code = _exit_code(argv)
    assert_one_line(capsys.readouterr().err, code, row)
    assert _files(tmp_path) == before  # nothing written, not even half a file
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- library rows


LIBRARY_ROWS = {
    "betas above 1": (lambda: _schedule([0.5, 1.5]), ValueError, "beta"),
    "betas of 0": (lambda: _schedule([0.0, 0.1]), ValueError, "beta"),
    "betas with NaN": (lambda: _schedule([0.1, float("nan")]), ValueError, "NaN"),
    "T = 0 schedule": (
        lambda: __import__("ddpm").NoiseSchedule.from_name("linear", 0),
        ValueError,
        "num_timesteps",
    ),
}


def _schedule(betas):
    import torch

    from ddpm import NoiseSchedule

    return NoiseSchedule.from_betas(torch.tensor(betas, dtype=torch.float64))


@pytest.mark.parametrize("name", LIBRARY_ROWS, ids=list(LIBRARY_ROWS))
def test_bad_library_input_raises_a_one_line_error(name):
    call, error, fragment = LIBRARY_ROWS[name]
    with pytest.raises(error, match=fragment) as info:
        call()
    assert len(str(info.value).splitlines()) == 1


# ---------------------------------------------------------------- rows that need another process


def _cli(args: list[str], cwd: Path, preexec=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ddpm", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        preexec_fn=preexec,
    )


def test_full_disk_is_one_line_and_leaves_no_half_written_checkpoint(tmp_path, points_toml):
    import resource

    def small_files() -> None:  # any file past 4 KiB fails with EFBIG, as a full disk with ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    run = tmp_path / "run"
    args = ["train", "--config", str(points_toml), "--steps", "2", "--run-dir", str(run), "-q"]
    proc = _cli(args, tmp_path, preexec=small_files)
    assert_one_line(proc.stderr, proc.returncode, Row(None, 1, "file size limit reached"))
    assert proc.stderr.strip().endswith(str(run / "checkpoints" / "step_0000002"))
    assert list_checkpoints(run) == []
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]
    json.loads((run / "config.json").read_text())  # what was written is whole


def test_read_only_output_directory_is_one_line(tmp_path, points_toml, capsys):
    if os.geteuid() != 0:
        parent = tmp_path / "read-only"
        parent.mkdir(mode=0o555)
    elif Path("/sys/kernel").is_dir():  # permission bits do not stop root; sysfs does (EPERM)
        parent = Path("/sys")
    else:
        pytest.skip("running as root without sysfs: no directory is read-only")
    run = parent / "ddpm-test-run"
    args = ["train", "--config", str(points_toml), "--steps", "1", "--run-dir", str(run), "-q"]
    code = _exit_code(args)
    err = capsys.readouterr().err
    message = "Permission denied" if os.geteuid() != 0 else "Operation not permitted"
    assert_one_line(err, code, Row(None, 1, message))
    assert not run.exists()


def test_running_out_of_memory_is_one_line_saying_so(monkeypatch, capsys, tmp_path):
    import ddpm.cli

    def allocate(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 8000000000000 bytes.")  # fmt: skip

    monkeypatch.setattr(ddpm.cli, "_cmd_info", allocate)
    code = main(["info", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith("ddpm: error: out of memory") and "--batch-size" in err


def test_an_nll_that_fails_while_writing_leaves_none_of_its_files(
    trained_run, tmp_path, monkeypatch
):
    import ddpm.evaluate

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ddpm.evaluate.viz, "plot_bound_terms", full_disk)  # after the .csv
    out = tmp_path / "eval"
    code = main(["nll", str(trained_run), "--num", "2", "--steps", "4", "-q", "--out", str(out)])
    assert code == 1
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))
