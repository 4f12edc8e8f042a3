"""Runs that survive: SIGKILL at any moment, SIGINT / SIGTERM, corrupt checkpoints, non-finite losses,
and checkpoints that would run code.

Crashes are injected with the test-only hook DDPM_TEST_CRASH="<point>:<n>[:<signal>]" (see
``ddpm.checkpoint.crash_point``): the process sends itself the signal the n-th time it reaches the point.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddpm.checkpoint
import ddpm.objective
from ddpm.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from ddpm.cli import main
from ddpm.errors import DivergedError
from ddpm.train import train


def assert_same_weights(run_a: Path, run_b: Path) -> None:
    a, b = latest_checkpoint(run_a), latest_checkpoint(run_b)
    assert a.step == b.step
    for group in ("model", "ema"):
        assert a.tensors[group].keys() == b.tensors[group].keys()
        for key, value in a.tensors[group].items():
            assert torch.equal(value, b.tensors[group][key]), f"{group}.{key}"


def run_cli(args: list[str], cwd: Path, crash: str | None = None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    env.pop(ddpm.checkpoint.CRASH_ENV, None)
    if crash is not None:
        env[ddpm.checkpoint.CRASH_ENV] = crash
    cmd = [sys.executable, "-m", "ddpm", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture
def fresh_crash_counts(monkeypatch):
    """In-process crash injection counts from zero in every test."""
    monkeypatch.setattr(ddpm.checkpoint, "_crash_counts", {})


# --------------------------------------------------------------------------------------------------
# SIGKILL, SIGINT, SIGTERM
# --------------------------------------------------------------------------------------------------


def test_run_killed_at_random_moments_and_resumed_ends_bitwise_equal_to_an_uninterrupted_one(
    tmp_path, points_toml, make_points_config
):
    steps = 12
    straight = tmp_path / "straight"
    train(make_points_config(steps=steps), straight, progress=False, verbose=False)

    rng = random.Random(6)  # the kill points: seeded, so a failure can be replayed
    kills = [
        f"train.step:{rng.randint(2, 5)}",  # between the optimizer step and the EMA update
        f"checkpoint.write:{rng.randint(2, 9)}",  # half-way through writing some file
        "checkpoint.rename:1",  # a complete checkpoint not yet renamed into place
    ]
    run = tmp_path / "killed"
    args = [
        "train",
        "--config",
        str(points_toml),
        "--steps",
        str(steps),
        "--run-dir",
        str(run),
        "-q",
    ]
    for crash in kills:
        proc = run_cli(args, cwd=tmp_path, crash=crash)
        assert proc.returncode == -9, f"{crash}: not killed ({proc.returncode}): {proc.stderr}"
        for _, path in list_checkpoints(run):  # whatever is visible is complete and verifies
            load_checkpoint(path)
    assert 0 < latest_checkpoint(run).step < steps
    # The last resume in this process (the same code as `ddpm train`, without a fourth start-up).
    train(make_points_config(steps=steps), run, progress=False, verbose=False)
    assert_same_weights(straight, run)


@pytest.mark.parametrize(("signame", "code"), [("INT", 130), ("TERM", 143)])
def test_sigint_and_sigterm_finish_the_step_write_a_checkpoint_and_exit_with_their_code(
    signame, code, tmp_path, points_toml, capsys, monkeypatch, fresh_crash_counts
):
    monkeypatch.setenv(ddpm.checkpoint.CRASH_ENV, f"train.step:3:{signame}")
    run = tmp_path / "run"
    args = ["train", "--config", str(points_toml), "--steps", "1000", "--run-dir", str(run), "-q"]
    assert main(args) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at step 3; checkpoint saved" in err[0], err
    assert latest_checkpoint(run).step == 3


def test_resume_skips_a_truncated_newest_checkpoint_in_one_line_and_uses_the_previous(
    tmp_path, points_toml, capsys, make_points_config
):
    straight = tmp_path / "straight"
    train(make_points_config(steps=6), straight, progress=False, verbose=False)
    run = tmp_path / "run"
    train(make_points_config(steps=4), run, progress=False, verbose=False)
    newest = run / "checkpoints" / "step_0000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])

    args = ["train", "--config", str(points_toml), "--steps", "6", "--run-dir", str(run), "-q"]
    assert main(args) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert (
        err[0].startswith("ddpm: warning: skipping a bad checkpoint") and "step_0000004" in err[0]
    )
    assert err[0].endswith("using step_0000002")
    assert_same_weights(straight, run)


def test_a_log_row_cut_short_by_a_crash_is_dropped_on_resume(tmp_path, make_points_config):
    run = tmp_path / "run"
    train(make_points_config(steps=10), run, progress=False, verbose=False)
    with open(run / "log.csv", "a") as f:
        f.write("1")  # the row "11,..." was being written when the process died
    train(make_points_config(steps=12), run, progress=False, verbose=False)
    rows = (run / "log.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 13))
    assert all(len(r.split(",")) == 6 for r in rows)


# --------------------------------------------------------------------------------------------------
# non-finite losses
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def nan_at(monkeypatch):
    """nan_at(steps): the forward noising of those training steps (1-based) returns NaN."""

    def install(bad_steps):
        calls = []
        q_sample = ddpm.objective.q_sample

        def poisoned(*args, **kwargs):
            calls.append(1)
            x_t = q_sample(*args, **kwargs)
            return x_t * float("nan") if len(calls) in bad_steps else x_t

        monkeypatch.setattr(ddpm.objective, "q_sample", poisoned)

    return install


def _state_at(run: Path, step: int) -> dict[str, torch.Tensor]:
    tensors = load_checkpoint(run / "checkpoints" / f"step_{step:07d}").tensors
    state = {f"model.{k}": v for k, v in tensors["model"].items()}
    state |= {f"ema.{k}": v for k, v in tensors["ema"].items()}
    state |= {k: v for k, v in tensors["train_state"].items() if k.startswith("optim.")}
    return state


def test_a_nan_loss_skips_its_update_and_is_counted_and_reported(
    tmp_path, nan_at, make_points_config
):
    nan_at({4})
    run = tmp_path / "run"
    config = make_points_config(steps=5, checkpoint_every=1, keep_checkpoints=5)
    with pytest.warns(RuntimeWarning, match=r"step 4: non-finite loss nan .* update skipped"):
        result = train(config, run, progress=False, verbose=False)
    assert (result.step, result.skipped) == (5, 1)
    before, after, next_ = _state_at(run, 3), _state_at(run, 4), _state_at(run, 5)
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights, EMA, AdamW untouched
    assert not all(torch.equal(after[k], next_[k]) for k in after)  # training goes on afterwards
    assert latest_checkpoint(run).meta["nonfinite"] == {"skipped": 1, "streak": 0}


def test_k_nan_losses_in_a_row_stop_the_run_with_the_last_checkpoint_intact(
    tmp_path, nan_at, make_points_config
):
    nan_at(set(range(4, 100)))
    run = tmp_path / "run"
    config = make_points_config(steps=50, checkpoint_every=2, max_nonfinite=3)
    with pytest.warns(RuntimeWarning), pytest.raises(DivergedError, match="3 non-finite losses"):
        train(config, run, progress=False, verbose=False)
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    last = latest_checkpoint(run)
    assert all(torch.isfinite(v).all() for v in last.tensors["model"].values())
    # Step 4 was skipped, so its checkpoint holds the weights of step 3: not those of step 2.
    assert last.meta["nonfinite"] == {"skipped": 1, "streak": 1}


def test_diverged_run_exits_with_code_6_in_one_line(tmp_path, points_toml, nan_at, capsys):
    nan_at(set(range(1, 100)))
    toml = points_toml.read_text().replace("[train]\n", "[train]\nmax_nonfinite = 2\n")
    points_toml.write_text(toml)
    args = ["train", "--config", str(points_toml), "--steps", "9", "--run-dir", str(tmp_path / "r")]
    assert main([*args, "-q"]) == 6
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" not in line]
    assert len(err) == 1 and err[0].startswith("ddpm: error: training stopped at step 2"), err


# --------------------------------------------------------------------------------------------------
# checkpoints never run code
# --------------------------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, make_points_config) -> Path:
    run = tmp_path_factory.mktemp("small") / "run"
    train(make_points_config(steps=2), run, progress=False, verbose=False)
    return run


@pytest.mark.parametrize("target", ["model.safetensors", "ema.safetensors", "meta.json"])
@pytest.mark.parametrize("fix_checksum", [False, True], ids=["stale-sha", "matching-sha"])
def test_a_pickle_in_place_of_a_checkpoint_file_is_refused_without_running_it(
    target, fix_checksum, small_run, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"weight": _RunsCode(marker)})
    ckpt = run / "checkpoints" / "step_0000002"
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / target).write_bytes(evil)
    if fix_checksum and target != "meta.json":
        meta["files"][target]["sha256"] = hashlib.sha256(evil).hexdigest()
        (ckpt / "meta.json").write_text(json.dumps(meta))
    code = main(["train", "--steps", "3", "--run-dir", str(run), "-q"])  # resuming reads every file
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 5 and len(err) == 1 and err[0].startswith("ddpm: error: "), err
    assert not marker.exists()


def test_a_pickle_offered_as_the_run_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    evil.write_bytes(pickle.dumps(_RunsCode(marker)))
    assert main(["sample", str(evil), "-q"]) == 4
    assert capsys.readouterr().err.startswith("ddpm: error: ")
    assert not marker.exists()


def test_resuming_keeps_the_nan_counter_of_the_run(tmp_path, nan_at, make_points_config):
    nan_at({2})
    run = tmp_path / "run"
    with pytest.warns(RuntimeWarning):
        train(make_points_config(steps=2), run, progress=False, verbose=False)
    result = train(make_points_config(steps=3), run, progress=False, verbose=False)
    assert result.skipped == 1
