"""Pictures: sample grids, reverse-process trajectories, the forward process, 2-D scatters, loss curves.

Images are arrays [N, C, H, W] in [-1, 1] (torch tensors or numpy arrays); points are [N, 2]. Grids are
drawn with Pillow, plots with matplotlib's object API (no pyplot, so importing this module never changes
the caller's backend). Every file is written atomically: to a temporary name in the same directory,
flushed, fsynced, then renamed over the target, so a reader never sees half a PNG.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

_MIN_TILE_PX = 32  # small images (8x8 digits) are upscaled with nearest-neighbour to at least this
_MIN_CAPTIONED_TILE_PX = 40  # wide enough for a caption like "t=1000" under Pillow's default font
_PAD = 2


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedIOBase], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # name the picture asked for, not the hidden temporary file
        raise type(err)(err.errno, err.strerror, str(path)) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; no torch import needed here
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def to_uint8(x) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C] in 0..255 (clipped, rounded to nearest)."""
    x = _numpy(x)
    if x.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {x.shape}")
    u = np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return u.transpose(0, 2, 3, 1)


def _default_scale(size: int, min_px: int = _MIN_TILE_PX) -> int:
    return max(1, math.ceil(min_px / size))


def _grid_image(x, nrow: int | None, scale: int | None, pad: int = _PAD) -> Image.Image:
    u = to_uint8(x)  # [N, H, W, C]
    n, h, w, c = u.shape
    if c not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {c}")
    if n == 0:
        raise ValueError("no images to draw")
    scale = _default_scale(min(h, w)) if scale is None else int(scale)
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    ncol = int(nrow) if nrow else math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncol)
    th, tw = h * scale, w * scale
    mode = "L" if c == 1 else "RGB"
    canvas = Image.new(
        mode,
        (pad + ncol * (tw + pad), pad + nrows * (th + pad)),
        color=255 if c == 1 else (255,) * 3,
    )
    for i in range(n):
        tile = Image.fromarray(u[i, :, :, 0] if c == 1 else u[i], mode=mode)
        if scale != 1:
            tile = tile.resize((tw, th), Image.NEAREST)
        r, col = divmod(i, ncol)
        canvas.paste(tile, (pad + col * (tw + pad), pad + r * (th + pad)))
    return canvas


def _save_pil(img: Image.Image, path) -> Path:
    return _atomic_write(path, lambda f: img.save(f, format="PNG"))


def _save_figure(fig, path, dpi: int = 100) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    return _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


# --------------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------------


def save_image_grid(x, path, nrow: int | None = None, scale: int | None = None) -> Path:
    """Save images x [N, C, H, W] in [-1, 1] as one PNG grid, nrow images per row (default ~sqrt(N)).

    scale: integer nearest-neighbour upscaling of each tile; by default the smallest that makes a
    tile at least 32 px (so 8x8 digits become 32x32, 32x32 images stay as they are).
    """
    return _save_pil(_grid_image(x, nrow, scale), path)


def save_labelled_rows(
    x, captions: Sequence[str], path, scale: int | None = None, columns: int | None = None
) -> Path:
    """Save images x [R * n, C, H, W] in [-1, 1] as a grid of R rows of n (row r holds images
    r n .. r n + n - 1), each row named by ``captions[r]`` at its left, e.g. one row per class.
    ``columns`` tiles per row (default: len(x) / R; a full grid)."""
    u = _numpy(x)
    rows = len(captions)
    if rows == 0 or len(u) % rows:
        raise ValueError(f"{len(u)} images do not make {rows} equal rows")
    grid = _grid_image(u, columns or len(u) // rows, scale)
    tile_h = (grid.height - _PAD) // rows - _PAD
    white = 255 if grid.mode == "L" else (255,) * 3
    probe = ImageDraw.Draw(grid)
    band = 6 + max(int(math.ceil(probe.textlength(str(c)))) for c in captions)
    out = Image.new(grid.mode, (grid.width + band, grid.height), color=white)
    out.paste(grid, (band, 0))
    draw = ImageDraw.Draw(out)
    for r, text in enumerate(captions):
        y = _PAD + r * (tile_h + _PAD) + max(tile_h // 2 - 6, 0)
        draw.text((3, y), str(text), fill=0 if grid.mode == "L" else (0, 0, 0))
    return _save_pil(out, path)


def save_strip(x, captions: Sequence[str], path, scale: int | None = None) -> Path:
    """Save images x [N, C, H, W] in [-1, 1] side by side in one row, ``captions[i]`` above image i
    (tiles upscaled so that the longest caption fits, ~6 px a character)."""
    u = _numpy(x)
    if len(u) != len(captions):
        raise ValueError(f"{len(u)} images but {len(captions)} captions")
    if scale is None:
        widest = 6 * max(len(str(c)) for c in captions) + 4
        scale = _default_scale(u.shape[-1], max(_MIN_CAPTIONED_TILE_PX, widest))
    return _save_pil(_captioned_grid([t[None] for t in u], [str(c) for c in captions], scale), path)


def save_scatter(
    points, path, reference=None, title: str | None = None, lim: float | None = None
) -> Path:
    """Scatter plot of 2-D points [N, 2] (blue), over optional reference points [M, 2] (grey)."""
    pts = _numpy(points)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"expected points [N, 2], got shape {pts.shape}")
    fig = _figure(5, 5)
    ax = fig.add_subplot()
    _scatter_axes(ax, pts, None if reference is None else _numpy(reference), lim)
    if title:
        ax.set_title(title)
    return _save_figure(fig, path)


def _scatter_axes(ax, pts: np.ndarray, reference: np.ndarray | None, lim: float | None) -> None:
    if reference is not None:
        ax.scatter(reference[:, 0], reference[:, 1], s=2, c="0.75", alpha=0.5, linewidths=0)
    ax.scatter(pts[:, 0], pts[:, 1], s=3, c="tab:blue", alpha=0.7, linewidths=0)
    if lim is None:
        both = pts if reference is None else np.concatenate([pts, reference])
        finite = both[np.isfinite(both).all(axis=1)]
        lim = float(np.abs(finite).max()) * 1.1 if finite.size else 1.0
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def save_trajectory(
    trajectory: Mapping[int, object],
    path,
    *,
    labels: Mapping[int, str] | None = None,
    num_rows: int = 8,
    scale: int | None = None,
) -> Path:
    """Picture of the reverse process: one row per sample, one column per recorded step, from x_T (left)
    to x_0 (right). ``trajectory`` maps a step index to x at that step (as ``SamplerOutput.trajectory``:
    larger index = noisier, -1 = the final x_0); ``labels`` gives each column's caption (default
    "i=<index>", and "x_0" for -1). 2-D points [N, 2] are drawn as one scatter panel per step."""
    if not trajectory:
        raise ValueError("empty trajectory")
    keys = sorted((k for k in trajectory if k != -1), reverse=True) + (
        [-1] if -1 in trajectory else []
    )
    captions = [(labels or {}).get(k, "x_0" if k == -1 else f"i={k}") for k in keys]
    first = _numpy(trajectory[keys[0]])
    if first.ndim == 2:
        return _scatter_row([_numpy(trajectory[k]) for k in keys], captions, path)
    return _save_pil(
        _captioned_grid([_numpy(trajectory[k])[:num_rows] for k in keys], captions, scale), path
    )


def _captioned_grid(
    columns: Sequence[np.ndarray], captions: Sequence[str], scale: int | None
) -> Image.Image:
    """One column per array [N, C, H, W] (row i holds example i of each), a caption above each column."""
    n, c, h, w = columns[0].shape
    scale = _default_scale(min(h, w), _MIN_CAPTIONED_TILE_PX) if scale is None else scale
    # Tile i of the grid is row i // len(columns), column i % len(columns).
    tiles = np.stack(columns, axis=1).reshape(n * len(columns), c, h, w)
    grid = _grid_image(tiles, len(columns), scale)
    return _with_captions(grid, captions, w * scale)


def _with_captions(grid: Image.Image, captions: Sequence[str], tile_w: int) -> Image.Image:
    band = 14
    out = Image.new(
        grid.mode, (grid.width, grid.height + band), color=255 if grid.mode == "L" else (255,) * 3
    )
    out.paste(grid, (0, band))
    draw = ImageDraw.Draw(out)
    for j, text in enumerate(captions):
        x = _PAD + j * (tile_w + _PAD)
        draw.text((x, 1), text, fill=0 if grid.mode == "L" else (0, 0, 0))
    return out


def _scatter_row(panels: Sequence[np.ndarray], captions: Sequence[str], path) -> Path:
    fig = _figure(2.2 * len(panels), 2.4)
    lim = max(3.0, float(np.nanmax(np.abs(panels[-1]))) * 1.1)
    for j, (pts, text) in enumerate(zip(panels, captions, strict=True)):
        ax = fig.add_subplot(1, len(panels), j + 1)
        _scatter_axes(ax, pts, None, lim)
        ax.set_title(text, fontsize=9)
    return _save_figure(fig, path)


def save_forward_process(
    schedule,
    x0,
    path,
    steps: Sequence[int] | None = None,
    *,
    generator=None,
    scale: int | None = None,
) -> Path:
    """Picture of the forward process on real data: x_0, then draws x_t ~ q(x_t | x_0) (eq. 4) at the given
    0-based step indices (default 8 evenly spaced up to T-1), one row per example of x0 [N, ...].
    Each column is an independent draw from the marginal q(x_t | x_0), with its own eps."""
    import torch

    from ddpm.diffusion import q_sample

    x0 = torch.as_tensor(x0, dtype=torch.float32)
    T = schedule.num_timesteps
    if steps is None:
        steps = np.unique(np.linspace(0, T - 1, 8).round().astype(int)).tolist()
    steps = [int(i) for i in steps]
    if any(not 0 <= i < T for i in steps):
        raise ValueError(f"forward-process steps must lie in [0, {T - 1}], got {steps}")
    trajectory = {-1: x0}
    labels = {-1: "x_0"}
    for i in steps:
        t = torch.full((x0.shape[0],), i, dtype=torch.long)
        eps = torch.randn(x0.shape, generator=generator)
        trajectory[i] = q_sample(schedule, x0, t, eps)
        labels[i] = f"t={i + 1}"
    # Columns left to right: x_0 then increasing t (the reverse of the trajectory's order).
    keys = [-1, *sorted(steps)]
    if x0.ndim == 2:
        return _scatter_row([_numpy(trajectory[k]) for k in keys], [labels[k] for k in keys], path)
    columns = [_numpy(trajectory[k]) for k in keys]
    return _save_pil(_captioned_grid(columns, [labels[k] for k in keys], scale), path)


def read_log(path) -> dict[str, np.ndarray]:
    """The columns of a training log CSV (header row, numeric values) as float arrays."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def plot_loss(log_csv, path, smooth: int = 10) -> Path:
    """Plot the training loss (log scale) against the step from a log.csv written by training, with a
    moving average over ``smooth`` logged points."""
    cols = read_log(log_csv)
    if not cols or "loss" not in cols:
        raise ValueError(f"{log_csv}: no loss rows to plot")
    step, loss = cols["step"], cols["loss"]
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    ax.plot(step, loss, lw=0.8, alpha=0.4, label="loss")
    if smooth > 1 and len(loss) >= smooth:
        kernel = np.ones(smooth) / smooth
        ax.plot(
            step[smooth - 1 :],
            np.convolve(loss, kernel, mode="valid"),
            lw=1.5,
            label=f"mean of {smooth}",
        )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save_figure(fig, path)


def plot_bound_terms(
    t: np.ndarray,
    terms_bpd: np.ndarray,
    path,
    se: np.ndarray | None = None,
    title: str | None = None,
) -> Path:
    """Plot the terms of the variational bound (bits/dim) against the paper's step t = 1..T, both axes
    logarithmic: L_0 at t = 1, L_{t-1} at t >= 2. ``se`` draws a band of +- 2 standard errors."""
    t, terms = np.asarray(t, dtype=float), np.asarray(terms_bpd, dtype=float)
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    positive = terms > 0
    ax.plot(t[positive], terms[positive], lw=1.2, marker="." if len(t) < 200 else None)
    if se is not None:
        se = np.nan_to_num(np.asarray(se, dtype=float))
        low = np.clip(terms - 2 * se, terms[positive].min(initial=1e-12) / 10, None)
        ax.fill_between(t[positive], low[positive], (terms + 2 * se)[positive], alpha=0.25)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("t (L_0 at t = 1, L_{t-1} at t >= 2)")
    ax.set_ylabel("term of the bound (bits/dim)")
    ax.grid(alpha=0.3, which="both")
    if title:
        ax.set_title(title)
    return _save_figure(fig, path)
