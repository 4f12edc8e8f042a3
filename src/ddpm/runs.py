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

import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

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
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    RunConfig,
    merge_config,
)
from ddpm.data import load_dataset
from ddpm.errors import ConfigError, DDPMError, RunDirError
from ddpm.nets import MLP, UNET_PRESETS, UNet, build_unet
from ddpm.samplers import DEFAULT_GRIDS, sample, timestep_grid
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


def build_model(
    model_cfg: ModelConfig, *, kind: str, sample_shape: tuple[int, ...], learn_sigma: bool
) -> torch.nn.Module:
    """The network of a resolved ModelConfig for data of the given kind and shape (no batch dim)."""
    overrides = model_cfg.overrides()
    preset = model_cfg.preset
    if preset == "mlp":
        if bad := sorted(set(overrides) - set(MLP_FIELDS)):
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
    return ARCHS[arch](**net_config)


def load_weights(module: torch.nn.Module, tensors: dict[str, Tensor], what: str) -> None:
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise RunDirError(f"{what} weights do not fit the network: {first}") from None


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The config.json of a run directory; RunDirError if the directory is not a run."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
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
    try:
        return RunConfig.from_dict(data, str(path))
    except ConfigError as err:
        raise RunDirError(f"{path}: {err}") from None


def save_run_config(config: RunConfig, path: Path) -> None:
    record = {RUN_FORMAT_KEY: RUN_FORMAT_VERSION, **config.to_dict()}
    atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())


def draw(
    model,
    schedule: NoiseSchedule,
    shape,
    config: RunConfig,
    *,
    num,
    steps,
    seed,
    record=(),
    progress=False,
):
    """Samples from the model with the run's diffusion settings and [sample] options."""
    is_image = len(shape) > 1
    return sample(
        model,
        schedule,
        (num, *shape),
        sampler=config.sample.sampler,
        num_steps=min(steps, schedule.num_timesteps),
        grid=config.sample.grid,
        generator=torch.Generator().manual_seed(seed),
        prediction=config.diffusion.prediction,
        variance=config.diffusion.variance,
        clip_x0=config.sample.clip_x0 and is_image,
        dynamic_threshold=config.sample.dynamic_threshold if is_image else None,
        **config.sample.sampler_options(),
        record=record,
        progress=progress,
    )


def default_num(shape) -> int:
    return PREVIEW_IMAGES if len(shape) > 1 else PREVIEW_POINTS


def save_samples(
    x0: Tensor, path: Path, reference: Tensor | None = None, title: str | None = None
) -> Path:
    if x0.ndim == 2:
        return viz.save_scatter(x0, path, reference=reference, title=title)
    return viz.save_image_grid(x0, path)


class SampleResult(NamedTuple):
    """Paths written by ``sample_run`` and the samples themselves ([N, C, H, W] or [N, D], float)."""

    png: Path
    npz: Path
    trajectory_png: Path | None
    step: int
    x0: Tensor


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
    **sample_options,
) -> SampleResult:
    """Draw samples from a trained run and write ``<out_dir>/step_XXXXXXX_seedS.png`` (grid or scatter)
    and ``.npz`` (``x0`` float32 as sampled; for images also ``images``, uint8 [N, H, W, C]), plus, with
    ``trajectory``, a picture of the reverse process. Unset options come from the run's [sample] config;
    ``out_dir`` defaults to RUN/generated. ``sample_options`` override other [sample] keys (sampler,
    grid, eta, order, clip_x0, dynamic_threshold); None leaves a key as the run has it."""
    given = {"num": num, "steps": steps, "seed": seed, "use_ema": use_ema, **sample_options}
    run_config = load_run_config(run_dir)
    sc = merge_config(
        run_config, {"sample": {k: v for k, v in given.items() if v is not None}}, "sample options"
    ).sample
    model, config, ckpt = load_run_model(run_dir, use_ema=sc.use_ema)
    schedule = build_schedule(config.diffusion)
    T = schedule.num_timesteps
    num_steps = T if sc.steps is None else sc.steps
    if num_steps > T:
        raise ConfigError(f"steps must be at most T={T}, got {num_steps}")
    shape = tuple(ckpt.meta["data"]["sample_shape"])
    grid = sc.grid or DEFAULT_GRIDS[sc.sampler]
    kept = timestep_grid(schedule, num_steps, grid) if num_steps < T else torch.arange(T)
    record = sorted(
        set(np.linspace(0, num_steps - 1, min(num_steps, 9)).round().astype(int).tolist())
    )
    config = dataclasses.replace(config, sample=sc)
    num = default_num(shape) if sc.num is None else sc.num
    out = draw(
        model,
        schedule,
        shape,
        config,
        num=num,
        steps=num_steps,
        seed=sc.seed,
        record=record if trajectory else (),
        progress=progress,
    )
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "generated"
    how = "" if sc.sampler == "ancestral" else f"_{sc.sampler}{num_steps}"
    stem = f"step_{ckpt.step:07d}_seed{sc.seed}{how}" + ("" if sc.use_ema else "_raw")
    x0 = out.x0.float().cpu()
    arrays = {"x0": x0.numpy()}
    if x0.ndim == 4:
        arrays["images"] = viz.to_uint8(x0)
    png = save_samples(x0, out_dir / f"{stem}.png", title=f"step {ckpt.step}")
    npz = _save_npz(out_dir / f"{stem}.npz", arrays)
    traj_png = None
    if trajectory:
        labels = {i: f"t={int(kept[i]) + 1}" for i in record}
        traj_png = viz.save_trajectory(
            out.trajectory, out_dir / f"{stem}_trajectory.png", labels=labels
        )
    return SampleResult(png, npz, traj_png, ckpt.step, x0)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return atomic_write_bytes(path, buffer.getvalue())


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
    lines.append(model_line)
    lines.append(
        f"diffusion:  {df.schedule} schedule, T={df.num_timesteps}, predicts {df.prediction}, variance {df.variance}"
    )
    lines.append(
        f"training:   batch {tc.batch_size}, lr {tc.lr:g}, EMA {tc.ema_decay:g}, seed {tc.seed}"
        + (", bf16" if tc.bf16 else "")
    )
    if meta is not None:
        lines.append(
            f"step:       {meta['step']} ({meta.get('elapsed_s', 0.0) / 60:.1f} min of training)"
        )
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
    """Picture of q(x_t | x_0) on real data: ``num`` examples (images) or 2000 points, from x_0 to x_T."""
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
