"""Sampler accuracy against the number of network evaluations, on a family of exact Gaussian mixtures.

Data: the mixtures of benchmarks/mixtures.py -- tight separated modes (std 0.02), overlapping needles,
full covariances in 8-D, 50 modes in 16-D and 64-D with anisotropy up to 50. The model is each
mixture's exact E[eps | x_t], so every difference from the true distribution is the sampler's own
error. For each mixture, sampler and budget of network evaluations (NFE; Heun's grid has (NFE + 1) / 2
points) we draw N samples from each of several x_T seeds and report
  - SW:     sliced Wasserstein-1 distance to the mixture itself (256 fixed projections, each against
            the projected mixture's exact quantiles: mixtures.ExactSlicedW), as a ratio to the same
            distance for 1000-step ancestral sampling from the same seeds ("the 1000-step chain");
            the ratio of the seed means, with its delta-method standard error. At N samples every cell
            carries a sampling floor ~ N^-1/2 -- the distance of N true points, reported -- so a ratio
            near 1 means "as good as the chain at this N", and larger N resolves smaller differences.
            Also the ratio to the converged ODE from the same x_T (UniPC-3, 250 evaluations):
            deterministic samplers share its sampling noise, so this ratio shows their own
            discretisation error.
  - NLL-H:  the samples' mean -log p_data minus the entropy H, in nats: > 0 when a sampler spreads
            mass where the data has little (over-dispersion), < 0 when it collapses onto the modes.
The summary takes, for each sampler and budget, the *worst* mixture: the hardest cases decide.

    python benchmarks/samplers.py --quick      # ~2 minutes on one core: 2000 samples, one seed
    python benchmarks/samplers.py              # the full run: writes benchmarks/results/samplers.json
    python benchmarks/samplers.py --budgets 10,20 --target-se 0.05 --out PATH
                                  # x_T seeds added until each ratio to the chain is known to 5%
    python benchmarks/samplers.py --schedule cosine --out PATH       # another chain
    python benchmarks/samplers.py --zero-terminal-snr --out PATH     # alpha_bar_T = 0, exact v-prediction
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(
    0, str(Path(__file__).resolve().parent)
)  # benchmarks/mixtures.py, run from anywhere

import ddpm.samplers as solvers  # noqa: E402
from ddpm.samplers import network_evaluations, sample, steps_for_evaluations  # noqa: E402
from ddpm.schedules import NoiseSchedule  # noqa: E402
from mixtures import (  # noqa: E402
    ExactSlicedW,
    check_denoiser,
    exact_denoiser,
    exact_v_denoiser,
    family,
)

# (label, sampler, options, grid)
SAMPLERS = [
    ("ancestral", "ancestral", {}, "linspace"),
    ("ddim", "ddim", {"eta": 0.0}, "linspace"),
    ("dpm_solver++ 2M", "dpm_solver", {"order": 2}, "logsnr"),
    ("dpm_solver++ 3M", "dpm_solver", {"order": 3}, "logsnr"),
    ("dpm_solver++ 2M sparse", "dpm_solver", {"order": 2}, "logsnr_sparse"),
    ("dpm_solver++ 2M quadratic", "dpm_solver", {"order": 2}, "quadratic"),
    ("dpm_solver++ 2M karras", "dpm_solver", {"order": 2}, "karras"),
    ("unipc-2", "unipc", {"order": 2}, "logsnr"),
    ("unipc-3", "unipc", {"order": 3}, "logsnr"),
    ("unipc-2 sparse", "unipc", {"order": 2}, "logsnr_sparse"),
    ("unipc-3 sparse", "unipc", {"order": 3}, "logsnr_sparse"),
    ("unipc-2 quadratic", "unipc", {"order": 2}, "quadratic"),
    ("unipc-2 karras", "unipc", {"order": 2}, "karras"),
    ("heun karras", "heun", {}, "karras"),
    ("ipndm-3 sparse", "ipndm", {"order": 3}, "logsnr_sparse"),
    ("ipndm-4 quadratic", "ipndm", {"order": 4}, "quadratic"),
    ("sde_dpm_solver++ 2M", "sde_dpm_solver", {"order": 2}, "logsnr"),
    ("dpm_solver++ 2M linspace", "dpm_solver", {"order": 2}, "linspace"),
    ("sde_dpm_solver++ 2M linspace", "sde_dpm_solver", {"order": 2}, "linspace"),
    ("sde_dpm_solver++ 3M linspace", "sde_dpm_solver", {"order": 3}, "linspace"),
]
# Not in the default list (a --quick run of 2026-11-30 had them no better than bh2 at 20-50 NFE and
# worse at 5-10); select with --samplers.
EXTRA_SAMPLERS = [
    ("unipc-3 quadratic", "unipc", {"order": 3}, "quadratic"),
    ("unipc-1", "unipc", {"order": 1}, "logsnr"),
    ("unipc-2 bh1", "unipc", {"order": 2, "variant": "bh1"}, "logsnr"),
    ("unipc-3 bh1", "unipc", {"order": 3, "variant": "bh1"}, "logsnr"),
    ("unipc-3 karras", "unipc", {"order": 3}, "karras"),
    ("dpm_solver++ 3M karras", "dpm_solver", {"order": 3}, "karras"),
    # iPNDM's other orders and grids (2026-12-02; results/samplers_ipndm.json and _2d3.json).
    ("ipndm-2 sparse", "ipndm", {"order": 2}, "logsnr_sparse"),
    ("ipndm-4 sparse", "ipndm", {"order": 4}, "logsnr_sparse"),
    ("ipndm-3 logsnr", "ipndm", {"order": 3}, "logsnr"),
    ("ipndm-3 karras", "ipndm", {"order": 3}, "karras"),
]
BUDGETS = [5, 10, 20, 50]
REFERENCE_STEPS = 1000
# The converged probability-flow ODE from the same x_T: UniPC-3 on 250 log-SNR points (on the exact
# Gaussian test its error is ~1e-5 at 81 points). Deterministic samplers share its sampling noise, so
# SW(cell) / SW(ODE) isolates their own discretisation error.
ODE_REFERENCE = ("unipc", {"order": 3}, "logsnr", 250)
# Seeds of true samples for the floor, at least (more if the cells have more): they cost no network
# evaluation, and with few of them the floor is as noisy as the cells it should judge.
FLOOR_SEEDS = 100


def _mean_se(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))


def ratio_of_independent_means(x: list[float], y: list[float]) -> tuple[float, float]:
    """mean(x) / mean(y) for unpaired samples of any sizes (a sampler's seeds against the true-sample
    floor's), with the delta-method standard error R sqrt((se_x / mean_x)^2 + (se_y / mean_y)^2)."""
    (mx, sx), (my, sy) = _mean_se(x), _mean_se(y)
    r = mx / my
    return r, r * math.sqrt((sx / mx) ** 2 + (sy / my) ** 2)


def ratio_of_means(x: list[float], y: list[float]) -> tuple[float, float]:
    """R = mean(x) / mean(y) over paired seeds, and its standard error by the delta method,
    sqrt(sum (x_i - R y_i)^2 / (n (n - 1))) / mean(y).

    The ratio of expected distances is what "as good as the chain" means. The mean of per-seed
    ratios estimates something else: with SW varying 20-40% between seeds, E[x / y] > E[x] / E[y]
    (Jensen), and one unlucky denominator dominates it. Pairing by seed still counts: the residuals
    x_i - R y_i are small where x and y share their x_T (a deterministic sampler against the ODE),
    so that SE is small, and large where they do not (against the stochastic chain)."""
    n = len(x)
    if n != len(y) or n == 0:
        raise ValueError(f"ratio_of_means needs paired values, got {len(x)} and {len(y)}")
    mean_y = sum(y) / n
    r = sum(x) / n / mean_y
    if n < 2:
        return r, float("nan")
    residual = sum((a - r * b) ** 2 for a, b in zip(x, y, strict=True))
    return r, math.sqrt(residual / (n * (n - 1))) / mean_y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2000 samples, 1 seed")
    parser.add_argument("--num", type=int, help="samples per cell and seed (default 4000)")
    parser.add_argument("--seeds", type=int, help="x_T seeds per cell (default 3)")
    parser.add_argument("--mixtures", help="comma-separated member names (default: all)")
    parser.add_argument("--samplers", help="comma-separated labels (default: all)")
    parser.add_argument(
        "--budgets", default=",".join(map(str, BUDGETS)),
        help="comma-separated numbers of network evaluations (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--target-se", type=float, metavar="S",
        help="add x_T seeds (beyond --seeds, up to --max-seeds) until every ratio to the chain has "
        "a relative standard error <= S, e.g. 0.03",
    )  # fmt: skip
    parser.add_argument("--max-seeds", type=int, default=100, help="with --target-se (100)")
    parser.add_argument(
        "--floor-seeds", type=int,
        help=f"seeds of true samples for the floor, at least (default {FLOOR_SEEDS}; --quick 10)",
    )  # fmt: skip
    parser.add_argument("--schedule", default="linear")
    parser.add_argument(
        "--zero-terminal-snr", action="store_true",
        help="rescale the schedule to alpha_bar_T = 0 (Lin et al. 2023) and sample with the exact "
        "v-prediction, as such a model must",
    )  # fmt: skip
    parser.add_argument(
        "--max-step-growth", type=float, default=solvers.MAX_STEP_GROWTH,
        help="ddpm.samplers.MAX_STEP_GROWTH for this run (inf: the multistep solvers as published, "
        "whatever the step ratio)",
    )  # fmt: skip
    parser.add_argument("--report", metavar="JSON", help="print the tables of an earlier run's JSON "
                        "again (and refresh its summary) instead of sampling")  # fmt: skip
    parser.add_argument(
        "--markdown", action="store_true", help="with --report: also the README table"
    )
    parser.add_argument("--out", help="JSON path (default benchmarks/results/samplers.json; "
                        "--quick: not written unless given)")  # fmt: skip
    args = parser.parse_args()
    if args.report:
        path = Path(args.report)
        saved = json.loads(path.read_text())
        for result in saved["mixtures"]:
            _print_member(add_ratios(result))
        saved["summary"] = report(saved["mixtures"], num=saved["args"]["num"])
        _write_json(path, saved)
        if args.markdown:
            _print_markdown(saved["summary"])
            _print_markdown_by_mixture(saved["mixtures"])
        return
    num = args.num or (2000 if args.quick else 4000)
    seeds = args.seeds or (1 if args.quick else 3)
    out_path = args.out or (None if args.quick else "benchmarks/results/samplers.json")
    budgets = _budgets(args.budgets)
    torch.set_num_threads(1)  # small tensors: a second thread only adds synchronisation
    solvers.MAX_STEP_GROWTH = args.max_step_growth

    members = family()
    if args.mixtures:
        members = [m for m in members if m.name in _known(args.mixtures, [m.name for m in members])]
    samplers = SAMPLERS
    if args.samplers:
        wanted = _known(args.samplers, [s[0] for s in SAMPLERS + EXTRA_SAMPLERS])
        samplers = [s for s in SAMPLERS + EXTRA_SAMPLERS if s[0] in wanted]
    schedule = NoiseSchedule.from_name(
        args.schedule, 1000, zero_terminal_snr=args.zero_terminal_snr
    )
    prediction = "v" if args.zero_terminal_snr else "eps"
    start_all = time.monotonic()
    results = []
    for member in members:
        result = run_member(
            member, schedule, samplers, num=num, seeds=seeds, budgets=budgets,
            prediction=prediction, target_se=args.target_se, max_seeds=args.max_seeds,
            floor_seeds=args.floor_seeds or (10 if args.quick else FLOOR_SEEDS),
        )  # fmt: skip
        results.append(result)
        _print_member(result)
    print()

    summary = report(results, num=num)
    print(f"total {time.monotonic() - start_all:.0f} s")

    if out_path is None:
        return
    out = {
        "benchmark": "samplers",
        "command": shlex.join(["python", *sys.argv]),
        "args": vars(args) | {"num": num, "seeds": seeds},
        "budgets": budgets,
        "mixtures": results,
        "summary": summary,
        "seconds": time.monotonic() - start_all,
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "cpus": os.cpu_count(), "threads": torch.get_num_threads()},
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    _write_json(Path(out_path), out)


def _budgets(requested: str) -> list[int]:
    """The comma-separated budgets asked for, refused in one line unless each is a whole number >= 1."""
    try:
        budgets = [int(b) for b in requested.split(",")]
    except ValueError:
        budgets = []
    if not budgets or min(budgets) < 1:
        raise SystemExit(
            f"--budgets must be whole numbers >= 1, comma-separated; got {requested!r}"
        )
    return budgets


def _known(requested: str, known: list[str]) -> list[str]:
    """The comma-separated names asked for, refused in one line unless every one is known."""
    names = requested.split(",")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown name(s) {unknown}; known: {', '.join(known)}")
    return names


def _print_markdown(summary: dict[str, list[dict]]) -> None:
    """The README's table: per cell the worst mixture's SW over that of the 1000-step chain, of the converged
    ODE and of as many true samples (each ratio's own worst mixture)."""
    budgets = [c["budget"] for c in next(iter(summary.values()))]
    print("\n| sampler (grid) \\ network evaluations | " + " | ".join(map(str, budgets)) + " |")
    print("|---" * (len(budgets) + 1) + "|")
    for label, cells in summary.items():
        print(f"| {label} | " + " | ".join(
            f"{c['worst_ratio']:.2f} ± {c['worst_ratio_se']:.2f} / {c['worst_ratio_to_ode']:.2f} / "
            f"{c['worst_ratio_to_floor']:.2f}"
            for c in cells) + " |")  # fmt: skip


def _print_markdown_by_mixture(results: list[dict]) -> None:
    """Per mixture: its seeds, the references against each other, and at each budget the sampler
    with the lowest SW over the chain's (ratio +- SE)."""
    budgets = list(dict.fromkeys(row["budget"] for row in results[0]["rows"]))
    print("\n| mixture | x_T seeds | chain / true | ODE / chain | "
          + " | ".join(f"best at {k}" for k in budgets) + " |")  # fmt: skip
    print("|---" * (4 + len(budgets)) + "|")
    for r in results:
        best = [
            min((row for row in r["rows"] if row["budget"] == k), key=lambda row: row["sw_ratio"])
            for k in budgets
        ]
        print(f"| {r['mixture']} | {len(r['reference_sw_per_seed'])} | "
              f"{r['chain_over_floor']:.2f} ± {r['chain_over_floor_se']:.2f} | "
              f"{r['ode_over_chain']:.2f} ± {r['ode_over_chain_se']:.2f} | "
              + " | ".join(f"{b['sampler']} {b['sw_ratio']:.2f} ± {b['sw_ratio_se']:.2f}"
                           for b in best) + " |")  # fmt: skip


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    print(f"wrote {path}")


def run_member(
    member, schedule, samplers, *, num: int, seeds: int, budgets=tuple(BUDGETS), prediction="eps",
    target_se: float | None = None, max_seeds: int = 3, floor_seeds: int = FLOOR_SEEDS,
) -> dict:  # fmt: skip
    """Every cell of one mixture: the 1000-step reference, the converged ODE, then each sampler at
    each budget, from x_T seeds 0, 1, ...; the model predicts eps, or v (``prediction="v"``, needed
    on a zero-terminal-SNR chain).

    ``seeds`` seeds at least; with ``target_se``, more (up to ``max_seeds``) until every ratio to
    the chain -- each row's and the converged ODE's -- has a relative standard error at most
    ``target_se``. SW varies 20-40% between seeds at a few thousand samples, and the chain shares no
    noise with a deterministic sampler, so a 10% difference needs tens of seeds; the low-dimensional
    members need them, the 64-D one does not."""
    mix, start = member.mixture, time.monotonic()
    check_denoiser(mix, schedule)  # the fast denoiser is ddpm.oracle's formula, to 1e-9
    model = (exact_v_denoiser if prediction == "v" else exact_denoiser)(mix, schedule)
    sw = ExactSlicedW(mix)
    entropy, entropy_se = mix.entropy_mc(200_000, torch.Generator().manual_seed(7))
    cells = [("ancestral", {}, "linspace", REFERENCE_STEPS), ODE_REFERENCE] + [
        (name, options, grid, steps_for_evaluations(name, nfe))
        for _, name, options, grid in samplers
        for nfe in budgets
    ]
    sws, nlls = [[] for _ in cells], [[] for _ in cells]

    def resolved() -> bool:
        if len(sws[0]) < seeds:
            return False
        if target_se is None or len(sws[0]) >= max_seeds:
            return True
        worst = max(se / r for r, se in (ratio_of_means(x, sws[0]) for x in sws[1:]))
        print(f"\r{member.name}: {len(sws[0])} seeds, largest relative SE of a chain ratio "
              f"{worst:.3f} (target {target_se})", end="", file=sys.stderr, flush=True)  # fmt: skip
        return worst <= target_se

    while not resolved():
        r = len(sws[0])
        for (name, options, grid, steps), cell_sws, cell_nlls in zip(cells, sws, nlls, strict=True):
            x = sample(
                model, schedule, (num, mix.dim), sampler=name, num_steps=steps, grid=grid,
                generator=torch.Generator().manual_seed(r), dtype=torch.float64,
                prediction=prediction, **options,
            ).x0  # fmt: skip
            cell_sws.append(sw(x))
            cell_nlls.append(float(-mix.log_prob(x).mean()) - entropy)
    if target_se is not None:
        print(file=sys.stderr)  # end the progress line
    # True samples cost no network: many seeds make the floor a sharp yardstick.
    floor = [
        sw(mix.sample(num, torch.Generator().manual_seed(1000 + r)))
        for r in range(max(len(sws[0]), floor_seeds))
    ]
    rows = [
        {"sampler": label, "name": name, "options": options, "grid": grid,
         "nfe": network_evaluations(name, steps), "budget": nfe, "steps": steps,
         "sw": _mean_se(cell_sws)[0], "sw_per_seed": cell_sws,
         "nll_minus_h": _mean_se(cell_nlls)[0]}
        for (label, name, options, grid, nfe), (_, _, _, steps), cell_sws, cell_nlls in zip(
            [(*s, nfe) for s in samplers for nfe in budgets], cells[2:], sws[2:], nlls[2:],
            strict=True)
    ]  # fmt: skip
    result = {
        "mixture": member.name, "what": member.what, "dim": mix.dim,
        "components": mix.num_components, "entropy_nats": entropy, "entropy_se": entropy_se,
        "seeds": len(sws[0]),
        "floor_sw": _mean_se(floor)[0], "floor_sw_per_seed": floor,
        "reference_sw": _mean_se(sws[0])[0], "reference_sw_per_seed": sws[0],
        "reference_nll_minus_h": _mean_se(nlls[0])[0],
        "ode_sw": _mean_se(sws[1])[0], "ode_sw_per_seed": sws[1],
        "ode_nll_minus_h": _mean_se(nlls[1])[0], "rows": rows,
        "seconds": time.monotonic() - start,
    }  # fmt: skip
    return add_ratios(result)


def add_ratios(result: dict) -> dict:
    """Fill in one mixture's ratios from its per-seed distances (also for a saved run, so that
    ``--report`` applies today's estimator): each row's SW over the 1000-step chain's and over the
    converged ODE's, and the ODE's own over the chain's -- how far the reference itself sits from
    the chain at this many samples and seeds, i.e. what the chain ratios can resolve."""
    ref, ode = result["reference_sw_per_seed"], result["ode_sw_per_seed"]
    result["ode_over_chain"], result["ode_over_chain_se"] = ratio_of_means(ode, ref)
    floor = result["floor_sw_per_seed"]
    result["floor_over_chain"], result["floor_over_chain_se"] = ratio_of_independent_means(
        floor, ref
    )
    result["chain_over_floor"], result["chain_over_floor_se"] = ratio_of_independent_means(
        ref, floor
    )
    result["ode_over_floor"], result["ode_over_floor_se"] = ratio_of_independent_means(ode, floor)
    for row in result["rows"]:
        row["sw_ratio"], row["sw_ratio_se"] = ratio_of_means(row["sw_per_seed"], ref)
        row["sw_ratio_to_ode"], row["sw_ratio_to_ode_se"] = ratio_of_means(row["sw_per_seed"], ode)
        row["sw_ratio_to_floor"], row["sw_ratio_to_floor_se"] = ratio_of_independent_means(
            row["sw_per_seed"], floor
        )
    return result


def _print_member(r: dict) -> None:
    print(
        f"\n{r['mixture']}: {r['what']}; H = {r['entropy_nats']:.3f} nats; SW floor (true points) "
        f"{r['floor_sw']:.4f}; 1000-step ancestral SW {r['reference_sw']:.4f}, NLL-H "
        f"{r['reference_nll_minus_h']:+.3f}; converged ODE SW {r['ode_sw']:.4f}, NLL-H "
        f"{r['ode_nll_minus_h']:+.3f} ({r['seconds']:.0f} s)"
    )
    print(
        f"{len(r['reference_sw_per_seed'])} x_T seeds, {len(r['floor_sw_per_seed'])} of true "
        f"points; ratios of the seed "
        f"means +- SE: chain / true points {r['chain_over_floor']:.2f} +- "
        f"{r['chain_over_floor_se']:.2f}, converged ODE / true points {r['ode_over_floor']:.2f} +- "
        f"{r['ode_over_floor_se']:.2f}, converged ODE / chain {r['ode_over_chain']:.2f} +- "
        f"{r['ode_over_chain_se']:.2f}"
    )
    print("SW / SW(1000-step ancestral) | SW / SW(converged ODE), (NLL - H in nats)")
    budgets = list(dict.fromkeys(row["budget"] for row in r["rows"]))
    print(f"{'sampler':<24}" + "".join(f"{'NFE ' + str(k):>22}" for k in budgets))
    labels = list(dict.fromkeys(row["sampler"] for row in r["rows"]))
    for label in labels:
        cells = [row for row in r["rows"] if row["sampler"] == label]
        print(f"{label:<24}" + "".join(
            f"{c['sw_ratio']:.2f}|{c['sw_ratio_to_ode']:.2f} ({c['nll_minus_h']:+.2f})".rjust(22)
            for c in cells))  # fmt: skip


def report(results: list[dict], *, num: int) -> dict[str, list[dict]]:
    """Print and return, per sampler and budget, the worst mixture of the family for three measures:
    SW / SW(1000-step ancestral), SW / SW(converged ODE), and NLL - H (largest in size)."""
    labels = list(dict.fromkeys(row["sampler"] for row in results[0]["rows"]))
    budgets = list(dict.fromkeys(row["budget"] for row in results[0]["rows"]))
    summary = {}
    for label in labels:
        cells = []
        for k in budgets:
            rows = [
                (
                    r["mixture"],
                    next(x for x in r["rows"] if x["sampler"] == label and x["budget"] == k),
                )
                for r in results
            ]
            chain = max(rows, key=lambda mr: mr[1]["sw_ratio"])
            floor = max(rows, key=lambda mr: mr[1]["sw_ratio_to_floor"])
            ode = max(rows, key=lambda mr: mr[1]["sw_ratio_to_ode"])
            nll = max(rows, key=lambda mr: abs(mr[1]["nll_minus_h"]))
            cells.append(
                {"budget": k, "nfe": chain[1]["nfe"],
                 "worst_ratio": chain[1]["sw_ratio"], "worst_ratio_se": chain[1]["sw_ratio_se"],
                 "worst_mixture": chain[0],
                 "worst_ratio_to_ode": ode[1]["sw_ratio_to_ode"],
                 "worst_ratio_to_ode_se": ode[1]["sw_ratio_to_ode_se"], "worst_ode_mixture": ode[0],
                 "worst_ratio_to_floor": floor[1]["sw_ratio_to_floor"],
                 "worst_ratio_to_floor_se": floor[1]["sw_ratio_to_floor_se"],
                 "worst_floor_mixture": floor[0],
                 "worst_nll_minus_h": nll[1]["nll_minus_h"], "worst_nll_mixture": nll[0]}
            )  # fmt: skip
        summary[label] = cells
    seeds = ", ".join(f"{r['mixture']} {len(r['reference_sw_per_seed'])}" for r in results)
    print(f"worst mixture of {len(results)} per cell; {num} samples per seed; seeds: {seeds}")
    for title, key, where, fmt in [
        ("SW / SW(1000-step ancestral), +- SE", "worst_ratio", "worst_mixture", "{:.2f}+-{:.2f}"),
        ("SW / SW(converged ODE, same x_T)", "worst_ratio_to_ode", "worst_ode_mixture", "{:.2f}"),
        (
            "SW / SW(as many true samples), +- SE",
            "worst_ratio_to_floor",
            "worst_floor_mixture",
            "{:.2f}+-{:.2f}",
        ),
        ("NLL - H in nats, largest in size", "worst_nll_minus_h", "worst_nll_mixture", "{:+.2f}"),
    ]:
        print(f"\n{title}")
        print(f"{'sampler':<24}" + "".join(f"{'NFE ' + str(k):>28}" for k in budgets))
        for label, cells in summary.items():
            print(f"{label:<24}" + "".join(
                f"{fmt.format(c[key], c.get(key + '_se'))} ({c[where]})".rjust(28)
                for c in cells))  # fmt: skip
    print()
    for i, k in enumerate(budgets):
        best = min(summary, key=lambda s: summary[s][i]["worst_ratio"])
        best_ode = min(summary, key=lambda s: summary[s][i]["worst_ratio_to_ode"])
        print(f"best at {k} NFE on the worst mixture: {best} ({summary[best][i]['worst_ratio']:.2f} "
              f"+- {summary[best][i]['worst_ratio_se']:.2f} of the 1000-step chain); to the converged "
              f"ODE: {best_ode} "
              f"({summary[best_ode][i]['worst_ratio_to_ode']:.2f})")  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
