"""``ddpm edit``: editing images with any trained image run, no retraining.

Four modes, each a function that reads its inputs, checks them (before anything is computed or
written), calls one algorithm of ``ddpm.editing`` with the run's EMA network and writes a PNG (inputs,
mask and results side by side, captioned) and an .npz of every array, atomically, under RUN/edits::

    inpaint      RePaint (Lugmayr et al. 2022); --resample 1 is plain replacement
    sdedit       SDEdit (Meng et al. 2022): noise to strength * T, then denoise
    invert       DDIM inversion x_0 -> x_T and the reconstruction x_T -> x_0, with its RMS error
    interpolate  slerp between two x_T (two inverted images or two seeds), decoded by DDIM

Images are read with Pillow (``ddpm.data.folder.read_image``: gray, RGB, alpha over white) and must
have the run's size and channel count (an RGB image whose channels are equal counts as gray). A mask is
an image of the same size: white (>= 128) marks the pixels to fill in, black the pixels to keep (as
diffusers' inpainting pipelines). Class-conditional runs take a class and a guidance scale.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ddpm import editing, viz
from ddpm.checkpoint import atomic_write_bytes
from ddpm.config import MAX_SEED
from ddpm.data.folder import read_image
from ddpm.data.transforms import bytes_to_unit
from ddpm.errors import ConfigError, DataError
from ddpm.guidance import classifier_free_guidance
from ddpm.runs import LoadedRun, check_out_dir, class_labels_for, load_run, parse_class
from ddpm.samplers import SAMPLERS, timestep_grid
from ddpm.schedules import NoiseSchedule, respace

Tensor = torch.Tensor
MODES = ("inpaint", "sdedit", "invert", "interpolate")


class EditResult(NamedTuple):
    """The files written and the arrays they hold (``arrays``: what the .npz holds)."""

    png: Path
    npz: Path
    arrays: dict[str, np.ndarray]
    summary: str  # one line for the terminal


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------


def read_run_image(path: str | Path, shape: Sequence[int], what: str = "image") -> Tensor:
    """The image at ``path`` as [1, C, H, W] in [-1, 1] for a run of sample shape (C, H, W);
    DataError (exit 3) if it cannot be read or has another size or channel count."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such {what} file: {path}")
    a = read_image(path, None)
    c, h, w = (int(s) for s in shape)
    if a.shape[:2] != (h, w):
        raise DataError(
            f"{what} {path} is {a.shape[1]}x{a.shape[0]} pixels; the run's images are {w}x{h}"
        )
    if a.ndim == 3 and c == 1 and (a == a[..., :1]).all():
        a = a[..., 0]  # RGB with equal channels: gray
    channels = 1 if a.ndim == 2 else 3
    if channels != c:
        raise DataError(f"{what} {path} has {channels} channel(s); the run's images have {c}")
    x = bytes_to_unit(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return x.unsqueeze(0)


def read_mask(path: str | Path, shape: Sequence[int]) -> Tensor:
    """The mask at ``path`` as [1, 1, H, W] with 1 = keep (black), 0 = fill in (white, >= 128)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such mask file: {path}")
    a = read_image(path, None)
    h, w = int(shape[1]), int(shape[2])
    if a.shape[:2] != (h, w):
        raise DataError(
            f"mask {path} is {a.shape[1]}x{a.shape[0]} pixels; the run's images are {w}x{h}"
        )
    gray = a if a.ndim == 2 else a.max(axis=2)
    fill = torch.from_numpy(gray >= 128)
    if not fill.any():
        raise DataError(f"mask {path} marks no pixel to fill in (white = fill in, black = keep)")
    return (~fill).float()[None, None]


def _model(run: LoadedRun, class_label, guidance: float | None):
    """The run's network as the ``(x_t, t)`` callable the algorithms take: guided towards a class
    when one is given (``ddpm.guidance``; scale 1 = plain conditional)."""
    names = run.checkpoint.meta.get("data", {}).get("class_names")
    label = parse_class(class_label, names)
    if label is None and guidance is not None:
        raise ConfigError("--guidance needs --class (a class index or name)")
    if label == "all":
        raise ConfigError("ddpm edit takes one class, not 'all'")
    if label is None:
        return run.model
    class_labels_for(run.model, 1, label)  # checks the run has classes and the class exists
    return classifier_free_guidance(
        run.model, label, 1.0 if guidance is None else guidance, run.model.null_label
    )


def _chain(schedule: NoiseSchedule, steps: int | None, default: int | None = None) -> NoiseSchedule:
    """``steps`` evenly spaced points of the chain (linspace grid; None: ``default`` capped at T,
    or all T)."""
    T = schedule.num_timesteps
    if steps is None:
        steps = T if default is None else min(default, T)
    if steps == T:
        return schedule
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ConfigError(f"--steps must lie in [1, T={T}], got {steps!r}")
    return respace(schedule, timestep_grid(schedule, steps, "linspace"))


def _options(run: LoadedRun) -> dict:
    d, s = run.config.diffusion, run.config.sample
    return {"prediction": d.prediction, "variance": d.variance, "clip_x0": s.clip_x0,
            "dynamic_threshold": s.dynamic_threshold}  # fmt: skip


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _seed(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"--seed must be an integer in 0..2^63-1, got {value!r}")


def _load(run_dir, device, out_dir) -> LoadedRun:
    check_out_dir(out_dir)  # before any work, like ddpm sample/eval/nll
    run = load_run(run_dir, device=device)
    if run.kind != "image":
        raise ConfigError(f"{run_dir} is a run on 2-D points; ddpm edit works on image runs")
    return run


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------


def _write(
    run_dir, out_dir, stem: str, tiles: list[tuple[str, Tensor]], arrays: dict[str, Tensor], summary
) -> EditResult:
    """Write ``stem``.png (the captioned tiles [C, H, W] in one row) and ``stem``.npz (float32
    arrays), each atomically, under ``out_dir`` (default RUN/edits)."""
    folder = Path(out_dir) if out_dir is not None else Path(run_dir) / "edits"
    out = {k: v.detach().float().cpu().numpy() for k, v in arrays.items()}
    buffer = io.BytesIO()
    np.savez(buffer, **out)
    npz = atomic_write_bytes(folder / f"{stem}.npz", buffer.getvalue())
    captions = [c for c, _ in tiles]
    png = viz.save_strip(torch.stack([t.float().cpu() for _, t in tiles]), captions,
                         folder / f"{stem}.png")  # fmt: skip
    return EditResult(png, npz, out, summary)


def _mask_tile(mask: Tensor, channels: int) -> Tensor:
    """The mask drawn as the user gave it: white = fill in, black = keep."""
    return (1 - 2 * mask[0]).expand(channels, -1, -1)


# --------------------------------------------------------------------------------------------------
# the four modes
# --------------------------------------------------------------------------------------------------


def inpaint_run(
    run_dir, image, mask, *, num: int = 4, steps: int | None = None, jumps: int = 10,
    resample: int = 10, seed: int = 0, class_label=None, guidance: float | None = None,
    out_dir=None, device="auto", progress: bool = False,
) -> EditResult:  # fmt: skip
    """Fill in the white pixels of ``mask`` in ``image``: ``num`` RePaint draws on ``steps`` points
    of the chain (None: 250 as Lugmayr et al., or T if smaller) with ``jumps``-step jumps back, each
    ``resample`` times (1: plain replacement, no jumps)."""
    _positive("--num", num)
    _positive("--jumps", jumps)
    _positive("--resample", resample)
    _seed(seed)
    run = _load(run_dir, device, out_dir)
    x0, m = read_run_image(image, run.sample_shape), read_mask(mask, run.sample_shape)
    model, chain = _model(run, class_label, guidance), _chain(run.schedule, steps, 250)
    generator = torch.Generator().manual_seed(seed)
    out = editing.inpaint(
        model, chain, x0.expand(num, -1, -1, -1).to(run.device), m.to(run.device),
        jump_length=jumps, resample=resample, generator=generator, progress=progress,
        **_options(run),
    ).x0.cpu()  # fmt: skip
    c = x0.shape[1]
    tiles = [("input", x0[0]), ("mask", _mask_tile(m, c)), ("masked", (x0 * m)[0])]
    tiles += [(f"result {i + 1}", out[i]) for i in range(num)]
    how = "RePaint" if resample > 1 else "plain replacement"
    stem = f"inpaint_{Path(image).stem}_r{resample}_j{jumps}_seed{seed}"
    arrays = {"image": x0, "mask": m, "x0": out}
    return _write(run_dir, out_dir, stem, tiles, arrays,
                  f"{how}, {chain.num_timesteps} steps, {num} results")  # fmt: skip


def sdedit_run(
    run_dir, image, *, strength: float = 0.5, num: int = 4, sampler: str = "ancestral",
    steps: int | None = None, seed: int = 0, class_label=None, guidance: float | None = None,
    out_dir=None, device="auto", progress: bool = False,
) -> EditResult:  # fmt: skip
    """SDEdit: ``num`` draws of noising ``image`` to ``strength`` (0, 1] of the chain, then
    denoising it with ``sampler`` on ``steps`` points (None: all T)."""
    try:
        editing.start_index(1000, strength)
    except ValueError as err:
        raise ConfigError(f"--strength: {err}") from None
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; known: {', '.join(sorted(SAMPLERS))}")
    _positive("--num", num)
    _seed(seed)
    run = _load(run_dir, device, out_dir)
    x0 = read_run_image(image, run.sample_shape)
    model, chain = _model(run, class_label, guidance), _chain(run.schedule, steps)
    generator = torch.Generator().manual_seed(seed)
    out = editing.sdedit(
        model,
        chain,
        x0.expand(num, -1, -1, -1).to(run.device),
        strength,
        sampler=sampler,
        generator=generator,
        progress=progress,
        **_options(run),
    )
    tiles = [("input", x0[0]), (f"noised {strength:g}", out.x_start[0].cpu().clamp(-1, 1))]
    tiles += [(f"result {i + 1}", out.x0[i].cpu()) for i in range(num)]
    stem = f"sdedit_{Path(image).stem}_s{strength:g}_{sampler}_seed{seed}"
    arrays = {"image": x0, "x_start": out.x_start, "x0": out.x0}
    return _write(run_dir, out_dir, stem, tiles, arrays,
                  f"strength {strength:g} (from index {out.start_index}), {num} results")  # fmt: skip


def invert_run(
    run_dir, image, *, steps: int | None = None, class_label=None, guidance: float | None = None,
    out_dir=None, device="auto", progress: bool = False,
) -> EditResult:  # fmt: skip
    """DDIM inversion of ``image`` on ``steps`` points of the chain (None: 100), then DDIM back;
    the .npz holds x_T, the reconstruction and its RMS error."""
    run = _load(run_dir, device, out_dir)
    x0 = read_run_image(image, run.sample_shape)
    model, chain = _model(run, class_label, guidance), _chain(run.schedule, steps, 100)
    d = run.config.diffusion
    rec = editing.ddim_reconstruct(model, chain, x0.to(run.device), prediction=d.prediction,
                                   variance=d.variance, progress=progress)  # fmt: skip
    x_T = rec.x_T.cpu()
    shown = x_T[0] / x_T[0].abs().max().clamp(min=1e-12)  # x_T scaled into [-1, 1] to be seen
    tiles = [("input", x0[0]), ("x_T", shown), ("rebuilt", rec.x0[0].cpu())]
    error = float(rec.error[0])
    stem = f"invert_{Path(image).stem}_{chain.num_timesteps}steps"
    arrays = {"image": x0, "x_T": x_T, "x0": rec.x0, "rms_error": rec.error}
    return _write(run_dir, out_dir, stem, tiles, arrays,
                  f"{chain.num_timesteps} DDIM steps; reconstruction RMS error {error:.4f} "
                  "(data range [-1, 1])")  # fmt: skip


def interpolate_run(
    run_dir, *, images: Sequence = (), seeds: Sequence[int] = (), frames: int = 8,
    steps: int | None = None, class_label=None, guidance: float | None = None, out_dir=None,
    device="auto", progress: bool = False,
) -> EditResult:  # fmt: skip
    """``frames`` images along the slerp between two x_T: of two images (DDIM-inverted on
    ``steps`` points, None: 100) or of two seeds (x_T ~ N(0, I)), decoded by DDIM (eta 0) on the same chain."""
    if (len(images), len(seeds)) not in ((2, 0), (0, 2)):
        raise ConfigError("interpolate needs two --image or two --seed (not one, nor both)")
    for s in seeds:
        _seed(s)
    _positive("--frames", frames)
    if not 2 <= frames <= 1000:
        raise ConfigError(f"--frames must be between 2 and 1000, got {frames}")
    run = _load(run_dir, device, out_dir)
    ends = [read_run_image(p, run.sample_shape) for p in images]
    model, chain = _model(run, class_label, guidance), _chain(run.schedule, steps, 100)
    d = run.config.diffusion
    if ends:
        both = torch.cat(ends).to(run.device)
        x_T = editing.ddim_invert(model, chain, both, prediction=d.prediction,
                                  variance=d.variance, progress=progress).x_T  # fmt: skip
    else:
        x_T = torch.stack([torch.randn(run.sample_shape, generator=torch.Generator().manual_seed(s))
                           for s in seeds]).to(run.device)  # fmt: skip
    out = editing.interpolate(model, chain, x_T[0], x_T[1], frames, sampler="ddim", eta=0.0,
                              **_options(run))  # fmt: skip
    tiles = [(f"w={w:.2f}", x) for w, x in zip(out.weights.tolist(), out.x0.cpu(), strict=True)]
    if ends:
        tiles = [("image a", ends[0][0]), *tiles, ("image b", ends[1][0])]
    names = [Path(p).stem for p in images] or [f"seed{s}" for s in seeds]
    stem = f"interpolate_{names[0]}_{names[1]}_{frames}frames"
    arrays = {"weights": out.weights, "x_T": out.x_T, "x0": out.x0}
    if ends:
        arrays["images"] = torch.cat(ends)
    return _write(run_dir, out_dir, stem, tiles, arrays,
                  f"{frames} frames, DDIM on {chain.num_timesteps} steps")  # fmt: skip
