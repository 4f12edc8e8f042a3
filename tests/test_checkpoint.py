"""Checkpoints: safetensors + JSON round trips, checksums, fallback, pruning, and no pickle ever."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch

from ddpm.checkpoint import (
    atomic_write_bytes,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    optimizer_state_from_flat,
    optimizer_state_to_flat,
    save_checkpoint,
)
from ddpm.errors import CheckpointError


def _module_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.SiLU(), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 3)).pow(2).sum().backward()
        optimizer.step()
    return model, optimizer


def _save(run, step, model, optimizer=None, **kw):
    tensors = {
        "model": model.state_dict(),
        "ema": {k: v * 0.5 for k, v in model.state_dict().items()},
    }
    meta = {}
    if optimizer is not None:
        flat, structure = optimizer_state_to_flat(optimizer.state_dict())
        tensors["optim"] = flat
        meta["optimizer"] = structure
    return save_checkpoint(run, step, tensors, meta, **kw)


def test_round_trip_restores_model_ema_optimizer_and_step(tmp_path):
    model, optimizer = _module_and_optimizer()
    path = _save(tmp_path, 123, model, optimizer)
    ckpt = load_checkpoint(path)
    assert ckpt.step == 123
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt.tensors["model"][k], v)
        assert torch.equal(ckpt.tensors["ema"][k], v * 0.5)

    model2, optimizer2 = _module_and_optimizer(seed=1)
    model2.load_state_dict(ckpt.tensors["model"])
    optimizer2.load_state_dict(
        optimizer_state_from_flat(ckpt.tensors["optim"], ckpt.meta["optimizer"])
    )
    # The restored optimizer takes exactly the step the original takes.
    x = torch.randn(5, 3)
    for m, o in ((model, optimizer), (model2, optimizer2)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_optimizer_flattening_keeps_adamw_state_and_groups():
    _, optimizer = _module_and_optimizer()
    flat, structure = optimizer_state_to_flat(optimizer.state_dict())
    json.dumps(structure)
    assert set(flat) == {
        f"state.{i}.{k}" for i in range(4) for k in ("step", "exp_avg", "exp_avg_sq")
    }
    back = optimizer_state_from_flat(flat, structure)
    assert back["param_groups"][0]["betas"] == optimizer.param_groups[0]["betas"]
    assert back["param_groups"][0]["weight_decay"] == 0.01


def test_corrupt_tensor_file_fails_its_checksum(tmp_path):
    model, _ = _module_and_optimizer()
    path = _save(tmp_path, 1, model)
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)


def test_truncated_tensor_file_is_detected(tmp_path):
    model, _ = _module_and_optimizer()
    path = _save(tmp_path, 1, model)
    f = path / "ema.safetensors"
    f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_latest_falls_back_to_previous_good_checkpoint_with_a_warning(tmp_path):
    model, _ = _module_and_optimizer()
    _save(tmp_path, 1, model)
    bad = _save(tmp_path, 2, model)
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning, match="step_0000002"):
        ckpt = latest_checkpoint(tmp_path)
    assert ckpt.step == 1


def test_no_readable_checkpoint_is_an_error(tmp_path):
    model, _ = _module_and_optimizer()
    bad = _save(tmp_path, 1, model)
    (bad / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        latest_checkpoint(tmp_path)


def test_run_without_checkpoints_has_no_latest(tmp_path):
    assert latest_checkpoint(tmp_path) is None


class _Payload:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt"])
def test_pickle_named_like_a_checkpoint_is_refused_and_not_executed(tmp_path, name):
    marker = tmp_path / "pwned"
    data = pickle.dumps({"weight": _Payload(marker)})
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000001"
    ckpt.mkdir(parents=True)
    (ckpt / name).write_bytes(data)
    # A valid checksum, so that only the format check stands between the file and the loader.
    meta = {
        "format": "ddpm-checkpoint",
        "version": 1,
        "step": 1,
        "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}},
    }
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError):
        latest_checkpoint(tmp_path / "run")
    assert not marker.exists()


def test_keeps_only_the_last_k_checkpoints(tmp_path):
    model, _ = _module_and_optimizer()
    for step in (10, 20, 30, 40):
        _save(tmp_path, step, model, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40]


def test_resaving_a_step_replaces_it_and_leaves_no_temporaries(tmp_path):
    model, _ = _module_and_optimizer()
    _save(tmp_path, 5, model)
    path = _save(tmp_path, 5, model)
    assert load_checkpoint(path).step == 5
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000005"]


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a" / "file.json"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]
