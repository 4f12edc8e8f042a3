"""Shared fixtures for the training, checkpoint, CLI and viz tests: a small, fast, seeded run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ddpm.config import (
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
)

# A shrunken tiny U-Net and a short chain: each training step takes milliseconds on 2 cores.
FAST_MODEL = {"preset": "tiny", "base_channels": 16}
FAST_TRAIN = {
    "batch_size": 32,
    "warmup_steps": 5,
    "log_every": 5,
    "sample_every": 0,
    "sample_steps": 4,
    "checkpoint_every": 0,
    "tensorboard": False,
}
FAST_TOML = """\
[model]
preset = "tiny"
base_channels = 16

[diffusion]
num_timesteps = 100

[train]
batch_size = 32
log_every = 5
sample_steps = 4
tensorboard = false

[sample]
num = 8
steps = 4
"""


def fast_config(**train) -> RunConfig:
    """Digits with the shrunken network, T = 100, no TensorBoard, previews only at the end."""
    return RunConfig(
        model=ModelConfig(**FAST_MODEL),
        diffusion=DiffusionConfig(num_timesteps=100),
        train=TrainConfig(**{**FAST_TRAIN, **train}),
        sample=SampleConfig(num=8, steps=4),
    )


@pytest.fixture
def make_config():
    return fast_config


@pytest.fixture
def fast_toml(tmp_path) -> Path:
    path = tmp_path / "fast.toml"
    path.write_text(FAST_TOML)
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A run directory trained for 30 steps (shared, read-only: copy it before changing it)."""
    from ddpm.train import train

    run = tmp_path_factory.mktemp("trained") / "digits"
    train(fast_config(steps=30), run, progress=False, verbose=False)
    return run


def cond_config(**train) -> RunConfig:
    """``fast_config`` made class-conditional (``--cond class``: the digits' 10 labels)."""
    config = fast_config(**train)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, cond="class"))


@pytest.fixture(scope="session")
def cond_run(tmp_path_factory) -> Path:
    """A class-conditional run directory trained for 30 steps (shared, read-only)."""
    from ddpm.train import train

    run = tmp_path_factory.mktemp("trained_cond") / "digits"
    train(cond_config(steps=30), run, progress=False, verbose=False)
    return run


# 2-D points and a small MLP: a step is a fraction of a millisecond, and the data need no sklearn.
POINTS_TOML = """\
[data]
name = "8gaussians"
num_points = 256

[model]
hidden = 32
num_layers = 2

[diffusion]
num_timesteps = 100

[train]
batch_size = 32
warmup_steps = 2
log_every = 1
sample_every = 0
sample_steps = 4
checkpoint_every = 2
keep_checkpoints = 2
tensorboard = false

[sample]
num = 16
steps = 4
"""


def points_run_config(**train_options) -> RunConfig:
    """The run POINTS_TOML describes, with train options replaced."""
    train_values = dict(
        batch_size=32,
        warmup_steps=2,
        log_every=1,
        sample_every=0,
        sample_steps=4,
        checkpoint_every=2,
        keep_checkpoints=2,
        tensorboard=False,
    )
    return RunConfig(
        data=DataConfig(name="8gaussians", num_points=256),
        model=ModelConfig(hidden=32, num_layers=2),
        diffusion=DiffusionConfig(num_timesteps=100),
        train=TrainConfig(**{**train_values, **train_options}),
        sample=SampleConfig(num=16, steps=4),
    )


@pytest.fixture
def points_toml(tmp_path) -> Path:
    path = tmp_path / "points.toml"
    path.write_text(POINTS_TOML)
    return path


@pytest.fixture(scope="session")
def make_points_config():
    return points_run_config


# Every device this machine has: device tests are parametrised over it, so the same suite exercises
# CUDA (and MPS) where present and the CPU everywhere.
def _devices() -> list[str]:
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


DEVICES = _devices()


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """One OpenMP thread for a module of tiny-tensor tests: a second thread only adds
    synchronisation (and stalls badly under load). Use with ``pytestmark``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
