"""Run directories: what a run is made of, and what can be done with a trained one.

A run directory holds everything (``ddpm.train`` writes it)::

    RUN/config.json                       the resolved RunConfig (+ its format version)
    RUN/log.csv                           step, loss, lr, grad_norm, images_per_s, elapsed_s
    RUN/tb/                               TensorBoard scalars (if tensorboard is installed)
    RUN/samples/step_XXXXXXX.png          previews (EMA, short respaced chain); the last one is the
                                          full chain, the same picture as ``ddpm sample RUN``
    RUN/checkpoints/step_XXXXXXX/         model, ema, train_state .safetensors + meta.json (last K)
    RUN/generated/                        ``ddpm sample`` output (PNG grid + .npz)

This module builds the network and the schedule of a config, reads a run back (its config, its newest
good checkpoint's network), samples from it, describes it, and draws the forward process on real data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpm import viz
from ddpm.checkpoint import (
    Checkpoint,
    atomic_write_bytes,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from ddpm.config import (
    MLP_FIELDS,
    SAMPLER_OPTIONS,
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
    merge_config,
    sampler_takes,
)
from ddpm.data import load_dataset
from ddpm.devices import (
    BatchThreads,
    at_precision,
    default_sample_batch,
    parse_batch_threads,
    resolve_batch_threads,
    resolve_device,
    resolve_precision,
    split_batch,
)
from ddpm.errors import CheckpointError, ConfigError, DDPMError, RunDirError
from ddpm.guidance import classifier_free_guidance
from ddpm.nets import MLP, UNET_PRESETS, UNet, build_unet
from ddpm.objective import Objective
from ddpm.samplers import DEFAULT_GRIDS, SAMPLERS, SamplerOutput, sample, timestep_grid
from ddpm.schedules import NoiseSchedule

Tensor = torch.Tensor

CONFIG_FILE = "config.json"
LOG_FILE = "log.csv"
# The layout of a run directory, saved in its config.json: a run written by a ddpm with another format is
# refused rather than misread. Runs from before the key existed are format 1.
RUN_FORMAT_KEY = "run_format"
RUN_FORMAT_VERSION = 1
# A registry of network classes by a short key, stored in checkpoints (never an import path).
ARCHS: dict[str, type[torch.nn.Module]] = {"unet": UNet, "mlp": MLP}
PREVIEW_IMAGES = 64
PREVIEW_POINTS = 2000
CLASS_GRID_DEFAULT = 8  # samples per class of ``ddpm sample --class all``
CLASS_GRID_COLUMNS = 16  # ... of which at most this many per row of the picture


def build_model(
    model_cfg: ModelConfig, *, kind: str, sample_shape: tuple[int, ...], learn_sigma: bool
) -> torch.nn.Module:
    """The network of a resolved ModelConfig for data of the given kind and shape (no batch dim)."""
    overrides = model_cfg.overrides()
    preset = model_cfg.preset
    if model_cfg.num_classes is not None:  # a class-conditional network (model.cond = "class")
        overrides["num_classes"] = model_cfg.num_classes
    if preset == "mlp":
        if bad := sorted(set(overrides) - {*MLP_FIELDS, "num_classes"}):
            raise ConfigError(f"model option '{bad[0]}' does not apply to the mlp")
        return MLP(dim=int(sample_shape[0]), learn_sigma=learn_sigma, **overrides)
    if preset not in UNET_PRESETS:
        raise ConfigError(
            f"unknown model {preset!r}; known: {', '.join([*sorted(UNET_PRESETS), 'mlp'])}"
        )
    if bad := sorted(set(overrides) & set(MLP_FIELDS)):
        raise ConfigError(f"model option '{bad[0]}' applies only to the mlp")
    channels, height, width = sample_shape
    if height != width:
        raise ConfigError(f"the U-Net needs square images, got {height}x{width}; set an image size")
    return build_unet(
        preset, in_channels=channels, image_size=height, learn_sigma=learn_sigma, **overrides
    )


def build_schedule(diffusion: DiffusionConfig) -> NoiseSchedule:
    try:
        return NoiseSchedule.from_name(
            diffusion.schedule,
            diffusion.num_timesteps,
            zero_terminal_snr=diffusion.zero_terminal_snr,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None


def arch_of(model: torch.nn.Module) -> str:
    for key, cls in ARCHS.items():
        if isinstance(model, cls):
            return key
    raise TypeError(f"no registered architecture for {type(model).__name__}")


def model_from_meta(meta: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the network described by a checkpoint's meta.json (weights not loaded)."""
    try:
        arch, net_config = meta["model"]["arch"], meta["model"]["config"]
    except (KeyError, TypeError):
        raise RunDirError(
            "the checkpoint does not describe its network (no model.arch/config)"
        ) from None
    if arch not in ARCHS:
        raise RunDirError(f"unknown network {arch!r} in the checkpoint; known: {', '.join(ARCHS)}")
    if not isinstance(net_config, dict):
        raise CheckpointError("the checkpoint's model.config is not a table of settings")
    try:
        return ARCHS[arch](**net_config)
    except ConfigError as err:
        raise CheckpointError(f"the checkpoint's network settings are invalid: {err}") from None
    except (TypeError, ValueError, ZeroDivisionError, RuntimeError) as err:  # a corrupt meta.json
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"the checkpoint's network settings are invalid ({first})") from None


def load_weights(module: torch.nn.Module, tensors: dict[str, Tensor], what: str) -> None:
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        # torch's first line only names the module; the next says which tensors differ
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        detail = "; ".join(lines[1:3]) if len(lines) > 1 else lines[0] if lines else "mismatch"
        raise CheckpointError(f"{what} weights do not fit the network: {detail[:300]}") from None


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The config.json of a run directory; RunDirError if the directory is not a run."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is a file, not a run directory")
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not a ddpm run directory (no {CONFIG_FILE})")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunDirError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: not a ddpm run configuration")
    version = data.pop(RUN_FORMAT_KEY, 1)
    if version != RUN_FORMAT_VERSION:
        raise RunDirError(
            f"{run_dir} is a run directory of format {version!r}, this ddpm reads format "
            f"{RUN_FORMAT_VERSION}; use the ddpm version that wrote it, or a new --run-dir"
        )
    sample = data.get("sample")
    if isinstance(sample, dict) and "precision" not in sample:
        data["sample"] = {**sample, "precision": "fp32"}  # saved before sample.precision: fp32
    try:
        return RunConfig.from_dict(data, str(path))
    except ConfigError as err:
        raise RunDirError(f"{path}: {err}") from None


def save_run_config(config: RunConfig, path: Path) -> None:
    record = {RUN_FORMAT_KEY: RUN_FORMAT_VERSION, **config.to_dict()}
    atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())


# --------------------------------------------------------------------------------------------------
# the parts of a run, built from its config in one place
# --------------------------------------------------------------------------------------------------


def load_data(config: RunConfig, split: str | None = None, *, seed: int | None = None):
    """The run's data set (``split`` None: the one it trains on), as every command loads it."""
    d = config.data
    return load_dataset(
        d.name,
        split=d.split if split is None else split,
        root=d.root,
        image_size=d.image_size,
        num_points=d.num_points,
        seed=config.train.seed if seed is None else seed,
    )


def build_objective(config: RunConfig, kind: str) -> Objective:
    """The training objective of a resolved config, for data of the given kind."""
    dc, tc = config.diffusion, config.train
    return Objective(
        build_schedule(dc),
        prediction=dc.prediction,
        variance=dc.variance,
        loss=dc.objective,
        vlb_weight=tc.vlb_weight,
        min_snr_gamma=tc.min_snr_gamma,
        offset_noise=tc.offset_noise,
        decoder="gaussian" if kind == "points" else "discretized",
        timestep_sampler=tc.timestep_sampler,
        null_label=config.model.num_classes if config.model.cond == "class" else None,
        cond_drop=tc.cond_drop,
    )


def class_names(dataset) -> tuple[str, ...]:
    """The names of a labelled data set's classes ("0", "1", ... where it has none)."""
    return dataset.class_names or tuple(str(i) for i in range(dataset.num_classes))


def data_meta(config: RunConfig, dataset) -> dict[str, Any]:
    """What a checkpoint's meta.json says about the data: name, kind, the shape of one example and,
    for a class-conditional run, the number of classes and their names (label i is class_names[i])."""
    meta = {
        "name": config.data.name,
        "kind": dataset.kind,
        "sample_shape": list(dataset.sample_shape),
    }
    if config.model.cond == "class":
        meta.update(num_classes=dataset.num_classes, class_names=list(class_names(dataset)))
    return meta


def sampler_options(config: RunConfig, *, is_image: bool) -> dict[str, Any]:
    """The keyword arguments of ``ddpm.samplers.sample`` that a run's [diffusion] and [sample] give:
    prediction, variance, clipping / dynamic thresholding (images only) and the sampler's own options."""
    sc = config.sample
    return {
        "prediction": config.diffusion.prediction,
        "variance": config.diffusion.variance,
        "clip_x0": sc.clip_x0 and is_image,
        "dynamic_threshold": sc.dynamic_threshold if is_image else None,
        **sc.sampler_options(),
    }


def iter_samples(
    model,
    schedule: NoiseSchedule,
    shape,
    config: RunConfig,
    *,
    num: int,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    record=(),
    progress: bool = False,
    class_labels: Tensor | None = None,
    threads: int | str | BatchThreads = "auto",
):
    """The one way a run is sampled (training previews, ``ddpm sample``, ``ddpm eval``): ``num``
    samples with the run's [sample] settings (``config.sample``: sampler, grid, options) on ``steps``
    points (None: the sample config's steps, else all T), in batches of ``batch_size`` (bounded
    memory; default by device, ``devices.default_sample_batch``), yielding one ``SamplerOutput`` per
    batch. One CPU generator seeded with ``seed`` draws x_T and every z of all batches in turn, so the
    samples are the same on every device for a given (seed, batch_size).

    A class-conditional model samples sample i of class ``class_labels[i]`` ([num]; None: the
    config's ``sample.class_label`` for all, or unconditionally when that is None too) with
    classifier-free guidance at scale ``sample.guidance`` (None: 1, plain conditional), whatever
    the sampler: the guided model is what the sampler calls (``ddpm.guidance``).

    ``threads``: on a CPU each network evaluation is computed in row shares on that many threads
    (``devices.BatchThreads``; "auto": two for an image network); samples equal the
    whole batch's up to float rounding."""
    if class_labels is None:
        class_labels = class_labels_for(model, num, config.sample.class_label)
    scale = 1.0 if config.sample.guidance is None else config.sample.guidance
    device = torch.device(device) if device is not None else _device_of(model)
    is_image = len(shape) > 1
    T = schedule.num_timesteps
    steps = config.sample.steps if steps is None else steps
    steps = T if steps is None else min(int(steps), T)
    if batch_size is None:
        batch_size = default_sample_batch(device, "image" if is_image else "points")
    generator = torch.Generator().manual_seed(seed)
    options = sampler_options(config, is_image=is_image)
    precision = resolve_precision(config.sample.precision, device, images=is_image)
    own = not isinstance(threads, BatchThreads)
    if own:
        threads = BatchThreads(resolve_batch_threads(threads, device, images=is_image))
    network = split_batch(
        at_precision(sampling_network(model, device, precision), device, precision), threads
    )
    bar = tqdm(total=num, desc="sampling", unit="sample", disable=not progress, dynamic_ncols=True)
    try:
        for start in range(0, num, batch_size):
            n = min(batch_size, num - start)
            net = network
            if class_labels is not None:
                labels = class_labels[start : start + n].to(device)
                net = classifier_free_guidance(network, labels, scale, model.null_label)
            yield sample(
                net,
                schedule,
                (n, *shape),
                sampler=config.sample.sampler,
                num_steps=steps,
                grid=config.sample.grid,
                generator=generator,
                device=device,
                record=record if start == 0 else (),
                progress=progress and num <= batch_size,
                **options,
            )
            bar.update(n)
    finally:
        bar.close()
        if own:
            threads.close()


def sampling_network(model, device: torch.device, precision: str):
    """The network a sampler calls: on a CPU in bf16, our U-Net's channels_last copy (faster per
    evaluation: ``UNet.channels_last_copy``, benchmarks/eval_layout.py); anything else, ``model``
    itself (in fp32 on a CPU channels_last was not faster; GPUs are left as they are: not measured)."""
    if device.type == "cpu" and precision == "bf16" and isinstance(model, UNet):
        return model.channels_last_copy()
    return model


def draw(model, schedule: NoiseSchedule, shape, config: RunConfig, *, num, **options):
    """All ``num`` samples of ``iter_samples`` as one SamplerOutput (x0 on the CPU, float32; the
    trajectory of the first batch)."""
    parts = list(iter_samples(model, schedule, shape, config, num=num, **options))
    x0 = torch.cat([p.x0.float().cpu() for p in parts])
    return SamplerOutput(x0, parts[0].trajectory if parts else {})


def class_labels_for(model, num: int, class_label: int | str | None) -> Tensor | None:
    """The class of each of ``num`` samples of ``model``: None (unconditional) for ``class_label``
    None, one class for all, or for "all" every class in turn, in equal contiguous blocks (num =
    n num_classes gives n of class 0, then n of class 1, ...: the rows of a class grid). A class
    for a network without classes, or out of range, is a one-line ConfigError."""
    if class_label is None:
        return None
    k = getattr(model, "num_classes", None)
    if k is None:
        raise ConfigError(
            "this run is not class-conditional (trained without --cond class); --class and "
            "--guidance need one that is"
        )
    if class_label == "all":
        return torch.arange(num) * k // num
    if (
        isinstance(class_label, bool)
        or not isinstance(class_label, int)
        or not 0 <= class_label < k
    ):
        raise ConfigError(
            f"class {class_label!r} is out of range: the run has {k} classes, 0..{k - 1}"
        )
    return torch.full((num,), class_label, dtype=torch.long)


def parse_class(value: int | str | None, names: list[str] | None) -> int | str | None:
    """A class given by the user: None, an index, "all", or one of the run's class names."""
    if value is None or isinstance(value, int) or value == "all":
        return value
    if names and value in names:
        return names.index(value)
    try:
        return int(value)
    except ValueError:
        known = f"; known: {', '.join(names)}" if names else ""
        raise ConfigError(f"unknown class {value!r} (an index, a name or 'all'{known})") from None


def _device_of(model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def default_num(shape) -> int:
    return PREVIEW_IMAGES if len(shape) > 1 else PREVIEW_POINTS


def save_samples(
    x0: Tensor, path: Path, reference: Tensor | None = None, title: str | None = None
) -> Path:
    if x0.ndim == 2:
        return viz.save_scatter(x0, path, reference=reference, title=title)
    return viz.save_image_grid(x0, path)


class SampleResult(NamedTuple):
    """Paths written by ``sample_run`` and the samples its PNG shows ([N, C, H, W], the first 64, or
    [N, D], the first batch; float): the rest went straight to the .npz."""

    png: Path
    npz: Path
    trajectory_png: Path | None
    step: int
    x0: Tensor
    num: int = 0  # samples in the .npz
    shown: int = 0  # of which the PNG shows the first


class LoadedRun(NamedTuple):
    """A trained run read back: its config, newest good checkpoint, network (eval mode, on ``device``),
    schedule, and what its data look like."""

    config: RunConfig
    checkpoint: Checkpoint
    model: torch.nn.Module
    schedule: NoiseSchedule
    kind: str
    sample_shape: tuple[int, ...]
    device: torch.device


def load_run(
    run_dir: str | Path, *, use_ema: bool = True, device: torch.device | str | None = "auto"
) -> LoadedRun:
    """The network of the newest good checkpoint of a run (EMA weights by default) on ``device``."""
    device = resolve_device(device)
    model, config, ckpt = load_run_model(run_dir, use_ema=use_ema)
    data = ckpt.meta.get("data", {})
    shape = tuple(int(s) for s in data.get("sample_shape", ()))
    kind = data.get("kind", "image" if len(shape) > 1 else "points")
    return LoadedRun(
        config, ckpt, model.to(device), build_schedule(config.diffusion), kind, shape, device
    )


def load_run_model(
    run_dir: str | Path, *, use_ema: bool = True
) -> tuple[torch.nn.Module, RunConfig, Checkpoint]:
    """The network of the newest good checkpoint of a run (EMA weights by default), in eval mode."""
    config = load_run_config(run_dir)
    if not list_checkpoints(run_dir):
        raise RunDirError(f"{run_dir} has no checkpoint yet; train it first")
    group = "ema" if use_ema else "model"
    ckpt = latest_checkpoint(run_dir, groups=(group,))
    model = model_from_meta(ckpt.meta)
    load_weights(model, ckpt.tensors[group], group)
    return model.eval().requires_grad_(False), config, ckpt


def sample_run(
    run_dir: str | Path,
    *,
    num: int | None = None,
    steps: int | None = None,
    seed: int | None = None,
    use_ema: bool | None = None,
    out_dir: str | Path | None = None,
    trajectory: bool = False,
    progress: bool = True,
    device: torch.device | str | None = "auto",
    batch_size: int | None = None,
    class_label: int | str | None = None,
    guidance: float | None = None,
    batch_threads: int | str = "auto",
    **sample_options,
) -> SampleResult:
    """Draw samples from a trained run and write ``<out_dir>/step_XXXXXXX_seedS.png`` (a grid of the
    first 64 images, or a scatter) and ``.npz`` (``x0`` float32 as sampled; for images also
    ``images``, uint8 [N, H, W, C]), plus, with ``trajectory``, a picture of the reverse process.
    Samples are drawn ``batch_size`` at a time and streamed to disk, so memory stays bounded whatever
    ``num``; the .npz appears complete or not at all. Unset options come from the run's [sample]
    config; ``out_dir`` defaults to RUN/generated. ``sample_options`` override other [sample] keys
    (sampler, grid, eta, order, clip_x0, dynamic_threshold); None leaves a key as the run has it.

    Class-conditional runs: ``class_label`` (an index, a class name, or "all": ``num`` samples of
    every class, default 8, drawn as a grid with one row per class named by the run's class names)
    with classifier-free guidance at scale ``guidance`` (default: [sample] guidance, else 1); the
    .npz then holds ``labels`` too. ``batch_threads``: see ``iter_samples``' ``threads``."""
    batch_threads = parse_batch_threads(batch_threads)
    given = {"num": num, "steps": steps, "seed": seed, "use_ema": use_ema, "guidance": guidance}
    sc = _sample_config(run_dir, {**given, **sample_options})
    _check_batch_size(batch_size)
    check_out_dir(out_dir)
    plan = _plan_samples(
        run_dir, sc, device, steps=steps, class_label=class_label, guidance=guidance
    )
    run, labelled = plan.run, plan.class_labels is not None
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "generated"
    stem = _sample_stem(run.checkpoint.step, sc, plan.num_steps, plan.label, labelled)
    columns = _npz_columns(run.sample_shape, plan.num, labelled=labelled)
    check_disk_space(out_dir, _npz_bytes(columns, run.sample_shape, plan.num))
    grid = sc.grid or DEFAULT_GRIDS[sc.sampler]
    trajectory_labels = _trajectory_labels(run.schedule, plan.num_steps, grid)
    record = list(trajectory_labels) if trajectory else ()
    batches = _sample_batches(
        plan, batch_size=batch_size, record=record, progress=progress, threads=batch_threads
    )
    preview = _Preview(len(run.sample_shape) > 1, plan.per_class if plan.label == "all" else None)
    npz = write_npz_stream(
        out_dir / f"{stem}.npz", columns, _npz_rows(batches, plan.class_labels, preview)
    )
    shown, png = _save_preview(
        preview,
        out_dir / f"{stem}.png",
        step=run.checkpoint.step,
        class_names=plan.class_names,
        num_classes=getattr(run.model, "num_classes", None),
    )
    traj_png = None
    if trajectory:
        traj_png = viz.save_trajectory(
            preview.trajectory, out_dir / f"{stem}_trajectory.png", labels=trajectory_labels
        )
    return SampleResult(png, npz, traj_png, run.checkpoint.step, shown, plan.num, len(shown))


class _SamplePlan(NamedTuple):
    """What ``sample_run`` draws: from which run, with which [sample] settings, on how many steps,
    how many samples (``per_class`` of each class with --class all) and of which classes."""

    run: LoadedRun
    sc: SampleConfig
    num_steps: int
    label: int | str | None  # a class index, "all", or None (unconditional or the null class)
    num: int
    per_class: int
    class_labels: Tensor | None  # [num]; None: unconditional
    class_names: list[str] | None


def _check_batch_size(batch_size: int | None) -> None:
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")


# What an --out that names a file ends in (the commands write these under their own names).
_FILE_SUFFIXES = (".npz", ".png", ".npy", ".jpg", ".json", ".csv")


def check_out_dir(out_dir: str | Path | None) -> None:
    """``out_dir`` is a folder (the file names carry the step, seed and sampler): a path that names
    a file, or ends like one that does not exist yet, is refused rather than made into a folder."""
    if out_dir is None:
        return
    if isinstance(out_dir, str) and not out_dir.strip():
        raise ConfigError("--out is empty; name the folder to write into")
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"--out {path} is a file; it must be a folder (the files get their own names)"
        )
    if not path.exists() and path.suffix.lower() in _FILE_SUFFIXES:
        raise ConfigError(
            f"--out {path} looks like a file name; it is the folder to write into (the files get "
            "their names from the step, seed and protocol)"
        )


def _plan_samples(
    run_dir: str | Path,
    sc: SampleConfig,
    device: torch.device | str | None,
    *,
    steps: int | None,
    class_label: int | str | None,
    guidance: float | None,
) -> _SamplePlan:
    """Load the run and resolve what to draw (``steps``, ``class_label``, ``guidance``: as given to
    ``sample_run``, checked against the run)."""
    run = load_run(run_dir, use_ema=sc.use_ema, device=device)
    T = run.schedule.num_timesteps
    if steps is not None and steps > T:
        raise ConfigError(f"steps must be at most T={T}, got {steps}")
    num_steps = T if sc.steps is None else min(sc.steps, T)  # the [sample] default may exceed T
    names = run.checkpoint.meta.get("data", {}).get("class_names")
    label = parse_class(sc.class_label if class_label is None else class_label, names)
    if label is None and guidance is not None:
        raise ConfigError("--guidance needs --class (a class index, name or 'all')")
    num, per_class = _num_samples(sc, run.sample_shape, label, run.model)
    class_labels = class_labels_for(run.model, num, label)
    return _SamplePlan(run, sc, num_steps, label, num, per_class, class_labels, names)


def _npz_bytes(columns: dict[str, tuple], shape, num: int) -> int:
    """A bound on the bytes of ``sample_run``'s .npz: every column as large as x0 in its dtype."""
    itemsizes = sum(np.dtype(dtype).itemsize for dtype, _ in columns.values())
    return itemsizes * math.prod(shape) * num


def _sample_batches(plan: _SamplePlan, *, batch_size: int | None, record, progress: bool, threads):
    """``iter_samples`` of the plan: its run's network and schedule with its [sample] settings."""
    run = plan.run
    return iter_samples(
        run.model,
        run.schedule,
        run.sample_shape,
        dataclasses.replace(run.config, sample=plan.sc),
        num=plan.num,
        steps=plan.num_steps,
        seed=plan.sc.seed,
        batch_size=batch_size,
        device=run.device,
        record=record,
        progress=progress,
        class_labels=plan.class_labels,
        threads=threads,
    )


def _sample_config(run_dir: str | Path, given: dict[str, Any]) -> SampleConfig:
    """The run's [sample] section with the options given (None leaves a key as the run has it)."""
    overrides = {"sample": {k: v for k, v in given.items() if v is not None}}
    sc = merge_config(load_run_config(run_dir), overrides, "sample options").sample
    check_sampler_options(sc.sampler, given)
    return sc


def check_sampler_options(sampler: str, given: dict[str, Any]) -> None:
    """Refuse an option given for a sampler that does not take it (eta: DDIM; order: DPM-Solver++,
    its SDE form and UniPC): ignored silently, ``--sampler unipc --eta 0.5`` would look as if it
    had done something."""
    for name in SAMPLER_OPTIONS:
        if given.get(name) is not None and not sampler_takes(sampler, name):
            takers = [s for s in SAMPLERS if sampler_takes(s, name)]
            raise ConfigError(
                f"{name} is an option of the {', '.join(takers)} sampler{'s' * (len(takers) > 1)}; "
                f"{sampler!r} takes none"
            )


def _num_samples(sc: SampleConfig, shape, label: int | str | None, model) -> tuple[int, int]:
    """How many samples to draw, and how many of each class with --class all."""
    per_class = CLASS_GRID_DEFAULT if sc.num is None else sc.num
    num = default_num(shape) if sc.num is None else sc.num
    if label == "all":
        num = per_class * model.num_classes if model.num_classes else num
    return num, per_class


def _sample_stem(step: int, sc: SampleConfig, num_steps: int, label, conditional: bool) -> str:
    how = "" if sc.sampler == "ancestral" else f"_{sc.sampler}{num_steps}"
    if conditional:
        how += f"_class{label}_w{1.0 if sc.guidance is None else sc.guidance:g}"
    return f"step_{step:07d}_seed{sc.seed}{how}" + ("" if sc.use_ema else "_raw")


def _npz_columns(shape, num: int, *, labelled: bool) -> dict[str, tuple]:
    """The arrays of ``sample_run``'s .npz, {name: (dtype, shape)}."""
    columns = {"x0": (np.float32, (num, *shape))}
    if len(shape) > 1:
        columns["images"] = (np.uint8, (num, shape[1], shape[2], shape[0]))
    if labelled:
        columns["labels"] = (np.int64, (num,))
    return columns


def _trajectory_labels(schedule: NoiseSchedule, num_steps: int, grid: str) -> dict[int, str]:
    """The sampling steps a trajectory picture shows (at most 9, evenly spaced, both ends included),
    each labelled with its paper step t on the chain's grid."""
    T = schedule.num_timesteps
    kept = timestep_grid(schedule, num_steps, grid) if num_steps < T else torch.arange(T)
    record = sorted(
        set(np.linspace(0, num_steps - 1, min(num_steps, 9)).round().astype(int).tolist())
    )
    return {i: f"t={int(kept[i]) + 1}" for i in record}


class _Preview:
    """What the PNG shows, gathered while the batches stream to the .npz: the first 64 images (over
    batches), or the first batch of points, or with --class all (``per_class`` samples of each) the
    first CLASS_GRID_COLUMNS of each class; and the first batch's trajectory."""

    def __init__(self, is_image: bool, per_class: int | None) -> None:
        self.is_image = is_image
        self.per_class = per_class
        self.x0: list[Tensor] = []
        self.class_rows: list[Tensor] = []
        self.trajectory: dict = {}

    def add(self, x0: Tensor, rows: Tensor, trajectory: dict) -> None:
        """One batch: its samples ``x0`` are rows ``rows`` of all the samples."""
        if not self.x0:
            self.trajectory = trajectory
            self.x0.append(x0)
        elif self.is_image and sum(len(k) for k in self.x0) < PREVIEW_IMAGES:
            self.x0.append(x0[: PREVIEW_IMAGES - sum(len(k) for k in self.x0)])
        if self.per_class is not None:
            self.class_rows.append(x0[rows % self.per_class < CLASS_GRID_COLUMNS])

    def first(self) -> Tensor:
        """The first 64 images, or the first batch of points."""
        return torch.cat(self.x0)[:PREVIEW_IMAGES] if self.is_image else self.x0[0]


def _save_preview(
    preview: _Preview, path: Path, *, step: int, class_names, num_classes
) -> tuple[Tensor, Path]:
    """The PNG of ``sample_run`` and the samples it shows: with --class all one row per class,
    named by the run's class names (else by index)."""
    if preview.per_class is not None and preview.is_image:
        shown = torch.cat(preview.class_rows)
        names = class_names or [str(i) for i in range(num_classes)]
        return shown, viz.save_labelled_rows(shown, names, path)
    shown = preview.first()
    return shown, save_samples(shown, path, title=f"step {step}")


def _npz_rows(batches, class_labels: Tensor | None, preview: _Preview):
    """The .npz row blocks of each batch (x0; uint8 images; labels), shown to ``preview`` on the way."""
    start = 0
    for out in batches:
        x0 = out.x0.float().cpu()
        if not torch.isfinite(x0).all():  # refused before the .npz is complete: nothing is written
            raise ConfigError(
                "the samples are not finite (NaN or inf): a guidance scale this large overflows, "
                "or the network's weights are broken"
            )
        rows = torch.arange(start, start + len(x0))
        preview.add(x0, rows, out.trajectory)
        chunk = {"x0": x0.numpy()}
        if preview.is_image:
            chunk["images"] = viz.to_uint8(x0)
        if class_labels is not None:
            chunk["labels"] = class_labels[rows].numpy()
        start += len(x0)
        yield chunk


def check_disk_space(folder: Path, needed: int) -> None:
    """A one-line error before any work if ``needed`` bytes (plus the temporary copy) cannot fit."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    # /proc, /sys (no blocks at all) or a read-only mount: "0 GB free" would mislead.
    if usage.total == 0 or not os.access(probe, os.W_OK):
        raise DDPMError(
            f"cannot write under {probe}: not a writable file system; use --out elsewhere"
        )
    free = usage.free
    if 2 * needed > free:  # the arrays are staged in temporary files, then copied into the .npz
        raise DDPMError(
            f"{needed / 1e9:.3g} GB of samples (and as much again while writing) do not fit in the "
            f"{free / 1e9:.3g} GB free under {probe}; ask for fewer with --num or use --out elsewhere"
        )


def write_npz_stream(path: Path, columns: dict[str, tuple], chunks) -> Path:
    """Write an .npz of the named arrays {name: (dtype, shape)} whose rows arrive in ``chunks`` (dicts
    of row blocks), holding one block in memory at a time. Each array is staged in a temporary .npy
    beside ``path`` (``np.lib.format.open_memmap``), then the .npz is assembled and renamed into place:
    it appears complete or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = {
            name: np.lib.format.open_memmap(tmp_dir / f"{name}.npy", "w+", np.dtype(dt), shape)
            for name, (dt, shape) in columns.items()
        }
        rows = 0
        for chunk in chunks:
            n = len(next(iter(chunk.values())))
            for name, block in chunk.items():
                staged[name][rows : rows + n] = block
            rows += n
        for array in staged.values():
            array.flush()
        del staged
        tmp_npz = tmp_dir / "out.npz"
        with zipfile.ZipFile(tmp_npz, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name in columns:
                with (
                    open(tmp_dir / f"{name}.npy", "rb") as src,
                    zf.open(f"{name}.npy", "w", force_zip64=True) as dst,
                ):
                    shutil.copyfileobj(src, dst, 1 << 22)
        with open(tmp_npz, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_npz, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


# --------------------------------------------------------------------------------------------------
# one trainer per run directory
# --------------------------------------------------------------------------------------------------

LOCK_FILE = ".lock"


@contextlib.contextmanager
def lock_run_dir(run_dir: Path):
    """Hold an exclusive OS lock (``flock``) on RUN/.lock while training: a second trainer of the same
    run gets a one-line RunDirError naming the holder's PID. The kernel releases the lock when the
    process dies, so a killed run never leaves a stale lock; readers (sample, eval, nll) never lock."""
    import fcntl

    created_dir = not run_dir.exists()
    lock = run_dir / LOCK_FILE
    created_lock = not lock.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            created_lock = created_dir = False  # the holder's, not ours to remove
            raise RunDirError(
                f"{run_dir} is being trained by another process (PID {holder}); wait for it to "
                "finish or stop it, or use another --run-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        # A run that failed before writing its config leaves nothing behind, not even the lock.
        if created_lock and not (run_dir / CONFIG_FILE).exists():
            lock.unlink(missing_ok=True)
            if created_dir and not any(run_dir.iterdir()):
                run_dir.rmdir()
        os.close(fd)  # releases the lock


def _sampling_summary(sc: SampleConfig, T: int) -> str:
    """What ``ddpm sample`` does by default for this run, in one line."""
    options = "".join(f", {k} {v:g}" for k, v in sc.sampler_options().items())
    steps = T if sc.steps is None else min(sc.steps, T)
    where = "the full chain" if steps == T and sc.grid in (None, "linspace") else (
        f"{steps} {sc.grid or DEFAULT_GRIDS[sc.sampler]} points"
    )  # fmt: skip
    return f"{sc.sampler}{options} on {where}, precision {sc.precision}"


def describe_run(run_dir: str | Path) -> str:
    """A few lines about a run: its config, network, progress, last loss and checkpoints."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    d, m, df, tc = config.data, config.model, config.diffusion, config.train
    lines = [
        f"run:        {run_dir}",
        f"data:       {d.name} (split {d.split}"
        + (f", {d.image_size}px" if d.image_size else "")
        + ")",
    ]
    checkpoints = list_checkpoints(run_dir)
    meta = None
    for _, path in reversed(checkpoints):
        try:
            meta = load_checkpoint(path, groups=()).meta  # metadata only: no tensors are read
            break
        except DDPMError:
            continue
    model_line = f"model:      {m.preset}"
    if meta is not None:
        model_line += f" ({meta['model']['arch']}, {meta['model']['num_parameters']:,} parameters)"
    if m.overrides():
        model_line += f", overrides {json.dumps(m.overrides())}"
    if m.cond == "class":
        model_line += f", class-conditional ({m.num_classes} classes, cond_drop {tc.cond_drop:g})"
    lines.append(model_line)
    lines.append(
        f"diffusion:  {df.schedule} schedule, T={df.num_timesteps}, predicts {df.prediction}, variance {df.variance}"
    )
    lines.append(
        f"training:   batch {tc.batch_size}, lr {tc.lr:g}, EMA {tc.ema_decay:g}, seed {tc.seed}"
        + f", precision {tc.precision}"
    )
    lines.append(f"sampling:   {_sampling_summary(config.sample, df.num_timesteps)}")
    if meta is not None:
        elapsed = meta.get("elapsed_s", 0.0)  # a corrupt value is shown, not fatal: info diagnoses
        ok = isinstance(elapsed, int | float) and math.isfinite(elapsed) and elapsed >= 0
        minutes = f"{elapsed / 60:.1f} min" if ok else f"unreadable time {elapsed!r}"
        lines.append(f"step:       {meta['step']} ({minutes} of training)")
        if meta.get("trained_on"):
            lines.append(f"trained on: {'; then '.join(meta['trained_on'])}")
    else:
        lines.append("step:       0 (no checkpoint yet)")
    log = run_dir / LOG_FILE
    if log.is_file():
        cols = viz.read_log(log)
        if cols.get("loss") is not None and len(cols["loss"]):
            lines.append(
                f"last loss:  {cols['loss'][-1]:.4f} at step {int(cols['step'][-1])} "
                f"({cols['images_per_s'][-1]:.0f} images/s)"
            )
    names = ", ".join(p.name for _, p in checkpoints) or "none"
    lines.append(f"checkpoints: {names}")
    previews = sorted((run_dir / "samples").glob("step_*.png"))
    if previews:
        lines.append(f"samples:    {previews[-1]}")
    return "\n".join(lines)


def forward_process_picture(
    data: DataConfig,
    diffusion: DiffusionConfig,
    out: str | Path,
    *,
    num: int = 8,
    seed: int = 0,
) -> Path:
    """Picture of q(x_t | x_0) on real data: ``num`` examples (images, one row each; 1..1000) or 2000
    points, from x_0 to x_T."""
    if isinstance(num, bool) or not isinstance(num, int) or not 1 <= num <= 1000:
        raise ConfigError(f"--num must be between 1 and 1000 examples (rows), got {num!r}")
    if Path(out).suffix.lower() != ".png":
        raise ConfigError(f"--out {out} must end in .png: the picture is written as a PNG")
    dataset = load_dataset(
        data.name,
        split=data.split,
        root=data.root,
        image_size=data.image_size,
        num_points=data.num_points,
        seed=seed,
    )
    schedule = build_schedule(diffusion)
    generator = torch.Generator().manual_seed(seed)
    n = min(len(dataset), PREVIEW_POINTS if dataset.kind == "points" else num)
    idx = torch.randperm(len(dataset), generator=generator)[:n]
    x0 = torch.as_tensor(dataset.x, dtype=torch.float32)[idx]
    return viz.save_forward_process(schedule, x0, out, generator=generator)


# --------------------------------------------------------------------------------------------------
# a training invocation's run directory and config
# --------------------------------------------------------------------------------------------------


def check_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} exists and is not a directory")
    if run_dir.is_dir() and not (run_dir / CONFIG_FILE).is_file():
        if any(p.name != ".lock" for p in run_dir.iterdir()):
            raise RunDirError(
                f"{run_dir} exists, is not empty and is not a ddpm run directory (no {CONFIG_FILE})"
            )


def check_same_run(saved: RunConfig, new: RunConfig, run_dir: Path) -> None:
    for section in ("data", "model", "diffusion"):
        a, b = getattr(saved, section), getattr(new, section)
        for f in dataclasses.fields(a):
            old_value, new_value = getattr(a, f.name), getattr(b, f.name)
            if old_value != new_value:
                raise ConfigError(
                    f"{run_dir} was trained with {section}.{f.name}={old_value!r}, not {new_value!r}; "
                    "use a new --run-dir"
                )


def prepare_run(
    overrides: dict[str, dict[str, Any]] | None = None,
    *,
    config_file: str | Path | None = None,
    run_dir: str | Path | None = None,
    recipe: str | None = None,
) -> tuple[RunConfig, Path]:
    """The config and run directory of a ``ddpm train`` invocation.

    Later sources win: defaults < the run's saved config.json (when resuming) < the named recipe
    (``ddpm/recipes/<recipe>.toml``, e.g. ho2020) < the TOML file <
    ``overrides`` ({section: {key: value}}). The budget (steps, minutes) is never inherited from the
    saved run: it belongs to each invocation. The run directory defaults to ``runs/<data name>``."""
    from ddpm.config import load_toml, recipe_path

    overrides = overrides or {}
    layers = [(str(p), load_toml(p)) for p in (recipe and recipe_path(recipe), config_file) if p]
    if run_dir is None:
        name = overrides.get("data", {}).get("name")
        for _, toml in layers:
            if name is None and isinstance(toml.get("data"), dict):
                name = toml["data"].get("name")
        run_dir = Path("runs") / str(name or DataConfig().name)
    run_dir = Path(run_dir)
    base = RunConfig()
    if (run_dir / CONFIG_FILE).is_file():
        saved = load_run_config(run_dir)
        base = dataclasses.replace(
            saved, train=dataclasses.replace(saved.train, steps=None, minutes=None)
        )
    for where, toml in layers:
        base = merge_config(base, toml, where)
    return merge_config(base, overrides, "the command line"), run_dir
