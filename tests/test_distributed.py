"""Data-parallel training under torchrun: 2 processes with half the batch each take the steps of one
process with the whole batch, only rank 0 writes, and resuming works under torchrun.

Gloo on 127.0.0.1, no network; each test starts torchrun once (two Python processes).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpm.checkpoint import latest_checkpoint, list_checkpoints
from ddpm.errors import ConfigError
from ddpm.train import train

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)
STEPS = 10


def torchrun(args: list[str], cwd: Path, **extra_env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "PYTHONFAULTHANDLER": "1",  # a rank that aborts shows where (in the stderr of a failure)
        **extra_env,
    }
    if sys.platform == "linux":
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only: no network needed
    return subprocess.run(
        [*cmd, "-m", "ddpm", *args], cwd=cwd, capture_output=True, text=True, timeout=240, env=env
    )


def assert_close_weights(run_a: Path, run_b: Path) -> None:
    """Equal up to float reduction order (the gradient is summed over two halves, then averaged)."""
    a, b = latest_checkpoint(run_a), latest_checkpoint(run_b)
    assert a.step == b.step
    for group in ("model", "ema"):
        for key, value in a.tensors[group].items():
            torch.testing.assert_close(b.tensors[group][key], value, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, make_points_config) -> Path:
    """The reference: one process, the whole batch of 32, STEPS steps."""
    run = tmp_path_factory.mktemp("single") / "run"
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1)
    try:
        train(
            make_points_config(steps=STEPS, checkpoint_every=5), run, progress=False, verbose=False
        )
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    return run


@pytest.fixture
def points_toml(points_toml) -> Path:
    points_toml.write_text(
        points_toml.read_text().replace("checkpoint_every = 2", "checkpoint_every = 5")
    )
    return points_toml


def test_two_processes_with_half_batches_take_the_steps_of_one_process(
    single_process_run, points_toml, tmp_path
):
    run = tmp_path / "run"
    args = ["train", "--config", str(points_toml), "--steps", str(STEPS), "--run-dir", str(run)]
    proc = torchrun([*args, "-q"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close_weights(single_process_run, run)
    # Only rank 0 wrote: one log row per step, printed once.
    rows = (run / "log.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, STEPS + 1))
    assert proc.stdout.count("run:") == 1


def test_resume_under_torchrun_continues_a_one_process_run(
    single_process_run, points_toml, tmp_path, make_points_config
):
    run = tmp_path / "run"
    train(make_points_config(steps=5, checkpoint_every=5), run, progress=False, verbose=False)
    args = ["train", "--config", str(points_toml), "--steps", str(STEPS), "--run-dir", str(run)]
    proc = torchrun([*args, "-q"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(run)] == [5, 10]
    assert_close_weights(single_process_run, run)


def test_sigterm_under_torchrun_stops_every_rank_at_one_step_with_a_checkpoint(
    points_toml, tmp_path
):
    # As when torchrun passes a preemption's SIGTERM on to its workers: each gets it during step 3.
    run = tmp_path / "run"
    args = ["train", "--config", str(points_toml), "--steps", "1000", "--run-dir", str(run), "-q"]
    proc = torchrun(args, cwd=tmp_path, DDPM_TEST_CRASH="train.step:3:TERM")
    assert proc.returncode != 0  # torchrun reports workers that exit with 143 as failed
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ddpm:")]
    assert len(lines) == 1 and "terminated (SIGTERM) at step 4" in lines[0], lines
    assert [s for s, _ in list_checkpoints(run)] == [4]  # the ranks agreed on the step


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused(
    tmp_path, monkeypatch, make_points_config
):
    from ddpm import distributed

    monkeypatch.setattr(distributed, "setup", lambda device="cpu": distributed.Dist(0, 3))
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        train(make_points_config(steps=1), tmp_path / "run", progress=False, verbose=False)


def test_the_ranks_split_the_global_batch_into_disjoint_equal_shares():
    from ddpm.distributed import Dist

    rows = [list(range(32))[Dist(rank, 4).shard(32)] for rank in range(4)]
    assert rows == [list(range(8 * r, 8 * r + 8)) for r in range(4)]
    assert Dist().shard(32) == slice(0, 32)


def test_the_backend_follows_the_training_device():
    from ddpm.distributed import backend_for

    assert (backend_for("cpu"), backend_for("cuda:1")) == ("gloo", "nccl")


def test_importance_sampled_timesteps_stay_in_step_across_processes(
    points_toml, tmp_path, make_points_config
):
    # Each rank records the losses of the whole global batch, so both keep one history and draw the
    # same t once it is warmed up (T = 100, 10 losses each: after ~60 of the 100 steps of 32).
    steps = "100"
    single = tmp_path / "single"
    torch.set_num_threads(1)
    try:
        config = make_points_config(steps=100, checkpoint_every=50, timestep_sampler="importance")
        train(config, single, progress=False, verbose=False)
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    run = tmp_path / "run"
    args = ["train", "--config", str(points_toml), "--steps", steps, "--run-dir", str(run)]
    proc = torchrun([*args, "--timestep-sampler", "importance", "-q"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert latest_checkpoint(run).tensors["train_state"]["importance.counts"].min() == 10
    assert_close_weights(single, run)


@pytest.mark.parametrize("name", ["WORLD_SIZE", "RANK", "LOCAL_RANK"])
def test_a_malformed_torchrun_variable_is_one_line_before_any_write(
    name, points_toml, tmp_path, monkeypatch, capsys
):
    from ddpm.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(name, "two")
    run = tmp_path / "run"
    assert main(["train", "--config", str(points_toml), "--run-dir", str(run), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ddpm: error: {name} in the environment must be an integer, got 'two'"
    assert not run.exists()
