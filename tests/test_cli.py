"""The command line: each subcommand works, and every bad input is one line on stderr, no traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddpm.cli import main

BIN = Path(sys.executable).parent


def _run_cli(args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def _assert_one_line_error(code: int, err: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ddpm: error: "), err
    assert "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# working commands (in-process)
# --------------------------------------------------------------------------------------------------


def test_train_then_info_then_sample(tmp_path, fast_toml, capsys):
    run = tmp_path / "run"
    assert (
        main(["train", "--config", str(fast_toml), "--steps", "5", "--run-dir", str(run), "-q"])
        == 0
    )
    out = capsys.readouterr().out
    assert "step 5" in out and (run / "samples" / "step_0000005.png").is_file()

    assert main(["info", str(run)]) == 0
    assert "step:       5" in capsys.readouterr().out

    assert main(["sample", str(run), "--num", "4", "--out", str(tmp_path / "gen"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "samples:" in out
    with np.load(tmp_path / "gen" / "step_0000005_seed0_sde_dpm_solver4.npz") as f:
        assert f["images"].shape == (4, 8, 8, 1)


def test_train_with_the_same_run_dir_resumes(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert main(["train", "--steps", "35", "--run-dir", str(run), "-q"]) == 0
    assert "(step 35)" in capsys.readouterr().out


def test_sample_twice_with_one_seed_gives_identical_arrays(trained_run, tmp_path):
    for name in ("a", "b"):
        args = ["sample", str(trained_run), "--num", "4", "--steps", "3", "--seed", "7"]
        assert main([*args, "--out", str(tmp_path / name), "-q"]) == 0
    with (
        np.load(tmp_path / "a" / "step_0000030_seed7_sde_dpm_solver3.npz") as a,
        np.load(tmp_path / "b" / "step_0000030_seed7_sde_dpm_solver3.npz") as b,
    ):
        assert np.array_equal(a["x0"], b["x0"]) and np.array_equal(a["images"], b["images"])


def test_sample_raw_weights_and_trajectory(trained_run, tmp_path, capsys):
    args = ["sample", str(trained_run), "--num", "2", "--steps", "3", "--raw", "--trajectory"]
    assert main([*args, "--out", str(tmp_path), "-q"]) == 0
    assert (tmp_path / "step_0000030_seed0_sde_dpm_solver3_raw_trajectory.png").is_file()


def test_forward_writes_a_picture(tmp_path, capsys):
    out = tmp_path / "forward.png"
    assert main(["forward", "--data", "digits", "--num", "3", "--out", str(out)]) == 0
    assert out.is_file()


# --------------------------------------------------------------------------------------------------
# bad inputs: one line, non-zero exit
# --------------------------------------------------------------------------------------------------


BAD_TRAIN = {
    "unknown data set": ["--data", "no-such-data"],
    "missing folder": ["--data", "folder", "--data-root", "/no/such/folder"],
    "bad image size": ["--image-size", "7"],
    "unknown schedule": ["--schedule", "wobbly"],
    "zero steps": ["--steps", "0"],
    "negative minutes": ["--minutes", "-1"],
    "not a number": ["--lr", "fast"],
    "unknown model": ["--model", "gigantic"],
}


def _exit_code(argv) -> int:
    """main's return value, or the code of the SystemExit that argparse raises for a usage error."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize("args", BAD_TRAIN.values(), ids=BAD_TRAIN.keys())
def test_bad_training_input_is_one_line(args, tmp_path, capsys):
    code = _exit_code(["train", "--steps", "1", *args, "--run-dir", str(tmp_path / "run"), "-q"])
    _assert_one_line_error(code, capsys.readouterr().err)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_toml_key_is_one_line_naming_it(tmp_path, capsys):
    toml = tmp_path / "bad.toml"
    toml.write_text("[train]\nstpes = 10\n")
    code = main(["train", "--config", str(toml), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    _assert_one_line_error(code, err)
    assert "train.stpes" in err


@pytest.mark.parametrize("command", ["sample", "info"])
def test_a_directory_that_is_not_a_run_is_one_line(command, tmp_path, capsys):
    code = main([command, str(tmp_path)])
    _assert_one_line_error(code, capsys.readouterr().err)
    assert code == 4


def test_resuming_with_other_data_is_one_line(trained_run, capsys):
    code = main(["train", "--data", "moons", "--steps", "40", "--run-dir", str(trained_run)])
    _assert_one_line_error(code, capsys.readouterr().err)


# --------------------------------------------------------------------------------------------------
# the real entry points (subprocess)
# --------------------------------------------------------------------------------------------------


def test_python_dash_m_ddpm_trains(tmp_path, fast_toml):
    run = tmp_path / "run"
    proc = _run_cli(
        [
            sys.executable,
            "-m",
            "ddpm",
            "train",
            "--config",
            str(fast_toml),
            "--steps",
            "5",
            "--run-dir",
            str(run),
            "-q",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert (run / "checkpoints" / "step_0000005" / "meta.json").is_file()


def test_console_script_info_and_error(trained_run, tmp_path):
    proc = _run_cli([str(BIN / "ddpm"), "info", str(trained_run)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "checkpoints:" in proc.stdout
    proc = _run_cli(
        [str(BIN / "ddpm"), "train", "--data", "no-such-data", "--run-dir", "x"], cwd=tmp_path
    )
    _assert_one_line_error(proc.returncode, proc.stderr)
    assert proc.returncode == 2


@pytest.mark.parametrize("world_size,finalized", [("1", True), ("2", False)])
def test_a_torchrun_rank_exits_with_its_output_and_code_but_without_finalization(
    trained_run, tmp_path, world_size, finalized
):
    # Finalizing the interpreter under gloo threads that outlive destroy_process_group() can abort
    # a finished rank (SIGABRT), so ranks skip it; an atexit hook shows whether it ran.
    script = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('finalized', file=sys.stderr))\n"
        "from ddpm.cli import run\n"
        "run()\n"
    )
    for args, code in ([["info", str(trained_run)], 0], [["info", str(tmp_path / "none")], 4]):
        proc = subprocess.run(
            [sys.executable, "-c", script, *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONWARNINGS": "ignore", "WORLD_SIZE": world_size},
        )
        assert proc.returncode == code, proc.stderr
        assert ("finalized" in proc.stderr) == finalized
        # Block-buffered pipes were flushed before the exit.
        assert "checkpoints:" in proc.stdout if code == 0 else "no such run" in proc.stderr


@pytest.mark.parametrize(
    "flags,tag",
    [
        (["--sampler", "ddim", "--steps", "3", "--eta", "0.5"], "_ddim3"),
        (
            ["--sampler", "dpm_solver", "--steps", "4", "--order", "3", "--grid", "trailing"],
            "_dpm_solver4",
        ),
        (["--steps", "3", "--dynamic-threshold", "0.99"], "_sde_dpm_solver3"),
        (["--sampler", "ipndm", "--steps", "5", "--order", "4"], "_ipndm5"),
    ],
)
def test_sample_with_a_chosen_sampler_and_grid(trained_run, tmp_path, capsys, flags, tag):
    out = tmp_path / "gen"
    assert main(["sample", str(trained_run), "--num", "3", "--out", str(out), "-q", *flags]) == 0
    with np.load(out / f"step_0000030_seed0{tag}.npz") as f:
        assert f["images"].shape == (3, 8, 8, 1)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--sampler", "euler"], "unknown sampler 'euler'"),
        (["--order", "4", "--sampler", "dpm_solver"], "order must be 1, 2 or 3"),
        (["--order", "5", "--sampler", "ipndm"], "(ipndm: also 4)"),
        (["--grid", "cubic", "--steps", "3"], "unknown grid 'cubic'"),
    ],
)
def test_sample_with_a_bad_sampler_option_is_one_line(
    trained_run, tmp_path, capsys, flags, message
):
    code = main(["sample", str(trained_run), "--out", str(tmp_path / "gen"), "-q", *flags])
    err = capsys.readouterr().err
    _assert_one_line_error(code, err)
    assert message in err
    assert not (tmp_path / "gen").exists()


def test_train_zero_terminal_snr_with_eps_prediction_is_one_line(tmp_path, fast_toml, capsys):
    args = ["train", "--config", str(fast_toml), "--zero-terminal-snr", "--steps", "2"]
    code = main([*args, "--run-dir", str(tmp_path / "run"), "-q"])
    err = capsys.readouterr().err
    _assert_one_line_error(code, err)
    assert "prediction 'v'" in err and code == 2


def test_train_with_v_prediction_zero_terminal_snr_and_the_vlb_objective(tmp_path, fast_toml):
    run = tmp_path / "run"
    args = ["train", "--config", str(fast_toml), "--steps", "3", "--run-dir", str(run), "-q"]
    flags = ["--prediction", "v", "--zero-terminal-snr", "--loss", "vlb"]
    flags += ["--timestep-sampler", "importance", "--min-snr-gamma", "5", "--offset-noise", "0.1"]
    assert main([*args, *flags]) == 0
    saved = (run / "config.json").read_text()
    assert '"zero_terminal_snr": true' in saved and '"timestep_sampler": "importance"' in saved


def test_training_a_run_already_at_its_steps_says_no_samples_were_drawn(
    trained_run, tmp_path, capsys
):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    step = json.loads(next((run / "checkpoints").glob("*/meta.json")).read_text())["step"]
    assert main(["train", "--run-dir", str(run), "--steps", str(step), "-q"]) == 0
    out = capsys.readouterr().out
    assert "none drawn: no step was taken" in out and "None" not in out
