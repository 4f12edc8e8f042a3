"""Checkpoints: tensors in safetensors, everything else in JSON, sha256-checked, written atomically.

A checkpoint is a directory ``RUN/checkpoints/step_XXXXXXX/`` holding one ``<group>.safetensors`` per
tensor group (the trainer uses ``model``, ``ema`` and ``train_state``) and ``meta.json``: the step, the
sha256 and size of every tensor file, and whatever JSON the caller adds. Nothing is ever unpickled:
safetensors files hold only raw tensors, so loading one cannot run code.

Atomicity: the files are written (flushed, fsynced) into a hidden temporary directory next to the
final one, which is then renamed into place, so a checkpoint directory is either complete or absent.
Loading verifies every checksum; ``latest_checkpoint`` falls back to the newest checkpoint that
verifies, warning about each one it skips.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ddpm.errors import CheckpointError

Tensor = torch.Tensor

CHECKPOINT_DIR = "checkpoints"
META_FILE = "meta.json"
FORMAT = "ddpm-checkpoint"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


# --------------------------------------------------------------------------------------------------
# atomic files
# --------------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some file systems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Crash injection, for the tests of crash safety only: DDPM_TEST_CRASH="<point>:<n>[:<signal>]" sends
# the signal (default KILL) to this process the n-th time it reaches <point>:
#   checkpoint.write   half of a file written (a checkpoint's tensors or meta.json, config.json, ...)
#   checkpoint.rename  every file of a checkpoint written, the directory not yet renamed into place
#   checkpoint.prune   the new checkpoint in place, older ones not yet deleted
#   train.step         the optimizer has stepped; the EMA and the step count not yet
# Unset, it costs one environment lookup.
CRASH_ENV = "DDPM_TEST_CRASH"
_crash_counts: dict[str, int] = {}


def crash_point(point: str) -> None:
    spec = os.environ.get(CRASH_ENV)
    if not spec or not spec.startswith(point + ":"):
        return
    n, _, signame = spec[len(point) + 1 :].partition(":")
    _crash_counts[point] = _crash_counts.get(point, 0) + 1
    if _crash_counts[point] == int(n):
        import signal

        os.kill(os.getpid(), getattr(signal, f"SIG{signame or 'KILL'}"))


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        half = len(data) // 2
        f.write(data[:half])
        f.flush()
        crash_point("checkpoint.write")
        f.write(data[half:])
        f.flush()
        os.fsync(f.fileno())


def _naming(err: OSError, path: Path) -> OSError:
    """The error, naming the file being written: not our hidden temporary file (``.name.tmp-PID``),
    nor nothing (a failed write(): disk full, ...)."""
    return type(err)(err.errno, err.strerror, str(path))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write data to path via a temporary file in the same directory, fsync, and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
    except OSError as err:
        raise _naming(err, path) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


# --------------------------------------------------------------------------------------------------
# optimizer state <-> flat tensors + JSON
# --------------------------------------------------------------------------------------------------


def optimizer_state_to_flat(
    state_dict: Mapping[str, Any],
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into flat tensors {"state.<param>.<key>": tensor} and a JSON-able
    structure (param_groups, and the non-tensor per-parameter values). For AdamW the tensors are
    step, exp_avg and exp_avg_sq of each parameter."""
    tensors: dict[str, Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for pid, entries in state_dict["state"].items():
        state[str(pid)] = {}
        for key, value in entries.items():
            if isinstance(value, Tensor):
                name = f"state.{pid}.{key}"
                tensors[name] = value
                state[str(pid)][key] = {"tensor": name}
            else:
                state[str(pid)][key] = {"value": value}
    groups = []
    for group in state_dict["param_groups"]:
        g = {}
        for key, value in group.items():
            if isinstance(value, Tensor):
                if value.numel() != 1:
                    raise CheckpointError(
                        f"optimizer param_group entry {key!r} is a non-scalar tensor"
                    )
                value = value.item()
            g[key] = list(value) if isinstance(value, tuple) else value
        groups.append(g)
    structure = {"state": state, "param_groups": groups}
    json.dumps(structure)  # fail here, not half-way through writing, if something is not JSON-able
    return tensors, structure


def optimizer_state_from_flat(
    tensors: Mapping[str, Tensor], structure: Mapping[str, Any]
) -> dict[str, Any]:
    """Inverse of ``optimizer_state_to_flat``: a dict for ``optimizer.load_state_dict``."""
    try:
        state = {}
        for pid, entries in structure["state"].items():
            state[int(pid)] = {
                key: tensors[spec["tensor"]] if "tensor" in spec else spec["value"]
                for key, spec in entries.items()
            }
        groups = [dict(g) for g in structure["param_groups"]]
        for g in groups:
            if isinstance(g.get("betas"), list):
                g["betas"] = tuple(g["betas"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(
            f"optimizer state is malformed ({type(err).__name__}: {err})"
        ) from None
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------------


class Checkpoint(NamedTuple):
    """A loaded (and verified) checkpoint: its directory, step, tensor groups and JSON metadata."""

    path: Path
    step: int
    tensors: dict[str, dict[str, Tensor]]
    meta: dict[str, Any]


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:07d}"


def _serialize(tensors: Mapping[str, Tensor]) -> bytes:
    from safetensors.torch import save

    # clone: safetensors refuses tensors that share storage (tied weights, views of one buffer)
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return save(flat)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    tensors: Mapping[str, Mapping[str, Tensor]],
    meta: Mapping[str, Any] | None = None,
    *,
    keep: int | None = None,
) -> Path:
    """Write ``RUN/checkpoints/step_XXXXXXX/`` with ``<group>.safetensors`` per tensor group and
    ``meta.json`` (step, checksums, and ``meta``), atomically; then delete all but the newest ``keep``
    checkpoints (if given). Returns the checkpoint directory."""
    final = checkpoint_dir(run_dir, step)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        files = {}
        for group, group_tensors in tensors.items():
            if not re.fullmatch(r"[A-Za-z0-9_]+", group):
                raise ValueError(f"bad tensor group name {group!r}")
            data = _serialize(group_tensors)
            name = f"{group}.safetensors"
            _write_synced(tmp / name, data)
            files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        record = {"format": FORMAT, "version": FORMAT_VERSION, "step": int(step), "files": files}
        record.update(meta or {})
        _write_synced(tmp / META_FILE, (json.dumps(record, indent=2) + "\n").encode())
        _fsync_dir(tmp)
        crash_point("checkpoint.rename")
        if (
            final.exists()
        ):  # re-saving a step: move the old one aside first (rename onto a dir fails)
            old = parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(parent)
    except OSError as err:
        raise _naming(err, final) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    crash_point("checkpoint.prune")
    if keep is not None:
        prune_checkpoints(run_dir, keep)
    return final


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, directory) of every checkpoint directory in the run, oldest first (not verified)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and leftovers of interrupted saves."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    for _, path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    root = Path(run_dir) / CHECKPOINT_DIR
    for p in root.glob(".step_*.tmp-*"):
        if not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: str | os.PathLike, groups: tuple[str, ...] | None = None) -> Checkpoint:
    """Load and verify a checkpoint directory: every listed tensor file must exist and match its sha256.

    ``groups`` limits which tensor groups are read (e.g. ``("ema",)`` for sampling); the others are still
    listed in ``meta``. Raises ``CheckpointError`` (one line) for anything missing, corrupt or unsafe."""
    from safetensors.torch import load

    path = Path(path)
    meta_path = path / META_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    try:
        meta = json.loads(meta_path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: incomplete checkpoint (no {META_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta_path}: corrupt metadata ({err})") from None
    if (
        not isinstance(meta, dict)
        or meta.get("format") != FORMAT
        or not isinstance(meta.get("files"), dict)
    ):
        raise CheckpointError(f"{meta_path}: not a ddpm checkpoint")
    version, step = meta.get("version", 0), meta.get("step", -1)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (version, step)) or not all(
        isinstance(info, dict) and isinstance(info.get("sha256"), str)
        for info in meta["files"].values()
    ):
        raise CheckpointError(f"{meta_path}: corrupt metadata (version, step or files)")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version} is newer than this ddpm reads")
    tensors = {}
    for name, info in meta["files"].items():
        group = name.removesuffix(".safetensors")
        if groups is not None and group not in groups:
            continue
        if "/" in name or "\\" in name or not name.endswith(".safetensors"):
            raise CheckpointError(f"{meta_path}: bad file name {name!r}")
        try:
            # Read once, hash and parse the same bytes: what was verified is what is loaded.
            data = (path / name).read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing {name}") from None
        if hashlib.sha256(data).hexdigest() != info.get("sha256"):
            raise CheckpointError(f"{path / name}: checksum mismatch (corrupt or truncated file)")
        try:
            tensors[group] = load(data)
        except (
            Exception
        ) as err:  # safetensors raises its own error types; never fall back to pickle
            raise CheckpointError(f"{path / name}: not a valid safetensors file ({err})") from None
    if groups is not None and (missing := set(groups) - set(tensors)):
        raise CheckpointError(f"{path}: no tensor group(s) {', '.join(sorted(missing))}")
    return Checkpoint(path, step, tensors, meta)


def latest_checkpoint(
    run_dir: str | os.PathLike, groups: tuple[str, ...] | None = None
) -> Checkpoint | None:
    """The newest checkpoint of the run that loads and verifies, or None if the run has none.

    A corrupt newer checkpoint is skipped with a ``RuntimeWarning``; if every one is corrupt,
    ``CheckpointError``."""
    found = list_checkpoints(run_dir)
    errors = []
    for _step, path in reversed(found):
        try:
            ckpt = load_checkpoint(path, groups)
        except CheckpointError as err:
            errors.append(str(err))
            continue
        for msg in errors:
            warnings.warn(
                f"skipping a bad checkpoint: {msg}; using {path.name}", RuntimeWarning, stacklevel=2
            )
        return ckpt
    if errors:
        raise CheckpointError(
            f"no readable checkpoint in {Path(run_dir) / CHECKPOINT_DIR}: {errors[0]}"
        )
    return None
