"""Every figure and number of docs/guide.md, regenerated from the library (``make figures``).

    python scripts/figures.py                 # full: docs/guide/*.png and docs/guide/numbers.txt
    python scripts/figures.py --quick --out D # small T and N, seconds: what CI runs (tests/test_guide.py)
    python scripts/figures.py --run RUN       # reuse a trained run instead of training one

Each ``section_*`` function computes its numbers with ddpm's own functions, prints them (they are also
written to OUT/numbers.txt, which the guide quotes), and draws its figures into OUT. The full mode trains
a tiny U-Net on the built-in 8x8 digits for --train-steps (700: ~1.5 minutes on a quiet core; a step
count, not minutes, so that a busy machine trains the same model) through the ``ddpm`` command line,
unless --run names a run; the quick mode uses only the exact Gaussian-mixture denoiser.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from ddpm import GaussianMixture, NoiseSchedule, q_sample, q_step, variational_bound  # noqa: E402
from ddpm.diffusion import predict_x0_eps  # noqa: E402
from ddpm.losses import nats_to_bpd, prior_kl  # noqa: E402
from ddpm.samplers import SAMPLERS, timestep_grid  # noqa: E402
from ddpm.schedules import respace  # noqa: E402

F64 = torch.float64
LN2 = math.log(2.0)
SCHEDULES = ("linear", "quadratic", "cosine", "sigmoid")
COLORS = {
    "linear": "tab:blue",
    "quadratic": "tab:orange",
    "cosine": "tab:green",
    "sigmoid": "tab:red",
}

# What each mode writes into OUT (besides numbers.txt): the quick mode only the first tuple.
ORACLE_FIGURES = (
    "01_forward_kernel.png",
    "02_variance_preserving.png",
    "03_limiting_cases.png",
    "03_limiting_strips.png",
    "04_prior_term.png",
    "05_schedules.png",
    "05_forward_strips.png",
    "06_posterior.png",
    "07_bound_terms.png",
    "08_reverse_oracle.png",
    "09_bound_gap.png",
)
TRAINED_FIGURES = ("08_reverse_digits_ancestral.png", "08_reverse_digits_ddim.png")

# The 2-D data of sections 7-9: a two-component mixture with full covariances (tests/test_likelihood.py's),
# whose exact denoiser E[eps | x_t] (ddpm.oracle) stands in for a perfectly trained network.
MIXTURE = GaussianMixture(
    [0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], [[[0.5, 0.1], [0.1, 0.3]], [[0.2, 0.0], [0.0, 0.4]]]
)


@dataclass(frozen=True)
class Mode:
    """Sizes of one run of the script: the chain length T and the Monte-Carlo sample sizes."""

    name: str
    T: int  # chain length of sections 1-3, 5-8
    n: int  # Monte-Carlo draws for sections 1-3
    table_T: tuple[int, ...]  # section 4
    bound_T: tuple[int, ...]  # section 9
    bound_n: int  # points for the bounds of sections 7 and 9
    ddim_steps: int


FULL = Mode(
    "full", 1000, 200_000, (10, 50, 100, 250, 1000, 4000), (25, 100, 250, 1000, 4000), 2000, 50
)
QUICK = Mode("quick", 100, 4000, (10, 100, 1000), (25, 100), 200, 10)


class Report:
    """Prints each line and keeps it for OUT/numbers.txt (the guide quotes that file)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def save(self, path: Path) -> None:
        path.write_text("\n".join(self.lines) + "\n")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def save(fig: Figure, out: Path, name: str, report: Report) -> Path:
    FigureCanvasAgg(fig)
    path = out / name
    fig.savefig(path, format="png", dpi=80)
    report(f"  figure: {path.name} ({path.stat().st_size // 1024} KB)")
    return path


def image_rows(fig: Figure, rows, row_labels, col_labels, title: str):
    """A grid of grey images in [-1, 1]: rows[r][c] is [H, W]; labelled rows and columns."""
    nr, nc = len(rows), len(rows[0])
    axes = fig.subplots(nr, nc, squeeze=False)
    for r in range(nr):
        for c in range(nc):
            ax = axes[r][c]
            ax.imshow(np.asarray(rows[r][c]), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_labels[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=9)
    fig.suptitle(title, fontsize=10)
    return axes


@functools.cache
def digits_test() -> torch.Tensor:
    """The 300 test digits [300, 1, 8, 8] in [-1, 1] (scikit-learn's 8x8 digits, offline)."""
    from ddpm.data import load_dataset

    return load_dataset("digits", split="test").x.to(F64)


def digit(index: int = 0) -> torch.Tensor:
    """One test digit [1, 1, 8, 8]."""
    return digits_test()[index : index + 1]


# --------------------------------------------------------------------------------------------------
# 1. the forward kernel and merging Gaussians
# --------------------------------------------------------------------------------------------------


def two_step_merge(
    beta_1: float, beta_2: float, x0: float, n: int, seed: int = 0
) -> dict[str, float]:
    """Two steps of q_step (eq. 2) from a fixed x0 against one q_sample (eq. 4) with the merged variance
    1 - (1 - beta_1)(1 - beta_2): Monte-Carlo mean and variance of each, and the formula's."""
    g = torch.Generator().manual_seed(seed)
    s = NoiseSchedule.from_betas([beta_1, beta_2])
    x = torch.full((n, 1), x0, dtype=F64)
    x1 = q_step(s, x, torch.zeros(n, dtype=torch.long), torch.randn(n, 1, generator=g, dtype=F64))
    x2 = q_step(s, x1, torch.ones(n, dtype=torch.long), torch.randn(n, 1, generator=g, dtype=F64))
    one = q_sample(s, x, torch.ones(n, dtype=torch.long), torch.randn(n, 1, generator=g, dtype=F64))
    return {
        "two_step_mean": float(x2.mean()),
        "two_step_var": float(x2.var()),
        "one_step_mean": float(one.mean()),
        "one_step_var": float(one.var()),
        "formula_mean": math.sqrt((1 - beta_1) * (1 - beta_2)) * x0,
        "formula_var": 1 - (1 - beta_1) * (1 - beta_2),
        "samples_two": x2.squeeze(1).numpy(),
    }


def chain_against_marginal(
    s: NoiseSchedule, x0: torch.Tensor, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_t after t applications of q_step (the chain, eq. 2) and independent draws of q_sample (eq. 4)
    from the same x0 [N]: returns (chain mean [T], chain variance [T], chain x_t at every t [T, N],
    q_sample x_t at every t [T, N])."""
    g = torch.Generator().manual_seed(seed)
    n = x0.shape[0]
    x = x0.clone()
    chain, marg = [], []
    for i in range(s.num_timesteps):
        t = torch.full((n,), i, dtype=torch.long)
        x = q_step(s, x, t, torch.randn(n, generator=g, dtype=F64))
        chain.append(x)
        marg.append(q_sample(s, x0, t, torch.randn(n, generator=g, dtype=F64)))
    chain_t, marg_t = torch.stack(chain), torch.stack(marg)
    return chain_t.mean(1), chain_t.var(1), chain_t, marg_t


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b|."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def bimodal_x0(n: int, seed: int = 1) -> torch.Tensor:
    """1-D data: +-1.5 with equal weight, std 0.2 (far from Gaussian, so that shapes can be compared)."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, (n,), generator=g).to(F64) * 2 - 1
    return 1.5 * sign + 0.2 * torch.randn(n, generator=g, dtype=F64)


def section_1(mode: Mode, out: Path, report: Report) -> dict:
    report("## 1. The forward kernel and merging Gaussians")
    beta_1, beta_2, x0 = 0.1, 0.2, 1.0
    m = two_step_merge(beta_1, beta_2, x0, mode.n)
    report(f"beta_1 = {beta_1}, beta_2 = {beta_2}, x_0 = {x0}, N = {mode.n} (two_step_merge)")
    report(
        f"  formula   1 - (1 - beta_1)(1 - beta_2) = {m['formula_var']:.4f}, mean sqrt(0.72) x_0 = {m['formula_mean']:.4f}"
    )
    report(
        f"  two steps of q_step:  variance {m['two_step_var']:.4f}, mean {m['two_step_mean']:.4f}"
    )
    report(
        f"  one q_sample:         variance {m['one_step_var']:.4f}, mean {m['one_step_mean']:.4f}"
    )
    se_var = m["formula_var"] * math.sqrt(2 / (mode.n - 1))
    report(f"  standard error of a variance estimate: {se_var:.4f}")

    s = NoiseSchedule.from_name("linear", mode.T)
    n_chain = min(mode.n, 20_000)
    x0s = bimodal_x0(n_chain)
    mean_t, var_t, chain, marg = chain_against_marginal(s, x0s)
    exact_var = s.alpha_bar * float(x0s.var()) + (1 - s.alpha_bar)
    worst = float((var_t - exact_var).abs().max())
    shown = [i for i in (0, mode.T // 100, mode.T // 10, mode.T // 4, mode.T - 1) if i >= 0]
    shown = sorted(set(shown))
    report(
        f"t steps of q_step against one q_sample: linear, T = {mode.T}, N = {n_chain} bimodal x_0"
    )
    report(
        f"  largest |Var(chain x_t) - (alpha_bar_t Var(x_0) + 1 - alpha_bar_t)| over t: {worst:.4f}"
    )
    ks = {}
    for i in shown:
        ks[i] = ks_distance(chain[i].numpy(), marg[i].numpy())
        report(
            f"  t = {i + 1:>4}: KS distance chain vs q_sample {ks[i]:.4f} (5% critical value {1.36 * math.sqrt(2 / n_chain):.4f})"
        )

    fig = figure(11, 3.4)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    ax1.hist(m["samples_two"], bins=120, density=True, alpha=0.5, label="two steps of q_step")
    u = np.linspace(-1.5, 3.0, 300)
    v, mu = m["formula_var"], m["formula_mean"]
    ax1.plot(u, np.exp(-((u - mu) ** 2) / (2 * v)) / math.sqrt(2 * math.pi * v), "k", lw=1.5,
             label=f"N(sqrt(0.72) x_0, {v:.2f})")  # fmt: skip
    ax1.set_xlabel("x_2")
    ax1.set_ylabel("density")
    ax1.set_title(
        f"beta = {beta_1}, {beta_2}: two steps = one step\nof variance 1 - (1-beta_1)(1-beta_2) = {v:.2f}",
        fontsize=9,
    )
    ax1.legend(fontsize=7)
    for i, c in zip(shown[1:4], ("tab:blue", "tab:orange", "tab:green"), strict=False):
        bins = np.linspace(-3.5, 3.5, 80)
        ax2.hist(
            chain[i].numpy(),
            bins=bins,
            density=True,
            histtype="step",
            color=c,
            lw=1.5,
            label=f"chain, t={i + 1}",
        )
        ax2.hist(
            marg[i].numpy(),
            bins=bins,
            density=True,
            histtype="step",
            color=c,
            ls="--",
            lw=1,
            label=f"q_sample, t={i + 1}",
        )
    ax2.set_xlabel("x_t")
    ax2.set_ylabel("density")
    ax2.set_title(
        f"t steps of q_step (solid) = one q_sample (dashed)\nbimodal x_0, linear, T = {mode.T}",
        fontsize=9,
    )
    ax2.legend(fontsize=6, ncol=2)
    t_axis = np.arange(1, mode.T + 1)
    ax3.plot(t_axis, var_t.numpy(), lw=2, alpha=0.6, label="Var(x_t), chain")
    ax3.plot(t_axis, exact_var.numpy(), "k--", lw=1, label="alpha_bar Var(x_0) + 1 - alpha_bar")
    ax3.plot(t_axis, mean_t.abs().numpy() + 1e-3, lw=1, alpha=0.6, label="|mean(x_t)|, chain")
    ax3.set_xscale("log")
    ax3.set_xlabel("t")
    ax3.set_ylabel("moment of x_t")
    ax3.set_title("the chain's moments follow eq. 4", fontsize=9)
    ax3.legend(fontsize=7)
    save(fig, out, "01_forward_kernel.png", report)
    return {"merge": m, "chain_worst_var_error": worst, "ks": ks, "n_chain": n_chain}


# --------------------------------------------------------------------------------------------------
# 2. why sqrt(1 - beta_t)
# --------------------------------------------------------------------------------------------------


def variance_paths(
    s: NoiseSchedule, var0: float, n: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte-Carlo Var(x_t) [T] of x0 ~ N(0, var0) pushed through q_step (variance preserving) and
    through x_t = x_{t-1} + sqrt(beta_t) eps (the signal not shrunk: variance exploding)."""
    g = torch.Generator().manual_seed(seed)
    x = math.sqrt(var0) * torch.randn(n, generator=g, dtype=F64)
    y = x.clone()
    vp, ve = [], []
    for i in range(s.num_timesteps):
        t = torch.full((n,), i, dtype=torch.long)
        x = q_step(s, x, t, torch.randn(n, generator=g, dtype=F64))
        y = y + s.beta[i].sqrt() * torch.randn(n, generator=g, dtype=F64)
        vp.append(x.var())
        ve.append(y.var())
    return torch.stack(vp), torch.stack(ve)


def section_2(mode: Mode, out: Path, report: Report) -> dict:
    report("## 2. Why sqrt(1 - beta_t)")
    s = NoiseSchedule.from_name("linear", mode.T)
    n = min(mode.n, 20_000)
    c1, c2 = s.alpha.sqrt(), s.beta.sqrt()
    report(
        f"max over t of |c1^2 + c2^2 - 1| with c1 = sqrt(alpha_t), c2 = sqrt(beta_t): {float((c1**2 + c2**2 - 1).abs().max()):.1e}"
    )
    report(
        f"linear, T = {mode.T}, N = {n}; Var(x_T) by Monte Carlo (variance_paths) and in closed form:"
    )
    rows = {}
    fig = figure(6.5, 4)
    ax = fig.add_subplot()
    t_axis = np.arange(1, mode.T + 1)
    for var0, c in ((1.0, "tab:blue"), (0.1, "tab:orange"), (4.0, "tab:green")):
        vp, ve = variance_paths(s, var0, n)
        vp_exact = s.alpha_bar * var0 + 1 - s.alpha_bar
        ve_exact = var0 + torch.cumsum(s.beta, 0)
        rows[var0] = (float(vp[-1]), float(vp_exact[-1]), float(ve[-1]), float(ve_exact[-1]))
        report(f"  Var(x_0) = {var0}: VP {rows[var0][0]:.3f} (exact {rows[var0][1]:.3f}); "
               f"VE {rows[var0][2]:.2f} (exact Var(x_0) + sum beta = {rows[var0][3]:.2f})")  # fmt: skip
        ax.plot(
            t_axis,
            vp.numpy(),
            color=c,
            lw=2,
            label=f"sqrt(1-beta) x + sqrt(beta) eps, Var(x_0)={var0}",
        )
        ax.plot(
            t_axis, ve.numpy(), color=c, lw=2, ls=":", label=f"x + sqrt(beta) eps, Var(x_0)={var0}"
        )
        ax.plot(t_axis, vp_exact.numpy(), "k--", lw=0.7)
        ax.plot(t_axis, ve_exact.numpy(), "k--", lw=0.7)
    ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("Var(x_t) (Monte Carlo; dashed: closed form)")
    ax.set_title("Shrinking by sqrt(1 - beta_t) keeps Var(x_t) at 1 (and pulls it to 1);\n"
                 "without it the variance grows to Var(x_0) + sum beta_t", fontsize=10)  # fmt: skip
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    save(fig, out, "02_variance_preserving.png", report)
    return {"rows": rows, "n": n}


# --------------------------------------------------------------------------------------------------
# 3. the limiting cases
# --------------------------------------------------------------------------------------------------


def section_3(mode: Mode, out: Path, report: Report) -> dict:
    report("## 3. The limiting cases x_0 = 0 and eps = 0")
    s = NoiseSchedule.from_name("linear", mode.T)
    g = torch.Generator().manual_seed(0)
    n = min(mode.n, 20_000)
    T = mode.T
    idx = torch.arange(T)
    # x_0 = 0: x_t = sqrt(1 - alpha_bar_t) eps, pure noise; one q_sample per t on N zeros.
    var_zero = torch.stack(
        [q_sample(s, torch.zeros(n, dtype=F64), torch.full((n,), int(i)), torch.randn(n, generator=g, dtype=F64)).var() for i in idx]
    )  # fmt: skip
    # eps = 0: x_t = sqrt(alpha_bar_t) x_0, a deterministic shrink.
    shrink = q_sample(s, torch.ones(T, dtype=F64), idx, torch.zeros(T, dtype=F64))
    worst = float((var_zero - (1 - s.alpha_bar)).abs().max())
    report(
        f"linear, T = {T}, N = {n}: x_0 = 0 gives Var(x_t) = 1 - alpha_bar_t to within {worst:.4f} (max over t)"
    )
    report(f"  eps = 0 gives x_t / x_0 = sqrt(alpha_bar_t): {float(shrink[-1]):.4f} at t = T "
           f"(sqrt(alpha_bar_T) = {float(s.sqrt_alpha_bar[-1]):.4f})")  # fmt: skip
    half = int(torch.searchsorted(-s.alpha_bar, torch.tensor(-0.5, dtype=F64)))
    report(f"  alpha_bar_t falls below 1/2 at t = {half + 1}")

    fig = figure(6, 3.6)
    ax = fig.add_subplot()
    t_axis = np.arange(1, T + 1)
    ax.plot(t_axis, var_zero.numpy(), lw=2, alpha=0.6, label="Var(x_t) when x_0 = 0 (Monte Carlo)")
    ax.plot(t_axis, (1 - s.alpha_bar).numpy(), "k--", lw=1, label="1 - alpha_bar_t")
    ax.plot(t_axis, shrink.numpy(), lw=2, alpha=0.6, label="x_t / x_0 when eps = 0")
    ax.plot(t_axis, s.sqrt_alpha_bar.numpy(), "k:", lw=1, label="sqrt(alpha_bar_t)")
    ax.axvline(half + 1, color="0.6", lw=0.8)
    ax.set_xlabel("t")
    ax.set_ylabel("variance / scale")
    ax.set_title(
        "x_0 = 0: pure noise of variance 1 - alpha_bar_t;\neps = 0: the signal shrinks as sqrt(alpha_bar_t)",
        fontsize=10,
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, out, "03_limiting_cases.png", report)

    x0 = digit(0)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    cols = [0, T // 20, T // 10, T // 5, 2 * T // 5, 3 * T // 5, T - 1]
    rows = [[], [], []]
    for i in cols:
        t = torch.tensor([i])
        rows[0].append(q_sample(s, x0, t, torch.zeros_like(eps))[0, 0])
        rows[1].append(q_sample(s, torch.zeros_like(x0), t, eps)[0, 0])
        rows[2].append(q_sample(s, x0, t, eps)[0, 0])
    fig = figure(7, 3.4)
    image_rows(fig, rows, ["eps = 0", "x_0 = 0", "both"], [f"t={i + 1}" for i in cols],
               "Row 3 = row 1 + row 2: the shrunk signal sqrt(alpha_bar_t) x_0\nplus the noise sqrt(1 - alpha_bar_t) eps (same eps in rows 2 and 3)")  # fmt: skip
    save(fig, out, "03_limiting_strips.png", report)
    return {"worst": worst, "shrink_T": float(shrink[-1])}


# --------------------------------------------------------------------------------------------------
# 4. how isotropic x_T is
# --------------------------------------------------------------------------------------------------


def prior_table(
    x0: torch.Tensor, Ts, schedules=SCHEDULES
) -> dict[tuple[str, int], tuple[float, float] | None]:
    """(alpha_bar_T, L_T in bits/dim averaged over x0) per (schedule, T); None where the schedule with
    that T reaches beta >= 1 (NoiseSchedule.from_name refuses it). L_T = prior_kl (eq. 5)."""
    out = {}
    num_dims = x0[0].numel()
    for name in schedules:
        for T in Ts:
            try:
                s = NoiseSchedule.from_name(name, T)
            except ValueError:
                out[name, T] = None
                continue
            out[name, T] = (
                float(s.alpha_bar[-1]),
                float(nats_to_bpd(prior_kl(s, x0), num_dims).mean()),
            )
    return out


def format_prior_table(table, Ts, schedules=SCHEDULES) -> list[str]:
    lines = [
        "| schedule | " + " | ".join(f"T = {T}" for T in Ts) + " |",
        "|---|" + "---|" * len(Ts),
    ]
    for name in schedules:
        cells = []
        for T in Ts:
            v = table[name, T]
            cells.append("beta_T >= 1" if v is None else f"{v[0]:.2e} / {v[1]:.2e}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def section_4(mode: Mode, out: Path, report: Report) -> dict:
    report(
        "## 4. How isotropic x_T is: alpha_bar_T / L_T (bits/dim, mean over the 300 test digits)"
    )
    x0 = digits_test()
    table = prior_table(x0, mode.table_T)
    for line in format_prior_table(table, mode.table_T):
        report(line)
    Ts = np.unique(np.logspace(1, math.log10(4000), 40).round().astype(int))
    fine = prior_table(x0, [int(T) for T in Ts])
    fig = figure(6, 3.8)
    ax = fig.add_subplot()
    for name in SCHEDULES:
        pts = [(T, fine[name, int(T)][1]) for T in Ts if fine[name, int(T)] is not None]
        ax.plot(*zip(*pts, strict=True), marker=".", color=COLORS[name], label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("T (betas scaled by 1000/T)")
    ax.set_ylabel("L_T = KL(q(x_T | x_0) || N(0, I)) (bits/dim)")
    ax.set_title("x_T is N(0, I) to within 1e-3 bits/dim for every valid (schedule, T);\n"
                 "cosine's L_T keeps falling with T, the others' level off", fontsize=9)  # fmt: skip
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    save(fig, out, "04_prior_term.png", report)
    return {"table": table}


# --------------------------------------------------------------------------------------------------
# 5. schedules
# --------------------------------------------------------------------------------------------------


def section_5(mode: Mode, out: Path, report: Report) -> dict:
    report("## 5. Schedules: beta_t, alpha_bar_t, SNR and log-SNR (NoiseSchedule.from_name)")
    T = mode.T
    fig = figure(10, 6)
    axes = fig.subplots(2, 2)
    t_axis = np.arange(1, T + 1)
    for name in SCHEDULES:
        s = NoiseSchedule.from_name(name, T)
        kw = {"color": COLORS[name], "label": name, "lw": 1.5}
        axes[0][0].plot(t_axis, s.beta.numpy(), **kw)
        axes[0][1].plot(t_axis, s.alpha_bar.numpy(), **kw)
        axes[1][0].plot(t_axis, s.snr.numpy(), **kw)
        axes[1][1].plot(t_axis, s.log_snr.numpy(), **kw)
        mid = int(torch.searchsorted(-s.log_snr, torch.tensor(0.0, dtype=F64)))
        report(f"  {name:>9}: beta_1 = {float(s.beta[0]):.2e}, beta_T = {float(s.beta[-1]):.3f}, "
               f"log-SNR from {float(s.log_snr[0]):.2f} to {float(s.log_snr[-1]):.2f}, SNR = 1 at t = {mid + 1}")  # fmt: skip
    for ax, label, log in (
        (axes[0][0], "beta_t", True),
        (axes[0][1], "alpha_bar_t", False),
        (axes[1][0], "SNR = alpha_bar / (1 - alpha_bar)", True),
        (axes[1][1], "log-SNR", False),
    ):
        ax.set_xlabel("t")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    axes[1][1].axhline(0, color="0.5", lw=0.8)
    fig.suptitle(f"T = {T}: cosine keeps more signal in the middle of the chain (higher SNR), "
                 "linear destroys it early", fontsize=10)  # fmt: skip
    save(fig, out, "05_schedules.png", report)

    x0 = digit(1)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    cols = [0, T // 10, T // 5, 3 * T // 10, 2 * T // 5, T // 2, 7 * T // 10, T - 1]
    rows = []
    for name in SCHEDULES:
        s = NoiseSchedule.from_name(name, T)
        rows.append([q_sample(s, x0, torch.tensor([i]), eps)[0, 0] for i in cols])
    fig = figure(7.5, 4.2)
    image_rows(fig, rows, list(SCHEDULES), [f"t={i + 1}" for i in cols],
               "One digit, the same eps in every row: the schedule alone decides how fast it fades")  # fmt: skip
    save(fig, out, "05_forward_strips.png", report)
    return {}


# --------------------------------------------------------------------------------------------------
# 6. the posterior
# --------------------------------------------------------------------------------------------------


def posterior_rows(s: NoiseSchedule, ts) -> list[tuple[int, float, float, float, float, float]]:
    """(t, beta_t, beta~_t, beta~_t / beta_t, coef of x_0, coef of x_t) at the paper's steps ts (eq. 7)."""
    rows = []
    for t in ts:
        i = t - 1
        b, bt = float(s.beta[i]), float(s.posterior_variance[i])
        rows.append(
            (
                t,
                b,
                bt,
                bt / b,
                float(s.posterior_mean_coef_x0[i]),
                float(s.posterior_mean_coef_xt[i]),
            )
        )
    return rows


def format_posterior_rows(rows) -> list[str]:
    lines = [
        "| t | beta_t | beta~_t | beta~_t / beta_t | coef of x_0 | coef of x_t |",
        "|---|---|---|---|---|---|",
    ]
    for t, b, bt, r, c0, ct in rows:
        lines.append(f"| {t} | {b:.3e} | {bt:.3e} | {r:.4f} | {c0:.4f} | {ct:.4f} |")
    return lines


def section_6(mode: Mode, out: Path, report: Report) -> dict:
    T = mode.T
    report(
        f"## 6. The posterior q(x_t-1 | x_t, x_0) = N(mu~_t, beta~_t I) (NoiseSchedule fields), linear, T = {T}"
    )
    s = NoiseSchedule.from_name("linear", T)
    ts = sorted({1, 2, 3, 10, T // 10, T})
    for line in format_posterior_rows(posterior_rows(s, ts)):
        report(line)
    fig = figure(10, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    t_axis = np.arange(1, T + 1)
    for name in ("linear", "cosine"):
        sc = NoiseSchedule.from_name(name, T)
        ax1.plot(t_axis, (sc.posterior_variance / sc.beta).numpy(), color=COLORS[name], label=name)
        ax2.plot(
            t_axis,
            sc.posterior_mean_coef_x0.numpy(),
            color=COLORS[name],
            label=f"{name}: coef of x_0",
        )
        ax2.plot(
            t_axis,
            sc.posterior_mean_coef_xt.numpy(),
            color=COLORS[name],
            ls="--",
            label=f"{name}: coef of x_t",
        )
    ax1.set_xscale("log")
    ax1.set_xlabel("t")
    ax1.set_ylabel("beta~_t / beta_t")
    ax1.set_title(
        "beta~_t = beta_t except in the first steps\n(beta~_1 = 0: x_0 is given)", fontsize=9
    )
    ax1.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=8)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("t")
    ax2.set_ylabel("coefficient in mu~_t")
    ax2.set_ylim(1e-3, 1.5)
    ax2.set_title(
        "mu~_t leans on x_0 only in the first steps,\nthen it is ~x_t / sqrt(alpha_t)", fontsize=9
    )
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=7)
    save(fig, out, "06_posterior.png", report)
    return {"rows": posterior_rows(s, ts)}


# --------------------------------------------------------------------------------------------------
# 7. the bound and lambda_t
# --------------------------------------------------------------------------------------------------


def lambda_weight(s: NoiseSchedule, variance: str = "fixed_small") -> torch.Tensor:
    """lambda_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t)) [T] (Ho et al. eq. 12's weight, per
    dimension, in nats): L_{t-1} = lambda_t E||eps - eps_theta||^2 when sigma_t^2 is fixed to beta~_t
    (fixed_small, log clipped at t = 1 as in p_mean_variance) or beta_t (fixed_large). L_simple sets it to 1."""
    from ddpm.diffusion import fixed_large_variance

    if variance == "fixed_small":
        sigma2 = s.posterior_log_variance_clipped.exp()
    elif variance == "fixed_large":
        sigma2 = fixed_large_variance(s)
    else:
        raise ValueError(variance)
    return s.beta**2 / (2 * sigma2 * s.alpha * (1 - s.alpha_bar))


def oracle_bound_terms(T: int, n: int, variance: str = "fixed_small", seed: int = 0):
    """variational_bound with the exact mixture denoiser on n points: the BoundTerms, full chain."""
    s = NoiseSchedule.from_name("linear", T)
    g = torch.Generator().manual_seed(seed)
    x0 = MIXTURE.sample(n, g)
    return (
        s,
        x0,
        variational_bound(
            MIXTURE.denoiser(s), s, x0, decoder="gaussian", variance=variance, generator=g
        ),
    )


def read_nll_csv(path: Path) -> dict[str, np.ndarray]:
    """The per-t table written by ``ddpm nll`` (columns t,index,term,count,mean_bpd,se_bpd)."""
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in ("t", "mean_bpd", "se_bpd")}


def section_7(mode: Mode, out: Path, report: Report, nll_csv: Path | None) -> dict:
    T = mode.T
    report(f"## 7. The bound's terms over t and the weight lambda_t that L_simple drops (T = {T})")
    s = NoiseSchedule.from_name("linear", T)
    lam = lambda_weight(s)
    ts = sorted({2, 10, T // 10, T})
    for name in ("linear", "cosine"):
        sc = NoiseSchedule.from_name(name, T)
        lam_s = lambda_weight(sc)
        cells = ", ".join(f"t={t}: {float(lam_s[t - 1]):.2e}" for t in ts)
        low = int(lam_s[1:].argmin()) + 1
        report(f"  lambda_t ({name}, fixed_small): {cells}; smallest {float(lam_s[low]):.2e} at t = {low + 1}, "
               f"lambda_2 / smallest = {float(lam_s[1] / lam_s[low]):.1f}")  # fmt: skip

    sb, x0, b = oracle_bound_terms(T, mode.bound_n)
    # With sigma^2 = beta~ the KL has only its mean term: L_{t-1} = lambda_t ||eps - eps_theta||^2 exactly.
    mean_terms = b.terms_bpd.mean(0).numpy()
    weighted = (lam[1:] * b.eps_mse[:, 1:].double()).mean(0).numpy() / LN2
    rel = float(np.abs(weighted - mean_terms[1:]).max() / np.abs(mean_terms[1:]).max())
    report(f"  exact mixture denoiser, N = {mode.bound_n}: bound {float(b.total_bpd.mean()):.3f} bits/dim; "
           f"L_T {float(b.prior_bpd.mean()):.2e}, L_0 {float(b.decoder_bpd.mean()):.3f}, sum of L_t-1 {float(b.terms_bpd[:, 1:].sum(1).mean()):.3f}")  # fmt: skip
    report(
        f"  max |lambda_t eps_mse_t - L_t-1| / max L_t-1 = {rel:.1e} (variational_bound's eps_mse)"
    )
    first10 = float(b.terms_bpd[:, 1:10].sum(1).mean() / b.terms_bpd[:, 1:].sum(1).mean())
    report(f"  share of sum L_t-1 in t = 2..10: {first10:.2f}")

    n_panels = 3 if nll_csv is not None else 2
    fig = figure(4.2 * n_panels, 3.8)
    axes = fig.subplots(1, n_panels)
    t_axis = np.arange(1, T + 1)
    for name in ("linear", "cosine"):
        sc = NoiseSchedule.from_name(name, T)
        for var, ls in (("fixed_small", "-"), ("fixed_large", "--")):
            axes[0].plot(t_axis[1:], lambda_weight(sc, var)[1:].numpy(), color=COLORS[name], ls=ls,
                         label=f"{name}, sigma^2 = {'beta~' if var == 'fixed_small' else 'beta'}")  # fmt: skip
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].text(2.2, 1.15, "L_simple: lambda_t = 1", fontsize=7)
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("t")
    axes[0].set_ylabel("lambda_t (nats per unit eps-MSE per dim)")
    axes[0].set_title(
        "The bound weighs small t by decades more than\nlarge t; L_simple weighs all t alike",
        fontsize=9,
    )
    axes[0].legend(fontsize=6)
    axes[0].grid(alpha=0.3, which="both")
    axes[1].plot(t_axis[1:], mean_terms[1:], lw=2, alpha=0.6, label="L_t-1 (variational_bound)")
    axes[1].plot(t_axis[1:], weighted, "k--", lw=0.8, label="lambda_t x eps-MSE_t")
    axes[1].plot([1], [mean_terms[0]], "o", color="tab:red", label=f"L_0 = {mean_terms[0]:.2f}")
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("t")
    axes[1].set_ylabel("term of the bound (bits/dim)")
    axes[1].set_title(
        f"Exact denoiser, 2-D mixture, linear T = {T}:\nits terms fall by decades over t",
        fontsize=9,
    )
    axes[1].legend(fontsize=7)
    axes[1].grid(alpha=0.3, which="both")
    result = {"rel": rel, "lam": lam}
    if nll_csv is not None:
        c = read_nll_csv(nll_csv)
        pos = c["mean_bpd"] > 0
        axes[2].plot(c["t"][pos], c["mean_bpd"][pos], lw=1.2)
        axes[2].fill_between(c["t"][pos], np.clip(c["mean_bpd"] - 2 * c["se_bpd"], 1e-6, None)[pos],
                             (c["mean_bpd"] + 2 * c["se_bpd"])[pos], alpha=0.3)  # fmt: skip
        axes[2].set_xscale("log")
        axes[2].set_yscale("log")
        axes[2].set_xlabel("t (L_0 at t = 1)")
        axes[2].set_ylabel("term of the bound (bits/dim)")
        axes[2].set_title(
            "Tiny U-Net on 8x8 digits (ddpm nll's per-t CSV):\nthe same shape, L_0 on top",
            fontsize=9,
        )
        axes[2].grid(alpha=0.3, which="both")
        share = float(c["mean_bpd"][1:10].sum() / c["mean_bpd"][1:].sum())
        summary = json.loads(nll_csv.with_suffix(".json").read_text())
        total, proto = summary["bits_per_dim"], summary["protocol"]
        report(f"  trained model, step {proto['checkpoint_step']}: bound {total['mean']:.3f} bits/dim "
               f"(95% CI {total['ci95'][0]:.3f}-{total['ci95'][1]:.3f}) on {proto['num_images']} test digits, full chain")  # fmt: skip
        report(f"  trained model ({nll_csv.name}): L_0 {c['mean_bpd'][0]:.3f} bits/dim, sum of L_t-1 {c['mean_bpd'][1:].sum():.3f}, "
               f"share of it in t = 2..10: {share:.2f}")  # fmt: skip
    save(fig, out, "07_bound_terms.png", report)
    return result


# --------------------------------------------------------------------------------------------------
# 8. the reverse process and the network's x_0 prediction
# --------------------------------------------------------------------------------------------------


class X0Recorder:
    """Wraps a model callable: calls it, converts its output to x0_pred with ddpm's own conversion
    (diffusion.predict_x0_eps) on the full chain ``schedule`` at the original timestep the sampler passes,
    stores it by that timestep, and returns the output unchanged."""

    def __init__(self, model, schedule: NoiseSchedule, prediction: str = "eps") -> None:
        self.model, self.schedule, self.prediction = model, schedule, prediction
        self.x0_pred: dict[int, torch.Tensor] = {}

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.model(x_t, t)
        t_index = torch.as_tensor(t).long().cpu()  # original timesteps index the full chain
        x0_pred, _ = predict_x0_eps(
            self.schedule, x_t.to(F64).cpu(), t_index, out.to(F64).cpu(), self.prediction
        )
        self.x0_pred[int(t_index[0])] = x0_pred
        return out


def reverse_with_x0(
    model,
    s: NoiseSchedule,
    x_T: torch.Tensor,
    sampler: str,
    num_steps: int,
    shown: int = 6,
    seed: int = 0,
):
    """Run SAMPLERS[sampler] on s respaced to num_steps (linspace grid; the full chain when equal) and
    return [(original t, x_t, x0_pred)] at ``shown`` steps, then ("x_0", final, final)."""
    chain = (
        s if num_steps == s.num_timesteps else respace(s, timestep_grid(s, num_steps, "linspace"))
    )
    picks = sorted(
        {int(round(v)) for v in np.linspace(0, chain.num_timesteps - 1, shown)}, reverse=True
    )
    rec = X0Recorder(model, s)
    g = torch.Generator().manual_seed(seed)
    res = SAMPLERS[sampler](rec, chain, x_T, generator=g, record=picks)
    steps = []
    for i in picks:
        t = int(chain.timesteps[i])
        steps.append((t, res.trajectory[i], rec.x0_pred[t]))
    return steps, res.x0


def section_8(mode: Mode, out: Path, report: Report, run: Path | None) -> dict:
    report("## 8. The reverse process: x_t and the x_0 prediction (X0Recorder around the model)")
    T = mode.T
    s = NoiseSchedule.from_name("linear", T)
    oracle = MIXTURE.denoiser(s)
    x_T = torch.randn(600, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    truth = MIXTURE.sample(600, torch.Generator().manual_seed(1))
    fig = figure(11, 7.4)
    axes = fig.subplots(4, 7)
    for r, (sampler, k) in enumerate((("ancestral", T), ("ddim", mode.ddim_steps))):
        steps, x0 = reverse_with_x0(oracle, s, x_T, sampler, k)
        for c, (t, x_t, x0_pred) in enumerate(steps):
            for rr, pts, label in ((2 * r, x_t, "x_t"), (2 * r + 1, x0_pred, "x0_pred")):
                ax = axes[rr][c]
                ax.scatter(truth[:, 0], truth[:, 1], s=1, c="0.8", linewidths=0)
                ax.scatter(
                    pts[:, 0],
                    pts[:, 1],
                    s=1,
                    c="tab:blue" if label == "x_t" else "tab:red",
                    linewidths=0,
                )
                ax.set_xlim(-4.5, 4.5)
                ax.set_ylim(-3.5, 4.0)
                ax.set_xticks([])
                ax.set_yticks([])
                if rr == 2 * r:
                    ax.set_title(f"{sampler} t={t + 1}", fontsize=8)
                if c == 0:
                    ax.set_ylabel(f"{sampler}\n{label}", fontsize=8)
        for rr in (2 * r, 2 * r + 1):
            ax = axes[rr][6]
            ax.scatter(truth[:, 0], truth[:, 1], s=1, c="0.8", linewidths=0)
            ax.scatter(x0[:, 0], x0[:, 1], s=1, c="k", linewidths=0)
            ax.set_xlim(-4.5, 4.5)
            ax.set_ylim(-3.5, 4.0)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title("final x_0", fontsize=8)
        report(f"  {sampler} ({k} steps), exact denoiser: final mean {x0.mean(0).numpy().round(3).tolist()}, "
               f"data mean {MIXTURE.mean().numpy().round(3).tolist()}")  # fmt: skip
    fig.suptitle(f"2-D mixture (grey), exact denoiser, linear T = {T}: x0_pred (red) sits on the data's mean at "
                 "large t,\nthen splits towards the two modes while x_t (blue) is still noisy", fontsize=10)  # fmt: skip
    save(fig, out, "08_reverse_oracle.png", report)

    if run is None:
        return {}
    from ddpm.runs import load_run_model

    model, config, ckpt = load_run_model(run)
    sr = NoiseSchedule.from_name(config.diffusion.schedule, config.diffusion.num_timesteps)

    def net(x_t, t):
        return model(x_t.float(), t).to(x_t.dtype)

    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    for sampler, k in (("ancestral", sr.num_timesteps), ("ddim", mode.ddim_steps)):
        steps, x0 = reverse_with_x0(net, sr, x_T, sampler, k, shown=7)
        rows, labels = [], []
        for j in range(x_T.shape[0]):
            rows.append([x_t[j, 0] for _, x_t, _ in steps] + [x0[j, 0]])
            rows.append([x0p[j, 0].clamp(-1, 1) for _, _, x0p in steps] + [x0[j, 0]])
            labels += [f"#{j + 1} x_t", f"#{j + 1} x0_pred"]
        fig = figure(7.5, 6.2)
        image_rows(fig, rows, labels, [f"t={t + 1}" for t, _, _ in steps] + ["x_0"],
                   f"{sampler}, {k} steps, tiny U-Net ({ckpt.step} steps on digits): x0_pred (clipped to [-1, 1])\n"
                   "is noise at t = T, a blurred digit by mid-chain, and settles long before x_t does")  # fmt: skip
        save(fig, out, f"08_reverse_digits_{sampler}.png", report)
    return {}


# --------------------------------------------------------------------------------------------------
# 9. bound versus likelihood
# --------------------------------------------------------------------------------------------------


def bound_gap(T: int, n: int, variance: str, seed: int = 0) -> tuple[float, float, float]:
    """(mean bound, mean -log p(x0), paired gap's standard error) in bits/dim for the exact mixture
    denoiser on n points, full chain of length T (variational_bound; GaussianMixture.log_prob)."""
    s, x0, b = oracle_bound_terms(T, n, variance, seed)
    nll = -MIXTURE.log_prob(x0) / (MIXTURE.dim * LN2)
    gap = b.total_bpd.double() - nll
    return float(b.total_bpd.mean()), float(nll.mean()), float(gap.std() / math.sqrt(n))


def reverse_variances(s: NoiseSchedule) -> dict[str, torch.Tensor]:
    """The reverse variances sigma_t^2 [T] compared in section 9 (index 0: the decoder L_0's):
    the library's fixed_small and fixed_large (both use beta~ at t = 2 for the decoder, as the released
    code does), and fixed_large with the decoder's variance beta_1 instead."""
    from ddpm.diffusion import fixed_large_variance

    return {
        "fixed_small": s.posterior_log_variance_clipped.exp(),
        "fixed_large": fixed_large_variance(s),
        "fixed_large, decoder beta_1": s.beta.clone(),
    }


def gaussian_bound_gap(
    s: NoiseSchedule, m: float, v0: float, model_variance: torch.Tensor
) -> float:
    """E[bound] - entropy in bits/dim, in closed form, for data N(m, v0) in each dimension and the exact
    denoiser with reverse variances sigma_t^2 = model_variance [T]. The exact x0_pred is E[x0 | x_t], so
    with Var[x0 | x_t] = v0 (1 - ab) / (ab v0 + 1 - ab) and c0 = posterior_mean_coef_x0:
      L_{t-1} = 0.5 (log(sigma^2 / beta~) + (beta~ + c0^2 Var[x0 | x_t]) / sigma^2 - 1),
      L_0 = 0.5 (log(2 pi sigma_1^2) + Var[x0 | x_1] / sigma_1^2),  L_T = E[prior_kl]
    (tests/test_likelihood.py derives the fixed_small case; tests/test_guide.py checks this one against
    variational_bound)."""
    ab, bt, c0 = s.alpha_bar, s.posterior_variance, s.posterior_mean_coef_x0
    var_x0 = v0 * (1 - ab) / (ab * v0 + 1 - ab)
    sig = model_variance
    kl = 0.5 * (torch.log(sig[1:] / bt[1:]) + (bt[1:] + c0[1:] ** 2 * var_x0[1:]) / sig[1:] - 1)
    decoder = 0.5 * (math.log(2 * math.pi) + torch.log(sig[0]) + var_x0[0] / sig[0])
    abT = ab[-1]
    prior = 0.5 * (-1 - torch.log(1 - abT) + (1 - abT) + abT * (m * m + v0))
    entropy = 0.5 * math.log(2 * math.pi * math.e * v0)
    return float((prior + decoder + kl.sum() - entropy) / LN2)


GAUSSIAN_DATA = (0.5, 0.2)  # mean and variance per dimension of section 9's closed-form panel


def section_9(mode: Mode, out: Path, report: Report) -> dict:
    report(
        f"## 9. Bound versus likelihood: exact denoiser, 2-D mixture, N = {mode.bound_n} points, linear schedule"
    )
    entropy, entropy_se = MIXTURE.entropy_mc(200_000, torch.Generator().manual_seed(7))
    report(
        f"  entropy of the data (GaussianMixture.entropy_mc): {entropy / (2 * LN2):.4f} +- {entropy_se / (2 * LN2):.4f} bits/dim"
    )
    report("| T | variance | bound (bits/dim) | -log p(x_0) (bits/dim) | gap | se of gap |")
    report("|---|---|---|---|---|---|")
    gaps = {}
    for variance in ("fixed_small", "fixed_large"):
        for T in mode.bound_T:
            bound, nll, se = bound_gap(T, mode.bound_n, variance)
            gaps[variance, T] = (bound - nll, se)
            report(f"| {T} | {variance} | {bound:.3f} | {nll:.3f} | {bound - nll:.3f} | {se:.3f} |")
    for T in mode.bound_T:
        s = NoiseSchedule.from_name("linear", T)
        r = s.posterior_variance[1:4] / s.beta[1:4]
        report(
            f"  T = {T}: beta~_t / beta_t at t = 2, 3, 4: {', '.join(f'{float(v):.3f}' for v in r)}"
        )
    m, v0 = GAUSSIAN_DATA
    closed_T = [*mode.bound_T, mode.bound_T[-1] * 4]
    names = list(reverse_variances(NoiseSchedule.from_name("linear", 100)))
    report(
        f"Gaussian data N({m}, {v0}), closed form (gaussian_bound_gap): E[bound] - entropy in bits/dim"
    )
    report("| T | " + " | ".join(names) + " |")
    report("|---|" + "---|" * len(names))
    closed = {}
    for T in closed_T:
        s = NoiseSchedule.from_name("linear", T)
        row = [gaussian_bound_gap(s, m, v0, v) for v in reverse_variances(s).values()]
        closed[T] = dict(zip(names, row, strict=True))
        report(f"| {T} | " + " | ".join(f"{g:.3f}" for g in row) + " |")

    fig = figure(11, 3.9)
    ax1, ax2 = fig.subplots(1, 2)
    for variance, c in (("fixed_small", "tab:blue"), ("fixed_large", "tab:orange")):
        Ts = np.array(mode.bound_T)
        g = np.array([gaps[variance, T][0] for T in Ts])
        e = np.array([gaps[variance, T][1] for T in Ts])
        ax1.errorbar(Ts, g, yerr=2 * e, marker="o", color=c, capsize=3,
                     label=f"sigma^2 = {'beta~' if variance == 'fixed_small' else 'beta'} ({variance})")  # fmt: skip
    ax1.set_title("2-D mixture, exact denoiser (Monte Carlo, +-2 se): the bound stays\n"
                  "above -log p(x_0); neither gap closes as T grows", fontsize=9)  # fmt: skip
    styles = {"fixed_small": ("tab:blue", "-"), "fixed_large": ("tab:orange", "-"),
              "fixed_large, decoder beta_1": ("tab:green", "--")}  # fmt: skip
    for name in names:
        c, ls = styles[name]
        ax2.plot(
            closed_T,
            [max(closed[T][name], 1e-4) for T in closed_T],
            marker="o",
            color=c,
            ls=ls,
            label=name,
        )
    ax2.set_title(f"Gaussian data N({m}, {v0}), closed form: the gap that stays comes from\n"
                  "the first steps' variances; with sigma_1^2 = beta_1 it closes", fontsize=9)  # fmt: skip
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # labels on the decades only
        ax.set_yscale("log")
        ax.set_xlabel("T (linear schedule)")
        ax.set_ylabel("bound - (-log p(x_0)) (bits/dim)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    save(fig, out, "09_bound_gap.png", report)
    return {"gaps": gaps, "closed": closed}


# --------------------------------------------------------------------------------------------------
# the trained model (full mode): through the public command line
# --------------------------------------------------------------------------------------------------


def ddpm_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ddpm", *args], check=True)


def trained_run(args, report: Report) -> tuple[Path, Path]:
    """(run directory, per-t CSV of `ddpm nll`): trains one unless --run names it."""
    run = Path(args.run) if args.run else Path(tempfile.mkdtemp(prefix="ddpm_guide_")) / "digits"
    if not args.run:
        report(
            f"training: ddpm train --data digits --steps {args.train_steps} --seed 0 --run-dir {run}"
        )
        ddpm_cli("train", "--data", "digits", "--steps", str(args.train_steps), "--seed", "0",
                 "--no-tensorboard", "--sample-every", "0", "-q", "--run-dir", str(run))  # fmt: skip
    eval_dir = run / "guide_eval"
    # --no-clip: the bound of Ho et al.'s eq. 5 as written (no clamping of the x_0 prediction)
    report(f"bound: ddpm nll {run} --steps all --num {args.nll_num} --no-clip --out {eval_dir}")
    ddpm_cli("nll", str(run), "--steps", "all", "--num", str(args.nll_num), "--no-clip",
             "--out", str(eval_dir), "-q")  # fmt: skip
    csvs = sorted(eval_dir.glob("nll_*.csv"))
    return run, csvs[-1]


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="small T and N (seconds; exact denoiser only)"
    )
    p.add_argument(
        "--out", default=None, help="output folder (default docs/guide; required with --quick)"
    )
    p.add_argument(
        "--run", default=None, help="a trained digits run to use in sections 7-8 (full mode)"
    )
    p.add_argument(
        "--train-steps", type=int, default=700, help="training steps when no --run (700)"
    )
    p.add_argument("--nll-num", type=int, default=100, help="test digits for ddpm nll (100)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    mode = QUICK if args.quick else FULL
    if args.out is None:
        if args.quick:
            p.error("--quick writes small figures: name a scratch folder with --out")
        args.out = Path(__file__).resolve().parents[1] / "docs" / "guide"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = nll_csv = None
    if mode is FULL:
        report = Report()
        run, nll_csv = trained_run(args, report)
        generate(mode, out, run, nll_csv, report)
    else:
        generate(mode, out)
    return 0


def generate(
    mode: Mode,
    out: Path,
    run: Path | None = None,
    nll_csv: Path | None = None,
    report: Report | None = None,
) -> tuple[dict, Report]:
    """Every section into ``out``: its figures, and numbers.txt with every printed line. ``run`` and
    ``nll_csv`` (a trained run and its `ddpm nll` per-t CSV) add the trained model's panels."""
    report = Report() if report is None else report
    start = time.monotonic()
    report.lines.insert(0, f"# scripts/figures.py, {mode.name} mode (T = {mode.T}, N = {mode.n})")
    print(report.lines[0], flush=True)
    results = {
        1: section_1(mode, out, report),
        2: section_2(mode, out, report),
        3: section_3(mode, out, report),
        4: section_4(mode, out, report),
        5: section_5(mode, out, report),
        6: section_6(mode, out, report),
        7: section_7(mode, out, report, nll_csv),
        8: section_8(mode, out, report, run),
        9: section_9(mode, out, report),
    }
    report(f"# done in {time.monotonic() - start:.0f} s")
    report.save(out / "numbers.txt")
    return results, report


if __name__ == "__main__":
    sys.exit(main())
